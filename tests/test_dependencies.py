"""pyproject.toml declares every third-party library NEARL imports, and imports every library it declares.

The scan reads the project's own files with :mod:`ast` (``import`` and ``from ... import`` at any
depth, functions included), drops relative imports, the standard library, NEARL's packages and the
sibling scripts of bench/ and tests/, and maps what is left to distributions with
:func:`importlib.metadata.packages_distributions` (``yaml`` -> PyYAML, ``open_clip`` ->
open_clip_torch).  Imports from the code must be in ``[project].dependencies``; imports from tests/
may also be in the ``dev`` extra.  No network, no imports of the scanned files.
"""

from __future__ import annotations

import ast
import re
import sys
import tomllib
from collections import defaultdict
from functools import cache
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CODE = ("nearl_core/**/*.py", "nearl_protocol/**/*.py", "server/**/*.py", "client/**/*.py",
        "simulation/**/*.py", "bench/**/*.py", "deploy/**/*.py")
TESTS = ("tests/**/*.py",)
OWN = {"nearl_core", "nearl_protocol", "server", "client", "simulation", "bench", "deploy", "tests"}

# Declared but imported by no scanned file; each one says why it stays (PEP 503 name -> reason).
UNIMPORTED_RUNTIME = {
    "tqdm": "declared since the first commit yet imported by no NEARL file (open_clip, transformers and "
            "huggingface_hub declare it for themselves); kept until someone decides to drop it",
}
UNIMPORTED_DEV = {
    "pytest-timeout": "pytest plugin loaded by entry point, not imported: @pytest.mark.timeout on the slow tests",
    "pytest-xdist": "pytest plugin loaded by entry point, not imported: make test runs pytest -n 3 --dist loadfile",
}

# imports the scan must find, so that an empty or broken scan cannot pass
KNOWN_CODE = {"torch", "torchvision", "flwr", "flwr_datasets", "yaml", "numpy", "open_clip", "opacus", "mlflow",
              "safetensors", "PIL", "sklearn", "pydicom", "tomli_w", "transformers", "starlette"}
KNOWN_TESTS = {"pytest", "torch", "flwr", "numpy"}


def normalize(name: str) -> str:
    """PEP 503: runs of ``-``, ``_`` and ``.`` become one ``-``, lower case."""
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_name(requirement: str) -> str:
    match = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", requirement)
    assert match, f"cannot read a distribution name from {requirement!r} in pyproject.toml"
    return normalize(match.group(1))


@cache
def declared() -> tuple[frozenset[str], frozenset[str]]:
    """(runtime, dev) requirement names of pyproject.toml, normalised."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    runtime = frozenset(requirement_name(r) for r in project["dependencies"])
    dev = frozenset(requirement_name(r) for r in project.get("optional-dependencies", {}).get("dev", []))
    return runtime, dev


def local_names(files: list[Path]) -> set[str]:
    """Modules a scanned file can import by bare name besides NEARL's packages: a folder without
    ``__init__.py`` (bench/, tests/) runs its files with itself on sys.path, so its modules and
    packages are local (bench's ``common``, tests' ``conftest``; tests/test_bench.py imports bench's)."""
    names = set(OWN) | {p.name for p in ROOT.iterdir() if (p / "__init__.py").is_file()}
    for folder in {f.parent for f in files}:
        if folder != ROOT and (folder / "__init__.py").is_file():
            continue
        names |= {p.stem for p in folder.glob("*.py")} | {p.name for p in folder.iterdir() if (p / "__init__.py").is_file()}
    return names


def top_level_imports(path: Path) -> set[str]:
    """Top-level names of the absolute imports anywhere in ``path`` (functions and branches included)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


@cache
def scan(globs: tuple[str, ...]) -> dict[str, tuple[str, ...]]:
    """Third-party import name -> the files (relative to the repository) that import it."""
    files = sorted({f for pattern in globs for f in ROOT.glob(pattern)})
    assert files, f"no files match {globs}"
    everything = sorted({f for pattern in CODE + TESTS for f in ROOT.glob(pattern)})
    skip = local_names(everything) | set(sys.stdlib_module_names) | {"__future__"}
    found: dict[str, set[str]] = defaultdict(set)
    for path in files:
        for name in top_level_imports(path) - skip:
            found[name].add(path.relative_to(ROOT).as_posix())
    return {name: tuple(sorted(where)) for name, where in sorted(found.items())}


@cache
def packages_distributions() -> dict[str, list[str]]:
    return metadata.packages_distributions()


def distributions(name: str) -> frozenset[str]:
    """Normalised distributions that provide import ``name`` (the name itself when none is installed)."""
    return frozenset(normalize(d) for d in packages_distributions().get(name, [name]))


def files_text(where: tuple[str, ...]) -> str:
    return ", ".join(where[:3]) + (f" and {len(where) - 3} more" if len(where) > 3 else "")


def undeclared(imports: dict[str, tuple[str, ...]], allowed: frozenset[str], fix: str) -> list[str]:
    """One line per import none of whose distributions is in ``allowed``."""
    problems = []
    for name, where in imports.items():
        dists = distributions(name)
        if dists & allowed:
            continue
        dist = sorted(dists)[0]
        installed = "" if name in packages_distributions() else " (not installed here, so this name is a guess)"
        verb = "imports" if len(where) == 1 else "import"
        problems.append(f"{files_text(where)} {verb} {name} (distribution {'/'.join(sorted(dists))}{installed}), "
                        f"which pyproject.toml does not declare: add {dist} to {fix} in pyproject.toml")
    return problems


def unimported(declared_names: frozenset[str], imports: dict[str, tuple[str, ...]], exempt: dict[str, str],
               where: str, table: str) -> list[str]:
    """One line per declared distribution no import maps to, and per stale entry of ``exempt``."""
    used = set().union(*(distributions(name) for name in imports))
    problems = []
    for dist in sorted(declared_names - used - set(exempt)):
        problems.append(f"pyproject.toml declares {dist} in {where} but no scanned file imports it: remove it there, "
                        f"or add it to {table} in tests/test_dependencies.py with the reason it stays")
    for dist in sorted(set(exempt) & used):
        problems.append(f"{dist} is imported now: remove it from {table} in tests/test_dependencies.py")
    for dist in sorted(set(exempt) - declared_names):
        problems.append(f"{dist} is no longer declared in {where}: remove it from {table} in tests/test_dependencies.py")
    return problems


def test_the_scan_finds_the_known_imports_and_skips_local_ones() -> None:
    code, tests = scan(CODE), scan(TESTS)
    assert KNOWN_CODE <= code.keys(), f"the scan of the code missed {sorted(KNOWN_CODE - code.keys())}"
    assert KNOWN_TESTS <= tests.keys(), f"the scan of tests/ missed {sorted(KNOWN_TESTS - tests.keys())}"
    assert "server/proxy.py" in code["starlette"]
    assert "nearl_core/backbone.py" in code["huggingface_hub"]  # imported inside a function
    for local in ("common", "run_all", "conftest", "fed_helpers", "nearl_core", "os", "__future__"):
        assert local not in code and local not in tests
    assert distributions("yaml") == {"pyyaml"} and distributions("open_clip") == {"open-clip-torch"}


def test_every_import_is_declared() -> None:
    runtime, dev = declared()
    problems = undeclared(scan(CODE), runtime, "[project].dependencies")
    tests_only = {name: where for name, where in scan(TESTS).items() if name not in scan(CODE)}  # else reported above
    problems += undeclared(tests_only, runtime | dev, "the dev extra ([project.optional-dependencies] dev)")
    assert not problems, "undeclared imports:\n" + "\n".join(problems)


def test_every_declared_dependency_is_imported() -> None:
    runtime, dev = declared()
    problems = unimported(runtime, scan(CODE), UNIMPORTED_RUNTIME, "[project].dependencies", "UNIMPORTED_RUNTIME")
    problems += unimported(dev - runtime, scan(TESTS), UNIMPORTED_DEV, "the dev extra", "UNIMPORTED_DEV")
    assert not problems, "declared but not imported:\n" + "\n".join(problems)


def test_a_missing_declaration_is_reported_with_its_file_and_fix() -> None:
    runtime, _ = declared()
    problems = undeclared(scan(CODE), runtime - {"starlette"}, "[project].dependencies")
    assert problems == ["client/console/app.py, server/proxy.py import starlette (distribution starlette), which "
                        "pyproject.toml does not declare: add starlette to [project].dependencies in pyproject.toml"]
    extra = unimported(runtime | {"left-over"}, scan(CODE), UNIMPORTED_RUNTIME, "[project].dependencies", "UNIMPORTED_RUNTIME")
    assert len(extra) == 1 and extra[0].startswith("pyproject.toml declares left-over in [project].dependencies")
