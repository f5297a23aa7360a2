"""Command line: ``influencespace run|demo|<stage>|data|report|config``.

Only argparse and the standard library are imported at start, so ``--help`` is instant; each command
imports what it needs. Errors a user can act on print one message and exit with code 2.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
from collections.abc import Iterator
from typing import Any

STAGE_COMMANDS = ("embed", "cluster", "influence", "curate", "train", "evaluate")


def _add_config_args(parser: argparse.ArgumentParser, default: str | None = None) -> None:
    if default is None:
        parser.add_argument("config", help="preset name (demo, pixels, test, cluster) or YAML file (local or s3://)")
    else:
        parser.add_argument("config", nargs="?", default=default, help=f"preset or YAML file (default: {default})")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override a config key, e.g. --set cluster.k=4096 (repeatable)",
    )


def _add_run_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--overwrite", action="store_true", help="replace stage results made with another config")
    parser.add_argument("--verbose", action="store_true",
                        help="also show every stage's full output live (it always goes to <run_dir>/logs/)")


def build_parser() -> argparse.ArgumentParser:
    from influencespace import __version__

    parser = argparse.ArgumentParser(
        prog="influencespace",
        description="Influence-guided curation of image–text training sets on Ray.",
    )
    parser.add_argument("--version", action="version", version=f"influencespace {__version__}")
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("run", help="run the pipeline (every implemented stage, or --stages)")
    _add_config_args(p)
    _add_run_args(p)
    p.add_argument("--stages", help="comma-separated stages to run, e.g. data,embed")

    p = sub.add_parser("demo", help="run the pipeline on the built-in benchmark (local Ray, CPU)")
    _add_config_args(p, default="demo")
    _add_run_args(p)

    for stage in STAGE_COMMANDS:
        p = sub.add_parser(stage, help=f"run the {stage} stage alone (its inputs must have finished)")
        _add_config_args(p)
        _add_run_args(p)

    p = sub.add_parser("data", help="build benchmark data")
    data_sub = p.add_subparsers(dest="data_command", required=True, metavar="ACTION")
    b = data_sub.add_parser("build", help="build a benchmark data set")
    b.add_argument("dataset", choices=["fashion-captions", "shape-captions"], help="which benchmark")
    b.add_argument("--out", required=True, help="output directory (local or s3://)")
    b.add_argument("--size", default="small", choices=["tiny", "small", "full"], help="size preset (default: small)")
    b.add_argument("--format", default="parquet", choices=["parquet", "webdataset", "datacomp"],
                   help="parquet (default); webdataset (pool as tars); datacomp: every split as DataComp-style "
                   ".tar + .parquet + .npz shards with tower embeddings (docs/datacomp.md)")
    b.add_argument("--embedder", metavar="CHECKPOINT",
                   help="datacomp: offline default embedder checkpoint for the .npz embeddings (default: the cached one)")
    b.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override a builder setting, e.g. --set seed=3 --set pool_size=1000",
    )

    p = sub.add_parser("export", help="write the curated subset of a run as uids, WebDataset or Parquet")
    p.add_argument("run_dir", help="run directory (local or s3://) with a finished curate stage")
    p.add_argument("--format", required=True, choices=["uids", "webdataset", "parquet"])
    p.add_argument("--out", required=True, help="output directory (local or s3://)")
    p.add_argument("--policy", default="influencespace", help="which manifest: influencespace (default), a comparison (random, dedup, clipscore, clipscore_dedup) or an ablation curated beside it")
    p.add_argument("--weights", default="field", choices=["field", "repeats"],
                   help="WebDataset: weight as a JSON field (default) or as max(1, round(weight)) repeats")
    p.add_argument("--rows-per-file", type=int, default=10_000, help="rows per output file (default 10000)")
    p.add_argument("--verbose", action="store_true", help="also show the full output live (it goes to RUN/logs/export.log)")
    p.add_argument("--pairs", metavar="URI",
                   help="raw pairs to take sample bytes from (WebDataset tars or Parquet; default: the run's data pool); "
                   "needed when the run started from precomputed embeddings")

    p = sub.add_parser("embedder", help="the offline default embedder (EfficientNet-Lite0 + MiniLM, aligned heads)")
    emb_sub = p.add_subparsers(dest="embedder_command", required=True, metavar="ACTION")
    e = emb_sub.add_parser("build", help="train its projection heads and cache the checkpoint (one time, ~1-3 min on CPU)")
    e.add_argument("--out", help="checkpoint path or s3:// URI (default: the cache's file for --alignment)")
    e.add_argument("--alignment", default="fashion_captions", choices=["fashion_captions", "shape_captions"],
                   help="what the heads align on: the last N Fashion-MNIST train images (default) or N rendered shapes")
    e.add_argument("--images", type=int, default=6000, help="alignment images (N)")
    e.add_argument("--steps", type=int, default=600, help="training steps")
    e.add_argument("--force", action="store_true", help="rebuild even if the checkpoint exists")

    p = sub.add_parser("report", help="rebuild the report of a run from its artifacts")
    p.add_argument("run_dir", help="run directory (local or s3://)")

    p = sub.add_parser("config", help="show or validate a configuration")
    cfg_sub = p.add_subparsers(dest="config_command", required=True, metavar="ACTION")
    for action, text in (("show", "print the resolved configuration as YAML"), ("validate", "check a configuration")):
        c = cfg_sub.add_parser(action, help=text)
        _add_config_args(c, default="demo")
    cfg_sub.add_parser("keys", help="list every key with its type, default and meaning (Markdown)")

    p = sub.add_parser("stages", help="list the pipeline stages and which are implemented")
    return parser


@contextlib.contextmanager
def _console(run_dir: str, verbose: bool, show_progress: bool = True) -> Iterator[Any]:
    """The console around a command's work, and a Ray session inside it (stopped before the console).

    A user error leaves as itself (``main`` prints it, exit 2). Any other exception from a stage the
    console named was logged with its traceback there: it ends the command with one line, exit 1.
    """
    from influencespace.console import Console
    from influencespace.errors import InfluenceSpaceError
    from influencespace.runtime import ray_session

    console = Console(run_dir, verbose=verbose, show_progress=show_progress)
    try:
        with console, ray_session():
            yield console
    except Exception as exc:
        if isinstance(exc, InfluenceSpaceError) or console.failed_stage is None:
            raise
        print(f"error: {type(exc).__name__}: {exc}", file=sys.stderr)
        raise SystemExit(1) from None


def _run(config_source: str, overrides: list[str], stages: list[str] | None, overwrite: bool, verbose: bool) -> int:
    from influencespace import storage
    from influencespace.config import load_config
    from influencespace.stages import run_pipeline

    config = load_config(config_source, overrides)
    storage.configure_from(config.storage)  # the console writes logs/ into the run directory
    with _console(config.run_dir, verbose, config.runtime.progress) as console:
        console.line(f"run directory: {config.run_dir}")
        console.line(f"logs: {console.logs_uri}/ (each stage's full output)")
        outcomes = run_pipeline(config, stages, overwrite=overwrite, console=console)
        if any(o.name == "report" for o in outcomes):
            console.line(f"report: {storage.join(config.run_dir, 'report', 'index.html')}")
        console.line(f"done: artifacts in {config.run_dir}")
    return 0


def _data_build(args: argparse.Namespace) -> int:
    from influencespace import storage
    from influencespace.config import benchmark_config
    from influencespace.datasets.benchmark import SIZES, build_benchmark, write_splits

    name = args.dataset.replace("-", "_")
    cfg = benchmark_config({**SIZES[args.size], "name": name}, args.overrides, origin=f"data build {args.dataset} --size {args.size}")
    storage.configure()
    print(f"building {cfg.name} ({args.size}: pool {cfg.pool_size}, seed {cfg.seed}) into {args.out}")
    splits = build_benchmark(cfg)
    if args.format == "datacomp":
        from influencespace.datasets.datacomp import write_datacomp

        counts = write_datacomp(splits, args.out, cfg.shard_rows, args.embedder)
        for key, value in counts.items():
            print(f"  {key:32s} {value}")
        return 0
    write_splits(splits, args.out, cfg.shard_rows, fmt=args.format)
    for key, value in splits.counts.items():
        print(f"  {key:18s} {value}")
    return 0


def _embedder(args: argparse.Namespace) -> int:
    from influencespace import storage
    from influencespace.embed.offline_default import (
        AlignmentSettings,
        build_default_checkpoint,
        default_checkpoint_path,
    )

    out = args.out or default_checkpoint_path(args.alignment)
    storage.configure()
    if storage.exists(out) and not args.force:
        print(f"{out} exists (use --force to rebuild)")
        return 0
    build_default_checkpoint(out, AlignmentSettings(images=args.images, steps=args.steps, domain=args.alignment), progress=print)
    return 0


def _config(args: argparse.Namespace) -> int:
    from influencespace.config import keys_markdown, load_config

    if args.config_command == "keys":
        print(keys_markdown(), end="")
        return 0
    config = load_config(args.config, args.overrides)
    if args.config_command == "show":
        print(config.to_yaml(), end="")
    else:
        print(f"{args.config}: valid")
    return 0


def _stages() -> int:
    from influencespace.stages import PIPELINE, STAGE_CLASSES

    for name in PIPELINE:
        print(f"{name:10s} {'implemented' if name in STAGE_CLASSES else 'not implemented yet'}")
    return 0


def _report(args: argparse.Namespace) -> int:
    from influencespace import storage
    from influencespace.report.build import build_report

    storage.configure()
    files = build_report(args.run_dir)
    print(f"report: {files['index']} (Markdown: {files['markdown']})")
    return 0


def _export(args: argparse.Namespace) -> int:
    from influencespace import storage
    from influencespace.config import RuntimeConfig
    from influencespace.errors import InfluenceSpaceError
    from influencespace.export import export_run
    from influencespace.runtime import ensure_ray

    storage.configure()
    if not storage.exists(args.run_dir):  # before the console makes <run_dir>/logs/ there
        raise InfluenceSpaceError(f"no run directory at {args.run_dir}; give the run_dir of a finished run")
    with _console(args.run_dir, args.verbose) as console, console.stage("export"):
        ensure_ray(RuntimeConfig())
        counts = export_run(args.run_dir, args.format, args.out, args.policy, args.weights, args.rows_per_file,
                            args.pairs)
        console.line(f"exported {counts['kept']} kept samples of {args.run_dir} as {args.format} to {args.out}")
        if args.format == "webdataset":
            last = max(counts["shards"] - 1, 0)
            console.line(f"  {counts['samples']} samples in {counts['shards']} shard(s): "
                         f"{args.out.rstrip('/')}/{{00000000..{last:08d}}}.tar")
    return 0


def job_main(stages: list[str] | None, argv: list[str] | None = None, description: str = "") -> int:
    """Entrypoint shared by ``jobs/*.py``: join the Ray cluster the job runs on and run ``stages``."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", default="cluster", help="preset name or YAML file (local or s3://)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--overwrite", action="store_true", help="replace stage results made with another config")
    parser.add_argument("--verbose", action="store_true", help="show every stage's full output in the job log too")
    if stages is None:
        parser.add_argument("--stages", help="comma-separated subset of stages (default: all)")
    args = parser.parse_args(argv)
    chosen = stages
    if stages is None and args.stages:
        chosen = [s.strip() for s in args.stages.split(",")]
    command = ["run", args.config, "--set=runtime.ray_address=auto", *(f"--set={o}" for o in args.overrides)]
    if chosen:
        command += ["--stages", ",".join(chosen)]
    command += [flag for flag, on in (("--overwrite", args.overwrite), ("--verbose", args.verbose)) if on]
    return main(command)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=getattr(logging, args.log_level), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from influencespace.errors import InfluenceSpaceError

    try:
        if args.command == "run":
            stages = [s.strip() for s in args.stages.split(",")] if args.stages else None
            return _run(args.config, args.overrides, stages, args.overwrite, args.verbose)
        if args.command == "demo":
            return _run(args.config, args.overrides, None, args.overwrite, args.verbose)
        if args.command in STAGE_COMMANDS:
            return _run(args.config, args.overrides, [args.command], args.overwrite, args.verbose)
        if args.command == "data":
            return _data_build(args)
        if args.command == "embedder":
            return _embedder(args)
        if args.command == "config":
            return _config(args)
        if args.command == "stages":
            return _stages()
        if args.command == "report":
            return _report(args)
        if args.command == "export":
            return _export(args)
    except InfluenceSpaceError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    return 0  # pragma: no cover


if __name__ == "__main__":
    sys.exit(main())
