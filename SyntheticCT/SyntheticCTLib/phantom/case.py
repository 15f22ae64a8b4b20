"""A phantom case on disk: the volumes plus ``case.json``, and reading a case back."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, List, Mapping, Optional, Tuple, Union

from SyntheticCTLib import NOT_FOR_DIAGNOSTIC_USE
from SyntheticCTLib.kernel.errors import VolumeReadError, VolumeWriteError
from SyntheticCTLib.kernel.io import atomic_output, ensure_output_dir, write_volume
from SyntheticCTLib.kernel.progress import ProgressCallback, no_progress
from SyntheticCTLib.phantom import tissues as T

logger = logging.getLogger(__name__)

MANIFEST = "case.json"
SCHEMA_VERSION = 1
REQUIRED_KEYS = ("mri", "ct", "labels")


@dataclass(frozen=True)
class Case:
    """The files of one case, as named by its ``case.json``."""

    mri_paths: List[Path]
    ct_path: Path
    labels_path: Path
    bone_labels_path: Optional[Path]
    manifest: dict = field(default_factory=dict)

    @property
    def root(self) -> Path:
        return self.ct_path.parent

    @property
    def echo_times_ms(self) -> Optional[List[float]]:
        params = self.manifest.get("parameters", {})
        return params.get("echo_times_ms")


def write_phantom(
    phantom,
    out_dir: Union[str, Path],
    *,
    progress: Optional[ProgressCallback] = None,
    extra: Optional[Mapping[str, Any]] = None,
) -> Path:
    """Write ``phantom`` to ``out_dir`` (created if needed); return the path of its ``case.json``.

    ``extra`` adds keys to ``case.json`` (e.g. the group of a phantom set); it cannot replace the standard ones.

    Files: ``mri_echo1.nii.gz`` ... (one per echo), ``ct.nii.gz``, ``labels.nii.gz``,
    ``bone_labels.nii.gz`` and ``case.json``. Every file is written atomically; the manifest is
    written last, so a folder with a ``case.json`` is complete.

    Raises
    ------
    VolumeWriteError
        The folder cannot be created or written.
    """
    report = progress or no_progress
    out = ensure_output_dir(out_dir, what="phantom folder")
    volumes = [(f"mri_echo{i + 1}.nii.gz", image) for i, image in enumerate(phantom.mri)]
    volumes += [
        ("ct.nii.gz", phantom.ct),
        ("labels.nii.gz", phantom.labels),
        ("bone_labels.nii.gz", phantom.bone_labels),
    ]
    for i, (name, image) in enumerate(volumes):
        report(i / (len(volumes) + 1), "phantom: writing", name)
        write_volume(image, out / name)
    params = phantom.params
    tes = params.get("echo_times_ms", [])
    manifest = {
        "schema_version": SCHEMA_VERSION,
        "kind": "syntheticct-phantom",
        "note": NOT_FOR_DIAGNOSTIC_USE,
        "mri": [name for name, _ in volumes[: len(phantom.mri)]],
        "mri_names": [f"echo {i + 1} (TE {te:g} ms)" for i, te in enumerate(tes)],
        "ct": "ct.nii.gz",
        "labels": "labels.nii.gz",
        "bone_labels": "bone_labels.nii.gz",
        "tissues": {str(k): v for k, v in T.TISSUES.items()},
        "bone_tissue_labels": list(T.BONE_LABELS),
        "seed": params.get("seed"),
        "n_vertebrae": params.get("n_vertebrae"),
        "echo_times_ms": tes,
        "field_strength_t": params.get("field_strength_t"),
        "parameters": params,
    }
    clashes = sorted(set(extra or {}) & set(manifest))
    if clashes:
        raise ValueError(f"write_phantom: extra keys {clashes} would replace standard case.json keys.")
    manifest.update(extra or {})
    path = out / MANIFEST
    try:
        with atomic_output(path) as tmp:
            tmp.write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
    except OSError as e:
        if isinstance(e, VolumeWriteError):
            raise
        raise VolumeWriteError(f"Could not write '{path}': {e.strerror or e}.") from e
    report(1.0, "phantom: writing", MANIFEST)
    logger.info("Wrote phantom case (seed %s) to %s", params.get("seed"), out)
    return path


def read_manifest(path: Union[str, Path]) -> Tuple[Path, dict]:
    """Find and parse a ``case.json`` (or the one in the folder ``path``); return its path and content.

    Raises :class:`VolumeReadError` naming the file when it is missing, unreadable or not a JSON object.
    """
    path = Path(path)
    manifest_path = path / MANIFEST if path.is_dir() else path
    if not manifest_path.is_file():
        raise VolumeReadError(f"No case manifest at '{manifest_path}'.")
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise VolumeReadError(f"Could not read the case manifest '{manifest_path}': {e}.") from e
    if not isinstance(manifest, dict):
        raise VolumeReadError(f"The case manifest '{manifest_path}' is not a JSON object.")
    return manifest_path, manifest


def load_case(path: Union[str, Path]) -> Case:
    """Read a ``case.json`` (or the folder holding one) and check that the files it names exist.

    Raises
    ------
    VolumeReadError
        No manifest, invalid JSON, a missing key or a missing file; the message names it.
    """
    manifest_path, manifest = read_manifest(path)
    missing = [k for k in REQUIRED_KEYS if k not in manifest]
    if missing:
        raise VolumeReadError(f"The case manifest '{manifest_path}' lacks the key(s) {', '.join(missing)}.")
    mri = manifest["mri"]
    if isinstance(mri, str):
        mri = [mri]
    if not isinstance(mri, list) or not mri or not all(isinstance(m, str) for m in mri):
        raise VolumeReadError(f"'mri' in '{manifest_path}' must be a non-empty list of file names.")
    root = manifest_path.parent

    def resolve(name: str, key: str) -> Path:
        if not isinstance(name, str) or not name:
            raise VolumeReadError(f"'{key}' in '{manifest_path}' must be a file name.")
        p = (root / name).resolve()
        if not p.exists():
            raise VolumeReadError(f"The case manifest '{manifest_path}' names '{name}' ({key}), which does not exist.")
        return p

    bone = manifest.get("bone_labels")
    return Case(
        mri_paths=[resolve(m, "mri") for m in mri],
        ct_path=resolve(manifest["ct"], "ct"),
        labels_path=resolve(manifest["labels"], "labels"),
        bone_labels_path=resolve(bone, "bone_labels") if bone else None,
        manifest=manifest,
    )
