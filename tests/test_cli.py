"""The `raypipe` command seen from outside: a real subprocess, real files, exit codes and JSON."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

RAYPIPE = [sys.executable, "-m", "raypipe.cli"]


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*RAYPIPE, *args], capture_output=True, text=True, timeout=300)


def test_inspect_json_real_ct_with_masks(shared_data: Path) -> None:
    ex = shared_data / "ct" / "totalseg_example"
    r = _run("inspect", str(ex / "example_ct.nii.gz"), "--masks", str(ex / "example_seg"), "--json")
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["kind"] == "ct" and info["orientation"] == "RAS"
    assert info["spacing"] == pytest.approx([3.0, 3.0, 3.0])
    assert info["intensity"]["min"] == pytest.approx(-1207) and info["intensity"]["max"] == pytest.approx(3382)
    bodies = [info["masks"][f"vertebrae_{lv}"]["mean"] for lv in ("T12", "L1", "L2", "L3", "L4", "L5")]
    assert min(bodies) > info["masks"]["autochthon_left"]["mean"] + 100  # bone well above muscle
    assert any("vertebrae_T12" in w and "superior" in w for w in info["qc_warnings"])


def test_inspect_radiograph_and_bad_path(shared_data: Path, tmp_path: Path) -> None:
    r = _run("inspect", str(shared_data / "xray" / "fo_dicom" / "CR-MONO1-10-chest"), "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["kind"] == "radiograph"
    bad = tmp_path / "broken.dcm"
    bad.write_bytes((shared_data / "xray" / "pydicom_data" / "RG3_J2KR.dcm").read_bytes()[:5000])
    r = _run("inspect", str(bad))
    assert r.returncode == 1 and "broken.dcm" in r.stderr and "Traceback" not in r.stderr


def test_unknown_subcommand_and_help() -> None:
    assert _run("--help").returncode == 0
    assert _run("frobnicate").returncode != 0
