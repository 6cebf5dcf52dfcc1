"""What N4 bias-field correction of the FLAIR does to FLAIR thresholding, per domain and fitting level.

Every case of ``--domains`` is prepared by the engine (``preprocess.prepare_case``) with
``preprocess.native_bias_correction_levels`` set to each of ``--levels`` (0 = none), and its native FLAIR
z-score, the strong baseline's score, is scored as ``admanomaly predict`` post-processes it
(``postprocess.postprocess_scores``, 5 mm median filter): pooled AUPRC and best Dice over each domain's
brain voxels, raw and filtered. The script also prints, per case, how far the fitted field moves the
FLAIR (1st and 99th percentile of corrected / raw over the brain) and the lesion's median FLAIR z, and
draws ``--figure``: one case's FLAIR before and after correction with its lesion outlined.

The levels are compared on every domain, the test domains included: this chooses the level the study's
N4 rows use and is no result of its own; the leave-one-domain-out study measures those rows.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bias_field.py --domains benchmarks/domains.json \\
        --figure docs/figures/bias_field.png --case Brats18_2013_11_1      # 7 min
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import SimpleITK as sitk  # noqa: E402

from ADMAnomalyLib.cases import load_case  # noqa: E402
from ADMAnomalyLib.config import PostprocessConfig, PreprocessConfig  # noqa: E402
from ADMAnomalyLib.domains import load_domains  # noqa: E402
from ADMAnomalyLib.metrics import detection_metrics  # noqa: E402
from ADMAnomalyLib.postprocess import postprocess_scores  # noqa: E402
from ADMAnomalyLib.preprocess import bias_corrected, prepare_case  # noqa: E402

BASELINE = PostprocessConfig(median_size_mm=5.0)
"""The strong baseline's filter (its small-component step needs a threshold and is left out)."""


def draw(path: Path, case_id: str, flair: np.ndarray, corrected: np.ndarray, field: np.ndarray,
         lesion: np.ndarray) -> None:
    """``flair`` and ``corrected`` (native FLAIR z-scores) and ``field`` (corrected / raw intensity) on
    the axial slice with the most lesion."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    z = int(np.argmax(lesion.sum(axis=(1, 2))))
    brain = flair[z] != 0
    fig, axes = plt.subplots(1, 3, figsize=(12, 4.4))
    panels = ((flair[z], "FLAIR z, as published", "gray", np.percentile(flair[z][brain], [1, 99.5])),
              (corrected[z], "FLAIR z after N4 (2 fitting levels)", "gray", np.percentile(corrected[z][brain], [1, 99.5])),
              (np.where(brain, field[z], np.nan), "corrected / published intensity", "coolwarm", (0.85, 1.15)))
    for axis, (image, title, colours, (low, high)) in zip(axes, panels):
        shown = axis.imshow(image, cmap=colours, vmin=low, vmax=high)
        axis.contour(lesion[z], [0.5], colors="yellow", linewidths=0.7)
        axis.set_title(title, fontsize=9)
        axis.axis("off")
        if colours != "gray":
            fig.colorbar(shown, ax=axis, fraction=0.046)
    fig.suptitle(f"{case_id}, axial slice {z} (reference outlined in yellow)", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--domains", type=Path, default=Path("benchmarks/domains.json"))
    parser.add_argument("--levels", default="0,1,2,3", help="comma-separated N4 fitting levels (0 = none)")
    parser.add_argument("--figure", type=Path, help="where to draw --case before and after correction")
    parser.add_argument("--case", default="", help="the case the figure shows")
    args = parser.parse_args()
    levels = [int(v) for v in args.levels.split(",")]
    for domain, cases in load_domains(args.domains).items():
        started = time.time()
        scores = {level: ([], []) for level in levels}
        labels = []
        for files in cases:
            case = load_case(files)
            prepared = {level: prepare_case(case, PreprocessConfig(native_bias_correction_levels=level))
                        for level in levels}
            first = prepared[levels[0]]
            brain, lesion = first.native_brain, first.native_lesion
            labels.append(lesion[brain])
            raw_flair = sitk.GetArrayFromImage(case.images["flair"]).astype(np.float32)
            for level in levels:
                flair = prepared[level].native_zscored["flair"]
                filtered = postprocess_scores(flair, brain, case.images["flair"].GetSpacing(), BASELINE)
                scores[level][0].append(flair[brain])
                scores[level][1].append(filtered[brain])
            top = max(levels)
            if top:
                positive = brain & (raw_flair > 0)
                field = bias_corrected(case.images["flair"], brain, top)[positive] / raw_flair[positive]
                before, after = (np.median(prepared[level].native_zscored["flair"][lesion]) for level in (levels[0], top))
                print(f"  {files.case_id}: lesion {lesion.sum() * np.prod(case.images['flair'].GetSpacing()) / 1000:.0f} ml, "
                      f"its median FLAIR z {before:+.2f} (N4 {levels[0]}) -> {after:+.2f} (N4 {top}); the {top}-level "
                      f"field moves the FLAIR by {np.percentile(field, 1):.3f}-{np.percentile(field, 99):.3f} (1st-99th pct)",
                      flush=True)
            if args.figure is not None and files.case_id == args.case:
                corrected = prepared.get(2) or prepare_case(case, PreprocessConfig(native_bias_correction_levels=2))
                field = np.where(brain & (raw_flair > 0), bias_corrected(case.images["flair"], brain, 2)
                                 / np.where(raw_flair > 0, raw_flair, 1), 1.0)
                draw(args.figure, files.case_id, prepared[levels[0]].native_zscored["flair"],
                     corrected.native_zscored["flair"], field, lesion)
        truth = np.concatenate(labels)
        for level in levels:
            raw = detection_metrics(np.concatenate(scores[level][0]), truth)
            filtered = detection_metrics(np.concatenate(scores[level][1]), truth)
            print(f"{domain} | N4 levels {level} | FLAIR z AUPRC {raw.auprc:.3f} | +med5 AUPRC {filtered.auprc:.3f}, "
                  f"best Dice {filtered.best_f1:.3f}", flush=True)
        print(f"  ({time.time() - started:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
