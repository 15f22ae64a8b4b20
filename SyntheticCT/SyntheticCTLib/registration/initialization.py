"""Automatic initialization of a rigid registration: centres, moments, then a coarse rotation search.

Scans of one patient can start far apart (another position, another field of view, another scanner
frame), even turned over (prone and supine, head first and feet first). With the pose search, the 24
right-angle poses (every rotation that maps the axes onto each other) are scored first, each after
centring; the best few are refined and compete with the local search below. Three translations are tried: the images as they are (only when they overlap), their
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
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import SimpleITK as sitk

from SyntheticCTLib.kernel.errors import InvalidParameterError
from SyntheticCTLib.kernel.geometry import linear_parts, transform_points
from SyntheticCTLib.registration import INITIALIZATIONS
from SyntheticCTLib.registration.engine import NonOverlapError, RegistrationError, evaluate_metric, quiet_itk

logger = logging.getLogger(__name__)


MIN_OVERLAP = 0.10
"""Fraction of the fixed body that must map inside the moving field of view to register at all."""

CANDIDATE_MIN_OVERLAP = 0.25

RIVAL_MIN_ANGLE_DEG = 45.0
"""Right-angle poses at least this far apart count as different poses (rivals)."""


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
    pose_search: bool = False
    alternatives: List[sitk.Transform] = field(default_factory=list)
    """The refined starts (transforms) that competed, for the grade's rival poses."""

    def to_dict(self) -> dict:
        return {
            "method": self.method,
            "rotation_deg": [round(a, 3) for a in self.rotation_deg],
            "overlap": round(self.overlap, 4),
            "candidates": self.candidates,
            "score": None if self.score is None else float(self.score),
            "pose_search": self.pose_search,
            "refined": [{k: v for k, v in r.items() if k != "matrix"} for r in self.refined],
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
    return rigid_from_matrix(c, image_of_centre - c, rotation)


def rotation_grid(max_deg: float, step_deg: float) -> List[Tuple[float, float, float]]:
    """Euler angle triples (degrees) on a grid from ``-max_deg`` to ``max_deg`` about each axis; identity first."""
    if max_deg <= 0 or step_deg <= 0:
        return [(0.0, 0.0, 0.0)]
    n = int(math.floor(max_deg / step_deg + 1e-9))
    values = [k * step_deg for k in range(-n, n + 1)]
    grid = [(0.0, 0.0, 0.0)]
    grid += [tuple(float(v) for v in a) for a in itertools.product(values, repeat=3) if any(v != 0 for v in a)]
    return grid


def overlap_weighted(value: float, overlap: float) -> float:
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


def axis_rotations() -> List[np.ndarray]:
    """The 24 rotations that map the coordinate axes onto each other (signed permutations, det +1); identity first."""
    matrices = []
    for perm in itertools.permutations(range(3)):
        for signs in itertools.product((1.0, -1.0), repeat=3):
            m = np.zeros((3, 3))
            m[np.arange(3), perm] = signs
            if np.linalg.det(m) > 0:
                matrices.append(m)
    matrices.sort(key=lambda m: not np.allclose(m, np.eye(3)))
    return matrices


def euler_angles_of(matrix: np.ndarray) -> Tuple[float, float, float]:
    """Euler angles (radians; ITK's ZXY order, ``R = Rz @ Rx @ Ry``) of a rotation ``matrix``.

    ``Euler3DTransform.SetMatrix`` takes ``asin`` of ``matrix[2, 1]`` unclipped: at 90 degrees about x
    (a right-angle pose), a rounding error of 1e-16 above 1 makes every angle NaN. Here it is clipped.
    """
    m = np.asarray(matrix, dtype=float).reshape(3, 3)
    angle_x = math.asin(float(np.clip(m[2, 1], -1.0, 1.0)))
    a = math.cos(angle_x)
    if abs(a) > 5e-5:
        angle_y = math.atan2(-m[2, 0] / a, m[2, 2] / a)
        angle_z = math.atan2(-m[0, 1] / a, m[1, 1] / a)
    else:  # gimbal lock: only the sum (x = +90 deg) or difference (x = -90 deg) of the y and z angles counts
        angle_z = 0.0
        angle_y = math.atan2(m[1, 0], m[0, 0]) if m[2, 1] > 0 else math.atan2(-m[1, 0], m[0, 0])
    return angle_x, angle_y, angle_z


def rigid_from_matrix(
    centre: Sequence[float], translation: Sequence[float], matrix: np.ndarray
) -> sitk.Euler3DTransform:
    """An Euler 3D transform about ``centre`` with rotation ``matrix`` and ``translation`` (see :func:`euler_angles_of`).

    Raises
    ------
    InvalidParameterError
        ``matrix`` is not a rotation.
    """
    t = euler(centre, translation, euler_angles_of(matrix))
    if not np.allclose(np.asarray(t.GetMatrix()).reshape(3, 3), np.asarray(matrix, dtype=float), atol=1e-5):
        raise InvalidParameterError("The matrix is not a rotation (an orthogonal matrix of determinant +1).")
    return t


def rotation_matrix(transform: sitk.Transform) -> np.ndarray:
    """The rotation of a linear transform (the rotation factor of its matrix)."""
    a, _ = linear_parts(transform)
    u, _, vt = np.linalg.svd(a)
    return u @ vt


def rotation_between_deg(a: np.ndarray, b: np.ndarray) -> float:
    """The angle (degrees) of the rotation that turns rotation matrix ``a`` into ``b``."""
    cosine = (np.trace(np.asarray(a).T @ np.asarray(b)) - 1.0) / 2.0
    return float(np.degrees(np.arccos(np.clip(cosine, -1.0, 1.0))))


def euler_angles_deg(transform: sitk.Euler3DTransform) -> Tuple[float, float, float]:
    t = transform.Downcast()
    return tuple(float(np.degrees(a)) for a in (t.GetAngleX(), t.GetAngleY(), t.GetAngleZ()))


def search_rotations(
    metric_factory: Callable[[], sitk.ImageRegistrationMethod],
    fixed: sitk.Image,
    moving: sitk.Image,
    centre: np.ndarray,
    translation: np.ndarray,
    max_deg: float,
    step_deg: float,
    pose: Optional[np.ndarray] = None,
) -> List[Tuple[Tuple[float, float, float], float]]:
    """Metric values of Euler rotations about ``centre`` on the grid of :func:`rotation_grid`, translation fixed.

    With ``pose`` (a rotation matrix), the grid is around it: the candidate of angles ``g`` turns by
    ``pose @ R(g)`` (see :func:`_around_pose`). All rotations are evaluated in one run of SimpleITK's
    exhaustive optimizer; if that fails (a rotation without overlap), each rotation is evaluated alone and
    those without overlap are left out.
    """
    n = int(math.floor(max_deg / step_deg + 1e-9)) if max_deg > 0 and step_deg > 0 else 0
    start = euler(centre, translation) if pose is None else euler(centre, (0.0, 0.0, 0.0))
    records: List[Tuple[Tuple[float, float, float], float]] = []
    if n > 0:
        method = _search_method(metric_factory, centre, translation, pose)
        method.SetOptimizerAsExhaustive([n, n, n, 0, 0, 0], stepLength=math.radians(step_deg))
        method.SetOptimizerScales([1.0] * 6)
        method.SetInitialTransform(start, inPlace=False)

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
    method = _search_method(metric_factory, centre, translation, pose)
    with quiet_itk():
        for angle_deg in rotation_grid(max_deg, step_deg):
            candidate = euler(centre, translation if pose is None else (0.0, 0.0, 0.0), np.radians(angle_deg))
            value = evaluate_metric(method, fixed, moving, candidate)
            if value is not None:
                records.append((angle_deg, value))
    return records


def _search_method(
    metric_factory: Callable[[], sitk.ImageRegistrationMethod],
    centre: np.ndarray,
    translation: np.ndarray,
    pose: Optional[np.ndarray],
) -> sitk.ImageRegistrationMethod:
    method = metric_factory()
    if pose is not None:  # moving_initial(grid(x)) = pose @ R(g) (x - c) + c + t
        method.SetMovingInitialTransform(rigid_from_matrix(centre, translation, pose))
    return method


def _around_pose(
    centre: np.ndarray, translation: np.ndarray, angle_deg: Sequence[float], pose: Optional[np.ndarray]
) -> sitk.Euler3DTransform:
    """The candidate of grid angles ``angle_deg``: ``pose @ R(angles)`` about ``centre``, then ``translation``."""
    if pose is None:
        return euler(centre, translation, np.radians(angle_deg))
    grid = np.asarray(euler(centre, (0.0, 0.0, 0.0), np.radians(angle_deg)).GetMatrix()).reshape(3, 3)
    return rigid_from_matrix(centre, translation, np.asarray(pose) @ grid)


@dataclass
class _Candidate:
    """A starting transform and its score (metric weighted by overlap; lower is better)."""

    score: float
    method: str
    transform: sitk.Euler3DTransform
    overlap: float
    metric_value: float

    def record(self) -> dict:
        return {
            "method": self.method,
            "rotation_deg": [round(a, 3) for a in euler_angles_deg(self.transform)],
            "metric_value": float(self.metric_value),
            "overlap": round(float(self.overlap), 4),
            "score": float(self.score),
            "matrix": [float(v) for v in rotation_matrix(self.transform).ravel()],
        }


def _grid_candidates(
    metric_factory: Callable[[], sitk.ImageRegistrationMethod],
    fixed: sitk.Image,
    moving: sitk.Image,
    centre: np.ndarray,
    translations: Sequence[Tuple[str, np.ndarray]],
    fixed_points: np.ndarray,
    max_deg: float,
    step_deg: float,
    pose: Optional[np.ndarray] = None,
    progress: Optional[Callable[[float, str], None]] = None,
) -> Tuple[List[_Candidate], int]:
    """Candidates of the rotation grid around each translation (and ``pose``): (those overlapping enough, total)."""
    scored, total = [], 0
    for k, (name, translation) in enumerate(translations):
        if progress is not None:
            progress(k / len(translations), f"searching rotations about the {name} alignment")
        if (
            name == "none"
            and overlap_fraction(euler(centre, translation), fixed_points, moving) < CANDIDATE_MIN_OVERLAP
        ):
            continue  # the images as they are hardly overlap: not worth a search
        for angle_deg, value in search_rotations(
            metric_factory, fixed, moving, centre, translation, max_deg, step_deg, pose
        ):
            total += 1
            t = _around_pose(centre, translation, angle_deg, pose)
            overlap = overlap_fraction(t, fixed_points, moving)
            if overlap >= CANDIDATE_MIN_OVERLAP:
                scored.append(_Candidate(overlap_weighted(value, overlap), name, t, overlap, value))
    scored.sort(key=lambda c: c.score)
    return scored, total


def score_poses(
    metric_factory: Callable[[], sitk.ImageRegistrationMethod],
    fixed: sitk.Image,
    moving: sitk.Image,
    centre: np.ndarray,
    translations: Sequence[Tuple[str, np.ndarray]],
    fixed_points: np.ndarray,
) -> List[_Candidate]:
    """Each of the 24 axis-aligned rotations (:func:`axis_rotations`) after each centring, scored; best first.

    The Euler angles of a right-angle rotation are multiples of 90 degrees: one exhaustive run over the
    grid of 90-degree steps (125 angle triples, ~10x cheaper each than evaluating a pose alone) scores
    all 24 per translation; duplicates of one rotation keep their best value.
    """
    scored: Dict[Tuple[str, Tuple[int, ...]], _Candidate] = {}
    for name, translation in translations:
        for angle_deg, value in search_rotations(metric_factory, fixed, moving, centre, translation, 180.0, 90.0):
            t = euler(centre, translation, np.radians(angle_deg))
            key = (name, tuple(int(v) for v in np.rint(np.asarray(t.GetMatrix()))))
            if key in scored and scored[key].metric_value <= value:
                continue
            overlap = overlap_fraction(t, fixed_points, moving)
            if overlap >= CANDIDATE_MIN_OVERLAP:
                t = rigid_from_matrix(centre, translation, np.rint(np.asarray(t.GetMatrix()).reshape(3, 3)))
                scored[key] = _Candidate(overlap_weighted(value, overlap), f"pose-{name}", t, overlap, value)
    return sorted(scored.values(), key=lambda c: c.score)


def best_distinct(candidates: Sequence[_Candidate], count: int, *, min_angle_deg: float = 45.0) -> List[_Candidate]:
    """The best ``count`` candidates whose rotations are at least ``min_angle_deg`` apart (``candidates`` sorted)."""
    chosen: List[_Candidate] = []
    for c in candidates:
        r = rotation_matrix(c.transform)
        if all(rotation_between_deg(r, rotation_matrix(o.transform)) >= min_angle_deg for o in chosen):
            chosen.append(c)
            if len(chosen) == count:
                break
    return chosen


def refine_candidates(
    candidates: Sequence[_Candidate],
    refine: Callable[[sitk.Euler3DTransform], Tuple[sitk.Euler3DTransform, float]],
    fixed_points: np.ndarray,
    moving: sitk.Image,
    progress: Optional[Callable[[float, str], None]] = None,
) -> List[_Candidate]:
    """Each candidate optimized by ``refine`` and scored again (those that drift out of the overlap dropped)."""
    refined = []
    for i, c in enumerate(candidates):
        if progress is not None:
            progress(i / max(1, len(candidates)), f"refining candidate {i + 1}/{len(candidates)}")
        try:
            with quiet_itk():
                result, value = refine(c.transform)
        except RegistrationError as e:  # this candidate drifted out of the overlap: drop it
            logger.debug("Initialization candidate %s %s dropped: %s", c.method, euler_angles_deg(c.transform), e)
            continue
        overlap = overlap_fraction(result, fixed_points, moving)
        refined.append(_Candidate(overlap_weighted(value, overlap), c.method, result, overlap, value))
    return refined


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
    pose_search: bool = False,
    pose_keep: int = 3,
    refine: Optional[Callable[[sitk.Euler3DTransform], Tuple[sitk.Euler3DTransform, float]]] = None,
    pose_refine: Optional[Callable[[sitk.Euler3DTransform], Tuple[sitk.Euler3DTransform, float]]] = None,
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
    pose_search
        Also try the 24 axis-aligned poses (:func:`axis_rotations`, each after centring); the best
        ``pose_keep`` distinct ones are refined and compete with the local search's result; a pose that
        wins gets the rotation grid around it. Needs ``refine``.
    refine
        Optional ``refine(transform) -> (transform, metric_value)`` run on the best ``top_k`` candidates.
    pose_refine
        The same for the right-angle poses (default: ``refine``).
    """
    if method not in INITIALIZATIONS:
        raise InvalidParameterError(f"Unknown initialization '{method}'; choose one of {', '.join(INITIALIZATIONS)}.")
    centre = fixed_points.mean(axis=0) if len(fixed_points) else physical_centre(fixed)
    if method == "none":
        t = euler(centre, (0.0, 0.0, 0.0))
        overlap = check_overlap(t, fixed_points, moving)
        return Initialization(t, "none", (0.0, 0.0, 0.0), overlap, 1)
    report = progress or (lambda f, m: None)
    translations = translation_candidates(method, fixed, moving, fixed_points, moving_points, centre)
    search = (metric_factory, fixed, moving, centre)
    poses: List[_Candidate] = []
    if pose_search and refine is not None:
        report(0.0, "trying the 24 right-angle poses")
        poses = refined_poses(
            metric_factory,
            fixed,
            moving,
            fixed_points,
            moving_points,
            pose_refine or refine,
            keep=pose_keep,
            centre=centre,
        )
    grid_report = _part(report, 0.15 if poses else 0.0, 0.6)
    scored, total = _grid_candidates(
        *search, translations, fixed_points, search_max_deg, search_step_deg, progress=grid_report
    )
    if not scored and not poses:
        # Nothing overlaps enough: report it on the best-aligned candidate (moments/geometry).
        name, translation = translations[-1]
        t = euler(centre, translation)
        check_overlap(t, fixed_points, moving)
        return Initialization(t, name, (0.0, 0.0, 0.0), overlap_fraction(t, fixed_points, moving), total)
    if refine is None:
        best = scored[0]
        return Initialization(
            best.transform, best.method, euler_angles_deg(best.transform), best.overlap, len(scored), best.score
        )
    refined = refine_candidates(scored[:top_k], refine, fixed_points, moving, _part(report, 0.7, 0.9))
    best_pose = min(poses, key=lambda c: c.score, default=None)
    local_best = min(refined, key=lambda c: c.score, default=None)
    contenders = refined or scored[:1]
    if best_pose is not None and _pose_wins(best_pose, local_best, metric_factory, fixed, moving, fixed_points):
        report(0.9, "searching rotations about the best pose")
        around, more = _grid_candidates(
            *search,
            [(best_pose.method, np.asarray(best_pose.transform.GetTranslation(), dtype=float))],
            fixed_points,
            search_max_deg,
            search_step_deg,
            pose=rotation_matrix(best_pose.transform),
        )
        total += more
        scored += around
        contenders = refine_candidates(around[:top_k], refine, fixed_points, moving) + [best_pose]
    return _choose(contenders, refined + poses, len(scored), bool(pose_search))


def common_score(
    candidate: _Candidate,
    metric_factory: Callable[[], sitk.ImageRegistrationMethod],
    fixed: sitk.Image,
    moving: sitk.Image,
    fixed_points: np.ndarray,
) -> float:
    """``candidate`` scored again with ``metric_factory``'s set-up (inf without overlap).

    The refinements report their optimizer's last value, with their own samples; starts refined
    differently (the poses with fewer samples) are compared on one set-up.
    """
    with quiet_itk():
        value = evaluate_metric(metric_factory(), fixed, moving, candidate.transform)
    if value is None:
        return math.inf
    return overlap_weighted(value, overlap_fraction(candidate.transform, fixed_points, moving))


def _pose_wins(
    pose: _Candidate,
    local: Optional[_Candidate],
    metric_factory: Callable[[], sitk.ImageRegistrationMethod],
    fixed: sitk.Image,
    moving: sitk.Image,
    fixed_points: np.ndarray,
) -> bool:
    """Whether the best right-angle pose beats the local search's best start, both scored alike."""
    if local is None:
        return True
    pose_score = common_score(pose, metric_factory, fixed, moving, fixed_points)
    local_score = common_score(local, metric_factory, fixed, moving, fixed_points)
    logger.debug("Best right-angle pose %.5g against the local search's best start %.5g.", pose_score, local_score)
    return pose_score < local_score


def _choose(
    contenders: Sequence[_Candidate], alternatives: Sequence[_Candidate], scored: int, pose_search: bool
) -> Initialization:
    """The best of ``contenders``; ``alternatives`` (every refined start) are kept for the grade."""
    best = min(contenders, key=lambda c: c.score)
    chosen = Initialization(
        best.transform, best.method, euler_angles_deg(best.transform), best.overlap, scored, best.score
    )
    everything = list(alternatives) + [c for c in contenders if all(c is not a for a in alternatives)]
    chosen.refined = [c.record() for c in everything]
    chosen.alternatives = [c.transform for c in everything]
    chosen.pose_search = pose_search
    logger.debug("Initialization candidates after refinement: %s", chosen.refined)
    return chosen


def refined_poses(
    metric_factory: Callable[[], sitk.ImageRegistrationMethod],
    fixed: sitk.Image,
    moving: sitk.Image,
    fixed_points: np.ndarray,
    moving_points: np.ndarray,
    refine: Callable[[sitk.Euler3DTransform], Tuple[sitk.Euler3DTransform, float]],
    *,
    keep: int = 3,
    centre: Optional[np.ndarray] = None,
    away_from: Optional[np.ndarray] = None,
) -> List[_Candidate]:
    """The best ``keep`` right-angle poses (each after centring, at least 45 deg apart), refined.

    The pose at 0 deg from ``away_from`` (a rotation matrix; default the identity, which the local search
    covers) is left out.
    """
    if centre is None:
        centre = fixed_points.mean(axis=0) if len(fixed_points) else physical_centre(fixed)
    # One centring: the body centroids (the refinement corrects the rest); geometry centres without a body.
    translations = translation_candidates("moments", fixed, moving, fixed_points, moving_points, centre)
    ranked = score_poses(metric_factory, fixed, moving, centre, translations, fixed_points)
    reference = np.eye(3) if away_from is None else np.asarray(away_from)
    distinct = [
        c
        for c in best_distinct(ranked, keep + 1)
        if rotation_between_deg(rotation_matrix(c.transform), reference) >= RIVAL_MIN_ANGLE_DEG
    ]
    return refine_candidates(distinct[:keep], refine, fixed_points, moving)


def _part(report: Callable[[float, str], None], start: float, stop: float) -> Callable[[float, str], None]:
    return lambda f, m: report(start + (stop - start) * f, m)
