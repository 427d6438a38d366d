"""The one storage helper: local paths and ``s3://`` URIs through ``pyarrow.fs``.

Every reader and writer of the lake, the landing zone and the model store goes through a
:class:`Location`, so the same code runs on a laptop folder, a local S3 endpoint (moto server,
MinIO, LocalStack) and real S3.

Writes are *atomic per object*: :meth:`Location.write_atomic` writes aside under a hidden name and
then moves the object into place, so a reader never sees a half-written file and a crash
mid-write leaves the previous version. Hidden names start with ``.`` or ``_``, which pyarrow
datasets ignore.
"""

from __future__ import annotations

import contextlib
import io
import os
import posixpath
import uuid
from dataclasses import dataclass
from typing import Iterator

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq


class StorageError(OSError):
    """A storage location is missing, unreadable or not writable."""



def parquet_bytes(table: pa.Table, compression: str = "zstd") -> bytes:
    """``table`` as the bytes of one Parquet file (for :meth:`Location.write_bytes`)."""
    buf = io.BytesIO()
    pq.write_table(table, buf, compression=compression)
    return buf.getvalue()

@dataclass(frozen=True)
class Location:
    """A filesystem plus a root path on it; ``uri`` is what the user wrote."""

    fs: pafs.FileSystem
    root: str
    uri: str

    def path(self, *parts: str) -> str:
        """Join ``parts`` under the root (``parts`` must be relative, no ``..``)."""
        for part in parts:
            if part.startswith("/") or ".." in part.split("/"):
                raise ValueError(f"refusing path component {part!r} under {self.uri}")
        return posixpath.join(self.root, *parts) if parts else self.root

    def child(self, *parts: str) -> "Location":
        sub = posixpath.join(*parts)
        return Location(self.fs, self.path(sub), self.uri.rstrip("/") + "/" + sub)

    def display(self, path: str) -> str:
        """``path`` as the user would write it (with the ``s3://`` scheme where it applies)."""
        return f"s3://{path}" if isinstance(self.fs, pafs.S3FileSystem) else path

    def is_dir(self, path: str | None = None) -> bool:
        info = self.fs.get_file_info(path or self.root)
        return info.type == pafs.FileType.Directory

    def exists(self, path: str) -> bool:
        return self.fs.get_file_info(path).type != pafs.FileType.NotFound

    def list_files(self, path: str | None = None, recursive: bool = True) -> list[str]:
        """Sorted paths of the plain files under ``path`` (default: the root); [] if absent."""
        selector = pafs.FileSelector(path or self.root, recursive=recursive, allow_not_found=True)
        try:
            infos = self.fs.get_file_info(selector)
        except OSError as exc:
            raise StorageError(f"cannot list {self.display(path or self.root)}: {exc}") from exc
        return sorted(i.path for i in infos if i.type == pafs.FileType.File)

    def list_dirs(self, path: str | None = None) -> list[str]:
        selector = pafs.FileSelector(path or self.root, recursive=False, allow_not_found=True)
        return sorted(i.path for i in self.fs.get_file_info(selector) if i.type == pafs.FileType.Directory)

    def makedirs(self, path: str) -> None:
        if isinstance(self.fs, pafs.S3FileSystem):
            return  # S3 has no folders; creating one would leave a marker object behind
        self.fs.create_dir(path, recursive=True)

    @contextlib.contextmanager
    def write_atomic(self, path: str) -> Iterator[pa.NativeFile]:
        """Open a stream whose content replaces ``path`` only when the block exits cleanly."""
        parent, name = posixpath.split(path)
        self.makedirs(parent)
        tmp = posixpath.join(parent, f".tmp-{uuid.uuid4().hex}-{name}")
        try:
            with self.fs.open_output_stream(tmp, compression=None) as out:
                yield out
            self.fs.move(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                self.fs.delete_file(tmp)
            raise

    def write_bytes(self, path: str, data: bytes) -> None:
        with self.write_atomic(path) as out:
            out.write(data)

    def read_bytes(self, path: str) -> bytes:
        with self.fs.open_input_stream(path, compression=None) as f:
            return f.read()

    def delete(self, path: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.fs.delete_file(path)


def open_location(uri: str | os.PathLike[str], s3_endpoint_url: str | None = None, region: str | None = None) -> Location:
    """Resolve a local path or ``s3://bucket/prefix`` URI to a :class:`Location`.

    ``s3_endpoint_url`` points S3 at a local endpoint (e.g. ``http://127.0.0.1:5000``);
    credentials come from the standard AWS chain (environment, profile, instance role).
    """
    uri = os.fspath(uri)
    if uri.startswith("s3://"):
        kwargs: dict = {}
        if s3_endpoint_url:
            kwargs["endpoint_override"] = s3_endpoint_url
            kwargs["scheme"] = "https" if s3_endpoint_url.startswith("https") else "http"
            kwargs["allow_bucket_creation"] = True
        if region:
            kwargs["region"] = region
        fs = pafs.S3FileSystem(**kwargs)
        return Location(fs, uri[len("s3://") :].rstrip("/"), uri)
    if "://" in uri and not uri.startswith("file://"):
        raise StorageError(f"unsupported storage URI {uri!r}: use a local path or s3://bucket/prefix")
    path = uri[len("file://") :] if uri.startswith("file://") else uri
    return Location(pafs.LocalFileSystem(), os.path.abspath(path), uri)


def location_from_settings(uri: str, settings) -> Location:
    """:func:`open_location` with the S3 endpoint and region taken from :class:`~pipeline.config.Settings`."""
    aws = settings.aws
    return open_location(uri, aws.s3_endpoint_url or aws.endpoint_url, aws.region)
