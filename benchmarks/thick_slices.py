"""Thick slices made from the study's 1 mm cases: each case's FLAIR, T1, T1c and T2 averaged over blocks of axial
slices (as a scanner's thick slices integrate the tissue they span), predicted as they are (``preprocess.max_slice_mm``
0) and resampled by the engine (2 mm, the bundled setting), each with its model's threshold, beside the strong
baseline (FLAIR z + a median of 5 mm and of 3 mm per axis) computed both ways on the same voxels; per domain and
pooled, against the reference averaged the same way (a thick voxel is lesion where most of it is).

    python benchmarks/thick_slices.py [--thickness 5] [--json runs/thick.json]
    python benchmarks/thick_slices.py --study runs/lodo_s1n --seed 1 [--row ROW]      # leave-one-domain-out
    python benchmarks/thick_slices.py ... --set postprocess.small_lesion_load=thin   # other post-processing

By default every case is predicted by the bundled model, whose training pool holds these cases: the figures compare
the ways of feeding thick slices, not generalisation. With ``--study`` each left-out domain's cases are predicted by
that fold's model of the study folder (its kept network with the post-processing, load weight and threshold the fold
chose for the bundled row, or for ``--row``, and the label's small-region rule), as ``predict`` would run it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from ADMAnomalyLib import api  # noqa: E402
from ADMAnomalyLib.baselines import strong_baseline_image  # noqa: E402
from ADMAnomalyLib.cases import load_case  # noqa: E402
from ADMAnomalyLib.config import CONTRASTS, PostprocessConfig  # noqa: E402
from ADMAnomalyLib.domains import load_domains  # noqa: E402
from ADMAnomalyLib.metrics import pooled_and_per_case  # noqa: E402
from ADMAnomalyLib.model import ADMModel  # noqa: E402
from ADMAnomalyLib.study.methods import BUNDLED_METHOD, METHODS, StudySettings, intensity_preprocess  # noqa: E402
from ADMAnomalyLib.study.runner import load_cached_network  # noqa: E402


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


def fold_models(run_dir: Path, seed: int, row: str = BUNDLED_METHOD) -> dict[str, ADMModel]:
    """Each left-out domain's model of the study folder ``run_dir`` for ``row``: the fold's kept network with the
    native preparation, post-processing and threshold the fold chose, as a model ``predict`` runs."""
    study = json.loads((run_dir / "study.json").read_text())
    settings = StudySettings.from_dict(study["settings"])
    spec = METHODS[row]
    models = {}
    for run in (r for r in study["runs"] if r["seed"] == seed):
        network = load_cached_network(run_dir / "networks", spec.network, settings, seed, run["train"])
        chosen = run["methods"][row]
        post = PostprocessConfig(**{**chosen["postprocess"], "min_component_mm3": settings.min_component_mm3})
        config = dataclasses.replace(network.config, preprocess=intensity_preprocess(spec, settings), postprocess=post)
        models[run["domain"]] = ADMModel(config, network.network, network.gmm, chosen["threshold"],
                                         network.metadata, network.path)
    return models


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--domains", type=Path, default=REPO / "benchmarks" / "domains.json")
    parser.add_argument("--thickness", type=int, default=5, help="slices of 1 mm per thick slice")
    parser.add_argument("--study", type=Path, help="a leave-one-domain-out study folder (study.json, networks/)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--row", default=BUNDLED_METHOD, help="with --study: the study row whose fold models predict")
    parser.add_argument("--model", help="without --study: the model file that predicts every case (default: bundled)")
    parser.add_argument("--set", action="append", default=[], metavar="postprocess.FIELD=VALUE",
                        help="post-processing every model runs with, its threshold kept (e.g. "
                             "postprocess.small_lesion_load=thin: on 1 mm scans the fold models score as they did)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    settings = api.parse_settings(args.set)
    if set(settings) - {"postprocess"}:
        parser.error("--set takes postprocess.FIELD=VALUE only")
    domains = load_domains(args.domains)
    models = (fold_models(args.study, args.seed, args.row) if args.study
              else {d: api.load_model(args.model) for d in domains})
    overrides = settings.get("postprocess", {})
    models = {d: dataclasses.replace(api.with_postprocess(m, overrides), threshold=m.threshold)
              for d, m in models.items()}
    feedings = {"as they are": 0.0, "resampled to 2 mm": 2.0}
    entries: dict[str, dict[str, list]] = {}
    seconds: dict[str, float] = {}
    for domain, cases in domains.items():
        for files in cases:
            case = load_case(files)
            images = {c: thick(case.images[c], args.thickness) for c in CONTRASTS}
            label = sitk.GetArrayFromImage(thick(sitk.Cast(case.label != 0, sitk.sitkFloat32), args.thickness)) > 0.5
            brain = None
            for feeding, max_slice_mm in feedings.items():
                model = api.with_postprocess(models[domain], {"max_slice_mm": max_slice_mm})
                started = time.perf_counter()
                prediction = api.predict(model, images, device="cpu")
                seconds[feeding] = seconds.get(feeding, 0.0) + time.perf_counter() - started
                brain = sitk.GetArrayFromImage(prediction.brain_mask) > 0
                written = sitk.GetArrayFromImage(prediction.anomaly(models[domain].threshold))[brain] > 0
                entries.setdefault(f"ADM, {feeding}", {}).setdefault(domain, []).append(
                    (files.case_id, sitk.GetArrayFromImage(prediction.energy)[brain], label[brain],
                     models[domain].threshold, written))
            for median_mm in (5.0, 3.0):
                for feeding, max_slice_mm in feedings.items():
                    score = strong_baseline_image(images["flair"], brain, median_mm, max_slice_mm)
                    entries.setdefault(f"FLAIR z + {median_mm:g} mm median, {feeding}", {}).setdefault(
                        domain, []).append((files.case_id, score[brain], label[brain], None, None))
            print(f"{domain} {files.case_id} done", flush=True)
    out = {"thickness_mm": args.thickness, "models": str(args.study or args.model or "bundled"), "seed": args.seed,
           **({"row": args.row} if args.study else {}), **({"set": args.set} if args.set else {}),
           "seconds": seconds, "rows": {}}
    names = list(domains)
    predictor = f"fold models of {args.study}" if args.study else (args.model or "bundled model")
    print(f"\n{args.thickness} mm slices, {predictor}; "
          "AUPRC / AUROC / best Dice / Dice at the model's threshold (ADM rows)")
    print("| row | " + " | ".join(names) + " | all |")
    for name, per_domain in entries.items():
        cells, row = [], {}
        for domain, items in [(d, per_domain[d]) for d in names] + [("all", [e for d in names for e in per_domain[d]])]:
            if args.study and domain == "all" and name.startswith("ADM"):
                cells.append("–")  # the folds' scores are on their own scales, and their thresholds differ
                continue
            threshold = items[0][3]
            result = pooled_and_per_case([(i[0], i[1], i[2], None, i[4]) for i in items], threshold)
            pooled = result["pooled"]
            dice = result["at_threshold"]["dice"] if threshold is not None else None
            row[domain] = {**pooled, "dice": dice}
            cells.append(f"{pooled['auprc']:.3f} / {pooled['auroc']:.3f} / {pooled['best_f1']:.3f}"
                         + (f" / {dice:.3f}" if dice is not None else ""))
        out["rows"][name] = row
        print(f"| {name} | " + " | ".join(cells) + " |")
    print("seconds of prediction:", {k: round(v, 1) for k, v in seconds.items()})
    if args.json:
        args.json.write_text(json.dumps(out, indent=2, default=float))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
