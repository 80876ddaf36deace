"""The non-federated arms researchers compare a federation against, on the same splits.

zero-shot    the frozen CLIP with zero-initialised adapters (= round 0 of the federation)
federated    the global adapters the federation kept: the round its federated validation selected
centralized  one model trained on the pooled training data of every site
local-only   each site trains its own adapters on its own training data only
personalized each site's own adapters at the end of a personalized federation (federation.local /
             federation.finetune-epochs), as the site wrote them to <state-dir>/personalized/

Every arm is evaluated on every site's own test split with the same code, and trained
for the same total number of epochs as a federated site (rounds x local epochs).
"""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Callable

import torch

from nearl_core.adapter_io import load_adapters
from nearl_core.backbone import Backbone
from nearl_core.config import NearlConfig
from nearl_core.data import SiteData
from nearl_core.metrics import METRIC_NAMES
from nearl_core.model import FrozenCLIP, build_model
from nearl_core.train import evaluate, fit, make_loader, seed_everything

ARMS = ("zero-shot", "federated", "centralized", "local-only", "personalized")
PerSite = dict[str, dict[str, float]]


def evaluate_sites(model: FrozenCLIP, sites: dict[str, SiteData], cfg: NearlConfig, device: torch.device) -> PerSite:
    """Test metrics of one model on each site's own test split (val when a site has no test)."""
    out = {}
    for name, site in sites.items():
        split = "test" if site.splits.get("test") else "val"
        loader = make_loader(site.samples(split), model.preprocess, cfg.train, device, shuffle=False)
        out[name] = evaluate(model, loader, device, amp=cfg.train.amp)
    return out


def _fresh(cfg: NearlConfig, backbone: Backbone, device: torch.device) -> FrozenCLIP:
    seed_everything(cfg.train.seed)
    return build_model(cfg, backbone=backbone).to(device)


def zero_shot(cfg: NearlConfig, backbone: Backbone, sites: dict[str, SiteData], device: torch.device) -> PerSite:
    return evaluate_sites(_fresh(cfg, backbone, device), sites, cfg, device)


def federated(cfg: NearlConfig, backbone: Backbone, sites: dict[str, SiteData], device: torch.device,
              adapters: Path) -> PerSite:
    """Final global adapters of the federation, evaluated on every site's test split."""
    model = _fresh(cfg, backbone, device)
    load_adapters(model, adapters)
    return evaluate_sites(model, sites, cfg, device)


def centralized(cfg: NearlConfig, backbone: Backbone, sites: dict[str, SiteData], device: torch.device,
                epochs: int, log: Callable[[str], None] = print) -> PerSite:
    model = _fresh(cfg, backbone, device)
    pooled = [s for site in sites.values() for s in site.samples("train")]
    log(f"centralized: {len(pooled)} pooled training images, {epochs} epochs")
    fit(model, make_loader(pooled, model.preprocess, cfg.train, device, shuffle=True, seed=cfg.train.seed),
        cfg, device, epochs=epochs, log=None)
    return evaluate_sites(model, sites, cfg, device)


def local_only(cfg: NearlConfig, backbone: Backbone, sites: dict[str, SiteData], device: torch.device,
               epochs: int, log: Callable[[str], None] = print) -> PerSite:
    out = {}
    for name, site in sites.items():
        model = _fresh(cfg, backbone, device)
        loader = make_loader(site.samples("train"), model.preprocess, cfg.train, device, shuffle=True,
                             seed=cfg.train.seed)
        fit(model, loader, cfg, device, epochs=epochs, log=None)
        out[name] = evaluate_sites(model, {name: site}, cfg, device)[name]
        log(f"local-only {name}: test accuracy {out[name]['accuracy']:.3f}")
    return out


def personalized(cfg: NearlConfig, backbone: Backbone, sites: dict[str, SiteData], device: torch.device,
                 state_root: Path) -> PerSite:
    """Each site's personalized adapters (written by the site itself) on its own test split.

    A site that wrote none (it missed the last evaluation) is left out of the arm, with a warning.
    """
    from nearl_core.personalize import state_dirs

    out = {}
    for name, site in sites.items():
        folder = state_dirs(state_root / name)[1]
        if not folder.is_dir():
            print(f"warning: {name} wrote no personalized adapters ({folder}); it is left out of the arm")
            continue
        model = _fresh(cfg, backbone, device)
        load_adapters(model, folder)
        out[name] = evaluate_sites(model, {name: site}, cfg, device)[name]
    return out


def result_rows(results: dict[str, PerSite], rounds: dict[str, int] | None = None) -> list[dict]:
    """One row per (arm, site) plus the unweighted mean over sites (every hospital counts once).

    ``rounds``: the federation round whose global adapters an arm is (or starts from), per arm;
    the column ``round`` is empty for an arm that is no federation round.
    """
    rows = []
    for arm in ARMS:
        if arm not in results:
            continue
        per_site = results[arm]
        which = {"round": (rounds or {}).get(arm, "")}
        for site, metrics in per_site.items():
            rows.append({"arm": arm, "site": site, **{k: metrics[k] for k in METRIC_NAMES}, **which})
        means = {k: _nanmean([m[k] for m in per_site.values()]) for k in METRIC_NAMES}
        rows.append({"arm": arm, "site": "mean", **means, **which})
    return rows


def _nanmean(values: list[float]) -> float:
    kept = [v for v in values if not math.isnan(v)]
    return sum(kept) / len(kept) if kept else math.nan


def write_results(rows: list[dict], out: Path, title: str, notes: list[str] | None = None) -> tuple[Path, Path]:
    """results.csv (columns arm,site,accuracy,balanced_accuracy,macro_f1,auroc,round) and results.md (the title,
    ``notes``, the means, the sites)."""
    out.mkdir(parents=True, exist_ok=True)
    columns = ["arm", "site", *METRIC_NAMES, "round"]
    with open(out / "results.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns)
        writer.writeheader()
        writer.writerows({k: (f"{r[k]:.4f}" if isinstance(r[k], float) else r[k]) for k in columns} for r in rows)
    fmt = lambda v: "n/a" if isinstance(v, float) and math.isnan(v) else (f"{v:.3f}" if isinstance(v, float) else v)
    lines = [f"# {title}", "", *(f"{n}\n" for n in notes or ()), "| " + " | ".join(columns) + " |",
             "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(str(fmt(r[c])) for c in columns) + " |" for r in rows if r["site"] == "mean"]
    lines += ["", "Per site:", "", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(str(fmt(r[c])) for c in columns) + " |" for r in rows if r["site"] != "mean"]
    (out / "results.md").write_text("\n".join(lines) + "\n")
    return out / "results.csv", out / "results.md"


def plot_curves(rounds: list[dict], reference: dict[str, float], out: Path, selected: int | None = None) -> Path:
    """Federated validation accuracy per round (per site, weighted mean) against the arms' test levels;
    a dotted vertical line marks the ``selected`` round (the federated arm)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    xs = [r["round"] for r in rounds]
    sites = sorted({s for r in rounds for s in r.get("sites", {})}, key=lambda s: (len(s), s))
    for site in sites[:12]:  # beyond a dozen lines a plot stops being readable
        ax.plot(xs, [r["sites"].get(site, math.nan) for r in rounds], lw=0.8, alpha=0.5, label=site)
    ax.plot(xs, [r["mean"] for r in rounds], color="black", lw=2.2, marker="o", label="federated (weighted mean)")
    styles = {"centralized": ("tab:green", "--"), "local-only": ("tab:red", ":"), "zero-shot": ("grey", "-."),
              "personalized": ("tab:purple", "-")}
    if selected is not None:
        ax.axvline(selected, color="black", ls=":", lw=1.2, label=f"selected round {selected}")
    for arm, level in reference.items():
        color, ls = styles.get(arm, ("tab:blue", "--"))
        ax.axhline(level, color=color, ls=ls, lw=1.5, label=f"{arm} (mean)")
    ax.set_xlabel("round")
    ax.set_ylabel("accuracy (federation: validation, per round; arms: test)")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2, loc="lower right")
    fig.tight_layout()
    path = out / "curves.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
