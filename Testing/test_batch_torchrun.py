"""Batch synthesis: a real 2-process torchrun (gloo, CPU) run, sharding, resumption, and the CLI in-process."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
import torch

from SyntheticCTLib.apps.batch import load_case_file, read_case_list, synthesize_cases
from SyntheticCTLib.cli.main import main
from SyntheticCTLib.kernel.errors import InvalidParameterError
from SyntheticCTLib.kernel.io import read_volume
from SyntheticCTLib.kernel.progress import parse_progress_line
from SyntheticCTLib.models.architectures import build_network
from SyntheticCTLib.models.package import load_model_package, write_model_package

torch.set_num_threads(1)
KWARGS = {"depth": 2, "width": 4, "norm": "none"}
CASE_IDS = ["p01", "p02", "p03", "p04"]


@pytest.fixture(scope="module")
def package_dir(tmp_path_factory):
    torch.manual_seed(0)
    net = build_network("unet3d", in_channels=2, **KWARGS)
    card = {
        "name": "tiny-batch",
        "version": "0.0.1",
        "architecture": {"name": "unet3d", "kwargs": dict(KWARGS, in_channels=2)},
        "inputs": [{"name": "echo1", "echo_time_ms": 2.0}, {"name": "echo2", "echo_time_ms": 5.0}],
        "spacing_mm": [2.0, 2.0, 2.0],
        "normalization": [{"method": "percentile", "lower": 0.5, "upper": 99.5}] * 2,
        "output": {"scale": 1000.0, "offset": 0.0, "clip": [-1024, 3071]},
        "patch_size": [16, 16, 16],
        "overlap": 0.5,
    }
    return write_model_package(tmp_path_factory.mktemp("pkg") / "tiny", card, net.state_dict())


def write_case(folder: Path, seed: int, *, case_json=True):
    """A tiny two-echo MRI case (elliptic body, oblique, anisotropic) with a phantom-style case.json."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    z, y, x = np.mgrid[:12, :20, :22]
    body = ((x - 11) / 8) ** 2 + ((y - 10) / 6) ** 2 < 1
    names = []
    for k in range(2):
        image = sitk.GetImageFromArray(
            (np.where(body, 300.0 / (k + 1), 0) + rng.normal(0, 4, body.shape)).astype(np.float32)
        )
        image.SetSpacing((1.8, 2.1, 2.6))
        image.SetOrigin((5.0 * seed, -3.0, 12.0))
        image.SetDirection(sitk.VersorTransform((0.1, 0.2, 0.9), 0.3).GetMatrix())
        names.append(f"mri_echo{k + 1}.nii.gz")
        sitk.WriteImage(image, str(folder / names[-1]))
    if case_json:
        (folder / "case.json").write_text(json.dumps({"mri": names, "seed": seed}))
    return [folder / n for n in names]


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    root = tmp_path_factory.mktemp("cases")
    for i, case_id in enumerate(CASE_IDS):
        write_case(root / case_id, seed=i + 1)
    return root


def test_torchrun_two_processes_write_every_case_exactly_once(cases, package_dir, tmp_path, torchrun):
    out = tmp_path / "out"
    args = ["synthesize", "-o", out, "--model", package_dir, "--device", "cpu", "--progress", "none"]
    args += ["--log-level", "warning"]
    for case_id in CASE_IDS:
        args += ["--case", cases / case_id]
    proc = torchrun(args, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]

    expected = {f"{c}.nii.gz" for c in CASE_IDS} | {f"{c}.json" for c in CASE_IDS}
    expected |= {"synthesis_rank0of2.json", "synthesis_rank1of2.json", "synthesis_summary.json"}
    assert {p.name for p in out.iterdir()} == expected  # nothing else: no temporary or partial files
    shares = {}
    for rank in (0, 1):
        data = json.loads((out / f"synthesis_rank{rank}of2.json").read_text())
        assert data["rank"] == rank and data["world_size"] == 2
        shares[rank] = data["cases"]
        assert [r["case"] for r in data["records"]] == data["cases"]  # each rank ran exactly its share
    assert shares == {0: CASE_IDS[0::2], 1: CASE_IDS[1::2]}
    summary = json.loads((out / "synthesis_summary.json").read_text())
    assert sorted(r["case"] for r in summary["records"]) == CASE_IDS  # every case once, no duplicates
    for i, case_id in enumerate(CASE_IDS):
        record = json.loads((out / f"{case_id}.json").read_text())
        assert record["status"] == "done" and record["rank"] == i % 2 and record["device"] == "cpu"
        sct = read_volume(out / f"{case_id}.nii.gz")
        mri = read_volume(cases / case_id / "mri_echo1.nii.gz")
        assert sct.GetPixelID() == sitk.sitkInt16 and sct.GetSize() == mri.GetSize()
        np.testing.assert_allclose(sct.GetOrigin(), mri.GetOrigin(), atol=1e-5)
        np.testing.assert_allclose(sct.GetDirection(), mri.GetDirection(), atol=1e-6)


def test_in_process_shard_and_skip_existing(cases, package_dir, tmp_path):
    model = load_model_package(package_dir)
    out = tmp_path / "out"
    paths = [cases / c for c in CASE_IDS]
    summary = synthesize_cases(paths, model, out, device="cpu", rank=1, world_size=2, uncertainty=True)
    assert summary.cases == ["p02", "p04"] and [r["status"] for r in summary.records] == ["done", "done"]
    names = {p.name for p in out.iterdir()}
    assert {"p02.nii.gz", "p02_uncertainty.nii.gz", "p04.json"} <= names and "p01.nii.gz" not in names
    before = (out / "p02.nii.gz").stat().st_mtime_ns
    again = synthesize_cases(paths[:2], model, out, device="cpu", skip_existing=True)
    assert [r["status"] for r in again.records] == ["done", "skipped"]
    assert (out / "p02.nii.gz").stat().st_mtime_ns == before
    assert load_case_file(cases / "p03").case_id == "p03"


def test_case_lists(cases, tmp_path):
    text_list = tmp_path / "cases.txt"
    text_list.write_text("# cohort\n" + "\n".join(str(cases / c) for c in CASE_IDS[:2]) + "\n\n")
    assert [c.case_id for c in read_case_list(text_list)] == ["p01", "p02"]
    json_list = cases / "list.json"
    json_list.write_text(
        json.dumps(["p03/case.json", {"id": "extra", "mri": ["p04/mri_echo1.nii.gz", "p04/mri_echo2.nii.gz"]}])
    )
    loaded = read_case_list(json_list)
    assert [c.case_id for c in loaded] == ["p03", "extra"]
    assert loaded[1].mri[0] == cases / "p04" / "mri_echo1.nii.gz" and loaded[0].mri[1].is_file()
    with pytest.raises(InvalidParameterError, match="repeated: p01"):
        synthesize_cases([cases / "p01", cases / "p01"], None, tmp_path / "o")


def test_cli_synthesize_to_nifti_and_dicom(cases, package_dir, tmp_path, capsys):
    inputs = [cases / "p01" / "mri_echo1.nii.gz", cases / "p01" / "mri_echo2.nii.gz"]
    out = tmp_path / "sct.nii.gz"
    dicom_dir = tmp_path / "sct_dicom"
    unc = tmp_path / "spread.nrrd"
    argv = [
        "synthesize",
        "-i",
        str(inputs[0]),
        "-i",
        str(inputs[1]),
        "-o",
        str(out),
        "--model",
        str(package_dir),
        "--device",
        "cpu",
        "--dicom-out",
        str(dicom_dir),
        "--uncertainty",
        str(unc),
        "--progress",
        "json",
    ]
    assert main(argv) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    progress = [parse_progress_line(line) for line in lines[:-1]]
    assert all(p is not None for p in progress) and progress[-1]["fraction"] == 1.0
    final = json.loads(lines[-1])
    assert final["device"] == "cpu" and final["dicom_out"] == str(dicom_dir)
    sct = read_volume(out)
    mri = read_volume(inputs[0])
    assert sct.GetPixelID() == sitk.sitkInt16 and sct.GetSize() == mri.GetSize()
    np.testing.assert_allclose(sct.GetSpacing(), mri.GetSpacing(), atol=1e-6)
    assert read_volume(unc).GetSize() == mri.GetSize()
    from_dicom = read_volume(dicom_dir)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(from_dicom), sitk.GetArrayFromImage(sct))
    np.testing.assert_allclose(from_dicom.GetOrigin(), sct.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(from_dicom.GetDirection(), sct.GetDirection(), atol=1e-4)
    ds = pydicom.dcmread(str(next(dicom_dir.iterdir())), stop_before_pixels=True)
    assert ds.Modality == "CT" and "synthetic" in ds.SeriesDescription.lower()


def test_cli_refusals_leave_inputs_and_outputs_untouched(cases, package_dir, tmp_path, capsys):
    echo1 = cases / "p02" / "mri_echo1.nii.gz"
    echo2 = cases / "p02" / "mri_echo2.nii.gz"
    original = echo1.read_bytes()
    base = ["--model", str(package_dir), "--device", "cpu", "--progress", "none"]
    assert main(["synthesize", "-i", str(echo1), "-i", str(echo2), "-o", str(echo1)] + base) == 1
    assert "inputs are never overwritten" in capsys.readouterr().err
    assert echo1.read_bytes() == original
    assert main(["synthesize", "-i", str(echo1), "-o", str(tmp_path / "x.nii.gz")] + base) == 1
    assert "takes 2 MRI input(s)" in capsys.readouterr().err
    assert main(["synthesize", "-i", str(echo1), "-i", str(echo2), "-o", str(tmp_path / "x.png")] + base) == 1
    assert "unknown volume format" in capsys.readouterr().err
    assert main(["synthesize", "-i", str(echo1), "--case", str(cases / "p01"), "-o", str(tmp_path)] + base) == 1
    assert list(tmp_path.iterdir()) == []
