"""The cross-field checks of a NEARL config and the allowed values they test against.

Kept apart from :mod:`nearl_core.config` (the dataclasses and the YAML/override reading)
so each file reads on its own; :func:`nearl_core.config.from_dict` calls :func:`validate`
on every config it builds.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from nearl_core.errors import ConfigError

if TYPE_CHECKING:
    from nearl_core.config import NearlConfig, PrivacyConfig

TEXT_CONDITIONING = ("per-image", "shared")
# adapter.method: NEARL and the methods it is measured against (docs/methods.md)
METHODS = ("nearl", "coop", "clip-adapter", "lora", "linear-probe", "full-ft")
COOP_INIT = ("random", "template")
FULL_FT_DP_REFUSAL = (
    "adapter.method full-ft cannot train under DP-SGD: per-sample gradients of the backbone's own attention "
    "layers would need Opacus to replace them, which changes open_clip's outputs; use lora or another method"
)
ACCOUNTANTS = ("rdp", "prv")
SCHEDULES = ("round", "federation")  # train.schedule: see TrainConfig
LOSSES = ("ce", "logit-adjusted", "balanced")  # train.loss: see nearl_core.train.SiteLoss


def validate(cfg: NearlConfig, source: str = "config") -> None:
    """Cross-field checks that a type alone cannot express."""
    a, t = cfg.adapter, cfg.train
    checks = [
        (a.method in METHODS, f"adapter.method '{a.method}' is unknown; valid methods: {', '.join(METHODS)}"),
        (not (a.method == "full-ft" and cfg.privacy.enabled), FULL_FT_DP_REFUSAL),
        (a.coop_tokens >= 1 and a.coop_init in COOP_INIT,
         f"adapter.coop-tokens must be >= 1 and adapter.coop-init one of {', '.join(COOP_INIT)}"),
        (a.clip_adapter_reduction >= 1 and 0 <= a.clip_adapter_ratio <= 1,
         "adapter.clip-adapter-reduction must be >= 1 and adapter.clip-adapter-ratio in [0, 1]"),
        (a.lora_rank >= 1 and a.lora_alpha > 0, "adapter.lora-rank must be >= 1 and adapter.lora-alpha > 0"),
        (a.text_conditioning in TEXT_CONDITIONING, f"adapter.text-conditioning must be one of {TEXT_CONDITIONING}"),
        (a.queries >= 1 and a.width >= 1 and a.rank >= 1, "adapter.queries, width and rank must be >= 1"),
        (a.heads >= 1 and a.width % a.heads == 0 and a.rank % a.heads == 0,
         f"adapter.heads ({a.heads}) must divide adapter.width ({a.width}) and adapter.rank ({a.rank})"),
        (a.ortho_lambda >= 0, "adapter.ortho-lambda must be >= 0"),
        (t.epochs >= 0 and t.batch_size >= 1, "train.epochs must be >= 0 and train.batch-size >= 1"),
        (t.micro_batch >= 0, "train.micro-batch must be >= 0 (0: the whole batch at once)"),
        (t.lr > 0, "train.lr must be > 0"),
        (0 <= t.warmup_frac < 1, "train.warmup-frac must be in [0, 1)"),
        (t.schedule in SCHEDULES, f"train.schedule must be one of {', '.join(SCHEDULES)}"),
        (t.loss in LOSSES and t.logit_tau >= 0, f"train.loss must be one of {', '.join(LOSSES)} "
                                                 "and train.logit-tau >= 0"),
        (t.device in ("auto", "cpu", "cuda", "mps") or t.device.startswith("cuda:"),
         "train.device must be auto, cpu, cuda, cuda:N or mps"),
        (len(cfg.task.templates) >= 1 and all("{class}" in x for x in cfg.task.templates),
         "every task.templates entry must contain '{class}'"),
        (len(set(cfg.task.classes)) == len(cfg.task.classes), "task.classes has duplicates"),
        (cfg.federation.finetune_epochs >= 0, "federation.finetune-epochs must be >= 0"),
        (not (t.keep_optimizer and cfg.privacy.enabled),
         "train.keep-optimizer is not available under DP-SGD (each DP round starts its optimizer afresh); "
         "turn one of them off"),
        *_privacy_checks(cfg.privacy),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(f"{source}: {message}")


def _privacy_checks(p: PrivacyConfig) -> list[tuple[bool, str]]:
    positive = lambda v: v is None or v > 0
    checks = [
        (p.accountant in ACCOUNTANTS, f"privacy.accountant must be one of {ACCOUNTANTS}"),
        (p.max_grad_norm > 0, "privacy.max-grad-norm must be > 0"),
        (p.delta is None or 0 < p.delta < 1, "privacy.delta must be in (0, 1), or none for the default rule"),
        (positive(p.target_epsilon), "privacy.target-epsilon must be > 0"),
        (positive(p.noise_multiplier), "privacy.noise-multiplier must be > 0"),
        (positive(p.max_epsilon), "privacy.max-epsilon must be > 0"),
        (p.target_epsilon is None or p.noise_multiplier is None,
         "set privacy.target-epsilon or privacy.noise-multiplier, not both"),
        (p.target_epsilon is None or p.max_epsilon is None or p.target_epsilon <= p.max_epsilon,
         "privacy.target-epsilon must not exceed privacy.max-epsilon"),
    ]
    if p.enabled:
        checks.append((p.target_epsilon is not None or p.noise_multiplier is not None,
                       "privacy.enabled needs privacy.target-epsilon or privacy.noise-multiplier"))
    return checks
