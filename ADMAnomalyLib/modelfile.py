"""The single-file model format (``.admm``): weights, frozen mixture, settings and provenance.

Layout (all integers little-endian)::

    offset 0    8 bytes   magic  b"ADMANOM1"
    offset 8    u64       header length H (bytes)
    offset 16   H bytes   UTF-8 JSON header (strict JSON, an object)
    offset 16+H           payload: raw little-endian tensor data, each tensor 64-byte aligned

Header keys::

    format          "admanomaly-model"
    format_version  1 (FORMAT_VERSION); newer versions are refused with a clear message
    config          ADMConfig.to_dict() (preprocessing settings included)
    threshold       validation best-F1 energy threshold, or null
    metadata        free-form JSON object (training command, validation metrics, data summary)
    tensors         {name: {"dtype": "float32"|"float64"|"int64", "shape": [...],
                            "offset": int (from payload start), "nbytes": int}}
                    names are "state_dict/<parameter name>" or "gmm/<array name>"
    payload_nbytes  payload length
    payload_sha256  hex SHA-256 of the payload
    header_sha256   hex SHA-256 of the header itself without this key, serialised canonically
                    (``canonical_json``); it catches a corrupted digit in the threshold or config,
                    which would otherwise still parse as valid JSON

Why not ``torch.save``: its pickle container executes code while loading, so a model file from
an untrusted source could run anything. This format is parsed with ``json`` and
``numpy.frombuffer`` only; nothing in this module imports or calls ``pickle``/``torch.load``.
Every way a file can be unusable (missing, empty, foreign, truncated, corrupt, newer version,
inconsistent tensor table) is a one-line :class:`~ADMAnomalyLib.errors.ModelFileError` naming
the file. Files are written atomically (temp file in the same folder, then ``os.replace``).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import numpy as np
import torch

from .errors import ModelFileError
from .io import write_bytes_atomic
from .metrics import json_safe

PathLike = Union[str, "os.PathLike[str]"]

MAGIC = b"ADMANOM1"
"""First 8 bytes of every model file. The trailing '1' names the container generation;
``format_version`` in the header is the authoritative version number."""
FORMAT_NAME = "admanomaly-model"
FORMAT_VERSION = 1
"""Version written by this build; files with a higher version are refused."""

_PREAMBLE = struct.Struct("<8sQ")  # magic, header length
_ALIGN = 64
_MAX_HEADER_BYTES = 64 * 1024 * 1024  # a header this large can only be a corrupt length field
_DTYPES: dict[str, np.dtype] = {
    "float32": np.dtype("<f4"),
    "float64": np.dtype("<f8"),
    "int64": np.dtype("<i8"),
}
_TORCH_DTYPES = {torch.float32: "float32", torch.float64: "float64", torch.int64: "int64"}
_SECTIONS = ("state_dict", "gmm")


@dataclass
class ModelFileContents:
    """Everything a model file holds."""

    config: dict[str, Any]
    """``ADMConfig.to_dict()``."""
    state_dict: dict[str, torch.Tensor]
    """Network weights; float32/float64/int64 tensors (moved to CPU when saved)."""
    gmm: dict[str, np.ndarray]
    """Frozen mixture parameters (e.g. weights, means, covariances), stored as float64."""
    threshold: float | None = None
    """Validation best-F1 energy threshold (finite) or None."""
    metadata: dict[str, Any] = field(default_factory=dict)
    """Free-form JSON object; non-finite floats are stored as null (strict JSON)."""
    format_version: int = FORMAT_VERSION
    """Version read from the file; ignored on save (FORMAT_VERSION is always written)."""


# --------------------------------------------------------------------------------------------------
# writing


def _strict_json(value: Any, what: str) -> Any:
    try:
        return json.loads(json.dumps(value, allow_nan=False))
    except (TypeError, ValueError) as exc:
        raise ValueError(f"model {what} is not JSON-serialisable: {exc}") from None


def canonical_json(value: Any) -> bytes:
    """The one serialisation used for headers: keys in their (file) order, no spaces, ASCII,
    strict JSON.

    ``json.loads`` keeps key order and Python's float repr round-trips exactly, so
    ``canonical_json(json.loads(canonical_json(h)))`` reproduces the bytes; that is what makes
    ``header_sha256`` verifiable after parsing. Key order is kept (not sorted) so tensors come
    back in the state_dict's order."""
    return json.dumps(value, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode("ascii")


def encode_model_file(contents: ModelFileContents) -> bytes:
    """The bytes of a model file for ``contents`` (see :func:`save_model_file`)."""
    if not isinstance(contents.config, dict):
        raise ValueError("model config must be a dict (ADMConfig.to_dict())")
    if not isinstance(contents.metadata, dict):
        raise ValueError("model metadata must be a dict")
    threshold = contents.threshold
    if threshold is not None:
        threshold = float(threshold)
        if not math.isfinite(threshold):
            raise ValueError(f"model threshold must be finite or None, got {threshold}")

    arrays: list[tuple[str, np.ndarray]] = []
    for name, tensor in contents.state_dict.items():
        if not isinstance(tensor, torch.Tensor):
            raise ValueError(f"state_dict entry {name!r} is a {type(tensor).__name__}, not a tensor")
        if tensor.dtype not in _TORCH_DTYPES:
            raise ValueError(f"state_dict entry {name!r} has unsupported dtype {tensor.dtype}")
        arrays.append((f"state_dict/{name}", tensor.detach().cpu().contiguous().numpy()))
    for name, value in contents.gmm.items():
        if isinstance(value, torch.Tensor):  # accepted for convenience (e.g. parameters on a GPU)
            value = value.detach().cpu().double().numpy()
        arrays.append((f"gmm/{name}", np.asarray(value, dtype=np.float64)))

    table: dict[str, dict[str, Any]] = {}
    chunks: list[bytes] = []
    offset = 0
    for name, array in arrays:
        dtype_name = array.dtype.name
        data = np.ascontiguousarray(array, dtype=_DTYPES[dtype_name]).tobytes()
        pad = -offset % _ALIGN
        chunks.append(b"\0" * pad)
        offset += pad
        table[name] = {"dtype": dtype_name, "shape": list(array.shape), "offset": offset, "nbytes": len(data)}
        chunks.append(data)
        offset += len(data)
    payload = b"".join(chunks)

    header = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "config": _strict_json(contents.config, "config"),
        "threshold": threshold,
        "metadata": _strict_json(json_safe(contents.metadata), "metadata"),
        "tensors": table,
        "payload_nbytes": len(payload),
        "payload_sha256": hashlib.sha256(payload).hexdigest(),
    }
    header["header_sha256"] = hashlib.sha256(canonical_json(header)).hexdigest()
    header_bytes = canonical_json(header)
    return _PREAMBLE.pack(MAGIC, len(header_bytes)) + header_bytes + payload


def save_model_file(path: PathLike, contents: ModelFileContents) -> Path:
    """Write ``contents`` to ``path`` atomically (an interrupted save leaves any previous file
    intact). Invalid contents raise ValueError; write failures raise OutputError. Returns the path."""
    return write_bytes_atomic(encode_model_file(contents), path)


# --------------------------------------------------------------------------------------------------
# reading


def _foreign_hint(head: bytes) -> str:
    """Name a recognisable foreign format, to make the error actionable."""
    if head.startswith(b"PK\x03\x04"):
        return " (a zip archive, e.g. a PyTorch .pt/.pth checkpoint; those are not loaded because unpickling can run code)"
    if head[:1] == b"\x80":
        return " (a Python pickle, e.g. a legacy PyTorch checkpoint; not loaded because unpickling can run code)"
    if head.startswith(b"\x89PNG"):
        return " (a PNG image)"
    if head.startswith((b"\x1f\x8b",)):
        return " (a gzip file, e.g. a .nii.gz image)"
    if head.startswith(MAGIC[:7]):
        return f" (signature {head[:8]!r}: another generation of the ADMAnomaly format)"
    return ""


class _Reader:
    """Validates one file's bytes; every failure becomes a ModelFileError naming the file."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def fail(self, reason: str) -> ModelFileError:
        return ModelFileError(f"{self.path}: {reason}")

    def read_bytes(self) -> bytes:
        try:
            with open(self.path, "rb") as handle:
                head = handle.read(len(MAGIC))
                # Check the signature before reading the rest: pointing at a multi-GB image
                # should fail at once, not after loading it into memory.
                self.check_magic(head)
                return head + handle.read()
        except FileNotFoundError:
            raise self.fail("model file not found") from None
        except IsADirectoryError:
            raise self.fail("is a folder, not a model file") from None
        except OSError as exc:
            raise self.fail(f"cannot read model file ({exc.strerror or type(exc).__name__})") from None

    def check_magic(self, head: bytes) -> None:
        if not head:
            raise self.fail("model file is empty")
        if not MAGIC.startswith(head):  # a short prefix of MAGIC is a truncated model file
            raise self.fail("not an ADMAnomaly model file" + _foreign_hint(head))

    def header(self, data: bytes) -> tuple[dict[str, Any], int]:
        """Parsed, validated header and the payload start offset."""
        self.check_magic(data[: len(MAGIC)])
        if len(data) < _PREAMBLE.size:
            raise self.fail(f"model file is truncated ({len(data)} bytes)")
        _, header_len = _PREAMBLE.unpack_from(data)
        if header_len > _MAX_HEADER_BYTES:
            raise self.fail(f"model file header length {header_len} is implausible (corrupt file)")
        start = _PREAMBLE.size + header_len
        if len(data) < start:
            raise self.fail(f"model file is truncated ({len(data)} bytes, header needs {start})")
        try:
            header = json.loads(data[_PREAMBLE.size : start].decode("utf-8"), parse_constant=_reject_constant)
        except (UnicodeDecodeError, ValueError, RecursionError) as exc:
            raise self.fail(f"model file header is corrupt ({type(exc).__name__})") from None
        if not isinstance(header, dict):
            raise self.fail("model file header is not a JSON object")
        if header.get("format") != FORMAT_NAME:
            raise self.fail(f"model file header names format {header.get('format')!r}, expected {FORMAT_NAME!r}")
        version = header.get("format_version")
        if not _is_int(version) or version < 1:
            raise self.fail(f"model file has an invalid format_version {version!r}")
        if version > FORMAT_VERSION:
            raise self.fail(
                f"model file format version {version} is newer than this ADMAnomaly supports "
                f"({FORMAT_VERSION}); update ADMAnomaly"
            )
        for key, kind in (
            ("config", dict), ("metadata", dict), ("tensors", dict), ("payload_sha256", str), ("header_sha256", str)
        ):
            if not isinstance(header.get(key), kind):
                raise self.fail(f"model file header entry {key!r} is missing or not a {kind.__name__}")
        threshold = header.get("threshold")
        if threshold is not None and (
            isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not math.isfinite(threshold)
        ):
            raise self.fail(f"model file threshold {threshold!r} is not a finite number")
        if not _is_int(header.get("payload_nbytes")) or header["payload_nbytes"] < 0:
            raise self.fail("model file header entry 'payload_nbytes' is missing or invalid")
        # Checked after the entries so a crafted-but-inconsistent header gets the specific message.
        unsigned = {key: value for key, value in header.items() if key != "header_sha256"}
        try:
            digest = hashlib.sha256(canonical_json(unsigned)).hexdigest()
        except (TypeError, ValueError):  # e.g. 1e999 in metadata parses as inf
            digest = ""
        if digest != header["header_sha256"].lower():
            raise self.fail("model file is corrupt (header checksum mismatch)")
        return header, start

    def payload(self, data: bytes, header: dict[str, Any], start: int) -> memoryview:
        expected = header["payload_nbytes"]
        actual = len(data) - start
        if actual < expected:
            raise self.fail(f"model file is truncated (payload has {actual} of {expected} bytes)")
        if actual > expected:
            raise self.fail(f"model file has {actual - expected} unexpected trailing bytes (corrupt file)")
        payload = memoryview(data)[start:]
        if hashlib.sha256(payload).hexdigest() != header["payload_sha256"].lower():
            raise self.fail("model file is corrupt (payload checksum mismatch)")
        return payload

    def tensors(self, header: dict[str, Any], payload: memoryview) -> dict[str, np.ndarray]:
        spans = []
        arrays: dict[str, np.ndarray] = {}
        for name, entry in header["tensors"].items():
            section = name.split("/", 1)[0]
            if "/" not in name or section not in _SECTIONS:
                raise self.fail(f"model file tensor {name!r} is not in a known section {_SECTIONS}")
            if not isinstance(entry, dict):
                raise self.fail(f"model file tensor {name!r} has an invalid entry")
            dtype = _DTYPES.get(entry.get("dtype")) if isinstance(entry.get("dtype"), str) else None
            if dtype is None:
                raise self.fail(f"model file tensor {name!r} has unsupported dtype {entry.get('dtype')!r}")
            shape, offset, nbytes = entry.get("shape"), entry.get("offset"), entry.get("nbytes")
            if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
                raise self.fail(f"model file tensor {name!r} has an invalid shape {shape!r}")
            if not _is_int(offset) or not _is_int(nbytes) or offset < 0:
                raise self.fail(f"model file tensor {name!r} has an invalid offset or size")
            count = math.prod(shape)
            if nbytes != count * dtype.itemsize:
                raise self.fail(f"model file tensor {name!r}: {nbytes} bytes do not fit shape {shape} {entry['dtype']}")
            if offset + nbytes > len(payload):
                raise self.fail(f"model file tensor {name!r} lies outside the payload")
            if nbytes:  # empty tensors occupy no bytes and cannot overlap anything
                spans.append((offset, offset + nbytes, name))
            # frombuffer reads the bytes as plain numbers and .astype copies them into native order.
            flat = np.frombuffer(payload, dtype=dtype, count=count, offset=offset) if count else np.zeros(0, dtype)
            arrays[name] = flat.astype(dtype.newbyteorder("="), copy=True).reshape(shape)
        spans.sort()
        for (_, end, first), (begin, _, second) in zip(spans, spans[1:]):
            if begin < end:
                raise self.fail(f"model file tensors {first!r} and {second!r} overlap")
        return arrays


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _reject_constant(token: str) -> Any:
    raise ValueError(f"non-standard JSON constant {token}")


def load_model_file(path: PathLike) -> ModelFileContents:
    """Read and fully validate a model file; any problem is a one-line :class:`ModelFileError`.

    No code from the file is ever executed: the header is JSON and tensors are raw numbers.
    """
    reader = _Reader(Path(path))
    data = reader.read_bytes()
    header, start = reader.header(data)
    payload = reader.payload(data, header, start)
    arrays = reader.tensors(header, payload)
    state_dict = {
        name.split("/", 1)[1]: torch.from_numpy(array) for name, array in arrays.items() if name.startswith("state_dict/")
    }
    gmm = {name.split("/", 1)[1]: array for name, array in arrays.items() if name.startswith("gmm/")}
    for name, array in gmm.items():
        if array.dtype != np.float64:
            raise reader.fail(f"model file mixture array {name!r} is {array.dtype}, expected float64")
    threshold = header.get("threshold")
    return ModelFileContents(
        config=header["config"],
        state_dict=state_dict,
        gmm=gmm,
        threshold=None if threshold is None else float(threshold),
        metadata=header["metadata"],
        format_version=header["format_version"],
    )
