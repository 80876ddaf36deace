"""The local jobs behind the ``nearl`` commands, as plain functions.

Each takes the config object and paths, prints progress, and raises ``NearlError`` for
anything the user can fix.  The CLI only parses arguments; tests call these directly.
"""

from __future__ import annotations

import csv
import json
import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Sequence

import torch

from nearl_core.adapter_io import check_compatible, read_adapters, save_adapters, set_adapter_state
from nearl_core.config import NearlConfig, from_dict, load_config
from nearl_core.data import infer_classes, load_image, scan_site
from nearl_core.demo_data import generate_demo_data
from nearl_core.errors import AdapterFileError, ConfigError, ModelOutputError, NearlError
from nearl_core.metrics import METRIC_NAMES
from nearl_core.model import FrozenCLIP, build_model
from nearl_core.params import format_report, parameter_report
from nearl_core import flags, privacy
from nearl_core.site_check import classes_of_data, load_site, with_site_classes
from nearl_core.train import evaluate, fit, make_loader, seed_everything, select_device

format_params = format_report


def config_from_args(args: Any, *, reads_site: bool = True) -> NearlConfig:
    """--config, then --set, then the dedicated flags (nearl_core/flags.py: the same on every command).

    For a command that ``reads_site``, no ``--config`` and no ``--set task.classes`` mean
    "the classes of the site's folders" (:func:`classes_of_data`).
    """
    cfg = load_config(flags.config_name(args), flags.config_overrides(args))
    if reads_site and flags.classes_from_data(args):
        cfg = classes_of_data(cfg, infer_classes(args.data), Path(args.data) / "train")
    return cfg


def demo_data(out: Path, sites: int, *, seed: int = 0, train_per_site: int = 96, overwrite: bool = False) -> list[Path]:
    if sites < 1:
        raise ConfigError(f"--sites {sites}: need at least 1 site")
    paths = generate_demo_data(out, sites, seed=seed, train_per_site=train_per_site, overwrite=overwrite)
    print(f"wrote {len(paths)} synthetic sites under {out} (see {Path(out) / 'README.md'}):")
    for p in paths:
        site = scan_site(p, verify=False)
        counts = site.counts()["train"]
        print(f"  {p.name}: train " + ", ".join(f"{c}={n}" for c, n in counts.items()))
    return paths


def params(cfg: NearlConfig) -> dict:
    """Counts do not depend on weights, so the backbone is built with random init (offline)."""
    cfg = from_dict({**cfg.to_dict(), "model": {**cfg.to_dict()["model"], "pretrained": None}})
    classes = cfg.task.classes or ("class-a", "class-b")
    return parameter_report(build_model(cfg, classes))


def train(data: Path, out: Path, cfg: NearlConfig, *, overwrite: bool = False) -> dict[str, dict[str, float]]:
    """Train adapters on one site folder; save them with metrics; print a final table."""
    if (out / "adapters.safetensors").exists() and not overwrite:
        raise AdapterFileError(f"{out} already holds adapters; choose another --out or pass --overwrite")
    cfg = with_site_classes(cfg, data)
    site = load_site(cfg, data)
    seed_everything(cfg.train.seed)
    device = select_device(cfg.train.device)
    model = build_model(cfg).to(device)
    print(f"model {cfg.model.name} ({model.backbone_source}), method {cfg.adapter.method}, "
          f"{sum(p.numel() for p in model.parameters() if p.requires_grad):,} trainable parameters, device {device}")
    loaders = {s: make_loader(site.samples(s), model.preprocess, cfg.train, device, shuffle=(s == "train"),
                              seed=cfg.train.seed) for s in site.splits}
    report_split = "test" if "test" in loaders else "val"
    zero_shot = evaluate(model, loaders[report_split], device, amp=cfg.train.amp)
    start = time.perf_counter()
    extra: dict = {}
    if cfg.privacy.enabled:  # DP-SGD; the ledger lives in --out/privacy.json (one local "round")
        history, extra["privacy"] = _train_private(model, loaders, cfg, device, out)
    else:
        history = fit(model, loaders["train"], cfg, device, val_loader=loaders["val"])
    final = evaluate(model, loaders[report_split], device, amp=cfg.train.amp)
    method = cfg.adapter.method
    results = {"zero-shot": zero_shot, "NEARL" if method == "nearl" else method: final}
    save_adapters(model, out, {"trained_on": str(data), "epochs": cfg.train.epochs, **extra}, overwrite=overwrite)
    _write_history(out / "history.csv", history)
    (out / "metrics.json").write_text(json.dumps({"split": report_split, **results, **extra}, indent=2))
    print(f"\n{report_split} metrics after {cfg.train.epochs} epochs ({time.perf_counter() - start:.1f}s):")
    print(format_metrics(results))
    if extra:
        p = extra["privacy"]
        print(f"\ndifferential privacy: epsilon {p['epsilon']:.3f} at delta {p['dp-delta']:.2g} "
              f"({p['dp-steps']} DP steps, sample rate {p['dp-sample-rate']:.4g}, "
              f"noise multiplier {p['dp-noise-multiplier']:.4f}); ledger {out / privacy.STATE_FILE}")
    print(f"\nadapters saved to {out}")
    return results


def _train_private(model: FrozenCLIP, loaders: dict, cfg: NearlConfig, device: torch.device,
                   out: Path) -> tuple[list[dict], dict]:
    train_loader = loaders["train"]
    state = privacy.open_privacy_state(out, cfg.privacy, n_train=len(train_loader.dataset),
                                       batch_size=cfg.train.batch_size, epochs=cfg.train.epochs, rounds=1)
    history = privacy.train_private_round(model, train_loader, cfg, device, state, val_loader=loaders["val"],
                                          state_dir=out)
    return history, state.report()


def model_from_adapters(adapters: Path, pretrained: str | None = None) -> FrozenCLIP:
    """Rebuild the exact model an adapter folder was trained with, then load it (checked).

    The folder is read (and its checksum verified) once; its metadata says how to build the model.
    """
    state, meta = read_adapters(adapters)
    raw = meta.get("config")
    if not isinstance(raw, dict):
        raise AdapterFileError(f"{adapters}: metadata has no config; re-export the adapters with nearl train")
    if pretrained is not None:
        raw = {**raw, "model": {**raw["model"], "pretrained": pretrained}}
    cfg = from_dict(raw, source=f"{adapters}/adapters.json")
    model = build_model(cfg, tuple(meta["classes"]))
    check_compatible(meta, model, source=str(adapters))
    set_adapter_state(model, state)
    return model


def evaluate_folder(adapters: Path, data: Path, *, split: str | None = None, pretrained: str | None = None) -> dict:
    model = model_from_adapters(adapters, pretrained)
    site = load_site(model.cfg, data)
    split = split or ("test" if "test" in site.splits else "val")
    device = select_device(model.cfg.train.device)
    model.to(device)
    loader = make_loader(site.samples(split), model.preprocess, model.cfg.train, device, shuffle=False)
    with finite_outputs(model, adapters):
        metrics = evaluate(model, loader, device, amp=model.cfg.train.amp)
    print(f"{split} split of {data}: {metrics['examples']} images")
    return metrics


@torch.no_grad()
def predict(adapters: Path, images: Sequence[Path], *, pretrained: str | None = None) -> list[dict]:
    model = model_from_adapters(adapters, pretrained)
    device = select_device(model.cfg.train.device)
    model.to(device).eval()
    rows = []
    for path in images:
        if not Path(path).is_file():
            raise NearlError(f"image {path} not found; check the path")
        x = model.preprocess(load_image(path)).unsqueeze(0).to(device)
        with finite_outputs(model, adapters):
            logits = model(x).logits
        probs = torch.softmax(logits.float(), dim=-1)[0].cpu()
        rows.append({"image": str(path), "class": model.classes[int(probs.argmax())],
                     "probabilities": {c: round(float(p), 4) for c, p in zip(model.classes, probs)}})
    return rows


@contextmanager
def finite_outputs(model: FrozenCLIP, adapters: Path) -> Iterator[None]:
    """Raise :class:`ModelOutputError` as soon as ``model`` returns a NaN or infinite logit.

    Softmax turns such logits into NaN probabilities that would be printed as a
    prediction, and scikit-learn refuses them with a traceback; neither says that the
    adapters (or the backbone weights) are what is broken.
    """
    def check(_module: torch.nn.Module, _inputs: Any, output: Any) -> None:
        if not bool(torch.isfinite(output.logits).all()):
            raise ModelOutputError(
                f"adapters {adapters} give NaN or infinite outputs, so there is no prediction to report; "
                "their training diverged or the weights are damaged: retrain (e.g. with a lower train.lr) "
                "or use other adapters, and check --pretrained"
            )

    handle = model.register_forward_hook(check)
    try:
        yield
    finally:
        handle.remove()


def format_metrics(columns: dict[str, dict[str, float]]) -> str:
    """Rows = metrics (+ per-class recall), one column per model."""
    names = list(columns)
    keys = list(METRIC_NAMES) + sorted(k for k in next(iter(columns.values())) if k.startswith("recall/"))
    fmt = lambda v: "   n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:6.3f}"
    lines = [f"{'metric':<24}" + "".join(f"{n:>12}" for n in names)]
    lines.append("-" * len(lines[0]))
    for k in keys:
        lines.append(f"{k:<24}" + "".join(f"{fmt(columns[n].get(k)):>12}" for n in names))
    return "\n".join(lines)


def format_predictions(rows: list[dict]) -> str:
    return "\n".join(
        f"{r['image']}: {r['class']}  (" + ", ".join(f"{c} {p:.3f}" for c, p in r["probabilities"].items()) + ")"
        for r in rows
    )


def _write_history(path: Path, history: list[dict]) -> None:
    if not history:
        return
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(history[0]))
        writer.writeheader()
        writer.writerows(history)
