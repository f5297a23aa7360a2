"""One place that turns URIs into filesystems, and the few file operations every stage needs.

URIs are plain local paths, ``file://`` paths or ``s3://bucket/key``. S3 goes through
``pyarrow.fs.S3FileSystem`` (what Ray Data and pyarrow read and write with) and, where an fsspec
filesystem is needed, ``s3fs``; both get the same endpoint, region and retry settings. Credentials are
never passed around or logged here: both libraries take them from the standard AWS environment
variables or the instance role.

Endpoint override, first found wins: :func:`configure` (from ``storage.s3_endpoint_url``),
``$AWS_ENDPOINT_URL_S3``, ``$AWS_ENDPOINT_URL``.

Atomicity: :func:`write_bytes` and :func:`write_table` make a file appear whole or not at all. Locally
they write a temporary sibling and rename it; on S3 an object only becomes visible when its (multipart)
upload completes. Stages build on this: a shard that exists is complete.
"""

from __future__ import annotations

import json
import logging
import os
import posixpath
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

from influencespace.errors import InputDataError, StorageError

if TYPE_CHECKING:
    import pyarrow as pa
    import pyarrow.fs as pafs


@dataclass(frozen=True)
class S3Settings:
    endpoint_url: str | None = None
    region: str | None = None
    retries: int = 5


_settings = S3Settings()
log = logging.getLogger(__name__)


def configure(endpoint_url: str | None = None, region: str | None = None, retries: int = 5) -> None:
    """Set process-wide S3 settings (called once from the pipeline config)."""
    global _settings
    _settings = S3Settings(endpoint_url, region, retries)
    _s3_pyarrow.cache_clear()
    _s3_fsspec.cache_clear()


def use(settings: S3Settings) -> None:
    """Adopt settings made by :func:`current_settings` in another process (how Ray workers get them)."""
    configure(settings.endpoint_url, settings.region, settings.retries)


def configure_from(storage_config: Any) -> None:
    configure(storage_config.s3_endpoint_url, storage_config.s3_region, storage_config.retries)


def current_settings() -> S3Settings:
    """Settings with environment defaults filled in (what a Ray worker needs to rebuild the filesystem)."""
    endpoint = _settings.endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    region = _settings.region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    return S3Settings(endpoint, region, _settings.retries)


def is_s3(uri: str) -> bool:
    return uri.startswith("s3://")


def join(uri: str, *parts: str) -> str:
    """Join path parts onto a URI with '/' (also for local paths)."""
    if is_s3(uri):
        return uri.rstrip("/") + "/" + "/".join(p.strip("/") for p in parts)
    return posixpath.join(_local_path(uri), *parts)


def _local_path(uri: str) -> str:
    if uri.startswith("file://"):
        return uri[len("file://") :]
    if "://" in uri:
        scheme = uri.split("://", 1)[0]
        raise StorageError(f"unsupported URI scheme '{scheme}://' in '{uri}': use a local path, file:// or s3://")
    return uri


def resolve(uri: str) -> tuple[pafs.FileSystem, str]:
    """Return the pyarrow filesystem for ``uri`` and the path inside it."""
    if is_s3(uri):
        parsed = urlparse(uri)
        if not parsed.netloc:
            raise StorageError(f"'{uri}' names no bucket: use s3://bucket/prefix")
        fs, path = _s3_pyarrow(current_settings()), f"{parsed.netloc}{parsed.path}".rstrip("/")
    else:
        import pyarrow.fs as pafs

        fs, path = pafs.LocalFileSystem(), os.path.abspath(_local_path(uri))
    log_dir = os.environ.get(READ_LOG_ENV)
    return (_counting(fs, log_dir), path) if log_dir else (fs, path)


# Read accounting (influencespace.read_log): with $INFLUENCESPACE_READ_LOG set to a directory, every
# file read through this module is counted; benchmarks/scale.py sums a stage's reads from its inputs.
READ_LOG_ENV = "INFLUENCESPACE_READ_LOG"


def _counting(fs: pafs.FileSystem, log_dir: str) -> pafs.FileSystem:
    from influencespace.read_log import counting_filesystem

    return counting_filesystem(fs, log_dir)


def fsspec_filesystem(uri: str) -> tuple[Any, str]:
    """Return an fsspec filesystem (s3fs on S3) and the path inside it."""
    if is_s3(uri):
        parsed = urlparse(uri)
        return _s3_fsspec(current_settings()), f"{parsed.netloc}{parsed.path}".rstrip("/")
    import fsspec

    return fsspec.filesystem("file"), os.path.abspath(_local_path(uri))


@lru_cache(maxsize=4)
def _s3_pyarrow(settings: S3Settings) -> pafs.S3FileSystem:
    import pyarrow.fs as pafs

    kwargs: dict[str, Any] = {
        "retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=max(1, settings.retries)),
    }
    if settings.region:
        kwargs["region"] = settings.region
    if settings.endpoint_url:
        endpoint = urlparse(settings.endpoint_url)
        if not endpoint.scheme or not endpoint.netloc:
            raise StorageError(
                f"S3 endpoint '{settings.endpoint_url}' must be a URL like http://127.0.0.1:8333 or https://s3.example.com"
            )
        kwargs["endpoint_override"] = endpoint.netloc
        kwargs["scheme"] = endpoint.scheme
        kwargs.setdefault("region", "us-east-1")
    return pafs.S3FileSystem(**kwargs)


@lru_cache(maxsize=4)
def _s3_fsspec(settings: S3Settings) -> Any:
    import s3fs

    client_kwargs: dict[str, Any] = {}
    if settings.region:
        client_kwargs["region_name"] = settings.region
    return s3fs.S3FileSystem(
        endpoint_url=settings.endpoint_url,
        client_kwargs=client_kwargs,
        config_kwargs={"retries": {"max_attempts": max(1, settings.retries), "mode": "standard"}},
    )


# --------------------------------------------------------------------------------------------------
# File operations


def _wrap(action: str, uri: str, exc: Exception) -> StorageError:
    return StorageError(f"could not {action} '{uri}': {exc}")


# S3 errors the AWS SDK does not retry although they are transient — the same list Ray Data retries on
# (DataContext.retried_io_errors). The best known: a 5xx or SlowDown answer to a small ranged GetObject
# whose error body does not fit the read buffer surfaces as INTERNAL_FAILURE "Failed to flush response
# stream", which the SDK marks non-retryable (apache/doris#61636, milvus-io/milvus#49872); it is what a
# read meets while an S3 server restarts (tests/faults/test_storage_faults.py).
TRANSIENT_S3_ERRORS = ("AWS Error INTERNAL_FAILURE", "AWS Error NETWORK_CONNECTION", "AWS Error SLOW_DOWN",
                       "AWS Error UNKNOWN (HTTP status 503)", "AWS Error SERVICE_UNAVAILABLE")
RETRY_BASE_SECONDS, RETRY_MAX_SECONDS = 0.5, 8.0


def _with_retries(uri: str, operation: Any) -> Any:
    """``operation()``, tried again with exponential backoff (0.5 s, 1 s, 2 s, … at most 8 s) while it fails
    with a transient S3 error, ``storage.retries`` attempts in all; local files and other errors are not retried."""
    attempts = max(1, _settings.retries) if is_s3(uri) else 1
    for attempt in range(1, attempts):
        try:
            return operation()
        except OSError as exc:
            if not any(marker in str(exc) for marker in TRANSIENT_S3_ERRORS):
                raise
            delay = min(RETRY_MAX_SECONDS, RETRY_BASE_SECONDS * 2 ** (attempt - 1))
            log.warning("storage: transient S3 error on '%s' (attempt %d of %d), retrying in %.1f s: %s",
                        uri, attempt, attempts, delay, exc)
            time.sleep(delay)
    return operation()  # the last attempt: its error is the caller's


def exists(uri: str) -> bool:
    import pyarrow.fs as pafs

    fs, path = resolve(uri)
    try:
        return fs.get_file_info(path).type != pafs.FileType.NotFound
    except OSError as exc:
        raise _wrap("check", uri, exc) from exc


def is_file(uri: str) -> bool:
    import pyarrow.fs as pafs

    fs, path = resolve(uri)
    try:
        return fs.get_file_info(path).type == pafs.FileType.File
    except OSError as exc:
        raise _wrap("check", uri, exc) from exc


def list_files(uri: str, suffix: str = "", recursive: bool = False) -> list[str]:
    """Sorted URIs of the files under a directory URI (hidden and temporary files left out)."""
    import pyarrow.fs as pafs

    fs, path = resolve(uri)
    try:
        infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True, recursive=recursive))
    except OSError as exc:
        raise _wrap("list", uri, exc) from exc
    out = []
    for info in infos:
        if info.type != pafs.FileType.File or not info.base_name.endswith(suffix):
            continue
        relative = info.path[len(path) :].lstrip("/")
        if any(part.startswith((".", "_")) for part in relative.split("/")):
            continue
        out.append(join(uri, relative))
    return sorted(out)


def read_bytes(uri: str) -> bytes:
    fs, path = resolve(uri)

    def read() -> bytes:
        with fs.open_input_stream(path) as f:
            return f.read()

    try:
        return _with_retries(uri, read)
    except FileNotFoundError as exc:
        raise StorageError(f"'{uri}' does not exist") from exc
    except OSError as exc:
        raise _wrap("read", uri, exc) from exc


def write_bytes(uri: str, data: bytes) -> None:
    """Write ``data`` so that ``uri`` appears complete or not at all."""
    fs, path = resolve(uri)

    def upload() -> None:  # the whole object from memory: trying it again is safe
        with fs.open_output_stream(path) as f:
            f.write(data)

    try:
        if is_s3(uri):
            _with_retries(uri, upload)
            return
        parent = os.path.dirname(path)
        os.makedirs(parent, exist_ok=True)
        tmp = os.path.join(parent, f".tmp-{uuid.uuid4().hex}-{os.path.basename(path)}")
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        raise _wrap("write", uri, exc) from exc


@contextmanager
def open_output(uri: str) -> Iterator[Any]:
    """A binary stream to write ``uri`` piece by piece; it appears complete or not at all.

    Locally a temporary file renamed into place when the block ends without an error; on S3 a
    multipart upload (pyarrow's output stream), which S3 completes only when the stream is closed. pyarrow
    cannot abort an upload, so a block that fails closes it and deletes the object again.
    """
    fs, path = resolve(uri)
    tmp = None
    try:
        if is_s3(uri):
            stream = fs.open_output_stream(path)
            try:
                yield stream
            except BaseException:
                stream.close()
                fs.delete_file(path)
                raise
            stream.close()
            return
        parent = os.path.dirname(path)
        os.makedirs(parent, exist_ok=True)
        tmp = os.path.join(parent, f".tmp-{uuid.uuid4().hex}-{os.path.basename(path)}")
        with open(tmp, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        tmp = None
    except OSError as exc:
        raise _wrap("write", uri, exc) from exc
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.remove(tmp)


def read_json(uri: str) -> Any:
    raw = read_bytes(uri)
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise StorageError(f"'{uri}' is not valid JSON ({exc}); delete it or rerun with --overwrite") from None


def write_json(uri: str, obj: Any) -> None:
    write_bytes(uri, (json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n").encode())


def write_table(table: pa.Table, uri: str, compression: str = "zstd", row_group_size: int | None = None) -> None:
    """Write a Parquet file atomically (``row_group_size``: rows a reader decodes at a time; default pyarrow's)."""
    import pyarrow.parquet as pq

    fs, path = resolve(uri)
    try:
        if is_s3(uri):  # the table is in memory: writing it again is safe
            _with_retries(uri, lambda: pq.write_table(table, path, filesystem=fs, compression=compression,
                                                      row_group_size=row_group_size))
            return
        parent = os.path.dirname(path)
        os.makedirs(parent, exist_ok=True)
        tmp = os.path.join(parent, f".tmp-{uuid.uuid4().hex}-{os.path.basename(path)}")
        pq.write_table(table, tmp, compression=compression, row_group_size=row_group_size)
        os.replace(tmp, path)
    except OSError as exc:
        raise _wrap("write", uri, exc) from exc


def write_partitions(table: pa.Table, partition: Any, directory: str, prefix: str, name: str) -> None:
    """The map side of a shuffle through files: the rows of ``table`` in partition p (``partition``: one
    non-negative integer per row) to ``<directory>/<prefix>-PPPPP/<name>``, one file per partition present.
    The reduce side reads ``<prefix>-PPPPP/`` whole. One sort, not one scan of the rows per partition."""
    import numpy as np

    partition = np.asarray(partition, dtype=np.int64)
    if not len(partition):
        return
    order = np.argsort(partition, kind="stable")
    present, starts = np.unique(partition[order], return_index=True)
    for p, start, stop in zip(present, starts, [*starts[1:], len(order)], strict=True):
        write_table(table.take(order[start:stop]), join(directory, f"{prefix}-{int(p):05d}", name))


def parquet_files(uri: str) -> list[str]:
    """``uri`` itself when it is a file, else every ``*.parquet`` file under it (sorted; may be empty)."""
    return [uri] if is_file(uri) else list_files(uri, ".parquet", recursive=True)


def read_table(uri: str, columns: list[str] | None = None) -> pa.Table:
    """Read one Parquet file, or every ``*.parquet`` file under a directory, as one table."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    files = parquet_files(uri)
    if not files:
        raise StorageError(f"no Parquet files at '{uri}'")
    tables = []
    for file_uri in files:
        fs, path = resolve(file_uri)
        try:
            tables.append(_with_retries(file_uri, lambda fs=fs, path=path: pq.read_table(path, filesystem=fs, columns=columns)))
        except (OSError, pa.ArrowInvalid) as exc:
            raise StorageError(f"could not read Parquet file '{file_uri}': {exc}") from exc
    return pa.concat_tables(tables) if len(tables) > 1 else tables[0]


@contextmanager
def open_parquet(uri: str) -> Iterator[Any]:
    """One Parquet file opened once (a ``pyarrow.parquet.ParquetFile``): its footer is read once, for
    its metadata and for every ``read(columns=…)`` of it — where ``read_table`` and ``parquet_rows``
    each read the footer again (a 64 KiB tail read)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    fs, path = resolve(uri)
    try:
        handle = fs.open_input_file(path)
        parquet = pq.ParquetFile(handle)
    except (OSError, pa.ArrowInvalid) as exc:
        raise StorageError(f"could not read Parquet file '{uri}': {exc}") from exc
    try:
        yield parquet
    finally:
        handle.close()


def parquet_rows(uri: str) -> int:
    """Row count of a Parquet file from its footer (no data read)."""
    import pyarrow.parquet as pq

    fs, path = resolve(uri)
    try:
        return _with_retries(uri, lambda: pq.read_metadata(path, filesystem=fs)).num_rows
    except OSError as exc:
        raise InputDataError(f"'{uri}' is not a readable Parquet file: {exc}") from None


def schema(uri: str) -> pa.Schema:
    """The schema of one Parquet file, or of the first ``*.parquet`` file under a directory."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    files = parquet_files(uri)
    if not files:
        raise StorageError(f"no Parquet files at '{uri}'")
    fs, path = resolve(files[0])
    try:
        return _with_retries(files[0], lambda: pq.read_schema(path, filesystem=fs))
    except (OSError, pa.ArrowInvalid) as exc:
        raise StorageError(f"could not read the schema of Parquet file '{files[0]}': {exc}") from exc


def remove_tree(uri: str) -> None:
    import pyarrow.fs as pafs

    fs, path = resolve(uri)
    try:
        if fs.get_file_info(path).type == pafs.FileType.Directory:
            fs.delete_dir(path)
        elif fs.get_file_info(path).type == pafs.FileType.File:
            fs.delete_file(path)
    except OSError as exc:
        raise _wrap("delete", uri, exc) from exc


def make_dirs(uri: str) -> None:
    """Create a local directory (no-op on S3, where prefixes need no creating)."""
    if not is_s3(uri):
        os.makedirs(_local_path(uri), exist_ok=True)
