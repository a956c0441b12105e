"""Pure scale-out helpers: job path resolution under RAYPIPE_STORAGE and sweep sizing (concurrency and GPUs from the
config, CPU shares fitted to the cluster)."""
from __future__ import annotations

import os

from raypipe.cluster import resolve_input, resolve_output, trial_resources


def test_outputs_resolve_under_storage_root(monkeypatch, tmp_path):
    """Relative job outputs go under RAYPIPE_STORAGE; URIs and absolute paths are kept."""
    monkeypatch.setenv("RAYPIPE_STORAGE", "s3://bucket/raypipe")
    assert resolve_output("runs/ct") == "s3://bucket/raypipe/runs/ct"
    assert resolve_output("gs://b/x") == "gs://b/x"
    assert resolve_output(str(tmp_path / "x")) == str(tmp_path / "x")
    monkeypatch.setenv("RAYPIPE_STORAGE", str(tmp_path))
    assert resolve_output("runs/ct") == os.path.join(str(tmp_path), "runs/ct")
    monkeypatch.delenv("RAYPIPE_STORAGE")
    monkeypatch.chdir(tmp_path)
    assert resolve_output("o") == str(tmp_path / "o") and resolve_input("o") == str(tmp_path / "o")


def test_trial_resources_leave_whole_cpus_for_data():
    """Concurrent trials never take the CPUs Ray Data needs (one whole CPU per node at least)."""
    two_nodes = trial_resources({"CPU": 4.0}, workers_per_trial=1, trials=2, max_concurrent=2, trial_cpus=0.25, nodes=2)
    assert two_nodes.max_concurrent == 2 and not two_nodes.use_gpu and "GPU" not in two_nodes.worker_resources
    used = two_nodes.max_concurrent * (two_nodes.trial_cpus + two_nodes.worker_resources["CPU"])
    assert used <= 4.0 - 2.0
    big = trial_resources({"CPU": 64.0}, workers_per_trial=2, trials=20, max_concurrent=8, nodes=4)
    assert big.max_concurrent == 8 and 0.25 <= big.worker_resources["CPU"] <= 2.0
    assert trial_resources({"CPU": 4.0}, 1, 5, max_concurrent=1, nodes=1).max_concurrent == 1
    assert trial_resources({"CPU": 4.0}, 1, 2, max_concurrent=6, nodes=1).max_concurrent == 2  # never above trials


def test_trial_resources_request_gpus_and_concurrency_from_the_config():
    """GPUs and trials at once are what the config asks for, whatever the cluster holds at submit time."""
    import pytest

    empty = trial_resources({"CPU": 16.0}, workers_per_trial=2, trials=10, max_concurrent=4, use_gpu=True,
                            gpus_per_worker=0.5, nodes=1)  # an autoscaling cluster before its GPU nodes start
    assert empty.use_gpu and empty.worker_resources["GPU"] == 0.5 and empty.max_concurrent == 4
    full = trial_resources({"CPU": 32.0, "GPU": 8.0}, workers_per_trial=2, trials=10, max_concurrent=2, nodes=1)
    assert not full.use_gpu and "GPU" not in full.worker_resources and full.max_concurrent == 2  # GPUs not discovered
    with pytest.raises(ValueError, match="max_concurrent_trials"):
        trial_resources({"CPU": 4.0}, 1, 2, max_concurrent=0)


def test_run_config_carries_placement_and_worker_resources():
    """Placement and per-worker resources are run-config fields every task shares (no side channel)."""
    import pytest

    from raypipe.config import ConfigError, load_config
    from raypipe.tasks import TASKS

    for task in TASKS.values():
        cls = task.config_class()
        extra = {k: "none" for k in ("pretrained", "pretrained_sd") if k in cls.model_fields}
        cfg = cls(placement_strategy="SPREAD", resources_per_worker={"CPU": 0.5, "x": 1.0}, **extra)
        assert cfg.placement_strategy == "SPREAD" and cfg.resources_per_worker == {"CPU": 0.5, "x": 1.0}
    with pytest.raises(ConfigError, match="placement_strategy"):
        load_config(TASKS["cnn-rnn"].config_class(), overrides={"placement_strategy": "ANYWHERE", "pretrained": "none"})
