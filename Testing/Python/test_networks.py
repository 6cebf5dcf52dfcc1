"""ADM networks: shapes, the CtoC median-map inputs, ablations and the float32 rule for DR/DE."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from torch import nn

from ADMAnomalyLib.config import ModelConfig, preset
from ADMAnomalyLib.networks import (
    ADMNetwork,
    CtoCNet,
    DensityEstimator,
    DRDecoder,
    DREncoder,
    InstanceNorm2d,
    brain_medians,
    translate_all,
)


def _tiny() -> ModelConfig:
    return preset("tiny").model


def _slices(batch: int, size: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    brain = torch.zeros(batch, size, size, dtype=torch.bool)
    brain[:, size // 8 : -size // 8, size // 6 : -size // 5] = True
    x = torch.randn(batch, 4, size, size, generator=gen) * brain.unsqueeze(1)
    return x, brain


class _RecordingCtoC(nn.Module):
    """Stands in for CtoC: records its inputs and returns the median map it was given."""

    def forward(self, x_masked: torch.Tensor, median_map: torch.Tensor) -> torch.Tensor:
        self.inputs, self.median_map = x_masked.clone(), median_map.clone()
        return median_map + 0.0


@pytest.mark.parametrize("name,size", [("paper", 32), ("tiny", 32), ("tiny", 20)])
def test_ctoc_output_shape(name, size):
    cfg = preset(name).model
    net = CtoCNet(cfg)
    out = net(torch.randn(2, cfg.n_contrasts, size, size), torch.randn(2, 1, size, size))
    assert out.shape == (2, 1, size, size)


def test_paper_ctoc_has_the_papers_widths():
    cfg = preset("paper").model
    net = CtoCNet(cfg)
    blocks = [m for m in net.encoder if m.__class__.__name__ == "ResidualBlock"]
    assert len(blocks) == cfg.ctoc_res_blocks
    assert blocks[0].body[1].weight.shape == (4 * cfg.ctoc_width, 4 * cfg.ctoc_width, 3, 3)
    assert net.head[1].in_channels == cfg.ctoc_width + 1  # median map as intensity bias


def test_ctoc_median_bias_off_ignores_median_map():
    cfg = dataclasses.replace(_tiny(), median_bias=False)
    net = CtoCNet(cfg).eval()
    assert net.head[1].in_channels == cfg.ctoc_width
    x = torch.randn(1, 4, 16, 16)
    torch.testing.assert_close(net(x, torch.zeros(1, 1, 16, 16)), net(x, torch.ones(1, 1, 16, 16)))


def test_ctoc_rejects_sizes_not_divisible_by_4():
    with pytest.raises(ValueError, match="divisible by 4"):
        CtoCNet(_tiny())(torch.randn(1, 4, 18, 18), torch.randn(1, 1, 18, 18))


def test_brain_medians_per_sample_and_empty_brain():
    x, brain = _slices(3, 16, seed=1)
    brain[2] = False
    medians = brain_medians(x, brain)
    for b in range(2):
        for k in range(4):
            values = np.sort(x[b, k][brain[b]].numpy())
            assert medians[b, k].item() == values[(len(values) - 1) // 2]
    assert torch.equal(medians[2], torch.zeros(4))


def test_translate_all_builds_median_inputs_per_contrast_and_sample():
    x, brain = _slices(3, 16, seed=2)
    x[1] *= 5.0  # a different intensity level per sample must give a different median
    recorder = _RecordingCtoC()
    x_hat = translate_all(recorder, x, brain)
    medians = brain_medians(x, brain)
    inputs = recorder.inputs.view(4, 3, 4, 16, 16)  # (translation k, sample, channel, H, W)
    maps = recorder.median_map.view(4, 3, 1, 16, 16)
    for k in range(4):
        for b in range(3):
            assert torch.all(inputs[k, b, k] == medians[b, k]), "channel k must be the median map"
            assert torch.all(maps[k, b] == medians[b, k]), "last-layer bias must be contrast k's median"
            others = [c for c in range(4) if c != k]
            assert torch.equal(inputs[k, b, others], x[b, others])
    # Output channel k comes from translation k (the recorder echoes its median map) ...
    expected = medians.view(3, 4, 1, 1) * brain.unsqueeze(1)
    torch.testing.assert_close(x_hat, expected)
    # ... and is exactly zero outside the brain.
    assert torch.all(x_hat[~brain.unsqueeze(1).expand_as(x_hat)] == 0)


def test_translate_all_real_network_shape_background_and_gradient():
    cfg = _tiny()
    ctoc = CtoCNet(cfg)
    x, brain = _slices(2, 16, seed=3)
    x_hat = translate_all(ctoc, x, brain)
    assert x_hat.shape == x.shape
    assert torch.all(x_hat.masked_select(~brain.unsqueeze(1)) == 0)
    ((x - x_hat) ** 2).mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in ctoc.parameters())


def test_dr_and_de_shapes():
    cfg = _tiny()
    z_dr = DREncoder(cfg)(torch.randn(2, cfg.n_contrasts, 12, 12))
    assert z_dr.shape == (2, cfg.dr_latent, 12, 12)
    assert DRDecoder(cfg)(z_dr).shape == (2, cfg.n_contrasts, 12, 12)
    estimator = DensityEstimator(cfg).eval()
    gamma = estimator(torch.randn(50, cfg.feature_dim))
    assert gamma.shape == (50, cfg.n_components)
    torch.testing.assert_close(gamma.sum(dim=1), torch.ones(50))


def test_dr_decoder_is_pixelwise():
    # 1x1 convs: changing one latent pixel changes only that output pixel.
    decoder = DRDecoder(_tiny())
    z = torch.randn(1, 3, 8, 8)
    changed = z.clone()
    changed[0, :, 3, 4] += 1.0
    diff = (decoder(z) - decoder(changed)).abs().sum(dim=1)[0]
    assert diff[3, 4] > 0 and diff.sum() == diff[3, 4]


@pytest.mark.parametrize(
    "use_ctoc,use_dr,dim", [(True, True, 7), (False, True, 3), (True, False, 4)]
)
def test_ablation_feature_dims_and_parts(use_ctoc, use_dr, dim):
    cfg = dataclasses.replace(_tiny(), use_ctoc=use_ctoc, use_dr=use_dr)
    assert cfg.feature_dim == dim
    net = ADMNetwork(cfg)
    assert (net.ctoc is not None) == use_ctoc
    assert (net.dr_encoder is not None) == (net.dr_decoder is not None) == use_dr
    assert net.estimator.layers[0].in_features == dim
    x, brain = _slices(2, 16, seed=4)
    z, x_hat_dr = net.features(x, brain)
    assert z.shape == (2, dim, 16, 16)
    assert (x_hat_dr is not None) == use_dr
    if use_dr:
        assert x_hat_dr.shape == x.shape
    assert net.estimator(z.permute(0, 2, 3, 1).reshape(-1, dim)).shape == (2 * 16 * 16, cfg.n_components)


def test_no_features_rejected():
    with pytest.raises(ValueError):
        ADMNetwork(dataclasses.replace(_tiny(), use_ctoc=False, use_dr=False))


def test_paper_network_features_shape():
    cfg = preset("paper").model
    net = ADMNetwork(cfg)
    x, brain = _slices(1, 16, seed=5)
    with torch.no_grad():
        z, x_hat_dr = net.features(x, brain)
    assert z.shape == (1, cfg.feature_dim, 16, 16) and x_hat_dr.shape == x.shape


def test_features_use_cached_translation_and_zct_is_abs_residual():
    net = ADMNetwork(_tiny())
    x, brain = _slices(2, 16, seed=6)
    cached = torch.randn_like(x)
    z, _ = net.features(x, brain, x_hat_ct=cached)
    torch.testing.assert_close(z[:, :4], (x - cached).abs())
    z_default, _ = net.features(x, brain)
    torch.testing.assert_close(z_default[:, :4], (x - net.translate(x, brain)).abs())


def test_dr_and_de_stay_float32_under_bf16_autocast():
    net = ADMNetwork(_tiny())
    x, brain = _slices(2, 16, seed=7)
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        x_hat_ct = net.translate(x, brain)
        z, x_hat_dr = net.features(x, brain, x_hat_ct=x_hat_ct)
        gamma = net.estimator(z.permute(0, 2, 3, 1).reshape(-1, z.shape[1]))
    assert x_hat_ct.dtype == torch.bfloat16  # CtoC does follow the caller's autocast
    assert z.dtype == x_hat_dr.dtype == gamma.dtype == torch.float32
    with torch.no_grad():
        z_dr_ref = net.dr_encoder.layers(x)
    torch.testing.assert_close(z[:, 4:], z_dr_ref)  # exactly the float32 computation


def test_instance_norm_is_torchs_instance_norm_in_either_memory_format():
    norm = InstanceNorm2d(6, affine=True)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 2.0)
        norm.bias.uniform_(-1.0, 1.0)
    stock = torch.nn.InstanceNorm2d(6, affine=True)
    stock.load_state_dict(norm.state_dict())  # same parameters, same keys: model files unchanged
    x = torch.randn(3, 6, 20, 24) * 3 + 1
    expected = stock(x)
    torch.testing.assert_close(norm(x), expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(norm(x.contiguous(memory_format=torch.channels_last)), expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(norm(x[0]), stock(x[0]))  # unbatched input


def test_density_residuals_select_the_ctoc_residual_channels():
    full_cfg = dataclasses.replace(preset("tiny").model)
    picked_cfg = dataclasses.replace(full_cfg, density_residuals=("flair", "t2"))
    assert full_cfg.feature_dim == 7 and picked_cfg.feature_dim == 5
    torch.manual_seed(0)
    full = ADMNetwork(full_cfg).eval()
    picked = ADMNetwork(picked_cfg).eval()
    picked.ctoc.load_state_dict(full.ctoc.state_dict())
    picked.dr_encoder.load_state_dict(full.dr_encoder.state_dict())
    picked.dr_decoder.load_state_dict(full.dr_decoder.state_dict())
    x = torch.randn(2, 4, 32, 32)
    brain = torch.ones(2, 32, 32, dtype=torch.bool)
    with torch.no_grad():
        z_full, _ = full.features(x, brain)
        z_picked, _ = picked.features(x, brain)
    torch.testing.assert_close(z_picked, z_full[:, [0, 3, 4, 5, 6]])
    for bad in (("flair", "dwi"), ("t2", "t2")):
        with pytest.raises(ValueError, match="density_residuals"):
            ADMNetwork(dataclasses.replace(full_cfg, density_residuals=bad))


@pytest.mark.parametrize("uncertainty,context", [(False, 0), (True, 1)])
def test_translating_only_the_residual_contrasts_gives_the_same_features(uncertainty, context):
    # Inference translates only the density_residuals contrasts (one CtoC pass per slice for a FLAIR-only
    # model instead of four); the features must equal those from a cached translation of all four.
    cfg = dataclasses.replace(preset("tiny").model, density_residuals=("t2", "flair"),
                              ctoc_uncertainty=uncertainty, ctoc_context_slices=context)
    torch.manual_seed(0)
    network = ADMNetwork(cfg).eval()
    x, brain = _slices(3, 32)
    neighbours = torch.randn(3, 2 * context * 4, 32, 32) if context else None
    with torch.no_grad():
        full = network.translate(x, brain, neighbours)
        only = network.residual_translation(x, brain, neighbours)
        per_contrast = 2 if uncertainty else 1
        assert network.residual_contrasts == [3, 0]
        assert only.shape == (3, 2 * per_contrast, 32, 32)
        wanted = [k + part * 4 for part in range(per_contrast) for k in (3, 0)]
        torch.testing.assert_close(only, full[:, wanted], atol=1e-5, rtol=1e-5)
        from_full, _ = network.features(x, brain, full)
        from_only, _ = network.features(x, brain, residual_translation=only)
        computed, _ = network.features(x, brain, neighbours=neighbours)
    torch.testing.assert_close(from_only, from_full, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(computed, from_only)
    with pytest.raises(ValueError, match="residual contrasts"):
        network.features(x, brain, residual_translation=full)


def test_brighter_residuals_keep_only_what_is_brighter_than_predicted():
    cfg = dataclasses.replace(preset("tiny").model, density_residuals=("flair",))
    torch.manual_seed(0)
    both = ADMNetwork(cfg).eval()
    brighter = ADMNetwork(dataclasses.replace(cfg, residual_direction="brighter")).eval()
    brighter.load_state_dict(both.state_dict())
    x = torch.randn(2, 4, 32, 32)
    brain = torch.ones(2, 32, 32, dtype=torch.bool)
    with torch.no_grad():
        translation = both.translate(x, brain)
        z_both, _ = both.features(x, brain, translation)
        z_brighter, _ = brighter.features(x, brain, translation)
    signed = x[:, :1] - translation[:, :1]
    torch.testing.assert_close(z_both[:, :1], signed.abs())
    torch.testing.assert_close(z_brighter[:, :1], signed.clamp_min(0))
    assert (signed < 0).any() and (signed > 0).any()
    torch.testing.assert_close(z_brighter[:, 1:], z_both[:, 1:])  # Z_dr unchanged
    with pytest.raises(ValueError, match="residual_direction"):
        ADMNetwork(dataclasses.replace(cfg, residual_direction="darker"))


def test_hidden_with_replaces_the_paired_contrast_by_its_median_in_the_slice_and_its_neighbours():
    x, brain = _slices(2, 16, seed=4)
    neighbours = torch.randn(2, 2 * 4, 16, 16)
    recorder = _RecordingCtoC()
    translate_all(recorder, x, brain, neighbours, hidden_with=[(0, 3)])
    medians = brain_medians(x, brain)
    inputs = recorder.inputs.view(4, 2, 3, 4, 16, 16)  # (translation, sample, image, channel, H, W)
    for b in range(2):
        for image in range(3):
            # Making FLAIR (0): FLAIR and T2 (3) are both the median map, T1 and T1c are seen.
            assert torch.all(inputs[0, b, image, 3] == medians[b, 3])
            assert torch.all(inputs[0, b, image, 0] == medians[b, 0])
            seen = x[b, 1:3] if image == 0 else neighbours[b].view(2, 4, 16, 16)[image - 1, 1:3]
            assert torch.equal(inputs[0, b, image, 1:3], seen)
        # Making T2 still reads FLAIR: only the made contrast is hidden there.
        assert torch.equal(inputs[3, b, 0, 0], x[b, 0])


def test_a_ctoc_that_hides_t2_from_flair_makes_flair_whatever_t2_shows():
    cfg = dataclasses.replace(preset("tiny").model, ctoc_flair_hides_t2=True, ctoc_uncertainty=True)
    torch.manual_seed(0)
    network = ADMNetwork(cfg).eval()
    x, brain = _slices(2, 32)
    lesion = x.clone()
    # A T2 lesion that brightens only pixels already above T2's median, so the median stays.
    above = lesion[:, 3] > brain_medians(x, brain)[:, 3].view(2, 1, 1)
    lesion[:, 3, 10:16, 10:16] += 4.0 * above[:, 10:16, 10:16]
    with torch.no_grad():
        plain, changed = network.translate(x, brain), network.translate(lesion, brain)
    assert torch.equal(brain_medians(x, brain)[:, 3], brain_medians(lesion, brain)[:, 3])
    torch.testing.assert_close(changed[:, [0, 4]], plain[:, [0, 4]])  # FLAIR's mean and log-variance
    assert not torch.allclose(changed[:, 1], plain[:, 1])  # T1 is made from T2 as before
    faithful = ADMNetwork(dataclasses.replace(cfg, ctoc_flair_hides_t2=False)).eval()
    faithful.load_state_dict(network.state_dict())
    with torch.no_grad():
        assert not torch.allclose(faithful.translate(lesion, brain)[:, 0], faithful.translate(x, brain)[:, 0])
    with pytest.raises(ValueError, match="ctoc_flair_hides_t2"):
        ADMNetwork(dataclasses.replace(cfg, ctoc_flair_hides_t2=1))
