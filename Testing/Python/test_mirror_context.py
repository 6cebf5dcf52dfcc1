"""The mirrored slice as CtoC context (``model.ctoc_mirror_context``): where the mirror plane lies,
what the translator may see of the mirror image, how it is augmented, and that training, the slice
cache, predict and the study's cached translations give it the same way."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from ADMAnomalyLib import api
from ADMAnomalyLib.cases import find_cases, load_case
from ADMAnomalyLib.config import SliceContext, preset
from ADMAnomalyLib.data import augment_with_neighbours, augmentation_for
from ADMAnomalyLib.infer import InferenceOptions, network_energy
from ADMAnomalyLib.networks import ADMNetwork, translate_all
from ADMAnomalyLib.preprocess import prepare_case

from conftest import check_cache_context, check_context_paths, make_synthetic_case

MIRROR_CONFIG = preset("tiny", model={"ctoc_mirror_context": True},
                       train={"epochs_ctoc": 1, "epochs_joint": 1, "lesion_margin": 1, "augmentation": "site"})


@pytest.fixture(scope="module")
def mirror_model(cohort, tmp_path_factory):
    output = tmp_path_factory.mktemp("mirror") / "mirror.admm"
    api.train(cohort, output, MIRROR_CONFIG, device="cpu", show_progress_bar=False)
    return output


def test_the_mirror_image_is_taken_across_the_brains_own_midline(tmp_path):
    # A head 6 mm right of the grid's centre: 12 empty columns on its left. The mirror plane follows
    # the brain, not the grid.
    case_dir = make_synthetic_case(tmp_path, shape=(40, 40, 24), spacing=(1.0, 1.0, 1.0))
    for path in case_dir.iterdir():
        image = sitk.ReadImage(str(path))
        sitk.WriteImage(sitk.ConstantPad(image, (0, 0, 0), (12, 0, 0)), str(path))
    prepared = prepare_case(load_case(find_cases(case_dir)[0]), MIRROR_CONFIG.preprocess)
    # 52 columns become 32 pixels: the brain's centre, column 19.5, lies at pixel 11.8 of 32, a
    # plane that a shift of 2 x (11.8 - 15.5) = -7.4 pixels gives.
    assert prepared.midline_shift in (-7, -8)
    index = np.flatnonzero(prepared.has_brain)
    around = prepared.neighbours(index, SliceContext(mirror=True))
    assert around.shape == (len(index), 4, 32, 32) and around.dtype == np.float32
    # Most of the brain meets brain in its mirror image; with the grid's centre as plane far less.
    brain = prepared.brain[index]
    met = (around[:, 0] != 0) & brain
    assert met.sum() > 0.9 * brain.sum()
    assert (np.flip(brain, -1) & brain).sum() < 0.8 * brain.sum()
    assert not around[~np.repeat(brain[:, None], 4, axis=1)].any()  # cut to the slice's own brain
    # After the neighbouring slices, in the order SliceContext names.
    both = prepared.neighbours(index, SliceContext(1, mirror=True))
    np.testing.assert_array_equal(both[:, 8:], around)
    np.testing.assert_array_equal(both[:, :8], prepared.neighbours(index, SliceContext(1)))


def test_the_translator_sees_the_contrast_it_makes_only_in_the_mirror_image():
    torch.manual_seed(0)
    network = ADMNetwork(preset("tiny", model={"ctoc_mirror_context": True}).model).eval()
    assert network.ctoc.encoder[1].in_channels == 8
    x, mirrored = torch.randn(2, 4, 32, 32), torch.randn(2, 4, 32, 32)
    brain = torch.ones(2, 32, 32, dtype=torch.bool)
    with torch.no_grad():
        before = network.translate(x, brain, mirrored)
        # FLAIR changed in the slice itself, its median kept: the FLAIR translation cannot change.
        changed_x = x.clone()
        flair = x[:, 0]
        median = flair.flatten(1).median(1).values.view(2, 1, 1)
        changed_x[:, 0] = flair + torch.sign(flair - median)
        assert torch.equal(before[:, 0], network.translate(changed_x, brain, mirrored)[:, 0])
        # FLAIR changed in the mirror image: the FLAIR translation reads it.
        changed = mirrored.clone()
        changed[:, 0] += torch.randn(2, 32, 32) * 3
        assert not torch.allclose(before[:, 0], network.translate(x, brain, changed)[:, 0])
        # Without the flag the same tensor counts as a neighbour, whose FLAIR is hidden.
        hidden = translate_all(network.ctoc, x, brain, mirrored)
        assert torch.equal(hidden[:, 0], translate_all(network.ctoc, x, brain, changed)[:, 0])
    with pytest.raises(ValueError, match="its mirror image; none were given"):
        network.features(x, brain)
    with pytest.raises(ValueError, match="ctoc_mirror_context"):
        ADMNetwork(preset("tiny", model={"ctoc_mirror_context": 1}).model)


def test_the_mirror_image_meets_the_augmentation_mirrored():
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(3, 4, 32, 32, generator=generator) + 0.5
    brain = torch.zeros(3, 32, 32, dtype=torch.bool)
    brain[:, 4:28, 3:29] = True  # symmetric about the grid's centre: the mirror image is the flip
    images = images * brain.unsqueeze(1)
    neighbours = torch.cat([images, images.flip(-1)], dim=1)  # a neighbour, then the mirror image
    augment = augmentation_for(dataclasses.replace(MIRROR_CONFIG.train, noise_sd_max=0.0))
    shifted, around = augment_with_neighbours(augment, images, brain, neighbours, torch.Generator().manual_seed(1),
                                              mirror=True)
    assert torch.equal(around[:, :4], shifted)
    # The bias field lies where the mirrored tissue came from: the mirror image of the augmented slice.
    torch.testing.assert_close(around[:, 4:], shifted.flip(-1))
    assert not torch.allclose(around[:, 4:], shifted)
    # Through-plane mixing moves the neighbouring slices, never the mirror image.
    identity = augmentation_for(dataclasses.replace(MIRROR_CONFIG.train, augmentation="scaling",
                                                    intensity_scale=(1.0, 1.0)))
    other = torch.rand(3, 8, 32, 32)
    _, mixed = augment_with_neighbours(identity, images, brain, other, torch.Generator().manual_seed(0), 0.9,
                                       mirror=True)
    assert torch.equal(mixed[:, 4:], other[:, 4:] * brain.unsqueeze(1))
    assert not torch.allclose(mixed[:, :4], other[:, :4] * brain.unsqueeze(1))


def test_predict_equals_the_studys_cached_translations_and_the_model_file_keeps_the_mirror(mirror_model, cohort):
    model, case = check_context_paths(mirror_model, cohort, "mirror image")
    assert model.config.model.ctoc_mirror_context and model.config.model.slice_context == SliceContext(0, True)
    prepared = case.prepared
    # Flip TTA mirrors the mirror image with the slice, so the flipped pass sees the same pair: a
    # left-right symmetric slice and its mirror image are what the plain pass saw, and the flipped
    # pass's energy, flipped back, is the plain energy's mirror image.
    symmetric = dataclasses.replace(prepared, slices=0.5 * (prepared.slices + prepared.slices[..., ::-1]),
                                    brain=prepared.brain & prepared.brain[..., ::-1])
    symmetric.slices *= symmetric.brain[:, None]
    assert symmetric.midline_shift == 0
    plain = network_energy(model, symmetric, InferenceOptions("cpu", flip_tta=False))
    flipped = network_energy(model, symmetric, InferenceOptions("cpu", flip_tta=True))
    np.testing.assert_allclose(flipped, 0.5 * (plain + plain[..., ::-1]), rtol=1e-4, atol=1e-4)
    assert not np.allclose(flipped, plain, atol=1e-3)


def test_the_slice_cache_holds_the_mirror_images_training_reads(cohort, tmp_path):
    faithful = dataclasses.replace(MIRROR_CONFIG, model=dataclasses.replace(MIRROR_CONFIG.model,
                                                                          ctoc_mirror_context=False))
    check_cache_context(cohort, tmp_path / "cache", MIRROR_CONFIG, 4, faithful)
