"""Model registry: versioned, immutable model directories `REGISTRY/NAME/VERSION/`.

A version holds `model.pt` (a state_dict, loaded with `weights_only=True`), `config.yaml`,
`preprocess.yaml`, `metrics.json`, `card.md`, `model_meta.json` (builder name and kwargs) and
`checksums.json` (sha256 of every file), so a corrupt or edited version is detected on load.

REGISTRY and the run folder may be local or `s3://` / `gs://` URIs. On a local disk a version is staged in a
hidden folder and renamed into place. An object store has no rename: each file is one PUT and
`checksums.json` is written last, so a version without it (an upload in progress or interrupted) is not
listed, and its number is never reused. Versions on object stores are fetched once per process into a
task-local temp dir (removed at exit) and verified there.
"""
from __future__ import annotations

import atexit
import hashlib
import json
import os
import re
import shutil
import stat
import tempfile
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from raypipe import storage
from raypipe.io.errors import RaypipeInputError

REQUIRED_RUN_FILES = ("model.pt", "config.yaml", "model_meta.json")
OPTIONAL_RUN_FILES = ("metrics.json", "preprocess.yaml", "metrics.csv")
_VERSION_RE = re.compile(r"^v(\d+)$")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


if TYPE_CHECKING:
    from raypipe.artifact import RunArtifact


class RegistryError(RaypipeInputError):
    """A missing model or version, a corrupt version, or a run folder that cannot be published."""


@dataclass(frozen=True)
class ModelVersion:
    """One published model version: where it is and what it says about itself."""

    name: str
    version: str
    path: Path
    meta: dict[str, Any]
    metrics: dict[str, Any]
    config: dict[str, Any]
    preprocess: dict[str, Any]
    location: str = ""  # where the version is published (a URI when `path` is a fetched copy)

    def load_state_dict(self) -> dict[str, Any]:
        """The weights, loaded safely (`weights_only=True`) on CPU."""
        import torch

        try:
            return torch.load(self.path / "model.pt", map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001
            raise RegistryError(f"cannot load weights: {e}", path=str(self.path / "model.pt")) from e

    @property
    def artifact(self) -> "RunArtifact":
        """The typed run artifact (model_meta.json) of this version."""
        from raypipe.artifact import artifact_from_dict

        return artifact_from_dict(self.meta, str(self.path / "model_meta.json"))

    def build(self):
        """Rebuild the nn.Module from its builder name and kwargs and load the weights (eval mode)."""
        from raypipe.models.registry import build_model

        art = self.artifact
        model = build_model(art.builder, **art.inference_kwargs())
        model.load_state_dict(self.load_state_dict())
        return model.eval()


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _check_name(registry: str | Path, name: str) -> None:
    """A model name must be one folder name (no separators, no traversal)."""
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name) or len(name) > 128:
        raise RegistryError(f"invalid model name {str(name)[:80]!r}: letters, digits, '_', '.', '-' only",
                            path=str(registry), field="name", value=name)


def _version_folders(base: str) -> list[str]:
    """Every `vN` folder under a model's folder, complete or not, oldest first."""
    vs = [n for n, is_dir in storage.listdir(base) if is_dir and _VERSION_RE.match(n)]
    return sorted(vs, key=lambda v: int(_VERSION_RE.match(v).group(1)))


def list_versions(registry: str | Path, name: str) -> list[str]:
    """Published versions of a model, oldest first (v1, v2, ...); a name that is not one folder name is an error."""
    _check_name(registry, name)
    base = storage.join(str(registry), name)
    vs = _version_folders(base)
    if storage.is_uri(base):  # checksums.json is uploaded last: without it the version is not (yet) published
        vs = [v for v in vs if storage.is_file(storage.join(base, v, "checksums.json"))]
    return vs


def list_models(registry: str | Path) -> dict[str, list[str]]:
    """Every model name in the registry with its versions."""
    names = [n for n, is_dir in storage.listdir(str(registry)) if is_dir and _NAME_RE.fullmatch(n)]  # skips .jobs
    return {n: vs for n in names if (vs := list_versions(registry, n))}


def publish(run_dir: str | Path, registry: str | Path, name: str, card_notes: str = "") -> ModelVersion:
    """Copy a train/cv output folder into a new immutable version `vN+1` of `name`."""
    run, reg = storage.absolute(run_dir), storage.absolute(registry)
    if not _NAME_RE.match(name):
        raise RegistryError(f"invalid model name {name!r}: letters, digits, '.', '_' and '-' only", field="name", value=name)
    if not storage.is_dir(run):
        raise RegistryError("run folder not found", path=run)
    missing = [f for f in REQUIRED_RUN_FILES if not storage.is_file(storage.join(run, f))]
    if missing:
        raise RegistryError(f"not a raypipe run folder: missing {', '.join(missing)}", path=run)
    from raypipe.artifact import ArtifactError, read_artifact

    try:
        meta = read_artifact(run).as_dict()
    except ArtifactError as exc:
        raise RegistryError(exc.reason, path=exc.path, field=exc.field) from exc
    base = storage.join(reg, name)
    if storage.is_uri(base):
        tmp = Path(storage.task_temp_dir("raypipe-publish-"))
    else:
        Path(base).mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".publish-", dir=base))
    try:
        _stage_version(run, tmp, name, meta, card_notes)
        n = _upload_version(tmp, base) if storage.is_uri(base) else _rename_version(tmp, Path(base))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return load_version(reg, name, f"v{n}")


def _stage_version(run: str, tmp: Path, name: str, meta: dict[str, Any], card_notes: str) -> None:
    """Fill a local staging folder with the run's files, defaults, the model card and checksums.json."""
    for f in REQUIRED_RUN_FILES + OPTIONAL_RUN_FILES:
        if storage.is_file(storage.join(run, f)):
            storage.download_tree(storage.join(run, f), tmp / f)
    if not (tmp / "metrics.json").exists():
        (tmp / "metrics.json").write_text("{}\n")
    if not (tmp / "preprocess.yaml").exists():
        cfg = yaml.safe_load((tmp / "config.yaml").read_text()) or {}
        (tmp / "preprocess.yaml").write_text(yaml.safe_dump(cfg.get("preprocess", {}), sort_keys=False))
    (tmp / "card.md").write_text(_model_card(name, meta, tmp, run, card_notes))
    sums = {f.name: _sha256(f) for f in sorted(tmp.iterdir()) if f.is_file()}
    (tmp / "checksums.json").write_text(json.dumps(sums, indent=2) + "\n")


def _rename_version(tmp: Path, base: Path) -> int:
    """Local disk: make the staged folder read-only and claim the next number atomically (rename fails if taken)."""
    for f in tmp.iterdir():
        f.chmod(stat.S_IRUSR | stat.S_IRGRP | stat.S_IROTH)
    while True:
        n = len(_version_folders(str(base))) + 1
        target = base / f"v{n}"
        try:
            os.rename(tmp, target)
            return n
        except OSError:
            if not target.exists():
                raise


def _upload_version(tmp: Path, base: str) -> int:
    """Object store: one PUT per file into the next unused `vN`, checksums.json last (it publishes the version)."""
    folders = _version_folders(base)  # incomplete uploads included: a number is never reused
    n = int(_VERSION_RE.match(folders[-1]).group(1)) + 1 if folders else 1
    target = storage.join(base, f"v{n}")
    for f in sorted(tmp.iterdir()):
        if f.name != "checksums.json":
            storage.atomic_write_bytes(storage.join(target, f.name), f.read_bytes())
    if storage.exists(storage.join(target, "checksums.json")):
        raise RegistryError(f"another publish wrote version v{n} at the same time; publish again", path=target)
    storage.atomic_write_bytes(storage.join(target, "checksums.json"), (tmp / "checksums.json").read_bytes())
    return n


def _fmt(x: Any) -> str:
    """A metric for the model card: 3 decimals, "n/a" when undefined (null/NaN in metrics.json)."""
    return f"{x:.3f}" if isinstance(x, (int, float)) and x == x else "n/a"


def _model_card(name: str, meta: dict, folder: Path, run: str, notes: str) -> str:
    metrics = json.loads((folder / "metrics.json").read_text() or "{}")
    lines = [f"# {name}", "", f"Published {datetime.now(timezone.utc).isoformat(timespec='seconds')} from `{run}`.", "",
             "## Model", f"- builder: `{meta['builder']}`", f"- task: {meta.get('task', 'unknown')}",
             f"- kwargs: `{json.dumps(meta.get('kwargs', {}))}`", "", "## Data", f"- {meta.get('data', 'see config.yaml')}",
             "", "## Metrics"]
    models = metrics.get("models", {})
    if not models:
        lines.append("- none recorded")
    for m, vals in models.items():
        for k, v in vals.items():
            if isinstance(v, dict) and "value" in v:
                ci = f" (95% CI {_fmt(v.get('ci_low'))}-{_fmt(v.get('ci_high'))})" if "ci_low" in v else ""
                lines.append(f"- {m} {k}: {_fmt(v['value'])}{ci}")
    lines += ["", "## Intended use",
              "Research use: opportunistic fracture-risk estimation from routine imaging. Not a medical device;",
              "validate on the local population before any clinical use.", ""]
    if notes:
        lines += ["## Notes", notes, ""]
    return "\n".join(lines)


def resolve_version(registry: str | Path, name: str, version: str = "latest") -> str:
    """`latest` -> the highest published version; otherwise check the version exists."""
    vs = list_versions(registry, name)
    if not vs:
        raise RegistryError(f"no published model named {name!r}", path=str(registry), field="name", value=name)
    if version in ("latest", None, ""):
        return vs[-1]
    if version not in vs:
        raise RegistryError(f"model {name!r} has no version {version!r} (have {', '.join(vs)})",
                            path=str(registry), field="version", value=version)
    return version


_FETCHED: dict[str, Path] = {}  # version URI -> its verified local copy (versions are immutable)


def _fetched_copy(uri: str) -> Path:
    """A local copy of a version stored on an object store, fetched once per process into a task-local temp dir."""
    if uri in _FETCHED and _FETCHED[uri].is_dir():
        return _FETCHED[uri]
    tmp = Path(storage.task_temp_dir("raypipe-registry-"))
    atexit.register(shutil.rmtree, tmp, True)
    local = tmp / "version"
    try:
        storage.download_tree(uri, local)
    except FileNotFoundError as e:
        raise RegistryError("model version not found", path=uri) from e
    _FETCHED[uri] = local
    return local


def load_version(registry: str | Path, name: str, version: str = "latest", verify: bool = True) -> ModelVersion:
    """Open a published version, verifying checksums so corruption is an error, not a wrong answer."""
    v = resolve_version(registry, name, version)
    location = storage.join(storage.absolute(registry), name, v)
    d = _fetched_copy(location) if storage.is_uri(location) else Path(location)
    try:
        return _open_version(d, name, v, location, verify)
    except RegistryError:
        _FETCHED.pop(location, None)  # a bad copy is fetched again next time
        raise


def _open_version(d: Path, name: str, v: str, location: str, verify: bool) -> ModelVersion:
    """Read a version folder on the local disk (checksums verified when asked)."""
    where = location if storage.is_uri(location) else str(d)
    sums_path = d / "checksums.json"
    if not sums_path.is_file():
        raise RegistryError("corrupt model version: checksums.json missing", path=where)
    sums = json.loads(sums_path.read_text())
    if verify:
        for f, digest in sums.items():
            fp = d / f
            if not fp.is_file():
                raise RegistryError(f"corrupt model version: {f} missing", path=where)
            if _sha256(fp) != digest:
                raise RegistryError(f"corrupt model version: checksum mismatch for {f}", path=storage.join(where, f))
    try:
        return ModelVersion(
            name=name, version=v, path=d,
            meta=json.loads((d / "model_meta.json").read_text()),
            metrics=json.loads((d / "metrics.json").read_text() or "{}"),
            config=yaml.safe_load((d / "config.yaml").read_text()) or {},
            preprocess=yaml.safe_load((d / "preprocess.yaml").read_text()) or {},
            location=location,
        )
    except (json.JSONDecodeError, yaml.YAMLError) as e:
        raise RegistryError(f"corrupt model version: {e}", path=where) from e
