"""Registration of turned-over scans: the right-angle pose search, the grade of every result, and starts
at right angles.

Truths: the phantom CT and MRI (small, for speed) and the real CT, turned by 180 degrees about each axis
and by 90 degrees about one, and moved by up to 40 mm (:func:`SyntheticCTLib.registration.simulate.rescanned`),
so that the transform mapping fixed points to moving points is known exactly. The target registration
error (TRE) is measured over the bone of the fixed image.
"""

from __future__ import annotations

import json

import numpy as np
import SimpleITK as sitk

from SyntheticCTLib.cli.main import main
from SyntheticCTLib.kernel.io import read_volume, write_volume
from SyntheticCTLib.registration.initialization import (
    axis_rotations,
    euler,
    mask_points,
    physical_centre,
    rigid_from_matrix,
    rigid_part,
)
from SyntheticCTLib.registration.registration import target_registration_error
from SyntheticCTLib.registration.transforms_io import read_transform, write_transform

REAL_CT = "ct/totalsegmentator_example_ct.nii.gz"


def turn(centre, angles_deg, shift_mm) -> sitk.Euler3DTransform:
    return euler(centre, shift_mm, np.radians(angles_deg))


# -- right-angle rotations as Euler transforms ------------------------------------------------------------


def test_the_24_right_angle_poses_and_their_euler_transforms():
    rotations = axis_rotations()
    assert len(rotations) == 24 and np.allclose(rotations[0], np.eye(3))
    assert all(np.isclose(np.linalg.det(r), 1.0) for r in rotations)
    assert len({tuple(r.ravel()) for r in rotations}) == 24
    for r in rotations:
        t = rigid_from_matrix((10.0, -20.0, 30.0), (1.0, 2.0, 3.0), r)
        np.testing.assert_allclose(np.asarray(t.GetMatrix()).reshape(3, 3), r, atol=1e-9)


def test_a_start_at_90_degrees_about_x_survives_rounding():
    """Euler3DTransform.SetMatrix gives NaN angles when rounding puts sin(angle x) a hair above 1."""
    centre = np.array([5.0, -40.0, 120.0])
    matrix = np.asarray(turn((0, 0, 0), (90.0, 0.0, 180.0), (0, 0, 0)).GetMatrix()).reshape(3, 3)
    matrix[2, 1] = np.nextafter(1.0, 2.0)  # 1 + 2e-16, as a product of a file's angles may give
    affine = sitk.AffineTransform(3)
    affine.SetMatrix(tuple(matrix.ravel()))
    affine.SetTranslation((5.0, 5.0, 5.0))
    rigid = rigid_part(affine, centre)
    assert np.all(np.isfinite(rigid.GetParameters()))
    probes = centre + np.array([[0, 0, 0], [50, 0, 0], [0, 50, 0], [0, 0, 50]], dtype=float)
    assert target_registration_error(rigid, affine, probes).max() < 1e-6


def test_real_padded_ct_with_a_right_angle_start_is_not_refused(real_data_dir, tmp_path, capsys):
    """Issue 13 item 5: the real CT (direction diag(-1, -1, 1)) padded by 30 voxels and turned through G
    (90 deg about x, 180 deg about z, 5 mm); the correct start was refused with '0.0 % ... maps inside'."""
    ct = read_volume(real_data_dir / REAL_CT)
    padded = sitk.ConstantPad(ct, [30] * 3, [30] * 3, -1024)
    g = turn(physical_centre(ct), (90.0, 0.0, 180.0), (5.0, 5.0, 5.0))
    moving = sitk.Resample(padded, g)  # moving(x) = padded(G(x)): fixed points map to moving points by G^-1
    truth = g.GetInverse()
    write_volume(ct, tmp_path / "ct.nii.gz")
    write_volume(moving, tmp_path / "turned.nii.gz")
    write_transform(truth, tmp_path / "start.tfm")
    args = ["register", "--fixed", str(tmp_path / "ct.nii.gz"), "--moving", str(tmp_path / "turned.nii.gz")]
    args += ["-o", str(tmp_path / "reg.tfm"), "--initial-transform", str(tmp_path / "start.tfm"), "--progress", "none"]
    code = main(args)
    assert code == 0, capsys.readouterr().err
    bone = mask_points(sitk.Cast(ct > 200, sitk.sitkUInt8), max_points=50_000)
    errors = target_registration_error(read_transform(tmp_path / "reg.tfm"), truth, bone)
    assert errors.max() < 0.5, (errors.mean(), errors.max())
    record = json.loads((tmp_path / "reg.tfm.json").read_text())
    assert record["initialization"]["method"] == "user" and record["initialization"]["overlap"] > 0.9
