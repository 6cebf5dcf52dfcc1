"""prepare_case / slices_to_image: normalisation, orientation, geometry round trip, real data."""

from __future__ import annotations

import re

import numpy as np
import pytest
import SimpleITK as sitk

from conftest import DEMO_DIR, make_synthetic_case, synthetic_volumes
from ADMAnomalyLib.cases import case_from_images, find_cases, load_case
from ADMAnomalyLib.config import CONTRASTS, PreprocessConfig
from ADMAnomalyLib.errors import InputError
from ADMAnomalyLib.preprocess import (
    native_brain_mask,
    orientation_axes,
    prepare_case,
    slices_to_image,
)

FLIP_Y = (1, 0, 0, 0, -1, 0, 0, 0, 1)  # like the MS case
# index x -> A/P, index y -> S/I, index z -> R/L: the axial axis is the middle array axis
PERMUTED = (0, 0, 1, 1, 0, 0, 0, 1, 0)


def _cfg(**kw) -> PreprocessConfig:
    return PreprocessConfig(**{"image_size": 32, "min_brain_pixels": 8, **kw})


def _images(arrays, spacing=(1.0, 1.0, 1.2), origin=(-20.0, 15.0, 5.0), direction=None):
    out = {}
    for key, array in arrays.items():
        image = sitk.GetImageFromArray(array)
        image.SetSpacing(spacing)
        image.SetOrigin(origin)
        if direction is not None:
            image.SetDirection(direction)
        out[key] = image
    return out


def _synthetic(shape=(48, 40, 36), direction=None, lesion=True, seed=0):
    volumes, label = synthetic_volumes(shape, lesion, seed)
    images = _images({**volumes, "label": label}, direction=direction)
    lab = images.pop("label") if lesion else None
    if not lesion:
        images.pop("label")
    return case_from_images(images, label=lab, case_id="synth")


def _same_grid(a: sitk.Image, b: sitk.Image) -> None:
    assert a.GetSize() == b.GetSize()
    assert a.GetSpacing() == b.GetSpacing()
    assert a.GetOrigin() == b.GetOrigin()
    assert a.GetDirection() == b.GetDirection()


# ----------------------------------------------------------------------------- basic outputs


def test_prepared_shapes_and_flags(synthetic_case):
    case = load_case(find_cases(synthetic_case)[0])
    cfg = _cfg()
    prep = prepare_case(case, cfg)
    assert prep.slices.shape == (36, 4, 32, 32) and prep.slices.dtype == np.float32
    assert prep.brain.shape == prep.label.shape == (36, 32, 32)
    assert prep.brain.dtype == prep.label.dtype == prep.has_brain.dtype == np.bool_
    assert np.all(prep.slices[np.broadcast_to(~prep.brain[:, None], prep.slices.shape)] == 0)
    np.testing.assert_array_equal(prep.has_brain, prep.brain.sum(axis=(1, 2)) >= cfg.min_brain_pixels)
    assert 0 < prep.has_brain.sum() < 36  # the ellipsoid's tips hold too little brain
    seg = sitk.GetArrayFromImage(case.label)
    np.testing.assert_array_equal(prep.has_lesion, seg.any(axis=(1, 2)))
    assert 2 <= prep.has_lesion.sum() <= 10
    assert prep.label[prep.has_lesion].any() and not prep.label[~prep.has_lesion].any()
    # the lesion is bright in FLAIR in the network input
    assert prep.slices[:, 0][prep.label].mean() > prep.slices[:, 0][prep.brain & ~prep.label].mean() + 1


def test_zscore_over_brain():
    case = _synthetic(lesion=False)
    prep = prepare_case(case, _cfg())
    assert prep.label is None and not prep.has_lesion.any()
    for c in CONTRASTS:
        values = sitk.GetArrayFromImage(case.images[c])
        inside = values[values != 0]
        mean, std = prep.zscore[c]
        assert mean == pytest.approx(inside.mean(), rel=1e-5)
        assert std == pytest.approx(inside.std(), rel=1e-5)
    brain_values = prep.slices.transpose(1, 0, 2, 3)[:, prep.brain]
    assert np.abs(brain_values.mean(axis=1)).max() < 0.1
    assert np.abs(brain_values.std(axis=1) - 1).max() < 0.15


def test_identity_resize_is_exact_zscore():
    """No padding and N equal to the slice size: the network input is exactly the z-score."""
    case = _synthetic(shape=(32, 32, 10))
    prep = prepare_case(case, _cfg())
    flair = sitk.GetArrayFromImage(case.images["flair"])
    mean, std = prep.zscore["flair"]
    expected = np.where(flair != 0, (flair - mean) / std, 0)
    np.testing.assert_allclose(prep.slices[:, 0], expected, atol=1e-5)


def test_supplied_mask_defines_brain():
    case = _synthetic()
    flair = sitk.GetArrayFromImage(case.images["flair"])
    mask = np.zeros(flair.shape, np.uint8)
    mask[10:20, 10:30, 10:40] = 1
    mask_image = sitk.GetImageFromArray(mask)
    mask_image.CopyInformation(case.images["flair"])
    case = case_from_images(case.images, label=case.label, mask=mask_image, case_id="m")
    prep = prepare_case(case, _cfg())
    np.testing.assert_array_equal(sitk.GetArrayFromImage(native_brain_mask(prep)), mask)
    inside = flair[mask > 0]
    assert prep.zscore["flair"][0] == pytest.approx(inside.mean(), rel=1e-5)


def test_brain_threshold():
    case = _synthetic(lesion=False)
    # The mask is |value| > threshold in any contrast, i.e. on the voxel-wise maximum magnitude.
    largest = np.max([np.abs(sitk.GetArrayFromImage(case.images[c])) for c in CONTRASTS], axis=0)
    threshold = float(np.percentile(largest[largest > 0], 50))
    low = prepare_case(case, _cfg(brain_threshold=0.0)).native_brain
    high = prepare_case(case, _cfg(brain_threshold=threshold)).native_brain
    np.testing.assert_array_equal(low, largest > 0)
    np.testing.assert_array_equal(high, largest > threshold)
    assert high.sum() < low.sum()


def test_empty_brain():
    zeros = {c: sitk.Image([8, 8, 4], sitk.sitkFloat32) for c in CONTRASTS}
    with pytest.raises(InputError, match=r"case empty: empty brain \(no voxel has \|value\| > 0"):
        prepare_case(case_from_images(zeros, case_id="empty"), _cfg())
    case = _synthetic()
    mask = sitk.Image(case.images["flair"].GetSize(), sitk.sitkUInt8)
    mask.CopyInformation(case.images["flair"])
    with pytest.raises(InputError, match="case m: empty brain .*supplied brain mask is empty"):
        prepare_case(case_from_images(case.images, mask=mask, case_id="m"), _cfg())


def test_constant_contrast():
    case = _synthetic()
    images = dict(case.images)
    brain = sitk.GetArrayFromImage(images["flair"]) != 0
    constant = sitk.GetImageFromArray(np.where(brain, 7.0, 0.0).astype(np.float32))
    constant.CopyInformation(images["t1"])
    images["t1"] = constant
    with pytest.raises(InputError, match="case c: contrast t1 is constant inside the brain"):
        prepare_case(case_from_images(images, case_id="c"), _cfg())


def test_bad_orientation_and_shape():
    case = _synthetic()
    with pytest.raises(ValueError, match="orientation 'LPX'"):
        prepare_case(case, _cfg(orientation="LPX"))
    prep = prepare_case(case, _cfg())
    with pytest.raises(ValueError, match=re.escape("expected values of shape (36, 32, 32)")):
        slices_to_image(np.zeros((36, 16, 16)), prep)


# ----------------------------------------------------------------------------- geometry


def test_orientation_axes():
    assert orientation_axes((1, 0, 0, 0, 1, 0, 0, 0, 1), "LPS") == ((0, 1, 2), ())
    assert orientation_axes(FLIP_Y, "LPS") == ((0, 1, 2), (1,))
    # with PERMUTED, numpy axis 1 (index y) runs along S and becomes the slice axis
    axes, flips = orientation_axes(PERMUTED, "LPS")
    assert axes[0] == 1
    assert orientation_axes((1, 0, 0, 0, 1, 0, 0, 0, 1), "RAS") == ((0, 1, 2), (1, 2))


@pytest.mark.parametrize("direction", [None, FLIP_Y, PERMUTED], ids=["identity", "flip_y", "permuted"])
def test_smooth_map_round_trip(direction):
    """A smooth map survives prepare -> slices_to_image and lands exactly on the input grid."""
    shape = (44, 36, 30)  # x, y, z
    z, y, x = np.meshgrid(*(np.linspace(0, 1, n) for n in shape[::-1]), indexing="ij")
    smooth = (100 + 20 * np.sin(2 * x + 1) * np.cos(1.5 * y) + 15 * z).astype(np.float32)
    images = _images({c: smooth * (i + 1) for i, c in enumerate(CONTRASTS)}, direction=direction)
    full = sitk.Image(shape, sitk.sitkUInt8) + 1
    full.CopyInformation(images["flair"])
    prep = prepare_case(case_from_images(images, mask=full, case_id="s"), _cfg())
    back = slices_to_image(prep.slices[:, 0], prep)
    _same_grid(back, images["flair"])
    assert back.GetPixelID() == sitk.sitkFloat32
    mean, std = prep.zscore["flair"]
    expected = (smooth - mean) / std
    error = np.abs(sitk.GetArrayFromImage(back) - expected)
    assert error.mean() < 0.01 and error.max() < 0.06
    mask = native_brain_mask(prep)
    _same_grid(mask, images["flair"])
    assert mask.GetPixelID() == sitk.sitkUInt8


def test_same_anatomy_in_other_array_layouts_gives_same_slices():
    """Slicing follows the direction cosines: permuting/flipping the array (with the header
    updated, so the anatomy does not move) changes nothing in the network input."""
    case = _synthetic()
    prep = prepare_case(case, _cfg())

    def relayout(image):
        return sitk.Flip(sitk.PermuteAxes(image, [2, 0, 1]), [True, False, True])

    moved = case_from_images(
        {c: relayout(im) for c, im in case.images.items()}, label=relayout(case.label), case_id="m"
    )
    assert moved.images["flair"].GetDirection() != case.images["flair"].GetDirection()
    prep_moved = prepare_case(moved, _cfg())
    np.testing.assert_allclose(prep_moved.slices, prep.slices, atol=1e-6)
    np.testing.assert_array_equal(prep_moved.has_lesion, prep.has_lesion)
    np.testing.assert_array_equal(prep_moved.label, prep.label)
    # and the way back lands on each input's own grid with the same voxel values
    score = prep.slices[:, 0] * prep.brain
    back = slices_to_image(score, prep, background=0.0)
    back_moved = slices_to_image(score, prep_moved, background=0.0)
    _same_grid(back_moved, moved.images["flair"])
    np.testing.assert_allclose(
        sitk.GetArrayFromImage(back_moved), sitk.GetArrayFromImage(relayout(back)), atol=1e-5
    )


def test_padding_to_square():
    case = _synthetic(shape=(48, 40, 12))  # rows (y) 40 < cols (x) 48
    prep = prepare_case(case, _cfg())
    assert prep.geometry.padded == (48, 48) and prep.geometry.pad == (4, 0)
    assert not prep.brain[:, :2].any()  # the zero rows stay outside the brain
    stretched = prepare_case(case, _cfg(pad_to_square=False))
    assert stretched.geometry.padded == (40, 48) and stretched.geometry.pad == (0, 0)
    for p in (prep, stretched):
        _same_grid(slices_to_image(p.slices[:, 1], p), case.images["flair"])


def test_background_and_no_leak_from_outside_brain():
    case = _synthetic()
    prep = prepare_case(case, _cfg())
    values = np.where(prep.brain, 5.0, -100.0).astype(np.float32)
    out = sitk.GetArrayFromImage(slices_to_image(values, prep))
    brain = prep.native_brain
    slice_ok = np.broadcast_to(prep.has_brain[:, None, None], brain.shape)  # identity layout
    np.testing.assert_allclose(out[brain & slice_ok], 5.0, atol=1e-5)
    assert np.all(out[~brain] < out[brain].min())  # default background sits below the brain
    out = sitk.GetArrayFromImage(slices_to_image(values, prep, background=-7.0))
    assert np.all(out[~brain] == -7.0)
    # NaN outside the network brain ("undefined there") must not leak into brain voxels
    out = sitk.GetArrayFromImage(slices_to_image(np.where(prep.brain, 5.0, np.nan), prep, background=0.0))
    np.testing.assert_allclose(out[brain & slice_ok], 5.0, atol=1e-5)
    assert np.all(out[~brain] == 0.0)


def test_files_with_non_identity_direction(tmp_path):
    make_synthetic_case(tmp_path, "d", direction=PERMUTED, shape=(30, 20, 26))
    case = load_case(find_cases(tmp_path)[0])
    prep = prepare_case(case, _cfg())
    assert prep.slices.shape[0] == 20  # index y runs along S/I
    seg = sitk.GetArrayFromImage(case.label)
    np.testing.assert_array_equal(prep.has_lesion, seg.any(axis=(0, 2)))
    _same_grid(slices_to_image(prep.slices[:, 3], prep), case.images["t2"])


# ----------------------------------------------------------------------------- real data


def test_real_brats_case(brats_dir):
    files = find_cases(brats_dir)
    assert len(files) >= 1
    case = load_case(files[0])
    prep = prepare_case(case, PreprocessConfig())
    assert prep.slices.shape == (155, 4, 128, 128)
    seg = sitk.GetArrayFromImage(case.label)
    np.testing.assert_array_equal(prep.has_lesion, seg.any(axis=(1, 2)))
    summary = brats_dir / "SEG_SUMMARY.txt"
    if summary.is_file():
        line = next(ln for ln in summary.read_text(encoding="utf-8").splitlines() if ln.startswith(files[0].case_id + "/"))
        assert prep.has_lesion.sum() == int(re.search(r"brain_slices_with_lesion=(\d+)", line)[1])
    assert prep.label[prep.has_lesion].any() and not prep.label[~prep.has_lesion].any()
    assert 100 < prep.has_brain.sum() < 155
    back = slices_to_image(prep.slices[:, 0], prep)
    _same_grid(back, case.images["flair"])


def test_demo_case_prepares():
    assert DEMO_DIR.is_dir(), f"the bundled demo case is missing at {DEMO_DIR}"
    case = load_case(find_cases(DEMO_DIR)[0])
    prep = prepare_case(case, _cfg(image_size=64))
    seg = sitk.GetArrayFromImage(case.label)
    # direction diag(1,-1,1): the axial axis is still array axis z
    np.testing.assert_array_equal(prep.has_lesion, seg.any(axis=(1, 2)))
    _same_grid(slices_to_image(prep.slices[:, 0], prep), case.images["flair"])
