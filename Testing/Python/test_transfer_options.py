"""Options that make scores and thresholds carry over between sites: robust intensity normalisation,
histogram standardisation, the FLAIR term's own normalisation and its left-right asymmetry,
mm-sized median filtering and the per-case robust standardisation of the score."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import SimpleITK as sitk

from ADMAnomalyLib.cases import case_from_images
from ADMAnomalyLib.config import CONTRASTS, ADMConfig, PostprocessConfig, PreprocessConfig
from ADMAnomalyLib.postprocess import (MidSagittalPlane, add_intensity_term, box_maximum, intensity_asymmetry,
                                      left_right_axis, load_offset, median_filter, median_filter_in_brain,
                                      median_window, mid_sagittal_plane, midline_shift, mirror, mirror_overlaps, normal_tissue,
                                      postprocess_energy, postprocess_scores, sheet_response, slice_axis, smooth_in_brain,
                                      symmetric_eigenvalues,
                                      signed_distance_mm, standardise_in_brain, shared_hyperintensity, suppress_rim, t2_term)
from ADMAnomalyLib.preprocess import n4_fit_shrink, normalisation_statistics, prepare_case, standardise_histogram
from conftest import synthetic_volumes


def _case_with_lesion(scale: float, lesion_radius: int):
    """A synthetic case whose FLAIR lesion has the given radius (voxels); intensities times ``scale``."""
    volumes, _ = synthetic_volumes((48, 48, 40), False, 0)  # (x, y, z): arrays are (40, 48, 48)
    z, y, x = np.ogrid[:40, :48, :48]
    lesion = (z - 20) ** 2 + (y - 24) ** 2 + (x - 20) ** 2 <= lesion_radius ** 2
    volumes["flair"] = np.where(lesion, volumes["flair"].max() * 1.5, volumes["flair"]).astype(np.float32)
    images = {}
    for key, array in volumes.items():
        image = sitk.GetImageFromArray((array * scale).astype(np.float32))
        images[key] = image
    label = sitk.GetImageFromArray(lesion.astype(np.uint8))
    return case_from_images(images, label=label, case_id=f"lesion{lesion_radius}")


def _normal_tissue_median(normalisation: str, lesion_radius: int) -> float:
    prepared = prepare_case(_case_with_lesion(1.0, lesion_radius),
                            PreprocessConfig(image_size=32, min_brain_pixels=8, normalisation=normalisation),
                            keep_native=("flair",))
    flair = prepared.native_zscored["flair"]
    normal = prepared.native_brain & ~prepared.native_lesion
    return float(np.median(flair[normal]))


def test_robust_normalisation_keeps_normal_tissue_in_place_when_the_lesion_grows():
    moved = {method: abs(_normal_tissue_median(method, 12) - _normal_tissue_median(method, 2))
             for method in ("zscore", "robust")}
    # A lesion of ~7000 voxels drags the mean and inflates the SD; median and IQR barely move.
    assert moved["zscore"] > 0.1
    assert moved["robust"] < moved["zscore"] / 3


def test_robust_statistics_and_their_fallbacks():
    values = np.random.default_rng(0).normal(10.0, 2.0, 200_000)
    centre, scale = normalisation_statistics(values, "robust")
    assert centre == pytest.approx(10.0, abs=0.02) and scale == pytest.approx(2.0, rel=0.02)
    mostly_one_value = np.r_[np.zeros(900), np.arange(100.0)]
    assert normalisation_statistics(mostly_one_value, "robust")[1] == pytest.approx(mostly_one_value.std())
    with pytest.raises(ValueError, match="normalisation"):
        normalisation_statistics(values, "percentile")


def test_normalisation_makes_the_network_input_independent_of_a_site_gain():
    cfg = PreprocessConfig(image_size=32, min_brain_pixels=8, normalisation="robust")
    a = prepare_case(_case_with_lesion(1.0, 4), cfg)
    b = prepare_case(_case_with_lesion(3.7, 4), cfg)
    np.testing.assert_allclose(a.slices, b.slices, atol=1e-4)


LANDMARKS = (10.0, 25.0, 50.0, 75.0, 90.0)
NORMAL_QUANTILES = (-1.2816, -0.6745, 0.0, 0.6745, 1.2816)


def test_histogram_standardisation_matches_the_landmarks_of_differently_shaped_histograms():
    rng = np.random.default_rng(0)
    skewed = rng.gamma(2.0, 1.0, 200_000)  # one site's long right tail
    squeezed = np.sqrt(skewed) * 40 + 7  # another site's monotone distortion of the same tissue
    for values in (skewed, squeezed):
        mapped = standardise_histogram(values, values, LANDMARKS)
        assert mapped.dtype == np.float32
        np.testing.assert_allclose(np.percentile(mapped, LANDMARKS), NORMAL_QUANTILES, atol=2e-3)
    # Robust z-scoring aligns only the median and the IQR: the outer landmarks stay apart.
    robust = [(v - c) / s for v in (skewed, squeezed) for c, s in [normalisation_statistics(v, "robust")]]
    assert abs(np.percentile(robust[0], 90) - np.percentile(robust[1], 90)) > 0.1


def test_histogram_standardisation_keeps_the_robust_scale_in_the_tails_and_stays_monotone():
    rng = np.random.default_rng(1)
    normal_tissue = rng.normal(100.0, 10.0, 100_000)
    spike = np.full(40_000, 90.0)  # one value shared by a quarter of the voxels, across two landmarks
    values = np.r_[normal_tissue, spike]
    _, scale = normalisation_statistics(values, "robust")
    mapped = standardise_histogram(values, values, LANDMARKS)
    order = np.argsort(values, kind="stable")
    assert np.all(np.diff(mapped[order]) >= 0)
    top = np.percentile(values, 90)
    lesion = np.array([top + 30.0, top + 60.0])
    tail = standardise_histogram(lesion, values, LANDMARKS)
    assert tail[1] - tail[0] == pytest.approx(30.0 / scale, rel=1e-5)
    # A normal histogram comes out as robust z-scoring leaves it.
    centre, spread = normalisation_statistics(normal_tissue, "robust")
    np.testing.assert_allclose(standardise_histogram(normal_tissue, normal_tissue, LANDMARKS),
                               (normal_tissue - centre) / spread, atol=0.03)


@pytest.mark.parametrize("overrides, message", [
    ({"histogram_landmarks": (50.0, 10.0)}, "histogram_landmarks"),
    ({"histogram_landmarks": (0.0, 50.0)}, "histogram_landmarks"),
    ({"histogram_landmarks": (50.0,)}, "histogram_landmarks"),
    ({"normalisation": "percentile"}, "preprocess.normalisation"),
    ({"native_normalisation": "minmax"}, "preprocess.native_normalisation"),
    ({"native_bias_correction_levels": -1}, "preprocess.native_bias_correction_levels"),
    ({"native_bias_correction_levels": 5}, "preprocess.native_bias_correction_levels"),
    ({"native_bias_correction_levels": 1.5}, "preprocess.native_bias_correction_levels"),
    ({"native_bias_correction_levels": True}, "preprocess.native_bias_correction_levels"),
    ({"bias_correction_levels": 5}, "preprocess.bias_correction_levels"),
    ({"bias_correction_levels": False}, "preprocess.bias_correction_levels"),
    ({"bias_correction_levels": 2, "native_bias_correction_levels": 1}, "cannot differ"),
])
def test_preprocess_config_refuses_unknown_normalisations_and_bad_landmarks(overrides, message):
    with pytest.raises(ValueError, match=message):
        PreprocessConfig(**overrides)
    with pytest.raises(ValueError, match=message):
        ADMConfig.from_dict({"preprocess": overrides})


def test_histogram_normalisation_prepares_a_case_and_survives_the_config_round_trip():
    cfg = PreprocessConfig(image_size=32, min_brain_pixels=8, normalisation="histogram")
    assert ADMConfig.from_dict(ADMConfig(preprocess=cfg).to_dict()).preprocess == cfg
    prepared = prepare_case(_case_with_lesion(1.0, 4), cfg)
    flair = prepared.native_zscored["flair"][prepared.native_brain]
    np.testing.assert_allclose(np.percentile(flair, LANDMARKS), NORMAL_QUANTILES, atol=0.02)
    # The same case from a site with another gain lands on the same network input.
    np.testing.assert_allclose(prepare_case(_case_with_lesion(3.7, 4), cfg).slices, prepared.slices, atol=1e-4)


def test_the_flair_term_can_be_normalised_apart_from_the_network_input():
    case = _case_with_lesion(1.0, 12)
    base = PreprocessConfig(image_size=32, min_brain_pixels=8, normalisation="robust")
    robust = prepare_case(case, base)
    split = prepare_case(case, PreprocessConfig(image_size=32, min_brain_pixels=8, normalisation="robust",
                                                native_normalisation="zscore"))
    zscored = prepare_case(case, PreprocessConfig(image_size=32, min_brain_pixels=8))
    np.testing.assert_array_equal(split.slices, robust.slices)
    assert split.zscore == robust.zscore
    np.testing.assert_array_equal(split.native_zscored["flair"], zscored.native_zscored["flair"])
    assert not np.allclose(split.native_zscored["flair"], robust.native_zscored["flair"])
    assert not split.native_zscored["flair"][~split.native_brain].any()
    # Robust and histogram share their statistics, so either can read the other's: each native FLAIR
    # is what a case prepared wholly that way gives.
    histogram = prepare_case(case, PreprocessConfig(image_size=32, min_brain_pixels=8, normalisation="histogram"))
    for network, native, expected in (("histogram", "robust", robust), ("robust", "histogram", histogram)):
        crossed = prepare_case(case, PreprocessConfig(image_size=32, min_brain_pixels=8, normalisation=network,
                                                      native_normalisation=native))
        np.testing.assert_array_equal(crossed.native_zscored["flair"], expected.native_zscored["flair"])
    assert not np.allclose(histogram.native_zscored["flair"], robust.native_zscored["flair"])


def _case_with_bias_field(strength: float, non_positive_share: float = 0.0):
    """The lesion case with FLAIR multiplied by a smooth left-right field exp(strength x (-1 .. 1)); with
    ``non_positive_share``, that share of the brain's FLAIR voxels set to a tenth of its median below zero, as
    the interpolation residue of a resampled scan (TCGA: -45 at a median of a few hundred)."""
    case = _case_with_lesion(100.0, 4)
    flair = sitk.GetArrayFromImage(case.images["flair"])
    x = np.linspace(-1.0, 1.0, flair.shape[2], dtype=np.float32)
    biased = flair * np.exp(strength * x)[None, None, :]
    if non_positive_share:
        inside = np.flatnonzero(flair > 0)
        hit = np.random.default_rng(0).choice(inside, int(non_positive_share * inside.size), replace=False)
        biased.flat[hit] = -0.1 * np.median(flair[flair > 0])
    case.images["flair"] = sitk.GetImageFromArray(biased.astype(np.float32))
    return case


def _left_right_gap(flair: np.ndarray, normal: np.ndarray) -> float:
    """How far the normal tissue's median FLAIR differs between the left and the right third."""
    third = flair.shape[2] // 3
    columns = np.arange(flair.shape[2])[None, None, :]
    left, right = normal & (columns < third), normal & (columns >= 2 * third)
    return abs(float(np.median(flair[left]) - np.median(flair[right])))


@pytest.mark.parametrize("non_positive_share", [0.0, 0.01])
def test_the_flair_term_can_be_bias_corrected_apart_from_the_network_input(non_positive_share):
    case = _case_with_bias_field(0.4, non_positive_share)
    base = PreprocessConfig(image_size=32, min_brain_pixels=8, normalisation="robust")
    plain = prepare_case(case, base)
    corrected_config = PreprocessConfig(image_size=32, min_brain_pixels=8, normalisation="robust",
                                        native_bias_correction_levels=2)
    corrected = prepare_case(case, corrected_config)
    # The network input is as trained; only the native FLAIR the post-processing reads is corrected.
    np.testing.assert_array_equal(corrected.slices, plain.slices)
    kept = ("flair", "t1", "t2")
    all_kept = prepare_case(case, corrected_config, keep_native=kept)
    for name in ("t1", "t2"):  # what the T2 term reads stays uncorrected (each N4 costs seconds in predict)
        np.testing.assert_array_equal(all_kept.native_zscored[name],
                                      prepare_case(case, base, keep_native=kept).native_zscored[name])
    assert corrected.zscore == plain.zscore
    normal = plain.native_brain & ~plain.native_lesion
    if non_positive_share:  # the residue voxels are no tissue: leave them out of the comparison
        normal &= sitk.GetArrayFromImage(case.images["flair"]) > 0
    before = _left_right_gap(plain.native_zscored["flair"], normal)
    after = _left_right_gap(corrected.native_zscored["flair"], normal)
    # A single non-positive voxel in N4's mask would flatten its field: the residue must not stop it.
    assert before > 0.5 and after < before / 3
    assert not corrected.native_zscored["flair"][~corrected.native_brain].any()
    # The lesion stays the brightest tissue: two fitting levels do not absorb it into the field.
    lesion = corrected.native_zscored["flair"][corrected.native_lesion]
    assert np.median(lesion) > np.percentile(corrected.native_zscored["flair"][normal], 99)


def test_the_network_input_can_be_bias_corrected_and_the_flair_term_reads_the_same_correction():
    case = _case_with_bias_field(0.4, 0.01)
    base = dict(image_size=32, min_brain_pixels=8, normalisation="robust")
    plain = prepare_case(case, PreprocessConfig(**base))
    native_only = prepare_case(case, PreprocessConfig(**base, native_bias_correction_levels=2))
    corrected = prepare_case(case, PreprocessConfig(**base, bias_correction_levels=2))
    # The network input is corrected: the FLAIR channel's left-right gap shrinks as the native FLAIR's does.
    flair = CONTRASTS.index("flair")
    normal = plain.brain & ~plain.label & (plain.slices[:, flair] != 0)
    before = _left_right_gap(plain.slices[:, flair], normal)
    assert before > 0.5 and _left_right_gap(corrected.slices[:, flair], normal) < before / 3
    # The contrasts without the field move far less than FLAIR (N4 fits a mild field to any image), and
    # the FLAIR term reads the one correction the native-only option applies.
    inside = plain.brain & (plain.slices != 0).all(axis=1)
    moved = {name: float(np.median(np.abs(corrected.slices[:, i] - plain.slices[:, i])[inside]))
             for i, name in enumerate(CONTRASTS)}
    assert max(moved["t1"], moved["t1c"], moved["t2"]) < moved["flair"] / 2
    np.testing.assert_allclose(corrected.native_zscored["flair"], native_only.native_zscored["flair"], atol=1e-5)
    # Both options together mean the same as the input's alone.
    both = prepare_case(case, PreprocessConfig(**base, bias_correction_levels=2, native_bias_correction_levels=2))
    np.testing.assert_array_equal(both.native_zscored["flair"], corrected.native_zscored["flair"])


def test_n4_is_fitted_on_voxels_of_about_six_mm_whatever_the_grid():
    assert n4_fit_shrink((1.0, 1.0, 1.0), (240, 240, 155)) == [6, 6, 6]  # BraTS: 40 x 40 x 25 samples
    # A scanner's thick-slice FLAIR is shrunk in plane only; its 5.5 mm slices are fitted as they are.
    assert n4_fit_shrink((0.43, 0.43, 5.5), (512, 512, 26)) == [13, 13, 1]
    assert n4_fit_shrink((3.0, 3.0, 3.0), (80, 80, 50)) == [2, 2, 2]
    # A few-slice scan keeps 8 samples along its short axis.
    assert n4_fit_shrink((1.0, 1.0, 1.0), (48, 48, 20)) == [6, 6, 2]


def test_bias_correction_leaves_an_already_normalised_image_alone(caplog):
    case = _case_with_lesion(1.0, 4)
    flair = sitk.GetArrayFromImage(case.images["flair"])
    brain = flair != 0
    zscored = np.where(brain, (flair - flair[brain].mean()) / flair[brain].std() - 1.0, 0).astype(np.float32)
    case.images["flair"] = sitk.GetImageFromArray(zscored)
    cfg = PreprocessConfig(image_size=32, min_brain_pixels=8)
    plain = prepare_case(case, cfg)
    with caplog.at_level("WARNING"):
        corrected = prepare_case(case, PreprocessConfig(image_size=32, min_brain_pixels=8,
                                                        native_bias_correction_levels=2))
    np.testing.assert_allclose(corrected.native_zscored["flair"], plain.native_zscored["flair"], atol=1e-6)
    assert "no bias-field correction" in caplog.text


def test_median_window_is_sized_in_mm_per_axis():
    assert median_window((1.0, 1.0, 1.0), 5) == (5, 5, 5)
    assert median_window((1.0, 1.0, 1.0), 3) == (3, 3, 3)
    # thick slices: never filter across a 5.5 mm slice for a 5 mm window
    assert median_window((0.9, 0.9, 5.5), 5) == (1, 5, 5)
    assert median_window((1.0, 1.0, 1.0), 0.5) == (1, 1, 1)


def test_mm_median_keeps_a_lesion_on_thick_slices_that_a_cubic_window_erases():
    scores = np.zeros((9, 20, 20), np.float32)
    scores[4, 8:12, 8:12] = 10.0  # a lesion on a single thick slice
    brain = np.ones_like(scores, bool)
    cfg = PostprocessConfig(median_size_mm=3.0)
    thick = postprocess_scores(scores, brain, (1.0, 1.0, 5.5), cfg)
    assert thick[4, 9, 9] == pytest.approx(10.0)
    cubic = median_filter(scores, 3)
    assert cubic[4, 9, 9] == 0.0
    with pytest.raises(ValueError, match="odd"):
        median_filter(scores, (3, 2, 3))


@pytest.mark.parametrize("size", [5, (1, 5, 5), (3, 1, 5)])
def test_brain_only_median_equals_the_whole_volume_filter_at_brain_voxels(size):
    rng = np.random.default_rng(3)
    scores = rng.standard_normal((12, 30, 40)).astype(np.float32)
    brain = rng.random(scores.shape) > 0.4
    filled = np.where(brain, scores, scores[brain].min())
    expected = np.where(brain, median_filter(filled, size), scores)
    np.testing.assert_array_equal(median_filter_in_brain(scores, brain, size), expected)
    with pytest.raises(ValueError, match="odd"):
        median_filter_in_brain(scores, brain, 4)


def test_robust_standardisation_makes_a_threshold_carry_over_between_scales():
    rng = np.random.default_rng(1)
    brain = np.ones((10, 30, 30), bool)
    energy = rng.normal(0.0, 1.0, brain.shape).astype(np.float32)
    energy[4:6, 10:14, 10:14] += 8.0
    site_b = 37.0 + 4.5 * energy  # another site: same anatomy, other energy scale and offset
    a, b = standardise_in_brain(energy, brain), standardise_in_brain(site_b, brain)
    np.testing.assert_allclose(a, b, atol=1e-3)
    assert np.median(a) == pytest.approx(0.0, abs=1e-3)
    # the lesion (32 voxels of 9000) does not move the scale: typical tissue has robust SD 1
    assert 1.4826 * np.median(np.abs(a - np.median(a))) == pytest.approx(1.0, abs=1e-3)


def test_standardise_is_the_last_step_and_checked():
    brain = np.zeros((8, 16, 16), bool)
    brain[1:7, 2:14, 2:14] = True
    scores = np.random.default_rng(2).normal(5.0, 2.0, brain.shape).astype(np.float32)
    out = postprocess_scores(scores, brain, (1.0, 1.0, 1.0),
                             PostprocessConfig(median_size_mm=3.0, standardise="robust"))
    assert np.median(out[brain]) == pytest.approx(0.0, abs=1e-4)
    assert out[~brain].max() < out[brain].min()
    with pytest.raises(ValueError, match="standardise"):
        postprocess_scores(scores, brain, (1.0, 1.0, 1.0), PostprocessConfig(standardise="minmax"))


def test_model_files_with_a_voxel_median_size_load_as_mm():
    config = ADMConfig.from_dict({"postprocess": {"median_size": 5, "flair_weight": 2.0}})
    assert config.postprocess.median_size_mm == 5.0
    assert config.postprocess.native_active


def test_energy_gate_lets_the_energy_raise_only_flair_hyperintense_voxels():
    brain = np.ones((4, 20, 20), bool)
    energy = np.zeros(brain.shape, np.float32)
    flair = np.zeros(brain.shape, np.float32)
    energy[1, 2:5, 2:5] = 10.0  # energy-only hot spot, e.g. CSF or a tissue boundary
    energy[2, 10:14, 10:14] = 10.0  # a lesion: high energy and FLAIR-hyperintense
    flair[2, 10:14, 10:14] = 2.0
    energy[3, 15:18, 15:18] = -5.0  # low energy stays low wherever it is
    open_map = postprocess_scores(energy, brain, (1.0, 1.0, 1.0), PostprocessConfig(flair_weight=1.0), flair)
    gated = postprocess_scores(energy, brain, (1.0, 1.0, 1.0), PostprocessConfig(flair_weight=1.0, energy_gate_z=0.5),
                               flair)
    assert open_map[1, 3, 3] > open_map[0, 0, 0] and gated[1, 3, 3] == pytest.approx(gated[0, 0, 0])
    assert gated[2, 12, 12] == pytest.approx(open_map[2, 12, 12])
    assert gated[3, 16, 16] == pytest.approx(open_map[3, 16, 16]) and gated[3, 16, 16] < gated[0, 0, 0]
    # the gate alone (weight 0) is a FLAIR-gated energy and still needs the FLAIR
    assert PostprocessConfig(energy_gate_z=0.0).native_active
    with pytest.raises(ValueError, match="FLAIR"):
        postprocess_scores(energy, brain, (1.0, 1.0, 1.0), PostprocessConfig(energy_gate_z=0.0))
    # A gate given as an int (`--set postprocess.energy_gate_z=0`) is the same gate; one that is no finite number is refused.
    assert PostprocessConfig(energy_gate_z=0) == PostprocessConfig(energy_gate_z=0.0)
    assert isinstance(PostprocessConfig(energy_gate_z=0).energy_gate_z, float)
    for bad in ("0", float("nan"), float("inf"), True):
        with pytest.raises(ValueError, match="energy_gate_z"):
            PostprocessConfig(energy_gate_z=bad)


def _balls(centres, radius: int, shape=(40, 48, 48), seed: int = 0) -> np.ndarray:
    """Low noise with bright balls of ``radius`` voxels at ``centres``."""
    z, y, x = np.ogrid[: shape[0], : shape[1], : shape[2]]
    values = np.random.default_rng(seed).normal(0.0, 0.3, shape).astype(np.float32)
    for cz, cy, cx in centres:
        values[(z - cz) ** 2 + (y - cy) ** 2 + (x - cx) ** 2 <= radius ** 2] = 5.0
    return values


def test_a_case_with_only_small_regions_is_scored_without_the_filters_that_erase_them():
    brain = np.ones((40, 48, 48), bool)
    spacing = (1.0, 1.0, 1.0)
    coarse = PostprocessConfig(smoothing_sigma_mm=2.0, median_size_mm=5.0, standardise="zscore",
                               final_smoothing_sigma_mm=1.0)
    adaptive = dataclasses.replace(coarse, small_lesion_ml=1.0)
    fine = dataclasses.replace(coarse, smoothing_sigma_mm=0.0, median_size_mm=0.0)
    # Three lesions of radius 2 (33 voxels, 0.03 ml, below 1 ml at the level 2): scored without the smoothing
    # and the median filter, and so otherwise than with them.
    small = _balls([(12, 14, 14), (20, 30, 30), (28, 14, 34)], 2)
    kept = postprocess_scores(small, brain, spacing, adaptive)
    np.testing.assert_array_equal(kept, postprocess_scores(small, brain, spacing, fine))
    assert np.abs(kept - postprocess_scores(small, brain, spacing, coarse)).max() > 1.0
    # One lesion of radius 8 (2.1 ml, above 1 ml at the level 2): the case keeps the filters it was given.
    large = _balls([(20, 24, 24)], 8)
    np.testing.assert_array_equal(postprocess_scores(large, brain, spacing, adaptive),
                                  postprocess_scores(large, brain, spacing, coarse))
    # A level above every score leaves no region at all, so even the large lesion's case is scored fine.
    np.testing.assert_array_equal(
        postprocess_scores(large, brain, spacing, dataclasses.replace(adaptive, small_lesion_level=1e6)),
        postprocess_scores(large, brain, spacing, fine))
    for bad in ({"small_lesion_ml": -1.0}, {"small_lesion_ml": float("nan")}, {"small_lesion_level": float("inf")}):
        with pytest.raises(ValueError, match="small_lesion"):
            PostprocessConfig(**bad)


def test_a_case_scored_for_its_small_lesions_may_drop_the_load_term_and_only_that_case():
    brain = np.ones((40, 48, 48), bool)
    spacing = (1.0, 1.0, 1.0)
    loaded = PostprocessConfig(smoothing_sigma_mm=2.0, median_size_mm=5.0, standardise="zscore",
                               final_smoothing_sigma_mm=1.0, load_weight=0.5, small_lesion_ml=1.0)
    unloaded = dataclasses.replace(loaded, small_lesion_load="never")
    fine = dataclasses.replace(loaded, smoothing_sigma_mm=0.0, median_size_mm=0.0)
    small = _balls([(12, 14, 14), (20, 30, 30), (28, 14, 34)], 2)
    # The small lesions' case: scored fine in both, with the load term in one and without it in the other, so the
    # two differ by the load term's constant over the brain (its share above the reference is not 1 %).
    with_load = postprocess_scores(small, brain, spacing, loaded)
    np.testing.assert_array_equal(with_load, postprocess_scores(small, brain, spacing, fine))
    without_load = postprocess_scores(small, brain, spacing, unloaded)
    np.testing.assert_array_equal(without_load, postprocess_scores(
        small, brain, spacing, dataclasses.replace(fine, load_weight=0.0)))
    shift = with_load - without_load
    assert abs(float(shift.mean())) > 0.05 and float(shift.max() - shift.min()) < 1e-4
    # The large lesion's case keeps its filters and its load term either way.
    large = _balls([(20, 24, 24)], 8)
    np.testing.assert_array_equal(postprocess_scores(large, brain, spacing, unloaded),
                                  postprocess_scores(large, brain, spacing, loaded))
    # 'thin' scores the grid it is given as 'always' does: predict_case makes it 'never' on slices made from thick ones.
    thin = dataclasses.replace(loaded, small_lesion_load="thin")
    np.testing.assert_array_equal(postprocess_scores(small, brain, spacing, thin), with_load)
    for bad in (False, True, "false", None):
        with pytest.raises(ValueError, match="small_lesion_load"):
            PostprocessConfig(small_lesion_load=bad)


def test_zscore_standardisation_gives_mean_0_sd_1_over_the_brain():
    rng = np.random.default_rng(4)
    brain = rng.random((6, 20, 20)) > 0.3
    scores = rng.gamma(2.0, 3.0, brain.shape).astype(np.float32)
    out = standardise_in_brain(scores, brain, "zscore")
    assert out[brain].mean() == pytest.approx(0.0, abs=1e-5) and out[brain].std() == pytest.approx(1.0, abs=1e-4)
    np.testing.assert_array_equal(out[~brain], scores[~brain])
    with pytest.raises(ValueError, match="zscore"):
        postprocess_scores(scores, brain, (1.0, 1.0, 1.0), PostprocessConfig(standardise="minmax"))


def test_normal_tissue_standardisation_ignores_the_lesion_size():
    """Scaled on the FLAIR-normal voxels, a brain's typical tissue reads the same whether it holds a
    small lesion or a large one; the whole-brain z-score moves with the lesion's size."""
    rng = np.random.default_rng(5)
    brain = np.ones((10, 30, 30), bool)
    tissue = rng.normal(0.0, 1.0, brain.shape).astype(np.float32)
    flair = rng.normal(0.0, 0.3, brain.shape).astype(np.float32)
    reads = {}
    for size in (2, 12):  # lesion edge in voxels: ~0.1 % and ~16 % of the brain
        scores, lesion_flair = tissue.copy(), flair.copy()
        scores[2:2 + min(size, 8), 5:5 + size, 5:5 + size] = 8.0
        lesion_flair[2:2 + min(size, 8), 5:5 + size, 5:5 + size] = 3.0
        reference = normal_tissue(brain, lesion_flair, 1.0)
        normal = standardise_in_brain(scores, brain, "normal", reference)
        whole = standardise_in_brain(scores, brain, "zscore")
        reads[size] = (normal[9, 25, 25], whole[9, 25, 25])
    assert reads[2][0] == pytest.approx(reads[12][0], abs=0.02)
    assert abs(reads[2][1] - reads[12][1]) > 0.1
    # through the composition the FLAIR z-score is an input; without it a clear error
    config = PostprocessConfig(standardise="normal")
    assert config.needs_flair and not config.intensity_term
    out = postprocess_scores(scores, brain, (1.0, 1.0, 1.0), config, lesion_flair)
    np.testing.assert_allclose(out, standardise_in_brain(scores, brain, "normal", reference), atol=1e-6)
    with pytest.raises(ValueError, match="FLAIR"):
        postprocess_scores(scores, brain, (1.0, 1.0, 1.0), config)
    with pytest.raises(ValueError, match="reference"):
        standardise_in_brain(scores, brain, "normal")
    # when most of the brain is FLAIR-bright nothing looks typical: the whole brain is the reference
    assert normal_tissue(brain, np.full(brain.shape, 2.0, np.float32), 1.0).all()


def test_load_term_lowers_the_threshold_of_a_large_lesion_and_raises_that_of_a_small_one():
    rng = np.random.default_rng(6)
    brain = np.ones((10, 30, 30), bool)
    tissue = rng.normal(0.0, 0.3, brain.shape).astype(np.float32)
    config = PostprocessConfig(standardise="zscore", load_weight=0.4, load_reference=2.0)
    plain = PostprocessConfig(standardise="zscore")
    offsets = {}
    for size in (3, 10):  # 0.3 % and 10 % of the brain above the reference level
        scores = tissue.copy()
        scores[1:1 + min(size, 9), 5:5 + size, 5:5 + size] = 10.0
        without = postprocess_scores(scores, brain, (1.0, 1.0, 1.0), plain)
        with_load = postprocess_scores(scores, brain, (1.0, 1.0, 1.0), config)
        offset = with_load[brain] - without[brain]
        assert np.ptp(offset) < 1e-5  # one constant per case: its ranking is kept
        share = float((without[brain] >= 2.0).mean())
        assert offset[0] == pytest.approx(0.4 * np.log(share / 0.01), abs=1e-5)
        assert offset[0] == pytest.approx(load_offset(without[brain], 0.4, 2.0), abs=1e-6)
        offsets[size] = offset[0]
    assert offsets[3] < 0 < offsets[10]
    # no voxel above the reference: the share is floored, the offset finite
    assert load_offset(np.zeros(100, np.float32), 0.4, 2.0) == pytest.approx(0.4 * np.log(1e-4 / 0.01))
    with pytest.raises(ValueError, match="standardised"):
        PostprocessConfig(load_weight=0.3)
    with pytest.raises(ValueError, match=">= 0"):
        PostprocessConfig(standardise="zscore", load_weight=-0.1)


def _lateral_brain_and_flair():
    """A brain (z, y, x) = (6, 20, 30) whose mid-sagittal plane is at x = 13.5, not at the grid's 14.5;
    on FLAIR a bright pair mirrored across it 2 voxels apart in y (the hemispheres' anatomy differs
    by a little) and a one-sided bright spot."""
    brain = np.zeros((6, 20, 30), bool)
    brain[1:5, 2:18, 4:24] = True
    flair = np.zeros(brain.shape, np.float32)
    flair[2:4, 5:7, 6:8] = 3.0  # left of the pair
    flair[2:4, 7:9, 19:21] = 3.0  # its twin: x 6..7 mirrors to 20..19, 2 voxels lower in y
    flair[2:4, 12:14, 8:10] = 3.0  # one-sided, its mirror image (x 18..19) plain tissue
    return brain, flair


def test_mirror_and_midline_find_the_plane_of_an_off_centre_brain():
    brain, _ = _lateral_brain_and_flair()
    shift = midline_shift(brain, 2, 8)
    assert shift == -2  # index i meets 29 - i - 2: the plane at 13.5
    np.testing.assert_array_equal(mirror(brain, 2, shift), brain)
    values = np.arange(5.0)
    np.testing.assert_array_equal(mirror(values, 0, 1), [0.0, 4.0, 3.0, 2.0, 1.0])
    np.testing.assert_array_equal(mirror(values, 0, -2), [2.0, 1.0, 0.0, 0.0, 0.0])


def test_the_mirror_overlaps_count_what_the_mirrored_copies_share():
    """The FFT's counts are the brute-force counts of every shift, on every axis, over more lines than one block
    of spectra holds (8192), with empty lines in between."""
    rng = np.random.default_rng(3)
    for shape in ((7, 9, 11), (4, 50, 45), (100, 90, 5)):
        mask = rng.random(shape) > 0.6
        mask[:, 1] = False  # lines the FFT skips
        for axis in range(3):
            n = shape[axis]
            counts = mirror_overlaps(mask, axis)
            assert counts.shape == (2 * n - 1,)
            brute = [np.count_nonzero(mask & mirror(mask, axis, shift)) for shift in range(-n + 1, n)]
            np.testing.assert_array_equal(counts, brute)
    # a tie: one line is symmetric about 4 (shift -1), the other about 5 (shift 1); -1 is listed first
    tied = np.zeros((2, 1, 10), bool)
    tied[0, 0, 4], tied[1, 0, 5] = True, True
    tied_counts = mirror_overlaps(tied, 2)
    assert tied_counts[9 - 1] == tied_counts[9 + 1] == 1
    assert midline_shift(tied, 2, 4) == -1


def test_the_brain_gaussian_has_its_sigma_in_mm_along_every_axis():
    """A point smoothed on anisotropic voxels spreads sigma_mm / spacing voxels along each axis (spacing in
    SimpleITK's x, y, z order; the array is z, y, x), keeps its mass inside an all-brain grid, and the box
    post-processing smooths on gives the whole grid's brain voxels."""
    brain = np.ones((31, 41, 51), bool)
    point = np.zeros(brain.shape, np.float32)
    point[15, 20, 25] = 1.0
    spacing = (0.8, 1.0, 2.5)  # x, y, z
    smoothed = smooth_in_brain(point, brain, spacing, 2.0).astype(np.float64)
    assert smoothed.sum() == pytest.approx(1.0, rel=1e-4)
    grids = np.meshgrid(*[np.arange(n) for n in brain.shape], indexing="ij")
    for axis, (centre, step) in enumerate(zip((15, 20, 25), spacing[::-1])):
        variance = float((smoothed * (grids[axis] - centre) ** 2).sum())
        assert variance == pytest.approx((2.0 / step) ** 2, rel=0.02)
    small_brain = np.zeros(brain.shape, bool)
    small_brain[10:20, 12:30, 15:35] = True
    values = np.random.default_rng(0).standard_normal(brain.shape).astype(np.float32)
    whole = smooth_in_brain(values, small_brain, spacing, 2.0)
    boxed = postprocess_scores(values, small_brain, spacing, PostprocessConfig(final_smoothing_sigma_mm=2.0))
    np.testing.assert_allclose(boxed[small_brain], whole[small_brain], atol=1e-5)


def test_left_right_axis_follows_the_direction_cosines():
    assert left_right_axis((1, 0, 0, 0, 1, 0, 0, 0, 1)) == 2  # axial as SimpleITK reads it: x last
    assert left_right_axis((-1, 0, 0, 0, -1, 0, 0, 0, 1)) == 2  # RAS-stored axial
    assert left_right_axis((0, 0, 1, 1, 0, 0, 0, 1, 0)) == 0  # sagittal-first storage: x is the slice index
    assert left_right_axis((0, 0.98, 0.2, 1, 0, 0, 0, -0.2, 0.98)) == 1  # oblique, x along the second index
    assert slice_axis((1, 0, 0, 0, 1, 0, 0, 0, 1)) == 0 and slice_axis((0, 0, 1, 1, 0, 0, 0, 1, 0)) == 1


def test_box_maximum_is_the_maximum_over_the_clipped_box():
    values = np.random.default_rng(0).standard_normal((6, 9, 11)).astype(np.float32)
    for radius in ((0, 0, 0), (0, 2, 2), (1, 0, 0), (2, 2, 2), (7, 1, 3)):
        expected = np.empty_like(values)
        for index in np.ndindex(values.shape):
            box = tuple(slice(max(0, i - r), i + r + 1) for i, r in zip(index, radius))
            expected[index] = values[box].max()
        np.testing.assert_array_equal(box_maximum(values, radius), expected)


def test_intensity_asymmetry_does_not_depend_on_the_thread_count():
    # SimpleITK's box dilation returned garbage with a radius of 0, and with 8 threads on 6 slices.
    brain, flair = _lateral_brain_and_flair()
    previous = sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()
    try:
        results = []
        for threads in (1, 2, 8, 2):
            sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(threads)
            results.append([intensity_asymmetry(flair, brain, (1.0, 1.0, 1.0), w) for w in (1.0, 5.0)])
    finally:
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(previous)
    for other in results[1:]:
        for a, b in zip(results[0], other):
            np.testing.assert_array_equal(a, b)
    assert results[0][0][2, 5, 6] == pytest.approx(3.0) and results[0][1][2, 5, 6] == 0.0


def test_intensity_asymmetry_keeps_a_one_sided_lesion_and_drops_a_mirrored_pair():
    brain, flair = _lateral_brain_and_flair()
    spacing = (1.0, 1.0, 1.0)
    asymmetry = intensity_asymmetry(flair, brain, spacing, 5.0)
    assert asymmetry[2, 12, 8] == pytest.approx(3.0)  # brighter than everything near its mirror image
    assert asymmetry[2, 5, 6] == 0.0 and asymmetry[2, 7, 19] == 0.0  # each has a bright twin within 5 mm
    assert asymmetry[~brain].max() == 0.0 and asymmetry.min() == 0.0
    # an exact mirror comparison (1 voxel) misses the twin 2 voxels away
    assert intensity_asymmetry(flair, brain, spacing, 1.0)[2, 5, 6] == pytest.approx(3.0)
    # through the composition: without the term the pair and the lesion tie; with it the lesion leads
    plain = postprocess_scores(flair, brain, spacing, PostprocessConfig(flair_weight=1.0), flair)
    config = PostprocessConfig(flair_weight=1.0, asymmetry_weight=0.5)
    scored = postprocess_scores(flair, brain, spacing, config, flair)
    assert plain[2, 12, 8] == pytest.approx(plain[2, 5, 6])
    assert scored[2, 12, 8] == pytest.approx(plain[2, 12, 8] + 1.5) and scored[2, 5, 6] == pytest.approx(plain[2, 5, 6])
    # the same case stored with left-right as its first array axis gives the same map
    sagittal_first = (0, 0, 1, 1, 0, 0, 0, 1, 0)  # x is the slowest array axis
    turned = postprocess_scores(np.moveaxis(flair, 2, 0), np.moveaxis(brain, 2, 0), spacing, config,
                                np.moveaxis(flair, 2, 0), direction=sagittal_first)
    np.testing.assert_allclose(np.moveaxis(turned, 0, 2), scored, atol=1e-5)
    # an energy image carries its direction: the axis comes from it
    image = sitk.GetImageFromArray(np.moveaxis(flair, 2, 0))
    image.SetDirection(sagittal_first)
    from_image = sitk.GetArrayFromImage(postprocess_energy(image, np.moveaxis(brain, 2, 0), config,
                                                           np.moveaxis(flair, 2, 0)))
    np.testing.assert_allclose(from_image, turned, atol=1e-6)


def test_asymmetry_options_are_checked_and_need_the_flair():
    config = PostprocessConfig(asymmetry_weight=1.0)
    assert config.intensity_term and config.needs_flair and config.native_active
    brain, flair = _lateral_brain_and_flair()
    with pytest.raises(ValueError, match="asymmetry_weight"):
        postprocess_scores(flair, brain, (1.0, 1.0, 1.0), config)
    with pytest.raises(ValueError, match="asymmetry_weight"):
        PostprocessConfig(asymmetry_weight=-1.0)
    with pytest.raises(ValueError, match="asymmetry_window_mm"):
        PostprocessConfig(asymmetry_weight=1.0, asymmetry_window_mm=0.0)
    assert ADMConfig.from_dict({"postprocess": {"flair_weight": 1.0}}).postprocess.asymmetry_weight == 0.0


def test_t2_asymmetry_adds_the_one_sided_t2_and_needs_the_t2():
    """The T2 term is the FLAIR asymmetry of the native T2: a one-sided T2-bright spot gains w x its
    excess over its mirror, a T2-bright pair (CSF-like) gains nothing; without the T2 it is an error."""
    brain, flair = _lateral_brain_and_flair()
    spacing = (1.0, 1.0, 1.0)
    t2 = np.zeros_like(flair)
    t2[2, 5, 6] = t2[2, 12, 8] = t2[2, 12, 19] = 2.0  # a one-sided spot and a pair mirrored across x = 13.5
    without = PostprocessConfig(flair_weight=1.0)
    config = PostprocessConfig(flair_weight=1.0, t2_asymmetry_weight=0.5, asymmetry_window_mm=1.0)
    assert config.native_contrasts == ("flair", "t2") and without.native_contrasts == ("flair",)
    plain = postprocess_scores(flair, brain, spacing, without, flair)
    scored = postprocess_scores(flair, brain, spacing, config, flair, t2_intensity=t2)
    expected = plain + 0.5 * intensity_asymmetry(t2, brain, spacing, 1.0)
    np.testing.assert_allclose(scored[brain], expected[brain], atol=1e-6)
    assert scored[2, 5, 6] == pytest.approx(plain[2, 5, 6] + 1.0)
    assert scored[2, 12, 8] == pytest.approx(plain[2, 12, 8])
    with pytest.raises(ValueError, match="t2_asymmetry_weight"):
        postprocess_scores(flair, brain, spacing, config, flair)
    with pytest.raises(ValueError, match="t2_asymmetry_weight"):
        PostprocessConfig(t2_asymmetry_weight=-0.5)


def _weak_flair_case() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """brain, FLAIR, T1, T2 z-scores of a case whose lesion is faint on FLAIR and bright on T2, beside
    CSF that is brighter still on T2 and dark on T1, in tissue whose FLAIR and T2 spread alike."""
    rng = np.random.default_rng(3)
    shape = (6, 24, 24)
    brain = np.ones(shape, bool)
    flair, t1, t2 = (rng.normal(0.0, 0.5, shape).astype(np.float32) for _ in range(3))
    lesion, csf = np.zeros(shape, bool), np.zeros(shape, bool)
    lesion[2:4, 3:11, 3:11] = True
    csf[2:4, 14:20, 14:20] = True
    flair[lesion] += 1.0  # about grey matter's brightness: a poor FLAIR
    t2[lesion] += 2.5
    t2[csf] += 3.0
    t1[csf] -= 3.0
    flair[csf] -= 1.0
    return brain, flair, t1, t2


def test_the_t2_term_backs_a_weak_flair_with_t2_outside_csf():
    """Where the case's T2 tail outreaches its FLAIR tail, the T2 term adds T2, scaled by that gap (at
    most the weight), on tissue whose T1 is not CSF-dark: the faint-on-FLAIR lesion rises above the
    brightest percent of normal tissue, while the T2-bright CSF gains nothing. A case whose FLAIR shows
    its lesion as well as its T2 does is left exactly as it was."""
    brain, flair, t1, t2 = _weak_flair_case()
    spacing = (1.0, 1.0, 1.0)
    lesion = np.zeros_like(brain)
    lesion[2:4, 3:11, 3:11] = True
    csf = t1 < -1.5
    term, case_weight = t2_term(flair, t1, t2, brain, 1.0, -1.0)

    def brain_z(values):
        return (values - values[brain].mean()) / values[brain].std()

    tissue = brain_z(t1) > -1.0
    gap = np.percentile(brain_z(t2)[tissue], 99) - np.percentile(brain_z(flair)[tissue], 99)
    assert 0 < gap < 1 and case_weight == pytest.approx(gap, rel=1e-4)
    np.testing.assert_allclose(term[tissue], case_weight * t2[tissue], rtol=1e-6)
    assert not term[csf].any()
    assert t2_term(flair, t1, t2, brain, 0.5, -1.0)[1] == pytest.approx(0.5 * gap, rel=1e-4)
    # Whatever units the contrasts come in (median/IQR, or raw scanner values), the gate and the gap are
    # read on the same brain z-scores; the term is in T2's own units, those of the FLAIR term it joins.
    rescaled_t2 = 7.0 * t2 + 300.0
    rescaled_term, rescaled_weight = t2_term(2.5 * flair - 4.0, 0.3 * t1 + 9.0, rescaled_t2, brain, 1.0, -1.0)
    assert rescaled_weight == pytest.approx(case_weight, rel=1e-4)
    np.testing.assert_allclose(rescaled_term[tissue], rescaled_weight * rescaled_t2[tissue], rtol=1e-6)
    assert not rescaled_term[~tissue].any()
    without = PostprocessConfig(flair_weight=1.0)
    config = PostprocessConfig(flair_weight=1.0, t2_weight=1.0)
    assert config.native_contrasts == ("flair", "t1", "t2") and config.intensity_term
    plain = postprocess_scores(flair, brain, spacing, without, flair)
    scored = postprocess_scores(flair, brain, spacing, config, flair, t2_intensity=t2, t1_intensity=t1)
    np.testing.assert_allclose(scored[brain], (plain + term)[brain], atol=1e-5)
    normal = brain & ~lesion
    assert np.median(plain[lesion]) < np.percentile(plain[normal], 99)
    assert np.median(scored[lesion]) > np.percentile(scored[normal], 99)
    assert scored[csf].max() == pytest.approx(plain[csf].max(), abs=1e-5)
    # A case whose FLAIR lifts the lesion as high as its T2 does gets no term at all.
    strong = flair + 3.0 * lesion
    assert t2_term(strong, t1, t2, brain, 1.0, -1.0)[1] == 0.0
    np.testing.assert_array_equal(
        postprocess_scores(strong, brain, spacing, config, strong, t2_intensity=t2, t1_intensity=t1),
        postprocess_scores(strong, brain, spacing, without, strong))
    with pytest.raises(ValueError, match="t2_weight"):
        postprocess_scores(flair, brain, spacing, config, flair, t2_intensity=t2)
    with pytest.raises(ValueError, match="t2_weight"):
        PostprocessConfig(t2_weight=-1.0)


def test_the_shared_hyperintensity_raises_what_is_bright_on_flair_and_t2_alike():
    """The term adds w x max(min(FLAIR, T2), 0): a lesion bright on both contrasts gains its smaller brightness,
    grey-matter-like tissue bright on FLAIR alone and CSF bright on T2 alone gain nothing, dark tissue loses nothing.
    It reads the T2, and the FLAIR the FLAIR term reads; without the T2 it is an error."""
    brain, flair, t1, t2 = _weak_flair_case()
    spacing = (1.0, 1.0, 1.0)
    flair_only = np.zeros_like(brain)
    flair_only[4:6, 14:20, 3:9] = True
    flair[flair_only] += 2.0
    t2[flair_only] = 0.0
    lesion = np.zeros_like(brain)
    lesion[2:4, 3:11, 3:11] = True
    csf = t1 < -1.5
    shared = shared_hyperintensity(flair, t2)
    np.testing.assert_array_equal(shared, np.maximum(np.minimum(flair, t2), 0))
    assert not shared[flair_only].any() and shared[csf].max() < 0.5
    assert np.median(shared[lesion]) > 0.8
    without = PostprocessConfig(flair_weight=1.0)
    config = PostprocessConfig(flair_weight=1.0, shared_hyperintensity_weight=0.5)
    assert config.native_contrasts == ("flair", "t2") and config.intensity_term
    assert PostprocessConfig(shared_hyperintensity_weight=0.5).intensity_term
    plain = postprocess_scores(flair, brain, spacing, without, flair)
    scored = postprocess_scores(flair, brain, spacing, config, flair, t2_intensity=t2)
    np.testing.assert_allclose(scored[brain], (plain + 0.5 * shared)[brain], atol=1e-5)
    np.testing.assert_allclose(scored[flair_only], plain[flair_only], atol=1e-6)
    # With the FLAIR's sheets lowered, the term reads the lowered FLAIR, as the FLAIR term does.
    sheets = PostprocessConfig(flair_weight=1.0, flair_sheet_weight=1.0)
    sheets_shared = dataclasses.replace(sheets, shared_hyperintensity_weight=0.5)
    lowered = flair - sheet_response(flair, brain, spacing, sheets.sheet_sigma_mm)
    np.testing.assert_allclose(
        postprocess_scores(flair, brain, spacing, sheets_shared, flair, t2_intensity=t2)[brain],
        (postprocess_scores(flair, brain, spacing, sheets, flair) + 0.5 * shared_hyperintensity(lowered, t2))[brain],
        atol=1e-5)
    assert not np.allclose(shared_hyperintensity(lowered, t2), shared)
    # Against the FLAIR-only tissue, the lesion's margin widens by half its shared brightness.
    assert (np.median(scored[lesion]) - np.median(scored[flair_only])
            > np.median(plain[lesion]) - np.median(plain[flair_only]) + 0.4)
    with pytest.raises(ValueError, match="shared_hyperintensity_weight"):
        postprocess_scores(flair, brain, spacing, config, flair)
    with pytest.raises(ValueError, match="shared_hyperintensity_weight"):
        PostprocessConfig(shared_hyperintensity_weight=-0.5)
    assert ADMConfig.from_dict({"postprocess": {"flair_weight": 1.0}}).postprocess.shared_hyperintensity_weight == 0


def test_the_study_ties_the_t2_term_to_the_chosen_flair_weight():
    """The study's T2-term row weighs T2 as its search weighs FLAIR, in every candidate and the choice:
    a fixed weight of 1 beside a chosen FLAIR weight of 0.5 doubled the evidence the threshold was
    chosen for. Rows without the term never get one."""
    from ADMAnomalyLib.study.methods import METHODS, POST_CANDIDATES, T2_TERM_WEIGHT, tie_t2_weight
    tied_row = METHODS["ADM+ F +asym +asymE +T2gF +post+cc (z+load) N4"]
    assert tied_row.t2_per_flair_weight == T2_TERM_WEIGHT and "t2_weight" not in tied_row.postprocess
    for weight in POST_CANDIDATES["flair_weight"]:
        post = tie_t2_weight(tied_row, PostprocessConfig(flair_weight=weight, median_size_mm=3.0))
        assert post.t2_weight == T2_TERM_WEIGHT * weight and post.median_size_mm == 3.0
    plain_row = METHODS["ADM+ F +asym +asymE +post+cc (z+load) N4"]
    assert tie_t2_weight(plain_row, PostprocessConfig(flair_weight=2.0)).t2_weight == 0.0


def test_the_final_smoothing_smooths_the_combined_score_after_the_median():
    """The final Gaussian acts on the whole combined score, after the median filter and the standardisation
    (the threshold's unit is the SD of the unsmoothed score): the FLAIR term spreads into its neighbours as E
    does (the energy's own smoothing leaves FLAIR sharp), nothing leaks in from the background, and 0 leaves
    every voxel as it was."""
    brain = np.zeros((12, 24, 24), bool)
    brain[1:11, 2:22, 2:22] = True
    spacing = (1.0, 1.0, 1.5)
    energy = np.random.default_rng(7).normal(0.0, 1.0, brain.shape).astype(np.float32)
    flair = np.zeros(brain.shape, np.float32)
    flair[5:8, 9:15, 9:15] = 4.0  # a FLAIR-bright block the median keeps
    base = PostprocessConfig(flair_weight=1.0, median_size_mm=3.0)
    plain = postprocess_scores(energy, brain, spacing, base, flair)
    smoothed = postprocess_scores(energy, brain, spacing, PostprocessConfig(flair_weight=1.0, median_size_mm=3.0,
                                                                            final_smoothing_sigma_mm=1.5), flair)
    expected = smooth_in_brain(plain, brain, spacing, 1.5)
    np.testing.assert_allclose(smoothed[brain], expected[brain], atol=1e-5)
    # the block's outline is graded: just outside it the score rises, just inside it falls
    assert smoothed[6, 12, 8] > plain[6, 12, 8] + 0.5 and smoothed[6, 12, 9] < plain[6, 12, 9] - 0.5
    # the energy's own smoothing does not do this: it acts before the FLAIR term is added
    energy_only = postprocess_scores(energy, brain, spacing, PostprocessConfig(flair_weight=1.0, median_size_mm=3.0,
                                                                               smoothing_sigma_mm=1.5), flair)
    assert energy_only[6, 12, 8] < smoothed[6, 12, 8] - 0.5
    # standardised before the smoothing: in SDs of the unsmoothed score, whose SD the Gaussian would shrink
    standardised = PostprocessConfig(flair_weight=1.0, median_size_mm=3.0, standardise="zscore")
    unsmoothed = postprocess_scores(energy, brain, spacing, standardised, flair)
    then_smoothed = postprocess_scores(energy, brain, spacing, dataclasses.replace(standardised,
                                                                                   final_smoothing_sigma_mm=1.5), flair)
    np.testing.assert_allclose(then_smoothed[brain], smooth_in_brain(unsmoothed, brain, spacing, 1.5)[brain], atol=1e-5)
    assert then_smoothed[brain].std() < 0.9
    # brain-normalised: a constant score stays constant up to the brain's edge
    constant = postprocess_scores(np.full(brain.shape, 3.0, np.float32), brain, spacing,
                                  PostprocessConfig(final_smoothing_sigma_mm=2.0))
    np.testing.assert_allclose(constant[brain], 3.0, atol=1e-4)
    assert PostprocessConfig(final_smoothing_sigma_mm=1.0).native_active
    # off (the default, 0), the composition is the FLAIR term and the median alone, computed step by step here
    by_steps = median_filter_in_brain(add_intensity_term(energy, brain, flair, 1.0), brain, median_window(spacing, 3.0))
    np.testing.assert_allclose(plain[brain], by_steps[brain], atol=1e-6)
    assert not PostprocessConfig(final_smoothing_sigma_mm=0.0).native_active
    with pytest.raises(ValueError, match="final_smoothing_sigma_mm"):
        PostprocessConfig(final_smoothing_sigma_mm=-1.0)


def test_the_final_smoothing_row_chooses_the_gaussian_last():
    """The study row chooses the Gaussian of the combined score after the rest of the bundled row's search, from
    a grid whose first candidate (kept on ties) is none; its FLAIR baseline carries a fixed one."""
    from ADMAnomalyLib.study.methods import (FINAL_SMOOTHING_SIGMA_MM, METHODS, POST_CANDIDATES, StudySettings,
                                             postprocess_for)
    row = METHODS["ADM+ F +asym +asymE +T2gF +post+fsm+cc (z+load) N4"]
    bundled = METHODS["ADM+ F +asym +asymE +T2gF +post+cc (z+load) N4"]
    assert row.search == bundled.search + ("final_smoothing_sigma_mm",)
    assert POST_CANDIDATES["final_smoothing_sigma_mm"][0] == 0.0
    assert (row.t2_per_flair_weight, row.load_weights, row.native_bias_correction_levels) == (
        bundled.t2_per_flair_weight, bundled.load_weights, bundled.native_bias_correction_levels)
    baseline = postprocess_for(METHODS["FLAIR z N4 +T2g +med5 +fsm+cc"], StudySettings())
    assert baseline.final_smoothing_sigma_mm == FINAL_SMOOTHING_SIGMA_MM and baseline.median_size_mm == 5.0


def test_energy_asymmetry_lifts_the_one_sided_energy_and_needs_no_flair():
    """The energy's own asymmetry, taken after smoothing and rim suppression: an energy pair mirrored
    across the midline (grey matter, CSF) gains nothing, a one-sided spot gains w x its excess over
    its mirror; it reads no FLAIR and works before the FLAIR term standardises the energy."""
    brain, energy = _lateral_brain_and_flair()
    spacing = (1.0, 1.0, 1.0)
    config = PostprocessConfig(energy_asymmetry_weight=2.0)
    assert config.native_active and not config.needs_flair and not config.intensity_term
    scored = postprocess_scores(energy, brain, spacing, config)
    assert scored[2, 12, 8] == pytest.approx(3.0 + 2.0 * 3.0)
    assert scored[2, 5, 6] == pytest.approx(3.0) and scored[2, 7, 19] == pytest.approx(3.0)
    np.testing.assert_allclose(scored[brain], (energy + 2.0 * intensity_asymmetry(energy, brain, spacing, 5.0))[brain])
    # with the FLAIR term: the asymmetry is added to E before E is standardised and the FLAIR added
    smoothed = PostprocessConfig(smoothing_sigma_mm=1.0, rim_erosion_mm=1.0, flair_weight=1.0,
                                 energy_asymmetry_weight=0.5, standardise="zscore")
    flair = np.where(brain, np.float32(0.3), np.float32(0)).astype(np.float32)
    cache: dict = {}
    step = suppress_rim(smooth_in_brain(energy, brain, spacing, 1.0, cache), brain, spacing, 1.0, cache)
    step = step + 0.5 * intensity_asymmetry(step, brain, spacing, 5.0)
    expected = standardise_in_brain(add_intensity_term(step, brain, flair, 1.0), brain, "zscore")
    np.testing.assert_allclose(postprocess_scores(energy, brain, spacing, smoothed, flair)[brain], expected[brain],
                               atol=1e-5)
    with pytest.raises(ValueError, match="energy_asymmetry_weight"):
        PostprocessConfig(energy_asymmetry_weight=-1.0)


@pytest.mark.parametrize("spacing", [(1.0, 1.0, 1.0), (0.9, 1.1, 3.0)])
def test_the_rim_is_the_brain_within_rim_mm_of_its_edge_wherever_the_brain_lies(spacing):
    """The rim reads the distance map of the brain's box alone: the same rim as the whole grid's map, for a brain
    in the middle of its grid and for one cut by the grid's edge."""
    z, y, x = np.mgrid[:30, :40, :50].astype(float)
    inside = ((z - 15) / 12) ** 2 + ((y - 20) / 15) ** 2 + ((x - 25) / 18) ** 2 <= 1
    values = np.random.default_rng(3).normal(size=inside.shape).astype(np.float32)
    for brain in (inside, inside[:, :, 12:], inside[2:, 9:, :40]):
        scores = values[: brain.shape[0], : brain.shape[1], : brain.shape[2]]
        for rim_mm in (1.0, 2.5):
            rim = brain & (signed_distance_mm(brain, spacing) <= rim_mm + 1e-4)
            suppressed = suppress_rim(scores, brain, spacing, rim_mm)
            lowered = brain & (suppressed != scores)
            np.testing.assert_array_equal(lowered, rim & (scores != scores[brain].min()))
            assert (suppressed[rim] == scores[brain].min()).all()


def test_a_turned_head_is_mirrored_across_its_own_turned_midline():
    """A brain turned by 12 degrees in its axial slices (as a head in a scanner's grid often is): the
    plane search turns with it, so a bright pair mirrored across the brain's own midline is still
    symmetric and a one-sided spot still is not; an atlas-space brain keeps the exact voxel flip."""
    shape, spacing = (6, 64, 64), (1.0, 1.0, 1.0)
    z, y, x = np.mgrid[: shape[0], : shape[1], : shape[2]].astype(float)
    turn = np.deg2rad(12.0)
    centre = 31.5
    # coordinates in the head's own frame: u across its midline, v along it
    u = (x - centre) * np.cos(turn) + (y - centre) * np.sin(turn)
    v = -(x - centre) * np.sin(turn) + (y - centre) * np.cos(turn)
    brain = ((u / 20.0) ** 2 + (v / 27.0) ** 2 <= 1.0) & (z >= 1) & (z <= 4)
    flair = np.zeros(shape, np.float32)
    pair = (np.abs(np.abs(u) - 10) <= 1.5) & (np.abs(v + 8) <= 1.5) & brain
    spot = (np.abs(u - 10) <= 1.5) & (np.abs(v - 4) <= 1.5) & brain
    flair[pair] = 3.0
    flair[spot] = 3.0
    plane = mid_sagittal_plane(brain, spacing)
    assert plane.shift is None and abs(plane.turn_deg - 12.0) <= 2.0  # searched on a 4 mm copy of the mask
    asymmetry = intensity_asymmetry(flair, brain, spacing, 3.0)
    assert np.median(asymmetry[spot]) == pytest.approx(3.0)
    assert np.median(asymmetry[pair]) == 0.0
    # the plane of the grid would call one of the pair asymmetric as well
    grid_plane = MidSagittalPlane(2, 0, midline_shift(brain, 2, 20))
    mirrored = grid_plane.reflect(flair, spacing)
    assert float(np.median(np.maximum(flair - mirrored, 0)[pair])) > 1.0
    # untilted, the search keeps the exact flip of the grid
    level = (((x - centre) / 20.0) ** 2 + ((y - centre) / 27.0) ** 2 <= 1.0) & (z >= 1) & (z <= 4)
    assert mid_sagittal_plane(level, spacing) == MidSagittalPlane(2, 0, 0)


def test_the_closed_form_eigenvalues_are_lapacks():
    rng = np.random.default_rng(5)
    matrices = rng.normal(size=(5000, 3, 3))
    matrices = matrices + matrices.transpose(0, 2, 1)
    matrices[:10] = np.eye(3) * rng.normal(size=(10, 1, 1))  # multiples of the identity: all three equal
    matrices[10:20, 2, :] = matrices[10:20, :, 2] = 0  # one zero eigenvalue
    entries = [matrices[:, i, j] for i, j in ((0, 0), (1, 1), (2, 2), (0, 1), (0, 2), (1, 2))]
    np.testing.assert_allclose(np.stack(symmetric_eigenvalues(*entries), axis=1), np.linalg.eigvalsh(matrices),
                               atol=1e-6)


def _sheet_ball_and_block(shape=(48, 48, 48)):
    """A bright sheet 3 voxels thick turned by 30 degrees about the slice axis, a bright ball of radius 3 and a
    bright 17-voxel block, all 3 above a background of 0, in one brain."""
    z, y, x = np.mgrid[: shape[0], : shape[1], : shape[2]].astype(float)
    across = (x - 12) * np.cos(np.pi / 6) + (y - 24) * np.sin(np.pi / 6)
    sheet = (np.abs(across) <= 1.5) & (np.abs(z - 24) <= 18) & (np.abs(y - 24) <= 18)
    ball = (z - 24) ** 2 + (y - 10) ** 2 + (x - 34) ** 2 <= 9
    block = (np.abs(z - 24) <= 8) & (np.abs(y - 34) <= 8) & (np.abs(x - 34) <= 8)
    flair = np.where(sheet | ball | block, 3.0, 0.0).astype(np.float32)
    return flair, sheet, ball, block


@pytest.mark.parametrize("spacing, ball_share", [((1.0, 1.0, 1.0), 0.15), ((1.0, 1.0, 2.0), 0.4)])
def test_the_sheet_response_marks_bright_sheets_not_small_lesions_or_the_inside_of_large_ones(spacing, ball_share):
    """On 2 mm slices a ball of 3 mm radius spans three slices, too few to show its curvature through-plane in
    full: it reads as a partial sheet (up to a third of a sheet's response), as small lesions do on thick slices."""
    flair, sheet, ball, block = _sheet_ball_and_block()
    step = int(spacing[2])
    flair, sheet, ball, block = (a[::step] for a in (flair, sheet, ball, block))
    brain = np.ones(flair.shape, bool)
    response = sheet_response(flair, brain, spacing, 1.5)
    centre_of_sheet = sheet & (np.abs(np.mgrid[: flair.shape[0]][:, None, None] * step - 24) <= 6)
    inside_block = np.zeros_like(block)
    inside_block[24 // step, 31:38, 31:38] = True  # at least 5 voxels (3.3 sigma) from the block's faces
    assert np.median(response[centre_of_sheet]) > 0.8
    assert response[ball].max() < ball_share * np.median(response[centre_of_sheet])
    assert np.abs(response[inside_block]).max() < 0.02 * np.median(response[centre_of_sheet])
    # The brain's own edge is no sheet: a brain whose voxels all read 0 has no response anywhere.
    edge_brain = np.zeros(flair.shape, bool)
    edge_brain[2:-2, 6:-6, 6:-6] = True
    assert np.abs(sheet_response(np.zeros_like(flair) + 2.0 * edge_brain, edge_brain, spacing, 1.5)).max() < 1e-5


def test_the_flair_sheet_weight_lowers_the_flair_term_on_sheets_alone():
    flair, sheet, ball, block = _sheet_ball_and_block()
    brain = np.zeros(flair.shape, bool)
    brain[1:-1, 1:-1, 1:-1] = True
    energy = np.random.default_rng(2).normal(size=flair.shape).astype(np.float32)
    spacing = (1.0, 1.0, 1.0)
    plain = PostprocessConfig(flair_weight=1.0)
    without = postprocess_scores(energy, brain, spacing, plain, flair)
    np.testing.assert_array_equal(
        postprocess_scores(energy, brain, spacing, dataclasses.replace(plain, flair_sheet_weight=0.0), flair), without)
    cache: dict = {}
    with_sheets = postprocess_scores(energy, brain, spacing, dataclasses.replace(plain, flair_sheet_weight=1.0),
                                     flair, cache)
    lowered = without - with_sheets
    np.testing.assert_allclose(lowered[brain], sheet_response(flair, brain, spacing, 1.5)[brain], atol=1e-5)
    assert np.median(lowered[sheet & brain]) > 0.5
    assert lowered[ball].max() < 0.1
    # A cache that served another FLAIR gives this FLAIR's sheets, not the other's.
    blank = np.zeros_like(flair)
    again = postprocess_scores(energy, brain, spacing, dataclasses.replace(plain, flair_sheet_weight=1.0), blank, cache)
    np.testing.assert_allclose(again, postprocess_scores(energy, brain, spacing, plain, blank), atol=1e-6)
    with pytest.raises(ValueError, match="flair_sheet_weight"):
        PostprocessConfig(flair_sheet_weight=-1.0)


def test_the_score_sheet_weight_lowers_the_combined_score_on_its_own_sheets_before_the_median():
    flair, sheet, ball, block = _sheet_ball_and_block()
    brain = np.zeros(flair.shape, bool)
    brain[1:-1, 1:-1, 1:-1] = True
    spacing = (1.0, 1.0, 1.0)
    cfg = PostprocessConfig(score_sheet_weight=2.0)
    assert cfg.native_active
    lowered = flair - postprocess_scores(flair, brain, spacing, cfg)
    np.testing.assert_allclose(lowered[brain], 2.0 * sheet_response(flair, brain, spacing, 1.5)[brain], atol=1e-5)
    assert np.median(lowered[sheet & brain]) > 1.0 and lowered[ball].max() < 0.2
    # The median filter reads the lowered score: a sheet 3 voxels thick keeps less of its median than before.
    median_only = PostprocessConfig(median_size_mm=3.0)
    assert (postprocess_scores(flair, brain, spacing, dataclasses.replace(median_only, score_sheet_weight=2.0))[sheet]
            .mean() < postprocess_scores(flair, brain, spacing, median_only)[sheet].mean() - 0.5)
    with pytest.raises(ValueError, match="score_sheet_weight"):
        PostprocessConfig(score_sheet_weight=-0.5)
