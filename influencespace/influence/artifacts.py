"""What the influence stage writes: cluster scores, the curvature artifact, the summary, the row scores.

``cluster_scores.parquet`` (``cluster``, ``size``, ``n_sampled``, ``n_dropped``, ``influence``,
``stderr``, ``ci_low``, ``ci_high``; per validation group ``influence_group_<name>``, ``stderr_group_<name>``,
``ci_low_group_<name>``, ``ci_high_group_<name>``: :func:`influencespace.layout.group_column`), ``curvature/``
(per checkpoint: ``eigenvalues.npy``, ``eigenvectors.npy``, ``validation_sketch.npy``; and
``curvature.json`` with damping, rank, projector kind/seed/dim/fingerprint) and ``summary.json``.
With ``influence.placebo``, ``placebo_scores.parquet`` has the same columns for a random validation
direction (engine.placebo_directions). The row pass's ``row_scores/`` and ``curvature/row_directions.npy``: :mod:`.rows`.
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np

from influencespace import storage

SCORES_FILE = "cluster_scores.parquet"
PLACEBO_SCORES_FILE = "placebo_scores.parquet"
CURVATURE_DIR = "curvature"
SUMMARY_FILE = "summary.json"


def npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.asarray(array), allow_pickle=False)
    return buf.getvalue()


def write_outputs(stage_dir: str, result: Any, inputs: Any, cfg: Any, task: Any, model: Any) -> dict[str, Any]:
    """Rank 0 / local: scores Parquet, curvature artifact, summary. Returns the summary."""
    import pyarrow as pa

    from influencespace.influence.gradients import flat_tracked
    from influencespace.influence.projector import RandomProjector

    storage.write_table(pa.table(result.scores), storage.join(stage_dir, SCORES_FILE))
    if result.placebo_scores is not None:
        storage.write_table(pa.table(result.placebo_scores), storage.join(stage_dir, PLACEBO_SCORES_FILE))
    names = task.tracked_parameters(model)
    projector = RandomProjector(flat_tracked(model, names), cfg.projection_dim, cfg.seed, cfg.projection)
    checkpoints = []
    for j, (curvature, val_sketch) in enumerate(zip(result.curvatures, result.validation_sketches, strict=True)):
        sub = storage.join(stage_dir, CURVATURE_DIR, f"checkpoint-{j}")
        storage.write_bytes(storage.join(sub, "eigenvalues.npy"), npy_bytes(curvature.eigenvalues))
        storage.write_bytes(storage.join(sub, "eigenvectors.npy"), npy_bytes(curvature.eigenvectors))
        storage.write_bytes(storage.join(sub, "validation_sketch.npy"), npy_bytes(val_sketch))
        checkpoints.append({"path": f"checkpoint-{j}", **curvature.metadata()})
    meta = {
        "task": task.name,
        "fisher": cfg.fisher,
        "weight_decay": cfg.weight_decay,
        "projector": {
            "kind": cfg.projection,
            "seed": cfg.seed,
            "dim": cfg.projection_dim,
            "num_params": projector.num_params,
            "block_size": projector.block_size,
            "fingerprint": result.summary["projector_fingerprints"][0],
        },
        "tracked_parameters": names,
        "validation_sketch_rows": ["overall", *inputs.group_names],
        "sign": "influence > 0: the cluster lowers the validation loss (helpful)",
        "checkpoints": checkpoints,
    }
    storage.write_json(storage.join(stage_dir, CURVATURE_DIR, "curvature.json"), meta)
    summary = {**result.summary, "group_names": list(inputs.group_names), "clusters": int(len(result.scores["cluster"]))}
    storage.write_json(storage.join(stage_dir, SUMMARY_FILE), summary)
    return summary
