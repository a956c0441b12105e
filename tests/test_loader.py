"""The training input path: vectorised slice sampling keeps the paper's rule, the in-memory loader serves what the
streaming collate would, and prefetching surfaces errors. Pure NumPy/torch: no Ray needed here."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from raypipe.data.collate import SliceBatch, gather_slices, slice_positions, study_keys, study_uniform, tabular_tensors
from raypipe.data.memory import BufferRing, MemoryLoader, SliceSampling, cache_rows, epoch_order, prefetched
from raypipe.preprocess.ct import sample_slices


class _FixedUniform:
    """A generator whose `uniform(a, b)` returns a + u (b - a): `sample_slices` with a known draw."""

    def __init__(self, u: float) -> None:
        self.u = u

    def uniform(self, low: float, high: float) -> float:
        return low + self.u * (high - low)


def _batches(n: int, seed: int = 0, per_batch: int = 5) -> list[dict[str, np.ndarray]]:
    """Ray-Data-like numpy batches of ragged CT volumes (object column), labels and ids."""
    rng = np.random.default_rng(seed)
    out = []
    for start in range(0, n, per_batch):
        ids = [f"S{i:03d}" for i in range(start, min(n, start + per_batch))]
        vols = np.empty(len(ids), dtype=object)
        vols[:] = [rng.normal(size=(int(rng.integers(3, 40)), 4, 6)).astype(np.float16) for _ in ids]
        out.append({"study_id": np.array(ids), "bone": vols,
                    "fracture_5y": rng.integers(0, 2, len(ids)).astype(np.float64)})
    return out


def test_vectorised_positions_follow_sample_slices() -> None:
    counts = np.array([1, 5, 13, 14, 15, 34, 56, 101])
    np.testing.assert_array_equal(slice_positions(counts, 14), np.stack([sample_slices(int(c), 14) for c in counts]))
    u = np.array([0.0, 0.1, 0.5, 0.99, 0.3, 0.7, 0.25, 0.999])
    expected = np.stack([sample_slices(int(c), 14, _FixedUniform(v)) for c, v in zip(counts, u)])
    np.testing.assert_array_equal(slice_positions(counts, 14, u), expected)
    with pytest.raises(ValueError, match="0 slices"):
        slice_positions(np.array([3, 0]), 14)


def test_study_uniform_is_seeded_per_study_and_uniform() -> None:
    keys = study_keys([f"S{i}" for i in range(20_000)])
    u = study_uniform(0, 1, keys)
    assert u.min() >= 0.0 and u.max() < 1.0
    np.testing.assert_array_equal(u, study_uniform(0, 1, keys))
    np.testing.assert_array_equal(u[5:7], study_uniform(0, 1, keys[5:7]))  # one study's draw ignores its batch
    assert not np.allclose(u, study_uniform(0, 2, keys)) and not np.allclose(u, study_uniform(1, 1, keys))
    hist = np.histogram(u, bins=10, range=(0, 1))[0]
    assert hist.min() > 1_800 and hist.max() < 2_200  # ~2,000 per bin


def test_slice_batch_matches_a_per_study_loop() -> None:
    batch = _batches(5)[0]
    out = SliceBatch("bone", 14, True, seed=3, epoch=2, clinical=None, targets=["fracture_5y"])(batch)
    u = study_uniform(3, 2, study_keys(batch["study_id"]))
    ref = np.stack([v[sample_slices(v.shape[0], 14, _FixedUniform(x))] for v, x in zip(batch["bone"], u)])
    assert out["x"].dtype == torch.float32 and out["x"].shape == (5, 14, 1, 4, 6)
    np.testing.assert_array_equal(out["x"].numpy()[:, :, 0], ref.astype(np.float32))
    np.testing.assert_array_equal(out["fracture_5y"].numpy(), batch["fracture_5y"].astype(np.float32))
    half = SliceBatch("bone", 14, False, 0, 0, None, [], dtype=np.float16)(batch)
    centred = np.stack([v[sample_slices(v.shape[0], 14)] for v in batch["bone"]])
    assert half["x"].dtype == torch.float16
    np.testing.assert_array_equal(half["x"].numpy()[:, :, 0], centred)


def test_memory_loader_serves_what_the_streaming_collate_gives() -> None:
    batches = _batches(23)
    rows = cache_rows(batches, "bone", True, lambda b: tabular_tensors(b, None, ["fracture_5y"], len(b["study_id"])))
    assert len(rows) == 23 and rows.images.dtype == np.float16
    loader = MemoryLoader(rows, 8, SliceSampling(14, True, seed=3), shuffle=True, seed=3, prefetch=4, pin=False)
    assert len(loader) == 3
    x = torch.cat([b["x"].clone() for b in loader.epoch(2)])  # clone: the loader reuses its buffers
    order = epoch_order(23, 3, 2, True)
    assert sorted(order.tolist()) == list(range(23)) and order.tolist() != list(range(23))
    assert not np.array_equal(order, epoch_order(23, 3, 3, True))
    everything = {sid: v for b in batches for sid, v in zip(b["study_id"], b["bone"])}
    streamed = SliceBatch("bone", 14, True, 3, 2, None, [], dtype=np.float16)(
        {"study_id": rows.study_ids[order], "bone": _objects([everything[s] for s in rows.study_ids[order]])})
    np.testing.assert_array_equal(x.numpy(), streamed["x"].numpy())  # same study, seed, epoch: same slices
    labels = torch.cat([b["fracture_5y"] for b in loader.epoch(2)]).numpy()
    np.testing.assert_array_equal(labels, rows.tabular["fracture_5y"][order])


def _objects(arrays: list[np.ndarray]) -> np.ndarray:
    """An object column of ragged arrays (as Ray Data hands variable-shaped tensors)."""
    col = np.empty(len(arrays), dtype=object)
    col[:] = arrays
    return col


def test_gather_into_a_reused_buffer_and_refuse_a_wrong_one() -> None:
    vols = [np.full((n, 2, 3), n, dtype=np.float16) for n in (4, 20)]
    slices = np.concatenate(vols)
    starts, counts = np.array([0, 4]), np.array([4, 20])
    ring = BufferRing(2, pin=False)
    buf = ring.get((2, 14, 1, 2, 3), torch.float16)
    out = gather_slices(slices, starts, counts, np.array([1, 0]), 14, None, out=buf.numpy())
    assert np.all(buf.numpy()[0] == 20) and np.all(buf.numpy()[1] == 4) and out.base is not None
    assert ring.get((2, 14, 1, 2, 3), torch.float16) is not buf and ring.get((2, 14, 1, 2, 3), torch.float16) is buf
    with pytest.raises(ValueError, match="does not fit"):
        gather_slices(slices, starts, counts, np.array([0]), 14, None, out=np.empty((1, 13, 1, 2, 3), np.float16))


def test_prefetch_keeps_order_and_raises_the_producers_error() -> None:
    assert [b["i"].item() for b in prefetched(lambda i: {"i": torch.tensor(i)}, 7, 4)] == list(range(7))

    def broken(i: int) -> dict[str, torch.Tensor]:
        if i == 3:
            raise RuntimeError("bad row 3")
        return {"i": torch.tensor(i)}

    got = []
    with pytest.raises(RuntimeError, match="bad row 3"):
        for b in prefetched(broken, 10, 4):
            got.append(b["i"].item())
    assert got == [0, 1, 2]
    first = next(iter(prefetched(lambda i: {"i": torch.tensor(i)}, 1000, 2)))  # abandoned early: no hang
    assert first["i"].item() == 0


def test_cached_rows_come_in_study_order_whatever_the_block_order() -> None:
    """Ray Data's block order varies between runs; the cache must not (seeded epochs then draw the same batches)."""
    import numpy as np
    import torch

    from raypipe.data.memory import cache_rows

    rng = np.random.default_rng(0)
    ids = np.array([f"S{i:03d}" for i in range(6)], dtype=object)
    vols = [rng.random((3 + i, 2, 2)).astype(np.float16) for i in range(6)]
    label = np.arange(6, dtype=np.float32)

    def batches(order):
        return [{"study_id": ids[o], "image": [vols[i] for i in o], "y": label[o]} for o in order]

    def tab(b):
        return {"y": torch.as_tensor(b["y"])}

    a = cache_rows(batches([[3, 1], [5, 0, 4], [2]]), "image", True, tab)
    b = cache_rows(batches([[0, 1, 2], [3, 4, 5]]), "image", True, tab)
    for rows in (a, b):
        assert list(rows.study_ids) == list(ids)
        assert np.array_equal(rows.tabular["y"], label)
        for i in range(6):
            s, c = rows.starts[i], rows.counts[i]
            assert np.array_equal(rows.images[s:s + c], vols[i])
