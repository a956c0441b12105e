"""CT training on real local Ray: a planted signal is learnt, DDP matches one worker, runs resume, multitask writes.

The shards are written by `write_planted_shards` in the CT pipeline's format (Parquet, one row per study,
ragged float16 `bone` S x 96 x 96 as a Ray tensor column): each patient has a latent bone quality z; the
vertebral body's trabecular intensity falls with z, and the 5-year fracture label is z plus noise over a
threshold. The AUROC of z itself on the held-out rows is the ceiling any image model can reach.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from raypipe.train.config import CTTrainConfig, MultitaskConfig

TINY = {"dropout": 0.0}  # tiny backbone comes from the registry's cnn_rnn_tiny / multitask_tiny preset


def write_planted_shards(out: Path, n_patients: int, seed: int = 0, test_fraction: float = 0.0,
                         val_every: int = 0, side: int = 96) -> pd.DataFrame:
    """CT shards with a learnable signal; returns the per-study truth (patient, split, z, labels)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from ray.data.extensions import ArrowVariableShapedTensorArray

    rng = np.random.default_rng(seed)
    out.mkdir(parents=True, exist_ok=True)
    yy, xx = np.mgrid[:side, :side]
    body = (yy - side / 2) ** 2 + (xx - side / 2) ** 2 < (side * 0.3) ** 2
    rows, images = [], []
    for i in range(n_patients):
        z = rng.normal()
        y5 = float(z + 0.5 * rng.normal() > 0.5)
        n_slices = int(rng.integers(16, 24))
        vol = rng.normal(-0.8, 0.05, size=(n_slices, side, side))
        trabecular = 0.2 - 0.25 * z + rng.normal(0, 0.15, size=(n_slices, side, side))
        vol[:, body] = trabecular[:, body]
        images.append(vol.astype(np.float16))
        event = int(y5)
        time = rng.uniform(100, 1800) if event else rng.uniform(1900, 3000)
        rows.append({
            "patient_id": f"P{i:04d}", "study_id": f"S{i:04d}", "time_days": float(time), "event": event,
            "fracture_5y": y5, "prevalent_fracture": float(rng.random() < 1 / (1 + np.exp(-(2 * z - 1)))),
            "age": float(rng.normal(70, 8)), "sex": "F" if rng.random() < 0.7 else "M",
            "bmi": float(rng.normal(24, 3)), "z": z,
            "split": "test" if rng.random() < test_fraction else ("val" if val_every and i % val_every == 0 else "train"),
        })
    truth = pd.DataFrame(rows)
    table = pa.Table.from_pandas(truth.drop(columns="z"), preserve_index=False)
    table = table.append_column("bone", ArrowVariableShapedTensorArray.from_numpy(images))
    table = table.append_column("slice_z_mm", pa.array([np.arange(len(v), dtype=np.float32) for v in images]))
    half = len(rows) // 2
    pq.write_table(table.slice(0, half), out / "part-00000.parquet")
    pq.write_table(table.slice(half), out / "part-00001.parquet")
    return truth


def _tiny_cfg(**kw) -> CTTrainConfig:
    base = dict(model="cnn_rnn_tiny", pretrained="none", model_kwargs=TINY, input="bone", lr=3e-3, batch_size=16, eval_batch_size=32,
                epochs=8, patience=8, num_workers=1, n_boot=50, shuffle_buffer=0, max_failures=0)
    return CTTrainConfig(**{**base, **kw})


def _auroc(y, s) -> float:
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(y, s))


def test_cnn_rnn_learns_planted_signal(ray_session, tmp_path):
    """Held-out AUROC >= 0.75 and within 0.15 of the ceiling (AUROC of the planted z on the same rows)."""
    from raypipe.predictions import read_predictions
    from raypipe.train.ct import fit_ct

    truth = write_planted_shards(tmp_path / "shards", 200, seed=1, test_fraction=0.3)
    cfg = _tiny_cfg(use_clinical=True, clinical_columns=["age", "sex", "bmi"], num_workers=2, epochs=5)
    fit_ct(cfg, str(tmp_path / "shards"), str(tmp_path / "run"))
    run = tmp_path / "run"
    for name in ("predictions.parquet", "metrics.json", "config.yaml", "metrics.csv", "model.pt", "model_meta.json"):
        assert (run / name).is_file(), name
    preds = read_predictions(run / "predictions.parquet")
    assert set(preds["split"]) == {"val", "test"}
    test = preds[preds["split"] == "test"].merge(truth[["study_id", "z"]], on="study_id")
    model_auc = _auroc(test["fracture_5y"], test["score"])
    ceiling = _auroc(test["fracture_5y"], -test["z"])  # low z = low bone quality = fracture
    assert model_auc >= 0.75, (model_auc, ceiling)
    assert model_auc >= ceiling - 0.15, (model_auc, ceiling)
    metrics = json.loads((run / "metrics.json").read_text())
    assert abs(metrics["models"][cfg.name]["auroc"]["value"] - model_auc) < 1e-9
    meta = json.loads((run / "model_meta.json").read_text())
    assert meta["clinical"]["columns"] == ["age", "sex", "bmi"] and len(meta["clinical"]["mean"]) == 3
    import torch

    from raypipe.models.registry import build_model

    state = torch.load(run / "model.pt", weights_only=True)
    build_model(meta["builder"], **meta["kwargs"]).load_state_dict(state)


def test_ddp_two_workers_match_one(ray_session, tmp_path):
    """Same global batch, 2 workers vs 1: the same loss curve.

    One step per epoch over the whole training set (global batch >= training rows, an even count so
    Ray's equal split gives both workers the same number of rows): DDP's gradient average over two
    equal halves is the gradient of the full batch. Slice starts are seeded by (seed, epoch, study), not
    by worker; dropout is off and BatchNorm is frozen (running statistics), since batch statistics over
    half a batch differ from those over the whole one (SyncBatchNorm would be the GPU alternative).
    """
    import csv

    from raypipe.train.ct import fit_ct

    write_planted_shards(tmp_path / "shards", 40, seed=2, val_every=5)  # 8 val, 32 train studies
    curves = {}
    for n in (1, 2):
        cfg = _tiny_cfg(num_workers=n, batch_size=64, epochs=3, patience=3, freeze_batchnorm=True)
        fit_ct(cfg, str(tmp_path / "shards"), str(tmp_path / f"run{n}"))
        with open(tmp_path / f"run{n}" / "metrics.csv") as f:
            curves[n] = list(csv.DictReader(f))
    assert [r["epoch"] for r in curves[1]] == ["1", "2", "3"]
    for a, b in zip(curves[1], curves[2]):
        assert float(a["train_samples"]) == float(b["train_samples"]) == 32
        assert float(a["train_loss"]) == pytest.approx(float(b["train_loss"]), rel=1e-4, abs=1e-5)
        assert float(a["val_loss"]) == pytest.approx(float(b["val_loss"]), rel=1e-4, abs=1e-5)
    assert float(curves[1][0]["train_loss"]) != pytest.approx(float(curves[1][-1]["train_loss"]), abs=1e-4)


def test_resume_continues_after_last_epoch(ray_session, tmp_path):
    """Stop after epoch 2, rerun on the same storage: epochs 3-4 run, epochs 1-2 keep their metrics."""
    import csv

    from raypipe.train.ct import fit_ct

    write_planted_shards(tmp_path / "shards", 24, seed=3)
    fit_ct(_tiny_cfg(epochs=4, stop_after_epoch=2, patience=10), str(tmp_path / "shards"), str(tmp_path / "run"))
    with open(tmp_path / "run" / "metrics.csv") as f:
        first = list(csv.DictReader(f))
    assert [r["epoch"] for r in first] == ["1", "2"]
    fit_ct(_tiny_cfg(epochs=4, patience=10), str(tmp_path / "shards"), str(tmp_path / "run"))
    with open(tmp_path / "run" / "metrics.csv") as f:
        second = list(csv.DictReader(f))
    assert [r["epoch"] for r in second] == ["1", "2", "3", "4"]
    assert second[:2] == first  # earlier epochs were not rerun
    meta = json.loads((tmp_path / "run" / "model_meta.json").read_text())
    assert meta["epochs_run"] == 4


def test_multitask_tiny_writes_both_heads(ray_session, tmp_path):
    """Multitask: Cox log-risk and prevalent-fracture probability (plus horizons) in one predictions file."""
    from raypipe.predictions import read_predictions
    from raypipe.train.ct import fit_ct

    write_planted_shards(tmp_path / "shards", 40, seed=4, test_fraction=0.3)
    cfg = MultitaskConfig(model="multitask_tiny", pretrained="none", model_kwargs=TINY, input="bone", lr=3e-3, batch_size=16,
                          epochs=2, num_workers=2, n_boot=20, shuffle_buffer=0, max_failures=0)
    fit_ct(cfg, str(tmp_path / "shards"), str(tmp_path / "run"))
    preds = read_predictions(tmp_path / "run" / "predictions.parquet")
    kinds = preds.groupby("model")["score_kind"].first().to_dict()
    assert kinds[cfg.name] == "log_risk"
    assert kinds[f"{cfg.name}-prevalent"] == "probability"
    assert {f"{cfg.name}-{h:g}y" for h in cfg.horizons_years} <= set(kinds)
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert "c_index" in metrics["models"][cfg.name]
    with open(tmp_path / "run" / "metrics.csv") as f:
        header = f.readline()
    assert "val_c_index" in header and "val_prevalent_auroc" in header


def test_config_defaults_follow_the_paper():
    """Paper 000: Adam, lr 1e-5, batch 128, 14 slices, fracture_5y; paper 002: 2/3/5-year horizons."""
    c = CTTrainConfig(pretrained="none")
    assert (c.optimizer, c.lr, c.batch_size, c.n_slices, c.label, c.model) == ("adam", 1e-5, 128, 14, "fracture_5y",
                                                                               "cnn_rnn")
    m = MultitaskConfig(pretrained="none")
    assert m.horizons_years == [2.0, 3.0, 5.0] and m.cox_ties == "efron"
    with pytest.raises(Exception):
        CTTrainConfig(lr_typo=1.0)


def test_checkpoint_every_k_epochs_keeps_best_and_last(ray_session, tmp_path):
    """checkpoint_every=3 over 4 epochs: epoch 1 (the best), 3 (every 3rd) and 4 (last) are saved, epoch 2 is not."""
    from raypipe.train.ct import fit_ct

    write_planted_shards(tmp_path / "shards", 24, seed=9, val_every=4)
    cfg = _tiny_cfg(epochs=4, patience=10, lr=1e-12, checkpoint_every=3, num_to_keep=10, n_boot=10,
                    freeze_batchnorm=True)  # no learning, no BatchNorm drift: only epoch 1 improves
    fit_ct(cfg, str(tmp_path / "shards"), str(tmp_path / "run"))
    saved = sorted(p.name for p in (tmp_path / "run" / "ray_results" / "train").glob("checkpoint_epoch_*"))
    assert saved == ["checkpoint_epoch_0001", "checkpoint_epoch_0003", "checkpoint_epoch_0004"]
    assert len((tmp_path / "run" / "metrics.csv").read_text().strip().splitlines()) == 5  # every epoch still logged


def test_epoch_rows_carry_their_time_breakdown(ray_session, tmp_path):
    """metrics.csv: per epoch, step time, data wait and validation lie within the epoch; epochs start in order."""
    import csv

    from raypipe.train.ct import fit_ct

    write_planted_shards(tmp_path / "shards", 24, seed=5, val_every=4)
    fit_ct(_tiny_cfg(epochs=3, patience=10, batch_size=8), str(tmp_path / "shards"), str(tmp_path / "run"))
    with open(tmp_path / "run" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["epoch"] for r in rows] == ["1", "2", "3"]
    for r in rows:
        step, data, val, epoch = (float(r[k]) for k in ("time_step_s", "time_data_s", "time_val_s", "time_epoch_s"))
        assert step > 0 and data >= 0 and val > 0
        assert step + data + val <= epoch  # disjoint parts of the epoch's interval
        assert int(r["steps"]) == 3  # 18 training studies (6 validation) in batches of 8
    starts = [float(r["epoch_started"]) for r in rows]
    assert starts == sorted(starts) and len(set(starts)) == 3
    for r, nxt in zip(rows, starts[1:]):
        assert nxt - float(r["epoch_started"]) >= float(r["time_epoch_s"]) - 0.01  # an epoch ends before the next starts


def test_workers_report_through_a_short_controller_poll(ray_session, tmp_path):
    """Ray Train's controller takes reports every REPORT_POLL_S, not its default 2 s (a tiny epoch used to wait ~1.7 s
    for the poll): the interval `make_trainer` sets reaches the controller and, through it, every worker."""
    from raypipe.train.common import REPORT_POLL_ENV, REPORT_POLL_S, make_trainer

    seen = tmp_path / "poll.txt"

    def loop(config: dict) -> None:
        seen.write_text(os.environ.get(REPORT_POLL_ENV, "unset"))

    make_trainer(loop, {}, {}, _tiny_cfg(run_name="poll"), str(tmp_path / "ray")).fit()
    assert float(seen.read_text()) == REPORT_POLL_S
