"""The embedded demo: the bundled model on the bundled CC-BY MS case, with an overlay picture
(:func:`ADMAnomalyLib.figures.case_overlay_figure`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import SimpleITK as sitk

from .api import ensure_writable_folder, load_model, output_paths, resources_dir
from .cases import find_cases, load_case
from .errors import ModelFileError
from .figures import case_overlay_figure
from .infer import InferenceOptions, predict_case
from .io import write_image_atomic, write_text_atomic
from .metrics import detection_metrics, label_metrics


def demo_case_dir() -> Path:
    """Folder of the bundled demo case (``Resources/DemoData/patient26``), found like the bundled
    model (repository checkout or installed extension) but never moved by ``$ADMANOMALY_MODEL``."""
    return resources_dir() / "DemoData" / "patient26"


def run_demo(output_dir: str | Path = "admanomaly_demo", device: str = "auto",
             progress: Callable[[str, int, int], None] | None = None) -> dict[str, Any]:
    """Run the bundled model on the demo case; write energy, anomaly, overlay PNG and metrics JSON.
    ``progress(case_id, done_slices, total_slices)`` reports the slices as they are scored."""
    output_dir = ensure_writable_folder(output_dir)
    model = load_model(None)
    if model.threshold is None:
        # $ADMANOMALY_MODEL may point at a model saved without validation (threshold None).
        raise ModelFileError(f"{model.path}: the model has no threshold, so the demo cannot draw an anomaly map")
    files = find_cases(demo_case_dir())[0]
    case = load_case(files, model.config.preprocess.grid_tolerance)
    slices = (lambda done, total: progress(files.case_id, done, total)) if progress is not None else None
    prediction = predict_case(model, case, InferenceOptions(device), progress=slices)
    anomaly = prediction.anomaly()
    energy_path, anomaly_path = output_paths(output_dir, files.case_id)
    write_image_atomic(prediction.energy, energy_path)
    write_image_atomic(anomaly, anomaly_path)
    energy = sitk.GetArrayViewFromImage(prediction.energy)
    brain = sitk.GetArrayViewFromImage(prediction.brain_mask) > 0
    labels = sitk.GetArrayViewFromImage(case.label) > 0
    ranking = detection_metrics(energy, labels, brain)
    predicted = sitk.GetArrayViewFromImage(anomaly) > 0
    at_threshold = label_metrics(predicted[brain], labels[brain], prediction.threshold)  # the label written
    title = (f"{files.case_id} (multiple sclerosis, FLAIR) \u2014 {model.path.name}: AUPRC {ranking.auprc:.3f} \u00b7 "
             f"AUROC {ranking.auroc:.3f} \u00b7 Dice at its threshold {at_threshold.dice:.3f} \u00b7 "
             f"best Dice {ranking.best_f1:.3f}")
    png_path = case_overlay_figure(case.images["flair"], prediction.energy, anomaly, case.label,
                                   prediction.brain_mask, prediction.threshold, title,
                                   output_dir / f"{files.case_id}_overlay.png")
    summary = {
        "case": files.case_id,
        "model": str(model.path),
        "threshold": prediction.threshold,
        "auroc": ranking.auroc,
        "auprc": ranking.auprc,
        "best_dice": ranking.best_f1,
        "dice_at_threshold": at_threshold.dice,
        "precision_at_threshold": at_threshold.precision,
        "recall_at_threshold": at_threshold.recall,
        "outputs": {"energy": str(energy_path), "anomaly": str(anomaly_path), "overlay": str(png_path)},
    }
    write_text_atomic(json.dumps(summary, indent=2), output_dir / f"{files.case_id}_metrics.json")
    return summary
