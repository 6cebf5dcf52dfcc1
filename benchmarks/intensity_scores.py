"""Label-free intensity scores that use the other contrasts, per domain, beside FLAIR z (no network).

Two questions about the FLAIR term of the post-processing, on every labelled case of a domains file
(native brain voxels, z-scored as the study's baselines read them; pooled AUPRC and best Dice per
domain, after a 3-D median filter of ``--median`` voxels):

- **FLAIR predicted from the other contrasts of the case itself.** A CtoC fitted per case cannot be
  off-site. ``fit X on Y`` is the FLAIR residual of a gradient-boosted median regression of FLAIR on
  the contrasts X, fitted on the case's own brain voxels (``all``) or on its FLAIR-normal ones (FLAIR
  z <= 1, the case mixture's normal-looking tissue), in units of its MAD.
- **Fixed combinations with T2**, which carries the lesion in some sites' older FLAIR.

    .venv/bin/python benchmarks/intensity_scores.py --domains benchmarks/domains.json
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
from sklearn.ensemble import HistGradientBoostingRegressor

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ADMAnomalyLib.baselines import features_to_volume  # noqa: E402
from ADMAnomalyLib.config import CONTRASTS  # noqa: E402
from ADMAnomalyLib.metrics import detection_metrics  # noqa: E402
from ADMAnomalyLib.postprocess import median_filter_in_brain  # noqa: E402
from ADMAnomalyLib.study import runner  # noqa: E402
from ADMAnomalyLib.study.methods import quick_settings  # noqa: E402

FLAIR, T1, T1C, T2 = (CONTRASTS.index(c) for c in ("flair", "t1", "t1c", "t2"))
FITS = {"fit t1 on all": ([T1], None), "fit t1,t1c,t2 on all": ([T1, T1C, T2], None),
        "fit t2 on FLAIR z<=1": ([T2], 1.0), "fit t1,t1c,t2 on FLAIR z<=1": ([T1, T1C, T2], 1.0)}
COMBINATIONS = {"FLAIR z": lambda x: x[:, FLAIR],
                "FLAIR + 0.5 T2": lambda x: x[:, FLAIR] + 0.5 * x[:, T2],
                "min(FLAIR, T2)": lambda x: np.minimum(x[:, FLAIR], x[:, T2]),
                "FLAIR + min(FLAIR, T2)": lambda x: x[:, FLAIR] + np.minimum(x[:, FLAIR], x[:, T2])}
FIT_VOXELS = 200_000


def fitted_residual(features: np.ndarray, columns: list[int], normal_max_flair_z: float | None,
                    rng: np.random.Generator) -> np.ndarray:
    """FLAIR minus its median regression on ``columns``, fitted on (a sample of) the case's voxels."""
    pool = (np.arange(len(features)) if normal_max_flair_z is None
            else np.flatnonzero(features[:, FLAIR] <= normal_max_flair_z))
    sample = rng.choice(pool, min(pool.size, FIT_VOXELS), replace=False)
    regression = HistGradientBoostingRegressor(loss="absolute_error", max_iter=100, random_state=0)
    regression.fit(features[sample][:, columns], features[sample, FLAIR])
    residual = features[:, FLAIR] - regression.predict(features[:, columns])
    spread = 1.4826 * float(np.median(np.abs(residual - np.median(residual))))
    return (residual / (spread or 1.0)).astype(np.float32)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--domains", default="benchmarks/domains.json")
    parser.add_argument("--median", default="3,5", help="comma-separated median filter sizes (voxels)")
    args = parser.parse_args()
    settings = quick_settings(split="domains", image_size=64, seeds=(0,), device="cpu")
    sizes = [int(v) for v in args.median.split(",")]
    pooled: dict[tuple[str, str], list[tuple[np.ndarray, np.ndarray]]] = {}
    for domain, files in runner.study_cases(None, args.domains, settings).items():
        for case_files in files:
            started = time.perf_counter()
            case = runner.load_case_data(case_files, settings, domain=domain)
            rng = np.random.default_rng(0)
            scores = {name: make(case.features).astype(np.float32) for name, make in COMBINATIONS.items()}
            scores.update({name: fitted_residual(case.features, columns, cutoff, rng)
                           for name, (columns, cutoff) in FITS.items()})
            for name, score in scores.items():
                volume = features_to_volume(score, case.brain)
                for size in sizes:
                    filtered = median_filter_in_brain(volume, case.brain, size)[case.brain]
                    pooled.setdefault((domain, f"{name} +med{size}"), []).append((filtered, case.labels))
            print(f"{domain} | {case.case_id}: {time.perf_counter() - started:.0f} s", flush=True)
    print_pooled_table(pooled)


def print_pooled_table(pooled: dict[tuple[str, str], list[tuple[np.ndarray, np.ndarray]]]) -> None:
    """A markdown table of pooled AUPRC and best Dice per (domain, score) from its cases' (scores, labels)."""
    print("| domain | score | AUPRC | best Dice |\n|---|---|---|---|")
    for (domain, name), parts in pooled.items():
        metrics = detection_metrics(np.concatenate([s for s, _ in parts]), np.concatenate([y for _, y in parts]))
        print(f"| {domain} | {name} | {metrics.auprc:.3f} | {metrics.best_f1:.3f} |")


if __name__ == "__main__":
    main()
