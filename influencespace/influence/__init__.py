"""Cluster influence (Stage 3): how much each cluster of the pool helps or hurts a validation loss.

Pure logic (torch / numpy, no Ray): :mod:`.tasks` (the model, loss and measurement; registry),
:mod:`.proxy` (warm start, retraining), :mod:`.gradients` (per-example gradients with torch.func),
:mod:`.projector` (seeded block-wise random projections), :mod:`.sampling` (m per cluster, stratified
by group), :mod:`.curvature` (float64 eigendecomposition, damped low-rank inverse), :mod:`.scores`
(estimates, standard errors, intervals) and :mod:`.engine` (one worker's part, collectives).
:mod:`.stage` is the Ray adapter. The maths, the sign convention and the cost model are in
docs/influence.md. Positive influence = the cluster lowers the validation loss (helpful).
"""

from influencespace.influence.curvature import Curvature, fit_curvature
from influencespace.influence.engine import LocalComm, Shard, TorchComm, compute_influence
from influencespace.influence.errors import InfluenceError
from influencespace.influence.projector import RandomProjector
from influencespace.influence.sampling import SamplePlan, sample_clusters, shard_clusters
from influencespace.influence.scores import cluster_statistics, group_column
from influencespace.influence.tasks import DataSpec, Task, get_task, register_task, task_names

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
