"""A folder of cases and its results folder, browsed one case at a time on the MRML scene.

The case table is ``cases.csv`` of the results folder (:mod:`ADMAnomalyLib.results`), the file that
``admanomaly predict`` and ``admanomaly threshold`` write: a case counts as done only through its
row there, so the panel's table and a batch run's table are one table. Cases are found by the
engine's rules (:func:`ADMAnomalyLib.cases.discover_cases`); a case the engine cannot use is listed
as failed with its reason and the others browse normally.

Loading a case puts into the scene its four volumes, its reference label (if any) as a
segmentation and, when it is done, its stored energy map and the "Anomaly" segmentation at the
threshold the stored map was made with: the networks are not run. The previous case's nodes
(with their display and storage nodes, and any outputs made from its volumes) are removed once the
new case is in, so clicking through a folder keeps the scene's size and the memory flat.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk

import slicer

from . import conversion
from .engine import ensure_engine_importable
from .logic import (BACKGROUND_REFERENCE_ROLE, ENERGY_REFERENCE_ROLE, MODEL_THRESHOLD_ATTRIBUTE,
                    ensure_segmentation_converter_rules)

ensure_engine_importable()

from ADMAnomalyLib import errors, results  # noqa: E402  (torch-free)
from ADMAnomalyLib.cases import CaseFiles, check_same_grid, discover_cases  # noqa: E402
from ADMAnomalyLib.config import CONTRASTS, PreprocessConfig  # noqa: E402
from ADMAnomalyLib.io import read_image  # noqa: E402

log = logging.getLogger(__name__)

CASE_ATTRIBUTE = "ADMAnomaly.Case"
"""Set on every node a loaded case brings into the scene (its value: the case id)."""
REFERENCE_SEGMENT_NAME = "Reference"
REFERENCE_COLOR = (1.0, 0.85, 0.1)
"""Yellow outline: apart from the cyan anomaly and the warm energy colour map."""


@dataclass
class LoadedCase:
    """The nodes of the case on display."""

    index: int
    record: results.CaseRecord
    """Its row of the case table when it was loaded."""
    volumes: dict[str, Any]
    """Scalar volume nodes by contrast (``flair``, ``t1``, ``t1c``, ``t2``), each on its file's grid."""
    reference: Any = None
    """Segmentation node of the reference label (None without a readable label)."""
    energy: Any = None
    """Energy volume node from the stored energy map (None for a case without results)."""
    anomaly: Any = None
    """"Anomaly" segmentation node linked to ``energy`` (None without results)."""

    @property
    def caseId(self) -> str:
        return self.record.case_id

    def nodes(self) -> list:
        return [*self.volumes.values(), *(n for n in (self.reference, self.energy, self.anomaly) if n is not None)]


@dataclass
class CaseBrowser:
    """A cases folder and its results folder; one case at a time in the scene of ``logic``.

    Made by ``ADMAnomalyCoreLogic.openFolder``; console users call the logic's methods."""

    logic: Any
    casesDir: Path
    resultsDir: Path
    model: Any = None
    """Model (path, None for the bundled one, or a loaded model) for *Run missing* and the saved threshold."""
    pattern: dict[str, str] | None = None
    cases: list[CaseFiles] = field(default_factory=list)
    table: dict[str, results.CaseRecord] = field(default_factory=dict)
    """Rows of ``cases.csv`` by case id."""
    loadFailures: dict[str, str] = field(default_factory=dict)
    """Cases that could not be loaded in this session, with the reason (not written to the table)."""
    index: int | None = None
    """The case last asked for (also when it could not be loaded: Next continues after it)."""
    loaded: LoadedCase | None = None
    viewed: list[str] = field(default_factory=list)
    """Ids of the cases loaded in this session, in order (the provenance of a saved threshold)."""

    @classmethod
    def open(cls, logic, casesDir, resultsDir, model=None, pattern=None) -> "CaseBrowser":
        """Find the cases of ``casesDir`` (InputError when there is none) and read the table of ``resultsDir``."""
        if not casesDir or not str(casesDir).strip():
            raise errors.InputError("choose the folder of cases")
        if not resultsDir or not str(resultsDir).strip():
            raise errors.InputError("choose the results folder (where predict writes, or has written, its outputs)")
        casesDir, resultsDir = Path(casesDir), Path(resultsDir)
        if resultsDir.exists() and not resultsDir.is_dir():
            raise errors.InputError(f"{resultsDir}: not a folder")
        browser = cls(logic, casesDir, resultsDir, model, pattern, discover_cases(casesDir, pattern))
        browser.refresh()
        return browser

    # -- the table -----------------------------------------------------------------------------
    def refresh(self) -> list[results.CaseRecord]:
        """Re-read ``cases.csv`` (a job or the CLI may have written it) and return the rows. When the
        loaded case's stored map now has another threshold, its segmentation follows it."""
        self.table = results.read_table(self.resultsDir) if self.resultsDir.is_dir() else {}
        loaded = self.loaded
        if loaded is not None and loaded.anomaly is not None:
            record = self.record(loaded.index)
            if record.done and record.threshold is not None and record.threshold != loaded.record.threshold:
                self.logic.setThreshold(loaded.anomaly, threshold=record.threshold)
                loaded.energy.SetAttribute(MODEL_THRESHOLD_ATTRIBUTE, repr(record.threshold))
                loaded.record = record
        return self.rows()

    def record(self, index: int) -> results.CaseRecord:
        """The table row of case ``index``: broken cases are failed with their reason, cases without a
        row are not run."""
        files = self.cases[index]
        row = self.table.get(files.case_id)
        if files.case_id in self.loadFailures:
            return results.CaseRecord(files.case_id, results.STATUS_FAILED, reason=self.loadFailures[files.case_id])
        if files.problem is not None and (row is None or row.status != results.STATUS_FAILED):
            return results.CaseRecord(files.case_id, results.STATUS_FAILED, reason=files.problem)
        return row or results.CaseRecord(files.case_id)

    def rows(self) -> list[results.CaseRecord]:
        """One row per case of the folder, in the folder's (sorted) order."""
        return [self.record(index) for index in range(len(self.cases))]

    def indexOf(self, case) -> int:
        """Index of a case given by index or id."""
        if isinstance(case, str):
            for index, files in enumerate(self.cases):
                if files.case_id == case:
                    return index
            raise errors.InputError(f"no case '{case}' in {self.casesDir}")
        index = int(case)
        if not 0 <= index < len(self.cases):
            raise errors.InputError(f"case index {index} outside 0..{len(self.cases) - 1}")
        return index

    def doneRecords(self) -> list[results.CaseRecord]:
        return [record for record in self.rows() if record.done]

    def threshold(self) -> float | None:
        """The threshold every done case's stored map was made with (None: no done case, or several)."""
        thresholds = {record.threshold for record in self.doneRecords()}
        return thresholds.pop() if len(thresholds) == 1 else None

    # -- loading -------------------------------------------------------------------------------
    def load(self, case) -> LoadedCase:
        """Load case ``case`` (index or id) and remove the previous one. A case that cannot be loaded
        raises its InputError, is listed as failed, and leaves the previous case on display."""
        index = self.indexOf(case)
        self.index = index
        files = self.cases[index]
        self.loadFailures.pop(files.case_id, None)  # tried afresh, with its row of the table
        try:
            loaded = self._load(index, files)
        except errors.ADMError as exc:
            self.loadFailures[files.case_id] = str(exc)
            raise
        previous, self.loaded = self.loaded, loaded
        if previous is not None:
            self.unloadNodes(previous)
        if files.case_id not in self.viewed:
            self.viewed.append(files.case_id)
        self.show(loaded)
        return loaded

    def step(self, delta: int) -> LoadedCase:
        """Load the case ``delta`` places after the current one (the first case when none is current)."""
        if not self.cases:
            raise errors.InputError("the folder has no case")
        index = 0 if self.index is None else self.index + delta
        if not 0 <= index < len(self.cases):
            raise errors.InputError("this is the last case" if delta > 0 else "this is the first case")
        return self.load(index)

    def _load(self, index: int, files: CaseFiles) -> LoadedCase:
        if files.problem is not None:
            raise errors.InputError(files.problem)
        # The engine's reader (truncated files, NaNs ... are errors), the voxels as stored (no float
        # copy) and each volume on its own grid: the views place volumes in world coordinates, so a
        # case whose series lie on different grids (raw scans, or a failed case) can still be looked at.
        images = {contrast: read_image(files.contrasts[contrast]) for contrast in CONTRASTS}
        flair_image = images[CONTRASTS[0]]
        record = self.record(index)
        scene = self.logic.scene
        loaded = LoadedCase(index, record, {})
        try:
            for contrast in CONTRASTS:
                name = scene.GenerateUniqueName(_file_stem(files.contrasts[contrast]))
                node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
                loaded.volumes[contrast] = node
                conversion.update_volume_node_from_sitk(node, images[contrast])
                self.logic.volumeDisplay(node, *_grey_window(sitk.GetArrayViewFromImage(images[contrast])))
            flair_node = loaded.volumes[CONTRASTS[0]]
            # The label only feeds the display and the figures: an unreadable one does not fail the case.
            label = results.read_reference(files.label, flair_image)
            if label is not None:
                loaded.reference = self._referenceSegmentation(label, flair_node, files.case_id)
            if record.done:
                energy_path, _ = results.output_paths(self.resultsDir, files.case_id)
                energy = read_image(energy_path)
                check_same_grid(energy, flair_image, str(energy_path), f"the FLAIR of case {files.case_id}",
                                PreprocessConfig().grid_tolerance)
                brain = sitk.GetImageFromArray(results.brain_of_energy(sitk.GetArrayViewFromImage(energy)).astype(np.uint8))
                brain.CopyInformation(energy)
                # The segmentation is the stored map: the energy at the threshold it was made with.
                loaded.energy, loaded.anomaly = self.logic.createOutputNodes(
                    energy, brain, record.threshold, flair_node, threshold=record.threshold, show=False,
                    minComponentMm3=results.folder_min_component_mm3(self.resultsDir))
            for node in loaded.nodes():
                node.SetAttribute(CASE_ATTRIBUTE, files.case_id)
        except BaseException:
            self.unloadNodes(loaded)
            raise
        return loaded

    def _referenceSegmentation(self, label: sitk.Image, flairNode, caseId: str):
        """A segmentation (one segment: every non-zero label voxel, as the figures count it) on the FLAIR grid."""
        ensure_segmentation_converter_rules()
        scene = self.logic.scene
        node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", scene.GenerateUniqueName(f"{caseId} reference"))
        node.CreateDefaultDisplayNodes()
        node.SetReferenceImageGeometryParameterFromVolumeNode(flairNode)
        segmentId = node.GetSegmentation().AddEmptySegment(REFERENCE_SEGMENT_NAME, REFERENCE_SEGMENT_NAME,
                                                           REFERENCE_COLOR)
        labelmap = conversion.oriented_labelmap(sitk.GetArrayViewFromImage(label) != 0, flairNode)
        if not slicer.vtkSlicerSegmentationsModuleLogic.SetBinaryLabelmapToSegment(
                labelmap, node, segmentId, slicer.vtkSlicerSegmentationsModuleLogic.MODE_REPLACE):
            scene.RemoveNode(node)
            raise errors.OutputError(f"could not show the reference label of case {caseId}")
        display = node.GetDisplayNode()
        display.SetVisibility2DFill(False)  # an outline, so the anomaly and the energy stay visible
        display.SetVisibility2DOutline(True)
        display.SetSliceIntersectionThickness(2)
        return node

    def show(self, loaded: LoadedCase) -> None:
        """Views as after *Apply*: FLAIR background, energy foreground, anomaly and reference outlined."""
        if loaded.anomaly is not None:
            self.logic.showResults(loaded.anomaly, background=loaded.volumes[CONTRASTS[0]])
        else:
            self.logic.showVolumes(loaded.volumes[CONTRASTS[0]], None)

    def unloadNodes(self, loaded: LoadedCase) -> None:
        """Remove a case's nodes, outputs made from its volumes (e.g. by *Apply*), and their display
        and storage nodes."""
        scene = self.logic.scene
        volumeIds = {node.GetID() for node in loaded.volumes.values() if node.GetScene() is scene}
        nodes = [node for node in loaded.nodes() if node.GetScene() is scene]
        energies = [node for node in _nodes_by_class(scene, "vtkMRMLScalarVolumeNode")
                    if node.GetNodeReferenceID(BACKGROUND_REFERENCE_ROLE) in volumeIds]
        energyIds = {node.GetID() for node in energies}
        segmentations = [node for node in _nodes_by_class(scene, "vtkMRMLSegmentationNode")
                         if node.GetNodeReferenceID(ENERGY_REFERENCE_ROLE) in energyIds]
        for node in dict.fromkeys(nodes + energies + segmentations):  # unique, in order
            self.logic.forgetNode(node)
            _remove_with_dependents(scene, node)
        loaded.volumes.clear()
        loaded.reference = loaded.energy = loaded.anomaly = None

    def close(self) -> None:
        if self.loaded is not None:
            self.unloadNodes(self.loaded)
            self.loaded = None


def _grey_window(array: np.ndarray) -> tuple[float, float]:
    """A window over the 0.5th..99.5th percentile of the non-zero voxels (the head), from every
    second voxel along each axis: as readable as Slicer's automatic window, at a fraction of its cost."""
    sample = array[::2, ::2, ::2]
    values = sample[sample != 0]
    if values.size == 0:
        values = sample.ravel()
    low, high = np.percentile(values, [0.5, 99.5])
    return float(low), float(high)


def _file_stem(path: Path) -> str:
    """``case_flair.nii.gz`` -> ``case_flair`` (the volume's name, as Slicer's *Add data* names it)."""
    return Path(path).name.split(".")[0]


def _nodes_by_class(scene, className: str) -> list:
    """The scene's nodes of a class. Not ``scene.GetNodesByClass``: the collection it returns is
    never released from Python and keeps every node in it (and its voxels) alive."""
    return [scene.GetNthNodeByClass(i, className) for i in range(scene.GetNumberOfNodesByClass(className))]


def _remove_with_dependents(scene, node) -> None:
    """Remove ``node`` with its display and storage nodes (``RemoveNode`` leaves them behind)."""
    dependents = []
    if hasattr(node, "GetNumberOfDisplayNodes"):
        dependents += [node.GetNthDisplayNode(i) for i in range(node.GetNumberOfDisplayNodes())]
    if hasattr(node, "GetNumberOfStorageNodes"):
        dependents += [node.GetNthStorageNode(i) for i in range(node.GetNumberOfStorageNodes())]
    scene.RemoveNode(node)
    for dependent in dependents:
        if dependent is not None and dependent.GetScene() is scene:
            scene.RemoveNode(dependent)
