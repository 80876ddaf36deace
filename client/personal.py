"""What a site keeps for itself across rounds: local adapter groups, optimizer moments, its personalized model.

With ``federation.local`` set, the groups named there never leave the site (the shared
schema leaves them out of every reply, and the egress check enforces that schema).  The
site keeps them in ``<state-dir>/local/`` after every round it trains and reads them
back at the next message, so a restart loses nothing; a copy saved under another
federation config, or from a later round than the message's, is not reused.  After the
last round (the final evaluate message) the site fine-tunes the received adapters for
``federation.finetune-epochs`` on its own training data, under its DP ledger when DP is
on, and writes ``<state-dir>/personalized/``: an ordinary adapter folder that
``nearl evaluate`` and ``nearl predict`` load.  With ``train.keep-optimizer`` the site
also keeps its AdamW moments (``<state-dir>/optimizer.pt``, tensors only) and continues
them in the next round instead of starting from zero.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Callable

import torch

from client.binding import SiteBinding
from nearl_core.adapter_io import check_compatible, read_adapters, save_adapters
from nearl_core.errors import AdapterFileError
from nearl_core.model import NearlCLIP
from nearl_core.personalize import config_digest, is_personalized, local_names, state_dirs
from nearl_protocol.messages import Instruction

Log = Callable[[str], None]


def _digest(instruction: Instruction) -> str:
    return config_digest(dict(instruction.nearl_config))


def restore_local(model: NearlCLIP, binding: SiteBinding, instruction: Instruction, log: Log, *,
                  same_round: bool = False) -> bool:
    """Load the site's local groups saved after an earlier round of this federation; False when none apply."""
    local = local_names(model)
    folder = state_dirs(binding.privacy_dir())[0]
    if not local or not folder.is_dir():
        return False
    try:
        state, meta = read_adapters(folder)
        check_compatible(meta, model, source=str(folder))
    except AdapterFileError as err:
        log(f"local adapter groups not reused: {err}")
        return False
    saved = int(meta.get("round", 0))
    newer = saved > instruction.server_round or (saved == instruction.server_round and not same_round)
    if meta.get("federation_config") != _digest(instruction) or newer:
        return False
    params = model.adapter_parameters()
    with torch.no_grad():
        for name in local:
            params[name].copy_(state[name].to(dtype=params[name].dtype, device=params[name].device))
    return True


def keep_local(model: NearlCLIP, binding: SiteBinding, instruction: Instruction) -> Path | None:
    """Save the site's adapters after this round (the local groups are what is read back)."""
    if not local_names(model):
        return None
    folder = state_dirs(binding.privacy_dir())[0]
    return save_adapters(model, folder, extra={"round": instruction.server_round,
                                               "federation_config": _digest(instruction)}, overwrite=True)


OPTIMIZER_FILE = "optimizer.pt"


def site_optimizer(model: NearlCLIP, binding: SiteBinding, instruction: Instruction, log: Log
                   ) -> torch.optim.Optimizer | None:
    """The round's optimizer with the moments of this federation's earlier rounds (None: not kept)."""
    from nearl_core.train import make_optimizer

    cfg = model.cfg.train
    if not cfg.keep_optimizer:
        return None
    optimizer = make_optimizer(model, cfg)
    path = binding.privacy_dir() / OPTIMIZER_FILE
    if path.is_file() and instruction.server_round > 1:
        try:
            saved = torch.load(path, map_location="cpu", weights_only=True)
            if saved.get("federation_config") == _digest(instruction):
                state = optimizer.state_dict()
                state["state"] = saved["state"]  # the moments only: the learning rate is this round's
                optimizer.load_state_dict(state)
        except (OSError, RuntimeError, ValueError, KeyError, pickle.UnpicklingError) as err:  # a bad file: start afresh
            log(f"optimizer moments not reused ({str(err).splitlines()[0]}); starting from zero")
    return optimizer


def keep_optimizer(optimizer: torch.optim.Optimizer | None, binding: SiteBinding, instruction: Instruction) -> None:
    if optimizer is None:
        return
    path = binding.privacy_dir() / OPTIMIZER_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save({"state": optimizer.state_dict()["state"], "federation_config": _digest(instruction)}, tmp)
    tmp.replace(path)


def wants_personal_model(model: NearlCLIP, instruction: Instruction) -> bool:
    """Personalization is configured and this is the final evaluation: the adapters the federation keeps."""
    return is_personalized(model) and instruction.final_evaluation


def write_personal_model(model: NearlCLIP, binding: SiteBinding, instruction: Instruction, *,
                         finetuned_epochs: int) -> Path:
    """``<state-dir>/personalized/``: the site's final adapters in the adapter file format."""
    folder = state_dirs(binding.privacy_dir())[1]
    return save_adapters(model, folder, extra={"round": instruction.server_round, "personalized": True,
                                               "local_groups": list(model.cfg.federation.local),
                                               "finetune_epochs": finetuned_epochs}, overwrite=True)
