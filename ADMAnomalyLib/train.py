"""Two-step ADM training (method.md, 'Training') with checkpoints, resume and the final frozen GMM.

Step 1 trains CtoC alone on ||X - X_ct||^2. Step 2 freezes CtoC and trains DR and DE on
||X - X_dr||^2 + lambda * mean(E). Afterwards the mixture is estimated once over all normal
training pixels and frozen, and the best-F1 threshold is chosen on the lesion slices.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from . import __version__
from .cases import CaseFiles, find_cases, load_case
from .config import ADMConfig
from .data import SliceSet, lesion_free_slices, lesion_slices, random_intensity_scaling, stack_slices
from .device import autocast, bf16_enabled, resolve_device
from .errors import CancelledError, InputError, OutputError, TrainingDataError
from .gmm import GMMAccumulator, energy, mixture_statistics
from .infer import energy_slices
from .metrics import best_f1_threshold, detection_metrics
from .model import ADMModel
from .networks import translate_all
from .preprocess import prepare_case

log = logging.getLogger(__name__)

ProgressCallback = Callable[[dict[str, Any]], None]
CHECKPOINT_VERSION = 1


@dataclass
class TrainingData:
    """Normal training slices and labelled validation slices drawn from the same cases."""

    train: SliceSet
    validation: SliceSet
    summary: dict[str, Any]


def build_training_data(case_files: Sequence[CaseFiles], config: ADMConfig) -> TrainingData:
    """Load and prepare every case, keep lesion-free slices (with the margin) for training and the
    lesion slices for validation."""
    if not case_files:
        raise TrainingDataError("no case to train on")
    train_parts, validation_parts, per_case = [], [], {}
    for files in case_files:
        prepared = prepare_case(load_case(files, config.preprocess.grid_tolerance), config.preprocess)
        normal = lesion_free_slices(prepared, config.train.lesion_margin)
        lesion = lesion_slices(prepared)
        train_parts.append((prepared, normal))
        validation_parts.append((prepared, lesion))
        per_case[files.case_id] = {"normal_slices": int(len(normal)), "lesion_slices": int(len(lesion))}
    train = stack_slices(train_parts)
    if len(train) == 0:
        raise TrainingDataError(
            f"none of the {len(case_files)} case(s) has a lesion-free brain slice "
            f"(lesion margin {config.train.lesion_margin} slices); nothing to learn normal anatomy from"
        )
    validation = stack_slices(validation_parts)
    summary = {
        "cases": sorted(per_case),
        "per_case": per_case,
        "train_slices": len(train),
        "validation_slices": len(validation),
    }
    return TrainingData(train, validation, summary)


def checkpoint_path_for(output_path: str | Path) -> Path:
    """Where training of ``output_path`` keeps its resumable checkpoint."""
    output_path = Path(output_path)
    return output_path.with_name(output_path.name + ".ckpt")


class Trainer:
    """Runs the two training steps on a :class:`TrainingData`, checkpointing every epoch."""

    def __init__(
        self,
        config: ADMConfig,
        device: str | torch.device = "auto",
        checkpoint_path: str | Path | None = None,
        progress: ProgressCallback | None = None,
        should_cancel: Callable[[], bool] | None = None,
        show_progress_bar: bool = True,
    ) -> None:
        self.config = config
        self.device = resolve_device(device)
        self.checkpoint_path = Path(checkpoint_path) if checkpoint_path else None
        self.progress = progress
        self.should_cancel = should_cancel
        self.show_progress_bar = show_progress_bar
        self.use_bf16 = bf16_enabled(self.device, config.train.amp)
        torch.manual_seed(config.train.seed)
        self.model = ADMModel.create(config)
        self.model.network.to(self.device)
        self.numpy_rng = np.random.default_rng(config.train.seed)
        self.torch_rng = torch.Generator().manual_seed(config.train.seed)
        net, model_cfg = self.model.network, config.model
        self.ctoc_optimizer = (
            torch.optim.Adam(net.ctoc.parameters(), lr=config.train.lr_ctoc, betas=(0.5, 0.999))
            if model_cfg.use_ctoc else None
        )
        joint_parameters = [p for name, p in net.named_parameters() if not name.startswith("ctoc.")]
        self.joint_optimizer = torch.optim.Adam(joint_parameters, lr=config.train.lr_joint)
        self.stage, self.epoch = "ctoc" if model_cfg.use_ctoc else "joint", 0
        self.history: list[dict[str, Any]] = []

    # -- checkpoints -------------------------------------------------------------------------------
    def _state(self) -> dict[str, Any]:
        return {
            "checkpoint_version": CHECKPOINT_VERSION,
            "config": self.config.to_dict(),
            "stage": self.stage,
            "epoch": self.epoch,
            "network": self.model.network.state_dict(),
            "ctoc_optimizer": self.ctoc_optimizer.state_dict() if self.ctoc_optimizer else {},
            "joint_optimizer": self.joint_optimizer.state_dict(),
            "torch_rng": self.torch_rng.get_state(),
            "global_rng": torch.get_rng_state(),
            "numpy_rng": _numpy_state_to_tensors(self.numpy_rng),
            "history": [{k: float(v) if isinstance(v, float) else v for k, v in h.items()} for h in self.history],
        }

    def save_checkpoint(self) -> None:
        """Write the resumable state atomically (a crash mid-write keeps the previous checkpoint)."""
        if self.checkpoint_path is None:
            return
        folder = self.checkpoint_path.parent
        handle, temp_name = tempfile.mkstemp(prefix=".tmp-", suffix=".ckpt", dir=folder)
        try:
            with os.fdopen(handle, "wb") as stream:
                torch.save(self._state(), stream)
            os.replace(temp_name, self.checkpoint_path)
        except BaseException:
            Path(temp_name).unlink(missing_ok=True)
            raise

    def load_checkpoint(self) -> bool:
        """Restore state from the checkpoint if there is one; returns whether it resumed."""
        if self.checkpoint_path is None or not self.checkpoint_path.exists():
            return False
        try:
            # weights_only: the checkpoint is read with PyTorch's restricted unpickler, no code runs.
            state = torch.load(self.checkpoint_path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise InputError(f"{self.checkpoint_path}: unreadable checkpoint ({str(exc).splitlines()[0]}); "
                             "delete it to start afresh") from None
        if state.get("checkpoint_version") != CHECKPOINT_VERSION or state.get("config") != self.config.to_dict():
            raise InputError(f"{self.checkpoint_path}: checkpoint was made with a different configuration; "
                             "use the same settings to resume or delete it to start afresh")
        self.model.network.load_state_dict(state["network"])
        if self.ctoc_optimizer:
            self.ctoc_optimizer.load_state_dict(state["ctoc_optimizer"])
        self.joint_optimizer.load_state_dict(state["joint_optimizer"])
        self.torch_rng.set_state(state["torch_rng"])
        torch.set_rng_state(state["global_rng"])
        self.numpy_rng = _numpy_rng_from_tensors(state["numpy_rng"])
        self.stage, self.epoch = state["stage"], int(state["epoch"])
        self.history = list(state["history"])
        log.info("resumed from %s at stage %s, epoch %d", self.checkpoint_path, self.stage, self.epoch)
        return True

    # -- training steps ------------------------------------------------------------------------------
    def _batch(self, data: SliceSet, index: np.ndarray, augment: bool) -> tuple[torch.Tensor, torch.Tensor]:
        images = torch.from_numpy(data.images[index]).to(self.device)
        brain = torch.from_numpy(data.brain[index]).to(self.device)
        if augment:
            images = random_intensity_scaling(images, brain, self.config.train.intensity_scale, self.torch_rng)
        return images, brain

    def _check_cancel(self) -> None:
        if self.should_cancel is not None and self.should_cancel():
            raise CancelledError("training cancelled; resume later from the last epoch's checkpoint")

    def _ctoc_step(self, images: torch.Tensor, brain: torch.Tensor) -> dict[str, float]:
        network = self.model.network
        with autocast(self.device, self.use_bf16):
            reconstruction = translate_all(network.ctoc, images, brain)
        loss = _masked_mse(reconstruction.float(), images, brain)
        self.ctoc_optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.ctoc_optimizer.step()
        return {"loss_ct": loss.item()}

    def _joint_step(self, images: torch.Tensor, brain: torch.Tensor) -> dict[str, float]:
        network, train_cfg = self.model.network, self.config.train
        x_hat_ct = None
        if self.config.model.use_ctoc:
            with torch.no_grad(), autocast(self.device, self.use_bf16):
                x_hat_ct = translate_all(network.ctoc, images, brain).float()
        features, x_hat_dr = network.features(images, brain, x_hat_ct)
        brain_features = features.permute(0, 2, 3, 1)[brain]
        if len(brain_features) > train_cfg.max_gmm_pixels_per_batch:
            keep = torch.randperm(len(brain_features), generator=self.torch_rng)[: train_cfg.max_gmm_pixels_per_batch]
            brain_features = brain_features[keep.to(self.device)]
        # ADM_woj: each loss updates only its own sub-network, so the energy does not reach DR.
        density_input = brain_features if train_cfg.joint else brain_features.detach()
        memberships = network.estimator(density_input)
        mean_energy = energy(density_input, mixture_statistics(density_input, memberships, self.config.model.eps)).mean()
        loss_dr = _masked_mse(x_hat_dr, images, brain) if x_hat_dr is not None else torch.zeros((), device=self.device)
        loss = loss_dr + train_cfg.lambda_energy * mean_energy.to(loss_dr.dtype)
        self.joint_optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.joint_optimizer.step()
        return {"loss_dr": loss_dr.item(), "energy": mean_energy.item(), "loss": loss.item()}

    def _run_stage(self, stage: str, epochs: int, data: SliceSet) -> None:
        network = self.model.network
        step = self._ctoc_step if stage == "ctoc" else self._joint_step
        while self.stage == stage and self.epoch < epochs:
            network.train()
            if stage == "joint":
                network.ctoc.eval() if network.ctoc is not None else None
            batches = list(data.batches(self.config.train.batch_size, self.numpy_rng))
            sums: dict[str, float] = {}
            started = time.perf_counter()
            bar = tqdm(batches, desc=f"{stage} {self.epoch + 1}/{epochs}", disable=not self.show_progress_bar,
                       leave=False, dynamic_ncols=True)
            for number, index in enumerate(bar, start=1):
                self._check_cancel()
                losses = step(*self._batch(data, index, augment=True))
                if not all(np.isfinite(v) for v in losses.values()):
                    raise FloatingPointError(f"non-finite loss in {stage} epoch {self.epoch + 1}: {losses}")
                for name, value in losses.items():
                    sums[name] = sums.get(name, 0.0) + value
                bar.set_postfix({k: f"{v / number:.4g}" for k, v in sums.items()})
                self._report(stage=stage, epoch=self.epoch + 1, epochs=epochs, step=number, steps=len(batches),
                             **{k: v for k, v in losses.items()})
            bar.close()
            self.epoch += 1
            record = {"stage": stage, "epoch": self.epoch, "seconds": time.perf_counter() - started,
                      **{k: v / len(batches) for k, v in sums.items()}}
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

    def fit(self, data: TrainingData) -> ADMModel:
        """Train both steps (resuming where a checkpoint left off), freeze the GMM, pick the threshold."""
        train_cfg = self.config.train
        if self.stage == "ctoc":
            self._run_stage("ctoc", train_cfg.epochs_ctoc, data.train)
        if self.model.network.ctoc is not None:
            self.model.network.ctoc.requires_grad_(False)
        self._run_stage("joint", train_cfg.epochs_joint, data.train)
        self._check_cancel()
        self.model.network.eval()
        self._report(stage="gmm")
        self.model.gmm = fit_frozen_gmm(self.model, data.train, self.device, train_cfg.batch_size)
        self._report(stage="threshold")
        threshold, validation = choose_threshold(self.model, data, self.device, train_cfg.batch_size)
        self.model.threshold = threshold
        self.model.metadata.update({
            "engine_version": __version__,
            "training_data": data.summary,
            "validation": validation,
            "history": self.history,
            "device": str(self.device),
            "bf16": self.use_bf16,
        })
        return self.model


def _masked_mse(prediction: torch.Tensor, target: torch.Tensor, brain: torch.Tensor) -> torch.Tensor:
    # Background is zero in both, so summing over the brain and dividing by brain pixels gives the
    # per-brain-pixel squared error the spec minimises.
    weight = brain.unsqueeze(1).to(prediction.dtype)
    return ((prediction - target) ** 2 * weight).sum() / (weight.sum() * prediction.shape[1]).clamp_min(1.0)


def fit_frozen_gmm(model: ADMModel, data: SliceSet, device: torch.device, batch_size: int):
    """Estimate pi, mu, Sigma once over every brain pixel of the normal training slices (dropout off)."""
    network = model.network.eval()
    accumulator = GMMAccumulator(model.config.model.n_components, model.config.model.feature_dim)
    use_bf16 = bf16_enabled(device, model.config.train.amp)
    with torch.inference_mode():
        for index in data.batches(batch_size):
            images = torch.from_numpy(data.images[index]).to(device)
            brain = torch.from_numpy(data.brain[index]).to(device)
            x_hat_ct = None
            if model.config.model.use_ctoc:
                with autocast(device, use_bf16):
                    x_hat_ct = translate_all(network.ctoc, images, brain).float()
            features, _ = network.features(images, brain, x_hat_ct)
            brain_features = features.permute(0, 2, 3, 1)[brain]
            accumulator.update(brain_features, network.estimator(brain_features))
    return accumulator.finalize(model.config.model.eps)


def choose_threshold(
    model: ADMModel, data: TrainingData, device: torch.device, batch_size: int
) -> tuple[float, dict[str, Any]]:
    """Best-F1 threshold over the brain pixels of the lesion slices; without labelled slices, a high
    percentile of the normal training energies."""
    amp = model.config.train.amp
    validation = data.validation
    if len(validation) and validation.labels is not None and validation.labels[validation.brain].any():
        energies = energy_slices(model, validation.images, validation.brain, device, batch_size, amp)
        threshold, _ = best_f1_threshold(energies, validation.labels, validation.brain)
        metrics = detection_metrics(energies, validation.labels, validation.brain)
        summary = {"source": "lesion slices", "slices": len(validation), **_plain(metrics)}
        return float(threshold), summary
    energies = energy_slices(model, data.train.images, data.train.brain, device, batch_size, amp)
    percentile = model.config.train.fallback_threshold_percentile
    threshold = float(np.percentile(energies[data.train.brain], percentile))
    return threshold, {"source": f"{percentile} percentile of normal training energies", "slices": len(data.train)}


def _plain(metrics: Any) -> dict[str, Any]:
    from dataclasses import asdict
    return {k: (float(v) if isinstance(v, (float, np.floating)) else v) for k, v in asdict(metrics).items()}


def _numpy_state_to_tensors(rng: np.random.Generator) -> dict[str, Any]:
    state = rng.bit_generator.state
    # PCG64 state holds 128-bit integers; store them as strings so the restricted unpickler accepts them.
    return {"bit_generator": state["bit_generator"], "state": {k: str(v) for k, v in state["state"].items()},
            "has_uint32": int(state["has_uint32"]), "uinteger": int(state["uinteger"])}


def _numpy_rng_from_tensors(saved: dict[str, Any]) -> np.random.Generator:
    rng = np.random.default_rng()
    rng.bit_generator.state = {"bit_generator": saved["bit_generator"],
                               "state": {k: int(v) for k, v in saved["state"].items()},
                               "has_uint32": saved["has_uint32"], "uinteger": saved["uinteger"]}
    return rng


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
) -> ADMModel:
    """Train a model on the cases in ``data_dir`` and write it to ``output_path``.

    A checkpoint ``<output>.ckpt`` is written every epoch; ``resume=True`` continues from it. The
    checkpoint is removed once the model file is written."""
    output_path = Path(output_path)
    folder = output_path.parent if str(output_path.parent) else Path(".")
    if not folder.is_dir() or not os.access(folder, os.W_OK):
        raise OutputError(f"cannot write the model to {output_path}: folder missing or not writable")
    case_files = list(data_dir) if not isinstance(data_dir, (str, Path)) else find_cases(data_dir, pattern)
    data = build_training_data(case_files, config)
    checkpoint = checkpoint_path_for(output_path)
    if not resume and checkpoint.exists():
        raise OutputError(f"{checkpoint} exists from an earlier run; pass resume=True (--resume) or delete it")
    trainer = Trainer(config, device, checkpoint, progress, should_cancel, show_progress_bar)
    if resume:
        trainer.load_checkpoint()
    model = trainer.fit(data)
    model.metadata.update(metadata or {})
    model.save(output_path)
    checkpoint.unlink(missing_ok=True)
    if progress is not None:
        progress({"stage": "done", "model": str(output_path)})
    return model
