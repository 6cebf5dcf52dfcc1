"""Why the learned ADM energy fails off its training site: per-domain feature analysis (a study, not a test).

For each domain of a domains file (``{name: {"folder": ..., "cases": glob, "pattern": "open_ms"}}``) and
each ``--model``, every case goes through the engine's own path (``preprocess.prepare_case`` with the
model's preprocessing, ``infer.ctoc_translations``, ``infer.brain_features``, ``gmm.energy``: the raw
energy of ``infer.energy_slices``, one pass, no post-processing) and the script measures, at network
resolution (128x128 axial slices, every slice that contains brain):

1. per feature channel (Z_ct of each contrast, each Z_dr dimension, the raw energy E, the FLAIR
   intensity as the model sees it): AUROC / AUPRC of lesion vs normal brain pixels (Z_dr
   sign-agnostic: the better direction is reported and named); on normal tissue, the Spearman
   correlation of each feature with the local edge strength; where the top-1 % pixels of each case
   lie (lesion / tissue boundary / CSF-like / other);
2. |X - X_hat_ct| per contrast on normal pixels of slices >= 3 slices from any lesion slice, split into
   boundary and interior pixels;
3. model-independent, on the native grid: negative raw intensities inside the brain, percentiles of
   the normal-tissue intensities per case under z-score and robust normalisation, the spread of
   the normal-tissue median and IQR across cases, and how far a lesion moves normal tissue.

    .venv/bin/python benchmarks/domain_analysis.py --model Resources/Models/ADMAnomaly_default.admm \\
        --domains benchmarks/domains.json -o runs/domain_analysis --docs docs

Writes ``<out>/domain_analysis.json`` (every number), ``<out>/tables.md`` and the figures
``<docs>/figures/domain_{feature_auprc,ctoc_error,histograms,ms_example}.png``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pickle
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

PERCENTILES = (1, 5, 25, 50, 75, 95, 99)
LESION_MARGIN_SLICES = 3
"""Normal pixels for the CtoC error: lesion-free slices at least this many slices from a lesion slice."""
SAMPLE_RATE = 0.1
"""Fraction of normal brain pixels kept (uniformly at random) for correlations and error percentiles."""
RIM_PIXELS = 2
"""Pixels within this many network pixels of the brain edge are the 'rim'."""
HIST_EDGES = np.linspace(-4.0, 8.0, 241)
TOP_FRACTION = 0.01


# --------------------------------------------------------------------------------------------------
# domains


# --------------------------------------------------------------------------------------------------
# per-case measurements


def feature_names(model) -> list[str]:
    """Names of the density features of ``model`` in ``network.features`` order."""
    from ADMAnomalyLib.config import CONTRASTS

    cfg = model.config.model
    names = []
    if cfg.use_ctoc:
        prefix = "Zct_sc" if cfg.ctoc_uncertainty else "Zct"
        names += [f"{prefix}_{c}" for c in cfg.density_residuals]
    if cfg.use_dr:
        names += [f"Zdr_{k + 1}" for k in range(cfg.dr_latent)]
    if cfg.density_intensities:
        names += [f"X_{c}" for c in CONTRASTS]
    return names


def edge_strength(slices: np.ndarray) -> np.ndarray:
    """Gradient magnitude (S, N, N) of the network-input contrasts (S, 4, N, N): sqrt of the sum over
    contrasts of the squared central differences along rows and columns (per network pixel)."""
    gr = np.gradient(slices, axis=2)
    gc = np.gradient(slices, axis=3)
    return np.sqrt((gr**2 + gc**2).sum(axis=1)).astype(np.float32)


def rim_mask(brain: np.ndarray, pixels: int = RIM_PIXELS) -> np.ndarray:
    """Brain pixels within ``pixels`` of the brain edge (in-plane), (S, N, N)."""
    from scipy import ndimage

    structure = np.zeros((3, 3, 3), dtype=bool)
    structure[1] = ndimage.generate_binary_structure(2, 1)
    eroded = ndimage.binary_erosion(brain, structure, iterations=pixels, border_value=0)
    return brain & ~eroded


def far_from_lesion(has_lesion: np.ndarray, margin: int = LESION_MARGIN_SLICES) -> np.ndarray:
    """Slices at least ``margin`` slices away from every lesion slice."""
    lesion_slices = np.flatnonzero(has_lesion)
    index = np.arange(len(has_lesion))
    if lesion_slices.size == 0:
        return np.ones(len(has_lesion), dtype=bool)
    distance = np.abs(index[:, None] - lesion_slices[None, :]).min(axis=1)
    return distance >= margin


def model_case_maps(model, prepared, options) -> dict[str, np.ndarray]:
    """Network-resolution maps of a prepared case's brain slices, through the engine's functions:
    ``x`` (S, 4, N, N), ``x_hat`` (S, 4, N, N), ``brain``, ``label`` (S, N, N), ``features``
    (n_brain, d) and ``energy`` (n_brain,) in the raw (one-pass, unprocessed) form of
    :func:`ADMAnomalyLib.infer.energy_slices`, and the slice index into the prepared case."""
    import torch

    from ADMAnomalyLib.device import inference_dtype
    from ADMAnomalyLib.gmm import energy
    from ADMAnomalyLib.infer import brain_features, ctoc_runner, ctoc_translations

    options = options.checked()
    index = np.flatnonzero(prepared.has_brain)
    x_all = prepared.slices[index]
    brain = prepared.brain[index]
    label = prepared.label[index] if prepared.label is not None else np.zeros_like(brain)
    x_hat = ctoc_translations(model, prepared, options) if model.config.model.use_ctoc else None
    network = model.network.to(options.device).eval()
    gmm = model.gmm.to(options.device)
    dtype = inference_dtype(options.device, options.precision)
    ctoc = ctoc_runner(model, options.compile)
    feats, energies = [], []
    with torch.inference_mode():
        for start in range(0, len(index), options.batch_size):
            stop = start + options.batch_size
            x = torch.from_numpy(np.ascontiguousarray(x_all[start:stop])).to(options.device)
            b = torch.from_numpy(np.ascontiguousarray(brain[start:stop])).to(options.device)
            xh = torch.from_numpy(np.ascontiguousarray(x_hat[start:stop])).to(options.device) if x_hat is not None else None
            f = brain_features(network, ctoc, x, b, dtype, xh).float()
            feats.append(f.cpu().numpy())
            energies.append(energy(f, gmm).float().cpu().numpy())
    return {
        "index": index, "x": x_all, "x_hat": x_hat, "brain": brain, "label": label,
        "features": np.concatenate(feats), "energy": np.concatenate(energies),
    }


def top_fraction_breakdown(score: np.ndarray, lesion: np.ndarray, boundary: np.ndarray, csf: np.ndarray,
                           rim: np.ndarray, fraction: float = TOP_FRACTION) -> dict[str, int]:
    """Counts of the top ``fraction`` pixels of ``score`` (one case's brain pixels) by category, in
    priority order lesion > boundary > CSF-like > other; ``rim`` is counted separately (overlapping)."""
    k = max(1, int(round(fraction * score.size)))
    top = np.argpartition(-score, k - 1)[:k]
    les = lesion[top]
    bnd = boundary[top] & ~les
    csf_ = csf[top] & ~les & ~bnd
    return {"n": int(k), "lesion": int(les.sum()), "boundary": int(bnd.sum()), "csf": int(csf_.sum()),
            "other": int(k - les.sum() - bnd.sum() - csf_.sum()), "rim": int(rim[top].sum())}


def analyse_model_case(model, prepared, options, rng: np.random.Generator) -> dict[str, Any]:
    """Per-pixel arrays and per-case numbers of one case under one model (parts 1 and 2)."""
    from ADMAnomalyLib.config import CONTRASTS
    from ADMAnomalyLib.metrics import detection_metrics

    maps = model_case_maps(model, prepared, options)
    brain, label, x = maps["brain"], maps["label"], maps["x"]
    names = feature_names(model) + ["E", "FLAIR_int"]
    flair_channel = CONTRASTS.index("flair")
    t2_channel = CONTRASTS.index("t2")
    values = np.concatenate(
        [maps["features"], maps["energy"][:, None], x[:, flair_channel][brain][:, None]], axis=1
    ).astype(np.float32)
    lesion = label[brain]
    edge_map = edge_strength(x)
    edge = edge_map[brain]
    rim = rim_mask(brain)[brain]
    normal = ~lesion
    boundary_cut = float(np.percentile(edge[normal], 90))
    interior_cut = float(np.percentile(edge[normal], 50))
    boundary = edge >= boundary_cut
    interior = (edge < interior_cut) & ~rim
    fl, t2 = x[:, flair_channel][brain], x[:, t2_channel][brain]
    csf = (fl < np.percentile(fl, 25)) & (t2 > np.percentile(t2, 75))
    far_slice = far_from_lesion(prepared.has_lesion)[maps["index"]]
    far = np.broadcast_to(far_slice[:, None, None], brain.shape)[brain]

    top = {name: top_fraction_breakdown(values[:, j], lesion, boundary, csf, rim)
           for j, name in enumerate(names) if not name.startswith("Zdr")}
    per_case = {}
    if lesion.any():
        for name in ("E", "FLAIR_int"):
            m = detection_metrics(values[:, names.index(name)], lesion)
            per_case[name] = {"auroc": m.auroc, "auprc": m.auprc}
    # Uniform sample of normal pixels for correlations and error percentiles.
    keep = normal & (rng.random(normal.size) < SAMPLE_RATE)
    err = None
    if maps["x_hat"] is not None:
        # A model with ctoc_uncertainty returns log-variances after the K translated contrasts.
        err = np.abs(x - maps["x_hat"][:, : x.shape[1]]).transpose(0, 2, 3, 1)[brain][keep]
    example = choose_example_slice(maps, label)
    return {
        "names": names, "values": values, "lesion": lesion,
        "sample": {"values": values[keep], "edge": edge[keep], "far": far[keep], "boundary": boundary[keep],
                   "interior": interior[keep], "rim": rim[keep], "err": err},
        "top": top, "per_case": per_case, "example": example,
        "lesion_fraction": float(lesion.mean()),
    }


def choose_example_slice(maps: dict[str, np.ndarray], label: np.ndarray) -> dict[str, Any] | None:
    """The slice with the most separate lesions (ties: most lesion pixels) with its FLAIR, Z_ct, E maps."""
    from scipy import ndimage

    if not label.any():
        return None
    counts = np.array([ndimage.label(s)[1] for s in label])
    areas = label.sum(axis=(1, 2))
    best = int(np.lexsort((areas, counts))[-1])
    brain = maps["brain"][best]
    offset = int(maps["brain"][:best].sum())
    rows = slice(offset, offset + int(brain.sum()))
    energy_map = np.full(brain.shape, np.nan, dtype=np.float32)
    energy_map[brain] = maps["energy"][rows]
    zct = None
    if maps["x_hat"] is not None:  # the Z_ct features themselves (the first K columns)
        k = maps["x"].shape[1]
        zct = np.full((k,) + brain.shape, np.nan, dtype=np.float32)
        zct[:, brain] = maps["features"][rows, :k].T
    return {"slice": int(maps["index"][best]), "n_lesions": int(counts[best]), "lesion_pixels": int(areas[best]),
            "flair": maps["x"][best, 0].copy(), "zct": zct, "energy": energy_map, "brain": brain.copy(),
            "label": label[best].copy()}


# --------------------------------------------------------------------------------------------------
# intensity normalisation (part 3, model-independent)


def intensity_case(case, prepared_z, robust_native: dict[str, np.ndarray]) -> dict[str, Any]:
    """Part 3 for one case on its native grid: negative raw intensities in the brain, normal-tissue
    percentiles under z-score and robust normalisation, and how far the lesion moves normal tissue.

    ``prepared_z`` is the case prepared with z-score normalisation (its brain mask and lesion are
    the engine's); ``robust_native`` the engine's robust-normalised native volumes
    (``preprocess.normalisation = "robust"``)."""
    import SimpleITK as sitk

    from ADMAnomalyLib.config import CONTRASTS
    from ADMAnomalyLib.preprocess import normalisation_statistics

    brain = prepared_z.native_brain
    lesion = prepared_z.native_lesion if prepared_z.native_lesion is not None else np.zeros_like(brain)
    normal_mask = brain & ~lesion
    out: dict[str, Any] = {"lesion_fraction": float(lesion[brain].mean()), "contrasts": {}, "hist": {}}
    for name in CONTRASTS:
        raw = sitk.GetArrayViewFromImage(case.images[name])
        inside = raw[brain].astype(np.float64)
        normal = raw[normal_mask].astype(np.float64)
        mean, std = float(inside.mean()), float(inside.std())
        engine_mean, engine_std = prepared_z.zscore[name]
        med, scale = normalisation_statistics(inside, "robust")
        z = (normal - mean) / std
        r = robust_native[name][normal_mask].astype(np.float64)
        # Normalisation on normal tissue only (what it would be without the lesion).
        n_mean, n_std = float(normal.mean()), float(normal.std())
        n_med, n_scale = normalisation_statistics(normal, "robust")
        zq = np.percentile(z, PERCENTILES)
        rq = np.percentile(r, PERCENTILES)
        out["contrasts"][name] = {
            "negative_fraction": float((inside < 0).mean()),
            "zero_fraction": float((inside == 0).mean()),
            "engine_zscore_matches": bool(abs(engine_mean - mean) <= 1e-3 * max(1.0, abs(mean))
                                          and abs(engine_std - std) <= 1e-3 * std),
            "zscore_percentiles": dict(zip(map(str, PERCENTILES), map(float, zq))),
            "robust_percentiles": dict(zip(map(str, PERCENTILES), map(float, rq))),
            "zscore_normal_median": float(zq[3]), "zscore_normal_iqr": float(zq[4] - zq[2]),
            "robust_normal_median": float(rq[3]), "robust_normal_iqr": float(rq[4] - rq[2]),
            # Where normal tissue's median lands minus where it would land if the statistics ignored the lesion.
            "zscore_lesion_shift": float((np.median(normal) - mean) / std - (np.median(normal) - n_mean) / n_std),
            "robust_lesion_shift": float((np.median(normal) - med) / scale - (np.median(normal) - n_med) / n_scale),
        }
        out["hist"][name] = {
            "zscore": np.histogram(z, HIST_EDGES)[0] / max(1, z.size),
            "robust": np.histogram(r, HIST_EDGES)[0] / max(1, r.size),
        }
    return out


# --------------------------------------------------------------------------------------------------
# pooling per domain


def _q(values: np.ndarray, q: float) -> float:
    return float(np.percentile(values, q)) if values.size else math.nan


def summarise_model_domain(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Pooled parts 1 and 2 of one domain under one model."""
    from scipy import stats

    from ADMAnomalyLib.config import CONTRASTS
    from ADMAnomalyLib.metrics import detection_metrics

    names = records[0]["names"]
    lesion = np.concatenate([r["lesion"] for r in records])
    out: dict[str, Any] = {"n_cases": len(records), "n_pixels": int(lesion.size), "n_lesion": int(lesion.sum()),
                           "features": {}, "top1": {}, "ctoc_error": {}}
    for j, name in enumerate(names):
        v = np.concatenate([r["values"][:, j] for r in records])
        entry: dict[str, Any] = {}
        if lesion.any() and (~lesion).any():
            up = detection_metrics(v, lesion)
            if name.startswith("Zdr"):
                down = detection_metrics(-v, lesion)
                better = down if down.auroc > up.auroc else up
                entry.update(auroc=better.auroc, auprc=better.auprc, direction="-" if better is down else "+",
                             auroc_plus=up.auroc, auprc_plus=up.auprc, auprc_minus=down.auprc)
            else:
                entry.update(auroc=up.auroc, auprc=up.auprc, direction="+")
        sv = np.concatenate([r["sample"]["values"][:, j] for r in records])
        se = np.concatenate([r["sample"]["edge"] for r in records])
        entry["spearman_edge_normal"] = float(stats.spearmanr(sv, se).statistic) if sv.size > 2 else math.nan
        entry["normal_median"] = _q(sv, 50)
        entry["normal_p99"] = _q(sv, 99)
        entry["lesion_median"] = _q(v[lesion], 50)
        out["features"][name] = entry
        del v
    for name in records[0]["top"]:
        counts = {k: sum(r["top"][name][k] for r in records) for k in ("n", "lesion", "boundary", "csf", "other", "rim")}
        out["top1"][name] = {k: counts[k] / counts["n"] for k in ("lesion", "boundary", "csf", "other", "rim")}
    out["lesion_prevalence"] = float(lesion.mean())
    out["per_case"] = {r["case_id"]: {**r["per_case"], "lesion_fraction": r["lesion_fraction"]} for r in records}
    if records[0]["sample"]["err"] is not None:
        err = np.concatenate([r["sample"]["err"] for r in records])
        far = np.concatenate([r["sample"]["far"] for r in records])
        groups = {"all": far, "boundary": far & np.concatenate([r["sample"]["boundary"] for r in records]),
                  "interior": far & np.concatenate([r["sample"]["interior"] for r in records])}
        for c, contrast in enumerate(CONTRASTS):
            out["ctoc_error"][contrast] = {
                g: {"median": _q(err[m, c], 50), "p90": _q(err[m, c], 90), "n_sampled": int(m.sum())}
                for g, m in groups.items()
            }
            out["ctoc_error"][contrast]["per_case_median_all"] = {
                r["case_id"]: _q(r["sample"]["err"][r["sample"]["far"], c], 50) for r in records
            }
    return out


def summarise_intensity(records: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Pooled part 3 of one domain: per-case numbers, spreads across cases and mean histograms."""
    from ADMAnomalyLib.config import CONTRASTS

    out: dict[str, Any] = {"per_case": {}, "spread": {}, "hist": {}}
    for case_id, rec in records.items():
        out["per_case"][case_id] = {"lesion_fraction": rec["lesion_fraction"], **rec["contrasts"]}
    for name in CONTRASTS:
        per = [rec["contrasts"][name] for rec in records.values()]
        spread = {"negative_fraction_max": max(p["negative_fraction"] for p in per)}
        for norm in ("zscore", "robust"):
            medians = np.array([p[f"{norm}_normal_median"] for p in per])
            iqrs = np.array([p[f"{norm}_normal_iqr"] for p in per])
            shifts = np.array([p[f"{norm}_lesion_shift"] for p in per])
            spread[norm] = {"median_mean": float(medians.mean()), "median_min": float(medians.min()),
                            "median_max": float(medians.max()), "iqr_mean": float(iqrs.mean()),
                            "iqr_min": float(iqrs.min()), "iqr_max": float(iqrs.max()),
                            "lesion_shift_min": float(shifts.min()), "lesion_shift_max": float(shifts.max())}
        out["spread"][name] = spread
        out["hist"][name] = {norm: np.mean([rec["hist"][name][norm] for rec in records.values()], axis=0)
                             for norm in ("zscore", "robust")}
    return out


def across_domains(intensity: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Spread across *all* cases (every domain) of the normal-tissue median and IQR, per normalisation."""
    from ADMAnomalyLib.config import CONTRASTS

    out = {}
    for name in CONTRASTS:
        per = [p[name] for d in intensity.values() for p in d["per_case"].values()]
        out[name] = {}
        for norm in ("zscore", "robust"):
            med = np.array([p[f"{norm}_normal_median"] for p in per])
            iqr = np.array([p[f"{norm}_normal_iqr"] for p in per])
            out[name][norm] = {"median_sd": float(med.std()), "median_range": float(med.max() - med.min()),
                               "iqr_sd": float(iqr.std()), "iqr_range": float(iqr.max() - iqr.min())}
    return out


# --------------------------------------------------------------------------------------------------
# driver


def analyse(model_paths: list[str | Path], domains: dict[str, list], device: str = "cpu",
            seed: int = 0, log=print) -> dict[str, Any]:
    """Run parts 1-3 on every case of ``domains`` ({name: [CaseFiles]}) for every model; returns the
    results (JSON-ready after :func:`to_json`) plus ``_examples`` (slice maps for the figures)."""
    from ADMAnomalyLib import api
    from ADMAnomalyLib.cases import load_case
    from ADMAnomalyLib.config import CONTRASTS
    from ADMAnomalyLib.infer import InferenceOptions
    from ADMAnomalyLib.preprocess import prepare_case

    models = {}
    for path in model_paths:
        model = api.load_model(path)
        label = Path(path).stem
        while label in models:
            label += "_"
        models[label] = model
    options = InferenceOptions(device=device, precision="fp32", batch_size=16)
    model_records: dict[str, dict[str, list]] = {m: {} for m in models}
    intensity_records: dict[str, dict[str, Any]] = {}
    examples: dict[str, dict[str, dict[str, Any]]] = {m: {} for m in models}
    case_list: dict[str, list[str]] = {}
    rng = np.random.default_rng(seed)
    for domain, cases in domains.items():
        intensity_records[domain] = {}
        case_list[domain] = [c.case_id for c in cases]
        for files in cases:
            start = time.perf_counter()
            case = load_case(files)
            base_cfg = next(iter(models.values())).config.preprocess
            z_cfg = replace(base_cfg, normalisation="zscore")
            prepared_z = prepare_case(case, z_cfg, keep_native=())
            robust_native = prepare_case(case, replace(z_cfg, normalisation="robust"),
                                         keep_native=CONTRASTS).native_zscored
            intensity_records[domain][files.case_id] = intensity_case(case, prepared_z, robust_native)
            del robust_native
            for label, model in models.items():
                cfg = model.config.preprocess
                prepared = prepared_z if cfg == z_cfg else prepare_case(case, cfg, keep_native=())
                record = analyse_model_case(model, prepared, options, rng)
                record["case_id"] = files.case_id
                model_records[label].setdefault(domain, []).append(record)
                if record["example"] is not None:
                    examples[label].setdefault(domain, {})[files.case_id] = record.pop("example")
            log(f"{domain}/{files.case_id}: {time.perf_counter() - start:.1f} s", flush=True)
    results: dict[str, Any] = {
        "settings": {"models": {m: str(p) for m, p in zip(models, model_paths)}, "device": device, "seed": seed,
                     "resolution": "network (128x128 axial slices, every slice containing brain)",
                     "lesion_margin_slices": LESION_MARGIN_SLICES, "sample_rate_normal": SAMPLE_RATE,
                     "rim_pixels": RIM_PIXELS, "top_fraction": TOP_FRACTION,
                     "definitions": {
                         "edge": "sqrt(sum over the 4 z-scored network-input contrasts of squared central "
                                 "differences along rows and columns)",
                         "boundary": "edge >= 90th percentile of the case's normal brain pixels",
                         "interior": "edge < median of the case's normal brain pixels and > 2 px from the brain edge",
                         "csf_like": "FLAIR below its 25th and T2 above its 75th percentile over the case's brain",
                         "rim": "within 2 network pixels of the brain edge (reported separately, overlapping)",
                         "top1": "the 1% highest-scoring brain pixels of each case, pooled; categories in "
                                 "priority lesion > boundary > CSF-like > other",
                     }},
        "cases": case_list,
        "models": {},
        "intensity": {d: summarise_intensity(r) for d, r in intensity_records.items()},
    }
    results["intensity_across_domains"] = across_domains(results["intensity"])
    for label, per_domain in model_records.items():
        results["models"][label] = {
            "config": {"preprocess": models[label].config.to_dict()["preprocess"],
                       "model": models[label].config.to_dict()["model"]},
            "domains": {d: summarise_model_domain(r) for d, r in per_domain.items()},
        }
    results["_examples"] = examples
    return results


def to_json(value: Any) -> Any:
    """JSON-ready copy (numpy -> lists/floats, NaN -> None), dropping keys that start with '_'."""
    if isinstance(value, dict):
        return {str(k): to_json(v) for k, v in value.items() if not str(k).startswith("_")}
    if isinstance(value, (list, tuple)):
        return [to_json(v) for v in value]
    if isinstance(value, np.ndarray):
        return [to_json(v) for v in value.tolist()]
    if isinstance(value, (np.floating, float)):
        return None if not math.isfinite(float(value)) else float(value)
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, np.bool_):
        return bool(value)
    return value


# --------------------------------------------------------------------------------------------------
# tables


def _f(value: Any, digits: int = 3) -> str:
    return "–" if value is None or (isinstance(value, float) and not math.isfinite(value)) else f"{value:.{digits}f}"


def tables_markdown(results: dict[str, Any]) -> str:
    """The result tables as markdown (one column block per model)."""
    from ADMAnomalyLib.config import CONTRASTS

    models = results["models"]
    domains = list(results["intensity"])
    lines: list[str] = []
    for label, m in models.items():
        d0 = next(iter(m["domains"].values()))
        names = list(d0["features"])
        lines += [f"### Lesion vs normal pixels, model `{label}` (network resolution, all brain slices)", "",
                  "AUROC / AUPRC per feature; Z_dr: the better direction, sign in brackets. "
                  "Last row: lesion prevalence (the AUPRC of a random score).", "",
                  "| feature | " + " | ".join(domains) + " |", "|---|" + "---|" * len(domains)]
        for name in names:
            cells = []
            for d in domains:
                e = m["domains"].get(d, {}).get("features", {}).get(name, {})
                sign = f" ({e.get('direction')})" if name.startswith("Zdr") and "direction" in e else ""
                cells.append(f"{_f(e.get('auroc'))} / {_f(e.get('auprc'))}{sign}")
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        lines.append("| prevalence | " + " | ".join(_f(m["domains"][d]["lesion_prevalence"], 4) for d in domains) + " |")
        lines += ["", f"### Spearman correlation with edge strength on normal tissue, model `{label}`", "",
                  "| feature | " + " | ".join(domains) + " |", "|---|" + "---|" * len(domains)]
        for name in names:
            lines.append(f"| {name} | " + " | ".join(
                _f(m["domains"][d]["features"][name]["spearman_edge_normal"], 2) for d in domains) + " |")
        lines += ["", f"### Where the top-1 % pixels of each case lie, model `{label}`", "",
                  "lesion / boundary / CSF-like / other (rim: within 2 px of the brain edge, overlapping).", "",
                  "| score | domain | lesion | boundary | CSF-like | other | rim |", "|---|---|---|---|---|---|---|"]
        for name in d0["top1"]:
            if name.startswith("Zct") or name in ("E", "FLAIR_int"):
                for d in domains:
                    t = m["domains"][d]["top1"][name]
                    lines.append(f"| {name} | {d} | " + " | ".join(_f(t[k], 2) for k in ("lesion", "boundary", "csf", "other", "rim")) + " |")
        if d0["ctoc_error"]:
            lines += ["", f"### CtoC error |X − X̂_ct| on normal pixels (≥{LESION_MARGIN_SLICES} slices from a lesion), model `{label}`", "",
                      "median / 90th percentile, in z units of the network input.", "",
                      "| contrast | pixels | " + " | ".join(domains) + " |", "|---|---|" + "---|" * len(domains)]
            for c in CONTRASTS:
                for g in ("interior", "boundary", "all"):
                    lines.append(f"| {c} | {g} | " + " | ".join(
                        f"{_f(m['domains'][d]['ctoc_error'][c][g]['median'], 2)} / {_f(m['domains'][d]['ctoc_error'][c][g]['p90'], 2)}"
                        for d in domains) + " |")
        lines.append("")
    lines += ["### Intensity normalisation: normal tissue per domain (native grid)", "",
              "Negative raw intensities in the brain (max over cases); normal-tissue median and IQR under each "
              "normalisation: mean [min, max] over the domain's cases; lesion shift: how far the lesion moves "
              "the normal-tissue median (z units, [min, max] over cases).", "",
              "| contrast | domain | neg. frac. | z median | z IQR | robust median | robust IQR | z lesion shift | robust lesion shift |",
              "|---|---|---|---|---|---|---|---|---|"]
    for c in CONTRASTS:
        for d in domains:
            s = results["intensity"][d]["spread"][c]
            z, r = s["zscore"], s["robust"]
            lines.append(
                f"| {c} | {d} | {s['negative_fraction_max']:.2e} | {_f(z['median_mean'], 2)} [{_f(z['median_min'], 2)}, {_f(z['median_max'], 2)}]"
                f" | {_f(z['iqr_mean'], 2)} [{_f(z['iqr_min'], 2)}, {_f(z['iqr_max'], 2)}]"
                f" | {_f(r['median_mean'], 2)} [{_f(r['median_min'], 2)}, {_f(r['median_max'], 2)}]"
                f" | {_f(r['iqr_mean'], 2)} [{_f(r['iqr_min'], 2)}, {_f(r['iqr_max'], 2)}]"
                f" | [{_f(z['lesion_shift_min'], 2)}, {_f(z['lesion_shift_max'], 2)}] | [{_f(r['lesion_shift_min'], 2)}, {_f(r['lesion_shift_max'], 2)}] |")
    lines += ["", "Spread of the normal-tissue median / IQR across all cases of all domains (SD):", "",
              "| contrast | z median SD | z IQR SD | robust median SD | robust IQR SD |", "|---|---|---|---|---|"]
    for c in CONTRASTS:
        a = results["intensity_across_domains"][c]
        lines.append(f"| {c} | {_f(a['zscore']['median_sd'], 2)} | {_f(a['zscore']['iqr_sd'], 2)} | "
                     f"{_f(a['robust']['median_sd'], 2)} | {_f(a['robust']['iqr_sd'], 2)} |")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------------
# figures


def _pick(domains: list[str], *keys: str) -> str | None:
    """The first domain whose name contains one of ``keys`` as a word (case-insensitive)."""
    import re

    for key in keys:
        for d in domains:
            if re.search(rf"(?<![a-z0-9]){re.escape(key)}(?![a-z0-9])", d.lower()):
                return d
    return None


def write_figures(results: dict[str, Any], folder: str | Path) -> list[Path]:
    """The four figures into ``folder``; returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ADMAnomalyLib.config import CONTRASTS

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    domains = list(results["intensity"])
    colours = plt.cm.tab10(np.arange(len(domains)) % 10)
    models = results["models"]
    written = []

    # 1. feature AUPRC / AUROC grouped bars, one row pair per model
    fig, axes = plt.subplots(2 * len(models), 1, figsize=(12, 4.2 * 2 * len(models)), squeeze=False, dpi=110)
    for row, (label, m) in enumerate(models.items()):
        names = list(next(iter(m["domains"].values()))["features"])
        width = 0.8 / len(domains)
        for k, metric in enumerate(("auprc", "auroc")):
            ax = axes[2 * row + k, 0]
            for i, d in enumerate(domains):
                vals = [m["domains"][d]["features"][n].get(metric) for n in names]
                vals = [np.nan if v is None else v for v in vals]
                ax.bar(np.arange(len(names)) + (i - (len(domains) - 1) / 2) * width, vals, width, color=colours[i], label=d)
                if metric == "auprc":
                    ax.hlines(m["domains"][d]["lesion_prevalence"], -0.5, len(names) - 0.5, colors=[colours[i]],
                              linestyles=":", linewidth=1)
            ax.set_xticks(np.arange(len(names)))
            ax.set_xticklabels([n + (" (±)" if n.startswith("Zdr") else "") for n in names], fontsize=10)
            ax.set_ylabel(metric.upper(), fontsize=11)
            ax.set_ylim(0 if metric == "auprc" else 0.3, 1)
            if metric == "auroc":
                ax.axhline(0.5, color="grey", linewidth=0.8)
            ax.set_title(f"{metric.upper()} lesion vs normal brain pixels per feature — model {label}"
                         + (" (dotted: prevalence)" if metric == "auprc" else ""), fontsize=11)
            if metric == "auroc":
                ax.legend(fontsize=9, ncol=len(domains), loc="upper center", bbox_to_anchor=(0.5, -0.1))
    fig.tight_layout()
    written.append(folder / "domain_feature_auprc.png")
    fig.savefig(written[-1])
    plt.close(fig)

    # 2. CtoC error: per contrast, interior and boundary median (bar) with p90 (marker), per domain
    fig, axes = plt.subplots(len(models), 4, figsize=(15, 3.8 * len(models)), squeeze=False, dpi=110)
    for row, (label, m) in enumerate(models.items()):
        for col, c in enumerate(CONTRASTS):
            ax = axes[row, col]
            if not next(iter(m["domains"].values()))["ctoc_error"]:
                ax.set_visible(False)
                continue
            for g, (group, hatch) in enumerate((("interior", ""), ("boundary", "//"))):
                for i, d in enumerate(domains):
                    e = m["domains"][d]["ctoc_error"][c][group]
                    xpos = g * (len(domains) + 1) + i
                    ax.bar(xpos, e["median"], color=colours[i], hatch=hatch, edgecolor="black", linewidth=0.5,
                           label=d if g == 0 else None)
                    ax.plot([xpos, xpos], [e["median"], e["p90"]], color="black", linewidth=1)
                    ax.plot(xpos, e["p90"], marker="_", color="black", markersize=10)
            ax.set_xticks([(len(domains) - 1) / 2, len(domains) + 1 + (len(domains) - 1) / 2])
            ax.set_xticklabels(["interior", "boundary"], fontsize=10)
            ax.set_title(f"|{c} − CtoC({c})|  ({label})", fontsize=10)
            if col == 0:
                ax.set_ylabel("z units (bar: median, tick: p90)", fontsize=10)
                ax.legend(fontsize=8)
    fig.suptitle(f"CtoC translation error on normal pixels ≥{LESION_MARGIN_SLICES} slices from a lesion", fontsize=11)
    fig.tight_layout()
    written.append(folder / "domain_ctoc_error.png")
    fig.savefig(written[-1])
    plt.close(fig)

    # 3. normal-tissue histograms: z-score and robust rows, contrast columns, one line per domain
    centres = 0.5 * (HIST_EDGES[1:] + HIST_EDGES[:-1])
    fig, axes = plt.subplots(2, 4, figsize=(16, 7), sharex=True, dpi=110)
    for r, norm in enumerate(("zscore", "robust")):
        for col, c in enumerate(CONTRASTS):
            ax = axes[r, col]
            for i, d in enumerate(domains):
                h = results["intensity"][d]["hist"][c][norm]
                ax.plot(centres, np.asarray(h) / np.diff(HIST_EDGES), color=colours[i], label=d, linewidth=1.3)
            ax.set_title(f"{c}, {'z-score (mean, SD)' if norm == 'zscore' else 'robust (median, IQR/1.349)'}", fontsize=10)
            ax.set_xlim(-4, 6)
            if col == 0:
                ax.set_ylabel("density (mean over cases)", fontsize=10)
            if r == 1:
                ax.set_xlabel("normalised intensity of normal tissue", fontsize=10)
    axes[0, 0].legend(fontsize=9)
    fig.tight_layout()
    written.append(folder / "domain_histograms.png")
    fig.savefig(written[-1])
    plt.close(fig)

    # 4. example slices: MS and one off-site glioma; FLAIR, Z_ct x4, E with the reference outline
    label = next(iter(models))
    examples = results.get("_examples", {}).get(label, {})
    m = models[label]
    reference = _pick(domains, "cbica") or domains[0]
    rows = []
    ms = _pick([d for d in domains if d in examples], "ms")
    if ms:
        case = max(examples[ms], key=lambda k: examples[ms][k]["n_lesions"])
        rows.append((ms, case))
    other = _pick([d for d in domains if d in examples and d != ms], "2013") or next(
        (d for d in domains if d in examples and d not in (ms, reference)), None)
    if other:
        per = m["domains"][other]["per_case"]
        ranked = sorted((k for k in examples[other] if "E" in per.get(k, {})), key=lambda k: per[k]["E"]["auprc"] or 0)
        if ranked:
            rows.append((other, ranked[len(ranked) // 2]))
    if rows:
        ref_feats = m["domains"][reference]["features"]
        fig, axes = plt.subplots(len(rows), 6, figsize=(19, 3.6 * len(rows)), squeeze=False, dpi=110)
        for r, (d, case) in enumerate(rows):
            ex = examples[d][case]
            brain = ex["brain"]
            rr, cc = np.flatnonzero(brain.any(axis=1)), np.flatnonzero(brain.any(axis=0))
            crop = (slice(max(rr[0] - 2, 0), rr[-1] + 3), slice(max(cc[0] - 2, 0), cc[-1] + 3))
            panels = [("FLAIR (input z)", ex["flair"], None, None, "gray")]
            if ex["zct"] is not None:
                for k, c in enumerate(CONTRASTS):
                    vmax = ref_feats.get(f"Zct_{c}", {}).get("normal_p99") or float(np.nanpercentile(ex["zct"][k][brain], 99))
                    panels.append((f"Z_ct {c}", ex["zct"][k], 0, vmax, "magma"))
            e_ref = ref_feats["E"]
            panels.append(("raw energy E", ex["energy"], e_ref["normal_median"], e_ref["normal_p99"], "magma"))
            for col, (title, img, vmin, vmax, cmap) in enumerate(panels[:6]):
                ax = axes[r, col]
                shown = np.where(brain, img, np.nan)[crop]
                ax.imshow(shown, cmap=cmap, vmin=vmin, vmax=vmax, interpolation="nearest")
                ax.contour(ex["label"][crop].astype(float), levels=[0.5], colors="cyan", linewidths=0.8)
                ax.set_xticks([])
                ax.set_yticks([])
                ax.set_title(title if r == 0 else title, fontsize=10)
            axes[r, 0].set_ylabel(f"{d}\n{case}\nslice {ex['slice']} ({ex['n_lesions']} lesions)", fontsize=9)
        fig.suptitle(f"cyan: reference outline; Z_ct colour range 0 … p99 of normal {reference} pixels, "
                     f"E: median … p99 of normal {reference} pixels (model {label})", fontsize=10)
        fig.tight_layout()
        written.append(folder / "domain_ms_example.png")
        fig.savefig(written[-1])
        plt.close(fig)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", action="append", help="model file (repeatable; required unless --replot)")
    parser.add_argument("--domains", default=str(REPO / "benchmarks" / "domains.json"))
    parser.add_argument("-o", "--output", default="runs/domain_analysis")
    parser.add_argument("--docs", default=None, help="docs folder: figures go to <docs>/figures")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--only", nargs="*", default=None, help="analyse only these domains")
    parser.add_argument("--max-cases", type=int, default=None, help="at most this many cases per domain")
    parser.add_argument("--replot", action="store_true", help="only redraw the figures from <output>/results.pkl")
    args = parser.parse_args(argv)
    if args.replot:
        with open(Path(args.output) / "results.pkl", "rb") as handle:
            results = pickle.load(handle)
        print(", ".join(map(str, write_figures(results, Path(args.docs) / "figures" if args.docs else args.output))))
        return 0
    if not args.model:
        parser.error("--model is required")

    import torch

    from ADMAnomalyLib.domains import load_domains

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    domains = load_domains(args.domains)
    if args.only:
        domains = {d: c for d, c in domains.items() if d in args.only}
    if args.max_cases:
        domains = {d: c[: args.max_cases] for d, c in domains.items()}
    start = time.perf_counter()
    results = analyse(args.model, domains, device=args.device)
    results["settings"]["command"] = " ".join([Path(sys.executable).name, *sys.argv]) if argv is None else argv
    results["settings"]["seconds"] = round(time.perf_counter() - start, 1)
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    (out / "domain_analysis.json").write_text(json.dumps(to_json(results), indent=1), encoding="utf-8")
    (out / "tables.md").write_text(tables_markdown(results), encoding="utf-8")
    with open(out / "results.pkl", "wb") as handle:  # with the example slices: --replot redraws from it
        pickle.dump(results, handle)
    figures = write_figures(results, Path(args.docs) / "figures" if args.docs else out)
    print(f"wrote {out / 'domain_analysis.json'}, {out / 'tables.md'} and {', '.join(map(str, figures))}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
