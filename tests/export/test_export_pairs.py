"""``export --pairs``: a run that started from precomputed embeddings takes sample bytes from the raw pairs."""

import io

import numpy as np
import pyarrow as pa
import pytest

from influencespace import storage
from influencespace.cli import main
from influencespace.datasets import webdataset
from influencespace.datasets.datacomp import _tar_bytes, datacomp_uid
from influencespace.errors import InputDataError
from influencespace.export import export_run, sample_id
from influencespace.stages import run_pipeline


@pytest.fixture
def embeddings_run(make_config, tiny_benchmark, tmp_path):
    """A run from DataComp-style shards (tar + parquet + npz, uid ids) with a curate manifest keeping half."""
    pool = storage.read_table(str(tiny_benchmark / "pool")).slice(0, 40).to_pylist()
    rows = [{**r, "uid": datacomp_uid(r["id"]), "benchmark_id": r["id"]} for r in pool]
    shards = str(tmp_path / "datacomp" / "pool")
    rng = np.random.default_rng(0)
    for index, part in enumerate((rows[:25], rows[25:])):
        stem = f"{shards}/{index:08d}"
        storage.write_bytes(f"{stem}.tar", _tar_bytes(part))
        storage.write_table(pa.table({"uid": [r["uid"] for r in part], "text": [r["text"] for r in part]}), f"{stem}.parquet")
        buf = io.BytesIO()
        np.savez(buf, b32_img=rng.normal(size=(len(part), 8)).astype(np.float16),
                 b32_txt=rng.normal(size=(len(part), 8)).astype(np.float16))
        storage.write_bytes(f"{stem}.npz", buf.getvalue())
    config = make_config("data.source=embeddings", "data.embeddings_format=npz", f"data.uri={shards}",
                         "data.id_column=uid", "data.image_key=b32_img", "data.text_key=b32_txt")
    run_pipeline(config, ["data"], report=lambda _: None)
    uids = sorted(r["uid"] for r in rows)
    keep = [i % 2 == 0 for i in range(len(uids))]
    weight = [1.0 + (i % 3) if k else 0.0 for i, k in enumerate(keep)]
    curate = storage.join(config.run_dir, "curate")
    storage.write_table(pa.table({"id": uids, "cluster": [0] * len(uids), "keep": keep, "weight": weight,
                                  "reason": ["kept" if k else "budget" for k in keep]}), f"{curate}/manifest/part-00000.parquet")
    storage.write_json(f"{curate}/_SUCCESS.json", {"stage": "curate", "fingerprint": "x"})
    expected = {u: w for u, k, w in zip(uids, keep, weight, strict=True) if k}
    return config.run_dir, shards, {r["uid"]: r for r in rows}, expected


def test_sample_id_prefers_the_configured_column_then_id_then_uid_then_key():
    meta = {"id": "a", "uid": "b", "key": "c"}
    assert sample_id(meta, "k", "key") == "c"
    assert sample_id(meta, "k", "uid") == "b"
    assert sample_id(meta, "k", "missing") == "a"
    assert sample_id({"uid": "b"}, "k") == "b"
    assert sample_id({}, "k", "uid") == "k"


@pytest.mark.ray
def test_export_takes_sample_bytes_from_the_original_pairs(embeddings_run, tmp_path, ray_cluster, capfd):
    run_dir, shards, originals, expected = embeddings_run
    with pytest.raises(InputDataError, match="--pairs"):
        export_run(run_dir, "webdataset", str(tmp_path / "nope"))

    # WebDataset pairs: the DataComp shard directory itself (its .parquet and .npz files are skipped).
    out = tmp_path / "wds"
    assert main(["export", run_dir, "--format", "webdataset", "--out", str(out), "--pairs", shards]) == 0
    # The console writes to the terminal's file descriptor (fd 1 as it was), not to sys.stdout.
    assert "{00000000..00000000}.tar" in capfd.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == ["00000000.tar"]  # DataComp-style shard names
    samples = list(webdataset.iter_samples(str(out)))
    assert {s["id"]: s["weight"] for s in samples} == pytest.approx(expected)
    for s in samples:  # the id is the JSON's uid (data.id_column), the bytes are the original pair's
        assert s["uid"] == s["id"] and s["benchmark_id"] == originals[s["id"]]["benchmark_id"]
        assert s["image"] == originals[s["id"]]["image"] and s["text"] == originals[s["id"]]["text"]

    # Parquet pairs with a uid column (and a stale id column: the configured uid wins).
    pairs = str(tmp_path / "pairs" / "pairs.parquet")
    rows = list(originals.values())
    storage.write_table(pa.table({"uid": [r["uid"] for r in rows], "id": [r["benchmark_id"] for r in rows],
                                  "image": [r["image"] for r in rows], "text": [r["text"] for r in rows]}), pairs)
    export_run(run_dir, "parquet", str(tmp_path / "pq"), pairs_uri=pairs)
    table = storage.read_table(str(tmp_path / "pq")).to_pylist()
    assert {r["id"]: r["weight"] for r in table} == pytest.approx(expected)
    assert all(r["uid"] == r["id"] and r["image"] == originals[r["id"]]["image"] for r in table)

    # Repeats from WebDataset pairs: JSON ids survive the round trip through the exported shards.
    export_run(run_dir, "webdataset", str(tmp_path / "rep"), weights_mode="repeats", pairs_uri=str(out))
    repeated = [s["id"] for s in webdataset.iter_samples(str(tmp_path / "rep"))]
    assert sorted(set(repeated)) == sorted(expected)
    assert len(repeated) == sum(round(w) for w in expected.values())
