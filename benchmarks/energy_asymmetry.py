"""A first look at the learned energy's own left-right asymmetry, on a finished leave-one-domain-out
study's fold networks (no training).

Off its training sites the energy lights up grey matter and CSF in both hemispheres
(docs/domain_analysis.md), while a lesion is one-sided at the scale of a few mm. The FLAIR asymmetry
term (twentieth round) used that prior on FLAIR; here it is tried on E itself: after the row's
smoothing and rim suppression, the energy is replaced by its asymmetry (or the asymmetry added to it,
the product's ``postprocess.energy_asymmetry_weight``)
``A(E) = max(E - max of E within a window of the mirror voxel, 0)``
(:func:`ADMAnomalyLib.postprocess.intensity_asymmetry`), and the row's other choices, as the study's
fold chose them, follow. Per left-out domain: the pooled AUPRC and best Dice over its test cases.
The variants are compared on the test domains themselves, so a winner here is a candidate for the
study's search, not a result.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/energy_asymmetry.py runs/domains_128ho \
        --row "ADM+ F +asym +post+cc (z+load) held-out"
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ADMAnomalyLib.config import PostprocessConfig  # noqa: E402
from ADMAnomalyLib.metrics import detection_metrics  # noqa: E402
from ADMAnomalyLib.postprocess import (intensity_asymmetry, postprocess_scores, smooth_in_brain,  # noqa: E402
                                       suppress_rim)
from ADMAnomalyLib.study import runner  # noqa: E402
from ADMAnomalyLib.study.methods import METHODS  # noqa: E402


def replaced_scores(energy: np.ndarray, case, natives: dict, post: PostprocessConfig, window_mm: float,
                    cache: dict) -> np.ndarray:
    """Brain-voxel scores of one case: the post-processing ``post`` with the smoothed, rim-suppressed
    energy replaced by its asymmetry A(E) alone (what the product's ``energy_asymmetry_weight`` adds to E)."""
    volume = np.zeros(case.brain.shape, np.float32)
    volume[case.brain] = energy
    if post.smoothing_sigma_mm > 0:
        volume = smooth_in_brain(volume, case.brain, case.spacing, post.smoothing_sigma_mm, cache)
    if post.rim_erosion_mm > 0:
        volume = suppress_rim(volume, case.brain, case.spacing, post.rim_erosion_mm, cache)
    volume = intensity_asymmetry(volume, case.brain, case.spacing, window_mm, case.direction, cache)
    rest = dataclasses.replace(post, smoothing_sigma_mm=0.0, rim_erosion_mm=0.0, energy_asymmetry_weight=0.0)
    if rest.native_active:
        volume = postprocess_scores(volume, case.brain, case.spacing, rest, natives["flair"], cache, case.direction,
                                    natives["t2"], natives["t1"])
    return volume[case.brain]


def energy_asymmetry_rows(run_dir: Path, row: str, seed: int = 0, weights=(0.5, 1.0, 2.0), windows=(5.0,),
                          only: str | None = None) -> list[dict]:
    """Per run of ``seed`` in the study folder ``run_dir`` (and variant): the left-out ``domain``, the
    ``score`` variant's name and its pooled ``auprc`` and ``best_dice`` over the test cases. The 'E + u
    A(E)' variants are the row's post-processing as its fold chose it (``postprocess`` in study.json)
    with the product's ``energy_asymmetry_weight`` = u, through the study's own scoring."""
    spec = METHODS[row]
    rows = []
    for fold in runner.finished_folds(run_dir, spec, seed, only):
        run, cases, raw, natives = fold.run, fold.cases, fold.raw, fold.natives_of
        post = PostprocessConfig(**run["methods"][row]["postprocess"])
        labels = np.concatenate([c.labels for c in cases]).astype(bool)
        caches = runner.RunCaches()

        def add(name: str, scores: dict[str, np.ndarray]) -> None:
            m = detection_metrics(np.concatenate([scores[c.case_id] for c in cases]), labels)
            rows.append({"domain": run["domain"], "score": name, "auprc": m.auprc, "best_dice": m.best_f1})

        def replaced(config: PostprocessConfig, window: float) -> dict[str, np.ndarray]:
            return {c.case_id: replaced_scores(raw[c.case_id], c, natives(c), config, window,
                                               caches.per_case.setdefault(c.case_id, {})) for c in cases}

        def through_study(config: PostprocessConfig) -> dict[str, np.ndarray]:
            return runner._postprocessed(raw, config, cases, natives, caches, spec.network, keep=False)

        add("raw E", raw)
        for window in windows:
            add(f"raw A(E), {window:g} mm", replaced(PostprocessConfig(), window))
        add("the row as the fold chose it", through_study(post))
        for window in windows:
            add(f"the row, E -> A(E) ({window:g} mm)", replaced(post, window))
            for weight in weights:
                add(f"the row, E + {weight:g} A(E) ({window:g} mm)", through_study(
                    dataclasses.replace(post, energy_asymmetry_weight=weight, asymmetry_window_mm=window)))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path, help="a leave-one-domain-out study folder (study.json, networks/)")
    parser.add_argument("--row", default="ADM+ F +asym +post+cc (z+load) held-out")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--weights", default="0.5,1,2")
    parser.add_argument("--windows", default="5")
    parser.add_argument("--only", default=None, help="one left-out domain")
    args = parser.parse_args()
    if args.row not in METHODS:
        parser.error(f"no study row {args.row!r}")
    print("| left-out domain | score | AUPRC | best Dice |\n|---|---|---|---|", flush=True)
    for row in energy_asymmetry_rows(args.run, args.row, args.seed, [float(w) for w in args.weights.split(",")],
                                     [float(w) for w in args.windows.split(",")], args.only):
        print(f"| {row['domain']} | {row['score']} | {row['auprc']:.3f} | {row['best_dice']:.3f} |", flush=True)


if __name__ == "__main__":
    main()
