"""Writing a registration's files: the transform, each bone's transform, the resampled image and the record.

:func:`plan_outputs` checks the output paths before a (long) registration runs; :func:`write_registration`
writes everything or nothing: on a failure it removes what it already wrote. The record (``T.tfm.json``
beside ``T.tfm`` by default) is :meth:`.RegistrationResult.to_dict` with the file names added.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterable, List, Optional

import SimpleITK as sitk

from SyntheticCTLib.kernel.errors import InvalidParameterError
from SyntheticCTLib.kernel.io import PathLike, check_not_input, volume_suffix, write_volume
from SyntheticCTLib.kernel.jsonio import write_json
from SyntheticCTLib.kernel.progress import ProgressCallback, no_progress
from SyntheticCTLib.registration.registration import RegistrationResult, resample_moving
from SyntheticCTLib.registration.transforms_io import (
    TRANSFORM_SUFFIXES,
    bone_transform_path,
    record_path,
    transform_suffix,
    write_transform,
)

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RegistrationOutputs:
    """Where a registration's files go: the transform, the JSON record and (optionally) the resampled image."""

    transform: Path
    record: Path
    resampled: Optional[Path] = None


def plan_outputs(
    transform: PathLike,
    *,
    record: Optional[PathLike] = None,
    resampled: Optional[PathLike] = None,
    inputs: Iterable[PathLike] = (),
) -> RegistrationOutputs:
    """Check the output paths (suffixes, distinct, none an input); ``record`` defaults to ``TRANSFORM.json``.

    Raises
    ------
    InvalidParameterError
        A wrong suffix or two outputs that are the same file.
    VolumeWriteError
        An output is one of ``inputs``.
    """
    transform_path = Path(transform)
    record_file = Path(record) if record else record_path(transform_path)
    resampled_path = Path(resampled) if resampled else None
    if not transform_suffix(transform_path):
        raise InvalidParameterError(
            f"The transform '{transform_path}' must end with one of {', '.join(TRANSFORM_SUFFIXES)}."
        )
    if resampled_path is not None and not volume_suffix(resampled_path):
        raise InvalidParameterError(
            f"The resampled image '{resampled_path}' needs a volume suffix (.nii.gz, .nrrd, .mha...)."
        )
    if record_file.suffix.lower() != ".json":
        raise InvalidParameterError(f"The JSON summary '{record_file}' must end with .json.")
    outputs = [transform_path, record_file] + ([resampled_path] if resampled_path else [])
    if len({p.resolve() for p in outputs}) != len(outputs):
        raise InvalidParameterError("The transform, JSON and resampled outputs must be different files.")
    inputs = list(inputs)
    for out in outputs:
        check_not_input(out, inputs)
    return RegistrationOutputs(transform_path, record_file, resampled_path)


def write_registration(
    result: RegistrationResult,
    outputs: RegistrationOutputs,
    *,
    fixed: Optional[sitk.Image] = None,
    moving: Optional[sitk.Image] = None,
    sources: Optional[Dict[str, str]] = None,
    inputs: Iterable[PathLike] = (),
    progress: Optional[ProgressCallback] = None,
) -> Dict[str, Path]:
    """Write ``result``'s files; return ``{name: path}`` (``transform``, ``bone<label>``, ``resampled``, ``record``).

    ``fixed`` and ``moving`` are needed when ``outputs.resampled`` is set (the moving image resampled onto
    the fixed grid). Each bone-local bone's transform goes to :func:`.transforms_io.bone_transform_path`
    and its file name into the record's ``per_bone`` entry. ``sources`` (e.g. ``{"fixed": path, "moving":
    path}``) is copied into the record. All or nothing: on a failure the files already written are removed.
    """
    report = progress or no_progress
    inputs = list(inputs)
    if outputs.resampled is not None and (fixed is None or moving is None):
        raise InvalidParameterError("Writing the resampled image needs the fixed and the moving image.")
    written: Dict[str, Path] = {}
    try:
        report(0.0, "writing", f"transform {outputs.transform.name}")
        written["transform"] = write_transform(result.transform, outputs.transform, inputs=inputs)
        record = result.to_dict()
        for bone, entry in zip(result.per_bone, record["per_bone"]):
            path = bone_transform_path(outputs.transform, bone["label"])
            check_not_input(path, inputs)
            written[f"bone{int(bone['label'])}"] = write_transform(bone["transform"], path, inputs=inputs)
            entry["file"] = path.name
        if outputs.resampled is not None:
            report(0.5, "writing", f"resampled image {outputs.resampled.name}")
            resampled = resample_moving(moving, fixed, result.transform)
            written["resampled"] = write_volume(resampled, outputs.resampled, inputs=inputs)
        record.update(sources or {})
        record.update(
            transform_file=str(outputs.transform),
            resampled_file=str(outputs.resampled) if outputs.resampled else None,
        )
        check_not_input(outputs.record, inputs)
        write_json(outputs.record, record)
        written["record"] = outputs.record
    except BaseException:
        _remove(list(written.values()))
        raise
    report(1.0, "writing", f"record {outputs.record.name}")
    logger.info("Wrote the registration: %s", ", ".join(p.name for p in written.values()))
    return written


def _remove(paths: List[Path]) -> None:
    for path in paths:
        try:
            path.unlink()
        except OSError:
            pass
