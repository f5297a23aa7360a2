"""The k-means driver's memory as workers are added: partial sums reduced off the driver.

    .venv/bin/python benchmarks/kmeans_reduce.py                 # 200k x 512, k = 32,768 two-level, 2 and 8 workers
    .venv/bin/python benchmarks/kmeans_reduce.py --rows 50000 --k 4096   # a quick look

Each Lloyd pass every worker produces k x d float64 partial sums (128 MiB at k = 32,768, d = 512).
The cluster stage adds them with remote tasks in a fixed tree order and updates the centroids there
(``cluster.stage.RayPool.reduce``), so the driver receives k x d float32 centroids and k counts once
per pass whatever the number of workers. This runs the whole cluster stage (Ray actors of
``--worker-cpus`` CPUs each, two-level k-means) in a fresh subprocess per worker count and prints the
driver's peak RSS, the largest worker's, and how far each run's centroids are from the local runner
with one worker (one sum, no tree: the float sums in another order). Ends with one line:
``kmeans_reduce_driver_ratio=R max_centroid_diff=D`` (R: the driver peak at the most workers over
the fewest; goal ≤ 1.10; D: goal ≤ 1e-6).
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

from kmeans_data import write_pool  # noqa: E402


def config_for(args: argparse.Namespace, run_dir: str, runner: str, workers: int):
    from influencespace.config import load_config

    return load_config("test", [
        f"run_dir={run_dir}", f"runtime.runner={runner}", f"runtime.num_cpus={os.cpu_count()}",
        f"cluster.k={args.k}", "cluster.hierarchical=true", f"cluster.max_iter={args.iters}", "cluster.tol=0",
        "cluster.spherical=false", "cluster.seeding=kmeans++", f"cluster.seeding_sample={args.seeding_sample}",
        f"cluster.num_workers={workers}", f"cluster.worker_cpus={args.worker_cpus}", "cluster.cache_shards=false",
        "cluster.seed=0",
    ])  # fmt: skip


def run_one(args: argparse.Namespace, runner: str, workers: int) -> dict:
    """One run in this process: the cluster stage; its driver peak RSS, worker peaks and centroids file."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    upstream = {"embed": write_pool(args.data_dir, args.rows, args.dim, args.centres, args.shard_rows)}
    from influencespace.cluster.stage import ClusterStage
    from influencespace.stages import run_stage
    from influencespace.storage import read_json

    run_dir = os.path.join(args.workdir, f"run-{runner}-{workers}")
    shutil.rmtree(run_dir, ignore_errors=True)
    manifest = run_stage(config_for(args, run_dir, runner, workers), ClusterStage(), upstream=upstream).manifest
    log = read_json(os.path.join(run_dir, "cluster", "kmeans_log.json"))
    return {
        "runner": runner,
        "workers": workers,
        "stage_seconds": manifest["seconds"],
        "driver_peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "worker_peak_rss_bytes": log.get("worker_peak_rss_bytes", []),
        "centroids": os.path.join(run_dir, "cluster", "centroids.npy"),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--k", type=int, default=32_768)
    parser.add_argument("--iters", type=int, default=3, help="Lloyd iterations per phase (coarse, fine)")
    parser.add_argument("--centres", type=int, default=4096)
    parser.add_argument("--shard-rows", type=int, default=25_000)
    parser.add_argument("--seeding-sample", type=int, default=65_536)
    parser.add_argument("--workers", default="2,8", help="comma-separated worker counts")
    parser.add_argument("--worker-cpus", type=float, default=0.25)
    parser.add_argument("--workdir", default="/tmp/influencespace-bench/kmeans-reduce")
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)  # internal: "runner,workers"
    args = parser.parse_args(argv)
    args.data_dir = os.path.join(args.workdir, f"embed-{args.rows}-{args.dim}")

    if args.one is not None:
        runner, workers = args.one.split(",")
        print("RESULT " + json.dumps(run_one(args, runner, int(workers))), flush=True)
        return

    print(f"{args.rows:,} x {args.dim}, k={args.k:,} two-level, {args.iters} iterations a phase, "
          f"workers of {args.worker_cpus} CPU, {os.cpu_count()} CPUs", flush=True)
    write_pool(args.data_dir, args.rows, args.dim, args.centres, args.shard_rows)  # not in any run's memory
    passthrough = [f"--{name.replace('_', '-')}={getattr(args, name)}" for name in
                   ("rows", "dim", "k", "iters", "centres", "shard_rows", "seeding_sample", "worker_cpus", "workdir")]
    runs = [("local", 1)] + [("ray", int(w)) for w in args.workers.split(",")]
    results = []
    for runner, workers in runs:
        out = subprocess.run([sys.executable, os.path.abspath(__file__), *passthrough, "--one", f"{runner},{workers}"],
                             capture_output=True, text=True)
        if out.returncode != 0:
            sys.exit(f"{runner} with {workers} worker(s) failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
        result = json.loads(next(line for line in out.stdout.splitlines() if line.startswith("RESULT "))[7:])
        results.append(result)
    reference = np.load(results[0]["centroids"])
    ray_runs = results[1:]
    for result in results:
        result["max_centroid_diff"] = float(np.abs(np.load(result["centroids"]) - reference).max())
        workers = ", ".join(f"{b / 2**20:.0f}" for b in result["worker_peak_rss_bytes"]) or "-"
        print(f"{result['runner']:>5} x{result['workers']}: stage {result['stage_seconds']:7.1f}s, driver peak RSS "
              f"{result['driver_peak_rss_bytes'] / 2**20:7.0f} MiB, worker peaks [{workers}] MiB, "
              f"max |centroid - local x1| {result['max_centroid_diff']:.2e}", flush=True)
    ratio = ray_runs[-1]["driver_peak_rss_bytes"] / ray_runs[0]["driver_peak_rss_bytes"]
    print(f"kmeans_reduce_driver_ratio={ratio:.3f} max_centroid_diff={max(r['max_centroid_diff'] for r in ray_runs):.2e}")


if __name__ == "__main__":
    main()
