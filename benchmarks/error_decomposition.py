"""Where a study row's errors lie at its transferred threshold, per left-out domain.

For every run of ``--seed`` in a leave-one-domain-out study folder, the row's scores of the test cases
are rebuilt as the study made them (the run's kept network through ``runner.raw_energy``, the path
``admanomaly predict`` runs; the post-processing and load weight the study chose for the row, from
study.json) and thresholded at the row's transferred threshold (without the small-component step). It
prints:

- the missed lesion voxels: their share of the lesion, how many lie within 2 mm of the reference's
  edge (a boundary disagreement) or deeper than 5 mm (a missed region), and, per reference label
  (BraTS: 1 necrotic / non-enhancing core, 2 oedema, 4 enhancing), the share missed and the share of
  those missed whose FLAIR z-score (the row's own FLAIR) is below 1 (not FLAIR-bright);
- the false alarms: within 2 mm of the reference, 2-10 mm from it, or further;
- per label, the AUROC of the label's voxels against normal voxels (every 20th).

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/error_decomposition.py runs/domains_128e \\
        --row "ADM+ F +asym +asymE +post+cc (z+load)"
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import SimpleITK as sitk  # noqa: E402
from sklearn.metrics import roc_auc_score  # noqa: E402

from ADMAnomalyLib.config import PostprocessConfig  # noqa: E402
from ADMAnomalyLib.domains import load_domains  # noqa: E402
from ADMAnomalyLib.postprocess import load_offset, signed_distance_mm  # noqa: E402
from ADMAnomalyLib.study import runner  # noqa: E402
from ADMAnomalyLib.study.methods import METHODS  # noqa: E402


def share(part: float, whole: float) -> str:
    return f"{part / whole:.1%}" if whole else "-"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path, help="a leave-one-domain-out study folder (study.json, networks/)")
    parser.add_argument("--row", default="ADM+ F +asym +asymE +post+cc (z+load)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    spec = METHODS[args.row]
    domains_file = json.loads((args.run / "study.json").read_text())["domains_file"]
    label_paths = {f.case_id: f.label for cases in load_domains(domains_file).values() for f in cases}
    for fold in runner.finished_folds(args.run, spec, args.seed):
        chosen = fold.run["methods"][args.row]
        post = PostprocessConfig(**{k: v for k, v in chosen["postprocess"].items() if k != "load_weight"})
        scores = runner._postprocessed(fold.raw, post, fold.cases, fold.natives_of, runner.RunCaches(), spec.network,
                                       keep=False)
        counts, by_label = Counter(), {"normal": []}
        for case in fold.cases:
            score = scores[case.case_id] + np.float32(load_offset(scores[case.case_id], chosen["postprocess"]["load_weight"],
                                                                  post.load_reference))
            reference = sitk.GetArrayFromImage(sitk.ReadImage(str(label_paths[case.case_id])))[case.brain]
            lesion = np.zeros(case.brain.shape, bool)
            lesion[case.brain] = case.labels
            distance = signed_distance_mm(lesion, case.spacing)[case.brain]
            flair = fold.natives_of(case)["flair"][case.brain]
            found, truth = score >= chosen["threshold"], case.labels
            missed, false_alarm = truth & ~found, ~truth & found
            counts.update(lesion=truth.sum(), missed=missed.sum(), edge=(missed & (distance <= 2)).sum(),
                          deep=(missed & (distance > 5)).sum(), false_alarm=false_alarm.sum(),
                          near=(false_alarm & (distance >= -2)).sum(),
                          mid=(false_alarm & (distance < -2) & (distance >= -10)).sum(),
                          far=(false_alarm & (distance < -10)).sum())
            for value in np.unique(reference[truth]):
                voxels = truth & (reference == value)
                counts.update({f"{value}": voxels.sum(), f"{value} missed": (voxels & ~found).sum(),
                               f"{value} dark": (voxels & ~found & (flair < 1)).sum()})
                by_label.setdefault(int(value), []).append(score[voxels])
            by_label["normal"].append(score[~truth][::20])
        tp = counts["lesion"] - counts["missed"]
        dice = 2 * tp / (2 * tp + counts["missed"] + counts["false_alarm"])
        print(f"== {fold.run['domain']} (seed {args.seed}): threshold {chosen['threshold']:.2f}, Dice without the "
              f"small-component step {dice:.3f}; missed {share(counts['missed'], counts['lesion'])} of "
              f"{counts['lesion']} lesion voxels, false alarms {share(counts['false_alarm'], counts['lesion'])} of it")
        print(f"   missed: {share(counts['edge'], counts['missed'])} within 2 mm of the reference's edge, "
              f"{share(counts['deep'], counts['missed'])} deeper than 5 mm")
        print(f"   false alarms: {share(counts['near'], counts['false_alarm'])} within 2 mm of the reference, "
              f"{share(counts['mid'], counts['false_alarm'])} 2-10 mm, {share(counts['far'], counts['false_alarm'])} further")
        normal = np.concatenate(by_label["normal"])
        for value in sorted(k for k in by_label if k != "normal"):
            voxels = np.concatenate(by_label[value])
            auroc = roc_auc_score(np.r_[np.zeros(normal.size), np.ones(voxels.size)], np.r_[normal, voxels])
            print(f"   label {value}: {counts[str(value)]} voxels, {share(counts[f'{value} missed'], counts[str(value)])} "
                  f"missed, {share(counts[f'{value} dark'], counts[f'{value} missed'])} of those with FLAIR z < 1; "
                  f"AUROC against normal voxels {auroc:.3f}", flush=True)


if __name__ == "__main__":
    main()
