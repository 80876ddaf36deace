"""What a site does with one message: read the instruction, check the backbone, train or evaluate, reply.

The ClientApp handlers in :mod:`client.app` are thin wrappers over :func:`train_reply`
and :func:`evaluate_reply`; the simulation's app calls the same two with its own
:class:`client.binding.SiteBinding`.  :func:`answer` is the one way out: the reply passes
:func:`client.egress.check_reply`, and its audit line is on disk before it is returned.
A site refuses (an error reply with one readable reason, nothing else) when its backbone
differs from the coordinator's, when the coordinator refuses this node, or when a reply
would break the egress rules.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import time
import zlib
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Mapping

import numpy as np
import torch
from flwr.app import Context, Message

from client import audit, personal, site_report
from client.budget import private_round, round_budget
from client.binding import SiteBinding, site_binding
from client.egress import EgressError, check_reply, check_reply_size, pack_outgoing
from nearl_core.adapter_io import set_shared_state, shared_schema, shared_state
from nearl_core.backbone import Backbone, build_backbone
from nearl_core.config import ModelConfig, NearlConfig, from_dict
from nearl_core.data import SiteData, infer_classes, scan_site
from nearl_core.errors import DataError, NearlError
from nearl_core.fingerprint import model_fingerprint
from nearl_core.model import NearlCLIP, build_model
from nearl_core.transport import check_transport, encode, widen_flat, wire_schema
from nearl_core.train import evaluate, fit, make_loader, schedule_window, seed_everything, select_device
from nearl_protocol import keys
from nearl_protocol.flat import FlatLayout
from nearl_protocol.messages import Instruction, build_reply, instruction_adapters, read_instruction, refusal

log = logging.getLogger("nearl.site")


class SiteRefusal(NearlError):
    """The site will not carry out this instruction (e.g. another backbone); the reason is sent back."""


def site_config(instruction: Instruction, binding: SiteBinding | None = None) -> NearlConfig:
    """The federation's NEARL config as sent by the ServerApp, with the site's local device/weights path."""
    cfg = from_dict(instruction.nearl_config, source="federation config")
    if binding is not None and binding.pretrained:
        cfg = replace(cfg, model=replace(cfg.model, pretrained=binding.pretrained))
    if binding is not None and binding.device:
        cfg = replace(cfg, train=replace(cfg.train, device=binding.device))
    return cfg


def config_from_message(msg: Message, binding: SiteBinding | None = None) -> NearlConfig:
    return site_config(read_instruction(msg), binding)


@functools.lru_cache(maxsize=2)
def cached_backbone(model_cfg: ModelConfig) -> Backbone:
    """The frozen CLIP, built once per process (a simulation actor serves many rounds and sites)."""
    return build_backbone(model_cfg)


@functools.lru_cache(maxsize=8)
def cached_site(root: Path, classes: tuple[str, ...]) -> SiteData:
    """The site index; nearl-client verified every image before the node joined, so no re-decode here.

    The classes are the coordinator's (its resolved config): a site folder holding another
    class is refused in one line, one lacking some of them is told so and trains on the rest.
    """
    held = infer_classes(root)
    named = ", ".join(classes)
    extra = [c for c in held if c not in classes]
    if extra:
        raise DataError(f"site folder {root} holds class {', '.join(map(repr, extra))}, which the federation's "
                        f"config does not name (its classes: {named}); rename or remove it, or ask the "
                        "coordinator to add it to task.classes")
    lacking = [c for c in classes if c not in held]
    if lacking:
        log.warning("site folder %s has no training images of %s (the federation's classes: %s); it trains on "
                    "the others", root, ", ".join(lacking), named)
    return scan_site(root, classes, verify=False)


def build_site_model(cfg: NearlConfig, msg: Message | None, device: torch.device,
                     transport: str = "float32") -> NearlCLIP:
    """The site's model with the global adapters the instruction carries.

    They arrive as one flat array in the transport dtype; it is read against this model's
    own layout of the shared tensors (the coordinator's stated layout must be the same),
    widened and split.  Groups the federation keeps local keep their values.
    """
    model = build_model(cfg, cfg.task.classes, backbone=cached_backbone(cfg.model))
    if msg is not None:
        schema = shared_schema(model)
        flat = instruction_adapters(msg, FlatLayout.of(wire_schema(schema, transport)))
        if flat is not None:
            wide = FlatLayout.of(schema).split(np.array(widen_flat(flat, transport)))
            set_shared_state(model, {k: torch.from_numpy(v) for k, v in wide.items()})
    return model.to(device)


def check_backbone(model: NearlCLIP, instruction: Instruction) -> None:
    """Refuse to train or evaluate on a backbone other than the coordinator's."""
    have = model_fingerprint(model)
    if instruction.backbone and instruction.backbone != have:
        raise SiteRefusal(f"{keys.BACKBONE_MISMATCH}: expected {instruction.backbone}, have {have}")


def _prefixed(metrics: Mapping[str, float], prefix: str) -> dict[str, float]:
    """``evaluate()``'s metrics as wire keys: ``eval-accuracy``, ``eval-recall/normal``, ``eval-examples``."""
    return {keys.wire_metric(prefix, k): (int(v) if k == "examples" else float(v))
            for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def _loader(site: SiteData, split: str, model: NearlCLIP, cfg: NearlConfig, device: torch.device, *, seed: int = 0):
    return make_loader(site.samples(split), model.preprocess, cfg.train, device, shuffle=(split == "train"),
                       seed=seed)


@dataclass
class Outcome:
    """What a handler produced: the scalar metrics, the adapters to send (train) and the ledger's epsilon."""

    metrics: dict[str, float]
    model: NearlCLIP | None = None
    transport: str = "float32"
    eps_before: float | None = None
    eps_after: float | None = None


def _proximal_hooks(model: NearlCLIP, mu: float) -> list:
    """FedProx: grad of (mu/2)||w - w_global||^2 added to every adapter gradient."""
    handles = []
    for p in model.parameters():
        if p.requires_grad:
            anchor = p.detach().clone()
            handles.append(p.register_hook(lambda g, p=p, a=anchor: g + mu * (p.detach() - a)))
    return handles


def _train(msg: Message, instruction: Instruction, binding: SiteBinding, log: Callable[[str], None]) -> Outcome:
    """Evaluate the incoming global adapters (optional), train locally; the metrics and adapters to send."""
    t0 = time.perf_counter()
    cfg = site_config(instruction, binding)
    device = select_device(cfg.train.device)
    site = cached_site(binding.data, cfg.task.classes)
    n_train = len(site.samples("train"))
    transport = check_transport(instruction.transport)
    builds_before = cached_backbone.cache_info().misses
    model = build_site_model(cfg, msg, device, transport)
    check_backbone(model, instruction)
    personal.restore_local(model, binding, instruction, log)
    budget = (round_budget(binding, cfg, n_train, instruction.local_epochs, instruction.total_rounds, log)
              if cfg.privacy.enabled else None)
    eps_before = float(budget.state.epsilon) if budget is not None else None
    metrics: dict[str, float] = worker_metrics(builds_before)
    if instruction.evaluate_first:
        metrics.update(_prefixed(evaluate(model, _loader(site, "val", model, cfg, device), device,
                                          amp=cfg.train.amp), keys.EVAL_PREFIX))
    if budget is not None and budget.decline:
        log(budget.decline)
        metrics.update({keys.NUM_EXAMPLES: n_train, **budget.declined_metrics()})
        return Outcome(metrics, None, transport, eps_before, eps_before)  # no arrays: nothing was trained
    seed = site_seed(cfg, instruction.server_round, binding.site)
    seed_everything(seed)
    loader = _loader(site, "train", model, cfg, device, seed=seed)
    window = schedule_window(cfg.train, instruction.server_round, instruction.total_rounds,
                             instruction.local_epochs * len(loader))
    if budget is not None:
        history = private_round(model, loader, cfg, device, budget, instruction.local_epochs, log, window)
    else:
        handles = _proximal_hooks(model, instruction.proximal_mu) if instruction.proximal_mu > 0 else []
        optimizer = personal.site_optimizer(model, binding, instruction, log)
        try:
            history = fit(model, loader, cfg, device, epochs=instruction.local_epochs, log=log, window=window,
                          optimizer=optimizer)
            personal.keep_optimizer(optimizer, binding, instruction)
        finally:
            for h in handles:
                h.remove()
    personal.keep_local(model, binding, instruction)
    last = history[-1] if history else {"train_loss": math.nan, "train_accuracy": math.nan}
    metrics.update({keys.NUM_EXAMPLES: n_train, keys.TRAIN_LOSS: float(last["train_loss"]),
                    keys.TRAIN_ACCURACY: float(last["train_accuracy"]),
                    keys.TRAIN_SECONDS: time.perf_counter() - t0})
    if budget is not None:
        metrics.update(budget.state.report())  # the ledger: keys.LEDGER
    return Outcome(metrics, model, transport, eps_before, float(budget.state.epsilon) if budget else None)


def site_seed(cfg: NearlConfig, step: int, site: str) -> int:
    """This site's seed for one round (or the fine-tuning after the last): the same run gives the same update."""
    return cfg.train.seed + 1000 * step + zlib.crc32(site.encode()) % 1000


def worker_metrics(builds_before: int) -> dict[str, float]:
    """Which process answered, how many backbones it has built, whether this message found one cached."""
    builds = cached_backbone.cache_info().misses
    return {keys.WORKER_PID: os.getpid(), keys.WORKER_BUILDS: builds,
            keys.WORKER_WARM: 1 if builds == builds_before else 0}


def _evaluate(msg: Message, instruction: Instruction, binding: SiteBinding, log: Callable[[str], None]) -> Outcome:
    """Val metrics of the global adapters in the message (the federation's validation); in the final
    evaluation, of the adapters the federation keeps, also test (when the site has one) and personalization.

    The test split is read once per federation, for the kept adapters only: choosing a round
    by its test metrics would make them an optimistic estimate.
    """
    cfg = site_config(instruction, binding)
    device = select_device(cfg.train.device)
    site = cached_site(binding.data, cfg.task.classes)
    model = build_site_model(cfg, msg, device, check_transport(instruction.transport))
    check_backbone(model, instruction)
    personal.restore_local(model, binding, instruction, log, same_round=True)
    val = _prefixed(evaluate(model, _loader(site, "val", model, cfg, device), device, amp=cfg.train.amp),
                    keys.EVAL_PREFIX)
    metrics: dict[str, float] = {keys.NUM_EXAMPLES: int(val.pop(keys.EVAL_EXAMPLES)), **val}
    if instruction.final_evaluation and "test" in site.splits:
        metrics.update(_prefixed(evaluate(model, _loader(site, "test", model, cfg, device), device,
                                          amp=cfg.train.amp), keys.TEST_PREFIX))
    log(f"evaluated the global adapters: val accuracy {metrics.get('eval-accuracy', math.nan):.3f}")
    if personal.wants_personal_model(model, instruction):
        metrics.update(_personalize(model, site, cfg, device, binding, instruction, log))
    return Outcome(metrics)


def _personalize(model: NearlCLIP, site: SiteData, cfg: NearlConfig, device: torch.device, binding: SiteBinding,
                 instruction: Instruction, log: Callable[[str], None]) -> dict[str, float]:
    """The site's final model: fine-tune (``federation.finetune-epochs``, DP-SGD under the ledger when DP is on),
    write ``<state-dir>/personalized/`` and report its metrics on the site's test split (val without one)."""
    epochs = cfg.federation.finetune_epochs
    if epochs > 0:
        seed = site_seed(cfg, instruction.total_rounds + 1, binding.site)  # the step after the last round
        seed_everything(seed)
        loader = _loader(site, "train", model, cfg, device, seed=seed)
        if cfg.privacy.enabled:
            budget = round_budget(binding, cfg, len(loader.dataset), instruction.local_epochs,
                                  instruction.total_rounds, log, work_epochs=epochs)
            if budget.decline:
                log(f"personalization: no fine-tuning: {budget.decline}")
                epochs = 0
            else:
                private_round(model, loader, cfg, device, budget, epochs, log)
        else:
            fit(model, loader, cfg, device, epochs=epochs, log=log)
    folder = personal.write_personal_model(model, binding, instruction, finetuned_epochs=epochs)
    split = "test" if "test" in site.splits else "val"
    result = evaluate(model, _loader(site, split, model, cfg, device), device, amp=cfg.train.amp)
    log(f"personalized adapters ({epochs} fine-tuning epoch(s)) in {folder}: {split} accuracy "
        f"{result['accuracy']:.3f}")
    return _prefixed(result, keys.PERSONAL_PREFIX)


def answer(msg: Message, binding: SiteBinding, handler, log=print, reply_with=None) -> Message:
    """Run one handler and return its reply, after the egress check and after the audit line is on disk.

    A refusal (another backbone, a bad config) or a NEARL error goes back as an error reply
    with its one-line reason; either way the audit trail records what left and why.
    """
    server_round = "?"
    started = time.perf_counter()
    try:
        instruction = read_instruction(msg)
        server_round = instruction.server_round
        if instruction.node_refused:
            raise SiteRefusal(f"the coordinator refuses this node: {instruction.node_refused}")
        site_log = lambda line: log(f"[{binding.site}] round {server_round} {line}", flush=True)  # noqa: E731
        outcome = handler(msg, instruction, binding, site_log)
        reply = (reply_with or _reply)(msg, binding, outcome)  # reply_with: a secure round's masked reply
        check_reply_size(reply.content, binding.max_reply_bytes)
    except (NearlError, ValueError) as err:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        log(f"[{binding.site}] round {server_round} refused: {reason}", flush=True)
        outcome, reply = Outcome({}), refusal(msg, reason, site=binding.site)
    line = audit.audit_line(msg, reply, site=binding.site, coordinator=binding.coordinator,
                            server_round=server_round if isinstance(server_round, int) else None,
                            eps_before=outcome.eps_before, eps_after=outcome.eps_after,
                            schema=None if reply_with else _sent_schema(outcome),
                            seconds=time.perf_counter() - started)
    audit.append(binding.audit_file(), line)
    if not reply.has_error() and reply.content.array_records:
        sent = sum(a.numpy().nbytes for a in reply.content[keys.ARRAYS].values())
        log(f"[{binding.site}] round {server_round}: sent {len(outcome.metrics)} metrics and {sent} adapter bytes",
            flush=True)
    return reply


def _sent_schema(outcome: Outcome) -> dict[str, tuple[tuple[int, ...], str]]:
    """The (wire) layout of the adapters a train reply carries; empty when it carries none."""
    return wire_schema(shared_schema(outcome.model), outcome.transport) if outcome.model is not None else {}


def _reply(msg: Message, binding: SiteBinding, outcome: Outcome) -> Message:
    arrays = encode(shared_state(outcome.model), outcome.transport) if outcome.model is not None else None
    schema = _sent_schema(outcome)
    flat = pack_outgoing(arrays, schema) if arrays is not None else None
    reply = build_reply(msg, site=binding.site, metrics=outcome.metrics, adapters=flat)
    check_reply(reply.content, schema, with_arrays=outcome.model is not None)
    return reply


def train_reply(msg: Message, context: Context, log=print, *, binding: SiteBinding | None = None) -> Message:
    """The ClientApp's train handler: evaluate the incoming global adapters, train locally, reply."""
    from client.secagg import masking

    return answer(msg, binding or site_binding(context.node_config), _train, log, masking(msg, context))


def evaluate_reply(msg: Message, context: Context, log=print, *, binding: SiteBinding | None = None) -> Message:
    """The ClientApp's evaluate handler: metrics of the global adapters on the site's val/test splits.

    The run's last one also leaves the site's verdict job, run after this reply has gone (client/site_report.py).
    """
    binding = binding or site_binding(context.node_config)
    reply = answer(msg, binding, _evaluate, log)
    site_report.note_final_evaluate(msg, binding, reply)
    return reply


__all__ = ["train_reply", "evaluate_reply", "site_binding", "SiteBinding", "config_from_message", "EgressError"]
