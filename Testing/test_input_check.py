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
