"""Paths that may be local or `s3://` / `gs://` URIs: resolving, reading, fetching to a task-local temp dir, and
writing so that readers never see a partial file.

Filesystems come from pyarrow (`FileSystem.from_uri`); credentials and endpoint only from the standard
variables (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_ENDPOINT_URL`, `AWS_DEFAULT_REGION`, instance
profiles; Google's application-default credentials), never from code. Local files are written under a temp
name and renamed; an object store gets one PUT (or multipart upload), which becomes visible only complete.
"""
from __future__ import annotations

import functools
import inspect
import io
import json
import os
import posixpath
import shutil
import tempfile
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence, TypeVar

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


def absolute(path: str | os.PathLike) -> str:
    """A URI as given, a local path made absolute (never `os.path.abspath` on a URI: it would turn it local)."""
    return str(path) if is_uri(path) else os.path.abspath(local_path(path))


def parent(path: str | os.PathLike) -> str:
    """The folder holding a file, for local paths and URIs alike (`s3://b/x/m.csv` -> `s3://b/x`)."""
    p = str(path)
    if is_uri(p):
        scheme, _, rest = p.partition("://")
        return f"{scheme}://{posixpath.dirname(rest.rstrip('/'))}"
    return os.path.dirname(os.path.abspath(local_path(p)))


def resolve(value: str | os.PathLike, base: str | os.PathLike) -> str:
    """A path as written in a file, resolved against the file's folder `base` (local or URI); URIs stay as given."""
    v = str(value).strip()
    if is_uri(v):
        return v
    if v.startswith("file://"):
        return local_path(v)
    b = str(base)
    if is_uri(b):
        if v.startswith("/"):
            raise ValueError(f"absolute local path {v!r} in a file stored at {b!r}: write a URI or a relative path")
        scheme, _, rest = b.partition("://")
        joined = posixpath.normpath(posixpath.join(rest, v))
        if joined.split("/")[0] != rest.split("/")[0]:
            raise ValueError(f"relative path {v!r} leaves the bucket of {b!r}")
        return f"{scheme}://{joined}"
    p = Path(v).expanduser()
    return str(p if p.is_absolute() else Path(local_path(b)) / p)


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


def listdir(path: str | os.PathLike) -> list[tuple[str, bool]]:
    """(name, is_folder) of the entries directly inside a folder, sorted; [] when the folder does not exist."""
    fs, p = filesystem(path)
    infos = fs.get_file_info(pafs.FileSelector(p, recursive=False, allow_not_found=True))
    return sorted((posixpath.basename(i.path.rstrip("/")), i.type == pafs.FileType.Directory) for i in infos)


def is_file(path: str | os.PathLike) -> bool:
    """Whether `path` is a file (an object) on any filesystem."""
    fs, p = filesystem(path)
    return fs.get_file_info(p).type == pafs.FileType.File


def is_dir(path: str | os.PathLike) -> bool:
    """Whether `path` is a folder (a prefix holding objects) on any filesystem."""
    fs, p = filesystem(path)
    return fs.get_file_info(p).type == pafs.FileType.Directory


def remove(path: str | os.PathLike) -> None:
    """Delete a file or a folder with everything in it, on any filesystem; nothing when absent."""
    fs, p = filesystem(path)
    kind = fs.get_file_info(p).type
    if kind == pafs.FileType.Directory:
        fs.delete_dir(p)
    elif kind == pafs.FileType.File:
        fs.delete_file(p)


def download_tree(path: str | os.PathLike, target: str | os.PathLike) -> None:
    """Copy a file or folder (local or URI) to the local path `target`, bytes as stored; FileNotFoundError if absent."""
    fs, p = filesystem(path)
    kind = fs.get_file_info(p).type
    if kind == pafs.FileType.File:
        _download(fs, p, str(target))
    elif kind == pafs.FileType.Directory:
        os.makedirs(target, exist_ok=True)
        root = p.rstrip("/") + "/"
        for info in fs.get_file_info(pafs.FileSelector(p, recursive=True)):
            if info.type == pafs.FileType.File:
                _download(fs, info.path, os.path.join(str(target), *info.path[len(root):].split("/")))
    else:
        raise FileNotFoundError(f"no such file or folder: {path}")


def task_temp_dir(prefix: str = "raypipe-fetch-") -> str:
    """A fresh task-local temp dir (under RAYPIPE_FETCH_DIR when set, else the system temp dir); caller removes it."""
    return tempfile.mkdtemp(prefix=prefix, dir=os.environ.get("RAYPIPE_FETCH_DIR") or None)


@contextmanager
def localize_files(folder: str | os.PathLike, names: Sequence[str]) -> Iterator[str]:
    """A local folder holding the named files of `folder`: itself when local, else those files fetched into a
    task-local temp dir removed afterwards (a run folder's weights without its checkpoints); missing ones are skipped."""
    if not is_uri(folder):
        yield local_path(folder)
        return

    def fetch(tmp: str) -> str:
        for name in names:
            if is_file(join(folder, name)):
                download_tree(join(folder, name), os.path.join(tmp, name))
        return tmp

    with _fetched(folder, fetch) as local:
        yield local


@contextmanager
def staged_output(path: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """A local file path to write `path` through, for writers that need a real file (PNG, torch.save): on a local
    disk a temp name renamed into place, on an object store a task-local temp file uploaded in one PUT; neither
    leaves a partial file under the final name."""
    if not is_uri(path):
        with atomic_local_path(local_path(path), suffix) as tmp:
            yield tmp
        return
    tmp = task_temp_dir("raypipe-out-")
    try:
        f = Path(tmp) / (posixpath.basename(str(path).rstrip("/")) or "object")
        yield f
        atomic_write_bytes(path, f.read_bytes())
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextmanager
def localize(path: str | os.PathLike) -> Iterator[str]:
    """A local path for `path` while the block runs: itself when local, else a copy of the file or folder (a DICOM
    series, a mask folder) fetched into a fresh task-local temp dir that is removed afterwards.

    A URI that does not exist yields a path that does not exist either, so the reader reports its own
    "not found" error; errors raised in the block get a note naming the URI.
    """
    if not is_uri(path):
        yield local_path(path)
        return

    def fetch(tmp: str) -> str:
        target = os.path.join(tmp, posixpath.basename(str(path).rstrip("/")) or "object")
        try:
            download_tree(path, target)
        except FileNotFoundError:
            pass  # the reader reports "not found" for the (absent) local path
        return target

    with _fetched(path, fetch) as local:
        yield local


@contextmanager
def _fetched(source: str | os.PathLike, fetch: Callable[[str], str]) -> Iterator[str]:
    """What `fetch(temp_dir)` returns while the block runs, in a fresh task-local temp dir removed afterwards;
    errors raised in the block get a note naming `source` and the local copy."""
    tmp = task_temp_dir()
    try:
        target = fetch(tmp)
        try:
            yield target
        except BaseException as e:
            e.add_note(f"(read from {source}, fetched to {target})")
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _download(fs: pafs.FileSystem, src: str, dst: str) -> None:
    """Copy one object to a local file, bytes as stored (pyarrow's copy_files would gunzip `.gz` names)."""
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    with fs.open_input_stream(src, compression=None) as fin, open(dst, "wb") as fout:
        while chunk := fin.read(1 << 22):
            fout.write(chunk)


F = TypeVar("F", bound=Callable[..., Any])


def localized(*names: str) -> Callable[[F], F]:
    """Decorator for readers of local files: the named arguments that are URIs are fetched (`localize`) for the call."""
    def wrap(fn: F) -> F:
        sig = inspect.signature(fn)

        @functools.wraps(fn)
        def call(*args: Any, **kwargs: Any) -> Any:
            bound = sig.bind(*args, **kwargs)
            remote = [n for n in names if isinstance(bound.arguments.get(n), (str, os.PathLike))
                      and is_uri(bound.arguments[n])]
            if not remote:
                return fn(*args, **kwargs)
            with ExitStack() as stack:
                for n in remote:
                    bound.arguments[n] = stack.enter_context(localize(bound.arguments[n]))
                return fn(*bound.args, **bound.kwargs)
        return call  # type: ignore[return-value]
    return wrap


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
    """Write bytes so readers never see a partial file: local temp name then rename; one upload on object stores."""
    if not is_uri(path):
        with atomic_local_path(local_path(path)) as tmp:
            tmp.write_bytes(data)
        return
    # An S3 PUT (or a multipart upload, completed on close) is atomic: the object appears whole or not at all.
    # A temp object plus `move` would be a server-side copy and delete: twice the traffic, not more safety.
    fs, p = filesystem(path)
    with fs.open_output_stream(p, compression=None) as f:  # bytes as given: never gzip a `.gz` name again
        f.write(data)


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
    with fs.open_input_stream(p, compression=None) as f:  # bytes as stored: never gunzip a `.gz` name
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
