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
from ADMAnomalyLib.gmm import GMMAccumulator, energy  # noqa: E402
from ADMAnomalyLib.infer import InferenceOptions, brain_features, ctoc_runner, energy_slices  # noqa: E402
from ADMAnomalyLib.model import ADMModel  # noqa: E402
from ADMAnomalyLib.preprocess import prepare_case  # noqa: E402
from ADMAnomalyLib.study.methods import network_config, quick_settings  # noqa: E402
from ADMAnomalyLib.study.runner import network_cache_path  # noqa: E402

OPTIONS = InferenceOptions("cpu", precision="fp32")


def brain_slices(model, files):
    prepared = prepare_case(load_case(files), model.config.preprocess, keep_native=())
    index = np.flatnonzero(prepared.has_brain)
    label = prepared.label[index] if prepared.label is not None else np.zeros_like(prepared.brain[index])
    return prepared.slices[index], prepared.brain[index], label, prepared.has_lesion[index]


def features_of(model, slices, brain):
    with torch.inference_mode():
        x, b = torch.from_numpy(slices), torch.from_numpy(brain)
        return brain_features(model.network.eval(), ctoc_runner(model), x, b, None).double()


def robust_stats(features):
    q25, median, q75 = torch.quantile(features.float(), torch.tensor([0.25, 0.5, 0.75]), dim=0).double()
    return median, (q75 - q25).clamp_min(1e-6)


def mixture_over(model, feature_sets):
    accumulator = GMMAccumulator(model.config.model.n_components, model.config.model.feature_dim)
    with torch.inference_mode():
        for z in feature_sets:
            accumulator.update(z.float(), model.network.estimator.eval()(z.float()))
    return accumulator.finalize(model.config.model.eps)


def far_from_lesion(has_lesion, margin):
    near = np.zeros(len(has_lesion), bool)
    for s in np.flatnonzero(has_lesion):
        near[max(0, s - margin): s + margin + 1] = True
    return ~near


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
    settings = quick_settings(image_size=study["settings"]["image_size"])
    cutoffs = [float(c) for c in args.cutoffs.split(",")]
    for run in (r for r in study["runs"] if r["seed"] == args.seed):
        config = network_config(args.network, settings, args.seed)
        model = ADMModel.load(network_cache_path(args.run / "networks", args.network, config, run["train"]))
        start = time.perf_counter()
        reference = None
        if args.aligned:
            training = []
            for case_id in run["train"]:
                slices, brain, _, has_lesion = brain_slices(model, files[case_id])
                keep = far_from_lesion(has_lesion, settings.lesion_margin)
                training.append((features_of(model, slices, brain), features_of(model, slices[keep], brain[keep])))
            reference = robust_stats(torch.cat([normal for _, normal in training]))
            aligned_mixture = mixture_over(model, [(normal - robust_stats(whole)[0]) / robust_stats(whole)[1]
                                                   * reference[1] + reference[0] for whole, normal in training])
        scores: dict[str, list[np.ndarray]] = {}
        labels = []
        for case_id in run["test"]:
            slices, brain, label, _ = brain_slices(model, files[case_id])
            labels.append(label[brain])
            variants = {"frozen": energy_slices(model, slices, brain, OPTIONS)[brain]}
            if reference is not None:
                z = features_of(model, slices, brain)
                median, iqr = robust_stats(z)
                with torch.inference_mode():
                    variants["aligned"] = energy(((z - median) / iqr * reference[1] + reference[0]).float(),
                                                 aligned_mixture).numpy()
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
