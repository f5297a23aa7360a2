"""`ray start --head` on 127.0.0.1 + `ray job submit` of jobs/pipeline.py against the real S3 server.

Auth: Ray 2.60 turns token authentication on by default; this test sets RAY_AUTH_MODE=disabled for
both `ray start` and `ray job submit` (the same setting must be used on both sides; see
docs/operations.md). RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 keeps every Ray port on 127.0.0.1.
Only the processes of the cluster started here are stopped (a plain `ray stop` would stop every Ray
on the machine).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from influencespace import storage
from influencespace.stages import PIPELINE
from tests.test_pipeline_e2e import check_run

REPO = Path(__file__).parents[1]
RAY = str(Path(sys.executable).parent / "ray")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop_cluster(temp_dir: str) -> None:
    import psutil

    mine = []
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if any(temp_dir in part for part in proc.info["cmdline"] or []):
                mine.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    for proc in mine:
        proc.terminate()
    _, alive = psutil.wait_procs(mine, timeout=15)
    for proc in alive:
        proc.kill()


@pytest.fixture(scope="module")
def ray_head(s3_server):
    temp_dir = tempfile.mkdtemp(prefix="rayjob-", dir="/tmp")  # short: Ray's socket paths have a length limit
    # Jobs run `python` from PATH, as on a cluster image: here that is this virtual environment.
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    env = {**os.environ, "PATH": path, "RAY_AUTH_MODE": "disabled", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0"}
    dashboard_port = _free_port()
    ports = {
        "--port": _free_port(), "--dashboard-port": dashboard_port, "--ray-client-server-port": _free_port(),
        "--dashboard-agent-listen-port": _free_port(), "--dashboard-agent-grpc-port": _free_port(),
        "--runtime-env-agent-port": _free_port(), "--metrics-export-port": _free_port(),
        "--node-manager-port": _free_port(), "--object-manager-port": _free_port(),
    }
    command = [
        RAY, "start", "--head", "--node-ip-address=127.0.0.1", "--dashboard-host=127.0.0.1", "--include-dashboard=true",
        "--num-cpus=2", f"--temp-dir={temp_dir}", "--disable-usage-stats", *(f"{k}={v}" for k, v in ports.items()),
    ]
    started = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert started.returncode == 0, started.stdout + started.stderr
    try:
        yield f"http://127.0.0.1:{dashboard_port}", env
    finally:
        _stop_cluster(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.mark.ray_job
@pytest.mark.s3
# The whole pipeline as a Ray job (its subprocess has a 1200 s guard): 588 s and cut off by the 600 s
# default under BUSY=1 (docs/testing.md), so the default limit is not this test's hang guard.
@pytest.mark.timeout(1800)
def test_pipeline_job_through_ray_job_submit(ray_head, s3_prefix, offline_checkpoint):
    address, env = ray_head
    run_dir = f"{s3_prefix}/run"
    command = [
        RAY, "job", "submit", f"--address={address}", "--working-dir", str(REPO), "--",
        "python", "jobs/pipeline.py", "--config", "test", "--set", f"run_dir={run_dir}",
        "--set", f"embed.pretrained={offline_checkpoint}",
    ]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=1200, cwd=REPO)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    assert "succeeded" in output.lower(), output[-4000:]
    manifest = storage.read_json(f"{run_dir}/data/_SUCCESS.json")
    assert manifest["counts"]["pool"] == 300
    check_run(run_dir)  # every stage, every id, the summary metrics and the report, all on S3
    # Every stage's full output is in the run directory's logs/ on S3 ...
    logs = {uri.rsplit("/", 1)[-1]: storage.read_bytes(uri).decode() for uri in storage.list_files(f"{run_dir}/logs")}
    assert {f"{stage}.log" for stage in PIPELINE} <= set(logs), sorted(logs)
    # ... and credentials never reach job logs, stage logs or manifests.
    secret = os.environ["AWS_SECRET_ACCESS_KEY"]
    assert secret not in output and secret not in str(manifest)
    assert not [name for name, text in logs.items() if secret in text]


@pytest.mark.ray_job
def test_failed_job_exits_non_zero_with_a_clear_message(ray_head):
    address, env = ray_head
    command = [
        RAY, "job", "submit", f"--address={address}", "--working-dir", str(REPO), "--",
        "python", "jobs/pipeline.py", "--config", "test", "--set", "cluster.k=1",
    ]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600, cwd=REPO)
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert "cluster.k: Input should be greater than or equal to 2" in output
