"""``python bench/flood.py --big-body MB``: one oversized body at a coordinator, with its limit and without.

The issue's observation: one unauthenticated ``POST /v1/fleet/push-messages`` of 400 MB
of zeros passed the public port whole and the SuperLink grew by 390 MB before it
answered 400. Here a ``nearl-server`` (demo config, no sites) gets that body twice, once
declared by Content-Length and once chunked, first with the body limit it derives from
its config, then with ``--max-body-mb`` above the body (the limit out of the way, as
before). The SuperLink's resident memory is sampled before and during each request.
"""

from __future__ import annotations

import asyncio
import tempfile
import time
from pathlib import Path

from common import load_average, machine, process_rss_mib, result
from flood import BIG_SOURCE, BIN, HOST, Watch, child_pid, wait_for_text
from flood_attacks import Tally, big_body, loopback_only


def one_body(port: int, pid: int, size: int, chunked: bool) -> dict:
    """Send one body; the SuperLink's RSS before it and at its peak while it was handled (plus 3 s)."""
    before, sampler, tally = process_rss_mib(pid), Watch(pid), Tally()
    sampler.start()
    started = time.monotonic()
    status = asyncio.run(big_body((HOST, port), BIG_SOURCE, size, chunked, tally))
    seconds = time.monotonic() - started
    time.sleep(3)
    return {"status": status, "sent": tally.bytes_sent, "seconds": seconds, "before": before,
            "peak": max(sampler.stop(), before), "after": process_rss_mib(pid)}


def coordinator(work: Path, mb: int, extra: tuple[str, ...]) -> list[dict]:
    from nearl_protocol import processes as flower

    port, log = flower.free_port(), work / "server.log"
    server = flower.start_process(
        [str(BIN / "nearl-server"), "--host", HOST, "--port", str(port), "--insecure", "--rounds", "1",
         "--wait-timeout", "900", "--checkpoint-dir", str(work / "ck"), "--mlflow-uri",
         f"sqlite:///{work / 'mlflow.db'}", *extra],
        env=flower.flower_env(work / "home"), log_file=log, cwd=work)
    try:
        wait_for_text(log, "submitted", server, 600)
        pid = child_pid(server.pid, "flower-superlink")
        time.sleep(5)  # the SuperLink settles after the run's submission
        line = next(x for x in log.read_text().splitlines() if "the public port refuses" in x)
        print(f"# {line}")
        return [one_body(port, pid, mb * 10**6, chunked) for chunked in (False, True)]
    finally:
        flower.stop_process(server, timeout=30)


def big_body_demo(mb: int) -> int:
    loopback_only(HOST, BIG_SOURCE)
    print(f"# one {mb} MB body of zeros at POST /v1/fleet/push-messages, no authentication (loopback)")
    print(f"# machine: {machine()}; load average {load_average()}", flush=True)
    growth = {}
    with tempfile.TemporaryDirectory(prefix="nearl-bench-bigbody-") as tmp:
        for label, extra in (("limit", ()), ("no limit", ("--max-body-mb", str(2 * mb)))):
            work = Path(tmp) / label.replace(" ", "-")
            work.mkdir()
            rows = coordinator(work, mb, extra)
            for kind, row in zip(("Content-Length", "chunked"), rows):
                print(f"# {label}, {kind}: answer {row['status']} after {row['sent']:,} bytes sent in "
                      f"{row['seconds']:.1f}s; SuperLink RSS {row['before']:.0f} MiB before, peak {row['peak']:.0f}, "
                      f"{row['after']:.0f} after")
            growth[label] = max(r["peak"] - r["before"] for r in rows)
    result("big_body_superlink_growth", growth["limit"], growth["no limit"], None, unit="MiB")
    return 0
