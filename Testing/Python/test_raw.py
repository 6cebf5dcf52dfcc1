"""Raw clinical scans (ADMAnomalyLib.rawprep) on the real TCGA-FG-6692 case: registration recovers a
known motion, brain extraction agrees with the BraTS-preprocessed brain, the whole pipeline finds the
tumour on the raw FLAIR grid as well as on the preprocessed case, and bad input is refused in one line
with nothing written.

The expensive steps run once per module: one ``predict_folder`` run of the raw case (registration,
HD-BET, networks; it also writes the preprocessed volumes), one mapping of the preprocessed case onto
the raw FLAIR grid, one prediction of the preprocessed case.
"""

from __future__ import annotations

import contextlib
import functools
import json
import shutil
import socket

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import REPO

from ADMAnomalyLib import api, rawprep
from ADMAnomalyLib.config import CONTRASTS
from ADMAnomalyLib.errors import InputError
from ADMAnomalyLib.metrics import detection_metrics, label_metrics

TCGA = (REPO / ".." / "shared" / "data" / "tcga" / "TCGA-FG-6692").resolve()
RAW = TCGA / "raw"
PRE = TCGA / "preprocessed"


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * float((a & b).sum()) / float(a.sum() + b.sum())


@pytest.fixture(scope="module")
def raw_images() -> dict[str, sitk.Image]:
    return {c: rawprep.read_series(p) for c, p in rawprep.find_series(RAW).items()}


@contextlib.contextmanager
def _no_network():
    """Any attempt to open a network connection fails (nothing may be downloaded at run time)."""
    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args[1:] or kwargs}")

    patched = [(socket.socket, "connect"), (socket.socket, "connect_ex"), (socket, "create_connection")]
    saved = [getattr(owner, name) for owner, name in patched]
    for owner, name in patched:
        setattr(owner, name, refuse)
    try:
        yield
    finally:
        for (owner, name), original in zip(patched, saved):
            setattr(owner, name, original)


@pytest.fixture(scope="module")
def raw_run(tmp_path_factory):
    """The raw case through the public folder entry point, as ``admanomaly predict default RAW -o OUT
    --preprocess auto --write-preprocessed`` runs it, with the network switched off."""
    out = tmp_path_factory.mktemp("raw_out")
    with _no_network():
        report = api.predict_folder(None, RAW, out, device="cpu", preprocess="auto", write_preprocessed=True)
    return out, report


def test_brain_extraction_weights_ship_inside_the_installed_wheel():
    from importlib.metadata import files

    from deepbet.utils import DATA_PATH

    shipped = {str(f) for f in files("deepbet")}
    assert {"data/models/model.pt", "data/models/bbox_model.pt"} <= shipped
    # extract_brain loads exactly these files (DATA_PATH is inside the installed distribution).
    assert (Path(DATA_PATH) / "models" / "model.pt").is_file()


@pytest.fixture(scope="module")
def preprocessed() -> dict[str, sitk.Image]:
    names = {"flair": "flair", "t1": "t1", "t1c": "t1ce", "t2": "t2", "label": "seg"}
    return {k: sitk.ReadImage(str(PRE / f"TCGA-FG-6692_{n}.nii.gz")) for k, n in names.items()}


@pytest.fixture(scope="module")
def reference(raw_images, preprocessed):
    """The preprocessed case's brain and pseudo-reference tumour carried onto the raw FLAIR grid."""
    brain = functools.reduce(sitk.Or, [sitk.Cast(preprocessed[c] != 0, sitk.sitkUInt8) for c in CONTRASTS])
    mapping = rawprep.map_skull_stripped(raw_images["flair"], preprocessed["flair"], brain, affine=False)
    flair = raw_images["flair"]
    return {
        "mapping": mapping,
        "brain": sitk.GetArrayFromImage(rawprep.resample_mask(brain, flair, mapping.transform)) > 0,
        "tumour": sitk.GetArrayFromImage(rawprep.resample_mask(preprocessed["label"] > 0, flair,
                                                                mapping.transform)) > 0,
        "flair": sitk.GetArrayFromImage(sitk.Resample(sitk.Cast(preprocessed["flair"], sitk.sitkFloat32), flair,
                                                      mapping.transform, sitk.sitkLinear, 0.0)),
    }


def _metrics(energy: np.ndarray, tumour: np.ndarray, brain: np.ndarray, anomaly: np.ndarray, threshold: float) -> dict:
    """AUPRC and AUROC of the energy, Dice of the anomaly label predict writes (its small regions left out)."""
    ranking = detection_metrics(energy, tumour, brain)
    return {"auprc": ranking.auprc, "auroc": ranking.auroc,
            "dice": label_metrics(anomaly[brain] > 0, tumour[brain], threshold).dice}


# ------------------------------------------------------------------------------------------- reading, detection

def test_series_are_found_by_name_and_read_as_volumes(raw_images):
    paths = rawprep.find_series(RAW)
    assert {c: p.name for c, p in paths.items()} == {
        "flair": "FLAIR_AX.nii.gz", "t1": "T1_AX.nii.gz", "t1c": "T1_AX_POST_GAD.nii.gz", "t2": "T2_AX.nii.gz"}
    assert not rawprep.on_one_grid(raw_images)
    assert not any(rawprep.looks_skull_stripped(image) for image in raw_images.values())


def test_brats_volumes_are_detected_as_done(preprocessed):
    images = {c: preprocessed[c] for c in CONTRASTS}
    assert rawprep.on_one_grid(images)
    assert all(rawprep.looks_skull_stripped(image) for image in images.values())


def test_dicom_series_folder_is_read_like_the_file(tmp_path, raw_images):
    flair = raw_images["flair"]
    folder = tmp_path / "FLAIR_AX"
    folder.mkdir()
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    series_uid = "1.2.826.0.1.3680043.2.1125.1.1"
    for k in range(flair.GetDepth()):
        item = flair[:, :, k]
        origin = flair.TransformIndexToPhysicalPoint((0, 0, k))
        tags = {"0020|000e": series_uid, "0020|000d": series_uid + ".0", "0008|0060": "MR",
                "0020|0032": "\\".join(f"{v:.6f}" for v in origin),
                "0020|0037": "\\".join(f"{v:.8f}" for v in flair.GetDirection()[0:7:3] + flair.GetDirection()[1:8:3]),
                "0018|0050": f"{flair.GetSpacing()[2]:.4f}", "0020|0013": str(k + 1)}
        for tag, value in tags.items():
            item.SetMetaData(tag, value)
        writer.SetFileName(str(folder / f"{k:03d}.dcm"))
        writer.Execute(item)
    image = rawprep.read_series(folder)
    # The scan's direction matrix is left-handed, so the series reader stacks the slices along the
    # slice normal (row x column), the other way round: the same voxels in space, in another order.
    image, flair = (sitk.DICOMOrient(im, "LPS") for im in (image, flair))
    assert image.GetSize() == flair.GetSize()
    np.testing.assert_allclose(image.GetSpacing(), flair.GetSpacing(), atol=1e-3)
    np.testing.assert_allclose(image.GetOrigin(), flair.GetOrigin(), atol=1e-3)
    np.testing.assert_allclose(image.GetDirection(), flair.GetDirection(), atol=1e-5)
    assert np.array_equal(sitk.GetArrayFromImage(image), sitk.GetArrayFromImage(flair))


# ------------------------------------------------------------------------------------------- registration

def _moved(image: sitk.Image, motion: sitk.Euler3DTransform) -> sitk.Image:
    """The same voxels placed in space by ``motion`` (a point p of ``image`` goes to motion(p)):
    the header changes, the intensities are not resampled."""
    moved = sitk.Image(image)
    matrix = np.asarray(motion.GetMatrix()).reshape(3, 3)
    direction = np.asarray(image.GetDirection()).reshape(3, 3)
    moved.SetDirection(tuple((matrix @ direction).ravel()))
    moved.SetOrigin(motion.TransformPoint(image.GetOrigin()))
    return moved


def test_registration_recovers_a_known_rigid_motion(raw_images):
    flair, t1 = raw_images["flair"], raw_images["t1"]
    motion = sitk.Euler3DTransform()
    motion.SetCenter(flair.TransformContinuousIndexToPhysicalPoint([(n - 1) / 2 for n in flair.GetSize()]))
    motion.SetRotation(*np.radians([3.0, -2.0, 4.0]))
    motion.SetTranslation((4.0, -3.0, 5.0))
    before = rawprep.register_rigid(flair, t1, "t1")
    after = rawprep.register_rigid(flair, _moved(t1, motion), "moved t1")
    # Where a FLAIR head point lands in the moved T1 must be where it landed before, moved.
    head = np.argwhere(sitk.GetArrayFromImage(rawprep.head_mask(flair)) > 0)[::50]
    points = [flair.TransformIndexToPhysicalPoint([int(i) for i in idx[::-1]]) for idx in head]
    errors = [np.linalg.norm(np.subtract(after.transform.TransformPoint(p),
                                         motion.TransformPoint(before.transform.TransformPoint(p))))
              for p in points]
    assert max(errors) <= 1.0, f"max error {max(errors):.2f} mm (mean {np.mean(errors):.2f})"
    assert after.head_overlap >= rawprep.MIN_HEAD_OVERLAP and after.metric < -0.5


def test_registration_gives_the_same_transform_every_run(raw_images):
    # ITK's threaded metric sums made the transform differ between runs of the same pair (the mapped
    # reference's correlation moved between 0.79 and 0.84); the same scans must give the same result,
    # whatever thread count the process was left with.
    flair, t2 = raw_images["flair"], raw_images["t2"]
    previous = sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()
    try:
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(2)
        first = rawprep.register_rigid(flair, t2, "t2")
        assert sitk.ProcessObject.GetGlobalDefaultNumberOfThreads() == 2
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(8)
        second = rawprep.register_rigid(flair, t2, "t2")
    finally:
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(previous)
    assert first.transform.GetParameters() == second.transform.GetParameters()
    assert first.metric == second.metric


# ------------------------------------------------------------------------------------------- whole pipeline

def test_raw_case_outputs_lie_on_the_raw_flair_grid(raw_run, raw_images):
    out, report = raw_run
    assert report.done == ["raw"] and not report.failed
    flair = raw_images["flair"]
    for name in ("raw_energy.nii.gz", "raw_anomaly.nii.gz", "raw_preprocessed/raw_mask.nii.gz"):
        image = sitk.ReadImage(str(out / name))
        assert image.GetSize() == flair.GetSize()
        # Exact up to the NIfTI header's float32 / quaternion storage.
        np.testing.assert_allclose(image.GetSpacing(), flair.GetSpacing(), rtol=1e-6)
        np.testing.assert_allclose(image.GetOrigin(), flair.GetOrigin(), atol=1e-4)
        np.testing.assert_allclose(image.GetDirection(), flair.GetDirection(), atol=1e-6)
    steps = json.loads((out / "raw_preprocessed" / "raw_preprocessing.json").read_text(encoding="utf-8"))
    assert steps["register"]["ran"] and steps["brain"]["ran"] and not steps["n4"]["ran"]
    for contrast in ("t1", "t1c", "t2"):
        assert steps["register"][contrast]["head_overlap"] >= rawprep.MIN_HEAD_OVERLAP
        assert steps["register"][contrast]["mattes_mi"] < -0.5
    # The written preprocessed case is a BraTS-like case the engine reads back as it is.
    back = api.find_cases(out / "raw_preprocessed")
    assert len(back) == 1 and back[0].mask is not None


def test_mapping_of_the_preprocessed_case_onto_the_raw_grid_is_sound(reference, raw_images):
    # Same patient, same contrast: inside the brain the mapped BraTS FLAIR must follow the raw FLAIR.
    raw = sitk.GetArrayFromImage(raw_images["flair"]).astype(np.float64)
    brain = reference["brain"]
    correlation = np.corrcoef(raw[brain], reference["flair"][brain])[0, 1]
    assert correlation >= 0.8, correlation
    assert reference["mapping"].details["rigid_mattes_mi"] < -0.8


def test_brain_extraction_agrees_with_the_preprocessed_brain(raw_run, reference):
    out, _ = raw_run
    mask = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "raw_preprocessed" / "raw_mask.nii.gz"))) > 0
    dice = _dice(mask, reference["brain"])
    print(f"brain-mask Dice vs the preprocessed brain on the raw FLAIR grid: {dice:.3f}")
    assert dice >= 0.90


def test_raw_path_finds_the_tumour_as_well_as_the_preprocessed_path(raw_run, reference, preprocessed):
    out, _ = raw_run
    model = api.load_model()
    # A copy: a view of a temporary image would point into freed memory once the image is collected.
    energy = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "raw_energy.nii.gz")))
    brain = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "raw_preprocessed" / "raw_mask.nii.gz"))) > 0
    anomaly = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "raw_anomaly.nii.gz")))
    raw = _metrics(energy, reference["tumour"], brain, anomaly, model.threshold)
    prediction = api.predict(model, {c: preprocessed[c] for c in CONTRASTS}, device="cpu")
    pre = _metrics(sitk.GetArrayFromImage(prediction.energy), sitk.GetArrayFromImage(preprocessed["label"]) > 0,
                   sitk.GetArrayFromImage(prediction.brain_mask) > 0, sitk.GetArrayFromImage(prediction.anomaly()),
                   model.threshold)
    print(f"raw path: AUPRC {raw['auprc']:.3f} AUROC {raw['auroc']:.3f} Dice {raw['dice']:.3f}; "
          f"preprocessed path: AUPRC {pre['auprc']:.3f} AUROC {pre['auroc']:.3f} Dice {pre['dice']:.3f}")
    # The bundled model has this patient's preprocessed scans in its training pool (their normal
    # slices), which favours the preprocessed path; the raw path must still find the tumour about as
    # well (the CBICA-only model gave raw 0.711 vs preprocessed 0.739).
    assert raw["auprc"] >= 0.7
    assert raw["auprc"] >= pre["auprc"] - 0.15
    assert raw["auroc"] >= 0.9


# ------------------------------------------------------------------------------------------- bad input

def test_missing_contrast_is_one_line(tmp_path, raw_images):
    with pytest.raises(InputError, match="missing contrast t2") as info:
        rawprep.prepare_raw({c: raw_images[c] for c in ("flair", "t1", "t1c")})
    assert "\n" not in str(info.value)
    case = tmp_path / "case"
    case.mkdir()
    for name in ("FLAIR_AX.nii.gz", "T1_AX.nii.gz", "T1_AX_POST_GAD.nii.gz"):
        shutil.copy(RAW / name, case / name)
    with pytest.raises(InputError, match="missing contrast t2"):
        rawprep.find_series(case)


def test_a_2d_scout_is_refused(raw_images):
    scout = raw_images["t2"][:, :, 12:13]
    with pytest.raises(InputError, match="2-D scout") as info:
        rawprep.prepare_raw({**raw_images, "t2": scout})
    assert "\n" not in str(info.value)


def test_registration_failure_is_refused_and_nothing_is_written(tmp_path, raw_images):
    case = tmp_path / "cases" / "bad"
    case.mkdir(parents=True)
    # The real series shrunk 2x in-plane (quicker), and a "T1" that is not this head: noise in T1's
    # field of view.
    for contrast, name in (("flair", "FLAIR_AX"), ("t1c", "T1_AX_POST_GAD"), ("t2", "T2_AX")):
        sitk.WriteImage(sitk.Shrink(raw_images[contrast], [2, 2, 1]), str(case / f"{name}.nii.gz"))
    t1 = raw_images["t1"]
    noise = sitk.GetImageFromArray(np.random.default_rng(0).gamma(2.0, 100.0, (26, 56, 64)).astype(np.int16))
    noise.SetSpacing((t1.GetSpacing()[0] * 4, t1.GetSpacing()[1] * 4, t1.GetSpacing()[2]))
    noise.SetOrigin(t1.GetOrigin())
    noise.SetDirection(t1.GetDirection())
    sitk.WriteImage(noise, str(case / "T1_AX.nii.gz"))
    out = tmp_path / "out"
    report = api.predict_folder(None, case.parent, out, device="cpu", preprocess="auto", write_preprocessed=True)
    message = report.failed["bad"]
    assert "t1: registration to FLAIR failed" in message and "\n" not in message
    assert not list(out.glob("bad_*.nii.gz")) and not (out / "bad_preprocessed").exists()


def test_a_series_that_is_not_a_brain_is_refused(raw_images):
    # A water phantom: a uniform ellipsoid in noise, on one grid (registration is skipped).
    shape = (40, 96, 96)
    z, y, x = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    rng = np.random.default_rng(1)
    body = ((x / 0.7) ** 2 + (y / 0.5) ** 2 + (z / 0.6) ** 2) <= 1
    images = {}
    for contrast in CONTRASTS:
        values = np.where(body, 400.0, 0.0) + rng.normal(0, 10, shape) ** 2
        image = sitk.GetImageFromArray(values.astype(np.float32))
        image.SetSpacing((2.0, 2.0, 4.0))
        images[contrast] = image
    with pytest.raises(InputError, match="no skull or scalp around it: not a brain scan") as info:
        rawprep.prepare_raw(images, rawprep.RawOptions.from_mode("auto"))
    assert "\n" not in str(info.value)


def test_user_mask_replaces_brain_extraction_and_steps_can_be_forced(raw_run, preprocessed):
    out, _ = raw_run
    folder = out / "raw_preprocessed"
    images = {c: sitk.ReadImage(str(folder / f"raw_{n}.nii.gz")) for c, n in zip(CONTRASTS, ("flair", "t1", "t1ce", "t2"))}
    mask = sitk.ReadImage(str(folder / "raw_mask.nii.gz"))
    # Already registered and skull-stripped: 'auto' skips both steps and keeps the grid.
    result = rawprep.prepare_raw(images, rawprep.RawOptions.from_mode("auto"))
    assert [s.ran for s in result.steps] == [False, False, False]
    assert result.brain_mask.GetSize() == mask.GetSize()
    # A user mask is used as given; registration can be forced off.
    options = rawprep.RawOptions.from_mode("full", register="no", mask=mask)
    result = rawprep.prepare_raw(images, options)
    assert result.steps[2].details["source"] == "user mask"
    assert np.array_equal(sitk.GetArrayFromImage(result.brain_mask), sitk.GetArrayFromImage(mask) > 0)
    with pytest.raises(InputError, match="plausible"):
        rawprep.prepare_raw(images, rawprep.RawOptions.from_mode("auto", mask=mask * 0))


def test_n4_removes_most_of_a_known_bias_field(raw_images):
    flair = sitk.Cast(sitk.Shrink(raw_images["flair"], [2, 2, 1]), sitk.sitkFloat32)
    values = sitk.GetArrayFromImage(flair)
    z, y, x = np.meshgrid(*[np.linspace(-1, 1, n) for n in values.shape], indexing="ij")
    field = np.exp(0.35 * x + 0.25 * y).astype(np.float32)
    biased = sitk.GetImageFromArray(values * field)
    biased.CopyInformation(flair)
    corrected = rawprep.n4_correct(biased)
    assert corrected.GetSize() == flair.GetSize() and corrected.GetOrigin() == flair.GetOrigin()
    head = sitk.GetArrayFromImage(rawprep.head_mask(flair)) > 0
    tissue = head & (values > np.percentile(values[head], 20))
    # Spread of the multiplicative error (log units) before and after; N4 also flattens the scan's
    # own bias, so the remainder is not zero.
    before = np.log(field[tissue]).std()
    after = np.log(sitk.GetArrayFromImage(corrected)[tissue] / values[tissue]).std()
    assert after < 0.6 * before, (before, after)


@pytest.mark.parametrize("voxel_mm", [None, 1.0, 2.5])
def test_the_bias_field_sampled_coarsely_is_the_field_at_every_voxel(raw_images, voxel_mm):
    flair = sitk.Cast(raw_images["flair"], sitk.sitkFloat32)  # the scanner's 0.9 x 0.9 x 5.5 mm grid
    if voxel_mm is not None:  # the same head on isotropic voxels
        size = [int(n * s / voxel_mm) for n, s in zip(flair.GetSize(), flair.GetSpacing())]
        flair = sitk.Resample(flair, size, sitk.Transform(), sitk.sitkLinear, flair.GetOrigin(), (voxel_mm,) * 3,
                              flair.GetDirection(), 0.0, sitk.sitkFloat32)
    flair.SetDirection((0.96, -0.28, 0.0, 0.28, 0.96, 0.0, 0.0, 0.0, 1.0))  # a turned grid
    shrink = [4 if n >= 16 else 1 for n in flair.GetSize()]
    corrector = sitk.N4BiasFieldCorrectionImageFilter()
    corrector.SetMaximumNumberOfIterations(list(rawprep.N4_ITERATIONS))  # the raw path's three levels
    corrector.Execute(sitk.Shrink(flair, shrink), sitk.Shrink(rawprep.head_mask(flair), shrink))
    exact = sitk.GetArrayFromImage(sitk.Exp(corrector.GetLogBiasFieldAsImage(flair)))
    sampled = rawprep.bias_field(corrector, flair)
    assert sampled.GetSize() == flair.GetSize() and sampled.GetSpacing() == flair.GetSpacing()
    assert sampled.GetOrigin() == flair.GetOrigin() and sampled.GetDirection() == flair.GetDirection()
    # Every voxel, the grid's faces included, gets the field (a sample missed there would read 1 or divide by 0).
    assert np.ptp(np.log(exact)) > 0.05
    np.testing.assert_allclose(sitk.GetArrayFromImage(sampled), exact, rtol=2e-3)


def test_a_dicom_series_folder_is_found_as_a_contrast(tmp_path):
    case = tmp_path / "patient"
    case.mkdir()
    for name in ("FLAIR_AX.nii.gz", "T1_AX_POST_GAD.nii.gz", "T2_AX.nii.gz"):
        shutil.copy(RAW / name, case / name)
    (case / "T1_AX").mkdir()  # a DICOM series folder (its reading is tested above)
    (case / "notes.txt").write_text("not an image")
    found = rawprep.find_series(case)
    assert found["t1"] == case / "T1_AX" and found["t1c"].name == "T1_AX_POST_GAD.nii.gz"
    assert [c.case_id for c in rawprep.discover_raw_cases(tmp_path)] == ["patient"]


def test_auto_on_a_preprocessed_case_changes_nothing(tmp_path):
    from conftest import make_synthetic_case

    folder = make_synthetic_case(tmp_path, "synth")
    images = {c: sitk.ReadImage(str(folder / f"synth_{n}.nii.gz"))
              for c, n in zip(CONTRASTS, ("flair", "t1", "t1ce", "t2"))}
    model = api.load_model()
    plain = api.predict(model, images, device="cpu")
    auto = api.predict(model, images, device="cpu", preprocess="auto")
    assert [step.ran for step in auto.preprocessing.steps] == [False, False, False]
    assert np.array_equal(sitk.GetArrayFromImage(auto.energy), sitk.GetArrayFromImage(plain.energy))
    assert plain.preprocessing is None


def test_cli_refuses_raw_step_flags_without_preprocess(tmp_path, capsys):
    from ADMAnomalyLib import cli

    code = cli.main(["predict", "default", str(RAW), "-o", str(tmp_path / "out"), "--n4"])
    assert code == 2
    assert "need --preprocess auto or full" in capsys.readouterr().err
    with pytest.raises(InputError, match="preprocess must be one of"):
        api.predict(None, {}, preprocess="yes")
