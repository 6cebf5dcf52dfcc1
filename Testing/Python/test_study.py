"""The evaluation study (patient-level folds, methods, JSON, figures, report) and the beyond-the-paper
options (density intensities, post-processing) on synthetic cases with the tiny preset."""

from __future__ import annotations

import dataclasses
import copy
import json
import shutil

import numpy as np
import pytest
import torch

from ADMAnomalyLib import study
from ADMAnomalyLib.cli import main
from ADMAnomalyLib.config import ADMConfig, PostprocessConfig, preset
from ADMAnomalyLib.domains import cohort_cases, domain_pools
from ADMAnomalyLib.errors import InputError, ModelFileError
from ADMAnomalyLib.gmm import GMMAccumulator
from ADMAnomalyLib.infer import InferenceOptions, energy_slices
from ADMAnomalyLib.postprocess import postprocess_scores as postprocess_array
from ADMAnomalyLib.model import ADMModel
from ADMAnomalyLib.networks import ADMNetwork
from ADMAnomalyLib.cases import find_cases
from ADMAnomalyLib.study.runner import study_cases
from conftest import make_synthetic_case

STUDY_METHODS = ("ADM", "ADM+X +smooth+rim", "ADM +flip", "DAGMM-conv", "OCSVM", "Mahalanobis", "FLAIR z",
                 "FLAIR z +med5+cc")


# -- options ----------------------------------------------------------------------------------------


def test_defaults_are_the_faithful_adm():
    for name in ("paper", "small", "tiny"):
        config = preset(name)
        assert not config.model.density_intensities
        assert not config.postprocess.active
    assert preset("paper").model.feature_dim == 7


def test_new_options_round_trip_and_old_files_load_with_defaults():
    config = preset("small", model={"density_intensities": ["flair", "t1", "t1c", "t2"]},
                    postprocess={"flip_tta": True, "smoothing_sigma_mm": 2.5, "rim_erosion_mm": 3.0,
                                 "flair_weight": 0.7})
    assert config.model.feature_dim == 11
    again = ADMConfig.from_dict(json.loads(json.dumps(config.to_dict())))
    assert again == config
    old = preset("small").to_dict()
    del old["postprocess"]  # a model file written before the section existed
    assert ADMConfig.from_dict(old).postprocess == PostprocessConfig()
    with pytest.raises(ValueError):
        ADMConfig.from_dict({**old, "postprocess": {"smoothing_sigma": 1.0}})
    # Model files before per-contrast intensities stored a flag.
    for flag, contrasts in ((True, ("flair", "t1", "t1c", "t2")), (False, ())):
        flagged = ADMConfig.from_dict({**old, "model": {**old["model"], "density_intensities": flag}})
        assert flagged.model.density_intensities == contrasts


def _fitted_model(config: ADMConfig, images: np.ndarray, brain: np.ndarray) -> ADMModel:
    torch.manual_seed(0)
    model = ADMModel.create(config)
    model.network.eval()
    x, b = torch.from_numpy(images), torch.from_numpy(brain)
    with torch.no_grad():
        x_hat = model.network.translate(x, b) if config.model.use_ctoc else None
        z, _ = model.network.features(x, b, x_hat)
        zb = z.permute(0, 2, 3, 1)[b]
        accumulator = GMMAccumulator(config.model.n_components, config.model.feature_dim)
        accumulator.update(zb, model.network.estimator(zb))
    model.gmm = accumulator.finalize(config.model.eps)
    return model


def _random_slices(n: int = 3, size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:size, :size]
    brain = np.broadcast_to(((yy - size / 2) ** 2 + (xx - size / 2.5) ** 2) < (size / 2.6) ** 2, (n, size, size)).copy()
    images = (rng.standard_normal((n, 4, size, size)) * brain[:, None]).astype(np.float32)
    return images, brain


def test_density_intensities_adds_x_to_the_features():
    images, brain = _random_slices()
    config = preset("tiny", model={"density_intensities": ["flair", "t1", "t1c", "t2"]})
    network = ADMNetwork(config.model).eval()
    x, b = torch.from_numpy(images), torch.from_numpy(brain)
    z, _ = network.features(x, b)
    assert z.shape[1] == config.model.feature_dim == 11
    assert torch.equal(z[:, -4:], x)


def test_brighter_density_intensity_keeps_flair_above_its_centre():
    # 'brighter' sides the intensity as it sides the residual: dark CSF is not rare tissue, bright is.
    images, brain = _random_slices()
    config = preset("tiny", model={"density_intensities": ["flair"], "density_residuals": ["flair"],
                                   "residual_direction": "brighter", "use_dr": False})
    network = ADMNetwork(config.model).eval()
    x, b = torch.from_numpy(images), torch.from_numpy(brain)
    with torch.no_grad():
        z, _ = network.features(x, b)
    assert z.shape[1] == config.model.feature_dim == 2
    assert torch.equal(z[:, 1], x[:, 0].clamp_min(0.0))
    assert (z[:, 1][x[:, 0] < 0] == 0).all() and (z[:, 1][x[:, 0] > 0] > 0).all()
    with pytest.raises(ValueError, match="density_intensities"):
        ADMNetwork(preset("tiny", model={"density_intensities": ["pd"]}).model)


def test_precomputed_translations_and_flip_tta(tmp_path):
    from ADMAnomalyLib.infer import network_energy
    from ADMAnomalyLib.preprocess import PreparedCase

    images, brain = _random_slices()
    model = _fitted_model(preset("tiny"), images, brain)
    cpu = InferenceOptions("cpu")
    plain = energy_slices(model, images, brain, cpu)
    with torch.no_grad():
        x_hat = model.network.translate(torch.from_numpy(images), torch.from_numpy(brain)).numpy()
    np.testing.assert_allclose(energy_slices(model, images, brain, cpu, x_hat_ct=x_hat), plain, rtol=1e-5, atol=1e-4)
    prepared = PreparedCase("p", images, brain, None, np.ones(len(images), bool), np.zeros(len(images), bool))
    flipped = network_energy(model, prepared, InferenceOptions("cpu", flip_tta=True))
    mirror = energy_slices(model, images[..., ::-1].copy(), brain[..., ::-1].copy(), cpu)[..., ::-1]
    np.testing.assert_allclose(flipped, 0.5 * (plain + mirror), rtol=1e-5, atol=1e-4)
    assert np.abs(flipped - plain).max() > 1e-3, "the mirrored pass must change something"
    # The option travels in the model file and is applied by default.
    model.config.postprocess.flip_tta = True
    path = model.save(tmp_path / "flip.admm")
    loaded = ADMModel.load(path)
    assert loaded.config.postprocess.flip_tta
    np.testing.assert_allclose(network_energy(loaded, prepared, cpu), flipped, rtol=1e-5, atol=1e-4)


def test_postprocess_array_smooths_inside_the_brain_and_suppresses_the_rim():
    z, y, x = np.mgrid[:20, :24, :24]
    brain = ((z - 10) ** 2 + (y - 12) ** 2 + (x - 12) ** 2) < 81
    values = np.where(brain, np.random.default_rng(0).standard_normal(brain.shape), 50.0).astype(np.float32)
    values[10, 12, 12] = 30.0
    smoothed = postprocess_array(values, brain, (1.0, 1.0, 1.0), PostprocessConfig(smoothing_sigma_mm=1.5))
    assert smoothed[brain].max() < 30.0 and smoothed[brain].std() < values[brain].std()
    assert smoothed[~brain].max() < smoothed[brain].min()  # background below every brain value, no leak
    rim = postprocess_array(values, brain, (1.0, 1.0, 1.0), PostprocessConfig(rim_erosion_mm=2.0))
    assert rim[10, 12, 12] == 30.0  # deep inside: untouched
    assert rim[10, 12, 4] == rim[brain].min()  # one voxel inside the boundary: suppressed
    unchanged = postprocess_array(values, brain, (1.0, 1.0, 1.0), PostprocessConfig())
    np.testing.assert_array_equal(unchanged[brain], values[brain])
    flair = np.where(brain, 2.0, 0.0).astype(np.float32)
    combined = postprocess_array(values, brain, (1.0, 1.0, 1.0), PostprocessConfig(flair_weight=0.5), intensity=flair)
    inside = values[brain].astype(np.float64)
    np.testing.assert_allclose(combined[brain], (inside - inside.mean()) / inside.std() + 1.0, rtol=1e-5, atol=1e-5)
    assert combined[~brain].max() < combined[brain].min()
    with pytest.raises(ValueError):
        postprocess_array(values, brain, (1.0, 1.0, 1.0), PostprocessConfig(flair_weight=0.5))


def test_postprocess_cache_shared_by_configurations_with_other_margins():
    # A small brain in a large grid, so each configuration's bounding box (brain + its own margin)
    # is a different sub-volume; one per-case cache serves them all, as in the study.
    z, y, x = np.mgrid[:60, :70, :70]
    brain = ((z - 30) ** 2 + (y - 35) ** 2 + (x - 35) ** 2) < 100
    values = np.where(brain, np.random.default_rng(1).standard_normal(brain.shape), 0.0).astype(np.float32)
    configs = [PostprocessConfig(smoothing_sigma_mm=3.0, rim_erosion_mm=3.0),
               PostprocessConfig(rim_erosion_mm=3.0, median_size_mm=5.0),
               PostprocessConfig(smoothing_sigma_mm=1.0, rim_erosion_mm=2.0)]
    cache: dict = {}
    for cfg in configs + configs:
        shared = postprocess_array(values, brain, (1.0, 1.0, 1.0), cfg, cache=cache)
        np.testing.assert_array_equal(shared, postprocess_array(values, brain, (1.0, 1.0, 1.0), cfg))


# -- the study --------------------------------------------------------------------------------------


def test_patient_folds_are_disjoint_and_cover_every_patient():
    ids = [f"p{i:02d}" for i in range(12)]
    folds = study.patient_folds(ids, 3)
    assert sorted(sum(folds, [])) == ids
    assert all(len(f) == 4 for f in folds)
    assert all(not set(a) & set(b) for i, a in enumerate(folds) for b in folds[i + 1:])
    assert study.patient_folds(ids, 3) == folds  # deterministic
    with pytest.raises(InputError, match="folds"):
        study.patient_folds(ids[:2], 3)


@pytest.fixture(scope="module")
def study_run(tmp_path_factory):
    data = tmp_path_factory.mktemp("study_data")
    for number in range(4):
        make_synthetic_case(data, case_id=f"synth_{number}", seed=number)
    out = tmp_path_factory.mktemp("study_out")
    settings = study.quick_settings(n_folds=2, preset="tiny", image_size=32, epochs_ctoc=1, epochs_joint=1,
                                    batch_size=4, lesion_margin=1, singularity_steps=4, singularity_image_size=32,
                                    ocsvm_max_train=1000, device="cpu", curve_points=40, methods=STUDY_METHODS)
    result = study.run_study(data, out, settings, command="pytest")
    return data, out, result


def test_study_json_schema_and_protocol(study_run):
    _, out, result = study_run
    on_disk = json.loads((out / "study.json").read_text(encoding="utf-8"))
    assert on_disk == json.loads(json.dumps(result))
    for key in ("settings", "folds", "methods", "runs", "summary", "curves", "singularity", "machine", "git",
                "runtime_s", "command", "examples"):
        assert key in result, key
    assert list(result["summary"]) == list(STUDY_METHODS)
    assert len(result["runs"]) == 2
    tested = []
    for run in result["runs"]:
        assert not set(run["train"]) & set(run["test"]), "a patient is in both training and test"
        tested += run["test"]
        for method in STUDY_METHODS:
            metrics = run["methods"][method]
            assert metrics["threshold_source"] == "given"  # the validation threshold
            assert {"auroc", "auprc", "best_f1"} <= set(metrics["pooled"])
            assert {"dice", "precision", "recall"} <= set(metrics["at_threshold"])
            pooled = metrics["pooled"]
            # Every method ranks the planted lesions above chance (AUPRC of a random score = prevalence).
            assert pooled["auprc"] > pooled["n_positive"] / pooled["n_voxels"], method
            assert [row["case_id"] for row in metrics["per_case"]] == run["test"]
    assert sorted(tested) == sorted(result["cases"])
    row = result["summary"]["ADM"]
    assert set(row) == set(study.SUMMARY_METRICS) and row["auprc"]["n"] == 2
    assert set(result["singularity"]["runs"]) == {"none", "diagonal penalty", "eigenvalue bound"}
    # The trivial baseline is perfect on this synthetic data, as a sanity check of the voxel alignment.
    assert result["summary"]["FLAIR z"]["auroc"]["mean"] > 0.95


def test_a_rerun_into_the_same_folder_reuses_the_trained_networks(study_run, monkeypatch, tmp_path):
    data, out, result = study_run
    saved = sorted((out / "networks").glob("*.admm"))
    assert saved and all(ADMModel.load(path).gmm is not None for path in saved)
    shutil.copytree(out / "networks", tmp_path / "networks")  # the fixture's own folder stays as it was

    def no_training(*args, **kwargs):
        raise AssertionError("a cached network was trained again")

    monkeypatch.setattr(study.runner.Trainer, "fit", no_training)
    monkeypatch.setattr(study.runner.Trainer, "fit_ctoc", no_training)
    # A commit made while the study runs is not the code that ran: the study keeps the start's.
    head = {"commit": "1" * 40, "dirty": False}
    load_case_data = study.runner.load_case_data

    def commit_while_loading(*args, **kwargs):
        head.update(commit="2" * 40, dirty=True)
        return load_case_data(*args, **kwargs)

    monkeypatch.setattr(study.runner, "_git_commit", lambda repo: dict(head))
    monkeypatch.setattr(study.runner, "load_case_data", commit_while_loading)
    again = study.run_study(data, tmp_path, dataclasses.replace(_settings_of(result), methods=("ADM",)),
                            command="pytest rerun")
    assert again["git"] == {"commit": "1" * 40, "dirty": False}
    for first, second in zip(result["runs"], again["runs"]):
        assert second["methods"]["ADM"]["threshold"] == first["methods"]["ADM"]["threshold"]
        assert second["methods"]["ADM"]["pooled"]["auprc"] == first["methods"]["ADM"]["pooled"]["auprc"]
        assert second["histories"]["ADM"] == first["histories"]["ADM"]


def test_cached_networks_are_keyed_by_config_and_training_cases(tmp_path, monkeypatch):
    settings = study.quick_settings(preset="tiny")
    config = study.network_config("ADM", settings, 0)
    path = study.runner.network_cache_path(tmp_path, "ADM+ +x", config, ["b", "a"])
    assert path.parent == tmp_path and path.name.startswith("ADM___x-")
    assert path == study.runner.network_cache_path(tmp_path, "ADM+ +x", config, ["a", "b"])
    assert path != study.runner.network_cache_path(tmp_path, "ADM+ +x", config, ["a", "c"])
    longer = study.network_config("ADM", dataclasses.replace(settings, epochs_ctoc=9), 0)
    assert path != study.runner.network_cache_path(tmp_path, "ADM+ +x", longer, ["a", "b"])
    post = dataclasses.replace(config, postprocess=PostprocessConfig(median_size_mm=3.0))
    assert path == study.runner.network_cache_path(tmp_path, "ADM+ +x", post, ["a", "b"])  # applied after training
    # A setting at its default does not enter the key, so adding an option (off by default) keeps the
    # networks already kept: the key is the one of a config written before the option existed.
    brighter = dataclasses.replace(config, model=dataclasses.replace(config.model, residual_direction="brighter"))
    assert path != study.runner.network_cache_path(tmp_path, "ADM+ +x", brighter, ["a", "b"])
    to_dict = ADMConfig.to_dict

    def before_the_option(self):
        values = to_dict(self)
        del values["model"]["residual_direction"]
        return values

    monkeypatch.setattr(ADMConfig, "to_dict", before_the_option)
    assert study.runner.network_cache_path(tmp_path, "ADM+ +x", config, ["a", "b"]) == path


def test_an_interrupted_study_network_resumes_where_it_stopped(cohort, tmp_path, monkeypatch):
    """Killed mid-step 1 and again mid-step 2 of the group's second network, the reruns continue from the
    per-epoch checkpoints (no epoch is trained twice) and end with the networks of an uninterrupted run."""
    settings = study.quick_settings(preset="tiny", image_size=32, epochs_ctoc=2, epochs_joint=2, batch_size=4,
                                    lesion_margin=1, device="cpu")
    cases = [study.load_case_data(files, settings) for files in find_cases(cohort)]
    names = ("ADM", "ADM+X")
    data = study.runner.training_sets(cases, settings, names, baseline=False)
    saves, stop_at = [], {}
    save_checkpoint = study.runner.Trainer.save_checkpoint

    def save_then_maybe_die(trainer):
        save_checkpoint(trainer)
        saves.append((trainer.stage, trainer.epoch))
        if saves.count((trainer.stage, trainer.epoch)) == stop_at.get((trainer.stage, trainer.epoch)):
            raise KeyboardInterrupt

    monkeypatch.setattr(study.runner.Trainer, "save_checkpoint", save_then_maybe_die)

    def train(folder):
        return study.runner.train_networks(names, settings, 0, data, torch.device("cpu"), folder,
                                           [case.case_id for case in cases])

    reference = train(tmp_path / "reference")
    uninterrupted = len(saves)
    assert uninterrupted == 6  # step 1 twice (shared), then each network's step 2 twice
    kept = tmp_path / "kept"
    epochs_per_run = []
    for stop in ({("ctoc", 1): 1}, {("joint", 1): 2}):  # the second network's first step-2 epoch
        saves.clear()
        stop_at.clear()
        stop_at.update(stop)
        with pytest.raises(KeyboardInterrupt):
            train(kept)
        assert list(kept.glob("*.ckpt"))
        epochs_per_run.append(len(saves))
    assert len(list(kept.glob("*.admm"))) == 1  # the first network finished before the second was killed
    saves.clear()
    stop_at.clear()
    resumed = train(kept)
    epochs_per_run.append(len(saves))
    assert epochs_per_run == [1, 4, 1]  # every epoch trained once over the three runs (6 uninterrupted)
    assert not list(kept.glob("*.ckpt")) and len(list(kept.glob("*.admm"))) == 2
    for name in names:
        expected, actual = reference.models[name].network.state_dict(), resumed.models[name].network.state_dict()
        for key in expected:
            torch.testing.assert_close(actual[key], expected[key], rtol=0, atol=0, msg=f"{name} {key}")
        assert resumed.histories[name][-1]["epoch"] == 2


def _settings_of(result):
    settings = study.StudySettings.from_dict(result["settings"])
    assert json.loads(json.dumps(settings.to_dict())) == result["settings"] and isinstance(settings.seeds, tuple)
    return settings


def test_report_and_figures_from_json(study_run, tmp_path):
    _, out, result = study_run
    docs = tmp_path / "docs"
    report = study.make_report(out / "study.json", docs)
    text = report.read_text(encoding="utf-8")
    for name in ("roc_pr_curves.png", "example_slices.png", "auroc_vs_lesion_size.png", "singularity.png"):
        path = docs / "figures" / name
        assert path.exists() and path.stat().st_size > 1000, name
        assert f"figures/{name}" in text
    mean = result["summary"]["FLAIR z"]["auprc"]["mean"]
    assert f"{mean:.3f}" in text
    assert "pytest" in text  # the exact command
    # The CLI regenerates the report from the JSON alone.
    docs2 = tmp_path / "docs2"
    assert main(["study", "--report-only", "-o", str(out), "--docs", str(docs2)]) == 0
    assert study.format_table(result) in (docs2 / "results.md").read_text(encoding="utf-8")


def test_the_study_scores_adm_exactly_as_the_product_predicts(trained_model, cohort):
    """The study's ADM energies (raw and post-processed) are `admanomaly predict`'s, voxel for voxel."""
    import SimpleITK as sitk

    from ADMAnomalyLib import api
    from ADMAnomalyLib.cases import find_cases
    from ADMAnomalyLib.infer import ctoc_translations
    from ADMAnomalyLib.study.runner import (RunCaches, RunData, _component_labels, _postprocessed, _with_chosen_load,
                                            raw_energy)

    model = api.load_model(trained_model)
    settings = study.quick_settings(preset="tiny", image_size=model.config.preprocess.image_size, device="cpu")
    files = find_cases(cohort / "synth_0")[0]
    images = {c: sitk.ReadImage(str(p)) for c, p in files.contrasts.items()}
    case = study.load_case_data(files, settings)
    options = InferenceOptions("cpu")
    translations = {False: ctoc_translations(model, case.prepared, options)}
    study_energy = raw_energy(model, case, options, translations)
    product = sitk.GetArrayFromImage(api.predict(model, images, device="cpu").energy)
    np.testing.assert_array_equal(study_energy, product[case.brain])
    post = PostprocessConfig(smoothing_sigma_mm=2.0, rim_erosion_mm=1.0, flair_weight=1.5, median_size_mm=3.0,
                             standardise="robust")
    study_post = _postprocessed({case.case_id: study_energy}, post, [case],
                                lambda c: c.prepared.native_zscored, RunCaches(), "ADM")
    model.config.postprocess = post
    product_post = sitk.GetArrayFromImage(api.predict(model, images, device="cpu").energy)
    np.testing.assert_array_equal(study_post[case.case_id], product_post[case.brain])
    assert not np.allclose(study_post[case.case_id], study_energy)
    # The '(z+load)' rows add the load term to these scores as predict does with the chosen weight.
    run = RunData(settings, 0, [case], [], [[case], [case]], {}, RunCaches(), {})  # two groups: a choice to make
    shifted, chosen = _with_chosen_load(study_post, post, (0.7,), run)
    assert chosen["weight"] == 0.7
    model.config.postprocess = dataclasses.replace(post, load_weight=0.7)
    product_load = sitk.GetArrayFromImage(api.predict(model, images, device="cpu").energy)
    np.testing.assert_array_equal(shifted[case.case_id], product_load[case.brain])
    assert not np.allclose(shifted[case.case_id], study_post[case.case_id])
    # It adds it to every case, so a row whose small-lesion cases should go without it is refused, not mismeasured.
    with pytest.raises(ValueError, match="small_lesion_load"):
        _with_chosen_load(study_post, dataclasses.replace(post, small_lesion_load="never"), (0.7,), run)
    # '+cc': the study's label at the threshold is the one predict writes, its small regions left out; the
    # energy map is the same with or without them.
    threshold = float(np.quantile(shifted[case.case_id], 0.95))
    study_label = _component_labels([case], 20.0, shifted)(threshold)[case.case_id]
    model.config.postprocess = dataclasses.replace(post, load_weight=0.7, min_component_mm3=20.0)
    prediction = api.predict(model, images, device="cpu")
    np.testing.assert_array_equal(sitk.GetArrayFromImage(prediction.energy)[case.brain], shifted[case.case_id])
    np.testing.assert_array_equal(sitk.GetArrayFromImage(prediction.anomaly(threshold))[case.brain] > 0, study_label)
    assert 0 < study_label.sum() < (shifted[case.case_id] >= threshold).sum()  # something was left out

    def study_equals_predict(config: PostprocessConfig) -> np.ndarray:
        scored = _postprocessed({case.case_id: study_energy}, config, [case],
                                lambda c: c.prepared.native_zscored, RunCaches(), "ADM")[case.case_id]
        model.config.postprocess = config
        np.testing.assert_array_equal(scored, sitk.GetArrayFromImage(
            api.predict(model, images, device="cpu").energy)[case.brain])
        return scored

    # The FLAIR asymmetry mirrors across the case's own left-right axis in the study as in predict.
    asymmetric = dataclasses.replace(post, asymmetry_weight=1.0)
    study_asym = study_equals_predict(asymmetric)
    assert not np.allclose(study_asym, study_post[case.case_id])
    # T2's asymmetry too: predict keeps the native T2 it reads, the study the same volume.
    study_t2 = study_equals_predict(dataclasses.replace(asymmetric, t2_asymmetry_weight=0.5))
    assert not np.allclose(study_t2, study_asym)
    # The T2 term reads T1 and T2 as well: predict keeps both, the study the same volumes.
    study_t2_term = study_equals_predict(dataclasses.replace(asymmetric, t2_weight=1.0, t2_csf_max_t1_z=-9.0))
    assert not np.allclose(study_t2_term, study_asym)
    # The energy's own asymmetry, on the same plane.
    study_energy_asym = study_equals_predict(dataclasses.replace(asymmetric, energy_asymmetry_weight=1.0))
    assert not np.allclose(study_energy_asym, study_asym)
    # A FLAIR term normalised apart from the network input: the row's preparation is predict's.
    spec = dataclasses.replace(study.METHODS["ADM +post"], native_normalisation="robust")
    intensity = dataclasses.replace(model.config.preprocess, native_normalisation="robust")
    assert study.methods.intensity_preprocess(spec, settings) == dataclasses.replace(
        study.network_config("ADM", settings, 0).preprocess, native_normalisation="robust")
    case = study.load_case_data(files, settings, [intensity])
    robust_post = _postprocessed({case.case_id: study_energy}, post, [case],
                                 lambda c: c.preparation(intensity).native_zscored, RunCaches(), "ADM")
    model.config.postprocess = post
    model.config.preprocess = intensity
    product_robust = sitk.GetArrayFromImage(api.predict(model, images, device="cpu").energy)
    np.testing.assert_array_equal(robust_post[case.case_id], product_robust[case.brain])
    assert not np.allclose(robust_post[case.case_id], study_post[case.case_id])
    # A FLAIR term read from the bias-corrected FLAIR: the N4 rows' preparation is predict's too.
    n4_spec = dataclasses.replace(study.METHODS["ADM +post"], native_bias_correction_levels=2)
    corrected = dataclasses.replace(study.network_config("ADM", settings, 0).preprocess, native_bias_correction_levels=2)
    assert study.methods.intensity_preprocess(n4_spec, settings) == corrected
    case = study.load_case_data(files, settings, [corrected])
    n4_post = _postprocessed({case.case_id: study_energy}, post, [case],
                             lambda c: c.preparation(corrected).native_zscored, RunCaches(), "ADM")
    model.config.preprocess = corrected
    product_n4 = sitk.GetArrayFromImage(api.predict(model, images, device="cpu").energy)
    np.testing.assert_array_equal(n4_post[case.case_id], product_n4[case.brain])
    assert not np.allclose(n4_post[case.case_id], study_post[case.case_id])


# -- leave one domain out ---------------------------------------------------------------------------

DOMAIN_STUDY_METHODS = ("FLAIR z", "FLAIR z +med3+cc", "FLAIR z +med5+cc", "FLAIR robust +med5+cc", "ADM",
                        "ADM +post", "ADM robust-norm", "ADM cm*")


def _rescale_case(case_dir, factor: float) -> None:
    """Multiply every contrast of a synthetic case by ``factor`` (another site's intensity scale)."""
    import SimpleITK as sitk

    for path in case_dir.iterdir():
        if "seg" in path.name.lower() or "gold" in path.name.lower():
            continue
        image = sitk.ReadImage(str(path))
        scaled = sitk.GetImageFromArray(sitk.GetArrayFromImage(image) * np.float32(factor))
        scaled.CopyInformation(image)
        sitk.WriteImage(scaled, str(path))


def _mirror_labels(case_dir) -> None:
    """Move a case's lesion label to the mirrored position (the images stay as they are)."""
    import SimpleITK as sitk

    for path in case_dir.iterdir():
        if "seg" in path.name.lower():
            image = sitk.ReadImage(str(path))
            moved = sitk.GetImageFromArray(np.ascontiguousarray(sitk.GetArrayFromImage(image)[:, :, ::-1]))
            moved.CopyInformation(image)
            sitk.WriteImage(moved, str(path))


def _make_domains(root):
    """Three tiny synthetic domains with different intensity scales; 'site B' in the open_ms layout,
    'site C' picked by a case glob from a folder that also holds other cases."""
    for number in range(2):
        make_synthetic_case(root / "a", case_id=f"a_{number}", seed=number)
        _rescale_case(make_synthetic_case(root / "b", case_id=f"b{number}", naming="ms", seed=10 + number), 3.0)
    _rescale_case(make_synthetic_case(root / "c", case_id="c_0", seed=20), 0.5)
    make_synthetic_case(root / "c", case_id="other_0", seed=21)
    domains = {"site A": {"folder": "a", "pool": "A and C"}, "site B": {"folder": "b", "pattern": "open_ms"},
               "site C": {"folder": "c", "cases": "c_*", "pool": "A and C"}}
    path = root / "domains.json"
    path.write_text(json.dumps(domains), encoding="utf-8")
    return path


def _domain_settings(**overrides):
    return study.quick_settings(split="domains", preset="tiny", image_size=32, epochs_ctoc=1, epochs_joint=1,
                                batch_size=4, lesion_margin=1, device="cpu", curve_points=40,
                                methods=DOMAIN_STUDY_METHODS, **overrides)


def test_domains_file_parsing_and_errors(tmp_path):
    path = _make_domains(tmp_path)
    domains = study.load_domains(path)
    assert list(domains) == ["site A", "site B", "site C"]
    assert domain_pools(path) == {"A and C": ["site A", "site C"]}
    assert {name: [f.case_id for f in files] for name, files in domains.items()} == {
        "site A": ["a_0", "a_1"], "site B": ["b0", "b1"], "site C": ["c_0"]}
    assert all(f.label is not None for files in domains.values() for f in files)

    def write(entries):
        bad = tmp_path / "bad.json"
        bad.write_text(json.dumps(entries), encoding="utf-8")
        return bad

    good = {"site A": {"folder": "a"}, "site C": {"folder": "c", "cases": "c_*"}}
    with pytest.raises(InputError, match="folder .* not found"):
        study.load_domains(write({**good, "gone": {"folder": "nowhere"}}))
    with pytest.raises(InputError, match="no case id .* matches"):
        study.load_domains(write({**good, "empty": {"folder": "c", "cases": "z_*"}}))
    with pytest.raises(InputError, match="unknown pattern 'brats99'"):
        study.load_domains(write({**good, "odd": {"folder": "b", "pattern": "brats99"}}))
    with pytest.raises(InputError, match="a_0 is in two domains"):
        study.load_domains(write({**good, "again": {"folder": "a", "cases": "a_0"}}))
    single = write({"site A": {"folder": "a"}})  # fine to train on, not to leave a domain out
    assert [f.case_id for f in cohort_cases(single)] == ["a_0", "a_1"]
    with pytest.raises(InputError, match="at least two domains"):
        study_cases(None, single, study.quick_settings(split="domains"))
    with pytest.raises(InputError, match="needs a 'folder'"):
        study.load_domains(write({**good, "typo": {"fodler": "a"}}))
    with pytest.raises(InputError, match="not found"):
        study.load_domains(tmp_path / "missing.json")
    # Exactly one of a data folder and --domains: a usage error otherwise.
    assert main(["study", "-o", str(tmp_path / "out")]) == 2
    assert main(["study", str(tmp_path / "a"), "--domains", str(path), "-o", str(tmp_path / "out")]) == 2


def test_domain_balanced_choices_average_the_domains():
    from types import SimpleNamespace

    from ADMAnomalyLib.metrics import detection_metrics, threshold_metrics

    rng = np.random.default_rng(0)

    def domain(name, n, lesion_level):
        # Lesions score around `lesion_level`, normal tissue around 0: each domain prefers its own threshold.
        labels = rng.random(n) < 0.2
        scores = np.where(labels, rng.normal(lesion_level, 0.5, n), rng.normal(0.0, 0.5, n)).astype(np.float32)
        case = SimpleNamespace(case_id=name, labels=labels, validation=np.ones(n, bool), domain=name)
        return case, scores

    big, small_1, small_2 = domain("big", 20000, 1.2), domain("small1", 500, 4.0), domain("small2", 500, 4.0)
    cases = [big[0], small_1[0], small_2[0]]
    scores = {case.case_id: s for case, s in (big, small_1, small_2)}
    groups = study.selection_groups(cases, "domains")
    assert [[c.case_id for c in g] for g in groups] == [["big"], ["small1"], ["small2"]]
    assert study.selection_groups(cases, "patients") == [cases]
    balanced = study.validation_threshold(scores, groups)
    pooled = study.validation_threshold(scores, [cases])

    def mean_dice(t):
        return np.mean([threshold_metrics(scores[c.case_id], c.labels, t).dice for c in cases])

    candidates = np.unique(np.concatenate(list(scores.values())))
    best = max(mean_dice(t) for t in candidates[::7])
    assert mean_dice(balanced) >= best - 1e-12, "the balanced threshold maximises the mean of the domains' Dice"
    assert mean_dice(balanced) > mean_dice(pooled) + 0.01, "the big domain dictates the pooled choice"
    # One group: exactly the pooled best-F1 threshold.
    from ADMAnomalyLib.metrics import best_f1_threshold
    assert pooled == pytest.approx(best_f1_threshold(np.concatenate(list(scores.values())),
                                                     np.concatenate([c.labels for c in cases]))[0])
    per_domain = [detection_metrics(scores[c.case_id], c.labels).auprc for c in cases]
    assert study.validation_auprc(scores, groups) == pytest.approx(np.mean(per_domain))
    assert study.validation_auprc(scores, groups, "worst") == pytest.approx(min(per_domain))
    assert min(per_domain) < np.mean(per_domain) - 1e-6  # the two criteria differ here
    with pytest.raises(ValueError, match="worst"):
        study.validation_auprc(scores, groups, "median")


def test_greedy_postprocess_choice_takes_the_best_candidate_field_by_field():
    from ADMAnomalyLib.study.runner import choose_postprocess

    seen = []

    def criterion(post):
        seen.append(post)
        # Prefers smoothing 2, no rim, w = 4 and a 3 mm median.
        return (-abs(post.smoothing_sigma_mm - 2) - post.rim_erosion_mm - abs(post.flair_weight - 4)
                - abs(post.median_size_mm - 3))

    post, chosen = choose_postprocess(PostprocessConfig(standardise="robust"), study.methods.POST_SEARCH, criterion)
    assert chosen == {"smoothing_sigma_mm": 2.0, "rim_erosion_mm": 0.0, "flair_weight": 4.0, "median_size_mm": 3.0}
    assert post.standardise == "robust" and post.flair_weight == 4.0
    assert len(seen) == sum(len(study.POST_CANDIDATES[f]) for f in study.methods.POST_SEARCH)


def test_the_greedy_choice_may_keep_a_step_off_and_the_gate_rows_choose_the_gate():
    from ADMAnomalyLib.study.runner import choose_postprocess

    # None (no gate) is a candidate like any other: it stays when it scores best, first or not.
    for best in (None, 0.0, 1.0):
        post, chosen = choose_postprocess(PostprocessConfig(flair_weight=1.0), ("energy_gate_z",),
                                          lambda p: 1.0 if p.energy_gate_z == best else 0.0)
        assert chosen == {"energy_gate_z": best} and post.energy_gate_z == best
    # A tie keeps the first candidate: no gate.
    assert choose_postprocess(PostprocessConfig(), ("energy_gate_z",), lambda p: 0.5)[1] == {"energy_gate_z": None}
    bundled = study.METHODS["ADM+ F +asym +asymE +T2gF +post+fsm+cc (z+load) N4"].search  # the row before the gate
    last = study.METHODS["ADM+ F +asym +asymE +T2gF +post+fsm+gate+cc (z+load) N4"].search
    first = study.METHODS["ADM+ F +gate +asym +asymE +T2gF +post+fsm+cc (z+load) N4"].search
    assert last == (*bundled, "energy_gate_z")
    assert first[first.index("energy_gate_z") - 1] == "rim_erosion_mm" and first.index("energy_gate_z") < first.index(
        "flair_weight")
    assert tuple(f for f in first if f != "energy_gate_z") == bundled
    # With the sheets as well, the gate comes first and the sheets are weighed on the gated energy.
    sheets = study.METHODS["ADM+ F +asym +asymE +T2gF +post+fsm+gate+sheet+cc (z+load) N4"].search
    assert sheets == (*last, "flair_sheet_weight")
    # The '+scale' row is the gate row with the unsearched small-lesion rule.
    scale = study.METHODS["ADM+ F +asym +asymE +T2gF +post+fsm+gate+cc (z+load) N4 +scale"]
    assert scale.search == last and scale.postprocess["small_lesion_ml"] == study.methods.SMALL_LESION_ML > 0
    assert {k: v for k, v in scale.postprocess.items() if k != "small_lesion_ml"} == study.METHODS[
        "ADM+ F +asym +asymE +T2gF +post+fsm+gate+cc (z+load) N4"].postprocess
    assert study.POST_CANDIDATES["energy_gate_z"][0] is None
    # The shared-hyperintensity row is the '+scale' row whose search then weighs FLAIR-and-T2, 0 (off) first.
    shared = study.METHODS["ADM+ F +asym +asymE +T2gF +post+fsm+gate+shared+cc (z+load) N4 +scale"]
    assert shared.search == (*last, "shared_hyperintensity_weight") and shared.postprocess == scale.postprocess
    assert study.POST_CANDIDATES["shared_hyperintensity_weight"][0] == 0.0
    with pytest.raises(ValueError, match="energy_gate"):
        study.methods._post_cc_row("ADM+ F", "zscore", "gate first without the energy asymmetry", energy_gate="first")


def test_ctoc_shared_only_between_networks_with_equal_ctoc_settings():
    settings = study.quick_settings(preset="tiny")
    groups = study.ctoc_groups(list(study.NETWORKS), settings, 0)
    assert groups == [["ADM", "ADM+X", "ADM_ct", "ADM_woj"], ["ADM robust-norm"], ["ADM site-aug"], ["ADM unc"],
                      ["ADM+", "ADM+ F", "ADM+ F>", "ADM+ F> ct", "ADM+ F> ct XF", "ADM+ FT2"],  # density features: after step 1
                      ["ADM+ F N4in"],  # a bias-corrected input
                      ["ADM+ F ctx"], ["ADM+ F ctx tp"],  # CtoCs that see the neighbouring slices
                      ["ADM+ F hist", "ADM+ F> ct hist"],  # another normalisation of the input
                      ["ADM+ F mir", "ADM+ F> ct mir"],  # CtoCs that see the mirror image
                      ["ADM+ F noT2", "ADM+ F> ct noT2"],  # CtoCs that make FLAIR without T2
                      ["ADM+ F w32"]]  # a wider CtoC
    assert not any("ADM_dr" in g for g in groups)  # no CtoC at all
    base = study.network_config("ADM", settings, 0)
    assert study.ctoc_key(base) == study.ctoc_key(preset("tiny", **{
        **{k: v for k, v in base.to_dict().items() if k in ("preprocess", "model")},
        "train": {**base.to_dict()["train"], "epochs_joint": 99, "lr_joint": 0.1}}))
    for section, change in (("train", {"epochs_ctoc": 99}), ("train", {"nll_beta": 0.1}), ("train", {"seed": 5}),
                            ("model", {"median_bias": False}), ("model", {"ctoc_context_slices": 1}),
                            ("model", {"ctoc_mirror_context": True}), ("model", {"ctoc_width": 32}),
                            ("model", {"ctoc_flair_hides_t2": True}),
                            ("train", {"through_plane_mix": 0.5}),
                            ("preprocess", {"normalisation": "robust"}),
                            ("preprocess", {"normalisation": "histogram"}),
                            ("preprocess", {"bias_correction_levels": 2})):
        data = base.to_dict()
        data[section] = {**data[section], **change}
        assert study.ctoc_key(ADMConfig.from_dict(data)) != study.ctoc_key(base), change


@pytest.fixture(scope="module")
def domain_runs(tmp_path_factory):
    """The domain study twice: as made, and with the test domain 'site C''s labels moved."""
    root = tmp_path_factory.mktemp("domains")
    path = _make_domains(root)
    first = study.run_study(None, root / "out", _domain_settings(), command="pytest domains", domains_file=path)
    _mirror_labels(root / "c" / "c_0")
    second = study.run_study(None, root / "out2", _domain_settings(), domains_file=path)
    return root, first, second


def test_leave_one_domain_out_never_uses_the_test_domain(domain_runs):
    _, first, second = domain_runs
    assert first["split"] == "domains" and [r["domain"] for r in first["runs"]] == ["site A", "site B", "site C"]
    for run in first["runs"]:
        test_domain = run["domain"]
        assert run["test"] == first["domains"][test_domain]
        assert sorted(run["train"]) == sorted(c for d, ids in first["domains"].items() if d != test_domain for c in ids)
        assert test_domain not in run["train_domains"]
        for method in DOMAIN_STUDY_METHODS:
            assert [row["case_id"] for row in run["methods"][method]["per_case"]] == run["test"]
        assert set(run["methods"]["ADM +post"]["chosen"]) == set(study.methods.POST_SEARCH)
        cutoff = run["methods"]["ADM cm*"]["chosen"]["normal_max_flair_z"]
        assert cutoff in study.methods.NORMAL_CUTOFFS
        assert run["methods"]["ADM cm*"]["postprocess"]["normal_max_flair_z"] == cutoff
        # The robust-normalised FLAIR baseline reads its own preparation: another scale, another threshold.
        z_row, robust_row = (run["methods"][m] for m in ("FLAIR z +med5+cc", "FLAIR robust +med5+cc"))
        assert robust_row["threshold"] != pytest.approx(z_row["threshold"], abs=1e-3)
    # Changing the test domain's labels changes its test metrics but no choice of its run.
    run_c1, run_c2 = first["runs"][2], second["runs"][2]
    for method in DOMAIN_STUDY_METHODS:
        assert run_c1["methods"][method]["threshold"] == run_c2["methods"][method]["threshold"], method
        assert run_c1["methods"][method].get("chosen") == run_c2["methods"][method].get("chosen"), method
    assert run_c1["methods"]["FLAIR z"]["pooled"]["auprc"] != run_c2["methods"]["FLAIR z"]["pooled"]["auprc"]
    # ... while site C's labels are validation data in the other runs.
    assert any(first["runs"][i]["methods"][m]["threshold"] != second["runs"][i]["methods"][m]["threshold"]
               for i in (0, 1) for m in DOMAIN_STUDY_METHODS)


def test_domain_summary_per_domain_and_pooled(domain_runs):
    root, first, _ = domain_runs
    assert list(first["domain_summary"]) == ["site A", "site B", "site C"]
    for summary in list(first["domain_summary"].values()) + [first["summary"]]:
        assert list(summary) == list(DOMAIN_STUDY_METHODS)
        for row in summary.values():
            assert set(row) == set(study.SUMMARY_METRICS)
            assert row["auprc"]["n"] == 1 and row["auprc"]["mean"] is not None  # one seed
    assert [p["seed"] for p in first["seed_pooled"]] == [0]
    # Pooled over the left-out cases: the pooled voxels of the three runs.
    pooled = first["seed_pooled"][0]["methods"]["FLAIR z"]["pooled"]
    assert pooled["n_voxels"] == sum(r["methods"]["FLAIR z"]["pooled"]["n_voxels"] for r in first["runs"])
    # The domains file's pool: the left-out cases of sites A and C only, each at its own run's threshold.
    assert first["pools"] == {"A and C": ["site A", "site C"]}
    runs_a_c = [r for r in first["runs"] if r["domain"] in ("site A", "site C")]
    for method in DOMAIN_STUDY_METHODS:
        in_pool = first["seed_pooled"][0]["pools"]["A and C"][method]
        assert in_pool["pooled"]["n_voxels"] == sum(r["methods"][method]["pooled"]["n_voxels"] for r in runs_a_c)
        positives = [r["methods"][method]["pooled"]["n_positive"] for r in runs_a_c]
        recalls = [r["methods"][method]["at_threshold"]["recall"] for r in runs_a_c]
        assert in_pool["at_threshold"]["recall"] == pytest.approx(
            sum(p * q for p, q in zip(positives, recalls)) / sum(positives)), method
        assert first["pool_summary"]["A and C"][method]["auprc"]["mean"] == in_pool["pooled"]["auprc"]
        assert first["pool_summary"]["A and C"][method]["auprc_threshold_relative"]["mean"] == \
            in_pool["threshold_relative"]["auprc"]
        # Within one run the shift changes no ranking, so a domain's block does not report it.
        assert all(first["domain_summary"][d][method]["auprc_threshold_relative"]["mean"] is None
                   for d in first["domain_summary"])
    assert first["singularity"] is None
    on_disk = json.loads((root / "out" / "study.json").read_text(encoding="utf-8"))
    assert on_disk["domain_summary"] == json.loads(json.dumps(first["domain_summary"]))


def test_report_with_in_domain_and_domain_sections(domain_runs, study_run, tmp_path):
    root, first, _ = domain_runs
    _, patient_out, _ = study_run
    docs = tmp_path / "docs"
    assert main(["study", "--report-only", str(patient_out), str(root / "out"), "--docs", str(docs)]) == 0
    text = (docs / "results.md").read_text(encoding="utf-8")
    assert "## In-domain: patient-level folds" in text and "## Leave-one-domain-out" in text
    for domain in ("site A", "site B", "site C"):
        assert f"### Test domain: {domain}" in text
    assert "### Pooled over all left-out test cases" in text
    assert "### Pooled: A and C (site A, site C; 3 case(s), each left out with its domain)" in text
    assert text.count("Verdict:") == 5 and "the raw ADM energy" in text
    pool_block = text.split("### Pooled: A and C")[1].split("### ")[0]
    assert "AUPRC, each run's scores minus its threshold" in pool_block
    domain_block = text.split("### Test domain: site A")[1].split("### ")[0]
    assert "minus its threshold" not in domain_block
    assert f"{first['summary']['ADM']['auprc']['mean']:.3f}" in text
    assert "pytest domains" in text
    # The study JSONs themselves (as docs/ keeps them) give the same report.
    from_files = tmp_path / "docs_files"
    assert main(["study", "--report-only", str(patient_out / "study.json"), str(root / "out" / "study.json"),
                 "--docs", str(from_files)]) == 0
    assert (from_files / "results.md").read_text(encoding="utf-8") == text
    # A domain study alone reports too.
    only = study.make_report(root / "out" / "study.json", tmp_path / "docs_only")
    assert "## Leave-one-domain-out" in only.read_text(encoding="utf-8")


def test_search_groups_spread_a_cap_over_each_group_and_keep_small_groups_whole():
    from types import SimpleNamespace
    from ADMAnomalyLib.study.runner import search_groups

    big = [SimpleNamespace(case_id=f"c{i:02d}") for i in range(12)]
    small = [SimpleNamespace(case_id="m")]
    capped = search_groups([list(reversed(big)), small], 4)
    assert [c.case_id for c in capped[0]] == ["c00", "c04", "c07", "c11"]
    assert [c.case_id for c in capped[1]] == ["m"]
    assert [len(g) for g in search_groups([big, small], None)] == [12, 1]


# -- leave-one-domain-out figures -------------------------------------------------------------------


def _synthetic_domain_study(methods, domains=("site A", "site B"), seeds=(0, 1)):
    """A study.json of the domain split with made-up numbers (the report only reads the JSON)."""
    rng = np.random.default_rng(0)

    def summary_row():
        def metric():
            values = rng.uniform(0.1, 0.9, len(seeds))
            return {"mean": float(values.mean()), "sd": float(values.std(ddof=1)) if len(seeds) > 1 else None,
                    "n": len(seeds)}
        return {k: metric() for k in study.SUMMARY_METRICS}

    def run(domain, seed):
        return {"domain": domain, "seed": seed, "test": [f"{domain}_0"],
                "train": [f"{d}_0" for d in domains if d != domain],
                "train_domains": [d for d in domains if d != domain],
                "methods": {m: {"threshold": 0.5, "per_case": []} for m in methods}}

    return {
        "split": "domains", "command": "pytest synthetic domains", "domains_file": "domains.json",
        "settings": {"name": "quick", "seeds": list(seeds), "preset": "tiny", "image_size": 32, "epochs_ctoc": 1,
                     "epochs_joint": 1, "lesion_margin": 1, "split": "domains"},
        "domains": {d: [f"{d}_0"] for d in domains},
        "machine": {"cpu_model": "test cpu", "cpu_count": 2, "device": "cpu", "torch": "x", "python": "3"},
        "git": {"commit": "0" * 40, "dirty": False}, "finished": "today", "runtime_s": 60.0,
        "methods": {m: {"group": "baseline" if m.startswith("FLAIR") else "improvement", "description": m,
                        "kind": "flair" if m.startswith("FLAIR") else "adm"} for m in methods},
        "domain_summary": {d: {m: summary_row() for m in methods} for d in domains},
        "summary": {m: summary_row() for m in methods},
        "runs": [run(d, seed) for seed in seeds for d in domains],
        "timings_s": {"train": 30.0, "evaluate": 30.0},
    }


def _report_from(study_dict, root):
    (root / "out").mkdir(parents=True)
    path = root / "out" / "study.json"
    path.write_text(json.dumps(study_dict), encoding="utf-8")
    docs = root / "docs"
    assert main(["study", "--report-only", str(root / "out"), "--docs", str(docs)]) == 0
    return docs, (docs / "results.md").read_text(encoding="utf-8")


def test_domain_report_draws_the_domain_figures_from_the_json(tmp_path):
    methods = ("FLAIR z", "FLAIR z +med3+cc", "FLAIR z +med5+cc", "ADM", "ADM +post", "ADM robust-norm",
               "ADM site-aug", "ADM unc", "ADM+", "ADM+ +post", "ADM+X", study.methods.BUNDLED_METHOD)
    docs, text = _report_from(_synthetic_domain_study(methods), tmp_path)
    for name in ("domains_auprc_dice.png", "domains_raw_vs_flair.png"):
        png = docs / "figures" / name
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
        assert f"](figures/{name})" in text, name
    section = text[text.index("## Leave-one-domain-out"):]
    assert section.index("domains_auprc_dice.png") < section.index("domains_raw_vs_flair.png")
    assert "error bars: sd over seeds" in section
    # Which methods each figure draws, in order (ADM+X is neither a key method nor a raw network).
    assert study.report._present_methods(study.report._domain_panels(_synthetic_domain_study(methods)),
                                         study.report.DOMAIN_KEY_METHODS) == [
        "FLAIR z +med3+cc", "FLAIR z +med5+cc", "FLAIR z", "ADM", "ADM +post", "ADM+", "ADM+ +post",
        study.methods.BUNDLED_METHOD]  # the bundled configuration is drawn whatever its name


def test_domain_figures_show_the_pools_and_name_the_bundled_row(tmp_path):
    """A pool of domains (the BraTS target's figure) gets its own group of bars between the domains and all test
    cases, and the caption names the bundled row, which the figure's colours do not single out."""
    methods = ("FLAIR z", "FLAIR z +med5+cc", study.methods.BUNDLED_METHOD)
    pooled = _synthetic_domain_study(methods)
    pooled["pools"] = {"both sites": ["site A", "site B"]}
    pooled["pool_summary"] = {"both sites": pooled["summary"]}
    assert [label for label, _ in study.report._domain_panels(pooled)] == ["site A", "site B", "pool: both sites",
                                                                         "pooled"]
    docs, text = _report_from(pooled, tmp_path)
    assert (docs / "figures" / "domains_auprc_dice.png").is_file()
    assert f"The bundled configuration is `{study.methods.BUNDLED_METHOD}`." in text
    assert "per left-out domain, per pool of domains and over all test cases" in text
    without = _synthetic_domain_study(methods[:2])
    assert [label for label, _ in study.report._domain_panels(without)] == ["site A", "site B", "pooled"]
    text = _report_from(without, tmp_path / "without")[1]
    assert "The bundled configuration is" not in text and "per pool of domains" not in text


def test_domain_figures_with_only_some_methods(tmp_path):
    # One seed (no sd), a value missing in one domain, and no raw network: the raw-energy figure is left out.
    partial = _synthetic_domain_study(("FLAIR z", "FLAIR z +med3+cc", "ADM +post"), seeds=(0,))
    partial["domain_summary"]["site B"]["FLAIR z +med3+cc"]["dice"] = {"mean": None, "sd": None, "n": 0}
    docs, text = _report_from(partial, tmp_path / "partial")
    assert (docs / "figures" / "domains_auprc_dice.png").is_file() and "domains_auprc_dice.png" in text
    assert not (docs / "figures" / "domains_raw_vs_flair.png").exists() and "domains_raw_vs_flair" not in text
    assert "error bars" not in text
    # Without any of the figures' methods the section still renders, without figures.
    other = _synthetic_domain_study(("Mahalanobis",))
    docs, text = _report_from(other, tmp_path / "other")
    assert "## Leave-one-domain-out" in text and "![" not in text


def test_quick_domain_setting_runs_the_domain_methods():
    assert study.quick_settings(split="domains").method_names() == list(study.DOMAIN_METHODS)
    assert study.quick_settings().method_names() == list(study.QUICK_METHODS)
    assert study.quick_settings(split="domains", methods=("ADM",)).method_names() == ["ADM"]
    # The patient folds train only the paper's networks and ADM+X: the transfer variants (networks
    # trained for other sites, flip and wider-CtoC rows included) belong to the domain split.
    in_domain_networks = {study.METHODS[name].network for name in study.DEFAULT_METHODS}
    assert in_domain_networks == {None, "ADM", "ADM_ct", "ADM_dr", "ADM_woj", "ADM+X"}


def test_left_out_runs_only_the_named_domains_and_trains_on_all_others(tmp_path):
    path = _make_domains(tmp_path)
    settings = dataclasses.replace(_domain_settings(), methods=("FLAIR z",), left_out=("site C",))
    result = study.run_study(None, tmp_path / "out", settings, domains_file=path)
    assert [r["domain"] for r in result["runs"]] == ["site C"]
    assert sorted(result["runs"][0]["train_domains"]) == ["site A", "site B"]
    assert list(result["domain_summary"]) == ["site C"]
    # Its pool also holds site A, which was not left out: a pool of part of its domains is not reported.
    assert result["pools"] == {} and result["pool_summary"] == {}
    # Its report has the left-out domain's block and says which were left out; it does not merge into
    # a study that left out every domain.
    docs, text = _report_from(json.loads(json.dumps(result)), tmp_path / "report")
    assert "2 of them left out" not in text and "3 domains, 1 of them left out (site C)" in text
    assert "### Test domain: site C" in text and "### Test domain: site A" not in text
    assert "Each domain left out in turn is the test set" in text
    partial = json.loads(json.dumps(result))
    full = copy.deepcopy(partial)
    full["domain_summary"] = {name: copy.deepcopy(partial["domain_summary"]["site C"]) for name in full["domains"]}
    for summary in (partial["summary"], partial["domain_summary"]["site C"]):
        summary["FLAIR z +med3+cc"] = summary["FLAIR z"]
    merged = study.report.merged_domain_summaries([full, partial])
    assert list(merged["summary"]) == ["FLAIR z"] and merged["domain_summary"] == full["domain_summary"]
    with pytest.raises(InputError, match="no domain 'site D'.*'site A'"):
        study.run_study(None, tmp_path / "bad", dataclasses.replace(settings, left_out=("site D",)), domains_file=path)
    assert not (tmp_path / "bad" / "study.json").exists()
    assert main(["study", "--domains", str(path), "--left-out", "site C, site D", "--methods", "FLAIR z",
                 "-o", str(tmp_path / "bad"), "--no-report", "--device", "cpu"]) == 2
    assert not (tmp_path / "bad" / "study.json").exists()


def test_a_new_network_takes_the_ctoc_of_a_cached_network_of_its_group(tmp_path, monkeypatch):
    path = _make_domains(tmp_path)
    out = tmp_path / "out"
    settings = dataclasses.replace(_domain_settings(), methods=("ADM",))
    study.run_study(None, out, settings, domains_file=path)
    cached = {p.name for p in (out / "networks").glob("*.admm")}
    assert len(cached) == 3  # one per left-out domain
    # An analysis beside the study finds each fold's network by the fold's training cases.
    record = json.loads((out / "study.json").read_text())["runs"][0]
    fold_network = study.runner.load_cached_network(out / "networks", "ADM", settings, record["seed"], record["train"])
    assert fold_network.config == study.network_config("ADM", settings, record["seed"])
    with pytest.raises(ModelFileError, match="not found"):
        study.runner.load_cached_network(out / "networks", "ADM", settings, record["seed"], record["train"][1:])

    def no_ctoc_training(*args, **kwargs):
        raise AssertionError("the shared CtoC was trained again")

    monkeypatch.setattr(study.runner.Trainer, "fit_ctoc", no_ctoc_training)
    study.run_study(None, out, dataclasses.replace(settings, methods=("ADM", "ADM+X")), domains_file=path)
    added = sorted(p for p in (out / "networks").glob("*.admm") if p.name not in cached)
    assert len(added) == 3
    shared = [ADMModel.load(p).network.ctoc.state_dict() for p in (out / "networks").glob("ADM-*.admm")]
    for new in added:
        ctoc = ADMModel.load(new).network.ctoc.state_dict()
        assert any(all(torch.equal(ctoc[k], other[k]) for k in ctoc) for other in shared)


def test_report_of_two_domain_studies_draws_the_figures_once(domain_runs, tmp_path):
    root, _, _ = domain_runs
    results = study.make_report([root / "out" / "study.json", root / "out2" / "study.json"], tmp_path)
    text = results.read_text(encoding="utf-8")
    assert text.count("## Leave-one-domain-out") == 2
    assert text.count("](figures/domains_auprc_dice.png)") == 1


def test_domain_figures_take_the_methods_of_every_domain_study(domain_runs):
    _, first, second = domain_runs
    only_first = copy.deepcopy(first)
    later = copy.deepcopy(second)
    added = next(iter(later["summary"]))
    later["summary"] = {"new row": later["summary"][added], added: {"auprc": {"mean": -1.0}}}
    for name in later["domain_summary"]:
        later["domain_summary"][name] = {"new row": later["domain_summary"][name][added]}
    merged = study.report.merged_domain_summaries([only_first, later])
    assert merged["summary"]["new row"] == second["summary"][added]  # a method only the later study has
    assert merged["summary"][added] == first["summary"][added]  # the first study's figures win
    assert all("new row" in merged["domain_summary"][name] for name in first["domains"])
    assert "new row" not in first["summary"]  # the inputs are left as they were
    other_domains = dict(later, domains=list(reversed(later["domains"])))
    assert "new row" not in study.report.merged_domain_summaries([only_first, other_domains])["summary"]
    larger = dict(later, settings={**later["settings"], "image_size": 2 * later["settings"]["image_size"]})
    assert "new row" not in study.report.merged_domain_summaries([only_first, larger])["summary"]


def test_the_transfer_profile_is_the_bundled_rows_configuration():
    from ADMAnomalyLib.config import PROFILES, TRAINING_SECTIONS

    spec = study.METHODS[study.methods.BUNDLED_METHOD]
    profile = PROFILES["transfer"]
    network = dict(study.NETWORKS[spec.network])
    if spec.native_bias_correction_levels:  # what the row's FLAIR term reads, not the networks' input
        network["preprocess"] = {**network.get("preprocess", {}),
                                 "native_bias_correction_levels": spec.native_bias_correction_levels}
    # Slices thicker than 2 mm are resampled at inference; the study's cases are all 1 mm, so no row reads it.
    trained = {k: dict(v) for k, v in profile.items() if k in TRAINING_SECTIONS}
    assert trained["preprocess"].pop("max_slice_mm") == 2.0
    assert trained == network
    # Fixed post-processing as the row fixes it; each searched field one of the row's candidates.
    for field, value in spec.postprocess.items():
        assert profile["postprocess"][field] == value, field
    for field in spec.search:
        assert profile["postprocess"][field] in study.methods.POST_CANDIDATES[field], field
    assert profile["postprocess"].get("load_weight", 0.0) in (spec.load_weights or (0.0,))
    # Small lesions keep the load term on their own slices: the study's cases (all 1 mm) score as the row does.
    assert profile["postprocess"]["small_lesion_load"] == "thin"
    # The T2 term, unsearched, weighted as the row ties it to the FLAIR weight.
    assert profile["postprocess"].get("t2_weight", 0.0) == (spec.t2_per_flair_weight
                                                            * profile["postprocess"]["flair_weight"])


def test_study_command_line_settings_reach_the_study(monkeypatch, tmp_path, capsys):
    from ADMAnomalyLib import api

    seen = {}
    monkeypatch.setattr(api, "study", lambda *args, **kwargs: seen.update(kwargs) or {"result": None, "report": None})
    domains = tmp_path / "domains.json"
    assert main(["study", "--domains", str(domains), "-o", str(tmp_path / "out"), "--no-report", "--image-size", "128",
                 "--search-cases", "12", "--epochs-ctoc", "16", "--folds", "3", "--synthetic-cases", "2"]) == 0
    assert seen["search_cases_per_group"] == 12 and seen["image_size"] == 128 and seen["epochs_ctoc"] == 16
    assert seen["synthetic_cases_per_domain"] == 2
    assert seen["n_folds"] == 3 and "epochs_joint" not in seen
    for flag, name in (("--search-cases", "cases"), ("--image-size", "image size"), ("--folds", "folds")):
        with pytest.raises(SystemExit):
            main(["study", "--domains", str(domains), flag, "0"])
        assert f"{name} must be a whole number >= 1" in capsys.readouterr().err


def test_held_out_rows_choose_on_networks_that_did_not_see_the_validation_domain(tmp_path, monkeypatch):
    """A held-out row's search, threshold and load weight read each training domain's energies from the
    network trained on the run's other training domains; its test cases are scored by the run's network."""
    from ADMAnomalyLib.study.runner import RunCaches, adm_method_scores, raw_energy

    path = _make_domains(tmp_path)
    out = tmp_path / "out"
    in_domain, held_out = "ADM+ F +asym +post+cc (z+load)", "ADM+ F +asym +post+cc (z+load) held-out"
    settings = dataclasses.replace(_domain_settings(), methods=(in_domain, held_out), left_out=("site C",))
    runs = []
    original = study.runner.score_held_out
    monkeypatch.setattr(study.runner, "score_held_out", lambda run, *a, **k: runs.append(run) or original(run, *a, **k))
    result = study.run_study(None, out, settings, domains_file=path)
    (run,), record = runs, result["runs"][0]
    by_domain = {d: [c for c in run.train_cases if c.domain == d] for d in ("site A", "site B")}
    # The run's network (sites A and B) and one per training domain left out: three networks.
    assert len(list((out / "networks").glob("*.admm"))) == 3
    assert set(record["held_out_slices"]) == {"site A", "site B"}
    options = InferenceOptions("cpu")
    for domain, other in (("site A", "site B"), ("site B", "site A")):
        inner = study.runner.load_cached_network(out / "networks", "ADM+ F", settings, 0,
                                                 [c.case_id for c in by_domain[other]])
        for case in by_domain[domain]:
            np.testing.assert_array_equal(run.held_out_raw["ADM+ F"][case.case_id],
                                          raw_energy(inner, case, options, None))
            assert not np.array_equal(run.held_out_raw["ADM+ F"][case.case_id], run.raw["ADM+ F"][case.case_id])
    assert set(run.held_out_raw["ADM+ F"]) == {c.case_id for c in run.train_cases}

    # The held-out row is the in-domain row but for where its training cases' energies come from.
    spec = study.METHODS[held_out]
    same_source = dataclasses.replace(run, caches=RunCaches(), held_out_raw={"ADM+ F": {
        c.case_id: run.raw["ADM+ F"][c.case_id] for c in run.train_cases}})
    scores, extra = adm_method_scores(spec, same_source)
    reference, reference_extra = adm_method_scores(study.METHODS[in_domain], dataclasses.replace(run, caches=RunCaches()))
    assert extra["chosen"] == reference_extra["chosen"] == record["methods"][in_domain]["chosen"]
    for case_id, values in reference.items():
        np.testing.assert_array_equal(scores[case_id], values)
    scores, extra = adm_method_scores(spec, dataclasses.replace(run, caches=RunCaches()))
    assert extra["chosen"] == record["methods"][held_out]["chosen"]
    assert any(not np.array_equal(scores[c.case_id], reference[c.case_id]) for c in run.train_cases)

    # It needs training domains to hold out: not in the patient split, not with one training domain.
    with pytest.raises(InputError, match="held-out rows .* need the domain split"):
        study.run_study(tmp_path / "a", tmp_path / "bad", study.quick_settings(methods=(held_out,)))
    with pytest.raises(InputError, match="at least two training domains"):
        original(dataclasses.replace(run, train_cases=by_domain["site A"]), ["ADM+ F"], {}, torch.device("cpu"), None)


def _benchmark(name: str):
    """The script ``benchmarks/<name>.py`` imported as a module (the benchmarks are not a package)."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location(name, Path(__file__).resolve().parents[2] / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_oracle_benchmark_runs_the_rows_search_on_the_test_domain(tmp_path):
    """benchmarks/oracle_postprocess.py: the row's search with the test domain's labels as criterion on
    the study's cached networks; greedy, so it never ends below the row's unsearched post-processing,
    and it reads the test labels (the study's choices never do)."""
    oracle = _benchmark("oracle_postprocess")
    path = _make_domains(tmp_path)
    row = "ADM+ F +asym +post+cc (z+load)"
    study.run_study(None, tmp_path / "out", dataclasses.replace(_domain_settings(), methods=(row,), left_out=("site C",)),
                    domains_file=path)
    (first,) = oracle.oracle_rows(tmp_path / "out", row)
    assert first["domain"] == "site C" and list(first["chosen"]) == list(study.METHODS[row].search)
    assert first["auprc"] >= first["start_auprc"] - 1e-12 and 0 < first["best_dice"] <= 1
    assert first["study"] is not None and 0 < first["study"]["auprc"] <= 1
    _mirror_labels(tmp_path / "c" / "c_0")
    (moved,) = oracle.oracle_rows(tmp_path / "out", row)
    assert moved["auprc"] != pytest.approx(first["auprc"], abs=1e-6)
    with pytest.raises(ValueError, match="not an ADM row"):
        oracle.oracle_rows(tmp_path / "out", "FLAIR z +med5+cc")


def test_the_energy_asymmetry_benchmark_adds_the_products_term_to_the_folds_choice(tmp_path):
    """benchmarks/energy_asymmetry.py: on a study's cached networks, 'E + u A(E)' is the fold's chosen
    post-processing with the product's energy_asymmetry_weight = u (u = 0 is the row as chosen),
    beside E replaced by A(E) and the raw scores."""
    bench = _benchmark("energy_asymmetry")
    path = _make_domains(tmp_path)
    row = "ADM+ F +asym +post+cc (z+load)"
    study.run_study(None, tmp_path / "out", dataclasses.replace(_domain_settings(), methods=(row,), left_out=("site C",)),
                    domains_file=path)
    _mirror_labels(tmp_path / "c" / "c_0")  # the synthetic lesions are found perfectly: no figure could move
    rows = {r["score"]: r for r in bench.energy_asymmetry_rows(tmp_path / "out", row, weights=(0.0, 1.0))}
    assert list(rows) == ["raw E", "raw A(E), 5 mm", "the row as the fold chose it", "the row, E -> A(E) (5 mm)",
                          "the row, E + 0 A(E) (5 mm)", "the row, E + 1 A(E) (5 mm)"]
    assert {r["domain"] for r in rows.values()} == {"site C"}
    assert all(0 < r["auprc"] < 1 and 0 < r["best_dice"] < 1 for r in rows.values())
    assert rows["the row, E + 0 A(E) (5 mm)"]["auprc"] == rows["the row as the fold chose it"]["auprc"]
    assert rows["the row, E + 1 A(E) (5 mm)"]["auprc"] != rows["the row as the fold chose it"]["auprc"]
    assert rows["raw A(E), 5 mm"]["auprc"] != rows["raw E"]["auprc"]


def test_the_pool_benchmark_weighs_each_domain_by_its_share_of_the_pools_lesion_voxels():
    """benchmarks/pool_bound.py: the lesion-weighted mean of a pool's domains' AUPRCs, and what the last
    domain would need for it to reach the target, from a study JSON alone."""
    bench = _benchmark("pool_bound")

    def run(domain, positives):
        return {"domain": domain, "methods": {"R +post": {"per_case": [{"n_positive": n} for n in positives]}}}

    summary = {"A": {"R +post": {"auprc": {"mean": 0.9}}, "FLAIR z": {"auprc": {"mean": 0.5}}},
               "B": {"R +post": {"auprc": {"mean": 0.6}}, "FLAIR z": {"auprc": {"mean": 0.5}}}}
    study_json = {"runs": [run("A", [100, 200]), run("B", [100])], "pools": {"AB": ["A", "B"]},
                  "domain_summary": summary,
                  "pool_summary": {"AB": {"R +post": {"auprc": {"mean": 0.8}}, "FLAIR z": {"auprc": {"mean": 0.5}}}}}
    (row,) = bench.pool_rows(study_json, target=0.9)  # rows without 'post' are left out by default
    assert row["shares"] == pytest.approx([0.75, 0.25])
    assert row["weighted"] == pytest.approx(0.75 * 0.9 + 0.25 * 0.6)
    assert row["pool_auprc"] == 0.8 and row["pool_auprc_relative"] is None  # a study from before it was recorded
    assert row["needed"] == pytest.approx(0.9)  # A already at 0.9: B must reach it too
    (row,) = bench.pool_rows(study_json, target=0.8, rows=["FLAIR z", "not run"])
    assert row["row"] == "FLAIR z" and row["needed"] == pytest.approx((0.8 - 0.75 * 0.5) / 0.25)
    # The strong baseline (a '+med' row) is printed beside the ADM rows by default.
    for summary_of in (*summary.values(), study_json["pool_summary"]["AB"]):
        summary_of["FLAIR z +med5+cc"] = {"auprc": {"mean": 0.7}}
    assert [r["row"] for r in bench.pool_rows(study_json, target=0.9)] == ["R +post", "FLAIR z +med5+cc"]
    study_json["pool_summary"]["AB"]["R +post"]["auprc_threshold_relative"] = {"mean": 0.85}
    assert bench.pool_rows(study_json, target=0.9)[0]["pool_auprc_relative"] == 0.85


def test_pooled_runs_on_different_scales_meet_at_their_thresholds():
    """Two runs that rank their own voxels perfectly but score on scales 10 apart: the raw pool ranks one run's
    normal tissue above the other's lesions; shifted to their own thresholds, the pool ranks perfectly again,
    and the pooled Dice at threshold is a point of that curve."""
    from ADMAnomalyLib.study.runner import pooled_test_metrics

    rng = np.random.default_rng(0)
    labels = rng.random(4000) < 0.1
    scores = np.where(labels, rng.uniform(0.6, 1.0, labels.size), rng.uniform(0.0, 0.4, labels.size))
    pooled = pooled_test_metrics([(scores.astype(np.float32), labels, 0.5),
                                  ((scores + 10).astype(np.float32), labels, 10.5)])
    assert pooled["pooled"]["auprc"] < 0.7
    assert pooled["threshold_relative"]["auprc"] == pytest.approx(1.0)
    assert pooled["at_threshold"]["dice"] == pytest.approx(1.0)
    assert pooled["threshold_relative"]["best_f1"] >= pooled["at_threshold"]["dice"] - 1e-9
    # A '+cc' row's pooled Dice reads each case's anomaly label (its small regions left out), as predict writes it.
    above = scores >= 0.5
    speckled = above | (np.arange(labels.size) == np.flatnonzero(~labels)[0])  # one false voxel in the label
    with_label = pooled_test_metrics([(scores.astype(np.float32), labels, 0.5, speckled),
                                      ((scores + 10).astype(np.float32), labels, 10.5, above)])
    assert with_label["pooled"] == pooled["pooled"]
    assert with_label["at_threshold"]["precision"] < 1.0 == pooled["at_threshold"]["precision"]


def test_the_seed_table_takes_each_seed_and_domain_from_the_first_study_that_ran_it():
    """benchmarks/seed_table.py: rows of one seed spread over two JSONs, a second seed in a third; a pool's cell
    carries the threshold-relative AUPRC where the study recorded it; mean +- sd over the seeds found."""
    bench = _benchmark("seed_table")

    def result(auprc, dice, relative=None):
        # Every field the study's own summary reads (runner.summarise), as a study JSON holds them.
        return {"pooled": {"auroc": 0.99, "auprc": auprc, "best_f1": dice + 0.01},
                "at_threshold": {"dice": dice, "precision": dice, "recall": dice},
                **({"threshold_relative": {"auprc": relative}} if relative is not None else {})}

    def run(seed, domain, row, auprc, dice):
        return {"seed": seed, "domain": domain, "methods": {row: result(auprc, dice)}}

    def pooled(seed, row, auprc, dice, relative=None):
        return {"seed": seed, "pools": {"P": {row: result(auprc, dice, relative)}}}

    first = {"runs": [run(0, "A", "R", 0.8, 0.7)], "seed_pooled": [pooled(0, "R", 0.75, 0.65)]}
    shadowed = {"runs": [run(0, "A", "R", 0.1, 0.1), run(0, "B", "R", 0.6, 0.5)]}
    second_seed = {"runs": [run(1, "A", "R", 0.9, 0.8)], "seed_pooled": [pooled(1, "R", 0.85, 0.75, relative=0.88)]}
    found = bench.gather([first, shadowed, second_seed], ["R"])
    assert found["R", "A"] == {0: result(0.8, 0.7), 1: result(0.9, 0.8)}
    assert found["R", "B"] == {0: result(0.6, 0.5)}
    lines = bench.table([first, shadowed, second_seed], ["R", "not run"])
    assert lines[0] == "| row | domain | seed 0 | seed 1 | mean ± sd AUPRC | mean ± sd Dice |"
    assert lines[2] == "| R | A | 0.800 / 0.700 | 0.900 / 0.800 | 0.850 ± 0.071 | 0.750 ± 0.071 |"
    assert lines[3] == "| R | pool: P | 0.750 / 0.650 | 0.850 (0.880) / 0.750 | 0.800 ± 0.071 | 0.700 ± 0.071 |"
    assert lines[4] == "| R | B | 0.600 / 0.500 | – | 0.600 | 0.500 |"
    assert len(lines) == 5
    lines = bench.metrics_table([first, shadowed, second_seed], ["R"], {"R": "the row"})
    assert lines[0] == "| left-out domain | method | AUPRC | AUROC | best Dice | Dice at threshold | seeds |"
    assert lines[2] == "| A | the row | 0.850 ± 0.071 | 0.990 ± 0.000 | 0.760 ± 0.071 | 0.750 ± 0.071 | 0, 1 |"
    assert lines[3] == "| pool: P | the row | 0.800 ± 0.071 | 0.990 ± 0.000 | 0.710 ± 0.071 | 0.700 ± 0.071 | 0, 1 |"
    assert lines[4] == "| B | the row | 0.600 | 0.990 | 0.510 | 0.500 | 0 |"
    assert len(lines) == 5
