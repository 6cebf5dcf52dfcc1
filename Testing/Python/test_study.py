"""The evaluation study (patient-level folds, methods, JSON, figures, report) and the beyond-the-paper
options (density intensities, post-processing) on synthetic cases with the tiny preset."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from ADMAnomalyLib import study
from ADMAnomalyLib.cli import main
from ADMAnomalyLib.config import ADMConfig, PostprocessConfig, preset
from ADMAnomalyLib.errors import InputError
from ADMAnomalyLib.gmm import GMMAccumulator
from ADMAnomalyLib.infer import InferenceOptions, energy_slices
from ADMAnomalyLib.postprocess import postprocess_scores as postprocess_array
from ADMAnomalyLib.model import ADMModel
from ADMAnomalyLib.networks import ADMNetwork
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
    config = preset("small", model={"density_intensities": True},
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
    config = preset("tiny", model={"density_intensities": True})
    network = ADMNetwork(config.model).eval()
    x, b = torch.from_numpy(images), torch.from_numpy(brain)
    z, _ = network.features(x, b)
    assert z.shape[1] == config.model.feature_dim == 11
    assert torch.equal(z[:, -4:], x)


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
    from ADMAnomalyLib.study.runner import RunCaches, _postprocessed, raw_energy

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
                                lambda c: c.prepared.native_zscored["flair"], RunCaches(), "ADM")
    model.config.postprocess = post
    product_post = sitk.GetArrayFromImage(api.predict(model, images, device="cpu").energy)
    np.testing.assert_array_equal(study_post[case.case_id], product_post[case.brain])
    assert not np.allclose(study_post[case.case_id], study_energy)
