"""Modality detection, metric choice and robust intensity windows for registration.

A CT-like image (a CT or a synthetic CT, in HU) has a large share of voxels far below zero (air, fat)
and values above 300 HU (bone). An MRI magnitude image is non-negative. Two CT-like images are
registered with a mono-modal metric on a clamped HU window, so that air, metal and field-of-view
edges do not dominate; any other pair uses Mattes mutual information.
"""

from __future__ import annotations

import logging
from typing import Optional, Tuple

import numpy as np
import SimpleITK as sitk

from SyntheticCTLib.kernel.errors import InvalidParameterError
from SyntheticCTLib.registration import METRICS

logger = logging.getLogger(__name__)

CT_WINDOW_HU: Tuple[float, float] = (-200.0, 1500.0)
"""HU window that mono-modal metrics see: fat/air and soft tissue stay apart, bone dominates, metal is cut."""

CT_FOREGROUND_HU = -500.0
"""Voxels above this HU count as body (not air) in a CT-like image."""

MR_WINDOW_PERCENTILES = (0.5, 99.5)


def _sample_values(image: sitk.Image, max_samples: int = 250_000) -> np.ndarray:
    values = sitk.GetArrayViewFromImage(image).ravel()
    step = max(1, values.size // max_samples)
    return np.asarray(values[::step], dtype=np.float64)


def detect_modality(image: sitk.Image) -> str:
    """Return ``"ct"`` for a CT-like image in HU (CT or synthetic CT), else ``"mr"``.

    CT-like: at least 1 % of the voxels below -200 HU (air, lung, gas) or 5 % below -50 HU (fat), and
    values above 300 HU (bone). MRI magnitude images have no substantial negative values.
    """
    values = _sample_values(image)
    if values.size == 0:
        return "mr"
    high = float(np.percentile(values, 99.9))
    very_negative = float(np.mean(values < -200.0))
    negative = float(np.mean(values < -50.0))
    is_ct = high > 300.0 and (very_negative >= 0.01 or negative >= 0.05)
    return "ct" if is_ct else "mr"


def choose_metric(fixed_modality: str, moving_modality: str, metric: str = "auto") -> str:
    """The registration metric: ``correlation`` for two CT-like images, ``mattes`` otherwise, unless overridden."""
    if metric not in METRICS:
        raise InvalidParameterError(f"Unknown metric '{metric}'; choose one of {', '.join(METRICS)}.")
    if metric != "auto":
        return metric
    return "correlation" if fixed_modality == moving_modality == "ct" else "mattes"


def intensity_window(image: sitk.Image, modality: str) -> Tuple[float, float]:
    """The intensity range the metric sees: :data:`CT_WINDOW_HU` for CT, robust percentiles for MRI."""
    if modality == "ct":
        return CT_WINDOW_HU
    values = _sample_values(image)
    lo, hi = (float(v) for v in np.percentile(values, MR_WINDOW_PERCENTILES))
    if not hi > lo:
        lo, hi = float(values.min()), float(values.max())
    return lo, hi


def windowed(image: sitk.Image, window: Tuple[float, float]) -> sitk.Image:
    """``image`` as float32, clamped to ``window``."""
    return sitk.Clamp(sitk.Cast(image, sitk.sitkFloat32), sitk.sitkFloat32, float(window[0]), float(window[1]))


def foreground_threshold(image: sitk.Image, modality: str) -> float:
    """Intensity above which a voxel counts as foreground (body): -500 HU for CT, a fraction of p99 for MRI."""
    if modality == "ct":
        return CT_FOREGROUND_HU
    values = _sample_values(image)
    p1, p99 = np.percentile(values, (1.0, 99.0))
    return float(p1 + 0.1 * (p99 - p1))


def foreground_mask(image: sitk.Image, modality: str, *, max_voxels: Optional[int] = None) -> sitk.Image:
    """Binary (uint8) body mask by intensity threshold, see :func:`foreground_threshold`.

    With ``max_voxels``, a larger image is first shrunk (bins averaged) so that the mask, on a coarser
    grid over the same field of view, has at most about that many voxels: enough for centroids,
    overlap and cropping, at a fraction of the cost.
    """
    threshold = foreground_threshold(image, modality)
    if max_voxels is not None:
        voxels = int(np.prod(image.GetSize()))
        factor = int(np.ceil((voxels / float(max_voxels)) ** (1.0 / 3.0))) if voxels > max_voxels else 1
        if factor > 1:
            image = sitk.BinShrink(image, [max(1, min(factor, n // 4)) for n in image.GetSize()])
    return sitk.Cast(image > threshold, sitk.sitkUInt8)


def check_not_constant(image: sitk.Image, name: str) -> None:
    """Raise :class:`InvalidParameterError` when ``image`` holds a single value (nothing to register)."""
    stats = sitk.MinimumMaximumImageFilter()
    stats.Execute(image)
    if not stats.GetMaximum() > stats.GetMinimum():
        raise InvalidParameterError(
            f"The {name} image is constant (every voxel is {stats.GetMinimum():g}); there is nothing to register."
        )
