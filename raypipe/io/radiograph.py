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
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

import numpy as np

from raypipe import storage
from raypipe.io.errors import ImageReadError, ImageReadWarning

if TYPE_CHECKING:
    from pydicom import Dataset

logger = logging.getLogger(__name__)

PathLike = str | os.PathLike[str]
RASTER_SUFFIXES: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
# Raster formats are recognised by their magic bytes, never by the file name.
_RASTER_MAGIC: tuple[bytes, ...] = (b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"II*\x00", b"MM\x00*", b"BM")
MAX_PIXELS = 25 * 1024 * 1024  # rows x cols x frames x samples decoded at most (a 5k x 5k radiograph)


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
    """True when the file starts with PNG/JPEG/TIFF/BMP magic bytes (read with Pillow instead of pydicom)."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(8)
    except OSError:
        return False
    return head.startswith(_RASTER_MAGIC)


@storage.localized("path")  # DICOM/PNG on object stores: fetched to a task-local temp dir
def read_radiograph(path: PathLike, max_pixels: int = MAX_PIXELS) -> Radiograph:
    """Read a DICOM or PNG/JPEG radiograph into [0, 1] float32 with bone bright (see module docstring).

    The image size declared in the header is checked against `max_pixels` before any pixel is decoded.
    """
    p = Path(path)
    if not p.exists():
        raise ImageReadError(p, "no such file")
    if p.is_dir():
        raise ImageReadError(p, "expected a radiograph file, got a folder")
    if is_raster_file(p):
        return _read_raster(p, max_pixels)
    return _read_dicom_radiograph(p, max_pixels)


def read_radiograph_bytes(data: bytes, label: str = "image", max_pixels: int = MAX_PIXELS) -> Radiograph:
    """`read_radiograph` of an in-memory upload (no temp file); `label` names it in errors instead of a path."""
    import io

    src = io.BytesIO(data)
    if data[:8].startswith(_RASTER_MAGIC):
        return _read_raster(src, max_pixels, label)
    return _read_dicom_radiograph(src, max_pixels, label)


def read_dicom_header(path: PathLike) -> Dataset:
    """The DICOM header (no pixels) read leniently, for deciding what a file is."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        return pydicom.dcmread(path, stop_before_pixels=True, force=True)
    except (InvalidDicomError, EOFError, OSError, ValueError, KeyError) as exc:
        raise ImageReadError(path, f"not a readable DICOM file: {exc}") from exc


def write_radiograph_png(path: PathLike, image: Radiograph | np.ndarray, bits: int = 16) -> Path | str:
    """Write [0, 1] pixels as an 8- or 16-bit grey PNG, readable by `read_radiograph`; atomically (local temp name
    and rename, one PUT on object stores). Returns the local `Path`, or the URI as given."""
    import io

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
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    storage.atomic_write_bytes(path, buf.getvalue())
    return str(path) if storage.is_uri(path) else Path(storage.local_path(path))


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


def _read_raster(src: Path | BinaryIO, max_pixels: int = MAX_PIXELS, label: str | None = None) -> Radiograph:
    from PIL import Image, UnidentifiedImageError

    path = Path(label) if label is not None else src
    try:
        with Image.open(src, formats=["PNG", "JPEG", "TIFF", "BMP"]) as img:
            w, h = img.size
            if w * h * max(1, len(img.getbands())) > max_pixels:
                raise ImageReadError(path, f"image has {w}x{h} pixels; at most {max_pixels} allowed", field="pixels")
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
    except ImageReadError:
        raise  # the size refusal above keeps its own message (it is a ValueError too)
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, ValueError, SyntaxError) as exc:
        raise ImageReadError(path, f"cannot read image: {type(exc).__name__}") from exc
    pixels = np.clip(arr / top, 0.0, 1.0).astype(np.float32)
    if not np.isfinite(pixels).all():
        raise ImageReadError(path, "image holds NaN or infinite values", field="pixels")
    return Radiograph(pixels=pixels, pixel_spacing=None, photometric="MONOCHROME2", path=str(path))


def _read_dicom_radiograph(src: Path | BinaryIO, max_pixels: int = MAX_PIXELS, label: str | None = None) -> Radiograph:
    import pydicom
    from pydicom.dataset import FileMetaDataset
    from pydicom.errors import InvalidDicomError
    from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

    # Truncation is detected from the dataset's structure, not from warnings: `warnings.catch_warnings`
    # is process-global, so under concurrent requests one file's warning could fail another's read.
    path = Path(label) if label is not None else src
    try:
        ds = pydicom.dcmread(src, force=True)
    except Exception as exc:  # noqa: BLE001 - pydicom raises many types on damaged headers
        raise ImageReadError(path, f"not a readable DICOM file ({type(exc).__name__})") from exc
    if "PixelData" not in ds:
        if len(ds) == 0 or "Rows" not in ds:
            raise ImageReadError(path, "not a DICOM image (no header or no pixel data); truncated?")
        raise ImageReadError(path, "DICOM file has no pixel data (truncated?)")
    _check_declared_size(path, ds, max_pixels)
    meta = getattr(ds, "file_meta", None)
    if meta is None:
        ds.file_meta = meta = FileMetaDataset()
    if "TransferSyntaxUID" not in meta:
        # Files without a file meta header (no "DICM" preamble): use the encoding pydicom detected.
        implicit, _little = getattr(ds, "original_encoding", (True, True))
        meta.TransferSyntaxUID = ImplicitVRLittleEndian if implicit in (True, None) else ExplicitVRLittleEndian
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip().upper()
    try:
        if int(str(ds.get("NumberOfFrames", 1) or 1)) > 1:
            ds.pixel_array_options(index=0)  # decode the frame used, not all of them
        raw = ds.pixel_array
    except Exception as exc:  # decoder plugins raise many exception types
        raise ImageReadError(path, f"cannot decode pixel data ({type(exc).__name__}); truncated?") from exc
    raw = _single_grey_frame(path, raw, ds, photometric)
    try:
        pixels = _to_display(path, raw, ds)
    except ImageReadError:
        raise
    except (ValueError, TypeError, IndexError, KeyError, AttributeError, OverflowError, ZeroDivisionError) as exc:
        raise ImageReadError(path, f"unusable rescale / Modality LUT / VOI LUT in the header ({type(exc).__name__})",
                             field="lut") from exc
    if not np.isfinite(pixels).all():
        raise ImageReadError(path, "rescale or LUT gives non-finite pixel values", field="lut")
    if photometric == "MONOCHROME1":
        pixels = 1.0 - pixels
    return Radiograph(
        pixels=np.ascontiguousarray(pixels, dtype=np.float32),
        pixel_spacing=_pixel_spacing(ds),
        photometric=photometric,
        path=str(path),
        modality=str(ds.get("Modality", "")),
    )


def _check_declared_size(path: Path, ds: Dataset, max_pixels: int) -> None:
    """Rows x Columns x frames x samples from the header against `max_pixels`, before decoding (ImageReadError)."""
    try:
        rows, cols = int(ds.get("Rows") or 0), int(ds.get("Columns") or 0)
        frames = int(str(ds.get("NumberOfFrames", 1) or 1))
        samples = int(ds.get("SamplesPerPixel", 1) or 1)
        slope, intercept = float(ds.get("RescaleSlope", 1) or 1), float(ds.get("RescaleIntercept", 0) or 0)
    except (TypeError, ValueError, OverflowError) as exc:
        raise ImageReadError(path, f"non-numeric image dimensions or rescale in the header ({type(exc).__name__})",
                             field="header") from exc
    if rows < 1 or cols < 1 or frames < 1 or samples < 1:
        raise ImageReadError(path, "empty image dimensions in the header", field="header")
    if rows * cols * samples > max_pixels or frames > 4096:  # one frame is decoded
        raise ImageReadError(path, f"image has {rows}x{cols}x{samples} pixels x {frames} frames; "
                                   f"at most {max_pixels} pixels allowed", field="pixels")
    if not (np.isfinite(slope) and np.isfinite(intercept) and slope != 0 and abs(slope) < 1e6 and abs(intercept) < 1e9):
        raise ImageReadError(path, "implausible RescaleSlope/RescaleIntercept", field="rescale")


def _single_grey_frame(path: Path, raw: np.ndarray, ds: Dataset, photometric: str) -> np.ndarray:
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    if frames > 1:
        warnings.warn(f"{path}: {frames} frames, using the first", ImageReadWarning, stacklevel=4)
        if raw.ndim == (4 if samples > 1 else 3):  # decoders that ignore the frame index
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
