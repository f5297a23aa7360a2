"""Curated subsets out, in the formats training stacks read: uid lists, WebDataset, Parquet.

``influencespace export RUN --format uids|webdataset|parquet --out URI`` reads the curation manifest
of a finished run and writes:

- ``uids``: ``uids.npy`` holding the sorted ids of kept samples, as DataComp submissions do (when
  every id is a 32-hex-digit uid, the DataComp layout exactly: a structured ``u8,u8`` array of the two
  64-bit halves; otherwise a sorted unicode array), plus ``uids.txt`` (one id per line) and
  ``weights.parquet`` (``id``, ``weight``).
- ``webdataset``: tar shards of kept samples only (``key.png`` or ``key.jpg`` by the image's own
  bytes, ``key.txt``, ``key.json``).
  The weight travels either as a ``weight`` field in each sample's JSON (``--weights field``, the
  default) or as repeats (``--weights repeats``): a kept sample is written ``max(1, round(weight))``
  times, so rounding error per sample is below 0.5 and no kept sample is lost; repeated copies get
  keys ``<key>_r1``, ``<key>_r2`` ….
- ``parquet``: the original columns of kept rows plus ``weight``.

Sample bytes come from the run's data pool, or with ``--pairs URI`` from other raw pairs: WebDataset
tars or Parquet files holding the same ids. A run that started from precomputed embeddings
(``data.source: embeddings``) has no image bytes in its pool, so it needs ``--pairs`` for
``webdataset`` and ``parquet`` (docs/datacomp.md). The id of a pair is the run's ``data.id_column``
(read from the run's recorded data config, e.g. ``uid``): a Parquet column, or a field of a
WebDataset sample's JSON; a sample whose JSON lacks it falls back to the JSON's ``id``, then ``uid``,
then the tar key.

Streaming through Ray Data: pool shards are read, filtered and written block by block. The kept-id →
weight table is broadcast once through the object store (about 40 bytes per kept row per node), so
memory is bounded by that table plus one block per task.
"""

from __future__ import annotations

import json
import re
from typing import Any

import numpy as np

from influencespace import storage
from influencespace.datasets.webdataset import IMAGE_EXTENSIONS, sample_key
from influencespace.errors import InfluenceSpaceError, InputDataError
from influencespace.layout import CURATED, manifest_dir
from influencespace.progress import NULL, Sink, track

FORMATS = ("uids", "webdataset", "parquet")
_HEX_UID = re.compile(r"^[0-9a-fA-F]{32}$")


def uid_array(ids: list[str]) -> np.ndarray:
    """Sorted uids as DataComp stores them (``u8,u8`` halves) or, for other ids, a sorted string array."""
    ids = sorted(ids)
    if ids and all(_HEX_UID.match(i) for i in ids):
        pairs = [(int(i[:16], 16), int(i[16:32], 16)) for i in ids]
        return np.array(pairs, dtype=np.dtype("u8,u8"))
    return np.array(ids, dtype=str)


def repeats(weights: np.ndarray) -> np.ndarray:
    """Copies of each kept sample in ``--weights repeats`` mode: max(1, round(weight))."""
    return np.maximum(1, np.rint(np.asarray(weights, dtype=np.float64))).astype(np.int64)


def read_kept(run_dir: str, policy: str = CURATED) -> Any:
    """Kept rows (``id``, ``weight``) of a finished curate stage, as a pyarrow table."""
    import pyarrow.compute as pc

    curate_dir = storage.join(run_dir, "curate")
    if not storage.exists(storage.join(curate_dir, "_SUCCESS.json")):
        raise InfluenceSpaceError(f"{run_dir} has no finished curate stage: run the pipeline up to 'curate' first")
    directory = storage.join(curate_dir, manifest_dir(policy))
    if not storage.exists(directory):
        raise InfluenceSpaceError(f"{run_dir} has no manifest for policy '{policy}'")
    table = storage.read_table(directory, columns=["id", "keep", "weight"])
    return table.filter(pc.field("keep")).select(["id", "weight"])


def _pool_source(run_dir: str) -> tuple[str, str, str]:
    """(pool URI, its format, the id column) as the run's data stage recorded them."""
    manifest = storage.read_json(storage.join(run_dir, "data", "_SUCCESS.json"))
    pool = manifest["outputs"]["pool"]
    if "://" not in pool and not pool.startswith("/"):
        pool = storage.join(manifest["stage_dir"], pool)
    config = manifest.get("config") or {}
    id_column = (config.get("id_column") or "id") if config.get("source") == "embeddings" else "id"
    return pool, manifest["outputs"].get("format", "parquet"), id_column


def pairs_format(uri: str) -> str:
    """'webdataset' when ``uri`` is a .tar or a directory holding .tar files, else 'parquet'."""
    if uri.endswith(".tar"):
        return "webdataset"
    if uri.endswith(".parquet"):
        return "parquet"
    return "webdataset" if storage.list_files(uri, ".tar", recursive=True) else "parquet"


def sample_id(meta: dict[str, Any], key: str, id_column: str = "id") -> str:
    """The id of a WebDataset sample: its JSON's ``id_column``, else ``id``, else ``uid``, else the tar key."""
    for field in (id_column, "id", "uid"):
        if meta.get(field) is not None:
            return str(meta[field])
    return key


def _read_pool(uri: str, fmt: str, id_column: str = "id"):
    import ray.data

    fs, path = storage.resolve(uri)
    if fmt == "parquet":
        ds = ray.data.read_parquet(path, filesystem=fs, file_extensions=["parquet"])
        if id_column == "id":
            return ds

        def with_id(batch):  # the configured id column becomes ``id`` (it stays too, e.g. DataComp's uid)
            if id_column not in batch.column_names:
                raise InputDataError(f"pairs at '{uri}' have no id column '{id_column}' (the run's data.id_column)")
            ids = batch.column(id_column).cast("string")
            if "id" in batch.column_names:
                return batch.set_column(batch.column_names.index("id"), "id", ids)
            return batch.append_column("id", ids)

        return ds.map_batches(with_id, batch_format="pyarrow")
    # Only the tars: a DataComp shard directory also holds .parquet and .npz files.
    ds = ray.data.read_webdataset(path, filesystem=fs, decoder=None, file_extensions=["tar"])

    def to_columns(batch: dict) -> dict:
        # The id travels in the sample's JSON member (see sample_id); without one, the tar key is the id.
        out: dict[str, list] = {"id": [], "image": [], "text": [], "meta": []}
        columns = [c for c in batch if not c.startswith("__")]
        for i, key in enumerate(batch["__key__"]):
            meta = json.loads(batch["json"][i]) if "json" in batch and batch["json"][i] is not None else {}
            image = next((batch[e][i] for e in IMAGE_EXTENSIONS if e in columns and batch[e][i] is not None), None)
            text = batch["txt"][i].decode("utf-8", errors="replace") if "txt" in batch and batch["txt"][i] is not None else ""
            out["id"].append(sample_id(meta, str(key), id_column))
            out["image"].append(image)
            out["text"].append(text)
            out["meta"].append(json.dumps({k: v for k, v in meta.items() if k != "id"}))
        return out

    return ds.map_batches(to_columns, batch_format="numpy")


class _AttachWeights:
    """Keep only kept rows and add their weight (vectorised lookup in the broadcast table)."""

    def __init__(self, kept_ref: Any, progress: Sink = NULL):
        import ray

        kept = ray.get(kept_ref)
        self.ids = kept.column("id")
        self.weights = kept.column("weight")
        self.progress = progress

    def __call__(self, batch):
        import pyarrow.compute as pc

        position = pc.index_in(batch.column("id"), value_set=self.ids)
        mask = pc.is_valid(position)
        batch = batch.filter(mask)
        weights = pc.take(self.weights, pc.drop_null(position))
        self.progress.add(batch.num_rows)
        return batch.append_column("weight", weights)


def _to_webdataset_rows(weights_mode: str):
    def convert(batch):
        rows = batch.to_pylist()
        out: dict[str, list] = {"__key__": [], "png": [], "jpg": [], "txt": [], "json": []}
        for row in rows:
            meta = json.loads(row.pop("meta")) if "meta" in row else {}
            image, text, weight = row.pop("image", None), row.pop("text", "") or "", float(row.pop("weight"))
            meta.update({k: v for k, v in row.items() if not isinstance(v, bytes | bytearray)})
            copies = int(repeats([weight])[0]) if weights_mode == "repeats" else 1
            if weights_mode == "field":
                meta["weight"] = weight
            for copy in range(copies):
                key = sample_key(str(meta["id"])) + (f"_r{copy}" if copy else "")
                out["__key__"].append(key)
                is_jpeg = image is not None and image[:2] == b"\xff\xd8"
                out["png"].append(None if is_jpeg else image)
                out["jpg"].append(image if is_jpeg else None)
                out["txt"].append(text)
                out["json"].append(json.dumps(meta, sort_keys=True, default=str))
        return out

    return convert


def export_run(run_dir: str, fmt: str, out_uri: str, policy: str = CURATED, weights_mode: str = "field",
               rows_per_file: int = 10_000, pairs_uri: str | None = None) -> dict[str, int]:
    """Write the kept subset of ``run_dir`` to ``out_uri`` in ``fmt``; return counts.

    ``pairs_uri``: raw pairs (WebDataset tars or Parquet) to take sample bytes from; default the run's
    data pool.
    """
    if fmt not in FORMATS:
        raise InfluenceSpaceError(f"unknown export format '{fmt}'; choose one of {', '.join(FORMATS)}")
    if weights_mode not in ("field", "repeats"):
        raise InfluenceSpaceError(f"--weights must be 'field' or 'repeats', got '{weights_mode}'")
    kept = read_kept(run_dir, policy)
    counts = {"kept": kept.num_rows}
    if fmt == "uids":
        import io

        buf = io.BytesIO()
        np.save(buf, uid_array(kept.column("id").to_pylist()), allow_pickle=False)
        storage.write_bytes(storage.join(out_uri, "uids.npy"), buf.getvalue())
        storage.write_bytes(storage.join(out_uri, "uids.txt"), ("\n".join(sorted(kept.column("id").to_pylist())) + "\n").encode())
        storage.write_table(kept.sort_by("id"), storage.join(out_uri, "weights.parquet"))
        return counts

    import ray

    pool_uri, pool_format, id_column = _pool_source(run_dir)
    if pairs_uri:
        pool_uri, pool_format = pairs_uri, pairs_format(pairs_uri)
    elif pool_format == "embeddings":
        raise InputDataError(
            f"{run_dir} started from precomputed embeddings ({pool_uri}): its pool holds no image bytes; "
            f"pass --pairs URI with the original pairs (WebDataset tars or Parquet) to export {fmt}"
        )
    kept_ref = ray.put(kept)
    with track("export", kept.num_rows, "rows") as bar:
        ds = _read_pool(pool_uri, pool_format, id_column).map_batches(
            _AttachWeights, fn_constructor_args=(kept_ref, bar.sink()), batch_format="pyarrow",
            compute=ray.data.ActorPoolStrategy(size=1), num_cpus=0.5,
        )
        fs, path = storage.resolve(out_uri)
        if fmt == "parquet":
            ds.write_parquet(path, filesystem=fs, min_rows_per_file=rows_per_file)
        else:
            before = set(storage.list_files(out_uri, ".tar"))
            ds = ds.map_batches(_to_webdataset_rows(weights_mode), batch_format="pyarrow")
            ds.write_webdataset(path, filesystem=fs, encoder=None, min_rows_per_file=rows_per_file)
    if fmt != "parquet":
        counts["shards"] = _number_shards(out_uri, before)
        counts["samples"] = int(repeats(kept.column("weight").to_numpy()).sum()) if weights_mode == "repeats" else kept.num_rows
    written = sum(1 for _ in storage.list_files(out_uri, recursive=True))
    if written == 0:
        raise InputDataError(f"export wrote no files to {out_uri}: did the pool at {pool_uri} hold the manifest's ids?")
    counts["files"] = written
    return counts


def _number_shards(out_uri: str, before: set[str]) -> int:
    """Rename the tars just written to ``00000000.tar``, ``00000001.tar`` … (after any numbered ones there).

    DataComp and open_clip address shards by brace ranges (``{00000000..00000003}.tar``); Ray names
    them by write id. Returns how many numbered shards the directory holds.
    """
    fs, _ = storage.resolve(out_uri)
    numbered = re.compile(r"^\d{8}\.tar$")
    taken = {u.rsplit("/", 1)[-1] for u in before if numbered.match(u.rsplit("/", 1)[-1])}
    index = 0
    for uri in sorted(set(storage.list_files(out_uri, ".tar")) - before):
        while f"{index:08d}.tar" in taken:
            index += 1
        target = storage.join(out_uri, f"{index:08d}.tar")
        fs.move(storage.resolve(uri)[1], storage.resolve(target)[1])
        taken.add(f"{index:08d}.tar")
    return len(taken)
