"""Local simulation: many virtual hospitals on one machine, with the baselines to compare.

    python simulation/run.py                       # embedded default: 4 sites, Dirichlet 0.5, tiny CLIP
    python simulation/run.py --sites 50 --rounds 2
    python simulation/run.py --compare             # + centralized and local-only arms, results.md, curves.png
    python simulation/run.py --dp-epsilon 3        # every site under DP-SGD, epsilon 3 over the whole run
    python simulation/run.py --methods nearl,coop,clip-adapter,lora,linear-probe [--compare]
                                                   # the same federation once per method: methods.csv/.md/.png
    python simulation/run.py --data pneumoniamnist.npz --config vit-b16 --pretrained /models/vit-b16.bin

The federation runs the project's own ServerApp and ClientApp on Flower's Simulation
Engine; each virtual site is a ``manifest.csv`` over the pooled images, read by the same
code as a real hospital's folder.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

for _key, _value in {"FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1", "RAY_USAGE_STATS_ENABLED": "0",
                     "MLFLOW_DISABLE_TELEMETRY": "true", "HF_HUB_DISABLE_TELEMETRY": "1"}.items():
    os.environ.setdefault(_key, _value)

if __package__ in (None, ""):  # `python simulation/run.py`: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dataclasses import replace  # noqa: E402

from nearl_core import flags  # noqa: E402
from nearl_core.config import NearlConfig, load_config, write_config  # noqa: E402
from nearl_core.data import scan_site  # noqa: E402
from nearl_core.demo_data import generate_demo_data  # noqa: E402
from nearl_core.site_check import classes_of_data  # noqa: E402
from nearl_core.errors import NearlError  # noqa: E402
from nearl_protocol.processes import FlowerError  # noqa: E402
from server import options  # noqa: E402
from server.settings import SIMULATION  # noqa: E402
from server.tracking import resolve_tracking_uri  # noqa: E402
from nearl_protocol import keys  # noqa: E402
from server.events import DoneEvent, Event, RoundEvent  # noqa: E402
from server.selection import label  # noqa: E402
from simulation import compare, methods  # noqa: E402
from simulation.partition import (format_summary, in_order, partition, pool_images, summary_table,  # noqa: E402
                                  write_virtual_sites)


def build_parser() -> argparse.ArgumentParser:
    """The federation settings' flags and the shared NEARL flags (as on nearl-server), then the simulation's own."""
    p = argparse.ArgumentParser(prog="simulation/run.py", description=__doc__.splitlines()[0])
    p.add_argument("--sites", type=int, default=4, help="number of virtual hospitals (default 4)")
    p.add_argument("--alpha", default="0.5", help="Dirichlet label skew (default 0.5), 'iid' or 'pathological:K'")
    p.add_argument("--data", type=Path, default=None,
                   help="data to partition: ImageFolder root, folder of site folders, or MedMNIST .npz "
                        "(default: the synthetic demo data, generated when missing)")
    p.add_argument("--seed", type=int, default=0, help="partitioning and training seed (default 0; "
                   "--set train.seed=S changes the training seed alone, on the same split)")
    p.add_argument("--out", type=Path, default=None, help="output folder (default runs/sim-<time>)")
    p.add_argument("--compare", action="store_true", help="also run centralized and local-only baselines")
    p.add_argument("--methods", default=None, metavar="M1,M2,...",
                   help="run the same federation once per adapter.method (nearl, coop, clip-adapter, lora, "
                        "linear-probe, full-ft) on the same sites, seeds and DP settings; writes methods.csv, "
                        "methods.md and methods.png (docs/methods.md)")
    p.add_argument("--cpus-per-site", type=float, default=1.0, help="Ray CPUs per virtual site (default 1)")
    flags.add_config_flags(p, federation_keys=True)
    options.add_federation_flags(p, SIMULATION)
    flags.add_personalize_flags(p)  # the arm 'personalized' of results.csv
    dp = flags.add_dp_flags(p)
    dp.add_argument("--site-max-epsilon", action="append", default=[], metavar="SITE=E",
                    help="a virtual site's own ceiling, as its nearl-client --max-epsilon (repeatable)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        summary = run(args)
    except (NearlError, FlowerError) as err:
        print(f"simulation: error: {err}", file=sys.stderr)
        return 2
    print(f"\nresults in {summary['out']}")
    return 0


def run(args: argparse.Namespace) -> dict:
    start = time.perf_counter()
    out = (args.out or Path("runs") / time.strftime("sim-%Y%m%d-%H%M%S")).resolve()
    if (out / "results.csv").exists() or (out / "methods.csv").exists():
        raise NearlError(f"{out} already holds results; choose another --out")
    keys = options.federation_keys()
    nearl_sets = flags.config_overrides(args, keys)  # --set, --pretrained, --personalize, --dp-*: as on nearl-server
    nearl_sets.setdefault("train.seed", args.seed)  # every arm trains with the federation's seed
    _, federation_sets = flags.parse_set(args.overrides, keys)
    args.nearl_sets = nearl_sets
    if args.sites < 1:
        raise NearlError("--sites must be >= 1")
    args.settings = options.settings_from_args(args, SIMULATION, federation_sets, min_nodes=args.sites)
    if args.site_max_epsilon and args.dp_epsilon is None:
        raise NearlError("--site-max-epsilon needs --dp-epsilon E")
    # every method's config is checked before anything runs (an unknown method, full-ft under DP)
    configs = {m: config_of(args, {"adapter.method": m}) for m in methods.parse_methods(args.methods or "")}
    if args.methods is not None and not configs:
        raise NearlError("--methods needs at least one method, e.g. --methods nearl,coop")
    cfg = config_of(args)

    from_data = flags.classes_from_data(args)
    pool = pool_images(args.data or demo_pool(args.sites, args.seed), None if from_data else cfg.task.classes or None)
    if from_data or not cfg.task.classes:
        cfg = classes_of_data(cfg, pool.classes, "the data")
        configs = {m: c.with_classes(cfg.task.classes) for m, c in configs.items()}
        pool = in_order(pool, cfg.task.classes)
    parts = partition(pool, args.sites, args.alpha, args.seed)
    site_roots = write_virtual_sites(pool, parts, out / "sites", args.seed)
    rows = summary_table(pool, parts)
    (out / "partition.json").write_text(json.dumps({"alpha": args.alpha, "seed": args.seed, "sites": rows}, indent=2))
    print(f"{len(pool.paths)} images, {args.sites} virtual sites, alpha={args.alpha}, seed={args.seed}:")
    print(format_summary(pool, rows))
    if not configs:
        summary = federate(args, cfg, out, site_roots, out)
        seconds = summary["simulation"].seconds
        print(f"simulation wall time {time.perf_counter() - start:.1f}s (federation {seconds:.1f}s)")
        return summary

    per_method = {}
    for method, method_cfg in configs.items():
        print(f"\n=== method {method} ===")
        per_method[method] = federate(args, method_cfg, out / method, site_roots, out)
    rows_out, files = methods.compare_methods(args, configs, per_method, site_roots, out)
    for summary in per_method.values():
        log_to_mlflow(summary["mlflow_uri"], summary["simulation"].run_id, [], files)
    print("\n" + (out / "methods.md").read_text())
    print(f"simulation wall time {time.perf_counter() - start:.1f}s")
    return {"out": out, "methods": rows_out, "per_method": per_method}


def config_of(args: argparse.Namespace, extra: dict | None = None) -> NearlConfig:
    """The run's NEARL config: --config, the overrides of the flags, then ``extra`` (the classes: see run)."""
    return load_config(flags.config_name(args), {**args.nearl_sets, **(extra or {})})


def federate(args: argparse.Namespace, cfg, out: Path, site_roots: list[Path], root: Path) -> dict:
    """One federation on the virtual sites under ``root``, then the arms; results and curves in ``out``."""
    from simulation.launch import run_simulation  # Flower is only needed for the federation itself

    run_config = federation_config(args, cfg, out, root / "sites")
    s = args.settings
    print(f"\nfederation: {s.num_rounds} rounds x {s.local_epochs} local epochs, strategy {s.strategy}, "
          f"method {cfg.adapter.method}, Simulation Engine ({args.sites} virtual SuperNodes)")
    print(f"{'round':>5}  {'sites':>5}  {'train_loss':>10}  {'eval_acc':>8}  {'eval_bal_acc':>12}  {'seconds':>7}"
          + ("  eps_max" if args.dp_epsilon is not None else ""))
    sim = run_simulation(sites=args.sites, run_config=run_config, workdir=out / "flower",
                         cpus_per_site=args.cpus_per_site, on_event=print_round)
    answered = [len(r.answered) for r in sim.rounds()]
    if any(n < args.sites for n in answered):
        print(f"warning: some sites did not answer (answered per round: {answered}); see {out}/flower")

    results = run_arms(args, cfg, site_roots, sim.adapters, out / "site-state")
    done = sim.done
    kept = done.selected_round if done else None
    rows_out = compare.result_rows(results, {"zero-shot": 0, "federated": kept, "personalized": kept}
                                   if done else None)
    title = (f"NEARL simulation: {args.sites} sites, alpha {args.alpha}, {s.num_rounds} rounds x {s.local_epochs} "
             f"epochs, method {cfg.adapter.method}")
    csv_path, md_path = compare.write_results(rows_out, out, title, [selection_note(done, s.num_rounds)] if done
                                              else None)
    curves = compare.plot_curves(eval_curve(sim), {r["arm"]: r["accuracy"] for r in rows_out
                                                   if r["site"] == "mean" and r["arm"] != "federated"}, out, kept)
    log_to_mlflow(run_config["mlflow-uri"], sim.run_id, rows_out, [csv_path, md_path, curves, root / "partition.json"])
    print("\n" + md_path.read_text().split("\nPer site:")[0])
    return {"out": out, "results": rows_out, "simulation": sim, "mlflow_uri": run_config["mlflow-uri"]}


def selection_note(done: DoneEvent, planned: int) -> str:
    """results.md's line on which round the federated arm is, by which validation, and why the run ended."""
    value = "n/a" if done.selected_value is None else f"{done.selected_value:.3f}"
    note = (f"The federated arm is round {done.selected_round} of {done.round}: the global adapters with the best "
            f"federated validation {label(done.select_by)} ({value}; the sites' val splits, example-weighted); "
            f"the last round's adapters are in {done.last_adapters}.")
    if done.stopped:
        note += f" The run stopped early after round {done.round} of {planned}: {done.stopped}."
    return note


def demo_pool(sites: int, seed: int) -> Path:
    """The synthetic demo data (4 acquisition sites), large enough for ``sites`` virtual sites."""
    per_site = max(96, 8 * sites)
    root = Path("demo-data") if per_site == 96 and seed == 0 else Path(f"demo-data-{per_site}-s{seed}")
    if not (root / "site1").is_dir():
        print(f"generating synthetic demo data in {root} ...")
        generate_demo_data(root, 4, train_per_site=per_site, seed=seed)
    return root


def federation_config(args: argparse.Namespace, cfg: NearlConfig, out: Path, sites_root: Path) -> dict:
    """The run config: the settings (as nearl-server builds them) with the resolved config file, plus the
    simulation's own ``sim-*`` keys."""
    config_file = write_config(cfg, out / "nearl-config.yaml")
    uri = resolve_tracking_uri(args.settings.mlflow_uri, Path.cwd())
    settings = replace(args.settings, config=str(config_file), checkpoint_dir=str(out / "checkpoints"),
                       mlflow_uri=uri)
    ceilings = ",".join(_site_ceiling(item) for item in args.site_max_epsilon)
    return {**settings.to_run_config(), "sim-data-root": str(sites_root),
            "sim-state-root": str(out / "site-state"),  # each virtual site's DP ledger and audit trail
            **({"sim-max-epsilon": ceilings} if ceilings else {})}


def _site_ceiling(item: str) -> str:
    """``site2=1.5`` -> the run-config form, or a one-line error."""
    site, _, value = item.partition("=")
    try:
        ceiling = float(value)
    except ValueError:
        ceiling = None
    if ceiling is None or not site.strip().startswith("site"):
        raise NearlError(f"--site-max-epsilon {item}: expected SITE=E, e.g. --site-max-epsilon site2=1.5")
    return f"{site.strip()}={ceiling}"


def print_round(event: Event) -> None:
    """A round's line of the table ``federate`` prints (other events print nothing)."""
    if not isinstance(event, RoundEvent):
        return
    fmt = lambda v, w: f"{v:>{w}.4f}" if isinstance(v, (int, float)) else f"{'-':>{w}}"
    train, ev = event.train, event.eval
    print(f"{event.round:>5}  {len(event.answered):>5}  {fmt(train.get(keys.MLFLOW_TRAIN_LOSS), 10)}  "
          f"{fmt(ev.get(keys.MLFLOW_EVAL_ACCURACY), 8)}  {fmt(ev.get(keys.MLFLOW_EVAL_BALANCED_ACCURACY), 12)}  "
          f"{event.seconds:>7.1f}"
          + (f"  {train[keys.MLFLOW_EPSILON_MAX]:>7.3f}" if keys.MLFLOW_EPSILON_MAX in train else "")
          + "".join(f"\n       {site} {why}" for site, why in event.declined.items()), flush=True)


def eval_curve(sim) -> list[dict]:
    """Accuracy per evaluation step: weighted mean and per site."""
    curve = []
    for e in sim.evals():
        sites = {s: v.get(keys.MLFLOW_EVAL_ACCURACY) for s, v in e.sites.items()}
        curve.append({"round": e.step, "mean": e.metrics.get(keys.MLFLOW_EVAL_ACCURACY, math.nan),
                      "sites": {s: (v if v is not None else math.nan) for s, v in sites.items()}})
    return curve


def run_arms(args, cfg, site_roots: list[Path], adapters: Path, state_root: Path) -> dict:
    from nearl_core.backbone import build_backbone
    from nearl_core.personalize import wants_personalization
    from nearl_core.train import select_device

    sites = {root.name: scan_site(root, cfg.task.classes, verify=False) for root in site_roots}
    backbone = build_backbone(cfg.model)
    device = select_device(cfg.train.device)
    epochs = args.settings.num_rounds * args.settings.local_epochs
    results = {"zero-shot": compare.zero_shot(cfg, backbone, sites, device),
               "federated": compare.federated(cfg, backbone, sites, device, adapters)}
    if args.compare:
        results["centralized"] = compare.centralized(cfg, backbone, sites, device, epochs)
        results["local-only"] = compare.local_only(cfg, backbone, sites, device, epochs)
    if wants_personalization(cfg):  # only evaluation here: the sites trained and wrote them
        results["personalized"] = compare.personalized(cfg, backbone, sites, device, state_root)
    elif args.compare:
        print("no personalized arm: the config keeps no adapter group local and fine-tunes for 0 epochs "
              "(--personalize / --finetune-epochs)")
    return results


def log_to_mlflow(uri: str, run_id: str | None, rows: list[dict], files: list[Path]) -> None:
    """The comparison goes into the federation's own MLflow run."""
    if not run_id:
        return
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=uri)
    for r in rows:
        prefix = f"compare/{r['arm']}/{r['site']}"
        for k in ("accuracy", "balanced_accuracy", "macro_f1", "auroc"):
            if not math.isnan(r[k]):
                client.log_metric(run_id, f"{prefix}/{k}", r[k])
    for f in files:
        if f.exists():
            client.log_artifact(run_id, str(f), artifact_path="simulation")


if __name__ == "__main__":
    sys.exit(main())
