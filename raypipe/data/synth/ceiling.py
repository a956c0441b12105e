"""How close a model comes to what the synthetic cohort makes learnable: its figure beside the ceiling and chance.

A synthetic cohort's manifest carries the planted truth of every study (`true_lp`, `true_image_lp`,
`deformity`; `docs/synthetic_cohort.md`). The ceiling of a model is the same metric computed with that truth
as the score, on exactly the rows the model was scored on: no model can beat it on average, so a model's figure
only means something next to it (and next to chance, 0.5). Used by `raypipe demo`, `bench/ceiling.py` and the
learning test; pure pandas/numpy on a run's `predictions.parquet` and the cohort manifest.

Which truth is each model's ceiling: an image-only model -> `true_image_lp` (the planted terms rendered in the
image of that modality); a model that also sees clinical variables -> `true_lp` (all planted terms); the
prevalent-fracture classifier -> `deformity` (its label is `deformity >= 0.20`, so that AUROC is 1). Reported
beside them: `visible_lp` = `true_clinical_lp + true_image_lp`, the planted terms a model of that study's modality
can see at all (a radiograph does not show the CT's muscle fat), a tighter bound for X-ray models than `true_lp`.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import pandas as pd

from raypipe.metrics.binary import auroc_ci
from raypipe.metrics.survival import concordance_ci

CHANCE = 0.5
TARGET_GAP = 0.10   # issue 14's bar: a model within 0.10 of its ceiling on the same rows has learned what is there
TRUTH_COLUMNS = ("study_id", "patient_id", "modality", "true_lp", "true_image_lp", "true_clinical_lp", "deformity",
                 "time_days", "event", "fracture_5y", "prevalent_fracture")
ROWS_OF_SPLIT = {"val": "out-of-fold", "external": "external", "test": "test"}


@dataclass(frozen=True)
class Figure:
    """One metric of one score on one set of rows, with its patient-level bootstrap 95 % CI."""

    model: str
    rows: str          # "out-of-fold", "external", "test"
    score: str         # "model" or the truth column used as the score ("true_lp", ...)
    metric: str        # "AUROC" or "Harrell C"
    value: float
    ci_low: float
    ci_high: float
    n: int
    n_pos: int         # positives (AUROC) or events (Harrell C)


@dataclass(frozen=True)
class Comparison:
    """A model's figure with its ceiling on the same rows and chance."""

    model: Figure
    ceiling: Figure

    @property
    def gap(self) -> float:
        """Ceiling minus model: how much of what is learnable the model missed."""
        return self.ceiling.value - self.model.value

    @property
    def above_chance(self) -> bool:
        """Whether the model's 95 % CI excludes chance (0.5) from below."""
        return self.model.ci_low > CHANCE

    def line(self, why_short: str = "") -> str:
        """`CT CNN-RNN out-of-fold AUROC 0.78 [0.70, 0.85] (ceiling 0.82 on the same rows, chance 0.50)`; below
        chance or more than TARGET_GAP under the ceiling, a second line says why (`why_short`: the caller's reason)."""
        m = self.model
        text = (f"{m.model} {m.rows} {m.metric} {m.value:.2f} [{m.ci_low:.2f}, {m.ci_high:.2f}] (ceiling "
                f"{self.ceiling.value:.2f} from {self.ceiling.score} on the same {m.n} rows, chance {CHANCE:.2f})")
        if not self.above_chance:
            what = "positives" if m.metric == "AUROC" else "events"
            text += (f"\n  -> not distinguishable from chance ({m.n} rows, {m.n_pos} {what}): " + (why_short or (
                     "too few for this model to learn the planted signal and for the CI to exclude 0.5; "
                     "bench/ceiling.py runs a larger cohort (bench/RESULTS.md has its figures)")))
        elif self.gap > TARGET_GAP:
            text += f"\n  -> above chance but {self.gap:.2f} below its ceiling" + (f": {why_short}" if why_short else "")
        return text


def truth_table(manifest: pd.DataFrame) -> pd.DataFrame:
    """The planted truth per study from a synthetic cohort's manifest (a clear error on a real manifest)."""
    missing = [c for c in TRUTH_COLUMNS if c not in manifest.columns]
    if missing:
        raise ValueError(f"the manifest has no planted truth (missing {missing}): ceilings exist only for cohorts "
                         f"from `raypipe synth`")
    t = manifest[list(TRUTH_COLUMNS)].copy()
    t["visible_lp"] = t["true_clinical_lp"] + t["true_image_lp"]
    t["study_id"] = t["study_id"].astype(str)
    t["patient_id"] = t["patient_id"].astype(str)
    return t


def main_model_rows(predictions: pd.DataFrame) -> pd.DataFrame:
    """The rows of the run's main model: the first model the run wrote (what `raypipe evaluate` takes as its
    reference), named `NAME` out of fold and `NAME@external` on the external set. A CV also writes its clinical
    baselines (`coxph_m1`, `frax_mof`, ...) and the multitask model its heads (`NAME-prevalent`, `NAME-5y`): those
    are not the model held to the ceiling."""
    if predictions.empty:
        return predictions
    main = str(predictions["model"].iloc[0]).split("@", 1)[0]
    names = predictions["model"].astype(str)
    return predictions[(names == main) | names.str.startswith(main + "@")].reset_index(drop=True)


def split_rows(predictions: pd.DataFrame, truth: pd.DataFrame, split: str) -> pd.DataFrame:
    """One split's predictions joined to the truth; external/test rows scored by several fold models are averaged
    per study (the CV's ensemble), out-of-fold rows are scored once by construction."""
    p = main_model_rows(predictions)
    p = p[p["split"] == split].copy()
    p["study_id"] = p["study_id"].astype(str)
    if split != "val" and p["study_id"].duplicated().any():
        p = p.groupby("study_id", as_index=False)["score"].mean()
    return p[["study_id", "score"]].merge(truth, on="study_id", how="inner", validate="one_to_one")


def binary_figures(model: str, rows: str, df: pd.DataFrame, label: str, scores: Sequence[str], n_boot: int = 500,
                   seed: int = 0) -> list[Figure]:
    """AUROC of each score column for `label` on the rows where the label is known (patient bootstrap)."""
    known = df[pd.to_numeric(df[label], errors="coerce").notna()]
    y = known[label].to_numpy(dtype=float).astype(int)
    out = []
    for s in scores:
        ci = auroc_ci(y, known[s].to_numpy(dtype=float), n_boot, seed, groups=known["patient_id"].to_numpy())
        out.append(Figure(model, rows, "model" if s == "score" else s, "AUROC", ci.value, ci.ci_low, ci.ci_high,
                          len(known), int(y.sum())))
    return out


def survival_figures(model: str, rows: str, df: pd.DataFrame, scores: Sequence[str], n_boot: int = 500,
                     seed: int = 0) -> list[Figure]:
    """Harrell's C of each score column on (time_days, event) (patient bootstrap)."""
    t, e = df["time_days"].to_numpy(dtype=float), df["event"].to_numpy(dtype=float).astype(bool)
    out = []
    for s in scores:
        ci = concordance_ci(t, e, df[s].to_numpy(dtype=float), n_boot, seed, groups=df["patient_id"].to_numpy())
        out.append(Figure(model, rows, "model" if s == "score" else s, "Harrell C", ci.value, ci.ci_low,
                          ci.ci_high, len(df), int(e.sum())))
    return out


def compare(predictions: pd.DataFrame, manifest: pd.DataFrame, model: str, kind: str, ceiling: str,
            splits: Sequence[str] = ("val", "external", "test"), n_boot: int = 500, seed: int = 0
            ) -> tuple[list[Comparison], list[Figure]]:
    """A run's figures per held-out split beside its ceiling; kind is `fracture_5y` or `prevalent_fracture`
    (AUROC) or `survival` (Harrell C). Returns the comparisons and every figure computed (for JSON output)."""
    if ceiling not in ("true_lp", "true_image_lp", "deformity"):
        raise ValueError(f"ceiling must be true_lp, true_image_lp or deformity, got {ceiling!r}")
    truth = truth_table(manifest)
    scores = ["score", "true_lp", "true_image_lp", "visible_lp"] + (["deformity"] if ceiling == "deformity" else [])
    comparisons: list[Comparison] = []
    figures: list[Figure] = []
    for split in splits:
        df = split_rows(predictions, truth, split)
        if df.empty:
            continue
        rows = ROWS_OF_SPLIT.get(split, split)
        if kind == "survival":
            figs = survival_figures(model, rows, df, scores, n_boot, seed)
        elif kind in ("fracture_5y", "prevalent_fracture"):
            figs = binary_figures(model, rows, df, kind, scores, n_boot, seed)
        else:
            raise ValueError(f"kind must be fracture_5y, prevalent_fracture or survival, got {kind!r}")
        by = {f.score: f for f in figs}
        figures += figs
        comparisons.append(Comparison(by["model"], by[ceiling]))
    return comparisons, figures


def json_lines(figures: Sequence[Figure], comparisons: Sequence[Comparison] = ()) -> list[dict[str, object]]:
    """Figures as `{"name", "value", "unit"}` records (value, CI bounds, and each comparison's gap)."""
    out: list[dict[str, object]] = []
    for f in figures:
        base, unit = f"ceiling/{f.model}/{f.rows}/{f.score}", "auroc" if f.metric == "AUROC" else "c_index"
        out += [{"name": base, "value": round(f.value, 4), "unit": unit},
                {"name": f"{base}/ci_low", "value": round(f.ci_low, 4), "unit": unit},
                {"name": f"{base}/ci_high", "value": round(f.ci_high, 4), "unit": unit}]
    for c in comparisons:
        out.append({"name": f"ceiling/{c.model.model}/{c.model.rows}/gap_to_ceiling", "value": round(c.gap, 4),
                    "unit": "auroc" if c.model.metric == "AUROC" else "c_index"})
    return out

