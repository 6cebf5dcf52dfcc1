"""Running the study: folds, per-case data, training and scoring every method through the product's
own inference (:func:`ADMAnomalyLib.infer.energy_volume`) and post-processing
(:mod:`ADMAnomalyLib.postprocess`), and the JSON the report is made from."""

from __future__ import annotations

import dataclasses
import hashlib
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
from scipy import ndimage
from torch import nn

from ..baselines import MahalanobisBaseline, OCSVMBaseline
from ..cases import CaseImages, find_cases, load_case
from ..config import CONTRASTS, POSTPROCESS_CONTRASTS, ADMConfig, ModelConfig, PostprocessConfig, PreprocessConfig, SliceContext, preset
from ..data import SliceSet, TrainingData, lesion_free_slices, lesion_slices, random_intensity_scaling
from ..device import resolve_device
from ..errors import InputError
from ..gmm import GMMAccumulator, GMMParams, SingularCovarianceError, diagonal_penalty, energy, mixture_statistics
from ..infer import InferenceOptions, ctoc_translations, energy_volume
from ..io import write_text_atomic
from ..synthetic import SyntheticLesionConfig, lesion_sites, mirror_healed, paint_lesions
from ..metrics import _curve, balanced_best_threshold, choose_load_weight, json_safe, pooled_and_per_case
from ..model import ADMModel
from ..networks import DRDecoder, DREncoder
from ..postprocess import IDENTITY_DIRECTION, anomaly_label, component_voxels, load_offset, postprocess_scores
from ..preprocess import PreparedCase, native_slice_region, prepare_case, slices_to_image
from ..train import Trainer, checkpoint_path_for, masked_mse
from ..domains import domain_pools, load_domains
from ..api import with_postprocess
from .methods import (METHODS, POST_CANDIDATES, MethodSpec, MixtureVariant, StudySettings, baseline_preprocess,
                      ctoc_groups, intensity_preprocess, mixture_variant, network_config, postprocess_for,
                      preprocess_key, raw_variants, tie_t2_weight, training_key)

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
    """One labelled case: network slices per preparation plus its native brain voxels (the scored voxels)."""

    case_id: str
    preparations: dict[str, PreparedCase]
    """Per :func:`~.methods.preprocess_key`: the case prepared with that preprocessing (each keeps
    only its native FLAIR, which the FLAIR term of the post-processing reads)."""
    baseline_key: str
    """Key of the default z-score preparation the baselines read."""
    brain: np.ndarray
    """bool (z, y, x) native brain."""
    labels: np.ndarray
    """bool (N,) lesion flag of each brain voxel (C order of ``brain``)."""
    validation: np.ndarray
    """bool (N,) brain voxels on axial slices with a lesion (the validation region)."""
    normal: np.ndarray
    """bool (N,) brain voxels on the lesion-free training slices (with the margin)."""
    features: np.ndarray
    """float32 (N, 4) z-scored intensities (default preparation)."""
    spacing: tuple[float, float, float]
    lesion_ml: float
    domain: str = ""
    """The case's domain (leave-one-domain-out split); '' in the patient split."""
    direction: tuple[float, ...] = IDENTITY_DIRECTION
    """The native grid's direction cosines (which axis runs left-right, for the FLAIR asymmetry)."""
    synthetic: bool = False
    """A selection case with synthetic lesions (:func:`synthetic_case_data`): never trained or tested on."""

    @property
    def prepared(self) -> PreparedCase:
        """The default z-score preparation."""
        return self.preparations[self.baseline_key]

    def preparation(self, cfg: PreprocessConfig) -> PreparedCase:
        return self.preparations[preprocess_key(cfg)]

    @property
    def voxel_mm3(self) -> float:
        return float(np.prod(self.spacing))


def load_case_data(files, settings: StudySettings, preprocess: Sequence[PreprocessConfig] = (),
                   domain: str = "") -> CaseData:
    """Load one labelled case once and prepare it (:func:`case_data`)."""
    return case_data(load_case(files), settings, preprocess, domain)


def case_data(case: CaseImages, settings: StudySettings, preprocess: Sequence[PreprocessConfig] = (),
              domain: str = "") -> CaseData:
    """Prepare one labelled case with the study's default preprocessing and with every config of
    ``preprocess`` (the networks' own), keeping the native z-scored contrasts the baselines read and each
    preparation's native FLAIR for the FLAIR term."""
    default = baseline_preprocess(settings)
    prepared = prepare_case(case, default, keep_native=CONTRASTS)
    brain = prepared.native_brain
    if prepared.native_lesion is None:
        raise InputError(f"case {case.case_id}: the study needs a lesion label")
    labels = prepared.native_lesion[brain]
    validation = native_slice_region(prepared, lesion_slices(prepared))[brain]
    normal = native_slice_region(prepared, lesion_free_slices(prepared, settings.lesion_margin))[brain]
    features = np.ascontiguousarray(np.stack([prepared.native_zscored[c][brain] for c in CONTRASTS], axis=1))
    # Only what the post-processing reads stays on the native grid (FLAIR, and T2 for its asymmetry).
    prepared.native_zscored = {c: prepared.native_zscored[c] for c in POSTPROCESS_CONTRASTS}
    preparations = {preprocess_key(default): prepared}
    for cfg in preprocess:
        if preprocess_key(cfg) not in preparations:
            preparations[preprocess_key(cfg)] = prepare_case(case, cfg, keep_native=POSTPROCESS_CONTRASTS)
    spacing = tuple(float(s) for s in case.images["flair"].GetSpacing())
    return CaseData(case.case_id, preparations, preprocess_key(default), brain, labels, validation, normal, features,
                    spacing, float(labels.sum() * np.prod(spacing) / 1000.0), domain,
                    tuple(case.images["flair"].GetDirection()))


SYNTHETIC_SUFFIX = "+synthetic"


def synthetic_case_data(files, settings: StudySettings, preprocess: Sequence[PreprocessConfig] = (),
                        domain: str = "", config: SyntheticLesionConfig = SyntheticLesionConfig()) -> CaseData:
    """A selection case: the scan of ``files`` with its own lesion healed from the other hemisphere
    (:func:`~ADMAnomalyLib.synthetic.mirror_healed`) and small lesions painted into its white matter
    (:func:`~ADMAnomalyLib.synthetic.paint_lesions`) on the slices of its own lesion, which no network trains on;
    it is labelled with the painted lesions only. Its validation voxels are the brain of the slices they lie on,
    without the scan's own lesion and ``settings.synthetic_exclusion_mm`` round it (the healed seam, unlabelled).
    The study never trains or tests on it."""
    if settings.synthetic_exclusion_mm < config.heal_margin_mm:
        raise ValueError("the scored voxels must leave out the whole healed region: synthetic_exclusion_mm "
                         f"{settings.synthetic_exclusion_mm} < heal_margin_mm {config.heal_margin_mm}")
    case = load_case(files)
    reference = prepare_case(case, baseline_preprocess(settings), keep_native=("t1",))
    brain, own_lesion = reference.native_brain, reference.native_lesion
    if own_lesion is None:
        raise InputError(f"case {files.case_id}: the study needs a lesion label")
    spacing = case.images["flair"].GetSpacing()
    sites = lesion_sites(brain, reference.native_zscored["t1"], spacing, config, own_lesion)
    sites &= native_slice_region(reference, lesion_slices(reference))
    del reference
    healed = mirror_healed(case, brain, own_lesion, config.heal_margin_mm)
    painted = paint_lesions(dataclasses.replace(healed, case_id=files.case_id + SYNTHETIC_SUFFIX), brain, sites,
                            config)
    data = case_data(painted, settings, preprocess, domain)
    near_own = ndimage.distance_transform_edt(~own_lesion, sampling=tuple(reversed(spacing))) \
        <= settings.synthetic_exclusion_mm
    data.validation &= ~near_own[data.brain]
    data.synthetic = True
    return data


def synthetic_sources(files: Sequence, count: int) -> list:
    """The ``count`` cases of a domain that synthetic lesions are painted into, spread over its cases in id order as
    the search spreads its cases (:func:`search_groups`)."""
    return search_groups([files], count)[0]


# ------------------------------------------------------------------------------------------------
# ADM networks: trained by the engine's Trainer, scored by the engine's inference


@dataclass
class TrainedNetworks:
    """The ADM networks of one run and the CtoCs they share."""

    models: dict[str, Any]
    ctoc_groups: list[tuple[Any, list[str]]]
    """(model holding the group's CtoC, the networks that share it); ``(None, names)`` for the
    networks without CtoC."""
    histories: dict[str, list]


def network_cache_path(cache_dir: Path, name: str, config, train_ids: Sequence[str]) -> Path:
    """Where study network ``name`` trained with ``config`` on the cases ``train_ids`` is kept: the
    file name carries a digest of both, so a changed setting or fold never reuses a stale network.
    Post-processing settings are left out: the study applies its own to the raw energies. So are
    settings at their defaults, so that a new option (off by default) keeps the networks already kept."""
    defaults = ADMConfig().to_dict()
    trained_by = {section: ({k: v for k, v in values.items() if defaults[section].get(k, object()) != v}
                            if isinstance(values, dict) else values)
                  for section, values in config.to_dict().items() if section != "postprocess"}
    identity = json.dumps({"config": trained_by, "train": sorted(train_ids)}, sort_keys=True)
    digest = hashlib.sha256(identity.encode("utf-8")).hexdigest()[:16]
    return cache_dir / f"{''.join(ch if ch.isalnum() else '_' for ch in name)}-{digest}.admm"


def load_cached_network(cache_dir: Path, name: str, settings: StudySettings, seed: int,
                        train_ids: Sequence[str]) -> ADMModel:
    """Study network ``name`` as a run with ``settings`` and ``seed`` trained and kept it in ``cache_dir``
    for the training cases ``train_ids`` (:func:`network_cache_path`), e.g. a finished fold's network for
    an analysis beside the study. Raises :class:`~ADMAnomalyLib.errors.ModelFileError` when the run kept no
    such network."""
    return ADMModel.load(network_cache_path(cache_dir, name, network_config(name, settings, seed), train_ids))


@dataclass
class FinishedFold:
    """One run of a finished study, for an analysis beside it: the ``run`` record of study.json, its
    test ``cases`` prepared for a row, the ``raw`` energies (case id -> brain voxels) of the run's kept
    network and ``natives_of``, the native z-scored contrasts of the row's own preparation."""

    run: dict
    cases: list[CaseData]
    raw: dict[str, np.ndarray]
    natives_of: Callable[[CaseData], dict[str, np.ndarray]]
    settings: StudySettings


def finished_folds(run_dir: Path, spec: MethodSpec, seed: int = 0, only: str | None = None):
    """Yield a :class:`FinishedFold` per run of ``seed`` (left-out domain ``only``, or every one) in the
    study folder ``run_dir`` (study.json, networks/), scored by its kept network of ``spec.network``
    through :func:`raw_energy`, the path ``predict`` runs. One fold at a time: a fold's cases are large."""
    study = json.loads((Path(run_dir) / "study.json").read_text())
    settings = StudySettings.from_dict(study["settings"])
    files = {f.case_id: f for cases in load_domains(study["domains_file"]).values() for f in cases}
    prep = intensity_preprocess(spec, settings)
    options = InferenceOptions("cpu")
    for run in (r for r in study["runs"] if r["seed"] == seed and only in (None, r["domain"])):
        cases = [load_case_data(files[case_id], settings,
                                [network_config(spec.network, settings, 0).preprocess, prep], run["domain"])
                 for case_id in run["test"]]
        model = load_cached_network(Path(run_dir) / "networks", spec.network, settings, seed, run["train"])
        raw = {c.case_id: raw_energy(model, c, options, None) for c in cases}
        yield FinishedFold(run, cases, raw, lambda c: c.preparation(prep).native_zscored, settings)


def train_networks(names: Sequence[str], settings: StudySettings, seed: int, data: dict[str, TrainingData],
                   device: torch.device, cache_dir: Path | None = None,
                   train_ids: Sequence[str] = ()) -> TrainedNetworks:
    """Train the ADM networks ``names`` of one run on ``data`` (training slices per :func:`~.methods.training_key`):
    step 1 (CtoC) once per :func:`~.methods.ctoc_groups` group (identical for its members), then each
    network's step 2 and frozen mixture.

    With ``cache_dir`` every trained network is saved there as a model file
    (:func:`network_cache_path`) and a network already there is loaded instead of trained: a study
    rerun (more methods, other post-processing, an interrupted run) retrains nothing it has. Training
    also checkpoints every epoch beside that file (:func:`~ADMAnomalyLib.train.checkpoint_path_for`;
    the shared step 1 under the group's first network, with ``.ctoc``), so a rerun after an interruption
    continues a network where it stopped: at 192 × 192 one network took 44-74 min on a 2-core CPU."""
    models, histories, groups = {}, {}, []
    if cache_dir is not None:
        cache_dir.mkdir(parents=True, exist_ok=True)
    with_ctoc = ctoc_groups(list(names), settings, seed)
    without_ctoc = [n for n in sorted(names) if not any(n in g for g in with_ctoc)]
    for members in with_ctoc + ([without_ctoc] if without_ctoc else []):
        configs = {name: network_config(name, settings, seed) for name in members}
        paths = {name: network_cache_path(cache_dir, name, configs[name], train_ids) if cache_dir else None
                 for name in members}
        for name in members:
            if paths[name] is not None and paths[name].exists():
                models[name] = ADMModel.load(paths[name])
                histories[name] = models[name].metadata.get("study_history", [])
        ctoc_state, ctoc_model = None, None
        first = configs[members[0]]
        pending = [name for name in members if name not in models]
        loaded = [name for name in members if name in models]
        if first.model.use_ctoc:
            if loaded:  # the members share one CtoC (frozen in step 2): a loaded member's is theirs
                ctoc_model = models[loaded[0]]
                ctoc_state = ctoc_model.network.ctoc_state()
            elif pending:
                trainer, _ = _resumable_trainer(first, device, _checkpoint(paths[members[0]], ".ctoc"))
                ctoc_state = trainer.fit_ctoc(data[training_key(first)])
                ctoc_model = trainer.model
        for name in pending:
            trainer, resumed = _resumable_trainer(configs[name], device, _checkpoint(paths[name]))
            # A resumed step 2 already holds the shared CtoC; passing it again would restart step 2.
            shared_ctoc = None if resumed else ctoc_state
            # The study chooses thresholds on native validation voxels itself, so the trainer's is skipped.
            models[name] = trainer.fit(data[training_key(configs[name])], ctoc_state=shared_ctoc,
                                       calibrate=False)
            histories[name] = trainer.history
            if paths[name] is not None:
                models[name].metadata["study_history"] = json_safe(trainer.history)
                models[name].save(paths[name])
                _checkpoint(paths[name]).unlink(missing_ok=True)
        if paths[members[0]] is not None:
            _checkpoint(paths[members[0]], ".ctoc").unlink(missing_ok=True)
        groups.append((ctoc_model, members))
    return TrainedNetworks(models, groups, histories)


def _checkpoint(network_path: Path | None, stage: str = "") -> Path | None:
    """The per-epoch checkpoint of the network kept at ``network_path`` (None: not kept)."""
    if network_path is None:
        return None
    return checkpoint_path_for(network_path.with_name(network_path.name + stage))


def _resumable_trainer(config, device: torch.device, checkpoint: Path | None) -> tuple[Trainer, bool]:
    """A trainer that checkpoints every epoch to ``checkpoint``, and whether it resumed from it."""
    trainer = Trainer(config, device, checkpoint_path=checkpoint, show_progress_bar=False)
    return trainer, trainer.load_checkpoint()


def raw_energy(model, case: CaseData, options: InferenceOptions, translations: dict | None) -> np.ndarray:
    """The model's energy of every native brain voxel of ``case`` (N,), without post-processing:
    :func:`~ADMAnomalyLib.infer.energy_volume` on the case prepared as the model was trained, the
    path ``admanomaly predict`` runs."""
    prepared = case.preparation(model.config.preprocess)
    image = energy_volume(model, prepared, options, translations=translations, postprocess=PostprocessConfig())
    return sitk.GetArrayFromImage(image)[case.brain]


def raw_key(network: str, flip_tta: bool = False, mixture: MixtureVariant = None) -> str:
    """Key of a network's raw energies in :attr:`RunData.raw`: flip TTA and the case mixture (its
    normal-tissue cut-off and share, :func:`~.methods.mixture_variant`; None: the frozen mixture) are
    the inference settings that change them (every other post-processing step works on them)."""
    key = network + ("|flip" if flip_tta else "")
    if mixture is not None:
        cutoff, share = mixture
        key += f"|case<={cutoff:g}" + ("" if share == 1 else f"|share={share:g}")
    return key


def score_networks(trained: TrainedNetworks, cases: Sequence[CaseData],
                   variants: dict[str, set[tuple[bool, MixtureVariant]]],
                   options: InferenceOptions) -> dict[str, dict[str, np.ndarray]]:
    """Raw energies ``{raw_key: {case: (N,)}}`` of every network, plainly and in each of its
    ``variants`` ``{network: {(flip_tta, mixture_variant)}}``. The translations of a CtoC group are
    computed once per case (and mirror) and dropped after its networks have scored the case, so only
    one case's translations are held at a time."""
    scores: dict[str, dict[str, np.ndarray]] = {}
    for ctoc_model, members in trained.ctoc_groups:
        mirrors = (False, True) if any(flip for name in members for flip, _ in variants.get(name, ())) else (False,)
        for case in cases:
            translations = None
            if ctoc_model is not None:
                prepared = case.preparation(ctoc_model.config.preprocess)
                translations = {m: ctoc_translations(ctoc_model, prepared, options, m) for m in mirrors}
            for name in members:
                for flip, mixture in sorted({(False, None)} | variants.get(name, set()), key=repr):
                    # The cut-off and share reach the case mixture the way a console user tries them:
                    # the model with other post-processing.
                    model = trained.models[name] if mixture is None else with_postprocess(
                        trained.models[name], {"normal_max_flair_z": mixture[0], "case_mixture_share": mixture[1]})
                    scores.setdefault(raw_key(name, flip, mixture), {})[case.case_id] = raw_energy(
                        model, case, dataclasses.replace(options, flip_tta=flip, case_mixture=mixture is not None),
                        translations)
    return scores


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


def selection_groups(train_cases: Sequence[CaseData], split: str) -> list[list[CaseData]]:
    """The groups every data-driven choice averages its criterion over: the training patients pooled
    (patient split), or each training domain on its own (domain split), so that the criterion is the
    mean of the per-domain values and the largest domain does not dictate the choice."""
    if split != "domains":
        return [list(train_cases)]
    groups: dict[str, list[CaseData]] = {}
    for case in train_cases:
        groups.setdefault(case.domain, []).append(case)
    return list(groups.values())


def search_groups(groups: Sequence[Sequence[CaseData]], per_group: int | None) -> list[list[CaseData]]:
    """At most ``per_group`` cases of each group, evenly spread over its cases in id order."""
    out = []
    for group in groups:
        ordered = sorted(group, key=lambda case: case.case_id)
        if per_group is not None and len(ordered) > per_group:
            ordered = [ordered[i] for i in np.linspace(0, len(ordered) - 1, per_group).round().astype(int)]
        out.append(ordered)
    return out


def _validation_voxels(scores: dict[str, np.ndarray], group: Sequence[CaseData]) -> tuple[np.ndarray, np.ndarray]:
    s = _pooled([np.asarray(scores[c.case_id], np.float32)[c.validation] for c in group])
    y = _pooled([c.labels[c.validation] for c in group]).astype(bool)
    return s, y


def validation_threshold(scores: dict[str, np.ndarray], groups: Sequence[Sequence[CaseData]]) -> float:
    """The threshold of highest mean (over ``groups``) Dice on the validation voxels (brain voxels of
    the lesion slices) of each group's cases (:func:`~ADMAnomalyLib.metrics.balanced_best_threshold`,
    the rule ``admanomaly calibrate`` and training use too)."""
    return balanced_best_threshold([_validation_voxels(scores, group) for group in groups])


def validation_auprc(scores: dict[str, np.ndarray], groups: Sequence[Sequence[CaseData]],
                     criterion: str = "mean") -> float:
    """Mean (``criterion`` 'mean') or lowest ('worst') over ``groups`` of the AUPRC of each group's
    validation voxels (pooled within a group)."""
    if criterion not in ("mean", "worst"):
        raise ValueError(f"search criterion must be 'mean' or 'worst', not {criterion!r}")
    values = [_auprc(*_validation_voxels(scores, group)) for group in groups]
    values = [v for v in values if np.isfinite(v)]
    if not values:
        return float("nan")
    return float(np.mean(values) if criterion == "mean" else np.min(values))


def _auprc(s: np.ndarray, y: np.ndarray) -> float:
    from ..metrics import detection_metrics
    return detection_metrics(s, y).auprc


def choose_postprocess(post: PostprocessConfig, fields: Sequence[str],
                       criterion: Callable[[PostprocessConfig], float]) -> tuple[PostprocessConfig, dict[str, Any]]:
    """Greedy choice of the post-processing ``fields``, one after the other in that order, each the
    :data:`~.methods.POST_CANDIDATES` value of highest ``criterion`` (validation AUPRC) with the
    fields chosen so far in place; on ties the first candidate (the simpler one) stays."""
    chosen: dict[str, Any] = {}
    for name in fields:
        candidates = POST_CANDIDATES[name]
        # A candidate may be None (a step off), so the first candidate starts the comparison, not a None sentinel.
        best_value, best_score = candidates[0], criterion(dataclasses.replace(post, **{name: candidates[0]}))
        for value in candidates[1:]:
            score = criterion(dataclasses.replace(post, **{name: value}))
            if score > best_score:
                best_value, best_score = value, score
        post = dataclasses.replace(post, **{name: best_value})
        chosen[name] = best_value
    return post, chosen


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


def evaluate_method(name: str, scores: dict[str, np.ndarray], groups: Sequence[Sequence[CaseData]],
                    test_cases: Sequence[CaseData],
                    test_labels: Callable[[float], dict[str, np.ndarray]] | None = None) -> dict[str, Any]:
    """Validation threshold on the training cases (:func:`validation_threshold` over ``groups``),
    metrics on the test cases' brains: AUROC, AUPRC and best Dice of the scores, Dice, precision and recall
    of the anomaly labels ``test_labels(threshold)`` (None: the scores at the threshold)."""
    threshold = validation_threshold(scores, groups)
    predicted = test_labels(threshold) if test_labels else {}
    report = pooled_and_per_case([(c.case_id, scores[c.case_id], c.labels, None, predicted.get(c.case_id))
                                  for c in test_cases], threshold)
    for row, case in zip(report["per_case"], test_cases):
        row["lesion_ml"] = case.lesion_ml
    return report


def pooled_test_metrics(entries: Sequence[tuple]) -> dict[str, Any]:
    """Metrics over the test voxels of several runs pooled, ``entries`` of (scores, labels, that run's
    threshold) or (scores, labels, threshold, anomaly label): AUROC, AUPRC and best Dice of the pooled voxels;
    Dice, precision and recall of the pooled counts, each case's label made at its own run's validation
    threshold (its anomaly label where given, else its scores at the threshold); and
    ``threshold_relative``: AUROC, AUPRC and best Dice of the pooled voxels with each run's threshold
    subtracted from its scores.

    Runs fitted on different training domains put their scores on different scales (their
    thresholds differ), so the raw pool ranks one run's voxels against another's on no common scale,
    while the pooled Dice already reads each case at its own run's threshold. Shifted to their own
    thresholds, the runs meet at the point that Dice is read at: it lies on that pooled curve."""
    from ..metrics import _cast_threshold, detection_metrics

    s = _pooled([e[0] for e in entries]).astype(np.float32)
    y = _pooled([e[1] for e in entries]).astype(bool)
    detection = dataclasses.asdict(detection_metrics(s, y))
    shifted = _pooled([np.asarray(e[0], np.float64) - float(e[2]) for e in entries])
    relative = dataclasses.asdict(detection_metrics(shifted, y))
    tp = n_pred = 0
    for scores, labels, threshold, *label in entries:
        predicted = label[0] if label and label[0] is not None \
            else scores >= _cast_threshold(threshold, np.asarray(scores).dtype)
        tp += int(np.count_nonzero(predicted & labels))
        n_pred += int(np.count_nonzero(predicted))
    n_pos = int(np.count_nonzero(y))
    ratio = lambda num, den: num / den if den else None  # noqa: E731
    return json_safe({"pooled": detection,
                      "at_threshold": {"dice": ratio(2 * tp, n_pred + n_pos), "precision": ratio(tp, n_pred),
                                       "recall": ratio(tp, n_pos)},
                      "threshold_relative": {k: relative[k] for k in ("auroc", "auprc", "best_f1")}})


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


def study_cases(data_dir: str | Path | None, domains_file: str | Path | None,
                settings: StudySettings) -> dict[str, list]:
    """The study's case files per domain: the domains file's domains (domain split), or one unnamed
    domain holding every case of ``data_dir`` (patient split); ``max_cases`` applies per domain."""
    if (data_dir is None) == (domains_file is None):
        raise InputError("the study needs either a folder of labelled cases or a domains file, not both")
    if (domains_file is not None) != (settings.split == "domains"):
        raise InputError("a domains file goes with split='domains', a folder of cases with split='patients'")
    domains = load_domains(domains_file) if domains_file is not None else {"": find_cases(data_dir)}
    if domains_file is not None and len(domains) < 2:
        raise InputError(f"{domains_file}: leaving one domain out needs at least two domains, found {len(domains)}")
    return {name: files[: settings.max_cases] if settings.max_cases else files for name, files in domains.items()}


def study_splits(domains: dict[str, list[str]], settings: StudySettings) -> list[tuple[str, list[str]]]:
    """(name, test case ids) of every run of a seed: each domain in turn (domain split), or the
    patient folds."""
    if settings.split == "domains":
        unknown = [name for name in settings.left_out if name not in domains]
        if unknown:
            raise InputError(f"no domain {', '.join(map(repr, unknown))} to leave out; the domains file has "
                             f"{', '.join(map(repr, domains))}")
        return [(name, list(ids)) for name, ids in domains.items() if not settings.left_out or name in settings.left_out]
    if settings.left_out:
        raise InputError("leaving domains out needs a domains file (the domain split)")
    folds = patient_folds([c for ids in domains.values() for c in ids], settings.n_folds)
    return [(f"fold {number + 1}", ids) for number, ids in enumerate(folds)]


@dataclass
class RunCaches:
    """Post-processed scores of one run, shared by the methods that need the same configuration."""

    post: dict = dataclasses.field(default_factory=dict)
    """(score key, config, case) -> brain-voxel scores."""
    per_case: dict = dataclasses.field(default_factory=dict)
    """case -> the per-case cache of :func:`~ADMAnomalyLib.postprocess.postprocess_scores`."""
    criteria: dict = dataclasses.field(default_factory=dict)
    """(score key, config, search cases) -> validation criterion: methods that differ only after
    the search (e.g. ``+cc``) share one search."""


def _postprocessed(raw: dict[str, np.ndarray], post: PostprocessConfig, cases: Sequence[CaseData],
                   natives_of: Callable[[CaseData], dict[str, np.ndarray]], caches: RunCaches, key: str,
                   keep: bool = True) -> dict[str, np.ndarray]:
    """Brain-voxel scores (N,) per case of the raw scores ``raw`` post-processed by ``post`` through
    :func:`~ADMAnomalyLib.postprocess.postprocess_scores`, the product's own composition, with the
    native z-scored FLAIR, T1 and T2 ``natives_of(case)`` of the scores' own preparation. Results are cached per
    configuration when ``keep`` (the validation search does not keep its candidates: memory)."""
    out = {}
    for case in cases:
        memo = (key, repr(post), case.case_id)
        if memo in caches.post:
            out[case.case_id] = caches.post[memo]
            continue
        values = raw[case.case_id]
        if post.native_active:
            volume = np.zeros(case.brain.shape, np.float32)
            volume[case.brain] = values
            natives = natives_of(case)
            volume = postprocess_scores(volume, case.brain, case.spacing, post, natives["flair"],
                                        caches.per_case.setdefault(case.case_id, {}), case.direction, natives["t2"],
                                        natives["t1"])
            values = volume[case.brain]
        if keep:
            caches.post[memo] = values
        out[case.case_id] = values
    return out


def _component_labels(test_cases: Sequence[CaseData], min_mm3: float, scores: dict[str, np.ndarray]):
    """``+cc``: at the threshold, each test case's anomaly label (bool over its brain voxels) without the regions
    smaller than ``min_mm3``, made as ``predict`` makes it (:func:`~ADMAnomalyLib.postprocess.anomaly_label`;
    ``PostprocessConfig.min_component_mm3``). The scores stay as they are: the map ``predict`` writes."""

    made: dict[float, dict[str, np.ndarray]] = {}  # the metrics and the pool ask for the same threshold's labels

    def apply(threshold: float) -> dict[str, np.ndarray]:
        if threshold not in made:
            made[threshold] = {}
            for c in test_cases:
                volume = np.full(c.brain.shape, -np.inf, dtype=np.float32)
                volume[c.brain] = scores[c.case_id]
                made[threshold][c.case_id] = anomaly_label(volume, c.brain, threshold,
                                                           component_voxels(min_mm3, c.spacing))[c.brain]
        return made[threshold]

    return apply


@dataclass
class RunData:
    """What the methods of one run see."""

    settings: StudySettings
    seed: int
    train_cases: list[CaseData]
    test_cases: list[CaseData]
    groups: list[list[CaseData]]
    """The selection groups (:func:`selection_groups`)."""
    raw: dict[str, dict[str, np.ndarray]]
    """Raw scores per :func:`raw_key` (network, flip TTA, case mixture) and DAGMM-conv."""
    caches: RunCaches
    training: dict[str, TrainingData]
    held_out_raw: dict[str, dict[str, np.ndarray]] = dataclasses.field(default_factory=dict)
    """Per :func:`raw_key`: each training case's raw scores from the network trained without its domain
    (:func:`score_held_out`), for the rows with :attr:`~.methods.MethodSpec.held_out_selection`."""
    synthetic_cases: list[CaseData] = dataclasses.field(default_factory=list)
    """The synthetic-lesion copies of training-domain scans (:func:`synthetic_case_data`): one more group of the
    post-processing search (:func:`adm_method_scores`), never trained on, never in the threshold or load choice."""

    @property
    def all_cases(self) -> list[CaseData]:
        """The cases every row scores: the training cases (the groups) and the test cases."""
        return self.train_cases + self.test_cases

    @property
    def scored_cases(self) -> list[CaseData]:
        """The cases the networks score: :attr:`all_cases` and the synthetic ones."""
        return self.all_cases + self.synthetic_cases


def adm_method_scores(spec: MethodSpec, run: RunData) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """An ADM row: its network's raw energies post-processed as the spec says, the searched fields
    chosen on the training cases' validation voxels (:func:`choose_postprocess`,
    :func:`validation_auprc` over the selection groups)."""
    settings = run.settings
    post = tie_t2_weight(spec, postprocess_for(spec, settings))

    def key_of(candidate: PostprocessConfig) -> str:
        return raw_key(spec.network, candidate.flip_tta, mixture_variant(candidate))

    prep = intensity_preprocess(spec, settings)
    # Rows that read the FLAIR term from another normalisation must not share post-processed scores.
    flair_source = ("" if spec.native_normalisation is None else f"|FLAIR {spec.native_normalisation}") + (
        f"|N4 {spec.native_bias_correction_levels}" if spec.native_bias_correction_levels else "")

    def natives_of(case: CaseData) -> dict[str, np.ndarray]:
        # The FLAIR term reads the native FLAIR (and T2) of the row's preparation, as predict does.
        return case.preparation(prep).native_zscored

    def raw_of(key: str) -> dict[str, np.ndarray]:
        if not spec.held_out_selection:
            return run.raw[key]
        # Training cases from the networks that did not see their domain, test cases from the run's.
        return {**run.raw[key], **run.held_out_raw[key]}

    if spec.held_out_selection:
        # Their post-processed training scores differ from the in-domain rows': no shared cache entries.
        flair_source += "|held-out"

    extra: dict[str, Any] = {}
    if spec.search:
        # The painted lesions' brightness is a prior, not a measurement, so they steer which terms rank lesions
        # first, never the threshold or the load weight, which put the scores on the real scans' scale.
        groups = search_groups(run.groups + ([run.synthetic_cases] if run.synthetic_cases else []),
                               settings.search_cases_per_group)
        search_cases = [case for group in groups for case in group]

        def criterion(candidate: PostprocessConfig) -> float:
            candidate = tie_t2_weight(spec, candidate)
            key = key_of(candidate)
            memo = (key + flair_source, repr(candidate), tuple(case.case_id for case in search_cases),
                    spec.search_criterion)
            if memo not in run.caches.criteria:
                run.caches.criteria[memo] = validation_auprc(_postprocessed(
                    raw_of(key), candidate, search_cases, natives_of, run.caches, key + flair_source, keep=False),
                    groups, spec.search_criterion)
            return run.caches.criteria[memo]

        post, extra["chosen"] = choose_postprocess(post, spec.search, criterion)
        post = tie_t2_weight(spec, post)
        extra["postprocess"] = dataclasses.asdict(post)
    key = key_of(post)
    scores = _postprocessed(raw_of(key), post, run.all_cases, natives_of, run.caches, key + flair_source)
    if spec.load_weights:
        scores, extra["load"] = _with_chosen_load(scores, post, spec.load_weights, run)
        extra.setdefault("postprocess", dataclasses.asdict(post))["load_weight"] = extra["load"]["weight"]
    return scores, extra


def _with_chosen_load(scores: dict[str, np.ndarray], post: PostprocessConfig, weights: Sequence[float],
                      run: RunData) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """The scores with the load term (``PostprocessConfig.load_weight``, the last post-processing step,
    :func:`~ADMAnomalyLib.postprocess.load_offset`) of the weight among ``weights`` whose threshold
    transfers best between the selection groups' validation voxels (:func:`~ADMAnomalyLib.metrics.choose_load_weight`)."""
    if post.small_lesion_load == "never":
        # 'thin' is 'always' here: every study case is scored on its own slices.
        raise ValueError("the study adds the load term after the post-processing, to every case: it cannot leave it "
                         "out of the cases scored for their small lesions (postprocess.small_lesion_load 'never')")
    log_load = {case.case_id: load_offset(scores[case.case_id], 1.0, post.load_reference) for case in run.all_cases}
    groups = [[(scores[c.case_id][c.validation], c.labels[c.validation], log_load[c.case_id]) for c in group]
              for group in run.groups]
    weight, figures = choose_load_weight(groups, weights)
    # weight x the weight-1 offset is the very float32 constant postprocess_scores adds with this weight.
    shifted = {case_id: values + np.float32(weight * log_load[case_id]) for case_id, values in scores.items()}
    return shifted, {"weight": weight, "transfer_dice": {str(w): f for w, f in figures.items()}}


def baseline_method_scores(method: str, spec: MethodSpec, run: RunData) -> tuple[dict[str, np.ndarray], dict]:
    """A baseline row's brain-voxel scores (training cases: at least their validation voxels)."""
    flair = CONTRASTS.index("flair")
    if spec.kind == "dagmm":
        return run.raw["DAGMM-conv"], {}
    if spec.kind in ("flair", "flair_filtered"):
        prep = intensity_preprocess(spec, run.settings)

        def natives_of(case: CaseData) -> dict[str, np.ndarray]:
            # The asymmetries read the row's own preparation of FLAIR and T2, as its score does.
            return case.preparation(prep).native_zscored

        raw = {c.case_id: natives_of(c)["flair"][c.brain] for c in run.all_cases}
        post = postprocess_for(spec, run.settings)
        return _postprocessed(raw, post, run.all_cases, natives_of, run.caches, method), {}
    if spec.kind in ("mahalanobis", "ocsvm"):
        settings, extra = run.settings, {}
        normal = _pooled([c.features[c.normal] for c in run.train_cases])
        rng = np.random.default_rng(run.seed)
        if spec.kind == "mahalanobis":
            if len(normal) > settings.mahalanobis_max_train:
                normal = normal[rng.choice(len(normal), settings.mahalanobis_max_train, replace=False)]
            scorer = MahalanobisBaseline().fit(normal)
        else:
            scorer = OCSVMBaseline(max_train=settings.ocsvm_max_train, seed=run.seed).fit(normal)
            extra["n_support"] = scorer.n_support
        scores = {}
        for c in run.train_cases:  # validation voxels only are needed from training cases
            s = np.full(len(c.labels), -np.inf, dtype=np.float32)
            s[c.validation] = scorer.score(c.features[c.validation])
            scores[c.case_id] = s
        for c in run.test_cases:
            scores[c.case_id] = scorer.score(c.features)
        return scores, extra
    raise AssertionError(spec.kind)  # pragma: no cover - registry and dispatch are kept in step


def evaluate_methods(methods: Sequence[str], run: RunData, record: dict[str, Any],
                     tick: Callable[[str, float], None]) -> dict[str, tuple[dict[str, np.ndarray], dict | None]]:
    """Score and evaluate every method of one run into ``record['methods']``; returns each method's final test
    scores per test case and, for ``+cc`` rows, its anomaly labels at its threshold (else None)."""
    finals: dict[str, tuple[dict[str, np.ndarray], dict | None]] = {}
    for method in methods:
        t = time.perf_counter()
        spec = METHODS[method]
        if spec.kind == "adm":
            scores, extra = adm_method_scores(spec, run)
        else:
            scores, extra = baseline_method_scores(method, spec, run)
        labels_at = _component_labels(run.test_cases, run.settings.min_component_mm3, scores) \
            if spec.small_components else None
        result = evaluate_method(method, scores, run.groups, run.test_cases, labels_at)
        result.update(extra)
        result["seconds"] = time.perf_counter() - t
        record["methods"][method] = result
        finals[method] = ({c.case_id: np.asarray(scores[c.case_id], np.float32) for c in run.test_cases},
                          labels_at(result["threshold"]) if labels_at else None)
        tick(f"evaluate {method}", t)
    return finals


def run_study(data_dir: str | Path | None, output_dir: str | Path, settings: StudySettings,
              progress: Progress | None = None, command: str | None = None,
              domains_file: str | Path | None = None) -> dict[str, Any]:
    """Run the study and write ``output_dir/study.json`` (+ ``examples.npz`` for the example figure):
    patient folds of the cases in ``data_dir`` (``settings.split == 'patients'``) or leave one domain
    of ``domains_file`` out at a time (``'domains'``). The trained networks are kept in
    ``output_dir/networks`` and reused by a later run into the same folder (:func:`train_networks`)."""
    started = time.perf_counter()
    # The code that runs is the checkout's at the start: commits made while a long study runs must
    # not be credited with its figures.
    code_version = _git_commit(Path(__file__).resolve().parents[2])
    say = progress or (lambda message: None)
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    device = resolve_device(settings.device)
    methods = settings.method_names()
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise InputError(f"unknown method(s) {', '.join(unknown)}; choose from {', '.join(METHODS)}")
    if settings.split not in ("patients", "domains"):
        raise InputError(f"study split must be 'patients' or 'domains', not {settings.split!r}")
    held_out_networks = sorted({METHODS[m].network for m in methods
                                if METHODS[m].kind == "adm" and METHODS[m].held_out_selection})
    if held_out_networks and settings.split != "domains":
        raise InputError("the held-out rows (" + ", ".join(m for m in methods if METHODS[m].held_out_selection)
                         + ") choose on left-out training domains: they need the domain split")
    if settings.synthetic_cases_per_domain and settings.split != "domains":
        raise InputError("synthetic selection cases go with the domain split: a patient fold's test cases share "
                         "the domain its copies would be painted from")
    files_by_domain = study_cases(data_dir, domains_file, settings)
    domains = {name: [f.case_id for f in files] for name, files in files_by_domain.items()}
    splits = study_splits(domains, settings)  # before loading: a misnamed domain fails at once
    networks_needed = sorted({METHODS[m].network for m in methods if METHODS[m].kind == "adm"})
    variants_needed: dict[str, set[tuple[bool, MixtureVariant]]] = {}
    for m in methods:
        if METHODS[m].kind == "adm":
            variants_needed.setdefault(METHODS[m].network, set()).update(raw_variants(METHODS[m], settings))
    network_preprocess = [network_config(n, settings, 0).preprocess for n in networks_needed]
    network_preprocess += [intensity_preprocess(METHODS[m], settings) for m in methods
                           if METHODS[m].kind == "adm" or METHODS[m].native_normalisation is not None
                           or METHODS[m].native_bias_correction_levels]
    cases: dict[str, CaseData] = {}
    total = sum(len(files) for files in files_by_domain.values())
    for domain, files in files_by_domain.items():
        for case_files in files:
            cases[case_files.case_id] = load_case_data(case_files, settings, network_preprocess, domain)
            say(f"loaded {case_files.case_id} ({len(cases)}/{total})")
    synthetic: dict[str, CaseData] = {}
    if settings.synthetic_cases_per_domain:
        for domain, files in files_by_domain.items():
            for case_files in synthetic_sources(files, settings.synthetic_cases_per_domain):
                made = synthetic_case_data(case_files, settings, network_preprocess, domain)
                synthetic[made.case_id] = made
                say(f"painted small lesions into {case_files.case_id} ({made.lesion_ml:.1f} ml)")
    tested = [name for name, _ in splits] if settings.split == "domains" else list(domains)
    # A pool is reported only when all its domains were left out, so that it means what it says.
    pools = {pool: members for pool, members in (domain_pools(domains_file) if domains_file is not None else {}).items()
             if set(members) <= set(tested)}
    runs: list[dict[str, Any]] = []
    seed_pooled: list[dict[str, Any]] = []
    curves: dict[str, dict[str, list]] = {m: {"scores": [], "labels": []} for m in methods}
    example_store: dict[tuple[int, str], dict[str, np.ndarray]] = {}
    timings: dict[str, float] = {}

    def tick(key: str, since: float) -> None:
        timings[key] = timings.get(key, 0.0) + time.perf_counter() - since

    def summaries() -> dict[str, Any]:
        return study_summaries(runs, seed_pooled, methods, settings.split, tested, pools)

    for seed in settings.seeds:
        seed_entries: dict[str, list] = {m: [] for m in methods}
        entry_domains: list[str] = []
        for fold_index, (split_name, test_ids) in enumerate(splits):
            record, run_data = _start_run(seed, fold_index, split_name, test_ids, cases, settings, networks_needed,
                                          "DAGMM-conv" in methods, list(synthetic.values()))
            say(f"seed {seed} {split_name} ({fold_index + 1}/{len(splits)}): {len(run_data.train_cases)} training "
                f"cases ({record['train_slices']} normal slices), test {', '.join(test_ids)}")
            t = time.perf_counter()
            trained = train_networks(networks_needed, settings, seed, run_data.training, device,
                                     output_dir / "networks", record["train"])
            record["histories"].update(trained.histories)
            tick("train ADM networks", t)
            say(f"  ADM networks trained ({timings['train ADM networks']:.0f} s so far)")
            t = time.perf_counter()
            run_data.raw.update(score_networks(trained, run_data.scored_cases, variants_needed, InferenceOptions(device)))
            del trained
            tick("score ADM networks", t)
            if held_out_networks:
                t = time.perf_counter()
                record["held_out_slices"] = score_held_out(run_data, held_out_networks, variants_needed, device,
                                                           output_dir / "networks")
                tick("train and score held-out networks", t)
                say(f"  held-out networks trained and scored ({timings['train and score held-out networks']:.0f} s "
                    "so far)")
            if "DAGMM-conv" in methods:
                t = time.perf_counter()
                net, gmm = train_dagmm(run_data.training[run_data.train_cases[0].baseline_key], settings, seed, device)
                run_data.raw["DAGMM-conv"] = {c.case_id: dagmm_native_energy(net, gmm, c, device)[c.brain]
                                              for c in run_data.all_cases}
                tick("DAGMM-conv", t)
                say("  DAGMM-conv trained and scored")
            run_data.training.clear()
            finals = evaluate_methods(methods, run_data, record, tick)
            entry_domains += [c.domain for c in run_data.test_cases]
            for method, (final, predicted) in finals.items():
                threshold = record["methods"][method]["threshold"]
                seed_entries[method] += [(final[c.case_id], c.labels, threshold,
                                          None if predicted is None else predicted[c.case_id])
                                         for c in run_data.test_cases]
                if seed == settings.seeds[0]:
                    curves[method]["scores"] += [final[c.case_id] for c in run_data.test_cases]
                    curves[method]["labels"] += [c.labels for c in run_data.test_cases]
                    for c in run_data.test_cases:
                        example_store.setdefault((fold_index, c.case_id), {})[method] = final[c.case_id]
            del run_data, finals
            runs.append(record)
            # Partial results after every run, so an interrupted study still leaves its numbers.
            write_text_atomic(json.dumps(json_safe({"settings": settings.to_dict(), "runs": runs,
                                                    **summaries()}), indent=1),
                              output_dir / "study_partial.json")
            say(f"  {split_name} done: " + ", ".join(f"{m} AUPRC {record['methods'][m]['pooled']['auprc']:.3f}"
                                                     for m in methods))
        if settings.split == "domains":
            seed_pooled.append({"seed": seed, "methods": {m: pooled_test_metrics(seed_entries[m]) for m in methods},
                                "pools": {pool: {m: pooled_test_metrics([e for e, d in zip(seed_entries[m], entry_domains)
                                                                         if d in members]) for m in methods}
                                          for pool, members in pools.items()}})
        del seed_entries
    singularity = None
    if settings.split == "patients":
        t = time.perf_counter()
        singularity = singularity_experiment(list(cases.values())[: max(1, len(cases) * 2 // 3)], settings, device,
                                             say)
        tick("singularity experiment", t)

    curve_json = {}
    for method in methods:
        s, y = _pooled(curves[method]["scores"]), _pooled(curves[method]["labels"])
        if len(s):
            curve_json[method] = curve_points(s, y.astype(bool), settings.curve_points)
    examples = _save_examples(output_dir / "examples.npz", example_store, cases, runs, methods)
    result = json_safe({
        "study_version": STUDY_VERSION,
        "split": settings.split,
        "settings": settings.to_dict(),
        "command": command,
        "data_dir": str(data_dir) if data_dir is not None else None,
        "domains_file": str(domains_file) if domains_file is not None else None,
        "domains": domains if settings.split == "domains" else None,
        "cases": {c.case_id: {"domain": c.domain, "lesion_ml": c.lesion_ml, "brain_voxels": int(c.brain.sum()),
                              "normal_slices": int(len(lesion_free_slices(c.prepared, settings.lesion_margin))),
                              "lesion_slices": int(len(lesion_slices(c.prepared)))} for c in cases.values()},
        "synthetic_cases": {c.case_id: {"domain": c.domain, "lesion_ml": c.lesion_ml,
                                        "validation_voxels": int(c.validation.sum())} for c in synthetic.values()},
        "folds": [ids for _, ids in splits],
        "methods": {m: {"kind": METHODS[m].kind, "group": METHODS[m].group, "description": METHODS[m].description,
                        "network_config": (network_config(METHODS[m].network, settings, 0).to_dict()
                                           if METHODS[m].kind == "adm" else None),
                        "postprocess": (dataclasses.asdict(postprocess_for(METHODS[m], settings))
                                        if METHODS[m].kind in ("adm", "flair_filtered") else None),
                        "search": list(METHODS[m].search)} for m in methods},
        "runs": runs,
        **summaries(),
        "curves": curve_json,
        "examples": examples,
        "singularity": singularity,
        "timings_s": timings,
        "runtime_s": time.perf_counter() - started,
        "machine": machine_description(device),
        "git": code_version,
        "finished": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    })
    write_text_atomic(json.dumps(result, indent=1, allow_nan=False), output_dir / "study.json")
    return result


def _start_run(seed: int, fold_index: int, split_name: str, test_ids: Sequence[str], cases: dict[str, CaseData],
               settings: StudySettings, networks: Sequence[str], dagmm: bool,
               synthetic: Sequence[CaseData] = ()) -> tuple[dict[str, Any], RunData]:
    """The record and the data of one run: training cases (every case not tested), their training
    slices per preparation the run's networks need, the selection groups, and the ``synthetic`` cases of the
    training domains."""
    train_cases = [c for c in cases.values() if c.case_id not in test_ids]
    test_cases = [cases[c] for c in test_ids]
    # A copy of a tested scan, or of any scan of a tested domain, would let the test data steer the choices.
    test_domains = {c.domain for c in test_cases}
    synthetic = [c for c in synthetic if c.domain not in test_domains
                 and c.case_id.removesuffix(SYNTHETIC_SUFFIX) not in test_ids]
    baseline_key = train_cases[0].baseline_key
    training = training_sets(train_cases, settings, networks)
    record: dict[str, Any] = {"seed": seed, "fold": fold_index, "test": list(test_ids),
                              "train": [c.case_id for c in train_cases],
                              "train_slices": len(training[baseline_key].train),
                              "validation_slices": len(training[baseline_key].validation),
                              "methods": {}, "histories": {}}
    if settings.split == "domains":
        record["domain"] = split_name
        record["train_domains"] = sorted({c.domain for c in train_cases})
    groups = selection_groups(train_cases, settings.split)
    if synthetic:
        record["synthetic"] = [c.case_id for c in synthetic]
    return record, RunData(settings, seed, train_cases, test_cases, groups, {}, RunCaches(), training,
                           synthetic_cases=list(synthetic))


def training_sets(train_cases: Sequence[CaseData], settings: StudySettings, networks: Sequence[str],
                  baseline: bool = True) -> dict[str, TrainingData]:
    """The training slices of ``train_cases`` per :func:`~.methods.training_key` the ``networks`` need,
    and with ``baseline`` the default preparation's (the baselines' and DAGMM-conv's)."""
    baseline_key = train_cases[0].baseline_key
    configs = [network_config(n, settings, 0) for n in networks]
    # training key -> (preparation key, the slices each training slice carries)
    keys = {training_key(cfg): (preprocess_key(cfg.preprocess), cfg.model.slice_context) for cfg in configs}
    if baseline:
        keys.setdefault(baseline_key, (baseline_key, SliceContext()))
    return {key: TrainingData.from_prepared([c.preparations[prep] for c in train_cases], settings.lesion_margin,
                                            context)
            for key, (prep, context) in keys.items()}


def score_held_out(run: RunData, networks: Sequence[str], variants: dict[str, set[tuple[bool, MixtureVariant]]],
                   device: torch.device, cache_dir: Path | None) -> dict[str, int]:
    """Fill ``run.held_out_raw``: for each training domain of the run, ``networks`` trained on the run's
    other training domains (:func:`train_networks`, kept in ``cache_dir``: the network of a pair of
    domains serves the two runs that leave out one of the other two) score that domain's cases.
    Returns the training slices of each domain's held-out networks (of the first network's preparation)."""
    domains = sorted({case.domain for case in run.train_cases})
    if len(domains) < 2:
        raise InputError("choosing on held-out domains needs at least two training domains per run; "
                         f"this run trains on {domains or 'no domain'}")
    slices = {}
    for domain in domains:
        inner = [case for case in run.train_cases if case.domain != domain]
        training = training_sets(inner, run.settings, networks, baseline=False)
        slices[domain] = len(training[training_key(network_config(networks[0], run.settings, 0))].train)
        trained = train_networks(networks, run.settings, run.seed, training, device, cache_dir,
                                 [case.case_id for case in inner])
        del training
        scored = score_networks(trained, [case for case in run.train_cases + run.synthetic_cases
                                          if case.domain == domain],
                                {name: variants.get(name, set()) for name in networks}, InferenceOptions(device))
        for key, per_case in scored.items():
            run.held_out_raw.setdefault(key, {}).update(per_case)
    return slices


def study_summaries(runs: Sequence[dict[str, Any]], seed_pooled: Sequence[dict[str, Any]], methods: Sequence[str],
                    split: str, domains: Sequence[str], pools: dict[str, list[str]] | None = None) -> dict[str, Any]:
    """``summary``: mean +- sd over runs (patient split) or, for the domain split, over seeds of the
    metrics pooled over every left-out test case of a seed; plus (domain split) ``domain_summary``: per
    domain, mean +- sd over seeds, and ``pool_summary``: the same for the left-out cases of each pool of
    domains (``pools``: {name: its domains}, from the domains file), each case at its own run's threshold."""
    if split != "domains":
        return {"summary": summarise(runs, methods)}
    pools = pools or {}
    return {"summary": summarise(seed_pooled, methods),
            "domain_summary": {d: summarise([r for r in runs if r.get("domain") == d], methods) for d in domains},
            "pools": pools,
            "pool_summary": {pool: summarise([{"methods": p["pools"][pool]} for p in seed_pooled], methods)
                             for pool in pools},
            "seed_pooled": list(seed_pooled)}


SUMMARY_METRICS = ("auroc", "auprc", "dice", "best_dice", "precision", "recall", "auprc_threshold_relative")


def _run_values(result: dict[str, Any]) -> dict[str, float | None]:
    """The summary metrics of one run's or one pool's result; ``auprc_threshold_relative`` only where several
    runs were pooled (:func:`pooled_test_metrics`): within one run it is the AUPRC."""
    pooled, at = result["pooled"], result["at_threshold"]
    return {"auroc": pooled["auroc"], "auprc": pooled["auprc"], "best_dice": pooled["best_f1"],
            "dice": at["dice"], "precision": at["precision"], "recall": at["recall"],
            "auprc_threshold_relative": result.get("threshold_relative", {}).get("auprc")}


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
