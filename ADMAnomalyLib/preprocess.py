"""A case on its native grid -> normalised axial network slices, and per-slice maps -> native grid.

Forward (:func:`prepare_case`):

1. brain mask: the supplied mask > 0, else ``|value| > brain_threshold`` in any contrast;
2. per-contrast normalisation over the brain voxels of the whole volume (``cfg.normalisation``:
   z-score by default), 0 outside the brain;
3. reorientation to ``cfg.orientation`` as decided by ``sitk.DICOMOrient`` from the direction
   cosines (never from the array order). The *axial* axis is the one whose orientation letter is
   S or I; it becomes the slice axis. With the default ``LPS`` a slice has rows running
   anterior -> posterior and columns right -> left, slices run inferior -> superior;
4. centred zero padding of each slice to a square (``cfg.pad_to_square``);
5. bilinear resize to ``image_size`` x ``image_size`` (brain mask and label: bilinear of the
   0/1 mask, > 0.5). Values outside the network-resolution brain are set to 0.

The reorientation is a pure permutation/flip of the voxel array (no resampling), so it is applied
to numpy views and inverted exactly by :func:`slices_to_image`, which copies size, spacing,
origin and direction from the input, i.e. the output grid is the input grid bit for bit.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from functools import cached_property
from typing import Optional, Sequence

import numpy as np
import SimpleITK as sitk
import torch
import torch.nn.functional as F

from .cases import CaseImages
from .config import CONTRASTS, PreprocessConfig, SliceContext
from .errors import InputError
from .postprocess import midline_shift, mirror
from .rawprep import n4_correct

logger = logging.getLogger(__name__)

_AXIS_PAIRS = ({"R", "L"}, {"A", "P"}, {"S", "I"})

MIRROR_AXIS = -1
"""The slices' left-right axis: their columns, right -> left in the default LPS orientation."""


@dataclass
class SliceGeometry:
    """How oriented, padded network slices relate to the native voxel grid."""

    size: tuple[int, int, int]
    """Native grid (SimpleITK order x, y, z) with its spacing, origin and direction."""
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    direction: tuple[float, ...]
    axes: tuple[int, int, int]
    """Native numpy axes (z, y, x numbering) in oriented order: slice axis first, then rows, cols."""
    flips: tuple[int, ...]
    """Oriented axes reversed after the transpose."""
    shape: tuple[int, int, int]
    """Oriented array shape (slices, rows, cols) before padding."""
    pad: tuple[int, int]
    """Zero rows and columns added before the anatomy (top, left)."""
    padded: tuple[int, int]
    """Padded slice shape (rows, cols)."""

    def to_oriented(self, native: np.ndarray) -> np.ndarray:
        """View of a native numpy volume (z, y, x) in oriented order (slice, row, col)."""
        view = native.transpose(self.axes)
        return np.flip(view, self.flips) if self.flips else view

    def to_native(self, oriented: np.ndarray) -> np.ndarray:
        """Inverse of :meth:`to_oriented` (a view)."""
        view = np.flip(oriented, self.flips) if self.flips else oriented
        return view.transpose(np.argsort(self.axes))

    def apply(self, image: sitk.Image) -> sitk.Image:
        """Give ``image`` (of the native size) the native spacing, origin and direction."""
        image.SetSpacing(self.spacing)
        image.SetOrigin(self.origin)
        image.SetDirection(self.direction)
        return image


@dataclass
class PreparedCase:
    """A case as the networks see it, plus what is needed to map results back."""

    case_id: str
    slices: np.ndarray
    """float32 (S, 4, N, N): z-scored contrasts in :data:`CONTRASTS` order, 0 outside the brain."""
    brain: np.ndarray
    """bool (S, N, N): brain at network resolution."""
    label: Optional[np.ndarray]
    """bool (S, N, N): lesion at network resolution, None without a label."""
    has_brain: np.ndarray
    """bool (S,): at least ``min_brain_pixels`` brain pixels at network resolution."""
    has_lesion: np.ndarray
    """bool (S,): any labelled voxel in the native slice (all False without a label)."""
    zscore: dict[str, tuple[float, float]] = field(default_factory=dict)
    """Per contrast (centre, scale) of the brain voxels used for normalisation: (mean, std) for the
    'zscore' normalisation, (median, IQR / 1.349) for 'robust' and for 'histogram' (the scale its map
    keeps beyond the landmarks)."""
    geometry: Optional[SliceGeometry] = field(default=None, repr=False)
    native_brain: Optional[np.ndarray] = field(default=None, repr=False)
    """bool native numpy volume (z, y, x) of the brain mask."""
    native_lesion: Optional[np.ndarray] = field(default=None, repr=False)
    """bool native numpy volume (z, y, x) of label != 0, None without a label."""
    native_zscored: dict[str, np.ndarray] = field(default_factory=dict, repr=False)
    """float32 native numpy volumes (z, y, x) of the contrasts :func:`prepare_case` was asked to keep,
    normalised as the network input is (or by ``PreprocessConfig.native_normalisation`` where it is
    set), 0 outside the brain: the intensity term of the post-processing, the FLAIR baselines and the
    study read them from here."""

    @property
    def n_slices(self) -> int:
        return int(self.slices.shape[0])

    def neighbours(self, index: np.ndarray, context: SliceContext) -> np.ndarray:
        """float32 (len(index), context.images·4, N, N), the CtoC input of ``model.slice_context``
        beside each slice of ``index``, every contrast of a slice together: the ``context.each_side``
        slices before and then after it along the axial axis, nearest first on each side (one beyond
        the volume repeats the edge slice), then, with ``context.mirror``, the slice mirrored across
        the mid-sagittal plane (:attr:`midline_shift`). Each is cut to its centre slice's brain, so the
        context never reaches where nothing is scored and training's per-slice augmentation and
        inference see the same extent."""
        index = np.asarray(index, dtype=int)
        offsets = [-step for step in range(1, context.each_side + 1)] + list(range(1, context.each_side + 1))
        inside = self.brain[index][:, None]
        parts = [self.slices[np.clip(index + offset, 0, self.n_slices - 1)] * inside for offset in offsets]
        if context.mirror:
            parts.append(mirror(self.slices[index], MIRROR_AXIS, self.midline_shift) * inside)
        if not parts:
            return np.zeros((len(index), 0, *self.slices.shape[2:]), dtype=np.float32)
        return np.concatenate(parts, axis=1).astype(np.float32, copy=False)

    @cached_property
    def midline_shift(self) -> int:
        """The :func:`~ADMAnomalyLib.postprocess.mirror` shift of the slices' columns at which the
        network-resolution brain best overlaps its mirror image (the plane within an eighth of the
        slice from its centre): the mid-sagittal plane among the column planes, which
        :meth:`neighbours` mirrors across."""
        return midline_shift(self.brain, MIRROR_AXIS, self.brain.shape[-1] // 4)


def orientation_axes(direction: tuple[float, ...], orientation: str) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Numpy transpose axes and flips that bring a volume with ``direction`` to ``orientation``
    with the axial (S/I) axis first.

    The decision is ``sitk.DICOMOrient``'s: a small probe image whose voxel values encode their
    index is reoriented and the permutation read back, so the big volumes are never resampled.
    """
    code = orientation.upper()
    if len(code) != 3 or any(sum(ch in pair for ch in code) != 1 for pair in _AXIS_PAIRS):
        raise ValueError(f"orientation {orientation!r}: need one letter of each of RL, AP, SI")
    shape = (4, 3, 2)  # numpy (z, y, x); distinct strides 6, 2, 1 identify each axis
    probe = sitk.GetImageFromArray(np.arange(24, dtype=np.float32).reshape(shape))
    probe.SetDirection(direction)
    oriented = sitk.GetArrayFromImage(sitk.DICOMOrient(probe, code))
    strides = {6: 0, 2: 1, 1: 2}
    perm, flips = [], []
    for axis in range(3):
        step_index = [0, 0, 0]
        step_index[axis] = 1
        step = int(oriented[tuple(step_index)] - oriented[0, 0, 0])
        perm.append(strides[abs(step)])
        if step < 0:
            flips.append(axis)
    # Axial first: index axis p of the code is numpy axis 2 - p.
    axial = 2 - next(i for i, ch in enumerate(code) if ch in "SI")
    order = [axial] + [a for a in range(3) if a != axial]
    axes = tuple(perm[o] for o in order)
    new_flips = tuple(sorted(order.index(f) for f in flips))
    return axes, new_flips


def normalisation_statistics(inside: np.ndarray, method: str) -> tuple[float, float]:
    """``(centre, scale)`` that map one contrast's brain voxels ``inside`` to the network's scale.

    'zscore' is method.md's mean and standard deviation. 'robust' is the median and IQR / 1.349 (the
    standard deviation of a normal distribution with that IQR): a large bright lesion, a site's long
    histogram tail or interpolation residue below zero then no longer moves where normal tissue
    lands. When more than half the voxels share one value (IQR 0) it falls back to the standard
    deviation rather than dividing by zero."""
    if method == "zscore":
        return float(inside.mean(dtype=np.float64)), float(inside.std(dtype=np.float64))
    if method != "robust":
        raise ValueError(f"normalisation_statistics: 'zscore' or 'robust', not {method!r}")
    low, median, high = (float(v) for v in np.percentile(inside, (25, 50, 75)))
    scale = (high - low) / 1.349
    return median, scale if scale > 0 else float(inside.std(dtype=np.float64))


def standardise_histogram(values: np.ndarray, inside: np.ndarray, landmarks: Sequence[float],
                          scale: Optional[float] = None) -> np.ndarray:
    """``values`` mapped piecewise-linearly so that the percentiles ``landmarks`` of the brain voxels
    ``inside`` land on the standard normal's quantiles at the same percentiles (Nyul & Udupa's
    histogram standardisation, with a fixed standard scale instead of one learned from training
    cases, so a model file carries no extra state and a normal histogram comes out as 'robust' leaves
    it).

    Robust z-scoring aligns the middle and spread of each site's histogram; this also aligns its
    shape between the landmarks (the skew and the grey/white-matter peaks that differ between
    scanners and sequences). Beyond the outermost landmarks the map goes on at the robust scale
    (IQR / 1.349), so a lesion's tail keeps the contrast robust z-scoring gives it instead of the
    slope of whatever tissue lies between two landmarks. Tied landmarks (a spike of voxels sharing one
    value) are merged, keeping the map monotone. ``scale``: the robust scale of ``inside`` when the
    caller has it already. float32 output."""
    from statistics import NormalDist

    percentiles = np.asarray(sorted(landmarks), dtype=np.float64)
    case_points = np.percentile(inside, percentiles)
    standard = np.array([NormalDist().inv_cdf(p / 100.0) for p in percentiles])
    case_points, first = np.unique(case_points, return_index=True)
    standard = np.array([standard[i:j].mean() for i, j in zip(first, list(first[1:]) + [len(standard)])])
    if scale is None:
        _, scale = normalisation_statistics(inside, "robust")
    mapped = np.interp(values, case_points, standard)
    below, above = values < case_points[0], values > case_points[-1]
    mapped[below] = standard[0] + (values[below] - case_points[0]) / scale
    mapped[above] = standard[-1] + (values[above] - case_points[-1]) / scale
    return mapped.astype(np.float32)


def _statistics_method(method: str) -> str:
    """The affine statistics normalisation ``method`` rests on: 'histogram' continues beyond its
    landmarks at the robust scale."""
    return "robust" if method == "histogram" else method


def _normalised(values: np.ndarray, inside: np.ndarray, method: str, landmarks: Sequence[float],
                statistics: Optional[tuple[float, float]] = None) -> np.ndarray:
    """float32 ``values`` under normalisation ``method`` over the brain voxels ``inside``, with the
    method's ``statistics`` when the caller has them already (for 'histogram', the robust ones)."""
    if method == "histogram":
        return standardise_histogram(values, inside, landmarks, statistics[1] if statistics else None)
    centre, scale = statistics or normalisation_statistics(inside, method)
    return (values - np.float32(centre)) * np.float32(1.0 / scale)


N4_ITERATIONS_PER_LEVEL = 50
"""N4 iterations at each fitting level of ``PreprocessConfig.bias_correction_levels`` and
``native_bias_correction_levels``."""
N4_FIT_VOXEL_MM = 6.0
"""N4 of a brain (:func:`bias_corrected`) is fitted on a copy of the image shrunk to voxels of about this size
(:func:`n4_fit_shrink`): the field's few control points need no finer samples. On a 240 x 240 x 155 BraTS FLAIR
at 1 mm the fit takes 0.9 s where four-fold shrinking took 2.4 s, and the field moves by at most 0.9 % of the
intensity inside the brain (its range there: 17 %)."""


NATIVE_N4_CONTRASTS: tuple[str, ...] = ("flair",)
"""The native contrasts ``native_bias_correction_levels`` corrects: the FLAIR whose brightness the FLAIR term
thresholds. T1 and T2 only mark CSF and back FLAIR up (the T2 term, T2's asymmetry); each N4 costs about 1.5 s
of a case's prediction (:data:`N4_FIT_VOXEL_MM`)."""


def bias_corrected(image: sitk.Image, brain: np.ndarray, levels: int) -> np.ndarray:
    """float32 array of ``image`` after N4 bias-field correction with ``levels`` fitting levels, fitted
    on the brain's positive voxels (shrunk to :data:`N4_FIT_VOXEL_MM`): N4 works on log intensities, and a
    single non-positive voxel (interpolation residue of a resampled scan) makes it return a flat field. An
    image whose brain is mostly non-positive holds no raw MR intensities (it was normalised already) and is
    returned unchanged, since a multiplicative field cannot be fitted to it."""
    values = sitk.GetArrayFromImage(image).astype(np.float32)
    fitted = brain & (values > 0)
    if np.count_nonzero(fitted) < 0.5 * np.count_nonzero(brain):
        logger.warning("no bias-field correction: under half of the brain has positive intensities "
                       "(an already normalised image?)")
        return values
    mask = sitk.GetImageFromArray(fitted.astype(np.uint8))
    mask.CopyInformation(image)
    shrink = n4_fit_shrink(image.GetSpacing(), image.GetSize())
    return sitk.GetArrayFromImage(n4_correct(image, shrink, mask, (N4_ITERATIONS_PER_LEVEL,) * levels))


def n4_fit_shrink(spacing: Sequence[float], size: Sequence[int]) -> list[int]:
    """The whole factor (x y z, as SimpleITK's grid) by which :func:`bias_corrected` shrinks each axis of an
    image for N4's fit: to voxels of about :data:`N4_FIT_VOXEL_MM`, keeping at least 8 samples along each
    axis (a few-slice scan) so that the B-spline has points to fit."""
    return [max(1, min(int(N4_FIT_VOXEL_MM // float(step)), int(n) // 8)) for step, n in zip(spacing, size)]


def case_brain(case: CaseImages, cfg: PreprocessConfig) -> np.ndarray:
    """The case's brain (bool, native array order): its supplied mask, else every voxel with |value| >
    ``cfg.brain_threshold`` in any contrast; an empty brain, or a "brain" that fills the field of view (the
    background is not zero), is an :class:`InputError`."""
    if case.mask is not None:
        brain = sitk.GetArrayFromImage(case.mask) > 0
        how = "the supplied brain mask is empty"
    else:
        arrays = [sitk.GetArrayViewFromImage(case.images[c]) for c in CONTRASTS]
        brain = np.abs(arrays[0]) > cfg.brain_threshold
        for values in arrays[1:]:
            brain |= np.abs(values) > cfg.brain_threshold
        how = f"no voxel has |value| > {cfg.brain_threshold:g} in any contrast"
    if not brain.any():
        raise InputError(f"case {case.case_id}: empty brain ({how})")
    fraction = float(np.count_nonzero(brain)) / brain.size
    if case.mask is None and fraction > cfg.max_brain_fraction:
        raise InputError(
            f"case {case.case_id}: {100 * fraction:.0f}% of the field of view is non-zero, so it cannot be "
            "taken for a skull-stripped brain on a zero background; run brain extraction first "
            "(predict --preprocess full) or supply a brain mask (the case's 'mask' file)"
        )
    return brain


def prepare_case(case: CaseImages, cfg: PreprocessConfig, keep_native: Sequence[str] = ("flair",)) -> PreparedCase:
    """Turn a loaded case into normalised, oriented, resized axial slices (see module doc).

    ``keep_native`` names the contrasts whose native-grid normalised volumes are kept in
    :attr:`PreparedCase.native_zscored` (``cfg.native_normalisation``, by default the network input's;
    4 bytes a voxel each; training keeps none)."""
    reference = case.images[CONTRASTS[0]]
    arrays = [sitk.GetArrayViewFromImage(case.images[c]) for c in CONTRASTS]
    brain = case_brain(case, cfg)
    lesion = sitk.GetArrayViewFromImage(case.label) != 0 if case.label is not None else None

    axes, flips = orientation_axes(reference.GetDirection(), cfg.orientation)
    size = reference.GetSize()
    native_shape = (size[2], size[1], size[0])
    shape = tuple(native_shape[a] for a in axes)
    n_slices, rows, cols = shape
    padded = (max(rows, cols),) * 2 if cfg.pad_to_square else (rows, cols)
    pad = ((padded[0] - rows) // 2, (padded[1] - cols) // 2)
    geometry = SliceGeometry(
        size=tuple(size),
        spacing=reference.GetSpacing(),
        origin=reference.GetOrigin(),
        direction=reference.GetDirection(),
        axes=axes,
        flips=flips,
        shape=shape,
        pad=pad,
        padded=padded,
    )

    # One buffer holds every channel (contrasts, brain, label) so a single interpolate call
    # resizes them all; filling it also performs the reorientation and padding.
    n_channels = len(CONTRASTS) + 1 + (lesion is not None)
    buffer = np.zeros((n_slices, n_channels) + padded, dtype=np.float32)
    inner = (slice(None), slice(pad[0], pad[0] + rows), slice(pad[1], pad[1] + cols))

    def put(channel: int, native: np.ndarray) -> None:
        buffer[inner[0], channel, inner[1], inner[2]] = geometry.to_oriented(native)

    if cfg.bias_correction_levels:
        arrays = [bias_corrected(case.images[name], brain, cfg.bias_correction_levels) for name in CONTRASTS]
    outside = ~brain
    zscore: dict[str, tuple[float, float]] = {}
    kept: dict[str, np.ndarray] = {}
    for channel, (name, values) in enumerate(zip(CONTRASTS, arrays)):
        inside = values[brain]
        # 'histogram' reports the robust centre and scale: its map beyond the landmarks.
        mean, std = normalisation_statistics(inside, _statistics_method(cfg.normalisation))
        if not std > 1e-6 * max(1.0, abs(mean)):
            raise InputError(
                f"case {case.case_id}: contrast {name} is constant inside the brain (std 0)"
            )
        zscore[name] = (mean, std)
        normalised = _normalised(values, inside, cfg.normalisation, cfg.histogram_landmarks, (mean, std))
        normalised[outside] = 0.0
        put(channel, normalised)
        if name in keep_native:
            native = cfg.native_normalisation
            if cfg.native_bias_correction_levels and not cfg.bias_correction_levels and name in NATIVE_N4_CONTRASTS:
                corrected = bias_corrected(case.images[name], brain, cfg.native_bias_correction_levels)
                kept[name] = _normalised(corrected, corrected[brain], native or cfg.normalisation, cfg.histogram_landmarks)
                kept[name][outside] = 0.0
            elif native is None or native == cfg.normalisation:
                kept[name] = normalised
            else:
                # Robust and histogram rest on the same statistics: one pass over the brain serves both.
                shared = _statistics_method(native) == _statistics_method(cfg.normalisation)
                kept[name] = _normalised(values, inside, native, cfg.histogram_landmarks,
                                         (mean, std) if shared else None)
                kept[name][outside] = 0.0
    put(len(CONTRASTS), brain)
    if lesion is not None:
        put(len(CONTRASTS) + 1, lesion)

    size_net = (cfg.image_size, cfg.image_size)
    with torch.no_grad():
        resized = F.interpolate(
            torch.from_numpy(buffer), size=size_net, mode="bilinear", align_corners=False
        ).numpy()
    del buffer
    brain_net = resized[:, len(CONTRASTS)] > 0.5
    slices = np.ascontiguousarray(resized[:, : len(CONTRASTS)])
    slices *= brain_net[:, None]
    label_net = resized[:, len(CONTRASTS) + 1] > 0.5 if lesion is not None else None

    if lesion is not None:
        has_lesion = geometry.to_oriented(lesion).any(axis=(1, 2))
    else:
        has_lesion = np.zeros(n_slices, dtype=bool)
    return PreparedCase(
        case_id=case.case_id,
        slices=slices,
        brain=brain_net,
        label=label_net,
        has_brain=brain_net.sum(axis=(1, 2)) >= cfg.min_brain_pixels,
        has_lesion=np.ascontiguousarray(has_lesion),
        zscore=zscore,
        geometry=geometry,
        native_brain=brain,
        native_lesion=lesion,
        native_zscored=kept,
    )


def slices_to_image(
    values: np.ndarray, prepared: PreparedCase, background: Optional[float] = None
) -> sitk.Image:
    """Map per-slice maps at network resolution (S, N, N) back onto the case's native grid.

    Upsampling is bilinear and normalised by the network-resolution brain mask, so values
    outside the brain never leak into brain voxels near its edge. Native voxels outside the
    brain get ``background`` (default: minimum over brain voxels minus 1). float32 output
    with size, spacing, origin and direction of the input images.
    """
    geometry = prepared.geometry
    values = np.asarray(values, dtype=np.float32)
    expected = (prepared.n_slices,) + prepared.brain.shape[1:]
    if values.shape != expected:
        raise ValueError(f"slices_to_image: expected values of shape {expected}, got {values.shape}")
    weight = prepared.brain.astype(np.float32)
    # np.where, not a product: NaN/inf outside the brain must not reach the weighted channel.
    inside = np.where(prepared.brain, values, np.float32(0))
    stacked = torch.from_numpy(np.stack([inside, weight, values], axis=1))
    with torch.no_grad():
        up = F.interpolate(stacked, size=geometry.padded, mode="bilinear", align_corners=False)
    weighted, coverage, plain = up[:, 0], up[:, 1], up[:, 2]
    # Where no brain pixel contributes (e.g. a slice with too little brain) fall back to plain.
    covered = coverage > 1e-3
    merged = torch.where(covered, weighted / coverage.clamp_min(1e-3), plain).numpy()
    rows, cols = geometry.shape[1:]
    cropped = merged[:, geometry.pad[0] : geometry.pad[0] + rows, geometry.pad[1] : geometry.pad[1] + cols]
    native = geometry.to_native(cropped)
    brain = prepared.native_brain
    if background is None:
        background = float(native[brain].min()) - 1.0 if brain.any() else 0.0
    out = np.where(brain, native, np.float32(background)).astype(np.float32, copy=False)
    return geometry.apply(sitk.GetImageFromArray(np.ascontiguousarray(out)))


def native_slice_region(prepared: PreparedCase, slices: np.ndarray) -> np.ndarray:
    """Bool mask on the native numpy grid of the axial slices ``slices`` (indices or a bool mask
    over the oriented slices)."""
    oriented = np.zeros(prepared.geometry.shape, dtype=bool)
    oriented[np.asarray(slices)] = True
    return prepared.geometry.to_native(oriented)


def native_brain_mask(prepared: PreparedCase) -> sitk.Image:
    """The brain mask used for normalisation, as uint8 (0/1) on the native grid."""
    return _mask_image(prepared.native_brain, prepared.geometry)


def _mask_image(mask: np.ndarray, geometry: SliceGeometry) -> sitk.Image:
    return geometry.apply(sitk.GetImageFromArray(np.ascontiguousarray(mask, dtype=np.uint8)))
