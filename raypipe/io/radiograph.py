"""Radiographs (DICOM CR/DX/MG/localizer, PNG, JPEG) as float32 images in [0, 1] with bone bright.

Display convention, and why raypipe always reads DICOM radiographs through pydicom:
- pydicom's `pixel_array` returns the stored values; for MONOCHROME1 (e.g. most CR) that means bone
  DARK. SimpleITK/GDCM instead inverts MONOCHROME1 on read (`(2**BitsStored - 1) - raw`), silently.
- The header's VOI (WindowCenter/WindowWidth, VOI LUT Sequence) refers to the values *after* the
  Modality LUT / rescale of the *raw* pixels, i.e. pydicom's values, not SimpleITK's inverted ones.
- So the pipeline is: raw pixels -> Modality LUT (or rescale) -> VOI (first VOI LUT, else first
  window, else min-max of the image) -> scale to [0, 1] -> invert MONOCHROME1 (after the VOI) so
  that 1.0 is white and bone (attenuating) is bright for every file.
PNG/JPEG files are taken as already displayed (bone bright): 8-bit / 16-bit grey levels divided by
the format's maximum. Pixel spacing is `(row, col)` mm from PixelSpacing or ImagerPixelSpacing;
unusable values ("0\\0") give None.
"""

from __future__ import annotations

import logging
import os
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from raypipe import storage
from raypipe.io.errors import ImageReadError, ImageReadWarning

if TYPE_CHECKING:
    from pydicom import Dataset

logger = logging.getLogger(__name__)

PathLike = str | os.PathLike[str]
RASTER_SUFFIXES: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")


@dataclass(frozen=True, eq=False)
class Radiograph:
    """A radiograph ready for models: `pixels` float32 (rows, cols) in [0, 1], bone bright."""

    pixels: np.ndarray
    pixel_spacing: tuple[float, float] | None
    photometric: str
    path: str
    modality: str = ""

    @property
    def shape(self) -> tuple[int, int]:
        """`(rows, cols)`."""
        return (int(self.pixels.shape[0]), int(self.pixels.shape[1]))


def is_raster_file(path: PathLike) -> bool:
    """True for PNG/JPEG/TIFF names, which are read with Pillow instead of pydicom."""
    return str(path).lower().endswith(RASTER_SUFFIXES)


@storage.localized("path")  # DICOM/PNG on object stores: fetched to a task-local temp dir
def read_radiograph(path: PathLike) -> Radiograph:
    """Read a DICOM or PNG/JPEG radiograph into [0, 1] float32 with bone bright (see module docstring)."""
    p = Path(path)
    if not p.exists():
        raise ImageReadError(p, "no such file")
    if p.is_dir():
        raise ImageReadError(p, "expected a radiograph file, got a folder")
    if is_raster_file(p):
        return _read_raster(p)
    return _read_dicom_radiograph(p)


def read_dicom_header(path: PathLike) -> Dataset:
    """The DICOM header (no pixels) read leniently, for deciding what a file is."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        return pydicom.dcmread(path, stop_before_pixels=True, force=True)
    except (InvalidDicomError, EOFError, OSError, ValueError, KeyError) as exc:
        raise ImageReadError(path, f"not a readable DICOM file: {exc}") from exc


def write_radiograph_png(path: PathLike, image: Radiograph | np.ndarray, bits: int = 16) -> Path:
    """Write [0, 1] pixels as an 8- or 16-bit grey PNG (atomically), readable by `read_radiograph`."""
    from PIL import Image

    if bits not in (8, 16):
        raise ValueError(f"bits must be 8 or 16, got {bits}")
    pixels = image.pixels if isinstance(image, Radiograph) else np.asarray(image)
    if pixels.ndim != 2:
        raise ValueError(f"expected a 2-D (rows, cols) image, got shape {pixels.shape}")
    if not np.all(np.isfinite(pixels)):
        raise ValueError("image has NaN or infinite pixels")
    top = (1 << bits) - 1
    scaled = np.rint(np.clip(pixels.astype(np.float64), 0.0, 1.0) * top)
    arr = scaled.astype(np.uint16 if bits == 16 else np.uint8)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            Image.fromarray(arr).save(fh, format="PNG")
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return out


def window_to_unit(values: np.ndarray, center: float, width: float, function: str = "LINEAR") -> np.ndarray:
    """DICOM VOI windowing (PS3.3 C.11.2.1.2) straight to [0, 1], independent of the stored bit depth."""
    x = np.asarray(values, dtype=np.float64)
    fn = (function or "LINEAR").strip().upper()
    if fn == "SIGMOID":
        return 1.0 / (1.0 + np.exp(-4.0 * (x - center) / width))
    if fn == "LINEAR_EXACT":
        return np.clip((x - center) / width + 0.5, 0.0, 1.0)
    if width < 1:
        raise ValueError(f"LINEAR window width must be >= 1, got {width}")
    if width == 1:
        return (x > center - 0.5).astype(np.float64)
    return np.clip((x - (center - 0.5)) / (width - 1) + 0.5, 0.0, 1.0)


def _read_raster(path: Path) -> Radiograph:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            img.load()
            mode = img.mode
            if mode in ("I;16", "I;16B", "I;16L", "I"):
                arr = np.asarray(img).astype(np.float64)
                top = 65535.0 if mode.startswith("I;16") or arr.max(initial=0) > 255 else 255.0
            elif mode == "F":
                arr = np.asarray(img).astype(np.float64)
                top = 1.0
            else:
                arr = np.asarray(img.convert("L")).astype(np.float64)
                top = 255.0
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise ImageReadError(path, f"cannot read image: {exc}") from exc
    pixels = np.clip(arr / top, 0.0, 1.0).astype(np.float32)
    return Radiograph(pixels=pixels, pixel_spacing=None, photometric="MONOCHROME2", path=str(path))


def _read_dicom_radiograph(path: Path) -> Radiograph:
    import pydicom
    from pydicom.dataset import FileMetaDataset
    from pydicom.errors import InvalidDicomError
    from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            ds = pydicom.dcmread(path, force=True)
        except (InvalidDicomError, EOFError, OSError, ValueError, KeyError) as exc:
            raise ImageReadError(path, f"not a readable DICOM file: {exc}") from exc
    if any("end of file" in str(w.message).lower() for w in caught):
        raise ImageReadError(path, "truncated DICOM file: pixel data missing or cut short")
    if "PixelData" not in ds:
        if len(ds) == 0 or "Rows" not in ds:
            raise ImageReadError(path, "not a DICOM image (no header or no pixel data); truncated?")
        raise ImageReadError(path, "DICOM file has no pixel data")
    meta = getattr(ds, "file_meta", None)
    if meta is None:
        ds.file_meta = meta = FileMetaDataset()
    if "TransferSyntaxUID" not in meta:
        # Files without a file meta header (no "DICM" preamble): use the encoding pydicom detected.
        implicit, _little = getattr(ds, "original_encoding", (True, True))
        meta.TransferSyntaxUID = ImplicitVRLittleEndian if implicit in (True, None) else ExplicitVRLittleEndian
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip().upper()
    try:
        raw = ds.pixel_array
    except Exception as exc:  # decoder plugins raise many exception types
        raise ImageReadError(path, f"cannot decode pixel data ({meta.TransferSyntaxUID.name}): {exc}") from exc
    raw = _single_grey_frame(path, raw, ds, photometric)
    pixels = _to_display(path, raw, ds)
    if photometric == "MONOCHROME1":
        pixels = 1.0 - pixels
    return Radiograph(
        pixels=np.ascontiguousarray(pixels, dtype=np.float32),
        pixel_spacing=_pixel_spacing(ds),
        photometric=photometric,
        path=str(path),
        modality=str(ds.get("Modality", "")),
    )


def _single_grey_frame(path: Path, raw: np.ndarray, ds: Dataset, photometric: str) -> np.ndarray:
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    if frames > 1:
        warnings.warn(f"{path}: {frames} frames, using the first", ImageReadWarning, stacklevel=4)
        raw = raw[0]
    if samples > 1 or raw.ndim == 3:
        warnings.warn(f"{path}: colour image ({photometric}), converted to grey", ImageReadWarning, stacklevel=4)
        rgb = raw.astype(np.float64)
        raw = rgb[..., 0] * 0.299 + rgb[..., 1] * 0.587 + rgb[..., 2] * 0.114
    if raw.ndim != 2:
        raise ImageReadError(path, f"expected a 2-D image, got pixel array shape {raw.shape}")
    return raw


def _to_display(path: Path, raw: np.ndarray, ds: Dataset) -> np.ndarray:
    """Modality LUT then VOI, scaled to [0, 1] (before any MONOCHROME1 inversion)."""
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    values = apply_modality_lut(raw, ds) if int(ds.get("SamplesPerPixel", 1) or 1) == 1 else raw
    if "VOILUTSequence" in ds and len(ds.VOILUTSequence) > 0:
        item = ds.VOILUTSequence[0]
        if np.issubdtype(np.asarray(values).dtype, np.floating):
            values = np.rint(values).astype(np.int64)  # LUT lookup needs integer inputs
        out = apply_voi_lut(values, ds, index=0, prefer_lut=True).astype(np.float64)
        bits = int(item.LUTDescriptor[2])
        top = max(float((1 << bits) - 1), float(np.max(np.asarray(item.LUTData))))
        return np.clip(out / top, 0.0, 1.0)
    window = _first_window(ds)
    if window is not None:
        center, width = window
        return window_to_unit(values, center, width, str(ds.get("VOILUTFunction", "LINEAR")))
    x = np.asarray(values, dtype=np.float64)
    lo, hi = float(x.min()), float(x.max())
    logger.debug("%s: no VOI LUT or window; min-max scaling", path)
    return (x - lo) / (hi - lo) if hi > lo else np.zeros_like(x)


def _first_window(ds: Dataset) -> tuple[float, float] | None:
    center, width = ds.get("WindowCenter"), ds.get("WindowWidth")
    if center is None or width is None:
        return None
    try:
        c = float(center[0] if _is_multi(center) else center)
        w = float(width[0] if _is_multi(width) else width)
    except (TypeError, ValueError, IndexError):
        return None
    if not (np.isfinite(c) and np.isfinite(w)) or w < 1:
        return None
    return c, w


def _is_multi(value: object) -> bool:
    return isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue"


def _pixel_spacing(ds: Dataset) -> tuple[float, float] | None:
    for keyword in ("PixelSpacing", "ImagerPixelSpacing"):
        value = ds.get(keyword)
        if value is None:
            continue
        try:
            row, col = (float(v) for v in value)
        except (TypeError, ValueError):
            continue
        if np.isfinite(row) and np.isfinite(col) and row > 0 and col > 0:
            return (row, col)
    return None
