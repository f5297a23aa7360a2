# Evaluate trained variants and build the report (Ray job):
#
#   ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
#       python jobs/evaluate.py --config cluster --set run_dir=s3://BUCKET/runs/NAME
"""Run evaluate → report on a run whose train stage has finished."""

import sys

from influencespace.cli import job_main

if __name__ == "__main__":
    sys.exit(job_main(["evaluate", "report"], description=__doc__))
