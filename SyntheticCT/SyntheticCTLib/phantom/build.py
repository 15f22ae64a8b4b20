"""Paint the anatomy of :mod:`.anatomy` onto a :class:`~.canvas.Canvas`, structure by structure.

Order (back to front): skin, subcutaneous fat, muscle, viscera, psoas (with its fat rim), bowel
gas, discs, spinal canal (epidural tissue, then the CSF-filled thecal sac), vertebrae (cortical
shell, trabecular interior, lesion). Each structure is evaluated only inside its bounding box.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
from scipy import ndimage
from scipy.special import ndtri

from SyntheticCTLib.kernel.progress import ProgressCallback, no_progress, scaled
from SyntheticCTLib.phantom import tissues as T
from SyntheticCTLib.phantom.anatomy import centreline, level_frame, pose_frame
from SyntheticCTLib.phantom.canvas import Canvas
from SyntheticCTLib.phantom.mri import TissueSignals
from SyntheticCTLib.phantom.shapes import (
    F32,
    Frame,
    Grid,
    box_sdf,
    ellipse_sdf,
    ellipsoid_sdf,
    extrude,
    lattice_noise,
    occupancy,
    rotation_matrix,
    smooth_union,
    superellipse_sdf,
    unit_gradient,
    wave_texture,
)

HU_BONE_MINERAL = 1800.0
"""CT number of the mineralized trabecular matrix; trabecular HU = BV/TV * this + (1 - BV/TV) * marrow."""
HU_MARROW_WATER = 40.0
HU_MARROW_FAT = -100.0


def _hu(label: int, texture: Optional[np.ndarray] = None):
    row = T.TISSUE_TABLE[label]
    if texture is None:
        return row.hu_mean
    lo, hi = T.HU_RANGES[label]
    return np.clip(F32(row.hu_mean) + F32(row.hu_sd) * texture, lo, hi)


def _paint_body(canvas: Canvas, grid: Grid, anatomy: dict, sig: TissueSignals, rng: np.random.Generator) -> None:
    body = anatomy["body"]
    cells = anatomy["texture_cell_mm"]
    pose = pose_frame(anatomy["pose"])
    block = grid.block()
    u, v, w = block.local(pose)
    ramp = grid.voxel_mm
    lz = anatomy["spine"]["length_mm"]
    taper = F32(1) + F32(body["taper"] / lz) * w
    p = body["exponent"]
    d_body = superellipse_sdf(u / taper, v / taper, body["half_width_mm"], body["half_depth_mm"], p) * taper
    tex = lattice_noise(rng, block, cells["fat"])
    canvas.paint(block, occupancy(d_body, ramp), T.SKIN, _hu(T.SKIN, tex), sig.signal(T.SKIN))
    d_body += F32(body["skin_mm"])
    canvas.paint(
        block, occupancy(d_body, ramp), T.SUBCUTANEOUS_FAT, _hu(T.SUBCUTANEOUS_FAT, tex), sig.signal(T.SUBCUTANEOUS_FAT)
    )
    del d_body, tex
    skin = body["skin_mm"]
    inner_w = body["half_width_mm"] - skin - body["fat_lateral_mm"]
    inner_d = body["half_depth_mm"] - skin - (body["fat_anterior_mm"] + body["fat_posterior_mm"]) / 2
    shift = (body["fat_anterior_mm"] - body["fat_posterior_mm"]) / 2
    d_muscle = superellipse_sdf(u / taper, (v - F32(shift)) / taper, inner_w, inner_d, p) * taper
    del u, v, w, taper
    # Muscle: fine texture, a little intramuscular fat where the texture is low.
    tex = lattice_noise(rng, block, cells["muscle"])
    ff = np.clip(F32(0.02) - F32(0.02) * tex, 0.0, 0.12)
    canvas.paint(block, occupancy(d_muscle, ramp), T.MUSCLE, _hu(T.MUSCLE, tex), sig.signal(T.MUSCLE, ff))


def _paint_abdomen(canvas: Canvas, grid: Grid, anatomy: dict, sig: TissueSignals, rng: np.random.Generator) -> None:

    pose = pose_frame(anatomy["pose"])
    ramp = grid.voxel_mm
    spine = anatomy["spine"]
    lz = spine["length_mm"]
    big = lz  # body-coordinate z extent that surely covers the grid
    vis = anatomy["visceral"]
    a, b, yc = vis["half_width_mm"], vis["half_depth_mm"], vis["centre_y_mm"]
    block = grid.block(pose, (-a, yc - b, -big), (a, yc + b, big))
    if block is not None:
        u, v, w = block.local(pose)
        alpha = occupancy(superellipse_sdf(u, v - F32(yc), a, b, vis["exponent"]), ramp)
        del u, v, w
        content = lattice_noise(rng, block, anatomy["texture_cell_mm"]["bowel_content"])
        ff = np.clip(F32(0.04) + F32(0.04) * content, 0.0, 0.15)
        hu = (1 - ff) * F32(40.0) + ff * F32(-100.0) + F32(6.0) * content
        canvas.paint(block, alpha, T.SOFT_TISSUE, hu, sig.signal(T.SOFT_TISSUE, ff))
        # Mesenteric fat between bowel loops: where a smooth random field exceeds a threshold.
        loops = lattice_noise(rng, block, vis["loop_cell_mm"])
        threshold = float(ndtri(1 - vis["fat_area_fraction"]))
        d_fat = unit_gradient(F32(threshold) - loops, grid.spacing[::-1])
        fat = occupancy(d_fat, ramp) * alpha
        canvas.paint(block, fat, T.SUBCUTANEOUS_FAT, _hu(T.SUBCUTANEOUS_FAT, content), sig.signal(T.SUBCUTANEOUS_FAT))
        del alpha, content, ff, hu, loops, d_fat, fat

    kid = anatomy["kidneys"]
    if kid["present"]:
        for side in (-1.0, 1.0):
            radii = np.asarray(kid["radii_mm"])
            frame = pose.compose(
                Frame(
                    rotation_matrix(0, side * kid["tilt_deg"], 0),
                    np.array([side * kid["x_mm"], kid["y_mm"], kid["z_mm"]]),
                )
            )
            reach = radii + kid["fat_rim_mm"] + 2
            block = grid.block(frame, -reach, reach)
            if block is None:
                continue
            u, v, w = block.local(frame)
            d = ellipsoid_sdf(u, v, w, *radii)
            rim = ellipsoid_sdf(u, v, w, *(radii + kid["fat_rim_mm"]))
            canvas.paint(
                block, occupancy(rim, ramp), T.SUBCUTANEOUS_FAT, _hu(T.SUBCUTANEOUS_FAT), sig.signal(T.SUBCUTANEOUS_FAT)
            )
            canvas.paint(block, occupancy(d, ramp), T.SOFT_TISSUE, F32(32.0), sig.signal(T.SOFT_TISSUE, F32(0.0)))

    ps = anatomy["psoas"]
    for side in (-1.0, 1.0):
        r_max = ps["radius_mm"] * (1 + ps["growth"]) + ps["fat_rim_mm"]
        x0 = side * ps["x_mm"]
        block = grid.block(
            pose, (x0 - r_max - 10, ps["y_mm"] - r_max - 12, -big), (x0 + r_max + 10, ps["y_mm"] + r_max + 12, big)
        )
        if block is None:
            continue
        u, v, w = block.local(pose)
        xc, yc_line = centreline(spine, w)
        dy = yc_line - F32(spine["body_centre_y_mm"])
        r = F32(ps["radius_mm"]) * (F32(1 + ps["growth"] / 2) - F32(ps["growth"] / lz) * w)
        du, dv = u - (xc + F32(x0)), v - (dy + F32(ps["y_mm"]))
        d = ellipse_sdf(du / r, dv / (r * F32(0.85)), 1.0, 1.0) * r
        canvas.paint(
            block,
            occupancy(d - F32(ps["fat_rim_mm"]), ramp),
            T.SUBCUTANEOUS_FAT,
            _hu(T.SUBCUTANEOUS_FAT),
            sig.signal(T.SUBCUTANEOUS_FAT),
        )
        canvas.paint(block, occupancy(d, ramp), T.MUSCLE, _hu(T.MUSCLE), sig.signal(T.MUSCLE))

    for gas in anatomy["bowel_gas"]:
        c, radii = np.asarray(gas["centre_mm"]), np.asarray(gas["radii_mm"])
        block = grid.block(pose, c - radii - 2, c + radii + 2)
        if block is None:
            continue
        u, v, w = block.local(pose)
        d = ellipsoid_sdf(u - F32(c[0]), v - F32(c[1]), w - F32(c[2]), *radii)
        canvas.paint(block, occupancy(d, ramp), T.BOWEL_GAS, _hu(T.BOWEL_GAS), sig.signal(T.BOWEL_GAS))


def _paint_discs(canvas: Canvas, grid: Grid, anatomy: dict, sig: TissueSignals) -> None:
    pose = pose_frame(anatomy["pose"])
    spine, verts = anatomy["spine"], anatomy["vertebrae"]
    n, pitch = len(verts), spine["pitch_mm"]
    back = max(v["body_half_depth_mm"] for v in verts)  # the posterior wall of every body (see _vertebra_sdf)
    for j in range(n + 1):
        above, below = verts[max(j - 1, 0)], verts[min(j, n - 1)]
        z = verts[0]["z_mm"] + pitch / 2 - j * pitch
        a = (above["body_half_width_mm"] + below["body_half_width_mm"]) / 2 + 0.4
        b = (above["body_half_depth_mm"] + below["body_half_depth_mm"]) / 2 + 0.4
        hh = (
            (above["disc_height_mm"] + below["disc_height_mm"]) / 4
            + 1.0
            + max(above["endplate_concavity_mm"], below["endplate_concavity_mm"])
        )
        frame = pose.compose(level_frame(spine, z, (above["axial_rotation_deg"] + below["axial_rotation_deg"]) / 2))
        v0 = back + 0.4 - b
        block = grid.block(frame, (-a - 2, v0 - b - 2, -hh - 2), (a + 2, v0 + b + 2, hh + 2))
        if block is None:
            continue
        u, v, w = block.local(frame)
        d = extrude(ellipse_sdf(u, v - F32(v0), a, b), w, F32(hh))
        rr = np.clip((u / F32(a)) ** 2 + ((v - F32(v0)) / F32(b)) ** 2, 0, 1)
        nucleus = F32(1) - rr  # 1 in the nucleus pulposus, 0 at the annulus
        hu = F32(92.0) - F32(22.0) * nucleus
        canvas.paint(
            block, occupancy(d, grid.voxel_mm), T.DISC, hu, sig.signal(T.DISC, pd_scale=F32(0.9) + F32(0.15) * nucleus)
        )


def _paint_canal(canvas: Canvas, grid: Grid, anatomy: dict, sig: TissueSignals) -> None:
    pose = pose_frame(anatomy["pose"])
    spine, verts = anatomy["spine"], anatomy["vertebrae"]
    back = max(v["body_half_depth_mm"] for v in verts)
    cax, cay, clr = spine["canal_half_width_mm"], spine["canal_half_depth_mm"], spine["canal_clearance_mm"]
    offset = back + 0.5 + cay
    lz = spine["length_mm"]
    zs = np.linspace(-lz, lz, 64)
    xs, ys = centreline(spine, zs)
    block = grid.block(
        pose,
        (xs.min() - cax - 4, ys.min() + offset - cay - 4, -lz),
        (xs.max() + cax + 4, ys.max() + offset + cay + 4, lz),
    )
    if block is None:
        return
    u, v, w = block.local(pose)
    xc, yc = centreline(spine, w)
    du, dv = u - xc, v - (yc + F32(offset))
    d = ellipse_sdf(du, dv, cax + clr, cay + clr)
    canvas.paint(block, occupancy(d, grid.voxel_mm), T.SOFT_TISSUE, F32(-40.0), sig.signal(T.SOFT_TISSUE, F32(0.55)))
    f = spine["thecal_sac_fraction"]
    d = ellipse_sdf(du, dv - F32(0.1 * cay), cax * f, cay * f)
    canvas.paint(block, occupancy(d, grid.voxel_mm), T.CSF, _hu(T.CSF), sig.signal(T.CSF))


def _vertebra_sdf(u, v, w, vert: dict, back: float, clearance: float):
    """Signed distance to one whole vertebra (body, arch, processes, facets) in its local frame."""
    a, b, hb = vert["body_half_width_mm"], vert["body_half_depth_mm"], vert["body_half_height_mm"]
    er = vert["edge_radius_mm"]
    v0 = back - b  # every body's posterior wall sits at v = back, in front of the canal
    # Vertebral body: elliptic cylinder with a waist, concave endplates and rounded edges.
    t = np.clip(w / F32(hb), -1, 1)
    m = F32(1) - F32(vert["waist"]) * (F32(1) - t * t)
    vb = v - F32(v0)
    d_xy = ellipse_sdf(u / m, vb / m, a - er, b - er) * m
    rr = np.clip((u / F32(a)) ** 2 + (vb / F32(b)) ** 2, 0, 1)
    h_eff = F32(hb - er) - F32(vert["endplate_concavity_mm"]) * (F32(1) - rr)
    d = extrude(d_xy, w, h_eff) - F32(er)
    del d_xy, rr, t, m, vb
    # Neural arch: a ring around the canal (pedicles and laminae), lower posteriorly.
    cax, cay, t_a = vert["canal_half_width_mm"], vert["canal_half_depth_mm"], vert["arch_thickness_mm"]
    yc = back + 0.5 + cay
    za, slope, ha = vert["arch_z_shift_mm"], vert["lamina_slope"], vert["arch_half_height_mm"]
    vc = v - F32(yc)
    w_arch = w - F32(za) - F32(slope) * vc
    ring = np.maximum(
        ellipse_sdf(u, vc, cax + clearance + t_a, cay + clearance + t_a),
        -ellipse_sdf(u, vc, cax + clearance, cay + clearance),
    )
    k = 0.25 * t_a
    d = smooth_union(d, extrude(ring, w_arch, F32(ha)), k)
    del ring, w_arch
    # Spinous process: a plate running posteriorly and caudally from the laminae.
    th = np.radians(vert["spinous_angle_deg"])
    length = vert["spinous_length_mm"]
    start = np.array([0.0, cay + clearance + 0.5 * t_a, za + slope * (cay + clearance + 0.5 * t_a)])
    direction = np.array([0.0, np.cos(th), -np.sin(th)])
    c = start + direction * length / 2
    dv, dw = v - F32(yc + c[1]), w - F32(c[2])
    along = dv * F32(direction[1]) + dw * F32(direction[2])
    across = dv * F32(np.sin(th)) + dw * F32(np.cos(th))
    hx, hz = vert["spinous_half_thickness_mm"], vert["spinous_half_height_mm"]
    d = smooth_union(d, box_sdf(u, along, across, (hx, length / 2 + 0.5 * t_a, hz), 0.8 * min(hx, hz)), k)
    # Transverse processes: bars running laterally and slightly posteriorly.
    phi = np.radians(vert["transverse_angle_deg"])
    tl = vert["transverse_length_mm"]
    hy, hz = vert["transverse_half_depth_mm"], vert["transverse_half_height_mm"]
    for side in (-1.0, 1.0):
        dx, dy = side * np.cos(phi), np.sin(phi)
        start = np.array([side * (cax + clearance + 0.5 * t_a), -0.2 * cay, za - slope * 0.2 * cay])
        c = start + np.array([dx, dy, 0.0]) * tl / 2
        du, dv, dw = u - F32(c[0]), vc - F32(c[1]), w - F32(c[2])
        along = du * F32(dx) + dv * F32(dy)
        across = du * F32(-dy) + dv * F32(dx)
        d = smooth_union(d, box_sdf(along, across, dw, (tl / 2, hy, hz), 0.8 * min(hy, hz)), k)
        # Articular processes (facets): superior lateral, inferior more medial and posterior.
        fr = vert["facet_radii_mm"]
        for zsign, x_frac, y_frac in ((1.0, 0.5, 0.35), (-1.0, 0.3, 0.75)):
            fc = (side * (cax + clearance + x_frac * t_a), y_frac * cay, za + zsign * (ha + 0.5 * fr[2]))
            d = smooth_union(d, ellipsoid_sdf(u - F32(fc[0]), vc - F32(fc[1]), w - F32(fc[2]), *fr), k)
    # Confine the vertebra to its slab so that neighbours never touch.
    np.maximum(d, np.abs(w) - F32(vert["slab_half_height_mm"]), out=d)
    return d


def _vertebra_extent(vert: dict, back: float, clearance: float):
    cax, cay, t_a = vert["canal_half_width_mm"], vert["canal_half_depth_mm"], vert["arch_thickness_mm"]
    half_x = max(vert["body_half_width_mm"], cax + clearance + t_a + vert["transverse_length_mm"]) + 4
    lo_y = back - 2 * vert["body_half_depth_mm"] - 3
    hi_y = back + 0.5 + 2 * cay + clearance + t_a + vert["spinous_length_mm"] + 8
    hz = vert["slab_half_height_mm"] + 1
    return (-half_x, lo_y, -hz), (half_x, hi_y, hz)


def _paint_vertebrae(
    canvas: Canvas, grid: Grid, anatomy: dict, sig: TissueSignals, rng: np.random.Generator, report: ProgressCallback
) -> None:
    pose = pose_frame(anatomy["pose"])
    spine, verts = anatomy["spine"], anatomy["vertebrae"]
    back = max(v["body_half_depth_mm"] for v in verts)
    clearance = spine["canal_clearance_mm"]
    ramp = grid.voxel_mm
    lesion = anatomy["lesion"]
    for i, vert in enumerate(verts):
        report(i / len(verts), "phantom: vertebrae", f"vertebra {vert['index']} of {len(verts)}")
        frame = pose.compose(level_frame(spine, vert["z_mm"], vert["axial_rotation_deg"]))
        lo, hi = _vertebra_extent(vert, back, clearance)
        block = grid.block(frame, lo, hi)
        if block is None:
            continue
        u, v, w = block.local(frame)
        d = _vertebra_sdf(u, v, w, vert, back, clearance)
        # Cortical shell: thin around the body, thicker in the posterior elements.
        t_c = F32(vert["cortex_mm"]) + F32(vert["cortex_posterior_mm"] - vert["cortex_mm"]) * np.clip(
            (v - F32(back)) / F32(3.0), 0, 1
        )
        wave = wave_texture(u, v, w, vert["cortical_waves"])
        hu_cort = np.clip(F32(vert["cortical_hu"]) + F32(vert["cortical_hu_amplitude"]) * wave, 1000.0, 1900.0)
        bone_id = vert["index"]
        spacing_zyx = grid.spacing[::-1]
        canvas.paint(
            block,
            occupancy(unit_gradient(d, spacing_zyx), ramp),
            T.CORTICAL_BONE,
            hu_cort,
            sig.signal(T.CORTICAL_BONE),
            bone_id=bone_id,
        )
        d += t_c
        # Trabecular interior: bone volume fraction with a fine grain and a slow variation; marrow fat
        # rises where there is less bone. Grain noise is drawn per block (the seed's texture stream).
        grain = rng.standard_normal(block.shape, dtype=F32)
        sigma = [vert["trabecular_grain_mm"] / s for s in (grid.spacing[2], grid.spacing[1], grid.spacing[0])]
        grain = ndimage.gaussian_filter(grain, sigma, mode="nearest")
        grain /= F32(max(float(grain.std()), 1e-6))
        slow = wave_texture(u, v, w, vert["marrow_waves"])
        bvtv = np.clip(
            F32(vert["bone_volume_fraction"]) * (F32(1) + F32(vert["trabecular_contrast"]) * grain + F32(0.15) * slow),
            0.04,
            0.4,
        )
        ff = np.clip(F32(vert["marrow_fat_fraction"]) - F32(0.08) * slow, 0.05, 0.9)
        marrow = (F32(1) - ff) * F32(HU_MARROW_WATER) + ff * F32(HU_MARROW_FAT)
        lo_hu, hi_hu = T.HU_RANGES[T.TRABECULAR_BONE]
        hu_trab = np.clip(bvtv * F32(HU_BONE_MINERAL) + (F32(1) - bvtv) * marrow, lo_hu, hi_hu)
        canvas.paint(
            block,
            occupancy(unit_gradient(d, spacing_zyx), ramp),
            T.TRABECULAR_BONE,
            hu_trab,
            sig.signal(T.TRABECULAR_BONE, ff, pd_scale=F32(1) - bvtv),
            bone_id=bone_id,
        )
        del grain, slow, bvtv, ff, marrow, hu_trab
        if lesion is not None and lesion["vertebra"] == vert["index"]:
            c, radii = lesion["centre_mm"], lesion["radii_mm"]
            v0 = back - vert["body_half_depth_mm"]
            lu, lv, lw = u - F32(c[0]), v - F32(v0 + c[1]), w - F32(c[2])
            d_les = ellipsoid_sdf(lu, lv, lw, *radii) + F32(0.15 * min(radii)) * wave_texture(
                lu, lv, lw, lesion["waves"]
            )
            np.maximum(d_les, d + F32(0.3), out=d_les)
            label = T.SCLEROTIC_LESION if lesion["type"] == "sclerotic" else T.LYTIC_LESION
            canvas.paint(
                block,
                occupancy(unit_gradient(d_les, spacing_zyx), ramp),
                label,
                _hu(label, wave),
                sig.signal(label),
                bone_id=bone_id,
            )
    report(1.0, "phantom: vertebrae", "")


def paint_anatomy(
    canvas: Canvas,
    grid: Grid,
    anatomy: dict,
    sig: TissueSignals,
    rng: np.random.Generator,
    report: Optional[ProgressCallback] = None,
) -> None:
    """Paint every structure of ``anatomy`` onto ``canvas``; ``rng`` draws the trabecular grain."""

    report = report or no_progress
    report(0.0, "phantom: anatomy", "body")
    _paint_body(canvas, grid, anatomy, sig, rng)
    report(0.3, "phantom: anatomy", "abdomen")
    _paint_abdomen(canvas, grid, anatomy, sig, rng)
    report(0.4, "phantom: anatomy", "discs and canal")
    _paint_discs(canvas, grid, anatomy, sig)
    _paint_canal(canvas, grid, anatomy, sig)
    _paint_vertebrae(canvas, grid, anatomy, sig, rng, scaled(report, 0.5, 1.0))
