"""Epoch overheads of a real fit: wall time per epoch after the first vs its pure step time (issue 18, item 2).

    python bench/bench_epoch_overhead.py [--studies 300] [--epochs 5] [--model cnn_rnn_tiny] [--batch 32]

Writes synthetic CT shards in the pipeline's real format (`bench_loader.write_ct_shards`, bone+muscle
14 x 96 x 144 inputs), runs `raypipe.train.ct.fit_ct` with one Ray Train worker on the CPU (the config's
defaults otherwise: checkpoints of improved epochs, validation every epoch), and reads the per-epoch time
breakdown the worker loop writes into metrics.csv (`time_step_s`, `time_data_s`, `time_val_s`,
`time_epoch_s`, `epoch_started`). An epoch's wall time is the difference of two consecutive starts, so it
includes the checkpoint and the report; the last epoch is left out (no next start). Prints one JSON line
per figure; the ratio (unit `x`) is the goal "<= 1.3x".
"""
from __future__ import annotations

import argparse
import csv
import json
import logging
import tempfile
from pathlib import Path
from typing import Any

from bench_loader import write_ct_shards


def emit(name: str, value: float, unit: str, **context: Any) -> None:
    """Print one figure as a JSON line."""
    print(json.dumps({"name": name, "value": round(float(value), 4), "unit": unit, **context}), flush=True)


def epoch_figures(rows: list[dict[str, str]]) -> dict[str, float]:
    """Mean wall time, step time, data wait and validation of epochs 2..E-1, and wall / step."""
    starts = [float(r["epoch_started"]) for r in rows]
    steady = range(1, len(rows) - 1)
    if not steady:
        raise ValueError("need at least 3 epochs: the first is warm-up and the last has no next start")
    wall = sum(starts[i + 1] - starts[i] for i in steady) / len(steady)
    mean = {k: sum(float(rows[i][k]) for i in steady) / len(steady)
            for k in ("time_step_s", "time_data_s", "time_val_s", "time_epoch_s")}
    return {"epoch_wall_s": wall, **mean, "ratio": wall / mean["time_step_s"]}


def main() -> None:
    """Fit once and print the epoch time breakdown and the wall/step ratio."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--studies", type=int, default=300)
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--model", default="cnn_rnn_tiny")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--work", type=Path, default=None)
    a = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    from raypipe.train.config import CTTrainConfig
    from raypipe.train.ct import fit_ct

    with tempfile.TemporaryDirectory(prefix="bench_epoch_") as tmp:
        work = a.work or Path(tmp)
        write_ct_shards(work / "shards", a.studies, (24, 40))
        cfg = CTTrainConfig(model=a.model, pretrained="none", input="bone_muscle", num_workers=1, epochs=a.epochs,
                            patience=a.epochs, batch_size=a.batch, lr=1e-3, n_boot=10, max_failures=0)
        fit_ct(cfg, str(work / "shards"), str(work / "run"))
        with open(work / "run" / "metrics.csv") as f:
            rows = list(csv.DictReader(f))
    figures = epoch_figures(rows)
    ctx = {"studies": a.studies, "train_samples": float(rows[-1]["train_samples"]), "model": a.model,
           "batch": a.batch, "epochs": a.epochs, "workers": 1, "device": "cpu"}
    emit("epoch_wall_s", figures["epoch_wall_s"], "s", **ctx)
    emit("epoch_step_s", figures["time_step_s"], "s", **ctx)
    emit("epoch_data_wait_s", figures["time_data_s"], "s", **ctx)
    emit("epoch_validation_s", figures["time_val_s"], "s", **ctx)
    emit("epoch_wall_over_step", figures["ratio"], "x", goal=1.3, **ctx)


if __name__ == "__main__":
    main()
