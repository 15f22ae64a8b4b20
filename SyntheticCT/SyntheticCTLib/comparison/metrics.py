"""Image metrics of a synthetic CT against a reference CT, with the SynthRAD 2023 definitions.

The SynthRAD 2023 challenge's evaluation code defines, inside a body mask:

- MAE: the mean absolute HU difference, without clipping;
- PSNR: both images clipped to [-1024, 3000] HU, ``10 log10(4024² / MSE)`` over the mask voxels;
- SSIM: both images clipped to [-1024, 3000] HU, set to -1024 outside the mask, shifted by +1024,
  then the structural similarity of scikit-image's ``structural_similarity`` defaults (a 7-voxel
  uniform window in every dimension, K1 = 0.01, K2 = 0.03, sample covariance, data range 4024),
  whose map is averaged over the mask voxels that lie at least 3 voxels from the image border.

This module adds ME, the signed mean error ``mean(sCT - CT)`` (positive: the sCT is too dense).
SSIM is computed here with scipy; it reproduces scikit-image's value without depending on it.
Data are positional, options keyword-only. Images may be ``sitk.Image`` or numpy arrays.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple, Union

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from SyntheticCTLib.kernel.errors import GeometryMismatchError, InvalidParameterError
from SyntheticCTLib.kernel.geometry import check_same_grid
from SyntheticCTLib.kernel.hu import CT_MIN_HU

HU_RANGE: Tuple[float, float] = (CT_MIN_HU, 3000.0)
"""The SynthRAD 2023 population-wide HU range used by PSNR and SSIM."""

ArrayLike = Union[sitk.Image, np.ndarray]


def _array(image: ArrayLike, dtype=np.float64) -> np.ndarray:
    if isinstance(image, sitk.Image):
        return sitk.GetArrayViewFromImage(image).astype(dtype, copy=False)
    return np.asarray(image, dtype=dtype)


def _prepare(ct: ArrayLike, sct: ArrayLike, mask: Optional[ArrayLike], dtype=np.float64):
    if isinstance(ct, sitk.Image) and isinstance(sct, sitk.Image):
        check_same_grid(ct, sct, names=("the reference CT", "the synthetic CT"))
    if isinstance(ct, sitk.Image) and isinstance(mask, sitk.Image):
        check_same_grid(ct, mask, names=("the reference CT", "the mask"))
    a, b = _array(ct, dtype), _array(sct, dtype)
    if a.shape != b.shape:
        raise GeometryMismatchError(
            f"The reference CT {a.shape} and the synthetic CT {b.shape} must have the same shape; "
            "resample the synthetic CT onto the reference grid first."
        )
    m = None
    if mask is not None:
        m = _array(mask, np.float64) > 0
        if m.shape != a.shape:
            raise GeometryMismatchError(f"The mask {m.shape} must have the shape of the images {a.shape}.")
        if not m.any():
            raise InvalidParameterError("The mask is empty: no voxel to measure.")
    return a, b, m


def _check_range(hu_range: Sequence[float]) -> Tuple[float, float]:
    low, high = float(hu_range[0]), float(hu_range[1])
    if not high > low:
        raise InvalidParameterError(f"hu_range must be (low, high) with high > low; got {tuple(hu_range)}.")
    return low, high


def mae(ct: ArrayLike, sct: ArrayLike, *, mask: Optional[ArrayLike] = None) -> float:
    """Mean absolute error (HU) inside ``mask`` (all voxels when None), without clipping."""
    a, b, m = _prepare(ct, sct, mask)
    diff = np.abs(b - a)
    return float(diff[m].mean() if m is not None else diff.mean())


def me(ct: ArrayLike, sct: ArrayLike, *, mask: Optional[ArrayLike] = None) -> float:
    """Mean (signed) error ``mean(sct - ct)`` in HU inside ``mask``; positive: the sCT is too dense."""
    a, b, m = _prepare(ct, sct, mask)
    diff = b - a
    return float(diff[m].mean() if m is not None else diff.mean())


def psnr(
    ct: ArrayLike, sct: ArrayLike, *, mask: Optional[ArrayLike] = None, hu_range: Sequence[float] = HU_RANGE
) -> float:
    """Peak signal-to-noise ratio (dB) on ``hu_range``: both images clipped to it, data range its width.

    Returns ``inf`` when the clipped images are identical inside the mask.
    """
    low, high = _check_range(hu_range)
    a, b, m = _prepare(ct, sct, mask)
    a, b = np.clip(a, low, high), np.clip(b, low, high)
    diff2 = (a - b) ** 2
    mse = float(diff2[m].mean() if m is not None else diff2.mean())
    if mse == 0.0:
        return math.inf
    return float(10.0 * np.log10((high - low) ** 2 / mse))


def ssim(
    ct: ArrayLike,
    sct: ArrayLike,
    *,
    mask: Optional[ArrayLike] = None,
    hu_range: Sequence[float] = HU_RANGE,
    win_size: int = 7,
    k1: float = 0.01,
    k2: float = 0.03,
) -> float:
    """Structural similarity (SynthRAD 2023 definition), in [-1, 1]; 1 for identical images.

    Both images are clipped to ``hu_range``, set to its lower bound outside ``mask`` and shifted to
    start at 0. Local means, variances and covariance come from a ``win_size`` uniform window in
    every dimension (sample covariance); the SSIM map is averaged over the voxels of ``mask`` (all
    when None) at least ``(win_size - 1) // 2`` voxels from the border. Computed in float32, as the
    challenge's code does with its float32 images.
    """
    low, high = _check_range(hu_range)
    if win_size < 3 or win_size % 2 == 0:
        raise InvalidParameterError(f"win_size must be odd and at least 3; got {win_size}.")
    a, b, m = _prepare(ct, sct, mask, dtype=np.float32)
    if min(a.shape) < win_size:
        raise InvalidParameterError(
            f"SSIM needs at least {win_size} voxels along every axis; the images are {a.shape}."
        )
    a = np.clip(a, low, high)
    b = np.clip(b, low, high)
    if m is not None:
        a = np.where(m, a, np.float32(low))
        b = np.where(m, b, np.float32(low))
    a = (a - np.float32(low)).astype(np.float32)
    b = (b - np.float32(low)).astype(np.float32)

    def mean_filter(x: np.ndarray) -> np.ndarray:
        return ndimage.uniform_filter(x, size=win_size)

    n = win_size**a.ndim
    cov_norm = np.float32(n / (n - 1.0))
    ux, uy = mean_filter(a), mean_filter(b)
    vx = cov_norm * (mean_filter(a * a) - ux * ux)
    vy = cov_norm * (mean_filter(b * b) - uy * uy)
    vxy = cov_norm * (mean_filter(a * b) - ux * uy)
    data_range = high - low
    c1 = np.float32((k1 * data_range) ** 2)
    c2 = np.float32((k2 * data_range) ** 2)
    ssim_map = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux * ux + uy * uy + c1) * (vx + vy + c2))
    pad = (win_size - 1) // 2
    inner = tuple(slice(pad, s - pad) for s in ssim_map.shape)
    cropped = ssim_map[inner]
    if m is None:
        return float(cropped.mean(dtype=np.float64))
    inner_mask = m[inner]
    if not inner_mask.any():
        raise InvalidParameterError(f"The mask has no voxel at least {pad} voxels from the image border.")
    return float(cropped[inner_mask].mean(dtype=np.float64))


def image_metrics(
    ct: ArrayLike, sct: ArrayLike, *, mask: Optional[ArrayLike] = None, hu_range: Sequence[float] = HU_RANGE
) -> dict:
    """``{"mae_hu", "me_hu", "psnr_db", "ssim"}`` of ``sct`` against ``ct`` inside ``mask``."""
    return {
        "mae_hu": mae(ct, sct, mask=mask),
        "me_hu": me(ct, sct, mask=mask),
        "psnr_db": psnr(ct, sct, mask=mask, hu_range=hu_range),
        "ssim": ssim(ct, sct, mask=mask, hu_range=hu_range),
    }
