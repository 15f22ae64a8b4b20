"""MRI intensity normalisation, in plain numpy (shared by inference and training).

The body mask whose voxels give the statistics is :func:`SyntheticCTLib.kernel.masks.mri_body_mask`.

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


__all__ = [
    "METHODS",
    "DEFAULT_CLIP",
    "ChannelNormalization",
    "channel_normalization",
    "channel_normalizations",
    "normalize_channels",
]
