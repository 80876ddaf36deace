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
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict

from client.egress import EgressError, check_reply, valid_site_name
from nearl_core.adapter_io import adapter_schema, get_adapter_state, set_adapter_state
from nearl_core.backbone import Backbone, build_backbone
from nearl_core.config import ModelConfig, NearlConfig, from_dict
from nearl_core.data import SiteData, scan_site
from nearl_core.errors import ConfigError
from nearl_core.model import NearlCLIP, build_model
from nearl_core.transport import check_transport, decode, encode, wire_schema
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
    run_config = run_config or {}
    sim_root = str(run_config.get("sim-data-root", "")).strip()
    if "site" not in node_config and "partition-id" in node_config and sim_root:
        return _simulated_site(int(node_config["partition-id"]), run_config)
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


def _simulated_site(partition: int, run_config: Mapping[str, Any]) -> SiteBinding:
    """Virtual site k+1 of a simulation: data, DP ledger and optional own ceiling under the run's folder.

    ``sim-max-epsilon`` ("site2=1.5,site3=4") gives chosen virtual sites a tighter
    budget, as their own ``nearl-client --max-epsilon`` would.
    """
    name = f"site{partition + 1}"
    state_root = str(run_config.get("sim-state-root", "")).strip()
    ceilings = {}
    for item in str(run_config.get("sim-max-epsilon", "")).split(","):
        site, _, value = item.partition("=")
        if site.strip() and value.strip():
            ceilings[site.strip()] = float(value)
    return SiteBinding(name, Path(str(run_config["sim-data-root"])) / name,
                       state_dir=Path(state_root) / name if state_root else None, max_epsilon=ceilings.get(name))


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


def build_site_model(cfg: NearlConfig, arrays: ArrayRecord | None, device: torch.device,
                     transport: str = "float32") -> NearlCLIP:
    """The site's model with the global adapters from the message (widened from the transport dtype)."""
    model = build_model(cfg, cfg.task.classes, backbone=cached_backbone(cfg.model))
    if arrays is not None:
        wide = decode({k: a.numpy() for k, a in arrays.items()}, adapter_schema(model), transport)
        set_adapter_state(model, {k: torch.from_numpy(v) for k, v in wide.items()})
    return model.to(device)


def transport_of(msg: Message) -> str:
    config = msg.content.config_records.get("config") or ConfigRecord()
    return check_transport(str(config.get("transport-dtype", "float32")))


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


def _reply(msg: Message, binding: SiteBinding, metrics: dict[str, float], model: NearlCLIP | None,
           transport: str = "float32") -> Message:
    records: dict[str, Any] = {"metrics": MetricRecord(metrics), "site": ConfigRecord({"name": binding.site})}
    if model is not None:
        wire = encode(get_adapter_state(model), transport)
        records["arrays"] = ArrayRecord({k: Array(v) for k, v in wire.items()})
    content = RecordDict(records)
    schema = wire_schema(adapter_schema(model), transport) if model is not None else {}
    check_reply(content, schema, with_arrays=model is not None)
    return Message(content=content, reply_to=msg)


def _proximal_hooks(model: NearlCLIP, mu: float) -> list:
    """FedProx: grad of (mu/2)||w - w_global||^2 added to every adapter gradient."""
    handles = []
    for p in model.parameters():
        if p.requires_grad:
            anchor = p.detach().clone()
            handles.append(p.register_hook(lambda g, p=p, a=anchor: g + mu * (p.detach() - a)))
    return handles


@dataclass
class RoundBudget:
    """A site's privacy ledger and what this round may spend (checked before any work)."""

    state: Any  # nearl_core.privacy.PrivacyState
    state_dir: Path
    ceiling: float  # the site's epsilon ceiling: the lower of its own and the server's
    steps: int  # DP steps this round would take
    decline: str | None  # why the round must not run, or None

    def declined_metrics(self) -> dict[str, float]:
        """What a declining site reports: its ledger, never an update."""
        return {**self.state.report(), "dp-declined": 1.0, "dp-max-epsilon": float(self.ceiling),
                "dp-epsilon-next": float(self.state.epsilon_after(self.steps))}


def _round_budget(binding: SiteBinding, cfg: NearlConfig, n_train: int, epochs: int, total_rounds: int,
                  log) -> RoundBudget:
    """Open the site's ledger (it lives on the site's disk across rounds and restarts) and check the round.

    The ceiling is the lower of the site's own ``--max-epsilon`` and the federation
    config's: the server can lower a site's budget, never raise it.
    """
    from nearl_core.privacy import budget_ceiling, check_budget, open_privacy_state, steps_for

    state_dir = binding.privacy_dir()
    state = open_privacy_state(state_dir, cfg.privacy, n_train=n_train, batch_size=cfg.train.batch_size,
                               epochs=epochs, rounds=total_rounds, log=log)
    ceiling = budget_ceiling(cfg.privacy, site_max_epsilon=binding.max_epsilon)
    steps = steps_for(n_train, cfg.train.batch_size, epochs)
    return RoundBudget(state, state_dir, ceiling, steps, check_budget(state, steps, max_epsilon=ceiling))


def _private_round(model: NearlCLIP, loader, cfg: NearlConfig, device: torch.device, budget: RoundBudget,
                   epochs: int, log) -> list[dict]:
    """DP-SGD for this round, within the budget; the ledger is saved even if the round is interrupted.

    FedProx's proximal term is not applied under DP (it would bypass per-sample clipping).
    """
    from nearl_core.privacy import train_private_round

    return train_private_round(model, loader, cfg, device, budget.state, epochs=epochs, state_dir=budget.state_dir,
                               max_epsilon=budget.ceiling, log=log)


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
    n_train = len(site.samples("train"))
    site_log = lambda line: log(f"[{binding.site}] round {server_round} {line}", flush=True)  # noqa: E731
    budget = (_round_budget(binding, cfg, n_train, epochs, int(config.get("total-rounds", 1)), site_log)
              if cfg.privacy.enabled else None)
    transport = transport_of(msg)
    model = build_site_model(cfg, msg.content.array_records.get("arrays"), device, transport)
    metrics: dict[str, float] = {}
    if bool(config.get("evaluate-first", False)):
        metrics.update(_prefixed(evaluate(model, _loader(site, "val", model, cfg, device), device,
                                          amp=cfg.train.amp), "eval"))
    if budget is not None and budget.decline:
        site_log(budget.decline)
        metrics.update({"num-examples": n_train, **budget.declined_metrics()})
        return _reply(msg, binding, metrics, None)  # no arrays: nothing was trained
    seed = cfg.train.seed + 1000 * server_round + zlib.crc32(binding.site.encode()) % 1000
    seed_everything(seed)
    loader = _loader(site, "train", model, cfg, device, seed=seed)
    if budget is not None:
        history = _private_round(model, loader, cfg, device, budget, epochs, site_log)
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
        "num-examples": n_train,
        "train_loss": float(last["train_loss"]),
        "train_accuracy": float(last["train_accuracy"]),
        "train_seconds": time.perf_counter() - t0,
    })
    if budget is not None:
        metrics.update(budget.state.report())  # epsilon, dp-steps, dp-sample-rate, dp-noise-multiplier, dp-delta
    reply = _reply(msg, binding, metrics, model, transport)
    log(f"[{binding.site}] round {server_round}: sent {len(metrics)} metrics and "
        f"{sum(a.numpy().nbytes for a in reply.content['arrays'].values())} adapter bytes", flush=True)
    return reply


def evaluate_reply(msg: Message, context: Context, log=print) -> Message:
    """Val (and test, when the site has one) metrics of the global adapters in the message."""
    binding = site_binding(context.node_config, context.run_config)
    cfg = config_from_message(msg, binding)
    device = select_device(cfg.train.device)
    site = cached_site(binding.data, cfg.task.classes)
    model = build_site_model(cfg, msg.content.array_records.get("arrays"), device, transport_of(msg))
    val = _prefixed(evaluate(model, _loader(site, "val", model, cfg, device), device, amp=cfg.train.amp), "eval")
    metrics: dict[str, float] = {"num-examples": int(val.pop("eval_examples")), **val}
    if "test" in site.splits:
        metrics.update(_prefixed(evaluate(model, _loader(site, "test", model, cfg, device), device,
                                          amp=cfg.train.amp), "test"))
    log(f"[{binding.site}] evaluated the global adapters: val accuracy {metrics.get('eval_accuracy', math.nan):.3f}",
        flush=True)
    return _reply(msg, binding, metrics, None)


__all__ = ["train_reply", "evaluate_reply", "site_binding", "config_from_message", "EgressError"]
