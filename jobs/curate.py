# Curate only (no training) as a Ray job:
#
#   ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
#       python jobs/curate.py --config cluster --set run_dir=s3://BUCKET/runs/NAME --set data.uri=s3://BUCKET/pairs/
#
# Then export the result: influencespace export s3://BUCKET/runs/NAME --format webdataset --out s3://BUCKET/curated/
"""Run data → embed → cluster → influence → curate."""

import sys

from influencespace.cli import job_main

if __name__ == "__main__":
    sys.exit(job_main(["data", "embed", "cluster", "influence", "curate"], description=__doc__))
