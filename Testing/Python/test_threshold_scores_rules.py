"""benchmarks/threshold_scores_rules.py's per-case rules on planted data: the peak-margin segmentation
keeps a region at threshold t only where its peak reaches t + margin, and its counts split lesion-slice and
whole-brain voxels as the fold's Dice needs them; the expected-Dice threshold keeps the voxels whose
probability beats about half the case's expected Dice; the tail mixture cuts a case between its lesion mode
and its bulk, and gives no cut to a case without such a mode."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]


def load_rules():
    spec = importlib.util.spec_from_file_location("threshold_scores_rules",
                                                  REPO / "benchmarks" / "threshold_scores_rules.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_peak_margin_counts_keep_regions_by_their_peak():
    rules = load_rules()
    brain = np.zeros((3, 8, 8), dtype=bool)
    brain[:, 1:7, 1:7] = True
    volume = np.zeros(brain.shape, dtype=np.float32)
    volume[1, 2:4, 2:4] = 1.0           # a lesion: 4 voxels at 1.0 ...
    volume[1, 2, 2] = 2.5               # ... one of them its core
    volume[1, 5, 5] = 1.2               # a faint spot with no core, not a lesion
    lesion = np.zeros(brain.shape, dtype=bool)
    lesion[1, 2:4, 2:4] = True
    lesion_slices = np.zeros(brain.shape, dtype=bool)
    lesion_slices[1] = True
    counts = rules.peak_margin_counts(brain, volume[brain], lesion[brain], lesion_slices[brain], [0.6, 2.0])
    margin = {m: k for k, m in enumerate(rules.MARGINS)}
    # t 0.6, no margin: both regions (4 lesion voxels, 1 false positive), all on the lesion slice.
    assert counts[0, margin[0.0]].tolist() == [4, 1, 4, 1]
    # A margin of 1: only the lesion's region peaks at >= 1.6; the faint spot (peak 1.2) goes.
    assert counts[0, margin[1.0]].tolist() == [4, 0, 4, 0]
    # A margin of 2 asks for 2.6, above the lesion's core too: nothing is left.
    assert counts[0, margin[2.0]].tolist() == [0, 0, 0, 0]
    # t 2.0: only the core voxel is above t; with margin 0.5 it still qualifies (2.5 >= 2.5).
    assert counts[1, margin[0.5]].tolist() == [1, 0, 1, 0]
    assert counts[1, margin[0.6]].tolist() == [0, 0, 0, 0]


def test_expected_dice_threshold_keeps_what_maximises_the_expected_dice():
    rules = load_rules()
    scores = np.arange(10, dtype=np.float32)  # voxel i scores i; probability rises with the score
    confident = np.array([0, 0, 0, 0, 0, 0, 0, 0.9, 0.95, 1.0])
    # Keeping the top 3 gives 2 x 2.85 / (3 + 2.85) = 0.974, above any other k.
    assert rules.expected_dice_threshold(scores, confident) == 7.0
    # A faint case: its expected Dice is low, so voxels of lower probability are kept as well.
    faint = np.array([0.05, 0.05, 0.05, 0.05, 0.05, 0.2, 0.2, 0.3, 0.3, 0.3])
    k = np.arange(1, 11)
    mass = np.cumsum(np.sort(faint)[::-1])
    best_k = int(np.argmax(2 * mass / (k + faint.sum()))) + 1
    assert best_k == 5 and rules.expected_dice_threshold(scores, faint) == 5.0


def test_tail_mixture_cuts_between_a_lesion_mode_and_the_bulk_and_not_without_one():
    rules = load_rules()
    rng = np.random.default_rng(1)
    bulk = rng.normal(0.0, 1.0, 60_000)
    with_lesion = np.concatenate([bulk, rng.normal(6.0, 1.0, 4_000)]).astype(np.float32)
    cut = rules.tail_mixture_threshold(with_lesion, 2)
    # equal unit variances, weights 15 : 1: the posterior is 1/2 at x with 6 x - 18 = ln 15
    assert abs(cut - (3.0 + np.log(15.0) / 6.0)) < 0.1
    assert np.mean(with_lesion[60_000:] >= cut) > 0.95 and np.mean(with_lesion[:60_000] >= cut) < 0.01
    # a case without a lesion mode: the top component is the bulk itself, no cut of its own
    assert rules.tail_mixture_threshold(bulk.astype(np.float32), 2) == float("inf")
