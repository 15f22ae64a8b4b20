"""Random anatomy of the phantom: a lumbar-spine-like torso section, drawn from a seed.

All lengths are millimetres in *body coordinates*: x to the patient's left, y posterior, z superior
(LPS), origin on the body axis at the centre of the field of view. The pose (a small rotation and
offset) places the body in the world grid. Everything here is plain JSON-ready data; the painting
is in :mod:`.build`.

Vertebrae are numbered 1..n from superior to inferior. The whole set of vertebrae spans the
field of view in z; the first and last are cut by its ends, like a real lumbar scan. Each vertebra
is confined to its own slab, so neighbouring bones stay at least a few voxels apart.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import numpy as np

from SyntheticCTLib.kernel.errors import InvalidParameterError
from SyntheticCTLib.phantom.shapes import Frame, align_z_to, random_waves, rotation_matrix

SPINE_SCALE = 0.8
"""Vertebral dimensions relative to an adult lumbar spine (the torso fits a 192 mm field of view)."""

MIN_PITCH_MM = 14.0
MIN_PITCH_VOXELS = 6.0
LESION_TYPES = ("none", "sclerotic", "lytic", "random")


def _r(value, digits: int = 4):
    """Round floats (recursively) for a readable, JSON-ready manifest."""
    if isinstance(value, dict):
        return {k: _r(v, digits) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_r(v, digits) for v in value]
    if isinstance(value, (float, np.floating)):
        return round(float(value), digits)
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.ndarray):
        return _r(value.tolist(), digits)
    return value


def centreline(spine: dict, z: np.ndarray):
    """Spine axis (x, y) in body coordinates at heights ``z``: scoliosis in x, lordosis in y."""
    lz = spine["length_mm"]
    phase = 2 * np.pi * spine["scoliosis_cycles"] * z / lz + spine["scoliosis_phase"]
    x = spine["scoliosis_mm"] * np.sin(phase)
    t = 2 * z / lz
    y = spine["body_centre_y_mm"] + spine["lordosis_mm"] * (t * t - 1.0 / 3.0)
    return x, y


def centreline_tangent(spine: dict, z: float) -> np.ndarray:
    lz = spine["length_mm"]
    phase = 2 * np.pi * spine["scoliosis_cycles"] * z / lz + spine["scoliosis_phase"]
    dx = spine["scoliosis_mm"] * np.cos(phase) * 2 * np.pi * spine["scoliosis_cycles"] / lz
    dy = spine["lordosis_mm"] * 8 * z / (lz * lz)
    return np.array([dx, dy, 1.0])


def level_frame(spine: dict, z: float, axial_rotation_deg: float = 0.0) -> Frame:
    """The local frame of a spinal level at height ``z`` (body coordinates)."""
    x, y = centreline(spine, np.asarray(z))
    rotation = align_z_to(centreline_tangent(spine, z)) @ rotation_matrix(0, 0, axial_rotation_deg)
    return Frame(rotation, np.array([float(x), float(y), float(z)]))


def pose_frame(pose: dict) -> Frame:
    """Body coordinates -> world coordinates."""
    return Frame(rotation_matrix(*pose["rotation_deg"]), np.asarray(pose["offset_mm"], dtype=float))


def _body_extent(body: dict, pose: dict, z_half: float) -> np.ndarray:
    """Largest |x| and |y| in world coordinates of the body contour within ``|z| <= z_half``."""
    angles = np.linspace(0, 2 * np.pi, 180, endpoint=False)
    p = body["exponent"]
    c, s = np.cos(angles), np.sin(angles)
    frame = pose_frame(pose)
    extent = np.zeros(2)
    for z in (-z_half, z_half):
        taper = 1 + body["taper"] * z / (2 * z_half)
        x = body["half_width_mm"] * taper * np.sign(c) * np.abs(c) ** (2 / p)
        y = body["half_depth_mm"] * taper * np.sign(s) * np.abs(s) ** (2 / p)
        world = frame.to_world(np.stack([x, y, np.full_like(x, z)], axis=1))
        extent = np.maximum(extent, np.abs(world[:, :2]).max(axis=0))
    return extent


def draw_anatomy(
    rng: np.random.Generator,
    fov_mm: Sequence[float],
    voxel_mm: float,
    *,
    n_vertebrae: Optional[int] = None,
    lesion: str = "random",
    bowel_gas: Optional[bool] = None,
) -> dict:
    """Draw every anatomy parameter of one phantom.

    The stages draw from ``rng`` in a fixed order (the levels, the body and its pose, the vertebral
    design, the spine, each vertebra, the abdomen, bowel gas, the lesion), so a seed always gives the
    same anatomy; a stage that is told its answer still draws, to keep the later stages' draws aligned.

    Parameters
    ----------
    rng
        The anatomy's random generator (the seed's first stream).
    fov_mm
        Field of view (x, y, z) of the grid in millimetres.
    voxel_mm
        Typical voxel size; sets the minimum gap between bones and the minimum level height.
    n_vertebrae
        Number of vertebrae; random in 3..5 (as many as fit) when None.
    lesion
        "none", "sclerotic", "lytic" or "random" (none 40 %, sclerotic 35 %, lytic 25 %).
    bowel_gas
        Whether there are bowel-gas pockets; random (70 % yes) when None.
    """
    if lesion not in LESION_TYPES:
        raise InvalidParameterError(f"Unknown lesion type {lesion!r}; use one of {', '.join(LESION_TYPES)}.")
    fx, fy, fz = (float(f) for f in fov_mm)
    n, pitch, end_fraction = _draw_levels(rng, fz, voxel_mm, n_vertebrae)
    habitus = float(rng.uniform(0, 1))
    body = _draw_body(rng, habitus)
    pose = {
        "rotation_deg": [rng.uniform(-4, 4), rng.uniform(-3, 3), rng.uniform(-8, 8)],
        "offset_mm": [rng.uniform(-0.03, 0.03) * fx, rng.uniform(-0.03, 0.03) * fy, rng.uniform(-0.08, 0.08) * pitch],
    }
    scale = _fit_body(body, pose, (fx, fy, fz), voxel_mm)
    s = scale * SPINE_SCALE
    mean = _draw_vertebral_design(rng, s)
    spine = _draw_spine(rng, n, pitch, fz, end_fraction, body, mean, scale, voxel_mm)
    vertebrae = _draw_vertebrae(rng, spine, mean, s, voxel_mm)
    visceral, psoas, kidneys = _draw_abdomen(rng, body, spine, mean, scale, voxel_mm)
    gas = _draw_bowel_gas(rng, bowel_gas, visceral, scale, fz)
    return {
        "scale": scale,
        "habitus": habitus,
        "body": body,
        "pose": pose,
        "spine": spine,
        "vertebrae": vertebrae,
        "visceral": visceral,
        "psoas": psoas,
        "bowel_gas": gas,
        "lesion": _draw_lesion(rng, lesion, vertebrae, voxel_mm),
        "kidneys": kidneys,
        "texture_cell_mm": {"fat": 12.0, "muscle": 6.0, "bowel_content": 5.0},
    }


def _draw_levels(rng: np.random.Generator, fz: float, voxel_mm: float, n_vertebrae: Optional[int]):
    """The number of vertebrae, the level pitch (mm) and the fraction of a pitch the two end levels add.

    n vertebrae span ``n - 1 + end_fraction`` pitches of the z field of view; a level is at least
    :data:`MIN_PITCH_MM` and :data:`MIN_PITCH_VOXELS` voxels high.
    """
    min_pitch = max(MIN_PITCH_MM, MIN_PITCH_VOXELS * voxel_mm)
    max_n = int(math.floor(fz / min_pitch - 0.6)) + 1
    if n_vertebrae is None:
        choices = [n for n in (3, 4, 5) if n <= max_n] or ([max_n] if max_n >= 1 else [])
        if not choices:
            raise InvalidParameterError(
                f"The field of view is {fz:g} mm long in z; at least {min_pitch * 0.6:.0f} mm are needed for "
                "one vertebra at this spacing. Increase the size in z."
            )
        n = int(rng.choice(choices))
    else:
        n = int(n_vertebrae)
        if n < 1 or n > max_n:
            raise InvalidParameterError(
                f"n_vertebrae={n_vertebrae} does not fit: with a {fz:g} mm field of view in z and levels of at least "
                f"{min_pitch:.0f} mm, 1..{max(max_n, 0)} vertebrae fit."
            )
        rng.integers(3, 6)  # keep the random stream aligned with the random-count case
    u = rng.uniform(0.6, 1.1)
    pitch = fz / (n - 1 + u)
    if pitch < min_pitch:
        u = fz / min_pitch - (n - 1)
        pitch = min_pitch
    return n, pitch, u


def _draw_body(rng: np.random.Generator, habitus: float) -> dict:
    """The torso's contour and layers (skin, fat, muscle) before it is scaled to the field of view."""
    return {
        "half_width_mm": rng.uniform(72, 80) + 8 * habitus,
        "half_depth_mm": rng.uniform(58, 65) + 8 * habitus,
        "exponent": rng.uniform(2.2, 2.8),
        "taper": rng.uniform(-0.06, 0.06),
        "skin_mm": rng.uniform(1.5, 2.5),
        "fat_posterior_mm": 3 + 11 * habitus + rng.uniform(0, 2),
        "fat_lateral_mm": 4 + 16 * habitus + rng.uniform(0, 3),
        "fat_anterior_mm": 5 + 18 * habitus + rng.uniform(0, 3),
        "muscle_posterior_mm": rng.uniform(4, 9),
        "abdominal_wall_mm": rng.uniform(7, 11),
    }


def _fit_body(body: dict, pose: dict, fov_mm: Sequence[float], voxel_mm: float) -> float:
    """Scale ``body``'s lengths (in place) so that it fits the field of view with air around it; return the scale.

    The spine is scaled by the same factor (times :data:`SPINE_SCALE`) by the caller.
    """
    fx, fy, fz = fov_mm
    margin = 2 * voxel_mm + 3.0
    extent = _body_extent(body, pose, fz / 2)
    room = np.array([fx / 2 - margin - abs(pose["offset_mm"][0]), fy / 2 - margin - abs(pose["offset_mm"][1])])
    if np.any(room <= 10):
        raise InvalidParameterError(
            f"The field of view ({fx:g} x {fy:g} mm in x and y) is too small for the torso phantom; use at least 40 mm."
        )
    scale = float(min(1.0, *(room / extent)))
    for key in (
        "half_width_mm",
        "half_depth_mm",
        "fat_posterior_mm",
        "fat_lateral_mm",
        "fat_anterior_mm",
        "muscle_posterior_mm",
        "abdominal_wall_mm",
    ):
        body[key] *= scale
    return scale


def _draw_vertebral_design(rng: np.random.Generator, s: float) -> dict:
    """The vertebral design's means (mm, scaled by ``s``); each vertebra varies around them."""
    return {
        "body_half_width": rng.uniform(19, 23) * s,
        "body_half_depth": rng.uniform(13.5, 16) * s,
        "canal_half_width": rng.uniform(9, 11) * s,
        "canal_half_depth": rng.uniform(7, 8.5) * s,
        "arch_thickness": rng.uniform(5.5, 7.5) * s,
        "spinous_length": rng.uniform(22, 28) * s,
        "spinous_angle_deg": rng.uniform(10, 25),
    }


def _draw_spine(
    rng: np.random.Generator,
    n: int,
    pitch: float,
    fz: float,
    end_fraction: float,
    body: dict,
    mean: dict,
    scale: float,
    voxel_mm: float,
) -> dict:
    """The spine: levels, curvature (lordosis, scoliosis) and canal, placed so that the spinous processes
    stay under the posterior muscle, fat and skin."""
    clearance = max(0.6, 0.4 * voxel_mm)
    post_extent = (
        mean["body_half_depth"]
        + 0.5
        + 2 * mean["canal_half_depth"]
        + clearance
        + mean["arch_thickness"]
        + mean["spinous_length"] * math.cos(math.radians(mean["spinous_angle_deg"]))
    )
    body_centre_y = (
        body["half_depth_mm"] - body["skin_mm"] - body["fat_posterior_mm"] - body["muscle_posterior_mm"] - post_extent
    )
    spine = {
        "n_vertebrae": n,
        "pitch_mm": pitch,
        "length_mm": fz,
        "end_fraction": end_fraction,
        "body_centre_y_mm": body_centre_y,
        # Curvature of a 128 mm segment, scaled to this length (sagitta ~ length^2).
        "lordosis_mm": rng.uniform(2, 10) * scale * min(1.0, fz / 128.0) ** 2,
        "scoliosis_mm": rng.uniform(0, 5) * scale * min(1.0, fz / 128.0),
        "scoliosis_cycles": rng.uniform(0.3, 0.9),
        "scoliosis_phase": rng.uniform(0, 2 * np.pi),
        "canal_half_width_mm": mean["canal_half_width"],
        "canal_half_depth_mm": mean["canal_half_depth"],
        "canal_clearance_mm": clearance,
        "thecal_sac_fraction": rng.uniform(0.75, 0.9),
    }
    # Lordosis moves both ends posterior; keep the spinous processes under the skin.
    body_centre_y -= spine["lordosis_mm"] * 2 / 3
    spine["body_centre_y_mm"] = body_centre_y
    return spine


def _draw_vertebrae(rng: np.random.Generator, spine: dict, mean: dict, s: float, voxel_mm: float) -> list:
    """Every vertebra, 1..n from superior to inferior, each confined to its own slab."""
    n, pitch = spine["n_vertebrae"], spine["pitch_mm"]
    gap = max(2.5, 2.6 * voxel_mm)
    z_top = (n - 1) / 2 * pitch
    return [_draw_vertebra(rng, k, z_top - k * pitch, spine, mean, s, gap, voxel_mm) for k in range(n)]


def _draw_vertebra(
    rng: np.random.Generator, k: int, z: float, spine: dict, mean: dict, s: float, gap: float, voxel_mm: float
) -> dict:
    """Vertebra ``k + 1`` at height ``z``: its body, arch, processes, facets and bone texture."""
    n, pitch, fz = spine["n_vertebrae"], spine["pitch_mm"], spine["length_mm"]
    # Thin bony parts keep a half-thickness of at least one voxel, so that the labels see them.
    thin = max(1.0, 1.0 * voxel_mm)
    growth = 1 + 0.03 * (k - (n - 1) / 2)
    # Slabs of neighbouring levels are not parallel where the spine curves: widen the gap there.
    t0 = centreline_tangent(spine, z - pitch / 2)
    t1 = centreline_tangent(spine, z + pitch / 2)
    bend = math.acos(min(1.0, float(np.dot(t0, t1) / np.linalg.norm(t0) / np.linalg.norm(t1))))
    reach = 60 * s
    disc_height = max(pitch * rng.uniform(0.22, 0.3), gap + voxel_mm)
    body_half_height = (pitch - disc_height) / 2
    arch_t = mean["arch_thickness"] * rng.uniform(0.9, 1.1)
    return {
        "index": k + 1,
        "z_mm": z,
        "axial_rotation_deg": rng.uniform(-3, 3)
        + 0.6
        * spine["scoliosis_mm"]
        * math.sin(2 * np.pi * spine["scoliosis_cycles"] * z / fz + spine["scoliosis_phase"]),
        "slab_half_height_mm": pitch / 2 - gap / 2 - reach * bend,
        "body_half_width_mm": mean["body_half_width"] * growth * rng.uniform(0.95, 1.05),
        "body_half_depth_mm": mean["body_half_depth"] * growth * rng.uniform(0.95, 1.05),
        "body_half_height_mm": body_half_height,
        "disc_height_mm": disc_height,
        "waist": rng.uniform(0.03, 0.09),
        "endplate_concavity_mm": rng.uniform(0.3, 1.2) * s,
        "edge_radius_mm": rng.uniform(1.0, 2.0) * s,
        "cortex_mm": rng.uniform(1.0, 1.6),
        "cortex_posterior_mm": rng.uniform(2.0, 3.0),
        "canal_half_width_mm": mean["canal_half_width"],
        "canal_half_depth_mm": mean["canal_half_depth"],
        "arch_thickness_mm": arch_t,
        "arch_half_height_mm": body_half_height * rng.uniform(0.5, 0.65),
        "arch_z_shift_mm": body_half_height * rng.uniform(0.05, 0.25),
        "lamina_slope": rng.uniform(-0.35, -0.1),
        "spinous_length_mm": mean["spinous_length"] * rng.uniform(0.9, 1.1),
        "spinous_half_thickness_mm": max(rng.uniform(2.5, 3.5) * s, thin),
        "spinous_half_height_mm": max(rng.uniform(6, 9) * s, 2 * thin),
        "spinous_angle_deg": mean["spinous_angle_deg"] + rng.uniform(-4, 4),
        "transverse_length_mm": rng.uniform(16, 24) * s,
        "transverse_half_depth_mm": max(rng.uniform(2.5, 3.5) * s, thin),
        "transverse_half_height_mm": max(rng.uniform(4, 6) * s, 1.5 * thin),
        "transverse_angle_deg": rng.uniform(5, 20),
        "facet_radii_mm": [
            max(rng.uniform(2.5, 3.5) * s, thin),
            max(rng.uniform(3, 4.5) * s, thin),
            max(rng.uniform(4, 6) * s, 1.5 * thin),
        ],
        "cortical_hu": rng.uniform(1250, 1600),
        "cortical_hu_amplitude": rng.uniform(100, 250),
        "cortical_waves": random_waves(rng, 4, (15, 45)),
        "bone_volume_fraction": rng.uniform(0.11, 0.2),
        "marrow_fat_fraction": rng.uniform(0.3, 0.65),
        "marrow_waves": random_waves(rng, 4, (8, 25)),
        "trabecular_grain_mm": rng.uniform(0.6, 1.1),
        "trabecular_contrast": rng.uniform(0.2, 0.4),
    }


def _draw_abdomen(rng: np.random.Generator, body: dict, spine: dict, mean: dict, scale: float, voxel_mm: float):
    """The visceral cavity anterior to the spine, the psoas muscles beside the vertebral bodies, and the kidneys
    (upper lumbar levels, lateral to the psoas, inside perirenal fat, clipped to the muscle wall)."""
    s = scale * SPINE_SCALE
    fz = spine["length_mm"]
    body_centre_y = spine["body_centre_y_mm"]
    wall = body["abdominal_wall_mm"]
    anterior = -body["half_depth_mm"] + body["skin_mm"] + body["fat_anterior_mm"] + wall
    posterior = body_centre_y + 0.3 * mean["body_half_depth"]
    lateral = body["half_width_mm"] - body["skin_mm"] - body["fat_lateral_mm"] - wall * 1.3
    visceral = {
        "centre_y_mm": (anterior + posterior) / 2,
        "half_depth_mm": max((posterior - anterior) / 2, 5.0),
        "half_width_mm": max(lateral, 10.0),
        "exponent": rng.uniform(2.0, 2.6),
        "fat_area_fraction": rng.uniform(0.15, 0.4),
        "loop_cell_mm": rng.uniform(7, 10) * scale,
    }
    psoas = {
        "x_mm": mean["body_half_width"] + rng.uniform(6, 9) * s,
        "y_mm": body_centre_y + rng.uniform(-0.1, 0.3) * mean["body_half_depth"],
        "radius_mm": rng.uniform(7, 10) * s,
        "growth": rng.uniform(0.2, 0.6),
        "fat_rim_mm": max(rng.uniform(1.0, 3.0) * s, 1.5 * voxel_mm),
    }
    inner_w = body["half_width_mm"] - body["skin_mm"] - body["fat_lateral_mm"]
    k_radii = [rng.uniform(14, 18) * s, rng.uniform(10, 13) * s, rng.uniform(40, 50) * s]
    k_rim = max(rng.uniform(3, 7) * s, 1.5 * voxel_mm)
    k_x = min(
        psoas["x_mm"] + psoas["radius_mm"] * (1 + psoas["growth"]) + k_radii[0] + k_rim + 2,
        inner_w - k_radii[0] - k_rim - 3,
    )
    kidneys = {
        "present": bool(rng.uniform() < 0.8),
        "x_mm": k_x,
        "y_mm": body_centre_y + rng.uniform(0, 0.6) * mean["body_half_depth"],
        "z_mm": fz * rng.uniform(0.25, 0.55),
        "radii_mm": k_radii,
        "tilt_deg": rng.uniform(5, 20),
        "fat_rim_mm": k_rim,
    }
    return visceral, psoas, kidneys


def _draw_bowel_gas(
    rng: np.random.Generator, bowel_gas: Optional[bool], visceral: dict, scale: float, fz: float
) -> list:
    """Up to four bowel-gas pockets in the visceral cavity (random, 70 % yes, when ``bowel_gas`` is None)."""
    if bowel_gas is None:
        bowel_gas = bool(rng.uniform() < 0.7)
    else:
        rng.uniform()
    n_gas = int(rng.integers(1, 5)) if bowel_gas else 0
    return [
        {
            "centre_mm": [
                rng.uniform(-0.6, 0.6) * visceral["half_width_mm"],
                visceral["centre_y_mm"] + rng.uniform(-0.5, 0.5) * visceral["half_depth_mm"],
                rng.uniform(-0.45, 0.45) * fz,
            ],
            "radii_mm": [rng.uniform(3, 10) * scale, rng.uniform(3, 8) * scale, rng.uniform(4, 12) * scale],
        }
        for _ in range(n_gas)
    ]


def _draw_lesion(rng: np.random.Generator, lesion: str, vertebrae: list, voxel_mm: float) -> Optional[dict]:
    """A sclerotic or lytic lesion in one vertebral body, or None; "random" draws the type."""
    if lesion == "random":
        lesion = str(rng.choice(["none", "sclerotic", "lytic"], p=[0.4, 0.35, 0.25]))
    else:
        rng.uniform()
    if lesion == "none":
        return None
    n = len(vertebrae)
    # Not in the first or last vertebra, which the ends of the field of view may cut.
    k = int(rng.integers(1, n - 1)) if n >= 3 else 0
    v = vertebrae[k]
    r = min(v["body_half_width_mm"], v["body_half_depth_mm"], v["body_half_height_mm"])
    return {
        "type": lesion,
        "vertebra": k + 1,
        "centre_mm": [
            rng.uniform(-0.35, 0.35) * v["body_half_width_mm"],
            rng.uniform(-0.35, 0.35) * v["body_half_depth_mm"],
            rng.uniform(-0.3, 0.3) * v["body_half_height_mm"],
        ],
        "radii_mm": [min(max(rng.uniform(0.3, 0.55) * r, 2.5 * voxel_mm), 0.7 * r) for _ in range(3)],
        "waves": random_waves(rng, 3, (4, 10)),
    }


def manifest_anatomy(anatomy: dict) -> dict:
    """The anatomy as rounded, JSON-ready data."""
    return _r(anatomy)
