"""The HTTP API (DESIGN.md) as a FastAPI ingress composed over the scoring deployments, and `build_app`.

Request path: guard middleware (request id, bearer token, body size) -> form parsing and content
checks in the ingress -> preprocessing deployment -> batched model deployment(s) -> JSON. Every
failure a client can cause is a 4xx JSON `{"error", "field", "status", "request_id"}`; anything else
is a 500 JSON with only the request id. Logs carry request ids, routes, sizes, statuses and timings,
never file names, form values or DICOM header fields.

Retry contract: the ingress and the preprocessing replicas retry a model call whose replica died (the inputs are
already-checked arrays and scoring is pure, so repeating it is safe), so a model replica killed
mid-request costs latency, not the request. If retries run out the answer is 503 with `Retry-After`;
clients retry on 503 only (never on other statuses). Calls that parse uploaded bytes (preprocessing)
are never retried: when such a replica dies the upload itself may be the cause, so the answer is 422
naming the field, and one hostile upload cannot take down replica after replica.
"""
import hmac
import json
import logging
import time
import uuid
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from ray import serve

from raypipe.serving.deployments import (
    CTModel,
    CTPreprocess,
    GeneratorModel,
    JobStore,
    PVFModel,
    XrayModel,
    XrayPreprocess,
    call,
)
from raypipe.serving.options import ServeOptions
from raypipe.serving.payloads import check_clinical_ranges, first_non_finite, int_list, loads_bounded
from raypipe.serving.problems import ServingError, as_serving_error
from raypipe.serving.uploads import (
    DICOM_TYPES,
    IMAGE_TYPES,
    JSON_TYPES,
    NIFTI_TYPES,
    ZIP_TYPES,
    BodyTooLarge,
    check_content_type,
)

log = logging.getLogger("ray.serve.raypipe")  # a child of Serve's logger: lands in the replica logs

DEPLOYMENT_NAMES: tuple[str, ...] = ("ApiIngress", "CTPreprocess", "XrayPreprocess", "CTModel", "XrayModel",
                                     "PVFModel", "GeneratorModel", "JobStore")
PUBLIC_PATHS = ("/healthz",)
STUDY_TYPES = tuple(dict.fromkeys(ZIP_TYPES + NIFTI_TYPES))
RADIOGRAPH_TYPES = tuple(dict.fromkeys(DICOM_TYPES + IMAGE_TYPES))


# ------------------------------------------------------------------------------------------ middleware
class GuardMiddleware:
    """Pure ASGI guard: request id, bearer-token auth (constant-time), and a body limit on header and stream."""

    def __init__(self, app: Any, api: FastAPI) -> None:
        self.app, self.api = app, api

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        settings = getattr(self.api.state, "settings", None) or {}
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        rid = _request_id(headers.get("x-request-id"))
        scope.setdefault("state", {})["request_id"] = rid
        t0 = time.perf_counter()
        status_box = {"status": 0}

        async def send_logged(message: dict) -> None:
            if message["type"] == "http.response.start":
                status_box["status"] = message["status"]
                message.setdefault("headers", []).append((b"x-request-id", rid.encode()))
            await send(message)

        path = scope.get("path", "")
        limit = int(settings.get("max_request_bytes", 1 << 62))
        try:
            token = settings.get("api_token")
            if token and path not in PUBLIC_PATHS and not _token_ok(headers.get("authorization", ""), token):
                return await _send_json(send_logged, 401, {"error": "missing or invalid bearer token", "field": "authorization",
                                                           "status": 401, "request_id": rid},
                                        extra=[(b"www-authenticate", b"Bearer")])
            length = headers.get("content-length")
            if length is not None and (not length.isdigit() or int(length) > limit):
                return await _send_json(send_logged, 413 if length.isdigit() else 400,
                                        {"error": f"request body larger than {limit} bytes" if length.isdigit()
                                         else "invalid Content-Length", "field": "body",
                                         "status": 413 if length.isdigit() else 400, "request_id": rid})
            seen = {"n": 0}

            async def limited_receive() -> dict:
                message = await receive()
                if message["type"] == "http.request":
                    seen["n"] += len(message.get("body", b""))
                    if seen["n"] > limit:
                        raise BodyTooLarge(f"request body larger than {limit} bytes")
                return message

            scope["state"]["body_bytes"] = seen
            try:
                await self.app(scope, limited_receive, send_logged)
            except BodyTooLarge as e:
                if status_box["status"] == 0:
                    await _send_json(send_logged, 413, {"error": str(e), "field": "body", "status": 413, "request_id": rid})
        finally:
            log.info("request %s %s %s bytes=%s status=%s %.0f ms", rid, scope.get("method"), path,
                     headers.get("content-length", "?"), status_box["status"], 1000 * (time.perf_counter() - t0))


def _request_id(given: str | None) -> str:
    """The client's X-Request-Id when it is a short safe token (never echo arbitrary text), else a new one."""
    if given and len(given) <= 64 and all(c.isalnum() or c in "-_." for c in given):
        return given
    return uuid.uuid4().hex


def _token_ok(header: str, token: str) -> bool:
    """Constant-time bearer check."""
    scheme, _, value = header.partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(value.strip().encode(), token.encode())


async def _send_json(send: Any, status: int, body: dict, extra: list | None = None) -> None:
    data = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]
                + (extra or [])})
    await send({"type": "http.response.body", "body": data})


class SafeJSONResponse(JSONResponse):
    """JSON that never fails to render: ASCII escapes (lone surrogates survive) and NaN refused upstream."""

    def render(self, content: Any) -> bytes:
        """Serialise with ensure_ascii (no UnicodeEncodeError) and allow_nan=False (strict JSON)."""
        return json.dumps(content, ensure_ascii=True, allow_nan=False, separators=(",", ":")).encode("ascii")


# ------------------------------------------------------------------------------------------ FastAPI app
api = FastAPI(
    title="raypipe scoring API",
    version="1",
    description="Fracture-risk scoring from CT and spine radiographs (research use). Bearer token when configured.",
)
api.add_middleware(GuardMiddleware, api=api)


def _problem(status: int, message: str, field: str | None, request: Request,
             headers: dict[str, str] | None = None) -> JSONResponse:
    rid = request.scope.get("state", {}).get("request_id")
    return SafeJSONResponse({"error": message, "field": field, "status": status, "request_id": rid},
                            status_code=status, headers=headers)


@api.exception_handler(Exception)
async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    """Catch-all: a bug answers 500 JSON with the request id only (details stay in the server log)."""
    log.error("request %s failed: %s", request.scope.get("state", {}).get("request_id"), type(exc).__name__,
              exc_info=exc)
    return _problem(500, "internal error", None, request)


async def _respond(request: Request, work: Any) -> JSONResponse:
    """Run an endpoint body; input errors -> 4xx JSON, dead replicas -> 503 + Retry-After, bugs -> 500 JSON."""
    try:
        status, body = await work
        bad = first_non_finite(body)
        if bad is not None:  # e.g. extreme inputs overflowing the model: never a NaN in a response
            raise ServingError(422, f"the inputs give a non-finite result ({bad}); check the image and clinical values",
                               "body")
        rid = request.scope.get("state", {}).get("request_id")
        return SafeJSONResponse({"request_id": rid, **body}, status_code=status)
    except BodyTooLarge as e:
        return _problem(413, str(e), "body", request)
    except ServingError as e:
        headers = {"Retry-After": "2"} if e.status in (503, 429) else None
        return _problem(e.status, e.message, e.field, request, headers)
    except Exception as e:  # noqa: BLE001
        problem = as_serving_error(e)
        if problem is not None:
            return _problem(problem.status, problem.message, problem.field, request)
        from starlette.exceptions import HTTPException
        from starlette.formparsers import MultiPartException

        if _caused_by(e, BodyTooLarge):
            return _problem(413, "request body larger than the configured limit", "body", request)
        if isinstance(e, MultiPartException):
            return _problem(400, f"malformed multipart body: {e.message}", "body", request)
        if isinstance(e, HTTPException) and 400 <= e.status_code < 500:  # Starlette's own form errors
            return _problem(e.status_code, f"malformed multipart body: {e.detail}", "body", request)
        return await _unexpected(request, e)


def _client_key(request: Request, token: str | None) -> str:
    """Who submits a job, for per-client quotas: the peer address plus a hash of the bearer token used."""
    import hashlib

    peer = request.client.host if request.client else "?"
    auth = request.headers.get("authorization", "") if token else ""
    return hashlib.sha256(f"{peer}|{auth}".encode("utf-8", "replace")).hexdigest()[:16]


def _caused_by(exc: BaseException, kind: type) -> bool:
    """True when `kind` is anywhere in the exception's cause/context chain."""
    seen = 0
    while exc is not None and seen < 16:
        if isinstance(exc, kind):
            return True
        exc = exc.__cause__ or exc.__context__
        seen += 1
    return False


UPLOAD_SPOOL_BYTES = 32 * 1024 * 1024  # file parts up to this stay in memory while the form is parsed


def keep_uploads_in_memory(limit: int) -> None:
    """File parts up to `limit` bytes are parsed into memory, not a temp file (Starlette spools above 1 MiB).

    Every part is read into memory right after parsing anyway (the bytes go to a preprocessing replica),
    so a temp file only adds a write, a read and a thread hop per 64 KiB chunk; the body limit
    (`max_request_bytes`, checked while the body streams in) still bounds what one request holds.
    """
    from starlette.formparsers import MultiPartParser

    MultiPartParser.spool_max_size = int(limit)


def _form(request: Request) -> Any:
    """Parse a multipart form with part-count limits (use as `async with`); anything else is 415."""
    ctype = request.headers.get("content-type", "")
    if not ctype.lower().startswith("multipart/form-data"):
        raise ServingError(415, f"expected multipart/form-data, got {ctype.split(';')[0] or '(none)'!r}", "body")
    return request.form(max_files=8, max_fields=16)


async def _file(form: Any, field: str, allowed: tuple[str, ...], required: bool = True) -> bytes | None:
    """Bytes of a file part (content type checked); 400 when required and missing or sent as text."""
    part = form.get(field)
    if part is None or part == "":
        if required:
            raise ServingError(400, f"missing file part {field!r}", field)
        return None
    if isinstance(part, str):
        raise ServingError(400, f"{field!r} must be a file part", field)
    check_content_type(field, part.content_type, allowed)
    data = await part.read()
    if not data:
        raise ServingError(400, "empty file", field)
    return data


async def _json_field(form: Any, field: str) -> Any:
    """A JSON value sent as a text field or a JSON file part; None when absent."""
    part = form.get(field)
    if part is None or part == "":
        return None
    if isinstance(part, str):
        raw: bytes | str = part
    else:
        check_content_type(field, part.content_type, JSON_TYPES)
        raw = await part.read((1 << 20) + 1)
    return loads_bounded(raw, field)


def _clinical(value: Any) -> dict[str, Any]:
    from raypipe.scoring.common import ClinicalInputError, parse_clinical

    try:
        return check_clinical_ranges(parse_clinical(value))
    except ClinicalInputError as e:
        raise ServingError(422, e.reason, e.field) from None


def _bool_field(form: Any, field: str) -> bool:
    v = form.get(field)
    if v is None or v == "":
        return False
    if not isinstance(v, str) or v.strip().lower() not in ("true", "false", "1", "0", "yes", "no"):
        raise ServingError(400, f"{field} must be true or false", field)
    return v.strip().lower() in ("true", "1", "yes")


def _int_list(form: Any, field: str, default: list[int] | None, lo: int, hi: int, max_len: int) -> list[int]:
    v = form.get(field)
    if v is None or v == "":
        if default is None:
            raise ServingError(400, f"missing field {field!r}", field)
        return default
    return int_list(v, field, lo, hi, max_len)


_STUDY_DOC = {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
    "type": "object", "required": ["study", "masks"], "properties": {
        "study": {"type": "string", "format": "binary", "description": "zip of one DICOM series, or NIfTI (.nii/.nii.gz)"},
        "masks": {"type": "string", "format": "binary", "description": "zip of a TotalSegmentator folder, or a multilabel NIfTI"},
        "mask_labels": {"type": "string", "description": "multilabel convention: verse | totalseg | JSON label map"},
        "body_mask": {"type": "string", "format": "binary", "description": "optional vertebral-body mask (NIfTI)"},
        "clinical": {"type": "string", "description": "JSON object, e.g. {\"age\": 71, \"sex\": \"F\"}"},
        "gradcam": {"type": "boolean", "description": "return Grad-CAM PNGs (base64), one per slice"}}}}}}}
_XRAY_PROPS = {
    "image": {"type": "string", "format": "binary", "description": "radiograph: DICOM, PNG or JPEG"},
    "keypoints": {"type": "string", "description": "JSON {\"L1\": [x, y], ..., \"L5\": [x, y]}; model-predicted when absent"},
    "clinical": {"type": "string", "description": "JSON object of clinical variables"}}
_XRAY_DOC = {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
    "type": "object", "required": ["image"], "properties": _XRAY_PROPS}}}}}
_FUTURE_DOC = {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
    "type": "object", "required": ["image", "clinical"], "properties": {
        **_XRAY_PROPS,
        "clinical": {"type": "string", "description": "JSON object: age and sex (required); when the Diff-X model "
                     "was trained with clinical prompts also bmi, prevalent_fracture, glucocorticoid, prior_fracture, "
                     "rheumatoid_arthritis, secondary_osteoporosis, written into the prompts as in training"},
        "years": {"type": "string", "description": "comma-separated horizons, e.g. 1,5,10"},
        "seeds": {"type": "string", "description": "number of seeds (e.g. 4) or a JSON list of seeds"}}}}}}}


@serve.deployment(name="ApiIngress", max_ongoing_requests=64, health_check_period_s=2.0)
@serve.ingress(api)
class ApiIngress:
    """FastAPI ingress: validates uploads and composes the scoring deployments."""

    def __init__(self, ct_pre: Any, xray_pre: Any, pvf_model: Any, jobs: Any,
                 handles: dict[str, Any], available: dict[str, Any], options: dict[str, Any]) -> None:
        self.ct_pre = ct_pre
        self.xray_pre, self.pvf_model, self.jobs = xray_pre, pvf_model, jobs
        self.handles, self.available = handles, available
        self.opts = ServeOptions.model_validate(options)
        api.state.settings = {"api_token": self.opts.api_token, "max_request_bytes": self.opts.max_request_bytes}
        keep_uploads_in_memory(min(self.opts.max_request_bytes, UPLOAD_SPOOL_BYTES))

    def _need(self, *roles: str) -> None:
        for role in roles:
            a = self.available.get(role, {})
            if not a.get("ok"):
                raise ServingError(503, f"{role} scoring unavailable: {a.get('reason') or 'model not configured'}", role)

    @api.get("/healthz")
    async def healthz(self) -> JSONResponse:
        """Public: 200 {"ready": true} when every deployment answers, else 503 {"ready": false}; nothing else."""
        import asyncio

        async def one(h: Any) -> bool:
            try:
                return bool((await asyncio.wait_for(h.status.remote(), timeout=10)).get("ready"))
            except Exception:  # noqa: BLE001 - any failure is simply "not ready"
                return False

        ok = all(await asyncio.gather(*[one(h) for h in self.handles.values()]))
        return SafeJSONResponse({"ready": ok}, status_code=200 if ok else 503)

    @api.get("/v1/models")
    async def models(self, request: Request) -> JSONResponse:
        """Names, versions and metrics of the loaded models; disabled roles with the reason."""
        async def work() -> tuple[int, dict]:
            return 200, {"models": {r: (a["info"] if a.get("ok") else {"name": a.get("name"), "loaded": False,
                                                                       "reason": a.get("reason")})
                                    for r, a in self.available.items()}}
        return await _respond(request, work())

    @api.post("/v1/ct/score", openapi_extra=_STUDY_DOC)
    async def ct_score(self, request: Request) -> JSONResponse:
        """CT + masks (+ clinical) -> 5-year fracture probability, model version, QC, optional Grad-CAM."""
        async def work() -> tuple[int, dict]:
            self._need("ct")
            async with _form(request) as form:
                study = await _file(form, "study", STUDY_TYPES)
                masks = await _file(form, "masks", STUDY_TYPES)
                body = await _file(form, "body_mask", STUDY_TYPES, required=False)
                clinical = _clinical(await _json_field(form, "clinical"))
                labels = form.get("mask_labels")
                if labels is not None and not isinstance(labels, str):
                    raise ServingError(400, "mask_labels must be text", "mask_labels")
                if labels and labels.strip().startswith("{"):
                    labels = await _json_field(form, "mask_labels")
                elif labels and labels not in ("verse", "totalseg"):
                    raise ServingError(422, "mask_labels must be verse, totalseg or a JSON label map", "mask_labels")
                gradcam = _bool_field(form, "gradcam")
            log.info("request %s ct: study=%d masks=%d bytes", request.scope["state"]["request_id"], len(study), len(masks))
            out = await call(self.ct_pre.score, study, masks, body, labels or None, clinical, gradcam, retries=0,
                             lost_field="study")
            resp = {"probability": out["probability"], "horizon_years": 5, "model": out["model"], "qc": out["qc"]}
            if gradcam:
                resp["gradcam_png"] = out["gradcam_png"]
            return 200, resp
        return await _respond(request, work())

    async def _xray_form(self, request: Request) -> tuple[bytes, Any, dict[str, Any], Any]:
        async with _form(request) as form:
            image = await _file(form, "image", RADIOGRAPH_TYPES)
            keypoints = await _json_field(form, "keypoints")
            clinical = _clinical(await _json_field(form, "clinical"))
            if keypoints is not None and not isinstance(keypoints, dict):
                raise ServingError(422, "keypoints must be a JSON object {\"L1\": [x, y], ...}", "keypoints")
            extra = {k: form.get(k) for k in ("years", "seeds")}
        return image, keypoints, clinical, extra

    @api.post("/v1/xray/score", openapi_extra=_XRAY_DOC)
    async def xray_score(self, request: Request) -> JSONResponse:
        """Radiograph (+ keypoints, clinical) -> log-risk, S(t) 1..10 y, 5-year risk, keypoints used, pVF score."""
        async def work() -> tuple[int, dict]:
            self._need("xray")
            image, keypoints, clinical, _ = await self._xray_form(request)
            log.info("request %s xray: image=%d bytes", request.scope["state"]["request_id"], len(image))
            return 200, await call(self.xray_pre.score, image, keypoints, clinical, retries=0, lost_field="image")
        return await _respond(request, work())

    @api.post("/v1/xray/future", openapi_extra=_FUTURE_DOC, status_code=202)
    async def xray_future(self, request: Request) -> JSONResponse:
        """Start a Diff-X generation job (202 + job id): future radiographs per year and seed, scored by pVF."""
        async def work() -> tuple[int, dict]:
            self._need("ldm", "pvf")
            image, keypoints, clinical, extra = await self._xray_form(request)
            years = _int_list(extra, "years", [1, 5, 10], 1, self.opts.max_years, 10)
            seeds_raw = extra.get("seeds")
            if isinstance(seeds_raw, str) and seeds_raw.strip().isascii() and seeds_raw.strip().isdigit():
                if len(seeds_raw.strip()) > 6:
                    raise ServingError(422, f"seeds must be 1..{self.opts.max_seeds}", "seeds")
                n = int(seeds_raw)
                if not 1 <= n <= self.opts.max_seeds:
                    raise ServingError(422, f"seeds must be 1..{self.opts.max_seeds}", "seeds")
                seeds = list(range(n))
            else:
                seeds = _int_list(extra, "seeds", [0, 1, 2, 3], 0, 2**31 - 1, self.opts.max_seeds)
            age, sex = clinical.get("age"), clinical.get("sex")
            if not isinstance(age, (int, float)) or isinstance(age, bool) or not 0 < float(age) < 130:
                raise ServingError(422, "clinical.age (years) is required for generation", "clinical.age")
            if str(sex).upper()[:1] not in ("F", "M"):
                raise ServingError(422, "clinical.sex (F or M) is required for generation", "clinical.sex")
            inp, pixels = await call(self.xray_pre.preprocess, image, keypoints, clinical, False, True, retries=0,
                                     lost_field="image")
            spec = {"pixels": pixels, "pvf_input": inp.pvf_image, "age": float(age), "sex": str(sex).upper()[:1],
                    "years": years, "seeds": seeds,
                    "clinical": dict(clinical),  # the generator keeps the prompt attributes the model was trained with
                    "models": {k: self.available[k]["info"] for k in ("ldm", "pvf")}}
            job = await call(self.jobs.submit, spec, _client_key(request, self.opts.api_token), retries=0)
            return 202, {**job, "years": years, "seeds": seeds, "location": f"/v1/jobs/{job['job_id']}"}
        return await _respond(request, work())

    @api.get("/v1/jobs/{job_id}")
    async def job(self, job_id: str, request: Request) -> JSONResponse:
        """Job status; once done: BpVF, GpVF mean/SD, risk group, generated PNGs (returned once, then removed)."""
        async def work() -> tuple[int, dict]:
            if len(job_id) != 32 or any(c not in "0123456789abcdef" for c in job_id):
                raise ServingError(404, "unknown job id", "job_id")
            rec = await call(self.jobs.get, job_id, retries=self.opts.handle_retries)
            if rec is None:
                raise ServingError(404, "unknown or expired job id (results are kept until fetched once or expired)", "job_id")
            return 200, rec
        return await _respond(request, work())


# ------------------------------------------------------------------------------------------ building
def resolve_models(registry: str, options: ServeOptions) -> dict[str, dict[str, Any]]:
    """Per role: the pinned version and its info when loadable (checksums verified), else the reason it is disabled."""
    from raypipe.registry import list_versions, load_version
    from raypipe.scoring.common import model_info

    out: dict[str, dict[str, Any]] = {}
    for role in ("ct", "xray", "pvf", "ldm", "keypoints"):
        name = options.model_name(role)
        if not name:
            out[role] = {"ok": False, "name": None, "version": None, "reason": "disabled by configuration"}
            continue
        if not list_versions(registry, name):
            out[role] = {"ok": False, "name": name, "version": None,
                         "reason": f"no model named {name!r} is published in the registry"}
            continue
        try:
            v = load_version(registry, name, options.versions.get(role, "latest"))
            out[role] = {"ok": True, "name": name, "version": v.version, "info": model_info(v), "reason": None}
        except Exception as e:  # noqa: BLE001
            log.warning("model %r cannot be loaded: %s", name, getattr(e, "reason", e))  # details stay server-side
            out[role] = {"ok": False, "name": name, "version": None,
                         "reason": f"model {name!r} cannot be loaded ({type(e).__name__}); see the server log"}
    if out["ldm"]["ok"]:
        import importlib.util

        if importlib.util.find_spec("raypipe.generate") is None:
            out["ldm"] = {**out["ldm"], "ok": False, "reason": "Diff-X generation (raypipe.generate) is not in this build"}
    return out


def build_app(registry: str, names: dict[str, str | None] | None = None,
              options: ServeOptions | dict[str, Any] | None = None) -> Any:
    """The Serve application: ingress over preprocessing replicas that call the batched models, and the job store."""
    from raypipe import storage

    opts = options if isinstance(options, ServeOptions) else ServeOptions.model_validate(options or {})
    if names:
        opts = opts.model_copy(update={"names": {**opts.names, **names}})
    registry = storage.absolute(registry)
    available = resolve_models(registry, opts)
    for role, a in available.items():
        if not a["ok"]:
            log.warning("%s endpoints disabled: %s", role, a["reason"])
    names_r = {r: a["name"] for r, a in available.items()}
    vers = {r: a["version"] for r, a in available.items()}
    limits = {"max_zip_files": opts.max_zip_files, "max_unpacked_bytes": opts.max_unpacked_bytes,
              "max_voxels": opts.max_voxels, "max_pixels": opts.max_pixels}
    batch = opts.batch.model_dump()
    threads = opts.torch_threads  # None: each replica uses as many threads as Ray gave it CPUs
    retries = opts.handle_retries

    def o(dep: Any) -> Any:
        name = dep.name
        actor: dict[str, Any] = {"num_cpus": opts.num_cpus.get(name, 0.1)}
        if opts.num_gpus.get(name):
            actor["num_gpus"] = opts.num_gpus[name]
        if name in ("CTPreprocess", "XrayPreprocess") and opts.preprocess_max_replicas > 1:
            return dep.options(ray_actor_options=actor, autoscaling_config={
                "min_replicas": 1, "initial_replicas": 1, "max_replicas": opts.preprocess_max_replicas,
                "target_ongoing_requests": opts.preprocess_target_ongoing, "upscale_delay_s": 2.0})
        return dep.options(ray_actor_options=actor)

    ct_model = o(CTModel).bind(registry, names_r["ct"], vers["ct"], threads, batch)
    xray_model = o(XrayModel).bind(registry, names_r["xray"], vers["xray"], threads, batch)
    pvf_model = o(PVFModel).bind(registry, names_r["pvf"], vers["pvf"], threads, batch)
    ct_pre = o(CTPreprocess).bind(registry, names_r["ct"], vers["ct"], limits, threads, ct_model, retries)
    xray_pre = o(XrayPreprocess).bind(registry, names_r, vers, limits, threads, xray_model, pvf_model, available,
                                      retries)
    generator = o(GeneratorModel).bind(registry, names_r["ldm"], vers["ldm"], threads,
                                       {"max_batch_size": min(2, batch["max_batch_size"]),
                                        "batch_wait_timeout_s": batch["batch_wait_timeout_s"]})
    jobs = o(JobStore).bind(generator, pvf_model, opts.job_ttl_s, opts.max_jobs, retries,
                            opts.max_jobs_per_client, opts.job_dir or storage.join(registry, ".jobs"))
    handles = {"CTPreprocess": ct_pre, "XrayPreprocess": xray_pre, "CTModel": ct_model, "XrayModel": xray_model,
               "PVFModel": pvf_model, "GeneratorModel": generator, "JobStore": jobs}
    return o(ApiIngress).bind(ct_pre, xray_pre, pvf_model, jobs, handles, available, opts.model_dump())


def build_app_from_env() -> Any:
    """`serve run serve.app:app`: registry from RAYPIPE_REGISTRY, options from RAYPIPE_* variables."""
    import os

    registry = os.environ.get("RAYPIPE_REGISTRY")
    if not registry:
        raise RuntimeError("set RAYPIPE_REGISTRY to the model registry folder")
    return build_app(registry, options=ServeOptions.from_env())


# ------------------------------------------------------------------------------------------ serve deploy
# The imports of this section stay with it, so that the section is one self-contained block.
import os  # noqa: E402
import re  # noqa: E402
from pathlib import Path  # noqa: E402

from pydantic import BaseModel, ConfigDict, Field, field_validator  # noqa: E402

from raypipe.serving.options import DEFAULT_NAMES  # noqa: E402


class ServeAppArgs(BaseModel):
    """Typed `args` of `raypipe.serving.app:build` in `serve/config.yaml` (Serve validates them before building)."""

    model_config = ConfigDict(extra="forbid")

    registry: str = Field(..., min_length=1, description="model registry folder, as the cluster's nodes see it")
    versions: dict[str, str] = Field(default_factory=dict, description="role -> pinned version (vN); absent: latest")
    names: dict[str, str | None] = Field(default_factory=dict, description="role -> registry name; null disables")
    api_token_env: str | None = Field("RAYPIPE_API_TOKEN", description="environment variable holding the bearer token")
    api_token_file: str | None = Field(None, description="file holding the bearer token (e.g. a mounted secret)")
    options: dict[str, Any] = Field(default_factory=dict, description="further ServeOptions fields (limits, batching)")

    @field_validator("versions")
    @classmethod
    def _pinned(cls, v: dict[str, str]) -> dict[str, str]:
        for role, version in v.items():
            if role not in DEFAULT_NAMES:
                raise ValueError(f"versions: unknown role {role!r} (one of {', '.join(DEFAULT_NAMES)})")
            if not re.fullmatch(r"v[0-9]+", version):
                raise ValueError(f"versions.{role}: {version!r} is not a pinned version such as 'v3'")
        return v

    @field_validator("names")
    @classmethod
    def _roles(cls, v: dict[str, str | None]) -> dict[str, str | None]:
        unknown = sorted(set(v) - set(DEFAULT_NAMES))
        if unknown:
            raise ValueError(f"names: unknown role(s) {unknown} (one of {', '.join(DEFAULT_NAMES)})")
        return v

    @field_validator("options")
    @classmethod
    def _other_options(cls, v: dict[str, Any]) -> dict[str, Any]:
        clash = sorted(set(v) & {"api_token", "names", "versions"})
        if clash:
            raise ValueError(f"options: set {clash} through the top-level args (the token only through a token source)")
        ServeOptions.model_validate(v)
        return v

    def api_token(self) -> str | None:
        """The bearer token from the token file, else from the named environment variable; None disables auth."""
        if self.api_token_file:
            try:
                token = Path(self.api_token_file).read_text().strip()
            except OSError as e:
                raise ValueError(f"api_token_file {self.api_token_file!r} cannot be read: {e.strerror}") from None
            if not token:
                raise ValueError(f"api_token_file {self.api_token_file!r} is empty")
            return token
        return (os.environ.get(self.api_token_env) or None) if self.api_token_env else None


def build(args: ServeAppArgs) -> Any:
    """Serve application builder for `serve deploy serve/config.yaml` (`import_path: raypipe.serving.app:build`)."""
    opts = ServeOptions.model_validate({**args.options, "versions": args.versions, "api_token": args.api_token()})
    return build_app(args.registry, names=args.names or None, options=opts)
