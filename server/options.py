"""The forms of the federation settings that are produced from their definitions.

:class:`server.settings.FederationSettings` defines each setting once; this module turns
the definitions into the flags of ``nearl-server`` and ``simulation/run.py``
(:func:`add_federation_flags`), reads them back (:func:`settings_from_args`), and writes
the run-config declarations of pyproject.toml and the settings table of
docs/federation.md (``python -m server.options --write``; tests fail when either drifts).

Every generated flag defaults to None, so that "not given" is visible: a value then comes
from ``--set KEY=VALUE`` or else from the definition, never from a second copy of it.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from typing import Any, Mapping

from nearl_core.config import NearlConfig
from nearl_core.errors import ConfigError
from server.settings import (SERVER, SIMULATION, FederationSettings, default, run_config_key, setting_fields)

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT_BEGIN = "[tool.flwr.app.config]"
DOCS_BEGIN, DOCS_END = "<!-- settings table: begin -->", "<!-- settings table: end -->"


def flag_of(f) -> str:
    return f.metadata["flag"] or f"--{run_config_key(f.name)}"


def dest_of(f) -> str:
    return flag_of(f)[2:].replace("-", "_")


def exposed(engine: str) -> list:
    """The setting fields that ``engine``'s command has a flag for."""
    return [f for f in setting_fields() if engine in f.metadata["on"]]


def add_federation_flags(parser: argparse.ArgumentParser, engine: str) -> None:
    """One flag per setting ``engine`` exposes, in the settings' groups, with the definition's help and default."""
    groups: dict[str, Any] = {}
    for f in exposed(engine):
        name = f.metadata["group"]
        where = parser if name == "federation" else groups.setdefault(name, parser.add_argument_group(name))
        text = f"{f.metadata['help']} (default {default(f.name, engine)})"
        kind = type(f.default)
        if kind is bool:
            where.add_argument(flag_of(f), dest=dest_of(f), action=argparse.BooleanOptionalAction, default=None,
                               help=text)
        else:
            where.add_argument(flag_of(f), dest=dest_of(f), type=kind, default=None, help=text,
                               choices=f.metadata["choices"],
                               metavar=None if f.metadata["choices"] else {int: "N", float: "X"}.get(kind, "VALUE"))


def settings_from_args(args: argparse.Namespace, engine: str, federation_sets: Mapping[str, str],
                       **fixed: Any) -> FederationSettings:
    """Settings from the parsed flags: a given flag, else ``--set key=value``, else the definition's default.

    ``fixed`` holds the values the command sets itself (the resolved config file, the
    checkpoint folder, the progress file...), by field name.
    """
    values: dict[str, Any] = {}
    for f in setting_fields():
        key = run_config_key(f.name)
        given = getattr(args, dest_of(f), None) if engine in f.metadata["on"] else None
        if f.name in fixed:
            values[key] = fixed[f.name]
        elif given is not None:
            values[key] = given
        elif key in federation_sets:
            values[key] = federation_sets[key]
        else:
            values[key] = default(f.name, engine)
    return FederationSettings.from_run_config(values)


def federation_keys() -> frozenset[str]:
    """The run-config keys ``--set`` accepts besides NEARL's ``section.key`` (what the commands do not set)."""
    internal = {"config", "resume", "progress_file", "site_registry", "roster"}
    return frozenset(run_config_key(f.name) for f in setting_fields() if f.name not in internal)


# ---- generated files --------------------------------------------------------------------------------
def nearl_keys() -> list[str]:
    """Every NEARL config key as ``section.key`` (from the schema's dataclasses)."""
    sections = NearlConfig().to_dict()
    return [f"{s}.{k}" for s, values in sections.items() for k in values]


def pyproject_table() -> str:
    """``[tool.flwr.app.config]``: every federation setting with its default, then every NEARL key as ``""``."""
    lines = [PYPROJECT_BEGIN,
             "# Generated from server/settings.py and nearl_core/config.py by `python -m server.options --write`;",
             "# tests/test_settings.py fails when it drifts. nearl-server and the simulation hand the ServerApp",
             "# the resolved NEARL config file (`config`); a `section.key` other than \"\" overrides that file",
             "# for a bare `flwr run --run-config 'train.lr=0.001'`."]
    for f in setting_fields():
        lines.append(f"{run_config_key(f.name)} = {_toml(f.default)}")
    lines += [f'{key} = ""' for key in nearl_keys()]
    return "\n".join(lines) + "\n"


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return repr(value)


def write_pyproject(path: Path = ROOT / "pyproject.toml") -> bool:
    """Replace the run-config table (the file's last table) with the generated one; True when it changed."""
    text = path.read_text()
    head = text[: text.index(PYPROJECT_BEGIN)]
    new = head + pyproject_table()
    path.write_text(new)
    return new != text


def docs_table() -> str:
    """The settings table of docs/federation.md: flag on each command, run-config key, default, meaning."""
    rows = ["| setting (run-config key) | nearl-server | simulation/run.py | default | meaning |",
            "|---|---|---|---|---|"]
    for f in setting_fields():
        flags = [f"`{flag_of(f)}`" if engine in f.metadata["on"] else "-" for engine in (SERVER, SIMULATION)]
        if type(f.default) is bool:
            flags = [x.replace("`--", "`--[no-]") for x in flags]
        fallback = default(f.name)
        shown = f"{fallback}" + (f" (simulation {default(f.name, SIMULATION)})"
                                 if default(f.name, SIMULATION) != fallback else "")
        rows.append(f"| `{run_config_key(f.name)}` | {flags[0]} | {flags[1]} | `{shown}` | {f.metadata['help']} |")
    return "\n".join(rows) + "\n"


def write_docs(path: Path = ROOT / "docs" / "federation.md") -> bool:
    text = path.read_text()
    pattern = re.compile(re.escape(DOCS_BEGIN) + r".*?" + re.escape(DOCS_END), re.S)
    if not pattern.search(text):
        raise ConfigError(f"{path}: no '{DOCS_BEGIN}' ... '{DOCS_END}' markers for the settings table")
    new = pattern.sub(lambda _: f"{DOCS_BEGIN}\n{docs_table()}{DOCS_END}", text)
    path.write_text(new)
    return new != text


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv != ["--write"]:
        print("usage: python -m server.options --write   (regenerates pyproject's run config and the docs table)")
        return 2
    for what, changed in (("pyproject.toml", write_pyproject()), ("docs/federation.md", write_docs())):
        print(f"{what}: {'regenerated' if changed else 'already current'}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
