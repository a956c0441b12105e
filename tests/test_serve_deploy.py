"""`serve deploy serve/config.yaml` onto a running local cluster, then scoring over HTTP.

The head node is started from the venv (`ray start --head --block` in its own process group, loopback only,
unique temp dir, free ports, RAY_AUTH_MODE=disabled for both the head and the `serve` CLI). The config's own
application (import path `raypipe.serving.app:build`, typed args) is deployed with only what a CPU-only test
host needs changed: the registry folder, loopback HTTP port, and small CPU shares instead of GPUs. The
bearer token reaches the builder through the environment of the Ray nodes (`api_token_env`), never the
config. The cluster is ended by its process group (never `ray stop`).
"""
from __future__ import annotations

import json
import os
import secrets
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from raypipe.ray_utils import LOCAL_SYSTEM_CONFIG
from tests._scaleout import ROOT, VENV_BIN, free_port, kill_group, kill_marked

pytestmark = pytest.mark.slow  # a Ray head, eight deployments and a first request: ~1-3 min on 2 loaded cores

httpx = pytest.importorskip("httpx")


def _cli_env(**extra: str) -> dict[str, str]:
    """The venv first on PATH, this checkout importable, no inherited Ray address or auth settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONPATH"] = str(ROOT)
    env["RAY_AUTH_MODE"] = "disabled"  # loopback-only test cluster (STACK.md: same mode for head and clients)
    env.update(extra)
    return env


def _test_config(registry: Path, http_port: int) -> dict:
    """serve/config.yaml with the registry and port of this test, and CPU shares that fit a 4-CPU head."""
    cfg = yaml.safe_load((ROOT / "serve" / "config.yaml").read_text())
    app = cfg["applications"][0]
    assert app["import_path"] == "raypipe.serving.app:build"
    app["args"]["registry"] = str(registry)
    app["args"]["versions"] = {"xray": "v1"}  # pinned although v2 is published
    app["args"]["names"] = {"ct": None, "ldm": None, "keypoints": None}
    cfg["http_options"].update(host="127.0.0.1", port=http_port)
    for d in app["deployments"]:
        d.pop("autoscaling_config", None)
        d["num_replicas"] = 1
        d["ray_actor_options"] = {"num_cpus": 0.1}
    return cfg


@pytest.fixture(scope="module")
def head(tmp_path_factory: pytest.TempPathFactory):
    """A local head node started from the venv; yields (dashboard address, CLI env, bearer token)."""
    tmp = tmp_path_factory.mktemp("serve_deploy")
    temp_dir = f"/tmp/rsd_{secrets.token_hex(4)}"  # short: Ray's socket paths must stay under 108 bytes
    token = secrets.token_hex(16)
    env = _cli_env(HOME=str(tmp))
    head_env = {**env, "RAYPIPE_API_TOKEN": token, "OMP_NUM_THREADS": "1", "RAY_agent_register_timeout_ms": "180000",
                **{f"RAY_{k}": str(v) for k, v in LOCAL_SYSTEM_CONFIG.items()}}
    port, dash = free_port(), free_port()
    proc = subprocess.Popen(
        [str(VENV_BIN / "ray"), "start", "--head", "--block", "--node-ip-address", "127.0.0.1", "--port", str(port),
         "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash), "--include-dashboard", "true",
         "--num-cpus", "4", "--temp-dir", temp_dir, "--disable-usage-stats"],
        env=head_env, cwd=tmp, stdout=open(tmp / "head.log", "w"), stderr=subprocess.STDOUT, start_new_session=True)
    address = f"http://127.0.0.1:{dash}"
    try:
        deadline = time.time() + 240
        while True:
            r = subprocess.run([str(VENV_BIN / "serve"), "status", "-a", address], env=env, capture_output=True,
                               text=True, timeout=120)
            if r.returncode == 0:
                break
            if proc.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"head did not come up: {(tmp / 'head.log').read_text()[-3000:]}\n{r.stderr[-2000:]}")
            time.sleep(3)
        yield address, env, token
    finally:
        kill_group(proc)
        kill_marked(temp_dir)


def _wait_running(address: str, env: dict[str, str], app: str, timeout_s: float = 420) -> dict:
    """Poll `serve status` until the application is RUNNING; fail with its message when it cannot deploy."""
    deadline, last = time.time() + timeout_s, {}
    while time.time() < deadline:
        r = subprocess.run([str(VENV_BIN / "serve"), "status", "-a", address], env=env, capture_output=True,
                           text=True, timeout=120)
        if r.returncode == 0:
            last = (yaml.safe_load(r.stdout) or {}).get("applications", {}).get(app, {})
            if last.get("status") == "RUNNING":
                return last
            assert last.get("status") != "DEPLOY_FAILED", last.get("message")
        time.sleep(3)
    raise AssertionError(f"{app} not RUNNING after {timeout_s} s: {json.dumps(last)[:3000]}")


def test_serve_deploy_config_builds_app_and_scores_over_http(head, tmp_path: Path) -> None:
    import pandas as pd

    from raypipe.data.synth import synth_cohort
    from raypipe.scoring.tiny import publish_tiny_models

    address, env, token = head
    registry = tmp_path / "registry"
    publish_tiny_models(registry, which=("xray", "pvf"), workdir=tmp_path / "runs1")
    publish_tiny_models(registry, which=("xray",), workdir=tmp_path / "runs2")  # xray v2: must not be served
    manifest = synth_cohort("xray", tmp_path / "synth", 1, seed=3, workers=1)
    http_port = free_port()
    cfg_path = tmp_path / "config.yaml"
    cfg_path.write_text(yaml.safe_dump(_test_config(registry, http_port), sort_keys=False))

    r = subprocess.run([str(VENV_BIN / "serve"), "deploy", str(cfg_path), "-a", address], env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    status = _wait_running(address, env, "raypipe")
    assert set(status["deployments"]) >= {"ApiIngress", "XrayPreprocess", "XrayModel", "PVFModel"}

    auth = {"Authorization": f"Bearer {token}"}
    with httpx.Client(base_url=f"http://127.0.0.1:{http_port}", timeout=300) as c:
        assert c.get("/healthz").status_code == 200
        assert c.get("/v1/models").status_code == 401  # the token came from the nodes' environment
        models = c.get("/v1/models", headers=auth).json()["models"]
        assert models["xray"]["version"] == "v1" and models["pvf"]["version"] == "v1"
        assert models["ct"]["loaded"] is False
        row = pd.read_csv(manifest).iloc[0]
        files = {"image": ("x", (manifest.parent / row["image_path"]).read_bytes(), "application/dicom"),
                 "keypoints": ("k", (manifest.parent / row["keypoints_path"]).read_bytes(), "application/json")}
        for attempt in range(4):  # the client contract: retry on 503 only
            s = c.post("/v1/xray/score", headers=auth, files=files, data={"clinical": json.dumps({"age": 70, "sex": "F"})})
            if s.status_code != 503:
                break
            time.sleep(2 + attempt)
    assert s.status_code == 200, s.text[:1000]
    body = s.json()
    assert 0.0 <= body["risk_5y"] <= 1.0 and body["pvf_score"] is not None
    assert body["models"]["xray"]["version"] == "v1"
