"""Loopback load on the Serve app: throughput and p50/p99 latency, overhead vs in-process predictors, batching gain.

Usage: `python bench/serve_load.py [--registry DIR] [--clients 16] [--xray-requests 96] [--ct-requests 16]`;
`--quick`: X-ray only, one client, served p50 vs in-process p50 (the GPU check's serving line).
Without --registry, tiny random-init models are published to a temp registry (timings then measure the
serving machinery, not a paper-sized model). Ratios are measured side by side in one run; absolute numbers
depend on the machine and its load, which is logged. Writes bench/out/serve_load.json.
"""
from __future__ import annotations

import argparse
import io
import json
import logging
import os
import socket
import statistics
import tempfile
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

from _report import figure, ratio

log = logging.getLogger("bench.serve_load")

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("RAYPIPE_SHARED_DATA", ROOT.parent / "shared" / "data"))
KP = {"L1": [250, 150], "L2": [252, 190], "L3": [254, 230], "L4": [256, 270], "L5": [258, 310]}
CLINICAL = {"age": 71, "sex": "F", "bmi": 23.5}


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in [0, 100])."""
    s = sorted(values)
    return s[min(len(s) - 1, max(0, int(round(q / 100 * len(s) + 0.5)) - 1))]


def run_load(fn: Callable[[], int], n: int, clients: int) -> dict[str, float]:
    """`n` calls over `clients` threads: throughput (req/s), p50/p99 latency (ms), error count."""
    def one(_: int) -> tuple[float, int]:
        t = time.perf_counter()
        code = fn()
        return time.perf_counter() - t, code

    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as ex:
        res = list(ex.map(one, range(n)))
    wall = time.perf_counter() - t0
    lat = [r[0] * 1000 for r in res]
    return {"requests": n, "clients": clients, "wall_s": wall, "throughput_rps": n / wall,
            "p50_ms": percentile(lat, 50), "p99_ms": percentile(lat, 99), "errors": sum(r[1] != 200 for r in res)}


def _ct_payload() -> tuple[bytes, bytes]:
    d = SHARED / "ct/totalseg_example"
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for f in sorted((d / "example_seg").iterdir()):
            z.write(f, f.name)
    return (d / "example_ct.nii.gz").read_bytes(), buf.getvalue()


def direct_baselines(registry: str, n_xray: int, n_ct: int) -> dict[str, dict[str, float]]:
    """The same work without Serve: preprocess + predict in this process, one request at a time."""
    import torch

    from raypipe.scoring.ct import CTPredictor
    from raypipe.scoring.xray import PVFPredictor, XrayPredictor

    torch.set_num_threads(1)
    xp = XrayPredictor.from_registry(registry, keypoints_name=None)
    pvf = PVFPredictor.from_registry(registry)
    ct = CTPredictor.from_registry(registry) if n_ct else None
    img = SHARED / "xray/fo_dicom/GH342.dcm"
    d = SHARED / "ct/totalseg_example"

    from raypipe.io.radiograph import read_radiograph

    def xray_once() -> int:
        inp = xp.preprocess(img, KP, CLINICAL)
        xp.predict(inp)
        pvf.predict_batch([pvf.prepare(read_radiograph(img).pixels)])
        return 200

    def ct_once() -> int:
        ct.predict(ct.preprocess(d / "example_ct.nii.gz", d / "example_seg", clinical=CLINICAL))
        return 200

    xray_once()
    out = {"xray": run_load(xray_once, n_xray, 1)}
    if n_ct:
        out["ct"] = run_load(ct_once, n_ct, 1)
    return out


def serve_app(registry: str, port: int, max_batch_size: int) -> None:
    """(Re)deploy the app with the given batch size (same name, so it replaces the previous one)."""
    from ray import serve

    from raypipe.serving.app import build_app

    opts = {"batch": {"max_batch_size": max_batch_size, "batch_wait_timeout_s": 0.0}, "max_request_bytes": 1 << 28}
    serve.run(build_app(registry, options=opts), name="raypipe", route_prefix="/")


def quick(registry: str, port: int, client: Any, xray: Callable[[], int], n: int) -> dict[str, Any]:
    """Served (max_batch_size 8) vs in-process p50 for one X-ray client, side by side; print the figures."""
    from ray import serve

    load = os.getloadavg()[0]
    serve_app(registry, port, 8)
    xray()  # warm-up
    served = run_load(xray, n, 1)
    client.close()
    serve.shutdown()
    direct = direct_baselines(registry, n, 0)["xray"]
    figure("serve_quick/xray_p50_served_1client", served["p50_ms"], "ms", requests=n, errors=served["errors"],
           load_avg_1min_at_start=round(load, 2))
    figure("serve_quick/xray_p50_inprocess_1client", direct["p50_ms"], "ms", requests=n)
    ratio("serve_quick/xray_p50_served_over_inprocess", served["p50_ms"], direct["p50_ms"])
    return {"served": served, "direct": direct}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the benchmark; log every figure and write them as JSON."""
    import httpx
    from ray import serve

    from raypipe.ray_utils import init_ray
    from raypipe.scoring.tiny import publish_tiny_models

    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--registry", default=None)
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--xray-requests", type=int, default=96)
    p.add_argument("--ct-requests", type=int, default=16)
    p.add_argument("--out", default=str(ROOT / "bench/out/serve_load.json"))
    p.add_argument("--quick", action="store_true", help="X-ray, 1 client: served vs in-process p50 only")
    p.add_argument("--quick-requests", type=int, default=16)
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    registry = a.registry or str(Path(tempfile.mkdtemp(prefix="raypipe-bench-")) / "registry")
    if not a.registry:
        publish_tiny_models(registry, which=("ct", "xray", "pvf"))
    log.info("load average at start: %s (cores: %d)", os.getloadavg(), os.cpu_count())

    os.environ.pop("RAY_ADDRESS", None)  # init_ray then starts a local Ray, never another one on this machine
    init_ray()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=600,
                          limits=httpx.Limits(max_connections=a.clients * 2))
    dcm = (SHARED / "xray/fo_dicom/GH342.dcm").read_bytes()
    study, masks = _ct_payload()
    form = {"keypoints": json.dumps(KP), "clinical": json.dumps(CLINICAL)}

    def xray() -> int:
        return client.post("/v1/xray/score", files={"image": ("x", dcm, "application/dicom")}, data=form).status_code

    def ct() -> int:
        return client.post("/v1/ct/score", files={"study": ("s", study, "application/gzip"),
                                                  "masks": ("m", masks, "application/zip")},
                           data={"clinical": json.dumps(CLINICAL)}).status_code

    results: dict[str, Any] = {"load_average_start": os.getloadavg(), "clients": a.clients}
    if a.quick:
        return quick(registry, port, client, xray, a.quick_requests)
    for bs in (8, 1):
        t = time.perf_counter()
        serve_app(registry, port, bs)
        log.info("app with max_batch_size=%d ready in %.1f s", bs, time.perf_counter() - t)
        xray(), ct()  # warm-up
        results[f"serve_bs{bs}"] = {"xray": run_load(xray, a.xray_requests, a.clients)}
        if bs == 8:
            results["serve_1client"] = {"xray": run_load(xray, max(8, a.xray_requests // 4), 1),
                                        "ct": run_load(ct, max(2, a.ct_requests // 4), 1)}
            results["serve_bs8"]["ct"] = run_load(ct, a.ct_requests, a.clients)
            model = serve.get_deployment_handle("XrayModel", app_name="raypipe")
            sizes = model.batch_sizes.remote().result()
            results["serve_bs8"]["xray_batch_sizes"] = {"mean": statistics.mean(sizes), "max": max(sizes)}
    client.close()
    serve.shutdown()
    results["direct"] = direct_baselines(registry, max(8, a.xray_requests // 4), max(2, a.ct_requests // 4))
    s8, s1, d = results["serve_bs8"], results["serve_bs1"], results["direct"]
    results["overhead"] = {
        k: {"p50_ratio_serve_vs_direct": s8[k]["p50_ms"] / d[k]["p50_ms"],
            "throughput_ratio_serve_vs_direct": s8[k]["throughput_rps"] / d[k]["throughput_rps"]} for k in ("xray", "ct")}
    results["batching_gain_xray_throughput_bs8_vs_bs1"] = s8["xray"]["throughput_rps"] / s1["xray"]["throughput_rps"]
    results["load_average_end"] = os.getloadavg()
    c1 = results["serve_1client"]
    lines = [("load_average_start", results["load_average_start"][0], "1-min load"), ("cores", os.cpu_count(), "cores")]
    for k in ("xray", "ct"):
        lines += [(f"{k}_p50_inprocess_1client", d[k]["p50_ms"], "ms"), (f"{k}_p50_served_1client", c1[k]["p50_ms"], "ms"),
                  (f"{k}_p50_served_over_inprocess_1client", c1[k]["p50_ms"] / d[k]["p50_ms"], "x"),
                  (f"{k}_rps_inprocess_1client", d[k]["throughput_rps"], "req/s"),
                  (f"{k}_rps_served_{a.clients}clients", s8[k]["throughput_rps"], "req/s"),
                  (f"{k}_rps_served_{a.clients}clients_over_inprocess_1client", s8[k]["throughput_rps"] / d[k]["throughput_rps"], "x"),
                  (f"{k}_p99_over_p50_served_{a.clients}clients", s8[k]["p99_ms"] / s8[k]["p50_ms"], "x")]
    lines += [("xray_batching_gain_bs8_vs_bs1", results["batching_gain_xray_throughput_bs8_vs_bs1"], "x"),
              ("xray_mean_batch_size_bs8", s8["xray_batch_sizes"]["mean"], "requests"),
              ("load_average_end", results["load_average_end"][0], "1-min load")]
    for name, value, unit in lines:  # JSON lines: one figure each
        figure(name, value, unit)
    for name in ("serve_bs8", "serve_bs1", "serve_1client", "direct"):
        for k, v in results[name].items():
            if isinstance(v, dict) and "throughput_rps" in v:
                log.info("%-9s %-4s n=%3d clients=%2d  %.2f req/s  p50 %.0f ms  p99 %.0f ms  errors %d", name, k,
                         v["requests"], v["clients"], v["throughput_rps"], v["p50_ms"], v["p99_ms"], v["errors"])
    log.info("X-ray batch sizes under load (bs 8): %s", results["serve_bs8"]["xray_batch_sizes"])
    for k, v in results["overhead"].items():
        log.info("overhead %s: p50 serve/direct %.2fx, throughput serve(16 clients)/direct(1 client) %.2fx", k,
                 v["p50_ratio_serve_vs_direct"], v["throughput_ratio_serve_vs_direct"])
    log.info("batching gain (X-ray throughput, max_batch_size 8 vs 1): %.2fx", results["batching_gain_xray_throughput_bs8_vs_bs1"])
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
