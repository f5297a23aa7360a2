"""Amortised, stratified sampling of m examples per cluster, and sharding of clusters over workers.

Within cluster c with |c| = N_c members, split by ``group`` into strata of N_cg members:

- if N_c ≤ m every member is taken (weight 1, no sampling error);
- otherwise m is allocated over the strata in proportion to N_cg (largest remainder), with at least
  one draw per stratum while m allows, so every group present in a cluster is represented; m_cg
  members are drawn without replacement.

Each sampled example carries the weight w_i = N_cg / m_cg (the members it stands for), so
Σ_{i∈S_c} w_i = N_c and Σ_{i∈S_c} w_i t_i is an unbiased estimate of the cluster total Σ_{i∈c} t_i of any
per-example quantity t (the stratified / Horvitz–Thompson estimator).

**The draw** (bottom-m sampling): every row gets a uniform key u_i = h(id_i; seed) from a seeded hash of
its id (:func:`influencespace.ids.unit_hash`); a stratum's sample is its m_cg rows of smallest
(u_i, id_i). Keys are i.i.d. uniform, so the m_cg smallest are a uniform sample without replacement,
and the draw depends on the ids alone: not on file order, on the other clusters, on how clusters are
sharded, or on how many processes look at the pool. The proxy's warm-start rows and the contrastive
negative bank are drawn by the same rule over the whole pool, with their own salts.

**At any N** (:func:`key_threshold`, :func:`smallest_keys`): nobody sorts a stratum. One pass counts
N_cg; for each stratum a threshold τ_cg is set so that Binomial(N_cg, τ_cg) < m_cg has probability
≤ ``FAILURE`` (Chernoff); a second pass keeps only the rows with u_i < τ_cg (about m_cg + O(√m_cg)
per stratum) and the exact bottom-m_cg is chosen among them. A stratum that still falls short gets a
larger threshold and another pass over the rows between the two thresholds, so the result is always
the exact bottom-m_cg of the whole stratum (:func:`sample_clusters`, the in-memory reference).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from influencespace.ids import unit_hash
from influencespace.influence.errors import InfluenceError

SAMPLE_SALT, PROXY_SALT, BANK_SALT = 0, 1, 2  # one key per draw: cluster samples, proxy rows, negatives
FAILURE = 1e-6  # chance a stratum's threshold keeps fewer than m_cg rows (then one more pass, for it)
NO_GROUP = -1


def draw_keys(ids, seed: int, salt: int) -> np.ndarray:
    """u_i ∈ [0, 1): the uniform key of each id for one draw (``salt``: which draw)."""
    return unit_hash(ids, seed, salt)


def key_threshold(take, size) -> np.ndarray:
    """τ such that fewer than ``take`` of ``size`` i.i.d. uniform keys fall below it with probability ≤ FAILURE.

    With μ = τ·N expected keys below τ, Chernoff gives P(X < m) ≤ exp(−(μ − m)² / 2μ); solving
    (μ − m)² = 2Lμ with L = ln(1/FAILURE) gives μ = m + L + √(L² + 2mL). Strata taken whole (m ≥ N)
    get τ = ∞ (every row, without drawing)."""
    take, size = np.asarray(take, dtype=np.float64), np.asarray(size, dtype=np.float64)
    lg = math.log(1 / FAILURE)
    mu = take + lg + np.sqrt(lg * lg + 2 * take * lg)
    with np.errstate(divide="ignore", invalid="ignore"):
        tau = np.where(take >= size, np.inf, np.minimum(mu / np.maximum(size, 1), 1.0))
    return np.where(take <= 0, -np.inf, tau)


def smallest_keys(stratum: np.ndarray, keys: np.ndarray, ids: np.ndarray, take: np.ndarray) -> np.ndarray:
    """Positions of the rows of smallest (key, id) in each stratum: ``take[s]`` of stratum s (all it has if fewer).

    Returns them ordered by (stratum, key, id)."""
    stratum = np.asarray(stratum, dtype=np.int64)
    order = np.lexsort((np.asarray(ids).astype(str), keys, stratum))
    ordered = stratum[order]
    starts = np.searchsorted(ordered, ordered, side="left")  # first position of each row's stratum
    rank = np.arange(len(order)) - starts
    return order[rank < np.asarray(take, dtype=np.int64)[ordered]] if len(order) else order


def allocate(counts: np.ndarray, m: int) -> np.ndarray:
    """Split m draws over strata of the given sizes: proportional, ≥ 1 each while m allows, ≤ size."""
    counts = np.asarray(counts, dtype=np.int64)
    total = int(counts.sum())
    if total <= m:
        return counts.copy()
    alloc = np.zeros_like(counts)
    nonempty = np.flatnonzero(counts > 0)
    if m >= len(nonempty):
        alloc[nonempty] = 1
    remaining = m - int(alloc.sum())
    while remaining > 0:
        room = counts - alloc
        share = room / room.sum() * remaining
        step = np.minimum(np.floor(share).astype(np.int64), room)
        if step.sum() == 0:
            # Largest remainder (ties to the larger stratum) takes the last draws one at a time.
            order = np.lexsort((-room, -(share - np.floor(share))))
            order = [i for i in order if room[i] > 0]
            for i in order[:remaining]:
                step[i] = 1
        alloc += step
        remaining = m - int(alloc.sum())
    return alloc


_CODE_SPAN = 1 << 20  # group codes per cluster in a stratum key (far more groups than any attribute has)


def stratum_key(cluster, code) -> np.ndarray:
    """One int64 per (cluster, group code) pair, ordered as the pairs are."""
    return np.asarray(cluster, dtype=np.int64) * _CODE_SPAN + (np.asarray(code, dtype=np.int64) + 1)


def count_strata(cluster, code) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(cluster, code, rows) of every non-empty stratum among these rows, sorted by (cluster, code)."""
    keys, counts = np.unique(stratum_key(cluster, code), return_counts=True)
    return keys // _CODE_SPAN, keys % _CODE_SPAN - 1, counts.astype(np.int64)


@dataclass(frozen=True)
class Strata:
    """Every non-empty (cluster, group) stratum of the pool, sorted by (cluster, code): O(k·groups) rows."""

    cluster: np.ndarray
    code: np.ndarray
    size: np.ndarray  # N_cg
    take: np.ndarray  # m_cg, from :func:`allocate` within each cluster

    @classmethod
    def allocate(cls, cluster, code, size, m: int) -> Strata:
        """The allocation of m draws per cluster over its strata (inputs: one row per stratum, any order)."""
        if m < 1:
            raise InfluenceError(f"influence.samples_per_cluster must be ≥ 1 (got {m})")
        order = np.argsort(stratum_key(cluster, code), kind="stable")
        cluster, code = np.asarray(cluster, np.int64)[order], np.asarray(code, np.int64)[order]
        size = np.asarray(size, np.int64)[order]
        if len(cluster) and cluster.min() < 0:
            raise InfluenceError("cluster assignments contain negative cluster ids; rerun the cluster stage")
        take = np.zeros_like(size)
        bounds = np.flatnonzero(np.diff(cluster, prepend=-1, append=-1) != 0)
        for start, stop in zip(bounds[:-1], bounds[1:], strict=True):
            take[start:stop] = allocate(size[start:stop], m)
        return cls(cluster, code, size, take)

    def index(self, cluster, code) -> np.ndarray:
        """The stratum of each (cluster, code) pair (every pair must be one of the strata)."""
        keys = stratum_key(self.cluster, self.code)
        wanted = stratum_key(cluster, code)
        position = np.minimum(np.searchsorted(keys, wanted), max(len(keys) - 1, 0))
        if len(wanted) and (not len(keys) or (keys[position] != wanted).any()):
            raise InfluenceError("a row's (cluster, group) was not counted in the first pass; the inputs changed mid-stage")
        return position

    @property
    def weight(self) -> np.ndarray:
        """w = N_cg / m_cg of a row sampled from each stratum."""
        return self.size / np.maximum(self.take, 1)


@dataclass(frozen=True)
class SamplePlan:
    """Which rows represent each cluster, and with what weight."""

    rows: np.ndarray  # (s,) indices into the input arrays of the sampled examples, grouped by cluster
    cluster: np.ndarray  # (s,) cluster of each sampled row
    stratum: np.ndarray  # (s,) group code of each sampled row (−1: no group)
    weight: np.ndarray  # (s,) N_cg / m_cg
    stratum_size: np.ndarray  # (s,) N_cg of the row's stratum
    clusters: np.ndarray  # (C,) every cluster id, including empty ones
    sizes: np.ndarray  # (C,) |c|

    @property
    def num_examples(self) -> int:
        """n: rows in the pool that the clusters cover."""
        return int(self.sizes.sum())


def cluster_sizes(strata: Strata, num_clusters: int | None = None) -> np.ndarray:
    """|c| for every cluster id 0 … C−1 (C: ``num_clusters``, or one past the highest non-empty one)."""
    count = max(num_clusters or 0, int(strata.cluster.max()) + 1 if len(strata.cluster) else 0)
    return np.bincount(strata.cluster, weights=strata.size, minlength=count).astype(np.int64)


def sample_clusters(
    ids: np.ndarray,
    cluster: np.ndarray,
    group: np.ndarray | None,
    m: int,
    seed: int,
    num_clusters: int | None = None,
) -> SamplePlan:
    """The sample plan of rows held in memory (see the module docstring): the reference for the passes."""
    cluster = np.asarray(cluster, dtype=np.int64)
    group = np.full(len(cluster), NO_GROUP, dtype=np.int64) if group is None else np.asarray(group, dtype=np.int64)
    strata = Strata.allocate(*count_strata(cluster, group), m)
    position = strata.index(cluster, group)
    rows = smallest_keys(position, draw_keys(ids, seed, SAMPLE_SALT), ids, strata.take)
    sizes = cluster_sizes(strata, num_clusters)
    return SamplePlan(
        rows=rows.astype(np.int64),
        cluster=cluster[rows],
        stratum=group[rows],
        weight=strata.weight[position[rows]].astype(np.float64),
        stratum_size=strata.size[position[rows]],
        clusters=np.arange(len(sizes), dtype=np.int64),
        sizes=sizes,
    )


def cluster_owners(sampled: np.ndarray, world_size: int) -> np.ndarray:
    """The rank that owns each cluster, balancing sampled rows (greedy, largest first; deterministic).

    ``sampled[c]``: rows sampled from cluster c. A cluster is never split, so each rank can finish its
    clusters' statistics alone."""
    load = np.zeros(world_size, dtype=np.int64)
    owner = np.zeros(len(sampled), dtype=np.int64)
    for c in np.argsort(-np.asarray(sampled), kind="stable"):
        if sampled[c] == 0:
            continue
        r = int(np.argmin(load))
        owner[c] = r
        load[r] += sampled[c]
    return owner


def shard_clusters(plan: SamplePlan, world_size: int) -> list[np.ndarray]:
    """Per rank, the positions in the plan of the sampled rows it owns (:func:`cluster_owners`)."""
    owner = cluster_owners(np.bincount(plan.cluster, minlength=len(plan.clusters)), world_size)
    return [np.flatnonzero(owner[plan.cluster] == r) for r in range(world_size)]
