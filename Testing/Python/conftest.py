"""Shared pytest fixtures: small synthetic 4-contrast cases and the optional real BraTS folder.

``make_synthetic_case`` is a plain function too (``from conftest import make_synthetic_case``),
so tests can build several cases with different geometry in one folder.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import pytest
import SimpleITK as sitk

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    # Lets plain `pytest` (not only `python -m pytest` from the repo root) import ADMAnomalyLib.
    sys.path.insert(0, str(REPO))

BRATS_DIR = (REPO / ".." / "shared" / "data" / "brats18").resolve()
MS_DIR = (REPO / ".." / "shared" / "data" / "ms" / "patient26").resolve()
DEMO_DIR = REPO / "Resources" / "DemoData" / "patient26"

NAMINGS: dict[str, dict[str, str]] = {
    # role -> file name given the case id; "ms" mimics open_ms_data (read with OPEN_MS_PATTERN)
    "brats18": {"flair": "{c}_flair", "t1": "{c}_t1", "t1c": "{c}_t1ce", "t2": "{c}_t2", "label": "{c}_seg"},
    "brats23": {"flair": "{c}-t2f", "t1": "{c}-t1n", "t1c": "{c}-t1c", "t2": "{c}-t2w", "label": "{c}-seg"},
    "ms": {"flair": "FLAIR_{c}", "t1": "T1_{c}", "t1c": "T1POST_{c}", "t2": "T2_{c}", "label": "GOLD_STANDARD_{c}"},
}

# Relative tissue intensities (white matter, grey matter, ventricles) and overall scale per
# contrast, so every contrast has its own smooth contrast pattern as in real MRI.
_TISSUE = {
    "flair": ((0.75, 1.0, 0.15), 300.0),
    "t1": ((1.0, 0.7, 0.25), 500.0),
    "t1c": ((1.0, 0.75, 0.3), 550.0),
    "t2": ((0.6, 0.9, 1.6), 400.0),
}
_LESION_GAIN = {"flair": 1.7, "t1": 0.8, "t1c": 0.85, "t2": 1.6}


def synthetic_volumes(
    shape: Sequence[int] = (48, 40, 36), lesion: bool = True, seed: int = 0
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Numpy volumes (z, y, x) of a synthetic head: four float32 contrasts and a uint8 label.

    ``shape`` is in SimpleITK order (x, y, z). The brain is an ellipsoid with zero background;
    the lesion (label 2) is a sphere of radius ~max(2, z/10) voxels bright in FLAIR/T2.
    """
    nx, ny, nz = shape
    rng = np.random.default_rng(seed)
    z, y, x = np.meshgrid(
        (np.arange(nz) - (nz - 1) / 2) / (0.42 * nz),
        (np.arange(ny) - (ny - 1) / 2) / (0.42 * ny),
        (np.arange(nx) - (nx - 1) / 2) / (0.42 * nx),
        indexing="ij",
    )
    r = np.sqrt(x**2 + y**2 + z**2)
    brain = r < 1.0
    # Smooth tissue fractions: grey matter shell outside r~0.75, small central ventricles.
    grey = 1.0 / (1.0 + np.exp(-(r - 0.75) / 0.05))
    ventricle = 1.0 / (1.0 + np.exp((np.sqrt((2.5 * x) ** 2 + (1.5 * y) ** 2 + (2.0 * z) ** 2) - 0.5) / 0.05))
    bias = 1.0 + 0.08 * x - 0.05 * y + 0.04 * z  # gentle smooth field, as after bias correction
    label = np.zeros(brain.shape, dtype=np.uint8)
    if lesion:
        radius = max(2.0, nz / 10.0)
        centre = (nz // 2 + max(2, nz // 8), ny // 2 - max(2, ny // 6), nx // 2 + max(2, nx // 5))
        zz, yy, xx = np.meshgrid(np.arange(nz), np.arange(ny), np.arange(nx), indexing="ij")
        sphere = (zz - centre[0]) ** 2 + (yy - centre[1]) ** 2 + (xx - centre[2]) ** 2 <= radius**2
        label[sphere & brain] = 2
    volumes = {}
    for name, ((wm, gm, csf), scale) in _TISSUE.items():
        tissue = wm * (1 - grey) + gm * grey
        tissue = tissue * (1 - ventricle) + csf * ventricle
        values = scale * bias * tissue * (1.0 + 0.03 * rng.standard_normal(brain.shape))
        if lesion:
            values = np.where(label > 0, values * _LESION_GAIN[name], values)
        volumes[name] = np.where(brain, values, 0.0).astype(np.float32)
    return volumes, label


def make_synthetic_case(
    folder: Path,
    case_id: str = "synth_1",
    shape: Sequence[int] = (48, 40, 36),
    lesion: bool = True,
    naming: str = "brats18",
    direction: Optional[Sequence[float]] = None,
    spacing: Sequence[float] = (1.0, 1.0, 1.2),
    origin: Sequence[float] = (-20.0, 15.0, 5.0),
    seed: int = 0,
    ext: str = ".nii.gz",
) -> Path:
    """Write a synthetic 4-contrast case into ``folder/case_id/`` and return that case folder.

    ``naming`` is ``brats18`` (``<case>_flair`` ...), ``brats23`` (``<case>-t2f`` ...) or ``ms``
    (``FLAIR_<case>`` ..., read with ``OPEN_MS_PATTERN``). ``shape``/``spacing``/``origin`` are
    in SimpleITK (x, y, z) order; ``direction`` is a row-major 3x3 tuple (default identity).
    The label (``_seg``) is written only when ``lesion`` is true.
    """
    volumes, label = synthetic_volumes(shape, lesion, seed)
    names = NAMINGS[naming]
    case_dir = Path(folder) / case_id
    case_dir.mkdir(parents=True, exist_ok=True)

    def write(array: np.ndarray, role: str) -> None:
        image = sitk.GetImageFromArray(array)
        image.SetSpacing(tuple(float(s) for s in spacing))
        image.SetOrigin(tuple(float(o) for o in origin))
        if direction is not None:
            image.SetDirection(tuple(float(d) for d in direction))
        sitk.WriteImage(image, str(case_dir / (names[role].format(c=case_id) + ext)))

    for role, array in volumes.items():
        write(array, role)
    if lesion:
        write(label, "label")
    return case_dir


@pytest.fixture
def synthetic_case(tmp_path: Path) -> Path:
    """Folder of one default synthetic case (BraTS 2018 names, with lesion and label)."""
    return make_synthetic_case(tmp_path)


@pytest.fixture
def brats_dir() -> Path:
    """The shared BraTS 2018 sample folder; skips the test when it is not beside the repo."""
    if not BRATS_DIR.is_dir():
        pytest.skip(f"real BraTS data not found at {BRATS_DIR} (expected <repo>/../shared/data/brats18)")
    return BRATS_DIR


@pytest.fixture(scope="session")
def cohort(tmp_path_factory) -> Path:
    """Two synthetic cases with lesions (BraTS 2018 names)."""
    folder = tmp_path_factory.mktemp("cohort")
    for number in range(2):
        make_synthetic_case(folder, case_id=f"synth_{number}", seed=number)
    return folder


@pytest.fixture(scope="session")
def trained_model(cohort, tmp_path_factory) -> Path:
    """A real tiny model trained on ``cohort`` (CPU, a few seconds), with a validation threshold."""
    from ADMAnomalyLib import api
    from ADMAnomalyLib.config import preset

    output = tmp_path_factory.mktemp("model") / "tiny.admm"
    events: list = []
    config = preset("tiny", train={"epochs_ctoc": 2, "epochs_joint": 2, "lesion_margin": 1})
    api.train(cohort, output, config, device="cpu", progress=events.append, show_progress_bar=False)
    stages = {event["stage"] for event in events}
    assert {"ctoc", "joint", "gmm", "threshold", "done"} <= stages
    return output


def check_context_paths(model_path: Path, cohort: Path, carried: str):
    """For a model whose CtoC carries slices beside each one (``model.slice_context``): predict and the
    study's cached translations give the same energy, and slices scored without what the CtoC carries
    (``carried``, a phrase of the error) are refused. Returns the model and the study's case data."""
    from ADMAnomalyLib import api, study
    from ADMAnomalyLib.cases import find_cases
    from ADMAnomalyLib.infer import InferenceOptions, ctoc_translations, energy_slices
    from ADMAnomalyLib.study.runner import raw_energy

    model = api.load_model(model_path)
    files = find_cases(cohort / "synth_0")[0]
    images = {c: sitk.ReadImage(str(p)) for c, p in files.contrasts.items()}
    product = sitk.GetArrayFromImage(api.predict(model, images, device="cpu").energy)
    settings = study.quick_settings(preset="tiny", image_size=model.config.preprocess.image_size, device="cpu")
    case = study.load_case_data(files, settings)
    options = InferenceOptions("cpu")
    translations = {False: ctoc_translations(model, case.prepared, options)}
    np.testing.assert_array_equal(raw_energy(model, case, options, translations), product[case.brain])
    assert np.isfinite(product).all()
    prepared = case.prepared
    index = np.flatnonzero(prepared.has_brain)
    with pytest.raises(ValueError, match=carried):
        energy_slices(model, prepared.slices[index], prepared.brain[index], options)
    return model, case


def check_cache_context(cohort: Path, cache_dir: Path, config, channels: int, without) -> Path:
    """The slice cache of ``cohort`` holds what training reads beside each slice (``channels`` per
    slice) and refuses to serve ``without``, the config with that context off. Returns the cache."""
    from ADMAnomalyLib.cache import build_slice_cache, load_slice_cache
    from ADMAnomalyLib.cases import find_cases
    from ADMAnomalyLib.data import build_training_data
    from ADMAnomalyLib.errors import InputError

    cases = find_cases(cohort)
    cache = build_slice_cache(cases, cache_dir, config)
    cached = load_slice_cache(cache, config)
    direct = build_training_data(cases, config)
    for part in ("train", "validation"):
        np.testing.assert_array_equal(getattr(cached, part).neighbours, getattr(direct, part).neighbours)
        assert getattr(direct, part).neighbours.shape[1] == channels
    with pytest.raises(InputError, match="other preprocessing settings"):
        load_slice_cache(cache, without)
    return cache
