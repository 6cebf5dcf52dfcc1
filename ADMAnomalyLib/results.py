"""A results folder of ``predict``: each case's outputs, what they were made with, and ``cases.csv``.

``cases.csv`` has one row per case (:class:`CaseRecord`): its status, the model and threshold its
outputs were made with, the anomaly's size and components and, when the case has a reference label,
Dice and AUPRC. ``predict`` (CLI and API) writes it after every case, the Slicer module reads and
writes the same file, and a folder run trusts existing outputs only through it: outputs made by
another model are recomputed, and outputs made at another threshold are re-thresholded from the
stored energy without running the networks.

Energy maps keep the background exactly 1 below the lowest brain energy (see
:func:`ADMAnomalyLib.preprocess.slices_to_image`), so the brain mask is recovered from the energy
file itself.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import json
import logging
import math
import time
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional

import numpy as np
import SimpleITK as sitk

from .errors import InputError
from .io import PathLike, read_image, write_image_atomic, write_text_atomic
from .postprocess import anomaly_label, component_voxels, region_sizes

log = logging.getLogger(__name__)

CASES_CSV = "cases.csv"
ERRORS_LOG = "errors.log"
LOCK_FILE = ".cases.lock"
STATUS_DONE = "done"
STATUS_FAILED = "failed"
STATUS_NOT_RUN = "not run"


def output_paths(output_dir: PathLike, case_id: str) -> tuple[Path, Path]:
    """Where a case's energy map and anomaly map live in a results folder."""
    output_dir = Path(output_dir)
    return output_dir / f"{case_id}_energy.nii.gz", output_dir / f"{case_id}_anomaly.nii.gz"


@dataclass
class CaseRecord:
    """One row of ``cases.csv``."""

    case_id: str
    status: str = STATUS_NOT_RUN
    """``done``, ``failed`` or ``not run``."""
    reason: str = ""
    """Why the case failed (one line)."""
    model: str = ""
    """Identity of the model the outputs were made with (:func:`model_identity`)."""
    threshold: Optional[float] = None
    """Energy threshold of the anomaly map."""
    anomaly_ml: Optional[float] = None
    components: Optional[int] = None
    """Connected components of the anomaly map (26-connectivity)."""
    largest_component_ml: Optional[float] = None
    dice: Optional[float] = None
    """Dice of the anomaly map against the case's reference label (empty without one)."""
    auprc: Optional[float] = None
    """Pixel AUPRC of the energy inside the brain against the reference label."""
    reference: str = ""
    """Path of the reference label the figures were computed with (empty without one)."""
    updated: str = ""
    """When the row was last written (local time, ISO 8601)."""

    @property
    def done(self) -> bool:
        return self.status == STATUS_DONE


_COLUMNS = tuple(f.name for f in fields(CaseRecord))
_FLOATS = {"threshold", "anomaly_ml", "largest_component_ml", "dice", "auprc"}
_INTS = {"components"}


def model_identity(model: Any) -> str:
    """``<file name>@<sha256 prefix>`` of a model's file (``unsaved`` for a model without one): two
    outputs made by the same file have the same identity wherever the file was moved."""
    path = getattr(model, "path", None)
    if path is None:
        return "unsaved"
    digest = hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]
    return f"{Path(path).name}@{digest}"


def read_table(output_dir: PathLike) -> dict[str, CaseRecord]:
    """The rows of ``output_dir/cases.csv`` by case id (empty when there is no such file).

    An unreadable or foreign table is an :class:`InputError`: its cases would otherwise be
    recomputed or trusted on a guess."""
    path = Path(output_dir) / CASES_CSV
    if not path.exists():
        return {}
    try:
        text = path.read_text(encoding="utf-8")
        rows = list(csv.DictReader(io.StringIO(text)))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise InputError(f"{path}: cannot read the case table ({exc})") from None
    records = {}
    for number, row in enumerate(rows, start=2):
        if None in row or not row.get("case_id"):
            raise InputError(f"{path}: line {number} is not a row of an ADMAnomaly case table")
        try:
            values = {name: _parse(name, row.get(name, "")) for name in _COLUMNS}
        except ValueError as exc:
            raise InputError(f"{path}: line {number}: {exc}") from None
        records[values["case_id"]] = CaseRecord(**values)
    return records


def write_table(output_dir: PathLike, records: Iterable[CaseRecord]) -> Path:
    """Write ``cases.csv`` atomically, one row per record, sorted by case id."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for record in sorted(records, key=lambda r: r.case_id):
        writer.writerow({name: _format(getattr(record, name)) for name in _COLUMNS})
    return write_text_atomic(buffer.getvalue(), Path(output_dir) / CASES_CSV)


def update_table(output_dir: PathLike, *records: CaseRecord) -> dict[str, CaseRecord]:
    """Replace (or add) the rows of ``records`` in ``cases.csv``; returns the whole table. Jobs that
    share a results folder (shards, the Slicer panel) take turns through a lock file."""
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S")
    with _table_lock(output_dir):
        table = read_table(output_dir)
        for record in records:
            record.updated = record.updated or stamp
            table[record.case_id] = record
        write_table(output_dir, table.values())
    return table


def write_error_log(output_dir: PathLike) -> Optional[Path]:
    """``errors.log`` (``case<TAB>reason`` per failed case of ``cases.csv``), or no such file when
    no case failed: a log left from an earlier run must not outlive the failures it listed."""
    path = Path(output_dir) / ERRORS_LOG
    with _table_lock(output_dir):
        failed = [r for r in sorted(read_table(output_dir).values(), key=lambda r: r.case_id)
                  if r.status == STATUS_FAILED]
        if failed:
            return write_text_atomic("".join(f"{r.case_id}\t{r.reason}\n" for r in failed), path)
        path.unlink(missing_ok=True)
    return None


@contextlib.contextmanager
def _table_lock(output_dir: PathLike) -> Iterator[None]:
    try:
        import fcntl
    except ImportError:  # Windows: one job per results folder
        yield
        return
    with open(Path(output_dir) / LOCK_FILE, "ab") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _parse(name: str, text: str) -> Any:
    if name in _FLOATS:
        return float(text) if text != "" else None
    if name in _INTS:
        return int(text) if text != "" else None
    return text


def _format(value: Any) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return ""
    if isinstance(value, float):
        return repr(value) if not value.is_integer() else f"{value:.1f}"
    return str(value)


# -- figures of one case ---------------------------------------------------------------------------
def brain_of_energy(energy: np.ndarray) -> np.ndarray:
    """Brain mask of an energy array written by the engine: everything above its background, which
    lies exactly 1 below the lowest brain energy. A map without such a gap is all brain."""
    energy = np.asarray(energy)
    background = energy.min()
    above = energy > background
    if above.any() and float(energy[above].min()) >= float(background) + 0.999:
        return above
    return np.ones(energy.shape, dtype=bool)


def anomaly_from_energy(energy_image: sitk.Image, threshold: float, min_component_mm3: float = 0.0) -> sitk.Image:
    """uint8 anomaly map of a stored energy image: energy >= threshold inside the brain, without the regions
    smaller than ``min_component_mm3`` (the label ``predict`` writes, :func:`~.postprocess.anomaly_label`)."""
    energy = sitk.GetArrayViewFromImage(energy_image)
    label = anomaly_label(energy, brain_of_energy(energy), threshold,
                          component_voxels(min_component_mm3, energy_image.GetSpacing()))
    mask = sitk.GetImageFromArray(label.astype(np.uint8))
    mask.CopyInformation(energy_image)
    return mask


def case_figures(
    energy_image: sitk.Image, anomaly_image: sitk.Image, label: Optional[sitk.Image] = None,
    brain: Optional[np.ndarray] = None,
) -> dict[str, Any]:
    """Anomaly volume, components and largest component (mL); with ``label``, Dice of the anomaly map
    and pixel AUPRC of the energy inside ``brain`` (default: recovered from the energy)."""
    from .metrics import detection_metrics, threshold_metrics

    voxel_ml = float(np.prod(anomaly_image.GetSpacing())) / 1000.0
    anomaly = sitk.GetArrayViewFromImage(anomaly_image) > 0
    figures: dict[str, Any] = {"anomaly_ml": float(anomaly.sum()) * voxel_ml, "components": 0,
                               "largest_component_ml": 0.0, "dice": None, "auprc": None}
    sizes = region_sizes(anomaly)
    if sizes.size:
        figures["components"] = int((sizes > 0).sum())
        figures["largest_component_ml"] = float(sizes.max()) * voxel_ml
    if label is not None:
        energy = sitk.GetArrayViewFromImage(energy_image)
        inside = brain_of_energy(energy) if brain is None else np.asarray(brain, dtype=bool)
        lesion = sitk.GetArrayViewFromImage(label) != 0
        figures["auprc"] = detection_metrics(energy, lesion, inside).auprc
        threshold_view = threshold_metrics(anomaly.astype(np.float32), lesion, 0.5, inside)
        figures["dice"] = threshold_view.dice
    return figures


def read_reference(path: PathLike | None, like: sitk.Image) -> Optional[sitk.Image]:
    """A case's reference label for the figures, or None (with a warning) when it is missing,
    unreadable or on another grid: figures are a bonus and never fail a case."""
    if not path:
        return None
    try:
        label = read_image(path)
    except InputError as exc:
        log.warning("no Dice/AUPRC: %s", exc)
        return None
    if label.GetSize() != like.GetSize():
        log.warning("no Dice/AUPRC: %s: size %s differs from the energy map %s", path, label.GetSize(), like.GetSize())
        return None
    return label


# -- re-thresholding -------------------------------------------------------------------------------
def rethreshold_case(output_dir: PathLike, record: CaseRecord, threshold: float,
                     min_component_mm3: float = 0.0) -> CaseRecord:
    """Rewrite a done case's anomaly map at ``threshold`` (regions under ``min_component_mm3`` left out) from its
    stored energy (no network run) and return its updated record (not yet written to the table)."""
    energy_path, anomaly_path = output_paths(output_dir, record.case_id)
    energy_image = read_image(energy_path)
    anomaly = anomaly_from_energy(energy_image, threshold, min_component_mm3)
    write_image_atomic(anomaly, anomaly_path)
    label = read_reference(record.reference, energy_image)
    figures = case_figures(energy_image, anomaly, label)
    updated = CaseRecord(**{**record.__dict__, **figures, "threshold": float(threshold), "updated": ""})
    if label is None:
        updated.dice, updated.auprc, updated.reference = None, None, ""
    return updated


REPORT_JSON = "report.json"
"""The folder run's report (:func:`~ADMAnomalyLib.api.predict_folder`): threshold, model, label settings, cases."""


def folder_min_component_mm3(output_dir: PathLike) -> float:
    """The ``min_component_mm3`` the folder's labels were written with (its report); 0 for a folder without one
    (written before the setting existed), and 0 with a warning for a report that cannot be read."""
    path = Path(output_dir) / REPORT_JSON
    if not path.is_file():
        return 0.0
    try:
        value = float(json.loads(path.read_text(encoding="utf-8")).get("min_component_mm3", 0.0))
    except (OSError, ValueError, TypeError, AttributeError) as exc:
        log.warning("%s: unreadable (%s); labels keep their small regions", path, exc)
        return 0.0
    if not (math.isfinite(value) and value >= 0):
        log.warning("%s: min_component_mm3 %r is not a volume; labels keep their small regions", path, value)
        return 0.0
    return value


def rethreshold_folder(output_dir: PathLike, threshold: float, progress=None) -> dict[str, CaseRecord]:
    """Rewrite every done case's anomaly map in ``output_dir`` at ``threshold`` from its stored
    energy, with the regions its predict run left out (:func:`folder_min_component_mm3`) left out again, and
    update ``cases.csv``; returns the table. ``progress(done, total, case_id)``."""
    from .validation import check_threshold

    threshold = check_threshold(threshold)
    min_component_mm3 = folder_min_component_mm3(output_dir)
    table = read_table(output_dir)
    done = [record for record in table.values() if record.done]
    if not done:
        raise InputError(f"{output_dir}: no finished case in {CASES_CSV} to re-threshold")
    for index, record in enumerate(done, start=1):
        table = update_table(output_dir, rethreshold_case(output_dir, record, threshold, min_component_mm3))
        if progress is not None:
            progress(index, len(done), record.case_id)
    return table
