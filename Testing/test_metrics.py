"""Image metrics (SynthRAD 2023 definitions): hand-computed values, masks, clipping, body mask, Dice."""

from __future__ import annotations

import math

import numpy as np
import pytest
import SimpleITK as sitk

from SyntheticCTLib.comparison import metrics
from SyntheticCTLib.comparison.bone import dice, fill_small_holes, keep_components, segment_bone
from SyntheticCTLib.kernel.errors import GeometryMismatchError, InvalidParameterError
from SyntheticCTLib.kernel.masks import ct_body_mask

DATA_RANGE = 3000.0 - (-1024.0)
C1 = (0.01 * DATA_RANGE) ** 2


def test_mae_and_me_by_hand():
    ct = np.array([0.0, 10.0, 20.0, 30.0])
    sct = np.array([1.0, 8.0, 20.0, 34.0])
    assert metrics.mae(ct, sct) == pytest.approx((1 + 2 + 0 + 4) / 4)
    assert metrics.me(ct, sct) == pytest.approx((1 - 2 + 0 + 4) / 4)
    mask = np.array([1, 1, 1, 0])
    assert metrics.mae(ct, sct, mask=mask) == pytest.approx(1.0)
    assert metrics.me(ct, sct, mask=mask) == pytest.approx(-1.0 / 3.0)


def test_mae_is_not_clipped():
    """The challenge's MAE uses the raw HU, unlike PSNR and SSIM."""
    ct = np.full((3, 3), 3000.0)
    sct = np.full((3, 3), 3500.0)
    assert metrics.mae(ct, sct) == pytest.approx(500.0)
    assert metrics.psnr(ct, sct) == math.inf  # both clip to 3000


def test_psnr_of_a_constant_offset():
    rng = np.random.default_rng(1)
    ct = rng.uniform(-900, 2000, size=(6, 7, 8))
    offset = 40.0
    expected = 20 * math.log10(DATA_RANGE / offset)  # MSE = offset²
    assert metrics.psnr(ct, ct + offset) == pytest.approx(expected, abs=1e-9)
    assert metrics.psnr(ct, ct - offset) == pytest.approx(expected, abs=1e-9)


def test_psnr_clips_to_the_hu_range_and_respects_the_mask():
    ct = np.array([-2000.0, 0.0, 100.0, 5000.0])
    sct = np.array([-1024.0, 30.0, 100.0, 3000.0])
    # Only the second voxel differs after clipping to [-1024, 3000]: MSE = 900 / 4.
    assert metrics.psnr(ct, sct) == pytest.approx(10 * math.log10(DATA_RANGE**2 / (900 / 4)))
    mask = np.array([1, 1, 0, 0])
    assert metrics.psnr(ct, sct, mask=mask) == pytest.approx(10 * math.log10(DATA_RANGE**2 / (900 / 2)))
    # A custom range changes the data range (and the clipping: -2000 and -1024 both become -1000).
    assert metrics.psnr(ct, sct, hu_range=(-1000, 1000)) == pytest.approx(10 * math.log10(2000**2 / (900 / 4)))


def test_ssim_of_identical_images_is_one():
    rng = np.random.default_rng(2)
    ct = rng.normal(0, 300, size=(12, 13, 14))
    mask = np.zeros(ct.shape, dtype=bool)
    mask[3:10, 2:11, 4:12] = True
    assert metrics.ssim(ct, ct) == pytest.approx(1.0, abs=1e-6)
    assert metrics.ssim(ct, ct, mask=mask) == pytest.approx(1.0, abs=1e-6)


def test_ssim_of_two_constant_images_by_hand():
    """Constant images: no variance, so SSIM = (2ab + C1) / (a² + b² + C1) with the shifted values."""
    ct = np.zeros((9, 9, 9))
    sct = np.full((9, 9, 9), 100.0)
    a, b = 0.0 + 1024.0, 100.0 + 1024.0
    expected = (2 * a * b + C1) / (a * a + b * b + C1)
    assert metrics.ssim(ct, sct) == pytest.approx(expected, rel=1e-5)


def test_ssim_masked_voxels_do_not_matter():
    rng = np.random.default_rng(3)
    ct = rng.normal(100, 200, size=(20, 20, 20))
    sct = ct + rng.normal(0, 50, size=ct.shape)
    mask = np.zeros(ct.shape, dtype=bool)
    mask[5:15, 5:15, 5:15] = True
    base = metrics.ssim(ct, sct, mask=mask)
    assert 0.5 < base < 1.0
    changed = sct.copy()
    changed[~mask] = rng.normal(2000, 500, size=int((~mask).sum()))  # outside the mask: set to -1024 anyway
    assert metrics.ssim(ct, changed, mask=mask) == pytest.approx(base, abs=1e-7)
    # MAE, ME and PSNR ignore the outside too.
    for name in ("mae", "me", "psnr"):
        fn = getattr(metrics, name)
        assert fn(ct, changed, mask=mask) == pytest.approx(fn(ct, sct, mask=mask))


def test_ssim_matches_scikit_image():
    """Cross-check against the challenge's implementation path (scikit-image, in the ``test`` extra)."""
    import skimage.metrics as skm

    rng = np.random.default_rng(4)
    ct = rng.normal(0, 400, size=(16, 18, 17)).astype(np.float32)
    ct[2:5] = 3500.0
    sct = (ct + rng.normal(20, 120, size=ct.shape)).astype(np.float32)
    mask = np.zeros(ct.shape, dtype=bool)
    mask[2:14, 3:15, 4:16] = True
    low, high = -1024.0, 3000.0
    a = np.where(mask, np.clip(ct, low, high), low) - low
    b = np.where(mask, np.clip(sct, low, high), low) - low
    _, ssim_map = skm.structural_similarity(a, b, data_range=high - low, full=True)
    expected = ssim_map[3:-3, 3:-3, 3:-3][mask[3:-3, 3:-3, 3:-3]].mean(dtype=np.float64)
    assert metrics.ssim(ct, sct, mask=mask) == pytest.approx(expected, abs=1e-6)
    psnr_expected = skm.peak_signal_noise_ratio(
        np.clip(ct, low, high)[mask], np.clip(sct, low, high)[mask], data_range=high - low
    )
    assert metrics.psnr(ct, sct, mask=mask) == pytest.approx(psnr_expected, abs=1e-4)


def test_metrics_accept_images_and_check_grids():
    ct = sitk.GetImageFromArray(np.zeros((8, 8, 8), dtype=np.float32))
    sct = sitk.GetImageFromArray(np.full((8, 8, 8), 10.0, dtype=np.float32))
    assert metrics.me(ct, sct) == pytest.approx(10.0)
    moved = sitk.Image(sct)
    moved.SetOrigin((5.0, 0.0, 0.0))
    with pytest.raises(GeometryMismatchError):
        metrics.mae(ct, moved)
    with pytest.raises(GeometryMismatchError):
        metrics.mae(np.zeros((4, 4)), np.zeros((4, 5)))
    with pytest.raises(InvalidParameterError, match="empty"):
        metrics.mae(np.zeros((4, 4)), np.zeros((4, 4)), mask=np.zeros((4, 4)))
    with pytest.raises(InvalidParameterError, match="7 voxels"):
        metrics.ssim(np.zeros((4, 8, 8)), np.zeros((4, 8, 8)))
    with pytest.raises(InvalidParameterError):
        metrics.psnr(np.zeros(3), np.ones(3), hu_range=(10, -10))


def _image(array: np.ndarray, spacing=(1.0, 1.0, 1.0)) -> sitk.Image:
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing)
    return image


def test_body_mask_keeps_the_largest_component_and_fills_holes():
    ct = np.full((20, 30, 30), -1000.0, dtype=np.float32)
    ct[2:18, 5:25, 5:25] = 40.0  # the body
    ct[8:12, 12:18, 12:18] = -900.0  # an air pocket inside (bowel gas)
    ct[5:15, 14:16, 5:8] = -950.0  # a slit open to the body edge in every slice it crosses... within the body
    ct[1:3, 0:2, 27:30] = 100.0  # a small object outside (table)
    mask = sitk.GetArrayFromImage(ct_body_mask(_image(ct)))
    expected = np.zeros(ct.shape, dtype=np.uint8)
    expected[2:18, 5:25, 5:25] = 1
    expected[5:15, 14:16, 5:8] = 0  # opens to the outside of the body in each slice: not a hole
    np.testing.assert_array_equal(mask, expected)
    with pytest.raises(InvalidParameterError, match="no body"):
        ct_body_mask(_image(np.full((5, 5, 5), -1000.0, dtype=np.float32)))


def test_segment_bone_components_and_holes():
    ct = np.zeros((30, 30, 30), dtype=np.float32)
    ct[2:12, 2:12, 2:12] = 700.0  # 1000 voxels
    ct[6:8, 6:8, 6:8] = 0.0  # a small pocket (8 voxels): filled
    ct[15:28, 15:28, 15:28] = 500.0  # 2197 voxels, the largest
    ct[18:25, 18:25, 18:25] = 0.0  # a large pocket (343 voxels): kept open with max_hole_mm3=100
    ct[0:2, 25:27, 0:2] = 900.0  # 8 voxels: below min_size_mm3
    image = _image(ct, spacing=(1.0, 1.0, 1.0))
    bone = sitk.GetArrayFromImage(segment_bone(image, threshold=200.0, min_size_mm3=20.0, max_hole_mm3=100.0))
    assert bone[0:2, 25:27, 0:2].sum() == 0
    assert bone[6:8, 6:8, 6:8].all()
    assert not bone[18:25, 18:25, 18:25].any()
    assert bone.sum() == 1000 + (2197 - 343)
    largest = sitk.GetArrayFromImage(segment_bone(image, keep_largest=1, max_hole_mm3=None))
    assert largest.sum() == 2197  # the large pocket filled too
    assert largest[2:12, 2:12, 2:12].sum() == 0
    with pytest.raises(InvalidParameterError):
        keep_components(image > 200, keep_largest=0)
    # Spacing matters: with 2 mm voxels the 8-voxel pocket is 64 mm³.
    coarse = _image(ct, spacing=(2.0, 2.0, 2.0))
    filled = sitk.GetArrayFromImage(fill_small_holes(coarse > 200, max_hole_mm3=50.0))
    assert not filled[6:8, 6:8, 6:8].any()


def test_marrow_cavities_are_filled_by_default_and_a_cranium_is_not():
    """A vertebral body whose marrow is below the threshold (8 mL) is solid bone; a skull's 175 mL cavity stays open."""
    ct = np.zeros((50, 50, 50), dtype=np.float32)
    ct[2:16, 2:16, 2:16] = 700.0  # a 28 mm "vertebral body" (2 mm voxels), cortex 4 mm
    ct[4:14, 4:14, 4:14] = 150.0  # its marrow, below 200 HU: 1000 voxels = 8 mL
    ct[18:50, 18:50, 18:50] = 1200.0  # a "cranium": 64 mm box
    ct[20:48, 20:48, 20:48] = 30.0  # the brain: 56 mm box, 175 mL
    bone = sitk.GetArrayFromImage(segment_bone(_image(ct, spacing=(2.0, 2.0, 2.0))))
    assert bone[4:14, 4:14, 4:14].all()
    assert not bone[20:48, 20:48, 20:48].any()


def test_dice_by_hand():
    a = np.zeros((4, 4, 4), dtype=np.uint8)
    b = np.zeros((4, 4, 4), dtype=np.uint8)
    a[0:2] = 1  # 32 voxels
    b[1:3] = 1  # 32 voxels, 16 shared
    assert dice(a, b) == pytest.approx(2 * 16 / 64)
    assert dice(a, a) == 1.0
    assert dice(np.zeros(3), np.zeros(3)) == 1.0
    assert dice(a, np.zeros_like(a)) == 0.0
    with pytest.raises(GeometryMismatchError):
        dice(a, np.zeros((4, 4, 5)))
