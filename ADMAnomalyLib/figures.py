"""Figures of the evaluation study (matplotlib, imported lazily: the engine never needs it).

Every figure is drawn from the study JSON, except the example-slice grid, which also reads the
``examples.npz`` the study writes beside its JSON (it holds image data, so it is not kept in docs).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(plt, fig, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _style(method: str, group: str) -> dict[str, Any]:
    if group == "baseline":
        return {"linestyle": "--", "linewidth": 1.3}
    if group == "paper":
        return {"linestyle": "-", "linewidth": 1.3 if method != "ADM" else 2.2}
    return {"linestyle": "-.", "linewidth": 1.6}


def curves_figure(study: dict[str, Any], path: Path) -> Path:
    plt = _plt()
    fig, (roc, pr) = plt.subplots(1, 2, figsize=(12, 7.4))
    cmap = plt.get_cmap("tab20")
    for number, (method, curve) in enumerate(study["curves"].items()):
        group = study["methods"][method]["group"]
        summary = study["summary"][method]
        style = {**_style(method, group), "color": cmap((2 * number) % 20 + (number // 10) % 2)}
        roc.plot(curve["fpr"], curve["tpr"], label=f"{method} ({summary['auroc']['mean']:.3f})", **style)
        pr.plot(curve["tpr"], curve["precision"], label=f"{method} ({summary['auprc']['mean']:.3f})", **style)
    roc.plot([0, 1], [0, 1], color="0.7", linewidth=0.8)
    roc.set(xscale="log", xlim=(1e-4, 1), ylim=(0, 1.01), xlabel="false positive rate (log)",
            ylabel="true positive rate", title="ROC, test brains (legend: mean AUROC)")
    pr.set(xlim=(0, 1), ylim=(0, 1.01), xlabel="recall", ylabel="precision",
           title="Precision-recall, test brains (legend: mean AUPRC)")
    for axis in (roc, pr):
        axis.grid(alpha=0.3)
        # Below the plot: inside it, the legend hides the best methods' curves (top right of PR).
        axis.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=2, frameon=False)
    _save(plt, fig, path)
    return path


def examples_figure(study: dict[str, Any], npz_path: Path, path: Path) -> Path | None:
    meta = study.get("examples") or {}
    if not meta or not npz_path.exists():
        return None
    plt = _plt()
    data = np.load(npz_path)
    methods = meta["methods"]
    tags = [t for t in ("best", "worst") if t in meta["cases"]]
    columns = 2 + 2 * len(methods)
    fig, axes = plt.subplots(len(tags), columns, figsize=(2.1 * columns, 2.4 * len(tags)), squeeze=False)
    for row, tag in enumerate(tags):
        info = meta["cases"][tag]
        brain = data[f"{tag}_brain"]
        panels = [(data[f"{tag}_flair"], "FLAIR", "gray"), (data[f"{tag}_label"], "ground truth", "gray")]
        for m in methods:
            score = data[f"{tag}_{m}"]
            # Method names are long; the name goes on its own line so neighbouring titles do not overlap.
            panels.append((np.where(brain, score, np.nan), f"{m}\nscore", "magma"))
            panels.append(((score >= info["thresholds"][m]) & brain, f"{m}\n> val. threshold", "gray"))
        for col, (image, title, cmap) in enumerate(panels):
            axis = axes[row, col]
            shown = np.asarray(image, dtype=float)
            if cmap == "magma" and np.isfinite(shown).any():
                low, high = np.nanpercentile(shown, [1, 99.5])
                axis.imshow(shown, cmap=cmap, vmin=low, vmax=high)
            else:
                axis.imshow(shown, cmap=cmap)
            axis.set_xticks([])
            axis.set_yticks([])
            axis.set_title(title, fontsize=7)
        axes[row, 0].set_ylabel(f"{tag}: {info['case_id'].replace('Brats18_', '')}\nAUPRC {info['auprc']:.2f}",
                                fontsize=7)
    _save(plt, fig, path)
    return path


def auroc_vs_size_figure(study: dict[str, Any], path: Path) -> Path:
    plt = _plt()
    fig, axis = plt.subplots(figsize=(6.5, 4.5))
    seed0 = study["runs"][0]["seed"]
    shown = [m for m in ("ADM", "FLAIR z") if m in study["summary"]]
    improved = [m for m in study["summary"] if study["methods"][m]["group"] == "improvement"]
    if improved:
        shown.append(max(improved, key=lambda m: study["summary"][m]["auprc"]["mean"] or -1))
    for marker, method in zip("osD^", shown):
        xs, ys = [], []
        for run in study["runs"]:
            if run["seed"] != seed0:
                continue
            for row in run["methods"][method]["per_case"]:
                xs.append(row["lesion_ml"])
                ys.append(row["auroc"])
        axis.scatter(xs, ys, marker=marker, label=method, alpha=0.8)
    axis.set(xscale="log", xlabel="lesion volume (ml, log)", ylabel="per-case AUROC",
             title="Per-case AUROC against lesion size (test cases)")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    _save(plt, fig, path)
    return path


def singularity_figure(study: dict[str, Any], path: Path) -> Path | None:
    sing = study.get("singularity")
    if not sing:
        return None
    plt = _plt()
    fig, (loss_axis, eig_axis) = plt.subplots(1, 2, figsize=(11, 4.2))
    for guard, run in sing["runs"].items():
        steps = np.arange(len(run["loss"]))
        style = {"none": {"linewidth": 2.6, "alpha": 0.7}, "diagonal penalty": {"linewidth": 1.4},
                 "eigenvalue bound": {"linewidth": 1.4, "linestyle": "--"}}.get(guard, {})
        line, = loss_axis.plot(steps, run["loss"], label=guard, **style)
        eig_axis.plot(steps, np.maximum(run["min_eigenvalue"], 1e-300) if run["min_eigenvalue"] else [],
                      color=line.get_color(), label=guard, **style)
        marks = []
        if run.get("float32_cholesky_failure_step") is not None:
            marks.append((run["float32_cholesky_failure_step"], "float32 breakdown"))
        if run["failure"]:
            marks.append((run["failure"]["step"], "breaks down"))
        for number, (step, text) in enumerate(marks):
            y = run["loss"][min(step, len(run["loss"]) - 1)] if run["loss"] else 0.0
            loss_axis.plot([step], [y], "x", color=line.get_color(), markersize=12, markeredgewidth=2.5)
            loss_axis.annotate(f"{guard}: {text} (step {step})", (step, y), textcoords="offset points",
                               xytext=(5, 12 + 12 * number), fontsize=7, color=line.get_color())
    loss_axis.set(xlabel="step", ylabel="joint loss", title="Joint training loss")
    eig_axis.set(xlabel="step", ylabel="smallest covariance eigenvalue", yscale="log",
                 title="Smallest eigenvalue of the batch covariances")
    eig_axis.axhline(sing["setting"]["eps"], color="0.5", linestyle=":", label="eps")
    for axis in (loss_axis, eig_axis):
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    _save(plt, fig, path)
    return path


def all_figures(study: dict[str, Any], figure_dir: Path, study_dir: Path) -> dict[str, Path]:
    """Draw every figure into ``figure_dir``; returns {key: path} of those written."""
    figure_dir = Path(figure_dir)
    written: dict[str, Path | None] = {
        "curves": curves_figure(study, figure_dir / "roc_pr_curves.png") if study.get("curves") else None,
        "examples": examples_figure(study, Path(study_dir) / (study.get("examples") or {}).get("file", "examples.npz"),
                                    figure_dir / "example_slices.png"),
        "auroc_vs_size": auroc_vs_size_figure(study, figure_dir / "auroc_vs_lesion_size.png"),
        "singularity": singularity_figure(study, figure_dir / "singularity.png"),
    }
    if written["examples"] is None and (figure_dir / "example_slices.png").exists():
        # The slice data (examples.npz) stays beside the run, not in docs; keep the earlier drawing.
        written["examples"] = figure_dir / "example_slices.png"
    return {k: v for k, v in written.items() if v is not None}
