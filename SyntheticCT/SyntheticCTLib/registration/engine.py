"""One resolution level of a SimpleITK registration: metric set-up, optimization, progress and cancel.

The caller builds the level images (see :mod:`.pyramid`); this module runs
``sitk.ImageRegistrationMethod`` on them with a fixed random seed for the metric samples, so that a
run is reproducible. Progress is reported per iteration; a progress callback that raises
:class:`~SyntheticCTLib.kernel.errors.Cancelled` stops the optimizer cleanly and the exception propagates.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Optional

import SimpleITK as sitk

from SyntheticCTLib.kernel.errors import InvalidParameterError, SyntheticCTError
from SyntheticCTLib.kernel.progress import ProgressCallback, no_progress

logger = logging.getLogger(__name__)

DEFAULT_SEED = 20240531
"""Seed of the random metric samples: the same inputs give the same result."""

MATTES_BINS = 32
SAMPLING_STRATEGY = "regular"
"""``regular``: a jittered regular grid of samples (stratified: less noise than ``random`` for as many samples)."""

_OVERLAP_MESSAGES = (
    "All samples map outside moving image buffer",
    "Too many samples map outside moving image buffer",
    "Joint PDF summed to zero",
    "ComputeResults: zero",
)


class RegistrationError(SyntheticCTError):
    """Registration could not run or failed (e.g. the images do not overlap)."""


class NonOverlapError(RegistrationError):
    """The fixed and the moving image do not overlap (enough) under the current transform."""


@dataclass
class LevelResult:
    """Outcome of one optimization."""

    transform: sitk.Transform
    metric_value: float
    iterations: int
    stop_condition: str
    max_iterations: int

    @property
    def hit_iteration_limit(self) -> bool:
        return self.iterations >= self.max_iterations


def sampling_fraction(eligible_voxels: int, max_samples: int) -> float:
    """Fraction of voxels to sample so that about ``max_samples`` of ``eligible_voxels`` are used (at most 1)."""
    if eligible_voxels <= 0:
        return 1.0
    return min(1.0, float(max_samples) / float(eligible_voxels))


def make_method(
    metric: str,
    *,
    sampling: float = 1.0,
    seed: int = DEFAULT_SEED,
    fixed_mask: Optional[sitk.Image] = None,
    moving_mask: Optional[sitk.Image] = None,
    mattes_bins: int = MATTES_BINS,
) -> sitk.ImageRegistrationMethod:
    """An ``ImageRegistrationMethod`` with ``metric`` (correlation, meansquares, mattes), linear interpolation
    and random sampling of ``sampling`` of the fixed voxels (all voxels when 1)."""
    method = sitk.ImageRegistrationMethod()
    if metric == "correlation":
        method.SetMetricAsCorrelation()
    elif metric == "meansquares":
        method.SetMetricAsMeanSquares()
    elif metric == "mattes":
        method.SetMetricAsMattesMutualInformation(numberOfHistogramBins=int(mattes_bins))
    else:
        raise InvalidParameterError(f"Unknown metric '{metric}'.")
    # Gradients at the sample points only (no full-volume gradient images): much faster with sampling.
    method.SetMetricUseFixedImageGradientFilter(False)
    method.SetMetricUseMovingImageGradientFilter(False)
    method.SetInterpolator(sitk.sitkLinear)
    if sampling >= 1.0:
        method.SetMetricSamplingStrategy(method.NONE)
    else:
        method.SetMetricSamplingStrategy(method.REGULAR if SAMPLING_STRATEGY == "regular" else method.RANDOM)
        method.SetMetricSamplingPercentage(float(max(sampling, 1e-6)), int(seed))
    if fixed_mask is not None:
        method.SetMetricFixedMask(fixed_mask)
    if moving_mask is not None:
        method.SetMetricMovingMask(moving_mask)
    return method


class quiet_itk:
    """Context manager: no ITK warnings on stderr inside (e.g. "no valid points" for a search candidate
    without overlap, which the caller handles), the previous setting restored after."""

    def __enter__(self) -> quiet_itk:
        self.previous = sitk.ProcessObject.GetGlobalWarningDisplay()
        sitk.ProcessObject.SetGlobalWarningDisplay(False)
        return self

    def __exit__(self, *exc) -> bool:
        sitk.ProcessObject.SetGlobalWarningDisplay(self.previous)
        return False


def copy_transform(transform: sitk.Transform) -> sitk.Transform:
    """An independent copy of ``transform`` with its concrete type (Euler3DTransform, AffineTransform...)."""
    concrete = transform.Downcast()
    return type(concrete)(concrete)


def _translate_error(error: RuntimeError) -> SyntheticCTError:
    text = str(error)
    if any(m in text for m in _OVERLAP_MESSAGES):
        return NonOverlapError(
            "The fixed and moving images do not overlap enough for registration (SimpleITK: all or too many "
            "samples map outside the moving image). Check that both images show the same anatomy, that the masks "
            "cover it, or use the automatic initialization."
        )
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    detail = lines[-1] if lines else "unknown cause"
    return RegistrationError(f"SimpleITK registration failed: {detail}")


def evaluate_metric(
    method: sitk.ImageRegistrationMethod, fixed: sitk.Image, moving: sitk.Image, transform: sitk.Transform
) -> Optional[float]:
    """Metric value of ``transform`` (None when the images do not overlap under it)."""
    method.SetInitialTransform(transform, inPlace=False)
    try:
        value = float(method.MetricEvaluate(fixed, moving))
    except RuntimeError:
        return None
    if value != value or abs(value) > 1e30:  # NaN or the metric's "no valid points" maximum
        return None
    return value


def _set_optimizer(
    method: sitk.ImageRegistrationMethod,
    optimizer: str,
    max_iterations: int,
    step: float,
    min_step: float,
    relaxation: float,
) -> None:
    """Configure ``method``'s optimizer (see :func:`optimize`)."""
    if optimizer == "rsgd":
        method.SetOptimizerAsRegularStepGradientDescent(
            learningRate=float(step),
            minStep=float(min_step),
            numberOfIterations=int(max_iterations),
            relaxationFactor=float(relaxation),
            gradientMagnitudeTolerance=1e-12,
            estimateLearningRate=method.Never,
        )
        method.SetOptimizerScalesFromPhysicalShift()
    elif optimizer == "lbfgsb":
        method.SetOptimizerAsLBFGSB(
            gradientConvergenceTolerance=1e-6,
            numberOfIterations=int(max_iterations),
            maximumNumberOfCorrections=5,
            maximumNumberOfFunctionEvaluations=4 * int(max_iterations),
            costFunctionConvergenceFactor=1e7,
        )
    else:
        raise InvalidParameterError(f"Unknown optimizer '{optimizer}'.")


def optimize(
    method: sitk.ImageRegistrationMethod,
    fixed: sitk.Image,
    moving: sitk.Image,
    transform: sitk.Transform,
    *,
    max_iterations: int,
    optimizer: str = "rsgd",
    step: float = 1.0,
    min_step: float = 1e-3,
    relaxation: float = 0.5,
    moving_initial: Optional[sitk.Transform] = None,
    report: Optional[ProgressCallback] = None,
    stage: str = "registration",
    label: str = "",
) -> LevelResult:
    """Optimize ``transform`` (a copy is returned) on one level.

    ``optimizer`` ``"rsgd"`` is regular-step gradient descent with physical-shift parameter scales,
    starting at ``step``, multiplied by ``relaxation`` whenever the gradient turns back, and stopping at
    ``min_step`` (steps in mm of voxel motion); ``"lbfgsb"`` is
    L-BFGS-B (for B-splines). ``moving_initial`` is a fixed transform composed before the optimized
    one (``moving_initial(transform(x))``).
    """
    report = report or no_progress
    _set_optimizer(method, optimizer, max_iterations, step, min_step, relaxation)
    if moving_initial is not None:
        method.SetMovingInitialTransform(moving_initial)
    start = copy_transform(transform)
    method.SetInitialTransform(start, inPlace=True)

    failure: list = []
    state = {"last": -1.0}

    def on_iteration() -> None:
        if failure:
            return
        iteration = method.GetOptimizerIteration()
        fraction = min(1.0, (iteration + 1) / float(max_iterations))
        if fraction - state["last"] < 0.01 and fraction < 1.0:
            return
        state["last"] = fraction
        try:
            report(fraction, stage, f"{label}iteration {iteration + 1}, metric {method.GetMetricValue():.5g}")
        except BaseException as e:  # noqa: B036 - re-raised after the optimizer stopped
            failure.append(e)
            method.StopRegistration()

    method.AddCommand(sitk.sitkIterationEvent, on_iteration)
    try:
        method.Execute(fixed, moving)
    except RuntimeError as e:
        if failure:
            raise failure[0] from None
        raise _translate_error(e) from e
    finally:
        method.RemoveAllCommands()
    if failure:
        raise failure[0]
    return LevelResult(
        transform=start,
        metric_value=float(method.GetMetricValue()),
        iterations=int(method.GetOptimizerIteration()),
        stop_condition=method.GetOptimizerStopConditionDescription(),
        max_iterations=int(max_iterations),
    )
