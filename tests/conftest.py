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


@pytest.fixture(scope="session")
def xray_cohort(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(manifest, shards) of one 500-patient synthetic X-ray cohort, L1-L5 patches at 64 x 64 (tiny configs).

    Shared by the X-ray and pVF training tests: 100 test patients (about 20 events, 20 prevalent
    fractures), enough for stable held-out C-index and AUROC bars.
    """
    from raypipe.data.synth import synth_cohort
    from raypipe.data.xray_pipeline import preprocess_xray
    from raypipe.preprocess.config import XrayPreprocessConfig

    root = tmp_path_factory.mktemp("xray_cohort")
    synth_cohort("xray", root / "cohort", patients=500, seed=0)
    manifest, shards = root / "cohort" / "manifest.csv", root / "shards"
    preprocess_xray(manifest, shards, XrayPreprocessConfig(out_size=64, shard_size=50, qc_pictures=False),
                    use_ray=False)  # QC pictures are tested in test_qc_pictures; 500 of them would cost minutes
    return manifest, shards
