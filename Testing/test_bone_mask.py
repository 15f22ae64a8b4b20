"""The bone mask's marrow-cavity filling across gaps in a thin cortex: analytic shells, cups and grooves."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from SyntheticCTLib.comparison.bone import GAP_RADIUS_VOXELS, dice, fill_small_holes, segment_bone
from SyntheticCTLib.comparison.compare import compare
from SyntheticCTLib.comparison.surfaces import bone_surface, surface_points
from SyntheticCTLib.kernel.errors import InvalidParameterError

N = 36
CENTRE = (N - 1) / 2.0  # a voxel corner: the sphere is symmetric under every axis flip
R = 13.0  # outer radius, voxels
SPACING = 1.5  # mm, the spacing of the defect


def _radius() -> np.ndarray:
    z, y, x = np.mgrid[:N, :N, :N]
    return np.sqrt((z - CENTRE) ** 2 + (y - CENTRE) ** 2 + (x - CENTRE) ** 2)


def _ball() -> np.ndarray:
    return _radius() <= R


def _shell() -> np.ndarray:
    """A hollow sphere whose wall is about one voxel thick (1.5 voxels radially: face-connected, tight)."""
    r = _radius()
    return (r <= R) & (r > R - 1.5)


def _drilled(shell: np.ndarray) -> np.ndarray:
    """The shell with a one-voxel hole through its wall on each of the six axis directions, and one 2 x 2."""
    out = shell.copy()
    i, j = int(np.floor(CENTRE)), int(np.ceil(CENTRE))
    out[:, i, i] = False  # two holes along z, at both poles
    out[i, :, j] = False  # two along y
    out[j, j, :] = False  # two along x
    out[i : i + 2, i : i + 2, : N // 2] = False  # a 2 x 2 voxel gap (3 mm at 1.5 mm voxels)
    return out


def _image(array: np.ndarray, spacing: float = SPACING) -> sitk.Image:
    image = sitk.GetImageFromArray(np.ascontiguousarray(array))
    image.SetSpacing((spacing,) * 3)
    return image


def _ct(bone: np.ndarray) -> sitk.Image:
    """A CT: 700 HU bone, its marrow (inside the outer sphere) at 100 HU, soft tissue 40 HU, air around."""
    ct = np.full(bone.shape, -1000.0, dtype=np.float32)
    ct[1:-1, 1:-1, 1:-1] = 40.0
    ct[_ball()] = 100.0  # marrow below the 200 HU threshold: reaches the gaps
    ct[bone] = 700.0
    return _image(ct)


def _mask(image: sitk.Image, **kwargs) -> np.ndarray:
    return sitk.GetArrayFromImage(segment_bone(image, **kwargs)) > 0


def _surface_radii(mask: np.ndarray) -> np.ndarray:
    """Distances (voxels) of the mask's surface points from the sphere's centre."""
    points = surface_points(bone_surface(_image(mask.astype(np.uint8))))
    return np.linalg.norm(points / SPACING - CENTRE, axis=1)


def test_a_drilled_shell_is_filled_to_the_ball_and_its_surface_is_the_sphere():
    """Gaps of one and two voxels in a one-voxel cortex: the cavity is still marrow, the surface the outer sphere."""
    ball, drilled = _ball(), _drilled(_shell())
    assert GAP_RADIUS_VOXELS == 1
    new = _mask(_ct(drilled))
    np.testing.assert_array_equal(new, ball)
    assert dice(new, ball) == 1.0
    radii = _surface_radii(new)
    # The smoothed 0.5 level of the voxelized ball: within half a voxel (0.75 mm) of the analytic sphere.
    assert np.all(np.abs(radii - R) <= 0.5)
    # Before: the marrow, open through the gaps, stayed out of the mask and its walls were bone surface.
    old = _mask(_ct(drilled), gap_radius=0)
    np.testing.assert_array_equal(old, drilled)
    assert dice(old, ball) < 0.5
    assert np.mean(_surface_radii(old) < R - 1.0) > 0.3  # a large part of the old surface is the inner wall
    assert 0 < (R - 1.0) - _surface_radii(old).min() <= 1.0


def test_compare_measures_the_outer_surface_of_a_cortex_with_gaps():
    """A solid-ball sCT against the drilled-shell CT (the same outer surface): Dice 1, every distance 0."""
    reference = _ct(_drilled(_shell()))
    synthetic = _ct(_ball())
    metrics = compare(reference, synthetic).metrics.to_dict()
    assert metrics["bone_dice"] == pytest.approx(1.0)
    assert metrics["surface_mean_mm"] == pytest.approx(0.0, abs=1e-6)
    assert metrics["surface_p95_mm"] == pytest.approx(0.0, abs=1e-6)


def test_a_closed_shell_gives_the_same_mask_as_before():
    shell = _shell()
    old = _mask(_ct(shell), gap_radius=0)
    new = _mask(_ct(shell))
    np.testing.assert_array_equal(old, _ball())
    np.testing.assert_array_equal(new, old)


@pytest.mark.parametrize("width", [3, 4, 6])
def test_a_cup_with_a_wide_mouth_is_not_filled(width):
    """A real opening of three voxels or more stays open: a cup is a cup at any gap radius of one voxel."""
    cup = _shell()
    i = int(np.floor(CENTRE)) - (width - 1) // 2
    cup[i : i + width, i : i + width, : N // 2] = False  # a width x width mouth through the wall
    for gap_radius in (0, 1):
        np.testing.assert_array_equal(_mask(_ct(cup), gap_radius=gap_radius), cup)


def test_the_outer_surface_keeps_its_grooves_and_corners():
    """Closing fills a one-voxel groove and a concave corner; neither leads into a cavity, so neither is added."""
    block = np.zeros((20, 20, 20), dtype=bool)
    block[3:17, 3:17, 3:17] = True
    block[3:17, 9, 3:8] = False  # a groove one voxel wide, five deep, open along its length
    block[10:17, 10:17, 3:6] = False  # a step: concave edges
    block[6:9, 6:9, 12:15] = False  # an enclosed pocket: filled, as before
    expected = block.copy()
    expected[6:9, 6:9, 12:15] = True
    image = _image(block.astype(np.uint8), spacing=1.0)
    for gap_radius in (0, 1, 2):
        filled = sitk.GetArrayFromImage(fill_small_holes(image, gap_radius=gap_radius)) > 0
        np.testing.assert_array_equal(filled, expected)


def test_plugs_and_cavity_count_against_the_size_limit():
    """The cavity behind the gaps (with its plugs) is filled only up to max_hole_mm3."""
    drilled = _drilled(_shell())
    ball = _ball()
    cavity_mm3 = float((ball & ~drilled).sum()) * SPACING**3
    image = _image(drilled.astype(np.uint8))
    filled = sitk.GetArrayFromImage(fill_small_holes(image, max_hole_mm3=cavity_mm3)) > 0
    np.testing.assert_array_equal(filled, ball)
    kept = sitk.GetArrayFromImage(fill_small_holes(image, max_hole_mm3=cavity_mm3 - SPACING**3)) > 0
    np.testing.assert_array_equal(kept, drilled)
    with pytest.raises(InvalidParameterError, match="gap_radius"):
        fill_small_holes(image, gap_radius=-1)
    with pytest.raises(InvalidParameterError, match="gap_radius"):
        fill_small_holes(image, gap_radius=1.5)


def test_a_mask_cut_by_the_image_border_is_not_closed_by_the_border():
    """A shell cut open by the image edge: the edge is not a wall, the cavity stays open (as before)."""
    cut = _shell()[: int(CENTRE)]  # the lower half: its cavity opens onto the top face of the image
    image = _image(cut.astype(np.uint8))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(fill_small_holes(image)) > 0, cut)
