"""Gaussian mixture statistics and energy with the paper's eigenvalue bound (method.md, 'DE').

Dtype convention: every mixture quantity (weights, means, covariances, energies) is computed and
returned in float64, whatever the dtype of the features; gradients still flow back to float32
features. The d×d algebra is tiny, so float64 costs nothing and keeps near-singular covariances
(eigenvalues ~1e-6 next to ~1) well resolved.

Numerical guards, each against a failure seen in practice:

* ``eigh``'s backward divides by eigenvalue gaps and gives NaN/inf for repeated eigenvalues (an
  isotropic covariance is enough), so the bound ``Λ_p = ReLU(Λ − ε) + ε`` has its own backward
  (:class:`BoundEigenvalues`, Daleckii–Krein divided differences), exact for repeated eigenvalues.
* A component that receives (almost) no membership gets a floored denominator (no 0/0) and a
  floored log-weight (no log 0 and no ``0 · inf`` in the backward).
* Log-densities are combined with log-sum-exp; Mahalanobis distances use a batched triangular solve
  against the Cholesky factor and the log-determinant comes from its diagonal, never from an
  explicit inverse or determinant.

A covariance whose Cholesky factorisation fails is reported as :class:`SingularCovarianceError`
rather than patched with jitter: with the bound this only happens when the condition number exceeds
~1e15, i.e. feature standard deviations around 1e4–1e5 next to a collapsed direction (ε = 1e-6);
without the bound it is exactly the singularity the paper's ablation is meant to expose.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.autograd.function import once_differentiable

from .errors import ADMError

DEFAULT_EPS = 1e-6
"""The paper's eigenvalue bound ε (``ModelConfig.eps`` holds the configured value)."""

_TINY = 1e-30
# Floor for membership sums and mixture weights. Small enough never to matter for a component
# that owns any pixel, large enough that 1/floor (which appears in the backward) cannot overflow.

_GAP_RTOL = 1e-10
# Eigenvalues closer than this (relative to the largest |eigenvalue|) are treated as equal in the
# divided differences: their computed gap is dominated by rounding, so the limit f'(λ) is used.

_PARAM_NAMES = ("weights", "means", "covariances")


class SingularCovarianceError(ADMError, ValueError):
    """A mixture covariance is not numerically positive definite (Cholesky failed)."""


@dataclass
class GMMParams:
    """A fitted mixture: ``weights`` (C,), ``means`` (C, d), ``covariances`` (C, d, d), float64.

    Covariances are stored already bounded (when fitted with the bound), so scoring needs no eigen
    decomposition.
    """

    weights: torch.Tensor
    means: torch.Tensor
    covariances: torch.Tensor

    @property
    def n_components(self) -> int:
        return int(self.weights.shape[0])

    @property
    def dim(self) -> int:
        return int(self.means.shape[-1])

    def to(self, device: torch.device | str) -> "GMMParams":
        """A copy on ``device`` (float64 is kept)."""
        return GMMParams(*(getattr(self, n).to(device=device, dtype=torch.float64) for n in _PARAM_NAMES))

    def detach(self) -> "GMMParams":
        """A copy cut from the autograd graph, e.g. to freeze the mixture fitted at the end of training."""
        return GMMParams(*(getattr(self, n).detach() for n in _PARAM_NAMES))

    def to_dict(self) -> dict[str, np.ndarray]:
        """Plain float64 numpy arrays keyed by field name (for the model file)."""
        return {n: getattr(self, n).detach().cpu().to(torch.float64).numpy().copy() for n in _PARAM_NAMES}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "GMMParams":
        """Inverse of :meth:`to_dict`; a missing key raises ``KeyError``. Call :meth:`validate` after."""
        return cls(*(torch.as_tensor(np.asarray(data[n], dtype=np.float64)) for n in _PARAM_NAMES))

    def validate(self) -> None:
        """Raise ``ValueError`` unless shapes agree, all values are finite, the weights form a
        distribution and every covariance is symmetric positive definite."""
        w, mu, cov = self.weights, self.means, self.covariances
        if w.ndim != 1 or mu.ndim != 2 or cov.ndim != 3:
            raise ValueError(
                f"mixture arrays have {w.ndim}/{mu.ndim}/{cov.ndim} dimensions, expected 1/2/3"
            )
        c, d = mu.shape
        if w.shape[0] != c or cov.shape != (c, d, d) or c == 0 or d == 0:
            raise ValueError(
                f"inconsistent mixture shapes: weights {tuple(w.shape)}, means {tuple(mu.shape)}, "
                f"covariances {tuple(cov.shape)}"
            )
        for name in _PARAM_NAMES:
            if not bool(torch.isfinite(getattr(self, name)).all()):
                raise ValueError(f"mixture {name} contain non-finite values")
        if bool((w < 0).any()) or abs(float(w.sum()) - 1.0) > 1e-6:
            raise ValueError(f"mixture weights must be non-negative and sum to 1 (sum {float(w.sum()):.6g})")
        cov64 = cov.detach().to(torch.float64)
        asym = (cov64 - cov64.mT).abs().amax()
        if float(asym) > 1e-8 * max(float(cov64.abs().amax()), 1e-300):
            raise ValueError("mixture covariances are not symmetric")
        _, info = torch.linalg.cholesky_ex(cov64)
        bad = torch.nonzero(info).flatten().tolist()
        if bad:
            raise ValueError(f"mixture covariance(s) of component(s) {bad} are not positive definite")


class BoundEigenvalues(torch.autograd.Function):
    """``Σ ↦ Q max(Λ, ε) Qᵀ`` for symmetric ``Σ = Q Λ Qᵀ`` (batched, (..., d, d)).

    This is ``Λ_p = ReLU(Λ − ε) + ε``. The backward is the Daleckii–Krein formula
    ``∂Σ = Q (K ∘ Qᵀ sym(∂Σ_p) Q) Qᵀ`` with the divided differences ``K_ij`` of ``f = max(·, ε)``;
    unlike ``eigh``'s own backward it needs no eigenvalue gap and so stays finite for repeated
    eigenvalues. The input is symmetrised first, so the gradient is symmetric.
    Use through :func:`bound_eigenvalues`.
    """

    @staticmethod
    def forward(ctx: Any, sigma: torch.Tensor, eps: float) -> torch.Tensor:
        lam, q = torch.linalg.eigh(0.5 * (sigma + sigma.mT))
        bounded = (q * lam.clamp_min(eps).unsqueeze(-2)) @ q.mT
        ctx.save_for_backward(lam, q)
        ctx.eps = eps
        return 0.5 * (bounded + bounded.mT)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        lam, q = ctx.saved_tensors
        g = q.mT @ (0.5 * (grad + grad.mT)) @ q
        k = _bound_divided_differences(lam, ctx.eps)
        return q @ (k * g) @ q.mT, None


def _bound_divided_differences(lam: torch.Tensor, eps: float) -> torch.Tensor:
    """``K_ij = (f(λi) − f(λj)) / (λi − λj)`` for ``f = max(·, ε)``, with ``f'`` at the midpoint
    where the gap is at rounding level (and on the diagonal)."""
    bounded = lam.clamp_min(eps)
    gap = lam.unsqueeze(-1) - lam.unsqueeze(-2)
    scale = lam.abs().amax(dim=-1, keepdim=True).clamp_min(eps).unsqueeze(-1)
    close = gap.abs() <= _GAP_RTOL * scale
    ratio = (bounded.unsqueeze(-1) - bounded.unsqueeze(-2)) / torch.where(close, torch.ones_like(gap), gap)
    # f is monotone and 1-Lipschitz, so every divided difference lies in [0, 1]; clamping only
    # removes rounding noise.
    midpoint_slope = (0.5 * (lam.unsqueeze(-1) + lam.unsqueeze(-2)) > eps).to(lam.dtype)
    return torch.where(close, midpoint_slope, ratio.clamp(0.0, 1.0))


def bound_eigenvalues(sigma: torch.Tensor, eps: float = DEFAULT_EPS) -> torch.Tensor:
    """Raise every eigenvalue of the symmetric matrices ``sigma`` (..., d, d) to at least ``eps``."""
    return BoundEigenvalues.apply(sigma, float(eps))


def mixture_statistics(
    z: torch.Tensor, gamma: torch.Tensor, eps: float = DEFAULT_EPS, bound: bool = True
) -> GMMParams:
    """Differentiable mixture estimates from features ``z`` (N, d) and memberships ``gamma`` (N, C).

    ``π_c = mean_n γ_nc``, ``μ_c`` and ``Σ_c`` are the γ-weighted mean and covariance, all float64.
    With ``bound`` the covariances are passed through :func:`bound_eigenvalues`; without it they are
    raw (the paper's singularity experiment).
    """
    _check_features(z, gamma)
    z64 = z.to(torch.float64)
    g64 = gamma.to(torch.float64)
    mass = g64.sum(dim=0)  # (C,)
    denom = mass + _TINY
    means = (g64.mT @ z64) / denom.unsqueeze(-1)
    # Centre before forming outer products: S2/S0 − μμᵀ cancels catastrophically when |μ| ≫ σ.
    centred = z64.unsqueeze(0) - means.unsqueeze(1)  # (C, N, d)
    weighted = centred * g64.mT.unsqueeze(-1)
    cov = (weighted.mT @ centred) / denom.view(-1, 1, 1)
    return _finish(mass / z.shape[0], means, cov, eps, bound)


def _finish(
    weights: torch.Tensor, means: torch.Tensor, cov: torch.Tensor, eps: float, bound: bool
) -> GMMParams:
    cov = 0.5 * (cov + cov.mT)
    if bound:
        cov = bound_eigenvalues(cov, eps)
    return GMMParams(weights, means, cov)


def _check_features(z: torch.Tensor, gamma: torch.Tensor) -> None:
    if z.ndim != 2 or gamma.ndim != 2 or z.shape[0] != gamma.shape[0]:
        raise ValueError(
            f"expected features (N, d) and memberships (N, C), got {tuple(z.shape)} and {tuple(gamma.shape)}"
        )
    if z.shape[0] == 0:
        raise ValueError("no pixels to estimate the mixture from")


def energy(z: torch.Tensor, params: GMMParams) -> torch.Tensor:
    """Sample energy ``E_n = −log Σ_c π_c N(z_n | μ_c, Σ_c)`` for features ``z`` (N, d).

    Returned in float64 (cast if needed; ``.mean()`` of it is the loss term). Raises
    :class:`SingularCovarianceError` when a covariance is not numerically positive definite.
    """
    if z.ndim != 2 or z.shape[1] != params.dim:
        raise ValueError(f"expected features (N, {params.dim}), got {tuple(z.shape)}")
    with torch.autocast(device_type=z.device.type, enabled=False):
        return _energy64(z.to(torch.float64), params)


def _energy64(z: torch.Tensor, params: GMMParams) -> torch.Tensor:
    cov = params.covariances.to(torch.float64)
    chol, info = torch.linalg.cholesky_ex(cov)
    if bool(info.any()):
        bad = torch.nonzero(info).flatten().tolist()
        raise SingularCovarianceError(
            f"mixture covariance of component(s) {bad} is not numerically positive definite: "
            "singular (fitted without the eigenvalue bound) or largest/smallest eigenvalue beyond ~1e15"
        )
    d = z.shape[1]
    centred = z.mT.unsqueeze(0) - params.means.to(torch.float64).unsqueeze(-1)  # (C, d, N)
    # One batched solve over all components: L y = (z − μ) gives maha = |y|².
    whitened = torch.linalg.solve_triangular(chol, centred, upper=False)
    maha = whitened.square().sum(dim=1)  # (C, N)
    log_det = 2.0 * torch.diagonal(chol, dim1=-2, dim2=-1).log().sum(dim=-1)  # (C,)
    # A component with no membership has π = 0; the floor keeps log π and its gradient finite.
    log_weights = params.weights.to(torch.float64).clamp_min(_TINY).log()
    log_norm = log_weights - 0.5 * (d * math.log(2.0 * math.pi) + log_det)
    return -torch.logsumexp(log_norm.unsqueeze(1) - 0.5 * maha, dim=0)


def diagonal_penalty(covariances: torch.Tensor) -> torch.Tensor:
    """DAGMM's singularity penalty ``Σ_c Σ_i 1 / Σ_c,ii`` (scalar; infinite for a zero variance).

    Provided for the baseline/ablation that uses it instead of the eigenvalue bound.
    """
    return torch.diagonal(covariances, dim1=-2, dim2=-1).reciprocal().sum()


class GMMAccumulator:
    """Streaming float64 sufficient statistics of a mixture over a pass of data.

    ``update`` adds ``S0 = Σγ``, ``S1 = Σγz``, ``S2 = Σγ zzᵀ`` and the pixel count; ``finalize``
    turns them into :class:`GMMParams` identical (to float64 rounding) to
    :func:`mixture_statistics` on all the data at once. ``state()`` returns the live tensors, so a
    distributed trainer can ``all_reduce`` (sum) them in place before ``finalize``.

    ``S2/S0 − μμᵀ`` loses about ``log10(|μ|²/σ²)`` of float64's 16 digits, harmless for features of
    unit scale; pass ``centre`` (e.g. a rough feature mean, same on every rank) for offset features.
    """

    def __init__(
        self,
        n_components: int,
        dim: int,
        device: torch.device | str | None = None,
        centre: torch.Tensor | None = None,
    ) -> None:
        kw = {"dtype": torch.float64, "device": device}
        self.count = torch.zeros((), **kw)
        self.s0 = torch.zeros(n_components, **kw)
        self.s1 = torch.zeros(n_components, dim, **kw)
        self.s2 = torch.zeros(n_components, dim, dim, **kw)
        self.centre = torch.zeros(dim, **kw) if centre is None else centre.detach().to(**kw).reshape(dim)

    @torch.no_grad()
    def update(self, z: torch.Tensor, gamma: torch.Tensor) -> None:
        """Add features ``z`` (N, d) with memberships ``gamma`` (N, C) (detached)."""
        _check_features(z, gamma)
        if gamma.shape[1] != self.s0.shape[0] or z.shape[1] != self.s1.shape[1]:
            raise ValueError(
                f"accumulator holds C={self.s0.shape[0]}, d={self.s1.shape[1]}; got z {tuple(z.shape)}, "
                f"gamma {tuple(gamma.shape)}"
            )
        z64 = z.detach().to(self.s1) - self.centre
        g64 = gamma.detach().to(self.s1)
        self.count += z.shape[0]
        self.s0 += g64.sum(dim=0)
        self.s1 += g64.mT @ z64
        self.s2 += torch.einsum("nc,ni,nj->cij", g64, z64, z64)

    def state(self) -> dict[str, torch.Tensor]:
        """The live statistic tensors (summing them across workers merges accumulators)."""
        return {"count": self.count, "s0": self.s0, "s1": self.s1, "s2": self.s2}

    def finalize(self, eps: float = DEFAULT_EPS, bound: bool = True) -> GMMParams:
        """Mixture parameters from the accumulated statistics (covariances bounded by default)."""
        if float(self.count) <= 0:
            raise ValueError("the accumulator has seen no pixels")
        denom = self.s0 + _TINY
        shifted_means = self.s1 / denom.unsqueeze(-1)
        # Same as the one-shot estimate Σγ(z−μ)(z−μ)ᵀ / (S0 + tiny), expanded.
        cross = shifted_means.unsqueeze(-1) * self.s1.unsqueeze(-2)
        cov = (self.s2 - (2.0 - self.s0 / denom).view(-1, 1, 1) * cross) / denom.view(-1, 1, 1)
        return _finish(self.s0 / self.count, shifted_means + self.centre, cov, eps, bound)
