"""Evaluating a model (and the FLAIR z-score baseline) on labelled cases at native resolution."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Literal, Mapping, Sequence

import numpy as np
import SimpleITK as sitk

from .cases import CaseFiles, load_case
from .domains import cohort_cases
from .errors import InputError
from .infer import InferenceOptions, load_term_off_its_grid, predict_case, prepare_for_model
from .metrics import pooled_and_per_case
from .model import ADMModel
from .postprocess import anomaly_label, component_voxels
from .preprocess import native_slice_region

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
        prepared = prepare_for_model(model, case)
        flair = prepared.native_zscored["flair"]
        # predict's own path: a thick-slice case is scored on thinner slices, as predict scores it.
        energy_image = predict_case(model, case, options, prepared=prepared).energy
        energy = sitk.GetArrayFromImage(energy_image)
        brain, labels = prepared.native_brain, prepared.native_lesion
        region = brain
        if slices == "lesion":
            region = brain & native_slice_region(prepared, prepared.has_lesion)
        # Dice at the threshold reads the label predict writes (its small regions left out), the other figures E.
        predicted = None if chosen is None else anomaly_label(
            energy, brain, chosen, component_voxels(model.config.postprocess.min_component_mm3, energy_image.GetSpacing()))
        results["ADM"].append((files.case_id, energy, labels, region, predicted))
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
    load_weights: Sequence[float] = (),
) -> tuple[float | None, dict[str, Any]]:
    """The threshold of the model's (post-processed) native energies over the brain voxels of the
    lesion slices of the labelled ``cases``; ``(None, {})`` without labelled cases.

    ``cases`` grouped by domain (``{domain: cases}``, e.g. :func:`~ADMAnomalyLib.domains.cohort_groups`
    of a domains file) gives the threshold of highest mean Dice over the domains, the rule of the
    evaluation study (:func:`~ADMAnomalyLib.metrics.balanced_best_threshold`); a plain sequence is one
    group (its best-F1 threshold). Used for models with native-grid post-processing, whose energies
    differ from the network-resolution ones the trainer calibrates on.

    With ``load_weights`` the post-processing's ``load_weight`` is chosen among them first, as the
    study does (:func:`~ADMAnomalyLib.metrics.choose_load_weight`: the weight whose threshold transfers
    best between the groups); ``summary['load_weight']`` is the weight the threshold belongs to."""
    from .metrics import balanced_best_threshold, choose_load_weight, detection_metrics, loaded_parts
    from .postprocess import load_offset

    post = model.config.postprocess
    # The load term is a per-case constant added last: energies without it, then each weight's offset.
    def with_load_weight(weight: float) -> ADMModel:
        return dataclasses.replace(model, config=dataclasses.replace(
            model.config, postprocess=dataclasses.replace(post, load_weight=weight)))

    unloaded = with_load_weight(0.0)
    groups = dict(cases) if isinstance(cases, Mapping) else {"cases": list(cases)}
    measured: dict[str, list[tuple[np.ndarray, np.ndarray, float]]] = {}
    for name, members in groups.items():
        for files in members:
            if files.label is None:
                continue
            case = load_case(files, model.config.preprocess.grid_tolerance)
            prepared = prepare_for_model(model, case)
            if not prepared.has_lesion.any():
                continue
            energy = sitk.GetArrayFromImage(predict_case(unloaded, case, options, prepared=prepared).energy)
            region = prepared.native_brain & native_slice_region(prepared, prepared.has_lesion)
            if load_term_off_its_grid(model, case):
                # predict measures the term on the thin slices, or may leave it out on the small-lesion path: the
                # offset at weight 1 is read off predict itself (0 where it leaves the term out).
                at_one = predict_case(with_load_weight(1.0), case, options, prepared=prepared).energy
                log_load = float(np.median(sitk.GetArrayFromImage(at_one)[prepared.native_brain]
                                           - energy[prepared.native_brain]))
            else:
                log_load = load_offset(energy[prepared.native_brain], 1.0, post.load_reference)
            measured.setdefault(name, []).append((energy[region], prepared.native_lesion[region], log_load))
    if not measured:
        return None, {}
    weight, transfer = choose_load_weight(list(measured.values()), load_weights) if load_weights \
        else (post.load_weight, {})
    parts = loaded_parts(list(measured.values()), weight)
    used = {name: len(members) for name, members in measured.items()}
    threshold = balanced_best_threshold(parts)
    s = np.concatenate([v[0] for v in parts])
    y = np.concatenate([v[1] for v in parts])
    metrics = detection_metrics(s, y)
    summary = {"source": "lesion slices, native grid, post-processed energies",
               "rule": "highest mean Dice over the groups" if len(parts) > 1 else "best F1",
               "groups": used, "cases": sum(used.values()),
               "auroc": metrics.auroc, "auprc": metrics.auprc, "best_f1": metrics.best_f1,
               "best_threshold": metrics.best_threshold, "n_voxels": metrics.n_voxels,
               "n_positive": metrics.n_positive, "load_weight": weight}
    if transfer:
        summary["load_weight_transfer_dice"] = {str(w): f for w, f in transfer.items()}
    return float(threshold), summary
