"""Screw-trajectory check: the HU profile along a planned line, and where it leaves bone.

A surgeon places a line (entry point to tip) for a planned screw. :func:`sample_profile` samples a
CT or synthetic CT along that segment, on the axis and on rings across the screw's radius, and
returns the HU profile (mean, minimum and maximum over each cross-section). :func:`find_breaches`
reports where the screw, having been inside bone, leaves it (a possible cortical breach), and
:func:`compare_profiles` compares the sCT's profile with the CT's.

Points are world coordinates in millimetres in the ITK convention (LPS), as SimpleITK uses them.
Slicer's RAS points convert with :func:`ras_to_lps`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Tuple

import numpy as np
import SimpleITK as sitk

from SyntheticCTLib.kernel.errors import InvalidParameterError

DEFAULT_BONE_THRESHOLD_HU = 150.0
"""Default HU above which a sample counts as bone (trabecular bone with marrow fat can be ~150 HU)."""

STATISTICS = ("min", "mean", "max", "axis")


def ras_to_lps(point: Sequence[float]) -> Tuple[float, float, float]:
    """Convert a point between Slicer's RAS and ITK's LPS world coordinates (the map is its own inverse)."""
    x, y, z = (float(v) for v in point)
    return (-x, -y, z)


@dataclass(frozen=True)
class HUProfile:
    """HU sampled along a line segment, per step along it.

    Attributes
    ----------
    distance_mm
        Distance of each step from the start point (the entry), shape ``(n,)``.
    axis, mean, min, max
        HU on the axis, and the mean, minimum and maximum over the cross-section (the axis and the
        rings up to ``radius_mm``); NaN where no sample of the cross-section falls in the image.
    inside_image
        Whether the axis point of each step lies inside the image.
    start, end
        The segment's end points (LPS, mm).
    radius_mm
        The cross-section radius (0: the axis only).
    """

    distance_mm: np.ndarray
    axis: np.ndarray
    mean: np.ndarray
    min: np.ndarray
    max: np.ndarray
    inside_image: np.ndarray
    start: Tuple[float, float, float]
    end: Tuple[float, float, float]
    radius_mm: float

    @property
    def length_mm(self) -> float:
        return float(np.linalg.norm(np.subtract(self.end, self.start)))

    @property
    def step_mm(self) -> float:
        return float(self.distance_mm[1] - self.distance_mm[0]) if len(self.distance_mm) > 1 else 0.0

    def statistic(self, name: str) -> np.ndarray:
        """One of the per-step curves: ``'min'``, ``'mean'``, ``'max'`` or ``'axis'``."""
        if name not in STATISTICS:
            raise InvalidParameterError(f"statistic must be one of {', '.join(STATISTICS)} (got {name!r}).")
        return getattr(self, name)

    def point_at(self, distance_mm: float) -> Tuple[float, float, float]:
        """The world point (LPS) at ``distance_mm`` from the start along the segment."""
        start = np.asarray(self.start, dtype=float)
        direction = np.subtract(self.end, self.start) / max(self.length_mm, 1e-12)
        return tuple(float(v) for v in start + direction * float(distance_mm))  # type: ignore[return-value]

    def as_columns(self) -> dict:
        """The profile as named columns (for a table or a CSV)."""
        return {
            "distance_mm": self.distance_mm,
            "axis_hu": self.axis,
            "mean_hu": self.mean,
            "min_hu": self.min,
            "max_hu": self.max,
        }


def _unit_perpendiculars(direction: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Two unit vectors perpendicular to ``direction`` and to each other."""
    helper = np.array([1.0, 0.0, 0.0]) if abs(direction[0]) < 0.9 else np.array([0.0, 1.0, 0.0])
    u = np.cross(direction, helper)
    u /= np.linalg.norm(u)
    v = np.cross(direction, u)
    return u, v / np.linalg.norm(v)


def physical_to_continuous_index(image: sitk.Image, points: np.ndarray) -> np.ndarray:
    """Continuous voxel indices ``(i, j, k)`` of world points ``(n, 3)`` (LPS, mm), vectorised."""
    direction = np.array(image.GetDirection(), dtype=float).reshape(3, 3)
    spacing = np.array(image.GetSpacing(), dtype=float)
    origin = np.array(image.GetOrigin(), dtype=float)
    # point = origin + direction @ (spacing * index)  =>  index = (direction^-1 (point - origin)) / spacing
    return (np.linalg.solve(direction, (np.asarray(points, dtype=float) - origin).T).T) / spacing


def sample_points(image: sitk.Image, points: np.ndarray, *, order: int = 1) -> np.ndarray:
    """Interpolate ``image`` at world points ``(n, 3)`` (LPS, mm); NaN outside the image.

    A point counts as inside when its continuous index lies within half a voxel of the voxel
    centres (ITK's convention); near the border the nearest voxel completes the interpolation.
    """
    from scipy import ndimage

    points = np.asarray(points, dtype=float).reshape(-1, 3)
    index = physical_to_continuous_index(image, points)
    size = np.array(image.GetSize(), dtype=float)
    inside = np.all((index >= -0.5) & (index <= size - 0.5), axis=1)
    array = sitk.GetArrayViewFromImage(image).astype(np.float32, copy=False)  # (z, y, x)
    values = np.full(len(points), np.nan, dtype=float)
    if inside.any():
        coords = np.clip(index[inside], 0, size - 1)[:, ::-1].T  # to (z, y, x) rows
        values[inside] = ndimage.map_coordinates(array, coords, order=order, mode="nearest")
    return values


def sample_profile(
    image: sitk.Image,
    start: Sequence[float],
    end: Sequence[float],
    *,
    radius_mm: float = 0.0,
    step_mm: Optional[float] = None,
    rings: Optional[int] = None,
    samples_per_ring: int = 12,
    n_steps: Optional[int] = None,
) -> HUProfile:
    """Sample ``image`` along the segment from ``start`` to ``end`` (LPS, mm) and across a radius.

    Parameters
    ----------
    image
        A CT or synthetic CT (HU).
    start, end
        The entry point and the tip of the planned trajectory, world coordinates (LPS, mm).
    radius_mm
        The screw's radius. Each step samples the axis and ``rings`` rings of ``samples_per_ring``
        points at radii ``radius_mm * k / rings``, k = 1..rings, perpendicular to the axis.
    step_mm
        Distance between steps along the axis; default a quarter of the smallest voxel spacing.
    rings
        Number of rings; default one ring per voxel of radius (at least one when ``radius_mm > 0``).
    n_steps
        Number of steps (overrides ``step_mm``): sample two images with the same count to compare
        them step by step, e.g. when the trajectory is mapped into each image's own space.

    Returns
    -------
    HUProfile
    """
    start_v = np.asarray(start, dtype=float).reshape(3)
    end_v = np.asarray(end, dtype=float).reshape(3)
    length = float(np.linalg.norm(end_v - start_v))
    if not np.all(np.isfinite(start_v)) or not np.all(np.isfinite(end_v)):
        raise InvalidParameterError(f"The trajectory's end points must be finite (got {tuple(start)}, {tuple(end)}).")
    if length < 1e-6:
        raise InvalidParameterError(
            "The trajectory's start and end points coincide; place a line with two distinct points."
        )
    radius_mm = float(radius_mm)
    if not math.isfinite(radius_mm) or radius_mm < 0:
        raise InvalidParameterError(f"radius_mm must be >= 0 (got {radius_mm}).")
    min_spacing = float(min(image.GetSpacing()))
    step = float(step_mm) if step_mm is not None else min_spacing / 4.0
    if not math.isfinite(step) or step <= 0:
        raise InvalidParameterError(f"step_mm must be positive (got {step_mm}).")
    if samples_per_ring < 3:
        raise InvalidParameterError(f"samples_per_ring must be at least 3 (got {samples_per_ring}).")
    if n_steps is None:
        n_steps = max(2, int(math.ceil(length / step)) + 1)
    elif int(n_steps) < 2:
        raise InvalidParameterError(f"n_steps must be at least 2 (got {n_steps}).")
    n_steps = int(n_steps)
    distances = np.linspace(0.0, length, n_steps)
    direction = (end_v - start_v) / length
    axis_points = start_v + distances[:, None] * direction

    offsets = [np.zeros(3)]
    if radius_mm > 0:
        n_rings = int(rings) if rings is not None else max(1, int(math.ceil(radius_mm / min_spacing)))
        if n_rings < 1:
            raise InvalidParameterError(f"rings must be at least 1 (got {rings}).")
        u, v = _unit_perpendiculars(direction)
        angles = np.linspace(0.0, 2 * np.pi, samples_per_ring, endpoint=False)
        for k in range(1, n_rings + 1):
            r = radius_mm * k / n_rings
            offsets += [r * (math.cos(a) * u + math.sin(a) * v) for a in angles]
    offsets_arr = np.asarray(offsets)  # (m, 3); row 0 is the axis
    points = axis_points[:, None, :] + offsets_arr[None, :, :]  # (n, m, 3)
    values = sample_points(image, points.reshape(-1, 3)).reshape(n_steps, len(offsets_arr))

    axis = values[:, 0]
    valid = np.isfinite(values)
    any_valid = valid.any(axis=1)
    with np.errstate(invalid="ignore"):
        filled_lo = np.where(valid, values, np.inf).min(axis=1)
        filled_hi = np.where(valid, values, -np.inf).max(axis=1)
        mean = np.where(any_valid, np.nansum(values, axis=1) / np.maximum(valid.sum(axis=1), 1), np.nan)
    return HUProfile(
        distance_mm=distances,
        axis=axis,
        mean=mean,
        min=np.where(any_valid, filled_lo, np.nan),
        max=np.where(any_valid, filled_hi, np.nan),
        inside_image=np.isfinite(axis),
        start=tuple(float(x) for x in start_v),  # type: ignore[arg-type]
        end=tuple(float(x) for x in end_v),  # type: ignore[arg-type]
        radius_mm=radius_mm,
    )


@dataclass(frozen=True)
class Breach:
    """A stretch where the screw, after being inside bone, is (partly) outside it.

    ``start_mm``/``end_mm``: distances from the entry where the chosen statistic crosses the bone
    threshold (interpolated between steps); ``end_mm`` is None when the stretch runs to the tip.
    ``lowest_hu``: the lowest value of the statistic in the stretch. ``position``: the world point
    (LPS) at ``start_mm``. ``whole_length``: the cross-section was never fully inside bone although
    the axis was (the screw is too thick for the bone, or runs along its edge).
    """

    start_mm: float
    end_mm: Optional[float]
    lowest_hu: float
    position: Tuple[float, float, float]
    whole_length: bool = False

    @property
    def length_mm(self) -> Optional[float]:
        return None if self.end_mm is None else self.end_mm - self.start_mm

    def describe(self) -> str:
        """Plain words for the report."""
        where = f"{self.start_mm:.1f} mm from the entry"
        if self.whole_length:
            text = (
                f"The screw's edge lies outside bone from {self.start_mm:.1f} mm (measured from the entry) to the "
                "tip, although its axis is inside: the screw may be too thick for this bone or run along its surface"
            )
        elif self.end_mm is None:
            text = f"The trajectory leaves bone at {where} and stays outside to the tip (possible cortical breach)"
        else:
            text = (
                f"The trajectory leaves bone at {where} and re-enters at {self.end_mm:.1f} mm "
                f"(possible cortical breach over {self.end_mm - self.start_mm:.1f} mm)"
            )
        return f"{text}; lowest value {self.lowest_hu:.0f} HU."


def _crossing(d0: float, v0: float, d1: float, v1: float, threshold: float) -> float:
    """Where the line through (d0, v0) and (d1, v1) meets ``threshold``."""
    if not (np.isfinite(v0) and np.isfinite(v1)) or v0 == v1:
        return float(d1)
    t = (threshold - v0) / (v1 - v0)
    return float(d0 + min(max(t, 0.0), 1.0) * (d1 - d0))


def find_breaches(
    profile: HUProfile,
    *,
    bone_threshold: float = DEFAULT_BONE_THRESHOLD_HU,
    statistic: str = "min",
    min_length_mm: float = 0.0,
) -> List[Breach]:
    """Find where the trajectory leaves bone after having been inside it.

    A step is "in bone" when the chosen ``statistic`` of its cross-section (default the minimum:
    every sample of the screw's cross-section) is at least ``bone_threshold``. The soft tissue
    before the trajectory first enters bone is not a breach. Each later run of steps out of bone
    (and, for the minimum, with the axis still in the image) is a :class:`Breach`; runs shorter
    than ``min_length_mm`` are ignored (noise). Steps outside the image end the search.
    """
    values = profile.statistic(statistic)
    in_image = profile.inside_image & np.isfinite(values)
    if not in_image.any():
        return []
    # Only the first stretch of steps inside the image counts: nothing can be said beyond it.
    first = int(np.argmax(in_image))
    gaps = np.flatnonzero(~in_image[first:])
    stop = first + int(gaps[0]) if len(gaps) else len(values)
    values = values[first:stop]
    axis = profile.axis[first:stop]
    d = profile.distance_mm[first:stop]
    in_bone = values >= bone_threshold
    breaches: List[Breach] = []
    if not in_bone.any():
        axis_in = np.flatnonzero(axis >= bone_threshold)
        if statistic != "axis" and len(axis_in):
            i0 = int(axis_in[0])
            start = _crossing(d[i0 - 1], axis[i0 - 1], d[i0], axis[i0], bone_threshold) if i0 else float(d[0])
            breaches.append(Breach(start, None, float(np.min(values[i0:])), profile.point_at(start), whole_length=True))
        return breaches
    i = int(np.argmax(in_bone))  # first step in bone: the entry
    n = len(values)
    while i < n:
        # advance to the next step out of bone
        out = np.flatnonzero(~in_bone[i:])
        if not len(out):
            break
        j = i + int(out[0])  # first step out of bone
        start = _crossing(d[j - 1], values[j - 1], d[j], values[j], bone_threshold)
        back = np.flatnonzero(in_bone[j:])
        if len(back):
            k = j + int(back[0])  # first step back in bone
            end: Optional[float] = _crossing(d[k - 1], values[k - 1], d[k], values[k], bone_threshold)
            lowest = float(np.min(values[j:k]))
        else:
            k = n
            end = None
            lowest = float(np.min(values[j:]))
        length = (end if end is not None else float(d[-1])) - start
        if length >= min_length_mm:
            breaches.append(Breach(start, end, lowest, profile.point_at(start)))
        i = k
    return breaches


@dataclass(frozen=True)
class ProfileComparison:
    """The synthetic CT's profile against the CT's, along the same trajectory.

    ``me_hu``/``mae_hu``: mean and mean absolute difference (sCT - CT) of the chosen statistic over
    the steps valid in both; ``max_abs_hu`` and ``max_abs_at_mm``: the largest difference and where.
    ``breaches_sct``/``breaches_ct``: the breaches found in each; ``matched``: pairs whose start
    lies within ``tolerance_mm``; ``only_sct``/``only_ct``: the others.
    """

    me_hu: float
    mae_hu: float
    max_abs_hu: float
    max_abs_at_mm: float
    correlation: float
    n_steps: int
    breaches_sct: List[Breach]
    breaches_ct: List[Breach]
    matched: List[Tuple[Breach, Breach]] = field(default_factory=list)
    only_sct: List[Breach] = field(default_factory=list)
    only_ct: List[Breach] = field(default_factory=list)

    @property
    def breaches_agree(self) -> bool:
        return not self.only_sct and not self.only_ct

    def describe(self) -> str:
        """A short plain-words report."""
        lines = [
            f"sCT - CT along the trajectory: mean {self.me_hu:+.0f} HU, mean absolute {self.mae_hu:.0f} HU, "
            f"largest {self.max_abs_hu:.0f} HU at {self.max_abs_at_mm:.1f} mm."
        ]
        if not self.breaches_sct and not self.breaches_ct:
            lines.append("Neither image shows the trajectory leaving bone.")
        for a, b in self.matched:
            lines.append(
                f"Both show a breach: sCT at {a.start_mm:.1f} mm, CT at {b.start_mm:.1f} mm "
                f"({a.start_mm - b.start_mm:+.1f} mm)."
            )
        for b in self.only_ct:
            lines.append(f"Only the CT shows a breach, at {b.start_mm:.1f} mm: the sCT misses it.")
        for a in self.only_sct:
            lines.append(f"Only the sCT shows a breach, at {a.start_mm:.1f} mm.")
        return "\n".join(lines)


def compare_profiles(
    sct: HUProfile,
    ct: HUProfile,
    *,
    statistic: str = "mean",
    bone_threshold: float = DEFAULT_BONE_THRESHOLD_HU,
    breach_statistic: str = "min",
    tolerance_mm: float = 2.0,
) -> ProfileComparison:
    """Compare two profiles sampled along the same trajectory, step by step.

    Both must have the same number of steps. They may lie in different images' spaces (the planned
    line mapped through a registration); their lengths must then agree within a step. Distances are
    reported along ``sct``.
    """
    if len(sct.distance_mm) != len(ct.distance_mm):
        raise InvalidParameterError(
            f"The two profiles must use the same steps along the trajectory; got {len(sct.distance_mm)} and "
            f"{len(ct.distance_mm)} steps over {sct.length_mm:.1f} and {ct.length_mm:.1f} mm. Sample both with the "
            "same n_steps (or the same start, end and step_mm)."
        )
    if abs(sct.length_mm - ct.length_mm) > max(sct.step_mm, ct.step_mm, 1e-6):
        raise InvalidParameterError(
            f"The two profiles follow trajectories of different lengths ({sct.length_mm:.2f} and {ct.length_mm:.2f} "
            "mm): they are not the same trajectory."
        )
    a = sct.statistic(statistic)
    b = ct.statistic(statistic)
    valid = np.isfinite(a) & np.isfinite(b)
    if not valid.any():
        raise InvalidParameterError("The trajectory lies outside one of the images: no step has values in both.")
    diff = a[valid] - b[valid]
    i_max = int(np.argmax(np.abs(diff)))
    if valid.sum() > 1 and np.std(a[valid]) > 0 and np.std(b[valid]) > 0:
        corr = float(np.corrcoef(a[valid], b[valid])[0, 1])
    else:
        corr = float("nan")
    breaches_sct = find_breaches(sct, bone_threshold=bone_threshold, statistic=breach_statistic)
    breaches_ct = find_breaches(ct, bone_threshold=bone_threshold, statistic=breach_statistic)
    matched: List[Tuple[Breach, Breach]] = []
    unmatched_ct = list(breaches_ct)
    only_sct: List[Breach] = []
    for s in breaches_sct:
        best = min(unmatched_ct, key=lambda c: abs(c.start_mm - s.start_mm), default=None)
        if best is not None and abs(best.start_mm - s.start_mm) <= tolerance_mm:
            matched.append((s, best))
            unmatched_ct.remove(best)
        else:
            only_sct.append(s)
    return ProfileComparison(
        me_hu=float(diff.mean()),
        mae_hu=float(np.abs(diff).mean()),
        max_abs_hu=float(abs(diff[i_max])),
        max_abs_at_mm=float(sct.distance_mm[valid][i_max]),
        correlation=corr,
        n_steps=int(valid.sum()),
        breaches_sct=breaches_sct,
        breaches_ct=breaches_ct,
        matched=matched,
        only_sct=only_sct,
        only_ct=unmatched_ct,
    )


def breach_report(profile: HUProfile, breaches: Sequence[Breach], *, name: str = "image") -> str:
    """Plain words for one image's trajectory check."""
    head = f"{name}: trajectory of {profile.length_mm:.1f} mm, screw radius {profile.radius_mm:.1f} mm."
    if not np.any(profile.inside_image):
        return head + " The trajectory lies outside the image."
    if not breaches:
        return head + " No breach found: after entering bone the screw stays inside it."
    return "\n".join([head] + [b.describe() for b in breaches])
