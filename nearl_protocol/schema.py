"""The agreed adapter layout and the one check against it.

A schema is ``name -> (shape, dtype)``: what every payload, checkpoint and adapter file
of a federation holds.  :func:`schema_problem` is the single check used by the site's
egress gate, the server's screening of replies, checkpoints and adapter files; each
caller turns the returned reason into its own error (refuse to send, reject the site,
refuse to resume, refuse to load).  It reads only ``.shape`` and ``.dtype``, so numpy
arrays, torch tensors and Flower ``Array`` objects all fit; no Flower import here.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import numpy as np

Schema = Mapping[str, tuple[tuple[int, ...], str]]


def dtype_name(dtype: Any) -> str:
    """``torch.float32``, ``np.dtype('float32')`` and ``'float32'`` all give ``'float32'``."""
    return str(dtype).removeprefix("torch.")


def schema_of(tensors: Mapping[str, Any]) -> dict[str, tuple[tuple[int, ...], str]]:
    return {k: (tuple(int(d) for d in v.shape), dtype_name(v.dtype)) for k, v in tensors.items()}


def schema_problem(tensors: Mapping[str, Any], schema: Schema, *, dtypes: bool = True) -> str | None:
    """Why ``tensors`` do not match ``schema`` (names, shapes, and dtypes unless ``dtypes=False``), or None."""
    names = set(tensors)
    missing, extra = sorted(set(schema) - names), sorted(names - set(schema))
    if missing or extra:
        return f"tensors differ from the adapter schema (missing {missing[:3]}, unexpected {extra[:3]})"
    for name, (shape, dtype) in schema.items():
        value = tensors[name]
        if tuple(int(d) for d in value.shape) != tuple(shape):
            return f"tensor '{name}' has shape {tuple(value.shape)}, expected {tuple(shape)}"
        if dtypes and dtype_name(value.dtype) != dtype:
            return f"tensor '{name}' has dtype {dtype_name(value.dtype)}, expected {dtype}"
    return None


def payload_bytes(schema: Schema) -> int:
    """Bytes of one payload with this layout (array data only)."""
    return int(sum(math.prod(shape) * np.dtype(dtype).itemsize for shape, dtype in schema.values()))


def parameter_count(schema: Schema) -> int:
    return int(sum(math.prod(shape) for shape, _ in schema.values()))
