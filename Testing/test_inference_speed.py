"""Faster inference, same result: the accelerated network, skipped outside-body patches, batched test-time flips.

Every test compares against the plain computation on a real network (the bundled model's architecture
and weights where it matters: batch norm, width 12, depth 3).
"""

from __future__ import annotations

import logging

import numpy as np
import SimpleITK as sitk
import torch

from SyntheticCTLib.models.architectures import build_network, fold_batch_norm
from SyntheticCTLib.models.package import load_model_package, write_model_package
from SyntheticCTLib.synthesis.inference import Synthesizer
from SyntheticCTLib.synthesis.sliding_window import DEFAULT_TTA_FLIPS, SlidingWindow

torch.set_num_threads(1)


def _bundled_package():
    from pathlib import Path

    import SyntheticCTLib

    folder = Path(SyntheticCTLib.__file__).parent / "Resources" / "models" / "phantom-spine-megre"
    return load_model_package(folder)


def _volume(shape=(3, 40, 56, 48), seed=0):
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def test_fold_batch_norm_equals_the_network_and_leaves_it_unchanged():
    torch.manual_seed(0)
    net = build_network("unet3d", in_channels=2, depth=2, width=4, norm="batch", residual=True)
    for m in net.modules():  # statistics far from the identity, as after training
        if isinstance(m, torch.nn.BatchNorm3d):
            m.running_mean.uniform_(-2, 2)
            m.running_var.uniform_(0.1, 5)
            m.weight.data.uniform_(0.5, 2)
            m.bias.data.uniform_(-1, 1)
    net.eval()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    folded = fold_batch_norm(net)
    assert not any(isinstance(m, torch.nn.BatchNorm3d) for m in folded.modules())
    # Three blocks (2 encoders, 1 decoder), each with 2 norms and a projection skip's norm.
    assert sum(isinstance(m, torch.nn.BatchNorm3d) for m in net.modules()) == 9
    x = torch.from_numpy(_volume((2, 2, 16, 16, 16)))
    with torch.inference_mode():
        a, b = net(x), folded(x)
    np.testing.assert_allclose(b.numpy(), a.numpy(), atol=1e-4 * float(a.abs().max()))
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())


def test_accelerated_equals_eager_with_the_bundled_weights(caplog):
    """The bundled model (batch norm) on a small volume: accelerated vs eager, in HU (scale 1000)."""
    package = _bundled_package()
    volume = _volume()
    with caplog.at_level(logging.INFO, logger="SyntheticCTLib.synthesis.sliding_window"):
        fast = SlidingWindow(package.build_network("cpu"), "cpu").predict(volume, (32, 32, 32), 0.25)
    assert "accelerated (15 batch norm(s) folded into convolutions, channels-last 3D)" in caplog.text
    eager = SlidingWindow(package.build_network("cpu"), "cpu", accelerate=False).predict(volume, (32, 32, 32), 0.25)
    assert (fast.path, eager.path) == ("accelerated", "eager")
    diff_hu = np.abs(fast.output - eager.output) * float(package.output["scale"])
    assert diff_hu.mean() < 0.01 and diff_hu.max() < 0.1  # measured: mean 5e-4 HU, max 5e-3 HU


class ViewsItsInput(torch.nn.Module):
    """A real network whose ``view`` refuses a channels-last tensor (as some custom layers do)."""

    size_multiple = 1

    def __init__(self):
        super().__init__()
        torch.manual_seed(4)
        self.conv = torch.nn.Conv3d(1, 2, 3, padding=1)

    def forward(self, x):
        y = self.conv(x)
        return y.view(y.shape[0], -1).view(y.shape)


def test_a_failing_accelerated_network_gives_way_to_the_eager_one(caplog):
    net = ViewsItsInput()
    volume = _volume((1, 20, 20, 20))
    with caplog.at_level(logging.WARNING):
        result = SlidingWindow(net, "cpu").predict(volume, (16, 16, 16), 0.5)
    eager = SlidingWindow(net, "cpu", accelerate=False).predict(volume, (16, 16, 16), 0.5)
    assert "continuing with the eager one" in caplog.text and result.path == "eager"
    np.testing.assert_array_equal(result.output, eager.output)


def _tiny_package(tmp_path, norm="batch"):
    torch.manual_seed(0)
    kwargs = {"in_channels": 2, "depth": 2, "width": 4, "norm": norm}
    card = {
        "name": "tiny-speed",
        "version": "0.0.1",
        "architecture": {"name": "unet3d", "kwargs": kwargs},
        "inputs": [{"name": "echo1"}, {"name": "echo2"}],
        "spacing_mm": [2.0, 2.0, 2.0],
        "normalization": [{"method": "percentile", "lower": 0.5, "upper": 99.5, "mask": "body"}] * 2,
        "output": {"scale": 1000.0, "offset": 0.0, "clip": [-1024, 3071]},
        "patch_size": [16, 16, 16],
        "overlap": 0.5,
    }
    return load_model_package(
        write_model_package(tmp_path / "tiny", card, build_network("unet3d", **kwargs).state_dict())
    )


def _head_in_air(shape=(32, 64, 64), seed=0):
    """A ball of tissue in a field of air (noise only): most patches hold no body voxel."""
    z, y, x = np.mgrid[: shape[0], : shape[1], : shape[2]].astype(np.float32)
    ball = ((z - 14) / 7) ** 2 + ((y - 20) / 8) ** 2 + ((x - 22) / 8) ** 2 < 1
    rng = np.random.default_rng(seed)
    images = []
    for k in range(2):
        a = np.abs(np.where(ball, 400.0 / (k + 1), 0.0) + rng.normal(0, 4, shape)).astype(np.float32)
        im = sitk.GetImageFromArray(a)
        im.SetSpacing((2.0, 2.0, 2.0))
        images.append(im)
    return images


def test_skipping_the_patches_outside_the_body_gives_the_same_synthetic_ct(tmp_path):
    package = _tiny_package(tmp_path)
    images = _head_in_air()
    skipped = Synthesizer(package, device="cpu", window={"batch_size": 1}).run(images)
    full = Synthesizer(package, device="cpu", window={"batch_size": 1, "skip_empty": False}).run(images)
    assert skipped.n_run < 0.5 * skipped.n_patches and full.n_run == full.n_patches
    a, b = sitk.GetArrayFromImage(skipped.image), sitk.GetArrayFromImage(full.image)
    np.testing.assert_array_equal(a, b)


class SequentialFlips(SlidingWindow):
    """One network pass per flip; the first flip's prediction and the variance by Welford's update."""

    def _forward(self, x, flips, per_call):
        first = mean = m2 = None
        for k, flip in enumerate(flips):
            dims = tuple(2 + a for a in flip)
            y = self.network(torch.flip(x, dims) if dims else x).float()
            y = torch.flip(y, dims) if dims else y
            if mean is None:
                first, mean, m2 = y, y.clone(), torch.zeros_like(y)
            else:
                delta = y - mean
                mean += delta / (k + 1)
                m2 += delta * (y - mean)
        return first, m2 / len(flips)


class Counting(torch.nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner, self.calls, self.inputs = inner, 0, 0
        self.size_multiple = inner.size_multiple

    def forward(self, x):
        self.calls += 1
        self.inputs += x.shape[0]
        return self.inner(x)


def test_batched_flips_equal_sequential_passes_in_one_call_per_batch(tmp_path):
    package = _bundled_package()
    volume = _volume((3, 16, 32, 32), seed=2)
    old = SequentialFlips(package.build_network("cpu"), "cpu", batch_size=2, accelerate=False).predict(
        volume, (16, 24, 24), 0.5, flips=DEFAULT_TTA_FLIPS
    )
    counting = Counting(package.build_network("cpu"))
    new = SlidingWindow(counting, "cpu", batch_size=8, accelerate=False).predict(
        volume, (16, 24, 24), 0.5, flips=DEFAULT_TTA_FLIPS
    )
    # batch_size counts network inputs: 4 patches x 2 flips in one call per batch.
    assert len(DEFAULT_TTA_FLIPS) == 2
    assert new.batch_size == 4 and counting.calls == int(np.ceil(new.n_run / 4)) and counting.inputs == 2 * new.n_run
    lean = Counting(package.build_network("cpu"))
    same = SlidingWindow(lean, "cpu", batch_size=2, accelerate=False).predict(
        volume, (16, 24, 24), 0.5, flips=DEFAULT_TTA_FLIPS
    )
    assert lean.calls == new.n_run and lean.inputs == 2 * new.n_run  # 1 patch x 2 flips per call: memory as before
    np.testing.assert_allclose(same.spread, new.spread, atol=1e-6)
    scale = float(package.output["scale"])
    assert np.abs(new.output - old.output).max() * scale < 1e-2  # HU
    assert np.abs(new.spread - old.spread).max() * scale < 1e-2
    assert new.spread.mean() * scale > 1.0  # a real spread, not zeros on both sides
    fast = SlidingWindow(package.build_network("cpu"), "cpu", batch_size=2).predict(
        volume, (16, 24, 24), 0.5, flips=DEFAULT_TTA_FLIPS
    )
    assert np.abs(fast.spread - old.spread).max() * scale < 0.1
