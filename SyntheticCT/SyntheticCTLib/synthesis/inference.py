"""Synthesis: MRI channels in, a synthetic CT (int16 HU) out, on the input's exact voxel grid.

Steps of :func:`synthesize`:

1. Check the channel count against the model's inputs, and that all inputs share one grid (others
   are resampled onto the first, with a warning).
2. Body mask of the input (:func:`~SyntheticCTLib.kernel.masks.mri_body_mask`).
3. Orientation: a model card's ``"orientation"`` of ``"input"`` (the default; also ``"native"``,
   ``"index"``, ``"any"``) means the network runs on the image's own index axes, whatever their
   direction cosines; a 3-letter code such as ``"LPS"`` or ``"RAS"`` (ITK/DICOM convention: the
   direction in which each index axis increases; ``"LPS"`` is the identity direction) permutes and
   flips the axes losslessly to the closest such orientation first (``sitk.DICOMOrient``) and back
   afterwards. No rotation is ever interpolated. In the object form ``{"training": "LPS",
   "inference": "input"}`` only ``"inference"`` acts (``"training"`` is information for input checks);
   :func:`~SyntheticCTLib.models.package.card_orientation` reads the field for both.
4. Resampling to the model's ``spacing_mm`` (linear; skipped when every spacing is within 1 % of it).
5. Normalisation per channel (statistics inside the body), applied patch by patch.
6. Sliding-window inference with Gaussian blending (:mod:`SyntheticCTLib.synthesis.sliding_window`); patches
   outside the body are skipped. The network runs as an accelerated inference copy (batch norms folded into
   the convolutions; channels-last on the CPU), the loaded network being the fallback; with test-time flips,
   the flipped copies of each batch run in one network call.
7. HU = ``clip(y * scale + offset, *clip)``; outside the body, air (-1000 HU).
8. Back onto the input grid (linear), the input-resolution body mask applied again, int16.

The result carries metadata: ``SyntheticCT|device``, ``SyntheticCT|model``, ``SyntheticCT|model_version``,
``SyntheticCT|notice`` (and ``ITK_FileNotes``, which NIfTI stores as ``descrip``) with
:data:`SyntheticCTLib.NOT_FOR_DIAGNOSTIC_USE`.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import SimpleITK as sitk

from SyntheticCTLib import NOT_FOR_DIAGNOSTIC_USE
from SyntheticCTLib.kernel.errors import InvalidParameterError
from SyntheticCTLib.kernel.geometry import describe_grid, grid_with_spacing, resample_like, same_grid
from SyntheticCTLib.kernel.hu import AIR_HU
from SyntheticCTLib.kernel.io import validate_volume
from SyntheticCTLib.kernel.masks import mri_body_mask
from SyntheticCTLib.kernel.progress import CancelToken, ProgressCallback, no_progress, scaled, with_cancel
from SyntheticCTLib.models.package import card_orientation
from SyntheticCTLib.synthesis.normalization import channel_normalizations, normalize_channels
from SyntheticCTLib.synthesis.sliding_window import (
    DEFAULT_TTA_FLIPS,
    SlidingWindow,
    WindowPrediction,
    sliding_window_predict,
)

logger = logging.getLogger(__name__)

SPACING_TOLERANCE = 0.01
"""Relative spacing difference below which the input is not resampled to the model's spacing."""
META_DEVICE = "SyntheticCT|device"
META_MODEL = "SyntheticCT|model"
META_MODEL_VERSION = "SyntheticCT|model_version"
META_NOTICE = "SyntheticCT|notice"


@dataclass
class WindowSettings:
    """Overrides of the sliding-window inference (None: the model's or an automatic value)."""

    patch_size: Optional[Sequence[int]] = None
    overlap: Optional[float] = None
    batch_size: Optional[int] = None
    memory_budget: Optional[int] = None
    """Bytes the batch may use (default: 80 % of free GPU memory; on the CPU 1/4 of free memory, <= 2 GiB)."""
    amp: Optional[bool] = None
    """Autocast on CUDA (bf16 where supported, else fp16); default on."""
    skip_empty: bool = True
    """Skip patches holding no body voxel."""
    body_mask: bool = True
    """Set voxels outside the body to air; False keeps the network's output everywhere."""
    sigma_scale: float = 0.125
    accelerate: bool = True
    """Run the accelerated inference copy of the network (batch norms folded, channels-last on the CPU);
    False: the network as loaded (the eager path). Same result to float rounding; see :class:`SlidingWindow`."""
    tta_flips: Sequence[Tuple[int, ...]] = DEFAULT_TTA_FLIPS

    @classmethod
    def from_any(cls, window: Union[None, WindowSettings, Mapping[str, Any]]) -> WindowSettings:
        if window is None:
            return cls()
        if isinstance(window, cls):
            return window
        if isinstance(window, Mapping):
            known = {f.name for f in dataclasses.fields(cls)}
            unknown = sorted(set(window) - known)
            if unknown:
                raise InvalidParameterError(f"Unknown window setting(s) {unknown}; known: {sorted(known)}.")
            return cls(**dict(window))
        raise InvalidParameterError(f"window must be a WindowSettings or a dict (got {type(window).__name__}).")


@dataclass
class SynthesisResult:
    """What :meth:`Synthesizer.run` returns."""

    image: sitk.Image
    """The synthetic CT, int16 HU, on the input grid."""
    uncertainty: Optional[sitk.Image]
    """With TTA: float32 per-voxel spread (standard deviation across flips) in HU, else None."""
    device: str
    model_name: str
    model_version: str
    elapsed_s: float
    batch_size: int
    n_patches: int
    n_run: int
    fell_back_to_cpu: bool = False
    path: str = "eager"
    """The network that ran: ``"accelerated"`` or ``"eager"`` (:attr:`WindowPrediction.path`)."""

    def to_dict(self) -> Dict[str, Any]:
        return {
            "device": self.device,
            "model": self.model_name,
            "model_version": self.model_version,
            "elapsed_s": round(self.elapsed_s, 3),
            "batch_size": self.batch_size,
            "n_patches": self.n_patches,
            "n_patches_run": self.n_run,
            "fell_back_to_cpu": self.fell_back_to_cpu,
            "inference_path": self.path,
            "uncertainty": self.uncertainty is not None,
            "size": list(self.image.GetSize()),
            "notice": NOT_FOR_DIAGNOSTIC_USE,
        }


# -- devices -------------------------------------------------------------------------------------------


def _mps_available() -> bool:
    import torch

    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_available())


def select_device(device: Optional[str] = "auto") -> str:
    """Resolve ``"auto"`` to ``"cuda"``, then ``"mps"``, then ``"cpu"``; check an explicit choice exists.

    Raises
    ------
    InvalidParameterError
        An unknown device, or one this machine's torch cannot use.
    """
    import torch

    name = str(device or "auto").strip().lower()
    if name == "auto":
        if torch.cuda.is_available():
            return "cuda"
        if _mps_available():
            return "mps"
        return "cpu"
    if name == "cpu":
        return "cpu"
    if name == "cuda" or name.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise InvalidParameterError(
                f"Device '{device}' was asked for, but this torch ({torch.__version__}) sees no CUDA GPU. "
                "Use --device auto or cpu."
            )
        if ":" in name:
            try:
                index = int(name.split(":", 1)[1])
            except ValueError:
                raise InvalidParameterError(f"Bad CUDA device '{device}'; use cuda or cuda:N.") from None
            if not 0 <= index < torch.cuda.device_count():
                raise InvalidParameterError(
                    f"Device '{device}' does not exist; this machine has {torch.cuda.device_count()} CUDA GPU(s)."
                )
        return name
    if name == "mps":
        if not _mps_available():
            raise InvalidParameterError("Device 'mps' was asked for, but Apple's Metal backend is not available.")
        return "mps"
    raise InvalidParameterError(f"Unknown device '{device}'; use auto, cpu, cuda, cuda:N or mps.")


# -- helpers ---------------------------------------------------------------------------------------------


def _orientation_code(model: Any) -> Optional[str]:
    """The orientation the inference flips inputs to (None: the input's own axes); see ``card_orientation``."""
    try:
        return card_orientation(getattr(model, "card", {}) or {})[1]
    except ValueError as e:
        raise InvalidParameterError(f"Model '{getattr(model, 'name', '?')}': {e}.") from None


def _orient(image: sitk.Image, code: Optional[str]) -> sitk.Image:
    return sitk.DICOMOrient(image, code) if code else image


def _orientation_of(image: sitk.Image) -> str:
    return sitk.DICOMOrientImageFilter.GetOrientationFromDirectionCosines(image.GetDirection())


def _needs_resampling(image: sitk.Image, spacing: Sequence[float]) -> bool:
    current = np.asarray(image.GetSpacing(), dtype=float)
    target = np.asarray(spacing, dtype=float)
    return bool(np.any(np.abs(current - target) > SPACING_TOLERANCE * target))


def _mask_image(mask: np.ndarray, reference: sitk.Image) -> sitk.Image:
    image = sitk.GetImageFromArray(mask.astype(np.uint8))
    image.CopyInformation(reference)
    return image


def check_inputs(mri_images: Sequence[sitk.Image], model: Any) -> list:
    """Check the channel count and the grids; return the images, resampled onto the first where needed.

    Raises
    ------
    InvalidParameterError
        Wrong number of images (the message lists the inputs the model expects).
    """
    images = list(mri_images)
    expected = int(model.in_channels)
    names = list(getattr(model, "input_names", [])) or [f"input {i + 1}" for i in range(expected)]
    if len(images) != expected:
        listed = "; ".join(f"{i + 1}: {n}" for i, n in enumerate(names))
        raise InvalidParameterError(
            f"Model '{model.name}' {model.version} takes {expected} MRI input(s), in this order: {listed}. "
            f"Got {len(images)}."
        )
    for i, image in enumerate(images):
        validate_volume(image, f"MRI input {i + 1} ({names[i]})")
    reference = images[0]
    for i in range(1, len(images)):
        if not same_grid(reference, images[i]):
            logger.warning(
                "MRI input %d (%s) is on another grid than input 1 (%s vs %s); resampling it onto "
                "input 1's grid (linear).",
                i + 1,
                names[i],
                describe_grid(images[i]),
                describe_grid(reference),
            )
            images[i] = resample_like(images[i], reference, pixel_type=sitk.sitkFloat32)
    return images


def _to_int16(array: np.ndarray, lo: float, hi: float, slab: int = 16) -> np.ndarray:
    """Round, clip and cast to int16, slab by slab (no full-size float temporary)."""
    out = np.empty(array.shape, dtype=np.int16)
    for z in range(0, array.shape[0], slab):
        part = np.rint(array[z : z + slab])
        np.clip(part, lo, hi, out=part)
        out[z : z + slab] = part
    return out


@dataclass
class _ModelGrid:
    """The inputs and the body mask on the model's grid (orientation and spacing), as :meth:`Synthesizer.run` needs them."""

    images: List[sitk.Image]
    grid: sitk.Image
    """The model grid's geometry (the first image)."""
    mask: Optional[np.ndarray]
    """The body mask on the model grid."""
    resampled: bool
    """The spacing was resampled (else the model grid is the input grid, perhaps reoriented)."""


# -- the synthesizer --------------------------------------------------------------------------------------


class Synthesizer:
    """A model's network loaded on a device, reusable for many cases.

    Parameters
    ----------
    model
        A :class:`~SyntheticCTLib.models.package.ModelPackage` (or an object with the same attributes:
        ``name``, ``version``, ``in_channels``, ``input_names``, ``spacing_mm``, ``patch_size``,
        ``overlap``, ``normalization``, ``output``, ``card`` and ``build_network(device)``).
    device
        ``"auto"`` (cuda, then mps, then cpu), ``"cpu"``, ``"cuda"``, ``"cuda:N"`` or ``"mps"``.
    window
        :class:`WindowSettings` or a dict of its fields.
    network
        An already built network to use instead of ``model.build_network`` (e.g. during training).
    """

    def __init__(
        self,
        model: Any,
        *,
        device: str = "auto",
        window: Union[None, WindowSettings, Mapping] = None,
        network: Any = None,
    ) -> None:
        self.model = model
        self.window = WindowSettings.from_any(window)
        self.device = select_device(device)
        self.orientation = _orientation_code(model)
        net = network if network is not None else model.build_network("cpu")
        self.runner = SlidingWindow(
            net,
            self.device,
            amp=self.window.amp,
            batch_size=self.window.batch_size,
            memory_budget=self.window.memory_budget,
            accelerate=self.window.accelerate,
        )
        logger.info("Model %s %s on %s.", model.name, model.version, self.device)

    @property
    def patch_size(self) -> Tuple[int, int, int]:
        """Patch size in array ``(Z, Y, X)`` order, as a card's ``patch_size`` (and the training) gives it.

        (A card's ``spacing_mm``, by contrast, is in image ``(x, y, z)`` order, as SimpleITK gives spacing.)
        """
        size = self.window.patch_size or self.model.patch_size
        return tuple(int(p) for p in size)

    def run(
        self,
        mri_images: Sequence[sitk.Image],
        *,
        progress: Optional[ProgressCallback] = None,
        cancel: Optional[CancelToken] = None,
        tta: bool = False,
    ) -> SynthesisResult:
        """Synthesise one case; see :func:`synthesize`.

        Stages: check the inputs, body mask, the model's grid, the sliding window, HU, back onto the
        input grid, metadata. Large arrays are dropped as soon as a stage is done with them (the peak
        memory of a 512x512x300 input is a goal).
        """
        t0 = time.perf_counter()
        report = with_cancel(progress or no_progress, cancel)
        report(0.0, "preparing", "checking inputs")
        images = check_inputs(mri_images, self.model)
        reference = images[0]
        report(0.02, "preparing", "body mask")
        body = self._body_mask(images)
        report(0.06, "preparing", "resampling to the model's grid")
        grid = self._model_grid(images, body)
        del images
        prediction = self._predict(grid, tta, report, cancel)
        report(0.9, "finishing", "HU and resampling back")
        hu, spread = self._to_hu(prediction, grid.mask)
        stats = (prediction.batch_size, prediction.n_patches, prediction.n_run, prediction.path)
        del prediction
        grid.images, grid.mask = [], None
        result_image = self._sct_on_input_grid(hu, grid, reference, body)
        del hu
        uncertainty = self._spread_on_input_grid(spread, grid, reference, body) if spread is not None else None
        del spread
        device = self.runner.device
        for img in (result_image, uncertainty):
            if img is not None:
                self._stamp(img, device)
        elapsed = time.perf_counter() - t0
        report(1.0, "finishing", f"done on {device} in {elapsed:.1f} s")
        logger.info(
            "Synthetic CT computed on %s in %.1f s (%d of %d patches run, batch %d, %s network).",
            device,
            elapsed,
            stats[2],
            stats[1],
            stats[0],
            stats[3],
        )
        return SynthesisResult(
            image=result_image,
            uncertainty=uncertainty,
            device=device,
            model_name=str(self.model.name),
            model_version=str(self.model.version),
            elapsed_s=elapsed,
            batch_size=stats[0],
            n_patches=stats[1],
            n_run=stats[2],
            fell_back_to_cpu=self.runner.fell_back_to_cpu,
            path=stats[3],
        )

    # -- the stages of run ------------------------------------------------------------------------------

    @property
    def _air(self) -> float:
        """Air in HU, within the model's output clip."""
        lo, hi = (float(v) for v in self.model.output["clip"])
        return float(min(max(AIR_HU, lo), hi))

    def _body_mask(self, images: Sequence[sitk.Image]) -> np.ndarray:
        """The body mask on the input grid (all True when the window setting ``body_mask`` is off or none is found)."""
        views = [sitk.GetArrayViewFromImage(im) for im in images]
        if not self.window.body_mask:
            return np.ones(views[0].shape, dtype=bool)
        body = mri_body_mask(views)
        if not body.any():
            logger.warning("No body found in the MRI (it is blank or nearly so); treating the whole volume as body.")
            body[...] = True
        return body

    def _model_grid(self, images: Sequence[sitk.Image], body: np.ndarray) -> _ModelGrid:
        """The inputs and the body mask on the model's grid: the model's orientation, then its spacing."""
        reference = images[0]
        oriented = [_orient(im, self.orientation) for im in images]
        spacing = self.model.spacing_mm
        if _needs_resampling(oriented[0], spacing):
            grid = grid_with_spacing(oriented[0], spacing)
            model_images = [resample_like(im, grid, pixel_type=sitk.sitkFloat32) for im in oriented]
            mask_image = _orient(_mask_image(body, reference), self.orientation)
            mask = sitk.GetArrayFromImage(resample_like(mask_image, grid, interpolator=sitk.sitkNearestNeighbor))
            mask = mask.astype(bool)
            if not mask.any():
                mask[...] = True
            return _ModelGrid(model_images, grid, mask, resampled=True)
        if self.orientation:
            mask = sitk.GetArrayFromImage(_orient(_mask_image(body, reference), self.orientation)).astype(bool)
        else:
            mask = body
        return _ModelGrid(oriented, oriented[0], mask, resampled=False)

    def _predict(
        self, grid: _ModelGrid, tta: bool, progress: ProgressCallback, cancel: Optional[CancelToken]
    ) -> WindowPrediction:
        """Normalise (patch by patch) and run the sliding window on the model grid (progress 0.1 to 0.9)."""
        window = self.window
        arrays = [sitk.GetArrayViewFromImage(im) for im in grid.images]
        progress(0.1, "preparing", "normalising")
        maps = channel_normalizations(arrays, grid.mask, self.model.normalization)

        def normalise(batch: np.ndarray) -> None:
            for c, m in enumerate(maps):
                m.apply(batch[:, c], out=batch[:, c])

        overlap = float(window.overlap if window.overlap is not None else self.model.overlap)
        prediction = self.runner.predict(
            arrays,
            self.patch_size,
            overlap,
            transform=normalise,
            mask=grid.mask if (window.skip_empty and window.body_mask) else None,
            flips=list(window.tta_flips) if tta else [()],
            sigma_scale=window.sigma_scale,
            progress=scaled(progress, 0.12, 0.9),
            cancel=cancel,
        )
        if prediction.output.shape[0] != 1:
            logger.warning(
                "The network returned %d channels; channel 1 is the synthetic CT.", prediction.output.shape[0]
            )
        return prediction

    def _to_hu(self, prediction: WindowPrediction, mask: np.ndarray) -> Tuple[np.ndarray, Optional[np.ndarray]]:
        """Channel 1 of the prediction in HU (in place), air outside the body; the spread in HU, 0 outside."""
        out = self.model.output
        scale, offset = float(out["scale"]), float(out["offset"])
        lo, hi = float(out["clip"][0]), float(out["clip"][1])
        hu = prediction.output[0]
        hu *= np.float32(scale)
        hu += np.float32(offset)
        np.clip(hu, lo, hi, out=hu)
        if self.window.body_mask:
            hu[~mask] = self._air
        spread = None
        if prediction.spread is not None:
            spread = prediction.spread[0]
            spread *= np.float32(abs(scale))
            if self.window.body_mask:
                spread[~mask] = 0.0
        return hu, spread

    def _sct_on_input_grid(
        self, hu: np.ndarray, grid: _ModelGrid, reference: sitk.Image, body: np.ndarray
    ) -> sitk.Image:
        """The HU array (model grid) -> int16 image on the input grid, air outside the input-grid body mask."""
        lo, hi = (float(v) for v in self.model.output["clip"])
        if not grid.resampled and not self.orientation:  # the model grid is the input grid: no float image needed
            hu16 = _to_int16(hu, lo, hi)
        else:
            image = self._to_input_grid(hu, grid.grid, reference, self._air)
            hu16 = _to_int16(sitk.GetArrayViewFromImage(image), lo, hi)
            del image
        if self.window.body_mask:
            hu16[~body] = int(round(self._air))
        result = sitk.GetImageFromArray(hu16)
        result.CopyInformation(reference)
        return result

    def _spread_on_input_grid(
        self, spread: np.ndarray, grid: _ModelGrid, reference: sitk.Image, body: np.ndarray
    ) -> sitk.Image:
        """The spread array (model grid) -> float32 image on the input grid, 0 outside the body."""
        unc = self._to_input_grid(spread, grid.grid, reference, 0.0)
        if not self.window.body_mask:
            return unc
        arr = sitk.GetArrayFromImage(unc)
        arr[~body] = 0.0
        uncertainty = sitk.GetImageFromArray(arr)
        uncertainty.CopyInformation(reference)
        return uncertainty

    def _stamp(self, image: sitk.Image, device: str) -> None:
        """Write the device, the model and the not-for-diagnostic-use notice into the image's metadata."""
        image.SetMetaData(META_DEVICE, device)
        image.SetMetaData(META_MODEL, str(self.model.name))
        image.SetMetaData(META_MODEL_VERSION, str(self.model.version))
        image.SetMetaData(META_NOTICE, NOT_FOR_DIAGNOSTIC_USE)
        image.SetMetaData("ITK_FileNotes", NOT_FOR_DIAGNOSTIC_USE[:79])

    def _to_input_grid(
        self, array: np.ndarray, model_grid: sitk.Image, reference: sitk.Image, default: float
    ) -> sitk.Image:
        """An array on the model grid -> a float32 image on the input grid (exact geometry)."""
        image = sitk.GetImageFromArray(array)
        image.CopyInformation(model_grid)
        if self.orientation:
            image = sitk.DICOMOrient(image, _orientation_of(reference))
        if same_grid(image, reference):
            image.CopyInformation(reference)
            return image
        return resample_like(image, reference, default_value=default, pixel_type=sitk.sitkFloat32)


def synthesize(
    mri_images: Sequence[sitk.Image],
    model: Any,
    *,
    device: str = "auto",
    progress: Optional[ProgressCallback] = None,
    cancel: Optional[CancelToken] = None,
    tta: bool = False,
    window: Union[None, WindowSettings, Mapping[str, Any]] = None,
) -> sitk.Image:
    """Synthesise a CT from MRI channels with a model package.

    Parameters
    ----------
    mri_images
        One ``sitk.Image`` per model input, in the model's order (``model.input_names``).
    model
        A loaded :class:`~SyntheticCTLib.models.package.ModelPackage`.
    device
        ``"auto"`` (cuda, then mps, then cpu), ``"cpu"``, ``"cuda"``, ``"cuda:N"`` or ``"mps"``. The
        device that ran is in the result's ``SyntheticCT|device`` metadata (``"cpu"`` after an
        out-of-memory fallback from a GPU).
    progress, cancel
        Progress callback (stages ``preparing``, ``inference``, ``finishing``) and cancel token,
        checked between batches; cancelling raises :class:`~SyntheticCTLib.kernel.errors.Cancelled`.
    tta
        Flip test-time augmentation: the spread across the flips as well (the sCT is the identity pass's,
        the same as without); see :func:`synthesize_with_uncertainty`.
    window
        :class:`WindowSettings` overrides (patch size, overlap, batch size, memory budget, ...).

    Returns
    -------
    sitk.Image
        int16 HU with the input's exact size, origin, spacing and direction.
    """
    return (
        Synthesizer(model, device=device, window=window)
        .run(mri_images, progress=progress, cancel=cancel, tta=tta)
        .image
    )


def synthesize_with_uncertainty(
    mri_images: Sequence[sitk.Image],
    model: Any,
    *,
    device: str = "auto",
    progress: Optional[ProgressCallback] = None,
    cancel: Optional[CancelToken] = None,
    window: Union[None, WindowSettings, Mapping[str, Any]] = None,
) -> Tuple[sitk.Image, sitk.Image]:
    """Synthesise with flip test-time augmentation; return ``(sct, spread)``.

    ``spread`` is float32, in HU, on the input grid: the per-voxel standard deviation of the
    predictions across the flips (the identity and all axes flipped, two passes; :attr:`WindowSettings.tta_flips`),
    blended across patches like the prediction; 0 outside the body. ``sct`` is the identity pass, the
    same image as :func:`synthesize` gives.
    """
    result = Synthesizer(model, device=device, window=window).run(
        mri_images, progress=progress, cancel=cancel, tta=True
    )
    return result.image, result.uncertainty


__all__ = [
    "AIR_HU",
    "SynthesisResult",
    "Synthesizer",
    "WindowSettings",
    "check_inputs",
    "mri_body_mask",
    "normalize_channels",
    "select_device",
    "sliding_window_predict",
    "synthesize",
    "synthesize_with_uncertainty",
]
