"""Training losses: voxel-wise L1 with an optional bone weight, and an optional gradient-difference term.

Both work on the network's normalised output ``y`` and target ``t`` (HU = y * scale + offset), shaped
``(N, 1, D, H, W)``. Voxel weights are 1 inside the body, ``background_weight`` outside it, plus
``bone_weight`` on bone voxels (CT above the bone threshold), so that thin cortical bone, a small
fraction of the voxels, is not drowned by soft tissue, plus ``air_weight`` on the air enclosed in the
body (bowel gas), which is as dark as cortical bone in a gradient echo and far rarer.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class LossTerms:
    """The total loss and its parts (the parts as floats, for logging)."""

    total: object  # torch scalar tensor, with a graph
    l1: float
    gradient: float


def voxel_weights(body, bone, *, bone_weight: float, background_weight: float, air=None, air_weight: float = 0.0):
    """Per-voxel weights from boolean/float ``body``, ``bone`` and (optional) internal ``air`` masks."""
    body = body.float()
    weights = body + (1.0 - body) * background_weight + bone.float() * bone_weight
    if air is not None and air_weight > 0:
        weights = weights + air.float() * air_weight
    return weights


def weighted_l1(prediction, target, weights):
    """Sum of ``weights * |prediction - target|`` divided by the sum of the weights."""
    import torch

    return (weights * (prediction - target).abs()).sum() / torch.clamp(weights.sum(), min=1e-6)


def gradient_difference(prediction, target, weights=None):
    """Gradient-difference loss (Nie et al. 2018): mean of ``| |d pred| - |d target| |`` along each axis.

    Finite differences along the three spatial axes; ``weights`` (optional) weight each difference by
    the smaller weight of its two voxels.
    """
    import torch

    total = prediction.new_zeros(())
    for axis in (2, 3, 4):
        n = prediction.shape[axis]
        if n < 2:
            continue
        dp = torch.diff(prediction, dim=axis).abs()
        dt = torch.diff(target, dim=axis).abs()
        term = (dp - dt).abs()
        if weights is None:
            total = total + term.mean()
        else:
            w = torch.minimum(weights.narrow(axis, 0, n - 1), weights.narrow(axis, 1, n - 1))
            total = total + (w * term).sum() / torch.clamp(w.sum(), min=1e-6)
    return total / 3.0


class SynthesisLoss:
    """L1 (weighted on body, bone and internal air) plus ``gradient_weight`` times the gradient-difference loss."""

    def __init__(
        self,
        *,
        bone_weight: float = 1.0,
        gradient_weight: float = 0.0,
        background_weight: float = 0.1,
        air_weight: float = 0.0,
    ) -> None:
        self.bone_weight = float(bone_weight)
        self.air_weight = float(air_weight)
        self.gradient_weight = float(gradient_weight)
        self.background_weight = float(background_weight)

    def __call__(self, prediction, target, body, bone, air=None) -> LossTerms:
        prediction = prediction.float()
        weights = voxel_weights(
            body,
            bone,
            bone_weight=self.bone_weight,
            background_weight=self.background_weight,
            air=air,
            air_weight=self.air_weight,
        )
        l1 = weighted_l1(prediction, target, weights)
        total = l1
        gradient_value = 0.0
        if self.gradient_weight > 0:
            gdl = gradient_difference(prediction, target, weights)
            total = total + self.gradient_weight * gdl
            gradient_value = float(gdl.detach())
        return LossTerms(total=total, l1=float(l1.detach()), gradient=gradient_value)
