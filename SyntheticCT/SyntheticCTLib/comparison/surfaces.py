"""Bone surfaces in world coordinates and signed point-wise surface distances.

A surface is extracted from a binary mask with VTK's flying edges at the 0.5 level of the mask
and smoothed with a windowed-sinc filter, which removes the voxel staircase without shrinking the
surface. The image is built in VTK in index space scaled by the spacing and every point is then
mapped to world coordinates (LPS, mm, as SimpleITK) with ``origin + direction @ (index * spacing)``,
so anisotropic spacing and oblique (or mirrored) direction matrices are exact.

Distances are exact point-to-triangle distances: a k-d tree finds the nearest vertices of the
other surface, and the closest point is searched in the triangles around them. The sign comes
from the surface normal interpolated at the closest point: positive outside the other surface.
Statistics weight every vertex by the surface area it stands for (a third of its triangles' areas),
so they do not depend on how densely the mesh samples the surface.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Dict, Optional, Sequence, Tuple, Union

import numpy as np
import SimpleITK as sitk
import vtk
from scipy import ndimage
from scipy.spatial import cKDTree
from vtk.util import numpy_support

from SyntheticCTLib.kernel.errors import InvalidParameterError

logger = logging.getLogger(__name__)

DISTANCE_ARRAY = "SignedDistance_mm"
"""Name of the point array holding the signed distance to the other surface, in mm."""
AREA_ARRAY = "Area_mm2"
"""Name of the point array holding the surface area each vertex stands for, in mm²."""
MEASURED_ARRAY = "Measured"
"""Name of the point array: 1 for points in the statistics, 0 for points on a cut of the field of view."""
LABEL_ARRAY = "BoneLabel"
"""Name of the point array holding the bone label of each vertex (per-bone statistics)."""
SPREAD_ARRAY = "Spread_HU"
"""Name of the point array holding the synthetic CT's spread (uncertainty, HU) at each vertex."""


# ---------------------------------------------------------------------------------------------
# Surface extraction
# ---------------------------------------------------------------------------------------------


def _direction(image: sitk.Image) -> np.ndarray:
    return np.array(image.GetDirection(), dtype=float).reshape(3, 3)


def bone_surface(
    mask: sitk.Image,
    *,
    smoothing_iterations: int = 20,
    pass_band: float = 0.01,
) -> vtk.vtkPolyData:
    """Extract the closed surface of a binary mask, in world coordinates (LPS, mm).

    Parameters
    ----------
    mask
        A 3D image; voxels > 0 are inside.
    smoothing_iterations, pass_band
        Windowed-sinc smoothing (``vtkWindowedSincPolyDataFilter``); 0 iterations keeps the raw
        flying-edges surface. The filter is a low-pass filter and does not shrink the surface.

    Returns
    -------
    vtk.vtkPolyData
        Triangles with outward point normals (``Normals``) and the per-vertex area
        (``Area_mm2``); empty when the mask is empty.
    """
    if mask.GetDimension() != 3:
        raise InvalidParameterError(f"A 3D mask is required for a surface; got a {mask.GetDimension()}D image.")
    array = sitk.GetArrayViewFromImage(mask)
    nonzero = np.nonzero(np.any(array > 0, axis=(1, 2)))[0]
    if nonzero.size == 0:
        return vtk.vtkPolyData()
    # Crop to the bounding box with a margin of 2 voxels of background, so the surface is closed.
    lo, hi = [], []
    for axis in range(3):
        other = tuple(a for a in range(3) if a != axis)
        present = np.nonzero(np.any(array > 0, axis=other))[0]
        lo.append(int(present[0]))
        hi.append(int(present[-1]) + 1)
    crop = np.asarray(array[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]] > 0, dtype=np.uint8)
    padded = np.pad(crop, 2)
    start_zyx = np.array(lo) - 2

    spacing = np.array(mask.GetSpacing(), dtype=float)
    vtk_image = vtk.vtkImageData()
    vtk_image.SetDimensions(padded.shape[2], padded.shape[1], padded.shape[0])
    vtk_image.SetSpacing(*spacing)
    vtk_image.SetOrigin(*(start_zyx[::-1] * spacing))
    scalars = numpy_support.numpy_to_vtk(padded.ravel(), deep=True, array_type=vtk.VTK_UNSIGNED_CHAR)
    vtk_image.GetPointData().SetScalars(scalars)

    contour = vtk.vtkFlyingEdges3D()
    contour.SetInputData(vtk_image)
    contour.SetValue(0, 0.5)
    contour.ComputeNormalsOff()
    contour.ComputeGradientsOff()
    contour.ComputeScalarsOff()
    contour.Update()
    surface = contour.GetOutput()
    if smoothing_iterations > 0 and surface.GetNumberOfPoints() > 0:
        smoother = vtk.vtkWindowedSincPolyDataFilter()
        smoother.SetInputData(surface)
        smoother.SetNumberOfIterations(int(smoothing_iterations))
        smoother.SetPassBand(float(pass_band))
        smoother.NormalizeCoordinatesOn()
        smoother.BoundarySmoothingOff()
        smoother.FeatureEdgeSmoothingOff()
        smoother.NonManifoldSmoothingOn()
        smoother.Update()
        surface = smoother.GetOutput()

    # Index space (scaled by spacing) -> world: origin + direction @ p.
    points = numpy_support.vtk_to_numpy(surface.GetPoints().GetData()).astype(np.float64)
    world = points @ _direction(mask).T + np.asarray(mask.GetOrigin(), dtype=float)
    result = vtk.vtkPolyData()
    vtk_points = vtk.vtkPoints()
    vtk_points.SetData(numpy_support.numpy_to_vtk(world, deep=True))
    result.SetPoints(vtk_points)
    result.SetPolys(surface.GetPolys())
    triangles = _triangles(result)
    face = _face_vectors(world, triangles)
    # Signed volume (sum of a . ((b - a) x (c - a)) / 6): negative when the triangles face inward,
    # as a mirroring direction matrix makes them.
    if np.einsum("ij,ij->", world[triangles[:, 0]], face) < 0:
        triangles = np.ascontiguousarray(triangles[:, ::-1])
        face = -face
        _set_triangles(result, triangles)
    _add_normals_and_areas(result, triangles, face)
    return result


def affine_of(
    transform: Optional[sitk.Transform], probe: Optional[sitk.Image] = None
) -> Optional[Tuple[np.ndarray, np.ndarray]]:
    """``(A, t)`` with ``transform(p) = A p + t`` for a linear transform; None when it is not linear.

    The map is read off the transform at four points and checked at the corners and the centre of
    ``probe`` (or of a 200 mm cube about the origin): a B-spline or displacement field fails the check.
    None as ``transform`` is the identity.
    """
    if transform is None:
        return np.eye(3), np.zeros(3)
    origin = np.asarray(transform.TransformPoint((0.0, 0.0, 0.0)), dtype=float)
    matrix = np.column_stack([np.asarray(transform.TransformPoint(tuple(e)), dtype=float) - origin for e in np.eye(3)])
    if probe is not None:
        size = np.asarray(probe.GetSize()) - 1
        corners = [
            probe.TransformContinuousIndexToPhysicalPoint(tuple(float(v) for v in size * c))
            for c in np.array(np.meshgrid([0, 1], [0, 1], [0, 1])).reshape(3, -1).T
        ]
        checks = np.array(corners + [probe.TransformContinuousIndexToPhysicalPoint(tuple(size / 2.0))])
    else:
        checks = np.array(np.meshgrid([-100, 100], [-100, 100], [-100, 100])).reshape(3, -1).T.astype(float)
    for point in checks:
        expected = matrix @ point + origin
        if np.linalg.norm(np.asarray(transform.TransformPoint(tuple(point))) - expected) > 1e-4:
            return None
    if abs(np.linalg.det(matrix)) < 1e-9:
        return None
    return matrix, origin


def mapped_surface(surface: vtk.vtkPolyData, matrix: np.ndarray, offset: np.ndarray) -> vtk.vtkPolyData:
    """A copy of ``surface`` with every point ``p`` moved to ``matrix @ p + offset``; normals and areas anew."""
    result = vtk.vtkPolyData()
    if surface.GetNumberOfPoints() == 0:
        return result
    world = surface_points(surface) @ np.asarray(matrix, dtype=float).T + np.asarray(offset, dtype=float)
    vtk_points = vtk.vtkPoints()
    vtk_points.SetData(numpy_support.numpy_to_vtk(np.ascontiguousarray(world), deep=True))
    result.SetPoints(vtk_points)
    triangles = _triangles(surface)
    if np.linalg.det(matrix) < 0:  # a mirroring map turns the triangles inside out
        triangles = np.ascontiguousarray(triangles[:, ::-1])
    _set_triangles(result, triangles)
    _add_normals_and_areas(result, triangles, _face_vectors(world, triangles))
    return result


def _triangles(poly: vtk.vtkPolyData) -> np.ndarray:
    """The (n, 3) vertex indices of a triangle-only polydata."""
    if poly.GetNumberOfPolys() == 0:
        return np.zeros((0, 3), dtype=np.int64)
    polys = poly.GetPolys()
    offsets = numpy_support.vtk_to_numpy(polys.GetOffsetsArray())
    if not np.all(np.diff(offsets) == 3):
        raise InvalidParameterError("The surface must be made of triangles only.")
    return numpy_support.vtk_to_numpy(polys.GetConnectivityArray()).astype(np.int64).reshape(-1, 3)


def _set_triangles(poly: vtk.vtkPolyData, triangles: np.ndarray) -> None:
    cells = vtk.vtkCellArray()
    offsets = numpy_support.numpy_to_vtk(np.arange(0, 3 * len(triangles) + 1, 3, dtype=np.int64), deep=True)
    connectivity = numpy_support.numpy_to_vtk(triangles.astype(np.int64).ravel(), deep=True)
    cells.SetData(offsets, connectivity)
    poly.SetPolys(cells)


def _face_vectors(points: np.ndarray, triangles: np.ndarray) -> np.ndarray:
    """Per-triangle ``(b - a) x (c - a)``: the outward normal times twice the area."""
    a = points[triangles[:, 0]]
    return np.cross(points[triangles[:, 1]] - a, points[triangles[:, 2]] - a)


def _add_normals_and_areas(poly: vtk.vtkPolyData, triangles: np.ndarray, face: np.ndarray) -> None:
    """Add area-weighted outward point normals (``Normals``) and per-vertex areas (``Area_mm2``)."""
    n_points = poly.GetNumberOfPoints()
    flat = triangles.ravel()
    normals = np.empty((n_points, 3))
    for axis in range(3):
        normals[:, axis] = np.bincount(flat, weights=np.repeat(face[:, axis], 3), minlength=n_points)
    length = np.linalg.norm(normals, axis=1, keepdims=True)
    normals = np.divide(normals, length, out=np.zeros_like(normals), where=length > 0)
    area = 0.5 * np.linalg.norm(face, axis=1)
    vertex_area = np.bincount(flat, weights=np.repeat(area / 3.0, 3), minlength=n_points)
    normal_array = numpy_support.numpy_to_vtk(normals, deep=True)
    normal_array.SetName("Normals")
    poly.GetPointData().SetNormals(normal_array)
    area_array = numpy_support.numpy_to_vtk(vertex_area, deep=True)
    area_array.SetName(AREA_ARRAY)
    poly.GetPointData().AddArray(area_array)


def surface_points(poly: vtk.vtkPolyData) -> np.ndarray:
    """The (n, 3) world coordinates of a surface's vertices."""
    if poly.GetNumberOfPoints() == 0:
        return np.zeros((0, 3))
    return numpy_support.vtk_to_numpy(poly.GetPoints().GetData()).astype(np.float64)


def point_array(poly: vtk.vtkPolyData, name: str) -> np.ndarray:
    """A named point-data array of ``poly`` as numpy; raise when absent."""
    array = poly.GetPointData().GetArray(name)
    if array is None:
        raise InvalidParameterError(f"The surface has no point array named '{name}'.")
    return numpy_support.vtk_to_numpy(array)


def set_point_array(poly: vtk.vtkPolyData, name: str, values: np.ndarray) -> None:
    """Add (or replace) the point-data array ``name`` of ``poly``."""
    array = numpy_support.numpy_to_vtk(np.ascontiguousarray(values), deep=True)
    array.SetName(name)
    poly.GetPointData().RemoveArray(name)
    poly.GetPointData().AddArray(array)


# ---------------------------------------------------------------------------------------------
# Signed distances
# ---------------------------------------------------------------------------------------------


class _Mesh:
    """A triangle surface prepared for closest-point queries."""

    def __init__(self, poly: vtk.vtkPolyData) -> None:
        self.points = surface_points(poly)
        self.triangles = _triangles(poly)
        if len(self.points) == 0 or len(self.triangles) == 0:
            raise InvalidParameterError("Cannot measure distances to an empty surface.")
        normals = poly.GetPointData().GetNormals()
        if normals is None:
            _add_normals_and_areas(poly, self.triangles, _face_vectors(self.points, self.triangles))
            normals = poly.GetPointData().GetNormals()
        self.normals = numpy_support.vtk_to_numpy(normals).astype(np.float64)
        # Vertex -> incident triangles, as CSR; only vertices that belong to a triangle are searched.
        vertex_of = self.triangles.ravel()
        order = np.argsort(vertex_of, kind="stable")
        self.ring = (order // 3).astype(np.int64)
        counts = np.bincount(vertex_of, minlength=len(self.points))
        self.ring_start = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        self.used = np.flatnonzero(counts > 0)
        self.tree = cKDTree(self.points[self.used])
        # Per-triangle corner and edges, and the edges' dot products, for the closest-point tests.
        a = self.points[self.triangles[:, 0]]
        self.a = a
        self.ab = self.points[self.triangles[:, 1]] - a
        self.ac = self.points[self.triangles[:, 2]] - a
        self.d00 = np.einsum("ij,ij->i", self.ab, self.ab)
        self.d01 = np.einsum("ij,ij->i", self.ab, self.ac)
        self.d11 = np.einsum("ij,ij->i", self.ac, self.ac)


def _closest_on_triangles(ap, ab, ac, d00, d01, d11):
    """Barycentric weights (v, w) of the closest point on triangles ``a + v ab + w ac`` to ``a + ap``.

    The region tests of the classic closest-point-on-triangle algorithm (vertex, edge and face
    regions), vectorized over rows; ``d00, d01, d11`` are ``ab.ab, ab.ac, ac.ac``.
    """
    d1 = np.einsum("ij,ij->i", ab, ap)
    d2 = np.einsum("ij,ij->i", ac, ap)
    d3, d4 = d1 - d00, d2 - d01  # ab.bp, ac.bp
    d5, d6 = d1 - d01, d2 - d11  # ab.cp, ac.cp
    va = d3 * d6 - d5 * d4
    vb = d5 * d2 - d1 * d6
    vc = d1 * d4 - d3 * d2

    def ratio(num, den):
        return num / np.where(den != 0, den, 1.0)

    denom = va + vb + vc
    v = ratio(vb, denom)  # face region
    w = ratio(vc, denom)
    zero = np.zeros_like(v)
    one = np.ones_like(v)
    t_bc = ratio(d4 - d3, (d4 - d3) + (d5 - d6))
    t_ac = ratio(d2, d2 - d6)
    t_ab = ratio(d1, d1 - d3)
    # From the last test of the algorithm to the first, so that the first matching test wins.
    regions = (
        ((va <= 0) & (d4 >= d3) & (d5 >= d6), 1.0 - t_bc, t_bc),  # edge bc
        ((vb <= 0) & (d2 >= 0) & (d6 <= 0), zero, t_ac),  # edge ac
        ((d6 >= 0) & (d5 <= d6), zero, one),  # vertex c
        ((vc <= 0) & (d1 >= 0) & (d3 <= 0), t_ab, zero),  # edge ab
        ((d3 >= 0) & (d4 <= d3), one, zero),  # vertex b
        ((d1 <= 0) & (d2 <= 0), zero, zero),  # vertex a
    )
    for condition, rv, rw in regions:
        v = np.where(condition, rv, v)
        w = np.where(condition, rw, w)
    return v, w


def _closest_in_rings(mesh: _Mesh, p: np.ndarray, vertices: np.ndarray, k: int):
    """Closest points to each row of ``p`` on the triangles around its ``k`` given ``vertices``.

    Returns the squared distance, the triangle, its barycentric weights (v, w) and ``p`` minus the
    closest point, for every row of ``p``.
    """
    n = len(p)
    query = np.repeat(np.arange(n), k)
    counts = mesh.ring_start[vertices + 1] - mesh.ring_start[vertices]
    total = int(counts.sum())
    group_start = np.cumsum(counts) - counts
    within = np.arange(total) - np.repeat(group_start, counts)
    pair_triangle = mesh.ring[np.repeat(mesh.ring_start[vertices], counts) + within]
    pair_query = np.repeat(query, counts)
    ap = p[pair_query] - mesh.a[pair_triangle]
    ab, ac = mesh.ab[pair_triangle], mesh.ac[pair_triangle]
    v, w = _closest_on_triangles(ap, ab, ac, mesh.d00[pair_triangle], mesh.d01[pair_triangle], mesh.d11[pair_triangle])
    offset = ap - v[:, None] * ab - w[:, None] * ac  # p - closest point
    dist2 = np.einsum("ij,ij->i", offset, offset)
    # The best pair of each query (pairs are grouped by query, in query order).
    per_query = counts.reshape(n, k).sum(axis=1)
    query_start = np.cumsum(per_query) - per_query
    minimum = np.minimum.reduceat(dist2, query_start)
    candidates = np.flatnonzero(dist2 <= minimum[pair_query])
    first = np.concatenate([[True], pair_query[candidates][1:] != pair_query[candidates][:-1]])
    best = candidates[first]
    return minimum, pair_triangle[best], v[best], w[best], offset[best]


def signed_distances(points: np.ndarray, target, *, chunk: int = 100_000, workers: int = -1) -> np.ndarray:
    """Signed distance (mm) from each of ``points`` to the surface ``target``; outside positive.

    The closest point is searched in the triangles around the nearest vertex of ``target``; when
    it falls on the outer edge of that one-ring (so a closer point may lie beyond it), the search is
    repeated over the triangles around the 4 nearest vertices.

    Parameters
    ----------
    points
        (n, 3) world coordinates.
    target
        A closed triangle surface (``vtkPolyData``) with outward normals, as :func:`bone_surface` makes.
    """
    mesh = target if isinstance(target, _Mesh) else _Mesh(target)
    points = np.asarray(points, dtype=np.float64).reshape(-1, 3)
    result = np.empty(len(points))
    for start in range(0, len(points), chunk):
        p = points[start : start + chunk]
        _, nearest = mesh.tree.query(p, k=1, workers=workers)
        centre = mesh.used[np.asarray(nearest).reshape(-1)]
        dist2, triangle, v, w, offset = _closest_in_rings(mesh, p, centre, 1)
        # The weight of the ring's centre vertex at the closest point; 0 means the outer edge.
        corners = mesh.triangles[triangle]
        centre_weight = np.select([corners[:, 0] == centre, corners[:, 1] == centre], [1.0 - v - w, v], default=w)
        again = np.flatnonzero(centre_weight <= 0.05)
        if again.size:
            k = min(4, len(mesh.used))
            _, nearest_k = mesh.tree.query(p[again], k=k, workers=workers)
            vertices = mesh.used[np.asarray(nearest_k).reshape(-1)]
            d2, t2, v2, w2, o2 = _closest_in_rings(mesh, p[again], vertices, k)
            better = d2 < dist2[again]
            idx = again[better]
            dist2[idx], triangle[idx], v[idx], w[idx], offset[idx] = (
                d2[better],
                t2[better],
                v2[better],
                w2[better],
                o2[better],
            )
            corners = mesh.triangles[triangle]
        vb, wb = v[:, None], w[:, None]
        normal = (
            (1.0 - vb - wb) * mesh.normals[corners[:, 0]]
            + vb * mesh.normals[corners[:, 1]]
            + wb * mesh.normals[corners[:, 2]]
        )
        sign = np.where(np.einsum("ij,ij->i", offset, normal) < 0, -1.0, 1.0)
        result[start : start + len(p)] = sign * np.sqrt(dist2)
    return result


# ---------------------------------------------------------------------------------------------
# Statistics
# ---------------------------------------------------------------------------------------------


def weighted_quantiles(values: np.ndarray, weights: np.ndarray, qs: Sequence[float]) -> list:
    """The ``qs`` quantiles (0..1) of ``values`` weighted by ``weights`` (inverted weighted CDF), one sort."""
    values = np.asarray(values, dtype=float)
    if values.size == 0:
        return [float("nan") for _ in qs]
    order = np.argsort(values)
    cumulative = np.cumsum(np.asarray(weights, dtype=float)[order])
    index = np.searchsorted(cumulative, np.asarray(qs, dtype=float) * cumulative[-1], side="left")
    return [float(values[order[min(int(i), len(values) - 1)]]) for i in index]


def weighted_quantile(values: np.ndarray, weights: np.ndarray, q: float) -> float:
    """The ``q`` quantile (0..1) of ``values`` weighted by ``weights`` (inverted weighted CDF)."""
    return weighted_quantiles(values, weights, [q])[0]


@dataclass(frozen=True)
class DistanceStats:
    """Statistics of signed surface distances (mm), area-weighted.

    ``mean_abs_mm``, ``median_mm``, ``rms_mm`` and ``p95_mm`` are of the absolute distance;
    ``max_mm`` is the largest absolute distance (the directed Hausdorff distance);
    ``within_1mm``/``within_2mm`` are the fractions (0..1) of surface area within 1 and 2 mm;
    ``mean_signed_mm`` is the signed mean (positive: the surface lies outside the other one);
    ``n_points`` counts the points measured (those of positive weight).
    """

    mean_abs_mm: float
    median_mm: float
    rms_mm: float
    p95_mm: float
    max_mm: float
    within_1mm: float
    within_2mm: float
    mean_signed_mm: float
    n_points: int
    area_mm2: float

    @classmethod
    def from_values(cls, distances: np.ndarray, weights: Optional[np.ndarray] = None) -> DistanceStats:
        d = np.asarray(distances, dtype=float)
        w = np.ones_like(d) if weights is None else np.asarray(weights, dtype=float)
        if weights is not None:  # points of zero weight (e.g. on a cut of the field of view) do not count
            d, w = d[w > 0], w[w > 0]
        if d.size == 0 or w.sum() <= 0:
            nan = float("nan")
            return cls(nan, nan, nan, nan, nan, nan, nan, nan, int(d.size), 0.0)
        a = np.abs(d)
        total = float(w.sum())
        median, p95 = weighted_quantiles(a, w, (0.5, 0.95))
        return cls(
            mean_abs_mm=float(np.dot(w, a) / total),
            median_mm=median,
            rms_mm=float(np.sqrt(np.dot(w, a * a) / total)),
            p95_mm=p95,
            max_mm=float(a.max()),
            within_1mm=float(w[a <= 1.0].sum() / total),
            within_2mm=float(w[a <= 2.0].sum() / total),
            mean_signed_mm=float(np.dot(w, d) / total),
            n_points=int(d.size),
            area_mm2=total,
        )

    def to_dict(self) -> Dict[str, float]:
        return {
            "mean_abs_mm": self.mean_abs_mm,
            "median_mm": self.median_mm,
            "rms_mm": self.rms_mm,
            "p95_mm": self.p95_mm,
            "max_mm": self.max_mm,
            "within_1mm": self.within_1mm,
            "within_2mm": self.within_2mm,
            "mean_signed_mm": self.mean_signed_mm,
            "n_points": self.n_points,
            "area_mm2": self.area_mm2,
        }


@dataclass(frozen=True)
class SurfaceDistances:
    """Signed distances between a synthetic and a reference surface, with their statistics.

    ``synthetic_to_reference`` measures the synthetic surface's points against the reference
    surface (positive: the synthetic bone lies outside the reference bone), and
    ``reference_to_synthetic`` the other way. ``symmetric`` pools both directions' points
    (area-weighted, the reference direction's sign flipped so that positive always means the synthetic
    bone lies outside the reference bone); its ``max_mm`` is the Hausdorff distance. ``hd95_mm`` is the larger of the
    two directed 95th percentiles (the "95 % Hausdorff distance" of the segmentation literature).
    """

    synthetic_to_reference: DistanceStats
    reference_to_synthetic: DistanceStats
    symmetric: DistanceStats
    hd95_mm: float
    synthetic_distances: np.ndarray = field(repr=False, compare=False)
    synthetic_weights: np.ndarray = field(repr=False, compare=False)
    reference_distances: np.ndarray = field(repr=False, compare=False)
    reference_weights: np.ndarray = field(repr=False, compare=False)

    @classmethod
    def from_arrays(
        cls,
        synthetic_distances: np.ndarray,
        synthetic_weights: np.ndarray,
        reference_distances: np.ndarray,
        reference_weights: np.ndarray,
    ) -> SurfaceDistances:
        s2r = DistanceStats.from_values(synthetic_distances, synthetic_weights)
        r2s = DistanceStats.from_values(reference_distances, reference_weights)
        both = DistanceStats.from_values(
            # Pooled with the reference direction's sign flipped: positive means the synthetic bone
            # lies outside the reference bone in either direction.
            np.concatenate([synthetic_distances, -np.asarray(reference_distances, dtype=float)]),
            np.concatenate([synthetic_weights, reference_weights]),
        )
        hd95 = float(np.nanmax([s2r.p95_mm, r2s.p95_mm])) if (s2r.n_points and r2s.n_points) else float("nan")
        return cls(
            s2r,
            r2s,
            both,
            hd95,
            np.asarray(synthetic_distances, dtype=float),
            np.asarray(synthetic_weights, dtype=float),
            np.asarray(reference_distances, dtype=float),
            np.asarray(reference_weights, dtype=float),
        )

    def to_dict(self) -> dict:
        return {
            "symmetric": self.symmetric.to_dict(),
            "synthetic_to_reference": self.synthetic_to_reference.to_dict(),
            "reference_to_synthetic": self.reference_to_synthetic.to_dict(),
            "hd95_mm": self.hd95_mm,
        }


def surface_distances(
    synthetic: vtk.vtkPolyData,
    reference: vtk.vtkPolyData,
    *,
    store: bool = True,
    synthetic_measured: Optional[np.ndarray] = None,
    reference_measured: Optional[np.ndarray] = None,
) -> SurfaceDistances:
    """Signed point-wise distances from the synthetic surface to the reference surface, and back.

    With ``store`` the distances are added to each surface as the point array
    ``SignedDistance_mm`` (outside the other surface positive). ``synthetic_measured`` and
    ``reference_measured`` (booleans per point) leave points out of the statistics, e.g. those on a
    cut of the field of view (see :func:`points_in_mask`); their distances are still stored.
    """
    for name, poly in (("synthetic", synthetic), ("reference", reference)):
        if poly.GetNumberOfPoints() == 0:
            raise InvalidParameterError(
                f"The {name} bone surface is empty: no bone was found (check the bone threshold or the labels)."
            )
    syn_mesh, ref_mesh = _Mesh(synthetic), _Mesh(reference)
    d_syn = signed_distances(syn_mesh.points, ref_mesh)
    d_ref = signed_distances(ref_mesh.points, syn_mesh)
    if store:
        set_point_array(synthetic, DISTANCE_ARRAY, d_syn)
        set_point_array(reference, DISTANCE_ARRAY, d_ref)
    w_syn, w_ref = _areas(synthetic), _areas(reference)
    if synthetic_measured is not None:
        w_syn = np.where(np.asarray(synthetic_measured, dtype=bool), w_syn, 0.0)
    if reference_measured is not None:
        w_ref = np.where(np.asarray(reference_measured, dtype=bool), w_ref, 0.0)
    return SurfaceDistances.from_arrays(d_syn, w_syn, d_ref, w_ref)


def values_at_points(
    points: np.ndarray,
    image: Union[sitk.Image, np.ndarray],
    like: Optional[sitk.Image] = None,
    outside: float = 0.0,
    *,
    linear: bool = False,
) -> np.ndarray:
    """The value of the nearest voxel of ``image`` at each world point (``outside`` off the grid).

    ``image`` is an image, or a (z, y, x) array on the grid of ``like``. With ``linear`` the value is
    interpolated trilinearly between the voxel centres (float64; the edge voxels' values within half a
    voxel of the grid's edge), so a field linear in position is reproduced exactly.
    """
    grid = image if isinstance(image, sitk.Image) else like
    if grid is None:
        raise InvalidParameterError("values_at_points needs the grid (like=) of an array.")
    array = sitk.GetArrayViewFromImage(image) if isinstance(image, sitk.Image) else np.asarray(image)
    points = np.asarray(points, dtype=float).reshape(-1, 3)
    continuous = ((points - np.asarray(grid.GetOrigin())) @ _direction(grid)) / np.asarray(grid.GetSpacing())
    if linear:
        zyx = continuous[:, ::-1]
        inside = np.all((zyx >= -0.5) & (zyx <= np.array(array.shape) - 0.5), axis=1)
        result = np.full(len(points), outside, dtype=np.float64)
        if inside.any():
            result[inside] = ndimage.map_coordinates(
                np.asarray(array, dtype=np.float64), zyx[inside].T, order=1, mode="nearest"
            )
        return result
    index = np.rint(continuous).astype(np.int64)[:, ::-1]
    inside = np.all((index >= 0) & (index < np.array(array.shape)), axis=1)
    result = np.full(len(points), outside, dtype=np.result_type(array.dtype, np.asarray(outside).dtype))
    result[inside] = array[index[inside, 0], index[inside, 1], index[inside, 2]]
    return result


def points_in_mask(
    points: np.ndarray, mask: Union[sitk.Image, np.ndarray], like: Optional[sitk.Image] = None
) -> np.ndarray:
    """True for each world point whose nearest voxel of ``mask`` is set (False outside the grid).

    ``mask`` is an image, or a (z, y, x) array on the grid of ``like``.
    """
    if not isinstance(mask, sitk.Image) and like is None:
        raise InvalidParameterError("points_in_mask needs the grid (like=) of an array mask.")
    return values_at_points(points, mask, like) > 0


def _areas(poly: vtk.vtkPolyData) -> np.ndarray:
    array = poly.GetPointData().GetArray(AREA_ARRAY)
    if array is None:
        triangles = _triangles(poly)
        _add_normals_and_areas(poly, triangles, _face_vectors(surface_points(poly), triangles))
        array = poly.GetPointData().GetArray(AREA_ARRAY)
    return numpy_support.vtk_to_numpy(array).astype(np.float64)


def mask_surface_distances(
    synthetic_mask: sitk.Image, reference_mask: sitk.Image, **surface_options
) -> SurfaceDistances:
    """:func:`surface_distances` between the surfaces of two masks (see :func:`bone_surface`)."""
    return surface_distances(
        bone_surface(synthetic_mask, **surface_options), bone_surface(reference_mask, **surface_options)
    )


# ---------------------------------------------------------------------------------------------
# Per-bone statistics
# ---------------------------------------------------------------------------------------------


def label_surface_points(points: np.ndarray, labels: sitk.Image, *, max_distance_mm: float = 5.0) -> np.ndarray:
    """The bone label of each point: the label of the nearest labelled voxel (0 when farther than
    ``max_distance_mm``)."""
    array = sitk.GetArrayViewFromImage(labels)
    if not np.any(array > 0):
        return np.zeros(len(points), dtype=np.int64)
    lab = np.asarray(array).astype(np.int64)
    # Boundary voxels of the labelled regions: a 6-neighbour with a different label, or the image edge.
    boundary = np.zeros(lab.shape, dtype=bool)
    for axis in range(3):
        diff = np.diff(lab, axis=axis) != 0
        lower = [slice(None)] * 3
        upper = [slice(None)] * 3
        lower[axis] = slice(0, -1)
        upper[axis] = slice(1, None)
        boundary[tuple(lower)] |= diff
        boundary[tuple(upper)] |= diff
        edge = [slice(None)] * 3
        edge[axis] = 0
        boundary[tuple(edge)] = True
        edge[axis] = -1
        boundary[tuple(edge)] = True
    boundary &= lab > 0
    index_zyx = np.argwhere(boundary)
    values = lab[boundary]
    spacing = np.asarray(labels.GetSpacing(), dtype=float)
    world = np.asarray(labels.GetOrigin(), dtype=float) + (index_zyx[:, ::-1] * spacing) @ _direction(labels).T
    tree = cKDTree(world)
    distance, nearest = tree.query(np.asarray(points, dtype=float), k=1, workers=-1)
    result = values[nearest]
    # A point inside a labelled voxel takes that voxel's label even when a boundary of another is nearer.
    index = np.rint(
        ((np.asarray(points, dtype=float) - np.asarray(labels.GetOrigin())) @ _direction(labels)) / spacing
    ).astype(np.int64)[:, ::-1]
    inside = np.all((index >= 0) & (index < np.array(lab.shape)), axis=1)
    inner = np.zeros(len(points), dtype=np.int64)
    inner[inside] = lab[index[inside, 0], index[inside, 1], index[inside, 2]]
    result = np.where(inner > 0, inner, result)
    result[(inner == 0) & (distance > max_distance_mm)] = 0
    return result


def per_bone_stats(
    distances: SurfaceDistances,
    synthetic_labels: np.ndarray,
    reference_labels: np.ndarray,
    *,
    names: Optional[Dict[int, str]] = None,
    labels: Optional[Sequence[int]] = None,
) -> list:
    """Statistics per bone label, from the per-point labels of both surfaces.

    Returns a list of dicts, one per label: ``label``, ``name``, ``surface_mean_mm``,
    ``surface_median_mm``, ``surface_rms_mm``, ``surface_p95_mm``, ``surface_max_mm``,
    ``surface_within_1mm``, ``surface_within_2mm``, ``surface_hd95_mm`` and the two directions.
    """
    if labels is None:
        labels = sorted(set(np.unique(reference_labels).tolist()) | set(np.unique(synthetic_labels).tolist()))
    rows = []
    for label in labels:
        if label == 0:
            continue
        s = synthetic_labels == label
        r = reference_labels == label
        sub = SurfaceDistances.from_arrays(
            distances.synthetic_distances[s],
            distances.synthetic_weights[s],
            distances.reference_distances[r],
            distances.reference_weights[r],
        )
        rows.append(bone_row(int(label), sub, name=(names or {}).get(int(label), f"bone {int(label)}")))
    return rows


def bone_row(label: int, sub: SurfaceDistances, *, name: str) -> dict:
    """One per-bone row of the metrics, in the same key style as the global metrics."""
    sym = sub.symmetric
    return {
        "label": label,
        "name": name,
        "surface_mean_mm": sym.mean_abs_mm,
        "surface_median_mm": sym.median_mm,
        "surface_rms_mm": sym.rms_mm,
        "surface_p95_mm": sym.p95_mm,
        "surface_max_mm": sym.max_mm,
        "surface_within_1mm": sym.within_1mm,
        "surface_within_2mm": sym.within_2mm,
        "surface_hd95_mm": sub.hd95_mm,
        "surface_mean_signed_mm": sym.mean_signed_mm,
        "synthetic_to_reference": sub.synthetic_to_reference.to_dict(),
        "reference_to_synthetic": sub.reference_to_synthetic.to_dict(),
    }
