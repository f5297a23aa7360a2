"""influence.task=open_clip: the training target's own last layers, on a proxy trained as the train stage trains."""

from __future__ import annotations

import io
import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F

from influencespace import storage
from influencespace.embed.encoders import pixels_to_tensor
from influencespace.influence.errors import InfluenceError
from influencespace.influence.target import PROXY_RUN_DIR, TARGET_DIR, last_layers, pooled_features
from influencespace.influence.tasks import DataSpec, TargetHeadsTask, get_task
from influencespace.stages import load_stage, run_pipeline, run_stage
from influencespace.train.targets import target_from_config

OPEN_CLIP = ("train.target=open_clip", "influence.task=open_clip", "influence.score_rows=false")


def _model_and_batch(make_config, rows: int = 6):
    target = target_from_config(make_config("train.target=open_clip").train, (0, 0))
    model = target.build(0).float().eval()
    batch = target.synthetic_batch(np.random.default_rng(0), rows)
    return target, model, pixels_to_tensor(batch["image"], target.image), torch.from_numpy(batch["text"].astype(np.int64))


def test_the_tasks_heads_are_the_models_last_layers(make_config):
    _, model, pixels, tokens = _model_and_batch(make_config)
    f_v, f_t = pooled_features(model, pixels, tokens)
    heads = last_layers(model)
    # normalize(W f) with W = projᵀ is what open_clip's encoders return: the heads are the model's last layers.
    torch.testing.assert_close(F.normalize(f_v @ heads["image_head"].T, dim=-1), model.encode_image(pixels, normalize=True))
    torch.testing.assert_close(F.normalize(f_t @ heads["text_head"].T, dim=-1), model.encode_text(tokens, normalize=True))
    assert model.visual.proj is not None and model.text_projection is not None  # restored after the call
    torch.testing.assert_close(heads["log_scale"], model.logit_scale.detach().reshape(1))


def test_a_per_example_gradient_is_the_whole_models_gradient_on_its_last_layers(make_config):
    """The exact reference: the full open_clip model (towers included) scoring example 0 against the bank
    rows 1..5, differentiated with respect to its projections and temperature."""
    _, model, pixels, tokens = _model_and_batch(make_config)
    f_v, f_t = pooled_features(model, pixels, tokens)
    task = get_task("open_clip")
    task.heads = last_layers(model)
    spec = DataSpec(dims={"image": f_v.shape[1], "text": f_t.shape[1]}, options={"negatives": 5})
    heads = task.build_model(spec, {"image": f_v[1:], "text": f_t[1:]}, torch.Generator().manual_seed(0))
    example = {"image": f_v[0], "text": f_t[0]}
    loss = task.train_loss(heads(example), example)
    ours = torch.autograd.grad(loss, [heads.image_head, heads.text_head, heads.log_scale])

    z_v, z_t = model.encode_image(pixels, normalize=True), model.encode_text(tokens, normalize=True)
    scale = model.logit_scale.exp().clamp(max=100.0)
    rows = scale * torch.stack([z_v[0] @ z_t.T, z_t[0] @ z_v.T])  # column 0: the true partner; then the bank
    reference = F.cross_entropy(rows, torch.zeros(2, dtype=torch.long))
    theirs = torch.autograd.grad(reference, [model.visual.proj, model.text_projection, model.logit_scale])
    assert loss.item() == pytest.approx(reference.item(), rel=1e-5)
    torch.testing.assert_close(ours[0], theirs[0].T, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(ours[1], theirs[1].T, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(ours[2], theirs[2].reshape(1), rtol=1e-4, atol=1e-6)


def test_the_task_without_a_trained_proxy_is_a_clear_error():
    with pytest.raises(InfluenceError, match="no trained proxy"):
        TargetHeadsTask().build_model(DataSpec(dims={"image": 4, "text": 4}), {}, torch.Generator())


@pytest.mark.parametrize(("override", "match"), [
    ("train.target=heads", "set train.target=open_clip"),
    ("influence.ensemble=2", "influence.ensemble=1"),
    ("influence.score_rows=true", "influence.score_rows=false"),
])
def test_settings_the_task_cannot_serve_are_refused_before_any_work(make_config, override, match, tmp_path):
    from influencespace.influence.target import check_settings

    config = make_config(*OPEN_CLIP, override)
    with pytest.raises(InfluenceError, match=match):
        check_settings(config.influence, config.train)


# A whole pipeline up to influence in this process (data, embed with the tiny offline checkpoint, k-means):
# about a minute on 2 cores.
@pytest.mark.timeout(900)
def test_the_stage_trains_the_targets_proxy_and_scores_the_clusters_with_its_towers(make_config, offline_checkpoint,
                                                                                   tmp_path):
    config = make_config("runtime.runner=local", f"embed.pretrained={offline_checkpoint}", *OPEN_CLIP,
                         "train.epochs=2", "train.batch_size=16", "influence.proxy_steps=10")
    run_pipeline(config, ["data", "embed", "cluster", "influence"], report=lambda line: None)
    stage_dir = storage.join(config.run_dir, "influence")

    # The proxy is the train stage's recipe on the plan's proxy rows, for train.epochs.
    proxy = json.loads(open(storage.join(stage_dir, PROXY_RUN_DIR, "run.json")).read())
    proxy_rows = sum(pq.read_table(f).num_rows for f in storage.parquet_files(storage.join(stage_dir, "sample", "proxy")))
    assert (proxy["rows"], proxy["epochs"], proxy["target"]["kind"]) == (proxy_rows, 2, "open_clip"), proxy
    target = target_from_config(config.train, (0, 0))
    state = torch.load(io.BytesIO(storage.read_bytes(storage.join(stage_dir, PROXY_RUN_DIR, "model.pt"))), weights_only=True)
    model = target.load(state)

    # Every sampled row is re-encoded by those towers, up to their last layer (width 64, not the embed model's).
    rank_files = storage.parquet_files(storage.join(stage_dir, TARGET_DIR, "rank-00000"))
    table = pq.read_table(rank_files[0])
    features = np.stack(table.column("image_embedding").to_numpy(zero_copy_only=False))
    assert features.shape[1] == model.visual.proj.shape[0] == 64
    assert np.isfinite(features).all()

    scores = pq.read_table(storage.join(stage_dir, "cluster_scores.parquet")).to_pydict()
    assert len(scores["cluster"]) == config.cluster.k
    assert np.isfinite(scores["influence"]).all() and np.isfinite(scores["stderr"]).all(), scores
    manifest = json.loads(open(storage.join(stage_dir, "_SUCCESS.json")).read())
    assert manifest["counts"]["sampled"] > 0, manifest

    # The proxy's settings are part of the stage's fingerprint: another learning rate is another influence run.
    other = make_config("runtime.runner=local", f"embed.pretrained={offline_checkpoint}", *OPEN_CLIP,
                        "train.epochs=2", "train.batch_size=16", "influence.proxy_steps=10", "train.lr=0.01")
    with pytest.raises(Exception, match="different configuration"):
        run_stage(other, load_stage("influence"))
