"""Grad-CAM galleries of a trained CT run: per-slice heatmaps over the model's own input crops, one PNG per study.

The report (`raypipe evaluate`) embeds the PNGs it finds in a `gradcam/` folder next to a prediction
file, so `raypipe cv` and `raypipe train` write theirs to `OUT/gradcam/`. Each PNG is a grid of the
study's centred evaluation slices (14 for the paper's CNN-RNN: 2 rows x 7), each slice overlaid with its
own Grad-CAM map (last convolutional stage), as in Figure 3 of papers/000. An `index.json` beside the
PNGs maps each file to its study, fold and score (file names carry no identifiers).
"""
from __future__ import annotations

import io
import json
import logging
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

log = logging.getLogger(__name__)

GRADCAM_DIR = "gradcam"
INDEX_FILE = "index.json"


def load_run_model(run_dir: str) -> tuple[nn.Module, dict[str, Any]]:
    """The best model of a `fit_ct` run folder (model.pt + model_meta.json), in eval mode on CPU."""
    from raypipe import storage
    from raypipe.artifact import read_artifact
    from raypipe.models.registry import build_model

    art = read_artifact(run_dir)
    meta = art.as_dict()
    model = build_model(art.builder, **art.inference_kwargs())
    state = torch.load(io.BytesIO(storage.read_bytes(storage.join(run_dir, "model.pt"))), map_location="cpu",
                       weights_only=True)
    model.load_state_dict(state)
    return model.eval(), meta


def tile_grid(tiles: Sequence[np.ndarray], cols: int, pad: int = 2) -> np.ndarray:
    """RGB tiles (H, W, 3) of equal shape laid out row by row, white padding between them."""
    if not tiles:
        raise ValueError("no tiles to lay out")
    h, w, _ = tiles[0].shape
    cols = max(1, min(cols, len(tiles)))
    rows = math.ceil(len(tiles) / cols)
    grid = np.full((rows * h + (rows - 1) * pad, cols * w + (cols - 1) * pad, 3), 255, dtype=np.uint8)
    for i, tile in enumerate(tiles):
        r, c = divmod(i, cols)
        grid[r * (h + pad):r * (h + pad) + h, c * (w + pad):c * (w + pad) + w] = tile
    return grid


def gradcam_grid(model: nn.Module, x: torch.Tensor, clinical: torch.Tensor | None = None,
                 target: str | None = None, cols: int = 7, alpha: float = 0.4) -> np.ndarray:
    """One study's slices (1, S, 1, H, W) with their Grad-CAM overlays as an RGB grid (S tiles, `cols` wide)."""
    from raypipe.explain.gradcam import grad_cam, overlay

    layer = getattr(model, "gradcam_layer", None)
    if layer is None:
        raise ValueError(f"{type(model).__name__} has no gradcam_layer")
    kwargs = {"clinical": clinical} if clinical is not None else {}
    cam = grad_cam(model, layer, x, target=target, **kwargs)  # (1, S, H, W)
    slices = x[0, :, 0].float().numpy()
    tiles = [overlay(slices[s], cam[0, s].numpy(), alpha=alpha) for s in range(slices.shape[0])]
    return tile_grid(tiles, cols)


def png_bytes(rgb: np.ndarray) -> bytes:
    """PNG encoding of an RGB uint8 array."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    return buf.getvalue()


def read_studies(data_dir: str, study_ids: Sequence[str], columns: Sequence[str]) -> pd.DataFrame:
    """The given studies' rows of the shards (only `columns`), without reading the other studies' images."""
    import pyarrow.parquet as pq

    from raypipe import storage
    from raypipe.data.shards import shard_files, table_to_pandas

    import ray.data.extensions  # noqa: F401  (registers the tensor extension type for reading)

    frames = []
    wanted = [str(s) for s in study_ids]
    for f in shard_files(data_dir):
        fs, inner = storage.filesystem(f)
        names = set(pq.read_schema(inner, filesystem=fs).names)
        table = pq.read_table(inner, filesystem=fs, columns=[c for c in columns if c in names],
                              filters=[("study_id", "in", wanted)])
        if table.num_rows:
            frames.append(table_to_pandas(table))
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=list(columns))


def write_run_gradcam(run_dir: str, data_dir: str, study_ids: Sequence[str], out_dir: str,
                      labels: Mapping[str, Mapping[str, Any]] | None = None, prefix: str = "gradcam",
                      start: int = 0) -> list[str]:
    """Write one Grad-CAM grid PNG per study (model of `run_dir`, shards in `data_dir`); returns the PNG paths.

    `labels` adds per-study facts (fold, score, label) to `index.json`; numbering starts at `start` so that
    several runs (CV folds) can write into one folder.
    """
    from raypipe import storage
    from raypipe.clinical import ClinicalEncoder
    from raypipe.data.collate import SliceBatch

    if not study_ids:
        return []
    model, meta = load_run_model(run_dir)
    clinical = meta.get("clinical") or {}
    columns = ["patient_id", "study_id", meta["input"], *clinical.get("columns", [])]
    rows = read_studies(data_dir, study_ids, columns)
    rows["study_id"] = rows["study_id"].astype(str)
    rows = rows.set_index("study_id", drop=False).reindex([str(s) for s in study_ids]).dropna(subset=[meta["input"]])
    collate = SliceBatch(meta["input"], int(meta["n_slices"]), False, 0, 0, ClinicalEncoder.from_dict(clinical), [])
    target = "log_risk" if meta.get("score_kind") == "log_risk" else None
    storage.makedirs(out_dir)
    index_path = storage.join(out_dir, INDEX_FILE)
    index = json.loads(storage.read_bytes(index_path).decode()) if storage.exists(index_path) else {}
    written = []
    for i, (_, row) in enumerate(rows.iterrows(), start=start):
        batch = {c: _one_cell(row[c]) for c in columns if c in row}
        b = collate(batch)
        grid = gradcam_grid(model, b["x"], b.get("clinical"), target=target)
        name = f"{prefix}_{i:02d}.png"
        path = storage.join(out_dir, name)
        storage.atomic_write_bytes(path, png_bytes(grid))
        index[name] = {"study_id": row["study_id"], "model": meta.get("display_name"), "input": meta["input"],
                       "slices": int(b["x"].shape[1]), **dict((labels or {}).get(row["study_id"], {}))}
        written.append(path)
    storage.atomic_write_json(index_path, index)
    log.info("wrote %d Grad-CAM grid(s) to %s", len(written), out_dir)
    return written


def _one_cell(value: Any) -> np.ndarray:
    """A length-1 object array holding `value` as is (an image cell stays one ndarray)."""
    cell = np.empty(1, dtype=object)
    cell[0] = value
    return cell


def default_gradcam_dir(out: str) -> str:
    """`OUT/gradcam`: where the report looks for a prediction file's Grad-CAM PNGs."""
    from raypipe import storage

    return storage.join(out, GRADCAM_DIR) if storage.is_uri(out) else os.path.join(out, GRADCAM_DIR)


def pick_studies(predictions: pd.DataFrame, n: int, split: str = "val") -> pd.DataFrame:
    """The `n` studies to show: highest-scored positives of `split` first, then the highest-scored others."""
    from raypipe.predictions import label_columns

    rows = predictions[predictions["split"] == split]
    if rows.empty or n <= 0:
        return rows.iloc[0:0]
    rows = rows[rows["model"] == rows["model"].iloc[0]].copy()
    labels = label_columns(list(rows.columns))
    rows["_pos"] = pd.to_numeric(rows[labels[0]], errors="coerce").fillna(0) if labels else 0.0
    return rows.sort_values(["_pos", "score", "study_id"], ascending=[False, False, True]).head(n).drop(columns="_pos")


def write_train_gallery(run_dir: str, data_dir: str, n: int = 4) -> list[str]:
    """Grad-CAM grids of `n` validation studies of a `fit_ct` run, into RUN_DIR/gradcam (for the report).

    The `after_train` step of the CT tasks (`raypipe.tasks`); a figure never fails a finished run.
    """
    from raypipe import storage
    from raypipe.predictions import read_predictions

    preds = read_predictions(storage.join(run_dir, "predictions.parquet"))
    pick = pick_studies(preds, n)
    facts = {str(r.study_id): {"score": float(r.score)} for r in pick.itertuples()}
    return write_run_gradcam(run_dir, data_dir, list(facts), default_gradcam_dir(run_dir), labels=facts)
