"""Model registry: versioned, immutable model directories `REGISTRY/NAME/VERSION/`.

A version holds `model.pt` (a state_dict, loaded with `weights_only=True`), `config.yaml`,
`preprocess.yaml`, `metrics.json`, `card.md`, `model_meta.json` (builder name and kwargs) and
`checksums.json` (sha256 of every file), so a corrupt or edited version is detected on load.
"""
from __future__ import annotations

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


def list_versions(registry: str | Path, name: str) -> list[str]:
    """Published versions of a model, oldest first (v1, v2, ...); a name that is not one folder name is an error."""
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name) or len(name) > 128:
        raise RegistryError(f"invalid model name {str(name)[:80]!r}: letters, digits, '_', '.', '-' only",
                            path=str(registry), field="name", value=name)
    d = Path(registry) / name
    if not d.is_dir():
        return []
    vs = [p.name for p in d.iterdir() if p.is_dir() and _VERSION_RE.match(p.name)]
    return sorted(vs, key=lambda v: int(_VERSION_RE.match(v).group(1)))


def list_models(registry: str | Path) -> dict[str, list[str]]:
    """Every model name in the registry with its versions."""
    r = Path(registry)
    if not r.is_dir():
        return {}
    names = [p.name for p in sorted(r.iterdir()) if p.is_dir() and _NAME_RE.fullmatch(p.name)]  # skips .jobs etc.
    return {n: list_versions(r, n) for n in names if list_versions(r, n)}


def publish(run_dir: str | Path, registry: str | Path, name: str, card_notes: str = "") -> ModelVersion:
    """Copy a train/cv output folder into a new immutable version `vN+1` of `name`."""
    run = Path(run_dir)
    if not _NAME_RE.match(name):
        raise RegistryError(f"invalid model name {name!r}: letters, digits, '.', '_' and '-' only", field="name", value=name)
    if not run.is_dir():
        raise RegistryError("run folder not found", path=str(run))
    missing = [f for f in REQUIRED_RUN_FILES if not (run / f).is_file()]
    if missing:
        raise RegistryError(f"not a raypipe run folder: missing {', '.join(missing)}", path=str(run))
    from raypipe.artifact import ArtifactError, read_artifact

    try:
        meta = read_artifact(str(run)).as_dict()
    except ArtifactError as exc:
        raise RegistryError(exc.reason, path=exc.path, field=exc.field) from exc
    base = Path(registry) / name
    base.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".publish-", dir=base))
    try:
        for f in REQUIRED_RUN_FILES + OPTIONAL_RUN_FILES:
            if (run / f).is_file():
                shutil.copy2(run / f, tmp / f)
        if not (tmp / "metrics.json").exists():
            (tmp / "metrics.json").write_text("{}\n")
        if not (tmp / "preprocess.yaml").exists():
            cfg = yaml.safe_load((tmp / "config.yaml").read_text()) or {}
            (tmp / "preprocess.yaml").write_text(yaml.safe_dump(cfg.get("preprocess", {}), sort_keys=False))
        (tmp / "card.md").write_text(_model_card(name, meta, tmp, run, card_notes))
        sums = {f.name: _sha256(f) for f in sorted(tmp.iterdir()) if f.is_file()}
        (tmp / "checksums.json").write_text(json.dumps(sums, indent=2) + "\n")
        for f in tmp.iterdir():
            f.chmod(stat.S_IRUSR | stat.S_IRGRP | stat.S_IROTH)
        while True:  # claim the next version number atomically (rename fails if it exists)
            n = len(list_versions(registry, name)) + 1
            target = base / f"v{n}"
            try:
                os.rename(tmp, target)
                break
            except OSError:
                if not target.exists():
                    raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return load_version(registry, name, f"v{n}")


def _fmt(x: Any) -> str:
    """A metric for the model card: 3 decimals, "n/a" when undefined (null/NaN in metrics.json)."""
    return f"{x:.3f}" if isinstance(x, (int, float)) and x == x else "n/a"


def _model_card(name: str, meta: dict, folder: Path, run: Path, notes: str) -> str:
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


def load_version(registry: str | Path, name: str, version: str = "latest", verify: bool = True) -> ModelVersion:
    """Open a published version, verifying checksums so corruption is an error, not a wrong answer."""
    v = resolve_version(registry, name, version)
    d = Path(registry) / name / v
    sums_path = d / "checksums.json"
    if not sums_path.is_file():
        raise RegistryError("corrupt model version: checksums.json missing", path=str(d))
    sums = json.loads(sums_path.read_text())
    if verify:
        for f, digest in sums.items():
            fp = d / f
            if not fp.is_file():
                raise RegistryError(f"corrupt model version: {f} missing", path=str(d))
            if _sha256(fp) != digest:
                raise RegistryError(f"corrupt model version: checksum mismatch for {f}", path=str(fp))
    try:
        return ModelVersion(
            name=name, version=v, path=d,
            meta=json.loads((d / "model_meta.json").read_text()),
            metrics=json.loads((d / "metrics.json").read_text() or "{}"),
            config=yaml.safe_load((d / "config.yaml").read_text()) or {},
            preprocess=yaml.safe_load((d / "preprocess.yaml").read_text()) or {},
        )
    except (json.JSONDecodeError, yaml.YAMLError) as e:
        raise RegistryError(f"corrupt model version: {e}", path=str(d)) from e
