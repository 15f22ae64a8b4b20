"""The uncertainty map is the per-voxel STANDARD DEVIATION of the flip test-time passes, in HU (hand-computed).

A network whose output is a ramp along z inside its input patch, ``r(z) = 0.01 * z``, is not
flip-equivariant along z and is along y and x. Over the two default passes (the identity, and all three
axes flipped) a voxel at patch-local ``z`` of a patch of depth ``D`` gets the values ``0.01 * z`` and
``0.01 * (D - 1 - z)`` (the flip along z flipped back). So, by hand:

- the sCT is the identity pass, ``0.01 * z`` (asking for the spread does not change the sCT),
- population variance ``0.01**2 * (2 z - (D - 1))**2 / 4``,
- standard deviation ``0.01 * |2 z - (D - 1)| / 2``.

With one patch covering the whole volume there is no blending, so these hold exactly per voxel.
"""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk
import torch

from SyntheticCTLib.kernel.masks import mri_body_mask
from SyntheticCTLib.models.architectures import build_network
from SyntheticCTLib.models.package import load_model_package, write_model_package
from SyntheticCTLib.synthesis.inference import Synthesizer
from SyntheticCTLib.synthesis.sliding_window import DEFAULT_TTA_FLIPS, SlidingWindow

STEP = 0.01


class ZRamp(torch.nn.Module):
    """Output ``STEP * z`` (patch-local z index), whatever the input: flipping z changes it, flipping y or x not."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = torch.arange(x.shape[2], dtype=x.dtype, device=x.device).view(1, 1, -1, 1, 1)
        return x[:, :1] * 0.0 + STEP * z


def hand_mean_and_std(depth: int):
    z = np.arange(depth, dtype=np.float64)
    identity = STEP * z
    std = STEP * np.abs(2 * z - (depth - 1)) / 2
    return identity, std


def test_window_spread_is_the_standard_deviation_of_the_flips():
    depth = 12
    volume = np.random.default_rng(0).normal(size=(1, depth, 10, 8)).astype(np.float32)
    result = SlidingWindow(ZRamp(), "cpu", batch_size=1).predict(volume, (depth, 10, 8), 0.5, flips=DEFAULT_TTA_FLIPS)
    assert result.n_run == 1
    mean, std = hand_mean_and_std(depth)
    np.testing.assert_allclose(result.output[0], np.broadcast_to(mean[:, None, None], (depth, 10, 8)), atol=1e-6)
    np.testing.assert_allclose(result.spread[0], np.broadcast_to(std[:, None, None], (depth, 10, 8)), atol=1e-6)
    # The standard deviation and the variance differ here by far more than the tolerance: z = 0 has std 0.055.
    assert abs(std[0] - std[0] ** 2) > 0.04


def test_synthesized_uncertainty_is_the_standard_deviation_in_hu(tmp_path):
    """Through :class:`Synthesizer` (model grid = input grid): spread in HU = scale x std; the sCT is the identity pass."""
    depth, ny, nx = 24, 36, 40
    torch.manual_seed(0)
    card = {
        "name": "ramp-test",
        "version": "0.0.1",
        "architecture": {"name": "unet3d", "kwargs": {"in_channels": 1, "depth": 1, "width": 2, "norm": "none"}},
        "inputs": [{"name": "echo1"}],
        "spacing_mm": [2.0, 2.0, 2.0],
        "normalization": [{"method": "percentile", "lower": 0.5, "upper": 99.5, "mask": "body"}],
        "output": {"scale": 1000.0, "offset": 0.0, "clip": [-1024, 3071]},
        "patch_size": [depth, ny, nx],
        "overlap": 0.5,
    }
    net = build_network("unet3d", **card["architecture"]["kwargs"])
    package = load_model_package(write_model_package(tmp_path / "ramp", card, net.state_dict()))
    y, x = np.mgrid[:ny, :nx]
    plane = (((x - nx / 2) / (0.4 * nx)) ** 2 + ((y - ny / 2) / (0.35 * ny)) ** 2 < 1) * 400.0
    rng = np.random.default_rng(1)
    mri = (np.broadcast_to(plane, (depth, ny, nx)) + rng.uniform(0, 5, (depth, ny, nx))).astype(np.float32)
    image = sitk.GetImageFromArray(mri)
    image.SetSpacing((2.0, 2.0, 2.0))

    result = Synthesizer(package, device="cpu", network=ZRamp()).run([image], tta=True)
    body = mri_body_mask([mri])
    assert body.sum() > 0.3 * body.size
    mean, std = hand_mean_and_std(depth)
    expected_spread = np.broadcast_to((1000.0 * std)[:, None, None], body.shape)
    spread = sitk.GetArrayFromImage(result.uncertainty)
    np.testing.assert_allclose(spread[body], expected_spread[body], rtol=1e-5, atol=1e-3)
    assert (spread[~body] == 0).all()
    expected_sct = np.broadcast_to((1000.0 * mean)[:, None, None], body.shape)  # x.5 HU: int16 rounds either way
    assert np.abs(sitk.GetArrayFromImage(result.image)[body] - expected_sct[body]).max() <= 0.5 + 1e-3
    plain = Synthesizer(package, device="cpu", network=ZRamp()).run([image])
    assert plain.uncertainty is None
    np.testing.assert_array_equal(sitk.GetArrayFromImage(plain.image), sitk.GetArrayFromImage(result.image))
