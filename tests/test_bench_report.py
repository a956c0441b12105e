"""The benchmarks' output contract: one JSON figure per line, and `bench/gpu_check.sh --dry-run` keeping to it."""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(BENCH))

from _gpu import bf16_peak_tflops  # noqa: E402
from _report import figure, parse_figures, ratio  # noqa: E402


def test_figures_are_json_lines_with_name_value_unit() -> None:
    buf = io.StringIO()
    figure("a/b", 1.234567, "s", stream=buf, card="cpu")
    figure("a/count", 3, "studies", stream=buf)
    figure("a/none", float("nan"), "s", stream=buf)
    ratio("a/ratio", 3.0, 2.0, stream=buf)
    ratio("a/zero", 3.0, 0.0, stream=buf)
    lines = [json.loads(x) for x in buf.getvalue().splitlines()]
    assert lines[0] == {"name": "a/b", "value": 1.2346, "unit": "s", "card": "cpu"}
    assert lines[1]["value"] == 3 and isinstance(lines[1]["value"], int)
    assert lines[2]["value"] is None
    assert lines[3] == {"name": "a/ratio", "value": 1.5, "unit": "x"}
    assert lines[4]["value"] is None
    assert len(parse_figures("log line\n" + buf.getvalue())) == 5
    with pytest.raises(ValueError, match="missing"):
        parse_figures('{"name": "x", "value": 1}')
    with pytest.raises(ValueError, match="number"):
        parse_figures('{"name": "x", "value": "fast", "unit": "s"}')
    with pytest.raises(ValueError):
        figure("", 1.0, "s", stream=buf)


def test_bf16_peaks_of_the_lent_cards() -> None:
    assert bf16_peak_tflops("NVIDIA H100 80GB HBM3") == 989.0
    assert bf16_peak_tflops("NVIDIA H100 PCIe") == 756.0
    assert bf16_peak_tflops("NVIDIA H200") == 989.0
    assert bf16_peak_tflops("cpu") is None


@pytest.mark.slow
def test_gpu_check_dry_run_prints_only_valid_figures(tmp_path: Path) -> None:
    env = {**os.environ, "GPU_CHECK_LOGS": str(tmp_path / "logs"), "RAY_ADDRESS": ""}
    env.pop("RAY_ADDRESS")
    p = subprocess.run(["bash", str(BENCH / "gpu_check.sh"), "--dry-run"], capture_output=True, text=True,
                       timeout=470, env=env)
    assert p.returncode == 0, p.stderr[-3000:]
    lines = [x for x in p.stdout.splitlines() if x.strip()]
    assert all(x.startswith("{") for x in lines), lines
    figs = {f["name"]: f for f in parse_figures(p.stdout)}
    assert len(figs) == len(lines)
    steps = {n.split("/")[1]: f for n, f in figs.items() if n.startswith("gpu_check/") and n.endswith("/seconds")}
    assert set(steps) == {"install", "train_ct", "diffx", "fit_ct", "serve", "total"}
    assert all(f["rc"] == 0 for f in steps.values()), {k: f["rc"] for k, f in steps.items()}
    for prefix in ("train_ct/cnn_rnn_tiny/cpu/fp32/batch2/samples_per_s", "train_ct/cnn_rnn_tiny/cpu/bf16_cl/",
                   "generate/diffx_tiny/cpu_fp32/seconds_per_patient", "fit_ct/cnn_rnn_tiny/batch8/samples_per_s",
                   "serve_quick/xray_p50_served_over_inprocess"):
        hits = [f for n, f in figs.items() if n.startswith(prefix)]
        assert hits, f"no figure {prefix}* in {sorted(figs)}"
        assert all(f["value"] is not None and f["value"] > 0 for f in hits), hits


def test_memory_format_bench_times_both_formats_of_a_task() -> None:
    env = {**os.environ, "PYTHONPATH": f"{BENCH.parent}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    p = subprocess.run([sys.executable, str(BENCH / "bench_memory_format.py"), "--tasks", "deepsurv", "--steps", "1",
                        "--warmup", "0", "--threads", "1"], capture_output=True, text=True, timeout=300, env=env)
    assert p.returncode == 0, p.stderr[-3000:]
    figs = {f["name"]: f for f in parse_figures(p.stdout)}
    tag = "memory_format/deepsurv/cpu/batch64"
    assert set(figs) == {f"{tag}/contiguous_ms_per_step", f"{tag}/channels_last_ms_per_step",
                         f"{tag}/channels_last_speedup"}
    assert all(f["value"] > 0 for f in figs.values()), figs
    assert figs[f"{tag}/contiguous_ms_per_step"]["input"] == "5x64x64"
    assert "cpu_channels_last=False" in p.stderr
