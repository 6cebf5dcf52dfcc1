"""Render the README picture of the Slicer case browser: a folder of real cases predicted with the
bundled model, one case loaded by the module's logic (``openFolder`` / ``nextCase``) and drawn by the
real MRML slice-view pipeline offscreen in three orientations (FLAIR, energy colour map, anomaly
outline and fill in cyan, reference label outline in yellow), above the case table the panel shows
(the results folder's ``cases.csv``). The Qt panel itself cannot be rendered without the Slicer
application; the table is drawn from the same rows.

    .venv/bin/python tools/make_case_browser_screenshot.py [--cases ../shared/data/brats18] [--count 3 | --names A B C]
        [--results DIR (kept; done cases are not predicted again)] [-o Screenshots/ADMAnomaly_case_browser.png]

The README picture: ``--names Brats18_CBICA_AMH_1 Brats18_CBICA_AOZ_1 Brats18_CBICA_APR_1``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "ADMAnomaly"), str(REPO)]

from ADMAnomalyCore import conversion  # noqa: E402
from ADMAnomalyCore.logic import ADMAnomalyCoreLogic  # noqa: E402
from ADMAnomalyCore.rendering import render_slice  # noqa: E402
from ADMAnomalyCore.standalone import StandaloneScene  # noqa: E402

COLUMNS = (("case", "case_id"), ("status", "status"), ("anomaly (mL)", "anomaly_ml"), ("components", "components"),
           ("largest (mL)", "largest_component_ml"), ("Dice", "dice"), ("AUPRC", "auprc"))


def cell(record, name: str) -> str:
    value = getattr(record, name)
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.3f}" if name in ("dice", "auprc") else f"{value:.1f}"
    return str(value)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cases", type=Path, default=REPO.parent / "shared" / "data" / "brats18")
    parser.add_argument("--count", type=int, default=3, help="the first N case folders (default 3)")
    parser.add_argument("--names", nargs="+", help="these case folders instead")
    parser.add_argument("--results", type=Path, help="results folder to keep (cases done there are not predicted again)")
    parser.add_argument("--case", type=int, default=1, help="which case of the folder to show (default: the second)")
    parser.add_argument("--size", type=int, default=420)
    parser.add_argument("-o", "--output", type=Path, default=REPO / "Screenshots" / "ADMAnomaly_case_browser.png")
    args = parser.parse_args()

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import slicer

    from ADMAnomalyLib import api

    with tempfile.TemporaryDirectory(prefix="ADMAnomaly-screenshot-") as work:
        cases = Path(work) / "cases"
        cases.mkdir()
        folders = ([args.cases / name for name in args.names] if args.names else
                   sorted(p for p in args.cases.iterdir() if p.is_dir() and not p.name.startswith("."))[: args.count])
        for folder in folders:
            (cases / folder.name).symlink_to(folder.resolve(), target_is_directory=True)
        results = args.results or Path(work) / "results"
        api.predict_folder(None, cases, results)  # resumable: cases done with this model are skipped

        mrml = StandaloneScene()
        logic = ADMAnomalyCoreLogic()
        rows = logic.openFolder(cases, results)
        for _ in range(args.case + 1):
            loaded = logic.nextCase()
        # The slice through the centre of the largest reference lesion (else of the anomaly).
        mask = logic.segmentArray(loaded.anomaly) > 0
        if loaded.reference is not None:
            labelmap = mrml.scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode")
            slicer.vtkSlicerSegmentationsModuleLogic.ExportVisibleSegmentsToLabelmapNode(
                loaded.reference, labelmap, loaded.volumes["flair"])
            label = slicer.util.arrayFromVolume(labelmap) > 0
            mrml.scene.RemoveNode(labelmap)
            mask = label if label.any() else mask
        k, j, i = (int(v) for v in np.argwhere(mask).mean(axis=0).round())
        ras = conversion.ijk_to_ras_array(loaded.energy) @ np.array([i, j, k, 1.0])
        views = []
        for orientation in ("Axial", "Coronal", "Sagittal"):
            views.append(render_slice(loaded.volumes["flair"], loaded.energy, loaded.anomaly, orientation=orientation,
                                      point=tuple(float(v) for v in ras[:3]), size=args.size))
        record = rows[loaded.index]
        logic.closeFolder()
        mrml.close()

    figure = plt.figure(figsize=(3 * args.size / 100, args.size / 100 + 1.9), dpi=100)
    grid = figure.add_gridspec(2, 3, height_ratios=[args.size, 150], hspace=0.1, wspace=0.02,
                               left=0.01, right=0.99, top=0.88, bottom=0.01)
    for column, (image, name) in enumerate(zip(views, ("axial", "coronal", "sagittal"))):
        axes = figure.add_subplot(grid[0, column])
        axes.imshow(image)
        axes.set_axis_off()
        axes.set_title(name, fontsize=10)
    figure.suptitle(f"Case browser: {record.case_id} ({loaded.index + 1}/{len(rows)}), stored results at threshold "
                    f"{record.threshold:.3g}\nenergy (colour map), Anomaly (cyan), reference label (yellow outline)",
                    fontsize=11)
    axes = figure.add_subplot(grid[1, :])
    axes.set_axis_off()
    table = axes.table(cellText=[[cell(r, name) for _, name in COLUMNS] for r in rows],
                       colLabels=[title for title, _ in COLUMNS], loc="center", cellLoc="center")
    table.auto_set_font_size(False)
    table.set_fontsize(9)
    table.scale(1.0, 1.3)
    for column in range(len(COLUMNS)):
        table[loaded.index + 1, column].set_facecolor("#cfe8ff")  # the loaded case, selected as in the panel
    args.output.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(args.output)
    print(f"{args.output}: {record.case_id}, slice ijk ({i}, {j}, {k})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
