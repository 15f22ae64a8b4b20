"""Analytic shapes for the phantom: signed-distance-like fields evaluated on sub-blocks of the grid.

Every structure is an approximate signed distance ``d`` in millimetres (negative inside) in its own
local frame. :func:`occupancy` turns ``d`` into the fraction of each voxel inside the shape with a
linear ramp one voxel wide, which gives partial volume at every boundary. Structures are evaluated
only inside their bounding box (:meth:`Grid.block`), in float32.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import numpy as np

F32 = np.float32


def rotation_matrix(rx_deg: float = 0.0, ry_deg: float = 0.0, rz_deg: float = 0.0) -> np.ndarray:
    """Rotation about x, then y, then z (angles in degrees), as a 3x3 matrix acting on column vectors."""
    ax, ay, az = np.deg2rad([rx_deg, ry_deg, rz_deg])
    cx, sx, cy, sy, cz, sz = np.cos(ax), np.sin(ax), np.cos(ay), np.sin(ay), np.cos(az), np.sin(az)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ ry @ rx


def align_z_to(tangent: Sequence[float]) -> np.ndarray:
    """The smallest rotation taking the z axis onto ``tangent``."""
    t = np.asarray(tangent, dtype=float)
    t = t / np.linalg.norm(t)
    z = np.array([0.0, 0.0, 1.0])
    v = np.cross(z, t)
    s = np.linalg.norm(v)
    c = float(np.dot(z, t))
    if s < 1e-12:
        return np.eye(3)
    vx = np.array([[0, -v[2], v[1]], [v[2], 0, -v[0]], [-v[1], v[0], 0]])
    return np.eye(3) + vx + vx @ vx * ((1 - c) / s**2)


@dataclass(frozen=True)
class Frame:
    """A rigid local frame: world point ``p`` has local coordinates ``rotation.T @ (p - centre)``."""

    rotation: np.ndarray
    centre: np.ndarray

    def compose(self, inner: Frame) -> Frame:
        """The frame ``inner`` expressed in this frame's parent (world) coordinates."""
        return Frame(self.rotation @ inner.rotation, self.centre + self.rotation @ inner.centre)

    def to_world(self, local_points: np.ndarray) -> np.ndarray:
        return np.asarray(local_points) @ self.rotation.T + self.centre


@dataclass(frozen=True)
class Block:
    """A box of voxels (numpy z, y, x slices) and its world coordinate axes."""

    slices: Tuple[slice, slice, slice]
    x: np.ndarray
    y: np.ndarray
    z: np.ndarray

    @property
    def shape(self) -> Tuple[int, int, int]:
        return (len(self.z), len(self.y), len(self.x))

    def local(self, frame: Frame) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Local coordinates (u, v, w) of every voxel of the block in ``frame``, float32 arrays."""
        r = frame.rotation.astype(F32)
        dx = (self.x - frame.centre[0]).astype(F32)[None, None, :]
        dy = (self.y - frame.centre[1]).astype(F32)[None, :, None]
        dz = (self.z - frame.centre[2]).astype(F32)[:, None, None]
        # local = R^T (p - c): component i = sum_j R[j, i] * d_j
        return tuple(dx * r[0, i] + dy * r[1, i] + dz * r[2, i] for i in range(3))


class Grid:
    """The phantom's voxel grid: identity direction (LPS), centred near the world origin."""

    def __init__(self, size_xyz: Sequence[int], spacing_xyz: Sequence[float]) -> None:
        self.size = tuple(int(s) for s in size_xyz)
        self.spacing = tuple(float(s) for s in spacing_xyz)
        self.origin = tuple(-(n - 1) * s / 2.0 for n, s in zip(self.size, self.spacing))
        self.axes = [o + np.arange(n) * s for o, n, s in zip(self.origin, self.size, self.spacing)]
        self.shape = (self.size[2], self.size[1], self.size[0])
        self.voxel_mm = float(np.prod(self.spacing) ** (1.0 / 3.0))
        self.fov = tuple(n * s for n, s in zip(self.size, self.spacing))

    def block(
        self, frame: Optional[Frame] = None, lo: Sequence[float] = (), hi: Sequence[float] = (), margin_vox: int = 2
    ) -> Optional[Block]:
        """The block of voxels covering the local box ``[lo, hi]`` of ``frame`` (all of it when no frame)."""
        if frame is None:
            bounds = [(0, n) for n in self.size]
        else:
            corners = np.array([[a, b, c] for a in (lo[0], hi[0]) for b in (lo[1], hi[1]) for c in (lo[2], hi[2])])
            world = frame.to_world(corners)
            bounds = []
            for axis in range(3):
                idx = (world[:, axis] - self.origin[axis]) / self.spacing[axis]
                start = max(0, int(np.floor(idx.min())) - margin_vox)
                stop = min(self.size[axis], int(np.ceil(idx.max())) + margin_vox + 1)
                if stop <= start:
                    return None
                bounds.append((start, stop))
        (x0, x1), (y0, y1), (z0, z1) = bounds
        return Block(
            (slice(z0, z1), slice(y0, y1), slice(x0, x1)), self.axes[0][x0:x1], self.axes[1][y0:y1], self.axes[2][z0:z1]
        )


def occupancy(d: np.ndarray, width: float) -> np.ndarray:
    """Fraction of a voxel inside a shape from its signed distance ``d`` (linear ramp ``width`` mm wide)."""
    out = np.multiply(d, F32(-1.0 / width), dtype=F32)
    out += F32(0.5)
    np.clip(out, 0.0, 1.0, out=out)
    return out


def unit_gradient(d: np.ndarray, spacing_zyx: Sequence[float], floor: float = 0.25) -> np.ndarray:
    """``d`` divided by the norm of its numerical gradient: a first-order true distance near the surface.

    Blends (smooth unions), varying offsets and approximate ellipse distances have gradients that
    are not of unit norm; this makes the partial-volume ramp one voxel wide everywhere.
    """
    if min(d.shape) < 2:
        return d
    grads = np.gradient(d, *spacing_zyx)
    norm = np.sqrt(sum(g * g for g in grads))
    np.maximum(norm, F32(floor), out=norm)
    return (d / norm).astype(F32, copy=False)


def ellipse_sdf(u: np.ndarray, v: np.ndarray, a: float, b: float) -> np.ndarray:
    """Approximate signed distance to the ellipse ``(u/a)^2 + (v/b)^2 = 1`` (first-order, exact at the curve)."""
    k0 = np.sqrt((u / F32(a)) ** 2 + (v / F32(b)) ** 2)
    k1 = np.sqrt((u / F32(a * a)) ** 2 + (v / F32(b * b)) ** 2)
    return k0 * (k0 - 1) / np.maximum(k1, F32(1e-6))


def ellipsoid_sdf(u: np.ndarray, v: np.ndarray, w: np.ndarray, a: float, b: float, c: float) -> np.ndarray:
    """Approximate signed distance to an ellipsoid with semi-axes ``a, b, c``."""
    k0 = np.sqrt((u / F32(a)) ** 2 + (v / F32(b)) ** 2 + (w / F32(c)) ** 2)
    k1 = np.sqrt((u / F32(a * a)) ** 2 + (v / F32(b * b)) ** 2 + (w / F32(c * c)) ** 2)
    return k0 * (k0 - 1) / np.maximum(k1, F32(1e-6))


def superellipse_sdf(u: np.ndarray, v: np.ndarray, a: float, b: float, p: float) -> np.ndarray:
    """Approximate signed distance to ``|u/a|^p + |v/b|^p = 1`` (value over gradient norm)."""
    au = np.abs(u) / F32(a) + F32(1e-6)
    av = np.abs(v) / F32(b) + F32(1e-6)
    pu = au ** F32(p)
    pv = av ** F32(p)
    r = (pu + pv) ** F32(1.0 / p)
    # d r / d u = r^(1-p) * au^(p-1) / a
    scale = r ** F32(1.0 - p)
    gu = scale * pu / au / F32(a)
    gv = scale * pv / av / F32(b)
    return (r - 1) / np.maximum(np.sqrt(gu * gu + gv * gv), F32(1e-6))


def box_sdf(u: np.ndarray, v: np.ndarray, w: np.ndarray, half: Sequence[float], radius: float = 0.0) -> np.ndarray:
    """Signed distance to a box with half-sizes ``half`` whose edges are rounded by ``radius``."""
    qu = np.abs(u) - F32(half[0] - radius)
    qv = np.abs(v) - F32(half[1] - radius)
    qw = np.abs(w) - F32(half[2] - radius)
    outside = np.sqrt(np.maximum(qu, 0) ** 2 + np.maximum(qv, 0) ** 2 + np.maximum(qw, 0) ** 2)
    inside = np.minimum(np.maximum(np.maximum(qu, qv), qw), 0)
    return outside + inside - F32(radius)


def extrude(d_xy: np.ndarray, w: np.ndarray, half_height) -> np.ndarray:
    """Signed distance of a 2D cross-section ``d_xy`` extruded over ``|w| <= half_height``."""
    dz = np.abs(w) - half_height
    outside = np.sqrt(np.maximum(d_xy, 0) ** 2 + np.maximum(dz, 0) ** 2)
    return outside + np.minimum(np.maximum(d_xy, dz), 0)


def smooth_union(a: np.ndarray, b: np.ndarray, k: float) -> np.ndarray:
    """Polynomial smooth minimum of two distance fields (fillet radius about ``k`` mm)."""
    if k <= 0:
        return np.minimum(a, b)
    h = np.clip(F32(0.5) + F32(0.5 / k) * (b - a), 0, 1)
    return b + (a - b) * h - F32(k) * h * (1 - h)


def wave_texture(u: np.ndarray, v: np.ndarray, w: np.ndarray, waves: np.ndarray) -> np.ndarray:
    """A smooth zero-mean, unit-variance texture: a sum of plane waves; ``waves`` rows are (ku, kv, kw, phase)."""
    out = np.zeros(np.broadcast(u, v, w).shape, dtype=F32)
    for ku, kv, kw, phase in waves:
        out += np.cos(u * F32(ku) + v * F32(kv) + w * F32(kw) + F32(phase))
    out *= F32(np.sqrt(2.0 / max(len(waves), 1)))
    return out


def random_waves(rng: np.random.Generator, n: int, wavelength_mm: Tuple[float, float]) -> np.ndarray:
    """``n`` plane waves with random directions, wavelengths in ``wavelength_mm`` and phases."""
    directions = rng.normal(size=(n, 3))
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    k = 2 * np.pi / rng.uniform(wavelength_mm[0], wavelength_mm[1], size=(n, 1))
    return np.hstack([directions * k, rng.uniform(0, 2 * np.pi, size=(n, 1))])


def lattice_noise(rng: np.random.Generator, block: Block, cell_mm: float) -> np.ndarray:
    """Smooth random field over ``block`` (zero mean, unit variance, correlation length about ``cell_mm``).

    Gaussian values on a coarse lattice of ``cell_mm`` spacing (in world coordinates), smoothed, then
    interpolated linearly to the voxels one axis at a time: cheap, and independent of the voxel size.
    """
    from scipy import ndimage

    # A lattice at half the cell size, smoothed over about two of its steps: smooth enough that the
    # piecewise-linear interpolation shows no creases.
    cell_mm = cell_mm / 2
    coords = (block.z, block.y, block.x)
    starts = [np.floor(c.min() / cell_mm) - 2 for c in coords]
    counts = [int(np.ceil(c.max() / cell_mm) - s) + 3 for c, s in zip(coords, starts)]
    lattice = rng.standard_normal(counts).astype(F32)
    lattice = ndimage.gaussian_filter(lattice, 1.6, mode="wrap")
    lattice /= F32(max(float(lattice.std()), 1e-6))
    out = lattice
    for axis, (c, s, n) in enumerate(zip(coords, starts, counts)):
        t = c / cell_mm - s
        i0 = np.clip(np.floor(t).astype(int), 0, n - 2)
        f = (t - i0).astype(F32)
        shape = [1, 1, 1]
        shape[axis] = len(c)
        f = f.reshape(shape)
        out = np.take(out, i0, axis=axis) * (F32(1) - f) + np.take(out, i0 + 1, axis=axis) * f
    return out
