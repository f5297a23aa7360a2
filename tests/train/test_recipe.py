"""Pure parts of training: the DeepSpeed config mapping, the step policy, the loss, the data join."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from influencespace.config import load_config
from influencespace.errors import InputDataError
from influencespace.train.data import plan_variant, read_pairs
from influencespace.train.model import build_model, clip_loss, load_model
from influencespace.train.recipe import Hyperparameters, deepspeed_config, steps_per_epoch
from tests.train.synthetic import build_run, write_manifest


def test_deepspeed_config_follows_train_config():
    cfg = load_config("test", ["train.zero_stage=2", "train.precision=bf16", "train.optimizer=adam",
                               "train.batch_size=64", "train.lr=0.01"]).train
    ds = deepspeed_config(Hyperparameters.from_config(cfg), world_size=2)
    assert ds["train_batch_size"] == 64 and ds["train_micro_batch_size_per_gpu"] == 32
    assert ds["gradient_accumulation_steps"] == 1
    assert ds["zero_optimization"] == {"stage": 2}
    assert ds["bf16"] == {"enabled": True} and ds["fp16"] == {"enabled": False}
    assert ds["optimizer"]["type"] == "Adam"
    assert ds["optimizer"]["params"]["lr"] == 0.01 and ds["optimizer"]["params"]["adam_w_mode"] is False
    sgd = deepspeed_config(Hyperparameters(optimizer="sgd", batch_size=8), world_size=1)
    assert sgd["optimizer"]["type"] == "SGD" and "torch_adam" not in sgd["optimizer"]["params"]
    assert sgd["zero_allow_untested_optimizer"] is True
    with pytest.raises(ValueError, match="divisible"):
        deepspeed_config(Hyperparameters(batch_size=10), world_size=3)
    assert ds["gradient_clipping"] == 1.0  # written out: DeepSpeed's own default when absent
    assert deepspeed_config(Hyperparameters(gradient_clipping=0.0), world_size=1)["gradient_clipping"] == 0.0
    # Accumulation: each worker's micro-batch is batch / (workers · steps), the global batch unchanged.
    accumulated = deepspeed_config(Hyperparameters(batch_size=64, gradient_accumulation=4), world_size=2)
    assert (accumulated["train_batch_size"], accumulated["train_micro_batch_size_per_gpu"],
            accumulated["gradient_accumulation_steps"]) == (64, 8, 4), accumulated
    with pytest.raises(ValueError, match="accumulation"):
        deepspeed_config(Hyperparameters(batch_size=64, gradient_accumulation=3), world_size=2)


@pytest.mark.parametrize("clip", [0.5, 0.0])
def test_gradient_clipping_bounds_the_first_step(clip):
    """DeepSpeed's engine clips the global gradient norm at train.gradient_clipping (0: not at all).

    One SGD step (lr 1, momentum 0.9 — the first step has no momentum yet) on the loss wᵀx with
    ‖x‖ = 10 moves w by the clipped gradient: ‖Δw‖ = 0.5 with clipping, 10 without."""
    import deepspeed

    from influencespace.runtime import local_process_group

    hp = Hyperparameters(batch_size=1, lr=1.0, optimizer="sgd", weight_decay=0.0, zero_stage=0, gradient_clipping=clip)
    with local_process_group(use_gpu=False):
        model = torch.nn.Linear(4, 1, bias=False)
        torch.nn.init.zeros_(model.weight)
        engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=list(model.parameters()),
                                               config=deepspeed_config(hp, 1), dist_init_required=False)
        x = torch.tensor([[6.0, 8.0, 0.0, 0.0]])
        engine.backward(engine(x).sum())
        engine.step()
        moved = float(engine.module.weight.detach().norm())
        engine.destroy()
    assert moved == pytest.approx(clip if clip else 10.0, rel=1e-5), f"step norm {moved} with gradient_clipping={clip}"


def test_step_policies():
    assert steps_per_epoch("same_steps", pool_rows=1000, kept_rows=400, batch_size=128) == 8
    assert steps_per_epoch("same_epochs", pool_rows=1000, kept_rows=400, batch_size=128) == 4
    with pytest.raises(ValueError, match="step policy"):
        steps_per_epoch("more", 1, 1, 1)


def test_sharded_loss_with_gathered_features_equals_full_batch_loss():
    """What the workers compute (local rows vs gathered columns), averaged, is CLIP's global-batch loss."""
    torch.manual_seed(0)
    model = build_model(8, 6, 4, 10.0, seed=0)
    image, text = torch.randn(12, 8), torch.randn(12, 6)
    zi, zt, scale = model(image, text)
    full = clip_loss(zi, zt, scale)
    # Reference: the CLIP loss written out directly.
    logits = scale * zi @ zt.T
    targets = torch.arange(12)
    expected = 0.5 * (torch.nn.functional.cross_entropy(logits, targets)
                      + torch.nn.functional.cross_entropy(logits.T, targets))
    torch.testing.assert_close(full, expected)
    for world in (2, 3, 4):
        m = 12 // world
        parts = [clip_loss(zi[r * m:(r + 1) * m], zt[r * m:(r + 1) * m], scale, zi, zt, offset=r * m)
                 for r in range(world)]
        torch.testing.assert_close(torch.stack(parts).mean(), full)


def test_model_init_is_seeded_and_state_round_trips():
    a, b = build_model(8, 6, 4, 10.0, seed=1), build_model(8, 6, 4, 10.0, seed=1)
    c = build_model(8, 6, 4, 10.0, seed=2)
    assert torch.equal(a.image_proj.weight, b.image_proj.weight)
    assert not torch.equal(a.image_proj.weight, c.image_proj.weight)
    restored = load_model(a.state_dict())
    x = torch.randn(3, 8)
    torch.testing.assert_close(restored.encode_image(x), a.encode_image(x))


def test_manifest_join_keeps_weights_and_refuses_foreign_ids(tmp_path):
    run = build_run(str(tmp_path), pool=40, dim=8)
    pool_dir, manifest_dir = str(tmp_path / "embed" / "pool"), str(tmp_path / "curate" / "manifest")
    data = plan_variant(pool_dir, manifest_dir, int(run["keep"].sum()), float(run["weight"][run["keep"]].sum()))
    assert data.pairs == ((f"{pool_dir}/part-00000.parquet", f"{manifest_dir}/part-00000.parquet"),)
    chunks = list(read_pairs(data.pairs, chunk_rows=16))  # 40 pool rows read in chunks of 16
    assert [len(c["id"]) for c in chunks] == [int(run["keep"][i:i + 16].sum()) for i in (0, 16, 32)]
    ids = np.concatenate([c["id"] for c in chunks])
    assert list(ids) == [i for i, k in zip(run["pool_ids"], run["keep"], strict=True) if k]  # pool order
    expected = dict(zip(run["pool_ids"], run["weight"], strict=True))
    np.testing.assert_allclose(np.concatenate([c["weight"] for c in chunks]), [expected[i] for i in ids])
    assert chunks[0]["image"].shape == (len(chunks[0]["id"]), 8) and chunks[0]["image"].dtype == np.float32
    baseline = list(read_pairs(plan_variant(pool_dir, None, 40, 40.0).pairs))
    assert sum(len(c["id"]) for c in baseline) == 40 and all(np.all(c["weight"] == 1) for c in baseline)

    foreign = tmp_path / "foreign"
    write_manifest(str(foreign), ["pool-00000", "elsewhere"], [True, True], [1.0, 1.0])
    with pytest.raises(InputDataError, match="lacks"):
        list(read_pairs(plan_variant(pool_dir, str(foreign), 2, 2.0).pairs))
    write_manifest(str(tmp_path / "twice"), ["pool-00000", "pool-00000"], [True, True], [1.0, 1.0])
    with pytest.raises(InputDataError, match="twice"):
        list(read_pairs(plan_variant(pool_dir, str(tmp_path / "twice"), 2, 2.0).pairs))
    with pytest.raises(InputDataError, match="keeps no rows"):
        plan_variant(pool_dir, manifest_dir, 0, 0.0)
    (tmp_path / "unaligned").mkdir()
    write_manifest(str(tmp_path / "unaligned" / "elsewhere"), ["pool-00000"], [True], [1.0])
    with pytest.raises(InputDataError, match="no part for 1 pool shard"):
        plan_variant(pool_dir, str(tmp_path / "unaligned"), 1, 1.0)


def test_train_refuses_before_training_when_evaluate_wants_untrained_seeds(tmp_path, make_config):
    from influencespace.errors import ConfigError
    from influencespace.stages import run_stage
    from influencespace.train.stage import TrainStage

    run = build_run(str(tmp_path / "inputs"), pool=16, dim=4, policies=())
    config = make_config("runtime.runner=local", "evaluate.seeds=[0, 1, 2]", "train.seeds=[0, 1]")
    with pytest.raises(ConfigError, match=r"train.seeds=\[0, 1, 2\]"):
        run_stage(config, TrainStage(), upstream=run["upstream"])
