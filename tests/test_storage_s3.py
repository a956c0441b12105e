"""Object storage end to end against a real S3 server (SeaweedFS on loopback, tests/_s3.py): path resolution,
fetching to task-local temp dirs, uploads that are never visible half-written, manifests whose relative
paths resolve inside the bucket, and `raypipe preprocess` on a real local Ray reading a cohort that exists
only in the bucket and writing its shards there."""
from __future__ import annotations

import gzip
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from raypipe import storage
from tests._s3 import S3Server, s3_env, s3_server, upload_tree  # noqa: F401  (fixtures)
from tests._scaleout import ROOT, VENV_BIN


def _keys(s3: S3Server, prefix: str) -> dict[str, int]:
    """Object keys under a prefix of the test bucket -> size."""
    import pyarrow.fs as pafs

    fs, p = pafs.FileSystem.from_uri(s3.uri(prefix))
    infos = fs.get_file_info(pafs.FileSelector(p, recursive=True, allow_not_found=True))
    return {i.path[len(s3.bucket) + 1:]: i.size for i in infos if i.type == pafs.FileType.File}


def test_resolve_parent_absolute() -> None:
    assert storage.parent("s3://b/cohort/manifest.csv") == "s3://b/cohort"
    assert storage.resolve("ct/p1", "s3://b/cohort") == "s3://b/cohort/ct/p1"
    assert storage.resolve("../shared/p1.dcm", "s3://b/cohort/a") == "s3://b/cohort/shared/p1.dcm"
    assert storage.resolve("gs://other/x.dcm", "s3://b/cohort") == "gs://other/x.dcm"
    assert storage.resolve("ct/p1", "/data/cohort") == "/data/cohort/ct/p1"
    with pytest.raises(ValueError, match="leaves the bucket"):
        storage.resolve("../../escape", "s3://b/cohort")
    with pytest.raises(ValueError, match="absolute local path"):
        storage.resolve("/mnt/x.dcm", "s3://b/cohort")
    assert storage.absolute("s3://b/run") == "s3://b/run" and storage.absolute("run") == os.path.abspath("run")


def test_writes_leave_no_temp_objects_and_localize_fetches(s3_env: S3Server, tmp_path: Path) -> None:
    storage.atomic_write_json(s3_env.uri("w/run/metrics.json"), {"auroc": 0.7})
    storage.atomic_write_parquet(pd.DataFrame({"a": [1, 2]}), s3_env.uri("w/run/p.parquet"))
    gz = gzip.compress(b"NIfTI" * 100)
    storage.atomic_write_bytes(s3_env.uri("w/run/mask.nii.gz"), gz)
    keys = _keys(s3_env, "w/run")
    assert set(keys) == {"w/run/metrics.json", "w/run/p.parquet", "w/run/mask.nii.gz"}  # no temp names, no leftovers
    assert keys["w/run/mask.nii.gz"] == len(gz)  # stored as given: a `.gz` name is not compressed again
    with storage.localize(s3_env.uri("w/run/mask.nii.gz")) as local:
        assert Path(local).read_bytes() == gz
    assert json.loads(storage.read_bytes(s3_env.uri("w/run/metrics.json"))) == {"auroc": 0.7}
    assert pd.read_parquet(io.BytesIO(storage.read_bytes(s3_env.uri("w/run/p.parquet"))))["a"].tolist() == [1, 2]

    series = tmp_path / "series"
    (series / "sub").mkdir(parents=True)
    (series / "1.dcm").write_bytes(b"a" * 10)
    (series / "sub" / "2.dcm").write_bytes(b"b" * 20)
    assert upload_tree(series, s3_env.uri("w/series")) == 2
    with storage.localize(s3_env.uri("w/series")) as local:
        fetched = Path(local)
        assert fetched.name == "series" and (fetched / "1.dcm").read_bytes() == b"a" * 10
        assert (fetched / "sub" / "2.dcm").read_bytes() == b"b" * 20
    assert not fetched.exists() and not fetched.parent.exists()  # the task-local temp dir is gone
    with storage.localize(s3_env.uri("w/series/1.dcm")) as local:
        assert Path(local).read_bytes() == b"a" * 10
    with storage.localize(str(series / "1.dcm")) as local:  # local paths are used in place
        assert local == str(series / "1.dcm")
    with pytest.raises(FileNotFoundError) as info:
        with storage.localize(s3_env.uri("w/missing.dcm")) as local:
            assert not Path(local).exists()
            open(local)
    assert any(s3_env.uri("w/missing.dcm") in n for n in info.value.__notes__)


_WRITER = """
import sys
from raypipe import storage
print("start", flush=True)
storage.atomic_write_bytes(sys.argv[1], b"x" * int(sys.argv[2]))
print("done", flush=True)
"""


def test_killed_upload_is_never_visible_half_written(s3_env: S3Server, tmp_path: Path) -> None:
    size = 96 * 1024 * 1024  # large enough for a multipart upload that takes a while on loopback
    env = {**os.environ, **s3_env.env, "PYTHONPATH": str(ROOT)}
    for delay in (0.5, 1.5):
        uri = s3_env.uri(f"kill/obj-{delay}.bin")
        proc = subprocess.Popen([sys.executable, "-c", _WRITER, uri, str(size)], env=env, stdout=subprocess.PIPE,
                                text=True, start_new_session=True)
        assert proc.stdout.readline().strip() == "start"
        time.sleep(delay)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        seen = _keys(s3_env, "kill")
        assert seen.get(f"kill/obj-{delay}.bin", size) == size  # absent, or complete: never partial
        assert all(k.startswith("kill/obj-") for k in seen)  # and no temp objects beside it
    storage.atomic_write_bytes(s3_env.uri("kill/whole.bin"), b"y" * 1000)
    assert _keys(s3_env, "kill")["kill/whole.bin"] == 1000


def _cohort_in_bucket(s3: S3Server, tmp_path: Path, kind: str, patients: int, prefix: str) -> str:
    """A synthetic cohort uploaded under `prefix`, its local copy deleted; returns the manifest URI."""
    from raypipe.data.synth import synth_cohort

    local = tmp_path / f"{kind}_cohort"
    synth_cohort(kind, local, patients, seed=11, workers=1)
    manifest = pd.read_csv(local / "manifest.csv", dtype=str)
    assert not any(str(v).startswith("/") for v in manifest["image_path"])  # relative paths, as synth writes them
    upload_tree(local, s3.uri(prefix))
    shutil.rmtree(local)
    return s3.uri(prefix, "manifest.csv")


def test_manifest_in_bucket_resolves_against_its_own_location(s3_env: S3Server, tmp_path: Path) -> None:
    from raypipe.io.manifest import load_manifest, validate_manifest

    uri = _cohort_in_bucket(s3_env, tmp_path, "xray", 2, "mxr")
    rep = validate_manifest(uri)
    assert rep.ok, rep.summary()
    table = load_manifest(uri)
    assert all(p.startswith(s3_env.uri("mxr") + "/") for p in table["image_path"])
    assert all(storage.exists(p) for p in table["keypoints_path"])
    bad = pd.read_csv(io.BytesIO(storage.read_bytes(uri)), dtype=str)
    bad.loc[0, "image_path"] = "/nowhere/local.dcm"
    bad.loc[1, "image_path"] = "missing/x.dcm"
    storage.atomic_write_text(s3_env.uri("mxr/bad.csv"), bad.to_csv(index=False))
    problems = [str(p) for p in validate_manifest(s3_env.uri("mxr/bad.csv")).problems]
    assert any("row 1" in p and "absolute local path" in p for p in problems), problems
    assert any("row 2" in p and "file not found" in p and s3_env.uri("mxr/missing/x.dcm") in p for p in problems)


def test_xray_study_read_from_bucket(s3_env: S3Server, tmp_path: Path) -> None:
    from raypipe.data.xray_pipeline import process_study, read_xray_manifest
    from raypipe.preprocess.config import XrayPreprocessConfig

    rows = read_xray_manifest(_cohort_in_bucket(s3_env, tmp_path, "xray", 1, "sxr"))
    record, qc = process_study(rows.iloc[0].to_dict(), XrayPreprocessConfig(out_size=64))
    assert qc["status"] == "ok", qc["message"]
    assert record["image"].shape[-2:] == (64, 64) and qc["keypoints_source"] == "manifest"


def test_preprocess_ct_cohort_only_in_bucket_on_local_ray(s3_env: S3Server, tmp_path: Path) -> None:
    from raypipe.data.shards import load_shards

    manifest = _cohort_in_bucket(s3_env, tmp_path, "ct", 3, "cohort_ct")
    out = s3_env.uri("shards_ct")
    fetch, cwd = tmp_path / "fetch", tmp_path / "cwd"
    fetch.mkdir()
    cwd.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(s3_env.env, PYTHONPATH=str(ROOT), RAYPIPE_FETCH_DIR=str(fetch), OMP_NUM_THREADS="1")
    r = subprocess.run([str(VENV_BIN / "raypipe"), "preprocess", "ct", "--manifest", manifest, "--out", out],
                       env=env, cwd=cwd, capture_output=True, text=True, timeout=420)
    assert r.returncode == 0, r.stderr[-4000:]
    summary = json.loads(r.stdout[r.stdout.index("{"):])
    qc = pd.read_csv(io.BytesIO(storage.read_bytes(summary["qc_path"])))
    assert summary["ok"] == 3 and summary["skipped"] == 0 and summary["error"] == 0, qc["message"].tolist()[0]
    assert summary["shard_nodes"], "shards were not written by Ray tasks"
    keys = _keys(s3_env, "shards_ct")
    assert {"shards_ct/qc.csv", "shards_ct/shards.json", "shards_ct/config.yaml"} <= set(keys)
    assert len([k for k in keys if k.endswith(".parquet")]) == len(summary["parquet_files"]) >= 1
    shards = load_shards(out, backend="pandas")
    assert len(shards) == 3 and shards["bone"].iloc[0].shape[1:] == (96, 96)
    assert list(fetch.iterdir()) == []  # every study's temp dir was removed after use
    assert list(cwd.iterdir()) == []  # nothing written beside the job
