"""k-means around one seam, the shape of faiss's ``contrib/clustering.py``.

The algorithm only ever asks a :class:`Dataset` how many rows it has, a uniform sample of rows (for
seeding), :meth:`Dataset.assign_to` — assign every row to its nearest centroid and return the
per-centroid sums, counts and the objective (a :class:`~influencespace.cluster.assign.Partial`) — and
:meth:`Dataset.step`: the same pass followed by the centroid update, returning only the new
centroids, counts and objective (an :class:`Update`), so a sharded dataset can sum the k·d partials
where its workers are and hand the driver k·d float32 once per iteration.
:class:`InMemoryDataset` answers from one array; the sharded dataset in ``shards.py`` answers from
Parquet shards held by workers (Ray actors or in-process), so no single process holds all rows.

Lloyd's algorithm, with ``d`` the distance of ``assign.py`` (``||x − c||²``, or ``1 − <x, c>`` on the
unit sphere)::

    a(i)  = argmin_j d(x_i, c_j)                          (assignment: each worker, its shards)
    c_j  ← Σ_{a(i)=j} x_i / |{i: a(i)=j}|                  (update: where the partial sums are reduced)
    c_j  ← c_j / ||c_j||                                  (spherical only)
    J_t   = Σ_i d(x_i, c_{a(i)})                           (objective at iteration t, faiss's convention)

It stops after ``max_iter`` iterations or when ``|J_{t−1} − J_t| ≤ tol·|J_{t−1}|``. An empty cluster is
repaired by splitting the largest cluster. Centroids are checkpointed after seeding and after every
iteration, so a killed run resumes from the last finished iteration and ends with the same centroids.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

import numpy as np

from influencespace.cluster.assign import CoarseLevel, FlatSearcher, Partial, assign, partial_sums, prepare_rows
from influencespace.errors import ConfigError, InputDataError
from influencespace.faults import fault_point
from influencespace.progress import track

log = logging.getLogger(__name__)

SEEDINGS = ("kmeans++", "kmeans||", "random")
# k-means|| (Bahmani et al. 2012): rounds and oversampling factor ℓ = OVERSAMPLING·k; 5 rounds and ℓ = 2k
# are the values the paper found sufficient.
PARALLEL_ROUNDS = 5
OVERSAMPLING = 2.0
# Relative size of the perturbation that splits a cluster in two (the value faiss uses).
SPLIT_EPS = 1.0 / 1024.0


@dataclass(frozen=True)
class KMeansParams:
    """The knobs of one k-means run (``cluster.*`` in the pipeline config)."""

    k: int
    max_iter: int = 25
    tol: float = 1e-4
    spherical: bool = False
    seeding: str = "kmeans++"
    seeding_sample: int = 100_000
    seed: int = 0
    hierarchical: bool = False
    k_coarse: int | None = None

    @classmethod
    def from_config(cls, cfg: Any) -> KMeansParams:
        return cls(
            k=cfg.k,
            max_iter=cfg.max_iter,
            tol=cfg.tol,
            spherical=cfg.spherical,
            seeding=cfg.seeding,
            seeding_sample=cfg.seeding_sample,
            seed=cfg.seed,
            hierarchical=cfg.hierarchical,
            k_coarse=cfg.k_coarse,
        )

    @property
    def coarse_k(self) -> int:
        """k1 of two-level k-means: ``k_coarse``, or ``round(√k)`` when unset."""
        return self.k_coarse if self.k_coarse is not None else max(2, round(math.sqrt(self.k)))

    def check(self, n: int) -> None:
        """Raise :class:`ConfigError` for settings that cannot work on ``n`` usable rows."""
        if self.k < 2:
            raise ConfigError(f"cluster.k must be at least 2 (got {self.k}): one cluster says nothing about the data")
        if self.max_iter < 1:
            raise ConfigError(f"cluster.max_iter must be at least 1 (got {self.max_iter})")
        if self.seeding not in SEEDINGS:
            raise ConfigError(f"cluster.seeding must be one of {', '.join(SEEDINGS)} (got '{self.seeding}')")
        if n < self.k:
            raise ConfigError(
                f"cluster.k={self.k} is larger than the number of usable embeddings ({n}); "
                f"set cluster.k to at most {n} (or cluster more data)"
            )
        if self.hierarchical and not 2 <= self.coarse_k < self.k:
            raise ConfigError(
                f"cluster.k_coarse={self.coarse_k} must be at least 2 and smaller than cluster.k={self.k} "
                "for two-level k-means; lower cluster.k_coarse, or leave it unset for round(sqrt(k))"
            )


class Dataset(Protocol):
    """The seam: everything k-means needs from the rows, wherever they live."""

    def count(self) -> int: ...

    def dim(self) -> int: ...

    def sample(self, n: int, rng: np.random.Generator) -> np.ndarray:
        """``min(n, count())`` distinct rows drawn uniformly (prepared: float32, unit norm if spherical)."""
        ...

    def assign_to(self, centroids: np.ndarray, coarse: CoarseLevel | None = None) -> Partial:
        """Assign every row to its nearest centroid; return per-centroid sums, counts and the objective."""
        ...

    def step(self, centroids: np.ndarray, coarse: CoarseLevel | None, spherical: bool) -> Update:
        """One Lloyd step: :meth:`assign_to`, then :func:`lloyd_update` of the summed partials, wherever
        they are summed (the sharded dataset: off the driver, which receives only the :class:`Update`)."""
        ...


@dataclass
class Update:
    """What the driver needs of a Lloyd step: the updated centroids (empty clusters not yet repaired),
    the count per centroid and the objective — k·d float32, never the k·d float64 partial sums."""

    centroids: np.ndarray
    counts: np.ndarray
    objective: float


def lloyd_update(part: Partial, previous: np.ndarray, spherical: bool) -> Update:
    """The update half of a Lloyd step from the summed partials (:func:`update_centroids`)."""
    return Update(update_centroids(part, previous, spherical), part.counts, part.objective)


def tree_sum(values: list[Any]) -> Any:
    """``values`` added pairwise, level by level, in a fixed order: ``((v0+v1)+(v2+v3))+v4`` …

    The order the Ray reduction (``cluster.stage.RayPool.reduce``) adds in too, so the float sums
    depend on the number of workers only, not on the runner or on which worker answers first.
    """
    if not values:
        raise ValueError("nothing to add")
    while len(values) > 1:
        pairs = [values[i] + values[i + 1] for i in range(0, len(values) - 1, 2)]
        values = pairs + ([values[-1]] if len(values) % 2 else [])
    return values[0]


class Checkpoint(Protocol):
    """Where a run keeps its state between iterations (one state per phase: flat, coarse, fine)."""

    def load(self, phase: str) -> dict[str, Any] | None: ...

    def save(self, phase: str, state: dict[str, Any]) -> None: ...


class MemoryCheckpoint:
    """A checkpoint in a dict (tests, and runs that need no resume)."""

    def __init__(self) -> None:
        self.states: dict[str, dict[str, Any]] = {}

    def load(self, phase: str) -> dict[str, Any] | None:
        state = self.states.get(phase)
        return None if state is None else {**state, "centroids": state["centroids"].copy()}

    def save(self, phase: str, state: dict[str, Any]) -> None:
        self.states[phase] = {**state, "centroids": state["centroids"].copy(), "history": list(state["history"])}


@dataclass
class KMeansResult:
    """Final centroids and how they were reached."""

    centroids: np.ndarray
    history: list[dict[str, Any]]  # one entry per iteration: iteration, objective, empty_split, seconds
    converged: bool
    coarse: CoarseLevel | None = None
    coarse_history: list[dict[str, Any]] = field(default_factory=list)
    resumed_at: dict[str, int] = field(default_factory=dict)  # phase -> iteration it resumed after

    @property
    def iterations(self) -> int:
        return self.history[-1]["iteration"] if self.history else 0

    @property
    def objective(self) -> float:
        """Objective of the last assignment pass (of the centroids before the last update, as in faiss)."""
        return self.history[-1]["objective"] if self.history else float("nan")


# --------------------------------------------------------------------------------------------------
# In-memory dataset


class InMemoryDataset:
    """All rows in one array; the reference implementation of :class:`Dataset`.

    Rows with NaN/inf (or zero norm, when spherical) are dropped and counted in ``rejected``.
    """

    def __init__(self, x: np.ndarray, spherical: bool = False, device: str = "cpu", threads: int | None = None):
        self.x, self.kept, self.rejected = prepare_rows(x, spherical)
        self.searcher = FlatSearcher(spherical, device, threads)
        self._coarse_key: bytes | None = None
        self._coarse_labels: np.ndarray | None = None

    def count(self) -> int:
        return len(self.x)

    def dim(self) -> int:
        return self.x.shape[1]

    def sample(self, n: int, rng: np.random.Generator) -> np.ndarray:
        return self.x[sample_indices(self.count(), n, rng)]

    def assign(self, centroids: np.ndarray, coarse: CoarseLevel | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Labels and distances of the kept rows."""
        coarse_labels = None
        if coarse is not None:
            # Coarse labels do not change during the fine phase: compute them once.
            key = coarse.centroids.tobytes()
            if key != self._coarse_key:
                self._coarse_key, self._coarse_labels = key, self.searcher.search(self.x, coarse.centroids)[0]
            coarse_labels = self._coarse_labels
        return assign(self.x, centroids, self.searcher, coarse, coarse_labels)

    def assign_to(self, centroids: np.ndarray, coarse: CoarseLevel | None = None) -> Partial:
        labels, distances = self.assign(centroids, coarse)
        return partial_sums(self.x, labels, distances, len(centroids))

    def step(self, centroids: np.ndarray, coarse: CoarseLevel | None, spherical: bool) -> Update:
        return lloyd_update(self.assign_to(centroids, coarse), centroids, spherical)


def sample_indices(count: int, n: int, rng: np.random.Generator) -> np.ndarray:
    """``min(n, count)`` distinct row indices in increasing order (the same on every implementation)."""
    return np.sort(rng.choice(count, size=min(n, count), replace=False))


# --------------------------------------------------------------------------------------------------
# Seeding (on a sample held by the driver)


def _sq_dist(x: np.ndarray, sq_norms: np.ndarray, c: np.ndarray) -> np.ndarray:
    """``||x_i − c||²`` for all rows, as ``||x||² − 2<x, c> + ||c||²`` (one GEMV)."""
    d2 = sq_norms - 2.0 * (x @ c).astype(np.float64) + float(np.dot(c, c))
    return np.maximum(d2, 0.0)


def kmeans_plusplus(x: np.ndarray, k: int, rng: np.random.Generator, weights: np.ndarray | None = None) -> np.ndarray:
    """D² seeding (Arthur & Vassilvitskii 2007), optionally weighted.

    The first centre is drawn with probability ∝ ``w_i``, each next one with probability
    ``∝ w_i · min_j ||x_i − c_j||²``; ``O(k·n·d)``. When fewer than ``k`` distinct rows exist the
    remaining centres repeat rows, and Lloyd's empty-cluster repair separates them.
    """
    n = len(x)
    w = np.ones(n) if weights is None else np.asarray(weights, np.float64)
    sq_norms = np.einsum("ij,ij->i", x, x, dtype=np.float64)
    chosen = np.empty(k, np.int64)
    chosen[0] = rng.choice(n, p=w / w.sum())
    d2 = _sq_dist(x, sq_norms, x[chosen[0]])
    for j in range(1, k):
        cumulative = np.cumsum(w * d2)
        if cumulative[-1] > 0:
            chosen[j] = min(int(np.searchsorted(cumulative, rng.random() * cumulative[-1], side="right")), n - 1)
        else:  # every row coincides with a centre already
            chosen[j] = rng.integers(n)
        d2 = np.minimum(d2, _sq_dist(x, sq_norms, x[chosen[j]]))
    return x[chosen].copy()


def kmeans_parallel(x: np.ndarray, k: int, rng: np.random.Generator, rounds: int = PARALLEL_ROUNDS) -> np.ndarray:
    """k-means|| (Bahmani et al. 2012): k-means++ quality in a few passes instead of ``k`` steps.

    Start from one uniform row; in each of ``rounds`` passes keep every row independently with
    probability ``min(1, ℓ·D²(x)/Σ D²)`` (ℓ = 2k), so ≈ ℓ candidates per round. Each candidate is then
    weighted by the number of rows nearest to it and weighted k-means++ reduces the ≈ ℓ·rounds
    candidates to ``k`` centres. Costs ``rounds`` faiss passes plus k-means++ on the candidates only.
    """
    n = len(x)
    searcher = FlatSearcher(spherical=False)
    ell = OVERSAMPLING * k
    candidates = [int(rng.integers(n))]
    nearest, d2 = np.zeros(n, np.int64), _sq_dist(x, np.einsum("ij,ij->i", x, x, dtype=np.float64), x[candidates[0]])
    for _ in range(rounds):
        total = d2.sum()
        if total <= 0:
            break
        picked = np.flatnonzero(rng.random(n) < np.minimum(1.0, ell * d2 / total))
        if len(picked) == 0:
            continue
        labels, distances = searcher.search(x, x[picked])
        closer = distances < d2
        nearest[closer] = labels[closer] + len(candidates)
        d2 = np.where(closer, distances.astype(np.float64), d2)
        candidates.extend(int(i) for i in picked)
    candidates_array = np.asarray(candidates, np.int64)
    if len(candidates_array) <= k:
        # Tiny inputs: too few candidates; top up with uniform rows not yet chosen.
        rest = np.setdiff1d(np.arange(n), candidates_array)
        extra = rng.choice(rest, size=min(k - len(candidates_array), len(rest)), replace=False)
        return kmeans_plusplus(x[np.concatenate([candidates_array, extra])], k, rng)
    weights = np.bincount(nearest, minlength=len(candidates_array)).astype(np.float64)
    # A candidate nearest to no row (a duplicate) gets a small weight instead of none, so it stays drawable.
    return kmeans_plusplus(x[candidates_array], k, rng, weights=np.maximum(weights, 1e-3))


def seed_centroids(x: np.ndarray, k: int, method: str, rng: np.random.Generator, spherical: bool) -> np.ndarray:
    """``k`` initial centroids from the sample ``x`` by ``method`` (kmeans++, kmeans|| or random)."""
    if len(x) == 0:
        raise ValueError("cannot seed centroids from an empty sample")
    if method == "random":
        picks = rng.choice(len(x), size=min(k, len(x)), replace=False)
        centroids = x[np.sort(picks)]
        if len(centroids) < k:
            centroids = x[rng.integers(len(x), size=k)]
    elif method == "kmeans||":
        centroids = kmeans_parallel(x, k, rng)
    else:
        centroids = kmeans_plusplus(x, k, rng)
    centroids = np.ascontiguousarray(centroids, dtype=np.float32)
    return _normalise(centroids) if spherical else centroids


# --------------------------------------------------------------------------------------------------
# Lloyd iterations


def _normalise(c: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(c, axis=1, keepdims=True)
    return np.where(norms > 0, c / np.where(norms > 0, norms, 1.0), c).astype(np.float32)


def update_centroids(part: Partial, previous: np.ndarray, spherical: bool) -> np.ndarray:
    """The mean of each non-empty cluster (its direction, when spherical); empty ones keep their centroid."""
    counts = part.counts
    new = previous.astype(np.float64).copy()
    filled = counts > 0
    new[filled] = part.sums[filled] / counts[filled, None]
    if spherical:
        norms = np.linalg.norm(new, axis=1)
        # Rows that cancel out (sum ≈ 0) have no direction: keep the old centroid.
        ok = filled & (norms > 1e-12)
        new[ok] /= norms[ok, None]
        new[filled & ~ok] = previous[filled & ~ok]
    return new.astype(np.float32)


def split_empty(
    centroids: np.ndarray, counts: np.ndarray, spherical: bool, offsets: np.ndarray | None = None
) -> tuple[np.ndarray, int]:
    """Repair empty clusters by splitting the largest one (within the same coarse group when two-level).

    For each empty ``j`` the largest cluster ``c`` becomes two: ``c ← c⊙(1 + ε s)``, ``j ← c⊙(1 − ε s)``
    with ``s = (+1, −1, +1, …)`` and ``ε = 1/1024`` (faiss's perturbation), and ``c``'s count is halved
    between them so that the next empty cluster splits another large one. Deterministic.
    Returns the repaired centroids and how many clusters were split.
    """
    empty = np.flatnonzero(counts == 0)
    if len(empty) == 0:
        return centroids, 0
    centroids = centroids.copy()
    sizes = counts.astype(np.float64).copy()
    sign = np.where(np.arange(centroids.shape[1]) % 2 == 0, 1.0, -1.0).astype(np.float32)
    if offsets is None:
        offsets = np.array([0, len(centroids)])
    group_of = np.searchsorted(offsets, np.arange(len(centroids)), side="right") - 1
    split = 0
    for j in empty:
        lo, hi = offsets[group_of[j]], offsets[group_of[j] + 1]
        c = lo + int(np.argmax(sizes[lo:hi]))
        if sizes[c] <= 1:  # nothing left to split in this group
            continue
        base = centroids[c].copy()
        centroids[c] = base * (1 + SPLIT_EPS * sign)
        centroids[j] = base * (1 - SPLIT_EPS * sign)
        sizes[c] /= 2
        sizes[j] = sizes[c]
        split += 1
    return (_normalise(centroids) if spherical else centroids), split


def lloyd(
    dataset: Dataset,
    centroids: np.ndarray,
    *,
    max_iter: int,
    tol: float,
    spherical: bool,
    coarse: CoarseLevel | None = None,
    checkpoint: Checkpoint | None = None,
    phase: str = "flat",
    start: int = 0,
    history: list[dict[str, Any]] | None = None,
) -> KMeansResult:
    """Lloyd iterations ``start+1 … max_iter`` from ``centroids``, checkpointing after each one."""
    history = list(history or [])
    centroids = np.ascontiguousarray(centroids, dtype=np.float32)
    converged = False
    with track(f"k-means {phase}", max_iter - start, "iterations") as bar:
        for iteration in range(start + 1, max_iter + 1):
            t0 = time.perf_counter()
            part = dataset.step(centroids, coarse, spherical)
            new, n_split = split_empty(part.centroids, part.counts, spherical,
                                       coarse.offsets if coarse is not None else None)
            previous = history[-1]["objective"] if history else None
            history.append(
                {
                    "iteration": iteration,
                    "objective": part.objective,
                    "empty_split": n_split,
                    "seconds": round(time.perf_counter() - t0, 4),
                }
            )
            # A repaired iteration changes the model on purpose: never call it converged.
            converged = previous is not None and n_split == 0 and abs(previous - part.objective) <= tol * abs(previous)
            centroids = new
            if checkpoint is not None:
                checkpoint.save(
                    phase, {"iteration": iteration, "centroids": centroids, "history": history, "converged": converged}
                )
                fault_point(f"cluster.{phase}_iteration", iteration)  # tests: a kill between two iterations
            log.info(
                "k-means %s iteration %d/%d: objective %.6g, %d empty cluster(s) split, %.2fs",
                phase, iteration, max_iter, part.objective, n_split, history[-1]["seconds"],
            )  # fmt: skip
            bar.add(1)
            if converged:
                break
    return KMeansResult(centroids, history, converged)


def _run_phase(
    dataset: Dataset,
    k: int,
    params: KMeansParams,
    phase: str,
    rng: np.random.Generator,
    checkpoint: Checkpoint | None,
    coarse: CoarseLevel | None = None,
    seeder: Any = None,
) -> tuple[KMeansResult, int | None]:
    """Seed (or resume) and iterate one phase; returns the result and the iteration it resumed after."""
    state = checkpoint.load(phase) if checkpoint is not None else None
    if state is not None:
        done = state["converged"] or state["iteration"] >= params.max_iter
        log.info("k-means %s: resuming after iteration %d%s", phase, state["iteration"], " (finished)" if done else "")
        if done:
            return KMeansResult(state["centroids"], state["history"], state["converged"]), state["iteration"]
        resumed: int | None = state["iteration"]
        centroids, start, history = state["centroids"], state["iteration"], state["history"]
    else:
        resumed = None
        t0 = time.perf_counter()
        if seeder is None:
            sample = dataset.sample(params.seeding_sample, rng)
            centroids = seed_centroids(sample, k, params.seeding, rng, params.spherical)
        else:
            centroids = seeder(rng)
        start, history = 0, []
        log.info("k-means %s: seeded %d centroids by %s in %.2fs", phase, k, params.seeding, time.perf_counter() - t0)
        if checkpoint is not None:
            checkpoint.save(phase, {"iteration": 0, "centroids": centroids, "history": [], "converged": False})
    result = lloyd(
        dataset,
        centroids,
        max_iter=params.max_iter,
        tol=params.tol,
        spherical=params.spherical,
        coarse=coarse,
        checkpoint=checkpoint,
        phase=phase,
        start=start,
        history=history,
    )
    return result, resumed


def fit(dataset: Dataset, params: KMeansParams, checkpoint: Checkpoint | None = None) -> KMeansResult:
    """k-means (flat, or two-level when ``params.hierarchical``) over ``dataset``; resumes from ``checkpoint``."""
    params.check(dataset.count())
    if params.hierarchical:
        return fit_two_level(dataset, params, checkpoint)
    result, resumed = _run_phase(dataset, params.k, params, "flat", np.random.default_rng(params.seed), checkpoint)
    if resumed is not None:
        result.resumed_at["flat"] = resumed
    return result


# --------------------------------------------------------------------------------------------------
# Two-level (hierarchical) k-means


def allocate_fine(counts: np.ndarray, k: int) -> np.ndarray:
    """How many of the ``k`` fine centroids each coarse cluster gets: ``∝`` its size (largest remainder),
    at least 1 for a non-empty cluster, never more than its number of rows, 0 for an empty one."""
    counts = np.asarray(counts, np.int64)
    if counts.sum() < k:
        raise ConfigError(f"cluster.k={k} is larger than the number of usable embeddings ({int(counts.sum())})")
    ideal = k * counts / counts.sum()
    alloc = np.minimum(np.maximum(np.floor(ideal), (counts > 0).astype(float)), counts).astype(np.int64)
    while alloc.sum() < k:
        room = np.where(alloc < counts, ideal - alloc, -np.inf)
        alloc[int(np.argmax(room))] += 1
    while alloc.sum() > k:
        spare = np.where(alloc > 1, ideal - alloc, np.inf)
        alloc[int(np.argmin(spare))] -= 1
    return alloc


def fit_two_level(dataset: Dataset, params: KMeansParams, checkpoint: Checkpoint | None = None) -> KMeansResult:
    """Two-level k-means for large k: ``k1`` coarse clusters, then ``k2_c ∝ |c|`` fine clusters inside each.

    Every coarse cluster's fine k-means runs at the same time in one distributed Lloyd loop: a row only
    competes for the fine centroids of its own coarse cluster, so each pass costs ``n·(k1 + k/k1)·d``
    instead of ``n·k·d`` and rows never move between workers. The result is ``k`` centroids; a row's
    cluster is its nearest fine centroid within its nearest coarse cluster.
    """
    params.check(dataset.count())
    k1 = params.coarse_k
    coarse_params = replace(params, hierarchical=False, k=k1)
    coarse_result, coarse_resumed = _run_phase(
        dataset, k1, coarse_params, "coarse", np.random.default_rng([params.seed, 1]), checkpoint
    )
    # One more pass with the final coarse centroids: the exact size of every coarse cluster.
    sizes = dataset.assign_to(coarse_result.centroids).counts
    alloc = allocate_fine(sizes, params.k)
    level = CoarseLevel(coarse_result.centroids, np.concatenate([[0], np.cumsum(alloc)]).astype(np.int64))
    log.info("two-level k-means: %d coarse clusters, %d–%d fine centroids each", k1, alloc.min(), alloc.max())

    def seed_fine(rng: np.random.Generator) -> np.ndarray:
        sample = dataset.sample(params.seeding_sample, rng)
        sample_coarse, _ = FlatSearcher(params.spherical).search(sample, level.centroids)
        parts = []
        for c in range(k1):
            if alloc[c] == 0:
                continue
            rows = sample[sample_coarse == c]
            if len(rows) == 0:  # the sample missed this small coarse cluster: start from its centroid
                rows = level.centroids[c : c + 1]
            parts.append(seed_centroids(rows, int(alloc[c]), params.seeding, rng, params.spherical))
        return np.concatenate(parts)

    fine_result, fine_resumed = _run_phase(
        dataset,
        params.k,
        params,
        "fine",
        np.random.default_rng([params.seed, 2]),
        checkpoint,
        coarse=level,
        seeder=seed_fine,
    )
    fine_result.coarse = level
    fine_result.coarse_history = coarse_result.history
    fine_result.resumed_at = {
        phase: it for phase, it in (("coarse", coarse_resumed), ("fine", fine_resumed)) if it is not None
    }
    return fine_result


def check_dimensions(dims: dict[str, int]) -> int:
    """The one embedding dimension of all shards (``{uri: dim}`` in shard order), or an
    :class:`InputDataError` naming the first shard and the first one that differs from it."""
    if not dims:
        raise InputDataError("no embeddings to cluster: every shard is empty")
    first, expected = next(iter(dims.items()))
    for uri, dim in dims.items():
        if dim != expected:
            raise InputDataError(
                f"embedding dimension differs between shards: '{first}' has {expected}, '{uri}' has {dim}; "
                "all shards of the embed output must come from one model (rerun the embed stage with --overwrite)"
            )
    return expected
