"""Distributed training: a 2-process `torchrun` CPU run (gloo) completes, its ranks end with identical weights,
and together they train as one process with the same global batch does."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import yaml

from SyntheticCTLib.phantom import make_phantom, write_phantom
from SyntheticCTLib.training.export import state_dict_sha256
from SyntheticCTLib.training.loop import train


def config(cases: Path, out: Path, batch_size: int) -> dict:
    return {
        "output_dir": str(out),
        "seed": 11,
        "data": {"case_folders": [str(cases)], "validation_cases": ["seed3"], "spacing_mm": 2.0},
        # Instance norm: the loss of a batch split across ranks equals the loss of the whole batch in one process.
        "model": {
            "name": "ddp-test",
            "architecture": "unet3d",
            "kwargs": {"depth": 2, "width": 4, "norm": "instance"},
            "patch_size": [16, 24, 24],
        },
        "training": {
            "patch_size": [16, 24, 24],
            "batch_size": batch_size,
            "epochs": 2,
            "steps_per_epoch": 3,
            "learning_rate": 0.005,
            "warmup_steps": 1,
            "checkpoint_every": 2,
            "num_threads": 1,
            "device": "cpu",
        },
        # Uniform voxel weights: the mean of the ranks' mean losses is the mean loss of the global batch.
        "loss": {"bone_weight": 0.0, "gradient_weight": 0.0, "background_weight": 1.0},
    }


def test_torchrun_two_processes_end_with_identical_weights(tmp_path, torchrun):
    cases = tmp_path / "cases"
    for seed in (1, 2, 3):
        write_phantom(make_phantom(seed, size=(48, 48, 32), spacing=2.0), cases / f"seed{seed}")
    config_path = tmp_path / "ddp.yaml"
    config_path.write_text(yaml.safe_dump(config(cases, tmp_path / "ddp", batch_size=1)))

    proc = torchrun(["train", "--config", config_path, "--progress", "none"], timeout=600, cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-4000:]

    out = tmp_path / "ddp"
    summary = json.loads((out / "training_summary.json").read_text())
    checksums = summary["rank_weight_sha256"]
    assert len(checksums) == 2 and checksums[0] == checksums[1]
    last = torch.load(str(out / "checkpoints" / "last.pt"), map_location="cpu", weights_only=True)
    assert last["step"] == 6 and last["world_size"] == 2
    assert state_dict_sha256(last["model"]) == checksums[0]
    card = json.loads((out / "model" / "model.json").read_text())
    assert card["training_data"]["world_size"] == 2 and card["training_data"]["global_batch"] == 2
    assert summary["history"][-1]["val_mae_hu"] > 0  # rank 0 validated while rank 1 waited
    # Only rank 0 wrote logs: one line per epoch in train.log, not two.
    log = (out / "train.log").read_text()
    assert log.count("Epoch 2/2 (step 6)") == 1

    # Two ranks with one patch each train as one process with the global batch of two (same samples, averaged
    # gradients), up to floating-point summation order.
    single_path = tmp_path / "single.yaml"
    single_path.write_text(yaml.safe_dump(config(cases, tmp_path / "single", batch_size=2)))
    torch.set_num_threads(1)
    single = train(single_path)
    reference = torch.load(str(single.output_dir / "checkpoints" / "last.pt"), map_location="cpu", weights_only=True)
    for key, value in reference["model"].items():
        assert torch.allclose(value, last["model"][key], rtol=1e-4, atol=1e-5), key
