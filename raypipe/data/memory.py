"""A worker's rows read once and served from memory: the fast path of the training input.

`cache_rows` drains a Ray Data iterator once (epoch 1) into `CachedRows`: the image column packed into
one float16 array (ragged CT volumes as (total slices, H, W) with per-study starts and counts; fixed-size
radiograph patches as (n, C, H, W)), the non-image inputs as per-row arrays, and one 64-bit key per study.
Every later epoch draws a seeded order of row indices (no copy of the images), assembles each batch with
one vectorised gather into a reusable buffer (pinned when CUDA is present, so host-to-device copies are
asynchronous), and a background thread keeps `prefetch` batches ready (`prefetch_batches`). NumPy's gather
releases the GIL, so batch assembly overlaps the training step.
"""
from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from raypipe.data.collate import StudyMoves, pack_volumes, stack_cells, study_keys

log = logging.getLogger(__name__)

DEFAULT_PREFETCH = 4


@dataclass
class CachedRows:
    """Rows held in memory: packed images (ragged: with starts/counts), per-row tabular arrays, study keys."""

    images: np.ndarray | None
    starts: np.ndarray | None
    counts: np.ndarray | None
    tabular: dict[str, np.ndarray]
    keys: np.ndarray
    study_ids: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=object))

    def __len__(self) -> int:
        """Number of rows."""
        return len(self.keys)

    @property
    def nbytes(self) -> int:
        """Bytes held by the images and tabular arrays."""
        return int((self.images.nbytes if self.images is not None else 0) + sum(a.nbytes for a in self.tabular.values()))

    def take(self, rows: np.ndarray) -> "CachedRows":
        """A subset of the rows (images copied only for those rows)."""
        rows = np.asarray(rows, dtype=np.int64)
        images, starts, counts = self.images, self.starts, self.counts
        if images is not None and counts is not None:
            idx = np.concatenate([np.arange(s, s + c) for s, c in zip(self.starts[rows], self.counts[rows])]) \
                if len(rows) else np.zeros(0, dtype=np.int64)
            images, counts = images[idx], counts[rows]
            starts = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64) if len(rows) else counts
        elif images is not None:
            images = images[rows]
        return CachedRows(images, starts, counts, {k: v[rows] for k, v in self.tabular.items()}, self.keys[rows],
                          self.study_ids[rows])


def cache_rows(batches: Iterable[Mapping[str, Any]], image: str | None, ragged: bool,
               tabular: Callable[[Mapping[str, Any]], Mapping[str, torch.Tensor]],
               image_fn: Callable[[np.ndarray], np.ndarray] | None = None) -> CachedRows:
    """Drain numpy batches into memory: `tabular(batch)` gives the per-row inputs, `image_fn` may resize."""
    parts: dict[str, list[np.ndarray]] = {}
    images: list[np.ndarray] = []
    counts: list[np.ndarray] = []
    ids: list[np.ndarray] = []
    for batch in batches:
        n = len(batch["study_id"])
        if n == 0:
            continue
        ids.append(np.asarray(batch["study_id"]).astype(str).astype(object))
        for k, v in tabular(batch).items():
            parts.setdefault(k, []).append(v.numpy())
        if image is None:
            continue
        if ragged:
            slices, _, c = pack_volumes(batch[image])
            images.append(slices)
            counts.append(c)
        else:
            arr = stack_cells(batch[image])
            images.append(image_fn(arr) if image_fn is not None else arr)
    study_ids = np.concatenate(ids) if ids else np.zeros(0, dtype=object)
    packed = np.concatenate(images) if images else None
    cnt = np.concatenate(counts) if counts else None
    starts = None if cnt is None else np.concatenate([[0], np.cumsum(cnt)[:-1]]).astype(np.int64)
    # Rows in study-id order, not in the order Ray Data's blocks arrived (which varies from run to run): a seeded
    # epoch order then draws the same batches every run. Ragged volumes stay where they are (starts permuted).
    order = np.argsort(study_ids.astype(str), kind="stable")
    if packed is not None and cnt is None:
        packed = packed[order]
    return CachedRows(packed, None if starts is None else starts[order], None if cnt is None else cnt[order],
                      {k: np.concatenate(v)[order] for k, v in parts.items()},
                      study_keys(list(study_ids[order])), study_ids[order])


def epoch_order(n: int, seed: int, epoch: int, shuffle: bool) -> np.ndarray:
    """Row order of one epoch: a permutation seeded by (seed, epoch), or 0..n-1 without shuffling."""
    if not shuffle:
        return np.arange(n, dtype=np.int64)
    return np.random.default_rng([int(seed), int(epoch), 0x5EED]).permutation(n).astype(np.int64)


class BufferRing:
    """Reusable batch buffers (pinned when asked): no allocation or page faults per batch.

    A buffer is handed out again after `size` further batches, so a consumer may hold a batch until it
    has asked for `size - prefetch - 1` more (the training loop holds one).
    """

    def __init__(self, size: int, pin: bool) -> None:
        self.size, self.pin = size, pin
        self.buffers: dict[tuple[Any, ...], list[torch.Tensor]] = {}
        self.next: dict[tuple[Any, ...], int] = {}

    def get(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """A buffer of this shape and dtype (the least recently handed out one)."""
        key = (tuple(shape), dtype)
        ring = self.buffers.setdefault(key, [])
        i = self.next.get(key, 0)
        if len(ring) < self.size:
            ring.append(torch.empty(shape, dtype=dtype, pin_memory=self.pin))
            i = len(ring) - 1
        self.next[key] = (i + 1) % self.size
        return ring[i]


def prefetched(make: Callable[[int], dict[str, torch.Tensor]], n_batches: int, depth: int) -> Iterator[dict[str, torch.Tensor]]:
    """Yield make(0..n_batches-1) while a background thread keeps up to `depth` batches ready."""
    q: queue.Queue = queue.Queue(maxsize=max(1, depth))
    stop = threading.Event()
    done = object()

    def work() -> None:
        try:
            for i in range(n_batches):
                if stop.is_set():
                    return
                q.put(make(i))
            q.put(done)
        except BaseException as exc:  # surfaces in the consumer, with its traceback
            q.put(exc)

    thread = threading.Thread(target=work, name="raypipe-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            item = q.get()
            if item is done:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        while thread.is_alive():  # unblock a producer waiting on a full queue
            try:
                q.get_nowait()
            except queue.Empty:
                thread.join(timeout=0.05)


def batch_count(n: int, batch_size: int, drop_last: bool = False) -> int:
    """Batches of an epoch over n rows."""
    return n // batch_size if drop_last else -(-n // batch_size)


@dataclass(frozen=True)
class SliceSampling:
    """How CT batches take slices from packed volumes: `n_slices` equidistant, random start when `train`."""

    n_slices: int
    train: bool
    seed: int


def assemble_batch(rows: CachedRows, idx: np.ndarray, epoch: int, ring: BufferRing | None,
                   sampling: SliceSampling | None, moves: StudyMoves | None = None) -> dict[str, torch.Tensor]:
    """One batch of the given rows: `x` gathered in one vectorised step (float16 kept), each study moved when
    `moves` says so (training augmentation, in the buffer), tabular inputs indexed."""
    from raypipe.data.collate import gather_slices, study_uniform

    out: dict[str, torch.Tensor] = {}
    if rows.images is not None:
        dtype = torch.from_numpy(rows.images[:0]).dtype
        if sampling is not None:
            shape = (len(idx), sampling.n_slices, 1, *rows.images.shape[1:])
            buf = ring.get(shape, dtype).numpy() if ring is not None else None
            u = study_uniform(sampling.seed, epoch, rows.keys[idx]) if sampling.train else None
            x = gather_slices(rows.images, rows.starts, rows.counts, idx, sampling.n_slices, u, out=buf)
        else:
            shape = (len(idx), *rows.images.shape[1:])
            x = ring.get(shape, dtype).numpy() if ring is not None else np.empty(shape, rows.images.dtype)
            np.take(rows.images, idx, axis=0, out=x, mode="clip")
        if moves:
            x = moves.apply(x, rows.keys[idx], epoch)
        out["x"] = torch.from_numpy(x)
    for k, v in rows.tabular.items():
        out[k] = torch.from_numpy(v[idx])
    return out


class MemoryLoader:
    """Epochs of batches from cached rows: a seeded order, vectorised assembly into reused (pinned) buffers,
    `prefetch` batches prepared ahead by a background thread."""

    def __init__(self, rows: CachedRows, batch_size: int, sampling: SliceSampling | None, shuffle: bool,
                 seed: int, prefetch: int = DEFAULT_PREFETCH, pin: bool | None = None,
                 drop_last: bool = False, moves: StudyMoves | None = None) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.rows, self.batch_size, self.sampling = rows, batch_size, sampling
        self.shuffle, self.seed, self.prefetch, self.drop_last = shuffle, seed, max(1, prefetch), drop_last
        self.pin = torch.cuda.is_available() if pin is None else pin
        self.ring = BufferRing(self.prefetch + 3, self.pin)
        self.moves = moves

    def __len__(self) -> int:
        """Batches per epoch."""
        return batch_count(len(self.rows), self.batch_size, self.drop_last)

    def epoch(self, epoch: int) -> Iterator[dict[str, torch.Tensor]]:
        """This epoch's batches (each valid until `prefetch + 2` further batches have been taken)."""
        order = epoch_order(len(self.rows), self.seed, epoch, self.shuffle)
        bs = self.batch_size

        def make(i: int) -> dict[str, torch.Tensor]:
            return assemble_batch(self.rows, order[i * bs:(i + 1) * bs], epoch, self.ring, self.sampling, self.moves)

        return prefetched(make, len(self), self.prefetch)
