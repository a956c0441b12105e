"""Synthetic cohort: per-patient studies written in parallel, a manifest, and an atomic rename at the end.

Each patient's random streams derive from ``SeedSequence(seed, spawn_key=(index, stream))`` (stream 0:
clinical + outcome, 1: CT, 2: radiograph), so the output is identical for any number of workers, and the
same seed gives the same patients (clinical values, outcomes, CT pixels) for ``ct``, ``xray`` and ``both``.
"""
from __future__ import annotations

import logging
import os
import shutil
import sys
import uuid
from concurrent.futures import ProcessPoolExecutor, as_completed
from multiprocessing import get_context
from pathlib import Path

import numpy as np
import pandas as pd

from . import clinical
from .ct_phantom import make_ct_phantom
from .writers import write_ct_series, write_json, write_nifti_masks, write_radiograph
from .xray_phantom import make_xray_phantom

log = logging.getLogger(__name__)

KINDS = ("ct", "xray", "both")
TEST_FRACTION = 0.2
GENERATOR_VERSION = 1
MANIFEST_COLUMNS: tuple[str, ...] = (
    "patient_id", "study_id", "modality", "image_path", "time_days", "event", "mask_path", "mask_labels",
    "body_mask_path", "keypoints_path", "site", "split", "prevalent_fracture", "age", "sex", "height_cm",
    "weight_kg", "bmi", "smoker", "alcohol", "glucocorticoid", "secondary_osteoporosis",
    "rheumatoid_arthritis", "prior_fracture", "t2dm", "hiv", "hcv", "renal_failure", "frax_mof", "frax_hip",
    "fracture_5y", "true_lp", "true_image_lp", "true_clinical_lp", "bone_density_hu", "muscle_fat_fraction",
    "deformity", "wedge_L1", "wedge_L2", "wedge_L3", "wedge_L4", "wedge_L5",
)


def patient_rng(seed: int, index: int, stream: int) -> np.random.Generator:
    """The random stream ``stream`` of patient ``index`` (independent of workers and of other patients)."""
    return np.random.default_rng(np.random.SeedSequence(int(seed), spawn_key=(int(index), int(stream))))


def patient_id(index: int) -> str:
    return f"SYN{index:05d}"


def draw_clinical(seed: int, index: int) -> clinical.Patient:
    """Clinical variables, planted features and outcome of patient ``index`` (no images)."""
    return clinical.draw_patient(patient_rng(seed, index, 0), patient_id(index))


def test_indices(seed: int, patients: int) -> set[int]:
    """Patient indices of the test split: a seeded permutation, round(20 %) of the patients."""
    rng = np.random.default_rng(np.random.SeedSequence(int(seed), spawn_key=(2**32 - 1,)))
    return set(int(i) for i in rng.permutation(patients)[: int(round(TEST_FRACTION * patients))])


def _make_patient(kind: str, root: str, seed: int, index: int, split: str) -> list[dict[str, object]]:
    """Render and write every study of one patient; return its manifest rows."""
    out = Path(root)
    pt = clinical.draw_patient(patient_rng(seed, index, 0), patient_id(index))
    pid = pt.patient_id
    base = pt.row()
    base["split"] = split
    base.update({f"wedge_{lv}": pt.wedge[lv] for lv in clinical.LUMBAR_LEVELS})
    rows: list[dict[str, object]] = []
    uid_parts = ("raypipe-synth", GENERATOR_VERSION, int(seed), int(index))
    if kind in ("ct", "both"):
        ph = make_ct_phantom(patient_rng(seed, index, 1), pt.bone_density_hu, pt.muscle_fat_fraction, pt.bmi,
                             pt.wedge)
        study = f"{pid}_CT"
        write_ct_series(out / "ct" / pid, ph.hu, ph.spacing, ph.origin, base, study, uid_parts)
        masks = ph.masks()
        masks["vertebrae_body"] = ph.body
        write_nifti_masks(out / "masks" / pid, masks, ph.spacing, ph.origin)
        rows.append({**base, "study_id": study, "modality": "CT", "image_path": f"ct/{pid}",
                     "mask_path": f"masks/{pid}", "mask_labels": "",
                     "body_mask_path": f"masks/{pid}/vertebrae_body.nii.gz", "keypoints_path": "",
                     "true_image_lp": pt.image_lp["ct"]})
    if kind in ("xray", "both"):
        xr = make_xray_phantom(patient_rng(seed, index, 2), pt.bone_density_hu, pt.wedge, pt.bmi)
        study = f"{pid}_XR"
        write_radiograph(out / "xray" / f"{pid}.dcm", xr.pixels, xr.pixel_spacing, base, study, uid_parts)
        write_json(out / "keypoints" / f"{pid}.json", xr.keypoints)
        rows.append({**base, "study_id": study, "modality": "XR", "image_path": f"xray/{pid}.dcm",
                     "mask_path": "", "mask_labels": "", "body_mask_path": "",
                     "keypoints_path": f"keypoints/{pid}.json", "true_image_lp": pt.image_lp["xray"]})
    return rows


def _default_workers(patients: int) -> int:
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - non-Linux
        cpus = os.cpu_count() or 1
    return max(1, min(cpus, patients))


def _progress(total: int, desc: str):
    if sys.stderr.isatty():
        try:
            from tqdm import tqdm
            return tqdm(total=total, desc=desc, unit="patient")
        except ImportError:  # pragma: no cover
            pass
    return None


def synth_cohort(kind: str, out: str | Path, patients: int, seed: int = 0, workers: int | None = None,
                 overwrite: bool = False) -> Path:
    """Write a synthetic cohort (``kind`` in ct|xray|both) of ``patients`` patients to ``out``; return the
    path of its ``manifest.csv``.

    Output is built in a hidden sibling folder and renamed into place at the end; a non-empty ``out`` is
    refused unless ``overwrite``. Deterministic given ``seed`` for any ``workers`` (None: one per core).
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if patients < 1:
        raise ValueError(f"patients must be >= 1, got {patients}")
    out = Path(out).expanduser().absolute()
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise FileExistsError(f"{out} exists and is not empty (pass overwrite=True to replace it)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    n_workers = _default_workers(patients) if workers is None else max(1, min(int(workers), patients))
    test = test_indices(seed, patients)
    log.info("synth %s: %d patients, seed %d, %d worker(s) -> %s", kind, patients, seed, n_workers, out)
    results: dict[int, list[dict[str, object]]] = {}
    bar = _progress(patients, f"synth {kind}")
    step = max(1, patients // 10)

    def done(i: int, rows: list[dict[str, object]]) -> None:
        results[i] = rows
        if bar is not None:
            bar.update(1)
        if len(results) % step == 0 or len(results) == patients:
            log.info("synth %s: %d/%d patients", kind, len(results), patients)

    try:
        args = [(kind, str(tmp), int(seed), i, "test" if i in test else "train") for i in range(patients)]
        if n_workers == 1:
            for a in args:
                done(a[3], _make_patient(*a))
        else:
            with ProcessPoolExecutor(max_workers=n_workers, mp_context=get_context("spawn")) as ex:
                futs = {ex.submit(_make_patient, *a): a[3] for a in args}
                for fut in as_completed(futs):
                    done(futs[fut], fut.result())
        rows = [r for i in range(patients) for r in results[i]]
        df = pd.DataFrame(rows)[list(MANIFEST_COLUMNS)]
        df.to_csv(tmp / "manifest.csv", index=False)
        write_json(tmp / "synth_params.json", _params(kind, patients, seed))
        if out.exists():
            shutil.rmtree(out) if out.is_dir() else out.unlink()
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        if bar is not None:
            bar.close()
    log.info("synth %s: wrote %s", kind, out / "manifest.csv")
    return out / "manifest.csv"


def _params(kind: str, patients: int, seed: int) -> dict[str, object]:
    """The generative model's constants, stored beside the manifest for provenance."""
    c = clinical
    return {
        "generator_version": GENERATOR_VERSION, "kind": kind, "patients": patients, "seed": seed,
        "cox_beta": c.COX_BETA, "image_terms": {k: list(v) for k, v in c.IMAGE_TERMS.items()},
        "weibull_shape": c.WEIBULL_SHAPE, "weibull_scale_days": c.WEIBULL_SCALE_DAYS, "lp_centre": c.LP_CENTRE,
        "admin_censor_days": c.ADMIN_CENSOR_DAYS, "dropout_mean_days": c.DROPOUT_MEAN_DAYS,
        "horizon_5y_days": c.HORIZON_5Y_DAYS, "genant_grade1": c.GENANT_GRADE1,
        "density_ref": [c.DENSITY_REF_MEAN, c.DENSITY_REF_SD], "fat_ref": [c.FAT_REF_MEAN, c.FAT_REF_SD],
        "test_fraction": TEST_FRACTION,
        "fracture_5y": "1 event <= 1826 d; 0 time > 1826 d; empty (NaN) censored <= 1826 d without event",
    }
