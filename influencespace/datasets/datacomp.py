"""The benchmark as a DataComp-style pool, so docs/datacomp.md can be followed on one machine.

``influencespace data build fashion-captions --size tiny --format datacomp --out DIR`` writes
``DIR/pool``, ``DIR/validation`` and ``DIR/test``, each as shards laid out the way DataComp ships its
pools (https://github.com/mlfoundations/datacomp)::

    00000000.tar      WebDataset: <uid>.png (the benchmark's PNG bytes), <uid>.txt (caption),
                      <uid>.json ({"uid", "benchmark_id", "group", "label"})
    00000000.parquet  uid, text, group, label, benchmark_id (row-aligned with the .npz)
    00000000.npz      b32_img, b32_txt: float16 [rows, dim] unit image and text tower embeddings

``uid`` is the md5 hex digest of the benchmark id (32 hex digits, as DataComp's uids), so
``influencespace export --format uids`` writes DataComp's structured ``u8,u8`` uid array. The
embeddings come from the offline default embedder's two towers (not OpenAI CLIP B/32, whose weights
need a download): the names ``b32_img`` / ``b32_txt`` only follow DataComp's layout.

Rows whose image bytes cannot be decoded (the benchmark plants a few) are left out, as a DataComp
download would have dropped them. ``DIR/ground_truth/ground_truth.parquet`` is the benchmark's ground
truth with a ``uid`` column added, and ``DIR/classes.json`` its class names and prompts.

Shards are written tar, Parquet, then ``.npz`` (its presence marks the shard complete), and complete
shards are kept on a rerun, so an interrupted build resumes.
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from typing import Any

import numpy as np

from influencespace import storage

SPLITS = ("pool", "validation", "test")
ENCODE_BATCH = 256


def datacomp_uid(sample_id: str) -> str:
    """A 32-hex-digit uid for a benchmark id (its md5 digest)."""
    return hashlib.md5(sample_id.encode()).hexdigest()


def _tar_bytes(rows: list[dict[str, Any]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for row in rows:
            meta = {"uid": row["uid"], "benchmark_id": row["benchmark_id"], "group": row["group"], "label": row["label"]}
            for ext, payload in (("png", row["image"]), ("txt", row["text"].encode()),
                                 ("json", json.dumps(meta, sort_keys=True).encode())):
                info = tarfile.TarInfo(f"{row['uid']}.{ext}")
                info.size = len(payload)
                info.mtime = 0  # reproducible shards
                tar.addfile(info, io.BytesIO(payload))
    return buf.getvalue()


def _decodable(encoder: Any, rows: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], np.ndarray]:
    """Rows whose image decodes, and their preprocessed pixels."""
    from influencespace.embed.preprocess import ImageDecodeError

    kept, pixels = [], []
    for row in rows:
        try:
            pixels.append(encoder.image_preprocess(row["image"]))
        except ImageDecodeError:
            continue
        kept.append(row)
    return kept, np.stack(pixels) if pixels else np.zeros((0,), dtype=np.uint8)


def _embed(encoder: Any, rows: list[dict[str, Any]], pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    if not rows:
        empty = np.zeros((0, encoder.dim), dtype=np.float16)
        return empty, empty
    image, text = [], []
    for start in range(0, len(rows), ENCODE_BATCH):
        image.append(encoder.encode_images(pixels[start:start + ENCODE_BATCH]))
        text.append(encoder.embed_texts([r["text"] for r in rows[start:start + ENCODE_BATCH]]))
    return np.concatenate(image).astype(np.float16), np.concatenate(text).astype(np.float16)


def write_split(table: Any, out_uri: str, shard_rows: int, encoder: Any) -> dict[str, int]:
    """Write one split (``id``, ``image``, ``text``, ``group``, ``label``) as DataComp-style shards."""
    import pyarrow as pa

    counts = {"rows": 0, "undecodable": 0, "shards": 0}
    for shard, start in enumerate(range(0, table.num_rows, shard_rows)):
        rows = table.slice(start, shard_rows).to_pylist()
        stem = storage.join(out_uri, f"{shard:08d}")
        counts["shards"] += 1
        if storage.is_file(f"{stem}.npz"):  # complete (written last)
            kept = storage.read_table(f"{stem}.parquet", columns=["uid"]).num_rows
        else:
            for row in rows:
                row["uid"], row["benchmark_id"] = datacomp_uid(row["id"]), row["id"]
            good, pixels = _decodable(encoder, rows)
            image, text = _embed(encoder, good, pixels)
            storage.write_bytes(f"{stem}.tar", _tar_bytes(good))
            storage.write_table(pa.table({
                "uid": [r["uid"] for r in good],
                "text": [r["text"] for r in good],
                "group": [r["group"] for r in good],
                "label": pa.array([r["label"] for r in good], type=pa.int64()),
                "benchmark_id": [r["benchmark_id"] for r in good],
            }), f"{stem}.parquet")
            buf = io.BytesIO()
            np.savez(buf, b32_img=image, b32_txt=text)
            storage.write_bytes(f"{stem}.npz", buf.getvalue())
            kept = len(good)
        counts["rows"] += kept
        counts["undecodable"] += len(rows) - kept
    return counts


def write_datacomp(splits: Any, out_uri: str, shard_rows: int, checkpoint: str | None = None) -> dict[str, int]:
    """Write pool, validation and test as DataComp-style shards under ``out_uri``; return counts.

    ``checkpoint``: the offline default embedder's checkpoint (None: the cached default, built first if
    missing).
    """
    import pyarrow as pa

    from influencespace.embed.offline_default import ensure_default_checkpoint, spec_from_checkpoint
    from influencespace.embed.registry import load_encoder

    uri = checkpoint or ensure_default_checkpoint()
    encoder = load_encoder(spec_from_checkpoint(storage.read_bytes(uri), source=uri))
    counts: dict[str, int] = {}
    for name in SPLITS:
        split = write_split(getattr(splits, name), storage.join(out_uri, name), shard_rows, encoder)
        counts[name] = split["rows"]
        counts[f"{name}_undecodable_dropped"] = split["undecodable"]
        counts[f"{name}_shards"] = split["shards"]
    truth = splits.ground_truth
    truth = truth.append_column("uid", pa.array([datacomp_uid(i) for i in truth.column("id").to_pylist()]))
    storage.write_table(truth, storage.join(out_uri, "ground_truth", "ground_truth.parquet"))
    storage.write_json(storage.join(out_uri, "classes.json"), splits.classes)
    counts["embedding_dim"] = encoder.dim
    return counts
