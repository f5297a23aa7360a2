"""The console: what a person sees on the terminal, what goes to <run_dir>/logs/, and failures."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from influencespace.cli import build_parser
from influencespace.console import Console, plain_progress
from influencespace.stages import PIPELINE

REPO = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "influencespace"]


def _python(code: str, tmp_path: Path, **env: str) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter: the console takes over file descriptors 1 and 2."""
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=120, cwd=tmp_path, env={**os.environ, **env})


def test_everything_printed_in_a_stage_goes_to_its_log_and_the_terminal_gets_the_lines(tmp_path):
    result = _python(f"""
        import logging, os, subprocess, sys, warnings
        from influencespace.console import Console
        logging.basicConfig(level=logging.INFO)
        with Console({str(tmp_path / 'run')!r}, interactive=False) as console:
            console.line("visible line")
            with console.stage("embed"):
                print("python stdout")
                print("python stderr", file=sys.stderr)
                os.write(1, b"raw fd 1\\n")
                logging.getLogger("influencespace.x").info("a log record")
                warnings.warn("a library warning")
                subprocess.run(["echo", "a child process"], check=True)
            console.line("[embed] ran")
        print("after the console")
    """, tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["visible line", "[embed] starting", "[embed] ran", "after the console"]
    assert result.stderr == ""
    log = (tmp_path / "run" / "logs" / "embed.log").read_text()
    for text in ("python stdout", "python stderr", "raw fd 1", "a log record", "a library warning", "a child process"):
        assert text in log, f"{text!r} missing from embed.log:\n{log}"
    assert "visible line" not in log


def test_verbose_shows_the_captured_stream_live_and_still_logs_it(tmp_path):
    result = _python(f"""
        from influencespace.console import Console
        with Console({str(tmp_path / 'run')!r}, verbose=True, interactive=True) as console:
            with console.stage("cluster"):
                print("worker chatter")
    """, tmp_path)
    assert result.returncode == 0, result.stderr
    assert "worker chatter" in result.stdout and "[cluster] starting" in result.stdout
    assert "worker chatter" in (tmp_path / "run" / "logs" / "cluster.log").read_text()


def test_a_failing_stage_names_itself_the_message_and_the_log_with_the_traceback(tmp_path):
    result = _python(f"""
        from influencespace.console import Console
        with Console({str(tmp_path / 'run')!r}, interactive=False) as console:
            with console.stage("curate"):
                print("what led up to it")
                raise ValueError("the budget is negative")
    """, tmp_path)
    assert result.returncode == 1
    log_path = tmp_path / "run" / "logs" / "curate.log"
    assert f"[curate] failed (full output and traceback: {log_path})" in result.stderr
    log = log_path.read_text()
    assert "what led up to it" in log and "Traceback" in log and "ValueError: the budget is negative" in log


def test_plain_progress_lines_say_count_share_and_time_left():
    assert plain_progress("embed", 1500, 6000, "rows", 30.0) == (
        "[embed] 1,500/6,000 rows (25%), 00:30 elapsed, about 01:30 left")
    assert plain_progress("train", 3, None, "epochs", 5.0) == "[train] 3 epochs, 00:05 elapsed"


def test_non_interactive_progress_prints_a_line_per_interval(tmp_path):
    lines: list[str] = []
    console = Console(str(tmp_path), interactive=False, plain_interval=0.0)
    console.line = lines.append  # no capture needed: only the lines matter here
    bar = console.track("embed", 4, "rows")
    for _ in range(4):
        bar.add(1)
    bar.close()
    assert lines[-1].startswith("[embed] 4/4 rows (100%)"), lines
    assert len(lines) == 4


@pytest.mark.ray
def test_remote_workers_report_progress_through_the_sink(ray_cluster, tmp_path):
    console = Console(str(tmp_path), interactive=False, plain_interval=1e9)
    bar = console.track("influence rows", 12, "rows")
    sink = bar.sink()

    @ray_cluster.remote(num_cpus=0)
    def work(sink, n):
        ray_cluster.get([sink.add(1) for _ in range(n)])  # arrived before the task ends

    ray_cluster.get([work.remote(sink, 4) for _ in range(3)])
    bar.close()  # the last poll happens at close: every count that reached the actor is shown
    assert bar.local + bar.remote == 12


# --------------------------------------------------------------------------------------------------
# The real command line


def _stage_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    return {**os.environ, "PYTHONUNBUFFERED": "1", "INFLUENCESPACE_FAULTS_DIR": str(tmp_path / "markers"), **extra}


@pytest.mark.faults
def test_an_injected_failure_prints_the_stage_the_message_and_the_log_path(tmp_path):
    run_dir = tmp_path / "run"
    result = subprocess.run([*CLI, "run", "test", f"--set=run_dir={run_dir}", "--stages", "data"],
                            capture_output=True, text=True, timeout=300,
                            env=_stage_env(tmp_path, INFLUENCESPACE_FAULTS="stage.data=raise"))
    assert result.returncode == 1, result.stdout + result.stderr
    assert "[data] starting" in result.stdout
    log = run_dir / "logs" / "data.log"
    assert result.stderr.splitlines() == [f"[data] failed (full output and traceback: {log})",
                                          "error: InjectedFault: injected fault at stage.data"], result.stderr
    assert "Traceback" not in result.stdout + result.stderr  # the traceback is in the log, not on the terminal
    assert "Traceback" in log.read_text() and "InjectedFault" in log.read_text()


def test_a_user_error_in_a_stage_exits_2_with_the_stage_and_its_log(tmp_path):
    run_dir = tmp_path / "run"
    result = subprocess.run([*CLI, "run", "test", f"--set=run_dir={run_dir}", "--set=data.source=parquet",
                             f"--set=data.uri={tmp_path / 'missing'}", "--stages", "data"],
                            capture_output=True, text=True, timeout=300, env=_stage_env(tmp_path))
    assert result.returncode == 2, result.stdout + result.stderr
    lines = result.stderr.splitlines()
    assert lines[0] == f"[data] failed (full output and traceback: {run_dir / 'logs' / 'data.log'})", result.stderr
    assert lines[1].startswith("error: no Parquet files at") and len(lines) == 2, result.stderr


def test_the_command_an_out_of_order_stage_suggests_exists_and_runs(tmp_path):
    run_dir = tmp_path / "run"
    sets = [f"--set=run_dir={run_dir}"]
    result = subprocess.run([*CLI, "embed", "test", *sets], capture_output=True, text=True, timeout=300,
                            env=_stage_env(tmp_path))
    assert result.returncode == 2, result.stdout + result.stderr
    suggested = re.search(r"run it first \((influencespace [^)]*)\)", result.stderr)
    assert suggested, result.stderr
    argv = shlex.split(suggested.group(1).replace("CONFIG", "test"))[1:]
    ran = subprocess.run([*CLI, *argv, *sets], capture_output=True, text=True, timeout=300, env=_stage_env(tmp_path))
    assert ran.returncode == 0, ran.stdout + ran.stderr
    assert "[data] ran" in ran.stdout


def _readme_commands() -> list[str]:
    """Every ``influencespace …`` command line in the README's code blocks."""
    text = (REPO / "README.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)```", text, re.S)
    lines = [line.split("#")[0].strip() for block in blocks for line in block.splitlines()]
    return [line for line in lines if line.startswith(".venv/bin/influencespace ")]


def test_every_command_the_readme_shows_exists():
    commands = _readme_commands()
    assert len(commands) >= 8, commands
    parser = build_parser()
    for command in commands:
        argv = shlex.split(command)[1:]
        try:
            parser.parse_args(argv)
        except SystemExit as exc:
            pytest.fail(f"README command `{command}` does not parse (exit {exc.code})")
    targets = set(re.findall(r"^([\w-]+):", (REPO / "Makefile").read_text(), re.M))
    for target in re.findall(r"^make ([\w-]+)", (REPO / "README.md").read_text(), re.M):
        assert target in targets, f"README shows `make {target}`, which the Makefile does not define"


def test_the_readme_commands_that_only_read_run_as_written():
    for command in _readme_commands():
        argv = shlex.split(command)[1:]
        if argv[0] in ("stages", "config") and "my.yaml" not in argv:
            result = subprocess.run([*CLI, *argv], capture_output=True, text=True, timeout=120, cwd=REPO)
            assert result.returncode == 0, f"`{command}`: {result.stderr}"


@pytest.mark.ray
@pytest.mark.slow  # the whole test pipeline through the real CLI: a few minutes on 2 cores
def test_a_person_at_a_terminal_sees_bars_and_one_summary_line_per_stage(tmp_path, offline_checkpoint):
    from tests.terminal import run_in_terminal

    run_dir = tmp_path / "run"
    argv = [sys.executable, "-m", "influencespace", "run", "test", f"--set=run_dir={run_dir}",
            f"--set=embed.pretrained={offline_checkpoint}", "--set=runtime.progress=true"]
    env = {**os.environ, "TERM": "xterm-256color", "PYTHONPATH": str(REPO)}
    run = run_in_terminal(argv, env, columns=120)
    seen = run.history + run.screen
    assert run.returncode == 0, "\n".join(seen)
    # A live bar was drawn (tqdm: "embed:  40%|████      | 120/297 [...]"), then cleared for the summary.
    assert re.search(r"embed:\s+\d+%\|", run.raw), run.raw[-3000:]
    assert re.search(r"train: \d+ runs:\s+\d+%\|", run.raw), run.raw[-3000:]
    lines = [line for line in seen if line]
    for stage in PIPELINE:
        assert sum(line.startswith(f"[{stage}] ran ") for line in lines) == 1, "\n".join(lines)
    assert lines[-2].startswith("report: ") and lines[-1].startswith("done: "), "\n".join(lines)
    # Nothing else: no warnings, no Ray internals.
    noise = [line for line in lines if not re.match(r"(\[\w+\] |run directory: |logs: |report: |done: )", line)]
    assert noise == [], "\n".join(noise)
    logs = run_dir / "logs"
    assert {f"{stage}.log" for stage in PIPELINE} <= {p.name for p in logs.iterdir()}
    assert "Started a local Ray instance" in (logs / "embed.log").read_text()
    assert "RayTrainWorker" in (logs / "train.log").read_text()

    # A stage run alone in a fresh process (a resume whose earlier stages are all done): Ray is not up
    # when it starts, and its progress sinks must still travel to the Ray Train workers (the console's
    # bar once went there itself: "Cannot pickle files that are not opened for reading").
    for stage in ("influence", "train"):
        shutil.rmtree(run_dir / stage)
        alone = subprocess.run([*argv[:3], stage, *argv[4:]], capture_output=True, text=True, timeout=900, cwd=REPO,
                               env=env)
        assert alone.returncode == 0, alone.stdout[-3000:] + alone.stderr[-3000:]
        assert f"[{stage}] ran " in alone.stdout, alone.stdout[-3000:]


def test_every_command_an_error_message_suggests_parses():
    from influencespace.stages import stage_command

    suggested = [stage_command(stage) for stage in PIPELINE]
    for module in ("influencespace/report/build.py", "influencespace/embed/offline_default.py"):
        source = (REPO / module).read_text()
        suggested += re.findall(r"[`(](influencespace (?:evaluate|embedder|run)[^`)]*)[`)]", source)
    assert len(suggested) >= len(PIPELINE) + 2, suggested
    parser = build_parser()
    for command in suggested:
        argv = shlex.split(command.replace("CONFIG", "test"))[1:]
        try:
            parser.parse_args(argv)
        except SystemExit:
            pytest.fail(f"an error message suggests `{command}`, which does not parse")
