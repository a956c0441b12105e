"""`ray job submit` end to end on a token-authenticated local cluster started from the venv.

A head node (`ray start --head --block` in its own process group, 127.0.0.1, 4 CPUs, dashboard on a free
port, RAY_AUTH_MODE=token with a generated RAY_AUTH_TOKEN) runs a tiny CT training job and a 2-fold CV
job submitted with the CLI; outputs go to RAYPIPE_STORAGE (given through --runtime-env-json), not into the
job's temporary working dir. A submit without the token is refused. The cluster is ended by its process
group (never `ray stop`, which would kill every Ray on the host).
"""
from __future__ import annotations

import json
import os
import re
import secrets
import subprocess
import time
from pathlib import Path

import pytest

from raypipe.ray_utils import LOCAL_SYSTEM_CONFIG
from tests._scaleout import ROOT, VENV_BIN, ct_cohort, free_port, kill_group, kill_marked

pytestmark = pytest.mark.slow  # ~6-10 min on 2 loaded cores: two real training jobs

JOB_TIMEOUT_S = 900


def _env(base: dict[str, str], **extra: str) -> dict[str, str]:
    """A clean environment for Ray CLI calls: the venv first on PATH, no inherited Ray address or auth."""
    env = {k: v for k, v in base.items() if not k.startswith("RAY_")}
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
    env.update(extra)
    return env


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A token-auth head node; yields (dashboard address, env with the token, storage root, shards)."""
    _, shards = ct_cohort(tmp_path_factory.getbasetemp())
    tmp = tmp_path_factory.mktemp("jobs")
    temp_dir = f"/tmp/rj_{secrets.token_hex(4)}"  # short: Ray's socket paths must stay under 108 bytes
    token = secrets.token_hex(32)
    home = tmp / "home"
    home.mkdir()
    env = _env(dict(os.environ), HOME=str(home), RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token)
    # a loaded 2-core host starts the dashboard agent slowly; the raylet's default wait for it is too short
    head_env = {**env, "RAY_agent_register_timeout_ms": "180000",
                **{f"RAY_{k}": str(v) for k, v in LOCAL_SYSTEM_CONFIG.items()}}
    port, dash = free_port(), free_port()
    head = subprocess.Popen(
        [str(VENV_BIN / "ray"), "start", "--head", "--block", "--node-ip-address", "127.0.0.1", "--port", str(port),
         "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash), "--include-dashboard", "true",
         "--num-cpus", "4", "--temp-dir", temp_dir, "--disable-usage-stats"],
        env=head_env, cwd=ROOT, stdout=open(tmp / "head.log", "w"), stderr=subprocess.STDOUT, start_new_session=True)
    address = f"http://127.0.0.1:{dash}"
    try:
        deadline = time.time() + 240
        while True:
            r = subprocess.run([str(VENV_BIN / "ray"), "job", "list", "--address", address], env=env,
                               capture_output=True, text=True, timeout=120)
            if r.returncode == 0:
                break
            if head.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"head did not come up: {(tmp / 'head.log').read_text()[-3000:]}\n{r.stderr[-2000:]}")
            time.sleep(3)
        storage = tmp / "storage"
        storage.mkdir()
        yield address, env, storage, shards
    finally:
        kill_group(head)
        kill_marked(temp_dir)


def _submit(address: str, env: dict[str, str], storage: Path, *args: str) -> tuple[str, str]:
    """Submit a job with the CLI (working dir = repo, RAYPIPE_STORAGE via runtime env); returns (id, output)."""
    runtime_env = {"env_vars": {"RAYPIPE_STORAGE": str(storage), "OMP_NUM_THREADS": "1"},
                   "excludes": ["tests/", "bench/", "docs/", ".git/"]}
    r = subprocess.run([str(VENV_BIN / "ray"), "job", "submit", "--address", address, "--working-dir", ".",
                        "--runtime-env-json", json.dumps(runtime_env), "--no-wait", "--", "python", *args],
                       env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    m = re.search(r"(raysubmit_\w+)", r.stdout + r.stderr)
    assert m, r.stdout + r.stderr
    return m.group(1), r.stdout + r.stderr


def _wait(address: str, env: dict[str, str], job_id: str) -> tuple[str, str]:
    """Poll `ray job status` until the job ends; returns (final status, `ray job logs` text)."""
    deadline = time.time() + JOB_TIMEOUT_S
    status = "PENDING"
    while time.time() < deadline:
        r = subprocess.run([str(VENV_BIN / "ray"), "job", "status", "--address", address, job_id], env=env,
                           capture_output=True, text=True, timeout=120)
        # the CLI prints "... is currently RUNNING" while running and "Job '...' succeeded" once done
        m = re.search(r"\b(PENDING|RUNNING|SUCCEEDED|FAILED|STOPPED)\b", r.stdout + r.stderr, re.IGNORECASE)
        status = m.group(1).upper() if m else status
        if status in ("SUCCEEDED", "FAILED", "STOPPED"):
            break
        time.sleep(5)
    logs = subprocess.run([str(VENV_BIN / "ray"), "job", "logs", "--address", address, job_id], env=env,
                          capture_output=True, text=True, timeout=120).stdout
    return status, logs


def test_submit_without_token_is_refused(cluster, tmp_path):
    """No RAY_AUTH_TOKEN (and no token file): the submit fails with an authentication error."""
    address, env, storage, _ = cluster
    bare = {k: v for k, v in env.items() if not k.startswith("RAY_AUTH")}
    bare["HOME"] = str(tmp_path)
    r = subprocess.run([str(VENV_BIN / "ray"), "job", "submit", "--address", address, "--no-wait", "--",
                        "python", "-c", "print(1)"], env=bare, cwd=ROOT, capture_output=True, text=True, timeout=120)
    text = r.stdout + r.stderr
    assert r.returncode != 0, text
    assert re.search(r"[Aa]uthenticat|[Uu]nauthori[sz]ed|401", text), text[-2000:]


def test_train_and_cv_jobs_write_to_storage(cluster):
    """Tiny CT training and 2-fold CV as submitted jobs: SUCCEEDED, logs readable, outputs under RAYPIPE_STORAGE."""
    address, env, storage, shards = cluster
    train_id, _ = _submit(address, env, storage, "jobs/train.py", "cnn-rnn", "--config", "jobs/configs/ct_tiny.yaml",
                          "--data", str(shards), "--out", "ct_tiny")
    status, logs = _wait(address, env, train_id)
    assert status == "SUCCEEDED", logs[-4000:]
    assert "run written to" in logs and str(storage / "ct_tiny") in logs
    assert re.search(r"epoch \d+/\d+: .*train_loss", logs), logs[-4000:]  # per-epoch lines reach `ray job logs`
    run = storage / "ct_tiny"
    for name in ("predictions.parquet", "metrics.json", "metrics.csv", "model.pt", "config.yaml"):
        assert (run / name).is_file(), name
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["models"], metrics

    cv_id, _ = _submit(address, env, storage, "jobs/cv.py", "cnn-rnn", "--config", "jobs/configs/ct_tiny.yaml",
                       "--data", str(shards), "--out", "cv_tiny", "--folds", "2")
    status, logs = _wait(address, env, cv_id)
    assert status == "SUCCEEDED", logs[-4000:]
    cv = storage / "cv_tiny"
    assert (cv / "predictions.parquet").is_file() and (cv / "metrics.json").is_file()
    import pandas as pd

    preds = pd.read_parquet(cv / "predictions.parquet")
    assert set(preds.loc[preds["split"] == "val", "fold"]) == {0, 1}
    assert json.loads((cv / "metrics.json").read_text())["models"]
