"""Inference: normalisation, body mask, sliding window, geometry, errors, cancellation, OOM handling, devices.

Every test runs a real (tiny, seeded) UNet3D from a real model package on the CPU.
"""

from __future__ import annotations

import logging

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from scipy import ndimage

from SyntheticCTLib import NOT_FOR_DIAGNOSTIC_USE
from SyntheticCTLib.kernel.errors import Cancelled, InvalidParameterError
from SyntheticCTLib.kernel.geometry import resample_like
from SyntheticCTLib.kernel.masks import mri_body_mask
from SyntheticCTLib.kernel.progress import CancelToken
from SyntheticCTLib.models.architectures import build_network
from SyntheticCTLib.models.package import load_model_package, write_model_package
from SyntheticCTLib.synthesis.inference import (
    META_DEVICE,
    META_MODEL,
    Synthesizer,
    WindowSettings,
    select_device,
    synthesize,
    synthesize_with_uncertainty,
)
from SyntheticCTLib.synthesis.normalization import channel_normalization, normalize_channels
from SyntheticCTLib.synthesis.sliding_window import (
    OutOfMemory,
    SlidingWindow,
    estimate_patch_bytes,
    sliding_window_predict,
)

torch.set_num_threads(1)

KWARGS = {"depth": 2, "width": 4, "norm": "none"}


def make_package(folder, *, in_channels=2, spacing=(2.0, 2.0, 2.0), patch=(16, 32, 32), orientation="input", seed=0):
    torch.manual_seed(seed)
    net = build_network("unet3d", in_channels=in_channels, **KWARGS)
    card = {
        "name": "tiny-test",
        "version": "0.0.1",
        "architecture": {"name": "unet3d", "kwargs": dict(KWARGS, in_channels=in_channels)},
        "inputs": [{"name": f"echo{k + 1}", "echo_time_ms": 2.0 + 3 * k} for k in range(in_channels)],
        "spacing_mm": list(spacing),
        "orientation": orientation,
        "normalization": [{"method": "percentile", "lower": 0.5, "upper": 99.5, "mask": "body"}] * in_channels,
        "output": {"scale": 1000.0, "offset": 0.0, "clip": [-1024, 3071]},
        "patch_size": list(patch),
        "overlap": 0.5,
    }
    write_model_package(folder, card, net.state_dict())
    return load_model_package(folder)


@pytest.fixture(scope="module")
def package(tmp_path_factory):
    return make_package(tmp_path_factory.mktemp("pkg") / "tiny")


def body_phantom(size_zyx=(24, 36, 40), *, seed=0, noise=5.0):
    """An elliptic-cylinder 'body' with a bias field, an enclosed dark cavity, Rician noise; and its truth."""
    z, y, x = np.mgrid[: size_zyx[0], : size_zyx[1], : size_zyx[2]].astype(np.float32)
    cz, cy, cx = (s / 2 for s in size_zyx)
    body = ((x - cx) / (0.4 * size_zyx[2])) ** 2 + ((y - cy) / (0.35 * size_zyx[1])) ** 2 < 1
    cavity = ((x - cx) / 4) ** 2 + ((y - cy) / 3) ** 2 + ((z - cz) / 4) ** 2 < 1
    rng = np.random.default_rng(seed)
    bias = 0.6 + 0.8 * x / size_zyx[2]
    images = []
    for k in range(2):
        signal = np.where(body, 400.0 / (k + 1), 0.0) * bias
        signal[cavity] = 3.0
        noisy = np.abs(signal + rng.normal(0, noise, body.shape) + 1j * rng.normal(0, noise, body.shape))
        images.append(noisy.astype(np.float32))
    return images, body, cavity


def to_images(arrays, *, spacing=(1.1, 0.9, 2.3), origin=(10.5, -20.25, 33.0), direction=None):
    out = []
    for a in arrays:
        im = sitk.GetImageFromArray(a)
        im.SetSpacing(spacing)
        im.SetOrigin(origin)
        if direction is not None:
            im.SetDirection(direction)
        out.append(im)
    return out


OBLIQUE = sitk.VersorTransform((0.3, 0.2, 0.9), 0.4).GetMatrix()


# -- normalisation and body mask ---------------------------------------------------------------------------


def test_percentile_normalization_known_values():
    values = np.arange(1000, dtype=np.float32).reshape(10, 10, 10)
    array = np.concatenate([values, np.full((2, 10, 10), 5000.0, np.float32)])  # bright voxels outside the mask
    mask = np.zeros(array.shape, bool)
    mask[:10] = True
    spec = {"method": "percentile", "lower": 10, "upper": 90, "mask": "body"}
    m = channel_normalization(array, mask, spec)
    # numpy's linear percentiles of 0..999: 10 % -> 99.9, 90 % -> 899.1
    assert m.apply(np.array([99.9, 899.1, 499.5], np.float32)) == pytest.approx([0.0, 1.0, 0.5], abs=1e-5)
    out = normalize_channels([array], mask, [spec])
    assert out.shape == (1,) + array.shape and out.dtype == np.float32
    assert out[0, 0, 0, 0] == pytest.approx(-99.9 / 799.2, abs=1e-6)
    assert out[0, 10:].max() == pytest.approx(2.0)  # default mild clip [-0.5, 2]
    unclipped = normalize_channels([array], mask, [dict(spec, clip=None)])
    assert unclipped[0, 10, 0, 0] == pytest.approx((5000 - 99.9) / 799.2, rel=1e-5)
    whole = channel_normalization(array, mask, dict(spec, mask="none"))
    lo, hi = np.percentile(array, [10, 90])
    assert whole.scale == pytest.approx(1 / (hi - lo)) and whole.offset == pytest.approx(-lo / (hi - lo))


def test_zscore_and_none_normalization():
    rng = np.random.default_rng(3)
    array = rng.normal(50, 7, (8, 9, 10)).astype(np.float32)
    mask = np.ones(array.shape, bool)
    z = normalize_channels([array], mask, [{"method": "zscore", "clip": None}])[0]
    assert z.mean() == pytest.approx(0.0, abs=1e-5) and z.std() == pytest.approx(1.0, abs=1e-4)
    same = normalize_channels([array], None, [{"method": "none"}])[0]
    np.testing.assert_array_equal(same, array)
    with pytest.raises(InvalidParameterError, match="Unknown normalisation method"):
        normalize_channels([array], mask, [{"method": "histogram"}])
    with pytest.raises(InvalidParameterError, match="2 normalisation specs"):
        normalize_channels([array], mask, [{"method": "none"}] * 2)


def test_body_mask_with_bias_field_noise_and_cavity():
    images, body, cavity = body_phantom(noise=8.0)
    mask = mri_body_mask(images)
    assert mask.dtype == bool and mask.shape == body.shape
    assert (mask & body).sum() / body.sum() > 0.995  # the darker, bias-attenuated side stays in
    assert mask[cavity].all()  # the enclosed dark cavity is filled
    assert not (mask & ~ndimage.binary_dilation(body, iterations=2)).any()  # at most 2 voxels generous
    assert not mri_body_mask([np.zeros((5, 6, 7), np.float32)]).any()


# -- synthesis: geometry, body mask, metadata, device --------------------------------------------------------


def test_geometry_exact_for_oblique_anisotropic_input(package):
    arrays, body, _ = body_phantom()
    images = to_images(arrays, direction=OBLIQUE)
    result = Synthesizer(package, device="auto").run(images)
    sct = result.image
    ref = images[0]
    assert sct.GetSize() == ref.GetSize()
    assert sct.GetOrigin() == ref.GetOrigin()
    assert sct.GetSpacing() == ref.GetSpacing()
    assert sct.GetDirection() == ref.GetDirection()
    assert sct.GetPixelID() == sitk.sitkInt16
    hu = sitk.GetArrayFromImage(sct)
    far_outside = ~ndimage.binary_dilation(body, iterations=3)
    assert (hu[far_outside] == -1000).all()
    inside = ndimage.binary_erosion(body, iterations=2)
    assert (hu[inside] != -1000).mean() > 0.99
    assert hu.min() >= -1024 and hu.max() <= 3071
    assert sct.GetMetaData(META_MODEL) == "tiny-test"
    assert sct.GetMetaData("SyntheticCT|notice") == NOT_FOR_DIAGNOSTIC_USE
    # device "auto" reports the device that ran: on this CPU-only machine, the CPU.
    expected = "cuda" if torch.cuda.is_available() else ("mps" if torch.backends.mps.is_available() else "cpu")
    assert result.device == expected == sct.GetMetaData(META_DEVICE)
    assert result.n_run <= result.n_patches


def test_same_spacing_path_and_lossless_reorientation(tmp_path):
    arrays, _, _ = body_phantom((20, 32, 32), seed=1)
    lps = to_images(arrays, spacing=(2.0, 2.0, 2.0), origin=(0.0, 0.0, 0.0))
    ras = [sitk.DICOMOrient(im, "RAS") for im in lps]  # the same physical volume, x and y flipped
    pkg = make_package(tmp_path / "lps", orientation="LPS", patch=(16, 16, 16))
    from_lps = synthesize(lps, pkg, device="cpu")
    from_ras = synthesize(ras, pkg, device="cpu")
    assert from_ras.GetDirection() == ras[0].GetDirection() and from_ras.GetOrigin() == ras[0].GetOrigin()
    # The network saw identical arrays, so the results agree voxel for voxel in physical space.
    np.testing.assert_array_equal(
        sitk.GetArrayFromImage(sitk.DICOMOrient(from_ras, "LPS")), sitk.GetArrayFromImage(from_lps)
    )


def test_a_malformed_card_orientation_is_refused_with_the_model_name(tmp_path):
    from SyntheticCTLib.kernel.errors import InvalidParameterError

    arrays, _, _ = body_phantom((20, 32, 32), seed=1)
    images = to_images(arrays, spacing=(2.0, 2.0, 2.0), origin=(0.0, 0.0, 0.0))
    pkg = make_package(tmp_path / "bad", orientation="LPX", patch=(16, 16, 16))
    with pytest.raises(InvalidParameterError, match=r"Model 'tiny-test': orientation is 'LPX'; expected 'input'"):
        synthesize(images, pkg, device="cpu")


def test_pipeline_on_the_model_grid_equals_its_parts(package):
    """At the model's spacing, synthesize = body mask + normalisation + sliding window + HU mapping, exactly."""
    arrays, _, _ = body_phantom((20, 32, 40), seed=4)
    images = to_images(arrays, spacing=(2.0, 2.0, 2.0), direction=OBLIQUE)
    sct = sitk.GetArrayFromImage(synthesize(images, package, device="cpu"))
    body = mri_body_mask(arrays)
    volume = normalize_channels(arrays, body, package.normalization)
    y = sliding_window_predict(package.build_network("cpu"), volume, package.patch_size, package.overlap)[0]
    expected = np.clip(np.rint(np.clip(y * 1000.0, -1024, 3071)), -1024, 3071).astype(np.int16)
    expected[~body] = -1000
    # Float32 summation order may differ (patches outside the body are skipped): allow 1 HU of rounding.
    assert np.abs(sct.astype(int) - expected).max() <= 1
    assert (sct == expected).mean() > 0.999


def test_tta_uncertainty(package):
    arrays, body, _ = body_phantom()
    images = to_images(arrays, direction=OBLIQUE)
    sct, spread = synthesize_with_uncertainty(images, package, device="cpu")
    assert spread.GetPixelID() == sitk.sitkFloat32 and spread.GetSize() == sct.GetSize()
    assert spread.GetOrigin() == sct.GetOrigin() and spread.GetDirection() == sct.GetDirection()
    s = sitk.GetArrayFromImage(spread)
    assert s.min() >= 0 and s[ndimage.binary_erosion(body, iterations=2)].mean() > 0
    assert (s[~ndimage.binary_dilation(body, iterations=3)] == 0).all()
    # A flip-invariant network (1x1x1 convolution) has no spread at all.
    torch.manual_seed(0)
    pointwise = torch.nn.Conv3d(2, 1, 1)
    result = Synthesizer(package, device="cpu", network=pointwise).run(images, tta=True)
    assert float(sitk.GetArrayFromImage(result.uncertainty).max()) < 1e-2


# -- sliding window ------------------------------------------------------------------------------------------


def test_tiled_equals_whole_volume_for_pointwise_network():
    torch.manual_seed(1)
    net = torch.nn.Conv3d(2, 1, 1)
    volume = np.random.default_rng(0).normal(size=(2, 37, 50, 45)).astype(np.float32)
    with torch.inference_mode():
        whole = net(torch.from_numpy(volume)[None])[0].numpy()
    tiled = sliding_window_predict(net, volume, (16, 16, 16), 0.5, batch_size=3)
    np.testing.assert_allclose(tiled, whole, atol=2e-6)
    mask = np.zeros(volume.shape[1:], bool)
    mask[10:20, 12:30, 5:9] = True
    runner = SlidingWindow(net, "cpu", batch_size=2)
    skipped = runner.predict(list(volume), (16, 16, 16), 0.25, mask=mask)
    assert skipped.n_run < skipped.n_patches
    np.testing.assert_allclose(skipped.output[:, mask], whole[:, mask], atol=2e-6)


def test_tiled_equals_whole_volume_for_unet():
    """Depth-2 U-Net without normalisation (receptive radius ~9 voxels) on 32-voxel patches, half overlap.

    Near an inner patch border a patch sees zero padding instead of the neighbourhood; the Gaussian
    weighting makes the patch centres dominate there, so the blend differs from one whole-volume
    pass only slightly: measured max 3.4e-4 and mean 1.3e-5 for an output std of 0.078. The bounds
    below (1 % of the std for the max, 0.1 % for the mean) leave a margin of about 2.5x and 6x.
    """
    torch.manual_seed(0)
    net = build_network("unet3d", in_channels=2, **KWARGS).eval()
    volume = np.random.default_rng(0).normal(size=(2, 36, 50, 44)).astype(np.float32)
    with torch.inference_mode():
        whole = net(torch.from_numpy(volume)[None])[0].numpy()
    tiled = sliding_window_predict(net, volume, (32, 32, 32), 0.5)
    diff = np.abs(tiled - whole)
    assert diff.max() < 0.01 * whole.std()
    assert diff.mean() < 0.001 * whole.std()


def test_batch_size_follows_the_memory_budget():
    torch.manual_seed(3)
    net = build_network("unet3d", in_channels=1, **KWARGS).eval()
    volume = np.random.default_rng(2).normal(size=(1, 32, 40, 40)).astype(np.float32)
    per_patch = estimate_patch_bytes(net, (16, 16, 16), 1)
    tight = SlidingWindow(net, "cpu", memory_budget=per_patch).predict(volume, (16, 16, 16), 0.5)
    roomy = SlidingWindow(net, "cpu", memory_budget=8 * per_patch, max_batch_size=4).predict(volume, (16, 16, 16), 0.5)
    assert (tight.batch_size, roomy.batch_size) == (1, 4)
    np.testing.assert_allclose(tight.output, roomy.output, atol=1e-5)


def test_out_of_memory_halves_the_batch_then_fails_clearly_on_cpu(caplog):
    torch.manual_seed(2)
    net = torch.nn.Conv3d(1, 1, 3, padding=1)

    class OneAtATime(torch.nn.Module):
        """A real network whose memory budget fits one patch: larger batches raise torch's OOM error."""

        def __init__(self, inner, limit):
            super().__init__()
            self.inner, self.limit = inner, limit

        def forward(self, x):
            if x.shape[0] > self.limit:
                raise torch.OutOfMemoryError(f"budget exceeded: {x.shape[0]} patches")
            return self.inner(x)

    volume = np.random.default_rng(1).normal(size=(1, 30, 30, 30)).astype(np.float32)
    expected = sliding_window_predict(net, volume, (16, 16, 16), 0.5, batch_size=1)
    with caplog.at_level(logging.WARNING):
        result = SlidingWindow(OneAtATime(net, 1), "cpu", batch_size=4).predict(volume, (16, 16, 16), 0.5)
    assert result.batch_size == 1
    assert "retrying with 2 patches" in caplog.text and "retrying with 1 patches" in caplog.text
    np.testing.assert_allclose(result.output, expected, atol=1e-6)
    with pytest.raises(OutOfMemory, match="Out of memory on the CPU"):
        SlidingWindow(OneAtATime(net, 0), "cpu", batch_size=2).predict(volume, (16, 16, 16), 0.5)


# -- errors, warnings, cancellation, devices ------------------------------------------------------------------


def test_channel_count_mismatch_names_expected_inputs(package):
    arrays, _, _ = body_phantom()
    with pytest.raises(InvalidParameterError, match=r"takes 2 MRI input\(s\).*echo 1 \(TE 2 ms\).*Got 1"):
        synthesize(to_images(arrays[:1]), package, device="cpu")


def test_grid_mismatch_resamples_with_warning(package, caplog):
    arrays, _, _ = body_phantom()
    first, second = to_images(arrays, direction=OBLIQUE)
    shifted = sitk.Image(second)
    shifted.SetOrigin(tuple(o + 1.7 for o in second.GetOrigin()))
    with caplog.at_level(logging.WARNING, logger="SyntheticCTLib.synthesis.inference"):
        sct = synthesize([first, shifted], package, device="cpu")
    assert "on another grid than input 1" in caplog.text and "resampling it onto" in caplog.text
    assert sct.GetSize() == first.GetSize() and sct.GetOrigin() == first.GetOrigin()
    resampled = resample_like(shifted, first, pixel_type=sitk.sitkFloat32)
    np.testing.assert_array_equal(
        sitk.GetArrayFromImage(sct), sitk.GetArrayFromImage(synthesize([first, resampled], package, device="cpu"))
    )
    bad = sitk.Image([4, 4], sitk.sitkFloat32)
    with pytest.raises(Exception, match="2D"):
        synthesize([first, bad], package, device="cpu")


def test_cancel_stops_between_batches_and_writes_nothing(package, tmp_path):
    from SyntheticCTLib.apps.batch import synthesize_cases

    arrays, _, _ = body_phantom((24, 48, 48))
    case = tmp_path / "case"
    case.mkdir()
    for k, im in enumerate(to_images(arrays)):
        sitk.WriteImage(im, str(case / f"mri{k}.nii.gz"))
    token = CancelToken()
    seen = []

    def progress(fraction, stage="", message=""):
        seen.append((stage, message))
        if stage == "inference" and message.startswith("patch 2 "):
            token.cancel()

    out = tmp_path / "out"
    with pytest.raises(Cancelled):
        synthesize_cases(
            [{"id": "c1", "mri": sorted(case.glob("*.nii.gz"))}],
            package,
            out,
            device="cpu",
            window={"batch_size": 1},
            progress=progress,
            cancel=token,
        )
    assert not any(stage == "finishing" for stage, _ in seen)
    assert list(out.iterdir()) == []


def test_select_device_and_window_errors():
    assert select_device("cpu") == "cpu"
    if not torch.cuda.is_available():
        with pytest.raises(InvalidParameterError, match="sees no CUDA GPU"):
            select_device("cuda")
    with pytest.raises(InvalidParameterError, match="Unknown device"):
        select_device("tpu")
    with pytest.raises(InvalidParameterError, match="Unknown window setting"):
        WindowSettings.from_any({"patchsize": 3})
