"""Bench: how long a fresh ClientApp process takes to import ``client.app`` vs importing Flower.

    python bench/import_time.py                    # this checkout, 5 alternating repeats
    python bench/import_time.py --root /tmp/old    # another checkout of the project (e.g. an older commit)

In deployment every train and evaluate message starts a new ``flwr-clientapp`` process
that imports ``client.app`` before it can run anything, so this import is paid per
message and per site.  Each repeat starts ``python -c "import client.app"`` and
``python -c "import flwr"`` (the floor any Flower ClientApp pays) in turn, as fresh
processes with the same interpreter, and takes their wall times (interpreter start
included in both); the RESULT is the ratio of the medians.  ``python -c "import torch"``
is timed in the same rotation and printed beside them: a ClientApp that trains cannot
import less than torch, so it is the floor under the ratio.  One extra
``python -X importtime`` run lists the largest imports under ``client.app`` and which
heavy packages were imported at all.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from common import ROOT, load_average, machine, result

HEAVY = ("torch", "torchvision", "torch._dynamo", "open_clip", "transformers", "timm", "sklearn", "opacus",
         "pydicom", "flwr")


def run_python(root: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(root), "HF_HUB_OFFLINE": "1", "FLWR_TELEMETRY_ENABLED": "0"}
    out = subprocess.run([sys.executable, *args], cwd=root, env=env, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"python {' '.join(args)} failed in {root}:\n{out.stderr[-2000:]}")
    return out


def wall(root: Path, code: str) -> float:
    start = time.perf_counter()
    run_python(root, "-c", code)
    return time.perf_counter() - start


def import_profile(root: Path, top: int) -> tuple[list[tuple[float, str]], list[str]]:
    """(cumulative seconds, module) of the largest imports, and the heavy packages imported."""
    probe = f"import sys, client.app; print(','.join(m for m in {HEAVY!r} if m in sys.modules))"
    out = run_python(root, "-X", "importtime", "-c", probe)
    rows = []
    for line in out.stderr.splitlines():
        if not line.startswith("import time:") or "cumulative" in line:
            continue
        _, cumulative, name = (part.strip() for part in line[len("import time:"):].split("|"))
        rows.append((int(cumulative) / 1e6, name))
    return sorted(rows, reverse=True)[:top], [m for m in out.stdout.strip().split(",") if m]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", type=Path, default=ROOT, help="project checkout to measure (default: this one)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--top", type=int, default=12, help="largest imports to list")
    args = ap.parse_args()
    root = args.root.resolve()
    print(f"# ClientApp import time: {root}, {args.repeats} alternating repeats after 1 warm-up, median")
    print(f"# machine: {machine()}; python {sys.version.split()[0]}; device cpu; load average {load_average()}",
          flush=True)
    wall(root, "import client.app"), wall(root, "import flwr"), wall(root, "import torch")  # warm the page cache
    app, flwr, torch = [], [], []
    for _ in range(args.repeats):
        app.append(wall(root, "import client.app"))
        flwr.append(wall(root, "import flwr"))
        torch.append(wall(root, "import torch"))
    print(f"python -c 'import client.app': {' '.join(f'{t:.2f}' for t in app)} s")
    print(f"python -c 'import flwr':       {' '.join(f'{t:.2f}' for t in flwr)} s")
    print(f"python -c 'import torch':      {' '.join(f'{t:.2f}' for t in torch)} s "
          f"(floor: torch / flwr = {statistics.median(torch) / statistics.median(flwr):.2f})")
    rows, heavy = import_profile(root, args.top)
    print(f"# heavy packages imported by client.app: {', '.join(heavy) or 'none'}")
    print("# largest imports (cumulative, python -X importtime, one run):")
    for seconds, name in rows:
        print(f"#   {seconds:7.3f} s  {name}")
    result("clientapp_import_seconds", statistics.median(app), statistics.median(flwr), 3.0, unit="s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
