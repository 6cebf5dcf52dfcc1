"""Thick slices: a case sampled coarser than the networks were trained on, resampled for them.

Scanner series are often 4-6 mm thick, while the networks and the post-processing (its filters and regions are
sized in mm, chosen on 1 mm scans) were made on 1 mm volumes. Fed a 5.5 mm FLAIR as it is, every 3-D step of the
post-processing works on one slice at a time and the model's threshold does not transfer (docs/raw_case.md).
With ``PreprocessConfig.max_slice_mm`` set, :func:`thin_case` puts a case whose grid is coarser than that along
any axis onto a grid of that spacing along those axes (the same slab: the first thin slice starts where the
first thick one starts), the model runs there, and :func:`energy_onto` carries the energy back onto the case's
own grid, so every output still lies exactly on the input grid.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import SimpleITK as sitk

from .cases import CaseImages
from .config import CONTRASTS, PreprocessConfig
from .preprocess import case_brain

_IDENTITY = sitk.Transform(3, sitk.sitkIdentity)


def thin_grid(reference: sitk.Image, max_slice_mm: float) -> Optional[sitk.Image]:
    """An empty grid like ``reference`` with every axis sampled coarser than ``max_slice_mm`` resampled to
    ``max_slice_mm``, covering the same slab; None when no axis is (or ``max_slice_mm`` is 0: off)."""
    spacing = np.asarray(reference.GetSpacing(), dtype=float)
    # A hair of tolerance: a 2 mm grid stored as 2.0000001 mm is not thick.
    thick = spacing > max_slice_mm * (1 + 1e-6)
    if not max_slice_mm or not thick.any():
        return None
    size = np.asarray(reference.GetSize())
    new_spacing = np.where(thick, max_slice_mm, spacing)
    new_size = np.where(thick, np.maximum(1, np.round(size * spacing / max_slice_mm)), size).astype(int)
    direction = np.asarray(reference.GetDirection(), dtype=float).reshape(3, 3)
    # Voxel centres: a thick slice spans +-spacing/2 around its centre, and so does the thin stack.
    shift = np.where(thick, (new_spacing - spacing) / 2, 0.0)
    grid = sitk.Image([int(n) for n in new_size], sitk.sitkUInt8)
    grid.SetSpacing(tuple(float(s) for s in new_spacing))
    grid.SetDirection(reference.GetDirection())
    grid.SetOrigin(tuple(np.asarray(reference.GetOrigin()) + direction @ shift))
    return grid


def onto_grid(image: sitk.Image, grid: sitk.Image) -> sitk.Image:
    """``image`` on ``grid`` (:func:`thin_grid`): linear, which never overshoots, as float32."""
    return sitk.Resample(image, grid, _IDENTITY, sitk.sitkLinear, 0.0, sitk.sitkFloat32)


def brain_onto_grid(brain: np.ndarray, reference: sitk.Image, grid: sitk.Image) -> sitk.Image:
    """``brain`` (bool on ``reference``'s grid) on ``grid`` as a uint8 mask: brain where most of a voxel is."""
    mask = sitk.GetImageFromArray(np.asarray(brain, dtype=np.float32))
    mask.CopyInformation(reference)
    return sitk.Cast(onto_grid(mask, grid) > 0.5, sitk.sitkUInt8)


def thin_case(case: CaseImages, cfg: PreprocessConfig) -> Optional[tuple[CaseImages, np.ndarray]]:
    """``case`` on :func:`thin_grid` (contrasts linear, which never overshoots; its brain,
    :func:`~ADMAnomalyLib.preprocess.case_brain`, carried as a mask that is brain where most of a voxel is) and
    that brain (bool on the case's grid), or None when its grid is not coarser than ``cfg.max_slice_mm`` along
    any axis."""
    reference = case.images[CONTRASTS[0]]
    grid = thin_grid(reference, cfg.max_slice_mm)
    if grid is None:
        return None
    brain = case_brain(case, cfg)
    images = {c: onto_grid(case.images[c], grid) for c in CONTRASTS}
    return CaseImages(case.case_id, images, None, brain_onto_grid(brain, reference, grid), case.sources), brain


def energy_onto(energy: sitk.Image, energy_brain: sitk.Image, reference: sitk.Image, brain: np.ndarray) -> sitk.Image:
    """The energy of a thin grid on ``reference``'s grid: linear, weighted by the thin grid's brain
    ``energy_brain`` so that its background never leaks into the brain's rim; voxels outside ``brain`` (bool on
    ``reference``'s grid) lie exactly 1 below the lowest brain energy, as on every energy map."""
    inside = sitk.Cast(energy_brain > 0, sitk.sitkFloat32)
    weighted = sitk.Resample(sitk.Mask(energy, energy_brain > 0), reference, _IDENTITY, sitk.sitkLinear, 0.0,
                             sitk.sitkFloat32)
    coverage = sitk.GetArrayFromImage(sitk.Resample(inside, reference, _IDENTITY, sitk.sitkLinear, 0.0,
                                                    sitk.sitkFloat32))
    plain = sitk.GetArrayFromImage(sitk.Resample(energy, reference, _IDENTITY, sitk.sitkLinear, 0.0,
                                                 sitk.sitkFloat32))
    covered = coverage > 1e-3
    values = np.where(covered, sitk.GetArrayFromImage(weighted) / np.maximum(coverage, 1e-3), plain)
    background = float(values[brain].min()) - 1.0 if brain.any() else 0.0
    out = sitk.GetImageFromArray(np.where(brain, values, background).astype(np.float32))
    out.CopyInformation(reference)
    return out
