"""The input check that the SyntheticCT module runs before inference: real SimpleITK volumes, dict cards.

A three-echo gradient-echo-like volume (an ellipsoid body with fat, muscle and a dark bone core, the
signal decaying with echo time) is the reference; its own statistics make the card, so it must pass
clean. Each test then changes one property and checks that exactly the matching warning appears.
"""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from SyntheticCTLib.synthesis.input_check import (
    body_mask,
    check_inputs,
    input_labels,
    input_statistics,
    obliquity_degrees,
    orientation_code,
)

SIZE = (48, 40, 32)  # x, y, z voxels
SPACING = (1.5, 1.5, 2.0)
ECHO_TIMES = (2.2, 6.0, 9.8)


def _echoes(seed: int = 0, scale: float = 1.0, spacing=SPACING, size=SIZE, direction=None) -> list:
    rng = np.random.default_rng(seed)
    z, y, x = np.meshgrid(*[np.arange(n) - (n - 1) / 2 for n in size[::-1]], indexing="ij")
    nz, ny, nx = [n / 2 for n in size[::-1]]
    r = np.sqrt((x / (0.8 * nx)) ** 2 + (y / (0.75 * ny)) ** 2 + (z / (0.9 * nz)) ** 2)
    # (proton density, T2* ms) per tissue: fat rim, muscle, dark cortical bone core.
    tissue = np.select([r < 0.25, r < 0.8, r < 1.0], [2, 1, 0], default=-1)
    pd = np.select([tissue == 0, tissue == 1, tissue == 2], [1.0, 0.7, 0.15], default=0.0)
    t2s = np.select([tissue == 0, tissue == 1, tissue == 2], [15.0, 28.0, 1.5], default=1.0)
    images = []
    for te in ECHO_TIMES:
        signal = 1000.0 * scale * pd * np.exp(-te / t2s) + scale * np.abs(rng.normal(0, 8.0, size=pd.shape))
        image = sitk.GetImageFromArray(signal.astype(np.float32))
        image.SetSpacing(spacing)
        image.SetOrigin((-30.0, -20.0, 10.0))
        if direction is not None:
            image.SetDirection(direction)
        images.append(image)
    return images


def _card(images, **overrides) -> dict:
    fov = [n * s for n, s in zip(images[0].GetSize(), images[0].GetSpacing())]
    card = {
        "name": "test-model",
        "inputs": [
            {"name": f"echo{i + 1}", "sequence": "MEGRE", "echo_time_ms": te} for i, te in enumerate(ECHO_TIMES)
        ],
        "spacing_mm": list(SPACING),
        "patch_size": [32, 32, 16],
        "orientation": "LPS",
        "training_data": {
            "spacing_mm": list(images[0].GetSpacing()),
            "fov_mm": fov,
            "input_statistics": input_statistics(images),
        },
    }
    card.update(overrides)
    return card


@pytest.fixture(scope="module")
def reference():
    return _echoes(seed=0)


@pytest.fixture(scope="module")
def card(reference):
    return _card(reference)


def _one(warnings, *words):
    assert len(warnings) == 1, warnings
    for word in words:
        assert word in warnings[0], warnings[0]
    return warnings[0]


def test_labels_come_from_the_card(card):
    assert input_labels(card) == ["echo 1 (TE 2.2 ms)", "echo 2 (TE 6 ms)", "echo 3 (TE 9.8 ms)"]
    assert input_labels({"inputs": ["T1w", {"label": "Dixon water"}, {}]}) == ["T1w", "Dixon water", "input 3"]


def test_matching_input_gives_no_warning(reference, card):
    assert check_inputs(reference, card) == []


def test_another_acquisition_of_the_same_kind_gives_no_warning(card):
    """Other noise, and a scanner scaling 1000x: the checks are scale-free, so nothing to report."""
    assert check_inputs(_echoes(seed=7, scale=1000.0), card) == []


def test_card_without_training_data_checks_what_it_can(reference):
    bare = {"inputs": [{"name": "a"}, {"name": "b"}, {"name": "c"}]}
    assert check_inputs(reference, bare) == []


def test_wrong_channel_count(reference, card):
    _one(check_inputs(reference[:2], card), "expects 3 input volumes", "echo 1 (TE 2.2 ms)", "2 were given")
    _one(check_inputs([], card), "No input volume")


def test_coarser_and_finer_voxels(card):
    coarse = _echoes(spacing=(3.0, 3.0, 4.0), size=(24, 20, 16))  # same field of view
    _one(check_inputs(coarse, card), "coarser", "3 x 3 x 4 mm")
    fine = _echoes(spacing=(0.5, 0.5, 0.8), size=(144, 120, 80))
    _one(check_inputs(fine, card), "finer")


def test_spacing_range_in_the_card(reference):
    card = _card(reference)
    card["training_data"]["spacing_mm"] = {"min": [0.8, 0.8, 1.0], "max": [1.6, 1.6, 3.0]}
    assert check_inputs(reference, card) == []
    coarse = _echoes(spacing=(3.0, 3.0, 4.0), size=(24, 20, 16))
    _one(check_inputs(coarse, card), "coarser", "0.8 x 0.8 x 1 mm to 1.6 x 1.6 x 3 mm")


def test_field_of_view(card):
    large = _echoes(size=(120, 100, 80))  # 2.5 times the training field of view
    _one(check_inputs(large, card), "field of view", "larger")
    small = _echoes(size=(20, 16, 12))
    warnings = check_inputs(small, card)
    assert any("much smaller" in w for w in warnings), warnings
    tiny = _echoes(size=(8, 8, 6))
    assert any("half the model's patch" in w for w in check_inputs(tiny, card))


def test_oblique_and_flipped_volumes(card):
    angle = np.radians(20.0)
    c, s = np.cos(angle), np.sin(angle)
    oblique = _echoes(direction=(c, -s, 0.0, s, c, 0.0, 0.0, 0.0, 1.0))
    _one(check_inputs(oblique, card), "oblique", "20 degrees")
    flipped = _echoes(direction=(-1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0))
    # A model that runs on the input's own axes, trained on LPS volumes: a flipped input is worth a warning.
    on_input_axes = dict(card, orientation={"training": "LPS", "inference": "input"})
    _one(check_inputs(flipped, on_input_axes), "RPS", "LPS", "flipped")
    # A model whose inference flips every input to LPS (a plain code, as inference reads it): nothing to say.
    assert card["orientation"] == "LPS" and check_inputs(flipped, card) == []
    assert check_inputs(flipped, dict(card, orientation="input")) == []


def test_card_orientation_is_read_alike_by_the_inference_and_the_input_check():
    from SyntheticCTLib.models.package import card_orientation

    assert card_orientation({}) == (None, None)
    assert card_orientation({"orientation": "native"}) == (None, None)
    assert card_orientation({"orientation": "ras"}) == ("RAS", "RAS")
    assert card_orientation({"orientation": {"training": "LPS"}}) == ("LPS", None)
    assert card_orientation({"orientation": {"training": "LPS", "inference": "RAS"}}) == ("LPS", "RAS")
    for bad in ("LPX", "LLS", "LP", {"inference": "up"}):
        with pytest.raises(ValueError, match="expected 'input' or a 3-letter code"):
            card_orientation({"orientation": bad})


@pytest.mark.parametrize(
    "direction",
    [
        (1, 0, 0, 0, 1, 0, 0, 0, 1),
        (-1, 0, 0, 0, -1, 0, 0, 0, 1),
        (1, 0, 0, 0, 0, -1, 0, 1, 0),
        (0, 0, 1, 1, 0, 0, 0, 1, 0),
    ],
)
def test_orientation_code_agrees_with_simpleitk(direction):
    image = sitk.Image(4, 4, 4, sitk.sitkUInt8)
    image.SetDirection([float(v) for v in direction])
    assert orientation_code(image) == sitk.DICOMOrientImageFilter.GetOrientationFromDirectionCosines(
        image.GetDirection()
    )
    assert obliquity_degrees(image) == pytest.approx(0.0, abs=1e-9)


def test_swapped_echoes(reference, card):
    swapped = [reference[1], reference[0], reference[2]]
    _one(check_inputs(swapped, card), "different order")


def test_changed_contrast(reference, card):
    """Echo 2 with a structure at 8 times its median (say, a contrast agent): the contrast differs grossly."""
    array = sitk.GetArrayFromImage(reference[1]).astype(np.float64)
    p50 = input_statistics(reference)[1]["p50"]
    array[13:19, 15:25, 38:42] = 8.0 * p50  # in the bright fat rim: the median stays
    bright = sitk.GetImageFromArray(array.astype(np.float32))
    bright.CopyInformation(reference[1])
    _one(
        check_inputs([reference[0], bright, reference[2]], card),
        "echo 2 (TE 6 ms) volume's contrast differs",
        "brighter",
    )


def test_other_echo_times_change_the_decay(card):
    """Echo 3 at a much longer echo time: the order holds but the decay ratio is off."""
    longer = _echoes()
    array = sitk.GetArrayFromImage(longer[2]) * 0.4
    late = sitk.GetImageFromArray(array)
    late.CopyInformation(longer[2])
    _one(check_inputs([longer[0], longer[1], late], card), "echo 3 (TE 9.8 ms) volume's median", "echo times")


def test_negative_intensities(reference, card):
    phase = sitk.Cast(reference[0] - 600.0, sitk.sitkFloat32)
    warnings = check_inputs([phase, reference[1], reference[2]], card)
    assert any("negative intensities" in w for w in warnings), warnings


def test_inputs_on_different_grids(reference, card):
    other = sitk.Image(reference[1])
    other.SetOrigin((0.0, 0.0, 0.0))
    _one(check_inputs([reference[0], other, reference[2]], card), "echo 2 (TE 6 ms)", "voxel grid")


def test_body_mask_and_statistics(reference):
    mask = body_mask(reference)
    assert 0.2 < mask.mean() < 0.8  # the ellipsoid, not the air around it
    stats = input_statistics(reference, mask)
    assert [s["p50"] for s in stats] == sorted((s["p50"] for s in stats), reverse=True)  # decay with echo time
    assert all(s["p1"] <= s["p50"] <= s["p99"] for s in stats)


def test_phantom_cases_pass_against_each_others_statistics():
    """In-distribution data must not raise false alarms: two phantom seeds, one card."""
    from SyntheticCTLib import phantom

    a = phantom.make_phantom(1, size=(64, 64, 48), spacing=2.0)
    card = _card(a.mri)
    card["inputs"] = [{"name": f"echo{i + 1}"} for i in range(len(a.mri))]
    for seed in (2, 3):  # other habitus, texture and pose
        b = phantom.make_phantom(seed, size=(64, 64, 48), spacing=2.0)
        assert check_inputs(b.mri, card) == [], seed
    swapped = [b.mri[1], b.mri[0]] + list(b.mri[2:])
    assert any("different order" in w for w in check_inputs(swapped, card))


# -- what a channel is: each check tried on a real scan ----------------------------------------------------


def _bundled_card() -> dict:
    import json

    from SyntheticCTLib.models.catalog import resources_dir

    return json.loads((resources_dir() / "models" / "phantom-spine-megre" / "model.json").read_text())


def _real(real_data_dir, name: str) -> sitk.Image:
    from SyntheticCTLib.kernel.io import read_volume

    return read_volume(real_data_dir / name)


def test_the_same_real_mri_given_three_times_is_named(real_data_dir):
    mr = _real(real_data_dir, "mri/totalsegmentator_example_mr_sm.nii.gz")
    warnings = check_inputs([mr, mr, mr], _bundled_card())
    same = [w for w in warnings if "is the same image as" in w]
    assert len(same) == 3, warnings  # 2 = 1, 3 = 1, 3 = 2
    scaled = sitk.Cast(mr, sitk.sitkFloat32) * 2.5
    assert any("is the same image as" in w for w in check_inputs([sitk.Cast(mr, sitk.sitkFloat32), scaled], {}))


def test_a_real_ct_given_as_an_mri_is_named(real_data_dir):
    ct = _real(real_data_dir, "ct/totalsegmentator_example_ct.nii.gz")
    warnings = check_inputs([ct], {"inputs": [{"name": "echo1"}]})
    assert any("looks like a CT" in w for w in warnings), warnings


def test_a_label_map_given_as_echo_2_is_named(real_data_dir):
    mr = _real(real_data_dir, "mri/totalsegmentator_example_mr_sm.nii.gz")
    array = sitk.GetArrayFromImage(mr)
    labels = np.digitize(array, np.percentile(array, [50, 80, 95])).astype(np.uint8)
    label_map = sitk.GetImageFromArray(labels)
    label_map.CopyInformation(mr)
    warnings = check_inputs([mr, label_map, mr], _bundled_card())
    assert any("echo 2" in w and "label map" in w and "4 distinct values" in w for w in warnings), warnings


def test_an_8_bit_export_is_named(real_data_dir):
    t1 = _real(real_data_dir, "mri/niivue_chris_t1.nii.gz")
    assert t1.GetPixelID() == sitk.sitkUInt8
    warnings = check_inputs([t1], {"inputs": [{"name": "T1"}]})
    assert any("8-bit intensities" in w for w in warnings), warnings
    rgb = sitk.Compose(t1, t1, t1)
    assert any("3 values per voxel" in w for w in check_inputs([rgb], {"inputs": [{"name": "T1"}]}))


def test_thick_slices_and_coarse_abdominal_mr_are_named_against_the_bundled_card(real_data_dir):
    card = _bundled_card()
    post = _real(real_data_dir, "mri/pyradiomics_brain1_t1post.nrrd")  # 6.5 mm slices
    assert any("coarser" in w and "6.5" in w for w in check_inputs([post] * 3, card))
    abdomen = _real(real_data_dir, "mri/totalsegmentator_example_mr_sm.nii.gz")  # 3 mm
    assert any("coarser" in w for w in check_inputs([abdomen] * 3, card))


def test_real_scans_of_the_right_kind_raise_no_content_warning(real_data_dir):
    """The content checks stay quiet on a 16-bit real MRI: no CT, label-map, 8-bit or repeat warning."""
    mr = _real(real_data_dir, "mri/totalsegmentator_example_mr_sm.nii.gz")
    words = ("looks like a CT", "label map", "8-bit", "same image", "values per voxel")
    assert not [w for w in check_inputs([mr], {"inputs": [{"name": "T1"}]}) if any(x in w for x in words)]


def test_bundled_model_echoes_out_of_order_are_named():
    from SyntheticCTLib.phantom import make_phantom

    echoes = make_phantom(seed=901, size=(64, 64, 48), spacing=2.0).mri
    warnings = check_inputs(list(reversed(echoes)), _bundled_card())
    assert any("different order" in w for w in warnings), warnings


# -- every face checks before any model runs ---------------------------------------------------------------


def _write_echoes(tmp_path, echoes):
    paths = []
    for k, image in enumerate(echoes):
        path = tmp_path / f"echo{k + 1}.nrrd"
        sitk.WriteImage(image, str(path))
        paths.append(str(path))
    return paths


def test_the_command_line_warns_before_inference_in_the_stream_and_in_the_sct(tmp_path, capsys):
    import json

    from SyntheticCTLib.cli.main import main
    from SyntheticCTLib.phantom import make_phantom
    from SyntheticCTLib.synthesis.input_check import META_INPUT_WARNINGS

    echoes = make_phantom(seed=901, size=(48, 48, 32), spacing=2.5).mri
    paths = _write_echoes(tmp_path, [echoes[0], echoes[0], echoes[2]])  # echo 1 given twice
    out = tmp_path / "sct.nrrd"
    code = main(["synthesize", *[a for p in paths for a in ("-i", p)], "-o", str(out), "--progress", "json"])
    stdout = capsys.readouterr().out
    assert code == 0
    lines = [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]
    checks = [line for line in lines if line.get("stage") == "input check"]
    assert any("is the same image as" in c["message"] for c in checks)
    first_inference = next(
        i for i, line in enumerate(lines) if line.get("stage") not in ("input check", "reading", "model", "")
    )
    assert lines.index(checks[0]) < first_inference  # the warnings come before the model runs
    assert any("is the same image as" in w for w in lines[-1]["input_warnings"])
    assert "is the same image as" in sitk.ReadImage(str(out)).GetMetaData(META_INPUT_WARNINGS)


def test_strict_makes_a_warning_an_error_before_any_output(tmp_path, capsys):
    from SyntheticCTLib.cli.main import main
    from SyntheticCTLib.phantom import make_phantom

    echoes = make_phantom(seed=901, size=(48, 48, 32), spacing=2.5).mri
    paths = _write_echoes(tmp_path, list(reversed(echoes)))  # echoes out of order
    out = tmp_path / "sct.nrrd"
    code = main(
        ["synthesize", *[a for p in paths for a in ("-i", p)], "-o", str(out), "--strict", "--progress", "none"]
    )
    err = capsys.readouterr().err
    assert code == 1 and "--strict" in err and "different order" in err
    assert not out.exists()


def test_real_multi_echo_dicom_echoes_out_of_order_are_named(real_data_dir):
    """The Siemens 2-echo GRE: a card made from its echoes in TE order, then the echoes given reversed."""
    from SyntheticCTLib.kernel.dicom_series import read_echoes

    images, echo_times, _ids = read_echoes(real_data_dir / "mri_dicom" / "fmap_siemens" / "5_gre_field_mag")
    assert echo_times == sorted(echo_times) and len(images) == 2
    card = {
        "inputs": [{"name": f"echo{k + 1}", "echo_time_ms": te} for k, te in enumerate(echo_times)],
        "training_data": {"input_statistics": input_statistics(images)},
    }
    assert not [w for w in check_inputs(images, card) if "different order" in w]
    _one([w for w in check_inputs(list(reversed(images)), card) if "order" in w], "different order")
