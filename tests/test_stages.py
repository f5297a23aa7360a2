import pyarrow as pa
import pytest

from influencespace import stages, storage
from influencespace.errors import StageStateError
from influencespace.stages import Stage, StageResult, read_manifest, run_stage


class ShardWriter(Stage):
    """Writes three shards; can be told to die after some, like a killed job."""

    name = "embed"
    section = "embed"

    def __init__(self, fail_after: int | None = None):
        self.fail_after = fail_after
        self.written: list[int] = []

    def run(self, ctx):
        for i in range(3):
            if ctx.shard_done(i):
                continue
            if self.fail_after is not None and len(self.written) == self.fail_after:
                raise KeyboardInterrupt("killed")
            storage.write_table(pa.table({"id": [f"row-{i}"]}), ctx.shard_path(i))
            self.written.append(i)
        return StageResult(counts={"rows": 3}, outputs={"pool": "."})


class Downstream(Stage):
    name = "cluster"
    inputs = ("embed",)
    section = "cluster"

    def run(self, ctx):
        rows = storage.read_table(ctx.input_path("embed", "pool")).num_rows
        return StageResult(counts={"seen": rows})


def test_run_writes_manifest_with_counts_versions_and_timings(make_config):
    config = make_config()
    outcome = run_stage(config, ShardWriter())
    manifest = read_manifest(config, "embed")
    assert outcome.status == "ran"
    assert manifest["counts"] == {"rows": 3}
    assert manifest["fingerprint"] == outcome.manifest["fingerprint"]
    assert {"python", "influencespace", "pyarrow"} <= set(manifest["versions"])
    assert manifest["seconds"] >= 0 and manifest["config"]["fusion"] == config.embed.fusion


def test_same_config_is_skipped(make_config):
    config = make_config()
    run_stage(config, ShardWriter())
    again = ShardWriter()
    assert run_stage(config, again).status == "skipped"
    assert again.written == []


def test_execution_only_change_still_skips(make_config, tmp_path):
    run_stage(make_config(), ShardWriter())
    assert run_stage(make_config("embed.batch_size=3"), ShardWriter()).status == "skipped"


def test_changed_config_is_refused_then_overwritten(make_config):
    run_stage(make_config(), ShardWriter())
    changed = make_config("embed.fusion=sum")
    with pytest.raises(StageStateError, match="different configuration.*--overwrite"):
        run_stage(changed, ShardWriter())
    stage = ShardWriter()
    assert run_stage(changed, stage, overwrite=True).status == "ran"
    assert stage.written == [0, 1, 2]


def test_interrupted_stage_resumes_from_completed_shards(make_config):
    config = make_config()
    with pytest.raises(KeyboardInterrupt):
        run_stage(config, ShardWriter(fail_after=2))
    assert read_manifest(config, "embed") is None
    resumed = ShardWriter()
    outcome = run_stage(config, resumed)
    assert outcome.status == "resumed" and outcome.manifest["resumed"] is True
    assert resumed.written == [2]
    ids = storage.read_table(storage.join(config.run_dir, "embed")).column("id").to_pylist()
    assert sorted(ids) == ["row-0", "row-1", "row-2"]


def test_partial_results_of_another_config_are_refused(make_config):
    with pytest.raises(KeyboardInterrupt):
        run_stage(make_config(), ShardWriter(fail_after=1))
    with pytest.raises(StageStateError, match="partial results of a different configuration"):
        run_stage(make_config("embed.fusion=sum"), ShardWriter())
    assert run_stage(make_config("embed.fusion=sum"), ShardWriter(), overwrite=True).status == "ran"


def test_upstream_change_invalidates_downstream(make_config):
    config = make_config()
    run_stage(config, ShardWriter())
    assert run_stage(config, Downstream()).manifest["counts"] == {"seen": 3}
    changed = make_config("embed.fusion=sum")
    run_stage(changed, ShardWriter(), overwrite=True)
    with pytest.raises(StageStateError, match="stage 'cluster'.*different configuration"):
        run_stage(changed, Downstream())


def test_missing_upstream_is_a_clear_error(make_config):
    with pytest.raises(StageStateError, match="needs stage 'embed' to have finished"):
        run_stage(make_config(), Downstream())


def test_corrupted_success_file_is_a_clear_error(make_config):
    config = make_config()
    run_stage(config, ShardWriter())
    storage.write_bytes(storage.join(config.run_dir, "embed", "_SUCCESS.json"), b"{truncated")
    with pytest.raises(Exception, match="_SUCCESS.json' is not valid JSON.*--overwrite"):
        run_stage(config, ShardWriter())
    storage.write_json(storage.join(config.run_dir, "embed", "_SUCCESS.json"), ["not", "a", "manifest"])
    with pytest.raises(StageStateError, match="is not a stage manifest"):
        run_stage(config, ShardWriter())


def test_pipeline_lists_missing_stages_and_rejects_unknown(make_config):
    assert stages.implemented_stages()[0] == "data"
    assert set(stages.implemented_stages()) | set(stages.missing_stages()) == set(stages.PIPELINE)
    with pytest.raises(Exception, match="unknown stage"):
        stages.run_pipeline(make_config(), ["nope"])


@pytest.mark.s3
def test_manifest_and_resume_on_s3(make_config, s3_prefix):
    config = make_config(run_dir=f"{s3_prefix}/run")
    with pytest.raises(KeyboardInterrupt):
        run_stage(config, ShardWriter(fail_after=1))
    resumed = ShardWriter()
    assert run_stage(config, resumed).status == "resumed"
    assert resumed.written == [1, 2]
    assert run_stage(config, ShardWriter()).status == "skipped"


def test_a_stage_that_failed_before_writing_does_not_block_a_corrected_config(make_config):
    class FailsAtOnce(ShardWriter):
        def run(self, ctx):
            raise ValueError("bad input")

    with pytest.raises(ValueError):
        run_stage(make_config(), FailsAtOnce())
    assert run_stage(make_config("embed.fusion=sum"), ShardWriter()).status == "ran"
