"""Applying a trained model: slices -> energy maps -> energy image on the input grid."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Callable

import numpy as np
import SimpleITK as sitk
import torch

from .cases import CaseImages
from .config import CONTRASTS, PostprocessConfig, SliceContext
from .device import autocast, inference_dtype, resolve_device
from .errors import CancelledError, InputError
from .gmm import GMMAccumulator, GMMParams, energy
from .model import ADMModel
from .networks import check_neighbours
from .postprocess import anomaly_label, component_voxels, postprocess_energy
from .preprocess import MIRROR_AXIS, PreparedCase, native_brain_mask, prepare_case, slices_to_image
from .slicing import energy_onto, thin_case, thin_grid
from .validation import check_positive_int, check_threshold

ProgressCallback = Callable[[int, int], None]
CancelCheck = Callable[[], bool]


@dataclass
class Prediction:
    """Result of running a model on one case."""

    energy: sitk.Image
    """Anomaly energy E (float32) on exactly the input grid; background is below every brain energy."""
    brain_mask: sitk.Image
    """Brain mask (uint8) on the input grid."""
    threshold: float | None
    """The model's validation threshold (None for a model trained without lesion labels)."""
    n_slices_processed: int
    preprocessing: object = None
    """The raw-scan preprocessing report (:class:`~ADMAnomalyLib.rawprep.RawResult`) when the case
    went through it, else None."""

    min_component_mm3: float = 0.0
    """The model's ``PostprocessConfig.min_component_mm3``: smaller regions are left out of the anomaly label."""

    def anomaly(self, threshold: float | None = None) -> sitk.Image:
        """Binary anomaly map at ``threshold`` (default: the model's), without the regions smaller than
        ``min_component_mm3``."""
        chosen = self.threshold if threshold is None else check_threshold(threshold)
        if chosen is None:
            raise ValueError("this model has no validation threshold; pass one explicitly")
        return anomaly_mask(self.energy, self.brain_mask, chosen, self.min_component_mm3)


@dataclass(frozen=True)
class InferenceOptions:
    """How a model is run: the same for ``predict``, ``evaluate``, the study, the benchmarks and the
    Slicer module."""

    device: str | torch.device = "auto"
    """'auto' (a GPU if there is one), 'cpu', 'cuda' or 'cuda:N'."""
    precision: str = "auto"
    """CtoC precision, one of :data:`~ADMAnomalyLib.config.PRECISIONS` ('auto': half precision on a
    GPU, float32 on CPU). DR, the mixture and the energy always run in float32/float64."""
    batch_size: int = 16
    """Slices per network batch."""
    compile: bool = False
    """Run CtoC through ``torch.compile`` (pays off over many cases)."""
    flip_tta: bool | None = None
    """Average each slice's energy with its left-right mirror's; None: the model's
    ``postprocess.flip_tta``."""
    case_mixture: bool | None = None
    """Score each case with the mixture re-estimated over its own normal-looking pixels; None: the
    model's ``postprocess.case_mixture``."""

    def checked(self) -> "InferenceOptions":
        """These options with the batch size validated and the device and precision resolved: a
        bad value is an error before any work starts."""
        batch_size = check_positive_int(self.batch_size, "batch size")
        device = resolve_device(self.device)
        inference_dtype(device, self.precision)
        return replace(self, device=device, batch_size=batch_size)


Translations = dict
"""CtoC translations of a case's brain slices, ``{mirrored: (S_brain, C, N, N) float32}``
(:func:`ctoc_translations`): models that share one CtoC network share them. Callers keep them as
they are: C is 4 (X̂_ct), or 8 for a model with ``ctoc_uncertainty`` (X̂_ct, then its log-variances;
see :func:`~ADMAnomalyLib.networks.translate_all`)."""


def ctoc_translations(model: ADMModel, prepared: PreparedCase, options: InferenceOptions = InferenceOptions(),
                      mirrored: bool = False) -> np.ndarray:
    """CtoC translations (S_brain, C, N, N) of a prepared case's brain slices (of their left-right
    mirrors with ``mirrored``), exactly as :func:`energy_volume` computes them (C: see
    :data:`Translations`)."""
    options = options.checked()
    images, brain, neighbours = _brain_slices(prepared, model.config.model.slice_context, mirrored)
    ctoc = ctoc_runner(model, options.compile).to(options.device).eval()
    dtype = inference_dtype(options.device, options.precision)
    out = np.zeros((len(images), model.network.translation_channels, *images.shape[2:]), dtype=np.float32)
    with torch.inference_mode():
        for start in range(0, len(images), options.batch_size):
            x = _batch(images, start, options.batch_size, np.float32, options.device)
            b = _batch(brain, start, options.batch_size, bool, options.device)
            around = _batch(neighbours, start, options.batch_size, np.float32, options.device)
            with autocast(options.device, dtype):
                translated = model.network.translate(x, b, around, ctoc=ctoc)
            out[start : start + len(x)] = translated.float().cpu().numpy()
    return out


def _batch(array: np.ndarray | None, start: int, size: int, dtype: Any, device: torch.device) -> torch.Tensor | None:
    # np.array copies: memory-mapped cache slices are read-only, which torch warns about.
    if array is None:
        return None
    return torch.from_numpy(np.array(array[start : start + size], dtype=dtype)).to(device)


def _brain_slices(prepared: PreparedCase, context: SliceContext,
                  mirrored: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """A prepared case's brain slices, their brain masks and (with a ``context``) their neighbours.
    Mirrored, the neighbours flip with the slice: a slice's mirror image then stays its mirror image."""
    index = np.flatnonzero(prepared.has_brain)
    arrays = [prepared.slices[index], prepared.brain[index], prepared.neighbours(index, context) if context else None]
    return tuple(np.flip(a, MIRROR_AXIS) if mirrored and a is not None else a for a in arrays)  # type: ignore[return-value]


def energy_slices(
    model: ADMModel,
    images: np.ndarray,
    brain: np.ndarray,
    options: InferenceOptions = InferenceOptions(),
    progress: ProgressCallback | None = None,
    should_cancel: CancelCheck | None = None,
    x_hat_ct: np.ndarray | None = None,
    neighbours: np.ndarray | None = None,
    case_mixture: bool = False,
) -> np.ndarray:
    """Per-pixel energy of slices (M, 4, N, N) with brain masks (M, N, N), one pass (no test-time
    augmentation); returns (M, N, N) float32, computed at brain pixels only (the rest is 0).

    ``x_hat_ct`` (M, C, N, N) may hold these slices' CtoC translations (:func:`ctoc_translations`);
    otherwise a CtoC with a ``model.slice_context`` of n images needs their ``neighbours`` (M, n·4, N, N).
    With ``case_mixture`` the slices are one case's, scored with the mixture :func:`case_mixture_of`
    fits to their normal-looking pixels instead of the frozen training mixture, or with both, weighted
    by ``postprocess.case_mixture_share``."""
    if model.gmm is None:
        raise ValueError("the model's mixture has not been fitted")
    options = options.checked()
    device = options.device
    network = model.network.to(device).eval()
    dtype = inference_dtype(device, options.precision)
    ctoc = ctoc_runner(model, options.compile)
    total, batch_size = len(images), options.batch_size
    # Every batch's features are kept (a case's are a few tens of MB) because a case mixture needs
    # all of them before the first energy.
    features, masks, flair = [], [], []
    with torch.inference_mode():
        for start in range(0, total, batch_size):
            if should_cancel is not None and should_cancel():
                raise CancelledError("cancelled by the user; no output was written")
            x = _batch(images, start, batch_size, np.float32, device)
            b = _batch(brain, start, batch_size, bool, device)
            x_hat, around = None, None
            if x_hat_ct is not None and model.config.model.use_ctoc:
                x_hat = _batch(x_hat_ct, start, batch_size, np.float32, device)
            elif ctoc is not None:
                around = _batch(neighbours, start, batch_size, np.float32, device)
                check_neighbours(model.config.model, x, around)
            features.append(brain_features(network, ctoc, x, b, dtype, x_hat, around).float())
            masks.append(b)
            if case_mixture:
                flair.append(x[:, CONTRASTS.index("flair")][b])
            if progress is not None:
                progress(min(start + batch_size, total), total)
        weighted = [(1.0, model.gmm.to(device))]
        if case_mixture and features:
            share = model.config.postprocess.case_mixture_share
            weighted = [(share, case_mixture_of(model, torch.cat(features), torch.cat(flair)))]
            if share < 1:
                weighted.append((1.0 - share, model.gmm.to(device)))
        result = np.zeros(brain.shape, dtype=np.float32)
        for start, z, b in zip(range(0, total, batch_size), features, masks):
            # The mixtures are evaluated at brain pixels only (the rest is 0 and masked by the caller).
            chunk = torch.zeros(b.shape, dtype=torch.float32, device=device)
            chunk[b] = sum(weight * energy(z, mixture).float() for weight, mixture in weighted)
            result[start : start + len(b)] = chunk.cpu().numpy()
    return result


MIN_CASE_MIXTURE_PIXELS = 500
"""A case mixture needs at least this many normal-looking brain pixels at network resolution (one
128 × 128 slice holds about 5000): fewer cannot estimate the components' covariances."""


def case_mixture_of(model: ADMModel, features: torch.Tensor, flair: torch.Tensor) -> GMMParams:
    """Beyond the paper (``postprocess.case_mixture``): the mixture's π, μ, Σ estimated over one case's
    normal-looking brain pixels (network-input FLAIR at most ``postprocess.normal_max_flair_z``), with
    the memberships G_de gives them, in place of the mixture frozen over the training data.

    ``features`` (n, d) are the case's brain pixels' density features and ``flair`` (n,) their FLAIR.
    G_de's learnt split of feature space into components is kept; only where each component lies and
    how wide it is come from the case, so a site's own normal tissue is probable under it while the
    FLAIR-hyperintense lesions left out of the estimate stay improbable."""
    normal = flair <= model.config.postprocess.normal_max_flair_z
    count = int(normal.sum())
    if count < MIN_CASE_MIXTURE_PIXELS:
        raise InputError(f"the case has {count} normal-looking brain pixels (FLAIR z <= "
                         f"{model.config.postprocess.normal_max_flair_z:g}) at network resolution; a case mixture "
                         f"needs at least {MIN_CASE_MIXTURE_PIXELS}: score it with the frozen mixture "
                         "(postprocess.case_mixture=false)")
    return mixture_of(model, features[normal])


def mixture_of(model: ADMModel, features: torch.Tensor) -> GMMParams:
    """The mixture (π, μ, Σ; eigenvalues bounded at the model's ε) of density features (n, d), with
    the memberships the model's G_de gives them (dropout off, as for the frozen mixture)."""
    accumulator = GMMAccumulator(model.config.model.n_components, model.config.model.feature_dim,
                                 device=features.device)
    estimator = model.network.estimator.eval()
    chunk = 65536  # memberships in chunks: G_de's hidden layer for every pixel at once is not needed
    with torch.inference_mode():
        for start in range(0, len(features), chunk):
            z = features[start : start + chunk]
            accumulator.update(z, estimator(z))
    return accumulator.finalize(model.config.model.eps)


def network_energy(
    model: ADMModel,
    prepared: PreparedCase,
    options: InferenceOptions = InferenceOptions(),
    progress: ProgressCallback | None = None,
    should_cancel: CancelCheck | None = None,
    translations: Translations | None = None,
) -> np.ndarray:
    """Energy (S_brain, N, N) of a prepared case's brain slices at network resolution, averaged with
    the mirrored slices' under flip TTA (``options.flip_tta``, default the model's), each pass scored
    with its own case mixture under ``options.case_mixture`` (default the model's). ``translations``
    (:data:`Translations`) supplies precomputed CtoC translations."""
    flip = model.config.postprocess.flip_tta if options.flip_tta is None else options.flip_tta
    per_case = model.config.postprocess.case_mixture if options.case_mixture is None else options.case_mixture
    passes = (False, True) if flip else (False,)
    translations = translations or {}
    result = None
    for number, mirrored in enumerate(passes):
        x_hat_ct = translations.get(mirrored)
        # Neighbours only where CtoC will run: cached translations already hold what they gave.
        context = model.config.model.slice_context if x_hat_ct is None else SliceContext()
        images, brain, neighbours = _brain_slices(prepared, context, mirrored)
        report = None
        if progress is not None:
            report = lambda done, total, n=number: progress(n * total + done, len(passes) * total)  # noqa: E731
        values = energy_slices(model, images, brain, options, report, should_cancel, x_hat_ct, neighbours, per_case)
        values = np.flip(values, MIRROR_AXIS) if mirrored else values
        result = values if result is None else 0.5 * (result + values)
    return result


def energy_volume(
    model: ADMModel,
    prepared: PreparedCase,
    options: InferenceOptions = InferenceOptions(),
    progress: ProgressCallback | None = None,
    should_cancel: CancelCheck | None = None,
    translations: Translations | None = None,
    postprocess: PostprocessConfig | None = None,
) -> sitk.Image:
    """The energy image of a prepared case on its native grid: the one inference path of the product
    (``predict``, ``evaluate``, the evaluation study, the benchmarks and the Slicer module).

    Only slices that contain brain go through the networks; the result is post-processed by
    ``postprocess`` (default: the model's own ``config.postprocess``) with the FLAIR z-score the
    prepared case kept; the background lies exactly 1 below the lowest brain energy."""
    options = options.checked()
    post = model.config.postprocess if postprocess is None else postprocess
    brain_slices = np.flatnonzero(prepared.has_brain)
    network_res = np.zeros(prepared.brain.shape, dtype=np.float32)
    if len(brain_slices):
        values = network_energy(model, prepared, options, progress, should_cancel, translations)
        network_res[brain_slices] = values
        # Bilinear upsampling mixes neighbouring pixels, so pixels outside the network-resolution
        # brain get the lowest brain energy: the brain rim is then not pulled up or down artificially.
        network_res[~prepared.brain] = float(values[prepared.brain[brain_slices]].min())
    energy_image = slices_to_image(network_res, prepared, background=None)
    if post.native_active:
        natives = prepared.native_zscored
        if any(c not in natives for c in post.native_contrasts if c != "flair" or post.needs_flair):
            raise ValueError("post-processing with flair_weight, asymmetry_weight, t2_asymmetry_weight, t2_weight, "
                             "shared_hyperintensity_weight, "
                             "energy_gate_z or standardise='normal' needs "
                             f"prepare_case(..., keep_native={post.native_contrasts})")
        energy_image = postprocess_energy(energy_image, prepared.native_brain, post, natives.get("flair"),
                                          natives.get("t2"), natives.get("t1"))
    return energy_image


def brain_features(
    network: torch.nn.Module, ctoc: torch.nn.Module | None, x: torch.Tensor, brain: torch.Tensor,
    dtype: torch.dtype | None, x_hat_ct: torch.Tensor | None = None, neighbours: torch.Tensor | None = None,
) -> torch.Tensor:
    """Density features (n_brain_pixels, d) of slices ``x`` (B, K, H, W): CtoC (``ctoc``, autocast to
    ``dtype``, with the slices' ``neighbours`` for a CtoC with context; skipped when the translation
    ``x_hat_ct`` is given or ``ctoc`` is None), DR, brain pixels only."""
    residual_translation = None
    if x_hat_ct is None and ctoc is not None:
        with autocast(x.device, dtype):
            residual_translation = network.residual_translation(x, brain, neighbours, ctoc).float()
    features, _ = network.features(x, brain, x_hat_ct, residual_translation=residual_translation)
    return features.permute(0, 2, 3, 1)[brain]


def ctoc_runner(model: ADMModel, compile: bool = False) -> torch.nn.Module | None:
    """The model's CtoC network as inference runs it (channels-last, optionally compiled; built once
    per model), or None for a model without CtoC."""
    if not model.config.model.use_ctoc:
        return None
    cache = model.__dict__.setdefault("_runners", {})
    if compile not in cache:
        runner = _ChannelsLast(model.network.ctoc)
        # dynamic=None: one graph for full batches, one more (dynamic) for a smaller last batch.
        cache[compile] = torch.compile(runner) if compile else runner
    return cache[compile]


class _ChannelsLast(torch.nn.Module):
    """Feeds a module channels-last inputs (its weights are converted once).

    Channels-last lets cuDNN use its NHWC (tensor-core) kernels. On CPU, oneDNN's NHWC kernels ran
    the bundled CtoC ~17 % faster (fp32 and bf16); the paper-size one level in fp32 (the CPU default)
    and ~10 % slower in bf16."""

    def __init__(self, module: torch.nn.Module) -> None:
        super().__init__()
        self.module = module.to(memory_format=torch.channels_last)

    def forward(self, x: torch.Tensor, median_map: torch.Tensor) -> torch.Tensor:
        return self.module(x.contiguous(memory_format=torch.channels_last),
                           median_map.contiguous(memory_format=torch.channels_last))


def prepare_for_model(model: ADMModel, case: CaseImages) -> PreparedCase:
    """``case`` prepared with the model's preprocessing, keeping the native contrasts its
    post-processing reads: what :func:`energy_volume` needs."""
    return prepare_case(case, model.config.preprocess, keep_native=model.config.postprocess.native_contrasts)


def on_made_slices(model: ADMModel) -> ADMModel:
    """``model`` as it scores the thin slices made from a thick scan: ``postprocess.small_lesion_load`` 'thin' turns
    'never' there (the load term's share of the brain is lifted by the thick slices' partial volume)."""
    post = model.config.postprocess
    if post.small_lesion_load != "thin":
        return model
    return replace(model, config=replace(model.config, postprocess=replace(post, small_lesion_load="never")))


def load_term_off_its_grid(model: ADMModel, case: CaseImages) -> bool:
    """Whether the load term :func:`predict_case` adds to ``case`` cannot be read off its unloaded energy on the case's
    own grid (:func:`~ADMAnomalyLib.postprocess.load_offset`): a scan put on thinner slices, where the term is
    measured, or a small-lesion path that may leave it out (``postprocess.small_lesion_load`` 'never', or 'thin' on
    such a scan, :func:`on_made_slices`)."""
    post = model.config.postprocess
    return (thin_grid(case.images[CONTRASTS[0]], model.config.preprocess.max_slice_mm) is not None
            or bool(post.small_lesion_ml) and post.small_lesion_load == "never")


def predict_case(
    model: ADMModel,
    case: CaseImages,
    options: InferenceOptions = InferenceOptions(),
    progress: ProgressCallback | None = None,
    should_cancel: CancelCheck | None = None,
    prepared: PreparedCase | None = None,
) -> Prediction:
    """Preprocess a validated case with the model's settings (or take it ``prepared`` so, by
    :func:`prepare_for_model`) and predict its energy image; a case sampled coarser than
    ``preprocess.max_slice_mm`` is predicted on thinner slices and its energy carried back onto its own grid
    (:mod:`~ADMAnomalyLib.slicing`)."""
    options = options.checked()  # before the preprocessing: a bad option must not cost a case's time
    resampled = thin_case(case, model.config.preprocess)
    if resampled is not None:
        thin, brain = resampled
        on_thin = predict_case(on_made_slices(model), thin, options, progress, should_cancel)
        reference = case.images[CONTRASTS[0]]
        brain_mask = sitk.GetImageFromArray(brain.astype(np.uint8))
        brain_mask.CopyInformation(reference)
        return replace(on_thin, energy=energy_onto(on_thin.energy, on_thin.brain_mask, reference, brain),
                       brain_mask=brain_mask)
    prepared = prepare_for_model(model, case) if prepared is None else prepared
    energy_image = energy_volume(model, prepared, options, progress, should_cancel)
    return Prediction(energy_image, native_brain_mask(prepared), model.threshold,
                      int(prepared.has_brain.sum()), min_component_mm3=model.config.postprocess.min_component_mm3)


def anomaly_mask(energy_image: sitk.Image, brain_mask: sitk.Image, threshold: float,
                 min_component_mm3: float = 0.0) -> sitk.Image:
    """uint8 map on the energy image's grid: 1 where energy >= threshold inside the brain, without the regions
    smaller than ``min_component_mm3`` (``PostprocessConfig.min_component_mm3``; :func:`~.postprocess.anomaly_label`)."""
    energy_array = sitk.GetArrayViewFromImage(energy_image)
    brain_array = sitk.GetArrayViewFromImage(brain_mask) > 0
    label = anomaly_label(energy_array, brain_array, threshold,
                          component_voxels(min_component_mm3, energy_image.GetSpacing()))
    mask = sitk.GetImageFromArray(label.astype(np.uint8))
    mask.CopyInformation(energy_image)
    return mask


def percentile_threshold(energy_image: sitk.Image, brain_mask: sitk.Image, percentile: float) -> float:
    """Energy value at ``percentile`` (0-100) of the brain voxels."""
    if not 0.0 <= percentile <= 100.0:
        raise ValueError(f"percentile must lie in [0, 100], not {percentile}")
    brain_array = sitk.GetArrayViewFromImage(brain_mask) > 0
    values = sitk.GetArrayViewFromImage(energy_image)[brain_array]
    if values.size == 0:
        raise ValueError("the brain mask is empty")
    return float(np.percentile(values, percentile))
