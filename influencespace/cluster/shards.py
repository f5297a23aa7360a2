"""The embed stage's Parquet shards as a k-means :class:`~influencespace.cluster.kmeans.Dataset`.

The rows are split into contiguous groups of shards, one group per :class:`ShardWorker`. A worker
either keeps its shards in memory after one read (``cache=True``: memory ≈ its rows × dim × 4 bytes)
or reads them again, one shard at a time, on every pass (``cache=False``: memory ≈ one shard). Workers
are plain objects: the stage wraps them in Ray actors, or calls them in-process for
``runtime.runner: local``. A :class:`WorkerPool` hides which; :class:`ShardedDataset` only calls methods
on every worker and reduces their partial sums in worker order (float64), so the result does not depend
on which worker answered first.

Row order is the order of the shard files and of the rows inside them, so a sharded run with the same
seed draws the same sample and starts from the same centroids as an in-memory run on the concatenation.
"""

from __future__ import annotations

import logging
import resource
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from influencespace import storage
from influencespace.cluster.assign import CoarseLevel, FlatSearcher, Partial, assign, partial_sums, prepare_rows
from influencespace.cluster.kmeans import Update, lloyd_update, sample_indices, tree_sum
from influencespace.errors import InputDataError
from influencespace.faults import fault_point

log = logging.getLogger(__name__)

EMBEDDING = "embedding"
REJECT_REASONS = {
    "nonfinite": "non-finite embedding (NaN or inf)",
    "zero_norm": "zero-norm embedding (spherical k-means)",
}


@dataclass(frozen=True)
class ShardInfo:
    """One input shard after the validation pass."""

    index: int  # position of the file among all input shards (names the output shard)
    uri: str
    rows: int
    kept: int
    rejected: dict[str, int]
    dim: int | None  # None for a shard without rows


@dataclass
class FinalSummary:
    """What the final assignment pass wrote: cluster sizes, objective, rows and shards written/skipped."""

    counts: np.ndarray
    objective: float
    written: int
    skipped: int

    def __add__(self, other: FinalSummary) -> FinalSummary:
        return FinalSummary(
            self.counts + other.counts,
            self.objective + other.objective,
            self.written + other.written,
            self.skipped + other.skipped,
        )


def read_shard(uri: str, with_ids: bool = False) -> tuple[np.ndarray, np.ndarray, Any]:
    """Embeddings of one Parquet shard as a float array, a mask of null rows, and the ids (an Arrow array) if asked.

    ``embedding`` must be a fixed-size list of floats (float16/float32), or a list whose rows all have
    one length; anything else is an :class:`InputDataError` naming the file.
    """
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    fs, path = storage.resolve(uri)
    columns = [EMBEDDING, "id"] if with_ids else [EMBEDDING]
    try:
        schema = pq.read_schema(path, filesystem=fs)
    except (OSError, pa.ArrowInvalid) as exc:
        raise InputDataError(f"'{uri}' is not a readable Parquet file: {exc}") from None
    missing = [c for c in columns if c not in schema.names]
    if missing:
        raise InputDataError(
            f"'{uri}' lacks column(s) {', '.join(missing)} (has: {', '.join(schema.names)}); "
            "the cluster stage reads the embed stage's pool output (id, embedding)"
        )
    table = pq.read_table(path, filesystem=fs, columns=columns)
    column = table.column(EMBEDDING).combine_chunks()
    kind = column.type
    if not (pa.types.is_fixed_size_list(kind) or pa.types.is_list(kind) or pa.types.is_large_list(kind)) or not (
        pa.types.is_floating(kind.value_type)
    ):
        raise InputDataError(f"'{uri}': column 'embedding' must be a list of float16/float32, got {kind}")
    n = len(column)
    null = column.is_null().to_numpy(zero_copy_only=False)
    if pa.types.is_fixed_size_list(kind):
        d = kind.list_size
        values = column.values.slice(column.offset * d, n * d)
    else:
        lengths = pc.list_value_length(column).to_numpy(zero_copy_only=False)
        lengths = lengths[~null]
        if len(lengths) and (lengths != lengths[0]).any():
            raise InputDataError(
                f"'{uri}': rows of 'embedding' have different lengths ({int(lengths.min())}–{int(lengths.max())}); "
                "every embedding must have the model's dimension"
            )
        d = int(lengths[0]) if len(lengths) else 0
        values = pc.list_flatten(column)  # null rows contribute no values
    if n and not d:
        raise InputDataError(
            f"'{uri}': column 'embedding' holds empty lists; expected vectors of the model's dimension"
        )
    flat = values.to_numpy(zero_copy_only=False)
    if null.any():
        # Null rows become NaN rows, rejected like any other non-finite embedding.
        x = np.full((n, d), np.nan, np.float32)
        x[~null] = flat.reshape(-1, d) if len(flat) == (n - null.sum()) * d else flat.reshape(n, d)[~null]
    else:
        x = flat.reshape(n, d)
    ids = table.column("id").combine_chunks() if with_ids else None
    return x, null, ids


class ShardWorker:
    """Holds (or streams) a contiguous group of shards and answers the k-means questions about them.

    Construction does nothing that can fail; :meth:`load` reads and validates the shards first, so that
    errors surface from a method call (which Ray reports with the original exception).
    """

    def __init__(
        self,
        shards: Sequence[tuple[int, str]],
        spherical: bool,
        device: str = "cpu",
        cache: bool = True,
        threads: int | None = None,
        storage_settings: Any = None,
    ):
        self.shards = list(shards)
        self.spherical = spherical
        self.device = device
        self.cache = cache
        self.threads = threads
        self.storage_settings = storage_settings
        self.searcher: FlatSearcher | None = None
        self._rows: dict[int, np.ndarray] = {}  # shard position -> kept rows (cache mode)
        self._coarse: dict[int, tuple[bytes, np.ndarray]] = {}  # shard position -> (coarse key, labels)
        self._kept_counts: list[int] = []
        self._passes = 0  # assignment passes answered by this process

    # -- passes over the shards --------------------------------------------------------------------

    def load(self) -> tuple[list[ShardInfo], str]:
        """Read every shard once: row counts, rejects, dimension; returns them and the faiss index in use."""
        if self.storage_settings is not None:
            storage.configure(*self.storage_settings)
        self.searcher = FlatSearcher(self.spherical, self.device, self.threads)
        infos = []
        for position, (index, uri) in enumerate(self.shards):
            raw, _, _ = read_shard(uri)
            rows, _, rejected = prepare_rows(raw, self.spherical)
            if self.cache:
                self._rows[position] = rows
            infos.append(ShardInfo(index, uri, len(raw), len(rows), rejected, raw.shape[1] if len(raw) else None))
        self._kept_counts = [info.kept for info in infos]
        return infos, self.searcher.description

    def _ready(self) -> FlatSearcher:
        """The searcher, after (re)reading the shards if this worker has not yet: a Ray actor restarted
        after its node was lost starts empty and is asked to go on where its predecessor stopped."""
        if self.searcher is None:
            self.load()
        assert self.searcher is not None
        return self.searcher

    def _shard_rows(self, position: int) -> np.ndarray:
        if self.cache:
            return self._rows[position]
        raw, _, _ = read_shard(self.shards[position][1])
        return prepare_rows(raw, self.spherical)[0]

    def sample(self, local_indices: np.ndarray) -> np.ndarray:
        """Rows at ``local_indices`` (sorted, counted over this worker's kept rows in shard order)."""
        self._ready()
        bounds = np.concatenate([[0], np.cumsum(self._kept_counts)])
        parts = []
        for position in range(len(self.shards)):
            lo, hi = np.searchsorted(local_indices, [bounds[position], bounds[position + 1]])
            if hi > lo:
                parts.append(self._shard_rows(position)[local_indices[lo:hi] - bounds[position]])
        return np.concatenate(parts) if parts else np.zeros((0, 0), np.float32)

    def _assign(self, position: int, rows: np.ndarray, centroids: np.ndarray, coarse: CoarseLevel | None):
        coarse_labels = None
        if coarse is not None:
            # Coarse labels stay fixed during the fine phase: with cached rows, compute them once.
            key = coarse.centroids.tobytes()
            cached = self._coarse.get(position)
            if cached is not None and cached[0] == key:
                coarse_labels = cached[1]
            else:
                coarse_labels = self.searcher.search(rows, coarse.centroids)[0]
                if self.cache:
                    self._coarse[position] = (key, coarse_labels)
        return assign(rows, centroids, self.searcher, coarse, coarse_labels)

    def assign_to(self, centroids: np.ndarray, coarse: CoarseLevel | None = None) -> Partial:
        """Partial sums, counts and objective of this worker's rows (one Lloyd assignment pass)."""
        self._ready()
        self._passes += 1
        fault_point("cluster.assign", self._passes)  # tests: a worker lost in the middle of a Lloyd pass
        total = Partial.zeros(len(centroids), centroids.shape[1])
        for position in range(len(self.shards)):
            total = total + self._shard_partial(position, centroids, coarse)
        return total

    def _shard_partial(self, position: int, centroids: np.ndarray, coarse: CoarseLevel | None) -> Partial:
        # A function of its own so that one shard's arrays are freed before the next shard is read.
        rows = self._shard_rows(position)
        labels, distances = self._assign(position, rows, centroids, coarse)
        return partial_sums(rows, labels, distances, len(centroids))

    def write_assignments(
        self, centroids: np.ndarray, coarse: CoarseLevel | None, assignments_dir: str, rejects_dir: str
    ) -> FinalSummary:
        """Final pass: ``assignments/part-NNNNN.parquet`` (id, cluster, distance) per input shard.

        Rejected rows go to ``rejects/part-NNNNN.parquet`` (id, reason) before the assignment shard, so an
        existing assignment shard means the shard is complete; existing ones are skipped (resume) and
        only read back for the cluster sizes and objective.
        """
        self._ready()
        summary = FinalSummary(np.zeros(len(centroids), np.int64), 0.0, 0, 0)
        for position in range(len(self.shards)):
            summary = summary + self._write_shard(position, centroids, coarse, assignments_dir, rejects_dir)
        return summary

    def _write_shard(
        self, position: int, centroids: np.ndarray, coarse: CoarseLevel | None, assignments_dir: str, rejects_dir: str
    ) -> FinalSummary:
        import pyarrow as pa

        index, uri = self.shards[position]
        out = storage.join(assignments_dir, f"part-{index:05d}.parquet")
        if storage.is_file(out):
            done = storage.read_table(out, columns=["cluster", "distance"])
            clusters = done.column("cluster").to_numpy()
            distances = done.column("distance").to_numpy()
            return FinalSummary(
                np.bincount(clusters, minlength=len(centroids)), float(distances.sum(dtype=np.float64)), 0, 1
            )
        raw, null, ids = read_shard(uri, with_ids=True)
        rows, kept, _ = prepare_rows(raw, self.spherical)
        if not kept.all():
            rejected_ids = ids.filter(pa.array(~kept))
            reasons = np.where(
                null[~kept] | ~np.isfinite(raw[~kept]).all(axis=1),
                REJECT_REASONS["nonfinite"],
                REJECT_REASONS["zero_norm"],
            )
            storage.write_table(  # row: the position in the pool shard (the assigned rows are the others, in order)
                pa.table({"id": rejected_ids, "reason": pa.array(reasons),
                          "row": pa.array(np.flatnonzero(~kept).astype(np.int64))}),
                storage.join(rejects_dir, f"part-{index:05d}.parquet"),
            )
        labels, distances = self._assign(position, rows, centroids, coarse)
        table = pa.table(
            {
                "id": ids.filter(pa.array(kept)),
                "cluster": pa.array(labels.astype(np.int32), pa.int32()),
                "distance": pa.array(distances.astype(np.float32), pa.float32()),
            }
        )
        storage.write_table(table, out)
        return FinalSummary(
            np.bincount(labels, minlength=len(centroids)), float(distances.sum(dtype=np.float64)), len(rows), 0
        )

    def usage(self) -> dict[str, float]:
        """Peak resident memory (bytes; Linux reports KiB) and CPU seconds of this process so far."""
        used = resource.getrusage(resource.RUSAGE_SELF)
        return {"peak_rss_bytes": used.ru_maxrss * 1024, "cpu_seconds": used.ru_utime + used.ru_stime}


class WorkerPool(Protocol):
    """Calls a method on every worker and returns the answers in worker order."""

    def call_each(self, method: str, args: Sequence[tuple[Any, ...]]) -> list[Any]: ...

    def broadcast(self, method: str, *args: Any) -> list[Any]: ...

    def reduce(self, method: str, args: tuple[Any, ...], finish: Any = None, finish_args: tuple[Any, ...] = ()) -> Any:
        """``finish(tree_sum(answers), *finish_args)`` of every worker's ``method(*args)`` (no finish: the sum)."""
        ...

    def close(self) -> None: ...


class LocalPool:
    """Workers in this process, called one after the other (``runtime.runner: local``)."""

    def __init__(self, workers: Sequence[ShardWorker]):
        self.workers = list(workers)

    def call_each(self, method: str, args: Sequence[tuple[Any, ...]]) -> list[Any]:
        return [getattr(worker, method)(*a) for worker, a in zip(self.workers, args, strict=True)]

    def broadcast(self, method: str, *args: Any) -> list[Any]:
        return [getattr(worker, method)(*args) for worker in self.workers]

    def reduce(self, method: str, args: tuple[Any, ...], finish: Any = None, finish_args: tuple[Any, ...] = ()) -> Any:
        total = tree_sum(self.broadcast(method, *args))
        return total if finish is None else finish(total, *finish_args)

    def close(self) -> None:
        self.workers = []


def plan_groups(files: Sequence[str], rows: Sequence[int], num_workers: int) -> list[list[tuple[int, str]]]:
    """Split shards into at most ``num_workers`` contiguous groups with about the same number of rows."""
    workers = max(1, min(num_workers, len(files)))
    cumulative = np.cumsum(rows, dtype=np.float64)
    total = cumulative[-1] if len(cumulative) else 0.0
    groups: list[list[tuple[int, str]]] = [[] for _ in range(workers)]
    for i, uri in enumerate(files):
        # A shard goes to the worker whose share of the rows its midpoint falls in.
        midpoint = (cumulative[i] - rows[i] / 2) / total if total > 0 else i / len(files)
        groups[min(int(midpoint * workers), workers - 1)].append((i, uri))
    return [g for g in groups if g]


class ShardedDataset:
    """The :class:`~influencespace.cluster.kmeans.Dataset` over workers' shards; partial sums reduced by the pool."""

    def __init__(self, pool: WorkerPool, infos: Sequence[Sequence[ShardInfo]]):
        self.pool = pool
        self.worker_rows = [sum(info.kept for info in worker) for worker in infos]
        dims = [info.dim for worker in infos for info in worker if info.dim is not None]
        self._dim = dims[0] if dims else 0

    def count(self) -> int:
        return int(sum(self.worker_rows))

    def dim(self) -> int:
        return self._dim

    def sample(self, n: int, rng: np.random.Generator) -> np.ndarray:
        indices = sample_indices(self.count(), n, rng)
        bounds = np.concatenate([[0], np.cumsum(self.worker_rows)])
        args = []
        for w in range(len(self.worker_rows)):
            lo, hi = np.searchsorted(indices, [bounds[w], bounds[w + 1]])
            args.append((indices[lo:hi] - bounds[w],))
        parts = [p for p in self.pool.call_each("sample", args) if len(p)]
        return np.concatenate(parts)

    def assign_to(self, centroids: np.ndarray, coarse: CoarseLevel | None = None) -> Partial:
        return self.pool.reduce("assign_to", (centroids, coarse))

    def step(self, centroids: np.ndarray, coarse: CoarseLevel | None, spherical: bool) -> Update:
        """Partials summed where the workers are (a fixed-order tree); the driver gets the :class:`Update`."""
        return self.pool.reduce("assign_to", (centroids, coarse), lloyd_update, (centroids, spherical))
