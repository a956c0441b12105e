"""A real MLflow tracking server on loopback for the tracking tests (SQLite backend, proxied artifacts).

The server runs from its own virtual environment, never from the project's: full `mlflow` pins packages the
project's stack has outgrown (e.g. `cryptography<51`), while the project only needs the client
(`mlflow-skinny`, the `tracking` extra). The environment is created once, on first use, under
`$RAYPIPE_MLFLOW_SERVER_ENV` (default `~/.cache/raypipe/mlflow-server-<version>`) with
`python -m venv` + `pip install mlflow==<version>`; the tests skip, saying why, only when it cannot be
created or the server does not come up.
"""
from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests._scaleout import free_port, kill_group

SERVER_REQUIREMENT = "mlflow==3.17.2"  # the newest full mlflow whose dependencies the package index holds
SERVER_ENV_VAR = "RAYPIPE_MLFLOW_SERVER_ENV"


def server_env_dir() -> Path:
    """Where the server's virtual environment lives (created by `ensure_server_env`)."""
    given = os.environ.get(SERVER_ENV_VAR)
    if given:
        return Path(given)
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "raypipe" / f"mlflow-server-{SERVER_REQUIREMENT.split('==')[-1]}"


def ensure_server_env(target: Path | None = None, timeout: float = 900) -> Path:
    """The server environment's folder, creating it first when missing (python -m venv + pip install mlflow).

    Built under a file lock and marked complete only at the end, so concurrent test sessions neither race
    nor use a half-installed environment (an unfinished one is rebuilt). Raises RuntimeError with pip's output.
    """
    target = target or server_env_dir()
    done_marker = target / ".raypipe-complete"
    if done_marker.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{target.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if done_marker.exists():  # built by another session while this one waited
            return target
        shutil.rmtree(target, ignore_errors=True)
        base = getattr(sys, "_base_executable", None) or sys.executable
        for cmd in ([base, "-m", "venv", str(target)],
                    [str(target / "bin" / "python"), "-m", "pip", "install", "-q", SERVER_REQUIREMENT]):
            run = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
            if run.returncode != 0:
                raise RuntimeError(f"{' '.join(cmd)} failed ({run.returncode}): {(run.stdout + run.stderr)[-2000:]}")
        done_marker.write_text(SERVER_REQUIREMENT + "\n")
    return target


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Start `mlflow server` on 127.0.0.1 (free port, own process group); yields its tracking URI."""
    try:
        env_dir = ensure_server_env()
    except (RuntimeError, OSError, subprocess.TimeoutExpired) as exc:
        pytest.skip(f"the MLflow tracking server cannot be started: its environment could not be created ({exc})")
    root: Path = tmp_path_factory.mktemp("mlflow_server")
    port = free_port()
    log = open(root / "server.log", "w")
    proc = subprocess.Popen(
        [str(env_dir / "bin" / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}", "--artifacts-destination", str(root / "artifacts")],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=root,
        env={**os.environ, "PATH": f"{env_dir / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}"})
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 180  # ~30 s on 2 idle cores; more while other work runs
        while True:
            try:
                with urllib.request.urlopen(f"{uri}/health", timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"mlflow server did not come up: {(root / 'server.log').read_text()[-3000:]}")
            time.sleep(1)
        yield uri
    finally:
        kill_group(proc, grace=5.0)
        log.close()
