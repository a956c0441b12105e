"""Untrusted uploads made safe: content types, zip extraction limits, DICOM sniffing, temp folders.

Pure functions (no Ray, no FastAPI) so the rules are testable on their own; every rejection is an
`UploadError` carrying the HTTP status and the form field at fault.
"""
from __future__ import annotations

import io
import os
import shutil
import stat
import tempfile
import zipfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Iterator

MAX_ZIP_FILES = 2000
MAX_ZIP_BYTES = 1 << 30  # uncompressed; a zip bomb is refused before extraction
MAX_COMPRESSION_RATIO = 200

ZIP_TYPES = ("application/zip", "application/x-zip-compressed", "application/octet-stream")
DICOM_TYPES = ("application/dicom", "application/octet-stream")
NIFTI_TYPES = ("application/gzip", "application/x-gzip", "application/octet-stream", "application/nifti")
IMAGE_TYPES = ("image/png", "image/jpeg")
JSON_TYPES = ("application/json", "text/plain", "application/octet-stream")


@dataclass
class UploadError(Exception):
    """A request that cannot be served as sent: HTTP status, the form field and what is wrong."""

    status: int
    field: str
    message: str

    def __str__(self) -> str:
        return f"{self.field}: {self.message}"

    def to_json(self) -> dict:
        """The 4xx response body."""
        return {"error": self.message, "field": self.field, "status": self.status}


def base_content_type(content_type: str | None) -> str:
    """`image/png; charset=x` -> `image/png` (lower case; empty when absent)."""
    return (content_type or "").split(";")[0].strip().lower()


def check_content_type(field: str, content_type: str | None, allowed: tuple[str, ...]) -> str:
    """Refuse a part whose declared type is not one we read (415)."""
    ct = base_content_type(content_type)
    if ct not in allowed:
        raise UploadError(415, field, f"unsupported content type {ct or '(none)'!r}; expected one of {list(allowed)}")
    return ct


def is_dicom(data: bytes) -> bool:
    """A Part-10 file ('DICM' at offset 128) or a bare dataset pydicom can parse with pixel data."""
    if len(data) >= 132 and data[128:132] == b"DICM":
        return True
    try:
        import pydicom

        ds = pydicom.dcmread(io.BytesIO(data), force=True, stop_before_pixels=False)
        return "PixelData" in ds and "Rows" in ds
    except Exception:  # noqa: BLE001 - anything unparsable is simply not DICOM
        return False


def is_zip(data: bytes) -> bool:
    """Zip local-file-header magic."""
    return data[:4] == b"PK\x03\x04"


def is_gzip(data: bytes) -> bool:
    """Gzip magic (`.nii.gz`)."""
    return data[:2] == b"\x1f\x8b"


def is_png_or_jpeg(data: bytes) -> bool:
    """PNG or JPEG magic bytes."""
    return data[:8] == b"\x89PNG\r\n\x1a\n" or data[:3] == b"\xff\xd8\xff"


def safe_extract_zip(data: bytes, dest: Path, field: str, max_files: int = MAX_ZIP_FILES,
                     max_bytes: int = MAX_ZIP_BYTES) -> list[Path]:
    """Extract a zip refusing path traversal, links, too many files and zip bombs; returns the files."""
    try:
        zf = zipfile.ZipFile(io.BytesIO(data))
        infos = zf.infolist()
    except (zipfile.BadZipFile, ValueError) as e:
        raise UploadError(400, field, f"not a valid zip archive ({e})") from e
    files = [i for i in infos if not i.is_dir()]
    if not files:
        raise UploadError(400, field, "zip archive is empty")
    if len(files) > max_files:
        raise UploadError(413, field, f"zip archive has {len(files)} files; at most {max_files} allowed")
    total = sum(i.file_size for i in files)
    if total > max_bytes:
        raise UploadError(413, field, f"zip archive expands to {total} bytes; at most {max_bytes} allowed")
    for i in files:
        name = PurePosixPath(i.filename.replace("\\", "/"))
        if name.is_absolute() or ".." in name.parts or ":" in i.filename:
            raise UploadError(400, field, f"zip member {i.filename!r} has an unsafe path")
        if stat.S_ISLNK(i.external_attr >> 16):
            raise UploadError(400, field, f"zip member {i.filename!r} is a symbolic link")
        if i.compress_size and i.file_size / max(1, i.compress_size) > MAX_COMPRESSION_RATIO:
            raise UploadError(413, field, f"zip member {i.filename!r} is compressed suspiciously well (zip bomb?)")
    out = []
    dest = dest.resolve()
    for i in files:
        target = (dest / i.filename).resolve()
        if dest not in target.parents:
            raise UploadError(400, field, f"zip member {i.filename!r} escapes the extraction folder")
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            with zf.open(i) as src, open(target, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
        except (zipfile.BadZipFile, OSError, EOFError) as e:
            raise UploadError(400, field, f"zip member {i.filename!r} is corrupt ({e})") from e
        out.append(target)
    return out


WORKDIR_PREFIX = "raypipe-req-"


@contextmanager
def request_workdir() -> Iterator[Path]:
    """A private temporary folder for one request (named after the replica's pid), always removed afterwards."""
    d = Path(tempfile.mkdtemp(prefix=f"{WORKDIR_PREFIX}{os.getpid()}-"))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sweep_stale_workdirs(root: Path | None = None, max_age_s: float = 3600.0) -> int:
    """Remove request folders left by replicas that died (their pid is gone); run at replica start. Returns the count."""
    import time

    base = Path(root or tempfile.gettempdir())
    removed = 0
    for d in base.glob(f"{WORKDIR_PREFIX}*"):
        pid_text = d.name[len(WORKDIR_PREFIX):].split("-", 1)[0]
        try:
            stale = not _pid_alive(int(pid_text)) if pid_text.isdigit() else time.time() - d.stat().st_mtime > max_age_s
        except OSError:
            continue
        if stale and d.is_dir() and not d.is_symlink():
            shutil.rmtree(d, ignore_errors=True)
            removed += 1
    return removed


def quiet_replica() -> None:
    """Set once at replica start: library warnings are not printed (they can quote header values or names).

    Nothing here is per request: the global warning filter is set before any request thread runs, and
    request code never uses `warnings.catch_warnings` (process-global, not thread-safe).
    """
    import logging
    import warnings

    warnings.simplefilter("ignore")
    logging.getLogger("pydicom").setLevel(logging.CRITICAL)
    sweep_stale_workdirs()


# ------------------------------------------------------------------ size guards before decoding (serving)
MAX_VOLUME_VOXELS = 1024 * 1024 * 1024  # a 1024 x 1024 x 1024 CT; larger headers are refused before reading
MAX_IMAGE_PIXELS = 64 * 1024 * 1024  # a 8k x 8k radiograph


class BodyTooLarge(Exception):
    """The request body grew past the configured limit while it was being read (413)."""


def is_nifti1(data: bytes) -> bool:
    """Uncompressed NIfTI-1/2 magic (`n+1` / `n+2` in the header)."""
    return (len(data) >= 348 and data[344:347] in (b"n+1", b"ni1")) or (len(data) >= 540 and data[4:7] in (b"n+2", b"ni2"))


def gunzip_limited(data: bytes, field: str, max_bytes: int = MAX_ZIP_BYTES) -> bytes:
    """Decompress a gzip upload refusing gzip bombs (413) and corrupt streams (400)."""
    import zlib

    d = zlib.decompressobj(16 + zlib.MAX_WBITS)
    out = bytearray()
    try:
        chunk = d.decompress(data, max_bytes + 1)
        out += chunk
        if len(out) > max_bytes or d.unconsumed_tail:
            raise UploadError(413, field, f"gzip data expands beyond {max_bytes} bytes")
        out += d.flush()
    except zlib.error as e:
        raise UploadError(400, field, f"corrupt gzip data ({e})") from e
    if not d.eof:
        raise UploadError(400, field, "truncated gzip data")
    return bytes(out)


def check_nifti_header(raw: bytes, field: str, max_voxels: int = MAX_VOLUME_VOXELS) -> tuple[int, ...]:
    """Dimensions of an uncompressed NIfTI header; refuses non-NIfTI (415), absurd or oversized dims (400/413)."""
    import struct

    if not is_nifti1(raw):
        raise UploadError(415, field, "not a NIfTI file (no NIfTI-1/2 header)")
    two = raw[4:7] in (b"n+2", b"ni2")
    for endian in ("<", ">"):
        size = struct.unpack(endian + "i", raw[:4])[0]
        if size in (348, 540):
            break
    else:
        raise UploadError(400, field, "corrupt NIfTI header (bad sizeof_hdr)")
    dims = struct.unpack(endian + ("8q" if two else "8h"), raw[16:80] if two else raw[40:56])
    ndim = dims[0]
    if not 1 <= ndim <= 7 or any(d < 1 for d in dims[1:ndim + 1]):
        raise UploadError(400, field, f"corrupt NIfTI header (dims {list(dims)})")
    n = 1
    for d in dims[1:ndim + 1]:
        n *= int(d)
    if n > max_voxels:
        raise UploadError(413, field, f"NIfTI volume has {n} voxels; at most {max_voxels} allowed")
    return tuple(int(d) for d in dims[1:ndim + 1])


def check_dicom_image_size(data: bytes, field: str, max_pixels: int = MAX_IMAGE_PIXELS) -> None:
    """Refuse a DICOM whose header promises more pixels than allowed, before decoding them (413)."""
    import pydicom

    try:
        ds = pydicom.dcmread(io.BytesIO(data), force=True, stop_before_pixels=True)
        rows, cols = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
        frames = int(str(ds.get("NumberOfFrames", 1) or 1))
    except Exception as e:  # noqa: BLE001 - unparsable headers are reported as not DICOM
        raise UploadError(400, field, f"not a readable DICOM file ({type(e).__name__})") from e
    if rows * cols * max(frames, 1) > max_pixels:
        raise UploadError(413, field, f"DICOM image has {rows}x{cols}x{frames} pixels; at most {max_pixels} allowed")


def check_raster_size(data: bytes, field: str, max_pixels: int = MAX_IMAGE_PIXELS) -> None:
    """Refuse a PNG/JPEG larger than allowed from its header alone (no decoding), and unreadable ones (400)."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as img:
            w, h = img.size
    except Exception as e:  # noqa: BLE001 - Pillow raises many types on garbage
        raise UploadError(400, field, f"not a readable PNG/JPEG image ({type(e).__name__})") from e
    if w * h > max_pixels:
        raise UploadError(413, field, f"image has {w}x{h} pixels; at most {max_pixels} allowed")


def series_folder(files: list[Path], root: Path) -> Path:
    """The folder of an extracted zip that holds most files (a DICOM series zipped with its parent folders)."""
    from collections import Counter

    if not files:
        return root
    return Counter(f.parent for f in files).most_common(1)[0][0]
