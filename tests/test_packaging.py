"""pyproject.toml, constraints.txt, the Makefile and the licence agree; every declared dependency is used."""
from __future__ import annotations

import ast
import importlib.metadata as md
import re
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
# Declared but never imported by raypipe itself, each for a reason:
USED_INDIRECTLY = {
    "optuna": "ray.tune.search.optuna.OptunaSearch imports it",
    "python-multipart": "FastAPI needs it to parse multipart uploads",
    "pylibjpeg": "pydicom's pixel-data plugin interface",
    "pylibjpeg-libjpeg": "pydicom decodes JPEG-lossless through it",
    "pylibjpeg-openjpeg": "pydicom decodes JPEG 2000 through it",
    "accelerate": "the LDM trainer's use (issue on fidelity); diffusers uses it when installed",
}


def _project() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def _constraints() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            name, version = line.split("==")
            pins[canonicalize_name(name)] = version
    return pins


# Pinned exactly everywhere: the CUDA wheels of torch on local disk; a range could pull gigabytes (README).
EXACT = {"torch", "torchvision"}


def test_dependencies_are_ranges_pinned_exactly_in_constraints() -> None:
    pins = _constraints()
    reqs = [Requirement(r) for r in _project()["dependencies"] + _project()["optional-dependencies"]["test"]]
    for req in reqs:
        specs = {s.operator for s in req.specifier}
        name = canonicalize_name(req.name)
        if name in EXACT:
            assert specs == {"=="} and req.specifier.contains(pins[name]), f"{req}: pinned exactly like constraints"
            continue
        assert "==" not in specs and ">=" in specs, f"{req}: a range with a tested lower bound, not a pin"
        name = canonicalize_name(req.name)
        assert name in pins, f"{req.name} missing from constraints.txt"
        assert req.specifier.contains(pins[name]), f"constraints.txt {req.name}=={pins[name]} outside {req}"
        lower = Version(next(s.version for s in req.specifier if s.operator == ">="))
        tested = Version(pins[name]).release[: len(lower.release)]
        assert tested == lower.release, f"{req}: lower bound is not the tested version {pins[name]}"
    assert "raypipe" not in pins
    make = (ROOT / "Makefile").read_text()
    torch = re.search(r"TORCH\s*:=\s*torch==(\S+) torchvision==(\S+)", make)
    assert torch and (pins["torch"], pins["torchvision"]) == torch.groups()
    assert "-c constraints.txt" in make


def test_every_declared_dependency_is_imported_or_explained() -> None:
    imported: set[str] = set()
    for path in (ROOT / "raypipe").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                imported |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                imported.add(node.module.split(".")[0])
    dists_of = md.packages_distributions()
    used = {canonicalize_name(d) for mod in imported for d in dists_of.get(mod, [])}
    for r in _project()["dependencies"]:
        name = canonicalize_name(Requirement(r).name)
        assert name in used or name in USED_INDIRECTLY, f"{name} is declared but raypipe never imports it"


def test_licence_matches_gpl_runtime_imports() -> None:
    project = _project()
    assert project["license"] == "GPL-3.0-or-later"
    assert "GNU GENERAL PUBLIC LICENSE" in (ROOT / "LICENSE").read_text()[:200]
    assert "Version 3" in (ROOT / "LICENSE").read_text()[:200]
