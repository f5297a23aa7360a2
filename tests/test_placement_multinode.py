"""Placement on node types, and losing a node mid-stage, on a simulated multi-node Ray cluster.

tests/multinode_scenario.py starts ``ray.cluster_utils.Cluster`` (a ``CPU: 0`` head, two nodes with the
``gpu_node`` resource, two with ``cpu_node``; all on 127.0.0.1) in a subprocess of its own, so the
session's local Ray (``ray_cluster`` in conftest.py) is neither joined nor disturbed whatever the test
order. It runs the real stages and reports, from Ray's state API, on which node type every actor ran.
One scenario run serves all tests of this module: 4–5 minutes on 2 heavily shared cores (cluster
start-up, the six stages, the two node-loss runs). The node-loss runs use the fault points of
influencespace/faults.py (``hang``) to hold a worker inside its task while its node is removed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest

from influencespace import storage

REPO = Path(__file__).parents[1]
# The scenario's own limit, and pytest-timeout's for the module's first test (whose setup runs it) above
# it: with the suite's 600 s default, pytest killed the scenario at 10 minutes before its own limit could
# fire and report the scenario's output (a loaded run took longer than 10 minutes; docs/testing.md).
SCENARIO_TIMEOUT = 1500
pytestmark = pytest.mark.timeout(SCENARIO_TIMEOUT + 300)
# (class name of the actors doing the stage's work, node type it must run on, how many)
EXPECTED = {
    "embed": ("MapWorker(MapBatches(EmbedActor))", "gpu", 2),
    "cluster": ("ShardWorker", "cpu", 2),
    "influence": ("RayTrainWorker", "gpu", 2),
    "train": ("RayTrainWorker", "gpu", 2),
}


@pytest.fixture(scope="module")
def scenario(tmp_path_factory, offline_checkpoint):
    work = tmp_path_factory.mktemp("multinode")
    # Short and private: Ray's socket paths have a length limit, and the cluster's address file must not
    # replace the one of any other Ray on this machine (/tmp/ray/ray_current_cluster).
    ray_tmp = tempfile.mkdtemp(prefix="rmn-", dir="/tmp")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(RAY_TMPDIR=ray_tmp, RAY_AUTH_MODE="disabled", RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0")
    command = [sys.executable, "-m", "tests.multinode_scenario", str(work), str(offline_checkpoint)]
    try:
        done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=SCENARIO_TIMEOUT)
    except subprocess.TimeoutExpired as exc:  # say where the scenario was, not only that it ran out of time
        tail = "".join(p.decode() if isinstance(p, bytes) else (p or "") for p in (exc.stdout, exc.stderr))
        pytest.fail(f"the multinode scenario ran past {SCENARIO_TIMEOUT} s; its output ended with:\n{tail[-6000:]}")
    finally:
        subprocess.run(["rm", "-rf", ray_tmp], check=False)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-6000:]
    report = json.loads((work / "report.json").read_text())
    return work, report


def _types(report: dict) -> dict[str, int]:
    kinds = list(report["nodes"].values())
    return {kind: kinds.count(kind) for kind in set(kinds)}


@pytest.mark.ray
@pytest.mark.slow
def test_each_stage_runs_on_the_node_type_it_asks_for(scenario):
    work, report = scenario
    assert _types(report) == {"head": 1, "gpu": 2, "cpu": 2}
    actors = report["placement"]["actors"]
    for stage, (class_name, node_type, count) in EXPECTED.items():
        workers = [a for a in actors[stage] if a["class_name"] == class_name]
        assert len(workers) == count, (stage, actors[stage])
        assert {a["node_type"] for a in workers} == {node_type}, (stage, workers)
        marker = f"{node_type}_node"
        # The request carries the marker (Ray Train's placement group renames it to <marker>_group_…).
        assert all(any(r.startswith(marker) for r in a["resources"]) for a in workers), (stage, workers)
    # Nothing of ours on the head (CPU: 0), and nothing of one type on the other type's nodes.
    ours = [a for stage in EXPECTED for a in actors[stage] if a["class_name"] == EXPECTED[stage][0]]
    assert not [a for a in ours if a["node_type"] in ("head", "unknown")]
    run = work / "placement"
    embed = storage.read_json(str(run / "embed" / "_SUCCESS.json"))
    assert embed["counts"]["pool"] + embed["counts"]["pool_rejected"] == 300
    assert storage.read_json(str(run / "train" / "_SUCCESS.json"))["counts"]["runs"] == 2


def _assignments(run: Path):
    table = storage.read_table(str(run / "cluster" / "assignments"), columns=["id", "cluster"]).sort_by("id")
    return table.column("id").to_pylist(), table.column("cluster").to_numpy()


def _node_loss(report: dict, key: str, node_type: str, during: str) -> tuple[dict, list[dict]]:
    """The node-loss event: the right node type removed at the right point, the stage finished in the
    same call (not by a rerun), and every worker that ever ran on the node type asked for."""
    event = report[key]
    assert event["removed_type"] == node_type and event["during"] == during
    assert event["status"] == "ran"
    workers = event["workers"]
    assert all(a["node_type"] == node_type for a in workers), workers
    return event, workers


@pytest.mark.ray
@pytest.mark.slow
def test_kmeans_survives_losing_a_cpu_node_mid_stage(scenario):
    work, report = scenario
    event, workers = _node_loss(report, "kmeans_node_loss", "cpu", "cluster at cluster.assign@3")
    assert len(workers) == 2
    restarted = [a for a in workers if a["num_restarts"] >= 1]
    assert len(restarted) == 1 and restarted[0]["node_id"] != event["removed_node"]
    log = storage.read_json(str(work / "node-loss" / "cluster" / "kmeans_log.json"))
    assert not log["resumed_after"]  # no resume from a checkpoint: Ray restarted the worker
    # Every embedded id assigned exactly once, and the same clustering as the undisturbed run.
    pool = storage.read_table(str(work / "placement" / "embed" / "pool"), columns=["id"]).column("id").to_pylist()
    ids, clusters = _assignments(work / "node-loss")
    assert len(ids) == len(set(ids)) == len(pool) and set(ids) == set(pool)
    same_ids, same_clusters = _assignments(work / "placement")
    assert ids == same_ids and np.array_equal(clusters, same_clusters)
    centroids = [np.load(work / run / "cluster" / "centroids.npy") for run in ("node-loss", "placement")]
    np.testing.assert_allclose(centroids[0], centroids[1], rtol=0, atol=1e-6)


@pytest.mark.ray
@pytest.mark.slow
def test_influence_survives_losing_a_gpu_node_mid_stage(scenario):
    work, report = scenario
    event, workers = _node_loss(report, "influence_node_loss", "gpu", "influence at influence.accumulate@0")
    # The first group lost a worker with its node; Ray Train (FailureConfig) started a new group.
    assert len(workers) > 2, workers
    assert len([a for a in workers if a["node_id"] != event["removed_node"]]) >= 2, workers
    scores = [
        storage.read_table(str(work / run / "influence" / "cluster_scores.parquet")).sort_by("cluster")
        for run in ("node-loss", "placement")
    ]
    clusters = scores[0].column("cluster").to_pylist()
    assert clusters == list(range(8))  # every cluster scored exactly once
    np.testing.assert_allclose(
        scores[0].column("influence").to_numpy(), scores[1].column("influence").to_numpy(), rtol=1e-4, atol=1e-9
    )
