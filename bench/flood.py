"""Bench: the coordinator under hostile traffic on its public port (issue 32), on loopback only.

    python bench/flood.py [--rounds 2] [--seconds 600]     # a 2-site warm federation, quiet, then flooded
    python bench/flood.py --big-body 400                    # one 400 MB body at a coordinator, limit on and off

The federation is a real ``nearl-server`` (demo config, default limits) with two warm
``nearl-client`` sites on 127.0.0.1, run twice on the same data: quiet, then while
attackers on other loopback addresses send, from the sites' start until the federation ends
(at most ``--seconds``):

- big bodies from 127.0.0.2: push-messages of 400 MB, declared by Content-Length, then chunked;
- small requests from 127.0.0.3-4: unauthenticated Fleet calls with random bytes (one in
  ten to the Control API instead), each on a new connection, each address aiming at 3x
  the rate limit (the attacker shares this machine's cores with the sites: a harder flood
  measures its own CPU use more than the coordinator);
- slow senders from 127.0.0.7-8: 40 connections per address (over the limit of 32) that
  send their headers a byte a second, trickle their body or stall it.

It reports what was refused by kind, the SuperLink's peak resident memory, the round
times of both runs and whether both runs end with the same final adapters. ``--big-body``
starts a coordinator without sites and sends one body of that size, declared and chunked,
first with the derived limit, then with ``--max-body-mb`` above the body (no limit in
effect), and prints the SuperLink's memory before and after each.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from common import (_cmdline, exit_on_sigterm, load_average, machine, process_cpu_seconds, process_rss_mib,
                    result, tree_pids)
from federation_overhead import read_mlflow_rounds
from flood_attacks import SLOW_MODES, Tally, big_body, loopback_only, slow_senders, small_requests

BIN = Path(sys.executable).parent
HOST = "127.0.0.1"  # the coordinator and the sites
BIG_SOURCE, SMALL_SOURCES, SLOW_SOURCES = "127.0.0.2", ("127.0.0.3", "127.0.0.4"), ("127.0.0.7", "127.0.0.8")
ROUND_LINE = re.compile(r"^round (\d+)/\d+  sites (\d+)/(\d+)  .*?  ([\d.]+)s  sent", re.M)
MEMORY_BOUND = 1.5  # the flooded SuperLink's peak RSS at most this times the quiet run's
ROUND_FACTOR = 2.5  # the flooded rounds' median time at most this times the quiet run's


@dataclass(frozen=True)
class FloodPlan:
    seconds: float = 600.0  # every attack ends by then (or when the federation does)
    big_declared: int = 10
    big_chunked: int = 10
    big_mb: int = 400
    body_spacing: float = 5.0  # seconds between two big bodies
    small_per_address: int = 20000
    small_per_second: float = 30.0  # per address: 3x the default rate limit
    slow_per_address: int = 40  # over the default 32 connections per address


async def flood(port: int, plan: FloodPlan, stop: threading.Event) -> dict[str, Tally]:
    """All three attacks at once against 127.0.0.1:``port`` until ``stop`` or ``plan.seconds``; a tally each."""
    loopback_only(HOST, BIG_SOURCE, *SMALL_SOURCES, *SLOW_SOURCES)
    target, tallies = (HOST, port), {"big bodies": Tally(), "small requests": Tally(), "slow senders": Tally()}
    deadline = time.monotonic() + plan.seconds

    def going() -> bool:
        return time.monotonic() < deadline and not stop.is_set()

    async def bodies() -> None:
        kinds = [False] * plan.big_declared + [True] * plan.big_chunked
        for chunked in kinds[::2] + kinds[1::2]:  # declared and chunked in turn
            if not going():
                break
            await big_body(target, BIG_SOURCE, plan.big_mb * 10**6, chunked, tallies["big bodies"])
            await asyncio.sleep(plan.body_spacing)

    slow = [slow_senders(target, source, SLOW_MODES[i % len(SLOW_MODES)], going, tallies["slow senders"])
            for source in SLOW_SOURCES for i in range(plan.slow_per_address)]
    small = [small_requests(target, source, plan.small_per_address, plan.small_per_second, going,
                            tallies["small requests"]) for source in SMALL_SOURCES]
    await asyncio.gather(bodies(), *slow, *small)
    return tallies


class Flood(threading.Thread):
    """:func:`flood` in a thread of its own (its own event loop), stopped with :meth:`stop`."""

    def __init__(self, port: int, plan: FloodPlan):
        super().__init__(daemon=True)
        self.port, self.plan, self.halt, self.tallies = port, plan, threading.Event(), {}
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self.tallies = asyncio.run(flood(self.port, self.plan, self.halt))
        except BaseException as err:  # noqa: BLE001 - reported by stop()
            self.error = err

    def stop(self) -> dict[str, Tally]:
        self.halt.set()
        self.join(timeout=60)
        if self.error is not None:
            raise RuntimeError(f"the flood failed: {self.error!r}") from self.error
        if self.is_alive():
            raise RuntimeError("the flood did not stop within 60 s")
        return self.tallies


class Watch(threading.Thread):
    """Samples one process every 0.25 s until stopped: its peak resident memory and its CPU time."""

    def __init__(self, pid: int):
        super().__init__(daemon=True)
        self.pid, self.first, self.peak, self.cpu = pid, process_rss_mib(pid), 0.0, 0.0
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.wait(0.25):
            self.peak = max(self.peak, process_rss_mib(self.pid))
            self.cpu = max(self.cpu, process_cpu_seconds(self.pid))

    def stop(self) -> float:
        self.done.set()
        self.join(timeout=5)
        return self.peak


def child_pid(server_pid: int, marker: str, timeout: float = 120.0) -> int:
    """The process under nearl-server whose command line holds ``marker`` (flower-superlink, server.proxy)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = [p for p in tree_pids(server_pid) if marker in _cmdline(p)]
        if found:
            return found[0]
        time.sleep(0.5)
    raise TimeoutError(f"no {marker} process under nearl-server")


def wait_for_text(log: Path, text: str, proc, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while text not in (log.read_text(errors="replace") if log.exists() else ""):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"'{text}' not in {log.name}:\n{log.read_text(errors='replace')[-3000:]}")
        time.sleep(0.5)


def finish(server, log: Path, attack: Flood | None, timeout: float = 1800.0) -> int:
    """nearl-server's exit code; the flood stops once the last round is done (not against a closed port)."""
    deadline = time.monotonic() + timeout
    while server.poll() is None:
        if attack is not None and "done: final adapters" in log.read_text(errors="replace"):
            attack.halt.set()
        if time.monotonic() > deadline:
            raise TimeoutError(f"nearl-server did not finish within {timeout:.0f}s")
        time.sleep(0.5)
    return server.returncode


def federation(work: Path, data: list[Path], rounds: int, plan: FloodPlan | None) -> dict:
    """One warm federation of ``len(data)`` sites on loopback, flooded by ``plan`` when given."""
    from nearl_protocol import processes as flower

    work.mkdir(parents=True)
    port, log, procs, attack = flower.free_port(), work / "server.log", [], None
    try:
        server = flower.start_process(
            [str(BIN / "nearl-server"), "--host", HOST, "--port", str(port), "--insecure", "--rounds", str(rounds),
             "--min-sites", str(len(data)), "--local-epochs", "1", "--round-timeout", "600", "--wait-timeout", "600",
             "--checkpoint-dir", str(work / "ck"), "--mlflow-uri", f"sqlite:///{work / 'mlflow.db'}"],
            env=flower.flower_env(work / "home-server"), log_file=log, cwd=work)
        procs.append(server)
        wait_for_text(log, "submitted", server, 600)
        superlink, proxy = Watch(child_pid(server.pid, "flower-superlink")), Watch(child_pid(server.pid, "server.proxy"))
        superlink.start()
        proxy.start()
        for i, root in enumerate(data, 1):
            procs.append(flower.start_process(
                [str(BIN / "nearl-client"), "--site", f"site{i}", "--data", str(root), "--server", f"{HOST}:{port}",
                 "--insecure", "--threads", "1", "--state-dir", str(work / f"state-site{i}")],
                env=flower.flower_env(work / f"home-site{i}"), log_file=work / f"site{i}.log", cwd=work))
        attack = Flood(port, plan) if plan else None
        if attack:
            attack.start()
        code = finish(server, log, attack)
        superlink.stop()
        proxy.stop()
    finally:
        tallies = attack.stop() if attack else {}
        for p in reversed(procs):
            flower.stop_process(p, timeout=30)
    text = log.read_text(errors="replace")
    rounds_seen = [(int(r), int(a), int(s), float(sec)) for r, a, s, sec in ROUND_LINE.findall(text)]
    slowest = {row["round"]: row["slowest"] for row in
               read_mlflow_rounds(f"sqlite:///{work / 'mlflow.db'}", [f"site{i}" for i in range(1, len(data) + 1)])}
    done = re.search(r"done: final adapters in (\S+)", text)
    return {"code": code, "rounds": rounds_seen, "slowest_site_seconds": [slowest.get(r[0]) for r in rounds_seen],
            "adapters": Path(done.group(1)) if done else None, "superlink_first_mib": superlink.first,
            "superlink_peak_mib": superlink.peak, "superlink_cpu_s": superlink.cpu, "proxy_cpu_s": proxy.cpu,
            "tallies": tallies, "log": text,
            "refusal_lines": text.count("nearl-server proxy: refused") + text.count("nearl-server proxy: closed")}


def same_adapters(a: Path | None, b: Path | None) -> bool:
    import torch

    from nearl_core.adapter_io import read_adapters

    if a is None or b is None:
        return False
    ta, tb = read_adapters(a)[0], read_adapters(b)[0]
    return ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)


def print_run(name: str, run: dict) -> None:
    rounds = ", ".join(f"round {r}: {a}/{s} sites {sec:.1f}s (slowest site's training {t:.1f}s)"
                       for (r, a, s, sec), t in zip(run["rounds"], run["slowest_site_seconds"]))
    print(f"# {name}: exit {run['code']}; {rounds}; SuperLink RSS {run['superlink_first_mib']:.0f} MiB at start, "
          f"peak {run['superlink_peak_mib']:.0f} MiB; CPU seconds: SuperLink {run['superlink_cpu_s']:.1f}, "
          f"proxy {run['proxy_cpu_s']:.1f}")
    for attack, tally in run["tallies"].items():
        counts = ", ".join(f"{k} {n}" for k, n in sorted(tally.counts.items()))
        held = f"; connections held {max(tally.held_seconds):.0f}s at most" if tally.held_seconds else ""
        print(f"#   {attack}: {sum(tally.counts.values())} sent: {counts}{held}")
    if run["tallies"]:
        print(f"#   proxy log lines about refusals: {run['refusal_lines']}")
    summary = [line for line in run["log"].splitlines() if "nearl-server proxy: forwarded" in line]
    if summary:
        print(f"#   {summary[-1]}")


def compare(args: argparse.Namespace) -> int:
    from nearl_core.demo_data import generate_demo_data

    print("# the coordinator under a flood: 2 warm sites, demo config, quiet run then flooded run (loopback)")
    print(f"# machine: {machine()}; load average {load_average()}", flush=True)
    with tempfile.TemporaryDirectory(prefix="nearl-bench-flood-") as tmp:
        data = generate_demo_data(Path(tmp) / "data", 2, train_per_site=24, val_per_site=8, test_per_site=8)
        quiet = federation(Path(tmp) / "quiet", data, args.rounds, None)
        flooded = federation(Path(tmp) / "flooded", data, args.rounds, FloodPlan(seconds=args.seconds))
        equal = same_adapters(quiet["adapters"], flooded["adapters"])
    for name, run in (("quiet", quiet), ("flooded", flooded)):
        print_run(name, run)
    print(f"# final adapters identical: {equal}; load average now {load_average()}")
    med = {n: statistics.median(sec for *_, sec in r["rounds"]) for n, r in (("quiet", quiet), ("flooded", flooded))}
    result("flood_round_seconds", med["flooded"], med["quiet"], ROUND_FACTOR, unit="s")
    result("flood_superlink_peak_rss", flooded["superlink_peak_mib"], quiet["superlink_peak_mib"], MEMORY_BOUND,
           unit="MiB")
    return 0 if quiet["code"] == flooded["code"] == 0 and equal else 1


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--seconds", type=float, default=FloodPlan.seconds, help="the flood's length at most")
    p.add_argument("--big-body", type=int, default=None, metavar="MB",
                   help="instead: one body of MB megabytes at a coordinator without sites, limit on and off")
    args = p.parse_args(argv)
    exit_on_sigterm()
    if args.big_body is not None:
        from flood_big_body import big_body_demo

        return big_body_demo(args.big_body)
    return compare(args)


if __name__ == "__main__":
    sys.exit(main())
