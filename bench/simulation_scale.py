"""Bench f: peak memory and time of the simulation for growing numbers of virtual sites.

    python bench/simulation_scale.py                    # 4, 16 and 50 sites (+ the 1-worker run)
    python bench/simulation_scale.py --sites 4,8        # a quick run

Each run is ``python simulation/run.py --sites N --rounds 1 --local-epochs 1`` (demo
config: tiny CLIP, synthetic demo data generated in a fresh temp folder) in its own
session; a sampler thread sums the RSS (and PSS) of every process of that session
every ``--interval`` seconds: the launcher, the SuperLink, the ServerApp, Ray's
daemons and its worker processes.  Peak memory is the largest sum seen.

Ray runs ``cores / cpus-per-site`` worker actors whatever the number of sites (2 on a
2-core machine with the default 1 CPU per site), so memory should stay flat as sites
grow and move only with the worker count.  To price one worker, the smallest site
count is run once more with ``--cpus-per-site`` = cores (1 worker).  Reported:

* peak memory at the most sites / at the fewest (target <= 1.25: flat in sites);
* MiB per extra site (slope between the fewest and the most sites) / MiB per extra
  Ray worker (2 workers - 1 worker at the fewest sites) (target <= 0.05);
* federation time at the most sites / at the fewest (target <= the ratio of site
  counts: no worse than linear in sites).

Times are the federation's own wall time as the launcher prints it, without the data
generation and the after-run evaluation that simulation/run.py also does.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import ROOT, TreeMemorySampler, exit_on_sigterm, kill_tree, load_average, machine, result

FEDERATION_LINE = re.compile(r"simulation wall time ([\d.]+)s \(federation ([\d.]+)s\)")


def run_one(sites: int, cpus_per_site: float, interval: float, keep: Path | None = None) -> dict:
    """One simulation run in a fresh folder, sampled; returns its numbers."""
    with tempfile.TemporaryDirectory(prefix=f"nearl-bench-sim{sites}-") as tmp_s:
        tmp = Path(keep or tmp_s)
        tmp.mkdir(parents=True, exist_ok=True)
        log = tmp / "run.log"
        cmd = [sys.executable, str(ROOT / "simulation" / "run.py"), "--sites", str(sites), "--rounds", "1",
               "--local-epochs", "1", "--out", str(tmp / "out"), "--cpus-per-site", f"{cpus_per_site:g}",
               "--mlflow-uri", f"sqlite:///{tmp / 'mlflow.db'}"]
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "RAY_USAGE_STATS_ENABLED": "0", "FLWR_TELEMETRY_ENABLED": "0"}
        start = time.perf_counter()
        with open(log, "w") as fh:
            proc = subprocess.Popen(cmd, cwd=tmp, env=env, stdout=fh, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True)
            try:
                with TreeMemorySampler(proc.pid, interval=interval, count="ClientAppActor") as sampler:
                    code = proc.wait(timeout=1800)
            except BaseException:  # timeout, Ctrl-C, SIGTERM: leave nothing running
                kill_tree(proc.pid)
                proc.wait()
                raise
        wall = time.perf_counter() - start
        text = log.read_text(errors="replace")
        if code != 0:
            raise RuntimeError(f"simulation with {sites} sites failed (exit {code}):\n{text[-3000:]}")
        m = FEDERATION_LINE.search(text)
        answered = re.findall(r"^\s+1\s+(\d+)\s", text, flags=re.M)
        return {"sites": sites, "cpus_per_site": cpus_per_site, "wall": wall,
                "federation": float(m.group(2)) if m else float("nan"),
                "rss": sampler.peak_rss_mib, "pss": sampler.peak_pss_mib, "processes": sampler.max_processes,
                "workers": sampler.max_counted, "samples": sampler.samples,
                "answered": int(answered[0]) if answered else -1}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sites", default="4,16,50", help="comma-separated site counts (default 4,16,50)")
    ap.add_argument("--no-worker-run", action="store_true", help="skip the 1-worker run (no per-worker slope)")
    ap.add_argument("--interval", type=float, default=0.5, help="memory sampling interval in seconds")
    args = ap.parse_args(argv)
    exit_on_sigterm()
    counts = sorted({int(s) for s in args.sites.split(",") if s.strip()})
    if len(counts) < 2 or counts[0] < 1:
        ap.error("--sites needs at least two positive site counts")
    cores = os.cpu_count() or 1
    print(f"# simulation scale: simulation/run.py --rounds 1 --local-epochs 1, demo config (nearl-tiny), "
          f"sites {', '.join(map(str, counts))}")
    print(f"# machine: {machine()}; device cpu; load average {load_average()}; Ray workers = cores / cpus-per-site")

    runs = []
    for n in counts:
        runs.append(run_one(n, 1.0, args.interval))
        print(f"  ran {n} sites: federation {runs[-1]['federation']:.1f}s, peak RSS {runs[-1]['rss']:.0f} MiB",
              flush=True)
    one_worker = None
    if not args.no_worker_run and cores > 1:
        one_worker = run_one(counts[0], float(cores), args.interval)
        print(f"  ran {counts[0]} sites with 1 worker: peak RSS {one_worker['rss']:.0f} MiB", flush=True)

    print(f"\n{'sites':>5}  {'cpus/site':>9}  {'Ray actors':>11}  {'processes':>9}  {'peak RSS (MiB)':>14}  "
          f"{'peak PSS (MiB)':>14}  {'federation (s)':>14}  {'total (s)':>9}  answered")
    for r in runs + ([one_worker] if one_worker else []):
        print(f"{r['sites']:>5}  {r['cpus_per_site']:>9g}  {r['workers']:>11}  {r['processes']:>9}  {r['rss']:>14.0f}  "
              f"{r['pss']:>14.0f}  {r['federation']:>14.1f}  {r['wall']:>9.1f}  {r['answered']}")
    lo, hi = runs[0], runs[-1]
    per_site = (hi["rss"] - lo["rss"]) / (hi["sites"] - lo["sites"])
    print(f"\nMiB per extra site (RSS, {lo['sites']} -> {hi['sites']} sites): {per_site:.1f}; "
          f"PSS: {(hi['pss'] - lo['pss']) / (hi['sites'] - lo['sites']):.1f}")
    if one_worker:
        extra_workers = max(lo["workers"] - one_worker["workers"], 1)
        per_worker = (lo["rss"] - one_worker["rss"]) / extra_workers
        print(f"MiB per extra Ray worker (RSS, {one_worker['workers']} -> {lo['workers']} workers at {lo['sites']} "
              f"sites): {per_worker:.0f}; PSS: {(lo['pss'] - one_worker['pss']) / extra_workers:.0f}")
    result(f"simulation_memory_{hi['sites']}_vs_{lo['sites']}_sites", hi["rss"], lo["rss"], 1.25, unit="MiB")
    if one_worker:
        result("simulation_mib_per_site_vs_per_worker", per_site, per_worker, 0.05, unit="MiB")
    result(f"simulation_time_{hi['sites']}_vs_{lo['sites']}_sites", hi["federation"], lo["federation"],
           hi["sites"] / lo["sites"], unit="s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
