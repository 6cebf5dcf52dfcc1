"""FLAIR thresholding with the FLAIR lowered on bright sheets, per domain (no network).

Every case of ``--domains`` is prepared by the engine (``preprocess.prepare_case``, FLAIR after N4 with the
N4 rows' fitting levels, ``study.methods.NATIVE_N4_LEVELS``); its native FLAIR z-score is lowered by ``w`` times
its sheet response (``postprocess.sheet_response``, ``--sigma`` mm) for each ``w`` of ``--weights`` and
post-processed as ``admanomaly predict`` does (``postprocess.postprocess_scores``: 5 mm and 3 mm median filters,
no small-component step): pooled AUPRC and best Dice over each domain's brain voxels.

The weights are compared on every domain, the test domains included: this is a first look that chose the
candidates of the study's search (``study.methods.FLAIR_SHEET_WEIGHTS``), no result of its own; the
leave-one-domain-out study measures the row that chooses among them without the test domain.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/flair_sheets.py --domains benchmarks/domains.json   # 2.2 min, 1.7 GiB
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ADMAnomalyLib.cases import load_case  # noqa: E402
from ADMAnomalyLib.config import PostprocessConfig, PreprocessConfig  # noqa: E402
from ADMAnomalyLib.domains import load_domains  # noqa: E402
from ADMAnomalyLib.metrics import detection_metrics  # noqa: E402
from ADMAnomalyLib.postprocess import postprocess_scores, sheet_response  # noqa: E402
from ADMAnomalyLib.preprocess import prepare_case  # noqa: E402
from ADMAnomalyLib.study.methods import NATIVE_N4_LEVELS  # noqa: E402

FILTERS = {"med5": PostprocessConfig(median_size_mm=5.0), "med3": PostprocessConfig(median_size_mm=3.0)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--domains", type=Path, default=Path("benchmarks/domains.json"))
    parser.add_argument("--weights", default="0,0.5,1", help="comma-separated weights of the sheet response")
    parser.add_argument("--sigma", type=float, default=PostprocessConfig().sheet_sigma_mm,
                        help="scale of the sheets (Gaussian sigma, mm)")
    args = parser.parse_args()
    weights = [float(v) for v in args.weights.split(",")]
    for domain, cases in load_domains(args.domains).items():
        pooled: dict[tuple[float, str], list[np.ndarray]] = {}
        truth, seconds = [], []
        for files in cases:
            case = load_case(files)
            prepared = prepare_case(case, PreprocessConfig(native_bias_correction_levels=NATIVE_N4_LEVELS))
            brain, lesion = prepared.native_brain, prepared.native_lesion
            flair, spacing = prepared.native_zscored["flair"], case.images["flair"].GetSpacing()
            started = time.perf_counter()
            sheets = sheet_response(flair, brain, spacing, args.sigma)
            seconds.append(time.perf_counter() - started)
            for weight in weights:
                score = (flair - np.float32(weight) * sheets).astype(np.float32)
                for name, post in FILTERS.items():
                    pooled.setdefault((weight, name), []).append(postprocess_scores(score, brain, spacing, post)[brain])
            truth.append(lesion[brain])
        labels = np.concatenate(truth)
        print(f"== {domain}: {len(cases)} cases, sheet response {np.mean(seconds):.2f} s a case (whole grid)")
        for (weight, name), parts in pooled.items():
            metrics = detection_metrics(np.concatenate(parts), labels)
            print(f"{domain} | FLAIR z N4 - {weight:g} x sheets +{name} | AUPRC {metrics.auprc:.3f} | "
                  f"best Dice {metrics.best_f1:.3f}", flush=True)


if __name__ == "__main__":
    main()
