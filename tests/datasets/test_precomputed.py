import io

import numpy as np
import pyarrow as pa
import pytest

from influencespace import storage
from influencespace.datasets.precomputed import PrecomputedSpec, read_shards
from influencespace.embed.precomputed import to_embed_table, write_precomputed
from influencespace.errors import InputDataError

NPZ = PrecomputedSpec("npz", id_column="uid", image_key="b32_img", text_key="b32_txt")
PARQUET = PrecomputedSpec("parquet", id_column="uid", image_key="img", text_key="txt")


def _vectors(n=12, d=6, seed=0):
    rng = np.random.default_rng(seed)
    return [f"{i:032x}" for i in range(n)], rng.normal(size=(n, d)).astype(np.float16), rng.normal(size=(n, d)).astype(np.float16)


def write_npz_shard(directory, name, uids, img, txt, extra=None):
    buf = io.BytesIO()
    np.savez(buf, b32_img=img, b32_txt=txt, **(extra or {}))
    storage.write_bytes(f"{directory}/{name}.npz", buf.getvalue())
    storage.write_table(pa.table({"uid": uids, "text": ["caption"] * len(uids)}), f"{directory}/{name}.parquet")


def write_parquet_shard(directory, name, uids, img, txt):
    storage.write_table(pa.table({
        "uid": uids,
        "img": pa.FixedSizeListArray.from_arrays(pa.array(img.astype(np.float32).ravel()), img.shape[1]),
        "txt": [row.tolist() for row in txt.astype(np.float32)],
        "group": ["a"] * len(uids),
    }), f"{directory}/{name}.parquet")


def test_npz_and_parquet_layouts_give_the_same_embeddings(tmp_path):
    uids, img, txt = _vectors()
    write_npz_shard(tmp_path / "npz", "00000000", uids[:7], img[:7], txt[:7])
    write_npz_shard(tmp_path / "npz", "00000001", uids[7:], img[7:], txt[7:])
    write_parquet_shard(tmp_path / "pq", "part-0", uids, img, txt)
    from_npz = [to_embed_table(s, "concat", 0.5, "float32")[0] for s in read_shards(str(tmp_path / "npz"), NPZ)]
    [from_parquet] = [to_embed_table(s, "concat", 0.5, "float32")[0] for s in read_shards(str(tmp_path / "pq"), PARQUET)]
    npz_table = pa.concat_tables([t.select(["id", "embedding", "image_text_cosine"]) for t in from_npz])
    assert npz_table.column("id").to_pylist() == from_parquet.column("id").to_pylist() == uids
    a = np.stack(npz_table.column("embedding").to_numpy(zero_copy_only=False))
    b = np.stack(from_parquet.column("embedding").to_numpy(zero_copy_only=False))
    np.testing.assert_allclose(a, b, atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(a, axis=1), 1.0, atol=1e-5)  # unit towers, normalised concat
    assert from_parquet.column("group").to_pylist() == ["a"] * 12


def test_write_precomputed_rejects_non_finite_rows_and_resumes(tmp_path):
    uids, img, txt = _vectors()
    img[3, 0] = np.nan
    write_npz_shard(tmp_path / "in", "s0", uids[:8], img[:8], txt[:8])
    write_npz_shard(tmp_path / "in", "s1", uids[8:], img[8:], txt[8:])  # no reject in this shard
    out = str(tmp_path / "embed")
    first = write_precomputed(str(tmp_path / "in"), NPZ, "sum", 0.5, "float16", out)
    assert first["counts"] == {"input": 12, "embedded": 11, "rejected": 1} and first["dim"] == 6
    # A shard without rejects still writes string columns, so the directory reads as one table.
    rejects = storage.read_table(f"{out}/rejects").to_pylist()
    assert len(rejects) == 1 and rejects[0]["id"] == uids[3] and "non-finite" in rejects[0]["reason"]
    assert write_precomputed(str(tmp_path / "in"), NPZ, "sum", 0.5, "float16", out) == first


@pytest.mark.ray
@pytest.mark.parametrize("runner", ["local", "ray"])
def test_conversion_runs_a_task_per_shard_and_never_rereads_a_finished_one(tmp_path, runner, request):
    from influencespace.config import RuntimeConfig

    if runner == "ray":
        request.getfixturevalue("ray_cluster")
    runtime = RuntimeConfig(runner=runner)
    uids, img, txt = _vectors(n=30)
    for i in range(3):
        write_npz_shard(tmp_path / "in", f"s{i}", uids[10 * i:10 * i + 10], img[10 * i:10 * i + 10], txt[10 * i:10 * i + 10])
    out = str(tmp_path / "embed")
    first = write_precomputed(str(tmp_path / "in"), NPZ, "concat", 0.5, "float32", out, runtime=runtime)
    assert first == {"counts": {"input": 30, "embedded": 30, "rejected": 0}, "dim": 12, "tower_dim": 6}
    ids = storage.read_table(f"{out}/pool").column("id").to_pylist()
    assert sorted(ids) == sorted(uids)
    storage.write_bytes(str(tmp_path / "in" / "s1.npz"), b"not an npz any more")  # finished: never read again
    assert write_precomputed(str(tmp_path / "in"), NPZ, "concat", 0.5, "float32", out, runtime=runtime) == first


def test_a_shard_of_another_dimension_is_named_and_its_outputs_removed(tmp_path):
    uids, img, txt = _vectors()
    write_npz_shard(tmp_path / "in", "a", uids[:6], img[:6], txt[:6])
    u2, i2, t2 = _vectors(6, 8, seed=1)
    write_npz_shard(tmp_path / "in", "b", u2, i2, t2)
    out = tmp_path / "embed"
    with pytest.raises(InputDataError, match=r"b.npz': embedding dimension 8 differs from 6 in '.*a.npz'"):
        write_precomputed(str(tmp_path / "in"), NPZ, "sum", 0.5, "float16", str(out))
    assert sorted(p.name for p in (out / "pool").iterdir()) == ["part-00000.parquet"]
    assert sorted(p.name for p in (out / "rejects").iterdir()) == ["pool-00000.parquet"]


@pytest.mark.parametrize("break_it, message", [
    (lambda u, i, t: (u[:-1], i, t), "11 ids but 12 image embeddings"),
    (lambda u, i, t: (u, i, t[:, :4]), "image embeddings have dimension 6 but text embeddings 4"),
    (lambda u, i, t: (u, (i * 100).astype(np.int32), t), "has dtype int32"),
    (lambda u, i, t: (u[:1] * 12, i, t), "ids are not unique"),
])
def test_validation_errors_name_the_file(tmp_path, break_it, message):
    uids, img, txt = break_it(*_vectors())
    write_npz_shard(tmp_path, "bad", uids, img, txt)
    with pytest.raises(InputDataError, match=message) as info:
        list(read_shards(str(tmp_path), NPZ))
    assert "bad.npz" in str(info.value)


def test_dimension_must_agree_across_shards_and_files_must_exist(tmp_path):
    uids, img, txt = _vectors()
    write_npz_shard(tmp_path, "a", uids[:6], img[:6], txt[:6])
    u2, i2, t2 = _vectors(6, 8, seed=1)
    write_npz_shard(tmp_path, "b", u2, i2, t2)
    with pytest.raises(InputDataError, match="dimension 8 differs from 6"):
        list(read_shards(str(tmp_path), NPZ))
    storage.write_bytes(str(tmp_path / "lonely" / "x.npz"), b"")
    with pytest.raises(InputDataError, match="no id file beside it"):
        list(read_shards(str(tmp_path / "lonely"), NPZ))
    with pytest.raises(InputDataError, match=r"no \.parquet files"):
        list(read_shards(str(tmp_path / "nothing"), PARQUET))


@pytest.mark.s3
def test_npz_shards_from_s3(s3_prefix):
    uids, img, txt = _vectors()
    write_npz_shard(f"{s3_prefix}/pool", "s0", uids, img, txt)
    [shard] = list(read_shards(f"{s3_prefix}/pool", NPZ))
    assert shard.ids == uids and shard.image.shape == (12, 6)
