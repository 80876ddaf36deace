"""The utility cost of sample-level DP: the same simulation at several epsilons and without DP.

    python simulation/privacy_sweep.py                       # epsilon 1, 3, 8 and no DP, default demo run
    python simulation/privacy_sweep.py --epsilons 3 --sites 4 --rounds 5 --out runs/sweep

Every arm uses the same partition, seed, rounds and local epochs (the simulation
defaults unless given); only ``--dp-epsilon`` changes.  Prints a markdown table of the
federated model's test metrics (mean over sites) with each arm's largest site epsilon.
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from nearl_protocol.keys import MLFLOW_EPSILON_MAX  # noqa: E402
from server.events import RoundEvent, read_all, select  # noqa: E402
from simulation import run as simulation  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="simulation/privacy_sweep.py", description=__doc__.splitlines()[0])
    p.add_argument("--epsilons", default="1,3,8", help="comma-separated target epsilons (default 1,3,8)")
    p.add_argument("--out", type=Path, default=Path("runs/privacy-sweep"), help="one sub-folder per arm")
    p.add_argument("--sites", type=int, default=4)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--local-epochs", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    return p


def arm_result(out: Path) -> dict[str, float]:
    """Federated test metrics (mean row) and the largest site epsilon of one finished arm."""
    with open(out / "results.csv", newline="") as fh:
        mean = next(r for r in csv.DictReader(fh) if r["arm"] == "federated" and r["site"] == "mean")
    rounds = select(read_all(out / "flower" / "progress.jsonl"), RoundEvent)
    eps = [v for v in (r.train.get(MLFLOW_EPSILON_MAX) for r in rounds) if v is not None]
    return {**{k: float(mean[k]) for k in ("accuracy", "balanced_accuracy", "macro_f1", "auroc")},
            "epsilon": max(eps) if eps else float("nan")}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    arms: list[tuple[str, float | None]] = [(f"epsilon {e:g}", e) for e in map(float, args.epsilons.split(","))]
    arms.append(("no DP", None))
    rows = []
    for label, eps in arms:
        out = args.out / (label.replace(" ", "-"))
        if not (out / "results.csv").exists():
            argv_arm = ["--sites", str(args.sites), "--rounds", str(args.rounds), "--local-epochs",
                        str(args.local_epochs), "--seed", str(args.seed), "--out", str(out)]
            if eps is not None:
                argv_arm += ["--dp-epsilon", str(eps)]
            if simulation.main(argv_arm) != 0:
                return 1
        rows.append((label, arm_result(out)))
    lines = ["| arm | max site epsilon (delta min(1e-5, 1/(10 N))) | accuracy | balanced accuracy | macro F1 | AUROC |",
             "|---|---|---|---|---|---|"]
    for label, r in rows:
        eps = "-" if r["epsilon"] != r["epsilon"] else f"{r['epsilon']:.2f}"
        lines.append(f"| {label} | {eps} | {r['accuracy']:.3f} | {r['balanced_accuracy']:.3f} | "
                     f"{r['macro_f1']:.3f} | {r['auroc']:.3f} |")
    table = "\n".join(lines)
    (args.out / "privacy-utility.md").write_text(table + "\n")
    print("\n" + table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
