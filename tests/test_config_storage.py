"""Config loading errors name file/key/type; atomic writes never leave partial files."""
from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import Field

from raypipe.config import ConfigError, StrictModel, config_hash, load_config
from raypipe.storage import atomic_write_bytes, atomic_write_json, exists, filesystem, join


class _Opt(StrictModel):
    lr: float = 1e-5
    batch_size: int = Field(128, gt=0)


class _Cfg(StrictModel):
    name: str = "x"
    optim: _Opt = _Opt()


def test_defaults_and_overrides(tmp_path: Path) -> None:
    assert load_config(_Cfg).optim.batch_size == 128
    p = tmp_path / "c.yaml"
    p.write_text("optim:\n  lr: 0.001\n")
    cfg = load_config(_Cfg, p, overrides={"optim.batch_size": 4})
    assert cfg.optim.lr == 0.001 and cfg.optim.batch_size == 4
    assert config_hash(cfg) == config_hash(cfg.model_dump()) and len(config_hash(cfg)) == 16


@pytest.mark.parametrize(
    "text, expected",
    [
        ("optim:\n  lr: fast\n", "optim.lr"),
        ("optim:\n  batch_size: 0\n", "optim.batch_size"),
        ("optim:\n  lrr: 0.1\n", "optim.lrr: unknown key"),
        ("- a\n- b\n", "expected a mapping"),
        ("optim: [\n", "invalid YAML"),
    ],
)
def test_bad_config_names_file_and_key(tmp_path: Path, text: str, expected: str) -> None:
    p = tmp_path / "bad.yaml"
    p.write_text(text)
    with pytest.raises(ConfigError) as e:
        load_config(_Cfg, p)
    assert expected in str(e.value) and str(p) in str(e.value)


def test_missing_config_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_config(_Cfg, tmp_path / "none.yaml")


def test_atomic_write_keeps_old_file_on_failure(tmp_path: Path) -> None:
    target = tmp_path / "a" / "m.json"
    atomic_write_json(target, {"v": 1})
    with pytest.raises(TypeError):
        atomic_write_json(target, {"v": object()})
    assert target.read_text().strip().startswith("{") and '"v": 1' in target.read_text()
    assert [f.name for f in target.parent.iterdir()] == ["m.json"]


def test_uri_paths_go_through_pyarrow(tmp_path: Path) -> None:
    uri = f"file://{tmp_path}/x/y.bin"
    atomic_write_bytes(uri, b"abc")
    assert (tmp_path / "x" / "y.bin").read_bytes() == b"abc"
    assert exists(uri) and join("s3://bucket/runs", "a", "b") == "s3://bucket/runs/a/b"
    fs, p = filesystem(str(tmp_path))
    assert p == str(tmp_path)
