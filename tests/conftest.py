"""Shared pytest fixtures: the real imaging data beside the clone, copies of it in tmp_path, one local Ray."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

SHARED_DATA = Path(os.environ.get("RAYPIPE_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """`../shared/data` (real public CT, masks and radiographs); tests that need it skip without it."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real imaging data not found at {SHARED_DATA} (set RAYPIPE_SHARED_DATA or place ../shared/data)")
    return SHARED_DATA


@pytest.fixture
def copy_shared(shared_data: Path, tmp_path: Path) -> Callable[..., Path]:
    """Copy a file or folder of the shared data into tmp_path (tests may then modify the copy)."""

    def _copy(relpath: str, name: str | None = None) -> Path:
        src = shared_data / relpath
        dst = tmp_path / (name or src.name)
        if src.is_dir():
            shutil.copytree(src, dst)
        else:
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst)
        return dst

    return _copy


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray (raypipe.ray_utils.init_ray) shared by every test that needs Ray; shut down at the end."""
    from raypipe.ray_utils import init_ray, shutdown_ray

    init_ray()
    yield
    shutdown_ray()
