"""The Slicer module's case browser on real MRML (PyPI ``slicer-core``): a folder of cases with its
results folder, one case at a time in the scene, the case table (``cases.csv``), thresholds
applied to the whole folder and saved into a model copy, and *Run missing* as a background job.

One folder of synthetic cases on an oblique, anisotropic grid is predicted once by the engine
(``api.predict_folder``, as ``admanomaly predict``) with a tiny model trained here; it holds two
broken cases: one whose T2 lies on another grid (it fails when predicted) and one without a T1 (its
discovery reports it). Tests that change results work on copies of the results folder.
"""

from __future__ import annotations

import collections
import gc
import hashlib
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

import slicer  # PyPI slicer-core

from conftest import REPO, make_synthetic_case

for entry in (REPO / "ADMAnomaly", REPO):
    if str(entry) not in sys.path:
        sys.path.insert(0, str(entry))

from ADMAnomalyCore import conversion  # noqa: E402
from ADMAnomalyCore.casebrowser import CASE_ATTRIBUTE, REFERENCE_SEGMENT_NAME  # noqa: E402
from ADMAnomalyCore.logic import ADMAnomalyCoreLogic  # noqa: E402
from ADMAnomalyCore.standalone import StandaloneScene  # noqa: E402
from ADMAnomalyLib import api, errors, results  # noqa: E402
from ADMAnomalyLib.config import CONTRASTS, preset  # noqa: E402

_a, _b = np.deg2rad(15.0), np.deg2rad(-10.0)
_rz = np.array([[np.cos(_a), -np.sin(_a), 0], [np.sin(_a), np.cos(_a), 0], [0, 0, 1]])
_rx = np.array([[1, 0, 0], [0, np.cos(_b), -np.sin(_b)], [0, np.sin(_b), np.cos(_b)]])
OBLIQUE = tuple((_rz @ _rx).ravel())
SPACING = (0.9, 1.1, 1.4)
SHAPE = (80, 80, 48)
"""Large enough that a case left behind in memory (about 7 MB of voxels) shows in the RSS."""
GOOD = [f"case_{number}" for number in range(6)]
BROKEN_GRID, BROKEN_MISSING = "broken_grid", "broken_missing"
FILE_NAMES = {"flair": "flair", "t1": "t1", "t1c": "t1ce", "t2": "t2"}


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> dict[str, Path]:
    """Cases, a tiny model and the engine's results (with ``cases.csv``) for them."""
    root = tmp_path_factory.mktemp("casefolder")
    cases = root / "cases"
    for number, case_id in enumerate(GOOD):
        make_synthetic_case(cases, case_id, shape=SHAPE, seed=number, direction=OBLIQUE, spacing=SPACING)
    broken = make_synthetic_case(cases, BROKEN_GRID, shape=SHAPE, direction=OBLIQUE, spacing=SPACING)
    odd = make_synthetic_case(root / "odd", BROKEN_GRID, shape=(80, 72, 48), direction=OBLIQUE, spacing=SPACING)
    shutil.copy(odd / f"{BROKEN_GRID}_t2.nii.gz", broken / f"{BROKEN_GRID}_t2.nii.gz")
    missing = make_synthetic_case(cases, BROKEN_MISSING, shape=SHAPE, direction=OBLIQUE, spacing=SPACING)
    (missing / f"{BROKEN_MISSING}_t1.nii.gz").unlink()

    make_synthetic_case(root / "train", "normal", seed=11)
    model = root / "tiny.admm"
    api.train(root / "train" / "normal", model, preset("tiny", train={"lesion_margin": 1}), device="cpu",
              show_progress_bar=False)
    report = api.predict_folder(model, cases, root / "results", device="cpu")
    assert report.done == GOOD and set(report.failed) == {BROKEN_GRID, BROKEN_MISSING}
    return {"root": root, "cases": cases, "model": model, "results": root / "results"}


@pytest.fixture
def mrml():
    environment = StandaloneScene()
    for _ in range(3):  # the slice views' composite nodes, as in the application
        environment.scene.AddNewNodeByClass("vtkMRMLSliceCompositeNode")
    yield environment
    environment.close()


@pytest.fixture
def logic(mrml, folder):
    """The logic with the (shared, unchanged) results folder open."""
    logic = ADMAnomalyCoreLogic()
    logic.openFolder(folder["cases"], folder["results"], model=folder["model"])
    yield logic
    logic.closeFolder()


def copy_results(folder, tmp_path: Path, name: str = "results") -> Path:
    return Path(shutil.copytree(folder["results"], tmp_path / name))


def index_of(logic, case_id: str) -> int:
    return [record.case_id for record in logic.caseRecords()].index(case_id)


def read_array(path: Path) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


def rss_mib() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    raise AssertionError("no VmRSS in /proc/self/status")


# -- the table -------------------------------------------------------------------------------------

def test_the_table_lists_every_case_with_its_status_and_figures(logic, folder):
    rows = {record.case_id: record for record in logic.caseRecords()}
    assert list(rows) == sorted([*GOOD, BROKEN_GRID, BROKEN_MISSING])
    for case_id in GOOD:
        row = rows[case_id]
        assert row.status == "done" and row.threshold == pytest.approx(api.load_model(folder["model"]).threshold)
        anomaly = read_array(results.output_paths(folder["results"], case_id)[1])
        assert row.anomaly_ml == pytest.approx(anomaly.sum() * np.prod(SPACING) / 1000.0)
        assert row.components >= 1 and 0 < row.largest_component_ml <= row.anomaly_ml
        assert 0 <= row.dice <= 1 and 0 < row.auprc <= 1  # every case has a reference label
    assert rows[BROKEN_GRID].status == "failed" and "size" in rows[BROKEN_GRID].reason
    assert rows[BROKEN_MISSING].status == "failed" and "missing contrast t1" in rows[BROKEN_MISSING].reason

    fresh = ADMAnomalyCoreLogic()
    rows = fresh.openFolder(folder["cases"], folder["root"] / "not-yet", model=folder["model"])
    assert [r.status for r in rows if r.case_id in GOOD] == ["not run"] * len(GOOD)
    assert not (folder["root"] / "not-yet").exists()  # opening writes nothing
    (folder["root"] / "empty").mkdir(exist_ok=True)
    with pytest.raises(errors.InputError, match="no case found"):
        fresh.openFolder(folder["root"] / "empty", folder["results"])
    with pytest.raises(errors.InputError, match="folder not found"):
        fresh.openFolder(folder["root"] / "nowhere", folder["results"])


# -- loading a case --------------------------------------------------------------------------------

def test_loading_a_case_creates_exactly_its_nodes_on_the_input_grid(logic, mrml, folder):
    scene = mrml.scene
    before = {scene.GetNthNode(i).GetID() for i in range(scene.GetNumberOfNodes())}
    loaded = logic.loadCase("case_2")
    added = [scene.GetNthNode(i) for i in range(scene.GetNumberOfNodes())
             if scene.GetNthNode(i).GetID() not in before]
    assert collections.Counter(node.GetClassName() for node in added) == {
        "vtkMRMLScalarVolumeNode": 5, "vtkMRMLScalarVolumeDisplayNode": 5,
        "vtkMRMLSegmentationNode": 2, "vtkMRMLSegmentationDisplayNode": 2}
    data = [node for node in added if not node.IsA("vtkMRMLDisplayNode")]
    assert set(data) == set(loaded.nodes()) and all(n.GetAttribute(CASE_ATTRIBUTE) == "case_2" for n in data)
    assert {c: n.GetName() for c, n in loaded.volumes.items()} == {c: f"case_2_{FILE_NAMES[c]}" for c in CONTRASTS}

    # The grid of every volume is the one Slicer's own reader gives the FLAIR file.
    case_dir = folder["cases"] / "case_2"
    reference = mrml.load(case_dir / "case_2_flair.nii.gz", name="reference")
    expected = conversion.ijk_to_ras_array(reference)
    np.testing.assert_allclose(expected[:3, :3] / np.asarray(SPACING), np.diag([-1, -1, 1]) @ np.reshape(OBLIQUE, (3, 3)),
                               atol=1e-5)
    for node in [*loaded.volumes.values(), loaded.energy]:
        np.testing.assert_allclose(conversion.ijk_to_ras_array(node), expected, atol=1e-6)
        assert node.GetImageData().GetDimensions() == SHAPE
    for contrast, node in loaded.volumes.items():
        np.testing.assert_array_equal(slicer.util.arrayFromVolume(node),
                                      read_array(case_dir / f"case_2_{FILE_NAMES[contrast]}.nii.gz"))

    # The reference label as a segmentation (outline) on the same grid.
    segments = loaded.reference.GetSegmentation()
    assert segments.GetNumberOfSegments() == 1 and segments.GetNthSegment(0).GetName() == REFERENCE_SEGMENT_NAME
    labelmap = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode")
    slicer.vtkSlicerSegmentationsModuleLogic.ExportAllSegmentsToLabelmapNode(loaded.reference, labelmap)
    exported = np.zeros(tuple(reversed(SHAPE)), np.uint8)
    # The exported labelmap covers the segment's extent: place it on the FLAIR grid through its IJK-to-RAS.
    offset = np.rint(np.linalg.solve(expected, conversion.ijk_to_ras_array(labelmap) @ [0, 0, 0, 1])[:3]).astype(int)
    array = slicer.util.arrayFromVolume(labelmap)
    k, j, i = offset[::-1]
    exported[k:k + array.shape[0], j:j + array.shape[1], i:i + array.shape[2]] = array > 0
    np.testing.assert_array_equal(exported, read_array(case_dir / "case_2_seg.nii.gz") > 0)
    assert not loaded.reference.GetDisplayNode().GetVisibility2DFill()

    # Views as after Apply: FLAIR behind the energy in every slice view.
    for index in range(scene.GetNumberOfNodesByClass("vtkMRMLSliceCompositeNode")):
        composite = scene.GetNthNodeByClass(index, "vtkMRMLSliceCompositeNode")
        assert composite.GetBackgroundVolumeID() == loaded.volumes["flair"].GetID()
        assert composite.GetForegroundVolumeID() == loaded.energy.GetID()


def test_a_loaded_stored_energy_equals_the_file_and_the_segment_the_stored_map(logic, folder):
    loaded = logic.loadCase("case_1")
    energy_path, anomaly_path = results.output_paths(folder["results"], "case_1")
    np.testing.assert_array_equal(slicer.util.arrayFromVolume(loaded.energy), read_array(energy_path))
    stored = read_array(anomaly_path)
    assert stored.sum() > 0
    np.testing.assert_array_equal(logic.segmentArray(loaded.anomaly), stored)
    record = logic.caseRecords()[index_of(logic, "case_1")]
    assert logic.modelThreshold(loaded.energy) == record.threshold  # "reset" returns to the stored map
    # The live slider works on the loaded case as after Apply.
    higher = logic.setThreshold(loaded.anomaly, threshold=record.threshold + 1.0)
    assert higher.voxels < stored.sum()


def test_a_loaded_case_is_drawn_in_every_orientation(logic):
    # The README picture: the three slice views through one point of the anomaly.
    from ADMAnomalyCore.rendering import render_slice

    loaded = logic.loadCase("case_4")
    k, j, i = np.argwhere(logic.segmentArray(loaded.anomaly) > 0).mean(axis=0).round()
    point = tuple(float(v) for v in (conversion.ijk_to_ras_array(loaded.energy) @ [i, j, k, 1.0])[:3])
    for orientation in ("Axial", "Coronal", "Sagittal"):
        image = render_slice(loaded.volumes["flair"], loaded.energy, loaded.anomaly, orientation=orientation,
                             point=point, size=128).astype(int)
        assert (image.sum(axis=-1) > 30).mean() > 0.1, orientation  # the head, not an empty plane
        cyan = (image[..., 2] - image[..., 0] > 60) & (image[..., 1] - image[..., 0] > 60)
        assert cyan.sum() > 5, orientation  # the anomaly's outline and fill
    with pytest.raises(ValueError, match="orientation"):
        render_slice(loaded.volumes["flair"], orientation="Oblique")


def test_a_case_without_results_brings_its_volumes_only(mrml, folder):
    logic = ADMAnomalyCoreLogic()
    logic.openFolder(folder["cases"], folder["root"] / "not-yet", model=folder["model"])
    loaded = logic.loadCase("case_3")
    assert loaded.energy is None and loaded.anomaly is None and loaded.reference is not None
    assert mrml.count("vtkMRMLScalarVolumeNode") == 4 and mrml.count("vtkMRMLSegmentationNode") == 1
    composite = mrml.scene.GetFirstNodeByClass("vtkMRMLSliceCompositeNode")
    assert composite.GetBackgroundVolumeID() == loaded.volumes["flair"].GetID()
    assert composite.GetForegroundVolumeID() is None


def test_stepping_through_the_folder_keeps_node_count_and_memory_flat(logic, mrml):
    total = len(logic.caseRecords())
    counts, memory, shown = collections.defaultdict(set), [], []
    # Next through the whole folder (the first call loads the first case), then Previous back: the
    # case without a T1 raises and the stepping goes on after it.
    for step in [logic.nextCase] * total + [logic.previousCase] * (total - 1):
        try:
            shown.append(step().caseId)
        except errors.InputError:
            shown.append(None)
            continue
        gc.collect()
        counts[shown[-1]].add(mrml.scene.GetNumberOfNodes())
        memory.append(rss_mib())
    assert shown[:total] == [BROKEN_GRID, None, *GOOD] and shown[total:] == [*reversed(GOOD[:-1]), None, BROKEN_GRID]
    # The same nodes each time a case is shown, and the same for every case with results.
    assert all(len(seen) == 1 for seen in counts.values()) and len(set().union(*(counts[c] for c in GOOD))) == 1
    # A case left behind would hold about 7 MB of voxels: 6 more loads after the first round.
    first_round = len(GOOD) + 1
    assert max(memory[first_round:]) - memory[first_round - 1] < 10.0, memory
    with pytest.raises(errors.InputError, match="first case"):
        logic.previousCase()
    logic.loadCase(total - 1)
    with pytest.raises(errors.InputError, match="last case"):
        logic.nextCase()


def test_a_broken_case_is_failed_and_the_others_browse(logic, mrml, folder):
    shown = logic.loadCase("case_0")
    before = mrml.scene.GetNumberOfNodes()
    with pytest.raises(errors.InputError, match="missing contrast t1"):
        logic.loadCase(BROKEN_MISSING)
    assert mrml.scene.GetNumberOfNodes() == before  # nothing half-loaded, the previous case stays
    assert logic.caseBrowser.loaded is shown and shown.volumes["flair"].GetScene() is mrml.scene
    assert logic.caseRecords()[index_of(logic, BROKEN_MISSING)].status == "failed"
    assert logic.nextCase().caseId == "case_0"  # Next continues after the broken case

    # A case that failed in predict (its T2 on another grid) stays failed in the table with the
    # reason, and its volumes can still be looked at, each on its own grid, without results.
    row = logic.caseRecords()[index_of(logic, BROKEN_GRID)]
    assert row.status == "failed" and "size (80, 72, 48) differs" in row.reason
    loaded = logic.loadCase(BROKEN_GRID)
    assert loaded.energy is None and loaded.anomaly is None
    assert loaded.volumes["t2"].GetImageData().GetDimensions() == (80, 72, 48)
    assert loaded.volumes["flair"].GetImageData().GetDimensions() == SHAPE
    assert logic.caseRecords()[index_of(logic, BROKEN_GRID)].reason == row.reason


def test_a_case_whose_stored_energy_is_missing_fails_until_it_is_back(mrml, folder, tmp_path):
    work = copy_results(folder, tmp_path)
    logic = ADMAnomalyCoreLogic()
    logic.openFolder(folder["cases"], work, model=folder["model"])
    energy, _ = results.output_paths(work, "case_2")
    moved = energy.rename(energy.with_name("moved.nii.gz"))
    before = mrml.scene.GetNumberOfNodes()
    with pytest.raises(errors.InputError, match="not found"):
        logic.loadCase("case_2")
    assert mrml.scene.GetNumberOfNodes() == before
    assert logic.caseRecords()[index_of(logic, "case_2")].status == "failed"
    moved.rename(energy)
    assert logic.loadCase("case_2").anomaly is not None
    assert logic.caseRecords()[index_of(logic, "case_2")].status == "done"


# -- thresholds across the folder ------------------------------------------------------------------

def test_apply_to_all_equals_predict_with_that_threshold(mrml, folder, tmp_path):
    work = copy_results(folder, tmp_path)
    logic = ADMAnomalyCoreLogic()
    logic.openFolder(folder["cases"], work, model=folder["model"])
    loaded = logic.loadCase("case_1")
    energy = slicer.util.arrayFromVolume(loaded.energy)
    threshold = float(np.percentile(energy[logic.brainMask(loaded.energy)], 97.0))
    progress = []
    rows = {r.case_id: r for r in logic.applyThresholdToFolder(threshold, progress=lambda *a: progress.append(a))}
    assert len(progress) == len(GOOD)
    # The engine's predict at that threshold, networks run afresh; shard 1/3 (broken_grid, case_1,
    # case_4) keeps it short.
    fresh = tmp_path / "fresh"
    report = api.predict_folder(folder["model"], folder["cases"], fresh, device="cpu", threshold=threshold, shard="1/3")
    assert report.done == ["case_1", "case_4"]
    predicted = results.read_table(fresh)
    for case_id in report.done:
        np.testing.assert_array_equal(read_array(results.output_paths(work, case_id)[1]),
                                      read_array(results.output_paths(fresh, case_id)[1]))
        for name in ("threshold", "anomaly_ml", "components", "largest_component_ml", "dice", "auprc"):
            assert getattr(rows[case_id], name) == pytest.approx(getattr(predicted[case_id], name), rel=1e-6), name
    assert all(rows[c].threshold == threshold for c in GOOD)
    # The loaded case follows, and the original results are untouched.
    np.testing.assert_array_equal(logic.segmentArray(loaded.anomaly), read_array(results.output_paths(work, "case_1")[1]))
    assert results.read_table(folder["results"])["case_1"].threshold != threshold
    with pytest.raises(errors.InputError, match="finite"):
        logic.applyThresholdToFolder(float("nan"))


def test_a_browsed_case_leaves_out_the_regions_its_folder_left_out(mrml, folder, tmp_path):
    """A folder predicted with postprocess.min_component_mm3: the browsed case's segment follows it at every
    threshold, as `admanomaly threshold` does (the folder's report.json says what its labels were made with)."""
    from ADMAnomalyLib.postprocess import anomaly_label, component_voxels

    cleaned = api.with_postprocess(api.load_model(folder["model"]), {"min_component_mm3": 30.0})
    out = tmp_path / "cleaned"
    assert api.predict_folder(cleaned, folder["cases"], out, device="cpu", shard="1/3").done == ["case_1", "case_4"]
    logic = ADMAnomalyCoreLogic()
    logic.openFolder(folder["cases"], out, model=folder["model"])
    loaded = logic.loadCase("case_1")
    assert logic.minComponentMm3(loaded.energy) == 30.0
    np.testing.assert_array_equal(logic.segmentArray(loaded.anomaly), read_array(results.output_paths(out, "case_1")[1]))
    energy, brain = slicer.util.arrayFromVolume(loaded.energy), logic.brainMask(loaded.energy)
    low = float(np.percentile(energy[brain], 80.0))
    logic.setThreshold(loaded.anomaly, threshold=low)
    expected = anomaly_label(energy, brain, low, component_voxels(30.0, loaded.energy.GetSpacing()))
    np.testing.assert_array_equal(logic.segmentArray(loaded.anomaly), expected)
    assert 0 < expected.sum() < ((energy >= low) & brain).sum()
    logic.closeFolder()


def test_the_case_table_round_trips_and_agrees_with_the_cli(mrml, folder, tmp_path):
    panel, shell = copy_results(folder, tmp_path, "panel"), copy_results(folder, tmp_path, "shell")
    logic = ADMAnomalyCoreLogic()
    rows = logic.openFolder(folder["cases"], panel, model=folder["model"])
    # The panel's rows are the file's rows (after predict, every case has one).
    assert {r.case_id: r for r in rows} == results.read_table(folder["results"])
    results.write_table(tmp_path, rows)
    assert results.read_table(tmp_path) == {r.case_id: r for r in rows}
    assert (tmp_path / "cases.csv").read_text(encoding="utf-8") == (folder["results"] / "cases.csv").read_text(encoding="utf-8")

    threshold = rows[index_of(logic, "case_0")].threshold + 0.75
    logic.applyThresholdToFolder(threshold)
    command = [sys.executable, "-m", "ADMAnomalyLib.cli", "threshold", str(shell), "--threshold", repr(threshold)]
    done = subprocess.run(command, capture_output=True, text=True, encoding="utf-8", cwd=REPO, timeout=120)
    assert done.returncode == 0, done.stderr

    def without_time(table):
        return {case_id: {**vars(r), "updated": ""} for case_id, r in table.items()}

    assert without_time(results.read_table(panel)) == without_time(results.read_table(shell))
    assert without_time({r.case_id: r for r in logic.caseRecords()}) == without_time(results.read_table(shell))


def test_saved_threshold_model_is_a_copy_with_its_provenance(mrml, folder, tmp_path):
    work = copy_results(folder, tmp_path)
    logic = ADMAnomalyCoreLogic()
    logic.openFolder(folder["cases"], work, model=folder["model"])
    logic.loadCase("case_0")
    logic.loadCase("case_3")
    original = api.load_model(folder["model"])
    digest = hashlib.sha256(folder["model"].read_bytes()).hexdigest()
    threshold = original.threshold + 0.5
    logic.applyThresholdToFolder(threshold)
    path = logic.saveThresholdModel(tmp_path / "tuned.admm")
    tuned = api.load_model(path)
    assert tuned.threshold == threshold
    note = tuned.metadata["threshold_history"][-1]
    assert note["threshold"] == threshold and note["previous_threshold"] == original.threshold
    assert note["cases"] == GOOD and note["viewed"] == ["case_0", "case_3"] and note["results"] == str(work)
    assert note["applied_to_cases"] is True
    assert "interactively" in note["chosen"] and note["source_model"] == results.model_identity(original)
    assert tuned.metadata.get("validation") == original.metadata.get("validation")
    for name, tensor in original.network.state_dict().items():
        assert np.array_equal(tensor.numpy(), tuned.network.state_dict()[name].numpy()), name
    assert hashlib.sha256(folder["model"].read_bytes()).hexdigest() == digest  # a copy: the original stays
    explicit = api.load_model(logic.saveThresholdModel(tmp_path / "explicit.admm", threshold=1.25))
    assert explicit.threshold == 1.25 and explicit.metadata["threshold_history"][-1]["applied_to_cases"] is False
    with pytest.raises(errors.OutputError, match="the model itself"):
        logic.saveThresholdModel(folder["model"])


def test_results_of_another_model_are_not_mixed(mrml, folder, tmp_path):
    other = api.load_model(folder["model"]).with_threshold(1.0, {"chosen": "test"}).save(tmp_path / "other.admm")
    logic = ADMAnomalyCoreLogic()
    logic.openFolder(folder["cases"], folder["results"], model=other)
    for call in (logic.runMissing, lambda: logic.saveThresholdModel(tmp_path / "x.admm")):
        with pytest.raises(errors.InputError, match="made with tiny.admm@"):
            call()
    assert not (tmp_path / "x.admm").exists()


# -- Run missing in the background -----------------------------------------------------------------

def test_run_missing_in_the_background_fills_the_table(mrml, folder, tmp_path):
    work = copy_results(folder, tmp_path)
    table = results.read_table(work)
    for case_id in ("case_4", "case_5"):
        del table[case_id]
        for path in results.output_paths(work, case_id):
            path.unlink()
    results.write_table(work, table.values())
    logic = ADMAnomalyCoreLogic()
    rows = {r.case_id: r for r in logic.openFolder(folder["cases"], work, model=folder["model"])}
    assert rows["case_4"].status == rows["case_5"].status == "not run"

    job = logic.startRunMissing(device="cpu")
    assert "--threshold" in job.args  # the folder's threshold, so that done cases stay as they are
    finished = []
    while not job.finished:
        for case_id in job.poll():
            # The table has each case as soon as its event arrives.
            assert results.read_table(work)[case_id].status in ("done", "failed")
            finished.append(case_id)
        assert 0.0 <= job.fraction() <= 1.0
        time.sleep(0.2)
    summary = job.finish()
    assert summary["done"] == ["case_4", "case_5"] and sorted(summary["skipped"]) == GOOD[:4]
    assert set(summary["failed"]) == {BROKEN_GRID, BROKEN_MISSING}
    assert job.casesDone == job.casesTotal == len(GOOD) + 2 and job.fraction() == 1.0
    rows = {r.case_id: r for r in logic.caseRecords()}
    assert all(rows[c].status == "done" for c in GOOD) and len({rows[c].threshold for c in GOOD}) == 1
    np.testing.assert_array_equal(read_array(results.output_paths(work, "case_4")[1]),
                                  read_array(results.output_paths(folder["results"], "case_4")[1]))

    # Cancel: the job ends as cancelled and leaves no partial output.
    logic.openFolder(folder["cases"], tmp_path / "cancelled", model=folder["model"])
    job = logic.startRunMissing(device="cpu")
    job.cancel()
    with pytest.raises(errors.CancelledError):
        job.finish()
    leftovers = list((tmp_path / "cancelled").glob("*.tmp*")) if (tmp_path / "cancelled").exists() else []
    assert not leftovers


# -- the panel's wiring, with stand-ins for the Qt widgets (no Qt here) ------------------------------

class _Widget:
    """A Qt widget stand-in: properties are plain attributes, other calls are recorded and do nothing."""

    def __init__(self) -> None:
        self.text, self.enabled, self.value, self.calls = "", True, 0, []

    def __getattr__(self, name):
        return lambda *args: self.calls.append((name, args))


class _Table(_Widget):
    def __init__(self) -> None:
        super().__init__()
        self.cells: dict[tuple[int, int], str] = {}
        self.selected = None

    def setRowCount(self, rows: int) -> None:
        self.rows = rows
        self.cells = {cell: text for cell, text in self.cells.items() if cell[0] < rows}

    def setItem(self, row: int, column: int, item) -> None:
        self.cells[row, column] = item.text

    def selectRow(self, row: int) -> None:
        self.selected = row


class _Parameters:
    """The parameter node's fields the cases section reads and writes."""

    def __init__(self, **fields) -> None:
        self.__dict__.update({"flair": None, "t1": None, "t1c": None, "t2": None, "energyVolume": None,
                              "anomalySegmentation": None, "thresholdMode": "energy", "threshold": 0.0,
                              "percentile": 99.0, "device": "cpu", "modelPath": "", **fields})

    def StartModify(self) -> int:
        return 0

    def EndModify(self, was: int) -> None:
        pass


def test_the_panel_shows_the_table_and_steps_through_cases(folder, mrml, monkeypatch, tmp_path):
    import importlib.util
    import types

    class _Item:
        def __init__(self, text: str) -> None:
            self.text = text

        def __getattr__(self, name):
            return lambda *args: None

    qt = types.ModuleType("qt")
    qt.QTableWidgetItem, qt.QBrush, qt.QColor = _Item, (lambda *a: None), (lambda *a: None)
    scripted = types.ModuleType("slicer.ScriptedLoadableModule")
    for name in ("ScriptedLoadableModule", "ScriptedLoadableModuleWidget", "ScriptedLoadableModuleLogic",
                 "ScriptedLoadableModuleTest"):
        setattr(scripted, name, type(name, (), {"__init__": lambda self, *args: None}))
    wrapper = types.ModuleType("slicer.parameterNodeWrapper")
    wrapper.parameterNodeWrapper = lambda cls: cls
    wrapper.Choice = wrapper.WithinRange = lambda *args: None
    monkeypatch.setitem(sys.modules, "qt", qt)
    monkeypatch.setitem(sys.modules, "slicer.ScriptedLoadableModule", scripted)
    monkeypatch.setitem(sys.modules, "slicer.parameterNodeWrapper", wrapper)
    monkeypatch.setattr(slicer.util, "resetSliceViews", lambda: None)
    spec = importlib.util.spec_from_file_location("ADMAnomaly_panel", REPO / "ADMAnomaly" / "ADMAnomaly.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)

    widget = module.ADMAnomalyWidget()
    widget.ui = types.SimpleNamespace(**{name: _Table() if name == "casesTable" else _Widget()
                                        for name in module.EXPECTED_WIDGETS})
    widget.logic = module.ADMAnomalyLogic()
    work = copy_results(folder, tmp_path)
    widget._parameterNode = _Parameters(casesFolder=str(folder["cases"]), resultsFolder=str(work),
                                        modelPath=str(folder["model"]))
    widget.openCaseFolder()
    table = widget.ui.casesTable
    assert table.rows == len(GOOD) + 2 and table.cells[0, 0] == BROKEN_GRID
    assert table.cells[0, 1].startswith("failed: ") and "size" in table.cells[0, 1]
    assert table.cells[2, 0] == "case_0" and table.cells[2, 1] == "done" and float(table.cells[2, 5]) > 0
    assert "6 with results, 2 failed" in widget.ui.casesStatusLabel.text

    widget.showCase(widget.logic.nextCase)  # failed in predict: its volumes, and why it failed
    assert widget.ui.casesStatusLabel.text.startswith("broken_grid (1/8): failed: ")
    assert "size" in widget.ui.casesStatusLabel.text and widget._parameterNode.anomalySegmentation is None
    widget.showCase(widget.logic.nextCase)  # cannot be loaded: the error is shown, the previous case stays
    assert "missing contrast" in widget.ui.casesStatusLabel.text
    assert widget._parameterNode.flair.GetName() == "broken_grid_flair"
    widget.showCase(widget.logic.nextCase)
    p = widget._parameterNode
    assert p.flair.GetName() == "case_0_flair" and p.t1c.GetName() == "case_0_t1ce"
    assert p.anomalySegmentation is not None and p.energyVolume.GetScene() is mrml.scene
    assert p.threshold == results.read_table(work)["case_0"].threshold
    assert table.selected == 2 and widget.ui.previousCaseButton.enabled and widget.ui.nextCaseButton.enabled
    assert widget.ui.casesStatusLabel.text.startswith("case_0 (3/8): stored results")

    # Apply to all in the background (the engine's threshold command); the loaded case and the slider follow.
    monkeypatch.setattr(slicer.util, "confirmOkCancelDisplay", lambda *args: True, raising=False)
    p.threshold = p.threshold + 0.5
    p.anomalySegmentation.SetAttribute(module.THRESHOLD_ATTRIBUTE, repr(p.threshold))  # as the slider applies it
    widget._pollTimer = _Widget()
    widget.onApplyToAll()
    assert widget._folderJob is not None and widget.ui.runMissingButton.text == "Cancel"
    while widget._folderJob is not None:
        widget._folderJob.process.wait(120)
        widget.pollFolderJob()
    assert "rewritten" in widget.ui.casesStatusLabel.text, widget.ui.casesStatusLabel.text
    assert all(r.threshold == p.threshold for r in results.read_table(work).values() if r.done)
    np.testing.assert_array_equal(widget.logic.segmentArray(p.anomalySegmentation),
                                  read_array(results.output_paths(work, "case_0")[1]))
