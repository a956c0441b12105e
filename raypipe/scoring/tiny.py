"""Tiny randomly initialised models published to a registry, for tests, benchmarks and the demo.

They have the trainers' run-folder layout (model.pt + model_meta.json + config.yaml + preprocess.yaml)
and go through `raypipe.registry.publish`, so serving is exercised end to end without any training.
Scores from these models mean nothing; only shapes, plumbing and timings do.
"""
from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from raypipe.registry import ModelVersion, publish

log = logging.getLogger(__name__)

XRAY_CLINICAL = ("age", "sex", "bmi", "glucocorticoid", "secondary_osteoporosis")
CT_CLINICAL = ("age", "sex", "bmi")


def write_run(run: Path, builder: str, kwargs: dict[str, Any], meta: dict[str, Any] | None = None,
              config: dict[str, Any] | None = None, seed: int = 0) -> Path:
    """A run folder with random-init weights of a registry builder (the layout the trainers write)."""
    import torch

    from raypipe.models.registry import build_model

    torch.manual_seed(seed)
    model = build_model(builder, **kwargs).eval()
    run.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), run / "model.pt")
    full_meta = {"builder": builder, "kwargs": kwargs, **(meta or {})}
    (run / "model_meta.json").write_text(json.dumps(full_meta, indent=2))
    (run / "config.yaml").write_text(yaml.safe_dump(config or {"model": builder}, sort_keys=False))
    (run / "metrics.json").write_text(json.dumps({"models": {}}))
    return run


def _clinical_block(columns: tuple[str, ...]) -> dict[str, list]:
    """Plausible training means/SDs so standardisation is exercised."""
    stats = {"age": (70.0, 9.0), "sex": (0.6, 0.5), "bmi": (26.0, 4.0), "glucocorticoid": (0.1, 0.3),
             "secondary_osteoporosis": (0.1, 0.3)}
    return {"columns": list(columns), "mean": [stats[c][0] for c in columns], "sd": [stats[c][1] for c in columns]}


def tiny_baseline(seed: int = 0, n: int = 200) -> dict[str, Any]:
    """A Breslow baseline fitted (`raypipe.metrics.breslow_baseline`) on a seeded synthetic cohort, as JSON."""
    from raypipe.metrics.survival import breslow_baseline

    rng = np.random.default_rng(seed)
    r = rng.normal(size=n)
    t = rng.exponential(3650.0 / np.exp(0.5 * r))
    c = rng.uniform(365, 4000, size=n)
    b = breslow_baseline(np.minimum(t, c), (t <= c).astype(int), r)
    return {"time": b.time.tolist(), "cumulative_hazard": b.cumulative_hazard.tolist(), "offset": b.offset,
            "time_unit": "days"}


def publish_tiny_models(registry: str | Path, which: tuple[str, ...] = ("ct", "xray", "pvf", "keypoints"),
                        workdir: str | Path | None = None) -> dict[str, ModelVersion]:
    """Publish tiny random models under the serving names (`ct`, `xray`, `pvf`, `keypoints`, `ldm`); returns the versions."""
    base = Path(workdir or tempfile.mkdtemp(prefix="raypipe-tiny-runs-"))
    out: dict[str, ModelVersion] = {}
    if "ct" in which:
        kw = {"in_chans": 1, "n_clinical": len(CT_CLINICAL), "dropout": 0.0}
        run = write_run(base / "ct", "cnn_rnn_tiny", kw,
                        {"task": "ct_fracture", "input": "bone_muscle", "n_slices": 14, "label": "fracture_5y",
                         "clinical": _clinical_block(CT_CLINICAL), "score_kind": "probability"},
                        {"model": "cnn_rnn_tiny", "input": "bone_muscle", "n_slices": 14})
        out["ct"] = publish(run, registry, "ct")
    if "xray" in which:
        kw = {"in_chans": 5, "n_clinical": len(XRAY_CLINICAL)}
        run = write_run(base / "xray", "deepsurv_tiny", kw,
                        {"task": "xray_survival", "clinical": _clinical_block(XRAY_CLINICAL),
                         "score_kind": "log_risk", "baseline_hazard": tiny_baseline()},
                        {"model": "deepsurv_tiny", "preprocess": {"variant": "patches_l1l5", "out_size": 64}})
        out["xray"] = publish(run, registry, "xray")
    if "pvf" in which:
        run = write_run(base / "pvf", "pvf_tiny", {"in_chans": 1}, {"task": "xray_pvf", "input_size": [128, 64]},
                        {"model": "pvf_tiny", "preprocess": {"size": [128, 64]}})
        out["pvf"] = publish(run, registry, "pvf")
    if "keypoints" in which:
        run = write_run(base / "keypoints", "keypoints_tiny", {"in_chans": 1},
                        {"task": "xray_keypoints", "input_size": 64}, {"model": "keypoints_tiny"})
        out["keypoints"] = publish(run, registry, "keypoints")
    if "ldm" in which:
        run = write_run(base / "ldm", "diffx_tiny", {}, {"task": "ldm", "sampler": {"steps": 2, "max_batch": 16}},
                        {"model": "diffx_tiny"})
        out["ldm"] = publish(run, registry, "ldm")
    log.info("published tiny models %s to %s", sorted(out), registry)
    return out
