"""Ray-free predictors over tiny published models: batch == single, S(t) from the Breslow baseline, pVF range,
keypoint refusal, registry loading safety, and the publish CLI hook."""
from __future__ import annotations

import json
from argparse import Namespace
from pathlib import Path

import numpy as np
import pytest

KP = {"L1": [250, 150], "L2": [252, 190], "L3": [254, 230], "L4": [256, 270], "L5": [258, 310]}


@pytest.fixture(scope="module")
def registry(tmp_path_factory) -> Path:
    from raypipe.scoring.tiny import publish_tiny_models

    root = tmp_path_factory.mktemp("scoring")
    publish_tiny_models(root / "registry", which=("ct", "xray", "pvf", "keypoints"), workdir=root / "runs")
    return root / "registry"


def test_ct_predictor_batch_matches_single(registry: Path, shared_data: Path) -> None:
    from raypipe.scoring.ct import CTPredictor

    d = shared_data / "ct/totalseg_example"
    p = CTPredictor.from_registry(registry)
    inp = p.preprocess(d / "example_ct.nii.gz", d / "example_seg", clinical={"age": 80, "sex": "M", "bmi": 30})
    assert inp.x.shape == (14, 1, 96, 144) and inp.clinical.shape == (3,)
    assert inp.qc["input"] == "bone_muscle" and inp.qc["clinical_missing"] == []
    single = p.predict(inp)
    batch = p.predict_batch([inp, inp, inp])
    assert all(b.probability == pytest.approx(single.probability, abs=1e-5) for b in batch)
    assert single.model["version"] == "v1" and 0 <= single.probability <= 1
    pngs = p.predict(inp, gradcam=True).gradcam_png
    assert len(pngs) == 14 and pngs[0][:4] == b"\x89PNG"


def test_xray_predictor_survival_and_pvf(registry: Path, shared_data: Path) -> None:
    from raypipe.scoring.xray import PVFPredictor, XrayPredictor

    xp = XrayPredictor.from_registry(registry, keypoints_name=None)
    inp = xp.preprocess(shared_data / "xray/fo_dicom/GH342.dcm", KP, {"age": 70, "sex": "F"})
    assert inp.image.shape == (5, 64, 64) and inp.keypoints_source == "request"
    out = xp.predict_batch([inp, inp])
    s = [out[0].survival[str(y)] for y in range(1, 11)]
    assert all(a >= b for a, b in zip(s, s[1:])) and out[0].risk_5y == pytest.approx(1 - s[4])
    assert out[0].log_risk == pytest.approx(out[1].log_risk, abs=1e-6)
    # S(t) follows the Cox form S(t|r) = S0(t)^exp(r - offset): higher log-risk, lower survival.
    assert xp.survival(out[0].log_risk + 1.0)[0]["5"] < out[0].survival["5"]
    pvf = PVFPredictor.from_registry(registry)
    from raypipe.io.radiograph import read_radiograph

    score = pvf.score(read_radiograph(shared_data / "xray/fo_dicom/GH342.dcm").pixels)
    assert 0.0 <= score <= 1.0 and pvf.size == (128, 64)


def test_xray_refuses_implausible_keypoints_and_missing_keypoint_model(registry: Path, shared_data: Path) -> None:
    from raypipe.io.errors import KeypointsError
    from raypipe.scoring.xray import KeypointModelUnavailable, XrayPredictor

    img = shared_data / "xray/fo_dicom/GH342.dcm"
    xp = XrayPredictor.from_registry(registry, keypoints_name="absent")
    with pytest.raises(KeypointsError, match="implausible keypoints"):
        xp.preprocess(img, dict(KP, L3=[254, 100]))
    with pytest.raises(KeypointModelUnavailable):
        xp.preprocess(img, None)
    # With the published keypoint model the points come from it; random weights may place them implausibly.
    with_model = XrayPredictor.from_registry(registry, keypoints_name="keypoints")
    try:
        inp = with_model.preprocess(img, None)
        assert inp.keypoints_source == "model" and len(inp.qc["keypoint_confidence"]) == 5
    except KeypointsError as e:
        assert e.field == "keypoints" and "implausible keypoints" in str(e)


def test_clinical_values_are_validated(registry: Path) -> None:
    from raypipe.scoring.common import ClinicalInputError, ClinicalStandardiser, parse_clinical

    std = ClinicalStandardiser(("age", "sex"), (70.0, 0.5), (10.0, 0.5))
    v, missing = std.vector({"age": 80, "sex": "F"})
    assert np.allclose(v, [1.0, 1.0]) and missing == []
    assert std.vector({})[1] == ["age", "sex"]
    with pytest.raises(ClinicalInputError):
        std.vector({"age": "old"})
    with pytest.raises(ClinicalInputError):
        parse_clinical({"a": {"nested": 1}})


def test_corrupt_weights_are_refused(registry: Path, tmp_path: Path) -> None:
    import shutil

    from raypipe.registry import RegistryError
    from raypipe.scoring.xray import PVFPredictor

    copy = tmp_path / "reg"
    shutil.copytree(registry, copy)
    f = copy / "pvf/v1/model.pt"
    f.chmod(0o644)
    f.write_bytes(f.read_bytes()[:-10] + b"0123456789")
    with pytest.raises(RegistryError, match="checksum"):
        PVFPredictor.from_registry(copy)


def test_publish_cli_hook(tmp_path: Path) -> None:
    from raypipe.registry import list_versions
    from raypipe.scoring.tiny import write_run
    from raypipe.serving.cli import publish_cli

    run = write_run(tmp_path / "run", "pvf_tiny", {"in_chans": 1})
    assert publish_cli(Namespace(run_dir=str(run), registry=str(tmp_path / "reg"), name="pvf")) == 0
    assert publish_cli(Namespace(run_dir=str(run), registry=str(tmp_path / "reg"), name="pvf")) == 0
    assert list_versions(tmp_path / "reg", "pvf") == ["v1", "v2"]
    assert json.loads((tmp_path / "reg/pvf/v2/model_meta.json").read_text())["builder"] == "pvf_tiny"


def test_future_summary_groups() -> None:
    from raypipe.scoring.future import summarise_future

    s = summarise_future(0.3, {5.0: [0.7, 0.65], 1.0: [0.2, 0.3]})
    assert [g["year"] for g in s["gpvf_by_year"]] == [1.0, 5.0]
    assert s["risk_group"] == "LH" and s["gpvf_year"] == 5.0  # patient GpVF = max over years of the seed mean
    assert s["gpvf_mean"] == pytest.approx(0.675) and s["gpvf_sd"] == pytest.approx(np.std([0.7, 0.65], ddof=1))
    assert summarise_future(0.55, {1.0: [0.1]})["risk_group"] == "HIGH"
    assert summarise_future(0.1, {1.0: [0.1, 0.2]})["risk_group"] == "LL"


def test_publish_with_undefined_metrics_writes_card(tmp_path: Path) -> None:
    """A tiny held-out set gives null CIs (one class in every resample): the model card says n/a, publish works."""
    from raypipe.registry import load_version, publish
    from raypipe.scoring.tiny import write_run

    run = write_run(tmp_path / "run", "pvf_tiny", {"in_chans": 1})
    (run / "metrics.json").write_text(json.dumps({"models": {"pvf": {
        "auroc": {"value": 0.5, "ci_low": None, "ci_high": None}, "c_index": {"value": None}}}}))
    v = publish(run, tmp_path / "reg", "pvf")
    card = (v.path / "card.md").read_text()
    assert "- pvf auroc: 0.500 (95% CI n/a-n/a)" in card and "- pvf c_index: n/a" in card
    assert load_version(tmp_path / "reg", "pvf").version == "v1"
