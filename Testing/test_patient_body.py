"""The body is the patient: the table, head holders and devices are neither body nor bone."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from SyntheticCTLib.comparison.bone import dice, segment_bone
from SyntheticCTLib.comparison.compare import compare
from SyntheticCTLib.kernel.io import read_volume
from SyntheticCTLib.kernel.masks import above, ct_body_mask


def _with_table(ct: sitk.Image, *, contact: bool = True) -> sitk.Image:
    """The phantom CT with a 4 mm carbon-like table (400 HU) under its back, touching it in one spot."""
    array = sitk.GetArrayFromImage(ct)
    body = array > -500
    back = int(np.nonzero(body.any(axis=(0, 2)))[0].max())  # LPS: rows grow posterior
    table = np.zeros_like(body)
    table[:, back + 3 : back + 5, 2:-2] = True
    if contact:
        z, x = array.shape[0] // 2, array.shape[2] // 2
        column = body[z, :, x]
        skin = int(np.nonzero(column)[0].max())
        table[z : z + 2, skin + 1 : back + 3, x : x + 2] = True  # a 4 x 4 mm strut from the skin to the table
    array[table] = 400.0
    out = sitk.GetImageFromArray(array)
    out.CopyInformation(ct)
    return out


def test_a_planted_table_is_not_body_and_not_bone(small_phantom):
    ct = small_phantom.ct
    with_table = _with_table(ct)
    table = (sitk.GetArrayFromImage(with_table) == 400.0) & (sitk.GetArrayFromImage(ct) != 400.0)
    assert table.sum() > 500
    body_plain = sitk.GetArrayFromImage(ct_body_mask(ct)) > 0
    body_table = sitk.GetArrayFromImage(ct_body_mask(with_table)) > 0
    assert not (body_table & table).any() or (body_table & table).sum() <= 8  # at most the strut's root
    assert dice(body_plain.astype(np.uint8), body_table.astype(np.uint8)) > 0.995
    # The plain largest component would have taken the table with the body through the strut.
    naive = sitk.GetArrayFromImage(ct_body_mask(with_table, separation_mm=0)) > 0
    assert (naive & table).sum() > 400


def test_compare_does_not_measure_a_table_as_bone(small_phantom):
    ct = small_phantom.ct
    result = compare(_with_table(ct), ct)
    assert result.metrics.surface_mean_mm < 0.05, result.metrics.surface_mean_mm
    assert result.metrics.bone_dice > 0.99


def test_the_body_keeps_the_patients_separate_parts(small_phantom):
    """Two thick objects (a trunk and an arm beside it): both are the patient."""
    array = np.full((30, 60, 80), -1000.0, dtype=np.float32)
    yy, xx = np.mgrid[:60, :80]
    array[:, ((yy - 30) / 20.0) ** 2 + ((xx - 30) / 22.0) ** 2 <= 1] = 40.0  # trunk
    array[:, ((yy - 30) / 7.0) ** 2 + ((xx - 68) / 7.0) ** 2 <= 1] = 40.0  # arm, apart from it
    image = sitk.GetImageFromArray(array)
    image.SetSpacing((2.0, 2.0, 2.0))
    body = sitk.GetArrayFromImage(ct_body_mask(image)) > 0
    assert body[:, 30, 68].all() and body[:, 30, 30].all()


def test_thresholding_an_integer_ct_with_an_open_upper_end():
    """An int32 CT (as a NIfTI from a converter may be) thresholds like a float one."""
    array = np.array([[[-1000, 150, 200, 3000]]], dtype=np.int32)
    image = sitk.GetImageFromArray(array)
    assert above(image, 200).tolist() == [[[False, False, True, True]]]
    assert sitk.GetArrayFromImage(segment_bone(image, min_size_mm3=0, fill_holes=False)).tolist() == [[[0, 0, 1, 1]]]


def test_real_abdominal_ct_the_table_is_not_body_and_both_arms_are(real_data_dir):
    ct = read_volume(real_data_dir / "ct" / "totalsegmentator_example_ct_dicom")
    array = sitk.GetArrayFromImage(ct)
    body = sitk.GetArrayFromImage(ct_body_mask(ct)) > 0
    dense = array >= 200
    # The table: the dense curved shells below the patient's back (image rows 430-480 of this 512 x 512 series).
    table_rows = slice(430, 480)
    assert dense[:, table_rows].sum() > 1000, "the table is in this series"
    assert not body[:, table_rows].any(), "the table must not count as body"
    # Both humeri lie outside the trunk, in the arms (columns < 80 and > 430): they are the patient's bone.
    for columns in (slice(0, 80), slice(430, 512)):
        arm_bone = dense[:, 280:370, columns]
        assert arm_bone.sum() > 100
        assert (arm_bone & body[:, 280:370, columns]).sum() / arm_bone.sum() > 0.99


def test_real_head_ct_the_head_holder_is_not_body(real_data_dir):
    ct = read_volume(real_data_dir / "ct" / "dcm_qa_ct_ge_head_tilt_dicom")
    array = sitk.GetArrayFromImage(ct)
    body = sitk.GetArrayFromImage(ct_body_mask(ct)) > 0
    dense = array >= 200
    outside = dense & ~body
    voxel_ml = float(np.prod(ct.GetSpacing())) / 1000.0
    assert outside.sum() * voxel_ml > 20, "the head holder (dense arcs beside the head) is outside the body"
    assert (dense & body).sum() * voxel_ml > 600, "the skull is inside the body"
    # What is left outside is the holder's two arcs beside the head (image columns < 110 and > 400 of
    # this 512 x 512 series), where they touch the ear pads too; nothing of the skull between them.
    columns = np.nonzero(outside)[2]
    assert np.mean((columns < 110) | (columns > 400)) > 0.99


if __name__ == "__main__":  # pragma: no cover
    pytest.main([__file__])
