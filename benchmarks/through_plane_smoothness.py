"""How smooth each contrast is through the plane, per domain: the motivation of ``train.through_plane_mix``.

Every case goes through ``preprocess.prepare_case`` with the given size and normalisation (what the
networks see). Per case and contrast: the mean |difference| of adjacent axial slices over the mean
|difference| of adjacent pixels along a row, both inside the brain (brain in both slices / both pixels)
and over the brain slices that have a neighbour on each side; then the mean over the domain's cases.
A low ratio means the contrast varies little from slice to slice against its in-plane detail (thick
slices interpolated, or fine through-plane sampling).

    .venv/bin/python benchmarks/through_plane_smoothness.py [--domains benchmarks/domains.json]
        [--image-size 64] [--normalisation robust]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ADMAnomalyLib.cases import load_case  # noqa: E402
from ADMAnomalyLib.config import CONTRASTS, PreprocessConfig  # noqa: E402
from ADMAnomalyLib.domains import cohort_groups  # noqa: E402
from ADMAnomalyLib.preprocess import prepare_case  # noqa: E402


def through_over_in_plane(slices: np.ndarray, brain: np.ndarray, has_brain: np.ndarray) -> np.ndarray:
    """Per contrast (4,): mean |x[s+1] - x[s]| over mean |x[.., c+1] - x[.., c]|, inside the brain."""
    index = np.flatnonzero(has_brain)
    index = index[(index > 0) & (index < len(has_brain) - 1)]
    both_slices = brain[index] & brain[index + 1]
    both_pixels = brain[index][:, :, 1:] & brain[index][:, :, :-1]
    ratios = []
    for channel in range(slices.shape[1]):
        x = slices[:, channel]
        through = np.abs(x[index + 1] - x[index])[both_slices].mean()
        in_plane = np.abs(x[index][:, :, 1:] - x[index][:, :, :-1])[both_pixels].mean()
        ratios.append(through / in_plane)
    return np.array(ratios)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--domains", default=str(Path(__file__).resolve().parent / "domains.json"))
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--normalisation", default="robust")
    args = parser.parse_args()
    cfg = PreprocessConfig(image_size=args.image_size, normalisation=args.normalisation)
    print("| domain | cases | " + " | ".join(CONTRASTS) + " |\n|---|---|" + "---|" * len(CONTRASTS))
    for domain, files in cohort_groups(args.domains).items():
        rows = []
        for case_files in files:
            prepared = prepare_case(load_case(case_files, cfg.grid_tolerance), cfg, keep_native=())
            rows.append(through_over_in_plane(prepared.slices, prepared.brain, prepared.has_brain))
        rows = np.array(rows)
        print(f"| {domain} | {len(files)} | " + " | ".join(f"{v:.2f}" for v in rows.mean(axis=0)) + " |")


if __name__ == "__main__":
    main()
