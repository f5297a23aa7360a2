"""Embed throughput: the Ray pipeline end to end vs the raw encoder forward pass, in one run.

    .venv/bin/python benchmarks/embed_throughput.py --quick          # 4000 pairs, ~4 min on 2 cores
    .venv/bin/python benchmarks/embed_throughput.py --pairs 20000    # longer: start-up amortised

Same inputs (benchmark pool pairs, Parquet on local disk), same encoder (the offline default unless
--checkpoint), same batch size, same machine, same process:

- raw: decoded, tokenised batches prepared up front (untimed), then a tight loop of
  ``encode_images`` + ``encode_texts`` over every valid pair — the model's forward pass alone;
- pipeline: the embed stage on the local Ray (already started, untimed): plan, read, decode and
  tokenise in tasks, encode in the actor pool (model loaded inside, timed), write shards + manifest.

The raw loop runs before and after the pipeline and its mean is used, so load drifting on a shared
machine affects both sides alike. Figures: pairs/s of each, and the pipeline's steady-state rate
(from its first written shard to the end), which excludes the actor's start-up. The LAST line is
``embed_pipeline_over_raw=<end-to-end pipeline pairs/s ÷ raw pairs/s>``.
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


def build_pool(out_dir: str, pairs: int, shard_rows: int) -> int:
    from influencespace import storage
    from influencespace.config import benchmark_config
    from influencespace.datasets.benchmark import build_fashion_captions

    cfg = benchmark_config({"pool_size": pairs, "validation_size": 20, "test_size": 20})
    pool = build_fashion_captions(cfg).pool
    for i, start in enumerate(range(0, pool.num_rows, shard_rows)):
        storage.write_table(pool.slice(start, shard_rows), os.path.join(out_dir, f"part-{i:05d}.parquet"))
    return pool.num_rows


def raw_pairs_per_second(encoder, batches) -> tuple[float, int]:
    import numpy as np

    valid = [{k: b[k][np.array([r == "" for r in b["reason"]])] for k in ("pixels", "tokens", "lengths")} for b in batches]
    encoder.encode_images(valid[0]["pixels"][:8])  # warm-up: first-call allocations
    encoder.encode_texts(valid[0]["tokens"][:8], valid[0]["lengths"][:8])
    n = 0
    t0 = time.perf_counter()
    for b in valid:
        encoder.encode_images(b["pixels"])
        encoder.encode_texts(b["tokens"], b["lengths"])
        n += len(b["pixels"])
    return n / (time.perf_counter() - t0), n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="4000 pairs (the default unless --pairs)")
    parser.add_argument("--pairs", type=int, default=None, help="pairs to embed")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--rows-per-shard", type=int, default=1024)
    parser.add_argument("--checkpoint", default=None, help="offline-default checkpoint (default: the cached one, built if missing)")
    args = parser.parse_args()
    pairs = args.pairs or 4000

    import logging

    logging.basicConfig(level=logging.WARNING)
    from influencespace.config import load_config
    from influencespace.datasets.stage import DataStage
    from influencespace.embed import pairs as embed_pairs
    from influencespace.embed.registry import load_encoder, spec_from_config
    from influencespace.embed.stage import EmbedStage
    from influencespace.runtime import ensure_ray
    from influencespace.stages import read_manifest, run_stage

    work = tempfile.mkdtemp(prefix="embed-throughput-")
    pool_dir = os.path.join(work, "pool")
    n_rows = build_pool(pool_dir, pairs, args.rows_per_shard)
    overrides = [
        f"run_dir={work}/run", "data.source=parquet", f"data.uri={pool_dir}", "runtime.progress=false",
        f"embed.batch_size={args.batch_size}", f"embed.rows_per_shard={args.rows_per_shard}",
    ]
    if args.checkpoint:
        overrides.append(f"embed.pretrained={args.checkpoint}")
    config = load_config("demo", overrides)
    ensure_ray(config.runtime)
    run_stage(config, DataStage())
    upstream = {"data": read_manifest(config, "data")}

    spec = spec_from_config(config.embed)
    encoder = load_encoder(spec)
    shards = embed_pairs.plan_split("pool", pool_dir, "parquet", args.rows_per_shard)
    batches = [b for s in shards for b in embed_pairs.prepared_batches(s, spec.image_preprocess, spec.text_preprocess, args.batch_size)]

    raw_before, n_valid = raw_pairs_per_second(encoder, batches)
    t0 = time.perf_counter()
    outcome = run_stage(config, EmbedStage(), upstream=upstream)
    pipeline_seconds = time.perf_counter() - t0
    raw_after, _ = raw_pairs_per_second(encoder, batches)

    # Steady state: from the first shard file written to the last (actor start-up excluded).
    stage_dir = os.path.join(work, "run", "embed", "pool")
    times = sorted(os.path.getmtime(os.path.join(stage_dir, f)) for f in os.listdir(stage_dir))
    first_shard_rows = shards[0].rows
    steady = (n_rows - first_shard_rows) / (times[-1] - times[0]) if len(times) > 1 and times[-1] > times[0] else float("nan")

    raw = (raw_before + raw_after) / 2
    pipeline = n_rows / pipeline_seconds
    counts = outcome.manifest["counts"]
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, {platform.python_version()}; model {spec.describe()}")
    print(f"pairs: {n_rows} in {len(shards)} shards (embedded {counts['pool']}, rejected {counts['pool_rejected']}); batch size {args.batch_size}")
    print(f"raw encoder forward: {raw_before:.1f} pairs/s before, {raw_after:.1f} after, mean {raw:.1f} ({n_valid} valid pairs)")
    print(f"ray pipeline end to end: {pipeline:.1f} pairs/s ({pipeline_seconds:.1f} s incl. actor start-up and model load)")
    print(f"ray pipeline steady state (first to last shard written): {steady:.1f} pairs/s, ratio {steady / raw:.3f}")
    print(f"embed_pipeline_over_raw={pipeline / raw:.3f}")


if __name__ == "__main__":
    main()
