"""Data augmentation for training patches, in torch on the CPU (or the training device).

Spatial augmentation (small rotations and flips) moves the MRI channels, the CT target and the
masks together with one ``grid_sample`` call; intensity augmentation (bias field, gamma, noise,
scaling) changes the MRI channels only. Every random draw comes from a ``numpy.random.Generator``
given by the caller, so a sample is a pure function of its seed (reproducible and resumable).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import List, Sequence, Tuple

import numpy as np

from SyntheticCTLib.training.config import FLIP_AXES, AugmentConfig


@dataclass
class SpatialParams:
    """Rotation angles (radians, about the z, y, x axes) and the numpy axes to flip."""

    angles: Tuple[float, float, float] = (0.0, 0.0, 0.0)
    flips: List[int] = field(default_factory=list)

    @property
    def rotates(self) -> bool:
        return any(abs(a) > 1e-9 for a in self.angles)


def rotation_margin(patch_size: Sequence[int], max_degrees: float) -> Tuple[int, int, int]:
    """Voxels to crop on each side of a patch so that a rotation of up to ``max_degrees`` stays inside it."""
    if max_degrees <= 0:
        return (0, 0, 0)
    s = math.sin(math.radians(max_degrees))
    longest = max(patch_size)
    # A rotation about two axes can bring a corner of the longest side into any axis.
    return tuple(int(math.ceil(longest * s * 0.75)) + 1 for _ in patch_size)


def draw_spatial(rng: np.random.Generator, config: AugmentConfig) -> SpatialParams:
    """Draw rotation angles and flips for one sample."""
    params = SpatialParams()
    if not config.enabled:
        return params
    if config.rotation_degrees > 0 and rng.random() < config.rotation_probability:
        limit = math.radians(config.rotation_degrees)
        params.angles = tuple(float(a) for a in rng.uniform(-limit, limit, size=3))
    for name in config.flip_axes:
        if rng.random() < config.flip_probability:
            params.flips.append(FLIP_AXES[name])
    return params


def _rotation_matrix_xyz(angles_zyx: Sequence[float]):
    """3x3 rotation matrix acting on (x, y, z) coordinates, from angles about the z, y and x axes."""
    az, ay, ax = angles_zyx
    cz, sz, cy, sy, cx, sx = math.cos(az), math.sin(az), math.cos(ay), math.sin(ay), math.cos(ax), math.sin(ax)
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    return rz @ ry @ rx


def apply_spatial(
    volume,
    patch_size: Sequence[int],
    params: SpatialParams,
    *,
    spacing: Sequence[float] = (1.0, 1.0, 1.0),
    nearest_channels: Sequence[int] = (),
):
    """Rotate and flip a stack of co-registered volumes, cropping the central ``patch_size``.

    Parameters
    ----------
    volume
        torch tensor ``(C, D, H, W)``: MRI channels, CT and masks stacked, at least ``patch_size`` large
        (larger by :func:`rotation_margin` when rotating, so that no padding enters the patch).
    patch_size
        Output size ``(d, h, w)``.
    params
        From :func:`draw_spatial`.
    spacing
        Voxel spacing (z, y, x) in mm, so that rotations are rigid in physical space.
    nearest_channels
        Channels (masks) re-binarised after interpolation (> 0.5).
    """
    import torch
    import torch.nn.functional as F

    d, h, w = (int(p) for p in patch_size)
    big = tuple(int(s) for s in volume.shape[1:])
    if params.rotates:
        sp = np.asarray(spacing, dtype=float)[::-1]  # (x, y, z)
        half_out = np.array([w, h, d], dtype=float) * sp / 2
        half_in = np.array(big[::-1], dtype=float) * sp / 2
        theta = np.diag(1 / half_in) @ _rotation_matrix_xyz(params.angles) @ np.diag(half_out)
        theta = np.concatenate([theta, np.zeros((3, 1))], axis=1)
        theta_t = torch.as_tensor(theta, dtype=volume.dtype, device=volume.device)[None]
        grid = F.affine_grid(theta_t, [1, volume.shape[0], d, h, w], align_corners=False)
        out = F.grid_sample(volume[None], grid, mode="bilinear", padding_mode="border", align_corners=False)[0]
        for c in nearest_channels:
            out[c] = (out[c] > 0.5).to(out.dtype)
    else:
        starts = [(b - p) // 2 for b, p in zip(big, (d, h, w))]
        out = volume[:, starts[0] : starts[0] + d, starts[1] : starts[1] + h, starts[2] : starts[2] + w]
    if params.flips:
        out = torch.flip(out, dims=[a + 1 for a in params.flips])
    return out.contiguous()


def _bias_field(rng: np.random.Generator, shape: Sequence[int], strength: float, torch_like):
    """A smooth multiplicative field: exp of a random polynomial of degree 2 in the patch coordinates."""
    import torch

    axes = [torch.linspace(-1.0, 1.0, int(n), dtype=torch_like.dtype, device=torch_like.device) for n in shape]
    z, y, x = torch.meshgrid(*axes, indexing="ij")
    terms = [z, y, x, z * y, z * x, y * x, z * z - 1 / 3, y * y - 1 / 3, x * x - 1 / 3]
    coefficients = rng.uniform(-1.0, 1.0, size=len(terms)) * strength / 3
    log_field = sum(float(c) * t for c, t in zip(coefficients, terms))
    return torch.exp(log_field)


def apply_intensity(image, rng: np.random.Generator, config: AugmentConfig):
    """Augment the MRI channels ``(C, D, H, W)`` (normalised intensities) of one sample.

    Bias field (shared by all channels, as a receive-coil field is shared by all echoes), gamma on the
    patch's intensity range, per-channel scaling, and Gaussian noise, each with its probability.
    """
    import torch

    if not config.enabled:
        return image
    out = image
    if config.bias_field_strength > 0 and rng.random() < config.bias_field_probability:
        out = out * _bias_field(rng, out.shape[1:], config.bias_field_strength, out)[None]
    if rng.random() < config.gamma_probability:
        gamma = float(np.exp(rng.uniform(np.log(config.gamma_range[0]), np.log(config.gamma_range[1]))))
        low = out.amin(dim=(1, 2, 3), keepdim=True)
        high = out.amax(dim=(1, 2, 3), keepdim=True)
        span = torch.clamp(high - low, min=1e-6)
        out = low + span * torch.clamp((out - low) / span, 0.0, 1.0) ** gamma
    if rng.random() < config.scaling_probability:
        factors = rng.uniform(config.scaling_range[0], config.scaling_range[1], size=out.shape[0])
        out = out * torch.as_tensor(factors, dtype=out.dtype, device=out.device)[:, None, None, None]
    if config.noise_std > 0 and rng.random() < config.noise_probability:
        std = float(rng.uniform(0.0, config.noise_std))
        generator = torch.Generator(device="cpu").manual_seed(int(rng.integers(0, 2**31 - 1)))
        noise = torch.randn(out.shape, generator=generator, dtype=out.dtype).to(out.device)
        out = out + std * noise
    return out
