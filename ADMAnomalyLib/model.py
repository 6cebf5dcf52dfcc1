"""A trained ADM model: network weights, frozen mixture, threshold and provenance in one object."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .config import ADMConfig
from .errors import ModelFileError, OutputError
from .gmm import GMMParams
from .modelfile import ModelFileContents, load_model_file, save_model_file
from .networks import ADMNetwork


def check_model_output(path: str | Path) -> Path:
    """``path`` as a Path once its folder exists and is writable: checked before any costly work
    (training, calibration), so that nothing computed is lost at the end."""
    path = Path(path)
    if not path.parent.is_dir() or not os.access(path.parent, os.W_OK):
        raise OutputError(f"cannot write the model to {path}: folder missing or not writable")
    return path


@dataclass
class ADMModel:
    """Network plus the frozen GMM parameters estimated over all normal training pixels."""

    config: ADMConfig
    network: ADMNetwork
    gmm: GMMParams | None = None
    threshold: float | None = None
    """Best-F1 energy threshold chosen on validation lesion slices (None if never validated)."""
    metadata: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None

    @classmethod
    def create(cls, config: ADMConfig) -> "ADMModel":
        """A freshly initialised, untrained model for ``config``."""
        return cls(config=config, network=ADMNetwork(config.model))

    def save(self, path: str | Path) -> Path:
        """Write the model file atomically (see :mod:`ADMAnomalyLib.modelfile`)."""
        if self.gmm is None:
            raise ValueError("the mixture has not been fitted; a model without it cannot score images")
        contents = ModelFileContents(
            config=self.config.to_dict(),
            state_dict=self.network.state_dict(),  # the encoder moves tensors to the CPU
            gmm=self.gmm.to_dict(),
            threshold=self.threshold,
            metadata=self.metadata,
        )
        path = Path(path)
        save_model_file(path, contents)
        self.path = path
        return path

    @classmethod
    def load(cls, path: str | Path) -> "ADMModel":
        """Read a model file; any inconsistency is a :class:`ModelFileError` naming the file."""
        path = Path(path)
        contents = load_model_file(path)
        try:
            config = ADMConfig.from_dict(contents.config)
            network = ADMNetwork(config.model)
            network.load_state_dict(contents.state_dict, strict=True)
            gmm = GMMParams.from_dict(contents.gmm)
            gmm.validate()
            if gmm.means.shape != (config.model.n_components, config.model.feature_dim):
                raise ValueError(f"mixture means have shape {tuple(gmm.means.shape)}")
        except (ValueError, KeyError, RuntimeError, TypeError) as exc:
            message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise ModelFileError(f"{path}: not a consistent ADMAnomaly model ({message})") from None
        network.eval()
        return cls(config, network, gmm, contents.threshold, contents.metadata, path)

    def with_threshold(self, threshold: float, note: dict[str, Any]) -> "ADMModel":
        """A copy (sharing the network and mixture) whose threshold is ``threshold``; ``note`` (JSON
        values: who chose it, how, on which cases) is appended to ``metadata["threshold_history"]``
        together with the threshold it replaces, so a model file keeps where its threshold came from.
        The copy is unsaved (``path`` None)."""
        from .validation import check_threshold

        threshold = check_threshold(threshold)
        entry = {"threshold": threshold, "previous_threshold": self.threshold, **note}
        metadata = {**self.metadata, "threshold_history": [*self.metadata.get("threshold_history", []), entry]}
        return ADMModel(self.config, self.network, self.gmm, threshold, metadata, None)

    def to(self, device: torch.device) -> "ADMModel":
        """Move the network and mixture to ``device`` (in place) and return self."""
        self.network.to(device)
        if self.gmm is not None:
            self.gmm = self.gmm.to(device)
        return self
