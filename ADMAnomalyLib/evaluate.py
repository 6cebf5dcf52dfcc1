"""Evaluating a model (and the FLAIR z-score baseline) on labelled cases at native resolution."""

from __future__ import annotations

from typing import Any, Callable, Literal

import numpy as np
import SimpleITK as sitk

from .baselines import flair_zscore
from .cases import CaseImages, find_cases, load_case
from .config import CONTRASTS
from .errors import InputError
from .infer import predict_prepared
from .metrics import pooled_and_per_case
from .model import ADMModel
from .preprocess import prepare_case, slices_to_image

SliceSelection = Literal["lesion", "all"]


def native_zscored(case: CaseImages, brain: np.ndarray) -> np.ndarray:
    """(4, Z, Y, X) array of the contrasts z-scored over the brain voxels, zero outside."""
    channels = []
    for name in CONTRASTS:
        values = sitk.GetArrayFromImage(case.images[name]).astype(np.float32)
        inside = values[brain]
        channels.append(np.where(brain, (values - inside.mean()) / max(float(inside.std()), 1e-6), 0.0))
    return np.stack(channels).astype(np.float32)


def evaluate(
    model: ADMModel,
    data_dir: str,
    slices: SliceSelection = "lesion",
    device: str = "auto",
    threshold: float | None = None,
    batch_size: int = 16,
    pattern: dict[str, str] | None = None,
    progress: Callable[[int, int, str], None] | None = None,
) -> dict[str, Any]:
    """Pixel metrics inside the brain of every labelled case in ``data_dir`` for ADM and FLAIR z-score.

    ``slices="lesion"`` restricts scoring to axial slices that contain a lesion (the validation set
    of method.md); ``"all"`` scores whole brains. The threshold metrics use ``threshold`` or the
    model's validation threshold for ADM, and each method's pooled best-F1 threshold otherwise."""
    cases = find_cases(data_dir, pattern)
    unlabelled = [files.case_id for files in cases if files.label is None]
    if unlabelled:
        raise InputError(f"evaluation needs lesion labels; none for: {', '.join(unlabelled)}")
    chosen = threshold if threshold is not None else model.threshold
    results: dict[str, list] = {"ADM": [], "FLAIR z-score": []}
    for number, files in enumerate(cases, start=1):
        case = load_case(files, model.config.preprocess.grid_tolerance)
        prepared = prepare_case(case, model.config.preprocess)
        prediction = predict_prepared(model, prepared, device, batch_size)
        brain = sitk.GetArrayFromImage(prediction.brain_mask) > 0
        labels = sitk.GetArrayFromImage(case.label) > 0
        region = brain
        if slices == "lesion":
            selected = prepared.has_lesion.astype(np.float32)[:, None, None] * np.ones_like(prepared.brain, np.float32)
            region = brain & (sitk.GetArrayFromImage(slices_to_image(selected, prepared, background=0.0)) > 0.5)
        energy = sitk.GetArrayFromImage(prediction.energy)
        results["ADM"].append((files.case_id, energy, labels, region))
        results["FLAIR z-score"].append((files.case_id, flair_zscore(native_zscored(case, brain), brain), labels, region))
        if progress is not None:
            progress(number, len(cases), files.case_id)
    report = {
        "slices": slices,
        "cases": [files.case_id for files in cases],
        "methods": {
            "ADM": pooled_and_per_case(results["ADM"], chosen),
            "FLAIR z-score": pooled_and_per_case(results["FLAIR z-score"], None),
        },
        "threshold": chosen,
    }
    return report
