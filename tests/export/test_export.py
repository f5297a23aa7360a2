import numpy as np
import pyarrow as pa
import pyarrow.compute  # noqa: F401  (pa.compute)
import pytest

from influencespace import export, storage
from influencespace.cli import main
from influencespace.config import RuntimeConfig
from influencespace.datasets import webdataset
from influencespace.export import export_run, hex_halves, repeats, uid_array
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
    hex_ids = ["0000000000000001000000000000000a", "00000000000000000000000000000002", "FFFFFFFFFFFFFFFFffffffffffffffff"]
    datacomp = uid_array(hex_ids)
    assert datacomp.dtype == np.dtype("u8,u8"), datacomp.dtype
    assert datacomp.tolist() == [(0, 2), (1, 10), (2**64 - 1, 2**64 - 1)], datacomp.tolist()
    # hex_halves agrees with Python's own int(…, 16) on random uids
    rng = np.random.default_rng(0)
    uids = [f"{int(a):016x}{int(b):016x}" for a, b in rng.integers(0, 2**63, (50, 2), dtype=np.int64)]
    got = hex_halves(np.array(uids, dtype=object))
    assert got.tolist() == [(int(u[:16], 16), int(u[16:], 16)) for u in uids]
    assert uid_array(["b", "a"]).tolist() == ["a", "b"]


@pytest.mark.ray
@pytest.mark.parametrize("runner", ["local", "ray"])
@pytest.mark.parametrize("range_rows", [40, 1_000_000])
@pytest.mark.parametrize("hex_ids", [False, True])
def test_streamed_uids_equal_the_in_memory_reference(tmp_path, ray_cluster, monkeypatch, hex_ids, range_rows, runner):
    """Three manifest parts and a rejects part, sorted by ranges in tasks (one range, or ranges of ~40 rows from
    a sample of 5%): uid_array of the kept ids, exactly, and no scratch left behind."""
    monkeypatch.setattr(export, "RANGE_ROWS", range_rows)
    monkeypatch.setattr(export, "SAMPLES_PER_RANGE", 2)
    rng = np.random.default_rng(1)
    ids = [f"{int(a):016x}{int(b):016x}" for a, b in rng.integers(0, 2**63, (300, 2), dtype=np.int64)] if hex_ids \
        else [f"sample-{i}" * (1 + i % 3) for i in range(300)]
    keep = rng.random(300) < 0.6
    curate = tmp_path / "run" / "curate"
    for part, rows in (("part-00000", slice(0, 120)), ("part-00002", slice(120, 290)), ("rejected-00000", slice(290, 300))):
        storage.write_table(pa.table({"id": ids[rows], "cluster": [0] * len(ids[rows]),
                                      "keep": keep[rows] & (part != "rejected-00000"), "weight": rng.random(len(ids[rows])),
                                      "reason": ["x"] * len(ids[rows])}), str(curate / "manifest" / f"{part}.parquet"))
    storage.write_json(str(curate / "_SUCCESS.json"), {"stage": "curate"})
    kept = [i for i, k in zip(ids[:290], keep[:290], strict=True) if k]
    runtime = RuntimeConfig(runner=runner)
    assert export_run(str(tmp_path / "run"), "uids", str(tmp_path / "out"), runtime=runtime)["kept"] == len(kept)
    streamed, reference = np.load(tmp_path / "out" / "uids.npy", allow_pickle=False), uid_array(kept)
    assert streamed.dtype == reference.dtype and np.array_equal(streamed, reference), (streamed[:3], reference[:3])
    assert (tmp_path / "out" / "uids.txt").read_text().split() == sorted(kept)
    weights = storage.read_table(str(tmp_path / "out" / "weights.parquet"))
    assert weights.column("id").to_pylist() == sorted(kept)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["uids.npy", "uids.txt", "weights.parquet"]


def test_range_boundaries_split_the_sampled_ids_evenly():
    scans = [{"rows": 1000, "sample": [f"{i:04d}" for i in range(0, 1000, 10)]},
             {"rows": 3000, "sample": [f"{i:04d}" for i in range(1000, 4000, 30)]}, {"rows": 0, "sample": []}]
    assert export.range_boundaries(scans, 1000) == ["1000", "1990", "2980"]
    assert export.range_boundaries(scans, 4000) == []


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


@pytest.mark.ray
def test_export_refuses_pairs_that_lack_kept_ids(curated_run, tmp_path, ray_cluster):
    run_dir, expected = curated_run
    pool = storage.read_table(storage.join(run_dir, "data", "pool"))
    short = pool.filter(pa.compute.is_in(pool.column("id"), value_set=pa.array(sorted(expected)[2:])))
    storage.write_table(short, str(tmp_path / "pairs" / "part-00000.parquet"))
    with pytest.raises(Exception, match="lack 2 kept id"):
        export_run(run_dir, "parquet", str(tmp_path / "pq"), pairs_uri=str(tmp_path / "pairs"))


@pytest.mark.ray
@pytest.mark.s3
def test_uids_export_to_s3(curated_run, s3_prefix, ray_cluster):
    run_dir, expected = curated_run
    export_run(run_dir, "uids", f"{s3_prefix}/out")
    assert storage.read_bytes(f"{s3_prefix}/out/uids.txt").decode().split() == sorted(expected)
