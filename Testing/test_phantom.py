"""The paired MRI/CT digital phantom: determinism, geometry, tissue physics, manifest, errors and CLI."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage

from SyntheticCTLib.kernel.errors import InvalidParameterError, VolumeReadError, VolumeWriteError
from SyntheticCTLib.kernel.io import read_volume
from SyntheticCTLib.phantom import BONE_LABELS, TISSUES, load_case, make_phantom, write_phantom
from SyntheticCTLib.phantom import tissues as T
from SyntheticCTLib.phantom.mri import DEFAULT_PROTOCOLS, TissueSignals

SMALL = {"size": (64, 64, 48), "spacing": 2.0}


def arr(image: sitk.Image) -> np.ndarray:
    return sitk.GetArrayFromImage(image)


def interior(labels: np.ndarray, label: int) -> np.ndarray:
    """Voxels of ``label`` whose 26 neighbours share it: fully inside the tissue (no partial volume)."""
    return ndimage.binary_erosion(labels == label, structure=np.ones((3, 3, 3), bool))


@pytest.fixture(scope="module")
def clean_fine():
    """A noise-free 1 mm phantom (no CT noise or blur, no MRI noise or bias), without a lesion."""
    return make_phantom(
        2, size=(96, 96, 64), spacing=1.0, ct_noise_hu=0, ct_blur_mm=0, mri_noise=False, bias_field=False, lesion="none"
    )


@pytest.fixture(scope="module")
def clean_small():
    return make_phantom(0, **SMALL, ct_noise_hu=0, ct_blur_mm=0, mri_noise=False, bias_field=False)


# --- determinism ---------------------------------------------------------------------------------------------


def test_same_seed_gives_identical_volumes(small_phantom):
    again = make_phantom(seed=0, size=(64, 64, 48), spacing=2.0)
    for a, b in zip(
        [*small_phantom.mri, small_phantom.ct, small_phantom.labels, small_phantom.bone_labels],
        [*again.mri, again.ct, again.labels, again.bone_labels],
    ):
        assert np.array_equal(arr(a), arr(b))
    assert json.dumps(small_phantom.params, sort_keys=True) == json.dumps(again.params, sort_keys=True)


def test_same_seed_gives_identical_files(tmp_path):
    p = make_phantom(4, size=(32, 32, 24), spacing=3.0)
    a, b = (
        write_phantom(p, tmp_path / "a"),
        write_phantom(make_phantom(4, size=(32, 32, 24), spacing=3.0), tmp_path / "b"),
    )
    names = sorted(x.name for x in a.parent.iterdir())
    assert names == sorted(x.name for x in b.parent.iterdir())
    for name in names:
        assert (a.parent / name).read_bytes() == (b.parent / name).read_bytes(), name


def test_different_seeds_differ(small_phantom):
    other = make_phantom(seed=1, size=(64, 64, 48), spacing=2.0)
    assert not np.array_equal(arr(small_phantom.ct), arr(other.ct))
    assert not np.array_equal(arr(small_phantom.labels), arr(other.labels))
    assert small_phantom.params["anatomy"] != other.params["anatomy"]


# --- geometry and labels ---------------------------------------------------------------------------------------


def test_all_volumes_share_one_grid(small_phantom):
    images = [
        *small_phantom.mri,
        small_phantom.ct,
        small_phantom.labels,
        small_phantom.bone_labels,
        small_phantom.bone_mask,
    ]
    assert len(small_phantom.mri) == 3 == len(small_phantom.params["echo_times_ms"])
    for image in images:
        assert image.GetSize() == (64, 64, 48)
        assert image.GetSpacing() == (2.0, 2.0, 2.0)
        assert image.GetOrigin() == small_phantom.ct.GetOrigin()
        assert image.GetDirection() == (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
    # The grid centre is the world origin.
    centre = small_phantom.ct.TransformContinuousIndexToPhysicalPoint([(n - 1) / 2 for n in (64, 64, 48)])
    assert np.allclose(centre, 0.0, atol=1e-9)
    assert small_phantom.ct.GetPixelID() == sitk.sitkFloat32
    assert all(m.GetPixelID() == sitk.sitkFloat32 for m in small_phantom.mri)
    assert small_phantom.labels.GetPixelID() == sitk.sitkUInt8 == small_phantom.bone_labels.GetPixelID()


def test_body_fits_in_the_field_of_view_with_air_around(small_phantom):
    labels = arr(small_phantom.labels)
    for face in (labels[:, :, 0], labels[:, :, -1], labels[:, 0, :], labels[:, -1, :]):
        assert np.all(face == T.AIR)
    assert np.all(arr(small_phantom.ct)[:, :, 0] < -900)
    # ... and the body fills a good part of it.
    assert 0.3 < np.mean(labels != T.AIR) < 0.9


@pytest.mark.parametrize("seed", [0, 1, 2, 3, 5, 8])
def test_one_bone_label_per_vertebra_and_bones_are_separated(seed):
    p = make_phantom(seed, **SMALL)
    n = p.params["n_vertebrae"]
    assert 3 <= n <= 5
    bones = arr(p.bone_labels)
    assert sorted(np.unique(bones[bones > 0]).tolist()) == list(range(1, n + 1))
    # bone_labels covers exactly the bone tissue labels.
    assert np.array_equal(bones > 0, np.isin(arr(p.labels), BONE_LABELS))
    assert np.array_equal(arr(p.bone_mask), (bones > 0).astype(np.uint8))
    # Neighbouring vertebrae never touch, not even diagonally.
    for k in range(1, n + 1):
        grown = ndimage.binary_dilation(bones == k, structure=np.ones((3, 3, 3), bool))
        assert not np.any(grown & (bones > 0) & (bones != k))
    # Vertebra 1 is the most superior (largest z index, LPS +z = superior).
    centroid_z = [np.argwhere(bones == k)[:, 0].mean() for k in range(1, n + 1)]
    assert centroid_z == sorted(centroid_z, reverse=True)


def test_vertebra_count_option():
    for n in (3, 4, 5):
        p = make_phantom(7, **SMALL, n_vertebrae=n)
        assert p.params["n_vertebrae"] == n
        assert np.unique(arr(p.bone_labels)).tolist() == list(range(n + 1))


def test_every_tissue_appears_and_boundaries_have_partial_volume(clean_small):
    labels = arr(clean_small.labels)
    present = set(np.unique(labels).tolist())
    assert {
        T.AIR,
        T.SUBCUTANEOUS_FAT,
        T.MUSCLE,
        T.CORTICAL_BONE,
        T.TRABECULAR_BONE,
        T.DISC,
        T.CSF,
        T.SOFT_TISSUE,
    } <= present
    # Noise-free, unblurred CT: voxels on the skin surface lie strictly between air and soft tissue.
    ct = arr(clean_small.ct)
    air = labels == T.AIR
    edge = air & ndimage.binary_dilation(~air)
    values = ct[edge]
    assert np.mean((values > -990) & (values < -100)) > 0.3


@pytest.mark.parametrize("kind,label", [("sclerotic", T.SCLEROTIC_LESION), ("lytic", T.LYTIC_LESION)])
def test_lesion_option(kind, label):
    p = make_phantom(3, size=(128, 128, 48), spacing=1.0, lesion=kind, ct_noise_hu=0, ct_blur_mm=0)
    labels, bones = arr(p.labels), arr(p.bone_labels)
    assert p.params["lesion"] == kind
    lesion = labels == label
    assert lesion.sum() > 20
    # The lesion lies in one vertebra, the one the manifest names.
    assert np.unique(bones[lesion]).tolist() == [p.params["anatomy"]["lesion"]["vertebra"]]
    lo, hi = T.HU_RANGES[label]
    inside = interior(labels, label)
    assert inside.any()
    assert np.all((arr(p.ct)[inside] >= lo) & (arr(p.ct)[inside] <= hi))
    assert (labels == (T.LYTIC_LESION if kind == "sclerotic" else T.SCLEROTIC_LESION)).sum() == 0


# --- CT --------------------------------------------------------------------------------------------------------


def test_hu_ranges_per_tissue_on_pure_voxels(clean_fine):
    labels, ct = arr(clean_fine.labels), arr(clean_fine.ct)
    checked = []
    for label in TISSUES:
        inside = interior(labels, label)
        if inside.sum() < 5:
            continue
        lo, hi = T.HU_RANGES[label]
        values = ct[inside]
        assert values.min() >= lo - 0.5 and values.max() <= hi + 0.5, (TISSUES[label], values.min(), values.max())
        checked.append(label)
    assert {T.AIR, T.SUBCUTANEOUS_FAT, T.MUSCLE, T.CORTICAL_BONE, T.TRABECULAR_BONE, T.DISC, T.CSF} <= set(checked)
    # Cortical bone varies along the bone, over hundreds of HU, within +1000..+1900.
    cortical = ct[interior(labels, T.CORTICAL_BONE)]
    assert cortical.max() - cortical.min() > 200
    # Trabecular bone varies too (texture and marrow fat).
    trabecular = ct[interior(labels, T.TRABECULAR_BONE)]
    assert trabecular.std() > 20


def test_ct_noise_has_the_requested_level():
    clean = arr(make_phantom(6, **SMALL, ct_noise_hu=0).ct)
    noisy = make_phantom(6, **SMALL, ct_noise_hu=15.0)
    labels = arr(noisy.labels)
    diff = (arr(noisy.ct) - clean)[labels != T.AIR]
    assert noisy.params["ct_noise_hu"] == 15.0
    assert abs(diff.std() - 15.0) < 1.0
    assert abs(diff.mean()) < 0.5


def test_noisy_ct_tissue_medians(small_phantom):
    labels, ct = arr(small_phantom.labels), arr(small_phantom.ct)
    for label in (T.SUBCUTANEOUS_FAT, T.MUSCLE, T.TRABECULAR_BONE, T.DISC):
        lo, hi = T.HU_RANGES[label]
        assert lo <= np.median(ct[interior(labels, label)]) <= hi, TISSUES[label]
    assert np.median(ct[labels == T.AIR]) == pytest.approx(-1000, abs=3)


# --- MRI -------------------------------------------------------------------------------------------------------


def _median(image, mask):
    return float(np.median(arr(image)[mask]))


def test_cortical_bone_is_darker_than_muscle_in_every_echo(small_phantom):
    labels = arr(small_phantom.labels)
    cortical, muscle = labels == T.CORTICAL_BONE, interior(labels, T.MUSCLE)
    assert cortical.sum() > 20
    for echo in small_phantom.mri:
        assert _median(echo, cortical) < 0.6 * _median(echo, muscle)


def test_pure_cortical_bone_has_no_signal(clean_fine):
    labels = arr(clean_fine.labels)
    inside = interior(labels, T.CORTICAL_BONE)
    muscle = interior(labels, T.MUSCLE)
    for echo in clean_fine.mri:
        assert _median(echo, inside) < 0.05 * _median(echo, muscle)


def test_signal_decays_with_echo_time_as_t2star(clean_fine):
    """Disc (no fat): each echo's signal is exp(-TE/T2*) of the first, exactly, without noise."""
    labels = arr(clean_fine.labels)
    tes = clean_fine.params["echo_times_ms"]
    t2s = T.TISSUE_TABLE[T.DISC].t2star_ms[3.0]
    disc = interior(labels, T.DISC)
    ratio = arr(clean_fine.mri[1])[disc] / arr(clean_fine.mri[0])[disc]
    assert np.allclose(ratio, math.exp(-(tes[1] - tes[0]) / t2s), rtol=1e-4)
    for label in (T.DISC, T.CSF):
        inside = interior(labels, label)
        values = [_median(echo, inside) for echo in clean_fine.mri]
        assert values[0] > values[1] > values[2], TISSUES[label]


def test_muscle_signal_decays_over_in_phase_echoes():
    # At 3 T fat and water are in phase about every 2.3 ms; muscle's signal falls from echo to echo.
    p = make_phantom(1, **SMALL, echo_times_ms=[2.3, 4.6, 6.9], mri_noise=False, bias_field=False)
    muscle = interior(arr(p.labels), T.MUSCLE)
    values = [_median(echo, muscle) for echo in p.mri]
    assert values[0] > values[1] > values[2]
    assert p.params["echo_times_ms"] == [2.3, 4.6, 6.9]


def test_fat_is_bright(small_phantom, clean_small):
    # T1-weighted: in the (near) in-phase echoes fat is the brightest tissue by far.
    labels = arr(clean_small.labels)
    fat = interior(labels, T.SUBCUTANEOUS_FAT)
    for echo in (clean_small.mri[0], clean_small.mri[2]):
        fat_signal = _median(echo, fat)
        for other in (T.MUSCLE, T.CSF, T.DISC, T.SOFT_TISSUE, T.TRABECULAR_BONE):
            assert fat_signal > 1.4 * _median(echo, interior(labels, other)), TISSUES[other]
    # With noise and bias field, fat stays brighter than muscle in every echo.
    labels = arr(small_phantom.labels)
    for echo in small_phantom.mri:
        assert _median(echo, interior(labels, T.SUBCUTANEOUS_FAT)) > 1.2 * _median(echo, interior(labels, T.MUSCLE))


def test_fat_water_chemical_shift_at_1_5_tesla():
    """At 1.5 T the default echoes are opposed / in / opposed phase: marrow (fat and water) dips out of phase."""
    p = make_phantom(0, **SMALL, field_strength=1.5, mri_noise=False, bias_field=False)
    assert p.params["echo_times_ms"] == DEFAULT_PROTOCOLS[1.5]["echo_times_ms"]
    marrow = interior(arr(p.labels), T.TRABECULAR_BONE)
    e1, e2 = _median(p.mri[0], marrow), _median(p.mri[1], marrow)
    assert e1 < 0.8 * e2
    # The signal model itself: pure fat at TE 0 is in phase, and water-fat cancel at the opposed echo.
    sig = TissueSignals(1.5, [2.3, 4.6], 12.0, 12.0)
    water_fat = [abs(s) for s in sig.signal(T.TRABECULAR_BONE, fat_fraction=0.5)]
    assert water_fat[0] < 0.5 * water_fat[1]


def test_rician_noise_level_in_air(small_phantom):
    """Background air holds pure noise: Rayleigh-distributed magnitude with mean sigma * sqrt(pi / 2)."""
    labels = arr(small_phantom.labels)
    far_air = ~ndimage.binary_dilation(labels != T.AIR, iterations=3)
    sigma = small_phantom.params["noise_sigma"]
    for echo in small_phantom.mri:
        assert np.mean(arr(echo)[far_air]) == pytest.approx(sigma * math.sqrt(math.pi / 2), rel=0.05)


def test_field_strengths_differ():
    a = make_phantom(0, **SMALL, field_strength=1.5)
    b = make_phantom(0, **SMALL, field_strength=3)
    assert a.params["field_strength_t"] == 1.5 and b.params["field_strength_t"] == 3.0
    assert a.params["tissue_table"]["3"]["t1_ms"] < b.params["tissue_table"]["3"]["t1_ms"]
    assert np.array_equal(arr(a.labels), arr(b.labels))  # the same anatomy
    assert not np.allclose(arr(a.mri[0]), arr(b.mri[0]))


# --- files, manifest -------------------------------------------------------------------------------------------


def test_manifest_is_complete_and_files_round_trip(small_phantom, tmp_path):
    path = write_phantom(small_phantom, tmp_path / "case")
    manifest = json.loads(path.read_text())
    for key in ("mri", "ct", "labels", "bone_labels", "tissues", "seed", "parameters", "echo_times_ms"):
        assert key in manifest, key
    assert manifest["mri"] == ["mri_echo1.nii.gz", "mri_echo2.nii.gz", "mri_echo3.nii.gz"]
    assert manifest["tissues"] == {str(k): v for k, v in TISSUES.items()}
    assert manifest["seed"] == 0
    params = manifest["parameters"]
    for key in (
        "echo_times_ms",
        "tr_ms",
        "flip_angle_deg",
        "field_strength_t",
        "snr",
        "mri_scale",
        "ct_noise_hu",
        "ct_blur_mm",
        "bias_coefficients",
        "n_vertebrae",
        "size",
        "spacing_mm",
        "anatomy",
        "tissue_table",
    ):
        assert key in params, key
    anatomy = params["anatomy"]
    for key in ("pose", "body", "spine", "vertebrae", "habitus", "lesion", "bowel_gas"):
        assert key in anatomy, key
    assert len(anatomy["vertebrae"]) == params["n_vertebrae"]

    case = load_case(path.parent)
    assert load_case(path) == case
    assert [p.name for p in case.mri_paths] == manifest["mri"]
    assert case.echo_times_ms == small_phantom.params["echo_times_ms"]
    for file, image in zip(
        [*case.mri_paths, case.ct_path, case.labels_path, case.bone_labels_path],
        [*small_phantom.mri, small_phantom.ct, small_phantom.labels, small_phantom.bone_labels],
    ):
        assert file.is_file()
        back = read_volume(file)
        assert np.array_equal(arr(back), arr(image))
        assert back.GetOrigin() == image.GetOrigin() and back.GetSpacing() == image.GetSpacing()
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".")]  # no temporary files left


def test_load_case_errors(tmp_path, small_phantom):
    with pytest.raises(VolumeReadError, match="No case manifest"):
        load_case(tmp_path / "nowhere")
    path = write_phantom(small_phantom, tmp_path / "case")
    (path.parent / "ct.nii.gz").unlink()
    with pytest.raises(VolumeReadError, match="ct.nii.gz"):
        load_case(path)
    path.write_text("{not json")
    with pytest.raises(VolumeReadError, match="Could not read the case manifest"):
        load_case(path)
    path.write_text(json.dumps({"mri": ["mri_echo1.nii.gz"]}))
    with pytest.raises(VolumeReadError, match="lacks the key"):
        load_case(path)


# --- bad input -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"size": (-64, 64, 48)}, "positive"),
        ({"size": (0, 64, 48)}, "positive"),
        ({"size": (64, 64)}, "three integers"),
        ({"size": (64.5, 64, 48)}, "three integers"),
        ({"spacing": 0.0}, "spacing must be positive"),
        ({"spacing": -1.0}, "spacing must be positive"),
        ({"field_strength": 2.0}, "Unknown field strength 2.0"),
        ({"field_strength": "high"}, "Unknown field strength"),
        ({"echo_times_ms": [2.0, 30.0]}, "shorter than TR"),
        ({"echo_times_ms": [-1.0]}, "echo_times_ms must be positive"),
        ({"flip_angle_deg": 120}, "flip_angle_deg"),
        ({"snr": 0}, "snr must be positive"),
        ({"lesion": "metal"}, "Unknown lesion type"),
        ({"n_vertebrae": 40}, "n_vertebrae=40 does not fit"),
        ({"colour": "blue"}, "Unknown phantom option"),
        ({"size": (100000, 1000, 1000)}, "at most"),
    ],
)
def test_bad_arguments_raise_clear_errors(kwargs, message):
    args = dict(SMALL)
    args.update(kwargs)
    with pytest.raises(InvalidParameterError, match=message):
        make_phantom(0, **args)


def test_bad_seed():
    with pytest.raises(InvalidParameterError, match="seed"):
        make_phantom(-1, **SMALL)


def test_unwritable_output_folder(small_phantom, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    with pytest.raises(VolumeWriteError, match="a_file"):
        write_phantom(small_phantom, blocker)
    with pytest.raises(VolumeWriteError, match="a_file"):
        write_phantom(small_phantom, blocker / "sub")
    assert blocker.read_text() == "x"


# --- progress and CLI ------------------------------------------------------------------------------------------


def test_progress_is_reported_and_monotonic():
    updates = []
    make_phantom(0, size=(32, 32, 24), spacing=4.0, progress=lambda f, stage="", message="": updates.append(f))
    assert updates[0] == 0.0 and updates[-1] == 1.0
    assert all(0 <= f <= 1 for f in updates)
    assert updates == sorted(updates)


def test_cancel_from_progress_stops_cleanly():
    from SyntheticCTLib.kernel.errors import Cancelled

    def cancel(fraction, stage="", message=""):
        if fraction > 0.3:
            raise Cancelled("stop")

    with pytest.raises(Cancelled):
        make_phantom(0, **SMALL, progress=cancel)


def test_cli_writes_a_case(tmp_path, capsys):
    from SyntheticCTLib.cli.main import main

    out = tmp_path / "phantom"
    code = main(
        [
            "phantom",
            str(out),
            "--seed",
            "3",
            "--size",
            "48",
            "48",
            "32",
            "--spacing",
            "2.5",
            "--field-strength",
            "1.5",
            "--progress",
            "json",
        ]
    )
    assert code == 0
    stdout = capsys.readouterr().out
    assert str(out / "case.json") in stdout
    progress = [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]
    assert progress and progress[-1]["fraction"] == 1.0
    case = load_case(out)
    assert case.manifest["seed"] == 3
    assert case.manifest["parameters"]["field_strength_t"] == 1.5
    ct = read_volume(case.ct_path)
    assert ct.GetSize() == (48, 48, 32) and ct.GetSpacing() == (2.5, 2.5, 2.5)
    # Same as the library with the same arguments.
    direct = make_phantom(3, size=(48, 48, 32), spacing=2.5, field_strength=1.5)
    assert np.array_equal(arr(ct), arr(direct.ct))


def test_cli_reports_bad_arguments(tmp_path, capsys):
    from SyntheticCTLib.cli.main import main

    assert main(["phantom", str(tmp_path / "x"), "--field-strength", "7", "--progress", "none"]) == 1
    assert "Unknown field strength 7" in capsys.readouterr().err
    assert main(["phantom", str(tmp_path / "y"), "--size", "-5", "64", "48", "--progress", "none"]) == 1
    assert "positive" in capsys.readouterr().err
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()
