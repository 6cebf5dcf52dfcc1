"""Neighbouring slices as CtoC context (``model.ctoc_context_slices``): what the translator may see,
how the neighbours are cut and augmented, and that every path (training, the slice cache, predict,
the study's cached translations) gives them the same way."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from ADMAnomalyLib import api
from ADMAnomalyLib.cases import find_cases, load_case
from ADMAnomalyLib.config import SliceContext, preset
from ADMAnomalyLib.data import augment_with_neighbours, augmentation_for
from ADMAnomalyLib.networks import ADMNetwork, translate_all
from ADMAnomalyLib.preprocess import prepare_case

from conftest import check_cache_context, check_context_paths

CONTEXT_CONFIG = preset("tiny", model={"ctoc_context_slices": 1}, train={"epochs_ctoc": 1, "epochs_joint": 1,
                                                                        "lesion_margin": 1})


@pytest.fixture(scope="module")
def context_model(cohort, tmp_path_factory):
    output = tmp_path_factory.mktemp("context") / "context.admm"
    api.train(cohort, output, CONTEXT_CONFIG, device="cpu", show_progress_bar=False)
    return output


def test_the_contrast_being_made_is_seen_in_no_slice_but_the_others_neighbours_count():
    torch.manual_seed(0)
    network = ADMNetwork(preset("tiny", model={"ctoc_context_slices": 1}).model).eval()
    x, neighbours = torch.randn(2, 4, 32, 32), torch.randn(2, 8, 32, 32)
    brain = torch.ones(2, 32, 32, dtype=torch.bool)
    with torch.no_grad():
        before = translate_all(network.ctoc, x, brain, neighbours)
        # FLAIR (channel 0 of each slice) changed in the slice and its neighbours, its median kept:
        # the FLAIR translation cannot change.
        changed, changed_x = neighbours.clone(), x.clone()
        changed[:, [0, 4]] += torch.randn(2, 2, 32, 32) * 3
        flair = x[:, 0]
        median = flair.flatten(1).median(1).values.view(2, 1, 1)
        changed_x[:, 0] = flair + torch.sign(flair - median)  # every value away from the median, which stays
        after = translate_all(network.ctoc, changed_x, brain, changed)
        assert torch.equal(before[:, 0], after[:, 0])
        assert not torch.allclose(before[:, 1:], after[:, 1:])  # the other translations use it
        # T2 of the slice after changes the FLAIR translation: the context is used.
        changed = neighbours.clone()
        changed[:, 7] += torch.randn(2, 32, 32) * 3
        assert not torch.allclose(before[:, 0], translate_all(network.ctoc, x, brain, changed)[:, 0])


def test_a_context_network_refuses_slices_without_their_neighbours():
    network = ADMNetwork(preset("tiny", model={"ctoc_context_slices": 2}).model)
    x, brain = torch.randn(1, 4, 32, 32), torch.ones(1, 32, 32, dtype=torch.bool)
    with pytest.raises(ValueError, match="2 neighbouring slice"):
        network.features(x, brain)
    with pytest.raises(ValueError, match=r"this CtoC needs \(1, 16, 32, 32\)"):
        network.features(x, brain, neighbours=torch.zeros(1, 8, 32, 32))
    with pytest.raises(ValueError, match="ctoc_context_slices"):
        ADMNetwork(preset("tiny", model={"ctoc_context_slices": -1}).model)


def test_neighbours_are_ordered_repeat_the_edge_and_are_cut_to_the_centre_brain(cohort):
    prepared = prepare_case(load_case(find_cases(cohort / "synth_0")[0]), CONTEXT_CONFIG.preprocess)
    last = prepared.n_slices - 1
    index = np.array([0, 5, last])
    around = prepared.neighbours(index, SliceContext(2))
    assert around.shape == (3, 16, *prepared.slices.shape[2:]) and around.dtype == np.float32
    inside = prepared.brain[index][:, None]
    # before (nearest first), then after (nearest first), four contrasts each
    for position, offset in enumerate((-1, -2, 1, 2)):
        expected = prepared.slices[np.clip(index + offset, 0, last)] * inside
        np.testing.assert_array_equal(around[:, 4 * position : 4 * position + 4], expected)
    assert not around[~np.repeat(prepared.brain[index][:, None], 16, axis=1)].any()
    assert prepared.neighbours(index, SliceContext()).shape == (3, 0, *prepared.slices.shape[2:])


def test_a_site_shift_is_the_same_in_a_slice_and_its_neighbours():
    images = torch.rand(3, 4, 32, 32) + 0.5
    brain = torch.zeros(3, 32, 32, dtype=torch.bool)
    brain[:, 4:28, 4:28] = True
    images = images * brain.unsqueeze(1)
    neighbours = images.repeat(1, 2, 1, 1)  # neighbours equal to their slice
    for name in ("scaling", "site"):
        augment = augmentation_for(dataclasses.replace(CONTEXT_CONFIG.train, augmentation=name))
        generator = torch.Generator().manual_seed(1)
        shifted, shifted_around = augment_with_neighbours(augment, images, brain, neighbours, generator)
        assert not torch.allclose(shifted, images)
        for side in range(2):
            assert torch.equal(shifted_around[:, 4 * side : 4 * side + 4], shifted)
        # the generator moves on as after one augmentation, so the next batch's draws are fresh
        alone = torch.Generator().manual_seed(1)
        augment(images, brain, alone)
        assert torch.equal(generator.get_state(), alone.get_state())
    plain = augmentation_for(CONTEXT_CONFIG.train)
    alone, none = augment_with_neighbours(plain, images, brain, None, torch.Generator().manual_seed(1))
    assert none is None
    assert torch.equal(alone, plain(images, brain, torch.Generator().manual_seed(1)))


def test_through_plane_mixing_moves_each_contrasts_neighbours_towards_their_slice():
    images, neighbours = torch.rand(3, 4, 16, 16), torch.rand(3, 8, 16, 16)
    brain = torch.ones(3, 16, 16, dtype=torch.bool)
    identity = augmentation_for(dataclasses.replace(CONTEXT_CONFIG.train, intensity_scale=(1.0, 1.0)))
    _, unmixed = augment_with_neighbours(identity, images, brain, neighbours, torch.Generator().manual_seed(0))
    assert torch.equal(unmixed, neighbours)
    _, mixed = augment_with_neighbours(identity, images, brain, neighbours, torch.Generator().manual_seed(0), 0.8)
    towards = images.repeat(1, 2, 1, 1) - neighbours
    # one share per slice and contrast, both sides alike
    share = ((mixed - neighbours) * towards).sum(dim=(2, 3)) / (towards ** 2).sum(dim=(2, 3))
    assert torch.allclose(neighbours + share[..., None, None] * towards, mixed, atol=1e-5)
    shares = share.reshape(3, 2, 4)
    assert torch.allclose(shares[:, 0], shares[:, 1], atol=1e-5)
    assert (shares >= 0).all() and (shares <= 0.8 + 1e-4).all() and shares.std() > 0.05
    with pytest.raises(ValueError, match="through_plane_mix"):
        augmentation_for(dataclasses.replace(CONTEXT_CONFIG.train, through_plane_mix=1.5))


def test_predict_equals_the_studys_cached_translations_and_the_model_file_keeps_the_context(context_model, cohort):
    model, _ = check_context_paths(context_model, cohort, "neighbouring slice")
    assert model.config.model.ctoc_context_slices == 1
    assert model.network.ctoc.encoder[1].in_channels == 12


def test_the_slice_cache_holds_the_neighbours_training_reads(cohort, tmp_path):
    # A cache without neighbours cannot serve a context model, nor one with them a faithful model.
    faithful = dataclasses.replace(CONTEXT_CONFIG, model=dataclasses.replace(CONTEXT_CONFIG.model,
                                                                           ctoc_context_slices=0))
    cache = check_cache_context(cohort, tmp_path / "cache", CONTEXT_CONFIG, 8, faithful)
    model = api.train(cache, tmp_path / "from_cache.admm", CONTEXT_CONFIG, device="cpu", show_progress_bar=False)
    assert model.gmm is not None and np.isfinite(model.threshold)
