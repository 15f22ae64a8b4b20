"""A set of phantom cases in named groups, from a YAML file: e.g. a model's held-out set across the parameter space.

>>> spec = read_phantom_set("phantom-heldout.yaml")          # doctest: +SKIP
>>> write_phantom_set(spec, "heldout")                       # heldout/<group>/seed<N>/case.json

The file names ``defaults`` (``size``, ``spacing``, ``options``) and ``groups``, each with a ``name``, its
``seeds`` and what it changes (``size``, ``spacing``, ``options`` as :func:`~.generator.make_phantom` takes
them, ``field_strength`` among them) and optionally ``expect: warning`` (the model's input check must warn on
these cases; an evaluation reports them apart). A seed appears once in the whole set. Each case's
``case.json`` records its ``group`` and ``expect``.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple, Union

from SyntheticCTLib.kernel.errors import InvalidParameterError
from SyntheticCTLib.kernel.progress import CancelToken, ProgressCallback, no_progress, with_cancel
from SyntheticCTLib.phantom.case import MANIFEST, write_phantom
from SyntheticCTLib.phantom.generator import OPTIONS, make_phantom

logger = logging.getLogger(__name__)

EXPECTATIONS = ("served", "warning")
"""``served``: the model is meant to serve the group (held to the goals); ``warning``: its input check must warn."""


@dataclass(frozen=True)
class PhantomGroup:
    """One group of a phantom set: the phantoms of ``seeds`` with one set of parameters."""

    name: str
    seeds: Tuple[int, ...]
    size: Tuple[int, int, int]
    spacing: float
    options: Dict[str, Any] = field(default_factory=dict)
    expect: str = "served"


@dataclass(frozen=True)
class PhantomSet:
    """Groups of phantoms read from a file (:func:`read_phantom_set`)."""

    name: str
    groups: Tuple[PhantomGroup, ...]
    source: Optional[Path] = None

    @property
    def seeds(self) -> List[int]:
        return [s for g in self.groups for s in g.seeds]


def _mapping(value: Any, where: str) -> Dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise InvalidParameterError(f"{where} must be a mapping; got {value!r}.")
    return dict(value)


def _group(raw: Any, defaults: Dict[str, Any], where: str) -> PhantomGroup:
    entry = _mapping(raw, where)
    unknown = sorted(set(entry) - {"name", "seeds", "size", "spacing", "options", "expect"})
    if unknown:
        raise InvalidParameterError(f"{where}: unknown key(s) {unknown}.")
    name = str(entry.get("name") or "").strip()
    if not name or "/" in name or "\\" in name or name.startswith("."):
        raise InvalidParameterError(f"{where}: every group needs a name usable as a folder name; got {name!r}.")
    seeds = entry.get("seeds")
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) and s >= 0 for s in seeds):
        raise InvalidParameterError(f"{where} ({name}): seeds must be a non-empty list of integers >= 0.")
    size = entry.get("size", defaults.get("size", [192, 192, 128]))
    if not isinstance(size, list) or len(size) != 3 or not all(isinstance(n, int) and n > 0 for n in size):
        raise InvalidParameterError(f"{where} ({name}): size must be three positive integers; got {size!r}.")
    spacing = entry.get("spacing", defaults.get("spacing", 1.0))
    if not isinstance(spacing, (int, float)) or spacing <= 0:
        raise InvalidParameterError(f"{where} ({name}): spacing must be a positive number of mm; got {spacing!r}.")
    options = {**_mapping(defaults.get("options"), "defaults.options"), **_mapping(entry.get("options"), where)}
    allowed = set(OPTIONS) | {"field_strength"}
    bad = sorted(set(options) - allowed)
    if bad:
        raise InvalidParameterError(f"{where} ({name}): unknown phantom option(s) {bad}; known: {sorted(allowed)}.")
    expect = str(entry.get("expect", "served"))
    if expect not in EXPECTATIONS:
        raise InvalidParameterError(f"{where} ({name}): expect must be one of {EXPECTATIONS}; got {expect!r}.")
    return PhantomGroup(name, tuple(seeds), tuple(size), float(spacing), options, expect)


def parse_phantom_set(document: Any, *, source: Optional[Path] = None) -> PhantomSet:
    """A :class:`PhantomSet` from a parsed document; :class:`InvalidParameterError` names the problem."""
    where = f"'{source}'" if source else "the phantom set"
    doc = _mapping(document, where)
    defaults = _mapping(doc.get("defaults"), f"{where}: defaults")
    raw_groups = doc.get("groups")
    if not isinstance(raw_groups, list) or not raw_groups:
        raise InvalidParameterError(f"{where}: 'groups' must be a non-empty list of groups.")
    groups = tuple(_group(g, defaults, f"{where}: groups[{i}]") for i, g in enumerate(raw_groups))
    names = [g.name for g in groups]
    seeds = [s for g in groups for s in g.seeds]
    for label, values in (("group name", names), ("seed", seeds)):
        repeated = sorted({v for v in values if values.count(v) > 1})
        if repeated:
            raise InvalidParameterError(f"{where}: each {label} may appear once; repeated: {repeated}.")
    return PhantomSet(str(doc.get("name") or (source.stem if source else "phantom-set")), groups, source)


def read_phantom_set(path: Union[str, Path]) -> PhantomSet:
    """Read a phantom set from a YAML (or JSON) file."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise InvalidParameterError(f"No phantom set file at '{path}'.")
    try:
        document = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise InvalidParameterError(f"'{path}' is not a readable YAML phantom set: {e}") from e
    return parse_phantom_set(document, source=path)


def case_folder(out_dir: Union[str, Path], group: PhantomGroup, seed: int) -> Path:
    """Where :func:`write_phantom_set` writes one case: ``out_dir/<group>/seed<N>``."""
    return Path(out_dir) / group.name / f"seed{seed}"


def _written(folder: Path, group: PhantomGroup, seed: int) -> bool:
    """True when ``folder`` holds a complete case of exactly this group and seed (a rerun skips it)."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return manifest.get("set_case") == _case_key(group, seed)


def _case_key(group: PhantomGroup, seed: int) -> Dict[str, Any]:
    return {
        "group": group.name,
        "seed": int(seed),
        "size": list(group.size),
        "spacing": group.spacing,
        "options": group.options,
        "expect": group.expect,
    }


def write_phantom_set(
    spec: PhantomSet,
    out_dir: Union[str, Path],
    *,
    progress: Optional[ProgressCallback] = None,
    cancel: Optional[CancelToken] = None,
) -> List[Path]:
    """Write every case of ``spec`` under ``out_dir/<group>/seed<N>``; return the ``case.json`` paths.

    A case already written with the same parameters is kept (a rerun completes an interrupted set).
    """
    report = with_cancel(progress or no_progress, cancel)
    jobs = [(g, s) for g in spec.groups for s in g.seeds]
    paths = []
    for i, (group, seed) in enumerate(jobs):
        report(i / len(jobs), "phantom set", f"{group.name}: seed {seed}")
        folder = case_folder(out_dir, group, seed)
        if not _written(folder, group, seed):
            phantom = make_phantom(seed, size=group.size, spacing=group.spacing, **group.options)
            write_phantom(
                phantom, folder, extra={"group": group.name, "expect": group.expect, "set_case": _case_key(group, seed)}
            )
        paths.append(folder / MANIFEST)
    report(1.0, "phantom set", f"{len(jobs)} cases")
    logger.info("Phantom set '%s': %d cases in %d groups under %s.", spec.name, len(jobs), len(spec.groups), out_dir)
    return paths
