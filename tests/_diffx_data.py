"""Shared helpers for the Diff-X tests: one small synthetic X-ray cohort per session, tiny model folders."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

COHORT_PATIENTS = 16


def synthetic_cohort(base: Path, patients: int = COHORT_PATIENTS, seed: int = 7) -> Path:
    """Manifest of a synthetic lateral X-ray cohort, built once per pytest session under `base`."""
    from raypipe.data.synth import synth_cohort

    out = base / f"diffx_xray_{patients}_{seed}"
    manifest = out / "manifest.csv"
    if not manifest.exists():
        synth_cohort("xray", out, patients=patients, seed=seed)
    return manifest


def ldm_images(manifest: Path, size: int = 64) -> tuple[torch.Tensor, list[str], list[dict]]:
    """All cohort radiographs as LDM inputs (N, 1, size, size) with their baseline prompts and rows."""
    import pandas as pd

    from raypipe.io.radiograph import read_radiograph
    from raypipe.preprocess.pvf import ldm_input
    from raypipe.train.ldm import study_prompt

    rows = pd.read_csv(manifest).to_dict("records")
    imgs = np.stack([ldm_input(read_radiograph(manifest.parent / r["image_path"]).pixels, size) for r in rows])
    return torch.from_numpy(imgs), [study_prompt(r, False) for r in rows], rows


def save_diffx_dir(model: torch.nn.Module, out: Path, sampler: dict | None = None) -> Path:
    """A model folder as `raypipe train ldm` writes it (flat state_dict + model_meta.json + config.yaml)."""
    from raypipe.train.ldm import LDMTrainConfig, write_model_dir

    cfg = LDMTrainConfig(model="diffx_tiny", pretrained_sd="none", use_ema=False, sampler=sampler or {"steps": 4, "eta": 0.5})
    payload = {"model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
               "state": {"epoch": 0, "history": [], "extra": {}}}
    out.mkdir(parents=True, exist_ok=True)
    write_model_dir(cfg, payload, str(out))
    return out


def save_pvf_dir(out: Path, seed: int = 0, size: tuple[int, int] = (128, 64)) -> Path:
    """An untrained tiny pVF classifier folder (scores vary with the image, which is all plumbing needs)."""
    from raypipe.models.registry import build_model

    torch.manual_seed(seed)
    model = build_model("pvf_tiny", in_chans=1)
    out.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), out / "model.pt")
    meta = {"builder": "pvf_tiny", "kwargs": {"in_chans": 1}, "task": "pvf",
            "preprocess": {"size": list(size), "clip_limit": 0.01, "tiles": [4, 4], "mean": 0.5, "std": 0.25}}
    (out / "model_meta.json").write_text(json.dumps(meta))
    return out
