"""Training and validation slice sets built from prepared cases."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import numpy as np
import torch

from .cases import CaseFiles, load_case
from .config import ADMConfig
from .errors import TrainingDataError
from .preprocess import PreparedCase, prepare_case


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


def stack_slices(cases: Sequence[tuple[PreparedCase, np.ndarray]]) -> SliceSet:
    """Stack the chosen slice indices of each prepared case into one :class:`SliceSet`."""
    chosen = [(case, np.asarray(index, dtype=int)) for case, index in cases if len(index)]
    if not chosen:
        size = 0
        return SliceSet(np.zeros((0, 4, size, size), np.float32), np.zeros((0, size, size), bool), None, [])
    images = np.concatenate([case.slices[index] for case, index in chosen]).astype(np.float32, copy=False)
    brain = np.concatenate([case.brain[index] for case, index in chosen])
    has_labels = any(case.label is not None for case, _ in chosen)
    labels = None
    if has_labels:
        labels = np.concatenate(
            [case.label[index] if case.label is not None else np.zeros_like(case.brain[index]) for case, index in chosen]
        )
    case_ids = [case.case_id for case, index in chosen for _ in index]
    return SliceSet(images, brain, labels, case_ids)


def random_intensity_scaling(
    images: torch.Tensor, brain: torch.Tensor, scale_range: tuple[float, float], generator: torch.Generator
) -> torch.Tensor:
    """Multiply each contrast of each slice by a random factor in ``scale_range`` (method.md
    augmentation); background stays zero."""
    low, high = scale_range
    batch, channels = images.shape[:2]
    factors = torch.rand((batch, channels, 1, 1), generator=generator, device="cpu") * (high - low) + low
    return images * factors.to(images.device) * brain.unsqueeze(1)


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
    def from_prepared(cls, cases: Sequence[PreparedCase], margin: int) -> "TrainingData":
        """The training data of prepared cases: lesion-free slices (``margin`` slices away from any
        lesion) to train on, lesion slices to validate on (the trainer, the study and the slice cache
        all select them with :func:`training_slices`)."""
        if not cases:
            raise TrainingDataError("no case to train on")
        train_parts, validation_parts, per_case = [], [], {}
        for prepared in cases:
            normal, lesion = training_slices(prepared, margin)
            train_parts.append((prepared, normal))
            validation_parts.append((prepared, lesion))
            per_case[prepared.case_id] = {"normal_slices": int(len(normal)), "lesion_slices": int(len(lesion))}
        train = stack_slices(train_parts)
        if len(train) == 0:
            raise TrainingDataError(
                f"none of the {len(cases)} case(s) has a lesion-free brain slice "
                f"(lesion margin {margin} slices); nothing to learn normal anatomy from"
            )
        summary = {"cases": sorted(per_case), "per_case": per_case, "train_slices": len(train),
                   "validation_slices": sum(v["lesion_slices"] for v in per_case.values())}
        return cls(train, stack_slices(validation_parts), summary)


def build_training_data(case_files: Sequence[CaseFiles], config: ADMConfig) -> TrainingData:
    """Load and prepare every case (:meth:`TrainingData.from_prepared`)."""
    if not case_files:
        raise TrainingDataError("no case to train on")
    # keep_native=(): training needs no native-grid volumes, and they would stay in memory per case.
    prepared = [prepare_case(load_case(files, config.preprocess.grid_tolerance), config.preprocess, keep_native=())
                for files in case_files]
    return TrainingData.from_prepared(prepared, config.train.lesion_margin)
