"""raypipe.tracking against a real `mlflow server` on loopback (tests/_mlflow.py): Tune trials through Ray's
MLflowLoggerCallback, a 2-worker Ray Train fit through `TrainTracker` (one run, the workers' per-epoch metrics),
final metrics and artifacts, `raypipe train --mlflow` end to end, and the local OUT/mlruns store used by
`--mlflow` without a server."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import yaml
from pydantic import BaseModel

from raypipe.tracking import (
    final_metrics,
    flatten_params,
    log_final,
    metric_key,
    numeric_metrics,
    resolve_tracking,
)
from tests._mlflow import mlflow_server  # noqa: F401  (fixture)

mlflow = pytest.importorskip("mlflow")

METRICS = {"models": {"ct_bm": {"auroc": {"value": 0.71, "ci_low": 0.62, "ci_high": 0.8},
                                "td_auroc@1825": {"value": 0.69, "ci_low": None, "ci_high": None}},
                      "frax": {"auroc": {"value": 0.6, "ci_low": 0.5, "ci_high": 0.7}}},
           "comparisons": [{"a": "ct_bm", "b": "frax", "metric": "auroc", "p_value": 0.03}]}


class _Optim(BaseModel):
    lr: float = 1e-3
    betas: list[float] = [0.9, 0.999]


class _Config(BaseModel):
    model: str = "cnn_rnn_tiny"
    epochs: int = 3
    optim: _Optim = _Optim()


def _outputs(out: Path) -> tuple[Path, Path]:
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(METRICS))
    (out / "report.html").write_text("<html><body>report</body></html>")
    return out / "metrics.json", out / "report.html"


def _runs(uri: str, run_name: str) -> list:
    client = mlflow.tracking.MlflowClient(uri)
    exp = client.get_experiment_by_name("raypipe")
    return client.search_runs([exp.experiment_id], filter_string=f"tags.`raypipe.run` = '{run_name}'")


def test_params_metric_keys_and_final_metrics() -> None:
    assert flatten_params(_Config()) == {"model": "cnn_rnn_tiny", "epochs": "3", "optim.lr": "0.001",
                                         "optim.betas": "[0.9, 0.999]"}
    assert metric_key("td_auroc@1825") == "td_auroc_at_1825" and metric_key("val/c-index (uno)") == "val/c-index _uno_"
    import numpy as np

    assert numeric_metrics({"loss": np.float32(0.5), "ok": True, "nan": math.nan, "name": "x", "val": {"auroc": 0.7},
                            "n": 3}) == {"loss": 0.5, "val/auroc": 0.7, "n": 3.0}
    flat = final_metrics(METRICS)
    assert flat["ct_bm/auroc"] == 0.71 and flat["ct_bm/auroc/ci_low"] == 0.62 and flat["frax/auroc/ci_high"] == 0.7
    assert flat["ct_bm/td_auroc_at_1825"] == 0.69 and "ct_bm/td_auroc_at_1825/ci_low" not in flat
    assert flat["p_value/ct_bm_vs_frax/auroc"] == 0.03
    with pytest.raises(ValueError, match="run/metrics.json"):
        final_metrics({"auroc": 0.7}, "run/metrics.json")


def test_targets_env_flag_and_off(tmp_path: Path) -> None:
    assert resolve_tracking(tmp_path, "r", {}, enabled=False, env={}) is None
    with pytest.raises(ValueError, match="--out is 's3://bucket/run'"):
        resolve_tracking("s3://bucket/run", "r", {}, enabled=True, env={})
    t = resolve_tracking(tmp_path / "out", "r", _Config(), enabled=True, env={"MLFLOW_EXPERIMENT_NAME": "exp1"})
    assert t.tracking_uri == f"sqlite:///{tmp_path / 'out' / 'mlruns' / 'mlflow.db'}" and t.experiment_name == "exp1"
    assert t.params["optim.lr"] == "0.001"


def test_local_mlruns_store_under_out(tmp_path: Path) -> None:
    out = tmp_path / "run"
    t = resolve_tracking(out, "cv-local", _Config(), enabled=True, env={})
    run_id = log_final(t, *_outputs(out))
    client = mlflow.tracking.MlflowClient(t.tracking_uri)
    run = client.get_run(run_id)
    assert run.data.tags["raypipe.role"] == "summary" and run.info.status == "FINISHED"
    assert run.data.params["optim.lr"] == "0.001" and run.data.metrics["ct_bm/auroc"] == 0.71
    stored = sorted(p.name for p in (out / "mlruns" / "artifacts").rglob("*") if p.is_file())
    assert stored == ["metrics.json", "report.html"]  # artifacts on disk under OUT/mlruns, nowhere else


def test_tune_trials_and_summary_on_server(mlflow_server: str, ray_session, tmp_path: Path) -> None:  # noqa: F811
    from ray import tune

    from raypipe.tracking import tracking_callbacks

    def trainable(config: dict) -> None:
        for epoch in range(3):
            tune.report({"loss": config["lr"] * (3 - epoch), "epoch": epoch})

    t = resolve_tracking(tmp_path / "out", "tune-1", _Config(), env={"MLFLOW_TRACKING_URI": mlflow_server})
    tuner = tune.Tuner(tune.with_resources(trainable, {"CPU": 0.25}), param_space={"lr": tune.grid_search([0.1, 0.2])},
                       run_config=tune.RunConfig(storage_path=str(tmp_path / "ray"), name="tune-1",
                                                 callbacks=tracking_callbacks(t), verbose=0))
    assert not tuner.fit().errors
    log_final(t, *_outputs(tmp_path / "out"))
    runs = _runs(mlflow_server, "tune-1")
    trials = [r for r in runs if r.data.tags["raypipe.role"] == "trial"]
    assert sorted(r.data.params["lr"] for r in trials) == ["0.1", "0.2"]
    client = mlflow.tracking.MlflowClient(mlflow_server)
    for r in trials:
        lr = float(r.data.params["lr"])
        history = sorted((m.step, m.value) for m in client.get_metric_history(r.info.run_id, "loss"))
        assert history == [(1, pytest.approx(3 * lr)), (2, pytest.approx(2 * lr)), (3, pytest.approx(lr))]
        assert r.info.status == "FINISHED"
    (summary,) = [r for r in runs if r.data.tags["raypipe.role"] == "summary"]
    assert summary.data.metrics["ct_bm/auroc"] == 0.71 and summary.data.params["model"] == "cnn_rnn_tiny"
    assert sorted(a.path for a in client.list_artifacts(summary.info.run_id)) == ["metrics.json", "report.html"]


def test_train_workers_log_one_run_on_server(mlflow_server: str, ray_session, tmp_path: Path) -> None:  # noqa: F811
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from raypipe.tracking import train_callbacks

    # defined here, so that cloudpickle ships it by value (workers cannot import test modules)
    def _train_loop(config: dict) -> None:
        import ray.train

        for epoch in range(3):
            ray.train.report({"epoch": epoch, "loss": 1.0 / (epoch + 1), "val": {"c_index": 0.5 + 0.1 * epoch},
                              "phase": "train"})

    t = resolve_tracking(tmp_path / "out", "train-1", _Config(), env={"MLFLOW_TRACKING_URI": mlflow_server})
    trainer = TorchTrainer(_train_loop, scaling_config=ScalingConfig(num_workers=2, resources_per_worker={"CPU": 0.25}),
                           run_config=RunConfig(storage_path=str(tmp_path / "ray"), name="train-1",
                                                callbacks=train_callbacks(t)))
    trainer.fit()
    metrics_path, report_path = _outputs(tmp_path / "out")
    run_id = log_final(t, metrics_path, report_path)
    (run,) = _runs(mlflow_server, "train-1")  # one run for two workers
    assert run.info.run_id == run_id and run.data.tags["raypipe.role"] == "train"
    assert run.data.params["optim.betas"] == "[0.9, 0.999]"
    client = mlflow.tracking.MlflowClient(mlflow_server)
    history = sorted((m.step, m.value) for m in client.get_metric_history(run_id, "val/c_index"))
    assert history == [(0, pytest.approx(0.5)), (1, pytest.approx(0.6)), (2, pytest.approx(0.7))]
    assert len(client.get_metric_history(run_id, "loss")) == 3 and "phase" not in run.data.metrics
    assert run.data.metrics["p_value/ct_bm_vs_frax/auroc"] == 0.03
    assert sorted(a.path for a in client.list_artifacts(run_id)) == ["metrics.json", "report.html"]
    assert client.get_run(run_id).info.status == "FINISHED"
    assert train_callbacks(None) == []


def test_raypipe_train_mlflow_end_to_end(mlflow_server: str, ray_session, tmp_path: Path,  # noqa: F811
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """`raypipe train deepsurv --mlflow` on a small cohort: params, per-epoch metrics, final metrics, artifacts."""
    from raypipe.cli import main
    from raypipe.data.synth import synth_cohort
    from raypipe.data.xray_pipeline import preprocess_xray
    from raypipe.preprocess.config import XrayPreprocessConfig

    synth_cohort("xray", tmp_path / "cohort", patients=60, seed=1)
    shards = tmp_path / "shards"
    preprocess_xray(tmp_path / "cohort" / "manifest.csv", shards,
                    XrayPreprocessConfig(out_size=64, shard_size=30, qc_pictures=False), use_ray=False)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "raypipe-e2e")
    out = tmp_path / "run"
    config = Path(__file__).resolve().parents[1] / "jobs" / "configs" / "xray_deepsurv_tiny.yaml"
    assert main(["train", "deepsurv", "--config", str(config), "--data", str(shards), "--out", str(out),
                 "--mlflow", "--set", "epochs=2", "--set", "n_boot=20"]) == 0
    client = mlflow.tracking.MlflowClient(mlflow_server)
    exp = client.get_experiment_by_name("raypipe-e2e")
    (run,) = client.search_runs([exp.experiment_id])
    assert run.data.tags["raypipe.role"] == "train" and run.info.status == "FINISHED"
    committed_lr = float(yaml.safe_load(config.read_text())["lr"])  # the config's value, the override's beside it
    assert run.data.params["epochs"] == "2" and float(run.data.params["lr"]) == committed_lr
    assert run.data.params["use_gpu"] == "false"
    steps = sorted(m.step for m in client.get_metric_history(run.info.run_id, "train_loss"))
    assert steps == [1, 2]  # one value per epoch, reported by the Ray Train workers
    expected = final_metrics(json.loads((out / "metrics.json").read_text()))
    assert expected and all(run.data.metrics[k] == pytest.approx(v) for k, v in expected.items())
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"metrics.json", "report.html", "metrics.csv", "config.yaml"} <= artifacts
    assert (out / "report" / "report.html").is_file()
