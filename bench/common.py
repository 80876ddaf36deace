"""Shared helpers for the benchmark scripts: header, timing, memory, RESULT lines.

Every benchmark measures its baseline in the same run and reports a ratio; absolute
times on a shared CPU are noise, ratios measured side by side are not (much).

The last lines of every script are machine-readable::

    RESULT name=<metric> value=<v> baseline=<b> ratio=<r> target=<t> status=met|missed on=ratio|value better=lower|higher unit=<u>

``on`` says whether the target applies to the ratio (most metrics) or to the value
itself (absolute targets such as "aggregation < 0.5 s"); ``better`` gives the
direction; ``unit`` is the unit of value and baseline (``-`` when unitless).  A
comparison that has no target (bench/methods.py: each method against NEARL) writes
``target=- status=info``.
:func:`parse_result` reads such a line back (``bench/run_all.py`` does).
"""

from __future__ import annotations

import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parent.parent
RESULT_KEYS = ("name", "value", "baseline", "ratio", "target", "status", "on", "better", "unit")


def machine() -> str:
    """One line naming the machine (CPU model and cores); no torch import needed."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, {total_memory_gib():.0f} GiB RAM"


def load_average() -> str:
    """The 1/5/15-minute load averages: how busy the shared machine was around a measurement."""
    try:
        return " ".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:
        return "n/a"


def total_memory_gib() -> float:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return float("nan")


def header(title: str, device: str = "cpu") -> None:
    import torch

    gpu = f", GPU {torch.cuda.get_device_name(0)}" if device.startswith("cuda") else ""
    print(f"# {title}")
    print(f"# machine: {machine()}{gpu}; torch {torch.__version__}; device {device}; "
          f"threads {torch.get_num_threads()}; load average {load_average()}", flush=True)


def median_time(fn: Callable[[], object], *, repeats: int = 5, warmup: int = 1, sync: bool = False) -> float:
    """Median wall time of ``fn`` after ``warmup`` untimed calls."""
    return statistics.median(timed_pairs([fn], repeats=repeats, warmup=warmup, sync=sync)[0])


def timed_pairs(fns: list[Callable[[], object]], *, repeats: int = 5, warmup: int = 1, sync: bool = False,
                cpu: list[list[float]] | None = None) -> list[list[float]]:
    """Wall times of several functions called in turn (a, b, a, b, ...), after ``warmup`` rounds.

    Alternating means that every arm sees the same background load on a shared machine,
    which is what makes the ratio of their medians trustworthy.  When ``cpu`` is a list,
    it receives the matching process CPU times (less sensitive to other processes
    competing for the cores than wall time).
    """
    def once(fn) -> tuple[float, float]:
        if sync:
            import torch
            torch.cuda.synchronize()
        start, start_cpu = time.perf_counter(), time.process_time()
        fn()
        if sync:
            import torch
            torch.cuda.synchronize()
        return time.perf_counter() - start, time.process_time() - start_cpu

    for _ in range(warmup):
        for fn in fns:
            fn()
    times: list[list[float]] = [[] for _ in fns]
    cpu_times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            wall, used = once(fn)
            times[i].append(wall)
            cpu_times[i].append(used)
    if cpu is not None:
        cpu[:] = cpu_times
    return times


def current_rss_mib() -> float:
    """Resident memory of this process now (Linux); 0 where /proc is missing."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def peak_rss_mib() -> float:
    """Peak resident memory of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_child(script: Path, *args: str) -> dict:
    """Run a measurement in a fresh process (clean peak memory) and read its JSON line."""
    out = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True,
                         env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if out.returncode != 0:
        raise RuntimeError(f"{script.name} {' '.join(args)} failed (exit {out.returncode}):\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# -- RESULT lines -----------------------------------------------------------------------------------------
def format_result(name: str, value: float, baseline: float, target: float | None, *, lower_is_better: bool = True,
                  on: str = "ratio", unit: str = "") -> str:
    """The RESULT line for one metric (see the module docstring); ``on`` = "ratio" or "value";
    ``target`` None: a comparison without a target (``status=info``)."""
    if on not in ("ratio", "value"):
        raise ValueError(f"on must be 'ratio' or 'value', got {on!r}")
    if any(c.isspace() or c == "=" for c in name) or not name:
        raise ValueError(f"metric name {name!r} must be one word without '='")
    ratio = value / baseline if baseline else float("nan")
    checked = ratio if on == "ratio" else value
    if target is None:
        target_text, status = "-", "info"
    else:
        met = math.isfinite(checked) and (checked <= target if lower_is_better else checked >= target)
        target_text, status = f"{target:g}", "met" if met else "missed"
    return (f"RESULT name={name} value={value:.6g} baseline={baseline:.6g} ratio={ratio:.4g} "
            f"target={target_text} status={status} on={on} "
            f"better={'lower' if lower_is_better else 'higher'} unit={unit or '-'}")


def result(name: str, value: float, baseline: float, target: float | None, *, lower_is_better: bool = True,
           on: str = "ratio", unit: str = "") -> str:
    """Print (and return) the machine-readable RESULT line of one metric."""
    line = format_result(name, value, baseline, target, lower_is_better=lower_is_better, on=on, unit=unit)
    print(line, flush=True)
    return line


def parse_result(line: str) -> dict | None:
    """A RESULT line as a dict (numbers as floats), or None for any other line.

    Lines from before ``on``/``better``/``unit`` existed parse with the defaults
    (ratio target, lower is better, no unit).
    """
    line = line.strip()
    if not line.startswith("RESULT "):
        return None
    fields = {}
    for item in line.split()[1:]:
        key, sep, value = item.partition("=")
        if not sep:
            return None
        fields[key] = value
    if not {"name", "value", "baseline", "ratio", "target", "status"} <= set(fields):
        return None
    try:
        out = {"name": fields["name"], "status": fields["status"], "on": fields.get("on", "ratio"),
               "better": fields.get("better", "lower"), "unit": "" if fields.get("unit", "-") == "-" else fields["unit"]}
        for key in ("value", "baseline", "ratio", "target"):
            out[key] = math.nan if key == "target" and fields[key] == "-" else float(fields[key])
    except ValueError:
        return None
    return out


def exit_on_sigterm() -> None:
    """Turn SIGTERM (``timeout``, a CI runner) into SystemExit, so that ``finally`` blocks stop the
    processes a benchmark started instead of leaving them running."""
    import signal

    def stop(signum, frame):  # noqa: ARG001
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, stop)


def kill_tree(root: int) -> None:
    """SIGKILL ``root`` and everything :func:`tree_pids` finds under it (children first)."""
    import signal

    for pid in sorted(tree_pids(root), key=lambda p: p == root):
        try:
            os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


# -- memory of a process tree -------------------------------------------------------------------------------
def _proc_table() -> dict[int, tuple[int, int]]:
    """pid -> (parent pid, session id) for every process we can read."""
    table = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        rest = stat[stat.rfind(")") + 2:].split()
        try:
            table[int(entry.name)] = (int(rest[1]), int(rest[3]))
        except (IndexError, ValueError):
            continue
    return table


def tree_pids(root: int) -> list[int]:
    """``root``, its descendants and, when ``root`` leads its own session, every process of that
    session (children that were re-parented when their parent exited)."""
    table = _proc_table()
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    out, todo = {root}, [root]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in out:
                out.add(child)
                todo.append(child)
    session = table.get(root, (0, None))[1]
    if session == root:
        out.update(pid for pid, (_, sid) in table.items() if sid == session)
    return sorted(out)


def _rss_pss_kib(pid: int) -> tuple[int, int]:
    rss = pss = 0
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Rss:"):
                rss = int(line.split()[1])
            elif line.startswith("Pss:"):
                pss = int(line.split()[1])
    except (OSError, ValueError, IndexError):
        try:  # no smaps_rollup: RSS only
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    rss = pss = int(line.split()[1])
        except (OSError, ValueError, IndexError):
            pass
    return rss, pss


def process_rss_mib(pid: int) -> float:
    """Resident memory of one process now (0 when it is gone)."""
    return _rss_pss_kib(pid)[0] / 1024


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU time of one process so far (0 when it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return 0.0


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


class TreeMemorySampler:
    """Samples the summed RSS and PSS of a process tree in a background thread.

    RSS summed over processes counts shared pages (the torch libraries every Ray worker
    maps) once per process: it is the number the issue asks for and an upper bound.
    PSS splits shared pages between the processes that map them: it is what the tree
    really occupies.  Both peaks are kept, plus the most processes seen at once.
    """

    def __init__(self, root: int, interval: float = 0.5, count: str | None = None):
        self.root, self.interval, self.count = root, interval, count
        self.peak_rss_mib = self.peak_pss_mib = 0.0
        self.max_processes = 0
        self.max_counted = 0  # most processes at once whose command line contains ``count``
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self) -> "TreeMemorySampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def sample(self) -> None:
        pids = tree_pids(self.root)
        rss = pss = 0
        for pid in pids:
            r, p = _rss_pss_kib(pid)
            rss, pss = rss + r, pss + p
        self.peak_rss_mib = max(self.peak_rss_mib, rss / 1024)
        self.peak_pss_mib = max(self.peak_pss_mib, pss / 1024)
        self.max_processes = max(self.max_processes, len(pids))
        if self.count:
            self.max_counted = max(self.max_counted, sum(1 for pid in pids if self.count in _cmdline(pid)))
        self.samples += 1

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval)


# -- the configuration every model benchmark uses ------------------------------------------------------------
def bench_config(model: str = "ViT-B-16", mode: str = "per-image", classes: tuple[str, ...] = ("normal", "pneumonia")):
    """The shipped config for ``model`` (configs/vit-b16.yaml for ViT-B-16, else configs/demo.yaml with
    ``model.name`` replaced), random init (no download), the given text conditioning and classes.

    Benchmarks measure what a user runs: the shipped adapter sizes, templates and
    orthogonal-regulariser weight, not the dataclass defaults.
    """
    from nearl_core.config import load_config

    shipped = "vit-b16" if model == "ViT-B-16" else "demo"
    overrides = {"model.pretrained": "none", "adapter.text-conditioning": mode}
    if model != "ViT-B-16":
        overrides["model.name"] = model
    return load_config(shipped, overrides).with_classes(tuple(classes))
