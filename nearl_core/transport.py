"""Adapter tensors on the wire: float32 (default), or halved to fp16 / bf16.

Sites train and the server aggregates in float32; only the copy that crosses the
network is narrowed (``--transport-dtype``), which halves every payload in both
directions.  numpy has no bfloat16, so bf16 travels as the raw 16-bit patterns in an
``int16`` array (what the egress check and the server's schema then expect) and is
widened back exactly.  :func:`widen_flat` widens a whole flat payload
(:mod:`nearl_protocol.flat`) with numpy alone: the server widens every reply with it.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np
import torch

from nearl_protocol.schema import Schema

TRANSPORT_DTYPES = ("float32", "fp16", "bf16")
_WIRE = {"float32": "float32", "fp16": "float16", "bf16": "int16"}  # numpy dtype of a float32 tensor on the wire


def check_transport(transport: str) -> str:
    if transport not in TRANSPORT_DTYPES:
        raise ValueError(f"transport dtype {transport!r}: choose one of {', '.join(TRANSPORT_DTYPES)}")
    return transport


def wire_schema(schema: Schema, transport: str) -> dict[str, tuple[tuple[int, ...], str]]:
    """The layout of a payload on the wire: float32 entries take the transport's dtype."""
    wire = _WIRE[check_transport(transport)]
    return {k: (tuple(shape), wire if dtype == "float32" else dtype) for k, (shape, dtype) in schema.items()}


def encode(values: Mapping[str, np.ndarray | torch.Tensor], transport: str) -> dict[str, np.ndarray]:
    """float32 tensors -> contiguous numpy arrays in the transport dtype (round to nearest)."""
    check_transport(transport)
    out = {}
    for k, v in values.items():
        t = torch.as_tensor(v).detach().cpu()
        if t.dtype == torch.float32 and transport == "fp16":
            t = t.to(torch.float16)
        elif t.dtype == torch.float32 and transport == "bf16":
            t = t.to(torch.bfloat16).view(torch.int16)
        out[k] = np.asarray(t.numpy(), order="C")  # keeps 0-d shapes (ascontiguousarray makes them (1,))
    return out


def decode(values: Mapping[str, np.ndarray], schema: Schema, transport: str) -> dict[str, np.ndarray]:
    """Wire arrays -> the schema's dtypes (float32), exactly widened."""
    check_transport(transport)
    out = {}
    for k, v in values.items():
        want = schema[k][1] if k in schema else str(v.dtype)
        if want == "float32" and transport == "bf16" and v.dtype == np.int16:
            out[k] = torch.from_numpy(np.array(v, dtype=np.int16)).view(torch.bfloat16).float().numpy()
        else:
            out[k] = np.asarray(v).astype(want, copy=False)
    return out


def widen_flat(values: np.ndarray, transport: str) -> np.ndarray:
    """A flat wire payload of float32 tensors -> float32, exactly (fp16 and bf16 values are float32 values).

    bf16 is the upper half of a float32's bits, so widening is a 16-bit shift (what torch's
    conversion does); float32 transport returns ``values`` itself, without a copy.
    """
    check_transport(transport)
    if transport == "fp16" and values.dtype == np.float16:
        return values.astype(np.float32)
    if transport == "bf16" and values.dtype == np.int16:
        return (values.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
    return values
