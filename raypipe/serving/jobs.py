"""Durable state of generation jobs: one folder per job under the registry's storage, written atomically.

`JobFiles` keeps what a job needs to be run again (the spec: pixels and pVF input as .npy, the rest as
JSON), its status and its result. A JobStore replica that replaces a dead one finds queued/running jobs
here and runs them again (generation is deterministic given the seeds), so a job survives the restart
of the replica that held it. Finished results expire `ttl_s` after they finish; a result is removed once
fetched. Pure file code (no Ray), so it is testable on its own.
"""
from __future__ import annotations

import io
import json
import re
import time
from pathlib import Path
from typing import Any

import numpy as np

from raypipe import storage

JOB_ID = re.compile(r"[0-9a-f]{32}")
_ARRAYS = ("pixels", "pvf_input")


class JobFiles:
    """Job folders `<root>/<job_id>/` holding `state.json`, `spec.json`, `pixels.npy`, `pvf_input.npy`, `result.json`.

    `root` may be a local folder or an `s3://` / `gs://` prefix; every file is written whole (temp name and
    rename locally, one PUT on an object store), so a reader never sees half a state.
    """

    def __init__(self, root: str | Path, ttl_s: float) -> None:
        self.root = storage.absolute(root)
        storage.makedirs(self.root)
        self.ttl_s = float(ttl_s)

    def _dir(self, job_id: str) -> str:
        if not JOB_ID.fullmatch(job_id):
            raise ValueError("invalid job id")
        return storage.join(self.root, job_id)

    def create(self, job_id: str, spec: dict[str, Any], client: str) -> None:
        """Persist a queued job (spec first, state last: a folder without state.json is incomplete and ignored)."""
        d = self._dir(job_id)
        if storage.exists(d):
            raise FileExistsError(f"job folder exists already: {d}")
        storage.makedirs(d)
        for key in _ARRAYS:
            if spec.get(key) is not None:
                buf = io.BytesIO()
                np.save(buf, np.asarray(spec[key]), allow_pickle=False)
                storage.atomic_write_bytes(storage.join(d, f"{key}.npy"), buf.getvalue())
        rest = {k: v for k, v in spec.items() if k not in _ARRAYS}
        storage.atomic_write_bytes(storage.join(d, "spec.json"), json.dumps(rest).encode())
        self.set_state(job_id, {"status": "queued", "created": time.time(), "finished": None, "client": client})

    def spec(self, job_id: str) -> dict[str, Any]:
        """The spec a job was submitted with (arrays loaded without pickle)."""
        d = self._dir(job_id)
        spec = json.loads(storage.read_bytes(storage.join(d, "spec.json")))
        for key in _ARRAYS:
            p = storage.join(d, f"{key}.npy")
            spec[key] = np.load(io.BytesIO(storage.read_bytes(p)), allow_pickle=False) if storage.exists(p) else None
        return spec

    def state(self, job_id: str) -> dict[str, Any] | None:
        """The job's state, None when unknown (or removed)."""
        try:
            return json.loads(storage.read_bytes(storage.join(self._dir(job_id), "state.json")))
        except (OSError, ValueError):
            return None

    def set_state(self, job_id: str, state: dict[str, Any]) -> None:
        """Replace the job's state atomically."""
        storage.atomic_write_bytes(storage.join(self._dir(job_id), "state.json"), json.dumps(state).encode())

    def finish(self, job_id: str, status: str, result: dict[str, Any] | None = None, error: str | None = None) -> None:
        """Record the outcome: the result (JSON) first, then the state that points at it."""
        state = self.state(job_id) or {"created": time.time(), "client": ""}
        if result is not None:
            storage.atomic_write_bytes(storage.join(self._dir(job_id), "result.json"), json.dumps(result).encode())
        self.set_state(job_id, {**state, "status": status, "finished": time.time(), "error": error})

    def result(self, job_id: str) -> dict[str, Any]:
        """The stored result of a done job."""
        return json.loads(storage.read_bytes(storage.join(self._dir(job_id), "result.json")))

    def remove(self, job_id: str) -> None:
        """Delete a job's folder (after it was fetched, or expired)."""
        try:
            storage.remove(self._dir(job_id))
        except OSError:
            pass  # gone already, or removed by another replica

    def ids(self) -> list[str]:
        """Every job folder with a state."""
        return [name for name, is_dir in storage.listdir(self.root)
                if is_dir and JOB_ID.fullmatch(name) and storage.exists(storage.join(self.root, name, "state.json"))]

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
