"""Evaluation: metrics on synthetic arrays match hand-computed values, the baselines behave, and
`syntheticct evaluate` writes its JSON, CSVs and PNGs."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
import SimpleITK as sitk

from SyntheticCTLib.apps.evaluation import METRIC_KEYS, compare_images, summarize
from SyntheticCTLib.cli.main import main
from SyntheticCTLib.synthesis.baselines import (
    BASELINES,
    BULK_DENSITY_HU,
    bulk_density_classes,
    bulk_density_sct,
    inversion_sct,
)

PNG = b"\x89PNG\r\n\x1a\n"


def image(array: np.ndarray, spacing=(1.0, 1.0, 1.0), origin=(0.0, 0.0, 0.0)) -> sitk.Image:
    img = sitk.GetImageFromArray(array)
    img.SetSpacing(spacing)
    img.SetOrigin(origin)
    return img


def box(shape, lo, hi) -> np.ndarray:
    mask = np.zeros(shape, bool)
    mask[tuple(slice(a, b) for a, b in zip(lo, hi))] = True
    return mask


SHAPE = (40, 48, 48)
BODY = box(SHAPE, (4, 6, 6), (36, 42, 42))  # 32 x 36 x 36 voxels
BONE = box(SHAPE, (12, 16, 16), (24, 28, 28))  # a 12 mm cube


def phantom_ct() -> np.ndarray:
    ct = np.full(SHAPE, -1000.0, np.float32)
    ct[BODY] = 0.0
    ct[BONE] = 1000.0
    return ct


def test_metrics_on_synthetic_arrays_match_hand_computed_values():
    ct = phantom_ct()
    n_body = int(BODY.sum())

    # A constant +50 HU error in the body: MAE = ME = 50, PSNR = 20 log10(4024 / 50) (SynthRAD range [-1024, 3000]);
    # the bone is unchanged (1050 HU > 200): Dice 1 and zero surface distance.
    sct = ct.copy()
    sct[BODY] += 50.0
    m = compare_images(image(ct), image(sct))
    assert m["mae_hu"] == pytest.approx(50.0, abs=1e-6)
    assert m["me_hu"] == pytest.approx(50.0, abs=1e-6)
    assert m["psnr_db"] == pytest.approx(20 * math.log10(4024.0 / 50.0), abs=1e-4)
    assert m["bone_dice"] == pytest.approx(1.0)
    assert m["surface_mean_mm"] == pytest.approx(0.0, abs=1e-6)
    assert m["surface_p95_mm"] == pytest.approx(0.0, abs=1e-6)
    assert 0.0 < m["ssim"] < 1.0

    # The bone cube moved by 2 voxels along x: Dice = 2 |A n B| / (|A| + |B|) = 2 * 12*12*10 / (2 * 12**3) = 5/6;
    # 2 slabs of 12 x 12 x 2 voxels differ by 1000 HU: MAE = 2 * 288 * 1000 / n_body, ME = 0.
    moved = np.roll(BONE, 2, axis=2)
    sct = ct.copy()
    sct[BONE] = 0.0
    sct[moved] = 1000.0
    m = compare_images(image(ct), image(sct))
    assert m["bone_dice"] == pytest.approx(5 / 6, abs=1e-9)
    assert m["mae_hu"] == pytest.approx(2 * 288 * 1000.0 / n_body, rel=1e-9)
    assert m["me_hu"] == pytest.approx(0.0, abs=1e-9)
    # The faces across the shift are 2 mm apart, the faces along it 0 mm: a mean distance between 0 and 2 mm.
    assert 0.2 < m["surface_mean_mm"] < 2.0 and m["surface_max_mm"] == pytest.approx(2.0, abs=0.25)

    # The summary: mean, population std, median, min and max over the cases, per method.
    per_case = {f"c{i}": {"model": {k: float(i) for k in METRIC_KEYS}} for i in (1, 2, 6)}
    s = summarize(per_case)["model"]["mae_hu"]
    assert (s["mean"], s["median"], s["min"], s["max"], s["n"]) == (3.0, 2.0, 1.0, 6.0, 3)
    assert s["std"] == pytest.approx(math.sqrt(((1 - 3) ** 2 + (2 - 3) ** 2 + (6 - 3) ** 2) / 3))


def three_level_mri():
    """A body at intensity 100 holding a dark cube (20: bone-like) and a black cube (2: gas-like)."""
    mri = np.full(SHAPE, 0.5, np.float32)
    mri[BODY] = 100.0
    dark = box(SHAPE, (10, 12, 12), (20, 22, 22))
    black = box(SHAPE, (22, 26, 26), (30, 34, 34))
    mri[dark] = 20.0
    mri[black] = 2.0
    return mri, dark, black


def interior(mask: np.ndarray, margin: int = 2) -> np.ndarray:
    from scipy import ndimage

    return ndimage.binary_erosion(mask, iterations=margin)


def test_bulk_density_assigns_the_fixed_hu_per_class():
    mri, dark, black = three_level_mri()
    echoes = [image(mri), image(mri * 0.8)]  # two channels: the RMS keeps the same relative levels
    classes = bulk_density_classes(echoes)
    soft = interior(BODY & ~dark & ~black)
    assert (classes[interior(dark)] == 2).all() and (classes[interior(black)] == 0).all()
    assert (classes[soft] == 1).all() and (classes[interior(~BODY)] == 0).all()

    sct = sitk.GetArrayFromImage(bulk_density_sct(echoes))
    assert sct.dtype == np.int16
    assert set(np.unique(sct)) <= {int(v) for v in BULK_DENSITY_HU.values()}
    assert (sct[interior(dark)] == BULK_DENSITY_HU["bone"]).all()
    assert (sct[interior(black)] == BULK_DENSITY_HU["air"]).all()
    assert (sct[soft] == BULK_DENSITY_HU["soft tissue"]).all()
    assert (sct[interior(~BODY)] == -1000).all()

    custom = sitk.GetArrayFromImage(bulk_density_sct(echoes, hu={"bone": 1000.0, "soft tissue": 40.0}))
    assert (custom[interior(dark)] == 1000).all() and (custom[soft] == 40).all()


def test_inversion_maps_dark_to_bone_and_bright_to_fat():
    mri, dark, black = three_level_mri()
    mri[box(SHAPE, (26, 10, 10), (32, 16, 16))] = 160.0  # a bright (fat-like) cube, 216 voxels: < 1 % of the body
    sct = sitk.GetArrayFromImage(inversion_sct([image(mri)], body_mask=BODY))
    assert sct.dtype == np.int16
    assert (sct[~BODY] == -1000).all()
    # Body percentiles: p1 = 2 (the black cube holds 1.1 % of the body), p99 = 100; x = clip((I - 2) / 98, 0, 1)
    # and HU = 1000 - 1100 x: black -> 1000, dark (20) -> 1000 - 1100 * 18 / 98, tissue (100) and fat (160) -> -100.
    assert (sct[black] == 1000).all()
    assert (sct[dark] == round(1000 - 1100 * 18 / 98)).all()
    assert (sct[BODY & ~dark & ~black] == -100).all()
    # With the inference's own body mask the ordering holds: a darker tissue never gets a lower HU.
    auto = sitk.GetArrayFromImage(inversion_sct([image(mri)]))
    assert auto[interior(black)].min() >= auto[interior(dark)].max() >= auto[interior(BODY & ~dark & ~black)].max()
    assert (auto[interior(~BODY)] == -1000).all()
    assert set(BASELINES) == {"inversion", "bulk density"}


@pytest.fixture(scope="module")
def tiny_setup(tmp_path_factory):
    """Two small phantom cases and a tiny (untrained) model package at their spacing."""
    import torch

    from SyntheticCTLib.models.architectures import build_network
    from SyntheticCTLib.models.package import write_model_package
    from SyntheticCTLib.phantom import make_phantom, write_phantom

    root = tmp_path_factory.mktemp("evaluate")
    cases = []
    for seed in (21, 22):
        phantom = make_phantom(seed, size=(48, 48, 32), spacing=2.0)
        cases.append(write_phantom(phantom, root / "cases" / f"case{seed}").parent)
    torch.manual_seed(0)
    network = build_network("unet3d", in_channels=3, depth=2, width=4, norm="batch")
    card = {
        "name": "tiny-eval",
        "version": "0.1.0",
        "architecture": {"name": "unet3d", "kwargs": {"depth": 2, "width": 4, "norm": "batch"}},
        "inputs": [{"name": f"echo{k}", "echo_time_ms": te} for k, te in enumerate(phantom.params["echo_times_ms"], 1)],
        "spacing_mm": [2.0, 2.0, 2.0],
        "normalization": [{"method": "percentile", "lower": 0.5, "upper": 99.5}] * 3,
        "output": {"scale": 1000.0, "offset": 0.0, "clip": [-1024.0, 3071.0]},
        "patch_size": [16, 24, 24],
        "overlap": 0.25,
    }
    package = write_model_package(root / "model", card, network.state_dict())
    return root, cases, package


def test_evaluate_cli_writes_json_csv_and_pngs(tiny_setup, capsys):
    root, cases, package = tiny_setup
    out = root / "out"
    code = main(
        [
            "evaluate",
            "--model",
            str(package),
            "--cases",
            *map(str, cases),
            "-o",
            str(out),
            "--progress",
            "none",
            "--device",
            "cpu",
            "--record-in-card",
            "tiny-cohort",
        ]
    )
    assert code == 0, capsys.readouterr().err
    document = json.loads((out / "metrics.json").read_text())
    assert document["model"]["name"] == "tiny-eval"
    assert document["methods"] == ["model", "inversion", "bulk density"]
    assert [c["name"] for c in document["cases"]] == ["case21", "case22"]
    for case in document["cases"]:
        assert set(case["metrics"]) == {"model", "inversion", "bulk density"}
        for metrics in case["metrics"].values():
            assert set(METRIC_KEYS) <= set(metrics)
            assert metrics["mae_hu"] > 0
    # The summary is the mean over the cases of the per-case values.
    for method in document["methods"]:
        values = [c["metrics"][method]["mae_hu"] for c in document["cases"]]
        assert document["summary"][method]["mae_hu"]["mean"] == pytest.approx(np.mean(values))

    with open(out / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["case"], r["method"]) for r in rows] == [
        (c, m) for c in ("case21", "case22") for m in ("model", "inversion", "bulk density")
    ]
    for row in rows:
        case = next(c for c in document["cases"] if c["name"] == row["case"])
        assert float(row["mae_hu"]) == pytest.approx(case["metrics"][row["method"]]["mae_hu"], rel=1e-5)
    with open(out / "summary.csv") as f:
        summary_rows = list(csv.DictReader(f))
    assert len(summary_rows) == 3 * len(METRIC_KEYS)
    for name in ("case21", "case22"):
        assert (out / "images" / f"{name}.png").read_bytes()[:8] == PNG
    assert "tiny-eval" in (out / "index.html").read_text()
    # --record-in-card: the summary means go into model.json; the package still loads (weights untouched).
    from SyntheticCTLib.models.package import load_model_package

    card = load_model_package(package).card
    block = card["held_out_evaluation"]["tiny-cohort"]
    assert block["cases"] == ["case21", "case22"]
    assert block["methods"]["bulk density"]["mae_hu"] == pytest.approx(
        document["summary"]["bulk density"]["mae_hu"]["mean"], abs=1e-3
    )
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(printed["summary"]) == {"model", "inversion", "bulk density"}


def test_evaluate_cli_errors_are_clear(tiny_setup, tmp_path, capsys):
    root, cases, package = tiny_setup
    assert (
        main(
            [
                "evaluate",
                "--model",
                str(package),
                "--cases",
                str(tmp_path / "nowhere"),
                "-o",
                str(tmp_path / "o"),
                "--progress",
                "none",
            ]
        )
        == 1
    )
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("syntheticct evaluate: error:") and "nowhere" in err
    assert not (tmp_path / "o").exists()


def test_minimal_case_manifest_of_ones_own_data(tiny_setup, tmp_path):
    from SyntheticCTLib.apps.evaluation import find_evaluation_cases
    from SyntheticCTLib.kernel.errors import InvalidParameterError

    _, cases, _ = tiny_setup
    own = tmp_path / "patient7"
    own.mkdir()
    for name in ("mri_echo1.nii.gz", "mri_echo2.nii.gz", "mri_echo3.nii.gz", "ct.nii.gz"):
        (own / name).write_bytes((cases[0] / name).read_bytes())
    (own / "case.json").write_text(
        json.dumps({"mri": ["mri_echo1.nii.gz", "mri_echo2.nii.gz", "mri_echo3.nii.gz"], "ct": "ct.nii.gz"})
    )
    (found,) = find_evaluation_cases([own])
    assert found.name == "patient7" and found.ct == own / "ct.nii.gz" and len(found.mri) == 3
    assert found.bone_labels is None
    (own / "case.json").write_text(json.dumps({"mri": ["mri_echo1.nii.gz"], "ct": "missing_ct.nii.gz"}))
    with pytest.raises(InvalidParameterError, match="missing_ct.nii.gz"):
        find_evaluation_cases([own])
