"""The case mixture (``postprocess.case_mixture``): each case scored with the mixture of its own
FLAIR-normal pixels instead of the one frozen over the training data."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from sklearn.metrics import roc_auc_score

from ADMAnomalyLib import api, study
from ADMAnomalyLib.cases import find_cases, load_case
from ADMAnomalyLib.errors import InputError
from ADMAnomalyLib.gmm import energy, mixture_statistics
from ADMAnomalyLib.infer import (MIN_CASE_MIXTURE_PIXELS, InferenceOptions, brain_features, case_mixture_of,
                                 ctoc_runner, ctoc_translations, energy_slices)
from ADMAnomalyLib.preprocess import prepare_case
from ADMAnomalyLib.study.runner import raw_energy, raw_key


def _features(model, prepared):
    """Density features, network-input FLAIR and lesion labels of a prepared case's brain pixels."""
    index = np.flatnonzero(prepared.has_brain)
    x = torch.from_numpy(prepared.slices[index])
    brain = torch.from_numpy(prepared.brain[index])
    with torch.inference_mode():
        features = brain_features(model.network.eval(), ctoc_runner(model), x, brain, None).float()
    return features, x[:, 0][brain], prepared.label[index][prepared.brain[index]], index


def test_the_case_mixture_is_the_mixture_of_the_cases_flair_normal_pixels(trained_model, cohort):
    model = api.load_model(trained_model)
    prepared = prepare_case(load_case(find_cases(cohort / "synth_0")[0]), model.config.preprocess)
    features, flair, _, index = _features(model, prepared)
    normal = flair <= model.config.postprocess.normal_max_flair_z
    assert 0 < int((~normal).sum()) and int(normal.sum()) >= MIN_CASE_MIXTURE_PIXELS
    with torch.inference_mode():
        normal_features = features[normal]
        expected = mixture_statistics(normal_features, model.network.estimator(normal_features), model.config.model.eps)
        fitted = case_mixture_of(model, features, flair)
        # What the FLAIR-bright pixels hold does not matter: they are left out.
        moved = features.clone()
        moved[~normal] += 5.0
        refitted = case_mixture_of(model, moved, flair)
    for got, want in [(fitted.weights, expected.weights), (fitted.means, expected.means),
                      (fitted.covariances, expected.covariances), (refitted.means, expected.means)]:
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)
    assert not torch.allclose(fitted.means, model.gmm.means.to(fitted.means))
    # energy_slices scores every brain pixel with it, and only with case_mixture.
    options = InferenceOptions("cpu", precision="fp32")
    slices, brain = prepared.slices[index], prepared.brain[index]
    per_case = energy_slices(model, slices, brain, options, case_mixture=True)[brain]
    frozen = energy_slices(model, slices, brain, options)[brain]
    with torch.inference_mode():
        np.testing.assert_allclose(per_case, energy(features, expected).numpy(), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(frozen, energy(features, model.gmm).numpy(), rtol=1e-5, atol=1e-5)


def test_too_few_normal_looking_pixels_is_a_clear_error(trained_model):
    model = api.load_model(trained_model)
    features = torch.zeros(3 * MIN_CASE_MIXTURE_PIXELS, model.config.model.feature_dim)
    flair = torch.full((len(features),), 2.0)
    flair[: MIN_CASE_MIXTURE_PIXELS - 1] = 0.0
    with pytest.raises(InputError, match="normal-looking brain pixels"):
        case_mixture_of(model, features, flair)
    flair[MIN_CASE_MIXTURE_PIXELS - 1] = 0.0
    assert case_mixture_of(model, features, flair).means.shape == model.gmm.means.shape


def test_predict_with_a_case_mixture_equals_the_studys_raw_energies(trained_model, cohort):
    model = api.load_model(trained_model)
    files = find_cases(cohort / "synth_1")[0]
    images = {c: sitk.ReadImage(str(p)) for c, p in files.contrasts.items()}
    frozen = sitk.GetArrayFromImage(api.predict(model, images, device="cpu").energy)
    model.config.postprocess = dataclasses.replace(model.config.postprocess, case_mixture=True)
    assert model.config.postprocess.active and not model.config.postprocess.native_active
    product = sitk.GetArrayFromImage(api.predict(model, images, device="cpu").energy)
    settings = study.quick_settings(preset="tiny", image_size=model.config.preprocess.image_size, device="cpu")
    case = study.load_case_data(files, settings)
    options = InferenceOptions("cpu")
    translations = {False: ctoc_translations(model, case.prepared, options)}
    model.config.postprocess = dataclasses.replace(model.config.postprocess, case_mixture=False)
    # The study asks for the case mixture through the options, whatever the model file says.
    study_energy = raw_energy(model, case, dataclasses.replace(options, case_mixture=True), translations)
    np.testing.assert_array_equal(study_energy, product[case.brain])
    assert not np.allclose(product[case.brain], frozen[case.brain])
    assert raw_key("ADM+ F", False, (1.0, 1.0)) == "ADM+ F|case<=1" and raw_key("ADM", True) == "ADM|flip"
    assert raw_key("ADM+ F", False, (0.25, 0.5)) == "ADM+ F|case<=0.25|share=0.5"


def test_the_studys_cut_off_candidates_score_as_predict_does_with_that_cut_off(trained_model, cohort):
    model = api.load_model(trained_model)
    files = find_cases(cohort / "synth_1")[0]
    images = {c: sitk.ReadImage(str(p)) for c, p in files.contrasts.items()}
    settings = study.quick_settings(preset="tiny", image_size=model.config.preprocess.image_size, device="cpu")
    spec = study.METHODS["ADM+ F cm*"]
    assert study.methods.raw_variants(spec, settings) == {(False, (c, 1.0)) for c in study.methods.NORMAL_CUTOFFS}
    assert study.methods.raw_variants(study.METHODS["ADM+ F cm"], settings) == {(False, (1.0, 1.0))}
    assert study.methods.raw_variants(study.METHODS["ADM+ F"], settings) == {(False, None)}
    case = study.load_case_data(files, settings)
    trained = study.runner.TrainedNetworks({"net": model}, [(model, ["net"])], {})
    scores = study.runner.score_networks(trained, [case], {"net": {(False, (0.25, 1.0)), (False, (1.0, 1.0))}},
                                         InferenceOptions("cpu"))
    assert set(scores) == {"net", "net|case<=0.25", "net|case<=1"}
    for cutoff in (0.25, 1.0):
        product = api.predict(api.with_postprocess(model, {"case_mixture": True, "normal_max_flair_z": cutoff}),
                              images, device="cpu").energy
        np.testing.assert_array_equal(scores[f"net|case<={cutoff:g}"][case.case_id],
                                      sitk.GetArrayFromImage(product)[case.brain])
    assert not np.allclose(scores["net|case<=0.25"][case.case_id], scores["net|case<=1"][case.case_id])


def test_a_blended_mixture_is_the_shares_of_the_case_and_frozen_energies(trained_model, cohort):
    """``case_mixture_share`` < 1: each pixel's energy is share x the case mixture's plus the rest x the
    frozen mixture's; the study scores each (cut-off, share) candidate as predict does with it."""
    model = api.load_model(trained_model)
    files = find_cases(cohort / "synth_1")[0]
    prepared = prepare_case(load_case(files), model.config.preprocess)
    index = np.flatnonzero(prepared.has_brain)
    slices, brain = prepared.slices[index], prepared.brain[index]
    options = InferenceOptions("cpu", precision="fp32")
    frozen = energy_slices(model, slices, brain, options)[brain].astype(np.float64)
    alone = energy_slices(model, slices, brain, options, case_mixture=True)[brain].astype(np.float64)
    blended = energy_slices(api.with_postprocess(model, {"case_mixture_share": 0.25}), slices, brain, options,
                            case_mixture=True)[brain]
    np.testing.assert_allclose(blended, 0.25 * alone + 0.75 * frozen, rtol=1e-5, atol=1e-4)
    assert not np.allclose(blended, alone) and not np.allclose(blended, frozen)
    for share in (0.0, 1.5, float("nan")):
        with pytest.raises(InputError, match="case_mixture_share"):
            api.with_postprocess(model, {"case_mixture_share": share})

    settings = study.quick_settings(preset="tiny", image_size=model.config.preprocess.image_size, device="cpu")
    spec = study.METHODS["ADM+ F blend* +post+cc (z+load)"]
    assert study.methods.raw_variants(spec, settings) == {
        (False, (c, s)) for c in study.methods.NORMAL_CUTOFFS for s in study.methods.CASE_MIXTURE_SHARES}
    case = study.load_case_data(files, settings)
    trained = study.runner.TrainedNetworks({"net": model}, [(model, ["net"])], {})
    scores = study.runner.score_networks(trained, [case], {"net": {(False, (0.5, 0.5))}}, InferenceOptions("cpu"))
    images = {c: sitk.ReadImage(str(p)) for c, p in files.contrasts.items()}
    product = api.predict(api.with_postprocess(model, {"case_mixture": True, "normal_max_flair_z": 0.5,
                                                       "case_mixture_share": 0.5}), images, device="cpu").energy
    np.testing.assert_array_equal(scores["net|case<=0.5|share=0.5"][case.case_id],
                                  sitk.GetArrayFromImage(product)[case.brain])


def _site_shifted(prepared, offset: float):
    """The prepared case as another site would give it: normal tissue landing ``offset`` z-units
    higher in T1, T1c and T2 (across sites it lands up to ~0.3 z apart, docs/domain_analysis.md)."""
    shifted = prepared.slices.copy()
    shifted[:, 1:] += offset
    return dataclasses.replace(prepared, slices=(shifted * prepared.brain[:, None]).astype(np.float32))


def test_a_case_mixture_keeps_ranking_lesions_first_on_a_shifted_site(trained_model, cohort):
    """Where a site shift moves normal tissue away from the frozen mixture, the case's own mixture
    still ranks the lesion above normal tissue about as well as on the training site."""
    model = api.load_model(trained_model)
    prepared = prepare_case(load_case(find_cases(cohort / "synth_0")[0]), model.config.preprocess)
    options = InferenceOptions("cpu", precision="fp32")
    aurocs = {}
    for name, case in [("own site", prepared), ("shifted", _site_shifted(prepared, 1.0))]:
        index = np.flatnonzero(case.has_brain)
        brain, label = case.brain[index], case.label[index][case.brain[index]]
        for mixture in (False, True):
            scores = energy_slices(model, case.slices[index], brain, options, case_mixture=mixture)[brain]
            aurocs[name, mixture] = roc_auc_score(label, scores)
    assert aurocs["shifted", False] < aurocs["own site", False] - 0.05
    assert aurocs["shifted", True] > aurocs["shifted", False] + 0.05
    assert aurocs["shifted", True] > aurocs["own site", False] - 0.02


def test_a_model_trained_with_a_case_mixture_chooses_its_threshold_on_whole_cases(cohort, tmp_path):
    """The trainer's own threshold comes from pooled slices of many cases, which a case mixture
    cannot score; such a model's threshold is chosen on whole cases, as predict scores them."""
    from ADMAnomalyLib.config import preset

    config = preset("tiny", train={"epochs_ctoc": 1, "epochs_joint": 1, "lesion_margin": 1},
                    postprocess={"case_mixture": True})
    model = api.train(cohort, tmp_path / "case.admm", config, device="cpu", show_progress_bar=False)
    assert model.metadata["validation"]["source"] == "lesion slices, native grid, post-processed energies"
    assert api.load_model(tmp_path / "case.admm").config.postprocess.case_mixture is True
