"""Figures of the evaluation study (matplotlib, imported lazily: the engine never needs it).

Every figure is drawn from the study JSON, except the example-slice grid, which also reads the
``examples.npz`` the study writes beside its JSON (it holds image data, so it is not kept in docs).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import SimpleITK as sitk


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(plt, fig, path: Path, dpi: int = 110, tight: bool = True) -> None:
    import io

    from .io import write_bytes_atomic

    if tight:
        fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, dpi=dpi, format=Path(path).suffix.lstrip(".") or "png")
    plt.close(fig)
    write_bytes_atomic(buffer.getvalue(), path)


def case_overlay_figure(
    flair: "sitk.Image", energy: "sitk.Image", anomaly: "sitk.Image", label: "sitk.Image | None",
    brain: "sitk.Image", threshold: float, title: str, path: Path, n_slices: int = 4,
) -> Path:
    """A reading-room picture of one case: axial FLAIR slices in radiological display, the energy
    map as a heat overlay with its colour bar, the detection (E >= ``threshold``) and the reference
    lesion as outlines of distinct colours with a legend, slice positions, orientation letters and
    ``title`` (the metrics). Slices are chosen to show the best hit, the largest miss, the largest
    false positive and the largest reference lesion (as far as they differ)."""
    import SimpleITK as sitk

    plt = _plt()
    from matplotlib.lines import Line2D

    oriented = [sitk.DICOMOrient(image, "LPS") for image in (flair, energy, anomaly, brain)]
    flair_a, energy_a = (sitk.GetArrayFromImage(v).astype(np.float32) for v in oriented[:2])
    detected, inside = (sitk.GetArrayFromImage(v) > 0 for v in oriented[2:])
    reference = sitk.GetArrayFromImage(sitk.DICOMOrient(label, "LPS")) != 0 if label is not None else None
    chosen = _telling_slices(detected, reference, inside, n_slices)
    spacing = oriented[0].GetSpacing()
    brain_values = flair_a[inside]
    gray_low, gray_high = np.percentile(brain_values, [0.5, 99.5]) if brain_values.size else (0.0, 1.0)
    energies = energy_a[inside]
    # The heat map starts at the median brain energy: below it the tissue is ordinary and stays grey.
    heat_low, heat_high = (np.percentile(energies, [50, 99.9]) if energies.size else (0.0, 1.0))
    heat_high = max(heat_high, threshold, heat_low + 1e-6)
    columns = len(chosen)
    fig, axes = plt.subplots(1, columns, figsize=(4.6 * columns + 1.2, 5.8), squeeze=False)
    heat = None
    for axis, (index, why) in zip(axes[0], chosen):
        extent = (0, flair_a.shape[2] * spacing[0], flair_a.shape[1] * spacing[1], 0)  # mm, true aspect
        axis.imshow(flair_a[index], cmap="gray", vmin=gray_low, vmax=gray_high, extent=extent,
                    interpolation="nearest")
        shown = np.ma.masked_where(~inside[index] | (energy_a[index] < heat_low), energy_a[index])
        heat = axis.imshow(shown, cmap="inferno", vmin=heat_low, vmax=heat_high, alpha=0.55, extent=extent,
                           interpolation="nearest")
        if detected[index].any():
            axis.contour(detected[index], levels=[0.5], colors=["#00e5ff"], linewidths=1.4, extent=extent,
                         origin="upper")
        if reference is not None and reference[index].any():
            axis.contour(reference[index], levels=[0.5], colors=["#39ff14"], linewidths=1.4, linestyles="--",
                         extent=extent, origin="upper")
        z_mm = oriented[0].TransformIndexToPhysicalPoint((0, 0, int(index)))[2]
        axis.set_title(f"axial slice {index} (z = {z_mm:.0f} mm)\n{why}", fontsize=10)
        # LPS arrays: columns run to the patient's left, rows to posterior: radiological display.
        for text, xy in (("R", (0.02, 0.5)), ("L", (0.98, 0.5)), ("A", (0.5, 0.98)), ("P", (0.5, 0.02))):
            axis.text(*xy, text, transform=axis.transAxes, color="yellow", fontsize=12, fontweight="bold",
                      ha="center", va="center")
        axis.set_xticks([])
        axis.set_yticks([])
    legend = [Line2D([], [], color="#00e5ff", linewidth=2, label=f"detected (E \u2265 {threshold:.3g})")]
    if reference is not None:
        legend.append(Line2D([], [], color="#39ff14", linewidth=2, linestyle="--", label="reference lesion"))
    fig.legend(handles=legend, loc="lower center", ncol=len(legend), frameon=False, fontsize=11)
    fig.suptitle(title, fontsize=12)
    fig.subplots_adjust(left=0.02, right=0.9, top=0.83, bottom=0.1, wspace=0.04)
    bar_axis = fig.add_axes((0.915, 0.16, 0.015, 0.62))
    bar = fig.colorbar(heat, cax=bar_axis)
    bar.set_label("anomaly energy E (heat from the brain median)")
    bar.ax.axhline(threshold, color="#00e5ff", linewidth=2)
    _save(plt, fig, path, dpi=100, tight=False)
    return path


def _telling_slices(detected: np.ndarray, reference: np.ndarray | None, brain: np.ndarray,
                    n_slices: int) -> list[tuple[int, str]]:
    """Axial slice indices with the reason each is shown: the slice with the most true positives,
    the most missed lesion, the most false positives and the most lesion, then the slices with the
    most detection, without repeats."""
    per_slice = lambda mask: mask.reshape(mask.shape[0], -1).sum(axis=1)  # noqa: E731
    candidates: list[tuple[np.ndarray, str]] = []
    if reference is not None:
        candidates += [(per_slice(detected & reference), "most lesion detected"),
                       (per_slice(reference & ~detected), "most lesion missed"),
                       (per_slice(detected & ~reference), "most false positive"),
                       (per_slice(reference), "most reference lesion")]
    candidates.append((per_slice(detected), "most detection"))
    chosen: list[tuple[int, str]] = []
    for counts, why in candidates:
        for index in np.argsort(counts)[::-1]:
            if counts[index] <= 0 or len(chosen) >= n_slices:
                break
            if all(abs(int(index) - other) > 2 for other, _ in chosen):
                chosen.append((int(index), f"{why} ({int(counts[index])} voxels)"))
                break
    if not chosen:  # nothing detected and no reference: the slice with the most brain
        chosen.append((int(np.argmax(per_slice(brain))), "largest brain section"))
    return sorted(chosen)


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
