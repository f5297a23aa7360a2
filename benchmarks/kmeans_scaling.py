"""How the cluster stage's time and memory grow with N: three sizes from Parquet on disk.

    .venv/bin/python benchmarks/kmeans_scaling.py                      # 1M, 3M, 10M × 128, k = 256
    .venv/bin/python benchmarks/kmeans_scaling.py --sizes 100000,300000,1000000   # a quick look

Each size runs the whole stage (Ray actors start, shards validated, k-means++ seeding, Lloyd
iterations, final assignment pass writing every row) in a fresh subprocess, with 2 workers that
re-read one shard at a time on every pass (``cluster.cache_shards=false``), so a worker's memory is
bounded by the shard size, not by N. Printed per size: stage seconds, fit seconds, the workers' CPU
seconds, the peak RSS of each worker and of the driver; then the log-log slopes vs N of wall time and
of worker CPU time (goal ≤ 1.1; the fixed start-up cost pulls them below 1 at small N) and the
worker peak memory growth (goal: flat in N). On a shared machine whose load changes during the run,
wall-time slopes are distorted by the load; the CPU-time slope is not, so both are printed.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

from kmeans_data import cluster_config, write_pool  # noqa: E402


def run_one(args: argparse.Namespace, n: int) -> dict:
    """One size, in this process: write the data (once), run the stage, report time and memory."""
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    data_dir = os.path.join(args.workdir, f"embed-{n}-{args.dim}")
    upstream = {"embed": write_pool(data_dir, n, args.dim, args.centres, args.shard_rows, spread=1.0, seed=0)}

    from influencespace.cluster.stage import ClusterStage
    from influencespace.stages import run_stage
    from influencespace.storage import read_json

    run_dir = os.path.join(args.workdir, f"run-{n}")
    shutil.rmtree(run_dir, ignore_errors=True)
    config = cluster_config(run_dir, args.k, args.iters, args.seeding_sample, args.workers, 0, args.cache)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    manifest = run_stage(config, ClusterStage(), upstream=upstream).manifest
    log = read_json(os.path.join(run_dir, "cluster", "kmeans_log.json"))
    shutil.rmtree(run_dir, ignore_errors=True)  # 10M assignments are ~200 MB; keep the disk for the data
    return {
        "n": n,
        "stage_seconds": manifest["seconds"],
        "fit_seconds": log["seconds"]["fit"],
        "iterations": len(log["iterations"]),
        "worker_peak_rss_bytes": log["worker_peak_rss_bytes"],
        "worker_cpu_seconds": sum(log["worker_cpu_seconds"]),
        "driver_peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "driver_rss_before_bytes": before,
        "objective_per_row": log["mean_distance"],
    }


def slope(ns: list[int], seconds: list[float]) -> float:
    """Least-squares slope of log(time) against log(N)."""
    return float(np.polyfit(np.log(ns), np.log(seconds), 1)[0])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="1000000,3000000,10000000", help="comma-separated row counts")
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--k", type=int, default=256)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--centres", type=int, default=1024)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--shard-rows", type=int, default=250_000)
    parser.add_argument("--seeding-sample", type=int, default=65536)
    parser.add_argument(
        "--cache", action="store_true", help="workers keep their shards in memory (memory grows with N)"
    )
    parser.add_argument("--workdir", default="/tmp/influencespace-bench/scaling")
    parser.add_argument("--one", type=int, default=None, help=argparse.SUPPRESS)  # internal: run one size, print JSON
    args = parser.parse_args(argv)

    if args.one is not None:
        print("RESULT " + json.dumps(run_one(args, args.one)), flush=True)
        return

    sizes = [int(s) for s in args.sizes.split(",")]
    mode = "cached shards" if args.cache else "streamed shards (one at a time)"
    print(f"k={args.k}, dim={args.dim}, {args.iters} iterations, {args.workers} workers, {mode}, {os.cpu_count()} CPUs")
    for n in sizes:  # data first, here, so that writing it does not count in a run's memory
        write_pool(os.path.join(args.workdir, f"embed-{n}-{args.dim}"), n, args.dim, args.centres, args.shard_rows)
    results = []
    passthrough = [
        f"--dim={args.dim}",
        f"--k={args.k}",
        f"--iters={args.iters}",
        f"--centres={args.centres}",
        f"--workers={args.workers}",
        f"--shard-rows={args.shard_rows}",
        f"--seeding-sample={args.seeding_sample}",
        f"--workdir={args.workdir}",
        *(["--cache"] if args.cache else []),
    ]
    for n in sizes:
        out = subprocess.run(
            [sys.executable, os.path.abspath(__file__), *passthrough, "--one", str(n)],
            capture_output=True,
            text=True,
        )
        if out.returncode != 0:
            sys.exit(f"size {n:,} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
        line = next(line for line in out.stdout.splitlines() if line.startswith("RESULT "))
        result = json.loads(line[len("RESULT ") :])
        results.append(result)
        workers = ", ".join(f"{b / 2**20:.0f}" for b in result["worker_peak_rss_bytes"])
        print(
            f"N={n:>11,}: stage {result['stage_seconds']:7.1f}s, fit {result['fit_seconds']:7.1f}s, "
            f"worker CPU {result['worker_cpu_seconds']:7.1f}s, "
            f"worker peak RSS [{workers}] MiB, driver peak RSS {result['driver_peak_rss_bytes'] / 2**20:.0f} MiB",
            flush=True,
        )
    ns = [r["n"] for r in results]
    worker_peaks = [max(r["worker_peak_rss_bytes"]) for r in results]
    driver_peaks = [r["driver_peak_rss_bytes"] for r in results]
    print(f"worker peak memory growth {ns[0]:,} -> {ns[-1]:,}: x{worker_peaks[-1] / worker_peaks[0]:.2f}")
    print(f"driver peak memory growth {ns[0]:,} -> {ns[-1]:,}: x{driver_peaks[-1] / driver_peaks[0]:.2f}")
    print(
        f"kmeans_scaling_slope={slope(ns, [r['stage_seconds'] for r in results]):.3f} "
        f"kmeans_fit_slope={slope(ns, [r['fit_seconds'] for r in results]):.3f} "
        f"kmeans_worker_cpu_slope={slope(ns, [r['worker_cpu_seconds'] for r in results]):.3f} "
        f"worker_peak_mib={','.join(f'{b / 2**20:.0f}' for b in worker_peaks)}"
    )


if __name__ == "__main__":
    main()
