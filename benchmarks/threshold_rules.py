"""How the study's rows would transfer their threshold under other rules (leave-one-domain-out).

For every fold of a finished leave-one-domain-out study run (``study.json`` + its cached networks in
``RUN/networks``), each ``--rows`` row is scored exactly as the study scores it
(``study.runner.adm_method_scores`` / ``baseline_method_scores``), with the post-processing, cut-off
and load weight that fold chose (read from ``study.json``: no search is repeated). Its threshold is
then chosen on the training domains by each rule below and the left-out domain's Dice (after ``+cc``
at that threshold, as the study does) is printed beside the test domain's own best threshold:

- ``lesion slices``: the study's rule, highest mean Dice over the training domains on the brain voxels
  of their lesion slices (``metrics.balanced_best_threshold``);
- ``whole brain``: the same over the training cases' whole brains (the test region);
- ``maximin``: highest worst-domain Dice on the lesion slices;
- ``median of domain bests`` / ``max of domain bests``: each training domain's best threshold, then
  their median or maximum.

Also printed: each training domain's own best threshold on its lesion slices, in-sample (its normal
slices trained the fold's network), to set beside the same domain's best threshold when it is the test
domain of its own fold (out of sample).

``--save-scores`` also keeps every fold's per-case scores (``RUN/threshold_scores/``) so that further
rules can be tried offline.

``--seeds 0,1,2`` scores a seed ensemble instead of the seed-0 networks: every ADM network's raw energy is
the mean, over the seeds' cached networks (all in ``RUN/networks``, e.g. after ``admanomaly study --seeds
1,2`` into the same folder), of the members' energies in nats: minus the log of the geometric mean of
their densities (a product of experts), which keeps the cases on one scale as each member's energy does
(standardising each member per case instead shifts every case by its own constant: raw CBICA AUPRC 0.821
from members' 0.857-0.888). ``--head-seeds 1,2`` adds members that share the first seed's
CtoC and differ only in step 2 (DR and the mixture trained from another seed's start; kept in
``RUN/networks`` too): the members a product could run for the price of one CtoC. The post-processing
each fold chose for seed 0 is kept; the test domain's raw AUPRC of each member and of the ensemble is
printed.

``--only "TCGA glioma"`` scores only the folds that leave out the named domains (';'-separated).

    .venv/bin/python benchmarks/threshold_rules.py runs/domains_cmc --image-size 64 \
        --rows "FLAIR z +med5+cc;ADM+ F +post+cc (z+load);ADM+ F cm* +post+cc (normal+load)"
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

from ADMAnomalyLib.device import resolve_device  # noqa: E402
from ADMAnomalyLib.infer import InferenceOptions  # noqa: E402
from ADMAnomalyLib.metrics import (balanced_best_threshold, choose_load_weight, detection_metrics,  # noqa: E402
                                   dice_curve, label_metrics, loaded_parts, threshold_metrics)
from ADMAnomalyLib.model import ADMModel  # noqa: E402
from ADMAnomalyLib.postprocess import load_offset  # noqa: E402
from ADMAnomalyLib.study import runner  # noqa: E402
from ADMAnomalyLib.study.methods import (METHODS, MethodSpec, network_config, quick_settings,  # noqa: E402
                                         raw_variants, training_key)
from ADMAnomalyLib.train import Trainer  # noqa: E402

SIGNED_LOAD_WEIGHTS = tuple(round(w, 1) for w in np.arange(-1.0, 0.61, 0.1))
LOAD_REFERENCES = (1.0, 2.0, 3.0)


def as_chosen(method: str, fold_record: dict, load_grid: bool) -> MethodSpec:
    """The row's spec with the fold's chosen post-processing fixed (no search, no load choice); with
    ``load_grid`` the load term of a '+load' row is left off (the grid adds it)."""
    spec = METHODS[method]
    if spec.kind != "adm":
        return spec
    result = fold_record["methods"][method]
    post = {**spec.postprocess, **result.get("chosen", {})}
    if "load" in result:
        post["load_weight"] = 0.0 if load_grid else result["load"]["weight"]
    return dataclasses.replace(spec, postprocess=post, search=(), load_weights=())


def rule_thresholds(scores: dict[str, np.ndarray], groups) -> tuple[dict[str, float], list[float]]:
    lesion_slices = [(np.concatenate([scores[c.case_id][c.validation] for c in group]),
                      np.concatenate([c.labels[c.validation] for c in group]).astype(bool)) for group in groups]
    whole_brains = [(np.concatenate([scores[c.case_id] for c in group]),
                     np.concatenate([c.labels for c in group]).astype(bool)) for group in groups]
    domain_bests = [balanced_best_threshold([part]) for part in lesion_slices]
    candidates = np.unique(np.concatenate([s for s, _ in lesion_slices]))
    worst = np.min([dice_curve(s, y, candidates) for s, y in lesion_slices], axis=0)
    return {"lesion slices": balanced_best_threshold(lesion_slices),
            "whole brain": balanced_best_threshold(whole_brains),
            "maximin": float(candidates[int(np.argmax(worst))]),
            "median of domain bests": float(np.median(domain_bests)),
            "max of domain bests": float(np.max(domain_bests))}, domain_bests


def test_dice(scores: dict[str, np.ndarray], run, threshold: float, small_components: bool,
              min_component_mm3: float) -> tuple[float, float, float]:
    """Dice, precision and recall of the test domain's pooled whole brains at ``threshold``, after ``+cc``
    when the row has it (as the study scores a row)."""
    labels = np.concatenate([c.labels for c in run.test_cases]).astype(bool)
    if small_components:
        predicted = runner._component_labels(run.test_cases, min_component_mm3, scores)(threshold)
        at = label_metrics(np.concatenate([predicted[c.case_id] for c in run.test_cases]), labels, threshold)
    else:
        at = threshold_metrics(np.concatenate([scores[c.case_id] for c in run.test_cases]), labels, threshold)
    return at.dice, at.precision, at.recall


def load_grid_rows(scores: dict[str, np.ndarray], run, small_components: bool,
                   min_component_mm3: float) -> dict[str, tuple]:
    """For each load reference: the signed load weight whose threshold transfers best between the
    training domains (``metrics.choose_load_weight``'s figures, ties to the weight nearest 0 rather than
    the smallest, since the grid is signed), its threshold (the study's rule) and the test domain's Dice."""
    rows = {}
    for reference in LOAD_REFERENCES:
        log_load = {c.case_id: load_offset(scores[c.case_id], 1.0, reference) for c in run.all_cases}
        groups = [[(scores[c.case_id][c.validation], c.labels[c.validation], log_load[c.case_id]) for c in group]
                  for group in run.groups]
        _, transfer = choose_load_weight(groups, SIGNED_LOAD_WEIGHTS)
        weight = max(transfer, key=lambda w: (transfer[w], -abs(w)))
        threshold = balanced_best_threshold(loaded_parts(groups, weight))
        loaded = {k: v + np.float32(weight * log_load[k]) for k, v in scores.items()}
        rows[f"load ref {reference:g}"] = (weight, threshold,
                                           *test_dice(loaded, run, threshold, small_components, min_component_mm3))
    return rows


def ensemble_raw(members: list[dict[str, dict[str, np.ndarray]]]) -> dict[str, dict[str, np.ndarray]]:
    """``{raw_key: {case: energy}}`` of a seed ensemble: per key and case, the mean of the members' energies."""
    if len(members) == 1:
        return members[0]
    return {key: {case: np.mean([m[key][case] for m in members], axis=0, dtype=np.float32)
                  for case in members[0][key]} for key in members[0]}


def step2_heads(trained: runner.TrainedNetworks, seeds: list[int], settings, run, cache_dir: Path,
                train_ids: list[str], device) -> list[runner.TrainedNetworks]:
    """For each of ``seeds``: the networks of ``trained`` with step 2 retrained from that seed's start on
    their own (frozen) CtoC, cached in ``cache_dir`` under the name '<network> head'."""
    heads = []
    for seed in seeds:
        models, groups = {}, []
        for ctoc_model, members in trained.ctoc_groups:
            for name in members:
                config = network_config(name, settings, seed)
                path = runner.network_cache_path(cache_dir, f"{name} head", config, train_ids)
                if path.exists():
                    models[name] = ADMModel.load(path)
                else:
                    trainer = Trainer(config, device, show_progress_bar=False)
                    models[name] = trainer.fit(run.training[training_key(config)],
                                               ctoc_state=ctoc_model.network.ctoc_state(), calibrate=False)
                    models[name].save(path)
            # the heads' CtoC is the donor's, so the donor still makes the translations
            groups.append((ctoc_model, members))
        heads.append(runner.TrainedNetworks(models, groups, {}))
    return heads


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", type=Path, help="a finished leave-one-domain-out study folder")
    parser.add_argument("--image-size", type=int, required=True, help="the study's --image-size")
    parser.add_argument("--rows", required=True, help="';'-separated study rows of that run")
    parser.add_argument("--domains", default="benchmarks/domains.json")
    parser.add_argument("--load-grid", action="store_true",
                        help="also choose the '+load' rows' load weight on a signed grid, per load reference")
    parser.add_argument("--save-scores", action="store_true",
                        help="also write each fold's per-case scores of every row (before +cc, float16) and the "
                             "cases' labels to RUN/threshold_scores/, for trying further rules without rescoring")
    parser.add_argument("--seeds", default="0", help="comma-separated seeds of a seed ensemble (see the docstring)")
    parser.add_argument("--only", default="", help="';'-separated left-out domains to score (default: every fold)")
    parser.add_argument("--head-seeds", default="", help="comma-separated seeds of step-2 heads on the first seed's "
                                                         "CtoC (see the docstring)")
    args = parser.parse_args()
    study = json.loads((args.run / "study.json").read_text())
    rows = args.rows.split(";")
    settings = quick_settings(split="domains", image_size=args.image_size, seeds=(0,), device="cpu",
                              methods=tuple(rows))
    device = resolve_device("cpu")
    files_by_domain = runner.study_cases(None, args.domains, settings)
    networks = sorted({METHODS[m].network for m in rows if METHODS[m].kind == "adm"})
    preparations = [network_config(n, settings, 0).preprocess for n in networks]
    cases = {f.case_id: runner.load_case_data(f, settings, preparations, domain)
             for domain, files in files_by_domain.items() for f in files}
    domains = {name: [f.case_id for f in files] for name, files in files_by_domain.items()}
    results: dict[str, dict] = {}
    score_folder = args.run / "threshold_scores"
    if args.save_scores:
        score_folder.mkdir(exist_ok=True)
        np.savez(score_folder / "cases.npz", **{f"{key}|{c.case_id}": getattr(c, key) for c in cases.values()
                                                for key in ("labels", "validation")},
                 **{f"domain|{c.case_id}": np.array(c.domain) for c in cases.values()})
    for fold, (domain, test_ids) in enumerate(runner.study_splits(domains, settings)):
        if args.only and domain not in args.only.split(";"):
            continue
        started = time.perf_counter()
        fold_record = next(r for r in study["runs"] if r["seed"] == 0 and r["fold"] == fold)
        record, run = runner._start_run(0, fold, domain, test_ids, cases, settings, networks, False)
        specs = {m: as_chosen(m, fold_record, args.load_grid) for m in rows}
        variants: dict[str, set] = {}
        for spec in specs.values():
            if spec.kind == "adm":
                variants.setdefault(spec.network, set()).update(raw_variants(spec, settings))
        trained = [runner.train_networks(networks, settings, seed, run.training, device, args.run / "networks",
                                         record["train"]) for seed in (int(s) for s in args.seeds.split(","))]
        trained += step2_heads(trained[0], [int(s) for s in filter(None, args.head_seeds.split(","))], settings, run,
                               args.run / "networks", record["train"], device)
        members = [runner.score_networks(t, run.all_cases, variants, InferenceOptions(device)) for t in trained]
        run.raw.update(ensemble_raw(members))
        run.training.clear()
        labels = np.concatenate([c.labels for c in run.test_cases]).astype(bool)
        for network in networks:
            auprcs = [detection_metrics(np.concatenate([raw[network][c.case_id] for c in run.test_cases]), labels).auprc
                      for raw in members + ([run.raw] if len(members) > 1 else [])]
            print(f"{domain} | raw {network} AUPRC, seeds {args.seeds}, head seeds {args.head_seeds or '-'}"
                  + (" and ensemble" if len(members) > 1 else "")
                  + ": " + ", ".join(f"{a:.3f}" for a in auprcs), flush=True)
        fold_scores = {}
        for method, spec in specs.items():
            scores = (runner.adm_method_scores(spec, run) if spec.kind == "adm"
                      else runner.baseline_method_scores(method, spec, run))[0]
            fold_scores.update({f"{method}|{k}": v.astype(np.float16) for k, v in scores.items()})
            thresholds, domain_bests = rule_thresholds(scores, run.groups)
            test_scores = np.concatenate([scores[c.case_id] for c in run.test_cases])
            row = {"test AUPRC (before +cc)": detection_metrics(test_scores, labels).auprc,
                   "training domain bests (in sample)": domain_bests,
                   "test best (before +cc)": balanced_best_threshold([(test_scores, labels)])}
            for rule, threshold in thresholds.items():
                row[rule] = (threshold, *test_dice(scores, run, threshold, spec.small_components,
                                                   settings.min_component_mm3))
            if args.load_grid and METHODS[method].load_weights:
                row.update(load_grid_rows(scores, run, spec.small_components, settings.min_component_mm3))
            results.setdefault(domain, {})[method] = row
            print(f"{domain} | {method} | " + " | ".join(
                f"{k}: " + ", ".join(f"{v:.3f}" for v in np.atleast_1d(value)) for k, value in row.items()), flush=True)
        if args.save_scores:
            np.savez(score_folder / f"fold{fold}.npz", test_domain=np.array(domain), **fold_scores)
        print(f"{domain}: {time.perf_counter() - started:.0f} s", flush=True)
    (args.run / "threshold_rules.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
