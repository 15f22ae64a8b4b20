"""The comparison's contracts with what users read: the metric registry, the frozen metrics record, the
default bone threshold, NoBoneError, and compare() of images on different grids with analytic answers."""

from __future__ import annotations

import dataclasses
import inspect
import json
import math

import numpy as np
import pytest
import SimpleITK as sitk

from SyntheticCTLib.apps.evaluation import METRIC_KEYS, compare_images
from SyntheticCTLib.cli.main import main
from SyntheticCTLib.comparison.compare import AIR_HU, compare, image_comparison, write_comparison
from SyntheticCTLib.comparison.metric_registry import (
    EVALUATION_KEYS,
    METRICS,
    REPORT_KEYS,
    REQUIRED_KEYS,
    VALIDATION_KEYS,
    ComparisonMetrics,
    metric_text,
)
from SyntheticCTLib.kernel.errors import InvalidParameterError, NoBoneError
from SyntheticCTLib.training.validation import score

SOFT_HU = 40.0


# -- the registry ---------------------------------------------------------------------------------------


def test_every_key_set_is_drawn_from_the_one_registry():
    for keys in (EVALUATION_KEYS, VALIDATION_KEYS, REPORT_KEYS):
        assert set(keys) <= set(METRICS), keys
    assert set(REPORT_KEYS) == set(METRICS)  # the reports show every metric
    assert METRIC_KEYS == EVALUATION_KEYS
    scalar_fields = [f.name for f in dataclasses.fields(ComparisonMetrics) if f.name in METRICS]
    assert scalar_fields == list(METRICS)  # the registry's order is metrics.json's
    for spec in METRICS.values():
        assert spec.better in ("lower", "higher", "zero")
        assert spec.unit == ("%" if spec.fraction else spec.unit)
        assert spec.value_unit == ("fraction" if spec.fraction else spec.unit)
    # What the reports print, by hand: digits per metric, fractions as percentages, '—' when missing.
    assert metric_text("mae_hu", 12.345) == "12.3"
    assert metric_text("surface_p95_mm", 0.12345) == "0.123"
    assert metric_text("bone_dice", 0.98765) == "0.9877"
    assert metric_text("surface_within_1mm", 0.9234) == "92.3"
    assert metric_text("surface_within_1mm", 0.9234, with_unit=True) == "92.3 %"
    assert metric_text("psnr_db", math.inf) == "\u221e"
    assert metric_text("surface_mean_mm", None) == "\u2014"
    assert metric_text("mae_hu", np.float32(3.25)) == "3.2"


def test_the_slicer_table_uses_the_registry():
    """The Slicer module's statistics rows come from the registry (read statically: Slicer is not installed)."""
    import ast
    from pathlib import Path

    source = Path(__file__).resolve().parents[1] / "SyntheticCTRegistration" / "SyntheticCTRegistration.py"
    tree = ast.parse(source.read_text(encoding="utf-8"))
    rows = [
        n
        for n in tree.body
        if isinstance(n, ast.Assign) and any(getattr(t, "id", "") == "METRIC_ROWS" for t in n.targets)
    ]
    assert len(rows) == 1
    names = {n.id for n in ast.walk(rows[0].value) if isinstance(n, ast.Name)}
    assert {"METRICS", "REPORT_KEYS"} <= names
    assert not any(isinstance(n, ast.Constant) and n.value in ("mm", "HU", "dB") for n in ast.walk(rows[0].value))


# -- phantoms with analytic answers -------------------------------------------------------------------------


def grid(size, spacing, origin) -> sitk.Image:
    image = sitk.Image([int(s) for s in size], sitk.sitkFloat32)
    image.SetSpacing(tuple(float(s) for s in spacing))
    image.SetOrigin(tuple(float(o) for o in origin))
    return image


def world(image: sitk.Image) -> np.ndarray:
    """World (x, y, z) of every voxel, shape (nz, ny, nx, 3) (axis-aligned grids)."""
    nx, ny, nz = image.GetSize()
    k, j, i = np.meshgrid(np.arange(nz), np.arange(ny), np.arange(nx), indexing="ij")
    index = np.stack([i, j, k], axis=-1).astype(float)
    return np.asarray(image.GetOrigin()) + index * np.asarray(image.GetSpacing())


def sphere_ct(like: sitk.Image, centre, radius: float, *, air_below_x: float = 4.0) -> sitk.Image:
    """Soft tissue with a bone ball whose 200 HU level lies exactly at ``radius`` from ``centre``.

    The HU fall linearly with the distance (200 HU per mm) across the bone's edge, so linear resampling
    onto another grid keeps the 200 HU level where it was; air below x = ``air_below_x`` mm.
    """
    points = world(like)
    r = np.linalg.norm(points - np.asarray(centre, dtype=float), axis=-1)
    array = np.clip(200.0 + 200.0 * (radius - r), SOFT_HU, 1000.0).astype(np.float32)
    array[points[..., 0] < air_below_x] = -1000.0
    image = sitk.GetImageFromArray(array)
    image.CopyInformation(like)
    return image


REFERENCE_GRID = dict(size=(48, 48, 48), spacing=(1.0, 1.0, 1.0), origin=(0.0, 0.0, 0.0))
# Another grid: anisotropic, shifted by several millimetres, and larger than the reference's field of view.
OTHER_GRID = dict(size=(80, 50, 58), spacing=(0.8, 1.25, 1.1), origin=(-7.3, -5.6, -8.1))
CENTRE = np.array([24.3, 23.6, 24.4])


def reference_ct(radius: float = 10.0) -> sitk.Image:
    return sphere_ct(grid(**REFERENCE_GRID), CENTRE, radius)


# -- the default bone threshold ---------------------------------------------------------------------------


def test_default_bone_threshold_is_200_hu(tmp_path):
    """A 2 mm slab of 175 HU on the bone: no bone at the default 200 HU (Dice 1), bone at 150 HU (Dice < 1)."""
    shape = (40, 40, 40)
    ct = np.full(shape, SOFT_HU, np.float32)
    ct[:, :, :3] = -1000.0
    ct[14:26, 14:26, 14:26] = 1000.0  # a 12 mm cube: 1728 voxels
    sct = ct.copy()
    sct[14:26, 14:26, 26:28] = 175.0  # 12 x 12 x 2 = 288 voxels between 150 and 200 HU
    ct_image, sct_image = sitk.GetImageFromArray(ct), sitk.GetImageFromArray(sct)

    default = compare(ct_image, sct_image).metrics
    assert default.settings["bone_threshold_hu"] == 200.0
    assert default.bone_dice == 1.0
    assert default.surface_max_mm < 1e-6
    # The same at 150 HU: Dice = 2 * 1728 / (1728 + 2016), and the slab's face lies 2 mm out.
    lower = compare(ct_image, sct_image, bone_threshold=150.0).metrics
    assert lower.bone_dice == pytest.approx(2 * 1728 / (1728 + 2016), abs=1e-9)
    assert lower.surface_max_mm == pytest.approx(2.0, abs=0.3)
    # The evaluation and training's validation score with the same default.
    assert compare_images(ct_image, sct_image)["bone_dice"] == 1.0
    assert score(ct_image, sct_image).bone_dice == 1.0
    for function in (compare, compare_images, score):
        assert inspect.signature(function).parameters["bone_threshold"].default == 200.0
    # And `syntheticct compare` without --bone-threshold.
    ct_path, sct_path, out = tmp_path / "ct.nii.gz", tmp_path / "sct.nii.gz", tmp_path / "out"
    sitk.WriteImage(ct_image, str(ct_path))
    sitk.WriteImage(sct_image, str(sct_path))
    assert (
        main(
            ["compare", "--reference", str(ct_path), "--synthetic", str(sct_path), "-o", str(out), "--progress", "none"]
        )
        == 0
    )
    written = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
    assert written["settings"]["bone_threshold_hu"] == 200.0 and written["bone_dice"] == 1.0


# -- NoBoneError ----------------------------------------------------------------------------------------


def test_no_bone_is_its_own_error_and_scores_with_compares_image_metrics():
    ct = reference_ct()
    no_bone = sitk.Cast(sitk.Minimum(ct, SOFT_HU), sitk.sitkFloat32)  # the bone replaced by soft tissue
    with pytest.raises(NoBoneError, match="No bone found in the synthetic CT at 200 HU"):
        compare(ct, no_bone)
    with pytest.raises(NoBoneError, match="reference CT"):
        compare(no_bone, ct)
    assert issubclass(NoBoneError, InvalidParameterError)
    # The score keeps compare's image metrics (same padding, same body), bone Dice 0, no surface distance.
    metrics = score(ct, no_bone)
    images = image_comparison(ct, no_bone)
    assert metrics.mae_hu == images.metrics["mae_hu"] and metrics.ssim == images.metrics["ssim"]
    assert metrics.bone_dice == 0.0 and metrics.surface_mean_mm is None and metrics.surface_p95_mm is None
    row = compare_images(ct, no_bone)
    assert row["mae_hu"] == images.metrics["mae_hu"] and row["bone_dice"] == 0.0 and math.isnan(row["surface_mean_mm"])
    # By hand: the ball's voxels above 40 HU become 40 HU; the body is every voxel at x >= 4 mm.
    ct_array = sitk.GetArrayFromImage(ct)
    body = ct_array > -500
    assert metrics.mae_hu == pytest.approx(
        float(np.abs(ct_array - np.minimum(ct_array, SOFT_HU))[body].mean()), rel=1e-6
    )


def test_no_bone_image_metrics_use_compares_padding_outside_the_field_of_view():
    """An sCT covering half the CT: the uncovered half is not measured (no -1000 HU padding counted as error)."""
    ct = reference_ct()
    half = sitk.Cast(sitk.Minimum(ct, SOFT_HU), sitk.sitkFloat32)[:, :, :24]  # slices z < 24 mm, no bone
    metrics = score(ct, half)
    ct_array = sitk.GetArrayFromImage(ct)
    covered = (ct_array > -500) & (np.arange(48)[:, None, None] < 24)
    expected = float(np.abs(ct_array - np.minimum(ct_array, SOFT_HU))[covered].mean())
    assert metrics.mae_hu == pytest.approx(expected, rel=1e-6)
    assert metrics.body_overlap_fraction == pytest.approx(0.5, abs=0.03)
    assert AIR_HU == -1024.0


# -- the frozen record and metrics.json ------------------------------------------------------------------------


def test_metrics_record_is_frozen_and_is_metrics_json(tmp_path):
    ct = reference_ct()
    result = compare(ct, reference_ct(11.0))
    metrics = result.metrics
    with pytest.raises(dataclasses.FrozenInstanceError):
        metrics.mae_hu = 0.0  # type: ignore[misc]
    write_comparison(result, tmp_path)
    written = json.loads((tmp_path / "metrics.json").read_text(encoding="utf-8"))
    assert written == metrics.to_dict()
    assert list(written)[: len(REQUIRED_KEYS)] == list(REQUIRED_KEYS)
    assert ComparisonMetrics.from_dict(written) == metrics
    assert metrics.scalars(VALIDATION_KEYS) == {k: written[k] for k in VALIDATION_KEYS}
    # The comparison page shows every metric of the registry with its label, digits and unit.
    page = (tmp_path / "report.html").read_text(encoding="utf-8")
    for key, spec in METRICS.items():
        assert f"<td>{spec.long_label}</td>" in page.replace("&#x27;", "'"), key
        assert spec.text(written[key], with_unit=True) in page, key


# -- different grids, analytic answers ---------------------------------------------------------------------------


def test_same_ball_on_another_grid_is_zero_distance():
    """The same ball sampled on an anisotropic, shifted grid: the surfaces coincide in world coordinates."""
    synthetic = sphere_ct(grid(**OTHER_GRID), CENTRE, 10.0)
    m = compare(reference_ct(10.0), synthetic).metrics
    assert m.surface_mean_mm < 0.05  # measured 0.014 mm
    assert m.surface_p95_mm < 0.2  # measured 0.095 mm
    assert m.bone_dice > 0.99  # measured 0.998
    assert m.body_overlap_fraction == 1.0


def test_larger_ball_on_another_grid_is_one_millimetre_out():
    """A ball 1 mm larger (radius 11 mm vs 10 mm) on another grid: every surface point lies 1 mm out."""
    synthetic = sphere_ct(grid(**OTHER_GRID), CENTRE, 11.0)
    m = compare(reference_ct(10.0), synthetic).metrics
    assert m.surface_mean_mm == pytest.approx(1.0, abs=0.05)  # measured 1.015 mm
    assert m.surface_mean_signed_mm == pytest.approx(1.0, abs=0.05)  # outside: positive
    assert m.surface_median_mm == pytest.approx(1.0, abs=0.05)
    assert 1.0 <= m.surface_p95_mm < 1.3  # measured 1.17 mm
    # Dice of concentric balls: 2 * 10^3 / (10^3 + 11^3), up to voxelization on the 1 mm grid.
    assert m.bone_dice == pytest.approx(2 * 10.0**3 / (10.0**3 + 11.0**3), abs=0.01)


def test_moved_ball_on_another_grid_through_its_transform():
    """The ball moved by (3, -2, 1.5) mm on another grid: d cos(theta) apart without the transform, 0 with it."""
    shift = np.array([3.0, -2.0, 1.5])
    d = float(np.linalg.norm(shift))
    synthetic = sphere_ct(grid(**OTHER_GRID), CENTRE + shift, 10.0)
    unaligned = compare(reference_ct(10.0), synthetic).metrics
    # A point at angle theta from the shift lies d cos(theta) out (to first order): mean |d cos| = d / 2.
    assert unaligned.surface_mean_mm == pytest.approx(d / 2, abs=0.1)  # measured 1.94 mm, d / 2 = 1.95 mm
    assert unaligned.surface_max_mm == pytest.approx(d, abs=0.3)  # measured 4.02 mm, d = 3.91 mm
    assert unaligned.surface_mean_signed_mm == pytest.approx(0.0, abs=0.1)
    # Reference point x maps to synthetic point x + shift (fixed -> moving).
    aligned = compare(reference_ct(10.0), synthetic, transform=sitk.TranslationTransform(3, tuple(shift))).metrics
    assert aligned.surface_mean_mm < 0.05  # measured 0.016 mm
    assert aligned.surface_p95_mm < 0.2
    assert aligned.bone_dice > 0.99
