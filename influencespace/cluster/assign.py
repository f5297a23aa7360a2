"""Nearest-centroid assignment with faiss, and the per-centroid partial sums one pass produces.

Distances, written once and used everywhere in the cluster stage:

- Euclidean k-means: ``d(x, c) = ||x − c||²`` (what ``faiss.Kmeans`` minimises);
- spherical k-means (rows and centroids on the unit sphere): ``d(x, c) = 1 − <x, c>`` (cosine distance,
  ``||x − c||² / 2`` for unit vectors, so both variants minimise the same geometry).

The k-means objective is ``J = Σ_i d(x_i, c_{a(i)})`` with ``a(i)`` the nearest centroid of row ``i``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from influencespace.errors import ConfigError

log = logging.getLogger(__name__)

# Rows per float32 accumulation block of the partial sums; blocks are then added in float64, so the
# rounding error does not grow with the shard size.
SUM_BLOCK = 16384


@dataclass
class Partial:
    """What one pass over some rows contributes to a Lloyd step.

    ``sums[j] = Σ_{i: a(i)=j} x_i`` (float64), ``counts[j] = |{i: a(i)=j}|``, ``objective = Σ_i d(x_i, c_{a(i)})``.
    Partials of disjoint shards add up to the partial of their union, which is what the driver reduces.
    """

    sums: np.ndarray
    counts: np.ndarray
    objective: float

    @classmethod
    def zeros(cls, k: int, d: int) -> Partial:
        return cls(np.zeros((k, d), np.float64), np.zeros(k, np.int64), 0.0)

    def __add__(self, other: Partial) -> Partial:
        return Partial(self.sums + other.sums, self.counts + other.counts, self.objective + other.objective)


@dataclass(frozen=True)
class CoarseLevel:
    """The first level of two-level k-means: a row is first sent to its nearest coarse centroid ``c``
    and then compared only with the fine centroids ``offsets[c]:offsets[c+1]`` that belong to ``c``."""

    centroids: np.ndarray  # (k1, d) float32
    offsets: np.ndarray  # (k1 + 1,) int64, non-decreasing, offsets[-1] == number of fine centroids

    def sizes(self) -> np.ndarray:
        return np.diff(self.offsets)


class FlatSearcher:
    """Exact nearest-centroid search with a faiss flat index: inner product when spherical, L2 otherwise.

    ``device="gpu"`` uses a faiss GPU index and fails with :class:`ConfigError` when this faiss build has
    no GPU support or sees no GPU: a CPU run that was meant for a GPU is a mistake to report, not to hide.
    """

    def __init__(self, spherical: bool, device: str = "cpu", threads: int | None = None):
        import faiss

        self.spherical = spherical
        self.device = device
        if threads is not None:
            # One process per Ray worker: keep faiss inside the CPUs Ray gave it.
            faiss.omp_set_num_threads(max(1, int(threads)))
        metric = "inner product" if spherical else "L2"
        if device == "gpu":
            gpus = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
            if not hasattr(faiss, "StandardGpuResources") or gpus < 1:
                raise ConfigError(
                    "cluster.device is 'gpu' but the installed faiss has no GPU support or sees no GPU "
                    f"(faiss {getattr(faiss, '__version__', '?')}, {gpus} GPU(s) visible); install faiss-gpu "
                    "(pip install 'influencespace[gpu]', then uninstall faiss-cpu) on GPU nodes, or set cluster.device=cpu"
                )
            self._resources = faiss.StandardGpuResources()
            self.description = f"faiss GPU flat index ({metric}) on GPU 0 of {gpus}"
        else:
            self.description = f"faiss CPU flat index ({metric}), {faiss.omp_get_max_threads()} thread(s)"
        self._gpu_index = None

    def _index(self, d: int):
        import faiss

        cpu_index = faiss.IndexFlatIP(d) if self.spherical else faiss.IndexFlatL2(d)
        if self.device != "gpu":
            return cpu_index
        if self._gpu_index is None or self._gpu_index.d != d:
            self._gpu_index = faiss.index_cpu_to_gpu(self._resources, 0, cpu_index)
        self._gpu_index.reset()
        return self._gpu_index

    def search(self, x: np.ndarray, centroids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Nearest centroid of every row: labels (int64) and distances (float32, see module docstring)."""
        if len(x) == 0:
            return np.zeros(0, np.int64), np.zeros(0, np.float32)
        index = self._index(centroids.shape[1])
        index.add(np.ascontiguousarray(centroids, dtype=np.float32))
        scores, labels = index.search(np.ascontiguousarray(x, dtype=np.float32), 1)
        scores = scores[:, 0]
        # Rounding can leave a tiny negative distance for a row that sits on its centroid.
        distances = np.maximum(1.0 - scores, 0.0) if self.spherical else np.maximum(scores, 0.0)
        return labels[:, 0].astype(np.int64), distances.astype(np.float32)


def assign(
    x: np.ndarray,
    centroids: np.ndarray,
    searcher: FlatSearcher,
    coarse: CoarseLevel | None = None,
    coarse_labels: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Labels and distances of ``x`` against ``centroids`` (flat) or through ``coarse`` (two-level).

    Two-level search costs ``n·(k1 + k/k1)·d`` instead of ``n·k·d``; ``coarse_labels`` may be passed
    when the caller has them from an earlier pass with the same coarse centroids.
    """
    if coarse is None:
        return searcher.search(x, centroids)
    if coarse_labels is None:
        coarse_labels, _ = searcher.search(x, coarse.centroids)
    labels = np.empty(len(x), np.int64)
    distances = np.empty(len(x), np.float32)
    order = np.argsort(coarse_labels, kind="stable")
    groups, starts = np.unique(coarse_labels[order], return_index=True)
    ends = np.append(starts[1:], len(order))
    for group, start, end in zip(groups, starts, ends, strict=True):
        rows = order[start:end]
        lo, hi = int(coarse.offsets[group]), int(coarse.offsets[group + 1])
        if hi == lo:
            raise RuntimeError(f"coarse cluster {group} has rows but no fine centroids (allocation bug)")
        group_labels, group_distances = searcher.search(x[rows], centroids[lo:hi])
        labels[rows] = group_labels + lo
        distances[rows] = group_distances
    return labels, distances


def partial_sums(x: np.ndarray, labels: np.ndarray, distances: np.ndarray, k: int) -> Partial:
    """Per-centroid sums and counts of rows already assigned (the reduce input of one Lloyd step).

    ``sums = Aᵀ x`` with ``A`` the sparse n × k assignment matrix (``A[i, a(i)] = 1``): one sparse
    product per block of :data:`SUM_BLOCK` rows in float32 (~50× faster than ``np.add.at``), blocks
    added in float64.
    """
    import scipy.sparse

    d = x.shape[1]
    sums = np.zeros((k, d), np.float64)
    for start in range(0, len(x), SUM_BLOCK):
        block_labels = labels[start : start + SUM_BLOCK]
        rows = len(block_labels)
        # Row j of this CSR matrix lists the rows assigned to centroid j.
        assignment = scipy.sparse.csr_matrix(
            (np.ones(rows, np.float32), (block_labels, np.arange(rows))), shape=(k, rows)
        )
        sums += assignment @ np.asarray(x[start : start + SUM_BLOCK], dtype=np.float32)
    counts = np.bincount(labels, minlength=k).astype(np.int64)
    return Partial(sums, counts, float(np.sum(distances, dtype=np.float64)))


def prepare_rows(x: np.ndarray, spherical: bool) -> tuple[np.ndarray, np.ndarray, dict[str, int]]:
    """Float32 rows ready to cluster, the mask of rows kept, and how many were rejected and why.

    Rows with a NaN or ±inf are rejected (``nonfinite``); for spherical k-means rows of zero norm have
    no direction and are rejected too (``zero_norm``); kept rows are scaled to unit norm.
    """
    x = np.asarray(x)
    if x.ndim != 2:
        raise ValueError(f"embeddings must be a 2-d array (rows × dim), got shape {x.shape}")
    finite = np.isfinite(x).all(axis=1)
    rejected = {"nonfinite": int(len(x) - finite.sum()), "zero_norm": 0}
    keep = finite
    rows = np.asarray(x[keep] if not keep.all() else x, dtype=np.float32)
    if spherical:
        norms = np.linalg.norm(rows, axis=1)
        nonzero = norms > 0
        rejected["zero_norm"] = int(len(rows) - nonzero.sum())
        if not nonzero.all():
            keep = keep.copy()
            keep[np.flatnonzero(keep)[~nonzero]] = False
            rows, norms = rows[nonzero], norms[nonzero]
        rows = rows / norms[:, None]
    return np.ascontiguousarray(rows, dtype=np.float32), keep, rejected
