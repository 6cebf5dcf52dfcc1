"""Public Python API; the CLI and the Slicer module call these functions and nothing deeper."""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import SimpleITK as sitk

from .cases import CaseFiles, case_from_images, find_cases, load_case
from .config import ADMConfig, CONTRASTS, PRESETS, preset
from .device import PRECISIONS, describe_device, inference_dtype, resolve_device
from .errors import ADMError, InputError, ModelFileError, OutputError
from .infer import Prediction, anomaly_mask, percentile_threshold, predict_case
from .io import write_image_atomic, write_text_atomic
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


def output_paths(output_dir: str | Path, case_id: str) -> tuple[Path, Path]:
    """Where :func:`predict_folder` writes a case's energy map and anomaly map."""
    output_dir = Path(output_dir)
    return output_dir / f"{case_id}_energy.nii.gz", output_dir / f"{case_id}_anomaly.nii.gz"


@dataclass
class FolderReport:
    """Outcome of a folder run: cases written, skipped as already done, and failed with a message."""

    done: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)


def predict_folder(
    model: ADMModel | str | Path | None,
    input_dir: str | Path,
    output_dir: str | Path,
    device: str = "auto",
    threshold: float | None = None,
    skip_existing: bool = True,
    batch_size: int = 16,
    pattern: dict[str, str] | None = None,
    progress: Callable[[int, int, str], None] | None = None,
    workers: int = 1,
    precision: str = "auto",
    compile: bool = False,
) -> FolderReport:
    """Predict every case of ``input_dir`` into ``output_dir``; resumable and robust per case.

    Cases whose two outputs already exist are skipped; a failing case is logged in the report (and
    ``errors.log``) and the batch goes on. Outputs are written atomically. ``workers > 1`` runs
    cases in that many processes (each on its own GPU when several are visible). ``precision`` and
    ``compile`` are as in :func:`predict`."""
    loaded = load_model(model)
    inference_dtype(resolve_device(device), precision)  # reject a bad device or precision up front
    output_dir = ensure_writable_folder(output_dir)
    chosen = threshold if threshold is not None else loaded.threshold
    if chosen is None:
        raise InputError("the model has no validation threshold; pass threshold=")
    cases = find_cases(input_dir, pattern)
    report = FolderReport()
    pending = []
    for files in cases:
        energy_path, anomaly_path = output_paths(output_dir, files.case_id)
        if skip_existing and energy_path.exists() and anomaly_path.exists():
            report.skipped.append(files.case_id)
        else:
            pending.append(files)
    finished = len(report.skipped)

    def record(case_id: str, error: str | None) -> None:
        nonlocal finished
        if error is None:
            report.done.append(case_id)
        else:
            report.failed[case_id] = error
            log.error("%s: %s", case_id, error)
        finished += 1
        if progress is not None:
            progress(finished, len(cases), case_id)

    if workers <= 1 or len(pending) <= 1:
        for files in pending:
            record(files.case_id, _predict_to_files(loaded, files, output_dir, device, chosen, batch_size,
                                                   precision, compile))
    else:
        if loaded.path is None:
            # Worker processes load the model from its file; an unsaved one would be replaced silently.
            raise InputError("workers > 1 needs a model loaded from a file; save it first or use workers=1")
        model_path = loaded.path
        context = multiprocessing.get_context("spawn")  # fork after torch threads is unsafe
        with ProcessPoolExecutor(max_workers=workers, mp_context=context, initializer=_init_worker,
                                 initargs=(str(model_path), device, workers)) as pool:
            futures = {pool.submit(_worker_predict, files, str(output_dir), chosen, batch_size, precision,
                                   compile): files for files in pending}
            for future in as_completed(futures):
                record(futures[future].case_id, future.result())
    write_text_atomic(json.dumps({"threshold": chosen, **report.__dict__}, indent=2), output_dir / "report.json")
    if report.failed:
        lines = "".join(f"{case}\t{message}\n" for case, message in report.failed.items())
        write_text_atomic(lines, output_dir / "errors.log")
    return report


def _predict_to_files(model: ADMModel, files: CaseFiles, output_dir: Path, device: str, threshold: float,
                      batch_size: int, precision: str, compile: bool) -> str | None:
    """Predict one case and write its two outputs; returns the error message or None."""
    energy_path, anomaly_path = output_paths(output_dir, files.case_id)
    try:
        case = load_case(files, model.config.preprocess.grid_tolerance)
        prediction = predict_case(model, case, device, batch_size, precision, compile=compile)
        write_image_atomic(prediction.energy, energy_path)
        write_image_atomic(prediction.anomaly(threshold), anomaly_path)
    except ADMError as exc:
        return str(exc)
    return None


_WORKER: dict[str, object] = {}


def _init_worker(model_path: str, device: str, workers: int) -> None:
    import torch

    # Share the cores instead of oversubscribing them; spread workers over the visible GPUs.
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))
    identity = multiprocessing.current_process()._identity
    worker_index = (identity[0] - 1) if identity else 0
    if resolve_device(device).type == "cuda" and torch.cuda.device_count() > 1:
        device = f"cuda:{worker_index % torch.cuda.device_count()}"
    _WORKER.update(model=load_model(model_path), device=device)


def _worker_predict(files: CaseFiles, output_dir: str, threshold: float, batch_size: int, precision: str,
                    compile: bool) -> str | None:
    return _predict_to_files(_WORKER["model"], files, Path(output_dir), _WORKER["device"], threshold, batch_size,
                             precision, compile)


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


