"""The training recipe: one variant, one seed, DeepSpeed, on whatever process group the runner set up.

A torchtune-style recipe in four parts — setup (model, DeepSpeed engine), train (weighted epochs
streamed from this worker's rows, :mod:`influencespace.train.sampler`), save (a DeepSpeed checkpoint + plain weights per epoch, reported through
the runner), cleanup — written once and run unchanged by both runners:

- Ray Train workers (``runtime.runner: ray``): ``TorchTrainer`` has initialised the process group
  (gloo on CPU, NCCL on GPU), the recipe calls ``deepspeed.initialize(..., dist_init_required=False)``
  and reports each epoch with ``ray.train.report`` (see :mod:`influencespace.train.stage`);
- in this process (``runtime.runner: local``): a one-rank gloo group, same engine, checkpoints copied
  into the stage directory.

Nothing here imports Ray: the runner hands in a :class:`Session` that knows how to report.
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from influencespace import storage
from influencespace.errors import InputDataError
from influencespace.faults import fault_point
from influencespace.train.data import VariantData
from influencespace.train.model import MAX_LOGIT_SCALE, clip_loss
from influencespace.train.sampler import SHUFFLE_WINDOW, EpochBatches, epoch_scale
from influencespace.train.targets import Target

log = logging.getLogger(__name__)

MODEL_FILE = "model.pt"
RUN_FILE = "run.json"
HISTORY_FILE = "history.json"  # in each epoch checkpoint: the metrics of every epoch so far (resume)
DEEPSPEED_TAG = "deepspeed"
_OPTIMIZERS = {"adamw": "AdamW", "adam": "Adam", "sgd": "SGD"}


@dataclass(frozen=True)
class Hyperparameters:
    """What the recipe takes from ``TrainConfig`` (plain data, so it pickles to Ray workers)."""

    batch_size: int = 128
    lr: float = 1e-3
    optimizer: str = "adamw"
    weight_decay: float = 1e-4
    zero_stage: int = 1
    precision: str = "fp32"
    head_dim: int = 128
    logit_scale_init: float = 1 / 0.07
    gradient_clipping: float = 1.0
    gradient_accumulation: int = 1  # micro-steps per optimizer step (each worker's micro-batch: batch / (workers · this))
    shuffle_window: int = SHUFFLE_WINDOW

    @classmethod
    def from_config(cls, cfg: Any) -> Hyperparameters:
        return cls(cfg.batch_size, cfg.lr, cfg.optimizer, cfg.weight_decay, cfg.zero_stage, cfg.precision,
                   cfg.head_dim, cfg.logit_scale_init, cfg.gradient_clipping, cfg.gradient_accumulation,
                   cfg.shuffle_window)

    def micro_batch(self, world_size: int) -> int:
        """Samples per worker per micro-step."""
        return self.batch_size // (world_size * self.gradient_accumulation)


@dataclass(frozen=True)
class RunSpec:
    """One training run: which data, which seed, how long, where its results go."""

    variant: str
    seed: int
    manifest_uri: str | None  # None: the baseline, every pool row with weight 1
    epochs: int
    steps_per_epoch: int
    output_uri: str  # train/<variant>/seed-<seed>/: model.pt and run.json (written by rank 0)
    checkpoint_root: str  # where reported checkpoints end up (Ray Train storage, or the stage dir)
    stage_dir: str = ""  # paths under it are recorded relative to it
    restore_uri: str = ""  # a checkpoint of this run from an earlier attempt (``<name>-epochNNN``) to go on from

    @property
    def name(self) -> str:
        return f"{self.variant}-seed{self.seed}"


@dataclass
class Session:
    """What the runner provides: this worker's place, its device, and how to report an epoch.

    ``report(metrics, checkpoint_dir, checkpoint_name)`` must persist ``checkpoint_dir`` (a local
    directory every rank wrote its part into) under ``checkpoint_name`` before returning.
    """

    rank: int
    world_size: int
    device: Any  # torch.device
    report: Callable[[dict, str, str], None]
    extra: dict = field(default_factory=dict)


def steps_per_epoch(policy: str, pool_rows: int, kept_rows: int, batch_size: int) -> int:
    """Optimizer steps per epoch under the step policy (docs/training.md, "Fairness of the comparison").

    ``same_steps``: every variant takes the baseline's ⌈pool/batch⌉ steps per epoch (equal compute,
    the accuracy comparison is at equal samples seen). ``same_epochs``: ⌈kept/batch⌉, so a smaller
    curated set also trains faster (the training-time ratio then measures that saving).
    """
    if policy == "same_steps":
        return max(1, math.ceil(pool_rows / batch_size))
    if policy == "same_epochs":
        return max(1, math.ceil(kept_rows / batch_size))
    raise ValueError(f"unknown step policy '{policy}' (allowed: same_steps, same_epochs)")


def deepspeed_config(hp: Hyperparameters, world_size: int) -> dict:
    """The DeepSpeed config for ``hp`` on ``world_size`` data-parallel workers.

    ``torch_adam`` makes DeepSpeed use torch's Adam/AdamW instead of FusedAdam, which would JIT-compile
    a kernel on first use (and has no CPU build); for heads this small the fused kernel buys nothing.
    ``gradient_clipping`` is always written: DeepSpeed clips the global gradient norm at 1.0 when the
    key is absent (``GRADIENT_CLIPPING_DEFAULT``), which would be a silent choice of ours; 0 turns it off.
    With ``gradient_accumulation`` a > 1 each optimizer step sums the gradients of a micro-steps of
    batch/(workers·a) samples per worker (DeepSpeed divides each micro-step's loss by a); CLIP's in-batch
    negatives are then those of one micro-step's global batch, batch/a.
    """
    if hp.batch_size % (world_size * hp.gradient_accumulation):
        raise ValueError(
            f"train.batch_size {hp.batch_size} is not divisible by {world_size} workers × "
            f"{hp.gradient_accumulation} accumulation steps; choose a multiple of train.num_workers × "
            "train.gradient_accumulation"
        )
    if hp.optimizer not in _OPTIMIZERS:
        raise ValueError(f"unknown optimizer '{hp.optimizer}' (allowed: {', '.join(_OPTIMIZERS)})")
    params: dict[str, Any] = {"lr": hp.lr, "weight_decay": hp.weight_decay}
    if hp.optimizer in ("adam", "adamw"):
        params["torch_adam"] = True
        params["adam_w_mode"] = hp.optimizer == "adamw"
    else:
        params["momentum"] = 0.9
    config = {
        "train_batch_size": hp.batch_size,
        "train_micro_batch_size_per_gpu": hp.micro_batch(world_size),
        "gradient_accumulation_steps": hp.gradient_accumulation,
        "gradient_clipping": hp.gradient_clipping,
        "optimizer": {"type": _OPTIMIZERS[hp.optimizer], "params": params},
        "zero_optimization": {"stage": hp.zero_stage},
        "bf16": {"enabled": hp.precision == "bf16"},
        "fp16": {"enabled": hp.precision == "fp16"},
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }
    if hp.optimizer == "sgd" and hp.zero_stage > 0:
        # ZeRO lists only its own Adam-family optimizers as tested; torch's SGD keeps no state that
        # partitioning could break.
        config["zero_allow_untested_optimizer"] = True
    return config


# --------------------------------------------------------------------------------------------------
# The recipe


Chunks = Callable[[], Iterable[dict]]  # one pass over this worker's kept rows: {"id", "image", "text", "weight"}


def train_run(
    spec: RunSpec, hp: Hyperparameters, target: Target, data: VariantData, chunks: Chunks, session: Session,
    restore: tuple[str, str] | None = None,
) -> dict:
    """Train one variant for one seed; return its record (also written to ``run.json`` by rank 0).

    ``chunks()`` streams this worker's share of the variant's rows once (the local runner: every shard
    pair in order; Ray Train: this worker's split of the variant's dataset); each epoch is one pass,
    weighted by :class:`~influencespace.train.sampler.EpochBatches`. ``restore`` = (local directory,
    URI) of an epoch checkpoint of this run (every rank's DeepSpeed partition, ``history.json``): the
    engine state (weights, optimizer, step) is loaded from it and training goes on with the next epoch.
    An epoch's samples depend on (seed, epoch) and the rows alone, so a restored run sees the same
    epochs as an uninterrupted one.
    """
    import torch

    started = time.perf_counter()
    engine, dtype = _setup(spec, hp, target, session)
    history: list[dict] = []
    checkpoint = ""
    if restore is not None:
        local_dir, checkpoint = restore
        engine.load_checkpoint(local_dir, tag=DEEPSPEED_TAG)
        with open(os.path.join(local_dir, HISTORY_FILE)) as f:
            history = json.load(f)
        if session.rank == 0:
            log.info("%s: restored after epoch %d from %s", spec.name, len(history), checkpoint)
    restored_epochs = len(history)
    setup_seconds = time.perf_counter() - started
    scale = epoch_scale(spec.steps_per_epoch * hp.batch_size, data.weight_sum)

    for epoch in range(restored_epochs, spec.epochs):
        batches = EpochBatches(chunks(), scale=scale, seed=spec.seed, epoch=epoch, rank=session.rank,
                               micro_batch=hp.micro_batch(session.world_size), window=hp.shuffle_window)
        metrics = _train_epoch(engine, target, batches, dtype, session, hp)
        metrics.update({"variant": spec.variant, "seed": spec.seed, "epoch": epoch + 1,
                        "step": sum(h["steps"] for h in history) + metrics["steps"]})
        history.append(metrics)
        checkpoint = _save_and_report(engine, spec, history, session, epoch + 1)
        if session.rank == 0:
            log.info("%s epoch %d/%d: loss %.4f, %d steps (%.1fs)", spec.name, epoch + 1, spec.epochs,
                     metrics["loss"], metrics["steps"], metrics["seconds"])
        fault_point("train.epoch", f"{spec.variant}-{epoch + 1}")  # tests: a worker lost between two epochs

    record = {
        "variant": spec.variant,
        "seed": spec.seed,
        "rows": data.rows,
        "weight_sum": data.weight_sum,
        "epochs": spec.epochs,
        "steps_per_epoch": spec.steps_per_epoch,  # planned: an epoch holds this many global batches in expectation
        "steps": int(sum(h["steps"] for h in history)),  # taken
        "global_batch": hp.batch_size,
        "world_size": session.world_size,
        "hyperparameters": asdict(hp),
        "target": target.describe(),
        "history": history,
        "final_loss": history[-1]["loss"],
        "train_seconds": float(sum(h["seconds"] for h in history)),
        "setup_seconds": float(setup_seconds),
        "wall_seconds": float(time.perf_counter() - started),
        "model": _relative(storage.join(spec.output_uri, MODEL_FILE), spec.stage_dir),
        "checkpoint": _relative(checkpoint, spec.stage_dir),
        "restored_after_epoch": restored_epochs,
    }
    state = target.export_state(_full_state_dict(engine))
    if session.rank == 0:
        buffer = io.BytesIO()
        torch.save(state, buffer)
        storage.write_bytes(storage.join(spec.output_uri, MODEL_FILE), buffer.getvalue())
        # run.json last: its presence marks the run complete (a resumed stage skips it).
        storage.write_json(storage.join(spec.output_uri, RUN_FILE), record)
    _barrier(session)
    engine.destroy()
    return record


def warm_up(spec: RunSpec, hp: Hyperparameters, target: Target, session: Session, steps: int = 3) -> None:
    """A few throwaway steps on random inputs before the first timed run of a process.

    The first steps in a fresh process pay for allocator growth, thread pools and the collectives'
    first-call setup; without this the first variant trained (the baseline) would look slower than
    the rest and every time ratio would be biased in the curated sets' favour. Nothing is read or saved.
    """
    engine, dtype = _setup(spec, hp, target, session)
    rng = np.random.default_rng([spec.seed, session.rank])
    micro = hp.micro_batch(session.world_size)
    batches = (target.synthetic_batch(rng, micro) for _ in range(steps * hp.gradient_accumulation))
    _train_epoch(engine, target, batches, dtype, session, hp)
    engine.destroy()


def _setup(spec: RunSpec, hp: Hyperparameters, target: Target, session: Session):
    import deepspeed
    import torch
    from deepspeed.utils import logger as ds_logger

    ds_logger.setLevel(logging.WARNING)  # DeepSpeed logs every config key at INFO on every rank
    model = target.build(spec.seed)
    engine, _, _, _ = deepspeed.initialize(
        model=model,
        model_parameters=[p for p in model.parameters() if p.requires_grad],
        config=deepspeed_config(hp, session.world_size),
        dist_init_required=False,  # the runner (Ray Train or the local runner) owns the process group
    )
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[hp.precision]
    return engine, dtype


def in_step(batches: Iterable[dict], session: Session) -> Iterator[dict]:
    """``batches`` for as long as every worker has one (the workers' streams may differ by a few samples).

    Each step the workers agree (an all-reduce of MIN) whether all of them hold a next batch; when one
    has run out, all stop, and the others read the rest of their stream (a tail of a few samples at
    most, :mod:`~influencespace.train.sampler`) so that Ray Data finishes the epoch's split cleanly.
    """
    import torch
    import torch.distributed as dist

    iterator = iter(batches)
    while True:
        batch = next(iterator, None)
        if session.world_size > 1:
            flag = torch.tensor([0 if batch is None else 1], dtype=torch.int64)
            dist.all_reduce(flag, op=dist.ReduceOp.MIN)
            if not flag.item():
                for _ in iterator:
                    pass
                return
        elif batch is None:
            return
        yield batch


def accumulation_groups(batches: Iterable[dict], size: int) -> Iterator[list[dict]]:
    """Consecutive groups of ``size`` micro-batches, one optimizer step each; a last partial group is dropped
    (its samples would otherwise carry their gradients into the next epoch's first step)."""
    group: list[dict] = []
    for batch in batches:
        group.append(batch)
        if len(group) == size:
            yield group
            group = []


def _train_epoch(engine, target: Target, batches: Iterable[dict], dtype, session: Session, hp: Hyperparameters) -> dict:
    import torch
    import torch.distributed as dist

    engine.train()
    losses = []
    started = t0 = time.perf_counter()
    for group in in_step(accumulation_groups(batches, hp.gradient_accumulation), session):
        if not losses:
            # The clock starts at the first batch: starting the epoch's data stream (Ray Data launches
            # the read tasks of a variant's first epoch: seconds, whatever the variant's size) is
            # recorded apart, so that the training time measures the steps and the rows streamed.
            t0 = time.perf_counter()
        step_losses = []
        for batch in group:  # DeepSpeed steps the optimizer after the group's last micro-step
            image, text = target.inputs(batch, session.device, dtype)
            loss = _loss(engine, image, text, session)
            engine.backward(loss)
            engine.step()
            step_losses.append(loss.detach().float())
        losses.append(torch.stack(step_losses).mean())
    _barrier(session)  # the epoch ends when the slowest worker is done
    seconds = time.perf_counter() - t0
    if not losses:
        raise InputDataError(
            f"an epoch had no full global batch of {hp.batch_size} samples: the variant keeps too few rows for "
            "train.batch_size; lower train.batch_size or keep more rows"
        )
    # Each worker's loss covers its rows of every global batch; their mean is the global-batch loss.
    offered = getattr(batches, "offered", len(losses) * hp.batch_size // session.world_size)
    totals = torch.tensor([float(torch.stack(losses).mean()), float(offered)], dtype=torch.float64)
    if session.world_size > 1:
        dist.all_reduce(totals)
        totals[0] /= session.world_size
    steps = len(losses)
    return {"loss": float(totals[0]), "seconds": float(seconds), "first_batch_seconds": float(t0 - started),
            "steps": steps, "samples": steps * hp.batch_size, "samples_offered": int(totals[1])}


def _loss(engine, image, text, session: Session):
    image_features, text_features, scale = engine(image, text)
    # CLIP's cap on the temperature (ClipHeads applies it already; open_clip's forward returns exp(s) and
    # leaves the cap to its trainer): with the gradient of the clamp, a capped scale stops learning.
    scale = scale.clamp(max=MAX_LOGIT_SCALE)
    if session.world_size == 1:
        return clip_loss(image_features, text_features, scale)
    import torch.distributed as dist
    from torch.distributed._functional_collectives import all_gather_single

    # Gathered with gradients: every pair is scored against the whole global batch (as CLIP does), and
    # the gradient that flows back to each worker's features includes the other workers' losses.
    # (torch's functional collective; torch.distributed.nn.functional.all_gather is deprecated.)
    all_images = all_gather_single(image_features, 0, dist.group.WORLD)
    all_texts = all_gather_single(text_features, 0, dist.group.WORLD)
    offset = session.rank * len(image_features)
    return clip_loss(image_features, text_features, scale, all_images, all_texts, offset)


def _save_and_report(engine, spec: RunSpec, history: list[dict], session: Session, epoch: int) -> str:
    """Write this epoch's checkpoint (every rank its part) and hand it to the runner; return its URI."""
    import torch

    metrics = history[-1]
    name = checkpoint_name(spec, epoch)
    state = _full_state_dict(engine)
    with tempfile.TemporaryDirectory(prefix="influencespace-ckpt-") as tmp:
        # DeepSpeed's own checkpoint (module, optimizer and ZeRO partitions: what resuming needs) ...
        engine.save_checkpoint(tmp, tag=DEEPSPEED_TAG)
        if session.rank == 0:
            # ... and the plain weights, which evaluation loads with torch.load(weights_only=True).
            torch.save(state, os.path.join(tmp, MODEL_FILE))
            with open(os.path.join(tmp, "metrics.json"), "w") as f:
                json.dump(metrics, f, indent=2)
            with open(os.path.join(tmp, HISTORY_FILE), "w") as f:
                json.dump(history, f, indent=2)
        session.report(dict(metrics), tmp, name)
    return storage.join(spec.checkpoint_root, name)


def checkpoint_name(spec: RunSpec, epoch: int) -> str:
    return f"{spec.name}-epoch{epoch:03d}"


def checkpoint_epoch(spec: RunSpec, name: str) -> int | None:
    """The epoch of a checkpoint directory name of ``spec``'s run, or None when it belongs to another run."""
    prefix = f"{spec.name}-epoch"
    tail = name[len(prefix):]
    return int(tail) if name.startswith(prefix) and tail.isdigit() else None


def _full_state_dict(engine) -> dict:
    """The module's full weights on CPU (ZeRO-3 partitions gathered first; every rank must call)."""
    module = engine.module
    if engine.zero_optimization_stage() == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
            return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}
    return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}


def _barrier(session: Session) -> None:
    if session.world_size > 1:
        import torch.distributed as dist

        dist.barrier()


def _relative(uri: str, base: str) -> str:
    if base and uri.startswith(base.rstrip("/") + "/"):
        return uri[len(base.rstrip("/")) + 1 :]
    return uri


def summarize_runs(records: list[dict]) -> dict:
    """The per-variant ``metrics.json``: every seed's run plus means (what evaluate and the report read)."""
    records = sorted(records, key=lambda r: r["seed"])
    seconds = np.array([r["train_seconds"] for r in records], dtype=float)
    return {
        "variant": records[0]["variant"],
        "seeds": [r["seed"] for r in records],
        "rows": records[0]["rows"],
        "steps": records[0]["steps"],
        "epochs": records[0]["epochs"],
        "final_loss_mean": float(np.mean([r["final_loss"] for r in records])),
        "train_seconds_mean": float(seconds.mean()),
        "runs": {str(r["seed"]): r for r in records},
    }
