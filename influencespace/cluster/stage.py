"""The ``cluster`` stage: distributed k-means over the embed stage's pool (the Ray adapter).

Workers (Ray actors, or in-process objects for ``runtime.runner: local``) each own a contiguous group of
the ``embed/pool`` Parquet shards; the driver only holds the seeding sample, the centroids and the
per-centroid partial sums it reduces. Outputs (``docs/architecture.md``)::

    cluster/centroids.npy                 (k, d) float32
    cluster/assignments/part-NNNNN.parquet id, cluster (int32), distance (float32); one per input shard
    cluster/kmeans_log.json               objective per iteration, sizes, rejects, faiss index used
    cluster/rejects/part-NNNNN.parquet    id, reason, row (its position in the pool shard); only for shards with NaN/inf embeddings
    cluster/coarse_centroids.npy          (k1, d) and coarse offsets, two-level k-means only
    cluster/checkpoint/<phase>.npz        centroids after every iteration (resume)
"""

from __future__ import annotations

import io
import logging
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from influencespace import storage
from influencespace.cluster.checkpoint import StorageCheckpoint
from influencespace.cluster.kmeans import KMeansParams, KMeansResult, check_dimensions, fit
from influencespace.cluster.shards import (
    FinalSummary,
    LocalPool,
    ShardedDataset,
    ShardInfo,
    ShardWorker,
    plan_groups,
)
from influencespace.errors import InputDataError
from influencespace.stages import Stage, StageContext, StageResult
from influencespace.storage import parquet_rows

log = logging.getLogger(__name__)


class RayPool:
    """One Ray actor per worker; arguments are put in the object store once and shared by all actors.

    An actor lost with its node is restarted (anywhere its resources fit) up to ``restarts`` times, and
    the call it was answering is retried: every method is idempotent, and a restarted worker reads its
    shards again on first use (:meth:`ShardWorker.assign_to` & co.), so the result does not change.
    """

    def __init__(self, specs: Sequence[dict[str, Any]], num_cpus: float, num_gpus: float,
                 resources: dict[str, float] | None = None, restarts: int = 0):
        import ray

        actor = ray.remote(ShardWorker).options(
            num_cpus=num_cpus, num_gpus=num_gpus, resources=resources or {},
            max_restarts=restarts, max_task_retries=restarts,
        )  # fmt: skip
        self.actors = [actor.remote(**spec) for spec in specs]

    @staticmethod
    def _get(refs: list[Any]) -> list[Any]:
        import ray

        from influencespace.runtime import domain_error

        try:
            return ray.get(refs)
        except ray.exceptions.RayTaskError as exc:
            # Errors a user can act on (bad input, bad config) are re-raised as themselves, without the
            # remote traceback (runtime.domain_error, as for every Ray task); anything else keeps it.
            found = domain_error(exc)
            if found is not None:
                raise found from None
            raise

    def call_each(self, method: str, args: Sequence[tuple[Any, ...]]) -> list[Any]:
        return self._get([getattr(actor, method).remote(*a) for actor, a in zip(self.actors, args, strict=True)])

    def broadcast(self, method: str, *args: Any) -> list[Any]:
        import ray

        refs = [ray.put(a) for a in args]
        return self._get([getattr(actor, method).remote(*refs) for actor in self.actors])

    def reduce(self, method: str, args: tuple[Any, ...], finish: Any = None, finish_args: tuple[Any, ...] = ()) -> Any:
        """Every actor's answer summed off the driver, then ``finish``-ed there too; one result comes back.

        The answers stay in the object store; remote adds combine them pairwise in the fixed order of
        :func:`~influencespace.cluster.kmeans.tree_sum` (so the sums depend on the worker count only),
        each add where Ray finds its inputs. The adds and ``finish`` take no CPU reservation: the actors
        hold the CPUs for the whole fit, and a task waiting for one would wait forever.
        """
        import ray

        put = {id(a): ray.put(a) for a in args}
        answers = [getattr(actor, method).remote(*put.values()) for actor in self.actors]
        add = ray.remote(_add).options(num_cpus=0)
        while len(answers) > 1:
            pairs = [add.remote(answers[i], answers[i + 1]) for i in range(0, len(answers) - 1, 2)]
            answers = pairs + ([answers[-1]] if len(answers) % 2 else [])
        if finish is not None:
            shared = [put.get(id(v), v) for v in finish_args]  # the centroids: the copy the actors read
            answers = [ray.remote(finish).options(num_cpus=0).remote(answers[0], *shared)]
        return self._get(answers)[0]

    def close(self) -> None:
        import ray

        for actor in self.actors:
            ray.kill(actor)
        self.actors = []


def _add(a: Any, b: Any) -> Any:
    return a + b


def start_workers(config: Any, groups: Sequence[Sequence[tuple[int, str]]]) -> LocalPool | RayPool:
    """Workers for ``groups`` on the runner the config names."""
    cfg = config.cluster
    spec = {"spherical": cfg.spherical, "device": cfg.device, "cache": cfg.cache_shards}
    if config.runtime.runner == "local":
        return LocalPool([ShardWorker(shards=g, **spec) for g in groups])
    from influencespace.runtime import ensure_ray, placement

    ensure_ray(config.runtime)
    import ray

    available = ray.cluster_resources().get("CPU", 0)
    if len(groups) * cfg.worker_cpus > available:
        log.warning(
            "cluster: %d workers x %s CPUs exceed the %s CPUs Ray has now; they wait for the autoscaler "
            "(or lower cluster.num_workers / cluster.worker_cpus)",
            len(groups), cfg.worker_cpus, available,
        )  # fmt: skip
    settings = storage.current_settings()
    specs = [
        {
            "shards": list(g),
            "threads": max(1, int(cfg.worker_cpus)),
            "storage_settings": (settings.endpoint_url, settings.region, settings.retries),
            **spec,
        }
        for g in groups
    ]
    # faiss on GPU runs on the GPU node type, faiss on CPU on the CPU node type (runtime.*_node_resource).
    node = placement(config.runtime, "gpu" if cfg.device == "gpu" else "cpu")
    return RayPool(
        specs, num_cpus=cfg.worker_cpus, num_gpus=1 if cfg.device == "gpu" else 0,
        resources=node.get("resources"), restarts=config.runtime.worker_restarts,
    )  # fmt: skip


def load_shards(pool: LocalPool | RayPool) -> tuple[list[list[ShardInfo]], str]:
    """Validate every shard on its worker; returns the infos per worker and the faiss index in use."""
    answers = pool.broadcast("load")
    infos = [list(worker_infos) for worker_infos, _ in answers]
    check_dimensions({info.uri: info.dim for worker in infos for info in worker if info.dim is not None})
    return infos, answers[0][1]


def _save_npy(uri: str, array: np.ndarray) -> None:
    buffer = io.BytesIO()
    np.save(buffer, array)
    storage.write_bytes(uri, buffer.getvalue())


class ClusterStage(Stage):
    """Stage 2: k-means over ``embed/pool`` into ``centroids.npy``, ``assignments/`` and ``kmeans_log.json``."""

    name = "cluster"
    inputs = ("embed",)
    section = "cluster"

    def run(self, ctx: StageContext) -> StageResult:
        cfg = ctx.config.cluster
        params = KMeansParams.from_config(cfg)
        pool_uri = ctx.input_path("embed", "pool")
        files = storage.list_files(pool_uri, ".parquet", recursive=True)
        if not files:
            raise InputDataError(f"no Parquet shards in the embed output '{pool_uri}'; rerun the embed stage")
        groups = plan_groups(files, [parquet_rows(f) for f in files], cfg.num_workers)
        timings: dict[str, float] = {}
        t0 = time.perf_counter()
        pool = start_workers(ctx.config, groups)
        try:
            infos, index = load_shards(pool)
            timings["start_and_load"] = time.perf_counter() - t0
            log.info(
                "cluster: %d shards on %d %s worker(s), %s",
                len(files), len(groups), ctx.config.runtime.runner, index,
            )  # fmt: skip
            dataset = ShardedDataset(pool, infos)
            rejected = {
                reason: sum(info.rejected[reason] for worker in infos for info in worker)
                for reason in ("nonfinite", "zero_norm")
            }
            if any(rejected.values()):
                log.warning("cluster: rejected %s embeddings (written to rejects/)", rejected)
            t0 = time.perf_counter()
            result = fit(dataset, params, StorageCheckpoint(ctx.path("checkpoint")))
            timings["fit"] = time.perf_counter() - t0
            _save_npy(ctx.path("centroids.npy"), result.centroids)
            if result.coarse is not None:
                _save_npy(ctx.path("coarse_centroids.npy"), result.coarse.centroids)
                _save_npy(ctx.path("coarse_offsets.npy"), result.coarse.offsets)
            t0 = time.perf_counter()
            summaries = pool.broadcast(
                "write_assignments", result.centroids, result.coarse, ctx.path("assignments"), ctx.path("rejects")
            )
            timings["assign_and_write"] = time.perf_counter() - t0
            # Memory per worker is bounded by its shards (cache) or by one shard (streaming): record it.
            usage = pool.broadcast("usage")
        finally:
            pool.close()
        final: FinalSummary = sum(summaries[1:], summaries[0])
        record = _log(params, cfg, result, final, dataset, rejected, index)
        record["seconds"] = {name: round(value, 3) for name, value in timings.items()}
        record["worker_peak_rss_bytes"] = [u["peak_rss_bytes"] for u in usage]
        record["worker_cpu_seconds"] = [round(u["cpu_seconds"], 2) for u in usage]
        storage.write_json(ctx.path("kmeans_log.json"), record)
        outputs = {"centroids": "centroids.npy", "assignments": "assignments", "log": "kmeans_log.json"}
        if any(rejected.values()):
            outputs["rejects"] = "rejects"
        if result.coarse is not None:
            outputs["coarse_centroids"] = "coarse_centroids.npy"
        counts = {
            "points": dataset.count(),
            "rejected": sum(rejected.values()),
            "clusters": params.k,
            "empty_clusters": int((final.counts == 0).sum()),
            "iterations": result.iterations,
            "shards": len(files),
        }
        extra = {
            "objective": final.objective,
            "index": index,
            "dim": dataset.dim(),
            "converged": result.converged,
            "worker_peak_rss_bytes": max(u["peak_rss_bytes"] for u in usage),
        }
        return StageResult(counts=counts, outputs=outputs, extra=extra)


def _log(
    params: KMeansParams,
    cfg: Any,
    result: KMeansResult,
    final: FinalSummary,
    dataset: ShardedDataset,
    rejected: dict[str, int],
    index: str,
) -> dict[str, Any]:
    sizes = final.counts
    return {
        "k": params.k,
        "dim": dataset.dim(),
        "points": dataset.count(),
        "rejected": rejected,
        "spherical": params.spherical,
        "distance": "1 - cos(x, c)" if params.spherical else "||x - c||^2",
        "seeding": params.seeding,
        "seeding_sample": min(params.seeding_sample, dataset.count()),
        "seed": params.seed,
        "device": cfg.device,
        "index": index,
        "workers": len(dataset.worker_rows),
        "hierarchical": params.hierarchical,
        "k_coarse": params.coarse_k if params.hierarchical else None,
        "coarse_iterations": result.coarse_history,
        "iterations": result.history,
        "converged": result.converged,
        "resumed_after": result.resumed_at,
        "final_objective": final.objective,
        "mean_distance": final.objective / max(1, int(sizes.sum())),
        "cluster_sizes": {"min": int(sizes.min()), "max": int(sizes.max()), "empty": int((sizes == 0).sum())},
    }
