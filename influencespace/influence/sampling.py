"""Amortised, stratified sampling of m examples per cluster, and sharding of clusters over workers.

Within cluster c with |c| = N_c members, split by ``group`` into strata of N_cg members:

- if N_c ≤ m every member is taken (weight 1, no sampling error);
- otherwise m is allocated over the strata in proportion to N_cg (largest remainder), with at least
  one draw per stratum while m allows, so every group present in a cluster is represented; m_cg
  members are drawn without replacement.

Each sampled example carries the weight w_i = N_cg / m_cg (the members it stands for), so
Σ_{i∈S_c} w_i = N_c and Σ_{i∈S_c} w_i t_i is an unbiased estimate of the cluster total Σ_{i∈c} t_i of any
per-example quantity t (the stratified / Horvitz–Thompson estimator).

Determinism: the draw for cluster c uses a generator seeded by (seed, c) over the members sorted by
id, so it does not depend on file order, on the other clusters, or on how clusters are sharded.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from influencespace.influence.errors import InfluenceError


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


def sample_clusters(
    ids: np.ndarray,
    cluster: np.ndarray,
    group: np.ndarray | None,
    m: int,
    seed: int,
    num_clusters: int | None = None,
) -> SamplePlan:
    """Draw the sample plan for every cluster (see the module docstring)."""
    if m < 1:
        raise InfluenceError(f"influence.samples_per_cluster must be ≥ 1 (got {m})")
    cluster = np.asarray(cluster, dtype=np.int64)
    if len(cluster) and cluster.min() < 0:
        raise InfluenceError("cluster assignments contain negative cluster ids; rerun the cluster stage")
    group = np.full(len(cluster), -1, dtype=np.int64) if group is None else np.asarray(group, dtype=np.int64)
    highest = int(cluster.max()) + 1 if len(cluster) else 0
    count = max(num_clusters or 0, highest)
    sizes = np.bincount(cluster, minlength=count)
    # Members of each cluster in id order: a canonical order independent of how files were written.
    order = np.lexsort((np.asarray(ids).astype(str), cluster))
    bounds = np.searchsorted(cluster[order], np.arange(count + 1))
    rows, clusters, strata, weights, stratum_sizes = [], [], [], [], []
    for c in np.flatnonzero(sizes):
        members = order[bounds[c] : bounds[c + 1]]
        codes, inverse, counts = np.unique(group[members], return_inverse=True, return_counts=True)
        alloc = allocate(counts, m)
        rng = np.random.default_rng([seed, int(c)])
        for s, code in enumerate(codes):
            pool = members[inverse == s]
            take = pool if alloc[s] == len(pool) else pool[np.sort(rng.choice(len(pool), size=alloc[s], replace=False))]
            rows.append(take)
            clusters.append(np.full(len(take), c))
            strata.append(np.full(len(take), code))
            weights.append(np.full(len(take), counts[s] / alloc[s]))
            stratum_sizes.append(np.full(len(take), counts[s]))
    cat = (lambda parts, dt: np.concatenate(parts).astype(dt)) if rows else (lambda parts, dt: np.zeros(0, dt))
    return SamplePlan(
        rows=cat(rows, np.int64),
        cluster=cat(clusters, np.int64),
        stratum=cat(strata, np.int64),
        weight=cat(weights, np.float64),
        stratum_size=cat(stratum_sizes, np.int64),
        clusters=np.arange(count, dtype=np.int64),
        sizes=sizes.astype(np.int64),
    )


def shard_clusters(plan: SamplePlan, world_size: int) -> list[np.ndarray]:
    """Assign clusters to workers, balancing sampled examples (greedy, largest first; deterministic).

    Returns, per rank, the positions in the plan of the sampled rows that rank owns; a cluster is
    never split, so each rank can finish its clusters' statistics alone.
    """
    counts = np.bincount(plan.cluster, minlength=len(plan.clusters))
    load = np.zeros(world_size, dtype=np.int64)
    owner = np.zeros(len(plan.clusters), dtype=np.int64)
    for c in np.argsort(-counts, kind="stable"):
        if counts[c] == 0:
            continue
        r = int(np.argmin(load))
        owner[c] = r
        load[r] += counts[c]
    return [np.flatnonzero(owner[plan.cluster] == r) for r in range(world_size)]
