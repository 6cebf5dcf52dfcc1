"""Mixture statistics and energy: correctness against scipy, gradients, and numerical guards."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.special import logsumexp
from scipy.stats import multivariate_normal

from ADMAnomalyLib.gmm import (
    BoundEigenvalues,
    GMMAccumulator,
    GMMParams,
    SingularCovarianceError,
    bound_eigenvalues,
    diagonal_penalty,
    energy,
    mixture_statistics,
)

F64 = torch.float64
EPS = 1e-6


def _random_spd(d: int, eigenvalues: list[float], seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=F64))
    return q @ torch.diag(torch.tensor(eigenvalues, dtype=F64)) @ q.T


def _features(n: int, d: int, c: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(n, d, generator=gen, dtype=F64) @ torch.randn(d, d, generator=gen, dtype=F64)
    gamma = torch.softmax(torch.randn(n, c, generator=gen, dtype=F64), dim=1)
    return z, gamma


def _energy_and_grads(z: torch.Tensor, gamma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    z = z.clone().requires_grad_()
    gamma = gamma.clone().requires_grad_()
    e = energy(z, mixture_statistics(z, gamma, eps=EPS))
    e.mean().backward()
    return e.detach(), z.grad, gamma.grad


def _all_finite(*tensors: torch.Tensor) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in tensors)


# --- BoundEigenvalues -------------------------------------------------------------------------


def test_bound_forward_clamps_eigenvalues_only_below_eps():
    sigma = _random_spd(4, [1e-9, 5e-7, 0.3, 2.0], seed=1)
    lam = torch.linalg.eigvalsh(bound_eigenvalues(sigma, EPS))
    torch.testing.assert_close(lam, torch.tensor([EPS, EPS, 0.3, 2.0], dtype=F64), rtol=1e-9, atol=1e-12)
    well = _random_spd(3, [0.5, 1.0, 4.0], seed=2)
    torch.testing.assert_close(bound_eigenvalues(well, EPS), well)


def test_bound_gradcheck_random_spd():
    sigma = _random_spd(4, [0.2, 0.7, 1.5, 3.0], seed=3).requires_grad_()
    assert torch.autograd.gradcheck(lambda s: BoundEigenvalues.apply(s, EPS), (sigma,))


def test_bound_gradcheck_near_singular():
    # Eigenvalues on both sides of eps (none within the finite-difference step of the kink), plus a
    # near-degenerate pair straddling it, so the divided differences in (0, 1) are exercised.
    for eigenvalues, bound in (([1e-9, 3e-6, 1.0, 2.0], EPS), ([1e-4, 5e-3, 1.0, 1.0], 1e-3)):
        sigma = _random_spd(4, eigenvalues, seed=4).requires_grad_()
        assert torch.autograd.gradcheck(
            lambda s, b=bound: BoundEigenvalues.apply(s, b), (sigma,), eps=1e-9, atol=1e-6
        )


def test_bound_gradcheck_batched_and_isotropic():
    sigma = torch.stack([2.0 * torch.eye(3, dtype=F64), 1e-8 * torch.eye(3, dtype=F64)]).requires_grad_()
    assert torch.autograd.gradcheck(lambda s: BoundEigenvalues.apply(s, EPS), (sigma,), eps=1e-10, atol=1e-6)


@pytest.mark.parametrize("eigenvalues", [[2.0, 2.0, 2.0], [1.0, 1.0, 3.0]])
def test_repeated_eigenvalues_naive_eigh_backward_is_nan_ours_is_finite(eigenvalues):
    weights = torch.randn(3, 3, dtype=F64, generator=torch.Generator().manual_seed(5))

    naive_in = torch.diag(torch.tensor(eigenvalues, dtype=F64)).requires_grad_()
    lam, q = torch.linalg.eigh(naive_in)
    ((q * lam.clamp_min(EPS).unsqueeze(-2)) @ q.T * weights).sum().backward()
    assert not _all_finite(naive_in.grad)

    ours_in = torch.diag(torch.tensor(eigenvalues, dtype=F64)).requires_grad_()
    (bound_eigenvalues(ours_in, EPS) * weights).sum().backward()
    assert _all_finite(ours_in.grad)
    # All eigenvalues are above eps, so the bound is the identity map and so is its derivative.
    torch.testing.assert_close(ours_in.grad, 0.5 * (weights + weights.T))


# --- statistics and energy ---------------------------------------------------------------------


def test_energy_matches_scipy_mixture_logpdf():
    z, gamma = _features(300, 4, 3, seed=6)
    params = mixture_statistics(z, gamma, eps=EPS)
    reference = -logsumexp(
        [
            math.log(w) + multivariate_normal(mean=m, cov=c).logpdf(z.numpy())
            for w, m, c in zip(*(v for v in params.to_dict().values()))
        ],
        axis=0,
    )
    result = energy(z, params)
    assert result.dtype == F64
    np.testing.assert_allclose(result.numpy(), reference, rtol=1e-10, atol=1e-10)


def test_statistics_match_weighted_numpy_estimates():
    z, gamma = _features(200, 3, 2, seed=7)
    params = mixture_statistics(z, gamma, eps=EPS)
    zn, gn = z.numpy(), gamma.numpy()
    for c in range(2):
        np.testing.assert_allclose(params.weights[c].item(), gn[:, c].mean())
        mean = np.average(zn, axis=0, weights=gn[:, c])
        np.testing.assert_allclose(params.means[c].numpy(), mean, rtol=1e-12)
        cov = np.cov(zn.T, aweights=gn[:, c], bias=True)
        np.testing.assert_allclose(params.covariances[c].numpy(), cov, rtol=1e-10, atol=1e-12)


def test_energy_lower_near_a_mean_than_far_away():
    z, gamma = _features(300, 3, 2, seed=8)
    params = mixture_statistics(z, gamma, eps=EPS)
    near = params.means[0:1]
    far = params.means[0:1] + 20.0 * z.std(dim=0)
    assert energy(near, params).item() < energy(far, params).item()


def test_energy_pipeline_gradcheck():
    z, gamma_logits = _features(40, 3, 2, seed=9)
    z.requires_grad_()
    gamma_logits.requires_grad_()

    def pipeline(features: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        gamma = torch.softmax(logits, dim=1)
        return energy(features, mixture_statistics(features, gamma, eps=EPS)).mean()

    assert torch.autograd.gradcheck(pipeline, (z, gamma_logits))


def test_energy_pipeline_gradcheck_features_on_a_plane():
    # One constant feature: its variance is 0, bounded to eps; finite differences (1e-6) keep it
    # below eps, so the analytic gradient through the clamped direction must match.
    z, gamma_logits = _features(30, 3, 2, seed=10)
    z[:, 1] = 0.25
    z.requires_grad_()
    gamma_logits.requires_grad_()
    assert torch.autograd.gradcheck(
        lambda f, g: energy(f, mixture_statistics(f, torch.softmax(g, 1), eps=EPS)).mean(), (z, gamma_logits)
    )


def test_isotropic_covariance_energy_and_gradients_finite():
    # Four points at the corners of a square, equal memberships: covariance = s * I exactly.
    z = torch.tensor([[1.0, 1.0], [1.0, -1.0], [-1.0, 1.0], [-1.0, -1.0]], dtype=F64)
    gamma = torch.full((4, 2), 0.5, dtype=F64)
    params = mixture_statistics(z, gamma, eps=EPS)
    torch.testing.assert_close(params.covariances[0], torch.eye(2, dtype=F64))
    assert _all_finite(*_energy_and_grads(z, gamma))


def test_features_on_a_plane_energy_and_gradients_finite():
    z, gamma = _features(500, 7, 6, seed=11)
    z[:, 3] = -1.5  # a collapsed feature dimension: exactly singular raw covariance
    e, gz, gg = _energy_and_grads(z, gamma)
    assert _all_finite(e, gz, gg)
    lam = torch.linalg.eigvalsh(mixture_statistics(z, gamma, eps=EPS).covariances)
    assert float(lam.min()) >= EPS * (1 - 1e-6)


def test_plane_without_bound_is_reported_as_singular():
    z, gamma = _features(500, 4, 2, seed=12)
    z[:, 0] = 0.0
    z[:, 1] = 0.0  # rank-2 data in 4-D: the raw covariance is exactly singular
    params = mixture_statistics(z, gamma, bound=False)
    with pytest.raises(SingularCovarianceError, match="component"):
        energy(z, params)
    assert diagonal_penalty(params.covariances).item() == math.inf


def test_component_without_membership_is_finite():
    z, gamma = _features(400, 5, 3, seed=13)
    for floor in (1e-12, 0.0):
        starved = gamma.clone()
        starved[:, 2] = floor
        starved = starved / starved.sum(dim=1, keepdim=True)
        e, gz, gg = _energy_and_grads(z, starved)
        assert _all_finite(e, gz, gg), f"membership floor {floor}"


@pytest.mark.parametrize("scale", [1e-5, 1e4])
def test_extreme_feature_scales_are_finite(scale):
    z, gamma = _features(400, 7, 6, seed=14)
    e, gz, gg = _energy_and_grads(z * scale, gamma)
    assert _all_finite(e, gz, gg)


def test_float32_features_give_float64_energy_and_float32_gradients():
    z, gamma = _features(100, 3, 2, seed=15)
    z32 = z.float().requires_grad_()
    e = energy(z32, mixture_statistics(z32, gamma.float(), eps=EPS))
    assert e.dtype == F64
    e.mean().backward()
    assert z32.grad.dtype == torch.float32 and _all_finite(z32.grad)


def test_diagonal_penalty():
    cov = torch.stack([torch.diag(torch.tensor([2.0, 4.0], dtype=F64)), torch.eye(2, dtype=F64)])
    assert diagonal_penalty(cov).item() == pytest.approx(0.5 + 0.25 + 2.0)


# --- accumulator and parameter container --------------------------------------------------------


def _assert_params_close(a: GMMParams, b: GMMParams) -> None:
    for name in ("weights", "means", "covariances"):
        torch.testing.assert_close(getattr(a, name), getattr(b, name), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("bound", [True, False])
def test_accumulator_equals_one_shot_estimate(bound):
    z, gamma = _features(1000, 7, 6, seed=16)
    z[:, 2] = 3.0  # include a collapsed dimension so the bound is active
    one_shot = mixture_statistics(z, gamma, eps=EPS, bound=bound)

    single = GMMAccumulator(6, 7)
    single.update(z, gamma)
    _assert_params_close(single.finalize(EPS, bound=bound), one_shot)

    split = GMMAccumulator(6, 7)
    for chunk_z, chunk_g in zip(z.split(137), gamma.split(137)):
        split.update(chunk_z, chunk_g)
    _assert_params_close(split.finalize(EPS, bound=bound), one_shot)


def test_accumulator_merge_state_and_centre():
    z, gamma = _features(600, 4, 3, seed=17)
    z = z + 50.0  # offset features: the centre keeps S2/S0 − μμᵀ accurate
    one_shot = mixture_statistics(z, gamma, eps=EPS)
    centre = torch.full((4,), 50.0, dtype=F64)
    left, right = GMMAccumulator(3, 4, centre=centre), GMMAccumulator(3, 4, centre=centre)
    left.update(z[:250], gamma[:250])
    right.update(z[250:], gamma[250:])
    for name, tensor in left.state().items():  # what the all-reduce of distributed training does
        tensor += right.state()[name]
    assert set(left.state()) == {"count", "s0", "s1", "s2"}
    assert left.state()["count"].item() == 600
    _assert_params_close(left.finalize(EPS), one_shot)


def test_accumulator_rejects_empty_and_mismatched_input():
    acc = GMMAccumulator(2, 3)
    with pytest.raises(ValueError):
        acc.finalize()
    with pytest.raises(ValueError):
        acc.update(torch.zeros(5, 4), torch.zeros(5, 2))


def test_params_dict_round_trip_and_validate():
    z, gamma = _features(200, 3, 2, seed=18)
    params = mixture_statistics(z, gamma, eps=EPS).detach()
    data = params.to_dict()
    assert set(data) == {"weights", "means", "covariances"}
    assert all(isinstance(v, np.ndarray) and v.dtype == np.float64 for v in data.values())
    restored = GMMParams.from_dict(data)
    restored.validate()
    _assert_params_close(restored, params)
    assert restored.to("cpu").covariances.dtype == F64

    broken = GMMParams.from_dict({**data, "weights": data["weights"] * 2})
    with pytest.raises(ValueError, match="sum to 1"):
        broken.validate()
    singular = GMMParams.from_dict({**data, "covariances": np.zeros_like(data["covariances"])})
    with pytest.raises(ValueError, match="positive definite"):
        singular.validate()
    nan_means = GMMParams.from_dict({**data, "means": np.full_like(data["means"], np.nan)})
    with pytest.raises(ValueError, match="non-finite"):
        nan_means.validate()


def test_accumulator_and_energy_work_under_inference_mode():
    # The trainer fits the frozen mixture and scores pixels inside torch.inference_mode().
    z, gamma = _features(300, 4, 3, seed=19)
    acc = GMMAccumulator(3, 4)
    with torch.inference_mode():
        acc.update(z.float(), gamma.float())
        scores = energy(z.float(), mixture_statistics(z, gamma, eps=EPS))
    params = acc.finalize(EPS)
    assert not params.covariances.is_inference()
    torch.testing.assert_close(energy(z.float(), params), scores, rtol=1e-6, atol=1e-6)
