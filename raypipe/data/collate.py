"""Shard rows -> model inputs: the collate functions the trainers, their validation and scoring share.

Ray Data hands a batch as a mapping of columns. Image cells arrive as tensors or as nested lists of
slices (`stack_cells`); clinical variables are encoded by the one `raypipe.clinical.ClinicalEncoder`;
label columns become float tensors with NaN for unknown labels. Random choices are seeded by
(seed, epoch, study) through `study_rng`, so a study gets the same augmentation whichever worker sees it.
"""
from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch

from raypipe.clinical import ClinicalEncoder
from raypipe.preprocess.augment import draw_flip_shift, flip_shift


def study_rng(seed: int, epoch: int, study_id: object) -> np.random.Generator:
    """Generator fixed by (seed, epoch, study): reproducible no matter which worker sees the study."""
    h = int.from_bytes(hashlib.sha1(str(study_id).encode()).digest()[:8], "little")
    return np.random.default_rng([int(seed), int(epoch), h])


def stack_cells(value: Any) -> np.ndarray:
    """A numeric array from a shard cell or column: a tensor cell, or nested lists/object arrays of slices."""
    if isinstance(value, np.ndarray) and value.dtype != object:
        return value
    return np.stack([stack_cells(v) for v in value])


def float_column(batch: Mapping[str, Any], name: str, n: int) -> torch.Tensor:
    """A label/time column as float32 (NaN where missing or absent)."""
    col = batch.get(name)
    if col is None:
        return torch.full((n,), float("nan"))
    vals = pd.to_numeric(pd.Series(np.asarray(col, dtype=object)), errors="coerce").to_numpy(dtype=np.float64)
    return torch.from_numpy(vals.astype(np.float32))


def clinical_tensor(batch: Mapping[str, Any], encoder: ClinicalEncoder | None) -> torch.Tensor | None:
    """Standardised clinical variables (B, k) of a batch, or None when the model takes none."""
    if not encoder:
        return None
    ids = batch.get("study_id")
    return torch.from_numpy(encoder.transform(batch, row_ids=None if ids is None else [str(i) for i in ids]))


class SliceBatch:
    """collate_fn for CT shards: rows -> x (B, n, 1, H, W) float32, clinical, targets.

    Training draws `n_slices` equidistant slices with a random start per (seed, epoch, study) and, when
    `flip_prob` / `shift_fraction` are set, flips and translates each study's slices together
    (`raypipe.preprocess.augment.flip_shift`); evaluation takes the centred slices, unaugmented
    (`raypipe.preprocess.ct.sample_slices`).
    """

    def __init__(self, image: str, n_slices: int, train: bool, seed: int, epoch: int,
                 clinical: ClinicalEncoder | None, targets: Sequence[str], flip_prob: float = 0.0,
                 shift_fraction: float = 0.0) -> None:
        self.image, self.n_slices, self.train, self.seed, self.epoch = image, n_slices, train, seed, epoch
        self.clinical = clinical
        self.targets = tuple(targets)
        self.flip_prob, self.shift_fraction = float(flip_prob), float(shift_fraction)

    def __call__(self, batch: Mapping[str, np.ndarray]) -> dict[str, torch.Tensor]:
        """Sample and stack one batch."""
        from raypipe.preprocess.ct import sample_slices

        images, moves = [], []
        for i, cell in enumerate(batch[self.image]):
            vol = stack_cells(cell)
            rng = study_rng(self.seed, self.epoch, batch["study_id"][i]) if self.train else None
            images.append(vol[sample_slices(vol.shape[0], self.n_slices, rng)].astype(np.float32))
            if rng is not None:
                moves.append(draw_flip_shift(rng, self.flip_prob, round(self.shift_fraction * vol.shape[-1])))
        x = np.stack(images)[:, :, None]
        if moves and any(f or dy or dx for f, dy, dx in moves):
            x = flip_shift(x, np.array([m[0] for m in moves]), np.array([m[1:] for m in moves]))
        out = {"x": torch.from_numpy(np.ascontiguousarray(x))}
        clinical = clinical_tensor(batch, self.clinical)
        if clinical is not None:
            out["clinical"] = clinical
        for name in self.targets:
            out[name] = float_column(batch, name, len(images))
        return out
