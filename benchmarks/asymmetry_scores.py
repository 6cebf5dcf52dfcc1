"""Left-right asymmetry of FLAIR as a lesion score, per domain, beside FLAIR z (no network).

A glioma sits in one hemisphere and an MS lesion rarely has an exact twin, so its FLAIR is brighter
than the tissue around its mirror image across the midline, while normal bright tissue (cortex,
periventricular caps) has a bright twin. This sweeps the weight and the window of the engine's
asymmetry term (``postprocess.asymmetry_weight`` / ``asymmetry_window_mm``,
:func:`ADMAnomalyLib.postprocess.intensity_asymmetry`) on every labelled case of a domains file (native
brain voxels z-scored as the study's baselines read them; pooled AUPRC and best Dice per domain,
after a 3-D median filter of ``--median`` mm):

    score = FLAIR z + w * max(FLAIR z - the brightest FLAIR z within a window around its mirror image, 0)

``--other t2`` adds rows with the same term of another contrast beside FLAIR's (weight 1, 5 mm window):
``FLAIR z + 1 A(FLAIR) + v A(T2)`` for each ``--other-weights`` v; a contrast bright in a lesion and
symmetric in normal tissue adds one-sided evidence where the FLAIR is poor.

    .venv/bin/python benchmarks/asymmetry_scores.py --domains benchmarks/domains.json
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ADMAnomalyLib.baselines import FLAIR_CHANNEL, features_to_volume  # noqa: E402
from ADMAnomalyLib.config import CONTRASTS  # noqa: E402
from ADMAnomalyLib.postprocess import intensity_asymmetry, median_filter_in_brain, median_window  # noqa: E402
from ADMAnomalyLib.study import runner  # noqa: E402
from ADMAnomalyLib.study.methods import quick_settings  # noqa: E402
from intensity_scores import print_pooled_table  # noqa: E402  (this folder's; same table)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--domains", default="benchmarks/domains.json")
    parser.add_argument("--median", default="3,5", help="comma-separated median filter widths (mm)")
    parser.add_argument("--windows", default="1,3,5", help="comma-separated mirror neighbourhoods (mm)")
    parser.add_argument("--weights", default="0.5,1", help="comma-separated weights w of the asymmetry term")
    parser.add_argument("--other", default="", help="comma-separated other contrasts whose asymmetry is added")
    parser.add_argument("--other-weights", default="0.5,1", help="comma-separated weights of the other contrasts' term")
    args = parser.parse_args()
    others = [c.strip().lower() for c in args.other.split(",") if c.strip()]
    unknown = [c for c in others if c not in CONTRASTS]
    if unknown:
        parser.error(f"--other: unknown contrasts {unknown}; expected some of {CONTRASTS}")
    other_weights = [float(v) for v in args.other_weights.split(",")]
    settings = quick_settings(split="domains", image_size=64, seeds=(0,), device="cpu")
    sizes = [float(v) for v in args.median.split(",")]
    windows = [float(v) for v in args.windows.split(",")]
    weights = [float(v) for v in args.weights.split(",")]
    pooled: dict[tuple[str, str], list[tuple[np.ndarray, np.ndarray]]] = {}

    def add(domain: str, name: str, volume: np.ndarray, case) -> None:
        for size in sizes:
            filtered = median_filter_in_brain(volume, case.brain, median_window(case.spacing, size))[case.brain]
            pooled.setdefault((domain, f"{name} +med{size:g}"), []).append((filtered, case.labels))

    for domain, files in runner.study_cases(None, args.domains, settings).items():
        for case_files in files:
            started = time.perf_counter()
            case = runner.load_case_data(case_files, settings, domain=domain)
            flair_z = features_to_volume(case.features[:, FLAIR_CHANNEL], case.brain)
            add(domain, "FLAIR z", flair_z, case)
            cache: dict = {}
            flair_terms = {window: intensity_asymmetry(flair_z, case.brain, case.spacing, window, case.direction, cache)
                           for window in set(windows) | ({5.0} if others else set())}
            for window in windows:
                for weight in weights:
                    add(domain, f"FLAIR z + {weight:g} asym ({window:g} mm)", flair_z + weight * flair_terms[window], case)
            if others:
                flair_term = flair_terms[5.0]
                for contrast in others:
                    other_z = features_to_volume(case.features[:, CONTRASTS.index(contrast)], case.brain)
                    other_term = intensity_asymmetry(other_z, case.brain, case.spacing, 5.0, case.direction, cache)
                    for weight in other_weights:
                        add(domain, f"FLAIR z + 1 asym + {weight:g} asym {contrast} (5 mm)",
                            flair_z + flair_term + weight * other_term, case)
            print(f"{domain} | {case.case_id}: {time.perf_counter() - started:.0f} s", flush=True)
    print_pooled_table(pooled)


if __name__ == "__main__":
    main()
