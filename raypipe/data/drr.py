"""`raypipe synth drr`: a lateral DRR of a real CT plus its L1-L5 keypoints, as a one-study X-ray cohort.

Why: real lateral spine radiographs with annotated body centres are rarely shareable; a CT with vertebra
masks gives both the image and exact keypoints (mask centroids projected through the same geometry), so
the X-ray branch (keypoint model, alignment, patches, pipeline) can be tested on real anatomy.

OUT holds (each written temp-then-rename):
  drr.png         16-bit grey PNG, bone bright
  drr.dcm         DICOM Digital X-Ray (For Presentation), MONOCHROME2, 16 bits, PixelSpacing at the
                  isocentre and ImagerPixelSpacing at the detector, PatientOrientation P\\F (left lateral)
  keypoints.json  {"L1": [x, y], ..., "L5": [x, y]} in drr pixels (raypipe.io.keypoints format)
  manifest.csv    one XR row pointing at drr.dcm and keypoints.json; the CT carries no outcome, so
                  time_days/event are placeholders from the config (censored, no event)
  drr.json        geometry and provenance (CT path, levels, centroids in world mm)
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import os
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import Field

from raypipe import storage
from raypipe.config import StrictModel
from raypipe.io.errors import MaskError

log = logging.getLogger(__name__)

DX_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.1.1"  # Digital X-Ray Image Storage - For Presentation
IMPLEMENTATION_UID = "2.25.211239178640447391254410593455346417874"


class DRRConfig(StrictModel):
    """Geometry and labelling of a synthetic lateral radiograph (see raypipe/preprocess/drr.py)."""

    geometry: Literal["parallel", "cone"] = Field("cone", description="divergent (realistic) or parallel rays")
    source_distance_mm: float = Field(1000.0, gt=0, description="source to isocentre")
    detector_distance_mm: float = Field(200.0, ge=0, description="isocentre to detector")
    pixel_mm: float | None = Field(None, gt=0, description="detector pixel; default: CT in-plane resolution x magnification")
    isocentre: Literal["spine", "volume"] = Field("spine", description="central ray through the L1-L5 centroid or the CT centre")
    enhance: float = Field(0.7, ge=0, lt=1, description="unsharp-mask strength of the radiograph look")
    levels: tuple[str, ...] = Field(("L1", "L2", "L3", "L4", "L5"), description="keypoint levels, top first")
    mask_labels: str | None = Field(None, description="label map of a multilabel mask file (totalseg, verse, JSON)")
    body_mask_path: str | None = Field(None, description="optional vertebral-body mask (label 1) for body centroids")
    patient_id: str | None = Field(None, description="default: DRR_ + a hash of the CT path (no identifiers copied)")
    study_id: str | None = Field(None, description="default: patient_id + _XR")
    time_days: float = Field(3650.0, gt=0, description="placeholder follow-up for the manifest row")
    event: int = Field(0, ge=0, le=1, description="placeholder event for the manifest row")


def _uid(*parts: object) -> str:
    """Deterministic 2.25 UID, so re-running on the same CT gives the same DICOM identity."""
    return "2.25." + str(int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:16], "big"))


def to_uint16(image: np.ndarray) -> np.ndarray:
    """[0, 1] float image -> full-range uint16 (the stored pixel values of PNG and DICOM)."""
    return np.round(np.clip(np.asarray(image, dtype=np.float64), 0.0, 1.0) * 65535.0).astype(np.uint16)


def png_bytes(image: np.ndarray) -> bytes:
    """16-bit greyscale PNG of a [0, 1] image."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(to_uint16(image)).save(buf, format="PNG")
    return buf.getvalue()


def dicom_bytes(image: np.ndarray, geometry: Any, patient_id: str, study_id: str, source: str) -> bytes:
    """A DX For Presentation DICOM of the DRR (MONOCHROME2, 16 bits) with real geometry tags."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian

    pixels = to_uint16(image)
    sop = _uid(source, patient_id, study_id, "sop")
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = DX_IMAGE_STORAGE
    meta.MediaStorageSOPInstanceUID = sop
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = IMPLEMENTATION_UID
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = DX_IMAGE_STORAGE
    ds.SOPInstanceUID = sop
    ds.StudyInstanceUID = _uid(source, patient_id, study_id, "study")
    ds.SeriesInstanceUID = _uid(source, patient_id, study_id, "series")
    ds.PatientID = patient_id
    ds.PatientName = f"DRR^{patient_id}"
    ds.PatientBirthDate = ""
    ds.PatientSex = ""
    ds.PatientIdentityRemoved = "YES"
    ds.StudyID = study_id[-16:]
    ds.AccessionNumber = ""
    ds.ReferringPhysicianName = ""
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = ""
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = ""
    ds.Modality = "DX"
    ds.Manufacturer = "raypipe"
    ds.SeriesDescription = "L-SPINE LAT DRR"
    ds.ImageType = ["DERIVED", "SECONDARY"]
    ds.DerivationDescription = f"digitally reconstructed radiograph ({geometry.kind} beam) from a CT"
    ds.PresentationIntentType = "FOR PRESENTATION"
    ds.BodyPartExamined = "LSPINE"
    ds.ViewPosition = "LL"
    ds.PatientOrientation = ["P", "F"]
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
    ds.PixelRepresentation = 0
    iso = round(float(geometry.pixel_mm_at_isocentre), 6)
    det = round(float(geometry.pixel_mm), 6)
    ds.PixelSpacing = [iso, iso]
    ds.ImagerPixelSpacing = [det, det]
    ds.PixelSpacingCalibrationType = "GEOMETRY"
    ds.EstimatedRadiographicMagnificationFactor = round(float(geometry.magnification), 6)
    if geometry.kind == "cone":
        ds.DistanceSourceToDetector = round(geometry.source_distance_mm + geometry.detector_distance_mm, 3)
        ds.DistanceSourceToPatient = round(geometry.source_distance_mm, 3)
    ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = 0, 1, "US"
    ds.WindowCenter, ds.WindowWidth = 32768, 65536
    ds.PixelData = np.ascontiguousarray(pixels).tobytes()
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def synth_drr(
    ct_path: str | os.PathLike, masks_path: str | os.PathLike, out_dir: str | os.PathLike,
    config: DRRConfig | None = None,
) -> dict[str, Any]:
    """Write a lateral DRR of `ct_path` with L1-L5 keypoints from `masks_path` into `out_dir` (module doc)."""
    from raypipe.io.ct import read_ct
    from raypipe.io.masks import read_body_mask, read_masks
    from raypipe.preprocess.drr import lateral_drr, project_points, vertebra_centres

    cfg = config or DRRConfig()
    ct = read_ct(ct_path)
    names = [f"vertebrae_{lvl}" for lvl in cfg.levels] + ["vertebral_body"]
    masks = read_masks(masks_path, ct, labels=cfg.mask_labels, names=names)
    body = read_body_mask(cfg.body_mask_path, ct) if cfg.body_mask_path else None
    centres = vertebra_centres(masks, ct, cfg.levels, body_mask=body)
    missing = [lvl for lvl in cfg.levels if lvl not in centres]
    if missing:
        raise MaskError(masks_path, f"no mask voxels for {', '.join(missing)}: cannot place keypoints",
                        field="levels", value=missing)
    world = np.stack([centres[lvl] for lvl in cfg.levels])
    iso = world.mean(axis=0) if cfg.isocentre == "spine" else None
    drr = lateral_drr(ct, cfg.geometry, cfg.source_distance_mm, cfg.detector_distance_mm, cfg.pixel_mm,
                      isocentre_mm=iso, enhance=cfg.enhance)
    kp = project_points(world, drr.geometry)
    source = str(Path(ct_path).resolve())
    pid = cfg.patient_id or "DRR_" + hashlib.sha1(source.encode()).hexdigest()[:8].upper()
    sid = cfg.study_id or f"{pid}_XR"
    out = str(out_dir)
    storage.makedirs(out)
    storage.atomic_write_bytes(storage.join(out, "drr.png"), png_bytes(drr.image))
    storage.atomic_write_bytes(storage.join(out, "drr.dcm"), dicom_bytes(drr.image, drr.geometry, pid, sid, source))
    storage.atomic_write_json(storage.join(out, "keypoints.json"),
                              {lvl: [float(x), float(y)] for lvl, (x, y) in zip(cfg.levels, kp)})
    row = {"patient_id": pid, "study_id": sid, "modality": "XR", "image_path": "drr.dcm",
           "time_days": cfg.time_days, "event": cfg.event, "keypoints_path": "keypoints.json", "site": "drr"}
    buf = io.StringIO()
    import pandas as pd

    pd.DataFrame([row]).to_csv(buf, index=False)
    storage.atomic_write_text(storage.join(out, "manifest.csv"), buf.getvalue())
    g = drr.geometry
    info = {
        "ct_path": source, "masks_path": str(Path(masks_path).resolve()), "geometry": g.kind,
        "rows": g.rows, "cols": g.cols, "pixel_mm_detector": g.pixel_mm, "pixel_mm_isocentre": g.pixel_mm_at_isocentre,
        "magnification": g.magnification, "source_distance_mm": g.source_distance_mm if g.kind == "cone" else None,
        "detector_distance_mm": g.detector_distance_mm if g.kind == "cone" else None,
        "image_axes": {"rows": "superior->inferior", "cols": "anterior->posterior", "view": "left lateral"},
        "centres_world_mm": {lvl: c.tolist() for lvl, c in zip(cfg.levels, world)},
        "keypoints_px": {lvl: p.tolist() for lvl, p in zip(cfg.levels, kp)},
    }
    storage.atomic_write_json(storage.join(out, "drr.json"), info)
    log.info("DRR %dx%d (%s, %.3f mm/px at the spine) with %d keypoints -> %s",
             g.rows, g.cols, g.kind, g.pixel_mm_at_isocentre, len(kp), out)
    return {"out": out, "image": storage.join(out, "drr.dcm"), "png": storage.join(out, "drr.png"),
            "keypoints": storage.join(out, "keypoints.json"), "manifest": storage.join(out, "manifest.csv"),
            "keypoints_px": kp.tolist(), "pixel_spacing_mm": g.pixel_mm_at_isocentre, "shape": [g.rows, g.cols]}


def synth_drr_cli(args: Any) -> int:
    """Entry for `raypipe synth drr --ct CT --masks DIR --out DIR` (args: ct, masks, out; optional config)."""
    from raypipe.config import load_config

    cfg = load_config(DRRConfig, getattr(args, "config", None), getattr(args, "overrides", None) or {})
    result = synth_drr(args.ct, args.masks, args.out, cfg)
    log.info("wrote %s", json.dumps({k: result[k] for k in ("image", "keypoints", "manifest")}))
    return 0
