"""Read accounting: with $INFLUENCESPACE_READ_LOG set, what storage reads is counted per file; unset, nothing is wrapped."""

import os

import pyarrow as pa
import pyarrow.fs as pafs

from influencespace import storage
from influencespace.read_log import read_bytes_under


def test_reads_through_storage_are_counted_under_a_path_and_off_by_default(tmp_path, monkeypatch):
    data, other, log = tmp_path / "pool", tmp_path / "other", str(tmp_path / "log")
    storage.write_table(pa.table({"x": list(range(50_000))}), str(data / "part-00000.parquet"))
    storage.write_bytes(str(other / "blob.bin"), b"z" * 1000)
    assert isinstance(storage.resolve(str(data))[0], pafs.LocalFileSystem)  # off: the plain filesystem

    monkeypatch.setenv(storage.READ_LOG_ENV, log)
    size = os.path.getsize(data / "part-00000.parquet")
    assert storage.read_bytes(str(data / "part-00000.parquet"))[:4] == b"PAR1"
    kept = storage.read_table(str(data), columns=["x"])  # held: counting must not wait for its file to be dropped
    assert kept.num_rows == 50_000
    assert storage.read_bytes(str(other / "blob.bin")) == b"z" * 1000
    counted = read_bytes_under(log, str(data))
    assert 2 * size <= counted <= 2 * size + 2 * 65_536  # the whole file twice, plus at most a footer read each
    assert read_bytes_under(log, str(other)) == 1000
    assert read_bytes_under(log, str(tmp_path / "po")) == 0  # a path prefix that is not a directory above
