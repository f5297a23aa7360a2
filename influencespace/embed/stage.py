"""The ``embed`` stage: the Ray Data adapter around :mod:`influencespace.embed.pairs`.

Ray runner, one streaming dataset over every pending shard of every split::

    from_items(shard plans) ─map_batches(read + decode + tokenise)─> tasks, 1 CPU each
        ─map_batches(EmbedActor, ActorPoolStrategy(size=num_actors))─> actors, model loaded once
        ─iter_internal_ref_bundles()─> driver: cuts the ordered output at shard boundaries
        ─ray.remote write tasks─> <split>/part-NNNNN.parquet, rejects/<split>-part-NNNNN.parquet

The driver only handles object references and row counts: embeddings go from the actors' blocks
straight to the write tasks. Output order is preserved (``preserve_order``), and every shard has a
known row count (rejected rows travel on with a reason), so the k-th shard is the next ``rows``
rows of the stream; each write task checks split, shard and row positions before writing.

Resources: a CPU actor reserves a fraction of a CPU but runs ``threads_per_actor`` torch threads, and
read tasks reserve 1 CPU. The read and encode steps therefore differ in resources, which also keeps
Ray Data from fusing decode into the actor. On 2 CPUs an actor pool holding every CPU would starve
the read tasks and hang (see ENVIRONMENT.md). With ``runtime.use_gpu`` each actor holds one GPU.

``runtime.runner: local`` runs the same functions in this process, shard after shard.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import replace
from typing import Any

from influencespace import storage
from influencespace.embed import pairs
from influencespace.embed.encoders import EncoderSpec
from influencespace.embed.fusion import fused_dim
from influencespace.embed.registry import load_encoder, spec_from_config
from influencespace.errors import StageStateError
from influencespace.faults import fault_point
from influencespace.progress import track
from influencespace.stages import Stage, StageContext, StageResult

log = logging.getLogger(__name__)

SPLITS = ("pool", "validation", "test")
MAX_WRITES_IN_FLIGHT = 4
ENCODER_DIR = "_encoder"  # the encoder checkpoint the actors load (see _by_reference)
CPU_ACTOR_RESERVATION = 0.5  # fraction of a CPU a CPU actor reserves; its torch threads use more


class EmbedStage(Stage):
    name = "embed"
    inputs = ("data",)
    section = "embed"

    def run(self, ctx: StageContext) -> StageResult:
        if ctx.config.data.source == "embeddings":
            return _convert_precomputed(ctx)
        cfg = ctx.config.embed
        data_outputs = ctx.input_manifests["data"]["outputs"]
        default_format = data_outputs.get("format", "parquet")
        inputs: dict[str, tuple[str, str]] = {}
        for split in SPLITS:
            if split in data_outputs:
                uri = ctx.input_path("data", split)
                inputs[split] = (uri, pairs.detect_format(uri, default_format))
        if "pool" not in inputs:
            raise StageStateError("the data stage recorded no 'pool' output; rerun the data stage")

        t0 = time.perf_counter()
        spec = spec_from_config(cfg, ctx.config.data)  # before planning: a bad model setting fails before any work
        shards = pairs.load_or_make_plan(ctx.stage_dir, inputs, cfg.rows_per_shard, ctx.config.runtime)
        done = {s: pairs.shard_counts(ctx.stage_dir, s) for s in shards}
        pending = [s for s in shards if done[s] is None]
        log.info("embed: %d shards, %d already done, %d to embed with %s", len(shards), len(shards) - len(pending), len(pending), spec.describe())
        runner = _run_local if ctx.config.runtime.runner == "local" else _run_ray
        if pending:
            done.update(runner(ctx, spec, pending))
        seconds = time.perf_counter() - t0

        counts: dict[str, int] = {}
        for split in inputs:
            planned = sum(s.rows for s in shards if s.split == split)
            embedded = sum(done[s][0] for s in shards if s.split == split)
            rejected = sum(done[s][1] for s in shards if s.split == split)
            if embedded + rejected != planned:  # never silently drop a row
                raise StageStateError(
                    f"embed: split '{split}' has {planned} input rows but {embedded} embedded + {rejected} rejected; "
                    f"rerun with --overwrite"
                )
            counts.update({split: embedded, f"{split}_rejected": rejected, f"{split}_input": planned})
        counts["rejects"] = sum(counts[f"{s}_rejected"] for s in inputs)
        embedded_now = sum(s.rows for s in pending)
        return StageResult(
            counts=counts,
            outputs={**{split: split for split in inputs}, "rejects": "rejects"},
            extra={
                "dim": fused_dim(spec.dim, cfg.fusion),
                "tower_dim": spec.dim,
                "model": spec.describe(),
                "checkpoint_sha256": spec.checkpoint_sha256(),
                "weights_sha256": spec.weights_sha256,
                "fusion": cfg.fusion,
                "image_weight": cfg.image_weight,
                "dtype": cfg.dtype,
                "shards": len(shards),
                "shards_embedded": len(pending),
                "shards_reused": len(shards) - len(pending),
                "rows_embedded_now": embedded_now,
                "pairs_per_second": round(embedded_now / seconds, 2) if seconds > 0 else None,
            },
        )


# --------------------------------------------------------------------------------------------------
# Local runner (tests, debugging): the same functions, in this process


def _run_local(ctx: StageContext, spec: EncoderSpec, pending: list[pairs.Shard]) -> dict[pairs.Shard, tuple[int, int]]:
    cfg = ctx.config.embed
    encoder = load_encoder(spec, "cuda" if ctx.config.runtime.use_gpu else "cpu")
    out = {}
    with track("embed", sum(s.rows for s in pending), "rows") as bar:
        for shard in pending:
            parts = [
                pairs.embed_prepared(batch, encoder, cfg.fusion, cfg.image_weight, cfg.dtype)
                for batch in pairs.prepared_batches(shard, spec.image_preprocess, spec.text_preprocess, cfg.batch_size)
            ]
            out[shard] = pairs.write_shard(ctx.stage_dir, shard, parts)
            bar.add(shard.rows)
    return out


# --------------------------------------------------------------------------------------------------
# Ray runner


def _read_shard(batch: dict[str, Any], image: Any, text: Any, batch_rows: int):
    """Ray Data task UDF: shard plans in, their prepared batches out (decode + tokenise on CPU)."""
    for plan in batch["shard"]:
        yield from pairs.prepared_batches(pairs.Shard.from_json(str(plan)), image, text, batch_rows)


class EmbedActor:
    """Ray Data actor UDF: loads the encoder once, then embeds prepared batches."""

    def __init__(self, spec: EncoderSpec, device: str, threads: int | None, fusion: str, image_weight: float, dtype: str,
                 s3: Any = None):
        import torch

        if s3 is not None:  # the encoder checkpoint may live on S3 (see _by_reference)
            storage.use(s3)
        if threads:
            # Ray sets OMP_NUM_THREADS to the (fractional) CPU reservation; use the threads asked for.
            torch.set_num_threads(threads)
        self.encoder = load_encoder(spec, device)
        self.fusion, self.image_weight, self.dtype = fusion, image_weight, dtype
        self.batches = 0

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        self.batches += 1
        fault_point("embed.batch", self.batches)  # tests: an actor lost in the middle of the stream
        return pairs.embed_prepared(batch, self.encoder, self.fusion, self.image_weight, self.dtype)


def _write_task(stage_dir: str, shard_json: str, ranges: list[tuple[int, int]], s3: Any, *blocks: Any) -> tuple[int, int]:
    from ray.data.block import BlockAccessor

    storage.use(s3)
    shard = pairs.Shard.from_json(shard_json)
    fault_point("embed.write", f"{shard.split}-{shard.index}")  # tests: the driver killed while shards are written
    parts = []
    for block, (start, stop) in zip(blocks, ranges, strict=True):
        accessor = BlockAccessor.for_block(BlockAccessor.for_block(block).slice(start, stop, copy=False))
        parts.append(accessor.to_batch_format("numpy"))
    return pairs.write_shard(stage_dir, shard, parts)


def _by_reference(ctx: StageContext, spec: EncoderSpec) -> EncoderSpec:
    """The spec the actors get: an inline checkpoint is written to ``embed/_encoder/`` and named by URI.

    Ray keeps actor constructor arguments over 100 KB in the object store, and a restarted actor can
    not get them back once they are evicted (ray-project/ray#53727): the actor's arguments must be
    small enough to travel inside its creation task, so a lost actor can always rebuild itself.
    """
    if spec.checkpoint_bytes is None:
        return spec
    uri = ctx.path(ENCODER_DIR, f"{spec.checkpoint_sha256()[:16]}.pt")
    if not storage.is_file(uri):
        storage.write_bytes(uri, spec.checkpoint_bytes)
    return replace(spec, checkpoint=uri, checkpoint_bytes=None)


def _threads(cfg: Any, use_gpu: bool) -> int | None:
    if cfg.threads_per_actor:
        return cfg.threads_per_actor
    if use_gpu:
        return None
    return max(1, (os.cpu_count() or 1) // cfg.num_actors)


def _run_ray(ctx: StageContext, spec: EncoderSpec, pending: list[pairs.Shard]) -> dict[pairs.Shard, tuple[int, int]]:
    import ray
    import ray.data

    from influencespace.runtime import configure_data_context, ensure_ray, placement

    cfg, runtime = ctx.config.embed, ctx.config.runtime
    ensure_ray(runtime)
    configure_data_context()
    ray.data.DataContext.get_current().execution_options.preserve_order = True  # shard cutting relies on it

    device = "cuda" if runtime.use_gpu else "cpu"
    s3 = storage.current_settings()
    actor_spec = _by_reference(ctx, spec)
    actor_placement = placement(runtime, "gpu")
    ds = ray.data.from_items([{"shard": s.to_json()} for s in pending], override_num_blocks=len(pending))
    ds = ds.map_batches(
        _read_shard,
        fn_kwargs={"image": spec.image_preprocess, "text": spec.text_preprocess, "batch_rows": cfg.batch_size},
        batch_size=1,
        num_cpus=1,
    )
    ds = ds.map_batches(
        EmbedActor,
        fn_constructor_args=(actor_spec, device, _threads(cfg, runtime.use_gpu), cfg.fusion, cfg.image_weight,
                             cfg.dtype, s3),
        batch_size=cfg.batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=cfg.num_actors),
        # A lost actor (node gone, process killed) is restarted by Ray Data, loads the encoder again, and
        # the batch it held is retried: embedding is a pure function of the batch, so the output does not
        # change. Ray Data's own policy applies (restarts without limit); its per-call max_restarts is
        # deprecated (RayDeprecationWarning on ray_remote_args), so runtime.worker_restarts does not reach it.
        num_cpus=1 if runtime.use_gpu else CPU_ACTOR_RESERVATION,
        num_gpus=actor_placement.get("num_gpus", 0),
        resources=actor_placement.get("resources"),  # the GPU-node marker on clusters that define one
    )

    write = ray.remote(num_cpus=0, max_retries=3)(_write_task)  # light I/O; must never wait for a CPU slot
    results: dict[pairs.Shard, tuple[int, int]] = {}
    in_flight: dict[Any, pairs.Shard] = {}
    queue = iter(pending)
    shard = next(queue)
    need = shard.rows
    blocks: list[Any] = []
    ranges: list[tuple[int, int]] = []

    def settle(limit: int) -> None:
        while len(in_flight) > limit:
            ready, _ = ray.wait(list(in_flight), num_returns=1)
            results[in_flight.pop(ready[0])] = ray.get(ready[0])

    with track("embed", sum(s.rows for s in pending), "rows") as bar:
        for bundle in ds.iter_internal_ref_bundles():
            slices = bundle.slices or (None,) * len(bundle.blocks)
            for entry, part in zip(bundle.blocks, slices, strict=True):
                start = part.start_offset if part is not None else 0
                stop = part.end_offset if part is not None else entry.metadata.num_rows
                while start < stop:
                    if shard is None:
                        raise StageStateError("embed: the pipeline produced more rows than planned; this is a bug")
                    take = min(stop - start, need)
                    blocks.append(entry.ref)
                    ranges.append((start, start + take))
                    start, need = start + take, need - take
                    bar.add(take)
                    if need == 0:
                        in_flight[write.remote(ctx.stage_dir, shard.to_json(), ranges, s3, *blocks)] = shard
                        settle(MAX_WRITES_IN_FLIGHT)
                        blocks, ranges = [], []
                        shard = next(queue, None)
                        need = shard.rows if shard is not None else 0
        settle(0)
    if shard is not None:
        raise StageStateError(f"embed: the pipeline ended before shard {shard.split}/{shard.index} was complete; rerun to resume")
    return results


def _converted_ids(stage_dir: str, split: str, index: int) -> tuple[list, None]:
    """The ids of converted shard ``index`` of ``split``: its rows and its rejects."""
    ids = []
    for uri in (storage.join(stage_dir, split, f"part-{index:05d}.parquet"),
                storage.join(stage_dir, "rejects", f"{split}-{index:05d}.parquet")):
        ids += pairs.parquet_ids(uri)[0]
    return ids, None


def _check_converted_ids(ctx: StageContext, split: str, inputs: list[str], column: str, rows: int) -> None:
    """Ids unique across every shard of a split (each shard checked itself while converting), in tasks."""
    import functools

    from influencespace.ids import find_repeated_ids

    read = functools.partial(_converted_ids, ctx.stage_dir, split)
    _, repeats = find_repeated_ids(ctx.config.runtime, list(range(len(inputs))), read,
                                   storage.join(ctx.stage_dir, "_work", "ids", split), rows)
    pairs.check_unique_ids(split, inputs, repeats, column,
                           "; fix the input and rerun with --overwrite (converted shards are kept otherwise)")


def _convert_precomputed(ctx: StageContext) -> StageResult:
    """data.source = embeddings: the user's vectors become this stage's output; nothing is encoded."""
    from influencespace.datasets.precomputed import PrecomputedSpec, list_shards
    from influencespace.embed.precomputed import write_precomputed

    data, cfg = ctx.config.data, ctx.config.embed
    spec = PrecomputedSpec.from_config(data)
    counts: dict[str, int] = {}
    outputs = {"rejects": "rejects"}
    facts: dict = {}
    for split, uri in (("pool", data.uri), ("validation", data.validation_uri), ("test", data.test_uri)):
        if not uri:
            continue
        facts = write_precomputed(uri, spec, cfg.fusion, cfg.image_weight, cfg.dtype, ctx.stage_dir, split,
                                  ctx.config.runtime)
        _check_converted_ids(ctx, split, list_shards(uri, spec), spec.id_column, facts["counts"]["input"])
        counts.update({split: facts["counts"]["embedded"], f"{split}_rejected": facts["counts"]["rejected"],
                       f"{split}_input": facts["counts"]["input"]})
        outputs[split] = split
    counts["rejects"] = sum(v for k, v in counts.items() if k.endswith("_rejected"))
    return StageResult(counts=counts, outputs=outputs,
                       extra={"model": "precomputed", "dim": facts.get("dim"), "tower_dim": facts.get("tower_dim")})
