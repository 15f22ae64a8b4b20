"""Screw-trajectory sampling and breach detection, against analytic phantoms of known geometry.

The phantom is a bone block (1000 HU) in soft tissue (40 HU) on an anisotropic, oblique grid. Its
faces lie halfway between voxel centres, so the truth of where a line leaves the block is exact;
the tests require the breach position within one voxel.
"""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from SyntheticCTLib.comparison.trajectory import (
    Breach,
    breach_report,
    compare_profiles,
    find_breaches,
    physical_to_continuous_index,
    ras_to_lps,
    sample_points,
    sample_profile,
)
from SyntheticCTLib.kernel.errors import InvalidParameterError

SIZE = (60, 50, 40)  # (i, j, k)
SPACING = (0.8, 1.1, 1.3)
BONE, SOFT = 1000.0, 40.0


def _rotation(ax: float, ay: float, az: float) -> np.ndarray:
    cx, sx, cy, sy, cz, sz = np.cos(ax), np.sin(ax), np.cos(ay), np.sin(ay), np.cos(az), np.sin(az)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ ry @ rx


def _image(array_ijk: np.ndarray) -> sitk.Image:
    image = sitk.GetImageFromArray(np.ascontiguousarray(array_ijk.transpose(2, 1, 0)).astype(np.float32))
    image.SetSpacing(SPACING)
    image.SetOrigin((-31.0, 12.5, 40.0))
    image.SetDirection(tuple(_rotation(0.3, -0.2, 0.5).ravel()))
    return image


def _block(i=(20, 39), j=(10, 39), k=(10, 29), gap_i=None, offset=0.0) -> sitk.Image:
    """Bone where i0 <= i <= i1 (etc.), voxel indices; faces at half-integer indices."""
    a = np.full(SIZE, SOFT)
    a[i[0] : i[1] + 1, j[0] : j[1] + 1, k[0] : k[1] + 1] = BONE
    if gap_i is not None:
        a[gap_i[0] : gap_i[1] + 1, :, :] = SOFT
    return _image(a + offset)


def _world(image: sitk.Image, index) -> np.ndarray:
    return np.array(image.TransformContinuousIndexToPhysicalPoint([float(v) for v in index]))


def _voxel() -> float:
    return max(SPACING)


def test_sampling_a_linear_field_is_exact_on_an_oblique_grid():
    """Linear interpolation of a linear function is exact: checks the world-to-index mapping."""
    probe = _image(np.zeros(SIZE))
    ii, jj, kk = np.meshgrid(*[np.arange(n) for n in SIZE], indexing="ij")
    idx = np.stack([ii, jj, kk], -1).reshape(-1, 3).astype(float)
    world = np.asarray(probe.GetOrigin()) + (idx * SPACING) @ np.array(probe.GetDirection()).reshape(3, 3).T
    field = (2.0 * world[:, 0] - 0.5 * world[:, 1] + 3.0 * world[:, 2]).reshape(SIZE)
    image = _image(field)
    rng = np.random.default_rng(0)
    cont = rng.uniform(0, np.array(SIZE) - 1, size=(200, 3))
    points = np.array([_world(image, c) for c in cont])
    np.testing.assert_allclose(physical_to_continuous_index(image, points), cont, atol=1e-9)
    expected = 2.0 * points[:, 0] - 0.5 * points[:, 1] + 3.0 * points[:, 2]
    np.testing.assert_allclose(sample_points(image, points), expected, rtol=1e-5, atol=1e-3)
    outside = np.array([_world(image, (-2.0, 5, 5)), _world(image, (5, 5, SIZE[2] + 1.0))])
    assert np.isnan(sample_points(image, outside)).all()


def test_profile_steps_and_statistics():
    image = _block()
    start, end = _world(image, (5, 25, 20)), _world(image, (55, 28, 22))
    profile = sample_profile(image, start, end, radius_mm=1.5, step_mm=0.2)
    length = float(np.linalg.norm(end - start))
    assert profile.distance_mm[0] == 0.0 and profile.distance_mm[-1] == pytest.approx(length)
    assert profile.step_mm <= 0.2 + 1e-9
    assert profile.inside_image.all()
    assert np.all(profile.min <= profile.mean + 1e-9) and np.all(profile.mean <= profile.max + 1e-9)
    middle = profile.axis[np.argmin(np.abs(profile.distance_mm - length * 0.5))]
    assert middle == pytest.approx(BONE)
    assert profile.axis[0] == pytest.approx(SOFT) and profile.axis[-1] == pytest.approx(SOFT)
    np.testing.assert_allclose(profile.point_at(length), end, atol=1e-9)


def test_breach_where_the_line_leaves_the_block_within_a_voxel():
    image = _block()
    a, b = np.array([5.0, 25.0, 20.0]), np.array([55.0, 28.0, 22.0])
    start, end = _world(image, a), _world(image, b)
    t_exit = (39.5 - a[0]) / (b[0] - a[0])  # the i = 39.5 face
    truth = float(np.linalg.norm(_world(image, a + t_exit * (b - a)) - start))
    profile = sample_profile(image, start, end, radius_mm=0.0)
    breaches = find_breaches(profile, bone_threshold=150.0)
    assert len(breaches) == 1  # entering bone at i = 19.5 is not a breach
    breach = breaches[0]
    assert abs(breach.start_mm - truth) <= _voxel()
    assert breach.end_mm is None and breach.lowest_hu == pytest.approx(SOFT)
    np.testing.assert_allclose(breach.position, profile.point_at(breach.start_mm))
    # At the threshold halfway between the two HU values, linear interpolation puts the crossing on the face.
    mid = find_breaches(profile, bone_threshold=(BONE + SOFT) / 2)[0]
    assert abs(mid.start_mm - truth) <= 0.05 * _voxel()


def test_a_line_inside_bone_has_no_breach():
    image = _block()
    profile = sample_profile(image, _world(image, (5, 25, 20)), _world(image, (35, 26, 21)), radius_mm=2.0)
    assert find_breaches(profile) == []
    assert "No breach found" in breach_report(profile, [], name="CT")


def test_a_gap_in_the_bone_is_a_breach_with_its_reentry():
    image = _block(gap_i=(28, 30))  # soft tissue between the faces i = 27.5 and i = 30.5
    a, b = np.array([5.0, 25.0, 20.0]), np.array([37.0, 25.0, 20.0])
    start = _world(image, a)
    dist = {face: float(np.linalg.norm(_world(image, (face, 25.0, 20.0)) - start)) for face in (27.5, 30.5)}
    profile = sample_profile(image, start, _world(image, b))
    (breach,) = find_breaches(profile, bone_threshold=(BONE + SOFT) / 2)
    assert abs(breach.start_mm - dist[27.5]) <= 0.05 * _voxel()
    assert breach.end_mm is not None and abs(breach.end_mm - dist[30.5]) <= 0.05 * _voxel()
    assert breach.length_mm == pytest.approx(3 * SPACING[0], abs=0.1)
    assert "re-enters" in breach.describe()
    # A gap shorter than min_length_mm is treated as noise.
    assert find_breaches(profile, bone_threshold=520.0, min_length_mm=5.0) == []


def test_the_screw_radius_matters_near_a_face():
    """A line 3.5 voxels (3.85 mm) below the j = 39.5 face: a 2 mm screw stays in bone, a 5 mm one does not."""
    image = _block()
    a, b = np.array([5.0, 36.0, 20.0]), np.array([35.0, 36.0, 20.0])
    start, end = _world(image, a), _world(image, b)
    entry = float(np.linalg.norm(_world(image, (19.5, 36.0, 20.0)) - start))
    thin = sample_profile(image, start, end, radius_mm=2.0)
    assert find_breaches(thin) == []
    thick = sample_profile(image, start, end, radius_mm=5.0)
    (breach,) = find_breaches(thick)
    assert breach.whole_length and breach.end_mm is None
    assert abs(breach.start_mm - entry) <= _voxel()
    assert "too thick" in breach.describe()
    # The axis alone sees no breach.
    assert find_breaches(thick, statistic="axis") == []


def test_compare_profiles_known_offset_and_shift():
    ct = _block()
    a, b = np.array([5.0, 25.0, 20.0]), np.array([55.0, 25.0, 20.0])
    start, end = _world(ct, a), _world(ct, b)
    p_ct = sample_profile(ct, start, end, step_mm=0.25)

    brighter = sample_profile(_block(offset=50.0), start, end, step_mm=0.25)
    cmp = compare_profiles(brighter, p_ct)
    assert cmp.me_hu == pytest.approx(50.0) and cmp.mae_hu == pytest.approx(50.0)
    assert cmp.max_abs_hu == pytest.approx(50.0)
    assert cmp.correlation == pytest.approx(1.0)
    assert len(cmp.matched) == 1 and cmp.breaches_agree

    shifted = sample_profile(_block(i=(23, 42)), start, end, step_mm=0.25)  # 3 voxels = 2.4 mm further
    cmp = compare_profiles(shifted, p_ct, bone_threshold=520.0, tolerance_mm=3.0)
    (s, c) = cmp.matched[0]
    assert s.start_mm - c.start_mm == pytest.approx(3 * SPACING[0], abs=0.05)
    assert cmp.me_hu > 0  # the shifted block covers soft tissue of the CT at its far end
    strict = compare_profiles(shifted, p_ct, bone_threshold=520.0, tolerance_mm=1.0)
    assert len(strict.only_sct) == 1 and len(strict.only_ct) == 1 and not strict.breaches_agree
    assert "Only the CT shows a breach" in strict.describe()


def test_compare_profiles_refuses_different_trajectories():
    ct = _block()
    p1 = sample_profile(ct, _world(ct, (5, 25, 20)), _world(ct, (55, 25, 20)), step_mm=0.25)
    p2 = sample_profile(ct, _world(ct, (5, 25, 20)), _world(ct, (50, 25, 20)), step_mm=0.25)
    with pytest.raises(InvalidParameterError, match="same steps"):
        compare_profiles(p1, p2)
    p3 = sample_profile(ct, _world(ct, (5, 25, 20)), _world(ct, (50, 25, 20)), n_steps=len(p1.distance_mm))
    with pytest.raises(InvalidParameterError, match="different lengths"):
        compare_profiles(p1, p3)


def test_compare_profiles_across_a_rigid_move():
    """The same line mapped into a moved copy of the image (each in its own space) gives the same profile."""
    ct = _block()
    moved = sitk.Image(ct)
    shift = np.array([7.5, -4.0, 12.25])
    moved.SetOrigin(tuple(np.array(ct.GetOrigin()) + shift))  # the same voxels, 7.5/-4/12.25 mm away
    start, end = _world(ct, (5, 25, 20)), _world(ct, (55, 27, 21))
    p_ct = sample_profile(ct, start, end, radius_mm=1.0)
    p_moved = sample_profile(moved, start + shift, end + shift, radius_mm=1.0, n_steps=len(p_ct.distance_mm))
    cmp = compare_profiles(p_moved, p_ct, bone_threshold=520.0)
    assert cmp.mae_hu == pytest.approx(0.0, abs=1e-3) and cmp.breaches_agree and len(cmp.matched) == 1


def test_trajectory_leaving_the_image_stops_the_search():
    image = _block()
    start, mid = _world(image, (5, 25, 20)), _world(image, (30, 25, 20))
    beyond = mid + 3 * (mid - start)
    profile = sample_profile(image, start, beyond)
    assert not profile.inside_image.all() and profile.inside_image[0]
    (breach,) = find_breaches(profile)  # leaves the block at i = 39.5, then the image: one breach
    assert breach.end_mm is None
    outside = sample_profile(image, beyond, beyond + 10.0)
    assert find_breaches(outside) == []
    assert "outside the image" in breach_report(outside, [])


def test_bad_arguments():
    image = _block()
    p = _world(image, (5, 25, 20))
    with pytest.raises(InvalidParameterError, match="coincide"):
        sample_profile(image, p, p)
    with pytest.raises(InvalidParameterError, match="radius"):
        sample_profile(image, p, p + 10, radius_mm=-1)
    with pytest.raises(InvalidParameterError, match="statistic"):
        find_breaches(sample_profile(image, p, p + 10), statistic="median")


def test_ras_lps_round_trip():
    assert ras_to_lps((1.5, -2.0, 3.0)) == (-1.5, 2.0, 3.0)
    assert ras_to_lps(ras_to_lps((1.5, -2.0, 3.0))) == (1.5, -2.0, 3.0)
    assert isinstance(Breach(1.0, None, 0.0, (0.0, 0.0, 0.0)).describe(), str)
