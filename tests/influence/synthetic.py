"""Synthetic embed + cluster artifacts for the influence stage (no dependency on those stages' code).

Pairs of unit-norm image/text embeddings around per-class prototypes; the caption of a "harmful"
cluster is systematically swapped to another class (like the benchmark's caption swaps). Written in
the layouts of docs/architecture.md, with manifests that ``run_stage(upstream=...)`` accepts.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from influencespace import storage


@dataclass
class SyntheticData:
    pool: dict[str, np.ndarray]
    validation: dict[str, np.ndarray]
    cluster: np.ndarray
    harmful: list[int]


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def make_data(
    n: int = 240,
    n_val: int = 60,
    dim: int = 6,
    classes: int = 3,
    clusters: int = 8,
    harmful: tuple[int, ...] = (2,),
    noise: float = 0.6,
    seed: int = 0,
) -> SyntheticData:
    rng = np.random.default_rng(seed)
    proto_img, proto_txt = rng.normal(size=(classes, dim)), rng.normal(size=(classes, dim))
    # Each cluster is a slice of one class, with its own offset; harmful ones swap the caption class.
    cluster_class = np.arange(clusters) % classes
    offsets = rng.normal(size=(clusters, dim)) * 0.3
    cluster = np.sort(rng.integers(0, clusters, n))
    label = cluster_class[cluster]
    caption = label.copy()
    for c in harmful:
        caption[cluster == c] = (cluster_class[c] + 1) % classes
    image = _unit(proto_img[label] + offsets[cluster] + noise * rng.normal(size=(n, dim)))
    text = _unit(proto_txt[caption] + noise * rng.normal(size=(n, dim)))
    group = np.where(rng.random(n) < 0.3, "minority", "majority")

    val_label = rng.integers(0, classes, n_val)
    val_image = _unit(proto_img[val_label] + noise * rng.normal(size=(n_val, dim)))
    val_text = _unit(proto_txt[val_label] + noise * rng.normal(size=(n_val, dim)))
    val_group = np.where(np.arange(n_val) % 2 == 0, "minority", "majority")

    def rows(prefix, img, txt, lab, grp):
        return {
            "id": np.array([f"{prefix}-{i:05d}" for i in range(len(img))]),
            "image_embedding": img,
            "text_embedding": txt,
            "embedding": np.concatenate([img, txt], axis=1) / np.sqrt(2),
            "label": lab.astype(np.int64),
            "group": grp,
        }

    # The probe learns captions (what a caption-trained model would), so swapped clusters are harmful.
    return SyntheticData(
        pool=rows("pool", image, text, caption, group),
        validation=rows("val", val_image, val_text, val_label, val_group),
        cluster=cluster,
        harmful=list(harmful),
    )


def _table(columns: dict[str, np.ndarray], dtype=np.float32) -> pa.Table:
    out = {}
    for name, values in columns.items():
        if values.ndim == 2:
            flat = pa.array(values.astype(dtype).reshape(-1))
            out[name] = pa.FixedSizeListArray.from_arrays(flat, values.shape[1])
        else:
            out[name] = pa.array(values)
    return pa.table(out)


def write_upstream(root: str, data: SyntheticData, num_clusters: int | None = None, shards: int = 2,
                   rejected: np.ndarray | None = None, reject_rows: bool = True) -> dict[str, dict]:
    """Write embed/ and cluster/ artifacts under ``root``; return their manifests.

    ``rejected``: a mask of pool rows the cluster stage rejected (in the pool, not in the assignments;
    listed in ``rejects/``, with their positions unless not ``reject_rows``, as an older cluster stage wrote them)."""
    embed_dir, cluster_dir = storage.join(root, "embed"), storage.join(root, "cluster")
    n = len(data.cluster)
    bounds = np.linspace(0, n, shards + 1).astype(int)
    # float64 keeps the stored embeddings exact for the float64 comparisons of the tests.
    for i in range(shards):
        part = {k: v[bounds[i] : bounds[i + 1]] for k, v in data.pool.items()}
        name = f"part-{i:05d}.parquet"
        storage.write_table(_table(part, np.float64), storage.join(embed_dir, "pool", name))
        # The cluster stage's contract: one assignment part per pool shard, under the same name, its
        # rows in pool order, the rejected ones left out.
        kept = np.ones(len(part["id"]), bool) if rejected is None else ~rejected[bounds[i] : bounds[i + 1]]
        assignments = pa.table(
            {
                "id": pa.array(part["id"][kept]),
                "cluster": pa.array(data.cluster[bounds[i] : bounds[i + 1]][kept].astype(np.int32)),
                "distance": pa.array(np.zeros(int(kept.sum()), dtype=np.float32)),
            }
        )
        storage.write_table(assignments, storage.join(cluster_dir, "assignments", name))
        if not kept.all():
            rejects = {"id": pa.array(part["id"][~kept]), "reason": pa.array(["nonfinite"] * int((~kept).sum()))}
            if reject_rows:
                rejects["row"] = pa.array(np.flatnonzero(~kept).astype(np.int64))
            storage.write_table(pa.table(rejects), storage.join(cluster_dir, "rejects", name))
    storage.write_table(_table(data.validation, np.float64), storage.join(embed_dir, "validation", "part-00000.parquet"))
    k = num_clusters or int(data.cluster.max()) + 1
    import io

    buf = io.BytesIO()
    np.save(buf, np.zeros((k, data.pool["embedding"].shape[1]), dtype=np.float32))
    storage.write_bytes(storage.join(cluster_dir, "centroids.npy"), buf.getvalue())
    return {
        "embed": {"fingerprint": "synthetic-embed", "stage_dir": embed_dir, "outputs": {"pool": "pool", "validation": "validation"}},
        "cluster": {
            "fingerprint": "synthetic-cluster",
            "stage_dir": cluster_dir,
            "outputs": {"assignments": "assignments", "centroids": "centroids.npy",
                        **({"rejects": "rejects"} if rejected is not None and rejected.any() else {})},
        },
    }
