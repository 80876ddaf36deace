"""Which federation settings pay under label skew: the measured table behind the defaults.

    python bench/federation_quality.py                       # every row on the demo split, Dirichlet 0.3 and iid
    python bench/federation_quality.py --splits 0.5 --rows baseline,logit-adjusted

Each row is one ``simulation/run.py`` command (printed beside its result, so any row can
be rerun alone) on the shipped demo data, with the same seed and the same total local
epochs (rounds x local epochs = 10).  The result is the federated model's mean accuracy
and mean balanced accuracy over the sites' own test splits (results.csv, arm
``federated``; rows with ``--compare`` add the centralized, local-only and personalized
arms).  Rows already in ``--out``/quality.csv are not run again, so an
interrupted sweep resumes.  docs/federation.md ("Choosing the defaults") holds the table.
"""

from __future__ import annotations

import argparse
import csv
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# name -> flags added to `python simulation/run.py --alpha A --seed 0`
ROWS: dict[str, list[str]] = {
    "baseline": [],
    "baseline-seed1": ["--set", "train.seed=1"],  # the same split, another training seed: the noise floor
    "baseline-seed2": ["--set", "train.seed=2"],
    "schedule-federation": ["--set", "train.schedule=federation"],
    "logit-adjusted": ["--set", "train.loss=logit-adjusted"],
    "balanced-loss": ["--set", "train.loss=balanced"],
    "fedprox-0.01": ["--strategy", "fedprox", "--set", "proximal-mu=0.01"],
    "fedprox-0.1": ["--strategy", "fedprox", "--set", "proximal-mu=0.1"],
    "fedavgm-0.5": ["--strategy", "fedavgm", "--set", "server-momentum=0.5"],
    "fedadam-0.01": ["--strategy", "fedadam", "--set", "server-lr=0.01"],
    "fedadam-0.03": ["--strategy", "fedadam", "--set", "server-lr=0.03"],
    "fedyogi-0.01": ["--strategy", "fedyogi", "--set", "server-lr=0.01"],
    "keep-optimizer": ["--set", "train.keep-optimizer=true"],
    "site-lr-0.01": ["--set", "train.lr=0.01"],  # the sites' (and, with --compare, every arm's) learning rate
    "rounds-10x1": ["--rounds", "10", "--local-epochs", "1"],
    "rounds-2x5": ["--rounds", "2", "--local-epochs", "5"],
    "la+schedule": ["--set", "train.loss=logit-adjusted", "--set", "train.schedule=federation"],
    # personalization (docs/federation.md, "Personalization"): with every arm, for local-only beside it
    "finetune-1": ["--finetune-epochs", "1", "--compare"],
    "finetune-2": ["--finetune-epochs", "2", "--compare"],
    "local-oca-text+gates": ["--personalize", "oca-text,gates", "--compare"],
    "local-oca-text+gates+finetune-1": ["--personalize", "oca-text,gates", "--finetune-epochs", "1", "--compare"],
    "local-all-but-useformer": ["--personalize", "all-but-useformer", "--compare"],
    "local-all-but-useformer+finetune-1": ["--personalize", "all-but-useformer", "--finetune-epochs", "1",
                                           "--compare"],
}
ARMS = ("federated", "centralized", "local-only", "personalized")
FIELDS = ["split", "row", *(f"{arm}_{m}" for arm in ARMS for m in ("accuracy", "balanced_accuracy")), "seconds",
          "command"]


def command(split: str, row: str, out: Path) -> list[str]:
    return [sys.executable, "simulation/run.py", "--alpha", split, "--seed", "0", *ROWS[row], "--out", str(out)]


def arm_means(results: Path) -> dict[str, str]:
    """``<arm>_accuracy`` / ``<arm>_balanced_accuracy`` of every arm the run has (mean over sites)."""
    out = {}
    with open(results) as fh:
        for r in csv.DictReader(fh):
            if r["arm"] in ARMS and r["site"] == "mean":
                out.update({f"{r['arm']}_accuracy": r["accuracy"], f"{r['arm']}_balanced_accuracy": r["balanced_accuracy"]})
    if "federated_accuracy" not in out:
        raise RuntimeError(f"{results}: no federated mean row")
    return out


def markdown(table: Path) -> str:
    """quality.csv as the table in docs/federation.md: accuracy / balanced accuracy per arm."""
    with open(table) as fh:
        rows = list(csv.DictReader(fh))
    splits = list(dict.fromkeys(r["split"] for r in rows))
    order = list(ROWS)
    rows.sort(key=lambda r: (splits.index(r["split"]), order.index(r["row"]) if r["row"] in order else len(order)))
    cell = lambda r, arm: (f"{float(r[arm + '_accuracy']):.3f} / {float(r[arm + '_balanced_accuracy']):.3f}"  # noqa: E731
                           if r.get(arm + "_accuracy") else "")
    lines = ["| split | row | " + " | ".join(ARMS) + " | command |", "|---|---|" + "---|" * (len(ARMS) + 1)]
    lines += [f"| {r['split']} | {r['row']} | " + " | ".join(cell(r, a) for a in ARMS) + f" | `{r['command']}` |"
              for r in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--splits", default="0.5,0.3,iid", help="Dirichlet alphas or iid (default 0.5,0.3,iid)")
    p.add_argument("--rows", default=",".join(ROWS), help="which rows (default all)")
    p.add_argument("--out", type=Path, default=Path("runs/federation-quality"))
    p.add_argument("--markdown", action="store_true", help="print the table in --out as markdown and exit")
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    table = args.out / "quality.csv"
    if args.markdown:
        print(markdown(table))
        return 0
    done = set()
    if table.exists():
        with open(table) as fh:
            done = {(r["split"], r["row"]) for r in csv.DictReader(fh)}
    rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    unknown = [r for r in rows if r not in ROWS]
    if unknown:
        p.error(f"unknown rows {unknown}; known: {', '.join(ROWS)}")
    for split in [s.strip() for s in args.splits.split(",")]:
        for row in rows:
            if (split, row) in done:
                continue
            run_dir = args.out / f"{split}-{row}"
            cmd = command(split, row, run_dir)
            start = time.perf_counter()
            proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
            (args.out / f"{split}-{row}.log").write_text(proc.stdout + proc.stderr)
            if proc.returncode != 0:
                print(f"{split} {row}: failed (exit {proc.returncode}); see {args.out}/{split}-{row}.log", flush=True)
                continue
            means = arm_means(run_dir / "results.csv")
            shown = "python " + shlex.join(cmd[1:-2])
            record = {"split": split, "row": row, **{f: means.get(f, "") for f in FIELDS[2:-2]},
                      "seconds": f"{time.perf_counter() - start:.0f}", "command": shown}
            new = not table.exists()
            with open(table, "a", newline="") as fh:
                writer = csv.DictWriter(fh, fieldnames=FIELDS)
                if new:
                    writer.writeheader()
                writer.writerow(record)
            shown_means = " ".join(f"{k}={v}" for k, v in means.items())
            print(f"RESULT split={split} row={row} {shown_means} status=info  # {shown}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
