"""The train stage in this process (runtime.runner=local): DeepSpeed's engine on a one-rank gloo group."""

from __future__ import annotations

import io

import numpy as np
import torch

from influencespace import storage
from influencespace.stages import run_stage
from influencespace.train.model import load_model
from influencespace.train.sampler import epoch_scale, repeat_counts
from influencespace.train.stage import TrainStage
from tests.train.synthetic import build_run


def test_train_stage_local_trains_every_variant_with_the_same_steps(tmp_path, make_config):
    run = build_run(str(tmp_path / "inputs"), pool=64, dim=8)
    config = make_config("runtime.runner=local", "train.batch_size=32", "train.epochs=1", "train.head_dim=8",
                         "train.zero_stage=2")
    outcome = run_stage(config, TrainStage(), upstream=run["upstream"])
    manifest = outcome.manifest
    assert manifest["extra"]["variants"] == ["baseline", "influencespace", "random"]
    assert manifest["extra"]["steps"] == {"baseline": 2, "influencespace": 2, "random": 2}
    assert manifest["counts"]["runs"] == 3

    keep = run["keep"]
    for variant, ids, weight in (("baseline", run["pool_ids"], np.ones(64)),
                                 ("influencespace", np.array(run["pool_ids"])[keep], run["weight"][keep])):
        metrics = storage.read_json(storage.join(manifest["stage_dir"], manifest["outputs"][variant]))
        record = metrics["runs"]["0"]
        # The epoch offered each kept row its seeded repeat count (λ = 2 steps × 32 / Σw) and took every
        # full global batch of them: the baseline (every w = 1, λ = 1) each row once, so exactly 2 steps.
        offered = int(repeat_counts(np.array(ids, dtype=object), weight, epoch_scale(64, weight.sum()), 0, 0).sum())
        assert metrics["variant"] == variant and metrics["rows"] == len(ids), (metrics["rows"], len(ids))
        assert record["history"][0]["samples_offered"] == offered, (record["history"][0], offered)
        assert metrics["steps"] == offered // 32 == record["history"][0]["steps"], (metrics["steps"], offered)
        assert record["steps_per_epoch"] == 2 and (variant != "baseline" or metrics["steps"] == 2)
        assert record["world_size"] == 1 and record["hyperparameters"]["zero_stage"] == 2
        assert len(record["history"]) == 1 and record["history"][0]["samples"] == 32 * metrics["steps"]
        assert record["train_seconds"] > 0 and torch.isfinite(torch.tensor(record["final_loss"]))
        # The final weights load safely, and the epoch checkpoint holds DeepSpeed's and the plain weights.
        state = torch.load(io.BytesIO(storage.read_bytes(storage.join(manifest["stage_dir"], record["model"]))),
                           weights_only=True)
        model = load_model(state)
        assert model.image_proj.weight.shape == (8, 8)
        checkpoint = storage.join(manifest["stage_dir"], record["checkpoint"])
        files = [f.removeprefix(checkpoint + "/") for f in storage.list_files(checkpoint, recursive=True)]
        assert "model.pt" in files and "deepspeed/mp_rank_00_model_states.pt" in files

    # Same seed, same init, different data: the curated model differs from the baseline's.
    def weights(variant):
        path = storage.join(manifest["stage_dir"], variant, "seed-0", "model.pt")
        return torch.load(io.BytesIO(storage.read_bytes(path)), weights_only=True)["image_proj.weight"]

    assert not torch.equal(weights("baseline"), weights("influencespace"))
    # A rerun with the same config is a no-op.
    assert run_stage(config, TrainStage(), upstream=run["upstream"]).status == "skipped"


def test_zero3_bf16_sgd_train_and_save_full_weights(tmp_path, make_config):
    """ZeRO-3 partitions the parameters; the saved weights must still be the full tensors."""
    run = build_run(str(tmp_path / "inputs"), pool=64, dim=8, policies=())
    config = make_config("runtime.runner=local", "train.batch_size=32", "train.epochs=2", "train.head_dim=8",
                         "train.zero_stage=3", "train.precision=bf16", "train.optimizer=sgd", "train.lr=0.1")
    manifest = run_stage(config, TrainStage(), upstream=run["upstream"]).manifest
    metrics = storage.read_json(storage.join(manifest["stage_dir"], manifest["outputs"]["influencespace"]))
    record = metrics["runs"]["0"]
    assert len(record["history"]) == 2 and record["steps"] == sum(h["steps"] for h in record["history"]) > 0, record
    # The baseline's epochs (every w = 1, λ = 1) hold each row once: exactly the planned 2 steps each.
    baseline = storage.read_json(storage.join(manifest["stage_dir"], manifest["outputs"]["baseline"]))["runs"]["0"]
    assert baseline["steps"] == 4 and [h["steps"] for h in baseline["history"]] == [2, 2], baseline["history"]
    state = torch.load(io.BytesIO(storage.read_bytes(storage.join(manifest["stage_dir"], record["model"]))),
                       weights_only=True)
    assert state["image_proj.weight"].shape == (8, 8) and state["image_proj.weight"].dtype == torch.bfloat16
    assert state["logit_scale"].shape == (1,)
    assert torch.isfinite(load_model(state).image_proj.weight).all()
