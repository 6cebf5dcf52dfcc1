#!/usr/bin/env python
"""Build the bundled demo case ``Resources/DemoData/patient26`` from the CC-BY open_ms_data case.

What it does (and records in ATTRIBUTION.md beside the files):

* crops all five volumes to the brain bounding box plus a small margin, with SimpleITK slicing so
  spacing and direction are kept and the origin moves to the first kept voxel;
* stores each contrast as int16 after a per-contrast linear rescale (max |value| -> ``--levels``),
  rounded, so residue with |scaled value| < 0.5 becomes exactly 0; the lesion mask as uint8;
* renames the files to BraTS-2018 style (``patient26_flair`` ... ``_seg``) so ``find_cases``
  recognises the folder without a pattern; copies the licence.

Usage: ``python tools/make_demo_case.py [--source DIR] [--out DIR] [--margin 3] [--levels 1000]``
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import numpy as np
import SimpleITK as sitk

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from ADMAnomalyLib.cases import OPEN_MS_PATTERN, find_cases, load_case  # noqa: E402
from ADMAnomalyLib.config import CONTRASTS  # noqa: E402
from ADMAnomalyLib.io import write_image_atomic, write_text_atomic  # noqa: E402

CASE_ID = "patient26"
OUT_SUFFIX = {"flair": "flair", "t1": "t1", "t1c": "t1ce", "t2": "t2", "label": "seg"}
SHARED_README = "README.md"  # of the shared ms folder: holds the source and citation

ATTRIBUTION = """# Demo case `patient26` — attribution and changes

The five files in this folder are derived from case **patient26** of the public
*open_ms_data* collection (`cross_sectional/MNI/patient26`): FLAIR, T1, T1 with gadolinium
(T1POST, here `t1ce`), T2 and the consensus white-matter lesion mask (GOLD_STANDARD, here `seg`)
of one relapsing-remitting multiple-sclerosis patient, 1 mm MNI space, skull-stripped,
co-registered, N4 bias-corrected and intensity-winsorised by the data providers.

Licence: Creative Commons Attribution (CC-BY), see `LICENSE.txt` in this folder.
Source: http://lit.fe.uni-lj.si/tools.php?lang=eng (via the open_ms_data collection).

Please cite when you use this case:

> Ž. Lesjak, F. Pernuš, B. Likar, Ž. Špiclin, "A Novel Public MR Image Dataset of Multiple
> Sclerosis Patients With Lesion Segmentations Based on Multi-rater Consensus",
> Neuroinformatics (2017), doi:10.1007/s12021-017-9348-7.

## Changes made (by `tools/make_demo_case.py` of ADMAnomaly)

1. **Cropping** to the bounding box of the brain (voxels non-zero in any contrast) plus a margin of
   {margin} voxels: kept index range (x, y, z) = {start} .. {stop} (exclusive) of the original
   {orig_size} grid, now {size} voxels. Spacing and direction are unchanged; the origin is the
   physical position of the first kept voxel, so every voxel keeps its world position.
2. **Rescaling and type conversion** of each contrast from float32 to int16:
   `stored = round(original * scale)`, i.e. `original ≈ stored / scale`, with
{scales}
   Values with |original * scale| < 0.5 (tiny interpolation residue) therefore became 0.
   The lesion mask was converted to uint8 (0/1), otherwise unchanged.
3. **Renaming** to BraTS-2018 style names:
{renames}
"""


def brain_bbox(arrays: list[np.ndarray], margin: int) -> tuple[list[int], list[int]]:
    """Start and stop index (SimpleITK x, y, z order) of the non-zero region plus ``margin``."""
    nonzero = np.zeros(arrays[0].shape, dtype=bool)
    for values in arrays:
        nonzero |= values != 0
    idx = np.argwhere(nonzero)  # numpy (z, y, x)
    lo = np.maximum(idx.min(axis=0) - margin, 0)
    hi = np.minimum(idx.max(axis=0) + 1 + margin, nonzero.shape)
    return [int(v) for v in lo[::-1]], [int(v) for v in hi[::-1]]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", type=Path, default=REPO.parent / "shared/data/ms/patient26")
    parser.add_argument("--out", type=Path, default=REPO / "Resources/DemoData/patient26")
    parser.add_argument("--margin", type=int, default=3)
    parser.add_argument("--levels", type=float, default=1000.0, help="max |value| after rescale")
    args = parser.parse_args(argv)

    files = find_cases(args.source, OPEN_MS_PATTERN)[0]
    case = load_case(files)
    arrays = [sitk.GetArrayViewFromImage(case.images[c]) for c in CONTRASTS]
    start, stop = brain_bbox(arrays, args.margin)
    crop = tuple(slice(a, b) for a, b in zip(start, stop))

    args.out.mkdir(parents=True, exist_ok=True)
    scales, renames = [], []
    for contrast in CONTRASTS:
        cropped = case.images[contrast][crop]  # SimpleITK slicing shifts the origin exactly
        values = sitk.GetArrayFromImage(cropped).astype(np.float64)
        scale = args.levels / float(np.abs(values).max())
        stored = sitk.GetImageFromArray(np.rint(values * scale).astype(np.int16))
        stored.CopyInformation(cropped)
        name = f"{CASE_ID}_{OUT_SUFFIX[contrast]}.nii.gz"
        write_image_atomic(stored, args.out / name)
        scales.append(f"   - `{name}`: scale = {scale:.6g}")
        renames.append(f"   - `{files.contrasts[contrast].name}` -> `{name}`")
    label = sitk.Cast(case.label[crop] != 0, sitk.sitkUInt8)
    name = f"{CASE_ID}_{OUT_SUFFIX['label']}.nii.gz"
    write_image_atomic(label, args.out / name)
    renames.append(f"   - `{files.label.name}` -> `{name}`")

    licence = args.source.parent / "LICENSE.txt"
    if not licence.is_file():
        licence = args.source / "LICENSE.txt"
    shutil.copyfile(licence, args.out / "LICENSE.txt")
    text = ATTRIBUTION.format(
        margin=args.margin,
        start=tuple(start),
        stop=tuple(stop),
        orig_size=case.images["flair"].GetSize(),
        size=label.GetSize(),
        scales="\n".join(scales),
        renames="\n".join(renames),
    )
    write_text_atomic(text, args.out / "ATTRIBUTION.md")

    # Check the result reads back as one BraTS-named case on one grid with the lesion intact.
    check = load_case(find_cases(args.out)[0])
    n_lesion = int(sitk.GetArrayViewFromImage(check.label).sum())
    n_source = int((sitk.GetArrayViewFromImage(case.label) != 0).sum())
    if n_lesion != n_source:
        raise SystemExit(f"lesion voxels lost in cropping: {n_lesion} of {n_source}")
    total = sum(p.stat().st_size for p in args.out.iterdir())
    print(f"wrote {args.out}: size {label.GetSize()}, {n_lesion} lesion voxels, {total / 1e6:.2f} MB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
