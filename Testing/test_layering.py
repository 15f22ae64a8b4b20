"""The library's layers: no module imports from a layer above its own.

``SyntheticCTLib`` is one package in layers (see the README's Development section)::

    kernel  <  models, phantom  <  synthesis, registration, comparison  <  training  <  apps  <  cli

A module may import from its own package and from any lower layer; packages of one layer do not
import each other. Every import counts, function-local ones included: they are read with ``ast``,
not by importing, so a lazy import cannot hide an upward dependency.
"""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Tuple

import pytest

LIBRARY = Path(__file__).resolve().parents[1] / "SyntheticCT" / "SyntheticCTLib"
TOP = "SyntheticCTLib"

LAYERS: Dict[str, int] = {
    "kernel": 0,
    "models": 1,
    "phantom": 1,
    "synthesis": 2,
    "registration": 2,
    "comparison": 2,
    "training": 3,
    "apps": 4,
    "cli": 5,
}
"""Each sub-package's layer. The package root (``SyntheticCTLib/__init__.py``, ``__main__.py``) is not
a layer: its ``__init__`` holds the version and the not-for-diagnostic-use text, and imports only the
kernel; ``__main__`` runs the command line."""

ROOT_MODULES = {"__init__": 0, "__main__": 6}


def package_of(module: str) -> Optional[str]:
    """``"kernel"`` for ``SyntheticCTLib.kernel.io``; None for a module outside the library."""
    parts = module.split(".")
    if parts[0] != TOP:
        return None
    if len(parts) == 1:
        return "__init__"
    return parts[1]


def layer_of(package: str) -> int:
    return ROOT_MODULES[package] if package in ROOT_MODULES else LAYERS[package]


def module_name(path: Path, library: Path = LIBRARY) -> str:
    rel = path.relative_to(library).with_suffix("")
    parts = [TOP, *rel.parts]
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def imported_modules(path: Path, library: Path = LIBRARY) -> Iterator[Tuple[int, str]]:
    """``(line, absolute module)`` of every import in ``path`` (top-level and function-local)."""
    own = module_name(path, library)
    package = own.split(".") if path.name == "__init__.py" else own.split(".")[:-1]
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            yield node.lineno, target
            # ``from SyntheticCTLib import apps`` imports a sub-package by name
            if target == TOP:
                for alias in node.names:
                    yield node.lineno, f"{TOP}.{alias.name}"


def upward_imports(library: Path = LIBRARY) -> List[str]:
    """Every import of a module from a higher layer, or from another package of the same layer.

    The package root's ``__init__`` may import the kernel only; ``__main__`` may import anything.
    """
    problems = []
    for path in sorted(library.rglob("*.py")):
        if "Resources" in path.parts:
            continue
        source = package_of(module_name(path, library))
        if source is None:
            continue
        for line, target_module in imported_modules(path, library):
            target = package_of(target_module)
            if target is None or target == source:
                continue
            if target not in LAYERS and target not in ROOT_MODULES:
                continue  # a root-level name such as NOT_FOR_DIAGNOSTIC_USE, from __init__
            if target == "__init__":
                continue
            if source == "__init__":
                allowed = target == "kernel"
            else:
                allowed = layer_of(target) < layer_of(source)
            if not allowed:
                problems.append(
                    f"{path.relative_to(library.parent)}:{line}: {source} (layer {layer_of(source)}) imports "
                    f"{target_module} ({target}, layer {layer_of(target)})"
                )
    return problems


def test_every_library_package_has_a_layer():
    packages = {p.name for p in LIBRARY.iterdir() if p.is_dir() and (p / "__init__.py").is_file()}
    assert packages == set(LAYERS), f"give each package a layer: {sorted(packages ^ set(LAYERS))}"


def test_no_module_imports_from_a_higher_or_sibling_layer():
    problems = upward_imports()
    assert not problems, "upward or sideways imports:\n" + "\n".join(problems)


def test_the_layering_check_catches_a_planted_upward_import(tmp_path):
    """Plant a function-local import of the applications into the kernel: the check must name it."""
    library = tmp_path / TOP
    for package in LAYERS:
        (library / package).mkdir(parents=True)
        (library / package / "__init__.py").write_text("")
    (library / "__init__.py").write_text("from SyntheticCTLib.kernel import errors\n")
    (library / "kernel" / "io.py").write_text(
        "def read():\n    from SyntheticCTLib.apps.demo import run  # planted\n    return run\n"
    )
    (library / "comparison" / "compare.py").write_text("from ..registration import engine\n")
    (library / "apps" / "demo.py").write_text("from SyntheticCTLib.kernel.io import read\n")
    problems = upward_imports(library)
    assert len(problems) == 2, problems
    assert any("kernel/io.py:2" in p and "SyntheticCTLib.apps.demo" in p for p in problems)
    assert any("comparison/compare.py:1" in p and "SyntheticCTLib.registration" in p for p in problems)


@pytest.mark.parametrize("package", sorted(LAYERS))
def test_each_layer_imports_on_its_own(package):
    """Each layer imports in a fresh interpreter, without Qt or Slicer, and the lower layers without torch."""
    import subprocess
    import sys

    code = (
        f"import sys, importlib; importlib.import_module('{TOP}.{package}'); "
        "bad = [m for m in ('qt', 'slicer', 'PythonQt') if m in sys.modules]; "
        "assert not bad, bad; "
        "print('torch' in sys.modules)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    if LAYERS[package] <= 2:
        assert result.stdout.strip() == "False", f"importing {package} imported torch"
