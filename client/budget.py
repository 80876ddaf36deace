"""A site's privacy ledger for one piece of work: open it, check the steps, run DP-SGD within it.

Every step a site takes on its data under DP goes through here: a federated round's
local epochs (:mod:`client.task`) and the final fine-tuning of a personalized model
(:mod:`client.personal`), so the ledger in the site's state dir counts them all.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from client.binding import SiteBinding
from nearl_core.config import NearlConfig
from nearl_core.model import NearlCLIP
from nearl_protocol import keys


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
        return {**self.state.report(), keys.DP_DECLINED: 1.0, keys.DP_MAX_EPSILON: float(self.ceiling),
                keys.DP_EPSILON_NEXT: float(self.state.epsilon_after(self.steps))}


def round_budget(binding: SiteBinding, cfg: NearlConfig, n_train: int, epochs: int, total_rounds: int,
                 log, *, work_epochs: int | None = None) -> RoundBudget:
    """Open the site's ledger (it lives on the site's disk across rounds and restarts) and check the work.

    A new ledger plans its noise for ``total_rounds`` x ``epochs`` local epochs plus the
    final fine-tuning (``federation.finetune-epochs``); the work checked now is
    ``work_epochs`` (default: one round's ``epochs``).  The ceiling is the lower of the
    site's own ``--max-epsilon`` and the federation config's: the server can lower a
    site's budget, never raise it.
    """
    from nearl_core.privacy import budget_ceiling, check_budget, open_privacy_state, steps_for

    state_dir = binding.privacy_dir()
    state = open_privacy_state(state_dir, cfg.privacy, n_train=n_train, batch_size=cfg.train.batch_size,
                               epochs=epochs, rounds=total_rounds, extra_epochs=cfg.federation.finetune_epochs,
                               log=log)
    ceiling = budget_ceiling(cfg.privacy, site_max_epsilon=binding.max_epsilon)
    steps = steps_for(n_train, cfg.train.batch_size, epochs if work_epochs is None else work_epochs)
    return RoundBudget(state, state_dir, ceiling, steps, check_budget(state, steps, max_epsilon=ceiling))


def private_round(model: NearlCLIP, loader, cfg: NearlConfig, device: torch.device, budget: RoundBudget,
                   epochs: int, log, window: tuple[int, int] | None = None) -> list[dict]:
    """DP-SGD for this work, within the budget; the ledger is saved even if it is interrupted.

    FedProx's proximal term is not applied under DP (it would bypass per-sample clipping).
    """
    from nearl_core.privacy import train_private_round

    return train_private_round(model, loader, cfg, device, budget.state, epochs=epochs, state_dir=budget.state_dir,
                               max_epsilon=budget.ceiling, log=log, window=window)
