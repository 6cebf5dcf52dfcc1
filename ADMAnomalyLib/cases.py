"""Finding the files of 4-contrast cases on disk and loading them onto one validated grid.

Recognised layouts (``find_cases``):

* a folder of case subfolders, a folder that is itself one case, or flat files of several cases;
* ``<case>_<contrast>`` or ``<case>-<contrast>`` with the usual spellings of each contrast
  (:data:`~ADMAnomalyLib.config.CONTRAST_NAMES`, case-insensitive): BraTS 2018/19 ``_flair``,
  ``_t1``, ``_t1ce``, ``_t2``, BraTS 2023 ``-t2f``, ``-t1n``, ``-t1c``, ``-t2w``, and ``t1gd``,
  ``t1post``, ``t2w`` ...; ``_seg``/``_label`` is the reference label, ``_mask`` a brain mask;
* any other naming through an explicit per-contrast glob mapping applied inside each case folder,
  e.g. :data:`OPEN_MS_PATTERN`.

Image files end in ``.nii.gz``, ``.nii``, ``.nrrd`` or ``.mha``. Hidden files are ignored.
"""

from __future__ import annotations

import fnmatch
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Union

import SimpleITK as sitk

from .config import CONTRAST_NAMES, CONTRASTS
from .errors import GridMismatchError, InputError
from .io import check_volume, read_image

PathLike = Union[str, Path]

ROLES: tuple[str, ...] = CONTRASTS + ("label", "mask")
"""Keys a ``pattern`` mapping may use: the four contrasts plus the optional label and brain mask."""

OPEN_MS_PATTERN: dict[str, str] = {
    "flair": "FLAIR_*",
    "t1": "T1_*",
    "t1c": "T1POST_*",
    "t2": "T2_*",
    "label": "GOLD_STANDARD_*",
}
"""Glob mapping for the open_ms_data layout (``FLAIR_*``, ``T1_*``, ``T1POST_*`` ... per case)."""

_EXT = r"\.(?:nii\.gz|nii|nrrd|mha)"
_NAME_ALIASES: dict[str, tuple[str, ...]] = {
    **CONTRAST_NAMES,
    "label": ("seg", "label", "labels"),
    "mask": ("mask", "brainmask", "brain_mask"),
}
_ROLE_OF = {alias.lower(): role for role, aliases in _NAME_ALIASES.items() for alias in aliases}
# "<case>_<name>.<ext>" or "<case>-<name>.<ext>": the name must be followed directly by the extension,
# so "_t1" never matches "_t1ce"; the case id is the shortest prefix, so "x_t2_flair" is FLAIR of "x".
_BY_NAME = re.compile(
    rf"^(?P<case>.+?)[_-](?P<key>{'|'.join(sorted(map(re.escape, _ROLE_OF), key=len, reverse=True))}){_EXT}$",
    re.IGNORECASE,
)
ORIGIN_TOLERANCE_VOXELS = 0.01
"""Origins of one case's volumes may differ by this fraction of the voxel size: series exported by
other tools round the origin (0.001 mm seen), while a real misregistration is far larger."""


@dataclass
class CaseFiles:
    """Paths of one case. ``contrasts`` has exactly the keys of :data:`CONTRASTS`, in that order."""

    case_id: str
    contrasts: dict[str, Path]
    label: Optional[Path] = None
    mask: Optional[Path] = None
    problem: Optional[str] = None
    """Why this case cannot be used (a contrast missing, two files for one role), as found by
    :func:`discover_cases`; then ``contrasts`` holds what was found."""


@dataclass
class CaseImages:
    """One case in memory: float32 contrasts on one grid, plus optional label and brain mask.

    ``label`` and ``mask`` keep their stored pixel type (any non-zero label voxel is a lesion,
    any mask voxel > 0 is brain). ``sources`` names where each volume came from, for messages.
    """

    case_id: str
    images: dict[str, sitk.Image]
    label: Optional[sitk.Image] = None
    mask: Optional[sitk.Image] = None
    sources: dict[str, str] = field(default_factory=dict, repr=False)


def find_cases(folder: PathLike, pattern: Optional[dict[str, str]] = None) -> list[CaseFiles]:
    """Every case of ``folder``, all usable: the first case with a problem is an :class:`InputError`.
    For training and evaluation, which need every case; folder prediction uses
    :func:`discover_cases` and reports broken cases one by one."""
    cases = discover_cases(folder, pattern)
    for case in cases:
        if case.problem is not None:
            raise InputError(case.problem)
    return cases


def discover_cases(folder: PathLike, pattern: Optional[dict[str, str]] = None) -> list[CaseFiles]:
    """Find every case in ``folder`` (itself a case, a folder of case folders, or flat files),
    including broken ones, whose ``problem`` says what is wrong (a missing contrast, two files for
    one role).

    Without ``pattern`` the names of :data:`_NAME_ALIASES` are recognised; with ``pattern`` (role ->
    glob, roles from :data:`ROLES`, the four contrasts required) the globs are applied inside
    ``folder`` and each of its subfolders, and the folder name is the case id.
    Cases are sorted by id. A folder without any case, or a malformed pattern, is an
    :class:`InputError`.
    """
    folder = Path(folder)
    if not folder.is_dir():
        what = "folder not found" if not folder.exists() else "not a folder"
        raise InputError(f"{folder}: {what}")
    cases = _find_by_pattern(folder, pattern) if pattern is not None else _find_by_name(folder)
    if not cases:
        how = (
            f"no files match the pattern {pattern}"
            if pattern is not None
            else "no case found (expected names such as <case>_flair.nii.gz, <case>_t1c.nii.gz or "
            "<case>-t2f.nii.gz, or pass a pattern)"
        )
        raise InputError(f"{folder}: {how}")
    return sorted(cases, key=lambda case: case.case_id)


def _candidate_folders(folder: Path) -> list[Path]:
    subfolders = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    return [folder] + subfolders


def _visible_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))


def _find_by_name(folder: Path) -> list[CaseFiles]:
    found: dict[str, dict[str, list[Path]]] = defaultdict(lambda: defaultdict(list))
    for candidate in _candidate_folders(folder):
        for path in _visible_files(candidate):
            match = _BY_NAME.match(path.name)
            if match:
                found[match["case"]][_ROLE_OF[match["key"].lower()]].append(path)
    # A group with only a _seg/_mask file is not a case (e.g. a stray result file); ignore it.
    return [
        _assemble(case_id, roles)
        for case_id, roles in found.items()
        if any(roles.get(c) for c in CONTRASTS)
    ]


def _find_by_pattern(folder: Path, pattern: dict[str, str]) -> list[CaseFiles]:
    unknown = set(pattern) - set(ROLES)
    if unknown:
        raise InputError(
            f"pattern: unknown key(s) {', '.join(sorted(unknown))}; use {', '.join(ROLES)}"
        )
    missing = [c for c in CONTRASTS if not pattern.get(c)]
    if missing:
        raise InputError(f"pattern: no glob for contrast(s) {', '.join(missing)}")
    cases = []
    for candidate in _candidate_folders(folder):
        files = _visible_files(candidate)
        roles = {
            role: [p for p in files if fnmatch.fnmatchcase(p.name, glob)] for role, glob in pattern.items() if glob
        }
        # A folder is a case when any contrast glob matches; the others must then match too.
        if any(roles[c] for c in CONTRASTS):
            cases.append(_assemble(candidate.name, roles))
    return cases


def _assemble(case_id: str, roles: dict[str, list[Path]]) -> CaseFiles:
    """Build one CaseFiles; a missing contrast or two files for one role become its ``problem``."""
    problems = []
    for role, paths in roles.items():
        if len(paths) > 1:
            names = " and ".join(str(p) for p in sorted(paths))
            problems.append(f"two files for {role}: {names}")
    missing = [c for c in CONTRASTS if not roles.get(c)]
    if missing:
        problems.append(f"missing contrast {', '.join(missing)}")

    def single(role: str) -> Optional[Path]:
        paths = roles.get(role)
        return sorted(paths)[0] if paths else None

    return CaseFiles(
        case_id=case_id,
        contrasts={c: single(c) for c in CONTRASTS if roles.get(c)},
        label=single("label"),
        mask=single("mask"),
        problem=f"case {case_id}: {'; '.join(problems)}" if problems else None,
    )


def load_case(files: CaseFiles, tolerance: float = 1e-4) -> CaseImages:
    """Read and validate the volumes of ``files``; see :func:`case_from_images`."""
    if files.problem is not None:
        raise InputError(files.problem)
    images = {c: read_image(files.contrasts[c]) for c in CONTRASTS}
    label = read_image(files.label) if files.label is not None else None
    mask = read_image(files.mask) if files.mask is not None else None
    sources = {c: str(files.contrasts[c]) for c in CONTRASTS}
    if files.label is not None:
        sources["label"] = str(files.label)
    if files.mask is not None:
        sources["mask"] = str(files.mask)
    return _build_case(files.case_id, images, label, mask, sources, tolerance)


def case_from_images(
    images: dict[str, sitk.Image],
    label: Optional[sitk.Image] = None,
    mask: Optional[sitk.Image] = None,
    case_id: str = "case",
    tolerance: float = 1e-4,
) -> CaseImages:
    """Validate in-memory volumes (keys exactly :data:`CONTRASTS`) and cast contrasts to float32.

    Every volume must be a finite 3-D scalar image, and all of them (label and mask included)
    must share the grid of ``flair``: identical size; spacing equal within ``tolerance``
    (relative), origin within ``tolerance`` voxels, direction cosines within ``tolerance``.
    """
    missing = [c for c in CONTRASTS if c not in images]
    if missing:
        raise InputError(f"case {case_id}: missing contrast {', '.join(missing)}")
    extra = sorted(set(images) - set(CONTRASTS))
    if extra:
        raise InputError(
            f"case {case_id}: unknown contrast key(s) {', '.join(extra)}; use {', '.join(CONTRASTS)}"
        )
    sources = {c: f"case {case_id} {c}" for c in CONTRASTS}
    sources["label"] = f"case {case_id} label"
    sources["mask"] = f"case {case_id} mask"
    for role, image in [*images.items(), ("label", label), ("mask", mask)]:
        if image is not None:
            check_volume(image, sources[role])
    return _build_case(case_id, dict(images), label, mask, sources, tolerance)


def _build_case(
    case_id: str,
    images: dict[str, sitk.Image],
    label: Optional[sitk.Image],
    mask: Optional[sitk.Image],
    sources: dict[str, str],
    tolerance: float,
) -> CaseImages:
    reference = images[CONTRASTS[0]]
    others = [(c, images[c]) for c in CONTRASTS[1:]] + [("label", label), ("mask", mask)]
    for role, image in others:
        if image is not None:
            check_same_grid(image, reference, sources[role], sources[CONTRASTS[0]], tolerance)
    floats = {
        c: images[c] if images[c].GetPixelID() == sitk.sitkFloat32 else sitk.Cast(images[c], sitk.sitkFloat32)
        for c in CONTRASTS
    }
    used_sources = {k: v for k, v in sources.items() if k in CONTRASTS}
    if label is not None:
        used_sources["label"] = sources["label"]
    if mask is not None:
        used_sources["mask"] = sources["mask"]
    return CaseImages(case_id=case_id, images=floats, label=label, mask=mask, sources=used_sources)


def check_same_grid(
    image: sitk.Image, reference: sitk.Image, name: str, reference_name: str, tolerance: float = 1e-4
) -> None:
    """Raise :class:`GridMismatchError` unless ``image`` lies on the grid of ``reference``.

    Size must be identical; spacing is compared relatively, origin in units of the reference voxel
    size (within :data:`ORIGIN_TOLERANCE_VOXELS`, as ITK compares coordinates relative to the
    spacing, so the test does not depend on where the scanner put 0), direction absolutely.
    """
    size, ref_size = image.GetSize(), reference.GetSize()
    if size != ref_size:
        raise GridMismatchError(f"{name}: size {size} differs from {reference_name} {ref_size}")
    spacing, ref_spacing = image.GetSpacing(), reference.GetSpacing()
    if any(abs(a - b) > tolerance * max(abs(a), abs(b)) for a, b in zip(spacing, ref_spacing)):
        raise GridMismatchError(
            f"{name}: spacing {_fmt(spacing)} differs from {reference_name} {_fmt(ref_spacing)}"
        )
    origin, ref_origin = image.GetOrigin(), reference.GetOrigin()
    voxel = min(ref_spacing)
    if any(abs(a - b) > max(tolerance, ORIGIN_TOLERANCE_VOXELS) * voxel for a, b in zip(origin, ref_origin)):
        raise GridMismatchError(
            f"{name}: origin {_fmt(origin)} differs from {reference_name} {_fmt(ref_origin)}"
        )
    direction, ref_direction = image.GetDirection(), reference.GetDirection()
    if any(abs(a - b) > tolerance for a, b in zip(direction, ref_direction)):
        raise GridMismatchError(
            f"{name}: direction {_fmt(direction)} differs from {reference_name} {_fmt(ref_direction)}"
        )


def _fmt(values: tuple[float, ...]) -> str:
    return "(" + ", ".join(f"{v:.6g}" for v in values) + ")"
