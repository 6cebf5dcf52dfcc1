"""Classic baselines on small synthetic volumes."""

from __future__ import annotations

import numpy as np
import pytest

from ADMAnomalyLib.postprocess import anomaly_label, component_voxels, median_filter, remove_small_components
from ADMAnomalyLib.baselines import (
    MahalanobisBaseline,
    OCSVMBaseline,
    brain_features,
    features_to_volume,
    flair_zscore,
    flair_zscore_filtered,
)
from ADMAnomalyLib.errors import InputError, TrainingDataError
from ADMAnomalyLib.metrics import detection_metrics

SHAPE = (20, 32, 32)


def _phantom(seed: int = 0):
    """Spherical 'brain' with a FLAIR-bright blob; 4 contrasts, z-scored-ish noise."""
    rng = np.random.default_rng(seed)
    z, y, x = np.indices(SHAPE)
    brain = ((z - 10) / 9.0) ** 2 + ((y - 16) / 14.0) ** 2 + ((x - 16) / 14.0) ** 2 <= 1.0
    lesion = ((z - 10) ** 2 + (y - 12) ** 2 + (x - 19) ** 2 <= 9) & brain
    volume = rng.normal(size=(4, *SHAPE)).astype(np.float32)
    volume[0][lesion] += 3.0  # FLAIR hyperintensity
    volume[:, ~brain] = 0.0
    return volume, brain, lesion


def test_flair_zscore_finds_bright_blob():
    volume, brain, lesion = _phantom()
    score = flair_zscore(volume, brain)
    assert score.shape == SHAPE and score.dtype == np.float32
    inside = score[brain]
    assert abs(inside.mean()) < 1e-4 and inside.std() == pytest.approx(1.0, abs=1e-4)
    assert np.all(score[~brain] == inside.min())  # background never above any brain voxel
    assert detection_metrics(score, lesion, brain).auroc > 0.95
    # Invariant to a global affine change of FLAIR inside the brain.
    shifted = volume.copy()
    shifted[0][brain] = shifted[0][brain] * 7 + 3
    np.testing.assert_allclose(flair_zscore(shifted, brain), score, atol=1e-4)


def test_median_filtering_improves_detection():
    volume, brain, lesion = _phantom(1)
    raw = detection_metrics(flair_zscore(volume, brain), lesion, brain)
    filtered = flair_zscore_filtered(volume, brain, median_size=3)
    assert filtered.shape == SHAPE and np.all(filtered[~brain] == filtered[brain].min())
    smooth = detection_metrics(filtered, lesion, brain)
    assert smooth.auroc > 0.95 and smooth.best_f1 > raw.best_f1
    np.testing.assert_array_equal(median_filter(filtered, 1), filtered)
    with pytest.raises(ValueError):
        median_filter(filtered, 4)


def test_median_filter_removes_isolated_spike():
    a = np.zeros((5, 5, 5), np.float32)
    a[2, 2, 2] = 100.0
    assert median_filter(a, 3).max() == 0.0


def test_remove_small_components():
    binary = np.zeros((10, 10, 10), bool)
    binary[1:4, 1:4, 1:4] = True  # 27 voxels
    binary[7, 7, 7:9] = True  # 2 voxels
    binary[5, 5, 5] = binary[6, 6, 6] = True  # diagonal pair: 2 components of 1 face-connected
    kept = remove_small_components(binary, 5)
    assert kept.sum() == 27 and kept[1:4, 1:4, 1:4].all()
    assert remove_small_components(binary, 2).sum() == 29
    assert remove_small_components(binary, 2, fully_connected=True).sum() == 31
    np.testing.assert_array_equal(remove_small_components(binary, 0), binary)
    assert not remove_small_components(np.zeros((3, 3), bool), 4).any()


def test_the_label_leaves_out_small_regions_and_the_score_keeps_them():
    """postprocess.anomaly_label, the label of every map at a threshold (predict, the study, the Slicer slider)."""
    volume, brain, lesion = _phantom(2)
    volume[0][10, 25, 8] = 10.0  # isolated hot voxel (survives the size-1 median)
    score = flair_zscore_filtered(volume, brain, median_size=1)
    assert score[10, 25, 8] >= 2.0
    label = anomaly_label(score, brain, 2.0, 10)
    assert not label[10, 25, 8] and label[lesion].mean() > 0.5
    np.testing.assert_array_equal(label, remove_small_components((score >= 2.0) & brain, 10))
    np.testing.assert_array_equal(anomaly_label(score, brain, 2.0), (score >= 2.0) & brain)
    # The voxel count follows the voxel size: 20 mm³ are 20 voxels of 1 mm³, 2 of 2 × 2 × 2 mm (2.5 rounded).
    assert component_voxels(20.0, (1.0, 1.0, 1.0)) == 20 and component_voxels(20.0, (2.0, 2.0, 2.0)) == 2
    assert component_voxels(0.0, (1.0, 1.0, 1.0)) == 1
    # Exact at a threshold between two float32 values, as the metrics are.
    edge = np.float32(0.1)
    assert anomaly_label(np.array([edge]), np.array([True]), float(edge))[0]
    assert not anomaly_label(np.array([edge]), np.array([True]), np.nextafter(float(edge), 1.0))[0]


def test_volume_input_checks():
    volume, brain, _ = _phantom()
    with pytest.raises(InputError, match="empty"):
        flair_zscore(volume, np.zeros(SHAPE, bool))
    constant = volume.copy()
    constant[0] = 1.0
    with pytest.raises(InputError, match="constant"):
        flair_zscore(constant, brain)
    with pytest.raises(ValueError):
        flair_zscore(volume[:3], brain)
    with pytest.raises(ValueError):
        flair_zscore(volume, brain[:-1])


def _normal_features(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    mix = np.array([[1.0, 0.5, 0.2, 0.0], [0.0, 1.0, 0.3, 0.1], [0.0, 0.0, 1.0, 0.4], [0.0, 0.0, 0.0, 1.0]])
    return (rng.normal(size=(n, 4)) @ mix).astype(np.float32)


def test_mahalanobis_ranks_outlier_first_and_matches_formula():
    train = _normal_features(5000)
    model = MahalanobisBaseline().fit(train)
    test = np.vstack([_normal_features(500, seed=1), [[6.0, -6.0, 6.0, -6.0]]]).astype(np.float32)
    scores = model.score(test)
    assert scores.dtype == np.float32 and np.argmax(scores) == 500
    cov = np.cov(train.T.astype(np.float64), bias=True)
    d = test[:3].astype(np.float64) - train.mean(0, dtype=np.float64)
    expected = np.sqrt(np.einsum("ij,jk,ik->i", d, np.linalg.inv(cov), d))
    np.testing.assert_allclose(scores[:3], expected, rtol=1e-4)
    small_chunks = MahalanobisBaseline(chunk_size=7).fit(train).score(test)
    np.testing.assert_allclose(small_chunks, scores, rtol=1e-6)
    assert np.argmax(MahalanobisBaseline("ledoit_wolf").fit(train).score(test)) == 500
    with pytest.raises(TrainingDataError):
        MahalanobisBaseline().fit(train[:1])
    with pytest.raises(ValueError):
        MahalanobisBaseline().fit(train[:, :3])
    with pytest.raises(RuntimeError):
        MahalanobisBaseline().score(test)


def test_ocsvm_ranks_outlier_first_and_chunks():
    train = _normal_features(3000)
    model = OCSVMBaseline(max_train=1000, chunk_size=97).fit(train)
    assert model.n_support >= 1
    assert model.model_.fit_status_ == 0 and model.model_.n_features_in_ == 4
    test = np.vstack([_normal_features(300, seed=2), [[6.0, -6.0, 6.0, -6.0]]]).astype(np.float32)
    scores = model.score(test)
    assert np.argmax(scores) == 300 and scores[300] > 0
    np.testing.assert_allclose(scores, -model.model_.decision_function(test.astype(np.float64)), rtol=1e-5, atol=1e-6)
    with pytest.raises(RuntimeError):
        OCSVMBaseline().score(test)


def test_score_volume_and_feature_round_trip():
    volume, brain, lesion = _phantom(3)
    features = brain_features(volume, brain)
    assert features.shape == (brain.sum(), 4)
    np.testing.assert_array_equal(features_to_volume(features[:, 0], brain)[brain], volume[0][brain])
    normal = features[~lesion[brain]]
    score = MahalanobisBaseline().fit(normal).score_volume(volume, brain)
    assert score.shape == SHAPE and detection_metrics(score, lesion, brain).auroc > 0.9
