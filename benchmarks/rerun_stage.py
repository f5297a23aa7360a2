"""Rerun one stage of existing scale-harness run directories under the harness's watcher.

    .venv/bin/python benchmarks/rerun_stage.py STAGE RUN_DIR [RUN_DIR ...]

For checking one stage's memory or reads after a change without running the whole harness again
(`benchmarks/scale.py` leaves its run directories under ``--workdir``): the stage's output directory is
removed, the stage runs as the harness runs it (:func:`scale.run_stage`: its own process and local
Ray, /proc sampled every 0.2 s, the read log on for the stages in ``scale.COUNTED_READS``), and one
line per run directory gives the driver's peak (and private) memory, the largest worker's peak, CPU
and wall seconds, and the bytes read over the input's size. The stages after it are not rerun.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import scale  # noqa: E402  (benchmarks/ is not a package)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("stage", choices=scale.STAGES)
    parser.add_argument("run_dirs", nargs="+", help="run directories of benchmarks/scale.py (each with its scale.yaml)")
    parser.add_argument("--interval", type=float, default=0.2, help="seconds between /proc samples")
    parser.add_argument("--stage-timeout", type=float, default=3600.0)
    args = parser.parse_args()
    for run_dir in args.run_dirs:
        config = os.path.join(run_dir, "scale.yaml")
        if not os.path.exists(config):
            parser.error(f"{run_dir} has no scale.yaml: not a run directory of benchmarks/scale.py")
        shutil.rmtree(os.path.join(run_dir, args.stage), ignore_errors=True)
        r = scale.run_stage(args.stage, config, run_dir, os.path.join(run_dir, "_rerun"), args)
        read = f", read x{r.input_bytes_read / r.input_bytes:.3f} of its input" if r.input_bytes else ""
        print(f"{run_dir} {args.stage}: {r.status}, driver {r.driver_peak_bytes / scale.MIB:,.0f} MiB "
              f"(private {r.driver_anon_peak_bytes / scale.MIB:,.0f}, files {r.driver_file_peak_bytes / scale.MIB:,.0f}, "
              f"shared {r.driver_shmem_peak_bytes / scale.MIB:,.0f}), largest worker {r.worker_peak_bytes / scale.MIB:,.0f} MiB, "
              f"CPU {r.cpu_seconds:.0f} s, wall {r.wall_seconds:.0f} s{read}", flush=True)


if __name__ == "__main__":
    main()
