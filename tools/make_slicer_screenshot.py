"""Render the README screenshot of the Slicer module: the bundled model on the bundled demo case,
energy map (colour, foreground) and the Anomaly segmentation (outline + fill) over FLAIR, drawn by
the real MRML slice-view pipeline offscreen (PyPI slicer-core; no Slicer application needed).

    .venv/bin/python tools/make_slicer_screenshot.py [-o Screenshots/ADMAnomaly_overlay.png]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "ADMAnomaly"), str(REPO)]

from ADMAnomalyCore import conversion  # noqa: E402
from ADMAnomalyCore.logic import ADMAnomalyCoreLogic  # noqa: E402
from ADMAnomalyCore.rendering import render_slice  # noqa: E402
from ADMAnomalyCore.standalone import StandaloneScene  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("-o", "--output", type=Path, default=REPO / "Screenshots" / "ADMAnomaly_overlay.png")
    parser.add_argument("--size", type=int, default=512)
    args = parser.parse_args()
    case_dir = REPO / "Resources" / "DemoData" / "patient26"
    mrml = StandaloneScene()
    nodes = [mrml.load(case_dir / f"patient26_{suffix}.nii.gz") for suffix in ("flair", "t1", "t1ce", "t2")]
    logic = ADMAnomalyCoreLogic()
    energy, anomaly = logic.run(*nodes, device="auto", show=False)
    segment = logic.segmentArray(anomaly)
    # The axial slice with the most reference lesion (the case's expert segmentation).
    import slicer

    lesion = slicer.util.arrayFromVolume(mrml.load(case_dir / "patient26_seg.nii.gz", labelmap=True)) > 0
    k = int(np.argmax(lesion.sum(axis=(1, 2))))
    j, i = (int(v) for v in np.argwhere(lesion[k]).mean(axis=0).round())
    ras = conversion.ijk_to_ras_array(energy) @ np.array([i, j, k, 1.0])
    args.output.parent.mkdir(parents=True, exist_ok=True)
    render_slice(nodes[0], energy, anomaly, offset=float(ras[2]), size=args.size, png_path=args.output)
    print(f"{args.output}: slice k={k}, {segment.sum()} anomaly voxels, {lesion.sum()} reference lesion voxels")
    return 0


if __name__ == "__main__":
    sys.exit(main())
