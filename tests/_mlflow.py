"""A real MLflow tracking server on loopback for the tracking tests (SQLite backend, proxied artifacts)."""
from __future__ import annotations

import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests._scaleout import VENV_BIN, free_port, kill_group


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Start `mlflow server` on 127.0.0.1 (free port, own process group); yields its tracking URI."""
    pytest.importorskip("mlflow", reason="mlflow not installed (pip install mlflow)")
    root: Path = tmp_path_factory.mktemp("mlflow_server")
    port = free_port()
    log = open(root / "server.log", "w")
    proc = subprocess.Popen(
        [str(VENV_BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}", "--artifacts-destination", str(root / "artifacts")],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=root)
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
