"""Automatic initialization of a rigid registration: centres, moments, then a coarse rotation search.

Scans of one patient can start far apart (another position, another field of view, another scanner
frame). Three translations are tried: the images as they are (only when they overlap), their
field-of-view centres aligned (geometry), and their body centroids aligned (moments). Around each,
a grid of Euler rotations is scored on the coarsest level with the registration metric, weighted by
the fraction of the fixed body that lands inside the moving field of view (a tiny overlap with a good
local metric must not win). The best few are refined on the coarse level and the best result is kept.
"""

from __future__ import annotations

import itertools
import logging
import math
from dataclasses import dataclass, field
from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np
import SimpleITK as sitk

from SyntheticCTLib.kernel.errors import InvalidParameterError
from SyntheticCTLib.registration import INITIALIZATIONS
from SyntheticCTLib.registration.engine import NonOverlapError, RegistrationError, evaluate_metric, quiet_itk

logger = logging.getLogger(__name__)


MIN_OVERLAP = 0.10
"""Fraction of the fixed body that must map inside the moving field of view to register at all."""

CANDIDATE_MIN_OVERLAP = 0.25


@dataclass
class Initialization:
    """The chosen starting transform and how it was found."""

    transform: sitk.Euler3DTransform
    method: str
    rotation_deg: Tuple[float, float, float]
    overlap: float
    candidates: int
    score: Optional[float] = None
    refined: List[dict] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {
            "method": self.method,
            "rotation_deg": [round(a, 3) for a in self.rotation_deg],
            "overlap": round(self.overlap, 4),
            "candidates": self.candidates,
            "score": None if self.score is None else float(self.score),
        }


def physical_centre(image: sitk.Image) -> np.ndarray:
    """World coordinates of the centre of ``image``'s field of view."""
    size = np.asarray(image.GetSize(), dtype=float)
    return np.asarray(image.TransformContinuousIndexToPhysicalPoint(tuple((size - 1.0) / 2.0)))


def index_to_world_matrix(image: sitk.Image) -> Tuple[np.ndarray, np.ndarray]:
    """(M, origin) with world = M @ index + origin."""
    direction = np.asarray(image.GetDirection(), dtype=float).reshape(3, 3)
    return direction * np.asarray(image.GetSpacing(), dtype=float)[None, :], np.asarray(image.GetOrigin(), dtype=float)


def mask_points(mask: sitk.Image, max_points: int = 20000, seed: int = 0) -> np.ndarray:
    """World coordinates of (at most ``max_points``, evenly drawn) nonzero voxels of ``mask``, shape (n, 3)."""
    array = sitk.GetArrayViewFromImage(mask)
    zyx = np.argwhere(array != 0)
    if len(zyx) > max_points:
        rng = np.random.default_rng(seed)
        zyx = zyx[np.sort(rng.choice(len(zyx), max_points, replace=False))]
    matrix, origin = index_to_world_matrix(mask)
    return zyx[:, ::-1].astype(float) @ matrix.T + origin


def linear_parts(transform: sitk.Transform) -> Tuple[np.ndarray, np.ndarray]:
    """(A, b) with ``transform(x) = A @ x + b`` for a linear transform (Euler, versor, similarity, affine)."""
    t = transform.Downcast()
    if not hasattr(t, "GetMatrix"):
        raise InvalidParameterError(f"{t.GetName()} is not a linear transform.")
    a = np.asarray(t.GetMatrix(), dtype=float).reshape(3, 3)
    centre = np.asarray(t.GetCenter(), dtype=float)
    translation = np.asarray(t.GetTranslation(), dtype=float)
    return a, translation + centre - a @ centre


def transform_points(transform: sitk.Transform, points: np.ndarray) -> np.ndarray:
    """Apply ``transform`` to world points ``(n, 3)``; vectorized for linear transforms."""
    points = np.asarray(points, dtype=float).reshape(-1, 3)
    try:
        a, b = linear_parts(transform)
    except InvalidParameterError:
        return np.array([transform.TransformPoint(tuple(p)) for p in points], dtype=float).reshape(-1, 3)
    return points @ a.T + b


def inside_fraction(points: np.ndarray, image: sitk.Image) -> float:
    """Fraction of world ``points`` inside ``image``'s field of view (voxel centres +- half a voxel)."""
    if len(points) == 0:
        return 0.0
    matrix, origin = index_to_world_matrix(image)
    index = (np.asarray(points) - origin) @ np.linalg.inv(matrix).T
    upper = np.asarray(image.GetSize(), dtype=float) - 0.5
    inside = np.all((index >= -0.5) & (index <= upper), axis=1)
    return float(np.mean(inside))


def overlap_fraction(transform: sitk.Transform, fixed_points: np.ndarray, moving: sitk.Image) -> float:
    """Fraction of the fixed body points that ``transform`` maps inside the moving field of view."""
    return inside_fraction(transform_points(transform, fixed_points), moving)


def check_overlap(
    transform: sitk.Transform, fixed_points: np.ndarray, moving: sitk.Image, minimum: float = MIN_OVERLAP
) -> float:
    """Return the overlap fraction; raise :class:`NonOverlapError` when it is below ``minimum``."""
    overlap = overlap_fraction(transform, fixed_points, moving)
    if overlap < minimum:
        raise NonOverlapError(
            f"The images do not overlap after initialization: only {100 * overlap:.1f} % of the fixed image's "
            f"body (or mask) maps inside the moving image's field of view (at least {100 * minimum:.0f} % is "
            "needed). Check that both images show the same anatomy, or use the automatic initialization."
        )
    return overlap


def euler(
    centre: Sequence[float], translation: Sequence[float], angles_rad: Sequence[float] = (0.0, 0.0, 0.0)
) -> sitk.Euler3DTransform:
    """An Euler 3D transform about ``centre`` (ZXY rotation order, ITK default)."""
    t = sitk.Euler3DTransform()
    t.SetCenter(tuple(float(c) for c in centre))
    t.SetRotation(*(float(a) for a in angles_rad))
    t.SetTranslation(tuple(float(v) for v in translation))
    return t


def rigid_part(transform: sitk.Transform, centre: Sequence[float]) -> sitk.Euler3DTransform:
    """The rigid transform nearest a linear ``transform`` (any linear type, or a composite of them), about ``centre``.

    The linear map is measured on points around ``centre``; its matrix's rotation factor (polar decomposition)
    is kept, and ``centre`` maps where ``transform`` maps it. A user's rough alignment (an affine with some
    scaling, say) thus starts a rigid registration at the right place and attitude.

    Raises
    ------
    InvalidParameterError
        The transform is not linear (a displacement field, a B-spline), or it mirrors.
    """
    c = np.asarray(centre, dtype=float)
    probes = c + 50.0 * np.vstack([np.zeros(3), np.eye(3), -np.eye(3), np.ones((1, 3))])
    mapped = np.array([transform.TransformPoint(tuple(float(v) for v in p)) for p in probes], dtype=float)
    design = np.hstack([probes - c, np.ones((len(probes), 1))])
    solution, *_ = np.linalg.lstsq(design, mapped, rcond=None)
    a, image_of_centre = solution[:3].T, solution[3]
    if np.abs(design @ solution - mapped).max() > 1e-3:
        raise InvalidParameterError(
            f"The initial transform ({transform.GetName()}) is not linear; a rigid or affine transform is needed."
        )
    u, _, vt = np.linalg.svd(a)
    rotation = u @ vt
    if np.linalg.det(rotation) < 0:
        raise InvalidParameterError("The initial transform mirrors the image (its determinant is negative).")
    rigid = sitk.Euler3DTransform()
    rigid.SetCenter(tuple(float(v) for v in c))
    rigid.SetMatrix(tuple(float(v) for v in rotation.ravel()), 1e-6)
    rigid.SetTranslation(tuple(float(v) for v in image_of_centre - c))
    return rigid


def rotation_grid(max_deg: float, step_deg: float) -> List[Tuple[float, float, float]]:
    """Euler angle triples (degrees) on a grid from ``-max_deg`` to ``max_deg`` about each axis; identity first."""
    if max_deg <= 0 or step_deg <= 0:
        return [(0.0, 0.0, 0.0)]
    n = int(math.floor(max_deg / step_deg + 1e-9))
    values = [k * step_deg for k in range(-n, n + 1)]
    grid = [(0.0, 0.0, 0.0)]
    grid += [tuple(float(v) for v in a) for a in itertools.product(values, repeat=3) if any(v != 0 for v in a)]
    return grid


def _score(value: float, overlap: float) -> float:
    """Metric value (lower is better) weighted by overlap: negative metrics shrink, positive ones grow."""
    return value * overlap if value < 0 else value / max(overlap, 1e-6)


def translation_candidates(
    method: str,
    fixed: sitk.Image,
    moving: sitk.Image,
    fixed_points: np.ndarray,
    moving_points: np.ndarray,
    centre: np.ndarray,
) -> List[Tuple[str, np.ndarray]]:
    """Named translations (for an Euler transform about ``centre``) to try."""
    geometry = physical_centre(moving) - physical_centre(fixed)
    moments = (moving_points.mean(axis=0) - fixed_points.mean(axis=0)) if len(moving_points) else geometry
    named = {"none": np.zeros(3), "geometry": geometry, "moments": moments}
    if method == "auto":
        return [(name, named[name]) for name in ("none", "geometry", "moments")]
    return [(method, named[method])]


def search_rotations(
    metric_factory: Callable[[], sitk.ImageRegistrationMethod],
    fixed: sitk.Image,
    moving: sitk.Image,
    centre: np.ndarray,
    translation: np.ndarray,
    max_deg: float,
    step_deg: float,
) -> List[Tuple[Tuple[float, float, float], float]]:
    """Metric values of Euler rotations about ``centre`` on the grid of :func:`rotation_grid`, translation fixed.

    All rotations are evaluated in one run of SimpleITK's exhaustive optimizer; if that fails (a rotation
    without overlap), each rotation is evaluated alone and those without overlap are left out.
    """
    n = int(math.floor(max_deg / step_deg + 1e-9)) if max_deg > 0 and step_deg > 0 else 0
    records: List[Tuple[Tuple[float, float, float], float]] = []
    if n > 0:
        method = metric_factory()
        method.SetOptimizerAsExhaustive([n, n, n, 0, 0, 0], stepLength=math.radians(step_deg))
        method.SetOptimizerScales([1.0] * 6)
        method.SetInitialTransform(euler(centre, translation), inPlace=False)

        def record() -> None:
            angles = tuple(float(np.degrees(a)) for a in method.GetOptimizerPosition()[:3])
            records.append((angles, float(method.GetMetricValue())))

        method.AddCommand(sitk.sitkIterationEvent, record)
        try:
            with quiet_itk():
                method.Execute(fixed, moving)
            return [(a, v) for a, v in records if v == v and abs(v) < 1e30]
        except RuntimeError:
            records = []
    method = metric_factory()
    with quiet_itk():
        for angle_deg in rotation_grid(max_deg, step_deg):
            value = evaluate_metric(method, fixed, moving, euler(centre, translation, np.radians(angle_deg)))
            if value is not None:
                records.append((angle_deg, value))
    return records


def initialize_rigid(
    fixed: sitk.Image,
    moving: sitk.Image,
    *,
    method: str,
    metric_factory: Callable[[], sitk.ImageRegistrationMethod],
    fixed_points: np.ndarray,
    moving_points: np.ndarray,
    search_max_deg: float = 30.0,
    search_step_deg: float = 15.0,
    top_k: int = 4,
    refine: Optional[Callable[[sitk.Euler3DTransform], Tuple[sitk.Euler3DTransform, float]]] = None,
    progress: Optional[Callable[[float, str], None]] = None,
) -> Initialization:
    """Find a starting rigid transform (fixed -> moving points) on coarse level images.

    Parameters
    ----------
    fixed, moving
        Coarse level images, already windowed.
    method
        One of :data:`INITIALIZATIONS`.
    metric_factory
        Returns a new configured ``ImageRegistrationMethod`` that scores candidates (lower is better).
    fixed_points, moving_points
        World points of the fixed and moving bodies (or masks), for centroids and overlap.
    refine
        Optional ``refine(transform) -> (transform, metric_value)`` run on the best ``top_k`` candidates.
    """
    if method not in INITIALIZATIONS:
        raise InvalidParameterError(f"Unknown initialization '{method}'; choose one of {', '.join(INITIALIZATIONS)}.")
    centre = fixed_points.mean(axis=0) if len(fixed_points) else physical_centre(fixed)
    if method == "none":
        t = euler(centre, (0.0, 0.0, 0.0))
        overlap = check_overlap(t, fixed_points, moving)
        return Initialization(t, "none", (0.0, 0.0, 0.0), overlap, 1)

    translations = translation_candidates(method, fixed, moving, fixed_points, moving_points, centre)
    scored = []
    total = 0
    for k, (name, translation) in enumerate(translations):
        if progress is not None:
            progress(0.6 * k / len(translations), f"searching rotations about the {name} alignment")
        if (
            name == "none"
            and overlap_fraction(euler(centre, translation), fixed_points, moving) < CANDIDATE_MIN_OVERLAP
        ):
            continue  # the images as they are hardly overlap: not worth a search
        for angle_deg, value in search_rotations(
            metric_factory, fixed, moving, centre, translation, search_max_deg, search_step_deg
        ):
            total += 1
            t = euler(centre, translation, np.radians(angle_deg))
            overlap = overlap_fraction(t, fixed_points, moving)
            if overlap < CANDIDATE_MIN_OVERLAP:
                continue
            scored.append((_score(value, overlap), name, angle_deg, t, overlap))
    if not scored:
        # Nothing overlaps enough: report it on the best-aligned candidate (moments/geometry).
        name, translation = translations[-1]
        t = euler(centre, translation)
        check_overlap(t, fixed_points, moving)
        return Initialization(t, name, (0.0, 0.0, 0.0), overlap_fraction(t, fixed_points, moving), total)
    scored.sort(key=lambda s: s[0])
    best = scored[0]
    chosen = Initialization(best[3], best[1], tuple(best[2]), best[4], len(scored), best[0])
    if refine is None:
        return chosen
    refined = []
    best_score = None
    for i, (_, name, angle_deg, t, _overlap) in enumerate(scored[:top_k]):
        if progress is not None:
            progress(0.7 + 0.3 * i / top_k, f"refining candidate {i + 1}/{min(top_k, len(scored))}")
        try:
            with quiet_itk():
                result, value = refine(t)
        except RegistrationError as e:  # this candidate drifted out of the overlap: drop it
            logger.debug("Initialization candidate %s %s dropped: %s", name, angle_deg, e)
            continue
        overlap = overlap_fraction(result, fixed_points, moving)
        score = _score(value, overlap)
        refined.append(
            {"method": name, "rotation_deg": list(angle_deg), "metric_value": value, "overlap": overlap, "score": score}
        )
        if best_score is None or score < best_score:
            best_score = score
            chosen = Initialization(result, name, tuple(angle_deg), overlap, len(scored), score)
    chosen.refined = refined
    logger.debug("Initialization candidates after refinement: %s", refined)
    return chosen
