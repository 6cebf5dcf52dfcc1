"""ADMAnomaly: unsupervised pixel-wise anomaly detection in 4-contrast brain MRI (FLAIR, T1, T1c, T2).

Thin Slicer layer over the bundled engine ``ADMAnomalyLib`` (ADM network, Kim et al. 2021):
widgets and wiring live here; the MRML work lives in ``ADMAnomalyCore`` (Qt-free, tested with the
PyPI package ``slicer-core``); every computation is the engine's.
"""

import logging
import math
import os
import pathlib
import subprocess
import sys
import time
from typing import Annotated

import qt
import slicer
import vtk
from slicer import vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode
from slicer.parameterNodeWrapper import Choice, WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

try:
    from slicer.i18n import tr as _
except ImportError:  # Slicer < 5.3

    def _(text):
        return text


_MODULE_DIR = os.path.dirname(os.path.abspath(__file__))
if _MODULE_DIR not in sys.path:
    sys.path.insert(0, _MODULE_DIR)

from ADMAnomalyCore import engine as _engine  # noqa: E402  (puts the extension's ADMAnomalyLib on sys.path)
from ADMAnomalyCore import sampledata  # noqa: E402
from ADMAnomalyCore.logic import (  # noqa: E402
    BRAIN_MINIMUM_ATTRIBUTE,
    ENERGY_REFERENCE_ROLE,
    THRESHOLD_ATTRIBUTE,
    ADMAnomalyCoreLogic,
)
from ADMAnomalyLib import errors  # noqa: E402  (torch-free)
from ADMAnomalyLib.config import CONTRASTS  # noqa: E402  (torch-free)

#: Every widget the code looks up in Resources/UI/ADMAnomaly.ui, with its class
#: (checked by Testing/Python/test_module_ui.py without Slicer).
EXPECTED_WIDGETS = {
    "casesCollapsibleButton": "ctkCollapsibleButton",
    "casesFolderEdit": "ctkPathLineEdit",
    "resultsFolderEdit": "ctkPathLineEdit",
    "casesTable": "QTableWidget",
    "previousCaseButton": "QPushButton",
    "nextCaseButton": "QPushButton",
    "runMissingButton": "QPushButton",
    "applyToAllButton": "QPushButton",
    "saveThresholdModelButton": "QPushButton",
    "casesProgressBar": "QProgressBar",
    "casesStatusLabel": "QLabel",
    "inputsCollapsibleButton": "ctkCollapsibleButton",
    "flairSelector": "qMRMLNodeComboBox",
    "t1Selector": "qMRMLNodeComboBox",
    "t1cSelector": "qMRMLNodeComboBox",
    "t2Selector": "qMRMLNodeComboBox",
    "autoFillButton": "QPushButton",
    "rawScansCheckBox": "QCheckBox",
    "modelComboBox": "QComboBox",
    "modelBrowseButton": "QToolButton",
    "modelInfoLabel": "QLabel",
    "deviceComboBox": "QComboBox",
    "deviceInfoLabel": "QLabel",
    "inputStatusLabel": "QLabel",
    "applyButton": "QPushButton",
    "progressBar": "QProgressBar",
    "statusLabel": "QLabel",
    "outputsCollapsibleButton": "ctkCollapsibleButton",
    "energySelector": "qMRMLNodeComboBox",
    "segmentationSelector": "qMRMLNodeComboBox",
    "thresholdCollapsibleButton": "ctkCollapsibleButton",
    "thresholdModeComboBox": "QComboBox",
    "thresholdLabel": "QLabel",
    "thresholdSlider": "ctkSliderWidget",
    "percentileLabel": "QLabel",
    "percentileSlider": "ctkSliderWidget",
    "resetThresholdButton": "QPushButton",
    "statisticsLabel": "QLabel",
    "trainingCollapsibleButton": "ctkCollapsibleButton",
    "trainingFolderEdit": "ctkPathLineEdit",
    "presetComboBox": "QComboBox",
    "profileComboBox": "QComboBox",
    "epochsCtoCSpinBox": "QSpinBox",
    "epochsJointSpinBox": "QSpinBox",
    "lambdaSpinBox": "QDoubleSpinBox",
    "componentsSpinBox": "QSpinBox",
    "lesionMarginSpinBox": "QSpinBox",
    "trainingOutputEdit": "ctkPathLineEdit",
    "resumeCheckBox": "QCheckBox",
    "trainButton": "QPushButton",
    "trainingProgressBar": "QProgressBar",
    "trainingLog": "QPlainTextEdit",
}

_SETTINGS_MODELS_KEY = "ADMAnomaly/Models"
_CASE_COLUMNS = ("case_id", "status", "anomaly_ml", "components", "largest_component_ml", "dice", "auprc")
"""Fields of ``ADMAnomalyLib.results.CaseRecord`` shown in the cases table, in its column order."""
_POLL_INTERVAL_MS = 200
_THRESHOLD_DELAY_MS = 60


def _savedModels() -> list:
    """Model files used before (QSettings returns a plain string for a one-item list)."""
    value = qt.QSettings().value(_SETTINGS_MODELS_KEY)
    if not value:
        return []
    return [value] if isinstance(value, str) else [str(v) for v in value if v]


#
# ADMAnomaly
#


class ADMAnomaly(ScriptedLoadableModule):
    """Module description shown in Slicer's module panel."""

    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("ADM Anomaly")
        self.parent.categories = [_("Segmentation")]
        self.parent.dependencies = []
        self.parent.contributors = ["ADMAnomaly developers"]
        self.parent.helpText = _(
            "Unsupervised pixel-wise anomaly detection in brain MRI from four co-registered contrasts "
            "(FLAIR, T1, post-contrast T1, T2) with the ADM network (Kim et al., 2021): a per-voxel energy map "
            "and an <i>Anomaly</i> segmentation from an adjustable threshold. Models are trained on normal scans only. "
            "Research software, not a medical device. "
            'See the <a href="https://github.com/admanomaly/ADMAnomaly">project page</a>.')
        self.parent.acknowledgementText = _(
            "Method: S. Kim, H. Kwon, J. Oh, S. Park, \"Unsupervised Anomaly Detection in MR Images using "
            "Multi-Contrast Information\" (2021). PyTorch is installed through the PyTorch Utils extension "
            "(SlicerPyTorch). Module layout follows the Slicer scripted-module template. Demo case (SampleData): "
            "patient26 of the MS dataset of Lesjak et al., Neuroinformatics 2017 (CC-BY).")
        # The demo case in the SampleData module, once that module exists.
        slicer.app.connect("startupCompleted()", registerSampleData)


def registerSampleData() -> None:
    """Add the bundled demo case (FLAIR, T1, T1c, T2 and its reference lesions) to the SampleData
    module, category "ADMAnomaly" (sources built by ``ADMAnomalyCore.sampledata``)."""
    import SampleData

    for source in sampledata.sample_data_sources():
        SampleData.SampleDataLogic.registerCustomSampleDataSource(**source)


#
# ADMAnomalyParameterNode
#


@parameterNodeWrapper
class ADMAnomalyParameterNode:
    """GUI state, saved with the scene.

    casesFolder, resultsFolder - the folder of cases browsed and its results (predict outputs, cases.csv).
    flair, t1, t1c, t2 - input volumes; rawScans - they are raw scans (registered and brain-extracted first).
    modelPath - model file ("" = bundled default). device - auto/GPU/CPU.
    energyVolume, anomalySegmentation - outputs (overwritten by the next Apply when set).
    thresholdMode/threshold/percentile - the segmentation's threshold.
    trainingFolder ... lesionMargin, trainingOutput, trainingResume - the settings of logic.train.
    A path field left empty reads as Path("."), which the logic takes as "not chosen"."""

    casesFolder: pathlib.Path
    resultsFolder: pathlib.Path
    flair: vtkMRMLScalarVolumeNode
    t1: vtkMRMLScalarVolumeNode
    t1c: vtkMRMLScalarVolumeNode
    t2: vtkMRMLScalarVolumeNode
    rawScans: bool = False
    modelPath: str = ""
    device: Annotated[str, Choice(["auto", "GPU", "CPU"])] = "auto"
    energyVolume: vtkMRMLScalarVolumeNode
    anomalySegmentation: vtkMRMLSegmentationNode
    thresholdMode: Annotated[str, Choice(["energy", "percentile"])] = "energy"
    threshold: Annotated[float, WithinRange(-1.0e9, 1.0e9)] = 0.0
    percentile: Annotated[float, WithinRange(0.0, 100.0)] = 99.0
    trainingFolder: pathlib.Path
    trainingPreset: Annotated[str, Choice(["small", "paper", "tiny"])] = "small"
    trainingProfile: Annotated[str, Choice(["faithful", "transfer"])] = "faithful"
    epochsCtoC: Annotated[int, WithinRange(1, 1000)] = 12
    epochsJoint: Annotated[int, WithinRange(1, 1000)] = 6
    lambdaEnergy: Annotated[float, WithinRange(0.0, 1.0)] = 5e-4
    components: Annotated[int, WithinRange(1, 32)] = 6
    lesionMargin: Annotated[int, WithinRange(0, 1000)] = 3
    trainingOutput: pathlib.Path
    trainingResume: bool = False


#
# ADMAnomalyWidget
#


class ADMAnomalyWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """Module panel: widgets and wiring only; work is done by ADMAnomalyLogic."""

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._inferenceJob = None
        self._trainingJob = None
        self._folderJob = None
        self._caseFolders = None
        self._updatingGui = False
        self._lastValidatedInputs = None
        self._inputsValid = False

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/ADMAnomaly.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = ADMAnomalyLogic()

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.NodeAddedEvent, self.onNodeAdded)

        self.ui.applyButton.connect("clicked(bool)", self.onApplyButton)
        self.ui.autoFillButton.connect("clicked(bool)", lambda checked=False: self.autoFillInputs(onlyEmpty=False))
        self.ui.modelBrowseButton.connect("clicked(bool)", self.onBrowseModel)
        self.ui.modelComboBox.connect("currentIndexChanged(int)", self.onModelChanged)
        self.ui.resetThresholdButton.connect("clicked(bool)", self.onResetThreshold)
        self.ui.trainButton.connect("clicked(bool)", self.onTrainButton)
        # activated: user choices only, so a scene's saved epochs are not reset when it is loaded.
        self.ui.presetComboBox.connect("activated(int)", self.onPresetChanged)
        self.ui.casesTable.connect("cellDoubleClicked(int,int)",
                                   lambda row, column: self.showCase(lambda: self.logic.loadCase(row)))
        self.ui.previousCaseButton.connect("clicked(bool)", lambda checked=False: self.showCase(self.logic.previousCase))
        self.ui.nextCaseButton.connect("clicked(bool)", lambda checked=False: self.showCase(self.logic.nextCase))
        self.ui.runMissingButton.connect("clicked(bool)", self.onRunMissing)
        self.ui.applyToAllButton.connect("clicked(bool)", self.onApplyToAll)
        self.ui.saveThresholdModelButton.connect("clicked(bool)", self.onSaveThresholdModel)

        self._pollTimer = qt.QTimer()
        self._pollTimer.setInterval(_POLL_INTERVAL_MS)
        self._pollTimer.connect("timeout()", self.onPollJobs)
        self._thresholdTimer = qt.QTimer()
        self._thresholdTimer.setSingleShot(True)
        self._thresholdTimer.setInterval(_THRESHOLD_DELAY_MS)
        self._thresholdTimer.connect("timeout()", self.applyThreshold)

        self.initializeParameterNode()
        self.populateModels()
        self.updateDeviceLabel()

    def cleanup(self) -> None:
        if self._inferenceJob is not None:
            self._inferenceJob.cleanup()  # stops the process and removes its temporary files
        if self._trainingJob is not None:
            self._trainingJob.cancel()
        if self._folderJob is not None:
            self._folderJob.cancel()
        self._pollTimer.stop()
        self.removeObservers()

    def enter(self) -> None:
        self.initializeParameterNode()
        self.autoFillInputs(onlyEmpty=True)

    def exit(self) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateGuiFromParameterNode)

    def onSceneStartClose(self, caller, event) -> None:
        if self._inferenceJob is not None:
            # Its inputs are leaving with the scene: stop it and drop it, so no poll finishes it later.
            self._inferenceJob.cancel()
            self._inferenceJob.cleanup()
            self._inferenceJob = None
            self.ui.progressBar.setVisible(False)
        self.logic.closeFolder()  # its nodes leave with the scene; a folder job goes on writing files
        self._caseFolders = None
        self.fillCaseTable([])
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    @vtk.calldata_type(vtk.VTK_OBJECT)
    def onNodeAdded(self, caller, event, node) -> None:
        # A case was loaded: fill the empty selectors once the node has its final name.
        if isinstance(node, vtkMRMLScalarVolumeNode) and not node.IsA("vtkMRMLLabelMapVolumeNode"):
            qt.QTimer.singleShot(100, lambda: self.autoFillInputs(onlyEmpty=True))

    # -- parameter node ------------------------------------------------------------------------
    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())

    def setParameterNode(self, inputParameterNode) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateGuiFromParameterNode)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateGuiFromParameterNode)
            self.updateGuiFromParameterNode()

    def updateGuiFromParameterNode(self, caller=None, event=None) -> None:
        p = self._parameterNode
        if p is None or self._updatingGui:
            return
        self._updatingGui = True
        try:
            percentileMode = p.thresholdMode == "percentile"
            self.ui.percentileSlider.setEnabled(percentileMode)
            self.ui.thresholdSlider.setEnabled(not percentileMode)
            combo = self.ui.modelComboBox
            if (combo.itemData(combo.currentIndex) or "") != (p.modelPath or ""):
                self.populateModels()  # e.g. a scene saved with another model was loaded
            self.updateInputStatus()
            self.updateThresholdRange()
        finally:
            self._updatingGui = False
        self.openCaseFolder()
        self.scheduleThreshold()

    # -- inputs --------------------------------------------------------------------------------
    def autoFillInputs(self, onlyEmpty: bool = True) -> None:
        p = self._parameterNode
        if p is None:
            return
        # The parameter node's input fields are named by the contrasts (flair, t1, t1c, t2).
        guessed = self.logic.guessInputs({c: getattr(p, c) for c in CONTRASTS} if onlyEmpty else None)
        if guessed:
            wasModified = p.StartModify()
            for contrast, node in guessed.items():
                setattr(p, contrast, node)
            p.EndModify(wasModified)

    def updateInputStatus(self) -> None:
        p = self._parameterNode
        nodes = (p.flair, p.t1, p.t1c, p.t2)
        key = (p.rawScans,) + tuple((n.GetID(), n.GetImageData().GetMTime() if n.GetImageData() else 0) if n else None
                                    for n in nodes)
        if key != self._lastValidatedInputs:
            self._lastValidatedInputs = key
            try:
                self.logic.validateInputs(*nodes, sameGrid=not p.rawScans)
                self._inputsValid = True
                self.ui.inputStatusLabel.text = _("Inputs are valid.")
                self.ui.inputStatusLabel.setStyleSheet("")
            except errors.ADMError as exc:
                self._inputsValid = False
                self.ui.inputStatusLabel.text = str(exc)
                self.ui.inputStatusLabel.setStyleSheet("color: #c0392b" if all(nodes) else "")
        running = self._inferenceJob is not None
        self.ui.applyButton.enabled = running or self._inputsValid
        self.ui.applyButton.text = _("Cancel") if running else _("Apply")

    # -- model and device ----------------------------------------------------------------------
    def populateModels(self) -> None:
        combo = self.ui.modelComboBox
        wasBlocked = combo.blockSignals(True)
        combo.clear()
        combo.addItem(_("Bundled default model"), "")
        paths = _savedModels()
        current = self._parameterNode.modelPath if self._parameterNode else ""
        if current and current not in paths:
            paths.append(current)
        for path in paths:
            combo.addItem(os.path.basename(path), path)
            combo.setItemData(combo.count - 1, path, qt.Qt.ToolTipRole)
        index = combo.findData(current)
        combo.setCurrentIndex(max(index, 0))
        combo.blockSignals(wasBlocked)
        self.updateModelInfo()

    def addModel(self, path: str) -> None:
        models = [m for m in _savedModels() if m != path]
        qt.QSettings().setValue(_SETTINGS_MODELS_KEY, [path] + models[:9])
        if self._parameterNode:
            self._parameterNode.modelPath = path
        self.populateModels()

    def onBrowseModel(self) -> None:
        path = qt.QFileDialog.getOpenFileName(self.parent, _("Choose an ADMAnomaly model"), "",
                                              _("ADMAnomaly models (*.admm);;All files (*)"))
        if path:
            self.addModel(path)

    def onModelChanged(self, index: int) -> None:
        if self._parameterNode:
            self._parameterNode.modelPath = self.ui.modelComboBox.itemData(index) or ""
        if self.logic.caseBrowser is not None:  # Run missing and the saved threshold use this model
            self.logic.caseBrowser.model = self.currentModel()
        self.updateModelInfo()

    def currentModel(self):
        return (self._parameterNode.modelPath if self._parameterNode else "") or None

    def updateModelInfo(self) -> None:
        model = self.currentModel()
        if _engine.torch_missing():
            path = model or str(_engine.module_dir() / "Resources" / "Models")
            self.ui.modelInfoLabel.text = _("PyTorch is installed on first use.") + f" ({os.path.basename(path)})"
            return
        try:
            self.ui.modelInfoLabel.text = self.logic.modelSummary(self.logic.loadModel(model))
            self.ui.modelInfoLabel.setStyleSheet("")
        except errors.ADMError as exc:
            self.ui.modelInfoLabel.text = str(exc)
            self.ui.modelInfoLabel.setStyleSheet("color: #c0392b")

    def updateDeviceLabel(self) -> None:
        if _engine.torch_missing():
            self.ui.deviceInfoLabel.text = _("(PyTorch not installed yet)")
            return
        try:
            self.ui.deviceInfoLabel.text = _("detected: ") + self.logic.deviceDescription("auto")
        except Exception as exc:  # a broken torch install must not break the panel
            self.ui.deviceInfoLabel.text = str(exc).splitlines()[0]

    # -- run -----------------------------------------------------------------------------------
    def showError(self, label, message: str) -> None:
        label.text = message
        label.setStyleSheet("color: #c0392b")
        logging.error("ADMAnomaly: %s", message)

    def showStatus(self, label, message: str) -> None:
        label.text = message
        label.setStyleSheet("")

    def onApplyButton(self) -> None:
        if self._inferenceJob is not None:
            self.showStatus(self.ui.statusLabel, _("Cancelling..."))
            self._inferenceJob.cancel()
            return
        p = self._parameterNode
        try:
            self.logic.validateInputs(p.flair, p.t1, p.t1c, p.t2, sameGrid=not p.rawScans)
            self.logic.ensureDependencies()  # raises DependencyError (an ADMError) with what is missing
            self.updateDeviceLabel()
            self.updateModelInfo()
            self._inferenceJob = self.logic.startInference(p.flair, p.t1, p.t1c, p.t2, model=self.currentModel(),
                                                           device=p.device,
                                                           preprocess="auto" if p.rawScans else "none")
        except errors.ADMError as exc:
            self.showError(self.ui.statusLabel, str(exc))
            return
        self._runStart = time.monotonic()
        self.ui.progressBar.setVisible(True)
        self.ui.progressBar.setRange(0, 0)
        self.showStatus(self.ui.statusLabel, _("Running the model in a background process..."))
        self.updateInputStatus()
        self._pollTimer.start()

    def onPollJobs(self) -> None:
        if self._inferenceJob is not None:
            self.pollInference()
        if self._trainingJob is not None:
            self.pollTraining()
        if self._folderJob is not None:
            self.pollFolderJob()
        if self._inferenceJob is None and self._trainingJob is None and self._folderJob is None:
            self._pollTimer.stop()

    def pollInference(self) -> None:
        job = self._inferenceJob
        done, total = job.poll()
        if total:
            self.ui.progressBar.setRange(0, total)
            self.ui.progressBar.value = done
            self.ui.statusLabel.text = _("Slices: {done}/{total}").format(done=done, total=total)
        elif job.preprocess != "none":
            self.ui.statusLabel.text = _("Raw scans: registering to FLAIR and extracting the brain...")
        if not job.finished:
            return
        self._inferenceJob = None
        p = self._parameterNode
        percentileMode = p.thresholdMode == "percentile"
        try:
            energyNode, segmentationNode = job.finish(
                energyNode=p.energyVolume, segmentationNode=p.anomalySegmentation,
                percentile=p.percentile if percentileMode else None, show=True)
        except errors.CancelledError:
            self.showStatus(self.ui.statusLabel, _("Cancelled. Earlier results are unchanged."))
        except errors.ADMError as exc:
            self.showError(self.ui.statusLabel, str(exc))
        else:
            self._appliedThresholdState = None  # a new result: show its statistics
            wasModified = p.StartModify()
            p.energyVolume = energyNode
            p.anomalySegmentation = segmentationNode
            if not percentileMode:
                # What the logic applied: the model's threshold, or a percentile for a model without one.
                p.threshold = float(segmentationNode.GetAttribute(THRESHOLD_ATTRIBUTE))
            p.EndModify(wasModified)
            slicer.util.resetSliceViews()
            self.showStatus(self.ui.statusLabel, _("Done in {seconds:.1f} s.").format(
                seconds=time.monotonic() - self._runStart))
        finally:
            self.ui.progressBar.setVisible(False)
            self.updateInputStatus()

    # -- threshold -----------------------------------------------------------------------------
    def updateThresholdRange(self) -> None:
        p = self._parameterNode
        energyNode = p.energyVolume if p else None
        hasResult = energyNode is not None and p.anomalySegmentation is not None
        self.ui.thresholdCollapsibleButton.enabled = hasResult
        if not hasResult or not energyNode.GetAttribute(BRAIN_MINIMUM_ATTRIBUTE):
            return
        key = (energyNode.GetID(), energyNode.GetImageData().GetMTime() if energyNode.GetImageData() else 0)
        if getattr(self, "_energyRangeKey", None) != key:  # the range costs a pass over the volume
            self._energyRangeKey, self._energyRange = key, self.logic.energyRange(energyNode)
        low, high = self._energyRange
        slider = self.ui.thresholdSlider
        wasBlocked = slider.blockSignals(True)
        span = max(high - low, 1e-6)
        slider.minimum, slider.maximum = low, high + 0.01 * span
        slider.singleStep = span / 1000.0
        slider.decimals = max(0, 3 - int(math.floor(math.log10(span))))
        slider.value = p.threshold
        slider.blockSignals(wasBlocked)

    def onResetThreshold(self) -> None:
        p = self._parameterNode
        threshold = self.logic.modelThreshold(p.energyVolume) if p and p.energyVolume else None
        if threshold is None:
            self.showError(self.ui.statisticsLabel, _("the model has no validation threshold; use a percentile"))
            return
        wasModified = p.StartModify()
        p.thresholdMode = "energy"
        p.threshold = threshold
        p.EndModify(wasModified)

    def scheduleThreshold(self) -> None:
        # Slider drags arrive faster than re-thresholding: apply the latest value after a short pause.
        self._thresholdTimer.start()

    def applyThreshold(self) -> None:
        p = self._parameterNode
        if p is None or p.anomalySegmentation is None or p.energyVolume is None:
            return
        if p.anomalySegmentation.GetNodeReference(ENERGY_REFERENCE_ROLE) is None:
            return
        state = self.thresholdState()
        if state == getattr(self, "_appliedThresholdState", None):
            return
        try:
            if p.thresholdMode == "percentile":
                result = self.logic.setThreshold(p.anomalySegmentation, percentile=p.percentile)
                p.threshold = result.threshold  # the slider shows the energy the percentile gives
            else:
                result = self.logic.setThreshold(p.anomalySegmentation, threshold=p.threshold)
        except errors.ADMError as exc:
            self.showError(self.ui.statisticsLabel, str(exc))
            return
        self._appliedThresholdState = state
        self.showStatus(self.ui.statisticsLabel, result.summary())

    def thresholdState(self) -> tuple:
        """What the segmentation's threshold depends on (the energy slider only in energy mode: in
        percentile mode it follows the percentile)."""
        p = self._parameterNode
        energyMode = p.thresholdMode == "energy"
        return (p.anomalySegmentation.GetID(), p.thresholdMode, p.threshold if energyMode else None,
                None if energyMode else p.percentile)

    # -- a folder of cases ---------------------------------------------------------------------
    def openCaseFolder(self) -> None:
        """Open the parameter node's folders in the logic, unless they are open already."""
        p = self._parameterNode
        folders = (self.logic.chosenPath(p.casesFolder), self.logic.chosenPath(p.resultsFolder)) if p else (None,)
        if None in folders:
            return
        # Once per pair of folders (this runs on every parameter change, e.g. each slider step).
        if folders == self._caseFolders:
            return
        self._caseFolders = folders
        try:
            rows = self.logic.openFolder(*folders, model=self.currentModel())
        except errors.ADMError as exc:
            self.logic.closeFolder()
            self.fillCaseTable([])
            self.showError(self.ui.casesStatusLabel, str(exc))
            return
        self.fillCaseTable(rows)
        done = sum(r.status == "done" for r in rows)
        failed = sum(r.status == "failed" for r in rows)
        self.showStatus(self.ui.casesStatusLabel, _("{n} cases: {done} with results, {failed} failed. Double-click a "
                                                    "case or press Next.").format(n=len(rows), done=done, failed=failed))

    def fillCaseTable(self, rows) -> None:
        """Show the case table (``CaseRecord`` rows); the loaded case's row is selected."""
        table = self.ui.casesTable
        table.setRowCount(len(rows))
        for row, record in enumerate(rows):
            for column, name in enumerate(_CASE_COLUMNS):
                value = getattr(record, name)
                if name == "status" and record.reason:
                    text = f"{value}: {record.reason}"
                elif isinstance(value, float):
                    text = f"{value:.3f}" if name in ("dice", "auprc") else f"{value:.2f}"
                else:
                    text = "" if value is None else str(value)
                item = qt.QTableWidgetItem(text)
                item.setToolTip(record.reason or text)
                if record.status == "failed":
                    item.setForeground(qt.QBrush(qt.QColor("#c0392b")))
                table.setItem(row, column, item)
        table.resizeColumnsToContents()
        browser = self.logic.caseBrowser
        loaded = browser.loaded if browser is not None else None
        if loaded is not None and loaded.index < len(rows):
            table.selectRow(loaded.index)
        index = browser.index if browser is not None else None
        running = self._folderJob is not None
        hasRows = bool(rows)
        self.ui.previousCaseButton.enabled = hasRows and index is not None and index > 0
        self.ui.nextCaseButton.enabled = hasRows and (index is None or index < len(rows) - 1)
        self.ui.runMissingButton.enabled = hasRows
        self.ui.applyToAllButton.enabled = hasRows and not running and any(r.status == "done" for r in rows)
        self.ui.saveThresholdModelButton.enabled = hasRows and not running and any(r.status == "done" for r in rows)

    def showCase(self, load) -> None:
        """Load a case (``load``: e.g. ``logic.nextCase``) and point the inputs, outputs and threshold
        at it, as after Apply."""
        self.openCaseFolder()
        if self.logic.caseBrowser is None:
            self.showError(self.ui.casesStatusLabel, _("choose a cases folder and a results folder first"))
            return
        try:
            self.logic.ensureDependencies()
            loaded = load()
        except errors.ADMError as exc:
            self.fillCaseTable(self.logic.caseBrowser.rows())
            self.showError(self.ui.casesStatusLabel, str(exc))
            return
        p = self._parameterNode
        wasModified = p.StartModify()
        p.flair, p.t1, p.t1c, p.t2 = (loaded.volumes[c] for c in CONTRASTS)
        p.energyVolume = loaded.energy
        p.anomalySegmentation = loaded.anomaly
        if loaded.anomaly is not None:
            # The threshold the stored map was made with; already applied, so not applied again.
            p.thresholdMode = "energy"
            p.threshold = float(loaded.anomaly.GetAttribute(THRESHOLD_ATTRIBUTE))
            self._appliedThresholdState = self.thresholdState()
        p.EndModify(wasModified)
        slicer.util.resetSliceViews()
        rows = self.logic.caseBrowser.rows()
        self.fillCaseTable(rows)
        record = rows[loaded.index]
        if loaded.anomaly is not None:
            status = _("stored results")
        elif record.status == "failed":
            status = _("failed: ") + record.reason
        else:
            status = _("no results yet (Run missing, or Apply)")
        self.showStatus(self.ui.casesStatusLabel, _("{case} ({number}/{total}): {status}").format(
            case=loaded.caseId, number=loaded.index + 1, total=len(rows), status=status))

    def currentThreshold(self) -> float:
        """The energy threshold on display: the loaded anomaly's (also in percentile mode), else the slider's."""
        p = self._parameterNode
        applied = p.anomalySegmentation.GetAttribute(THRESHOLD_ATTRIBUTE) if p.anomalySegmentation else None
        return float(applied) if applied else float(p.threshold)

    def onRunMissing(self) -> None:
        if self._folderJob is not None:
            self._folderJob.cancel()
            self.showStatus(self.ui.casesStatusLabel, _("Cancelling..."))
            return
        self.openCaseFolder()
        try:
            self.logic.ensureDependencies()
            self._folderJob = self.logic.startRunMissing(device=self._parameterNode.device)
        except errors.ADMError as exc:
            self.showError(self.ui.casesStatusLabel, _("Not started: ") + str(exc))
            return
        self.startFolderJob(_("Predicting the cases without results in a background process..."))

    def onApplyToAll(self) -> None:
        threshold = self.currentThreshold()
        if not slicer.util.confirmOkCancelDisplay(
                _("Rewrite the anomaly map of every case with results at threshold {threshold:.4g} "
                  "(from the stored energy maps, in {folder})?").format(
                    threshold=threshold, folder=self._parameterNode.resultsFolder)):
            return
        try:
            self._folderJob = self.logic.startApplyThresholdToFolder(threshold)
        except errors.ADMError as exc:
            self.showError(self.ui.casesStatusLabel, str(exc))
            return
        self.startFolderJob(_("Applying threshold {threshold:.4g} to every case...").format(threshold=threshold))

    def startFolderJob(self, message: str) -> None:
        self.ui.casesProgressBar.setVisible(True)
        self.ui.casesProgressBar.value = 0
        self.ui.runMissingButton.text = _("Cancel")
        self.ui.runMissingButton.enabled = True
        self.ui.applyToAllButton.enabled = self.ui.saveThresholdModelButton.enabled = False
        self.showStatus(self.ui.casesStatusLabel, message)
        self._pollTimer.start()

    def pollFolderJob(self) -> None:
        job = self._folderJob
        if job.poll():
            self.refreshCases()  # each finished case is in cases.csv already
        self.ui.casesProgressBar.value = int(1000 * job.fraction())
        if job.casesTotal:
            self.ui.casesStatusLabel.text = _("{done}/{total} cases").format(done=job.casesDone, total=job.casesTotal)
        if not job.finished:
            return
        self._folderJob = None
        self.ui.casesProgressBar.setVisible(False)
        self.ui.runMissingButton.text = _("Run missing")
        try:
            summary = job.finish()
        except errors.CancelledError:
            self.showStatus(self.ui.casesStatusLabel, _("Cancelled; the cases finished before are kept."))
        except errors.ADMError as exc:
            self.showError(self.ui.casesStatusLabel, str(exc))
        else:
            counts = {key: len(summary.get(key) or ()) for key in ("done", "rethresholded", "skipped", "failed")}
            self.showStatus(self.ui.casesStatusLabel, _(
                "Finished: {done} predicted, {rethresholded} re-thresholded, {skipped} kept, {failed} failed.").format(
                **counts) if "skipped" in summary else _("Finished: every case's anomaly map was rewritten."))
        self.refreshCases()
        browser = self.logic.caseBrowser
        loaded = browser.loaded if browser is not None else None
        if loaded is not None and loaded.anomaly is None and browser.record(loaded.index).done:
            self.showCase(lambda: self.logic.loadCase(loaded.index))  # its results were just written: show them

    def refreshCases(self) -> None:
        """Re-read the case table; the loaded case's segmentation and the slider follow a new threshold."""
        if self.logic.caseBrowser is None:
            return
        try:
            rows = self.logic.caseRecords()
        except errors.ADMError as exc:
            self.showError(self.ui.casesStatusLabel, str(exc))
            return
        self.fillCaseTable(rows)
        p = self._parameterNode
        applied = p.anomalySegmentation.GetAttribute(THRESHOLD_ATTRIBUTE) if p and p.anomalySegmentation else None
        if applied and p.thresholdMode == "energy" and float(applied) != p.threshold:
            self._appliedThresholdState = (p.anomalySegmentation.GetID(), "energy", float(applied), None)
            p.threshold = float(applied)

    def onSaveThresholdModel(self) -> None:
        threshold = self.currentThreshold()
        path = qt.QFileDialog.getSaveFileName(
            self.parent, _("Save a copy of the model with threshold {threshold:.4g}").format(threshold=threshold), "",
            _("ADMAnomaly models (*.admm)"))
        if not path:
            return
        try:
            written = self.logic.saveThresholdModel(path, threshold=threshold)
        except errors.ADMError as exc:
            self.showError(self.ui.casesStatusLabel, str(exc))
            return
        self.showStatus(self.ui.casesStatusLabel, _(
            "Model copy with threshold {threshold:.4g} written to {path}; select it for new cases.").format(
            threshold=threshold, path=written))

    # -- training ------------------------------------------------------------------------------
    def onPresetChanged(self, index: int) -> None:
        if self._updatingGui or self._parameterNode is None:
            return
        # The combo box's connector has set trainingPreset already (currentIndexChanged comes first).
        p = self._parameterNode
        wasModified = p.StartModify()
        for name, value in self.logic.trainingDefaults(p.trainingPreset).items():
            setattr(p, name, value)
        p.EndModify(wasModified)

    def onTrainButton(self) -> None:
        if self._trainingJob is not None:
            self._trainingJob.cancel()
            self.showStatus(self.ui.statusLabel, _("Cancelling the training..."))
            return
        p = self._parameterNode
        self.ui.trainingLog.setVisible(True)
        try:
            self.logic.ensureDependencies()
            self._trainingJob = self.logic.startTraining(
                p.trainingFolder, p.trainingOutput, preset=p.trainingPreset, profile=p.trainingProfile,
                epochsCtoC=p.epochsCtoC,
                epochsJoint=p.epochsJoint, lambdaEnergy=p.lambdaEnergy, components=p.components,
                lesionMargin=p.lesionMargin, device=p.device, resume=p.trainingResume)
        except errors.ADMError as exc:
            self.ui.trainingLog.appendPlainText("error: " + str(exc))
            self.showError(self.ui.statusLabel, _("Training not started: ") + str(exc))
            return
        self.ui.trainingLog.appendPlainText(" ".join(self._trainingJob.args))
        self.ui.trainingProgressBar.setVisible(True)
        self.ui.trainingProgressBar.setRange(0, 1000)
        self.ui.trainingProgressBar.value = 0
        self.ui.trainButton.text = _("Cancel training")
        self._pollTimer.start()

    def pollTraining(self) -> None:
        job = self._trainingJob
        for event in job.poll():
            self.ui.trainingLog.appendPlainText(job.describe(event))
        self.ui.trainingProgressBar.value = int(1000 * job.fraction())
        if not job.finished:
            return
        self._trainingJob = None
        self.ui.trainButton.text = _("Train")
        self.ui.trainingProgressBar.setVisible(False)
        try:
            path = job.finish()
        except errors.CancelledError:
            self.ui.trainingLog.appendPlainText(_("Cancelled. Resume later from the checkpoint with 'Resume'."))
            self.showStatus(self.ui.statusLabel, _("Training cancelled."))
        except errors.ADMError as exc:
            self.ui.trainingLog.appendPlainText("error: " + str(exc))
            self.showError(self.ui.statusLabel, _("Training failed: ") + str(exc))
        else:
            self.addModel(str(path))
            self.ui.trainingLog.appendPlainText(_("Model written to {path}; it is now selected.").format(path=path))
            self.showStatus(self.ui.statusLabel, _("Training finished: {name}").format(name=os.path.basename(str(path))))


#
# ADMAnomalyLogic
#


class ADMAnomalyLogic(ADMAnomalyCoreLogic, ScriptedLoadableModuleLogic):
    """Console / batch API (no GUI needed); the MRML work is in ``ADMAnomalyCore.logic``.

    ``run(flair, t1, t1c, t2, model=None, device="auto")`` -> (energy node, segmentation node);
    ``setThreshold(segmentationNode, threshold=None, percentile=None)``;
    ``processFolder(inputDir, outputDir, model=None)``; ``train(dataDir, outputPath, preset="small", ...)``;
    a folder of cases: ``openFolder(casesDir, resultsDir)``, ``loadCase(i)``, ``nextCase()``, ``previousCase()``,
    ``runMissing()``, ``applyThresholdToFolder(E)``, ``saveThresholdModel(path)``.
    Call ``ensureDependencies()`` once first in a fresh Slicer (installs PyTorch and the rest)."""

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        ADMAnomalyCoreLogic.__init__(self)

    def getParameterNode(self):
        return ADMAnomalyParameterNode(super().getParameterNode())

    def ensureDependencies(self, askConfirmation: bool = True) -> bool:
        """Install what the engine needs: torch through PyTorch Utils (CUDA build matching the driver),
        the rest of Resources/requirements.txt with slicer.pydeps.pip_ensure (Slicer 5.11+) or
        slicer.util.pip_install after a confirmation. Never touches Slicer's numpy/SimpleITK.
        Returns True when everything is importable; raises DependencyError with a readable reason."""
        if not _engine.missing_dependencies():
            return True
        if _engine.torch_missing():
            try:
                import PyTorchUtils
            except ImportError:
                raise _engine.DependencyError(
                    "PyTorch is needed: install the 'PyTorch' extension from the Extensions Manager, "
                    "restart Slicer and try again") from None
            torchLogic = PyTorchUtils.PyTorchUtilsLogic()
            if not torchLogic.torchInstalled() or _engine.torch_missing():
                try:
                    torch = torchLogic.installTorch(askConfirmation=askConfirmation,
                                                    torchVersionRequirement=_engine.TORCH_REQUIREMENT[len("torch"):])
                except Exception as exc:
                    raise _engine.DependencyError(f"PyTorch could not be installed: {str(exc).splitlines()[0]}") from None
                if torch is None:
                    raise _engine.DependencyError("PyTorch is required; its installation was cancelled")
        requirements = [r for r in _engine.read_requirements() if not _engine.is_satisfied(r)]
        if requirements:
            try:
                import slicer.pydeps as pydeps  # Slicer 5.11+
            except ImportError:
                pydeps = None
            try:
                if pydeps is not None and hasattr(pydeps, "pip_ensure"):
                    pydeps.pip_ensure([_engine.requirement(r) for r in requirements], prompt_install=askConfirmation,
                                      requester="ADMAnomaly")
                else:
                    if askConfirmation and not slicer.util.confirmOkCancelDisplay(
                            _("ADMAnomaly needs these Python packages, which will be downloaded and installed now:\n")
                            + "\n".join(requirements)):
                        raise _engine.DependencyError("installation of " + ", ".join(requirements) + " was cancelled")
                    slicer.util.pip_install(requirements)
            except (RuntimeError, subprocess.CalledProcessError) as exc:  # declined, or pip failed
                message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
                raise _engine.DependencyError(f"could not install {', '.join(requirements)}: {message}") from None
        missing = _engine.missing_dependencies()
        if missing:
            raise _engine.DependencyError(_engine.describe_missing(missing) + " (restart Slicer if they were just installed)")
        return True


#
# ADMAnomalyTest
#


class ADMAnomalyTest(ScriptedLoadableModuleTest):
    """Self-test inside Slicer (Reload and Test, or ctest) on the bundled demo case, loaded through
    the SampleData module as a user would; a tiny model is trained on it first."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_DemoCaseInSampleData()
        self.setUp()
        self.test_InputsAndValidation()
        self.setUp()
        self.test_RunThresholdAndCancel()
        self.setUp()
        self.test_CaseFolder()

    @staticmethod
    def loadDemoCase() -> dict:
        """The demo case's nodes by name, loaded by the SampleData module."""
        import SampleData

        registerSampleData()
        return {node.GetName(): node for node in SampleData.downloadSamples(sampledata.SAMPLE_NAME)}

    @staticmethod
    def copyDemoCase(folder, caseId) -> None:
        """The demo case's files as case ``caseId`` of a folder of cases."""
        import shutil

        os.makedirs(os.path.join(folder, caseId), exist_ok=True)
        for suffix, path in sampledata.demo_case_files().items():
            shutil.copy(path, os.path.join(folder, caseId, f"{caseId}_{suffix}.nii.gz"))

    def test_DemoCaseInSampleData(self):
        self.delayDisplay("The demo case is in the SampleData module: four contrasts and the reference lesions")
        source = sampledata.sample_data_sources()[0]
        nodes = self.loadDemoCase()
        self.assertEqual(sorted(nodes), sorted(source["nodeNames"]))
        self.assertTrue(nodes["patient26_seg"].IsA("vtkMRMLSegmentationNode"))
        guessed = ADMAnomalyLogic().guessInputs()
        self.assertEqual({c: n.GetName() for c, n in guessed.items()},
                         {"flair": "patient26_flair", "t1": "patient26_t1", "t1c": "patient26_t1ce", "t2": "patient26_t2"})
        self.delayDisplay("SampleData test passed")

    def test_InputsAndValidation(self):
        self.delayDisplay("Inputs: auto-fill by name, validation, clear errors")
        nodes = self.loadDemoCase()
        logic = ADMAnomalyLogic()
        guessed = logic.guessInputs()
        flair, t1, t1c, t2 = (guessed[c] for c in CONTRASTS)
        logic.validateInputs(flair, t1, t1c, t2)
        with self.assertRaises(errors.InputError):
            logic.validateInputs(flair, None, t1c, t2)
        with self.assertRaises(errors.InputError):
            logic.validateInputs(flair, nodes["patient26_seg"], t1c, t2)
        other = slicer.modules.volumes.logic().CloneVolume(slicer.mrmlScene, t2, "t2 on another grid")
        other.SetSpacing(1.0, 1.0, 2.0)
        with self.assertRaises(errors.GridMismatchError):
            logic.validateInputs(flair, t1, t1c, other)
        self.assertEqual(logic.guessInputs({"flair": flair, "t1": t1, "t1c": t1c, "t2": t2}), {})
        self.delayDisplay("Inputs test passed")

    def test_RunThresholdAndCancel(self):
        if _engine.torch_missing():
            self.delayDisplay("PyTorch is not installed: inference and threshold tests skipped")
            return
        import numpy as np
        from ADMAnomalyLib import api

        self.delayDisplay("Training a tiny model on the demo case (a few seconds)")
        folder = slicer.util.tempDirectory("ADMAnomalyTest")
        logic = ADMAnomalyLogic()
        modelPath = self.modelPath = logic.train(sampledata.demo_case_dir(), os.path.join(folder, "tiny.admm"),
                                                 preset="tiny", device="cpu")
        self.loadDemoCase()
        inputs = tuple(logic.guessInputs()[c] for c in CONTRASTS)

        self.delayDisplay("Run (blocking console API)")
        energyNode, segmentationNode = logic.run(*inputs, model=modelPath, device="cpu")
        self.assertEqual(slicer.util.arrayFromVolume(energyNode).shape, slicer.util.arrayFromVolume(inputs[0]).shape)
        model = api.load_model(modelPath)
        segment = logic.segmentArray(segmentationNode)
        energy = slicer.util.arrayFromVolume(energyNode)
        brain = logic.brainMask(energyNode)
        np.testing.assert_array_equal(segment, ((energy >= model.threshold) & brain).astype(np.uint8))

        self.delayDisplay("Apply's background process (the engine's predict command) gives the same energy")
        job = logic.startInference(*inputs, model=modelPath, device="cpu")
        job.process.wait(300)
        backgroundEnergy, backgroundSegmentation = job.finish(show=False)
        np.testing.assert_array_equal(slicer.util.arrayFromVolume(backgroundEnergy), energy)
        slicer.mrmlScene.RemoveNode(backgroundEnergy)
        slicer.mrmlScene.RemoveNode(backgroundSegmentation)

        self.delayDisplay("Threshold: higher threshold, smaller anomaly")
        low, high = logic.energyRange(energyNode)
        before = int(segment.sum())
        result = logic.setThreshold(segmentationNode, threshold=model.threshold + 0.5 * (high - model.threshold))
        self.assertLess(result.voxels, max(before, 1))
        result = logic.setThreshold(segmentationNode, percentile=99.0)
        self.assertGreater(result.voxels, 0)

        self.delayDisplay("Cancel keeps the earlier result and adds no node")
        count = slicer.mrmlScene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode")
        with self.assertRaises(errors.CancelledError):
            logic.run(*inputs, model=modelPath, device="cpu", shouldCancel=lambda: True)
        job = logic.startInference(*inputs, model=modelPath, device="cpu")
        job.cancel()
        with self.assertRaises(errors.CancelledError):
            job.finish()
        self.assertEqual(slicer.mrmlScene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode"), count)
        self.delayDisplay("Run test passed")

    def test_CaseFolder(self):
        if _engine.torch_missing():
            self.delayDisplay("PyTorch is not installed: case folder test skipped")
            return
        import numpy as np
        from ADMAnomalyLib.postprocess import anomaly_label, component_voxels
        from ADMAnomalyLib.results import read_table

        self.delayDisplay("A folder of cases: table, Next/Previous, threshold applied to all, model copy")
        folder = slicer.util.tempDirectory("ADMAnomalyTest")
        cases, output = os.path.join(folder, "cases"), os.path.join(folder, "out")
        for number in range(3):
            self.copyDemoCase(cases, f"case_{number}")
        logic = ADMAnomalyLogic()
        rows = logic.openFolder(cases, output, model=self.modelPath)
        self.assertEqual([r.status for r in rows], ["not run"] * 3)
        logic.runMissing(device="cpu")
        self.assertEqual([r.status for r in logic.caseRecords()], ["done"] * 3)
        nodes = None
        for step in (logic.nextCase, logic.nextCase, logic.nextCase, logic.previousCase):
            case = step()
            self.assertIsNotNone(case.anomaly)
            count = slicer.mrmlScene.GetNumberOfNodes()
            self.assertTrue(nodes is None or count == nodes)  # the previous case's nodes were removed
            nodes = count
        threshold = logic.caseRecords()[0].threshold + 0.5
        logic.applyThresholdToFolder(threshold)
        self.assertTrue(all(r.threshold == threshold for r in read_table(output).values()))
        energy = slicer.util.arrayFromVolume(case.energy)
        # The model's label: its small regions left out (postprocess.min_component_mm3), at the new threshold too.
        label = anomaly_label(energy, logic.brainMask(case.energy), threshold,
                              component_voxels(logic.minComponentMm3(case.energy), case.energy.GetSpacing()))
        expected = label.astype(np.uint8)
        np.testing.assert_array_equal(logic.segmentArray(case.anomaly), expected)
        saved = logic.saveThresholdModel(os.path.join(folder, "tuned.admm"))
        self.assertEqual(logic.loadModel(str(saved)).threshold, threshold)
        logic.closeFolder()
        self.delayDisplay("Case folder test passed")
