"""Shard rows -> model inputs: the collate functions the trainers, their validation and scoring share.

Ray Data hands a batch as a mapping of columns. Image cells arrive as tensors or as nested lists of
slices (`stack_cells`); clinical variables are encoded by the one `raypipe.clinical.ClinicalEncoder`;
label columns become float tensors with NaN for unknown labels. Random choices are seeded by
(seed, epoch, study): `study_rng` gives a per-study generator (keypoint augmentation), and
`study_uniform` the same kind of draw for a whole batch at once (slice starts), so a study gets the same
augmentation whichever worker sees it. CT slice sampling is vectorised over the batch: the ragged volumes
are packed into one (total slices, H, W) array (`pack_volumes`) and all studies' slices are gathered with
one `np.take` (`gather_slices`), with no per-study Python on that path.
"""
from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch

from raypipe.clinical import ClinicalEncoder
from raypipe.preprocess.augment import flip_shift

_MASK64 = np.uint64(0xFFFFFFFFFFFFFFFF)


def study_key(study_id: object) -> int:
    """64-bit key of a study id (first 8 bytes of its SHA-1): the per-study part of every random seed."""
    return int.from_bytes(hashlib.sha1(str(study_id).encode()).digest()[:8], "little")


def study_keys(study_ids: Sequence[object]) -> np.ndarray:
    """`study_key` of every id, as uint64."""
    return np.fromiter((study_key(s) for s in study_ids), dtype=np.uint64, count=len(study_ids))


def study_rng(seed: int, epoch: int, study_id: object) -> np.random.Generator:
    """Generator fixed by (seed, epoch, study): reproducible no matter which worker sees the study."""
    return np.random.default_rng([int(seed), int(epoch), study_key(study_id)])


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64 finaliser on uint64 arrays (a bijective, well-mixing hash)."""
    with np.errstate(over="ignore"):
        x = (x + np.uint64(0x9E3779B97F4A7C15)) & _MASK64
        x = ((x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)) & _MASK64
        x = ((x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)) & _MASK64
        return x ^ (x >> np.uint64(31))


def study_uniform(seed: int, epoch: int, keys: np.ndarray) -> np.ndarray:
    """One U[0, 1) draw per study key, fixed by (seed, epoch, study): vectorised over the batch."""
    base = _splitmix64(np.array([(int(seed) & 0xFFFFFFFF) << 32 | (int(epoch) & 0xFFFFFFFF)], dtype=np.uint64))
    h = _splitmix64(_splitmix64(np.asarray(keys, dtype=np.uint64) ^ base))
    return (h >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


# Salts that make a study's flip, row shift and column shift independent of each other and of its slice start.
_MOVE_SALTS = (np.uint64(0x5DEECE66D), np.uint64(0x2545F4914F6CDD1D), np.uint64(0x9E3779B97F4A7C15))


@dataclass(frozen=True)
class StudyMoves:
    """Training augmentation: each study's left-right flip and in-plane shift, fixed by (seed, epoch, study).

    Every slice (CT) or vertebra channel (radiograph) of a study moves together, the border is replicated and
    grey levels are untouched (`raypipe.preprocess.augment.flip_shift`); drawn vectorised from the study keys,
    so a study moves the same way whichever worker, batch or input path (cached or streamed) serves it.
    """

    flip_prob: float = 0.0
    shift_fraction: float = 0.0
    seed: int = 0

    def __bool__(self) -> bool:
        return self.flip_prob > 0 or self.shift_fraction > 0

    def draw(self, keys: np.ndarray, epoch: int, width: int) -> tuple[np.ndarray, np.ndarray]:
        """Flips (B,) and (dy, dx) shifts (B, 2) in pixels of an image `width` wide."""
        keys = np.asarray(keys, dtype=np.uint64)
        u = [study_uniform(self.seed, epoch, keys ^ salt) for salt in _MOVE_SALTS]
        m = int(round(self.shift_fraction * width))
        shifts = np.minimum(np.floor(np.stack(u[1:], axis=1) * (2 * m + 1)).astype(np.int64), 2 * m) - m
        return u[0] < self.flip_prob, shifts

    def apply(self, x: np.ndarray, keys: np.ndarray, epoch: int) -> np.ndarray:
        """Move each study of a batch (B, ..., H, W), written back into `x` (a reused buffer stays in place)."""
        if not self or len(keys) == 0:
            return x
        flips, shifts = self.draw(keys, epoch, x.shape[-1])
        x[...] = flip_shift(x, flips, shifts)
        return x


def slice_positions(counts: np.ndarray, n: int, u: np.ndarray | None = None) -> np.ndarray:
    """(B, n) equidistant slice indices per study, as `raypipe.preprocess.ct.sample_slices` for each row.

    Bins of width w = count / n, slice floor(o + i * w) with o = w / 2 (`u` None: evaluation, centred) or
    o = u * w (training, `u` ~ U[0, 1) per study: the paper's random start); clipped to the volume.
    """
    counts = np.asarray(counts, dtype=np.int64)
    if counts.size and counts.min() < 1:
        raise ValueError("no slices to sample from (a study with 0 slices)")
    if n < 1:
        raise ValueError("n must be >= 1")
    w = counts.astype(np.float64) / n
    offset = w / 2.0 if u is None else np.asarray(u, dtype=np.float64) * w
    idx = np.floor(offset[:, None] + np.arange(n)[None, :] * w[:, None]).astype(np.int64)
    return np.minimum(np.maximum(idx, 0), (counts - 1)[:, None])


def stack_cells(value: Any) -> np.ndarray:
    """A numeric array from a shard cell or column: a tensor cell, or nested lists/object arrays of slices."""
    if isinstance(value, np.ndarray) and value.dtype != object:
        return value
    return np.stack([stack_cells(v) for v in value])


def pack_volumes(column: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Ragged volumes (a batch's image column) -> (slices (total, H, W), starts, counts) without copying twice."""
    if isinstance(column, np.ndarray) and column.dtype != object:  # every volume of this batch has the same depth
        b, s = column.shape[:2]
        counts = np.full(b, s, dtype=np.int64)
        return column.reshape(b * s, *column.shape[2:]), np.arange(b, dtype=np.int64) * s, counts
    vols = [stack_cells(v) for v in column]
    counts = np.fromiter((v.shape[0] for v in vols), dtype=np.int64, count=len(vols))
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64) if len(vols) else counts
    slices = np.concatenate(vols) if vols else np.zeros((0, 1, 1), dtype=np.float16)
    return slices, starts, counts


def gather_slices(slices: np.ndarray, starts: np.ndarray, counts: np.ndarray, rows: np.ndarray, n: int,
                  u: np.ndarray | None, out: np.ndarray | None = None) -> np.ndarray:
    """(B, n, 1, H, W) sampled slices of the given rows from packed volumes, in one `np.take` (into `out`)."""
    rows = np.asarray(rows, dtype=np.int64)
    idx = (slice_positions(counts[rows], n, u) + starts[rows][:, None]).reshape(-1)
    shape = (len(rows), n, 1, *slices.shape[1:])
    if out is None:
        out = np.empty(shape, dtype=slices.dtype)
    elif out.shape != shape or out.dtype != slices.dtype:
        raise ValueError(f"output buffer {out.shape} {out.dtype} does not fit a batch of {shape} {slices.dtype}")
    np.take(slices, idx, axis=0, out=out.reshape(len(idx), *slices.shape[1:]), mode="clip")
    return out


def float_column(batch: Mapping[str, Any], name: str, n: int) -> torch.Tensor:
    """A label/time column as float32 (NaN where missing or absent)."""
    col = batch.get(name)
    if col is None:
        return torch.full((n,), float("nan"))
    arr = np.asarray(col)
    if arr.dtype.kind in "fiub":
        return torch.from_numpy(arr.astype(np.float32))
    vals = pd.to_numeric(pd.Series(np.asarray(col, dtype=object)), errors="coerce").to_numpy(dtype=np.float64)
    return torch.from_numpy(vals.astype(np.float32))


def clinical_tensor(batch: Mapping[str, Any], encoder: ClinicalEncoder | None) -> torch.Tensor | None:
    """Standardised clinical variables (B, k) of a batch, or None when the model takes none."""
    if not encoder:
        return None
    ids = batch.get("study_id")
    return torch.from_numpy(encoder.transform(batch, row_ids=None if ids is None else [str(i) for i in ids]))


def tabular_tensors(batch: Mapping[str, Any], encoder: ClinicalEncoder | None, targets: Sequence[str],
                    n: int) -> dict[str, torch.Tensor]:
    """The non-image inputs of a batch: `clinical` (when the model takes it) and each target as float32."""
    out: dict[str, torch.Tensor] = {}
    clinical = clinical_tensor(batch, encoder)
    if clinical is not None:
        out["clinical"] = clinical
    for name in targets:
        out[name] = float_column(batch, name, n)
    return out


class SliceBatch:
    """collate_fn for CT shards: rows -> x (B, n, 1, H, W), clinical, targets.

    Training draws `n_slices` equidistant slices with a random start per (seed, epoch, study)
    (`study_uniform`), then flips/shifts each study when `moves` says so (`StudyMoves`); evaluation takes the
    centred ones (`slice_positions`, the rule of
    `raypipe.preprocess.ct.sample_slices`). `dtype` float32 feeds a model directly; float16 keeps the
    shards' precision so the conversion happens on the training device (half the bytes to move).
    """

    def __init__(self, image: str, n_slices: int, train: bool, seed: int, epoch: int,
                 clinical: ClinicalEncoder | None, targets: Sequence[str], dtype: Any = np.float32,
                 moves: StudyMoves | None = None) -> None:
        self.image, self.n_slices, self.train, self.seed, self.epoch = image, n_slices, train, seed, epoch
        self.clinical = clinical
        self.targets = tuple(targets)
        self.dtype = np.dtype(dtype)
        self.moves = moves if train else None

    def __call__(self, batch: Mapping[str, np.ndarray]) -> dict[str, torch.Tensor]:
        """Sample and stack one batch (vectorised over its studies)."""
        slices, starts, counts = pack_volumes(batch[self.image])
        rows = np.arange(len(counts))
        keys = study_keys(batch["study_id"])
        u = study_uniform(self.seed, self.epoch, keys) if self.train else None
        x = gather_slices(slices, starts, counts, rows, self.n_slices, u)
        if self.moves:
            x = self.moves.apply(x, keys, self.epoch)
        out = {"x": torch.from_numpy(x if x.dtype == self.dtype else x.astype(self.dtype))}
        return out | tabular_tensors(batch, self.clinical, self.targets, len(counts))
