"""A first Ray Data pass over a cohort: read every study and summarise its intensities (the demo's check)."""
from __future__ import annotations

import numpy as np
import pandas as pd


def _study_stats(row: dict) -> dict:
    """Read one study (CT or radiograph) and return its intensity summary, or the error naming the file."""
    from raypipe.io.ct import read_ct
    from raypipe.io.errors import RaypipeInputError
    from raypipe.io.radiograph import read_radiograph

    out = {"patient_id": row["patient_id"], "study_id": row["study_id"], "modality": row["modality"]}
    try:
        if row["modality"] == "CT":
            vol = read_ct(row["image_path"])
            arr, shape = vol.hu, vol.hu.shape
        else:
            rad = read_radiograph(row["image_path"])
            arr, shape = rad.pixels, rad.pixels.shape
        out.update(status="ok", shape="x".join(map(str, shape)), min=float(arr.min()),
                   mean=float(arr.mean()), max=float(arr.max()), error="")
    except RaypipeInputError as e:
        out.update(status="error", shape="", min=np.nan, mean=np.nan, max=np.nan, error=str(e))
    return out


def study_intensity_stats(manifest: pd.DataFrame) -> pd.DataFrame:
    """Per-study intensity stats computed in parallel with Ray Data (one task per study)."""
    import ray

    rows = manifest[["patient_id", "study_id", "modality", "image_path"]].to_dict("records")
    ds = ray.data.from_items(rows, override_num_blocks=max(1, min(len(rows), 16)))
    return ds.map(_study_stats, num_cpus=1).to_pandas()
