"""Image IO (validation, atomic writing) and case discovery/loading."""

from __future__ import annotations

import gzip
import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from conftest import DEMO_DIR, MS_DIR, make_synthetic_case
from ADMAnomalyLib import io as adm_io
from ADMAnomalyLib.cases import (
    OPEN_MS_PATTERN,
    CaseFiles,
    case_from_images,
    find_cases,
    load_case,
)
from ADMAnomalyLib.config import CONTRASTS
from ADMAnomalyLib.errors import GridMismatchError, InputError, OutputError
from ADMAnomalyLib.io import read_image, write_bytes_atomic, write_image_atomic, write_text_atomic


def _volume(shape=(6, 5, 4), value=1.0) -> sitk.Image:
    image = sitk.GetImageFromArray(np.full(shape, value, dtype=np.float32))
    image.SetSpacing((1.0, 1.0, 2.0))
    return image


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


# ----------------------------------------------------------------------------- read_image


def test_read_image_roundtrip_formats(tmp_path):
    image = _volume()
    for name in ("a.nii.gz", "a.nii", "a.nrrd", "a.mha"):
        write_image_atomic(image, tmp_path / name)
        back = read_image(tmp_path / name)
        assert back.GetSize() == (4, 5, 6)
        assert back.GetSpacing() == (1.0, 1.0, 2.0)


def test_read_missing_file(tmp_path):
    with pytest.raises(InputError, match="nothere.nii.gz: file not found"):
        read_image(tmp_path / "nothere.nii.gz")


def test_read_garbage_file(tmp_path):
    path = tmp_path / "garbage.nii.gz"
    path.write_bytes(b"this is not an image")
    with pytest.raises(InputError, match=r"garbage\.nii\.gz: cannot read image") as info:
        read_image(path)
    assert "\n" not in str(info.value)


def test_read_2d_image(tmp_path):
    path = tmp_path / "flat.nii.gz"
    sitk.WriteImage(sitk.GetImageFromArray(np.ones((5, 4), np.float32)), str(path))
    with pytest.raises(InputError, match=r"flat\.nii\.gz: expected a 3-D scalar volume, got a 2-D"):
        read_image(path)


def test_read_4d_image(tmp_path):
    path = tmp_path / "series.nii.gz"
    sitk.WriteImage(sitk.Image([4, 4, 3, 2], sitk.sitkFloat32), str(path))
    with pytest.raises(InputError, match=r"series\.nii\.gz: expected a 3-D scalar volume, got a 4-D"):
        read_image(path)


def test_read_vector_image(tmp_path):
    path = tmp_path / "rgb.nrrd"
    sitk.WriteImage(sitk.Image([4, 4, 3], sitk.sitkVectorFloat32, 3), str(path))
    with pytest.raises(InputError, match="expected a 3-D scalar volume, got .*3 components"):
        read_image(path)


@pytest.mark.parametrize("bad, what", [(np.nan, r"2 non-finite voxel\(s\) \(2 NaN, 0 inf\)"),
                                       (np.inf, r"2 non-finite voxel\(s\) \(0 NaN, 2 inf\)")])
@pytest.mark.parametrize("ext", [".nii.gz", ".nii", ".mha", ".nrrd"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_read_non_finite(tmp_path, bad, what, ext, dtype):
    # ITK's NIfTI reader silently zeroes NaN/inf, so read_image checks the raw NIfTI data too.
    values = np.ones((40, 30, 20), dtype)
    values[1, 2, 3] = values[39, 29, 19] = bad
    path = tmp_path / f"bad{ext}"
    sitk.WriteImage(sitk.GetImageFromArray(values), str(path))
    with pytest.raises(InputError, match=rf"bad{ext.replace('.', '[.]')}: {what}"):
        read_image(path)


# ----------------------------------------------------------------------------- atomic writing


def test_write_image_nii_gz_is_gzipped_and_clean(tmp_path):
    path = write_image_atomic(_volume(), tmp_path / "out.nii.gz")
    assert path.read_bytes()[:2] == b"\x1f\x8b"  # gzip magic: extension semantics kept
    with gzip.open(path) as handle:
        handle.read(10)
    assert _leftovers(tmp_path) == ["out.nii.gz"]
    assert oct(path.stat().st_mode & 0o777) != oct(0o600)  # not mkstemp's private mode


def test_write_image_creates_parent(tmp_path):
    path = write_image_atomic(_volume(), tmp_path / "a" / "b" / "out.nrrd")
    assert read_image(path).GetSize() == (4, 5, 6)


def test_write_image_failure_leaves_nothing(tmp_path, monkeypatch):
    def broken(image, name, *args, **kwargs):
        Path(name).write_bytes(b"half")  # simulate a partially written temp file, then die
        raise RuntimeError("disk full")

    monkeypatch.setattr(adm_io.sitk, "WriteImage", broken)
    with pytest.raises(OutputError, match=r"out\.nii\.gz: cannot write image \(disk full\)"):
        write_image_atomic(_volume(), tmp_path / "out.nii.gz")
    assert _leftovers(tmp_path) == []


def test_write_image_failure_keeps_previous_file(tmp_path, monkeypatch):
    target = tmp_path / "out.nii.gz"
    write_image_atomic(_volume(value=3.0), target)
    before = target.read_bytes()

    def broken(*args, **kwargs):
        raise RuntimeError("interrupted")

    monkeypatch.setattr(adm_io.sitk, "WriteImage", broken)
    with pytest.raises(OutputError):
        write_image_atomic(_volume(value=5.0), target)
    assert target.read_bytes() == before
    assert _leftovers(tmp_path) == ["out.nii.gz"]


def test_a_rerun_removes_the_temp_files_of_a_killed_writer_only(tmp_path):
    """A writer killed mid-write leaves its temp file (no cleanup runs); the next write of the same
    output removes it, while a live writer's temp file (another shard's) stays."""
    import os
    import subprocess
    import sys

    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(gone.stdout)
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        stale = tmp_path / f".out.nii.gz.{dead_pid}.abc123.tmp.nii.gz"
        busy = tmp_path / f".out.nii.gz.{live.pid}.def456.tmp.nii.gz"
        other = tmp_path / f".other.nii.gz.{dead_pid}.ghi789.tmp.nii.gz"
        for path in (stale, busy, other):
            path.write_bytes(b"half")
        write_image_atomic(_volume(), tmp_path / "out.nii.gz")
        left = _leftovers(tmp_path)
        if os.name == "nt":
            assert stale.name in left
        else:
            assert stale.name not in left and busy.name in left and other.name in left
    finally:
        live.kill()
        live.wait()


def test_write_unwritable_folder(tmp_path):
    blocker = tmp_path / "file.txt"
    blocker.write_text("x")  # a file where a folder is needed: unwritable even for root
    with pytest.raises(OutputError, match="cannot write to folder"):
        write_image_atomic(_volume(), blocker / "out.nii.gz")
    with pytest.raises(OutputError, match="cannot write to folder"):
        write_bytes_atomic(b"abc", blocker / "sub" / "model.pt")


def test_write_to_a_folder_name(tmp_path):
    with pytest.raises(OutputError, match="is a folder"):
        write_text_atomic("x", tmp_path)


def test_write_unknown_extension(tmp_path):
    with pytest.raises(OutputError, match=r"out\.xyz: cannot write image"):
        write_image_atomic(_volume(), tmp_path / "out.xyz")
    assert _leftovers(tmp_path) == []


def test_write_bytes_and_text(tmp_path, monkeypatch):
    write_bytes_atomic(b"\x00\x01", tmp_path / "m.bin")
    write_text_atomic("héllo\n", tmp_path / "m.json")
    assert (tmp_path / "m.bin").read_bytes() == b"\x00\x01"
    assert (tmp_path / "m.json").read_text(encoding="utf-8") == "héllo\n"

    def broken_fsync(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(adm_io.os, "fsync", broken_fsync)
    with pytest.raises(OutputError, match=r"m\.json: cannot write file \(No space left on device\)"):
        write_text_atomic("new", tmp_path / "m.json")
    assert (tmp_path / "m.json").read_text(encoding="utf-8") == "héllo\n"
    assert _leftovers(tmp_path) == ["m.bin", "m.json"]


# ----------------------------------------------------------------------------- find_cases


def test_find_brats18_folder_of_cases(tmp_path):
    make_synthetic_case(tmp_path, "b_case", shape=(12, 10, 8))
    make_synthetic_case(tmp_path, "a_case", shape=(12, 10, 8), lesion=False)
    cases = find_cases(tmp_path)
    assert [c.case_id for c in cases] == ["a_case", "b_case"]
    assert list(cases[1].contrasts) == list(CONTRASTS)
    assert cases[1].label.name == "b_case_seg.nii.gz"
    assert cases[0].label is None and cases[0].mask is None


def test_t1_does_not_match_t1ce(tmp_path):
    case = find_cases(make_synthetic_case(tmp_path, "x", shape=(12, 10, 8)))[0]
    assert case.contrasts["t1"].name == "x_t1.nii.gz"
    assert case.contrasts["t1c"].name == "x_t1ce.nii.gz"


def test_find_folder_that_is_one_case(tmp_path):
    case_dir = make_synthetic_case(tmp_path, "solo", shape=(12, 10, 8))
    cases = find_cases(case_dir)
    assert len(cases) == 1 and cases[0].case_id == "solo"


def test_find_flat_files_of_several_cases(tmp_path):
    for name in ("c2", "c1"):
        case_dir = make_synthetic_case(tmp_path / "tmp", name, shape=(12, 10, 8))
        for path in case_dir.iterdir():
            shutil.move(str(path), tmp_path / path.name)
    shutil.rmtree(tmp_path / "tmp")
    cases = find_cases(tmp_path)
    assert [c.case_id for c in cases] == ["c1", "c2"]
    assert all(c.contrasts["flair"].parent == tmp_path for c in cases)


def test_find_brats23(tmp_path):
    make_synthetic_case(tmp_path, "BraTS-GLI-00001-000", shape=(12, 10, 8), naming="brats23")
    case = find_cases(tmp_path)[0]
    assert case.case_id == "BraTS-GLI-00001-000"
    assert {c: p.name.split("-")[-1] for c, p in case.contrasts.items()} == {
        "flair": "t2f.nii.gz", "t1": "t1n.nii.gz", "t1c": "t1c.nii.gz", "t2": "t2w.nii.gz"}
    assert case.label.name.endswith("-seg.nii.gz")


def test_find_other_extensions_and_mask(tmp_path):
    case_dir = make_synthetic_case(tmp_path, "m", shape=(12, 10, 8), ext=".nrrd")
    sitk.WriteImage(sitk.ReadImage(str(case_dir / "m_seg.nrrd")), str(case_dir / "m_mask.mha"))
    case = find_cases(tmp_path)[0]
    assert case.contrasts["flair"].suffix == ".nrrd"
    assert case.mask.name == "m_mask.mha"


def test_find_by_pattern(tmp_path):
    make_synthetic_case(tmp_path, "patient02", shape=(12, 10, 8), naming="ms")
    make_synthetic_case(tmp_path, "patient01", shape=(12, 10, 8), naming="ms", lesion=False)
    (tmp_path / "notes").mkdir()  # a folder without matching files is not a case
    cases = find_cases(tmp_path, OPEN_MS_PATTERN)
    assert [c.case_id for c in cases] == ["patient01", "patient02"]
    assert cases[1].contrasts["t1"].name == "T1_patient02.nii.gz"
    assert cases[1].contrasts["t1c"].name == "T1POST_patient02.nii.gz"
    assert cases[1].label.name == "GOLD_STANDARD_patient02.nii.gz"
    assert cases[0].label is None
    # the pattern applies inside the folder itself as well
    assert find_cases(tmp_path / "patient02", OPEN_MS_PATTERN)[0].case_id == "patient02"
    # the same files are not BraTS names
    with pytest.raises(InputError, match="no case found"):
        find_cases(tmp_path)


def test_pattern_errors(tmp_path):
    make_synthetic_case(tmp_path, "p", shape=(12, 10, 8), naming="ms")
    with pytest.raises(InputError, match="no glob for contrast.*t2"):
        find_cases(tmp_path, {"flair": "FLAIR_*", "t1": "T1_*", "t1c": "T1POST_*"})
    with pytest.raises(InputError, match="unknown key.*t1ce"):
        find_cases(tmp_path, {**OPEN_MS_PATTERN, "t1ce": "x"})
    with pytest.raises(InputError, match=r"case p: two files for t1: .*T1POST_p.*and.*T1_p"):
        find_cases(tmp_path, {**OPEN_MS_PATTERN, "t1": "T1*"})
    with pytest.raises(InputError, match="no files match the pattern"):
        find_cases(tmp_path, {c: "nothing_*" for c in CONTRASTS})


def test_missing_contrast(tmp_path):
    case_dir = make_synthetic_case(tmp_path, "gap", shape=(12, 10, 8))
    (case_dir / "gap_t1.nii.gz").unlink()
    with pytest.raises(InputError, match="case gap: missing contrast t1$"):
        find_cases(tmp_path)


def test_two_files_for_one_contrast(tmp_path):
    case_dir = make_synthetic_case(tmp_path, "dup", shape=(12, 10, 8))
    shutil.copy(case_dir / "dup_flair.nii.gz", case_dir / "dup_flair.nrrd")
    with pytest.raises(InputError, match=r"case dup: two files for flair: .*dup_flair\.nii\.gz and .*dup_flair\.nrrd"):
        find_cases(tmp_path)


def test_no_case_in_folder(tmp_path):
    (tmp_path / "readme.txt").write_text("nothing here")
    (tmp_path / "stray_seg.nii.gz").write_bytes(b"")  # a lone result/label file is not a case
    (tmp_path / ".hidden_flair.nii.gz").write_bytes(b"")
    with pytest.raises(InputError, match="no case found"):
        find_cases(tmp_path)
    with pytest.raises(InputError, match="folder not found"):
        find_cases(tmp_path / "missing")


# ----------------------------------------------------------------------------- load_case


def test_load_case_casts_to_float32(tmp_path):
    case_dir = make_synthetic_case(tmp_path, "ld", shape=(12, 10, 8))
    image = sitk.Cast(sitk.ReadImage(str(case_dir / "ld_t2.nii.gz")), sitk.sitkInt16)
    sitk.WriteImage(image, str(case_dir / "ld_t2.nii.gz"))
    case = load_case(find_cases(tmp_path)[0])
    assert list(case.images) == list(CONTRASTS)
    assert all(im.GetPixelID() == sitk.sitkFloat32 for im in case.images.values())
    assert case.label is not None and case.mask is None
    assert case.sources["t2"].endswith("ld_t2.nii.gz")


@pytest.mark.parametrize(
    "change, prop",
    [
        (lambda im: sitk.ConstantPad(im, (1, 0, 0)), "size"),
        (lambda im: _with(im, spacing=(1.0, 1.0, 1.3)), "spacing"),
        (lambda im: _with(im, origin=(-20.0, 15.5, 5.0)), "origin"),
        (lambda im: _with(im, direction=(0, 1, 0, 1, 0, 0, 0, 0, 1)), "direction"),
    ],
)
@pytest.mark.parametrize("role", ["t1c", "seg"])
def test_grid_mismatch(tmp_path, change, prop, role):
    case_dir = make_synthetic_case(tmp_path, "g", shape=(12, 10, 8))
    path = case_dir / f"g_{'t1ce' if role == 't1c' else role}.nii.gz"
    sitk.WriteImage(change(sitk.ReadImage(str(path))), str(path))
    with pytest.raises(GridMismatchError, match=rf"{path.name}: {prop} \(.*\) differs from .*g_flair\.nii\.gz \("):
        load_case(find_cases(tmp_path)[0])


def _with(image, spacing=None, origin=None, direction=None):
    image = sitk.Image(image)
    if spacing:
        image.SetSpacing(spacing)
    if origin:
        image.SetOrigin(origin)
    if direction:
        image.SetDirection(direction)
    return image


def test_grid_within_tolerance(tmp_path):
    case_dir = make_synthetic_case(tmp_path, "tol", shape=(12, 10, 8))
    images = {c: sitk.ReadImage(str(p)) for c, p in find_cases(case_dir)[0].contrasts.items()}
    images["t2"].SetOrigin(tuple(o + 1e-6 for o in images["t2"].GetOrigin()))
    case = case_from_images(images, case_id="tol")
    assert case.images["t2"].GetOrigin() == images["t2"].GetOrigin()
    images["t2"].SetOrigin(tuple(o + 1e-2 for o in images["t2"].GetOrigin()))
    with pytest.raises(GridMismatchError, match="case tol t2: origin"):
        case_from_images(images, case_id="tol")


def test_case_from_images_errors():
    images = {c: _volume() for c in CONTRASTS}
    case = case_from_images(images, label=sitk.Cast(_volume(), sitk.sitkUInt8), case_id="mem")
    assert case.case_id == "mem" and case.label is not None
    with pytest.raises(InputError, match="case mem: missing contrast t1c"):
        case_from_images({c: images[c] for c in ("flair", "t1", "t2")}, case_id="mem")
    with pytest.raises(InputError, match="unknown contrast key.*t1ce"):
        case_from_images({**images, "t1ce": images["t1"]}, case_id="mem")
    flat = sitk.GetImageFromArray(np.ones((5, 4), np.float32))
    with pytest.raises(InputError, match="case mem t2: expected a 3-D scalar volume, got a 2-D"):
        case_from_images({**images, "t2": flat}, case_id="mem")
    nan = sitk.GetImageFromArray(np.full((6, 5, 4), np.nan, np.float32))
    with pytest.raises(InputError, match=r"case mem mask: 120 non-finite"):
        case_from_images(images, mask=nan, case_id="mem")


def test_load_case_with_bad_file(tmp_path):
    case_dir = make_synthetic_case(tmp_path, "bad", shape=(12, 10, 8))
    (case_dir / "bad_t2.nii.gz").write_bytes(b"garbage")
    with pytest.raises(InputError, match=r"bad_t2\.nii\.gz: cannot read image"):
        load_case(find_cases(tmp_path)[0])


def test_casefiles_is_plain_dataclass(tmp_path):
    files = CaseFiles("x", {c: tmp_path / f"{c}.nii" for c in CONTRASTS})
    assert files.label is None and files.mask is None


# ----------------------------------------------------------------------------- real data


def test_real_ms_case_by_pattern():
    if not MS_DIR.is_dir():
        pytest.skip(f"MS case not found at {MS_DIR}")
    case = find_cases(MS_DIR, OPEN_MS_PATTERN)[0]
    assert case.case_id == "patient26" and case.label.name.startswith("GOLD_STANDARD_")


def test_demo_case_is_found_by_brats_names():
    assert DEMO_DIR.is_dir(), f"the bundled demo case is missing at {DEMO_DIR}"
    demo = load_case(find_cases(DEMO_DIR)[0])
    assert demo.case_id == "patient26" and demo.label is not None
    assert demo.images["flair"].GetDirection() == (1, 0, 0, 0, -1, 0, 0, 0, 1)
    assert sitk.GetArrayViewFromImage(demo.label).sum() > 1000


def test_demo_case_matches_source():
    """The bundled demo is an exact crop of the MS case in ../shared (tools/make_demo_case.py)."""
    if not MS_DIR.is_dir():
        pytest.skip(f"MS source case not found at {MS_DIR}")
    demo = load_case(find_cases(DEMO_DIR)[0])
    source = load_case(find_cases(MS_DIR, OPEN_MS_PATTERN)[0])
    start = source.images["flair"].TransformPhysicalPointToIndex(demo.images["flair"].GetOrigin())
    crop = tuple(slice(a, a + n) for a, n in zip(start, demo.images["flair"].GetSize()))
    for contrast in CONTRASTS:
        original = sitk.GetArrayFromImage(source.images[contrast][crop])
        stored = sitk.GetArrayFromImage(demo.images[contrast])
        assert np.corrcoef(original.ravel(), stored.ravel())[0, 1] > 0.9999
    np.testing.assert_array_equal(
        sitk.GetArrayFromImage(source.label[crop]) != 0, sitk.GetArrayFromImage(demo.label) != 0
    )
