"""The fault points themselves: inert unless armed, fire once, and a hang never outlives its limit."""

import json
import os
import signal
import subprocess
import sys

import pytest

from influencespace.faults import fault_point

pytestmark = pytest.mark.faults


def test_unarmed_points_return_at_once(monkeypatch, tmp_path):
    monkeypatch.delenv("INFLUENCESPACE_FAULTS", raising=False)
    fault_point("embed.batch", 2)
    assert not list(tmp_path.iterdir())


def _run_point(tmp_path, spec: str, hang_s: str = "1800") -> subprocess.CompletedProcess:
    env = dict(os.environ, INFLUENCESPACE_FAULTS=spec, INFLUENCESPACE_FAULTS_DIR=str(tmp_path),
               INFLUENCESPACE_FAULTS_HANG_S=hang_s)
    code = "from influencespace.faults import fault_point; fault_point('p', 1); fault_point('p', 2); print('past')"
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)


def test_kill_fires_at_its_step_once_and_records_a_marker(tmp_path):
    first = _run_point(tmp_path, "p@2=kill")
    assert first.returncode == -signal.SIGKILL and "past" not in first.stdout
    assert json.loads((tmp_path / "p.kill.json").read_text())["step"] == 2
    again = _run_point(tmp_path, "p@2=kill")  # the marker exists: a restarted process goes on
    assert again.returncode == 0 and "past" in again.stdout


def test_a_hang_nobody_kills_ends_itself_at_the_limit(tmp_path):
    done = _run_point(tmp_path, "p@1=hang", hang_s="2")
    assert done.returncode == -signal.SIGKILL and (tmp_path / "p.hang.json").exists()
