"""The bundled model (or the TCGA fold's model of a leave-one-domain-out study) on the raw TCGA scans beside the
strong baseline on the same voxels.

``Testing/Python/test_raw.py`` checks that the raw path (series straight from the scanner, brain extraction and
registration by ``--preprocess auto``) finds the TCGA tumour; this prints its figures beside the strong baseline,
FLAIR z over the raw path's own brain mask + a 5 mm median (per axis, so 1 x 5 x 5 on the FLAIR's thick slices),
the same on the 2 mm slices the bundled model resamples them to, and raw FLAIR z, all on the raw path's brain
voxels, against the preprocessed scans' pseudo reference carried onto the raw FLAIR grid as the test carries it.

    python benchmarks/raw_tcga_baseline.py [-o OUT] [--study runs/lodo_s1n --seed 1] [--max-slice-mm 0]

Runs ``api.predict_folder(MODEL, RAW, OUT, preprocess="auto", write_preprocessed=True)`` (what
``admanomaly predict default RAW -o OUT --preprocess auto --write-preprocessed`` runs for the bundled model) unless
OUT already holds its outputs; about 75 s and 1.25 GiB on 2 cores. The bundled model's training pool holds this
patient's preprocessed scans; the TCGA fold's model (``--study``) has never seen this patient.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from pathlib import Path

import numpy as np
import SimpleITK as sitk

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from ADMAnomalyLib import api, rawprep  # noqa: E402
from ADMAnomalyLib.baselines import flair_zscore, strong_baseline_image  # noqa: E402
from ADMAnomalyLib.config import CONTRASTS  # noqa: E402
from ADMAnomalyLib.metrics import detection_metrics, label_metrics  # noqa: E402
from thick_slices import fold_models  # noqa: E402

TCGA = (REPO / ".." / "shared" / "data" / "tcga" / "TCGA-FG-6692").resolve()
REFERENCE_FILES = {"flair": "flair", "t1": "t1", "t1c": "t1ce", "t2": "t2", "label": "seg"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-o", "--out", type=Path, default=REPO / "runs" / "raw_tcga")
    parser.add_argument("--study", type=Path, help="predict with the TCGA fold's model of this leave-one-domain-out "
                                                   "study folder (benchmarks/thick_slices.py's fold_models) instead")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-slice-mm", type=float, help="the model's preprocess.max_slice_mm replaced by this")
    args = parser.parse_args(argv)
    raw_dir = TCGA / "raw"
    if not any(args.out.glob("*_energy.nii.gz")):
        model = fold_models(args.study, args.seed)["TCGA glioma"] if args.study else api.load_model()
        threshold = model.threshold
        if args.max_slice_mm is not None:
            model = api.with_postprocess(model, {"max_slice_mm": args.max_slice_mm})
        api.predict_folder(model, raw_dir, args.out, device="cpu", threshold=threshold, preprocess="auto",
                           write_preprocessed=True)
    energy = sitk.GetArrayFromImage(sitk.ReadImage(str(next(args.out.glob("*_energy.nii.gz")))))
    written_label = sitk.GetArrayFromImage(sitk.ReadImage(str(next(args.out.glob("*_anomaly.nii.gz"))))) > 0
    threshold = json.loads((args.out / "report.json").read_text(encoding="utf-8"))["threshold"]
    case_dir = next(args.out.rglob("*_flair.nii.gz")).parent
    flair_image = sitk.ReadImage(str(next(case_dir.glob("*_flair.nii.gz"))))
    brain = sitk.GetArrayFromImage(sitk.ReadImage(str(next(case_dir.glob("*_mask.nii.gz"))))) > 0

    raw_flair = rawprep.read_series(rawprep.find_series(raw_dir)["flair"])
    reference = {k: sitk.ReadImage(str(TCGA / "preprocessed" / f"TCGA-FG-6692_{n}.nii.gz"))
                 for k, n in REFERENCE_FILES.items()}
    reference_brain = functools.reduce(sitk.Or, [sitk.Cast(reference[c] != 0, sitk.sitkUInt8) for c in CONTRASTS])
    mapping = rawprep.map_skull_stripped(raw_flair, reference["flair"], reference_brain, affine=False)
    tumour = sitk.GetArrayFromImage(rawprep.resample_mask(reference["label"] > 0, raw_flair, mapping.transform)) > 0

    zscore = flair_zscore(np.stack([sitk.GetArrayFromImage(flair_image).astype(np.float32)] * len(CONTRASTS)), brain)
    model_name = "TCGA fold's model" if args.study else "bundled model"
    rows = {model_name: energy,
            "FLAIR z + 5 mm median (1 x 5 x 5 on the thick slices)": strong_baseline_image(flair_image, brain),
            "FLAIR z + 5 mm median on the 2 mm slices the model sees": strong_baseline_image(
                flair_image, brain, max_slice_mm=2.0),
            "FLAIR z": zscore}
    for name, score in rows.items():
        ranking = detection_metrics(score, tumour, brain)
        line = f"{name}: AUROC {ranking.auroc:.3f} AUPRC {ranking.auprc:.3f} best Dice {ranking.best_f1:.3f}"
        if name == model_name:  # the label predict wrote, at the model's threshold
            line += f", Dice at its threshold {label_metrics(written_label[brain], tumour[brain], threshold).dice:.3f}"
        print(line)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
