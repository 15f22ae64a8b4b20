"""Training: a tiny run lowers the loss and exports a package that loads, synthesizes and `models add` accepts;
`--resume` continues from the exact step; configuration errors are clear.

Small phantoms (48 x 48 x 32 at 2 mm) and a tiny U-Net keep each run to a few seconds.
"""

from __future__ import annotations

import copy
import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
import yaml

from SyntheticCTLib.cli.main import main
from SyntheticCTLib.kernel.errors import Cancelled
from SyntheticCTLib.phantom import make_phantom, write_phantom
from SyntheticCTLib.training.config import ConfigError, load_config
from SyntheticCTLib.training.loop import TrainingError, train

SIZE = (48, 48, 32)
SPACING = 2.0


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def cases(tmp_path_factory) -> Path:
    """Three small phantom cases: seed1 and seed2 to train, seed3 to validate."""
    root = tmp_path_factory.mktemp("cases")
    for seed in (1, 2, 3):
        write_phantom(make_phantom(seed, size=SIZE, spacing=SPACING), root / f"seed{seed}")
    return root


def base_config(cases: Path, out: Path, **changes) -> dict:
    config = {
        "output_dir": str(out),
        "seed": 7,
        "data": {"case_folders": [str(cases)], "validation_cases": ["seed3"], "spacing_mm": SPACING},
        "model": {
            "name": "tiny-test",
            "architecture": "unet3d",
            "kwargs": {"depth": 2, "width": 4, "norm": "batch"},
            "patch_size": [16, 24, 24],
            "overlap": 0.25,
        },
        "training": {
            "patch_size": [16, 24, 24],
            "batch_size": 2,
            "epochs": 2,
            "steps_per_epoch": 8,
            "learning_rate": 0.01,
            "warmup_steps": 2,
            "checkpoint_every": 3,
            "num_threads": 1,
        },
        "loss": {"bone_weight": 2.0, "gradient_weight": 0.5},
    }
    for key, value in changes.items():
        section, _, name = key.partition(".")
        if name:
            config[section][name] = value
        else:
            config[section] = value
    return config


def write_config(path: Path, config: dict) -> Path:
    path.write_text(yaml.safe_dump(config))
    return path


def body_mae(sct: sitk.Image, ct: sitk.Image, labels: sitk.Image) -> float:
    body = sitk.GetArrayFromImage(labels) > 0
    diff = sitk.GetArrayFromImage(sct).astype(float) - sitk.GetArrayFromImage(ct).astype(float)
    return float(np.abs(diff[body]).mean())


def fixed_batch_losses(config_path: Path, package_dir: Path):
    """The training loss on 16 fixed patches, with the initial and the trained weights (eval mode)."""
    from SyntheticCTLib.models.architectures import build_network
    from SyntheticCTLib.models.package import load_model_package
    from SyntheticCTLib.training.data import PatchSampler, collect_cases, prepare_cases
    from SyntheticCTLib.training.loop import make_batch
    from SyntheticCTLib.training.losses import SynthesisLoss

    config = load_config(config_path)
    config.augmentation.enabled = False
    train_specs, _ = collect_cases(config)
    sampler = PatchSampler(prepare_cases(config, train_specs), bone_fraction=0.5, seed=99, air_target=-1.0)
    image, target, body, bone, _air = make_batch(sampler, config, 0, range(16), "cpu")
    loss = SynthesisLoss(bone_weight=config.loss.bone_weight, gradient_weight=config.loss.gradient_weight)
    package = load_model_package(package_dir)
    torch.manual_seed(config.seed)  # the training's initialisation
    initial = build_network("unet3d", **package.card["architecture"]["kwargs"]).eval()
    trained = package.build_network("cpu")
    with torch.no_grad():
        return [float(loss(net(image), target, body, bone).total) for net in (initial, trained)]


def test_tiny_training_lowers_loss_and_exports_a_package_that_loads_and_synthesizes(cases, tmp_path, monkeypatch):
    from SyntheticCTLib.models.architectures import build_network
    from SyntheticCTLib.models.package import load_model_package, write_model_package
    from SyntheticCTLib.synthesis.inference import synthesize

    config_path = write_config(tmp_path / "train.yaml", base_config(cases, tmp_path / "run"))
    result = train(config_path)

    # The loss goes down: per epoch, and on one fixed set of training patches (no augmentation), where the trained
    # network's loss is well below that of the same network at its initialisation.
    assert len(result.history) == 2
    assert result.history[-1]["train_loss"] < result.history[0]["train_loss"]
    before, after = fixed_batch_losses(config_path, result.package_dir)
    assert after < 0.9 * before, (before, after)

    # Validation ran on the whole validation volume through the product's inference and compare.
    for row in result.history:
        assert math.isfinite(row["val_mae_hu"]) and row["val_mae_hu"] > 0
    assert result.best_epoch in (1, 2)

    # Files: per-epoch and per-step CSVs, the learning-curve PNG, the summary.
    out = tmp_path / "run"
    with open(out / "metrics.csv") as f:
        assert [int(r["epoch"]) for r in csv.DictReader(f)] == [1, 2]
    with open(out / "steps.csv") as f:
        assert [int(r["step"]) for r in csv.DictReader(f)] == list(range(1, 17))
    assert (out / "learning_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = json.loads((out / "training_summary.json").read_text())
    assert summary["train_cases"] == ["seed1", "seed2"] and summary["validation_cases"] == ["seed3"]

    # The package loads (weights verified) and carries the training facts.
    package = load_model_package(result.package_dir)
    card = package.card
    assert package.in_channels == 3 and package.spacing_mm == (SPACING,) * 3
    assert [i["echo_time_ms"] for i in card["inputs"]] == make_phantom(1, size=SIZE, spacing=SPACING).params[
        "echo_times_ms"
    ]
    stats = card["training_data"]["input_statistics"]
    assert len(stats) == 3 and all(s["p1"] <= s["p50"] <= s["p99"] for s in stats)
    assert card["training_data"]["spacing_mm"] == {"min": [SPACING] * 3, "max": [SPACING] * 3}
    assert card["training_data"]["fov_mm"]["min"] == [s * SPACING for s in SIZE]
    assert card["validation_metrics"]["epoch"] == result.best_epoch
    assert card["validation_metrics"]["mae_hu"] == pytest.approx(result.best_metrics["mae_hu"], abs=1e-3)

    # It synthesizes with the input's exact geometry, and better than the same network untrained.
    mri = [sitk.ReadImage(str(cases / "seed3" / f"mri_echo{k}.nii.gz")) for k in (1, 2, 3)]
    ct = sitk.ReadImage(str(cases / "seed3" / "ct.nii.gz"))
    labels = sitk.ReadImage(str(cases / "seed3" / "labels.nii.gz"))
    sct = synthesize(mri, package, device="cpu")
    assert sct.GetPixelID() == sitk.sitkInt16
    assert sct.GetSize() == mri[0].GetSize() and sct.GetOrigin() == mri[0].GetOrigin()
    torch.manual_seed(7)  # the training's initialisation
    untrained = build_network("unet3d", **card["architecture"]["kwargs"])
    plain = {k: v for k, v in card.items() if k not in ("weights", "network_data_format")}
    untrained_pkg = load_model_package(write_model_package(tmp_path / "untrained", plain, untrained.state_dict()))
    assert body_mae(sct, ct, labels) < 0.8 * body_mae(synthesize(mri, untrained_pkg, device="cpu"), ct, labels)

    # Fine-tuning: model.init_weights loads the package's weights (or refuses another architecture).
    from SyntheticCTLib.training.loop import load_initial_weights

    tune = load_config(
        write_config(
            tmp_path / "tune.yaml",
            base_config(cases, tmp_path / "tune", **{"model.init_weights": str(result.package_dir)}),
        )
    )
    fresh = build_network("unet3d", **card["architecture"]["kwargs"])
    info = load_initial_weights(fresh, tune)
    assert info["package"] == "tiny-test"
    # recorded as the configuration names it, relative to its folder (no machine's absolute path in a card)
    assert info["source"] == str(Path(result.package_dir).resolve().relative_to(tmp_path.resolve()))
    for key, value in package.load_state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value), key
    tune.model.kwargs = {"depth": 2, "width": 6, "norm": "batch"}
    with pytest.raises(TrainingError, match="not the configured"):
        load_initial_weights(build_network("unet3d", in_channels=3, **tune.model.kwargs), tune)

    # `syntheticct models add` accepts the package as it is.
    monkeypatch.setenv("SYNTHETICCT_HOME", str(tmp_path / "home"))
    assert main(["models", "add", str(result.package_dir), "--progress", "none"]) == 0
    from SyntheticCTLib.models.catalog import resolve_model

    assert resolve_model("tiny-test").card["weights"] == card["weights"]


def _weights(package_dir: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(package_dir / "model.safetensors"))


def test_resume_continues_from_the_exact_step(cases, tmp_path):
    base = base_config(cases, tmp_path / "a")
    base["data"]["validation_cases"] = []
    base["training"].update({"epochs": 2, "steps_per_epoch": 5, "checkpoint_every": 3})
    whole = train(write_config(tmp_path / "a.yaml", base))

    cut = copy.deepcopy(base)
    cut["output_dir"] = str(tmp_path / "b")
    config_b = write_config(tmp_path / "b.yaml", cut)

    def stop_after_step_7(fraction, stage, message=""):
        if stage == "train" and " step 7/" in message:
            raise Cancelled("interrupted for the test")

    with pytest.raises(Cancelled):
        train(config_b, progress=stop_after_step_7)
    checkpoint = torch.load(str(tmp_path / "b" / "checkpoints" / "last.pt"), map_location="cpu", weights_only=True)
    assert checkpoint["step"] == 7
    assert {int(s["step"]) for s in checkpoint["optimizer"]["state"].values()} == {7}  # AdamW's own step count
    assert checkpoint["scheduler"]["last_epoch"] == 7
    assert not (tmp_path / "b" / "model").exists()

    resumed = train(config_b, resume=True)
    assert resumed.steps == whole.steps == 10
    a, b = _weights(whole.package_dir), _weights(resumed.package_dir)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    with open(tmp_path / "b" / "steps.csv") as f:
        rows_b = list(csv.DictReader(f))
    with open(tmp_path / "a" / "steps.csv") as f:
        rows_a = list(csv.DictReader(f))
    assert [r["step"] for r in rows_b] == [str(s) for s in range(1, 11)]
    assert [r["loss"] for r in rows_b] == [r["loss"] for r in rows_a]

    # Resuming with another configuration, or with no checkpoint, is refused clearly.
    other = copy.deepcopy(cut)
    other["training"]["learning_rate"] = 0.02
    with pytest.raises(TrainingError, match="another configuration"):
        train(write_config(tmp_path / "b.yaml", other), resume=True)
    fresh = copy.deepcopy(base)
    fresh["output_dir"] = str(tmp_path / "c")
    with pytest.raises(TrainingError, match="no checkpoint"):
        train(write_config(tmp_path / "c.yaml", fresh), resume=True)


def _explicit_cases(cases: Path, n_channels: int = 3) -> list:
    return [
        {
            "name": f"p{seed}",
            "mri": [str(cases / f"seed{seed}" / f"mri_echo{k}.nii.gz") for k in range(1, n_channels + 1)],
            "ct": str(cases / f"seed{seed}" / "ct.nii.gz"),
        }
        for seed in (1, 2)
    ]


def test_config_errors_are_clear(cases, tmp_path, capsys):
    def error_of(config: dict) -> str:
        with pytest.raises(ConfigError) as info:
            load_config(write_config(tmp_path / "bad.yaml", config))
        message = str(info.value)
        assert "bad.yaml" in message
        return message

    good = base_config(cases, tmp_path / "run", data={"cases": _explicit_cases(cases), "spacing_mm": SPACING})
    assert load_config(write_config(tmp_path / "good.yaml", good)).data.cases[0].name == "p1"

    missing = copy.deepcopy(good)
    missing["data"]["cases"][1]["ct"] = str(tmp_path / "nowhere" / "ct.nii.gz")
    message = error_of(missing)
    assert "case 'p2'" in message and "nowhere/ct.nii.gz" in message and "not found" in message

    channels = copy.deepcopy(good)
    channels["model"]["kwargs"]["in_channels"] = 2
    message = error_of(channels)
    assert "in_channels is 2" in message and "3 MRI channel" in message

    uneven = copy.deepcopy(good)
    uneven["data"]["cases"][0]["mri"] = uneven["data"]["cases"][0]["mri"][:2]
    assert "different numbers of MRI channels" in error_of(uneven)

    unknown_arch = copy.deepcopy(good)
    unknown_arch["model"]["architecture"] = "vnet9"
    message = error_of(unknown_arch)
    assert "vnet9" in message and "unet3d" in message

    bad_kwarg = copy.deepcopy(good)
    bad_kwarg["model"]["kwargs"]["depht"] = 3
    assert "depht" in error_of(bad_kwarg)

    for section, key, value, expected in [
        ("training", "batch_size", 0, "training.batch_size must be an integer >= 1 (got 0)"),
        ("training", "learning_rate", -1, "training.learning_rate must be > 0"),
        ("training", "patch_size", [16, 24, 25], "must be divisible by 2"),
        ("training", "trainig_steps", 5, "unknown key(s) training.trainig_steps"),
        ("data", "align", "elastic", "data.align must be one of none, rigid, affine"),
        ("loss", "air_weight", -1, "loss.air_weight must be >= 0 (got -1)"),
    ]:
        config = copy.deepcopy(good)
        config.setdefault(section, {})[key] = value
        assert expected in error_of(config), (key, value)

    # Phantom folders: the channel count is checked against the architecture before training starts.
    folders = base_config(cases, tmp_path / "run2")
    folders["model"]["kwargs"]["in_channels"] = 1
    with pytest.raises(ConfigError, match="in_channels is 1"):
        train(write_config(tmp_path / "folders.yaml", folders))
    assert not (tmp_path / "run2" / "model").exists()

    # The command line: exit code 1 and one clear line on stderr.
    assert main(["train", "--config", str(tmp_path / "absent.yaml"), "--progress", "none"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("syntheticct train: error:") and "absent.yaml" in err[-1]


def test_patch_sampler_confines_centres_to_body_and_oversamples_bone_and_internal_air():
    from SyntheticCTLib.training.data import PatchSampler, PreparedCase

    shape = (20, 30, 30)
    body = np.zeros(shape, bool)
    body[2:18, 3:27, 3:27] = True
    bone = np.zeros(shape, bool)
    bone[8:12, 12:16, 12:16] = True
    air = np.zeros(shape, bool)
    air[4:6, 5:8, 5:8] = True
    case = PreparedCase(
        name="synthetic",
        mri=[],
        ct=None,
        image=np.zeros((2, *shape), np.float32),
        target=np.zeros(shape, np.float32),
        body=body,
        bone=bone,
        air=air,
    )
    counts = {"bone": 0, "air": 0, "other": 0}
    sampler = PatchSampler([case], bone_fraction=0.3, air_fraction=0.4, seed=1, air_target=-1.0)
    for i in range(500):
        patch = sampler.sample(sampler.rng(0, i), (8, 8, 8))
        centre = patch.centre
        assert body[centre]
        counts["bone" if bone[centre] else "air" if air[centre] else "other"] += 1
        assert patch.air[4, 4, 4] == float(air[centre])  # the internal-air crop travels with the patch
        # the patch's body mask is the case's, cropped around the centre
        assert patch.body[4, 4, 4] == 1.0 and patch.image.shape == (2, 8, 8, 8)
    assert 0.22 < counts["bone"] / 500 < 0.38 and 0.32 < counts["air"] / 500 < 0.48
    # The same (seed, epoch, index) gives the same patch, whatever was drawn before.
    assert sampler.sample(sampler.rng(3, 7), (8, 8, 8)).centre == sampler.sample(sampler.rng(3, 7), (8, 8, 8)).centre
    plain = PatchSampler([case], bone_fraction=0.0, seed=1, air_target=-1.0)
    share = np.mean([bone[plain.sample(plain.rng(0, i), (8, 8, 8)).centre] for i in range(300)])
    assert share < 0.05  # without oversampling, bone centres are as rare as bone (64 of 9216 body voxels)


def test_loss_weights_body_bone_and_internal_air_by_hand():
    from SyntheticCTLib.training.losses import SynthesisLoss

    # Four voxels: outside the body, body, bone, internal air; prediction error 1 each except 0.5 on air.
    body = torch.tensor([0.0, 1.0, 1.0, 1.0]).reshape(1, 1, 1, 1, 4)
    bone = torch.tensor([0.0, 0.0, 1.0, 0.0]).reshape(1, 1, 1, 1, 4)
    air = torch.tensor([0.0, 0.0, 0.0, 1.0]).reshape(1, 1, 1, 1, 4)
    target = torch.zeros(1, 1, 1, 1, 4)
    prediction = torch.tensor([1.0, 1.0, 1.0, 0.5]).reshape(1, 1, 1, 1, 4)
    loss = SynthesisLoss(bone_weight=2.0, background_weight=0.1, air_weight=3.0)
    # weights 0.1, 1, 3, 4: (0.1 + 1 + 3 + 4 * 0.5) / (0.1 + 1 + 3 + 4)
    assert float(loss(prediction, target, body, bone, air).total) == pytest.approx(6.1 / 8.1)
    assert float(loss(prediction, target, body, bone).total) == pytest.approx(4.6 / 5.1)  # no air mask: weight 1


def test_internal_air_is_the_gas_enclosed_by_tissue_not_the_air_around_the_body():
    """On a phantom with bowel gas, internal air is the gas label; the outside air along the skin is not."""
    from SyntheticCTLib.phantom import tissues
    from SyntheticCTLib.training.data import INTERNAL_AIR_HU, internal_air_mask

    phantom = make_phantom(3, size=(64, 64, 48), spacing=2.0, bowel_gas=True)
    hu = sitk.GetArrayFromImage(phantom.ct)
    labels = sitk.GetArrayFromImage(phantom.labels)
    gas = (labels == tissues.BOWEL_GAS) & (hu < INTERNAL_AIR_HU)
    assert gas.sum() > 20
    internal = internal_air_mask(hu)
    # Every gas voxel, and beyond them only partial-volume voxels of the pocket's wall (CT blurred below -400).
    from scipy import ndimage

    assert internal[gas].all()
    assert not internal[~ndimage.binary_dilation(labels == tissues.BOWEL_GAS)].any()
    assert not internal[labels == tissues.AIR].any()
    # A pocket cut by the top of the field of view is open in 3D but enclosed in its axial slices.
    cut = hu.copy()
    cut[:2][gas[:2].any(axis=0)[None].repeat(2, axis=0)] = -1000.0
    cut[0, 30:34, 30:34] = -1000.0
    cut_internal = internal_air_mask(cut)
    assert cut_internal[0, 30:34, 30:34].all() and not cut_internal[labels == tissues.AIR].any()


def test_ct_is_registered_to_the_mri_and_registration_outliers_are_flagged(cases, tmp_path):
    """A CT moved by a known rigid transform is brought back onto the MRI grid by `data.align: rigid`."""
    from SyntheticCTLib.training.data import flag_registration_outliers, prepare_cases

    source = cases / "seed1"
    ct = sitk.ReadImage(str(source / "ct.nii.gz"))
    move = sitk.Euler3DTransform()
    move.SetCenter(ct.TransformContinuousIndexToPhysicalPoint([(n - 1) / 2 for n in ct.GetSize()]))
    move.SetRotation(0.0, 0.0, np.deg2rad(6.0))
    move.SetTranslation((5.0, -4.0, 3.0))
    moved = sitk.Resample(ct, ct, move, sitk.sitkLinear, -1024.0, sitk.sitkFloat32)
    sitk.WriteImage(moved, str(tmp_path / "ct_moved.nii.gz"))
    config = base_config(
        cases,
        tmp_path / "run",
        data={
            "cases": [
                {
                    "name": "moved",
                    "mri": [str(source / f"mri_echo{k}.nii.gz") for k in (1, 2, 3)],
                    "ct": str(tmp_path / "ct_moved.nii.gz"),
                }
            ],
            "align": "rigid",
            "spacing_mm": SPACING,
        },
    )
    loaded = load_config(write_config(tmp_path / "align.yaml", config))
    (case,) = prepare_cases(loaded, loaded.data.cases)

    registration = case.info["registration"]
    assert math.isfinite(registration["metric_value"]) and registration["rigid"]["mode"] == "rigid"
    # The best any registration can do: the moved CT resampled back through the exact inverse transform (the same
    # two linear interpolations). The registered CT must come close to it, far closer than the moved CT was.
    ideal = sitk.GetArrayFromImage(sitk.Resample(moved, ct, move.GetInverse(), sitk.sitkLinear, -1024.0))
    body = sitk.GetArrayFromImage(sitk.ReadImage(str(source / "labels.nii.gz"))) > 0
    aligned = sitk.GetArrayFromImage(case.ct)
    before = np.abs(sitk.GetArrayFromImage(moved) - ideal)[body].mean()
    after = np.abs(aligned - ideal)[body].mean()
    assert after < 0.25 * before, (before, after)
    bone_ideal, bone_aligned = ideal > 200, aligned > 200
    dice = 2 * (bone_ideal & bone_aligned).sum() / (bone_ideal.sum() + bone_aligned.sum())
    assert dice > 0.85, dice

    # Outliers: a robust z-score of the (minimised) metric above the limit flags a case; too few cases flag none.
    metrics = {"a": -0.50, "b": -0.52, "c": -0.49, "d": -0.51, "e": -0.10}
    assert flag_registration_outliers(metrics, 3.5) == ["e"]
    assert flag_registration_outliers({"a": -0.5, "e": -0.1}, 3.5) == []


def test_export_lists_the_distinct_protocols_of_a_training_set_of_two_field_strengths(cases, tmp_path):
    """Two 3 T phantoms and one at 1.5 T: the card lists both protocols once each, with their number of cases."""
    from SyntheticCTLib.models.package import card_protocols, validate_card
    from SyntheticCTLib.training.data import collect_cases, prepare_cases
    from SyntheticCTLib.training.export import build_card, training_protocols

    write_phantom(make_phantom(4, size=SIZE, spacing=SPACING, field_strength=1.5), tmp_path / "at15" / "seed4")
    config = base_config(cases, tmp_path / "run")
    config["data"]["case_folders"].append(str(tmp_path / "at15"))
    loaded = load_config(write_config(tmp_path / "two.yaml", config))
    train_specs, _ = collect_cases(loaded)
    assert sorted(s.name for s in train_specs) == ["seed1", "seed2", "seed4"]
    card = build_card(loaded, prepare_cases(loaded, train_specs), manifests=[s.manifest for s in train_specs])
    # The phantom's protocols (phantom/mri.py): 1.5 T TE 2.3/4.6/6.9 ms TR 12 ms; 3 T TE 2.2/3.4/4.6 ms TR 10 ms.
    assert card["training_data"]["protocols"] == [
        {"field_strength_t": 1.5, "echo_times_ms": [2.3, 4.6, 6.9], "tr_ms": 12.0, "flip_angle_deg": 15.0, "cases": 1},
        {"field_strength_t": 3.0, "echo_times_ms": [2.2, 3.4, 4.6], "tr_ms": 10.0, "flip_angle_deg": 15.0, "cases": 2},
    ]
    card.update(schema_version=1, weights=[{"file": "model.safetensors", "sha256": "0" * 64}])
    assert [p["field_strength_t"] for p in card_protocols(validate_card(card))] == [1.5, 3.0]
    # One's own cases: what the manifest gives, rounded (0.01 ms, 0.1 T) and deduplicated; none known, no list.
    own = [
        {"mri": ["a.nii.gz"] * 3, "echo_times_ms": [2.2000001, 3.4, 4.6], "field_strength_t": 2.89},
        {"mri": ["b.nii.gz"] * 3, "echo_times_ms": [2.2, 3.4, 4.5999], "field_strength_t": 2.9},
        {"mri": ["c.nii.gz"] * 3, "echo_times_ms": [2.2, 3.4]},  # not one per channel: left out
        {"mri": ["d.nii.gz"] * 3},
    ]
    assert training_protocols(own, 3) == [{"field_strength_t": 2.9, "echo_times_ms": [2.2, 3.4, 4.6], "cases": 2}]
    assert training_protocols([{"mri": ["d.nii.gz"]}], 3) == []
