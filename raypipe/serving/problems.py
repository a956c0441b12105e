"""One error type that crosses deployment boundaries, and the mapping from raypipe's errors to HTTP statuses.

raypipe's input errors take positional arguments that Ray's exception pickling cannot replay, so a
deployment converts them to `ServingError(status, message, field)` (plain args, always picklable)
before they leave the replica. Messages never contain server paths (the request's temp folder is
stripped) nor file names sent by the client (which could hold patient names).
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from raypipe.io.errors import ImageReadError, KeypointsError, MaskError, RaypipeInputError
from raypipe.serving.uploads import UploadError

# Manifest column names used by the readers -> the HTTP form fields they correspond to.
_HTTP_FIELDS = {"mask_path": "masks", "body_mask_path": "body_mask", "keypoints_path": "keypoints", "image_path": "image"}
_TMP_PATH = re.compile(r"(/[\w.\-]+)*/raypipe-req-[\w]+(/[^\s:'\",)]*)?")


class ServingError(Exception):
    """A request-level failure with its HTTP status; `field` names the form field or value at fault."""

    def __init__(self, status: int, message: str, field: str | None = None) -> None:
        super().__init__(status, message, field)
        self.status, self.message, self.field = int(status), str(message), field

    def __str__(self) -> str:
        return f"{self.status} {self.field or ''}: {self.message}"

    def to_json(self, request_id: str | None = None) -> dict[str, Any]:
        """The JSON error body: what is wrong, which field, the status and the request id."""
        return {"error": self.message, "field": self.field, "status": self.status, "request_id": request_id}


def scrub(message: str, workdir: Path | None = None) -> str:
    """A message without the server's temporary paths (the client learns what, not where)."""
    if workdir is not None:
        message = message.replace(str(workdir) + "/", "").replace(str(workdir), "")
    return _TMP_PATH.sub("<upload>", message)


def _status_of(exc: RaypipeInputError) -> int:
    """HTTP status of an input error: unreadable file 400, readable but unusable content 422, missing model 503."""
    from raypipe.registry import RegistryError
    from raypipe.scoring.xray import KeypointModelUnavailable

    if isinstance(exc, (KeypointModelUnavailable, RegistryError)):
        return 503
    if isinstance(exc, ImageReadError):
        return 400
    if isinstance(exc, (MaskError, KeypointsError)):
        return 422
    return 422


def as_serving_error(exc: BaseException, workdir: Path | None = None, field: str | None = None) -> ServingError | None:
    """Map a known input error to a `ServingError`; None for anything else (a bug: answered as 500)."""
    if isinstance(exc, ServingError):
        return exc
    if isinstance(exc, UploadError):
        return ServingError(exc.status, scrub(exc.message, workdir), exc.field)
    if isinstance(exc, RaypipeInputError):
        reason = getattr(exc, "reason", None) or str(exc)
        name = _HTTP_FIELDS.get(exc.field or "", exc.field) or field
        return ServingError(_status_of(exc), scrub(str(reason), workdir), name)
    return None


def unwrap(exc: BaseException) -> BaseException:
    """The original exception behind a Ray task error (the cause a deployment raised)."""
    cause = getattr(exc, "cause", None)
    return cause if isinstance(cause, BaseException) else exc
