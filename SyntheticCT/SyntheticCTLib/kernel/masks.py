"""Masks: the body of an MRI or a CT, and hole filling, in plain numpy and SimpleITK.

One definition each, used by inference and training (the MRI body mask, inside which the model card's
input statistics are measured), by the comparison (the CT body) and by training (air enclosed in a CT).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from SyntheticCTLib.kernel.errors import InvalidParameterError

# -- body mask ---------------------------------------------------------------------------------------


def otsu_threshold(values: np.ndarray, bins: int = 256) -> float:
    """Otsu's threshold of ``values`` (a 1D sample), from a ``bins``-bin histogram."""
    values = np.asarray(values, dtype=np.float64).ravel()
    lo, hi = float(values.min()), float(values.max())
    if hi <= lo:
        return lo
    hist, edges = np.histogram(values, bins=bins, range=(lo, hi))
    centres = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(hist).astype(np.float64)
    w1 = w0[-1] - w0
    m0 = np.cumsum(hist * centres)
    mean0 = m0 / np.maximum(w0, 1)
    mean1 = (m0[-1] - m0) / np.maximum(w1, 1)
    between = w0 * w1 * (mean0 - mean1) ** 2
    return float(edges[1:][int(np.argmax(between[:-1]))])


def _channel_rms(images: Sequence[np.ndarray], slab: int = 8) -> np.ndarray:
    """Root mean square over channels, float32; computed slab by slab so that only a slab-sized temporary is made."""
    shape = np.shape(images[0])
    rms = np.zeros(shape, dtype=np.float32)
    tmp = np.empty((min(slab, shape[0]),) + tuple(shape[1:]), dtype=np.float32)
    for z in range(0, shape[0], slab):
        part = rms[z : z + slab]
        t = tmp[: part.shape[0]]
        for image in images:
            np.copyto(t, image[z : z + slab], casting="unsafe")
            t *= t
            part += t
    rms /= np.float32(len(images))
    np.sqrt(rms, out=rms)
    return rms


def _largest_component(mask: np.ndarray) -> np.ndarray:
    labels, n = ndimage.label(mask)
    if n <= 1:
        return mask
    counts = np.bincount(labels.ravel())
    counts[0] = 0
    largest = labels == int(np.argmax(counts))
    del labels
    return largest


def fill_holes(mask: np.ndarray) -> np.ndarray:
    """Fill background regions not connected to the volume border, in 3D, then slice by slice along axis 0.

    A cavity that a volume's top or bottom cuts open (bowel gas, lungs, marrow) is still a hole in its
    slices. Used for the MRI body mask, the CT body mask and the air enclosed in a CT.
    """
    # Label the background once; components touching the border are outside. Faster than
    # ndimage.binary_fill_holes (an iterated dilation) on large volumes.
    # One int32 label volume alive at a time (memory: about 1.5 times a float32 volume at the peak).
    for structure in (None, np.array([np.zeros((3, 3)), [[0, 1, 0], [1, 1, 1], [0, 1, 0]], np.zeros((3, 3))])):
        labels, n = ndimage.label(np.logical_not(mask), structure=structure)
        if n == 0:
            del labels
            continue
        keep = np.logical_not(_border_labels(labels, n, in_plane_only=structure is not None))
        del mask
        mask = keep[labels]
        del labels
    return mask


def _border_labels(labels: np.ndarray, n: int, *, in_plane_only: bool) -> np.ndarray:
    """Boolean per label: does it touch the volume's border (only the in-plane edges with ``in_plane_only``)?"""
    outside = np.zeros(n + 1, dtype=bool)
    faces = [labels[:, 0, :], labels[:, -1, :], labels[:, :, 0], labels[:, :, -1]]
    if not in_plane_only:
        faces += [labels[0], labels[-1]]
    for face in faces:
        outside[np.unique(face)] = True
    outside[0] = False  # label 0 is the mask itself
    return outside


def mri_body_mask(
    images: Sequence[np.ndarray],
    *,
    smoothing_voxels: float = 1.0,
    threshold_factor: float = 0.5,
    min_factor: float = 0.2,
    noise_sigmas: float = 8.0,
    closing_voxels: int = 2,
) -> np.ndarray:
    """A boolean body mask of an MRI, from one or several channels (arrays of one shape).

    Steps: the channel-RMS image is smoothed (Gaussian, ``smoothing_voxels``) to tame noise. Its Otsu
    threshold ``t`` (from values up to the 99.5th percentile, so that a few bright voxels do not drag
    it up) splits body from background roughly; the threshold used is the background's noise floor
    (median + ``noise_sigmas`` robust standard deviations of the values below ``t``), kept within
    ``[min_factor * t, threshold_factor * t]``, so that dark tissue (and tissue that a bias field
    darkens) stays in the body while noise stays out. Then a closing of ``closing_voxels`` (padded, so borders do not erode), the
    largest connected component, and hole filling in 3D and slice by slice along axis 0 (the
    ``sitk`` z axis), which fills enclosed gas, bone and lungs even where a cavity opens at the
    volume's top or bottom.

    Returns an all-False mask for an all-zero image.
    """
    if not len(images):
        raise InvalidParameterError("mri_body_mask needs at least one image.")
    shapes = {np.shape(a) for a in images}
    if len(shapes) != 1 or len(next(iter(shapes))) != 3:
        raise InvalidParameterError(f"mri_body_mask needs 3D arrays of one shape; got {sorted(shapes)}.")
    rms = _channel_rms(images)
    if smoothing_voxels > 0:
        ndimage.gaussian_filter(rms, smoothing_voxels, output=rms, truncate=3.0)  # in place
    step = max(1, rms.size // 2_000_000)
    sample = np.array(rms.ravel()[::step])  # a copy: no view may keep ``rms`` alive below
    top = float(np.percentile(sample, 99.5))
    if top <= 0:
        return np.zeros(rms.shape, dtype=bool)
    otsu = otsu_threshold(np.minimum(sample, top))
    # The noise floor: robust level and spread of the class below Otsu's threshold (mostly background).
    below = sample[sample < otsu]
    if below.size:
        level = float(np.median(below))
        spread = 1.4826 * float(np.median(np.abs(below - level)))
        noise_threshold = level + noise_sigmas * spread
    else:
        noise_threshold = 0.0
    threshold = min(otsu * threshold_factor, max(noise_threshold, otsu * min_factor))
    mask = rms > threshold
    del rms
    if closing_voxels > 0:
        pad = closing_voxels
        padded = np.pad(mask, pad, mode="constant")
        structure = ndimage.generate_binary_structure(3, 1)
        padded = ndimage.binary_closing(padded, structure=structure, iterations=closing_voxels)
        mask = padded[pad:-pad, pad:-pad, pad:-pad]
    if not mask.any():
        return mask
    mask = _largest_component(mask)
    return fill_holes(mask)


def above(image: sitk.Image, threshold: float) -> np.ndarray:
    """Boolean ``(z, y, x)`` array of the voxels of ``image`` at or above ``threshold``, for any pixel type.

    (SimpleITK's BinaryThreshold refuses an upper bound beyond an integer image's range, so an int32
    CT cannot be thresholded there with an open upper end.)
    """
    return sitk.GetArrayViewFromImage(image) >= threshold


def ct_body_mask(
    ct: sitk.Image,
    *,
    threshold: float = -500.0,
    separation_mm: float = 6.0,
    min_part_fraction: float = 0.05,
    min_part_ml: float = 20.0,
) -> sitk.Image:
    """The patient in a CT: the objects above ``threshold`` HU, without the table and what only touches it.

    A CT also holds the table, head holders, immobilisation devices or a specimen's container: thin
    shells that lie apart from the patient or touch it over a small area. The voxels above
    ``threshold`` are opened with a ball of diameter about ``separation_mm`` (thin shells and thin
    contacts vanish), the largest object is kept with every other object of at least
    ``min_part_fraction`` of its volume and ``min_part_ml`` (an arm beside the trunk), these are grown
    back by the same radius inside the voxels above ``threshold`` (so the skin surface is kept), and
    their holes are filled in 3D and then slice by slice along the image's third axis (air in the
    bowel or lungs that touches the slice edge still counts as body). ``separation_mm=0`` keeps the
    plain largest component.

    Returns a uint8 image (1 = body) on the grid of ``ct``.
    """
    tissue = above(ct, threshold)
    if not tissue.any():
        raise InvalidParameterError(f"The CT has no voxel above {threshold:g} HU: no body found.")
    spacing_zyx = np.asarray(ct.GetSpacing()[::-1], dtype=float)
    radius = np.maximum(0, np.floor(separation_mm / 2.0 / spacing_zyx)).astype(int)
    if radius.any():
        ball = _ellipsoid(radius)
        core = ndimage.binary_opening(np.pad(tissue, radius[:, None]), structure=ball)
        core = core[tuple(slice(r, core.shape[i] - r) for i, r in enumerate(radius))]
        if not core.any():  # the whole object is thinner than the separation: keep it as it is
            core = tissue
        voxel_ml = float(np.prod(spacing_zyx)) / 1000.0
        core = _large_components(core, min_part_fraction, min_part_ml / voxel_ml)
        body = ndimage.binary_dilation(core, structure=ball) & tissue
    else:
        body = _largest_component(tissue)
    filled = fill_holes(body)
    result = sitk.GetImageFromArray(filled.astype(np.uint8))
    result.CopyInformation(ct)
    return result


def _large_components(mask: np.ndarray, fraction: float, min_voxels: float) -> np.ndarray:
    """The largest component of ``mask``, and every other of at least ``fraction`` of it and ``min_voxels``."""
    labels, n = ndimage.label(mask)
    if n <= 1:
        return mask
    counts = np.bincount(labels.ravel())
    counts[0] = 0
    largest = counts.max()
    keep = (counts >= max(fraction * largest, min_voxels)) | (counts == largest)
    keep[0] = False
    return keep[labels]


def _ellipsoid(radius: np.ndarray) -> np.ndarray:
    """A boolean ellipsoid structuring element with semi-axes ``radius`` voxels (z, y, x)."""
    r = np.maximum(radius, 0)
    grid = np.ogrid[tuple(slice(-int(k), int(k) + 1) for k in r)]
    total = np.zeros([2 * int(k) + 1 for k in r], dtype=float)
    for g, k in zip(grid, r):
        if k > 0:
            total = total + (g / float(k)) ** 2
    return total <= 1.0


__all__ = ["above", "ct_body_mask", "fill_holes", "mri_body_mask", "otsu_threshold"]
