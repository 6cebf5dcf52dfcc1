"""The study's report: the table, the comparisons and ``docs/results.md`` with its figures, all
made from the study JSON."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Sequence

from ..io import write_text_atomic
from .methods import BUNDLED_METHOD
from .runner import SUMMARY_METRICS

# report


METRIC_LABELS = {"auprc": "AUPRC (headline)", "auroc": "AUROC", "dice": "Dice @ val. threshold",
                 "best_dice": "best Dice (oracle)", "precision": "precision @ val.", "recall": "recall @ val.",
                 "auprc_threshold_relative": "AUPRC, each run's scores minus its threshold"}


def _summary_cells(summary: dict[str, Any], methods: list[str], metrics: Sequence[str],
                   bold: bool = True) -> dict[tuple[str, str], str]:
    """``mean ± sd`` of every (method, metric), 'n/a' when missing, the best of each column in bold."""
    best = {k: max((summary[m][k]["mean"] for m in methods if summary[m][k]["mean"] is not None), default=None)
            for k in metrics}
    cells = {}
    for m in methods:
        for k in metrics:
            mean, sd = summary[m][k]["mean"], summary[m][k]["sd"]
            text = "n/a" if mean is None else f"{mean:.3f}" + (f" ± {sd:.3f}" if sd is not None else "")
            is_best = mean is not None and best[k] is not None and abs(mean - best[k]) < 5e-4
            cells[m, k] = f"**{text}**" if bold and is_best else text
    return cells


def format_table(study: dict[str, Any], markdown: bool = True) -> str:
    """The results table (mean +- sd over runs), best value per column in bold."""
    summary = study["summary"]
    order = ("auprc", "auroc", "dice", "best_dice", "precision", "recall")
    methods = list(summary)
    cell = _summary_cells(summary, methods, order, bold=markdown)
    header = ["method", "group"] + [METRIC_LABELS[k] for k in order]
    rows = [[m, study["methods"][m]["group"]] + [cell[m, k] for k in order] for m in methods]
    if not markdown:
        widths = [max(len(str(r[i])) for r in [header] + rows) for i in range(len(header))]
        return "\n".join("  ".join(str(v).ljust(w) for v, w in zip(r, widths)) for r in [header] + rows)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def comparison_lines(study: dict[str, Any], reference: str = "FLAIR z") -> list[str]:
    """Plain statements of where each ADM variant wins or loses against ``reference``, from the JSON."""
    summary = study["summary"]
    if reference not in summary:
        return []
    lines = []
    for method, group in ((m, study["methods"][m]["group"]) for m in summary):
        if method == reference or not method.startswith("ADM"):
            continue
        wins, losses = [], []
        for k in SUMMARY_METRICS:
            # .get: studies recorded before a metric was added lack it
            a, b = summary[method].get(k, {}).get("mean"), summary[reference].get(k, {}).get("mean")
            if a is None or b is None:
                continue
            (wins if a > b else losses).append(f"{METRIC_LABELS[k].split(' (')[0]} {a:.3f} vs {b:.3f}")
        verdict = "beats" if not losses else ("loses to" if not wins else "is mixed against")
        lines.append(f"- **{method}** ({group}) {verdict} {reference}"
                     + (f"; better: {', '.join(wins)}" if wins else "")
                     + (f"; worse: {', '.join(losses)}" if losses else "") + ".")
    return lines


def _in_domain_lines(study: dict[str, Any], figures: dict[str, str]) -> list[str]:
    """The patient-fold (in-domain) part of ``docs/results.md``."""
    s = study["settings"]
    n_runs = len(study["runs"])
    seeds = s["seeds"]
    lines = [
        "## In-domain: patient-level folds",
        "",
        f"- **Command:** `{study.get('command') or 'admanomaly study'}`",
        f"- **Setting:** `{s['name']}`: {s['n_folds']} patient-level folds x {len(seeds)} seed(s) "
        f"({', '.join(map(str, seeds))}) = {n_runs} runs; preset `{s['preset']}` at "
        f"{s['image_size']}x{s['image_size']}, {s['epochs_ctoc']} CtoC + {s['epochs_joint']} joint epochs, "
        f"lesion margin {s['lesion_margin']} slices.",
        f"- **Data:** {len(study['cases'])} labelled cases from `{study['data_dir']}`; folds: "
        + "; ".join(f"fold {i + 1}: {', '.join(f)}" for i, f in enumerate(study["folds"])) + ".",
        *_provenance_lines(study),
        "",
        "### Protocol",
        "",
        "No patient is in both training and test. Learned methods train on the training patients' "
        "tumour-free axial slices (at least the lesion margin away from any lesion). Every method's "
        "threshold is its best-F1 threshold on the brain voxels of the training patients' lesion slices "
        "(validation). Metrics are computed on **every brain voxel of the test patients at native "
        "1 mm resolution**, the same voxels for every method; AUROC and AUPRC pool the voxels of a run's "
        "test brains. *Dice @ val. threshold* uses the validation threshold (an honest operating point); "
        "*best Dice (oracle)* is the best Dice over all thresholds on the test voxels themselves and is an "
        "upper bound, labelled as such. Each run is one (fold, seed); the table gives mean ± sd over the "
        f"{n_runs} runs (sd over folds{' and seeds' if len(seeds) > 1 else ''}).",
        "",
        "### Results",
        "",
        format_table(study),
        "",
        "Methods:",
        "",
    ]
    for m, info in study["methods"].items():
        lines.append(f"- `{m}` ({info['group']}): {info['description']}"
                     + (f"; post-processing {_post_text(info['postprocess'])}" if info.get("postprocess")
                        and _post_text(info["postprocess"]) else ""))
    chosen = _chosen_lines(study, lambda run: f"fold {run['fold'] + 1}")
    if chosen:
        lines += ["- Post-processing values chosen on validation per run (w: score = E z-scored over the "
                  "case's brain + w x FLAIR z, i.e. `postprocess.flair_weight`):"] + chosen
    lines += ["", "### Against the FLAIR z-score", ""] + comparison_lines(study) + [""]
    for reference in (m for m in study["summary"] if m.startswith("FLAIR z +med")):
        lines += [f"### Against {reference} (median filter + small-component removal)", ""]
        lines += comparison_lines(study, reference) + [""]
    lines += [
        "Published context (different data and splits, so only indicative): FLAIR thresholding reached a "
        "best-possible Dice of about 0.74 on BraTS and the best deep unsupervised methods about 0.76 "
        "(Meissen et al. 2021; Pinaya et al. 2022); a context-encoding VAE reached AUROC 0.95 on BraTS 2017 "
        "(Zimmerer et al. 2019). The ADM paper reports AUROC 0.939 and best F1 0.692 on BraTS 2019 with "
        "221 training patients; here there are "
        f"{len(study['runs'][0]['train'])} training patients per fold.",
        "",
        "### Figures",
        "",
    ]
    captions = {
        "curves": "ROC (left) and precision-recall (right) curves, test voxels of all folds pooled (first seed).",
        "examples": "Best and worst test case (per-case AUPRC of the best ADM variant): FLAIR, ground truth, "
                    "score maps and maps thresholded at the validation threshold, on the axial slice with "
                    "the largest lesion area.",
        "auroc_vs_size": "Per-case test AUROC against lesion volume.",
        "singularity": "Singularity experiment: joint-training loss with no guard, with DAGMM's diagonal "
                       "penalty and with the eigenvalue bound; a cross marks where a run broke down.",
    }
    for key, rel in figures.items():
        lines += [f"![{key}]({rel})", "", f"*{captions.get(key, key)}*", ""]
    sing = study.get("singularity") or {}
    if sing:
        setting = sing["setting"]
        lines += ["### Singularity experiment", "",
                  f"Setting: {setting['network']}, lambda = {setting['lambda_energy']:g} (large, to provoke the "
                  f"collapse), eps = {setting['eps']:g}, DAGMM penalty weight {setting['lambda_cov']:g}, "
                  f"{setting['image_size']}x{setting['image_size']} slices, batch {setting['batch_size']}, "
                  f"{setting['steps']} steps at most, {setting['training_slices']} normal slices, lr {setting['lr']:g}.",
                  ""]
        for guard, run in sing["runs"].items():
            fail = run["failure"]
            eig = run["min_eigenvalue"]
            f32 = run.get("float32_cholesky_failure_step")
            ratio = run.get("min_eigenvalue_ratio") or []
            lines.append(f"- **{guard}**: " + (f"broke down at step {fail['step']} ({fail['error']})" if fail else
                                               f"completed {run['steps_completed']} steps without a float64 failure")
                         + (f"; smallest covariance eigenvalue seen {min(eig):.3g}" if eig else "")
                         + (f", smallest eigenvalue ratio (min/max of one component) {min(ratio):.3g}" if ratio else "")
                         + (f"; numerically singular for float32 arithmetic from step {f32}" if f32 is not None
                            else "; never numerically singular in float32")
                         + (f"; final loss {run['loss'][-1]:.4g}." if run["loss"] else "."))
        lines += ["", "Breakdown criteria: *float64* — the engine's Cholesky factorisation of a batch covariance "
                  "fails (`SingularCovarianceError`, training cannot continue); *float32* — the smallest/largest "
                  "eigenvalue ratio of a component falls below float32's resolution (1.2e-7) or a float32 "
                  "Cholesky fails, where a float32 implementation such as the paper's would break down. The "
                  "engine keeps the mixture algebra in float64, which postpones the crash but not the "
                  "collapse: without a guard the likelihood keeps growing without limit (loss falling) as "
                  "the covariances degenerate."]
        lines.append("")
    return lines + _timing_lines(study)


def _provenance_lines(study: dict[str, Any]) -> list[str]:
    machine, git = study["machine"], study["git"]
    commit = (git.get("commit") or "unknown")[:12] + (" (with uncommitted changes)" if git.get("dirty") else "")
    return [f"- **Commit:** `{commit}`; finished {study['finished']}; runtime {study['runtime_s'] / 60:.1f} min.",
            f"- **Machine:** {machine.get('cpu_model', machine.get('processor'))}, {machine.get('cpu_count')} CPU "
            f"cores, device `{machine.get('device')}`{', ' + machine['gpu'] if machine.get('gpu') else ''}; "
            f"torch {machine.get('torch')}, Python {machine.get('python')}."]


def _timing_lines(study: dict[str, Any]) -> list[str]:
    lines = ["#### Timings", "", "| part | seconds |", "|---|---|"]
    lines += [f"| {k} | {v:.0f} |" for k, v in sorted(study["timings_s"].items(), key=lambda kv: -kv[1])]
    return lines + [""]


def _chosen_lines(study: dict[str, Any], run_name) -> list[str]:
    """One line per method whose post-processing was chosen on validation: the values of every run."""
    lines = []
    for method in study["summary"]:
        values = []
        for run in study["runs"]:
            result = run["methods"].get(method) or {}
            chosen = result.get("chosen") or ({"flair_weight": result["flair_weight"]}
                                              if result.get("flair_weight") is not None else {})
            if result.get("load"):
                chosen = {**chosen, "load_weight": result["load"]["weight"]}
            if chosen:
                text = ", ".join(f"{_SHORT.get(k, k)} {'off' if v is None else format(v, 'g')}"
                                 for k, v in chosen.items())
                values.append(f"{run_name(run)} (seed {run['seed']}): {text}")
        if values:
            lines.append(f"  - `{method}`: " + "; ".join(values) + ".")
    return lines


_SHORT = {"smoothing_sigma_mm": "smoothing sigma (mm)", "rim_erosion_mm": "rim (mm)", "flair_weight": "w",
          "median_size_mm": "median (mm)", "final_smoothing_sigma_mm": "final sigma (mm)",
          "flair_sheet_weight": "FLAIR sheet weight", "score_sheet_weight": "score sheet weight", "load_weight": "load weight",
          "energy_gate_z": "energy gate (FLAIR z)", "shared_hyperintensity_weight": "FLAIR-and-T2 weight"}


def _is_adm(study: dict[str, Any], method: str) -> bool:
    kind = study["methods"][method].get("kind")
    return kind == "adm" if kind else method.startswith("ADM")


DOMAIN_METRICS = ("auprc", "auroc", "best_dice", "dice")


POOL_METRICS = ("auprc_threshold_relative",)
"""Shown where a block pools runs fitted on different domains (studies from before it was recorded lack it)."""


def _domain_table(summary: dict[str, Any], methods: list[str]) -> str:
    """One block of the leave-one-domain-out table (mean +- sd over seeds), best per column in bold."""
    metrics = DOMAIN_METRICS + tuple(k for k in POOL_METRICS
                                     if any(summary[m].get(k, {}).get("mean") is not None for m in methods))
    cell = _summary_cells(summary, methods, metrics)
    lines = ["| method | " + " | ".join(METRIC_LABELS[k] for k in metrics) + " |",
             "|---|" + "---|" * len(metrics)]
    lines += [f"| {m} | " + " | ".join(cell[m, k] for k in metrics) + " |" for m in methods]
    return "\n".join(lines)


def _best(summary: dict[str, Any], methods: list[str], metric: str) -> tuple[str | None, float | None]:
    scored = [(summary[m][metric]["mean"], m) for m in methods if summary[m][metric]["mean"] is not None]
    if not scored:
        return None, None
    value, method = max(scored)
    return method, value


def domain_verdict(study: dict[str, Any], summary: dict[str, Any]) -> str:
    """Whether the best ADM row beats the best strong baseline on AUPRC and on Dice at the validation
    threshold, and whether raw ADM beats raw FLAIR z on AUPRC (one block's summary)."""
    methods = list(summary)
    adm = [m for m in methods if _is_adm(study, m)]
    baselines = [m for m in methods if study["methods"][m]["group"] == "baseline"]
    parts = []
    for metric in ("auprc", "dice"):
        (a, va), (b, vb) = _best(summary, adm, metric), _best(summary, baselines, metric)
        if a is None or b is None:
            continue
        verdict = "beats" if va > vb else "does not beat"
        parts.append(f"on {METRIC_LABELS[metric].split(' (')[0]} the best ADM ({a}, {va:.3f}) {verdict} the best "
                     f"strong baseline ({b}, {vb:.3f})")
    raw_flair = summary.get(RAW_REFERENCE, {}).get("auprc", {})
    for network in (m for m in RAW_NETWORK_METHODS if m in summary):
        raw_adm = summary[network].get("auprc", {})
        if raw_adm.get("mean") is not None and raw_flair.get("mean") is not None:
            verdict = "beats" if raw_adm["mean"] > raw_flair["mean"] else "does not beat"
            parts.append(f"the raw {network} energy ({raw_adm['mean']:.3f}) {verdict} raw FLAIR z "
                         f"({raw_flair['mean']:.3f}) on AUPRC")
    return "; ".join(parts) + "." if parts else "no comparison possible."


def _left_out_text(left_out: Sequence[str], domains: dict[str, Any]) -> str:
    if len(left_out) == len(domains):
        return f"{len(domains)} domains"
    return f"{len(domains)} domains, {len(left_out)} of them left out ({', '.join(left_out)})"


def _domain_lines(study: dict[str, Any], figures: dict[str, str] | None = None) -> list[str]:
    """The leave-one-domain-out part of ``docs/results.md``; ``figures``: {key: path relative to docs}."""
    s = study["settings"]
    seeds = s["seeds"]
    domains = study["domains"]
    left_out = list(study["domain_summary"])  # every domain, or those a --left-out study named
    baselines = [m for m in study["summary"] if not _is_adm(study, m)]
    methods = baselines + [m for m in study["summary"] if _is_adm(study, m)]  # ADM rows beside the baselines
    lines = [
        "## Leave-one-domain-out",
        "",
        f"- **Command:** `{study.get('command') or 'admanomaly study --domains'}`",
        f"- **Setting:** `{s['name']}`: {_left_out_text(left_out, domains)} x {len(seeds)} seed(s) ({', '.join(map(str, seeds))}); "
        f"preset `{s['preset']}` at {s['image_size']}x{s['image_size']}, {s['epochs_ctoc']} CtoC + "
        f"{s['epochs_joint']} joint epochs, lesion margin {s['lesion_margin']} slices.",
        f"- **Domains** (`{study.get('domains_file')}`): "
        + "; ".join(f"{name}: {len(ids)} case(s)" for name, ids in domains.items()) + ".",
        *_provenance_lines(study),
        "",
        "### Protocol",
        "",
        f"{'Each domain' if len(left_out) == len(domains) else 'Each domain left out'} in turn is the test set. "
        "The networks train on the tumour-free slices of every case of "
        "the *other* domains; every data-driven choice (FLAIR weight, post-processing, threshold) is made on "
        "the validation voxels (brain voxels of lesion slices) of the training domains only, with the mean "
        "over training domains of the per-domain criterion (AUPRC for score choices, Dice for the threshold), "
        "so the largest domain does not dictate. Metrics are computed on every brain voxel of the left-out "
        "domain's cases. A domain's block gives mean ± sd over seeds; *pooled* pools the voxels of every "
        "left-out test case of a seed (each thresholded at its own run's threshold), mean ± sd over seeds; "
        "a *Pooled:* block does the same for the domains the domains file groups into one pool. Runs fitted on "
        "different domains score on different scales, so a pooled block also gives the AUPRC of the pooled voxels "
        "with each run's threshold subtracted from its scores (where the study recorded it): the curve on which "
        "the pooled Dice at threshold lies. In *+cc* rows Dice, precision and recall read the label without its "
        f"regions under {study['settings'].get('min_component_mm3', 20.0):g} mm³, the label `predict` writes with "
        "`postprocess.min_component_mm3`; AUROC, AUPRC and best Dice read the scores (studies run before the "
        "thirty-ninth round read them with those regions lowered to just below the threshold, about 0.001 apart).",
        "",
    ]
    blocks = [(f"Test domain: {name} ({len(domains[name])} case(s))", study["domain_summary"][name])
              for name in left_out]
    blocks += [(f"Pooled: {pool} ({', '.join(members)}; "
                f"{sum(len(domains[d]) for d in members)} case(s), each left out with its domain)",
                study["pool_summary"][pool]) for pool, members in study.get("pools", {}).items()]
    blocks += [("Pooled over all left-out test cases", study["summary"])]
    for title, summary in blocks:
        lines += [f"### {title}", "", _domain_table(summary, methods), "", f"Verdict: {domain_verdict(study, summary)}",
                  ""]
    lines += _domain_figure_lines(study, figures or {})
    chosen = _chosen_lines(study, lambda run: f"test {run['domain']}")
    if chosen:
        lines += ["Post-processing chosen on the training domains' validation voxels:", ""] + chosen + [""]
    lines += ["Methods:", ""]
    lines += [f"- `{m}` ({info['group']}): {info['description']}" for m, info in study["methods"].items()]
    return lines + [""] + _timing_lines(study)


# -- leave-one-domain-out figures --------------------------------------------------------------------

# Drawn in this order where the JSON has them; other methods are left out of the figures.
DOMAIN_KEY_METHODS = ("FLAIR z +med3+cc", "FLAIR z +med5+cc", "FLAIR z", "ADM", "ADM +post", "ADM+", "ADM+ +post",
                      "ADM+ +post+cc (z)", "ADM+ FT2 +post+cc (z)", "ADM+ F +post+cc (normal)", "ADM+ F +post+cc (z)",
                      "ADM+ F +post+cc (z+load)", "FLAIR z +asym +med5+cc", "ADM+ F +asym +post+cc (z+load)",
                      "FLAIR z N4 +T2g +med5 +fsm+cc", BUNDLED_METHOD)
RAW_NETWORK_METHODS = ("ADM", "ADM robust-norm", "ADM site-aug", "ADM unc", "ADM+", "ADM+ FT2", "ADM+ F", "ADM+ F>",
                       "ADM+ F> ct", "ADM cm", "ADM+ F cm", "ADM cm*", "ADM+ F cm*")
RAW_REFERENCE = "FLAIR z"
# One colour per method, shared by both figures (tab20 then tab20b: up to forty methods).
_FIGURE_METHODS = tuple(dict.fromkeys(DOMAIN_KEY_METHODS + RAW_NETWORK_METHODS))

DOMAIN_FIGURE_FILES = {"auprc_dice": "domains_auprc_dice.png", "raw_vs_flair": "domains_raw_vs_flair.png"}


def _domain_panels(study: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """(label, summary) of every left-out domain, of every pool of domains the study reports (e.g. all BraTS
    gliomas, the figure the issue's BraTS target is on), then of all pooled test cases."""
    pools = [(f"pool: {name}", summary) for name, summary in study.get("pool_summary", {}).items()]
    return list(study["domain_summary"].items()) + pools + [("pooled", study["summary"])]


def _present_methods(panels: list[tuple[str, dict[str, Any]]], wanted: Sequence[str]) -> list[str]:
    """The methods of ``wanted`` (in its order) that some panel has."""
    return [m for m in wanted if any(m in summary for _, summary in panels)]


def _method_colour(method: str) -> tuple[float, float, float]:
    from matplotlib import colormaps

    palette = colormaps["tab20"].colors + colormaps["tab20b"].colors
    index = _FIGURE_METHODS.index(method) if method in _FIGURE_METHODS else len(_FIGURE_METHODS)
    return palette[index % len(palette)]


def _metric_value(summary: dict[str, Any], method: str, metric: str) -> tuple[float | None, float | None]:
    """(mean, sd) of one method's metric in one panel; (None, None) where the panel lacks it."""
    row = (summary.get(method) or {}).get(metric) or {}
    return row.get("mean"), row.get("sd")


def _grouped_bars(axis, panels: list[tuple[str, dict[str, Any]]], methods: list[str], metric: str) -> None:
    """Bars of ``metric`` grouped by panel (domain), one bar per method, sd error bars where known."""
    width = 0.8 / len(methods)
    for slot, method in enumerate(methods):
        offset = (slot - (len(methods) - 1) / 2) * width
        bars = [(index + offset, *_metric_value(summary, method, metric)) for index, (_, summary) in enumerate(panels)]
        bars = [(x, mean, sd) for x, mean, sd in bars if mean is not None]
        if not bars:
            continue
        xs, means, sds = zip(*bars)
        errors = [sd or 0.0 for sd in sds] if any(sd is not None for sd in sds) else None
        axis.bar(xs, means, width=width * 0.95, yerr=errors, capsize=2 if errors else 0,
                 color=_method_colour(method), label=method, error_kw={"linewidth": 0.9})
    axis.set_xticks(range(len(panels)))
    axis.set_xticklabels([label for label, _ in panels])
    axis.set_ylim(bottom=0)
    axis.grid(axis="y", alpha=0.3)


def _bars_figure(panels: list[tuple[str, dict[str, Any]]], methods: list[str], metrics: Sequence[str],
                 title: str, path: Path) -> Path:
    """One row of grouped bars per metric, domains along x, a shared legend below."""
    from .. import figures as fig

    plt = fig._plt()
    width = max(7.0, 1.0 + len(panels) * (0.35 * len(methods) + 0.6))
    figure, axes = plt.subplots(len(metrics), 1, figsize=(width, 3.4 * len(metrics) + 1.0), squeeze=False)
    for axis, metric in zip(axes[:, 0], metrics):
        _grouped_bars(axis, panels, methods, metric)
        axis.set_ylabel(METRIC_LABELS[metric].split(" (")[0])
    axes[-1, 0].set_xlabel("left-out test domain")
    axes[0, 0].set_title(title)
    handles, labels = axes[0, 0].get_legend_handles_labels()
    figure.legend(handles, labels, loc="lower center", ncol=min(len(labels), 4), fontsize=9, frameon=False)
    figure.tight_layout(rect=(0, 0.06 + 0.03 * ((len(labels) - 1) // 4), 1, 1))
    fig._save(plt, figure, path, dpi=110, tight=False)
    return path


def domain_auprc_dice_figure(study: dict[str, Any], path: Path) -> Path | None:
    """AUPRC and Dice at the validation threshold of the key methods, per left-out domain and pooled."""
    panels = _domain_panels(study)
    methods = _present_methods(panels, DOMAIN_KEY_METHODS)
    if not methods:
        return None
    return _bars_figure(panels, methods, ("auprc", "dice"),
                        "Leave-one-domain-out: strong baselines, FLAIR z and ADM", path)


def domain_raw_vs_flair_figure(study: dict[str, Any], path: Path) -> Path | None:
    """AUPRC of every network's raw energy (no post-processing) beside raw FLAIR z, per domain and pooled."""
    panels = _domain_panels(study)
    networks = _present_methods(panels, RAW_NETWORK_METHODS)
    if not networks:
        return None
    methods = _present_methods(panels, (RAW_REFERENCE,)) + networks
    return _bars_figure(panels, methods, ("auprc",), "Raw energies against raw FLAIR z (no post-processing)", path)


def domain_figures(study: dict[str, Any], figure_dir: Path) -> dict[str, Path]:
    """Draw the leave-one-domain-out figures into ``figure_dir``; returns {key: path} of those written."""
    drawers = {"auprc_dice": domain_auprc_dice_figure, "raw_vs_flair": domain_raw_vs_flair_figure}
    written = {key: draw(study, Path(figure_dir) / DOMAIN_FIGURE_FILES[key]) for key, draw in drawers.items()}
    return {key: path for key, path in written.items() if path is not None}


def _domain_figure_lines(study: dict[str, Any], figures: dict[str, str]) -> list[str]:
    """The figures of the domain section, each with its one-line caption."""
    if not figures:
        return []
    spread = "; error bars: sd over seeds" if len(study["settings"]["seeds"]) > 1 else ""
    groups = "per left-out domain, per pool of domains and over all test cases" if study.get("pool_summary") else \
        "per left-out domain and pooled"
    captions = {
        "auprc_dice": "AUPRC (top) and Dice at the threshold chosen on the training domains (bottom) of the "
                      f"strong baselines, FLAIR z and ADM, {groups}{spread}.",
        "raw_vs_flair": "Does the learned energy beat raw FLAIR? AUPRC of each network's raw energy (no "
                        f"post-processing) beside raw FLAIR z, {groups}{spread}.",
    }
    if BUNDLED_METHOD in study["summary"]:  # the figure's colours do not single it out
        captions["auprc_dice"] += f" The bundled configuration is `{BUNDLED_METHOD}`."
    lines = ["### Figures", ""]
    for key, rel in figures.items():
        lines += [f"![{key}]({rel})", "", f"*{captions.get(key, key)}*", ""]
    return lines


def write_report(studies: dict[str, Any] | Sequence[dict[str, Any]], docs_dir: str | Path,
                 figures: dict[str, str], domain_figures: dict[str, str] | None = None) -> Path:
    """``docs/results.md`` from study JSONs (every number comes from them): the in-domain section of
    a patient-fold study and the leave-one-domain-out section of a domain study, either or both.
    ``figures`` / ``domain_figures``: {key: path relative to ``docs_dir``} of each section's figures."""
    studies = [studies] if isinstance(studies, dict) else list(studies)
    lines = ["# Evaluation study: ADM against its ablations and simple baselines", "",
             "Generated by `ADMAnomalyLib.study.write_report` from `study.json`; no number here is typed by hand.",
             ""]
    drawn: set[str] = set()  # each section's figures are the first study's of its split (make_report)
    for study in studies:
        split = study.get("split", "patients")
        if split == "domains":
            lines += _domain_lines(study, domain_figures if split not in drawn else None)
        else:
            lines += _in_domain_lines(study, figures if split not in drawn else {})
        drawn.add(split)
    lines += ["## Data citation", "",
              "BraTS: Menze et al., IEEE TMI 34(10), 2015; Bakas et al., Scientific Data 4:170117, 2017; "
              "Bakas et al., arXiv:1811.02629, 2018.", ""]
    path = Path(docs_dir) / "results.md"
    write_text_atomic("\n".join(lines), path)
    return path


def _post_text(post: dict[str, Any]) -> str:
    parts = []
    if post.get("flip_tta"):
        parts.append("flip TTA")
    if post.get("case_mixture"):
        share = post.get("case_mixture_share", 1.0)
        parts.append("each case's own mixture" + ("" if share == 1 else f" ({share:g} of the energy, the frozen "
                                                                        "mixture the rest)"))
    if post.get("smoothing_sigma_mm"):
        parts.append(f"Gaussian sigma {post['smoothing_sigma_mm']:g} mm")
    if post.get("rim_erosion_mm"):
        parts.append(f"rim {post['rim_erosion_mm']:g} mm suppressed")
    if post.get("median_size_mm"):
        parts.append(f"median {post['median_size_mm']:g} mm")
    elif post.get("median_size"):  # study JSONs before mm-sized medians
        parts.append(f"median {post['median_size']} voxels")
    if post.get("final_smoothing_sigma_mm"):
        parts.append(f"then Gaussian sigma {post['final_smoothing_sigma_mm']:g} mm")
    if post.get("standardise", "none") != "none":
        parts.append(f"{post['standardise']} per-case standardisation (last)")
    return ", ".join(parts)


def make_report(study_jsons: str | Path | Sequence[str | Path], docs_dir: str | Path) -> Path:
    """Figures (``docs/figures/*.png``) and ``docs/results.md`` from one or more study JSONs (a
    patient-fold study and leave-one-domain-out studies); the patient-fold figures come from the first
    patient-fold study, the domain figures from every domain study of the first one's domains (each
    method's figures from the first study that has it: later runs add rows, the networks are shared)."""
    from .. import figures as fig

    paths = [Path(study_jsons)] if isinstance(study_jsons, (str, Path)) else [Path(p) for p in study_jsons]
    studies = [json.loads(path.read_text(encoding="utf-8")) for path in paths]
    docs_dir = Path(docs_dir)
    figure_dir = docs_dir / "figures"
    relative: dict[str, str] = {}
    domain_relative: dict[str, str] = {}
    for path, study in zip(paths, studies):
        if study.get("split", "patients") != "domains" and not relative:
            figure_dir.mkdir(parents=True, exist_ok=True)
            written = fig.all_figures(study, figure_dir, path.parent)
            relative = {k: os.path.relpath(v, docs_dir) for k, v in written.items()}
    domain_studies = [study for study in studies if study.get("split") == "domains"]
    if domain_studies:
        figure_dir.mkdir(parents=True, exist_ok=True)
        written = domain_figures(merged_domain_summaries(domain_studies), figure_dir)
        domain_relative = {k: os.path.relpath(v, docs_dir) for k, v in written.items()}
    return write_report(studies, docs_dir, relative, domain_relative)


def merged_domain_summaries(studies: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The first leave-one-domain-out study with the pooled and per-domain summaries of the methods
    that only later studies of the same domains and the same training setting have (a method keeps its
    first study's figures; a study at another slice size, epochs, preset or seeds stays apart)."""
    merged = dict(studies[0])
    merged["summary"] = dict(studies[0]["summary"])
    merged["domain_summary"] = {name: dict(values) for name, values in studies[0]["domain_summary"].items()}
    for study in studies[1:]:
        if (list(study["domains"]) != list(merged["domains"]) or _setting(study) != _setting(merged)
                or list(study["domain_summary"]) != list(merged["domain_summary"])):  # another set left out
            continue
        for method, values in study["summary"].items():
            merged["summary"].setdefault(method, values)
        for name, summary in study["domain_summary"].items():
            for method, values in summary.items():
                merged["domain_summary"][name].setdefault(method, values)
    return merged


_SETTING_FIELDS = ("image_size", "epochs_ctoc", "epochs_joint", "preset", "seeds")


def _setting(study: dict[str, Any]) -> list:
    """What makes two studies' networks comparable: slice size, epochs, preset and seeds."""
    return [study.get("settings", {}).get(field) for field in _SETTING_FIELDS]
