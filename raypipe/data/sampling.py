"""Training-time slice sampling over preprocessed CT shards (the paper's 14 equidistant slices).

Shards keep every slice from T12 to L4 so that the random starting slice (augmentation) can change at
each epoch without touching the CTs again. The samplers here are plain callables: usable from
`ray.data.Dataset.map` / `map_batches` and as a map-style dataset for `torch.utils.data.DataLoader`.
Randomness is seeded from (seed, epoch, study_id), so results do not depend on worker scheduling.
"""
from __future__ import annotations

import hashlib
from typing import Any, Mapping, Sequence

import numpy as np

from raypipe.preprocess.ct import sample_slices

SLICE_KEYS: tuple[str, ...] = ("bone", "bone_muscle", "slice_level", "slice_z_mm")


def study_rng(seed: int, epoch: int, study_id: object) -> np.random.Generator:
    """Generator fixed by (seed, epoch, study): reproducible no matter which worker sees the study."""
    h = int.from_bytes(hashlib.sha1(str(study_id).encode()).digest()[:8], "little")
    return np.random.default_rng([int(seed), int(epoch), h])


def sample_study(
    record: Mapping[str, Any], n: int = 14, rng: np.random.Generator | None = None, keys: Sequence[str] = SLICE_KEYS
) -> dict[str, Any]:
    """Copy of a shard row with its per-slice columns reduced to `n` sampled slices (+ `slice_index`)."""
    n_avail = len(record["slice_z_mm"])
    idx = sample_slices(n_avail, n, rng)
    out = dict(record)
    for k in keys:
        if k in record and record[k] is not None:
            out[k] = np.asarray(record[k])[idx]
    out["slice_index"] = idx
    return out


class SliceSampler:
    """Row function for Ray Data `map`: random equidistant slices when training, centred when evaluating."""

    def __init__(self, n_slices: int = 14, train: bool = True, seed: int = 0, epoch: int = 0,
                 keys: Sequence[str] = SLICE_KEYS) -> None:
        self.n_slices = n_slices
        self.train = train
        self.seed = seed
        self.epoch = epoch
        self.keys = tuple(keys)

    def __call__(self, row: dict[str, Any]) -> dict[str, Any]:
        """Sample one row (called by Ray Data or a DataLoader worker)."""
        rng = study_rng(self.seed, self.epoch, row.get("study_id")) if self.train else None
        return sample_study(row, self.n_slices, rng, self.keys)

    def sample_batch(self, batch: dict[str, Any]) -> dict[str, Any]:
        """Batch variant for `map_batches(batch_format="numpy")`: ragged slice stacks -> (B, n, H, W) arrays."""
        n_rows = len(batch["slice_z_mm"])
        rows = [self({k: v[i] for k, v in batch.items()}) for i in range(n_rows)]
        out: dict[str, Any] = {}
        for k in rows[0] if rows else batch:
            vals = [r[k] for r in rows]
            out[k] = np.stack(vals) if k in self.keys or k == "slice_index" else np.asarray(vals)
        return out


class CTSliceDataset:
    """Map-style dataset over a pandas frame of shard rows (`load_ct_shards(..., backend="pandas")`).

    `image` selects `bone` or `bone_muscle`; items are dicts of numpy arrays (torch's default collate turns
    them into tensors: image (n, 1, H, W) float32, plus `time_days`, `event` and the study id).
    """

    def __init__(self, frame: Any, image: str = "bone_muscle", n_slices: int = 14, train: bool = True,
                 seed: int = 0, label_columns: Sequence[str] = ("time_days", "event")) -> None:
        if image not in ("bone", "bone_muscle"):
            raise ValueError(f"image must be 'bone' or 'bone_muscle', got {image!r}")
        self.frame = frame.reset_index(drop=True)
        self.image = image
        self.labels = [c for c in label_columns if c in self.frame.columns]
        self.sampler = SliceSampler(n_slices, train, seed)

    def set_epoch(self, epoch: int) -> None:
        """New random starting slices for the next epoch (training only)."""
        self.sampler.epoch = epoch

    def __len__(self) -> int:
        return len(self.frame)

    def __getitem__(self, i: int) -> dict[str, Any]:
        row = self.frame.iloc[int(i)]
        rec = {"study_id": row["study_id"], self.image: row[self.image], "slice_z_mm": row["slice_z_mm"]}
        s = SliceSampler(self.sampler.n_slices, self.sampler.train, self.sampler.seed, self.sampler.epoch,
                         keys=(self.image, "slice_z_mm"))(rec)
        item: dict[str, Any] = {
            "image": np.asarray(s[self.image], dtype=np.float32)[:, None],
            "slice_index": s["slice_index"],
            "study_id": str(row["study_id"]),
        }
        for c in self.labels:
            item[c] = np.float32(row[c])
        return item
