"""`raypipe demo`: the whole pipeline on a small synthetic cohort (and the real example CT when present).

Each step is a small function that prints what it did and where its outputs are; the demo stops at the
first failure with that step's name.
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Callable

log = logging.getLogger(__name__)

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
REAL_CT = SHARED_DATA / "ct" / "totalseg_example" / "example_ct.nii.gz"
REAL_CT_MASKS = SHARED_DATA / "ct" / "totalseg_example" / "example_seg"


def _step(name: str, fn: Callable[[], str]) -> None:
    t0 = time.perf_counter()
    print(f"\n== {name}", flush=True)
    msg = fn()
    print(f"   {msg}  [{time.perf_counter() - t0:.1f} s]", flush=True)


def run_demo(out: str | Path = "demo_out", patients: int = 40, seed: int = 0) -> int:
    """Run every demo step into `out` and print where the outputs are."""
    from raypipe.data.synth import synth_cohort
    from raypipe.io.manifest import load_manifest, validate_manifest
    from raypipe.ray_utils import init_ray

    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    cohort = out / "cohort"
    state: dict = {}

    def synth() -> str:
        synth_cohort("both", cohort, patients=patients, seed=seed, overwrite=True)
        return f"cohort of {patients} patients (CT series + radiographs): {cohort / 'manifest.csv'}"

    def validate() -> str:
        rep = validate_manifest(cohort / "manifest.csv")
        print("   " + rep.summary().replace("\n", "\n   "))
        if not rep.ok:
            raise SystemExit("demo: synthetic manifest failed validation")
        state["manifest"] = load_manifest(cohort / "manifest.csv")
        return "manifest valid"

    def inspect_real() -> str:
        if not REAL_CT.exists():
            return f"skipped: {SHARED_DATA} not found (the real example CT lives there)"
        from raypipe.io.inspect import format_inspection, inspect_path

        info = inspect_path(REAL_CT, masks=REAL_CT_MASKS)
        print("   " + format_inspection(info).replace("\n", "\n   "))
        return "real CT inspected"

    def ray_pass() -> str:
        init_ray()
        from raypipe.data.stats import study_intensity_stats

        stats = study_intensity_stats(state["manifest"])
        path = out / "study_stats.csv"
        stats.to_csv(path, index=False)
        return f"Ray Data read {len(stats)} studies; per-study intensity stats: {path}"

    steps: list[tuple[str, Callable[[], str]]] = [
        ("synthesise cohort", synth),
        ("validate manifest", validate),
        ("inspect the real example CT", inspect_real),
        ("Ray Data pass over the cohort", ray_pass),
    ]
    t0 = time.perf_counter()
    for name, fn in steps:
        _step(name, fn)
    print(f"\ndemo finished in {time.perf_counter() - t0:.0f} s; outputs under {out}")
    (out / "demo_summary.json").write_text(json.dumps({"out": str(out), "steps": [n for n, _ in steps]}, indent=2))
    return 0
