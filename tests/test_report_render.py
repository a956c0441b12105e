"""report.html is one self-contained file that renders cleanly in headless Chromium.

The page carries a tiny inline check script: resource and script errors are written into the DOM
and every image's naturalWidth is recorded as an attribute, so `chromium --dump-dom` shows whether
it rendered (no devtools protocol needed). `--screenshot` must give a non-blank PNG.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from raypipe.evaluate import evaluate
from raypipe.predictions import write_predictions
from raypipe.report import html as H

CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--disable-dev-shm-usage", "--hide-scrollbars",
]


def _chromium() -> str:
    """Path of a Chromium binary, or skip the test saying why."""
    for name in ("chromium", "chromium-browser", "/usr/bin/chromium"):
        found = shutil.which(name)
        if found:
            return found
    pytest.skip("chromium not installed: `make chromium` (apt-get install chromium) enables this test")


def _run_chromium(args: list[str], tmp_path: Path) -> subprocess.CompletedProcess[str]:
    """Run headless Chromium with an isolated profile; fail with its stderr on a non-zero exit."""
    profile = tmp_path / f"profile-{len(list(tmp_path.glob('profile-*')))}"
    cmd = [_chromium(), *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--enable-logging=stderr", "--v=0", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180, env={**os.environ, "HOME": str(tmp_path)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _dump_dom(page: Path, tmp_path: Path) -> tuple[str, list[str]]:
    """The DOM after load (scripts run) as Chromium serialises it, and the page's console messages."""
    proc = _run_chromium(["--virtual-time-budget=10000", "--dump-dom", page.as_uri()], tmp_path)
    return proc.stdout, [line for line in proc.stderr.splitlines() if ":CONSOLE" in line]


def _synthetic_predictions(n: int = 360, seed: int = 7) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Two models (log-risk with risk groups; probability) on a small Cox-model cohort."""
    rng = np.random.default_rng(seed)
    age = rng.normal(68, 8, n)
    female = rng.random(n) < 0.7
    latent = 0.05 * (age - 68) + 0.4 * female + rng.normal(0, 1.3, n)
    event_time = -np.log(rng.random(n)) / (1.5e-4 * np.exp(latent))
    censor = rng.uniform(400, 3650, n)
    time = np.maximum(np.minimum(event_time, censor), 1.0)
    event = (event_time <= censor).astype(int)
    label = np.where((event == 1) & (time <= 1825), 1.0, np.where(time > 1825, 0.0, np.nan))
    split = np.where(rng.random(n) < 0.5, "train", "test")
    good = latent + rng.normal(0, 0.3, n)
    cut = np.quantile(good, [0.5, 0.8])
    base = pd.DataFrame({
        "patient_id": [f"P{i}" for i in range(n)], "study_id": [f"S{i}" for i in range(n)], "fold": -1,
        "split": split, "time_days": time, "event": event, "fracture_5y": label, "age": age.round(1),
        "sex": np.where(female, "F", "M"), "bmi": rng.normal(24, 3.5, n).round(1),
        "smoker": (rng.random(n) < 0.2).astype(int), "site": rng.choice(["A", "B"], n),
    })
    a = base.assign(model="image <model>", score=good, score_kind="log_risk",
                    group=np.where(good >= cut[1], "HIGH", np.where(good >= cut[0], "LH", "LL")))
    b = base.assign(model="clinical", score=1 / (1 + np.exp(-(0.3 * latent + rng.normal(0, 1.5, n)))),
                    score_kind="probability")
    return a, b


def _gradcam_png(seed: int) -> bytes:
    """A small heat-map-like RGB PNG."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:64, 0:64]
    heat = np.exp(-(((xx - rng.integers(16, 48)) ** 2 + (yy - rng.integers(16, 48)) ** 2) / 150.0))
    rgb = np.stack([heat, 0.3 * heat, 1 - heat], axis=-1)
    buf = io.BytesIO()
    Image.fromarray((rgb * 255).astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _preprocessing_output(folder: Path) -> None:
    """A preprocessing folder as `raypipe preprocess` leaves it: qc.csv, one picture per study, a contact sheet."""
    from raypipe.data.qc_pictures import write_contact_sheet, write_picture

    rows = []
    for i, (status, warnings) in enumerate([("ok", ""), ("ok", "L1 touches the edge"), ("skipped", "")]):
        qc = {"patient_id": f"P{i}", "study_id": f"S{i}", "status": status, "warnings": warnings,
              "message": "vertebrae ['L3'] missing" if status == "skipped" else "", "_qc_picture": _gradcam_png(10 + i)}
        write_picture(str(folder), qc)
        rows.append(qc)
    pd.DataFrame(rows).to_csv(folder / "qc.csv", index=False)
    assert write_contact_sheet(str(folder), pd.DataFrame(rows))


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """report.html of two models, one with a gradcam/ folder beside its predictions."""
    root = tmp_path_factory.mktemp("report")
    a, b = _synthetic_predictions()
    pa = write_predictions(a, root / "image" / "predictions.parquet", {"model_name": "image", "config_hash": "abc123"})
    pb = write_predictions(b, root / "clinical" / "predictions.parquet", {"model_name": "clinical"})
    (root / "image" / "gradcam").mkdir()
    for i in range(3):
        (root / "image" / "gradcam" / f"study_{i}.png").write_bytes(_gradcam_png(i))
    _preprocessing_output(root / "shards")
    (root / "image" / "cv.json").write_text(json.dumps({"model": "image", "data": str(root / "shards")}))
    evaluate([pa, pb], root / "out", n_boot=30, seed=0)
    return root / "out" / "report.html"


class _Collector(HTMLParser):
    """Tags and attributes of a page, enough to check structure without a browser."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))


def _tags(text: str) -> list[tuple[str, dict[str, str | None]]]:
    parser = _Collector()
    parser.feed(text)
    return parser.tags


def test_report_is_self_contained(report: Path) -> None:
    text = report.read_text(encoding="utf-8")
    tags = _tags(text)
    imgs = [a for t, a in tags if t == "img"]
    assert len(imgs) == 7  # KM + numbers at risk, calibration per horizon, decision curve, ROC, td-AUROC, Grad-CAM, QC
    assert all((a.get("src") or "").startswith("data:image/png;base64,") for a in imgs)
    assert not [t for t, a in tags if t in ("link", "iframe", "object", "embed")]
    assert not [a for t, a in tags if t == "script" and a.get("src")]
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", text)
    assert "image &lt;model&gt;" in text and "image <model>" not in text  # names are escaped
    for caption in ("Discrimination of the binary outcome", "Concordance and calibration over time",
                    "Time-dependent AUROC", "Risk groups of image <model>", "Clinical characteristics by outcome",
                    "Clinical characteristics by risk group", "patients still at risk", "Decision curve",
                    "quantile groups of predicted risk at each horizon", "Preprocessing quality control",
                    "Studies with the most QC findings"):
        assert H.esc(caption) in text, caption
    assert re.search(r"shards</td><td>3</td><td>2</td><td>1</td><td>1</td><td>0</td><td>3</td>", text)
    for png in ("roc.png", "td_auroc.png", "calibration.png", "km_image_model.png", "decision_curve.png",
                "gradcam_image_model.png", "qc_contact_sheet_0.png"):
        assert (report.parent / png).stat().st_size > 1000, png


def test_report_renders_without_errors_in_chromium(report: Path, tmp_path: Path) -> None:
    dom, console = _dump_dom(report, tmp_path)
    assert not console, console
    body = re.search(r"<body([^>]*)>", dom)
    assert body, dom[:500]
    attrs = dict(re.findall(r'([\w-]+)="([^"]*)"', body.group(1)))
    assert attrs.get("data-render-check") == "done", "the page's load handler did not run"
    assert attrs.get("data-render-errors") == "0", re.findall(r'<li class="render-error">(.*?)</li>', dom)
    assert attrs.get("data-images") == "7" and attrs.get("data-images-broken") == "0"
    widths = [int(w) for w in re.findall(r'data-natural-width="(\d+)"', dom)]
    assert len(widths) == 7 and min(widths) > 100
    assert len(re.findall(r"<table", dom)) >= 6
    assert '<li class="render-error"' not in dom


def test_report_screenshot_is_not_blank(report: Path, tmp_path: Path) -> None:
    shot = tmp_path / "report.png"
    _run_chromium(["--window-size=1400,3200", f"--screenshot={shot}", report.as_uri()], tmp_path)
    with Image.open(shot) as im:
        assert im.size == (1400, 3200)
        gray = np.asarray(im.convert("L"), dtype=np.float64)
    assert gray.std() > 20  # text, tables and plots, not an empty page
    assert (gray < 100).mean() > 0.005  # some dark ink


def _find_picture(shot: np.ndarray, picture: np.ndarray) -> tuple[int, int] | None:
    """Top-left (row, col) where `picture` appears pixel for pixel in the screenshot `shot` (both RGB), else None."""
    h, w = picture.shape[:2]
    probe = picture[h // 2].tobytes()  # a row through the middle of the plot
    for y in range(h // 2, shot.shape[0] - (h - h // 2) + 1):
        at = shot[y].tobytes().find(probe)
        if at >= 0 and at % 3 == 0:
            top, left = y - h // 2, at // 3
            if np.abs(shot[top:top + h, left:left + w].astype(int) - picture.astype(int)).mean() < 1.0:
                return top, left
    return None


def test_clinical_figures_are_seen_whole_in_the_screenshot(report: Path, tmp_path: Path) -> None:
    """Kaplan-Meier with numbers at risk, calibration per horizon and the decision curve as the reader sees them."""
    shot_path = tmp_path / "full.png"
    _run_chromium(["--window-size=1400,9000", f"--screenshot={shot_path}", report.as_uri()], tmp_path)
    with Image.open(shot_path) as im:
        shot = np.asarray(im.convert("RGB"))
    places = {}
    for name in ("km_image_model.png", "calibration.png", "decision_curve.png"):
        with Image.open(report.parent / name) as im:
            picture = np.asarray(im.convert("RGB"))
        assert picture.shape[1] < 1300, f"{name} is wider than the page and would be scaled"
        places[name] = _find_picture(shot, picture)
        assert places[name] is not None, f"{name} is not shown whole and unscaled in the rendered page"
    km_top = places["km_image_model.png"][0]
    with Image.open(report.parent / "km_image_model.png") as im:
        km = np.asarray(im.convert("RGB")).astype(int)
    # the CI bands are light tints of the curve colours: many pale blue/red/green pixels, not only thin lines
    tint = (km.min(axis=2) > 170) & (km.max(axis=2) < 250) & (km.max(axis=2) - km.min(axis=2) > 12)
    assert tint.mean() > 0.03, "no confidence bands visible in the Kaplan-Meier plot"
    assert places["calibration.png"][0] > km_top and places["decision_curve.png"][0] > km_top


def test_console_errors_are_visible_to_the_check(tmp_path: Path) -> None:
    page = tmp_path / "script_error.html"
    page.write_text(H.page("script error", "<script>undefinedFunction();</script>"), encoding="utf-8")
    dom, console = _dump_dom(page, tmp_path)
    assert any("undefinedFunction" in line for line in console)
    assert "script error: Uncaught ReferenceError" in dom and 'data-render-errors="1"' in dom


def test_render_check_flags_a_broken_image(tmp_path: Path) -> None:
    page = tmp_path / "broken.html"
    page.write_text(H.page("broken", '<img src="data:image/png;base64,AAAA" alt="broken one">'), encoding="utf-8")
    dom, _ = _dump_dom(page, tmp_path)
    assert 'data-images-broken="1"' in dom
    assert "image not rendered: broken one" in dom
