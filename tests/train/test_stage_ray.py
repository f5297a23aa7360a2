"""DeepSpeed inside Ray Train: 2 workers, 2 steps, run directory on S3; equal to the single-process run."""

from __future__ import annotations

import io

import pytest
import torch

from influencespace import storage
from influencespace.stages import run_stage
from influencespace.train.stage import TrainStage
from tests.train.synthetic import build_run


def _weights(manifest: dict, variant: str) -> dict:
    metrics = storage.read_json(storage.join(manifest["stage_dir"], manifest["outputs"][variant]))
    path = storage.join(manifest["stage_dir"], metrics["runs"]["0"]["model"])
    return torch.load(io.BytesIO(storage.read_bytes(path)), weights_only=True)


@pytest.mark.ray
@pytest.mark.s3
def test_deepspeed_in_ray_train_two_workers_matches_single_process(ray_cluster, s3_prefix, tmp_path, make_config):
    run = build_run(str(tmp_path / "inputs"), pool=64, dim=8, policies=())
    settings = ("train.batch_size=32", "train.epochs=1", "train.head_dim=8", "train.zero_stage=1")
    on_ray = run_stage(make_config(*settings, "train.num_workers=2", run_dir=s3_prefix), TrainStage(),
                       upstream=run["upstream"]).manifest
    assert on_ray["extra"]["workers"] == 2 and on_ray["extra"]["steps"]["baseline"] == 2

    metrics = storage.read_json(storage.join(on_ray["stage_dir"], on_ray["outputs"]["influencespace"]))
    record = metrics["runs"]["0"]
    assert record["world_size"] == 2 and record["steps"] == 2 and len(record["history"]) == 1
    # The per-epoch checkpoint went through Ray Train into the run directory on S3: DeepSpeed's
    # model states (rank 0) and both workers' ZeRO optimizer partitions, merged into one directory.
    checkpoint = storage.join(on_ray["stage_dir"], record["checkpoint"])
    assert checkpoint.startswith(s3_prefix)
    files = [f.removeprefix(checkpoint + "/") for f in storage.list_files(checkpoint, recursive=True)]
    assert "model.pt" in files and "deepspeed/mp_rank_00_model_states.pt" in files
    assert sum("optim_states" in f for f in files) == 2

    local = run_stage(make_config(*settings, "runtime.runner=local"), TrainStage(), upstream=run["upstream"]).manifest
    # Global batches are the same for any worker count and features are gathered with gradients, so
    # two workers take the same steps as one process.
    for variant in ("baseline", "influencespace"):
        a, b = _weights(on_ray, variant), _weights(local, variant)
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5)
