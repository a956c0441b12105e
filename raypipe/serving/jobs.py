"""Durable state of generation jobs: one folder per job under the registry's storage, written atomically.

`JobFiles` keeps what a job needs to be run again (the spec: pixels and pVF input as .npy, the rest as
JSON), its status and its result. A JobStore replica that replaces a dead one finds queued/running jobs
here and runs them again (generation is deterministic given the seeds), so a job survives the restart
of the replica that held it. Finished results expire `ttl_s` after they finish; a result is removed once
fetched. Pure file code (no Ray), so it is testable on its own.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

JOB_ID = re.compile(r"[0-9a-f]{32}")
_ARRAYS = ("pixels", "pvf_input")


def _write_atomic(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class JobFiles:
    """Job folders `<root>/<job_id>/` holding `state.json`, `spec.json`, `pixels.npy`, `pvf_input.npy`, `result.json`."""

    def __init__(self, root: str | Path, ttl_s: float) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.ttl_s = float(ttl_s)

    def _dir(self, job_id: str) -> Path:
        if not JOB_ID.fullmatch(job_id):
            raise ValueError("invalid job id")
        return self.root / job_id

    def create(self, job_id: str, spec: dict[str, Any], client: str) -> None:
        """Persist a queued job (spec first, state last: a folder without state.json is incomplete and ignored)."""
        d = self._dir(job_id)
        d.mkdir()
        for key in _ARRAYS:
            if spec.get(key) is not None:
                np.save(d / f"{key}.npy", np.asarray(spec[key]), allow_pickle=False)
        rest = {k: v for k, v in spec.items() if k not in _ARRAYS}
        _write_atomic(d / "spec.json", json.dumps(rest).encode())
        self.set_state(job_id, {"status": "queued", "created": time.time(), "finished": None, "client": client})

    def spec(self, job_id: str) -> dict[str, Any]:
        """The spec a job was submitted with (arrays loaded without pickle)."""
        d = self._dir(job_id)
        spec = json.loads((d / "spec.json").read_text())
        for key in _ARRAYS:
            p = d / f"{key}.npy"
            spec[key] = np.load(p, allow_pickle=False) if p.exists() else None
        return spec

    def state(self, job_id: str) -> dict[str, Any] | None:
        """The job's state, None when unknown (or removed)."""
        try:
            return json.loads((self._dir(job_id) / "state.json").read_text())
        except (OSError, ValueError):
            return None

    def set_state(self, job_id: str, state: dict[str, Any]) -> None:
        """Replace the job's state atomically."""
        _write_atomic(self._dir(job_id) / "state.json", json.dumps(state).encode())

    def finish(self, job_id: str, status: str, result: dict[str, Any] | None = None, error: str | None = None) -> None:
        """Record the outcome: the result (JSON) first, then the state that points at it."""
        state = self.state(job_id) or {"created": time.time(), "client": ""}
        if result is not None:
            _write_atomic(self._dir(job_id) / "result.json", json.dumps(result).encode())
        self.set_state(job_id, {**state, "status": status, "finished": time.time(), "error": error})

    def result(self, job_id: str) -> dict[str, Any]:
        """The stored result of a done job."""
        return json.loads((self._dir(job_id) / "result.json").read_text())

    def remove(self, job_id: str) -> None:
        """Delete a job's folder (after it was fetched, or expired)."""
        shutil.rmtree(self._dir(job_id), ignore_errors=True)

    def ids(self) -> list[str]:
        """Every job folder with a state."""
        return [d.name for d in self.root.iterdir() if JOB_ID.fullmatch(d.name) and (d / "state.json").exists()]

    def expire(self, now: float | None = None) -> list[str]:
        """Remove finished jobs older than the TTL, and unfinished ones older than 24 TTLs; returns the removed ids."""
        now = time.time() if now is None else now
        gone = []
        for jid in self.ids():
            st = self.state(jid)
            if st is None:
                continue
            old_finished = st.get("finished") and now - float(st["finished"]) > self.ttl_s
            stuck = not st.get("finished") and now - float(st.get("created", now)) > 24 * self.ttl_s
            if old_finished or stuck:
                self.remove(jid)
                gone.append(jid)
        return gone

    def unfinished(self) -> list[str]:
        """Ids of queued or running jobs (to run again after a restart)."""
        return [j for j in self.ids() if (self.state(j) or {}).get("status") in ("queued", "running")]
