"""Keep each Slicer module's CMakeLists.txt listing every file of its folder.

A file that ``slicerMacroBuildScriptedModule`` does not list is not packaged, so a module that works
from the source tree can break once installed. This script regenerates the ``MODULE_PYTHON_SCRIPTS``
(every ``.py``) and ``MODULE_PYTHON_RESOURCES`` (every other file) lists between the marker comments
of each module's ``CMakeLists.txt``::

    python Testing/cmake_file_lists.py           # rewrite the lists
    python Testing/cmake_file_lists.py --check   # exit 1 and print what is missing or stale

The files of a module are those git tracks or would track (ignored files, caches and hidden files
are left out); without git, the folder is walked with the same exclusions.
``Testing/test_slicer_conformance.py`` uses :func:`module_files` and :func:`listed_files`.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

REPO = Path(__file__).resolve().parents[1]
MODULES = ("SyntheticCT", "SyntheticCTRegistration")
BEGIN = "# BEGIN GENERATED FILE LISTS (regenerate: python Testing/cmake_file_lists.py)"
END = "# END GENERATED FILE LISTS"
EXCLUDED_DIRS = {"__pycache__", ".pytest_cache", ".ruff_cache", ".mypy_cache", "build", "dist"}
EXCLUDED_SUFFIXES = (".pyc", ".pyo", ".orig", ".rej", ".swp", "~")


def _excluded(rel: Path) -> bool:
    parts = rel.parts
    if any(p.startswith(".") for p in parts):
        return True
    if any(p in EXCLUDED_DIRS or p.endswith(".egg-info") for p in parts[:-1]):
        return True
    if rel.name == "CMakeLists.txt" or rel.name.endswith(EXCLUDED_SUFFIXES):
        return True
    return False


def _git_files(folder: Path) -> Optional[List[Path]]:
    """Files under ``folder`` that git tracks or would track (not ignored); None without git."""
    try:
        out = subprocess.run(
            ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z", "--", "."],
            cwd=folder,
            capture_output=True,
            check=True,
            timeout=60,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    names = {n for n in out.decode("utf-8", "surrogateescape").split("\0") if n}
    return sorted(Path(n) for n in names if (folder / n).is_file())


def module_files(module_dir: Path) -> List[str]:
    """Every file of a module folder that must be packaged, as POSIX paths relative to the folder."""
    module_dir = Path(module_dir)
    files = _git_files(module_dir)
    if files is None:
        files = [p.relative_to(module_dir) for p in module_dir.rglob("*") if p.is_file()]
    return sorted({f.as_posix() for f in files if not _excluded(f)}, key=_sort_key)


def _sort_key(rel: str) -> Tuple[int, str]:
    return (rel.count("/"), rel.lower())


def split_files(module_name: str, files: Sequence[str]) -> Tuple[List[str], List[str]]:
    """(scripts, resources): ``.py`` files and all other files, the module's own first in each."""
    scripts = [f for f in files if f.endswith(".py")]
    resources = [f for f in files if not f.endswith(".py")]
    first_script = f"{module_name}.py"
    scripts.sort(key=lambda f: (f != first_script, _sort_key(f)))
    own = {f"Resources/Icons/{module_name}.png": 0, f"Resources/UI/{module_name}.ui": 1}
    resources.sort(key=lambda f: (own.get(f, 2), _sort_key(f)))
    return scripts, resources


def _cmake_name(module_name: str, rel: str) -> str:
    own = {f"{module_name}.py", f"Resources/Icons/{module_name}.png", f"Resources/UI/{module_name}.ui"}
    return rel.replace(module_name, "${MODULE_NAME}") if rel in own else rel


def render_lists(module_name: str, files: Sequence[str]) -> str:
    """The text between (and including) the marker comments."""
    scripts, resources = split_files(module_name, files)
    lines = [BEGIN, "set(MODULE_PYTHON_SCRIPTS"]
    lines += [f"  {_quote(_cmake_name(module_name, f))}" for f in scripts]
    lines += ["  )", "", "set(MODULE_PYTHON_RESOURCES"]
    lines += [f"  {_quote(_cmake_name(module_name, f))}" for f in resources]
    lines += ["  )", END]
    return "\n".join(lines)


def _quote(item: str) -> str:
    return f'"{item}"' if re.search(r"[\s;()#\"]", item) else item


_ITEM = re.compile(r'"([^"]*)"|(\S+)')


def listed_files(cmake_text: str, module_name: str) -> Dict[str, List[str]]:
    """The files a module CMakeLists.txt lists: {"MODULE_PYTHON_SCRIPTS": [...], "MODULE_PYTHON_RESOURCES": [...]}."""
    result: Dict[str, List[str]] = {}
    for var in ("MODULE_PYTHON_SCRIPTS", "MODULE_PYTHON_RESOURCES"):
        m = re.search(r"set\(\s*" + var + r"\b(.*?)\)", _strip_comments(cmake_text), re.S)
        items = []
        if m:
            for quoted, bare in _ITEM.findall(m.group(1)):
                item = quoted or bare
                items.append(item.replace("${MODULE_NAME}", module_name))
        result[var] = items
    return result


def _strip_comments(text: str) -> str:
    return "\n".join(line.split("#", 1)[0] if not line.lstrip().startswith("#") else "" for line in text.splitlines())


def differences(module_dir: Path) -> Tuple[List[str], List[str]]:
    """(missing, stale): files present but not listed, and listed names with no file."""
    module_dir = Path(module_dir)
    name = module_dir.name
    lists = listed_files((module_dir / "CMakeLists.txt").read_text(encoding="utf-8"), name)
    listed = set(lists["MODULE_PYTHON_SCRIPTS"]) | set(lists["MODULE_PYTHON_RESOURCES"])
    present = set(module_files(module_dir))
    return sorted(present - listed, key=_sort_key), sorted(listed - present, key=_sort_key)


def update(module_dir: Path) -> bool:
    """Rewrite the generated lists of ``module_dir/CMakeLists.txt``; return True when it changed."""
    module_dir = Path(module_dir)
    cmake = module_dir / "CMakeLists.txt"
    text = cmake.read_text(encoding="utf-8")
    if BEGIN not in text or END not in text:
        raise SystemExit(
            f"{cmake}: the marker comments '{BEGIN}' and '{END}' are missing; add them around the "
            "MODULE_PYTHON_SCRIPTS and MODULE_PYTHON_RESOURCES lists."
        )
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    new = head + render_lists(module_dir.name, module_files(module_dir)) + tail
    if new != text:
        cmake.write_text(new, encoding="utf-8")
        return True
    return False


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="only report differences; exit 1 if any")
    parser.add_argument("modules", nargs="*", default=list(MODULES), help="module folders (default: both modules)")
    args = parser.parse_args(argv)
    status = 0
    for name in args.modules:
        folder = REPO / name
        if args.check:
            missing, stale = differences(folder)
            for f in missing:
                print(f"{name}/CMakeLists.txt does not list {f}")
            for f in stale:
                print(f"{name}/CMakeLists.txt lists {f}, which does not exist")
            status |= bool(missing or stale)
        elif update(folder):
            print(f"updated {name}/CMakeLists.txt")
    return status


if __name__ == "__main__":
    sys.exit(main())
