"""Sample-level differential privacy at one site: Opacus DP-SGD on the adapters only.

What is private-trained, and how:

* Only the module holding the method's trainable parameters (``model.adapters``; see
  ``is_adapter_param``) gets Opacus' per-sample-gradient hooks (``GradSampleHooks``,
  attached in place, no wrapper, so parameter names and the model object stay as they
  are).  The frozen open_clip backbone is never wrapped, validated, "fixed" or replaced:
  Opacus would swap its ``nn.MultiheadAttention`` for ``DPMultiheadAttention``, which
  changes open_clip's outputs (opacus issue 774).  Adapter layers are ``nn.Linear`` and
  ``nn.LayerNorm`` (Opacus' own samplers) plus two tiny parameter modules
  (``QueryTokens``, ``ScaleGate``) that Opacus handles through ``torch.func``.
* Where class text depends on trainable parameters but not on the image (NEARL's
  ``shared`` mode, CoOp, LoRA: ``model.shared_text``), the text branch is run once per
  sample (``model.per_sample_text``) so that every hooked layer sees the sample batch first.
* Batches are Poisson-sampled (``DPDataLoader``): each image joins each step with
  probability q = 1 / ceil(N / batch-size), and there are ceil(N / batch-size) steps per
  epoch.  An empty batch still takes a noise-only step, and that step is accounted.
* Per-sample gradients are clipped to ``max-grad-norm`` (flat clipping over all adapter
  parameters) and Gaussian noise of std ``noise-multiplier * max-grad-norm`` is added
  (``DPOptimizer``, in its floating-point-attack resistant noise mode).

Accounting covers the whole federation, not one round: :class:`PrivacyState` holds the
accountant's history (noise multiplier, sample rate, steps) and is written atomically to
``<state_dir>/privacy.json`` after every round (and after an interrupted one), so a
restarted client continues the same budget.  With a target epsilon the noise multiplier
is computed once, for the planned number of local steps over all rounds, and reused.
Before a round, :func:`check_budget` tells whether that round's steps would push epsilon
past the site's own ceiling.

No Flower and no MLflow in here: the federation client calls these functions.
"""

from __future__ import annotations

import functools
import json
import math
import os
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import torch
from opacus.accountants import create_accountant
from opacus.accountants.utils import get_noise_multiplier
from opacus.data_loader import DPDataLoader
from opacus.grad_sample import GradSampleHooks
from opacus.optimizers import DPOptimizer
from opacus.validators import ModuleValidator
from torch.utils.data import DataLoader

from nearl_core.config import FULL_FT_DP_REFUSAL, NearlConfig, PrivacyConfig
from nearl_core.errors import ConfigError, NearlError
from nearl_core.model import FrozenCLIP, is_adapter_param
from nearl_core.train import (PLAIN_LOSS, EpochStats, SiteLoss, _epoch_line, chunks, epoch_row, loss_fn, make_optimizer,
                              make_scheduler, site_loss)

STATE_FILE = "privacy.json"
STATE_VERSION = 1
DEFAULT_DELTA = 1e-5
Log = Callable[[str], None]


class PrivacyBudgetExceeded(NearlError):
    """This round's DP steps would push the site's epsilon past its own ceiling."""


# -- plan ----------------------------------------------------------------------------------
def default_delta(n_train: int) -> float:
    """The delta rule: min(1e-5, 1 / (10 N)), always well below 1/N for N training images."""
    if n_train < 1:
        raise ConfigError("differential privacy needs at least one training image at this site")
    return min(DEFAULT_DELTA, 1.0 / (10 * n_train))


def steps_per_epoch(n_train: int, batch_size: int) -> int:
    """Poisson-sampled steps per epoch: ceil(N / batch-size), as Opacus derives from a loader."""
    return max(1, math.ceil(n_train / batch_size))


def sample_rate_for(n_train: int, batch_size: int) -> float:
    """q = 1 / steps-per-epoch: the expected batch is N / ceil(N / batch-size) <= batch-size."""
    return 1.0 / steps_per_epoch(n_train, batch_size)


def steps_for(n_train: int, batch_size: int, epochs: int) -> int:
    """DP steps of one round of ``epochs`` local epochs (what :func:`check_budget` takes)."""
    return epochs * steps_per_epoch(n_train, batch_size)


def epsilon_of(history: Iterable[Iterable[float]], delta: float, accountant: str = "rdp") -> float:
    """Epsilon of an accountant history [(noise multiplier, sample rate, steps), ...] at delta."""
    entries = tuple((float(s), float(q), int(n)) for s, q, n in history if int(n) > 0)
    return _epsilon(entries, float(delta), accountant) if entries else 0.0


@functools.lru_cache(maxsize=256)
def _epsilon(history: tuple[tuple[float, float, int], ...], delta: float, accountant: str) -> float:
    # RDP at fractional orders costs ~1 s on a small CPU: the pre-round check and the
    # end-of-round sync ask for the same history, so remember it
    acc = create_accountant(mechanism=accountant)
    acc.history = list(history)
    return float(acc.get_epsilon(delta=delta))


def budget_ceiling(pcfg: PrivacyConfig, site_max_epsilon: float | None = None) -> float:
    """The epsilon a site never passes: max-epsilon, else target-epsilon, else none (inf).

    ``site_max_epsilon`` is the site's own limit (e.g. ``nearl-client --max-epsilon``): the
    result is the lower of the two, so a config that came from the server can lower a
    site's ceiling but never raise it.
    """
    if pcfg.max_epsilon is not None:
        ceiling = pcfg.max_epsilon
    else:
        ceiling = pcfg.target_epsilon if pcfg.target_epsilon is not None else math.inf
    return ceiling if site_max_epsilon is None else min(ceiling, site_max_epsilon)


# -- state ---------------------------------------------------------------------------------
@dataclass
class PrivacyState:
    """A site's privacy ledger across the whole federation (persisted as privacy.json).

    ``history`` is the Opacus accountant history: [noise multiplier, sample rate, steps]
    entries, consecutive equal (sigma, q) merged.  ``epsilon`` is at ``delta`` and only
    ever grows.
    """

    accountant: str
    delta: float
    noise_multiplier: float
    sample_rate: float
    max_grad_norm: float
    n_train: int
    target_epsilon: float | None = None
    planned_steps: int | None = None  # the steps the noise multiplier was planned for
    history: list[list[float]] = field(default_factory=list)
    epsilon: float = 0.0
    rounds: int = 0  # DP rounds trained (or interrupted after spending steps)
    version: int = STATE_VERSION

    # ---- numbers ----
    @property
    def steps(self) -> int:
        """Total DP steps so far, over all rounds."""
        return int(sum(n for _, _, n in self.history))

    def make_accountant(self):
        """A fresh Opacus accountant that carries this state's history."""
        acc = create_accountant(mechanism=self.accountant)
        acc.history = [(float(s), float(q), int(n)) for s, q, n in self.history]
        return acc

    def epsilon_after(self, extra_steps: int, *, sample_rate: float | None = None,
                      noise_multiplier: float | None = None) -> float:
        """Epsilon if ``extra_steps`` more DP steps were taken (no state change)."""
        q = self.sample_rate if sample_rate is None else sample_rate
        sigma = self.noise_multiplier if noise_multiplier is None else noise_multiplier
        history = self.history + ([[sigma, q, int(extra_steps)]] if extra_steps > 0 else [])
        return max(self.epsilon, epsilon_of(history, self.delta, self.accountant))

    def record_steps(self, steps: int, *, sample_rate: float | None = None,
                     noise_multiplier: float | None = None) -> float:
        """Account ``steps`` DP steps (as Opacus' accountant would) and return the new epsilon."""
        acc = self.make_accountant()
        q = self.sample_rate if sample_rate is None else sample_rate
        sigma = self.noise_multiplier if noise_multiplier is None else noise_multiplier
        for _ in range(int(steps)):
            acc.step(noise_multiplier=sigma, sample_rate=q)
        self.sync(acc)
        return self.epsilon

    def sync(self, acc) -> None:
        """Take an accountant's history (it only ever grows) and refresh epsilon."""
        history = [[float(s), float(q), int(n)] for s, q, n in acc.history]
        if sum(n for _, _, n in history) < self.steps:
            raise NearlError("privacy accountant lost steps; refusing to under-report epsilon")
        self.history = history
        self.epsilon = max(self.epsilon, epsilon_of(history, self.delta, self.accountant))

    def report(self) -> dict[str, float]:
        """The per-round metrics a site replies with (kebab-case, scalars only)."""
        return {"epsilon": float(self.epsilon), "dp-steps": self.steps, "dp-sample-rate": float(self.sample_rate),
                "dp-noise-multiplier": float(self.noise_multiplier), "dp-delta": float(self.delta)}

    # ---- persistence ----
    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "steps": self.steps}

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any], source: str = "privacy state") -> "PrivacyState":
        try:
            known = {k: raw[k] for k in cls.__dataclass_fields__ if k in raw}
            state = cls(**known)
            state.history = [[float(s), float(q), int(n)] for s, q, n in state.history]
        except (TypeError, ValueError, KeyError) as err:
            raise NearlError(f"{source}: not a privacy state ({err}); restore it from a backup, "
                             "never delete it while adapters trained on this data are in use") from None
        if state.version != STATE_VERSION:
            raise NearlError(f"{source}: privacy state version {state.version}, this NEARL reads {STATE_VERSION}")
        if "steps" in raw and int(raw["steps"]) != state.steps:
            raise NearlError(f"{source}: steps ({raw['steps']}) disagree with the accountant history "
                             f"({state.steps}); the file was edited or corrupted")
        state.epsilon = max(float(state.epsilon), epsilon_of(state.history, state.delta, state.accountant))
        return state

    def save(self, state_dir: str | Path) -> Path:
        """Write ``<state_dir>/privacy.json`` atomically (temp file, fsync, rename)."""
        state_dir = Path(state_dir)
        state_dir.mkdir(parents=True, exist_ok=True)
        path = state_dir / STATE_FILE
        tmp = state_dir / f".{STATE_FILE}.{os.getpid()}.tmp"
        with open(tmp, "w") as fh:
            json.dump({**self.to_dict(), "updated": time.strftime("%Y-%m-%dT%H:%M:%S%z")}, fh, indent=2)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, state_dir: str | Path) -> "PrivacyState | None":
        """The state saved in ``state_dir``, or None when there is none yet."""
        path = Path(state_dir) / STATE_FILE
        if not path.is_file():
            return None
        try:
            raw = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise NearlError(f"{path}: unreadable privacy state ({err}); restore it from a backup") from None
        return cls.from_dict(raw, source=str(path))


def plan_privacy(pcfg: PrivacyConfig, *, n_train: int, batch_size: int, epochs: int, rounds: int = 1,
                 extra_epochs: int = 0, log: Log | None = None) -> PrivacyState:
    """A fresh state; with a target epsilon, the noise multiplier for rounds x epochs (+ extra_epochs) of steps.

    ``extra_epochs``: a site's final fine-tuning (personalization), planned into the same budget.
    """
    if pcfg.target_epsilon is None and pcfg.noise_multiplier is None:
        raise ConfigError("privacy needs privacy.target-epsilon (--dp-epsilon) or privacy.noise-multiplier")
    delta = pcfg.delta if pcfg.delta is not None else default_delta(n_train)
    if delta >= 1.0 / n_train:
        raise ConfigError(f"privacy.delta {delta:g} is not below 1/N = {1.0 / n_train:g} for this site's "
                          f"{n_train} training images; use a smaller delta or leave it unset")
    q = sample_rate_for(n_train, batch_size)
    planned = max(1, rounds) * steps_for(n_train, batch_size, epochs) + steps_for(n_train, batch_size, extra_epochs)
    if pcfg.noise_multiplier is not None:
        sigma, planned_steps = pcfg.noise_multiplier, None
    else:
        try:
            sigma = get_noise_multiplier(target_epsilon=pcfg.target_epsilon, target_delta=delta, sample_rate=q,
                                         steps=planned, accountant=pcfg.accountant)
        except ValueError as err:
            raise ConfigError(f"privacy.target-epsilon {pcfg.target_epsilon:g} cannot be reached over "
                              f"{planned} steps ({err}); raise it or plan fewer rounds/epochs") from None
        planned_steps = planned
        if log:
            log(f"privacy: noise multiplier {sigma:.4f} planned for epsilon {pcfg.target_epsilon:g} at delta "
                f"{delta:.2g} over {planned} DP steps ({rounds} round(s) x {epochs} epoch(s)"
                + (f" + {extra_epochs} fine-tuning epoch(s)" if extra_epochs else "") + f", sample rate {q:.4g})")
    return PrivacyState(accountant=pcfg.accountant, delta=delta, noise_multiplier=float(sigma), sample_rate=q,
                        max_grad_norm=pcfg.max_grad_norm, n_train=n_train, target_epsilon=pcfg.target_epsilon,
                        planned_steps=planned_steps)


def open_privacy_state(state_dir: str | Path, pcfg: PrivacyConfig, *, n_train: int, batch_size: int,
                       epochs: int, rounds: int = 1, extra_epochs: int = 0, log: Log | None = print) -> PrivacyState:
    """Restore the site's ledger from ``state_dir`` (a restart continues it), or plan and save one.

    A restored state keeps its accountant, delta and planned noise multiplier: changing
    them mid-federation would make the earlier steps' epsilon incomparable.  An explicit
    ``noise-multiplier`` in the config is honoured from now on (the history stays exact).
    """
    state = PrivacyState.load(state_dir)
    if state is None:
        state = plan_privacy(pcfg, n_train=n_train, batch_size=batch_size, epochs=epochs, rounds=rounds,
                             extra_epochs=extra_epochs, log=log)
        state.save(state_dir)
        return state
    where = Path(state_dir) / STATE_FILE
    if pcfg.accountant != state.accountant:
        raise ConfigError(f"{where} is accounted with '{state.accountant}'; set privacy.accountant: "
                          f"{state.accountant} (an accountant cannot change mid-federation)")
    if pcfg.delta is not None and not math.isclose(pcfg.delta, state.delta, rel_tol=1e-12):
        raise ConfigError(f"{where} is accounted at delta {state.delta:g}, not {pcfg.delta:g}; "
                          "keep the delta for the whole federation")
    if pcfg.noise_multiplier is not None and pcfg.noise_multiplier != state.noise_multiplier:
        if log:
            log(f"privacy: noise multiplier {state.noise_multiplier:g} -> {pcfg.noise_multiplier:g} from now on")
        state.noise_multiplier = float(pcfg.noise_multiplier)
    elif pcfg.target_epsilon is not None and pcfg.target_epsilon != state.target_epsilon and log:
        log(f"privacy: keeping the noise multiplier {state.noise_multiplier:.4f} planned for epsilon "
            f"{state.target_epsilon}; a new target needs a new state directory")
    q = sample_rate_for(n_train, batch_size)
    if n_train != state.n_train or q != state.sample_rate:
        if log:
            log(f"privacy: sample rate {state.sample_rate:.4g} -> {q:.4g} ({state.n_train} -> {n_train} training "
                f"images, batch size {batch_size}); the accountant keeps both")
        state.n_train, state.sample_rate = n_train, q
    if state.delta >= 1.0 / n_train and log:
        log(f"privacy: warning: delta {state.delta:g} is not below 1/N for the current {n_train} images")
    state.max_grad_norm = pcfg.max_grad_norm
    if log:
        log(f"privacy: continuing {where}: epsilon {state.epsilon:.3f} after {state.steps} DP steps "
            f"({state.rounds} round(s))")
    return state


def check_budget(state: PrivacyState, steps: int, *, max_epsilon: float,
                 sample_rate: float | None = None) -> str | None:
    """None if ``steps`` more DP steps keep epsilon within ``max_epsilon``, else the reason to decline."""
    after = state.epsilon_after(steps, sample_rate=sample_rate)
    if after <= max_epsilon + 1e-12:
        return None
    return (f"privacy budget: this round's {steps} DP steps would raise epsilon from {state.epsilon:.3f} to "
            f"{after:.3f} (delta {state.delta:.2g}), above this site's max-epsilon {max_epsilon:g}; "
            "declining to train")


# -- training ------------------------------------------------------------------------------
def _generator(device: torch.device | str, seed: int | None) -> torch.Generator:
    """Fresh OS entropy by default: a known seed would let anyone replay the noise."""
    seed = int.from_bytes(os.urandom(8), "little") if seed is None else seed
    try:
        gen = torch.Generator(device=device)
    except RuntimeError:
        gen = torch.Generator()
    return gen.manual_seed(seed)


def check_private_model(model: FrozenCLIP) -> list[torch.nn.Parameter]:
    """The trainable parameters, refusing a model where anything but the adapters trains."""
    if model.method == "full-ft":
        raise NearlError(FULL_FT_DP_REFUSAL)
    outside = [n for n, p in model.named_parameters() if p.requires_grad and not is_adapter_param(n, model.method)]
    if outside:
        raise NearlError(f"DP-SGD trains the adapters only, but {outside[0]} (and {len(outside) - 1} more) "
                         "outside them require grad; keep the backbone frozen")
    return [p for p in model.adapter_parameters().values() if p.requires_grad]


class PrivateTraining:
    """Opacus attached to one model for one round: per-sample hooks on the adapters, a DP optimizer.

    Use as a context manager; on exit the hooks and every Opacus attribute are removed,
    leaving the model exactly as it was (plus the trained adapter weights).
    """

    def __init__(self, model: FrozenCLIP, optimizer: torch.optim.Optimizer, *, noise_multiplier: float,
                 max_grad_norm: float, sample_rate: float, expected_batch_size: float, accountant=None,
                 noise_seed: int | None = None, criterion: SiteLoss = PLAIN_LOSS):
        self.model = model
        self.criterion = criterion
        self.params = check_private_model(model)
        self._per_sample_text = model.per_sample_text
        model.train()
        model.per_sample_text = model.shared_text
        trainable = model.trainable_module()
        ModuleValidator.validate(trainable, strict=True)  # adapters only: the backbone is never looked at
        self.hooks = GradSampleHooks(trainable, batch_first=True, loss_reduction="mean", strict=True)
        self.hooks.forbid_grad_accumulation()
        device = self.params[0].device
        self.optimizer = DPOptimizer(optimizer, noise_multiplier=noise_multiplier, max_grad_norm=max_grad_norm,
                                     expected_batch_size=expected_batch_size, loss_reduction="mean",
                                     generator=_generator(device, noise_seed), secure_mode=True)
        if accountant is not None:
            self.optimizer.attach_step_hook(accountant.get_optimizer_hook_fn(sample_rate=sample_rate))

    def close(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        for p in self.params:
            if hasattr(p, "summed_grad"):
                del p.summed_grad
        self.hooks.cleanup()
        self.model.per_sample_text = self._per_sample_text

    def __enter__(self) -> "PrivateTraining":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def backward(self, images: torch.Tensor, labels: torch.Tensor, ortho_lambda: float, micro_batch: int = 0):
        """Forward + backward on a non-empty batch, optionally in micro-batches (``train.micro-batch``).

        Each micro-batch's per-sample gradients are clipped and summed into the batch's
        total by a skipped DPOptimizer step (Opacus' virtual-step mechanism: no noise, no
        update, nothing accounted) before the next one runs; :meth:`step` then clips the
        last one, adds the noise once and updates.  Per-sample clipping does not depend
        on the other samples, so the clipped sum, and the step, are those of the whole
        batch.  Returns the batch's mean loss and its logits, detached.
        """
        parts = chunks(len(labels), micro_batch)
        total, all_logits = 0.0, []
        for k, part in enumerate(parts):
            if k:
                self.optimizer.signal_skip_step(True)
                self.step()  # clip + accumulate the previous micro-batch only
            loss, logits = self._backward_once(images[part], labels[part], ortho_lambda)
            total = total + loss.detach() * ((part.stop - part.start) / len(labels))
            all_logits.append(logits.detach())
        return total, torch.cat(all_logits)

    def _backward_once(self, images: torch.Tensor, labels: torch.Tensor, ortho_lambda: float):
        """Forward + backward: fills ``p.grad_sample`` (per-sample gradients) for every adapter parameter."""
        loss, logits = loss_fn(self.model, images, labels, ortho_lambda, self.criterion)
        with warnings.catch_warnings():  # hooked first layers (e.g. QueryTokens) take inputs without grad
            warnings.filterwarnings("ignore", message="Full backward hook is firing")
            loss.backward()
        for p in self.params:  # a parameter no sample reached has zero per-sample gradients
            if getattr(p, "grad_sample", None) is None:
                if p.grad is not None and bool(p.grad.any()):
                    raise NearlError(f"no per-sample gradient for an adapter parameter of shape {tuple(p.shape)} "
                                     "that did get a gradient: a module is used in a way Opacus' hooks miss")
                p.grad_sample = p.new_zeros((len(labels), *p.shape))
        return loss, logits

    def empty_batch(self) -> None:
        """A Poisson batch with no sample: noise-only step (it is accounted like any other)."""
        for p in self.params:
            p.grad_sample = p.new_zeros((0, *p.shape))

    def step(self) -> None:
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)


def clip_per_sample(grad_samples: list[torch.Tensor], max_grad_norm: float) -> list[torch.Tensor]:
    """Flat per-sample clipping exactly as ``DPOptimizer.clip_and_accumulate`` does it (for checks)."""
    norms = torch.stack([g.reshape(len(g), -1).norm(2, dim=-1) for g in grad_samples], dim=1).norm(2, dim=1)
    factor = (max_grad_norm / (norms + 1e-6)).clamp(max=1.0)
    return [torch.einsum("i,i...->i...", factor.to(g.dtype), g) for g in grad_samples]


def poisson_loader(loader: DataLoader, *, seed: int | None = None) -> DPDataLoader:
    """The loader's dataset, Poisson-sampled: q = 1 / len(loader), len(loader) steps per epoch."""
    steps = len(loader)
    dp = DPDataLoader.from_data_loader(loader, generator=_generator("cpu", seed))
    # Opacus sizes an epoch as int(1 / q), which is one short for some N (int(1 / (1 / 93)) == 92)
    dp.batch_sampler.steps = steps
    return dp


def train_private_round(model: FrozenCLIP, train_loader: DataLoader, cfg: NearlConfig, device: torch.device,
                        state: PrivacyState, *, epochs: int | None = None, val_loader: DataLoader | None = None,
                        state_dir: str | Path | None = None, max_epsilon: float | None = None,
                        seed: int | None = None, log: Log | None = print,
                        window: tuple[int, int] | None = None) -> list[dict]:
    """One round (``epochs`` local epochs, default cfg.train.epochs) of DP-SGD on the adapters.

    ``train_loader`` is the site's ordinary training loader (its dataset and batch size
    are used; its order is replaced by Poisson sampling).  The round is refused with
    :class:`PrivacyBudgetExceeded` if it would pass ``max_epsilon`` (default: the
    config's ceiling).  ``state`` is updated, and saved to ``state_dir`` when given, even
    if the round is interrupted.  ``seed`` fixes sampling and noise (experiments only;
    default: OS entropy).  ``window`` and the loss (``train.loss``) are those of
    :func:`nearl_core.train.fit`.  Returns one dict per epoch, like ``fit``, with
    ``epsilon`` and ``dp_steps`` added.
    """
    t, pcfg = cfg.train, cfg.privacy
    epochs = t.epochs if epochs is None else epochs
    n_train, steps = len(train_loader.dataset), len(train_loader)
    q = 1.0 / steps
    ceiling = budget_ceiling(pcfg) if max_epsilon is None else max_epsilon
    reason = check_budget(state, epochs * steps, max_epsilon=ceiling, sample_rate=q)
    if reason:
        raise PrivacyBudgetExceeded(reason)
    state.sample_rate, state.max_grad_norm = q, pcfg.max_grad_norm
    accountant = state.make_accountant()
    optimizer = make_optimizer(model, t)
    scheduler = make_scheduler(optimizer, t, epochs * steps, window)
    criterion = site_loss(t, getattr(train_loader.dataset, "samples", ()), len(model.classes))
    loader = poisson_loader(train_loader, seed=seed)
    history: list[dict] = []
    before = state.steps
    try:
        with PrivateTraining(model, optimizer, noise_multiplier=state.noise_multiplier,
                             max_grad_norm=pcfg.max_grad_norm, sample_rate=q, expected_batch_size=n_train * q,
                             accountant=accountant, noise_seed=None if seed is None else seed + 1,
                             criterion=criterion) as dp:
            for epoch in range(1, epochs + 1):
                stats = _private_epoch(dp, loader, scheduler, device, cfg.adapter.ortho_lambda, t.micro_batch)
                state.sync(accountant)
                row = epoch_row(epoch, stats, model, val_loader, device, amp=t.amp)
                model.train()  # evaluation switched the adapters to eval mode
                row.update({"epsilon": state.epsilon, "dp_steps": state.steps})
                history.append(row)
                if log:
                    log(_epoch_line(row, epochs) + f"  eps {state.epsilon:.3f}")
    finally:
        state.sync(accountant)
        if state.steps > before:
            state.rounds += 1
        if state_dir is not None:
            state.save(state_dir)
    return history


def _private_epoch(dp: PrivateTraining, loader: DPDataLoader, scheduler, device: torch.device,
                   ortho_lambda: float, micro_batch: int = 0) -> EpochStats:
    """One Poisson epoch; fp32 (autocast off) so clipping sees exact per-sample gradients."""
    dp.model.train()
    start, total_loss, correct, seen = time.perf_counter(), 0.0, 0, 0
    for batch in loader:
        labels = batch[1] if len(batch) == 2 else torch.empty(0, dtype=torch.long)
        if len(labels) == 0:
            dp.empty_batch()
        else:
            images, labels = batch[0].to(device, non_blocking=True), labels.to(device, non_blocking=True)
            loss, logits = dp.backward(images, labels, ortho_lambda, micro_batch)
            total_loss += loss.item() * len(labels)
            correct += (logits.argmax(-1) == labels).sum().item()
            seen += len(labels)
        dp.step()
        scheduler.step()
    return EpochStats(total_loss / max(seen, 1), correct / max(seen, 1), seen, time.perf_counter() - start)
