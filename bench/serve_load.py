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
    """The served work without Serve, in this process, one request at a time (1 torch and SimpleITK thread).

    X-ray: the upload's bytes decoded once (`read_radiograph_bytes`, as the replica does), keypoints and
    pVF input prepared by the same `XrayPreprocessor`, then DeepSurv and pVF forwards. CT: the same
    `CTPredictor` preprocessing and forward from the files.
    """
    import torch

    from raypipe.io.radiograph import read_radiograph_bytes
    from raypipe.registry import load_version
    from raypipe.scoring.ct import CTPredictor
    from raypipe.scoring.xray import PVFPredictor, XrayPredictor, XrayPreprocessor

    import SimpleITK as sitk

    torch.set_num_threads(1)  # one core, as one preprocessing replica has (its threads follow its 1 CPU)
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)
    xp = XrayPredictor.from_registry(registry, keypoints_name=None)
    pvf = PVFPredictor.from_registry(registry)
    pre = XrayPreprocessor(load_version(registry, "xray", "latest"), load_version(registry, "pvf", "latest"))
    ct = CTPredictor.from_registry(registry) if n_ct else None
    dcm = (SHARED / "xray/fo_dicom/GH342.dcm").read_bytes()
    d = SHARED / "ct/totalseg_example"

    def xray_once() -> int:
        inp = pre.from_radiograph(read_radiograph_bytes(dcm), KP, CLINICAL)
        xp.predict_batch([inp])
        pvf.predict_batch([inp.pvf_image])
        return 200

    def ct_once() -> int:
        ct.predict(ct.preprocess(d / "example_ct.nii.gz", d / "example_seg", clinical=CLINICAL))
        return 200

    xray_once()
    out = {"xray": run_load(xray_once, n_xray, 1)}
    if n_ct:
        ct_once()
        out["ct"] = run_load(ct_once, n_ct, 1)
    return out


def model_hop_rps(registry_app: str, n: int) -> dict[str, float]:
    """Throughput of the model hops alone: `n` concurrent calls straight to XrayModel and PVFModel handles."""
    from ray import serve

    pre = serve.get_deployment_handle("XrayPreprocess", app_name=registry_app)
    inp = pre.preprocess.remote((SHARED / "xray/fo_dicom/GH342.dcm").read_bytes(), KP, CLINICAL).result()
    out = {}
    for name, arg in (("XrayModel", inp), ("PVFModel", inp.pvf_image)):
        h = serve.get_deployment_handle(name, app_name=registry_app)
        for r in [h.score.remote(arg) for _ in range(n)]:  # warm-up round: every batch shape seen once
            r.result()
        t = time.perf_counter()
        for r in [h.score.remote(arg) for _ in range(n)]:
            r.result()
        out[name] = n / (time.perf_counter() - t)
    return out


def serve_app(registry: str, max_batch_size: int) -> None:
    """(Re)deploy the app with the given batch size (same name, so it replaces the previous one)."""
    from ray import serve

    from raypipe.serving.app import build_app

    opts = {"batch": {"max_batch_size": max_batch_size, "batch_wait_timeout_s": 0.0}, "max_request_bytes": 1 << 28}
    serve.run(build_app(registry, options=opts), name="raypipe", route_prefix="/")


def figures(r: dict[str, Any], clients: int) -> list[tuple[str, float, str]]:
    """(name, value, unit) of every figure, served and in-process side by side, with the issue-17 targets."""
    d, c1, s8, s1 = r["direct"], r["serve_1client"], r["serve_bs8"], r["serve_bs1"]
    out: list[tuple[str, float, str]] = [("load_average_start", r["load_average_start"][0], "1-min load"),
                                         ("cores", os.cpu_count() or 0, "cores")]
    for k in ("xray", "ct"):
        budget = 1.15 * d[k]["p50_ms"] + 10.0
        out += [(f"{k}_p50_inprocess_1client", d[k]["p50_ms"], "ms"), (f"{k}_p50_served_1client", c1[k]["p50_ms"], "ms"),
                (f"{k}_p50_served_over_inprocess_1client", c1[k]["p50_ms"] / d[k]["p50_ms"], "x"),
                (f"{k}_p50_target_1client", budget, "ms"),
                (f"{k}_p50_target_met_1client", float(c1[k]["p50_ms"] <= budget), "bool"),
                (f"{k}_rps_inprocess_1client", d[k]["throughput_rps"], "req/s"),
                (f"{k}_rps_served_{clients}clients", s8[k]["throughput_rps"], "req/s"),
                (f"{k}_rps_served_{clients}clients_over_inprocess_1client", s8[k]["throughput_rps"] / d[k]["throughput_rps"], "x"),
                (f"{k}_p50_served_{clients}clients", s8[k]["p50_ms"], "ms"),
                (f"{k}_p99_served_{clients}clients", s8[k]["p99_ms"], "ms"),
                (f"{k}_p99_over_p50_served_{clients}clients", s8[k]["p99_ms"] / s8[k]["p50_ms"], "x"),
                (f"{k}_errors_served", s8[k]["errors"] + c1[k]["errors"], "requests")]
    out += [("xray_batching_gain_end_to_end_bs8_vs_bs1", s8["xray"]["throughput_rps"] / s1["xray"]["throughput_rps"], "x")]
    for name in ("XrayModel", "PVFModel"):
        out += [(f"{name}_hop_rps_bs8", s8["model_hops"][name], "req/s"), (f"{name}_hop_rps_bs1", s1["model_hops"][name], "req/s"),
                (f"{name}_hop_batching_gain_bs8_vs_bs1", s8["model_hops"][name] / s1["model_hops"][name], "x")]
    out += [("xray_mean_batch_size_bs8_under_load", r["xray_batch_sizes"]["mean"], "requests"),
            ("cpu_seconds_per_xray_request_served", r["cpu_per_request"]["total_ms"] / 1000, "s"),
            ("load_average_end", r["load_average_end"][0], "1-min load")]
    return out


def process_cpu() -> dict[int, tuple[float, str]]:
    """CPU seconds (user + system) and name of every process of this user (Ray workers, raylet, this driver)."""
    import psutil

    me = psutil.Process().username()
    out = {}
    for p in psutil.process_iter(["cmdline", "username", "cpu_times"]):
        if p.info["username"] == me and p.info["cpu_times"] is not None:
            t = p.info["cpu_times"]
            out[p.pid] = (t.user + t.system, " ".join(p.info["cmdline"] or [])[:60])
    return out


def cpu_profile(before: dict, after: dict, requests: int) -> dict[str, Any]:
    """CPU milliseconds per request by process (Serve proxy, ingress, replicas, raylet, client) between two snapshots."""
    rows = sorted(((after[p][0] - before[p][0], after[p][1]) for p in after if p in before), reverse=True)
    per = {name.strip() or "?": round(1000 * dt / requests, 2) for dt, name in rows[:12] if dt > 0}
    return {"total_ms": 1000 * sum(dt for dt, _ in rows) / requests, "by_process_ms": per}


def quick(client: Any, xray: Callable[[], int], n: int, direct: dict[str, float], registry: str) -> dict[str, Any]:
    """Served (max_batch_size 8) vs in-process p50 for one X-ray client, side by side; print the figures."""
    from ray import serve

    load = os.getloadavg()[0]
    serve_app(registry, 8)
    xray()  # warm-up
    served = run_load(xray, n, 1)
    client.close()
    serve.shutdown()
    figure("serve_quick/xray_p50_served_1client", served["p50_ms"], "ms", requests=n, errors=served["errors"],
           load_avg_1min_at_start=round(load, 2))
    figure("serve_quick/xray_p50_inprocess_1client", direct["p50_ms"], "ms", requests=n)
    ratio("serve_quick/xray_p50_served_over_inprocess", served["p50_ms"], direct["p50_ms"])
    return {"served": served, "direct": direct}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the benchmark; print every figure as a JSON line and write them all as JSON."""
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
    results: dict[str, Any] = {"load_average_start": os.getloadavg(), "clients": a.clients}
    n1_xray, n1_ct = (a.quick_requests, 0) if a.quick else (max(16, a.xray_requests // 3), max(3, a.ct_requests // 4))
    results["direct"] = direct_baselines(registry, n1_xray, n1_ct)  # same run, before Ray starts

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

    if a.quick:
        results["quick"] = quick(client, xray, n1_xray, results["direct"]["xray"], registry)
        return _write(results, a.out)
    for bs in (8, 1):
        t = time.perf_counter()
        serve_app(registry, bs)
        log.info("app with max_batch_size=%d ready in %.1f s", bs, time.perf_counter() - t)
        run_load(xray, 2 * a.clients, a.clients), ct()  # warm-up; lets the preprocessing replicas scale out
        results[f"serve_bs{bs}"] = {"model_hops": model_hop_rps("raypipe", 64)}
        before = process_cpu()
        results[f"serve_bs{bs}"]["xray"] = run_load(xray, a.xray_requests, a.clients)
        if bs == 8:
            results["cpu_per_request"] = cpu_profile(before, process_cpu(), a.xray_requests)
            sizes = serve.get_deployment_handle("XrayModel", app_name="raypipe").batch_sizes.remote().result()
            results["xray_batch_sizes"] = {"mean": statistics.mean(sizes), "max": max(sizes)}
            results["serve_bs8"]["ct"] = run_load(ct, a.ct_requests, a.clients)
            time.sleep(5.0)  # let autoscaling settle back before the sequential runs
            results["serve_1client"] = {"xray": run_load(xray, n1_xray, 1), "ct": run_load(ct, n1_ct, 1)}
    client.close()
    serve.shutdown()
    results["load_average_end"] = os.getloadavg()
    for name, value, unit in figures(results, a.clients):  # JSON lines: one figure each
        figure(name, value, unit)
    log.info("CPU ms per X-ray request under %d-client load, by process: %s", a.clients,
             json.dumps(results["cpu_per_request"]))
    return _write(results, a.out)


def _write(results: dict[str, Any], out: str) -> dict[str, Any]:
    """Write the run's results as JSON to `out` and return them."""
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
