"""Running the study: folds, per-case data, training and scoring every method through the product's
own inference (:func:`ADMAnomalyLib.infer.energy_volume`) and post-processing
(:mod:`ADMAnomalyLib.postprocess`), and the JSON the report is made from."""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import SimpleITK as sitk
import torch
from torch import nn

from ..baselines import MahalanobisBaseline, OCSVMBaseline
from ..cases import find_cases, load_case
from ..config import CONTRASTS, ModelConfig, PostprocessConfig, preset
from ..data import SliceSet, TrainingData, lesion_free_slices, lesion_slices, random_intensity_scaling
from ..device import resolve_device
from ..errors import InputError
from ..gmm import GMMAccumulator, GMMParams, SingularCovarianceError, diagonal_penalty, energy, mixture_statistics
from ..infer import InferenceOptions, ctoc_translations, energy_volume
from ..io import write_text_atomic
from ..metrics import _curve, best_f1_threshold, json_safe, pooled_and_per_case
from ..networks import DRDecoder, DREncoder
from ..postprocess import (add_intensity_term, median_filter_in_brain, postprocess_scores,
                           suppress_small_components)
from ..preprocess import PreparedCase, native_slice_region, prepare_case, slices_to_image
from ..train import Trainer, masked_mse
from .methods import DEFAULT_METHODS, FLAIR_WEIGHTS, METHODS, StudySettings, network_config, postprocess_for

STUDY_VERSION = 2
FLOAT32_EPS = float(np.finfo(np.float32).eps)
Progress = Callable[[str], None]

# ------------------------------------------------------------------------------------------------
# folds and per-case data


def patient_folds(case_ids: Sequence[str], n_folds: int, seed: int = 0) -> list[list[str]]:
    """Split patients into ``n_folds`` disjoint, near-equal folds (shuffled with ``seed``)."""
    ids = sorted(case_ids)
    if not 2 <= n_folds <= len(ids):
        raise InputError(f"need 2 <= folds <= patients, got {n_folds} folds for {len(ids)} patients")
    order = np.random.default_rng(seed).permutation(len(ids))
    return [sorted(ids[i] for i in order[k::n_folds]) for k in range(n_folds)]


@dataclass
class CaseData:
    """One labelled case: network slices plus its native brain voxels (the scored voxels)."""

    case_id: str
    prepared: PreparedCase
    brain: np.ndarray
    """bool (z, y, x) native brain."""
    labels: np.ndarray
    """bool (N,) lesion flag of each brain voxel (C order of ``brain``)."""
    validation: np.ndarray
    """bool (N,) brain voxels on axial slices with a lesion (the validation region)."""
    normal: np.ndarray
    """bool (N,) brain voxels on the lesion-free training slices (with the margin)."""
    features: np.ndarray
    """float32 (N, 4) z-scored intensities."""
    flair_median: np.ndarray
    """float32 (z, y, x) median-filtered FLAIR z-score (background at the brain minimum)."""
    spacing: tuple[float, float, float]
    lesion_ml: float


def load_case_data(files, settings: StudySettings) -> CaseData:
    """Load and prepare one labelled case at the study's network size, keeping the native z-scored
    contrasts the baselines and the FLAIR term read."""
    case = load_case(files)
    cfg = preset(settings.preset, preprocess={"image_size": settings.image_size}).preprocess
    prepared = prepare_case(case, cfg, keep_native=CONTRASTS)
    brain = prepared.native_brain
    if prepared.native_lesion is None:
        raise InputError(f"case {files.case_id}: the study needs a lesion label")
    labels = prepared.native_lesion[brain]
    validation = native_slice_region(prepared, lesion_slices(prepared))[brain]
    normal = native_slice_region(prepared, lesion_free_slices(prepared, settings.lesion_margin))[brain]
    features = np.ascontiguousarray(np.stack([prepared.native_zscored[c][brain] for c in CONTRASTS], axis=1))
    flair = prepared.native_zscored["flair"]
    flair_median = median_filter_in_brain(flair, brain, settings.flair_median_size)
    flair_median[~brain] = flair_median[brain].min()
    # Only FLAIR stays on the native grid (the FLAIR term of the post-processing reads it).
    prepared.native_zscored = {"flair": flair}
    spacing = case.images["flair"].GetSpacing()
    return CaseData(files.case_id, prepared, brain, labels, validation, normal, features, flair_median,
                    tuple(float(s) for s in spacing), float(labels.sum() * np.prod(spacing) / 1000.0))


# ------------------------------------------------------------------------------------------------
# ADM networks: trained by the engine's Trainer, scored by the engine's inference


def train_networks(names: Sequence[str], settings: StudySettings, seed: int, data: TrainingData,
                   device: torch.device) -> tuple[dict[str, Any], dict[str, Any], dict[str, list]]:
    """Train the ADM networks ``names`` of one run: step 1 (CtoC) once, shared by every variant that
    uses it (it is identical for them), then each variant's step 2 and frozen mixture. Returns
    ``(models, ctoc_model, histories)``; ``ctoc_model`` is a model holding the shared CtoC (None when
    no variant uses CtoC), for computing the translations once per case."""
    ctoc_state, ctoc_model = None, None
    if any(network_config(name, settings, seed).model.use_ctoc for name in names):
        trainer = Trainer(network_config("ADM", settings, seed), device, show_progress_bar=False)
        ctoc_state = trainer.fit_ctoc(data)
        ctoc_model = trainer.model
    models, histories = {}, {}
    for name in names:
        config = network_config(name, settings, seed)
        trainer = Trainer(config, device, show_progress_bar=False)
        # The study chooses thresholds on native validation voxels itself, so the trainer's is skipped.
        models[name] = trainer.fit(data, ctoc_state=ctoc_state if config.model.use_ctoc else None, calibrate=False)
        histories[name] = trainer.history
    return models, ctoc_model, histories


def raw_energy(model, case: CaseData, options: InferenceOptions, translations: dict | None) -> np.ndarray:
    """The model's energy of every native brain voxel of ``case`` (N,), without post-processing:
    :func:`~ADMAnomalyLib.infer.energy_volume`, the path ``admanomaly predict`` runs."""
    image = energy_volume(model, case.prepared, options, translations=translations, postprocess=PostprocessConfig())
    return sitk.GetArrayFromImage(image)[case.brain]


# ------------------------------------------------------------------------------------------------
# DAGMM-conv and the singularity experiment


class DAGMMConv(nn.Module):
    """Convolutional DAGMM: DR's conv encoder / 1x1 decoder as the compression network; the estimation
    network sees z = (latent, relative Euclidean reconstruction error, cosine similarity)."""

    def __init__(self, n_components: int = 6, hidden: int = 10, dropout: float = 0.5) -> None:
        super().__init__()
        self.n_components = n_components
        cfg = ModelConfig(use_ctoc=False)
        self.encoder, self.decoder = DREncoder(cfg), DRDecoder(cfg)
        self.dim = cfg.dr_latent + 2
        self.estimator = nn.Sequential(nn.Linear(self.dim, hidden), nn.Tanh(), nn.Dropout(dropout),
                                       nn.Linear(hidden, n_components), nn.Softmax(dim=-1))

    def features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        latent = self.encoder(x)
        x_hat = self.decoder(latent)
        norm = x.norm(dim=1, keepdim=True).clamp_min(1e-6)
        relative = (x - x_hat).norm(dim=1, keepdim=True) / norm
        cosine = nn.functional.cosine_similarity(x, x_hat, dim=1, eps=1e-6).unsqueeze(1)
        return torch.cat([latent, relative, cosine], dim=1), x_hat


def _jitter(params: GMMParams, jitter: float) -> GMMParams:
    eye = torch.eye(params.dim, dtype=params.covariances.dtype, device=params.covariances.device)
    return GMMParams(params.weights, params.means, params.covariances + jitter * eye)


def train_dagmm(data, settings: StudySettings, seed: int, device: torch.device) -> tuple[DAGMMConv, GMMParams]:
    """DAGMM-conv: reconstruction + lambda_E mean energy + lambda_cov sum 1/Sigma_ii, covariances with a
    small jitter (as DAGMM implementations) and no eigenvalue bound."""
    torch.manual_seed(seed)
    net = DAGMMConv().to(device)
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-3)
    rng = np.random.default_rng(seed)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(settings.epochs_joint):
        net.train()
        for index in data.train.batches(settings.batch_size, rng):
            x = torch.from_numpy(data.train.images[index]).to(device)
            b = torch.from_numpy(data.train.brain[index]).to(device)
            x = random_intensity_scaling(x, b, (0.9, 1.1), generator)
            z, x_hat = net.features(x)
            zb = z.permute(0, 2, 3, 1)[b]
            if len(zb) > 32768:
                zb = zb[torch.randperm(len(zb), generator=generator)[:32768].to(device)]
            params = _jitter(mixture_statistics(zb, net.estimator(zb), bound=False), settings.dagmm_jitter)
            loss = (masked_mse(x_hat, x, b) + settings.dagmm_lambda_energy * energy(zb, params).mean().float()
                    + settings.dagmm_lambda_cov * diagonal_penalty(params.covariances).float())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    net.eval()
    accumulator = GMMAccumulator(net.n_components, net.dim, device=device)
    with torch.inference_mode():
        for index in data.train.batches(settings.batch_size):
            x = torch.from_numpy(data.train.images[index]).to(device)
            b = torch.from_numpy(data.train.brain[index]).to(device)
            zb = net.features(x)[0].permute(0, 2, 3, 1)[b]
            accumulator.update(zb, net.estimator(zb))
    return net, _jitter(accumulator.finalize(bound=False), settings.dagmm_jitter)


def dagmm_native_energy(net: DAGMMConv, gmm: GMMParams, case: CaseData, device: torch.device) -> np.ndarray:
    prepared = case.prepared
    index = np.flatnonzero(prepared.has_brain)
    network_res = np.zeros(prepared.brain.shape, dtype=np.float32)
    with torch.inference_mode():
        for start in range(0, len(index), 16):
            chunk = index[start:start + 16]
            x = torch.from_numpy(prepared.slices[chunk]).to(device)
            z = net.features(x)[0]
            flat = z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])
            network_res[chunk] = energy(flat, gmm).reshape(len(chunk), *z.shape[2:]).float().cpu().numpy()
    network_res[~prepared.brain] = float(network_res[index][prepared.brain[index]].min())
    return sitk.GetArrayFromImage(slices_to_image(network_res, prepared, background=None))


def singularity_experiment(cases: Sequence[CaseData], settings: StudySettings, device: torch.device,
                           progress: Progress | None = None) -> dict[str, Any]:
    """Joint training (DR + DE, the ADM_dr network) with no guard, with DAGMM's 1/Sigma_ii penalty and
    with the eigenvalue bound, on the same data, seed and steps; records the loss per step and the
    step at which a run breaks down (singular covariance or non-finite loss).

    The setting is chosen to provoke the collapse the paper describes: a large energy weight
    (``singularity_lambda``) lets the energy term dominate the reconstruction, so DR shrinks its
    latent towards a lower-dimensional set and covariance eigenvalues fall towards 0."""
    cfg = preset("small", preprocess={"image_size": settings.singularity_image_size},
                 model={"use_ctoc": False, "eps": settings.singularity_eps}).preprocess
    parts = []
    for case in cases:
        prepared = case.prepared
        if prepared.slices.shape[-1] != cfg.image_size:
            import torch.nn.functional as F
            index = lesion_free_slices(prepared, settings.lesion_margin)
            x = torch.from_numpy(prepared.slices[index])
            b = torch.from_numpy(prepared.brain[index].astype(np.float32)).unsqueeze(1)
            x = F.interpolate(x, size=(cfg.image_size,) * 2, mode="bilinear", align_corners=False)
            b = F.interpolate(b, size=(cfg.image_size,) * 2, mode="bilinear", align_corners=False)[:, 0] > 0.5
            parts.append((x.numpy() * b.numpy()[:, None], b.numpy()))
        else:
            index = lesion_free_slices(prepared, settings.lesion_margin)
            parts.append((prepared.slices[index], prepared.brain[index]))
    images = np.concatenate([p[0] for p in parts]).astype(np.float32)
    brains = np.concatenate([p[1] for p in parts])
    model_cfg = preset("small", model={"use_ctoc": False}).model
    runs = {}
    for guard in ("none", "diagonal penalty", "eigenvalue bound"):
        from ..networks import ADMNetwork

        torch.manual_seed(0)
        network = ADMNetwork(model_cfg).to(device)
        optimizer = torch.optim.Adam(network.parameters(), lr=settings.singularity_lr)
        rng = np.random.default_rng(0)
        losses, energies, min_eig, min_ratio = [], [], [], []
        failure = None
        float32_step = None
        step = 0
        while step < settings.singularity_steps and failure is None:
            for index in SliceSet(images, brains, None, []).batches(settings.batch_size, rng):
                if step >= settings.singularity_steps:
                    break
                x = torch.from_numpy(images[index]).to(device)
                b = torch.from_numpy(brains[index]).to(device)
                z, x_hat = network.features(x, b)
                zb = z.permute(0, 2, 3, 1)[b]
                try:
                    params = mixture_statistics(zb, network.estimator(zb), settings.singularity_eps,
                                                bound=guard == "eigenvalue bound")
                    raw = params.covariances.detach()
                    eigs = torch.linalg.eigvalsh(raw)  # (C, d), ascending
                    eig = eigs[:, 0].min().item()
                    relative = (eigs[:, 0] / eigs[:, -1].clamp_min(1e-300)).min().item()
                    # A float32 implementation (as in the paper) cannot factorise a covariance whose
                    # eigenvalue ratio is below float32's resolution, nor one Cholesky rejects.
                    if float32_step is None and (relative < FLOAT32_EPS or bool(
                            torch.linalg.cholesky_ex(raw.float())[1].any())):
                        float32_step = step
                    mean_energy = energy(zb, params).mean()
                    loss = masked_mse(x_hat, x, b) + settings.singularity_lambda * mean_energy.float()
                    if guard == "diagonal penalty":
                        loss = loss + settings.dagmm_lambda_cov * diagonal_penalty(params.covariances).float()
                    if not torch.isfinite(loss):
                        raise FloatingPointError("non-finite loss")
                except (SingularCovarianceError, FloatingPointError, torch.linalg.LinAlgError) as exc:
                    failure = {"step": step, "error": f"{type(exc).__name__}: {str(exc).splitlines()[0]}"}
                    break
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                losses.append(float(loss.item()))
                energies.append(float(mean_energy.item()))
                min_eig.append(float(eig))
                min_ratio.append(float(relative))
                step += 1
        runs[guard] = {"loss": losses, "energy": energies, "min_eigenvalue": min_eig, "min_eigenvalue_ratio": min_ratio,
                       "failure": failure,
                       "steps_completed": len(losses), "float32_cholesky_failure_step": float32_step}
        if progress:
            progress(f"singularity: {guard}: {len(losses)} steps, "
                     f"{'broke down: ' + failure['error'] if failure else 'completed'}")
    return {"setting": {"network": "ADM_dr (DR + DE, no CtoC)", "lambda_energy": settings.singularity_lambda,
                        "eps": settings.singularity_eps, "lambda_cov": settings.dagmm_lambda_cov,
                        "image_size": settings.singularity_image_size, "batch_size": settings.batch_size,
                        "steps": settings.singularity_steps, "training_slices": int(len(images)),
                        "lr": settings.singularity_lr, "seed": 0},
            "runs": runs}


# ------------------------------------------------------------------------------------------------
# scoring


def _pooled(values: Sequence[np.ndarray]) -> np.ndarray:
    return np.concatenate(values) if values else np.zeros(0, np.float32)


def validation_threshold(scores: dict[str, np.ndarray], cases: Sequence[CaseData]) -> float:
    """Best-F1 threshold over the validation voxels (lesion slices) of the training patients."""
    s = _pooled([scores[c.case_id][c.validation] for c in cases])
    y = _pooled([c.labels[c.validation] for c in cases])
    threshold, _ = best_f1_threshold(s, y)
    return float(threshold)


def _auprc(s: np.ndarray, y: np.ndarray) -> float:
    from ..metrics import detection_metrics
    return detection_metrics(s, y).auprc


def curve_points(s: np.ndarray, y: np.ndarray, n: int) -> dict[str, list[float]]:
    """ROC and precision-recall curves sampled at ~n points (for the figures)."""
    thresholds, tps, fps = _curve(s.astype(np.float32), y)
    n_pos, n_neg = int(y.sum()), int(y.size - y.sum())
    pick = np.unique(np.concatenate([np.linspace(0, len(tps) - 1, n).astype(int),
                                     np.searchsorted(fps / max(n_neg, 1), np.geomspace(1e-5, 1, n))
                                     .clip(0, len(tps) - 1)]))
    tpr, fpr = tps[pick] / max(n_pos, 1), fps[pick] / max(n_neg, 1)
    precision = tps[pick] / np.maximum(tps[pick] + fps[pick], 1)
    return {"fpr": fpr.round(6).tolist(), "tpr": tpr.round(6).tolist(), "precision": precision.round(6).tolist()}


def evaluate_method(name: str, scores: dict[str, np.ndarray], train_cases: Sequence[CaseData],
                    test_cases: Sequence[CaseData], settings: StudySettings,
                    test_override: Callable[[float], dict[str, np.ndarray]] | None = None) -> dict[str, Any]:
    """Validation threshold on the training patients, metrics on the test patients' brains."""
    threshold = validation_threshold(scores, train_cases)
    test_scores = test_override(threshold) if test_override else {c.case_id: scores[c.case_id] for c in test_cases}
    report = pooled_and_per_case([(c.case_id, test_scores[c.case_id], c.labels, None) for c in test_cases], threshold)
    for row, case in zip(report["per_case"], test_cases):
        row["lesion_ml"] = case.lesion_ml
    return report


# ------------------------------------------------------------------------------------------------
# the study


def _git_commit(repo: Path) -> dict[str, Any]:
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True, encoding="utf-8",
                                check=True).stdout.strip()
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=repo,
                                    capture_output=True, text=True, encoding="utf-8").stdout.strip())
        return {"commit": commit, "dirty": dirty}
    except (OSError, subprocess.CalledProcessError):
        return {"commit": None, "dirty": None}


def machine_description(device: torch.device) -> dict[str, Any]:
    info = {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "device": str(device),
            "processor": platform.processor() or platform.machine()}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
            if line.startswith("model name"):
                info["cpu_model"] = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return info


def run_study(data_dir: str | Path, output_dir: str | Path, settings: StudySettings,
              progress: Progress | None = None, command: str | None = None) -> dict[str, Any]:
    """Run the study and write ``output_dir/study.json`` (+ ``examples.npz`` for the example figure)."""
    started = time.perf_counter()
    say = progress or (lambda message: None)
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    device = resolve_device(settings.device)
    methods = list(settings.methods or DEFAULT_METHODS)
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise InputError(f"unknown method(s) {', '.join(unknown)}; choose from {', '.join(METHODS)}")
    files = find_cases(data_dir)
    if settings.max_cases:
        files = files[: settings.max_cases]
    cases: dict[str, CaseData] = {}
    for number, case_files in enumerate(files, start=1):
        cases[case_files.case_id] = load_case_data(case_files, settings)
        say(f"loaded {case_files.case_id} ({number}/{len(files)})")
    folds = patient_folds(list(cases), settings.n_folds)
    networks_needed = sorted({METHODS[m].network for m in methods if METHODS[m].kind == "adm"})
    flips_needed = {METHODS[m].network for m in methods
                    if METHODS[m].kind == "adm" and METHODS[m].postprocess.get("flip_tta")}
    runs: list[dict[str, Any]] = []
    curves: dict[str, dict[str, list]] = {m: {"scores": [], "labels": []} for m in methods}
    example_store: dict[tuple[int, str], dict[str, np.ndarray]] = {}
    timings: dict[str, float] = {}

    def tick(key: str, since: float) -> None:
        timings[key] = timings.get(key, 0.0) + time.perf_counter() - since

    for seed in settings.seeds:
        for fold_index, test_ids in enumerate(folds):
            train_cases = [cases[c] for c in cases if c not in test_ids]
            test_cases = [cases[c] for c in test_ids]
            all_cases = train_cases + test_cases
            data = TrainingData.from_prepared([c.prepared for c in train_cases], settings.lesion_margin)
            run = {"seed": seed, "fold": fold_index, "test": list(test_ids),
                   "train": [c.case_id for c in train_cases], "train_slices": len(data.train),
                   "validation_slices": len(data.validation), "methods": {}, "histories": {}}
            say(f"seed {seed} fold {fold_index + 1}/{len(folds)}: {len(train_cases)} training patients "
                f"({len(data.train)} normal slices), test {', '.join(test_ids)}")
            scores: dict[str, dict[str, np.ndarray]] = {}
            # -- ADM networks ----------------------------------------------------------------------
            t = time.perf_counter()
            models, ctoc_model, histories = train_networks(networks_needed, settings, seed, data, device)
            run["histories"].update(histories)
            tick("train ADM networks", t)
            say(f"  ADM networks trained ({timings['train ADM networks']:.0f} s so far)")
            t = time.perf_counter()
            options = InferenceOptions(device)
            # Translations by the shared CtoC, once per case (and mirror) for every variant that uses it.
            translations: dict[str, dict[bool, np.ndarray]] = {}
            if ctoc_model is not None:
                for case in all_cases:
                    translations[case.case_id] = {
                        mirrored: ctoc_translations(ctoc_model, case.prepared, options, mirrored)
                        for mirrored in ((False, True) if flips_needed else (False,))}
            for name in networks_needed:
                model = models[name]
                uses_ctoc = model.config.model.use_ctoc
                for flip in [False] + ([True] if name in flips_needed else []):
                    key = f"{name}|flip" if flip else name
                    flip_options = dataclasses.replace(options, flip_tta=flip)
                    scores[key] = {case.case_id: raw_energy(model, case, flip_options,
                                                            translations.get(case.case_id) if uses_ctoc else None)
                                   for case in all_cases}
            tick("score ADM networks", t)
            # -- DAGMM-conv ---------------------------------------------------------------------
            if "DAGMM-conv" in methods:
                t = time.perf_counter()
                net, gmm = train_dagmm(data, settings, seed, device)
                scores["DAGMM-conv"] = {c.case_id: dagmm_native_energy(net, gmm, c, device)[c.brain]
                                        for c in all_cases}
                tick("DAGMM-conv", t)
                say("  DAGMM-conv trained and scored")
            # -- evaluate every method -------------------------------------------------------------
            post_cache: dict[tuple, dict[str, np.ndarray]] = {}
            case_cache: dict[str, dict] = {c.case_id: {} for c in all_cases}
            for method in methods:
                t = time.perf_counter()
                spec = METHODS[method]
                override = None
                extra: dict[str, Any] = {}
                if spec.kind == "adm":
                    post = postprocess_for(spec, settings)
                    key = f"{spec.network}|flip" if post.flip_tta else spec.network
                    if spec.flair_weight:
                        # w is chosen on the validation voxels of the training patients, after smoothing
                        # and rim suppression and before the median filter, as the steps run.
                        first = PostprocessConfig(smoothing_sigma_mm=post.smoothing_sigma_mm,
                                                  rim_erosion_mm=post.rim_erosion_mm)
                        weight = _flair_weight(_postprocessed(scores[key], first, train_cases, case_cache,
                                                              post_cache, key), train_cases)
                        post = dataclasses.replace(post, flair_weight=weight)
                        extra["flair_weight"] = weight
                    method_scores = _postprocessed(scores[key], post, all_cases, case_cache, post_cache, key)
                    if spec.small_components:
                        override = _component_override(test_cases, settings.flair_min_component_voxels,
                                                       method_scores)
                elif spec.kind == "dagmm":
                    method_scores = scores["DAGMM-conv"]
                elif spec.kind == "flair":
                    method_scores = {c.case_id: c.features[:, CONTRASTS.index("flair")] for c in all_cases}
                elif spec.kind == "flair_filtered":
                    method_scores = {c.case_id: c.flair_median[c.brain] for c in all_cases}
                    override = _component_override(test_cases, settings.flair_min_component_voxels, method_scores)
                elif spec.kind in ("mahalanobis", "ocsvm"):
                    normal = _pooled([c.features[c.normal] for c in train_cases])
                    rng = np.random.default_rng(seed)
                    if spec.kind == "mahalanobis":
                        if len(normal) > settings.mahalanobis_max_train:
                            normal = normal[rng.choice(len(normal), settings.mahalanobis_max_train, replace=False)]
                        scorer = MahalanobisBaseline().fit(normal)
                    else:
                        scorer = OCSVMBaseline(max_train=settings.ocsvm_max_train, seed=seed).fit(normal)
                        extra["n_support"] = scorer.n_support
                    method_scores = {}
                    for c in train_cases:  # validation voxels only are needed from training patients
                        s = np.full(len(c.labels), -np.inf, dtype=np.float32)
                        s[c.validation] = scorer.score(c.features[c.validation])
                        method_scores[c.case_id] = s
                    for c in test_cases:
                        method_scores[c.case_id] = scorer.score(c.features)
                else:  # pragma: no cover - registry and dispatch are kept in step
                    raise AssertionError(spec.kind)
                result = evaluate_method(method, method_scores, train_cases, test_cases, settings, override)
                result.update(extra)
                result["seconds"] = time.perf_counter() - t
                run["methods"][method] = result
                if seed == settings.seeds[0]:
                    final = override(result["threshold"]) if override else method_scores
                    curves[method]["scores"] += [np.asarray(final[c.case_id], np.float32) for c in test_cases]
                    curves[method]["labels"] += [c.labels for c in test_cases]
                    for c in test_cases:
                        example_store.setdefault((fold_index, c.case_id), {})[method] = final[c.case_id]
                tick(f"evaluate {method}", t)
            del scores, post_cache, case_cache, translations, models
            runs.append(run)
            # Partial results after every run, so an interrupted study still leaves its numbers.
            write_text_atomic(json.dumps(json_safe({"settings": settings.to_dict(), "runs": runs,
                                                    "summary": summarise(runs, methods)}), indent=1),
                              output_dir / "study_partial.json")
            say("  fold done: " + ", ".join(f"{m} AUPRC {run['methods'][m]['pooled']['auprc']:.3f}"
                                            for m in methods))
    t = time.perf_counter()
    singularity = singularity_experiment(list(cases.values())[: max(1, len(cases) * 2 // 3)], settings, device, say)
    tick("singularity experiment", t)

    summary = summarise(runs, methods)
    curve_json = {}
    for method in methods:
        s, y = _pooled(curves[method]["scores"]), _pooled(curves[method]["labels"])
        if len(s):
            curve_json[method] = curve_points(s, y, settings.curve_points)
    examples = _save_examples(output_dir / "examples.npz", example_store, cases, runs, methods)
    result = json_safe({
        "study_version": STUDY_VERSION,
        "settings": settings.to_dict(),
        "command": command,
        "data_dir": str(data_dir),
        "cases": {c.case_id: {"lesion_ml": c.lesion_ml, "brain_voxels": int(c.brain.sum()),
                              "normal_slices": int(len(lesion_free_slices(c.prepared, settings.lesion_margin))),
                              "lesion_slices": int(len(lesion_slices(c.prepared)))} for c in cases.values()},
        "folds": folds,
        "methods": {m: {"group": METHODS[m].group, "description": METHODS[m].description,
                        "network_config": (network_config(METHODS[m].network, settings, 0).to_dict()["model"]
                                           if METHODS[m].kind == "adm" else None),
                        "postprocess": (dataclasses.asdict(postprocess_for(METHODS[m], settings))
                                        if METHODS[m].kind == "adm" else None)} for m in methods},
        "runs": runs,
        "summary": summary,
        "curves": curve_json,
        "examples": examples,
        "singularity": singularity,
        "timings_s": timings,
        "runtime_s": time.perf_counter() - started,
        "machine": machine_description(device),
        "git": _git_commit(Path(__file__).resolve().parents[2]),
        "finished": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    })
    write_text_atomic(json.dumps(result, indent=1, allow_nan=False), output_dir / "study.json")
    return result


def _postprocessed(raw: dict[str, np.ndarray], post: PostprocessConfig, cases: Sequence[CaseData],
                   case_cache: dict[str, dict], post_cache: dict, key: str) -> dict[str, np.ndarray]:
    """Brain-voxel scores (N,) per case of the raw energies ``raw`` post-processed by ``post`` through
    :func:`~ADMAnomalyLib.postprocess.postprocess_scores`, the product's own composition (cached per
    configuration; the per-case caches keep the brain-only maps)."""
    out = {}
    for case in cases:
        memo = (key, repr(post), case.case_id)
        if memo not in post_cache:
            if post.native_active:
                volume = np.zeros(case.brain.shape, np.float32)
                volume[case.brain] = raw[case.case_id]
                volume = postprocess_scores(volume, case.brain, case.spacing, post,
                                            case.prepared.native_zscored["flair"], case_cache[case.case_id])
                post_cache[memo] = volume[case.brain]
            else:
                post_cache[memo] = raw[case.case_id]
        out[case.case_id] = post_cache[memo]
    return out


def _flair_weight(scores: dict[str, np.ndarray], train_cases: Sequence[CaseData]) -> float:
    """The weight of the FLAIR term (:func:`~ADMAnomalyLib.postprocess.add_intensity_term`) that
    maximises the validation AUPRC of the training patients."""
    flair = CONTRASTS.index("flair")
    y = _pooled([c.labels[c.validation] for c in train_cases])
    best = (-1.0, 0.0)
    for weight in FLAIR_WEIGHTS:
        s = []
        for c in train_cases:
            # Standardised over the case's whole brain, as the product does, then the validation voxels.
            combined = add_intensity_term(scores[c.case_id], np.ones(len(c.labels), bool), c.features[:, flair], weight)
            s.append(combined[c.validation])
        best = max(best, (_auprc(_pooled(s), y), weight))
    return best[1]


def _component_override(test_cases: Sequence[CaseData], min_voxels: int, scores: dict[str, np.ndarray]):
    """``+cc``: at the threshold, :func:`~ADMAnomalyLib.postprocess.suppress_small_components` on each
    test case's brain-voxel scores (the map stays continuous)."""

    def apply(threshold: float) -> dict[str, np.ndarray]:
        out = {}
        for c in test_cases:
            volume = np.full(c.brain.shape, -np.inf, dtype=np.float32)
            volume[c.brain] = scores[c.case_id]
            out[c.case_id] = suppress_small_components(volume, c.brain, threshold, min_voxels)[c.brain]
        return out

    return apply


SUMMARY_METRICS = ("auroc", "auprc", "dice", "best_dice", "precision", "recall")


def _run_values(result: dict[str, Any]) -> dict[str, float | None]:
    pooled, at = result["pooled"], result["at_threshold"]
    return {"auroc": pooled["auroc"], "auprc": pooled["auprc"], "best_dice": pooled["best_f1"],
            "dice": at["dice"], "precision": at["precision"], "recall": at["recall"]}


def summarise(runs: Sequence[dict[str, Any]], methods: Sequence[str]) -> dict[str, Any]:
    """Mean +- sd (ddof 1) over runs of each method's pooled test metrics."""
    out = {}
    for method in methods:
        values = [_run_values(r["methods"][method]) for r in runs if method in r["methods"]]
        row = {}
        for metric in SUMMARY_METRICS:
            v = np.array([x[metric] for x in values if x[metric] is not None], dtype=float)
            row[metric] = {"mean": float(v.mean()) if v.size else None,
                           "sd": float(v.std(ddof=1)) if v.size > 1 else None, "n": int(v.size)}
        out[method] = row
    return out


def _save_examples(path: Path, store, cases: dict[str, CaseData], runs, methods) -> dict[str, Any]:
    """Best and worst test case (by per-case AUPRC of the best method); their slice of largest lesion
    area, saved to ``examples.npz`` (kept beside the JSON, not in docs: it holds image data)."""
    if not store:
        return {}
    summary = summarise(runs, methods)
    adm_methods = [m for m in methods if METHODS[m].kind == "adm"] or list(methods)
    top = max(summary[m]["auprc"]["mean"] or -1 for m in adm_methods)
    # Within a rounding step of the top, the first listed (the simpler variant) is shown.
    best_method = next(m for m in adm_methods if (summary[m]["auprc"]["mean"] or -1) >= top - 5e-4)
    shown = [m for m in ("ADM", best_method, "FLAIR z") if m in methods]
    per_case = {}
    thresholds = {}
    run0 = [r for r in runs if r["seed"] == runs[0]["seed"]]
    for run in run0:
        for row in run["methods"][best_method]["per_case"]:
            per_case[(run["fold"], row["case_id"])] = row["auprc"] or 0.0
        for m in shown:
            for c in run["test"]:
                thresholds[(run["fold"], c, m)] = run["methods"][m]["threshold"]
    ranked = sorted(per_case, key=per_case.get)
    chosen = {"best": ranked[-1], "worst": ranked[0]}
    arrays, meta = {}, {"method_ranked_by": best_method, "methods": shown, "cases": {}}
    for tag, (fold, case_id) in chosen.items():
        case = cases[case_id]
        lesion = np.zeros(case.brain.shape, bool)
        lesion[case.brain] = case.labels
        z = int(np.argmax(lesion.sum(axis=(1, 2))))
        flair = np.zeros(case.brain.shape, np.float32)
        flair[case.brain] = case.features[:, CONTRASTS.index("flair")]
        arrays[f"{tag}_flair"] = flair[z]
        arrays[f"{tag}_label"] = lesion[z]
        arrays[f"{tag}_brain"] = case.brain[z]
        for m in shown:
            volume = np.full(case.brain.shape, np.nan, np.float32)
            volume[case.brain] = store[(fold, case_id)][m]
            arrays[f"{tag}_{m}"] = volume[z]
        meta["cases"][tag] = {"case_id": case_id, "fold": fold, "native_z_index": z,
                              "auprc": per_case[(fold, case_id)],
                              "thresholds": {m: thresholds[(fold, case_id, m)] for m in shown}}
    np.savez_compressed(path, **arrays)
    meta["file"] = path.name
    return meta


# ------------------------------------------------------------------------------------------------
