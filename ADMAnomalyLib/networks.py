"""The ADM networks (method.md, 'Networks'): CtoC translation, DR auto-encoder, DE estimator.

Sizes come from :class:`~ADMAnomalyLib.config.ModelConfig`. The DR and DE parts always run in
float32 with autocast disabled: they are tiny, and their outputs feed float64 mixture statistics
whose covariances must resolve eigenvalues near ε = 1e-6, which bf16 (8-bit mantissa) cannot.
Only CtoC benefits from (and tolerates) a caller's bf16 autocast.

Beyond the paper, ``ModelConfig.ctoc_uncertainty`` gives CtoC a second output channel, the
log-variance s of each translated pixel, and Z_ct becomes |X − X̂| / exp(s/2). A *translation* (what
:func:`translate_all` returns and callers may cache) is then (B, 2K, H, W): the K translated contrasts
followed by their K log-variances; without the option it is (B, K, H, W), the faithful X̂_ct. A
translation of some contrasts only (:meth:`ADMNetwork.residual_translation`: those whose residuals are
density features) has the same layout with their number in place of K. Code outside this module
passes translations on unopened; :func:`ctoc_residual` is what reads them.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .config import CONTRASTS, ModelConfig

LOG_VARIANCE_RANGE = (-8.0, 8.0)
"""Clamp of the predicted log-variance: sigma between e^-4 and e^4 z-score units. Keeps exp(-s) in
the loss and the division in Z_ct finite while the head is still untrained or a pixel is trivially
predictable (background-like), where the NLL would otherwise push s towards minus infinity."""


class InstanceNorm2d(nn.InstanceNorm2d):
    """Affine instance normalisation computed as a group norm with one channel per group (the same
    statistics, the same parameters and state-dict keys, so model files are unchanged).

    PyTorch's CPU instance-norm kernel is slow on the channels-last tensors inference uses (2.5-7x
    slower than group norm per call here); the group-norm kernel has a channels-last path, which cut
    the bundled CtoC's CPU time by ~30 % at equal results (max difference ~1e-5)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4:  # group_norm needs the batch axis; unbatched input keeps the stock path
            return super().forward(x)
        return nn.functional.group_norm(x, self.num_features, self.weight, self.bias, self.eps)


def _norm_relu(channels: int) -> list[nn.Module]:
    return [InstanceNorm2d(channels, affine=True), nn.ReLU(inplace=True)]


class ResidualBlock(nn.Module):
    """``x + IN(Conv3×3(ReLU(IN(Conv3×3(x)))))`` with reflection padding (Johnson et al. 2016)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        # Convs followed by an affine InstanceNorm need no bias: the norm's shift replaces it.
        self.body = nn.Sequential(
            nn.ReflectionPad2d(1),
            nn.Conv2d(channels, channels, 3, bias=False),
            *_norm_relu(channels),
            nn.ReflectionPad2d(1),
            nn.Conv2d(channels, channels, 3, bias=False),
            InstanceNorm2d(channels, affine=True),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class CtoCNet(nn.Module):
    """Contrast-to-contrast translator G_ct (style-transfer ResNet, one network for all contrasts).

    ``forward(x_masked (B, n_contrasts × (1 + slice_context.images), H, W), median_map (B, 1, H, W))
    -> (B, C, H, W)``; H and W must be divisible by 4. C is 1 (the translated contrast), or 2 with
    ``cfg.ctoc_uncertainty`` (translated contrast, unclamped log-variance). With ``cfg.median_bias`` the median map is also
    concatenated to the input of the output conv, giving the last layer the target contrast's
    intensity level.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        width, kernel = cfg.ctoc_width, cfg.ctoc_stem_kernel
        self.median_bias = cfg.median_bias
        self.encoder = nn.Sequential(
            nn.ReflectionPad2d(kernel // 2),
            nn.Conv2d(cfg.n_contrasts * (1 + cfg.slice_context.images), width, kernel, bias=False),
            *_norm_relu(width),
            nn.Conv2d(width, 2 * width, 3, stride=2, padding=1, bias=False),
            *_norm_relu(2 * width),
            nn.Conv2d(2 * width, 4 * width, 3, stride=2, padding=1, bias=False),
            *_norm_relu(4 * width),
            *(ResidualBlock(4 * width) for _ in range(cfg.ctoc_res_blocks)),
        )
        self.decoder = nn.Sequential(
            nn.ConvTranspose2d(4 * width, 2 * width, 3, stride=2, padding=1, output_padding=1, bias=False),
            *_norm_relu(2 * width),
            nn.ConvTranspose2d(2 * width, width, 3, stride=2, padding=1, output_padding=1, bias=False),
            *_norm_relu(width),
        )
        # The output conv mirrors the stem (Johnson et al. use the same large kernel at both ends);
        # no norm or activation, as the target intensities are z-scores of either sign.
        self.head = nn.Sequential(
            nn.ReflectionPad2d(kernel // 2),
            nn.Conv2d(width + int(cfg.median_bias), 1 + int(cfg.ctoc_uncertainty), kernel),
        )
        if cfg.ctoc_uncertainty:
            _start_at_unit_variance(self.head[-1])

    def forward(self, x_masked: torch.Tensor, median_map: torch.Tensor) -> torch.Tensor:
        if x_masked.shape[-2] % 4 or x_masked.shape[-1] % 4:
            raise ValueError(f"CtoC needs H and W divisible by 4, got {tuple(x_masked.shape[-2:])}")
        features = self.decoder(self.encoder(x_masked))
        if self.median_bias:
            features = torch.cat([features, median_map.to(features.dtype)], dim=1)
        return self.head(features)


@torch.no_grad()
def _start_at_unit_variance(conv: nn.Conv2d) -> None:
    # s = 0 everywhere at first: sigma 1 is the z-scored intensities' own scale, so Z_ct starts as
    # the faithful |X - X_hat| and the NLL's early gradients do not come from a random variance map.
    conv.weight[1:].zero_()
    conv.bias[1:].zero_()


@torch.no_grad()
def brain_medians(x: torch.Tensor, brain: torch.Tensor) -> torch.Tensor:
    """Per-sample, per-contrast median of ``x`` (B, K, H, W) over ``brain`` (B, H, W) -> (B, K).

    The lower median (torch's convention: element ``(n − 1) // 2`` of the sorted values); a sample
    without brain pixels gets 0, the background value.
    """
    masked = x.detach().float().masked_fill(~brain.bool().unsqueeze(1), float("nan"))
    medians = masked.flatten(2).nanmedian(dim=2).values
    return torch.nan_to_num(medians, nan=0.0).to(x.dtype)


def translate_all(ctoc: nn.Module, x: torch.Tensor, brain: torch.Tensor,
                  neighbours: torch.Tensor | None = None, contrasts: Sequence[int] | None = None,
                  mirror: bool = False, hidden_with: Sequence[tuple[int, int]] = ()) -> torch.Tensor:
    """The translation of ``x`` (B, K, H, W): contrast k synthesised from the others, for every k at once
    (for the contrast indices ``contrasts`` only, in that order, when given: a translation of those
    contrasts, with len(contrasts) in place of K below).

    Input k is ``x`` with channel k replaced by its brain median (the channel position tells the
    shared network which contrast to make). The K translations run as one batch of K·B samples;
    output channel k comes from translation k, and pixels outside ``brain`` (B, H, W) are 0.
    ``neighbours`` (B, n·K, H, W), for a CtoC with a :class:`~ADMAnomalyLib.config.SliceContext` of n
    images, are the slices carried beside each one (:meth:`~ADMAnomalyLib.preprocess.PreparedCase.neighbours`);
    their channel k is replaced by the same median in input k, so the contrast being made is seen in
    no neighbouring slice. Each pair (k, j) of ``hidden_with`` hides channel j too (by its own median,
    in the slice and its neighbours) in the input that makes k. With ``mirror`` the last of them is the
    slice's mirror image, which keeps every channel: the contrast being made, seen across the midline,
    is what predicts it.

    A CtoC with an uncertainty head gives (B, 2K, H, W): X̂_ct, then its log-variances clamped to
    :data:`LOG_VARIANCE_RANGE` (0 outside the brain), all float32 whatever the caller's autocast
    (a bf16 s would put about 1 % error on sigma). Otherwise (B, K, H, W) X̂_ct in the CtoC's dtype.
    """
    batch, n_contrasts, height, width = x.shape
    made = list(range(n_contrasts)) if contrasts is None else list(contrasts)
    n_made = len(made)
    medians = brain_medians(x, brain)  # (B, K)
    # (translation, channel): True where translation i replaces that channel by its median (channel
    # made[i] and those hidden with it).
    hidden_by = torch.eye(n_contrasts, dtype=torch.bool, device=x.device)
    for made_channel, also_hidden in hidden_with:
        hidden_by[made_channel, also_hidden] = True
    target = hidden_by[made]
    fill = medians.view(1, batch, n_contrasts, 1, 1)
    inputs = torch.where(target.view(n_made, 1, n_contrasts, 1, 1), fill, x.unsqueeze(0))
    if neighbours is not None:
        around = neighbours.to(x.dtype).reshape(batch, -1, n_contrasts, height, width)  # (B, n, K, H, W)
        hidden = target.view(n_made, 1, 1, n_contrasts, 1, 1).expand(-1, -1, around.shape[1], -1, -1, -1)
        if mirror:
            hidden = hidden.clone()
            hidden[:, :, -1] = False
        around = torch.where(hidden, fill.unsqueeze(2), around.unsqueeze(0))
        inputs = torch.cat([inputs.unsqueeze(2), around], dim=2)  # (T, B, 1 + n, K, H, W)
    median_maps = medians[:, made].mT.reshape(n_made * batch, 1, 1, 1).expand(-1, 1, height, width)
    out = ctoc(inputs.reshape(n_made * batch, -1, height, width), median_maps)
    outputs = out.reshape(n_made, batch, out.shape[1], height, width).transpose(0, 1)  # (B, T, C, H, W)
    inside = brain.unsqueeze(1)
    x_hat = outputs[:, :, 0] * inside.to(outputs.dtype)
    if outputs.shape[2] == 1:
        return x_hat
    log_variance = outputs[:, :, 1].float().clamp(*LOG_VARIANCE_RANGE) * inside.float()
    return torch.cat([x_hat.float(), log_variance], dim=1)


def split_translation(translation: torch.Tensor, n_contrasts: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(X̂_ct, log-variance or None)`` of a translation from :func:`translate_all`."""
    channels = translation.shape[1]
    if channels == n_contrasts:
        return translation, None
    if channels == 2 * n_contrasts:
        return translation[:, :n_contrasts], translation[:, n_contrasts:]
    raise ValueError(f"a translation of {n_contrasts} contrasts has {n_contrasts} or {2 * n_contrasts} "
                     f"channels, not {channels}")


def check_neighbours(cfg: ModelConfig, x: torch.Tensor, neighbours: torch.Tensor | None) -> None:
    """Raise ValueError unless ``neighbours`` are what a CtoC of ``cfg`` needs beside slices ``x``
    (B, K, H, W): None without a :attr:`~ADMAnomalyLib.config.ModelConfig.slice_context`, else
    (B, n·K, H, W) for its n images."""
    context = cfg.slice_context
    wanted = context.images * cfg.n_contrasts
    if neighbours is None and not wanted:
        return
    if neighbours is None:
        carried = [f"{context.each_side} neighbouring slice(s) on each side"] if context.each_side else []
        carried += ["its mirror image"] if context.mirror else []
        raise ValueError(f"this CtoC translates each slice with {' and '.join(carried)}; none were given")
    expected = (x.shape[0], wanted, *x.shape[2:])
    if tuple(neighbours.shape) != expected:
        raise ValueError(f"neighbouring slices of shape {tuple(neighbours.shape)}; this CtoC needs {expected}")


RESIDUAL_DIRECTIONS = ("both", "brighter")


def scaled_difference(x: torch.Tensor, translation: torch.Tensor) -> torch.Tensor:
    """(X − X̂_ct) (B, K, H, W) float32, divided by the predicted sigma exp(s/2) when the translation
    carries log-variances: the signed residual :func:`ctoc_residual` sides."""
    x_hat, log_variance = split_translation(translation, x.shape[1])
    difference = x.float() - x_hat.float()
    return difference if log_variance is None else difference * torch.exp(-0.5 * log_variance.float())


def ctoc_residual(x: torch.Tensor, translation: torch.Tensor, direction: str = "both") -> torch.Tensor:
    """Z_ct (B, K, H, W) float32: |X − X̂_ct| (``direction`` 'both') or max(X − X̂_ct, 0) ('brighter'),
    each over the predicted sigma where there is one (:func:`scaled_difference`)."""
    difference = scaled_difference(x, translation)
    return difference.abs() if direction == "both" else difference.clamp_min(0.0)


class _Float32Module(nn.Module):
    """Runs ``self.layers`` in float32 with autocast off (see the module docstring for why)."""

    layers: nn.Module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=x.device.type, enabled=False):
            return self.layers(x.float())


class DREncoder(_Float32Module):
    """G_dr: 3×3 convs ``n_contrasts -> dr_encoder_widths (tanh) -> dr_latent`` (no final activation)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = cfg.n_contrasts
        for width in cfg.dr_encoder_widths:
            layers += [nn.Conv2d(channels, width, 3, padding=1), nn.Tanh()]
            channels = width
        layers.append(nn.Conv2d(channels, cfg.dr_latent, 3, padding=1))
        self.layers = nn.Sequential(*layers)


class DRDecoder(_Float32Module):
    """F_dr: 1×1 convs ``dr_latent -> dr_decoder_widths (tanh) -> n_contrasts``; 1×1 keeps Z_dr
    spatially specific."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = cfg.dr_latent
        for width in cfg.dr_decoder_widths:
            layers += [nn.Conv2d(channels, width, 1), nn.Tanh()]
            channels = width
        layers.append(nn.Conv2d(channels, cfg.n_contrasts, 1))
        self.layers = nn.Sequential(*layers)


class DensityEstimator(_Float32Module):
    """G_de: ``FC(d -> de_hidden)-tanh-Dropout-FC(-> n_components)-softmax``; (N, d) -> (N, C)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(cfg.feature_dim, cfg.de_hidden),
            nn.Tanh(),
            nn.Dropout(cfg.de_dropout),
            nn.Linear(cfg.de_hidden, cfg.n_components),
            nn.Softmax(dim=-1),
        )


class ADMNetwork(nn.Module):
    """All ADM sub-networks; only those the configuration uses exist (``None`` otherwise).

    ``ctoc`` when ``cfg.use_ctoc``; ``dr_encoder``/``dr_decoder`` when ``cfg.use_dr``; ``estimator``
    always, on ``cfg.feature_dim`` inputs.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        if cfg.feature_dim == 0:
            raise ValueError("the density estimator would have no features (use_ctoc and use_dr off, or no "
                             "density_residuals)")
        for field_name in ("density_residuals", "density_intensities"):
            names = tuple(getattr(cfg, field_name))
            unknown = [name for name in names if name not in CONTRASTS[: cfg.n_contrasts]]
            if unknown or len(set(names)) != len(names):
                raise ValueError(f"model.{field_name} must name distinct contrasts of {CONTRASTS[: cfg.n_contrasts]}, "
                                 f"not {names}")
        if not isinstance(cfg.ctoc_context_slices, int) or cfg.ctoc_context_slices < 0:
            raise ValueError(f"model.ctoc_context_slices must be a whole number >= 0, not {cfg.ctoc_context_slices!r}")
        if not isinstance(cfg.ctoc_mirror_context, bool):
            raise ValueError(f"model.ctoc_mirror_context must be true or false, not {cfg.ctoc_mirror_context!r}")
        if cfg.residual_direction not in RESIDUAL_DIRECTIONS:
            raise ValueError(f"model.residual_direction must be one of {RESIDUAL_DIRECTIONS}, not {cfg.residual_direction!r}")
        if not isinstance(cfg.ctoc_flair_hides_t2, bool):
            raise ValueError(f"model.ctoc_flair_hides_t2 must be true or false, not {cfg.ctoc_flair_hides_t2!r}")
        if cfg.ctoc_flair_hides_t2 and cfg.n_contrasts < CONTRASTS.index("t2") + 1:
            raise ValueError("model.ctoc_flair_hides_t2 needs the T2 contrast (n_contrasts 4)")
        self.config = cfg
        self._hidden_with = (((CONTRASTS.index("flair"), CONTRASTS.index("t2")),)
                             if cfg.ctoc_flair_hides_t2 else ())
        self._residual_channels = [CONTRASTS.index(name) for name in cfg.density_residuals]
        self._intensity_channels = [CONTRASTS.index(name) for name in cfg.density_intensities]
        self.ctoc = CtoCNet(cfg) if cfg.use_ctoc else None
        self.dr_encoder = DREncoder(cfg) if cfg.use_dr else None
        self.dr_decoder = DRDecoder(cfg) if cfg.use_dr else None
        self.estimator = DensityEstimator(cfg)

    def translate(self, x: torch.Tensor, brain: torch.Tensor, neighbours: torch.Tensor | None = None,
                  contrasts: Sequence[int] | None = None, ctoc: nn.Module | None = None) -> torch.Tensor:
        """The translation of ``x`` by :func:`translate_all` (requires ``use_ctoc``; ``neighbours``
        when it has a ``slice_context``): X̂_ct (B, K, H, W), followed by its log-variances
        (B, 2K, H, W in all) with ``ctoc_uncertainty``; of the ``contrasts`` only when given. ``ctoc``
        runs it in place of this network's CtoC (e.g. inference's channels-last runner of it)."""
        if self.ctoc is None:
            raise RuntimeError("this configuration has no CtoC network (use_ctoc=False)")
        check_neighbours(self.config, x, neighbours)
        return translate_all(self.ctoc if ctoc is None else ctoc, x, brain, neighbours, contrasts,
                             self.config.ctoc_mirror_context, self._hidden_with)

    def ctoc_state(self) -> dict[str, torch.Tensor]:
        """A detached copy of the CtoC weights, which networks that differ only after step 1 can share
        (``Trainer.fit(..., ctoc_state=...)``)."""
        if self.ctoc is None:
            raise RuntimeError("this configuration has no CtoC network (use_ctoc=False)")
        return {name: value.detach().clone() for name, value in self.ctoc.state_dict().items()}

    @property
    def translation_channels(self) -> int:
        """Channels of this network's translations of all K contrasts (see :func:`translate_all`)."""
        return self.config.n_contrasts * (2 if self.config.ctoc_uncertainty else 1)

    @property
    def residual_contrasts(self) -> list[int]:
        """Indices of the contrasts whose residuals are density features (``density_residuals``): the
        only translations the density features need."""
        return list(self._residual_channels)

    def residual_translation(self, x: torch.Tensor, brain: torch.Tensor,
                             neighbours: torch.Tensor | None = None, ctoc: nn.Module | None = None) -> torch.Tensor:
        """:meth:`translate` of the :attr:`residual_contrasts` only: a network that scores one residual
        runs its CtoC once per slice instead of K times."""
        return self.translate(x, brain, neighbours, self._residual_channels, ctoc)

    def features(
        self, x: torch.Tensor, brain: torch.Tensor, x_hat_ct: torch.Tensor | None = None,
        neighbours: torch.Tensor | None = None, residual_translation: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Per-pixel features ``z`` (B, d, H, W) = concat(Z_ct of ``density_residuals``, Z_dr[, X]), float32, and ``X̂_dr``
        (B, K, H, W) or ``None`` without DR. Z_ct is :func:`ctoc_residual`: |X − X̂_ct|, or that over
        the predicted sigma with ``ctoc_uncertainty``.

        The translation comes from one of: ``residual_translation``, that of the residual contrasts
        alone (:meth:`residual_translation`); ``x_hat_ct``, a cached translation of all K contrasts by
        the frozen CtoC (:meth:`translate`), which models sharing a CtoC can share; otherwise it is
        computed (under the caller's autocast/grad mode) from ``x`` and, with a ``slice_context``,
        its ``neighbours``. Background pixels of ``z`` are not meaningful (Z_dr is not masked): select
        brain pixels before estimating or scoring the mixture.
        """
        parts: list[torch.Tensor] = []
        x_hat_dr = None
        if self.ctoc is not None:
            per_contrast = 2 if self.config.ctoc_uncertainty else 1
            if residual_translation is None and x_hat_ct is None:
                residual_translation = self.residual_translation(x, brain, neighbours)
            elif residual_translation is None:
                if x_hat_ct.shape[1] != self.translation_channels:
                    raise ValueError(f"the cached translation has {x_hat_ct.shape[1]} channels; this network's have "
                                     f"{self.translation_channels} (a translation of a CtoC with"
                                     f"{'out' if self.config.ctoc_uncertainty else ''} an uncertainty head?)")
                channels = [k + part * self.config.n_contrasts for part in range(per_contrast)
                            for k in self._residual_channels]
                residual_translation = x_hat_ct[:, channels]
            elif residual_translation.shape[1] != per_contrast * len(self._residual_channels):
                raise ValueError(f"a translation of the residual contrasts {self.config.density_residuals} has "
                                 f"{per_contrast * len(self._residual_channels)} channels, not "
                                 f"{residual_translation.shape[1]}")
            parts.append(ctoc_residual(x[:, self._residual_channels], residual_translation,
                                       self.config.residual_direction))
        if self.dr_encoder is not None and self.dr_decoder is not None:
            z_dr = self.dr_encoder(x)
            x_hat_dr = self.dr_decoder(z_dr)
            parts.append(z_dr)
        if self._intensity_channels:
            intensities = x[:, self._intensity_channels].float()
            parts.append(intensities if self.config.residual_direction == "both" else intensities.clamp_min(0.0))
        return torch.cat(parts, dim=1), x_hat_dr
