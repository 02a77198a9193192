"""Where the jobs read and write: a local path or a cloud URI (``s3://bucket/key``, ``gs://bucket/key``, anything
``pyarrow.fs`` opens), so a cluster without a shared file system keeps its datasets, checkpoints and outputs in a
bucket. pyarrow is what Ray Train itself stores checkpoints with, so both find the same credentials: the standard
environment (``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``, ``AWS_ENDPOINT_URL`` for an S3-compatible server such as
MinIO; ``GOOGLE_APPLICATION_CREDENTIALS``) or the machine's instance role.

Paths stay strings: a local one is used as it is (made absolute by ``absolute``), a URI is joined with ``/``. Writes
are whole-object: a local file is written under a temporary name and renamed, an object store's PUT is atomic, so a
reader never sees half a file either way."""

from __future__ import annotations

import contextlib
import os
import posixpath
import shutil
import tempfile
from pathlib import Path

TMP_SUFFIX = ".tmp"  # a local file being written (an interrupted write leaves one; readers ignore it)
_SCHEMES = {"gcs": "gs"}  # pyarrow's file system names that differ from their URI scheme


class StorageUnavailable(OSError):
    """A bucket that cannot be reached, read or written (network, credentials, permissions, no such bucket): the
    jobs stop on it with one line naming the URI."""


@contextlib.contextmanager
def _remote(uri: str):
    """Turn the object store's errors for ``uri`` into one ``StorageUnavailable`` line (FileNotFoundError stays)."""
    try:
        yield
    except FileNotFoundError:
        raise
    except OSError as err:
        reason = " ".join(str(err).split())
        raise StorageUnavailable(f"{uri}: {reason[:300]}") from None


def is_uri(path: str | os.PathLike) -> bool:
    return "://" in os.fspath(path)


# A URI that names a file on this machine's disk: an MLflow SQLite store (tracking.uri), a file:// URI.
SQLITE = "sqlite:///"
LOCAL_SCHEMES = (SQLITE, "file://")


def is_local(path: str | os.PathLike) -> bool:
    """Whether ``path`` is on this machine's disk (another node would not see it): a plain path, or a URI of
    ``LOCAL_SCHEMES``."""
    path = os.fspath(path)
    return not is_uri(path) or path.startswith(LOCAL_SCHEMES)


def absolute(path: str | os.PathLike) -> str:
    """A URI as it is, but for an SQLite store's path; a local path expanded (``~``) and made absolute (Ray workers
    run in other directories: ``sqlite:///runs/mlflow.db`` is relative to each one's own)."""
    path = os.fspath(path)
    if path.startswith(SQLITE):
        return SQLITE + absolute(path.removeprefix(SQLITE))  # sqlite:////abs/path
    return path if is_uri(path) else str(Path(path).expanduser().resolve())


def join(base: str | os.PathLike, *parts: str) -> str:
    base = os.fspath(base)
    if is_uri(base):
        return posixpath.join(base.rstrip("/"), *parts)
    return os.path.join(base, *parts)


def parent(path: str | os.PathLike) -> str:
    path = os.fspath(path)
    return posixpath.dirname(path.rstrip("/")) if is_uri(path) else os.path.dirname(path)


def _filesystem(uri: str):
    """(pyarrow file system, path inside it) for a URI."""
    import pyarrow.fs

    return pyarrow.fs.FileSystem.from_uri(uri)


def uri_of(filesystem, path: str) -> str:
    """The URI (or local path) of ``path`` inside a pyarrow ``filesystem``, e.g. a Ray Train checkpoint's."""
    if filesystem is None or filesystem.type_name == "local":
        return path
    scheme = _SCHEMES.get(filesystem.type_name, filesystem.type_name)
    return f"{scheme}://{path}"


def _object_kind(uri: str) -> str:
    """What is at ``uri``: "file", "directory" (a key prefix) or "none"."""
    import pyarrow.fs

    with _remote(uri):
        fs, inner = _filesystem(uri)
        kind = fs.get_file_info(inner).type
    return {pyarrow.fs.FileType.File: "file", pyarrow.fs.FileType.Directory: "directory"}.get(kind, "none")


def exists(path: str | os.PathLike) -> bool:
    path = os.fspath(path)
    return _object_kind(path) != "none" if is_uri(path) else os.path.exists(path)


def is_dir(path: str | os.PathLike) -> bool:
    path = os.fspath(path)
    return _object_kind(path) == "directory" if is_uri(path) else os.path.isdir(path)


def list_names(path: str | os.PathLike) -> list[str]:
    """The names of the entries directly inside directory ``path``; none when it does not exist."""
    path = os.fspath(path)
    if not is_uri(path):
        return sorted(os.listdir(path)) if os.path.isdir(path) else []
    import pyarrow.fs

    with _remote(path):
        fs, inner = _filesystem(path)
        entries = fs.get_file_info(pyarrow.fs.FileSelector(inner, allow_not_found=True))
    return sorted(entry.base_name for entry in entries)


def open_input(path: str | os.PathLike):
    """A binary stream to read; FileNotFoundError when there is nothing at ``path``."""
    path = os.fspath(path)
    if not is_uri(path):
        return open(path, "rb")
    with _remote(path):
        fs, inner = _filesystem(path)
        return fs.open_input_stream(inner)


def read_bytes(path: str | os.PathLike) -> bytes:
    with open_input(path) as stream, _remote(os.fspath(path)):
        return stream.read()


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` whole: readers see the old file or the new one, never a part."""
    path = os.fspath(path)
    if is_uri(path):
        with _remote(path):
            fs, inner = _filesystem(path)
            with fs.open_output_stream(inner) as stream:  # one PUT when it is closed
                stream.write(data)
        return
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path + TMP_SUFFIX, "wb") as f:
        f.write(data)
    os.replace(path + TMP_SUFFIX, path)


def put_file(local_file: str | os.PathLike, path: str | os.PathLike) -> None:
    """Move a finished local file to ``path`` (renamed when local, uploaded then deleted when a URI)."""
    local_file, path = os.fspath(local_file), os.fspath(path)
    if not is_uri(path):
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        os.replace(local_file, path)
        return
    import pyarrow.fs

    with _remote(path):
        fs, inner = _filesystem(path)
        pyarrow.fs.copy_files(local_file, inner, destination_filesystem=fs)
    os.unlink(local_file)


def remove(path: str | os.PathLike) -> None:
    """Remove a file or a directory tree; nothing there is fine."""
    path = os.fspath(path)
    if not is_uri(path):
        if os.path.isdir(path):
            shutil.rmtree(path, ignore_errors=True)
        elif os.path.lexists(path):
            os.unlink(path)
        return
    kind = _object_kind(path)
    with _remote(path):
        fs, inner = _filesystem(path)
        if kind == "directory":
            fs.delete_dir(inner)
        elif kind == "file":
            fs.delete_file(inner)


def make_dirs(path: str | os.PathLike) -> None:
    """Create a local directory; an object store needs none (its "directories" are key prefixes)."""
    if not is_uri(path):
        os.makedirs(path, exist_ok=True)


def local_copy(path: str | os.PathLike, suffix: str = "") -> str:
    """A local file holding what is at ``path``: ``path`` itself when local, else a download to a temporary file
    (the caller removes it) for readers that need a real file (``torch.load``, a tar reader that seeks)."""
    path = os.fspath(path)
    if not is_uri(path):
        return path
    with open_input(path) as stream, tempfile.NamedTemporaryFile(suffix=suffix, delete=False) as f, _remote(path):
        shutil.copyfileobj(stream, f, 1 << 20)
        return f.name


def upload_dir(local_dir: str | os.PathLike, uri: str) -> None:
    """Copy a local directory tree to ``uri`` (e.g. a dataset converted on this machine into a bucket)."""
    import pyarrow.fs

    with _remote(uri):
        fs, inner = _filesystem(uri)
        pyarrow.fs.copy_files(os.fspath(local_dir), inner, destination_filesystem=fs)
