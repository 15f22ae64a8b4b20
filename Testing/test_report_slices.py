"""The report's slice panel is in the radiological convention whatever the storage order of the CT."""

from __future__ import annotations

import io

import numpy as np
import SimpleITK as sitk

from SyntheticCTLib.apps.report import display_oriented, slices_png


def _restored(image: sitk.Image, flips) -> sitk.Image:
    """The same physical image stored with the index axes flipped (e.g. RAS storage from LPS)."""
    flipped = sitk.Flip(image, list(flips))
    return flipped


def _pixels(png: bytes) -> np.ndarray:
    import matplotlib.image as mpimg

    return mpimg.imread(io.BytesIO(png), format="png")


def test_a_ras_stored_ct_shows_exactly_as_its_lps_stored_copy(small_phantom):
    ct = sitk.Cast(small_phantom.ct, sitk.sitkFloat32)
    mri = sitk.Cast(small_phantom.mri[0], sitk.sitkFloat32)
    ras = [_restored(image, (True, True, False)) for image in (mri, ct)]
    assert ras[1].GetDirection()[0] == -1.0 and ras[1].GetDirection()[4] == -1.0  # RAS storage, same physics
    lps_png = slices_png(mri, ct, ct)
    ras_png = slices_png(ras[0], ras[1], ras[1])
    assert np.array_equal(_pixels(lps_png), _pixels(ras_png))


def test_display_orientation_puts_anterior_up_and_the_patients_left_on_the_right(small_phantom):
    ct = _restored(small_phantom.ct, (True, True, True))  # stored R->L flipped, A->P flipped, feet-first
    shown = sitk.GetArrayFromImage(display_oriented(ct))
    assert display_oriented(ct).GetDirection() == (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
    # The phantom's spine is posterior: in the axial plane it lies in the lower half of the rows.
    bone_rows = np.nonzero((shown > 200).any(axis=(0, 2)))[0]
    body_rows = np.nonzero((shown > -500).any(axis=(0, 2)))[0]
    assert bone_rows.mean() > body_rows.mean()
    # Nothing was resampled: the same voxels, reordered.
    assert np.array_equal(np.sort(shown.ravel()), np.sort(sitk.GetArrayFromImage(small_phantom.ct).ravel()))
