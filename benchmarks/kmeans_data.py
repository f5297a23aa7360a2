"""Synthetic embeddings for the k-means benchmarks, written as the embed stage's pool output.

Gaussian blobs: ``centres`` means drawn from N(0, spread²·I), rows = a mean + N(0, I) noise, stored as
float16 fixed-size lists (the embed stage's default dtype). Shards are generated one at a time, so
writing 10M rows needs the memory of one shard.
"""

from __future__ import annotations

import os
import time

import numpy as np


def blob_means(dim: int, centres: int, spread: float, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((centres, dim)) * spread


def blob_shard(means: np.ndarray, rows: int, seed: int, shard: int) -> np.ndarray:
    rng = np.random.default_rng([seed, shard])
    noise = rng.standard_normal((rows, means.shape[1]), dtype=np.float32)
    return (means[rng.integers(len(means), size=rows)].astype(np.float32) + noise).astype(np.float16)


def write_pool(
    directory: str, n: int, dim: int, centres: int, shard_rows: int, spread: float = 1.0, seed: int = 0
) -> dict:
    """Write ``n`` rows under ``directory/pool`` (skipped when already there); return an embed manifest."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    pool = os.path.join(directory, "pool")
    marker = os.path.join(directory, f"_written_{n}_{dim}_{centres}_{shard_rows}_{spread}_{seed}")
    if not os.path.exists(marker):
        os.makedirs(pool, exist_ok=True)
        means = blob_means(dim, centres, spread, seed)
        t0 = time.perf_counter()
        for shard, start in enumerate(range(0, n, shard_rows)):
            rows = min(shard_rows, n - start)
            x = blob_shard(means, rows, seed, shard)
            ids = pa.array([f"r{i:010d}" for i in range(start, start + rows)])
            table = pa.table({"id": ids, "embedding": pa.FixedSizeListArray.from_arrays(pa.array(x.ravel()), dim)})
            # Random floats do not compress; skip the codec so reading measures k-means, not zstd.
            pq.write_table(table, os.path.join(pool, f"part-{shard:05d}.parquet"), compression="none")
        open(marker, "w").close()
        print(f"wrote {n:,} x {dim} float16 rows in {time.perf_counter() - t0:.1f}s to {pool}", flush=True)
    return {"fingerprint": f"synthetic-{n}-{dim}-{centres}-{seed}", "stage_dir": directory, "outputs": {"pool": "pool"}}


def read_pool(directory: str) -> np.ndarray:
    """All rows of a written pool as float32 (for the in-memory reference only)."""
    import pyarrow.parquet as pq

    files = sorted(f for f in os.listdir(os.path.join(directory, "pool")) if f.endswith(".parquet"))
    parts = []
    for name in files:
        column = pq.read_table(os.path.join(directory, "pool", name), columns=["embedding"]).column(0).combine_chunks()
        parts.append(column.values.to_numpy().reshape(len(column), -1).astype(np.float32))
    return np.concatenate(parts)


def cluster_config(run_dir: str, k: int, iters: int, seeding_sample: int, workers: int, seed: int, cache_shards: bool):
    """The pipeline config both k-means benchmarks run: Euclidean Lloyd for exactly ``iters`` passes."""
    from influencespace.config import load_config

    return load_config(
        "test",
        [
            f"run_dir={run_dir}",
            "runtime.runner=ray",
            f"runtime.num_cpus={os.cpu_count()}",
            f"cluster.k={k}",
            f"cluster.max_iter={iters}",
            "cluster.tol=0",
            "cluster.spherical=false",
            "cluster.seeding=kmeans++",
            f"cluster.seeding_sample={seeding_sample}",
            f"cluster.num_workers={workers}",
            "cluster.worker_cpus=1",
            f"cluster.cache_shards={'true' if cache_shards else 'false'}",
            f"cluster.seed={seed}",
        ],
    )
