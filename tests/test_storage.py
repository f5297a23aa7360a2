import os

import pyarrow as pa
import pytest

from influencespace import storage
from influencespace.errors import StorageError


def test_join_and_resolve_local(tmp_path):
    assert storage.join(str(tmp_path), "a", "b.txt") == f"{tmp_path}/a/b.txt"
    fs, path = storage.resolve(f"file://{tmp_path}/x")
    assert path == f"{tmp_path}/x"
    assert type(fs).__name__ == "LocalFileSystem"


def test_unsupported_scheme_and_missing_bucket():
    with pytest.raises(StorageError, match="unsupported URI scheme 'gs://'"):
        storage.resolve("gs://bucket/x")
    with pytest.raises(StorageError, match="names no bucket"):
        storage.resolve("s3:///x")


def test_atomic_write_leaves_no_temporary_files(tmp_path):
    uri = str(tmp_path / "d" / "f.bin")
    storage.write_bytes(uri, b"one")
    storage.write_bytes(uri, b"two")
    assert storage.read_bytes(uri) == b"two"
    assert os.listdir(tmp_path / "d") == ["f.bin"]


def test_failed_write_keeps_previous_content(tmp_path, monkeypatch):
    uri = str(tmp_path / "f.json")
    storage.write_json(uri, {"v": 1})

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(StorageError, match="could not write"):
        storage.write_json(uri, {"v": 2})
    monkeypatch.undo()
    assert storage.read_json(uri) == {"v": 1}


def test_list_files_skips_hidden_and_marker_files(tmp_path):
    for name in ("part-00001.parquet", "part-00000.parquet", "_SUCCESS.json", ".tmp-x-part.parquet"):
        (tmp_path / name).write_bytes(b"x")
    assert storage.list_files(str(tmp_path), ".parquet") == [
        f"{tmp_path}/part-00000.parquet",
        f"{tmp_path}/part-00001.parquet",
    ]
    assert storage.list_files(str(tmp_path / "absent")) == []


def test_read_missing_and_corrupt_json(tmp_path):
    with pytest.raises(StorageError, match="does not exist"):
        storage.read_bytes(str(tmp_path / "nope"))
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(StorageError, match="is not valid JSON"):
        storage.read_json(str(tmp_path / "bad.json"))


def test_table_round_trip_local(tmp_path):
    table = pa.table({"id": ["a", "b"], "x": [1.0, 2.0]})
    storage.write_table(table.slice(0, 1), str(tmp_path / "t" / "part-00000.parquet"))
    storage.write_table(table.slice(1, 1), str(tmp_path / "t" / "part-00001.parquet"))
    assert storage.read_table(str(tmp_path / "t")).equals(table)


@pytest.mark.s3
def test_write_partitions_puts_each_row_in_its_partition_in_order(tmp_path):
    table = pa.table({"x": [10, 11, 12, 13, 14, 15]})
    storage.write_partitions(table, [2, 0, 2, 5, 0, 2], str(tmp_path), "bucket", "part-00003.parquet")
    written = {d: storage.read_table(str(tmp_path / d)).column("x").to_pylist() for d in sorted(os.listdir(tmp_path))}
    assert written == {"bucket-00000": [11, 14], "bucket-00002": [10, 12, 15], "bucket-00005": [13]}
    assert os.listdir(tmp_path / "bucket-00002") == ["part-00003.parquet"]
    storage.write_partitions(table.slice(0, 0), [], str(tmp_path / "none"), "bucket", "p.parquet")
    assert not (tmp_path / "none").exists()  # no rows: no files


def test_s3_round_trip_against_real_server(s3_prefix):
    table = pa.table({"id": ["a", "b"], "x": [1, 2]})
    storage.write_table(table, f"{s3_prefix}/t/part-00000.parquet")
    storage.write_json(f"{s3_prefix}/t/_SUCCESS.json", {"ok": True})
    assert storage.read_table(f"{s3_prefix}/t").equals(table)
    assert storage.list_files(f"{s3_prefix}/t") == [f"{s3_prefix}/t/part-00000.parquet"]
    assert storage.read_json(f"{s3_prefix}/t/_SUCCESS.json") == {"ok": True}
    assert storage.exists(f"{s3_prefix}/t") and not storage.exists(f"{s3_prefix}/absent")
    fs, path = storage.fsspec_filesystem(f"{s3_prefix}/t")
    assert sorted(p.rsplit("/", 1)[-1] for p in fs.ls(path)) == ["_SUCCESS.json", "part-00000.parquet"]
    storage.remove_tree(f"{s3_prefix}/t")
    assert not storage.exists(f"{s3_prefix}/t/part-00000.parquet")


@pytest.mark.s3
def test_s3_wrong_credentials_fail_with_the_uri(s3_prefix, monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong-secret")
    storage.configure(retries=1)
    try:
        with pytest.raises(StorageError) as info:
            storage.write_bytes(f"{s3_prefix}/x.bin", b"x")
        assert s3_prefix in str(info.value)
        assert "wrong-secret" not in str(info.value)
    finally:
        monkeypatch.undo()
        storage.configure()


@pytest.mark.s3
def test_endpoint_from_config_overrides_environment(s3_server, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing listens there
    storage.configure(endpoint_url=s3_server.endpoint)
    try:
        assert storage.current_settings().endpoint_url == s3_server.endpoint
        assert storage.list_files("s3://influencespace-test/definitely-absent") == []
    finally:
        storage.configure()


def test_bad_endpoint_is_a_clear_error():
    storage.configure(endpoint_url="127.0.0.1:8333")
    try:
        with pytest.raises(StorageError, match="must be a URL like http://"):
            storage.resolve("s3://bucket/x")
    finally:
        storage.configure()


class _FlakyS3:
    """A stand-in for pyarrow's S3 filesystem whose first ``failures`` reads fail with ``error``."""

    def __init__(self, failures: int, error: str):
        self.failures, self.error, self.calls = failures, error, 0

    def open_input_stream(self, path):
        import io

        self.calls += 1
        if self.calls <= self.failures:
            raise OSError(self.error)
        return io.BytesIO(b"payload")


FLUSH = "AWS Error INTERNAL_FAILURE during GetObject operation: Failed to flush response stream (eof: 0, bad: 1)"


@pytest.mark.parametrize("failures,error,succeeds,calls", [
    (2, FLUSH, True, 3),  # transient: tried again until it works
    (5, FLUSH, False, 5),  # storage.retries attempts in all, then the error, naming the URI
    (1, "AWS Error ACCESS_DENIED during GetObject operation", False, 1),  # not transient: at once
])
def test_transient_s3_read_errors_are_retried_with_backoff_and_others_are_not(monkeypatch, failures, error, succeeds, calls):
    """The AWS SDK does not retry INTERNAL_FAILURE 'Failed to flush response stream' (a 5xx answer to a small
    read); the storage layer does, as Ray Data does, and gives up after storage.retries attempts."""
    fake = _FlakyS3(failures, error)
    monkeypatch.setattr(storage, "resolve", lambda uri: (fake, "bucket/key"))
    sleeps = []
    monkeypatch.setattr("time.sleep", sleeps.append)
    monkeypatch.setattr(storage, "_settings", storage.S3Settings(retries=5))
    if succeeds:
        assert storage.read_bytes("s3://bucket/key") == b"payload"
    else:
        with pytest.raises(StorageError, match="could not read 's3://bucket/key'"):
            storage.read_bytes("s3://bucket/key")
    assert fake.calls == calls, fake.calls
    assert sleeps == [0.5 * 2**i for i in range(calls - 1)], sleeps  # none for an error that is not transient


def test_local_reads_are_not_retried(tmp_path):
    with pytest.raises(StorageError, match="does not exist"):
        storage.read_bytes(str(tmp_path / "missing.bin"))
