"""Benchmark: bone-surface distances of two 256³ masks, ours beside DeepMind's ``surface-distance`` and MONAI.

Two cases at 1 mm isotropic spacing:

- ``spheres``: concentric spheres of radius 80 and 81.5 mm (every true distance is 1.5 mm);
- ``vertebra``: a vertebra-like bone (a hollow, bumpy body and two processes, from implicit
  functions) against a perturbed copy (scaled, shifted, other bumps), as a synthetic CT's bone
  would differ from the CT's.

The truth comes from the implicit functions themselves: surfaces contoured at sub-voxel precision
from the continuous fields (not from the masks), measured with exact point-to-triangle distances.
Every method gets the same binary masks. Printed: wall and CPU time (CPU time is the fairer figure
on a shared machine), symmetric mean distance (area-weighted),
HD95 (the larger directed 95th percentile), Hausdorff, share within 1 mm, their differences from ours
and from the truth, and the time ratios. Goal: ours under 3 s, within 0.05 mm of the peers.

Run: ``python Testing/benchmarks/bench_surface_distance.py`` (or ``pytest -m benchmark``).
Peers: ``pip install surface-distance monai`` (missing ones are skipped).
"""

from __future__ import annotations

import math
import os
import sys
import time
from typing import Dict, Optional

import numpy as np
import pytest

N = 256


def _axes():
    return np.arange(N, dtype=np.float32)


def _ellipsoid_field(centre, radii, bumps, phase) -> np.ndarray:
    """``|q| / R(direction) - 1`` with ``q = (x - centre) / radii`` and R a sum of low harmonics (z, y, x array)."""
    z, y, x = np.meshgrid(_axes(), _axes(), _axes(), indexing="ij", sparse=True)
    qx, qy, qz = (x - centre[0]) / radii[0], (y - centre[1]) / radii[1], (z - centre[2]) / radii[2]
    r = np.sqrt(qx * qx + qy * qy + qz * qz) + np.float32(1e-6)
    cos_t = qz / r
    phi = np.arctan2(qy, qx)
    shape = 1.0 + bumps[0] * np.sin(3 * phi + phase) * (1 - cos_t**2) + bumps[1] * cos_t * np.cos(2 * phi - phase)
    return (r / shape - 1.0).astype(np.float32)


def vertebra_field(*, scale: float = 1.0, shift=(0.0, 0.0, 0.0), bumps=(0.04, 0.03), phase: float = 0.0) -> np.ndarray:
    """A vertebra-like bone as an implicit field (negative inside), on a 256³ 1 mm grid."""
    c = np.array([128.0, 120.0, 128.0]) + np.asarray(shift)
    body_outer = _ellipsoid_field(c, np.array([45, 38, 60]) * scale, bumps, phase)
    body_inner = _ellipsoid_field(c, np.array([37, 30, 52]) * scale, bumps, phase)
    body = np.maximum(body_outer, -body_inner)  # a shell (cortical bone around a cavity)
    left = _ellipsoid_field(c + np.array([-55.0, 40.0, 0.0]), np.array([35, 10, 12]) * scale, bumps, phase + 1)
    right = _ellipsoid_field(c + np.array([55.0, 40.0, 0.0]), np.array([35, 10, 12]) * scale, bumps, phase + 2)
    return np.minimum(body, np.minimum(left, right))


def sphere_field(radius: float) -> np.ndarray:
    z, y, x = np.meshgrid(_axes(), _axes(), _axes(), indexing="ij", sparse=True)
    c = 127.3  # off the voxel lattice
    return (np.sqrt((x - c) ** 2 + (y - c) ** 2 + (z - c) ** 2) - radius).astype(np.float32)


def cases() -> Dict[str, tuple]:
    return {
        "spheres": (sphere_field(80.0), sphere_field(81.5)),
        "vertebra": (
            vertebra_field(),
            vertebra_field(scale=1.015, shift=(0.7, -0.5, 0.4), bumps=(0.05, 0.02), phase=0.3),
        ),
    }


def _image(array: np.ndarray):
    import SimpleITK as sitk

    return sitk.GetImageFromArray(array)


def truth(reference_field: np.ndarray, synthetic_field: np.ndarray):
    """Distances between the sub-voxel contours of the continuous fields (no smoothing needed)."""
    import vtk
    from vtk.util import numpy_support

    from SyntheticCTLib.comparison import surfaces as S

    def contour(field):
        image = vtk.vtkImageData()
        image.SetDimensions(N, N, N)
        image.GetPointData().SetScalars(numpy_support.numpy_to_vtk(np.ascontiguousarray(-field).ravel(), deep=True))
        fe = vtk.vtkFlyingEdges3D()
        fe.SetInputData(image)
        fe.SetValue(0, 0.0)
        fe.ComputeNormalsOff()
        fe.Update()
        poly = vtk.vtkPolyData()
        poly.DeepCopy(fe.GetOutput())
        points = S.surface_points(poly)
        triangles = S._triangles(poly)
        face = S._face_vectors(points, triangles)
        if np.einsum("ij,ij->", points[triangles[:, 0]], face) < 0:
            triangles = np.ascontiguousarray(triangles[:, ::-1])
            face = -face
            S._set_triangles(poly, triangles)
        S._add_normals_and_areas(poly, triangles, face)
        return poly

    return S.surface_distances(contour(synthetic_field), contour(reference_field), store=False)


def ours(reference_mask: np.ndarray, synthetic_mask: np.ndarray):
    from SyntheticCTLib.comparison import surfaces as S

    start, cpu = time.perf_counter(), time.process_time()
    result = S.mask_surface_distances(_image(synthetic_mask), _image(reference_mask))
    return result, time.perf_counter() - start, time.process_time() - cpu


def deepmind(reference_mask: np.ndarray, synthetic_mask: np.ndarray) -> Optional[dict]:
    try:
        import surface_distance as sd
    except ImportError:
        return None
    start, cpu = time.perf_counter(), time.process_time()
    d = sd.compute_surface_distances(reference_mask.astype(bool), synthetic_mask.astype(bool), (1.0, 1.0, 1.0))
    gt, pred = d["distances_gt_to_pred"], d["distances_pred_to_gt"]
    ga, pa = d["surfel_areas_gt"], d["surfel_areas_pred"]
    mean = float((np.dot(gt, ga) + np.dot(pred, pa)) / (ga.sum() + pa.sum()))
    hd95 = float(sd.compute_robust_hausdorff(d, 95))
    hd = float(sd.compute_robust_hausdorff(d, 100))
    within = float(sd.compute_surface_dice_at_tolerance(d, 1.0))
    return {
        "time": time.perf_counter() - start,
        "cpu": time.process_time() - cpu,
        "mean": mean,
        "hd95": hd95,
        "max": hd,
        "within_1mm": within,
    }


def monai(reference_mask: np.ndarray, synthetic_mask: np.ndarray) -> Optional[dict]:
    try:
        import torch
        from monai.metrics import compute_average_surface_distance, compute_hausdorff_distance
    except ImportError:
        return None
    torch.set_num_threads(2)
    start, cpu = time.perf_counter(), time.process_time()
    y = torch.from_numpy(reference_mask.astype(np.float32))[None, None]
    p = torch.from_numpy(synthetic_mask.astype(np.float32))[None, None]
    mean = float(compute_average_surface_distance(p, y, include_background=True, symmetric=True, spacing=1.0))
    hd95 = float(compute_hausdorff_distance(p, y, include_background=True, percentile=95, spacing=1.0))
    hd = float(compute_hausdorff_distance(p, y, include_background=True, spacing=1.0))
    return {
        "time": time.perf_counter() - start,
        "cpu": time.process_time() - cpu,
        "mean": mean,
        "hd95": hd95,
        "max": hd,
        "within_1mm": float("nan"),
    }


def run(verbose: bool = True) -> Dict[str, dict]:
    results: Dict[str, dict] = {}
    for name, (reference_field, synthetic_field) in cases().items():
        reference_mask = (reference_field < 0).astype(np.uint8)
        synthetic_mask = (synthetic_field < 0).astype(np.uint8)
        true = truth(reference_field, synthetic_field)
        mine, seconds, cpu_seconds = ours(reference_mask, synthetic_mask)
        rows = {
            "truth (sub-voxel contours)": {
                "time": float("nan"),
                "cpu": float("nan"),
                "mean": true.symmetric.mean_abs_mm,
                "hd95": true.hd95_mm,
                "max": true.symmetric.max_mm,
                "within_1mm": true.symmetric.within_1mm,
            },
            "ours (SyntheticCT)": {
                "time": seconds,
                "cpu": cpu_seconds,
                "mean": mine.symmetric.mean_abs_mm,
                "hd95": mine.hd95_mm,
                "max": mine.symmetric.max_mm,
                "within_1mm": mine.symmetric.within_1mm,
            },
        }
        for peer_name, peer in (("DeepMind surface-distance", deepmind), ("MONAI", monai)):
            row = peer(reference_mask, synthetic_mask)
            if row is not None:
                rows[peer_name] = row
            elif verbose:
                print(f"  ({peer_name} is not installed: skipped)")
        results[name] = {"rows": rows, "points": mine.symmetric.n_points, "bone_voxels": int(reference_mask.sum())}
        if verbose:
            _print_case(name, results[name])
    return results


def _print_case(name: str, case: dict) -> None:
    rows = case["rows"]
    ours_row, true_row = rows["ours (SyntheticCT)"], rows["truth (sub-voxel contours)"]
    print(
        f"\n== {name}: two {N}³ masks at 1 mm, {case['bone_voxels']} reference bone voxels, {case['points']} surface points"
    )
    header = f"{'method':28s} {'time s':>7s} {'CPU s':>6s} {'mean mm':>8s} {'HD95 mm':>8s} {'max mm':>7s} {'<=1mm':>6s}  {'Δmean vs ours':>13s} {'ΔHD95 vs ours':>13s} {'Δmean vs truth':>14s} {'time ratio':>10s}"
    print(header)
    for method, row in rows.items():
        ratio = row["time"] / ours_row["time"] if math.isfinite(row["time"]) else float("nan")
        print(
            f"{method:28s} {row['time']:7.2f} {row['cpu']:6.2f} {row['mean']:8.3f} {row['hd95']:8.3f} {row['max']:7.3f} "
            f"{row['within_1mm']:6.3f}  {row['mean'] - ours_row['mean']:+13.3f} {row['hd95'] - ours_row['hd95']:+13.3f} "
            f"{row['mean'] - true_row['mean']:+14.3f} {ratio:10.2f}"
        )
    goal_time = "met" if ours_row["time"] < 3.0 else "NOT met"
    print(
        f"goal: ours under 3 s: {goal_time} ({ours_row['time']:.2f} s wall, {ours_row['cpu']:.2f} s CPU; "
        f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs)"
    )
    for method, row in rows.items():
        if method.startswith(("ours", "truth")):
            continue
        agree = abs(row["mean"] - ours_row["mean"]) < 0.05 and abs(row["hd95"] - ours_row["hd95"]) < 0.05
        print(
            f"goal: agreement with {method} within 0.05 mm (mean and HD95): {'met' if agree else 'NOT met'} "
            f"(|Δmean| {abs(row['mean'] - ours_row['mean']):.3f}, |ΔHD95| {abs(row['hd95'] - ours_row['hd95']):.3f}; "
            f"vs truth: ours {abs(ours_row['mean'] - true_row['mean']):.3f}, {method} {abs(row['mean'] - true_row['mean']):.3f})"
        )


@pytest.mark.benchmark
def test_surface_distance_benchmark():
    results = run(verbose=True)
    for case in results.values():
        rows = case["rows"]
        ours_row, true_row = rows["ours (SyntheticCT)"], rows["truth (sub-voxel contours)"]
        assert abs(ours_row["mean"] - true_row["mean"]) < 0.05
        assert abs(ours_row["hd95"] - true_row["hd95"]) < 0.25
        assert ours_row["time"] < 15.0  # the goal is 3 s on 2 free cores; this only catches a regression


if __name__ == "__main__":
    print(
        f"bench_surface_distance: {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.2f}, Python {sys.version.split()[0]}"
    )
    run(verbose=True)
