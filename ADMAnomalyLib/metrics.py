"""Pixel-wise detection metrics, anomaly = positive class, computed only inside the brain.

Conventions used by every function here (method.md, 'Evaluation protocol'):

* ``labels`` are any integer/bool array; a voxel is *anomalous* (positive) when its label is
  non-zero, so BraTS labels 1, 2 and 4 all count as lesion.
* ``brain`` (optional bool array, same shape) selects the voxels that are scored; background is
  excluded from every count, so background scores can never change a metric.
* A voxel is *predicted* anomalous when ``score >= threshold``. ``best_threshold`` is always one of
  the observed scores, and :func:`threshold_metrics` at that threshold reproduces ``best_f1``
  exactly.
* Dice of a binary prediction equals its F1 score, so ``best_f1`` is also the best Dice.
* Undefined values (AUROC without both classes, precision with no predicted voxel, ...) are NaN
  in the dataclasses and ``None`` in the JSON dictionaries (strict JSON has no NaN).

The ranking metrics are computed exactly (no score quantisation) from a single sorted pass, the
same cumulative true/false positive curve scikit-learn builds in ``_binary_clf_curve``; the tests
check the results against ``roc_auc_score``, ``average_precision_score`` and
``precision_recall_curve``. ``numpy.sort`` of a float array is far faster than the stable
``argsort`` scikit-learn uses, which keeps 10^7 voxels to about a second.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np


@dataclass
class DetectionMetrics:
    """Threshold-free metrics of one score map (or of pooled maps)."""

    auroc: float
    """Area under the ROC curve; NaN when ``degenerate`` is set."""
    auprc: float
    """Average precision (step-wise area under the precision-recall curve, as scikit-learn);
    NaN when ``degenerate`` is set."""
    best_f1: float
    """Highest F1 (= Dice) over all thresholds; NaN when there is no positive voxel."""
    best_threshold: float
    """Score at which ``best_f1`` is reached (predicted anomalous when ``score >= threshold``)."""
    n_voxels: int
    """Voxels evaluated (inside the brain)."""
    n_positive: int
    """Anomalous voxels among them."""
    degenerate: str | None = None
    """Why AUROC/AUPRC are undefined: 'no voxels', 'no positive voxels' or 'no negative voxels';
    None when both classes are present."""

    @property
    def n_negative(self) -> int:
        """Normal voxels evaluated."""
        return self.n_voxels - self.n_positive


@dataclass
class ThresholdMetrics:
    """Metrics of the binary map ``score >= threshold``."""

    threshold: float
    dice: float
    """Dice = F1 = 2TP / (2TP + FP + FN); NaN when there is neither a positive nor a prediction."""
    precision: float
    """TP / (TP + FP); NaN when nothing is predicted anomalous."""
    recall: float
    """TP / (TP + FN); NaN when there is no positive voxel."""


# --------------------------------------------------------------------------------------------------
# core


def _select(
    scores: np.ndarray, labels: np.ndarray, brain: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray]:
    """Flatten to the scored voxels: (scores, bool labels). Float scores keep their dtype."""
    scores = np.asarray(scores)
    labels = np.asarray(labels)
    if scores.shape != labels.shape:
        raise ValueError(f"scores shape {scores.shape} differs from labels shape {labels.shape}")
    if not np.issubdtype(scores.dtype, np.floating):
        scores = scores.astype(np.float64)
    if brain is not None:
        brain = np.asarray(brain)
        if brain.shape != scores.shape:
            raise ValueError(f"brain mask shape {brain.shape} differs from scores shape {scores.shape}")
        brain = brain.astype(bool, copy=False)
        s, y = scores[brain], labels[brain] != 0
    else:
        s, y = scores.ravel(), labels.ravel() != 0
    if np.isnan(s).any():
        # NaN has no place in a ranking; silently sorting it would corrupt every metric.
        raise ValueError("scores contain NaN inside the evaluated region")
    return s, y


def _curve(s: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Cumulative counts at every distinct score, highest score first.

    Returns ``(thresholds, tps, fps)``: predicting ``score >= thresholds[k]`` yields ``tps[k]``
    true and ``fps[k]`` false positives (scikit-learn's ``_binary_clf_curve``).
    """
    n = s.size
    ordered = np.sort(s)  # ascending; np.sort is SIMD-fast, unlike a stable argsort
    starts = np.flatnonzero(ordered[1:] != ordered[:-1]) + 1
    starts = np.concatenate(([0], starts))
    thresholds = ordered[starts]
    del ordered
    at_or_above = n - starts  # voxels with score >= thresholds[k]
    del starts
    # Every positive score is one of the thresholds, so this is an exact group index.
    group = np.searchsorted(thresholds, s[y])
    per_group = np.bincount(group, minlength=thresholds.size)
    del group
    tps = np.cumsum(per_group[::-1])  # descending thresholds: positives at or above
    del per_group
    fps = at_or_above[::-1] - tps
    return thresholds[::-1], tps, fps


def _best_f1(thresholds: np.ndarray, tps: np.ndarray, fps: np.ndarray, n_pos: int) -> tuple[float, float]:
    # F1 = 2TP / (2TP + FP + FN) = 2TP / (TP + FP + P); argmax picks the highest threshold on ties.
    f1 = 2.0 * tps / (tps + fps + n_pos)
    k = int(np.argmax(f1))
    return float(thresholds[k]), float(f1[k])


def _empty(n: int, n_pos: int, reason: str) -> DetectionMetrics:
    return DetectionMetrics(math.nan, math.nan, math.nan, math.nan, n, n_pos, reason)


def _metrics_of(s: np.ndarray, y: np.ndarray) -> DetectionMetrics:
    n = int(s.size)
    n_pos = int(np.count_nonzero(y))
    n_neg = n - n_pos
    if n == 0:
        return _empty(0, 0, "no voxels")
    if n_pos == 0:
        return _empty(n, 0, "no positive voxels")
    thresholds, tps, fps = _curve(s, y)
    best_threshold, best_f1 = _best_f1(thresholds, tps, fps, n_pos)
    if n_neg == 0:
        return DetectionMetrics(math.nan, math.nan, best_f1, best_threshold, n, n_pos, "no negative voxels")
    # ROC trapezoid from (0, 0): ties between classes count one half, as roc_auc_score.
    tpr = np.concatenate(([0.0], tps / n_pos))
    fpr = np.concatenate(([0.0], fps / n_neg))
    auroc = float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1])) * 0.5)
    del fpr
    # Average precision: sum over thresholds of recall increment times precision (no interpolation).
    precision = tps / (tps + fps)
    auprc = float(np.sum(np.diff(tpr) * precision))
    return DetectionMetrics(auroc, auprc, best_f1, best_threshold, n, n_pos, None)


def _cast_threshold(threshold: float, dtype: np.dtype) -> np.floating:
    """Smallest value of ``dtype`` that is >= ``threshold``.

    For scores of that dtype, ``s >= result`` equals the exact ``s >= threshold``; comparing
    float32 scores to a plain float would round the threshold to float32 (NumPy 2 promotion)
    and could flip voxels that sit between the two.
    """
    cast = dtype.type(threshold)
    if float(cast) < threshold:
        cast = np.nextafter(cast, dtype.type(np.inf))
    return cast


def _threshold_of(s: np.ndarray, y: np.ndarray, threshold: float) -> ThresholdMetrics:
    return label_metrics(s >= _cast_threshold(threshold, s.dtype), y, threshold)


def label_metrics(predicted: np.ndarray, y: np.ndarray, threshold: float) -> ThresholdMetrics:
    """Dice (F1), precision and recall of the bool anomaly label ``predicted`` against the bool ``y`` (the same
    voxels), reported at the ``threshold`` the label was made at."""
    tp = int(np.count_nonzero(predicted & y))
    n_pred = int(np.count_nonzero(predicted))
    n_pos = int(np.count_nonzero(y))
    fp, fn = n_pred - tp, n_pos - tp
    return ThresholdMetrics(
        threshold=float(threshold),
        dice=_ratio(2 * tp, 2 * tp + fp + fn),
        precision=_ratio(tp, n_pred),
        recall=_ratio(tp, n_pos),
    )


def _ratio(num: int, den: int) -> float:
    return num / den if den else math.nan


# --------------------------------------------------------------------------------------------------
# public API


def detection_metrics(
    scores: np.ndarray, labels: np.ndarray, brain: np.ndarray | None = None
) -> DetectionMetrics:
    """AUROC, AUPRC and best F1 (with its threshold) of ``scores`` against non-zero ``labels``,
    over the voxels of ``brain`` (all voxels when None). Higher score = more anomalous.

    Without positives or without negatives the AUROC/AUPRC are NaN and ``degenerate`` says why.
    """
    return _metrics_of(*_select(scores, labels, brain))


def threshold_metrics(
    scores: np.ndarray, labels: np.ndarray, threshold: float, brain: np.ndarray | None = None
) -> ThresholdMetrics:
    """Dice (F1), precision and recall of the prediction ``score >= threshold`` inside ``brain``."""
    if not math.isfinite(float(threshold)):
        raise ValueError(f"threshold must be finite, got {threshold!r}")
    return _threshold_of(*_select(scores, labels, brain), float(threshold))


def best_f1_threshold(
    scores: np.ndarray, labels: np.ndarray, brain: np.ndarray | None = None
) -> tuple[float, float]:
    """``(threshold, f1)`` maximising F1 of ``score >= threshold``; (NaN, NaN) without positives.

    On ties the highest threshold wins (fewest predicted voxels).
    """
    s, y = _select(scores, labels, brain)
    n_pos = int(np.count_nonzero(y))
    if n_pos == 0:
        return math.nan, math.nan
    return _best_f1(*_curve(s, y), n_pos)


def balanced_best_threshold(parts: Sequence[tuple[np.ndarray, np.ndarray]]) -> float:
    """The threshold of highest mean Dice over ``parts`` (``(scores, labels)`` of each group, e.g.
    each training domain), so that a large group does not dictate it; with one group it is that
    group's best-F1 threshold. Every distinct score is a candidate; on ties the highest wins.
    Groups without positives are left out; NaN when none has any."""
    parts = [(np.asarray(s), np.asarray(y, dtype=bool)) for s, y in parts]
    parts = [(s, y) for s, y in parts if y.any()]
    if not parts:
        return math.nan
    candidates = np.unique(np.concatenate([s for s, _ in parts]))
    mean_dice = np.sum([dice_curve(s, y, candidates) for s, y in parts], axis=0)
    best = candidates.size - 1 - int(np.argmax(mean_dice[::-1]))
    return float(candidates[best])


def sorted_counts(positives: np.ndarray, negatives: np.ndarray,
                  thresholds: np.ndarray | float) -> tuple[np.ndarray, np.ndarray]:
    """True and false positives of ``score >= t`` for every ``t`` of ``thresholds``, from the lesion
    (``positives``) and non-lesion (``negatives``) scores, each sorted ascending: a search per
    threshold, so one sort serves any number of thresholds."""
    tp = positives.size - np.searchsorted(positives, thresholds, side="left")
    fp = negatives.size - np.searchsorted(negatives, thresholds, side="left")
    return tp, fp


def dice_curve(scores: np.ndarray, labels: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """Dice of ``scores >= t`` against bool ``labels`` for every ``t`` of ``thresholds`` at once
    (:func:`sorted_counts`); 0 where there is nothing to score."""
    positives, negatives = np.sort(scores[labels]), np.sort(scores[~labels])
    tp, fp = sorted_counts(positives, negatives, thresholds)
    return 2.0 * tp / np.maximum(tp + fp + positives.size, 1)


def held_out_group_dice(parts: Sequence[tuple[np.ndarray, np.ndarray]]) -> float:
    """How well a threshold transfers between ``parts`` (``(scores, labels)`` of each group, e.g. each
    domain): the mean over the groups of each one's Dice at the :func:`balanced_best_threshold` of the
    others. Groups without positives are left out; NaN with fewer than two left."""
    parts = [(np.asarray(s), np.asarray(y, dtype=bool)) for s, y in parts]
    parts = [(s, y) for s, y in parts if y.any()]
    if len(parts) < 2:
        return math.nan
    dices = []
    for held, (s, y) in enumerate(parts):
        threshold = balanced_best_threshold([part for other, part in enumerate(parts) if other != held])
        dices.append(_threshold_of(s, y, threshold).dice)
    return float(np.mean(dices))


def loaded_parts(groups: Sequence[Sequence[tuple[np.ndarray, np.ndarray, float]]],
                 weight: float) -> list[tuple[np.ndarray, np.ndarray]]:
    """``(scores, labels)`` of each group of cases ``(scores, labels, log_load)`` with the load term of
    ``weight`` added to each case's scores (the float32 constant ``postprocess_scores`` adds)."""
    return [(np.concatenate([s + np.float32(weight * log_load) for s, _, log_load in cases]),
             np.concatenate([y for _, y, _ in cases])) for cases in groups if cases]


def choose_load_weight(groups: Sequence[Sequence[tuple[np.ndarray, np.ndarray, float]]],
                       weights: Sequence[float]) -> tuple[float, dict[float, float]]:
    """The ``PostprocessConfig.load_weight`` among ``weights`` whose threshold transfers best between
    the ``groups`` (:func:`held_out_group_dice`), and that figure for each weight. A group is a list of
    cases ``(scores, labels, log_load)``: the scores and labels of the voxels a threshold is chosen on
    and the case's :func:`~ADMAnomalyLib.postprocess.load_offset` at weight 1 (from its whole brain).
    Ties go to the smaller weight; with fewer than two groups nothing can be measured and 0 is kept."""
    figures = {float(weight): held_out_group_dice(loaded_parts(groups, weight)) for weight in sorted(weights)}
    measured = {w: f for w, f in figures.items() if math.isfinite(f)}
    if not measured:
        return 0.0, figures
    return max(measured, key=lambda w: (measured[w], -w)), figures


def json_safe(value: Any) -> Any:
    """Return ``value`` with dataclasses turned into dicts, numpy scalars into Python numbers and
    non-finite floats into None, so that ``json.dumps(..., allow_nan=False)`` accepts it."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return json_safe(dataclasses.asdict(value))
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, np.ndarray):
        return json_safe(value.tolist())
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        value = float(value)
        return value if math.isfinite(value) else None
    return value


_SUMMARY_KEYS = ("auroc", "auprc", "best_f1", "dice", "precision", "recall")


def _mean_sd(values: list[float]) -> dict[str, Any]:
    defined = np.array([v for v in values if math.isfinite(v)], dtype=np.float64)
    mean = float(defined.mean()) if defined.size else math.nan
    # Sample standard deviation (ddof=1), as "mean ± sd over cases" is usually reported.
    sd = float(defined.std(ddof=1)) if defined.size > 1 else math.nan
    return {"mean": mean, "sd": sd, "n": int(defined.size)}


def pooled_and_per_case(
    results: Iterable[tuple],
    threshold: float | None = None,
) -> dict[str, Any]:
    """Metrics pooled over all brain voxels of all cases, per case, and mean ± sd over cases.

    ``results`` yields ``(case_id, scores, labels, brain)`` or ``(case_id, scores, labels, brain, predicted)``;
    it may be a generator, since only the brain voxels of each case are kept (scores as float32, labels as
    bool), which bounds memory to about 5 bytes per brain voxel plus the sort of the pooled scores.
    ``predicted`` (bool, the shape of ``scores``; None: ``scores >= threshold``) is the anomaly label the
    threshold metrics read, e.g. :func:`~ADMAnomalyLib.postprocess.anomaly_label` with its small regions left
    out; it needs a given ``threshold``. AUROC, AUPRC and best Dice always read ``scores``.

    ``threshold`` is the operating point for Dice/precision/recall, normally the best-F1 threshold
    of the validation data. When None, the pooled best-F1 threshold of *these* data is used and
    ``threshold_source`` is ``"pooled_best_f1"`` (optimistic: an oracle threshold).

    The returned dictionary is strict JSON (NaN become None)::

        {"threshold": float | None, "threshold_source": "given" | "pooled_best_f1", "n_cases": int,
         "pooled": {auroc, auprc, best_f1, best_threshold, n_voxels, n_positive, degenerate},
         "at_threshold": {threshold, dice, precision, recall},          # pooled voxels
         "per_case": [{case_id, auroc, ..., degenerate, dice, precision, recall}, ...],
         "mean_sd": {auroc|auprc|best_f1|dice|precision|recall: {"mean", "sd", "n"}}}

    ``mean_sd`` averages over the cases where the value is defined (``n`` of them); ``sd`` uses
    ddof=1.
    """
    case_ids: list[str] = []
    kept_scores: list[np.ndarray] = []
    kept_labels: list[np.ndarray] = []
    kept_predicted: list[np.ndarray | None] = []
    per_case_detection: list[DetectionMetrics] = []
    for case_id, scores, labels, brain, *rest in results:
        s, y = _select(scores, labels, brain)
        s = s.astype(np.float32, copy=False)
        predicted = rest[0] if rest else None
        if predicted is not None:
            if threshold is None:
                raise ValueError("an anomaly label (predicted) needs the threshold it was made at")
            predicted = np.asarray(predicted, dtype=bool)
            if predicted.shape != np.shape(scores):
                raise ValueError(f"anomaly label shape {predicted.shape} differs from scores shape {np.shape(scores)}")
            predicted = predicted[np.asarray(brain, dtype=bool)] if brain is not None else predicted.ravel()
        case_ids.append(str(case_id))
        kept_scores.append(s)
        kept_labels.append(y)
        kept_predicted.append(predicted)
        per_case_detection.append(_metrics_of(s, y))

    pooled_s = np.concatenate(kept_scores) if kept_scores else np.zeros(0, np.float32)
    pooled_y = np.concatenate(kept_labels) if kept_labels else np.zeros(0, bool)
    pooled = _metrics_of(pooled_s, pooled_y)

    if threshold is None:
        source = "pooled_best_f1"
        threshold = pooled.best_threshold
    else:
        source = "given"
        if not math.isfinite(float(threshold)):
            raise ValueError(f"threshold must be finite, got {threshold!r}")
    threshold = float(threshold)

    def at(s: np.ndarray, y: np.ndarray, predicted: np.ndarray | None) -> ThresholdMetrics:
        if predicted is not None:
            return label_metrics(predicted, y, threshold)
        if math.isfinite(threshold):
            return _threshold_of(s, y, threshold)
        # No threshold exists (None given and no positive voxel anywhere).
        return ThresholdMetrics(threshold, math.nan, math.nan, math.nan)

    per_case = []
    for case_id, det, s, y, predicted in zip(case_ids, per_case_detection, kept_scores, kept_labels, kept_predicted):
        m = at(s, y, predicted)
        per_case.append(
            {"case_id": case_id, **dataclasses.asdict(det), "dice": m.dice, "precision": m.precision, "recall": m.recall}
        )
    labelled = [p for p in kept_predicted if p is not None]
    if labelled and len(labelled) != len(kept_predicted):
        raise ValueError("give an anomaly label (predicted) for every case or for none")
    pooled_at = at(pooled_s, pooled_y, np.concatenate(labelled) if labelled else None)

    mean_sd = {key: _mean_sd([row[key] for row in per_case]) for key in _SUMMARY_KEYS}
    return json_safe(
        {
            "threshold": threshold,
            "threshold_source": source,
            "n_cases": len(per_case),
            "pooled": dataclasses.asdict(pooled),
            "at_threshold": dataclasses.asdict(pooled_at),
            "per_case": per_case,
            "mean_sd": mean_sd,
        }
    )
