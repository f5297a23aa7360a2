"""Counting the bytes a stage reads, across all of its processes (what benchmarks/scale.py reports).

With ``$INFLUENCESPACE_READ_LOG`` set to a directory, :func:`influencespace.storage.resolve` hands out
a filesystem whose input files append one line ``<bytes>\\t<path>`` to ``<dir>/<pid>.tsv`` for every
read (Parquet reads whole column chunks, so a file gives a few lines; each line is written as its read
returns, so nothing depends on a file being closed or a process exiting cleanly). The environment
reaches Ray's workers with the local cluster the stage starts. :func:`read_bytes_under` adds up the lines of the files under a path. Off
(the default), nothing is wrapped.
"""

from __future__ import annotations

import os
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs

_LOGS: dict[str, Any] = {}  # this process's open log, per directory


def _log(log_dir: str, count: int, path: str) -> None:
    key = f"{log_dir}:{os.getpid()}"  # a forked child writes its own file
    if key not in _LOGS:
        os.makedirs(log_dir, exist_ok=True)
        _LOGS[key] = open(os.path.join(log_dir, f"{os.getpid()}.tsv"), "a", buffering=1)  # line-buffered
    _LOGS[key].write(f"{count}\t{path}\n")


class _CountedFile:
    """A readable file that logs the bytes of every read from it."""

    def __init__(self, raw: Any, path: str, log_dir: str):
        self.raw, self.path, self.log_dir, self.closed = raw, path, log_dir, False

    def read(self, nbytes: int = -1) -> bytes:
        data = self.raw.read() if nbytes is None or nbytes < 0 else self.raw.read(nbytes)
        if data:
            _log(self.log_dir, len(data), self.path)
        return data

    def seek(self, offset: int, whence: int = 0) -> int:
        return self.raw.seek(offset, whence)

    def tell(self) -> int:
        return self.raw.tell()

    def size(self) -> int:
        return self.raw.size()

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return self.raw.seekable()

    def writable(self) -> bool:
        return False

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.raw.close()


class CountingHandler(pafs.FileSystemHandler):
    """A pyarrow filesystem handler over another filesystem, counting what its input files read."""

    def __init__(self, fs: pafs.FileSystem, log_dir: str):
        self.fs, self.log_dir = fs, log_dir

    def __reduce__(self):
        return (CountingHandler, (self.fs, self.log_dir))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, CountingHandler) and self.fs.equals(other.fs)

    def __ne__(self, other: object) -> bool:
        return not self == other

    def get_type_name(self) -> str:
        return f"counting+{self.fs.type_name}"

    def normalize_path(self, path: str) -> str:
        return self.fs.normalize_path(path)

    def get_file_info(self, paths: list[str]) -> list:
        return self.fs.get_file_info(paths)

    def get_file_info_selector(self, selector: Any) -> list:
        return self.fs.get_file_info(selector)

    def create_dir(self, path: str, recursive: bool) -> None:
        self.fs.create_dir(path, recursive=recursive)

    def delete_dir(self, path: str) -> None:
        self.fs.delete_dir(path)

    def delete_dir_contents(self, path: str, missing_dir_ok: bool = False) -> None:
        self.fs.delete_dir_contents(path, missing_dir_ok=missing_dir_ok)

    def delete_root_dir_contents(self) -> None:
        raise OSError("refusing to delete the root directory's contents")

    def delete_file(self, path: str) -> None:
        self.fs.delete_file(path)

    def move(self, src: str, dest: str) -> None:
        self.fs.move(src, dest)

    def copy_file(self, src: str, dest: str) -> None:
        self.fs.copy_file(src, dest)

    def open_input_stream(self, path: str) -> Any:
        return pa.PythonFile(_CountedFile(self.fs.open_input_stream(path), path, self.log_dir), mode="r")

    def open_input_file(self, path: str) -> Any:
        return pa.PythonFile(_CountedFile(self.fs.open_input_file(path), path, self.log_dir), mode="r")

    def open_output_stream(self, path: str, metadata: Any = None) -> Any:
        return self.fs.open_output_stream(path, metadata=metadata)

    def open_append_stream(self, path: str, metadata: Any = None) -> Any:
        return self.fs.open_append_stream(path, metadata=metadata)


def counting_filesystem(fs: pafs.FileSystem, log_dir: str) -> pafs.FileSystem:
    return pafs.PyFileSystem(CountingHandler(fs, log_dir))


def read_bytes_under(log_dir: str, under: str) -> int:
    """Bytes the processes that logged to ``log_dir`` read from files under the local path or S3 URI ``under``."""
    prefix = under.split("://", 1)[1] if "://" in under else os.path.abspath(under)
    prefix = prefix.rstrip("/") + "/"
    total = 0
    if os.path.isdir(log_dir):
        for name in sorted(os.listdir(log_dir)):
            with open(os.path.join(log_dir, name)) as log:
                for line in log:
                    count, _, path = line.rstrip("\n").partition("\t")
                    if path.startswith(prefix):
                        total += int(count)
    return total
