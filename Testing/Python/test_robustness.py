"""Bad inputs, full disks, broken batches, cancellation and sharding: nothing silently wrong.

Each test reproduces a fault a user met (truncated files read as whole, broken outputs kept as
done, a whole field of view scored as brain, options that silently changed results, a threshold
change ignored, one broken case stopping a batch, workers that outlived a cancel) and checks what
the engine now does: a one-line error naming the reason, the documented exit code, nothing
half-written, every good case written once.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from ADMAnomalyLib import api, results
from ADMAnomalyLib.cases import discover_cases, find_cases, load_case
from ADMAnomalyLib.cli import build_parser, main
from ADMAnomalyLib.errors import GridMismatchError, InputError, OutputError
from ADMAnomalyLib.io import read_image, write_image_atomic
from conftest import REPO, make_synthetic_case


def cli(*args: str) -> int:
    return main([*map(str, args)])


def predict_cli(model: Path, data: Path, out: Path, *extra: str) -> int:
    return cli("predict", model, data, "-o", out, "--device", "cpu", "--progress", "none", *extra)


def table(out: Path) -> dict[str, results.CaseRecord]:
    return results.read_table(out)


def subprocess_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    return env


# -- 1. truncated images ---------------------------------------------------------------------------
@pytest.mark.parametrize("ext, keep", [(".nii.gz", 0.5), (".nii", 0.5), (".nii.gz", 200)])
def test_truncated_nifti_is_refused_as_truncated(tmp_path, ext, keep):
    image = sitk.GetImageFromArray(np.random.default_rng(0).normal(size=(30, 40, 50)).astype(np.float32))
    whole = tmp_path / f"whole{ext}"
    sitk.WriteImage(image, str(whole))
    data = whole.read_bytes()
    cut = tmp_path / f"cut{ext}"
    cut.write_bytes(data[: int(len(data) * keep) if keep < 1 else keep])
    with pytest.raises(InputError, match=r"cut\.nii(\.gz)?: truncated"):
        read_image(cut)
    assert read_image(whole).GetSize() == (50, 40, 30)


def test_truncated_case_fails_alone_and_is_named_truncated(trained_model, tmp_path, capsys):
    data = tmp_path / "data"
    make_synthetic_case(data, "good", seed=1)
    broken = make_synthetic_case(data, "cut", seed=2)
    flair = broken / "cut_flair.nii.gz"
    flair.write_bytes(flair.read_bytes()[: flair.stat().st_size // 2])
    out = tmp_path / "out"
    assert predict_cli(trained_model, data, out) == 6
    assert (out / "good_anomaly.nii.gz").exists() and not (out / "cut_energy.nii.gz").exists()
    assert "truncated" in (out / "errors.log").read_text(encoding="utf-8")
    assert table(out)["cut"].status == "failed" and "truncated" in table(out)["cut"].reason


# -- 2. full disk ----------------------------------------------------------------------------------
_FULL_DISK_SCRIPT = """
import resource, signal, sys
from ADMAnomalyLib.cli import main
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)      # writes past the limit fail with EFBIG, as on a full disk
resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, 20_000))
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.skipif(not hasattr(signal, "SIGXFSZ"), reason="needs POSIX file-size limits")
def test_full_disk_leaves_no_output_and_the_rerun_computes_the_case(trained_model, cohort, tmp_path):
    out = tmp_path / "out"
    command = [sys.executable, "-c", _FULL_DISK_SCRIPT, "predict", str(trained_model), str(cohort / "synth_0"),
               "-o", str(out), "--device", "cpu", "--progress", "none"]
    run = subprocess.run(command, capture_output=True, text=True, encoding="utf-8", env=subprocess_env(), timeout=300)
    assert run.returncode == 6, run.stderr
    assert "disk may be full" in run.stderr
    assert not (out / "synth_0_energy.nii.gz").exists() and not (out / "synth_0_anomaly.nii.gz").exists()
    assert not [p for p in out.iterdir() if ".tmp" in p.name], "no temporary file may be left behind"
    assert table(out)["synth_0"].status == "failed"
    report = api.predict_folder(trained_model, cohort / "synth_0", out, device="cpu")
    assert report.done == ["synth_0"] and not report.skipped
    assert not (out / "errors.log").exists(), "errors.log must not outlive the failure it listed"


def test_write_that_reports_success_but_leaves_a_short_file_is_refused(tmp_path, monkeypatch):
    image = sitk.GetImageFromArray(np.random.default_rng(1).random((20, 30, 40)).astype(np.float32))
    real_write = sitk.WriteImage

    def short_write(img, path, *args):
        real_write(img, path, *args)
        data = Path(path).read_bytes()
        Path(path).write_bytes(data[: len(data) // 3])  # what ITK leaves when the disk fills up

    monkeypatch.setattr(sitk, "WriteImage", short_write)
    for name in ("map.nii.gz", "map.nii", "map.nrrd"):
        with pytest.raises(OutputError, match="incomplete"):
            write_image_atomic(image, tmp_path / name)
    assert not list(tmp_path.iterdir())


# -- 3. non-zero background ------------------------------------------------------------------------
def test_non_zero_background_is_refused_and_a_supplied_mask_is_used(trained_model, cohort):
    files = find_cases(cohort / "synth_0")[0]
    images = {c: read_image(p) + 1.0 for c, p in files.contrasts.items()}
    with pytest.raises(InputError, match=r"100% of the field of view is non-zero.*brain mask"):
        api.predict(trained_model, images, device="cpu")
    original = load_case(files)
    brain = sitk.Cast(original.images["flair"] != 0, sitk.sitkUInt8)
    prediction = api.predict(trained_model, images, mask=brain, device="cpu")
    assert int(sitk.GetArrayViewFromImage(prediction.brain_mask).sum()) == int(sitk.GetArrayViewFromImage(brain).sum())


# -- 4. numeric options ----------------------------------------------------------------------------
@pytest.mark.parametrize("option", [["--batch-size", "-3"], ["--batch-size", "0"], ["--batch-size", "2.5"],
                                    ["--threshold", "nan"], ["--threshold", "inf"], ["--workers", "0"],
                                    ["--shard", "3/2"], ["--shard", "0/4"], ["--shard", "x"]])
def test_cli_refuses_bad_numbers_with_exit_2(trained_model, cohort, tmp_path, option, capsys):
    with pytest.raises(SystemExit) as info:
        predict_cli(trained_model, cohort, tmp_path / "out", *option)
    assert info.value.code == 2
    assert option[0] in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_api_refuses_bad_numbers(trained_model, cohort, tmp_path):
    with pytest.raises(InputError, match="batch size"):
        api.predict_folder(trained_model, cohort, tmp_path / "out", device="cpu", batch_size=-3)
    with pytest.raises(InputError, match="threshold must be a finite number"):
        api.predict_folder(trained_model, cohort, tmp_path / "out", device="cpu", threshold=float("nan"))
    files = find_cases(cohort / "synth_0")[0]
    images = {c: read_image(p) for c, p in files.contrasts.items()}
    with pytest.raises(InputError, match="batch size"):
        api.predict(trained_model, images, device="cpu", batch_size=0)
    prediction = api.predict(trained_model, images, device="cpu", batch_size=3)
    reference = api.predict(trained_model, images, device="cpu", batch_size=16)
    np.testing.assert_allclose(sitk.GetArrayViewFromImage(prediction.energy),
                               sitk.GetArrayViewFromImage(reference.energy), rtol=1e-5, atol=1e-5)
    with pytest.raises(InputError, match="finite"):
        prediction.anomaly(float("nan"))


# -- 5. a changed threshold ------------------------------------------------------------------------
def test_changed_threshold_rewrites_the_anomaly_maps_from_the_stored_energy(trained_model, cohort, tmp_path):
    out = tmp_path / "out"
    assert predict_cli(trained_model, cohort, out) == 0
    energy_before = {p.name: p.stat().st_mtime_ns for p in out.glob("*_energy.nii.gz")}
    model = api.load_model(trained_model)
    new_threshold = float(model.threshold) - 1.0
    report = api.predict_folder(trained_model, cohort, out, device="cpu", threshold=new_threshold)
    assert sorted(report.rethresholded) == ["synth_0", "synth_1"] and not report.done and not report.skipped
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*_energy.nii.gz")} == energy_before
    assert json.loads((out / "report.json").read_text(encoding="utf-8"))["threshold"] == new_threshold
    fresh = tmp_path / "fresh"
    api.predict_folder(trained_model, cohort, fresh, device="cpu", threshold=new_threshold)
    for case_id in ("synth_0", "synth_1"):
        rewritten = sitk.GetArrayFromImage(sitk.ReadImage(str(out / f"{case_id}_anomaly.nii.gz")))
        direct = sitk.GetArrayFromImage(sitk.ReadImage(str(fresh / f"{case_id}_anomaly.nii.gz")))
        assert rewritten.any() and np.array_equal(rewritten, direct)
        assert table(out)[case_id].threshold == new_threshold
        assert table(out)[case_id].anomaly_ml == pytest.approx(table(fresh)[case_id].anomaly_ml)
    # The same through `admanomaly threshold`, back to the model's threshold.
    assert cli("threshold", out, "--threshold", repr(float(model.threshold)), "--progress", "none") == 0
    again = api.predict_folder(trained_model, cohort, out, device="cpu")
    assert sorted(again.skipped) == ["synth_0", "synth_1"]


def test_outputs_of_another_model_are_recomputed(trained_model, cohort, tmp_path):
    out = tmp_path / "out"
    api.predict_folder(trained_model, cohort / "synth_0", out, device="cpu")
    other = tmp_path / "other.admm"
    model = api.load_model(trained_model)
    model.metadata["note"] = "another model file"
    model.save(other)
    report = api.predict_folder(other, cohort / "synth_0", out, device="cpu")
    assert report.done == ["synth_0"]
    assert table(out)["synth_0"].model.startswith("other.admm@")


# -- 6. per-case discovery errors ------------------------------------------------------------------
def test_a_case_missing_a_contrast_or_with_two_flairs_fails_alone(trained_model, tmp_path, capsys):
    data = tmp_path / "data"
    make_synthetic_case(data, "good", seed=1)
    missing = make_synthetic_case(data, "missing", seed=2)
    (missing / "missing_t2.nii.gz").unlink()
    doubled = make_synthetic_case(data, "doubled", seed=3)
    shutil.copy(doubled / "doubled_flair.nii.gz", doubled / "doubled_FLAIR.nii.gz")
    out = tmp_path / "out"
    assert predict_cli(trained_model, data, out) == 6
    err = capsys.readouterr().err
    log = dict(line.split("\t", 1) for line in (out / "errors.log").read_text(encoding="utf-8").splitlines())
    assert "missing contrast t2" in log["missing"] and "two files for flair" in log["doubled"]
    assert (out / "good_energy.nii.gz").exists()
    # Each failure is printed once, after the run.
    assert err.count("missing contrast t2") == 1 and err.count("two files for flair") == 1
    report = api.predict_folder(trained_model, data, out, device="cpu")
    assert report.skipped == ["good"] and sorted(report.failed) == ["doubled", "missing"]
    with pytest.raises(InputError, match="case doubled: two files for flair"):
        find_cases(data)  # training and evaluation still need every case


# -- 7/8. cancellation and a fault battery ---------------------------------------------------------
def _big_cohort(folder: Path, n_cases: int, shape=(112, 112, 96)) -> Path:
    """``n_cases`` cases that share one synthetic case's files through links (cheap to make, slow
    enough to predict that a run can be interrupted in the middle)."""
    source = make_synthetic_case(folder / "_source", "src", shape=shape, seed=5)
    data = folder / "data"
    for number in range(n_cases):
        case_dir = data / f"case_{number:02d}"
        case_dir.mkdir(parents=True)
        for path in source.iterdir():
            (case_dir / path.name.replace("src", f"case_{number:02d}")).symlink_to(path)
    return data


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text(encoding="utf-8").rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                found.append(int(entry.name))
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text(encoding="utf-8").rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _wait_for_done_cases(out: Path, count: int, process: subprocess.Popen, limit: float = 180) -> None:
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        assert process.poll() is None, "the run ended before it could be interrupted"
        if out.joinpath(results.CASES_CSV).exists():
            done = sum(r.done for r in results.read_table(out).values())
            if done >= count:
                return
        time.sleep(0.2)
    raise AssertionError("no case finished in time")


def _predict_command(model: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "ADMAnomalyLib.cli", "predict", str(model), str(data), "-o", str(out),
            "--device", "cpu", "--progress", "none", "--batch-size", "1", *extra]


def _two_worker_run(model: Path, tmp_path: Path, output=subprocess.PIPE) -> tuple[subprocess.Popen, Path, list[int]]:
    """A ``predict --workers 2`` run over 14 cases, once its first case is done: (process, output
    folder, worker pids)."""
    data = _big_cohort(tmp_path, 14)
    out = tmp_path / "out"
    # A shell that runs pytest in the background hands it SIGINT ignored, and Python keeps an ignored
    # SIGINT ignored: the run starts with the default disposition, as in a terminal.
    process = subprocess.Popen(_predict_command(model, data, out, "--workers", "2"), env=subprocess_env(),
                               stdout=output, stderr=output, start_new_session=True,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    _wait_for_done_cases(out, 1, process)
    workers = _children(process.pid)
    assert len(workers) >= 2
    return process, out, workers


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads worker processes from /proc")
def test_cancel_with_two_workers_stops_every_worker(trained_model, tmp_path):
    process, out, workers = _two_worker_run(trained_model, tmp_path)
    os.killpg(process.pid, signal.SIGINT)  # Ctrl-C in a terminal reaches the whole process group
    _, err = process.communicate(timeout=20)
    assert process.returncode == 130, err
    deadline = time.monotonic() + 10
    while any(_alive(pid) for pid in workers) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(_alive(pid) for pid in workers), "workers outlived the cancel"
    written = sorted(p.name for p in out.glob("*.nii.gz"))
    time.sleep(2)
    assert sorted(p.name for p in out.glob("*.nii.gz")) == written, "outputs appeared after the cancel"
    assert len(written) < 2 * 14, "the cancel came too late to test anything"
    assert not [p for p in out.iterdir() if ".tmp" in p.name]
    # Rows are written right after a case's outputs by the process that made them: at most the cases
    # in flight (one per worker) can have outputs without a row, and they are recomputed next time.
    done = {r.case_id for r in results.read_table(out).values() if r.done}
    with_outputs = {p.name.rsplit("_", 1)[0] for p in out.glob("*_anomaly.nii.gz")}
    assert done <= with_outputs and len(with_outputs - done) <= 2


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads worker processes from /proc")
def test_workers_end_when_their_parent_is_killed(trained_model, tmp_path):
    process, out, workers = _two_worker_run(trained_model, tmp_path, subprocess.DEVNULL)
    process.kill()
    process.wait()
    deadline = time.monotonic() + 15
    while any(_alive(pid) for pid in workers) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(_alive(pid) for pid in workers), "orphan workers kept running"
    assert not [p for p in out.iterdir() if ".tmp" in p.name]


def _break_cases(data: Path) -> dict[str, str]:
    """Break some cases of ``data`` in different ways; returns case id -> expected reason."""
    def first(case: str, role: str) -> Path:
        return next((data / case).glob(f"{case}_{role}.nii.gz"))

    cut = first("case_01", "flair")
    whole = cut.read_bytes()
    cut.unlink()  # a link to the shared source: replaced by a real file cut in half
    cut.write_bytes(whole[: len(whole) // 2])
    first("case_03", "t2").unlink()
    nan_image = sitk.ReadImage(str(first("case_05", "t1")))
    first("case_05", "t1").unlink()
    array = sitk.GetArrayFromImage(nan_image)
    array[5, 5, 5] = np.nan
    broken = sitk.GetImageFromArray(array)
    broken.CopyInformation(nan_image)
    sitk.WriteImage(broken, str(data / "case_05" / "case_05_t1.nii.gz"))
    moved = sitk.ReadImage(str(first("case_07", "t1ce")))
    first("case_07", "t1ce").unlink()
    moved.SetOrigin(tuple(o + 3.0 for o in moved.GetOrigin()))
    sitk.WriteImage(moved, str(data / "case_07" / "case_07_t1ce.nii.gz"))
    return {"case_01": "truncated", "case_03": "missing contrast t2", "case_05": "non-finite",
            "case_07": "origin"}


def test_fault_battery_killed_and_rerun_equals_an_uninterrupted_run(trained_model, tmp_path):
    data = _big_cohort(tmp_path, 8, shape=(80, 80, 64))
    expected_failures = _break_cases(data)
    good = [f"case_{n:02d}" for n in range(8) if f"case_{n:02d}" not in expected_failures]
    reference = tmp_path / "reference"
    assert subprocess.run(_predict_command(trained_model, data, reference), env=subprocess_env(),
                          capture_output=True, timeout=600).returncode == 6
    out = tmp_path / "out"
    process = subprocess.Popen(_predict_command(trained_model, data, out), env=subprocess_env(),
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    _wait_for_done_cases(out, 1, process)
    process.kill()  # the hardest stop: no handler runs
    process.wait()
    interrupted = {r.case_id for r in results.read_table(out).values() if r.done}
    assert interrupted and set(good) - interrupted, "the kill came too late to test anything"
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("*.nii.gz")}
    rerun = subprocess.run(_predict_command(trained_model, data, out), env=subprocess_env(), capture_output=True,
                           text=True, encoding="utf-8", timeout=600)
    assert rerun.returncode == 6, rerun.stderr
    summary = rerun.stdout.strip().splitlines()[-1]
    assert f"{len(good) - len(interrupted)} written" in summary and f"{len(interrupted)} skipped" in summary
    for name, stamp in before.items():
        if name.rsplit("_", 1)[0] in interrupted:
            assert out.joinpath(name).stat().st_mtime_ns == stamp, f"{name} was written twice"
    for case_id in good:
        for kind in ("energy", "anomaly"):
            name = f"{case_id}_{kind}.nii.gz"
            assert (out / name).read_bytes() == (reference / name).read_bytes(), name
    log = dict(line.split("\t", 1) for line in (out / "errors.log").read_text(encoding="utf-8").splitlines())
    assert set(log) == set(expected_failures)
    for case_id, reason in expected_failures.items():
        assert reason in log[case_id], (case_id, log[case_id])
        assert not (out / f"{case_id}_energy.nii.gz").exists()
    assert not [p for p in out.iterdir() if ".tmp" in p.name]


# -- 9. shards -------------------------------------------------------------------------------------
def test_shards_split_a_folder_without_overlap(trained_model, tmp_path):
    data = tmp_path / "data"
    for number in range(5):
        make_synthetic_case(data, f"c{number}", seed=number, shape=(24, 20, 18))
    out = tmp_path / "out"
    reports = [api.predict_folder(trained_model, data, out, device="cpu", shard=f"{k}/3") for k in (1, 2, 3)]
    parts = [set(r.done) for r in reports]
    assert set().union(*parts) == {f"c{n}" for n in range(5)} and sum(map(len, parts)) == 5
    assert parts[0] == {"c0", "c3"}  # nnU-Net's convention: every N-th case from the K-th
    assert sorted(table(out)) == [f"c{n}" for n in range(5)]
    again = api.predict_folder(trained_model, data, out, device="cpu", shard="2/3")
    assert set(again.skipped) == parts[1] and not again.done


# -- 10. smaller annoyances ------------------------------------------------------------------------
def test_unreadable_reference_label_only_costs_the_figures(trained_model, tmp_path, caplog):
    data = tmp_path / "data"
    case_dir = make_synthetic_case(data, "lab", seed=4)
    (case_dir / "lab_seg.nii.gz").write_bytes(b"broken label")
    out = tmp_path / "out"
    report = api.predict_folder(trained_model, data, out, device="cpu")
    assert report.done == ["lab"]
    row = table(out)["lab"]
    assert row.dice is None and row.auprc is None and row.anomaly_ml is not None
    assert "lab_seg.nii.gz" in caplog.text


def test_case_table_has_figures_against_the_reference(trained_model, cohort, tmp_path):
    out = tmp_path / "out"
    api.predict_folder(trained_model, cohort, out, device="cpu")
    with open(out / results.CASES_CSV, newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [row["case_id"] for row in rows] == ["synth_0", "synth_1"]
    for row in rows:
        anomaly = sitk.ReadImage(str(out / f"{row['case_id']}_anomaly.nii.gz"))
        voxels = int(sitk.GetArrayViewFromImage(anomaly).sum())
        assert float(row["anomaly_ml"]) == pytest.approx(voxels * np.prod(anomaly.GetSpacing()) / 1000)
        assert 0.0 < float(row["dice"]) <= 1.0 and 0.0 < float(row["auprc"]) <= 1.0
        assert int(row["components"]) >= 1 and row["status"] == "done" and row["model"].startswith("tiny.admm@")
    results.write_table(out, results.read_table(out).values())  # round trip
    with open(out / results.CASES_CSV, newline="") as handle:
        assert list(csv.DictReader(handle)) == rows


def test_single_case_predict_reports_slice_progress(trained_model, cohort, tmp_path, capsys):
    assert cli("predict", trained_model, cohort / "synth_0", "-o", tmp_path / "o", "--device", "cpu",
               "--progress", "json") == 0
    events = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    slices = [e for e in events if e["stage"] == "slices"]
    assert len(slices) >= 2 and slices[-1]["step"] == slices[-1]["steps"]
    assert events.index(slices[0]) < events.index(next(e for e in events if e["stage"] == "predict"))


def test_exit_codes_follow_one_rule(trained_model, cohort, tmp_path):
    assert predict_cli(trained_model, tmp_path / "does-not-exist", tmp_path / "o") == 2
    empty = tmp_path / "empty"
    empty.mkdir()
    assert predict_cli(trained_model, empty, tmp_path / "o") == 2
    single = tmp_path / "single"
    case_dir = make_synthetic_case(single, "only", seed=1)
    (case_dir / "only_t1.nii.gz").write_bytes(b"not an image")
    assert predict_cli(trained_model, case_dir, tmp_path / "o") == 6
    assert cli("train", cohort, "-o", tmp_path / "m.admm", "--set", "bad") == 2
    assert cli("study", "--no-report") == 2


# -- 11. naming variants ---------------------------------------------------------------------------
@pytest.mark.parametrize("case_id, names", [
    ("AURORA_case", {"flair": "AURORA_case_flair", "t1": "AURORA_case_t1", "t1c": "AURORA_case_t1c",
                     "t2": "AURORA_case_t2"}),
    ("p1", {"flair": "p1_FLAIR", "t1": "p1_T1", "t1c": "p1_T1GD", "t2": "p1_T2W"}),
    ("p2", {"flair": "p2-t2f", "t1": "p2-t1n", "t1c": "p2-t1post", "t2": "p2-t2w"}),
    ("p3", {"flair": "p3_t2_flair", "t1": "p3_t1w", "t1c": "p3_t1ce", "t2": "p3_t2"}),
])
def test_common_contrast_spellings_are_recognised(tmp_path, case_id, names):
    image = sitk.Image(4, 4, 4, sitk.sitkFloat32)
    for name in names.values():
        sitk.WriteImage(image, str(tmp_path / f"{name}.nii.gz"))
    (case,) = find_cases(tmp_path)
    assert case.case_id == case_id
    assert {role: path.name for role, path in case.contrasts.items()} == {r: f"{n}.nii.gz" for r, n in names.items()}


def test_the_metastasis_case_is_found_by_its_names():
    folder = REPO.parent / "shared" / "data" / "metastasis" / "AURORA_case"
    if not folder.is_dir():
        pytest.skip("../shared/data/metastasis is not beside the repository")
    (case,) = discover_cases(folder)
    assert case.problem is None and case.contrasts["t1c"].name == "AURORA_case_t1c.nii.gz"


# -- 12. origin tolerance --------------------------------------------------------------------------
def test_origins_are_compared_relative_to_the_voxel_size(tmp_path):
    case_dir = make_synthetic_case(tmp_path, "o", shape=(20, 18, 16))
    t2 = case_dir / "o_t2.nii.gz"
    image = sitk.ReadImage(str(t2))
    origin = image.GetOrigin()
    image.SetOrigin((origin[0] + 0.001, origin[1], origin[2]))
    sitk.WriteImage(image, str(t2))
    load_case(find_cases(case_dir)[0])  # another tool's rounding: accepted
    image.SetOrigin((origin[0] + 0.3, origin[1], origin[2]))
    sitk.WriteImage(image, str(t2))
    with pytest.raises(GridMismatchError, match="origin"):
        load_case(find_cases(case_dir)[0])


# -- 13. command line ------------------------------------------------------------------------------
def test_cli_help_is_plain_text_and_every_option_is_explained(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out
    assert "``" not in text and ":mod:" not in text and "Exit codes" in text
    parser = build_parser()
    subparsers = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    for name, command in subparsers.choices.items():
        for action in command._actions:
            if action.option_strings and action.dest != "help":
                assert action.help, f"admanomaly {name} {action.option_strings[0]} has no help text"


def test_cli_version(capsys):
    from ADMAnomalyLib import __version__

    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0 and __version__ in capsys.readouterr().out


def test_demo_output_folder_is_ignored_by_git():
    assert "admanomaly_demo/" in (REPO / ".gitignore").read_text(encoding="utf-8").split()
