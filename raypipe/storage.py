"""Output paths that may be local or `s3://` / `gs://` URIs, written atomically (temp name, then rename)."""
from __future__ import annotations

import io
import json
import os
import posixpath
import tempfile
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import pyarrow.fs as pafs


def is_uri(path: str | os.PathLike) -> bool:
    """True for `scheme://` paths that need a pyarrow filesystem rather than the local one."""
    return "://" in str(path) and not str(path).startswith("file://")


def local_path(path: str | os.PathLike) -> str:
    """A `file://` URI or plain path as a local path."""
    p = str(path)
    return p[len("file://"):] if p.startswith("file://") else p


def filesystem(path: str | os.PathLike) -> tuple[pafs.FileSystem, str]:
    """Resolve a local path or URI to (pyarrow filesystem, path inside it)."""
    p = str(path)
    if is_uri(p):
        return pafs.FileSystem.from_uri(p)
    return pafs.LocalFileSystem(), os.path.abspath(local_path(p))


def join(base: str | os.PathLike, *parts: str) -> str:
    """Join path parts for both local paths and URIs."""
    b = str(base)
    if is_uri(b):
        return posixpath.join(b, *parts)
    return os.path.join(b, *parts)


def makedirs(path: str | os.PathLike) -> None:
    """Create a folder (and parents) on any filesystem."""
    fs, p = filesystem(path)
    fs.create_dir(p, recursive=True)


def exists(path: str | os.PathLike) -> bool:
    """Whether a file or folder exists on any filesystem."""
    fs, p = filesystem(path)
    return fs.get_file_info(p).type != pafs.FileType.NotFound


@contextmanager
def atomic_local_path(path: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary local file path that replaces `path` only when the block succeeds."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=suffix or target.suffix, dir=target.parent)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; outputs should read like any other file
    try:
        yield Path(tmp)
        os.replace(tmp, target)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write bytes so readers never see a partial file: temp name in the same folder, then rename."""
    if not is_uri(path):
        with atomic_local_path(local_path(path)) as tmp:
            tmp.write_bytes(data)
        return
    fs, p = filesystem(path)
    parent = posixpath.dirname(p)
    fs.create_dir(parent, recursive=True)
    tmp = posixpath.join(parent, f".{posixpath.basename(p)}.{uuid.uuid4().hex}.tmp")
    with fs.open_output_stream(tmp) as f:
        f.write(data)
    try:
        fs.move(tmp, p)
    except Exception:
        fs.delete_file(tmp)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Text variant of `atomic_write_bytes` (UTF-8)."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write JSON atomically, pretty-printed so people can diff it."""
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def _json_default(o: Any) -> Any:
    import numpy as np

    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def read_bytes(path: str | os.PathLike) -> bytes:
    """Read a whole file from any filesystem."""
    fs, p = filesystem(path)
    with fs.open_input_stream(p) as f:
        return f.read()


def atomic_write_parquet(table: Any, path: str | os.PathLike) -> None:
    """Write a pyarrow Table (or pandas DataFrame) to Parquet atomically."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if not isinstance(table, pa.Table):
        table = pa.Table.from_pandas(table, preserve_index=False)
    buf = io.BytesIO()
    pq.write_table(table, buf)
    atomic_write_bytes(path, buf.getvalue())
