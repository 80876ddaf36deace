"""Small facts a running site leaves in its state dir for the operator's console.

* ``<state-dir>/site.json``: written by ``nearl-client`` at start, after the data check:
  the site's name, data folder, images per split and class, what the check found, its own
  epsilon ceiling and policy.  The console shows the site's data from it without
  re-reading a single image.
* ``<state-dir>/runtime/worker.json``: written by the warm site worker when its backbone is
  built and after every message it answers (pid, warm, the last message and its answer).

Both are replaced atomically; a reader sees the old file or the new one.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Mapping

SITE_FILE = "site.json"
WORKER_FILE = "worker.json"


def write_json(path: Path, record: Mapping[str, Any]) -> None:
    """Replace ``path`` with ``record`` (temp file + rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(record, indent=1, sort_keys=True), encoding="utf-8")
    os.replace(tmp, path)


def read_json(path: Path) -> Any:
    """The JSON in ``path``, or None when it is missing or unreadable (a console must still render)."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def site_facts(site: str, data: Path, site_data: Any, *, max_epsilon: float | None,
               policy: Mapping[str, Any] | None, coordinator: str) -> dict[str, Any]:
    """What the console shows of the site's data: counts per split and class and the check's findings."""
    counts = site_data.counts()
    notes = [f"no {split} images of {', '.join(c for c, n in per_class.items() if n == 0)}"
             for split, per_class in counts.items() if any(n == 0 for n in per_class.values())]
    return {"site": site, "data": str(data), "checked": time.time(), "classes": list(site_data.classes),
            "counts": counts, "images": sum(sum(c.values()) for c in counts.values()),
            "check": "OK: every image decodes, the layout and class folders are valid", "notes": notes,
            "max_epsilon": max_epsilon, "policy": dict(policy) if policy else None, "coordinator": coordinator}


def write_site_facts(state_dir: Path, facts: Mapping[str, Any]) -> Path:
    path = Path(state_dir) / SITE_FILE
    write_json(path, facts)
    return path


def write_worker_state(runtime_dir: Path, **fields: Any) -> None:
    """Merge ``fields`` into ``worker.json`` (the worker is its only writer)."""
    path = Path(runtime_dir) / WORKER_FILE
    record = read_json(path) or {}
    record.update(fields, pid=os.getpid(), time=time.time())
    write_json(path, record)
