"""Console / batch API of the module on the MRML scene, without Qt or ``slicer.app``.

``ADMAnomalyLogic`` in ``ADMAnomaly.py`` derives from :class:`ADMAnomalyCoreLogic`; everything
here also runs against the PyPI package ``slicer-core`` (see ``Testing/Python/test_slicer_logic.py``).

Typical console use (blocking)::

    logic = slicer.util.getModuleLogic("ADMAnomaly")
    energy, anomaly = logic.run(flair, t1, t1c, t2)              # bundled model, device "auto"
    stats = logic.setThreshold(anomaly, percentile=99.5)          # re-threshold, no re-inference
    report = logic.processFolder("cases/", "out/")                # resumable batch on files
    logic.train("normals/", "mine.admm", preset="small")

A folder of cases, one case at a time (the table is ``results/cases.csv``, as ``predict`` writes it)::

    rows = logic.openFolder("cases/", "results/")                 # CaseRecord per case: status, mL, Dice ...
    case = logic.loadCase(0)                                      # volumes, label, stored energy + anomaly
    case = logic.nextCase()                                       # the previous case's nodes are removed
    logic.runMissing()                                            # cases without results (blocking)
    rows = logic.applyThresholdToFolder(3.2)                      # every anomaly map, from stored energy
    logic.saveThresholdModel("tuned.admm")                        # model copy with that threshold

Failures are :class:`ADMAnomalyLib.errors.ADMError` subclasses with a one-line message; a failed
call leaves no new node in the scene and keeps earlier results untouched.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import SimpleITK as sitk

import slicer

from . import conversion
from .engine import DependencyError, describe_missing, ensure_engine_importable, missing_dependencies
from .naming import CONTRAST_LABELS, case_name, guess_contrast_roles

ensure_engine_importable()

from ADMAnomalyLib import errors  # noqa: E402  (torch-free)
from ADMAnomalyLib.config import CONTRASTS  # noqa: E402  (torch-free)

log = logging.getLogger(__name__)

ROLE_ATTRIBUTE = "ADMAnomaly.Role"
MODEL_PATH_ATTRIBUTE = "ADMAnomaly.ModelPath"
MODEL_THRESHOLD_ATTRIBUTE = "ADMAnomaly.ModelThreshold"
MIN_COMPONENT_ATTRIBUTE = "ADMAnomaly.MinComponentMm3"
"""The model's ``postprocess.min_component_mm3``: regions under it are left out of the anomaly segment."""
BRAIN_MINIMUM_ATTRIBUTE = "ADMAnomaly.BrainMinimumEnergy"
THRESHOLD_ATTRIBUTE = "ADMAnomaly.Threshold"
PERCENTILE_ATTRIBUTE = "ADMAnomaly.Percentile"
ENERGY_REFERENCE_ROLE = "ADMAnomalyEnergy"
BACKGROUND_REFERENCE_ROLE = "ADMAnomalyBackground"
SEGMENT_NAME = "Anomaly"
SEGMENT_ID = "Anomaly"
SEGMENT_COLOR = (0.1, 0.9, 1.0)
BRAIN_SEGMENT_ID = "Brain"
"""Segment holding the extracted brain mask when raw scans are preprocessed."""
BRAIN_SEGMENT_COLOR = (0.95, 0.75, 0.2)
"""Cyan: stands out against the grey MRI background and the warm energy colour map."""
SEGMENT_TERMINOLOGY = (
    "Segmentation category and type - 3D Slicer General Anatomy list"
    "~SCT^49755003^Morphologically Altered Structure~SCT^52988006^Lesion~^^"
    "~Anatomic codes - DICOM master list~SCT^12738006^Brain~^^"
)
"""Terminology entry of the segment: morphologically altered structure / lesion, in the brain."""
ENERGY_COLOR_NODE_IDS = (
    "vtkMRMLColorTableNodeFileInferno.txt",
    "vtkMRMLPETProceduralColorNodePET-Heat",
    "vtkMRMLColorTableNodeIron",
)
"""Preferred colour maps of the energy volume, first found wins (Inferno is in the Slicer app)."""
FOREGROUND_OPACITY = 0.5

ProgressCallback = Callable[[int, int], None]
CancelCallback = Callable[[], bool]


def engine_api():
    """``ADMAnomalyLib.api``, or a :class:`DependencyError` saying what to install (it needs torch)."""
    try:
        from ADMAnomalyLib import api
    except ImportError as exc:
        missing = missing_dependencies()
        reason = describe_missing(missing) if missing else f"the engine cannot be imported ({exc})"
        raise DependencyError(reason + "; in Slicer run logic.ensureDependencies() or click Apply") from None
    return api


def chosenPath(value) -> Path | None:
    """A path the user chose, or None for an empty one ("" or ".", what an empty path field gives
    a ``pathlib.Path`` parameter)."""
    text = str(value).strip() if value is not None else ""
    return None if text in ("", ".") else Path(text)


def ensure_segmentation_converter_rules() -> None:
    """Register the binary labelmap <-> closed surface conversion rules when nobody has (the Slicer
    application's Segmentations module does; ``PythonSlicer`` and ``slicer-core`` alone do not).
    Without them a segment's binary labelmap representation cannot be created."""
    factory = slicer.vtkSegmentationConverterFactory.GetInstance()
    if factory.GetConverterRules():
        return
    for rule in ("vtkBinaryLabelmapToClosedSurfaceConversionRule", "vtkClosedSurfaceToBinaryLabelmapConversionRule",
                 "vtkClosedSurfaceToFractionalLabelmapConversionRule",
                 "vtkFractionalLabelmapToClosedSurfaceConversionRule"):
        if hasattr(slicer, rule):
            factory.RegisterConverterRule(getattr(slicer, rule)())


@dataclass
class ThresholdResult:
    """What :meth:`ADMAnomalyCoreLogic.setThreshold` applied and measured."""

    threshold: float
    """Energy threshold applied (voxels with energy >= threshold inside the brain are anomalous)."""
    percentile: float | None
    """Percentile of brain voxels the threshold came from (None in energy mode)."""
    voxels: int
    volumeMl: float
    components: int
    """Connected components (face connectivity) of the anomaly."""

    def summary(self) -> str:
        return (f"threshold {self.threshold:.4g}: {self.volumeMl:.2f} mL in {self.components} "
                f"component{'s' if self.components != 1 else ''}")


class ADMAnomalyCoreLogic:
    """MRML side of the module: inputs -> engine -> energy volume + "Anomaly" segmentation."""

    chosenPath = staticmethod(chosenPath)

    def __init__(self, scene=None) -> None:
        self._scene = scene
        self._modelCache: dict[tuple[str, float], Any] = {}
        self._brainMasks: dict[str, np.ndarray] = {}
        self.caseBrowser = None
        """The open folder of cases (:class:`.casebrowser.CaseBrowser`), see :meth:`openFolder`."""

    # -- scene ---------------------------------------------------------------------------------
    @property
    def scene(self):
        """The MRML scene worked on (``slicer.mrmlScene`` unless one was given)."""
        scene = self._scene if self._scene is not None else getattr(slicer, "mrmlScene", None)
        if scene is None:
            raise RuntimeError("no MRML scene: set slicer.mrmlScene or pass scene= to the logic")
        return scene

    # -- inputs --------------------------------------------------------------------------------
    @staticmethod
    def inputsByContrast(flair, t1, t1c, t2) -> dict[str, Any]:
        return dict(zip(CONTRASTS, (flair, t1, t1c, t2)))

    def validateInputs(self, flair, t1, t1c, t2, tolerance: float | None = None, sameGrid: bool = True) -> dict[str, Any]:
        """Check the four inputs before any work: present, scalar (not labelmap) volumes with voxels,
        one parent transform and (``sameGrid``; raw scans are registered instead) one voxel grid.
        Returns them keyed by contrast.

        Raises :class:`~ADMAnomalyLib.errors.InputError` or
        :class:`~ADMAnomalyLib.errors.GridMismatchError` naming the volume at fault."""
        from ADMAnomalyLib.cases import check_same_grid

        nodes = self.inputsByContrast(flair, t1, t1c, t2)
        missing = [CONTRAST_LABELS[c] for c, node in nodes.items() if node is None]
        if missing:
            raise errors.InputError(f"select the {', '.join(missing)} volume{'s' if len(missing) > 1 else ''}")
        for contrast, node in nodes.items():
            label = f"{CONTRAST_LABELS[contrast]} volume '{node.GetName()}'"
            if node.IsA("vtkMRMLLabelMapVolumeNode"):
                raise errors.InputError(f"{label} is a labelmap; select an MRI (scalar) volume")
            if node.IsA("vtkMRMLSegmentationNode"):
                raise errors.InputError(f"{label} is a segmentation; select an MRI (scalar) volume")
            if not node.IsA("vtkMRMLScalarVolumeNode") or node.IsA("vtkMRMLTensorVolumeNode"):
                raise errors.InputError(f"{label} is a {node.GetClassName()}; select a scalar volume")
            image = node.GetImageData()
            if image is None or image.GetNumberOfPoints() == 0:
                raise errors.InputError(f"{label} has no voxels")
            if image.GetNumberOfScalarComponents() != 1:
                raise errors.InputError(f"{label} has {image.GetNumberOfScalarComponents()} components per voxel")
        reference = nodes[CONTRASTS[0]]
        transform = reference.GetTransformNodeID()
        for contrast, node in nodes.items():
            if node.GetTransformNodeID() != transform:
                raise errors.GridMismatchError(
                    f"{CONTRAST_LABELS[contrast]} volume '{node.GetName()}' is under another transform than "
                    f"FLAIR volume '{reference.GetName()}'; harden the transforms first")
        if tolerance is None:
            from ADMAnomalyLib.config import PreprocessConfig

            tolerance = PreprocessConfig().grid_tolerance
        reference_header = conversion.header_image(reference)
        for contrast, node in list(nodes.items())[1:] if sameGrid else []:
            check_same_grid(conversion.header_image(node), reference_header,
                            f"{CONTRAST_LABELS[contrast]} volume '{node.GetName()}'",
                            f"FLAIR volume '{reference.GetName()}'", tolerance)
        return nodes

    def guessInputs(self, selected: dict[str, Any] | None = None) -> dict[str, Any]:
        """Volumes of the scene that look, by name, like each contrast without a node in ``selected``
        (contrast -> node or None), most recently loaded first. Labelmaps, the module's outputs and
        the volumes already selected are left out. Returns the contrasts guessed only."""
        selected = selected or {}
        empty = [contrast for contrast in CONTRASTS if selected.get(contrast) is None]
        if not empty:
            return {}
        taken = {node.GetID() for node in selected.values() if node is not None}
        scene = self.scene
        volumes = [scene.GetNthNodeByClass(i, "vtkMRMLScalarVolumeNode")
                   for i in range(scene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode"))]
        candidates = [node for node in volumes if not node.IsA("vtkMRMLLabelMapVolumeNode")
                      and not node.GetAttribute(ROLE_ATTRIBUTE) and node.GetID() not in taken]
        return guess_contrast_roles(reversed(candidates), only=empty)

    # -- model and device ----------------------------------------------------------------------
    def loadModel(self, model=None):
        """An ``ADMModel`` from None / ``"default"`` (bundled), a path, or a model object (cached by file)."""
        api = engine_api()
        if model is not None and not isinstance(model, (str, Path)):
            return model
        path = api.default_model_path() if model in (None, "", "default") else Path(model)
        try:
            key = (str(Path(path).resolve()), os.path.getmtime(path))
        except OSError:
            raise errors.ModelFileError(f"{path}: model file not found") from None
        if key not in self._modelCache:
            self._modelCache.clear()
            self._modelCache[key] = api.load_model(path)
        return self._modelCache[key]

    @staticmethod
    def modelSummary(model) -> str:
        """One line about a loaded model for the panel: preset, threshold, validation Dice."""
        threshold = "none" if model.threshold is None else f"{model.threshold:.4g}"
        text = f"preset {model.config.preset}, threshold {threshold}"
        validation = (model.metadata or {}).get("validation") or {}
        for key in ("dice", "best_f1", "dice_at_threshold"):
            value = validation.get(key) if isinstance(validation, dict) else None
            if isinstance(value, (int, float)):
                text += f", validation Dice {value:.2f}"
                break
        return text

    @staticmethod
    def resolveDevice(device: str = "auto"):
        """torch device for "auto" | "GPU"/"cuda" | "CPU"; DeviceError when a GPU is asked for but absent."""
        api = engine_api()
        return api.resolve_device((device or "auto").lower())

    def deviceDescription(self, device: str = "auto") -> str:
        api = engine_api()
        return api.describe_device(self.resolveDevice(device))

    # -- inference -----------------------------------------------------------------------------
    def run(self, flair, t1, t1c, t2, model=None, device: str = "auto", threshold: float | None = None,
            percentile: float | None = None, energyNode=None, segmentationNode=None, show: bool = True,
            progress: ProgressCallback | None = None, shouldCancel: CancelCallback | None = None,
            preprocess: str = "none"):
        """Run the model on four volume nodes (blocking) and return ``(energyNode, segmentationNode)``.

        ``preprocess`` 'auto' or 'full' treats them as raw scans (``ADMAnomalyLib.rawprep``: registered
        to FLAIR, brain extracted; the input nodes are not changed): the outputs lie on the FLAIR grid
        and the segmentation also gets a "Brain" segment.

        ``threshold`` (energy units) or ``percentile`` (of brain voxels) sets the segmentation;
        default: the model's validation threshold. Existing output nodes are overwritten only on
        success. Raises ``InputError``, ``GridMismatchError``, ``ModelFileError``, ``DeviceError``
        or ``CancelledError`` (from ``ADMAnomalyLib.errors``) with nothing added to the scene."""
        sameGrid = preprocess == "none"
        nodes = self.validateInputs(flair, t1, t1c, t2, sameGrid=sameGrid)
        api = engine_api()
        self.resolveDevice(device)
        loaded = self.loadModel(model)
        self.validateInputs(flair, t1, t1c, t2, loaded.config.preprocess.grid_tolerance, sameGrid=sameGrid)
        images = {contrast: conversion.sitk_from_volume_node(node, np.float32) for contrast, node in nodes.items()}
        prediction = api.predict(loaded, images, device=(device or "auto").lower(), progress=progress,
                                 should_cancel=shouldCancel, preprocess=preprocess)
        return self.createOutputNodes(
            prediction.energy, prediction.brain_mask, prediction.threshold, nodes[CONTRASTS[0]],
            energyNode=energyNode, segmentationNode=segmentationNode, threshold=threshold,
            percentile=percentile, modelPath=str(loaded.path) if loaded.path else None, show=show,
            brainSegment=not sameGrid, minComponentMm3=prediction.min_component_mm3)

    def createOutputNodes(self, energy: sitk.Image, brainMask: sitk.Image, modelThreshold: float | None,
                          referenceNode, energyNode=None, segmentationNode=None, threshold: float | None = None,
                          percentile: float | None = None, modelPath: str | None = None, show: bool = True,
                          brainSegment: bool = False, minComponentMm3: float = 0.0):
        """Put an engine result (energy + brain mask on the grid of ``referenceNode``) into the scene.
        ``brainSegment`` adds the brain mask as a segment "Brain" (raw scans: the extracted brain);
        ``minComponentMm3`` is the model's: at every threshold, smaller regions are left out of the segment.

        New nodes are created unless ``energyNode`` / ``segmentationNode`` are given (then they are
        overwritten). Nodes created here are removed again if anything fails."""
        energy_array = sitk.GetArrayFromImage(energy).astype(np.float32, copy=False)
        brain_array = sitk.GetArrayFromImage(brainMask) > 0
        expected = tuple(reversed(referenceNode.GetImageData().GetDimensions()))
        if energy_array.shape != expected or brain_array.shape != expected:
            raise errors.InputError(f"energy map of shape {energy_array.shape} does not match the input grid {expected}")
        if not brain_array.any():
            raise errors.InputError(f"no brain voxel found in '{referenceNode.GetName()}' (all voxels are zero?)")
        brain_minimum = float(energy_array[brain_array].min())
        if modelThreshold is None and threshold is None and percentile is None:
            percentile = 99.0
        scene = self.scene
        name = case_name(referenceNode.GetName())
        created = []
        try:
            if energyNode is None:
                energyNode = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", scene.GenerateUniqueName(f"{name} energy"))
                created.append(energyNode)
            if segmentationNode is None:
                segmentationNode = scene.AddNewNodeByClass("vtkMRMLSegmentationNode",
                                                           scene.GenerateUniqueName(f"{name} {SEGMENT_NAME}"))
                created.append(segmentationNode)
            wasModifying = energyNode.StartModify()
            conversion.update_volume_node_from_sitk(energyNode, energy, reference_node=referenceNode)
            energyNode.SetAndObserveTransformNodeID(referenceNode.GetTransformNodeID())
            energyNode.SetAttribute(ROLE_ATTRIBUTE, "energy")
            energyNode.SetAttribute(BRAIN_MINIMUM_ATTRIBUTE, repr(brain_minimum))
            energyNode.SetAttribute(MODEL_THRESHOLD_ATTRIBUTE, "" if modelThreshold is None else repr(float(modelThreshold)))
            energyNode.SetAttribute(MODEL_PATH_ATTRIBUTE, modelPath or "")
            energyNode.SetAttribute(MIN_COMPONENT_ATTRIBUTE, repr(float(minComponentMm3)))
            energyNode.SetNodeReferenceID(BACKGROUND_REFERENCE_ROLE, referenceNode.GetID())
            energyNode.EndModify(wasModifying)
            self._brainMasks[energyNode.GetID()] = brain_array
            self._setupEnergyDisplay(energyNode, energy_array[brain_array], brain_minimum)
            self._setupSegmentation(segmentationNode, energyNode)
            self.setThreshold(segmentationNode, threshold=threshold, percentile=percentile)
            if brainSegment:
                self._setBrainSegment(segmentationNode, brain_array, energyNode)
        except BaseException:
            for node in created:
                self._brainMasks.pop(node.GetID() or "", None)
                scene.RemoveNode(node)
            raise
        if show:
            self.showResults(segmentationNode, background=referenceNode)
        return energyNode, segmentationNode

    def _setupEnergyDisplay(self, energyNode, brainValues: np.ndarray, brainMinimum: float) -> None:
        # Colour the upper half of the brain's energies (median -> 99.5th percentile); voxels below the
        # median, and the background below the brain minimum, stay transparent so FLAIR reads through.
        low, high = (float(v) for v in np.percentile(brainValues, [50.0, 99.5]))
        colorNodeId = next((c for c in ENERGY_COLOR_NODE_IDS if self.scene.GetNodeByID(c) is not None), None)
        display = self.volumeDisplay(energyNode, low, high, colorNodeId)
        display.AutoThresholdOff()
        display.SetThreshold(max(low, brainMinimum), float(brainValues.max()) + 1.0)
        display.ApplyThresholdOn()

    def volumeDisplay(self, volumeNode, low: float, high: float, colorNodeId: str | None = None):
        """The volume's display node (made when it has none) with the window ``low``..``high`` and a
        colour map (default grey). Set directly, not by ``CreateDefaultDisplayNodes``, whose automatic
        window costs a pass over every voxel (about 0.2 s for a 240x240x155 volume)."""
        display = volumeNode.GetDisplayNode()
        if display is None:
            display = self.scene.AddNewNodeByClass("vtkMRMLScalarVolumeDisplayNode")
            display.AutoWindowLevelOff()
            volumeNode.SetAndObserveDisplayNodeID(display.GetID())
        display.AutoWindowLevelOff()
        display.SetWindowLevelMinMax(low, high if high > low else low + 1.0)
        display.SetAndObserveColorNodeID(colorNodeId or "vtkMRMLColorTableNodeGrey")
        return display

    def _setupSegmentation(self, segmentationNode, energyNode) -> str:
        ensure_segmentation_converter_rules()
        segmentationNode.CreateDefaultDisplayNodes()
        segmentationNode.SetReferenceImageGeometryParameterFromVolumeNode(energyNode)
        segmentationNode.SetAndObserveTransformNodeID(energyNode.GetTransformNodeID())
        segmentationNode.SetNodeReferenceID(ENERGY_REFERENCE_ROLE, energyNode.GetID())
        segmentationNode.SetAttribute(ROLE_ATTRIBUTE, "anomaly")
        segmentation = segmentationNode.GetSegmentation()
        segmentId = self._segmentId(segmentationNode)
        if segmentId is None:
            segmentId = segmentation.AddEmptySegment(SEGMENT_ID, SEGMENT_NAME, SEGMENT_COLOR)
        segment = segmentation.GetSegment(segmentId)
        segment.SetName(SEGMENT_NAME)
        segment.SetColor(*SEGMENT_COLOR)
        segment.SetTerminology(SEGMENT_TERMINOLOGY)
        display = segmentationNode.GetDisplayNode()
        display.SetVisibility2DOutline(True)
        display.SetVisibility2DFill(True)
        display.SetOpacity2DFill(0.3)
        display.SetOpacity2DOutline(1.0)
        display.SetSliceIntersectionThickness(2)
        return segmentId

    def _setBrainSegment(self, segmentationNode, brain: np.ndarray, energyNode) -> None:
        """The brain mask as segment "Brain" (outline only, so the anomaly stays readable)."""
        segmentation = segmentationNode.GetSegmentation()
        if segmentation.GetSegment(BRAIN_SEGMENT_ID) is None:
            segmentation.AddEmptySegment(BRAIN_SEGMENT_ID, BRAIN_SEGMENT_ID, BRAIN_SEGMENT_COLOR)
        labelmap = conversion.oriented_labelmap(brain.astype(np.uint8), energyNode)
        if not slicer.vtkSlicerSegmentationsModuleLogic.SetBinaryLabelmapToSegment(
                labelmap, segmentationNode, BRAIN_SEGMENT_ID, slicer.vtkSlicerSegmentationsModuleLogic.MODE_REPLACE):
            raise errors.OutputError(f"could not set segment '{BRAIN_SEGMENT_ID}' of '{segmentationNode.GetName()}'")
        segmentationNode.GetDisplayNode().SetSegmentVisibility2DFill(BRAIN_SEGMENT_ID, False)

    @staticmethod
    def _segmentId(segmentationNode) -> str | None:
        segmentation = segmentationNode.GetSegmentation()
        if segmentation.GetSegment(SEGMENT_ID) is not None:
            return SEGMENT_ID
        found = segmentation.GetSegmentIdBySegmentName(SEGMENT_NAME)
        return found or None

    # -- threshold -----------------------------------------------------------------------------
    def energyNodeOf(self, segmentationNode):
        """The energy volume an "Anomaly" segmentation was made from."""
        energyNode = segmentationNode.GetNodeReference(ENERGY_REFERENCE_ROLE) if segmentationNode else None
        if energyNode is None:
            raise errors.InputError("this segmentation was not made by ADMAnomaly (no energy volume linked to it)")
        return energyNode

    def forgetNode(self, node) -> None:
        """Drop what the logic remembers about a node that leaves the scene (its brain mask)."""
        self._brainMasks.pop(node.GetID() or "", None)

    def brainMask(self, energyNode) -> np.ndarray:
        """Brain mask (k, j, i bool) of an energy volume: remembered from the run, or, after a scene
        reload, the voxels at or above the brain minimum (the engine puts background below it)."""
        cached = self._brainMasks.get(energyNode.GetID())
        array = slicer.util.arrayFromVolume(energyNode)
        if cached is not None and cached.shape == array.shape:
            return cached
        minimum = energyNode.GetAttribute(BRAIN_MINIMUM_ATTRIBUTE)
        if not minimum:
            raise errors.InputError(f"'{energyNode.GetName()}' is not an ADMAnomaly energy volume")
        mask = array >= float(minimum)
        self._brainMasks[energyNode.GetID()] = mask
        return mask

    def modelThreshold(self, energyNode) -> float | None:
        value = energyNode.GetAttribute(MODEL_THRESHOLD_ATTRIBUTE) if energyNode else None
        return float(value) if value else None

    def minComponentMm3(self, energyNode) -> float:
        """Regions smaller than this (mm³) are left out of the anomaly segment (the model's setting; 0 = none)."""
        value = energyNode.GetAttribute(MIN_COMPONENT_ATTRIBUTE) if energyNode else None
        return float(value) if value else 0.0

    def energyRange(self, energyNode) -> tuple[float, float]:
        """Lowest and highest energy inside the brain (the useful slider range)."""
        values = slicer.util.arrayFromVolume(energyNode)[self.brainMask(energyNode)]
        return float(values.min()), float(values.max())

    def setThreshold(self, segmentationNode, threshold: float | None = None, percentile: float | None = None,
                     energyNode=None) -> ThresholdResult:
        """Re-threshold the stored energy map into the "Anomaly" segment (no network is re-run).

        ``threshold`` in energy units, or ``percentile`` (0-100) of the brain voxels; neither: the
        model's validation threshold. Returns the threshold, anomaly volume and component count."""
        api = engine_api()
        energyNode = energyNode or self.energyNodeOf(segmentationNode)
        if threshold is not None and percentile is not None:
            raise ValueError("give threshold or percentile, not both")
        energy = conversion.sitk_from_volume_node(energyNode, np.float32)
        brain = sitk.GetImageFromArray(self.brainMask(energyNode).astype(np.uint8))
        brain.CopyInformation(energy)
        if percentile is not None:
            if not 0.0 <= float(percentile) <= 100.0:
                raise errors.InputError(f"percentile must lie in [0, 100], not {percentile}")
            threshold = api.percentile_threshold(energy, brain, float(percentile))
        elif threshold is None:
            threshold = self.modelThreshold(energyNode)
            if threshold is None:
                raise errors.InputError("the model has no validation threshold; give a threshold or a percentile")
        threshold = float(threshold)
        if not math.isfinite(threshold):
            raise errors.InputError(f"threshold must be a finite number, not {threshold}")
        mask = api.anomaly_mask(energy, brain, threshold, self.minComponentMm3(energyNode))
        mask_array = sitk.GetArrayFromImage(mask)
        segmentId = self._segmentId(segmentationNode) or self._setupSegmentation(segmentationNode, energyNode)
        labelmap = conversion.oriented_labelmap(mask_array, energyNode)
        ok = slicer.vtkSlicerSegmentationsModuleLogic.SetBinaryLabelmapToSegment(
            labelmap, segmentationNode, segmentId, slicer.vtkSlicerSegmentationsModuleLogic.MODE_REPLACE)
        if not ok:
            raise errors.OutputError(f"could not update segment '{SEGMENT_NAME}' of '{segmentationNode.GetName()}'")
        voxels = int(mask_array.sum())
        components = 0
        if voxels:
            labels = sitk.ConnectedComponent(mask)  # kept in a variable: an array view needs its image alive
            components = int(sitk.GetArrayFromImage(labels).max())
        volume_ml = voxels * float(np.prod(energyNode.GetSpacing())) / 1000.0
        segmentationNode.SetAttribute(THRESHOLD_ATTRIBUTE, repr(threshold))
        segmentationNode.SetAttribute(PERCENTILE_ATTRIBUTE, "" if percentile is None else repr(float(percentile)))
        return ThresholdResult(threshold, None if percentile is None else float(percentile), voxels, volume_ml, components)

    def segmentArray(self, segmentationNode, energyNode=None) -> np.ndarray:
        """The "Anomaly" segment as a (k, j, i) uint8 array on the energy volume's grid."""
        import vtk

        energyNode = energyNode or self.energyNodeOf(segmentationNode)
        segmentId = self._segmentId(segmentationNode)
        labelmapNode = self.scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "__ADMAnomaly_export__")
        try:
            ids = vtk.vtkStringArray()
            ids.InsertNextValue(segmentId)
            if not slicer.vtkSlicerSegmentationsModuleLogic.ExportSegmentsToLabelmapNode(
                    segmentationNode, ids, labelmapNode, energyNode):
                raise errors.OutputError("could not export the anomaly segment")
            return (slicer.util.arrayFromVolume(labelmapNode) > 0).astype(np.uint8)
        finally:
            self.scene.RemoveNode(labelmapNode)

    # -- display -------------------------------------------------------------------------------
    def showResults(self, segmentationNode, background=None, opacity: float = FOREGROUND_OPACITY) -> None:
        """Energy as foreground (colour map, ``opacity``) over ``background`` in every slice view;
        the segmentation is shown as outline + fill by its display node."""
        energyNode = self.energyNodeOf(segmentationNode)
        background = background or energyNode.GetNodeReference(BACKGROUND_REFERENCE_ROLE)
        self.showVolumes(background, energyNode, opacity)
        display = segmentationNode.GetDisplayNode()
        if display is not None:
            display.SetVisibility(True)

    def showVolumes(self, background, foreground, opacity: float = FOREGROUND_OPACITY) -> None:
        """``background`` (kept when None) and ``foreground`` (None: none) in every slice view."""
        scene = self.scene
        for index in range(scene.GetNumberOfNodesByClass("vtkMRMLSliceCompositeNode")):
            composite = scene.GetNthNodeByClass(index, "vtkMRMLSliceCompositeNode")
            if background is not None:
                composite.SetBackgroundVolumeID(background.GetID())
            composite.SetForegroundVolumeID(foreground.GetID() if foreground is not None else None)
            composite.SetForegroundOpacity(opacity)

    # -- batch and training --------------------------------------------------------------------
    def processFolder(self, inputDir, outputDir, model=None, device: str = "auto", threshold: float | None = None,
                      skipExisting: bool = True, progress: Callable[[int, int, str], None] | None = None,
                      pattern: dict[str, str] | None = None):
        """Predict every case of ``inputDir`` into ``outputDir`` (``<case>_energy.nii.gz``,
        ``<case>_anomaly.nii.gz``, the case table ``cases.csv``, ``report.json``, ``errors.log``) with
        ``ADMAnomalyLib.api.predict_folder``. Resumable through ``cases.csv``: cases done by this model
        are skipped (or only re-thresholded from their stored energy when ``threshold`` changed). A
        failing case is a failed row and the others go on. Returns the engine's ``FolderReport``
        (``done``, ``rethresholded``, ``skipped``, ``failed``)."""
        api = engine_api()
        self.resolveDevice(device)
        loaded = self.loadModel(model)
        report = api.predict_folder(loaded, inputDir, outputDir, device=(device or "auto").lower(),
                                    threshold=threshold, skip_existing=skipExisting, progress=progress,
                                    pattern=pattern)
        for case_id, message in report.failed.items():
            log.error("ADMAnomaly: case %s failed: %s", case_id, message)
        log.info("ADMAnomaly: %d written, %d skipped, %d failed -> %s", len(report.done), len(report.skipped),
                 len(report.failed), outputDir)
        return report

    @staticmethod
    def trainingPresets() -> list[str]:
        """Names of the engine's training presets (``small``, ``paper``, ``tiny`` ...)."""
        from ADMAnomalyLib.config import PRESETS

        return list(PRESETS)

    @staticmethod
    def trainingProfiles() -> list[str]:
        """Names of the engine's training profiles (``faithful``, the paper's ADM; ``transfer``, the
        bundled model's configuration)."""
        from ADMAnomalyLib.config import PROFILES

        return list(PROFILES)

    @staticmethod
    def trainingDefaults(preset: str = "small") -> dict[str, Any]:
        """The settings of :meth:`train` (``epochsCtoC``, ``epochsJoint``, ``lambdaEnergy``,
        ``components``, ``lesionMargin``) as ``preset`` has them; needs no torch."""
        from ADMAnomalyLib.config import preset as make_preset

        try:
            config = make_preset(preset)
        except ValueError as exc:
            raise errors.InputError(str(exc)) from None
        return {"epochsCtoC": config.train.epochs_ctoc, "epochsJoint": config.train.epochs_joint,
                "lambdaEnergy": config.train.lambda_energy, "components": config.model.n_components,
                "lesionMargin": config.train.lesion_margin}

    @staticmethod
    def trainingConfig(preset: str = "small", epochsCtoC: int | None = None, epochsJoint: int | None = None,
                       lambdaEnergy: float | None = None, components: int | None = None,
                       lesionMargin: int | None = None, profile: str = "faithful"):
        """The engine's ``ADMConfig`` for a size preset and a profile ('faithful' ADM or the bundled
        'transfer' configuration) with the panel's overrides (built by
        ``ADMAnomalyLib.api.training_config``, as the command line builds its own)."""
        return engine_api().training_config(preset, profile=profile, epochs_ctoc=epochsCtoC, epochs_joint=epochsJoint,
                                            lambda_energy=lambdaEnergy, components=components,
                                            lesion_margin=lesionMargin)

    @staticmethod
    def validateTrainingInputs(dataDir, outputPath, resume: bool = False) -> list:
        """Check a training request before starting it: cases found, output folder writable,
        no stale checkpoint unless resuming. Returns the engine's case list."""
        from ADMAnomalyLib.cases import find_cases

        if chosenPath(dataDir) is None:
            raise errors.InputError("choose a folder of training cases")
        if chosenPath(outputPath) is None:
            raise errors.InputError("choose where to write the model file (.admm)")
        cases = find_cases(dataDir)
        output = Path(outputPath)
        folder = output.parent if str(output.parent) else Path(".")
        if not folder.is_dir() or not os.access(folder, os.W_OK):
            raise errors.OutputError(f"cannot write the model to {output}: folder missing or not writable")
        checkpoint = output.with_name(output.name + ".ckpt")
        if checkpoint.exists() and not resume:
            raise errors.OutputError(f"{checkpoint} exists from an interrupted run; tick Resume or delete it")
        return cases

    def train(self, dataDir, outputPath, preset: str = "small", epochsCtoC: int | None = None,
              epochsJoint: int | None = None, lambdaEnergy: float | None = None, components: int | None = None,
              lesionMargin: int | None = None, device: str = "auto", resume: bool = False,
              progress: Callable[[dict], None] | None = None, shouldCancel: CancelCallback | None = None,
              profile: str = "faithful") -> Path:
        """Train a model on the normal slices of the cases in ``dataDir`` (lesion labels, if any,
        exclude lesion slices and give the validation threshold) and write it to ``outputPath``.
        Blocking; returns the model path. Raises ``TrainingDataError`` when no case is usable."""
        api = engine_api()
        self.validateTrainingInputs(dataDir, outputPath, resume)
        config = self.trainingConfig(preset, epochsCtoC, epochsJoint, lambdaEnergy, components, lesionMargin, profile)
        self.resolveDevice(device)
        # No tqdm bar in the Slicer Python console.
        api.train(dataDir, outputPath, config, device=(device or "auto").lower(), resume=resume,
                  progress=progress, should_cancel=shouldCancel, show_progress_bar=False)
        return Path(outputPath)

    # -- background processes (GUI) ------------------------------------------------------------
    def startInference(self, flair, t1, t1c, t2, model=None, device: str = "auto", workDir=None,
                       preprocess: str = "none"):
        """Validate now, then run inference in a background process (the engine's ``predict``
        command, as :meth:`run` gives); see :class:`.jobs.InferenceJob`. ``preprocess`` as in
        :meth:`run` (raw scans)."""
        from .jobs import InferenceJob

        sameGrid = preprocess == "none"
        nodes = self.validateInputs(flair, t1, t1c, t2, sameGrid=sameGrid)
        self.resolveDevice(device)
        loaded = self.loadModel(model)
        if loaded.path is None:
            raise errors.InputError("a background run needs a model saved in a file")
        self.validateInputs(flair, t1, t1c, t2, loaded.config.preprocess.grid_tolerance, sameGrid=sameGrid)
        return InferenceJob(self, nodes, loaded, (device or "auto").lower(), workDir, preprocess=preprocess)

    def startTraining(self, dataDir, outputPath, preset: str = "small", epochsCtoC: int | None = None,
                      epochsJoint: int | None = None, lambdaEnergy: float | None = None,
                      components: int | None = None, device: str = "auto", resume: bool = False, workDir=None,
                      lesionMargin: int | None = None, profile: str = "faithful"):
        """Validate now, then train in a background process (the engine's CLI) with the settings of
        :meth:`train`; see :class:`.jobs.TrainingJob`."""
        from .jobs import TrainingJob

        self.validateTrainingInputs(dataDir, outputPath, resume)
        self.trainingConfig(preset, epochsCtoC, epochsJoint, lambdaEnergy, components, lesionMargin, profile)
        self.resolveDevice(device)
        return TrainingJob(dataDir, outputPath, preset, epochsCtoC, epochsJoint, lambdaEnergy, components,
                           (device or "auto").lower(), resume, workDir, lesionMargin=lesionMargin, profile=profile)

    # -- a folder of cases ---------------------------------------------------------------------
    def openFolder(self, casesDir, resultsDir, model=None, pattern: dict[str, str] | None = None) -> list:
        """Open a folder of cases (found by the engine's rules, or ``pattern``) with its results folder
        (``predict`` outputs and their table ``cases.csv``, which need not exist yet) and return the
        case table: one ``ADMAnomalyLib.results.CaseRecord`` per case with ``case_id``, ``status``
        ("done", "failed" with its ``reason``, "not run"), ``anomaly_ml``, ``components``,
        ``largest_component_ml``, ``dice`` and ``auprc`` (with a reference label), and the
        ``threshold`` and ``model`` its outputs were made with. ``model`` (default: bundled) is the
        one *Run missing* uses and :meth:`saveThresholdModel` copies. A case loaded from the folder
        open before is removed from the scene."""
        from .casebrowser import CaseBrowser

        browser = CaseBrowser.open(self, casesDir, resultsDir, model, pattern)
        self.closeFolder()
        self.caseBrowser = browser
        return browser.rows()

    def closeFolder(self) -> None:
        """Remove the loaded case's nodes and forget the open folder."""
        if self.caseBrowser is not None:
            self.caseBrowser.close()
            self.caseBrowser = None

    def _openFolder(self):
        if self.caseBrowser is None:
            raise errors.InputError("open a folder of cases first: logic.openFolder(casesDir, resultsDir)")
        return self.caseBrowser

    def caseRecords(self) -> list:
        """The case table, re-read from ``cases.csv`` (a job or the CLI may have changed it)."""
        return self._openFolder().refresh()

    def loadCase(self, case):
        """Load case ``case`` (index in the table, or case id) of the open folder: its four volumes,
        its reference label as a segmentation, and, when it is done, its stored energy map and
        "Anomaly" segmentation (no network run), shown as after :meth:`run`; the previous case's nodes
        are removed. Returns a :class:`.casebrowser.LoadedCase` (``volumes``, ``reference``,
        ``energy``, ``anomaly``). A case that cannot be loaded raises its ``InputError``, is listed as
        failed, and the previous case stays."""
        return self._openFolder().load(case)

    def nextCase(self):
        """Load the case after the current one (the first when none was loaded); see :meth:`loadCase`."""
        return self._openFolder().step(1)

    def previousCase(self):
        """Load the case before the current one; see :meth:`loadCase`."""
        return self._openFolder().step(-1)

    def folderModel(self):
        """The open folder's model and threshold for new results: the folder's common threshold
        (None before any result: the model's). Refused when the folder's results were made by
        another model (a run would recompute them all, and an energy threshold means nothing for
        another model) or at several thresholds (a run would silently re-threshold some)."""
        from ADMAnomalyLib.results import model_identity

        browser = self._openFolder()
        loaded = self.loadModel(browser.model)
        identity = model_identity(loaded)
        done = browser.doneRecords()
        others = sorted({record.model for record in done if record.model != identity})
        if others:
            raise errors.InputError(
                f"the results in {browser.resultsDir} were made with {', '.join(others)}, not with {identity}; "
                "choose that model, or another results folder")
        threshold = browser.threshold()
        if done and threshold is None:
            raise errors.InputError(f"the cases in {browser.resultsDir} have different thresholds; "
                                    "apply one threshold to all cases first")
        return loaded, threshold

    def runMissing(self, device: str = "auto", progress: Callable[[int, int, str], None] | None = None):
        """Predict (blocking) the open folder's cases that have no results yet, at the folder's
        threshold; done cases are skipped. Returns the engine's ``FolderReport``; the table follows."""
        browser = self._openFolder()
        loaded, threshold = self.folderModel()
        report = self.processFolder(browser.casesDir, browser.resultsDir, model=loaded, device=device,
                                    threshold=threshold, progress=progress, pattern=browser.pattern)
        browser.refresh()
        return report

    def startRunMissing(self, device: str = "auto", workDir=None):
        """:meth:`runMissing` in a background process (the engine's ``predict`` command); poll the
        returned :class:`.jobs.FolderJob` and call :meth:`caseRecords` as cases finish."""
        from .jobs import FolderJob, predict_command

        browser = self._openFolder()
        loaded, threshold = self.folderModel()
        if loaded.path is None:
            raise errors.InputError("a background run needs a model saved in a file")
        self.resolveDevice(device)
        return FolderJob(predict_command(loaded.path, browser.casesDir, browser.resultsDir, (device or "auto").lower(),
                                         threshold, browser.pattern), workDir)

    def applyThresholdToFolder(self, threshold: float, progress: Callable[[int, int, str], None] | None = None) -> list:
        """Rewrite every done case's anomaly map in the results folder at ``threshold`` from its stored
        energy (no network run; as ``admanomaly threshold``), update ``cases.csv`` and return the
        table. The loaded case's segmentation follows."""
        browser = self._openFolder()
        engine_api().rethreshold_folder(browser.resultsDir, threshold, progress=progress)
        return browser.refresh()

    def startApplyThresholdToFolder(self, threshold: float, workDir=None):
        """:meth:`applyThresholdToFolder` in a background process (the engine's ``threshold`` command)."""
        from ADMAnomalyLib.validation import check_threshold

        from .jobs import FolderJob, threshold_command

        browser = self._openFolder()
        threshold = check_threshold(threshold)
        if not browser.doneRecords():
            raise errors.InputError(f"no case in {browser.resultsDir} has results to re-threshold; run them first")
        return FolderJob(threshold_command(browser.resultsDir, threshold), workDir)

    def saveThresholdModel(self, path, threshold: float | None = None) -> Path:
        """Write a copy of the open folder's model file with ``threshold`` (default: the threshold
        applied to the folder's cases) and a provenance note in its metadata (``threshold_history``:
        chosen interactively, the source model, the results folder, its cases with results and whether
        their maps are at this threshold, the cases viewed, the date). Returns the path."""
        import time

        from ADMAnomalyLib.results import model_identity

        browser = self._openFolder()
        loaded, folderThreshold = self.folderModel()
        threshold = folderThreshold if threshold is None else threshold
        if threshold is None:
            raise errors.InputError("no case has results yet: run them, or give the threshold")
        path = Path(path)
        if loaded.path is not None and path.resolve() == Path(loaded.path).resolve():
            raise errors.OutputError(f"{path} is the model itself; choose another file for the copy")
        note = {
            "chosen": "interactively in the ADMAnomaly Slicer module",
            "source_model": model_identity(loaded),
            "results": str(browser.resultsDir),
            "cases": [record.case_id for record in browser.doneRecords()],
            "applied_to_cases": threshold == folderThreshold,
            "viewed": list(browser.viewed),
            "date": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }
        return loaded.with_threshold(threshold, note).save(path)
