"""Kills: the driver SIGKILLed in the middle of embed, k-means, influence and train, and worker processes
(an embed actor, a k-means actor, Ray Train workers of influence and train) SIGKILLed mid-task.

The real CLI runs in a subprocess (its own local Ray) on the ``test`` preset. Kill points are
deterministic: ``influencespace.faults`` arms named points through ``INFLUENCESPACE_FAULTS``; a ``hang``
point records a marker and sleeps, the test waits for the marker and SIGKILLs the driver (only the
driver: Ray's own processes must go away by themselves); a ``kill`` point SIGKILLs the worker process
it runs in, once. Rerunning the same command must finish every stage with the artifacts of an
uninterrupted reference run: bitwise-equal values for embed and k-means, within a stated tolerance for
influence and training, and every input id accounted for exactly once.

One faulted run directory goes through five invocations (the kills chain: each rerun resumes the
stage killed before and is killed in the next one), so the module pays for Ray start-up six times,
not twelve. That is still minutes of Ray Train and Ray Data start-up on a 2-CPU machine, so the module
is also marked ``slow``: CI runs it after the default suite (``pytest -m slow``; ``pytest -m faults``
selects it too).

A SIGKILLed driver's Ray processes exit by themselves (GCS and raylet at once, the dashboard and
runtime-env agents after up to about a minute); each kill waits for them (``LEAK_GRACE_S``) before the
rerun starts, and records any that outlive the wait.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import psutil
import pyarrow.parquet as pq
import pytest

from influencespace.faults import DIR_ENV, ENV

# The shared fixtures run inside the first test's time limit: six CLI runs of the pipeline.
pytestmark = [pytest.mark.faults, pytest.mark.ray, pytest.mark.slow, pytest.mark.timeout(3000)]

STAGES = "data,embed,cluster,influence,curate,train"
SETTINGS = ("train.epochs=2", "curate.comparison_policies=[]")  # two variants, two epochs: resume mid-run
START_TIMEOUT_S = 600  # per invocation: Ray start-up and a stage on a shared 2-CPU machine
LEAK_GRACE_S = 120  # how long Ray's processes may take to notice their driver is gone
KILL_PARK_S = START_TIMEOUT_S  # a kill:S worker waits this long for the test to kill it (fallback only)


def _command(run_dir: Path, checkpoint: Path, stages: str = STAGES, settings: tuple[str, ...] = ()) -> list[str]:
    sets = [f"--set=run_dir={run_dir}", f"--set=embed.pretrained={checkpoint}",
            *(f"--set={s}" for s in (*SETTINGS, *settings))]
    return [sys.executable, "-m", "influencespace", "--log-level", "WARNING", "run", "test", *sets, "--stages", stages]


def _read_marker(markers: Path, name: str) -> dict | None:
    path = markers / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() and path.stat().st_size else None


def _registered(run_dir: Path, variant: str, epoch: int) -> bool:
    """Whether Ray Train's controller has registered ``variant``'s epoch-``epoch`` checkpoint: it is then
    listed in a ``checkpoint_manager_snapshot.json`` under the train stage's Ray directory (what a restarted
    worker group and a resumed stage restore from; ``influencespace.train.stage.latest_checkpoints``)."""
    name = f"{variant}-seed0-epoch{epoch:03d}"
    for snapshot in (run_dir / "train" / "_ray").glob("*/checkpoint_manager_snapshot.json"):
        try:
            entries = json.loads(snapshot.read_text()).get("checkpoint_results", [])
        except (OSError, ValueError):  # being written
            continue
        if any(entry.get("checkpoint_dir_name") == name for entry in entries):
            return True
    return False


def _snapshots(run_dir: Path) -> str:
    """The checkpoints Ray Train has registered so far, for failure messages."""
    found = {}
    for snapshot in (run_dir / "train" / "_ray").glob("*/checkpoint_manager_snapshot.json"):
        try:
            found[snapshot.parent.name] = [e.get("checkpoint_dir_name") for e in json.loads(snapshot.read_text())["checkpoint_results"]]
        except (OSError, ValueError, KeyError) as exc:
            found[snapshot.parent.name] = repr(exc)
    return json.dumps(found)


def _invoke(run_dir: Path, checkpoint: Path, log: Path, faults: str = "", markers: Path | None = None,
            kill_at: str | None = None, kill_when: Callable[[], bool] | None = None,
            worker_kills: dict[str, Callable[[], bool]] | None = None, stages: str = STAGES,
            settings: tuple[str, ...] = ()) -> dict:
    """Run the CLI; with ``kill_at``, SIGKILL the driver once that hang marker appears (and ``kill_when()``
    holds, if given).

    ``worker_kills`` maps a ``kill:S`` marker to an event: once the marker is there (its process now
    sleeps S seconds before killing itself) and the event holds, the test SIGKILLs the marker's process
    itself. A kill that must land after something asynchronous happened (Ray Train registering a
    checkpoint) waits for that instead of for a guessed number of seconds, which a busy machine overruns.

    Without ``kill_at`` the CLI runs to its end (the worker kills still land on their events).

    Returns what happened: exit code, whether it was killed, the stage directories finished at the
    kill, and the driver's descendants at the kill (``family``: the leak check waits for them later).
    """
    env = {**os.environ, ENV: faults, DIR_ENV: str(markers or run_dir.parent / "markers"),
           "RAY_raylet_start_wait_time_s": "120"}  # a loaded CI machine starts Ray slowly
    with open(log, "ab") as out:
        proc = subprocess.Popen(_command(run_dir, checkpoint, stages, settings), env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    outcome: dict = {"killed": False, "family": [], "worker_kills": {}}
    pending = dict(worker_kills or {})
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        if kill_at is None and not pending:
            outcome["rc"] = proc.wait(timeout=START_TIMEOUT_S)
            return outcome
        while True:
            for name, event in list(pending.items()):
                marker = _read_marker(markers, name)
                if marker is not None and event():
                    try:
                        os.kill(marker["pid"], signal.SIGKILL)
                    except ProcessLookupError:
                        pass  # it ended itself (its S seconds ran out): the same kill, later
                    outcome["worker_kills"][name] = marker["pid"]
                    del pending[name]
            if not pending and kill_at is not None and _read_marker(markers, kill_at) is not None and (
                    kill_when is None or kill_when()):
                break
            if kill_at is None and not pending:
                outcome["rc"] = proc.wait(timeout=max(deadline - time.monotonic(), 1))
                return outcome
            if proc.poll() is not None:
                pytest.fail(f"the CLI exited ({proc.returncode}) before reaching {kill_at} (worker kills still "
                            f"pending: {sorted(pending)}; registered checkpoints {_snapshots(run_dir)}):\n"
                            f"{log.read_text()[-4000:]}")
            if time.monotonic() > deadline:
                seen = sorted(p.name for p in markers.glob("*.json")) if markers.is_dir() else []
                pytest.fail(f"{kill_at} (and its event) not reached in {START_TIMEOUT_S}s; markers {seen}, "
                            f"worker kills pending {sorted(pending)}, registered checkpoints "
                            f"{_snapshots(run_dir)}:\n{log.read_text()[-4000:]}")
            time.sleep(0.1)
        family = psutil.Process(proc.pid).children(recursive=True)
        outcome["finished_at_kill"] = sorted(p.parent.name for p in run_dir.glob("*/_SUCCESS.json"))
        os.kill(proc.pid, signal.SIGKILL)  # the driver only
        outcome["rc"] = proc.wait(timeout=30)
        outcome["killed"] = True
        outcome["family"] = family
        # Leaks: Ray's processes must go by themselves. Waiting for them here also keeps the next
        # invocation's Ray start from racing the old instance's agents (start-up timeouts on a busy machine).
        _, alive = psutil.wait_procs(family, timeout=LEAK_GRACE_S)
        outcome["leaked"] = [f"{p.pid}:{_name(p)}" for p in alive]
        return outcome
    finally:
        if not outcome["killed"]:
            _kill_family(proc)


def _name(p: psutil.Process) -> str:
    try:
        return " ".join(p.cmdline())[:80]
    except psutil.Error:
        return "?"


def _kill_family(proc: subprocess.Popen) -> None:
    """Clean-up whatever is left: the process group, then any stray descendant."""
    try:
        family = psutil.Process(proc.pid).children(recursive=True)
    except psutil.Error:
        family = []
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    for p in family:
        try:
            p.kill()
        except psutil.Error:
            pass
    if proc.poll() is None:
        proc.kill()
        proc.wait(timeout=30)


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory, offline_checkpoint) -> Path:
    base = tmp_path_factory.mktemp("reference")
    run_dir = base / "run"
    outcome = _invoke(run_dir, offline_checkpoint, base / "cli.log")
    assert outcome["rc"] == 0, f"exit code {outcome['rc']}:\n" + (base / "cli.log").read_text()[-4000:]
    return run_dir


@pytest.fixture(scope="module")
def faulted_run(tmp_path_factory, offline_checkpoint, reference_run):
    """Five invocations of the same command in one run directory, each killed at its fault point."""
    base = tmp_path_factory.mktemp("faulted")
    run_dir, log = base / "run", base / "cli.log"
    steps = [
        # 1: an embed actor dies on its 2nd batch; the driver is killed while shard pool/1 is written.
        ("embed.batch@2=kill,embed.write@pool-1=hang", "embed.write.hang", None, None),
        # 2: embed resumes; a k-means actor dies in its 2nd Lloyd pass; the driver is killed after iteration 3.
        ("cluster.assign@2=kill,cluster.flat_iteration@3=hang", "cluster.flat_iteration.hang", None, None),
        # 3: k-means resumes from its checkpoint; the driver is killed while influence accumulates sketches.
        ("influence.accumulate=hang", "influence.accumulate.hang", None, None),
        # 4: a Ray Train worker of influence dies mid-accumulation; a training worker dies after the
        #    baseline's epoch 1 and the driver is killed after the curated run's epoch 1, each only once
        #    Ray Train has registered that epoch's checkpoint (the test kills the parked worker then; its
        #    own kill after KILL_PARK_S is the fallback should the test die).
        (f"influence.accumulate=kill,train.epoch@baseline-1=kill:{KILL_PARK_S},train.epoch@influencespace-1=hang",
         "train.epoch.hang", lambda: _registered(run_dir, "influencespace", 1),
         {"train.epoch.kill": lambda: _registered(run_dir, "baseline", 1)}),
        # 5: no fault: train resumes and the pipeline finishes.
        ("", None, None, None),
    ]
    outcomes = []
    try:
        for number, (faults, kill_at, kill_when, worker_kills) in enumerate(steps, start=1):
            markers = base / f"markers-{number}"
            outcome = _invoke(run_dir, offline_checkpoint, log, faults, markers, kill_at, kill_when, worker_kills)
            outcome["markers"] = markers
            outcomes.append(outcome)
            if kill_at is None:
                assert outcome["rc"] == 0, f"invocation {number} exit code {outcome['rc']}:\n" + log.read_text()[-4000:]
        yield {"run_dir": run_dir, "outcomes": outcomes, "log": log}
    finally:
        for outcome in outcomes:  # clean-up, whatever happened
            for p in outcome["family"]:
                try:
                    p.kill()
                except psutil.Error:
                    pass


# --------------------------------------------------------------------------------------------------
# Helpers for the checks


def _manifest(run_dir: Path, stage: str) -> dict:
    return json.loads((run_dir / stage / "_SUCCESS.json").read_text())


def _tables(directory: Path) -> dict[str, object]:
    return {str(p.relative_to(directory)): pq.read_table(p) for p in sorted(directory.rglob("*.parquet"))}


def _assert_same_tables(ours: Path, reference: Path) -> int:
    mine, theirs = _tables(ours), _tables(reference)
    assert sorted(mine) == sorted(theirs), f"files of {ours}: {sorted(mine)}; uninterrupted run: {sorted(theirs)}"
    for name, table in mine.items():
        assert table.equals(theirs[name]), (
            f"{name} differs from the uninterrupted run: {table.num_rows} rows vs {theirs[name].num_rows}, "
            f"first different column {next((c for c in table.column_names if not table[c].equals(theirs[name][c])), None)}"
        )
    return sum(t.num_rows for t in mine.values())


def _ids(directory: Path) -> list[str]:
    return [i for p in sorted(directory.rglob("*.parquet")) for i in pq.read_table(p, columns=["id"])["id"].to_pylist()]


def _worker_fault(outcome: dict, name: str) -> dict:
    marker = _read_marker(outcome["markers"], name)
    seen = sorted(p.name for p in outcome["markers"].glob("*.json")) if outcome["markers"].is_dir() else []
    assert marker is not None, f"fault {name} never fired (markers: {seen})"
    assert not psutil.pid_exists(marker["pid"]) or psutil.Process(marker["pid"]).status() == psutil.STATUS_ZOMBIE, (
        f"the process {marker} of fault {name} is still alive: {_name(psutil.Process(marker['pid']))}"
    )
    return marker


def _check_driver_kill(outcome: dict, stage: str, hang: str) -> None:
    assert outcome["killed"] and outcome["rc"] == -signal.SIGKILL, f"killed {outcome['killed']}, exit code {outcome['rc']}"
    assert _read_marker(outcome["markers"], hang) is not None, f"no {hang} marker in {outcome['markers']}"
    assert stage not in outcome["finished_at_kill"], f"{stage} had finished before the kill: {outcome['finished_at_kill']}"


def _load_weights(path: Path) -> dict:
    import torch

    return torch.load(path, weights_only=True)


# --------------------------------------------------------------------------------------------------
# embed


def _check_embed(run_dir: Path, reference: Path) -> None:
    for split in ("pool", "validation", "test", "rejects"):
        _assert_same_tables(run_dir / "embed" / split, reference / "embed" / split)
    # Every input id exactly once: embedded or rejected with a reason.
    inputs = _ids(run_dir / "data" / "pool")
    embedded, rejected = _ids(run_dir / "embed" / "pool"), _ids(run_dir / "embed" / "rejects")
    assert len(set(inputs)) == len(inputs), f"{len(inputs) - len(set(inputs))} duplicate input ids"
    accounted = embedded + [i for i in rejected if i in set(inputs)]
    assert sorted(accounted) == sorted(inputs), (
        f"{len(inputs)} inputs, {len(accounted)} embedded or rejected; missing {sorted(set(inputs) - set(accounted))[:10]}, "
        f"twice {sorted(i for i in set(accounted) if accounted.count(i) > 1)[:10]}"
    )
    counts = _manifest(run_dir, "embed")["counts"]
    assert counts["pool"] + counts["pool_rejected"] == counts["pool_input"] == len(inputs), (counts, len(inputs))


def test_driver_sigkill_in_embed_then_rerun_resumes_with_equal_shards(faulted_run, reference_run, record_fault):
    run_dir, first = faulted_run["run_dir"], faulted_run["outcomes"][0]
    _check_driver_kill(first, "embed", "embed.write.hang")
    assert first["finished_at_kill"] == ["data"], first["finished_at_kill"]
    manifest = _manifest(run_dir, "embed")
    assert manifest["resumed"] is True, manifest
    assert manifest["extra"]["shards_reused"] >= 1 and manifest["extra"]["shards_embedded"] >= 1, manifest["extra"]
    _check_embed(run_dir, reference_run)
    record_fault("driver SIGKILL while embed shards are written", "rerun resumed: reused finished shards, embedded the rest; equal shards")


def test_embed_actor_sigkill_is_restarted_and_the_batch_retried(faulted_run, reference_run, record_fault):
    _worker_fault(faulted_run["outcomes"][0], "embed.batch.kill")
    _check_embed(faulted_run["run_dir"], reference_run)
    # The restarted actor rebuilt itself (equal shards above) from the encoder checkpoint it reads by URI.
    # Ray still logs that the actor "has constructor arguments in the object store": that argument is
    # Ray Data's own MapTransformer, which it puts in the object store for every actor pool; the driver
    # owns and pins it for the dataset's lifetime. Our own arguments are small (test_stage_ray.py).
    assert list((faulted_run["run_dir"] / "embed" / "_encoder").glob("*.pt"))
    record_fault("embed actor SIGKILL on its 2nd batch", "Ray Data restarted the actor and retried the batch; equal shards")


# --------------------------------------------------------------------------------------------------
# cluster


def _check_cluster(run_dir: Path, reference: Path) -> None:
    ours, theirs = np.load(run_dir / "cluster" / "centroids.npy"), np.load(reference / "cluster" / "centroids.npy")
    np.testing.assert_array_equal(ours, theirs, err_msg="centroids differ from the uninterrupted run")
    assert (run_dir / "cluster" / "centroids.npy").read_bytes() == (reference / "cluster" / "centroids.npy").read_bytes()
    _assert_same_tables(run_dir / "cluster" / "assignments", reference / "cluster" / "assignments")
    assigned, embedded = sorted(_ids(run_dir / "cluster" / "assignments")), sorted(_ids(run_dir / "embed" / "pool"))
    assert assigned == embedded, f"{len(assigned)} assigned ids vs {len(embedded)} embedded; symmetric difference {sorted(set(assigned) ^ set(embedded))[:10]}"


def test_driver_sigkill_in_kmeans_then_rerun_resumes_from_the_iteration_checkpoint(faulted_run, reference_run, record_fault):
    run_dir, second = faulted_run["run_dir"], faulted_run["outcomes"][1]
    _check_driver_kill(second, "cluster", "cluster.flat_iteration.hang")
    manifest = _manifest(run_dir, "cluster")
    assert manifest["resumed"] is True, manifest
    log = json.loads((run_dir / "cluster" / "kmeans_log.json").read_text())
    assert log["resumed_after"] == {"flat": 3}, log["resumed_after"]
    reference_log = json.loads((reference_run / "cluster" / "kmeans_log.json").read_text())
    ours, theirs = [h["objective"] for h in log["iterations"]], [h["objective"] for h in reference_log["iterations"]]
    assert ours == theirs, f"objectives resumed {ours} vs uninterrupted {theirs}"
    _check_cluster(run_dir, reference_run)
    record_fault("driver SIGKILL after k-means iteration 3", "rerun resumed after iteration 3; bitwise-equal centroids and assignments")


def test_kmeans_actor_sigkill_is_restarted_and_the_pass_retried(faulted_run, reference_run, record_fault):
    _worker_fault(faulted_run["outcomes"][1], "cluster.assign.kill")
    _check_cluster(faulted_run["run_dir"], reference_run)
    record_fault("k-means shard actor SIGKILL in its 2nd Lloyd pass", "actor restarted, re-read its shards, pass retried; bitwise-equal result")


# --------------------------------------------------------------------------------------------------
# influence

INFLUENCE_RTOL, INFLUENCE_ATOL = 1e-5, 1e-9


def _check_influence(run_dir: Path, reference: Path) -> None:
    ours = pq.read_table(run_dir / "influence" / "cluster_scores.parquet").to_pydict()
    theirs = pq.read_table(reference / "influence" / "cluster_scores.parquet").to_pydict()
    assert sorted(ours) == sorted(theirs), (sorted(ours), sorted(theirs))
    for column in ("cluster", "size", "n_sampled", "n_dropped"):
        assert ours[column] == theirs[column], f"{column}: {ours[column]} vs uninterrupted {theirs[column]}"
    for column in ours:
        if column.startswith(("influence", "stderr", "ci_")):
            np.testing.assert_allclose(ours[column], theirs[column], rtol=INFLUENCE_RTOL, atol=INFLUENCE_ATOL, err_msg=column)


def test_driver_sigkill_during_influence_accumulation_then_rerun_finishes(faulted_run, reference_run, record_fault):
    run_dir, third = faulted_run["run_dir"], faulted_run["outcomes"][2]
    _check_driver_kill(third, "influence", "influence.accumulate.hang")
    assert "cluster" in third["finished_at_kill"], third["finished_at_kill"]
    assert _manifest(run_dir, "influence")["resumed"] is True, _manifest(run_dir, "influence")
    _check_influence(run_dir, reference_run)
    record_fault("driver SIGKILL while influence workers accumulate sketches",
                 f"rerun recomputed the stage; scores within rtol {INFLUENCE_RTOL}")


def test_influence_train_worker_sigkill_restarts_the_worker_group(faulted_run, reference_run, record_fault):
    _worker_fault(faulted_run["outcomes"][3], "influence.accumulate.kill")
    _check_influence(faulted_run["run_dir"], reference_run)
    record_fault("Ray Train worker SIGKILL during influence accumulation",
                 f"FailureConfig restarted the group; scores within rtol {INFLUENCE_RTOL}")


# --------------------------------------------------------------------------------------------------
# train

TRAIN_ATOL = 1e-5


def _check_run(run_dir: Path, reference: Path, variant: str) -> dict:
    ours = json.loads((run_dir / "train" / variant / "seed-0" / "run.json").read_text())
    theirs = json.loads((reference / "train" / variant / "seed-0" / "run.json").read_text())
    assert (ours["rows"], ours["steps"]) == (theirs["rows"], theirs["steps"]), (
        f"rows, steps {ours['rows']}, {ours['steps']} vs uninterrupted {theirs['rows']}, {theirs['steps']}"
    )
    np.testing.assert_allclose([h["loss"] for h in ours["history"]], [h["loss"] for h in theirs["history"]], atol=TRAIN_ATOL)
    mine = _load_weights(run_dir / "train" / variant / "seed-0" / "model.pt")
    ref = _load_weights(reference / "train" / variant / "seed-0" / "model.pt")
    assert sorted(mine) == sorted(ref), (sorted(mine), sorted(ref))
    for name, tensor in mine.items():
        np.testing.assert_allclose(tensor.numpy(), ref[name].numpy(), atol=TRAIN_ATOL, err_msg=name)
    return ours


def test_training_worker_sigkill_restores_the_latest_checkpoint(faulted_run, reference_run, record_fault):
    _worker_fault(faulted_run["outcomes"][3], "train.epoch.kill")
    record = _check_run(faulted_run["run_dir"], reference_run, "baseline")
    # epoch 2 trained from the epoch-1 checkpoint, not from scratch
    assert record["restored_after_epoch"] == 1, (
        f"restored_after_epoch {record['restored_after_epoch']}; registered checkpoints {_snapshots(faulted_run['run_dir'])}"
    )
    record_fault("Ray Train worker SIGKILL after epoch 1 of a training run",
                 f"FailureConfig restarted the group from the epoch-1 checkpoint; weights within {TRAIN_ATOL}")


def test_driver_sigkill_in_train_then_rerun_continues_the_interrupted_run(faulted_run, reference_run, record_fault):
    run_dir, fourth = faulted_run["run_dir"], faulted_run["outcomes"][3]
    _check_driver_kill(fourth, "train", "train.epoch.hang")
    assert "curate" in fourth["finished_at_kill"], fourth["finished_at_kill"]
    manifest = _manifest(run_dir, "train")
    assert manifest["resumed"] is True and manifest["counts"]["runs"] == 2, manifest
    record = _check_run(run_dir, reference_run, "influencespace")
    # from the checkpoint the killed attempt left
    assert record["restored_after_epoch"] == 1, (
        f"restored_after_epoch {record['restored_after_epoch']}; registered checkpoints {_snapshots(run_dir)}"
    )
    record_fault("driver SIGKILL after epoch 1 of the curated training run",
                 f"rerun skipped the finished run, went on from the epoch-1 checkpoint; weights within {TRAIN_ATOL}")


OPEN_CLIP = ("train.target=open_clip", "train.batch_size=16")  # the built-in 32 px CLIP, from the raw pairs


def _upstream_copy(reference: Path, run_dir: Path) -> None:
    """The reference's finished stages up to curate (their manifests point at the reference's files)."""
    for stage in ("data", "embed", "cluster", "influence", "curate"):
        shutil.copytree(reference / stage, run_dir / stage)


def test_open_clip_training_worker_sigkill_restores_the_latest_checkpoint(reference_run, offline_checkpoint,
                                                                           tmp_path, record_fault):
    """The open_clip target (a whole CLIP from pixels) resumes as the heads do: a Ray Train worker
    SIGKILLed once the baseline's epoch-1 checkpoint is registered, the group restarted from it."""
    clean, killed = tmp_path / "clean" / "run", tmp_path / "killed" / "run"
    for run_dir in (clean, killed):
        _upstream_copy(reference_run, run_dir)
    outcome = _invoke(clean, offline_checkpoint, tmp_path / "clean.log", stages="train", settings=OPEN_CLIP)
    assert outcome["rc"] == 0, f"exit code {outcome['rc']}:\n" + (tmp_path / "clean.log").read_text()[-4000:]
    markers = tmp_path / "markers"
    outcome = _invoke(killed, offline_checkpoint, tmp_path / "killed.log", f"train.epoch@baseline-1=kill:{KILL_PARK_S}",
                      markers, worker_kills={"train.epoch.kill": lambda: _registered(killed, "baseline", 1)},
                      stages="train", settings=OPEN_CLIP)
    assert outcome["rc"] == 0, f"exit code {outcome['rc']}:\n" + (tmp_path / "killed.log").read_text()[-4000:]
    _worker_fault({**outcome, "markers": markers}, "train.epoch.kill")
    record = _check_run(killed, clean, "baseline")
    assert record["target"]["kind"] == "open_clip", record["target"]
    assert record["restored_after_epoch"] == 1, (
        f"restored_after_epoch {record['restored_after_epoch']}; registered checkpoints {_snapshots(killed)}"
    )
    _check_run(killed, clean, "influencespace")
    record_fault("Ray Train worker SIGKILL after epoch 1 of an open_clip (from pixels) training run",
                 f"FailureConfig restarted the group from the epoch-1 checkpoint; weights within {TRAIN_ATOL}")


# --------------------------------------------------------------------------------------------------
# whole run


def test_killed_drivers_leave_no_ray_processes_behind(faulted_run, record_fault):
    killed = [o for o in faulted_run["outcomes"] if o["killed"]]
    assert len(killed) == 4, f"{len(killed)} of {len(faulted_run['outcomes'])} invocations killed"
    for outcome in killed:
        assert outcome["family"], "the driver had started Ray"
        assert outcome["leaked"] == [], f"processes outlived their killed driver by {LEAK_GRACE_S}s: {outcome['leaked']}"
    record_fault("Ray processes left behind by a SIGKILLed driver", f"none alive {LEAK_GRACE_S}s after each kill",
                 injected=0)


def test_no_row_lost_across_the_killed_run(faulted_run, reference_run, record_fault):
    run_dir = faulted_run["run_dir"]
    inputs = set(_ids(run_dir / "data" / "pool"))
    curated = pq.read_table(run_dir / "curate" / "manifest").to_pydict() if (run_dir / "curate" / "manifest").is_dir() else None
    embedded, rejected = set(_ids(run_dir / "embed" / "pool")), set(_ids(run_dir / "embed" / "rejects"))
    lost = inputs - embedded - rejected
    assert not lost and not (embedded & rejected), f"lost {sorted(lost)[:10]}, embedded and rejected {sorted(embedded & rejected)[:10]}"
    if curated is not None:
        ids, reference_ids = sorted(curated["id"]), sorted(_ids(reference_run / "curate" / "manifest"))
        assert ids == reference_ids, f"{len(ids)} curated ids vs {len(reference_ids)}; differ {sorted(set(ids) ^ set(reference_ids))[:10]}"
    for stage in ("data", "embed", "cluster", "influence", "curate", "train"):
        ours, theirs = _manifest(run_dir, stage)["counts"], _manifest(reference_run, stage)["counts"]
        assert ours == theirs, f"{stage} counts {ours} vs uninterrupted {theirs}"
    record_fault("whole run under 4 driver kills and 4 worker kills", "every stage's counts equal the uninterrupted run",
                 injected=0, rows_lost=len(lost))
