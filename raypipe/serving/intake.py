"""CT uploads (study, masks, body mask) turned into files the readers may open, identified by content only.

Rules (issue 17): a member is opened only when its bytes say what it is (DICOM preamble or a parsable
DICOM header with pixels, a NIfTI-1/2 header, gzip wrapping a NIfTI header); never by its name, and
never a format that references other files (MetaImage, NRRD headers are neither and are skipped).
Declared sizes (voxels, pixels x frames, bytes after decompression) are checked against the limits
before anything is decoded. Files are written under neutral names (`series/00001.dcm`,
`study.nii.gz`, `masks/vertebrae_L1.nii.gz`), so client file and folder names (which may hold patient
names) never reach readers, messages or logs; identifying DICOM values are collected in a `Redactor`.
"""
from __future__ import annotations

import io
import re
import struct
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

from raypipe.serving.uploads import UploadError, is_gzip, is_nifti1, is_zip

MASK_STEM = re.compile(r"[A-Za-z0-9_]{1,64}")
_NIFTI_SUFFIX = re.compile(r"\.nii(\.gz)?$", re.IGNORECASE)
# DICOM value representations that can carry identifying text (names, ids, UIDs, dates, free text).
_IDENTIFYING_VRS = {"PN", "LO", "SH", "UI", "DA", "DT", "TM", "AE", "LT", "ST", "UT", "UC", "CS", "AS"}
MIN_SPACING_MM, MAX_SPACING_MM = 1e-3, 1e3


@dataclass
class Limits:
    """Per-request limits on what an upload may expand to."""

    max_zip_files: int = 2000
    max_unpacked_bytes: int = 512 * 1024 * 1024  # across all members of all fields of one request
    max_voxels: int = 512 * 512 * 640
    max_pixels: int = 25 * 1024 * 1024
    max_frames: int = 1

    @classmethod
    def from_dict(cls, d: dict[str, int]) -> "Limits":
        """From the `limits` dict `build_app` passes to the preprocessing deployments."""
        return cls(**{k: int(v) for k, v in d.items() if k in cls.__dataclass_fields__})


@dataclass
class Redactor:
    """Identifying strings seen in one request (DICOM values, zip names); `redact` removes them from text."""

    secrets: set[str] = field(default_factory=set)

    def add(self, value: object) -> None:
        """Remember a value and its person-name / path components (4+ characters; shorter ones are not unique)."""
        s = str(value).strip()
        for part in {s, *re.split(r"[\^/\\,\s]+", s)}:
            part = part.strip()
            if len(part) >= 4:
                self.secrets.add(part)

    def add_dataset(self, ds: object) -> None:
        """Every text-like element value of a pydicom dataset (PN, LO, UI, DA, ... ; nested sequences too)."""
        try:
            for elem in ds.iterall():  # type: ignore[attr-defined]
                if elem.VR in _IDENTIFYING_VRS and elem.value not in (None, ""):
                    values = elem.value if isinstance(elem.value, (list, tuple)) or type(elem.value).__name__ == "MultiValue" else [elem.value]
                    for v in values:
                        self.add(v)
        except Exception:  # noqa: BLE001 - a damaged header still yields the values read so far
            pass

    def redact(self, text: str) -> str:
        """`text` with every remembered value replaced by `<redacted>` (longest first)."""
        for s in sorted(self.secrets, key=len, reverse=True):
            if s in text:
                text = text.replace(s, "<redacted>")
        return text


@dataclass
class _Budget:
    left: int

    def take(self, n: int, field_name: str) -> None:
        if n > self.left:
            raise UploadError(413, field_name, "upload expands beyond the per-request limit on unpacked bytes")
        self.left -= n


# ------------------------------------------------------------------------------------------ NIfTI
def nifti_header_bytes(data: bytes) -> bytes | None:
    """The first 544 bytes of a NIfTI upload (decompressing gzip only that far); None when not gzip/NIfTI."""
    if is_gzip(data):
        try:
            head = zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(data, 544)
        except zlib.error:
            return None
        return head if is_nifti1(head) else None
    return data[:544] if is_nifti1(data) else None


def check_nifti(head: bytes, field_name: str, max_voxels: int) -> int:
    """Check a NIfTI header before reading: dims, voxel count, spacing and affine finite and plausible; bytes of data."""
    two = head[4:7] in (b"n+2", b"ni2")
    endian = "<"
    for e in ("<", ">"):
        if struct.unpack(e + "i", head[:4])[0] in (348, 540):
            endian = e
            break
    else:
        raise UploadError(400, field_name, "corrupt NIfTI header (bad sizeof_hdr)")
    if two:
        dims = struct.unpack(endian + "8q", head[16:80])
        bitpix = struct.unpack(endian + "h", head[14:16])[0]
        pixdim = struct.unpack(endian + "8d", head[104:168])
        affine = struct.unpack(endian + "18d", head[352:496]) if len(head) >= 496 else ()
    else:
        dims = struct.unpack(endian + "8h", head[40:56])
        bitpix = struct.unpack(endian + "h", head[72:74])[0]
        pixdim = struct.unpack(endian + "8f", head[76:108])
        affine = struct.unpack(endian + "18f", head[256:328]) if len(head) >= 328 else ()
    ndim = dims[0]
    if not 1 <= ndim <= 7 or any(d < 1 for d in dims[1:ndim + 1]):
        raise UploadError(400, field_name, "corrupt NIfTI header (dimensions)")
    n = 1
    for d in dims[1:ndim + 1]:
        n *= int(d)
    if n > max_voxels:
        raise UploadError(413, field_name, f"NIfTI volume has {n} voxels; at most {max_voxels} allowed")
    if bitpix not in (8, 16, 32, 64, 128):
        raise UploadError(400, field_name, f"unsupported NIfTI bitpix {bitpix}")
    for s in pixdim[1:min(ndim, 3) + 1]:
        if not (MIN_SPACING_MM <= abs(s) <= MAX_SPACING_MM):  # also False for NaN
            raise UploadError(422, field_name, f"implausible NIfTI voxel spacing {s!r} mm")
    for v in affine:
        if not (abs(v) < 1e7):
            raise UploadError(422, field_name, "NIfTI orientation/affine holds non-finite or absurd values")
    return n * bitpix // 8


def check_gzip_size(data: bytes, field_name: str, max_bytes: int) -> int:
    """Decompressed size of a gzip stream, counted in 1 MiB chunks that are discarded (413 above max_bytes, 400 corrupt)."""
    d = zlib.decompressobj(16 + zlib.MAX_WBITS)
    total, pending = 0, data
    try:
        while pending:
            total += len(d.decompress(pending, 1 << 20))
            if total > max_bytes:
                raise UploadError(413, field_name, f"gzip data expands beyond {max_bytes} bytes (more than its header declares)")
            pending = d.unconsumed_tail
        total += len(d.flush())
    except zlib.error:
        raise UploadError(400, field_name, "corrupt gzip data") from None
    if total > max_bytes:
        raise UploadError(413, field_name, f"gzip data expands beyond {max_bytes} bytes")
    return total


def gunzip_to_file(data: bytes, path: Path, field_name: str, max_bytes: int) -> int:
    """Decompress a gzip stream into `path` in 1 MiB chunks, refusing more than `max_bytes` (413) or corrupt data (400).

    One pass both checks the size and writes what the reader opens, so the upload is not inflated twice.
    """
    d = zlib.decompressobj(16 + zlib.MAX_WBITS)
    total, pending = 0, data
    with open(path, "wb") as out:
        try:
            while pending:
                chunk = d.decompress(pending, 1 << 20)
                total += len(chunk)
                if total > max_bytes:
                    raise UploadError(413, field_name, f"gzip data expands beyond {max_bytes} bytes (more than its header declares)")
                out.write(chunk)
                pending = d.unconsumed_tail
            tail = d.flush()
        except zlib.error:
            raise UploadError(400, field_name, "corrupt gzip data") from None
        total += len(tail)
        if total > max_bytes:
            raise UploadError(413, field_name, f"gzip data expands beyond {max_bytes} bytes")
        out.write(tail)
    if not d.eof:
        raise UploadError(400, field_name, "truncated gzip data")
    return total


def _nifti_file(data: bytes, dest: Path, field_name: str, limits: Limits, budget: _Budget,
                inflate: bool = False) -> Path:
    """Write a NIfTI upload (plain or gzip) after its header passed; gzip is kept (the header bounds decoding).

    `inflate` writes a gzip upload decompressed instead (checked in the same pass): for the study, which
    the reader would otherwise inflate a second time; masks stay compressed (many, and large once inflated).
    """
    head = nifti_header_bytes(data)
    if head is None:
        raise UploadError(415, field_name, "not a NIfTI file (no NIfTI-1/2 header)")
    nbytes = check_nifti(head, field_name, limits.max_voxels)
    dest.parent.mkdir(parents=True, exist_ok=True)
    if is_gzip(data) and inflate:
        path = dest.with_name(dest.name + ".nii")
        written = gunzip_to_file(data, path, field_name, nbytes + (1 << 20))  # header + extensions: 1 MiB at most
        budget.take(written, field_name)
        return path
    budget.take(len(data), field_name)  # bytes written; decoding is bounded per file by the checked header
    if is_gzip(data):  # the stream may not hold more than the header declares: a gzip bomb stops here
        check_gzip_size(data, field_name, nbytes + (1 << 20))  # header + extensions: 1 MiB at most
    path = dest.with_name(dest.name + (".nii.gz" if is_gzip(data) else ".nii"))
    path.write_bytes(data)
    return path


# ------------------------------------------------------------------------------------------ zip
_ZIP_METHODS = (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED)
MAX_COMPRESSION_RATIO = 200


def zip_members(data: bytes, field_name: str, limits: Limits, budget: _Budget,
                want: Callable[[str], bool] | None = None) -> Iterator[tuple[int, str, bytes]]:
    """(index, name, bytes) of the zip's files (those `want(name)` accepts), each checked before it is read.

    Encrypted members, methods other than stored/deflate, implausible ratios and corrupt data are
    refused with a 4xx naming the member by index (never by its name, which may hold a patient name).
    """
    try:
        zf = zipfile.ZipFile(io.BytesIO(data))
        infos = [i for i in zf.infolist() if not i.filename.endswith("/")]  # is_dir() fails on empty names
    except (zipfile.BadZipFile, zipfile.LargeZipFile, ValueError, OSError, EOFError, struct.error, IndexError,
            NotImplementedError, UnicodeDecodeError):
        raise UploadError(400, field_name, "not a valid zip archive") from None
    if not infos:
        raise UploadError(400, field_name, "zip archive is empty")
    if len(infos) > limits.max_zip_files:
        raise UploadError(413, field_name, f"zip archive has {len(infos)} files; at most {limits.max_zip_files} allowed")
    for k, i in enumerate(infos):
        name = i.filename.replace("\\", "/")
        if want is not None and not want(name):
            continue
        if i.flag_bits & 0x1:
            raise UploadError(400, field_name, f"zip member #{k} is encrypted")
        if i.compress_type not in _ZIP_METHODS:
            raise UploadError(415, field_name, f"zip member #{k} uses compression method {i.compress_type}; only stored or deflate")
        if i.compress_size and i.file_size / max(1, i.compress_size) > MAX_COMPRESSION_RATIO:
            raise UploadError(413, field_name, f"zip member #{k} is compressed suspiciously well (zip bomb?)")
        budget.take(i.file_size, field_name)
        try:
            with zf.open(i) as src:
                blob = src.read(i.file_size + 1)
        except (zipfile.BadZipFile, zlib.error, EOFError, OSError, ValueError, RuntimeError, NotImplementedError,
                struct.error):
            raise UploadError(400, field_name, f"zip member #{k} is corrupt") from None
        if len(blob) != i.file_size:
            raise UploadError(400, field_name, f"zip member #{k} is corrupt (size mismatch)")
        yield k, name, blob


# ------------------------------------------------------------------------------------------ DICOM
def dicom_header(blob: bytes) -> object | None:
    """The pydicom header of a DICOM image (preamble, or a bare dataset with Rows and pixel data); else None."""
    import pydicom

    try:
        if len(blob) >= 132 and blob[128:132] == b"DICM":
            ds = pydicom.dcmread(io.BytesIO(blob), stop_before_pixels=True)
        else:
            ds = pydicom.dcmread(io.BytesIO(blob), force=True, stop_before_pixels=True)
            if "Rows" not in ds or b"\xe0\x7f\x10\x00" not in blob:
                return None
        return ds if "Rows" in ds else None
    except Exception:  # noqa: BLE001 - pydicom raises many types on garbage: then it is not DICOM
        return None


def dicom_pixels(ds: object, field_name: str) -> int:
    """Rows x Columns x frames x samples declared by a DICOM header (400 when not integers)."""
    try:
        rows, cols = int(ds.get("Rows") or 0), int(ds.get("Columns") or 0)  # type: ignore[attr-defined]
        frames = int(str(ds.get("NumberOfFrames", 1) or 1))  # type: ignore[attr-defined]
        samples = int(ds.get("SamplesPerPixel", 1) or 1)  # type: ignore[attr-defined]
    except (TypeError, ValueError, OverflowError):
        raise UploadError(400, field_name, "DICOM header has non-numeric image dimensions") from None
    if rows < 1 or cols < 1 or frames < 1 or samples < 1:
        raise UploadError(400, field_name, "DICOM header has empty image dimensions")
    return rows * cols * frames * samples


# ------------------------------------------------------------------------------------------ fields
def materialise_study(data: bytes, workdir: Path, limits: Limits, redactor: Redactor, budget: _Budget) -> Path:
    """A CT upload -> a NIfTI file or a folder of one DICOM series (neutral names), all sizes checked first."""
    f = "study"
    if not is_zip(data):
        return _nifti_file(data, workdir / "study", f, limits, budget, inflate=True)
    niftis, slices, series, voxels = [], [], set(), 0
    for k, name, blob in zip_members(data, f, limits, budget):
        redactor.add(name)
        if nifti_header_bytes(blob) is not None:
            niftis.append(blob)
            continue
        ds = dicom_header(blob)
        if ds is None:
            continue  # not an image we read (DICOMDIR, text, MetaImage/NRRD headers): never opened
        redactor.add_dataset(ds)
        n = dicom_pixels(ds, f)
        frames = int(str(ds.get("NumberOfFrames", 1) or 1))
        if frames > limits.max_frames:
            raise UploadError(413, f, f"DICOM member #{k} has {frames} frames; at most {limits.max_frames} allowed")
        voxels += n
        if voxels > limits.max_voxels:
            raise UploadError(413, f, f"DICOM series has more than {limits.max_voxels} voxels")
        series.add(str(ds.get("SeriesInstanceUID", "")))
        slices.append(blob)
    if slices and niftis:
        raise UploadError(422, f, "zip holds both DICOM and NIfTI images: send one study")
    if len(niftis) > 1:
        raise UploadError(422, f, f"zip holds {len(niftis)} NIfTI files: send one study")
    if niftis:
        return _nifti_file(niftis[0], workdir / "study", f, limits, budget, inflate=True)
    if not slices:
        raise UploadError(415, f, "zip holds no DICOM or NIfTI image (files are identified by content)")
    if len(series) > 1:
        raise UploadError(422, f, f"zip holds {len(series)} DICOM series: send one series")
    folder = workdir / "series"
    folder.mkdir(parents=True)
    for n, blob in enumerate(slices):
        (folder / f"{n:05d}.dcm").write_bytes(blob)
    return folder


def materialise_masks(data: bytes, workdir: Path, field_name: str, wanted: set[str], limits: Limits,
                      redactor: Redactor, budget: _Budget) -> Path:
    """A mask upload -> one multilabel NIfTI, or a folder of the wanted `NAME.nii[.gz]` masks (others never read)."""
    if not is_zip(data):
        return _nifti_file(data, workdir / field_name, field_name, limits, budget)
    try:
        names = [i.filename.replace("\\", "/") for i in zipfile.ZipFile(io.BytesIO(data)).infolist()
                 if not i.filename.endswith("/")]
    except (zipfile.BadZipFile, zipfile.LargeZipFile, ValueError, OSError, EOFError, struct.error, IndexError,
            NotImplementedError, UnicodeDecodeError):
        raise UploadError(400, field_name, "not a valid zip archive") from None
    for n in names:
        redactor.add(n)
    single = len(names) == 1

    def stem(name: str) -> str:
        return _NIFTI_SUFFIX.sub("", name.rsplit("/", 1)[-1])

    folder = workdir / field_name
    seen: set[str] = set()
    for k, name, blob in zip_members(data, field_name, limits, budget,
                                     want=lambda n: single or stem(n) in wanted):
        if single:
            return _nifti_file(blob, workdir / field_name, field_name, limits, budget)
        s = stem(name)
        if not MASK_STEM.fullmatch(s):
            continue
        if s in seen:
            raise UploadError(422, field_name, f"zip holds mask {s!r} twice")
        seen.add(s)
        _nifti_file(blob, folder / s, field_name, limits, budget)
    if not seen:
        raise UploadError(422, field_name, "zip holds none of the vertebra masks needed (NAME.nii.gz, e.g. vertebrae_L1)")
    return folder


def new_budget(limits: Limits) -> _Budget:
    """A fresh per-request unpacked-bytes budget."""
    return _Budget(limits.max_unpacked_bytes)
