"""Pixel-wise detection metrics against scikit-learn and brute force."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from sklearn.metrics import (
    average_precision_score,
    f1_score,
    precision_recall_curve,
    precision_score,
    recall_score,
    roc_auc_score,
)

from ADMAnomalyLib.metrics import (
    DetectionMetrics,
    balanced_best_threshold,
    best_f1_threshold,
    choose_load_weight,
    held_out_group_dice,
    detection_metrics,
    dice_curve,
    sorted_counts,
    json_safe,
    pooled_and_per_case,
    threshold_metrics,
)


def _case(seed: int, shape=(6, 9, 11), quantise: float | None = 0.25):
    """Scores with many ties (quantised), sparse labels (BraTS-like values), a brain mask."""
    rng = np.random.default_rng(seed)
    labels = np.where(rng.random(shape) < 0.2, rng.choice([1, 2, 4], size=shape), 0)
    scores = rng.normal(size=shape) + 1.2 * (labels > 0)
    if quantise:
        scores = np.round(scores / quantise) * quantise
    brain = rng.random(shape) < 0.7
    return scores, labels, brain


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("quantise", [None, 0.25])
def test_matches_sklearn_inside_brain(seed, quantise):
    scores, labels, brain = _case(seed, quantise=quantise)
    m = detection_metrics(scores, labels, brain)
    s, y = scores[brain], labels[brain] > 0
    assert m.auroc == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    assert m.auprc == pytest.approx(average_precision_score(y, s), abs=1e-12)
    p, r, t = precision_recall_curve(y, s)
    f1 = np.where(p + r > 0, 2 * p * r / np.maximum(p + r, 1e-300), 0.0)[:-1]
    assert m.best_f1 == pytest.approx(f1.max(), abs=1e-12)
    # On ties the highest threshold wins (sklearn's thresholds are ascending).
    assert m.best_threshold == t[f1 >= f1.max() - 1e-12].max()
    assert (m.n_voxels, m.n_positive, m.degenerate) == (int(brain.sum()), int(y.sum()), None)
    assert m.n_negative == m.n_voxels - m.n_positive


def test_background_scores_do_not_matter():
    scores, labels, brain = _case(7)
    before = detection_metrics(scores, labels, brain)
    changed = scores.copy()
    changed[~brain] = np.random.default_rng(1).normal(size=(~brain).sum()) * 100.0
    labels2 = labels.copy()
    labels2[~brain] = 1  # background labels are ignored too
    assert detection_metrics(changed, labels2, brain) == before
    t = before.best_threshold
    assert threshold_metrics(changed, labels2, t, brain) == threshold_metrics(scores, labels, t, brain)
    assert best_f1_threshold(changed, labels2, brain) == (before.best_threshold, before.best_f1)


def test_no_mask_means_all_voxels():
    scores, labels, _ = _case(3)
    assert detection_metrics(scores, labels).auroc == pytest.approx(roc_auc_score(labels.ravel() > 0, scores.ravel()))


def test_best_f1_equals_brute_force():
    scores, labels, brain = _case(11, shape=(40, 30), quantise=0.1)
    s, y = scores[brain], labels[brain] > 0
    best = (-1.0, None)
    for t in np.unique(s)[::-1]:  # highest first so that ties keep the highest threshold
        pred = s >= t
        f1 = 2 * np.sum(pred & y) / (pred.sum() + y.sum())
        if f1 > best[0] + 1e-15:
            best = (f1, t)
    threshold, f1 = best_f1_threshold(scores, labels, brain)
    assert f1 == pytest.approx(best[0], abs=1e-12)
    assert threshold == best[1]
    # The >= convention: metrics at the best threshold reproduce the best F1 exactly.
    at = threshold_metrics(scores, labels, threshold, brain)
    assert at.dice == pytest.approx(f1, abs=1e-12)
    pred = s >= threshold
    assert at.precision == pytest.approx(precision_score(y, pred))
    assert at.recall == pytest.approx(recall_score(y, pred))
    assert at.dice == pytest.approx(f1_score(y, pred))


def test_threshold_is_inclusive():
    scores = np.array([0.1, 0.5, 0.5, 0.9])
    labels = np.array([0, 1, 0, 1])
    at = threshold_metrics(scores, labels, 0.5)
    assert (at.precision, at.recall) == (pytest.approx(2 / 3), 1.0)
    assert threshold_metrics(scores, labels, np.nextafter(0.5, 1)).recall == 0.5


def test_float32_scores_compared_exactly_with_float64_threshold():
    scores = np.array([1.0, 2.0], dtype=np.float32)
    labels = np.array([1, 1])
    assert threshold_metrics(scores, labels, 1.0 + 1e-12).recall == 0.5
    assert threshold_metrics(scores, labels, 1.0).recall == 1.0


def test_perfect_reversed_and_random_separation():
    labels = np.r_[np.zeros(50), np.ones(10)]
    scores = np.r_[np.linspace(0, 1, 50), np.linspace(2, 3, 10)]
    m = detection_metrics(scores, labels)
    assert (m.auroc, m.auprc, m.best_f1, m.best_threshold) == (1.0, 1.0, 1.0, 2.0)
    assert detection_metrics(-scores, labels).auroc == 0.0
    constant = detection_metrics(np.zeros(60), labels)
    assert constant.auroc == 0.5 and constant.auprc == pytest.approx(10 / 60)
    rng = np.random.default_rng(0)
    random = detection_metrics(rng.random(200_000), rng.random(200_000) < 0.1)
    assert random.auroc == pytest.approx(0.5, abs=0.01)
    assert random.auprc == pytest.approx(0.1, abs=0.01)


def test_degenerate_labels():
    scores = np.arange(10.0)
    none = detection_metrics(scores, np.zeros(10))
    assert none.degenerate == "no positive voxels" and none.n_positive == 0
    assert all(math.isnan(v) for v in (none.auroc, none.auprc, none.best_f1, none.best_threshold))
    assert all(math.isnan(v) for v in best_f1_threshold(scores, np.zeros(10)))
    allpos = detection_metrics(scores, np.ones(10))
    assert allpos.degenerate == "no negative voxels"
    assert math.isnan(allpos.auroc) and math.isnan(allpos.auprc)
    assert (allpos.best_f1, allpos.best_threshold) == (1.0, 0.0)
    empty = detection_metrics(scores, np.ones(10), brain=np.zeros(10, bool))
    assert empty.degenerate == "no voxels" and empty.n_voxels == 0
    at = threshold_metrics(scores, np.zeros(10), 100.0)
    assert math.isnan(at.dice) and math.isnan(at.precision) and math.isnan(at.recall)


def test_bad_inputs():
    with pytest.raises(ValueError, match="shape"):
        detection_metrics(np.zeros(3), np.zeros(4))
    with pytest.raises(ValueError, match="brain"):
        detection_metrics(np.zeros(3), np.zeros(3), np.ones(4, bool))
    with pytest.raises(ValueError, match="NaN"):
        detection_metrics(np.array([0.0, np.nan]), np.array([0, 1]))
    # NaN outside the brain is irrelevant.
    assert detection_metrics(np.array([0.0, 1.0, np.nan]), np.array([0, 1, 1]), np.array([1, 1, 0], bool)).auroc == 1.0
    with pytest.raises(ValueError, match="finite"):
        threshold_metrics(np.zeros(3), np.zeros(3), math.inf)


def test_pooled_and_per_case():
    cases = [(f"c{i}", *_case(20 + i)) for i in range(3)]
    cases.append(("healthy", np.random.default_rng(5).normal(size=(6, 9, 11)), np.zeros((6, 9, 11)), None))
    report = pooled_and_per_case(iter(cases), threshold=None)
    json.dumps(report, allow_nan=False)  # strict JSON
    assert report["threshold_source"] == "pooled_best_f1" and report["n_cases"] == 4

    def keep(s, y, b):
        b = np.ones(s.shape, bool) if b is None else b
        return s[b].astype(np.float32), y[b] > 0

    s = np.concatenate([keep(*c[1:])[0] for c in cases])
    y = np.concatenate([keep(*c[1:])[1] for c in cases])
    assert report["pooled"]["auroc"] == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    assert report["pooled"]["n_voxels"] == s.size
    t, f1 = best_f1_threshold(s, y)
    assert report["threshold"] == t and report["at_threshold"]["dice"] == pytest.approx(f1)

    rows = {row["case_id"]: row for row in report["per_case"]}
    for case_id, scores, labels, brain in cases[:3]:
        cs, cy = keep(scores, labels, brain)
        assert rows[case_id]["auroc"] == pytest.approx(roc_auc_score(cy, cs), abs=1e-12)
        assert rows[case_id]["dice"] == pytest.approx(threshold_metrics(cs, cy, t).dice)
    healthy = rows["healthy"]
    assert healthy["auroc"] is None and healthy["degenerate"] == "no positive voxels"
    assert healthy["recall"] is None and healthy["dice"] == 0.0  # false positives, no lesion

    aurocs = [rows[c[0]]["auroc"] for c in cases[:3]]
    assert report["mean_sd"]["auroc"] == {
        "mean": pytest.approx(np.mean(aurocs)), "sd": pytest.approx(np.std(aurocs, ddof=1)), "n": 3}
    assert report["mean_sd"]["dice"]["n"] == 4


def test_pooled_with_given_threshold_and_no_positives():
    cases = [("a", np.arange(5.0), np.zeros(5), None)]
    report = pooled_and_per_case(cases, threshold=2.0)
    assert report["threshold_source"] == "given" and report["at_threshold"]["precision"] == 0.0
    report = pooled_and_per_case(cases, threshold=None)
    assert report["threshold"] is None and report["at_threshold"]["dice"] is None
    json.dumps(report, allow_nan=False)
    assert pooled_and_per_case([], None)["pooled"]["degenerate"] == "no voxels"


def test_threshold_metrics_read_the_anomaly_label_where_one_is_given():
    """The product's label leaves small regions out (postprocess.anomaly_label): Dice at threshold reads that
    label, while AUROC / AUPRC / best Dice read the scores, as the map predict writes."""
    scores = np.array([0.1, 0.9, 0.8, 0.95, 0.2, 0.7], np.float32)
    labels = np.array([0, 1, 1, 0, 0, 1], bool)
    brain = np.array([1, 1, 1, 1, 1, 0], bool)
    label = np.array([0, 1, 1, 0, 0, 1], bool)  # the 0.95 speck left out; the voxel outside the brain is not read
    plain = pooled_and_per_case([("a", scores, labels, brain)], 0.5)
    cleaned = pooled_and_per_case([("a", scores, labels, brain, label)], 0.5)
    assert cleaned["pooled"] == plain["pooled"]
    assert plain["at_threshold"]["precision"] == pytest.approx(2 / 3)
    assert cleaned["at_threshold"] == {"threshold": 0.5, "dice": 1.0, "precision": 1.0, "recall": 1.0}
    assert cleaned["per_case"][0]["dice"] == 1.0
    assert pooled_and_per_case([("a", scores, labels, brain, None)], 0.5) == plain
    with pytest.raises(ValueError, match="threshold"):
        pooled_and_per_case([("a", scores, labels, brain, label)], None)
    with pytest.raises(ValueError, match="every case"):
        pooled_and_per_case([("a", scores, labels, brain, label), ("b", scores, labels, brain)], 0.5)
    with pytest.raises(ValueError, match="shape"):
        pooled_and_per_case([("a", scores, labels, brain, label[:3])], 0.5)


def test_json_safe():
    out = json_safe({"a": np.float32(1.5), "b": float("nan"), "c": (np.int64(2), np.bool_(True)), "d": np.arange(2)})
    assert out == {"a": 1.5, "b": None, "c": [2, True], "d": [0, 1]}
    assert json_safe(DetectionMetrics(0.5, math.nan, 0.1, 1.0, 3, 1))["auprc"] is None


def test_millions_of_voxels():
    # Speed is the benchmarks' business; here: a whole-brain-sized input gives the analytic AUROC.
    rng = np.random.default_rng(0)
    n = 2_000_000
    labels = rng.random(n) < 0.05
    scores = (rng.normal(size=n) + 1.5 * labels).astype(np.float32)
    m = detection_metrics(scores, labels)
    # Two unit-variance Gaussians 1.5 apart: AUROC = Phi(1.5 / sqrt(2)) = 0.8556.
    assert m.auroc == pytest.approx(0.5 * (1 + math.erf(1.5 / 2)), abs=3e-3)


def test_balanced_threshold_is_best_f1_for_one_group_and_averages_dice_over_groups():
    rng = np.random.default_rng(7)
    labels = rng.random(2000) < 0.1
    scores = rng.normal(0, 1, 2000) + 2.0 * labels
    threshold, _ = best_f1_threshold(scores, labels)
    assert balanced_best_threshold([(scores, labels)]) == pytest.approx(threshold)
    # A large group that wants a low threshold and a small one that wants a high one: the mean rule
    # lands between, where pooling the voxels follows the large group.
    big_y = np.r_[np.ones(500, bool), np.zeros(500, bool)]
    big_s = np.r_[np.linspace(1, 2, 500), np.linspace(0, 1.2, 500)]
    small_y = np.r_[np.ones(20, bool), np.zeros(80, bool)]
    small_s = np.r_[np.linspace(3, 4, 20), np.linspace(0, 3.0, 80)]
    pooled, _ = best_f1_threshold(np.r_[big_s, small_s], np.r_[big_y, small_y])
    balanced = balanced_best_threshold([(big_s, big_y), (small_s, small_y)])
    assert balanced > pooled
    assert np.isnan(balanced_best_threshold([(small_s, np.zeros(100, bool))]))


def test_dice_curve_equals_dice_at_each_threshold():
    rng = np.random.default_rng(3)
    labels = rng.random(3000) < 0.05
    scores = (rng.normal(0, 1, 3000) + 2.5 * labels).astype(np.float32)
    thresholds = np.r_[np.sort(scores[::97]), scores.max() + 1]
    expected = [threshold_metrics(scores, labels, float(t)).dice for t in thresholds]
    np.testing.assert_allclose(dice_curve(scores, labels, thresholds), expected, rtol=1e-12)
    assert dice_curve(scores, labels, thresholds)[-1] == 0.0
    assert dice_curve(scores, np.zeros(3000, bool), thresholds[:1])[0] == 0.0
    # The counts behind the curve, at one threshold as at many.
    t = float(thresholds[5])
    tp, fp = sorted_counts(np.sort(scores[labels]), np.sort(scores[~labels]), t)
    assert (int(tp), int(fp)) == (int((labels & (scores >= t)).sum()), int((~labels & (scores >= t)).sum()))


def test_held_out_group_dice_measures_how_a_threshold_transfers():
    # Two groups separable at 1.0 and one separable only at 3.0: a threshold chosen on the others
    # fits each of the first two and misses the third.
    def group(cut):
        return np.r_[np.linspace(cut, cut + 1, 50), np.linspace(cut - 2, cut - 0.01, 200)], np.r_[np.ones(50, bool), np.zeros(200, bool)]

    alike = held_out_group_dice([group(1.0), group(1.0)])
    assert alike == pytest.approx(1.0)
    mixed = held_out_group_dice([group(1.0), group(1.0), group(3.0)])
    assert mixed < 0.9
    assert math.isnan(held_out_group_dice([group(1.0)]))


def test_load_weight_choice_finds_the_weight_under_which_one_threshold_fits_every_case():
    """Cases whose lesion starts lower the larger their apparent load (as in per-case SD units): with
    the right weight one threshold separates all of them, and the choice finds that weight."""
    from ADMAnomalyLib.postprocess import load_offset

    rng = np.random.default_rng(3)
    groups = []
    for domain_shares in ((0.002, 0.01), (0.05, 0.2), (0.004, 0.1)):
        cases = []
        for share in domain_shares:
            values = rng.normal(0.0, 0.1, 20000).astype(np.float32)
            lesion = np.zeros(values.size, bool)
            lesion[: int(share * values.size)] = True
            log_load = float(np.log(share / 0.01))
            values[lesion] = 2.0 - 0.5 * log_load + rng.random(lesion.sum()).astype(np.float32)
            cases.append((values, lesion, load_offset(values, 1.0, 0.45)))
        groups.append(cases)
    weight, figures = choose_load_weight(groups, (0.0, 0.25, 0.5, 0.75))
    assert weight == 0.5 and figures[0.5] > 0.99 and figures[0.0] < 0.97
    assert figures[0.5] == max(figures.values())
    # one group: nothing to transfer to, the term stays off
    assert choose_load_weight(groups[:1], (0.0, 0.5))[0] == 0.0
