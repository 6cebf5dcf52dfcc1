"""Two-step ADM training (method.md, 'Training') with checkpoints, resume and the final frozen GMM.

Step 1 trains CtoC alone on ||X - X_ct||^2 (with ``model.ctoc_uncertainty``, beyond the paper: on
the beta-NLL of its mean and log-variance, :func:`masked_beta_nll`). Step 2 freezes CtoC and trains DR and DE on
||X - X_dr||^2 + lambda * mean(E). Afterwards the mixture is estimated once over all normal
training pixels and frozen, and the best-F1 threshold is chosen on the lesion slices.

Under torchrun the networks are wrapped in DistributedDataParallel, each rank trains on its shard
of the slices, the final mixture comes from sufficient statistics summed over ranks and only rank 0
writes checkpoints and the model file.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from . import __version__
from .cases import CaseFiles
from .config import ADMConfig, ctoc_model_fields
from .data import SliceSet, TrainingData, augment_with_neighbours, augmentation_for, build_training_data
from .device import autocast, inference_dtype, resolve_device, training_dtype
from .distributed import (SINGLE_PROCESS, DistributedContext, all_reduce_sum_, barrier, shard_exact,
                          shard_for_training)
from .errors import CancelledError, InputError, OutputError
from .gmm import GMMAccumulator, GMMParams, energy, mixture_statistics
from .evaluate import calibrate_threshold
from .infer import InferenceOptions, brain_features, ctoc_runner, energy_slices
from .metrics import best_f1_threshold, detection_metrics
from .model import ADMModel, check_model_output
from .networks import ADMNetwork, split_translation

log = logging.getLogger(__name__)

ProgressCallback = Callable[[dict[str, Any]], None]
CHECKPOINT_VERSION = 2
_STAGES = ("ctoc", "joint")

__all__ = ["Trainer", "TrainingData", "build_training_data", "checkpoint_path_for", "choose_threshold",
           "fit_frozen_gmm", "train"]


def checkpoint_path_for(output_path: str | Path) -> Path:
    """Where training of ``output_path`` keeps its resumable checkpoint."""
    output_path = Path(output_path)
    return output_path.with_name(output_path.name + ".ckpt")


class _BatchDataset(Dataset):
    """Maps an array of slice indices to one batch, so DataLoader workers read whole batches
    (from memory or a memory-mapped slice cache)."""

    def __init__(self, data: SliceSet) -> None:
        self.data = data

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: np.ndarray) -> tuple[torch.Tensor, ...]:
        index = np.sort(index)  # sorted reads are sequential on a memory map
        arrays = [self.data.images, self.data.brain]
        if self.data.neighbours is not None:
            arrays.append(self.data.neighbours)
        return tuple(torch.from_numpy(np.ascontiguousarray(array[index])) for array in arrays)


class _JointForward(nn.Module):
    """Step 2's differentiable part as one module, so DistributedDataParallel can wrap it."""

    def __init__(self, network: ADMNetwork, joint: bool) -> None:
        super().__init__()
        self.network = network
        self.joint = joint

    def forward(self, images: torch.Tensor, brain: torch.Tensor, residual_translation: torch.Tensor | None,
                keep: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        features, x_hat_dr = self.network.features(images, brain, residual_translation=residual_translation)
        brain_features = features.permute(0, 2, 3, 1)[brain]
        if keep is not None:
            brain_features = brain_features[keep]
        # ADM_woj: each loss updates only its own sub-network, so the energy does not reach DR.
        density_input = brain_features if self.joint else brain_features.detach()
        loss_dr = masked_mse(x_hat_dr, images, brain) if x_hat_dr is not None else images.new_zeros(())
        return loss_dr, density_input, self.network.estimator(density_input)


class Trainer:
    """Runs the two training steps on a :class:`TrainingData`, checkpointing every epoch.

    Randomness (slice order, augmentation, pixel sampling, dropout) is drawn from generators seeded
    by (seed, stage, epoch[, rank]), so a run resumed from a checkpoint continues exactly as an
    uninterrupted one and ranks share the slice order without sharing augmentations."""

    def __init__(
        self,
        config: ADMConfig,
        device: str | torch.device = "auto",
        checkpoint_path: str | Path | None = None,
        progress: ProgressCallback | None = None,
        should_cancel: Callable[[], bool] | None = None,
        show_progress_bar: bool = True,
        context: DistributedContext = SINGLE_PROCESS,
    ) -> None:
        self.config = config
        self.context = context
        self.device = resolve_device(device) if not isinstance(device, torch.device) else device
        self.checkpoint_path = Path(checkpoint_path) if checkpoint_path else None
        self.progress = progress if context.is_main else None
        self.should_cancel = should_cancel
        self.show_progress_bar = show_progress_bar and context.is_main
        self.ctoc_dtype = training_dtype(self.device, config.train.precision)
        self.augment = augmentation_for(config.train)
        # Identical initial weights on every rank (DDP also broadcasts rank 0's at wrap time).
        torch.manual_seed(config.train.seed)
        self.model = ADMModel.create(config)
        self.model.network.to(self.device)
        net, model_cfg = self.model.network, config.model
        self.ctoc_optimizer = (
            torch.optim.Adam(net.ctoc.parameters(), lr=config.train.lr_ctoc, betas=(0.5, 0.999))
            if model_cfg.use_ctoc else None
        )
        joint_parameters = [p for name, p in net.named_parameters() if not name.startswith("ctoc.")]
        self.joint_optimizer = torch.optim.Adam(joint_parameters, lr=config.train.lr_joint)
        self.stage, self.epoch = ("ctoc" if model_cfg.use_ctoc else "joint"), 0
        self.history: list[dict[str, Any]] = []
        self._ctoc = self._wrap(net.ctoc) if net.ctoc is not None else None
        self._joint: nn.Module | None = None  # wrapped once CtoC is frozen, see fit()

    def _wrap(self, module: nn.Module) -> nn.Module:
        if not self.context.active:
            return module
        ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(module, device_ids=ids)

    # -- checkpoints -------------------------------------------------------------------------------
    def save_checkpoint(self) -> None:
        """Write the resumable state atomically (a crash mid-write keeps the previous checkpoint)."""
        if self.checkpoint_path is None or not self.context.is_main:
            return
        state = {
            "checkpoint_version": CHECKPOINT_VERSION,
            "config": self.config.to_dict(),
            "stage": self.stage,
            "epoch": self.epoch,
            "network": self.model.network.state_dict(),
            "ctoc_optimizer": self.ctoc_optimizer.state_dict() if self.ctoc_optimizer else {},
            "joint_optimizer": self.joint_optimizer.state_dict(),
            "history": self.history,
        }
        handle, temp_name = tempfile.mkstemp(prefix=".tmp-", suffix=".ckpt", dir=self.checkpoint_path.parent)
        try:
            with os.fdopen(handle, "wb") as stream:
                torch.save(state, stream)
            os.replace(temp_name, self.checkpoint_path)
        except BaseException:
            Path(temp_name).unlink(missing_ok=True)
            raise

    def load_checkpoint(self) -> bool:
        """Restore state from the checkpoint if there is one; returns whether it resumed."""
        if self.checkpoint_path is None or not self.checkpoint_path.exists():
            return False
        try:
            # weights_only: PyTorch's restricted unpickler, so no code from the file can run.
            state = torch.load(self.checkpoint_path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise InputError(f"{self.checkpoint_path}: unreadable checkpoint ({str(exc).splitlines()[0]}); "
                             "delete it to start afresh") from None
        if state.get("checkpoint_version") != CHECKPOINT_VERSION or not self._same_config(state.get("config")):
            raise InputError(f"{self.checkpoint_path}: checkpoint was made with a different configuration; "
                             "use the same settings to resume or delete it to start afresh")
        self.model.network.load_state_dict(state["network"])
        if self.ctoc_optimizer:
            self.ctoc_optimizer.load_state_dict(state["ctoc_optimizer"])
        self.joint_optimizer.load_state_dict(state["joint_optimizer"])
        self.stage, self.epoch = state["stage"], int(state["epoch"])
        self.history = list(state["history"])
        log.info("resumed from %s at stage %s, epoch %d", self.checkpoint_path, self.stage, self.epoch)
        return True

    def _same_config(self, saved: Any) -> bool:
        # Through from_dict, so a checkpoint written before a field existed compares with that
        # field's default (what it was trained with) instead of being refused.
        try:
            return ADMConfig.from_dict(saved).to_dict() == self.config.to_dict()
        except (ValueError, TypeError, AttributeError):
            return False

    # -- training steps ------------------------------------------------------------------------------
    def _seed(self, *parts: int) -> int:
        return int(np.random.SeedSequence([self.config.train.seed, *parts]).generate_state(1)[0])

    def _check_cancel(self) -> None:
        if self.should_cancel is not None and self.should_cancel():
            raise CancelledError("training cancelled; resume later from the last epoch's checkpoint")

    def _ctoc_step(self, images: torch.Tensor, brain: torch.Tensor, generator: torch.Generator,
                   neighbours: torch.Tensor | None = None) -> dict[str, float]:
        with autocast(self.device, self.ctoc_dtype):
            translation = self.model.network.translate(images, brain, neighbours, ctoc=self._ctoc)
        x_hat, log_variance = split_translation(translation, images.shape[1])
        mse = masked_mse(x_hat.float(), images, brain)
        if log_variance is None:
            loss, losses = mse, {"loss_ct": mse.item()}
        else:
            loss = masked_beta_nll(x_hat, log_variance, images, brain, self.config.train.nll_beta)
            # The mean's squared error too, comparable with a faithful model's loss_ct.
            losses = {"loss_ct": loss.item(), "mse_ct": mse.item()}
        self.ctoc_optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.ctoc_optimizer.step()
        return losses

    def _joint_step(self, images: torch.Tensor, brain: torch.Tensor, generator: torch.Generator,
                    neighbours: torch.Tensor | None = None) -> dict[str, float]:
        train_cfg = self.config.train
        residual_translation = None
        if self.config.model.use_ctoc:
            with torch.no_grad(), autocast(self.device, self.ctoc_dtype):
                residual_translation = self.model.network.residual_translation(images, brain, neighbours).float()
        n_brain = int(brain.sum())
        keep = None
        if n_brain > train_cfg.max_gmm_pixels_per_batch:
            keep = torch.randperm(n_brain, generator=generator)[: train_cfg.max_gmm_pixels_per_batch].to(self.device)
        loss_dr, density_input, memberships = self._joint(images, brain, residual_translation, keep)
        statistics = mixture_statistics(density_input, memberships, self.config.model.eps)
        mean_energy = energy(density_input, statistics).mean()
        loss = loss_dr + train_cfg.lambda_energy * mean_energy.to(loss_dr.dtype)
        self.joint_optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.joint_optimizer.step()
        return {"loss_dr": loss_dr.item(), "energy": mean_energy.item(), "loss": loss.item()}

    def _epoch_batches(self, data: SliceSet, stage: str) -> list[np.ndarray]:
        order = np.random.default_rng(self._seed(_STAGES.index(stage), self.epoch)).permutation(len(data))
        mine = shard_for_training(order, self.context)
        size = self.config.train.batch_size
        return [mine[start : start + size] for start in range(0, len(mine), size)]

    def _run_stage(self, stage: str, epochs: int, data: SliceSet) -> None:
        network = self.model.network
        step = self._ctoc_step if stage == "ctoc" else self._joint_step
        while self.stage == stage and self.epoch < epochs:
            network.train()
            if stage == "joint" and network.ctoc is not None:
                network.ctoc.eval()
            rank_seed = self._seed(_STAGES.index(stage), self.epoch, self.context.rank)
            generator = torch.Generator().manual_seed(rank_seed)
            torch.manual_seed(rank_seed)  # dropout
            batches = self._epoch_batches(data, stage)
            loader = DataLoader(_BatchDataset(data), batch_size=None, sampler=batches,
                                num_workers=self.config.train.num_workers,
                                pin_memory=self.device.type == "cuda")
            sums: dict[str, float] = {}
            started = time.perf_counter()
            bar = tqdm(loader, total=len(batches), desc=f"{stage} {self.epoch + 1}/{epochs}",
                       disable=not self.show_progress_bar, leave=False, dynamic_ncols=True)
            for number, (images, brain, *around) in enumerate(bar, start=1):
                self._check_cancel()
                images = images.to(self.device, non_blocking=True)
                brain = brain.to(self.device, non_blocking=True)
                neighbours = around[0].to(self.device, non_blocking=True) if around else None
                images, neighbours = augment_with_neighbours(self.augment, images, brain, neighbours, generator,
                                                             self.config.train.through_plane_mix,
                                                             self.config.model.ctoc_mirror_context)
                losses = step(images, brain, generator, neighbours)
                if not all(np.isfinite(v) for v in losses.values()):
                    raise FloatingPointError(f"non-finite loss in {stage} epoch {self.epoch + 1}: {losses}")
                for name, value in losses.items():
                    sums[name] = sums.get(name, 0.0) + value
                bar.set_postfix({k: f"{v / number:.4g}" for k, v in sums.items()})
                self._report(stage=stage, epoch=self.epoch + 1, epochs=epochs, step=number, steps=len(batches),
                             **losses)
            bar.close()
            self.epoch += 1
            seconds = time.perf_counter() - started
            record = {"stage": stage, "epoch": self.epoch, "seconds": seconds,
                      "slice_sets_per_second": len(batches) * self.config.train.batch_size / max(seconds, 1e-9),
                      **{k: v / max(len(batches), 1) for k, v in sums.items()}}
            self.history.append(record)
            log.info("%s", record)
            if self.show_progress_bar:
                tqdm.write(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items()))
            if self.epoch >= epochs and stage == "ctoc":
                self.stage, self.epoch = "joint", 0
            self.save_checkpoint()

    def _report(self, **event: Any) -> None:
        if self.progress is not None:
            self.progress(event)

    def freeze_ctoc(self) -> None:
        """End of step 1: CtoC is frozen and the DR + DE module of step 2 is built, wrapped for DDP
        after freezing so that DDP synchronises only DR and DE parameters."""
        if self._joint is not None:
            return
        if self.model.network.ctoc is not None:
            self.model.network.ctoc.requires_grad_(False)
        self._joint = self._wrap(_JointForward(self.model.network, self.config.train.joint))

    def training_step(self, stage: str, images: torch.Tensor, brain: torch.Tensor,
                      generator: torch.Generator, neighbours: torch.Tensor | None = None) -> dict[str, float]:
        """One optimisation step of ``stage`` ('ctoc' or 'joint') on a batch, as an epoch runs it
        (the training benchmark times these); a 'joint' step freezes CtoC first."""
        if stage == "joint":
            self.freeze_ctoc()
            return self._joint_step(images, brain, generator, neighbours)
        if stage != "ctoc":
            raise ValueError(f"stage must be 'ctoc' or 'joint', not {stage!r}")
        return self._ctoc_step(images, brain, generator, neighbours)

    def fit_ctoc(self, data: TrainingData) -> dict[str, torch.Tensor]:
        """Step 1 alone (resuming where a checkpoint left off); returns the CtoC weights, which models
        that differ only after step 1 can share (``fit(data, ctoc_state=...)``)."""
        if self.model.network.ctoc is None:
            raise ValueError("this configuration has no CtoC network (model.use_ctoc is false)")
        if self.stage == "ctoc":
            self._run_stage("ctoc", self.config.train.epochs_ctoc, data.train)
        return self.model.network.ctoc_state()

    def fit(self, data: TrainingData, ctoc_state: dict[str, torch.Tensor] | None = None,
            calibrate: bool = True) -> ADMModel:
        """Train both steps (resuming where a checkpoint left off), freeze the GMM and, with
        ``calibrate``, pick the threshold. ``ctoc_state`` (from :meth:`fit_ctoc`) replaces step 1."""
        train_cfg = self.config.train
        if ctoc_state is not None:
            if self.model.network.ctoc is None:
                raise ValueError("ctoc_state given for a configuration without CtoC")
            self.model.network.ctoc.load_state_dict(ctoc_state)
            self.stage, self.epoch = "joint", 0
        if self.stage == "ctoc":
            self._run_stage("ctoc", train_cfg.epochs_ctoc, data.train)
        self.freeze_ctoc()
        self._run_stage("joint", train_cfg.epochs_joint, data.train)
        self._check_cancel()
        self.model.network.eval()
        self._report(stage="gmm")
        self.model.gmm = fit_frozen_gmm(self.model, data.train, self.device, train_cfg.batch_size, self.context)
        validation: dict[str, Any] = {}
        if calibrate:
            self._report(stage="threshold")
            self.model.threshold, validation = choose_threshold(self.model, data, self.device, train_cfg.batch_size)
        self.model.metadata.update({
            "engine_version": __version__,
            "training_data": data.summary,
            "validation": validation,
            "history": self.history,
            "device": str(self.device),
            "processes": self.context.world_size,
            "ctoc_training_dtype": str(self.ctoc_dtype or torch.float32).replace("torch.", ""),
        })
        return self.model


def masked_mse(prediction: torch.Tensor, target: torch.Tensor, brain: torch.Tensor) -> torch.Tensor:
    """Mean squared error over the brain pixels of (B, K, H, W) tensors; ``brain`` is (B, H, W)."""
    # Background is zero in both, so summing over the brain and dividing by brain pixels gives the
    # per-brain-pixel squared error the spec minimises.
    weight = brain.unsqueeze(1).to(prediction.dtype)
    return ((prediction - target) ** 2 * weight).sum() / (weight.sum() * prediction.shape[1]).clamp_min(1.0)


def masked_beta_nll(mean: torch.Tensor, log_variance: torch.Tensor, target: torch.Tensor, brain: torch.Tensor,
                    beta: float) -> torch.Tensor:
    """beta-NLL (Seitzer et al. 2022) over the brain pixels of (B, K, H, W) tensors: the Gaussian NLL
    0.5 (r² e^-s + s) of each pixel (constant dropped), weighted by stop-gradient(e^s)^beta, in float32.

    Plain NLL (beta 0) lets the network give up on hard pixels by raising their variance, which
    starves their mean of gradient; the weight restores the MSE-like gradient of the mean (beta 1:
    exactly MSE's) while s still learns the residual's variance."""
    log_variance = log_variance.float()
    squared_error = (target.float() - mean.float()) ** 2
    nll = 0.5 * (squared_error * torch.exp(-log_variance) + log_variance)
    if beta:
        nll = nll * torch.exp(beta * log_variance.detach())
    weight = brain.unsqueeze(1).to(nll.dtype)
    return (nll * weight).sum() / (weight.sum() * nll.shape[1]).clamp_min(1.0)


def fit_frozen_gmm(
    model: ADMModel, data: SliceSet, device: torch.device, batch_size: int,
    context: DistributedContext = SINGLE_PROCESS,
) -> GMMParams:
    """Estimate pi, mu, Sigma once over every brain pixel of the normal training slices (dropout off).

    With several ranks each accumulates the sufficient statistics of its own slices and the sums
    are all-reduced, so the result equals the single-process one to float64 rounding."""
    network = model.network.eval()
    accumulator = GMMAccumulator(model.config.model.n_components, model.config.model.feature_dim, device=device)
    # The features are computed as inference computes them (precision 'auto'), so the frozen mixture
    # describes exactly the features it will score.
    dtype, ctoc = inference_dtype(device, "auto"), ctoc_runner(model)
    mine = shard_exact(len(data), context)
    with torch.inference_mode():
        for start in range(0, len(mine), batch_size):
            index = mine[start : start + batch_size]
            images = torch.from_numpy(np.array(data.images[index], dtype=np.float32)).to(device)
            brain = torch.from_numpy(np.array(data.brain[index], dtype=bool)).to(device)
            neighbours = None
            if data.neighbours is not None:
                neighbours = torch.from_numpy(np.array(data.neighbours[index], dtype=np.float32)).to(device)
            features = brain_features(network, ctoc, images, brain, dtype, neighbours=neighbours)
            accumulator.update(features, network.estimator(features))
    all_reduce_sum_(list(accumulator.state().values()), context)
    return accumulator.finalize(model.config.model.eps)


def choose_threshold(
    model: ADMModel, data: TrainingData, device: torch.device, batch_size: int
) -> tuple[float, dict[str, Any]]:
    """Best-F1 threshold over the brain pixels of the lesion slices; without labelled slices, a high
    percentile of the normal training energies. Energies are computed as inference computes them
    by default (precision 'auto'), so the threshold matches what users get."""
    validation = data.validation
    if len(validation) and validation.labels is not None and np.asarray(validation.labels).any():
        energies = energy_slices(model, validation.images, validation.brain,
                                 InferenceOptions(device, batch_size=batch_size), neighbours=validation.neighbours)
        labels, brain = np.asarray(validation.labels), np.asarray(validation.brain)
        threshold, _ = best_f1_threshold(energies, labels, brain)
        metrics = detection_metrics(energies, labels, brain)
        summary = {"source": "lesion slices", "slices": len(validation),
                   **{k: (float(v) if isinstance(v, (float, np.floating)) else v) for k, v in asdict(metrics).items()}}
        return float(threshold), summary
    energies = energy_slices(model, data.train.images, data.train.brain,
                             InferenceOptions(device, batch_size=batch_size), neighbours=data.train.neighbours)
    percentile = model.config.train.fallback_threshold_percentile
    threshold = float(np.percentile(energies[np.asarray(data.train.brain)], percentile))
    return threshold, {"source": f"{percentile} percentile of normal training energies", "slices": len(data.train)}


def train(
    data_dir: str | Path | Sequence[CaseFiles],
    output_path: str | Path,
    config: ADMConfig,
    device: str | torch.device = "auto",
    resume: bool = False,
    progress: ProgressCallback | None = None,
    should_cancel: Callable[[], bool] | None = None,
    pattern: dict[str, str] | None = None,
    show_progress_bar: bool = True,
    metadata: dict[str, Any] | None = None,
    context: DistributedContext = SINGLE_PROCESS,
    ctoc_from: ADMModel | None = None,
) -> ADMModel:
    """Train a model on the cases in ``data_dir`` (a folder of cases, a domains file naming several
    folders — :mod:`ADMAnomalyLib.domains` — or a slice cache) and write it to ``output_path``.

    A checkpoint ``<output>.ckpt`` is written every epoch; ``resume=True`` continues from it. The
    checkpoint is removed once the model file is written. ``context`` comes from
    :func:`ADMAnomalyLib.distributed.init_from_environment` under torchrun. ``ctoc_from``: a trained
    model whose CtoC is taken as it is, so that step 1 is skipped (its preparation and CtoC sizes must
    be this configuration's; :func:`check_ctoc_donor`): step 2 alone, e.g. other density features."""
    from .cache import is_slice_cache, load_slice_cache
    from .domains import cohort_groups

    output_path = check_model_output(output_path)
    if ctoc_from is not None:
        check_ctoc_donor(ctoc_from, config)
    checkpoint = checkpoint_path_for(output_path)
    if not resume and checkpoint.exists():
        raise OutputError(f"{checkpoint} exists from an earlier run; pass resume=True (--resume) or delete it")
    if isinstance(data_dir, (str, Path)) and is_slice_cache(data_dir):
        case_files = None
        # One rank checks the checksums; the others read the same files.
        data = load_slice_cache(data_dir, config, verify=context.is_main)
    else:
        # Grouped by domain (a domains file) so that the post-processed threshold follows the study's rule.
        case_files = ({"cases": list(data_dir)} if not isinstance(data_dir, (str, Path))
                      else cohort_groups(data_dir, pattern))
        data = build_training_data([case for group in case_files.values() for case in group], config)
    barrier(context)  # every rank has checked the checkpoint before rank 0 may write one
    trainer = Trainer(config, device, checkpoint, progress, should_cancel, show_progress_bar, context)
    resumed = trainer.load_checkpoint() if resume else False
    ctoc_state = None
    if ctoc_from is not None and not resumed:  # a checkpoint of this run already holds the donor's CtoC
        ctoc_state = ctoc_from.network.ctoc_state()
    model = trainer.fit(data, ctoc_state=ctoc_state)
    if ctoc_from is not None:
        model.metadata["ctoc_from"] = {"model": str(ctoc_from.path) if ctoc_from.path else None,
                                       "training_command": ctoc_from.metadata.get("training_command")}
    model.metadata.update(metadata or {})
    if context.is_main:
        if config.postprocess.active:
            _calibrate_post_processed(model, case_files, trainer.device, config.train.batch_size)
        model.save(output_path)
        checkpoint.unlink(missing_ok=True)
        if progress is not None:
            progress({"stage": "done", "model": str(output_path)})
    barrier(context)
    return model


def check_ctoc_donor(donor: ADMModel, config: ADMConfig) -> None:
    """Raise InputError unless ``donor``'s CtoC can serve ``config`` as it is: the same preparation
    (the CtoC's inputs) and the same CtoC architecture (``ctoc_*`` sizes, median bias, contrasts)."""
    if donor.network.ctoc is None or not config.model.use_ctoc:
        raise InputError("--ctoc-from needs a CtoC in both the donor model and the configuration")
    differences = [f"preprocess.{k}" for k, v in donor.config.to_dict()["preprocess"].items()
                   if config.to_dict()["preprocess"].get(k) != v]
    wanted = ctoc_model_fields(config)
    differences += [f"model.{k}" for k, v in ctoc_model_fields(donor.config).items() if wanted.get(k) != v]
    if differences:
        raise InputError(f"the CtoC of {donor.path or 'the donor model'} was made for other settings "
                         f"({', '.join(differences)}); use the same preset and profile")


def _calibrate_post_processed(model: ADMModel, case_files: dict[str, list[CaseFiles]] | None, device: torch.device,
                              batch_size: int) -> None:
    """Post-processing changes the energy scale (and a case mixture needs whole cases), so the threshold
    the trainer chose on one-pass network-resolution energies of pooled slices is chosen again on
    post-processed native energies of the lesion slices."""
    if case_files is None:
        log.warning("trained from a slice cache, which holds no native-grid images: the threshold stays the one "
                    "chosen before post-processing; set one with `admanomaly evaluate MODEL CASES` as a guide")
        return
    threshold, summary = calibrate_threshold(model, case_files, InferenceOptions(device, batch_size=batch_size))
    if threshold is not None:
        model.threshold = threshold
        model.metadata["validation"] = summary
