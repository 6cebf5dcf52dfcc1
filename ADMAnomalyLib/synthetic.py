"""Small synthetic lesions painted into a real scan.

The study chooses its post-processing and threshold on the lesions of its training domains. When
those are all gliomas (the MS fold), nothing in the choice rewards keeping a 3 mm plaque, so the
choice is made for large oedema only. A case with small lesions painted into its white matter gives
the choice a group of small lesions without reading any test case.

The lesions follow priors on white-matter hyperintensities, not figures fitted to any scan: a few mm
to about a centimetre across, brighter than their surroundings on FLAIR and T2 by one to three times
the contrast's spread over the brain, equal or darker on T1 and T1c (not enhancing), with a soft
edge (partial volume). They are painted into the native volumes before any preprocessing, so every
step a real scan meets (brain mask, bias correction, normalisation, resampling) meets them too.
"""

from __future__ import annotations

import dataclasses
import zlib
from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from .cases import CaseImages
from .config import CONTRASTS
from .errors import InputError
from .preprocess import normalisation_statistics


@dataclass(frozen=True)
class SyntheticLesionConfig:
    """How many lesions, how large and how bright (see the module doc for where the values come from)."""

    count: int = 15
    diameter_mm: tuple[float, float] = (3.0, 12.0)
    """Range of the lesions' mean diameters, drawn log-uniformly (as many small lesions as large ones on a log scale)."""
    elongation: tuple[float, float] = (0.7, 1.4)
    """Range of each semi-axis' factor on the mean radius (an ellipsoid along the grid's axes)."""
    change_sd: tuple[tuple[str, float, float], ...] = (("flair", 1.0, 3.0), ("t1", -1.0, 0.0),
                                                      ("t1c", -1.0, 0.0), ("t2", 1.0, 3.0))
    """(contrast, low, high): each lesion's intensity change, drawn uniformly, in units of the contrast's robust
    spread over the brain (interquartile range / 1.349)."""
    edge_sigma_mm: float = 0.7
    """Gaussian softening of the lesion's edge (partial volume); the label is where the softened lesion is ≥ 0.5."""
    depth_mm: float = 5.0
    """Lesion centres lie at least this far inside the brain (white matter, not cortex)."""
    clearance_mm: float = 10.0
    """Lesion centres lie at least this far from the scan's own lesion."""
    heal_margin_mm: float = 2.0
    """:func:`mirror_healed` replaces the scan's own lesion and this margin round it."""

    def __post_init__(self) -> None:
        low, high = self.diameter_mm
        if self.count < 1 or not 0 < low <= high:
            raise ValueError(f"synthetic lesions need count >= 1 and 0 < diameter low <= high, got {self}")
        if sorted(name for name, _, _ in self.change_sd) != sorted(CONTRASTS):
            raise ValueError(f"change_sd must name each of {', '.join(CONTRASTS)} once")


def lesion_sites(brain: np.ndarray, t1_zscored: np.ndarray, spacing: tuple[float, float, float],
                 config: SyntheticLesionConfig, lesion: np.ndarray | None = None) -> np.ndarray:
    """bool (z, y, x): where a lesion centre may lie: brain at least ``config.depth_mm`` deep, T1 at least the
    brain's median (white matter is the brightest tissue on T1), and ``config.clearance_mm`` from ``lesion``.
    ``spacing`` is SimpleITK's (x, y, z)."""
    sampling = tuple(reversed(spacing))
    sites = ndimage.distance_transform_edt(brain, sampling=sampling) >= config.depth_mm
    sites &= t1_zscored >= np.median(t1_zscored[brain])
    if lesion is not None and lesion.any():
        sites &= ndimage.distance_transform_edt(~lesion, sampling=sampling) >= config.clearance_mm
    return sites


def mirror_healed(case: CaseImages, brain: np.ndarray, lesion: np.ndarray, margin_mm: float) -> CaseImages:
    """A copy of ``case`` whose own lesion (and ``margin_mm`` round it) shows the tissue mirrored from the other
    hemisphere, across the mid-sagittal plane the post-processing uses
    (:func:`~ADMAnomalyLib.postprocess.mid_sagittal_plane`), wherever that tissue is lesion-free brain. A scan with
    a large glioma then reads as a scan with small lesions to every whole-brain step (the score's spread, the
    lesion load, the lesion scale), which the painted lesions are meant to test. The seam stays unlabelled: the
    study leaves the healed region out of the scored voxels."""
    from .postprocess import mid_sagittal_plane

    reference = case.images[CONTRASTS[0]]
    spacing = reference.GetSpacing()
    healed_region = ndimage.distance_transform_edt(~lesion, sampling=tuple(reversed(spacing))) <= margin_mm
    plane = mid_sagittal_plane(brain, spacing, reference.GetDirection())
    donor_ok = (plane.reflect(brain.astype(np.float32), spacing, sitk.sitkNearestNeighbor) > 0.5) & \
        (plane.reflect(lesion.astype(np.float32), spacing, sitk.sitkNearestNeighbor) < 0.5)
    replace = healed_region & brain & donor_ok
    images = {}
    for c in CONTRASTS:
        values = sitk.GetArrayFromImage(case.images[c]).astype(np.float32)
        mirrored = plane.reflect(values, spacing)
        image = sitk.GetImageFromArray(np.where(replace, mirrored, values).astype(np.float32))
        image.CopyInformation(case.images[c])
        images[c] = image
    return dataclasses.replace(case, images=images)


def paint_lesions(case: CaseImages, brain: np.ndarray, sites: np.ndarray, config: SyntheticLesionConfig,
                  seed: int | None = None) -> CaseImages:
    """A copy of ``case`` with ``config.count`` lesions painted at random ``sites`` (see :func:`lesion_sites`) of
    its ``brain``; its label is the painted lesions only. ``seed`` None: drawn from the case id, so a case always
    gets the same lesions."""
    if not sites.any():
        raise InputError(f"case {case.case_id}: no white matter deep enough and clear of its lesion to paint "
                         "synthetic lesions into")
    rng = np.random.default_rng(zlib.crc32(case.case_id.encode()) if seed is None else seed)
    reference = case.images[CONTRASTS[0]]
    spacing_zyx = np.array(tuple(reversed(reference.GetSpacing())), float)
    arrays = {c: sitk.GetArrayFromImage(case.images[c]).astype(np.float32) for c in CONTRASTS}
    # The network input's robust scale (IQR / 1.349), so a change of 1 reads as about 1 in the network's units.
    spreads = {c: normalisation_statistics(arrays[c][brain], "robust")[1] for c in CONTRASTS}
    softened = np.zeros(brain.shape, np.float32)
    changes = {c: np.zeros(brain.shape, np.float32) for c in CONTRASTS}
    candidates = np.argwhere(sites)
    sigma = config.edge_sigma_mm / spacing_zyx
    low, high = config.diameter_mm
    for _ in range(config.count):
        centre = candidates[rng.integers(len(candidates))]
        radii_mm = np.exp(rng.uniform(np.log(low), np.log(high))) / 2 * rng.uniform(*config.elongation, size=3)
        # A box wide enough for the ellipsoid and its softened edge.
        half = np.ceil(radii_mm / spacing_zyx + 3 * sigma).astype(int) + 1
        lo = np.maximum(centre - half, 0)
        hi = np.minimum(centre + half + 1, brain.shape)
        box = tuple(slice(a, b) for a, b in zip(lo, hi))
        grid = np.meshgrid(*[(np.arange(a, b) - c) * s for a, b, c, s in zip(lo, hi, centre, spacing_zyx)],
                           indexing="ij")
        ellipsoid = sum((g / r) ** 2 for g, r in zip(grid, radii_mm)) <= 1.0
        soft = ndimage.gaussian_filter(ellipsoid.astype(np.float32), sigma)
        # A lesion smaller than the blur keeps its full change at its centre (and so a labelled voxel).
        soft = soft / max(float(soft.max()), 1e-6) * brain[box]
        draws = {name: rng.uniform(lo_sd, hi_sd) for name, lo_sd, hi_sd in config.change_sd}
        # Where lesions overlap the stronger one's change holds, not their sum.
        stronger = soft > softened[box]
        softened[box] = np.where(stronger, soft, softened[box])
        for c in CONTRASTS:
            changes[c][box] = np.where(stronger, soft * draws[c] * spreads[c], changes[c][box])
    images = {}
    for c in CONTRASTS:
        floor = float(arrays[c][brain].min())
        painted = np.where(brain, np.maximum(arrays[c] + changes[c], floor), arrays[c]).astype(np.float32)
        image = sitk.GetImageFromArray(painted)
        image.CopyInformation(case.images[c])
        images[c] = image
    label = sitk.GetImageFromArray((softened >= 0.5).astype(np.uint8))
    label.CopyInformation(reference)
    return dataclasses.replace(case, images=images, label=label,
                               sources={**case.sources, "label": f"{case.case_id}: synthetic lesions"})
