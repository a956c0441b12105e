"""A short end-to-end run of the Serve app: start it over a registry, score one CT and one radiograph, stop.

Used by `raypipe demo` (its serving step); it talks to the app over real HTTP on loopback, exactly as a
client would (multipart uploads, the documented retry-on-503 contract), and prints what came back.
"""
from __future__ import annotations

import io
import json
import socket
import time
import zipfile
from pathlib import Path
from typing import Any

APP_NAME = "raypipe-demo"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def zip_folder(folder: Path, prefix: str = "") -> bytes:
    """A folder (a DICOM series or a mask folder) as zip bytes, the upload format of `/v1/ct/score`."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        for f in sorted(folder.rglob("*")):
            if f.is_file():
                z.write(f, prefix + str(f.relative_to(folder)))
    return buf.getvalue()


def _post(client: Any, path: str, retries: int = 5, **kw: Any) -> Any:
    """POST with the client contract of `raypipe.serving.app`: retry on 503 only (a replica starting)."""
    for attempt in range(retries + 1):
        r = client.post(path, **kw)
        if r.status_code != 503 or attempt == retries:
            return r
        time.sleep(1.0 + attempt)
    return r


def _ct_request(manifest: Path, real_ct: tuple[Path, Path] | None) -> tuple[str, dict, dict]:
    """(description, files, form) for /v1/ct/score: the real CT when given, else the cohort's first CT."""
    import pandas as pd

    if real_ct is not None:
        ct, masks = real_ct
        files = {"study": ("ct.nii.gz", ct.read_bytes(), "application/gzip"),
                 "masks": ("masks.zip", zip_folder(masks, "masks/"), "application/zip")}
        return f"real CT {ct.name}", files, {"clinical": json.dumps({"age": 70, "sex": "F"})}
    row = pd.read_csv(manifest, dtype=str).query("modality == 'CT'").iloc[0]
    base = manifest.parent
    files = {"study": ("series.zip", zip_folder(base / row["image_path"], "series/"), "application/zip"),
             "masks": ("masks.zip", zip_folder(base / row["mask_path"]), "application/zip")}
    clinical = {"age": float(row["age"]), "sex": row["sex"], "bmi": float(row["bmi"])}
    return f"synthetic CT {row['study_id']}", files, {"clinical": json.dumps(clinical)}


def _xray_request(manifest: Path) -> tuple[str, dict, dict]:
    """(description, files, form) for /v1/xray/score: the cohort's first radiograph with its keypoints file."""
    import pandas as pd

    row = pd.read_csv(manifest, dtype=str).query("modality == 'XR'").iloc[0]
    base = manifest.parent
    files = {"image": ("xr.dcm", (base / row["image_path"]).read_bytes(), "application/dicom"),
             "keypoints": ("kp.json", (base / row["keypoints_path"]).read_bytes(), "application/json")}
    clinical = {"age": float(row["age"]), "sex": row["sex"], "bmi": float(row["bmi"])}
    return f"synthetic radiograph {row['study_id']}", files, {"clinical": json.dumps(clinical)}


def score_over_http(registry: str | Path, manifest: str | Path, real_ct: tuple[Path, Path] | None = None,
                    timeout_s: float = 300.0) -> str:
    """Start Serve on a free loopback port, score one CT and one radiograph, shut down; returns a summary."""
    import httpx
    from ray import serve

    from raypipe.ray_utils import init_ray
    from raypipe.serving.app import build_app

    init_ray()
    manifest = Path(manifest)
    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    lines: list[str] = []
    try:
        t0 = time.perf_counter()
        serve.run(build_app(str(registry)), name=APP_NAME, route_prefix="/")
        lines.append(f"app up on http://127.0.0.1:{port} in {time.perf_counter() - t0:.1f} s")
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=timeout_s) as c:
            models = c.get("/v1/models").json()["models"]
            lines.append("models: " + ", ".join(f"{k} {v['version']}" if v.get("loaded", True) else f"{k} (off)"
                                                for k, v in models.items()))
            what, files, form = _ct_request(manifest, real_ct)
            r = _post(c, "/v1/ct/score", files=files, data=form)
            lines.append(f"POST /v1/ct/score ({what}) -> {r.status_code} " + _brief(r, ("probability", "horizon_years")))
            what, files, form = _xray_request(manifest)
            r = _post(c, "/v1/xray/score", files=files, data=form)
            lines.append(f"POST /v1/xray/score ({what}) -> {r.status_code} "
                         + _brief(r, ("log_risk", "risk_5y", "pvf_score", "keypoints_source")))
        if any(" -> 200 " not in line for line in lines if line.startswith("POST")):
            raise RuntimeError("the serving step got an error answer:\n" + "\n".join(lines))
    finally:
        serve.delete(APP_NAME)
        serve.shutdown()
    lines.append("Serve shut down")
    return "\n".join(lines)


def _brief(response: Any, keys: tuple[str, ...]) -> str:
    """A few fields of a JSON answer (plus the model version), or the error text."""
    try:
        body = response.json()
    except ValueError:
        return response.text[:300]
    if response.status_code != 200:
        return json.dumps(body)[:500]
    picked = {k: body[k] for k in keys if k in body}
    if isinstance(body.get("model"), dict):
        picked["model"] = f"{body['model'].get('name')} {body['model'].get('version')}"
    for name, info in (body.get("models") or {}).items():
        picked.setdefault("models", []).append(f"{name} {info.get('version')}")
    return json.dumps(picked)
