"""The open_clip target: raw pairs joined with the manifest, a whole open_clip model trained from pixels
by DeepSpeed in this process and on Ray Train, and its own towers scored by evaluate."""

from __future__ import annotations

import io
import json
import math

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from influencespace import storage
from influencespace.errors import InputDataError, StageStateError
from influencespace.stages import run_stage
from influencespace.train.data import plan_variant, pool_shards, variant_rows
from influencespace.train.pixels import raw_sources, split_pixels
from influencespace.train.stage import TrainStage
from influencespace.train.targets import PIXELS_TINY, target_from_config, target_from_record
from tests.train.synthetic import build_pixel_run, class_image

TINY = ("train.target=open_clip", "train.batch_size=8", "train.epochs=1")


def _target(make_config, *overrides):
    return target_from_config(make_config(*TINY, *overrides).train, (0, 0))


def test_pixel_rows_are_the_manifests_kept_rows_in_pool_order(tmp_path, make_config):
    run = build_pixel_run(str(tmp_path))
    target = _target(make_config)
    assert target.name == PIXELS_TINY and target.image.size == 32 and target.text.max_length == 32
    pool_uri = str(tmp_path / "embed" / "pool")
    shards = pool_shards(pool_uri)
    raw = raw_sources(str(tmp_path / "embed"), shards)
    assert len(shards) == len(raw) == 3  # 48 rows in shards of 20

    kept = run["keep"] & (np.array(run["pool_ids"]) != run["rejected"])
    data = plan_variant(pool_uri, str(tmp_path / "curate" / "manifest"), int(kept.sum()), 1.0, shards, raw)
    chunks = list(variant_rows(data, target.read))
    ids = np.concatenate([c["id"] for c in chunks])
    assert list(ids) == [i for i, k in zip(run["pool_ids"], kept, strict=True) if k]  # pool order, rejected row absent
    weight = dict(zip(run["pool_ids"], run["weight"], strict=True))
    np.testing.assert_allclose(np.concatenate([c["weight"] for c in chunks]), [weight[i] for i in ids])
    first = chunks[0]
    assert first["image"].dtype == np.uint8 and first["image"].shape[1:] == (32, 32, 3)
    assert first["text"].dtype == np.int32 and first["text"].shape[1] == 32
    # The pixels are the raw image through open_clip's transform (28 → 32 px, grey → RGB).
    from influencespace.embed.preprocess import ImagePreprocess

    raw_table = pq.read_table(tmp_path / "data" / "pool" / "part-0.parquet")
    row = run["pool_ids"].index(str(ids[0]))
    np.testing.assert_array_equal(first["image"][0], ImagePreprocess(32, **{k: getattr(target.image, k) for k in (
        "resize_mode", "interpolation", "mean", "std")})(raw_table.column("image")[row].as_py()))

    # The baseline: every embedded row at weight 1 (the undecodable one was never embedded).
    baseline = list(variant_rows(plan_variant(pool_uri, None, 47, 47.0, shards, raw), target.read))
    assert sum(len(c["id"]) for c in baseline) == 47 and all(np.all(c["weight"] == 1) for c in baseline)

    # A manifest that keeps an id the raw pairs lack belongs to another pool: an error, never a silent drop.
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    manifest = pq.read_table(tmp_path / "curate" / "manifest" / "part-00000.parquet")
    ids_col = manifest.column("id").to_pylist()
    ids_col[1] = "elsewhere"
    pq.write_table(manifest.set_column(0, "id", [ids_col]), foreign / "part-00000.parquet")
    with pytest.raises(InputDataError, match="lack"):
        list(target.read(shards[0], str(foreign / "part-00000.parquet"), raw[0]))


def test_open_clip_needs_the_embed_stages_plan(tmp_path):
    (tmp_path / "embed").mkdir()
    with pytest.raises(StageStateError, match="data.source=embeddings"):
        raw_sources(str(tmp_path / "embed"), [str(tmp_path / "embed" / "pool" / "part-00000.parquet")])


def test_test_split_pixels_follow_the_embedded_ids(tmp_path, make_config):
    run = build_pixel_run(str(tmp_path))
    target = _target(make_config)
    order = np.array(run["test_ids"][::-1], dtype=object)
    pixels, tokens = split_pixels(str(tmp_path / "embed"), "test", order, target.image, target.text)
    assert pixels.shape == (30, 32, 32, 3) and tokens.shape == (30, 32)
    # test-00029 (class 9, regular) first: its bar sits where class 9's does.
    expected = target.image.transform(__import__("PIL.Image").Image.fromarray(class_image(9, False, np.random.default_rng(0))))
    bar = expected.mean(axis=2) > 128
    assert pixels[0].mean(axis=2)[bar].mean() > 128, "the first row is not test-00029's image"
    with pytest.raises(InputDataError, match="not among"):
        split_pixels(str(tmp_path / "embed"), "test", np.array(["test-99999"], dtype=object), target.image, target.text)


def test_open_clip_target_trains_locally_and_evaluate_scores_its_own_towers(tmp_path, make_config):
    import open_clip

    from influencespace.evaluate.stage import EvaluateStage

    run = build_pixel_run(str(tmp_path / "inputs"))
    config = make_config("runtime.runner=local", *TINY, "train.gradient_accumulation=2", "evaluate.fairness_resamples=10")
    train = run_stage(config, TrainStage(), upstream=run["upstream"]).manifest
    assert train["extra"]["target"]["kind"] == "open_clip" and train["extra"]["target"]["name"] == PIXELS_TINY
    metrics = storage.read_json(storage.join(train["stage_dir"], train["outputs"]["influencespace"]))
    record = metrics["runs"]["0"]
    kept = int((run["keep"] & (np.array(run["pool_ids"]) != run["rejected"])).sum())
    assert metrics["rows"] == kept and record["target"]["kind"] == "open_clip"
    assert record["steps"] >= 1 and np.isfinite(record["final_loss"]), record
    assert record["hyperparameters"]["gradient_accumulation"] == 2

    # model.pt is open_clip's own state dict: open_clip's factory loads it as pretrained weights.
    path = storage.join(train["stage_dir"], record["model"])
    state = torch.load(io.BytesIO(storage.read_bytes(path)), weights_only=True)
    target = target_from_record(record["target"])
    model = open_clip.create_model(PIXELS_TINY, pretrained=path, weights_only=True)
    torch.testing.assert_close(model.visual.conv1.weight, state["visual.conv1.weight"])
    # Training changed the towers, not only the heads.
    untrained = target.build(0).state_dict()
    assert not torch.equal(untrained["visual.conv1.weight"], state["visual.conv1.weight"])
    assert not torch.equal(untrained["token_embedding.weight"], state["token_embedding.weight"])

    upstream = {**run["upstream"], "train": train}
    summary_stage = run_stage(config, EvaluateStage(), upstream=upstream).manifest
    summary = storage.read_json(storage.join(summary_stage["stage_dir"], "summary.json"))
    for variant in ("baseline", "influencespace"):
        scores = summary["policies"][variant]
        assert 0.0 <= scores["zero_shot_acc"] <= 1.0 and scores["worst_group_acc"] is not None, scores
    # The scores are the trained towers' on the test pixels (not the frozen embeddings the heads would project).
    from influencespace.evaluate.zero_shot import read_test, score_model

    test = read_test(str(tmp_path / "inputs" / "embed" / "test"))
    pixels, tokens = split_pixels(str(tmp_path / "inputs" / "embed"), "test", test.ids, target.image, target.text)
    import dataclasses

    ours, _ = score_model(state, dataclasses.replace(test, pixels=pixels, tokens=tokens), (5, 7, 9), target)
    recorded = summary["policies"]["influencespace"]["per_seed"]["0"]
    assert (ours["zero_shot_acc"], ours["recall_at_1"]) == pytest.approx(
        (recorded["zero_shot_acc"], recorded["recall_at_1"])), (ours, json.dumps(recorded)[:300])


@pytest.mark.ray
# Three train stages, two of them Ray Train fits (each starts a worker group and DeepSpeed's engine):
# about 4 minutes on 2 idle cores, 12 on 2 cores shared with a loaded test suite.
@pytest.mark.timeout(1500)
def test_open_clip_on_ray_train_one_worker_equals_local_and_two_are_offered_the_same(ray_cluster, tmp_path, make_config):
    run = build_pixel_run(str(tmp_path / "inputs"))
    settings = (*TINY, "train.zero_stage=1")

    def weights(manifest, variant):
        metrics = storage.read_json(storage.join(manifest["stage_dir"], manifest["outputs"][variant]))
        path = storage.join(manifest["stage_dir"], metrics["runs"]["0"]["model"])
        return metrics["runs"]["0"], torch.load(io.BytesIO(storage.read_bytes(path)), weights_only=True)

    # A Ray Train worker reserves 1 CPU, so Ray starts it with OMP_NUM_THREADS=1 and torch sums on one
    # thread; the local run does the same here, so that both sum in one order. Otherwise float-order noise
    # (~1e-7) meets Adam where a gradient is exactly zero in exact arithmetic — the attention's key bias:
    # softmax ignores a constant added per query — and Adam, dividing by the noise's own RMS, turns it
    # into steps of size lr (measured: 1.1% of how far training moved `in_proj_bias`).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        local = run_stage(make_config(*settings, "runtime.runner=local", run_dir=str(tmp_path / "local")),
                          TrainStage(), upstream=run["upstream"]).manifest
    finally:
        torch.set_num_threads(threads)
    one = run_stage(make_config(*settings, "train.num_workers=1", run_dir=str(tmp_path / "one")), TrainStage(),
                    upstream=run["upstream"]).manifest
    two = run_stage(make_config(*settings, "train.num_workers=2", run_dir=str(tmp_path / "two")), TrainStage(),
                    upstream=run["upstream"]).manifest
    manifest = pq.read_table(tmp_path / "inputs" / "curate" / "manifest")
    max_weight = {"baseline": 1.0, "influencespace": max(manifest.column("weight").to_pylist())}
    for variant in ("baseline", "influencespace"):
        (rec_one, a), (rec_local, b) = weights(one, variant), weights(local, variant)
        # One Ray Train worker decodes its dataset shard in pool order: the batches and losses of the local run.
        assert rec_one["steps"] == rec_local["steps"] and rec_one["history"][0]["samples_offered"] == \
            rec_local["history"][0]["samples_offered"], (rec_one["history"], rec_local["history"])
        assert rec_one["history"][0]["loss"] == pytest.approx(rec_local["history"][0]["loss"], rel=1e-5)
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5, msg=lambda m, k=key, v=variant: f"{v} {k}: {m}")
        rec_two, _ = weights(two, variant)
        assert rec_two["world_size"] == 2
        # Two workers split the rows by Ray Train's equal split, which drops the last (rows mod 2) of the
        # stream: at most one row, whose repeats this epoch are at most ⌈w_max · scale⌉ samples.
        scale = rec_local["steps_per_epoch"] * rec_local["global_batch"] / rec_local["weight_sum"]
        most = math.ceil(max_weight[variant] * scale)
        missing = rec_local["history"][0]["samples_offered"] - rec_two["history"][0]["samples_offered"]
        assert 0 <= missing <= most, (missing, most, rec_two["history"], rec_local["history"])
        assert np.isfinite(rec_two["final_loss"])
