"""Validation split over ranks and gathered gives the metrics one worker computes (real gloo collectives, 2 CPU ranks).

Each rank scores its round-robin share of the validation rows; `gather_shares` puts the outputs back in
study-id order on every rank and the metrics (per-batch losses included) are computed from all of them.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from raypipe.train.common import gather_shares, select_device, share_of
from raypipe.train.config import CTTrainConfig, MultitaskConfig
from raypipe.train.xray_config import DeepSurvConfig

N_ROWS = 11  # odd: the two shares differ in size


def _ct_batches(seed: int = 0) -> list[dict[str, np.ndarray]]:
    """Validation rows as Ray Data hands them: ragged float16 volumes, labels, survival times; ids out of order."""
    rng = np.random.default_rng(seed)
    ids = [f"S{i:02d}" for i in rng.permutation(N_ROWS)]
    vols = np.empty(N_ROWS, dtype=object)
    vols[:] = [rng.normal(size=(int(rng.integers(14, 30)), 32, 32)).astype(np.float16) for _ in ids]
    event = rng.integers(0, 2, N_ROWS)
    cols = {"study_id": np.array(ids), "bone": vols, "fracture_5y": rng.integers(0, 2, N_ROWS).astype(float),
            "prevalent_fracture": rng.integers(0, 2, N_ROWS).astype(float), "event": event,
            "time_days": rng.uniform(100, 3000, N_ROWS)}
    return [{k: v[:6] for k, v in cols.items()}, {k: v[6:] for k, v in cols.items()}]


def _xray_batches(seed: int = 1) -> list[dict[str, np.ndarray]]:
    """X-ray validation rows: float16 5 x 32 x 32 images, times and events."""
    rng = np.random.default_rng(seed)
    ids = np.array([f"X{i:02d}" for i in rng.permutation(N_ROWS)])
    cols = {"study_id": ids, "image": rng.normal(size=(N_ROWS, 5, 32, 32)).astype(np.float16),
            "time_days": rng.uniform(100, 3000, N_ROWS), "event": np.r_[1, rng.integers(0, 2, N_ROWS - 1)]}
    return [{k: v[:4] for k, v in cols.items()}, {k: v[4:] for k, v in cols.items()}]


def _metrics(kind: str) -> dict[str, float]:
    """Validation metrics of one fixed model on this process's share (all rows without a process group)."""
    torch.manual_seed(0)
    setup = select_device(False, torch.device("cpu"))
    if kind == "deepsurv":
        from raypipe.train.deepsurv import XrayBatch, build, validate_shares, xray_validation_rows

        cfg = DeepSurvConfig(model="deepsurv_tiny", pretrained="none", eval_batch_size=4, num_workers=1)
        model = build(cfg, 0, 5).eval()
        val = xray_validation_rows(_xray_batches(), XrayBatch(None, True, None, None, dtype=np.float16))
        return validate_shares(cfg, model, setup, val, {})
    from raypipe.train.ct import build, validate_shares, validation_rows

    cls = MultitaskConfig if kind == "multitask" else CTTrainConfig
    cfg = cls(model=f"{'multitask' if kind == 'multitask' else 'cnn_rnn'}_tiny", pretrained="none", input="bone",
              eval_batch_size=4, num_workers=1, model_kwargs={"dropout": 0.0})
    model = build(cfg, 0).eval()
    return validate_shares(cfg, model, setup, validation_rows(cfg, _ct_batches(), None))


def _rank_main(rank: int, store: str, out: str, kind: str) -> None:
    """One of two gloo ranks: validate its share, write the gathered metrics."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        metrics = _metrics(kind)
        Path(out, f"rank{rank}.json").write_text(json.dumps(metrics))
    finally:
        dist.destroy_process_group()


def _gather_main(rank: int, store: str, out: str) -> None:
    """One of two gloo ranks: send this rank's share of 0..6 (times 10), write the gathered rows."""
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        local = torch.from_numpy(share_of(7).astype(np.float32) * 10).reshape(-1, 1)
        full = gather_shares(local, 7, torch.device("cpu"))
        Path(out, f"gather{rank}.json").write_text(json.dumps(full[:, 0].tolist()))
    finally:
        dist.destroy_process_group()


def _spawn(fn, args: tuple, tmp_path: Path) -> None:
    """Run `fn(rank, *args)` in two processes (spawn: a clean torch in each)."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    mp.start_processes(fn, args=args, nprocs=2, join=True, start_method="spawn")


def test_gather_shares_restores_the_original_order(tmp_path: Path) -> None:
    assert share_of(7, 0, 2).tolist() == [0, 2, 4, 6] and share_of(7, 1, 2).tolist() == [1, 3, 5]
    _spawn(_gather_main, (str(tmp_path / "store"), str(tmp_path)), tmp_path)
    for r in (0, 1):
        assert json.loads((tmp_path / f"gather{r}.json").read_text()) == [0.0, 10.0, 20.0, 30.0, 40.0, 50.0, 60.0]
    with pytest.raises(ValueError, match="expected 5"):
        gather_shares(torch.zeros(4, 1), 5)


@pytest.mark.parametrize("kind", ["cnn_rnn", "multitask", "deepsurv"])
def test_two_rank_validation_equals_one_worker(tmp_path: Path, kind: str) -> None:
    single = _metrics(kind)
    assert all(np.isfinite(v) for v in single.values()), single
    _spawn(_rank_main, (str(tmp_path / "store"), str(tmp_path), kind), tmp_path)
    for r in (0, 1):
        split = json.loads((tmp_path / f"rank{r}.json").read_text())
        assert split.keys() == single.keys()
        for k, v in single.items():
            assert split[k] == pytest.approx(v, rel=1e-6, abs=1e-6), (r, k, split[k], v)
