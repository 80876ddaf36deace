"""Local optimisation and evaluation of the adapters, shared by every entry point.

``nearl train`` (centralized / local-only baselines), each federated site per round and
the simulation all call :func:`fit` and :func:`evaluate`, so a federated round and a
local baseline differ only in where the starting adapters come from.
"""

from __future__ import annotations

import contextlib
import math
import random
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from nearl_core.config import LOSSES, NearlConfig, TrainConfig
from nearl_core.data import Sample
from nearl_core.image_cache import image_dataset
from nearl_core.metrics import classification_metrics
from nearl_core.model import FrozenCLIP

Log = Callable[[str], None]


def select_device(preference: str = "auto") -> torch.device:
    """auto picks cuda > mps > cpu; an explicit choice is honoured."""
    if preference != "auto":
        return torch.device(preference)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def make_loader(samples: Sequence[Sample], transform, cfg: TrainConfig, device: torch.device,
                *, shuffle: bool, seed: int = 0) -> DataLoader:
    """Workers and pinned memory on CUDA, plain in-process loading on CPU."""
    on_gpu = device.type == "cuda"
    workers = cfg.num_workers if cfg.num_workers or not on_gpu else 4
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(image_dataset(samples, transform, in_process=workers == 0), batch_size=cfg.batch_size, shuffle=shuffle,
                      num_workers=workers, pin_memory=on_gpu, generator=generator,
                      persistent_workers=workers > 0)


def autocast(device: torch.device, enabled: bool):
    """bf16 autocast on CUDA; a no-op elsewhere (CPU bf16 is slower than fp32 here)."""
    if enabled and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


@dataclass(frozen=True)
class SiteLoss:
    """The training loss of one site, shaped by the site's own label counts (which never leave it).

    ``logit-adjusted`` (Menon et al. 2021) adds ``tau * log prior`` to the logits during
    training only, so the model learns the label-balanced posterior instead of the site's
    skewed one; ``balanced`` weighs each sample by ``1 / count(class)`` (normalised to
    mean 1 over the site's samples).  Both act per sample, so the batch loss stays a mean of
    per-sample terms and DP-SGD's per-sample clipping is unaffected.
    """

    logit_bias: torch.Tensor | None = None
    class_weight: torch.Tensor | None = None

    @classmethod
    def of(cls, kind: str, counts: Sequence[int], tau: float = 1.0) -> "SiteLoss":
        if kind == "ce":
            return cls()
        n = torch.tensor([float(c) for c in counts]).clamp_min(1.0)  # an absent class: a count of 1, not -inf
        if kind == "logit-adjusted":
            return cls(logit_bias=tau * torch.log(n / n.sum()))
        if kind == "balanced":
            weight = 1.0 / n
            return cls(class_weight=weight * n.sum() / (weight * n).sum())
        raise ValueError(f"train.loss '{kind}' is unknown; choose one of {', '.join(LOSSES)}")

    def __call__(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if self.logit_bias is not None:
            logits = logits + self.logit_bias.to(logits.device)
        if self.class_weight is None:
            return F.cross_entropy(logits, labels)
        per_sample = F.cross_entropy(logits, labels, reduction="none")
        return (per_sample * self.class_weight.to(logits.device)[labels]).mean()


PLAIN_LOSS = SiteLoss()


def site_loss(cfg: TrainConfig, samples: Sequence[Sample], num_classes: int) -> SiteLoss:
    """The configured loss (``train.loss``) for these training samples."""
    if cfg.loss == "ce":
        return PLAIN_LOSS
    counts = np.bincount([s.label for s in samples], minlength=num_classes)
    return SiteLoss.of(cfg.loss, counts.tolist(), cfg.logit_tau)


def loss_fn(model: FrozenCLIP, images: torch.Tensor, labels: torch.Tensor, ortho_lambda: float,
            criterion: SiteLoss = PLAIN_LOSS):
    """The site's loss (cross-entropy unless ``train.loss`` says otherwise) plus the orthogonal regulariser.

    Returns (loss, logits); the logits are the model's own, without any training-time adjustment.
    """
    out = model(images)
    loss = criterion(out.logits.float(), labels)
    if ortho_lambda > 0:
        loss = loss + ortho_lambda * out.ortho
    return loss, out.logits


def chunks(n: int, micro_batch: int) -> list[slice]:
    """Slices of at most ``micro_batch`` samples covering 0..n (one slice when 0 or >= n)."""
    size = n if micro_batch <= 0 else micro_batch
    return [slice(start, min(start + size, n)) for start in range(0, n, max(size, 1))]


def backward(model: FrozenCLIP, images: torch.Tensor, labels: torch.Tensor, ortho_lambda: float, *,
             micro_batch: int = 0, device: torch.device | None = None, amp: bool = True,
             criterion: SiteLoss = PLAIN_LOSS):
    """Forward and backward of one batch, optionally in micro-batches; returns (loss, logits), detached.

    With ``micro_batch`` < batch size, each chunk's loss is weighted by its share of the
    batch before its backward, so the accumulated gradients are those of the whole
    batch's mean loss (cross-entropy and the orthogonal term are both means over
    samples, and no trainable path mixes samples: docs/architecture.md, "Privacy constraint"); only the
    activations of one chunk are alive at a time.  Without it, one plain step.
    """
    device = images.device if device is None else device
    parts = chunks(len(labels), micro_batch)
    if len(parts) == 1:
        with autocast(device, amp):
            loss, logits = loss_fn(model, images, labels, ortho_lambda, criterion)
        loss.backward()
        return loss.detach(), logits.detach()
    total, all_logits = 0.0, []
    for part in parts:
        share = (part.stop - part.start) / len(labels)
        with autocast(device, amp):
            loss, logits = loss_fn(model, images[part], labels[part], ortho_lambda, criterion)
        (loss * share).backward()
        total = total + loss.detach() * share
        all_logits.append(logits.detach())
    return total, torch.cat(all_logits)


def warmup_cosine(optimizer: torch.optim.Optimizer, total_steps: int, warmup_frac: float, offset: int = 0):
    """Linear warm-up then cosine decay over ``total_steps``; the first step taken is step ``offset``.

    A federated site with ``train.schedule: federation`` passes the steps of the rounds
    before this one as ``offset`` and the whole federation's steps as ``total_steps``, so
    the sites follow one schedule across rounds instead of restarting it every round.
    """
    warmup = max(1, int(total_steps * warmup_frac)) if warmup_frac > 0 else 0

    def factor(local_step: int) -> float:
        step = local_step + offset
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total_steps - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def make_optimizer(model: FrozenCLIP, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW over adapter parameters only (the rule in model.is_adapter_param froze the rest)."""
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def make_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig, steps: int,
                   window: tuple[int, int] | None = None):
    """Warm-up + cosine over this call's ``steps``, or over ``window`` = (offset, total) of a longer run."""
    offset, total = window if window is not None else (0, steps)
    return warmup_cosine(optimizer, max(1, total), cfg.warmup_frac, offset)


def schedule_window(cfg: TrainConfig, server_round: int, total_rounds: int, round_steps: int
                    ) -> tuple[int, int] | None:
    """Where a federated round sits in ``train.schedule: federation`` (None: restart every round)."""
    if cfg.schedule != "federation" or total_rounds < 1:
        return None
    return (max(0, min(server_round, total_rounds) - 1) * round_steps, total_rounds * round_steps)


@dataclass
class EpochStats:
    loss: float
    accuracy: float
    examples: int
    seconds: float


def run_epoch(model: FrozenCLIP, loader: DataLoader, optimizer: torch.optim.Optimizer, scheduler, device: torch.device,
              *, ortho_lambda: float = 0.0, amp: bool = True, micro_batch: int = 0,
              criterion: SiteLoss = PLAIN_LOSS) -> EpochStats:
    """One pass over the loader; the backbone stays in eval mode throughout."""
    model.train()
    start, total_loss, correct, seen = time.perf_counter(), 0.0, 0, 0
    for images, labels in loader:
        if len(labels) == 0:  # Poisson sampling (DP) can draw an empty batch
            continue
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        optimizer.zero_grad(set_to_none=True)
        loss, logits = backward(model, images, labels, ortho_lambda, micro_batch=micro_batch, device=device, amp=amp,
                                criterion=criterion)
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        total_loss += loss.item() * len(labels)
        correct += (logits.argmax(-1) == labels).sum().item()
        seen += len(labels)
    return EpochStats(total_loss / max(seen, 1), correct / max(seen, 1), seen, time.perf_counter() - start)


def fit(model: FrozenCLIP, train_loader: DataLoader, cfg: NearlConfig, device: torch.device, *,
        val_loader: DataLoader | None = None, epochs: int | None = None, log: Log | None = print,
        window: tuple[int, int] | None = None, optimizer: torch.optim.Optimizer | None = None) -> list[dict]:
    """Train the adapters for ``epochs`` (default cfg.train.epochs); returns one dict per epoch.

    The loss is ``train.loss`` over the loader's own samples; ``window`` = (steps already
    taken, total steps) places this call inside a longer schedule (:func:`schedule_window`);
    a caller that keeps the optimizer's moments across calls (``train.keep-optimizer``)
    passes its own ``optimizer`` (from :func:`make_optimizer`).
    """
    t = cfg.train
    epochs = t.epochs if epochs is None else epochs
    optimizer = optimizer if optimizer is not None else make_optimizer(model, t)
    scheduler = make_scheduler(optimizer, t, epochs * len(train_loader), window)
    criterion = site_loss(t, getattr(train_loader.dataset, "samples", ()), len(model.classes))
    history = []
    for epoch in range(1, epochs + 1):
        stats = run_epoch(model, train_loader, optimizer, scheduler, device, ortho_lambda=cfg.adapter.ortho_lambda,
                          amp=t.amp, micro_batch=t.micro_batch, criterion=criterion)
        row = epoch_row(epoch, stats, model, val_loader, device, amp=t.amp)
        history.append(row)
        if log:
            log(_epoch_line(row, epochs))
    return history


def epoch_row(epoch: int, stats: EpochStats, model: FrozenCLIP, val_loader: DataLoader | None,
              device: torch.device, *, amp: bool = True) -> dict:
    """One history row: the epoch's training stats plus validation metrics when a loader is given."""
    row = {"epoch": epoch, "train_loss": stats.loss, "train_accuracy": stats.accuracy,
           "examples": stats.examples, "seconds": stats.seconds}
    if val_loader is not None:
        val = evaluate(model, val_loader, device, amp=amp)
        row.update({"val_loss": val["loss"], "val_accuracy": val["accuracy"],
                    "val_balanced_accuracy": val["balanced_accuracy"]})
    return row


def _epoch_line(row: dict, epochs: int) -> str:
    line = f"epoch {row['epoch']}/{epochs}  loss {row['train_loss']:.4f}  acc {row['train_accuracy']:.3f}"
    if "val_accuracy" in row:
        line += f"  val_loss {row['val_loss']:.4f}  val_acc {row['val_accuracy']:.3f}"
        line += f"  val_bal_acc {row['val_balanced_accuracy']:.3f}"
    return line + f"  ({row['examples']} images, {row['seconds']:.1f}s)"


@torch.no_grad()
def predict_logits(model: FrozenCLIP, loader: DataLoader, device: torch.device, *, amp: bool = True):
    """(N, C) logits and (N,) labels over a loader, in loader order."""
    model.eval()
    all_logits, all_labels = [], []
    for images, labels in loader:
        with autocast(device, amp):
            all_logits.append(model(images.to(device)).logits.float().cpu())
        all_labels.append(labels)
    if not all_logits:
        return torch.empty(0, len(model.classes)), torch.empty(0, dtype=torch.long)
    return torch.cat(all_logits), torch.cat(all_labels)


def evaluate(model: FrozenCLIP, loader: DataLoader, device: torch.device, *, amp: bool = True) -> dict[str, float]:
    """Loss, accuracy, balanced accuracy, macro-F1, AUROC, per-class recall and example count."""
    logits, labels = predict_logits(model, loader, device, amp=amp)
    metrics = classification_metrics(logits, labels, model.classes)
    metrics["loss"] = float(F.cross_entropy(logits, labels)) if len(labels) else math.nan
    metrics["examples"] = int(len(labels))
    return metrics
