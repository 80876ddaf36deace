"""Shared helpers for the benchmark scripts: header, timing, RESULT lines.

Every benchmark measures its baseline in the same run and reports a ratio; absolute
times on a shared CPU are noise, ratios measured side by side are not (much).
"""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import torch

ROOT = Path(__file__).resolve().parent.parent


def header(title: str, device: str = "cpu") -> None:
    cpu = platform.processor() or platform.machine()
    gpu = f", GPU {torch.cuda.get_device_name(0)}" if device.startswith("cuda") else ""
    print(f"# {title}")
    print(f"# machine: {platform.node()} {cpu}, {os.cpu_count()} cores{gpu}; torch {torch.__version__}; "
          f"device {device}; threads {torch.get_num_threads()}")


def median_time(fn: Callable[[], object], *, repeats: int = 5, warmup: int = 1, sync: bool = False) -> float:
    """Median wall time of ``fn`` after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if sync:
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if sync:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def peak_rss_mib() -> float:
    """Peak resident memory of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_child(script: Path, *args: str) -> dict:
    """Run a measurement in a fresh process (clean peak memory) and read its JSON line."""
    out = subprocess.run([sys.executable, str(script), *args], check=True, capture_output=True, text=True,
                         env={**os.environ, "HF_HUB_OFFLINE": "1"})
    return json.loads(out.stdout.strip().splitlines()[-1])


def result(name: str, value: float, baseline: float, target: float, *, lower_is_better: bool = True) -> str:
    """The machine-readable last line(s) every benchmark prints."""
    ratio = value / baseline if baseline else float("nan")
    met = ratio <= target if lower_is_better else ratio >= target
    line = (f"RESULT name={name} value={value:.6g} baseline={baseline:.6g} ratio={ratio:.4g} "
            f"target={target:g} status={'met' if met else 'missed'}")
    print(line)
    return line
