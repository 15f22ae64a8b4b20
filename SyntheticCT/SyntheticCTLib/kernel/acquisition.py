"""What the scanner did: the echo times and field strength of an MRI acquisition, and where they are read.

A model reads the fat/water phase pattern of the echoes it was trained on; echoes far from those (another
field strength, another protocol) change that pattern, and the synthetic CT may be wrong while looking
plausible. This module holds the one rule that says when an echo time is "far" (:func:`echo_time_differs`,
used for DICOM echoes and for every other input), and reads an input's acquisition from what lies beside it:

- a JSON sidecar next to a volume file (BIDS / dcm2niix: same stem + ``.json``, ``EchoTime`` in seconds,
  ``MagneticFieldStrength`` in tesla): :func:`read_sidecar`;
- a case manifest (``case.json``: ``echo_times_ms`` and ``field_strength_t``, at its top level or in its
  ``parameters`` as a phantom writes them): :func:`acquisition_from_manifest`;
- DICOM tags kept on an image's metadata (``0018|0081`` EchoTime in ms, ``0018|0087`` MagneticFieldStrength):
  :func:`acquisition_from_metadata`.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, List, Mapping, Optional, Sequence

from SyntheticCTLib.kernel.errors import VolumeReadError
from SyntheticCTLib.kernel.types import PathLike

logger = logging.getLogger(__name__)

ECHO_TIME_TOLERANCE_MS = 0.5
"""An echo time differs from a reference when it is off by more than this (ms) ..."""
ECHO_TIME_TOLERANCE_FRACTION = 0.2
"""... and by more than this fraction of the reference."""
FIELD_STRENGTH_TOLERANCE_FRACTION = 0.1
"""A field strength differs from a reference when off by more than this fraction (2.89 T is 3 T, 1.5 T is not)."""
MAX_ECHO_TIME_S = 1.0
"""A sidecar ``EchoTime`` above this (seconds) is a unit mistake (milliseconds written as seconds)."""
MAX_FIELD_STRENGTH_T = 20.0

META_ECHO_TIME = "0018|0081"
META_FIELD_STRENGTH = "0018|0087"


def echo_time_differs(te_ms: float, reference_ms: float) -> bool:
    """True when ``te_ms`` is off ``reference_ms`` by more than 0.5 ms and more than 20 % of ``reference_ms``."""
    return abs(float(te_ms) - float(reference_ms)) > max(
        ECHO_TIME_TOLERANCE_MS, ECHO_TIME_TOLERANCE_FRACTION * abs(float(reference_ms))
    )


def field_strength_differs(field_t: float, reference_t: float) -> bool:
    """True when ``field_t`` is off ``reference_t`` by more than 10 % of it."""
    return abs(float(field_t) - float(reference_t)) > FIELD_STRENGTH_TOLERANCE_FRACTION * abs(float(reference_t))


def echo_time_warnings(echo_times: Sequence[Optional[float]], expected: Sequence[Optional[float]]) -> List[str]:
    """One line per echo whose TE differs from the expected one (:func:`echo_time_differs`); None is skipped."""
    out = []
    for k, (te, want) in enumerate(zip(echo_times, expected)):
        if te is None or want is None:
            continue
        if echo_time_differs(te, want):
            out.append(f"Echo {k + 1} has TE {te:g} ms where the model was trained with TE {want:g} ms.")
    return out


def format_echo_times(echo_times: Sequence[Optional[float]], field_strength_t: Optional[float] = None) -> str:
    """``"TE 2.3, 4.6, 6.9 ms at 1.5 T"`` (``?`` for an unknown echo time)."""
    tes = ", ".join("?" if t is None else f"{float(t):g}" for t in echo_times)
    text = f"TE {tes} ms" if echo_times else "echo times unknown"
    return text + (f" at {float(field_strength_t):g} T" if field_strength_t is not None else "")


@dataclass
class Acquisition:
    """The echo times (ms, one per channel, None where unknown) and field strength (T) of an input, and
    where they were read (a file name, for messages)."""

    echo_times_ms: List[Optional[float]] = field(default_factory=list)
    field_strength_t: Optional[float] = None
    source: str = ""

    @property
    def known(self) -> bool:
        """True when anything is known (an echo time or the field strength)."""
        return self.field_strength_t is not None or any(t is not None for t in self.echo_times_ms)

    def describe(self) -> str:
        return format_echo_times(self.echo_times_ms, self.field_strength_t)


def _finite(value: Any) -> Optional[float]:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def sidecar_path(path: PathLike) -> Path:
    """The JSON sidecar of a volume file: ``echo1.nii.gz`` -> ``echo1.json`` (dcm2niix and BIDS)."""
    path = Path(path)
    name = path.name
    for suffix in (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd"):
        if name.lower().endswith(suffix):
            return path.with_name(name[: -len(suffix)] + ".json")
    return path.with_name(path.stem + ".json")


def read_sidecar(path: PathLike) -> Optional[Acquisition]:
    """The echo time and field strength in the JSON sidecar of the volume file ``path`` (None: no sidecar).

    ``EchoTime`` is in seconds (BIDS, dcm2niix), returned in ms; ``MagneticFieldStrength`` in tesla.
    Either may be missing.

    Raises
    ------
    VolumeReadError
        The sidecar is not valid JSON, not an object, or holds an impossible value (an ``EchoTime``
        above 1 s is milliseconds written where seconds belong); the message names the sidecar.
    """
    sidecar = sidecar_path(path)
    if not sidecar.is_file():
        return None
    try:
        data = json.loads(sidecar.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as e:
        raise VolumeReadError(f"Could not read the JSON sidecar '{sidecar}' of '{path}': {e}") from e
    except ValueError as e:
        raise VolumeReadError(f"The JSON sidecar '{sidecar}' of '{path}' is not valid JSON: {e}") from e
    if not isinstance(data, dict):
        raise VolumeReadError(
            f"The JSON sidecar '{sidecar}' of '{path}' must hold an object, not {type(data).__name__}."
        )
    te_s = data.get("EchoTime")
    te_ms = None
    if te_s is not None:
        value = _finite(te_s)
        if value is None or not 0 < value <= MAX_ECHO_TIME_S:
            raise VolumeReadError(
                f"The JSON sidecar '{sidecar}' gives EchoTime {te_s!r}: BIDS and dcm2niix write it in seconds "
                f"(e.g. 0.0022 for 2.2 ms), a number in (0, {MAX_ECHO_TIME_S:g}]."
            )
        te_ms = round(value * 1000.0, 6)
    field_t = data.get("MagneticFieldStrength")
    b0 = None
    if field_t is not None:
        b0 = _finite(field_t)
        if b0 is None or not 0 < b0 <= MAX_FIELD_STRENGTH_T:
            raise VolumeReadError(
                f"The JSON sidecar '{sidecar}' gives MagneticFieldStrength {field_t!r}: a field strength in tesla, "
                f"in (0, {MAX_FIELD_STRENGTH_T:g}], is expected."
            )
    return Acquisition([te_ms], b0, str(sidecar))


def acquisition_from_sidecars(paths: Sequence[PathLike]) -> Optional[Acquisition]:
    """The acquisition of volume files (one per echo) from their JSON sidecars; None when none has one."""
    found = [read_sidecar(p) for p in paths]
    if all(a is None for a in found):
        return None
    tes = [a.echo_times_ms[0] if a is not None else None for a in found]
    fields = [a.field_strength_t for a in found if a is not None and a.field_strength_t is not None]
    sources = [a.source for a in found if a is not None]
    source = sources[0] if len(sources) == 1 else f"{sources[0]} (and {len(sources) - 1} more sidecars)"
    return Acquisition(tes, fields[0] if fields else None, source)


def acquisition_from_manifest(manifest: Mapping[str, Any], source: str = "case.json") -> Optional[Acquisition]:
    """The acquisition a case manifest gives: ``echo_times_ms`` and ``field_strength_t`` (top level, or in
    ``parameters`` as a phantom's ``case.json`` writes them); None when it gives neither."""
    if not isinstance(manifest, Mapping):
        return None
    params = manifest.get("parameters")
    params = params if isinstance(params, Mapping) else {}
    tes = manifest.get("echo_times_ms")
    if tes is None:
        tes = params.get("echo_times_ms")
    b0 = manifest.get("field_strength_t")
    if b0 is None:
        b0 = params.get("field_strength_t")
    echo_times = [_finite(t) for t in tes] if isinstance(tes, (list, tuple)) else []
    acquisition = Acquisition(echo_times, _finite(b0), source)
    return acquisition if acquisition.known else None


def acquisition_from_metadata(images: Sequence[Any], source: str = "DICOM tags") -> Optional[Acquisition]:
    """The acquisition in DICOM tags kept on SimpleITK images' metadata (EchoTime ms, MagneticFieldStrength T)."""

    def tag(image: Any, key: str) -> Optional[float]:
        try:
            if not image.HasMetaDataKey(key):
                return None
            return _finite(float(str(image.GetMetaData(key)).split("\\")[0]))
        except (AttributeError, RuntimeError, ValueError):
            return None

    tes = [tag(image, META_ECHO_TIME) for image in images]
    fields = [b for b in (tag(image, META_FIELD_STRENGTH) for image in images) if b is not None and b > 0]
    acquisition = Acquisition(tes, fields[0] if fields else None, source)
    return acquisition if acquisition.known else None


def _manifest_beside(paths: Sequence[Path]) -> Optional[Acquisition]:
    """The acquisition of the ``case.json`` in the files' folder when its ``"mri"`` lists exactly these files."""
    folder = paths[0].parent
    manifest_path = folder / "case.json"
    if not manifest_path.is_file():
        return None
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return None  # not ours to judge here: the files were named directly, not the case
    mri = manifest.get("mri") if isinstance(manifest, dict) else None
    if not isinstance(mri, list) or not all(isinstance(m, str) for m in mri):
        return None
    listed = [(folder / m).resolve() for m in mri]
    try:
        order = [listed.index(p.resolve()) for p in paths]
    except ValueError:
        return None
    found = acquisition_from_manifest(manifest, str(manifest_path))
    if found is None:
        return None
    tes = [found.echo_times_ms[k] for k in order] if len(found.echo_times_ms) == len(mri) else []
    return Acquisition(tes, found.field_strength_t, found.source)


def acquisition_for_files(
    paths: Sequence[PathLike], manifest: Optional[Mapping[str, Any]] = None, manifest_source: str = "case.json"
) -> Optional[Acquisition]:
    """The acquisition of MRI volume files (one per channel, in the model's order), from the first that gives one:

    1. ``manifest`` (a case's ``case.json`` content, the files in its ``"mri"`` order);
    2. the files' JSON sidecars (:func:`read_sidecar`; a malformed one is a :class:`VolumeReadError`);
    3. a ``case.json`` beside the files whose ``"mri"`` lists them (a phantom case given file by file).

    None when nothing is known.
    """
    paths = [Path(p) for p in paths]
    if not paths:
        return None
    if manifest is not None:
        found = acquisition_from_manifest(manifest, manifest_source)
        if found is not None:
            return found
    found = acquisition_from_sidecars(paths)
    if found is not None:
        return found
    return _manifest_beside(paths)


__all__ = [
    "Acquisition",
    "ECHO_TIME_TOLERANCE_FRACTION",
    "ECHO_TIME_TOLERANCE_MS",
    "FIELD_STRENGTH_TOLERANCE_FRACTION",
    "acquisition_for_files",
    "acquisition_from_manifest",
    "acquisition_from_metadata",
    "acquisition_from_sidecars",
    "echo_time_differs",
    "echo_time_warnings",
    "field_strength_differs",
    "format_echo_times",
    "read_sidecar",
    "sidecar_path",
]
