"""Background processes for the GUI: every job is a command of the engine's CLI
(``python -m ADMAnomalyLib.cli ... --progress json``): inference of the panel's volumes and of a
folder of cases (``predict``), re-thresholding (``threshold``) and training (``train``).

The child writes JSON progress lines to ``stdout.log`` and errors to ``stderr.log`` in a job
folder; the GUI polls :meth:`ProcessJob.poll` from a ``qt.QTimer``. No threads and no pipes are
involved, so the Slicer GUI stays responsive on every platform and nothing blocks on a full
pipe. Cancelling terminates the child; no node is touched until a job has finished successfully.
A failed child becomes the engine's exception for its exit code (:data:`ERRORS_BY_EXIT_CODE`).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk

from . import conversion
from .engine import ensure_engine_importable, module_dir

ensure_engine_importable()

from ADMAnomalyLib import errors  # noqa: E402
from ADMAnomalyLib.config import CONTRASTS  # noqa: E402


def errors_by_exit_code() -> dict[int, type[errors.ADMError]]:
    """The engine's error class of each exit code of ``ADMAnomalyLib/errors.py``: the most general
    class with that code (``InputError`` for 2, not its subclass ``GridMismatchError``)."""
    found: dict[int, type[errors.ADMError]] = {}
    pending = [errors.ADMError]
    while pending:  # breadth first: a class is met before its subclasses
        cls = pending.pop(0)
        if cls.__module__ == errors.__name__:
            found.setdefault(cls.exit_code, cls)
        pending.extend(cls.__subclasses__())
    return found


ERRORS_BY_EXIT_CODE = errors_by_exit_code()
"""Exit code of an engine command -> the exception a finished job raises for it."""


def python_executable() -> str:
    """Interpreter for child processes: ``PythonSlicer`` when running inside the Slicer application
    (whose executable is not a plain Python), else this interpreter."""
    name = Path(sys.executable).name.lower()
    if "slicer" in name and not name.startswith("pythonslicer"):
        return shutil.which("PythonSlicer") or sys.executable
    return sys.executable


def child_environment() -> dict[str, str]:
    """Environment of a child process: this one, with the module folder (``ADMAnomalyCore``) and
    the engine's folder (``ADMAnomalyLib``) first on ``PYTHONPATH``."""
    env = dict(os.environ)
    paths = [str(module_dir()), str(ensure_engine_importable())]
    existing = env.get("PYTHONPATH")
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths + ([existing] if existing else [])))
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


class ProcessJob:
    """A child process whose stdout/stderr go to files in ``workDir``; poll it for JSON events."""

    def __init__(self, args: list[str], workDir: str | Path, env: dict[str, str] | None = None) -> None:
        self.args = [str(a) for a in args]
        self.workDir = Path(workDir)
        self.workDir.mkdir(parents=True, exist_ok=True)
        self.stdoutPath = self.workDir / "stdout.log"
        self.stderrPath = self.workDir / "stderr.log"
        self._offset = 0
        self._pending = ""
        self.cancelled = False
        self.events: list[dict[str, Any]] = []
        kwargs: dict[str, Any] = {}
        if os.name == "nt":  # no console window for the child
            kwargs["creationflags"] = getattr(subprocess, "CREATE_NO_WINDOW", 0)
        with open(self.stdoutPath, "wb") as stdout, open(self.stderrPath, "wb") as stderr:
            self.process = subprocess.Popen(self.args, stdout=stdout, stderr=stderr, stdin=subprocess.DEVNULL,
                                            env=env if env is not None else child_environment(),
                                            cwd=str(self.workDir), **kwargs)

    @property
    def running(self) -> bool:
        return self.process.poll() is None

    @property
    def returncode(self) -> int | None:
        return self.process.poll()

    def poll(self) -> list[dict[str, Any]]:
        """New events since the last call: JSON lines as dicts, other lines as ``{"stage": "log"}``."""
        ended = self.process.poll() is not None  # checked before reading, so the read sees everything
        try:
            with open(self.stdoutPath, "rb") as stream:
                stream.seek(self._offset)
                chunk = stream.read()
        except OSError:
            return []
        self._offset += len(chunk)
        text = self._pending + chunk.decode("utf-8", errors="replace")
        complete = text.split("\n")
        self._pending = complete.pop()  # a line whose newline has not been written yet
        if ended and self._pending:  # the child is gone: nothing more will come
            complete.append(self._pending)
            self._pending = ""
        events = []
        for line in complete:
            line = line.strip()
            if not line:
                continue
            try:
                event = json.loads(line)
                if not isinstance(event, dict):
                    raise ValueError
            except ValueError:
                event = {"stage": "log", "message": line}
            events.append(event)
        self.events.extend(events)
        return events

    def wait(self, timeout: float | None = None) -> int:
        """Block until the child ends (tests and console use)."""
        return self.process.wait(timeout)

    def cancel(self, grace: float = 5.0) -> None:
        """Stop the child: terminate, then kill after ``grace`` seconds."""
        if self.running:
            self.cancelled = True
            self.process.terminate()
            try:
                self.process.wait(grace)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def stderrText(self) -> str:
        try:
            return self.stderrPath.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""

    def errorMessage(self) -> str:
        """The child's one-line ``error: ...`` message (engine convention), else its last stderr line."""
        lines = [line.strip() for line in self.stderrText().splitlines() if line.strip()]
        for line in reversed(lines):
            if line.startswith("error:"):
                return line[len("error:"):].strip()
        if lines:
            return lines[-1]
        return f"the background process ended with exit code {self.returncode}"

    def raiseForFailure(self) -> None:
        """Raise the engine error matching the child's exit code (CancelledError after cancel)."""
        code = self.returncode
        if self.cancelled or code == errors.CancelledError.exit_code:
            raise errors.CancelledError("cancelled by the user; earlier results are unchanged")
        if code in (0, None):
            return
        raise ERRORS_BY_EXIT_CODE.get(code, errors.ADMError)(self.errorMessage())


class TrainingJob:
    """Trains with the engine's CLI (``python -m ADMAnomalyLib.cli train ... --progress json``)."""

    def __init__(self, dataDir, outputPath, preset="small", epochsCtoC=None, epochsJoint=None, lambdaEnergy=None,
                 components=None, device="auto", resume=False, workDir=None, lesionMargin=None,
                 profile="faithful") -> None:
        self.outputPath = Path(outputPath)
        self.workDir = Path(workDir) if workDir else Path(tempfile.mkdtemp(prefix="ADMAnomaly-train-"))
        self._ownsWorkDir = workDir is None
        self.args = training_command(dataDir, outputPath, preset, epochsCtoC, epochsJoint, lambdaEnergy,
                                     components, device, resume, lesionMargin, profile)
        self.process = ProcessJob(self.args, self.workDir)
        self.lastEvent: dict[str, Any] = {}

    @property
    def finished(self) -> bool:
        return not self.process.running

    def poll(self) -> list[dict[str, Any]]:
        events = self.process.poll()
        for event in events:
            if event.get("stage") != "log":
                self.lastEvent = event
        return events

    def fraction(self) -> float:
        """Rough overall progress 0..1 from the last event (CtoC then joint epochs, then GMM/threshold)."""
        event = self.lastEvent
        stage = event.get("stage")
        if stage == "done":
            return 1.0
        if stage in ("gmm", "threshold"):
            return 0.95
        epochs, epoch = event.get("epochs") or 0, event.get("epoch") or 0
        steps, step = event.get("steps") or 0, event.get("step") or 0
        within = ((max(epoch - 1, 0) if steps else epoch) + (step / steps if steps else 0)) / epochs if epochs else 0.0
        within = min(max(within, 0.0), 1.0)
        return 0.45 * within if stage == "ctoc" else 0.45 + 0.45 * within if stage == "joint" else 0.0

    @staticmethod
    def describe(event: dict[str, Any]) -> str:
        """A log line for one progress event."""
        stage = event.get("stage", "")
        if stage == "log":
            return str(event.get("message", ""))
        if stage == "done":
            return f"model written to {event.get('model')}"
        parts = [stage]
        if event.get("epochs"):
            parts.append(f"epoch {event.get('epoch')}/{event.get('epochs')}")
        if event.get("steps"):
            parts.append(f"step {event.get('step')}/{event.get('steps')}")
        for key in ("loss", "loss_ctoc", "loss_dr", "energy"):
            if isinstance(event.get(key), (int, float)):
                parts.append(f"{key} {event[key]:.4g}")
        return "  ".join(parts)

    def cancel(self) -> None:
        self.process.cancel()

    def finish(self) -> Path:
        """The written model path, or the engine's error (CancelledError after cancel)."""
        try:
            self.process.wait()
            self.poll()
            self.process.raiseForFailure()
            if not self.outputPath.is_file():
                raise errors.OutputError(f"training ended but {self.outputPath} was not written")
            return self.outputPath
        finally:
            if self._ownsWorkDir:
                shutil.rmtree(self.workDir, ignore_errors=True)


def training_command(dataDir, outputPath, preset="small", epochsCtoC=None, epochsJoint=None, lambdaEnergy=None,
                     components=None, device="auto", resume=False, lesionMargin=None,
                     profile="faithful") -> list[str]:
    """Arguments of the engine's ``train`` command for the settings of ``logic.train``."""
    args = [python_executable(), "-m", "ADMAnomalyLib.cli", "train", str(dataDir), "-o", str(outputPath),
            "--preset", preset, "--profile", profile, "--device", device, "--progress", "json"]
    for flag, value in (("--epochs-ctoc", epochsCtoC), ("--epochs-joint", epochsJoint),
                        ("--lambda-energy", lambdaEnergy), ("--components", components),
                        ("--lesion-margin", lesionMargin)):
        if value is not None:
            args += [flag, repr(value) if isinstance(value, float) else str(value)]
    if resume:
        args.append("--resume")
    return args


class FolderJob:
    """A folder command of the engine's CLI (``predict`` or ``threshold``, ``--progress json``).

    Each case is in the results folder's ``cases.csv`` when its event arrives, so a GUI re-reads
    the table whenever :meth:`poll` returns finished case ids. Exit code 6 (some cases failed, the
    others were written) is a finished job: the failures are rows of the table."""

    def __init__(self, args: list[str], workDir=None) -> None:
        self.args = args
        self.workDir = Path(workDir) if workDir else Path(tempfile.mkdtemp(prefix="ADMAnomaly-folder-"))
        self._ownsWorkDir = workDir is None
        self.casesDone, self.casesTotal = 0, 0
        self.slices = (0, 0)
        """Slices of the case at work (done, total)."""
        self.summary: dict[str, Any] = {}
        """The command's final event (``done``, ``failed`` ... lists of case ids)."""
        self.process = ProcessJob(args, self.workDir)

    @property
    def finished(self) -> bool:
        return not self.process.running

    def poll(self) -> list[str]:
        """Ids of the cases finished since the last call."""
        finished = []
        for event in self.process.poll():
            stage = event.get("stage")
            if stage == "slices":
                self.slices = (int(event.get("step", 0)), int(event.get("steps", 0)))
            elif stage == "done":
                self.summary = event
            elif "case" in event and "steps" in event:
                self.casesDone, self.casesTotal = int(event.get("step", 0)), int(event["steps"])
                self.slices = (0, 0)
                finished.append(str(event["case"]))
        return finished

    def fraction(self) -> float:
        """Overall progress 0..1: finished cases plus the slices of the case at work."""
        if not self.casesTotal:
            return 0.0
        done, total = self.slices
        within = done / total if total else 0.0
        return min(1.0, (self.casesDone + within) / self.casesTotal)

    def cancel(self) -> None:
        self.process.cancel()

    def finish(self) -> dict[str, Any]:
        """The command's summary, or its error (CancelledError after cancel). Finished cases stay."""
        try:
            return self.result()
        finally:
            self.cleanup()

    def result(self) -> dict[str, Any]:
        """Wait for the child; its summary, or its error (exit code 6 is a summary with failures)."""
        from ADMAnomalyLib.cli import EXIT_PARTIAL

        self.process.wait()
        self.poll()
        if self.process.returncode != EXIT_PARTIAL or self.process.cancelled:
            self.process.raiseForFailure()
        return self.summary

    def cleanup(self) -> None:
        """Stop the child if it still runs and remove the job folder made for it."""
        if self.process.running:
            self.process.cancel()
        if self._ownsWorkDir:
            shutil.rmtree(self.workDir, ignore_errors=True)


def predict_command(model, casesDir, resultsDir, device="auto", threshold=None, pattern=None,
                    preprocess: str = "none") -> list[str]:
    """Arguments of the engine's ``predict`` command for a folder (cases with results are skipped);
    ``preprocess`` 'auto' or 'full' treats the cases as raw scans."""
    args = [python_executable(), "-m", "ADMAnomalyLib.cli", "predict", str(model), str(casesDir), "-o",
            str(resultsDir), "--device", device, "--progress", "json"]
    if threshold is not None:
        args += ["--threshold", repr(float(threshold))]
    for role, glob in (pattern or {}).items():
        args += ["--pattern", f"{role}={glob}"]
    if preprocess != "none":
        args += ["--preprocess", preprocess]
    return args


class InferenceJob(FolderJob):
    """The panel's Apply: the engine's ``predict`` command on the four input volumes, written as one
    case into the job folder, then its energy map turned into nodes.

    Created by ``ADMAnomalyCoreLogic.startInference`` after validation. Poll :meth:`poll` for
    ``(done, total)`` slices; when :attr:`finished`, :meth:`finish` creates the output nodes (or
    raises the child's error). The engine writes the energy on the FLAIR volume's grid (raw scans
    too) with the background 1 below the brain's lowest energy, so the brain mask comes from it."""

    CASE_ID = "panel"

    def __init__(self, logic, nodes: dict[str, Any], model, device: str, workDir=None, preprocess: str = "none") -> None:
        self.logic = logic
        self.preprocess = preprocess
        self.nodeIds = {contrast: node.GetID() for contrast, node in nodes.items()}
        self.modelPath = str(model.path)
        self.modelThreshold = model.threshold
        self.progress = (0, 0)
        owned = workDir is None
        workDir = Path(workDir) if workDir else Path(tempfile.mkdtemp(prefix="ADMAnomaly-run-"))
        caseDir = workDir / "case"
        try:
            caseDir.mkdir(parents=True, exist_ok=True)
            for contrast, node in nodes.items():
                # Uncompressed: written and read back at once, then deleted with the job folder.
                sitk.WriteImage(conversion.sitk_from_volume_node(node, np.float32),
                                str(caseDir / f"{self.CASE_ID}_{contrast}.mha"), False)
        except (OSError, RuntimeError) as exc:
            if owned:
                shutil.rmtree(workDir, ignore_errors=True)
            raise errors.OutputError(f"cannot write the input volumes to {caseDir}: {exc}") from None
        self.outputDir = workDir / "out"
        # ``predict`` also writes an anomaly map, which needs a threshold; the panel thresholds the
        # energy itself, so for a model without one any finite value serves (that file is not read).
        threshold = None if model.threshold is not None else 0.0
        # --overwrite: a reused job folder's earlier result is never taken for this one.
        args = predict_command(self.modelPath, caseDir, self.outputDir, device, threshold,
                               preprocess=preprocess) + ["--overwrite"]
        FolderJob.__init__(self, args, workDir)
        self._ownsWorkDir = owned

    def poll(self) -> tuple[int, int]:
        """Slices scored so far and in all, ``(0, 0)`` while the case is read (and, raw scans,
        registered and brain-extracted)."""
        seen = len(self.process.events)
        FolderJob.poll(self)
        for event in self.process.events[seen:]:
            if event.get("stage") == "slices" and event.get("steps"):
                self.progress = (int(event.get("step", 0)), int(event["steps"]))
        return self.progress

    def finish(self, energyNode=None, segmentationNode=None, threshold=None, percentile=None, show=True):
        """Create (or overwrite) the output nodes from the finished child; raises its error."""
        from ADMAnomalyLib.results import brain_of_energy, folder_min_component_mm3, output_paths

        try:
            summary = self.result()
            failed = summary.get("failed") or {}
            if self.CASE_ID in failed:
                raise errors.ADMError(failed[self.CASE_ID])
            if self.CASE_ID not in (summary.get("done") or ()):
                raise errors.ADMError("the background process ended without a result")
            reference = self.logic.scene.GetNodeByID(self.nodeIds[CONTRASTS[0]])
            if reference is None:
                raise errors.InputError("the FLAIR volume was removed from the scene while the model was running")
            energy = sitk.ReadImage(str(output_paths(self.outputDir, self.CASE_ID)[0]), sitk.sitkFloat32)
            brain = sitk.GetImageFromArray(brain_of_energy(sitk.GetArrayViewFromImage(energy)).astype(np.uint8))
            brain.CopyInformation(energy)
            return self.logic.createOutputNodes(
                energy, brain, self.modelThreshold, reference, energyNode=energyNode,
                segmentationNode=segmentationNode, threshold=threshold, percentile=percentile,
                modelPath=self.modelPath, show=show, brainSegment=self.preprocess != "none",
                minComponentMm3=folder_min_component_mm3(self.outputDir))
        finally:
            self.cleanup()


def threshold_command(resultsDir, threshold: float) -> list[str]:
    """Arguments of the engine's ``threshold`` command (re-threshold a results folder from its energies)."""
    return [python_executable(), "-m", "ADMAnomalyLib.cli", "threshold", str(resultsDir), "--threshold",
            repr(float(threshold)), "--progress", "json"]
