"""Shard planning, schema checks and rejected rows, run through the stage in-process (runner=local)."""

import numpy as np
import pyarrow as pa
import pytest

from influencespace import storage
from influencespace.embed import pairs
from influencespace.errors import InputDataError
from influencespace.stages import read_manifest, run_pipeline
from tests.embed.conftest import TINY_CLIP, png

GOOD = png(np.full((28, 28), 120, np.uint8))


def _write(directory, name, rows):
    storage.write_table(pa.table(rows), str(directory / name))


def test_shards_cut_one_row_sequence_across_files(tmp_path):
    _write(tmp_path, "a.parquet", {"id": [f"a{i}" for i in range(10)], "image": [GOOD] * 10, "text": ["t"] * 10})
    _write(tmp_path, "b.parquet", {"id": [f"b{i}" for i in range(5)], "image": [GOOD] * 5, "text": ["t"] * 5})
    shards = pairs.plan_split("pool", str(tmp_path), "parquet", rows_per_shard=6)
    assert [s.rows for s in shards] == [6, 6, 3]
    assert [(p.uri.rsplit("/", 1)[1], p.start, p.stop) for p in shards[1].pieces] == [("a.parquet", 6, 10), ("b.parquet", 0, 2)]
    ids = [r for s in shards for batch in pairs.read_shard(s, batch_rows=4) for r in batch["id"]]
    assert ids == [f"a{i}" for i in range(10)] + [f"b{i}" for i in range(5)]
    assert pairs.Shard.from_json(shards[1].to_json()) == shards[1]


@pytest.mark.parametrize(
    "rows,message",
    [
        ({"id": ["a"], "image": [GOOD]}, r"lacks column\(s\) text"),
        ({"id": ["a"], "image": ["not bytes"], "text": ["t"]}, r"column 'image' has type string, expected binary"),
        ({"id": ["a"], "image": [GOOD], "text": [3]}, r"column 'text' has type int64, expected string"),
    ],
)
def test_a_wrong_schema_fails_fast_naming_the_column(tmp_path, rows, message):
    _write(tmp_path, "part-0.parquet", rows)
    with pytest.raises(InputDataError, match=message):
        pairs.plan_split("pool", str(tmp_path), "parquet", 100)


def test_bad_rows_are_rejected_with_reasons_and_counts_add_up(make_config, tiny_clip, tmp_path):
    config_path, checkpoint = tiny_clip
    rows = {
        "id": [f"r{i}" for i in range(9)],
        "image": [GOOD, b"garbage bytes", GOOD[:40], None, GOOD, GOOD, GOOD, GOOD, GOOD],
        "text": ["a coat.", "a coat.", "a coat.", "a coat.", "", "   ", None, "a bag.", "a dress."],
        "group": ["regular"] * 8 + ["inverted"],
        "label": [4, 4, 4, 4, 4, 4, 4, 8, None],
    }
    _write(tmp_path / "pairs", "part-0.parquet", rows)
    config = make_config(
        "runtime.runner=local", "data.source=parquet", f"data.uri={tmp_path / 'pairs'}", "embed.model=open_clip",
        f"embed.open_clip_model={TINY_CLIP}", f"embed.open_clip_config={config_path}", f"embed.pretrained={checkpoint}",
        "embed.rows_per_shard=4", "embed.batch_size=3",
    )
    run_pipeline(config, ["data", "embed"], report=lambda _: None)
    manifest = read_manifest(config, "embed")
    assert manifest["counts"] == {"pool": 3, "pool_rejected": 6, "pool_input": 9, "rejects": 6}
    assert manifest["extra"]["dim"] == 64 and manifest["extra"]["tower_dim"] == 32 and manifest["extra"]["shards"] == 3

    embedded = storage.read_table(storage.join(config.run_dir, "embed", "pool"))
    assert embedded.column("id").to_pylist() == ["r0", "r7", "r8"]
    assert embedded.schema.field("embedding").type == pa.list_(pa.float16(), 64)
    assert embedded.column("label").to_pylist() == [4, 8, None] and embedded.column("group").to_pylist()[2] == "inverted"
    rejects = {r["id"]: r["reason"] for r in storage.read_table(storage.join(config.run_dir, "embed", "rejects")).to_pylist()}
    assert set(rejects) == {"r1", "r2", "r3", "r4", "r5", "r6"}
    assert rejects["r1"].startswith("undecodable image") and rejects["r2"].startswith("undecodable image")
    assert (rejects["r3"], rejects["r4"], rejects["r5"], rejects["r6"]) == ("missing image", "empty caption", "empty caption", "missing caption")
