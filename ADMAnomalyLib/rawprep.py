"""Raw clinical scans -> four co-registered, brain-extracted volumes on the FLAIR grid.

A scanner delivers four series on their own grids (matrix, slice thickness, orientation), with the
skull on and often as DICOM. :func:`prepare_raw` turns them into what the networks expect, step by
step, each step skipped when its input already looks done and each timed in a :class:`RawReport`:

1. ``n4`` (optional): N4 bias-field correction of each series on its own grid (SimpleITK);
2. ``register``: T1, T1c and T2 rigidly onto FLAIR (Mattes mutual information, three resolution
   levels, centred rotation; the better of the scanner-frame and the centre-of-mass start is kept).
   A result whose head outline does not overlap FLAIR's is refused (:class:`RegistrationError`);
3. ``brain``: a brain mask on the FLAIR grid, from the user, or from deepbet (weights inside its
   wheel) run on the FLAIR, or none when the inputs are already skull-stripped.

The FLAIR grid is the reference: every output (and hence every energy map) lies exactly on it.
"""

from __future__ import annotations

import contextlib
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import numpy as np
import SimpleITK as sitk

from .config import CONTRASTS
from .errors import InputError
from .io import check_volume, read_image

PathLike = Union[str, Path]

MODES = ("none", "auto", "full")
"""``preprocess`` values: nothing (inputs must be BraTS-like), detect what is needed, everything."""
STEP_CHOICES = ("auto", "yes", "no")

MIN_EXTENT_MM = 30.0
"""A volume thinner than this along any axis is not a brain volume (e.g. a 2-D scout)."""
MIN_HEAD_OVERLAP = 0.80
"""Dice of the head outlines of FLAIR and a registered series below which registration failed."""
MIN_COVERAGE = 0.50
"""Share of the FLAIR head a registered series must cover."""
REGISTRATION_THREADS = 1
"""Threads of every Mattes MI registration; more makes the transform vary from run to run."""
STRIPPED_BACKGROUND = 0.30
STRIPPED_MAX_ML = 2100.0
"""A volume is taken as skull-stripped when >= 30 % of it is exactly 0 and the rest is at most the
largest plausible intracranial volume."""
BRAIN_ML = (300.0, 2500.0)
"""Plausible range of an extracted brain (a partial slab can hold little of it)."""


class RegistrationError(InputError):
    """A series could not be registered onto FLAIR."""


@dataclass
class RawOptions:
    """What :func:`prepare_raw` does. ``register``/``skull_strip``: 'auto' (when the inputs need it),
    'yes' (always) or 'no' (never)."""

    register: str = "auto"
    skull_strip: str = "auto"
    n4: bool = False
    mask: Optional[sitk.Image] = None
    """A brain mask on the FLAIR grid supplied by the user (replaces brain extraction)."""

    @classmethod
    def from_mode(cls, mode: str, **overrides) -> "RawOptions":
        """Options of a ``preprocess`` mode ('auto' or 'full'); ``overrides`` replace single fields."""
        if mode not in MODES or mode == "none":
            raise InputError(f"preprocess must be one of auto, full (or none), not {mode!r}")
        forced = "yes" if mode == "full" else "auto"
        options = cls(register=forced, skull_strip=forced)
        for name, value in overrides.items():
            if value is not None:
                setattr(options, name, value)
        for name in ("register", "skull_strip"):
            if getattr(options, name) not in STEP_CHOICES:
                raise InputError(f"{name} must be one of {', '.join(STEP_CHOICES)}, not {getattr(options, name)!r}")
        return options


@dataclass
class StepReport:
    """One step: how long it took, whether it ran, and what it measured."""

    name: str
    seconds: float
    ran: bool
    details: dict = field(default_factory=dict)

    def line(self) -> str:
        facts = ", ".join(f"{k} {_fmt(v)}" for k, v in self.details.items())
        state = f"{self.seconds:.1f} s" if self.ran else "skipped"
        return f"{self.name}: {state}" + (f" ({facts})" if facts else "")


@dataclass
class RawResult:
    """The four contrasts on the FLAIR grid (float32, zero outside the brain), the brain mask (uint8)
    and the per-step report."""

    images: dict[str, sitk.Image]
    brain_mask: sitk.Image
    steps: list[StepReport]

    def summary(self) -> str:
        return "; ".join(step.line() for step in self.steps)

    def as_dict(self) -> dict:
        return {step.name: {"seconds": round(step.seconds, 2), "ran": step.ran, **step.details} for step in self.steps}


# ---------------------------------------------------------------------------------------------- reading

def read_series(path: PathLike) -> sitk.Image:
    """One volume from an image file (NIfTI/NRRD/MHA) or a folder holding one DICOM series."""
    path = Path(path)
    if path.is_dir():
        image = _read_dicom_folder(path)
    else:
        image = read_image(path)
    check_brain_volume(image, str(path))
    return image


def _read_dicom_folder(folder: Path) -> sitk.Image:
    reader = sitk.ImageSeriesReader()
    series = reader.GetGDCMSeriesIDs(str(folder))
    if not series:
        raise InputError(f"{folder}: no DICOM series in this folder")
    if len(series) > 1:
        raise InputError(f"{folder}: {len(series)} DICOM series in one folder; give each contrast its own folder")
    files = reader.GetGDCMSeriesFileNames(str(folder), series[0])
    reader.SetFileNames(files)
    try:
        image = reader.Execute()
    except RuntimeError as exc:
        raise InputError(f"{folder}: cannot read the DICOM series ({str(exc).strip().splitlines()[-1][:200]})") from None
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(f"{folder}: a colour DICOM series, expected an MR magnitude series")
    return image


def check_brain_volume(image: sitk.Image, name: str) -> None:
    """:func:`~ADMAnomalyLib.io.check_volume` plus: at least 3 voxels and 30 mm along every axis, so a
    2-D scout or a single slice is refused before registration tries to use it."""
    check_volume(image, name)
    extent = [n * s for n, s in zip(image.GetSize(), image.GetSpacing())]
    if min(image.GetSize()) < 3 or min(extent) < MIN_EXTENT_MM:
        size = "x".join(str(n) for n in image.GetSize())
        raise InputError(f"{name}: {size} voxels ({_fmt(min(extent))} mm thin): a 2-D scout or slab, not a brain volume")


_SERIES_RULES: tuple[tuple[str, re.Pattern], ...] = (
    # FLAIR first (T2-FLAIR is FLAIR), post-contrast T1 before T1, T2 before T1.
    ("flair", re.compile(r"flair|^t2f$")),
    ("t1c", re.compile(r"^t1-?(ce|c|gd|post|gad|contrast)$|^post$|^gd$|^gad$|^ce$|contrast|^mprage-?post$")),
    ("t2", re.compile(r"^t2w?$")),
    ("t1", re.compile(r"^t1(n|w)?$|^mprage$")),
)


def series_contrast(name: str) -> Optional[str]:
    """Contrast key a series' file or folder name suggests (``FLAIR_AX`` -> flair, ``T1_AX_POST_GAD``
    -> t1c), or None."""
    stem = re.sub(r"\.(nii\.gz|nii|nrrd|mha)$", "", name, flags=re.IGNORECASE)
    tokens = [t for t in re.split(r"[^a-z0-9+\-]+", stem.lower()) if t]
    for role, pattern in _SERIES_RULES:
        if any(pattern.search(token) for token in tokens):
            return role
    return None


def find_series(folder: PathLike) -> dict[str, Path]:
    """The four series of one raw case folder by name: image files or DICOM series subfolders, e.g.
    ``FLAIR_AX.nii.gz``, ``T1_AX/`` (DICOM), ``T1_AX_POST_GAD.nii.gz``, ``T2_AX.nii.gz``."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"{folder}: folder not found")
    found: dict[str, list[Path]] = {}
    for entry in sorted(folder.iterdir()):
        if entry.name.startswith("."):
            continue
        is_image = entry.is_file() and re.search(r"\.(nii\.gz|nii|nrrd|mha)$", entry.name, re.IGNORECASE)
        if not (is_image or entry.is_dir()):
            continue
        role = series_contrast(entry.name)
        if role is not None:
            found.setdefault(role, []).append(entry)
    for role, paths in found.items():
        if len(paths) > 1:
            raise InputError(f"{folder}: two series for {role}: {' and '.join(p.name for p in paths)}")
    missing = [c for c in CONTRASTS if c not in found]
    if missing:
        raise InputError(f"{folder}: missing contrast {', '.join(missing)} (series names should say "
                         f"FLAIR, T1, T1 post/Gd, T2)")
    return {c: found[c][0] for c in CONTRASTS}


# ---------------------------------------------------------------------------------------------- detection

def on_one_grid(images: dict[str, sitk.Image], tolerance: float = 1e-4) -> bool:
    """True when every contrast shares FLAIR's grid (as ``cases.check_same_grid`` defines it)."""
    from .cases import check_same_grid
    from .errors import GridMismatchError

    try:
        for name in CONTRASTS[1:]:
            check_same_grid(images[name], images["flair"], name, "flair", tolerance)
    except GridMismatchError:
        return False
    return True


def looks_skull_stripped(image: sitk.Image) -> bool:
    """Heuristic: a skull-stripped volume is mostly exact zeros around at most an intracranial volume
    (BraTS: 80 % zeros, 1.1-1.7 L); a raw head has noise or tissue almost everywhere and 2.5-6 L of
    foreground. Wrong guesses are overridden with ``skull_strip='yes'|'no'``."""
    values = sitk.GetArrayFromImage(image)
    foreground = values != 0
    millilitres = float(foreground.sum()) * float(np.prod(image.GetSpacing())) / 1000.0
    return bool((1.0 - foreground.mean()) >= STRIPPED_BACKGROUND and millilitres <= STRIPPED_MAX_ML)


def head_mask(image: sitk.Image) -> sitk.Image:
    """The head (or brain) outline: Otsu foreground, largest component, holes filled (uint8)."""
    smoothed = sitk.SmoothingRecursiveGaussian(sitk.Cast(image, sitk.sitkFloat32), 2.0)
    mask = sitk.OtsuThreshold(smoothed, 0, 1)
    components = sitk.RelabelComponent(sitk.ConnectedComponent(mask), sortByObjectSize=True)
    mask = sitk.Cast(components == 1, sitk.sitkUInt8)
    # Slice-wise hole filling: thick axial slices make 3-D closing unreliable.
    return sitk.Cast(sitk.BinaryFillhole(mask, fullyConnected=False), sitk.sitkUInt8)


# ---------------------------------------------------------------------------------------------- N4

N4_ITERATIONS = (50, 50, 30)
"""N4 iterations per fitting level on raw scans: each level doubles the B-spline grid of the field."""


def n4_correct(image: sitk.Image, shrink: int | Sequence[int] = 4, mask: Optional[sitk.Image] = None,
               iterations: tuple[int, ...] = N4_ITERATIONS) -> sitk.Image:
    """N4 bias-field correction inside ``mask`` (default: the head outline), fitted on a copy shrunk
    ``shrink`` times along each axis long enough for it (or by ``shrink[axis]``, x y z, along each) and applied
    at full resolution; one fitting level per entry of ``iterations``. The output keeps the input grid
    (float32)."""
    floats = sitk.Cast(image, sitk.sitkFloat32)
    mask = head_mask(floats) if mask is None else sitk.Cast(mask > 0, sitk.sitkUInt8)
    if isinstance(shrink, (int, np.integer)):
        factors = [int(shrink) if n >= 4 * shrink else 1 for n in floats.GetSize()]
    else:
        factors = [max(1, int(f)) for f in shrink]
    small = sitk.Shrink(floats, factors)
    small_mask = sitk.Shrink(mask, factors)
    corrector = sitk.N4BiasFieldCorrectionImageFilter()
    corrector.SetMaximumNumberOfIterations([int(n) for n in iterations])
    corrector.Execute(small, small_mask)
    return sitk.Cast(floats / bias_field(corrector, floats), sitk.sitkFloat32)


BIAS_FIELD_SAMPLE_MM = 6.0
""":func:`bias_field` evaluates N4's field at most this far apart (a whole number of voxels per axis; every voxel
along an axis whose voxels are as large) and interpolates linearly between."""


def bias_field(corrector: sitk.N4BiasFieldCorrectionImageFilter, image: sitk.Image) -> sitk.Image:
    """The multiplicative field a fitted ``corrector`` found, on ``image``'s grid: evaluated about every
    :data:`BIAS_FIELD_SAMPLE_MM` and interpolated linearly between. N4's control points span whatever grid the
    field is asked for, so the coarse grid has exactly the image's extent (first and last voxel centres). The
    field's cubic pieces span a quarter of the head or more: between samples 6 mm apart the interpolation was off
    by at most 3e-4 of the intensity on four 1 mm scans and 8e-4 on four thick-slice scanner series (where
    samples 4 voxels apart, 22 mm across their slices, were off by up to 9e-3), while evaluating it at every
    voxel of a 240 x 240 x 155 grid took 0.6 s."""
    size = image.GetSize()
    step = [max(1, int(BIAS_FIELD_SAMPLE_MM // float(spacing))) for spacing in image.GetSpacing()]
    coarse_size = [int(np.ceil((n - 1) / s)) + 1 if n > 1 else 1 for n, s in zip(size, step)]
    coarse = sitk.Image(coarse_size, sitk.sitkFloat32)
    coarse.SetOrigin(image.GetOrigin())
    coarse.SetDirection(image.GetDirection())
    coarse.SetSpacing([sp * (n - 1) / (m - 1) if m > 1 else sp
                       for sp, n, m in zip(image.GetSpacing(), size, coarse_size)])
    field = sitk.Exp(corrector.GetLogBiasFieldAsImage(coarse))
    # Rounding can put the grid's last voxel a hair beyond the coarse one's: it takes the nearest sample there.
    return sitk.Resample(field, image, sitk.Transform(), sitk.sitkLinear, 1.0, sitk.sitkFloat32,
                         useNearestNeighborExtrapolator=True)


# ---------------------------------------------------------------------------------------------- registration

@dataclass
class Registration:
    """A rigid transform moving -> fixed physical space and how well it fits."""

    transform: sitk.Transform
    metric: float
    """Final Mattes mutual information at full resolution (negative; lower is better)."""
    head_overlap: float
    """Dice of the head outlines of fixed and resampled moving inside moving's field of view."""
    coverage: float
    """Share of fixed's head inside moving's field of view."""
    start: str
    """Which initialisation won: 'scanner' (the shared scanner frame) or 'moments' (centres of mass)."""

    @property
    def rotation_deg(self) -> float:
        matrix = np.asarray(self.transform.GetMatrix()).reshape(3, 3)
        return float(np.degrees(np.arccos(np.clip((np.trace(matrix) - 1) / 2, -1, 1))))

    @property
    def translation_mm(self) -> float:
        return float(np.linalg.norm(self.transform.GetTranslation()))


def register_rigid(fixed: sitk.Image, moving: sitk.Image, name: str = "moving",
                   fixed_mask: Optional[sitk.Image] = None, seed: int = 7) -> Registration:
    """Rigid (6 degrees of freedom) registration of ``moving`` onto ``fixed``: Mattes MI (50 bins,
    10 % random samples, fixed seed), regular-step gradient descent with physical-shift scales,
    shrink 4/2/1 with 2/1/0 mm smoothing, rotation about fixed's centre.

    The first start is the scanner frame (series of one session share it, so it is the best prior);
    when its result fails the head-outline check the centres of mass are aligned and it is tried
    again. Raises :class:`RegistrationError` when the optimiser fails or no start passes the check."""
    fixed_f = sitk.Cast(fixed, sitk.sitkFloat32)
    moving_f = sitk.Cast(moving, sitk.sitkFloat32)
    centre = fixed_f.TransformContinuousIndexToPhysicalPoint([(n - 1) / 2 for n in fixed_f.GetSize()])
    failures = []
    for start in ("scanner", "moments"):
        if start == "scanner":
            initial = sitk.Euler3DTransform()
            initial.SetCenter(centre)
        else:
            initial = sitk.Euler3DTransform(sitk.CenteredTransformInitializer(
                fixed_f, moving_f, sitk.Euler3DTransform(), sitk.CenteredTransformInitializerFilter.MOMENTS))
        method = _registration_method(seed, fixed_mask)
        method.SetInitialTransform(initial, inPlace=True)
        try:
            with _reproducible_threads():
                method.Execute(fixed_f, moving_f)
        except RuntimeError as exc:
            failures.append(f"{start} start: {str(exc).strip().splitlines()[-1][:120]}")
            continue
        metric = _full_metric(fixed_f, moving_f, initial, seed, fixed_mask)
        overlap, coverage = _head_agreement(fixed_f, moving_f, initial)
        if overlap >= MIN_HEAD_OVERLAP and coverage >= MIN_COVERAGE:
            return Registration(initial, metric, overlap, coverage, start)
        failures.append(f"{start} start: head outlines overlap {overlap:.2f} (< {MIN_HEAD_OVERLAP}), "
                        f"FLAIR head covered {coverage:.0%}, Mattes MI {metric:.3f}")
    raise RegistrationError(f"{name}: registration to FLAIR failed ({'; '.join(failures)}); "
                            "is it the same patient's head?")


@contextlib.contextmanager
def _reproducible_threads():
    """ITK's v4 metrics add per-thread partial sums in whatever order the threads finish, and the
    threader they use is the global default one (a method's own ``SetNumberOfThreads`` does not reach
    it), so the optimiser's path, and the transform, changed from run to run. Registration therefore
    runs with ``REGISTRATION_THREADS`` global threads and the previous count is restored after."""
    previous = sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(REGISTRATION_THREADS)
    try:
        yield
    finally:
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(previous)


def _mattes_method(seed: int, fixed_mask: Optional[sitk.Image]) -> sitk.ImageRegistrationMethod:
    """A registration method with the metric both the optimisation and the final check use."""
    method = sitk.ImageRegistrationMethod()
    method.SetMetricAsMattesMutualInformation(numberOfHistogramBins=50)
    method.SetMetricSamplingStrategy(method.RANDOM)
    method.SetMetricSamplingPercentage(0.1, seed)
    if fixed_mask is not None:
        method.SetMetricFixedMask(fixed_mask)
    method.SetInterpolator(sitk.sitkLinear)
    return method


def _registration_method(seed: int, fixed_mask: Optional[sitk.Image]) -> sitk.ImageRegistrationMethod:
    method = _mattes_method(seed, fixed_mask)
    method.SetOptimizerAsRegularStepGradientDescent(learningRate=4.0, minStep=1e-3, numberOfIterations=100,
                                                    relaxationFactor=0.5, gradientMagnitudeTolerance=1e-6)
    method.SetOptimizerScalesFromPhysicalShift()
    method.SetShrinkFactorsPerLevel([4, 2, 1])
    method.SetSmoothingSigmasPerLevel([2.0, 1.0, 0.0])
    method.SmoothingSigmasAreSpecifiedInPhysicalUnitsOn()
    return method


def _full_metric(fixed: sitk.Image, moving: sitk.Image, transform: sitk.Transform, seed: int,
                 fixed_mask: Optional[sitk.Image]) -> float:
    method = _mattes_method(seed, fixed_mask)
    method.SetInitialTransform(transform)
    try:
        with _reproducible_threads():
            return float(method.MetricEvaluate(fixed, moving))
    except RuntimeError:
        return float("inf")


def _head_agreement(fixed: sitk.Image, moving: sitk.Image, transform: sitk.Transform) -> tuple[float, float]:
    """Dice of the head outlines inside moving's field of view, and the share of fixed's head in it."""
    fixed_head = sitk.GetArrayFromImage(head_mask(fixed)) > 0
    moving_head = sitk.GetArrayFromImage(
        sitk.Resample(head_mask(moving), fixed, transform, sitk.sitkNearestNeighbor, 0)) > 0
    ones = sitk.Image(moving.GetSize(), sitk.sitkUInt8) + 1
    ones.CopyInformation(moving)
    field_of_view = sitk.GetArrayFromImage(sitk.Resample(ones, fixed, transform, sitk.sitkNearestNeighbor, 0)) > 0
    field_of_view = field_of_view.copy()
    field_of_view[0] = field_of_view[-1] = False  # edge slices are partial in thick-slice data
    a, b = fixed_head & field_of_view, moving_head & field_of_view
    denominator = a.sum() + b.sum()
    dice = 2.0 * float((a & b).sum()) / float(denominator) if denominator else 0.0
    coverage = float(a.sum()) / max(1, int(fixed_head.sum()))
    return dice, coverage


def resample_onto(image: sitk.Image, reference: sitk.Image, transform: sitk.Transform) -> sitk.Image:
    """``image`` on ``reference``'s grid through ``transform`` (B-spline order 3, clamped at 0 so
    ringing cannot create negative intensities); float32."""
    resampled = sitk.Resample(sitk.Cast(image, sitk.sitkFloat32), reference, transform, sitk.sitkBSpline, 0.0,
                              sitk.sitkFloat32)
    return sitk.Clamp(resampled, sitk.sitkFloat32, 0.0)


# ---------------------------------------------------------------------------------------------- brain extraction

BRAIN_EXTRACTION_PACKAGE = "deepbet"
"""The brain-extraction tool: deepbet (MIT, weights inside its 10 MB wheel), chosen by measurement
against HD-BET (``benchmarks/raw_preprocessing.py``, docs/raw_case.md)."""


def brain_extraction_available() -> bool:
    """Whether the brain-extraction package is installed."""
    import importlib.util

    return importlib.util.find_spec(BRAIN_EXTRACTION_PACKAGE) is not None


def extract_brain(image: sitk.Image) -> sitk.Image:
    """deepbet brain mask (uint8, exactly on ``image``'s grid) of one head scan.

    deepbet works on arrays in the closest canonical RAS voxel order (as nibabel gives them); the
    reorientation is a permutation and flips of the voxel array (``sitk.DICOMOrient``), inverted
    exactly afterwards, so the mask lies on the input grid without resampling. Only the weights
    shipped inside the package are used: a missing weight file is an error, never a download."""
    if not brain_extraction_available():
        raise InputError(f"brain extraction needs the package {BRAIN_EXTRACTION_PACKAGE} "
                         f"(pip install {BRAIN_EXTRACTION_PACKAGE}), or supply a brain mask")
    import torch
    from deepbet import BrainExtraction
    from deepbet.utils import DATA_PATH

    weights = [Path(DATA_PATH) / "models" / name for name in ("model.pt", "bbox_model.pt")]
    missing = [str(path) for path in weights if not path.is_file()]
    if missing:
        raise InputError(f"{BRAIN_EXTRACTION_PACKAGE}: network weights missing from the installed package "
                         f"({', '.join(missing)}); reinstall it (weights are never downloaded)")
    original = sitk.DICOMOrientImageFilter.GetOrientationFromDirectionCosines(image.GetDirection())
    oriented = sitk.DICOMOrient(sitk.Cast(image, sitk.sitkFloat32), "RAS")
    values = np.ascontiguousarray(sitk.GetArrayFromImage(oriented).transpose(2, 1, 0))
    extractor = BrainExtraction(no_gpu=not torch.cuda.is_available(), model_path=str(weights[0]),
                                bbox_model_path=str(weights[1]))
    try:
        with torch.inference_mode():
            mask = extractor.postprocess(extractor.run_model(values) > 0.5)
    except (AssertionError, ValueError, RuntimeError) as exc:  # e.g. no foreground for its bounding box
        raise InputError(f"brain extraction found no brain ({str(exc).splitlines()[0][:120] or type(exc).__name__}): "
                         "not a brain scan?") from None
    result = sitk.GetImageFromArray(np.ascontiguousarray(mask.transpose(2, 1, 0), dtype=np.uint8))
    result.CopyInformation(oriented)
    result = sitk.DICOMOrient(result, original)
    result.CopyInformation(image)  # same voxels; removes rounding in the recomputed header
    return result


def check_brain_mask(mask: sitk.Image, name: str) -> sitk.Image:
    """A brain mask must be non-empty and of a plausible size; returns it as uint8 0/1."""
    binary = sitk.Cast(mask > 0, sitk.sitkUInt8)
    millilitres = float(sitk.GetArrayFromImage(binary).sum()) * float(np.prod(mask.GetSpacing())) / 1000.0
    if not BRAIN_ML[0] <= millilitres <= BRAIN_ML[1]:
        raise InputError(f"{name}: brain mask of {millilitres:.0f} mL, outside the plausible "
                         f"{BRAIN_ML[0]:.0f}-{BRAIN_ML[1]:.0f} mL: not a brain scan?")
    return binary


MAX_BRAIN_TO_HEAD = 0.90
"""An extracted brain filling more of the head outline than this has no skull and scalp around it."""


def _check_skull_around(brain: sitk.Image, head_scan: sitk.Image, name: str) -> float:
    """The extracted brain's share of the head outline (0.5-0.6 in a head scan). A share near 1 means
    the tool labelled a whole object without skull or scalp around it, which it also does for a
    phantom or a non-brain scan: refused. Returns the share."""
    head = float(sitk.GetArrayFromImage(head_mask(head_scan)).sum())
    share = float(sitk.GetArrayFromImage(brain).sum()) / max(head, 1.0)
    if share > MAX_BRAIN_TO_HEAD:
        raise InputError(f"{name}: the extracted 'brain' fills {share:.0%} of the imaged object, with no skull or "
                         "scalp around it: not a brain scan? (already skull-stripped: use skull_strip='no')")
    return share


# ---------------------------------------------------------------------------------------------- orchestration

Progress = Callable[[str], None]


def prepare_raw(images: dict[str, sitk.Image], options: Optional[RawOptions] = None,
                progress: Optional[Progress] = None, case_id: str = "case") -> RawResult:
    """Four raw series (keys :data:`CONTRASTS`, any grids) -> the four contrasts and a brain mask on
    FLAIR's grid, zero outside the brain, plus a report of each step (see the module doc)."""
    options = options or RawOptions()
    missing = [c for c in CONTRASTS if c not in images]
    if missing:
        raise InputError(f"case {case_id}: missing contrast {', '.join(missing)}")
    for contrast in CONTRASTS:
        check_brain_volume(images[contrast], f"case {case_id} {contrast}")
    steps: list[StepReport] = []

    def announce(text: str) -> None:
        if progress is not None:
            progress(text)

    started = time.perf_counter()
    if options.n4:
        announce("N4 bias-field correction")
        images = {c: n4_correct(images[c]) for c in CONTRASTS}
    else:
        images = {c: sitk.Cast(images[c], sitk.sitkFloat32) for c in CONTRASTS}
    steps.append(StepReport("n4", time.perf_counter() - started, options.n4))

    flair = images["flair"]
    aligned = on_one_grid(images)
    do_register = options.register == "yes" or (options.register == "auto" and not aligned)
    started = time.perf_counter()
    details: dict = {"reason": "inputs share one grid" if aligned else "grids differ"}
    if do_register:
        registered = {"flair": flair}
        for contrast in CONTRASTS[1:]:
            announce(f"registering {contrast} to FLAIR")
            result = register_rigid(flair, images[contrast], f"case {case_id} {contrast}")
            registered[contrast] = resample_onto(images[contrast], flair, result.transform)
            details[contrast] = {"mattes_mi": round(result.metric, 4), "head_overlap": round(result.head_overlap, 3),
                                 "rotation_deg": round(result.rotation_deg, 2),
                                 "translation_mm": round(result.translation_mm, 2), "start": result.start}
        images = registered
    elif not aligned:
        raise InputError(f"case {case_id}: the contrasts lie on different grids and registration is off")
    steps.append(StepReport("register", time.perf_counter() - started, do_register, details))

    started = time.perf_counter()
    stripped = looks_skull_stripped(flair)
    if options.mask is not None:
        from .cases import check_same_grid

        check_same_grid(options.mask, flair, f"case {case_id} mask", f"case {case_id} flair")
        brain = check_brain_mask(options.mask, f"case {case_id} mask")
        details = {"source": "user mask"}
        ran = True
    elif options.skull_strip == "yes" or (options.skull_strip == "auto" and not stripped):
        announce("brain extraction (deepbet)")
        brain = check_brain_mask(extract_brain(flair), f"case {case_id} flair")
        details = {"source": "deepbet on FLAIR", "skull_stripped_input": stripped}
        if not stripped:
            details["brain_to_head"] = round(_check_skull_around(brain, flair, f"case {case_id} flair"), 3)
        ran = True
    else:
        brain = None
        details = {"source": "inputs already skull-stripped" if stripped else "skull stripping off"}
        ran = False
    if brain is not None:
        millilitres = float(sitk.GetArrayFromImage(brain).sum()) * float(np.prod(flair.GetSpacing())) / 1000
        details["brain_ml"] = round(millilitres, 1)
        images = {c: sitk.Mask(images[c], brain) for c in CONTRASTS}
    else:
        brain = sitk.Cast(images["flair"] != 0, sitk.sitkUInt8)
        for contrast in CONTRASTS[1:]:
            brain = brain | sitk.Cast(images[contrast] != 0, sitk.sitkUInt8)
    steps.append(StepReport("brain", time.perf_counter() - started, ran, details))
    return RawResult(images=images, brain_mask=brain, steps=steps)


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} {_fmt(v)}" for k, v in value.items()) + "}"
    return str(value)


# ---------------------------------------------------------------------------------------------- cross-checks

@dataclass
class Mapping:
    """A transform from a head scan's physical space into a skull-stripped scan's, and its fit."""

    transform: sitk.Transform
    details: dict


def map_skull_stripped(head: sitk.Image, stripped: sitk.Image, stripped_brain: sitk.Image,
                       affine: bool = True) -> Mapping:
    """Register a skull-stripped scan (e.g. an atlas-space BraTS volume) onto a head scan of the same
    patient and contrast: Mattes MI counted only where ``head`` maps into ``stripped_brain`` (so the
    skull cannot pull), rigid from the centres of mass, then affine from the rigid result. The affine
    result is kept when its metric is lower. ``transform`` maps head points into the stripped scan,
    so ``resample_mask(stripped_brain, head, transform)`` carries its brain onto the head grid.
    ``affine=False`` stops after the rigid step."""
    fixed = sitk.Cast(head, sitk.sitkFloat32)
    moving = sitk.Cast(stripped, sitk.sitkFloat32)
    details: dict = {}
    rigid = sitk.Euler3DTransform(sitk.CenteredTransformInitializer(
        fixed, moving, sitk.Euler3DTransform(), sitk.CenteredTransformInitializerFilter.MOMENTS))
    general = None
    best, best_metric = None, np.inf
    for kind in ("rigid", "affine") if affine else ("rigid",):
        transform = rigid if kind == "rigid" else general
        method = _registration_method(7, None)
        method.SetMetricMovingMask(sitk.Cast(stripped_brain > 0, sitk.sitkUInt8))
        method.SetInitialTransform(transform, inPlace=True)
        with _reproducible_threads():
            method.Execute(fixed, moving)
        metric = float(method.GetMetricValue())
        details[f"{kind}_mattes_mi"] = round(metric, 4)
        if kind == "rigid":
            general = sitk.AffineTransform(3)
            general.SetCenter(rigid.GetCenter())
            general.SetMatrix(rigid.GetMatrix())
            general.SetTranslation(rigid.GetTranslation())
        if metric < best_metric:
            best, best_metric = (kind, transform), metric
    details["kept"] = best[0]
    if best[0] == "affine":
        details["affine_scales"] = [round(float(v), 3) for v in np.linalg.svd(
            np.asarray(general.GetMatrix()).reshape(3, 3), compute_uv=False)]
    return Mapping(best[1], details)


def resample_mask(mask: sitk.Image, reference: sitk.Image, transform: sitk.Transform) -> sitk.Image:
    """A binary mask carried onto ``reference``'s grid: linear interpolation of the 0/1 mask, > 0.5,
    so a thick slice is brain where most of it is."""
    floats = sitk.Cast(mask > 0, sitk.sitkFloat32)
    resampled = sitk.Resample(floats, reference, transform, sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    return sitk.Cast(resampled > 0.5, sitk.sitkUInt8)


# ---------------------------------------------------------------------------------------------- files

def discover_raw_cases(folder: PathLike) -> list:
    """Raw cases of ``folder`` named by series (see :func:`find_series`): the folder itself when it
    holds the four series, else each subfolder that does (a subfolder that holds some but not all
    is a case with a ``problem``). Returns :class:`~ADMAnomalyLib.cases.CaseFiles`."""
    from .cases import CaseFiles

    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"{folder}: folder not found" if not folder.exists() else f"{folder}: not a folder")

    def case_of(candidate: Path):
        try:
            return CaseFiles(candidate.name, find_series(candidate))
        except InputError as exc:
            return CaseFiles(candidate.name, {}, problem=str(exc))

    itself = case_of(folder)
    if itself.problem is None:
        return [itself]
    cases = []
    for sub in sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")):
        if any(series_contrast(p.name) for p in sub.iterdir() if not p.name.startswith(".")):
            cases.append(case_of(sub))
    if not cases:
        raise InputError(f"{folder}: no raw case found (expected series named FLAIR, T1, T1 post/Gd, T2: "
                         "image files or DICOM folders)")
    return cases


def load_raw_case(files, options: RawOptions, tolerance: float = 1e-4,
                  progress: Optional[Progress] = None) -> tuple:
    """Read a case's series (files or DICOM folders; its ``mask`` file, if any, is the user's brain
    mask on the FLAIR grid), run :func:`prepare_raw` and return ``(CaseImages, RawResult)``."""
    from .cases import case_from_images

    images = {c: read_series(files.contrasts[c]) for c in CONTRASTS}
    if files.mask is not None and options.mask is None:
        options = RawOptions(**{**options.__dict__, "mask": read_image(files.mask)})
    raw = prepare_raw(images, options, progress, files.case_id)
    case = case_from_images(raw.images, mask=raw.brain_mask, case_id=files.case_id, tolerance=tolerance)
    return case, raw


def preprocessed_folder(output_dir: PathLike, case_id: str) -> Path:
    """Where :func:`write_preprocessed` puts a case: ``<output>/<case>_preprocessed/``."""
    return Path(output_dir) / f"{case_id}_preprocessed"


def write_preprocessed(raw: RawResult, output_dir: PathLike, case_id: str) -> Path:
    """Write the registered, brain-extracted contrasts and the brain mask as a case the engine reads
    back as it is (``<case>_flair.nii.gz`` ... ``<case>_mask.nii.gz``), plus the step report as
    ``<case>_preprocessing.json``; every file atomically. Returns the folder."""
    import json

    from .io import write_image_atomic, write_text_atomic

    folder = preprocessed_folder(output_dir, case_id)
    for contrast, suffix in zip(CONTRASTS, ("flair", "t1", "t1ce", "t2")):
        write_image_atomic(raw.images[contrast], folder / f"{case_id}_{suffix}.nii.gz")
    write_image_atomic(raw.brain_mask, folder / f"{case_id}_mask.nii.gz")
    write_text_atomic(json.dumps(raw.as_dict(), indent=2, default=float), folder / f"{case_id}_preprocessing.json")
    return folder
