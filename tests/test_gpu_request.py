"""GPUs are requested, never discovered: configs and `--gpus N` / `--cpu` decide, the request reaches Ray Train's
ScalingConfig even on a CPU-only cluster, and a local Ray that can never hold it fails fast instead of running on CPU."""
from __future__ import annotations

import logging
from pathlib import Path

import pytest

from raypipe.cli import UsageError, build_parser, device_overrides, main
from raypipe.config import load_config, parse_config, read_yaml
from raypipe.data.generate_pipeline import GenerateJobConfig
from raypipe.ray_utils import describe_devices
from raypipe.tasks import TASKS

CONFIGS = Path(__file__).resolve().parents[1] / "jobs" / "configs"


def _paper(cls: type, raw: dict, overrides: dict) -> object:
    """A paper config validated without its local ImageNet / Stable Diffusion weights (not part of this test)."""
    data = {k: v for k, v in raw.items() if k != "pretrained_path"}
    if "pretrained" in data:
        data["pretrained"] = "none"
    if "pretrained_sd" in data:
        data["pretrained_sd"] = "none"
    return parse_config(cls, {**data, **overrides}, "<paper>")


@pytest.mark.parametrize("name", sorted(TASKS))
def test_paper_configs_ask_for_gpus_tiny_configs_for_cpu(name: str) -> None:
    task = TASKS[name]
    cls = task.config_class()
    for file in task.paper_configs:
        raw = read_yaml(CONFIGS / file)
        assert raw["use_gpu"] is True and raw["gpus_per_worker"] >= 1, file
        cfg = _paper(cls, raw, {})
        assert cfg.use_gpu and cfg.gpus_per_worker == raw["gpus_per_worker"]
        forced = _paper(cls, raw, device_overrides(None, cpu=True))  # --cpu: the one way to CPU
        assert forced.use_gpu is False
    tiny = load_config(cls, CONFIGS / task.tiny_config)
    assert tiny.use_gpu is False
    asked = load_config(cls, CONFIGS / task.tiny_config, device_overrides(2, cpu=False))  # --gpus 2
    assert asked.use_gpu is True and asked.gpus_per_worker == 2


def test_cli_device_flags_resolve_to_overrides() -> None:
    parser = build_parser()
    for command in (["train", "cnn-rnn"], ["cv", "cnn-rnn"], ["tune", "cnn-rnn", "--config", "s.yaml"]):
        a = parser.parse_args([*command, "--data", "d", "--gpus", "1"])
        assert (a.gpus, a.cpu) == (1.0, False)
        assert device_overrides(a.gpus, a.cpu) == {"use_gpu": True, "gpus_per_worker": 1.0}
        with pytest.raises(SystemExit):  # mutually exclusive
            parser.parse_args([*command, "--data", "d", "--gpus", "1", "--cpu"])
    a = parser.parse_args(["generate-batch", "--data", "m", "--model", "x", "--out", "o", "--cpu"])
    assert device_overrides(a.gpus, a.cpu, key="gpus_per_replica") == {"use_gpu": False}
    assert device_overrides(None, False) == {}
    with pytest.raises(UsageError, match="--gpus must be positive"):
        device_overrides(0, False)


def test_generation_devices_from_config_and_flags() -> None:
    paper = load_config(GenerateJobConfig, CONFIGS / "generate.yaml")
    assert paper.use_gpu and paper.gpus_per_replica == 1 and paper.concurrency >= 1
    cpu = load_config(GenerateJobConfig, CONFIGS / "generate.yaml", device_overrides(None, True, "gpus_per_replica"))
    assert not cpu.use_gpu
    assert GenerateJobConfig().use_gpu is False and GenerateJobConfig().concurrency == 1


def test_use_gpu_null_means_cpu_and_says_so(caplog: pytest.LogCaptureFixture) -> None:
    cls = TASKS["deepsurv"].config_class()
    with caplog.at_level(logging.WARNING):
        cfg = load_config(cls, CONFIGS / "xray_deepsurv_tiny.yaml", {"use_gpu": None})
    assert cfg.use_gpu is False
    assert "use_gpu: null means false" in caplog.text


def test_device_line() -> None:
    assert describe_devices(2, True, 1) == "training on 2 workers x 1 GPU"
    assert describe_devices(1, True, 0.5, what="Diff-X generation", unit="replica") == \
        "Diff-X generation on 1 replica x 0.5 GPUs"
    assert describe_devices(2, False).startswith("training on 2 workers, CPU only")


def test_gpu_request_reaches_scaling_config_on_a_cpu_only_ray(ray_session, tmp_path: Path) -> None:
    """On a CPU-only local Ray the trainer still asks for GPUs (no silent CPU fallback)."""
    import ray

    from raypipe.train.common import make_trainer, scaling_config

    assert ray.cluster_resources().get("GPU", 0) == 0  # this machine: no GPU
    cfg = load_config(TASKS["deepsurv"].config_class(), CONFIGS / "xray_deepsurv_tiny.yaml",
                      {"use_gpu": True, "gpus_per_worker": 1, "num_workers": 2})
    sc = scaling_config(cfg)
    assert sc.use_gpu and sc.num_workers == 2 and sc.resources_per_worker["GPU"] == 1
    assert sc.total_resources["GPU"] == 2
    trainer = make_trainer(lambda config: None, {}, {}, cfg, str(tmp_path / "ray"))
    assert trainer.scaling_config.use_gpu and trainer.scaling_config.resources_per_worker["GPU"] == 1
    cpu = scaling_config(cfg.model_copy(update={"use_gpu": False}))
    assert not cpu.use_gpu and "GPU" not in cpu.resources_per_worker


def test_train_with_gpus_on_local_cpu_ray_fails_fast(ray_session, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture) -> None:
    """`--gpus 1` where the local Ray has no GPU and no autoscaler: one clear error, nothing trained on CPU."""
    manifest = tmp_path / "manifest.csv"
    manifest.write_text("patient_id\n")
    out = tmp_path / "run"
    code = main(["train", "pvf", "--config", str(CONFIGS / "pvf_tiny.yaml"), "--data", str(manifest),
                 "--out", str(out), "--gpus", "1"])
    err = capsys.readouterr().err
    assert code == 1
    assert "asks for 1 GPU(s)" in err and "no autoscaler" in err and "--cpu" in err
    assert not out.exists()  # nothing ran
