"""The .admm model file: bit-exact round trip, every malformed file, no code execution, atomicity."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

import ADMAnomalyLib.modelfile as modelfile
from ADMAnomalyLib.config import ADMConfig, preset
from ADMAnomalyLib.errors import ModelFileError, OutputError
from ADMAnomalyLib.modelfile import (
    FORMAT_VERSION,
    MAGIC,
    ModelFileContents,
    load_model_file,
    save_model_file,
)


def _contents() -> ModelFileContents:
    g = torch.Generator().manual_seed(0)
    state = {
        "ctoc.stem.weight": torch.randn(4, 5, 3, 3, generator=g),
        "ctoc.stem.bias": torch.randn(4, generator=g),
        "de.scale": torch.tensor(2.5, dtype=torch.float64),
        "norm.num_batches_tracked": torch.tensor(7, dtype=torch.int64),
        "empty": torch.zeros(0, 3),
        "view": torch.arange(12.0).reshape(3, 4).t(),  # non-contiguous
    }
    state["special"] = torch.tensor([np.nan, np.inf, -0.0, 1e-45], dtype=torch.float32)
    rng = np.random.default_rng(0)
    gmm = {
        "weights": np.full(6, 1 / 6),
        "means": rng.normal(size=(6, 7)),
        "covariances": np.tile(np.eye(7), (6, 1, 1)) + 1e-3,
    }
    metadata = {"training_command": "admanomaly train --preset tiny", "validation": {"auroc": 0.93, "n": 3}}
    return ModelFileContents(preset("tiny").to_dict(), state, gmm, 0.123456789012345, metadata)


def _saved(tmp_path: Path) -> Path:
    return save_model_file(tmp_path / "model.admm", _contents())


def _canonical(header: dict) -> bytes:
    # Independent restatement of the documented canonical form (key order kept, no spaces, ASCII).
    return json.dumps(header, separators=(",", ":"), ensure_ascii=True).encode()


def _split(data: bytes) -> tuple[dict, bytes]:
    (length,) = struct.unpack_from("<Q", data, 8)
    return json.loads(data[16 : 16 + length]), data[16 + length :]


def _craft(path: Path, header: dict, payload: bytes, fix_payload: bool = True, sign: bool = True) -> Path:
    """Write a file with an arbitrary header/payload, by default with consistent checksums.

    The string "__INF__" in the header becomes the JSON number 1e999 (which parses as inf)."""
    header = dict(header)
    if fix_payload:
        header["payload_nbytes"] = len(payload)
        header["payload_sha256"] = hashlib.sha256(payload).hexdigest()
    if sign:
        header.pop("header_sha256", None)
        header["header_sha256"] = hashlib.sha256(_canonical(header)).hexdigest()
    raw = _canonical(header).replace(b'"__INF__"', b"1e999")
    path.write_bytes(MAGIC + struct.pack("<Q", len(raw)) + raw + payload)
    return path


# --------------------------------------------------------------------------------------------------
# round trip


def test_round_trip_is_bit_exact(tmp_path):
    original = _contents()
    path = save_model_file(tmp_path / "model.admm", original)
    loaded = load_model_file(path)
    assert loaded.format_version == FORMAT_VERSION
    assert loaded.config == json.loads(json.dumps(original.config))  # tuples come back as lists
    assert ADMConfig.from_dict(loaded.config) == preset("tiny")
    assert loaded.threshold == original.threshold
    assert loaded.metadata == original.metadata
    assert list(loaded.state_dict) == list(original.state_dict)  # order kept
    for name, tensor in original.state_dict.items():
        got = loaded.state_dict[name]
        assert got.dtype == tensor.dtype and got.shape == tensor.shape
        assert got.numpy().tobytes() == tensor.contiguous().numpy().tobytes(), name  # NaN and -0.0 too
    for name, array in original.gmm.items():
        assert loaded.gmm[name].dtype == np.float64
        assert loaded.gmm[name].tobytes() == array.tobytes()
    # Saving the loaded contents again gives the same bytes: the format is deterministic.
    again = save_model_file(tmp_path / "again.admm", loaded)
    assert again.read_bytes() == path.read_bytes()
    # Loaded tensors own writable memory (usable by load_state_dict and in-place ops).
    assert all(tensor.numpy().flags.writeable for tensor in loaded.state_dict.values())
    loaded.state_dict["ctoc.stem.bias"].add_(1.0)


def test_header_and_metadata(tmp_path):
    contents = _contents()
    contents.metadata = {"auroc": float("nan"), "tuple": (1, 2), "np": np.float32(0.5)}
    contents.threshold = None
    path = save_model_file(tmp_path / "m.admm", contents)
    loaded = load_model_file(path)
    assert loaded.threshold is None
    assert loaded.metadata == {"auroc": None, "tuple": [1, 2], "np": 0.5}  # strict JSON
    from ADMAnomalyLib.modelfile import _Reader

    header, _ = _Reader(path).header(path.read_bytes())  # the file layout itself
    assert header["format"] == "admanomaly-model" and header["format_version"] == 1
    assert header["tensors"]["gmm/means"] == {"dtype": "float64", "shape": [6, 7], "offset": header["tensors"]["gmm/means"]["offset"], "nbytes": 336}
    assert all(entry["offset"] % 64 == 0 for entry in header["tensors"].values())


def test_invalid_contents_are_refused_on_save(tmp_path):
    for change in (
        {"threshold": float("inf")},
        {"threshold": float("nan")},
        {"state_dict": {"half": torch.zeros(2, dtype=torch.float16)}},
        {"state_dict": {"array": np.zeros(2)}},
        {"metadata": {"obj": object()}},
        {"config": [1, 2]},
    ):
        contents = _contents()
        for key, value in change.items():
            setattr(contents, key, value)
        with pytest.raises(ValueError):
            save_model_file(tmp_path / "bad.admm", contents)
    assert not (tmp_path / "bad.admm").exists()


# --------------------------------------------------------------------------------------------------
# unusable files


def _assert_refused(path: Path, match: str | None = None) -> None:
    with pytest.raises(ModelFileError) as info:
        load_model_file(path)
    message = str(info.value)
    assert str(path) in message and "\n" not in message
    if match:
        assert match in message, message


def test_missing_empty_and_folder(tmp_path):
    _assert_refused(tmp_path / "nope.admm", "not found")
    (tmp_path / "empty.admm").write_bytes(b"")
    _assert_refused(tmp_path / "empty.admm", "empty")
    (tmp_path / "folder.admm").mkdir()
    _assert_refused(tmp_path / "folder.admm", "folder")


def test_foreign_files(tmp_path):
    png = tmp_path / "image.png"
    png.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 100)
    _assert_refused(png, "PNG")
    text = tmp_path / "notes.admm"
    text.write_text("just some text that is long enough")
    _assert_refused(text, "not an ADMAnomaly model file")
    pt = tmp_path / "weights.pt"
    torch.save({"w": torch.zeros(3)}, pt)
    _assert_refused(pt, "PyTorch")
    legacy = tmp_path / "legacy.pt"
    torch.save({"w": torch.zeros(3)}, legacy, _use_new_zipfile_serialization=False)
    _assert_refused(legacy, "pickle")
    newer_magic = tmp_path / "newer.admm"
    newer_magic.write_bytes(b"ADMANOM2" + _saved(tmp_path).read_bytes()[8:])
    _assert_refused(newer_magic, "another generation")


def test_every_truncation_is_refused(tmp_path):
    data = _saved(tmp_path).read_bytes()
    cut = tmp_path / "cut.admm"
    for length in range(1, len(data)):
        cut.write_bytes(data[:length])
        with pytest.raises(ModelFileError, match="truncated|corrupt"):
            load_model_file(cut)


def test_extra_bytes_and_corrupt_payload(tmp_path):
    path = _saved(tmp_path)
    data = path.read_bytes()
    path.write_bytes(data + b"\0")
    _assert_refused(path, "trailing")
    header, payload = _split(data)
    flipped = bytearray(data)
    flipped[len(data) - len(payload) + 5] ^= 0x01
    path.write_bytes(bytes(flipped))
    _assert_refused(path, "checksum")


def test_corrupt_header(tmp_path):
    data = _saved(tmp_path).read_bytes()
    bad = tmp_path / "bad.admm"
    # Flip one byte at a time through the JSON header: always refused, never a crash.
    (length,) = struct.unpack_from("<Q", data, 8)
    for position in range(16, 16 + length, max(1, length // 200)):
        corrupt = bytearray(data)
        corrupt[position] ^= 0x55
        bad.write_bytes(bytes(corrupt))
        # Even flips that leave valid JSON (a digit of the threshold, a letter of a name) are
        # caught by the header checksum.
        _assert_refused(bad)
    huge = bytearray(data)
    huge[8:16] = struct.pack("<Q", 2**62)
    bad.write_bytes(bytes(huge))
    _assert_refused(bad, "implausible")
    header, payload = _split(data)
    for raw in (b"[1, 2]", b"{not json", b"\xff\xfe{}", json.dumps({**header, "threshold": "NaN"}).replace('"NaN"', "NaN").encode()):
        bad.write_bytes(MAGIC + struct.pack("<Q", len(raw)) + raw + payload)
        _assert_refused(bad)


@pytest.mark.parametrize(
    "edit, match",
    [
        (lambda h: h.update(format_version=FORMAT_VERSION + 1), "newer"),
        (lambda h: h.update(format_version=0), "format_version"),
        (lambda h: h.update(format_version="1"), "format_version"),
        (lambda h: h.update(format="something-else"), "format"),
        (lambda h: h.pop("config"), "config"),
        (lambda h: h.update(metadata=[]), "metadata"),
        (lambda h: h.update(threshold="__INF__"), "threshold"),  # JSON 1e999 parses as inf
        (lambda h: h.update(threshold="0.5"), "threshold"),
        (lambda h: h.update(threshold=True), "threshold"),
        (lambda h: h["tensors"]["gmm/means"].update(offset=10**9), "outside"),
        (lambda h: h["tensors"]["gmm/means"].update(offset=-8), "offset"),
        (lambda h: h["tensors"]["gmm/means"].update(dtype="object"), "dtype"),
        (lambda h: h["tensors"]["gmm/means"].update(dtype="float32"), "do not fit"),
        (lambda h: h["tensors"]["gmm/means"].update(shape=[7, 7]), "do not fit"),
        (lambda h: h["tensors"]["gmm/means"].update(shape=[6, -7]), "shape"),
        (lambda h: h["tensors"]["gmm/means"].update(shape="6x7"), "shape"),
        (lambda h: h["tensors"]["gmm/means"].update(nbytes=1.5), "offset or size"),
        (lambda h: h["tensors"].update({"gmm/means": h["tensors"].pop("gmm/means") and 3}), "invalid entry"),
        (lambda h: h["tensors"].update({"other/x": h["tensors"]["gmm/means"]}), "section"),
        (lambda h: h["tensors"].update({"gmm/copy": dict(h["tensors"]["gmm/covariances"], offset=h["tensors"]["gmm/covariances"]["offset"] + 8, shape=[1, 7, 7], nbytes=392)}), "overlap"),
        (lambda h: h["tensors"]["gmm/weights"].update(dtype="int64"), "float64"),
    ],
)
def test_invalid_header_entries(tmp_path, edit, match):
    header, payload = _split(_saved(tmp_path).read_bytes())
    edit(header)
    _assert_refused(_craft(tmp_path / "crafted.admm", header, payload), match)


def test_checksum_and_size_fields_must_match(tmp_path):
    header, payload = _split(_saved(tmp_path).read_bytes())
    _assert_refused(_craft(tmp_path / "a.admm", {**header, "payload_sha256": "0" * 64}, payload, fix_payload=False), "checksum")
    _assert_refused(_craft(tmp_path / "b.admm", {**header, "payload_nbytes": len(payload) + 1}, payload, fix_payload=False), "truncated")
    _assert_refused(_craft(tmp_path / "c.admm", {**header, "payload_nbytes": -1}, payload, fix_payload=False), "payload_nbytes")
    _assert_refused(_craft(tmp_path / "d.admm", {**header, "threshold": 0.5}, payload, sign=False), "header checksum")
    _assert_refused(_craft(tmp_path / "e.admm", {**header, "metadata": {"x": "__INF__"}}, payload), "header checksum")
    # A consistent, hand-made header is accepted: the checksum rule is the documented one.
    assert load_model_file(_craft(tmp_path / "f.admm", {**header, "threshold": 0.5}, payload)).threshold == 0.5


# --------------------------------------------------------------------------------------------------
# no code execution


class _Evil:
    """Unpickling this creates ``self.target`` as a side effect."""

    def __init__(self, target: Path) -> None:
        self.target = target

    def __reduce__(self):
        return (open, (str(self.target), "w"))


def test_malicious_torch_checkpoint_is_not_executed(tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.admm"
    torch.save({"state_dict": _Evil(marker)}, evil)
    _assert_refused(evil, "not an ADMAnomaly model file")
    raw_pickle = tmp_path / "evil.pkl"
    raw_pickle.write_bytes(pickle.dumps(_Evil(marker)))
    _assert_refused(raw_pickle, "pickle")
    assert not marker.exists()
    # Control: the payload really is malicious when unpickled.
    control = tmp_path / "control"
    pickle.loads(pickle.dumps(_Evil(control))).close()
    assert control.exists()


def test_pickle_bytes_inside_a_valid_file_stay_raw_numbers(tmp_path, monkeypatch):
    marker = tmp_path / "pwned"
    blob = pickle.dumps(_Evil(marker))
    blob += b"\0" * (-len(blob) % 8)
    header, _ = _split(_saved(tmp_path).read_bytes())
    header["tensors"] = {"state_dict/evil": {"dtype": "float64", "shape": [len(blob) // 8], "offset": 0, "nbytes": len(blob)}}
    path = _craft(tmp_path / "smuggled.admm", header, blob)

    def forbidden(*args, **kwargs):
        raise AssertionError("model loading must never unpickle")

    for name in ("load", "loads", "Unpickler"):
        monkeypatch.setattr(pickle, name, forbidden)
    monkeypatch.setattr(torch, "load", forbidden)
    loaded = load_model_file(path)
    assert loaded.state_dict["evil"].numpy().tobytes() == blob
    assert not marker.exists()
    source = Path(modelfile.__file__).read_text(encoding="utf-8")
    assert "import pickle" not in source and "torch.load(" not in source


# --------------------------------------------------------------------------------------------------
# atomic save


@pytest.mark.parametrize("failing", ["fsync", "replace"])
def test_failed_save_keeps_previous_file(tmp_path, monkeypatch, failing):
    path = _saved(tmp_path)
    before = path.read_bytes()

    def boom(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, failing, boom)
    changed = _contents()
    changed.threshold = 9.0
    with pytest.raises(OutputError, match="model.admm"):
        save_model_file(path, changed)
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.admm"]  # no temp file left
    assert load_model_file(path).threshold == _contents().threshold


def test_save_replaces_existing_file(tmp_path):
    path = _saved(tmp_path)
    changed = _contents()
    changed.threshold = 2.0
    save_model_file(path, changed)
    assert load_model_file(path).threshold == 2.0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.admm"]
