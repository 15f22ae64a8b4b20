"""Bone surfaces and signed surface distances against analytic truths, on anisotropic and oblique grids."""

from __future__ import annotations

import math

import numpy as np
import pytest
import SimpleITK as sitk
import vtk

from SyntheticCTLib.comparison import surfaces as S
from SyntheticCTLib.kernel.errors import InvalidParameterError


def rotation(degrees_z: float, degrees_x: float) -> np.ndarray:
    a, b = math.radians(degrees_z), math.radians(degrees_x)
    rz = np.array([[math.cos(a), -math.sin(a), 0], [math.sin(a), math.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, math.cos(b), -math.sin(b)], [0, math.sin(b), math.cos(b)]])
    return rz @ rx


GRIDS = {
    "isotropic": ((1.0, 1.0, 1.0), np.eye(3)),
    "anisotropic-oblique": ((0.7, 1.1, 1.9), rotation(20, -35)),
    "anisotropic-oblique-mirrored": ((0.9, 0.6, 1.7), rotation(-30, 25) @ np.diag([1.0, -1.0, 1.0])),
}
ORIGIN = np.array([-12.5, 33.0, 101.0])
EXTENT_MM = 64.0


def grid(spacing, direction) -> sitk.Image:
    size = [int(math.ceil(EXTENT_MM / s)) for s in spacing]
    image = sitk.Image(size, sitk.sitkUInt8)
    image.SetSpacing(tuple(float(s) for s in spacing))
    image.SetOrigin(tuple(ORIGIN))
    image.SetDirection(tuple(np.asarray(direction).ravel()))
    return image


def grid_centre(image: sitk.Image) -> np.ndarray:
    """The world centre of the grid, nudged off the voxel lattice to avoid degenerate voxelization."""
    direction = np.array(image.GetDirection()).reshape(3, 3)
    half = (np.array(image.GetSize()) - 1) * np.array(image.GetSpacing()) / 2 + np.array([0.31, 0.17, 0.43])
    return np.array(image.GetOrigin()) + direction @ half


def world_coordinates(image: sitk.Image) -> np.ndarray:
    """World (x, y, z) of every voxel, as an array of shape (nz, ny, nx, 3)."""
    nx, ny, nz = image.GetSize()
    k, j, i = np.meshgrid(np.arange(nz), np.arange(ny), np.arange(nx), indexing="ij")
    index = np.stack([i, j, k], axis=-1).astype(float) * np.array(image.GetSpacing())
    return np.array(image.GetOrigin()) + index @ np.array(image.GetDirection()).reshape(3, 3).T


def ball(like: sitk.Image, centre, radius: float) -> sitk.Image:
    inside = np.linalg.norm(world_coordinates(like) - np.asarray(centre), axis=-1) < radius
    mask = sitk.GetImageFromArray(inside.astype(np.uint8))
    mask.CopyInformation(like)
    return mask


@pytest.mark.parametrize("name", sorted(GRIDS))
def test_surface_lies_on_the_sphere_in_world_coordinates(name):
    spacing, direction = GRIDS[name]
    image = grid(spacing, direction)
    centre = grid_centre(image)
    surface = S.bone_surface(ball(image, centre, 20.0))
    radius = np.linalg.norm(S.surface_points(surface) - centre, axis=1)
    assert abs(radius.mean() - 20.0) < 0.1  # smoothing does not shrink
    assert radius.std() < 0.25
    # Outward normals, whatever the handedness of the direction matrix.
    normals = S.point_array(surface, "Normals")
    radial = (S.surface_points(surface) - centre) / radius[:, None]
    assert np.mean(np.einsum("ij,ij->i", normals, radial)) > 0.95
    # The areas add up to the sphere's.
    assert S.point_array(surface, S.AREA_ARRAY).sum() == pytest.approx(4 * math.pi * 20.0**2, rel=0.03)


@pytest.mark.parametrize("name", sorted(GRIDS))
def test_spheres_one_millimetre_apart(name):
    spacing, direction = GRIDS[name]
    image = grid(spacing, direction)
    centre = grid_centre(image)
    synthetic = S.bone_surface(ball(image, centre, 21.0))  # the synthetic bone is 1 mm larger
    reference = S.bone_surface(ball(image, centre, 20.0))
    result = S.surface_distances(synthetic, reference)
    assert result.symmetric.mean_abs_mm == pytest.approx(1.0, abs=0.1)
    assert result.synthetic_to_reference.mean_signed_mm == pytest.approx(1.0, abs=0.1)  # outside: positive
    assert result.reference_to_synthetic.mean_signed_mm == pytest.approx(-1.0, abs=0.1)  # inside: negative
    assert result.symmetric.mean_signed_mm == pytest.approx(1.0, abs=0.1)
    assert result.symmetric.median_mm == pytest.approx(1.0, abs=0.1)
    assert result.symmetric.rms_mm == pytest.approx(1.0, abs=0.15)
    assert 1.0 <= result.symmetric.p95_mm < 1.5
    assert result.symmetric.within_2mm > 0.99
    # The stored point arrays hold the same distances.
    np.testing.assert_allclose(S.point_array(synthetic, S.DISTANCE_ARRAY), result.synthetic_distances)
    np.testing.assert_allclose(S.point_array(reference, S.DISTANCE_ARRAY), result.reference_distances)


def test_identical_masks_give_zero_distance():
    spacing, direction = GRIDS["anisotropic-oblique"]
    image = grid(spacing, direction)
    mask = ball(image, grid_centre(image), 18.0)
    result = S.mask_surface_distances(mask, mask)
    assert result.symmetric.max_mm < 1e-6
    assert result.symmetric.within_1mm == 1.0
    assert result.hd95_mm < 1e-6


def test_shifted_sphere_follows_d_cos_theta():
    """A sphere moved by d: a point at angle theta from the shift lies d cos(theta) outside (to first order)."""
    spacing, direction = GRIDS["anisotropic-oblique"]
    image = grid(spacing, direction)
    centre = grid_centre(image)
    d = 2.0
    shift = np.array([1.0, 1.0, 0.0]) / math.sqrt(2.0)  # along no grid axis
    reference = S.bone_surface(ball(image, centre, 20.0))
    synthetic = S.bone_surface(ball(image, centre + d * shift, 20.0))
    result = S.surface_distances(synthetic, reference)
    points = S.surface_points(synthetic)
    radial = points - (centre + d * shift)
    cos_theta = radial @ shift / np.linalg.norm(radial, axis=1)
    # Exact distance from a point of the moved sphere to the reference sphere.
    exact = np.linalg.norm(points - centre, axis=1) - 20.0
    assert np.sqrt(np.mean((result.synthetic_distances - exact) ** 2)) < 0.2
    assert np.median(np.abs(result.synthetic_distances - exact)) < 0.1
    assert np.sqrt(np.mean((result.synthetic_distances - d * cos_theta) ** 2)) < 0.25
    assert result.synthetic_to_reference.mean_abs_mm == pytest.approx(d / 2, abs=0.1)  # mean |cos| = 1/2
    # The max also carries the voxelization error of the flat caps along the 1.9 mm axis.
    assert result.synthetic_to_reference.max_mm == pytest.approx(d, abs=0.35)
    assert weighted_p99(result) == pytest.approx(d, abs=0.2)
    assert result.synthetic_to_reference.mean_signed_mm == pytest.approx(0.0, abs=0.1)
    assert result.symmetric.within_1mm == pytest.approx(0.5, abs=0.06)  # |cos| <= 1/2 on half the area


def test_signed_distance_of_known_points():
    image = grid(*GRIDS["anisotropic-oblique"])
    centre = grid_centre(image)
    surface = S.bone_surface(ball(image, centre, 20.0))
    rng = np.random.default_rng(5)
    directions = rng.normal(size=(200, 3))
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    offsets = rng.uniform(-5.0, 5.0, size=200)
    points = centre + directions * (20.0 + offsets)[:, None]
    distances = S.signed_distances(points, surface)
    error = np.abs(distances - offsets)
    # The voxelized sphere itself deviates from the ideal one (most near the poles of the 1.9 mm axis).
    assert np.median(error) < 0.1
    assert np.percentile(error, 90) < 0.35
    assert np.all(np.sign(distances[np.abs(offsets) > 1.0]) == np.sign(offsets[np.abs(offsets) > 1.0]))


def test_closest_point_matches_vtk_exactly():
    """Our closest-point search agrees with VTK's exact cell locator on a smoothed mesh."""
    image = grid(*GRIDS["anisotropic-oblique"])
    centre = grid_centre(image)
    surface = S.bone_surface(ball(image, centre, 15.0))
    rng = np.random.default_rng(6)
    points = centre + rng.uniform(-22, 22, size=(300, 3))
    ours = S.signed_distances(points, surface)
    implicit = vtk.vtkImplicitPolyDataDistance()
    implicit.SetInput(surface)
    theirs = np.array([implicit.EvaluateFunction(*p) for p in points])
    np.testing.assert_allclose(np.abs(ours), np.abs(theirs), atol=0.02)
    far = np.abs(theirs) > 0.2
    assert np.all(np.sign(ours[far]) == np.sign(theirs[far]))


def test_distance_stats_by_hand():
    stats = S.DistanceStats.from_values(np.array([-1.0, 0.5, 2.0, -3.0]))
    assert stats.mean_abs_mm == pytest.approx(6.5 / 4)
    assert stats.rms_mm == pytest.approx(math.sqrt((1 + 0.25 + 4 + 9) / 4))
    assert stats.median_mm == 1.0
    assert stats.max_mm == 3.0
    assert stats.within_1mm == 0.5
    assert stats.within_2mm == 0.75
    assert stats.mean_signed_mm == pytest.approx(-1.5 / 4)
    weighted = S.DistanceStats.from_values(np.array([1.0, 3.0]), np.array([3.0, 1.0]))
    assert weighted.mean_abs_mm == pytest.approx(1.5)
    assert weighted.median_mm == 1.0
    assert weighted.p95_mm == 3.0
    assert weighted.area_mm2 == 4.0


def test_per_bone_statistics_from_labels():
    image = grid((1.0, 1.0, 1.0), np.eye(3))
    centre = grid_centre(image)
    left, right = centre - np.array([15.0, 0, 0]), centre + np.array([15.0, 0, 0])
    labels_array = 1 * sitk.GetArrayFromImage(ball(image, left, 10.0)) + 2 * sitk.GetArrayFromImage(
        ball(image, right, 10.0)
    )
    labels = sitk.GetImageFromArray(labels_array.astype(np.uint8))
    labels.CopyInformation(image)
    reference = S.bone_surface(labels > 0)
    synthetic_mask = sitk.Or(ball(image, left, 11.0), ball(image, right, 10.0))  # bone 1 is 1 mm too large
    synthetic = S.bone_surface(synthetic_mask)
    result = S.surface_distances(synthetic, reference)
    syn_labels = S.label_surface_points(S.surface_points(synthetic), labels)
    ref_labels = S.label_surface_points(S.surface_points(reference), labels)
    assert set(np.unique(syn_labels)) == {1, 2} and set(np.unique(ref_labels)) == {1, 2}
    rows = {row["label"]: row for row in S.per_bone_stats(result, syn_labels, ref_labels)}
    assert rows[1]["surface_mean_mm"] == pytest.approx(1.0, abs=0.1)
    assert rows[1]["surface_mean_signed_mm"] == pytest.approx(1.0, abs=0.1)
    assert rows[2]["surface_mean_mm"] < 1e-3  # the same mask (smoothing normalizes over the whole mesh)
    # Points far from every label get label 0.
    far = np.array([centre + np.array([0, 0, 30.0])])
    assert S.label_surface_points(far, labels, max_distance_mm=5.0)[0] == 0


def test_empty_masks_are_refused():
    image = grid((1.0, 1.0, 1.0), np.eye(3))
    empty = S.bone_surface(image)
    assert empty.GetNumberOfPoints() == 0
    full = S.bone_surface(ball(image, grid_centre(image), 10.0))
    with pytest.raises(InvalidParameterError, match="empty"):
        S.surface_distances(empty, full)
    with pytest.raises(InvalidParameterError, match="3D"):
        S.bone_surface(sitk.Image([4, 4], sitk.sitkUInt8))


def weighted_p99(result: S.SurfaceDistances) -> float:
    return S.weighted_quantile(np.abs(result.synthetic_distances), result.synthetic_weights, 0.99)


def test_p95_and_median_are_the_inverted_weighted_cdf_by_hand():
    """Hand-computed quantiles where the 90th and 95th percentiles differ (a p90 in place of the p95 fails)."""
    # 20 points of unit area at |d| = 1, 2, ..., 20 mm (signs alternate: statistics are of |d|).
    # Inverted CDF: the smallest |d| whose cumulative area reaches q * 20: p95 -> 19 points -> 19 mm;
    # p90 would be 18 mm, the median 10 mm.
    values = np.arange(1.0, 21.0) * np.where(np.arange(20) % 2 == 0, 1.0, -1.0)
    stats = S.DistanceStats.from_values(values)
    assert stats.p95_mm == 19.0
    assert stats.median_mm == 10.0
    assert stats.max_mm == 20.0
    # Area-weighted: |d| = 0.5, 1, 2, 4 mm over 85, 5, 5, 5 mm^2. The cumulative areas are 85, 90, 95, 100:
    # p95 = 2 mm (p90 would be 1 mm), median = 0.5 mm, mean = (42.5 + 5 + 10 + 20) / 100 = 0.775 mm.
    weighted = S.DistanceStats.from_values(np.array([0.5, -1.0, 2.0, -4.0]), np.array([85.0, 5.0, 5.0, 5.0]))
    assert weighted.p95_mm == 2.0
    assert weighted.median_mm == 0.5
    assert weighted.mean_abs_mm == pytest.approx(0.775)
    assert weighted.within_1mm == pytest.approx(0.90)
    # Both directions pooled: 20 points at 1..20 mm and 20 at 0.5 mm; 95 % of 40 = 38 points -> 18 mm
    # (p90: 36 -> 16 mm). HD95 is the larger directed p95: max(19, 0.5) = 19 mm.
    pooled = S.SurfaceDistances.from_arrays(np.arange(1.0, 21.0), np.ones(20), np.full(20, -0.5), np.ones(20))
    assert pooled.symmetric.p95_mm == 18.0
    assert pooled.synthetic_to_reference.p95_mm == 19.0
    assert pooled.reference_to_synthetic.p95_mm == 0.5
    assert pooled.hd95_mm == 19.0
