import pyarrow as pa
import pytest

from influencespace import storage
from influencespace.errors import InputDataError
from influencespace.stages import read_manifest, run_pipeline


def test_benchmark_source_builds_into_the_run_dir(make_config):
    config = make_config()
    [outcome] = run_pipeline(config, ["data"], report=lambda _: None)
    manifest = read_manifest(config, "data")
    assert outcome.status == "ran" and manifest["counts"]["pool"] == 300
    assert storage.read_table(storage.join(config.run_dir, "data", "pool")).num_rows == 300
    assert set(manifest["outputs"]) >= {"pool", "validation", "test", "ground_truth", "classes"}
    assert run_pipeline(config, ["data"], report=lambda _: None)[0].status == "skipped"


def test_user_parquet_is_checked_and_recorded(make_config, tmp_path):
    pairs = tmp_path / "pairs"
    storage.write_table(pa.table({"id": ["a"], "image": [b"x"], "text": ["t"]}), str(pairs / "part-0.parquet"))
    config = make_config("data.source=parquet", f"data.uri={pairs}")
    [outcome] = run_pipeline(config, ["data"], report=lambda _: None)
    assert outcome.manifest["outputs"]["pool"] == str(pairs)
    assert outcome.manifest["counts"] == {"files": 1}


def test_wrong_schema_fails_fast_naming_file_and_column(make_config, tmp_path):
    pairs = tmp_path / "pairs"
    storage.write_table(pa.table({"id": ["a"], "caption": ["t"]}), str(pairs / "part-0.parquet"))
    config = make_config("data.source=parquet", f"data.uri={pairs}")
    with pytest.raises(InputDataError, match=r"part-0.parquet' lacks column\(s\) text, image .* it has: id, caption"):
        run_pipeline(config, ["data"], report=lambda _: None)


def test_missing_or_corrupt_input_is_a_clear_error(make_config, tmp_path):
    with pytest.raises(InputDataError, match="no Parquet files"):
        run_pipeline(make_config("data.source=parquet", f"data.uri={tmp_path}"), ["data"], report=lambda _: None)
    (tmp_path / "bad.parquet").write_bytes(b"PAR1 garbage")
    with pytest.raises(InputDataError, match="bad.parquet' is not a readable Parquet file"):
        run_pipeline(make_config("data.source=parquet", f"data.uri={tmp_path}"), ["data"], report=lambda _: None)
    with pytest.raises(InputDataError, match="no WebDataset .tar shards"):
        run_pipeline(make_config("data.source=webdataset", f"data.uri={tmp_path}"), ["data"], report=lambda _: None)
