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
  widens as it does a FLAIR z-score's), one global threshold; also its pooled AUPRC.

    .venv/bin/python benchmarks/threshold_rules.py runs/domains_cmc_s --image-size 64 --save-scores \\
        --rows "FLAIR z +med5+cc;ADM+ F +post+cc (z+load);ADM+ F cm* +post+cc (normal+load)"
    .venv/bin/python benchmarks/threshold_scores_rules.py runs/domains_cmc_s \\
        --rows "FLAIR z +med5+cc;ADM+ F +post+cc (z+load);ADM+ F cm* +post+cc (normal+load)" \\
        --sum "ADM+ F +post+cc (z+load);ADM+ F cm* +post+cc (normal+load)"
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ADMAnomalyLib.metrics import balanced_best_threshold, detection_metrics, sorted_counts  # noqa: E402

ALPHAS = tuple(round(a, 2) for a in np.arange(0.0, 1.001, 0.05))
PEAK_QUANTILE = 0.999


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


def fold_figures(scores: dict[str, np.ndarray], labels, validation, domain, test_domain: str,
                 with_peak: bool = True) -> dict[str, str]:
    train_domains = sorted({domain[i] for i in scores} - {test_domain})
    groups = [[i for i in scores if domain[i] == d] for d in train_domains]
    test_ids = [i for i in scores if domain[i] == test_domain]
    lesion_slices = {i: SortedCase(scores[i][validation[i]], labels[i][validation[i]]) for g in groups for i in g}
    whole_brains = [SortedCase(scores[i], labels[i]) for i in test_ids]
    test_scores = np.concatenate([scores[i] for i in test_ids])
    test_labels = np.concatenate([labels[i] for i in test_ids])
    best = pooled_dice(whole_brains, [balanced_best_threshold([(test_scores, test_labels)])] * len(test_ids))
    global_threshold = balanced_best_threshold(
        [(np.concatenate([scores[i][validation[i]] for i in g]), np.concatenate([labels[i][validation[i]] for i in g]))
         for g in groups])
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", type=Path, help="a run folder with threshold_scores/ from threshold_rules.py --save-scores")
    parser.add_argument("--rows", default="", help="';'-separated rows to try the per-case rules on")
    parser.add_argument("--sum", default="", help="'A;B': also score A + beta x B")
    parser.add_argument("--betas", default="0,0.1,0.2,0.3,0.5,1")
    parser.add_argument("--sum-zscore", action="store_true", help="z-score --sum's second row per case first")
    parser.add_argument("--rescale", default="", help="a normal-tissue-scale row to divide by its brain SD ** gamma")
    parser.add_argument("--gammas", default="0,0.5,1")
    args = parser.parse_args()
    folder = args.run / "threshold_scores"
    cases = np.load(folder / "cases.npz")
    ids = sorted({key.split("|", 1)[1] for key in cases.files})
    domain = {i: str(cases[f"domain|{i}"]) for i in ids}
    labels = {i: cases[f"labels|{i}"].astype(bool) for i in ids}
    validation = {i: cases[f"validation|{i}"].astype(bool) for i in ids}
    for fold in sorted(folder.glob("fold*.npz")):
        saved = np.load(fold)
        test_domain = str(saved["test_domain"])

        def row_scores(row: str) -> dict[str, np.ndarray]:
            return {i: saved[f"{row}|{i}"].astype(np.float32) for i in ids}

        test_ids = [i for i in ids if domain[i] == test_domain]
        test_labels = np.concatenate([labels[i] for i in test_ids])

        def test_auprc(scores: dict[str, np.ndarray]) -> float:
            return detection_metrics(np.concatenate([scores[i] for i in test_ids]), test_labels).auprc

        for row in filter(None, args.rows.split(";")):
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
