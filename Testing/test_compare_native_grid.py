"""Surface comparison without double resampling: the synthetic bone surface comes from its own grid."""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk

from SyntheticCTLib.comparison.compare import COARSE_VOXEL_MM, compare
from SyntheticCTLib.comparison.surfaces import affine_of, bone_surface, mapped_surface, surface_points
from SyntheticCTLib.kernel.io import read_volume


def _turn() -> sitk.Euler3DTransform:
    transform = sitk.Euler3DTransform()
    transform.SetRotation(0.1, -0.05, 0.2)
    transform.SetTranslation((7.0, -4.0, 3.0))
    return transform


def _header_moved(image: sitk.Image, transform: sitk.Euler3DTransform) -> sitk.Image:
    """The same voxels with the grid moved by ``transform`` (reference points -> new points)."""
    matrix = np.array(transform.GetMatrix()).reshape(3, 3)
    moved = sitk.Image(image)
    moved.SetDirection(tuple((matrix @ np.array(image.GetDirection()).reshape(3, 3)).ravel()))
    moved.SetOrigin(tuple(matrix @ np.array(image.GetOrigin()) + np.array(transform.GetTranslation())))
    return moved


def test_a_header_moved_real_ct_measures_zero_with_the_true_transform(real_data_dir):
    ct = sitk.Cast(read_volume(real_data_dir / "ct" / "totalsegmentator_example_ct.nii.gz"), sitk.sitkFloat32)
    transform = _turn()
    metrics = compare(ct, _header_moved(ct, transform), transform=transform).metrics.to_dict()
    assert metrics["surface_mean_mm"] < 0.01 and metrics["surface_p95_mm"] < 0.01
    assert metrics["settings"]["synthetic_surface_grid"].startswith("its own")
    assert metrics["settings"]["reference_spacing_mm"] == [3.0, 3.0, 3.0]
    assert "limited by the voxel size" in metrics["settings"]["voxel_size_note"]


def test_a_coarse_moved_copy_is_measured_from_one_resampling_not_two(small_phantom):
    """A 4 mm phantom CT moved on its own grid: the surface error is what one resampling of the copy made."""
    ct = sitk.Cast(sitk.Resample(small_phantom.ct, _coarse_grid(small_phantom.ct, 4.0)), sitk.sitkFloat32)
    transform = _turn()
    moved = sitk.Resample(ct, ct, transform.GetInverse(), sitk.sitkLinear, -1024.0)
    measured = compare(ct, moved, transform=transform).metrics.to_dict()
    assert measured["settings"]["synthetic_surface_grid"].startswith("its own")
    # The two-resampling path: the copy resampled back onto the reference grid, then thresholded there.
    back = sitk.Resample(moved, ct, transform, sitk.sitkLinear, -1024.0)
    twice = compare(ct, back).metrics.to_dict()
    assert twice["settings"]["synthetic_surface_grid"] == "the reference's"
    assert measured["surface_mean_mm"] < 0.9 * twice["surface_mean_mm"], (
        measured["surface_mean_mm"],
        twice["surface_mean_mm"],
    )


def _coarse_grid(image: sitk.Image, spacing: float) -> sitk.Image:
    size = [int(round(n * s / spacing)) for n, s in zip(image.GetSize(), image.GetSpacing())]
    grid = sitk.Image(size, sitk.sitkUInt8)
    grid.SetSpacing((spacing,) * 3)
    grid.SetOrigin(image.GetOrigin())
    grid.SetDirection(image.GetDirection())
    return grid


def test_fine_voxels_carry_no_voxel_size_note(small_phantom):
    ct = sitk.Cast(sitk.Resample(small_phantom.ct, _coarse_grid(small_phantom.ct, 1.0)), sitk.sitkFloat32)
    settings = compare(ct, ct).metrics.to_dict()["settings"]
    assert max(settings["reference_spacing_mm"]) <= COARSE_VOXEL_MM and "voxel_size_note" not in settings


def test_affine_of_reads_a_linear_transform_and_refuses_a_non_linear_one():
    transform = _turn()
    matrix, offset = affine_of(transform)
    point = np.array([12.0, -30.0, 55.0])
    assert np.allclose(matrix @ point + offset, transform.TransformPoint(tuple(point)))
    bspline = sitk.BSplineTransform(3)
    bspline.SetTransformDomainOrigin((-100.0,) * 3)
    bspline.SetTransformDomainPhysicalDimensions((200.0,) * 3)
    bspline.SetTransformDomainMeshSize((2, 2, 2))
    bspline.SetParameters(tuple(np.random.default_rng(0).normal(0, 3, len(bspline.GetParameters()))))
    assert affine_of(bspline) is None


def test_a_mirroring_map_keeps_the_surface_outward():
    array = np.zeros((20, 20, 20), dtype=np.uint8)
    zz, yy, xx = np.mgrid[:20, :20, :20]
    array[(zz - 10) ** 2 + (yy - 10) ** 2 + (xx - 10) ** 2 <= 36] = 1
    surface = bone_surface(sitk.GetImageFromArray(array))
    mirrored = mapped_surface(surface, np.diag([-1.0, 1.0, 1.0]), np.zeros(3))
    points = surface_points(mirrored)
    normals = np.array(mirrored.GetPointData().GetNormals())
    centre = points.mean(axis=0)
    assert np.mean(np.einsum("ij,ij->i", points - centre, normals) > 0) > 0.99
