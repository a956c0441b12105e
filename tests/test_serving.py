"""The Serve app over real HTTP on loopback: every endpoint with real files, auth, limits, bad input, batching,
a replica killed under load, a fuzz run of malformed requests, and no patient identifiers in the logs.

One app for the module (tiny random-init models published to a temp registry; no training involved).
Client retry contract (raypipe/serving/app.py): retry on 503 only.
"""
from __future__ import annotations

import base64
import io
import json
import random
import socket
import tempfile
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

httpx = pytest.importorskip("httpx")
serve_mod = pytest.importorskip("ray.serve")

TOKEN = "test-token-7f3a"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
MAX_BYTES = 16 * 1024 * 1024
APP = "raypipe"
KP_GH342 = {"L1": [250, 150], "L2": [252, 190], "L3": [254, 230], "L4": [256, 270], "L5": [258, 310]}
CLINICAL = {"age": 71, "sex": "F", "bmi": 23.5, "glucocorticoid": False}


def _zip_dir(folder: Path, prefix: str = "") -> bytes:
    from raypipe.serving.smoke import zip_folder

    return zip_folder(folder, prefix)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def served(ray_session, tmp_path_factory, shared_data: Path) -> dict[str, Any]:
    """Publish tiny models, synthesise inputs, start Serve on a free loopback port; shut down after the module."""
    from ray import serve

    from raypipe.data.drr import synth_drr
    from raypipe.data.synth import synth_cohort
    from raypipe.scoring.tiny import publish_tiny_models
    from raypipe.serving.app import build_app

    root = tmp_path_factory.mktemp("serving")
    registry = root / "registry"
    publish_tiny_models(registry, which=("ct", "xray", "pvf", "ldm"), workdir=root / "runs")  # no keypoint model
    manifest = synth_cohort("both", root / "synth", 1, seed=3, workers=1)
    drr = synth_drr(shared_data / "ct/totalseg_example/example_ct.nii.gz", shared_data / "ct/totalseg_example/example_seg",
                    root / "drr")
    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    opts = {"api_token": TOKEN, "max_request_bytes": MAX_BYTES, "job_ttl_s": 4.0,
            "batch": {"max_batch_size": 8, "batch_wait_timeout_s": 0.1}}
    t0 = time.time()
    serve.run(build_app(str(registry), options=opts), name=APP, route_prefix="/")
    client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=300)
    info = {"client": client, "registry": registry, "root": root, "manifest": manifest, "drr": drr,
            "startup_s": time.time() - t0, "port": port, "tmp_before": set(Path(tempfile.gettempdir()).glob("raypipe-req-*"))}
    yield info
    client.close()
    serve.shutdown()


def _post(c: Any, path: str, retry_503: int = 0, **kw: Any) -> Any:
    """POST with the documented client contract: retry on 503 only."""
    for attempt in range(retry_503 + 1):
        r = c.post(path, **kw)
        if r.status_code != 503 or attempt == retry_503:
            return r
        time.sleep(min(10.0, 1.0 + attempt))
    return r


def _xray_files(path: Path, ctype: str = "application/dicom") -> dict:
    return {"image": ("upload", path.read_bytes(), ctype)}


def _assert_problem(r: Any, status: int | tuple[int, ...], field: str | None = None) -> dict:
    statuses = (status,) if isinstance(status, int) else status
    assert r.status_code in statuses, (r.status_code, r.text[:500])
    body = r.json()
    assert body["status"] == r.status_code and body["error"] and body["request_id"]
    if field is not None:
        assert body["field"] == field, body
    return body


# ------------------------------------------------------------------------------------------ basics
def test_healthz_openapi_and_models(served: dict) -> None:
    c = served["client"]
    h = c.get("/healthz")
    assert h.status_code == 200 and h.json() == {"ready": True}  # public: ready or not, nothing else
    spec = c.get("/openapi.json", headers=AUTH).json()
    for p in ("/healthz", "/v1/models", "/v1/ct/score", "/v1/xray/score", "/v1/xray/future", "/v1/jobs/{job_id}"):
        assert p in spec["paths"], p
    ct_body = spec["paths"]["/v1/ct/score"]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]
    assert {"study", "masks", "mask_labels", "clinical", "gradcam"} <= set(ct_body["properties"])
    models = c.get("/v1/models", headers=AUTH).json()["models"]
    assert models["ct"]["version"] == "v1" and models["ct"]["builder"] == "cnn_rnn_tiny"
    assert models["xray"]["version"] == "v1" and models["pvf"]["version"] == "v1"
    assert models["ldm"]["version"] == "v1" and models["ldm"]["builder"] == "diffx_tiny"
    assert models["keypoints"]["loaded"] is False and "keypoints" in models["keypoints"]["reason"]


def test_auth_required_and_constant_time_compare(served: dict) -> None:
    c = served["client"]
    assert c.get("/v1/models").status_code == 401
    assert c.get("/v1/models", headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert c.get("/v1/models", headers={"Authorization": TOKEN}).status_code == 401
    r = c.post("/v1/xray/score", files=_xray_files(Path(__file__)))
    _assert_problem(r, 401, "authorization")
    assert c.get("/v1/models", headers=AUTH).status_code == 200
    assert c.get("/healthz").status_code == 200  # health probes need no token


# ------------------------------------------------------------------------------------------ CT
def test_ct_score_real_nifti_with_gradcam(served: dict, shared_data: Path) -> None:
    d = shared_data / "ct/totalseg_example"
    r = _post(served["client"], "/v1/ct/score", headers=AUTH, retry_503=3,
              files={"study": ("ct", (d / "example_ct.nii.gz").read_bytes(), "application/gzip"),
                     "masks": ("m", _zip_dir(d / "example_seg", "example_seg/"), "application/zip")},
              data={"clinical": json.dumps({"age": 70, "sex": "F"}), "gradcam": "true"})
    assert r.status_code == 200, r.text[:500]
    body = r.json()
    assert 0.0 <= body["probability"] <= 1.0 and body["horizon_years"] == 5
    assert body["model"]["name"] == "ct" and body["model"]["version"] == "v1"
    assert {"T12", "L1", "L2", "L3", "L4"} <= set(body["qc"]["vertebrae_found"])
    assert body["qc"]["spacing_mm"] == [3.0, 3.0, 3.0] and len(body["qc"]["slices_used"]) == 14
    assert len(body["gradcam_png"]) == 14
    assert base64.b64decode(body["gradcam_png"][0])[:8] == b"\x89PNG\r\n\x1a\n"


def test_ct_score_synthetic_dicom_zip(served: dict) -> None:
    import pandas as pd

    m = served["manifest"]
    row = pd.read_csv(m).query("modality == 'CT'").iloc[0]
    base = m.parent
    r = _post(served["client"], "/v1/ct/score", headers=AUTH, retry_503=3,
              files={"study": ("s", _zip_dir(base / row["image_path"], "series/"), "application/zip"),
                     "masks": ("m", _zip_dir(base / row["mask_path"]), "application/zip")},
              data={"clinical": json.dumps({"age": float(row["age"]), "sex": row["sex"], "bmi": float(row["bmi"])})})
    assert r.status_code == 200, r.text[:500]
    assert r.json()["qc"]["clinical_missing"] == [] and "gradcam_png" not in r.json()


def test_ct_missing_vertebrae_is_422(served: dict, shared_data: Path) -> None:
    d = shared_data / "ct/totalseg_example"
    keep = io.BytesIO()
    with zipfile.ZipFile(keep, "w") as z:
        for f in sorted((d / "example_seg").iterdir()):
            if f.name not in ("vertebrae_L2.nii.gz", "vertebrae_L3.nii.gz"):
                z.write(f, f.name)
    r = served["client"].post("/v1/ct/score", headers=AUTH,
                              files={"study": ("ct", (d / "example_ct.nii.gz").read_bytes(), "application/gzip"),
                                     "masks": ("m", keep.getvalue(), "application/zip")})
    body = _assert_problem(r, 422, "masks")
    assert "L2" in body["error"] and "L3" in body["error"] and "/tmp" not in body["error"]


# ------------------------------------------------------------------------------------------ X-ray
def _check_xray(body: dict) -> None:
    surv = body["survival"]
    assert list(surv) == [str(y) for y in range(1, 11)]
    vals = [surv[str(y)] for y in range(1, 11)]
    assert all(0 <= v <= 1 for v in vals) and all(a >= b for a, b in zip(vals, vals[1:]))
    assert body["risk_5y"] == pytest.approx(1 - surv["5"])
    assert 0.0 <= body["pvf_score"] <= 1.0
    assert set(body["keypoints"]) == {"L1", "L2", "L3", "L4", "L5"}
    assert body["models"]["xray"]["version"] == "v1" and body["models"]["pvf"]["version"] == "v1"


def test_xray_score_real_dicom_with_keypoints(served: dict, shared_data: Path) -> None:
    r = _post(served["client"], "/v1/xray/score", headers=AUTH, retry_503=3,
              files=_xray_files(shared_data / "xray/fo_dicom/GH342.dcm"),
              data={"keypoints": json.dumps(KP_GH342), "clinical": json.dumps(CLINICAL)})
    assert r.status_code == 200, r.text[:500]
    body = r.json()
    _check_xray(body)
    assert body["keypoints_source"] == "request" and body["keypoints"]["L3"] == [254.0, 230.0]
    assert body["qc"]["pixel_spacing_mm"] == [0.9765625, 0.9765625]


def test_xray_score_drr_png_and_synthetic_dicom(served: dict) -> None:
    import pandas as pd

    c, drr = served["client"], served["drr"]
    r = _post(c, "/v1/xray/score", headers=AUTH, retry_503=3, files=_xray_files(Path(drr["png"]), "image/png"),
              data={"keypoints": Path(drr["keypoints"]).read_text(), "clinical": json.dumps(CLINICAL)})
    assert r.status_code == 200, r.text[:500]
    _check_xray(r.json())
    m = served["manifest"]
    row = pd.read_csv(m).query("modality == 'XR'").iloc[0]
    files = {"image": ("x", (m.parent / row["image_path"]).read_bytes(), "application/dicom"),
             "keypoints": ("k", (m.parent / row["keypoints_path"]).read_bytes(), "application/json")}
    r = _post(c, "/v1/xray/score", headers=AUTH, retry_503=3, files=files, data={"clinical": json.dumps(CLINICAL)})
    assert r.status_code == 200, r.text[:500]
    _check_xray(r.json())


def test_implausible_keypoints_422(served: dict, shared_data: Path) -> None:
    bad = dict(KP_GH342, L3=[254, 120])  # L3 above L1
    r = served["client"].post("/v1/xray/score", headers=AUTH, files=_xray_files(shared_data / "xray/fo_dicom/GH342.dcm"),
                              data={"keypoints": json.dumps(bad)})
    body = _assert_problem(r, 422, "keypoints")
    assert "not ordered" in body["error"] or "L3" in body["error"]


# ------------------------------------------------------------------------------------------ limits
def test_request_size_limit_header_and_stream(served: dict) -> None:
    c = served["client"]
    big = b"\0" * (MAX_BYTES + 1024)
    _assert_problem(c.post("/v1/xray/score", headers=AUTH, files={"image": ("x", big, "application/dicom")}), 413, "body")

    def chunks():  # no Content-Length (chunked): the limit applies while reading
        yield (b'--xyz\r\nContent-Disposition: form-data; name="image"; filename="x"\r\n'
               b"Content-Type: application/dicom\r\n\r\n")
        for _ in range(MAX_BYTES // (1 << 20) + 2):
            yield b"\0" * (1 << 20)

    r = c.post("/v1/xray/score", headers={**AUTH, "content-type": "multipart/form-data; boundary=xyz"}, content=chunks())
    _assert_problem(r, 413, "body")


def test_unsupported_content_types_415(served: dict, shared_data: Path) -> None:
    c = served["client"]
    dcm = (shared_data / "xray/fo_dicom/GH342.dcm").read_bytes()
    _assert_problem(c.post("/v1/xray/score", headers=AUTH, files={"image": ("x", dcm, "text/html")}), 415, "image")
    _assert_problem(c.post("/v1/xray/score", headers=AUTH, json={"image": "x"}), 415, "body")
    _assert_problem(c.post("/v1/ct/score", headers=AUTH, files={"study": ("s", b"hello world" * 50, "application/zip"),
                                                                "masks": ("m", b"x" * 10, "application/zip")}), 415, "study")


def test_absent_model_is_503_with_message(served: dict, shared_data: Path) -> None:
    """No keypoint model is published in this app: requests that need one get 503 naming it; the rest still works."""
    r = served["client"].post("/v1/xray/score", headers=AUTH, files=_xray_files(shared_data / "xray/fo_dicom/GH342.dcm"),
                              data={"clinical": json.dumps(CLINICAL)})
    body = _assert_problem(r, 503, "keypoints")
    assert "keypoint model" in body["error"] and r.headers.get("retry-after")
    assert served["client"].get("/healthz").status_code == 200


# ------------------------------------------------------------------------------------------ batching, failures
def _replica_actor_names(deployment: str) -> list[str]:
    import ray

    return [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
            if a["namespace"] == "serve" and f"#{deployment}#" in a["name"] and "REPLICA" in a["name"]]


def test_dynamic_batching_groups_concurrent_requests(served: dict, shared_data: Path) -> None:
    from ray import serve

    c = served["client"]
    dcm = (shared_data / "xray/fo_dicom/GH342.dcm").read_bytes()
    data = {"keypoints": json.dumps(KP_GH342), "clinical": json.dumps(CLINICAL)}
    with ThreadPoolExecutor(8) as ex:
        codes = list(ex.map(lambda _: _post(c, "/v1/xray/score", headers=AUTH, retry_503=3,
                                            files={"image": ("x", dcm, "application/dicom")}, data=data).status_code,
                            range(8)))
    assert codes == [200] * 8
    # Eight concurrent calls straight to the model deployment: the batcher must group them.
    pre = serve.get_deployment_handle("XrayPreprocess", app_name=APP)
    model = serve.get_deployment_handle("XrayModel", app_name=APP)
    inp = pre.preprocess.remote(dcm, KP_GH342, CLINICAL).result(timeout_s=120)
    before = len(model.batch_sizes.remote().result(timeout_s=60))
    responses = [model.score.remote(inp) for _ in range(8)]
    outs = [r.result(timeout_s=120) for r in responses]
    assert len({round(o["log_risk"], 6) for o in outs}) == 1
    sizes = model.batch_sizes.remote().result(timeout_s=60)[before:]
    assert sum(sizes) == 8 and max(sizes) > 1, sizes


def test_models_stay_on_the_cpu_when_the_deployment_has_no_gpu(served: dict) -> None:
    from ray import serve

    for name in ("CTModel", "XrayModel", "PVFModel", "GeneratorModel"):
        st = serve.get_deployment_handle(name, app_name=APP).status.remote().result(timeout_s=60)
        assert st["enabled"] and st["device"] == "cpu", (name, st)  # no num_gpus here: never CUDA


def test_replica_killed_mid_load_is_replaced_and_no_request_lost(served: dict, shared_data: Path) -> None:
    import ray

    c = served["client"]
    dcm = (shared_data / "xray/fo_dicom/GH342.dcm").read_bytes()
    data = {"keypoints": json.dumps(KP_GH342), "clinical": json.dumps(CLINICAL)}
    names = _replica_actor_names("XrayModel")
    assert len(names) == 1, names

    def one(_: int) -> int:
        return _post(c, "/v1/xray/score", headers=AUTH, retry_503=6, files={"image": ("x", dcm, "application/dicom")},
                     data=data).status_code

    with ThreadPoolExecutor(6) as ex:
        futures = [ex.submit(one, i) for i in range(18)]
        time.sleep(1.0)
        ray.kill(ray.get_actor(names[0], namespace="serve"), no_restart=True)
        codes = [f.result(timeout=600) for f in futures]
    assert codes == [200] * len(codes), codes
    deadline = time.time() + 300
    while time.time() < deadline and (not _replica_actor_names("XrayModel") or _replica_actor_names("XrayModel") == names):
        time.sleep(1)
    assert _replica_actor_names("XrayModel") and _replica_actor_names("XrayModel") != names
    assert one(0) == 200


# ------------------------------------------------------------------------------------------ jobs
def _wait_job(c: Any, job_id: str, timeout: float = 240) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline:
        r = c.get(f"/v1/jobs/{job_id}", headers=AUTH)
        assert r.status_code == 200, r.text[:300]
        if r.json()["status"] in ("done", "failed"):
            return r.json()
        time.sleep(0.5)
    raise AssertionError("job did not finish")


def test_future_generation_job(served: dict, shared_data: Path) -> None:
    """202 + job id; the result (BpVF, GpVF mean/SD, risk group, PNGs) is returned once, unfetched results expire."""
    from ray import serve

    c = served["client"]
    dcm = (shared_data / "xray/fo_dicom/GH342.dcm").read_bytes()
    data = {"clinical": json.dumps(CLINICAL), "years": "1,5", "seeds": "2"}
    r1 = _post(c, "/v1/xray/future", headers=AUTH, retry_503=3, files={"image": ("x", dcm, "application/dicom")}, data=data)
    r2 = _post(c, "/v1/xray/future", headers=AUTH, retry_503=3, files={"image": ("x", dcm, "application/dicom")},
               data={**data, "years": "1", "seeds": "1"})
    assert r1.status_code == 202 and r2.status_code == 202, (r1.text[:300], r2.text[:300])
    job = r1.json()
    assert job["status"] == "queued" and job["years"] == [1, 5] and job["seeds"] == [0, 1]
    body = _wait_job(c, job["job_id"])
    assert body["status"] == "done", body
    assert 0 <= body["bpvf"] <= 1 and 0 <= body["gpvf_mean"] <= 1 and body["gpvf_sd"] >= 0
    assert body["risk_group"] in ("LL", "LH", "HIGH") and [y["year"] for y in body["gpvf_by_year"]] == [1.0, 5.0]
    assert len(body["images"]) == 4 and {(i["year"], i["seed"]) for i in body["images"]} == {(1.0, 0), (1.0, 1), (5.0, 0), (5.0, 1)}
    assert base64.b64decode(body["images"][0]["png"])[:8] == b"\x89PNG\r\n\x1a\n"
    assert body["models"]["ldm"]["version"] == "v1" and body["models"]["pvf"]["version"] == "v1"
    _assert_problem(c.get(f"/v1/jobs/{job['job_id']}", headers=AUTH), 404, "job_id")  # kept until fetched once
    jobs = serve.get_deployment_handle("JobStore", app_name=APP)
    deadline = time.time() + 240
    while jobs.stats.remote().result(timeout_s=60).get("done", 0) < 1 and time.time() < deadline:
        time.sleep(0.5)
    time.sleep(5.0)  # job_ttl_s = 4 in this app: the unfetched second result expires
    _assert_problem(c.get(f"/v1/jobs/{r2.json()['job_id']}", headers=AUTH), 404, "job_id")
    _assert_problem(c.get("/v1/jobs/not-a-job", headers=AUTH), 404, "job_id")
    bad = _post(c, "/v1/xray/future", headers=AUTH, files={"image": ("x", dcm, "application/dicom")},
                data={"clinical": json.dumps({"bmi": 20}), "years": "1"})
    _assert_problem(bad, 422, "clinical.age")


def test_generation_job_survives_jobstore_restart(served: dict, shared_data: Path) -> None:
    """Kill the JobStore replica while a job is unfinished: its replacement resumes the job from the registry's
    storage and the client, polling through the restart (503 while no replica answers), gets the result."""
    import ray

    c = served["client"]
    dcm = (shared_data / "xray/fo_dicom/GH342.dcm").read_bytes()
    r = _post(c, "/v1/xray/future", headers=AUTH, retry_503=3, files={"image": ("x", dcm, "application/dicom")},
              data={"clinical": json.dumps(CLINICAL), "years": "1,5,10", "seeds": "4"})
    assert r.status_code == 202, r.text[:300]
    jid = r.json()["job_id"]
    state = json.loads((served["registry"] / ".jobs" / jid / "state.json").read_text())
    names = _replica_actor_names("JobStore")
    ray.kill(ray.get_actor(names[0], namespace="serve"), no_restart=True)
    assert state["status"] in ("queued", "running"), state  # killed mid-job, not after it
    deadline, body = time.time() + 300, None
    while time.time() < deadline:
        g = c.get(f"/v1/jobs/{jid}", headers=AUTH)
        if g.status_code == 200 and g.json()["status"] in ("done", "failed"):
            body = g.json()
            break
        assert g.status_code in (200, 503), g.text[:300]
        time.sleep(1.0)
    assert body is not None and body["status"] == "done", body
    assert len(body["images"]) == 12 and body["risk_group"] in ("LL", "LH", "HIGH")
    assert _replica_actor_names("JobStore") != names
    assert not (served["registry"] / ".jobs" / jid).exists()  # removed once fetched


# ------------------------------------------------------------------------------------------ fuzz + privacy
def _malformed_requests(dcm: bytes, nii: bytes, seed: int = 0, n: int = 240) -> list[tuple[str, dict]]:
    """A bounded, seeded list of bad requests: garbage, truncation, traversal, bombs, bad JSON, bad values."""
    rng = random.Random(seed)

    def zipped(members: dict[str, bytes]) -> bytes:
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w") as z:
            for k, v in members.items():
                z.writestr(k, v)
        return buf.getvalue()

    ct_cases = [
        lambda: {"files": {"study": ("s", rng.randbytes(rng.randint(1, 4000)), "application/zip"), "masks": ("m", b"PK", "application/zip")}},
        lambda: {"files": {"study": ("s", zipped({"../evil.dcm": b"x"}), "application/zip"), "masks": ("m", zipped({"a.nii": b"x"}), "application/zip")}},
        lambda: {"files": {"study": ("s", zipped({f"{i}.dcm": b"x" for i in range(2100)}), "application/zip"), "masks": ("m", nii, "application/gzip")}},
        lambda: {"files": {"study": ("s", b"\x1f\x8b" + rng.randbytes(500), "application/gzip"), "masks": ("m", nii, "application/gzip")}},
        lambda: {"files": {"study": ("s", nii[: rng.randint(10, len(nii) // 2)], "application/gzip"), "masks": ("m", nii, "application/gzip")}},
        lambda: {"files": {"study": ("s", zipped({"a.dcm": dcm[: rng.randint(200, len(dcm) // 2)], "b.dcm": rng.randbytes(300)}), "application/zip"),
                           "masks": ("m", zipped({"vertebrae_L1.nii.gz": nii[:100]}), "application/zip")}},
        lambda: {"files": {"study": ("s", nii, "application/gzip")}},
        lambda: {"files": {"study": ("s", nii, "application/gzip"), "masks": ("m", nii, "application/gzip")},
                 "data": {"mask_labels": rng.choice(["bogus", "{not json", "../../labels.json"])}},
        lambda: {"files": {"study": ("s", nii, "application/gzip"), "masks": ("m", nii, "application/gzip")},
                 "data": {"clinical": rng.choice(["{", "[1,2]", '{"age": "old"}', '{"sex": "X"}', '"str"', '{"a": {"b": 1}}'])}},
        lambda: {"files": {"study": ("s", nii, "application/gzip"), "masks": ("m", nii, "application/gzip")}, "data": {"gradcam": "maybe"}},
    ]
    xr_cases = [
        lambda: {"files": {"image": ("x", rng.randbytes(rng.randint(1, 3000)), rng.choice(["application/dicom", "image/png"]))}},
        lambda: {"files": {"image": ("x", dcm[: rng.randint(10, len(dcm) - 1000)], "application/dicom")},
                 "data": {"keypoints": json.dumps(KP_GH342)}},
        lambda: {"files": {"image": ("x", b"\x89PNG\r\n\x1a\n" + rng.randbytes(200), "image/png")}, "data": {"keypoints": json.dumps(KP_GH342)}},
        lambda: {"files": {"image": ("x", dcm, "application/dicom")},
                 "data": {"keypoints": rng.choice(["{", "[]", '{"L1": [1, 2]}', '{"L1": "a", "L2": [1,2], "L3": [1,2], "L4": [1,2], "L5": [1,2]}',
                                                   json.dumps({k: [0, 0] for k in KP_GH342}), json.dumps({k: [1e9, 1e9] for k in KP_GH342}),
                                                   json.dumps({k: [v[0], -v[1]] for k, v in KP_GH342.items()})])}},
        lambda: {"files": {"image": ("x", dcm, "application/dicom")}, "data": {"keypoints": json.dumps(KP_GH342), "clinical": "{"}},
        lambda: {"files": {"image": ("x", dcm, "application/dicom")}, "data": {"keypoints": json.dumps(KP_GH342), "clinical": '{"age": Infinity}'}},
        lambda: {"data": {"image": "not a file"}},
        lambda: {"content": rng.randbytes(rng.randint(0, 2000)), "headers": {"content-type": "multipart/form-data; boundary=abc"}},
        lambda: {"content": b"--abc\r\nContent-Disposition: form-data; name=\"image\"; filename=\"x\"\r\n\r\n" + rng.randbytes(100),
                 "headers": {"content-type": "multipart/form-data; boundary=abc"}},
    ]
    out = []
    for i in range(n):
        if i % 2 == 0:
            out.append(("/v1/ct/score", rng.choice(ct_cases)()))
        else:
            out.append(("/v1/xray/score", rng.choice(xr_cases)()))
    return out


def test_fuzz_malformed_requests_are_all_4xx_and_service_survives(served: dict, shared_data: Path) -> None:
    c = served["client"]
    dcm = (shared_data / "xray/fo_dicom/GH342.dcm").read_bytes()
    nii = (shared_data / "ct/tptbox_sample/sub-ct_seg-vert_label-22_msk.nii.gz").read_bytes()
    cases = _malformed_requests(dcm, nii)

    def send(case: tuple[str, dict]) -> tuple[int, Any]:
        path, kw = case
        headers = {**AUTH, **kw.pop("headers", {})}
        r = c.post(path, headers=headers, **kw)
        try:
            return r.status_code, r.json()
        except ValueError:
            return r.status_code, r.text[:200]

    with ThreadPoolExecutor(4) as ex:
        results = list(ex.map(send, cases))
    bad = [(i, s, t) for i, (s, t) in enumerate(results) if not 400 <= s < 500]
    assert not bad, bad[:5]
    assert all(isinstance(b, dict) and b.get("status") == s and b.get("error") for s, b in results)
    r = _post(c, "/v1/xray/score", headers=AUTH, retry_503=3, files={"image": ("x", dcm, "application/dicom")},
              data={"keypoints": json.dumps(KP_GH342), "clinical": json.dumps(CLINICAL)})
    assert r.status_code == 200
    assert c.get("/healthz").status_code == 200
    time.sleep(0.5)
    leftover = set(Path(tempfile.gettempdir()).glob("raypipe-req-*")) - served["tmp_before"]
    assert not leftover, leftover


def test_no_patient_identifiers_in_logs(served: dict, shared_data: Path, caplog: pytest.LogCaptureFixture) -> None:
    import logging

    import pydicom
    import ray

    src = shared_data / "xray/fo_dicom/GH342.dcm"
    ds = pydicom.dcmread(src)
    secrets = [s for s in (str(ds.get("PatientName", "")), str(ds.get("PatientID", ""))) if len(s) >= 4]
    ds.PatientName, ds.PatientID = "ZZSECRET^PATIENTNAME", "ZZSECRETID4711"
    buf = io.BytesIO()
    ds.save_as(buf)
    marked = buf.getvalue()
    secrets += ["ZZSECRET", "ZZSECRETID4711"]
    c = served["client"]
    logs_dir = Path(ray._private.worker._global_node.get_session_dir_path()) / "logs"
    # The Ray session is shared with earlier tests: read only what is written to the logs from here on.
    before = {p: p.stat().st_size for p in logs_dir.rglob("*") if p.is_file()}
    with caplog.at_level(logging.DEBUG):
        assert c.post("/v1/xray/score", headers=AUTH, files={"image": ("Doe_ZZSECRET.dcm", marked, "application/dicom")},
                      data={"keypoints": json.dumps(KP_GH342), "clinical": json.dumps(CLINICAL)}).status_code == 200
        c.post("/v1/xray/score", headers=AUTH, files={"image": ("ZZSECRET.dcm", marked[: len(marked) // 2], "application/dicom")},
               data={"keypoints": json.dumps(KP_GH342)})
        c.post("/v1/ct/score", headers=AUTH, files={"study": ("ZZSECRET.zip", _zip_one("ZZSECRET/a.dcm", marked), "application/zip"),
                                                    "masks": ("m", _zip_one("vertebrae_L1.nii.gz", b"x"), "application/zip")})
        c.post("/v1/xray/score", headers=AUTH, files={"image": ("x", src.read_bytes(), "application/dicom")},
               data={"keypoints": json.dumps(dict(KP_GH342, L3=[254, 120]))})
    time.sleep(2.0)  # let replicas flush their log files
    texts = [caplog.text] + [_read_from(p, before.get(p, 0)) for p in logs_dir.rglob("*") if p.is_file()]
    assert any("/v1/xray/score" in t for t in texts), "request logs not found: the check would be vacuous"
    for secret in secrets:
        assert not any(secret in t for t in texts), f"patient identifier {secret!r} found in logs"


def _read_from(path: Path, offset: int) -> str:
    """The text appended to a log file after `offset` bytes (at most 50 MB)."""
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(50_000_000).decode("utf-8", errors="ignore")


def _zip_one(name: str, data: bytes) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr(name, data)
    return buf.getvalue()


# ------------------------------------------------------------------------------------------ deploy config
def test_deploy_config_parses_and_names_every_deployment(served: dict) -> None:
    import yaml
    from ray import serve
    from ray.serve.schema import ServeDeploySchema

    from raypipe.serving.app import DEPLOYMENT_NAMES

    cfg = yaml.safe_load((Path(__file__).resolve().parents[1] / "serve/config.yaml").read_text())
    schema = ServeDeploySchema.model_validate(cfg) if hasattr(ServeDeploySchema, "model_validate") else ServeDeploySchema.parse_obj(cfg)
    app = schema.applications[0]
    assert app.import_path == "raypipe.serving.app:build"
    from raypipe.serving.app import ServeAppArgs

    assert ServeAppArgs.model_validate(app.args).versions  # typed args; pinned versions
    named = {d.name for d in app.deployments}
    running = set(serve.status().applications[APP].deployments)
    assert named == set(DEPLOYMENT_NAMES) == running
    models = {d.name: d for d in app.deployments}
    for name in ("CTModel", "XrayModel", "PVFModel", "GeneratorModel"):
        assert set(models[name].user_config) == {"max_batch_size", "batch_wait_timeout_s"}
