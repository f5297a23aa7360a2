"""DeepSpeed inside Ray Train, reading through Ray Train's dataset sharding: 1 worker equals the
single-process run exactly; 2 workers (run directory on S3) are offered exactly the same samples."""

from __future__ import annotations

import io

import pytest
import torch

from influencespace import storage
from influencespace.stages import run_stage
from influencespace.train.stage import TrainStage
from tests.train.synthetic import build_run


def _record(manifest: dict, variant: str) -> dict:
    return storage.read_json(storage.join(manifest["stage_dir"], manifest["outputs"][variant]))["runs"]["0"]


def _weights(manifest: dict, variant: str) -> dict:
    metrics = storage.read_json(storage.join(manifest["stage_dir"], manifest["outputs"][variant]))
    path = storage.join(manifest["stage_dir"], metrics["runs"]["0"]["model"])
    return torch.load(io.BytesIO(storage.read_bytes(path)), weights_only=True)


@pytest.mark.ray
@pytest.mark.s3
def test_deepspeed_in_ray_train_reads_its_dataset_shard_like_the_local_run(ray_cluster, s3_prefix, tmp_path, make_config):
    run = build_run(str(tmp_path / "inputs"), pool=64, dim=8, policies=())
    settings = ("train.batch_size=32", "train.epochs=1", "train.head_dim=8", "train.zero_stage=1")
    on_ray = run_stage(make_config(*settings, "train.num_workers=2", run_dir=s3_prefix), TrainStage(),
                       upstream=run["upstream"]).manifest
    assert on_ray["extra"]["workers"] == 2 and on_ray["extra"]["steps"]["baseline"] == 2

    metrics = storage.read_json(storage.join(on_ray["stage_dir"], on_ray["outputs"]["influencespace"]))
    record = metrics["runs"]["0"]
    assert record["world_size"] == 2 and len(record["history"]) == 1, record
    # The per-epoch checkpoint went through Ray Train into the run directory on S3: DeepSpeed's
    # model states (rank 0) and both workers' ZeRO optimizer partitions, merged into one directory.
    checkpoint = storage.join(on_ray["stage_dir"], record["checkpoint"])
    assert checkpoint.startswith(s3_prefix)
    files = [f.removeprefix(checkpoint + "/") for f in storage.list_files(checkpoint, recursive=True)]
    assert "model.pt" in files and "deepspeed/mp_rank_00_model_states.pt" in files
    assert sum("optim_states" in f for f in files) == 2

    local = run_stage(make_config(*settings, "runtime.runner=local"), TrainStage(), upstream=run["upstream"]).manifest
    one = run_stage(make_config(*settings, "train.num_workers=1", run_dir=str(tmp_path / "one")), TrainStage(),
                    upstream=run["upstream"]).manifest
    for variant in ("baseline", "influencespace"):
        # One Ray Train worker reads its dataset shard in pool order (preserve_order), so it takes exactly
        # the batches the local runner reads from the files: the same weights.
        a, b = _weights(one, variant), _weights(local, variant)
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5)
        # Two workers split the rows between them; each row's repeat count depends on its id, the seed
        # and the epoch only, so together they were offered exactly what one process was.
        two_epoch, local_epoch = (_record(m, variant)["history"][0] for m in (on_ray, local))
        assert two_epoch["samples_offered"] == local_epoch["samples_offered"], (two_epoch, local_epoch)
        assert 0 < two_epoch["steps"] <= local_epoch["steps"], (two_epoch, local_epoch)
    # The baseline (64 rows of weight 1, λ = 1) splits 32 / 32: both workers take the full 2 steps.
    assert _record(on_ray, "baseline")["steps"] == _record(local, "baseline")["steps"] == 2
