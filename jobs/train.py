# Train the baseline, the curated set and the comparison policies on a curated run (Ray job):
#
#   ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
#       python jobs/train.py --config cluster --set run_dir=s3://BUCKET/runs/NAME
"""Run the train stage (DeepSpeed inside Ray Train) on a run whose curate stage has finished."""

import sys

from influencespace.cli import job_main

if __name__ == "__main__":
    sys.exit(job_main(["train"], description=__doc__))
