"""Classification metrics a clinical reader expects, computed from logits and labels.

Balanced accuracy and macro-F1 matter more than accuracy on skewed hospital data; AUROC
is one-vs-rest on the softmax probabilities and is left out (NaN) when the split does
not contain both positives and negatives for any class.
"""

from __future__ import annotations

import math
import warnings
from typing import Sequence

import numpy as np
import torch

METRIC_NAMES = ("accuracy", "balanced_accuracy", "macro_f1", "auroc")


def classification_metrics(logits: torch.Tensor, labels: torch.Tensor, classes: Sequence[str]) -> dict[str, float]:
    """accuracy, balanced_accuracy, macro_f1, auroc and recall/<class> from (N, C) logits."""
    # imported here, not with the module: scikit-learn costs about 2.5 s and 170 MiB to import,
    # and a train-only process (every Flower ClientApp message starts one) never needs it
    from sklearn.metrics import f1_score, recall_score

    y = labels.cpu().numpy()
    prob = torch.softmax(logits.float(), dim=-1).cpu().numpy()
    pred = prob.argmax(axis=1)
    idx = list(range(len(classes)))
    out = {"accuracy": float((pred == y).mean()) if len(y) else math.nan}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # classes absent from a small site split are expected
        present = sorted(set(y.tolist()))
        out["balanced_accuracy"] = float(recall_score(y, pred, labels=present, average="macro", zero_division=0))
        out["macro_f1"] = float(f1_score(y, pred, labels=idx, average="macro", zero_division=0))
        out["auroc"] = _auroc(y, prob, idx)
        recalls = recall_score(y, pred, labels=idx, average=None, zero_division=0)
    for i, (c, r) in enumerate(zip(classes, recalls)):
        out[f"recall/{c}"] = float(r) if i in present else math.nan
    return out


def _auroc(y: np.ndarray, prob: np.ndarray, idx: list[int]) -> float:
    """Macro one-vs-rest AUROC over the classes that have both positives and negatives."""
    from sklearn.metrics import roc_auc_score

    scores = [roc_auc_score(y == c, prob[:, c]) for c in idx if 0 < (y == c).sum() < len(y)]
    return float(np.mean(scores)) if scores else math.nan


def weighted_mean(values: Sequence[float], weights: Sequence[float]) -> float:
    """Example-weighted mean ignoring NaN entries (e.g. AUROC of a one-class site)."""
    pairs = [(v, w) for v, w in zip(values, weights) if not math.isnan(v) and w > 0]
    total = sum(w for _, w in pairs)
    return sum(v * w for v, w in pairs) / total if total else math.nan

