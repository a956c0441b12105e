"""cluster.yaml and the KubeRay manifests parse, carry the keys raypipe relies on, and Ray's launcher accepts them."""
from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


def _cluster() -> dict:
    return yaml.safe_load((ROOT / "cluster.yaml").read_text())


def test_cluster_yaml_validates_with_the_ray_launcher() -> None:
    from ray.autoscaler._private.util import prepare_config, validate_config

    cfg = _cluster()
    validate_config(prepare_config(copy.deepcopy(cfg)))  # the launcher's own offline schema check
    types = cfg["available_node_types"]
    assert types[cfg["head_node_type"]]["resources"].get("GPU", 0) == 0
    gpus = sorted(t["resources"].get("GPU", 0) for t in types.values())
    assert 1 in gpus and 8 in gpus
    assert all(t["max_workers"] >= t["min_workers"] for t in types.values())
    setup = " ".join(cfg["setup_commands"])
    assert "make install" in setup and "RAYPIPE_STORAGE" in setup


def test_launcher_rejects_a_broken_cluster_yaml() -> None:
    from ray.autoscaler._private.util import prepare_config, validate_config

    cfg = _cluster()
    cfg["head_node_type"] = "no_such_type"
    with pytest.raises(Exception):
        validate_config(prepare_config(cfg))


@pytest.mark.parametrize("name, kind", [("raycluster.yaml", "RayCluster"), ("rayjob.yaml", "RayJob")])
def test_kuberay_manifests(name: str, kind: str) -> None:
    doc = yaml.safe_load((ROOT / "deploy" / "k8s" / name).read_text())
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == kind
    spec = doc["spec"] if kind == "RayCluster" else doc["spec"]["rayClusterSpec"]
    assert spec["rayVersion"] == "2.60.0"
    assert spec["headGroupSpec"]["template"]["spec"]["containers"]
    gpu = spec["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert gpu["nvidia.com/gpu"] == "1"
    if kind == "RayJob":
        assert doc["spec"]["entrypoint"].startswith("python jobs/")
