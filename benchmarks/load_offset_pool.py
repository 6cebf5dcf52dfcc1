"""A pool's AUPRC with each case's load offset in its scores (as shipped) and with it left out of them.

``postprocess.load_weight`` adds one constant per case, w x ln(share of the brain scoring >= 1 SD / 1 %), so that
one threshold suits a large glioma and a few small MS lesions. Moving that constant from the scores to the case's
threshold would leave every case's mask as it is, but a pool of cases ranks all their voxels on one scale, where the
constant moves whole cases against each other. This rebuilds the scores of a finished leave-one-domain-out study's
row for the pool's domains (each case by the fold that left its domain out, through ``postprocess_scores``, the
path ``admanomaly predict`` runs) and prints each domain's and the pool's AUPRC both ways (without the study's
small-component step, which acts only at the threshold).

    python benchmarks/load_offset_pool.py runs/lodo_sp --domains "CBICA gliomas,BraTS-2013 gliomas"

Needs the study folder (study.json and networks/) and the data; one fold at a time (11 min on 2 cores beside a test run).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import numpy as np
from sklearn.metrics import average_precision_score

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ADMAnomalyLib.config import PostprocessConfig  # noqa: E402
from ADMAnomalyLib.postprocess import load_offset  # noqa: E402
from ADMAnomalyLib.study import runner  # noqa: E402
from ADMAnomalyLib.study.methods import BUNDLED_METHOD, METHODS  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path, help="a finished leave-one-domain-out study folder")
    parser.add_argument("--domains", required=True, help="comma-separated domains of the pool")
    parser.add_argument("--row", default=BUNDLED_METHOD, help="the study row (default: the bundled one)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    spec = METHODS[args.row]
    pooled: dict[str, list[np.ndarray]] = {"offset in the scores": [], "offset left out": [], "labels": []}
    for domain in [d.strip() for d in args.domains.split(",")]:
        for fold in runner.finished_folds(args.run_dir, spec, args.seed, only=domain):
            record = fold.run["methods"][args.row]
            post = PostprocessConfig(**record["postprocess"])
            flat = runner._postprocessed(fold.raw, dataclasses.replace(post, load_weight=0.0), fold.cases,
                                         fold.natives_of, runner.RunCaches(), spec.network, keep=False)
            scores: dict[str, list[np.ndarray]] = {"offset in the scores": [], "offset left out": [], "labels": []}
            for case in fold.cases:
                values = flat[case.case_id]
                offset = load_offset(values, post.load_weight, post.load_reference)
                scores["offset in the scores"].append(values + np.float32(offset))
                scores["offset left out"].append(values)
                scores["labels"].append(case.labels)
                print(f"{domain}: {case.case_id} offset {offset:.3f}, lesion {case.lesion_ml:.1f} ml", flush=True)
            labels = np.concatenate(scores["labels"])
            print(f"{domain} (load weight {post.load_weight:g}; the study recorded AUPRC "
                  f"{record['pooled']['auprc']:.4f}): " + ", ".join(
                      f"{way} {average_precision_score(labels, np.concatenate(scores[way])):.4f}"
                      for way in ("offset in the scores", "offset left out")), flush=True)
            for key, values in scores.items():
                pooled[key] += values
    labels = np.concatenate(pooled["labels"])
    print("pool: " + ", ".join(f"{way} {average_precision_score(labels, np.concatenate(pooled[way])):.4f}"
                               for way in ("offset in the scores", "offset left out")))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
