"""Writers for synthetic studies: CT DICOM series, lateral radiograph DICOM, NIfTI masks, keypoints JSON."""
from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.valuerep import format_number_as_ds
from pydicom.uid import ExplicitVRLittleEndian

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
DX_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.1.1"   # Digital X-Ray Image Storage - For Presentation
IMPLEMENTATION_UID = "2.25.211239178640447391254410593455346417873"
CT_INTERCEPT = -1024


def det_uid(*parts: object) -> str:
    """A deterministic DICOM UID (2.25 form) derived from ``parts`` (e.g. seed, patient index, role)."""
    h = hashlib.sha256(repr(parts).encode()).digest()[:16]
    return "2.25." + str(int.from_bytes(h, "big"))


def _file_meta(sop_class: str, sop_uid: str) -> FileMetaDataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = IMPLEMENTATION_UID
    return meta


def _patient_study(ds: Dataset, patient: dict[str, object], study_uid: str, study_id: str) -> None:
    ds.PatientID = str(patient["patient_id"])
    ds.PatientName = f"SYNTH^{patient['patient_id']}"
    ds.PatientSex = str(patient["sex"])
    ds.PatientAge = f"{int(float(patient['age'])):03d}Y"
    ds.PatientBirthDate = ""
    ds.StudyInstanceUID = study_uid
    ds.StudyID = study_id[-16:]
    ds.AccessionNumber = ""
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = "20200101"
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = "120000"
    ds.ReferringPhysicianName = ""
    ds.Manufacturer = "raypipe-synth"
    ds.InstitutionName = f"Synthetic site {patient['site']}"
    ds.PatientIdentityRemoved = "YES"


def write_ct_series(folder: Path, hu: np.ndarray, spacing: tuple[float, float, float],
                    origin: tuple[float, float, float], patient: dict[str, object], study_id: str,
                    uid_parts: tuple[object, ...]) -> None:
    """One axial DICOM file per slice; ``hu`` is (z, y, x) int16 with z = 0 inferior (LPS, IOP 1/0/0/0/1/0)."""
    folder.mkdir(parents=True, exist_ok=True)
    study_uid = det_uid(*uid_parts, "CT", "study")
    series_uid = det_uid(*uid_parts, "CT", "series")
    for_uid = det_uid(*uid_parts, "CT", "frame")
    stored = (hu.astype(np.int32) - CT_INTERCEPT).clip(0, 4095).astype(np.uint16)
    nz, ny, nx = hu.shape
    ds = Dataset()
    _patient_study(ds, patient, study_uid, study_id)
    ds.SOPClassUID = CT_IMAGE_STORAGE
    ds.Modality = "CT"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.SeriesInstanceUID = series_uid
    ds.SeriesNumber = 2
    ds.SeriesDescription = "ABDOMEN 5.0 SYNTH"
    ds.FrameOfReferenceUID = for_uid
    ds.PositionReferenceIndicator = ""
    ds.BodyPartExamined = "ABDOMEN"
    ds.PatientPosition = "FFS"
    ds.KVP = 120
    ds.ConvolutionKernel = "STANDARD"
    ds.SliceThickness = spacing[2]
    ds.SpacingBetweenSlices = spacing[2]
    ds.PixelSpacing = [spacing[1], spacing[0]]        # row spacing (y), column spacing (x)
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.Rows, ds.Columns = ny, nx
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 12, 11
    ds.PixelRepresentation = 0
    ds.RescaleIntercept = CT_INTERCEPT
    ds.RescaleSlope = 1
    ds.RescaleType = "HU"
    ds.WindowCenter, ds.WindowWidth = 40, 400
    _write_slices(folder, ds, stored, origin, spacing[2], uid_parts)


# Per-slice elements; everything else is encoded once per series (4x cheaper than pydicom save_as per slice).
_SOP_UID, _INSTANCE, _IPP, _SLICE_LOC, _PIXEL = 0x00080018, 0x00200013, 0x00200032, 0x00201041, 0x7FE00010


def _el(tag: int, vr: str, value: bytes) -> bytes:
    """One explicit-VR little-endian data element."""
    if len(value) % 2:
        value += b"\0" if vr in ("UI", "OB") else b" "
    if vr in ("OB", "OW", "UN", "UT", "SQ"):
        return struct.pack("<HH2sHI", tag >> 16, tag & 0xFFFF, vr.encode(), 0, len(value)) + value
    return struct.pack("<HH2sH", tag >> 16, tag & 0xFFFF, vr.encode(), len(value)) + value


def _encode(ds: Dataset) -> bytes:
    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, False
    write_dataset(fp, ds)
    return fp.getvalue()


def _meta(sop_class: str, sop_uid: str) -> bytes:
    body = (_el(0x00020001, "OB", b"\x00\x01") + _el(0x00020002, "UI", sop_class.encode())
            + _el(0x00020003, "UI", sop_uid.encode()) + _el(0x00020010, "UI", ExplicitVRLittleEndian.encode())
            + _el(0x00020012, "UI", IMPLEMENTATION_UID.encode()))
    return b"\0" * 128 + b"DICM" + struct.pack("<HH2sHI", 2, 0, b"UL", 4, len(body)) + body


def _write_slices(folder: Path, ds: Dataset, stored: np.ndarray, origin: tuple[float, float, float],
                  dz: float, uid_parts: tuple[object, ...]) -> None:
    cuts = (_SOP_UID, _INSTANCE, _IPP, _SLICE_LOC, _PIXEL)
    parts, lo = [], 0
    for hi in cuts:
        sub = Dataset()
        for elem in ds:
            if lo < elem.tag < hi:
                sub.add(elem)
        parts.append(_encode(sub))
        lo = hi
    nz = stored.shape[0]
    for k in range(nz):
        sop_uid = det_uid(*uid_parts, "CT", "sop", k)
        zk = round(origin[2] + k * dz, 3)
        ipp = "\\".join(format_number_as_ds(float(v)) for v in (origin[0], origin[1], zk))
        blob = b"".join((
            _meta(CT_IMAGE_STORAGE, sop_uid), parts[0], _el(_SOP_UID, "UI", sop_uid.encode()), parts[1],
            _el(_INSTANCE, "IS", str(nz - k).encode()), parts[2], _el(_IPP, "DS", ipp.encode()), parts[3],
            _el(_SLICE_LOC, "DS", format_number_as_ds(float(zk)).encode()), parts[4],
            _el(_PIXEL, "OW", stored[k].tobytes()),
        ))
        (folder / f"IM{nz - k:04d}.dcm").write_bytes(blob)


def write_nifti_masks(folder: Path, masks: dict[str, np.ndarray], spacing: tuple[float, float, float],
                      origin: tuple[float, float, float]) -> None:
    """uint8 NIfTI per mask on the CT grid (SimpleITK writes the LPS geometry as RAS in the header)."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, arr in masks.items():
        img = sitk.GetImageFromArray(np.ascontiguousarray(arr, dtype=np.uint8))
        img.SetSpacing(tuple(float(v) for v in spacing))
        img.SetOrigin(tuple(float(v) for v in origin))
        img.SetDirection((1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0))
        sitk.WriteImage(img, str(folder / f"{name}.nii.gz"), True, 1)


def write_radiograph(path: Path, pixels: np.ndarray, pixel_spacing: float, patient: dict[str, object],
                     study_id: str, uid_parts: tuple[object, ...]) -> None:
    """Lateral lumbar DX image, MONOCHROME2, 16 bits allocated / 12 stored."""
    path.parent.mkdir(parents=True, exist_ok=True)
    sop_uid = det_uid(*uid_parts, "XR", "sop")
    ds = Dataset()
    ds.file_meta = _file_meta(DX_IMAGE_STORAGE, sop_uid)
    _patient_study(ds, patient, det_uid(*uid_parts, "XR", "study"), study_id)
    ds.SOPClassUID = DX_IMAGE_STORAGE
    ds.SOPInstanceUID = sop_uid
    ds.Modality = "DX"
    ds.PresentationIntentType = "FOR PRESENTATION"
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.SeriesInstanceUID = det_uid(*uid_parts, "XR", "series")
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.SeriesDescription = "L-SPINE LAT SYNTH"
    ds.BodyPartExamined = "LSPINE"
    ds.ViewPosition = "LL"
    ds.PatientOrientation = ["P", "F"]
    ds.KVP = 85
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 12, 11
    ds.PixelRepresentation = 0
    ds.PixelSpacing = [pixel_spacing, pixel_spacing]
    ds.ImagerPixelSpacing = [pixel_spacing, pixel_spacing]
    ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = 0, 1, "US"
    ds.WindowCenter, ds.WindowWidth = 2048, 4096
    ds.PixelData = np.ascontiguousarray(pixels, dtype=np.uint16).tobytes()
    ds.save_as(path, enforce_file_format=True)


def write_json(path: Path, obj: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=1, sort_keys=True))

