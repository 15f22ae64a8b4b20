"""Network architectures that a model package may name, in one registry.

A model package names its network by a registry key (``"unet3d"``) and keyword arguments; loading a
package never runs code from it. Adding an architecture is one class and one decorator line::

    @register_architecture("mynet")
    class MyNet(nn.Module):
        def __init__(self, in_channels: int, out_channels: int = 1, ...): ...

Every architecture takes ``in_channels`` and ``out_channels`` and maps ``(N, C_in, D, H, W)`` to
``(N, C_out, D, H, W)``. It may expose ``size_multiple`` (int): the spatial sizes it accepts must be
divisible by it (the inference pads to it).
"""

from __future__ import annotations

import inspect
from typing import Callable, Dict, Type

import torch
from torch import nn

from SyntheticCTLib.models.errors import ArchitectureError, UnknownArchitectureError

ARCHITECTURES: Dict[str, Type[nn.Module]] = {}
"""Registry: architecture name -> ``nn.Module`` class."""

NORMS = ("instance", "batch", "group", "none")


def register_architecture(name: str) -> Callable[[Type[nn.Module]], Type[nn.Module]]:
    """Class decorator that adds an ``nn.Module`` class to :data:`ARCHITECTURES` under ``name``."""

    def _register(cls: Type[nn.Module]) -> Type[nn.Module]:
        if name in ARCHITECTURES and ARCHITECTURES[name] is not cls:
            raise ValueError(f"An architecture named '{name}' is already registered ({ARCHITECTURES[name].__name__}).")
        ARCHITECTURES[name] = cls
        cls.architecture_name = name
        return cls

    return _register


def known_architectures() -> list:
    """Sorted names of the registered architectures."""
    return sorted(ARCHITECTURES)


def build_network(name: str, **kwargs) -> nn.Module:
    """Instantiate the registered architecture ``name`` with ``kwargs`` (weights initialised, not loaded).

    Raises
    ------
    UnknownArchitectureError
        ``name`` is not in the registry; the message lists the known names.
    ArchitectureError
        The keyword arguments do not fit the architecture.
    """
    cls = ARCHITECTURES.get(name)
    if cls is None:
        raise UnknownArchitectureError(
            f"Unknown architecture '{name}'; this version of SyntheticCT knows: {', '.join(known_architectures())}."
        )
    params = inspect.signature(cls.__init__).parameters
    accepts_any = any(p.kind == inspect.Parameter.VAR_KEYWORD for p in params.values())
    unknown = [k for k in kwargs if k not in params] if not accepts_any else []
    if unknown:
        allowed = [k for k in params if k != "self"]
        raise ArchitectureError(
            f"Architecture '{name}' does not accept {', '.join(repr(k) for k in unknown)}; "
            f"its arguments are: {', '.join(allowed)}."
        )
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise ArchitectureError(f"Cannot build architecture '{name}' with {kwargs}: {e}") from e


def _norm(kind: str, channels: int) -> nn.Module:
    if kind == "instance":
        return nn.InstanceNorm3d(channels, affine=True)
    if kind == "batch":
        return nn.BatchNorm3d(channels)
    if kind == "group":
        groups = 8
        while channels % groups:
            groups //= 2
        return nn.GroupNorm(groups, channels)
    return nn.Identity()


class ConvBlock(nn.Module):
    """Two 3x3x3 convolutions, each followed by normalisation and LeakyReLU; optionally residual.

    The residual form adds the (1x1x1-projected, when the width changes) input before the last activation.
    """

    def __init__(self, in_ch: int, out_ch: int, norm: str, residual: bool, negative_slope: float = 0.01) -> None:
        super().__init__()
        bias = norm == "none"
        self.conv1 = nn.Conv3d(in_ch, out_ch, 3, padding=1, bias=bias)
        self.norm1 = _norm(norm, out_ch)
        self.conv2 = nn.Conv3d(out_ch, out_ch, 3, padding=1, bias=bias)
        self.norm2 = _norm(norm, out_ch)
        self.act = nn.LeakyReLU(negative_slope, inplace=True)
        self.residual = residual
        if residual and in_ch != out_ch:
            self.skip = nn.Sequential(nn.Conv3d(in_ch, out_ch, 1, bias=bias), _norm(norm, out_ch))
        else:
            self.skip = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.act(self.norm1(self.conv1(x)))
        y = self.norm2(self.conv2(y))
        if self.residual:
            y = y + self.skip(x)
        return self.act(y)


@register_architecture("unet3d")
class UNet3D(nn.Module):
    """A configurable 3D U-Net.

    Parameters
    ----------
    in_channels, out_channels
        Input channels (one per MRI input) and output channels (1: normalised HU).
    depth
        Number of resolution levels (>= 1); ``depth - 1`` stride-2 downsamplings, so every spatial
        size must be divisible by ``2 ** (depth - 1)`` (:attr:`size_multiple`).
    width
        Feature channels at the first level; doubled at each level down.
    norm
        ``"instance"``, ``"batch"``, ``"group"`` or ``"none"``.
    residual
        Residual convolution blocks.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int = 1,
        depth: int = 3,
        width: int = 16,
        norm: str = "instance",
        residual: bool = True,
    ) -> None:
        super().__init__()
        if int(in_channels) < 1 or int(out_channels) < 1:
            raise ValueError(f"in_channels and out_channels must be >= 1 (got {in_channels}, {out_channels})")
        if int(depth) < 1:
            raise ValueError(f"depth must be >= 1 (got {depth})")
        if int(width) < 1:
            raise ValueError(f"width must be >= 1 (got {width})")
        if norm not in NORMS:
            raise ValueError(f"norm must be one of {', '.join(NORMS)} (got {norm!r})")
        self.in_channels, self.out_channels = int(in_channels), int(out_channels)
        self.depth, self.width, self.norm, self.residual = int(depth), int(width), norm, bool(residual)
        widths = [self.width * 2**i for i in range(self.depth)]
        self.encoders = nn.ModuleList()
        self.downs = nn.ModuleList()
        prev = self.in_channels
        for level, ch in enumerate(widths):
            self.encoders.append(ConvBlock(prev, ch, norm, self.residual))
            if level < self.depth - 1:
                self.downs.append(nn.Conv3d(ch, ch, 2, stride=2))
            prev = ch
        self.ups = nn.ModuleList()
        self.decoders = nn.ModuleList()
        for level in range(self.depth - 2, -1, -1):
            self.ups.append(nn.ConvTranspose3d(widths[level + 1], widths[level], 2, stride=2))
            self.decoders.append(ConvBlock(2 * widths[level], widths[level], norm, self.residual))
        self.head = nn.Conv3d(widths[0], self.out_channels, 1)

    @property
    def size_multiple(self) -> int:
        """Every spatial size of the input must be divisible by this."""
        return 2 ** (self.depth - 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = self.size_multiple
        if any(s % m for s in x.shape[2:]):
            raise ValueError(
                f"UNet3D(depth={self.depth}) needs spatial sizes divisible by {m}; got {tuple(x.shape[2:])}"
            )
        skips = []
        for level, encoder in enumerate(self.encoders):
            x = encoder(x)
            if level < self.depth - 1:
                skips.append(x)
                x = self.downs[level](x)
        for up, decoder in zip(self.ups, self.decoders):
            x = up(x)
            x = decoder(torch.cat([x, skips.pop()], dim=1))
        return self.head(x)


def fold_batch_norm(network: nn.Module) -> nn.Module:
    """A copy of ``network`` for inference, each eval-mode ``BatchNorm3d`` folded into the convolution before it.

    In eval mode a batch norm is an affine map per channel with fixed statistics, so
    ``bn(conv(x)) == conv'(x)`` with ``conv'``'s weights and bias scaled and shifted (to float
    rounding). Only :class:`ConvBlock`'s pairs (``conv1``/``norm1``, ``conv2``/``norm2`` and the
    projection ``skip``) are folded; any other norm (instance, group) is data-dependent and stays.
    The network passed in is not changed.
    """
    import copy

    from torch.nn.utils.fusion import fuse_conv_bn_eval

    folded = copy.deepcopy(network).eval()
    for block in folded.modules():
        if not isinstance(block, ConvBlock):
            continue
        for conv_name, norm_name in (("conv1", "norm1"), ("conv2", "norm2")):
            conv, norm = getattr(block, conv_name), getattr(block, norm_name)
            if isinstance(norm, nn.BatchNorm3d) and norm.track_running_stats:
                setattr(block, conv_name, fuse_conv_bn_eval(conv, norm))
                setattr(block, norm_name, nn.Identity())
        skip = block.skip
        if isinstance(skip, nn.Sequential) and len(skip) == 2 and isinstance(skip[1], nn.BatchNorm3d):
            if skip[1].track_running_stats:
                block.skip = nn.Sequential(fuse_conv_bn_eval(skip[0], skip[1]), nn.Identity())
    return folded
