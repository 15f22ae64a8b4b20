"""The measure of an uncertainty map: rank correlation with the HU error and AUROC for off surface points."""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from SyntheticCTLib.comparison.compare import compare
from SyntheticCTLib.comparison.uncertainty import auroc, uncertainty_quality


def test_auroc_by_hand():
    assert auroc(np.array([0.1, 0.4, 0.35, 0.8]), np.array([False, False, True, True])) == 0.75
    assert auroc(np.array([1.0, 1.0]), np.array([True, False])) == 0.5  # a tie counts half
    assert np.isnan(auroc(np.array([1.0, 2.0]), np.array([True, True])))


def test_a_spread_that_follows_the_planted_error_scores_high_and_noise_scores_chance(planted_error):
    ct, sct, error = planted_error
    comparison = compare(ct, sct)
    informative = sitk.GetImageFromArray(ndimage.gaussian_filter(error, 1.5).astype(np.float32))
    informative.CopyInformation(ct)
    noise = sitk.GetImageFromArray(np.random.default_rng(0).random(error.shape).astype(np.float32))
    noise.CopyInformation(ct)
    good = uncertainty_quality(comparison, informative)
    chance = uncertainty_quality(comparison, noise)
    assert good["n_surface_off"] > 50 and good["n_surface_points"] > good["n_surface_off"]
    assert good["surface_auroc"] > 0.9 and good["hu_spearman"] > 0.2
    assert abs(chance["surface_auroc"] - 0.5) < 0.1 and abs(chance["hu_spearman"]) < 0.05


def test_the_models_flip_spread_is_higher_where_a_planted_input_error_makes_the_sct_wrong():
    """A block of the MRI replaced by noise: the sCT is wrong there, and the flip spread is higher there too."""
    from SyntheticCTLib.models.catalog import resolve_model
    from SyntheticCTLib.phantom import make_phantom
    from SyntheticCTLib.synthesis.inference import Synthesizer

    case = make_phantom(903, size=(64, 64, 48), spacing=2.0)
    rng = np.random.default_rng(1)
    planted = []
    for echo in case.mri:
        array = sitk.GetArrayFromImage(echo)
        array[18:30, 20:44, 20:44] = rng.random((12, 24, 24)) * float(np.percentile(array, 99))
        image = sitk.GetImageFromArray(array)
        image.CopyInformation(echo)
        planted.append(image)
    result = Synthesizer(resolve_model("default"), device="cpu").run(planted, tta=True)
    spread = sitk.GetArrayFromImage(result.uncertainty)
    error = np.abs(sitk.GetArrayFromImage(result.image) - sitk.GetArrayFromImage(case.ct))
    inside = np.zeros(spread.shape, dtype=bool)
    inside[18:30, 20:44, 20:44] = True
    body = sitk.GetArrayFromImage(case.ct) > -500
    assert error[inside & body].mean() > 2 * error[~inside & body].mean()  # the planted error is real
    assert spread[inside & body].mean() > 1.5 * spread[~inside & body].mean()
