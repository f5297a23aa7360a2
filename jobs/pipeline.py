# Run the whole pipeline as a Ray job. From the repo root, against a running cluster:
#
#   ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
#       python jobs/pipeline.py --config cluster --set run_dir=s3://BUCKET/runs/NAME --set data.uri=s3://BUCKET/pairs/
#
# The driver joins the cluster (runtime.ray_address=auto). Rerunning the same command resumes:
# finished stages are skipped, an interrupted one resumes from its completed shards.
"""Run every stage: data → embed → cluster → influence → curate → train → evaluate → report."""

import sys

from influencespace.cli import job_main

if __name__ == "__main__":
    sys.exit(job_main(None, description=__doc__))
