# Run the whole pipeline as a Ray job. From the repo root, against a running cluster:
#
#   ray job submit --address http://127.0.0.1:8265 --working-dir . \
#       --runtime-env-json '{"pip": ["-e", "."]}' -- \
#       python jobs/pipeline.py --config cluster --set run_dir=s3://BUCKET/runs/NAME --set data.uri=s3://BUCKET/pairs/
#
# The driver joins the cluster (runtime.ray_address defaults to "auto" here). Rerunning the same
# command resumes: finished stages are skipped, interrupted ones resume from completed shards.
"""Entrypoint for `ray job submit`: a config in, a run directory out."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", default="cluster", help="preset name or YAML file (local or s3://)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--stages", help="comma-separated subset of stages")
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args(argv)

    from influencespace.cli import main as cli_main

    command = ["run", args.config, *(f"--set={o}" for o in ["runtime.ray_address=auto", *args.overrides])]
    if args.stages:
        command += ["--stages", args.stages]
    if args.overwrite:
        command.append("--overwrite")
    return cli_main(command)


if __name__ == "__main__":
    sys.exit(main())
