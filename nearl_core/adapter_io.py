"""Adapter-only state: what a site trains, what it sends, what a checkpoint holds.

An adapter file is a directory with ``adapters.safetensors`` (exactly the tensors for
which :func:`nearl_core.model.is_adapter_param` holds for the model's method, without
the method's prefix) and ``adapters.json`` (method, backbone name and weight provenance,
classes, prompts, the whole config and the package version).  Loading refuses a file
made for another method, another backbone or another class list: silently loading
adapters into the wrong model would give plausible-looking but meaningless predictions.

``adapters.json`` also records the sha256 of ``adapters.safetensors``
(``weights_sha256``) and loading checks it: a file damaged in a copy can still parse
(a flipped byte in a tensor changes predictions, not structure).  Folders written
before the checksum existed are loaded with an :class:`UncheckedAdapterWarning`
rather than refused: they can only be recreated by retraining, and the checksum
guards against damage, not tampering (whoever can edit the weights can edit the
JSON next to them).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import warnings
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from nearl_core.errors import AdapterFileError, UncheckedAdapterWarning
from nearl_core.model import FrozenCLIP
from nearl_core.personalize import local_names
from nearl_protocol.schema import schema_of, schema_problem

WEIGHTS_FILE = "adapters.safetensors"
META_FILE = "adapters.json"
CHECKSUM_KEY = "weights_sha256"  # in META_FILE: sha256 (hex) of the bytes of WEIGHTS_FILE


def package_version() -> str:
    try:
        return version("nearl-federated")
    except PackageNotFoundError:  # running from a source tree without install
        return "0+unknown"


def get_adapter_state(model: FrozenCLIP) -> dict[str, torch.Tensor]:
    """Exactly the trainable tensors, detached on CPU, keyed without the method's prefix (``adapters.``)."""
    return {name: p.detach().cpu().clone() for name, p in model.adapter_parameters().items()}


def adapter_schema(model: FrozenCLIP) -> dict[str, tuple[tuple[int, ...], str]]:
    """name -> (shape, dtype): the agreed layout of every payload for this model."""
    return schema_of(get_adapter_state(model))


def set_adapter_state(model: FrozenCLIP, state: Mapping[str, torch.Tensor]) -> None:
    """Load adapter tensors, refusing missing, extra or mis-shaped entries."""
    _copy_into(model.adapter_parameters(), state, "were they made with other adapter dimensions?")


def _copy_into(params: Mapping[str, torch.nn.Parameter], state: Mapping[str, Any], hint: str) -> None:
    problem = schema_problem(state, schema_of(params), dtypes=False)
    if problem:
        raise AdapterFileError(f"adapter {problem}; {hint}")
    for name, p in params.items():
        with torch.no_grad():
            p.copy_(torch.as_tensor(state[name]).to(dtype=p.dtype, device=p.device))


def model_metadata(model: FrozenCLIP, extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """What a reader needs to rebuild the same model and check compatibility."""
    meta = {
        "format": "nearl-adapters/1",
        "version": package_version(),
        "method": model.method,
        "backbone": model.backbone_name,
        "backbone_source": model.backbone_source,
        "classes": list(model.classes),
        "templates": list(model.cfg.task.templates),
        "modality": model.cfg.task.modality,
        "config": model.cfg.to_dict(),
    }
    meta.update(extra or {})
    return meta


def save_adapters(model: FrozenCLIP, out_dir: str | Path, extra: Mapping[str, Any] | None = None,
                  *, overwrite: bool = False) -> Path:
    """Write weights + metadata atomically (temp files then rename); refuse to clobber by default."""
    out = Path(out_dir)
    if (out / WEIGHTS_FILE).exists() and not overwrite:
        raise AdapterFileError(f"{out / WEIGHTS_FILE} already exists; choose another --out or pass --overwrite")
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.contiguous() for k, v in get_adapter_state(model).items()}
    weights = save_safetensors(state, metadata={"format": "pt"})
    meta = {**model_metadata(model, extra), CHECKSUM_KEY: hashlib.sha256(weights).hexdigest()}
    _atomic_write(out / WEIGHTS_FILE, lambda p: Path(p).write_bytes(weights))
    _atomic_write(out / META_FILE, lambda p: Path(p).write_text(json.dumps(meta, indent=2)))
    return out


def read_adapters(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read (tensors, metadata) from an adapter directory (or its .safetensors file).

    The weights are read once, checked against the recorded sha256, then parsed.
    """
    p = Path(path)
    folder = p.parent if p.suffix == ".safetensors" else p
    weights, meta_file = folder / WEIGHTS_FILE, folder / META_FILE
    for f in (weights, meta_file):
        if not f.is_file():
            raise AdapterFileError(f"adapter file {f} not found; point --adapters at a folder written by nearl train")
    try:
        meta = json.loads(meta_file.read_text())
        if not isinstance(meta, dict):
            raise ValueError(f"{META_FILE} holds a JSON {type(meta).__name__}, not an object")
        data = weights.read_bytes()
        _check_checksum(folder, data, meta)
        state = load_safetensors(data)
    except (SafetensorError, ValueError, OSError) as err:  # JSONDecodeError is a ValueError
        raise AdapterFileError(f"{folder}: adapter files are corrupt ({str(err).splitlines()[0]}); re-export them") from None
    return state, meta


def _check_checksum(folder: Path, data: bytes, meta: Mapping[str, Any]) -> None:
    """Refuse weights whose sha256 differs from the recorded one; warn when none is recorded."""
    recorded = meta.get(CHECKSUM_KEY)
    if recorded is None:
        warnings.warn(
            f"{folder / META_FILE} records no sha256 of {WEIGHTS_FILE} (written by an older nearl), "
            "so the weights are loaded unchecked; adapters written by this version carry one",
            UncheckedAdapterWarning, stacklevel=3,
        )
        return
    actual = hashlib.sha256(data).hexdigest()
    if actual != str(recorded).lower():
        raise AdapterFileError(
            f"{folder / WEIGHTS_FILE} is corrupt: its sha256 is {actual[:16]}..., {META_FILE} records "
            f"{str(recorded)[:16]}...; copy the adapter folder again from where it was written, or retrain"
        )


def check_compatible(meta: Mapping[str, Any], model: FrozenCLIP, source: str = "adapter file") -> None:
    """Refuse adapters made for another method, another backbone, other weights or another class list."""
    method = meta_method(meta)
    if method != model.method:
        raise AdapterFileError(
            f"{source} holds {method} adapters, this model is {model.method}; "
            f"use --set adapter.method={method} (or the config they were trained with)"
        )
    if meta.get("backbone") != model.backbone_name:
        raise AdapterFileError(
            f"{source} was trained on backbone '{meta.get('backbone')}', this model is '{model.backbone_name}'; "
            "use the matching --config"
        )
    if meta.get("backbone_source") != model.backbone_source:
        raise AdapterFileError(
            f"{source} was trained on backbone weights {meta.get('backbone_source')}, this model has "
            f"{model.backbone_source}; load the same pretrained weights"
        )
    if list(meta.get("classes", [])) != list(model.classes):
        raise AdapterFileError(
            f"{source} is for classes {meta.get('classes')}, this model has {list(model.classes)}; "
            "use the same task.classes (same order)"
        )


def meta_method(meta: Mapping[str, Any]) -> str:
    """The method an adapter file was written for (files from before methods existed are NEARL's)."""
    config = meta.get("config")
    adapter = config.get("adapter") if isinstance(config, Mapping) else None
    from_config = adapter.get("method") if isinstance(adapter, Mapping) else None
    return str(meta.get("method") or from_config or "nearl")


def load_adapters(model: FrozenCLIP, path: str | Path) -> dict[str, Any]:
    """Check compatibility, then load; returns the metadata."""
    state, meta = read_adapters(path)
    check_compatible(meta, model, source=str(path))
    set_adapter_state(model, state)
    return meta


def _atomic_write(target: Path, write) -> None:
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


# -- what crosses the wire: every adapter tensor but the groups a federation keeps local ---------------
def shared_state(model: FrozenCLIP) -> dict[str, torch.Tensor]:
    """The federated tensors (all but :func:`nearl_core.personalize.local_names`), detached on CPU."""
    local = local_names(model)
    return {name: t for name, t in get_adapter_state(model).items() if name not in local}


def shared_schema(model: FrozenCLIP) -> dict[str, tuple[tuple[int, ...], str]]:
    """name -> (shape, dtype) of the federated tensors: the agreed layout of every payload."""
    return schema_of(shared_state(model))


def set_shared_state(model: FrozenCLIP, state: Mapping[str, torch.Tensor]) -> None:
    """Load the federated tensors; the local groups keep their values. Missing or extra entries are refused."""
    local = local_names(model)
    params = {n: p for n, p in model.adapter_parameters().items() if n not in local}
    _copy_into(params, state, "were they made with other adapter dimensions or other federation.local groups?")
