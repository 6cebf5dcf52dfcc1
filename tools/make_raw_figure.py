"""Picture of the raw-case result for docs/: raw FLAIR slices (the scanner's 5.5 mm grid) with the brain
mask outline, the anomaly energy overlay, the anomaly map and the pseudo reference mapped onto the raw grid.

    admanomaly predict default ../shared/data/tcga/TCGA-FG-6692/raw -o runs/raw_out --preprocess auto --write-preprocessed
    python tools/make_raw_figure.py runs/raw_out [--case ../shared/data/tcga/TCGA-FG-6692] [-o docs/figures/raw_overlay.png]
"""

from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path

import numpy as np
import SimpleITK as sitk

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ADMAnomalyLib import rawprep  # noqa: E402
from ADMAnomalyLib.config import CONTRASTS  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("results", type=Path, help="predict output folder of the raw case")
    parser.add_argument("--case", type=Path, default=Path("../shared/data/tcga/TCGA-FG-6692"))
    parser.add_argument("--case-id", default="raw")
    parser.add_argument("-o", "--output", type=Path, default=Path("docs/figures/raw_overlay.png"))
    args = parser.parse_args()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    flair_image = rawprep.read_series(rawprep.find_series(args.case / "raw")["flair"])
    energy = sitk.GetArrayFromImage(sitk.ReadImage(str(args.results / f"{args.case_id}_energy.nii.gz")))
    anomaly = sitk.GetArrayFromImage(sitk.ReadImage(str(args.results / f"{args.case_id}_anomaly.nii.gz"))) > 0
    mask_path = args.results / f"{args.case_id}_preprocessed" / f"{args.case_id}_mask.nii.gz"
    brain = sitk.GetArrayFromImage(sitk.ReadImage(str(mask_path))) > 0
    pre = args.case / "preprocessed"
    names = {"flair": "flair", "t1": "t1", "t1c": "t1ce", "t2": "t2"}
    pre_images = {c: sitk.ReadImage(str(next(pre.glob(f"*_{n}.nii.gz")))) for c, n in names.items()}
    pre_brain = functools.reduce(sitk.Or, [sitk.Cast(pre_images[c] != 0, sitk.sitkUInt8) for c in CONTRASTS])
    mapping = rawprep.map_skull_stripped(flair_image, pre_images["flair"], pre_brain)
    label = sitk.ReadImage(str(next(pre.glob("*_seg.nii.gz"))))
    tumour = sitk.GetArrayFromImage(rawprep.resample_mask(label > 0, flair_image, mapping.transform)) > 0

    flair = sitk.GetArrayFromImage(flair_image).astype(np.float32)
    per_slice = tumour.sum(axis=(1, 2))
    centre = int(np.argmax(per_slice))
    picks = [k for k in (centre - 3, centre, centre + 3) if 0 <= k < flair.shape[0]]
    inside = energy[brain]
    low, high = np.percentile(inside, [50, 99.5])
    fig, axes = plt.subplots(2, len(picks), figsize=(4.2 * len(picks), 8.6))
    for column, k in enumerate(picks):
        top, bottom = axes[0, column], axes[1, column]
        for ax in (top, bottom):
            ax.imshow(flair[k], cmap="gray", vmin=0, vmax=np.percentile(flair, 99.5))
            ax.axis("off")
        shown = np.ma.masked_where(~brain[k] | (energy[k] < low), energy[k])
        top.imshow(shown, cmap="inferno", vmin=low, vmax=high, alpha=0.75)
        top.contour(brain[k], levels=[0.5], colors="deepskyblue", linewidths=0.8)
        top.set_title(f"slice {k + 1}/{flair.shape[0]}: energy, brain mask (blue)", fontsize=9)
        bottom.contour(anomaly[k], levels=[0.5], colors="yellow", linewidths=1.0)
        bottom.contour(tumour[k], levels=[0.5], colors="lime", linewidths=1.0, linestyles="dashed")
        bottom.set_title("anomaly map (yellow), pseudo reference (green, dashed)", fontsize=9)
    fig.suptitle("TCGA-FG-6692 raw scans, 0.9x0.9x5.5 mm FLAIR grid: registered to FLAIR, deepbet brain, bundled model",
                 fontsize=10)
    fig.tight_layout()
    args.output.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.output, dpi=72)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
