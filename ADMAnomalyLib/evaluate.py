"""Evaluating a model (and the FLAIR z-score baseline) on labelled cases at native resolution."""

from __future__ import annotations

from typing import Any, Callable, Literal, Mapping, Sequence

import numpy as np
import SimpleITK as sitk

from .cases import CaseFiles, load_case
from .domains import cohort_cases
from .errors import InputError
from .infer import InferenceOptions, energy_volume
from .metrics import pooled_and_per_case
from .model import ADMModel
from .preprocess import native_slice_region, prepare_case

SliceSelection = Literal["lesion", "all"]


def evaluate(
    model: ADMModel,
    data_dir: str,
    slices: SliceSelection = "lesion",
    options: InferenceOptions = InferenceOptions(),
    threshold: float | None = None,
    pattern: dict[str, str] | None = None,
    progress: Callable[[int, int, str], None] | None = None,
) -> dict[str, Any]:
    """Pixel metrics inside the brain of every labelled case in ``data_dir`` for ADM and FLAIR z-score.

    ``slices="lesion"`` restricts scoring to axial slices that contain a lesion (the validation set
    of method.md); ``"all"`` scores whole brains. The threshold metrics use ``threshold`` or the
    model's validation threshold for ADM, and each method's pooled best-F1 threshold otherwise."""
    options = options.checked()
    cases = cohort_cases(data_dir, pattern)
    unlabelled = [files.case_id for files in cases if files.label is None]
    if unlabelled:
        raise InputError(f"evaluation needs lesion labels; none for: {', '.join(unlabelled)}")
    chosen = threshold if threshold is not None else model.threshold
    results: dict[str, list] = {"ADM": [], "FLAIR z-score": []}
    for number, files in enumerate(cases, start=1):
        case = load_case(files, model.config.preprocess.grid_tolerance)
        prepared = prepare_case(case, model.config.preprocess)
        flair = prepared.native_zscored["flair"]
        energy = sitk.GetArrayFromImage(energy_volume(model, prepared, options))
        brain, labels = prepared.native_brain, prepared.native_lesion
        region = brain
        if slices == "lesion":
            region = brain & native_slice_region(prepared, prepared.has_lesion)
        results["ADM"].append((files.case_id, energy, labels, region))
        results["FLAIR z-score"].append((files.case_id, flair, labels, region))
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


def calibrate_threshold(
    model: ADMModel,
    cases: Sequence[CaseFiles] | Mapping[str, Sequence[CaseFiles]],
    options: InferenceOptions = InferenceOptions(),
) -> tuple[float | None, dict[str, Any]]:
    """The threshold of the model's (post-processed) native energies over the brain voxels of the
    lesion slices of the labelled ``cases``; ``(None, {})`` without labelled cases.

    ``cases`` grouped by domain (``{domain: cases}``, e.g. :func:`~ADMAnomalyLib.domains.cohort_groups`
    of a domains file) gives the threshold of highest mean Dice over the domains, the rule of the
    evaluation study (:func:`~ADMAnomalyLib.metrics.balanced_best_threshold`); a plain sequence is one
    group (its best-F1 threshold). Used for models with native-grid post-processing, whose energies
    differ from the network-resolution ones the trainer calibrates on."""
    from .metrics import balanced_best_threshold, detection_metrics

    groups = dict(cases) if isinstance(cases, Mapping) else {"cases": list(cases)}
    parts: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    used: dict[str, int] = {}
    for name, members in groups.items():
        scores, labels = [], []
        for files in members:
            if files.label is None:
                continue
            case = load_case(files, model.config.preprocess.grid_tolerance)
            prepared = prepare_case(case, model.config.preprocess)
            if not prepared.has_lesion.any():
                continue
            energy = energy_volume(model, prepared, options)
            region = prepared.native_brain & native_slice_region(prepared, prepared.has_lesion)
            scores.append(sitk.GetArrayFromImage(energy)[region])
            labels.append(prepared.native_lesion[region])
        if scores:
            parts[name] = (np.concatenate(scores), np.concatenate(labels))
            used[name] = len(scores)
    if not parts:
        return None, {}
    threshold = balanced_best_threshold(list(parts.values()))
    s = np.concatenate([v[0] for v in parts.values()])
    y = np.concatenate([v[1] for v in parts.values()])
    metrics = detection_metrics(s, y)
    summary = {"source": "lesion slices, native grid, post-processed energies",
               "rule": "highest mean Dice over the groups" if len(parts) > 1 else "best F1",
               "groups": used, "cases": sum(used.values()),
               "auroc": metrics.auroc, "auprc": metrics.auprc, "best_f1": metrics.best_f1,
               "best_threshold": metrics.best_threshold, "n_voxels": metrics.n_voxels,
               "n_positive": metrics.n_positive}
    return float(threshold), summary
