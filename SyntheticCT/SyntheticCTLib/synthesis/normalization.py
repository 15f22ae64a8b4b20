"""MRI intensity normalisation and the body mask, in plain numpy (shared by inference and training).

A model card lists one normalisation spec per input channel, e.g.
``{"method": "percentile", "lower": 0.5, "upper": 99.5, "mask": "body"}``. Each spec becomes an
affine map ``x -> clip(x * scale + offset, *clip)`` whose statistics come from the voxels inside the
mask (``"mask": "body"``, the default) or from all voxels (``"mask": "none"``):

``percentile``
    The ``lower`` and ``upper`` percentiles (numpy's linear interpolation) map to 0 and 1.
    Default clip: ``[-0.5, 2.0]``, a mild clip that keeps contrast just outside the range but
    tames flow and susceptibility spikes.
``zscore``
    The mean maps to 0 and one standard deviation to 1. Default clip: ``[-5, 5]``.
``none``
    The raw intensities, as float32. Default clip: none.

A spec may set ``"clip": [low, high]``, or ``"clip": null`` for no clip. Voxels outside the mask
are transformed by the same map (they are not zeroed), so a network sees the background as it is.
Training must use exactly these functions, so that a model sees at inference what it saw in training.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Mapping, Optional, Sequence, Tuple

import numpy as np
from scipy import ndimage

from SyntheticCTLib.kernel.errors import InvalidParameterError

logger = logging.getLogger(__name__)

METHODS = ("percentile", "zscore", "none")
DEFAULT_CLIP = {"percentile": (-0.5, 2.0), "zscore": (-5.0, 5.0), "none": None}


@dataclass(frozen=True)
class ChannelNormalization:
    """The affine map of one channel: ``clip(x * scale + offset, *clip)``."""

    scale: float
    offset: float
    clip: Optional[Tuple[float, float]] = None
    method: str = "none"

    def apply(self, array: np.ndarray, out: Optional[np.ndarray] = None) -> np.ndarray:
        """Apply the map to ``array``; into ``out`` (float32, may be ``array`` itself) when given."""
        if out is None:
            out = np.empty(np.shape(array), dtype=np.float32)
        np.multiply(array, np.float32(self.scale), out=out, casting="unsafe")
        out += np.float32(self.offset)
        if self.clip is not None:
            np.clip(out, np.float32(self.clip[0]), np.float32(self.clip[1]), out=out)
        return out


def _stat_values(array: np.ndarray, mask: Optional[np.ndarray], use_mask: bool) -> np.ndarray:
    if use_mask and mask is not None:
        values = np.asarray(array)[mask]
        if values.size:
            return values
        logger.warning("The body mask is empty; normalising with statistics of the whole volume.")
    return np.asarray(array).ravel()


def _clip_of(spec: Mapping[str, Any], method: str) -> Optional[Tuple[float, float]]:
    if "clip" not in spec:
        return DEFAULT_CLIP[method]
    clip = spec["clip"]
    if clip is None:
        return None
    if len(clip) != 2 or not float(clip[0]) < float(clip[1]):
        raise InvalidParameterError(f"A normalisation 'clip' must be [low, high] with low < high (got {clip!r}).")
    return float(clip[0]), float(clip[1])


def channel_normalization(
    array: np.ndarray, mask: Optional[np.ndarray], spec: Mapping[str, Any]
) -> ChannelNormalization:
    """The normalisation map of one channel from its voxels (inside ``mask`` unless ``spec["mask"]`` is "none").

    Raises
    ------
    InvalidParameterError
        Unknown method, bad percentiles or clip, or a mask of another shape.
    """
    method = str(spec.get("method", "none")).lower()
    if method not in METHODS:
        raise InvalidParameterError(f"Unknown normalisation method {method!r}; known: {', '.join(METHODS)}.")
    mask_kind = str(spec.get("mask", "body")).lower()
    if mask_kind not in ("body", "none", "all"):
        raise InvalidParameterError(f"A normalisation 'mask' must be 'body' or 'none' (got {mask_kind!r}).")
    if mask is not None and np.shape(mask) != np.shape(array):
        raise InvalidParameterError(f"The mask has shape {np.shape(mask)}, the image {np.shape(array)}.")
    clip = _clip_of(spec, method)
    if method == "none":
        return ChannelNormalization(1.0, 0.0, clip, method)
    values = _stat_values(array, mask, mask_kind == "body")
    if method == "percentile":
        lower, upper = float(spec.get("lower", 0.5)), float(spec.get("upper", 99.5))
        if not 0.0 <= lower < upper <= 100.0:
            raise InvalidParameterError(
                f"Percentile normalisation needs 0 <= lower < upper <= 100 (got {lower}, {upper})."
            )
        lo, hi = (float(v) for v in np.percentile(values, [lower, upper]))
        span = hi - lo
        if not np.isfinite(span) or span <= 0:
            logger.warning(
                "Percentiles %g and %g of a channel are equal (%g); it is constant, scaled by 1.", lower, upper, lo
            )
            span = 1.0
        return ChannelNormalization(1.0 / span, -lo / span, clip, method)
    # zscore
    mean = float(np.mean(values, dtype=np.float64))
    std = float(np.std(values, dtype=np.float64))
    if not np.isfinite(std) or std <= 0:
        logger.warning("A channel has zero standard deviation; it is only centred.")
        std = 1.0
    return ChannelNormalization(1.0 / std, -mean / std, clip, method)


def channel_normalizations(
    arrays: Sequence[np.ndarray], body_mask: Optional[np.ndarray], specs: Sequence[Mapping[str, Any]]
) -> list:
    """One :class:`ChannelNormalization` per channel (``len(specs)`` must equal ``len(arrays)``)."""
    if len(arrays) != len(specs):
        raise InvalidParameterError(f"{len(arrays)} channels but {len(specs)} normalisation specs; they must match.")
    return [channel_normalization(a, body_mask, s) for a, s in zip(arrays, specs)]


def normalize_channels(
    arrays: Sequence[np.ndarray], body_mask: Optional[np.ndarray], specs: Sequence[Mapping[str, Any]]
) -> np.ndarray:
    """Normalise each channel with its spec; return a float32 array ``(C, Z, Y, X)``.

    Parameters
    ----------
    arrays
        One array per channel, all of one shape (e.g. ``sitk.GetArrayViewFromImage`` of each echo).
    body_mask
        Boolean array of that shape, or None (statistics of all voxels).
    specs
        One spec per channel, as in a model card's ``normalization`` list.
    """
    maps = channel_normalizations(arrays, body_mask, specs)
    shapes = {np.shape(a) for a in arrays}
    if len(shapes) != 1:
        raise InvalidParameterError(f"All channels must have one shape; got {sorted(shapes)}.")
    out = np.empty((len(arrays),) + tuple(np.shape(arrays[0])), dtype=np.float32)
    for c, (array, m) in enumerate(zip(arrays, maps)):
        m.apply(array, out=out[c])
    return out


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


__all__ = [
    "METHODS",
    "DEFAULT_CLIP",
    "ChannelNormalization",
    "channel_normalization",
    "channel_normalizations",
    "normalize_channels",
    "mri_body_mask",
    "otsu_threshold",
]
