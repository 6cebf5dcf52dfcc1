"""Post-processing of anomaly score maps on the native grid: named steps and the one composition the
engine, the baselines and the evaluation study all use.

Every step takes a float32 score volume ``(z, y, x)`` and a bool brain mask of the same shape and
changes brain voxels only; higher always means more anomalous. :func:`postprocess_scores` composes
the steps a :class:`~ADMAnomalyLib.config.PostprocessConfig` switches on, in a fixed order:

1. :func:`smooth_in_brain` - 3-D Gaussian smoothing normalised inside the brain;
2. :func:`suppress_rim` - the brain rim gets the lowest brain score; then the score plus a weight
   times its own left-right asymmetry (:func:`intensity_asymmetry` of the score);
3. :func:`add_intensity_term` - the score, standardised over the brain (optionally gated by FLAIR
   hyperintensity), plus a weight times an intensity z-score (FLAIR hyperintensity, optionally lowered where
   it forms bright sheets, :func:`sheet_response`), and a weight
   times its left-right asymmetry (:func:`intensity_asymmetry`), one times T2's, and the T2 term of a case
   whose FLAIR shows its hyperintensities less than its T2 (:func:`t2_term`);
4. the score lowered by a weight times its own :func:`sheet_response`, then
   :func:`median_filter_in_brain` - a 3-D median filter about ``median_size_mm`` wide per axis;
5. :func:`standardise_in_brain` - the score as (robust) SDs above the case's typical brain score
   (with ``standardise = 'normal'``: typical of its normal-looking tissue, :func:`normal_tissue`), then
   :func:`smooth_in_brain` of that combined score (``final_smoothing_sigma_mm``);
6. :func:`load_offset` - a per-case constant from the case's apparent lesion load, so that one
   threshold suits a large glioma and a few small MS lesions alike;
7. with ``small_lesion_ml``: a case whose largest region at ``small_lesion_level``
   (:func:`largest_region_ml`) is smaller than that is scored again from step 1 without the smoothing of
   step 1 and the median filter of step 4, the filters that round off small lesions (and with
   ``small_lesion_load`` 'never' without the load term of step 6; 'thin' is 'always' here, and
   :func:`~ADMAnomalyLib.infer.predict_case` makes it 'never' on the thin slices made from thick ones);

and sets the background exactly 1 below the lowest brain score. :func:`anomaly_label` works at a threshold
(the label, without regions under ``min_component_mm3``) and is applied wherever a threshold meets the map.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Optional, Sequence

import numpy as np
import SimpleITK as sitk

from .config import PostprocessConfig
from .metrics import _cast_threshold

Spacing = Sequence[float]
"""Voxel spacing in SimpleITK (x, y, z) order, in mm."""


# -- steps -----------------------------------------------------------------------------------------
def median_filter(score: np.ndarray, size: int | Sequence[int] = 5) -> np.ndarray:
    """Median filter of a 2-D or 3-D float array with a ``size`` window (odd voxel counts: one for
    every axis, or one per axis in array order).

    SimpleITK's filter is multi-threaded and replicates the border (zero-flux Neumann)."""
    sizes = [int(size)] * score.ndim if np.isscalar(size) else [int(v) for v in size]
    if len(sizes) != score.ndim or any(v < 1 or v % 2 == 0 for v in sizes):
        raise ValueError(f"median size must be positive odd voxel counts, got {size}")
    if max(sizes) == 1:
        return np.array(score, dtype=np.float32)
    image = sitk.GetImageFromArray(np.ascontiguousarray(score, dtype=np.float32))
    filtered = sitk.Median(image, [v // 2 for v in reversed(sizes)])  # SimpleITK radii are (x, y, z)
    return sitk.GetArrayFromImage(filtered)


def median_window(spacing: Spacing, size_mm: float) -> tuple[int, ...]:
    """Odd voxel counts (array order z, y, x) spanning about ``size_mm`` along each axis, at least 1:
    5 mm is 5x5x5 voxels at 1 mm and 5x5x1 on 0.9 x 0.9 x 5.5 mm voxels, so a filter meant for
    3-mm lesions never spans two thick slices."""
    return tuple(max(1, 2 * int(round((size_mm / float(step) - 1) / 2)) + 1) for step in reversed(tuple(spacing)))


GAUSSIAN_TRUNCATE_SIGMAS = 4.0
"""The Gaussian kernel of :func:`smooth_in_brain` ends this many sigmas from its centre (the margin
:func:`postprocess_scores` keeps around the brain's box)."""


def smooth_in_brain(values: np.ndarray, brain: np.ndarray, spacing: Spacing, sigma_mm: float,
                    cache: Optional[dict] = None) -> np.ndarray:
    """Gaussian smoothing (sigma in mm) of the brain voxels, normalised by the smoothed brain mask so
    that background never leaks into the brain edge. ``cache`` keeps the smoothed mask per case."""
    cache = {} if cache is None else cache
    sigmas = [float(sigma_mm) / float(step) for step in tuple(spacing)[::-1]]

    # Imported here, not with the module: scipy.ndimage takes 0.37 s to import, which every command that loads the
    # engine (info, threshold, the Slicer module) would pay whether it smooths or not.
    from scipy import ndimage

    def smooth(array: np.ndarray) -> np.ndarray:
        # SciPy's sampled kernel, not SimpleITK's recursive (IIR) Gaussian: 2-5x faster here (sigma 2 and 1 voxels,
        # 150x180x150 voxels), within 1e-4 of the exact Gaussian where the recursive one is about 1 % off (RMS),
        # and zero beyond the grid, so the box postprocess_scores works on gives the whole grid's brain voxels.
        return ndimage.gaussian_filter(np.asarray(array, dtype=np.float32), sigmas, mode="constant", cval=0.0,
                                       truncate=GAUSSIAN_TRUNCATE_SIGMAS)

    key = ("weight", float(sigma_mm))
    if key not in cache:
        cache[key] = np.maximum(smooth(brain.astype(np.float32)), np.float32(1e-3))
    smoothed = smooth(np.where(brain, values, np.float32(0))) / cache[key]
    return np.where(brain, smoothed, values).astype(np.float32)


def bounding_box(mask: np.ndarray, margin: int | Sequence[int] = 0) -> tuple[slice, ...]:
    """Index slices of the smallest box holding every voxel of the non-empty bool ``mask``, widened by
    ``margin`` voxels (per axis, or the same along each) where the array goes on."""
    margins = [int(margin)] * mask.ndim if np.isscalar(margin) else [int(m) for m in margin]
    box = []
    for axis, (m, size) in enumerate(zip(margins, mask.shape)):
        index = np.flatnonzero(mask.any(axis=tuple(a for a in range(mask.ndim) if a != axis)))
        box.append(slice(max(0, int(index[0]) - m), min(size, int(index[-1]) + 1 + m)))
    return tuple(box)


def signed_distance_mm(mask: np.ndarray, spacing: Spacing) -> np.ndarray:
    """float32 distance (mm) of every voxel from the edge of the bool ``mask``: positive inside (its
    depth), negative outside."""
    image = sitk.GetImageFromArray(np.asarray(mask, dtype=np.uint8))
    image.SetSpacing(tuple(float(v) for v in spacing))
    return sitk.GetArrayFromImage(sitk.SignedMaurerDistanceMap(
        image, insideIsPositive=True, squaredDistance=False, useImageSpacing=True))


def suppress_rim(values: np.ndarray, brain: np.ndarray, spacing: Spacing, rim_mm: float,
                 cache: Optional[dict] = None) -> np.ndarray:
    """Brain voxels within ``rim_mm`` of the background get the lowest brain score (the rim, where
    skull-stripping residue and partial volume give false positives)."""
    cache = {} if cache is None else cache
    if "depth" not in cache:
        # The brain's edge, and so every brain voxel's depth, lies within its bounding box plus one voxel: the
        # distance map of that box alone (~60 % of the margins' box postprocess_scores passes) is all that is read.
        box = bounding_box(brain, 1)
        depth = np.zeros(brain.shape, dtype=np.float32)  # the background's own distances are never read
        depth[box] = signed_distance_mm(brain[box], spacing)
        cache["depth"] = depth
    floor = np.float32(values[brain].min())
    return np.where(brain & (cache["depth"] <= rim_mm), floor, values).astype(np.float32)


def normal_tissue(brain: np.ndarray, intensity: np.ndarray, max_z: float, min_fraction: float = 0.5) -> np.ndarray:
    """The brain voxels whose intensity z-score (FLAIR's) is at most ``max_z``: normal-looking tissue,
    the reference of a per-case scale that a large lesion does not inflate. The whole brain when
    fewer than ``min_fraction`` of it qualify (then nothing looks typical and no subset is safer)."""
    reference = brain & (intensity <= np.float32(max_z))
    return reference if reference.sum() >= min_fraction * brain.sum() else brain


def add_intensity_term(values: np.ndarray, brain: np.ndarray, intensity: np.ndarray, weight: float,
                       gate_z: float | None = None, reference: Optional[np.ndarray] = None) -> np.ndarray:
    """``(score - mean) / sd`` over the brain (or over the ``reference`` voxels of it) plus ``weight``
    x ``intensity`` (an intensity z-score, e.g. FLAIR's): the model's evidence and the hyperintensity
    on one scale. With ``gate_z`` the standardised score is kept only where ``intensity > gate_z``
    and elsewhere capped at its median over the reference (typical tissue): there it may lower a
    voxel but not raise it."""
    inside = values[brain if reference is None else reference].astype(np.float64)
    scale = float(inside.std()) or 1.0
    standardised = (values - np.float32(inside.mean())) / np.float32(scale)
    if gate_z is not None:
        typical = np.float32((np.median(inside) - inside.mean()) / scale)
        standardised = np.where(intensity > np.float32(gate_z), standardised, np.minimum(standardised, typical))
    return np.where(brain, standardised + np.float32(weight) * intensity, values).astype(np.float32)


T2_TAIL_PERCENTILE = 99.0
"""The percentile of the FLAIR and T2 brain z-scores whose difference scales a case's T2 term (:func:`t2_term`):
high enough to sit in a lesion's hyperintensity, low enough that a few bright voxels do not decide it."""


def t2_term(flair: np.ndarray, t1: np.ndarray, t2: np.ndarray, brain: np.ndarray, weight: float,
            csf_max_t1_z: float) -> tuple[np.ndarray, float]:
    """The T2 evidence of a case whose FLAIR is the weaker of its two fluid-sensitive contrasts, and the
    per-case weight it carries: ``weight x clip(q99(T2) - q99(FLAIR), 0, 1) x T2`` on brain voxels whose T1
    brain z-score exceeds ``csf_max_t1_z`` (0 elsewhere), the percentiles those of the brain z-scores over
    those voxels; the term itself is in ``t2``'s own units (those of the FLAIR term it joins).

    Oedema and tumour are bright on both FLAIR and T2; where a sequence (older, 2-D FLAIR) lifts them barely
    above grey matter, T2 still shows them, but T2 alone also lights up CSF, which T1 marks dark. A case whose
    FLAIR tail reaches as high as its T2 tail gets no term at all, so the FLAIR term is unchanged there.
    The gate and the gap read mean/SD z-scores over the brain whatever the contrasts' normalisation: under
    median/IQR units the same scans' gaps move by up to 4.7 (an MS scan's from -0.03 to +0.89, switching the
    term on where FLAIR is the stronger contrast; docs/domain_analysis.md, thirty-first round)."""
    def tail_z(values: np.ndarray) -> float:
        # A percentile commutes with the z-score's rescaling: no standardised copy of the volume is made.
        mean, sd = centre_and_spread(values[brain], "zscore")
        return (float(np.percentile(values[tissue], T2_TAIL_PERCENTILE)) - mean) / sd

    t1_mean, t1_sd = centre_and_spread(t1[brain], "zscore")
    tissue = brain & (t1 > np.float32(t1_mean + csf_max_t1_z * t1_sd))
    if not tissue.any():
        return np.zeros(brain.shape, np.float32), 0.0
    gap = tail_z(t2) - tail_z(flair)
    case_weight = float(weight) * min(max(gap, 0.0), 1.0)
    if case_weight == 0:
        return np.zeros(brain.shape, np.float32), 0.0
    return np.where(tissue, np.float32(case_weight) * t2, np.float32(0)).astype(np.float32), case_weight


def shared_hyperintensity(flair: np.ndarray, t2: np.ndarray) -> np.ndarray:
    """``max(min(flair, t2), 0)``: how far a voxel is bright on both fluid-sensitive contrasts at once, in their
    units (z-scores over the brain)."""
    return np.maximum(np.minimum(flair, t2), np.float32(0)).astype(np.float32)


MIDLINE_SEARCH_MM = 20.0
"""How far (mm) from the middle of the grid the mid-sagittal plane is looked for."""
MIDLINE_TURNS_DEG: tuple[float, ...] = tuple(float(a) for a in range(-16, 17, 2) if a)
"""Turns of the plane about the slice axis tried besides none: a head in a scanner's axial slices is
often turned by 5-15 degrees, while an atlas-space brain is not."""
MIDLINE_TURN_GAIN = 0.01
"""Share of the brain by which a turned plane must overlap the brain's mirror image better than the
best untilted one before it is used: a plane of the grid flips voxels exactly, a turned one
interpolates them."""
MIDLINE_SEARCH_VOXEL_MM = 4.0
"""The turned planes are scored on the brain mask shrunk to about this voxel size."""
IDENTITY_DIRECTION = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)


def left_right_axis(direction: Sequence[float]) -> int:
    """The array axis (z, y, x order) of a SimpleITK grid with these direction cosines that runs
    closest to the patient's left-right axis (physical x in SimpleITK's LPS)."""
    matrix = np.asarray(direction, dtype=float).reshape(3, 3)
    return 2 - int(np.argmax(np.abs(matrix[0])))


def slice_axis(direction: Sequence[float]) -> int:
    """The array axis closest to the patient's head-foot axis (physical z): the one across axial slices."""
    matrix = np.asarray(direction, dtype=float).reshape(3, 3)
    return 2 - int(np.argmax(np.abs(matrix[2])))


def mirror(volume: np.ndarray, axis: int, shift: int) -> np.ndarray:
    """``volume`` flipped along ``axis``, then moved by ``shift`` voxels along it (what moves in from
    the edge is 0): with a shift s, index i meets index n - 1 - i + s, a plane at (n - 1 + s) / 2."""
    flipped = np.flip(volume, axis=axis)
    out = np.zeros_like(volume)
    n = volume.shape[axis]
    source = [slice(None)] * volume.ndim
    target = [slice(None)] * volume.ndim
    source[axis] = slice(max(0, -shift), n - max(0, shift))
    target[axis] = slice(max(0, shift), n - max(0, -shift))
    out[tuple(target)] = flipped[tuple(source)]
    return out


def midline_shift(brain: np.ndarray, axis: int, max_shift: int) -> int:
    """The :func:`mirror` shift (within ``max_shift`` voxels) at which the brain best overlaps its own
    mirror image: the mid-sagittal plane among the planes of the grid. Ties go to the smallest shift."""
    overlaps = mirror_overlaps(brain, axis)
    n = brain.shape[axis]
    # sorted() keeps -s before s, and max() the first of equal overlaps: ties go to the smallest shift.
    shifts = [s for s in sorted(range(-max_shift, max_shift + 1), key=abs) if -n < s < n]
    return max(shifts, key=lambda shift: overlaps[n - 1 + shift])


def mirror_overlaps(mask: np.ndarray, axis: int) -> np.ndarray:
    """``count_nonzero(mask & mirror(mask, axis, s))`` for every shift s at index ``n - 1 + s``: with
    index i meeting index n - 1 - i + s, the counts are the self-convolution of each line of ``mask``
    along ``axis``, summed over the lines. One FFT of the mask's lines takes 0.16 s on a 240x240x155 grid,
    a mirrored copy per shift 0.33-0.38 s for a case's 41 shifts; the float64 sums are whole numbers far
    below 2**52, so rounding them is exact."""
    n = mask.shape[axis]
    lines = np.moveaxis(np.asarray(mask, dtype=bool), axis, -1).reshape(-1, n)
    lines = lines[lines.any(axis=1)]  # an empty line adds nothing
    spectrum_sum = np.zeros(n + 1, dtype=np.complex128)
    for start in range(0, lines.shape[0], 8192):  # bounded memory: 8192 lines of complex spectra at a time
        spectra = np.fft.rfft(lines[start : start + 8192].astype(np.float64), 2 * n, axis=-1)
        spectrum_sum += np.einsum("ij,ij->j", spectra, spectra)
    return np.rint(np.fft.irfft(spectrum_sum, 2 * n)[: 2 * n - 1]).astype(np.int64)


@dataclass(frozen=True)
class MidSagittalPlane:
    """The plane a case is mirrored across: a plane of the grid, flipped voxel for voxel by
    :func:`mirror` with ``shift``, or (``shift`` None) one turned about the slice axis by ``turn_deg``
    through the point ``offset_mm`` along its normal from ``centre_mm`` (mm from the first voxel's
    centre, x y z; None: the grid's centre), reflected by resampling."""

    lateral_axis: int
    slice_axis: int
    shift: Optional[int] = 0
    turn_deg: float = 0.0
    offset_mm: float = 0.0
    centre_mm: Optional[tuple[float, float, float]] = None

    def reflect(self, volume: np.ndarray, spacing: Spacing, interpolator: int = sitk.sitkLinear,
                origin: Sequence[float] = (0.0, 0.0, 0.0)) -> np.ndarray:
        """``volume`` mirrored across this plane (0 where the mirror image leaves the grid); ``origin``
        places a coarser copy of the grid (:func:`sitk.BinShrink`'s) where the grid's own voxels are."""
        if self.shift is not None:
            return mirror(volume, self.lateral_axis, self.shift)
        image = sitk.GetImageFromArray(np.ascontiguousarray(volume, dtype=np.float32))
        image.SetSpacing(tuple(float(v) for v in spacing))
        image.SetOrigin(tuple(float(v) for v in origin))
        return sitk.GetArrayFromImage(self.reflect_image(image, interpolator))

    def reflect_image(self, image: sitk.Image, interpolator: int = sitk.sitkLinear,
                      grid: Optional[sitk.Image] = None) -> sitk.Image:
        """The identity-direction ``image`` mirrored across this turned plane, sampled on ``grid`` (default:
        its own), e.g. a part of its own grid: each voxel's value depends on where it lies, not on the grid."""
        return sitk.Resample(image, image if grid is None else grid, self._transform(image), interpolator, 0.0)

    def _transform(self, image: sitk.Image) -> sitk.AffineTransform:
        # Physical axes of this identity-direction image are the array axes reversed (x = last).
        lateral, front = 2 - self.lateral_axis, 2 - (3 - self.lateral_axis - self.slice_axis)
        turn = np.deg2rad(self.turn_deg)
        normal = np.zeros(3)
        normal[lateral], normal[front] = np.cos(turn), np.sin(turn)
        centre = np.asarray(self.centre_mm if self.centre_mm is not None else image.TransformContinuousIndexToPhysicalPoint(
            [(size - 1) / 2.0 for size in image.GetSize()]))
        transform = sitk.AffineTransform(3)
        transform.SetMatrix((np.eye(3) - 2.0 * np.outer(normal, normal)).ravel().tolist())
        transform.SetTranslation((2.0 * (float(centre @ normal) + self.offset_mm) * normal).tolist())
        return transform


def mid_sagittal_plane(brain: np.ndarray, spacing: Spacing, direction: Sequence[float] = IDENTITY_DIRECTION
                       ) -> MidSagittalPlane:
    """The plane across which the brain best overlaps its own mirror image: the best plane of the grid
    (:func:`midline_shift`, within :data:`MIDLINE_SEARCH_MM`), unless a plane turned about the slice axis
    by one of :data:`MIDLINE_TURNS_DEG` overlaps better by :data:`MIDLINE_TURN_GAIN` of the brain
    (both scored on the mask shrunk to :data:`MIDLINE_SEARCH_VOXEL_MM`)."""
    lateral, across = left_right_axis(direction), slice_axis(direction)
    if lateral == across:  # a grid with no axial-like axis: mirror across planes of the grid only
        across = next(a for a in range(3) if a != lateral)
    steps = tuple(float(v) for v in tuple(spacing)[::-1])
    shift = midline_shift(brain, lateral, max(1, int(round(MIDLINE_SEARCH_MM / steps[lateral]))))
    grid_plane = MidSagittalPlane(lateral, across, shift)
    # A small grid is not shrunk below 32 voxels per axis: coarser, the mask's own quantisation would
    # look asymmetric to the untilted planes.
    factors = [max(1, min(int(round(MIDLINE_SEARCH_VOXEL_MM / step)), size // 32))
               for step, size in zip(steps, brain.shape)]
    mask = sitk.GetImageFromArray(brain.astype(np.float32))
    mask.SetSpacing(tuple(float(v) for v in spacing))
    small = sitk.BinShrink(mask, factors[::-1]) > 0.5
    small_spacing, small_origin = small.GetSpacing(), small.GetOrigin()
    # Every plane turns about the full grid's centre, whichever copy of the grid it is scored on.
    centre = tuple((size - 1) / 2.0 * float(step) for size, step in zip(brain.shape[::-1], spacing))
    small_brain = sitk.GetArrayFromImage(small).astype(bool)
    if not small_brain.any():  # a brain too small to survive the shrinking: no turned plane can be scored
        return grid_plane
    total = int(small_brain.sum())
    small_image = sitk.GetImageFromArray(small_brain.astype(np.float32))
    small_image.SetSpacing(small_spacing)
    small_image.SetOrigin(small_origin)
    # Only the brain's own voxels count, so each mirror image is sampled on the brain's box alone: 357 planes
    # on a box of about a third of the shrunk grid.
    box = bounding_box(small_brain)
    box_grid, box_brain = small_image[box[::-1]], small_brain[box]

    def overlap(plane: MidSagittalPlane) -> float:
        mirrored = sitk.GetArrayFromImage(plane.reflect_image(small_image, sitk.sitkNearestNeighbor, box_grid))
        return float(np.count_nonzero(box_brain & (mirrored > 0.5))) / total

    def best_offset(turn: float, offsets: Sequence[float]) -> tuple[float, MidSagittalPlane]:
        planes = [MidSagittalPlane(lateral, across, None, turn, float(t), centre) for t in offsets]
        scores = [overlap(p) for p in planes]
        return max(zip(scores, planes), key=lambda pair: pair[0])

    coarse = np.arange(-MIDLINE_SEARCH_MM, MIDLINE_SEARCH_MM + 1e-6, 2.0)
    # The grid's own planes scored the same way as the turned ones, on the shrunk mask.
    untilted, _ = best_offset(0.0, coarse)
    turned_score, turned = max((best_offset(turn, coarse) for turn in MIDLINE_TURNS_DEG), key=lambda pair: pair[0])
    if turned_score < untilted + MIDLINE_TURN_GAIN:
        return grid_plane
    fine_turns = (turned.turn_deg - 1.0, turned.turn_deg, turned.turn_deg + 1.0)
    fine_offsets = turned.offset_mm + np.arange(-2.0, 2.01, 0.5)
    return max((best_offset(turn, fine_offsets) for turn in fine_turns), key=lambda pair: pair[0])[1]


def intensity_asymmetry(intensity: np.ndarray, brain: np.ndarray, spacing: Spacing, window_mm: float,
                        direction: Sequence[float] = IDENTITY_DIRECTION, cache: Optional[dict] = None) -> np.ndarray:
    """How far each brain voxel's ``intensity`` (a z-score: FLAIR's or T2's; or the energy) exceeds the brightest intensity within
    ``window_mm`` (per axis, :func:`median_window`) of its mirror image across the mid-sagittal
    plane (:func:`mid_sagittal_plane` of a grid with these direction cosines), or 0; 0 also where the
    mirror image falls outside the brain. The maximum makes a few mm of difference between the
    hemispheres' anatomy count as symmetric. ``cache`` keeps the plane."""
    key = ("mid-sagittal plane", tuple(direction))
    plane = (cache or {}).get(key)
    if plane is None:
        plane = mid_sagittal_plane(brain, spacing, direction)
        if cache is not None:
            cache[key] = plane
    window = median_window(spacing, window_mm)
    brightest = box_maximum(plane.reflect(intensity, spacing).astype(np.float32), [v // 2 for v in window])
    inside = brain & (plane.reflect(brain.astype(np.float32), spacing, sitk.sitkNearestNeighbor) > 0.5)
    return np.where(inside, np.maximum(intensity - brightest, 0.0), 0.0).astype(np.float32)


def box_maximum(values: np.ndarray, radius: Sequence[int]) -> np.ndarray:
    """The maximum of ``values`` over a box of ``radius`` voxels per axis around each voxel (the box
    clipped at the edges), one axis after the other. SimpleITK's box dilation is not used: with a
    radius of 0 it returns garbage, and with more threads than a small image has slices per thread it
    returns garbage too ("Line ... doesn't correspond to a face"), so its result would depend on the
    machine."""
    out = np.asarray(values)  # never written: each axis writes a copy of its own
    for axis, r in enumerate(radius):
        if r <= 0:
            continue
        along = np.moveaxis(out, axis, 0)
        result = along.copy()
        for step in range(1, min(int(r), along.shape[0] - 1) + 1):
            np.maximum(result[step:], along[:-step], out=result[step:])
            np.maximum(result[:-step], along[step:], out=result[:-step])
        out = np.moveaxis(result, 0, axis)
    return np.ascontiguousarray(out)


def symmetric_eigenvalues(a: np.ndarray, b: np.ndarray, c: np.ndarray, d: np.ndarray, e: np.ndarray,
                          f: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Eigenvalues ``l1 <= l2 <= l3`` of the symmetric 3x3 matrices ``[[a, d, e], [d, b, f], [e, f, c]]``
    (element-wise over the arrays, in their own precision), by the closed trigonometric form: 0.1 s for 1.7
    million float32 matrices on a 2-core host where NumPy's batched LAPACK ``eigvalsh`` took 1.9 s."""
    q = (a + b + c) / 3.0
    p1 = d * d + e * e + f * f
    p = np.sqrt(((a - q) ** 2 + (b - q) ** 2 + (c - q) ** 2 + 2.0 * p1) / 6.0)
    safe = np.where(p > 0, p, np.ones_like(p))  # p = 0: a multiple of the identity, all three eigenvalues q
    ba, bb, bc, bd, be, bf = ((a - q) / safe, (b - q) / safe, (c - q) / safe, d / safe, e / safe, f / safe)
    half_det = (ba * (bb * bc - bf * bf) - bd * (bd * bc - bf * be) + be * (bd * bf - bb * be)) / 2.0
    angle = np.arccos(np.clip(half_det, -1.0, 1.0)) / 3.0
    largest = q + 2.0 * p * np.cos(angle)
    smallest = q + 2.0 * p * np.cos(angle + 2.0 * np.pi / 3.0)
    return smallest, 3.0 * q - smallest - largest, largest


def sheet_response(intensity: np.ndarray, brain: np.ndarray, spacing: Spacing, sigma_mm: float) -> np.ndarray:
    """How much each brain voxel's ``intensity`` looks like a bright sheet at the scale ``sigma_mm``: with
    ``l1 <= l2 <= l3`` the eigenvalues of the intensity's Hessian (Gaussian of ``sigma_mm``, scale-normalised
    by sigma squared, in mm), ``max(0, -l1) - max(0, -l2)``; 0 outside the brain.

    A bright sheet (thin across, extended along two axes: the cortical ribbon, the insular cortex, the
    FLAIR-bright lining along a sulcus) curves down steeply across itself only, so ``-l1`` is large and ``-l2``
    small. A bright blob the size of a small lesion curves down along all three axes (``l1`` close to ``l2``),
    and the inside of a large lesion is flat (all three near 0): neither counts as a sheet. The background is
    filled with the brain's median first, so that the brain's own edge is no sheet."""
    brain = np.asarray(brain, dtype=bool)
    response = np.zeros(brain.shape, dtype=np.float32)
    if not brain.any():
        return response
    from scipy import ndimage  # see smooth_in_brain

    steps = [float(v) for v in tuple(spacing)[::-1]]
    filled = np.where(brain, intensity, np.float32(np.median(intensity[brain]))).astype(np.float32)
    smoothed = ndimage.gaussian_filter(filled, [float(sigma_mm) / step for step in steps], mode="nearest",
                                       truncate=GAUSSIAN_TRUNCATE_SIGMAS)
    del filled
    # Second derivatives as central differences of central differences (mm), read at the brain voxels only.
    first = [np.gradient(smoothed, step, axis=axis) for axis, step in enumerate(steps)]
    del smoothed
    scale = float(sigma_mm) ** 2

    def second(i: int, j: int) -> np.ndarray:
        # float32: the eigenvalues take half the time of float64's, and a sheet is a large difference of them.
        return np.gradient(first[i], steps[j], axis=j)[brain] * np.float32(scale)

    l1, l2, _ = symmetric_eigenvalues(second(0, 0), second(1, 1), second(2, 2), second(0, 1), second(0, 2),
                                      second(1, 2))
    response[brain] = np.maximum(-l1, 0.0) - np.maximum(-l2, 0.0)
    return response


def median_filter_in_brain(values: np.ndarray, brain: np.ndarray, size: int | Sequence[int]) -> np.ndarray:
    """Median filter (``size`` voxels, see :func:`median_filter`) with the background at the lowest
    brain score; exactly :func:`median_filter` of that filled volume at the brain voxels.

    Only brain voxels are filtered (about 40 % of the brain's bounding box), each window's median
    found by partial sorting in a few threads: ~5x faster than SimpleITK's filter over the whole box
    on two cores, the largest post-processing cost of a case."""
    sizes = [int(size)] * values.ndim if np.isscalar(size) else [int(v) for v in size]
    if len(sizes) != values.ndim or any(v < 1 or v % 2 == 0 for v in sizes):
        raise ValueError(f"median size must be positive odd voxel counts, got {size}")
    if max(sizes) == 1:
        return np.array(values, dtype=np.float32)
    filled = np.where(brain, values, np.float32(values[brain].min())).astype(np.float32)
    # Edge replication is SimpleITK's zero-flux Neumann border, so results match median_filter.
    padded = np.pad(filled, [(v // 2, v // 2) for v in sizes], mode="edge")
    windows = np.lib.stride_tricks.sliding_window_view(padded, sizes)
    index = np.nonzero(brain)
    medians = np.empty(index[0].size, dtype=np.float32)
    middle = int(np.prod(sizes)) // 2  # odd window: the exact median

    def filter_chunk(start: int, length: int = 65536) -> None:
        chunk = windows[tuple(axis[start : start + length] for axis in index)].reshape(-1, 2 * middle + 1)
        chunk.partition(middle, axis=1)  # in place: the gathered windows are a copy already
        medians[start : start + length] = chunk[:, middle]

    # numpy's partition releases the GIL, so threads share the cores without copying the volume.
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        list(pool.map(filter_chunk, range(0, medians.size, 65536)))
    result = np.array(values, dtype=np.float32)
    result[index] = medians
    return result


def centre_and_spread(inside: np.ndarray, method: str) -> tuple[float, float]:
    """The (centre, spread) of the voxel values ``inside`` that :func:`standardise_in_brain` rescales by:
    'robust' median and 1.4826 MAD (the SD where the MAD is 0), 'zscore' and 'normal' mean and SD; a spread of
    0 counts as 1."""
    inside = inside.astype(np.float64)
    if method == "robust":
        centre = float(np.median(inside))
        spread = 1.4826 * float(np.median(np.abs(inside - centre)))
        if not spread > 0:  # more than half the brain shares one score (e.g. a suppressed rim): use the SD
            spread = float(inside.std()) or 1.0
    elif method in ("zscore", "normal"):
        centre, spread = float(inside.mean()), float(inside.std()) or 1.0
    else:
        raise ValueError(f"postprocess.standardise must be 'none', 'robust', 'zscore' or 'normal', not {method!r}")
    return centre, spread


def standardise_in_brain(values: np.ndarray, brain: np.ndarray, method: str = "robust",
                         reference: Optional[np.ndarray] = None) -> np.ndarray:
    """The score rescaled over the brain: ``method`` 'robust' is ``(score - median) / (1.4826 MAD)``,
    so a threshold reads "robust SDs above the case's typical tissue", which carries over between
    sites and scanners where the raw energy's scale does not (median and MAD ignore the lesion, a
    minority of voxels); 'zscore' is ``(score - mean) / SD``, the scale of a FLAIR z-score; 'normal'
    is ``(score - mean) / SD`` over the ``reference`` voxels (:func:`normal_tissue`)."""
    if method == "normal" and reference is None:
        raise ValueError("standardise='normal' needs the reference voxels (normal-looking tissue)")
    centre, spread = centre_and_spread(values[reference if method == "normal" else brain], method)
    standardised = (values - np.float32(centre)) / np.float32(spread)
    return np.where(brain, standardised, values).astype(np.float32)


LOAD_BASE_SHARE = 0.01
"""The apparent lesion load (share of the brain) at which :func:`load_offset` is 0."""
LOAD_MIN_SHARE = 1e-4
"""Apparent loads below this count as this (a case with nothing above the reference level)."""
LOAD_WEIGHTS: tuple[float, ...] = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6)
"""The load weights a calibration chooses among (``admanomaly calibrate --choose-load-weight`` and the
study's '(z+load)' rows)."""


def load_offset(brain_values: np.ndarray, weight: float, reference: float) -> float:
    """The per-case constant of ``PostprocessConfig.load_weight``: ``weight`` x ln(share of
    ``brain_values`` at or above ``reference`` / :data:`LOAD_BASE_SHARE`)."""
    if weight == 0:
        return 0.0
    share = float(np.count_nonzero(brain_values >= np.float32(reference))) / max(1, brain_values.size)
    return float(weight) * float(np.log(max(share, LOAD_MIN_SHARE) / LOAD_BASE_SHARE))


def region_sizes(binary: np.ndarray) -> np.ndarray:
    """Voxel counts of the 26-connected regions of ``binary`` (none when it is empty)."""
    binary = np.ascontiguousarray(binary, dtype=bool)
    if not binary.any():
        return np.zeros(0, dtype=np.int64)
    labels = sitk.GetArrayFromImage(sitk.ConnectedComponent(sitk.GetImageFromArray(binary.view(np.uint8)), True))
    return np.bincount(labels.ravel())[1:]


def largest_region_ml(binary: np.ndarray, spacing: Spacing) -> float:
    """Volume (ml) of the largest 26-connected region of ``binary`` (0 when it is empty)."""
    sizes = region_sizes(binary)
    return float(sizes.max()) * float(np.prod(spacing)) / 1000.0 if sizes.size else 0.0


def remove_small_components(binary: np.ndarray, min_voxels: int, fully_connected: bool = False) -> np.ndarray:
    """Drop connected components of ``binary`` with fewer than ``min_voxels`` voxels.

    Connectivity is face-only (6 in 3-D) unless ``fully_connected`` (26 in 3-D). Returns bool.
    """
    binary = np.asarray(binary).astype(bool, copy=False)
    if min_voxels <= 1 or not binary.any():
        return binary.copy()
    image = sitk.GetImageFromArray(binary.astype(np.uint8))
    labels = sitk.ConnectedComponent(image, fully_connected)
    kept = sitk.RelabelComponent(labels, minimumObjectSize=int(min_voxels))
    return sitk.GetArrayFromImage(kept) > 0


def component_voxels(min_mm3: float, spacing: Spacing) -> int:
    """Voxel count of ``min_mm3`` mm³ on a grid of ``spacing`` (at least 1: a count of 1 drops nothing)."""
    return max(1, int(round(float(min_mm3) / float(np.prod(spacing)))))


def anomaly_label(values: np.ndarray, brain: np.ndarray, threshold: float, min_voxels: int = 1) -> np.ndarray:
    """The anomaly label of a score volume: brain voxels at or above ``threshold``, without the components of
    fewer than ``min_voxels`` voxels (``PostprocessConfig.min_component_mm3`` through :func:`component_voxels`).
    Every label the product writes or shows, and the study's Dice at threshold, comes from here."""
    values = np.asarray(values)
    above = (values >= _cast_threshold(threshold, values.dtype)) & np.asarray(brain, dtype=bool)
    return remove_small_components(above, min_voxels)


# -- composition -----------------------------------------------------------------------------------
def flair_sheets(intensity: np.ndarray, box: tuple[slice, ...], brain: np.ndarray, spacing: Spacing,
                 sigma_mm: float, cache: dict) -> np.ndarray:
    """:func:`sheet_response` of ``intensity[box]``, kept in ``cache`` for this very ``intensity`` array: a
    case's cache serves every configuration the study scores it with, and some read another FLAIR (N4 or not)."""
    key = ("flair sheets", float(sigma_mm))
    kept = cache.get(key)
    if kept is None or kept[0] is not intensity:
        kept = cache[key] = (intensity, sheet_response(intensity[box], brain, spacing, sigma_mm))
    return kept[1]


def postprocess_scores(
    values: np.ndarray, brain: np.ndarray, spacing: Spacing, cfg: PostprocessConfig,
    intensity: Optional[np.ndarray] = None, cache: Optional[dict] = None,
    direction: Sequence[float] = IDENTITY_DIRECTION, t2_intensity: Optional[np.ndarray] = None,
    t1_intensity: Optional[np.ndarray] = None,
) -> np.ndarray:
    """The native-grid steps of ``cfg`` applied to a score volume (see the module docstring).

    ``intensity`` is the native z-scored FLAIR the intensity term needs (``cfg.flair_weight``),
    ``t2_intensity`` the native z-scored T2 its T2 asymmetry, T2 term and shared hyperintensity need
    (``cfg.t2_asymmetry_weight``, ``cfg.t2_weight``, ``cfg.shared_hyperintensity_weight``), ``t1_intensity`` the
    native z-scored T1 the T2 term reads CSF from;
    ``direction`` holds the grid's direction cosines (SimpleITK's), which tell ``cfg.asymmetry_weight``
    which array axis runs left-right;
    ``cache`` (a dict kept per case) stores the brain-only maps when one case is post-processed
    with several configurations. Background ends exactly 1 below the lowest brain score."""
    brain = np.asarray(brain, dtype=bool)
    values = np.asarray(values, dtype=np.float32)
    if not brain.any():
        return values.copy()
    if cfg.needs_flair and intensity is None:
        raise ValueError("postprocess.flair_weight, asymmetry_weight, energy_gate_z and standardise='normal' need "
                         "the native FLAIR z-score")
    if (cfg.t2_asymmetry_weight or cfg.shared_hyperintensity_weight) and t2_intensity is None:
        raise ValueError("postprocess.t2_asymmetry_weight and shared_hyperintensity_weight need the native T2 z-score")
    if cfg.t2_weight and (t2_intensity is None or t1_intensity is None):
        raise ValueError("postprocess.t2_weight needs the native T1 and T2 z-scores")
    # Everything outside the brain's bounding box is background, so the filters run on the box plus
    # a margin wide enough for the Gaussian tails, the rim distance and the median window: the brain
    # voxels come out as on the whole grid at a fraction of the cost.
    widest_sigma_mm = max(cfg.smoothing_sigma_mm, cfg.final_smoothing_sigma_mm,
                          cfg.sheet_sigma_mm if cfg.flair_sheet_weight or cfg.score_sheet_weight else 0.0)
    margin = np.ceil((GAUSSIAN_TRUNCATE_SIGMAS * widest_sigma_mm + cfg.rim_erosion_mm)
                     / np.asarray(spacing[::-1], dtype=float)).astype(int)
    window = median_window(spacing, cfg.median_size_mm) if cfg.median_size_mm > 0 else (1, 1, 1)
    margin = margin + np.asarray(window) // 2 + 2
    box = bounding_box(brain, margin)
    # The cached maps belong to one box; configurations with other margins get boxes of their own.
    box_cache = {} if cache is None else cache.setdefault(tuple((s.start, s.stop) for s in box), {})
    inner_brain = brain[box]

    def score(config: PostprocessConfig) -> np.ndarray:
        """The steps of ``config`` on the box (its margin is wide enough for every filter of ``cfg``)."""
        inner = values[box].copy()
        if config.smoothing_sigma_mm > 0:
            inner = smooth_in_brain(inner, inner_brain, spacing, config.smoothing_sigma_mm, box_cache)
        if config.rim_erosion_mm > 0:
            inner = suppress_rim(inner, inner_brain, spacing, config.rim_erosion_mm, box_cache)
        if config.energy_asymmetry_weight:
            asymmetry = intensity_asymmetry(inner, inner_brain, spacing, config.asymmetry_window_mm, direction, box_cache)
            inner = (inner + np.float32(config.energy_asymmetry_weight) * asymmetry).astype(np.float32)
        reference = (normal_tissue(inner_brain, intensity[box], config.normal_max_flair_z)
                     if config.standardise == "normal" else None)
        if config.intensity_term:
            flair_evidence = intensity[box]
            if config.flair_sheet_weight:
                flair_evidence = (flair_evidence - np.float32(config.flair_sheet_weight)
                                  * flair_sheets(intensity, box, inner_brain, spacing, config.sheet_sigma_mm,
                                                 box_cache)).astype(np.float32)
            inner = add_intensity_term(inner, inner_brain, flair_evidence, config.flair_weight, config.energy_gate_z, reference)
            if config.asymmetry_weight:
                asymmetry = intensity_asymmetry(flair_evidence, inner_brain, spacing, config.asymmetry_window_mm, direction,
                                                box_cache)
                inner = (inner + np.float32(config.asymmetry_weight) * asymmetry).astype(np.float32)
            if config.t2_asymmetry_weight:
                asymmetry = intensity_asymmetry(t2_intensity[box], inner_brain, spacing, config.asymmetry_window_mm, direction,
                                                box_cache)
                inner = (inner + np.float32(config.t2_asymmetry_weight) * asymmetry).astype(np.float32)
            if config.t2_weight:
                term, _ = t2_term(intensity[box], t1_intensity[box], t2_intensity[box], inner_brain, config.t2_weight,
                                  config.t2_csf_max_t1_z)
                inner = (inner + term).astype(np.float32)
            if config.shared_hyperintensity_weight:
                inner = (inner + np.float32(config.shared_hyperintensity_weight)
                         * shared_hyperintensity(flair_evidence, t2_intensity[box])).astype(np.float32)
        if config.score_sheet_weight:
            inner = (inner - np.float32(config.score_sheet_weight)
                     * sheet_response(inner, inner_brain, spacing, config.sheet_sigma_mm)).astype(np.float32)
        steps = median_window(spacing, config.median_size_mm) if config.median_size_mm > 0 else (1, 1, 1)
        if max(steps) > 1:
            inner = median_filter_in_brain(inner, inner_brain, steps)
        if config.standardise != "none":
            inner = standardise_in_brain(inner, inner_brain, config.standardise, reference)
        if config.final_smoothing_sigma_mm > 0:
            # After the standardisation: the threshold's unit stays the SD of the unsmoothed score. Read after it,
            # the SD shrinks with the fine-scale variation the Gaussian removes, and the scan of small MS lesions,
            # in SDs of its smoothed score, rose above a threshold chosen on gliomas (thirty-second round).
            inner = smooth_in_brain(inner, inner_brain, spacing, config.final_smoothing_sigma_mm, box_cache)
        if config.load_weight != 0:
            offset = load_offset(inner[inner_brain], config.load_weight, config.load_reference)
            inner = np.where(inner_brain, inner + np.float32(offset), inner).astype(np.float32)
        return inner

    inner = score(cfg)
    if (cfg.small_lesion_ml > 0 and (cfg.smoothing_sigma_mm > 0 or cfg.median_size_mm > 0)
            and largest_region_ml((inner >= np.float32(cfg.small_lesion_level)) & inner_brain, spacing)
            < cfg.small_lesion_ml):
        # In the same box, so the maps that neither filter touches (rim, FLAIR asymmetry, T2 term) come from
        # the cache instead of being computed again.
        inner = score(replace(cfg, smoothing_sigma_mm=0.0, median_size_mm=0.0,
                              load_weight=0.0 if cfg.small_lesion_load == "never" else cfg.load_weight))
    result = np.full(values.shape, float(inner[inner_brain].min()) - 1.0, dtype=np.float32)
    result[box] = np.where(inner_brain, inner, result[box])
    return result


def postprocess_energy(energy_image: sitk.Image, brain: np.ndarray, cfg: PostprocessConfig,
                       intensity: Optional[np.ndarray] = None, t2_intensity: Optional[np.ndarray] = None,
                       t1_intensity: Optional[np.ndarray] = None) -> sitk.Image:
    """:func:`postprocess_scores` of an energy image (same grid out)."""
    values = postprocess_scores(sitk.GetArrayFromImage(energy_image), brain, energy_image.GetSpacing(), cfg,
                                intensity, direction=energy_image.GetDirection(), t2_intensity=t2_intensity,
                                t1_intensity=t1_intensity)
    out = sitk.GetImageFromArray(values)
    out.CopyInformation(energy_image)
    return out
