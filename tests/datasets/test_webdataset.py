import tarfile

import pytest

from influencespace import storage
from influencespace.datasets import webdataset
from influencespace.errors import InputDataError

ROWS = [
    {"id": "pool-0000001", "image": b"\x89PNG-one", "text": "a sandal.", "group": "regular", "label": 5},
    {"id": "weird.id/with:chars", "image": b"\x89PNG-two", "text": "", "group": "inverted", "label": 7},
    {"id": "pool-0000003", "image": None, "text": "a bag.", "group": "regular", "label": 8},
]


def test_round_trip_keeps_every_field_and_id(tmp_path):
    shards = webdataset.write_shards(ROWS, str(tmp_path), shard_rows=2)
    assert [s.rsplit("/", 1)[-1] for s in shards] == ["shard-000000.tar", "shard-000001.tar"]
    back = list(webdataset.iter_samples(str(tmp_path)))
    assert back == ROWS


def test_layout_is_webdataset_key_dot_extension(tmp_path):
    webdataset.write_shards(ROWS[:2], str(tmp_path), shard_rows=10)
    with tarfile.open(tmp_path / "shard-000000.tar") as tar:
        names = tar.getnames()
    assert names[:3] == ["pool-0000001.png", "pool-0000001.txt", "pool-0000001.json"]
    assert names[3].startswith("77656972642e") and names[3].endswith(".png")  # hex key for an unsafe id


def test_unreadable_inputs_are_clear_errors(tmp_path):
    with pytest.raises(InputDataError, match="no .tar shards"):
        list(webdataset.iter_samples(str(tmp_path)))
    (tmp_path / "broken.tar").write_bytes(b"not a tar at all" * 10)
    with pytest.raises(InputDataError, match="not a readable tar"):
        list(webdataset.iter_samples(str(tmp_path / "broken.tar")))


@pytest.mark.s3
def test_round_trip_on_s3(s3_prefix):
    webdataset.write_shards(ROWS, f"{s3_prefix}/wds", shard_rows=2)
    assert list(webdataset.iter_samples(f"{s3_prefix}/wds")) == ROWS


@pytest.mark.ray
def test_ray_data_reads_our_shards(tmp_path, ray_cluster, tiny_benchmark):
    import ray.data

    table = storage.read_table(str(tiny_benchmark / "validation"))
    webdataset.write_table(table, str(tmp_path / "wds"), shard_rows=25)
    rows = ray.data.read_webdataset(str(tmp_path / "wds"), decoder=None).take_all()
    assert len(rows) == table.num_rows
    assert sorted(r["__key__"] for r in rows) == sorted(table.column("id").to_pylist())
    first = {r["__key__"]: r for r in rows}["val-000000"]
    assert first["png"] == table.column("image")[0].as_py()
