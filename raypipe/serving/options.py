"""Typed options of the Serve app: model names, limits, batching, resources; read from env for `serve run`."""
from __future__ import annotations

import os
from typing import Any

import ipaddress
import re

from pydantic import BaseModel, ConfigDict, Field, field_validator

REGISTRY_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")  # no separators, no "..": one folder name
DEFAULT_NAMES: dict[str, str] = {"ct": "ct", "xray": "xray", "pvf": "pvf", "ldm": "ldm", "keypoints": "keypoints"}


class BatchOptions(BaseModel):
    """`@serve.batch` parameters of a model deployment (also settable per deployment through user_config)."""

    model_config = ConfigDict(extra="forbid")

    max_batch_size: int = Field(8, ge=1, le=256)
    batch_wait_timeout_s: float = Field(0.0, ge=0, le=5, description="0: no wait at one client; batches still form "
                                        "from requests queued while the previous batch runs")


class ServeOptions(BaseModel):
    """Everything `build_app` needs besides the registry path."""

    model_config = ConfigDict(extra="forbid")

    names: dict[str, str | None] = Field(default_factory=lambda: dict(DEFAULT_NAMES),
                                         description="role (ct, xray, pvf, ldm, keypoints) -> registry model name; None disables")
    versions: dict[str, str] = Field(default_factory=dict, description="role -> version (default latest)")
    api_token: str | None = Field(None, description="bearer token required on every route but /healthz", repr=False)
    max_request_bytes: int = Field(256 * 1024 * 1024, ge=1024, description="413 above this (Content-Length or read)")
    insecure_no_token: bool = Field(False, description="allow a non-loopback bind address without a token")
    max_zip_files: int = Field(2000, ge=1)
    max_unpacked_bytes: int = Field(512 << 20, ge=1024, description="per request, all fields: bytes after unzip/gunzip")
    max_voxels: int = Field(512 * 512 * 640, ge=1, description="CT or mask voxels declared in a header; 413 above")
    max_pixels: int = Field(25 * 1024 * 1024, ge=1, description="radiograph pixels declared in a header; 413 above")
    batch: BatchOptions = Field(default_factory=BatchOptions)
    job_ttl_s: float = Field(3600.0, gt=0, description="finished generation results are dropped after this")
    max_jobs: int = Field(64, ge=1, description="queued + running + unfetched jobs; 429 above")
    job_dir: str | None = Field(None, description="durable job state; default REGISTRY/.jobs (shared storage)")
    max_jobs_per_client: int = Field(4, ge=1, description="queued + running + unfetched jobs per client; 429 above")
    max_years: int = Field(20, ge=1)
    max_seeds: int = Field(16, ge=1)
    torch_threads: int | None = Field(None, ge=1, description="intra-op threads (torch, SimpleITK, OpenCV) per replica; "
                                      "None: the CPUs Ray assigned to the replica (at least 1)")
    handle_retries: int = Field(3, ge=0, description="retries of a call whose replica died (inference is idempotent)")
    num_cpus: dict[str, float] = Field(default_factory=lambda: {
        "ApiIngress": 0.2, "CTPreprocess": 0.4, "XrayPreprocess": 0.4, "CTModel": 0.4, "XrayModel": 0.3,
        "PVFModel": 0.3, "GeneratorModel": 0.3, "JobStore": 0.1})
    preprocess_max_replicas: int = Field(2, ge=1, description="preprocessing replicas autoscale 1..N on queue length")
    preprocess_target_ongoing: float = Field(2.0, gt=0, description="autoscaling target: ongoing requests per "
                                             "preprocessing replica (queued + running)")
    num_gpus: dict[str, float] = Field(default_factory=dict, description="e.g. {'CTModel': 0.5} on GPU nodes")

    @field_validator("names")
    @classmethod
    def _valid_names(cls, v: dict[str, str | None]) -> dict[str, str | None]:
        for role, name in v.items():
            if role not in DEFAULT_NAMES:
                raise ValueError(f"unknown role {role!r}; expected one of {sorted(DEFAULT_NAMES)}")
            if name is not None and not REGISTRY_NAME.fullmatch(name):
                raise ValueError(f"registry name for {role!r} must match {REGISTRY_NAME.pattern} (got {name[:80]!r})")
        return v

    @field_validator("versions")
    @classmethod
    def _valid_versions(cls, v: dict[str, str]) -> dict[str, str]:
        for role, version in v.items():
            if role not in DEFAULT_NAMES or not (version == "latest" or REGISTRY_NAME.fullmatch(version)):
                raise ValueError(f"version for {role!r} must be 'latest' or match {REGISTRY_NAME.pattern}")
        return v

    def model_name(self, role: str) -> str | None:
        """Registry name serving `role` (None when disabled)."""
        return self.names.get(role, DEFAULT_NAMES.get(role))

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> "ServeOptions":
        """Options from RAYPIPE_* variables (RAYPIPE_API_TOKEN, RAYPIPE_MAX_REQUEST_BYTES, RAYPIPE_MODEL_<ROLE>)."""
        e = dict(os.environ if env is None else env)
        kw: dict[str, Any] = {}
        if e.get("RAYPIPE_API_TOKEN"):
            kw["api_token"] = e["RAYPIPE_API_TOKEN"]
        if e.get("RAYPIPE_MAX_REQUEST_BYTES"):
            kw["max_request_bytes"] = int(e["RAYPIPE_MAX_REQUEST_BYTES"])
        if e.get("RAYPIPE_INSECURE_NO_TOKEN", "").lower() in ("1", "true", "yes"):
            kw["insecure_no_token"] = True
        if e.get("RAYPIPE_JOB_TTL_S"):
            kw["job_ttl_s"] = float(e["RAYPIPE_JOB_TTL_S"])
        names = dict(DEFAULT_NAMES)
        for role in DEFAULT_NAMES:
            v = e.get(f"RAYPIPE_MODEL_{role.upper()}")
            if v is not None:
                names[role] = v or None
        kw["names"] = names
        return cls(**kw)


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and `localhost`."""
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_bind(host: str, options: ServeOptions) -> None:
    """Refuse a non-loopback bind address unless a token is set or `insecure_no_token` is given (ValueError)."""
    if not is_loopback(host) and not options.api_token and not options.insecure_no_token:
        raise ValueError(f"refusing to listen on {host!r} without a token: set RAYPIPE_API_TOKEN, or bind 127.0.0.1, "
                         "or pass --insecure-no-token (RAYPIPE_INSECURE_NO_TOKEN=1) to accept anyone on the network")
