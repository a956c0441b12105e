"""Ray Serve deployments behind the HTTP ingress: preprocessing (calls the batched models), batched models, job store.

Every model deployment is always part of the app; one whose model is absent from the registry starts
"disabled" (no weights, `status()` says why), so the app's shape does not depend on what is published
and `serve/config.yaml` can always name every deployment. Versions are resolved once by `build_app`
and pinned, so a replica that replaces a dead one loads the same version as its siblings.
CPU work runs in a worker thread (`asyncio.to_thread`) so replicas keep answering health checks.
"""
from __future__ import annotations

import asyncio
import base64
import logging
import uuid
from pathlib import Path
from typing import Any

import numpy as np
from ray import serve

from raypipe.serving.problems import ServingError, as_serving_error, unwrap
from raypipe.serving.intake import Limits, Redactor
from raypipe.serving.uploads import (
    UploadError,
    check_raster_size,
    is_png_or_jpeg,
    quiet_replica,
    request_workdir,
)

log = logging.getLogger("ray.serve.raypipe")  # a child of Serve's logger: lands in the replica logs

HEALTH_CHECK_PERIOD_S = 2.0


# ------------------------------------------------------------------------------------------ helpers
def _replica_gone(exc: BaseException) -> bool:
    """True when a call failed because the replica died or is being replaced (safe to retry: scoring is pure)."""
    from ray.exceptions import ActorUnavailableError, RayActorError

    return isinstance(exc, (RayActorError, ActorUnavailableError)) and not isinstance(unwrap(exc), ServingError)


async def call(method: Any, *args: Any, retries: int = 3, lost_field: str | None = None, **kwargs: Any) -> Any:
    """`await handle.method.remote(...)`, retrying when the target replica died; ServingErrors pass through.

    `lost_field` marks a call that parses that uploaded field: it must use retries=0, and a replica
    lost under it answers 422 for the field (the upload may have killed it), not 503 (which clients retry).
    """
    for attempt in range(retries + 1):
        try:
            result = await method.remote(*args, **kwargs)
        except Exception as e:  # noqa: BLE001 - classified below
            cause = unwrap(e)
            if isinstance(cause, ServingError):
                raise cause from None
            if _replica_gone(e) and attempt < retries:
                log.warning("replica lost (%s); retry %d/%d", type(e).__name__, attempt + 1, retries)
                await asyncio.sleep(0.5 * 2 ** attempt)
                continue
            if _replica_gone(e) and lost_field is not None:
                log.warning("replica lost while parsing an upload (%s); not retried", type(e).__name__)
                raise ServingError(422, "the worker processing this upload stopped; the upload is not retried "
                                        "(too large or malformed?)", lost_field) from None
            if _replica_gone(e):
                raise ServingError(503, "a model replica restarted while serving this request; retry") from None
            raise
        if isinstance(result, ServingError):  # expected input errors travel as values (no error logs per bad request)
            raise result
        return result


async def run_guarded(fn: Any, *args: Any, workdir: Path | None = None) -> Any:
    """Run blocking work in a thread; raypipe input errors come back as a `ServingError` value (4xx), bugs raise."""
    try:
        return await asyncio.to_thread(fn, *args)
    except Exception as e:  # noqa: BLE001 - known input errors become 4xx; the rest stays a bug (500)
        problem = as_serving_error(e, workdir)
        if problem is not None:
            return problem
        raise


def _open(registry: str, name: str | None, version: str | None) -> tuple[Any, str | None]:
    """(ModelVersion or None, reason when disabled)."""
    from raypipe.registry import load_version

    if not name or not version:
        return None, f"model {name!r} is not published in the registry" if name else "model disabled by configuration"
    try:
        return load_version(registry, name, version), None
    except Exception as e:  # noqa: BLE001 - a broken model disables its endpoints, it does not stop the app
        return None, f"model {name!r} cannot be loaded: {getattr(e, 'reason', e)}"


def threads_for(requested: int | None, assigned_cpus: float | None) -> int:
    """Intra-op threads of a replica: the requested number, else the CPUs Ray assigned it (at least 1)."""
    if requested:
        return max(1, int(requested))
    return max(1, int(assigned_cpus or 0))


def _set_threads(requested: int | None) -> int:
    """Size torch's, SimpleITK's and OpenCV's thread pools to this replica's CPUs (no oversubscription)."""
    import ray
    import torch

    n = threads_for(requested, ray.get_runtime_context().get_assigned_resources().get("CPU"))
    torch.set_num_threads(n)
    try:
        import SimpleITK as sitk

        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(n)
    except ImportError:
        pass
    try:
        import cv2

        cv2.setNumThreads(n)
    except ImportError:
        pass
    return n


def choose_device(gpu_ids: list[Any], cuda_available: bool) -> str:
    """"cuda" only when Ray assigned GPUs (the deployment's num_gpus) and torch can use CUDA, else "cpu"."""
    return "cuda" if gpu_ids and cuda_available else "cpu"


def replica_device() -> str:
    """The device of this replica's models (`choose_device` on Ray's GPU ids and torch's CUDA check)."""
    import ray
    import torch

    return choose_device(list(ray.get_gpu_ids()), torch.cuda.is_available())


def b64png(data: bytes) -> str:
    """Base64 text of PNG bytes for JSON responses."""
    return base64.b64encode(data).decode("ascii")


class _Disabled:
    """Shared status/availability for deployments whose model may be absent."""

    error: str | None = None
    info: dict[str, Any] | None = None

    def _require(self) -> None:
        if self.error is not None:
            raise ServingError(503, self.error)

    async def status(self) -> dict[str, Any]:
        """Ready (replica constructed) plus whether its model is loaded or why not."""
        return {"ready": True, "enabled": self.error is None, "reason": self.error, "model": self.info,
                "device": getattr(self, "device", None)}


class _Batched(_Disabled):
    """Batch-size bookkeeping and user_config reconfiguration of `@serve.batch` parameters."""

    def _init_batching(self, batch: dict[str, Any] | None) -> None:
        from raypipe.scoring.common import BatchRecorder

        self.recorder = BatchRecorder()
        if batch:
            self._apply_batch(batch)

    def _apply_batch(self, cfg: dict[str, Any]) -> None:
        if "max_batch_size" in cfg:
            self.predict.set_max_batch_size(int(cfg["max_batch_size"]))
        if "batch_wait_timeout_s" in cfg:
            self.predict.set_batch_wait_timeout_s(float(cfg["batch_wait_timeout_s"]))

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        """serve deploy user_config: {max_batch_size, batch_wait_timeout_s} changes batching without a restart."""
        self._apply_batch(user_config or {})

    async def batch_sizes(self) -> list[int]:
        """Sizes of the batches run so far (bounded history)."""
        return list(self.recorder.sizes)

    def _run_items(self, fn: Any, items: list[Any]) -> list[Any]:
        """Run a batch; if the batch fails, run items alone so one bad item cannot fail its neighbours."""
        try:
            return fn(items)
        except Exception:  # noqa: BLE001
            out = []
            for it in items:
                try:
                    out.append(fn([it])[0])
                except Exception as e:  # noqa: BLE001
                    problem = as_serving_error(e)
                    out.append(problem or ServingError(500, f"model failed ({type(e).__name__})"))
            return out


# ------------------------------------------------------------------------------------------ preprocessing
@serve.deployment(name="CTPreprocess", max_ongoing_requests=4, health_check_period_s=HEALTH_CHECK_PERIOD_S)
class CTPreprocess(_Disabled):
    """Uploaded CT (DICOM zip or NIfTI) + masks (zip or NIfTI multilabel) -> 14-slice crops + QC; no weights."""

    def __init__(self, registry: str, name: str | None, version: str | None, limits: dict[str, int],
                 threads: int | None = None, ct_model: Any = None, retries: int = 3) -> None:
        from raypipe.scoring.ct import CTPreprocessor
        from raypipe.scoring.common import model_info

        from raypipe.preprocess.config import LEVEL_ORDER
        from raypipe.scoring.ct import MASK_NAMES_EXTRA

        _set_threads(threads)
        self.ct_model, self.retries = ct_model, retries
        quiet_replica()
        v, self.error = _open(registry, name, version)
        self.pre = CTPreprocessor(v) if v is not None else None
        self.info = model_info(v) if v is not None else None
        self.limits = Limits.from_dict(limits)
        self.mask_names = {f"vertebrae_{lvl}" for lvl in LEVEL_ORDER} | set(MASK_NAMES_EXTRA)

    def _preprocess(self, study: bytes, masks: bytes, body_mask: bytes | None, mask_labels: Any,
                    clinical: dict[str, Any]) -> Any:
        from raypipe.serving.intake import materialise_masks, materialise_study, new_budget

        lim, redactor = self.limits, Redactor()
        budget = new_budget(lim)
        with request_workdir() as wd:
            field = "study"
            try:
                ct_path = materialise_study(study, wd, lim, redactor, budget)
                field = "masks"
                masks_path = materialise_masks(masks, wd, "masks", self.mask_names, lim, redactor, budget)
                body_path = None
                if body_mask:
                    field = "body_mask"
                    body_path = materialise_masks(body_mask, wd, "body_mask", {"vertebral_body"}, lim, redactor, budget)
                labels = mask_labels
                if isinstance(mask_labels, dict):
                    import json

                    labels = str(wd / "mask_labels.json")
                    Path(labels).write_text(json.dumps(mask_labels))
                field = "study"
                return self.pre.from_files(ct_path, masks_path, body_path, labels, clinical)
            except Exception as e:  # noqa: BLE001
                problem = as_serving_error(e, wd, field)
                if problem is not None:
                    raise ServingError(problem.status, redactor.redact(problem.message), problem.field) from None
                raise

    async def preprocess(self, study: bytes, masks: bytes, body_mask: bytes | None, mask_labels: Any,
                         clinical: dict[str, Any]) -> Any:
        """Bytes in, `CTInput` out; a bad upload gives a `ServingError` value (4xx)."""
        if self.error is not None:
            return ServingError(503, self.error)
        return await run_guarded(self._preprocess, study, masks, body_mask, mask_labels, clinical)

    async def score(self, study: bytes, masks: bytes, body_mask: bytes | None, mask_labels: Any,
                    clinical: dict[str, Any], gradcam: bool = False) -> Any:
        """Bytes in, the batched CT model's answer out (the crops go one hop, never back through the ingress)."""
        inp = await self.preprocess(study, masks, body_mask, mask_labels, clinical)
        if isinstance(inp, ServingError):
            return inp
        try:
            return await call(self.ct_model.score, (inp, gradcam), retries=self.retries)
        except ServingError as e:  # returned, not raised: a bad input is not a replica error
            return e


@serve.deployment(name="XrayPreprocess", max_ongoing_requests=4, health_check_period_s=HEALTH_CHECK_PERIOD_S)
class XrayPreprocess(_Disabled):
    """Uploaded radiograph -> keypoints (request or keypoint model) -> aligned patches + pVF input."""

    def __init__(self, registry: str, names: dict[str, str | None], versions: dict[str, str | None],
                 limits: dict[str, int], threads: int | None = None, xray_model: Any = None, pvf_model: Any = None,
                 available: dict[str, Any] | None = None, retries: int = 3) -> None:
        from raypipe.scoring.common import model_info
        from raypipe.scoring.xray import KeypointModel, XrayPreprocessor

        threads = _set_threads(threads)
        self.xray_model, self.pvf_model = xray_model, pvf_model
        self.available, self.retries = available or {}, retries
        quiet_replica()
        xray, self.error = _open(registry, names.get("xray"), versions.get("xray"))
        pvf, _ = _open(registry, names.get("pvf"), versions.get("pvf"))
        kp_version, self.keypoint_error = _open(registry, names.get("keypoints"), versions.get("keypoints"))
        kp = KeypointModel(kp_version, threads) if kp_version is not None else None
        self.pre = XrayPreprocessor(xray, pvf, kp)
        self.info = model_info(kp_version) if kp_version is not None else None
        self.limits = Limits.from_dict(limits)
        if xray is None and pvf is not None:
            self.error = None  # the pVF path still works

    def _radiograph(self, data: bytes, redactor: Redactor) -> Any:
        """Sniffed and size-checked upload -> `Radiograph`, decoded from memory (no temp file)."""
        from raypipe.io.radiograph import read_radiograph_bytes
        from raypipe.serving.intake import dicom_header, dicom_pixels

        if is_png_or_jpeg(data):
            check_raster_size(data, "image", self.limits.max_pixels)
        else:
            ds = dicom_header(data)
            if ds is None:
                raise UploadError(415, "image", "expected a DICOM, PNG or JPEG radiograph (identified by content)")
            redactor.add_dataset(ds)
            if dicom_pixels(ds, "image") > self.limits.max_pixels * 4096:
                raise UploadError(413, "image", "DICOM image declares too many pixels x frames")
        return read_radiograph_bytes(data, "image", self.limits.max_pixels)

    def _preprocess(self, image: bytes, keypoints: dict | None, clinical: dict[str, Any], need_survival: bool,
                    keep_pixels: bool) -> Any:
        redactor = Redactor()
        try:
            rad = self._radiograph(image, redactor)
            inp = self.pre.from_radiograph(rad, keypoints, clinical, need_survival)
            return (inp, rad.pixels) if keep_pixels else inp
        except Exception as e:  # noqa: BLE001
            problem = as_serving_error(e, None, "image")
            if problem is not None:
                raise ServingError(problem.status, redactor.redact(problem.message), problem.field) from None
            raise

    async def preprocess(self, image: bytes, keypoints: dict | None, clinical: dict[str, Any],
                         need_survival: bool = True, keep_pixels: bool = False) -> Any:
        """Bytes in, `XrayInput` (and the [0, 1] pixels when asked) out; implausible keypoints -> 422 (a value)."""
        if self.error is not None:
            return ServingError(503, self.error)
        return await run_guarded(self._preprocess, image, keypoints, clinical, need_survival, keep_pixels)

    async def score(self, image: bytes, keypoints: dict | None, clinical: dict[str, Any]) -> Any:
        """Radiograph bytes (+ keypoints, clinical) -> log-risk, S(t), 5-year risk, keypoints used, pVF score.

        The replica that parsed the upload calls the batched models itself: the prepared arrays go one
        hop (DeepSurv input and pVF input separately, each small enough to travel inline, not through
        the object store) and only the small JSON-ready answer comes back to the ingress.
        """
        inp = await self.preprocess(image, keypoints, clinical, True)
        if isinstance(inp, ServingError):
            return inp
        try:
            return await score_prepared_xray(inp, self.xray_model, self.pvf_model, self.available, self.retries)
        except ServingError as e:  # returned, not raised: a bad input is not a replica error
            return e

    async def status(self) -> dict[str, Any]:
        """Ready, plus whether the keypoint model is available for requests without keypoints."""
        return {**await super().status(), "keypoint_model": self.keypoint_error is None, "keypoint_reason": self.keypoint_error}


# ------------------------------------------------------------------------------------------ models
@serve.deployment(name="CTModel", max_ongoing_requests=16, health_check_period_s=HEALTH_CHECK_PERIOD_S)
class CTModel(_Batched):
    """The published CT CNN-RNN; concurrent requests are grouped by `@serve.batch` into one forward pass."""

    def __init__(self, registry: str, name: str | None, version: str | None, threads: int | None = None,
                 batch: dict[str, Any] | None = None) -> None:
        from raypipe.scoring.ct import CTPredictor

        threads = _set_threads(threads)
        v, self.error = _open(registry, name, version)
        self.device = replica_device()
        self.predictor = CTPredictor(v, threads).to(self.device) if v is not None else None
        self.info = self.predictor.info if self.predictor else None
        self._init_batching(batch)

    def _run(self, items: list[tuple[Any, bool]]) -> list[dict[str, Any]]:
        preds = self.predictor.predict_batch([i for i, _ in items], [g for _, g in items])
        return [{"probability": p.probability, "model": p.model, "qc": p.qc,
                 "gradcam_png": [b64png(b) for b in p.gradcam_png]} for p in preds]

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.0)
    async def predict(self, items: list[tuple[Any, bool]]) -> list[Any]:
        """(CTInput, gradcam) per request -> probability, model, QC, Grad-CAM PNGs (base64)."""
        self._require()
        self.recorder.record(len(items))
        return await asyncio.to_thread(self._run_items, self._run, items)

    async def score(self, item: tuple[Any, bool]) -> dict[str, Any]:
        """One request through the batcher (a failed item comes back as a `ServingError` value)."""
        return await self.predict(item)


@serve.deployment(name="XrayModel", max_ongoing_requests=16, health_check_period_s=HEALTH_CHECK_PERIOD_S)
class XrayModel(_Batched):
    """The published radiograph DeepSurv model, batched: log-risk, S(t) 1..10 years, 5-year risk."""

    def __init__(self, registry: str, name: str | None, version: str | None, threads: int | None = None,
                 batch: dict[str, Any] | None = None) -> None:
        from raypipe.scoring.xray import XrayPredictor

        threads = _set_threads(threads)
        v, self.error = _open(registry, name, version)
        self.device = replica_device()
        self.predictor = XrayPredictor(v, None, None, threads).to(self.device) if v is not None else None
        self.info = self.predictor.info if self.predictor else None
        self._init_batching(batch)

    def _run(self, items: list[Any]) -> list[dict[str, Any]]:
        return [{"log_risk": p.log_risk, "survival": p.survival, "risk_5y": p.risk_5y, "model": p.model,
                 "warnings": p.warnings} for p in self.predictor.predict_batch(items)]

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.0)
    async def predict(self, items: list[Any]) -> list[Any]:
        """XrayInput per request -> DeepSurv outputs."""
        self._require()
        self.recorder.record(len(items))
        return await asyncio.to_thread(self._run_items, self._run, items)

    async def score(self, item: Any) -> dict[str, Any]:
        """One request through the batcher (a failed item comes back as a `ServingError` value)."""
        return await self.predict(item)


@serve.deployment(name="PVFModel", max_ongoing_requests=32, health_check_period_s=HEALTH_CHECK_PERIOD_S)
class PVFModel(_Batched):
    """The published pVF classifier, batched: score in [0, 1] per prepared image."""

    def __init__(self, registry: str, name: str | None, version: str | None, threads: int | None = None,
                 batch: dict[str, Any] | None = None) -> None:
        from raypipe.scoring.xray import PVFPredictor

        threads = _set_threads(threads)
        v, self.error = _open(registry, name, version)
        self.device = replica_device()
        self.predictor = PVFPredictor(v, threads).to(self.device) if v is not None else None
        self.info = self.predictor.info if self.predictor else None
        self._init_batching(batch)

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.0)
    async def predict(self, images: list[np.ndarray]) -> list[Any]:
        """Prepared (1, rows, cols) inputs -> pVF scores."""
        self._require()
        self.recorder.record(len(images))
        return await asyncio.to_thread(self._run_items, self.predictor.predict_batch, images)

    async def score(self, image: np.ndarray) -> float:
        """One prepared image through the batcher."""
        return await self.predict(image)

    async def score_pixels(self, pixels: np.ndarray) -> float:
        """A raw [0, 1] radiograph (e.g. a generated one): prepare, then score through the batcher."""
        if self.error is not None:
            return ServingError(503, self.error)
        prepared = await asyncio.to_thread(self.predictor.prepare, pixels)
        return await self.predict(prepared)


@serve.deployment(name="GeneratorModel", max_ongoing_requests=4, health_check_period_s=HEALTH_CHECK_PERIOD_S)
class GeneratorModel(_Batched):
    """The Diff-X generator (papers/004): future radiographs per (year, seed); disabled without `raypipe.generate`."""

    def __init__(self, registry: str, name: str | None, version: str | None, threads: int | None = None,
                 batch: dict[str, Any] | None = None) -> None:
        v, self.error = _open(registry, name, version)
        self.generator = None
        if v is not None:
            from raypipe.scoring.future import FutureGenerator

            threads = _set_threads(threads)

            try:
                self.device = replica_device()
                self.generator = FutureGenerator.from_registry(registry, name, version, device=self.device)
            except Exception as e:  # noqa: BLE001 - generation unavailable disables /v1/xray/future only
                self.error = f"Diff-X generation unavailable: {getattr(e, 'reason', e)}"
        self.info = self.generator.info if self.generator else None
        self._init_batching(batch)

    def _run(self, items: list[dict[str, Any]]) -> list[list[Any]]:
        """All requests of the batch in one batched Diff-X run (one forward per step over all of them)."""
        from raypipe.scoring.future import FutureRequest

        return self.generator.generate_many([FutureRequest(i["pixels"], i["age"], i["sex"], i["years"], i["seeds"],
                                                           i.get("clinical") or {}) for i in items])

    @serve.batch(max_batch_size=2, batch_wait_timeout_s=0.0)
    async def predict(self, items: list[dict[str, Any]]) -> list[Any]:
        """Generation requests -> lists of `GeneratedImage` (one per year x seed); the batch runs as one."""
        self._require()
        self.recorder.record(len(items))
        return await asyncio.to_thread(self._run_items, self._run, items)

    async def generate(self, item: dict[str, Any]) -> list[Any]:
        """One generation request through the batcher."""
        return await self.predict(item)


# ------------------------------------------------------------------------------------------ composition
async def score_prepared_xray(inp: Any, xray_model: Any, pvf_model: Any, available: dict[str, Any],
                              retries: int = 3) -> dict[str, Any]:
    """A prepared `XrayInput` -> DeepSurv and pVF concurrently (batched deployments), merged into one answer."""
    from dataclasses import replace

    has_pvf = bool(available.get("pvf", {}).get("ok")) and inp.pvf_image is not None
    surv = call(xray_model.score, replace(inp, pvf_image=None), retries=retries)
    pvf = call(pvf_model.score, inp.pvf_image, retries=retries) if has_pvf else None
    s = await surv
    p = await pvf if pvf is not None else None
    models = {"xray": s["model"]}
    if has_pvf:
        models["pvf"] = available["pvf"]["info"]
    if inp.keypoints_source == "model" and available.get("keypoints", {}).get("ok"):
        models["keypoints"] = available["keypoints"]["info"]
    qc = {**inp.qc, "warnings": list(inp.qc.get("warnings", [])) + s.get("warnings", [])}
    if not has_pvf:
        qc["warnings"].append(available.get("pvf", {}).get("reason") or "pVF model not available")
    return {"log_risk": s["log_risk"], "survival": s["survival"], "risk_5y": s["risk_5y"],
            "keypoints": inp.keypoints, "keypoints_source": inp.keypoints_source, "pvf_score": p,
            "models": models, "qc": qc}


@serve.deployment(name="JobStore", num_replicas=1, max_ongoing_requests=256,
                  health_check_period_s=HEALTH_CHECK_PERIOD_S)
class JobStore(_Disabled):
    """Generation jobs, durable: spec, status and result live in `state_dir` (the registry's storage).

    Results are kept until fetched once or `ttl_s` after finishing. A replica that replaces a dead one
    runs the dead one's queued/running jobs again from their stored spec (deterministic given the seeds),
    so a client polling `/v1/jobs/{id}` through the restart still gets its result. Per-client quota:
    `max_per_client` unfinished or unfetched jobs.
    """

    def __init__(self, generator: Any, pvf_model: Any, ttl_s: float = 3600.0, max_jobs: int = 64,
                 retries: int = 3, max_per_client: int = 4, state_dir: str | None = None) -> None:
        import tempfile

        from raypipe.serving.jobs import JobFiles

        self.generator, self.pvf_model = generator, pvf_model
        self.max_jobs, self.retries, self.max_per_client = int(max_jobs), retries, int(max_per_client)
        self.files = JobFiles(state_dir or tempfile.mkdtemp(prefix="raypipe-jobs-"), ttl_s)
        self.tasks: dict[str, asyncio.Task] = {}
        self.files.expire()
        self._resumed = False

    def _resume(self) -> None:
        """Once per replica, on its event loop: run again the jobs a dead replica left queued or running."""
        if self._resumed:
            return
        self._resumed = True
        for jid in self.files.unfinished():
            if jid not in self.tasks:
                log.info("job %s resumed after a restart", jid)
                self.tasks[jid] = asyncio.get_running_loop().create_task(self._run(jid, self.files.spec(jid)))

    def _live(self) -> list[dict[str, Any]]:
        self.files.expire()
        return [st for st in (self.files.state(j) for j in self.files.ids()) if st is not None]

    async def submit(self, spec: dict[str, Any], client: str = "") -> dict[str, Any]:
        """Queue a job; spec = pixels, pvf_input, age, sex, years, seeds, models. 429 when the store or the client is full."""
        self._resume()
        live = await asyncio.to_thread(self._live)
        if sum(1 for st in live if st.get("client") == client) >= self.max_per_client:
            return ServingError(429, f"this client has {self.max_per_client} generation jobs pending; fetch results first",
                                "client")
        if len(live) >= self.max_jobs:
            return ServingError(429, f"too many generation jobs pending ({self.max_jobs}); fetch results or retry later")
        jid = uuid.uuid4().hex
        await asyncio.to_thread(self.files.create, jid, spec, client)
        self.tasks[jid] = asyncio.get_running_loop().create_task(self._run(jid, spec))
        return {"job_id": jid, "status": "queued"}

    async def _run(self, jid: str, spec: dict[str, Any]) -> None:
        from raypipe.scoring.common import png_bytes
        from raypipe.scoring.future import summarise_future

        state = self.files.state(jid) or {}
        self.files.set_state(jid, {**state, "status": "running"})
        bpvf_call = asyncio.ensure_future(call(self.pvf_model.score, spec["pvf_input"], retries=self.retries))
        try:
            item = {k: spec[k] for k in ("pixels", "age", "sex", "years", "seeds")}
            item["clinical"] = spec.get("clinical") or {}
            images = await call(self.generator.generate, item, retries=self.retries)
            scores = await asyncio.gather(*[call(self.pvf_model.score_pixels, g.pixels, retries=self.retries)
                                            for g in images])
            bpvf = await bpvf_call
            gpvf: dict[float, list[float]] = {}
            for g, sc in zip(images, scores):
                gpvf.setdefault(float(g.year), []).append(float(sc))
            summary = summarise_future(bpvf, gpvf)
            summary["prompts"] = {str(g.year): g.prompt for g in images}
            summary["images"] = [{"year": g.year, "seed": g.seed, "pvf_score": float(sc),
                                  "png": b64png(png_bytes(np.round(np.clip(g.pixels, 0, 1) * 255).astype(np.uint8)))}
                                 for g, sc in zip(images, scores)]
            summary["models"] = spec.get("models", {})
            await asyncio.to_thread(self.files.finish, jid, "done", summary)
        except Exception as e:  # noqa: BLE001 - a failed job reports why; it must not take the store down
            problem = as_serving_error(unwrap(e))
            self.files.finish(jid, "failed", error=problem.message if problem else f"generation failed ({type(e).__name__})")
            if problem is None:
                log.exception("job %s failed", jid)
        finally:
            if not bpvf_call.done():
                bpvf_call.cancel()
            self.tasks.pop(jid, None)

    async def get(self, job_id: str) -> dict[str, Any] | None:
        """Status; a finished job's result is returned once and then removed. None for unknown or expired ids."""
        self._resume()
        self.files.expire()
        st = self.files.state(job_id)
        if st is None:
            return None
        out = {"job_id": job_id, "status": st["status"]}
        if st["status"] == "done":
            out.update(await asyncio.to_thread(self.files.result, job_id))
            self.files.remove(job_id)
        elif st["status"] == "failed":
            out["error"] = st.get("error")
            self.files.remove(job_id)
        return out

    async def stats(self) -> dict[str, int]:
        """Jobs by status (for tests and operators)."""
        self._resume()
        counts: dict[str, int] = {}
        for st in await asyncio.to_thread(self._live):
            counts[st["status"]] = counts.get(st["status"], 0) + 1
        return counts
