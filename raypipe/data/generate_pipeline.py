"""Batch Diff-X generation over a cohort: Ray Data `map_batches` with one model replica per GPU (or CPU actor).

For every XR study of a manifest: future radiographs at the configured years (+ the last follow-up,
when `include_last_followup`) x seeds, BpVF/GpVF and the risk group (`raypipe.generate.generate_study`),
one ``generation.json`` per study under ``OUT/studies/<study_id>/``. Then:

- ``OUT/predictions.parquet`` in the prediction schema: model ``diffx``, score = patient GpVF
  (probability), plus ``bpvf``, ``gpvf_sd`` (uncertainty), ``group`` (LL/LH/HIGH), time/event, label
  and clinical columns, so ``raypipe evaluate`` reports it (risk groups come from ``group``);
- ``OUT/diffx_metrics.json``: the thesis's Table 4 and Figure 17-20 numbers: Cox hazard ratios of the
  groups (univariable; + age, sex, BMI; + FRAX MOF) with likelihood-ratio chi-square, the LR chi-square
  of the BpVF-only split (0.5) for comparison, time-dependent AUROC of GpVF at 1/5/10 years, group
  incidence, KM curves and the log-rank test by group; with ``image_quality``, MS-SSIM and PSNR of
  Diff-X's baseline reconstruction and of the single prompt LDM against the real baseline (mean, SD);
  and, for studies whose manifest row has a real follow-up radiograph (``followup_image_path`` taken
  ``followup_years`` after baseline), Bland-Altman agreement and Pearson correlation between pVF on the
  real follow-up and the mean GpVF generated for that year.
Every metric block records an ``error`` instead of failing when the cohort cannot support it (e.g.
one group only, no events).
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
from pydantic import Field

from raypipe import storage
from raypipe.config import StrictModel

log = logging.getLogger(__name__)

DAYS_PER_YEAR = 365.25
MODEL_NAME = "diffx"


class GenerateJobConfig(StrictModel):
    """Batch generation settings (thesis: 1, 5, 10 years + last follow-up, 10 seeds)."""

    years: list[float] = Field(default_factory=lambda: [1.0, 5.0, 10.0])
    include_last_followup: bool = Field(True, description="also the manifest's follow-up time (time_days)")
    seeds: int = Field(10, ge=1, description="seeds 0..n-1 per time point")
    steps: int | None = Field(None, ge=1, description="DDIM steps (None: the model's)")
    eta: float | None = Field(None, ge=0)
    low_threshold: float = Field(0.5, description="BpVF threshold (HIGH)")
    high_threshold: float = Field(0.6, description="GpVF threshold (LH)")
    write_images: bool = True
    bf16: bool = Field(True, description="bf16 autocast on GPUs")
    split: str | None = Field(None, description="only studies of this manifest split (None: all)")
    concurrency: int | None = Field(None, ge=1, description="replicas (None: one per GPU, else 1 on CPU)")
    clinical_prompts: bool = Field(False, description="add clinical attributes to the prompts (thesis: age, sex)")
    image_quality: bool = Field(False, description="MS-SSIM/PSNR of Diff-X vs single-LDM baseline reconstructions")
    n_boot: int = Field(200, ge=0)
    seed: int = 0


class DiffXGenerator:
    """Ray Data callable class: holds one Diff-X pipeline (+ pVF scorer) and generates per study."""

    def __init__(self, model_dir: str, pvf_dir: str | None, out_dir: str, config: dict[str, Any]) -> None:
        import torch

        from raypipe.generate import pipeline_from_dir
        from raypipe.scoring.pvf import load_pvf

        self.cfg = GenerateJobConfig.model_validate(config)
        device = "cuda" if torch.cuda.is_available() else "cpu"
        self.pipe = pipeline_from_dir(model_dir, device, self.cfg.bf16, steps=self.cfg.steps, eta=self.cfg.eta,
                                      low_threshold=self.cfg.low_threshold, high_threshold=self.cfg.high_threshold)
        self.pvf = load_pvf(pvf_dir, device) if pvf_dir else None
        self.out_dir = out_dir

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        from raypipe.generate import CLINICAL_PROMPT_KEYS, generate_study, reconstruction_quality
        from raypipe.io.radiograph import read_radiograph

        rows = []
        for r in batch.to_dict("records"):
            years = [float(y) for y in self.cfg.years]
            if self.cfg.include_last_followup and np.isfinite(float(r.get("time_days", np.nan))):
                last = round(float(r["time_days"]) / DAYS_PER_YEAR, 2)
                if last not in years:
                    years.append(last)
            followup = _followup(r)
            if followup is not None and followup[1] not in years:
                years.append(followup[1])
            clinical = {k: r.get(k) for k in CLINICAL_PROMPT_KEYS} if self.cfg.clinical_prompts else None
            pixels = read_radiograph(r["image_path"]).pixels
            seeds = list(range(self.cfg.seeds))
            rec = generate_study(self.pipe, pixels, float(r["age"]), str(r["sex"]), years, seeds,
                                 storage.join(self.out_dir, "studies", str(r["study_id"])), self.pvf, clinical,
                                 self.cfg.write_images)
            row = {"study_id": str(r["study_id"]), "bpvf": rec.get("bpvf"), "gpvf": rec.get("gpvf"),
                   "gpvf_sd": rec.get("uncertainty"), "gpvf_year": rec.get("gpvf_year"), "group": rec.get("group")}
            if followup is not None and self.pvf is not None:
                real = read_radiograph(followup[0]).pixels.astype(np.float32)
                row["followup_years"] = followup[1]
                row["pvf_followup_real"] = float(self.pvf([real])[0])
                row["pvf_followup_generated"] = rec["gpvf_by_year"][f"{followup[1]:g}"]["mean"]
            if self.cfg.image_quality:
                row.update({f"quality_{k}": v for k, v in reconstruction_quality(
                    self.pipe, pixels, float(r["age"]), str(r["sex"]), seeds, clinical).items()})
            rows.append(row)
        return pd.DataFrame(rows)


def _followup(row: dict[str, Any]) -> tuple[str, float] | None:
    """(real follow-up radiograph path, years after baseline) when the manifest row has both."""
    path, years = row.get("followup_image_path"), row.get("followup_years")
    if pd.isna(path) or pd.isna(years) or float(years) <= 0:
        return None
    return str(path), round(float(years), 2)


def generate_cohort(manifest: str, model_dir: str, out_dir: str, pvf_dir: str | None = None,
                    config: GenerateJobConfig | None = None) -> dict[str, Any]:
    """Generate for every XR study of `manifest`; write studies/, predictions.parquet and diffx_metrics.json."""
    import ray
    import ray.data

    from raypipe.io.manifest import load_manifest
    from raypipe.predictions import CLINICAL_COLUMNS, label_columns, write_predictions
    from raypipe.ray_utils import init_ray

    cfg = config or GenerateJobConfig()
    out = storage.absolute(out_dir)
    storage.makedirs(out)
    table = load_manifest(manifest)
    table = table[table["modality"] == "XR"]
    if cfg.split is not None and "split" in table.columns:
        table = table[table["split"].astype(str) == cfg.split]
    table = table.reset_index(drop=True)
    if table.empty:
        raise ValueError(f"{manifest}: no XR studies to generate for")
    cols = [c for c in ("study_id", "image_path", "age", "sex", "time_days", "bmi", "prevalent_fracture",
                        "glucocorticoid", "prior_fracture", "rheumatoid_arthritis", "secondary_osteoporosis",
                        "followup_image_path", "followup_years")
            if c in table.columns]
    init_ray()
    gpus = int(ray.cluster_resources().get("GPU", 0))
    concurrency = cfg.concurrency or (gpus if gpus else 1)
    resources = {"num_gpus": 1} if gpus else {"num_cpus": 1}
    ds = ray.data.from_pandas(table[cols]).map_batches(
        DiffXGenerator, fn_constructor_kwargs={"model_dir": storage.absolute(model_dir),
                                               "pvf_dir": storage.absolute(pvf_dir) if pvf_dir else None,
                                               "out_dir": out, "config": cfg.model_dump(mode="json")},
        batch_size=1, batch_format="pandas", concurrency=concurrency, **resources)
    scored = ds.to_pandas()
    log.info("generated for %d studies with %d replica(s) (%s)", len(scored), concurrency, "GPU" if gpus else "CPU")
    if pvf_dir is None:
        return {"studies": len(scored), "predictions": None, "metrics": None}

    base = table.assign(study_id=table["study_id"].astype(str)).merge(scored, on="study_id", validate="one_to_one")
    keep = ["patient_id", "study_id", *[c for c in ("time_days", "event") if c in base.columns],
            *label_columns(list(base.columns)), *[c for c in CLINICAL_COLUMNS if c in base.columns]]
    frame = base[list(dict.fromkeys(keep))].assign(
        split=base["split"].astype(str) if "split" in base.columns else "test", fold=-1, model=MODEL_NAME,
        score=base["gpvf"].astype(float), score_kind="probability", bpvf=base["bpvf"].astype(float),
        gpvf_sd=base["gpvf_sd"].astype(float), gpvf_year=base["gpvf_year"].astype(float), group=base["group"])
    extra = [c for c in scored.columns if c.startswith("quality_") or c.startswith("pvf_followup_")]
    frame = frame.assign(**{c: base[c].astype(float) for c in extra})
    pred_path = storage.join(out, "predictions.parquet")
    write_predictions(frame, pred_path, {"model": MODEL_NAME, "model_dir": storage.absolute(model_dir),
                                         "pvf_dir": storage.absolute(pvf_dir), **cfg.model_dump(mode="json")})
    metrics = diffx_metrics(frame, cfg)
    storage.atomic_write_json(storage.join(out, "diffx_metrics.json"), metrics)
    return {"studies": len(scored), "predictions": pred_path, "metrics": metrics}


# ---------------------------------------------------------------------------------------------- report
def _guard(fn: Any) -> dict[str, Any]:
    """Run one metric block; a cohort that cannot support it gets {"error": ...} instead of a crash."""
    try:
        return fn()
    except (ValueError, ArithmeticError, np.linalg.LinAlgError, KeyError, RuntimeError) as exc:
        return {"error": f"{type(exc).__name__}: {exc}"}


def _cox(df: pd.DataFrame, covariates: Sequence[str]) -> dict[str, Any]:
    """Cox model of the group indicators (LL reference) + `covariates`: HRs, CIs, p and LR chi-square."""
    from raypipe.metrics import cox_hazard_ratios

    data = pd.DataFrame({"time": df["time_days"].astype(float), "event": df["event"].astype(int)})
    for g in ("LH", "HIGH"):
        if (df["group"] == g).any():
            data[f"group={g}"] = (df["group"] == g).astype(float)
    for c in covariates:
        data[c] = (df[c].astype(str).str.upper().str[0] == "F").astype(float) if c == "sex" else df[c].astype(float)
    data = data.dropna()
    s = cox_hazard_ratios(data, "time", "event")
    return {"n": s.n, "events": s.n_events, "lr_chi2": s.lr_statistic, "lr_df": s.lr_df, "lr_p": s.lr_p_value,
            "concordance": s.concordance,
            "hazard_ratios": {k: {"hr": v.value, "ci_low": v.ci_low, "ci_high": v.ci_high, "p": v.p_value}
                              for k, v in s.ratios.items()}}


def diffx_metrics(frame: pd.DataFrame, cfg: GenerateJobConfig | None = None) -> dict[str, Any]:
    """Risk-group survival analysis of Diff-X predictions (thesis Results 4-5)."""
    from raypipe.metrics import cox_hazard_ratios, group_incidence, kaplan_meier, logrank_test, td_auroc

    cfg = cfg or GenerateJobConfig()
    df = frame.dropna(subset=["time_days", "event", "group"]).reset_index(drop=True)
    t, e = df["time_days"].to_numpy(float), df["event"].to_numpy(int)
    counts = df["group"].value_counts().to_dict()
    out: dict[str, Any] = {"n": int(len(df)), "events": int(e.sum()), "groups": {str(k): int(v) for k, v in counts.items()},
                           "thresholds": {"bpvf": cfg.low_threshold, "gpvf": cfg.high_threshold}}
    out["cox_univariable"] = _guard(lambda: _cox(df, []))
    out["cox_age_sex_bmi"] = _guard(lambda: _cox(df, [c for c in ("age", "sex", "bmi") if c in df.columns]))
    out["cox_frax_mof"] = _guard(lambda: _cox(df, ["frax_mof"]) if "frax_mof" in df.columns
                                 else {"error": "no frax_mof column"})

    def bpvf_only() -> dict[str, Any]:
        data = pd.DataFrame({"time": t, "event": e, "bpvf_high": (df["bpvf"] >= cfg.low_threshold).astype(float)})
        s = cox_hazard_ratios(data, "time", "event")
        return {"lr_chi2": s.lr_statistic, "lr_df": s.lr_df, "lr_p": s.lr_p_value}

    out["cox_bpvf_threshold_only"] = _guard(bpvf_only)

    def td() -> dict[str, Any]:
        horizons = [y * DAYS_PER_YEAR for y in (1, 5, 10)]
        usable = [h for h in horizons if t.min() < h < t.max() and (t[e == 1] <= h).any()]
        if not usable:
            raise ValueError("no evaluable horizon (1/5/10 years) within follow-up")
        r = td_auroc(t, e, t, e, df["score"].to_numpy(float), usable)
        return {"times_days": [float(x) for x in r.times], "values": [float(v) for v in r.values], "mean": r.mean,
                "note": "IPCW weights from the same cohort (no separate training set)"}

    out["td_auroc_gpvf"] = _guard(td)
    out["incidence_10y"] = _guard(lambda: {g: vars(v) for g, v in group_incidence(
        df["group"].to_numpy(str), t, e, 10 * DAYS_PER_YEAR).items()})
    out["kaplan_meier"] = _guard(lambda: {str(g): {"time": kaplan_meier(t[m], e[m]).time.tolist(),
                                                   "survival": kaplan_meier(t[m], e[m]).survival.tolist()}
                                          for g in df["group"].unique() for m in [(df["group"] == g).to_numpy()]})
    out["logrank"] = _guard(lambda: vars(logrank_test(t, e, df["group"].to_numpy(str))))
    quality = image_quality_summary(frame)
    if quality:
        out["image_quality"] = quality
    if "pvf_followup_real" in frame.columns:
        out["followup_agreement"] = _guard(lambda: followup_agreement(frame))
    return out


def image_quality_summary(frame: pd.DataFrame) -> dict[str, Any]:
    """Mean and SD over studies of each `quality_*` column (Diff-X vs single-LDM MS-SSIM and PSNR)."""
    out: dict[str, Any] = {}
    for c in sorted(c for c in frame.columns if c.startswith("quality_")):
        v = frame[c].to_numpy(float)
        v = v[np.isfinite(v)]
        if v.size:
            out[c.removeprefix("quality_")] = {"mean": float(v.mean()), "sd": float(v.std(ddof=1)) if v.size > 1 else 0.0,
                                               "n": int(v.size)}
    return out


def followup_agreement(frame: pd.DataFrame) -> dict[str, Any]:
    """pVF on real follow-up radiographs vs mean GpVF generated for the same year: Bland-Altman + Pearson r."""
    from raypipe.metrics import bland_altman, correlation_ci

    pair = frame[["pvf_followup_real", "pvf_followup_generated"]].astype(float).dropna()
    real, gen = pair["pvf_followup_real"].to_numpy(), pair["pvf_followup_generated"].to_numpy()
    out: dict[str, Any] = {"n": int(len(pair)), "bland_altman": vars(bland_altman(gen, real))}
    out["correlation"] = _guard(lambda: vars(correlation_ci(gen, real)))
    return out


def generate_cohort_cli(manifest: str, model_dir: str, out_dir: str, pvf_dir: str | None, config_path: str | None
                        ) -> int:
    """`jobs/generate.py`: init Ray, run `generate_cohort`, log where things went."""
    from raypipe.config import load_config
    from raypipe.ray_utils import init_ray

    cfg = load_config(GenerateJobConfig, config_path)
    init_ray()
    res = generate_cohort(manifest, model_dir, out_dir, pvf_dir, cfg)
    log.info("%d studies; predictions %s", res["studies"], res["predictions"])
    return 0
