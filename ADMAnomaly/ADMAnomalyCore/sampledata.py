"""The bundled demo case as a source of Slicer's SampleData module.

``ADMAnomaly.py`` registers :func:`sample_data_sources` with
``SampleData.SampleDataLogic.registerCustomSampleDataSource`` once Slicer has started, so the case
is one click away in the SampleData module (category "ADMAnomaly"). The files are the extension's
own (``Resources/DemoData/patient26``, CC-BY, see its ATTRIBUTION.md), given as ``file:`` URIs:
nothing is downloaded; SampleData copies them into its cache and checks them by their SHA256.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from .engine import engine_parent_dir, module_dir

SAMPLE_CATEGORY = "ADMAnomaly"
SAMPLE_NAME = "ADMAnomalyDemoMS"
"""Name of the demo case in the SampleData module (``SampleData.downloadSamples(SAMPLE_NAME)``)."""
DEMO_CASE = "patient26"
DEMO_FILES = (
    ("flair", "VolumeFile"),
    ("t1", "VolumeFile"),
    ("t1ce", "VolumeFile"),
    ("t2", "VolumeFile"),
    ("seg", "SegmentationFile"),
)
"""File suffix of each file of the case and how Slicer loads it; the reference lesions (``seg``)
become a segmentation, so they show as an outline beside the module's "Anomaly"."""
THUMBNAIL = "ADMAnomalyDemoCase.png"
"""In the module's ``Resources/Icons`` (made by ``tools/make_sample_data_thumbnail.py``)."""


def demo_case_dir() -> Path:
    """``Resources/DemoData/patient26`` beside the engine package: the repository root in a checkout,
    ``qt-scripted-modules`` in an installed extension (as ``ADMAnomalyLib.demo.demo_case_dir``)."""
    parent = engine_parent_dir()
    return (parent if parent is not None else module_dir().parent) / "Resources" / "DemoData" / DEMO_CASE


def demo_case_files() -> dict[str, Path]:
    """The demo case's files by suffix (``flair`` ... ``seg``)."""
    folder = demo_case_dir()
    return {suffix: folder / f"{DEMO_CASE}_{suffix}.nii.gz" for suffix, _ in DEMO_FILES}


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def sample_data_sources() -> list[dict[str, Any]]:
    """Keyword arguments of ``SampleDataLogic.registerCustomSampleDataSource`` for each sample
    (``loadFileType`` is the spelling every Slicer 5 accepts). Empty when the demo files are not
    installed, so a build without them registers nothing rather than a broken entry."""
    files = demo_case_files()
    if not all(path.is_file() for path in files.values()):
        return []
    return [{
        "category": SAMPLE_CATEGORY,
        "sampleName": SAMPLE_NAME,
        "thumbnailFileName": str(module_dir() / "Resources" / "Icons" / THUMBNAIL),
        "uris": [files[suffix].resolve().as_uri() for suffix, _ in DEMO_FILES],
        # Cache file names: prefixed, so that another extension's "patient26_flair.nii.gz" is never taken for ours.
        "fileNames": [f"ADMAnomaly-{files[suffix].name}" for suffix, _ in DEMO_FILES],
        "nodeNames": [f"{DEMO_CASE}_{suffix}" for suffix, _ in DEMO_FILES],
        "checksums": [f"SHA256:{_sha256(files[suffix])}" for suffix, _ in DEMO_FILES],
        "loadFileType": [kind for _, kind in DEMO_FILES],
    }]
