"""Adapters on the wire: one flat array per message, split by the agreed schema.

A ViT-B-16 NEARL update is 577 tensors.  Sent as 577 arrays, every reply costs the
server 577 header parses, 577 checks and 577 copies, and 100 replies a round made the
screening alone take most of a second.  Both sides already agree on the layout (the
adapter schema, in its own order: the order of the model's parameters), so a message
carries ONE 1-D array under :data:`keys.ADAPTERS`: every tensor raveled in C order, one
after the other, in the schema's order, in the (wire) schema's single dtype.

:class:`FlatLayout` is the one owner of that format, used by the server's instruction,
the site's reply and egress check, and the server's screening:

* :meth:`FlatLayout.pack` checks the tensors' names, shapes and dtypes against the schema
  (the split a receiver will apply) before it concatenates them;
* :meth:`FlatLayout.read` takes a received record apart: exactly one array, under the
  right name, 1-D, of the schema's dtype and total length, whose bytes agree with its
  metadata (:func:`nearl_protocol.arrays.decode_array`); the result is a read-only view
  of the received bytes, not a copy;
* :meth:`FlatLayout.split` gives the tensors back (views), :meth:`FlatLayout.check_finite`
  names the first tensor that holds NaN or Inf;
* :attr:`FlatLayout.digest` fingerprints names, shapes, dtypes *and order*: the server
  states it in every instruction, and a site whose own layout differs refuses, so two
  layouts that only differ in order (same length, same dtype) can never be mixed up.

Every problem is a :class:`~nearl_protocol.arrays.PayloadError` with one readable line.
Checkpoints and adapter files keep their tensors by name; only the wire is flat.  numpy
only, no Flower import: a record is any mapping of names to objects with ``data``,
``shape``, ``dtype`` and ``stype`` (Flower's ``Array``).
"""

from __future__ import annotations

import bisect
import hashlib
import math
from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np

from nearl_protocol import keys
from nearl_protocol.arrays import PayloadError, decode_array
from nearl_protocol.schema import Schema, dtype_name, schema_problem


@dataclass(frozen=True)
class FlatLayout:
    """The agreed schema as a flat layout: names in order, their shapes, one dtype, offsets."""

    schema: dict[str, tuple[tuple[int, ...], str]]
    dtype: str
    offsets: tuple[int, ...]  # len(schema) + 1 positions; tensor i is flat[offsets[i]:offsets[i + 1]]
    digest: str = field(compare=False)

    @classmethod
    def of(cls, schema: Schema) -> "FlatLayout":
        """The layout of ``schema``; a schema whose tensors do not share one dtype cannot travel flat."""
        schema = {k: (tuple(int(d) for d in shape), str(dtype)) for k, (shape, dtype) in schema.items()}
        dtypes = sorted({dtype for _, dtype in schema.values()})
        if len(dtypes) > 1:
            raise PayloadError(f"the adapter schema mixes dtypes {dtypes}; one flat array needs one dtype")
        offsets = [0]
        for shape, _ in schema.values():
            offsets.append(offsets[-1] + math.prod(shape))
        text = ";".join(f"{k}:{list(shape)}:{dtype}" for k, (shape, dtype) in schema.items())
        return cls(schema, dtypes[0] if dtypes else "float32", tuple(offsets),
                   hashlib.sha256(text.encode()).hexdigest()[:16])

    @property
    def size(self) -> int:
        """Values in one payload (the flat array's length)."""
        return self.offsets[-1]

    def pack(self, tensors: Mapping[str, Any]) -> np.ndarray:
        """``tensors`` as one contiguous 1-D array in schema order; their names, shapes and dtypes
        must be the schema's (numpy arrays or anything ``np.asarray`` reads)."""
        problem = schema_problem(tensors, self.schema)
        if problem:
            raise PayloadError(problem)
        out = np.empty(self.size, dtype=self.dtype)
        for name, lo, hi in zip(self.schema, self.offsets, self.offsets[1:]):
            out[lo:hi] = np.asarray(tensors[name]).reshape(-1)
        return out

    def read(self, record: Mapping[str, Any]) -> np.ndarray:
        """The flat values of a received record (read-only view); :class:`PayloadError` unless it holds
        exactly one array, :data:`keys.ADAPTERS`, 1-D, of this layout's dtype and length."""
        names = set(record.keys())
        if names != {keys.ADAPTERS}:
            missing, extra = sorted({keys.ADAPTERS} - names), sorted(names - {keys.ADAPTERS})
            raise PayloadError(f"arrays differ from the one flat adapter array (missing {missing}, "
                               f"unexpected {extra[:3]})")
        arr = record[keys.ADAPTERS]
        shape, dtype = tuple(int(d) for d in arr.shape), dtype_name(arr.dtype)
        if dtype != self.dtype:
            raise PayloadError(f"'{keys.ADAPTERS}' has dtype {dtype}, expected {self.dtype}")
        if len(shape) != 1:
            raise PayloadError(f"'{keys.ADAPTERS}' has shape {shape}, expected ({self.size},)")
        if shape[0] != self.size:
            raise PayloadError(f"'{keys.ADAPTERS}' holds {shape[0]} values, the adapter schema has {self.size} "
                               f"({len(self.schema)} tensors)")
        try:
            return decode_array(arr)
        except PayloadError as err:
            raise PayloadError(f"'{keys.ADAPTERS}': {err}") from None

    def split(self, flat: np.ndarray) -> dict[str, np.ndarray]:
        """name -> tensor: views of ``flat`` (any dtype, this layout's length) in the schema's shapes."""
        if flat.shape != (self.size,):
            raise PayloadError(f"a flat payload of shape {flat.shape}, expected ({self.size},)")
        return {name: flat[lo:hi].reshape(shape)
                for (name, (shape, _)), lo, hi in zip(self.schema.items(), self.offsets, self.offsets[1:])}

    def check_finite(self, flat: np.ndarray) -> None:
        """:class:`PayloadError` naming the first tensor that holds NaN or Inf (one pass when all is finite)."""
        finite = np.isfinite(flat)
        if finite.all():
            return
        first = int(np.argmin(finite))
        name = list(self.schema)[bisect.bisect_right(self.offsets, first) - 1]
        raise PayloadError(f"tensor '{name}' holds NaN or Inf values")
