"""Two Ray nodes on one host (`ray.cluster_utils.Cluster`, 2 CPUs + a label each): DDP across nodes matches one
node, a 2-trial sweep puts one trial on each node, and Ray Data preprocessing writes shards on both nodes.

The module owns its cluster: a session-wide local Ray (the `ray_session` fixture) is shut down first and
started again at the end, so tests after this module still find one.
"""
from __future__ import annotations

import csv
import json
from pathlib import Path

import pandas as pd
import pytest

from tests._scaleout import ROOT, ct_cohort, subset_manifest
from tests.test_train_ct import _tiny_cfg, write_planted_shards

NODE_LABELS = ("node_a", "node_b")


pytestmark = pytest.mark.slow  # separate 2-node clusters: minutes each on 2 cores; `make test-slow`


@pytest.fixture(scope="module")
def two_nodes():
    """Head (node_a) + one worker node (node_b), 2 CPUs each; yields {label: node id}."""
    import ray
    from ray.cluster_utils import Cluster

    from raypipe.ray_utils import LOCAL_SYSTEM_CONFIG, configure_data, init_ray

    had_ray = ray.is_initialized()
    ray.shutdown()
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 2, "resources": {NODE_LABELS[0]: 1, "trial_slot": 1}, "include_dashboard": False,
        "_system_config": LOCAL_SYSTEM_CONFIG})
    cluster.add_node(num_cpus=2, resources={NODE_LABELS[1]: 1, "trial_slot": 1})
    cluster.wait_for_nodes()
    try:
        ray.init(address=cluster.address, runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}},
                 log_to_driver=False)
        configure_data()
        ids = {}
        for n in ray.nodes():
            for label in NODE_LABELS:
                if n["Alive"] and label in n["Resources"]:
                    ids[label] = n["NodeID"]
        assert len(ids) == 2, ray.nodes()
        yield ids
    finally:
        ray.shutdown()
        cluster.shutdown()
        if had_ray:
            init_ray()


def _curve(path: Path) -> list[dict[str, str]]:
    with open(path) as f:
        return list(csv.DictReader(f))


def test_ddp_across_two_nodes_matches_one_node(two_nodes, tmp_path):
    """STRICT_SPREAD puts rank 0 and rank 1 on different nodes; the loss curve equals 1 worker's (same global batch)."""
    from raypipe.train.common import PLACEMENT_DIR, read_placement
    from raypipe.train.ct import fit_ct

    write_planted_shards(tmp_path / "shards", 40, seed=2, val_every=5)  # 8 val, 32 train studies
    curves = {}
    for n in (1, 2):
        cfg = _tiny_cfg(num_workers=n, batch_size=64, epochs=2, patience=2, freeze_batchnorm=True, n_boot=10,
                        placement_strategy="STRICT_SPREAD" if n == 2 else "PACK", resources_per_worker={"CPU": 1.0})
        fit_ct(cfg, str(tmp_path / "shards"), str(tmp_path / f"run{n}"))
        curves[n] = _curve(tmp_path / f"run{n}" / "metrics.csv")
    placed = read_placement(str(tmp_path / "run2" / "ray_results" / "train" / PLACEMENT_DIR))
    nodes = {p["rank"]: p["node_id"] for p in placed}
    assert set(nodes) == {0, 1} and set(nodes.values()) == set(two_nodes.values()), placed
    assert [r["epoch"] for r in curves[2]] == ["1", "2"]
    for a, b in zip(curves[1], curves[2]):
        assert float(a["train_samples"]) == float(b["train_samples"]) == 32
        assert float(a["train_loss"]) == pytest.approx(float(b["train_loss"]), rel=1e-4, abs=1e-5)
        assert float(a["val_loss"]) == pytest.approx(float(b["val_loss"]), rel=1e-4, abs=1e-5)


def test_sweep_spreads_trials_over_both_nodes(two_nodes, tmp_path):
    """`raypipe tune cnn-rnn` with 2 concurrent trials, one `trial_slot` per node: one trial per node."""
    import yaml

    from raypipe.tune.search import tune_cli

    write_planted_shards(tmp_path / "shards", 24, seed=3)
    spec = {"config": str(ROOT / "jobs" / "configs" / "ct_tiny.yaml"), "metric": "val_auroc", "mode": "max",
            "base": {"input": "bone", "epochs": 1, "num_workers": 1, "batch_size": 8, "n_boot": 10,
                     "shuffle_buffer": 0},
            "space": {"lr": {"type": "loguniform", "low": 1e-3, "high": 1e-2}},
            "asha": {"grace_period": 1}, "max_concurrent_trials": 2, "trial_resources": {"trial_slot": 1}}
    (tmp_path / "search.yaml").write_text(yaml.safe_dump(spec))
    assert tune_cli("cnn-rnn", str(tmp_path / "search.yaml"), 2, str(tmp_path / "shards"), str(tmp_path / "out")) == 0
    table = pd.read_csv(tmp_path / "out" / "results.csv")
    assert len(table) == 2 and (table["status"] == "complete").all()
    assert set(table["node_id"]) == set(two_nodes.values()), table
    assert (tmp_path / "out" / "best_config.yaml").is_file() and (tmp_path / "out" / "report.md").is_file()


def test_preprocessing_uses_both_nodes(two_nodes, tmp_path, tmp_path_factory):
    """Ray Data shard tasks (one study per shard) land on both nodes; shards.json records the node per shard."""
    from raypipe.data.ct_pipeline import preprocess_ct
    from raypipe.preprocess.config import CTPreprocessConfig

    manifest, _ = ct_cohort(tmp_path_factory.getbasetemp())
    small = subset_manifest(manifest, 4, "manifest_first4.csv")
    summary = preprocess_ct(small, tmp_path / "shards", config=CTPreprocessConfig(shard_size=1))
    assert summary["ok"] == 4 and len(summary["shard_nodes"]) == 4
    assert set(summary["shard_nodes"].values()) == set(two_nodes.values()), summary["shard_nodes"]
    index = json.loads((tmp_path / "shards" / "shards.json").read_text())
    assert index["shard_nodes"] == summary["shard_nodes"]
