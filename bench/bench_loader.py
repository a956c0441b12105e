"""Samples/s the real training input path delivers to a consumer that does no compute.

    python bench/bench_loader.py [--only ct,deepsurv] [--ct-studies 512] [--xray-studies 256] [--epochs 6]
                                 [--device auto|cpu|cuda] [--paths cached,streamed,legacy]

Synthetic shards are written in the pipelines' real format (`raypipe.data.ct_pipeline.records_to_table`,
`raypipe.data.xray_pipeline.records_to_table`: Parquet, float16 ragged CT volumes `bone` / `bone_muscle`,
float16 5 x 384 x 384 radiograph patches), read with `load_*_shards`, columns and training rows selected
as `fit_ct` / `fit_deepsurv` do, split as Ray Train's DataConfig does (`streaming_split(1, equal=True)`), and
fed through the functions the Ray Train workers call:

- `cached` (default training path): `raypipe.train.ct.train_loader` / `raypipe.train.deepsurv.train_loader`:
  rows read once (first epoch), then per epoch a seeded permutation, vectorised slice sampling into
  reused (pinned on CUDA) float16 buffers, 4 batches prefetched by a thread;
- `streamed` (`cache_train: false`): `stream_batches`: Ray Data every epoch, vectorised collate, prefetch 4;
- `legacy`: the input path before issue 18 (per-study Python collate to float32, `prefetch_batches=1`,
  256-row local shuffle), for comparison.

The consumer moves each batch's `x` to the device (`non_blocking`; the float16 -> float32 conversion is
the device's work in `_forward`) and nothing else. Epoch 1 of `cached` includes reading the shards; the
steady-state figure is over the later epochs. Every figure is one JSON line {"name", "value", "unit", ...}.
`bench/gpu_check.sh` can call it with `--device cuda` and its own sizes.
"""
from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

log = logging.getLogger("bench_loader")

CT_SIDE = (96, 144)  # bone+muscle crop; the bone crop is 96 x 96


def emit(name: str, value: float, unit: str, **context: Any) -> None:
    """Print one figure as a JSON line."""
    print(json.dumps({"name": name, "value": round(float(value), 3), "unit": unit, **context}), flush=True)


def _scalars(i: int, rng: np.random.Generator) -> dict[str, Any]:
    """Manifest columns of one synthetic study (ids, labels, clinical variables)."""
    event = int(rng.random() < 0.3)
    return {"patient_id": f"P{i:05d}", "study_id": f"S{i:05d}", "split": "train",
            "fracture_5y": float(event), "prevalent_fracture": float(rng.random() < 0.2),
            "time_days": float(rng.uniform(100, 3000)), "event": event,
            "age": float(rng.normal(70, 8)), "sex": "F" if rng.random() < 0.7 else "M", "bmi": float(rng.normal(24, 3))}


def write_ct_shards(out: Path, n: int, slices: tuple[int, int], shard_size: int = 64, seed: int = 0) -> int:
    """CT shards in the CT pipeline's format; returns the bytes of the bone+muscle volumes."""
    from raypipe.data.ct_pipeline import records_to_table
    from raypipe.data.shards import scalar_schema
    import pyarrow.parquet as pq

    rng = np.random.default_rng(seed)
    out.mkdir(parents=True, exist_ok=True)
    pool = rng.normal(0, 0.3, size=(slices[1] + 64, *CT_SIDE)).astype(np.float16)
    total = 0
    for start in range(0, n, shard_size):
        records = []
        for i in range(start, min(n, start + shard_size)):
            s = int(rng.integers(slices[0], slices[1] + 1))
            off = int(rng.integers(0, 64))
            bm = pool[off:off + s] + np.float16(rng.normal(0, 0.1))
            total += bm.nbytes
            records.append({**_scalars(i, rng), "bone": np.ascontiguousarray(bm[:, :, 24:120]), "bone_muscle": bm,
                            "slice_level": ["L1"] * s, "slice_z_mm": np.arange(s, dtype=np.float32) * 5.0,
                            "n_slices": s})
        schema = scalar_schema(pd.DataFrame([_scalars(0, rng)]))
        pq.write_table(records_to_table(records, schema), out / f"part-{start // shard_size:05d}.parquet")
    return total


def write_xray_shards(out: Path, n: int, size: int, channels: int = 5, shard_size: int = 32, seed: int = 0) -> int:
    """X-ray shards in the X-ray pipeline's format (float16 C x size x size patches); returns the image bytes."""
    from raypipe.data.shards import scalar_schema
    from raypipe.data.xray_pipeline import records_to_table
    import pyarrow.parquet as pq

    rng = np.random.default_rng(seed)
    out.mkdir(parents=True, exist_ok=True)
    pool = rng.random(size=(channels + 8, size, size), dtype=np.float32).astype(np.float16)
    total = 0
    for start in range(0, n, shard_size):
        records = []
        for i in range(start, min(n, start + shard_size)):
            off = int(rng.integers(0, 8))
            img = pool[off:off + channels].copy()
            total += img.nbytes
            records.append({**_scalars(i, rng), "image": img, "keypoints": rng.random((20, 2), dtype=np.float32),
                            "keypoints_source": "manifest", "keypoint_confidence": 1.0})
        schema = scalar_schema(pd.DataFrame([_scalars(0, rng)]))
        pq.write_table(records_to_table(records, schema), out / f"part-{start // shard_size:05d}.parquet")
    return total


def consume(batches: Iterable[Mapping[str, torch.Tensor]], device: torch.device,
            expect: Callable[[torch.Tensor], None] | None = None) -> int:
    """Move each batch's images to the device and count samples (no compute)."""
    n = 0
    for b in batches:
        x = b["x"].to(device, non_blocking=True)
        if expect is not None:
            expect(x)
            expect = None
        n += int(x.shape[0])
    if device.type == "cuda":
        torch.cuda.synchronize()
    return n


def timed_epochs(epoch_batches: Callable[[int], Iterable[Mapping[str, torch.Tensor]]], epochs: int,
                 device: torch.device, expect: Callable[[torch.Tensor], None]) -> list[tuple[int, float]]:
    """(samples, seconds) of each epoch."""
    out = []
    for e in range(1, epochs + 1):
        t = time.perf_counter()
        n = consume(epoch_batches(e), device, expect)
        out.append((n, time.perf_counter() - t))
    return out


def report(prefix: str, path: str, epochs: list[tuple[int, float]], **context: Any) -> None:
    """Emit the first-epoch and steady-state (later epochs) samples/s of one path."""
    n1, t1 = epochs[0]
    emit(f"{prefix}_{path}_epoch1_samples_per_s", n1 / t1, "samples/s", epoch_s=round(t1, 3), **context)
    later = epochs[1:]
    if later:
        n, t = sum(e[0] for e in later), sum(e[1] for e in later)
        emit(f"{prefix}_{path}_steady_samples_per_s", n / t, "samples/s", epochs=len(later), **context)


def legacy_slice_collate(image: str, n_slices: int, seed: int, epoch: int) -> Callable[[Mapping[str, Any]], dict]:
    """The CT collate before issue 18: a Python loop over studies, one generator each, float32 stacks."""
    from raypipe.data.collate import stack_cells, study_rng
    from raypipe.preprocess.ct import sample_slices

    def collate(batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        images = []
        for i, cell in enumerate(batch[image]):
            vol = stack_cells(cell)
            rng = study_rng(seed, epoch, batch["study_id"][i])
            images.append(vol[sample_slices(vol.shape[0], n_slices, rng)].astype(np.float32))
        return {"x": torch.from_numpy(np.stack(images)[:, :, None])}

    return collate


def legacy_xray_collate(batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """The X-ray collate before issue 18: float32 conversion on the CPU."""
    from raypipe.data.collate import stack_cells

    return {"x": torch.from_numpy(np.ascontiguousarray(stack_cells(batch["image"]), dtype=np.float32))}


def bench_ct(work: Path, a: argparse.Namespace, device: torch.device) -> None:
    """CT: 14 x 96 x 144 bone+muscle inputs at batch `a.ct_batch` through each requested path."""
    from raypipe.data.ct_pipeline import load_ct_shards
    from raypipe.data.subsets import subset_studies
    from raypipe.train.config import CTTrainConfig
    from raypipe.train.ct import target_columns, stream_batches, train_loader

    nbytes = write_ct_shards(work / "ct", a.ct_studies, (a.min_slices, a.max_slices))
    cfg = CTTrainConfig(pretrained="none", input="bone_muscle", batch_size=a.ct_batch, num_workers=1,
                        prefetch_batches=a.prefetch)
    shards = load_ct_shards(str(work / "ct"), backend="ray")
    ids = [f"S{i:05d}" for i in range(a.ct_studies)]
    columns = ["patient_id", "study_id", cfg.input, *target_columns(cfg)]
    ds = subset_studies(shards.select_columns(columns), ids)  # as fit_ct builds the "train" dataset
    ctx = {"studies": a.ct_studies, "batch": a.ct_batch, "input": [cfg.n_slices, *CT_SIDE], "device": str(device),
           "volume_mib": round(nbytes / 2**20, 1)}

    def expect(x: torch.Tensor) -> None:
        if tuple(x.shape[1:]) != (cfg.n_slices, 1, *CT_SIDE) or x.dtype != torch.float16:
            raise AssertionError(f"CT batch {tuple(x.shape)} {x.dtype}")

    def expect_legacy(x: torch.Tensor) -> None:  # the legacy path produced float32
        if tuple(x.shape[1:]) != (cfg.n_slices, 1, *CT_SIDE) or x.dtype != torch.float32:
            raise AssertionError(f"legacy CT batch {tuple(x.shape)} {x.dtype}")

    for path in a.paths:
        split = ds.streaming_split(1, equal=True)[0]  # what Ray Train's DataConfig hands a single worker
        if path == "cached":
            holder: dict[str, Any] = {}

            def epoch_batches(e: int) -> Iterable[Mapping[str, torch.Tensor]]:
                if "loader" not in holder:
                    holder["loader"] = train_loader(cfg, split, cfg.batch_size, None, target_columns(cfg))
                return holder["loader"].epoch(e)
        elif path == "streamed":
            def epoch_batches(e: int) -> Iterable[Mapping[str, torch.Tensor]]:
                return stream_batches(cfg, split, e, cfg.batch_size, None, target_columns(cfg), pin=device.type == "cuda")
        else:
            def epoch_batches(e: int) -> Iterable[Mapping[str, torch.Tensor]]:
                return split.iter_torch_batches(batch_size=cfg.batch_size, device="cpu",
                                                collate_fn=legacy_slice_collate(cfg.input, cfg.n_slices, 0, e),
                                                local_shuffle_buffer_size=256, local_shuffle_seed=e)
        epochs = timed_epochs(epoch_batches, a.epochs if path == "cached" else a.stream_epochs, device,
                              expect_legacy if path == "legacy" else expect)
        report("loader_ct", path, epochs, **ctx)


def bench_deepsurv(work: Path, a: argparse.Namespace, device: torch.device) -> None:
    """DeepSurv: 5 x size x size float16 patches at batch `a.xray_batch` through each requested path."""
    from raypipe.data.subsets import subset_studies
    from raypipe.data.xray_pipeline import load_xray_shards
    from raypipe.train.deepsurv import XrayBatch, stream_batches, train_loader
    from raypipe.train.xray_config import DeepSurvConfig

    nbytes = write_xray_shards(work / "xray", a.xray_studies, a.size)
    cfg = DeepSurvConfig(pretrained="none", batch_size=a.xray_batch, num_workers=1, prefetch_batches=a.prefetch)
    shards = load_xray_shards(str(work / "xray"), backend="ray")
    ids = [f"S{i:05d}" for i in range(a.xray_studies)]
    ds = subset_studies(shards.select_columns(["patient_id", "study_id", "time_days", "event", "image"]), ids)
    ctx = {"studies": a.xray_studies, "batch": a.xray_batch, "input": [5, a.size, a.size], "device": str(device),
           "images_mib": round(nbytes / 2**20, 1)}
    collate = XrayBatch(None, True, None, None, dtype=np.float16)

    def expect(x: torch.Tensor) -> None:
        if tuple(x.shape[1:]) != (5, a.size, a.size):
            raise AssertionError(f"X-ray batch {tuple(x.shape)} {x.dtype}")

    for path in a.paths:
        split = ds.streaming_split(1, equal=True)[0]
        if path == "cached":
            holder: dict[str, Any] = {}

            def epoch_batches(e: int) -> Iterable[Mapping[str, torch.Tensor]]:
                if "loader" not in holder:
                    holder["loader"] = train_loader(cfg, split, cfg.batch_size, collate)
                return holder["loader"].epoch(e)
        elif path == "streamed":
            def epoch_batches(e: int) -> Iterable[Mapping[str, torch.Tensor]]:
                return stream_batches(cfg, split, e, cfg.batch_size, collate, pin=device.type == "cuda")
        else:
            def epoch_batches(e: int) -> Iterable[Mapping[str, torch.Tensor]]:
                return split.iter_torch_batches(batch_size=cfg.batch_size, device="cpu", collate_fn=legacy_xray_collate,
                                                local_shuffle_buffer_size=256, local_shuffle_seed=e)
        epochs = timed_epochs(epoch_batches, a.epochs if path == "cached" else a.stream_epochs, device, expect)
        report("loader_deepsurv", path, epochs, **ctx)


def main() -> None:
    """Write synthetic shards, run each requested input path and print one JSON line per figure."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default="ct,deepsurv", help="comma list: ct, deepsurv")
    ap.add_argument("--paths", default="cached,streamed", help="comma list: cached, streamed, legacy")
    ap.add_argument("--ct-studies", type=int, default=512)
    ap.add_argument("--min-slices", type=int, default=24)
    ap.add_argument("--max-slices", type=int, default=40)
    ap.add_argument("--ct-batch", type=int, default=128)
    ap.add_argument("--xray-studies", type=int, default=256)
    ap.add_argument("--xray-batch", type=int, default=64)
    ap.add_argument("--size", type=int, default=384, help="side of each L1-L5 patch")
    ap.add_argument("--epochs", type=int, default=6, help="epochs of the cached path (the first reads the shards)")
    ap.add_argument("--stream-epochs", type=int, default=2, help="epochs of the streamed and legacy paths")
    ap.add_argument("--prefetch", type=int, default=4)
    ap.add_argument("--device", default="auto", help="auto (cuda when present), cpu or cuda")
    ap.add_argument("--work", type=Path, default=None, help="folder for the synthetic shards (default: temp)")
    a = ap.parse_args()
    a.paths = [p.strip() for p in a.paths.split(",") if p.strip()]
    unknown = set(a.paths) - {"cached", "streamed", "legacy"}
    if unknown:
        ap.error(f"unknown path(s) {sorted(unknown)}")
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    device = torch.device("cuda" if a.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if a.device == "auto" else a.device))
    from raypipe.ray_utils import init_ray

    init_ray(quiet=True)
    with tempfile.TemporaryDirectory(prefix="bench_loader_") as tmp:
        work = a.work or Path(tmp)
        only = {s.strip() for s in a.only.split(",")}
        if "ct" in only:
            bench_ct(work, a, device)
        if "deepsurv" in only:
            bench_deepsurv(work, a, device)


if __name__ == "__main__":
    main()
