"""The same federation once per method: what each costs and what it reaches.

``python simulation/run.py --methods nearl,coop,...`` runs one federation per
``adapter.method`` on the same virtual sites, seeds, rounds, local epochs and DP
settings, each in ``<out>/<method>/``, then writes

    methods.csv  method, arm, site, the four metrics, round (the federation round an arm is: the
                 one each method's federation selected by validation), trainable_params,
                 payload_bytes_per_round, train_seconds_per_epoch (one row per method x arm x site)
    methods.md   one row per method: means over sites, parameters, bytes, time
    methods.png  federated accuracy against the bytes a site moves per round (log x)

``payload_bytes_per_round`` is what one site moves in one round: the global weights
down and its update up, in the run's transport dtype.  ``train_seconds_per_epoch`` is a
local epoch on site1's training images, timed in the driver process after the
federations (the same data and machine for every method, no Ray workers competing),
with DP-SGD when the federation ran it (:func:`epoch_seconds`).
"""

from __future__ import annotations

import csv
import math
import tempfile
from argparse import Namespace
from pathlib import Path

import torch

from nearl_core.adapter_io import shared_schema
from nearl_core.backbone import Backbone, build_backbone
from nearl_core.config import NearlConfig
from nearl_core.data import SiteData, scan_site
from nearl_core.metrics import METRIC_NAMES
from nearl_core.model import build_model
from nearl_core.params import parameter_report
from nearl_core.train import fit, make_loader, seed_everything, select_device
from nearl_core.transport import wire_schema
from nearl_protocol.schema import payload_bytes

COLUMNS = ("method", "arm", "site", *METRIC_NAMES, "round", "trainable_params", "payload_bytes_per_round",
           "train_seconds_per_epoch")


def parse_methods(text: str) -> list[str]:
    """``nearl,coop`` -> ``["nearl", "coop"]``; unknown names are refused when their config is built."""
    methods = [m.strip() for m in text.split(",") if m.strip()]
    return list(dict.fromkeys(methods))


def cost(cfg: NearlConfig, backbone: Backbone, transport: str) -> dict[str, float]:
    """Trainable parameters and the bytes one site moves per round (down + up) for this method."""
    model = build_model(cfg, backbone=backbone)
    return {"trainable_params": parameter_report(model)["trainable"],
            "payload_bytes_per_round": 2 * payload_bytes(wire_schema(shared_schema(model), transport))}


def epoch_seconds(cfg: NearlConfig, backbone: Backbone, site: SiteData, device: torch.device) -> float:
    """Seconds of a local epoch on ``site``'s training split: plain, or DP-SGD when ``cfg`` enables it.

    Two epochs run and the faster is reported: the first also pays one-time costs (thread
    pools, kernel choices), up to 5x an epoch on a tiny model, and on a shared machine
    either can catch a burst of someone else's load.
    """
    seed_everything(cfg.train.seed)
    model = build_model(cfg, backbone=backbone).to(device)
    loader = make_loader(site.samples("train"), model.preprocess, cfg.train, device, shuffle=True,
                         seed=cfg.train.seed)
    if not cfg.privacy.enabled:
        return min(float(r["seconds"]) for r in fit(model, loader, cfg, device, epochs=2, log=None))
    from nearl_core.privacy import open_privacy_state, train_private_round

    with tempfile.TemporaryDirectory() as ledger:  # a throwaway ledger: these epochs are a measurement
        state = open_privacy_state(ledger, cfg.privacy, n_train=len(loader.dataset), batch_size=cfg.train.batch_size,
                                   epochs=2, rounds=1, log=None)
        history = train_private_round(model, loader, cfg, device, state, epochs=2, seed=cfg.train.seed, log=None)
    return min(float(r["seconds"]) for r in history)


def method_rows(method: str, rows: list[dict], costs: dict[str, float], seconds: float) -> list[dict]:
    """One method's result rows (compare.result_rows) with the method and its costs added."""
    return [{"method": method, **r, **costs, "train_seconds_per_epoch": seconds} for r in rows]


def write_csv(rows: list[dict], out: Path) -> Path:
    path = out / "methods.csv"
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(COLUMNS))
        writer.writeheader()
        writer.writerows({k: (f"{v:.4f}" if isinstance(v, float) else v) for k in COLUMNS
                          for v in [r.get(k, "")]} for r in rows)  # "round" is empty for an arm that has none
    return path


def _mean(rows: list[dict], method: str, arm: str, key: str) -> float:
    for r in rows:
        if r["method"] == method and r["arm"] == arm and r["site"] == "mean":
            return r[key]
    return math.nan


def write_markdown(rows: list[dict], out: Path, title: str, notes: list[str]) -> Path:
    """One row per method: federated means, the other arms' mean accuracy, parameters, bytes and time."""
    methods = list(dict.fromkeys(r["method"] for r in rows))
    arms = [a for a in ("zero-shot", "centralized", "local-only", "personalized") if any(r["arm"] == a for r in rows)]
    fmt = lambda v: "n/a" if math.isnan(v) else f"{v:.3f}"  # noqa: E731
    names = {"zero-shot": "round-0 acc", "centralized": "centralized acc", "local-only": "local-only acc",
             "personalized": "personalized acc"}
    head = ["method", "trainable params", "bytes / site / round", "s / epoch", "federated acc", "bal. acc",
            "macro-F1", "AUROC", *(names[a] for a in arms)]
    lines = [f"# {title}", "", "| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    for m in methods:
        first = next(r for r in rows if r["method"] == m)
        cells = [m, f"{int(first['trainable_params']):,}", f"{int(first['payload_bytes_per_round']):,}",
                 f"{first['train_seconds_per_epoch']:.2f}"]
        cells += [fmt(_mean(rows, m, "federated", k)) for k in METRIC_NAMES]
        cells += [fmt(_mean(rows, m, a, "accuracy")) for a in arms]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", *notes]
    path = out / "methods.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def plot(rows: list[dict], out: Path) -> Path:
    """Federated mean accuracy against bytes per site per round, log x; round-0 accuracy as hollow marks."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for m in dict.fromkeys(r["method"] for r in rows):
        first = next(r for r in rows if r["method"] == m)
        x = first["payload_bytes_per_round"]
        acc, start = _mean(rows, m, "federated", "accuracy"), _mean(rows, m, "zero-shot", "accuracy")
        ax.scatter([x], [acc], s=60, zorder=3)
        ax.scatter([x], [start], s=40, facecolors="none", edgecolors="grey", zorder=2)
        ax.annotate(m, (x, acc), textcoords="offset points", xytext=(6, 4), fontsize=9)
    ax.set_xscale("log")
    ax.margins(x=0.12)  # room for the labels of the outermost methods
    ax.set_xlabel("bytes per site per round (download + upload, log scale)")
    ax.set_ylabel("test accuracy, mean over sites")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3, which="both")
    ax.set_title("filled: after the federation; hollow: the fresh model (round 0)", fontsize=9)
    fig.tight_layout()
    path = out / "methods.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def compare_methods(args: Namespace, configs: dict[str, NearlConfig], per_method: dict, site_roots: list[Path],
                    out: Path) -> tuple[list[dict], list[Path]]:
    """methods.csv, methods.md and methods.png from every method's federation and arms."""
    first = next(iter(configs.values()))
    backbone = build_backbone(first.model)
    device = select_device(first.train.device)
    site1 = scan_site(site_roots[0], first.task.classes, verify=False)
    rows = []
    for method, summary in per_method.items():
        cfg = configs[method]  # with the run's DP settings, so the timed epoch is the sites' own
        seconds = epoch_seconds(cfg, backbone, site1, device)
        print(f"{method}: one local epoch on {site_roots[0].name} takes {seconds:.2f}s")
        rows += method_rows(method, summary["results"], cost(cfg, backbone, args.settings.transport_dtype), seconds)
    dp = f", DP-SGD epsilon {args.dp_epsilon:g} at every site" if args.dp_epsilon is not None else ""
    title = (f"Methods in the same federation: {args.sites} sites, alpha {args.alpha}, {args.settings.num_rounds} rounds x "
             f"{args.settings.local_epochs} epochs, {first.model.name}{dp}")
    notes = ["Accuracy etc.: test split of every site, mean over sites (each site counts once); round-0 acc is the "
             "fresh model (zero-shot CLIP for every method but CoOp with a random context).",
             f"Bytes: a site's download + upload per round ({args.settings.transport_dtype}). s / epoch: the faster of two local "
             f"epochs on {site_roots[0].name}, timed in the driver process" + (" under DP-SGD." if dp else "."),
             "Each method's own results, curves and MLflow run: <out>/<method>/."]
    files = [write_csv(rows, out), write_markdown(rows, out, title, notes), plot(rows, out)]
    return rows, files
