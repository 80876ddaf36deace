"""The server's arithmetic on adapters: flat vectors, weighted means summed in float64.

Updates arrive as one flat array each (:mod:`nearl_protocol.flat`) and screening keeps
them as flat float32 vectors in the schema's order, views of the received bytes.  The
global adapters the strategy keeps are named tensors (Flower's strategies, checkpoints
and adapter files want names): :func:`flatten` turns them into one float64 vector (the
guard's reference), :func:`unflatten` turns float64 tensors back into the schema's dtype.
The weighted mean accumulates in float64: a sum of many sites' float32 values in float32
loses digits and can overflow where the mean itself is in range; each update is widened
as it is summed, block by block in one reused buffer, so no float64 copy of an update is
ever kept.
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import numpy as np
from flwr.app import Array, ArrayRecord

from nearl_protocol.arrays import decode_array
from nearl_protocol.flat import FlatLayout

Schema = Mapping[str, tuple[tuple[int, ...], str]]


def flatten(rec: ArrayRecord, schema: Schema) -> np.ndarray:
    """A record of named tensors (checked against ``schema``) as one float64 vector, in schema order."""
    return np.concatenate([decode_array(rec[k]).ravel().astype(np.float64) for k in schema]) if schema else \
        np.zeros(0, np.float64)


def unflatten(tensors: Mapping[str, np.ndarray], schema: Schema) -> ArrayRecord:
    """float64 tensors -> an ArrayRecord in the schema's dtypes."""
    with np.errstate(over="ignore", invalid="ignore"):  # the caller checked the range
        return ArrayRecord({k: Array(np.asarray(np.asarray(tensors[k]).astype(dtype), order="C"))
                            for k, (_, dtype) in schema.items()})


CHUNK = 1 << 15  # values per block of the weighted mean: the block's float64 sum stays in the CPU cache


def weighted_mean_flat(flats: Sequence[np.ndarray], weights: Sequence[float]) -> np.ndarray:
    """sum_i (w_i / sum w) x_i, each term computed and accumulated in float64, in the order given.

    Block by block: one block of the sum stays in the CPU cache while every update's block is
    added to it, so each update is read from memory once.  Every value still sees the same
    operations in the same order (acc = acc + x_i * w_i, i = 1..n): the result is bit for bit
    the one of summing whole updates one after the other.
    """
    if not flats:
        raise ValueError("weighted_mean needs at least one update")
    total = math.fsum(float(w) for w in weights)
    scales = [float(w) / total for w in weights]
    if len(scales) != len(flats):
        raise ValueError(f"{len(flats)} updates, {len(scales)} weights")
    size = flats[0].shape[0]
    acc = np.zeros(size, np.float64)
    term = np.empty(min(size, CHUNK), np.float64)
    for lo in range(0, size, CHUNK):
        hi = min(size, lo + CHUNK)
        block, t = acc[lo:hi], term[:hi - lo]
        for flat, scale in zip(flats, scales):
            np.multiply(flat[lo:hi], scale, out=t, dtype=np.float64)  # float32 values widened exactly
            np.add(block, t, out=block)
    return acc


def weighted_mean(records: Sequence[ArrayRecord], weights: Sequence[float], schema: Schema) -> ArrayRecord:
    """FedAvg of records of named tensors (keys and shapes already checked against ``schema``), float64 sums."""
    acc = weighted_mean_flat([flatten(rec, schema) for rec in records], weights)
    return unflatten(FlatLayout.of(schema).split(acc), schema)
