"""The verdict's local-only model: what this site gets by training alone, trained once per data and config.

A hospital weighing the federation asks "could we have done as well on our own?".  The
answer is a model trained only on the site's own training images for as many epochs as a
federated site trains (rounds x local epochs), from the same initial adapters and with the
same training config, evaluated on the same split as the federation's model.

Training it costs about as much as the site's whole share of the federation, so it is done
once per data and config and reused by later runs: ``<state-dir>/local-baseline/<key>/``
(an ordinary adapter folder, plus ``privacy.json`` under DP), where ``key`` hashes

* the site's training index: every training image's path (relative to the site folder),
  class, size and modification time, so added, removed, relabelled or replaced images
  give a new key, while a re-scan of the same files does not;
* the run's config as the coordinator sent it, without its ``federation`` section (which
  decides what is shared, not how a site trains alone), the epochs, the backbone's
  fingerprint, and under DP the site's own epsilon ceiling.

Under DP (the run's ``privacy.enabled``) the model is trained with DP-SGD under the same
privacy config, with its own ledger in its cache folder (never the site's ledger, which
counts the federation's steps): at most the same epsilon as the federation's target.  When
that cannot be met (e.g. a fixed noise multiplier that would pass the site's ceiling) the
model is skipped with the reason.  Without DP it is trained without DP, whatever the
coordinator's other settings (server-side DP, secure aggregation) were.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

from nearl_core.data import SiteData

BASELINE_DIR = "local-baseline"
KEY_VERSION = 1  # raise when what the key covers changes
Log = Callable[[str], None]


def data_digest(site: SiteData, split: str = "train") -> str:
    """sha256 of a split's index: relative path, class, size and mtime of every image, in index order."""
    digest = hashlib.sha256()
    for sample in site.samples(split):
        stat = sample.path.stat()
        try:
            name = sample.path.relative_to(site.root).as_posix()
        except ValueError:  # a manifest may point outside the folder
            name = sample.path.as_posix()
        digest.update(f"{name}\0{site.classes[sample.label]}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def cache_key(data: str, nearl_config: Mapping[str, Any], *, epochs: int, backbone: str,
              dp_ceiling: float | None = None) -> str:
    """The cache folder's name: the first 24 hex digits of the sha256 of what decides the local model."""
    config = {k: v for k, v in nearl_config.items() if k != "federation"}
    record = {"version": KEY_VERSION, "data": data, "config": config, "epochs": int(epochs), "backbone": backbone,
              "dp_ceiling": dp_ceiling}
    return hashlib.sha256(json.dumps(record, sort_keys=True, default=str).encode()).hexdigest()[:24]


@dataclass
class Baseline:
    """The local-only model of one verdict, or why there is none."""

    status: str  # "trained", "reused" or "skipped"
    key: str
    epochs: int
    folder: Path | None = None
    seconds: float = 0.0  # training time (the run that trained it)
    epsilon: float | None = None  # its own ledger's epsilon (DP runs)
    reason: str | None = None  # why it was skipped
    model: Any = None  # the NearlCLIP, None when skipped

    def facts(self) -> dict[str, Any]:
        """What the verdict's JSON records about it (``local_baseline``)."""
        return {"status": self.status, "reason": self.reason, "cache_key": self.key, "epochs": self.epochs,
                "folder": str(self.folder) if self.folder else None, "train_seconds": round(self.seconds, 3),
                "epsilon": self.epsilon}


def skipped(key: str, epochs: int, reason: str) -> Baseline:
    return Baseline("skipped", key, epochs, reason=reason)


def local_only(cfg, site: SiteData, device, *, state_dir: Path, key: str, epochs: int,
               max_epsilon: float | None, log: Log) -> Baseline:
    """The cached local-only model for ``key``, else train it now (and cache it)."""
    folder = state_dir / BASELINE_DIR / key
    cached = _reuse(cfg, folder, device, key, epochs, log)
    if cached is not None:
        return cached
    return _train(cfg, site, device, folder, key, epochs, max_epsilon, log)


def fresh_model(cfg, device):
    """The initial adapters, drawn from ``train.seed`` as the coordinator's round 0 and the simulation's arms are."""
    from client.task import cached_backbone
    from nearl_core.model import build_model
    from nearl_core.train import seed_everything

    seed_everything(cfg.train.seed)
    return build_model(cfg, cfg.task.classes, backbone=cached_backbone(cfg.model)).to(device)


def _reuse(cfg, folder: Path, device, key: str, epochs: int, log: Log) -> Baseline | None:
    from nearl_core.adapter_io import load_adapters
    from nearl_core.errors import NearlError

    if not (folder / "adapters.json").is_file():
        return None
    model = fresh_model(cfg, device)
    try:
        meta = load_adapters(model, folder)
    except (NearlError, ValueError, OSError) as err:
        log(f"local-only baseline: cache {folder} not reused ({str(err).splitlines()[0]}); training it again")
        shutil.rmtree(folder, ignore_errors=True)
        return None
    log(f"local-only baseline: reused {folder} (trained {meta.get('trained_at', '?')}, key {key})")
    return Baseline("reused", key, epochs, folder, float(meta.get("train_seconds", 0.0)),
                    meta.get("epsilon"), model=model.eval())


def _train(cfg, site: SiteData, device, folder: Path, key: str, epochs: int, max_epsilon: float | None,
           log: Log) -> Baseline:
    """Train in a scratch folder and rename it into the cache: an interrupted training leaves no cache entry."""
    from nearl_core.adapter_io import save_adapters
    from nearl_core.errors import NearlError
    from nearl_core.train import fit, make_loader

    t0 = time.perf_counter()
    model = fresh_model(cfg, device)
    loader = make_loader(site.samples("train"), model.preprocess, cfg.train, device, shuffle=True,
                         seed=cfg.train.seed)
    scratch = folder.with_name(f".{folder.name}.training")
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    epsilon = None
    try:
        if cfg.privacy.enabled:
            epsilon = _train_private(model, loader, cfg, device, scratch, epochs, max_epsilon, log)
        else:
            fit(model, loader, cfg, device, epochs=epochs, log=None)
    except NearlError as err:  # e.g. the DP budget cannot be met
        shutil.rmtree(scratch, ignore_errors=True)
        reason = str(err).splitlines()[0]
        log(f"local-only baseline: not trained: {reason}")
        return skipped(key, epochs, reason)
    seconds = time.perf_counter() - t0
    save_adapters(model, scratch, {"local_baseline": True, "cache_key": key, "epochs": epochs,
                                   "train_seconds": seconds, "epsilon": epsilon,
                                   "trained_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}, overwrite=True)
    shutil.rmtree(folder, ignore_errors=True)
    scratch.replace(folder)
    log(f"local-only baseline: trained {epochs} epoch(s) on {len(loader.dataset)} images in {seconds:.1f}s; "
        f"cached in {folder}")
    return Baseline("trained", key, epochs, folder, seconds, epsilon, model=model.eval())


def _train_private(model, loader, cfg, device, ledger_dir: Path, epochs: int, max_epsilon: float | None,
                   log: Log) -> float:
    """DP-SGD for ``epochs`` with a new ledger of its own in ``ledger_dir``; returns the epsilon it spent."""
    from nearl_core.privacy import budget_ceiling, plan_privacy, train_private_round

    state = plan_privacy(cfg.privacy, n_train=len(loader.dataset), batch_size=cfg.train.batch_size, epochs=epochs,
                         rounds=1, log=log)
    state.save(ledger_dir)
    train_private_round(model, loader, cfg, device, state, epochs=epochs, state_dir=ledger_dir,
                        max_epsilon=budget_ceiling(cfg.privacy, site_max_epsilon=max_epsilon), log=None)
    return float(state.epsilon)
