"""Storage faults against the real S3 server: stopped, restarted, refusing — never a partial artifact."""

import os

import pyarrow as pa
import pytest

from influencespace import storage
from influencespace.errors import StorageError
from influencespace.stages import Stage, StageResult, read_manifest, run_stage

pytestmark = [pytest.mark.faults, pytest.mark.s3]


class ThreeShards(Stage):
    name = "embed"
    section = "embed"

    def __init__(self, before_shard=None):
        self.before_shard = before_shard or (lambda i: None)

    def run(self, ctx):
        for i in range(3):
            if not ctx.shard_done(i):
                self.before_shard(i)
                storage.write_table(pa.table({"id": [f"r{i}"]}), ctx.shard_path(i))
        return StageResult(counts={"rows": 3}, outputs={"pool": "."})


def test_server_down_is_a_clear_error_naming_the_uri_then_resume_after_restart(s3_server, s3_prefix, make_config, record_fault):
    config = make_config(run_dir=f"{s3_prefix}/run")
    storage.configure(retries=2)
    try:
        def stop_before_third(i):
            if i == 2:
                s3_server.stop()

        with pytest.raises(StorageError) as info:
            run_stage(config, ThreeShards(stop_before_third))
        assert "part-00002.parquet" in str(info.value) and s3_prefix in str(info.value)
        assert os.environ["AWS_SECRET_ACCESS_KEY"] not in str(info.value)
    finally:
        s3_server.restart()
        storage.configure()
    assert read_manifest(config, "embed") is None  # the failed run left no success marker
    outcome = run_stage(config, ThreeShards())
    assert outcome.status == "resumed"
    assert sorted(storage.read_table(f"{s3_prefix}/run/embed").column("id").to_pylist()) == ["r0", "r1", "r2"]
    record_fault("S3 server stopped mid-stage", "StorageError naming the URI, no success marker; rerun after restart resumed")


def test_restart_between_requests_is_survived(s3_server, s3_prefix, record_fault):
    storage.write_bytes(f"{s3_prefix}/a.bin", b"before")
    s3_server.restart()
    assert storage.read_bytes(f"{s3_prefix}/a.bin") == b"before"
    storage.write_bytes(f"{s3_prefix}/b.bin", b"after")
    assert storage.read_bytes(f"{s3_prefix}/b.bin") == b"after"
    record_fault("S3 server restarted between requests", "reads and writes go on (client retries)")
