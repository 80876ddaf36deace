"""The files ``flwr run APP_DIR`` can put in its app bundle (FAB), found without walking what it never takes.

Flower builds a FAB by walking *every* file under the app directory (resolving each path),
then filtering by its publish rules and the app's ``fab-include`` patterns.  In a source
checkout the walk is dominated by ``.venv`` (about 69,000 files, 5 s of CPU on a 2-core
machine), whose files Flower's publish rules always exclude.  :func:`bundle_files` walks
the same tree but does not enter the directories Flower always excludes (``.venv`` and
``.flwr`` at the top, ``__pycache__`` anywhere) and applies Flower's own rules for the
rest (symbolic links skipped, paths that resolve outside the directory skipped), so a FAB
built from its files is the one ``flwr run`` builds, byte for byte
(``tests/test_warm_site.py`` compares both).

Two users: a site hashes the bundle of its own installation (:mod:`client.fab_check`),
and ``nearl-server`` submits a staged copy of these files (:func:`stage`), so that its
``flwr run`` walks a few hundred files.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

ALWAYS_EXCLUDED_AT_TOP = frozenset({".venv", ".flwr"})  # Flower's publish excludes: .venv/**, .flwr/**
ALWAYS_EXCLUDED_ANYWHERE = frozenset({"__pycache__"})  # and **/__pycache__/**


def bundle_files(app_dir: str | Path) -> dict[str, Path]:
    """Relative POSIX path -> file, for every file Flower's FAB builder would consider under ``app_dir``."""
    root = Path(app_dir).expanduser().resolve()
    files: dict[str, Path] = {}
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        here = Path(dirpath)
        top = here == root
        dirnames[:] = [d for d in dirnames if d not in ALWAYS_EXCLUDED_ANYWHERE
                       and not (top and d in ALWAYS_EXCLUDED_AT_TOP)]
        for name in filenames:
            path = here / name
            if path.is_symlink() or not path.resolve().is_relative_to(root):
                continue
            files[path.relative_to(root).as_posix()] = path
    return files


def stage(app_dir: str | Path, dest: Path) -> Path:
    """A fresh copy of :func:`bundle_files` of ``app_dir`` in ``dest`` (replaced): the directory to ``flwr run``.

    A checkout's ``.git`` is left out: the app's ``fab-include`` names nothing under it, and a
    long-lived clone holds thousands of object files that would be copied at every start.
    """
    if dest.exists():
        shutil.rmtree(dest)
    for rel, path in bundle_files(app_dir).items():
        if rel.startswith(".git/"):
            continue
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, target)
    return dest
