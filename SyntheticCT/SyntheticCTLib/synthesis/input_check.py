"""Check MRI inputs against a model card before inference, and say in plain words what differs.

A model only knows the kind of data it was trained on. :func:`check_inputs` compares the input
volumes with the model card (``model.json``): the number of channels, the voxel size, the field of
view, the orientation and the intensity statistics inside the body. It returns warnings, one
sentence each, that a GUI can show before the user runs the model; an empty list means that nothing
stands out. It never refuses an input: the command line does that for inputs that cannot work.

Card fields read (all optional except ``inputs``)::

    inputs                        one entry per channel (its label or name is used in messages)
    spacing_mm, patch_size        the model's working voxel size and patch
    orientation                   "input", a 3-letter code ("LPS", ...) or {"training": code, "inference": ...}
                                  (read by models.package.card_orientation; only a model that runs on the
                                  input's own axes warns about the input's orientation)
    training_data.spacing_mm      voxel size of the training data: [x, y, z], or {"min": [...], "max": [...]}
    training_data.fov_mm          field of view of the training data: [x, y, z], or {"min": [...], "max": [...]}
    training_data.input_statistics  per channel {"p1", "p50", "p99"}: raw intensities inside the body
    training_data.protocols       the acquisitions trained on: [{"field_strength_t", "echo_times_ms", ...}]
                                  (without it, one protocol from inputs[].echo_time_ms; models.package.card_protocols)

Intensity scale differs between scanners, and the model normalises each channel, so the statistics
are compared through scale-free ratios: the shape of each channel's distribution
((p99 - p50) / (p50 - p1)) and the median of each channel relative to the first (for echoes: the signal decay with echo time).

When the input's acquisition is known (:class:`~SyntheticCTLib.kernel.acquisition.Acquisition`: DICOM headers, a
JSON sidecar, a case manifest), its echo times and field strength are compared with every protocol of the card,
by the rule of :func:`~SyntheticCTLib.kernel.acquisition.echo_time_differs`: within it for one protocol is fine.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import SimpleITK as sitk

from SyntheticCTLib.kernel.acquisition import (
    Acquisition,
    echo_time_differs,
    field_strength_differs,
    format_echo_times,
)
from SyntheticCTLib.kernel.errors import InvalidParameterError
from SyntheticCTLib.kernel.masks import mri_body_mask
from SyntheticCTLib.models.package import card_orientation, card_protocols

logger = logging.getLogger(__name__)

# How far a quantity may stray from the training data before a warning (a factor either way).
SPACING_FACTOR = 1.5
FOV_FACTOR = 1.5
SPREAD_FACTOR = 10.0  # distribution shapes vary a lot with body habitus: flag only gross differences
CHANNEL_RATIO_FACTOR = 1.5
OBLIQUE_DEGREES = 10.0
GRID_TOLERANCE = 1e-3


def _label(entry: Any, index: int) -> str:
    if isinstance(entry, Mapping):
        if entry.get("label"):
            return str(entry["label"])
        if entry.get("echo_time_ms") is not None:
            return f"echo {entry.get('echo', index + 1)} (TE {float(entry['echo_time_ms']):g} ms)"
        if entry.get("name"):
            return str(entry["name"])
    elif isinstance(entry, str) and entry:
        return entry
    return f"input {index + 1}"


def input_labels(card: Mapping[str, Any]) -> List[str]:
    """The labels of the inputs a model card expects, e.g. ``["echo 1 (TE 2.2 ms)", ...]``."""
    return [_label(e, i) for i, e in enumerate(card.get("inputs") or [])]


def body_mask(images: Sequence[sitk.Image]) -> np.ndarray:
    """A boolean body mask ``(z, y, x)``: the inference's (:func:`~SyntheticCTLib.kernel.masks.mri_body_mask`).

    The training measured the card's ``input_statistics`` inside that same mask, so the input check
    compares like with like. Signal outside the body is noise, so the statistics are taken inside it.
    """
    array = mri_body_mask([sitk.GetArrayViewFromImage(image) for image in images])
    if array.sum() < 10:  # a flat or empty image: use everything
        array = np.ones_like(array, dtype=bool)
    return array


def input_statistics(images: Sequence[sitk.Image], mask: Optional[np.ndarray] = None) -> List[Dict[str, float]]:
    """Per channel ``{"p1", "p50", "p99"}`` of the raw intensities inside the body (a card's format).

    ``mask`` (``(z, y, x)``, bool) defaults to :func:`body_mask`; all images must share one grid. An empty
    mask means the whole image. The training writes the card's statistics with this function.
    """
    if mask is None:
        mask = body_mask(images)
    stats = []
    for image in images:
        values = sitk.GetArrayViewFromImage(image)[mask].astype(np.float64)
        if values.size == 0:
            values = sitk.GetArrayViewFromImage(image).ravel().astype(np.float64)
        p1, p50, p99 = np.percentile(values, [1, 50, 99]) if values.size else (math.nan,) * 3
        stats.append({"p1": float(p1), "p50": float(p50), "p99": float(p99)})
    return stats


def orientation_code(image: sitk.Image) -> str:
    """The closest 3-letter anatomical orientation of the image axes in ITK's LPS convention, e.g. ``"LPS"``.

    Each letter names the direction in which the index along that axis grows (L, P, S or R, A, I).
    """
    direction = np.array(image.GetDirection(), dtype=float).reshape(3, 3)
    letters = (("L", "R"), ("P", "A"), ("S", "I"))
    code = ""
    for column in range(3):
        axis = direction[:, column]
        world = int(np.argmax(np.abs(axis)))
        code += letters[world][0 if axis[world] > 0 else 1]
    return code


def obliquity_degrees(image: sitk.Image) -> float:
    """The largest angle between an image axis and the nearest world axis, in degrees."""
    direction = np.array(image.GetDirection(), dtype=float).reshape(3, 3)
    cosines = np.clip(np.abs(direction).max(axis=0), -1.0, 1.0)
    return float(np.degrees(np.arccos(cosines)).max())


def _range3(value: Any) -> Optional[Tuple[np.ndarray, np.ndarray]]:
    """A card's ``[x, y, z]`` or ``{"min": [...], "max": [...]}`` (or ``[[min], [max]]``) as (low, high)."""
    try:
        if isinstance(value, Mapping) and "min" in value and "max" in value:
            lo, hi = np.asarray(value["min"], dtype=float), np.asarray(value["max"], dtype=float)
        else:
            arr = np.asarray(value, dtype=float)
            if arr.shape == (3,):
                lo = hi = arr
            elif arr.shape == (2, 3):
                lo, hi = arr[0], arr[1]
            else:
                return None
    except (TypeError, ValueError):
        return None
    if lo.shape != (3,) or hi.shape != (3,) or not (np.all(np.isfinite(lo)) and np.all(np.isfinite(hi))):
        return None
    return np.minimum(lo, hi), np.maximum(lo, hi)


def _fmt3(values: Sequence[float], unit: str = "mm") -> str:
    return " x ".join(f"{float(v):.3g}" for v in values) + f" {unit}"


def _describe_range(lo: np.ndarray, hi: np.ndarray) -> str:
    return _fmt3(lo) if np.allclose(lo, hi) else f"{_fmt3(lo)} to {_fmt3(hi)}"


def _training(card: Mapping[str, Any]) -> Mapping[str, Any]:
    data = card.get("training_data")
    return data if isinstance(data, Mapping) else {}


def _check_grids(images: Sequence[sitk.Image], labels: Sequence[str]) -> List[str]:
    warnings = []
    ref = images[0]
    for image, label in zip(images[1:], labels[1:]):
        same = (
            image.GetSize() == ref.GetSize()
            and np.allclose(image.GetSpacing(), ref.GetSpacing(), atol=GRID_TOLERANCE)
            and np.allclose(image.GetOrigin(), ref.GetOrigin(), atol=GRID_TOLERANCE * 10)
            and np.allclose(image.GetDirection(), ref.GetDirection(), atol=GRID_TOLERANCE)
        )
        if not same:
            warnings.append(
                f"The {label} volume does not share the voxel grid of the {labels[0]} volume; it will be "
                "resampled onto it. Make sure both come from the same acquisition, or register them first."
            )
    return warnings


def _check_spacing(image: sitk.Image, card: Mapping[str, Any]) -> List[str]:
    spacing = np.array(image.GetSpacing(), dtype=float)
    trained = _range3(_training(card).get("spacing_mm"))
    if trained is None:
        trained = _range3(card.get("spacing_mm"))
    if trained is None:
        return []
    lo, hi = trained
    if np.any(spacing > hi * SPACING_FACTOR):
        return [
            f"The voxels ({_fmt3(spacing)}) are much coarser than the training data's ({_describe_range(lo, hi)}): "
            "thin structures such as the cortical bone may be lost, and the synthetic CT will look blurred."
        ]
    if np.any(spacing < lo / SPACING_FACTOR):
        return [
            f"The voxels ({_fmt3(spacing)}) are much finer than the training data's ({_describe_range(lo, hi)}): "
            "the volume will be resampled to the model's voxel size, so the synthetic CT will not be sharper "
            "than the training data, and inference will take longer."
        ]
    return []


def _check_fov(image: sitk.Image, card: Mapping[str, Any]) -> List[str]:
    fov = np.array(image.GetSize(), dtype=float) * np.array(image.GetSpacing(), dtype=float)
    warnings = []
    trained = _range3(_training(card).get("fov_mm"))
    if trained is not None:
        lo, hi = trained
        if np.any(fov > hi * FOV_FACTOR):
            warnings.append(
                f"The field of view ({_fmt3(fov)}) is much larger than the training data's "
                f"({_describe_range(lo, hi)}): anatomy the model never saw may come out wrong."
            )
        elif np.any(fov < lo / FOV_FACTOR):
            warnings.append(
                f"The field of view ({_fmt3(fov)}) is much smaller than the training data's "
                f"({_describe_range(lo, hi)}): the model sees little context, and the edges of the "
                "synthetic CT are less reliable."
            )
    patch = card.get("patch_size")
    spacing_model = _range3(card.get("spacing_mm"))
    if patch is not None and spacing_model is not None:
        try:
            patch_mm = np.asarray(patch, dtype=float) * spacing_model[0]
        except (TypeError, ValueError):
            patch_mm = None
        if patch_mm is not None and patch_mm.shape == (3,) and np.any(fov < patch_mm / 2):
            warnings.append(
                f"The volume ({_fmt3(fov)}) is smaller than half the model's patch ({_fmt3(patch_mm)}): it "
                "will be padded, and the synthetic CT may be unreliable."
            )
    return warnings


def _check_orientation(image: sitk.Image, card: Mapping[str, Any]) -> List[str]:
    warnings = []
    angle = obliquity_degrees(image)
    if angle > OBLIQUE_DEGREES:
        warnings.append(
            f"The volume is oblique: its axes are tilted by up to {angle:.0f} degrees from the patient "
            "axes. The model was trained on straight slices; the volume will be sampled as it is, "
            "and the result may be less accurate."
        )
    try:
        expected, flipped_to = card_orientation(card)
    except ValueError:  # a malformed card is the loader's to refuse, not a property of the input
        expected, flipped_to = None, None
    actual = orientation_code(image)
    if expected is not None and flipped_to is None and actual != expected:
        warnings.append(
            f"The volume's axes run {actual} (ITK convention) while the model was trained on {expected} "
            "volumes: check that the slices are not flipped or swapped."
        )
    return warnings


def _order_from_headers(acquisition: Optional[Acquisition], card: Mapping[str, Any], n_channels: int) -> bool:
    """True when the input's echo times are all known and in the order of every protocol's (the headers say
    the channels are in the model's order: a change of echo medians then comes from the echo times)."""
    if acquisition is None or len(acquisition.echo_times_ms) != n_channels:
        return False
    tes = acquisition.echo_times_ms
    if any(t is None for t in tes) or len(set(tes)) != len(tes):
        return False
    order = list(np.argsort(tes, kind="stable"))
    known = [p["echo_times_ms"] for p in card_protocols(card) if None not in p["echo_times_ms"]]
    return bool(known) and all(list(np.argsort(r, kind="stable")) == order for r in known)


def _check_statistics(
    stats: Sequence[Mapping[str, float]], card: Mapping[str, Any], labels: Sequence[str], order_known: bool = False
) -> List[str]:
    trained = _training(card).get("input_statistics")
    if not isinstance(trained, Sequence) or len(trained) != len(stats):
        return []
    warnings = []
    for label, s in zip(labels, stats):
        if s["p1"] < -0.01 * max(abs(s["p99"]), 1e-12):
            warnings.append(
                f"The {label} volume has negative intensities inside the body (1st percentile "
                f"{s['p1']:.3g}): a magnitude image is expected, not a phase or a difference image."
            )
    # Channel medians relative to the first channel (scanner scaling cancels): e.g. echo decay.
    try:
        ratios = [s["p50"] / stats[0]["p50"] for s in stats]
        t_ratios = [float(t["p50"]) / float(trained[0]["p50"]) for t in trained]
    except (KeyError, TypeError, ValueError, ZeroDivisionError):
        ratios, t_ratios = [], []
    if len(stats) > 1 and ratios and all(np.isfinite(ratios)) and all(np.isfinite(t_ratios)):
        distinct = len(set(np.round(t_ratios, 2))) == len(t_ratios)
        swapped = not np.array_equal(np.argsort(t_ratios, kind="stable"), np.argsort(ratios, kind="stable"))
        if distinct and swapped and not order_known:
            # A swapped input explains every other difference: say only that.
            return warnings + [
                "The inputs seem to be in a different order than the model expects ("
                + ", ".join(labels)
                + "): the median brightness of the channels does not follow the "
                "training data's order. Check which volume goes to which input."
            ]
        for label, r, t in zip(labels[1:], ratios[1:], t_ratios[1:]):
            if t > 0 and (r > t * CHANNEL_RATIO_FACTOR or r < t / CHANNEL_RATIO_FACTOR):
                warnings.append(
                    f"The {label} volume's median is {r:.2g} times the {labels[0]} volume's, against "
                    f"{t:.2g} in training: the echo times or the sequence may differ."
                )
    for label, s, t in zip(labels, stats, trained):
        try:
            t_p1, t_p50, t_p99 = float(t["p1"]), float(t["p50"]), float(t["p99"])
        except (KeyError, TypeError, ValueError):
            continue
        # Shape of the intensity distribution, free of scale and offset: upper spread over lower spread.
        if s["p50"] - s["p1"] <= 0 or t_p50 - t_p1 <= 0 or t_p99 - t_p50 <= 0:
            continue
        shape = (s["p99"] - s["p50"]) / (s["p50"] - s["p1"])
        t_shape = (t_p99 - t_p50) / (t_p50 - t_p1)
        if shape > t_shape * SPREAD_FACTOR or shape < t_shape / SPREAD_FACTOR:
            brighter = "brighter" if shape > t_shape else "darker"
            warnings.append(
                f"The {label} volume's contrast differs from the training data: its brightest tissue "
                f"is much {brighter}, relative to the rest, than in the training data. Check the sequence "
                "and its parameters (or a contrast agent)."
            )
    return warnings


def _fits_protocol(acquisition: Acquisition, protocol: Mapping[str, Any], n_channels: int) -> bool:
    """True when every known echo time and the field strength (where both sides state it) fit ``protocol``."""
    b0, reference_b0 = acquisition.field_strength_t, protocol.get("field_strength_t")
    if b0 is not None and reference_b0 is not None and field_strength_differs(b0, reference_b0):
        return False
    tes = list(acquisition.echo_times_ms)
    if len(tes) != n_channels or all(t is None for t in tes):
        return True  # echo times unknown (or not one per channel): only the field strength says anything
    reference = list(protocol.get("echo_times_ms") or [])
    if len(reference) != len(tes):
        return False
    return not any(t is not None and r is not None and echo_time_differs(t, r) for t, r in zip(tes, reference))


def check_acquisition(
    acquisition: Optional[Acquisition], card: Mapping[str, Any], n_channels: Optional[int] = None
) -> List[str]:
    """A warning when the input's echo times (and field strength) fit none of the card's protocols.

    Each protocol (:func:`~SyntheticCTLib.models.package.card_protocols`) is compared echo by echo with
    :func:`~SyntheticCTLib.kernel.acquisition.echo_time_differs` (more than 0.5 ms and 20 % off) and by field
    strength (:func:`~SyntheticCTLib.kernel.acquisition.field_strength_differs`); fitting one is enough.
    Nothing known on either side: no warning.
    """
    if acquisition is None or not acquisition.known:
        return []
    protocols = card_protocols(card)
    if not protocols:
        return []
    n = len(card.get("inputs") or []) if n_channels is None else n_channels
    if any(_fits_protocol(acquisition, p, n) for p in protocols):
        return []
    tes = acquisition.echo_times_ms if len(acquisition.echo_times_ms) == n else []
    given = format_echo_times(tes, acquisition.field_strength_t) if tes else (f"{acquisition.field_strength_t:g} T")
    trained = "; ".join(format_echo_times(p["echo_times_ms"], p.get("field_strength_t")) for p in protocols)
    where = f" (from {acquisition.source})" if acquisition.source else ""
    return [
        f"The input was acquired with {given}{where}, which matches none of the protocols the model was "
        f"trained on ({trained}): echoes far from the training's change the fat/water phase pattern the model "
        "reads, so the synthetic CT may be wrong while looking plausible."
    ]


LABEL_MAP_MAX_VALUES = 32
"""An integer image with at most this many distinct values is a label map, not an MRI."""

CT_AIR_FRACTION = 0.05
"""A channel with at least this fraction of its voxels below -500 looks like a CT (air near -1000 HU)."""


def _check_content(images: Sequence[sitk.Image], labels: Sequence[str]) -> List[str]:
    """What each channel is: an RGB picture, a CT, a label map, an 8-bit export; and channels that repeat."""
    warnings: List[str] = []
    arrays = []
    for label, image in zip(labels, images):
        if image.GetNumberOfComponentsPerPixel() > 1:
            warnings.append(
                f"The {label} volume has {image.GetNumberOfComponentsPerPixel()} values per voxel (a colour "
                "picture or a screenshot?): an MRI has one."
            )
            arrays.append(None)
            continue
        array = sitk.GetArrayViewFromImage(image)
        arrays.append(array)
        step = max(1, array.size // 2_000_000)
        sample = np.asarray(array).ravel()[::step]
        low = float(np.mean(sample < -500))
        if low >= CT_AIR_FRACTION and float(np.percentile(sample, 1)) < -800:
            warnings.append(
                f"The {label} volume looks like a CT, not an MRI: {low:.0%} of its voxels are below -500, "
                f"as air is in Hounsfield units (values from {float(sample.min()):g} to {float(sample.max()):g})."
            )
            continue
        integral = np.issubdtype(sample.dtype, np.integer) or bool(np.all(np.mod(sample, 1) == 0))
        values = np.unique(sample)
        if integral and len(values) <= LABEL_MAP_MAX_VALUES:
            warnings.append(
                f"The {label} volume holds only {len(values)} distinct values ({', '.join(f'{v:g}' for v in values[:8])}"
                f"{', ...' if len(values) > 8 else ''}): a label map or a segmentation, not an MRI."
            )
            continue
        if sample.dtype == np.uint8 or (integral and float(sample.min()) >= 0 and float(sample.max()) <= 255):
            warnings.append(
                f"The {label} volume has 8-bit intensities (0 to 255): an export or a screenshot whose contrast "
                "was cut, not a scanner's 12 to 16 bits; the model may see a different contrast than in training."
            )
    for i in range(len(arrays)):
        for j in range(i + 1, len(arrays)):
            a, b = arrays[i], arrays[j]
            if a is None or b is None or a.shape != b.shape:
                continue
            if np.array_equal(a, b) or _same_up_to_scale(a, b):
                warnings.append(
                    f"The {labels[j]} volume is the same image as the {labels[i]} volume: each input must be "
                    "its own channel (e.g. its own echo)."
                )
    return warnings


def _same_up_to_scale(a: np.ndarray, b: np.ndarray) -> bool:
    """True when ``b`` is ``a`` times a constant (a copy saved with another scaling), on a sample of voxels."""
    step = max(1, a.size // 500_000)
    x = np.asarray(a, dtype=np.float64).ravel()[::step]
    y = np.asarray(b, dtype=np.float64).ravel()[::step]
    if not np.any(x) or not np.any(y):
        return False
    scale = float(np.dot(x, y) / np.dot(x, x))
    return bool(np.max(np.abs(y - scale * x)) <= 1e-6 * max(float(np.max(np.abs(y))), 1e-12))


def check_inputs(
    images: Sequence[sitk.Image],
    card: Mapping[str, Any],
    *,
    mask: Optional[np.ndarray] = None,
    acquisition: Optional[Acquisition] = None,
) -> List[str]:
    """Compare input MRI volumes with a model card; return plain-words warnings (empty: all fits).

    Parameters
    ----------
    images
        The input volumes, in the order of the card's ``inputs``.
    card
        The model card (``model.json`` as a dict, e.g. ``ModelPackage.card``).
    mask
        Optional body mask ``(z, y, x)`` for the intensity statistics (default: :func:`body_mask`).
    acquisition
        The inputs' echo times and field strength, where known (e.g.
        :func:`~SyntheticCTLib.kernel.acquisition.acquisition_for_files`): compared with the card's
        protocols (:func:`check_acquisition`); that warning comes first, as it explains the others.
    """
    labels = input_labels(card)
    expected = len(labels)
    images = list(images)
    if not images:
        return [f"No input volume was given; the model expects {expected}: {', '.join(labels)}."]
    if expected and len(images) != expected:
        return [
            f"The model expects {expected} input volume{'s' if expected != 1 else ''} ({', '.join(labels)}), "
            f"but {len(images)} {'were' if len(images) != 1 else 'was'} given."
        ]
    labels = labels or [f"input {i + 1}" for i in range(len(images))]
    content = _check_content(images, labels)
    warnings = check_acquisition(acquisition, card, len(images)) + content + _check_grids(images, labels)
    warnings += _check_spacing(images[0], card)
    warnings += _check_fov(images[0], card)
    warnings += _check_orientation(images[0], card)
    if not content and not any("voxel grid" in w for w in warnings):
        try:
            stats = input_statistics(images, mask)
        except (RuntimeError, IndexError, ValueError):  # different grids: statistics are not comparable
            stats = []
        if stats:
            order_known = _order_from_headers(acquisition, card, len(images))
            warnings += _check_statistics(stats, card, labels, order_known)
    return warnings


META_INPUT_WARNINGS = "SyntheticCT_InputWarnings"
"""Metadata key of the input-check warnings on a synthetic CT (kept by NRRD and MetaImage files)."""


def review_inputs(
    images: Sequence[sitk.Image],
    card: Mapping[str, Any],
    *,
    strict: bool = False,
    progress: Optional[Any] = None,
    source: str = "",
    acquisition: Optional[Acquisition] = None,
) -> List[str]:
    """Run :func:`check_inputs` before any model runs, and tell every face what it found.

    Each warning is logged, and sent through ``progress`` as ``report(0.0, "input check", warning)``
    (the JSON progress stream a GUI reads). With ``strict`` any warning is an
    :class:`~SyntheticCTLib.kernel.errors.InvalidParameterError` naming ``source``. ``acquisition`` (the
    inputs' echo times and field strength, where known) is compared with the card's protocols. Returns
    the warnings, for the synthetic CT's metadata (:func:`stamp_warnings`).
    """
    warnings = check_inputs(images, card, acquisition=acquisition)
    for warning in warnings:
        logger.warning("%s%s", f"{source}: " if source else "", warning)
        if progress is not None:
            progress(0.0, "input check", warning)
    if strict and warnings:
        more = f" (and {len(warnings) - 1} more warning{'s' if len(warnings) > 2 else ''})" if len(warnings) > 1 else ""
        raise InvalidParameterError(
            f"{source + ': ' if source else ''}the input check warned (--strict makes that an error): {warnings[0]}{more}"
        )
    return warnings


def stamp_warnings(image: sitk.Image, warnings: Sequence[str]) -> None:
    """Write the input check's warnings into ``image``'s metadata (empty: "none")."""
    image.SetMetaData(META_INPUT_WARNINGS, " | ".join(warnings) if warnings else "none")
