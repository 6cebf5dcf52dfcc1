"""Public Python API; the CLI and the Slicer module call these functions and nothing deeper.

One function per ``admanomaly`` command holds its logic (the CLI only parses arguments): ``train``,
``build_cache`` (cache), ``predict_folder`` (predict), ``rethreshold_folder`` (threshold),
``evaluate``, ``study``, ``demo`` and ``model_info`` (info)."""

from __future__ import annotations

import dataclasses
import json
import logging
import multiprocessing
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import SimpleITK as sitk
from torch import device as torch_device

from .cases import CaseFiles, case_from_images, discover_cases, find_cases, load_case
from .config import ADMConfig, CONTRASTS, LABEL_FIELDS, INFERENCE_PREPROCESS_FIELDS, PRESETS, preset, profile_overrides
from .device import PRECISIONS, describe_device, resolve_device, training_dtype
from .errors import ADMError, InputError, ModelFileError, OutputError
from .infer import InferenceOptions, Prediction, anomaly_mask, percentile_threshold, predict_case
from .io import write_image_atomic, write_text_atomic
from . import results
from .results import output_paths
from .validation import check_positive_int, check_threshold, parse_shard
from .model import ADMModel, check_model_output
from .train import train

__all__ = [
    "ADMConfig", "ADMModel", "CONTRASTS", "FolderReport", "InferenceOptions", "PRECISIONS", "PRESETS", "Prediction",
    "anomaly_mask", "build_cache", "calibrate", "default_model_path", "demo", "describe_device", "evaluate", "find_cases",
    "load_case", "load_model", "model_info", "output_paths", "parse_settings", "percentile_threshold", "predict",
    "predict_case", "predict_folder", "preset", "resolve_device", "rethreshold_folder", "study", "train",
    "training_config", "with_postprocess",
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
    preprocess: "str | RawOptions" = "none",
) -> Prediction:
    """Energy map of four in-memory volumes keyed by ``CONTRASTS`` (all on one grid).

    ``precision``: 'auto' (half precision on a GPU, float32 on CPU), 'fp32', 'bf16' or 'fp16';
    ``compile``: run the CtoC network through ``torch.compile`` (pays off over many cases).
    ``preprocess``: 'none' (the volumes are co-registered and skull-stripped), 'auto' (register and
    extract the brain when the volumes need it), 'full' (always), or :class:`~ADMAnomalyLib.rawprep.RawOptions`;
    the energy then lies on the FLAIR grid, ``mask`` is a brain mask on that grid replacing brain
    extraction, and ``prediction.preprocessing`` reports the steps (:mod:`ADMAnomalyLib.rawprep`)."""
    model = load_model(model)
    options = InferenceOptions(device, precision, batch_size, compile).checked()
    raw = raw_options(preprocess, mask)
    if raw is None:
        case = case_from_images(images, mask=mask, tolerance=model.config.preprocess.grid_tolerance)
        return predict_case(model, case, options, progress, should_cancel)
    from .rawprep import prepare_raw

    raw = prepare_raw(images, raw)
    case = case_from_images(raw.images, mask=raw.brain_mask, tolerance=model.config.preprocess.grid_tolerance)
    prediction = predict_case(model, case, options, progress, should_cancel)
    prediction.preprocessing = raw
    return prediction


def raw_options(preprocess: "str | RawOptions", mask: sitk.Image | None = None) -> "RawOptions | None":
    """The raw-scan preprocessing ``preprocess`` asks for (None for 'none'), with a user brain mask."""
    from .rawprep import RawOptions

    if isinstance(preprocess, RawOptions):
        options = preprocess
    elif preprocess == "none":
        return None
    else:
        options = RawOptions.from_mode(preprocess)
    if mask is not None:
        options = dataclasses.replace(options, mask=mask)
    return options


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
    postprocess: dict[str, Any] | None = None,
    preprocess: "str | RawOptions" = "none",
    write_preprocessed: bool = False,
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
    ``precision`` and ``compile`` are as in :func:`predict`. ``preprocess`` ('none', 'auto', 'full' or
    :class:`~ADMAnomalyLib.rawprep.RawOptions`) runs the raw-scan steps of :mod:`ADMAnomalyLib.rawprep`
    (a case's ``mask`` file is then the user's brain mask on the FLAIR grid; folders of series named
    FLAIR, T1, T1 post, T2, files or DICOM folders, are found too); ``write_preprocessed`` also
    writes each case's registered, brain-extracted volumes to ``<case>_preprocessed/``."""

    options = InferenceOptions(device, precision, batch_size, compile)
    options.checked()  # a bad device, precision or batch size is refused before any case
    workers = check_positive_int(workers, "workers")
    part = parse_shard(shard)
    loaded = with_postprocess(load_model(model), postprocess)
    chosen = check_threshold(threshold) if threshold is not None else loaded.threshold
    if chosen is None:
        if postprocess:
            raise InputError("the model's threshold was chosen for its own post-processing; with other "
                             "post-processing give a threshold (admanomaly evaluate with the same --set shows the best)")
        raise InputError("the model has no validation threshold; pass threshold=")
    raw = raw_options(preprocess)
    cases = _discover(input_dir, pattern, raw)
    if part is not None:
        cases = cases[part[0] - 1 :: part[1]]
    output_dir = ensure_writable_folder(output_dir)
    model_id = results.model_identity(loaded)
    if postprocess:
        # Other post-processing makes other energies: outputs are told apart by the settings too.
        model_id += "+" + ",".join(f"{k}={v}" for k, v in sorted(postprocess.items()))
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

    def record_case(record: results.CaseRecord, rethresholded: bool = False) -> None:
        """Account for a case whose row the process that finished it has written."""
        nonlocal finished
        if record.status == results.STATUS_FAILED:
            report.failed[record.case_id] = record.reason
        else:
            (report.rethresholded if rethresholded else report.done).append(record.case_id)
        finished += 1
        if progress is not None:
            progress(finished, len(cases), record.case_id)

    for files in broken:
        record_case(_write_row(output_dir, files.case_id, files.problem or "", model_id))
    for record in rethreshold:
        try:
            outcome: results.CaseRecord | str = results.rethreshold_case(
                output_dir, record, chosen, loaded.config.postprocess.min_component_mm3)
        except ADMError as exc:
            outcome = str(exc)
        record_case(_write_row(output_dir, record.case_id, outcome, model_id), rethresholded=True)
    if workers == 1 or len(pending) <= 1:
        for files in pending:
            slices = (lambda done, total, case_id=files.case_id: case_progress(case_id, done, total)) \
                if case_progress is not None else None
            record_case(_predict_to_files(loaded, files, output_dir, options, chosen, model_id, slices, raw,
                                          write_preprocessed))
    else:
        if loaded.path is None:
            # Worker processes load the model from its file; an unsaved one would be replaced silently.
            raise InputError("workers > 1 needs a model loaded from a file; save it first or use workers=1")
        _predict_in_workers(loaded.path, postprocess, pending, output_dir, options, chosen, model_id, workers,
                            record_case, (raw, write_preprocessed))
    report_json = {"threshold": chosen, "model": model_id, "shard": None if part is None else f"{part[0]}/{part[1]}",
                   "min_component_mm3": loaded.config.postprocess.min_component_mm3, **report.__dict__}
    write_text_atomic(json.dumps(report_json, indent=2, allow_nan=False), output_dir / results.REPORT_JSON)
    results.write_error_log(output_dir)
    return report


def _discover(input_dir: str | Path, pattern: dict[str, str] | None, raw: "RawOptions | None") -> list[CaseFiles]:
    """The cases of ``input_dir``; with raw preprocessing also folders of series named by contrast
    (``FLAIR_AX.nii.gz``, DICOM folders ...) that the usual naming does not find."""
    if raw is None or pattern is not None:
        return discover_cases(input_dir, pattern)
    try:
        return discover_cases(input_dir, pattern)
    except InputError:
        from .rawprep import discover_raw_cases

        return discover_raw_cases(input_dir)


def _write_row(output_dir: Path, case_id: str, outcome: "results.CaseRecord | str", model_id: str) -> "results.CaseRecord":
    """Write a finished case's row into ``cases.csv`` (an error message becomes a failed row)."""
    if isinstance(outcome, str):
        outcome = results.CaseRecord(case_id, results.STATUS_FAILED, reason=outcome, model=model_id)
    results.update_table(output_dir, outcome)
    return outcome


def _predict_to_files(model: ADMModel, files: CaseFiles, output_dir: Path, options: InferenceOptions,
                      threshold: float, model_id: str,
                      progress: Callable[[int, int], None] | None = None, raw: "RawOptions | None" = None,
                      write_preprocessed: bool = False) -> "results.CaseRecord":
    """Predict one case, write its two outputs and then its row of ``cases.csv``, in the process that
    wrote the outputs, so that an interrupt between the two loses as little as possible."""
    outcome = _case_outputs(model, files, output_dir, options, threshold, model_id, progress, raw,
                            write_preprocessed)
    return _write_row(output_dir, files.case_id, outcome, model_id)


def _case_outputs(model: ADMModel, files: CaseFiles, output_dir: Path, options: InferenceOptions,
                  threshold: float, model_id: str,
                  progress: Callable[[int, int], None] | None, raw: "RawOptions | None",
                  write_preprocessed: bool) -> "results.CaseRecord | str":
    """One case's outputs and its record, or the error message."""
    energy_path, anomaly_path = results.output_paths(output_dir, files.case_id)
    try:
        # The reference label only feeds the table's figures: an unreadable one must not fail the case.
        unlabelled = dataclasses.replace(files, label=None)
        prepared = None
        if raw is None:
            case = load_case(unlabelled, model.config.preprocess.grid_tolerance)
        else:
            from .rawprep import load_raw_case

            case, prepared = load_raw_case(unlabelled, raw, model.config.preprocess.grid_tolerance)
        prediction = predict_case(model, case, options, progress)
        anomaly = prediction.anomaly(threshold)
        write_image_atomic(prediction.energy, energy_path)
        write_image_atomic(anomaly, anomaly_path)
        if prepared is not None:
            log.info("%s: %s", files.case_id, prepared.summary())
            if write_preprocessed:
                from .rawprep import write_preprocessed as write_volumes

                write_volumes(prepared, output_dir, files.case_id)
        label = results.read_reference(files.label, prediction.energy)
        brain = sitk.GetArrayViewFromImage(prediction.brain_mask) > 0
        figures = results.case_figures(prediction.energy, anomaly, label, brain)
    except ADMError as exc:
        return str(exc)
    return results.CaseRecord(files.case_id, results.STATUS_DONE, model=model_id, threshold=threshold,
                              reference=str(files.label) if label is not None else "", **figures)


def _predict_in_workers(model_path: Path, postprocess: dict[str, Any] | None, pending: list[CaseFiles],
                        output_dir: Path, options: InferenceOptions,
                        threshold: float, model_id: str, workers: int,
                        record_case: Callable[..., None], raw: tuple = (None, False)) -> None:
    """Run :func:`_predict_to_files` for ``pending`` in ``workers`` processes (``raw``: its raw options
    and write_preprocessed). An interrupt (Ctrl-C,
    SIGTERM) terminates every worker at once: no case is started or finished after it, and the
    atomic writes leave no partial output."""
    context = multiprocessing.get_context("spawn")  # fork after torch threads is unsafe
    pool = context.Pool(workers, initializer=_init_worker,
                        initargs=(str(model_path), postprocess, str(options.device), workers, os.getpid()))
    try:
        tasks = [(files, str(output_dir), options, threshold, model_id, *raw) for files in pending]
        for record in pool.imap_unordered(_worker_predict, tasks):
            record_case(record)
        pool.close()
    except BaseException:
        pool.terminate()
        raise
    finally:
        pool.join()


_WORKER: dict[str, object] = {}


def _init_worker(model_path: str, postprocess: dict[str, Any] | None, device: str, workers: int,
                 parent_pid: int) -> None:
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
    _WORKER.update(model=with_postprocess(load_model(model_path), postprocess), device=device)


def _exit_on_signal(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def _worker_predict(task: tuple) -> "results.CaseRecord":
    files, output_dir, options, threshold, model_id, raw, write_preprocessed = task
    options = dataclasses.replace(options, device=_WORKER["device"])
    return _predict_to_files(_WORKER["model"], files, Path(output_dir), options, threshold, model_id, raw=raw,
                             write_preprocessed=write_preprocessed)


def parse_settings(items: Sequence[str]) -> dict[str, dict[str, Any]]:
    """``["section.field=value", ...]`` (the CLI's ``--set``; values are JSON, else strings) as
    config section overrides, e.g. ``{"postprocess": {"flair_weight": 0.0}}``."""
    sections: dict[str, dict[str, Any]] = {}
    for item in items:
        key, sep, raw = str(item).partition("=")
        section, dot, name = key.strip().partition(".")
        if not sep or not dot or not section or not name:
            raise InputError(f"--set expects SECTION.FIELD=VALUE, got {item!r}")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        sections.setdefault(section, {})[name] = value
    return sections


def training_config(
    preset_name: str = "small",
    *,
    profile: str = "faithful",
    epochs_ctoc: int | None = None,
    epochs_joint: int | None = None,
    batch_size: int | None = None,
    lambda_energy: float | None = None,
    components: int | None = None,
    lesion_margin: int | None = None,
    seed: int | None = None,
    workers: int | None = None,
    settings: Sequence[str] | dict[str, dict[str, Any]] = (),
) -> ADMConfig:
    """The training configuration of a size preset and a profile (:data:`~ADMAnomalyLib.config.PROFILES`:
    'faithful' ADM or the bundled 'transfer' configuration) with the usual settings and any other
    config value (``settings``: ``--set`` strings or section overrides, which win over the profile);
    the CLI and the Slicer module both build their configurations here."""
    named = {("train", "epochs_ctoc"): epochs_ctoc, ("train", "epochs_joint"): epochs_joint,
             ("train", "batch_size"): batch_size, ("train", "lambda_energy"): lambda_energy,
             ("train", "lesion_margin"): lesion_margin, ("train", "seed"): seed, ("train", "num_workers"): workers,
             ("model", "n_components"): components}
    given = parse_settings(settings) if not isinstance(settings, dict) else {k: dict(v) for k, v in settings.items()}
    try:
        overrides = profile_overrides(profile)
    except ValueError as exc:
        raise InputError(str(exc)) from None
    for section, values in given.items():
        overrides.setdefault(section, {}).update(values)
    for (section, name), value in named.items():
        if value is not None:
            overrides.setdefault(section, {})[name] = value
    try:
        config = preset(preset_name, **overrides)
        training_dtype(torch_device("cpu"), config.train.precision)
    except (ValueError, TypeError) as exc:
        raise InputError(f"invalid configuration: {exc}") from None
    return config


def with_postprocess(model: ADMModel, overrides: dict[str, Any] | None) -> ADMModel:
    """``model`` with other post-processing (``PostprocessConfig`` fields, or the preprocessing fields
    of :data:`~ADMAnomalyLib.config.INFERENCE_PREPROCESS_FIELDS`, which a trained model may take), for trying
    it without retraining; e.g. ``{"flair_weight": 0}`` shows the model's own
    evidence. The stored threshold was chosen for the model's own post-processing, so the result has
    none: give one (unless only :data:`~ADMAnomalyLib.config.LABEL_FIELDS` change, which leave the energy as it
    was)."""
    if not overrides:
        return model
    preprocessing = {k: v for k, v in overrides.items() if k in INFERENCE_PREPROCESS_FIELDS}
    try:
        post = dataclasses.replace(model.config.postprocess,
                                   **{k: v for k, v in overrides.items() if k not in preprocessing})
        prep = dataclasses.replace(model.config.preprocess, **preprocessing)
    except (TypeError, ValueError) as exc:
        raise InputError(f"invalid post-processing setting: {exc}") from None
    config = dataclasses.replace(model.config, preprocess=prep, postprocess=post)
    metadata = {**model.metadata, "postprocess_overrides": dict(overrides)}
    # A label-only setting leaves the energy, and so the threshold chosen on it, as it was.
    threshold = model.threshold if set(overrides) <= set(LABEL_FIELDS) else None
    return ADMModel(config, model.network, model.gmm, threshold, metadata, model.path)


def evaluate(
    model: ADMModel | str | Path | None,
    data_dir: str | Path,
    slices: str = "lesion",
    device: str = "auto",
    batch_size: int = 16,
    threshold: float | None = None,
    pattern: dict[str, str] | None = None,
    postprocess: dict[str, Any] | None = None,
    progress: FolderProgress | None = None,
    json_path: str | Path | None = None,
) -> dict[str, Any]:
    """Pixel metrics of ADM and the FLAIR baseline inside the brain of every labelled case of
    ``data_dir`` (:func:`ADMAnomalyLib.evaluate.evaluate`), optionally with other post-processing
    (:func:`with_postprocess`) and written to ``json_path``."""
    from .evaluate import evaluate as evaluate_cases

    loaded = with_postprocess(load_model(model), postprocess)
    options = InferenceOptions(device, batch_size=batch_size).checked()
    chosen = check_threshold(threshold) if threshold is not None else None
    report = evaluate_cases(loaded, data_dir, slices=slices, options=options, threshold=chosen, pattern=pattern,
                            progress=progress)
    if postprocess:
        report["postprocess_overrides"] = dict(postprocess)
    if json_path is not None:
        write_text_atomic(json.dumps(report, indent=2, allow_nan=False), json_path)
    return report


def calibrate(
    model: ADMModel | str | Path | None,
    data_dir: str | Path,
    output_path: str | Path,
    postprocess: dict[str, Any] | None = None,
    device: str = "auto",
    batch_size: int = 16,
    pattern: dict[str, str] | None = None,
    choose_load_weight: bool = False,
) -> ADMModel:
    """``model`` with other post-processing (``PostprocessConfig`` fields, :func:`with_postprocess`)
    and a threshold chosen anew on the lesion slices of the labelled cases of ``data_dir`` (a folder,
    or a domains file: highest mean Dice over its domains, the study's rule), written to
    ``output_path``: new post-processing, or a threshold fitted to a local cohort, without retraining.

    ``choose_load_weight`` first chooses ``postprocess.load_weight`` among
    :data:`~ADMAnomalyLib.postprocess.LOAD_WEIGHTS` by how well the threshold transfers between the
    domains of a domains file (leave one out in turn), the rule of the study's '(z+load)' rows."""
    from .domains import cohort_groups
    from .evaluate import calibrate_threshold
    from .postprocess import LOAD_WEIGHTS

    loaded = with_postprocess(load_model(model), postprocess)
    options = InferenceOptions(device, batch_size=batch_size).checked()
    output_path = check_model_output(output_path)
    groups = cohort_groups(data_dir, pattern)
    if choose_load_weight:
        try:  # the config's own rule for a load term, checked before any case is scored
            dataclasses.replace(loaded.config.postprocess, load_weight=max(LOAD_WEIGHTS))
        except ValueError as exc:
            raise InputError(f"choosing a load weight: {exc}") from None
        if len(groups) < 2:
            raise InputError(f"{data_dir}: choosing a load weight needs labelled cases of at least two domains "
                             "(a domains file), to measure how its threshold transfers between them")
    threshold, summary = calibrate_threshold(loaded, groups, options, LOAD_WEIGHTS if choose_load_weight else ())
    if threshold is None:
        raise InputError(f"{data_dir}: no labelled case with a lesion to choose a threshold on")
    config = loaded.config
    if summary["load_weight"] != config.postprocess.load_weight:
        config = dataclasses.replace(config, postprocess=dataclasses.replace(
            config.postprocess, load_weight=summary["load_weight"]))
    calibrated = ADMModel(config, loaded.network, loaded.gmm, threshold,
                          {**loaded.metadata, "validation": summary,
                           "calibration": {"data": str(data_dir), "postprocess_overrides": dict(postprocess or {}),
                                           "chose_load_weight": choose_load_weight}})
    calibrated.save(output_path)
    return calibrated


def build_cache(data_dir: str | Path, output_dir: str | Path, preset_name: str = "small",
                lesion_margin: int | None = None, pattern: dict[str, str] | None = None,
                progress: FolderProgress | None = None) -> Path:
    """One-off preprocessing of a large cohort into a memory-mapped slice cache for ``train``."""
    from .cache import build_slice_cache

    config = training_config(preset_name, lesion_margin=lesion_margin)
    return build_slice_cache(data_dir, output_dir, config, pattern=pattern, progress=progress)


def model_info(model: ADMModel | str | Path | None) -> dict[str, Any]:
    """A model file's settings, threshold, validation metrics and training command."""
    loaded = load_model(model)
    return {"path": str(loaded.path), "threshold": loaded.threshold, "config": loaded.config.to_dict(),
            "validation": loaded.metadata.get("validation"),
            "training_command": loaded.metadata.get("training_command")}


def demo(output_dir: str | Path = "admanomaly_demo", device: str = "auto",
         progress: CaseProgress | None = None) -> dict[str, Any]:
    """The bundled model on the bundled MS case (:func:`ADMAnomalyLib.demo.run_demo`)."""
    from .demo import run_demo

    return run_demo(output_dir, device=device, progress=progress)


def rethreshold_folder(results_dir: str | Path, threshold: float,
                       progress: FolderProgress | None = None) -> dict[str, Any]:
    """Rewrite a results folder's anomaly maps at ``threshold`` from the stored energies
    (:func:`ADMAnomalyLib.results.rethreshold_folder`); returns the case table."""
    return results.rethreshold_folder(results_dir, threshold, progress=progress)


def study(data_dir: str | Path | None, output_dir: str | Path = "runs/study", setting: str = "quick",
          docs_dir: str | Path | None = "docs", run: bool = True, progress: Callable[[str], None] | None = None,
          command: str | None = None, domains: str | Path | None = None,
          report_dirs: Sequence[str | Path] | None = None, **overrides: Any) -> dict[str, Any]:
    """The evaluation study (:mod:`ADMAnomalyLib.study`): with ``run``, train and score every method
    on ``data_dir`` (patient folds) or on the domains file ``domains`` (leave one domain out; give
    exactly one of the two) into ``output_dir/study.json`` (``setting`` 'quick' or 'full',
    ``overrides`` of its :class:`~ADMAnomalyLib.study.StudySettings`); with ``docs_dir``, the
    figures and results.md from the study JSON of ``report_dirs`` (study folders or the JSON files
    themselves; default: ``output_dir``; a patient-fold study and a domain study make one report). Returns ``{"result": ..., "report":
    path}`` (either may be None)."""
    from . import study as study_module

    output_dir = Path(output_dir)
    outcome: dict[str, Any] = {"result": None, "report": None}
    if run:
        if (data_dir is None) == (domains is None):
            raise InputError("the study needs either a folder of labelled cases or a domains file (exactly one)")
        make = {"quick": study_module.quick_settings, "full": study_module.full_settings}.get(setting)
        if make is None:
            raise InputError(f"study setting must be quick or full, not {setting!r}")
        if domains is not None:
            overrides = {**overrides, "split": "domains"}
        try:
            settings = make(**overrides)
        except TypeError as exc:
            raise InputError(f"invalid study setting: {exc}") from None
        outcome["result"] = study_module.run_study(data_dir, output_dir, settings, progress=progress, command=command,
                                                   domains_file=domains)
    if docs_dir is not None:
        # A study's folder or its JSON itself (docs/ keeps copies of the JSONs, not the run folders).
        json_paths = [path if path.suffix == ".json" else path / "study.json"
                      for path in map(Path, report_dirs or [output_dir])]
        for json_path in json_paths:
            if not json_path.exists():
                raise InputError(f"{json_path}: no study JSON to report on")
        outcome["report"] = study_module.make_report(json_paths, docs_dir)
    return outcome


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


