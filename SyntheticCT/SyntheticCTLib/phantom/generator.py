"""``make_phantom``: a paired multi-echo MRI and CT of a lumbar-spine-like torso, from a seed."""

from __future__ import annotations

import logging
import math
import numbers
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Union

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from SyntheticCTLib.kernel.errors import InvalidParameterError
from SyntheticCTLib.kernel.hu import CT_MAX_HU, CT_MIN_HU
from SyntheticCTLib.kernel.progress import ProgressCallback, no_progress, scaled
from SyntheticCTLib.phantom import tissues as T
from SyntheticCTLib.phantom.anatomy import LESION_TYPES, draw_anatomy, manifest_anatomy
from SyntheticCTLib.phantom.build import paint_anatomy
from SyntheticCTLib.phantom.canvas import Canvas
from SyntheticCTLib.phantom.mri import DEFAULT_PROTOCOLS, TissueSignals, bias_field, rician_magnitude
from SyntheticCTLib.phantom.shapes import F32, Grid

logger = logging.getLogger(__name__)

DEFAULT_SIZE = (192, 192, 128)
DEFAULT_SPACING_MM = 1.0
MAX_VOXELS = 40_000_000
MIN_SIZE = 16
CT_CLIP_HU = (CT_MIN_HU, CT_MAX_HU)

OPTIONS = {
    "echo_times_ms": "list of echo times in ms (default: the field strength's preset)",
    "tr_ms": "repetition time in ms (default: preset)",
    "flip_angle_deg": "flip angle in degrees (default: preset)",
    "snr": "signal-to-noise ratio of the first echo in the body (default: random 25..60)",
    "mri_noise": "add Rician noise (default True)",
    "bias_field": "apply a smooth coil bias field (default True)",
    "bias_strength": "standard deviation of the bias field's log-polynomial coefficients (default: random 0.05..0.2)",
    "mri_scale": "global MRI intensity scale (default: random, log-uniform 300..3000)",
    "ct_noise_hu": "CT noise standard deviation in HU (default: random 8..20; 0 for none)",
    "ct_blur_mm": "CT blur (Gaussian sigma) in mm (default 0.5; 0 for none)",
    "n_vertebrae": "number of vertebrae (default: random 3..5, as many as fit)",
    "lesion": "'none', 'sclerotic', 'lytic' or 'random' (default)",
    "bowel_gas": "True, False or None for random (default)",
}
"""Keyword options of :func:`make_phantom` besides seed, size, spacing and field strength."""


@dataclass
class Phantom:
    """A paired MRI/CT phantom on one voxel grid, with its ground truth.

    Attributes
    ----------
    mri
        One float32 magnitude image per echo.
    ct
        float32 CT in Hounsfield units.
    labels
        uint8 tissue labels (:data:`~SyntheticCTLib.phantom.tissues.TISSUES`).
    bone_labels
        uint8: 0 no bone, k the bone of vertebra k (1..n, superior to inferior).
    params
        The seed and every acquisition and anatomy parameter (JSON-ready).
    """

    mri: List[sitk.Image]
    ct: sitk.Image
    labels: sitk.Image
    bone_labels: sitk.Image
    params: Dict = field(default_factory=dict)

    @property
    def bone_mask(self) -> sitk.Image:
        """uint8 mask (1 bone, 0 other) of the labels in :data:`~SyntheticCTLib.phantom.tissues.BONE_LABELS`."""
        labels = sitk.GetArrayViewFromImage(self.labels)
        mask = sitk.GetImageFromArray(np.isin(labels, T.BONE_LABELS).astype(np.uint8))
        mask.CopyInformation(self.labels)
        return mask

    @property
    def echo_times_ms(self) -> List[float]:
        return list(self.params["echo_times_ms"])


def _check_size(size) -> tuple:
    try:
        values = tuple(size)
    except TypeError:
        raise InvalidParameterError(f"size must be three integers (x, y, z); got {size!r}.") from None
    if len(values) != 3 or not all(isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in values):
        raise InvalidParameterError(f"size must be three integers (x, y, z); got {size!r}.")
    if any(v <= 0 for v in values):
        raise InvalidParameterError(f"size must be positive in every direction; got {tuple(values)}.")
    if any(v < MIN_SIZE for v in values):
        raise InvalidParameterError(
            f"size {tuple(values)} is too small; each dimension needs at least {MIN_SIZE} voxels."
        )
    if int(np.prod(values)) > MAX_VOXELS:
        raise InvalidParameterError(
            f"size {tuple(values)} has {int(np.prod(values))} voxels; at most {MAX_VOXELS} are "
            "supported (use a coarser spacing)."
        )
    return tuple(int(v) for v in values)


def _check_spacing(spacing) -> tuple:
    values = (spacing,) * 3 if isinstance(spacing, numbers.Real) else spacing
    try:
        values = tuple(float(v) for v in values)
    except (TypeError, ValueError):
        raise InvalidParameterError(f"spacing must be a positive number of mm (or three); got {spacing!r}.") from None
    if len(values) != 3 or not all(math.isfinite(v) and 0 < v <= 50 for v in values):
        raise InvalidParameterError(f"spacing must be positive and at most 50 mm; got {spacing!r}.")
    return values


def _positive(name: str, value, *, allow_zero: bool = False) -> float:
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise InvalidParameterError(f"{name} must be a number; got {value!r}.") from None
    if not math.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
        raise InvalidParameterError(f"{name} must be {'non-negative' if allow_zero else 'positive'}; got {value!r}.")
    return value


def _acquisition(field_strength: float, options: dict, rng: np.random.Generator) -> dict:
    preset = DEFAULT_PROTOCOLS[field_strength]
    tes = options.get("echo_times_ms")
    tes = preset["echo_times_ms"] if tes is None else tes
    if isinstance(tes, numbers.Real):
        tes = [tes]
    try:
        tes = [float(t) for t in tes]
    except (TypeError, ValueError):
        raise InvalidParameterError(f"echo_times_ms must be a list of numbers; got {tes!r}.") from None
    if not tes or any(not math.isfinite(t) or t <= 0 for t in tes):
        raise InvalidParameterError(f"echo_times_ms must be positive; got {tes!r}.")
    tr = _positive("tr_ms", options.get("tr_ms") if options.get("tr_ms") is not None else preset["tr_ms"])
    if max(tes) >= tr:
        raise InvalidParameterError(f"every echo time must be shorter than TR ({tr:g} ms); got {tes}.")
    flip = _positive(
        "flip_angle_deg",
        options.get("flip_angle_deg") if options.get("flip_angle_deg") is not None else preset["flip_angle_deg"],
    )
    if flip > 90:
        raise InvalidParameterError(f"flip_angle_deg must be in (0, 90]; got {flip:g}.")
    # Random draws happen whether or not a value was given, so that one option does not shift the others.
    draws = {
        "snr": rng.uniform(25, 60),
        "bias_strength": rng.uniform(0.05, 0.2),
        "mri_scale": float(np.exp(rng.uniform(np.log(300), np.log(3000)))),
        "ct_noise_hu": rng.uniform(8, 20),
    }
    bias_coeffs = rng.normal(size=9)
    chosen = {
        k: (draws[k] if options.get(k) is None else _positive(k, options[k], allow_zero=k == "ct_noise_hu"))
        for k in draws
    }
    blur = options.get("ct_blur_mm")
    return {
        "field_strength_t": field_strength,
        "sequence": "3D multi-echo spoiled gradient echo",
        "echo_times_ms": tes,
        "tr_ms": tr,
        "flip_angle_deg": flip,
        "snr": chosen["snr"],
        "mri_noise": bool(options.get("mri_noise", True)),
        "bias_field": bool(options.get("bias_field", True)),
        "bias_strength": chosen["bias_strength"],
        "bias_coefficients": (bias_coeffs * chosen["bias_strength"]).tolist(),
        "mri_scale": chosen["mri_scale"],
        "ct_noise_hu": chosen["ct_noise_hu"],
        "ct_blur_mm": 0.5 if blur is None else _positive("ct_blur_mm", blur, allow_zero=True),
    }


def _to_image(array: np.ndarray, grid: Grid) -> sitk.Image:
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(grid.spacing)
    image.SetOrigin(grid.origin)
    image.SetDirection((1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0))
    return image


def _ct_finish(ct: np.ndarray, grid: Grid, acq: dict, rng: np.random.Generator) -> np.ndarray:
    """Scanner blur and (correlated) noise of the requested standard deviation, then the CT range."""
    sigma_vox = [acq["ct_blur_mm"] / s for s in (grid.spacing[2], grid.spacing[1], grid.spacing[0])]
    noise_sd = acq["ct_noise_hu"]
    if noise_sd > 0:
        noise = rng.standard_normal(ct.shape, dtype=F32)
        if acq["ct_blur_mm"] > 0:
            # Noise passes through the same kernel; pre-scale it so that its final sd is noise_sd.
            gain = 1.0
            for s in sigma_vox:
                impulse = np.zeros(int(8 * s) * 2 + 3)
                impulse[len(impulse) // 2] = 1
                gain *= float(np.sum(ndimage.gaussian_filter1d(impulse, s) ** 2))
            noise *= F32(noise_sd / math.sqrt(gain))
        else:
            noise *= F32(noise_sd)
        ct += noise
        del noise
    if acq["ct_blur_mm"] > 0:
        ct = ndimage.gaussian_filter(ct, sigma_vox, mode="nearest")
    np.clip(ct, CT_CLIP_HU[0], CT_CLIP_HU[1], out=ct)
    return ct


def _mri_finish(canvas: Canvas, grid: Grid, acq: dict, rng: np.random.Generator) -> List[np.ndarray]:
    bias = None
    if acq["bias_field"]:
        fov = [n * s for n, s in zip(grid.size, grid.spacing)]
        bias = bias_field(grid.axes, np.asarray(acq["bias_coefficients"]), fov) * F32(acq["mri_scale"])
    scale = F32(acq["mri_scale"])
    body = canvas.labels > 0
    ref = float(np.median(np.abs(canvas.mri[0][body]))) * acq["mri_scale"] if body.any() else acq["mri_scale"]
    sigma = ref / acq["snr"] if acq["mri_noise"] else 0.0
    acq["noise_sigma"] = sigma
    out = []
    for i in range(len(canvas.mri)):
        signal = canvas.mri[i]
        signal *= bias if bias is not None else scale
        out.append(rician_magnitude(signal, sigma, rng if sigma > 0 else None))
        canvas.mri[i] = None  # free the complex echo as soon as it is done
    return out


def make_phantom(
    seed: int = 0,
    *,
    size: Sequence[int] = DEFAULT_SIZE,
    spacing: Union[float, Sequence[float]] = DEFAULT_SPACING_MM,
    field_strength: float = 3.0,
    progress: Optional[ProgressCallback] = None,
    **options,
) -> Phantom:
    """Generate a paired multi-echo MRI / CT phantom of a lumbar-spine-like torso section.

    Parameters
    ----------
    seed
        Random seed; the same seed and arguments give bit-identical volumes.
    size
        Grid size (x, y, z) in voxels.
    spacing
        Voxel spacing in mm (one number, or three).
    field_strength
        1.5 or 3 (tesla): relaxation times and the default protocol.
    progress
        Progress callback ``report(fraction, stage, message)``.
    **options
        See :data:`OPTIONS` (echo times, TR, flip angle, SNR, noise, bias, vertebra count, lesion...).

    Raises
    ------
    InvalidParameterError
        A bad size, spacing, field strength or option, with the reason.
    """
    report = progress or no_progress
    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
        raise InvalidParameterError(f"Unknown phantom option(s) {', '.join(unknown)}; known: {', '.join(OPTIONS)}.")
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0:
        raise InvalidParameterError(f"seed must be a non-negative integer; got {seed!r}.")
    size = _check_size(size)
    spacing = _check_spacing(spacing)
    b0 = T.check_field_strength(field_strength)
    lesion = options.get("lesion") or "random"
    if lesion not in LESION_TYPES:
        raise InvalidParameterError(f"Unknown lesion type {lesion!r}; use one of {', '.join(LESION_TYPES)}.")
    n_vert = options.get("n_vertebrae")
    if n_vert is not None and (isinstance(n_vert, bool) or not isinstance(n_vert, numbers.Integral)):
        raise InvalidParameterError(f"n_vertebrae must be an integer; got {n_vert!r}.")

    grid = Grid(size, spacing)
    seed = int(seed)
    rng_anatomy = np.random.default_rng([seed, 1])
    rng_acq = np.random.default_rng([seed, 2])
    rng_texture = np.random.default_rng([seed, 3])
    rng_noise = np.random.default_rng([seed, 4])

    report(0.0, "phantom: anatomy", "drawing parameters")
    anatomy = draw_anatomy(
        rng_anatomy, grid.fov, grid.voxel_mm, n_vertebrae=n_vert, lesion=lesion, bowel_gas=options.get("bowel_gas")
    )
    acq = _acquisition(b0, options, rng_acq)
    signals = TissueSignals(b0, acq["echo_times_ms"], acq["tr_ms"], acq["flip_angle_deg"])
    canvas = Canvas(grid.shape, signals.n_echoes)
    paint_anatomy(canvas, grid, anatomy, signals, rng_texture, scaled(report, 0.02, 0.7))

    report(0.7, "phantom: CT", "blur and noise")
    ct = _ct_finish(canvas.ct, grid, acq, rng_noise)
    canvas.ct = None
    report(0.8, "phantom: MRI", "bias field and noise")
    mri = _mri_finish(canvas, grid, acq, rng_noise)
    report(0.97, "phantom: images", "")

    n_bones = len(np.unique(canvas.bone[canvas.bone > 0]))
    if n_bones != anatomy["spine"]["n_vertebrae"]:  # a guard: every vertebra must be in the field of view
        logger.warning(
            "Only %d of %d vertebrae are inside the field of view.", n_bones, anatomy["spine"]["n_vertebrae"]
        )
    params = {
        "seed": seed,
        "size": list(size),
        "spacing_mm": list(spacing),
        "origin_mm": list(grid.origin),
        "direction": [1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0],
        "coordinate_system": "LPS",
        **{k: v for k, v in acq.items()},
        "n_vertebrae": anatomy["spine"]["n_vertebrae"],
        "vertebra_order": "1..n from superior to inferior",
        "lesion": anatomy["lesion"]["type"] if anatomy["lesion"] else "none",
        "bowel_gas": bool(anatomy["bowel_gas"]),
        "anatomy": manifest_anatomy(anatomy),
        "tissue_table": T.tissue_table_dict(b0),
    }
    phantom = Phantom(
        mri=[_to_image(m, grid) for m in mri],
        ct=_to_image(ct, grid),
        labels=_to_image(canvas.labels, grid),
        bone_labels=_to_image(canvas.bone, grid),
        params=manifest_anatomy(params),
    )
    report(1.0, "phantom: images", "done")
    return phantom
