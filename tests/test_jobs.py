"""jobs/*.py: thin entrypoints whose header comment is the exact `ray job submit` command."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

JOBS = sorted((Path(__file__).parents[1] / "jobs").glob("*.py"))


@pytest.mark.parametrize("job", JOBS, ids=lambda p: p.name)
def test_header_is_the_submit_command(job):
    header = job.read_text().split('"""')[0]
    assert re.search(rf"ray job submit --address \S+ --working-dir \. -- \\\s*#\s+python jobs/{job.name} ", header)


def test_jobs_cover_the_documented_entrypoints():
    assert {p.name for p in JOBS} == {"pipeline.py", "curate.py", "train.py", "evaluate.py"}


def test_job_maps_arguments_onto_the_cli(tmp_path):
    run = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, "jobs/pipeline.py", "--config", "test", "--set", f"run_dir={run}", "--stages", "data"],
        capture_output=True, text=True, timeout=300, cwd=Path(__file__).parents[1],
    )
    assert result.returncode == 0, result.stderr
    assert (run / "data" / "_SUCCESS.json").is_file()


def test_job_outside_a_cluster_fails_with_a_clear_message(tmp_path):
    result = subprocess.run(
        [sys.executable, "jobs/curate.py", "--config", "test", "--set", f"run_dir={tmp_path}", "--set", "data.source=parquet",
         "--set", f"data.uri={tmp_path}/absent"],
        capture_output=True, text=True, timeout=300, cwd=Path(__file__).parents[1],
    )
    # The failing stage and its log, then the one message; the traceback stays in the log.
    lines = result.stderr.splitlines()
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert lines[0].startswith("[data] failed (full output and traceback: ") and lines[-1].startswith("error: "), lines
