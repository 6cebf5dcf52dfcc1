"""Classic voxel-wise anomaly scores, computed on the same inputs as ADM.

Inputs are a volume ``(4, Z, Y, X)`` in the canonical contrast order ``flair, t1, t1c, t2``
(:data:`ADMAnomalyLib.config.CONTRASTS`), z-scored per contrast inside the brain, and a bool brain
mask ``(Z, Y, X)``. Every score is "higher = more anomalous". Score maps returned as volumes hold,
outside the brain, the lowest in-brain score, so thresholding a map never flags background (the
metrics ignore background anyway).

* :func:`flair_zscore` - the FLAIR-hyperintensity baseline: FLAIR z-scored inside the brain.
* :func:`flair_zscore_filtered` - the same with the usual post-processing of FLAIR-thresholding
  baselines: a 3-D median filter of the score and, at a given threshold, suppression of connected
  components smaller than a minimum size (the steps of :mod:`ADMAnomalyLib.postprocess`).
* :class:`MahalanobisBaseline` - Mahalanobis distance of the 4 intensities to normal voxels.
* :class:`OCSVMBaseline` - the paper's OCSVM (RBF on the 4-vector of intensities, gamma = 0.25,
  nu ~ 5e-4; method.md, 'Reported results').
"""

from __future__ import annotations

import math

import numpy as np
import SimpleITK as sitk

from .config import CONTRASTS
from .errors import InputError, TrainingDataError
from .postprocess import median_filter_in_brain, median_window
from .slicing import brain_onto_grid, energy_onto, onto_grid, thin_grid

FLAIR_CHANNEL = CONTRASTS.index("flair")


# --------------------------------------------------------------------------------------------------
# helpers


def _check_volume(volume: np.ndarray, brain: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    volume = np.asarray(volume)
    brain = np.asarray(brain).astype(bool, copy=False)
    if volume.ndim < 2 or volume.shape[0] != len(CONTRASTS):
        raise ValueError(f"volume must be ({len(CONTRASTS)}, ...) in order {CONTRASTS}, got {volume.shape}")
    if volume.shape[1:] != brain.shape:
        raise ValueError(f"brain mask shape {brain.shape} differs from volume shape {volume.shape[1:]}")
    if not brain.any():
        raise InputError("the brain mask is empty: no voxel to score")
    return volume, brain


def brain_features(volume: np.ndarray, brain: np.ndarray) -> np.ndarray:
    """The ``(N, 4)`` float32 intensity vectors of the N brain voxels (C order of the mask)."""
    volume, brain = _check_volume(volume, brain)
    return np.ascontiguousarray(volume[:, brain].T, dtype=np.float32)


def features_to_volume(values: np.ndarray, brain: np.ndarray) -> np.ndarray:
    """Scatter per-brain-voxel ``values`` back into a float32 volume of the mask's shape;
    background gets the lowest brain value (see the module docstring)."""
    brain = np.asarray(brain).astype(bool, copy=False)
    values = np.asarray(values, dtype=np.float32)
    if values.shape != (int(brain.sum()),):
        raise ValueError(f"expected {int(brain.sum())} values (one per brain voxel), got {values.shape}")
    fill = float(values.min()) if values.size else 0.0
    out = np.full(brain.shape, fill, dtype=np.float32)
    out[brain] = values
    return out


def _fill_background(score: np.ndarray, brain: np.ndarray) -> np.ndarray:
    score[~brain] = score[brain].min()
    return score


# --------------------------------------------------------------------------------------------------
# FLAIR thresholding


def flair_zscore(volume: np.ndarray, brain: np.ndarray) -> np.ndarray:
    """FLAIR intensity z-scored over the brain voxels, as a float32 ``(Z, Y, X)`` score.

    The z-scoring is repeated here (it is a no-op on already normalised input) so the score means
    "standard deviations above the mean brain FLAIR" whatever normalisation the caller used.
    """
    volume, brain = _check_volume(volume, brain)
    flair = volume[FLAIR_CHANNEL].astype(np.float32)
    inside = flair[brain].astype(np.float64)
    sd = float(inside.std())
    if not math.isfinite(sd) or sd == 0.0:
        raise InputError("FLAIR is constant (or not finite) inside the brain; cannot z-score it")
    score = ((flair - inside.mean()) / sd).astype(np.float32)
    return _fill_background(score, brain)


def flair_zscore_filtered(
    volume: np.ndarray,
    brain: np.ndarray,
    median_size: int = 5,
) -> np.ndarray:
    """FLAIR z-score, median filtered in 3-D. The strong baseline's label at a threshold leaves out small
    regions as every label does (:func:`~ADMAnomalyLib.postprocess.anomaly_label`); the score stays as it is."""
    volume, brain = _check_volume(volume, brain)
    score = flair_zscore(volume, brain)
    if median_size > 1:
        score = _fill_background(median_filter_in_brain(score, brain, median_size), brain)
    return score


def strong_baseline_image(flair: sitk.Image, brain: np.ndarray, median_mm: float = 5.0,
                          max_slice_mm: float = 0.0) -> np.ndarray:
    """The strong baseline of one case on its own grid (array order): FLAIR z-score over ``brain`` and a median of
    about ``median_mm`` along each axis (:func:`~ADMAnomalyLib.postprocess.median_window`, so one slice across a
    thick slice). With ``max_slice_mm`` it is computed on the thinner slices a model with that
    ``preprocess.max_slice_mm`` sees and carried back the same way (:mod:`~ADMAnomalyLib.slicing`): the baseline
    given what the model is given."""
    brain = np.asarray(brain, dtype=bool)
    grid = thin_grid(flair, max_slice_mm)
    image = flair if grid is None else onto_grid(flair, grid)
    thin_mask = None if grid is None else brain_onto_grid(brain, flair, grid)
    inside = brain if grid is None else sitk.GetArrayFromImage(thin_mask) > 0
    values = sitk.GetArrayFromImage(image).astype(np.float32)
    score = flair_zscore(values[None].repeat(len(CONTRASTS), axis=0), inside)
    score = _fill_background(median_filter_in_brain(score, inside, median_window(image.GetSpacing(), median_mm)),
                             inside)
    if grid is None:
        return score
    thin_score = sitk.GetImageFromArray(score)
    thin_score.CopyInformation(image)
    return sitk.GetArrayFromImage(energy_onto(thin_score, thin_mask, flair, brain))


# --------------------------------------------------------------------------------------------------
# learned intensity models


def _check_features(features: np.ndarray, what: str) -> np.ndarray:
    # No float64 copy here: callers convert chunk by chunk so millions of voxels stay cheap.
    features = np.asarray(features)
    if features.ndim != 2 or features.shape[1] != len(CONTRASTS):
        raise ValueError(f"{what} must be (N, {len(CONTRASTS)}), got {features.shape}")
    if not np.isfinite(features).all():
        raise ValueError(f"{what} contain NaN or infinite values")
    return features


class _VolumeScorer:
    """Adds :meth:`score_volume` to a per-voxel scorer."""

    def score(self, features: np.ndarray) -> np.ndarray:  # pragma: no cover - overridden
        raise NotImplementedError

    def score_volume(self, volume: np.ndarray, brain: np.ndarray) -> np.ndarray:
        """Score every brain voxel of a ``(4, Z, Y, X)`` volume; float32 ``(Z, Y, X)`` map."""
        return features_to_volume(self.score(brain_features(volume, brain)), brain)


class MahalanobisBaseline(_VolumeScorer):
    """Mahalanobis distance of the 4 intensities to the distribution of normal training voxels.

    ``estimator`` is ``"empirical"`` (maximum likelihood covariance) or ``"ledoit_wolf"``
    (shrunk, for few training voxels). The score is the distance itself (not squared).
    """

    def __init__(self, estimator: str = "empirical", chunk_size: int = 1_000_000) -> None:
        if estimator not in ("empirical", "ledoit_wolf"):
            raise ValueError(f"estimator must be 'empirical' or 'ledoit_wolf', got {estimator!r}")
        self.estimator = estimator
        self.chunk_size = int(chunk_size)
        self.mean_: np.ndarray | None = None
        self.precision_: np.ndarray | None = None

    def fit(self, features: np.ndarray) -> "MahalanobisBaseline":
        """Estimate mean and covariance from ``(N, 4)`` normal voxels."""
        from sklearn.covariance import EmpiricalCovariance, LedoitWolf

        features = _check_features(features, "training features")
        if features.shape[0] < 2:
            raise TrainingDataError(f"Mahalanobis baseline needs at least 2 training voxels, got {features.shape[0]}")
        model = LedoitWolf() if self.estimator == "ledoit_wolf" else EmpiricalCovariance()
        model.fit(features.astype(np.float64))
        self.mean_ = model.location_
        # pinvh inside sklearn keeps a singular covariance (e.g. a constant contrast) usable.
        self.precision_ = model.get_precision()
        return self

    def score(self, features: np.ndarray) -> np.ndarray:
        """Mahalanobis distance of each row of ``(N, 4)`` features; float32 ``(N,)``."""
        if self.mean_ is None or self.precision_ is None:
            raise RuntimeError("MahalanobisBaseline.score called before fit")
        features = _check_features(features, "features")
        out = np.empty(features.shape[0], dtype=np.float32)
        for start in range(0, features.shape[0], self.chunk_size):  # bounds float64 temporaries
            d = features[start : start + self.chunk_size].astype(np.float64) - self.mean_
            out[start : start + d.shape[0]] = np.sqrt(np.maximum(np.einsum("ij,jk,ik->i", d, self.precision_, d), 0.0))
        return out


class OCSVMBaseline(_VolumeScorer):
    """One-class SVM with an RBF kernel on the 4-vector of intensities (paper baseline).

    Cost: libsvm training grows roughly quadratically with the training size, so at most
    ``max_train`` normal voxels (random subsample, ``seed``) are used; 20 000 Gaussian-like voxels
    fit in well under a second. Scoring costs O(voxels x support vectors) kernel evaluations and
    runs in chunks of ``chunk_size`` voxels to bound memory; with nu = 5e-4 there are few support
    vectors (>= nu x max_train; ~150 measured), about 2 us per voxel, i.e. ~3 s for a 1.5 M-voxel
    brain on one core. Measured on a 2-core CPU with synthetic data; real data may need more
    support vectors.
    Score = -decision_function (higher = more anomalous; > 0 means outside the learned support).
    """

    def __init__(
        self,
        gamma: float = 0.25,
        nu: float = 5e-4,
        max_train: int = 20_000,
        seed: int = 0,
        chunk_size: int = 200_000,
    ) -> None:
        if not 0.0 < nu <= 1.0:
            raise ValueError(f"nu must be in (0, 1], got {nu}")
        self.gamma = float(gamma)
        self.nu = float(nu)
        self.max_train = int(max_train)
        self.seed = int(seed)
        self.chunk_size = int(chunk_size)
        self.model_ = None

    def fit(self, features: np.ndarray) -> "OCSVMBaseline":
        """Fit on ``(N, 4)`` normal voxels, subsampled to ``max_train``."""
        from sklearn.svm import OneClassSVM

        features = _check_features(features, "training features")
        if features.shape[0] < 2:
            raise TrainingDataError(f"OCSVM baseline needs at least 2 training voxels, got {features.shape[0]}")
        if features.shape[0] > self.max_train:
            rng = np.random.default_rng(self.seed)
            features = features[rng.choice(features.shape[0], self.max_train, replace=False)]
        self.model_ = OneClassSVM(kernel="rbf", gamma=self.gamma, nu=self.nu).fit(features.astype(np.float64))
        return self

    @property
    def n_support(self) -> int:
        """Number of support vectors of the fitted model (drives the scoring cost)."""
        if self.model_ is None:
            raise RuntimeError("OCSVMBaseline is not fitted")
        return int(self.model_.support_vectors_.shape[0])

    def score(self, features: np.ndarray) -> np.ndarray:
        """``-decision_function`` of each row of ``(N, 4)`` features; float32 ``(N,)``."""
        if self.model_ is None:
            raise RuntimeError("OCSVMBaseline.score called before fit")
        features = _check_features(features, "features")
        out = np.empty(features.shape[0], dtype=np.float32)
        for start in range(0, features.shape[0], self.chunk_size):
            chunk = features[start : start + self.chunk_size].astype(np.float64)
            out[start : start + chunk.shape[0]] = -self.model_.decision_function(chunk)
        return out
