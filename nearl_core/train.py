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

from nearl_core.config import NearlConfig, TrainConfig
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


def loss_fn(model: FrozenCLIP, images: torch.Tensor, labels: torch.Tensor, ortho_lambda: float):
    """Cross-entropy plus the optional orthogonal regulariser; returns (loss, logits)."""
    out = model(images)
    loss = F.cross_entropy(out.logits.float(), labels)
    if ortho_lambda > 0:
        loss = loss + ortho_lambda * out.ortho
    return loss, out.logits


def chunks(n: int, micro_batch: int) -> list[slice]:
    """Slices of at most ``micro_batch`` samples covering 0..n (one slice when 0 or >= n)."""
    size = n if micro_batch <= 0 else micro_batch
    return [slice(start, min(start + size, n)) for start in range(0, n, max(size, 1))]


def backward(model: FrozenCLIP, images: torch.Tensor, labels: torch.Tensor, ortho_lambda: float, *,
             micro_batch: int = 0, device: torch.device | None = None, amp: bool = True):
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
            loss, logits = loss_fn(model, images, labels, ortho_lambda)
        loss.backward()
        return loss.detach(), logits.detach()
    total, all_logits = 0.0, []
    for part in parts:
        share = (part.stop - part.start) / len(labels)
        with autocast(device, amp):
            loss, logits = loss_fn(model, images[part], labels[part], ortho_lambda)
        (loss * share).backward()
        total = total + loss.detach() * share
        all_logits.append(logits.detach())
    return total, torch.cat(all_logits)


def warmup_cosine(optimizer: torch.optim.Optimizer, total_steps: int, warmup_frac: float):
    warmup = max(1, int(total_steps * warmup_frac)) if warmup_frac > 0 else 0

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total_steps - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def make_optimizer(model: FrozenCLIP, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW over adapter parameters only (the rule in model.is_adapter_param froze the rest)."""
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


@dataclass
class EpochStats:
    loss: float
    accuracy: float
    examples: int
    seconds: float


def run_epoch(model: FrozenCLIP, loader: DataLoader, optimizer: torch.optim.Optimizer, scheduler, device: torch.device,
              *, ortho_lambda: float = 0.0, amp: bool = True, micro_batch: int = 0) -> EpochStats:
    """One pass over the loader; the backbone stays in eval mode throughout."""
    model.train()
    start, total_loss, correct, seen = time.perf_counter(), 0.0, 0, 0
    for images, labels in loader:
        if len(labels) == 0:  # Poisson sampling (DP) can draw an empty batch
            continue
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        optimizer.zero_grad(set_to_none=True)
        loss, logits = backward(model, images, labels, ortho_lambda, micro_batch=micro_batch, device=device, amp=amp)
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        total_loss += loss.item() * len(labels)
        correct += (logits.argmax(-1) == labels).sum().item()
        seen += len(labels)
    return EpochStats(total_loss / max(seen, 1), correct / max(seen, 1), seen, time.perf_counter() - start)


def fit(model: FrozenCLIP, train_loader: DataLoader, cfg: NearlConfig, device: torch.device, *,
        val_loader: DataLoader | None = None, epochs: int | None = None, log: Log | None = print) -> list[dict]:
    """Train the adapters for ``epochs`` (default cfg.train.epochs); returns one dict per epoch."""
    t = cfg.train
    epochs = t.epochs if epochs is None else epochs
    optimizer = make_optimizer(model, t)
    scheduler = warmup_cosine(optimizer, max(1, epochs * len(train_loader)), t.warmup_frac)
    history = []
    for epoch in range(1, epochs + 1):
        stats = run_epoch(model, train_loader, optimizer, scheduler, device,
                          ortho_lambda=cfg.adapter.ortho_lambda, amp=t.amp, micro_batch=t.micro_batch)
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
