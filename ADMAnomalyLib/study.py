"""The evaluation study: ADM, its ablations, beyond-the-paper options and classic baselines on the
same patient-level folds, voxels and metrics (``admanomaly study``).

Protocol (method.md, 'Evaluation protocol', applied to a folder of labelled cases):

* patients are split into ``n_folds`` disjoint folds; each fold in turn is the test set and the
  other patients are the training patients (no patient is ever in both);
* learned methods are trained on the training patients' lesion-free slices (lesion margin
  ``lesion_margin`` slices) -- ADM at network resolution, the intensity baselines on the same slices'
  native voxels;
* every method's operating threshold is its best-F1 threshold over the brain voxels of the training
  patients' lesion slices (the validation set), at native resolution;
* metrics are computed on the test patients' whole brains at native resolution (every brain voxel
  of every test case, the same voxels for every method): AUROC and AUPRC pooled over the test
  voxels, Dice / precision / recall at the validation threshold, and the best possible Dice (an
  oracle threshold on the test data, reported as such);
* every (fold, seed) is a run; the table gives mean +- sd over runs.

Methods share work where they can: the ADM variants that use CtoC share one CtoC per (fold, seed)
(step 1 is identical for them), its translations of every case are computed once, and
post-processing variants re-use their base network's energies.

The JSON written by :func:`run_study` holds everything the report needs; :mod:`ADMAnomalyLib.figures`
draws the figures and :func:`write_report` writes ``docs/results.md`` from it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import SimpleITK as sitk
import torch
from torch import nn

from .baselines import MahalanobisBaseline, OCSVMBaseline, median_filter, remove_small_components
from .cases import find_cases, load_case
from .config import CONTRASTS, ADMConfig, ModelConfig, PostprocessConfig, preset
from .data import SliceSet, lesion_free_slices, lesion_slices, random_intensity_scaling, stack_slices
from .device import autocast, bf16_enabled, resolve_device
from .errors import InputError
from .gmm import GMMAccumulator, GMMParams, SingularCovarianceError, diagonal_penalty, energy, mixture_statistics
from .infer import energy_slices, postprocess_array
from .metrics import _curve, best_f1_threshold, json_safe, pooled_and_per_case
from .networks import DRDecoder, DREncoder, translate_all
from .preprocess import PreparedCase, native_slice_region, native_zscored, prepare_case, slices_to_image
from .train import Trainer, masked_mse


STUDY_VERSION = 1
FLOAT32_EPS = float(np.finfo(np.float32).eps)
Progress = Callable[[str], None]

# ------------------------------------------------------------------------------------------------
# settings


@dataclass
class StudySettings:
    """What one study run does; ``quick_settings()`` / ``full_settings()`` are the two presets."""

    name: str = "quick"
    n_folds: int = 3
    seeds: tuple[int, ...] = (0,)
    preset: str = "small"
    image_size: int = 64
    epochs_ctoc: int = 4
    epochs_joint: int = 3
    batch_size: int = 16
    lesion_margin: int = 3
    methods: tuple[str, ...] = ()
    """Methods to run (empty: all of :data:`DEFAULT_METHODS`)."""
    ocsvm_max_train: int = 10_000
    mahalanobis_max_train: int = 500_000
    smoothing_sigma_mm: float = 3.0
    rim_erosion_mm: float = 3.0
    flair_median_size: int = 5
    flair_min_component_voxels: int = 20
    dagmm_lambda_energy: float = 5e-4
    dagmm_lambda_cov: float = 5e-3
    dagmm_jitter: float = 1e-6
    singularity_steps: int = 300
    singularity_lambda: float = 5.0
    singularity_eps: float = 1e-6
    singularity_image_size: int = 64
    singularity_lr: float = 3e-3
    curve_points: int = 300
    device: str = "auto"
    max_cases: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def quick_settings(**overrides: Any) -> StudySettings:
    """2-core CPU setting (< 30 min): 3 folds, 1 seed, 64x64 slices, 4 + 3 epochs of the small preset."""
    return dataclasses.replace(StudySettings(methods=QUICK_METHODS), **overrides)


def full_settings(**overrides: Any) -> StudySettings:
    """GPU setting: 3 folds x 3 seeds, the paper preset at 128x128 with the paper's 50 + 50 epochs."""
    base = StudySettings(name="full", seeds=(0, 1, 2), preset="paper", image_size=128, epochs_ctoc=50,
                         epochs_joint=50, ocsvm_max_train=50_000, singularity_steps=1500,
                         singularity_image_size=128)
    return dataclasses.replace(base, **overrides)


# ------------------------------------------------------------------------------------------------
# methods registry


@dataclass(frozen=True)
class MethodSpec:
    """One row of the table."""

    kind: str
    """'adm' (engine-trained network), 'dagmm', 'flair', 'flair_filtered', 'mahalanobis', 'ocsvm'."""
    group: str
    """'paper' (the paper's ADM and ablations), 'baseline' or 'improvement'."""
    description: str
    network: str | None = None
    """For 'adm': which trained network (key of :data:`NETWORKS`)."""
    postprocess: dict[str, Any] = field(default_factory=dict)
    """For 'adm': PostprocessConfig overrides; the values 'smooth' and 'rim' take the settings'."""
    flair_weight: bool = False
    """For 'adm': add w x FLAIR z-score to E, w chosen on the validation data."""
    small_components: bool = False
    """For 'adm': at the threshold, lower voxels in components smaller than the settings'
    ``flair_min_component_voxels`` to just below it (as the FLAIR +med+cc baseline does)."""


NETWORKS: dict[str, dict[str, dict[str, Any]]] = {
    "ADM": {},
    "ADM_ct": {"model": {"use_dr": False}},
    "ADM_dr": {"model": {"use_ctoc": False}},
    "ADM_woj": {"train": {"joint": False}},
    "ADM+X": {"model": {"density_intensities": True}},
}
"""Config overrides of each trained ADM network (all on top of the study's preset)."""


METHODS: dict[str, MethodSpec] = {
    "ADM": MethodSpec("adm", "paper", "ADM as published (faithful default)", "ADM"),
    "ADM_ct": MethodSpec("adm", "paper", "ablation: no DR (z = Z_ct)", "ADM_ct"),
    "ADM_dr": MethodSpec("adm", "paper", "ablation: no CtoC (z = Z_dr)", "ADM_dr"),
    "ADM_woj": MethodSpec("adm", "paper", "ablation: DR and DE losses optimised separately", "ADM_woj"),
    "DAGMM-conv": MethodSpec("dagmm", "baseline", "convolutional DAGMM, 1/Sigma_ii penalty"),
    "OCSVM": MethodSpec("ocsvm", "baseline", "one-class SVM, RBF on the 4 intensities, gamma 0.25"),
    "Mahalanobis": MethodSpec("mahalanobis", "baseline", "Mahalanobis distance of the 4 z-scored intensities"),
    "FLAIR z": MethodSpec("flair", "baseline", "FLAIR z-score inside the brain"),
    "FLAIR z +med+cc": MethodSpec("flair_filtered", "baseline",
                                  "FLAIR z-score, 3-D median filter, small components removed at the threshold"),
    "ADM +flip": MethodSpec("adm", "improvement", "ADM, left-right flip test-time augmentation", "ADM",
                            {"flip_tta": True}),
    "ADM +smooth": MethodSpec("adm", "improvement", "ADM, 3-D Gaussian smoothing of E", "ADM",
                              {"smoothing_sigma_mm": "smooth"}),
    "ADM +smooth+rim": MethodSpec("adm", "improvement", "ADM, smoothing and brain-rim suppression", "ADM",
                                  {"smoothing_sigma_mm": "smooth", "rim_erosion_mm": "rim"}),
    "ADM +med+rim": MethodSpec("adm", "improvement", "ADM, 3-D median filter of E and rim suppression", "ADM",
                               {"median_size": "median", "rim_erosion_mm": "rim"}),
    "ADM +smooth+rim+FLAIR": MethodSpec("adm", "improvement",
                                        "ADM +smooth+rim plus w x FLAIR z (w chosen on validation)", "ADM",
                                        {"smoothing_sigma_mm": "smooth", "rim_erosion_mm": "rim"},
                                        flair_weight=True),
    "ADM +smooth+rim+FLAIR+med": MethodSpec("adm", "improvement",
                                            "ADM +smooth+rim+FLAIR, then a 3-D median filter", "ADM",
                                            {"smoothing_sigma_mm": "smooth", "rim_erosion_mm": "rim",
                                             "median_size": "median"}, flair_weight=True),
    "ADM +smooth+rim+FLAIR+med+cc": MethodSpec("adm", "improvement",
                                               "ADM +smooth+rim+FLAIR+med, small components removed at the threshold",
                                               "ADM", {"smoothing_sigma_mm": "smooth", "rim_erosion_mm": "rim",
                                                       "median_size": "median"}, flair_weight=True,
                                               small_components=True),
    "ADM+X": MethodSpec("adm", "improvement", "ADM with the intensities X in the density features", "ADM+X"),
    "ADM+X +smooth+rim": MethodSpec("adm", "improvement", "ADM+X with smoothing and rim suppression", "ADM+X",
                                    {"smoothing_sigma_mm": "smooth", "rim_erosion_mm": "rim"}),
    "ADM+X +flip+smooth+rim": MethodSpec("adm", "improvement", "ADM+X, flip TTA, smoothing, rim suppression",
                                         "ADM+X", {"flip_tta": True, "smoothing_sigma_mm": "smooth",
                                                   "rim_erosion_mm": "rim"}),
    "ADM+X +smooth+rim+FLAIR": MethodSpec("adm", "improvement",
                                          "ADM+X +smooth+rim plus w x FLAIR z (w chosen on validation)",
                                          "ADM+X", {"smoothing_sigma_mm": "smooth", "rim_erosion_mm": "rim"},
                                          flair_weight=True),
}

DEFAULT_METHODS: tuple[str, ...] = tuple(METHODS)
QUICK_METHODS: tuple[str, ...] = tuple(m for m in METHODS
                                       if m not in ("ADM +flip", "ADM +smooth", "ADM+X +flip+smooth+rim"))
"""The quick setting leaves out the flip-TTA variants and smoothing without rim suppression (in the
full setting) to fit a 2-core CPU."""
FLAIR_WEIGHTS: tuple[float, ...] = (0.0, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0)
"""Candidate weights of the FLAIR z-score added to E (picked by validation AUPRC)."""


def postprocess_for(spec: MethodSpec, settings: StudySettings) -> PostprocessConfig:
    values = {}
    for key, value in spec.postprocess.items():
        if value == "smooth":
            value = settings.smoothing_sigma_mm
        elif value == "rim":
            value = settings.rim_erosion_mm
        elif value == "median":
            value = settings.flair_median_size
        values[key] = value
    return PostprocessConfig(**values)


def network_config(name: str, settings: StudySettings, seed: int) -> ADMConfig:
    """The engine config of study network ``name`` (preset + study sizes + the variant's overrides)."""
    overrides: dict[str, dict[str, Any]] = {
        "preprocess": {"image_size": settings.image_size},
        "train": {"epochs_ctoc": settings.epochs_ctoc, "epochs_joint": settings.epochs_joint,
                  "batch_size": settings.batch_size, "lesion_margin": settings.lesion_margin, "seed": seed},
    }
    for section, values in NETWORKS[name].items():
        overrides.setdefault(section, {}).update(values)
    return preset(settings.preset, **overrides)


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
    """Load and prepare one labelled case at the study's network size."""
    case = load_case(files)
    cfg = preset(settings.preset, preprocess={"image_size": settings.image_size}).preprocess
    prepared = prepare_case(case, cfg)
    brain = prepared.native_brain
    if prepared.native_lesion is None:
        raise InputError(f"case {files.case_id}: the study needs a lesion label")
    labels = prepared.native_lesion[brain]
    validation = native_slice_region(prepared, lesion_slices(prepared))[brain]
    normal = native_slice_region(prepared, lesion_free_slices(prepared, settings.lesion_margin))[brain]
    volume = native_zscored(case, prepared)
    features = np.ascontiguousarray(volume[:, brain].T)
    flair = volume[CONTRASTS.index("flair")]
    del volume
    flair_median = median_filter(np.where(brain, flair, flair[brain].min()), settings.flair_median_size)
    flair_median[~brain] = flair_median[brain].min()
    spacing = case.images["flair"].GetSpacing()
    return CaseData(files.case_id, prepared, brain, labels, validation, normal, features, flair_median,
                    tuple(float(s) for s in spacing), float(labels.sum() * np.prod(spacing) / 1000.0))


# ------------------------------------------------------------------------------------------------
# ADM networks


def _training_data(cases: Sequence[CaseData], margin: int):
    from .data import TrainingData

    train = stack_slices([(c.prepared, lesion_free_slices(c.prepared, margin)) for c in cases])
    validation = stack_slices([(c.prepared, lesion_slices(c.prepared)) for c in cases])
    summary = {"cases": sorted(c.case_id for c in cases), "train_slices": len(train),
               "validation_slices": len(validation)}
    return TrainingData(train, validation, summary)


def train_ctoc(config: ADMConfig, data, device: str) -> dict[str, torch.Tensor]:
    """Step 1 alone (shared by every variant that uses CtoC); returns the CtoC weights."""

    trainer = Trainer(config, device, show_progress_bar=False)
    trainer._run_stage("ctoc", config.train.epochs_ctoc, data.train)
    return {k: v.detach().clone() for k, v in trainer.model.network.ctoc.state_dict().items()}


def train_network(config: ADMConfig, data, device: str, ctoc_state: dict[str, torch.Tensor] | None):
    """Step 2 (and the frozen mixture) of one variant, starting from the shared CtoC."""

    trainer = Trainer(config, device, show_progress_bar=False)
    if config.model.use_ctoc:
        trainer.model.network.ctoc.load_state_dict(ctoc_state)
        trainer.stage, trainer.epoch = "joint", 0
    model = trainer.fit(data)
    return model, trainer.history


def ctoc_translations(model_or_state, config: ADMConfig, case: CaseData, device: torch.device,
                      flip: bool = False) -> np.ndarray:
    """CtoC translations (S_brain, 4, N, N) of a case's brain slices (optionally of the mirrored slices),
    in the training precision (``config.train.amp``: bf16 on CPUs and GPUs that run it natively)."""
    from .networks import CtoCNet

    ctoc = CtoCNet(config.model)
    ctoc.load_state_dict(model_or_state)
    ctoc.to(device).eval()
    index = np.flatnonzero(case.prepared.has_brain)
    images, brain = case.prepared.slices[index], case.prepared.brain[index]
    if flip:
        images, brain = images[..., ::-1], brain[..., ::-1]
    out = np.zeros(images.shape, dtype=np.float32)
    use_bf16 = bf16_enabled(device, config.train.amp)
    with torch.inference_mode():
        for start in range(0, len(index), 16):
            x = torch.from_numpy(np.ascontiguousarray(images[start:start + 16])).to(device)
            b = torch.from_numpy(np.ascontiguousarray(brain[start:start + 16])).to(device)
            with autocast(device, use_bf16):
                out[start:start + len(x)] = translate_all(ctoc, x, b).float().cpu().numpy()
    return out


def native_energy(model, case: CaseData, device: torch.device, x_hat: np.ndarray | None,
                  x_hat_flip: np.ndarray | None, flip: bool) -> np.ndarray:
    """Raw energy of every native brain voxel (N,) on the native grid, as :func:`infer.predict_prepared`
    maps it back (the CtoC part comes from ``x_hat``/``x_hat_flip``, see :func:`ctoc_translations`)."""
    prepared = case.prepared
    index = np.flatnonzero(prepared.has_brain)
    network_res = np.zeros(prepared.brain.shape, dtype=np.float32)
    images, brain = prepared.slices[index], prepared.brain[index]
    result = energy_slices(model, images, brain, device, 16, "fp32", x_hat_ct=x_hat, flip_tta=False)
    if flip:
        mirrored = energy_slices(model, images[..., ::-1], brain[..., ::-1], device, 16, "fp32",
                                 x_hat_ct=x_hat_flip, flip_tta=False)
        result = 0.5 * (result + mirrored[..., ::-1])
    network_res[index] = result
    network_res[~prepared.brain] = float(result[brain].min())
    image = slices_to_image(network_res, prepared, background=None)
    return sitk.GetArrayFromImage(image)


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
        from .networks import ADMNetwork

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
    from .metrics import detection_metrics
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
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True,
                                check=True).stdout.strip()
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=repo,
                                    capture_output=True, text=True).stdout.strip())
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
        for line in Path("/proc/cpuinfo").read_text().splitlines():
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
            data = _training_data(train_cases, settings.lesion_margin)
            run = {"seed": seed, "fold": fold_index, "test": list(test_ids),
                   "train": [c.case_id for c in train_cases], "train_slices": len(data.train),
                   "validation_slices": len(data.validation), "methods": {}, "histories": {}}
            say(f"seed {seed} fold {fold_index + 1}/{len(folds)}: {len(train_cases)} training patients "
                f"({len(data.train)} normal slices), test {', '.join(test_ids)}")
            scores: dict[str, dict[str, np.ndarray]] = {}
            # -- ADM networks ----------------------------------------------------------------------
            ctoc_state = None
            x_hat: dict[str, np.ndarray] = {}
            x_hat_flip: dict[str, np.ndarray] = {}
            if any(network_config(n, settings, seed).model.use_ctoc for n in networks_needed):
                t = time.perf_counter()
                base_config = network_config("ADM", settings, seed)
                ctoc_state = train_ctoc(base_config, data, settings.device)
                tick("train CtoC", t)
                t = time.perf_counter()
                for case in all_cases:
                    x_hat[case.case_id] = ctoc_translations(ctoc_state, base_config, case, device)
                    if flips_needed:
                        x_hat_flip[case.case_id] = ctoc_translations(ctoc_state, base_config, case, device, True)
                tick("CtoC translations", t)
                say(f"  CtoC trained and applied ({timings['train CtoC']:.0f} s so far)")
            for name in networks_needed:
                t = time.perf_counter()
                config = network_config(name, settings, seed)
                model, history = train_network(config, data, settings.device, ctoc_state)
                tick(f"train {name}", t)
                run["histories"][name] = history
                t = time.perf_counter()
                flips = [False] + ([True] if name in flips_needed else [])
                for flip in flips:
                    key = f"{name}|flip" if flip else name
                    scores[key] = {}
                    for case in all_cases:
                        use = config.model.use_ctoc
                        volume = native_energy(model, case, device, x_hat.get(case.case_id) if use else None,
                                               x_hat_flip.get(case.case_id) if use else None, flip)
                        scores[key][case.case_id] = volume
                tick(f"score {name}", t)
                say(f"  {name} trained and scored")
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
                    # Smoothing and rim first (cached across methods); the FLAIR term and the median
                    # filter come last, as in infer.postprocess_array.
                    first = dataclasses.replace(post, flip_tta=False, flair_weight=0.0, median_size=0)
                    cache_key = (key, first.smoothing_sigma_mm, first.rim_erosion_mm)
                    if cache_key not in post_cache:
                        post_cache[cache_key] = {}
                        for case in all_cases:
                            volume = scores[key][case.case_id]
                            if first.native_active:
                                volume = postprocess_array(volume, case.brain, case.spacing, first,
                                                           case_cache[case.case_id])
                            post_cache[cache_key][case.case_id] = volume[case.brain]
                    method_scores = post_cache[cache_key]
                    if spec.flair_weight:
                        # w is chosen on the validation voxels before any median filter.
                        method_scores, weights = _with_flair(method_scores, train_cases, all_cases)
                        extra.update(weights)
                    if post.median_size > 1:
                        last = PostprocessConfig(median_size=post.median_size)
                        filtered = {}
                        for case in all_cases:
                            volume = np.zeros(case.brain.shape, np.float32)
                            volume[case.brain] = method_scores[case.case_id]
                            filtered[case.case_id] = postprocess_array(volume, case.brain, case.spacing,
                                                                       last)[case.brain]
                        method_scores = filtered
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
            del scores, post_cache, case_cache, x_hat, x_hat_flip
            runs.append(run)
            # Partial results after every run, so an interrupted study still leaves its numbers.
            (output_dir / "study_partial.json").write_text(json.dumps(json_safe(
                {"settings": settings.to_dict(), "runs": runs, "summary": summarise(runs, methods)}), indent=1))
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
        "git": _git_commit(Path(__file__).resolve().parents[1]),
        "finished": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    })
    (output_dir / "study.json").write_text(json.dumps(result, indent=1, allow_nan=False))
    return result


def _with_flair(scores: dict[str, np.ndarray], train_cases: Sequence[CaseData],
                all_cases: Sequence[CaseData]) -> tuple[dict[str, np.ndarray], float]:
    """E' = (E - mean) / sd (over the case's brain voxels) + w x FLAIR z, as
    ``PostprocessConfig.flair_weight``; w maximises the validation AUPRC of the training patients."""
    flair = CONTRASTS.index("flair")
    standard = {}
    for c in all_cases:
        e = scores[c.case_id].astype(np.float64)
        standard[c.case_id] = ((e - e.mean()) / (e.std() or 1.0)).astype(np.float32)
    best = (-1.0, 0.0)
    y = _pooled([c.labels[c.validation] for c in train_cases])
    for weight in FLAIR_WEIGHTS:
        s = _pooled([standard[c.case_id][c.validation] + np.float32(weight) * c.features[c.validation, flair]
                     for c in train_cases])
        best = max(best, (_auprc(s, y), weight))
    weight = best[1]
    return ({c.case_id: standard[c.case_id] + np.float32(weight) * c.features[:, flair] for c in all_cases},
            {"flair_weight": weight})


def _component_override(test_cases: Sequence[CaseData], min_voxels: int, scores: dict[str, np.ndarray]):
    """``+cc``: voxels of ``scores`` (brain voxels per case) above the threshold in components smaller
    than ``min_voxels`` are lowered to just below it (the map stays continuous; see
    :func:`baselines.flair_zscore_filtered`)."""

    def apply(threshold: float) -> dict[str, np.ndarray]:
        out = {}
        for c in test_cases:
            s = np.array(scores[c.case_id], dtype=np.float32)
            above = np.zeros(c.brain.shape, bool)
            above[c.brain] = s >= threshold
            small = (above & ~remove_small_components(above, min_voxels))[c.brain]
            s[small] = np.nextafter(np.float32(threshold), np.float32(-np.inf))
            out[c.case_id] = s
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
# report


METRIC_LABELS = {"auprc": "AUPRC (headline)", "auroc": "AUROC", "dice": "Dice @ val. threshold",
                 "best_dice": "best Dice (oracle)", "precision": "precision @ val.", "recall": "recall @ val."}


def format_table(study: dict[str, Any], markdown: bool = True) -> str:
    """The results table (mean +- sd over runs), best value per column in bold."""
    summary = study["summary"]
    order = ("auprc", "auroc", "dice", "best_dice", "precision", "recall")
    methods = list(summary)
    best = {k: max((summary[m][k]["mean"] for m in methods if summary[m][k]["mean"] is not None), default=None)
            for k in order}

    def cell(m: str, k: str) -> str:
        mean, sd = summary[m][k]["mean"], summary[m][k]["sd"]
        if mean is None:
            return "n/a"
        text = f"{mean:.3f}" + (f" ± {sd:.3f}" if sd is not None else "")
        return f"**{text}**" if markdown and best[k] is not None and abs(mean - best[k]) < 5e-4 else text

    header = ["method", "group"] + [METRIC_LABELS[k] for k in order]
    rows = [[m, study["methods"][m]["group"]] + [cell(m, k) for k in order] for m in methods]
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
            a, b = summary[method][k]["mean"], summary[reference][k]["mean"]
            if a is None or b is None:
                continue
            (wins if a > b else losses).append(f"{METRIC_LABELS[k].split(' (')[0]} {a:.3f} vs {b:.3f}")
        verdict = "beats" if not losses else ("loses to" if not wins else "is mixed against")
        lines.append(f"- **{method}** ({group}) {verdict} {reference}"
                     + (f"; better: {', '.join(wins)}" if wins else "")
                     + (f"; worse: {', '.join(losses)}" if losses else "") + ".")
    return lines


def write_report(study: dict[str, Any], docs_dir: str | Path, figures: dict[str, str]) -> Path:
    """``docs/results.md`` from the study JSON (every number comes from it)."""
    docs_dir = Path(docs_dir)
    s = study["settings"]
    n_runs = len(study["runs"])
    seeds = s["seeds"]
    machine = study["machine"]
    git = study["git"]
    commit = (git.get("commit") or "unknown")[:12] + (" (with uncommitted changes)" if git.get("dirty") else "")
    lines = [
        "# Evaluation study: ADM against its ablations and simple baselines",
        "",
        "Generated by `ADMAnomalyLib.study.write_report` from `study.json`; no number here is typed by hand.",
        "",
        f"- **Command:** `{study.get('command') or 'admanomaly study'}`",
        f"- **Setting:** `{s['name']}`: {s['n_folds']} patient-level folds x {len(seeds)} seed(s) "
        f"({', '.join(map(str, seeds))}) = {n_runs} runs; preset `{s['preset']}` at "
        f"{s['image_size']}x{s['image_size']}, {s['epochs_ctoc']} CtoC + {s['epochs_joint']} joint epochs, "
        f"lesion margin {s['lesion_margin']} slices.",
        f"- **Data:** {len(study['cases'])} BraTS 2018 glioma cases (`{study['data_dir']}`); folds: "
        + "; ".join(f"fold {i + 1}: {', '.join(f)}" for i, f in enumerate(study["folds"])) + ".",
        f"- **Commit:** `{commit}`; finished {study['finished']}; runtime {study['runtime_s'] / 60:.1f} min.",
        f"- **Machine:** {machine.get('cpu_model', machine.get('processor'))}, {machine.get('cpu_count')} CPU "
        f"cores, device `{machine.get('device')}`{', ' + machine['gpu'] if machine.get('gpu') else ''}; "
        f"torch {machine.get('torch')}, Python {machine.get('python')}.",
        "",
        "## Protocol",
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
        "## Results",
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
    weights = [f"{m}: {r['methods'][m]['flair_weight']:g}" for r in study["runs"] for m in r["methods"]
               if r["methods"][m].get("flair_weight") is not None]
    if weights:
        lines.append("- FLAIR weights w chosen on validation per run (score = E z-scored over the case's brain "
                     "+ w x FLAIR z, i.e. `postprocess.flair_weight`): " + "; ".join(weights) + ".")
    lines += ["", "### Against the FLAIR z-score", ""] + comparison_lines(study) + [""]
    if "FLAIR z +med+cc" in study["summary"]:
        lines += ["### Against the filtered FLAIR z-score (median filter + small-component removal)", ""]
        lines += comparison_lines(study, "FLAIR z +med+cc") + [""]
    lines += [
        "Published context (different data and splits, so only indicative): FLAIR thresholding reached a "
        "best-possible Dice of about 0.74 on BraTS and the best deep unsupervised methods about 0.76 "
        "(Meissen et al. 2021; Pinaya et al. 2022); a context-encoding VAE reached AUROC 0.95 on BraTS 2017 "
        "(Zimmerer et al. 2019). The ADM paper reports AUROC 0.939 and best F1 0.692 on BraTS 2019 with "
        "221 training patients; here there are "
        f"{len(study['runs'][0]['train'])} training patients per fold.",
        "",
        "## Figures",
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
    lines += ["## Timings", "", "| part | seconds |", "|---|---|"]
    lines += [f"| {k} | {v:.0f} |" for k, v in sorted(study["timings_s"].items(), key=lambda kv: -kv[1])]
    lines += ["", "## Data citation", "",
              "BraTS: Menze et al., IEEE TMI 34(10), 2015; Bakas et al., Scientific Data 4:170117, 2017; "
              "Bakas et al., arXiv:1811.02629, 2018.", ""]
    path = docs_dir / "results.md"
    path.write_text("\n".join(lines))
    return path


def _post_text(post: dict[str, Any]) -> str:
    parts = []
    if post.get("flip_tta"):
        parts.append("flip TTA")
    if post.get("smoothing_sigma_mm"):
        parts.append(f"Gaussian sigma {post['smoothing_sigma_mm']:g} mm")
    if post.get("rim_erosion_mm"):
        parts.append(f"rim {post['rim_erosion_mm']:g} mm suppressed")
    if post.get("median_size"):
        parts.append(f"median {post['median_size']} voxels (last)")
    return ", ".join(parts)


def make_report(study_json: str | Path, docs_dir: str | Path) -> Path:
    """Figures (``docs/figures/*.png``) and ``docs/results.md`` from a study JSON."""
    from . import figures as fig

    study_json = Path(study_json)
    study = json.loads(study_json.read_text())
    docs_dir = Path(docs_dir)
    figure_dir = docs_dir / "figures"
    figure_dir.mkdir(parents=True, exist_ok=True)
    written = fig.all_figures(study, figure_dir, study_json.parent)
    relative = {k: os.path.relpath(v, docs_dir) for k, v in written.items()}
    return write_report(study, docs_dir, relative)
