"""The Slicer module's raw-scans option against real MRML (PyPI ``slicer-core``): four raw series on
their own grids, loaded as volume nodes, go through the panel's background job with
``preprocess="auto"`` (registration to FLAIR, brain extraction); the energy lands on the FLAIR node's
grid, the segmentation holds the anomaly and the extracted brain, and the input nodes are untouched.

The TCGA raw series are shrunk 2x in-plane (1.8 x 1.8 x 5.5 mm) to keep the test quick; the full-size
case is checked in ``test_raw.py``.
"""

from __future__ import annotations

import sys

import numpy as np
import pytest
import SimpleITK as sitk

import slicer  # PyPI slicer-core: missing it is an error, not a skip

from conftest import REPO

for entry in (REPO / "ADMAnomaly", REPO):
    if str(entry) not in sys.path:
        sys.path.insert(0, str(entry))

from ADMAnomalyCore import conversion  # noqa: E402
from ADMAnomalyCore.logic import BRAIN_SEGMENT_ID, SEGMENT_NAME, ADMAnomalyCoreLogic  # noqa: E402
from ADMAnomalyCore.standalone import StandaloneScene  # noqa: E402
from ADMAnomalyLib import errors, rawprep  # noqa: E402

RAW = (REPO / ".." / "shared" / "data" / "tcga" / "TCGA-FG-6692" / "raw").resolve()


@pytest.fixture(scope="module")
def shrunk_series(tmp_path_factory):
    folder = tmp_path_factory.mktemp("raw_small")
    paths = {}
    for contrast, path in rawprep.find_series(RAW).items():
        paths[contrast] = folder / path.name
        sitk.WriteImage(sitk.Shrink(rawprep.read_series(path), [2, 2, 1]), str(paths[contrast]))
    return paths


@pytest.fixture
def scene():
    environment = StandaloneScene()
    yield environment
    environment.close()


def _segment_array(scene, segmentation_node, segment_id, reference):
    import vtk

    labelmap = scene.scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "export")
    try:
        ids = vtk.vtkStringArray()
        ids.InsertNextValue(segment_id)
        assert slicer.vtkSlicerSegmentationsModuleLogic.ExportSegmentsToLabelmapNode(
            segmentation_node, ids, labelmap, reference)
        return slicer.util.arrayFromVolume(labelmap).copy()
    finally:
        scene.scene.RemoveNode(labelmap)


def _snapshot(node):
    return slicer.util.arrayFromVolume(node).copy(), conversion.ijk_to_ras_array(node).copy(), node.GetName()


def test_raw_scans_run_in_the_background_job_and_leave_the_inputs_untouched(scene, shrunk_series):
    nodes = [scene.load(shrunk_series[c]) for c in ("flair", "t1", "t1c", "t2")]
    before = [_snapshot(node) for node in nodes]
    logic = ADMAnomalyCoreLogic()
    # Without the raw option, series on their own grids are refused before any work.
    with pytest.raises(errors.GridMismatchError):
        logic.startInference(*nodes, device="cpu")

    job = logic.startInference(*nodes, device="cpu", preprocess="auto")
    assert job.args[job.args.index("--preprocess") + 1] == "auto"  # the engine's predict command
    job.process.wait(300)
    assert job.poll()[1] > 0, job.process.stderrText()
    energy_node, segmentation_node = job.finish(show=False)

    flair = nodes[0]
    assert energy_node.GetImageData().GetDimensions() == flair.GetImageData().GetDimensions()
    assert np.array_equal(conversion.ijk_to_ras_array(energy_node), conversion.ijk_to_ras_array(flair))
    segmentation = segmentation_node.GetSegmentation()
    names = sorted(segmentation.GetSegment(segmentation.GetNthSegmentID(i)).GetName()
                   for i in range(segmentation.GetNumberOfSegments()))
    assert names == sorted([SEGMENT_NAME, BRAIN_SEGMENT_ID])
    brain = _segment_array(scene, segmentation_node, BRAIN_SEGMENT_ID, energy_node)
    np.testing.assert_array_equal(brain > 0, logic.brainMask(energy_node))
    brain_ml = float((brain > 0).sum()) * float(np.prod(flair.GetSpacing())) / 1000.0
    assert 1200 < brain_ml < 2000  # this patient's brain in the 26-slice slab: ~1.6 L
    assert logic.segmentArray(segmentation_node).sum() > 0  # the tumour

    for node, (values, ijk_to_ras, name) in zip(nodes, before):
        assert node.GetName() == name
        assert np.array_equal(conversion.ijk_to_ras_array(node), ijk_to_ras)
        assert np.array_equal(slicer.util.arrayFromVolume(node), values)
    assert scene.count("vtkMRMLScalarVolumeNode") == 5  # the four inputs and the energy map
