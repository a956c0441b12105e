"""Row selection on Ray Datasets of shards: the studies of a split, and the small per-study columns."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pandas as pd


def keep_studies(batch: Any, ids: Sequence[str]) -> Any:
    """Ray Data map_batches filter (pyarrow batches): rows whose study_id is in `ids`."""
    import pyarrow as pa
    import pyarrow.compute as pc

    col = pc.cast(batch.column("study_id"), pa.string())
    return batch.filter(pc.is_in(col, value_set=pa.array(list(ids), pa.string())))


def subset_studies(ds: Any, ids: Sequence[str]) -> Any:
    """The rows of `ds` for the given studies (the id list travels with the task)."""
    return ds.map_batches(keep_studies, fn_kwargs={"ids": [str(i) for i in ids]}, batch_format="pyarrow")


def small_columns(ds: Any, columns: Sequence[str]) -> pd.DataFrame:
    """The small per-study columns of a dataset (ids, split, labels, clinical) as pandas, without images."""
    present = [c for c in columns if c in ds.schema().names]
    return ds.select_columns(present).to_pandas()


IMAGE_COLUMNS = ("bone", "bone_muscle", "slice_level", "slice_z_mm", "image", "keypoints")


def shard_meta(data_dir: str) -> pd.DataFrame:
    """Per-study scalar columns of preprocessed shards (ids, labels, site, split, clinical), no images."""
    import pyarrow.parquet as pq

    from raypipe import storage
    from raypipe.data.shards import shard_files

    files = shard_files(data_dir)
    if not files:
        raise FileNotFoundError(f"no preprocessed shards in {data_dir}: run `raypipe preprocess` into it first")
    frames = []
    for f in files:
        fs, inner = storage.filesystem(f)
        names = [n for n in pq.read_schema(inner, filesystem=fs).names if n not in IMAGE_COLUMNS]
        frames.append(pq.read_table(inner, filesystem=fs, columns=names).to_pandas())
    meta = pd.concat(frames, ignore_index=True)
    meta["patient_id"] = meta["patient_id"].astype(str)
    meta["study_id"] = meta["study_id"].astype(str)
    return meta
