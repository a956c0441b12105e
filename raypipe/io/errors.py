"""Input errors raised by raypipe's readers: one hierarchy, each naming the file (and field) at fault.

All derive from `RaypipeInputError(ValueError)` so the CLI and the HTTP layer can turn any of them into
a clear message / 4xx response without catching unrelated bugs.
"""

from __future__ import annotations

import os
from typing import Any


class RaypipeInputError(ValueError):
    """Bad user input (a file, a folder, a value); carries `path`, `field` and `value` for reporting."""

    def __init__(
        self,
        message: str,
        *,
        path: str | os.PathLike[str] | None = None,
        field: str | None = None,
        value: Any = None,
    ) -> None:
        self.path = None if path is None else str(path)
        self.field = field
        self.value = value
        self.reason = message
        super().__init__(message if self.path is None else f"{self.path}: {message}")


class ImageReadError(RaypipeInputError):
    """An image (CT series, NIfTI, DICOM, PNG) that cannot be read; the message names the file."""

    def __init__(
        self, path: str | os.PathLike[str], reason: str, *, field: str | None = None, value: Any = None
    ) -> None:
        super().__init__(reason, path=path, field=field, value=value)


class MaskError(RaypipeInputError):
    """A segmentation mask that is missing, uses an unknown label map, or does not fit its CT."""

    def __init__(
        self, path: str | os.PathLike[str], reason: str, *, field: str | None = None, value: Any = None
    ) -> None:
        super().__init__(reason, path=path, field=field, value=value)


class ImageReadWarning(UserWarning):
    """A readable input with a problem worth reporting (several series, uneven slice spacing, ...)."""


class KeypointsError(RaypipeInputError):
    """A keypoints JSON that is missing, malformed, or lacks a level; `field` is the offending key."""

    def __init__(
        self, path: str | os.PathLike[str], reason: str, *, field: str | None = None, value: Any = None
    ) -> None:
        super().__init__(reason, path=path, field=field, value=value)
