"""The ``train`` stage: the baseline, the InfluenceSpace manifest and every comparison policy, each trained
with the same recipe, step policy and seeds (docs/training.md).

Outputs, per variant ``v`` (``baseline``, ``influencespace``, ``random``, ``dedup``, ``clipscore`` — those
the curate stage wrote): ``train/<v>/metrics.json`` (every seed's epochs, losses, timings, where its
weights and checkpoints are) and ``train/<v>/seed-<s>/model.pt`` (the final weights). Ray Train
keeps the per-epoch checkpoints (DeepSpeed's checkpoint + ``model.pt``) under ``train/_ray/`` — local
or ``s3://`` like the run directory.

On Ray all runs go through one ``TorchTrainer.fit`` (workers start, and DeepSpeed's comm op loads, once);
``runtime.runner: local`` runs the same recipe in this process on a one-rank gloo group. A run whose
``run.json`` exists is complete: an interrupted stage resumes with the runs that are missing.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from dataclasses import replace
from typing import Any

from influencespace import storage
from influencespace.errors import ConfigError, InputDataError, StageStateError
from influencespace.faults import fault_point
from influencespace.layout import BASELINE, variant_manifests
from influencespace.progress import NULL, Sink, Tracker, track
from influencespace.runtime import local_process_group
from influencespace.stages import Stage, StageContext, StageResult
from influencespace.train.data import (
    VariantData,
    embedding_dims,
    plan_variant,
    pool_shards,
    variant_dataset,
    variant_rows,
)
from influencespace.train.pixels import raw_sources
from influencespace.train.recipe import (
    RUN_FILE,
    Hyperparameters,
    RunSpec,
    Session,
    checkpoint_epoch,
    steps_per_epoch,
    summarize_runs,
)
from influencespace.train.targets import Target, target_from_config

log = logging.getLogger(__name__)

RAY_DIR = "_ray"
LOCAL_CHECKPOINTS = "_checkpoints"


def _variant_counts(summary: dict, key: str) -> tuple[int, float]:
    """(kept rows, weight sum) of a manifest, from the curate stage's summary (no manifest is read)."""
    from influencespace.layout import summary_entry

    try:
        entry = summary_entry(summary, key)
        return int(entry["kept"]), float(entry["weight_sum"])
    except KeyError:
        raise StageStateError(
            f"the curate stage's summary has no kept count and weight sum for '{key}'; rerun curate"
        ) from None


def _validate(cfg: Any, runtime: Any) -> None:
    if cfg.precision == "fp16" and not runtime.use_gpu:
        raise ConfigError("train.precision=fp16 needs a GPU (runtime.use_gpu=true); on CPU use fp32 or bf16")
    workers = 1 if runtime.runner == "local" else cfg.num_workers
    if cfg.batch_size % (workers * cfg.gradient_accumulation):
        raise ConfigError(
            f"train.batch_size ({cfg.batch_size}) must be divisible by train.num_workers ({workers}) × "
            f"train.gradient_accumulation ({cfg.gradient_accumulation}): every worker takes an equal slice of "
            "each micro-step's global batch"
        )


class TrainStage(Stage):
    name = "train"
    inputs = ("embed", "curate")
    section = "train"

    def run(self, ctx: StageContext) -> StageResult:
        cfg, runtime = ctx.config.train, ctx.config.runtime
        _validate(cfg, runtime)
        hp = Hyperparameters.from_config(cfg)
        seeds = tuple(cfg.seeds or (cfg.seed,))
        untrained = [s for s in ctx.config.evaluate.seeds if s not in seeds]
        if untrained:
            # Checked here, before hours of training, although only evaluate reads evaluate.seeds.
            raise ConfigError(
                f"evaluate.seeds {list(ctx.config.evaluate.seeds)} include seed(s) {untrained} that train would not "
                f"train (train.seeds={list(cfg.seeds) if cfg.seeds else None}, train.seed={cfg.seed}); "
                f"set train.seeds={list(ctx.config.evaluate.seeds)}"
            )
        pool_uri = ctx.input_path("embed", "pool")
        shards = pool_shards(pool_uri)
        pool_rows = sum(storage.parquet_rows(shard) for shard in shards)  # footers only
        if pool_rows == 0:
            raise InputDataError(f"the embedded pool at {pool_uri} is empty; nothing to train on")

        specs: list[RunSpec] = []
        steps: dict[str, int] = {}
        data: dict[str, VariantData] = {}
        keys = variant_manifests(ctx.input_manifests["curate"])
        manifests = {v: (ctx.input_path("curate", key) if key else None) for v, key in keys.items()}
        summary = storage.read_json(ctx.input_path("curate", "summary"))
        target = target_from_config(cfg, embedding_dims(pool_uri) if cfg.target == "heads" else (0, 0))
        # The open_clip target reads each pool shard's raw pairs: the embed stage's plan says where they are.
        raw = raw_sources(ctx.input_manifests["embed"]["stage_dir"], shards) if cfg.target == "open_clip" else ()
        for variant, manifest_uri in manifests.items():
            kept, weight_sum = (pool_rows, float(pool_rows)) if manifest_uri is None else _variant_counts(summary, keys[variant])
            data[variant] = plan_variant(pool_uri, manifest_uri, kept, weight_sum, shards, raw)
            steps[variant] = steps_per_epoch(cfg.step_policy, pool_rows, kept, cfg.batch_size)
        # Seed-major order: the variants of one seed run back to back under the same conditions.
        for seed in seeds:
            for variant, manifest_uri in manifests.items():
                specs.append(RunSpec(
                    variant=variant, seed=seed, manifest_uri=manifest_uri, epochs=cfg.epochs,
                    steps_per_epoch=steps[variant], output_uri=ctx.path(variant, f"seed-{seed}"),
                    checkpoint_root=ctx.path(LOCAL_CHECKPOINTS), stage_dir=ctx.stage_dir,
                ))
        pending = [s for s in specs if not storage.is_file(storage.join(s.output_uri, RUN_FILE))]
        if len(pending) < len(specs):
            log.info("train: %d of %d runs already complete, resuming", len(specs) - len(pending), len(specs))

        fit_seconds = 0.0
        if pending:
            t0 = time.perf_counter()
            with track(f"train: {len(pending)} runs", len(pending) * cfg.epochs, "epochs") as bar:
                if runtime.runner == "local":
                    _run_local(pending, hp, target, data, runtime.use_gpu, bar)
                else:
                    _run_on_ray(ctx, pending, hp, target, data, bar)
            fit_seconds = time.perf_counter() - t0

        outputs: dict[str, str] = {}
        for variant in manifests:
            records = [storage.read_json(storage.join(s.output_uri, RUN_FILE)) for s in specs if s.variant == variant]
            storage.write_json(ctx.path(variant, "metrics.json"), summarize_runs(records))
            outputs[variant] = f"{variant}/metrics.json"
        return StageResult(
            counts={"variants": len(manifests), "runs": len(specs), "pool": pool_rows,
                    "baseline_steps": steps[BASELINE] * cfg.epochs},
            outputs=outputs,
            extra={
                "variants": list(manifests),
                "seeds": list(seeds),
                "step_policy": cfg.step_policy,
                "steps": {v: s * cfg.epochs for v, s in steps.items()},
                "workers": 1 if runtime.runner == "local" else cfg.num_workers,
                "target": target.describe(),
                "fit_seconds": round(fit_seconds, 3),
            },
        )


# --------------------------------------------------------------------------------------------------
# Running the recipe


def _run_all(specs: list[RunSpec], hp: Hyperparameters, target: Target, data: dict[str, VariantData], chunks_of: Any,
             session: Session, restore: Any = None) -> list[dict]:
    """Train ``specs`` in order; ``chunks_of(variant)`` streams this worker's rows of a variant once;
    ``restore(spec)`` may hand a checkpoint to go on from (see ``train_run``)."""
    from influencespace.train.recipe import train_run, warm_up

    records = []
    if specs:
        warm_up(specs[0], hp, target, session)
    for number, spec in enumerate(specs, start=1):
        with contextlib.ExitStack() as stack:
            found = restore(spec, stack) if restore is not None else None
            records.append(train_run(spec, hp, target, data[spec.variant], lambda v=spec.variant: chunks_of(v),
                                     session, restore=found))
        fault_point("train.run", number)  # tests: the driver killed between two runs
    return records


def latest_checkpoints(ray_root: str, specs: list[RunSpec]) -> list[RunSpec]:
    """``specs`` with ``restore_uri`` set to the newest epoch checkpoint an earlier attempt left of each run.

    Only checkpoints that Ray Train registered (listed in a run's ``checkpoint_manager_snapshot.json``)
    count: those were persisted by every worker. A partial upload of a killed attempt is never used.
    """
    newest: dict[str, tuple[int, str]] = {}
    for snapshot in storage.list_files(ray_root, "checkpoint_manager_snapshot.json", recursive=True):
        try:
            entries = storage.read_json(snapshot).get("checkpoint_results", [])
        except Exception:  # a snapshot cut short by a kill: its checkpoints are not trusted
            log.warning("train: ignoring unreadable Ray Train snapshot %s", snapshot)
            continue
        run_dir = snapshot.rsplit("/", 1)[0]
        for entry in entries:
            name = str(entry.get("checkpoint_dir_name") or "")
            for spec in specs:
                epoch = checkpoint_epoch(spec, name)
                if epoch is not None and epoch <= spec.epochs and epoch > newest.get(spec.name, (0, ""))[0]:
                    newest[spec.name] = (epoch, storage.join(run_dir, name))
    return [replace(s, restore_uri=newest[s.name][1]) if s.name in newest else s for s in specs]


def upload_dir(local_dir: str, uri: str) -> None:
    """Copy a local directory tree to ``uri`` (local or s3://), file by file, each write atomic."""
    for root, _, files in os.walk(local_dir):
        for name in files:
            path = os.path.join(root, name)
            relative = os.path.relpath(path, local_dir).replace(os.sep, "/")
            with open(path, "rb") as f:
                storage.write_bytes(storage.join(uri, relative), f.read())


def _run_local(specs: list[RunSpec], hp: Hyperparameters, target: Target, data: dict[str, VariantData],
               use_gpu: bool, progress: Sink = NULL) -> list[dict]:
    with local_process_group(use_gpu) as device:
        def report(metrics: dict, checkpoint_dir: str, name: str) -> None:
            upload_dir(checkpoint_dir, storage.join(specs[0].checkpoint_root, name))
            progress.add(1)

        def chunks_of(variant: str):  # every shard pair in pool order, as a one-worker Ray Train run reads them
            return variant_rows(data[variant], target.read)

        return _run_all(specs, hp, target, data, chunks_of, Session(rank=0, world_size=1, device=device, report=report))


def _ray_worker(config: dict) -> list[dict]:
    """Runs in each Ray Train worker (process group already set up by ``TorchTrainer``)."""
    import ray.train
    import ray.train.torch
    import torch.distributed as dist

    ctx = ray.train.get_context()
    # After a worker failure Ray Train starts the whole group again: runs finished by the lost group are
    # skipped, and the interrupted one goes on from its latest registered checkpoint.
    specs = [s for s in config["specs"] if not storage.is_file(storage.join(s.output_uri, RUN_FILE))]
    latest = ray.train.get_checkpoint()

    def restore(spec: RunSpec, stack: contextlib.ExitStack) -> tuple[str, str] | None:
        candidates = []
        if latest is not None:
            name = latest.path.rstrip("/").rsplit("/", 1)[-1]  # this fit's <run>-epochNNN
            epoch = checkpoint_epoch(spec, name)
            if epoch is not None:
                candidates.append((epoch, latest, storage.join(spec.checkpoint_root, name)))
        if spec.restore_uri:
            fs, path = storage.resolve(spec.restore_uri)
            epoch = checkpoint_epoch(spec, spec.restore_uri.rsplit("/", 1)[-1])
            candidates.append((epoch, ray.train.Checkpoint(path, filesystem=fs), spec.restore_uri))
        if not candidates:
            return None
        _, checkpoint, uri = max(candidates, key=lambda c: c[0])
        return stack.enter_context(checkpoint.as_directory()), uri

    def report(metrics: dict, checkpoint_dir: str, name: str) -> None:
        # Every worker reports (it is a barrier); each uploads its own DeepSpeed partition into the
        # same checkpoint directory, rank 0 also the plain weights.
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(checkpoint_dir),
                         checkpoint_dir_name=name)
        if session.rank == 0:  # one count per epoch of the group
            config["progress"].add(1)

    target = config["target"]

    def chunks_of(variant: str):  # this worker's split of the variant's dataset (Ray Train's sharding)
        return ray.train.get_dataset_shard(variant).iter_batches(batch_size=target.chunk_rows, batch_format="numpy")

    session = Session(rank=ctx.get_world_rank(), world_size=ctx.get_world_size(),
                      device=ray.train.torch.get_device(), report=report)
    records = _run_all(specs, config["hp"], target, config["data"], chunks_of, session, restore)
    # Without an explicit barrier + teardown, about one run in four aborted here (ENVIRONMENT.md).
    dist.barrier()
    dist.destroy_process_group()
    return records


def _run_on_ray(ctx: StageContext, specs: list[RunSpec], hp: Hyperparameters, target: Target,
                data: dict[str, VariantData], progress: Tracker = NULL) -> list[dict]:
    import ray.data
    import ray.train

    from influencespace.runtime import ensure_ray, run_torch_workers

    cfg, runtime = ctx.config.train, ctx.config.runtime
    ensure_ray(runtime)
    # A fresh Ray Train run name per attempt: Ray Train restores a run whose name it finds in storage,
    # and the checkpoints of runs finished in earlier attempts must stay where their run.json says.
    name = time.strftime("fit-%Y%m%d-%H%M%S")
    ray_root = ctx.path(RAY_DIR)
    fs, path = storage.resolve(ray_root)
    if not storage.is_s3(ray_root):
        storage.make_dirs(ray_root)
    # A lost worker restarts the group (up to runtime.worker_restarts times); it resumes from the latest
    # checkpoint (``_ray_worker``). Checkpoints of earlier, killed attempts are found in storage here.
    failures = ray.train.FailureConfig(max_failures=runtime.worker_restarts)
    run_config = ray.train.RunConfig(name=name, storage_path=path, storage_filesystem=fs, failure_config=failures)
    specs = latest_checkpoints(ray_root, specs)
    for spec in specs:
        if spec.restore_uri:
            log.info("train: %s goes on from %s", spec.name, spec.restore_uri)
    specs = [replace(s, checkpoint_root=storage.join(ray_root, name)) for s in specs]

    # One dataset per variant, split between the workers by Ray Train (each reads only its blocks);
    # preserve_order makes the split the same in every attempt, so a resumed run sees the same epochs.
    variants = sorted({s.variant for s in specs})
    datasets = {v: variant_dataset(data[v], target.read) for v in variants}
    # A fixed object-store budget for the stream: left to Ray Data it grows with the cluster's store, and
    # at a large pool the workers map that many more of the store's pages (a worker's RSS grew 1.3x
    # from 100k to 1M rows in the scale harness, all of it shared memory).
    options = ray.train.DataConfig.default_ingest_options()
    options.preserve_order = True
    options.resource_limits = options.resource_limits.copy(object_store_memory=cfg.stream_object_store_mib * 2**20)
    # The sink after ensure_ray: made before Ray is up (every earlier stage skipped, as on a resume) it
    # would be the console's bar itself, which cannot travel to the workers.
    config = {"specs": specs, "hp": hp, "target": target, "data": {v: data[v] for v in variants},
              "progress": progress.sink()}
    result = run_torch_workers(_ray_worker, config, runtime=runtime, num_workers=cfg.num_workers,
                               run_config=run_config, datasets=datasets,
                               dataset_config=ray.train.DataConfig(execution_options=options))
    return list(result.return_value or [])
