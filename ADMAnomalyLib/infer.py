"""Applying a trained model: slices -> energy maps -> energy image on the input grid."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import SimpleITK as sitk
import torch

from .cases import CaseImages
from .config import CONTRASTS, PostprocessConfig
from .device import autocast, inference_dtype, resolve_device
from .errors import CancelledError
from .gmm import energy
from .model import ADMModel
from .networks import translate_all
from .validation import check_positive_int, check_threshold
from .preprocess import PreparedCase, native_brain_mask, native_zscored, prepare_case, slices_to_image

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

    def anomaly(self, threshold: float | None = None) -> sitk.Image:
        """Binary anomaly map at ``threshold`` (default: the model's)."""
        chosen = self.threshold if threshold is None else check_threshold(threshold)
        if chosen is None:
            raise ValueError("this model has no validation threshold; pass one explicitly")
        return anomaly_mask(self.energy, self.brain_mask, chosen)


def energy_slices(
    model: ADMModel,
    images: np.ndarray,
    brain: np.ndarray,
    device: torch.device,
    batch_size: int = 16,
    precision: str = "auto",
    progress: ProgressCallback | None = None,
    should_cancel: CancelCheck | None = None,
    x_hat_ct: np.ndarray | None = None,
    flip_tta: bool | None = None,
    compile: bool = False,
) -> np.ndarray:
    """Per-pixel energy of slices (M, 4, N, N) with brain masks (M, N, N); returns (M, N, N) float32.

    Computed at brain pixels only; the rest is 0 (the caller masks it). ``x_hat_ct`` (M, 4, N, N) may hold
    precomputed CtoC translations of these slices (the evaluation study reuses them across model
    variants that share one CtoC); with flip TTA the mirrored slices are still translated here. ``flip_tta`` (default: the model's ``postprocess.flip_tta``)
    averages the energies of the slices and of their left-right mirrors.

    ``precision`` ('auto' | 'fp32' | 'bf16' | 'fp16', see :func:`~ADMAnomalyLib.device.inference_dtype`)
    applies to the CtoC network only: DR, the mixture and the energy always run in float32/float64.
    CtoC runs channels-last; ``compile`` runs it through ``torch.compile``."""
    if model.gmm is None:
        raise ValueError("the model's mixture has not been fitted")
    if flip_tta is None:
        flip_tta = model.config.postprocess.flip_tta
    if flip_tta:
        first = second = None
        if progress is not None:
            first = lambda done, total: progress(done, 2 * total)  # noqa: E731
            second = lambda done, total: progress(total + done, 2 * total)  # noqa: E731
        plain = energy_slices(model, images, brain, device, batch_size, precision, first, should_cancel,
                              x_hat_ct, False, compile)
        # Columns run right -> left in the canonical LPS slices, so the last axis is the mirror axis.
        # CtoC is not mirror-equivariant, so the mirrored slices are translated afresh.
        mirrored = energy_slices(model, images[..., ::-1], brain[..., ::-1], device, batch_size, precision, second,
                                 should_cancel, None, False, compile)
        return 0.5 * (plain + mirrored[..., ::-1])
    network = model.network.to(device).eval()
    gmm = model.gmm.to(device)
    dtype = inference_dtype(device, precision)
    ctoc = ctoc_runner(model, compile)
    result = np.zeros(brain.shape, dtype=np.float32)
    total = len(images)
    with torch.inference_mode():
        for start in range(0, total, batch_size):
            if should_cancel is not None and should_cancel():
                raise CancelledError("cancelled by the user; no output was written")
            # np.array copies: memory-mapped cache slices are read-only, which torch warns about.
            x = torch.from_numpy(np.array(images[start : start + batch_size], dtype=np.float32)).to(device)
            b = torch.from_numpy(np.array(brain[start : start + batch_size], dtype=bool)).to(device)
            x_hat = None
            if x_hat_ct is not None and model.config.model.use_ctoc:
                x_hat = torch.from_numpy(np.ascontiguousarray(x_hat_ct[start : start + batch_size])).to(device).float()
            # The mixture is evaluated at brain pixels only (the rest is 0 and masked by the caller).
            chunk = torch.zeros(b.shape, dtype=torch.float32, device=device)
            chunk[b] = energy(brain_features(network, ctoc, x, b, dtype, x_hat), gmm).float()
            result[start : start + len(x)] = chunk.cpu().numpy()
            if progress is not None:
                progress(min(start + batch_size, total), total)
    return result


def brain_features(
    network: torch.nn.Module, ctoc: torch.nn.Module | None, x: torch.Tensor, brain: torch.Tensor,
    dtype: torch.dtype | None, x_hat_ct: torch.Tensor | None = None,
) -> torch.Tensor:
    """Density features (n_brain_pixels, d) of slices ``x`` (B, K, H, W): CtoC (``ctoc``, autocast to
    ``dtype``; skipped when ``x_hat_ct`` is given or ``ctoc`` is None), DR, brain pixels only."""
    if x_hat_ct is None and ctoc is not None:
        with autocast(x.device, dtype):
            x_hat_ct = translate_all(ctoc, x, brain).float()
    features, _ = network.features(x, brain, x_hat_ct)
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


def predict_prepared(
    model: ADMModel,
    prepared: PreparedCase,
    device: str | torch.device = "auto",
    batch_size: int = 16,
    precision: str = "auto",
    progress: ProgressCallback | None = None,
    should_cancel: CancelCheck | None = None,
    native_flair: np.ndarray | None = None,
    compile: bool = False,
) -> Prediction:
    """Energy image of a prepared case; only slices that contain brain go through the networks.

    ``native_flair`` (z-scored FLAIR on the native numpy grid, see :func:`native_flair_for`) is
    used only by models with ``postprocess.flair_weight``; without it the network-resolution FLAIR
    is upsampled instead."""
    batch_size = check_positive_int(batch_size, "batch size")
    torch_device = resolve_device(device)
    brain_slices = np.flatnonzero(prepared.has_brain)
    network_res = np.zeros(prepared.brain.shape, dtype=np.float32)
    if len(brain_slices):
        network_res[brain_slices] = energy_slices(
            model, prepared.slices[brain_slices], prepared.brain[brain_slices], torch_device,
            batch_size, precision, progress, should_cancel, compile=compile,
        )
        # Bilinear upsampling mixes neighbouring pixels, so pixels outside the network-resolution
        # brain get the lowest brain energy: the brain rim is then not pulled up or down artificially.
        floor = float(network_res[brain_slices][prepared.brain[brain_slices]].min())
        network_res[~prepared.brain] = floor
    energy_image = slices_to_image(network_res, prepared, background=None)
    post = model.config.postprocess
    if post.native_active:
        if post.flair_weight and native_flair is None:
            native_flair = sitk.GetArrayFromImage(
                slices_to_image(prepared.slices[:, CONTRASTS.index("flair")], prepared, background=0.0))
        energy_image = postprocess_energy(energy_image, prepared.native_brain, post, native_flair)
    return Prediction(energy_image, native_brain_mask(prepared), model.threshold, int(len(brain_slices)))


def native_flair_for(model: ADMModel, case: CaseImages, prepared: PreparedCase) -> np.ndarray | None:
    """The native z-scored FLAIR that ``model``'s post-processing needs (None when it needs none)."""
    return native_zscored(case, prepared, ("flair",))[0] if model.config.postprocess.flair_weight else None


def postprocess_energy(energy_image: sitk.Image, brain: np.ndarray, cfg: PostprocessConfig,
                       flair: np.ndarray | None = None) -> sitk.Image:
    """Native-grid post-processing of an energy image (``PostprocessConfig``): 3-D Gaussian
    smoothing normalised inside ``brain`` (bool numpy (z, y, x)), suppression of the brain rim, then
    the FLAIR term (``flair``: native z-scored FLAIR) and the median filter. Background stays below
    every brain energy."""
    values = postprocess_array(sitk.GetArrayFromImage(energy_image), brain, energy_image.GetSpacing(), cfg,
                               flair=flair)
    out = sitk.GetImageFromArray(values)
    out.CopyInformation(energy_image)
    return out


def postprocess_array(
    values: np.ndarray, brain: np.ndarray, spacing: tuple[float, ...], cfg: PostprocessConfig,
    cache: dict | None = None,
    flair: np.ndarray | None = None,
) -> np.ndarray:
    """:func:`postprocess_energy` on numpy arrays (z, y, x); ``spacing`` in SimpleITK (x, y, z) order.

    ``cache`` (a dict kept per case by the caller) stores the smoothed brain mask and the rim depth
    map, which depend only on the brain, when one case is post-processed several times."""
    brain = np.asarray(brain, dtype=bool)
    values = np.asarray(values, dtype=np.float32)
    if not brain.any():
        return values.copy()
    # Everything outside the brain's bounding box is background, so the filters run on the box plus
    # a margin wide enough for the Gaussian tails, the rim distance and the median window: the brain
    # voxels come out as on the whole grid at a fraction of the cost.
    margin = np.ceil((4 * cfg.smoothing_sigma_mm + cfg.rim_erosion_mm) / np.asarray(spacing[::-1], dtype=float))
    margin = margin.astype(int) + int(cfg.median_size) + 2
    occupied = [np.flatnonzero(brain.any(axis=tuple(a for a in range(3) if a != axis))) for axis in range(3)]
    box = tuple(slice(max(0, int(index[0]) - m), min(size, int(index[-1]) + 1 + m))
                for index, m, size in zip(occupied, margin, brain.shape))
    # The cached maps belong to one box; configurations with other margins get boxes of their own.
    box_cache = {} if cache is None else cache.setdefault(tuple((s.start, s.stop) for s in box), {})
    inner = _postprocess_box(values[box], brain[box], spacing, cfg, box_cache, None if flair is None else flair[box])
    result = np.full(values.shape, float(inner[brain[box]].min()) - 1.0, dtype=np.float32)
    result[box] = inner
    return result


def _postprocess_box(
    values: np.ndarray, brain: np.ndarray, spacing: tuple[float, ...], cfg: PostprocessConfig, cache: dict,
    flair: np.ndarray | None,
) -> np.ndarray:
    result = values.copy()
    if cfg.smoothing_sigma_mm > 0:
        def smooth(array: np.ndarray) -> np.ndarray:
            image = sitk.GetImageFromArray(np.ascontiguousarray(array, dtype=np.float32))
            image.SetSpacing(tuple(float(v) for v in spacing))
            return sitk.GetArrayFromImage(sitk.SmoothingRecursiveGaussian(image, float(cfg.smoothing_sigma_mm)))

        key = ("weight", float(cfg.smoothing_sigma_mm))
        if key not in cache:
            cache[key] = np.maximum(smooth(brain.astype(np.float32)), np.float32(1e-3))
        smoothed = smooth(np.where(brain, values, np.float32(0))) / cache[key]
        result = np.where(brain, smoothed, result).astype(np.float32)
    floor = float(result[brain].min())
    if cfg.rim_erosion_mm > 0:
        if "depth" not in cache:
            mask = sitk.GetImageFromArray(brain.astype(np.uint8))
            mask.SetSpacing(tuple(float(v) for v in spacing))
            # Distance (mm) of each brain voxel to the nearest background voxel.
            cache["depth"] = sitk.GetArrayFromImage(sitk.SignedMaurerDistanceMap(
                mask, insideIsPositive=True, squaredDistance=False, useImageSpacing=True))
        depth = cache["depth"]
        result = np.where(brain & (depth <= cfg.rim_erosion_mm), np.float32(floor), result)
    if cfg.flair_weight:
        if flair is None:
            raise ValueError("postprocess.flair_weight needs the native FLAIR z-score")
        inside = result[brain].astype(np.float64)
        scale = float(inside.std()) or 1.0
        standardised = (result - np.float32(inside.mean())) / np.float32(scale)
        result = np.where(brain, standardised + np.float32(cfg.flair_weight) * flair, result).astype(np.float32)
        floor = float(result[brain].min())
    if cfg.median_size > 1:
        from .baselines import median_filter

        filtered = median_filter(np.where(brain, result, np.float32(floor)), int(cfg.median_size))
        result = np.where(brain, filtered, result).astype(np.float32)
        floor = float(result[brain].min())
    result[~brain] = floor - 1.0
    return result.astype(np.float32, copy=False)


def predict_case(
    model: ADMModel,
    case: CaseImages,
    device: str | torch.device = "auto",
    batch_size: int = 16,
    precision: str = "auto",
    progress: ProgressCallback | None = None,
    should_cancel: CancelCheck | None = None,
    compile: bool = False,
) -> Prediction:
    """Preprocess a validated case with the model's settings and predict its energy image."""
    prepared = prepare_case(case, model.config.preprocess)
    flair = native_flair_for(model, case, prepared)
    return predict_prepared(model, prepared, device, batch_size, precision, progress, should_cancel, flair, compile)


def anomaly_mask(energy_image: sitk.Image, brain_mask: sitk.Image, threshold: float) -> sitk.Image:
    """uint8 map: 1 where energy >= threshold inside the brain, on the energy image's grid."""
    energy_array = sitk.GetArrayViewFromImage(energy_image)
    brain_array = sitk.GetArrayViewFromImage(brain_mask) > 0
    mask = sitk.GetImageFromArray(((energy_array >= threshold) & brain_array).astype(np.uint8))
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
