"""The task registry: pure data, the CLI's only source of model names, and one contract every task meets."""
from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest

from raypipe.tasks import TASKS, Task, cv_names, get_task, resolve, tune_names

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "jobs" / "configs"


def test_registry_imports_nothing_else_of_raypipe() -> None:
    code = ("import sys, raypipe.tasks; "
            "print(sorted(m for m in sys.modules if m.startswith('raypipe') and m not in ('raypipe', 'raypipe.tasks')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("name", list(TASKS))
def test_every_entry_resolves_and_its_configs_load(name: str) -> None:
    from raypipe.config import ConfigError, load_config
    from raypipe.train.config import RayRunConfig

    task = TASKS[name]
    cls = task.config_class()
    assert issubclass(cls, RayRunConfig)  # one shared Ray-run base: workers, GPUs, failures, storage
    assert callable(task.fit_function())
    for path in (task.fold_fit, task.gradcam, task.after_train, task.study_meta):
        if path:
            assert callable(resolve(path))
    for file in (*task.paper_configs, task.tiny_config):
        assert (CONFIGS / file).is_file(), file
        if file == task.tiny_config or not ({"pretrained", "pretrained_sd"} & set(cls.model_fields)):
            load_config(cls, CONFIGS / file)
            continue
        if "pretrained_sd" in cls.model_fields:  # Diff-X names a Stable Diffusion directory the tests do not ship
            with pytest.raises(ConfigError, match="weights/stable-diffusion"):
                load_config(cls, CONFIGS / file)
            load_config(cls, CONFIGS / file, {"pretrained_sd": "none"})
            continue
        # paper configs name ImageNet weights the tests do not ship: refused, naming the file, until stated
        with pytest.raises(ConfigError, match="weights/"):
            load_config(cls, CONFIGS / file)
        load_config(cls, CONFIGS / file, {"pretrained": "none", "pretrained_path": None})
    assert get_task(name.replace("-", "_")) is task


def test_a_new_registry_entry_reaches_train_cv_and_tune(monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    from raypipe import cli, tasks

    extra = dataclasses.replace(TASKS["deepsurv"], name="deepsurv-wide", summary="a wider DeepSurv")
    monkeypatch.setitem(tasks.TASKS, "deepsurv-wide", extra)
    for command in ("train", "cv", "tune"):
        with pytest.raises(SystemExit):
            cli.build_parser().parse_args([command, "--help"])
        assert "deepsurv-wide" in capsys.readouterr().out, command
    assert "deepsurv-wide" in cv_names() and "deepsurv-wide" in tune_names()
    args = cli.build_parser().parse_args(["cv", "deepsurv-wide", "--data", "x"])
    assert args.model == "deepsurv-wide"


def test_unknown_task_names_the_known_ones() -> None:
    with pytest.raises(KeyError, match="cnn-rnn"):
        get_task("resnet")
    with pytest.raises(KeyError, match="cross-validation"):
        Task("x", "x", "a:b", "a:b", "manifest").fold_fit_function()


# ---------------------------------------------------------------------------------------------- contract
@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A small cohort as every task takes it: CT shards, X-ray shards and the manifest (32 patients)."""
    from raypipe.data.ct_pipeline import preprocess_ct
    from raypipe.data.synth import synth_cohort
    from raypipe.data.xray_pipeline import preprocess_xray
    from raypipe.preprocess.config import XrayPreprocessConfig

    root = tmp_path_factory.mktemp("tasks")
    manifest = synth_cohort("both", root / "cohort", patients=32, seed=4)
    preprocess_ct(manifest, root / "ct", use_ray=False)
    preprocess_xray(manifest, root / "xray", XrayPreprocessConfig(out_size=64, shard_size=16), use_ray=False)
    return {"ct-shards": root / "ct", "xray-shards": root / "xray", "manifest": manifest,
            "manifest-or-xray-shards": manifest}


ONE_EPOCH = {"cnn-rnn": {"epochs": 1, "num_workers": 1, "n_boot": 10},
             "multitask": {"epochs": 1, "num_workers": 1, "n_boot": 10},
             "keypoints": {"epochs": 1, "n_boot": 10, "input_size": 64},
             "deepsurv": {"epochs": 1, "n_boot": 10},
             "pvf": {"epochs": 1, "n_boot": 10, "input_size": [128, 64], "gradcam_images": 0},
             "age": {"epochs": 1, "input_size": [128, 64]},
             "ldm": {"vae_epochs": 1, "unet_epochs": 1, "max_steps_per_epoch": 2}}


@pytest.mark.parametrize("name", list(TASKS))
def test_task_contract(name: str, ray_session: None, tiny_data: dict[str, Path], tmp_path: Path) -> None:
    """Every task: config from its tiny YAML, one epoch through its fit on Ray Train, a typed artifact,
    published and rebuilt through the scoring loader with the trained weights."""
    import torch

    from raypipe.artifact import read_artifact
    from raypipe.config import load_config
    from raypipe.registry import publish
    from raypipe.scoring.common import build_module, open_version

    task = TASKS[name]
    cfg = load_config(task.config_class(), CONFIGS / task.tiny_config, ONE_EPOCH[name])
    out = tmp_path / "run"
    task.fit_function()(cfg, str(tiny_data[task.data]), str(out))
    art = read_artifact(str(out))
    assert art.train_task == name and art.display_name == cfg.name and art.config_hash
    assert art.builder == cfg.model or name == "deepsurv"
    publish(out, tmp_path / "registry", "m")
    version = open_version(tmp_path / "registry", "m")
    model = build_module(version)
    trained = torch.load(out / "model.pt", map_location="cpu", weights_only=True)
    for key, value in model.state_dict().items():
        assert torch.equal(value, trained[key]), key
    if name == "age":  # ages are not predictions in the schema's sense: their own table beside metrics.json
        assert (out / "age_predictions.parquet").is_file() and (out / "metrics.json").is_file()
    elif name not in ("ldm", "keypoints"):
        assert (out / "predictions.parquet").is_file() and (out / "metrics.json").is_file()
