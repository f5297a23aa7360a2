"""The ``influence`` stage: cluster scores from sketched gradients, on Ray Train or in-process.

Reads (docs/architecture.md): ``embed`` ``pool`` / ``validation`` (``id``, ``embedding``,
``image_embedding``, ``text_embedding``, ``group``, ``label``) and ``cluster`` ``assignments``
(``id``, ``cluster``, ``distance``) plus ``centroids`` (for the number of clusters, empty ones included).

1. :func:`~influencespace.influence.inputs.plan_inputs` draws the sample plan in passes over the pool's
   shards (tasks) and writes the sampled rows, split by the rank that owns their cluster;
2. the driver warm-starts the proxy on ``proxy_rows`` rows drawn by the same rule;
3. every rank runs :func:`run_rank` — its sample, :func:`~influencespace.influence.engine.compute_influence`
   over the collectives, the row pass — in a ``TorchTrainer`` with ``num_workers`` workers for
   ``runtime.runner: ray`` (gloo on CPU, NCCL on GPU), or as the only rank in this process for ``local``.
   Rank 0 writes the outputs (:mod:`.artifacts`). Positive influence = the cluster lowers the
   validation loss (helps).

What travels to a worker is one :class:`Job`: URIs, O(k) tables, the proxy and its checkpoints.
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from influencespace import storage
from influencespace.errors import StageStateError
from influencespace.influence.artifacts import (
    CURVATURE_DIR,
    PLACEBO_SCORES_FILE,
    SCORES_FILE,
    SUMMARY_FILE,
    npy_bytes,
    write_outputs,
)
from influencespace.influence.errors import InfluenceError
from influencespace.influence.inputs import (
    BANK_DIR,
    PROXY_DIR,
    Inputs,
    plan_inputs,
    read_drawn,
    read_rank_sample,
    read_validation,
)
from influencespace.influence.rows import (
    ROW_DIRECTIONS_FILE,
    ROW_SCORES_DIR,
    RowJob,
    digest,
    parameter_directions,
    score_rows,
)
from influencespace.influence.target import TASK as TARGET_TASK
from influencespace.influence.target import check_settings as check_target_settings
from influencespace.progress import NULL, Sink, Tracker, track
from influencespace.stages import Stage, StageContext, StageResult

if TYPE_CHECKING:
    import torch

    from influencespace.config import InfluenceConfig
    from influencespace.influence.proxy import State
    from influencespace.influence.tasks import Task

log = logging.getLogger(__name__)


@dataclass
class Job:
    """Everything one rank needs, pickled once into the Ray Train loop config (no per-row data)."""

    inputs: Inputs
    task: Task
    settings: InfluenceConfig
    model: torch.nn.Module  # the warm-started proxy
    states: list[State]  # its checkpoints
    stage_dir: str


def _dtype(cfg: Any) -> Any:
    import torch

    return torch.float64 if cfg.dtype == "float64" else torch.float32


def _finite_rows(features: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    ok = np.ones(len(next(iter(features.values()))), dtype=bool)
    for values in features.values():
        if values.dtype.kind == "f":
            ok &= np.isfinite(values.reshape(len(values), -1)).all(axis=1)
    return {k: v[ok] for k, v in features.items()}


def plan_from_upstream(ctx: StageContext, cfg: Any, task: Any) -> Inputs:
    """Step 1 on the embed and cluster stages' outputs: the sample plan, written under ``ctx.stage_dir``."""
    cluster_outputs = ctx.input_manifests["cluster"].get("outputs", {})
    return plan_inputs(
        ctx.config.runtime, cfg, task, pool_uri=ctx.input_path("embed", "pool"),
        validation_uri=ctx.input_path("embed", "validation"), assign_uri=ctx.input_path("cluster", "assignments"),
        centroids_uri=ctx.input_path("cluster", "centroids") if "centroids" in cluster_outputs else None,
        stage_dir=ctx.stage_dir,
        rejects_uri=ctx.input_path("cluster", "rejects") if "rejects" in cluster_outputs else None,
    )


def build_proxy(inputs: Inputs, task: Any, cfg: Any) -> tuple[Any, list]:
    """Build the task's model (negative bank from the pool) and warm-start ``cfg.ensemble`` independent
    proxies of it (seed, seed + 1, …: own initialisation and minibatch order, the same proxy rows);
    returns (model, states), the states member after member, ``cfg.checkpoints`` each (what the
    engine's ensemble statistics expect)."""
    import torch

    from influencespace.influence.engine import to_tensors
    from influencespace.influence.proxy import warm_start

    dtype = _dtype(cfg)
    bank = {}
    if task.bank_size(inputs.spec):
        raw = _finite_rows(read_drawn(inputs, BANK_DIR))
        bank = {k: torch.as_tensor(v).to(dtype) for k, v in raw.items() if k != "label"}
    # Rows with NaN/inf embeddings would turn the whole proxy into NaN; they are scored (and reported) later.
    feats = to_tensors(_finite_rows(read_drawn(inputs, PROXY_DIR)), dtype, "cpu")
    model, states = None, []
    for member in range(cfg.ensemble):
        seed = cfg.seed + member
        proxy = task.build_model(inputs.spec, bank, torch.Generator().manual_seed(seed)).to(dtype)
        if model is None:
            model = proxy
        else:
            _check_untracked_equal(task, model, proxy)
        states += warm_start(
            task, proxy, feats, cfg.proxy_steps, cfg.proxy_batch_size, cfg.proxy_lr, cfg.weight_decay, seed, cfg.checkpoints
        )
    return model, states


def _check_untracked_equal(task: Any, model: Any, other: Any) -> None:
    """Ensemble members share one model object and differ only in their tracked parameters' states, so a
    parameter the task does not track must not depend on the seed."""
    import torch

    tracked = set(task.tracked_parameters(model))
    theirs = dict(other.named_parameters())
    for name, value in model.named_parameters():
        if name not in tracked and not torch.equal(value, theirs[name]):
            raise InfluenceError(
                f"influence.ensemble > 1 but the task's untracked parameter '{name}' differs between seeds; "
                "track it (Task.tracked_parameters), make it seed-independent, or set influence.ensemble=1"
            )


def make_shard(inputs: Inputs, rank: int, world_size: int) -> Any:
    """Rank ``rank``'s sampled rows (its clusters) and its share of the validation rows."""
    from influencespace.influence.engine import Shard

    if world_size != inputs.world_size:
        raise StageStateError(f"the sample was split for {inputs.world_size} rank(s) but {world_size} are running; "
                              "rerun the stage")
    features, plan = read_rank_sample(inputs, rank)
    val_features, val_group = read_validation(inputs)
    return Shard(
        features=features,
        cluster=plan["cluster"],
        stratum=plan["stratum"],
        stratum_size=plan["stratum_size"],
        weight=plan["weight"],
        val_features={k: v[rank::world_size] for k, v in val_features.items()},
        val_group=val_group[rank::world_size],
    )


def run_rank(job: Job, rank: int, world_size: int, comm: Any, device: Any, samples: Sink = NULL) -> dict[str, Any] | None:
    """One rank's part of the cluster scores; rank 0 writes the outputs (and, for the row pass, the
    directions in parameter space) and returns the summary."""
    from influencespace.influence.engine import compute_influence

    inputs, cfg = job.inputs, job.settings
    result = compute_influence(
        job.task, job.model, job.states, make_shard(inputs, rank, world_size),
        group_names=list(inputs.group_names), cluster_ids=inputs.clusters, cluster_sizes=inputs.sizes,
        settings=cfg, comm=comm, device=device, progress=samples,
    )
    if rank != 0:
        return None
    if cfg.score_rows:
        directions = parameter_directions(result.sketcher.projector, result.directions)
        storage.write_bytes(storage.join(job.stage_dir, CURVATURE_DIR, ROW_DIRECTIONS_FILE), npy_bytes(directions))
        result.summary["row_directions_digest"] = digest(directions)
    return write_outputs(job.stage_dir, result, inputs, cfg, job.task, job.model)


def group_validation_loss(inputs: Inputs, task: Any, model: Any, states: list, cfg: Any) -> dict[str, float]:
    """Mean validation measurement of the warm-started proxy per group (curation up-weights the worst)."""
    from influencespace.influence.engine import to_tensors
    from influencespace.influence.proxy import mean_loss, set_state

    val_features, val_group = read_validation(inputs)
    finite = np.ones(len(val_group), dtype=bool)
    for name, values in val_features.items():
        if name != "label":
            finite &= np.isfinite(np.asarray(values, dtype=np.float64)).reshape(len(finite), -1).all(axis=1)
    set_state(model, states[-1])
    out = {}
    for g, name in enumerate(inputs.group_names):
        chosen = finite & (val_group == g)
        if chosen.any():
            feats = to_tensors({k: v[chosen] for k, v in val_features.items()}, _dtype(cfg), "cpu")
            out[name] = round(mean_loss(task, model, feats, measurement=True), 6)
    return out


# --------------------------------------------------------------------------------------------------
# Ray Train


def _train_loop(config: dict) -> None:
    """Runs in each Ray Train worker: :func:`run_rank` over the process group Ray Train set up."""
    import ray.train
    import ray.train.torch
    import torch.distributed as dist

    from influencespace.influence.engine import TorchComm

    ctx = ray.train.get_context()
    progress = config["progress"]
    run_rank(config["job"], ctx.get_world_rank(), ctx.get_world_size(), TorchComm(), ray.train.torch.get_device(),
             samples=progress["samples"])
    # Without an explicit barrier + teardown, about one run in four aborted here (ENVIRONMENT.md).
    dist.barrier()
    dist.destroy_process_group()


def loop_config_bytes(config: dict) -> int:
    """What the Ray Train loop config weighs pickled (it travels to every worker)."""
    import ray.cloudpickle

    return len(ray.cloudpickle.dumps(config))


def _run_on_ray(ctx: StageContext, job: Job, trackers: dict[str, Tracker]) -> int:
    """Run every rank in a TorchTrainer; returns the pickled size of what each worker received."""
    import ray.train

    from influencespace.runtime import ensure_ray, run_torch_workers

    cfg, runtime = ctx.config.influence, ctx.config.runtime
    # Sinks made with Ray up: before it, a console bar's sink is the bar itself, which cannot travel.
    ensure_ray(runtime)
    progress = {name: tracker.sink() for name, tracker in trackers.items()}
    # A worker lost with its node restarts the whole group (the loop is deterministic; rank 0 writes last).
    failures = ray.train.FailureConfig(max_failures=runtime.worker_restarts)
    name = f"influence-{ctx.config.name}"
    if storage.is_s3(ctx.config.run_dir):
        fs, path = storage.resolve(storage.join(ctx.config.run_dir, "_ray_train"))
        run_config = ray.train.RunConfig(name=name, storage_path=path, storage_filesystem=fs, failure_config=failures)
    else:
        run_config = ray.train.RunConfig(
            name=name, storage_path=tempfile.mkdtemp(prefix="influence-train-"), failure_config=failures
        )
    config = {"job": job, "progress": progress}
    size = loop_config_bytes(config)
    run_torch_workers(_train_loop, config, runtime=runtime, num_workers=cfg.num_workers, run_config=run_config)
    return size


# --------------------------------------------------------------------------------------------------


def prepare_target(ctx: StageContext, task: Any, inputs: Inputs) -> Inputs:
    """``influence.task: open_clip``: train the target's proxy on the plan's proxy rows, start the task's heads
    at its last layers, and re-encode the plan's rows with its towers (:mod:`.target`)."""
    from influencespace.influence.target import (
        PROXY_RUN_DIR,
        TARGET_DIR,
        Encoding,
        encode_plan,
        last_layers,
        train_proxy,
    )
    from influencespace.train.pixels import raw_shards
    from influencespace.train.recipe import MODEL_FILE, Hyperparameters
    from influencespace.train.targets import target_from_config

    train, runtime = ctx.config.train, ctx.config.runtime
    target = target_from_config(train, (0, 0))
    embed_dir = ctx.input_manifests["embed"]["stage_dir"]
    raw_pool = raw_shards(embed_dir, "pool")
    work = ctx.path(PROXY_RUN_DIR)
    log.info("influence: training the open_clip target's proxy on the plan's proxy rows")
    state = train_proxy(target, Hyperparameters.from_config(train), train.epochs, ctx.config.influence.seed,
                        storage.join(inputs.sample_uri, PROXY_DIR), raw_pool, work, ctx.stage_dir, runtime.use_gpu)
    task.heads = last_layers(target.load(state))
    encoding = Encoding(target, storage.join(work, MODEL_FILE), (inputs.columns[inputs.features.index("image")],
                                                                 inputs.columns[inputs.features.index("text")]))
    return encode_plan(runtime, inputs, encoding, raw_pool, raw_shards(embed_dir, "validation"), ctx.path(TARGET_DIR))


class InfluenceStage(Stage):
    name = "influence"
    inputs = ("embed", "cluster")
    section = "influence"

    def other_settings(self, config: Any) -> dict[str, Any]:
        # The open_clip task's proxy is trained with the train stage's target and hyperparameters.
        if config.influence.task == TARGET_TASK:
            from influencespace.influence.target import proxy_settings

            return {"train": proxy_settings(config.influence, config.train)}
        return {}

    def run(self, ctx: StageContext) -> StageResult:
        from influencespace.influence.engine import LocalComm
        from influencespace.influence.tasks import get_task

        cfg = ctx.config.influence
        task = get_task(cfg.task)
        if cfg.task == TARGET_TASK:
            check_target_settings(cfg, ctx.config.train)
        inputs = plan_from_upstream(ctx, cfg, task)
        if cfg.task == TARGET_TASK:
            inputs = prepare_target(ctx, task, inputs)
        model, states = build_proxy(inputs, task, cfg)
        job = Job(inputs, task, cfg, model, states, ctx.stage_dir)
        config_bytes = None
        with track("influence samples", inputs.sampled * len(states), "gradients") as samples:
            if ctx.config.runtime.runner == "local":
                summary = run_rank(job, 0, 1, LocalComm(), "cpu", samples=samples)
            else:
                config_bytes = _run_on_ray(ctx, job, {"samples": samples})
                summary = storage.read_json(ctx.path(SUMMARY_FILE))
        if cfg.score_rows:
            score_rows(ctx.config.runtime, RowJob(inputs, task, model, states, cfg.dtype, cfg.batch_size,
                                                  ctx.path(CURVATURE_DIR, ROW_DIRECTIONS_FILE),
                                                  summary["row_directions_digest"], ctx.path(ROW_SCORES_DIR),
                                                  use_gpu=ctx.config.runtime.use_gpu))
        counts = {
            "clusters": summary["clusters"],
            "pool": inputs.num_examples,
            "sampled": int(summary["sampled"]),
            "dropped_nonfinite": int(summary["dropped_nonfinite"]),
            "validation": inputs.validation_rows,
        }
        extra = {
            "groups": list(inputs.group_names),
            "group_validation_loss": group_validation_loss(inputs, task, model, states, cfg),
            "examples_per_second": round(float(summary["examples_per_second"]), 2),
            "workers": 1 if ctx.config.runtime.runner == "local" else cfg.num_workers,
            "loop_config_bytes": config_bytes,
        }
        return StageResult(
            counts=counts,
            outputs={"scores": SCORES_FILE, "curvature": CURVATURE_DIR, "summary": SUMMARY_FILE, "sample": "sample",
                     **({"row_scores": ROW_SCORES_DIR} if cfg.score_rows else {}),
                     **({"placebo_scores": PLACEBO_SCORES_FILE} if cfg.placebo else {})},
            extra=extra,
        )
