"""A simulated multi-node Ray cluster running the real stages (driven by tests/test_placement_multinode.py).

Run in a subprocess of its own (``python -m tests.multinode_scenario WORK CHECKPOINT``), so that the
session's local Ray (tests/conftest.py ``ray_cluster``) and this cluster never meet in one process.
``ray.cluster_utils.Cluster`` starts, all on 127.0.0.1 and under a private ``RAY_TMPDIR``:

* a head with ``CPU: 0`` (drivers only, as in cluster_configs/), with the dashboard for the state API;
* two "GPU" nodes carrying the ``gpu_node`` custom resource and two CPU nodes carrying ``cpu_node``
  (the markers of cluster_configs/ and the ``cluster`` preset; no real GPUs: ``use_gpu`` stays off).

Part 1 (placement): data → embed → cluster → influence → curate → train on the ``test`` preset with
``runtime.gpu_node_resource=gpu_node`` / ``cpu_node_resource=cpu_node``; after each stage the actors
Ray's state API lists for the first time are attributed to that stage, with the type of the node
they ran on.

Part 2 (node loss): k-means, then influence, again into a second run directory on the same embeddings.
A k-means worker is held inside its third Lloyd pass, an influence worker after summing its sketches
(fault points of influencespace/faults.py, ``hang``), and its node is removed with
``Cluster.remove_node`` meanwhile. Each stage must finish in the same call.

Everything observed goes to ``WORK/report.json``; the test asserts on it and on the run directories.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from pathlib import Path

LOOPBACK = "127.0.0.1"
STAGES = ("data", "embed", "cluster", "influence", "curate", "train")
# The class names of the actors doing each stage's work (infrastructure actors are reported, not checked).
FAULTS_ENV, FAULTS_DIR_ENV = "INFLUENCESPACE_FAULTS", "INFLUENCESPACE_FAULTS_DIR"
KMEANS_FAULT = "cluster.assign@3"  # a k-means worker in its third Lloyd pass
INFLUENCE_FAULT = "influence.accumulate@0"  # an influence worker with its sketches summed, before the all-reduce
WORK_ACTORS = {
    "embed": "EmbedActor",
    "cluster": "ShardWorker",
    "influence": "RayTrainWorker",
    "train": "RayTrainWorker",
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


def start_cluster():
    from ray.cluster_utils import Cluster

    head = {
        "num_cpus": 0,
        "node_ip_address": LOOPBACK,
        "include_dashboard": True,  # the state API (ray.util.state) is served by the dashboard
        "dashboard_host": LOOPBACK,
        "dashboard_port": _free_port(),
    }
    cluster = Cluster(initialize_head=True, head_node_args=head)
    types = {cluster.head_node.node_id: "head"}
    nodes: dict[str, list] = {"gpu": [], "cpu": []}
    for kind in ("gpu", "gpu", "cpu", "cpu"):
        node = cluster.add_node(num_cpus=2, resources={f"{kind}_node": 1}, node_ip_address=LOOPBACK)
        nodes[kind].append(node)
        types[node.node_id] = kind
    cluster.wait_for_nodes()
    global DASHBOARD
    DASHBOARD = f"http://{LOOPBACK}:{head['dashboard_port']}"
    return cluster, nodes, types


DASHBOARD = ""  # the state API is asked at this address, never found by scanning for Ray processes


def list_all_actors() -> list[dict]:
    from ray.util.state import list_actors

    return [
        {
            "actor_id": a.actor_id,
            "class_name": a.class_name,
            "node_id": a.node_id,
            "state": a.state,
            "pid": a.pid,
            "num_restarts": int(a.num_restarts or 0),
            "resources": dict(a.required_resources or {}),
        }
        for a in list_actors(address=DASHBOARD, detail=True, limit=10_000, raise_on_missing_output=False)
    ]


def placement_run(config, types: dict[str, str]) -> dict:
    from influencespace.stages import run_pipeline

    seen: set[str] = set()
    per_stage: dict[str, list[dict]] = {}
    seconds: dict[str, float] = {}
    for name in STAGES:
        t0 = time.perf_counter()
        run_pipeline(config, [name], report=lambda line: print(line, flush=True))
        seconds[name] = round(time.perf_counter() - t0, 1)
        new = [a for a in list_all_actors() if a["actor_id"] not in seen]
        seen.update(a["actor_id"] for a in new)
        for actor in new:
            actor["node_type"] = types.get(actor["node_id"], "unknown")
        per_stage[name] = new
    return {"actors": per_stage, "seconds": seconds}


def _new_actors(before: set[str], class_name: str, types: dict[str, str]) -> list[dict]:
    actors = [a for a in list_all_actors() if a["actor_id"] not in before and a["class_name"] == class_name]
    for actor in actors:
        actor["node_type"] = types.get(actor["node_id"], "unknown")
    return actors


def _remove(cluster, nodes: dict, types: dict[str, str], node_id: str, during: str) -> dict:
    victim = next(n for kind in nodes.values() for n in kind if n.node_id == node_id)
    t0 = time.perf_counter()
    cluster.remove_node(victim)
    for kind in nodes.values():
        if victim in kind:
            kind.remove(victim)
    print(f"removed node {node_id[:8]} ({types[node_id]}) during {during}", flush=True)
    return {
        "removed_node": node_id,
        "removed_type": types[node_id],
        "during": during,
        "remove_seconds": round(time.perf_counter() - t0, 2),
    }


def node_loss(stage, config, upstream: dict, fault: str, class_name: str, cluster, nodes, types) -> dict:
    """Run ``stage`` with the node of the worker that reaches ``fault`` removed while it waits there.

    The fault point (influencespace/faults.py, armed for the whole cluster with ``=hang``) was
    disarmed by its marker file; deleting the marker arms it. The first worker to get there writes the
    marker with its pid and hangs; a watcher thread finds that worker's node with the state API and
    removes the node, so the loss lands inside the worker's task, not between two calls.
    """
    import threading

    from influencespace.stages import run_stage

    before = {a["actor_id"] for a in list_all_actors()}
    marker = Path(os.environ[FAULTS_DIR_ENV], f"{fault.split('@')[0]}.hang.json")
    marker.unlink()  # arm
    event: dict = {}
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            try:
                pid = json.loads(marker.read_text())["pid"]
            except (FileNotFoundError, ValueError):  # not there yet, or being written
                pid = None
            if pid is not None:
                mine = [a for a in _new_actors(before, class_name, types) if a["pid"] == pid and a["state"] == "ALIVE"]
                if mine:
                    event.update(_remove(cluster, nodes, types, mine[0]["node_id"], f"{stage.name} at {fault}"))
                    return
            time.sleep(0.2)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    t0 = time.perf_counter()
    try:
        outcome = run_stage(config, stage, upstream=upstream)
    finally:
        done.set()
        watcher.join(timeout=60)
    event.update(
        stage_seconds=round(time.perf_counter() - t0, 1),
        status=outcome.status,
        workers=_new_actors(before, class_name, types),
    )
    return event


def main(work: str, checkpoint: str) -> None:
    os.environ.update(
        RAY_AUTH_MODE="disabled", RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_USAGE_STATS_ENABLED="0",
    )  # fmt: skip
    from influencespace.config import load_config
    from influencespace.stages import read_manifest

    # Fault points armed on every node, each disarmed by its marker until its node-loss run (see node_loss).
    markers = Path(work, "fault-markers")
    markers.mkdir()
    for fault in (KMEANS_FAULT, INFLUENCE_FAULT):
        (markers / f"{fault.split('@')[0]}.hang.json").write_text("")
    os.environ[FAULTS_ENV] = f"{KMEANS_FAULT}=hang,{INFLUENCE_FAULT}=hang"
    os.environ[FAULTS_DIR_ENV] = str(markers)
    t0 = time.perf_counter()
    cluster, nodes, types = start_cluster()
    report: dict = {"nodes": types, "startup_seconds": round(time.perf_counter() - t0, 1)}
    print(f"cluster up in {report['startup_seconds']}s: {sorted(types.values())}", flush=True)
    try:
        common = [
            f"runtime.ray_address={cluster.address}",
            "runtime.gpu_node_resource=gpu_node",
            "runtime.cpu_node_resource=cpu_node",
            f"embed.pretrained={checkpoint}",
            "embed.num_actors=2",
            "cluster.num_workers=2",
            "influence.num_workers=2",
            "train.num_workers=2",
            "curate.comparison_policies=[]",
        ]
        config = load_config("test", [f"run_dir={work}/placement", *common])
        report["placement"] = placement_run(config, types)
        from influencespace.cluster.stage import ClusterStage
        from influencespace.influence.stage import InfluenceStage

        loss_config = load_config("test", [f"run_dir={work}/node-loss", *common])
        embed = read_manifest(config, "embed")
        report["kmeans_node_loss"] = node_loss(
            ClusterStage(), loss_config, {"embed": embed}, KMEANS_FAULT, "ShardWorker", cluster, nodes, types
        )
        upstream = {"embed": embed, "cluster": read_manifest(loss_config, "cluster")}
        report["influence_node_loss"] = node_loss(
            InfluenceStage(), loss_config, upstream, INFLUENCE_FAULT, "RayTrainWorker", cluster, nodes, types
        )
    finally:
        report["total_seconds"] = round(time.perf_counter() - t0, 1)
        Path(work, "report.json").write_text(json.dumps(report, indent=1))
        import ray

        ray.shutdown()
        cluster.shutdown()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
