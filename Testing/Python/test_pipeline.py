"""End-to-end engine tests: training (tiny preset, CPU), resume, inference, evaluation, CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from ADMAnomalyLib import api
from ADMAnomalyLib.cli import main
from ADMAnomalyLib.config import preset
from ADMAnomalyLib.demo import demo_case_dir
from ADMAnomalyLib.errors import CancelledError, DeviceError, InputError, OutputError, TrainingDataError
from ADMAnomalyLib.evaluate import evaluate
from ADMAnomalyLib.train import checkpoint_path_for
from ADMAnomalyLib.postprocess import LOAD_WEIGHTS
from conftest import make_synthetic_case


def tiny_config(**train):
    return preset("tiny", train={"epochs_ctoc": 2, "epochs_joint": 2, "lesion_margin": 1, **train})


# ``cohort`` and ``trained_model`` (a tiny model trained on it) are session fixtures in conftest.py.


def weights(model) -> dict[str, torch.Tensor]:
    return {name: value.clone() for name, value in model.network.state_dict().items()}


def test_trained_model_file_is_complete(trained_model):
    model = api.load_model(trained_model)
    assert model.threshold is not None and np.isfinite(model.threshold)
    assert model.metadata["validation"]["source"] == "lesion slices"
    assert model.metadata["training_data"]["train_slices"] > 0
    assert not checkpoint_path_for(trained_model).exists(), "checkpoint must be removed after success"


def test_prediction_keeps_grid_and_background_below_brain(trained_model, cohort):
    case_dir = cohort / "synth_0"
    flair = sitk.ReadImage(str(next(case_dir.glob("*_flair.nii.gz"))))
    images = {name: sitk.ReadImage(str(next(case_dir.glob(f"*_{suffix}.nii.gz"))))
              for name, suffix in (("flair", "flair"), ("t1", "t1"), ("t1c", "t1ce"), ("t2", "t2"))}
    prediction = api.predict(trained_model, images, device="cpu")
    energy = prediction.energy
    assert energy.GetSize() == flair.GetSize()
    assert energy.GetSpacing() == flair.GetSpacing()
    assert energy.GetOrigin() == flair.GetOrigin()
    assert energy.GetDirection() == flair.GetDirection()
    values = sitk.GetArrayFromImage(energy)
    brain = sitk.GetArrayFromImage(prediction.brain_mask) > 0
    assert np.isfinite(values).all()
    assert values[~brain].max() < values[brain].min()
    anomaly = sitk.GetArrayFromImage(prediction.anomaly())
    assert set(np.unique(anomaly)) <= {0, 1}
    assert not anomaly[~brain].any()


def test_cancel_then_resume_equals_uninterrupted_run(cohort, tmp_path):
    reference = api.train(cohort, tmp_path / "a.admm", tiny_config(), device="cpu", show_progress_bar=False)
    interrupted = tmp_path / "b.admm"
    checkpoint = checkpoint_path_for(interrupted)
    # Cancel as soon as the first epoch's checkpoint exists, i.e. in the middle of training.
    with pytest.raises(CancelledError):
        api.train(cohort, interrupted, tiny_config(), device="cpu", show_progress_bar=False,
                  should_cancel=checkpoint.exists)
    assert checkpoint.exists() and not interrupted.exists()
    with pytest.raises(OutputError, match="resume"):
        api.train(cohort, interrupted, tiny_config(), device="cpu", show_progress_bar=False)
    resumed = api.train(cohort, interrupted, tiny_config(), device="cpu", resume=True, show_progress_bar=False)
    expected, actual = weights(reference), weights(resumed)
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], rtol=0, atol=0, msg=name)
    assert resumed.threshold == pytest.approx(reference.threshold)


def test_resume_with_other_settings_is_refused(cohort, tmp_path):
    output = tmp_path / "c.admm"
    checkpoint = checkpoint_path_for(output)
    with pytest.raises(CancelledError):
        api.train(cohort, output, tiny_config(), device="cpu", show_progress_bar=False, should_cancel=checkpoint.exists)
    with pytest.raises(InputError, match="different configuration"):
        api.train(cohort, output, tiny_config(seed=7), device="cpu", resume=True, show_progress_bar=False)


def test_training_without_any_lesion_free_slice_fails_clearly(tmp_path):
    make_synthetic_case(tmp_path, case_id="synth_x", seed=3)
    config = preset("tiny", train={"lesion_margin": 1000})
    with pytest.raises(TrainingDataError, match="lesion-free"):
        api.train(tmp_path, tmp_path / "m.admm", config, device="cpu", show_progress_bar=False)
    assert not (tmp_path / "m.admm").exists()


def test_evaluate_reports_adm_and_flair_baseline(trained_model, cohort):
    report = evaluate(api.load_model(trained_model), cohort, options=api.InferenceOptions("cpu"))
    assert set(report["methods"]) == {"ADM", "FLAIR z-score"}
    # Even the tiny model (2 + 2 epochs) finds the planted lesion far above chance (0.987 / 0.544 when
    # written; chance AUPRC is the lesion fraction of these slices, a few per cent).
    adm = report["methods"]["ADM"]["pooled"]
    assert adm["auroc"] > 0.9 and adm["auprc"] > 0.25
    # The synthetic lesion is bright in FLAIR: the trivial baseline must see it.
    assert report["methods"]["FLAIR z-score"]["pooled"]["auroc"] > 0.9


def test_cli_predict_writes_outputs_and_skips_done_cases(trained_model, cohort, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["predict", str(trained_model), str(cohort), "-o", str(out), "--device", "cpu", "--progress", "none"]) == 0
    written = sorted(p.name for p in out.glob("*.nii.gz"))
    assert written == ["synth_0_anomaly.nii.gz", "synth_0_energy.nii.gz", "synth_1_anomaly.nii.gz", "synth_1_energy.nii.gz"]
    assert not list(out.glob(".tmp*")), "no temporary file may be left behind"
    before = (out / "synth_0_energy.nii.gz").stat().st_mtime_ns
    assert main(["predict", str(trained_model), str(cohort), "-o", str(out), "--device", "cpu", "--progress", "json"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert lines[-1]["stage"] == "done" and sorted(lines[-1]["skipped"]) == ["synth_0", "synth_1"]
    assert (out / "synth_0_energy.nii.gz").stat().st_mtime_ns == before


def test_the_label_leaves_out_small_regions_at_every_threshold_and_the_energy_keeps_them(trained_model, cohort, tmp_path,
                                                                                         caplog):
    """postprocess.min_component_mm3: predict's label leaves out smaller regions, its energy map does not; a
    label-only setting keeps the model's threshold; re-thresholding the folder leaves them out again."""
    from ADMAnomalyLib.postprocess import anomaly_label, component_voxels
    from ADMAnomalyLib.results import brain_of_energy

    case_dir, plain, cleaned = cohort / "synth_0", tmp_path / "plain", tmp_path / "cleaned"
    run = ["--device", "cpu", "--progress", "none"]
    assert main(["predict", str(trained_model), str(case_dir), "-o", str(plain), *run]) == 0
    # No --threshold needed: the setting changes the label, not the energy the threshold was chosen on.
    assert main(["predict", str(trained_model), str(case_dir), "-o", str(cleaned), *run,
                 "--set", "postprocess.min_component_mm3=30"]) == 0
    read = lambda folder, name: sitk.ReadImage(str(folder / f"synth_0_{name}.nii.gz"))  # noqa: E731
    energy_image = read(cleaned, "energy")
    energy = sitk.GetArrayFromImage(energy_image)
    np.testing.assert_array_equal(energy, sitk.GetArrayFromImage(read(plain, "energy")))
    assert json.loads((cleaned / "report.json").read_text(encoding="utf-8"))["min_component_mm3"] == 30
    brain = brain_of_energy(energy)
    # A low threshold, where the energy breaks up into specks: the folder's re-threshold leaves them out too.
    low = float(np.quantile(energy[brain], 0.8))
    assert main(["threshold", str(cleaned), "--threshold", repr(low), "--progress", "none"]) == 0
    label = sitk.GetArrayFromImage(read(cleaned, "anomaly")) > 0
    minimum = component_voxels(30, energy_image.GetSpacing())
    assert minimum > 1
    np.testing.assert_array_equal(label, anomaly_label(energy, brain, low, minimum))
    assert 0 < label.sum() < ((energy >= low) & brain).sum()
    assert main(["threshold", str(plain), "--threshold", repr(low), "--progress", "none"]) == 0
    np.testing.assert_array_equal(sitk.GetArrayFromImage(read(plain, "anomaly")) > 0, (energy >= low) & brain)
    # A report that cannot be read leaves the regions in, and says so.
    from ADMAnomalyLib.results import folder_min_component_mm3

    (cleaned / "report.json").write_text("{not json", encoding="utf-8")
    with caplog.at_level("WARNING"):
        assert folder_min_component_mm3(cleaned) == 0.0
    assert "report.json" in caplog.text
    assert folder_min_component_mm3(tmp_path / "nowhere") == 0.0


def test_cli_predict_partial_failure_keeps_going(trained_model, cohort, tmp_path, capsys):
    data = tmp_path / "data"
    make_synthetic_case(data, case_id="good", seed=1)
    broken = make_synthetic_case(data, case_id="broken", seed=2)
    next(broken.glob("*_t2.nii.gz")).write_bytes(b"not an image")
    code = main(["predict", str(trained_model), str(data), "-o", str(tmp_path / "out"), "--device", "cpu",
                 "--progress", "none"])
    assert code == 6
    assert (tmp_path / "out" / "good_energy.nii.gz").exists()
    assert "broken" in (tmp_path / "out" / "errors.log").read_text(encoding="utf-8")
    assert "broken" in capsys.readouterr().err


@pytest.mark.parametrize("content", [b"", b"\x89PNG\r\n\x1a\nnot a model"])
def test_cli_bad_model_file_exit_code(content, cohort, tmp_path, capsys):
    model = tmp_path / "bad.admm"
    model.write_bytes(content)
    assert main(["predict", str(model), str(cohort), "-o", str(tmp_path / "o")]) == 3
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "bad.admm" in err[0]


def test_cli_unwritable_output_exit_code(trained_model, cohort, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert main(["predict", str(trained_model), str(cohort), "-o", str(blocker / "sub")]) == 4


def test_cli_gpu_requested_without_gpu(trained_model, cohort, tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["predict", str(trained_model), str(cohort), "-o", str(tmp_path / "o"), "--device", "cuda"]) == 5
    with pytest.raises(DeviceError):
        api.resolve_device("cuda")


@pytest.mark.parametrize("command", [[], ["train"], ["predict"], ["evaluate"], ["demo"], ["info"]])
def test_cli_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([*command, "--help"])
    assert exit_info.value.code == 0
    assert "usage: admanomaly" in capsys.readouterr().out


def test_cli_train_and_info(cohort, tmp_path, capsys):
    output = tmp_path / "cli.admm"
    code = main(["train", str(cohort), "-o", str(output), "--preset", "tiny", "--epochs-ctoc", "1",
                 "--epochs-joint", "1", "--lesion-margin", "1", "--device", "cpu", "--progress", "json",
                 "--set", "model.n_components=3"])
    assert code == 0
    events = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert events[-1] == {"stage": "done", "model": str(output)}
    assert main(["info", str(output)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["config"]["model"]["n_components"] == 3
    assert info["training_command"].startswith("admanomaly train")


def test_cli_train_on_folder_without_cases(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["train", str(tmp_path / "empty"), "-o", str(tmp_path / "m.admm"), "--preset", "tiny"]) == 2
    assert capsys.readouterr().err.startswith("error:")


def test_short_real_training_run_on_brats(brats_dir, tmp_path):
    """Tiny preset on two real BraTS cases at 32x32, then inference and evaluation on a third."""
    cases = api.find_cases(brats_dir)
    assert len(cases) >= 3
    config = preset("tiny", train={"epochs_ctoc": 1, "epochs_joint": 1, "batch_size": 16})
    model = api.train(cases[:2], tmp_path / "real.admm", config, device="cpu", show_progress_bar=False)
    assert model.metadata["validation"]["source"] == "lesion slices"
    test_dir = tmp_path / "test_case"
    test_dir.mkdir()
    for path in cases[2].contrasts.values():
        (test_dir / path.name).symlink_to(path)
    (test_dir / cases[2].label.name).symlink_to(cases[2].label)
    report = evaluate(api.load_model(tmp_path / "real.admm"), test_dir, options=api.InferenceOptions("cpu"))
    pooled = report["methods"]["ADM"]["pooled"]
    assert np.isfinite(pooled["auroc"]) and pooled["auroc"] > 0.5


def test_cli_demo_runs_the_bundled_model_on_the_bundled_case(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "-o", str(out), "--device", "cpu"]) == 0
    names = sorted(p.name for p in out.iterdir())
    assert names == ["patient26_anomaly.nii.gz", "patient26_energy.nii.gz", "patient26_metrics.json",
                     "patient26_overlay.png"]
    metrics = json.loads((out / "patient26_metrics.json").read_text(encoding="utf-8"))
    # The bundled model finds the MS lesions of a site it never saw (0.95 when it was bundled).
    assert metrics["auroc"] > 0.9
    energy = sitk.ReadImage(str(out / "patient26_energy.nii.gz"))
    flair = sitk.ReadImage(str(next(demo_case_dir().rglob("*_flair.nii.gz"))))
    for attribute in ("GetSize", "GetOrigin", "GetSpacing", "GetDirection"):
        assert getattr(energy, attribute)() == getattr(flair, attribute)()
    # A picture large enough to read: four slices with a colour bar and a legend, in colour.
    picture = sitk.ReadImage(str(out / "patient26_overlay.png"))
    width, height = picture.GetSize()
    assert width >= 1600 and height >= 500 and picture.GetNumberOfComponentsPerPixel() >= 3
    assert "slice" in capsys.readouterr().err  # the demo shows slice progress while it runs


def test_overlay_slices_show_hits_misses_and_false_positives():
    from ADMAnomalyLib.figures import _telling_slices

    reference = np.zeros((40, 8, 8), dtype=bool)
    detected = np.zeros_like(reference)
    reference[10, 2:6, 2:6] = True      # a lesion found
    detected[10, 2:6, 2:6] = True
    reference[20, 1:7, 1:7] = True      # a larger lesion missed
    detected[30, 0:3, 0:3] = True       # a false positive
    chosen = dict(_telling_slices(detected, reference, np.ones_like(reference), 4))
    assert chosen[10].startswith("most lesion detected") and chosen[20].startswith("most lesion missed")
    assert chosen[30].startswith("most false positive") and len(chosen) == 3


def test_cli_demo_with_a_model_without_threshold(trained_model, tmp_path, monkeypatch, capsys):
    model = api.load_model(trained_model)
    model.threshold = None
    path = model.save(tmp_path / "no_threshold.admm")
    monkeypatch.setenv("ADMANOMALY_MODEL", str(path))
    assert main(["demo", "-o", str(tmp_path / "demo"), "--device", "cpu"]) == 3
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no threshold" in err[0]
    assert not list((tmp_path / "demo").glob("*.nii.gz"))


def test_training_with_post_processing_chooses_the_threshold_on_post_processed_energies(cohort, tmp_path):
    # Every entry point (API, CLI, Slicer) trains through api.train, so the calibration lives there.
    config = tiny_config(epochs_ctoc=1, epochs_joint=1)
    config.postprocess.smoothing_sigma_mm = 2.0
    config.postprocess.rim_erosion_mm = 2.0
    model = api.train(cohort, tmp_path / "post.admm", config, device="cpu", show_progress_bar=False)
    validation = model.metadata["validation"]
    assert validation["source"] == "lesion slices, native grid, post-processed energies"
    assert model.threshold == pytest.approx(validation["best_threshold"])
    assert api.load_model(tmp_path / "post.admm").threshold == model.threshold


def test_config_section_typos_and_malformed_gpu_names_are_clear_errors(monkeypatch):
    from ADMAnomalyLib.config import ADMConfig

    with pytest.raises(ValueError, match="section.*trian"):
        ADMConfig.from_dict({"trian": {"epochs_ctoc": 3}})
    with pytest.raises(ValueError, match="trian"):
        preset("small", trian={"epochs_ctoc": 3})
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(DeviceError, match="cuda:x"):
        api.resolve_device("cuda:x")


def test_parallel_prediction_refuses_an_unsaved_model(trained_model, cohort, tmp_path):
    model = api.load_model(trained_model)
    model.path = None  # as after api.train(...) in memory without a file
    with pytest.raises(InputError, match="workers"):
        api.predict_folder(model, cohort, tmp_path / "out", device="cpu", workers=2)


def test_demo_case_does_not_follow_the_model_override(trained_model, monkeypatch):
    before = demo_case_dir()
    monkeypatch.setenv("ADMANOMALY_MODEL", str(trained_model))
    assert api.default_model_path() == trained_model
    assert demo_case_dir() == before and before.is_dir()


def test_predict_and_evaluate_try_other_post_processing_without_retraining(trained_model, cohort, tmp_path, capsys):
    case_dir = cohort / "synth_0"
    plain, smoothed = tmp_path / "plain", tmp_path / "smoothed"
    assert main(["predict", str(trained_model), str(case_dir), "-o", str(plain), "--device", "cpu",
                 "--progress", "none"]) == 0
    setting = ["--set", "postprocess.smoothing_sigma_mm=2"]
    # The stored threshold belongs to the model's own post-processing: another one needs a threshold.
    assert main(["predict", str(trained_model), str(case_dir), "-o", str(smoothed), "--device", "cpu", *setting]) == 2
    assert "threshold" in capsys.readouterr().err
    assert main(["predict", str(trained_model), str(case_dir), "-o", str(smoothed), "--device", "cpu",
                 "--progress", "none", "--threshold", "1.0", *setting]) == 0
    a = sitk.GetArrayFromImage(sitk.ReadImage(str(plain / "synth_0_energy.nii.gz")))
    b = sitk.GetArrayFromImage(sitk.ReadImage(str(smoothed / "synth_0_energy.nii.gz")))
    assert a.shape == b.shape and not np.allclose(a, b)
    from ADMAnomalyLib.results import read_table

    assert read_table(smoothed)["synth_0"].model.endswith("+smoothing_sigma_mm=2")
    report_path = tmp_path / "evaluation.json"
    assert main(["evaluate", str(trained_model), str(cohort), "--device", "cpu", "--json", str(report_path),
                 *setting]) == 0
    report = json.loads(report_path.read_text(encoding="utf-8"))
    assert report["postprocess_overrides"] == {"smoothing_sigma_mm": 2}
    assert report["methods"]["ADM"]["pooled"]["auprc"] is not None
    assert main(["predict", str(trained_model), str(case_dir), "-o", str(smoothed), "--set", "train.seed=1"]) == 2
    assert main(["evaluate", str(trained_model), str(cohort), "--set", "postprocess.no_such_step=1"]) == 2
    # The FLAIR the post-processing reads may be bias-corrected without retraining; the network input may not change.
    flair_term = ["--threshold", "1.0", "--set", "postprocess.flair_weight=1"]
    outputs = {}
    for name, extra in (("term", []), ("n4", ["--set", "preprocess.native_bias_correction_levels=2"])):
        assert main(["predict", str(trained_model), str(case_dir), "-o", str(tmp_path / name), "--device", "cpu",
                     "--progress", "none", *flair_term, *extra]) == 0
        outputs[name] = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / name / "synth_0_energy.nii.gz")))
    assert not np.allclose(outputs["term"], outputs["n4"])
    for shaping_the_input in ("preprocess.image_size=64", "preprocess.bias_correction_levels=2"):
        capsys.readouterr()
        assert main(["predict", str(trained_model), str(case_dir), "-o", str(tmp_path / "x"), *flair_term,
                     "--set", shaping_the_input]) == 2
        assert shaping_the_input.split("=")[0] in capsys.readouterr().err


def test_training_settings_are_mapped_once(tmp_path):
    config = api.training_config("tiny", epochs_ctoc=3, components=4, lesion_margin=2,
                                 settings=["model.use_dr=false", "postprocess.flip_tta=true"])
    assert (config.train.epochs_ctoc, config.model.n_components, config.train.lesion_margin) == (3, 4, 2)
    assert config.model.use_dr is False and config.postprocess.flip_tta is True
    with pytest.raises(InputError, match="invalid configuration"):
        api.training_config("tiny", settings=["train.precision=fp16"])
    with pytest.raises(InputError, match="SECTION.FIELD=VALUE"):
        api.training_config("tiny", settings=["nonsense"])


def test_train_on_a_domains_file_uses_every_domain_with_its_own_layout(tmp_path):
    make_synthetic_case(tmp_path / "site_a", "a_1", seed=1)
    make_synthetic_case(tmp_path / "site_a", "a_2", seed=2)
    make_synthetic_case(tmp_path / "ms", "p7", naming="ms", seed=3)
    domains = tmp_path / "domains.json"
    domains.write_text(json.dumps({"site A": {"folder": "site_a"}, "MS": {"folder": "ms", "pattern": "open_ms"}}),
                       encoding="utf-8")
    model = api.train(domains, tmp_path / "m.admm", tiny_config(), device="cpu", show_progress_bar=False)
    assert model.metadata["training_data"]["cases"] == ["a_1", "a_2", "p7"]
    assert main(["train", str(domains), "-o", str(tmp_path / "cli.admm"), "--preset", "tiny", "--epochs-ctoc", "1",
                 "--epochs-joint", "1", "--lesion-margin", "1", "--device", "cpu", "--progress", "none"]) == 0


def test_evaluate_accepts_a_domains_file_and_refuses_a_pattern_beside_it(trained_model, cohort, tmp_path):
    domains = tmp_path / "domains.json"
    domains.write_text(json.dumps({"cohort": {"folder": str(cohort)}}), encoding="utf-8")
    by_file = evaluate(api.load_model(trained_model), domains, options=api.InferenceOptions("cpu"))
    by_folder = evaluate(api.load_model(trained_model), cohort, options=api.InferenceOptions("cpu"))
    assert by_file["methods"]["ADM"]["pooled"] == by_folder["methods"]["ADM"]["pooled"]
    with pytest.raises(InputError, match="drop --pattern"):
        evaluate(api.load_model(trained_model), domains, options=api.InferenceOptions("cpu"), pattern={"flair": "F*"})


def test_calibrate_rechooses_the_threshold_for_other_post_processing(trained_model, cohort, tmp_path, capsys):
    out = tmp_path / "calibrated.admm"
    assert main(["calibrate", str(trained_model), str(cohort), "-o", str(out), "--device", "cpu",
                 "--set", "postprocess.smoothing_sigma_mm=2", "--set", "postprocess.standardise=zscore"]) == 0
    assert "threshold" in capsys.readouterr().out
    calibrated, original = api.load_model(out), api.load_model(trained_model)
    assert calibrated.config.postprocess.smoothing_sigma_mm == 2.0 and calibrated.config.postprocess.standardise == "zscore"
    assert calibrated.threshold is not None and calibrated.threshold != original.threshold
    assert calibrated.metadata["calibration"]["postprocess_overrides"] == {"smoothing_sigma_mm": 2, "standardise": "zscore"}
    assert calibrated.metadata["validation"]["rule"] == "best F1" and calibrated.metadata["validation"]["cases"] == 2
    # The new threshold is the best-F1 one of what evaluate reports for the same voxels and settings.
    report = evaluate(calibrated, cohort, options=api.InferenceOptions("cpu"))
    assert report["methods"]["ADM"]["pooled"]["best_threshold"] == pytest.approx(calibrated.threshold)
    for name, param in original.network.state_dict().items():  # the networks are untouched
        assert torch.equal(param, calibrated.network.state_dict()[name])
    # A bias-corrected FLAIR for the post-processing is a calibration too: the written model reads it.
    corrected = api.calibrate(trained_model, cohort, tmp_path / "n4.admm", device="cpu",
                              postprocess={"flair_weight": 1.0, "native_bias_correction_levels": 2})
    stored = api.load_model(tmp_path / "n4.admm").config
    assert stored.preprocess.native_bias_correction_levels == 2 and stored.postprocess.flair_weight == 1.0
    assert stored.preprocess.normalisation == original.config.preprocess.normalisation
    assert corrected.threshold is not None


def test_calibrate_on_a_domains_file_averages_dice_over_the_domains(trained_model, cohort, tmp_path):
    domains = tmp_path / "domains.json"
    domains.write_text(json.dumps({"one": {"folder": str(cohort), "cases": "synth_0"},
                                   "two": {"folder": str(cohort), "cases": "synth_1"}}), encoding="utf-8")
    model = api.calibrate(trained_model, domains, tmp_path / "c.admm", device="cpu")
    assert model.metadata["validation"]["rule"] == "highest mean Dice over the groups"
    assert model.metadata["validation"]["groups"] == {"one": 1, "two": 1}
    # The load weight is chosen first, by how the threshold transfers between the domains, then the
    # threshold for it; the written model applies it.
    loaded = api.calibrate(trained_model, domains, tmp_path / "l.admm", device="cpu",
                           postprocess={"standardise": "zscore"}, choose_load_weight=True)
    summary = loaded.metadata["validation"]
    assert set(summary["load_weight_transfer_dice"]) == {str(w) for w in LOAD_WEIGHTS}
    best = max(summary["load_weight_transfer_dice"].values())
    assert summary["load_weight_transfer_dice"][str(summary["load_weight"])] == best
    assert api.load_model(tmp_path / "l.admm").config.postprocess.load_weight == summary["load_weight"]
    with pytest.raises(InputError, match="standardised"):
        api.calibrate(trained_model, domains, tmp_path / "x.admm", device="cpu", choose_load_weight=True)
    with pytest.raises(InputError, match="two domains"):
        api.calibrate(trained_model, cohort, tmp_path / "x.admm", device="cpu", postprocess={"standardise": "zscore"},
                      choose_load_weight=True)
    assert not (tmp_path / "x.admm").exists()
    unlabelled = tmp_path / "unlabelled"
    make_synthetic_case(unlabelled, "u_1", seed=5, lesion=False)
    assert main(["calibrate", str(trained_model), str(unlabelled), "-o", str(tmp_path / "u.admm"),
                 "--device", "cpu"]) == 2
    assert not (tmp_path / "u.admm").exists()


def test_profiles_faithful_by_default_and_transfer_is_the_bundled_configuration():
    faithful = api.training_config("small")
    assert faithful == preset("small")
    transfer = api.training_config("small", profile="transfer", settings=["postprocess.median_size_mm=3"])
    assert transfer.preprocess.normalisation == "robust" and transfer.train.augmentation == "site"
    assert transfer.model.ctoc_uncertainty and transfer.postprocess.median_size_mm == 3  # --set wins
    with pytest.raises(InputError, match="profile"):
        api.training_config("small", profile="best")
    # The bundled model is what `--preset small --profile transfer` trains (README's command).
    bundled = api.load_model().config
    expected = api.training_config("small", profile="transfer")
    for section in ("preprocess", "model", "postprocess"):
        assert getattr(bundled, section) == getattr(expected, section), section
    assert bundled.train.augmentation == expected.train.augmentation
    # The bundled label leaves out what the study's '+cc' rows leave out, so predict writes the label measured.
    from ADMAnomalyLib.study.methods import StudySettings

    assert bundled.postprocess.min_component_mm3 == StudySettings().min_component_mm3 > 0


def test_train_with_the_ctoc_of_another_model_trains_step_2_only(trained_model, cohort, tmp_path):
    out = tmp_path / "ft2.admm"
    assert main(["train", str(cohort), "-o", str(out), "--preset", "tiny", "--epochs-joint", "1", "--lesion-margin",
                 "1", "--device", "cpu", "--progress", "none", "--ctoc-from", str(trained_model),
                 "--set", 'model.density_residuals=["flair", "t2"]']) == 0
    donor, model = api.load_model(trained_model), api.load_model(out)
    for name, value in donor.network.ctoc.state_dict().items():
        assert torch.equal(value, model.network.ctoc.state_dict()[name])
    assert model.config.model.feature_dim == 5 and model.gmm.means.shape[1] == 5
    assert {record["stage"] for record in model.metadata["history"]} == {"joint"}
    assert model.metadata["ctoc_from"]["model"] == str(trained_model)
    # A CtoC made for another preparation is refused before any training.
    assert main(["train", str(cohort), "-o", str(tmp_path / "x.admm"), "--preset", "tiny", "--device", "cpu",
                 "--progress", "none", "--ctoc-from", str(trained_model), "--set", "preprocess.image_size=64"]) == 2
    assert not (tmp_path / "x.admm").exists()


def test_cli_output_piped_into_a_reader_that_stops_early_is_not_an_error():
    """`admanomaly info default | head -1`: the closed pipe ends the command quietly with 0."""
    import os
    import subprocess
    import sys

    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader has gone before the command writes: every write meets a closed pipe
    try:
        writer = subprocess.run([sys.executable, "-c", "import sys; from ADMAnomalyLib.cli import main; "
                                 "sys.exit(main(['info', 'default']))"], stdout=write_end, stderr=subprocess.PIPE,
                                timeout=120)
    finally:
        os.close(write_end)
    assert writer.returncode == 0, writer.stderr.decode()
    assert b"Traceback" not in writer.stderr
