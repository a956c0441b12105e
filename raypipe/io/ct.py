"""CT volumes: DICOM series folders and NIfTI files, in HU, reoriented to raypipe's canonical LPS.

Canonical layout (docs/CONTRACTS.md): `hu` is float32 `(z, y, x)` with x toward patient Left,
y toward Posterior, z toward Superior; `spacing` and `origin` are `(x, y, z)` in mm (world LPS).
SimpleITK/GDCM applies RescaleSlope/Intercept when reading DICOM, so its voxels are HU already;
`read_ct_series_pydicom` is an independent reader (pydicom + `apply_modality_lut`) used to check that.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from raypipe import storage
from raypipe.io.errors import ImageReadError, ImageReadWarning

logger = logging.getLogger(__name__)

CANONICAL_ORIENTATION = "LPS"
# Only NIfTI volumes are read, and only when their header says so: MetaImage (.mhd/.mha) and NRRD
# (.nhdr/.nrrd) headers can name any file on the machine as their data, so they are never opened.
VOLUME_SUFFIXES: tuple[str, ...] = (".nii.gz", ".nii")
MAX_SPACING_MM = 20.0  # CT voxels are at most a few mm; larger values make resampling allocate without bound
MIN_SPACING_MM = 0.01
MAX_EXTENT_MM = 2000.0
_IDENTITY: tuple[float, ...] = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
_DICOMDIR_SOP_CLASS = "1.2.840.10008.1.3.10"
_SEQUENCE_DELIMITER = b"\xfe\xff\xdd\xe0\x00\x00\x00\x00"  # (FFFE,E0DD), length 0
_PIXEL_DATA_TAG = b"\xe0\x7f\x10\x00"  # (7FE0,0010) little endian
_ITEM_TAG = b"\xfe\xff\x00\xe0"  # (FFFE,E000)

PathLike = str | os.PathLike[str]


@dataclass(frozen=True, eq=False)
class CTVolume:
    """A CT in HU on a canonical LPS grid, with the geometry needed to map voxels back to the patient."""

    hu: np.ndarray
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    source_orientation: str
    path: str
    direction: tuple[float, ...] = _IDENTITY

    @property
    def shape(self) -> tuple[int, int, int]:
        """Array shape `(z, y, x)`."""
        return tuple(int(n) for n in self.hu.shape)  # type: ignore[return-value]

    def to_sitk(self) -> sitk.Image:
        """The volume as a SimpleITK image (same grid), for resampling masks and writing NIfTI."""
        image = sitk.GetImageFromArray(np.ascontiguousarray(self.hu, dtype=np.float32))
        image.SetSpacing(tuple(float(s) for s in self.spacing))
        image.SetOrigin(tuple(float(o) for o in self.origin))
        image.SetDirection(tuple(float(d) for d in self.direction))
        return image


def is_volume_file(path: PathLike) -> bool:
    """True for NIfTI names (`.nii`, `.nii.gz`); the content is checked again before reading (`is_nifti_file`)."""
    return str(path).lower().endswith(VOLUME_SUFFIXES)


def is_nifti_file(path: PathLike) -> bool:
    """True when the file's header is NIfTI-1/2 (plain or gzip-compressed), whatever its name."""
    import gzip
    import zlib

    try:
        with open(path, "rb") as fh:
            head = fh.read(544)
        if head[:2] == b"\x1f\x8b":
            with gzip.open(path, "rb") as gz:
                head = gz.read(544)
    except (OSError, EOFError, zlib.error):
        return False
    return (len(head) >= 348 and head[344:347] in (b"n+1", b"ni1")) or (len(head) >= 540 and head[4:7] in (b"n+2", b"ni2"))


def check_geometry(image: sitk.Image, path: PathLike) -> None:
    """Refuse spacing/extent no CT has (NaN, 0, metres): they would make resampling allocate without bound."""
    spacing = np.asarray(image.GetSpacing(), dtype=float)
    extent = spacing * np.asarray(image.GetSize(), dtype=float)
    if not (np.all(np.isfinite(spacing)) and np.all(spacing >= MIN_SPACING_MM) and np.all(spacing <= MAX_SPACING_MM)):
        raise ImageReadError(path, f"implausible voxel spacing {tuple(round(float(s), 4) for s in spacing)} mm "
                                   f"(expected {MIN_SPACING_MM}..{MAX_SPACING_MM} mm)", field="spacing")
    if np.any(extent > MAX_EXTENT_MM):
        raise ImageReadError(path, f"implausible field of view {tuple(round(float(e)) for e in extent)} mm", field="spacing")
    if not all(np.isfinite(v) for v in (*image.GetOrigin(), *image.GetDirection())):
        raise ImageReadError(path, "non-finite origin or direction in the image header", field="orientation")


def orientation_code(image: sitk.Image) -> str:
    """Orientation code of a 3-D image as stored (nibabel-style axis codes, e.g. 'RAS', 'PIR', 'LPS')."""
    return sitk.DICOMOrientImageFilter.GetOrientationFromDirectionCosines(image.GetDirection())


def read_ct(path: PathLike, series_uid: str | None = None) -> CTVolume:
    """Read a DICOM series folder, one DICOM file or a NIfTI file into HU on the canonical LPS grid."""
    return ct_from_image(read_ct_image(path, series_uid=series_uid), path)


def ct_from_image(image: sitk.Image, path: PathLike) -> CTVolume:
    """Reorient a SimpleITK CT image to canonical LPS and wrap it as a `CTVolume`."""
    check_geometry(image, path)
    source = orientation_code(image)
    canonical = sitk.DICOMOrient(image, CANONICAL_ORIENTATION)
    hu = sitk.GetArrayFromImage(canonical).astype(np.float32, copy=False)
    if not np.isfinite(hu).all():
        raise ImageReadError(path, "CT holds NaN or infinite voxel values", field="voxels")
    return CTVolume(
        hu=hu,
        spacing=tuple(float(s) for s in canonical.GetSpacing()),  # type: ignore[arg-type]
        origin=tuple(float(o) for o in canonical.GetOrigin()),  # type: ignore[arg-type]
        source_orientation=source,
        path=str(path),
        direction=tuple(float(d) for d in canonical.GetDirection()),
    )


@storage.localized("path")  # DICOM series / NIfTI on object stores: fetched to a task-local temp dir
def read_ct_image(path: PathLike, series_uid: str | None = None) -> sitk.Image:
    """Read a CT as stored (no reorientation), in HU; `inspect` reports this geometry."""
    p = Path(path)
    if not p.exists():
        raise ImageReadError(p, "no such file or folder")
    if p.is_dir():
        return _read_dicom_folder(p, series_uid)
    if is_volume_file(p) or is_nifti_file(p):
        return _read_volume_file(p)
    problem = _truncation(p)
    if problem is not None:
        raise ImageReadError(p, problem)
    return _read_dicom_files(p, [str(p)])


def list_dicom_series(folder: PathLike) -> dict[str, list[str]]:
    """SeriesInstanceUID -> slice files in GDCM order, for every series GDCM finds in `folder`."""
    folder_str = str(folder)
    return {
        uid: list(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(folder_str, uid))
        for uid in sitk.ImageSeriesReader.GetGDCMSeriesIDs(folder_str)
    }


def choose_series(folder: PathLike, series: Mapping[str, Sequence[object]], series_uid: str | None) -> str:
    """Pick the requested series, else the largest one (warning when there was a choice to make)."""
    if series_uid is not None:
        if series_uid not in series:
            available = ", ".join(repr(uid) for uid in sorted(series)) or "none"
            raise ImageReadError(
                folder,
                f"SeriesInstanceUID {series_uid!r} not found; series present: {available}",
                field="series_uid",
                value=series_uid,
            )
        return series_uid
    if len(series) == 1:
        return next(iter(series))
    chosen = max(sorted(series), key=lambda uid: len(series[uid]))
    summary = ", ".join(f"{uid!r} ({len(files)} files)" for uid, files in sorted(series.items()))
    warnings.warn(
        f"{folder}: {len(series)} DICOM series found ({summary}); using the largest, {chosen!r}. "
        "Pass series_uid to choose another.",
        ImageReadWarning,
        stacklevel=3,
    )
    return chosen


def _read_dicom_folder(folder: Path, series_uid: str | None) -> sitk.Image:
    files = sorted(f for f in folder.iterdir() if f.is_file() and not f.name.startswith("."))
    if not files:
        subfolders = [d for d in folder.iterdir() if d.is_dir()]
        if subfolders:
            raise ImageReadError(
                folder, f"no files here, only {len(subfolders)} subfolder(s): pass the folder of one DICOM series"
            )
        raise ImageReadError(folder, "folder is empty: expected a DICOM series")
    for f in files:  # before GDCM: its folder scan takes seconds per truncated JPEG 2000 file
        problem = _truncation(f)
        if problem is not None:
            raise ImageReadError(f, problem)
    series = list_dicom_series(folder)
    listed = {os.path.abspath(f) for names in series.values() for f in names}
    for f in files:
        if os.path.abspath(f) not in listed:
            problem = _dicom_problem(f)
            if problem is not None:
                raise ImageReadError(f, problem)
            logger.debug("ignoring non-image file %s", f)
    if not series:
        raise ImageReadError(folder, f"no DICOM image series found among {len(files)} files")
    uid = choose_series(folder, series, series_uid)
    return _read_dicom_files(folder, series[uid])


def _read_dicom_files(where: Path, files: Sequence[str]) -> sitk.Image:
    reader = sitk.ImageSeriesReader()
    reader.SetImageIO("GDCMImageIO")  # never let a file's name pick another reader
    reader.SetFileNames(list(files))
    reader.MetaDataDictionaryArrayUpdateOn()
    try:
        image = reader.Execute()
    except RuntimeError as exc:
        for f in files:
            problem = _dicom_problem(Path(f))
            if problem is not None:
                raise ImageReadError(f, problem) from exc
            try:
                sitk.ReadImage(f, imageIO="GDCMImageIO")
            except RuntimeError as exc_one:
                raise ImageReadError(f, f"SimpleITK cannot read this DICOM file: {_first_line(exc_one)}") from exc
        raise ImageReadError(where, f"SimpleITK cannot read the DICOM series: {_first_line(exc)}") from exc
    if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
        raise ImageReadError(where, "not a grey-level 3-D image series")
    if len(files) > 2:
        _check_slice_spacing(where, reader, image)
    return image


def _check_slice_spacing(where: Path, reader: sitk.ImageSeriesReader, image: sitk.Image) -> None:
    """Warn about missing or duplicated slices, which GDCM reads silently onto a regular grid."""
    d = np.asarray(image.GetDirection(), dtype=float).reshape(3, 3)
    normal = d[:, 2]
    positions = []
    for i in range(image.GetSize()[2]):
        if not reader.HasMetaDataKey(i, "0020|0032"):
            return
        try:
            ipp = np.array([float(v) for v in reader.GetMetaData(i, "0020|0032").split("\\")])
        except ValueError:
            return
        positions.append(float(ipp @ normal))
    gaps = np.diff(np.asarray(positions))
    median = float(np.median(np.abs(gaps)))
    if median <= 0 or np.max(np.abs(np.abs(gaps) - median)) > max(0.05 * median, 0.01):
        warnings.warn(
            f"{where}: uneven slice spacing (gaps {np.min(np.abs(gaps)):.3g} to {np.max(np.abs(gaps)):.3g} mm): "
            "missing or duplicated slices?",
            ImageReadWarning,
            stacklevel=4,
        )


def _read_volume_file(path: Path) -> sitk.Image:
    if not is_nifti_file(path):
        raise ImageReadError(path, "not a NIfTI file (volumes are identified by their header; MetaImage and NRRD "
                                   "files are not read because they can reference other files)")
    try:
        image = sitk.ReadImage(str(path), imageIO="NiftiImageIO")
    except RuntimeError as exc:
        raise ImageReadError(path, f"cannot read image file: {_first_line(exc)}") from exc
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise ImageReadError(path, "expected a grey-level volume, got a multi-component (vector/RGB) image")
    if image.GetDimension() == 4 and image.GetSize()[3] == 1:
        image = image[:, :, :, 0]
    if image.GetDimension() != 3:
        raise ImageReadError(path, f"expected a 3-D volume, got a {image.GetDimension()}-D image")
    return image


def _truncation(path: Path) -> str | None:
    """Cheap check that a Part-10 file's encapsulated pixel data is complete; None when fine or not applicable."""
    import pydicom

    try:
        with open(path, "rb") as fh:
            if fh.read(132)[128:132] != b"DICM":
                return None
            size = fh.seek(0, os.SEEK_END)
            fh.seek(size - 8)
            if fh.read(8) == _SEQUENCE_DELIMITER:  # encapsulated pixel data, ends properly
                return None
            fh.seek(0)
            syntax = pydicom.filereader.read_file_meta_info(path).get("TransferSyntaxUID")
            if syntax is None or not syntax.is_encapsulated:
                return None  # GDCM skips truncated native files quickly; _dicom_problem names them
            fh.seek(0)
            ds = pydicom.dcmread(fh, stop_before_pixels=True)
            if "Rows" not in ds:
                return None
            syntax = ds.file_meta.get("TransferSyntaxUID")
            if syntax is None or syntax.is_deflated or not syntax.is_little_endian:
                return None
            start = fh.tell()
            element = fh.read(12)
    except Exception as exc:  # OSError, or any of pydicom's parse errors on a damaged header
        return f"broken DICOM file: {exc}"
    if len(element) < 8 or element[:4] != _PIXEL_DATA_TAG:
        return "truncated DICOM file: no pixel data"
    if syntax.is_implicit_VR:
        length, header_len = int.from_bytes(element[4:8], "little"), 8
    else:
        length, header_len = int.from_bytes(element[8:12], "little"), 12
    if length == 0xFFFFFFFF:
        return _encapsulated_truncation(path, start + header_len, size)
    if start + header_len + length > size:
        return f"truncated DICOM file: {size - start - header_len} of {length} pixel data bytes"
    return None


def _encapsulated_truncation(path: Path, offset: int, size: int) -> str | None:
    """Walk the fragment items of encapsulated pixel data; a missing end delimiter means truncation."""
    with open(path, "rb") as fh:
        while offset + 8 <= size:
            fh.seek(offset)
            item = fh.read(8)
            if item == _SEQUENCE_DELIMITER:
                return None
            if item[:4] != _ITEM_TAG:
                return "broken DICOM file: unexpected element inside encapsulated pixel data"
            offset += 8 + int.from_bytes(item[4:8], "little")
    return "truncated DICOM file: encapsulated pixel data is cut short"


def _dicom_problem(path: Path) -> str | None:
    """Why a file that claims to be a DICOM image cannot be one; None when fine or not DICOM at all."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        with open(path, "rb") as fh:
            head = fh.read(132)
    except OSError as exc:
        return f"cannot open file: {exc}"
    if head[128:132] != b"DICM":
        return None
    try:
        header = pydicom.dcmread(path, stop_before_pixels=True)
    except (InvalidDicomError, EOFError, OSError, ValueError, KeyError) as exc:
        return f"broken DICOM file: {exc}"
    sop_class = str(getattr(getattr(header, "file_meta", None), "MediaStorageSOPClassUID", ""))
    if sop_class == _DICOMDIR_SOP_CLASS or "Rows" not in header:
        return None
    try:
        ds = pydicom.dcmread(path)
    except (InvalidDicomError, EOFError, OSError, ValueError, KeyError) as exc:
        return f"broken DICOM file: {exc}"
    # pydicom returns a dataset without PixelData (and warns) when encapsulated pixel data is cut short;
    # the structure is checked, not the warning (`catch_warnings` is not thread-safe).
    if "PixelData" not in ds:
        return "truncated DICOM file: pixel data missing or cut short"
    if not ds.file_meta.get("TransferSyntaxUID", pydicom.uid.ImplicitVRLittleEndian).is_compressed:
        expected = (
            int(ds.Rows)
            * int(ds.Columns)
            * int(ds.get("SamplesPerPixel", 1) or 1)
            * int(ds.get("NumberOfFrames", 1) or 1)
            * int(ds.get("BitsAllocated", 16))
            // 8
        )
        if len(ds.PixelData) < expected:
            return f"truncated DICOM file: {len(ds.PixelData)} of {expected} pixel data bytes"
    return None


def read_ct_series_pydicom(folder: PathLike, series_uid: str | None = None) -> CTVolume:
    """Read a DICOM series with pydicom alone (own slice sort + Modality LUT) to cross-check SimpleITK."""
    import pydicom
    from pydicom.errors import InvalidDicomError
    from pydicom.pixels import apply_modality_lut

    root = Path(folder)
    if not root.is_dir():
        raise ImageReadError(root, "not a folder" if root.exists() else "no such file or folder")
    by_series: dict[str, list[pydicom.Dataset]] = {}
    for f in sorted(f for f in root.iterdir() if f.is_file() and not f.name.startswith(".")):
        try:
            ds = pydicom.dcmread(f)
        except InvalidDicomError:
            continue
        problem = _truncation(f) or _dicom_problem(f)  # structure, not warnings: no catch_warnings races
        if problem is not None:
            raise ImageReadError(f, problem)
        if "Rows" not in ds or "PixelData" not in ds:
            continue
        ds.filename = str(f)
        by_series.setdefault(str(ds.get("SeriesInstanceUID", "")), []).append(ds)
    if not by_series:
        raise ImageReadError(root, "no DICOM images found")
    slices = by_series[choose_series(root, by_series, series_uid)]
    iop = np.asarray([float(v) for v in slices[0].ImageOrientationPatient], dtype=float)
    row, col = iop[:3], iop[3:]
    normal = np.cross(row, col)
    slices.sort(key=lambda ds: float(np.dot([float(v) for v in ds.ImagePositionPatient], normal)))
    positions = np.asarray([[float(v) for v in ds.ImagePositionPatient] for ds in slices])
    try:
        stack = np.stack([apply_modality_lut(ds.pixel_array, ds).astype(np.float32) for ds in slices])
    except Exception as exc:  # decoder errors come in many types; name the series
        raise ImageReadError(root, f"pydicom cannot decode the pixel data: {exc}") from exc
    row_mm, col_mm = (float(v) for v in slices[0].PixelSpacing)
    if len(slices) > 1:
        z_mm = float(np.dot(positions[-1] - positions[0], normal)) / (len(slices) - 1)
    else:
        z_mm = float(slices[0].get("SliceThickness", 1.0) or 1.0)
    image = sitk.GetImageFromArray(stack)
    image.SetSpacing((col_mm, row_mm, z_mm))
    image.SetOrigin(tuple(float(v) for v in positions[0]))
    image.SetDirection(tuple(float(v) for v in np.column_stack([row, col, normal]).ravel()))
    return ct_from_image(image, root)


def _first_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    useful = [line for line in lines if "ERROR" in line.upper()] or lines
    return useful[0] if useful else type(exc).__name__
