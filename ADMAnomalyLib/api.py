"""Public Python API; the CLI and the Slicer module call these functions and nothing deeper."""

from __future__ import annotations

import dataclasses
import json
import logging
import multiprocessing
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import SimpleITK as sitk

from .cases import CaseFiles, case_from_images, discover_cases, find_cases, load_case
from .config import ADMConfig, CONTRASTS, PRESETS, preset
from .device import PRECISIONS, describe_device, inference_dtype, resolve_device
from .errors import ADMError, InputError, ModelFileError, OutputError
from .infer import Prediction, anomaly_mask, percentile_threshold, predict_case
from .io import write_image_atomic, write_text_atomic
from .results import output_paths
from .validation import check_positive_int, check_threshold, parse_shard
from .model import ADMModel
from .train import train

__all__ = [
    "ADMConfig", "ADMModel", "CONTRASTS", "FolderReport", "PRECISIONS", "PRESETS", "Prediction", "anomaly_mask",
    "default_model_path", "describe_device", "find_cases", "load_case", "load_model", "output_paths",
    "percentile_threshold", "predict", "predict_case", "predict_folder", "preset", "resolve_device", "train",
]

log = logging.getLogger(__name__)

DEFAULT_MODEL_NAME = "ADMAnomaly_default.admm"
MODEL_ENV_VARIABLE = "ADMANOMALY_MODEL"


def resources_dir() -> Path:
    """``Resources/`` with the bundled model and demo data: beside the package in a repository
    checkout, inside it in an installed Slicer extension."""
    package = Path(__file__).resolve().parent
    candidates = [package.parent / "Resources", package / "Resources"]
    return next((path for path in candidates if (path / "Models" / DEFAULT_MODEL_NAME).exists()), candidates[0])


def default_model_path() -> Path:
    """The bundled model: ``$ADMANOMALY_MODEL`` if set, else ``Resources/Models/ADMAnomaly_default.admm``."""
    override = os.environ.get(MODEL_ENV_VARIABLE)
    return Path(override) if override else resources_dir() / "Models" / DEFAULT_MODEL_NAME


def load_model(path: str | Path | ADMModel | None = None) -> ADMModel:
    """Load a model file; ``None`` loads the bundled default."""
    if isinstance(path, ADMModel):
        return path
    path = default_model_path() if path is None else Path(path)
    if not path.exists():
        raise ModelFileError(f"{path}: model file not found")
    return ADMModel.load(path)


def predict(
    model: ADMModel | str | Path | None,
    images: dict[str, sitk.Image],
    mask: sitk.Image | None = None,
    device: str = "auto",
    batch_size: int = 16,
    progress: Callable[[int, int], None] | None = None,
    should_cancel: Callable[[], bool] | None = None,
    precision: str = "auto",
    compile: bool = False,
) -> Prediction:
    """Energy map of four in-memory volumes keyed by ``CONTRASTS`` (all on one grid).

    ``precision``: 'auto' (half precision on a GPU, float32 on CPU), 'fp32', 'bf16' or 'fp16';
    ``compile``: run the CtoC network through ``torch.compile`` (pays off over many cases)."""
    model = load_model(model)
    case = case_from_images(images, mask=mask, tolerance=model.config.preprocess.grid_tolerance)
    return predict_case(model, case, device, batch_size, precision, progress, should_cancel, compile)


@dataclass
class FolderReport:
    """Outcome of a folder run: cases written, re-thresholded from their stored energy, skipped as
    already done, and failed with a message."""

    done: list[str] = field(default_factory=list)
    rethresholded: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)


FolderProgress = Callable[[int, int, str], None]
CaseProgress = Callable[[str, int, int], None]


def predict_folder(
    model: ADMModel | str | Path | None,
    input_dir: str | Path,
    output_dir: str | Path,
    device: str = "auto",
    threshold: float | None = None,
    skip_existing: bool = True,
    batch_size: int = 16,
    pattern: dict[str, str] | None = None,
    progress: FolderProgress | None = None,
    workers: int = 1,
    precision: str = "auto",
    compile: bool = False,
    shard: str | tuple[int, int] | None = None,
    case_progress: CaseProgress | None = None,
) -> FolderReport:
    """Predict every case of ``input_dir`` into ``output_dir``; resumable and robust per case.

    ``output_dir/cases.csv`` (:mod:`ADMAnomalyLib.results`) records each case's status, the model
    and threshold its outputs were made with, and its figures; it is updated after every case. A
    case whose outputs were made by this model is skipped, or only re-thresholded from its stored
    energy when ``threshold`` changed. A broken case (a contrast missing, an unreadable file ...)
    is recorded as failed and the others go on; ``errors.log`` lists the folder's failed cases.
    Outputs are written atomically and verified.

    ``workers > 1`` runs cases in that many processes (each on its own GPU when several are
    visible); ``shard`` ``"K/N"`` takes every N-th case starting at the K-th (1-based) so that
    independent jobs split one folder. ``progress(done, total, case_id)`` after each case,
    ``case_progress(case_id, done_slices, total_slices)`` within a case (one process only).
    ``precision`` and ``compile`` are as in :func:`predict`."""
    from . import results

    batch_size = check_positive_int(batch_size, "batch size")
    workers = check_positive_int(workers, "workers")
    part = parse_shard(shard)
    loaded = load_model(model)
    inference_dtype(resolve_device(device), precision)  # reject a bad device or precision up front
    chosen = check_threshold(threshold) if threshold is not None else loaded.threshold
    if chosen is None:
        raise InputError("the model has no validation threshold; pass threshold=")
    cases = discover_cases(input_dir, pattern)
    if part is not None:
        cases = cases[part[0] - 1 :: part[1]]
    output_dir = ensure_writable_folder(output_dir)
    model_id = results.model_identity(loaded)
    table = results.read_table(output_dir)

    report = FolderReport()
    pending: list[CaseFiles] = []
    rethreshold: list[results.CaseRecord] = []
    broken: list[CaseFiles] = []
    for files in cases:
        record = table.get(files.case_id)
        finished_before = (
            skip_existing and record is not None and record.done and model_id != "unsaved"
            and record.model == model_id and all(p.exists() for p in results.output_paths(output_dir, files.case_id))
        )
        if files.problem is not None:
            broken.append(files)
        elif not finished_before:
            pending.append(files)
        elif record.threshold == chosen:
            report.skipped.append(files.case_id)
        else:
            rethreshold.append(record)
    finished = len(report.skipped)

    def record_case(case_id: str, outcome: "results.CaseRecord | str", rethresholded: bool = False) -> None:
        nonlocal finished
        if isinstance(outcome, str):
            report.failed[case_id] = outcome
            outcome = results.CaseRecord(case_id, results.STATUS_FAILED, reason=outcome, model=model_id)
        else:
            (report.rethresholded if rethresholded else report.done).append(case_id)
        results.update_table(output_dir, outcome)
        finished += 1
        if progress is not None:
            progress(finished, len(cases), case_id)

    for files in broken:
        record_case(files.case_id, files.problem or "")
    for record in rethreshold:
        try:
            outcome: results.CaseRecord | str = results.rethreshold_case(output_dir, record, chosen)
        except ADMError as exc:
            outcome = str(exc)
        record_case(record.case_id, outcome, rethresholded=True)
    if workers == 1 or len(pending) <= 1:
        for files in pending:
            slices = (lambda done, total, case_id=files.case_id: case_progress(case_id, done, total)) \
                if case_progress is not None else None
            record_case(files.case_id, _predict_to_files(loaded, files, output_dir, device, chosen, batch_size,
                                                        precision, compile, model_id, slices))
    else:
        if loaded.path is None:
            # Worker processes load the model from its file; an unsaved one would be replaced silently.
            raise InputError("workers > 1 needs a model loaded from a file; save it first or use workers=1")
        _predict_in_workers(loaded.path, pending, output_dir, device, chosen, batch_size, precision, compile,
                            model_id, workers, record_case)
    report_json = {"threshold": chosen, "model": model_id, "shard": None if part is None else f"{part[0]}/{part[1]}",
                   **report.__dict__}
    write_text_atomic(json.dumps(report_json, indent=2, allow_nan=False), output_dir / "report.json")
    results.write_error_log(output_dir)
    return report


def _predict_to_files(model: ADMModel, files: CaseFiles, output_dir: Path, device: str, threshold: float,
                      batch_size: int, precision: str, compile: bool, model_id: str,
                      progress: Callable[[int, int], None] | None = None) -> "results.CaseRecord | str":
    """Predict one case and write its two outputs; returns its table record, or the error message."""
    from . import results

    energy_path, anomaly_path = results.output_paths(output_dir, files.case_id)
    try:
        # The reference label only feeds the table's figures: an unreadable one must not fail the case.
        case = load_case(dataclasses.replace(files, label=None), model.config.preprocess.grid_tolerance)
        prediction = predict_case(model, case, device, batch_size, precision, progress, compile=compile)
        anomaly = prediction.anomaly(threshold)
        write_image_atomic(prediction.energy, energy_path)
        write_image_atomic(anomaly, anomaly_path)
        label = results.read_reference(files.label, prediction.energy)
        brain = sitk.GetArrayViewFromImage(prediction.brain_mask) > 0
        figures = results.case_figures(prediction.energy, anomaly, label, brain)
    except ADMError as exc:
        return str(exc)
    return results.CaseRecord(files.case_id, results.STATUS_DONE, model=model_id, threshold=threshold,
                              reference=str(files.label) if label is not None else "", **figures)


def _predict_in_workers(model_path: Path, pending: list[CaseFiles], output_dir: Path, device: str, threshold: float,
                        batch_size: int, precision: str, compile: bool, model_id: str, workers: int,
                        record_case: Callable[..., None]) -> None:
    """Run :func:`_predict_to_files` for ``pending`` in ``workers`` processes. An interrupt (Ctrl-C,
    SIGTERM) terminates every worker at once: no case is started or finished after it, and the
    atomic writes leave no partial output."""
    context = multiprocessing.get_context("spawn")  # fork after torch threads is unsafe
    pool = context.Pool(workers, initializer=_init_worker, initargs=(str(model_path), device, workers, os.getpid()))
    try:
        tasks = [(files, str(output_dir), threshold, batch_size, precision, compile, model_id) for files in pending]
        for case_id, outcome in pool.imap_unordered(_worker_predict, tasks):
            record_case(case_id, outcome)
        pool.close()
    except BaseException:
        pool.terminate()
        raise
    finally:
        pool.join()


_WORKER: dict[str, object] = {}


def _init_worker(model_path: str, device: str, workers: int, parent_pid: int) -> None:
    import signal
    import threading

    import torch

    # Ctrl-C reaches the whole process group: the parent decides and terminates the workers, whose
    # SIGTERM unwinds (removing temporary files) instead of killing mid-write.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _exit_on_signal)

    def watch_parent() -> None:
        # A worker whose parent died (killed with SIGKILL, crashed) stops instead of writing on.
        while os.getppid() == parent_pid:
            time.sleep(0.5)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch_parent, daemon=True).start()
    # Share the cores instead of oversubscribing them; spread workers over the visible GPUs.
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))
    identity = multiprocessing.current_process()._identity
    worker_index = (identity[0] - 1) if identity else 0
    if resolve_device(device).type == "cuda" and torch.cuda.device_count() > 1:
        device = f"cuda:{worker_index % torch.cuda.device_count()}"
    _WORKER.update(model=load_model(model_path), device=device)


def _exit_on_signal(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def _worker_predict(task: tuple) -> tuple[str, object]:
    files, output_dir, threshold, batch_size, precision, compile, model_id = task
    return files.case_id, _predict_to_files(_WORKER["model"], files, Path(output_dir), _WORKER["device"], threshold,
                                            batch_size, precision, compile, model_id)


def ensure_writable_folder(folder: str | Path) -> Path:
    """Create ``folder`` if needed and check it can be written, else :class:`OutputError`."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot create output folder {folder}: {exc.strerror or exc}") from None
    if not os.access(folder, os.W_OK | os.X_OK):
        raise OutputError(f"output folder {folder} is not writable")
    return folder


