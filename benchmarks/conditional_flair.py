"""FLAIR minus what the case's other contrasts predict of it, per domain (no network).

The CtoC residual asks how far FLAIR is from what T1, T1c and T2 say it should be, and a network trained on
other sites answers with a translation error. This script asks the same of each case alone, so that no site
shift can enter: the FLAIR z-score minus its median over the case's brain voxels that share its bins of the
other contrasts (quantile bins of each, per case; ``scipy.ndimage.median`` per bin). The lesion is a small
share of every bin, so the median is that of normal tissue. Every case of ``--domains`` is prepared by the
engine (``preprocess.prepare_case``, the default normalisation) and scored raw and as ``admanomaly predict``
post-processes it (``postprocess.postprocess_scores``, 5 mm median filter, no small-component step): pooled
AUPRC and best Dice over each domain's brain voxels.

If the contrasts were independent evidence, the residual would keep the lesion and lose the tissue
boundaries; if the lesion shows on T1 or T2 too, the residual loses the lesion with them. It reads every
domain, the test domains included: a diagnosis, no result of its own.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/conditional_flair.py --domains benchmarks/domains.json   # 3.2 min, 2.1 GiB
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
from scipy import ndimage

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ADMAnomalyLib.cases import load_case  # noqa: E402
from ADMAnomalyLib.config import PostprocessConfig, PreprocessConfig  # noqa: E402
from ADMAnomalyLib.domains import load_domains  # noqa: E402
from ADMAnomalyLib.metrics import detection_metrics  # noqa: E402
from ADMAnomalyLib.postprocess import postprocess_scores  # noqa: E402
from ADMAnomalyLib.preprocess import prepare_case  # noqa: E402

MEDIAN_5MM = PostprocessConfig(median_size_mm=5.0)
PREDICTORS: dict[str, tuple[tuple[str, ...], int]] = {
    "T1": (("t1",), 64),
    "T2": (("t2",), 64),
    "T1, T2": (("t1", "t2"), 12),
    "T1, T2 (finer)": (("t1", "t2"), 24),
    "T1, T1c, T2": (("t1", "t1c", "t2"), 8),
}
"""Each row's predicting contrasts and the number of quantile bins of each: 12-64 bins a contrast leave
thousands of voxels in a bin of every case."""


def quantile_bins(values: np.ndarray, n_bins: int) -> np.ndarray:
    edges = np.quantile(values, np.linspace(0.0, 1.0, n_bins + 1)[1:-1])
    return np.searchsorted(edges, values)


def conditional_residual(flair: np.ndarray, predictors: list[np.ndarray], n_bins: int) -> np.ndarray:
    """``flair`` minus the median of ``flair`` over the voxels in the same joint bin of ``predictors``."""
    joint = np.zeros(flair.shape, dtype=np.int64)
    for values in predictors:
        joint = joint * n_bins + quantile_bins(values, n_bins)
    occupied = np.unique(joint)
    expected = np.zeros(int(joint.max()) + 1, dtype=np.float32)
    expected[occupied] = ndimage.median(flair, labels=joint, index=occupied)
    return flair - expected[joint]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--domains", type=Path, default=Path("benchmarks/domains.json"))
    args = parser.parse_args()
    rows = ["FLAIR z", *(f"FLAIR z - median(FLAIR | {name})" for name in PREDICTORS)]
    for domain, cases in load_domains(args.domains).items():
        started = time.time()
        raw: dict[str, list[np.ndarray]] = {row: [] for row in rows}
        filtered: dict[str, list[np.ndarray]] = {row: [] for row in rows}
        truth = []
        for files in cases:
            case = load_case(files)
            prepared = prepare_case(case, PreprocessConfig(), keep_native=("flair", "t1", "t1c", "t2"))
            brain, spacing = prepared.native_brain, case.images["flair"].GetSpacing()
            inside = {contrast: values[brain] for contrast, values in prepared.native_zscored.items()}
            scores = {"FLAIR z": inside["flair"]}
            for name, (contrasts, n_bins) in PREDICTORS.items():
                scores[f"FLAIR z - median(FLAIR | {name})"] = conditional_residual(
                    inside["flair"], [inside[c] for c in contrasts], n_bins)
            truth.append(prepared.native_lesion[brain])
            for row in rows:
                volume = np.zeros(brain.shape, dtype=np.float32)
                volume[brain] = scores[row]
                raw[row].append(scores[row])
                filtered[row].append(postprocess_scores(volume, brain, spacing, MEDIAN_5MM)[brain])
        labels = np.concatenate(truth)
        for row in rows:
            plain = detection_metrics(np.concatenate(raw[row]), labels)
            smoothed = detection_metrics(np.concatenate(filtered[row]), labels)
            print(f"{domain} | {row} | raw AUPRC {plain.auprc:.3f} | +med5 AUPRC {smoothed.auprc:.3f}, "
                  f"best Dice {smoothed.best_f1:.3f}", flush=True)
        print(f"  ({time.time() - started:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
