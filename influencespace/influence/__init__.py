"""Cluster influence (Stage 3): how much each cluster of the pool helps or hurts a validation loss.

Pure logic (torch / numpy, no Ray): :mod:`.tasks` (the model, loss and measurement; registry),
:mod:`.proxy` (warm start, retraining), :mod:`.gradients` (per-example gradients with torch.func),
:mod:`.projector` (seeded block-wise random projections), :mod:`.sampling` (m per cluster, stratified
by group), :mod:`.curvature` (float64 eigendecomposition, damped low-rank inverse), :mod:`.scores`
(estimates, standard errors, intervals) and :mod:`.engine` (one worker's part, collectives).
:mod:`.stage` is the Ray adapter. The maths, the sign convention and the cost model are in
docs/influence.md. Positive influence = the cluster lowers the validation loss (helpful).
"""

import importlib
from typing import Any

# Names re-exported here, imported on first use (PEP 562): the sample plan's tasks import
# influencespace.influence.inputs without paying for torch.
_EXPORTS = {
    "Curvature": "curvature", "fit_curvature": "curvature",
    "LocalComm": "engine", "Shard": "engine", "TorchComm": "engine", "compute_influence": "engine",
    "InfluenceError": "errors",
    "RandomProjector": "projector",
    "SamplePlan": "sampling", "sample_clusters": "sampling", "shard_clusters": "sampling",
    "cluster_statistics": "scores", "group_column": "scores",
    "DataSpec": "tasks", "Task": "tasks", "get_task": "tasks", "register_task": "tasks", "task_names": "tasks",
}


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)


__all__ = [
    "Curvature",
    "DataSpec",
    "InfluenceError",
    "LocalComm",
    "RandomProjector",
    "SamplePlan",
    "Shard",
    "Task",
    "TorchComm",
    "cluster_statistics",
    "compute_influence",
    "fit_curvature",
    "get_task",
    "group_column",
    "register_task",
    "sample_clusters",
    "shard_clusters",
    "task_names",
]
