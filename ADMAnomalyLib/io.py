"""Image and file IO: validated volume reading and crash-safe (atomic) writing.

Every reader error is an :class:`~ADMAnomalyLib.errors.InputError` and every writer error an
:class:`~ADMAnomalyLib.errors.OutputError`, each with a one-line message naming the file.
Writers go through a temporary file in the destination folder followed by :func:`os.replace`,
so an interrupted write never leaves a truncated file under the final name.
"""

from __future__ import annotations

import glob
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
    """Read a NIfTI/NRRD/MetaImage volume and check it is a complete, finite 3-D scalar image.

    The pixel type is kept as stored; :mod:`ADMAnomalyLib.cases` casts to float32.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: file not found" if not path.exists() else f"{path}: not a file")
    is_nifti = path.name.lower().endswith((".nii", ".nii.gz"))
    # ITK's NIfTI reader returns zeros for the missing part of a truncated file, so NIfTI data is
    # checked in the file itself first (size, gzip end-of-stream and CRC); NRRD and MetaImage
    # readers fail on truncation by themselves.
    n_nan, n_inf = _inspect_nifti(path) if is_nifti else (0, 0)
    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError as exc:
        reason = _first_line(exc)
        if "not read completely" in str(exc) or "expected" in reason and "bytes" in reason:
            reason = "truncated: " + reason
        raise InputError(f"{path}: cannot read image ({reason})") from None
    check_volume(image, str(path))
    if n_nan or n_inf:
        # ITK's NIfTI reader silently turns non-finite voxels into 0, so they are counted in the file.
        raise InputError(f"{path}: {n_nan + n_inf} non-finite voxel(s) ({n_nan} NaN, {n_inf} inf)")
    return image


_NIFTI_BITS = {2: 8, 4: 16, 8: 32, 16: 32, 64: 64, 256: 8, 512: 16, 768: 32, 1024: 64, 1280: 64,
               32: 64, 128: 24, 1536: 128, 1792: 128, 2048: 256, 2304: 32}
"""Bits per voxel of each NIfTI datatype code (nifti1.h)."""


def _inspect_nifti(path: Path, count_non_finite: bool = True) -> tuple[int, int]:
    """Check that a NIfTI-1/2 file holds all the data its header promises and, with
    ``count_non_finite``, count its NaN and inf voxels (float data). A truncated file, or a gzip
    stream that ends early or fails its CRC, is an :class:`InputError` saying "truncated"; a header
    this parser does not understand is left to ITK.

    A gzip stream records its uncompressed length in its last 4 bytes; when that record matches the
    header's promise the stream is whole (a cut file ends in arbitrary bytes), so only float data,
    whose NaNs must be counted, is decompressed here."""
    import gzip
    import zlib

    compressed = path.name.lower().endswith(".gz")
    try:
        with (gzip.open(path, "rb") if compressed else open(path, "rb")) as handle:
            header = handle.read(540)
        layout = _nifti_layout(header)
        if layout is None:
            return 0, 0
        endian, datatype, count, offset, expected = layout
        floats = count_non_finite and datatype in (16, 64)
        if not compressed:
            size = path.stat().st_size
            data = path.read_bytes() if floats and size >= expected else b""
        elif not floats and _gzip_recorded_size(path) == expected % 2**32:
            return 0, 0
        else:
            with gzip.open(path, "rb") as handle:
                data = handle.read()  # reads to the end: raises on an early end or a bad CRC
            size = len(data)
    except EOFError:
        raise InputError(f"{path}: truncated (the gzip stream ends before its end-of-stream marker)") from None
    except (gzip.BadGzipFile, zlib.error) as exc:
        reason = str(exc).split(" (")[0] if str(exc).startswith("Not a gzipped") else f"corrupt gzip data: {exc}"
        raise InputError(f"{path}: cannot read image ({reason})") from None
    except OSError as exc:
        raise InputError(f"{path}: cannot read file ({_os_reason(exc)})") from None
    except _ShortHeader as exc:
        raise InputError(f"{path}: truncated ({exc.length} bytes, shorter than a NIfTI header)") from None
    if size < expected:
        what = "decompressed data" if compressed else "file"
        raise InputError(f"{path}: truncated ({what} has {size} of the {expected} bytes its header promises)")
    if not floats:
        return 0, 0
    values = np.frombuffer(data, dtype=endian + {16: "f4", 64: "f8"}[datatype], count=count, offset=offset)
    n_nan = int(np.count_nonzero(np.isnan(values)))
    return n_nan, int(np.count_nonzero(np.isinf(values)))


class _ShortHeader(Exception):
    def __init__(self, length: int) -> None:
        super().__init__(length)
        self.length = length


def _nifti_layout(header: bytes) -> tuple[str, int, int, int, int] | None:
    """``(endian, datatype, voxel count, data offset, expected file size)`` from the first bytes of a
    NIfTI-1/2 file; None for a header this parser does not understand."""
    import struct

    try:
        for endian in "<>":
            size = struct.unpack(endian + "i", header[:4])[0]
            if size in (348, 540):
                break
        else:
            return None
        if size == 348:
            dims = struct.unpack(endian + "8h", header[40:56])
            datatype = struct.unpack(endian + "h", header[70:72])[0]
            offset = int(struct.unpack(endian + "f", header[108:112])[0])
        else:
            datatype = struct.unpack(endian + "h", header[12:14])[0]
            dims = struct.unpack(endian + "8q", header[16:80])
            offset = int(struct.unpack(endian + "q", header[168:176])[0])
    except struct.error:
        raise _ShortHeader(len(header)) from None
    if len(header) < size:
        raise _ShortHeader(len(header))
    bits = _NIFTI_BITS.get(datatype)
    if bits is None or not 1 <= dims[0] <= 7 or any(d < 0 for d in dims[1 : dims[0] + 1]):
        return None
    count = int(np.prod(dims[1 : dims[0] + 1], dtype=np.int64))
    offset = max(offset, size + 4)  # the 4 extension bytes follow the header in a single file
    return endian, datatype, count, offset, offset + count * bits // 8


def _gzip_recorded_size(path: Path) -> int:
    """The uncompressed size (mod 2**32) a gzip file records in its last 4 bytes."""
    import struct

    with open(path, "rb") as handle:
        handle.seek(-4, os.SEEK_END)
        return struct.unpack("<I", handle.read(4))[0]


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
        _verify_written(tmp, image, path)

    return _atomic(path, write, suffix)


def _verify_written(tmp: Path, image: sitk.Image, path: Path) -> None:
    """Read a freshly written image file back before it gets its final name: ITK reports some write
    failures (a full disk: "wrote only 0 of N bytes") without raising, and a short file under the
    final name would later pass for a finished output."""
    try:
        if image_suffix(tmp) in (".nii", ".nii.gz"):
            _inspect_nifti(tmp, count_non_finite=False)
            reader = sitk.ImageFileReader()
            reader.SetFileName(str(tmp))
            reader.ReadImageInformation()
            size = reader.GetSize()
        else:
            size = sitk.ReadImage(str(tmp)).GetSize()
    except (InputError, RuntimeError) as exc:
        reason = _first_line(exc).replace(str(tmp), path.name)
        raise OutputError(f"{path}: the written file is incomplete, the disk may be full ({reason})") from None
    if tuple(size) != tuple(image.GetSize()):
        raise OutputError(f"{path}: the written file has size {size}, not {image.GetSize()}")


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


def _remove_stale_temp_files(path: Path, suffix: str) -> None:
    """Remove the temp files of ``path`` whose writer was killed: the hardest stop runs no ``finally``,
    and a rerun would otherwise leave them beside its outputs for good. Their names carry the writer's
    process id; one whose process is gone is stale, a live writer's (another shard's, this process's:
    ``os.kill(pid, 0)`` succeeds for both) is left alone. POSIX only: on Windows ``os.kill`` would terminate the process it asks about."""
    if os.name == "nt":
        return
    head = f".{path.name}."
    for candidate in path.parent.glob(f"{glob.escape(head)}*.tmp{glob.escape(suffix)}"):
        pid = candidate.name[len(head):].split(".", 1)[0]
        if not pid.isdigit():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            try:
                candidate.unlink()
            except OSError:
                pass
        except OSError:  # alive, but another user's
            pass


def _atomic(path: Path, write: Callable[[Path], None], suffix: str) -> Path:
    """Run ``write`` on a temp file beside ``path`` and rename it over ``path`` on success."""
    if path.is_dir():
        raise OutputError(f"{path}: is a folder, expected a file name")
    folder = path.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
        _remove_stale_temp_files(path, suffix)
        # Same folder => same file system => os.replace is an atomic rename.
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}.", suffix=f".tmp{suffix}", dir=folder)
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
