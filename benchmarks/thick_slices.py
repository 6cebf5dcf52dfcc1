"""Thick slices made from the study's 1 mm cases: the bundled model on each case's FLAIR, T1, T1c and T2 averaged
over blocks of axial slices (as a scanner's thick slices integrate the tissue they span), fed as they are
(``preprocess.max_slice_mm`` 0) and resampled by the engine (the bundled model's own setting), with the model's
threshold; per domain and pooled, against the reference averaged the same way (a thick voxel is lesion where
most of it is), inside each case's brain.

    python benchmarks/thick_slices.py [--domains benchmarks/domains.json] [--thickness 5] [--json runs/thick.json]

Every case of these domains is in the bundled model's training pool (its normal slices), so these figures
compare the two ways of feeding thick slices, not the model's generalisation (the leave-domain-out study's).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from ADMAnomalyLib import api  # noqa: E402
from ADMAnomalyLib.cases import load_case  # noqa: E402
from ADMAnomalyLib.config import CONTRASTS  # noqa: E402
from ADMAnomalyLib.domains import load_domains  # noqa: E402
from ADMAnomalyLib.metrics import pooled_and_per_case  # noqa: E402


def thick(image: sitk.Image, slices: int) -> sitk.Image:
    """``image`` averaged over blocks of ``slices`` slices along its third axis (the last partial block
    dropped), on a grid whose voxel centres lie at the blocks' centres."""
    array = sitk.GetArrayFromImage(image).astype(np.float32)
    n = array.shape[0] // slices
    blocks = array[: n * slices].reshape(n, slices, *array.shape[1:]).mean(axis=1)
    out = sitk.GetImageFromArray(blocks)
    spacing = image.GetSpacing()
    out.SetSpacing((spacing[0], spacing[1], spacing[2] * slices))
    out.SetDirection(image.GetDirection())
    direction = np.asarray(image.GetDirection()).reshape(3, 3)
    out.SetOrigin(tuple(np.asarray(image.GetOrigin()) + direction[:, 2] * spacing[2] * (slices - 1) / 2))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--domains", type=Path, default=REPO / "benchmarks" / "domains.json")
    parser.add_argument("--thickness", type=int, default=5, help="slices of 1 mm per thick slice")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    bundled = api.load_model()
    models = {"as they are (max_slice_mm 0)": api.with_postprocess(bundled, {"max_slice_mm": 0.0}),
              f"resampled (max_slice_mm {bundled.config.preprocess.max_slice_mm:g}, bundled)": bundled}
    entries: dict[str, dict[str, list]] = {name: {} for name in models}
    seconds = {name: 0.0 for name in models}
    for domain, cases in load_domains(args.domains).items():
        for files in cases:
            case = load_case(files)
            images = {c: thick(case.images[c], args.thickness) for c in CONTRASTS}
            label = sitk.GetArrayFromImage(thick(sitk.Cast(case.label != 0, sitk.sitkFloat32), args.thickness)) > 0.5
            for name, model in models.items():
                started = time.perf_counter()
                prediction = api.predict(model, images, device="cpu")
                seconds[name] += time.perf_counter() - started
                brain = sitk.GetArrayFromImage(prediction.brain_mask) > 0
                energy = sitk.GetArrayFromImage(prediction.energy)[brain]
                written = sitk.GetArrayFromImage(prediction.anomaly(bundled.threshold))[brain] > 0
                entries[name].setdefault(domain, []).append((files.case_id, energy, label[brain], None, written))
            print(f"{domain} {files.case_id} done", flush=True)
    out = {"thickness_mm": args.thickness, "threshold": bundled.threshold, "seconds": seconds, "rows": {}}
    print(f"\n{args.thickness} mm slices, bundled model, its threshold {bundled.threshold:.3f}; "
          "AUPRC / AUROC / best Dice / Dice at threshold")
    print("| feeding | " + " | ".join(entries[next(iter(entries))]) + " | all |")
    for name, per_domain in entries.items():
        cells, row = [], {}
        for domain, items in list(per_domain.items()) + [("all", [e for v in per_domain.values() for e in v])]:
            result = pooled_and_per_case(items, bundled.threshold)
            pooled, dice = result["pooled"], result["at_threshold"]["dice"]
            row[domain] = {**pooled, "dice": dice}
            cells.append(f"{pooled['auprc']:.3f} / {pooled['auroc']:.3f} / {pooled['best_f1']:.3f} / {dice:.3f}")
        out["rows"][name] = row
        print(f"| {name} | " + " | ".join(cells) + " |")
    print("seconds:", {k: round(v, 1) for k, v in seconds.items()})
    if args.json:
        args.json.write_text(json.dumps(out, indent=2, default=float))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
