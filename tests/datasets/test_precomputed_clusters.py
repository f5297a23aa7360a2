"""DataComp-style ``.npz`` + uid shards and a Parquet file holding the same vectors cluster identically.

Both inputs go through the real ``data`` → ``embed`` (conversion) → ``cluster`` stages. The vectors are
float16, as DataComp ships them; the Parquet file stores the same values widened to float32, and the
reader widens both to float32 before normalising and fusing, so the two embed stages write bitwise
identical embeddings (asserted).

The npz pool is split into three shards and the Parquet pool is one file, as real pools are. k-means
sums each shard's points into per-centroid partial sums and then adds the shard sums, so float32
additions happen in a different order for the two layouts and the centroids differ in the last bits
(about 1e-7 here). With the same sharding (one npz shard) they are bitwise equal; with different
sharding the test allows 1e-6, and the assignments per id must be identical.
"""

import io

import numpy as np
import pyarrow as pa
import pytest

from influencespace import storage
from influencespace.stages import run_pipeline


def _blobs(n=240, d=16, centres=6, seed=0):
    rng = np.random.default_rng(seed)
    centre = rng.normal(size=(centres, d))
    which = rng.integers(0, centres, n)
    image = (centre[which] + 0.3 * rng.normal(size=(n, d))).astype(np.float16)
    text = (centre[which] + 0.3 * rng.normal(size=(n, d))).astype(np.float16)
    uids = [f"{int(u):032x}" for u in rng.choice(2**62, n, replace=False)]
    return uids, image, text


def _write_npz_pool(directory, uids, image, text, bounds):
    for shard, (start, stop) in enumerate(bounds):
        buf = io.BytesIO()
        np.savez(buf, b32_img=image[start:stop], b32_txt=text[start:stop])
        storage.write_bytes(f"{directory}/{shard:08d}.npz", buf.getvalue())
        storage.write_table(pa.table({"uid": uids[start:stop], "text": ["a caption"] * (stop - start)}),
                            f"{directory}/{shard:08d}.parquet")


def _write_parquet_pool(path, uids, image, text):
    def column(matrix):
        wide = matrix.astype(np.float32)
        return pa.FixedSizeListArray.from_arrays(pa.array(wide.ravel()), wide.shape[1])

    storage.write_table(pa.table({"uid": uids, "b32_img": column(image), "b32_txt": column(text)}), path)


def _cluster(make_config, run_dir, fmt, uri):
    config = make_config(
        "runtime.runner=local", "data.source=embeddings", f"data.embeddings_format={fmt}", f"data.uri={uri}",
        "data.id_column=uid", "data.image_key=b32_img", "data.text_key=b32_txt", "embed.dtype=float32",
        "cluster.k=5", "cluster.seeding_sample=240", run_dir=str(run_dir),
    )
    run_dir = str(run_dir)
    run_pipeline(config, ["data", "embed", "cluster"], report=lambda _: None)
    table = storage.read_table(storage.join(run_dir, "cluster", "assignments"), columns=["id", "cluster", "distance"])
    centroids = np.load(io.BytesIO(storage.read_bytes(storage.join(run_dir, "cluster", "centroids.npy"))))
    by_id = {i: (c, d) for i, c, d in zip(*(table.column(n).to_pylist() for n in ("id", "cluster", "distance")), strict=True)}
    embedded = storage.read_table(storage.join(run_dir, "embed", "pool"), columns=["id", "embedding"]).sort_by("id")
    return by_id, centroids, np.stack(embedded.column("embedding").to_numpy(zero_copy_only=False))


def test_npz_shards_and_parquet_give_the_same_clusters(make_config, tmp_path):
    uids, image, text = _blobs()
    _write_npz_pool(tmp_path / "npz", uids, image, text, [(0, 70), (70, 160), (160, 240)])
    _write_parquet_pool(str(tmp_path / "pq" / "pool.parquet"), uids, image, text)

    from_npz, centroids_npz, embedded_npz = _cluster(make_config, tmp_path / "run-npz", "npz", tmp_path / "npz")
    from_parquet, centroids_parquet, embedded_parquet = _cluster(make_config, tmp_path / "run-pq", "parquet", tmp_path / "pq")

    assert set(from_npz) == set(from_parquet) == set(uids)
    assert embedded_npz.dtype == np.float32 and np.array_equal(embedded_npz, embedded_parquet)  # bitwise
    assert {u: c for u, (c, _) in from_npz.items()} == {u: c for u, (c, _) in from_parquet.items()}
    assert len({c for c, _ in from_npz.values()}) == 5  # a real clustering, not everything in one cluster
    # Same points, same seed, different shard sums: equal to float32 rounding (see the module docstring).
    np.testing.assert_allclose(centroids_npz, centroids_parquet, rtol=0, atol=1e-6)
    np.testing.assert_allclose([d for _, d in from_npz.values()], [from_parquet[u][1] for u in from_npz], rtol=0, atol=1e-6)


def test_an_id_repeated_across_shards_is_a_clear_error_naming_both_files(make_config, tmp_path):
    """Each shard checks its own ids while converting; across shards the embed stage checks them in
    tasks (influencespace.ids.find_repeated_ids): the later shard, the column and the earlier shard named."""
    from influencespace.errors import InputDataError
    from influencespace.stages import read_manifest

    uids, image, text = _blobs()
    uids = list(uids)
    uids[150] = uids[20]  # row 150 is in shard 1 (rows 70–159), row 20 in shard 0
    _write_npz_pool(tmp_path / "npz", uids, image, text, [(0, 70), (70, 160), (160, 240)])
    config = make_config(
        "runtime.runner=local", "data.source=embeddings", "data.embeddings_format=npz", f"data.uri={tmp_path / 'npz'}",
        "data.id_column=uid", "data.image_key=b32_img", "data.text_key=b32_txt", run_dir=str(tmp_path / "run"),
    )
    with pytest.raises(InputDataError, match=rf"00000001.npz': column 'uid' repeats id '{uids[20]}' of '.*00000000.npz'"):
        run_pipeline(config, ["data", "embed"], report=lambda _: None)
    assert read_manifest(config, "embed") is None
