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
import pytest
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


# -- turned-over scans found without a start --------------------------------------------------------------

TURNS = [
    ((180.0, 0.0, 0.0), (25.0, -20.0, 22.0)),
    ((0.0, 180.0, 0.0), (-18.0, 30.0, 20.0)),
    ((0.0, 0.0, 180.0), (30.0, 15.0, -22.0)),
    ((90.0, 0.0, 0.0), (-22.0, -25.0, 18.0)),
]
TURN_IDS = ["180-about-x", "180-about-y", "180-about-z", "90-about-x"]


@pytest.fixture(scope="module")
def phantom():
    from SyntheticCTLib.phantom import make_phantom

    return make_phantom(3, size=(64, 64, 48), spacing=2.0)


@pytest.fixture(scope="module")
def bone_points(phantom):
    return mask_points(sitk.Cast(phantom.bone_labels > 0, sitk.sitkUInt8), max_points=50_000)


@pytest.mark.parametrize("angles, shift", TURNS, ids=TURN_IDS)
def test_turned_ct_is_found_without_a_start(phantom, bone_points, angles, shift):
    from SyntheticCTLib.registration.registration import register
    from SyntheticCTLib.registration.simulate import rescanned

    truth = turn(physical_centre(phantom.ct), angles, shift)
    result = register(phantom.ct, rescanned(phantom.ct, truth))
    errors = target_registration_error(result.transform, truth, bone_points)
    assert errors.max() < 0.3, f"TRE mean {errors.mean():.3f} max {errors.max():.3f} mm"
    assert result.initialization["pose_search"] is True
    assert result.quality.verdict == "good", result.quality.to_dict()
    assert result.converged and result.quality.measures["pose_margin"] > 0


@pytest.mark.parametrize("angles, shift", TURNS, ids=TURN_IDS)
def test_turned_mri_is_found_without_a_start(phantom, bone_points, angles, shift):
    from SyntheticCTLib.registration.registration import register
    from SyntheticCTLib.registration.simulate import rescanned

    truth = turn(physical_centre(phantom.ct), angles, shift)
    result = register(phantom.ct, rescanned(phantom.mri[0], truth))
    errors = target_registration_error(result.transform, truth, bone_points)
    assert result.metric == "mattes"
    assert errors.max() < 1.0, f"TRE mean {errors.mean():.3f} max {errors.max():.3f} mm"
    assert result.quality.verdict == "good", result.quality.to_dict()


def test_without_the_pose_search_a_turned_scan_is_graded_failed(phantom, bone_points):
    """The reported bug: turned over, the local search ends ~50 mm off; the grade must say so."""
    from SyntheticCTLib.registration.registration import register
    from SyntheticCTLib.registration.simulate import rescanned

    truth = turn(physical_centre(phantom.ct), (0.0, 180.0, 0.0), (-18.0, 30.0, 20.0))
    result = register(phantom.ct, rescanned(phantom.ct, truth), pose_search=False)
    assert target_registration_error(result.transform, truth, bone_points).mean() > 10.0
    quality = result.to_dict()["quality"]
    assert quality["verdict"] == "failed", quality
    assert quality["pose_margin"] < 0 and abs(quality["rival_rotation_deg"] - 180.0) < 10.0
    assert any("fits better" in r for r in quality["reasons"])


def test_a_wrong_start_stopped_early_is_not_graded_good(phantom, bone_points):
    from SyntheticCTLib.registration.registration import register
    from SyntheticCTLib.registration.simulate import rescanned

    centre = physical_centre(phantom.ct)
    truth = turn(centre, (8.0, -5.0, 6.0), (10.0, -12.0, 8.0))
    wrong = turn(centre, (8.0, -5.0, 186.0), (10.0, -12.0, 8.0))  # turned the wrong way round
    result = register(phantom.ct, rescanned(phantom.ct, truth), initial_transform=wrong, max_iterations=3)
    assert target_registration_error(result.transform, truth, bone_points).mean() > 10.0
    assert not result.converged
    assert result.quality.verdict in ("failed", "doubtful"), result.quality.to_dict()
    assert any("iteration limit" in r for r in result.quality.reasons)


def test_inverse_consistency_is_measured(phantom):
    from SyntheticCTLib.registration.registration import register
    from SyntheticCTLib.registration.simulate import rescanned

    truth = turn(physical_centre(phantom.ct), (6.0, -4.0, 5.0), (8.0, -6.0, 4.0))
    result = register(phantom.ct, rescanned(phantom.ct, truth), inverse_check=True)
    assert result.quality.measures["inverse_residual_mm"] < 0.2
    assert result.quality.verdict == "good"


@pytest.mark.parametrize("angles, shift", TURNS, ids=TURN_IDS)
def test_turned_real_ct_is_found_without_a_start(real_data_dir, angles, shift):
    from SyntheticCTLib.registration.registration import register
    from SyntheticCTLib.registration.simulate import rescanned

    ct = read_volume(real_data_dir / REAL_CT)
    truth = turn(physical_centre(ct), angles, shift)
    result = register(ct, rescanned(ct, truth, crop_voxels=(4, 4, 4)))
    bone = mask_points(sitk.Cast(ct > 200, sitk.sitkUInt8), max_points=50_000)
    errors = target_registration_error(result.transform, truth, bone)
    # 3 mm voxels: the TRE left is the B-spline resampling of the "rescanned" copy (as unturned, see test_registration).
    assert errors.mean() < 0.3 and errors.max() < 0.5, f"TRE mean {errors.mean():.3f} max {errors.max():.3f} mm"
    assert result.quality.verdict == "good", result.quality.to_dict()


# -- the grade in the record and on the command line --------------------------------------------------------


def test_cli_grades_and_strict_exit(phantom, tmp_path, capsys):
    from SyntheticCTLib.registration.simulate import rescanned

    truth = turn(physical_centre(phantom.ct), (0.0, 180.0, 0.0), (-18.0, 30.0, 20.0))
    write_volume(phantom.ct, tmp_path / "ct.nii.gz")
    write_volume(rescanned(phantom.ct, truth), tmp_path / "turned.nii.gz")
    base = ["register", "--fixed", str(tmp_path / "ct.nii.gz"), "--moving", str(tmp_path / "turned.nii.gz")]
    base += ["--progress", "none"]

    assert main(base + ["-o", str(tmp_path / "good.tfm")]) == 0
    captured = capsys.readouterr()
    assert "quality: good" in captured.out and "syntheticct register:" not in captured.err
    assert json.loads((tmp_path / "good.tfm.json").read_text())["quality"]["verdict"] == "good"

    assert main(base + ["-o", str(tmp_path / "bad.tfm"), "--no-pose-search"]) == 0
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("syntheticct register:")]
    assert len(err) == 1 and "error" in err[0] and "FAILED" in err[0], err
    assert json.loads((tmp_path / "bad.tfm.json").read_text())["quality"]["verdict"] == "failed"
    assert (tmp_path / "bad.tfm").exists()  # written all the same: the grade is a judgement, not an error

    assert main(base + ["-o", str(tmp_path / "strict.tfm"), "--no-pose-search", "--strict"]) == 3
    assert "FAILED" in capsys.readouterr().err


# -- bone-local transforms found by compare ------------------------------------------------------------------


def test_compare_picks_up_the_bone_local_transforms(phantom, tmp_path, capsys):
    """Issue 13 item 6: `compare --transform T` uses T.bone<k>.tfm and the labels the registration used,
    exactly as if they were given with --bone-labels and --bone-transform."""
    from SyntheticCTLib.registration.bone_local import bone_components
    from SyntheticCTLib.registration.simulate import rescanned

    truth = turn(physical_centre(phantom.ct), (3.0, -2.0, 4.0), (4.0, -3.0, 2.0))
    write_volume(phantom.ct, tmp_path / "ct.nii.gz")
    write_volume(rescanned(phantom.ct, truth), tmp_path / "moved.nii.gz")
    code = main(
        ["register", "--fixed", str(tmp_path / "ct.nii.gz"), "--moving", str(tmp_path / "moved.nii.gz")]
        + ["-o", str(tmp_path / "reg.tfm"), "--mode", "bone-local", "--progress", "none"]
    )
    assert code == 0, capsys.readouterr().err
    record = json.loads((tmp_path / "reg.tfm.json").read_text())
    assert record["bone_labels"] is None and record["bone_threshold_hu"] == 200.0 and record["per_bone"]
    compare = ["compare", "--reference", str(tmp_path / "ct.nii.gz"), "--synthetic", str(tmp_path / "moved.nii.gz")]
    compare += ["--transform", str(tmp_path / "reg.tfm"), "--progress", "none"]
    assert main(compare + ["-o", str(tmp_path / "auto")]) == 0
    assert f"per-bone transforms of {len(record['per_bone'])} bones" in capsys.readouterr().out

    write_volume(bone_components(phantom.ct), tmp_path / "components.nii.gz")
    explicit = ["--bone-labels", str(tmp_path / "components.nii.gz")]
    for entry in record["per_bone"]:
        explicit += ["--bone-transform", f"{entry['label']}={tmp_path / entry['file']}"]
    assert main(compare + explicit + ["-o", str(tmp_path / "explicit")]) == 0
    auto = json.loads((tmp_path / "auto" / "metrics.json").read_text())["per_bone"]
    given = json.loads((tmp_path / "explicit" / "metrics.json").read_text())["per_bone"]
    assert len(auto) == len(record["per_bone"]) and all(row["transform"] == "bone-local" for row in auto)
    assert auto == given


# -- the grade's rules ------------------------------------------------------------------------------------------


def test_grade_rules_on_hand_made_measures():
    from SyntheticCTLib.registration.quality import grade, pose_margin

    assert pose_margin(-0.8, [-0.6, -0.7]) == pytest.approx(0.125)  # (-0.7 - -0.8) / 0.8
    assert pose_margin(-0.6, [-0.8]) == pytest.approx(-0.25)
    assert pose_margin(-0.8, []) is None
    good = {"body_dice": 0.98, "bone_dice": 0.9, "pose_margin": 0.2, "rival_rotation_deg": 180.0}
    assert grade(good, converged=True, metric="correlation", metric_value=-0.95).verdict == "good"
    assert grade(good, converged=False, metric="correlation", metric_value=-0.95).verdict == "doubtful"
    assert grade(good, converged=True, metric="correlation", metric_value=-0.1).verdict == "doubtful"
    assert (
        grade({**good, "pose_margin": 0.03}, converged=True, metric="mattes", metric_value=-0.5).verdict == "doubtful"
    )
    failed = grade({**good, "pose_margin": -0.1}, converged=True, metric="mattes", metric_value=-0.5)
    assert failed.verdict == "failed" and "turned by 180 deg fits better" in failed.reasons[0]
    assert grade({**good, "bone_dice": 0.2}, converged=True, metric="mattes", metric_value=-0.5).verdict == "failed"
    assert grade({**good, "body_dice": 0.7}, converged=True, metric="mattes", metric_value=-0.5).verdict == "doubtful"
    assert (
        grade({**good, "inverse_residual_mm": 6.0}, converged=True, metric="mattes", metric_value=-0.5).verdict
        == "failed"
    )
    assert grade({}, converged=True, metric="mattes", metric_value=-0.5).to_dict() == {"verdict": "good", "reasons": []}


def test_overlaps_of_an_image_with_itself_and_shifted(phantom):
    from SyntheticCTLib.registration.quality import overlaps

    identity = sitk.Transform(3, sitk.sitkIdentity)
    same = overlaps(phantom.ct, phantom.ct, identity, fixed_modality="ct", moving_modality="ct")
    assert same["body_dice"] == 1.0 and same["bone_dice"] == 1.0 and same["fov_fraction"] == 1.0
    shifted = overlaps(
        phantom.ct,
        phantom.ct,
        sitk.TranslationTransform(3, (0.0, 0.0, 12.0)),
        fixed_modality="ct",
        moving_modality="ct",
    )
    assert shifted["bone_dice"] < 0.6 and shifted["fov_fraction"] < 0.9
    mri = overlaps(phantom.ct, phantom.mri[0], identity, fixed_modality="ct", moving_modality="mr")
    assert mri["bone_dice"] is None and mri["body_dice"] > 0.9


def test_compare_says_when_its_transform_is_graded_failed(phantom, tmp_path, capsys):
    from SyntheticCTLib.registration.simulate import rescanned

    truth = turn(physical_centre(phantom.ct), (0.0, 180.0, 0.0), (-18.0, 30.0, 20.0))
    write_volume(phantom.ct, tmp_path / "ct.nii.gz")
    write_volume(rescanned(phantom.ct, truth), tmp_path / "turned.nii.gz")
    images = ["--fixed", str(tmp_path / "ct.nii.gz"), "--moving", str(tmp_path / "turned.nii.gz")]
    assert main(["register", *images, "-o", str(tmp_path / "bad.tfm"), "--no-pose-search", "--progress", "none"]) == 0
    capsys.readouterr()
    compare = ["compare", "--reference", str(tmp_path / "ct.nii.gz"), "--synthetic", str(tmp_path / "turned.nii.gz")]
    assert (
        main(compare + ["--transform", str(tmp_path / "bad.tfm"), "-o", str(tmp_path / "cmp"), "--progress", "none"])
        == 0
    )
    captured = capsys.readouterr()
    assert "(registration graded failed)" in captured.out
    assert any(
        ln.startswith("syntheticct compare: error:") and "bad.tfm is graded failed" in ln
        for ln in captured.err.splitlines()
    ), captured.err
    # The grade travels with the figures: in metrics.json and at the top of the report's summary.
    import json

    settings = json.loads((tmp_path / "cmp" / "metrics.json").read_text(encoding="utf-8"))["settings"]
    assert settings["registration_grade"] == "failed" and settings["registration_grade_reasons"]
    page = (tmp_path / "cmp" / "report.html").read_text(encoding="utf-8")
    assert "graded <b>failed</b>" in page and page.index("graded <b>failed</b>") < page.index("Mean bone-surface")


def test_a_small_move_is_not_taken_for_a_turn():
    """A coarse, nearly symmetric phantom (3 mm) moved a little: a turned pose refined with its own samples once
    reported a better metric than the right start and won (50 mm off); the starts are now compared alike."""
    from SyntheticCTLib.phantom import make_phantom
    from SyntheticCTLib.registration.registration import register

    phantom = make_phantom(0, size=(48, 48, 32), spacing=3.0)
    move = turn(physical_centre(phantom.ct), (0.0, 0.0, np.degrees(0.08)), (4.0, -3.0, 2.0))
    moved = sitk.Resample(phantom.ct, phantom.ct, move, sitk.sitkLinear, -1024.0)
    result = register(phantom.ct, moved)
    bone = mask_points(sitk.Cast(phantom.bone_labels > 0, sitk.sitkUInt8), max_points=20_000)
    errors = target_registration_error(result.transform, move.GetInverse(), bone)
    assert errors.mean() < 0.5, f"TRE mean {errors.mean():.2f} mm"
    assert not result.initialization["method"].startswith("pose") and result.quality.verdict == "good"
