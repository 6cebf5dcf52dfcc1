"""torchrun / DistributedDataParallel training on 2 CPU processes with gloo, and the slice cache."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from ADMAnomalyLib import api
from ADMAnomalyLib.cache import build_slice_cache, load_slice_cache
from ADMAnomalyLib.config import preset
from ADMAnomalyLib.data import build_training_data
from ADMAnomalyLib.distributed import DistributedContext, shard_exact, shard_for_training
from ADMAnomalyLib.errors import InputError, OutputError
from ADMAnomalyLib.train import fit_frozen_gmm
from conftest import REPO, make_synthetic_case



def tiny():
    return preset("tiny", train={"epochs_ctoc": 1, "epochs_joint": 1, "lesion_margin": 1})


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("cohort")
    for number in range(3):
        make_synthetic_case(folder, case_id=f"synth_{number}", seed=10 + number)
    return folder


@pytest.fixture(scope="module")
def tiny_model(cohort, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("model") / "tiny.admm"
    api.train(cohort, path, tiny(), device="cpu", show_progress_bar=False)
    return path


def torchrun(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *args]
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, encoding="utf-8", timeout=300)


def test_sharding_covers_every_slice():
    order = np.random.default_rng(0).permutation(11)
    shards = [shard_for_training(order, DistributedContext(rank, 2)) for rank in range(2)]
    assert len(shards[0]) == len(shards[1]) == 6, "DDP needs the same number of steps on every rank"
    assert set(np.concatenate(shards)) == set(range(11))
    exact = [shard_exact(11, DistributedContext(rank, 3)) for rank in range(3)]
    assert sorted(np.concatenate(exact).tolist()) == list(range(11)), "statistics must see each slice once"


def test_two_process_gmm_equals_single_process(tiny_model, cohort, tmp_path):
    model = api.load_model(tiny_model)
    data = build_training_data(api.find_cases(cohort), model.config)
    single = fit_frozen_gmm(model, data.train, torch.device("cpu"), batch_size=3)

    worker = tmp_path / "fit_worker.py"
    worker.write_text(textwrap.dedent(f"""
        import numpy as np
        from ADMAnomalyLib import api
        from ADMAnomalyLib.data import build_training_data
        from ADMAnomalyLib.distributed import init_from_environment, shutdown
        from ADMAnomalyLib.train import fit_frozen_gmm
        context, device = init_from_environment("cpu")
        model = api.load_model({str(tiny_model)!r})
        data = build_training_data(api.find_cases({str(cohort)!r}), model.config)
        params = fit_frozen_gmm(model, data.train, device, 3, context)
        if context.is_main:
            np.savez({str(tmp_path / "distributed.npz")!r}, **params.to_dict())
        shutdown(context)
    """))
    result = torchrun(str(worker), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    distributed = np.load(tmp_path / "distributed.npz")
    # The statistics are float64 sums, but the features come from float32 convolutions whose
    # rounding depends on batch composition and thread count: float32 tolerance is the contract.
    for name, value in single.to_dict().items():
        np.testing.assert_allclose(distributed[name], value, rtol=1e-5, atol=1e-7, err_msg=name)


def test_torchrun_train_end_to_end(cohort, tmp_path):
    output = tmp_path / "ddp.admm"
    result = torchrun("-m", "ADMAnomalyLib.cli", "train", str(cohort), "-o", str(output), "--preset", "tiny",
                      "--epochs-ctoc", "1", "--epochs-joint", "1", "--lesion-margin", "1", "--device", "cpu",
                      "--progress", "json", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    events = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert sum(event["stage"] == "done" for event in events) == 1, "only rank 0 reports"
    model = api.load_model(output)
    assert model.metadata["processes"] == 2
    assert not output.with_name(output.name + ".ckpt").exists()


def test_slice_cache_matches_in_memory_data(cohort, tmp_path):
    config = tiny()
    cache = build_slice_cache(cohort, tmp_path / "cache", config)
    cached = load_slice_cache(cache, config)
    direct = build_training_data(api.find_cases(cohort), config)
    assert isinstance(cached.train.images, np.memmap)
    np.testing.assert_array_equal(np.asarray(cached.train.images), direct.train.images)
    np.testing.assert_array_equal(np.asarray(cached.train.brain), direct.train.brain)
    np.testing.assert_array_equal(np.asarray(cached.validation.labels), direct.validation.labels)
    assert cached.train.case_ids == direct.train.case_ids
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "no half-built cache left"


def test_training_from_cache_equals_training_from_cases(cohort, tmp_path):
    config = tiny()
    cache = build_slice_cache(cohort, tmp_path / "cache", config)
    from_cache = api.train(cache, tmp_path / "a.admm", config, device="cpu", show_progress_bar=False)
    from_cases = api.train(cohort, tmp_path / "b.admm", config, device="cpu", show_progress_bar=False)
    for name, value in from_cases.network.state_dict().items():
        torch.testing.assert_close(from_cache.network.state_dict()[name], value, rtol=0, atol=0)


def test_cache_refuses_corruption_other_settings_and_reuse(cohort, tmp_path):
    config = tiny()
    cache = build_slice_cache(cohort, tmp_path / "cache", config)
    with pytest.raises(OutputError, match="already exists"):
        build_slice_cache(cohort, cache, config)
    with pytest.raises(InputError, match="other preprocessing"):
        load_slice_cache(cache, preset("tiny", train={"lesion_margin": 5}))
    # The native volumes' normalisation and bias correction never reach the cached slices; the input's does.
    def with_preprocess(**changes):
        return dataclasses.replace(config, preprocess=dataclasses.replace(config.preprocess, **changes))

    load_slice_cache(cache, with_preprocess(native_normalisation="robust"), verify=False)
    load_slice_cache(cache, with_preprocess(native_bias_correction_levels=2), verify=False)
    with pytest.raises(InputError, match="other preprocessing"):
        load_slice_cache(cache, with_preprocess(bias_correction_levels=2))
    with pytest.raises(InputError, match="other preprocessing"):
        load_slice_cache(cache, with_preprocess(normalisation="histogram"))
    histogram = with_preprocess(normalisation="histogram")
    histogram_cache = build_slice_cache(cohort, tmp_path / "histogram", histogram)
    load_slice_cache(histogram_cache, histogram)
    with pytest.raises(InputError, match="other preprocessing"):
        load_slice_cache(histogram_cache, with_preprocess(normalisation="histogram",
                                                          histogram_landmarks=(25.0, 50.0, 75.0)))
    raw = cache / "train_images.raw"
    data = bytearray(raw.read_bytes())
    data[100] ^= 0xFF
    raw.write_bytes(bytes(data))
    with pytest.raises(InputError, match="checksum"):
        load_slice_cache(cache, config)
    raw.write_bytes(bytes(data[:-8]))
    with pytest.raises(InputError, match="truncated"):
        load_slice_cache(cache, config)


def test_parallel_folder_prediction_matches_serial(tiny_model, cohort, tmp_path):
    import SimpleITK as sitk

    serial = api.predict_folder(tiny_model, cohort, tmp_path / "serial", device="cpu")
    parallel = api.predict_folder(tiny_model, cohort, tmp_path / "parallel", device="cpu", workers=2)
    assert sorted(parallel.done) == sorted(serial.done) == ["synth_0", "synth_1", "synth_2"]
    for case_id in serial.done:
        for kind in ("energy", "anomaly"):
            a = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "serial" / f"{case_id}_{kind}.nii.gz")))
            b = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "parallel" / f"{case_id}_{kind}.nii.gz")))
            if kind == "energy":
                np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-4)
            else:  # a voxel within float rounding of the threshold may flip
                assert (a != b).mean() < 1e-3
    again = api.predict_folder(tiny_model, cohort, tmp_path / "parallel", device="cpu", workers=2)
    assert sorted(again.skipped) == ["synth_0", "synth_1", "synth_2"] and not again.done
