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

Nothing per row on the driver. ``uids`` sorts the kept ids in tasks (:func:`runtime.map_tasks
<influencespace.runtime.map_tasks>`), as TeraSort does: each manifest part counts its kept rows and
samples their ids (1 in 2,500); the driver turns the sample into range boundaries (about ``RANGE_ROWS``
= 250k kept rows a range); each part splits its kept rows by range into ``OUT/_work/``; each range is
sorted alone; the driver appends the sorted ranges, in order, ``READ_ROWS`` rows at a time, to
``uids.npy`` (its header written first from the count) / ``uids.txt`` / ``weights.parquet``, and
removes ``_work``. Memory: a task holds one manifest part or one range (≈ 100 bytes a row); the
driver, one read batch and the sample (≈ N / 2,500 ids: 400k at 1B rows). Scratch files: parts × ranges at most.
``webdataset`` and ``parquet`` read the kept rows as a Ray Data dataset, join the pool with them by id
(``Dataset.join``, a hash-partitioned join with one partition per 1M kept rows, so each task holds one
partition of each side) and write block by block. Every kept row must come out once: a kept id the
pool lacks is an error that names how many are missing.
"""

from __future__ import annotations

import json
import re
from typing import Any

import numpy as np
import pyarrow as pa

from influencespace import storage
from influencespace.config import RuntimeConfig
from influencespace.datasets.webdataset import IMAGE_EXTENSIONS, sample_key
from influencespace.errors import InfluenceSpaceError, InputDataError
from influencespace.layout import CURATED, manifest_dir
from influencespace.progress import NULL, Sink, track

FORMATS = ("uids", "webdataset", "parquet")
_HEX_UID = re.compile(r"^[0-9a-fA-F]{32}$")


def uid_array(ids: list[str]) -> np.ndarray:
    """Sorted uids as DataComp stores them (``u8,u8`` halves) or, for other ids, a sorted string array.

    In memory; what the streaming ``uids`` export writes, row for row (the tests compare them).
    """
    ids = sorted(ids)
    if ids and all(_HEX_UID.match(i) for i in ids):
        return hex_halves(np.asarray(ids, dtype=object))
    return np.array(ids, dtype=str)


def repeats(weights: np.ndarray) -> np.ndarray:
    """Copies of each kept sample in ``--weights repeats`` mode: max(1, round(weight))."""
    return np.maximum(1, np.rint(np.asarray(weights, dtype=np.float64))).astype(np.int64)


def manifest_directory(run_dir: str, policy: str = CURATED) -> str:
    """The manifest directory of ``policy`` in a run whose curate stage finished (else a clear error)."""
    curate_dir = storage.join(run_dir, "curate")
    if not storage.exists(storage.join(curate_dir, "_SUCCESS.json")):
        raise InfluenceSpaceError(f"{run_dir} has no finished curate stage: run the pipeline up to 'curate' first")
    directory = storage.join(curate_dir, manifest_dir(policy))
    if not storage.exists(directory):
        raise InfluenceSpaceError(f"{run_dir} has no manifest for policy '{policy}'")
    return directory


def read_kept(run_dir: str, policy: str = CURATED) -> Any:
    """Kept rows (``id``, ``weight``) of a finished curate stage, as one pyarrow table in memory.

    For inspection and small runs; export itself streams (:func:`kept_dataset`).
    """
    return _kept_rows(storage.read_table(manifest_directory(run_dir, policy), columns=["id", "keep", "weight"]))


def _kept_rows(batch):
    import pyarrow.compute as pc

    return batch.filter(pc.field("keep")).select(["id", "weight"])


def kept_dataset(directory: str):
    """The kept rows (``id``, ``weight``) of a manifest directory as a Ray Data dataset (its parts, in parallel)."""
    import ray.data

    fs, path = storage.resolve(directory)
    return ray.data.read_parquet(path, filesystem=fs, columns=["id", "keep", "weight"],
                                 file_extensions=["parquet"]).map_batches(_kept_rows, batch_format="pyarrow")


def _id_stats(batch):
    """Per batch: rows, rows whose id is not a 32-hex-digit uid, the longest id (in characters)."""
    import pyarrow.compute as pc

    ids = batch.column("id")
    hex_uid = pc.match_substring_regex(ids, _HEX_UID.pattern)
    return {"rows": [batch.num_rows], "non_hex": [batch.num_rows - pc.sum(hex_uid).as_py() if batch.num_rows else 0],
            "max_len": [pc.max(pc.utf8_length(ids)).as_py() or 0 if batch.num_rows else 0]}


_NIBBLE = np.full(256, 255, np.uint8)
_NIBBLE[np.frombuffer(b"0123456789", np.uint8)] = np.arange(10)
_NIBBLE[np.frombuffer(b"abcdef", np.uint8)] = np.arange(10, 16)
_NIBBLE[np.frombuffer(b"ABCDEF", np.uint8)] = np.arange(10, 16)


def hex_halves(ids: np.ndarray) -> np.ndarray:
    """32-hex-digit uids as DataComp's ``u8,u8`` records (high and low 64 bits), vectorised.

    Two hex digits make one byte; 16 bytes read big-endian are the two 64-bit halves (48 bytes a row).
    """
    digits = _NIBBLE[np.asarray(ids, dtype="S32").view(np.uint8).reshape(len(ids), 32)]
    halves = ((digits[:, 0::2] << 4) | digits[:, 1::2]).view(">u8").astype(np.uint64)
    out = np.empty(len(ids), dtype=np.dtype("u8,u8"))
    out["f0"], out["f1"] = halves[:, 0], halves[:, 1]
    return out


# The uids sort, as TeraSort does it: a sample of ids fixes range boundaries, every manifest part splits
# its kept rows by range, and each range (about RANGE_ROWS rows) is sorted alone, in a task. A sort task
# holds its range about three times over (the table, the sort's indices, the sorted copy): 250k rows
# keep it near a manifest-part task's size (1M rows made it the export's largest worker: 1.3x its
# 100k-row peak in the scale harness).
RANGE_ROWS = 250_000
SAMPLES_PER_RANGE = 100  # sampled ids per range to come (boundaries only: a poor sample makes ranges uneven, never wrong)
READ_ROWS = 16_384  # rows the driver holds while it appends a sorted range
WORK_DIR = "_work"
_KEPT_SCHEMA = pa.schema([("id", pa.string()), ("weight", pa.float64())])


def _manifest_parts(directory: str) -> list[str]:
    return sorted(storage.list_files(directory, ".parquet"))


def _read_kept_part(uri: str):
    return _kept_rows(storage.read_table(uri, columns=["id", "keep", "weight"]))


def scan_part(sample_rate: float, uri: str) -> dict[str, Any]:
    """One manifest part's kept rows: how many, the id statistics, and evenly spaced sorted ids.

    ``sample_rate`` × rows ids (at least two); the driver asks ``SAMPLES_PER_RANGE / RANGE_ROWS``, so
    the sample grows as N / 2,500 in all, what keeps every range within about 10% of ``RANGE_ROWS``.
    """
    kept = _read_kept_part(uri)
    stats = _id_stats(kept)
    ids = np.sort(np.asarray(kept.column("id").to_pylist(), dtype=object))
    samples = min(len(ids), max(2, int(np.ceil(len(ids) * sample_rate))))
    picks = ids[np.linspace(0, len(ids) - 1, samples).astype(int)] if len(ids) else ids
    return {"rows": kept.num_rows, "non_hex": stats["non_hex"][0], "max_len": stats["max_len"][0],
            "sample": picks.tolist()}


def range_boundaries(scans: list[dict[str, Any]], range_rows: int) -> list[str]:
    """Ids that cut the kept rows into ranges of about ``range_rows``, from the parts' samples.

    A part's sampled id stands for ``rows / len(sample)`` rows; range r holds ids in
    ``[boundaries[r-1], boundaries[r])``.
    """
    total = sum(s["rows"] for s in scans)
    ranges = max(1, -(-total // range_rows))
    if ranges == 1:
        return []
    ids = np.asarray([i for s in scans for i in s["sample"]], dtype=object)
    stands_for = np.concatenate([np.full(len(s["sample"]), s["rows"] / max(1, len(s["sample"]))) for s in scans])
    order = np.argsort(ids, kind="stable")
    ids, cumulative = ids[order], np.cumsum(stands_for[order])
    cuts = np.searchsorted(cumulative, total * np.arange(1, ranges) / ranges, side="right")
    return sorted(set(ids[np.minimum(cuts, len(ids) - 1)].tolist()))


def split_part(work: str, boundaries: list[str], uri: str) -> int:
    """Write a part's kept rows to ``<work>/range-RRRRR/<part>`` by range; return how many."""
    kept = _read_kept_part(uri)
    if not kept.num_rows:
        return 0
    ranges = np.searchsorted(np.asarray(boundaries, dtype=object), np.asarray(kept.column("id").to_pylist(),
                                                                              dtype=object), side="right")
    storage.write_partitions(kept, ranges, work, "range", uri.rsplit("/", 1)[-1])
    return kept.num_rows


def sort_range(work: str, index: int) -> str | None:
    """Sort one range's rows by id into ``<work>/sorted-RRRRR.parquet``; None when the range is empty."""
    directory = storage.join(work, f"range-{index:05d}")
    if not storage.exists(directory) or not storage.parquet_files(directory):
        return None
    table = storage.read_table(directory)
    out = storage.join(work, f"sorted-{index:05d}.parquet")
    storage.write_table(table.sort_by("id"), out, row_group_size=READ_ROWS)
    storage.remove_tree(directory)
    return out


def _export_uids(directory: str, out_uri: str, runtime: Any, progress: Sink = NULL) -> int:
    """Stream the kept ids, sorted, into ``uids.npy``, ``uids.txt`` and ``weights.parquet``; return the count.

    Three passes of tasks (:func:`influencespace.runtime.map_tasks`): scan (counts and a sample of ids),
    split by range, sort each range; the driver appends the sorted ranges in order, a batch at a time.
    """
    import contextlib
    import functools

    import pyarrow.parquet as pq

    from influencespace.runtime import map_tasks

    parts = _manifest_parts(directory)
    work = storage.join(out_uri, WORK_DIR)
    storage.remove_tree(work)
    scans = list(map_tasks(runtime, functools.partial(scan_part, SAMPLES_PER_RANGE / RANGE_ROWS), parts))
    count = sum(s["rows"] for s in scans)
    hex_uids = count > 0 and sum(s["non_hex"] for s in scans) == 0
    dtype = np.dtype("u8,u8") if hex_uids else np.dtype(f"<U{max([1] + [s['max_len'] for s in scans])}")
    boundaries = range_boundaries(scans, RANGE_ROWS)
    del scans
    split = sum(map_tasks(runtime, functools.partial(split_part, work, boundaries), parts))
    written = 0
    with contextlib.ExitStack() as stack:
        npy, txt, weights = (stack.enter_context(storage.open_output(storage.join(out_uri, name)))
                             for name in ("uids.npy", "uids.txt", "weights.parquet"))
        np.lib.format.write_array_header_1_0(
            npy, {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": (count,)})
        writer = stack.enter_context(pq.ParquetWriter(weights, _KEPT_SCHEMA))
        for sorted_uri in map_tasks(runtime, functools.partial(sort_range, work), range(len(boundaries) + 1)):
            if sorted_uri is None:
                continue
            fs, path = storage.resolve(sorted_uri)
            with fs.open_input_file(path) as handle:
                for batch in pq.ParquetFile(handle).iter_batches(batch_size=READ_ROWS):
                    ids = np.asarray(batch.column(0).to_pylist(), dtype=object)
                    npy.write((hex_halves(ids) if hex_uids else np.asarray(ids, dtype=dtype)).tobytes())
                    txt.write(("\n".join(ids) + "\n").encode())
                    writer.write_batch(batch.cast(_KEPT_SCHEMA))
                    written += batch.num_rows
                    progress.add(batch.num_rows)
        if not written == split == count:
            raise InfluenceSpaceError(f"export: {count} kept rows counted, {split} split by range and {written} "
                                      f"written sorted; did the manifest change while exporting?")
    storage.remove_tree(work)
    return count


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


def _counting(counter: Any, progress: Sink):
    """A Ray Data UDF that counts rows exactly across the cluster (a ``RayCount`` actor) and shows progress."""

    def count(batch):
        import ray

        ray.get(counter.add.remote(batch.num_rows))  # waits: the total is read right after the write
        progress.add(batch.num_rows)
        return batch

    return count


def _kept_stats(batch: dict) -> dict:
    """Per batch of kept rows: how many, and how many copies ``--weights repeats`` writes of them."""
    return {"rows": [len(batch["weight"])], "copies": [int(repeats(batch["weight"]).sum()) if len(batch["weight"]) else 0]}


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
               rows_per_file: int = 10_000, pairs_uri: str | None = None, runtime: Any = None) -> dict[str, int]:
    """Write the kept subset of ``run_dir`` to ``out_uri`` in ``fmt``; return counts.

    ``pairs_uri``: raw pairs (WebDataset tars or Parquet) to take sample bytes from; default the run's
    data pool. Runs on Ray: call it with Ray up (``runtime.ensure_ray``; the CLI does). ``runtime``
    (a :class:`~influencespace.config.RuntimeConfig`, default Ray) runs the ``uids`` sort's tasks.
    """
    if fmt not in FORMATS:
        raise InfluenceSpaceError(f"unknown export format '{fmt}'; choose one of {', '.join(FORMATS)}")
    if weights_mode not in ("field", "repeats"):
        raise InfluenceSpaceError(f"--weights must be 'field' or 'repeats', got '{weights_mode}'")
    import ray

    from influencespace.progress import RayCount

    directory = manifest_directory(run_dir, policy)
    if fmt == "uids":
        with track("export", None, "rows") as bar:
            return {"kept": _export_uids(directory, out_uri, runtime or RuntimeConfig(), bar)}
    kept = kept_dataset(directory)  # the joins' side; the uids sort reads the parts in its own tasks

    pool_uri, pool_format, id_column = _pool_source(run_dir)
    if pairs_uri:
        pool_uri, pool_format = pairs_uri, pairs_format(pairs_uri)
    elif pool_format == "embeddings":
        raise InputDataError(
            f"{run_dir} started from precomputed embeddings ({pool_uri}): its pool holds no image bytes; "
            f"pass --pairs URI with the original pairs (WebDataset tars or Parquet) to export {fmt}"
        )
    stats = kept.map_batches(_kept_stats, batch_format="numpy").take_all()  # one pass over the manifest
    kept_rows, copies = (int(sum(row[k] for row in stats)) for k in ("rows", "copies"))
    counter = RayCount.start()
    # One join partition per ~1M kept rows: each join task then holds about that many rows of each side.
    partitions = max(1, -(-kept_rows // 1_000_000))
    with track("export", kept_rows, "rows") as bar:
        ds = _read_pool(pool_uri, pool_format, id_column).join(kept, join_type="inner", num_partitions=partitions,
                                                               on=("id",))
        ds = ds.map_batches(_counting(counter, bar.sink()), batch_format="pyarrow")
        fs, path = storage.resolve(out_uri)
        if fmt == "parquet":
            ds.write_parquet(path, filesystem=fs, min_rows_per_file=rows_per_file)
        else:
            before = set(storage.list_files(out_uri, ".tar"))
            ds = ds.map_batches(_to_webdataset_rows(weights_mode), batch_format="pyarrow")
            ds.write_webdataset(path, filesystem=fs, encoder=None, min_rows_per_file=rows_per_file)
    exported = int(ray.get(counter.value.remote()))
    if exported != kept_rows:
        raise InputDataError(
            f"export wrote {exported} of the manifest's {kept_rows} kept rows to {out_uri}: the pairs at {pool_uri} lack "
            f"{kept_rows - exported} kept id(s) (or hold some twice); pass --pairs with the pairs this run curated"
        )
    counts = {"kept": kept_rows}
    if fmt != "parquet":
        counts["shards"] = _number_shards(out_uri, before)
        counts["samples"] = copies if weights_mode == "repeats" else kept_rows
    counts["files"] = sum(1 for _ in storage.list_files(out_uri, recursive=True))
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
