"""A one-off, memory-mapped cache of normalised training slices for large cohorts.

``admanomaly cache DATA_DIR -o CACHE_DIR`` reads and normalises every case once and appends its
normal (training) and lesion (validation) slices to raw arrays on disk; training then memory-maps
them, so epochs never re-read NIfTI files and memory does not grow with the cohort. A manifest
records shapes, the preprocessing settings and a SHA-256 per array.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from .cases import CaseFiles, load_case
from .domains import cohort_cases
from .config import ADMConfig, CONTRASTS
from .data import SliceSet, TrainingData, training_slices
from .errors import InputError, OutputError, TrainingDataError
from .preprocess import prepare_case

MANIFEST_NAME = "manifest.json"
CACHE_FORMAT = "admanomaly-slice-cache"
CACHE_VERSION = 1
_ARRAYS = {
    # name: (dtype, per-slice shape factory)
    "train_images": (np.float32, lambda n: (len(CONTRASTS), n, n)),
    "train_brain": (np.bool_, lambda n: (n, n)),
    "validation_images": (np.float32, lambda n: (len(CONTRASTS), n, n)),
    "validation_brain": (np.bool_, lambda n: (n, n)),
    "validation_labels": (np.bool_, lambda n: (n, n)),
}
_NEIGHBOUR_ARRAYS = ("train_neighbours", "validation_neighbours")
"""Arrays a cache holds only for a CtoC with a ``model.slice_context`` of c images (per slice (c·4, n, n))."""


def is_slice_cache(path: str | Path) -> bool:
    """Whether ``path`` is a folder written by :func:`build_slice_cache`."""
    return (Path(path) / MANIFEST_NAME).is_file()


def _cache_key(config: ADMConfig) -> dict[str, Any]:
    # Only what changes the cached slices; model and optimiser settings, and the normalisation of the
    # native volumes the post-processing reads, may differ freely. The context and the histogram
    # landmarks and the bias correction enter only when used, so caches written before they existed still match.
    preprocess = asdict(config.preprocess)
    del preprocess["native_normalisation"], preprocess["native_bias_correction_levels"]
    if not preprocess["bias_correction_levels"]:
        del preprocess["bias_correction_levels"]
    landmarks = preprocess.pop("histogram_landmarks")
    if config.preprocess.normalisation == "histogram":
        preprocess["histogram_landmarks"] = list(landmarks)
    key = {"preprocess": preprocess, "lesion_margin": config.train.lesion_margin}
    context = config.model.slice_context
    if context.each_side:
        key["context_slices"] = context.each_side
    if context.mirror:
        key["mirror_context"] = True
    return key


def build_slice_cache(
    data: str | Path | Sequence[CaseFiles],
    cache_dir: str | Path,
    config: ADMConfig,
    pattern: dict[str, str] | None = None,
    progress: Callable[[int, int, str], None] | None = None,
) -> Path:
    """Write the cache of ``data`` (a folder or case list) to ``cache_dir``, which must not exist.

    Built in a temporary sibling folder and renamed at the end, so an interrupted build leaves
    nothing that looks like a cache. Holds one case in memory at a time."""
    cache_dir = Path(cache_dir)
    if cache_dir.exists():
        raise OutputError(f"{cache_dir} already exists; choose a new folder for the cache")
    case_files = list(data) if not isinstance(data, (str, Path)) else cohort_cases(data, pattern)
    parent = cache_dir.parent if str(cache_dir.parent) else Path(".")
    try:
        parent.mkdir(parents=True, exist_ok=True)
        building = Path(tempfile.mkdtemp(prefix=f".{cache_dir.name}-building-", dir=parent))
    except OSError as exc:
        raise OutputError(f"cannot create the cache beside {cache_dir}: {exc.strerror or exc}") from None
    try:
        size, context = config.preprocess.image_size, config.model.slice_context
        shapes = {name: factory(size) for name, (_, factory) in _ARRAYS.items()}
        dtypes = {name: dtype for name, (dtype, _) in _ARRAYS.items()}
        if context:
            shapes.update({name: (context.images * len(CONTRASTS), size, size) for name in _NEIGHBOUR_ARRAYS})
            dtypes.update({name: np.float32 for name in _NEIGHBOUR_ARRAYS})
        streams = {name: open(building / f"{name}.raw", "wb") for name in shapes}
        digests = {name: hashlib.sha256() for name in shapes}
        counts = {"train": 0, "validation": 0}
        per_case: dict[str, Any] = {}

        def append(name: str, array: np.ndarray) -> None:
            raw = np.ascontiguousarray(array, dtype=dtypes[name]).tobytes()
            streams[name].write(raw)
            digests[name].update(raw)

        for number, files in enumerate(case_files, start=1):
            prepared = prepare_case(load_case(files, config.preprocess.grid_tolerance), config.preprocess,
                                    keep_native=())
            normal, lesion = training_slices(prepared, config.train.lesion_margin)
            append("train_images", prepared.slices[normal])
            append("train_brain", prepared.brain[normal])
            append("validation_images", prepared.slices[lesion])
            append("validation_brain", prepared.brain[lesion])
            if len(lesion):
                append("validation_labels", prepared.label[lesion])
            if context:
                append("train_neighbours", prepared.neighbours(normal, context))
                append("validation_neighbours", prepared.neighbours(lesion, context))
            per_case[files.case_id] = {"normal_slices": int(len(normal)), "lesion_slices": int(len(lesion)),
                                       "train_start": counts["train"], "validation_start": counts["validation"]}
            counts["train"] += len(normal)
            counts["validation"] += len(lesion)
            if progress is not None:
                progress(number, len(case_files), files.case_id)
        for stream in streams.values():
            stream.close()
        if counts["train"] == 0:
            raise TrainingDataError(f"none of the {len(case_files)} case(s) has a lesion-free brain slice")
        manifest = {
            "format": CACHE_FORMAT,
            "version": CACHE_VERSION,
            "key": _cache_key(config),
            "image_size": size,
            "counts": counts,
            "per_case": per_case,
            "arrays": {
                name: {"dtype": np.dtype(dtypes[name]).name, "shape": [counts[name.split("_")[0]], *shape],
                       "sha256": digests[name].hexdigest()}
                for name, shape in shapes.items()
            },
        }
        (building / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2))
        os.replace(building, cache_dir)
    except BaseException:
        shutil.rmtree(building, ignore_errors=True)
        raise
    return cache_dir


def load_slice_cache(cache_dir: str | Path, config: ADMConfig, verify: bool = True) -> TrainingData:
    """Memory-map a cache as :class:`TrainingData`; its preprocessing must match ``config``."""
    cache_dir = Path(cache_dir)
    try:
        manifest = json.loads((cache_dir / MANIFEST_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise InputError(f"{cache_dir}: unreadable slice-cache manifest ({exc})") from None
    if manifest.get("format") != CACHE_FORMAT or manifest.get("version") != CACHE_VERSION:
        raise InputError(f"{cache_dir}: not a version-{CACHE_VERSION} ADMAnomaly slice cache")
    if manifest["key"] != _cache_key(config):
        raise InputError(f"{cache_dir}: cache was built with other preprocessing settings or lesion margin; "
                         "rebuild it with the training settings")
    arrays = {}
    for name, entry in manifest["arrays"].items():
        path = cache_dir / f"{name}.raw"
        dtype, shape = np.dtype(entry["dtype"]), tuple(entry["shape"])
        expected = int(np.prod(shape)) * dtype.itemsize
        if not path.is_file() or path.stat().st_size != expected:
            raise InputError(f"{path}: missing or truncated cache array (expected {expected} bytes)")
        if verify and _sha256(path) != entry["sha256"]:
            raise InputError(f"{path}: checksum mismatch; the cache is corrupt, rebuild it")
        arrays[name] = np.memmap(path, dtype=dtype, mode="r", shape=shape) if expected else np.zeros(shape, dtype)
    train_ids, validation_ids = [], []
    for case_id, info in manifest["per_case"].items():
        train_ids += [case_id] * info["normal_slices"]
        validation_ids += [case_id] * info["lesion_slices"]
    has_labels = manifest["counts"]["validation"] > 0
    train = SliceSet(arrays["train_images"], arrays["train_brain"], None, train_ids, arrays.get("train_neighbours"))
    validation = SliceSet(arrays["validation_images"], arrays["validation_brain"],
                          arrays["validation_labels"] if has_labels else None, validation_ids,
                          arrays.get("validation_neighbours"))
    summary = {"cases": sorted(manifest["per_case"]), "per_case": manifest["per_case"],
               "train_slices": len(train), "validation_slices": len(validation), "slice_cache": str(cache_dir)}
    return TrainingData(train, validation, summary)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()
