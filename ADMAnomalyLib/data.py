"""Training and validation slice sets built from prepared cases."""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .cases import CaseFiles, load_case
from .config import ADMConfig, SliceContext, TrainConfig
from .errors import TrainingDataError
from .preprocess import MIRROR_AXIS, PreparedCase, prepare_case


@dataclass
class SliceSet:
    """Slices stacked from several cases, at network resolution."""

    images: np.ndarray
    """(M, 4, N, N) float32, z-scored, zero outside the brain."""
    brain: np.ndarray
    """(M, N, N) bool."""
    labels: np.ndarray | None
    """(M, N, N) bool lesion labels, or None when no case had labels."""
    case_ids: list[str]
    """Case of each slice (length M)."""
    neighbours: np.ndarray | None = None
    """(M, n·4, N, N) float32 slices carried beside each (:meth:`PreparedCase.neighbours`) for a
    CtoC with a ``model.slice_context`` of n images; None otherwise."""

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def batches(
        self, batch_size: int, generator: np.random.Generator | None = None
    ) -> Iterator[np.ndarray]:
        """Index batches over the set, shuffled when a generator is given."""
        order = np.arange(len(self)) if generator is None else generator.permutation(len(self))
        for start in range(0, len(self), batch_size):
            yield order[start : start + batch_size]


def lesion_free_slices(prepared: PreparedCase, margin: int) -> np.ndarray:
    """Indices of brain slices at least ``margin + 1`` slices away from any labelled lesion.

    Slices just next to a tumour can look abnormal although unlabelled, so they are kept out of
    the normal training set."""
    near_lesion = _dilate_1d(prepared.has_lesion, margin)
    return np.flatnonzero(prepared.has_brain & ~near_lesion)


def lesion_slices(prepared: PreparedCase) -> np.ndarray:
    """Indices of brain slices that contain a labelled lesion (the validation set)."""
    return np.flatnonzero(prepared.has_brain & prepared.has_lesion)


def _dilate_1d(flags: np.ndarray, margin: int) -> np.ndarray:
    flags = np.asarray(flags, dtype=bool)
    if margin <= 0 or not flags.any():
        return flags.copy()
    dilated = np.zeros_like(flags)
    for index in np.flatnonzero(flags):
        dilated[max(0, index - margin) : index + margin + 1] = True
    return dilated


def stack_slices(cases: Sequence[tuple[PreparedCase, np.ndarray]], context: SliceContext = SliceContext()) -> SliceSet:
    """Stack the chosen slice indices of each prepared case into one :class:`SliceSet`, each slice
    with the slices its ``context`` carries (``model.slice_context``)."""
    chosen = [(case, np.asarray(index, dtype=int)) for case, index in cases if len(index)]
    if not chosen:
        size = 0
        neighbours = np.zeros((0, context.images * 4, size, size), np.float32) if context else None
        return SliceSet(np.zeros((0, 4, size, size), np.float32), np.zeros((0, size, size), bool), None, [],
                        neighbours)
    images = np.concatenate([case.slices[index] for case, index in chosen]).astype(np.float32, copy=False)
    brain = np.concatenate([case.brain[index] for case, index in chosen])
    has_labels = any(case.label is not None for case, _ in chosen)
    labels = None
    if has_labels:
        labels = np.concatenate(
            [case.label[index] if case.label is not None else np.zeros_like(case.brain[index]) for case, index in chosen]
        )
    case_ids = [case.case_id for case, index in chosen for _ in index]
    neighbours = np.concatenate([case.neighbours(index, context) for case, index in chosen]) if context else None
    return SliceSet(images, brain, labels, case_ids, neighbours)


def random_intensity_scaling(
    images: torch.Tensor, brain: torch.Tensor, scale_range: tuple[float, float], generator: torch.Generator
) -> torch.Tensor:
    """Multiply each contrast of each slice by a random factor in ``scale_range`` (method.md
    augmentation); background stays zero."""
    low, high = scale_range
    batch, channels = images.shape[:2]
    factors = torch.rand((batch, channels, 1, 1), generator=generator, device="cpu") * (high - low) + low
    return images * factors.to(images.device) * brain.unsqueeze(1)


Augmentation = Callable[[torch.Tensor, torch.Tensor, torch.Generator], torch.Tensor]
"""``(images (B, K, H, W), brain (B, H, W), generator) -> augmented images``."""

AUGMENTATIONS = ("scaling", "site")
"""Values of ``TrainConfig.augmentation``."""

BIAS_FIELD_GRID = 4
"""Side of the coarse grid of the site augmentation's log bias field: 4 knots over a slice give a
field that varies over about a third of the head, as scanner coil profiles do."""


def augmentation_for(train: TrainConfig) -> Augmentation:
    """The training augmentation ``train.augmentation`` names, with its settings bound (its
    ``through_plane_mix`` checked, which :func:`augment_with_neighbours` applies)."""
    if not 0.0 <= train.through_plane_mix <= 1.0:
        raise ValueError(f"train.through_plane_mix must lie in [0, 1], not {train.through_plane_mix!r}")
    if train.augmentation == "scaling":
        return partial(_scaling, scale_range=train.intensity_scale)
    if train.augmentation == "site":
        return partial(site_shift_augmentation, train=train)
    raise ValueError(f"train.augmentation must be one of {', '.join(AUGMENTATIONS)}, not {train.augmentation!r}")


def augment_with_neighbours(augment: Augmentation, images: torch.Tensor, brain: torch.Tensor,
                            neighbours: torch.Tensor | None, generator: torch.Generator,
                            through_plane_mix: float = 0.0,
                            mirror: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``augment`` applied to slices (B, K, H, W) and the slices carried beside them (B, n·K, H, W)
    or None, the last of which is each slice's mirror image with ``mirror``.

    With ``through_plane_mix`` m (``train.through_plane_mix``) each contrast's neighbouring slices
    first move towards the centre slice by a share drawn from U(0, m) per slice and contrast: a
    thicker acquisition, interpolated. A site shift is the same in a slice and the slices around it,
    so each is then augmented with the very draws its slice got (scaling, bias field, gamma, blur,
    noise): the generator is rewound to the same state for each, and left where one augmentation
    leaves it. The mirror image is augmented mirrored back, so it meets the bias field where its
    tissue lies. All are already cut to their slice's brain, whose mask they share."""
    if neighbours is None:
        return augment(images, brain, generator), None
    batch, channels, height, width = images.shape
    stack = neighbours.reshape(batch, -1, channels, height, width)
    if through_plane_mix > 0:
        share = torch.rand((batch, 1, channels, 1, 1), generator=generator, device="cpu") * through_plane_mix
        moved = stack[:, : stack.shape[1] - int(mirror)]
        moved = moved + share.to(stack.device, stack.dtype) * (images.unsqueeze(1) - moved)
        stack = torch.cat([moved, stack[:, moved.shape[1]:]], dim=1)
    start = generator.get_state()
    augmented = augment(images, brain, generator)
    end = generator.get_state()
    around = []
    for number, neighbour in enumerate(stack.unbind(1), start=1):
        generator.set_state(start)
        if mirror and number == stack.shape[1]:
            around.append(augment(neighbour.flip(MIRROR_AXIS), brain.flip(MIRROR_AXIS), generator).flip(MIRROR_AXIS))
        else:
            around.append(augment(neighbour, brain, generator))
    generator.set_state(end)
    return augmented, torch.cat(around, dim=1)


def _scaling(images: torch.Tensor, brain: torch.Tensor, generator: torch.Generator,
             scale_range: tuple[float, float]) -> torch.Tensor:
    return random_intensity_scaling(images, brain, scale_range, generator)


def site_shift_augmentation(images: torch.Tensor, brain: torch.Tensor, generator: torch.Generator,
                            train: TrainConfig) -> torch.Tensor:
    """Beyond the paper: what changes between scanners and sites, per slice and contrast, on z-scored
    images (B, K, H, W) with brain masks (B, H, W); background stays 0.

    In order: the paper's random scaling (``train.intensity_scale``), a smooth multiplicative bias
    field (``bias_field_sd``), a monotone gamma curve (``gamma_log_sd``), Gaussian blur (sigma up to
    ``blur_sigma_max`` px) and Gaussian noise (sd up to ``noise_sd_max``). Noise comes last so the
    blur does not shrink it. Every random number comes from ``generator`` (a CPU generator: the same
    draws on any device); a step whose size is 0 is skipped."""
    inside = brain.unsqueeze(1).to(images.dtype)
    images = random_intensity_scaling(images, brain, train.intensity_scale, generator)
    if train.bias_field_sd > 0:
        images = _apply_bias_field(images, inside, _random_bias_field(images, train.bias_field_sd, generator))
    if train.gamma_log_sd > 0:
        images = _apply_gamma(images, inside, _random_per_channel(images, generator, "normal") * train.gamma_log_sd)
    if train.blur_sigma_max > 0:
        images = _masked_blur(images, inside, _random_per_channel(images, generator, "uniform") * train.blur_sigma_max)
    if train.noise_sd_max > 0:
        sd = _random_per_channel(images, generator, "uniform") * train.noise_sd_max
        images = images + sd.view(*sd.shape, 1, 1) * _random_like(images, generator)
    return images * inside


def _random_per_channel(images: torch.Tensor, generator: torch.Generator, kind: str) -> torch.Tensor:
    """(B, K) standard normal or U(0, 1) numbers on the images' device."""
    draw = torch.randn if kind == "normal" else torch.rand
    return draw(images.shape[:2], generator=generator, device="cpu").to(images.device, images.dtype)


def _random_like(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    return torch.randn(images.shape, generator=generator, device="cpu").to(images.device, images.dtype)


def _brain_range(images: torch.Tensor, inside: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per slice and contrast min and max (B, K, 1, 1) over the brain; 0 for a slice without brain."""
    has_brain = inside.flatten(2).amax(dim=2, keepdim=True).unsqueeze(-1) > 0
    lowest = images.masked_fill(inside == 0, math.inf).amin(dim=(2, 3), keepdim=True)
    highest = images.masked_fill(inside == 0, -math.inf).amax(dim=(2, 3), keepdim=True)
    return torch.where(has_brain, lowest, 0.0), torch.where(has_brain, highest, 0.0)


def _random_bias_field(images: torch.Tensor, sd: float, generator: torch.Generator) -> torch.Tensor:
    """A smooth positive field (B, K, H, W): exp of a random 4×4 log-field (sd ``sd`` at the knots)
    upsampled bicubically, so it has no detail finer than a quarter of the slice."""
    batch, channels, height, width = images.shape
    knots = torch.randn((batch, channels, BIAS_FIELD_GRID, BIAS_FIELD_GRID), generator=generator, device="cpu") * sd
    log_field = F.interpolate(knots.to(images.device, torch.float32), size=(height, width), mode="bicubic",
                              align_corners=True)
    return log_field.exp().to(images.dtype)


def _apply_bias_field(images: torch.Tensor, inside: torch.Tensor, field: torch.Tensor) -> torch.Tensor:
    """Multiply by ``field`` the intensity measured from the slice's brain minimum.

    A bias field multiplies raw intensities, which are non-negative; a z-score is raw minus the
    brain mean over the SD, so it is negative for dark tissue. Multiplying z-scores directly would
    make dark tissue darker where the field is bright, the opposite of what a coil does. The brain
    minimum stands in for raw zero (the darkest tissue: CSF on T1, FLAIR), so the field brightens or
    darkens every tissue in proportion to its raw level, keeping the darkest fixed."""
    floor, _ = _brain_range(images, inside)
    return (floor + field * (images - floor)) * inside


def _apply_gamma(images: torch.Tensor, inside: torch.Tensor, log_gamma: torch.Tensor) -> torch.Tensor:
    """Monotone contrast change u -> u^gamma of the intensities rescaled to [0, 1] over each slice's
    brain (gamma = exp(``log_gamma``) per slice and contrast), mapped back to the same range: the
    darkest and brightest brain pixel keep their values, the tissues between move."""
    low, high = _brain_range(images, inside)
    span = (high - low).clamp_min(1e-6)
    unit = ((images - low) / span).clamp(0.0, 1.0)
    curved = unit.pow(log_gamma.exp().view(*log_gamma.shape, 1, 1))
    return (low + curved * span) * inside


def _masked_blur(images: torch.Tensor, inside: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Gaussian blur with its own ``sigma`` (B, K) pixels per slice and contrast, normalised over the
    brain (blur(x·m) / blur(m)) so the zero background does not darken the brain's rim."""
    batch, channels, height, width = images.shape
    radius = max(1, math.ceil(3 * float(sigma.max())))
    offsets = torch.arange(-radius, radius + 1, device=images.device, dtype=torch.float32)
    # A sigma near 0 gives the kernel [0, ..., 1, ..., 0]: the image unchanged.
    spread = sigma.float().clamp_min(1e-3).reshape(-1, 1)
    kernel = torch.exp(-0.5 * (offsets / spread) ** 2)
    kernel = (kernel / kernel.sum(dim=1, keepdim=True)).to(images.dtype)  # (B*K, taps)

    def blur(planes: torch.Tensor) -> torch.Tensor:
        # Separable and grouped: one kernel per (slice, contrast) plane, rows then columns.
        flat = planes.reshape(1, batch * channels, height, width)
        flat = F.conv2d(F.pad(flat, (radius, radius, 0, 0)), kernel.view(-1, 1, 1, 2 * radius + 1),
                        groups=batch * channels)
        flat = F.conv2d(F.pad(flat, (0, 0, radius, radius)), kernel.view(-1, 1, 2 * radius + 1, 1),
                        groups=batch * channels)
        return flat.reshape(batch, channels, height, width)

    weight = blur(inside.expand_as(images))
    return blur(images * inside) / weight.clamp_min(1e-6) * inside


def training_slices(prepared: PreparedCase, margin: int) -> tuple[np.ndarray, np.ndarray]:
    """``(normal, lesion)`` slice indices of a prepared case: the lesion-free slices (with the
    margin) that training learns from and the lesion slices that validation scores."""
    lesion = lesion_slices(prepared) if prepared.label is not None else np.zeros(0, dtype=int)
    return lesion_free_slices(prepared, margin), lesion


@dataclass
class TrainingData:
    """Normal training slices and labelled validation slices drawn from the same cases."""

    train: SliceSet
    validation: SliceSet
    summary: dict[str, Any]

    @classmethod
    def from_prepared(cls, cases: Sequence[PreparedCase], margin: int,
                      context: SliceContext = SliceContext()) -> "TrainingData":
        """The training data of prepared cases: lesion-free slices (``margin`` slices away from any
        lesion) to train on, lesion slices to validate on (the trainer, the study and the slice cache
        all select them with :func:`training_slices`), each with the slices its ``context`` carries
        (``model.slice_context``)."""
        if not cases:
            raise TrainingDataError("no case to train on")
        train_parts, validation_parts, per_case = [], [], {}
        for prepared in cases:
            normal, lesion = training_slices(prepared, margin)
            train_parts.append((prepared, normal))
            validation_parts.append((prepared, lesion))
            per_case[prepared.case_id] = {"normal_slices": int(len(normal)), "lesion_slices": int(len(lesion))}
        train = stack_slices(train_parts, context)
        if len(train) == 0:
            raise TrainingDataError(
                f"none of the {len(cases)} case(s) has a lesion-free brain slice "
                f"(lesion margin {margin} slices); nothing to learn normal anatomy from"
            )
        summary = {"cases": sorted(per_case), "per_case": per_case, "train_slices": len(train),
                   "validation_slices": sum(v["lesion_slices"] for v in per_case.values())}
        return cls(train, stack_slices(validation_parts, context), summary)


def build_training_data(case_files: Sequence[CaseFiles], config: ADMConfig) -> TrainingData:
    """Load and prepare every case (:meth:`TrainingData.from_prepared`)."""
    if not case_files:
        raise TrainingDataError("no case to train on")
    # keep_native=(): training needs no native-grid volumes, and they would stay in memory per case.
    prepared = [prepare_case(load_case(files, config.preprocess.grid_tolerance), config.preprocess, keep_native=())
                for files in case_files]
    return TrainingData.from_prepared(prepared, config.train.lesion_margin, config.model.slice_context)
