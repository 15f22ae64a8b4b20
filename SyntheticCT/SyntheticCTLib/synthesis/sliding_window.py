"""Sliding-window patch inference with Gaussian blending, memory-lean and vectorised (torch, any device).

The volume is covered by a regular grid of patches (``overlap`` of the patch size between
neighbours, the last patch of each axis flush with the volume's end, as MONAI does; starts are
multiples of the network's ``size_multiple`` so that every patch downsamples on the same grid as a
whole-volume pass). Each prediction is weighted by a separable Gaussian (sigma = ``sigma_scale`` x
patch size), held at its peak from the centre towards a volume edge the patch touches (there it
sees the same zero padding as a whole-volume pass, so it is trusted fully; MONAI's plain Gaussian
lets a neighbour's less-informed border dominate there), and accumulated into one preallocated
float32 output array. The sum of the weights is separable too (the patch grid is a Cartesian
product), so it is never stored as a volume: the output is divided by ``Wz[z] * Wy[y] * Wx[x]``
slice by slice at the end.

With a ``mask``, patches holding no mask voxel are skipped (their voxels stay 0). Every voxel inside
the mask is still covered by all of its patches, so the blended value there is exactly what a full
run gives; callers overwrite the voxels outside the mask (the synthesis sets them to air).

The network runs as an accelerated inference copy unless ``accelerate=False``: batch norms folded
into the convolutions before them, and on the CPU the channels-last 3D memory layout, for which
oneDNN has faster 3D convolutions (measured about 2x on the bundled network, patch 96^3). The result
is the eager network's to float rounding (far below 0.01 HU). If the copy cannot be built or fails
to run, the network as given runs instead; the log says which path ran. With test-time flips the
flipped copies of a batch are stacked into one network call (the same arithmetic as one pass per
flip, in fewer, larger calls); mean and population variance are taken over the flips per patch.

The batch size follows a memory budget: on CUDA the first patch is run alone and its peak memory
measured; on the CPU an estimate from the network's width is used. A GPU out-of-memory error halves
the batch and retries; at batch size 1 the run moves to the CPU (with a warning) and continues.
"""

from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable, List, Optional, Sequence, Tuple, Union

import numpy as np

from SyntheticCTLib.kernel.errors import InvalidParameterError, SyntheticCTError
from SyntheticCTLib.kernel.progress import CancelToken, ProgressCallback, no_progress

logger = logging.getLogger(__name__)

Flip = Tuple[int, ...]
DEFAULT_TTA_FLIPS: Tuple[Flip, ...] = ((), (0, 1, 2))
"""The identity and a flip of all three spatial axes (of the ``(Z, Y, X)`` array): two passes.

Measured on held-out phantoms (issue 17), this map predicts the real error about as well as the four-pass
map of the identity and each axis's flip (HU Spearman 0.18-0.25 against 0.20-0.28; surface AUROC no
lower), at half the cost.
"""


class OutOfMemory(SyntheticCTError, MemoryError):
    """The inference ran out of memory even with one patch per batch on the CPU."""


@dataclass
class WindowPrediction:
    """The result of :meth:`SlidingWindow.predict`."""

    output: np.ndarray
    """Blended prediction, float32 ``(C_out, Z, Y, X)``: with test-time flips, the first flip's (the identity)."""
    spread: Optional[np.ndarray] = None
    """With test-time flips: the blended per-voxel standard deviation across the flips, ``(C_out, Z, Y, X)``."""
    device: str = "cpu"
    """The device that finished the run (``"cpu"`` after a fallback)."""
    batch_size: int = 1
    n_patches: int = 0
    n_run: int = 0
    fell_back_to_cpu: bool = False
    elapsed_s: float = 0.0
    path: str = "eager"
    """Which network ran: ``"eager"`` (the network as given) or ``"accelerated"`` (see :class:`SlidingWindow`)."""
    notes: List[str] = field(default_factory=list)


def patch_starts(size: int, patch: int, overlap: float, multiple: int = 1) -> List[int]:
    """Start indices of the patches along one axis of length ``size`` (MONAI's scan: last one flush).

    The step is rounded down to a multiple of ``multiple`` (at least one ``multiple``); with ``size``
    and ``patch`` multiples of it too, every start is, so that a network's downsampling grid is the
    same in every patch as in a whole-volume pass.
    """
    if size <= patch:
        return [0]
    step = max(multiple, int(patch * (1.0 - overlap)) // multiple * multiple)
    n = int(math.ceil((size - patch) / step)) + 1
    return sorted({min(i * step, size - patch) for i in range(n)})


def gaussian_1d(patch: int, sigma_scale: float = 0.125, floor: float = 1e-3) -> np.ndarray:
    """The 1D Gaussian weight of a patch axis: peak 1 at the centre, sigma = ``sigma_scale * patch``."""
    centre = (patch - 1) / 2.0
    sigma = max(sigma_scale * patch, 1e-6)
    g = np.exp(-0.5 * ((np.arange(patch) - centre) / sigma) ** 2)
    return np.maximum(g, floor).astype(np.float32)


def effective_patch_size(shape: Sequence[int], patch_size: Sequence[int], multiple: int) -> Tuple[int, ...]:
    """Patch size per axis: the requested one, shrunk to the volume (rounded up to ``multiple``)."""
    out = []
    for s, p in zip(shape, patch_size):
        p = int(p)
        if p < 1:
            raise InvalidParameterError(f"patch_size must be positive (got {tuple(patch_size)}).")
        p = int(math.ceil(p / multiple) * multiple)
        out.append(min(p, int(math.ceil(s / multiple) * multiple)))
    return tuple(out)


def tile_profiles(starts: Sequence[int], g: np.ndarray) -> List[np.ndarray]:
    """The 1D weight of each patch along one axis: the Gaussian, held at its peak towards the volume's edge.

    A patch flush with the volume's start (end) sees there the same zero padding as a whole-volume
    pass, so its prediction there is as good as at its centre: its weight stays 1 from its centre to
    that edge. Elsewhere the Gaussian lets the patch centres dominate.
    """
    profiles = []
    half = len(g) // 2
    for i, _s in enumerate(starts):
        p = g.copy()
        if i == 0:
            p[:half] = 1.0
        if i == len(starts) - 1:
            p[half:] = 1.0
        profiles.append(p)
    return profiles


def _axis_weights(size: int, patch: int, starts: Sequence[int], profiles: Sequence[np.ndarray]) -> np.ndarray:
    w = np.zeros(size, dtype=np.float64)
    for s, p in zip(starts, profiles):
        n = max(0, min(patch, size - s))
        w[s : s + n] += p[:n]
    return w


def is_out_of_memory(error: BaseException) -> bool:
    """True for torch's out-of-memory errors (CUDA, MPS, CPU allocator)."""
    import torch

    if isinstance(error, getattr(torch, "OutOfMemoryError", ())):
        return True
    if isinstance(error, MemoryError):
        return True
    text = str(error).lower()
    return isinstance(error, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


def available_memory_bytes() -> int:
    """Physical memory available now (Linux/macOS via sysconf, else psutil, else 4 GiB)."""
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        pass
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:
        return 4 << 30


def estimate_patch_bytes(
    network: Any, patch_size: Sequence[int], in_channels: int, *, element_bytes: int = 4, n_flips: int = 1
) -> int:
    """A rough upper estimate of the activation memory of one patch (a U-Net: ~10 maps of the first width live)."""
    width = int(getattr(network, "width", 32))
    voxels = int(np.prod(patch_size))
    return voxels * element_bytes * (in_channels + 10 * width) + voxels * 4 * (2 + n_flips)


def _volume_channels(volume: Union[np.ndarray, Sequence[np.ndarray]]) -> Tuple[List[Any], Tuple[int, int, int]]:
    """The channels of ``volume`` as a list of 3D arrays (views, not copies) and their common shape."""
    channels = list(volume) if not isinstance(volume, np.ndarray) else [volume[c] for c in range(volume.shape[0])]
    if not channels:
        raise InvalidParameterError("The volume has no channels.")
    shape = tuple(np.shape(channels[0]))
    if len(shape) != 3 or any(tuple(np.shape(c)) != shape for c in channels):
        raise InvalidParameterError(
            f"Every channel must be 3D and of one shape; got {[np.shape(c) for c in channels]}."
        )
    return channels, shape


def _checked_flips(flips: Sequence[Flip]) -> List[Flip]:
    """The flips as tuples of ints (``[()]`` when none); axes other than 0, 1, 2 are refused."""
    out = [tuple(int(a) for a in f) for f in flips] or [()]
    if any(a not in (0, 1, 2) for f in out for a in f):
        raise InvalidParameterError(f"Flip axes must be 0, 1 or 2 (got {out}).")
    return out


@dataclass
class PatchPlan:
    """Where the patches of one volume go and how each is weighted (see the module's docstring)."""

    shape: Tuple[int, int, int]
    """The volume's shape ``(Z, Y, X)``."""
    patch: Tuple[int, int, int]
    """The effective patch size."""
    starts: List[List[int]]
    """Patch starts along each axis."""
    profiles: List[List[np.ndarray]]
    """The 1D weight of each patch along each axis (:func:`tile_profiles`)."""
    tiles: List[Tuple[int, int, int]]
    """The patches to run (those holding a mask voxel when a mask is given), by their start ``(z, y, x)``."""
    n_patches: int
    """The number of patches of the whole grid (run or skipped)."""

    @classmethod
    def make(
        cls,
        shape: Tuple[int, int, int],
        patch_size: Sequence[int],
        overlap: float,
        *,
        multiple: int = 1,
        sigma_scale: float = 0.125,
        mask: Optional[np.ndarray] = None,
    ) -> PatchPlan:
        """The plan of a volume of ``shape``; with ``mask``, the patches holding no True voxel are left out."""
        if not 0.0 <= float(overlap) < 1.0:
            raise InvalidParameterError(f"overlap must be in [0, 1) (got {overlap}).")
        if len(patch_size) != 3:
            raise InvalidParameterError(f"patch_size needs 3 values (got {tuple(patch_size)}).")
        if mask is not None and tuple(mask.shape) != tuple(shape):
            raise InvalidParameterError(f"The mask has shape {mask.shape}, the volume {shape}.")
        patch = effective_patch_size(shape, patch_size, multiple)
        # Patches tile the volume padded (virtually, with zeros) to a multiple of the network's size multiple.
        grid_shape = tuple(int(math.ceil(s / multiple) * multiple) for s in shape)
        starts = [patch_starts(s, p, overlap, multiple) for s, p in zip(grid_shape, patch)]
        profiles = [tile_profiles(st, gaussian_1d(p, sigma_scale)) for st, p in zip(starts, patch)]
        tiles = [(z, y, x) for z in starts[0] for y in starts[1] for x in starts[2]]
        n_patches = len(tiles)
        if mask is not None:
            pz, py, px = patch
            tiles = [t for t in tiles if mask[t[0] : t[0] + pz, t[1] : t[1] + py, t[2] : t[2] + px].any()]
        return cls(tuple(shape), patch, starts, profiles, tiles, n_patches)

    def extent(self, tile: Tuple[int, int, int]) -> Tuple[int, int, int]:
        """How many voxels of the patch at ``tile`` lie inside the volume, per axis."""
        return tuple(min(p, s - t) for p, s, t in zip(self.patch, self.shape, tile))

    def weight_key(self, tile: Tuple[int, int, int]) -> Tuple[int, int, int]:
        """Per axis: 0 for the first patch, 2 for the last, 1 for an inner one (their weights differ only so)."""
        key = []
        for a, t in enumerate(tile):
            j = self.starts[a].index(t)
            key.append(2 if j == len(self.starts[a]) - 1 else min(j, 1))
        return tuple(key)

    def weight(self, tile: Tuple[int, int, int]) -> np.ndarray:
        """The separable 3D weight of the patch at ``tile``, float32 ``patch``."""
        pz, py, px = (self.profiles[a][self.starts[a].index(t)] for a, t in enumerate(tile))
        return pz[:, None, None] * py[None, :, None] * px[None, None, :]

    def weight_sums(self) -> List[np.ndarray]:
        """Per axis, the sum over the patches of their 1D weights at each voxel (float64)."""
        return [_axis_weights(s, p, st, pr) for s, p, st, pr in zip(self.shape, self.patch, self.starts, self.profiles)]


class _Accumulator:
    """Weighted sums of the patch predictions (and, with several flips, of their variances) over the volume."""

    def __init__(self, shape: Tuple[int, int, int], with_variance: bool) -> None:
        self.shape = shape
        self.with_variance = with_variance
        self.out: Optional[np.ndarray] = None
        self.var: Optional[np.ndarray] = None

    def add(self, plan: PatchPlan, batch: Sequence[Tuple[int, int, int]], mean: np.ndarray, var) -> None:
        """Add the weighted predictions ``mean`` (and ``var``) ``(N, C_out, *patch)`` of the patches in ``batch``."""
        if self.out is None:
            self.out = np.zeros((mean.shape[1],) + self.shape, dtype=np.float32)
            if var is not None:
                self.var = np.zeros_like(self.out)
        for k, tile in enumerate(batch):
            (z, y, x), (dz, dy, dx) = tile, plan.extent(tile)
            region = (slice(None), slice(z, z + dz), slice(y, y + dy), slice(x, x + dx))
            self.out[region] += mean[k, :, :dz, :dy, :dx]
            if self.var is not None:
                self.var[region] += var[k, :, :dz, :dy, :dx]

    def finish(self, plan: PatchPlan) -> Tuple[np.ndarray, Optional[np.ndarray]]:
        """Divide by the sum of the weights, slice by slice; return the blend and the spread (standard deviation)."""
        if self.out is None:  # no patch ran (empty mask)
            self.out = np.zeros((1,) + self.shape, dtype=np.float32)
            self.var = np.zeros_like(self.out) if self.with_variance else None
        out, var = self.out, self.var
        weights = plan.weight_sums()
        wyx = weights[1][:, None] * weights[2][None, :]
        for z in range(self.shape[0]):
            inv = (1.0 / (weights[0][z] * wyx)).astype(np.float32)
            out[:, z] *= inv
            if var is not None:
                var[:, z] *= inv
        spread = None
        if var is not None:
            np.maximum(var, 0.0, out=var)
            spread = np.sqrt(var, out=var)
        self.out = self.var = None
        return out, spread


@dataclass
class _BatchState:
    """The batch size as the run adapts it, and the host buffer patches are gathered into."""

    size: int
    probe: bool = False
    """On CUDA: the next batch (one patch) measures the memory a patch needs."""
    buffer: Optional[np.ndarray] = None
    probe_base: int = 0
    flips_per_call: int = 1
    """Test-time flips stacked into one network call (all of them, until memory runs short)."""


class SlidingWindow:
    """A network on a device, ready to predict volumes patch by patch.

    Parameters
    ----------
    network
        A torch module (or any callable) mapping ``(N, C_in, *patch)`` to ``(N, C_out, *patch)``. Its
        ``size_multiple`` attribute, when present, is honoured (patches are multiples of it).
    device
        A torch device string; the network is moved there.
    amp
        Autocast (bf16 where the GPU supports it, else fp16) on CUDA; None: on for CUDA only.
    batch_size
        Network inputs per call (patches, or with test-time flips patches x flips); None: from ``memory_budget`` (bytes; None: 80 % of free GPU memory, or on the
        CPU a quarter of the available memory, at most 2 GiB).
    max_batch_size
        Upper bound of the automatic batch size (default 32 on a GPU, 2 on the CPU, where larger
        batches gain nothing).
    accelerate
        Run an inference copy of the network (default on): batch norms folded into the convolutions
        before them (:func:`~SyntheticCTLib.models.architectures.fold_batch_norm`) and, on the CPU, the
        channels-last 3D memory layout (oneDNN's fast convolutions). Same weights, same result to float
        rounding. Where the copy cannot be made or fails, the network as given runs ("eager"); the log
        and :attr:`WindowPrediction.path` say which ran.
    """

    def __init__(
        self,
        network: Any,
        device: str = "cpu",
        *,
        amp: Optional[bool] = None,
        batch_size: Optional[int] = None,
        memory_budget: Optional[int] = None,
        max_batch_size: Optional[int] = None,
        accelerate: bool = True,
    ) -> None:
        import torch

        self.device = str(device)
        self.network = network.to(self.device) if hasattr(network, "to") else network
        if hasattr(self.network, "eval"):
            self.network.eval()
        self.amp = (self.device.startswith("cuda")) if amp is None else bool(amp and self.device.startswith("cuda"))
        self.amp_dtype = torch.bfloat16 if (self.amp and torch.cuda.is_bf16_supported()) else torch.float16
        if batch_size is not None and int(batch_size) < 1:
            raise InvalidParameterError(f"batch_size must be >= 1 (got {batch_size}).")
        self.batch_size = int(batch_size) if batch_size else None
        self.memory_budget = int(memory_budget) if memory_budget else None
        self.max_batch_size = max_batch_size
        self.fell_back_to_cpu = False
        self.multiple = int(getattr(network, "size_multiple", 1) or 1)
        self.accelerate = bool(accelerate)
        self._accelerated: Any = None
        self._accelerated_device: Optional[str] = None
        self._path_note = "eager (acceleration off)"
        self._channels_last = False

    # -- the network that runs --------------------------------------------------------------------
    @property
    def path(self) -> str:
        """``"accelerated"`` or ``"eager"``: the network that runs on the current device."""
        return "accelerated" if self._inference_network() is not self.network else "eager"

    def _inference_network(self) -> Any:
        """The accelerated copy of the network for the current device (built on first use), else the network."""
        if not self.accelerate:
            return self.network
        if self._accelerated_device != self.device:
            self._accelerated_device = self.device
            self._accelerated = self._build_accelerated()
        return self._accelerated if self._accelerated is not None else self.network

    def _build_accelerated(self) -> Any:
        """Fold the batch norms and, on the CPU, go channels-last; None (and a note why) where that is impossible."""
        import torch

        from SyntheticCTLib.models.architectures import fold_batch_norm

        if not isinstance(self.network, torch.nn.Module):
            self._path_note = "eager (the network is not a torch module)"
            return None
        try:
            n_norms = sum(isinstance(m, torch.nn.BatchNorm3d) for m in self.network.modules())
            net = fold_batch_norm(self.network)
            folded = n_norms - sum(isinstance(m, torch.nn.BatchNorm3d) for m in net.modules())
            channels_last = self.device == "cpu"
            if channels_last:
                net = net.to(memory_format=torch.channels_last_3d)
        except Exception as e:  # noqa: BLE001 - any failure leaves the eager network, which always works
            self._path_note = f"eager (no accelerated copy: {type(e).__name__}: {e})"
            return None
        self._channels_last = channels_last
        parts = [f"{folded} batch norm(s) folded into convolutions"] + (["channels-last 3D"] if channels_last else [])
        self._path_note = f"accelerated ({', '.join(parts)})"
        return net

    def _run_network(self, x):
        """The network on ``x`` (autocast on CUDA when ``amp``); a failing accelerated copy gives way to the eager one."""
        import torch

        net = self._inference_network()
        if net is not self.network and getattr(self, "_channels_last", False):
            x = x.contiguous(memory_format=torch.channels_last_3d)
        try:
            if self.amp:
                with torch.autocast(device_type="cuda", dtype=self.amp_dtype):
                    return net(x)
            return net(x)
        except Exception as e:  # noqa: BLE001 - out of memory is the caller's; anything else: eager
            if net is self.network or is_out_of_memory(e):
                raise
            logger.warning(
                "The accelerated network failed (%s: %s); continuing with the eager one.", type(e).__name__, e
            )
            self.accelerate = False
            self._accelerated = None
            self._path_note = f"eager (the accelerated network failed: {type(e).__name__})"
            return self._run_network(x.contiguous())

    # -- device handling --------------------------------------------------------------------------
    def _fall_back_to_cpu(self, error: BaseException) -> None:
        import torch

        logger.warning(
            "Out of memory on %s even with one patch per batch (%s); continuing on the CPU, which is slower.",
            self.device,
            str(error).splitlines()[0] if str(error) else type(error).__name__,
        )
        if hasattr(self.network, "to"):
            self.network = self.network.to("cpu")
        if self.device.startswith("cuda"):
            torch.cuda.empty_cache()
        self.device = "cpu"
        self.amp = False
        self.fell_back_to_cpu = True

    def _budget(self) -> int:
        import torch

        if self.memory_budget:
            return self.memory_budget
        if self.device.startswith("cuda"):
            free, _total = torch.cuda.mem_get_info(torch.device(self.device))
            return int(free * 0.8)
        return int(min(2 << 30, available_memory_bytes() // 4))

    def _max_batch(self) -> int:
        if self.max_batch_size:
            return int(self.max_batch_size)
        return 32 if self.device != "cpu" else 2

    # -- one batch --------------------------------------------------------------------------------
    def _forward(self, x, flips: Sequence[Flip], per_call: int):
        """The first flip's prediction and (with several flips) the population variance over all of them.

        The prediction is the first flip's (the identity by default), not the mean over the flips, so
        that asking for the spread does not change the sCT.

        The flipped copies of the batch are stacked into one network call (``per_call`` flips at a time),
        so that the flips of a patch share a batch; each output is flipped back before the statistics.
        """
        import torch

        n = x.shape[0]
        outputs = []
        for j in range(0, len(flips), max(1, per_call)):
            group = flips[j : j + max(1, per_call)]
            dims = [tuple(2 + a for a in flip) for flip in group]
            xin = [torch.flip(x, d) if d else x for d in dims]
            y = self._run_network(xin[0] if len(xin) == 1 else torch.cat(xin)).float()
            for k, d in enumerate(dims):
                yk = y[k * n : (k + 1) * n]
                outputs.append(torch.flip(yk, d) if d else yk)
        if len(outputs) == 1:
            return outputs[0], None
        if len(outputs) == 2:  # the default: (a - b)^2 / 4, without the stack (a full copy) or a reduction
            half = torch.sub(outputs[0], outputs[1]).mul_(0.5)
            return outputs[0], half.mul_(half)
        mean = torch.stack(outputs).mean(dim=0)
        var = torch.zeros_like(mean)
        for y in outputs:
            d = y - mean
            var.addcmul_(d, d)
        return outputs[0], var.div_(len(outputs))

    def _gather(
        self,
        channels: Sequence[Any],
        plan: PatchPlan,
        batch: Sequence[Tuple[int, int, int]],
        state: _BatchState,
        transform: Optional[Callable[[np.ndarray], Any]],
    ) -> np.ndarray:
        """Copy the patches of ``batch`` into the host buffer (zero beyond the volume), then ``transform`` them."""
        if state.buffer is None or state.buffer.shape[0] < len(batch):
            state.buffer = self._host_buffer((state.size, len(channels)) + plan.patch)
        buf = state.buffer[: len(batch)]
        pz, py, px = plan.patch
        for k, (z, y, x) in enumerate(batch):
            if plan.extent((z, y, x)) != plan.patch:
                buf[k].fill(0.0)  # the patch reaches beyond the volume: zero padding
            for c, ch in enumerate(channels):
                src = ch[z : z + pz, y : y + py, x : x + px]
                buf[k, c, : src.shape[0], : src.shape[1], : src.shape[2]] = src
        if transform is not None:
            transform(buf)
        return buf

    def _predict_batch(
        self,
        buf: np.ndarray,
        plan: PatchPlan,
        batch: Sequence[Tuple[int, int, int]],
        flips: Sequence[Flip],
        state: _BatchState,
        weight_cache: dict,
    ) -> Tuple[np.ndarray, Optional[np.ndarray]]:
        """The network's weighted prediction (and variance over the flips) of one batch, on the host.

        On a probing batch (CUDA, automatic batch size), the peak memory of the patch sets the batch size.
        """
        import torch

        if state.probe:
            torch.cuda.synchronize(self.device)
            state.probe_base = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        xb = torch.from_numpy(buf).to(self.device, non_blocking=True)
        mean, var = self._forward(xb, flips, state.flips_per_call)
        w = torch.stack([self._tile_weight(plan, t, weight_cache) for t in batch])[:, None]
        mean = (mean * w).cpu().numpy()
        var = (var * w).cpu().numpy() if var is not None else None
        if state.probe:
            peak = torch.cuda.max_memory_allocated(self.device) - state.probe_base
            state.size = max(1, min(self._max_batch(), self._budget() // max(int(peak * 1.2), 1)))
            state.probe = False
            logger.debug("One patch took %.0f MiB on %s; batch size %d.", peak / 2**20, self.device, state.size)
        return mean, var

    def _recover_from_out_of_memory(self, error: BaseException, state: _BatchState, patch: Tuple[int, ...]) -> None:
        """Halve the batch, then the flips per network call; at one of each move to the CPU; on the CPU, raise."""
        import torch

        state.probe = False
        if self.device.startswith("cuda"):
            torch.cuda.empty_cache()
        if state.size > 1:
            state.size = max(1, state.size // 2)
            logger.warning("Out of memory on %s; retrying with %d patches per batch.", self.device, state.size)
            return
        if state.flips_per_call > 1:
            state.flips_per_call = max(1, state.flips_per_call // 2)
            logger.warning(
                "Out of memory on %s; retrying with %d test-time flips per network call.",
                self.device,
                state.flips_per_call,
            )
            return
        if self.device != "cpu":
            self._fall_back_to_cpu(error)
            state.buffer = None
            return
        raise OutOfMemory(
            f"Out of memory on the CPU with one patch of {patch} voxels per batch. Free memory, or use "
            "a smaller patch_size."
        ) from error

    def _initial_batch(self, plan: PatchPlan, n_channels: int, n_flips: int) -> _BatchState:
        """The first batch: patches per batch and test-time flips per network call.

        A batch size (asked for, or on the CPU from a memory estimate) counts network inputs, so that
        flips cost no more memory than before they were batched: ``batch_size // n_flips`` patches per
        batch (at least one), with up to ``batch_size`` flips of them stacked in one call. On CUDA one
        probing patch with all its flips measures the memory instead.
        """
        inputs, probe = self.batch_size, False
        if inputs is None:
            if self.device.startswith("cuda"):
                return _BatchState(size=1, probe=True, flips_per_call=n_flips)
            per_input = estimate_patch_bytes(self.network, plan.patch, n_channels, n_flips=n_flips)
            inputs = max(1, min(self._max_batch(), self._budget() // max(per_input, 1)))
        size = max(1, min(inputs // n_flips, max(1, len(plan.tiles))))
        return _BatchState(size=size, probe=probe, flips_per_call=max(1, min(n_flips, inputs)))

    # -- the volume -------------------------------------------------------------------------------
    def predict(
        self,
        volume: Union[np.ndarray, Sequence[np.ndarray]],
        patch_size: Sequence[int],
        overlap: float = 0.5,
        *,
        transform: Optional[Callable[[np.ndarray], Any]] = None,
        mask: Optional[np.ndarray] = None,
        flips: Sequence[Flip] = ((),),
        sigma_scale: float = 0.125,
        progress: Optional[ProgressCallback] = None,
        cancel: Optional[CancelToken] = None,
    ) -> WindowPrediction:
        """Predict a whole volume patch by patch.

        Parameters
        ----------
        volume
            ``(C, Z, Y, X)`` array, or a list of C arrays ``(Z, Y, X)`` (e.g. views of SimpleITK
            images: they are read patch by patch, never copied whole).
        patch_size, overlap
            Patch size ``(Z, Y, X)`` (shrunk to the volume where it is smaller) and the fraction of
            it shared by neighbouring patches, in [0, 1).
        transform
            Called on each gathered batch ``(N, C, *patch)`` float32 in place (e.g. normalisation);
            the padding beyond the volume's edge (to a multiple of the network's ``size_multiple``,
            or up to the patch size) holds 0 before it.
        mask
            Optional boolean ``(Z, Y, X)``: patches with no True voxel are skipped.
        flips
            Test-time augmentation: tuples of array axes (0, 1, 2 = Z, Y, X) to flip; ``((),)`` is none.
            With several, :attr:`WindowPrediction.spread` holds the per-voxel standard deviation.
        progress, cancel
            Checked between batches; a cancellation raises :class:`~SyntheticCTLib.kernel.errors.Cancelled`.
        """
        t0 = time.perf_counter()
        channels, shape = _volume_channels(volume)
        plan = PatchPlan.make(shape, patch_size, overlap, multiple=self.multiple, sigma_scale=sigma_scale, mask=mask)
        flips = _checked_flips(flips)
        state = self._initial_batch(plan, len(channels), len(flips))
        self._inference_network()  # builds the accelerated copy now, so that the log says which path runs
        logger.info(
            "Sliding window: %d of %d patches of %s, batch %d x %d flip(s), on %s: %s.",
            len(plan.tiles),
            plan.n_patches,
            plan.patch,
            state.size,
            len(flips),
            self.device,
            self._path_note,
        )
        accumulator = _Accumulator(shape, with_variance=len(flips) > 1)
        self._run_patches(channels, plan, flips, state, accumulator, transform, progress or no_progress, cancel)
        if cancel is not None:
            cancel.check()
        output, spread = accumulator.finish(plan)
        (progress or no_progress)(1.0, "inference", f"{len(plan.tiles)} patches on {self.device}")
        return WindowPrediction(
            output=output,
            spread=spread,
            device=self.device,
            batch_size=state.size,
            n_patches=plan.n_patches,
            n_run=len(plan.tiles),
            fell_back_to_cpu=self.fell_back_to_cpu,
            elapsed_s=time.perf_counter() - t0,
            path=self.path,
        )

    def _run_patches(
        self,
        channels: Sequence[Any],
        plan: PatchPlan,
        flips: Sequence[Flip],
        state: _BatchState,
        accumulator: _Accumulator,
        transform: Optional[Callable[[np.ndarray], Any]],
        report: ProgressCallback,
        cancel: Optional[CancelToken],
    ) -> None:
        """Run the plan's patches batch by batch into ``accumulator``, adapting the batch to the memory."""
        import torch

        weight_cache: dict = {}
        i = 0
        with torch.inference_mode():
            while i < len(plan.tiles):
                if cancel is not None:
                    cancel.check()
                report(i / max(len(plan.tiles), 1), "inference", f"patch {i + 1} of {len(plan.tiles)} on {self.device}")
                batch = plan.tiles[i : i + state.size]
                buf = self._gather(channels, plan, batch, state, transform)
                try:
                    mean, var = self._predict_batch(buf, plan, batch, flips, state, weight_cache)
                except Exception as e:  # noqa: BLE001 - only out-of-memory errors are handled
                    if not is_out_of_memory(e):
                        raise
                    self._recover_from_out_of_memory(e, state, plan.patch)
                    continue
                accumulator.add(plan, batch, mean, var)
                i += len(batch)

    def _tile_weight(self, plan: PatchPlan, tile: Tuple[int, int, int], cache: dict):
        """The separable weight of one patch on the device (cached per kind: first, inner or last along each axis)."""
        import torch

        key = (self.device,) + plan.weight_key(tile)
        w = cache.get(key)
        if w is None:
            w = torch.from_numpy(plan.weight(tile)).to(self.device)
            cache[key] = w
        return w

    def _host_buffer(self, shape: Tuple[int, ...]) -> np.ndarray:
        import torch

        if self.device.startswith("cuda"):
            return torch.empty(shape, dtype=torch.float32, pin_memory=True).numpy()
        return np.empty(shape, dtype=np.float32)


def sliding_window_predict(
    network: Any,
    volume: Union[np.ndarray, Sequence[np.ndarray]],
    patch_size: Sequence[int],
    overlap: float = 0.5,
    *,
    device: str = "cpu",
    batch_size: Optional[int] = None,
    transform: Optional[Callable[[np.ndarray], Any]] = None,
    mask: Optional[np.ndarray] = None,
    sigma_scale: float = 0.125,
    amp: Optional[bool] = None,
    progress: Optional[ProgressCallback] = None,
    cancel: Optional[CancelToken] = None,
) -> np.ndarray:
    """Gaussian-blended sliding-window prediction of ``volume`` ``(C, Z, Y, X)``; returns ``(C_out, Z, Y, X)`` float32.

    A convenience over :class:`SlidingWindow` (see there and :meth:`SlidingWindow.predict`).
    """
    runner = SlidingWindow(network, device, amp=amp, batch_size=batch_size)
    return runner.predict(
        volume,
        patch_size,
        overlap,
        transform=transform,
        mask=mask,
        sigma_scale=sigma_scale,
        progress=progress,
        cancel=cancel,
    ).output


__all__ = [
    "DEFAULT_TTA_FLIPS",
    "OutOfMemory",
    "PatchPlan",
    "SlidingWindow",
    "WindowPrediction",
    "effective_patch_size",
    "estimate_patch_bytes",
    "gaussian_1d",
    "is_out_of_memory",
    "patch_starts",
    "sliding_window_predict",
]
