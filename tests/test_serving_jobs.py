"""Durable generation-job state (raypipe.serving.jobs): spec round trip without pickle, TTL expiry, resumable jobs."""
from __future__ import annotations

import uuid
from pathlib import Path

import numpy as np
import pytest

from raypipe.serving.jobs import JobFiles


def test_job_round_trip_and_fetch_once(tmp_path: Path) -> None:
    files = JobFiles(tmp_path / ".jobs", ttl_s=60)
    jid = uuid.uuid4().hex
    spec = {"pixels": np.linspace(0, 1, 12, dtype=np.float32).reshape(3, 4), "pvf_input": None, "age": 70.0,
            "sex": "F", "years": [1, 5], "seeds": [0, 1], "models": {"ldm": {"version": "v1"}}}
    files.create(jid, spec, client="c1")
    assert files.unfinished() == [jid] and files.state(jid)["client"] == "c1"
    back = files.spec(jid)
    np.testing.assert_array_equal(back["pixels"], spec["pixels"])
    assert back["pvf_input"] is None and back["years"] == [1, 5] and back["models"] == spec["models"]
    files.finish(jid, "done", {"bpvf": 0.3})
    assert files.unfinished() == [] and files.result(jid) == {"bpvf": 0.3}
    files.remove(jid)
    assert files.state(jid) is None and files.ids() == []


def test_ttl_expiry_of_finished_and_stuck_jobs(tmp_path: Path) -> None:
    files = JobFiles(tmp_path, ttl_s=10)
    done, stuck, fresh = (uuid.uuid4().hex for _ in range(3))
    for jid in (done, stuck, fresh):
        files.create(jid, {"pixels": np.zeros((2, 2), np.float32), "years": [1]}, client="")
    files.finish(done, "done", {"x": 1})
    st = files.state(stuck)
    files.set_state(stuck, {**st, "created": st["created"] - 1000})
    now = files.state(done)["finished"] + 11
    assert sorted(files.expire(now)) == sorted([done, stuck])
    assert files.ids() == [fresh]


def test_job_ids_are_checked(tmp_path: Path) -> None:
    files = JobFiles(tmp_path, ttl_s=10)
    for bad in ("../x", "g" * 32, "0" * 31, "A" * 32):
        assert files.state(bad) is None
        with pytest.raises(ValueError):
            files.create(bad, {}, "")
