"""Run every benchmark and rewrite docs/benchmarks.md from their RESULT lines.

    python bench/run_all.py                      # everything, full size (ViT-B-16 on the CPU: about 25 minutes)
    python bench/run_all.py --quick              # fewer repeats, 3 rounds, 4 and 8 virtual sites
    python bench/run_all.py --only aggregation,payload
    python bench/run_all.py --from-logs runs/bench-20260101-120000   # rebuild the page from saved logs

Scripts run one after the other (never two heavy ones at once), each in its own
process; its full output is kept in ``runs/bench-<time>/<script>.log``.  A script that
fails is reported as failed in the table; the others still run.  The page shows ratios;
CPU times themselves are left out (they only mean something for a named GPU), except
where the target itself is a time (aggregation, federation overhead).  The analysis
in ``bench/FINDINGS.md`` (profiles, reasons, proposed changes) is included as is.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from common import ROOT, machine, parse_result

BENCH = Path(__file__).resolve().parent
DOC = ROOT / "docs" / "benchmarks.md"
FINDINGS = BENCH / "FINDINGS.md"


@dataclass(frozen=True)
class Script:
    name: str
    what: str  # the item
    args: tuple[str, ...] = ()
    quick: tuple[str, ...] = ()
    timeout: float = 3600.0
    label: str = ""  # names the log and --only when one script runs twice with other arguments

    @property
    def key(self) -> str:
        return self.label or self.name


SCRIPTS = (
    Script("payload", "a. parameters and payload"),
    Script("train_step", "b. local train step", (), ("--repeats", "2")),
    Script("train_step", "b. memory option: checkpointed frozen blocks", ("--checkpoint-backbone",),
           ("--checkpoint-backbone", "--repeats", "2"), label="train_step_checkpoint"),
    Script("train_step", "b. memory option: gradient accumulation", ("--micro-batch", "2"),
           ("--micro-batch", "2", "--repeats", "2"), label="train_step_micro2"),
    Script("inference", "c. inference", (), ("--repeats", "2")),
    Script("aggregation", "d. server aggregation", (), ("--repeats", "2")),
    Script("federation_overhead", "e. federation overhead", ("--simulation",), ("--rounds", "3")),
    Script("simulation_scale", "f. simulation scale", (), ("--sites", "4,8", "--no-worker-run")),
    Script("dp_overhead", "DP-SGD overhead (privacy issue)", (), ("--repeats", "2")),
    Script("import_time", "ClientApp import time (issue 16)", (), ("--repeats", "3")),
    Script("methods", "methods against NEARL (issue 17)", (), ("--repeats", "1")),
)


@dataclass
class Outcome:
    script: Script
    command: str
    code: int
    seconds: float
    output: str
    results: list[dict] = field(default_factory=list)
    commit: str = ""  # the commit the script ran at (from its log), "" when the log does not say

    @property
    def header(self) -> list[str]:
        return [line[2:].strip() for line in self.output.splitlines() if line.startswith("# machine:")]

    @property
    def device(self) -> str:
        for line in self.header:
            m = re.search(r"device (\S+?)[;,]", line + ";")
            if m:
                return m.group(1)
        return "cpu"


def command_of(script: Script, quick: bool) -> list[str]:
    return ["python", f"bench/{script.name}.py", *(script.quick if quick else script.args)]


def parse_output(script: Script, command: str, code: int, seconds: float, output: str, commit: str = "") -> Outcome:
    results = [r for r in (parse_result(line) for line in output.splitlines()) if r is not None]
    return Outcome(script, command, code, seconds, output, results, commit)


def run_script(script: Script, quick: bool, logdir: Path) -> Outcome:
    cmd = command_of(script, quick)
    print(f"== {' '.join(cmd)}", flush=True)
    start = time.perf_counter()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    try:
        proc = subprocess.run([sys.executable, *cmd[1:]], cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=script.timeout)
        code, output = proc.returncode, proc.stdout + (f"\n[stderr]\n{proc.stderr}" if proc.stderr.strip() else "")
    except subprocess.TimeoutExpired as err:
        code = 124
        output = (err.stdout or b"").decode(errors="replace") if isinstance(err.stdout, bytes) else (err.stdout or "")
        output += f"\n[timed out after {script.timeout:.0f}s]"
    seconds = time.perf_counter() - start
    commit = git_commit()
    (logdir / f"{script.key}.log").write_text(f"$ {' '.join(cmd)}\n# exit {code}, {seconds:.0f}s, commit {commit}\n"
                                              f"{output}")
    outcome = parse_output(script, " ".join(cmd), code, seconds, output, commit)
    for r in outcome.results:
        print(f"   {r['name']}: ratio {r['ratio']:.4g} ({r['status']})", flush=True)
    if code != 0:
        print(f"   FAILED (exit {code}); log: {logdir / (script.key + '.log')}", flush=True)
    return outcome


def read_log(script: Script, logdir: Path) -> Outcome | None:
    path = logdir / f"{script.key}.log"
    if not path.exists():
        return None
    text = path.read_text(errors="replace")
    lines = text.splitlines()
    command = lines[0][2:] if lines and lines[0].startswith("$ ") else " ".join(command_of(script, False))
    m = re.match(r"# exit (-?\d+), (\d+)s(?:, commit (\S+))?", lines[1]) if len(lines) > 1 else None
    code, seconds = (int(m.group(1)), float(m.group(2))) if m else (0, math.nan)
    return parse_output(script, command, code, seconds, "\n".join(lines[2:]), (m.group(3) or "") if m else "")


# -- the page ------------------------------------------------------------------------------------------------
def fmt_number(value: float, unit: str) -> str:
    if not math.isfinite(value):
        return "n/a"
    if unit == "B":
        return f"{value / 1e6:,.2f} MB"
    if unit == "MiB":
        return f"{value:,.0f} MiB"
    if unit == "params":
        return f"{value / 1e6:,.2f} M"
    if unit == "s":
        return f"{value:.2f} s" if value >= 0.1 else f"{value * 1000:.0f} ms"
    return f"{value:.4g}{' ' + unit if unit else ''}"


def fmt_value(r: dict, key: str, device: str) -> str:
    """A value or baseline cell: CPU times and throughputs are left out when the target is a ratio."""
    timed = r["unit"] in ("s", "img/s")
    if timed and r["on"] == "ratio" and not device.startswith("cuda"):
        return "-"
    return fmt_number(r[key], r["unit"])


def fmt_target(r: dict) -> str:
    if r["status"] == "info":
        return "-"
    op = "<=" if r["better"] == "lower" else ">="
    if r["on"] == "value":
        return f"value {op} {fmt_number(r['target'], r['unit'])}"
    return f"ratio {op} {r['target']:.4g}"


def table(outcomes: list[Outcome]) -> list[str]:
    rows = ["| metric | value | baseline | ratio | target | status | command |",
            "|---|---|---|---|---|---|---|"]
    for o in outcomes:
        if not o.results:
            rows.append(f"| `{o.script.key}` | - | - | - | - | **failed** (exit {o.code}) | `{o.command}` |")
            continue
        for r in o.results:
            status = {"met": "met", "info": "comparison"}.get(r["status"], "**missed**")
            rows.append(f"| `{r['name']}` | {fmt_value(r, 'value', o.device)} | {fmt_value(r, 'baseline', o.device)} | "
                        f"{r['ratio']:.4g} | {fmt_target(r)} | {status} | `{o.command}` |")
    return rows


def render(outcomes: list[Outcome], *, quick: bool, when: str, commits: list[str], findings: str | None) -> str:
    results = [(o, r) for o in outcomes for r in o.results]
    met = [r["name"] for _, r in results if r["status"] == "met"]
    missed = [r["name"] for _, r in results if r["status"] not in ("met", "info")]
    failed = [o for o in outcomes if o.code != 0 or not o.results]
    headers = sorted({h for o in outcomes for h in o.header})
    gpu = [(o, h) for o in outcomes for h in o.header if o.device.startswith("cuda")]
    lines = [
        "# Benchmarks",
        "",
        "<!-- generated by bench/run_all.py: edit bench/run_all.py or bench/FINDINGS.md, not this file -->",
        "",
        f"Generated by `python bench/run_all.py{' --quick' if quick else ''}` on {when}, "
        f"commit{'s' if len(commits) > 1 else ''} {', '.join(f'`{c}`' for c in commits)}. "
        "Every number is a ratio measured side by side in one run of one script (median of repeats; "
        "alternating arms where the script can). Full-size architectures (ViT-B-16, random init) run on the "
        "CPU in fp32; the federation and simulation benchmarks use the tiny demo CLIP.",
        "",
        "Machine:",
        "",
        *[f"    {h}" for h in (headers or [f"machine: {machine()}"])],
        "",
        "The machine is shared: the header lines give the load average when each script started. "
        "Absolute CPU times are left out of the table (`-`) because they say nothing about any other "
        "machine; the two targets that are absolute times (aggregation, federation overhead) show them.",
        "",
        "## Results",
        "",
        *table(outcomes),
        "",
        "## Targets met and missed",
        "",
        f"- met ({len(met)}): " + (", ".join(f"`{n}`" for n in met) or "none"),
        f"- missed ({len(missed)}): " + (", ".join(f"`{n}`" for n in missed) or "none"),
    ]
    if failed:
        lines.append("- failed to run: " + ", ".join(f"`{o.script.key}` (exit {o.code})" for o in failed))
    lines += ["", "Why, per metric, with the profiles behind it: see *Findings* below.", ""]
    lines += ["## GPU", ""]
    if gpu:
        lines += ["Measured on:", ""] + [f"    {h}" for _, h in gpu] + [""]
    else:
        lines += ["**No GPU was available for this run**: every number above was measured on the CPU. "
                  "Bench b (train step) and c (inference) have not been run on an NVIDIA GPU with bf16 yet. "
                  "Both scripts default to `--device auto`, which picks CUDA with bf16 autocast when a GPU "
                  "is present (as training does), so `python bench/run_all.py` "
                  "on a GPU machine fills this section with the card's name and its numbers.", ""]
    if findings:
        lines += ["## Findings", "", findings.strip(), ""]
    lines += ["## Reproduce", "", "```", "python bench/run_all.py            # full", "python bench/run_all.py --quick    # fewer repeats",
              *[" ".join(command_of(s, False)) for s in SCRIPTS], "```", ""]
    return "\n".join(lines)


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                             timeout=30)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer repeats, fewer rounds and sites")
    ap.add_argument("--only", default="", help="comma list of scripts to run (default: all)")
    ap.add_argument("--from-logs", type=Path, default=None, metavar="DIR",
                    help="do not run anything: rebuild the page from the logs a previous run kept in DIR")
    ap.add_argument("--out", type=Path, default=DOC, help="page to write (default docs/benchmarks.md)")
    ap.add_argument("--logdir", type=Path, default=None, help="where to keep the logs (default runs/bench-<time>)")
    args = ap.parse_args(argv)
    chosen = [s for s in SCRIPTS if not args.only or s.key in args.only.split(",")]
    unknown = set(filter(None, args.only.split(","))) - {s.key for s in SCRIPTS}
    if unknown:
        ap.error(f"unknown script(s) {sorted(unknown)}; choose from {', '.join(s.key for s in SCRIPTS)}")
    if args.from_logs:
        outcomes = [o for s in chosen if (o := read_log(s, args.from_logs)) is not None]
        if not outcomes:
            ap.error(f"no <script>.log files in {args.from_logs}")
        quick = any(o.command != " ".join(command_of(o.script, False)) for o in outcomes)
        stamp = time.strftime("%Y-%m-%d", time.localtime(max((args.from_logs / f"{o.script.key}.log").stat().st_mtime
                                                              for o in outcomes)))
    else:
        logdir = args.logdir or ROOT / "runs" / time.strftime("bench-%Y%m%d-%H%M%S")
        logdir.mkdir(parents=True, exist_ok=True)
        outcomes = [run_script(s, args.quick, logdir) for s in chosen]
        quick, stamp = args.quick, time.strftime("%Y-%m-%d")
        print(f"logs in {logdir}")
    findings = FINDINGS.read_text() if FINDINGS.exists() else None
    commits = sorted({o.commit or "unknown" for o in outcomes})  # a page rebuilt from logs names their commits
    page = render(outcomes, quick=quick, when=stamp, commits=commits, findings=findings)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(page)
    print(f"wrote {args.out}")
    return 0 if all(o.code == 0 and o.results for o in outcomes) else 1


if __name__ == "__main__":
    sys.exit(main())
