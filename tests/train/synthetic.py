"""Synthetic stage artifacts for the train / evaluate / report tests: small, seeded, learnable.

Ten classes with a centre each in a shared space; an image embedding is its class centre plus noise,
a caption embedding the centre of its *caption's* class plus noise (so a mismatched caption points at
the wrong class). Written in the layouts of docs/architecture.md and passed to ``run_stage`` as
upstream manifests.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

NAMES = ["t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot"]
FOOTWEAR = [5, 7, 9]


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _fixed(matrix: np.ndarray) -> pa.FixedSizeListArray:
    return pa.FixedSizeListArray.from_arrays(pa.array(matrix.reshape(-1), pa.float32()), matrix.shape[1])


def embeddings(labels, caption_labels, minority, dim: int, rng, centres) -> tuple[np.ndarray, np.ndarray]:
    style = np.where(minority[:, None], 0.6, 0.0) * centres[-1]  # the minority style shifts images
    image = _unit(centres[labels] + style + 0.35 * rng.standard_normal((len(labels), dim)))
    text = _unit(centres[caption_labels] + 0.1 * rng.standard_normal((len(labels), dim)))
    return image, text


def write_split(directory: str, prefix: str, image, text, labels, groups) -> list[str]:
    ids = [f"{prefix}-{i:05d}" for i in range(len(labels))]
    table = pa.table({
        "id": ids,
        "embedding": _fixed(_unit(np.concatenate([image, text], axis=1))),
        "image_embedding": _fixed(image),
        "text_embedding": _fixed(text),
        "image_text_cosine": pa.array((image * text).sum(1), pa.float32()),
        "group": list(groups),
        "label": pa.array(labels, pa.int64()),
    })
    os.makedirs(directory, exist_ok=True)
    pq.write_table(table, os.path.join(directory, "part-00000.parquet"))
    return ids


def write_manifest(directory: str, ids, keep, weight, cluster=None, rejected: int = 0) -> None:
    """One manifest part; its last ``rejected`` rows (the embed stage's rejects) in ``rejected-00000``, as curate writes them."""
    keep = np.asarray(keep, bool)
    weight = np.where(keep, np.asarray(weight, float), 0.0)
    os.makedirs(directory, exist_ok=True)
    table = pa.table({
        "id": list(ids),
        "cluster": pa.array(np.zeros(len(ids), int) if cluster is None else cluster, pa.int32()),
        "keep": keep,
        "weight": weight,
        "reason": ["kept" if k else "pruned" for k in keep],
    })
    pq.write_table(table.slice(0, len(ids) - rejected), os.path.join(directory, "part-00000.parquet"))
    if rejected:
        pq.write_table(table.slice(len(ids) - rejected), os.path.join(directory, "rejected-00000.parquet"))


def build_run(root: str, pool: int = 64, test: int = 60, dim: int = 16, seed: int = 0,
              policies: tuple[str, ...] = ("random",)) -> dict:
    """Write data/embed/curate artifacts under ``root``; return upstream manifests and the ground truth."""
    rng = np.random.default_rng(seed)
    centres = _unit(rng.standard_normal((10, dim)))
    labels = rng.integers(0, 10, pool)
    minority = rng.random(pool) < 0.15
    noisy = rng.random(pool) < 0.2
    caption_labels = np.where(noisy, (labels + 1 + rng.integers(0, 9, pool)) % 10, labels)
    duplicate = ~noisy & (rng.random(pool) < 0.1)
    groups = np.where(minority, "inverted", "regular")
    image, text = embeddings(labels, caption_labels, minority, dim, rng, centres)
    embed_dir = os.path.join(root, "embed")
    pool_ids = write_split(os.path.join(embed_dir, "pool"), "pool", image, text, labels, groups)

    test_labels = np.arange(test) % 10
    test_minority = (np.arange(test) // 10) % 2 == 1
    t_image, t_text = embeddings(test_labels, test_labels, test_minority, dim, rng, centres)
    write_split(os.path.join(embed_dir, "test"), "test", t_image, t_text, test_labels,
                np.where(test_minority, "inverted", "regular"))
    write_split(os.path.join(embed_dir, "validation"), "val", t_image[:20], t_text[:20], test_labels[:20],
                np.where(test_minority[:20], "inverted", "regular"))

    data_dir = os.path.join(root, "data")
    os.makedirs(os.path.join(data_dir, "ground_truth"), exist_ok=True)
    with open(os.path.join(data_dir, "classes.json"), "w") as f:
        json.dump({"names": NAMES, "prompts": [f"a photo of a {n}." for n in NAMES], "footwear_classes": FOOTWEAR,
                   "groups": {"majority": "regular", "minority": "inverted"}}, f)
    gt = pa.table({
        "id": pool_ids + ["pool-undecodable"],
        "true_label": pa.array(list(labels) + [0], pa.int64()),
        "caption_label": pa.array(list(caption_labels) + [0], pa.int64()),
        "caption_corrupted": list(noisy) + [False],
        "caption_noise": ["random" if n else "none" for n in noisy] + ["none"],
        "image_corrupted": [False] * pool + [True],
        "image_corruption": ["none"] * pool + ["undecodable"],
        "duplicate_of": [pool_ids[0] if d else None for d in duplicate] + [None],
        "group": list(groups) + ["regular"],
    })
    pq.write_table(gt, os.path.join(data_dir, "ground_truth", "ground_truth.parquet"))

    # InfluenceSpace-like manifest: drops every noisy row, up-weights the minority; comparison: random.
    curate_dir = os.path.join(root, "curate")
    keep = ~noisy
    weight = np.where(minority, 2.0, 1.0)
    weight = weight / weight[keep].mean()
    ids = pool_ids + ["pool-undecodable"]
    write_manifest(os.path.join(curate_dir, "manifest"), ids, list(keep) + [False], list(weight) + [0.0], rejected=1)
    outputs = {"manifest": "manifest", "summary": "summary.json"}
    summary = {"influencespace": {"rows": pool + 1, "kept": int(keep.sum()), "weight_sum": float(weight[keep].sum())}}
    for name in policies:
        random_keep = np.zeros(pool, bool)
        random_keep[rng.permutation(pool)[: int(keep.sum())]] = True
        write_manifest(os.path.join(curate_dir, "policies", name), ids, list(random_keep) + [False],
                       [1.0] * pool + [0.0], rejected=1)
        outputs[f"policy_{name}"] = f"policies/{name}"
        summary[name] = {"rows": pool + 1, "kept": int(keep.sum()), "weight_sum": float(keep.sum())}
    with open(os.path.join(curate_dir, "summary.json"), "w") as f:
        json.dump(summary, f)

    upstream = {
        "data": {"fingerprint": "data-fp", "stage_dir": data_dir,
                 "outputs": {"ground_truth": "ground_truth/ground_truth.parquet", "classes": "classes.json"}},
        "embed": {"fingerprint": "embed-fp", "stage_dir": embed_dir,
                  "outputs": {"pool": "pool", "validation": "validation", "test": "test"}},
        "curate": {"fingerprint": "curate-fp", "stage_dir": curate_dir, "outputs": outputs},
    }
    return {"upstream": upstream, "pool_ids": pool_ids, "noisy": noisy, "minority": minority,
            "duplicate": duplicate, "keep": keep, "weight": weight}


def write_train_outputs(root: str, states: dict, seconds: dict, seeds=(0,)) -> dict:
    """Train-stage artifacts without training: ``states[variant]`` is saved as every seed's model.pt."""
    import torch

    train_dir = os.path.join(root, "train")
    outputs = {}
    for variant, state in states.items():
        runs = {}
        for seed in seeds:
            run_dir = os.path.join(train_dir, variant, f"seed-{seed}")
            os.makedirs(run_dir, exist_ok=True)
            torch.save(state, os.path.join(run_dir, "model.pt"))
            history = [{"epoch": 1, "loss": 2.0, "seconds": seconds[variant] / 2},
                       {"epoch": 2, "loss": 1.5, "seconds": seconds[variant] / 2}]
            runs[str(seed)] = {"variant": variant, "seed": seed, "model": f"{variant}/seed-{seed}/model.pt",
                               "train_seconds": seconds[variant], "wall_seconds": seconds[variant] + 1.0,
                               "final_loss": 1.5, "steps": 4, "history": history}
        with open(os.path.join(train_dir, variant, "metrics.json"), "w") as f:
            json.dump({"variant": variant, "seeds": list(seeds), "runs": runs}, f)
        outputs[variant] = f"{variant}/metrics.json"
    return {"fingerprint": "train-fp", "stage_dir": train_dir, "outputs": outputs,
            "extra": {"variants": list(states), "seeds": list(seeds), "step_policy": "same_steps",
                      "steps": {v: 4 for v in states}}}


def identity_state(dim: int, scale: float = 20.0) -> dict:
    """Heads that pass the tower embeddings through unchanged (a good model on this synthetic space)."""
    import math

    import torch

    return {"image_proj.weight": torch.eye(dim), "text_proj.weight": torch.eye(dim),
            "logit_scale": torch.full((1,), math.log(scale))}


def random_state(dim: int, head_dim: int = 4, seed: int = 0) -> dict:
    """Random narrow heads (a poor model)."""
    from influencespace.train.model import build_model

    return build_model(dim, dim, head_dim, 20.0, seed).state_dict()


# --------------------------------------------------------------------------------------------------
# Raw pairs for the open_clip target: pixels and captions, the embed stage's plan, aligned embeddings


def class_image(label: int, inverted: bool, rng, size: int = 28) -> np.ndarray:
    """A 28×28 grey image of class ``label``: a bright bar at a class-specific place, plus noise."""
    image = rng.integers(0, 40, (size, size)).astype(np.uint8)
    row, col = divmod(int(label), 5)
    image[4 + 10 * row: 10 + 10 * row, 2 + 5 * col: 6 + 5 * col] = 230
    return 255 - image if inverted else image


def _png(array: np.ndarray) -> bytes:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def write_raw_split(path: str, ids, labels, caption_labels, groups, rng, undecodable: tuple[str, ...] = ()) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    images = [b"not an image" if i in undecodable else _png(class_image(y, g == "inverted", rng))
              for i, y, g in zip(ids, labels, groups, strict=True)]
    pq.write_table(pa.table({
        "id": list(ids), "image": pa.array(images, pa.binary()),
        "text": [f"a photo of a {NAMES[c]}." for c in caption_labels],
        "label": pa.array(labels, pa.int64()), "group": list(groups),
    }), path, row_group_size=16)


def build_pixel_run(root: str, pool: int = 48, test: int = 30, rows_per_shard: int = 20, dim: int = 8,
                    seed: int = 0) -> dict:
    """Raw pool and test pairs (PNG + caption) with the embed stage's shard plan and shard-aligned
    embeddings, manifests and curate summary — what train and evaluate read for ``train.target=open_clip``.

    Pool row ``pool-00003`` does not decode: the embed stage rejected it (no pool row; the manifests'
    ``rejected-`` part lists it), and the pixel reader must never yield it.
    """
    from influencespace.embed import pairs

    rng = np.random.default_rng(seed)
    data_dir, embed_dir, curate_dir = (os.path.join(root, s) for s in ("data", "embed", "curate"))
    labels = rng.integers(0, 10, pool)
    noisy = rng.random(pool) < 0.2
    caption_labels = np.where(noisy, (labels + 1 + rng.integers(0, 9, pool)) % 10, labels)
    groups = np.where(rng.random(pool) < 0.2, "inverted", "regular")
    ids = [f"pool-{i:05d}" for i in range(pool)]
    rejected = "pool-00003"
    write_raw_split(os.path.join(data_dir, "pool", "part-0.parquet"), ids, labels, caption_labels, groups, rng,
                    undecodable=(rejected,))
    test_labels = np.arange(test) % 10
    test_groups = np.where((np.arange(test) // 10) % 2 == 1, "inverted", "regular")
    test_ids = [f"test-{i:05d}" for i in range(test)]
    write_raw_split(os.path.join(data_dir, "test", "part-0.parquet"), test_ids, test_labels, test_labels, test_groups, rng)
    shards = pairs.load_or_make_plan(embed_dir, {"pool": (os.path.join(data_dir, "pool"), "parquet"),
                                                 "test": (os.path.join(data_dir, "test"), "parquet")}, rows_per_shard)

    centres = _unit(rng.standard_normal((10, dim)))
    image, text = embeddings(labels, caption_labels, groups == "inverted", dim, rng, centres)
    keep = ~noisy
    weight = np.where(groups == "inverted", 2.0, 1.0)
    weight = weight / weight[keep].mean()
    summary = {"influencespace": {"rows": pool, "kept": 0, "weight_sum": 0.0}}
    for shard in (s for s in shards if s.split == "pool"):
        start = sum(s.rows for s in shards if s.split == "pool" and s.index < shard.index)
        rows = np.arange(start, start + shard.rows)
        embedded = np.array([ids[i] != rejected for i in rows])
        name = f"part-{shard.index:05d}.parquet"
        table = pa.table({"id": [ids[i] for i in rows[embedded]],
                          "image_embedding": _fixed(image[rows[embedded]]), "text_embedding": _fixed(text[rows[embedded]]),
                          "group": list(groups[rows[embedded]]), "label": pa.array(labels[rows[embedded]], pa.int64())})
        os.makedirs(os.path.join(embed_dir, "pool"), exist_ok=True)
        pq.write_table(table, os.path.join(embed_dir, "pool", name))
        manifest = pa.table({"id": [ids[i] for i in rows], "cluster": pa.array(np.zeros(len(rows), int), pa.int32()),
                             "keep": keep[rows] & embedded, "weight": np.where(keep[rows] & embedded, weight[rows], 0.0),
                             "reason": ["kept" if k else "pruned" for k in keep[rows] & embedded]})
        os.makedirs(os.path.join(curate_dir, "manifest"), exist_ok=True)
        pq.write_table(manifest.filter(pa.array(embedded)), os.path.join(curate_dir, "manifest", name))
        if not embedded.all():
            pq.write_table(manifest.filter(pa.array(~embedded)),
                           os.path.join(curate_dir, "manifest", f"rejected-{shard.index:05d}.parquet"))
        kept = keep[rows] & embedded
        summary["influencespace"]["kept"] += int(kept.sum())
        summary["influencespace"]["weight_sum"] += float(weight[rows][kept].sum())
    t_image, t_text = embeddings(test_labels, test_labels, test_groups == "inverted", dim, rng, centres)
    write_split(os.path.join(embed_dir, "test"), "test", t_image, t_text, test_labels, test_groups)
    write_split(os.path.join(embed_dir, "validation"), "val", t_image[:10], t_text[:10], test_labels[:10], test_groups[:10])
    os.makedirs(curate_dir, exist_ok=True)
    with open(os.path.join(curate_dir, "summary.json"), "w") as f:
        json.dump(summary, f)
    with open(os.path.join(data_dir, "classes.json"), "w") as f:
        json.dump({"names": NAMES, "footwear_classes": FOOTWEAR,
                   "groups": {"majority": "regular", "minority": "inverted"}}, f)
    upstream = {
        "data": {"fingerprint": "data-fp", "stage_dir": data_dir,
                 "outputs": {"pool": "pool", "test": "test", "classes": "classes.json"}},
        "embed": {"fingerprint": "embed-fp", "stage_dir": embed_dir,
                  "outputs": {"pool": "pool", "validation": "validation", "test": "test"}},
        "curate": {"fingerprint": "curate-fp", "stage_dir": curate_dir,
                   "outputs": {"manifest": "manifest", "summary": "summary.json"}},
    }
    return {"upstream": upstream, "pool_ids": ids, "rejected": rejected, "keep": keep, "weight": weight,
            "labels": labels, "test_ids": test_ids}
