"""Engine options beyond the paper: a CtoC that predicts its own uncertainty and the site-shift
augmentation. The faithful ADM (both off) must be exactly what it was."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from ADMAnomalyLib.config import TrainConfig, preset
from ADMAnomalyLib.data import (SliceSet, TrainingData, _random_bias_field, augmentation_for,
                                random_intensity_scaling, site_shift_augmentation)
from ADMAnomalyLib.gmm import GMMAccumulator, energy
from ADMAnomalyLib.infer import InferenceOptions, ctoc_translations, energy_slices, network_energy
from ADMAnomalyLib.model import ADMModel
from ADMAnomalyLib.networks import LOG_VARIANCE_RANGE, ADMNetwork, brain_medians
from ADMAnomalyLib.preprocess import PreparedCase
from ADMAnomalyLib.train import Trainer, masked_beta_nll

CPU = InferenceOptions("cpu", precision="fp32")
NO_SHIFT = dict(intensity_scale=(1.0, 1.0), bias_field_sd=0.0, gamma_log_sd=0.0, noise_sd_max=0.0,
                blur_sigma_max=0.0)


def _slices(n: int = 3, size: int = 32, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Random z-score-like slices inside an off-centre disc (left-right asymmetric, so a mirror differs)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    brain = np.broadcast_to(((yy - size / 2) ** 2 + (xx - size / 2.5) ** 2) < (size / 2.6) ** 2, (n, size, size)).copy()
    images = (rng.standard_normal((n, 4, size, size)) * brain[:, None]).astype(np.float32)
    return images, brain


def _uncertain_config(**train):
    return preset("tiny", model={"ctoc_uncertainty": True}, train={"precision": "fp32", **train})


def _with_random_variance_head(network: ADMNetwork) -> ADMNetwork:
    """The log-variance output starts at exactly 0 (sigma 1); give it a random map so Z_ct differs
    from the plain residual, as after training."""
    head = network.ctoc.head[-1]
    with torch.no_grad():
        head.weight[1:].normal_(0.0, 0.3, generator=torch.Generator().manual_seed(5))
        head.bias[1:].fill_(0.4)
    return network


def _fitted(config, images, brain) -> ADMModel:
    torch.manual_seed(0)
    model = ADMModel.create(config)
    if config.model.ctoc_uncertainty:
        _with_random_variance_head(model.network)
    model.network.eval()
    x, b = torch.from_numpy(images), torch.from_numpy(brain)
    with torch.no_grad():
        z, _ = model.network.features(x, b)
        zb = z.permute(0, 2, 3, 1)[b]
        accumulator = GMMAccumulator(config.model.n_components, config.model.feature_dim)
        accumulator.update(zb, model.network.estimator(zb))
    model.gmm = accumulator.finalize(config.model.eps)
    return model


# -- uncertainty head --------------------------------------------------------------------------------

def test_uncertainty_translation_is_mean_then_clamped_log_variance_and_zero_outside_brain():
    images, brain = _slices()
    network = _with_random_variance_head(ADMNetwork(_uncertain_config().model)).eval()
    assert network.ctoc.head[-1].out_channels == 2
    x, b = torch.from_numpy(images), torch.from_numpy(brain)
    with torch.no_grad():
        translation = network.translate(x, b)
    assert translation.shape == (3, 8, 32, 32) and translation.dtype == torch.float32
    assert (translation[~b.unsqueeze(1).expand_as(translation)] == 0).all()
    log_variance = translation[:, 4:]
    assert log_variance[b.unsqueeze(1).expand_as(log_variance)].std() > 0.05, "a random head gives a varying s"
    with torch.no_grad():
        network.ctoc.head[-1].bias[1:].fill_(50.0)
        clamped = network.translate(x, b)[:, 4:]
    assert clamped.max() == LOG_VARIANCE_RANGE[1]


def test_uncertainty_zct_is_residual_over_predicted_sigma():
    images, brain = _slices()
    network = _with_random_variance_head(ADMNetwork(_uncertain_config().model)).eval()
    x, b = torch.from_numpy(images), torch.from_numpy(brain)
    with torch.no_grad():
        translation = network.translate(x, b)
        z, _ = network.features(x, b)
        z_cached, _ = network.features(x, b, x_hat_ct=translation)
    x_hat, s = translation[:, :4], translation[:, 4:]
    expected = (x - x_hat).abs() / torch.sqrt(torch.exp(s))
    torch.testing.assert_close(z[:, :4], expected, rtol=1e-6, atol=1e-6)
    assert torch.equal(z, z_cached)
    assert not torch.allclose(z[:, :4], (x - x_hat).abs(), atol=1e-3), "sigma must matter"
    with pytest.raises(ValueError, match="channels"):
        network.features(x, b, x_hat_ct=x_hat)  # a faithful model's cache


def test_new_uncertainty_head_starts_at_unit_sigma():
    images, brain = _slices()
    network = ADMNetwork(_uncertain_config().model).eval()
    with torch.no_grad():
        translation = network.translate(torch.from_numpy(images), torch.from_numpy(brain))
    assert torch.equal(translation[:, 4:], torch.zeros_like(translation[:, 4:]))


def test_uncertainty_under_bf16_autocast_keeps_log_variance_and_division_float32():
    images, brain = _slices(2)
    network = _with_random_variance_head(ADMNetwork(_uncertain_config().model)).eval()
    x, b = torch.from_numpy(images), torch.from_numpy(brain)
    with torch.no_grad():
        reference, _ = network.features(x, b)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            translation = network.translate(x, b)
            z, _ = network.features(x, b, x_hat_ct=translation)
    assert translation.dtype == torch.float32 and z.dtype == torch.float32
    inside = b.unsqueeze(1).expand(-1, 4, -1, -1)
    assert torch.isfinite(z).all()
    # bf16 CtoC: a few per cent, not a broken scale.
    assert (z[:, :4][inside] - reference[:, :4][inside]).abs().median() < 0.05


def test_faithful_energy_is_the_papers_computed_by_hand():
    """Z_ct = |X - G_ct(X^k)| with the median inputs built here independently; Z_dr; the mixture energy."""
    config = preset("tiny")
    images, brain = _slices()
    model = _fitted(config, images, brain)
    network = model.network
    assert network.ctoc.head[-1].out_channels == 1
    x, b = torch.from_numpy(images), torch.from_numpy(brain)
    medians = brain_medians(x, b)
    size = x.shape[-1]
    with torch.no_grad():
        x_hat = torch.zeros_like(x)
        for k in range(4):
            inputs = x.clone()
            inputs[:, k] = medians[:, k].view(-1, 1, 1)
            median_map = medians[:, k].view(-1, 1, 1, 1).expand(-1, 1, size, size)
            x_hat[:, k] = network.ctoc(inputs, median_map)[:, 0] * b
        z = torch.cat([(x - x_hat).abs(), network.dr_encoder(x)], dim=1).permute(0, 2, 3, 1)[b]
        by_hand = energy(z, model.gmm).float()
    produced = torch.from_numpy(energy_slices(model, images, brain, CPU))[b]
    torch.testing.assert_close(produced, by_hand, rtol=1e-5, atol=1e-4)
    with torch.no_grad():
        assert torch.equal(network.features(x, b)[0][:, :4], (x - network.translate(x, b)).abs())


def test_model_files_from_before_the_options_load_as_the_faithful_adm():
    # A model file written before these options existed has none of their fields.
    from ADMAnomalyLib.config import ADMConfig

    stored = preset("tiny").to_dict()
    for section, field in (("model", "ctoc_uncertainty"), ("train", "augmentation"), ("train", "nll_beta"),
                           ("preprocess", "normalisation")):
        del stored[section][field]
    config = ADMConfig.from_dict(stored)
    assert (config.model.ctoc_uncertainty, config.train.augmentation, config.preprocess.normalisation) == (
        False, "scaling", "zscore")
    network = ADMNetwork(config.model)
    assert network.ctoc.head[-1].out_channels == 1 and network.translation_channels == 4


# -- beta-NLL ---------------------------------------------------------------------------------------

def test_beta_nll_with_beta_0_is_the_gaussian_nll():
    generator = torch.Generator().manual_seed(0)
    mean, target, s = (torch.randn(2, 4, 8, 8, generator=generator) for _ in range(3))
    brain = torch.ones(2, 8, 8, dtype=torch.bool)
    expected = torch.nn.functional.gaussian_nll_loss(mean, target, torch.exp(s), full=False)
    torch.testing.assert_close(masked_beta_nll(mean, s, target, brain, 0.0), expected)


def test_beta_nll_with_beta_1_gives_the_mean_an_mse_gradient_whatever_sigma():
    generator = torch.Generator().manual_seed(1)
    target = torch.randn(1, 4, 8, 8, generator=generator)
    brain = torch.rand(1, 8, 8, generator=generator) > 0.3
    gradients = []
    for s_value in (-3.0, 0.0, 3.0):
        mean = torch.zeros(1, 4, 8, 8, requires_grad=True)
        masked_beta_nll(mean, torch.full_like(target, s_value), target, brain, 1.0).backward()
        gradients.append(mean.grad)
    torch.testing.assert_close(gradients[0], gradients[2])
    assert gradients[1][~brain.unsqueeze(1).expand_as(target)].abs().max() == 0, "background carries no loss"


def _predictable_slices(n: int = 4, size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """Contrasts that are scaled copies of one pattern (plus a little noise): each can be translated
    from the others, as in real multi-contrast MRI."""
    images, brain = _slices(n, size, seed=2)
    pattern = torch.from_numpy(images[:, :1])
    gains = torch.tensor([1.0, -0.7, 0.5, 1.3]).view(1, 4, 1, 1)
    x = (pattern * gains + 0.1 * torch.from_numpy(images)) * torch.from_numpy(brain).unsqueeze(1)
    return x, torch.from_numpy(brain)


def test_beta_nll_training_decreases_and_learns_the_variance():
    x, b = _predictable_slices()
    trainer = Trainer(_uncertain_config(lr_ctoc=3e-3), "cpu", show_progress_bar=False)
    generator = torch.Generator().manual_seed(0)
    losses = [trainer.training_step("ctoc", x, b, generator) for _ in range(15)]
    assert all(np.isfinite(step["loss_ct"]) and np.isfinite(step["mse_ct"]) for step in losses)
    assert losses[-1]["loss_ct"] < losses[0]["loss_ct"] - 0.1
    assert losses[-1]["mse_ct"] < losses[0]["mse_ct"]
    with torch.no_grad():
        log_variance = trainer.model.network.translate(x, b)[:, 4:]
    assert log_variance.abs().max() > 0.01, "s moved from its zero start"


# -- model file, inference paths, checkpoint ----------------------------------------------------------

def test_uncertainty_model_round_trips_through_the_model_file(tmp_path):
    images, brain = _slices()
    config = _uncertain_config()
    model = _fitted(config, images, brain)
    before = energy_slices(model, images, brain, CPU)
    loaded = ADMModel.load(model.save(tmp_path / "uncertain.admm"))
    assert loaded.config.model.ctoc_uncertainty is True
    assert loaded.network.ctoc.head[-1].out_channels == 2
    np.testing.assert_array_equal(energy_slices(loaded, images, brain, CPU), before)


def test_cached_translations_and_flip_tta_with_uncertainty():
    images, brain = _slices()
    model = _fitted(_uncertain_config(), images, brain)
    prepared = PreparedCase("p", images, brain, None, np.ones(len(images), bool), np.zeros(len(images), bool))
    flip = dataclasses.replace(CPU, flip_tta=True)
    translations = {mirrored: ctoc_translations(model, prepared, CPU, mirrored) for mirrored in (False, True)}
    assert translations[False].shape == (3, 8, 32, 32)
    plain = network_energy(model, prepared, CPU)
    np.testing.assert_allclose(network_energy(model, prepared, CPU, translations=translations), plain,
                               rtol=1e-6, atol=1e-5)
    flipped = network_energy(model, prepared, flip)
    np.testing.assert_allclose(network_energy(model, prepared, flip, translations=translations), flipped,
                               rtol=1e-6, atol=1e-5)
    mirror = energy_slices(model, images[..., ::-1].copy(), brain[..., ::-1].copy(), CPU)[..., ::-1]
    np.testing.assert_allclose(flipped, 0.5 * (plain + mirror), rtol=1e-5, atol=1e-4)


def test_uncertainty_checkpoint_resumes_and_old_checkpoints_without_new_fields_resume(tmp_path):
    images, brain = _slices(4)
    data = TrainingData(SliceSet(images, brain, None, ["a"] * 4), SliceSet(images[:0], brain[:0], None, []), {})
    config = _uncertain_config(epochs_ctoc=1)
    first = Trainer(config, "cpu", checkpoint_path=tmp_path / "m.ckpt", show_progress_bar=False)
    first.fit_ctoc(data)
    resumed = Trainer(config, "cpu", checkpoint_path=tmp_path / "m.ckpt", show_progress_bar=False)
    assert resumed.load_checkpoint() and resumed.stage == "joint"
    for name, value in first.model.network.state_dict().items():
        assert torch.equal(value, resumed.model.network.state_dict()[name]), name

    faithful = preset("tiny", train={"precision": "fp32"})
    old = Trainer(faithful, "cpu", checkpoint_path=tmp_path / "old.ckpt", show_progress_bar=False)
    old.save_checkpoint()
    state = torch.load(tmp_path / "old.ckpt", weights_only=True)
    for name in ("augmentation", "bias_field_sd", "gamma_log_sd", "noise_sd_max", "blur_sigma_max", "nll_beta"):
        del state["config"]["train"][name]
    del state["config"]["model"]["ctoc_uncertainty"]
    torch.save(state, tmp_path / "old.ckpt")
    assert Trainer(faithful, "cpu", checkpoint_path=tmp_path / "old.ckpt", show_progress_bar=False).load_checkpoint()
    with pytest.raises(Exception, match="different configuration"):
        Trainer(config, "cpu", checkpoint_path=tmp_path / "old.ckpt", show_progress_bar=False).load_checkpoint()


# -- site-shift augmentation -----------------------------------------------------------------------

def _site(images, brain, seed=0, **train):
    config = TrainConfig(augmentation="site", **train)
    return site_shift_augmentation(images, brain, torch.Generator().manual_seed(seed), config)


def _tensors(n: int = 3, size: int = 32, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    images, brain = _slices(n, size, seed)
    return torch.from_numpy(images), torch.from_numpy(brain)


def test_site_augmentation_keeps_background_zero_is_deterministic_and_changes_intensities():
    x, b = _tensors()
    out = _site(x, b)
    outside = ~b.unsqueeze(1).expand_as(x)
    assert (out[outside] == 0).all()
    assert torch.equal(out, _site(x, b))
    assert not torch.allclose(out, _site(x, b, seed=1))
    assert (out - x)[~outside].abs().mean() > 0.02
    b[0] = False  # a slice without brain stays empty (no NaN from its empty range)
    assert torch.equal(_site(x * b.unsqueeze(1), b)[0], torch.zeros_like(x[0]))


def test_site_augmentation_without_any_shift_is_the_identity():
    x, b = _tensors()
    assert torch.equal(_site(x, b, **NO_SHIFT), x)


@pytest.mark.parametrize("step", [{"intensity_scale": (0.8, 1.2)}, {"bias_field_sd": 0.3}, {"gamma_log_sd": 0.3},
                                  {"noise_sd_max": 0.2}, {"blur_sigma_max": 1.5}])
def test_each_site_shift_step_changes_the_brain_alone(step):
    x, b = _tensors()
    out = _site(x, b, **{**NO_SHIFT, **step})
    inside = b.unsqueeze(1).expand_as(x)
    assert (out[~inside] == 0).all()
    assert (out - x)[inside].abs().mean() > 0.01


def _high_frequency_fraction(planes: torch.Tensor) -> float:
    """Share of the power of (B, K, N, N) planes at spatial periods under 8 pixels (Hann-windowed,
    so the planes' edges do not count as a jump)."""
    size = planes.shape[-1]
    window = torch.hann_window(size, periodic=False)
    centred = (planes - planes.mean(dim=(2, 3), keepdim=True)) * window.view(-1, 1) * window.view(1, -1)
    power = torch.fft.fft2(centred).abs() ** 2
    frequency = torch.fft.fftfreq(size).abs()
    high = (frequency.view(-1, 1) > 0.125) | (frequency.view(1, -1) > 0.125)
    return float(power[..., high].sum() / power.sum())


def test_bias_field_is_smooth_and_scales_from_the_brain_minimum():
    field = _random_bias_field(torch.zeros(2, 4, 64, 64), 0.3, torch.Generator().manual_seed(0))
    assert field.log().std() > 0.1
    assert _high_frequency_fraction(field.log()) < 1e-3
    rough = torch.nn.functional.interpolate(torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0)),
                                            size=(64, 64), mode="bicubic", align_corners=True)
    assert _high_frequency_fraction(rough) > 0.01, "the measure tells a 16x16-knot field from a 4x4 one"

    x, b = _tensors()
    out = _site(x, b, **{**NO_SHIFT, "bias_field_sd": 0.3})
    inside = b.unsqueeze(1).expand_as(x)
    lowest = x.masked_fill(~inside, np.inf).amin(dim=(2, 3))
    torch.testing.assert_close(out.masked_fill(~inside, np.inf).amin(dim=(2, 3)), lowest)
    darkest_third = inside & (x < lowest.view(3, 4, 1, 1) + 0.5)
    brightest = inside & (x > 2.0)
    assert (out - x)[darkest_third].abs().mean() < (out - x)[brightest].abs().mean()


def test_gamma_is_monotone_and_keeps_the_brain_range():
    x, b = _tensors(1)
    out = _site(x, b, **{**NO_SHIFT, "gamma_log_sd": 0.5})
    for k in range(4):
        before, after = x[0, k][b[0]], out[0, k][b[0]]
        order = before.argsort()
        assert (after[order].diff() >= -1e-6).all()
        torch.testing.assert_close(after.min(), before.min())
        torch.testing.assert_close(after.max(), before.max())


def test_blur_is_normalised_inside_the_brain():
    _, b = _tensors(2)
    constant = 1.5 * b.unsqueeze(1).expand(-1, 4, -1, -1).float()
    out = _site(constant, b, **{**NO_SHIFT, "blur_sigma_max": 2.0})
    torch.testing.assert_close(out, constant)  # no darkening of the rim by the zero background


def test_noise_is_bounded_by_its_maximum_sd():
    x, b = _tensors(4, 64)
    out = _site(x, b, **{**NO_SHIFT, "noise_sd_max": 0.1})
    inside = b.unsqueeze(1).expand_as(x)
    assert 0.01 < (out - x)[inside].std() < 0.1


def test_trainer_picks_the_augmentation_and_refuses_unknown_ones():
    x, b = _tensors()
    scaling = augmentation_for(TrainConfig())
    generator = torch.Generator().manual_seed(3)
    expected = random_intensity_scaling(x, b, (0.9, 1.1), torch.Generator().manual_seed(3))
    assert torch.equal(scaling(x, b, generator), expected)
    with pytest.raises(ValueError, match="augmentation"):
        Trainer(preset("tiny", train={"augmentation": "sites"}), "cpu", show_progress_bar=False)


def test_training_with_site_augmentation_runs():
    images, brain = _slices(4)
    data = TrainingData(SliceSet(images, brain, None, ["a"] * 4), SliceSet(images[:0], brain[:0], None, []), {})
    trainer = Trainer(preset("tiny", train={"augmentation": "site", "precision": "fp32"}), "cpu", show_progress_bar=False)
    trainer.fit_ctoc(data)
    assert np.isfinite(trainer.history[-1]["loss_ct"])
