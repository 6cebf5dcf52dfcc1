"""Where the FLAIR residual of a CtoC with and without the mirror image (``model.ctoc_mirror_context``)
separates lesion from normal tissue: per left-out domain, the networks a leave-one-domain-out study
kept, the sigma-scaled FLAIR residual (X - X_hat) / sigma_hat at network resolution in the lesion, in
normal brain, and at the lesion's mirror image (where a mirror-aware CtoC predicts the lesion back),
and the pooled AUPRC of that residual as a score.

    python benchmarks/mirror_residuals.py --study runs/domains_mirror --domains benchmarks/domains.json \
        --networks "ADM+ F,ADM+ F mir" --domain "BraTS-2013 gliomas"
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import average_precision_score

from ADMAnomalyLib.cases import load_case
from ADMAnomalyLib.config import CONTRASTS
from ADMAnomalyLib.domains import load_domains
from ADMAnomalyLib.infer import InferenceOptions, ctoc_translations
from ADMAnomalyLib.networks import scaled_difference
from ADMAnomalyLib.postprocess import mirror
from ADMAnomalyLib.preprocess import MIRROR_AXIS, prepare_case
from ADMAnomalyLib.study.methods import quick_settings
from ADMAnomalyLib.study.runner import load_cached_network


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--study", required=True, help="the study's output folder (its networks/ are read)")
    parser.add_argument("--domains", required=True)
    parser.add_argument("--networks", default="ADM+ F,ADM+ F mir")
    parser.add_argument("--domain", required=True, help="the left-out domain")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--image-size", type=int, default=64)
    args = parser.parse_args()
    domains = load_domains(args.domains)
    test = domains[args.domain]
    train_ids = sorted(f.case_id for name, files in domains.items() if name != args.domain for f in files)
    settings = quick_settings(split="domains", image_size=args.image_size, device="cpu")
    flair = CONTRASTS.index("flair")
    print(f"{'network':12s} {'case':20s} {'lesion mean':>11s} {'lesion med':>10s} {'normal p99':>10s} "
          f"{'normal>lesion med':>17s} {'mirror of lesion mean':>21s}")
    for name in args.networks.split(","):
        pooled_scores, pooled_labels = [], []
        model = load_cached_network(Path(args.study) / "networks", name, settings, args.seed, train_ids)
        for files in test:
            prepared = prepare_case(load_case(files), model.config.preprocess)
            index = np.flatnonzero(prepared.has_brain)
            translation = torch.from_numpy(ctoc_translations(model, prepared, InferenceOptions("cpu")))
            residual = scaled_difference(torch.from_numpy(prepared.slices[index]), translation)[:, flair].numpy()
            brain, lesion = prepared.brain[index], prepared.label[index]
            normal = brain & ~lesion
            across = mirror(lesion, MIRROR_AXIS, prepared.midline_shift) & normal
            median = float(np.median(residual[lesion]))
            print(f"{name:12s} {files.case_id:20s} {residual[lesion].mean():11.2f} {median:10.2f} "
                  f"{np.percentile(residual[normal], 99):10.2f} {(residual[normal] > median).mean():17.4f} "
                  f"{residual[across].mean() if across.any() else float('nan'):21.2f}")
            pooled_scores.append(residual[brain])
            pooled_labels.append(lesion[brain])
        print(f"{name:12s} pooled AUPRC of the FLAIR residual at network resolution: "
              f"{average_precision_score(np.concatenate(pooled_labels), np.concatenate(pooled_scores)):.3f}")


if __name__ == "__main__":
    main()
