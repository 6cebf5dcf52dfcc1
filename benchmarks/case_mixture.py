"""What re-estimating the mixture per case does to the raw energy off site (``postprocess.case_mixture``).

For every fold of a leave-one-domain-out study run, the fold's cached network (``NAME`` trained on the
other domains, found with the study's own cache key) scores the left-out domain's cases at network
resolution (every brain slice, every brain pixel, one pass, no post-processing) through
``infer.energy_slices``:

- ``frozen``: the paper's mixture, frozen over the normal training pixels;
- ``aligned``: the frozen mixture, each case's density features first moved and scaled per dimension
  so that their median and IQR over its brain match those of the training pixels (a per-case feature
  alignment; the training cases aligned the same way before the mixture is re-fitted on them);
- ``case <= t``: the case's own mixture over its pixels with network-input FLAIR z <= t
  (``postprocess.normal_max_flair_z``; the product's default is 1);
- ``FLAIR``: the network-input FLAIR itself.

Prints AUROC and AUPRC per left-out domain (pixels pooled over its cases). These are network-resolution
feature figures, not the study's native-grid ones; the study rows ``ADM cm`` / ``ADM+ F cm`` are those.

    .venv/bin/python benchmarks/case_mixture.py runs/domains_cm --network "ADM+ F" --seed 0 \
        [--cutoffs 0.5,1,1.5,2] [--aligned]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from sklearn.metrics import average_precision_score, roc_auc_score  # noqa: E402

from ADMAnomalyLib.cases import load_case  # noqa: E402
from ADMAnomalyLib.config import CONTRASTS  # noqa: E402
from ADMAnomalyLib.domains import load_domains  # noqa: E402
from ADMAnomalyLib.data import lesion_free_slices  # noqa: E402
from ADMAnomalyLib.gmm import energy  # noqa: E402
from ADMAnomalyLib.infer import (InferenceOptions, brain_features, ctoc_runner, energy_slices,  # noqa: E402
                                 mixture_of)
from ADMAnomalyLib.preprocess import prepare_case  # noqa: E402
from ADMAnomalyLib.study.methods import StudySettings  # noqa: E402
from ADMAnomalyLib.study.runner import load_cached_network  # noqa: E402

OPTIONS = InferenceOptions("cpu", precision="fp32")


def prepared_brain_slices(model, files):
    """The case prepared as the model was trained, and its brain slices, masks and labels."""
    prepared = prepare_case(load_case(files), model.config.preprocess, keep_native=())
    index = np.flatnonzero(prepared.has_brain)
    label = prepared.label[index] if prepared.label is not None else np.zeros_like(prepared.brain[index])
    return prepared, prepared.slices[index], prepared.brain[index], label


def features_of(model, slices, brain):
    with torch.inference_mode():
        x, b = torch.from_numpy(np.ascontiguousarray(slices)), torch.from_numpy(np.ascontiguousarray(brain))
        return brain_features(model.network.eval(), ctoc_runner(model), x, b, None).float()


def robust_stats(features):
    # numpy, not torch.quantile, which refuses more than 2^24 values (a 128 px training pool has more)
    q25, median, q75 = torch.from_numpy(np.percentile(features.numpy(), [25, 50, 75], axis=0).astype(np.float32))
    return median, (q75 - q25).clamp_min(1e-6)


def aligned(features, case_stats, reference):
    """``features`` moved and scaled per dimension from the case's median / IQR to the reference's."""
    (median, iqr), (ref_median, ref_iqr) = case_stats, reference
    return (features - median) / iqr * ref_iqr + ref_median


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path, help="a leave-one-domain-out study folder (study.json, networks/)")
    parser.add_argument("--network", default="ADM+ F")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cutoffs", default="0.5,1,1.5,2")
    parser.add_argument("--aligned", action="store_true", help="also the per-case feature alignment (slower)")
    args = parser.parse_args()
    study = json.loads((args.run / "study.json").read_text())
    files = {f.case_id: f for cases in load_domains(study["domains_file"]).values() for f in cases}
    settings = StudySettings.from_dict(study["settings"])
    cutoffs = [float(c) for c in args.cutoffs.split(",")]
    for run in (r for r in study["runs"] if r["seed"] == args.seed):
        model = load_cached_network(args.run / "networks", args.network, settings, args.seed, run["train"])
        start = time.perf_counter()
        reference = None
        if args.aligned:
            whole, normal = [], []  # per training case: all brain pixels, and those of its training slices
            for case_id in run["train"]:
                prepared, *_ = prepared_brain_slices(model, files[case_id])
                keep = lesion_free_slices(prepared, settings.lesion_margin)
                brain_index = np.flatnonzero(prepared.has_brain)
                whole.append(features_of(model, prepared.slices[brain_index], prepared.brain[brain_index]))
                normal.append(features_of(model, prepared.slices[keep], prepared.brain[keep]))
            reference = robust_stats(torch.cat(normal))
            aligned_mixture = mixture_of(model, torch.cat([aligned(n, robust_stats(w), reference)
                                                           for w, n in zip(whole, normal)]))
        scores: dict[str, list[np.ndarray]] = {}
        labels = []
        for case_id in run["test"]:
            _, slices, brain, label = prepared_brain_slices(model, files[case_id])
            labels.append(label[brain])
            variants = {"frozen": energy_slices(model, slices, brain, OPTIONS)[brain]}
            if reference is not None:
                z = features_of(model, slices, brain)
                with torch.inference_mode():
                    variants["aligned"] = energy(aligned(z, robust_stats(z), reference), aligned_mixture).numpy()
            for cutoff in cutoffs:
                model.config.postprocess = dataclasses.replace(model.config.postprocess, normal_max_flair_z=cutoff)
                variants[f"case <= {cutoff:g}"] = energy_slices(model, slices, brain, OPTIONS, case_mixture=True)[brain]
            variants["FLAIR"] = slices[:, CONTRASTS.index("flair")][brain]
            for name, values in variants.items():
                scores.setdefault(name, []).append(values)
        y = np.concatenate(labels)
        figures = {name: (roc_auc_score(y, np.concatenate(v)), average_precision_score(y, np.concatenate(v)))
                   for name, v in scores.items()}
        print(f"{run['domain']} ({time.perf_counter() - start:.0f} s): "
              + " | ".join(f"{name} {auroc:.3f} / {auprc:.3f}" for name, (auroc, auprc) in figures.items()),
              flush=True)


if __name__ == "__main__":
    main()
