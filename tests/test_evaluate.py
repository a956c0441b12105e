"""`raypipe.evaluate` and `raypipe.predictions` on synthetic prediction files with a planted signal.

A latent log-hazard drives Cox-model event times; a "good" model sees the latent risk with a little
noise (log-risk), a "weak" one sees it through heavy noise (probability). The evaluation must rank
them, give CIs around its estimates and tell them apart, and bad prediction files must fail with
messages that name the file and the column.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from raypipe.config import config_hash
from raypipe.evaluate import evaluate, evaluate_frame, summary_lines
from raypipe.predictions import (
    PredictionSchemaError,
    read_prediction_metadata,
    read_predictions,
    write_predictions,
)

N_BOOT = 100
TIMES = (365, 730, 1095, 1825)
METRIC_NAME = re.compile(
    r"^(auroc|accuracy|sensitivity|specificity|ppv|npv|c_index|c_index_uno|ibs|td_auroc_mean|td_auroc@\d+|hr@.+)$"
)


def synthetic_predictions(n: int = 700, seed: int = 0) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Prediction frames of a good (log-risk) and a weak (probability) model on one synthetic cohort."""
    rng = np.random.default_rng(seed)
    age = rng.normal(68, 8, n)
    female = rng.random(n) < 0.7
    bmi = rng.normal(24, 3.5, n)
    smoker = (rng.random(n) < 0.2).astype(int)
    latent = 0.05 * (age - 68) + 0.4 * female + rng.normal(0, 1.3, n)
    event_time = -np.log(rng.random(n)) / (1.5e-4 * np.exp(latent))  # Cox model, exponential baseline
    censor_time = rng.uniform(400, 3650, n)
    time = np.maximum(np.minimum(event_time, censor_time), 1.0)
    event = (event_time <= censor_time).astype(int)
    fracture_5y = np.where((event == 1) & (time <= 1825), 1.0, np.where(time > 1825, 0.0, np.nan))
    u = rng.random(n)
    split = np.where(u < 0.6, "train", np.where(u < 0.8, "val", "test"))
    good = latent + rng.normal(0, 0.3, n)
    weak = 1 / (1 + np.exp(-(0.25 * latent + rng.normal(0, 1.5, n) - 1)))
    cut = np.quantile(good, [0.5, 0.8])
    group = np.where(good >= cut[1], "HIGH", np.where(good >= cut[0], "LH", "LL"))
    base = pd.DataFrame({
        "patient_id": [f"P{i:04d}" for i in range(n)], "study_id": [f"S{i:04d}" for i in range(n)], "fold": -1,
        "split": split, "time_days": time, "event": event, "fracture_5y": fracture_5y, "age": age.round(1),
        "sex": np.where(female, "F", "M"), "bmi": bmi.round(1), "smoker": smoker,
    })
    good_df = base.assign(model="image-deepsurv", score=good, score_kind="log_risk", group=group)
    weak_df = base.assign(model="clinical-weak", score=weak, score_kind="probability")
    return good_df, weak_df


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path]:
    """Both models written (Parquet and CSV) and evaluated once for the module."""
    root = tmp_path_factory.mktemp("evaluate")
    good, weak = synthetic_predictions()
    paths = [
        write_predictions(good, root / "good" / "predictions.parquet", {"model_name": "image-deepsurv", "model_version": 1}),
        write_predictions(weak, root / "weak" / "predictions.csv", {"model_name": "clinical-weak"}),
    ]
    out = root / "out"
    metrics = evaluate(paths, out, n_boot=N_BOOT, seed=0, times_days=TIMES)
    return metrics, out


def test_metrics_json_follows_the_design_schema(evaluated: tuple[dict, Path]) -> None:
    metrics, out = evaluated
    on_disk = json.loads((out / "metrics.json").read_text())
    assert on_disk == metrics
    assert set(metrics) == {"models", "comparisons"}
    assert list(metrics["models"]) == ["image-deepsurv", "clinical-weak"]
    for name, entries in metrics["models"].items():
        for metric, entry in entries.items():
            assert METRIC_NAME.match(metric), f"{name}: unexpected metric name {metric!r}"
            assert set(entry) == {"value", "ci_low", "ci_high"}, (name, metric)
            assert isinstance(entry["value"], float)
    for c in metrics["comparisons"]:
        assert set(c) == {"a", "b", "metric", "p_value"}
        assert c["a"] == "image-deepsurv" and c["b"] == "clinical-weak"
        assert c["p_value"] is None or 0.0 <= c["p_value"] <= 1.0
    good = metrics["models"]["image-deepsurv"]
    expected = {"auroc", "accuracy", "sensitivity", "specificity", "ppv", "npv", "c_index", "c_index_uno",
                "td_auroc_mean", "ibs", "hr@LL", "hr@LH", "hr@HIGH", *(f"td_auroc@{t}" for t in TIMES)}
    assert expected <= set(good)
    assert "ibs" not in metrics["models"]["clinical-weak"]  # probabilities give no survival curves
    assert {"auroc", "accuracy", "sensitivity", "specificity", "c_index"} <= {c["metric"] for c in metrics["comparisons"]}


def test_planted_signal_is_recovered(evaluated: tuple[dict, Path]) -> None:
    metrics, _ = evaluated
    good, weak = metrics["models"]["image-deepsurv"], metrics["models"]["clinical-weak"]
    assert good["auroc"]["value"] > 0.7 > weak["auroc"]["value"]
    assert good["c_index"]["value"] > weak["c_index"]["value"] + 0.1
    assert good["td_auroc_mean"]["value"] > weak["td_auroc_mean"]["value"]
    assert 0.0 < good["ibs"]["value"] < 0.25
    assert good["hr@LL"]["value"] == 1.0
    assert good["hr@HIGH"]["ci_low"] > 1.0 and good["hr@HIGH"]["value"] > good["hr@LH"]["value"]
    p = {c["metric"]: c["p_value"] for c in metrics["comparisons"]}
    assert p["auroc"] < 0.01  # DeLong
    assert p["c_index"] < 0.01  # paired bootstrap


def test_confidence_intervals_contain_the_estimate(evaluated: tuple[dict, Path]) -> None:
    metrics, _ = evaluated
    for name, entries in metrics["models"].items():
        for metric, e in entries.items():
            if e["ci_low"] is None:
                continue
            assert e["ci_low"] <= e["value"] <= e["ci_high"], (name, metric, e)
            if metric.startswith("hr@"):
                assert e["ci_low"] == e["ci_high"] == 1.0 or math.log(e["ci_high"] / e["ci_low"]) < 2.5, (name, metric, e)
            else:
                assert e["ci_high"] - e["ci_low"] < 0.6, (name, metric, e)


def test_report_and_pngs_are_written(evaluated: tuple[dict, Path]) -> None:
    _, out = evaluated
    for name in ("report.html", "roc.png", "td_auroc.png", "calibration.png", "km_image-deepsurv.png"):
        assert (out / name).stat().st_size > 1000, name


def test_summary_lines_name_every_model(evaluated: tuple[dict, Path]) -> None:
    metrics, _ = evaluated
    lines = summary_lines(metrics)
    assert len(lines) == 2
    assert lines[0].startswith("image-deepsurv [reference]: auroc ")
    assert "c_index" in lines[1] and "p=" in lines[1]


def test_evaluation_is_deterministic_given_a_seed() -> None:
    good, weak = synthetic_predictions(n=300, seed=3)
    df = validate_both(good, weak)
    first = evaluate_frame(df, n_boot=20, seed=5).metrics
    second = evaluate_frame(df, n_boot=20, seed=5).metrics
    assert first == second


def validate_both(*frames: pd.DataFrame) -> pd.DataFrame:
    """Concatenate frames through the schema validation, as read_predictions would."""
    from raypipe.predictions import validate_predictions

    return validate_predictions(pd.concat(frames, ignore_index=True))


def test_reference_model_must_exist() -> None:
    good, weak = synthetic_predictions(n=200, seed=1)
    with pytest.raises(ValueError, match="reference model 'nope'"):
        evaluate_frame(validate_both(good, weak), reference_model="nope", n_boot=5)


def test_predictions_round_trip_with_metadata(tmp_path: Path) -> None:
    good, _ = synthetic_predictions(n=50)
    meta = {"model_name": "image-deepsurv", "model_version": 2, "config_hash": config_hash({"lr": 1e-4})}
    for suffix in ("parquet", "csv"):
        path = write_predictions(good, tmp_path / f"p.{suffix}", meta)
        back = read_predictions(path)
        assert len(back) == 50 and back["score"].tolist() == pytest.approx(good["score"].tolist())
        assert back["fold"].dtype == np.int64 and back["event"].dtype == np.int64
        got = read_prediction_metadata(path)
        assert got["model_version"] == 2 and got["config_hash"] == meta["config_hash"] and "created" in got
        assert back.attrs["sources"][path]["model_name"] == "image-deepsurv"
    assert (tmp_path / "p.csv.meta.json").exists()
    assert not [p for p in tmp_path.iterdir() if ".tmp" in p.name]  # atomic writes leave no temporaries


def test_config_hash_is_stable_and_order_free() -> None:
    assert config_hash({"a": 1, "b": [1, 2]}) == config_hash({"b": [1, 2], "a": 1})
    assert config_hash({"a": 1}) != config_hash({"a": 2})
    assert re.fullmatch(r"[0-9a-f]{16}", config_hash({"a": 1}))


def _good_frame() -> pd.DataFrame:
    return synthetic_predictions(n=40)[0]


def _with(df: pd.DataFrame, **changes: object) -> pd.DataFrame:
    out = df.copy()
    for col, value in changes.items():
        out[col] = value
    return out


BAD_FILES = {
    "missing_score": (lambda d: d.drop(columns=["score"]), "missing required column(s) 'score'"),
    "missing_study_id": (lambda d: d.drop(columns=["study_id"]), "missing required column(s) 'study_id'"),
    "nan_score": (lambda d: _with(d, score=np.r_[np.nan, d["score"].to_numpy()[1:]]), "column 'score' has 1 NaN"),
    "text_fold": (lambda d: _with(d, fold="first"), "column 'fold' must be an integer"),
    "text_score": (lambda d: _with(d, score="high"), "column 'score' must be numeric"),
    "bad_kind": (lambda d: _with(d, score_kind="hazard"), "column 'score_kind' has value(s) ['hazard']"),
    "prob_out_of_range": (lambda d: _with(d, score_kind="probability", score=d["score"] + 5),
                          "column 'score' has 40 probability value(s) outside [0, 1]"),
    "event_not_binary": (lambda d: _with(d, event=2), "column 'event' must be 0/1"),
    "negative_time": (lambda d: _with(d, time_days=-1.0), "column 'time_days' has 40 missing or non-positive"),
    "duplicates": (lambda d: pd.concat([d, d.iloc[:1]]), "duplicated rows for key"),
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
@pytest.mark.parametrize("suffix", ["parquet", "csv"])
def test_bad_prediction_files_fail_naming_file_and_column(tmp_path: Path, case: str, suffix: str) -> None:
    mutate, message = BAD_FILES[case]
    path = tmp_path / f"{case}.{suffix}"
    bad = mutate(_good_frame())
    if suffix == "parquet":
        bad.to_parquet(path, index=False)  # bypasses write_predictions' validation on purpose
    else:
        bad.to_csv(path, index=False)
    with pytest.raises(PredictionSchemaError) as err:
        read_predictions(path)
    assert str(path) in str(err.value) and message in str(err.value)
    with pytest.raises(PredictionSchemaError, match=re.escape(message)):
        write_predictions(bad, tmp_path / f"again.{suffix}")
    assert not (tmp_path / f"again.{suffix}").exists()


def test_evaluate_reports_the_bad_file_among_good_ones(tmp_path: Path) -> None:
    good = write_predictions(_good_frame(), tmp_path / "good.parquet")
    bad_path = tmp_path / "bad.csv"
    _good_frame().drop(columns=["score_kind"]).to_csv(bad_path, index=False)
    with pytest.raises(PredictionSchemaError, match=re.escape(f"'{bad_path}': missing required column(s) 'score_kind'")):
        evaluate([good, bad_path], tmp_path / "out", n_boot=5)
    assert not (tmp_path / "out" / "metrics.json").exists()


def test_unreadable_and_missing_files(tmp_path: Path) -> None:
    junk = tmp_path / "junk.parquet"
    junk.write_bytes(b"not a parquet file")
    with pytest.raises(PredictionSchemaError, match="junk.parquet.*cannot be parsed"):
        read_predictions(junk)
    with pytest.raises(FileNotFoundError, match="nothere.parquet"):
        read_predictions(tmp_path / "nothere.parquet")
    (tmp_path / "x.txt").write_text("patient_id\n")
    with pytest.raises(PredictionSchemaError, match="x.txt.*unknown format"):
        read_predictions(tmp_path / "x.txt")


def test_same_study_in_two_files_is_rejected(tmp_path: Path) -> None:
    df = _good_frame()
    a = write_predictions(df, tmp_path / "a.parquet")
    b = write_predictions(df, tmp_path / "b.parquet")
    with pytest.raises(PredictionSchemaError, match="in more than one file"):
        read_predictions([a, b])


def test_probability_only_binary_predictions_without_survival(tmp_path: Path) -> None:
    good, _ = synthetic_predictions(n=400, seed=2)
    ct = good.drop(columns=["time_days", "event", "group"]).dropna(subset=["fracture_5y"])
    ct = ct.assign(score=1 / (1 + np.exp(-ct["score"])), score_kind="probability", split="test")
    path = write_predictions(ct, tmp_path / "ct.parquet", {"threshold": 0.4})
    metrics = evaluate(path, tmp_path / "out", n_boot=20)
    entries = metrics["models"]["image-deepsurv"]
    assert set(entries) == {"auroc", "accuracy", "sensitivity", "specificity", "ppv", "npv"}
    assert metrics["comparisons"] == []
    assert math.isfinite(entries["auroc"]["value"])
    assert "given in the run metadata" in (tmp_path / "out" / "report.html").read_text()


def test_survival_only_predictions_without_training_rows(tmp_path: Path) -> None:
    good, _ = synthetic_predictions(n=300, seed=4)
    xr = good.drop(columns=["fracture_5y"]).assign(split="test")
    path = write_predictions(xr, tmp_path / "xray.parquet")
    metrics = evaluate(path, tmp_path / "out", n_boot=20)
    entries = metrics["models"]["image-deepsurv"]
    assert "auroc" not in entries and {"c_index", "c_index_uno", "ibs", "td_auroc_mean", "hr@HIGH"} <= set(entries)
    assert entries["c_index"]["value"] > 0.7
    assert "estimated on the evaluated rows themselves" in (tmp_path / "out" / "report.html").read_text()
