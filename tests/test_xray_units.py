"""X-ray branch pieces without Ray: augmentation, survival heads, CoxPH baseline vs lifelines, report tables."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest


# ---------------------------------------------------------------------------------------------- augmentation
def _blob(shape: tuple[int, int], xy: np.ndarray, sigma: float = 1.5) -> np.ndarray:
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    return np.exp(-((xx - xy[0]) ** 2 + (yy - xy[1]) ** 2) / (2 * sigma**2)).astype(np.float32)


def test_augment_moves_keypoints_with_the_image():
    """A bright blob at a keypoint is still at the transformed keypoint after rotation, scale, flip, shift."""
    from raypipe.preprocess.augment import augment, random_affine

    size = 96
    kp = np.array([[40.0, 30.0]])
    img = _blob((size, size), kp[0])
    rng = np.random.default_rng(3)
    for _ in range(5):
        m = random_affine(size, rng, rotation_deg=20, scale_range=(0.8, 1.2), flip_prob=0.5, translate_frac=0.05)
        out, moved = augment(img, kp, m)
        peak = np.unravel_index(np.argmax(out), out.shape)
        assert np.hypot(peak[1] - moved[0, 0], peak[0] - moved[0, 1]) <= 1.0


def test_random_affine_flip_mirrors_about_the_centre():
    from raypipe.preprocess.augment import random_affine
    from raypipe.preprocess.xray import apply_affine

    m = random_affine(64, np.random.default_rng(0), rotation_deg=0, scale_range=(1, 1), flip_prob=1.0, translate_frac=0)
    np.testing.assert_allclose(apply_affine(m, np.array([[10.0, 20.0]])), [[53.0, 20.0]])


def test_square_input_round_trip_and_min_max():
    """Zero padding to a square and resizing is inverted exactly for the keypoints; pixels are min-max scaled."""
    from raypipe.preprocess.augment import square_input, to_original

    img = np.random.default_rng(0).uniform(100, 900, size=(120, 80)).astype(np.float32)
    kp = np.array([[10.0, 20.0], [70.5, 110.25]])
    sq = square_input(img, 64, kp)
    assert sq.image.shape == (64, 64) and sq.image.min() >= 0 and sq.image.max() <= 1
    assert np.all(sq.image[:, 50:] == 0)  # the padding (right of the 80 columns, scaled by 64/120)
    np.testing.assert_allclose(to_original(sq.keypoints, sq.matrix), kp, atol=1e-9)


def test_learning_rate_decays_from_lr_to_lr_min():
    from raypipe.train.keypoints import learning_rate
    from raypipe.train.xray_config import KeypointTrainConfig

    for schedule in ("cosine", "step"):
        cfg = KeypointTrainConfig(pretrained="none", epochs=20, lr=1e-3, lr_min=1e-5, lr_schedule=schedule)
        lrs = [learning_rate(cfg, e) for e in range(1, 21)]
        assert lrs[0] == pytest.approx(1e-3) and lrs[-1] == pytest.approx(1e-5)
        assert all(a >= b for a, b in zip(lrs, lrs[1:]))


# ---------------------------------------------------------------------------------------------- heads
def test_discrete_survival_is_monotone_and_in_range():
    from raypipe.models.survival_heads import discrete_survival, step_at

    logits = np.random.default_rng(0).normal(size=(6, 8))
    for head in ("logistic_hazard", "deephit"):
        s = discrete_survival(head, logits)
        assert s.shape == (6, 8) and np.all(np.diff(s, axis=1) <= 1e-12) and np.all((s >= 0) & (s <= 1))
    cuts = np.arange(8) * 100.0
    at = step_at(cuts, discrete_survival("logistic_hazard", logits), [-1.0, 0.0, 150.0, 10_000.0])
    assert np.all(at[:, 0] == 1.0)


@pytest.mark.parametrize("head", ["logistic_hazard", "deephit"])
def test_marginal_logits_give_the_kaplan_meier_curve(head):
    """Discrete heads start at the training rows' Kaplan-Meier curve on the grid (lifelines on the same indices)."""
    from lifelines import KaplanMeierFitter

    from raypipe.models.survival_heads import discrete_survival, marginal_logits

    rng = np.random.default_rng(3)
    idx = rng.integers(0, 8, 300)
    event = (rng.random(300) < 0.4).astype(float)
    bias = marginal_logits(head, idx, event, 8)
    km = KaplanMeierFitter().fit(idx, event).survival_function_at_times(np.arange(8)).to_numpy()
    np.testing.assert_allclose(discrete_survival(head, bias[None])[0], km, atol=2e-3)


def test_coxtime_baseline_equals_breslow_for_time_constant_g():
    """With g(x, t) = g(x) Cox-Time's estimator is the Breslow estimator."""
    from raypipe.metrics import breslow_baseline
    from raypipe.models.survival_heads import coxtime_baseline, coxtime_survival

    rng = np.random.default_rng(1)
    n = 60
    t = rng.integers(1, 40, n).astype(float)
    e = (rng.random(n) < 0.6).astype(float)
    g = rng.normal(size=n)
    times = np.unique(t[e > 0])
    h0 = coxtime_baseline(np.repeat(g[:, None], len(times), 1), t, e, times)
    s = coxtime_survival(np.repeat(g[:, None], len(times), 1), times, h0, [10.0, 30.0])
    ref = breslow_baseline(t, e.astype(int), g).survival(g, [10.0, 30.0])
    np.testing.assert_allclose(s, ref, rtol=1e-6, atol=1e-9)


def test_head_networks_shapes():
    import torch

    from raypipe.models.survival_heads import build_head_model

    x, c = torch.randn(3, 5, 64, 64), torch.randn(3, 2)
    kw = {"n_clinical": 2, "in_chans": 5, "dropout": 0.0}
    assert build_head_model("cox", "deepsurv_tiny", kw).eval()(x, c).shape == (3,)
    assert build_head_model("deephit", "deepsurv_tiny", kw, 7).eval()(x, c).shape == (3, 7)
    net = build_head_model("coxtime", "deepsurv_tiny", kw).eval()
    assert net(x, c, torch.zeros(3)).shape == (3,)
    clin = build_head_model("logistic_hazard", "deepsurv_tiny", {"n_clinical": 2, "backbone": None}, 5).eval()
    assert clin(None, c).shape == (3, 5)


# ---------------------------------------------------------------------------------------------- CoxPH
def _clinical_frame(n: int = 300, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    age = rng.normal(68, 8, n)
    female = rng.random(n) < 0.7
    bmi = rng.normal(24, 3.5, n)
    gc = (rng.random(n) < 0.15).astype(int)
    sec = (rng.random(n) < 0.1).astype(int)
    lp = 0.035 * (age - 68) + 0.3 * female - 0.03 * (bmi - 24) + 0.6 * gc + 0.3 * sec
    t_event = 3000 * rng.exponential(size=n) * np.exp(-lp)
    cens = rng.uniform(300, 3650, n)
    return pd.DataFrame({
        "patient_id": [f"P{i}" for i in range(n)], "study_id": [f"S{i}" for i in range(n)],
        "time_days": np.ceil(np.minimum(t_event, cens)), "event": (t_event <= cens).astype(int),
        "age": age, "sex": np.where(female, "F", "M"), "bmi": bmi, "glucocorticoid": gc,
        "secondary_osteoporosis": sec, "frax_mof": rng.uniform(5, 30, n),
        "split": np.where(rng.random(n) < 0.7, "train", "test"),
    })


def test_coxph_baseline_agrees_with_lifelines():
    """Same coefficients, log-partial hazards and survival as lifelines' CoxPHFitter on the encoded data."""
    from lifelines import CoxPHFitter

    from raypipe.baselines.coxph import CoxPHBaseline

    df = _clinical_frame()
    cols = ["age", "sex", "bmi", "glucocorticoid", "secondary_osteoporosis"]
    ours = CoxPHBaseline(cols).fit(df)
    enc = df[cols].assign(sex=(df["sex"] == "F").astype(float), time_days=df["time_days"], event=df["event"])
    ref = CoxPHFitter().fit(enc, duration_col="time_days", event_col="event")
    np.testing.assert_allclose(ours.params_[cols].to_numpy(), ref.params_[cols].to_numpy(), rtol=1e-6)
    np.testing.assert_allclose(ours.log_risk(df), ref.predict_log_partial_hazard(enc[cols]).to_numpy(), rtol=1e-6)
    np.testing.assert_allclose(ours.survival(df.head(5), [365.0, 1826.0]),
                               ref.predict_survival_function(enc[cols].head(5), times=[365.0, 1826.0]).to_numpy().T,
                               rtol=1e-6)


def test_clinical_baselines_write_prediction_rows():
    from raypipe.baselines.coxph import fit_clinical_baselines
    from raypipe.predictions import validate_predictions

    df = _clinical_frame(seed=2)
    preds = validate_predictions(fit_clinical_baselines(df, train_splits=("train",)))
    assert set(preds["model"]) == {"coxph_m1", "coxph_m2", "coxph_m3", "frax_mof"}
    assert (preds["split"] == "test").all()
    assert preds.groupby("model").size().nunique() == 1 and preds["risk_5y"].dropna().between(0, 1).all()


# ---------------------------------------------------------------------------------------------- report
def test_xray_tables_in_evaluation_and_report(tmp_path):
    """Table 2 rows for variant-named models and the C-index comparison (all and women) in report.html."""
    from raypipe.evaluate import evaluate_frame
    from raypipe.predictions import validate_predictions
    from raypipe.report import build_report

    df = _clinical_frame(400, seed=3)
    df["fracture_5y"] = np.where(df["event"].eq(1) & (df["time_days"] <= 1826), 1.0,
                                 np.where(df["time_days"] > 1826, 0.0, np.nan))
    rng = np.random.default_rng(0)
    truth = 0.035 * (df["age"] - 68) + 0.6 * df["glucocorticoid"]
    parts = []
    names = ["coxph_m1", "deepsurv_noimg_m1", "deepsurv_img_m1", "coxph_m3", "deepsurv_img_m3", "deepsurv_imgonly",
             "deepsurv_imgonly_full_l1l5", "deepsurv_imgonly_patches_l1l5"]
    for i, name in enumerate(names):
        parts.append(df.assign(model=name, score=truth + rng.normal(0, 0.2 + 0.05 * i, len(df)),
                               score_kind="log_risk", fold=-1))
    frame = validate_predictions(pd.concat(parts, ignore_index=True))
    ev = evaluate_frame(frame, reference_model="coxph_m1", n_boot=30)
    titles = [t.title for t in ev.xray_tables]
    assert len(ev.xray_tables) == 2, titles
    table2, cidx = ev.xray_tables
    assert [r[0] for r in table2.rows] == ["L1-L5 without masks", "L1-L5 patches without masks"]
    assert [r[2] for r in cidx.rows] == ["coxph_m1", "deepsurv_noimg_m1", "deepsurv_img_m1", "coxph_m3",
                                         "deepsurv_img_m3", "deepsurv_imgonly"]
    assert "C-index, women (95% CI)" in cidx.header and cidx.rows[0][4] == "Reference"
    path = build_report(ev, tmp_path)
    html = open(path).read()
    assert "C-index of CoxPH and DeepSurv" in html and "L1-L5 patches without masks" in html


def test_duration_index_of_all_censored_and_empty_batches():
    """A batch without events (pycox's binning alone fails on one) gets the indices the rows get in any batch."""
    import numpy as np

    from raypipe.train.deepsurv import duration_index

    cuts = np.linspace(0.0, 3000.0, 10)
    t, e = np.array([100.0, 2000.0, 2500.0, 900.0]), np.array([1.0, 0.0, 0.0, 1.0])
    mixed = duration_index(cuts, t, e)
    censored = duration_index(cuts, t[1:3], e[1:3])
    np.testing.assert_array_equal(censored, mixed[1:3])
    assert duration_index(cuts, np.array([]), np.array([])).shape == (0,)


def test_flip_shift_moves_each_sample_as_asked() -> None:
    """flip_shift: per-sample left-right flip and (dy, dx) translation of a whole batch, border replicated."""
    from raypipe.data.collate import StudyMoves, study_keys
    from raypipe.preprocess.augment import flip_shift

    x = np.arange(2 * 3 * 5 * 6, dtype=np.float32).reshape(2, 3, 5, 6)  # (B, channels/slices, H, W)
    y = flip_shift(x, np.array([False, True]), np.array([[1, -2], [0, 0]]))
    assert y.shape == x.shape and y.dtype == x.dtype
    np.testing.assert_array_equal(y[0, :, 1:, :4], x[0, :, :4, 2:])  # content moved down 1, left 2
    np.testing.assert_array_equal(y[0, :, 0, :4], x[0, :, 0, 2:])  # top row replicated
    np.testing.assert_array_equal(y[0, :, 1:, 4:], np.repeat(x[0, :, :4, 5:], 2, axis=-1))  # right edge replicated
    np.testing.assert_array_equal(y[1], x[1, :, :, ::-1])  # flipped, every channel alike
    np.testing.assert_array_equal(flip_shift(x, np.zeros(2, bool), np.zeros((2, 2), int)), x)
    with pytest.raises(ValueError, match="does not fit"):
        flip_shift(x, np.zeros(2, bool), np.array([[5, 0], [0, 0]]))
    with pytest.raises(ValueError, match="B flips"):
        flip_shift(x, np.zeros(3, bool), np.zeros((2, 2), int))
    keys = study_keys([f"S{i}" for i in range(400)])
    flips, shifts = StudyMoves(0.5, 0.05, seed=0).draw(keys, epoch=1, width=60)  # up to 3 px
    assert 120 < flips.sum() < 280 and set(np.unique(shifts)) == set(range(-3, 4))
    again, _ = StudyMoves(0.5, 0.05, seed=0).draw(keys, epoch=1, width=60)
    other, _ = StudyMoves(0.5, 0.05, seed=0).draw(keys, epoch=2, width=60)
    assert (again == flips).all() and (other != flips).any()  # fixed by (seed, epoch, study)
    assert not StudyMoves() and StudyMoves(0.0, 0.0).apply(x.copy(), keys[:2], 1).tolist() == x.tolist()


def test_deepsurv_batches_augment_training_only() -> None:
    """XrayBatch flips/shifts per (seed, epoch, study) when asked; the scoring collate leaves the input alone."""
    import torch

    from raypipe.data.collate import StudyMoves
    from raypipe.train.deepsurv import XrayBatch

    rng = np.random.default_rng(1)
    batch = {"study_id": np.array(["A", "B", "C", "D"]), "image": rng.random((4, 5, 32, 32)).astype(np.float32),
             "time_days": np.array([100.0, 200, 300, 400]), "event": np.array([1.0, 0, 1, 0])}
    plain = XrayBatch(None, True, None)(batch)["x"]
    assert torch.equal(plain, torch.from_numpy(batch["image"]))
    moves = StudyMoves(0.5, 0.1, seed=0)
    aug = XrayBatch(None, True, None, moves=moves, epoch=1)
    a1, a2 = aug(batch)["x"], aug(batch)["x"]
    assert torch.equal(a1, a2) and not torch.equal(a1, plain)  # seeded per study and epoch
    other = XrayBatch(None, True, None, moves=moves, epoch=2)(batch)["x"]
    assert not torch.equal(other, a1)
