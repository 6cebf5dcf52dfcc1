"""The embedded demo: the bundled model on the bundled CC-BY MS case, with an overlay picture."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import numpy as np
import SimpleITK as sitk

from .api import ensure_writable_folder, load_model, output_paths, resources_dir
from .cases import find_cases, load_case
from .errors import ModelFileError
from .infer import predict_case
from .io import write_image_atomic, write_text_atomic
from .metrics import detection_metrics, threshold_metrics


def demo_case_dir() -> Path:
    """Folder of the bundled demo case (``Resources/DemoData/patient26``), found like the bundled
    model (repository checkout or installed extension) but never moved by ``$ADMANOMALY_MODEL``."""
    return resources_dir() / "DemoData" / "patient26"


def render_overlay_png(
    flair: sitk.Image, anomaly: sitk.Image, label: sitk.Image | None, path: str | Path, n_slices: int = 4
) -> Path:
    """Write a PNG of ``n_slices`` axial FLAIR slices with the anomaly map in red and the reference
    lesion outline in green, in radiological display (LPS arrays: anterior up, patient left right)."""
    volumes = [sitk.DICOMOrient(image, "LPS") for image in (flair, anomaly) + ((label,) if label is not None else ())]
    arrays = [sitk.GetArrayFromImage(v) for v in volumes]
    flair_array, anomaly_array = arrays[0].astype(np.float32), arrays[1] > 0
    label_array = arrays[2] > 0 if label is not None else None
    # LPS arrays are ordered (z, y, x) with z running inferior -> superior; show the slices with the
    # most reference lesion (or detected anomaly) spread over the brain.
    interest = (label_array if label_array is not None else anomaly_array).sum(axis=(1, 2))
    candidates = np.flatnonzero(interest > 0) if interest.any() else np.flatnonzero(flair_array.any(axis=(1, 2)))
    chosen = candidates[np.linspace(0, len(candidates) - 1, min(n_slices, len(candidates))).round().astype(int)]
    brain_values = flair_array[flair_array != 0]
    low, high = np.percentile(brain_values, [1, 99.5]) if brain_values.size else (0.0, 1.0)
    tiles = []
    for index in chosen[::-1]:
        gray = np.clip((flair_array[index] - low) / max(high - low, 1e-6), 0, 1)
        rgb = np.stack([gray] * 3, axis=-1)
        detected = anomaly_array[index]
        rgb[detected] = 0.45 * rgb[detected] + 0.55 * np.array([1.0, 0.1, 0.1])
        if label_array is not None:
            rgb[_outline(label_array[index])] = np.array([0.1, 1.0, 0.1])
        tiles.append((rgb * 255).astype(np.uint8))
    picture = np.concatenate(tiles, axis=1)
    image = sitk.GetImageFromArray(picture, isVector=True)
    path = Path(path)
    return write_image_atomic(image, path)


def _outline(mask: np.ndarray) -> np.ndarray:
    interior = mask.copy()
    interior[1:, :] &= mask[:-1, :]
    interior[:-1, :] &= mask[1:, :]
    interior[:, 1:] &= mask[:, :-1]
    interior[:, :-1] &= mask[:, 1:]
    return mask & ~interior


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
    prediction = predict_case(model, case, device, progress=slices)
    anomaly = prediction.anomaly()
    energy_path, anomaly_path = output_paths(output_dir, files.case_id)
    write_image_atomic(prediction.energy, energy_path)
    write_image_atomic(anomaly, anomaly_path)
    png_path = render_overlay_png(case.images["flair"], anomaly, case.label, output_dir / f"{files.case_id}_overlay.png")
    energy = sitk.GetArrayViewFromImage(prediction.energy)
    brain = sitk.GetArrayViewFromImage(prediction.brain_mask) > 0
    labels = sitk.GetArrayViewFromImage(case.label) > 0
    ranking = detection_metrics(energy, labels, brain)
    at_threshold = threshold_metrics(energy, labels, prediction.threshold, brain)
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
