"""Registration: known transforms recovered (rigid CT, MRI to CT, affine, deformable, bone-local), transform
files, clear errors, the ``syntheticct register`` command and a real CT.

Truths: the phantom CT (64x64x48 at 2 mm) is "rescanned" after a known move (a rotated and shifted grid,
sub-voxel offset, smaller field of view; :func:`SyntheticCTLib.registration.simulate.rescanned`), so that
the transform mapping fixed points to moving points is known exactly. The target registration error (TRE)
is the distance between the true and the recovered mapping of every bone voxel of the fixed image.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from SyntheticCTLib.cli.main import main
from SyntheticCTLib.kernel.errors import Cancelled, InvalidParameterError, VolumeReadError
from SyntheticCTLib.kernel.io import read_volume, write_volume
from SyntheticCTLib.kernel.progress import parse_progress_line
from SyntheticCTLib.phantom import make_phantom
from SyntheticCTLib.registration.bone_local import bone_components
from SyntheticCTLib.registration.initialization import mask_points, physical_centre
from SyntheticCTLib.registration.modality import choose_metric, detect_modality
from SyntheticCTLib.registration.registration import (
    NonOverlapError,
    register,
    resample_moving,
    target_registration_error,
)
from SyntheticCTLib.registration.simulate import rescanned
from SyntheticCTLib.registration.transforms_io import TransformIOError, read_transform, write_transform

REAL_CT = (
    Path(__file__).resolve().parents[1].parent
    / "shared"
    / "data"
    / "real"
    / "ct"
    / "totalsegmentator_example_ct.nii.gz"
)


def euler(centre, angles_deg, shift_mm) -> sitk.Euler3DTransform:
    t = sitk.Euler3DTransform()
    t.SetCenter(tuple(float(c) for c in centre))
    t.SetRotation(*np.radians(angles_deg))
    t.SetTranslation(tuple(float(s) for s in shift_mm))
    return t


@pytest.fixture(scope="module")
def phantom():
    return make_phantom(3, size=(64, 64, 48), spacing=2.0)


@pytest.fixture(scope="module")
def bone_points(phantom):
    return mask_points(sitk.Cast(phantom.bone_labels > 0, sitk.sitkUInt8), max_points=100_000)


def tre(estimated, truth, points) -> np.ndarray:
    return target_registration_error(estimated, truth, points)


# -- accuracy against known transforms -----------------------------------------------------------------


@pytest.mark.parametrize(
    "angles, shift",
    [((15.0, -15.0, 15.0), (20.0, -20.0, 20.0)), ((-9.0, 12.0, -4.0), (-14.0, 6.0, -18.0))],
    ids=["max-move", "mixed-move"],
)
def test_rigid_ct_to_moved_ct_recovers_the_transform(phantom, bone_points, angles, shift):
    truth = euler(physical_centre(phantom.ct), angles, shift)
    moving = rescanned(phantom.ct, truth)
    result = register(phantom.ct, moving, mode="rigid")
    errors = tre(result.transform, truth, bone_points)
    assert errors.max() < 0.3, f"TRE mean {errors.mean():.3f} max {errors.max():.3f} mm"
    assert result.metric == "correlation" and result.mode == "rigid"
    assert isinstance(result.transform, sitk.Euler3DTransform)
    assert result.converged and result.iterations > 0 and result.elapsed_s > 0
    assert result.metric_value < -0.9  # correlation metric: -1 is a perfect match


def test_far_apart_scans_with_another_field_of_view_converge(phantom, bone_points):
    """Another position (150 mm away, rotated beyond 15 degrees) and a field of view 40 % shorter."""
    truth = euler(physical_centre(phantom.ct), (25.0, -20.0, 28.0), (150.0, -90.0, 60.0))
    moving = rescanned(phantom.ct, truth, crop_voxels=(6, 6, 10))
    result = register(phantom.ct, moving)
    errors = tre(result.transform, truth, bone_points)
    assert errors.mean() < 0.2 and errors.max() < 0.5, f"TRE mean {errors.mean():.3f} max {errors.max():.3f} mm"
    assert result.initialization["method"] in ("geometry", "moments")


def test_rigid_recovers_a_move_resampled_on_the_same_grid(phantom, bone_points):
    """The way a demo moves a CT: resampled on its own grid, air filling what left the field of view."""
    truth_inverse = euler(physical_centre(phantom.ct), (8.0, -12.0, 5.0), (10.0, 15.0, -12.0))
    moving = sitk.Resample(phantom.ct, phantom.ct, truth_inverse, sitk.sitkLinear, -1024.0)
    result = register(phantom.ct, moving)
    errors = tre(result.transform, truth_inverse.GetInverse(), bone_points)
    assert errors.max() < 0.3, f"TRE mean {errors.mean():.3f} max {errors.max():.3f} mm"


def test_a_user_initial_transform_starts_a_turned_over_pair(phantom, bone_points):
    """Turned over (180 degrees about the long axis, prone to supine), from a rough manual start (an affine)."""
    centre = physical_centre(phantom.ct)
    truth = euler(centre, (0.0, 0.0, 180.0), (12.0, -8.0, 6.0))
    moving = rescanned(phantom.ct, truth)
    # The user's rough alignment: 10 degrees and 9 mm off, with 4 % of scaling, as an affine transform.
    rough = sitk.AffineTransform(3)
    rough.SetCenter(tuple(centre))
    off = euler(centre, (6.0, -5.0, 186.0), (18.0, -4.0, 8.0))
    rough.SetMatrix(tuple((np.asarray(off.GetMatrix()).reshape(3, 3) @ np.diag([1.04, 0.97, 1.0])).ravel()))
    rough.SetTranslation(off.GetTranslation())
    result = register(phantom.ct, moving, initial_transform=rough)
    errors = tre(result.transform, truth, bone_points)
    assert errors.max() < 0.3, f"TRE mean {errors.mean():.3f} max {errors.max():.3f} mm"
    assert result.initialization["method"] == "user"
    assert abs(abs(result.initialization["rotation_deg"][2]) - 180.0) < 10.0


def test_rigid_part_of_a_linear_transform():
    from SyntheticCTLib.registration.initialization import rigid_part

    centre = np.array([10.0, -20.0, 30.0])
    rotation = euler((0, 0, 0), (20.0, -10.0, 35.0), (0, 0, 0))
    r = np.asarray(rotation.GetMatrix()).reshape(3, 3)
    affine = sitk.AffineTransform(3)
    affine.SetCenter(tuple(centre))
    affine.SetMatrix(tuple((r @ np.diag([1.1, 0.9, 1.05])).ravel()))
    affine.SetTranslation((5.0, 6.0, -7.0))
    rigid = rigid_part(sitk.CompositeTransform([affine]), centre)  # composites of linear transforms too
    np.testing.assert_allclose(np.asarray(rigid.GetMatrix()).reshape(3, 3), r, atol=1e-9)
    np.testing.assert_allclose(rigid.TransformPoint(tuple(centre)), affine.TransformPoint(tuple(centre)), atol=1e-9)
    grid = sitk.Image([40, 40, 40], sitk.sitkFloat32)
    grid.SetOrigin(tuple(centre - 100.0))
    grid.SetSpacing((5.0, 5.0, 5.0))
    bent = sitk.BSplineTransformInitializer(grid, [3, 3, 3])
    bent.SetParameters(tuple(np.random.default_rng(0).normal(0.0, 5.0, bent.GetNumberOfParameters())))
    with pytest.raises(InvalidParameterError, match="not linear"):
        rigid_part(bent, centre)
    mirror = sitk.AffineTransform(3)
    mirror.SetMatrix((-1.0, 0, 0, 0, 1, 0, 0, 0, 1))
    with pytest.raises(InvalidParameterError, match="mirrors"):
        rigid_part(mirror, centre)


def test_mri_first_echo_to_ct_recovers_the_transform(phantom, bone_points):
    truth = euler(physical_centre(phantom.ct), (-12.0, 10.0, 14.0), (16.0, -12.0, -18.0))
    moving = rescanned(phantom.mri[0], truth)
    assert detect_modality(moving) == "mr"
    result = register(phantom.ct, moving)
    errors = tre(result.transform, truth, bone_points)
    assert result.metric == "mattes"
    assert errors.max() < 1.0, f"TRE mean {errors.mean():.3f} max {errors.max():.3f} mm"


def test_affine_recovers_a_known_scaling(phantom, bone_points):
    centre = physical_centre(phantom.ct)
    truth = sitk.AffineTransform(3)
    truth.SetCenter(tuple(centre))
    truth.SetMatrix(tuple(np.diag([1.05, 0.96, 1.03]).ravel()))
    truth.SetTranslation((4.0, -3.0, 2.5))
    moving = rescanned(phantom.ct, truth)
    affine = register(phantom.ct, moving, mode="affine")
    rigid_errors = tre(register(phantom.ct, moving, mode="rigid").transform, truth, bone_points)
    errors = tre(affine.transform, truth, bone_points)
    assert isinstance(affine.transform, sitk.AffineTransform)
    assert errors.max() < 0.5, f"TRE mean {errors.mean():.3f} max {errors.max():.3f} mm"
    assert errors.mean() < rigid_errors.mean() / 3
    np.testing.assert_allclose(
        np.asarray(affine.transform.GetMatrix()).reshape(3, 3), np.diag([1.05, 0.96, 1.03]), atol=0.01
    )


def test_deformable_recovers_a_smooth_warp_better_than_affine(phantom, bone_points, tmp_path):
    ct = phantom.ct
    centre = physical_centre(ct)
    z, y, _ = np.meshgrid(*[np.arange(n, dtype=float) for n in ct.GetSize()[::-1]], indexing="ij")
    wz = ct.GetOrigin()[2] + z * ct.GetSpacing()[2] - centre[2]
    wy = ct.GetOrigin()[1] + y * ct.GetSpacing()[1] - centre[1]
    field = np.zeros(z.shape + (3,))
    field[..., 0] = 2.5 * np.sin(2 * np.pi * wz / 100.0)
    field[..., 1] = 1.5 * np.cos(2 * np.pi * wy / 120.0)
    displacement = sitk.GetImageFromArray(field, isVector=True)
    displacement.CopyInformation(ct)
    # moving(x) = ct(x + d(x)); so the fixed -> moving mapping is the inverse of x + d(x).
    warp = sitk.DisplacementFieldTransform(sitk.Image(displacement))
    moving = sitk.Resample(ct, ct, warp, sitk.sitkBSpline, -1024.0)
    inverse = sitk.InvertDisplacementField(
        displacement, maximumNumberOfIterations=50, maxErrorToleranceThreshold=1e-3, meanErrorToleranceThreshold=1e-4
    )
    truth = sitk.DisplacementFieldTransform(inverse)

    deformable = register(ct, moving, mode="deformable")
    assert isinstance(deformable.transform, sitk.CompositeTransform)
    affine = deformable.transform.GetNthTransform(0).Downcast()  # the affine stage under the B-spline
    assert isinstance(affine, sitk.AffineTransform)
    affine_errors, errors = tre(affine, truth, bone_points), tre(deformable.transform, truth, bone_points)
    assert errors.mean() < 0.5 and errors.mean() < affine_errors.mean() / 2, (errors.mean(), affine_errors.mean())
    # The composite (affine + B-spline) survives an .h5 file.
    path = write_transform(deformable.transform, tmp_path / "deformable.h5")
    again = read_transform(path)
    assert np.max(np.abs(tre(again, deformable.transform, bone_points[::50]))) < 1e-6


def displaced_vertebra(phantom, label: int, shift_mm) -> sitk.Image:
    """The phantom CT with vertebra ``label`` (and the tissue right around it) moved by ``shift_mm``."""
    ct = phantom.ct
    shift = sitk.TranslationTransform(3, tuple(-s for s in shift_mm))  # resampling: content moves by +shift
    bone = sitk.Cast(phantom.bone_labels == label, sitk.sitkUInt8)
    moved_bone = sitk.Resample(bone, bone, shift, sitk.sitkNearestNeighbor, 0)
    region = sitk.BinaryDilate(bone | moved_bone, [1, 1, 1])
    moved_ct = sitk.Resample(ct, ct, shift, sitk.sitkBSpline, -1024.0)
    array = np.where(
        sitk.GetArrayViewFromImage(region) > 0, sitk.GetArrayViewFromImage(moved_ct), sitk.GetArrayViewFromImage(ct)
    )
    out = sitk.GetImageFromArray(array.astype(np.float32))
    out.CopyInformation(ct)
    return out


@pytest.mark.parametrize("labels", ["given", "components"])
def test_bone_local_recovers_one_displaced_vertebra(phantom, labels):
    label, shift = 3, (0.0, 1.2, 1.6)  # a 2 mm shift of the middle vertebra only
    moving = displaced_vertebra(phantom, label, shift)
    result = register(
        phantom.ct, moving, mode="bone-local", bone_labels=phantom.bone_labels if labels == "given" else None
    )
    truth = sitk.TranslationTransform(3, shift)
    bone = sitk.Cast(phantom.bone_labels == label, sitk.sitkUInt8)
    points = mask_points(bone, max_points=50_000)
    assert isinstance(result.transform, sitk.Euler3DTransform) and result.mode == "bone-local"
    n_vertebrae = int(sitk.GetArrayViewFromImage(phantom.bone_labels).max())
    assert len(result.per_bone) == n_vertebrae
    # The per-bone entry that covers the displaced vertebra (labels are renumbered for components).
    if labels == "given":
        entry = next(b for b in result.per_bone if b["label"] == label)
        assert entry["voxels"] == int(np.count_nonzero(sitk.GetArrayViewFromImage(bone)))
    else:
        components = sitk.GetArrayViewFromImage(bone_components(phantom.ct))
        inside = components[sitk.GetArrayViewFromImage(bone) > 0]
        component = int(np.bincount(inside[inside > 0]).argmax())
        entry = next(b for b in result.per_bone if b["label"] == component)
    local = tre(entry["transform"], truth, points)
    global_ = tre(result.transform, truth, points)
    assert local.mean() < 0.5, f"local TRE {local.mean():.3f} mm"
    assert local.mean() < global_.mean() / 3, (local.mean(), global_.mean())
    assert entry["shift_from_global_mm"] > 1.0
    assert set(entry) >= {"label", "transform", "metric_value", "voxels"}
    summary = result.to_dict()
    json.dumps(summary)
    assert len(summary["per_bone"]) == n_vertebrae


# -- behaviour ------------------------------------------------------------------------------------------


def test_same_inputs_give_the_same_transform(phantom):
    moving = rescanned(phantom.ct, euler(physical_centre(phantom.ct), (5.0, 0.0, -5.0), (6.0, -4.0, 3.0)))
    a = register(phantom.ct, moving)
    b = register(phantom.ct, moving)
    np.testing.assert_allclose(a.transform.GetParameters(), b.transform.GetParameters(), atol=1e-9)


def test_progress_reaches_one_and_cancel_stops(phantom):
    moving = rescanned(phantom.ct, euler(physical_centre(phantom.ct), (3.0, 0.0, 0.0), (2.0, 0.0, 0.0)))
    seen = []
    register(phantom.ct, moving, progress=lambda f, stage, message="": seen.append((f, stage)))
    fractions = [f for f, _ in seen]
    assert fractions[-1] == 1.0 and all(0.0 <= f <= 1.0 for f in fractions)
    assert fractions == sorted(fractions)
    assert {"initialization", "rigid registration", "done"} <= {s for _, s in seen}

    calls = []

    def cancel_after_some(fraction, stage, message=""):
        calls.append(stage)
        if stage == "rigid registration":
            raise Cancelled("stop")

    with pytest.raises(Cancelled):
        register(phantom.ct, moving, progress=cancel_after_some)
    assert calls[-1] == "rigid registration"


def test_non_convergence_is_a_warning_with_the_metric_value(phantom, caplog):
    moving = rescanned(phantom.ct, euler(physical_centre(phantom.ct), (4.0, -3.0, 6.0), (5.0, 3.0, -4.0)))
    with caplog.at_level("WARNING", logger="SyntheticCTLib"):
        result = register(phantom.ct, moving, max_iterations=2)
    assert not result.converged and result.to_dict()["converged"] is False
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any("did not converge" in w and f"{result.metric_value:.6g}" in w for w in warnings), warnings


def test_mri_as_the_fixed_image_with_a_mask(phantom, bone_points):
    """The training pipeline's direction: CT (moving) onto the MRI (fixed), inside the MRI's body mask."""
    truth = euler(physical_centre(phantom.ct), (8.0, -10.0, 12.0), (10.0, -15.0, 12.0))
    result = register(phantom.mri[0], rescanned(phantom.ct, truth), fixed_mask=phantom.labels > 0)
    assert result.metric == "mattes" and result.fixed_modality == "mr" and result.moving_modality == "ct"
    assert tre(result.transform, truth, bone_points).max() < 1.0


def test_modality_detection_and_metric_choice(phantom):
    assert detect_modality(phantom.ct) == "ct"
    assert all(detect_modality(echo) == "mr" for echo in phantom.mri)
    assert choose_metric("ct", "ct") == "correlation"
    assert choose_metric("ct", "mr") == "mattes"
    assert choose_metric("ct", "ct", "meansquares") == "meansquares"
    with pytest.raises(InvalidParameterError, match="Unknown metric"):
        choose_metric("ct", "ct", "nmi")


def test_metric_override_and_masks(phantom, bone_points):
    truth = euler(physical_centre(phantom.ct), (6.0, -5.0, 8.0), (-8.0, 10.0, 6.0))
    moving = rescanned(phantom.ct, truth)
    body = sitk.Cast(phantom.labels > 0, sitk.sitkUInt8)
    result = register(phantom.ct, moving, metric="meansquares", fixed_mask=body)
    assert result.metric == "meansquares"
    assert tre(result.transform, truth, bone_points).max() < 0.3


# -- bad input ------------------------------------------------------------------------------------------


def test_non_overlapping_images_give_a_clear_error(phantom):
    far = sitk.Image(phantom.ct)
    far.SetOrigin(tuple(o + 1000.0 for o in phantom.ct.GetOrigin()))
    with pytest.raises(NonOverlapError, match="do not overlap"):
        register(phantom.ct, far, initialize="none")


def test_masks_that_select_nothing_and_constant_images_are_refused(phantom):
    empty = sitk.Image(phantom.ct.GetSize(), sitk.sitkUInt8)
    empty.CopyInformation(phantom.ct)
    with pytest.raises(InvalidParameterError, match="fixed mask is empty"):
        register(phantom.ct, phantom.ct, fixed_mask=empty)
    constant = sitk.Image(phantom.ct.GetSize(), sitk.sitkFloat32) + 40.0
    constant.CopyInformation(phantom.ct)
    with pytest.raises(InvalidParameterError, match="constant"):
        register(phantom.ct, constant)
    with pytest.raises(InvalidParameterError, match="mode"):
        register(phantom.ct, phantom.ct, mode="elastic")
    with pytest.raises(InvalidParameterError, match="bone label map"):
        register(phantom.mri[0], phantom.ct, mode="bone-local")


# -- transform files --------------------------------------------------------------------------------------


def _transforms(phantom):
    centre = physical_centre(phantom.ct)
    rigid = euler(centre, (7.0, -3.0, 11.0), (4.0, -5.0, 6.0))
    affine = sitk.AffineTransform(3)
    affine.SetCenter(tuple(centre))
    affine.SetMatrix((1.02, 0.01, 0.0, -0.02, 0.98, 0.03, 0.0, 0.01, 1.01))
    affine.SetTranslation((1.0, 2.0, -3.0))
    bspline = sitk.BSplineTransformInitializer(phantom.ct, [3, 3, 2], 3)
    rng = np.random.default_rng(0)
    bspline.SetParameters(tuple(rng.normal(0.0, 1.5, bspline.GetNumberOfParameters())))
    return {"rigid": rigid, "affine": affine, "composite": sitk.CompositeTransform([affine, bspline])}


@pytest.mark.parametrize("suffix", [".tfm", ".h5", ".txt"])
@pytest.mark.parametrize("kind", ["rigid", "affine", "composite"])
def test_transform_files_round_trip(phantom, tmp_path, suffix, kind):
    transform = _transforms(phantom)[kind]
    path = write_transform(transform, tmp_path / f"t{suffix}")
    again = read_transform(path)
    points = mask_points(sitk.Cast(phantom.labels > 0, sitk.sitkUInt8), max_points=2000)
    assert tre(again, transform, points).max() < 1e-6
    assert type(again) is type(transform.Downcast())
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # atomic: no temporary left


def test_transform_file_errors(tmp_path):
    with pytest.raises(TransformIOError, match="No transform file"):
        read_transform(tmp_path / "missing.tfm")
    corrupt = tmp_path / "corrupt.tfm"
    corrupt.write_text("#Insight Transform File V1.0\nTransform: NotATransform_double_3_3\nParameters: 1 2\n")
    with pytest.raises(TransformIOError, match="corrupt.tfm"):
        read_transform(corrupt)
    with pytest.raises(TransformIOError, match="unknown format"):
        write_transform(sitk.Euler3DTransform(), tmp_path / "t.mat")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corrupt.tfm"]


# -- command line ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def case_files(phantom, tmp_path_factory):
    folder = tmp_path_factory.mktemp("register_case")
    truth = euler(physical_centre(phantom.ct), (10.0, -6.0, 8.0), (12.0, -9.0, 7.0))
    write_volume(phantom.ct, folder / "ct.nii.gz")
    write_volume(rescanned(phantom.ct, truth), folder / "moved.nii.gz")
    write_volume(phantom.bone_labels, folder / "bones.nii.gz")
    return folder, truth


def test_cli_register_writes_transform_json_and_resampled(case_files, bone_points, capsys):
    folder, truth = case_files
    out = folder / "out"
    code = main(
        [
            "register",
            "--fixed",
            str(folder / "ct.nii.gz"),
            "--moving",
            str(folder / "moved.nii.gz"),
            "-o",
            str(out / "reg.tfm"),
            "--resampled",
            str(out / "moved_on_ct.nii.gz"),
            "--progress",
            "json",
        ]
    )
    captured = capsys.readouterr()
    assert code == 0, captured.err
    lines = [ln for ln in captured.out.splitlines() if ln.strip()]
    events = [parse_progress_line(ln) for ln in lines]
    assert lines and all(e is not None for e in events), lines[:5]
    assert events[-1]["fraction"] == 1.0
    transform = read_transform(out / "reg.tfm")
    assert tre(transform, truth, bone_points).max() < 0.3
    summary = json.loads((out / "reg.tfm.json").read_text())
    assert {"metric_value", "iterations", "elapsed_s", "mode", "metric", "transform_direction"} <= set(summary)
    assert summary["mode"] == "rigid" and summary["metric"] == "correlation" and summary["iterations"] > 0
    resampled = read_volume(out / "moved_on_ct.nii.gz")
    fixed = read_volume(folder / "ct.nii.gz")
    assert resampled.GetSize() == fixed.GetSize() and np.allclose(resampled.GetOrigin(), fixed.GetOrigin())
    moving = read_volume(folder / "moved.nii.gz")
    ones = sitk.Cast(moving * 0 + 1, sitk.sitkUInt8)
    inside = sitk.GetArrayViewFromImage(sitk.Resample(ones, fixed, transform, sitk.sitkNearestNeighbor, 0)) > 0
    a, b = sitk.GetArrayViewFromImage(fixed)[inside], sitk.GetArrayViewFromImage(resampled)[inside]
    assert inside.mean() > 0.5 and np.corrcoef(a, b)[0, 1] > 0.99
    expected = resample_moving(moving, fixed, transform)
    np.testing.assert_allclose(sitk.GetArrayViewFromImage(expected), sitk.GetArrayViewFromImage(resampled), atol=0.5)


def test_cli_register_starts_from_an_initial_transform_file(phantom, bone_points, tmp_path, capsys):
    centre = physical_centre(phantom.ct)
    truth = euler(centre, (0.0, 0.0, 180.0), (10.0, 5.0, -6.0))
    write_volume(phantom.ct, tmp_path / "ct.nii.gz")
    write_volume(rescanned(phantom.ct, truth), tmp_path / "turned.nii.gz")
    write_transform(euler(centre, (4.0, 0.0, 175.0), (14.0, 0.0, -2.0)), tmp_path / "rough.h5")
    args = ["register", "--progress", "none", "--fixed", str(tmp_path / "ct.nii.gz")]
    args += ["--moving", str(tmp_path / "turned.nii.gz")]
    code = main(args + ["-o", str(tmp_path / "reg.tfm"), "--initial-transform", str(tmp_path / "rough.h5")])
    assert code == 0, capsys.readouterr().err
    assert tre(read_transform(tmp_path / "reg.tfm"), truth, bone_points).max() < 0.3
    assert json.loads((tmp_path / "reg.tfm.json").read_text())["initialization"]["method"] == "user"
    # A missing initial transform file: one clear line naming it, and nothing written.
    code = main(args + ["-o", str(tmp_path / "reg2.tfm"), "--initial-transform", str(tmp_path / "absent.h5")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and "absent.h5" in err[-1] and not (tmp_path / "reg2.tfm").exists()


def test_cli_bone_local_writes_per_bone_transforms(case_files, capsys):
    folder, _ = case_files
    out = folder / "bone_local"
    code = main(
        [
            "register",
            "--fixed",
            str(folder / "ct.nii.gz"),
            "--moving",
            str(folder / "moved.nii.gz"),
            "-o",
            str(out / "reg.h5"),
            "--mode",
            "bone-local",
            "--bone-labels",
            str(folder / "bones.nii.gz"),
            "--json",
            str(out / "summary.json"),
            "--progress",
            "none",
        ]
    )
    captured = capsys.readouterr()
    assert code == 0, captured.err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["mode"] == "bone-local" and summary["per_bone"]
    for entry in summary["per_bone"]:
        bone_transform = read_transform(out / entry["file"])
        assert isinstance(bone_transform, sitk.Euler3DTransform)
        assert entry["voxels"] > 0
    assert "summary:" in captured.out


def test_cli_errors_are_one_clear_line(case_files, tmp_path, capsys):
    folder, _ = case_files
    missing = tmp_path / "nope.nii.gz"
    code = main(
        [
            "register",
            "--fixed",
            str(missing),
            "--moving",
            str(folder / "moved.nii.gz"),
            "-o",
            str(tmp_path / "t.tfm"),
            "--progress",
            "none",
        ]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1 and "nope.nii.gz" in err[0]
    corrupt = tmp_path / "corrupt.nii.gz"
    corrupt.write_bytes(b"not a volume")
    code = main(
        [
            "register",
            "--fixed",
            str(corrupt),
            "--moving",
            str(folder / "moved.nii.gz"),
            "-o",
            str(tmp_path / "t.tfm"),
            "--progress",
            "none",
        ]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1 and "corrupt.nii.gz" in err[0]
    code = main(
        [
            "register",
            "--fixed",
            str(folder / "ct.nii.gz"),
            "--moving",
            str(folder / "moved.nii.gz"),
            "-o",
            str(tmp_path / "t.nii"),
            "--progress",
            "none",
        ]
    )
    assert code == 1 and ".tfm" in capsys.readouterr().err
    code = main(
        [
            "register",
            "--fixed",
            str(folder / "ct.nii.gz"),
            "--moving",
            str(folder / "moved.nii.gz"),
            "-o",
            str(tmp_path / "t.tfm"),
            "--resampled",
            str(folder / "ct.nii.gz"),
            "--progress",
            "none",
        ]
    )
    assert code == 1 and "input" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corrupt.nii.gz"]  # nothing written on failure
    with pytest.raises(VolumeReadError):
        read_volume(missing)


# -- real data ------------------------------------------------------------------------------------------


def test_real_ct_to_a_moved_copy_of_itself():
    if not REAL_CT.exists():
        pytest.skip(f"real CT not available at {REAL_CT} (the shared data folder is absent)")
    ct = read_volume(REAL_CT)
    truth = euler(physical_centre(ct), (8.0, -6.0, 10.0), (12.0, -9.0, 15.0))
    moving = rescanned(ct, truth, crop_voxels=(4, 4, 4))
    result = register(ct, moving)
    bone = sitk.Cast(ct > 200, sitk.sitkUInt8)
    errors = tre(result.transform, truth, mask_points(bone, max_points=50_000))
    voxel = max(ct.GetSpacing())
    assert errors.mean() < 0.1 * voxel and errors.max() < 0.25 * voxel, (errors.mean(), errors.max(), voxel)


def test_write_registration_writes_all_or_nothing(phantom, tmp_path):
    from SyntheticCTLib.registration.output import plan_outputs, write_registration

    truth = euler(physical_centre(phantom.ct), (3.0, 0.0, -2.0), (4.0, -3.0, 2.0))
    moving = rescanned(phantom.ct, truth)
    result = register(phantom.ct, moving, max_iterations=20)
    outputs = plan_outputs(tmp_path / "t.tfm", resampled=tmp_path / "r.nii.gz")
    assert outputs.record == tmp_path / "t.tfm.json"
    written = write_registration(result, outputs, fixed=phantom.ct, moving=moving, sources={"fixed": "ct"})
    assert set(written) == {"transform", "resampled", "record"}
    record = json.loads(outputs.record.read_text())
    assert record["fixed"] == "ct" and record["transform_file"] == str(outputs.transform)
    np.testing.assert_allclose(read_transform(outputs.transform).GetParameters(), result.transform.GetParameters())
    # A record that cannot be written (its path is a folder): the transform and image written before go away.
    blocked = tmp_path / "blocked"
    (blocked / "t.tfm.json").mkdir(parents=True)
    with pytest.raises(OSError):  # os.replace onto a folder
        write_registration(
            result, plan_outputs(blocked / "t.tfm", resampled=blocked / "r.nrrd"), fixed=phantom.ct, moving=moving
        )
    assert sorted(p.name for p in blocked.iterdir()) == ["t.tfm.json"]
    with pytest.raises(InvalidParameterError, match="must end with"):
        plan_outputs(tmp_path / "t.nii")
