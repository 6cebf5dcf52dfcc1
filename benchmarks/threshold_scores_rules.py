"""Per-case threshold rules and score sums, offline, on ``threshold_rules.py --save-scores`` output.

Reads ``RUN/threshold_scores/`` (each fold's per-case scores of the study's rows, before ``+cc``) and, per
left-out domain, prints the test domain's pooled Dice (before ``+cc``) under rules chosen on the training
domains' lesion slices, each beside the test domain's own best Dice (out of reach without its labels):

- ``global``: the study's rule, one threshold (``metrics.balanced_best_threshold``);
- ``peak``: each case's threshold ``max(t, alpha x its brain's 99.9th percentile)``, ``t`` and ``alpha``
  chosen jointly (highest mean Dice over the training domains; ties to the smaller ``alpha``), so that a
  case whose lesion scores far above the rest is cut relative to its own peak;
- ``--sum A;B``: row A's score plus ``beta`` x row B's for each ``beta`` of ``--betas``, one global threshold
  (with ``--sum-zscore``, B's score first z-scored over each case's brain, so that a normal-tissue-scale
  row B joins A on A's whole-brain scale); also its pooled AUPRC;
- ``--rescale ROW``: a normal-tissue-scale row (``standardise = normal``, load weight 0: its FLAIR-normal
  voxels have mean 0 and SD 1) divided per case by its whole brain's SD to the power ``gamma`` of
  ``--gammas`` (1: the centre of the normal tissue, the spread of the whole brain, which a large lesion
  widens as it does a FLAIR z-score's), one global threshold; also its pooled AUPRC;
- ``--peak-margin``: a segmentation that keeps a connected region (faces) of ``score >= t`` only where
  its peak reaches ``t + margin`` (hysteresis thresholding: a core at ``t + margin``, grown to ``t``),
  ``t`` and the margin chosen jointly on the training domains' lesion slices (highest mean Dice over the
  domains; ties to the smaller margin); ``t`` is searched within ±0.6 of the study's threshold. Needs the
  cases' brain masks, read again from ``--domains``;
- ``--expected-dice``: each case's threshold the one that maximises its *expected* Dice (Nowozin 2014,
  the IoU case; Dice here): the score is mapped to a lesion probability p fitted on the training
  domains (each domain weighted equally; logistic or isotonic; on their lesion slices or their whole
  brains), and the case keeps its k most probable voxels for the k of highest 2 S_k / (k + S), S_k the
  sum of the k largest p and S the sum over its brain. A case whose lesion is small or faint has a low
  expected Dice, and the rule then keeps voxels down to a lower p (p > about half the expected Dice),
  which is what the transferred threshold lacks on MS.
- ``--tail-mixture``: each case's own threshold from its score histogram alone, no labels: a 1-D Gaussian
  mixture of 2 (or 3) components fitted to the case's brain scores, the cut where the highest-mean
  component's posterior first reaches one half above the bulk's mean; then each case is cut at
  ``(1 - gamma) t + gamma t_case``, ``t`` and ``gamma`` (:data:`TAIL_GAMMAS`) chosen jointly on the training
  domains' lesion slices (ties to the smaller ``gamma``; gamma 0 is the study's rule). A case whose
  lesion forms its own mode is cut at that mode's edge wherever the other domains put the cut.

    .venv/bin/python benchmarks/threshold_rules.py runs/domains_cmc_s --image-size 64 --save-scores \\
        --rows "FLAIR z +med5+cc;ADM+ F +post+cc (z+load);ADM+ F cm* +post+cc (normal+load)"
    .venv/bin/python benchmarks/threshold_scores_rules.py runs/domains_cmc_s \\
        --rows "FLAIR z +med5+cc;ADM+ F +post+cc (z+load);ADM+ F cm* +post+cc (normal+load)" \\
        --sum "ADM+ F +post+cc (z+load);ADM+ F cm* +post+cc (normal+load)"
    .venv/bin/python benchmarks/threshold_scores_rules.py runs/domains_cmc_s --peak-margin \
        --rows "FLAIR z +med5+cc;ADM+ F +post+cc (z+load)"
    .venv/bin/python benchmarks/threshold_scores_rules.py runs/domains_cmc_s --expected-dice \
        --rows "FLAIR z +med5+cc;ADM+ F +post+cc (z+load)"
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import SimpleITK as sitk

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ADMAnomalyLib.metrics import balanced_best_threshold, detection_metrics, sorted_counts  # noqa: E402
from ADMAnomalyLib.postprocess import bounding_box  # noqa: E402
from ADMAnomalyLib.study import runner  # noqa: E402
from ADMAnomalyLib.study.methods import quick_settings  # noqa: E402

ALPHAS = tuple(round(a, 2) for a in np.arange(0.0, 1.001, 0.05))
PEAK_QUANTILE = 0.999
MARGINS = tuple(round(m, 1) for m in np.arange(0.0, 2.001, 0.1))
MARGIN_THRESHOLD_STEPS = tuple(round(s, 2) for s in np.arange(-0.6, 0.601, 0.05))


class SortedCase:
    """One case's lesion and non-lesion scores, sorted, so that Dice counts at any threshold are searches."""

    def __init__(self, scores: np.ndarray, labels: np.ndarray):
        self.positives, self.negatives = np.sort(scores[labels]), np.sort(scores[~labels])

    def counts(self, threshold: float) -> tuple[int, int, int]:
        true_positives, false_positives = sorted_counts(self.positives, self.negatives, threshold)
        return int(true_positives), int(false_positives), self.positives.size


def pooled_dice(cases: list[SortedCase], thresholds: list[float]) -> float:
    tp, fp, positives = np.sum([case.counts(t) for case, t in zip(cases, thresholds)], axis=0)
    return 2.0 * tp / max(tp + fp + positives, 1)


def fold_cases(domain: dict[str, str], test_domain: str) -> tuple[list[list[str]], list[str]]:
    """A fold's training cases grouped by domain (sorted by name) and its test cases."""
    train_domains = sorted(set(domain.values()) - {test_domain})
    return [[i for i in domain if domain[i] == d] for d in train_domains], [i for i in domain if domain[i] == test_domain]


def study_threshold(scores, labels, validation, groups: list[list[str]]) -> float:
    """The study's rule: one threshold, the highest mean Dice over the training domains (``groups`` of
    case ids) on their lesion slices."""
    return balanced_best_threshold(
        [(np.concatenate([scores[i][validation[i]] for i in g]), np.concatenate([labels[i][validation[i]] for i in g]))
         for g in groups])


def fold_figures(scores: dict[str, np.ndarray], labels, validation, domain, test_domain: str,
                 with_peak: bool = True) -> dict[str, str]:
    groups, test_ids = fold_cases(domain, test_domain)
    lesion_slices = {i: SortedCase(scores[i][validation[i]], labels[i][validation[i]]) for g in groups for i in g}
    whole_brains = [SortedCase(scores[i], labels[i]) for i in test_ids]
    test_scores = np.concatenate([scores[i] for i in test_ids])
    test_labels = np.concatenate([labels[i] for i in test_ids])
    best = pooled_dice(whole_brains, [balanced_best_threshold([(test_scores, test_labels)])] * len(test_ids))
    global_threshold = study_threshold(scores, labels, validation, groups)
    figures = {"global": f"{pooled_dice(whole_brains, [global_threshold] * len(test_ids)):.3f} (t {global_threshold:.2f})",
               "test best": f"{best:.3f}"}
    if not with_peak:
        return figures
    peak = {i: float(np.quantile(s, PEAK_QUANTILE)) for i, s in scores.items()}
    pooled = np.concatenate([scores[i][validation[i]] for g in groups for i in g])
    candidates = np.unique(np.quantile(pooled, np.linspace(0.5, 0.9999, 120)))

    def training_dice(threshold: float, alpha: float) -> float:
        return float(np.mean([pooled_dice([lesion_slices[i] for i in g], [max(threshold, alpha * peak[i]) for i in g])
                              for g in groups]))

    _, threshold, alpha = max(((training_dice(t, a), t, a) for a in ALPHAS for t in candidates),
                              key=lambda x: (x[0], -x[2]))
    figures["peak"] = (f"{pooled_dice(whole_brains, [max(threshold, alpha * peak[i]) for i in test_ids]):.3f} "
                       f"(t {threshold:.2f}, alpha {alpha:g})")
    return figures


def brain_boxes(domains: str) -> dict[str, np.ndarray]:
    """Each labelled case's brain mask cropped to its bounding box (the saved scores are its brain voxels
    in C order)."""
    # The study's native-grid brain mask does not depend on the networks' image size, so one setting
    # serves the runs of every size.
    settings = quick_settings(split="domains", image_size=64, seeds=(0,), device="cpu")
    boxes = {}
    for domain, files in runner.study_cases(None, domains, settings).items():
        for case_files in files:
            brain = runner.load_case_data(case_files, settings, domain=domain).brain
            boxes[case_files.case_id] = brain[bounding_box(brain)]
    return boxes


def peak_margin_counts(brain: np.ndarray, scores: np.ndarray, labels: np.ndarray, validation: np.ndarray,
                       thresholds: list[float]) -> np.ndarray:
    """(threshold, margin, [lesion-slice TP, FP, whole-brain TP, FP]) of the peak-margin segmentation:
    regions of ``score >= t`` kept where their peak reaches ``t + margin`` (:data:`MARGINS`)."""
    volume = np.full(brain.shape, -np.inf, dtype=np.float32)
    volume[brain] = scores
    lesion, lesion_slices = (np.zeros(brain.shape, dtype=bool) for _ in range(2))
    lesion[brain], lesion_slices[brain] = labels, validation
    counts = np.zeros((len(thresholds), len(MARGINS), 4), dtype=np.int64)
    for row, threshold in enumerate(thresholds):
        above = volume >= np.float32(threshold)
        regions = sitk.GetArrayFromImage(sitk.ConnectedComponent(sitk.GetImageFromArray(above.astype(np.uint8))))
        region, score, is_lesion, in_slices = regions[above], volume[above], lesion[above], lesion_slices[above]
        peak = np.full(int(region.max(initial=0)) + 1, -np.inf)
        np.maximum.at(peak, region, score)
        tallies = np.stack([np.bincount(region, weights=w, minlength=peak.size) for w in
                            (in_slices & is_lesion, in_slices & ~is_lesion, is_lesion, ~is_lesion)], axis=1)
        for column, margin in enumerate(MARGINS):
            counts[row, column] = tallies[peak >= threshold + margin].sum(axis=0)
    return counts


def peak_margin_figures(scores: dict[str, np.ndarray], labels, validation, domain, test_domain: str,
                        boxes: dict[str, np.ndarray]) -> str:
    groups, test_ids = fold_cases(domain, test_domain)
    plain_threshold = study_threshold(scores, labels, validation, groups)
    thresholds = [plain_threshold + step for step in MARGIN_THRESHOLD_STEPS]
    counts = {i: peak_margin_counts(boxes[i], s, labels[i], validation[i], thresholds) for i, s in scores.items()}

    def dice(ids: list[str], lesion_slices_only: bool) -> np.ndarray:
        k = 0 if lesion_slices_only else 2
        total = np.sum([counts[i] for i in ids], axis=0)
        positives = sum(int((labels[i] & validation[i]).sum() if lesion_slices_only else labels[i].sum()) for i in ids)
        return 2.0 * total[..., k] / np.maximum(total[..., k] + total[..., k + 1] + positives, 1)

    training = np.mean([dice(g, True) for g in groups], axis=0)
    test = dice(test_ids, False)
    plain = MARGIN_THRESHOLD_STEPS.index(0.0)
    # Margin-major search order, so that a tie goes to the smaller margin.
    column, row = np.unravel_index(int(np.argmax(training.T)), training.T.shape)
    by_margin = ", ".join(f"{m:g}: {test[int(np.argmax(training[:, k])), k]:.3f}" for k, m in enumerate(MARGINS))
    return (f"plain (t {plain_threshold:.2f}): {test[plain, 0]:.3f} | peak margin chosen (t {thresholds[row]:.2f}, "
            f"margin {MARGINS[column]:g}; training {training[plain, 0]:.3f} -> {training[row, column]:.3f}): "
            f"{test[row, column]:.3f} | test best: {test.max():.3f} | test Dice by margin (t chosen): {by_margin}")


TAIL_GAMMAS = (0.0, 0.25, 0.5, 0.75, 1.0)
TAIL_FIT_VOXELS = 200_000
"""Brain voxels drawn (seed 0) from a case to fit its tail mixture."""


def tail_mixture_threshold(scores: np.ndarray, n_components: int) -> float:
    """The case's cut between its bulk and its highest-mean mixture component: the lowest score above the
    bulk's (heaviest component's) mean whose posterior for the top component is at least one half. A
    mixture whose top component never wins (or is the bulk) gives +inf: the case has no lesion mode."""
    from sklearn.mixture import GaussianMixture

    rng = np.random.default_rng(0)
    sample = scores if scores.size <= TAIL_FIT_VOXELS else rng.choice(scores, TAIL_FIT_VOXELS, replace=False)
    mixture = GaussianMixture(n_components, random_state=0).fit(sample[:, None].astype(np.float64))
    means = mixture.means_.ravel()
    top, bulk = int(np.argmax(means)), int(np.argmax(mixture.weights_))
    if top == bulk:
        return float("inf")
    grid = np.linspace(means[bulk], max(float(sample.max()), means[top]), 2000)
    winning = mixture.predict_proba(grid[:, None])[:, top] >= 0.5
    return float(grid[int(np.argmax(winning))]) if winning.any() else float("inf")


def tail_mixture_figures(scores: dict[str, np.ndarray], labels, validation, domain, test_domain: str,
                         n_components: int) -> str:
    groups, test_ids = fold_cases(domain, test_domain)
    plain = study_threshold(scores, labels, validation, groups)
    own = {i: tail_mixture_threshold(s, n_components) for i, s in scores.items()}
    lesion_slices = {i: SortedCase(scores[i][validation[i]], labels[i][validation[i]]) for g in groups for i in g}
    whole_brains = [SortedCase(scores[i], labels[i]) for i in test_ids]
    pooled = np.concatenate([scores[i][validation[i]] for g in groups for i in g])
    candidates = np.unique(np.quantile(pooled, np.linspace(0.5, 0.9999, 120)))

    def cut(i: str, threshold: float, gamma: float) -> float:
        # a case without a lesion mode keeps the shared threshold
        return threshold if not np.isfinite(own[i]) else (1 - gamma) * threshold + gamma * own[i]

    def training_dice(threshold: float, gamma: float) -> float:
        return float(np.mean([pooled_dice([lesion_slices[i] for i in g], [cut(i, threshold, gamma) for i in g])
                              for g in groups]))

    # each gamma's best t once; the chosen pair is the best of those (ties to the smaller gamma)
    best_t = {g: max((training_dice(t, g), t) for t in candidates) for g in TAIL_GAMMAS}
    gamma = max(TAIL_GAMMAS, key=lambda g: (best_t[g][0], -g))
    best, threshold = best_t[gamma]
    by_gamma = ", ".join(f"{g:g}: {pooled_dice(whole_brains, [cut(i, t, g) for i in test_ids]):.3f}"
                         for g, (_, t) in best_t.items())
    return (f"{n_components} components | plain (t {plain:.2f}): "
            f"{pooled_dice(whole_brains, [plain] * len(test_ids)):.3f} (training {training_dice(plain, 0.0):.3f}) | "
            f"chosen (t {threshold:.2f}, gamma {gamma:g}; training {best:.3f}): "
            f"{pooled_dice(whole_brains, [cut(i, threshold, gamma) for i in test_ids]):.3f} | "
            f"test cases' own cuts {', '.join(f'{own[i]:.2f}' for i in test_ids)} | "
            f"test Dice by gamma (t chosen): {by_gamma}")


CALIBRATION_VOXELS = 300_000
"""Voxels drawn (seed 0) from each training domain to fit the score-to-probability map."""


def expected_dice_threshold(scores: np.ndarray, probability: np.ndarray) -> float:
    """The score of the last voxel kept when a case keeps its k most probable voxels for the k of highest
    expected Dice 2 S_k / (k + S) (see the module docstring). ``probability`` must not fall as the score
    rises, so the voxels are ranked by score: an isotonic fit's ties in p then still keep a top set of
    scores, the set ``score >= threshold`` selects."""
    order = np.argsort(-scores, kind="stable")
    kept_mass = np.cumsum(probability[order], dtype=np.float64)
    expected = 2.0 * kept_mass / (np.arange(1, order.size + 1) + kept_mass[-1])
    return float(scores[order[int(np.argmax(expected))]])


def lesion_probability(scores, labels, validation, groups: list[list[str]], voxels: str, mapping: str):
    """A monotone map from score to lesion probability, fitted on the training domains' ``voxels``
    ('slices': lesion slices; 'brain': whole brains), each domain weighted equally, ``mapping``
    'logistic' or 'isotonic'."""
    from sklearn.isotonic import IsotonicRegression
    from sklearn.linear_model import LogisticRegression

    rng = np.random.default_rng(0)
    x, y, weight = [], [], []
    for group in groups:
        picked = [validation[i] if voxels == "slices" else np.ones_like(labels[i]) for i in group]
        domain_scores = np.concatenate([scores[i][p] for i, p in zip(group, picked)])
        domain_labels = np.concatenate([labels[i][p] for i, p in zip(group, picked)])
        take = rng.choice(domain_scores.size, min(domain_scores.size, CALIBRATION_VOXELS), replace=False)
        x.append(domain_scores[take])
        y.append(domain_labels[take])
        weight.append(np.full(take.size, 1.0 / take.size))
    x, y, weight = np.concatenate(x), np.concatenate(y), np.concatenate(weight) * len(groups) * CALIBRATION_VOXELS
    if mapping == "logistic":
        fitted = LogisticRegression(C=1e4).fit(x[:, None], y, sample_weight=weight)
        return lambda s: fitted.predict_proba(s[:, None].astype(np.float64))[:, 1]
    fitted = IsotonicRegression(out_of_bounds="clip", y_min=0.0, y_max=1.0).fit(x, y, sample_weight=weight)
    return lambda s: fitted.predict(s.astype(np.float64))


def expected_dice_figures(scores: dict[str, np.ndarray], labels, validation, domain, test_domain: str) -> str:
    groups, test_ids = fold_cases(domain, test_domain)
    whole_brains = [SortedCase(scores[i], labels[i]) for i in test_ids]
    plain = study_threshold(scores, labels, validation, groups)
    training_brains = [[SortedCase(scores[i], labels[i]) for i in g] for g in groups]
    figures = [f"plain (t {plain:.2f}): {pooled_dice(whole_brains, [plain] * len(test_ids)):.3f}"]
    for voxels in ("slices", "brain"):
        for mapping in ("logistic", "isotonic"):
            probability = lesion_probability(scores, labels, validation, groups, voxels, mapping)
            thresholds = [expected_dice_threshold(scores[i], probability(scores[i])) for i in test_ids]
            training = np.mean([pooled_dice(brains, [expected_dice_threshold(scores[i], probability(scores[i]))
                                                     for i in g])
                                for g, brains in zip(groups, training_brains)])
            figures.append(f"{mapping} on {voxels}: {pooled_dice(whole_brains, thresholds):.3f} "
                           f"(t {min(thresholds):.2f}-{max(thresholds):.2f}; training brains {training:.3f})")
    return " | ".join(figures)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", type=Path, help="a run folder with threshold_scores/ from threshold_rules.py --save-scores")
    parser.add_argument("--rows", default="", help="';'-separated rows to try the per-case rules on")
    parser.add_argument("--sum", default="", help="'A;B': also score A + beta x B")
    parser.add_argument("--betas", default="0,0.1,0.2,0.3,0.5,1")
    parser.add_argument("--sum-zscore", action="store_true", help="z-score --sum's second row per case first")
    parser.add_argument("--rescale", default="", help="a normal-tissue-scale row to divide by its brain SD ** gamma")
    parser.add_argument("--gammas", default="0,0.5,1")
    parser.add_argument("--peak-margin", action="store_true", help="the --rows under the peak-margin segmentation")
    parser.add_argument("--domains", default="benchmarks/domains.json", help="with --peak-margin: the study's cases")
    parser.add_argument("--expected-dice", action="store_true",
                        help="the --rows under each case's expected-Dice threshold")
    parser.add_argument("--tail-mixture", action="store_true",
                        help="the --rows under each case's tail-mixture threshold blended with the shared one")
    args = parser.parse_args()
    folder = args.run / "threshold_scores"
    cases = np.load(folder / "cases.npz")
    ids = sorted({key.split("|", 1)[1] for key in cases.files})
    domain = {i: str(cases[f"domain|{i}"]) for i in ids}
    labels = {i: cases[f"labels|{i}"].astype(bool) for i in ids}
    validation = {i: cases[f"validation|{i}"].astype(bool) for i in ids}
    boxes = brain_boxes(args.domains) if args.peak_margin else {}
    for fold in sorted(folder.glob("fold*.npz")):
        saved = np.load(fold)
        test_domain = str(saved["test_domain"])

        def row_scores(row: str) -> dict[str, np.ndarray]:
            return {i: saved[f"{row}|{i}"].astype(np.float32) for i in ids}

        _, test_ids = fold_cases(domain, test_domain)
        test_labels = np.concatenate([labels[i] for i in test_ids])

        def test_auprc(scores: dict[str, np.ndarray]) -> float:
            return detection_metrics(np.concatenate([scores[i] for i in test_ids]), test_labels).auprc

        for row in filter(None, args.rows.split(";")):
            if args.expected_dice:
                print(f"{test_domain} | {row} | " + expected_dice_figures(row_scores(row), labels, validation, domain,
                                                                         test_domain), flush=True)
                continue
            if args.tail_mixture:
                for n_components in (2, 3):
                    print(f"{test_domain} | {row} | " + tail_mixture_figures(
                        row_scores(row), labels, validation, domain, test_domain, n_components), flush=True)
                continue
            if args.peak_margin:
                print(f"{test_domain} | {row} | " + peak_margin_figures(row_scores(row), labels, validation, domain,
                                                                       test_domain, boxes), flush=True)
                continue
            figures = fold_figures(row_scores(row), labels, validation, domain, test_domain)
            print(f"{test_domain} | {row} | " + " | ".join(f"{k}: {v}" for k, v in figures.items()), flush=True)
        if args.sum:
            first, second = (row_scores(row) for row in args.sum.split(";"))
            if args.sum_zscore:
                second = {i: (s - np.float32(s.mean())) / np.float32(s.std() or 1.0) for i, s in second.items()}
            for beta in (float(b) for b in args.betas.split(",")):
                summed = {i: first[i] + np.float32(beta) * second[i] for i in ids}
                figures = fold_figures(summed, labels, validation, domain, test_domain, with_peak=False)
                print(f"{test_domain} | sum{' (B z-scored)' if args.sum_zscore else ''}, beta {beta:g} | "
                      f"AUPRC {test_auprc(summed):.3f} | global: {figures['global']} | "
                      f"test best: {figures['test best']}", flush=True)
        if args.rescale:
            normal_scale = row_scores(args.rescale)
            for gamma in (float(g) for g in args.gammas.split(",")):
                rescaled = {i: s / np.float32(float(s.std()) ** gamma) for i, s in normal_scale.items()}
                figures = fold_figures(rescaled, labels, validation, domain, test_domain, with_peak=False)
                print(f"{test_domain} | rescaled, gamma {gamma:g} | AUPRC {test_auprc(rescaled):.3f} | "
                      f"global: {figures['global']} | "
                      f"test best: {figures['test best']}", flush=True)


if __name__ == "__main__":
    main()
