"""Nothing is lost when things fail: every trainer and Tune run retries (FailureConfig), a worker node removed
mid-training resumes from the latest checkpoint on the remaining node, a killed Tune driver resumes with
`Tuner.restore` without rerunning finished trials, and a killed preprocessing job reruns into byte-identical
shards without rewriting the ones it had written.

Killed drivers run as subprocesses in their own process group with their own Ray temp dir; they are ended
by that group id and that temp dir, never by process name.
"""
from __future__ import annotations

import csv
import hashlib
import os
import re
import secrets
import subprocess
import threading
import time
from pathlib import Path

import pytest

from tests._scaleout import ROOT, VENV_BIN, ct_cohort, kill_group, kill_marked, subset_manifest
from tests.test_train_ct import _tiny_cfg, write_planted_shards


# ---------------------------------------------------------------------------------------------- static check
def test_every_trainer_and_tune_run_has_a_failure_config():
    """TorchTrainer is built only by make_trainer (FailureConfig from the run config); every Tuner passes failure_config."""
    src = {p: p.read_text() for p in (ROOT / "raypipe").rglob("*.py")}
    builders = [p for p, t in src.items() if re.search(r"\bTorchTrainer\(", t)]
    assert [p.name for p in builders] == ["common.py"], builders
    common = src[ROOT / "raypipe" / "train" / "common.py"]
    assert re.search(r"failure_config=FailureConfig\(max_failures=run\.max_failures\)", common)
    for p, text in src.items():
        for m in re.finditer(r"\bmake_trainer\(", text):
            if "def make_trainer" in text[max(0, m.start() - 4):m.start() + 13]:
                continue
            call = text[m.start():m.start() + 600]
            assert "run=cfg" in call[:call.find("\n    )") if "\n    )" in call else 600], (p, call[:200])
        for m in re.finditer(r"\btune\.Tuner\(", text):
            call = text[m.start():m.start() + 900]
            assert "failure_config=tune.FailureConfig(" in call, (p, call[:300])


# ---------------------------------------------------------------------------------------------- node loss
@pytest.fixture
def two_nodes():
    """Head + one worker node (2 CPUs each) on this host; yields (cluster, worker node handle, node ids)."""
    import ray
    from ray.cluster_utils import Cluster

    from raypipe.ray_utils import LOCAL_SYSTEM_CONFIG, configure_data, init_ray

    had_ray = ray.is_initialized()
    ray.shutdown()
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 2, "include_dashboard": False, "_system_config": LOCAL_SYSTEM_CONFIG})
    worker = cluster.add_node(num_cpus=2)
    cluster.wait_for_nodes()
    try:
        ray.init(address=cluster.address, runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}}, log_to_driver=False)
        configure_data()
        yield cluster, worker
    finally:
        ray.shutdown()
        cluster.shutdown()
        if had_ray:
            init_ray()


def test_worker_node_removed_mid_training_resumes_on_remaining_node(two_nodes, tmp_path):
    """Remove the node hosting rank 1 after epoch 1's checkpoint: the run retries on the head, resumes, finishes."""
    import torch

    from raypipe.train.common import PLACEMENT_DIR, read_checkpoint, read_placement
    from raypipe.train.ct import fit_ct

    cluster, worker = two_nodes
    write_planted_shards(tmp_path / "shards", 32, seed=4, val_every=4)
    run = tmp_path / "run"
    trial_dir = run / "ray_results" / "train"
    removed: dict[str, object] = {}

    def remove_after_first_checkpoint() -> None:
        deadline = time.time() + 600
        while time.time() < deadline:
            placed = read_placement(str(trial_dir / PLACEMENT_DIR))
            on_worker = [p for p in placed if p["node_id"] == worker.node_id]
            if on_worker and any(trial_dir.glob("checkpoint_epoch_0001")):
                removed["rank"], removed["epochs_seen"] = on_worker[0]["rank"], len(_rows(trial_dir / "metrics.csv"))
                cluster.remove_node(worker, allow_graceful=False)
                return
            time.sleep(0.5)

    watcher = threading.Thread(target=remove_after_first_checkpoint, daemon=True)
    watcher.start()
    cfg = _tiny_cfg(num_workers=2, batch_size=16, epochs=4, patience=4, max_failures=3, n_boot=10,
                    placement_strategy="SPREAD", resources_per_worker={"CPU": 0.5})
    fit_ct(cfg, str(tmp_path / "shards"), str(run))
    watcher.join(timeout=5)
    assert "rank" in removed, "rank 1 never ran on the worker node (SPREAD placed both ranks on the head)"
    assert removed["epochs_seen"] < 4, "the node was removed only after training had finished"
    rows = _rows(run / "metrics.csv")
    assert [r["epoch"] for r in rows] == ["1", "2", "3", "4"]
    placed = read_placement(str(trial_dir / PLACEMENT_DIR))
    restarted = [p for p in placed if p["node_id"] != worker.node_id]
    assert len(placed) > 2 and len({p["node_id"] for p in placed[-2:]}) == 1, placed  # retry: both on the head
    assert restarted
    payload = read_checkpoint(str(max(trial_dir.glob("checkpoint_epoch_*"))))
    assert payload["state"]["epoch"] == 4 and [h["epoch"] for h in payload["state"]["history"]] == [1, 2, 3, 4]
    torch.load(run / "model.pt", weights_only=True)
    assert (run / "predictions.parquet").is_file()


def _rows(path: Path) -> list[dict[str, str]]:
    if not path.is_file():
        return []
    with open(path) as f:
        return list(csv.DictReader(f))


# ---------------------------------------------------------------------------------------------- killed drivers
def _driver(args: list[str], log: Path, ray_tmp: str) -> subprocess.Popen:
    """A job entrypoint as a subprocess with its own local Ray (own temp dir) in its own process group."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(RAY_TMPDIR=ray_tmp, OMP_NUM_THREADS="1", PATH=f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}")
    return subprocess.Popen([str(VENV_BIN / "python"), *args], cwd=ROOT, env=env, stdout=open(log, "w"),
                            stderr=subprocess.STDOUT, start_new_session=True)


def _kill(proc: subprocess.Popen, ray_tmp: str) -> None:
    """SIGKILL the driver's process group (a crash), then anything left of its own Ray."""
    import signal

    try:
        os.killpg(os.getpgid(proc.pid), signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=30)
    time.sleep(2)
    kill_marked(ray_tmp)


def _wait_for(cond, proc: subprocess.Popen, log: Path, timeout: float, poll: float = 1.0) -> None:
    deadline = time.time() + timeout
    while not cond():
        if proc.poll() is not None:
            raise AssertionError(f"driver ended early ({proc.returncode}): {log.read_text()[-3000:]}")
        if time.time() > deadline:
            raise AssertionError(f"condition not met in {timeout} s: {log.read_text()[-3000:]}")
        time.sleep(poll)


def _finished_trials(out: Path) -> int:
    """TERMINATED trials in the saved Tune experiment state (what Tuner.restore will see)."""
    states = list((out / "ray_results" / "tune").glob("experiment_state-*.json"))
    return max((s.read_text().count("TERMINATED") for s in states), default=0)


@pytest.mark.slow
def test_killed_tune_driver_resumes_without_rerunning_finished_trials(tmp_path):
    """Kill the sweep's driver after a trial finished; the rerun restores it and runs only the rest."""
    import pandas as pd
    import yaml

    write_planted_shards(tmp_path / "shards", 24, seed=5)
    spec = {"config": str(ROOT / "jobs" / "configs" / "ct_tiny.yaml"), "metric": "val_auroc", "mode": "max",
            "base": {"input": "bone", "epochs": 1, "num_workers": 1, "batch_size": 8, "n_boot": 10,
                     "shuffle_buffer": 0},
            "space": {"lr": {"type": "loguniform", "low": 1e-3, "high": 1e-2}},
            "asha": {"grace_period": 1}, "max_concurrent_trials": 1}
    (tmp_path / "search.yaml").write_text(yaml.safe_dump(spec))
    out = tmp_path / "out"
    args = ["jobs/tune.py", "cnn-rnn", "--config", str(tmp_path / "search.yaml"), "--data", str(tmp_path / "shards"),
            "--out", str(out), "--trials", "3"]
    ray_tmp = f"/tmp/rk_{secrets.token_hex(4)}"
    first = _driver(args, tmp_path / "first.log", ray_tmp)
    try:
        _wait_for(lambda: _finished_trials(out) >= 1, first, tmp_path / "first.log", 600)
    finally:
        _kill(first, ray_tmp)
    done_before = {p.parent.name for p in (out / "trials").glob("*/predictions.parquet")}
    assert done_before and not (out / "results.csv").exists()
    second = _driver(args, tmp_path / "second.log", ray_tmp)
    try:
        assert second.wait(timeout=900) == 0, (tmp_path / "second.log").read_text()[-3000:]
    finally:
        kill_group(second)
        kill_marked(ray_tmp)
    assert "restoring the search" in (tmp_path / "second.log").read_text()
    table = pd.read_csv(out / "results.csv", dtype={"trial_id": str})
    assert len(table) == 3 and (table["status"] == "complete").all(), table
    starts = dict(zip(table["trial_id"], table["starts"]))
    for trial in done_before:
        assert starts[trial] == 1, (trial, starts)  # finished before the kill: never started again
    assert (out / "best_config.yaml").is_file()


def _hashes(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.glob("part-*.parquet"))}


def test_killed_preprocessing_job_reruns_into_identical_shards(tmp_path, tmp_path_factory):
    """Kill `jobs/preprocess.py` after some shards landed; the rerun skips them and matches an uninterrupted run."""
    from raypipe.data.ct_pipeline import preprocess_ct
    from raypipe.preprocess.config import CTPreprocessConfig

    manifest, _ = ct_cohort(tmp_path_factory.getbasetemp())
    n = 12  # ~0.6 s a shard here: the 11 after the first leave seconds of margin for the kill to land mid-run
    small = subset_manifest(manifest, n, f"manifest_first{n}.csv")
    cfg = tmp_path / "pre.yaml"
    cfg.write_text("shard_size: 1\ncpus_per_task: 2\n")  # one study per shard, one shard at a time
    reference = preprocess_ct(small, tmp_path / "reference", config=CTPreprocessConfig(shard_size=1), use_ray=False)
    assert reference["ok"] == n

    out = tmp_path / "shards"
    args = ["jobs/preprocess.py", "ct", "--manifest", str(small), "--out", str(out), "--config", str(cfg)]
    ray_tmp = f"/tmp/rp_{secrets.token_hex(4)}"
    first = _driver(args, tmp_path / "first.log", ray_tmp)
    try:
        _wait_for(lambda: any((out / "_qc").glob("*.csv")), first, tmp_path / "first.log", 600, poll=0.1)
    finally:
        _kill(first, ray_tmp)
    landed = {p.stem for p in (out / "_qc").glob("*.csv")}
    assert 1 <= len(landed) < n, f"{len(landed)} of {n} shards landed before the kill took effect"
    before = {name: (out / f"{name}.parquet").stat().st_mtime_ns for name in landed}
    again = preprocess_ct(small, out, config=CTPreprocessConfig(shard_size=1, cpus_per_task=2), use_ray=False)
    assert again["shards_reused"] == len(landed) and again["shards_written"] == n - len(landed)
    assert {name: (out / f"{name}.parquet").stat().st_mtime_ns for name in landed} == before  # not rewritten
    assert _hashes(out) == _hashes(tmp_path / "reference") and len(_hashes(out)) == n
