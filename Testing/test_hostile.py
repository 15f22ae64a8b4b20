"""Issue 14: the holes a hostile (or careless) user found in the command line and the model cache.

Each test is named after the defect's number in the issue and reproduces it: it failed before the fix.
The command line runs in-process through ``main([...])`` (or as a subprocess where a signal or a second
process is the point), on a tiny real model package and small real volumes.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from http_fixture import sha256_hex, tiny_package_zip, write_tiny_package

from SyntheticCTLib.cli.main import main
from SyntheticCTLib.kernel import io as kio
from SyntheticCTLib.kernel.errors import VolumeReadError, VolumeWriteError
from SyntheticCTLib.kernel.io import check_not_input, read_volume, write_volume
from SyntheticCTLib.models import cache as kcache
from SyntheticCTLib.models import catalog
from SyntheticCTLib.models import package as kpackage
from SyntheticCTLib.models.cache import ENV_VAR, cache_dir
from SyntheticCTLib.models.catalog import add_catalog, add_model, clear_cache, list_models, resolve_model
from SyntheticCTLib.models.download import download
from SyntheticCTLib.models.errors import (
    CatalogError,
    DownloadError,
    ModelPackageError,
    UnsafeArchiveError,
)
from SyntheticCTLib.models.package import load_model_package

REPO = Path(__file__).resolve().parents[1]
PACKAGE_DIR = Path(catalog.__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _isolated(monkeypatch, tmp_path):
    for var in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv(ENV_VAR, str(tmp_path / "default-cache"))


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    """A real 2-echo model package (UNet3D width 4, depth 2, patch 16, 2 mm)."""
    folder, _ = write_tiny_package(tmp_path_factory.mktemp("model") / "tiny")
    return folder


def echo_image(seed: int = 0, size=(24, 24, 24), spacing=(2.0, 2.0, 2.0), origin=(0.0, 0.0, 0.0)) -> sitk.Image:
    """A body-like MRI echo: a bright noisy ball on a dark background."""
    rng = np.random.default_rng(seed)
    z, y, x = np.mgrid[: size[2], : size[1], : size[0]]
    c = np.array(size[::-1]) / 2
    ball = ((z - c[0]) ** 2 + (y - c[1]) ** 2 + (x - c[2]) ** 2) < (min(size) / 2.5) ** 2
    array = (ball * (300.0 + 20 * seed) + rng.normal(0, 5, ball.shape)).astype(np.float32)
    image = sitk.GetImageFromArray(np.abs(array))
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    return image


def write_echoes(folder: Path, suffix: str = ".nii.gz", **kwargs) -> list:
    folder.mkdir(parents=True, exist_ok=True)
    return [write_volume(echo_image(i, **kwargs), folder / f"e{i + 1}{suffix}") for i in range(2)]


def run_cli(args, capsys) -> tuple:
    """``main(args)`` in-process: ``(exit code, stdout, stderr)``."""
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(err: str, *needles: str) -> str:
    lines = [ln for ln in err.strip().splitlines() if not ln.startswith(("INFO:", "WARNING:"))]
    assert len(lines) == 1, err
    assert "Traceback" not in err, err
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def synth_args(inputs, output, model, *extra) -> list:
    return ["synthesize", *sum((["-i", str(p)] for p in inputs), []), "-o", output, "--model", model, *extra]


COMMON = ["--device", "cpu", "--progress", "none"]


def files_under(root: Path) -> list:
    return sorted(p.relative_to(root).as_posix() for p in Path(root).rglob("*") if p.is_file())


# ===================================== Data loss ==========================================================
def test_01_mhd_output_never_writes_over_an_input_data_file(tiny_model, tmp_path, capsys):
    """An input .mhd whose ElementDataFile is sct.zraw, and -o sct.mhd (which writes sct.zraw)."""
    folder = tmp_path / "mhd2"
    e1, e2 = write_echoes(folder, ".mha")
    sitk.WriteImage(read_volume(e1), str(folder / "src.mhd"), useCompression=True)
    os.replace(folder / "src.zraw", folder / "sct.zraw")
    header = (folder / "src.mhd").read_text().replace("ElementDataFile = src.zraw", "ElementDataFile = sct.zraw")
    (folder / "e1.mhd").write_text(header)
    (folder / "src.mhd").unlink()
    before = (folder / "sct.zraw").read_bytes()
    assert np.array_equal(
        sitk.GetArrayFromImage(read_volume(folder / "e1.mhd")), sitk.GetArrayFromImage(read_volume(e1))
    )

    code, _, err = run_cli(synth_args([folder / "e1.mhd", e2], folder / "sct.mhd", tiny_model) + COMMON, capsys)
    assert code == 1
    assert_one_line_error(err, "sct.zraw", "never overwritten")
    assert (folder / "sct.zraw").read_bytes() == before
    assert not (folder / "sct.mhd").exists()
    # The same for NRRD's detached header and Analyze's .hdr/.img pair.
    (folder / "e.nhdr").write_text(
        "NRRD0004\ntype: float\ndimension: 3\nsizes: 2 2 2\nencoding: raw\ndata file: out.raw\n"
    )
    with pytest.raises(VolumeWriteError, match="out.raw"):
        check_not_input(folder / "out.nhdr", [folder / "e.nhdr"])
    (folder / "a.img").write_bytes(b"\0" * 8)
    with pytest.raises(VolumeWriteError, match="a.img"):
        check_not_input(folder / "a.hdr", [folder / "a.img"])


def test_02_case_folder_as_output_keeps_the_case_file(tiny_model, tmp_path, capsys):
    case = tmp_path / "case"
    e1, e2 = write_echoes(case)
    manifest = {"id": "case", "mri": [e1.name, e2.name]}
    (case / "case.json").write_text(json.dumps(manifest))
    before = (case / "case.json").read_bytes()
    code, _, err = run_cli(["synthesize", "--case", case, "-o", case, "--model", tiny_model] + COMMON, capsys)
    assert code == 1
    assert_one_line_error(err, "case.json", "never overwritten")
    assert (case / "case.json").read_bytes() == before
    assert sorted(p.name for p in case.iterdir()) == ["case.json", "e1.nii.gz", "e2.nii.gz"]


def test_03_clear_refuses_a_folder_that_is_not_our_cache(tmp_path, capsys, monkeypatch):
    theirs = tmp_path / "documents"
    (theirs / "models").mkdir(parents=True)
    (theirs / "models" / "thesis.tex").write_text("years of work")
    (theirs / "notes.txt").write_text("keep me")
    for extra in ([], ["--all"]):
        code, _, err = run_cli(["models", "clear", "--cache-dir", theirs, *extra], capsys)
        assert code == 1
        assert_one_line_error(err, "not a SyntheticCT model cache", "notes.txt")
    monkeypatch.setenv(ENV_VAR, str(theirs))
    code, _, err = run_cli(["models", "clear", "--all"], capsys)
    assert code == 1 and "not a SyntheticCT model cache" in err
    assert files_under(theirs) == ["models/thesis.tex", "notes.txt"]
    assert not (theirs / kcache.MARKER).exists()
    # A cache we create carries the marker and clears; one from before the marker (only our names) too.
    ours = cache_dir(tmp_path / "ours")
    assert (ours / kcache.MARKER).is_file()
    (ours / "downloads").mkdir()
    (ours / "downloads" / "leftover.bin").write_bytes(b"x" * 100)
    assert clear_cache(ours) == 100
    legacy = tmp_path / "legacy"
    (legacy / "models" / "m" / "1").mkdir(parents=True)
    (legacy / "models" / "m" / "1" / "w.bin").write_bytes(b"y" * 10)
    assert clear_cache(legacy, everything=True) == 10
    assert files_under(legacy) == [kcache.MARKER]


def _live_process():
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])


def test_04_outputs_taken_by_another_run_are_refused_before_inference(tiny_model, tmp_path, capsys):
    inputs = write_echoes(tmp_path / "in")
    out = tmp_path / "out" / "sct.nii.gz"
    other = _live_process()
    try:
        out.parent.mkdir()
        kio.OutputLock.lock_path(out).write_text(f"{other.pid}\n")
        t0 = time.monotonic()
        code, _, err = run_cli(synth_args(inputs, out, tiny_model, "--dicom-out", tmp_path / "dcm") + COMMON, capsys)
        assert code == 1
        assert_one_line_error(err, "being written by another run", str(other.pid))
        assert time.monotonic() - t0 < 5
        assert files_under(tmp_path / "out") == [kio.OutputLock.lock_path(out).name]
    finally:
        other.kill()
        other.wait()
    # The owner is gone: its lock is stale and taken over; every output is written, and the lock released.
    args = synth_args(inputs, out, tiny_model) + ["--dicom-out", tmp_path / "dcm"] + COMMON
    code, stdout, err = run_cli(args, capsys)
    assert code == 0, err
    assert files_under(tmp_path / "out") == ["sct.nii.gz"]
    assert len(list((tmp_path / "dcm").iterdir())) == read_volume(out).GetSize()[2]


def test_04_outputs_are_committed_together_or_not_at_all(tmp_path, monkeypatch):
    """A failure while moving the second output into place puts the first one back (fault injected)."""
    old_file = tmp_path / "sct.nii.gz"
    old_file.write_bytes(b"old run")
    old_dir = tmp_path / "dicom"
    old_dir.mkdir()
    (old_dir / "1.dcm").write_bytes(b"old slice")
    real_replace = os.replace
    with kio.StagedOutputs() as staged:
        staged.file(old_file).write_bytes(b"new run")
        folder = staged.folder(old_dir)
        folder.mkdir()
        (folder / "1.dcm").write_bytes(b"new slice")

        def failing_replace(src, dst):
            if Path(dst) == old_dir and "partial" in str(src):
                raise OSError(28, "No space left on device")
            return real_replace(src, dst)

        monkeypatch.setattr(os, "replace", failing_replace)
        with pytest.raises(OSError):
            staged.commit()
        monkeypatch.setattr(os, "replace", real_replace)
    assert old_file.read_bytes() == b"old run"
    assert (old_dir / "1.dcm").read_bytes() == b"old slice"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dicom", "sct.nii.gz"]


def test_05_sigterm_is_a_clean_cancel_and_stale_partials_are_swept(tiny_model, tmp_path):
    inputs = [write_volume(echo_image(i, size=(96, 96, 96)), tmp_path / f"e{i}.nii.gz") for i in range(2)]
    out = tmp_path / "out" / "sct.nii.gz"
    env = dict(os.environ, PYTHONPATH=str(REPO / "SyntheticCT"), OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "SyntheticCTLib", *synth_args(inputs, out, tiny_model)]
    command += ["--device", "cpu", "--progress", "json", "--dicom-out", str(tmp_path / "out" / "dcm"), "--tta"]
    process = subprocess.Popen(
        [str(c) for c in command], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    from SyntheticCTLib.kernel.progress import parse_progress_line

    try:
        for line in process.stdout:  # SIGTERM once the inference runs (the lock is held, outputs staged next)
            event = parse_progress_line(line)
            if event and event["fraction"] > 0.15:
                break
        assert kio.OutputLock.lock_path(out).exists()
        process.send_signal(signal.SIGTERM)
        _, err = process.communicate(timeout=60)
    finally:
        process.kill()
    assert process.returncode == 143, err
    assert "terminated" in err and "Traceback" not in err
    assert files_under(tmp_path / "out") == []
    # What a run killed with SIGKILL leaves (nothing can clean up then) is swept by the next run.
    stale = tmp_path / "out" / ".sct.nii.gz.abc123.partial"
    stale.mkdir()
    (stale / "sct.nii.gz").write_bytes(b"half")
    fresh = tmp_path / "out" / ".sct.nii.gz.def456.partial"
    fresh.mkdir()
    old = time.time() - 7 * 3600
    os.utime(stale / "sct.nii.gz", (old, old))
    os.utime(stale, (old, old))
    not_ours = tmp_path / "out" / "data.partial"
    not_ours.write_bytes(b"someone else's")
    os.utime(not_ours, (old, old))
    assert kio.sweep_stale_partials(tmp_path / "out") == [stale]
    assert fresh.exists() and not_ours.exists()


def test_05_stale_download_leftovers_are_swept_from_the_cache(tiny_model, tmp_path):
    cache = cache_dir(tmp_path / "cache")
    leftover = cache / "downloads" / ".tiny.abc.fetch"
    leftover.mkdir(parents=True)
    (leftover / ".package.zip.xyz.partial").write_bytes(b"\0" * 4096)
    old = time.time() - 7 * 3600
    for p in (leftover / ".package.zip.xyz.partial", leftover):
        os.utime(p, (old, old))
    add_model(tiny_model, cache_dir=cache)
    assert not leftover.exists()


# ===================================== Silent wrong results ===============================================
def _nifti_bytes(image: sitk.Image, tmp_path: Path) -> bytes:
    path = tmp_path / "whole.nii"
    sitk.WriteImage(image, str(path))
    data = path.read_bytes()
    path.unlink()
    return data


def test_06_truncated_nifti_is_refused(tmp_path, capsys):
    import gzip

    data = _nifti_bytes(echo_image(0), tmp_path)
    (tmp_path / "half.nii").write_bytes(data[: len(data) // 2])
    (tmp_path / "half.nii.gz").write_bytes(gzip.compress(data[: len(data) // 2]))
    whole_gz = gzip.compress(data)
    (tmp_path / "cut.nii.gz").write_bytes(whole_gz[: len(whole_gz) // 2])
    for name in ("half.nii", "half.nii.gz", "cut.nii.gz"):
        with pytest.raises(VolumeReadError, match="truncated"):
            read_volume(tmp_path / name)
    ct = write_volume(sitk.Cast(echo_image(1), sitk.sitkInt16), tmp_path / "ct.nii.gz")
    code, _, err = run_cli(
        [
            "compare",
            "--reference",
            ct,
            "--synthetic",
            tmp_path / "half.nii",
            "-o",
            tmp_path / "cmp",
            "--progress",
            "none",
        ],
        capsys,
    )
    assert code == 1
    assert_one_line_error(err, "half.nii", "truncated")


def test_07_nan_and_inf_in_nifti_are_refused(tmp_path):
    array = sitk.GetArrayFromImage(echo_image(0))
    array[3, 4, 5], array[6, 7, 8] = np.nan, np.inf
    image = sitk.GetImageFromArray(array)
    for suffix in (".nii", ".nii.gz"):
        path = tmp_path / f"nan{suffix}"
        sitk.WriteImage(image, str(path), useCompression=suffix.endswith("gz"))
        with pytest.raises(VolumeReadError, match="2 NaN or Inf voxels"):
            read_volume(path)
    array64 = array.astype(np.float64)
    sitk.WriteImage(sitk.GetImageFromArray(array64), str(tmp_path / "nan64.nii"))
    with pytest.raises(VolumeReadError, match="2 NaN or Inf voxels"):
        read_volume(tmp_path / "nan64.nii")


def _patch_nifti(path: Path, offset: int, fmt: str, *values) -> None:
    data = bytearray(path.read_bytes())
    struct.pack_into("<" + fmt, data, offset, *values)
    path.write_bytes(bytes(data))


def test_08_absurd_voxel_sizes_and_disagreeing_qform_sform_are_refused(tmp_path):
    tiny = echo_image(0, spacing=(1e-6, 1e-6, 1e-6))
    for suffix in (".nii", ".nrrd", ".mha"):
        path = tmp_path / f"tiny{suffix}"
        sitk.WriteImage(tiny, str(path))
        with pytest.raises(VolumeReadError, match="outside 0.05-20 mm"):
            read_volume(path)
    huge = tmp_path / "huge.nrrd"
    sitk.WriteImage(echo_image(0, spacing=(2.0, 2.0, 40.0)), str(huge))
    with pytest.raises(VolumeReadError, match="outside 0.05-20 mm"):
        read_volume(huge)
    oblique = echo_image(0, spacing=(0.9, 1.1, 2.5))
    oblique.SetDirection(sitk.VersorTransform((0.2, 0.1, 0.3), 0.4).GetMatrix())
    good = tmp_path / "good.nii"
    sitk.WriteImage(oblique, str(good))
    image = read_volume(good)  # an ITK-written oblique file: qform, sform and pixdim agree
    assert np.allclose(image.GetDirection(), oblique.GetDirection(), atol=1e-5)
    # A hand-edited negative pixdim, the sform kept: ITK would read a flipped grid.
    flipped = tmp_path / "flipped.nii"
    shutil.copy(good, flipped)
    _patch_nifti(flipped, 76 + 4, "f", -0.9)
    with pytest.raises(VolumeReadError, match="must be positive"):
        read_volume(flipped)
    # pixdim edited (2x), qform and sform kept.
    stretched = tmp_path / "stretched.nii"
    shutil.copy(good, stretched)
    _patch_nifti(stretched, 76 + 12, "f", 5.0)
    with pytest.raises(VolumeReadError, match="disagrees with its pixdim"):
        read_volume(stretched)
    # sform rotated away from the qform.
    rotated = tmp_path / "rotated.nii"
    shutil.copy(good, rotated)
    srow = struct.unpack_from("<12f", good.read_bytes(), 280)
    swapped = srow[4:8] + srow[0:4] + srow[8:12]
    _patch_nifti(rotated, 280, "12f", *swapped)
    with pytest.raises(VolumeReadError, match="qform and an sform"):
        read_volume(rotated)
    # A qform in scanner space beside an sform in a template space (code 4) may differ: no false alarm.
    template = tmp_path / "template.nii"
    shutil.copy(rotated, template)
    _patch_nifti(template, 254, "h", 4)
    assert read_volume(template).GetSize() == oblique.GetSize()


def test_09_all_zero_echo_is_refused_by_synthesize(tiny_model, tmp_path, capsys):
    e1, _ = write_echoes(tmp_path)
    zero = write_volume(sitk.Image(read_volume(e1).GetSize(), sitk.sitkFloat32), tmp_path / "zero.nii.gz")
    zero_img = read_volume(zero)
    zero_img.CopyInformation(read_volume(e1))
    write_volume(zero_img, zero)
    out = tmp_path / "sct.nii.gz"
    code, _, err = run_cli(synth_args([e1, zero], out, tiny_model) + COMMON, capsys)
    assert code == 1
    assert_one_line_error(err, "zero.nii.gz", "constant")
    assert not out.exists()


def test_10_channels_on_other_grids_are_refused_unless_asked_and_must_overlap(tiny_model, tmp_path, capsys):
    e1 = write_volume(echo_image(0), tmp_path / "e1.nii.gz")
    shifted = write_volume(echo_image(1, origin=(4.0, 0.0, 0.0)), tmp_path / "shifted.nii.gz")
    far = write_volume(echo_image(1, origin=(1000.0, 0.0, 0.0)), tmp_path / "far.nii.gz")
    out = tmp_path / "sct.nii.gz"
    code, _, err = run_cli(synth_args([e1, shifted], out, tiny_model) + COMMON, capsys)
    assert code == 1
    assert_one_line_error(err, "shifted.nii.gz", "direction", "--resample-channels")
    code, _, err = run_cli(synth_args([e1, far], out, tiny_model) + COMMON + ["--resample-channels"], capsys)
    assert code == 1
    assert_one_line_error(err, "far.nii.gz", "covers 0%", "direction")
    assert not out.exists()
    code, _, err = run_cli(synth_args([e1, shifted], out, tiny_model) + COMMON + ["--resample-channels"], capsys)
    assert code == 0, err
    assert read_volume(out).GetSize() == read_volume(e1).GetSize()


# ===================================== Substitution and reach =============================================
def _host(server, tmp_path, models) -> str:
    return server.serve("inst/catalog.json", json.dumps({"models": models}).encode())


def test_12_a_catalog_cannot_shadow_the_bundled_or_a_user_model(server, resources, tmp_path, tiny_model, capsys):
    cache = tmp_path / "cache"
    data = tiny_package_zip(tmp_path / "evil", tmp_path / "evil.zip", name="phantom-spine-megre", version="6.6.6")
    zip_url = server.serve("inst/evil.zip", data)
    add_model(tiny_model, name="mine", cache_dir=cache)
    entries = [
        {"name": "phantom-spine-megre", "version": "6.6.6", "url": zip_url, "sha256": sha256_hex(data)},
        {"name": "mine", "version": "6.6.6", "url": zip_url, "sha256": sha256_hex(data)},
        {"name": "extra", "version": "6.6.6", "url": zip_url, "sha256": sha256_hex(data)},
    ]
    add_catalog(_host(server, tmp_path, entries), cache_dir=cache)
    listed = {e.name: (e.version, e.source) for e in list_models(cache)}
    assert listed["phantom-spine-megre"][1] == "bundled" and listed["phantom-spine-megre"][0] != "6.6.6"
    assert listed["mine"][1] == "user" and listed["extra"][1] != "user"
    with pytest.raises(Exception, match="bundled model"):
        resolve_model("default", cache_dir=cache)  # missing here: never replaced by the catalog's
    assert server.hits("inst/evil.zip") == 0
    assert resolve_model("mine", cache_dir=cache).version == "0.1.0"
    # The model that runs is printed with where it came from and its hash.
    inputs = write_echoes(tmp_path / "in")
    args = synth_args(inputs, tmp_path / "sct.nii.gz", "mine") + COMMON
    os.environ[ENV_VAR] = str(cache)
    code, out, err = run_cli(args, capsys)
    assert code == 0, err
    line = json.loads(out.strip().splitlines()[-1])
    card = cache / "models" / "mine" / "0.1.0" / "model.json"
    assert line["model_sha256"] == hashlib.sha256(card.read_bytes()).hexdigest()
    assert "user's own models" in line["model_source"]


def test_13_remote_catalogs_need_https_and_name_only_web_urls(server, resources, tmp_path, capsys):
    cache = tmp_path / "cache"
    with pytest.raises(CatalogError, match="use https"):
        add_catalog("http://catalog.example.org/catalog.json", cache_dir=cache, retries=0)
    # Loopback http is fine; a remote catalog naming a file: URL is not.
    secret = tmp_path / "secret.zip"
    secret.write_bytes(b"private")
    entries = [{"name": "local-reader", "version": "1", "url": secret.as_uri(), "sha256": "a" * 64}]
    with pytest.raises(CatalogError, match="only http"):
        add_catalog(_host(server, tmp_path, entries), cache_dir=cache)
    # `models add file:///etc/passwd` neither downloads it nor prints its hash.
    target = Path("/etc/passwd")
    if target.is_file():
        digest = hashlib.sha256(target.read_bytes()).hexdigest()
        code, out, err = run_cli(
            ["models", "add", target.as_uri(), "--sha256", "b" * 64, "--cache-dir", cache, "--progress", "none"], capsys
        )
        assert code == 1
        assert_one_line_error(err, "/etc/passwd", "zip")
        assert digest not in out + err


def test_14_catalog_name_and_version_must_match_the_package(server, resources, tmp_path):
    cache = tmp_path / "cache"
    data = tiny_package_zip(tmp_path / "pkg", tmp_path / "pkg.zip", name="something-else", version="9.9")
    url = server.serve("inst/m.zip", data)
    add_catalog(
        _host(server, tmp_path, [{"name": "inst-spine", "version": "1.0", "url": url, "sha256": sha256_hex(data)}]),
        cache_dir=cache,
    )
    with pytest.raises(CatalogError, match="holds model 'something-else' 9.9"):
        resolve_model("inst-spine", cache_dir=cache)
    assert not list(cache.rglob("model.json"))


# ===================================== Resource blow-ups and hangs ========================================
def _claiming(tmp_path: Path, name: str, dims) -> Path:
    """A small .nii whose header claims ``dims`` voxels."""
    data = bytearray(_nifti_bytes(echo_image(0), tmp_path))
    struct.pack_into("<3h", data, 42, *dims)
    path = tmp_path / name
    path.write_bytes(bytes(data))
    return path


def test_15_header_size_is_checked_against_the_file_and_memory_before_reading(tmp_path, capsys):
    import resource

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for dims in ((1200, 1200, 1200), (800, 800, 800)):
        path = _claiming(tmp_path, f"claims{dims[0]}.nii", dims)
        t0 = time.monotonic()
        with pytest.raises(VolumeReadError, match="truncated|memory"):
            read_volume(path)
        assert time.monotonic() - t0 < 2.0
    grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert grown_mb < 500, f"reading a lying header grew the process by {grown_mb:.0f} MB"
    # A header claiming more than the machine's memory says so (NIfTI, and through SimpleITK's header reader).
    path = _claiming(tmp_path, "claims32000.nii", (32000, 32000, 32000))
    with pytest.raises(VolumeReadError, match="memory available"):
        read_volume(path)
    mha = tmp_path / "big.mha"
    sitk.WriteImage(echo_image(0), str(mha), useCompression=True)  # the data size is not known: memory decides
    text = mha.read_bytes().replace(b"DimSize = 24 24 24", b"DimSize = 30000 30000 30000")
    mha.write_bytes(text)
    with pytest.raises(VolumeReadError, match="memory available"):
        read_volume(mha)


@pytest.mark.parametrize("kwargs", [{"width": 1_000_000}, {"depth": 10**18}, {"width": 4, "depth": 13}])
def test_16_huge_architecture_arguments_are_refused_when_added(tmp_path, kwargs, capsys):
    folder, _ = write_tiny_package(tmp_path / "ok")
    card = json.loads((folder / "model.json").read_text())
    card["architecture"]["kwargs"].update(kwargs)
    (folder / "model.json").write_text(json.dumps(card))
    t0 = time.monotonic()
    code, _, err = run_cli(["models", "add", folder, "--cache-dir", tmp_path / "cache", "--progress", "none"], capsys)
    assert code == 1
    assert_one_line_error(err, str(folder))
    assert "parameters" in err or "depth" in err
    assert time.monotonic() - t0 < 5


def test_16_parameter_count_is_exact():
    import torch

    from SyntheticCTLib.models.architectures import build_network

    for kwargs in (
        {"in_channels": 2, "depth": 2, "width": 4},
        {"in_channels": 3, "out_channels": 2, "depth": 4, "width": 6, "norm": "none", "residual": False},
        {"in_channels": 1, "depth": 3, "width": 8, "norm": "group"},
        {"in_channels": 1, "depth": 1, "width": 5, "norm": "batch"},
    ):
        with torch.device("meta"):
            network = build_network("unet3d", **kwargs)
        assert kpackage.unet3d_parameter_count(kwargs) == sum(p.numel() for p in network.parameters()), kwargs
    with pytest.raises(ModelPackageError, match="depth"):
        kpackage.unet3d_parameter_count({"depth": 10**18})


def _package_members(tmp_path: Path) -> list:
    folder, _ = write_tiny_package(tmp_path / "zsrc")
    return [(name, (folder / name).read_bytes()) for name in ("model.json", "model.safetensors")]


def test_17_zip_member_count_and_extraction_of_what_the_card_names_only(tmp_path):
    members = _package_members(tmp_path)
    many = tmp_path / "many.zip"
    with zipfile.ZipFile(many, "w") as zf:
        for name, data in members:
            zf.writestr(name, data)
        for i in range(3000):
            zf.writestr(f"junk/{i}.bin", b"")
    t0 = time.monotonic()
    with pytest.raises(UnsafeArchiveError, match="3002 members"):
        load_model_package(many)
    assert time.monotonic() - t0 < 5
    padded = tmp_path / "padded.zip"
    with zipfile.ZipFile(padded, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name, data in members:
            zf.writestr(name, data)
        for i in range(50):
            zf.writestr(f"junk/{i}.bin", os.urandom(1024))
    cache = tmp_path / "cache"
    entry = add_model(padded, cache_dir=cache)
    assert sorted(p.name for p in Path(entry.local_path).rglob("*")) == [
        ".origin.json",
        "model.json",
        "model.safetensors",
    ]
    assert not [f for f in files_under(cache) if "junk" in f]


def test_18_download_has_a_deadline_a_minimum_rate_and_a_size_limit(server, tmp_path):
    payload = os.urandom(200_000)
    server.slow_chunk, server.slow_pause = 1, 0.05  # drips a byte every 50 ms: every read stays alive
    url = server.serve("drip.bin", payload, mode="slow")
    t0 = time.monotonic()
    with pytest.raises(DownloadError, match="too slow"):
        download(url, tmp_path / "a.bin", sha256=sha256_hex(payload), min_rate=1000, grace=1.0, retries=0)
    assert time.monotonic() - t0 < 5
    t0 = time.monotonic()
    with pytest.raises(DownloadError, match="deadline"):
        download(url, tmp_path / "a.bin", sha256=sha256_hex(payload), deadline=1.0, min_rate=0, retries=0)
    assert time.monotonic() - t0 < 5
    big = server.serve("big.bin", os.urandom(3 << 20))
    with pytest.raises(DownloadError, match="more than"):
        download(big, tmp_path / "b.bin", max_bytes=1 << 20, retries=0)
    assert sorted(p.name for p in tmp_path.iterdir()) == []
    # With a catalog's size, the deadline follows the size: 200 kB at 10 kB/s plus the base allowance.
    from SyntheticCTLib.models import download as dl

    assert dl.DEADLINE_BASE_S + len(payload) / dl.MIN_RATE < 400


def test_19_deeply_nested_json_is_a_one_line_error(tmp_path, resources, capsys):
    folder, _ = write_tiny_package(tmp_path / "deep")
    (folder / "model.json").write_text("[" * 100000)
    code, _, err = run_cli(["models", "add", folder, "--cache-dir", tmp_path / "cache", "--progress", "none"], capsys)
    assert code == 1
    assert_one_line_error(err, "model.json", "nested too deeply")
    cache = cache_dir(tmp_path / "cache2")
    (cache / "user_catalog.json").write_text("{" + '"a":' * 100000)
    code, _, err = run_cli(["models", "list", "--cache-dir", cache], capsys)
    assert code == 1
    assert_one_line_error(err, "user_catalog.json")


# ===================================== One line, not a traceback ==========================================
def test_20_output_naming_a_folder_is_refused_before_inference(tiny_model, tmp_path, capsys):
    inputs = write_echoes(tmp_path / "in")
    taken = tmp_path / "sct.nii.gz"
    taken.mkdir()
    code, _, err = run_cli(synth_args(inputs, taken, tiny_model) + COMMON + ["--progress", "json"], capsys)
    assert code == 1
    assert_one_line_error(err, str(taken), "existing folder")
    assert list(taken.iterdir()) == []
    with pytest.raises(VolumeWriteError, match="existing folder"):
        write_volume(echo_image(0), taken)


@pytest.mark.parametrize("layout", ["duplicate-card", "file-and-folder"])
def test_21_colliding_zip_members_are_a_one_line_error(tmp_path, layout, capsys):
    members = _package_members(tmp_path)
    path = tmp_path / f"{layout}.zip"
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zipfile warns about the duplicate name it is asked to write
        with zipfile.ZipFile(path, "w") as zf:
            for name, data in members:
                zf.writestr(name, data)
            if layout == "duplicate-card":
                zf.writestr("model.json", members[0][1])
            else:
                zf.writestr("x", b"a file")
                zf.writestr("x/y", b"and a folder")
    code, _, err = run_cli(["models", "add", path, "--cache-dir", tmp_path / "cache", "--progress", "none"], capsys)
    assert code == 1
    assert_one_line_error(err, str(path))
    if layout == "file-and-folder":  # only the card's files are extracted; the collision is still refused
        with pytest.raises(UnsafeArchiveError, match="both a file and a folder"):
            from SyntheticCTLib.models.archive import safe_extract_zip

            safe_extract_zip(path, tmp_path / "out")


def _make_read_only(folder: Path):
    """Make ``folder`` read-only even for root (chattr +i); return an undo function, or skip."""
    if os.geteuid() != 0:
        folder.chmod(0o555)
        return lambda: folder.chmod(0o755)
    chattr = shutil.which("chattr")
    if chattr is None or subprocess.run([chattr, "+i", str(folder)], capture_output=True).returncode != 0:
        pytest.skip("cannot make a folder read-only for root here (no chattr +i)")
    return lambda: subprocess.run([chattr, "-i", str(folder)], capture_output=True)


def test_22_read_only_cache_is_a_one_line_error(tmp_path, tiny_model, capsys):
    cache = cache_dir(tmp_path / "cache")
    undo = _make_read_only(cache)
    try:
        try:
            (cache / "probe").mkdir()
            pytest.skip("the folder stayed writable")
        except OSError:
            pass
        code, _, err = run_cli(["models", "add", tiny_model, "--cache-dir", cache, "--progress", "none"], capsys)
        assert code == 1
        assert_one_line_error(err, str(cache))
        code, out, err = run_cli(["models", "list", "--cache-dir", cache], capsys)
        assert code == 0, err
    finally:
        undo()


def test_23_redirect_loop_is_one_line(server, tmp_path, capsys):
    loop = server.serve("loop.zip", b"", mode=f"redirect:{server.url('loop.zip')}")
    with pytest.raises(DownloadError) as info:
        download(loop, tmp_path / "x.zip", retries=0)
    assert "\n" not in str(info.value) and "loop" in str(info.value)
    code, _, err = run_cli(
        ["models", "add", loop, "--sha256", "c" * 64, "--cache-dir", tmp_path / "cache", "--progress", "none"], capsys
    )
    assert code == 1
    assert_one_line_error(err, "loop")


# ===================================== Fuzz: corrupted volumes through the command line ==================
FUZZ_FORMATS = (".nii", ".nii.gz", ".nrrd", ".mha")
FUZZ_TIME_LIMIT_S = 60.0


def _ct_image(size=(20, 20, 20)) -> sitk.Image:
    """A CT-like int16 volume: soft tissue with a bone block, 2 mm voxels."""
    array = np.full(size[::-1], -1000, dtype=np.int16)
    array[3:-3, 3:-3, 3:-3] = 40
    array[6:-6, 8:-8, 8:-8] = 900
    image = sitk.GetImageFromArray(array)
    image.SetSpacing((2.0, 2.0, 2.0))
    return image


def _corrupt_nifti_header(data: bytearray, rng: np.random.Generator) -> None:
    choice = rng.integers(6)
    if choice == 0:  # sizes
        struct.pack_into("<3h", data, 42, *[int(v) for v in rng.choice([0, -1, 1, 3, 7, 20, 4000, 32767], 3)])
    elif choice == 1:  # dim[0]
        struct.pack_into("<h", data, 40, int(rng.choice([-3, 0, 2, 4, 8, 100])))
    elif choice == 2:  # voxel size
        values = rng.choice([0.0, -2.0, 1e-9, 1e9, np.nan, np.inf, 2.0, 0.5], 3)
        struct.pack_into("<3f", data, 80, *[float(v) for v in values])
    elif choice == 3:  # datatype and bitpix
        struct.pack_into("<2h", data, 70, int(rng.choice([0, 1, 2, 4, 16, 64, 128, 999, 2048])), 8)
    elif choice == 4:  # vox_offset
        struct.pack_into("<f", data, 108, float(rng.choice([0.0, -5.0, 1e9, 352.0, 4000.0, np.nan])))
    else:  # qform/sform
        struct.pack_into("<2h", data, 252, int(rng.integers(-1, 5)), int(rng.integers(-1, 5)))
        struct.pack_into("<4f", data, 280, *[float(v) for v in rng.normal(0, 3, 4)])


def _corrupt_text_header(data: bytes, rng: np.random.Generator, suffix: str) -> bytes:
    end = data.find(b"\n\n") if suffix == ".nrrd" else data.find(b"ElementDataFile")
    end = end if end > 0 else min(len(data), 400)
    header, body = data[:end].decode("latin-1"), data[end:]
    lines = header.split("\n")
    i = int(rng.integers(len(lines)))
    key = lines[i].split(":" if suffix == ".nrrd" else "=")[0]
    values = ["0", "-1", "1e-9", "1e9", "nan", "inf", "2 2", "20 20 20 20", "999999 999999 999999", "x", ""]
    sep = ": " if suffix == ".nrrd" else " = "
    lines[i] = key.strip() + sep + " ".join(str(rng.choice(values)) for _ in range(int(rng.integers(1, 4))))
    return "\n".join(lines).encode("latin-1") + body


def corrupt_file(path: Path, rng: np.random.Generator) -> str:
    """Corrupt ``path`` in place: truncate it, flip bits, or put a header field out of range. Returns how."""
    data = bytearray(path.read_bytes())
    suffix = kio.volume_suffix(path)
    kind = ("truncate", "flip", "header")[int(rng.integers(3))]
    if kind == "truncate":
        data = data[: int(len(data) * rng.uniform(0.05, 0.97))]
    elif kind == "flip":
        region = 352 if suffix == ".nii" else len(data)
        for _ in range(int(rng.integers(1, 9))):
            at = int(rng.integers(min(region, len(data))))
            data[at] ^= 1 << int(rng.integers(8))
    elif suffix == ".nii":
        _corrupt_nifti_header(data, rng)
    elif suffix == ".nii.gz":
        import gzip

        raw = bytearray(gzip.decompress(bytes(data)))
        _corrupt_nifti_header(raw, rng)
        data = bytearray(gzip.compress(bytes(raw)))
    else:
        data = bytearray(_corrupt_text_header(bytes(data), rng, suffix))
    path.write_bytes(bytes(data))
    return kind


def corrupt_dicom_series(folder: Path, rng: np.random.Generator) -> str:
    """Corrupt one slice of a DICOM series (or the series): truncate, flip bits, a tag out of range, a gap."""
    import pydicom

    files = sorted(folder.iterdir())
    victim = files[int(rng.integers(len(files)))]
    kind = ("truncate", "flip", "tag", "gap")[int(rng.integers(4))]
    if kind == "truncate":
        data = victim.read_bytes()
        victim.write_bytes(data[: int(len(data) * rng.uniform(0.05, 0.95))])
    elif kind == "flip":
        data = bytearray(victim.read_bytes())
        for _ in range(int(rng.integers(1, 9))):
            at = int(rng.integers(128, min(len(data), 1500)))
            data[at] ^= 1 << int(rng.integers(8))
        victim.write_bytes(bytes(data))
    elif kind == "gap":
        victim.unlink()
    else:
        ds = pydicom.dcmread(victim)
        tag = int(rng.integers(5))
        if tag == 0:
            ds.PixelSpacing = [str(rng.choice(["0", "-1", "1e-9", "1e9"]))] * 2
        elif tag == 1:
            ds.Rows = int(rng.choice([0, 1, 9999]))
        elif tag == 2:
            ds.BitsAllocated = int(rng.choice([1, 7, 64]))
        elif tag == 3:
            ds.ImageOrientationPatient = [float(v) for v in rng.choice([0.0, 1.0, 1e9], 6)]
        else:
            position = [float(v) for v in ds.ImagePositionPatient]
            ds.ImagePositionPatient = [position[0], position[1], position[2] + 0.5]
        ds.save_as(victim)
    return kind


def _fuzz(tiny_model: Path, tmp_path: Path, capsys, n_files: int, seed: int, max_ok=None, n_dicom: int = 0) -> dict:
    """Corrupt ``n_files`` volumes and run each through one command. With ``max_ok``, a command runs to the
    end on at most that many files that still read: later ones are only read (the full commands are slow)."""
    rng = np.random.default_rng(seed)
    good = tmp_path / "good"
    echo2 = write_volume(echo_image(1, size=(20, 20, 20)), good / "echo2.nii.gz")
    ct = write_volume(_ct_image(), good / "ct.nii.gz")
    sources = {
        "mri": echo_image(0, size=(20, 20, 20)),
        "ct": _ct_image(),
    }
    bad = tmp_path / "bad"
    bad.mkdir()
    (tmp_path / "out").mkdir()
    cache_dir(os.environ[ENV_VAR])  # the model cache exists before the first run
    outcomes: dict = {"ok": 0, "refused": 0}
    from SyntheticCTLib.synthesis.dicom_export import export_dicom_series

    for i in range(n_files + n_dicom):
        suffix = FUZZ_FORMATS[i % len(FUZZ_FORMATS)] if i < n_files else "dicom"
        command = ("synthesize", "register", "compare")[(i // len(FUZZ_FORMATS)) % 3 if i < n_files else i % 3]
        source = sources["mri" if command == "synthesize" else "ct"]
        path = bad / f"f{i:04d}{suffix if suffix != 'dicom' else ''}"
        if suffix == "dicom":
            export_dicom_series(sitk.Cast(source, sitk.sitkInt16), path)
            how = corrupt_dicom_series(path, rng)
        else:
            sitk.WriteImage(source, str(path), useCompression=suffix != ".nii")
            how = corrupt_file(path, rng)
        out = tmp_path / "out" / f"{i:04d}"
        before = sorted(p.name for p in tmp_path.iterdir()), sorted(p.name for p in bad.iterdir())
        if command == "synthesize":
            args = synth_args([path, echo2], out / "sct.nii.gz", tiny_model) + COMMON
        elif command == "register":
            args = ["register", "--fixed", ct, "--moving", path, "-o", out / "t.tfm", "--progress", "none"]
            args += ["--metric", "meansquares", "--seed", "1"]
        else:
            args = ["compare", "--reference", ct, "--synthetic", path, "-o", out, "--progress", "none"]
        if max_ok is not None and outcomes.get(f"{command}_ok", 0) >= max_ok:
            try:
                read_volume(path)
            except VolumeReadError:
                pass
            else:
                outcomes["read_only"] = outcomes.get("read_only", 0) + 1
                continue
        t0 = time.monotonic()
        try:
            code = main([str(a) for a in args])
        except BaseException as e:  # noqa: BLE001 - the point: nothing may escape main
            pytest.fail(f"{command} on {path.name} ({how}) raised {type(e).__name__}: {e}")
        elapsed = time.monotonic() - t0
        stdout, err = capsys.readouterr()
        where = f"{command} on {path.name} ({how})"
        assert elapsed < FUZZ_TIME_LIMIT_S, f"{where} took {elapsed:.0f} s"
        assert "Traceback" not in err, f"{where}: {err}"
        assert (sorted(p.name for p in tmp_path.iterdir()), sorted(p.name for p in bad.iterdir())) == before, (
            f"{where} wrote outside its output path"
        )
        outcomes[f"{command}_{'ok' if code == 0 else 'refused'}_s"] = (
            outcomes.get(f"{command}_{'ok' if code == 0 else 'refused'}_s", 0.0) + elapsed
        )
        if code == 0:
            outcomes["ok"] += 1
            outcomes[f"{command}_ok"] = outcomes.get(f"{command}_ok", 0) + 1
            if command == "synthesize":
                result = read_volume(out / "sct.nii.gz")
                assert result.GetSize() == read_volume(path).GetSize(), where
                assert result.GetPixelID() == sitk.sitkInt16, where
            elif command == "register":
                assert (out / "t.tfm").is_file(), where
            else:
                assert any(out.iterdir()), where
        else:
            outcomes["refused"] += 1
            assert code == 1, f"{where}: exit {code}: {err}"
            errors = [ln for ln in err.strip().splitlines() if ln.startswith("syntheticct")]
            assert len(errors) == 1, f"{where}: {err}"
            assert not out.exists() or not [p for p in out.rglob("*") if p.is_file()], f"{where} left files"
    return outcomes


def test_fuzz_corrupted_volumes_end_in_a_result_or_one_line(tiny_model, tmp_path, capsys):
    """A few hundred corrupted NIfTI, NRRD and MHA files and DICOM series through synthesize, register and
    compare: each run ends with exit 0 and a result on the input's grid, or exit 1 and one error line; never a
    traceback, a hang past the time limit, or a file written outside the run's output path."""
    outcomes = _fuzz(tiny_model, tmp_path, capsys, n_files=240, seed=14, max_ok=3, n_dicom=24)
    assert outcomes["refused"] > 150  # most corruptions are caught, not silently run
    assert all(outcomes.get(f"{c}_ok", 0) >= 1 for c in ("synthesize", "register", "compare")), outcomes


@pytest.mark.slow
def test_fuzz_corrupted_volumes_many(tiny_model, tmp_path, capsys):
    for seed in range(3):
        (tmp_path / f"s{seed}").mkdir()
        _fuzz(tiny_model, tmp_path / f"s{seed}", capsys, n_files=300, seed=100 + seed, n_dicom=60)


def test_real_volumes_pass_the_new_reading_checks(real_data_dir):
    """No false alarm: every real NIfTI and NRRD volume (qform and sform from several tools) still reads."""
    paths = sorted(p for p in real_data_dir.glob("*/*") if kio.volume_suffix(p))
    assert paths, f"no volume files in {real_data_dir}"
    for path in paths:
        image = read_volume(path)
        assert min(image.GetSize()) > 1, path
