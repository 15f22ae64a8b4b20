"""Echo times and field strength against the protocols a model was trained on (issue 16).

A 1.5 T phantom (TE 2.3/4.6/6.9 ms) given to a 3 T model (TE 2.2/3.4/4.6 ms) made a confidently wrong
synthetic CT and nothing warned: NIfTI inputs' echo times were never looked at. Here real phantoms (small:
48 x 48 x 32 at 2 mm), real NIfTI files with dcm2niix-style JSON sidecars, a real tiny model package, the
command line and ``syntheticct evaluate``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from SyntheticCTLib.kernel.acquisition import (
    Acquisition,
    acquisition_for_files,
    echo_time_differs,
    echo_time_warnings,
    field_strength_differs,
    read_sidecar,
)
from SyntheticCTLib.kernel.errors import VolumeReadError
from SyntheticCTLib.kernel.io import read_volume
from SyntheticCTLib.models.package import ModelPackageError, card_protocols, validate_card
from SyntheticCTLib.synthesis.input_check import META_INPUT_WARNINGS, check_acquisition, check_inputs

SIZE = (48, 48, 32)
SPACING = 2.0
TE_3T = [2.2, 3.4, 4.6]  # the phantom's default protocols (phantom/mri.py)
TE_15T = [2.3, 4.6, 6.9]
PROTOCOL_3T = {"field_strength_t": 3.0, "echo_times_ms": TE_3T, "tr_ms": 10.0, "flip_angle_deg": 15.0}
PROTOCOL_15T = {"field_strength_t": 1.5, "echo_times_ms": TE_15T, "tr_ms": 12.0, "flip_angle_deg": 15.0}
BUNDLED_CARD = (
    Path(__file__).resolve().parents[1] / "SyntheticCT/SyntheticCTLib/Resources/models/phantom-spine-megre/model.json"
)


def _card(*protocols, **extra) -> dict:
    """A tiny model's card (3 echoes at 2 mm); ``protocols`` go to ``training_data.protocols`` when given."""
    card = {
        "schema_version": 1,
        "name": "tiny-echoes",
        "version": "0.1.0",
        "architecture": {"name": "unet3d", "kwargs": {"depth": 2, "width": 4, "norm": "batch"}},
        "inputs": [{"name": f"echo{k}", "echo_time_ms": te, "field_strength_t": 3.0} for k, te in enumerate(TE_3T, 1)],
        "spacing_mm": [SPACING] * 3,
        "normalization": [{"method": "percentile", "lower": 0.5, "upper": 99.5}] * 3,
        "output": {"scale": 1000.0, "offset": 0.0, "clip": [-1024.0, 3071.0]},
        "patch_size": [16, 24, 24],
        "overlap": 0.25,
    }
    if protocols:
        card["training_data"] = {"protocols": [dict(p) for p in protocols]}
    card.update(extra)
    return card


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory) -> dict:
    """Two phantom cases, one at 3 T and one at 1.5 T (each with the scanner's default protocol)."""
    from SyntheticCTLib.phantom import make_phantom, write_phantom

    root = tmp_path_factory.mktemp("acq")
    folders = {}
    for name, field in (("p3t", 3.0), ("p15t", 1.5)):
        phantom = make_phantom(31, size=SIZE, spacing=SPACING, field_strength=field)
        folders[name] = write_phantom(phantom, root / "cases" / name).parent
    return folders


def _files(folder: Path) -> list:
    return [folder / f"mri_echo{k}.nii.gz" for k in (1, 2, 3)]


def _read(folder: Path) -> list:
    return [read_volume(p) for p in _files(folder)]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    """A tiny untrained model package whose card lists one protocol: 3 T, TE 2.2/3.4/4.6 ms."""
    import torch

    from SyntheticCTLib.models.architectures import build_network
    from SyntheticCTLib.models.package import write_model_package

    torch.manual_seed(0)
    network = build_network("unet3d", in_channels=3, depth=2, width=4, norm="batch")
    card = _card(PROTOCOL_3T)
    del card["schema_version"]
    return write_model_package(tmp_path_factory.mktemp("model") / "tiny", card, network.state_dict())


# -- the rule ----------------------------------------------------------------------------------------------


def test_one_rule_for_echo_times_and_field_strength_by_hand():
    # |dTE| > max(0.5 ms, 20 % of the card's TE): 2.2 -> 0.5 ms; 10 -> 2 ms.
    assert not echo_time_differs(2.7, 2.2) and echo_time_differs(2.71, 2.2) and echo_time_differs(1.69, 2.2)
    assert not echo_time_differs(12.0, 10.0) and echo_time_differs(12.01, 10.0)
    # Field strength: 10 % of the card's; Siemens' 2.89 T is 3 T, 1.5 T is not.
    assert not field_strength_differs(2.89, 3.0) and field_strength_differs(1.5, 3.0)
    assert not field_strength_differs(1.494, 1.5) and field_strength_differs(3.0, 1.5)
    # The DICOM path's per-echo lines are the same rule.
    assert echo_time_warnings([2.3, 4.6, 6.9], TE_3T) == [
        "Echo 2 has TE 4.6 ms where the model was trained with TE 3.4 ms.",
        "Echo 3 has TE 6.9 ms where the model was trained with TE 4.6 ms.",
    ]
    from SyntheticCTLib.kernel import dicom_series

    assert dicom_series.echo_time_warnings is echo_time_warnings


def test_card_protocols_from_the_list_or_from_the_inputs():
    assert card_protocols(_card(PROTOCOL_15T, PROTOCOL_3T)) == [PROTOCOL_15T, PROTOCOL_3T]
    # A card without a protocols list (the bundled one as it was): its inputs' echo times and field strength.
    bundled = json.loads(BUNDLED_CARD.read_text(encoding="utf-8"))
    bundled["training_data"].pop("protocols", None)
    assert card_protocols(bundled) == [{"field_strength_t": 3.0, "echo_times_ms": TE_3T}]
    assert card_protocols({"inputs": [{"name": "T1"}]}) == []
    weights = [{"file": "model.safetensors", "sha256": "0" * 64}]
    with pytest.raises(ModelPackageError, match=r"protocols\[0\]\.echo_times_ms must list 3 echo time"):
        validate_card(_card({"field_strength_t": 3.0, "echo_times_ms": [2.2, 3.4]}, weights=weights))
    with pytest.raises(ModelPackageError, match=r"protocols\[1\]\.field_strength_t must be a finite number"):
        validate_card(_card(PROTOCOL_3T, {"field_strength_t": "3T", "echo_times_ms": TE_3T}, weights=weights))
    valid = validate_card(_card(PROTOCOL_15T, PROTOCOL_3T, weights=weights))
    assert valid["training_data"]["protocols"][0] == PROTOCOL_15T


# -- the check ----------------------------------------------------------------------------------------------


def test_a_15t_phantom_against_a_3t_only_card_warns_and_names_both(phantoms):
    acquisition = acquisition_for_files(_files(phantoms["p15t"]))  # the phantom's case.json beside its files
    assert acquisition.echo_times_ms == TE_15T and acquisition.field_strength_t == 1.5
    assert acquisition.source == str(phantoms["p15t"] / "case.json")
    for card in (_card(PROTOCOL_3T), _card()):  # a protocols list, or the inputs' echo times (fallback)
        warnings = check_inputs(_read(phantoms["p15t"]), card, acquisition=acquisition)
        first = warnings[0]  # the acquisition explains the rest: it comes first
        assert "TE 2.3, 4.6, 6.9 ms at 1.5 T" in first and "TE 2.2, 3.4, 4.6 ms at 3 T" in first
        assert "matches none of the protocols" in first and "may be wrong" in first and "case.json" in first
        # The headers say the echoes are in TE order: the medians differ because the echo times do.
        assert not any("different order" in w for w in warnings), warnings
    # The 3 T phantom fits its own protocol: no acquisition warning.
    acquisition = acquisition_for_files(_files(phantoms["p3t"]))
    assert acquisition.echo_times_ms == TE_3T and acquisition.field_strength_t == 3.0
    assert check_acquisition(acquisition, _card(PROTOCOL_3T)) == []
    assert not any("protocols" in w for w in check_inputs(_read(phantoms["p3t"]), _card(), acquisition=acquisition))


def test_a_card_of_both_field_strengths_accepts_both(phantoms):
    card = _card(PROTOCOL_15T, PROTOCOL_3T)
    for name in ("p15t", "p3t"):
        acquisition = acquisition_for_files(_files(phantoms[name]))
        warnings = check_inputs(_read(phantoms[name]), card, acquisition=acquisition)
        assert not any("protocols" in w for w in warnings), (name, warnings)
    # Echo times of one protocol at the other field strength fit neither.
    (warning,) = check_acquisition(Acquisition(TE_15T, 3.0, "test"), card)
    assert "TE 2.3, 4.6, 6.9 ms at 3 T" in warning


def test_short_echo_times_at_3t_are_warned_against_both_protocols():
    # 1.2 vs 2.2 ms: 1.0 ms off, over max(0.5, 0.44); against 1.5 T the field strength already differs.
    card = _card(PROTOCOL_15T, PROTOCOL_3T)
    (warning,) = check_acquisition(Acquisition([1.2, 2.4, 3.6], 3.0, "a sidecar"), card)
    assert "TE 1.2, 2.4, 3.6 ms at 3 T (from a sidecar)" in warning
    assert "TE 2.3, 4.6, 6.9 ms at 1.5 T; TE 2.2, 3.4, 4.6 ms at 3 T" in warning
    # Within the rule: 2.6/3.0/4.1 ms (0.4, 0.4, 0.5 ms off) at 2.89 T fits the 3 T protocol.
    assert check_acquisition(Acquisition([2.6, 3.0, 4.1], 2.89), card) == []
    # Field strength alone (a sidecar without EchoTime) is compared too; nothing known says nothing.
    assert check_acquisition(Acquisition([None, None, None], 7.0), card)
    assert check_acquisition(Acquisition([None, None, None], None), card) == []
    assert check_acquisition(None, card) == []


# -- NIfTI with a JSON sidecar (dcm2niix, BIDS) ------------------------------------------------------------------


def _with_sidecars(phantoms, folder: Path, echo_times_s, field_t=1.5) -> list:
    """The 1.5 T phantom's echoes as dcm2niix writes them: name_e1.nii.gz + name_e1.json (EchoTime in s)."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for k, (image, te) in enumerate(zip(_read(phantoms["p15t"]), echo_times_s), 1):
        path = folder / f"gre_e{k}.nii.gz"
        sitk.WriteImage(image, str(path))
        sidecar = {"Modality": "MR", "MagneticFieldStrength": field_t, "EchoNumber": k, "EchoTime": te}
        (folder / f"gre_e{k}.json").write_text(json.dumps(sidecar, indent=2), encoding="utf-8")
        paths.append(path)
    return paths


def test_a_nifti_with_a_dcm2niix_sidecar_is_checked(phantoms, tmp_path):
    paths = _with_sidecars(phantoms, tmp_path / "bids", [0.0023, 0.0046, 0.0069])
    acquisition = acquisition_for_files(paths)
    assert acquisition.echo_times_ms == TE_15T and acquisition.field_strength_t == 1.5
    assert "gre_e1.json" in acquisition.source
    (warning,) = check_acquisition(acquisition, _card(PROTOCOL_3T))
    assert "TE 2.3, 4.6, 6.9 ms at 1.5 T" in warning and "TE 2.2, 3.4, 4.6 ms at 3 T" in warning
    assert read_sidecar(tmp_path / "no_such.nii.gz") is None
    assert acquisition_for_files([tmp_path / "no_such.nii.gz"]) is None


def test_a_malformed_sidecar_is_a_clear_error_naming_it(phantoms, tmp_path):
    paths = _with_sidecars(phantoms, tmp_path / "bad", [0.0023, 0.0046, 0.0069])
    sidecar = tmp_path / "bad" / "gre_e2.json"
    sidecar.write_text('{"EchoTime": 0.0046,', encoding="utf-8")
    with pytest.raises(VolumeReadError, match=r"gre_e2\.json' of '.*gre_e2\.nii\.gz' is not valid JSON"):
        acquisition_for_files(paths)
    sidecar.write_text('{"EchoTime": 4.6}', encoding="utf-8")  # milliseconds where seconds belong
    with pytest.raises(VolumeReadError, match=r"gre_e2\.json' gives EchoTime 4\.6: .* in seconds"):
        acquisition_for_files(paths)
    sidecar.write_text("[0.0046]", encoding="utf-8")
    with pytest.raises(VolumeReadError, match=r"gre_e2\.json' .* must hold an object"):
        acquisition_for_files(paths)


# -- every face: the command line (--strict), the sCT's metadata, evaluate -----------------------------------


def test_the_command_line_warns_stamps_and_strict_refuses_with_the_reason(phantoms, tiny_model, tmp_path, capsys):
    from SyntheticCTLib.cli.main import main

    paths = _with_sidecars(phantoms, tmp_path / "in", [0.0023, 0.0046, 0.0069])
    args = [a for p in paths for a in ("-i", str(p))] + ["--model", str(tiny_model), "--device", "cpu"]
    refused = tmp_path / "refused.nrrd"
    assert main(["synthesize", *args, "-o", str(refused), "--strict", "--progress", "none"]) == 1
    err = capsys.readouterr().err
    assert "--strict" in err and "TE 2.3, 4.6, 6.9 ms at 1.5 T" in err and "TE 2.2, 3.4, 4.6 ms at 3 T" in err
    assert not refused.exists()
    out = tmp_path / "sct.nrrd"
    assert main(["synthesize", *args, "-o", str(out), "--progress", "none"]) == 0
    captured = capsys.readouterr()
    line = json.loads(captured.out.strip().splitlines()[-1])
    assert "TE 2.3, 4.6, 6.9 ms at 1.5 T" in line["input_warnings"][0]
    assert "matches none of the protocols" in captured.err  # the log
    assert "TE 2.3, 4.6, 6.9 ms at 1.5 T" in sitk.ReadImage(str(out)).GetMetaData(META_INPUT_WARNINGS)
    # The 3 T phantom's files, given one by one: their case.json speaks, and nothing is said.
    ok = tmp_path / "ok.nrrd"
    files = [a for p in _files(phantoms["p3t"]) for a in ("-i", str(p))]
    assert (
        main(["synthesize", *files, "--model", str(tiny_model), "-o", str(ok), "--strict", "--progress", "none"]) == 0
    )
    assert "protocols" not in sitk.ReadImage(str(ok)).GetMetaData(META_INPUT_WARNINGS)


def test_evaluate_records_the_input_warnings_per_case(phantoms, tiny_model, tmp_path):
    from SyntheticCTLib.apps.evaluation import evaluate, find_evaluation_cases

    cases = find_evaluation_cases([phantoms["p3t"].parent])
    assert [c.name for c in cases] == ["p15t", "p3t"]
    assert cases[0].acquisition.echo_times_ms == TE_15T and cases[0].acquisition.field_strength_t == 1.5
    result = evaluate(tiny_model, cases, tmp_path / "eval", baselines=False, images=False, device="cpu")
    document = json.loads((tmp_path / "eval" / "metrics.json").read_text(encoding="utf-8"))
    warned = {c["name"]: c["input_warnings"] for c in document["cases"]}
    assert "TE 2.3, 4.6, 6.9 ms at 1.5 T" in warned["p15t"][0] and "at 3 T" in warned["p15t"][0]
    assert not any("protocols" in w for w in warned["p3t"])
    assert result.input_warnings == warned
    assert np.isfinite(document["cases"][0]["metrics"]["model"]["mae_hu"])


def test_batch_synthesis_records_the_warning_and_strict_fails_only_that_case(phantoms, tiny_model, tmp_path, capsys):
    from SyntheticCTLib.cli.main import main

    out = tmp_path / "batch"
    cases = ["--case", str(phantoms["p15t"]), "--case", str(phantoms["p3t"])]
    options = ["--model", str(tiny_model), "--device", "cpu", "--progress", "none"]
    assert main(["synthesize", *cases, "-o", str(out), *options]) == 0
    warned = json.loads((out / "p15t.json").read_text(encoding="utf-8"))["input_warnings"]
    assert "TE 2.3, 4.6, 6.9 ms at 1.5 T" in warned[0] and "TE 2.2, 3.4, 4.6 ms at 3 T" in warned[0]
    assert not any(
        "protocols" in w for w in json.loads((out / "p3t.json").read_text(encoding="utf-8"))["input_warnings"]
    )
    capsys.readouterr()
    strict = tmp_path / "strict"
    assert main(["synthesize", *cases, "-o", str(strict), *options, "--strict"]) == 1
    records = {name: json.loads((strict / f"{name}.json").read_text(encoding="utf-8")) for name in ("p15t", "p3t")}
    assert records["p15t"]["status"] == "failed" and "at 1.5 T" in records["p15t"]["error"]
    assert records["p3t"]["status"] == "done"
