"""Helpers of the scale-out tests: one small preprocessed CT cohort per session, free ports, own Ray clusters.

Tests that start their own Ray never call `ray stop` (it kills every Ray process on the host, other
sessions' included): they start Ray in a process group of their own and end that group by its id.
"""
from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
N_PATIENTS = 16


def free_port() -> int:
    """A TCP port nobody listens on right now (loopback)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def ct_cohort(base: Path, patients: int = N_PATIENTS) -> tuple[Path, Path]:
    """(manifest, shards folder) of a synthetic CT cohort preprocessed in-process; built once per session."""
    from raypipe.data.ct_pipeline import preprocess_ct
    from raypipe.data.synth import synth_cohort
    from raypipe.preprocess.config import CTPreprocessConfig

    root = base / f"scaleout_ct_{patients}"
    manifest, shards = root / "cohort" / "manifest.csv", root / "shards"
    if not manifest.is_file():
        synth_cohort("ct", root / "cohort", patients, seed=5, workers=1, overwrite=True)
    if not (shards / "shards.json").is_file():
        preprocess_ct(manifest, shards, config=CTPreprocessConfig(shard_size=2, qc_pictures=False), use_ray=False)
    return manifest, shards


def subset_manifest(manifest: Path, n: int, name: str) -> Path:
    """The first `n` studies of a manifest, written next to it (relative image paths keep resolving)."""
    out = manifest.parent / name
    pd.read_csv(manifest, dtype=str).head(n).to_csv(out, index=False)
    return out


def kill_group(proc: subprocess.Popen, grace: float = 15.0) -> None:
    """End a process started with start_new_session=True and everything in its process group."""
    try:
        pgid = os.getpgid(proc.pid)
    except ProcessLookupError:
        return
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            continue
        time.sleep(1.0)
    try:
        os.killpg(pgid, signal.SIGKILL)  # stragglers of the group (workers) once the leader is gone
    except ProcessLookupError:
        pass


def kill_marked(marker: str) -> int:
    """SIGKILL the processes whose command line holds `marker` (this test's unique Ray temp dir); returns count."""
    import psutil

    n = 0
    for p in psutil.process_iter(["pid", "cmdline"]):
        try:
            if p.info["cmdline"] and any(marker in part for part in p.info["cmdline"]) and p.pid != os.getpid():
                p.kill()
                n += 1
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return n
