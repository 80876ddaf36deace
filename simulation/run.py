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

from nearl_core.config import load_config  # noqa: E402
from nearl_core.data import scan_site  # noqa: E402
from nearl_core.demo_data import generate_demo_data  # noqa: E402
from nearl_core import personalize  # noqa: E402
from nearl_core.errors import NearlError  # noqa: E402
from nearl_protocol.processes import FlowerError  # noqa: E402
from nearl_protocol import keys  # noqa: E402
from server.events import Event, RoundEvent  # noqa: E402
from simulation import compare, methods  # noqa: E402
from simulation.partition import format_summary, partition, pool_images, summary_table, write_virtual_sites  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="simulation/run.py", description=__doc__.splitlines()[0])
    p.add_argument("--sites", type=int, default=4, help="number of virtual hospitals (default 4)")
    p.add_argument("--rounds", type=int, default=5, help="federated rounds (default 5)")
    p.add_argument("--local-epochs", type=int, default=2, help="local epochs per site per round (default 2)")
    p.add_argument("--alpha", default="0.5", help="Dirichlet label skew (default 0.5), 'iid' or 'pathological:K'")
    p.add_argument("--data", type=Path, default=None,
                   help="data to partition: ImageFolder root, folder of site folders, or MedMNIST .npz "
                        "(default: the synthetic demo data, generated when missing)")
    p.add_argument("--config", default="demo", help="nearl config file or shipped name (default demo)")
    p.add_argument("--pretrained", default=None, help="override model.pretrained (tag or local file)")
    p.add_argument("--strategy", default="fedavg",
                   help="fedavg (default), fedprox, fedavgm, fedadam, fedyogi, fedmedian, fedtrimmedavg, krum")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="settings",
                   help="a NEARL config key (train.loss=logit-adjusted, train.schedule=federation) or a server "
                        "option (proximal-mu=0.1, server-momentum=0.9, server-lr=0.03); repeatable")
    p.add_argument("--seed", type=int, default=0, help="partitioning and training seed (default 0; "
                   "--set train.seed=S changes the training seed alone, on the same split)")
    p.add_argument("--out", type=Path, default=None, help="output folder (default runs/sim-<time>)")
    p.add_argument("--mlflow-uri", default=None, help="tracking URI (default sqlite:///mlflow.db in the cwd)")
    p.add_argument("--compare", action="store_true", help="also run centralized and local-only baselines")
    personalize.add_arguments(p)  # the arm 'personalized' of results.csv
    p.add_argument("--methods", default=None, metavar="M1,M2,...",
                   help="run the same federation once per adapter.method (nearl, coop, clip-adapter, lora, "
                        "linear-probe, full-ft) on the same sites, seeds and DP settings; writes methods.csv, "
                        "methods.md and methods.png (docs/methods.md)")
    p.add_argument("--cpus-per-site", type=float, default=1.0, help="Ray CPUs per virtual site (default 1)")
    p.add_argument("--transport-dtype", default="float32", choices=("float32", "fp16", "bf16"),
                   help="adapters on the wire: fp16/bf16 halve the payload, aggregation stays float32")
    p.add_argument("--secure-aggregation", action="store_true",
                   help="SecAgg+: the server learns only the sum of the sites' updates (docs/security.md)")
    dp = p.add_argument_group("differential privacy (docs/privacy.md)")
    dp.add_argument("--dp-epsilon", type=float, default=None, metavar="E",
                    help="DP-SGD at every site, epsilon E over all rounds (sample-level; each site keeps its ledger "
                         "in <out>/site-state/)")
    dp.add_argument("--dp-delta", type=float, default=None, metavar="D", help="sample-level delta (default 1e-5)")
    dp.add_argument("--dp-max-grad-norm", type=float, default=None, metavar="C",
                    help="per-sample clipping bound (default 1.0)")
    dp.add_argument("--site-max-epsilon", action="append", default=[], metavar="SITE=E",
                    help="a virtual site's own ceiling, as its nearl-client --max-epsilon (repeatable)")
    dp.add_argument("--server-dp-noise", type=float, default=0.0, metavar="Z",
                    help="client-level DP at the server: noise multiplier (with --server-dp-clip)")
    dp.add_argument("--server-dp-clip", type=float, default=0.0, metavar="C", help="L2 bound of each site's update")
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
    nearl_sets, server_sets = split_settings(args.settings)
    nearl_sets.update(personalize.overrides_from_args(args))
    nearl_sets.setdefault("train.seed", args.seed)  # every arm trains with the federation's seed
    args.nearl_sets, args.server_sets = nearl_sets, server_sets
    cfg = load_config(args.config, {**nearl_sets, **({"model.pretrained": args.pretrained} if args.pretrained else {})})
    if args.sites < 1 or args.rounds < 1 or args.local_epochs < 1:
        raise NearlError("--sites, --rounds and --local-epochs must be >= 1")
    if (args.dp_delta is not None or args.dp_max_grad_norm is not None or args.site_max_epsilon) \
            and args.dp_epsilon is None:
        raise NearlError("--dp-delta, --dp-max-grad-norm and --site-max-epsilon need --dp-epsilon E")
    # every method's config is checked before anything runs (an unknown method, full-ft under DP)
    configs = {m: load_config(args.config, {**method_overrides(args, m), **dp_overrides(args)})
               for m in methods.parse_methods(args.methods or "")}
    if args.methods is not None and not configs:
        raise NearlError("--methods needs at least one method, e.g. --methods nearl,coop")

    pool = pool_images(args.data or demo_pool(args.sites, args.seed), cfg.task.classes or None)
    cfg = cfg if cfg.task.classes else cfg.with_classes(pool.classes)
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

    configs = {m: c if c.task.classes else c.with_classes(pool.classes) for m, c in configs.items()}
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


def method_overrides(args: argparse.Namespace, method: str) -> dict:
    return {**args.nearl_sets, "adapter.method": method,
            **({"model.pretrained": args.pretrained} if args.pretrained else {})}


def split_settings(items: list[str]) -> tuple[dict[str, str], dict[str, str]]:
    """``--set`` items: NEARL config keys (``section.key``) and server options (run-config keys), checked."""
    from server.settings import FederationSettings

    server_keys = set(FederationSettings().strategy_options())
    nearl, server = {}, {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise NearlError(f"--set {item}: expected KEY=VALUE, e.g. --set train.loss=logit-adjusted")
        if "." in key:
            nearl[key] = value
        elif key in server_keys:
            server[key] = value
        else:
            raise NearlError(f"--set {key}: not a NEARL config key (section.key) nor a server option; server "
                             f"options: {', '.join(sorted(server_keys))}")
    return nearl, server


def dp_overrides(args: argparse.Namespace) -> dict:
    """The NEARL config keys --dp-epsilon sets at every site (as in the run config), for checks and timing."""
    return {k: v for k, v in dp_config(args, Path(".")).items() if k.startswith("privacy.")}


def federate(args: argparse.Namespace, cfg, out: Path, site_roots: list[Path], root: Path) -> dict:
    """One federation on the virtual sites under ``root``, then the arms; results and curves in ``out``."""
    from simulation.launch import run_simulation  # Flower is only needed for the federation itself

    run_config = federation_config(args, cfg, out, root / "sites")
    print(f"\nfederation: {args.rounds} rounds x {args.local_epochs} local epochs, strategy {args.strategy}, "
          f"method {cfg.adapter.method}, Simulation Engine ({args.sites} virtual SuperNodes)")
    print(f"{'round':>5}  {'sites':>5}  {'train_loss':>10}  {'eval_acc':>8}  {'eval_bal_acc':>12}  {'seconds':>7}"
          + ("  eps_max" if args.dp_epsilon is not None else ""))
    sim = run_simulation(sites=args.sites, run_config=run_config, workdir=out / "flower",
                         cpus_per_site=args.cpus_per_site, on_event=print_round)
    answered = [len(r.answered) for r in sim.rounds()]
    if any(n < args.sites for n in answered):
        print(f"warning: some sites did not answer (answered per round: {answered}); see {out}/flower")

    results = run_arms(args, cfg, site_roots, sim.adapters, out / "site-state")
    rows_out = compare.result_rows(results)
    title = (f"NEARL simulation: {args.sites} sites, alpha {args.alpha}, {args.rounds} rounds x {args.local_epochs} "
             f"epochs, method {cfg.adapter.method}")
    csv_path, md_path = compare.write_results(rows_out, out, title)
    curves = compare.plot_curves(eval_curve(sim), {r["arm"]: r["accuracy"] for r in rows_out
                                                   if r["site"] == "mean" and r["arm"] != "federated"}, out)
    log_to_mlflow(run_config["mlflow-uri"], sim.run_id, rows_out, [csv_path, md_path, curves, root / "partition.json"])
    print("\n" + md_path.read_text().split("\nPer site:")[0])
    return {"out": out, "results": rows_out, "simulation": sim, "mlflow_uri": run_config["mlflow-uri"]}


def demo_pool(sites: int, seed: int) -> Path:
    """The synthetic demo data (4 acquisition sites), large enough for ``sites`` virtual sites."""
    per_site = max(96, 8 * sites)
    root = Path("demo-data") if per_site == 96 and seed == 0 else Path(f"demo-data-{per_site}-s{seed}")
    if not (root / "site1").is_dir():
        print(f"generating synthetic demo data in {root} ...")
        generate_demo_data(root, 4, train_per_site=per_site, seed=seed)
    return root


def federation_config(args: argparse.Namespace, cfg, out: Path, sites_root: Path) -> dict:
    config_file = out / "nearl-config.yaml"
    import yaml

    out.mkdir(parents=True, exist_ok=True)
    config_file.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    return {
        "num-server-rounds": args.rounds,
        "config": str(config_file),
        "strategy": args.strategy,
        "min-nodes": args.sites,
        "fraction-train": 1.0,
        "local-epochs": args.local_epochs,
        "mlflow-uri": args.mlflow_uri or f"sqlite:///{Path.cwd().resolve() / 'mlflow.db'}",
        "checkpoint-dir": str(out / "checkpoints"),
        "sim-data-root": str(sites_root),
        "sim-state-root": str(out / "site-state"),  # each virtual site's DP ledger and audit trail
        "train.seed": cfg.train.seed,
        "transport-dtype": args.transport_dtype,
        "server-dp-noise": args.server_dp_noise,
        "server-dp-clip": args.server_dp_clip,
        "secure-aggregation": args.secure_aggregation,
        **dp_config(args, out),
        **getattr(args, "server_sets", {}),
    }


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


def dp_config(args: argparse.Namespace, out: Path) -> dict:
    """Run-config keys for sample-level DP at every virtual site (none without --dp-epsilon)."""
    if args.dp_epsilon is None:
        return {}
    from nearl_core.privacy import DEFAULT_DELTA

    ceilings = [_site_ceiling(item) for item in args.site_max_epsilon]
    out_cfg = {"privacy.enabled": True, "privacy.target-epsilon": args.dp_epsilon,
               "privacy.delta": args.dp_delta if args.dp_delta is not None else DEFAULT_DELTA,
               "sim-max-epsilon": ",".join(ceilings)}
    if args.dp_max_grad_norm is not None:
        out_cfg["privacy.max-grad-norm"] = args.dp_max_grad_norm
    return out_cfg


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
    epochs = args.rounds * args.local_epochs
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
