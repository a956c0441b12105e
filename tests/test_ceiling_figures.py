"""`raypipe.data.synth.ceiling`: a run's figure and its ceiling are computed on the same rows, agree with
scikit-learn / lifelines, and the printed line says why when a figure is near chance or far below its ceiling."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from lifelines.utils import concordance_index
from sklearn.metrics import roc_auc_score

from raypipe.data.synth.ceiling import TARGET_GAP, Comparison, Figure, compare


def _cohort(n: int = 120, seed: int = 3) -> tuple[pd.DataFrame, pd.DataFrame]:
    """A manifest with planted truth and a CV's predictions: out-of-fold rows once, external rows by 2 folds."""
    rng = np.random.default_rng(seed)
    lp = rng.normal(size=n)
    image = lp * 0.6 + rng.normal(scale=0.5, size=n)
    time = rng.exponential(3000 * np.exp(-lp))
    event = (time < 3650).astype(int)
    ids = [f"P{i:03d}" for i in range(n)]
    manifest = pd.DataFrame({
        "study_id": [f"{p}_XR" for p in ids], "patient_id": ids, "modality": "XR", "true_lp": lp,
        "true_image_lp": image, "true_clinical_lp": lp - image, "deformity": rng.uniform(0, 0.45, n),
        "prevalent_fracture": 0, "fracture_5y": ((time < 1826) & (event == 1)).astype(int),
        "time_days": np.minimum(time, 3650), "event": event, "split": np.where(np.arange(n) < 80, "train", "test"),
    })
    manifest["prevalent_fracture"] = (manifest["deformity"] >= 0.2).astype(int)
    score = image + rng.normal(scale=1.0, size=n)
    oof = pd.DataFrame({"study_id": manifest["study_id"][:80], "model": "deepsurv", "split": "val", "score": score[:80]})
    ext = pd.concat([pd.DataFrame({"study_id": manifest["study_id"][80:], "model": "deepsurv@external", "split": "external",
                                   "score": score[80:] + d}) for d in (-0.2, 0.2)], ignore_index=True)
    # what a CV writes after its model: clinical baselines (shorter names) out of fold and on the external set
    base = pd.concat([oof.assign(model="cox_m1", score=-score[:80]),
                      ext.assign(model="cox_m1@external", score=-ext["score"])], ignore_index=True)
    return manifest, pd.concat([oof, ext, base], ignore_index=True)


def test_figures_agree_with_sklearn_and_lifelines_on_the_same_rows() -> None:
    """The main model (written first) is the one compared, never a clinical baseline with a shorter name."""
    manifest, preds = _cohort()
    comps, figs = compare(preds, manifest, "DeepSurv", "survival", "true_lp", n_boot=20)
    oof, ext = comps
    assert (oof.model.rows, ext.model.rows, oof.model.n, ext.model.n) == ("out-of-fold", "external", 80, 40)
    dev, held = manifest.iloc[:80], manifest.iloc[80:]
    # Harrell's C: higher risk score = shorter time, so lifelines gets the negated score
    assert oof.model.value == pytest.approx(concordance_index(dev["time_days"], -preds["score"][:80], dev["event"]))
    assert oof.ceiling.value == pytest.approx(concordance_index(dev["time_days"], -dev["true_lp"], dev["event"]))
    ext_score = preds[preds["model"] == "deepsurv@external"].groupby("study_id")["score"].mean().loc[held["study_id"]]
    assert ext.model.value == pytest.approx(concordance_index(held["time_days"], -ext_score.to_numpy(), held["event"]))

    comps, _ = compare(preds, manifest, "CT", "fracture_5y", "true_image_lp", splits=("val",), n_boot=20)
    assert comps[0].model.value == pytest.approx(roc_auc_score(dev["fracture_5y"], preds["score"][:80]))
    assert comps[0].ceiling.value == pytest.approx(roc_auc_score(dev["fracture_5y"], dev["true_image_lp"]))
    assert comps[0].gap == pytest.approx(comps[0].ceiling.value - comps[0].model.value)

    comps, _ = compare(preds, manifest, "pVF", "prevalent_fracture", "deformity", splits=("val",), n_boot=20)
    assert comps[0].ceiling.value == 1.0  # the label is deformity >= 0.20


def _comparison(value: float, lo: float, ceiling: float) -> Comparison:
    return Comparison(Figure("pVF", "test", "model", "AUROC", value, lo, value + 0.05, 100, 20),
                      Figure("pVF", "test", "deformity", "AUROC", ceiling, ceiling, ceiling, 100, 20))


def test_line_explains_near_chance_and_far_below_the_ceiling() -> None:
    near = _comparison(0.55, 0.45, 0.9).line()
    assert "not distinguishable from chance (100 rows, 20 positives): too few" in near
    assert "chance (100 rows, 20 positives): 2-3 px wedges" in _comparison(0.55, 0.45, 0.9).line("2-3 px wedges")
    far = _comparison(0.70, 0.60, 1.0).line("2-3 px wedges")
    assert "0.30 below its ceiling: 2-3 px wedges" in far
    close = _comparison(1.0 - TARGET_GAP + 0.01, 0.8, 1.0).line("unused")
    assert "\n" not in close and "ceiling 1.00 from deformity on the same 100 rows, chance 0.50" in close
