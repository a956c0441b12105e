"""Scaling figures, measured side by side in one run: training samples/s with 1 vs 2 Ray Train workers,
preprocessing studies/s with 1 vs 2 Ray nodes (a local `ray.cluster_utils.Cluster`), and on a CUDA
device the single-GPU bf16 training throughput of the CT (CNN-RNN) and X-ray (DeepSurv) models.

    .venv/bin/python bench/scaling.py [--studies 8] [--train-patients 64] [--epochs 3] [--out bench/out/scaling]

On one host the "nodes" share its cores, so the node ratio shows the scheduling overhead, not the gain a
real second machine brings; the worker ratio likewise depends on free cores. Figures go to the log and
OUT/scaling.json.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from _report import figure

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

log = logging.getLogger("raypipe.bench.scaling")


class EpochClock:
    """Ray Train callback (runs in the controller) appending a timestamp per report, to time epochs."""

    def __new__(cls, path: str) -> Any:
        from ray.train import UserCallback

        class _Clock(UserCallback):
            def __init__(self, target: str) -> None:
                self.target = target

            def after_report(self, run_context: Any, metrics: list, checkpoint: Any) -> None:
                with open(self.target, "a") as f:
                    f.write(f"{time.time()}\n")

        return _Clock(path)


def planted_shards(out: Path, n: int, seed: int = 0, side: int = 96) -> None:
    """CT-like shards (`bone`, S x side x side float16) with a label, like the tests' planted cohort."""
    import pandas as pd
    import pyarrow as pa
    import pyarrow.parquet as pq
    from ray.data.extensions import ArrowVariableShapedTensorArray

    rng = np.random.default_rng(seed)
    out.mkdir(parents=True, exist_ok=True)
    rows, images = [], []
    for i in range(n):
        z = rng.normal()
        images.append(rng.normal(-0.5 - 0.2 * z, 0.2, size=(int(rng.integers(16, 24)), side, side)).astype(np.float16))
        rows.append({"patient_id": f"P{i:04d}", "study_id": f"S{i:04d}", "fracture_5y": float(z > 0.3),
                     "split": "val" if i % 8 == 0 else "train"})
    table = pa.Table.from_pandas(pd.DataFrame(rows), preserve_index=False)
    table = table.append_column("bone", ArrowVariableShapedTensorArray.from_numpy(images))
    pq.write_table(table, out / "part-00000.parquet")


def train_throughput(data: Path, work: Path, workers: int, epochs: int) -> float:
    """Training samples/s of the tiny CNN-RNN with `workers` DDP workers (epochs 2..E, train + validation)."""
    import csv

    from raypipe.train.config import CTTrainConfig
    from raypipe.train.ct import fit_ct

    cfg = CTTrainConfig(model="cnn_rnn_tiny", pretrained="none", model_kwargs={"dropout": 0.0}, input="bone", lr=1e-3, batch_size=16,
                        epochs=epochs, patience=epochs, num_workers=workers, n_boot=10, shuffle_buffer=0,
                        max_failures=0, freeze_batchnorm=True)
    clock = work / f"clock_{workers}.txt"
    run = work / f"train_{workers}"
    fit_ct(cfg, str(data), str(run), callbacks=[EpochClock(str(clock))])
    times = [float(t) for t in clock.read_text().split()]
    with open(run / "metrics.csv") as f:
        samples = [float(r["train_samples"]) for r in csv.DictReader(f)]
    if len(times) < 2:
        return float("nan")
    return sum(samples[1:len(times)]) / (times[-1] - times[0])


def preprocessing_throughput(manifest: Path, work: Path, nodes: int, cpus_per_node: int) -> float:
    """CT studies/s of `raypipe preprocess ct` (one study per shard) on a local cluster of `nodes` nodes."""
    import ray
    from ray.cluster_utils import Cluster

    from raypipe.data.ct_pipeline import preprocess_ct, read_ct_manifest
    from raypipe.preprocess.config import CTPreprocessConfig
    from raypipe.ray_utils import LOCAL_SYSTEM_CONFIG, configure_data

    ray.shutdown()
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": cpus_per_node, "include_dashboard": False, "_system_config": LOCAL_SYSTEM_CONFIG})
    for _ in range(nodes - 1):
        cluster.add_node(num_cpus=cpus_per_node)
    cluster.wait_for_nodes()
    try:
        ray.init(address=cluster.address, log_to_driver=False)
        configure_data()
        n = len(read_ct_manifest(manifest))
        t0 = time.perf_counter()
        summary = preprocess_ct(manifest, work / f"shards_{nodes}n", config=CTPreprocessConfig(shard_size=1))
        seconds = time.perf_counter() - t0
        log.info("preprocessing on %d node(s): %d studies in %.1f s, nodes used: %d", nodes, n, seconds,
                 len(set(summary["shard_nodes"].values())))
        return n / seconds
    finally:
        ray.shutdown()
        cluster.shutdown()


def gpu_throughput(steps: int = 20) -> dict[str, float]:
    """Single-GPU bf16 autocast forward+backward+step samples/s of the full CT and X-ray models."""
    import torch

    from raypipe.models.registry import build_model, example_inputs

    out: dict[str, float] = {}
    for name, batch in (("cnn_rnn", 32), ("deepsurv", 32)):
        model = build_model(name).cuda().to(memory_format=torch.channels_last).train()
        opt = torch.optim.Adam(model.parameters(), lr=1e-5)
        inputs = {k: v.cuda() for k, v in example_inputs(name, batch).items()}

        def step() -> None:
            with torch.autocast("cuda", dtype=torch.bfloat16):
                y = model(**inputs)
            loss = (y if torch.is_tensor(y) else next(iter(y.values()))).float().mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        for _ in range(3):
            step()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
        out[f"{name}_bf16_samples_per_s"] = steps * batch / (time.perf_counter() - t0)
        log.info("GPU %s bf16: %.1f samples/s (batch %d)", name, out[f"{name}_bf16_samples_per_s"], batch)
        del model, opt
        torch.cuda.empty_cache()
    return out


def main(argv: list[str] | None = None) -> int:
    """Run every measurement that this machine supports and log the figures and ratios."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--studies", type=int, default=8, help="synthetic CT studies to preprocess")
    p.add_argument("--train-patients", type=int, default=64)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--cpus-per-node", type=int, default=2)
    p.add_argument("--out", default="bench/out/scaling")
    p.add_argument("--skip", default="", help="comma list of: train, preprocess, gpu")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    skip = set(filter(None, a.skip.split(",")))
    out = Path(a.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    figures: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="scaling_") as tmp:
        work = Path(tmp)
        if "train" not in skip:
            import ray

            from raypipe.ray_utils import init_ray

            planted_shards(work / "train_shards", a.train_patients)
            init_ray()
            for w in (1, 2):
                figures[f"train_samples_per_s_{w}w"] = train_throughput(work / "train_shards", work, w, a.epochs)
            ray.shutdown()
            figures["train_ratio_2w_over_1w"] = figures["train_samples_per_s_2w"] / figures["train_samples_per_s_1w"]
            log.info("training: %.1f samples/s (1 worker), %.1f samples/s (2 workers), ratio %.2f",
                     figures["train_samples_per_s_1w"], figures["train_samples_per_s_2w"],
                     figures["train_ratio_2w_over_1w"])
        if "preprocess" not in skip:
            from raypipe.data.synth import synth_cohort

            manifest = synth_cohort("ct", work / "cohort", a.studies, seed=7, workers=1)
            for n in (1, 2):
                figures[f"preprocess_studies_per_s_{n}n"] = preprocessing_throughput(manifest, work, n,
                                                                                     a.cpus_per_node)
            figures["preprocess_ratio_2n_over_1n"] = (figures["preprocess_studies_per_s_2n"]
                                                      / figures["preprocess_studies_per_s_1n"])
            log.info("preprocessing: %.3f studies/s (1 node), %.3f studies/s (2 nodes), ratio %.2f",
                     figures["preprocess_studies_per_s_1n"], figures["preprocess_studies_per_s_2n"],
                     figures["preprocess_ratio_2n_over_1n"])
        if "gpu" not in skip:
            import torch

            if torch.cuda.is_available():
                figures.update(gpu_throughput())
                figures["gpu"] = torch.cuda.get_device_name(0)
            else:
                log.info("no CUDA device: GPU bf16 throughput skipped")
    (out / "scaling.json").write_text(json.dumps(figures, indent=2) + "\n")
    for name, value in figures.items():  # one JSON figure per line
        if isinstance(value, (int, float)):
            unit = "x" if "_ratio_" in name else ("studies/s" if name.startswith("preprocess") else "samples/s")
            figure(f"scaling/{name}", value, unit, load_avg_1min_at_end=round(os.getloadavg()[0], 2),
                   card=figures.get("gpu", "cpu"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
