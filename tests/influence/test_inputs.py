"""The sample plan drawn in passes over the pool's shards equals the in-memory reference of the same rule."""

import os

import numpy as np
import pyarrow as pa
import pytest

from influencespace import storage
from influencespace.influence import inputs as plan_module
from influencespace.influence.inputs import BANK_DIR, PROXY_DIR, plan_inputs, rank_dir
from influencespace.influence.sampling import BANK_SALT, PROXY_SALT, draw_keys, sample_clusters
from influencespace.influence.tasks import get_task

from .synthetic import make_data, write_upstream


def upstream_with_every_case(root, rejects=False):
    """Three shards; a pool-only group, a cluster smaller than m (taken whole) and an empty cluster;
    with ``rejects``, rows of the middle shard the cluster stage rejected (they are in no cluster):
    ``"old"``, listed without their positions, as the cluster stage did before."""
    data = make_data(n=600, clusters=8)
    data.pool["group"][:25] = "other"
    data.cluster[-3:] = 8
    return data, write_upstream(root, data, num_clusters=10, shards=3, rejected=rejected_rows(600, bool(rejects)),
                                reject_rows=rejects != "old")


def rejected_rows(n, rejects):
    rejected = np.zeros(n, bool)
    rejected[250:262] = rejects  # the middle shard's rows 50–61
    return rejected


def draw(config, upstream, stage_dir):
    cluster = upstream["cluster"]
    return plan_inputs(
        config.runtime, config.influence, get_task(config.influence.task),
        pool_uri=storage.join(upstream["embed"]["stage_dir"], "pool"),
        validation_uri=storage.join(upstream["embed"]["stage_dir"], "validation"),
        assign_uri=storage.join(upstream["cluster"]["stage_dir"], "assignments"),
        centroids_uri=storage.join(upstream["cluster"]["stage_dir"], "centroids.npy"), stage_dir=stage_dir,
        rejects_uri=storage.join(cluster["stage_dir"], "rejects") if "rejects" in cluster["outputs"] else None,
    )


def written(inputs, directory):
    files = storage.parquet_files(storage.join(inputs.sample_uri, directory)) if storage.exists(
        storage.join(inputs.sample_uri, directory)) else []
    return pa.concat_tables([storage.read_table(f) for f in files]).to_pandas() if files else None


def bottom(ids, salt, seed, count):
    keys = draw_keys(ids, seed, salt)
    return sorted(ids[np.lexsort((ids, keys))[:count]].tolist())


@pytest.mark.parametrize("runner,workers", [("local", 1), pytest.param("ray", 2, marks=pytest.mark.ray)])
@pytest.mark.parametrize("rounds,rejects", [("one", False), ("several", False), ("one", True), ("one", "old")])
def test_the_plan_drawn_in_passes_equals_the_in_memory_reference(request, make_config, tmp_path, monkeypatch, caplog,
                                                                 runner, workers, rounds, rejects):
    if runner == "ray":
        request.getfixturevalue("ray_cluster")
    if rounds == "several":  # thresholds far too tight: most strata fall short and are drawn again
        tight = plan_module.key_threshold
        monkeypatch.setattr(plan_module, "key_threshold", lambda take, size: np.where(
            np.isfinite(tight(take, size)), tight(take, size) * 0.05, tight(take, size)))
    monkeypatch.setattr(plan_module, "COUNTS_MERGED_EVERY", 2)  # the running sum of the strata counts, too
    data, upstream = upstream_with_every_case(str(tmp_path / "up"), rejects)
    config = make_config(f"runtime.runner={runner}", f"influence.num_workers={workers}", "influence.samples_per_cluster=9",
                         "influence.proxy_rows=50", "influence.negatives=8", "influence.seed=5")
    with caplog.at_level("INFO", logger="influencespace.influence.inputs"):
        inputs = draw(config, upstream, str(tmp_path / "influence"))
    assert ("short of their sample" in caplog.text) == (rounds == "several")

    codes = {"majority": 0, "minority": 1, "other": 2}  # validation groups sorted, then the pool-only one
    assert inputs.group_names == ("majority", "minority") and inputs.strata_names == tuple(codes)
    assigned = ~rejected_rows(len(data.cluster), bool(rejects))
    ids = data.pool["id"][assigned]
    reference = sample_clusters(ids, data.cluster[assigned], np.array([codes[g] for g in data.pool["group"][assigned]]),
                                m=9, seed=5, num_clusters=10)
    assert inputs.sizes.tolist() == reference.sizes.tolist() and inputs.sampled == len(reference.rows)
    expected = sorted(zip(ids[reference.rows].tolist(), reference.cluster.tolist(), reference.stratum.tolist(),
                          reference.weight.tolist(), reference.stratum_size.tolist(), strict=True))
    ranks = [written(inputs, rank_dir(r)) for r in range(workers)]
    got = [frame for frame in ranks if frame is not None]
    rows = sorted(row for frame in got for row in zip(frame["id"], frame["cluster"], frame["stratum"], frame["weight"],
                                                      frame["stratum_size"], strict=True))
    assert rows == expected
    owners = [set(frame["cluster"]) for frame in got]
    assert len(got) == workers and sum(map(len, owners)) == len(set.union(*owners))  # a cluster lives on one rank
    np.testing.assert_allclose(np.stack(got[0]["image_embedding"].to_numpy()),
                               data.pool["image_embedding"][np.searchsorted(data.pool["id"], got[0]["id"])])  # the features travel with the rows
    assert sorted(written(inputs, PROXY_DIR)["id"]) == bottom(ids, PROXY_SALT, 5, 50)
    assert sorted(written(inputs, BANK_DIR)["id"]) == bottom(ids, BANK_SALT, 5, 8)
    assert not storage.exists(storage.join(inputs.sample_uri, plan_module.CANDIDATES_DIR))  # no scratch left


def test_an_assignment_without_a_pool_row_is_a_clear_error(make_config, tmp_path):
    data, upstream = upstream_with_every_case(str(tmp_path / "up"))
    part = storage.join(upstream["cluster"]["stage_dir"], "assignments", "part-00001.parquet")
    table = storage.read_table(part)
    ids = table.column("id").to_pylist()
    storage.write_table(table.set_column(0, "id", pa.array(["ghost", *ids[1:]])), part)
    with pytest.raises(Exception, match="1 assigned id.*part-00001.*not in the embed pool"):
        draw(make_config("runtime.runner=local"), upstream, str(tmp_path / "influence"))


@pytest.mark.parametrize("rejects", [False, True, "old"])
def test_assignments_out_of_pool_order_are_a_clear_error(make_config, tmp_path, rejects):
    # The later passes take a shard's ids from its assignment and rejects parts, so the count pass checks
    # that the assignment part lists the pool's rows in their order; with rejects listed without their
    # positions (an older cluster stage) the rows are matched by id and any order is fine.
    data, upstream = upstream_with_every_case(str(tmp_path / "up"), rejects)
    part = storage.join(upstream["cluster"]["stage_dir"], "assignments", "part-00001.parquet")
    table = storage.read_table(part)
    storage.write_table(table.take(pa.array(np.arange(table.num_rows)[::-1])), part)
    config = make_config("runtime.runner=local")
    if rejects == "old":
        assert draw(config, upstream, str(tmp_path / "influence")).num_examples == 600 - 12
    else:
        with pytest.raises(Exception, match="part-00001.*do not list the rows of pool shard.*in pool order"):
            draw(config, upstream, str(tmp_path / "influence"))


@pytest.mark.parametrize("rejects", [False, True, "old"])
def test_the_row_pass_reads_a_shard_for_its_features_alone(tmp_path, monkeypatch, rejects):
    from influencespace.influence.rows import _pool_batches

    data, upstream = upstream_with_every_case(str(tmp_path / "up"), rejects)
    cluster = upstream["cluster"]["stage_dir"]
    shard = plan_module.pool_shards(storage.join(upstream["embed"]["stage_dir"], "pool"), storage.join(cluster, "assignments"),
                                    storage.join(cluster, "rejects"))[1]
    assert (shard.rejects is not None) == bool(rejects)
    monkeypatch.setenv(storage.READ_LOG_ENV, str(tmp_path / "reads"))
    got = list(_pool_batches(shard, ["image_embedding"]))
    ids = [v for batch_ids, _ in got for v in batch_ids.to_pylist()]
    features = np.concatenate([plan_module.column_to_numpy(b.column("image_embedding")) for _, b in got])
    assert ids == data.pool["id"][200:400].tolist()  # every pool row is scored, rejected or not
    np.testing.assert_array_equal(features, data.pool["image_embedding"][200:400])
    # The read log has a line per read. ParquetFile reads the footer (here the whole small file: its tail
    # read is 64 KiB), then the column chunks it is asked for, adjacent ones in one read.
    import pyarrow.parquet as pq

    meta = pq.ParquetFile(shard.pool).metadata.row_group(0)
    chunk = {meta.column(c).path_in_schema.split(".")[0]: meta.column(c).total_compressed_size for c in range(meta.num_columns)}
    size = os.path.getsize(shard.pool)
    reads = [int(line.split("\t")[0]) for name in os.listdir(tmp_path / "reads") for line in open(tmp_path / "reads" / name)
             if line.rstrip("\n").endswith("/pool/" + shard.name)]
    assert reads.count(size) == 1, reads  # the footer, once (the ids' positions come from the other parts)
    data_reads = sum(r for r in reads if r != size)
    assert data_reads == chunk["image_embedding"] + (chunk["id"] if rejects == "old" else 0), (reads, chunk)
