import numpy as np
import pyarrow as pa
import pytest

from influencespace import storage
from influencespace.cli import main
from influencespace.datasets import webdataset
from influencespace.export import export_run, repeats, uid_array
from influencespace.stages import run_pipeline


@pytest.fixture
def curated_run(make_config):
    """A run with the tiny benchmark and a curate manifest keeping every third row with varied weights."""
    config = make_config()
    run_pipeline(config, ["data"], report=lambda _: None)
    ids = sorted(storage.read_table(storage.join(config.run_dir, "data", "pool"), columns=["id"]).column("id").to_pylist())
    keep = [i % 3 == 0 for i in range(len(ids))]
    weight = [(0.4 + (i % 7) * 0.5) if k else 0.0 for i, k in enumerate(keep)]
    curate = storage.join(config.run_dir, "curate")
    storage.write_table(pa.table({"id": ids, "cluster": [0] * len(ids), "keep": keep, "weight": weight,
                                  "reason": ["kept" if k else "budget" for k in keep]}), f"{curate}/manifest/part-00000.parquet")
    storage.write_json(f"{curate}/_SUCCESS.json", {"stage": "curate", "fingerprint": "x"})
    expected = {i: w for i, k, w in zip(ids, keep, weight, strict=True) if k}
    return config.run_dir, expected


def test_uid_array_formats():
    hex_ids = ["0000000000000001000000000000000a", "00000000000000000000000000000002"]
    datacomp = uid_array(hex_ids)
    assert datacomp.dtype == np.dtype("u8,u8") and datacomp.tolist() == [(0, 2), (1, 10)]
    assert uid_array(["b", "a"]).tolist() == ["a", "b"]


def test_repeats_rounding_never_drops_a_kept_sample():
    assert repeats(np.array([0.2, 0.5, 1.49, 1.5, 3.7])).tolist() == [1, 1, 1, 2, 4]


def test_uids_export(curated_run, tmp_path):
    run_dir, expected = curated_run
    assert main(["export", run_dir, "--format", "uids", "--out", str(tmp_path / "out")]) == 0
    uids = np.load(tmp_path / "out" / "uids.npy", allow_pickle=False)
    assert uids.tolist() == sorted(expected)
    assert (tmp_path / "out" / "uids.txt").read_text().split() == sorted(expected)
    weights = storage.read_table(str(tmp_path / "out" / "weights.parquet")).to_pydict()
    assert dict(zip(weights["id"], weights["weight"], strict=True)) == pytest.approx(expected)


@pytest.mark.ray
def test_parquet_and_webdataset_exports_round_trip(curated_run, tmp_path, ray_cluster):
    run_dir, expected = curated_run
    export_run(run_dir, "parquet", str(tmp_path / "pq"), rows_per_file=40)
    table = storage.read_table(str(tmp_path / "pq")).to_pandas()
    assert sorted(table["id"]) == sorted(expected)
    assert dict(zip(table["id"], table["weight"], strict=True)) == pytest.approx(expected)
    assert {"image", "text", "group", "label", "weight"} <= set(table.columns)

    export_run(run_dir, "webdataset", str(tmp_path / "wds"))
    samples = list(webdataset.iter_samples(str(tmp_path / "wds")))
    assert {s["id"]: s["weight"] for s in samples} == pytest.approx(expected)
    pool = storage.read_table(storage.join(run_dir, "data", "pool")).to_pandas().set_index("id")
    assert all(s["image"] == pool.loc[s["id"], "image"] and s["text"] == pool.loc[s["id"], "text"] for s in samples)
    import ray.data

    rows = ray.data.read_webdataset(str(tmp_path / "wds"), decoder=None).take_all()
    assert len(rows) == len(expected)

    export_run(run_dir, "webdataset", str(tmp_path / "rep"), weights_mode="repeats")
    repeated = list(webdataset.iter_samples(str(tmp_path / "rep")))
    assert len(repeated) == int(repeats(np.array(list(expected.values()))).sum())
    assert {s["id"] for s in repeated} == set(expected)


def test_export_needs_a_finished_curate_stage(tmp_path):
    with pytest.raises(Exception, match="no finished curate stage"):
        export_run(str(tmp_path), "uids", str(tmp_path / "o"))


@pytest.mark.s3
def test_uids_export_to_s3(curated_run, s3_prefix):
    run_dir, expected = curated_run
    export_run(run_dir, "uids", f"{s3_prefix}/out")
    assert storage.read_bytes(f"{s3_prefix}/out/uids.txt").decode().split() == sorted(expected)
