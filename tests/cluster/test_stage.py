"""The cluster stage over a synthetic embed output: contracts, resume, bad input, Ray == in-memory."""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import pytest

from influencespace import storage
from influencespace.cluster.kmeans import InMemoryDataset, KMeansParams, fit
from influencespace.cluster.shards import ShardedDataset
from influencespace.cluster.stage import ClusterStage
from influencespace.errors import ConfigError, InputDataError
from influencespace.stages import load_stage, run_stage
from tests.cluster.synthetic import gaussian_blobs, write_embed_output

LOCAL = ("runtime.runner=local", "cluster.k=12", "cluster.max_iter=8", "cluster.tol=0", "cluster.seeding_sample=600")


def centroids_of(run_dir: str) -> np.ndarray:
    return np.load(io.BytesIO(storage.read_bytes(storage.join(run_dir, "cluster", "centroids.npy"))))


def assignments_of(run_dir: str):
    return storage.read_table(storage.join(run_dir, "cluster", "assignments")).sort_by("id")


def reference(x: np.ndarray, config) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The in-memory result on the same (float16-rounded) rows: centroids, labels, distances."""
    cfg = config.cluster
    data = InMemoryDataset(x.astype(np.float16).astype(np.float32), spherical=cfg.spherical)
    result = fit(data, KMeansParams.from_config(cfg))
    labels, distances = data.assign(result.centroids, result.coarse)
    return result.centroids, labels, distances


def test_registered_and_writes_the_documented_outputs(tmp_path, make_config, blobs):
    assert isinstance(load_stage("cluster"), ClusterStage)
    upstream = {"embed": write_embed_output(str(tmp_path / "embed"), blobs, shard_rows=250)}
    config = make_config(*LOCAL)
    manifest = run_stage(config, ClusterStage(), upstream=upstream).manifest

    assert manifest["outputs"] == {"centroids": "centroids.npy", "assignments": "assignments", "log": "kmeans_log.json"}
    assert manifest["counts"]["points"] == 1200 and manifest["counts"]["shards"] == 5
    assert manifest["counts"]["rejected"] == 0 and manifest["counts"]["clusters"] == 12
    files = storage.list_files(storage.join(config.run_dir, "cluster", "assignments"))
    assert [f.rsplit("/", 1)[1] for f in files] == [f"part-{i:05d}.parquet" for i in range(5)]
    table = assignments_of(config.run_dir)
    assert table.schema.field("cluster").type == pa.int32() and table.schema.field("distance").type == pa.float32()
    assert table.column_names == ["id", "cluster", "distance"] and table.num_rows == 1200

    centroids, labels, distances = reference(blobs, config)
    np.testing.assert_allclose(centroids_of(config.run_dir), centroids, atol=1e-5)
    np.testing.assert_array_equal(table.column("cluster").to_numpy(), labels)
    np.testing.assert_allclose(table.column("distance").to_numpy(), distances, atol=1e-5)

    log = storage.read_json(storage.join(config.run_dir, "cluster", "kmeans_log.json"))
    assert len(log["iterations"]) == 8 and log["spherical"] is True and "faiss CPU flat index" in log["index"]
    assert log["cluster_sizes"]["empty"] == 0
    np.testing.assert_allclose(log["final_objective"], distances.sum(dtype=np.float64), rtol=1e-5)


def test_killed_run_resumes_to_the_same_result(tmp_path, make_config, blobs, monkeypatch):
    upstream = {"embed": write_embed_output(str(tmp_path / "embed"), blobs, shard_rows=300)}
    whole = make_config(*LOCAL, run_dir=str(tmp_path / "whole"))
    run_stage(whole, ClusterStage(), upstream=upstream)

    config = make_config(*LOCAL, run_dir=str(tmp_path / "killed"))
    original = ShardedDataset.step
    passes = {"n": 0}

    def dies_on_the_fifth_pass(self, centroids, coarse, spherical):
        passes["n"] += 1
        if passes["n"] == 5:
            raise KeyboardInterrupt("killed")
        return original(self, centroids, coarse, spherical)

    monkeypatch.setattr(ShardedDataset, "step", dies_on_the_fifth_pass)
    with pytest.raises(KeyboardInterrupt):
        run_stage(config, ClusterStage(), upstream=upstream)
    monkeypatch.setattr(ShardedDataset, "step", original)

    outcome = run_stage(config, ClusterStage(), upstream=upstream)
    assert outcome.status == "resumed"
    log = storage.read_json(storage.join(config.run_dir, "cluster", "kmeans_log.json"))
    assert log["resumed_after"] == {"flat": 4}
    np.testing.assert_array_equal(centroids_of(config.run_dir), centroids_of(whole.run_dir))
    assert assignments_of(config.run_dir).equals(assignments_of(whole.run_dir))


def test_nonfinite_embeddings_are_rejected_with_a_count(tmp_path, make_config, blobs):
    x = blobs.copy()
    x[5, 0], x[700, 3] = np.nan, np.inf
    upstream = {"embed": write_embed_output(str(tmp_path / "embed"), x, shard_rows=400)}
    config = make_config(*LOCAL)
    manifest = run_stage(config, ClusterStage(), upstream=upstream).manifest
    assert manifest["counts"]["rejected"] == 2 and manifest["counts"]["points"] == 1198
    rejects = storage.read_table(storage.join(config.run_dir, "cluster", "rejects")).sort_by("id")
    assert rejects.column("id").to_pylist() == ["row-000005", "row-000700"]
    assert set(rejects.column("reason").to_pylist()) == {"non-finite embedding (NaN or inf)"}
    assert rejects.column("row").to_pylist() == [5, 700 - 400]  # positions in their pool shards (400 rows each)
    ids = set(assignments_of(config.run_dir).column("id").to_pylist())
    assert len(ids) == 1198 and "row-000005" not in ids


def test_bad_input_is_a_clear_error(tmp_path, make_config, blobs):
    embed = str(tmp_path / "embed")
    upstream = {"embed": write_embed_output(embed, blobs[:600], shard_rows=300)}
    # A third shard from another model (dimension 8 instead of 16).
    other = gaussian_blobs(50, 8, 2)
    write_embed_output(str(tmp_path / "other"), other, shard_rows=50, ids=[f"x-{i}" for i in range(50)])
    storage.write_bytes(
        storage.join(embed, "pool", "part-00002.parquet"),
        storage.read_bytes(str(tmp_path / "other" / "pool" / "part-00000.parquet")),
    )
    with pytest.raises(
        InputDataError,
        match=r"dimension differs between shards: .*part-00000.parquet' has 16, .*part-00002.parquet' has 8",
    ):
        run_stage(make_config(*LOCAL, run_dir=str(tmp_path / "a")), ClusterStage(), upstream=upstream)

    small = {"embed": write_embed_output(str(tmp_path / "small"), blobs[:10], shard_rows=10)}
    with pytest.raises(ConfigError, match=r"cluster.k=12 is larger than the number of usable embeddings \(10\)"):
        run_stage(make_config(*LOCAL, run_dir=str(tmp_path / "b")), ClusterStage(), upstream=small)

    storage.write_table(
        pa.table({"id": ["a"], "vector": [[1.0, 2.0]]}), str(tmp_path / "bad" / "pool" / "part-00000.parquet")
    )
    bad = {"embed": {"fingerprint": "bad", "stage_dir": str(tmp_path / "bad"), "outputs": {"pool": "pool"}}}
    with pytest.raises(InputDataError, match=r"lacks column\(s\) embedding"):
        run_stage(make_config(*LOCAL, run_dir=str(tmp_path / "c")), ClusterStage(), upstream=bad)


@pytest.mark.ray
@pytest.mark.s3
def test_ray_on_s3_equals_in_memory(ray_cluster, s3_prefix, make_config, blobs):
    """Two Ray actors holding the shards, run directory on S3: the in-memory result, row for row."""
    upstream = {"embed": write_embed_output(storage.join(s3_prefix, "embed"), blobs, shard_rows=250)}
    config = make_config(*LOCAL[1:], "runtime.runner=ray", "cluster.num_workers=2", run_dir=f"{s3_prefix}/run")
    manifest = run_stage(config, ClusterStage(), upstream=upstream).manifest
    assert manifest["counts"]["points"] == 1200

    centroids, labels, _ = reference(blobs, config)
    np.testing.assert_allclose(centroids_of(config.run_dir), centroids, atol=1e-5)
    np.testing.assert_array_equal(assignments_of(config.run_dir).column("cluster").to_numpy(), labels)
    log = storage.read_json(storage.join(config.run_dir, "cluster", "kmeans_log.json"))
    assert log["workers"] == 2 and log["index"].endswith("1 thread(s)")


@pytest.mark.ray
def test_ray_two_level_streaming_equals_local(ray_cluster, tmp_path, make_config):
    """Two-level k-means with shards re-read every pass (bounded memory) on Ray == the local runner."""
    x = gaussian_blobs(1600, 12, 32, seed=9)
    upstream = {"embed": write_embed_output(str(tmp_path / "embed"), x, shard_rows=200)}
    settings = (
        "cluster.k=32",
        "cluster.hierarchical=true",
        "cluster.k_coarse=4",
        "cluster.max_iter=6",
        "cluster.seeding=kmeans||",
    )
    ray_config = make_config(
        *settings,
        "runtime.runner=ray",
        "cluster.num_workers=2",
        "cluster.cache_shards=false",
        run_dir=str(tmp_path / "ray"),
    )
    local_config = make_config(*settings, "runtime.runner=local", run_dir=str(tmp_path / "local"))
    ray_manifest = run_stage(ray_config, ClusterStage(), upstream=upstream).manifest
    run_stage(local_config, ClusterStage(), upstream=upstream)

    assert ray_manifest["outputs"]["coarse_centroids"] == "coarse_centroids.npy"
    np.testing.assert_allclose(centroids_of(ray_config.run_dir), centroids_of(local_config.run_dir), atol=1e-5)
    ray_rows, local_rows = assignments_of(ray_config.run_dir), assignments_of(local_config.run_dir)
    np.testing.assert_array_equal(ray_rows.column("cluster").to_numpy(), local_rows.column("cluster").to_numpy())
    centroids, labels, _ = reference(x, local_config)
    np.testing.assert_allclose(centroids_of(local_config.run_dir), centroids, atol=1e-5)
    np.testing.assert_array_equal(local_rows.column("cluster").to_numpy(), labels)


@pytest.mark.parametrize("cache", [True, False])
def test_a_restarted_worker_answers_without_being_loaded_again(tmp_path, blobs, cache):
    """A Ray actor restarted after its node was lost is a fresh ShardWorker that never saw ``load``: it
    must read its shards on first use and answer exactly as the worker it replaces."""
    from influencespace.cluster.shards import ShardWorker

    upstream = write_embed_output(str(tmp_path / "embed"), blobs, shard_rows=250)
    shards = list(enumerate(storage.list_files(storage.join(upstream["stage_dir"], "pool"), ".parquet")))
    loaded, restarted = (ShardWorker(shards, spherical=True, cache=cache) for _ in range(2))
    loaded.load()
    centroids = blobs[:12].astype(np.float32) / np.linalg.norm(blobs[:12], axis=1, keepdims=True)
    first, second = loaded.assign_to(centroids), restarted.assign_to(centroids)
    np.testing.assert_array_equal(first.counts, second.counts)
    np.testing.assert_array_equal(first.sums, second.sums)
    picks = np.array([0, 7, 600, 1199])
    np.testing.assert_array_equal(ShardWorker(shards, spherical=True, cache=cache).sample(picks), loaded.sample(picks))


@pytest.mark.ray
def test_ray_reduces_the_partials_off_the_driver_in_the_local_order_bit_for_bit(ray_cluster, tmp_path, make_config,
                                                                                 blobs):
    """Three Ray actors, partial sums added by remote tasks in tree_sum's fixed order and the centroids
    updated remotely: exactly the local runner's three workers (the same float sums, not just close)."""
    upstream = {"embed": write_embed_output(str(tmp_path / "embed"), blobs, shard_rows=150)}
    # Three actors of 0.5 CPU: the test Ray has 2 CPUs, and an actor that does not fit waits forever.
    configs = {runner: make_config(*LOCAL[1:], f"runtime.runner={runner}", "cluster.num_workers=3",
                                   "cluster.worker_cpus=0.5", run_dir=str(tmp_path / runner))
               for runner in ("ray", "local")}
    for config in configs.values():
        run_stage(config, ClusterStage(), upstream=upstream)
    np.testing.assert_array_equal(centroids_of(configs["ray"].run_dir), centroids_of(configs["local"].run_dir))
    logs = [storage.read_json(storage.join(c.run_dir, "cluster", "kmeans_log.json")) for c in configs.values()]
    assert logs[0]["workers"] == logs[1]["workers"] == 3
    assert [i["objective"] for i in logs[0]["iterations"]] == [i["objective"] for i in logs[1]["iterations"]]
