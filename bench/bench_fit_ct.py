"""A real Ray Train fit of the CT CNN-RNN on synthetic shards: samples/s and the GPU's busy share.

    python bench/bench_fit_ct.py [--patients 256] [--epochs 3] [--model cnn_rnn] [--batch 128] [--work DIR]
    python bench/bench_fit_ct.py --tiny     # CPU smoke: 12 patients, cnn_rnn_tiny, 2 epochs

Runs the project's commands as a user would: `raypipe synth ct`, `raypipe preprocess ct` (Ray Data shards),
then `raypipe train cnn-rnn --set ...` (Ray Train, one worker, the real input path). Each output line of the
training command is time-stamped as it arrives; samples/s counts the epochs after the first (the first pays
Ray Train and Ray Data start-up): the `train_samples` of metrics.csv over the time between the first and the
last epoch line. The GPU's busy share is the mean of `nvidia-smi` utilisation samples (every 200 ms) in that
window (null without nvidia-smi). The ImageNet encoder is not loaded (`pretrained=none`: random init, stated).
One JSON figure per line.
"""
from __future__ import annotations

import argparse
import csv
import logging
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from _report import figure

log = logging.getLogger("bench_fit_ct")
EPOCH_LINE = re.compile(r"epoch (\d+)/(\d+):")
SAMPLE_MS = 200


class GpuSampler:
    """`nvidia-smi` utilisation samples (time, %) in a background thread; empty without nvidia-smi."""

    def __init__(self) -> None:
        self.samples: list[tuple[float, float]] = []
        self.proc: subprocess.Popen[str] | None = None
        self.thread: threading.Thread | None = None

    def start(self) -> None:
        """Start sampling when nvidia-smi exists."""
        exe = shutil.which("nvidia-smi")
        if exe is None:
            return
        self.proc = subprocess.Popen([exe, "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits",
                                      f"-lms={SAMPLE_MS}", "-i", "0"], stdout=subprocess.PIPE, text=True)
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        for line in self.proc.stdout:
            try:
                self.samples.append((time.perf_counter(), float(line.strip())))
            except ValueError:
                continue

    def stop(self) -> None:
        """Stop the sampler process."""
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(timeout=10)

    def mean_between(self, t0: float, t1: float) -> float | None:
        """Mean utilisation (%) of the samples taken in [t0, t1]; None without samples."""
        window = [u for t, u in self.samples if t0 <= t <= t1]
        return sum(window) / len(window) if window else None


def run(cmd: list[str], timeout: float) -> None:
    """Run a raypipe command, failing with its output tail when it fails."""
    log.info("$ %s", " ".join(cmd))
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if p.returncode:
        raise SystemExit(f"{cmd[:3]} failed ({p.returncode}):\n{(p.stdout + p.stderr)[-4000:]}")


def train_timed(cmd: list[str], timeout: float) -> list[float]:
    """Run the training command; return the arrival time of each epoch line (in order)."""
    log.info("$ %s", " ".join(cmd))
    deadline = time.perf_counter() + timeout
    times: list[float] = []
    tail: list[str] = []
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as p:
        assert p.stdout is not None
        for line in p.stdout:
            tail = (tail + [line])[-60:]
            if EPOCH_LINE.search(line):
                times.append(time.perf_counter())
                log.info("%s", line.rstrip()[-200:])
            if time.perf_counter() > deadline:
                p.kill()
                raise SystemExit(f"training exceeded {timeout:.0f} s")
        if p.wait():
            raise SystemExit(f"training failed ({p.returncode}):\n{''.join(tail)[-4000:]}")
    return times


def main() -> None:
    """Synthesise, preprocess, fit; print samples/s and the GPU's busy share."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--patients", type=int, default=256)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--model", default="cnn_rnn")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--tiny", action="store_true", help="CPU smoke: 12 patients, cnn_rnn_tiny, batch 8, 2 epochs")
    ap.add_argument("--timeout", type=float, default=300.0, help="seconds for the training command")
    ap.add_argument("--work", type=Path, default=None)
    a = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stderr)
    if a.tiny:
        a.patients, a.model, a.batch, a.epochs = 12, "cnn_rnn_tiny", 8, 2
    work = a.work or Path(tempfile.mkdtemp(prefix="bench_fit_"))
    raypipe = [sys.executable, "-m", "raypipe"]
    cohort, shards, out = work / "cohort", work / "shards", work / "run"
    if not (cohort / "manifest.csv").is_file():
        run([*raypipe, "synth", "ct", "--out", str(cohort), "--patients", str(a.patients), "--overwrite"], a.timeout)
    if not (shards / "shards.json").is_file():
        run([*raypipe, "preprocess", "ct", "--manifest", str(cohort / "manifest.csv"), "--out", str(shards),
             "--set", "qc_pictures=false", "--allow-errors"], a.timeout)
    shutil.rmtree(out, ignore_errors=True)
    sets = {"model": a.model, "pretrained": "none", "epochs": a.epochs, "patience": a.epochs, "batch_size": a.batch,
            "num_workers": 1, "n_boot": 10, "max_failures": 0}
    cmd = [*raypipe, "train", "cnn-rnn", "--data", str(shards), "--out", str(out)]
    for k, v in sets.items():
        cmd += ["--set", f"{k}={v}"]
    gpu = GpuSampler()
    gpu.start()
    t0 = time.perf_counter()
    try:
        epochs = train_timed(cmd, a.timeout)
    finally:
        gpu.stop()
    wall = time.perf_counter() - t0
    with open(out / "metrics.csv", newline="") as f:
        samples = [float(r["train_samples"]) for r in csv.DictReader(f)]
    if len(epochs) != len(samples) or not epochs:
        raise SystemExit(f"saw {len(epochs)} epoch lines but metrics.csv has {len(samples)} epochs")
    if len(epochs) > 1:
        t_first, t_last, n = epochs[0], epochs[-1], sum(samples[1:])
    else:
        t_first, t_last, n = t0, epochs[0], samples[0]
    tag = f"fit_ct/{a.model}/batch{a.batch}"
    figure(f"{tag}/samples_per_s_after_first_epoch", n / max(t_last - t_first, 1e-9), "samples/s",
           epochs=len(samples), samples_per_epoch=samples[-1])
    figure(f"{tag}/gpu_busy_share", gpu.mean_between(t_first, t_last), "%", sampler="nvidia-smi utilization.gpu")
    figure(f"{tag}/first_epoch_incl_startup", epochs[0] - t0, "s")
    figure(f"{tag}/wall", wall, "s")


if __name__ == "__main__":
    main()
