"""The embed stage on a real local Ray: offline default, open_clip from S3, WebDataset, resume."""

import numpy as np
import pyarrow as pa
import pytest

from influencespace import storage
from influencespace.stages import read_manifest, run_pipeline
from tests.embed.conftest import TINY_CLIP

QUIET = {"report": lambda _: None}


def _ids(uri):
    return storage.read_table(uri, columns=["id"]).column("id").to_pylist()


@pytest.mark.ray
def test_offline_default_on_ray_and_resume_after_an_interruption(ray_cluster, make_config, offline_checkpoint):
    config = make_config(f"embed.pretrained={offline_checkpoint}")
    run_pipeline(config, ["data", "embed"], **QUIET)
    manifest = read_manifest(config, "embed")
    counts = manifest["counts"]
    assert counts["pool_input"] == 300 and counts["validation_input"] == 60 and counts["test_input"] == 100
    assert counts["pool_rejected"] == 3 and counts["pool"] == 297  # the benchmark plants 3 undecodable images
    assert counts["validation"] == 60 and counts["test"] == 100
    assert manifest["extra"]["dim"] == 64 and manifest["extra"]["model"].startswith("offline-default")

    embed_dir = storage.join(config.run_dir, "embed")
    data_dir = storage.join(config.run_dir, "data")
    rejects = storage.read_table(storage.join(embed_dir, "rejects")).to_pylist()
    assert all(r["split"] == "pool" and r["reason"].startswith("undecodable image") for r in rejects)
    pool_ids = _ids(storage.join(embed_dir, "pool")) + [r["id"] for r in rejects]
    assert sorted(pool_ids) == sorted(_ids(storage.join(data_dir, "pool")))
    before = storage.read_table(storage.join(embed_dir, "pool"))

    # An interrupted run leaves whole shards only (atomic writes) and no _SUCCESS.json.
    storage.remove_tree(storage.join(embed_dir, "_SUCCESS.json"))
    for name in ("pool/part-00001.parquet", "test/part-00000.parquet", "rejects/pool-part-00001.parquet"):
        storage.remove_tree(storage.join(embed_dir, name))
    [outcome] = run_pipeline(config, ["embed"], **QUIET)
    assert outcome.status == "resumed"
    assert outcome.manifest["extra"]["shards_embedded"] == 2 and outcome.manifest["extra"]["shards_reused"] == 3
    assert outcome.manifest["counts"] == counts
    after = storage.read_table(storage.join(embed_dir, "pool"))
    assert after.column("id").to_pylist() == before.column("id").to_pylist()  # same ids, each once, same order
    np.testing.assert_allclose(
        np.array(after.column("embedding").to_pylist(), dtype=np.float32),
        np.array(before.column("embedding").to_pylist(), dtype=np.float32),
        atol=2e-3,
    )
    assert sorted(_ids(storage.join(embed_dir, "test"))) == sorted(_ids(storage.join(data_dir, "test")))


@pytest.mark.ray
@pytest.mark.s3
def test_open_clip_checkpoint_and_webdataset_on_s3(ray_cluster, make_config, tiny_clip, tiny_benchmark, s3_prefix):
    from influencespace.datasets import webdataset

    config_path, checkpoint = tiny_clip
    storage.write_bytes(f"{s3_prefix}/models/tiny.json", config_path.read_bytes())
    storage.write_bytes(f"{s3_prefix}/models/tiny-clip.pt", checkpoint.read_bytes())
    pool = storage.read_table(str(tiny_benchmark / "pool"))
    webdataset.write_table(pool, f"{s3_prefix}/wds", shard_rows=120)
    config = make_config(
        "data.source=webdataset", f"data.uri={s3_prefix}/wds", "embed.model=open_clip", f"embed.open_clip_model={TINY_CLIP}",
        f"embed.open_clip_config={s3_prefix}/models/tiny.json", f"embed.pretrained={s3_prefix}/models/tiny-clip.pt",
        "embed.fusion=sum", "embed.dtype=float32", run_dir=f"{s3_prefix}/run",
    )
    run_pipeline(config, ["data", "embed"], **QUIET)
    manifest = read_manifest(config, "embed")
    assert manifest["counts"] == {"pool": 297, "pool_rejected": 3, "pool_input": 300, "rejects": 3}
    assert manifest["extra"]["shards"] == 3 and manifest["extra"]["dim"] == 32

    table = storage.read_table(f"{s3_prefix}/run/embed/pool")
    assert table.schema.field("embedding").type == pa.list_(pa.float32(), 32)
    assert set(table.column_names) >= {"id", "embedding", "image_embedding", "text_embedding", "image_text_cosine", "group", "label"}
    rejected = storage.read_table(f"{s3_prefix}/run/embed/rejects").column("id").to_pylist()
    assert sorted(table.column("id").to_pylist() + rejected) == sorted(pool.column("id").to_pylist())
    embedding = np.array(table.column("embedding").to_pylist())
    np.testing.assert_allclose(np.linalg.norm(embedding, axis=1), 1.0, atol=1e-4)


def test_embed_actor_arguments_are_small_enough_to_travel_inline(make_config, offline_checkpoint, tmp_path):
    import pickle

    from influencespace.embed.registry import spec_from_config
    from influencespace.embed.stage import _by_reference
    from influencespace.stages import StageContext

    config = make_config(f"embed.pretrained={offline_checkpoint}")
    spec = spec_from_config(config.embed)
    assert spec.checkpoint_bytes is not None  # the offline default's checkpoint is read inline
    ctx = StageContext(config=config, stage_dir=str(tmp_path / "embed"), input_manifests={})
    actor_spec = _by_reference(ctx, spec)
    # Ray inlines task arguments up to 100 KB (max_direct_call_object_size); bigger ones go to the object
    # store, where a restarted actor may no longer find them (ray-project/ray#53727).
    assert len(pickle.dumps(actor_spec)) < 100 * 1024, len(pickle.dumps(actor_spec))
    assert actor_spec.checkpoint_bytes is None and storage.read_bytes(actor_spec.checkpoint) == spec.checkpoint_bytes
    assert _by_reference(ctx, spec) == actor_spec  # written once, found again
