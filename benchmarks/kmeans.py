"""Distributed k-means (the cluster stage on Ray, 2 workers) vs in-memory ``faiss.Kmeans``, same data.

    .venv/bin/python benchmarks/kmeans.py --quick        # 200k × 128, k = 256, 20 iterations

Both see the same float16-rounded Gaussian-blob embeddings; ours reads them from Parquet shards into
two Ray actors (1 CPU each), faiss gets them as one in-memory array and all (2) cores. Both run the
same number of Lloyd iterations on all rows (faiss's 256·k subsampling is turned off). Figures:

- objective ratio: ``J(ours) / J(faiss)`` with ``J = Σ_i min_j ||x_i − c_j||²`` over all rows, both
  centroid sets scored by the same function;
- time ratio: our seeding + Lloyd iterations (data already in the workers) / ``faiss.Kmeans.train``,
  the fastest of three faiss runs (all cores before ours, 1 thread before ours, all cores after ours),
  which damps noise from the shared machine and never flatters ours;
- end-to-end ratio (reported, not the goal): actor start-up + Parquet read + fit + final assignment pass
  writing every row, over the same faiss time.

The last line is ``kmeans_objective_ratio=<ours/faiss> kmeans_time_ratio=<ours/faiss>``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from kmeans_data import cluster_config, read_pool, write_pool  # noqa: E402


def faiss_train(x: np.ndarray, k: int, iters: int, seed: int, threads: int) -> tuple[np.ndarray, float]:
    import faiss

    faiss.omp_set_num_threads(threads)
    km = faiss.Kmeans(x.shape[1], k, niter=iters, seed=seed, max_points_per_centroid=len(x), verbose=False)
    t0 = time.perf_counter()
    km.train(x)
    return km.centroids.copy(), time.perf_counter() - t0


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="200k rows (default 1M)")
    parser.add_argument("--n", type=int, default=None, help="rows (overrides --quick)")
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--k", type=int, default=256)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--centres", type=int, default=1024, help="blob centres in the synthetic data")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument(
        "--seeding-sample", type=int, default=65536, help="rows k-means++ seeds from (faiss trains on 256·k)"
    )
    parser.add_argument("--shard-rows", type=int, default=25_000)
    parser.add_argument("--workdir", default="/tmp/influencespace-bench/kmeans")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    n = args.n or (200_000 if args.quick else 1_000_000)

    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    data_dir = os.path.join(args.workdir, f"embed-{n}-{args.dim}")
    upstream = {"embed": write_pool(data_dir, n, args.dim, args.centres, args.shard_rows, spread=1.0, seed=args.seed)}
    x = read_pool(data_dir)

    from influencespace.cluster.kmeans import InMemoryDataset
    from influencespace.cluster.stage import ClusterStage
    from influencespace.stages import run_stage
    from influencespace.storage import read_json

    print(f"data: {n:,} x {args.dim} (float16 on disk), k={args.k}, {args.iters} iterations, {os.cpu_count()} CPUs")
    cpus = os.cpu_count() or 1
    faiss_centroids, faiss_all = faiss_train(x, args.k, args.iters, args.seed, cpus)
    _, faiss_one = faiss_train(x, args.k, args.iters, args.seed, 1)
    print(f"faiss.Kmeans (in memory): {faiss_all:.2f}s with {cpus} threads, {faiss_one:.2f}s with 1 thread", flush=True)

    run_dir = os.path.join(args.workdir, f"run-{n}-{args.dim}-{args.k}")
    shutil.rmtree(run_dir, ignore_errors=True)
    config = cluster_config(run_dir, args.k, args.iters, args.seeding_sample, args.workers, args.seed, True)
    run_stage(config, ClusterStage(), upstream=upstream)
    log = read_json(os.path.join(run_dir, "cluster", "kmeans_log.json"))
    import ray

    ray.shutdown()
    _, faiss_again = faiss_train(x, args.k, args.iters, args.seed, cpus)
    faiss_seconds = min(faiss_all, faiss_one, faiss_again)
    print(
        f"faiss.Kmeans again ({cpus} threads): {faiss_again:.2f}s; reference = the fastest faiss run, {faiss_seconds:.2f}s"
    )

    ours_centroids = np.load(os.path.join(run_dir, "cluster", "centroids.npy"))
    data = InMemoryDataset(x)
    ours_objective = data.assign_to(ours_centroids).objective
    faiss_objective = data.assign_to(faiss_centroids).objective
    seconds = log["seconds"]
    end_to_end = seconds["start_and_load"] + seconds["fit"] + seconds["assign_and_write"]
    per_iteration = np.median([it["seconds"] for it in log["iterations"]])
    print(
        f"ours ({log['workers']} Ray workers, {log['index']}): start+load {seconds['start_and_load']:.2f}s, "
        f"fit {seconds['fit']:.2f}s ({len(log['iterations'])} iterations, median {per_iteration:.3f}s each), "
        f"final assignment pass {seconds['assign_and_write']:.2f}s"
    )
    print(f"worker peak RSS: {', '.join(f'{b / 2**20:.0f} MiB' for b in log['worker_peak_rss_bytes'])}")
    print(f"objective: ours {ours_objective:.6g}, faiss {faiss_objective:.6g}")
    print(f"end-to-end ratio (start+read+fit+write / faiss train): {end_to_end / faiss_seconds:.3f}")
    print(
        f"kmeans_objective_ratio={ours_objective / faiss_objective:.4f} kmeans_time_ratio={seconds['fit'] / faiss_seconds:.3f}"
    )


if __name__ == "__main__":
    main()
