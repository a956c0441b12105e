"""Batch Diff-X generation over a cohort: Ray Data `map_batches` with `concurrency` model replicas.

Each replica asks for `gpus_per_replica` GPUs when `use_gpu` (the paper config; `--gpus N` / `--cpu` override),
else for one CPU: requested, never discovered, so an autoscaling cluster adds GPU nodes for them.

For every XR study of a manifest: future radiographs at the configured years (+ the last follow-up,
when `include_last_followup`) x seeds, BpVF/GpVF and the risk group (`raypipe.generate.generate_study`),
one ``generation.json`` per study under ``OUT/studies/<study_id>/``. Then:

- ``OUT/studies.parquet``: one row per baseline image (BpVF, GpVF of that image = seed mean of its 10-year
  images by default, ``gpvf_rule``);
- ``OUT/predictions.parquet`` in the prediction schema, **one row per participant** (thesis Methods 7:
  "future images generated from the same baseline image were averaged, and the maximum value within the
  same participant was then selected"; `aggregate_participants`): model ``diffx``, score = participant GpVF
  (probability), plus ``bpvf`` (participant maximum), ``gpvf_sd`` (uncertainty of the image that gave the
  GpVF), ``group`` (LL/LH/HIGH from the participant scores), ``n_images``, time/event, label and clinical
  columns of the participant's earliest baseline (longest follow-up), so ``raypipe evaluate`` reports it and
  no participant enters a survival analysis twice;
- ``OUT/diffx_metrics.json``: the thesis's Table 4 and Figure 17-20 numbers: Cox hazard ratios of the
  groups (univariable; + age, sex, BMI; + FRAX MOF) with likelihood-ratio chi-square, the LR chi-square
  of the BpVF-only split (0.5) for comparison, time-dependent AUROC of GpVF at 1/5/10 years, group
  incidence, KM curves and the log-rank test by group (global and pairwise), the thesis's Tables 4 and 5
  (``raypipe.metrics.diffx``: FRAX per SD, BpVF/GpVF per 0.1 point, C and LR chi-square) and the
  cross-validated CoxPH fracture-score models (td-AUROC at 1/5/10 years and mean); with ``image_quality``, MS-SSIM and PSNR of
  Diff-X's baseline reconstruction and of the single prompt LDM against the real baseline (mean, SD);
  and, for studies whose manifest row has a real follow-up radiograph (``followup_image_path`` taken
  ``followup_years`` after baseline), Bland-Altman agreement and Pearson correlation between pVF on the
  real follow-up and the mean GpVF generated for that year.
Every metric block records an ``error`` instead of failing when the cohort cannot support it (e.g.
one group only, no events).
"""
from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
from typing import Literal

from pydantic import Field, model_validator

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
    gpvf_rule: Literal["horizon_mean", "max_over_years"] = Field(
        "horizon_mean", description="horizon_mean: GpVF = seed mean at gpvf_horizon_years (thesis); max_over_years: "
                                    "the maximum over years of the seed means (option)")
    gpvf_horizon_years: float = Field(10.0, gt=0, description="the GpVF year (thesis: 10, as FRAX); must be in years")
    write_images: bool = True
    bf16: bool = Field(True, description="bf16 autocast on GPUs (fp32 on CPU either way); false: fp32 on GPUs too")
    split: str | None = Field(None, description="only studies of this manifest split (None: all)")
    use_gpu: bool = Field(False, description="replicas on GPUs (requested, never discovered; --gpus N / --cpu override)")
    gpus_per_replica: float = Field(1.0, gt=0, description="GPUs per replica when use_gpu")
    concurrency: int = Field(1, ge=1, description="model replicas at once (each asks for its GPU or one CPU)")
    clinical_prompts: bool | None = Field(
        None, description="None: the prompts the model was trained with (model_meta.json); true/false must match it")
    image_quality: bool = Field(False, description="MS-SSIM/PSNR of Diff-X vs single-LDM baseline reconstructions")
    n_boot: int = Field(200, ge=0)
    seed: int = 0

    @model_validator(mode="after")
    def _horizon_generated(self) -> "GenerateJobConfig":
        if self.gpvf_rule == "horizon_mean" and not any(abs(y - self.gpvf_horizon_years) < 1e-9 for y in self.years):
            raise ValueError(f"gpvf_rule horizon_mean scores the {self.gpvf_horizon_years:g}-year image, but years "
                             f"{self.years} do not include it")
        return self


class DiffXGenerator:
    """Ray Data callable class: holds one Diff-X pipeline (+ pVF scorer) and generates per study."""

    def __init__(self, model_dir: str, pvf_dir: str | None, out_dir: str, config: dict[str, Any]) -> None:
        import torch

        from raypipe.generate import pipeline_from_dir
        from raypipe.scoring.pvf import load_pvf

        self.cfg = GenerateJobConfig.model_validate(config)
        if self.cfg.use_gpu and not torch.cuda.is_available():
            raise RuntimeError("use_gpu is true but this generation replica sees no CUDA device (Ray gave it a GPU "
                               "torch cannot use: check the node's CUDA driver)")
        device = "cuda" if self.cfg.use_gpu else "cpu"
        self.pipe = pipeline_from_dir(model_dir, device, self.cfg.bf16, steps=self.cfg.steps, eta=self.cfg.eta,
                                      low_threshold=self.cfg.low_threshold, high_threshold=self.cfg.high_threshold,
                                      gpvf_rule=self.cfg.gpvf_rule, gpvf_horizon_years=self.cfg.gpvf_horizon_years)
        wanted = self.cfg.clinical_prompts
        if wanted is not None and wanted != self.pipe.clinical_prompts:
            raise ValueError(f"clinical_prompts: {wanted} but the model {model_dir} was trained with clinical_prompts: "
                             f"{self.pipe.clinical_prompts}; the generation prompt must be the training prompt")
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
            clinical = {k: r.get(k) for k in CLINICAL_PROMPT_KEYS} if self.pipe.clinical_prompts else None
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


def _collect_with_progress(ds: Any, total: int) -> pd.DataFrame:
    """Results of the generation dataset, logging one line per finished study with elapsed time and ETA."""
    t0 = time.perf_counter()
    parts: list[pd.DataFrame] = []
    done = 0
    for batch in ds.iter_batches(batch_size=1, batch_format="pandas"):
        parts.append(batch)
        done += len(batch)
        elapsed = time.perf_counter() - t0
        eta = elapsed / done * (total - done)
        log.info("Diff-X: %d/%d studies done (group %s), %s elapsed, about %s left", done, total,
                 ",".join(str(g) for g in batch.get("group", pd.Series(["-"])).tolist()), _duration(elapsed),
                 _duration(eta))
    return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame()


def _duration(seconds: float) -> str:
    """`1h02m`, `3m05s` or `12s`."""
    s = int(round(seconds))
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


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
    from raypipe.ray_utils import describe_devices, init_ray, require_gpus

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
    device_line = describe_devices(cfg.concurrency, cfg.use_gpu, cfg.gpus_per_replica, what="Diff-X generation",
                                   unit="replica")
    log.info("%s", device_line)
    init_ray()
    require_gpus(cfg.gpus_per_replica if cfg.use_gpu else 0, "raypipe generate-batch")
    concurrency = cfg.concurrency
    resources = {"num_gpus": cfg.gpus_per_replica} if cfg.use_gpu else {"num_cpus": 1}
    ds = ray.data.from_pandas(table[cols]).map_batches(
        DiffXGenerator, fn_constructor_kwargs={"model_dir": storage.absolute(model_dir),
                                               "pvf_dir": storage.absolute(pvf_dir) if pvf_dir else None,
                                               "out_dir": out, "config": cfg.model_dump(mode="json")},
        batch_size=1, batch_format="pandas", concurrency=concurrency, **resources)
    scored = _collect_with_progress(ds, len(table))
    log.info("generated for %d studies (%s)", len(scored), device_line)
    if pvf_dir is None:
        return {"studies": len(scored), "predictions": None, "metrics": None}

    base = table.assign(study_id=table["study_id"].astype(str)).merge(scored, on="study_id", validate="one_to_one")
    keep = ["patient_id", "study_id", *[c for c in ("time_days", "event") if c in base.columns],
            *label_columns(list(base.columns)), *[c for c in CLINICAL_COLUMNS if c in base.columns]]
    frame = base[list(dict.fromkeys(keep))].assign(
        split=base["split"].astype(str) if "split" in base.columns else "test", fold=-1, model=MODEL_NAME,
        score=base["gpvf"].astype(float), score_kind="probability", bpvf=base["bpvf"].astype(float),
        gpvf=base["gpvf"].astype(float),
        gpvf_sd=base["gpvf_sd"].astype(float), gpvf_year=base["gpvf_year"].astype(float), group=base["group"])
    extra = [c for c in scored.columns if c.startswith("quality_") or c.startswith("pvf_followup_")]
    studies = frame.assign(**{c: base[c].astype(float) for c in extra})
    storage.atomic_write_parquet(studies, storage.join(out, "studies.parquet"))
    frame = aggregate_participants(studies, cfg.low_threshold, cfg.high_threshold)
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
        if c == "frax_mof":  # thesis Table 4: FRAX per 1 SD increase
            data[c] = data[c] / float(df[c].astype(float).std(ddof=1))
    data = data.dropna()
    s = cox_hazard_ratios(data, "time", "event")
    return {"n": s.n, "events": s.n_events, "lr_chi2": s.lr_statistic, "lr_df": s.lr_df, "lr_p": s.lr_p_value,
            "concordance": s.concordance,
            "hazard_ratios": {k: {"hr": v.value, "ci_low": v.ci_low, "ci_high": v.ci_high, "p": v.p_value}
                              for k, v in s.ratios.items()}}


def aggregate_participants(studies: pd.DataFrame, low: float = 0.5, high: float = 0.6) -> pd.DataFrame:
    """One row per participant: BpVF and GpVF = maxima over the participant's baseline images, group re-derived.

    Thesis Methods 7: per baseline image the GpVF is its seed mean; "the maximum value within the same
    participant was then selected". The survival columns (time, event) and clinical values are those of the
    participant's earliest baseline (longest ``time_days``); ``gpvf_sd``/``gpvf_year`` come from the image that
    gave the participant's GpVF; ``n_images`` counts the baseline images.
    """
    from raypipe.metrics import risk_groups

    if studies.empty:
        raise ValueError("no studies to aggregate")
    df = studies.reset_index(drop=True)
    order = df["time_days"].astype(float) if "time_days" in df.columns else pd.Series(0.0, index=df.index)
    first = df.assign(_t=order.fillna(-np.inf)).sort_values(["patient_id", "_t"], ascending=[True, False])
    base = first.drop_duplicates("patient_id", keep="first").drop(columns="_t").set_index("patient_id")
    grouped = df.groupby("patient_id", sort=False)
    best_gen = df.loc[df["gpvf"].astype(float).fillna(-np.inf).groupby(df["patient_id"]).idxmax()].set_index("patient_id")
    out = base.copy()
    out["bpvf"] = grouped["bpvf"].max()
    out["gpvf"] = grouped["gpvf"].max()
    out["score"] = out["gpvf"].astype(float)
    for c in ("gpvf_sd", "gpvf_year"):
        if c in best_gen.columns:
            out[c] = best_gen[c]
    out["n_images"] = grouped.size()
    if "event" in df.columns:
        out["event"] = grouped["event"].max()
    ok = out["bpvf"].notna() & out["gpvf"].notna()
    out["group"] = None
    if ok.any():
        out.loc[ok, "group"] = risk_groups(out.loc[ok, "bpvf"].to_numpy(float), out.loc[ok, "gpvf"].to_numpy(float),
                                           low=low, high=high).astype(str)
    return out.reset_index()


def diffx_metrics(frame: pd.DataFrame, cfg: GenerateJobConfig | None = None) -> dict[str, Any]:
    """Risk-group survival analysis of Diff-X predictions (thesis Results 4-5); one row per participant."""
    from raypipe.metrics import cox_hazard_ratios, group_incidence, kaplan_meier, logrank_test, td_auroc
    from raypipe.metrics.diffx import fracture_score_models, pairwise_logrank, table4, table5

    if frame["patient_id"].duplicated().any():
        dup = frame.loc[frame["patient_id"].duplicated(), "patient_id"].iloc[0]
        raise ValueError(f"participant {dup!r} has several rows: aggregate with aggregate_participants first "
                         "(survival analyses count each participant once)")
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
    out["logrank_pairwise"] = _guard(lambda: {"pairs": [vars(r) for r in pairwise_logrank(t, e, df["group"].to_numpy(str))]})
    out["table4"] = _guard(lambda: table4(df))
    out["table5"] = _guard(lambda: table5(df))
    out["fracture_score_models"] = _guard(lambda: fracture_score_models(df, folds=5, seed=cfg.seed))
    out["fracture_score_models_deepsurv"] = _guard(lambda: fracture_score_models(df, folds=5, seed=cfg.seed,
                                                                                 method="deepsurv"))
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


def generate_cohort_cli(manifest: str, model_dir: str, out_dir: str, pvf_dir: str | None, config_path: str | None,
                        overrides: dict[str, Any] | None = None) -> int:
    """`raypipe generate-batch` (and jobs/generate.py): init Ray, run `generate_cohort`, log where things went."""
    from raypipe.config import load_config
    from raypipe.ray_utils import init_ray

    cfg = load_config(GenerateJobConfig, config_path, overrides)
    init_ray()
    res = generate_cohort(manifest, model_dir, out_dir, pvf_dir, cfg)
    log.info("%d studies; predictions %s", res["studies"], res["predictions"])
    return 0
