"""Image and file IO: validated volume reading and crash-safe (atomic) writing.

Every reader error is an :class:`~ADMAnomalyLib.errors.InputError` and every writer error an
:class:`~ADMAnomalyLib.errors.OutputError`, each with a one-line message naming the file.
Writers go through a temporary file in the destination folder followed by :func:`os.replace`,
so an interrupted write never leaves a truncated file under the final name.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Callable, Union

import numpy as np
import SimpleITK as sitk

from .errors import InputError, OutputError

PathLike = Union[str, "os.PathLike[str]"]

_SCALAR_TYPES = frozenset(
    {
        sitk.sitkUInt8,
        sitk.sitkInt8,
        sitk.sitkUInt16,
        sitk.sitkInt16,
        sitk.sitkUInt32,
        sitk.sitkInt32,
        sitk.sitkUInt64,
        sitk.sitkInt64,
        sitk.sitkFloat32,
        sitk.sitkFloat64,
    }
)


def image_suffix(path: PathLike) -> str:
    """Full image extension of ``path``: ``.nii.gz`` for ``x.nii.gz``, ``.nrrd`` for ``x.nrrd``."""
    name = Path(path).name.lower()
    if name.endswith(".gz") and name.count(".") >= 2:
        # ".nii.gz" must stay whole: SimpleITK chooses the writer (and compression) from it.
        return "." + ".".join(name.rsplit(".", 2)[-2:])
    return Path(name).suffix


def check_volume(image: sitk.Image, name: str) -> None:
    """Raise :class:`InputError` unless ``image`` is a finite 3-D scalar volume.

    ``name`` (a file path or e.g. ``"case 7 flair"``) starts the message.
    """
    if not isinstance(image, sitk.Image):
        raise InputError(f"{name}: expected a SimpleITK image, got {type(image).__name__}")
    dim = image.GetDimension()
    components = image.GetNumberOfComponentsPerPixel()
    if dim != 3 or components != 1 or image.GetPixelID() not in _SCALAR_TYPES:
        what = f"a {dim}-D image of size {image.GetSize()}"
        if components != 1:
            what += f" with {components} components per voxel"
        elif image.GetPixelID() not in _SCALAR_TYPES:
            what += f" of pixel type {image.GetPixelIDTypeAsString()}"
        raise InputError(f"{name}: expected a 3-D scalar volume, got {what}")
    if image.GetPixelID() in (sitk.sitkFloat32, sitk.sitkFloat64):
        values = sitk.GetArrayViewFromImage(image)
        n_bad = int(values.size - np.count_nonzero(np.isfinite(values)))
        if n_bad:
            n_nan = int(np.count_nonzero(np.isnan(values)))
            raise InputError(
                f"{name}: {n_bad} non-finite voxel(s) ({n_nan} NaN, {n_bad - n_nan} inf)"
            )


def read_image(path: PathLike) -> sitk.Image:
    """Read a NIfTI/NRRD/MetaImage volume and check it is a finite 3-D scalar image.

    The pixel type is kept as stored; :mod:`ADMAnomalyLib.cases` casts to float32.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: file not found" if not path.exists() else f"{path}: not a file")
    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError as exc:
        raise InputError(f"{path}: cannot read image ({_first_line(exc)})") from None
    check_volume(image, str(path))
    if image.GetPixelID() in (sitk.sitkFloat32, sitk.sitkFloat64) and path.name.lower().endswith(
        (".nii", ".nii.gz")
    ):
        n_nan, n_inf = _nifti_non_finite(path)
        if n_nan or n_inf:
            raise InputError(
                f"{path}: {n_nan + n_inf} non-finite voxel(s) ({n_nan} NaN, {n_inf} inf)"
            )
    return image


def _nifti_non_finite(path: Path) -> tuple[int, int]:
    """Count NaN and inf voxels in the raw data of a float NIfTI-1/2 file.

    ITK's NIfTI reader silently turns non-finite voxels into 0, so they must be counted in the
    file itself. Returns (0, 0) for anything this small parser does not understand.
    """
    import gzip
    import struct

    opener = gzip.open if path.name.lower().endswith(".gz") else open
    try:
        with opener(path, "rb") as handle:
            header = handle.read(540)
            for endian in "<>":
                size = struct.unpack(endian + "i", header[:4])[0]
                if size in (348, 540):
                    break
            else:
                return 0, 0
            if size == 348:
                dims = struct.unpack(endian + "8h", header[40:56])
                datatype = struct.unpack(endian + "h", header[70:72])[0]
                offset = int(struct.unpack(endian + "f", header[108:112])[0])
            else:
                datatype = struct.unpack(endian + "h", header[12:14])[0]
                dims = struct.unpack(endian + "8q", header[16:80])
                offset = int(struct.unpack(endian + "q", header[168:176])[0])
            dtype = {16: "f4", 64: "f8"}.get(datatype)
            if dtype is None or not 1 <= dims[0] <= 7:
                return 0, 0
            count = int(np.prod(dims[1 : dims[0] + 1], dtype=np.int64))
            n_bytes = count * int(dtype[1])
            if offset < len(header):  # the first 540 bytes may already hold data (NIfTI-1)
                raw = header[offset:] + handle.read(max(0, n_bytes - (len(header) - offset)))
            else:
                handle.read(offset - len(header))
                raw = handle.read(n_bytes)
            data = np.frombuffer(raw[:n_bytes], dtype=endian + dtype)
    except (OSError, EOFError, struct.error, ValueError):
        return 0, 0
    n_nan = int(np.count_nonzero(np.isnan(data)))
    return n_nan, int(np.count_nonzero(np.isinf(data)))


def write_image_atomic(image: sitk.Image, path: PathLike, compress: bool = True) -> Path:
    """Write ``image`` to ``path`` atomically; the format follows the extension.

    ``compress`` asks SimpleITK for compression where the format supports it (``.nii.gz`` is
    always gzipped). Missing parent folders are created. Returns the final path.
    """
    path = Path(path)
    suffix = image_suffix(path)

    def write(tmp: Path) -> None:
        try:
            sitk.WriteImage(image, str(tmp), compress)
        except RuntimeError as exc:
            reason = _first_line(exc).replace(str(tmp), path.name)
            raise OutputError(f"{path}: cannot write image ({reason})") from None

    return _atomic(path, write, suffix)


def write_bytes_atomic(data: bytes, path: PathLike) -> Path:
    """Write ``data`` to ``path`` atomically (temp file, fsync, rename). Returns the final path."""

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())

    return _atomic(Path(path), write, "")


def write_text_atomic(text: str, path: PathLike, encoding: str = "utf-8") -> Path:
    """Write ``text`` to ``path`` atomically. Returns the final path."""
    return write_bytes_atomic(text.encode(encoding), path)


def _atomic(path: Path, write: Callable[[Path], None], suffix: str) -> Path:
    """Run ``write`` on a temp file beside ``path`` and rename it over ``path`` on success."""
    if path.is_dir():
        raise OutputError(f"{path}: is a folder, expected a file name")
    folder = path.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
        # Same folder => same file system => os.replace is an atomic rename.
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".tmp{suffix}", dir=folder)
        os.close(fd)
    except OSError as exc:
        raise OutputError(f"{path}: cannot write to folder {folder} ({_os_reason(exc)})") from None
    tmp = Path(tmp_name)
    try:
        write(tmp)
        # mkstemp creates 0600 files; give the result the permissions a plain open() would.
        os.chmod(tmp, 0o666 & ~_UMASK)
        os.replace(tmp, path)
    except OSError as exc:
        raise OutputError(f"{path}: cannot write file ({_os_reason(exc)})") from None
    finally:
        if tmp.exists():
            try:
                tmp.unlink()
            except OSError:
                pass
    return path


def _read_umask() -> int:
    # os.umask can only be read by setting it; done once at import, not per write, because the
    # umask is process-wide and the Slicer module writes from worker threads.
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_UMASK = _read_umask()


def _os_reason(exc: OSError) -> str:
    return exc.strerror or exc.__class__.__name__


def _first_line(exc: BaseException) -> str:
    """Most informative single line of a (often multi-line) SimpleITK/ITK error message."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    for line in reversed(lines):
        if "ERROR:" in line:
            # "sitk::ERROR: Unable to ..." / "itk::ERROR: ImageIO(0x..): Could not ..." -> the reason
            text = line.rsplit("ERROR:", 1)[1].strip()
            if text.startswith(("ImageIO", "NiftiImageIO", "NrrdImageIO", "MetaImageIO")) and "):" in text:
                text = text.split("):", 1)[1].strip()
            return text[:200]
    return (lines[-1] if lines else exc.__class__.__name__)[:200]
