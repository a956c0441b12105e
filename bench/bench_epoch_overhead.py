"""Epoch overheads of a real fit: wall time per epoch after the first vs its pure step time (issue 18, item 2).

    python bench/bench_epoch_overhead.py [--studies 300] [--epochs 5] [--model cnn_rnn_tiny] [--batch 32]
    python bench/bench_epoch_overhead.py --task pvf [--studies 300] [--epochs 5] [--manifest cohort/manifest.csv]

Writes synthetic CT shards in the pipeline's real format (`bench_loader.write_ct_shards`, bone+muscle
14 x 96 x 144 inputs), runs `raypipe.train.ct.fit_ct` with one Ray Train worker on the CPU (the config's
defaults otherwise: checkpoints of improved epochs, validation every epoch), and reads the per-epoch time
breakdown the worker loop writes into metrics.csv (`time_step_s`, `time_data_s`, `time_val_s`,
`time_epoch_s`, `epoch_started`). An epoch's wall time is the difference of two consecutive starts, so it
includes the checkpoint and the report; the last epoch is left out (no next start). Prints one JSON line
per figure; the ratio (unit `x`) is the goal "<= 1.3x".

`--task pvf` fits the tiny pVF classifier (`jobs/configs/pvf_tiny.yaml`, 256 x 192) on a synthetic X-ray cohort
from `raypipe synth` (radiographs read from DICOM by Ray Data; `--manifest` reuses one) twice, side by side:
training inputs cached in memory after the first epoch (`cache_train: true`, the default) and decoded every
epoch (`cache_train: false`); it prints both breakdowns and the steady-epoch speed-up of the cache.
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


def pvf_epochs(manifest: Path, work: Path, epochs: int, cache: bool) -> tuple[list[dict[str, str]], int]:
    """metrics.csv rows of one tiny pVF fit (1 CPU worker) and its training radiograph count."""
    from raypipe.config import load_config
    from raypipe.train.pvf import PVFTrainConfig, fit_pvf

    root = Path(__file__).resolve().parents[1]
    cfg = load_config(PVFTrainConfig, root / "jobs" / "configs" / "pvf_tiny.yaml",
                      {"input_size": [256, 192], "epochs": epochs, "patience": epochs, "gradcam_images": 0,
                       "n_boot": 10, "cache_train": cache, "max_failures": 0})
    out = work / ("pvf_cached" if cache else "pvf_streamed")
    fit_pvf(cfg, str(manifest), str(out))
    with open(out / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    return rows, int(float(rows[-1].get("train_samples") or 0))


def main_pvf(a: argparse.Namespace, work: Path) -> None:
    """pVF: cached vs streamed training inputs, side by side on one cohort."""
    from raypipe.data.synth import synth_cohort

    manifest = a.manifest or Path(synth_cohort("xray", work / "cohort", patients=a.studies, seed=0))
    figures = {}
    for cache in (True, False):
        rows, n = pvf_epochs(manifest, work, a.epochs, cache)
        figures[cache] = f = epoch_figures(rows)
        ctx = {"task": "pvf", "cache_train": cache, "train_samples": n, "model": "pvf_tiny 256x192",
               "epochs": a.epochs, "workers": 1, "device": "cpu"}
        emit("epoch_wall_s", f["epoch_wall_s"], "s", **ctx)
        emit("epoch_step_s", f["time_step_s"], "s", **ctx)
        emit("epoch_data_wait_s", f["time_data_s"], "s", **ctx)
        emit("epoch_validation_s", f["time_val_s"], "s", **ctx)
        emit("epoch_wall_over_step", f["ratio"], "x", **ctx)
    emit("pvf_cache_speedup", figures[False]["epoch_wall_s"] / figures[True]["epoch_wall_s"], "x",
         task="pvf", what="steady epoch wall time, streamed / cached")


def main() -> None:
    """Fit once and print the epoch time breakdown and the wall/step ratio."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--studies", type=int, default=300)
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--model", default="cnn_rnn_tiny")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--work", type=Path, default=None)
    ap.add_argument("--task", choices=("ct", "pvf"), default="ct")
    ap.add_argument("--manifest", type=Path, default=None, help="pvf: an existing synthetic X-ray manifest")
    a = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if a.task == "pvf":
        with tempfile.TemporaryDirectory(prefix="bench_epoch_") as tmp:
            return main_pvf(a, a.work or Path(tmp))
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
