"""What a study row's post-processing search would reach on each left-out domain if it could see that
domain's labels: how much is left to gain by choosing better, with the same networks.

The row's own greedy search (the same fields, candidates and order as in the study,
:func:`ADMAnomalyLib.study.runner.choose_postprocess`) is run with the *test* domain's labels as its
criterion (AUPRC over the test cases' brains), on the energies of the fold's own network as the study
kept it; then every load weight of :data:`ADMAnomalyLib.postprocess.LOAD_WEIGHTS` is tried, and the best
AUPRC and the best Dice over one threshold are reported (without the row's small-component step at
its threshold, which needs a threshold). Any choice made without the test domain (the
study's rows) that follows the same search is bounded by these figures. They are never results: they read
the labels they are scored on.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/oracle_postprocess.py runs/domains_128ho \
        --row "ADM+ F +asym +asymT2 +post+cc (z+load)"
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ADMAnomalyLib.metrics import detection_metrics  # noqa: E402
from ADMAnomalyLib.postprocess import LOAD_WEIGHTS, load_offset  # noqa: E402
from ADMAnomalyLib.study import runner  # noqa: E402
from ADMAnomalyLib.study.methods import METHODS, postprocess_for  # noqa: E402


def pooled(scores: dict[str, np.ndarray], cases) -> tuple[np.ndarray, np.ndarray]:
    return (np.concatenate([scores[c.case_id] for c in cases]),
            np.concatenate([c.labels for c in cases]).astype(bool))


def oracle_rows(run_dir: Path, row: str, seed: int = 0) -> list[dict]:
    """Per run of ``seed`` in the study folder ``run_dir``: the post-processing ``row``'s search chooses
    with the test domain's AUPRC as criterion (``chosen``), the pooled AUPRC and best Dice it then reaches
    with the best load weight (``auprc``, ``best_dice`` and the weights), the AUPRC of the row's
    unsearched post-processing (``start_auprc``: the greedy search never ends below it) and the
    study's own figures of the row (``study``: None when the study did not run it)."""
    spec = METHODS[row]
    if spec.kind != "adm" or not spec.search:
        raise ValueError(f"{row!r} is not an ADM row with a post-processing search")
    rows = []
    for fold in runner.finished_folds(run_dir, spec, seed):
        run, cases, raw, settings = fold.run, fold.cases, fold.raw, fold.settings
        caches = runner.RunCaches()

        def postprocessed(post) -> dict[str, np.ndarray]:
            # As the study's row: the native FLAIR (and T2) of the row's preparation, through postprocess_scores.
            return runner._postprocessed(raw, post, cases, fold.natives_of, caches, spec.network, keep=False)

        def auprc_of(post) -> float:
            return detection_metrics(*pooled(postprocessed(post), cases)).auprc

        start = postprocess_for(spec, settings)
        post, chosen = runner.choose_postprocess(start, spec.search, auprc_of)
        scores = postprocessed(post)
        figures = {weight: detection_metrics(*pooled(
            {c.case_id: scores[c.case_id] + np.float32(load_offset(scores[c.case_id], weight, post.load_reference))
             for c in cases}, cases)) for weight in LOAD_WEIGHTS}
        auprc_load = max(figures, key=lambda w: figures[w].auprc)
        dice_load = max(figures, key=lambda w: figures[w].best_f1)
        study_row = run["methods"].get(row)
        rows.append({"domain": run["domain"], "chosen": chosen, "start_auprc": auprc_of(start),
                     "auprc": figures[auprc_load].auprc, "auprc_load": auprc_load,
                     "best_dice": figures[dice_load].best_f1, "best_dice_load": dice_load,
                     "study": None if study_row is None else {
                         "auprc": study_row["pooled"]["auprc"], "best_dice": study_row["pooled"]["best_f1"],
                         "dice_at_threshold": study_row["at_threshold"]["dice"]}})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path, help="a leave-one-domain-out study folder (study.json, networks/)")
    parser.add_argument("--row", default="ADM+ F +asym +asymT2 +post+cc (z+load)",
                        help="the study row whose search is run on the test domain")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.row not in METHODS:
        parser.error(f"no study row {args.row!r}")
    for row in oracle_rows(args.run, args.row, args.seed):
        study = row["study"]
        reached = (f"; the study's row: AUPRC {study['auprc']:.3f}, best Dice {study['best_dice']:.3f}, Dice at "
                   f"threshold {study['dice_at_threshold']:.3f}" if study else "")
        print(f"{row['domain']}: oracle AUPRC {row['auprc']:.3f} (load {row['auprc_load']:g}), best Dice "
              f"{row['best_dice']:.3f} (load {row['best_dice_load']:g}); chose {row['chosen']}{reached}", flush=True)


if __name__ == "__main__":
    main()
