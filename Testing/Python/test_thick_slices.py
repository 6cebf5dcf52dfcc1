"""Thick slices resampled for the networks (``preprocess.max_slice_mm``, ADMAnomalyLib.slicing): the outputs stay
exactly on the input grid, the thin stack covers the thick slab, and thin cases are left alone."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import SimpleITK as sitk

from ADMAnomalyLib import api, infer
from ADMAnomalyLib.cases import CaseImages
from ADMAnomalyLib.config import CONTRASTS, PROFILES, PreprocessConfig
from ADMAnomalyLib.errors import InputError
from ADMAnomalyLib.slicing import energy_onto, thin_case, thin_grid
from conftest import synthetic_volumes

# A rotated grid: the slab must follow the direction cosines, not the array axes.
_ROTATED = (0.0, -1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0)


def _images(spacing=(1.0, 1.0, 5.0), shape=(40, 36, 12), direction=None, lesion=True):
    volumes, label = synthetic_volumes(shape, lesion=lesion)
    images = {}
    for name in CONTRASTS:
        image = sitk.GetImageFromArray(volumes[name])
        image.SetSpacing(spacing)
        image.SetOrigin((-20.0, 15.0, 5.0))
        if direction is not None:
            image.SetDirection(direction)
        images[name] = image
    return images, label


@pytest.mark.parametrize("direction", [None, _ROTATED])
def test_the_thin_stack_covers_the_thick_slab(direction):
    images, _ = _images(direction=direction)
    reference = images["flair"]
    grid = thin_grid(reference, 2.0)
    assert grid.GetSpacing() == (1.0, 1.0, 2.0) and grid.GetSize() == (40, 36, 30)  # 12 x 5 mm = 30 x 2 mm
    assert grid.GetDirection() == reference.GetDirection()
    # The first thick slice spans 2.5 mm either side of its centre, so the first thin one lies 1.5 mm before it.
    first_thick = np.asarray(reference.TransformIndexToPhysicalPoint((0, 0, 0)))
    first_thin = np.asarray(grid.TransformIndexToPhysicalPoint((0, 0, 0)))
    slice_axis = np.asarray(reference.GetDirection()).reshape(3, 3)[:, 2]
    np.testing.assert_allclose(first_thin - first_thick, -1.5 * slice_axis, atol=1e-9)
    last_thick = np.asarray(reference.TransformIndexToPhysicalPoint((0, 0, 11)))
    last_thin = np.asarray(grid.TransformIndexToPhysicalPoint((0, 0, 29)))
    np.testing.assert_allclose(last_thin - last_thick, 1.5 * slice_axis, atol=1e-9)


def test_a_grid_no_coarser_than_the_limit_is_left_alone():
    images, _ = _images(spacing=(1.0, 1.0, 2.0))
    assert thin_grid(images["flair"], 2.0) is None
    assert thin_grid(images["flair"], 0.0) is None  # off
    coarse_in_plane, _ = _images(spacing=(3.0, 1.0, 1.0))
    assert thin_grid(coarse_in_plane["flair"], 2.0).GetSpacing() == (2.0, 1.0, 1.0)


@pytest.mark.parametrize("value", [-1.0, float("nan"), float("inf"), True, "2"])
def test_max_slice_mm_must_be_a_finite_length(value):
    with pytest.raises(ValueError, match="max_slice_mm"):
        PreprocessConfig(max_slice_mm=value)


def test_the_transfer_profile_resamples_thick_slices_and_the_paper_does_not():
    assert PreprocessConfig().max_slice_mm == 0.0
    assert PROFILES["transfer"]["preprocess"]["max_slice_mm"] == 2.0
    assert api.load_model().config.preprocess.max_slice_mm == 2.0


@pytest.mark.parametrize("direction", [None, _ROTATED])
def test_a_thick_case_is_predicted_on_thin_slices_and_returned_on_its_own_grid(trained_model, direction):
    images, label = _images(direction=direction)
    plain = api.load_model(trained_model)
    thin = api.with_postprocess(plain, {"max_slice_mm": 2.0})
    as_is = api.predict(plain, images, device="cpu")
    resampled = api.predict(thin, images, device="cpu")
    for prediction in (as_is, resampled):
        for image in (prediction.energy, prediction.brain_mask):
            assert image.GetSize() == images["flair"].GetSize()
            assert image.GetSpacing() == images["flair"].GetSpacing()
            assert image.GetOrigin() == images["flair"].GetOrigin()
            assert image.GetDirection() == images["flair"].GetDirection()
    # The brain is the case's own, and the background lies exactly 1 below the lowest brain energy.
    brain = sitk.GetArrayFromImage(resampled.brain_mask) > 0
    np.testing.assert_array_equal(brain, sitk.GetArrayFromImage(as_is.brain_mask) > 0)
    energy = sitk.GetArrayFromImage(resampled.energy)
    assert np.isfinite(energy).all()
    assert (energy[~brain] == np.float32(energy[brain].min() - 1.0)).all()
    # The networks saw 30 thin slices instead of 12 thick ones (those with brain).
    assert resampled.n_slices_processed > 2 * as_is.n_slices_processed
    # Resampling changes the energy, and the lesion still ranks above the rest of the brain.
    assert not np.array_equal(energy, sitk.GetArrayFromImage(as_is.energy))
    lesion = (label > 0) & brain
    assert np.median(energy[lesion]) > np.percentile(energy[brain & ~lesion], 90)


def test_a_thin_case_gives_the_same_energy_with_or_without_the_setting(trained_model):
    images, _ = _images(spacing=(1.0, 1.0, 1.2))
    plain = api.load_model(trained_model)
    as_is = api.predict(plain, images, device="cpu")
    limited = api.predict(api.with_postprocess(plain, {"max_slice_mm": 2.0}), images, device="cpu")
    np.testing.assert_array_equal(sitk.GetArrayFromImage(as_is.energy), sitk.GetArrayFromImage(limited.energy))


def test_small_lesion_load_thin_drops_the_load_term_only_on_slices_made_from_thick_ones(trained_model):
    # Every case takes the small-lesion path (no region reaches 1e6 ml), which scores it again with the load term
    # or without it.
    settings = {"standardise": "zscore", "median_size_mm": 3.0, "load_weight": 0.5, "small_lesion_ml": 1e6,
                "max_slice_mm": 2.0}
    models = {load: api.with_postprocess(api.load_model(trained_model), {**settings, "small_lesion_load": load})
              for load in ("always", "thin", "never")}
    for spacing, same, other in (((1.0, 1.0, 5.0), "never", "always"), ((1.0, 1.0, 1.2), "always", "never")):
        images, _ = _images(spacing=spacing)
        energy = {load: sitk.GetArrayFromImage(api.predict(model, images, device="cpu").energy)
                  for load, model in models.items()}
        np.testing.assert_array_equal(energy["thin"], energy[same])
        shift = (energy[other] - energy["thin"])[sitk.GetArrayFromImage(images["flair"]) > 0]
        assert abs(float(np.median(shift))) > 0.01  # the load term's constant, on the brain
    # The model object a thick case's thin slices are scored with; the others pass through unchanged.
    assert infer.on_made_slices(models["thin"]).config.postprocess.small_lesion_load == "never"
    assert infer.on_made_slices(models["thin"]).threshold == models["thin"].threshold
    assert all(infer.on_made_slices(models[load]) is models[load] for load in ("always", "never"))
    for bad in ("sometimes", True, None):
        with pytest.raises(InputError, match="small_lesion_load"):
            api.with_postprocess(models["always"], {"small_lesion_load": bad})


def test_a_supplied_brain_mask_is_carried_onto_the_thin_slices_and_kept_on_the_case_grid():
    images, _ = _images()
    brain = sitk.GetArrayFromImage(images["flair"]) > 0
    brain[:, :, :10] = False  # a mask smaller than the non-zero head
    mask = sitk.GetImageFromArray(brain.astype(np.uint8))
    mask.CopyInformation(images["flair"])
    thin, kept = thin_case(CaseImages("c", images, mask=mask), PreprocessConfig(max_slice_mm=2.0))
    np.testing.assert_array_equal(kept, brain)
    thin_brain = sitk.GetArrayFromImage(thin.mask) > 0
    assert thin.mask.GetSpacing() == (1.0, 1.0, 2.0)
    assert not thin_brain[:, :, :10].any() and thin_brain.any()
    # Back on the case grid the thin background (1 below the lowest brain energy, as every energy map has it)
    # does not pull the brain's rim down: the brain voxels keep the thin brain's energy.
    values = np.where(thin_brain, 5.0, 4.0).astype(np.float32)
    energy = sitk.GetImageFromArray(values)
    energy.CopyInformation(thin.mask)
    back = sitk.GetArrayFromImage(energy_onto(energy, thin.mask, images["flair"], brain))
    assert np.mean(back[brain] == 5.0) > 0.99 and back[brain].min() >= 4.0
    assert (back[~brain] == back[brain].min() - 1.0).all()


def test_predict_refuses_a_bad_max_slice_mm_as_a_setting(trained_model):
    with pytest.raises(InputError, match="max_slice_mm"):
        api.with_postprocess(api.load_model(trained_model), {"max_slice_mm": -2})
    model = api.with_postprocess(api.load_model(trained_model), {"max_slice_mm": 3})
    assert model.config.preprocess.max_slice_mm == 3.0 and model.threshold is None  # the energy may change
    assert dataclasses.replace(model.config.preprocess, max_slice_mm=0.0) == api.load_model(
        trained_model).config.preprocess


def test_evaluate_scores_a_thick_case_as_predict_does(trained_model, tmp_path):
    from ADMAnomalyLib.cases import find_cases, load_case
    from ADMAnomalyLib.metrics import detection_metrics
    from conftest import make_synthetic_case

    make_synthetic_case(tmp_path / "cohort", case_id="thick_1", shape=(40, 36, 12), spacing=(1.0, 1.0, 5.0))
    report = api.evaluate(trained_model, tmp_path / "cohort", slices="all", device="cpu", threshold=0.0,
                          postprocess={"max_slice_mm": 2.0})
    case = load_case(find_cases(tmp_path / "cohort")[0])
    model = api.with_postprocess(api.load_model(trained_model), {"max_slice_mm": 2.0})
    prediction = api.predict(model, case.images, device="cpu")
    brain = sitk.GetArrayFromImage(prediction.brain_mask) > 0
    expected = detection_metrics(sitk.GetArrayFromImage(prediction.energy), sitk.GetArrayFromImage(case.label) > 0,
                                 brain)
    assert report["methods"]["ADM"]["pooled"]["auprc"] == pytest.approx(expected.auprc, abs=1e-9)
    as_is = api.evaluate(trained_model, tmp_path / "cohort", slices="all", device="cpu", threshold=0.0)
    assert as_is["methods"]["ADM"]["pooled"]["auprc"] != pytest.approx(expected.auprc, abs=1e-9)


def test_calibration_scores_a_thick_small_lesion_case_as_predict_does(trained_model, tmp_path):
    from ADMAnomalyLib.cases import find_cases, load_case
    from ADMAnomalyLib.evaluate import calibrate_threshold
    from ADMAnomalyLib.infer import InferenceOptions, load_term_off_its_grid, prepare_for_model
    from ADMAnomalyLib.metrics import detection_metrics
    from ADMAnomalyLib.preprocess import native_slice_region
    from conftest import make_synthetic_case

    make_synthetic_case(tmp_path / "cohort", case_id="thick_1", shape=(40, 36, 12), spacing=(1.0, 1.0, 5.0))
    files = find_cases(tmp_path / "cohort")
    case = load_case(files[0])
    # The case takes the small-lesion path (no region reaches 1e6 ml): with 'thin' predict leaves its load term out,
    # with 'always' it adds it; the calibration's energies must follow predict's either way.
    settings = {"standardise": "zscore", "median_size_mm": 3.0, "load_weight": 0.5, "small_lesion_ml": 1e6,
                "max_slice_mm": 2.0}
    thresholds = {}
    for load in ("thin", "always"):
        model = api.with_postprocess(api.load_model(trained_model), {**settings, "small_lesion_load": load})
        assert load_term_off_its_grid(model, case)  # measured on the thin slices, or left out there
        thresholds[load], summary = calibrate_threshold(model, files, InferenceOptions("cpu"))
        prepared = prepare_for_model(model, case)
        region = prepared.native_brain & native_slice_region(prepared, prepared.has_lesion)
        energy = sitk.GetArrayFromImage(api.predict(model, case.images, device="cpu").energy)
        expected = detection_metrics(energy[region], prepared.native_lesion[region])
        assert summary["best_threshold"] == pytest.approx(expected.best_threshold, abs=1e-4)
    assert abs(thresholds["thin"] - thresholds["always"]) > 0.01  # the load term's constant
    # A scan on its own slices keeps the term under 'thin', read off its own grid; 'never' may leave it out anywhere.
    thin_scan = dataclasses.replace(case, images={c: sitk.Image(20, 20, 10, sitk.sitkFloat32) for c in CONTRASTS})
    for load, expected_off_grid in (("thin", False), ("always", False), ("never", True)):
        model = api.with_postprocess(api.load_model(trained_model), {**settings, "small_lesion_load": load})
        assert load_term_off_its_grid(model, thin_scan) == expected_off_grid


def test_the_strong_baseline_can_be_given_the_slices_the_model_sees():
    from ADMAnomalyLib.baselines import flair_zscore, strong_baseline_image
    from ADMAnomalyLib.postprocess import median_filter_in_brain, median_window

    images, label = _images()
    flair = images["flair"]
    brain = sitk.GetArrayFromImage(flair) > 0
    as_is = strong_baseline_image(flair, brain)
    volume = sitk.GetArrayFromImage(flair)[None].repeat(4, axis=0)
    expected = median_filter_in_brain(flair_zscore(volume, brain), brain, median_window(flair.GetSpacing(), 5.0))
    np.testing.assert_allclose(as_is[brain], expected[brain], rtol=0, atol=1e-6)
    thin = strong_baseline_image(flair, brain, max_slice_mm=2.0)
    assert thin.shape == brain.shape and np.isfinite(thin).all()
    assert not np.allclose(thin[brain], as_is[brain])
    lesion = (label > 0) & brain
    assert np.median(thin[lesion]) > np.percentile(thin[brain & ~lesion], 90)
    assert (thin[~brain] == thin[brain].min() - 1.0).all()
