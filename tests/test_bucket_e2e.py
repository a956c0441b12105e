"""The whole pipeline with every input and output in a bucket (SeaweedFS on loopback, tests/_s3.py).

Default suite: the model registry, Serve's generation-job store and `raypipe generate` on the bucket
(tiny random models, no Ray). Slow: a synthetic cohort uploaded and its local copy deleted, then
`preprocess` -> `train` -> `cv` -> `evaluate` -> `train ldm` -> `publish` -> `serve` (HTTP scoring of a
study read from the bucket) -> `generate` as CLI subprocesses on a 2-node `ray.cluster_utils.Cluster`; the
run's cwd, HOME and TMPDIR are dedicated folders, and afterwards they hold nothing but Ray's session dir.
"""
from __future__ import annotations

import io
import json
import os
import secrets
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from raypipe import storage
from tests._s3 import S3Server, s3_env, s3_server, upload_tree  # noqa: F401  (fixtures)
from tests._scaleout import ROOT, VENV_BIN, free_port, kill_group

CONFIGS = ROOT / "jobs" / "configs"


def _keys(s3: S3Server, prefix: str) -> set[str]:
    """Object keys under a prefix of the test bucket, relative to the prefix."""
    import pyarrow.fs as pafs

    fs, p = pafs.FileSystem.from_uri(s3.uri(prefix))
    infos = fs.get_file_info(pafs.FileSelector(p, recursive=True, allow_not_found=True))
    return {i.path[len(p) + 1:] for i in infos if i.type == pafs.FileType.File}


def _files_under(root: Path) -> set[str]:
    """Every file and folder below `root`, as paths relative to it."""
    return {str(p.relative_to(root)) for p in root.rglob("*")}


# ------------------------------------------------------------------------------------------ default suite
def test_registry_jobs_and_generation_in_the_bucket(s3_env: S3Server, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """Publish, list and load versions on S3; an interrupted upload stays invisible and its number unused;
    generation-job files on S3; `raypipe generate` reading image and models from the bucket and writing there."""
    from raypipe import cli
    from raypipe.io.radiograph import write_radiograph_png
    from raypipe.registry import list_models, list_versions, load_version, publish
    from raypipe.scoring.tiny import publish_tiny_models
    from raypipe.serving.jobs import JobFiles

    prefix = f"unit-{secrets.token_hex(4)}"
    registry = s3_env.uri(prefix, "registry")
    work, cwd, tmp = tmp_path / "runs", tmp_path / "cwd", tmp_path / "tmp"
    for d in (cwd, tmp):
        d.mkdir()
    monkeypatch.chdir(cwd)
    monkeypatch.setenv("TMPDIR", str(tmp))
    monkeypatch.setattr(tempfile, "tempdir", None)  # re-read TMPDIR

    versions = publish_tiny_models(registry, which=("xray", "pvf", "ldm"), workdir=work)
    assert list_models(registry) == {"ldm": ["v1"], "pvf": ["v1"], "xray": ["v1"]}
    assert versions["xray"].location == f"{registry}/xray/v1"
    assert {"model.pt", "checksums.json", "card.md", "model_meta.json"} <= _keys(s3_env, f"{prefix}/registry/xray/v1")
    assert load_version(registry, "xray").build() is not None  # weights verified against checksums.json

    # a publish killed after some files but before checksums.json: not listed, and its number is never reused
    storage.atomic_write_bytes(f"{registry}/xray/v2/model.pt", b"partial upload")
    assert list_versions(registry, "xray") == ["v1"]
    assert load_version(registry, "xray").version == "v1"
    again = publish(work / "xray", registry, "xray")
    assert again.version == "v3" and list_versions(registry, "xray") == ["v1", "v3"]

    jobs = JobFiles(f"{registry}/.jobs", ttl_s=60)
    jid = secrets.token_hex(16)
    pixels = np.arange(12, dtype=np.float32).reshape(3, 4)
    jobs.create(jid, {"pixels": pixels, "pvf_input": None, "years": [1.0]}, client="c")
    assert jobs.ids() == [jid] and jobs.unfinished() == [jid]
    spec = jobs.spec(jid)
    assert np.array_equal(spec["pixels"], pixels) and spec["pvf_input"] is None and spec["years"] == [1.0]
    jobs.finish(jid, "done", {"gpvf": 0.5})
    assert jobs.state(jid)["status"] == "done" and jobs.result(jid) == {"gpvf": 0.5}
    with pytest.raises(FileExistsError):
        jobs.create(jid, {"years": [1.0]}, client="c")
    jobs.remove(jid)
    assert jobs.ids() == [] and not _keys(s3_env, f"{prefix}/registry/.jobs/{jid}")

    image = s3_env.uri(prefix, "xr", "baseline.png")
    yy, xx = np.mgrid[0:96, 0:64]
    assert write_radiograph_png(image, (np.sin(yy / 9.0) * np.cos(xx / 7.0) + 1) / 2) == image
    out = s3_env.uri(prefix, "generated")
    rc = cli.main(["generate", "--image", image, "--age", "70", "--sex", "F", "--years", "1,5", "--seeds", "1",
                   "--model", f"{registry}/ldm/v1", "--pvf", f"{registry}/pvf/v1", "--out", out, "--steps", "2"])
    assert rc == 0
    assert _keys(s3_env, f"{prefix}/generated") == {"generation.json", "year1_seed0.png", "year5_seed0.png"}
    record = json.loads(storage.read_bytes(f"{out}/generation.json"))
    assert record["model_dir"] == f"{registry}/ldm/v1" and 0.0 <= record["bpvf"] <= 1.0
    assert record["images"] == {"1": ["year1_seed0.png"], "5": ["year5_seed0.png"]}
    assert list(cwd.iterdir()) == []  # nothing beside the command
    left = [p.name for p in tmp.iterdir() if p.name.startswith("raypipe-") and not p.name.startswith("raypipe-registry-")]
    assert left == []  # per-call fetches and staged uploads are removed; model copies live as long as the process


def test_missing_model_in_bucket_names_the_uri(s3_env: S3Server, capsys: pytest.CaptureFixture[str]) -> None:
    """A model folder URI without a model: one error line naming the URI, exit 1."""
    from raypipe import cli

    missing = s3_env.uri(f"nothing-{secrets.token_hex(4)}", "ldm")
    image = s3_env.uri(f"nothing-{secrets.token_hex(4)}", "x.png")
    from raypipe.io.radiograph import write_radiograph_png

    write_radiograph_png(image, np.full((32, 32), 0.5))
    rc = cli.main(["generate", "--image", image, "--age", "70", "--sex", "F", "--model", missing,
                   "--out", s3_env.uri("never")])
    assert rc == 1 and missing in capsys.readouterr().err


def test_inspect_reads_from_the_bucket(s3_env: S3Server, capsys: pytest.CaptureFixture[str]) -> None:
    """`raypipe inspect URI --json --png URI`: the image is fetched for the call, the picture uploaded."""
    from raypipe import cli
    from raypipe.io.radiograph import write_radiograph_png

    prefix = f"inspect-{secrets.token_hex(4)}"
    image = s3_env.uri(prefix, "x.png")
    write_radiograph_png(image, np.tile(np.linspace(0, 1, 48), (64, 1)))
    assert cli.main(["inspect", image, "--json", "--png", s3_env.uri(prefix, "qc.png")]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["path"] == image and info["kind"] == "radiograph" and info["shape"] == [64, 48]
    assert storage.read_bytes(s3_env.uri(prefix, "qc.png"))[:8] == b"\x89PNG\r\n\x1a\n"


# ------------------------------------------------------------------------------------------ slow: everything
@pytest.fixture
def two_node_cluster(s3_env: S3Server, monkeypatch: pytest.MonkeyPatch):
    """A 2-node Ray cluster whose processes run in a dedicated cwd/HOME/TMPDIR; yields (address, run root)."""
    import ray
    from ray.cluster_utils import Cluster

    from raypipe.ray_utils import LOCAL_SYSTEM_CONFIG

    root = Path(tempfile.mkdtemp(prefix="rp-e2e-", dir="/tmp"))  # short: Ray's socket paths live under it
    for d in ("cwd", "home", "tmp"):
        (root / d).mkdir()
    env = {"HOME": str(root / "home"), "TMPDIR": str(root / "tmp"), "RAY_AUTH_MODE": "disabled",
           "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    for k in [k for k in os.environ if k.startswith("RAY_") and k != "RAY_AUTH_MODE"]:
        monkeypatch.delenv(k)
    monkeypatch.chdir(root / "cwd")
    had_ray = ray.is_initialized()
    ray.shutdown()
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 2, "include_dashboard": False, "_system_config": LOCAL_SYSTEM_CONFIG})
    cluster.add_node(num_cpus=2)
    cluster.wait_for_nodes()
    try:
        yield cluster.address, root
    finally:
        cluster.shutdown()
        monkeypatch.undo()
        shutil.rmtree(root, ignore_errors=True)
        if had_ray:
            from raypipe.ray_utils import init_ray

            init_ray()


def _raypipe(*args: str, timeout: float = 400) -> str:
    """Run one `raypipe` command in this process's environment (cwd, HOME, TMPDIR, AWS_*, RAY_ADDRESS); stdout."""
    r = subprocess.run([str(VENV_BIN / "raypipe"), *args], capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, f"raypipe {' '.join(args)}:\n{r.stdout[-2000:]}\n{r.stderr[-5000:]}"
    return r.stdout


def _wait_healthy(port: int, proc: subprocess.Popen, log: Path, timeout: float = 300) -> None:
    """Poll /healthz until 200 (the serve command keeps running in the background)."""
    import httpx

    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, f"raypipe serve exited: {log.read_text()[-4000:]}"
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(2)
    raise AssertionError(f"serve not healthy after {timeout} s: {log.read_text()[-4000:]}")


@pytest.mark.slow  # ~10 commands on a 2-node cluster: minutes on 2 cores
def test_pipeline_with_every_file_in_the_bucket_on_two_nodes(two_node_cluster: tuple[str, Path], s3_env: S3Server,
                                                             tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import httpx

    address, root = two_node_cluster
    prefix = f"e2e-{secrets.token_hex(4)}"
    base = s3_env.uri(prefix)
    monkeypatch.setenv("RAY_ADDRESS", address)
    monkeypatch.setenv("RAYPIPE_STORAGE", base)  # relative --out/--data/--registry below land in the bucket

    local = tmp_path / "cohort"
    from raypipe.data.synth import synth_cohort

    synth_cohort("xray", local, patients=48, seed=3, workers=1)
    upload_tree(local, f"{base}/cohort")
    upload_tree(CONFIGS, f"{base}/configs")
    shutil.rmtree(local)
    manifest = pd.read_csv(io.BytesIO(storage.read_bytes(f"{base}/cohort/manifest.csv")), dtype=str)
    before = {d: _files_under(root / d) for d in ("cwd", "home", "tmp")}

    printed = _raypipe("preprocess", "xray", "--manifest", f"{base}/cohort/manifest.csv", "--out", "shards",
                       "--set", "out_size=64", "--set", "shard_size=16")
    summary = json.loads(printed[printed.index("{"):])
    assert summary["ok"] == 48 and summary["out"] == f"{base}/shards", summary
    tiny = ["--set", "epochs=2", "--set", "n_boot=20"]
    _raypipe("train", "deepsurv", "--config", f"{base}/configs/xray_deepsurv_tiny.yaml", "--data", "shards",
             "--out", "runs/deepsurv", *tiny)
    _raypipe("cv", "deepsurv", "--config", f"{base}/configs/xray_deepsurv_tiny.yaml", "--folds", "2",
             "--data", f"{base}/shards", "--out", "cv/deepsurv", *tiny)
    _raypipe("evaluate", f"{base}/runs/deepsurv/predictions.parquet", f"{base}/cv/deepsurv/predictions.parquet",
             "--out", "report", "--n-boot", "20")
    metrics = json.loads(storage.read_bytes(f"{base}/report/metrics.json"))
    assert metrics["models"] and {"report.html", "metrics.json"} <= _keys(s3_env, f"{prefix}/report")
    _raypipe("train", "ldm", "--config", f"{base}/configs/ldm_tiny.yaml", "--data", f"{base}/cohort/manifest.csv",
             "--out", "runs/ldm", "--set", "vae_epochs=1", "--set", "unet_epochs=1", "--set", "max_steps_per_epoch=2")
    _raypipe("publish", f"{base}/runs/deepsurv", "--registry", "registry", "--name", "xray")
    _raypipe("publish", "runs/ldm", "--registry", f"{base}/registry", "--name", "ldm")
    assert {"xray/v1/checksums.json", "ldm/v1/model.pt"} <= _keys(s3_env, f"{prefix}/registry")

    port, log = free_port(), tmp_path / "serve.log"
    with open(log, "w") as fh:
        proc = subprocess.Popen([str(VENV_BIN / "raypipe"), "serve", "--registry", f"{base}/registry",
                                 "--port", str(port)], stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        _wait_healthy(port, proc, log)
        row = manifest.iloc[0]
        files = {"image": ("x.dcm", storage.read_bytes(f"{base}/cohort/{row['image_path']}"), "application/dicom"),
                 "keypoints": ("k.json", storage.read_bytes(f"{base}/cohort/{row['keypoints_path']}"),
                               "application/json")}
        clinical = {"age": float(row["age"]), "sex": row["sex"], "bmi": float(row["bmi"])}
        r = httpx.post(f"http://127.0.0.1:{port}/v1/xray/score", files=files,
                       data={"clinical": json.dumps(clinical)}, timeout=120)
        assert r.status_code == 200, r.text[:1000]
        body = r.json()
        assert 0.0 <= body["risk_5y"] <= 1.0 and body["models"]["xray"]["version"] == "v1"
    finally:
        kill_group(proc, grace=30)

    _raypipe("generate", "--image", f"{base}/cohort/{manifest.iloc[1]['image_path']}", "--age", "70", "--sex", "F",
             "--years", "1", "--seeds", "1", "--model", f"{base}/registry/ldm/v1", "--out", "generated",
             "--steps", "2")
    assert {"generation.json", "year1_seed0.png"} <= _keys(s3_env, f"{prefix}/generated")

    assert _files_under(root / "cwd") == before["cwd"], _files_under(root / "cwd") - before["cwd"]
    in_home = _files_under(root / "home") - before["home"]
    caches = {".cache", ".config", ".cache/matplotlib", ".config/matplotlib"}  # matplotlib's font cache (report PNGs)
    assert {p for p in in_home if p not in caches and not p.startswith(".cache/matplotlib/")} == set(), in_home
    new_tmp = _files_under(root / "tmp") - before["tmp"]
    top = {p.split("/")[0] for p in new_tmp}
    # Ray's session dir, per-process model copies (registry), torch's compile-cache dir; per-study fetches,
    # staged uploads and publish staging dirs are removed after use, so they must not be here
    stray = sorted(t for t in top if t not in ("ray", "_ray_lockfiles")  # Ray's session dir and its lock files
                   and not t.startswith(("raypipe-registry-", "torchinductor_")))
    assert stray == [], f"written outside the bucket, Ray's session dir and the model caches: {stray}"
