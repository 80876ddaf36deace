"""Reading a serialized adapter tensor: once, in place, and only when its bytes agree with its metadata.

A Flower ``Array`` carries metadata (``shape``, ``dtype``, ``stype``) next to its bytes
(an ``.npy`` file).  A reply whose metadata states the right layout but whose bytes hold
another one must never reach aggregation, where it would crash the round or average
misaligned values.  :func:`decode_array` parses the ``.npy`` header (cached: every site
sends the same headers), checks header, metadata and byte length against each other,
and views the data without copying.  :func:`payload_sha256` is the hash a site's audit
trail records and the server logs for the same reply.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import math
from typing import Any, Iterable, Mapping

import numpy as np

_MAGIC = b"\x93NUMPY"


class PayloadError(ValueError):
    """An array's bytes do not agree with its own metadata."""


@functools.lru_cache(maxsize=4096)
def _header(raw: bytes) -> tuple[np.dtype, bool, tuple[int, ...]]:
    meta = ast.literal_eval(raw.decode("latin1"))
    return np.dtype(meta["descr"]), bool(meta["fortran_order"]), tuple(int(d) for d in meta["shape"])


def decode_array(arr: Any) -> np.ndarray:
    """The values of a Flower ``Array``, read-only, without copying; :class:`PayloadError` on any disagreement."""
    data = arr.data
    if arr.stype != "numpy.ndarray":
        raise PayloadError(f"serialized as {arr.stype!r}, expected numpy.ndarray")
    if bytes(data[:6]) != _MAGIC or len(data) < 10 or data[6] not in (1, 2, 3):
        raise PayloadError("not an .npy payload")
    size = 2 if data[6] == 1 else 4
    start = 8 + size
    end = start + int.from_bytes(data[8:start], "little")
    try:
        dtype, fortran, shape = _header(bytes(data[start:end]))
    except (ValueError, SyntaxError, KeyError, TypeError) as err:
        raise PayloadError(f"unreadable .npy header ({err})") from None
    if dtype.hasobject:
        raise PayloadError("object arrays are not accepted")
    if shape != tuple(int(d) for d in arr.shape) or str(dtype) != str(arr.dtype):
        raise PayloadError(f"bytes hold {dtype}{list(shape)}, the metadata says {arr.dtype}{list(arr.shape)}")
    count = math.prod(shape)
    if len(data) - end != count * dtype.itemsize:
        raise PayloadError(f"{len(data) - end} data bytes, {dtype}{list(shape)} needs {count * dtype.itemsize}")
    return np.frombuffer(data, dtype=dtype, count=count, offset=end).reshape(shape, order="F" if fortran else "C")


def payload_sha256(arrays: Mapping[str, Any], order: Iterable[str] | None = None) -> str:
    """sha256 over the serialized bytes of every array, in name order (what crossed the network)."""
    digest = hashlib.sha256()
    for name in (order if order is not None else sorted(arrays)):
        digest.update(name.encode())
        digest.update(bytes(arrays[name].data))
    return digest.hexdigest()
