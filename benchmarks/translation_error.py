"""How well each fold's CtoC translates a contrast on its training domains and on the left-out one.

For every fold of a leave-one-domain-out study run and every ``--networks`` entry, the fold's cached
network (found with the study's own cache key) translates the cases through
``infer.ctoc_translations`` (the path ``admanomaly predict`` runs; fp32, one pass) and the script
prints the median and 90th percentile of |X - X_hat_ct| of ``--contrast`` over the normal brain pixels
(label 0) of every brain slice, at network resolution: over all cases of the left-out domain and the
first ``--train-cases`` cases of each training domain. A network that fits its training sites better
has lower figures there; one that transfers better, lower figures on the left-out domain.

    .venv/bin/python benchmarks/translation_error.py runs/domains_w32 --networks "ADM+ F,ADM+ F w32"
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from ADMAnomalyLib.cases import load_case  # noqa: E402
from ADMAnomalyLib.config import CONTRASTS  # noqa: E402
from ADMAnomalyLib.domains import load_domains  # noqa: E402
from ADMAnomalyLib.infer import InferenceOptions, ctoc_translations  # noqa: E402
from ADMAnomalyLib.model import ADMModel  # noqa: E402
from ADMAnomalyLib.networks import split_translation  # noqa: E402
from ADMAnomalyLib.preprocess import prepare_case  # noqa: E402
from ADMAnomalyLib.study.methods import StudySettings  # noqa: E402
from ADMAnomalyLib.study.runner import load_cached_network  # noqa: E402

OPTIONS = InferenceOptions("cpu", precision="fp32")


def normal_pixel_errors(model: ADMModel, files, contrast: int) -> np.ndarray:
    """|X - X_hat_ct| of ``contrast`` over the normal brain pixels of the case's brain slices."""
    prepared = prepare_case(load_case(files), model.config.preprocess, keep_native=())
    index = np.flatnonzero(prepared.has_brain)
    translation = torch.from_numpy(ctoc_translations(model, prepared, OPTIONS))
    x_hat = split_translation(translation, model.config.model.n_contrasts)[0].numpy()[:, contrast]
    normal = prepared.brain[index]
    if prepared.label is not None:
        normal = normal & (prepared.label[index] == 0)
    return np.abs(prepared.slices[index, contrast] - x_hat)[normal]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path, help="a leave-one-domain-out study folder (study.json, networks/)")
    parser.add_argument("--networks", default="ADM+ F", help="comma-separated study networks")
    parser.add_argument("--contrast", default="flair", choices=CONTRASTS)
    parser.add_argument("--train-cases", type=int, default=2, help="cases of each training domain measured")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    study = json.loads((args.run / "study.json").read_text())
    domains = load_domains(study["domains_file"])
    settings = StudySettings.from_dict(study["settings"])
    contrast = CONTRASTS.index(args.contrast)
    print(f"|X - X_hat| of {args.contrast} on normal brain pixels, median / p90 (network resolution)")
    for run in (r for r in study["runs"] if r["seed"] == args.seed):
        for name in args.networks.split(","):
            model = load_cached_network(args.run / "networks", name, settings, args.seed, run["train"])
            start = time.perf_counter()
            cells = []
            for domain, cases in domains.items():
                left_out = domain == run["domain"]
                errors = np.concatenate([normal_pixel_errors(model, files, contrast)
                                         for files in (cases if left_out else cases[: args.train_cases])])
                cells.append(f"{domain}{' (left out)' if left_out else ''} "
                             f"{np.median(errors):.3f} / {np.percentile(errors, 90):.3f}")
            print(f"fold {run['domain']} | {name} | " + " | ".join(cells)
                  + f" | {time.perf_counter() - start:.0f} s", flush=True)


if __name__ == "__main__":
    main()
