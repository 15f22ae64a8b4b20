"""Two non-learning synthetic-CT baselines, for comparison beside a model (``syntheticct evaluate``, the demo).

``inversion``
    The old approach: an inverted, rescaled MRI. Inside the body, the first channel is scaled so
    that its 1st and 99th percentiles map to 0 and 1 (clipped), then ``HU = dark_hu - x * (dark_hu -
    bright_hu)``: dark voxels (cortical bone, also gas) become ``dark_hu``, bright ones (fat)
    ``bright_hu``. Outside the body: air.
``bulk density``
    Threshold the MRI into air, soft tissue and bone and give each class a fixed HU. The channel
    root-mean-square is divided by its median inside the body; inside the body, values below
    ``air_fraction`` are air, below ``bone_fraction`` bone, the rest soft tissue; outside the body,
    air. Defaults: air -1000 HU, soft tissue 20 HU, bone 700 HU.

Both take the MRI channels (``sitk.Image``, one grid) and return an int16 HU image on that grid,
with the body mask of :func:`SyntheticCTLib.kernel.masks.mri_body_mask` (the one the inference uses).
"""

from __future__ import annotations

from typing import Callable, Dict, Optional, Sequence

import numpy as np
import SimpleITK as sitk

from SyntheticCTLib.kernel.errors import InvalidParameterError
from SyntheticCTLib.kernel.geometry import same_grid
from SyntheticCTLib.kernel.hu import AIR_HU

BULK_DENSITY_HU = {"air": AIR_HU, "soft tissue": 20.0, "bone": 700.0}
"""Fixed HU of each bulk-density class."""
BULK_DENSITY_LABELS = {"air": 0, "soft tissue": 1, "bone": 2}


def _arrays(mri_images: Sequence[sitk.Image]) -> list:
    if not mri_images:
        raise InvalidParameterError("A baseline needs at least one MRI image.")
    first = mri_images[0]
    for i, image in enumerate(mri_images[1:], start=2):
        if not same_grid(first, image):
            raise InvalidParameterError(f"MRI channel {i} is not on the grid of channel 1; resample it first.")
    return [sitk.GetArrayFromImage(im).astype(np.float32) for im in mri_images]


def _to_image(hu: np.ndarray, reference: sitk.Image) -> sitk.Image:
    image = sitk.GetImageFromArray(np.clip(np.rint(hu), -32768, 32767).astype(np.int16))
    image.CopyInformation(reference)
    return image


def _body(arrays: Sequence[np.ndarray], body_mask: Optional[np.ndarray]) -> np.ndarray:
    if body_mask is not None:
        body = np.asarray(body_mask).astype(bool)
        if body.shape != arrays[0].shape:
            raise InvalidParameterError(f"The body mask has shape {body.shape}, the MRI {arrays[0].shape}.")
        return body
    from SyntheticCTLib.kernel.masks import mri_body_mask

    return mri_body_mask(list(arrays))


def inversion_sct(
    mri_images: Sequence[sitk.Image],
    *,
    body_mask: Optional[np.ndarray] = None,
    channel: int = 0,
    dark_hu: float = 1000.0,
    bright_hu: float = -100.0,
    percentiles=(1.0, 99.0),
) -> sitk.Image:
    """The inverted, rescaled MRI (see the module docstring); int16 HU on the MRI grid."""
    arrays = _arrays(mri_images)
    if not 0 <= channel < len(arrays):
        raise InvalidParameterError(f"channel {channel} is out of range for {len(arrays)} MRI channel(s).")
    body = _body(arrays, body_mask)
    signal = arrays[channel]
    values = signal[body] if body.any() else signal.ravel()
    low, high = (float(v) for v in np.percentile(values, percentiles))
    x = np.clip((signal - low) / max(high - low, 1e-6), 0.0, 1.0)
    hu = dark_hu - x * (dark_hu - bright_hu)
    hu[~body] = AIR_HU
    return _to_image(hu, mri_images[0])


def bulk_density_classes(
    mri_images: Sequence[sitk.Image],
    *,
    body_mask: Optional[np.ndarray] = None,
    air_fraction: float = 0.08,
    bone_fraction: float = 0.3,
) -> np.ndarray:
    """Class map (0 air, 1 soft tissue, 2 bone; :data:`BULK_DENSITY_LABELS`) of the MRI, as a uint8 array."""
    if not 0 <= air_fraction <= bone_fraction:
        raise InvalidParameterError(f"Need 0 <= air_fraction <= bone_fraction (got {air_fraction}, {bone_fraction}).")
    arrays = _arrays(mri_images)
    body = _body(arrays, body_mask)
    rms = np.sqrt(np.mean(np.square(np.stack(arrays)), axis=0))
    reference = float(np.median(rms[body])) if body.any() else float(np.median(rms))
    relative = rms / max(reference, 1e-12)
    classes = np.full(rms.shape, BULK_DENSITY_LABELS["soft tissue"], dtype=np.uint8)
    classes[relative < bone_fraction] = BULK_DENSITY_LABELS["bone"]
    classes[relative < air_fraction] = BULK_DENSITY_LABELS["air"]
    classes[~body] = BULK_DENSITY_LABELS["air"]
    return classes


def bulk_density_sct(
    mri_images: Sequence[sitk.Image],
    *,
    body_mask: Optional[np.ndarray] = None,
    air_fraction: float = 0.08,
    bone_fraction: float = 0.3,
    hu: Optional[Dict[str, float]] = None,
) -> sitk.Image:
    """The bulk-density sCT (see the module docstring); int16 HU on the MRI grid."""
    values = dict(BULK_DENSITY_HU)
    values.update(hu or {})
    unknown = set(values) - set(BULK_DENSITY_LABELS)
    if unknown:
        raise InvalidParameterError(
            f"Unknown bulk-density class(es) {sorted(unknown)}; known: {', '.join(BULK_DENSITY_LABELS)}."
        )
    classes = bulk_density_classes(
        mri_images, body_mask=body_mask, air_fraction=air_fraction, bone_fraction=bone_fraction
    )
    lut = np.zeros(len(BULK_DENSITY_LABELS), dtype=np.float32)
    for name, label in BULK_DENSITY_LABELS.items():
        lut[label] = values[name]
    return _to_image(lut[classes], mri_images[0])


BASELINES: Dict[str, Callable[..., sitk.Image]] = {"inversion": inversion_sct, "bulk density": bulk_density_sct}
"""Baseline name -> function(mri_images) -> int16 HU ``sitk.Image``."""

__all__ = [
    "BASELINES",
    "BULK_DENSITY_HU",
    "BULK_DENSITY_LABELS",
    "inversion_sct",
    "bulk_density_sct",
    "bulk_density_classes",
]
