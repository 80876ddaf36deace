"""What a site does with one message: bind the site's data, load the global adapters, train/evaluate.

The ClientApp handlers in :mod:`client.app` are thin wrappers over :func:`train_reply`
and :func:`evaluate_reply`.  Everything here reads the site binding from the SuperNode's
node config (``site``, ``data-path``, optionally ``device`` and ``pretrained``) and the
model config from the message (the ServerApp sends the resolved NEARL config, so every
site builds the same model).  Replies pass :func:`client.egress.check_reply` before they
are returned.
"""

from __future__ import annotations

import functools
import json
import math
import time
import zlib
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Mapping

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict

from client.egress import EgressError, check_reply, valid_site_name
from nearl_core.adapter_io import adapter_schema, get_adapter_state, set_adapter_state
from nearl_core.backbone import Backbone, build_backbone
from nearl_core.config import ModelConfig, NearlConfig, from_dict
from nearl_core.data import SiteData, scan_site
from nearl_core.errors import ConfigError
from nearl_core.model import NearlCLIP, build_model
from nearl_core.train import evaluate, fit, make_loader, seed_everything, select_device

CONFIG_KEY = "nearl-config"


@dataclass(frozen=True)
class SiteBinding:
    site: str
    data: Path
    device: str | None = None
    pretrained: str | None = None
    state_dir: Path | None = None  # site-local state (the DP accountant's ledger)
    max_epsilon: float | None = None  # the site's own DP ceiling (nearl-client --max-epsilon)

    def privacy_dir(self) -> Path:
        return self.state_dir or Path.home() / ".nearl" / "sites" / self.site / "state"


def site_binding(node_config: Mapping[str, Any], run_config: Mapping[str, Any] | None = None) -> SiteBinding:
    """The SuperNode's ``--node-config 'site="siteA" data-path="/data/siteA"'``.

    On the Simulation Engine a virtual node only has a ``partition-id``; the simulation
    launcher passes ``sim-data-root`` in the run config and partition k is ``site{k+1}``.
    """
    sim_root = str((run_config or {}).get("sim-data-root", "")).strip()
    if "site" not in node_config and "partition-id" in node_config and sim_root:
        name = f"site{int(node_config['partition-id']) + 1}"
        return SiteBinding(name, Path(sim_root) / name)
    site = str(node_config.get("site", "")).strip()
    data = str(node_config.get("data-path", "")).strip()
    if not valid_site_name(site):
        raise ConfigError(f"node config site={site!r}: start the node with nearl-client --site NAME")
    if not data:
        raise ConfigError(f"site {site}: node config has no data-path; start the node with nearl-client --data DIR")
    device = str(node_config.get("device", "")).strip() or None
    pretrained = str(node_config.get("pretrained", "")).strip() or None
    state_dir = str(node_config.get("state-dir", "")).strip() or None
    max_eps = node_config.get("max-epsilon")
    return SiteBinding(site, Path(data), device, pretrained, Path(state_dir) if state_dir else None,
                       float(max_eps) if max_eps not in (None, "") else None)


def config_from_message(msg: Message, binding: SiteBinding | None = None) -> NearlConfig:
    """The federation's NEARL config as sent by the ServerApp, with the site's local device/weights path."""
    rec = msg.content.config_records.get("config")
    raw = rec.get(CONFIG_KEY) if rec is not None else None
    if not isinstance(raw, str):
        raise ConfigError("the server sent no NEARL config; server and client versions do not match")
    cfg = from_dict(json.loads(raw), source="federation config")
    if binding is not None and binding.pretrained:
        cfg = replace(cfg, model=replace(cfg.model, pretrained=binding.pretrained))
    if binding is not None and binding.device:
        cfg = replace(cfg, train=replace(cfg.train, device=binding.device))
    return cfg


@functools.lru_cache(maxsize=2)
def cached_backbone(model_cfg: ModelConfig) -> Backbone:
    """The frozen CLIP, built once per process (a simulation actor serves many rounds and sites)."""
    return build_backbone(model_cfg)


@functools.lru_cache(maxsize=8)
def cached_site(root: Path, classes: tuple[str, ...]) -> SiteData:
    """The site index; nearl-client verified every image before the node joined, so no re-decode here."""
    return scan_site(root, classes, verify=False)


def build_site_model(cfg: NearlConfig, arrays: ArrayRecord | None, device: torch.device) -> NearlCLIP:
    model = build_model(cfg, cfg.task.classes, backbone=cached_backbone(cfg.model))
    if arrays is not None:
        set_adapter_state(model, arrays.to_torch_state_dict())
    return model.to(device)


def _prefixed(metrics: Mapping[str, float], prefix: str) -> dict[str, float]:
    out = {}
    for k, v in metrics.items():
        if k == "examples":
            out[f"{prefix}_examples"] = int(v)
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            out[f"{prefix}_{k}"] = float(v)
    return out


def _loader(site: SiteData, split: str, model: NearlCLIP, cfg: NearlConfig, device: torch.device, *, seed: int = 0):
    return make_loader(site.samples(split), model.preprocess, cfg.train, device, shuffle=(split == "train"),
                       seed=seed)


def _reply(msg: Message, binding: SiteBinding, metrics: dict[str, float], model: NearlCLIP | None) -> Message:
    records: dict[str, Any] = {"metrics": MetricRecord(metrics), "site": ConfigRecord({"name": binding.site})}
    if model is not None:
        state = {k: v.contiguous() for k, v in get_adapter_state(model).items()}
        records["arrays"] = ArrayRecord(state)
    content = RecordDict(records)
    check_reply(content, adapter_schema(model) if model is not None else {}, with_arrays=model is not None)
    return Message(content=content, reply_to=msg)


def _proximal_hooks(model: NearlCLIP, mu: float) -> list:
    """FedProx: grad of (mu/2)||w - w_global||^2 added to every adapter gradient."""
    handles = []
    for p in model.parameters():
        if p.requires_grad:
            anchor = p.detach().clone()
            handles.append(p.register_hook(lambda g, p=p, a=anchor: g + mu * (p.detach() - a)))
    return handles


def _private_round(model: NearlCLIP, loader, cfg: NearlConfig, device: torch.device, binding: SiteBinding,
                   epochs: int, total_rounds: int, log) -> tuple[list[dict], float]:
    """DP-SGD for this round; the site's accountant lives on the site's disk across rounds and restarts.

    A round that would pass the site's max-epsilon raises PrivacyBudgetExceeded: the site
    declines (the server records it as rejected) instead of silently over-spending.
    FedProx's proximal term is not applied under DP (it would bypass per-sample clipping).
    """
    from nearl_core.privacy import budget_ceiling, open_privacy_state, train_private_round

    state_dir = binding.privacy_dir()
    state = open_privacy_state(state_dir, cfg.privacy, n_train=len(loader.dataset), batch_size=cfg.train.batch_size,
                               epochs=epochs, rounds=total_rounds, log=log)
    ceiling = budget_ceiling(cfg.privacy, site_max_epsilon=binding.max_epsilon)  # the server cannot raise it
    history = train_private_round(model, loader, cfg, device, state, epochs=epochs, state_dir=state_dir,
                                  max_epsilon=ceiling, log=log)
    return history, state.epsilon


def train_reply(msg: Message, context: Context, log=print) -> Message:
    """Evaluate the incoming global adapters (optional), train locally, reply adapters + metrics."""
    t0 = time.perf_counter()
    binding = site_binding(context.node_config, context.run_config)
    cfg = config_from_message(msg, binding)
    config = msg.content.config_records.get("config") or ConfigRecord()
    server_round = int(config.get("server-round", 0))
    epochs = int(config.get("local-epochs", 1))
    device = select_device(cfg.train.device)
    site = cached_site(binding.data, cfg.task.classes)
    model = build_site_model(cfg, msg.content.array_records.get("arrays"), device)
    metrics: dict[str, float] = {}
    if bool(config.get("evaluate-first", False)):
        metrics.update(_prefixed(evaluate(model, _loader(site, "val", model, cfg, device), device,
                                          amp=cfg.train.amp), "eval"))
    seed = cfg.train.seed + 1000 * server_round + zlib.crc32(binding.site.encode()) % 1000
    seed_everything(seed)
    site_log = lambda line: log(f"[{binding.site}] round {server_round} {line}", flush=True)  # noqa: E731
    loader = _loader(site, "train", model, cfg, device, seed=seed)
    epsilon = None
    if cfg.privacy.enabled:
        history, epsilon = _private_round(model, loader, cfg, device, binding, epochs,
                                          int(config.get("total-rounds", 1)), site_log)
    else:
        mu = float(config.get("proximal-mu", 0.0))
        handles = _proximal_hooks(model, mu) if mu > 0 else []
        try:
            history = fit(model, loader, cfg, device, epochs=epochs, log=site_log)
        finally:
            for h in handles:
                h.remove()
    last = history[-1] if history else {"train_loss": math.nan, "train_accuracy": math.nan}
    metrics.update({
        "num-examples": len(site.samples("train")),
        "train_loss": float(last["train_loss"]),
        "train_accuracy": float(last["train_accuracy"]),
        "train_seconds": time.perf_counter() - t0,
    })
    if epsilon is not None:
        metrics["epsilon"] = float(epsilon)
    reply = _reply(msg, binding, metrics, model)
    log(f"[{binding.site}] round {server_round}: sent {len(metrics)} metrics and "
        f"{sum(a.numpy().nbytes for a in reply.content['arrays'].values())} adapter bytes", flush=True)
    return reply


def evaluate_reply(msg: Message, context: Context, log=print) -> Message:
    """Val (and test, when the site has one) metrics of the global adapters in the message."""
    binding = site_binding(context.node_config, context.run_config)
    cfg = config_from_message(msg, binding)
    device = select_device(cfg.train.device)
    site = cached_site(binding.data, cfg.task.classes)
    model = build_site_model(cfg, msg.content.array_records.get("arrays"), device)
    val = _prefixed(evaluate(model, _loader(site, "val", model, cfg, device), device, amp=cfg.train.amp), "eval")
    metrics: dict[str, float] = {"num-examples": int(val.pop("eval_examples")), **val}
    if "test" in site.splits:
        metrics.update(_prefixed(evaluate(model, _loader(site, "test", model, cfg, device), device,
                                          amp=cfg.train.amp), "test"))
    log(f"[{binding.site}] evaluated the global adapters: val accuracy {metrics.get('eval_accuracy', math.nan):.3f}",
        flush=True)
    return _reply(msg, binding, metrics, None)


__all__ = ["train_reply", "evaluate_reply", "site_binding", "config_from_message", "EgressError"]
