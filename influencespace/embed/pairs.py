"""Input pairs → shards → prepared batches → embedded batches → shard files. No Ray here.

**Shards.** Every split is cut into shards with deterministic boundaries, planned once on the driver
and saved in the stage directory (``_PLAN.json``), so a resumed run cuts exactly the same way even if
``embed.rows_per_shard`` changed meanwhile:

- Parquet: the files (sorted) are one row sequence, read from the footers only; shard k is rows
  [k·R, (k+1)·R) of it, where R = ``rows_per_shard``. A shard may span files; a file many shards.
- WebDataset: one shard per ``.tar`` (samples are counted once while planning, in a task per tar).

**Ids are unique in a split**, checked while planning at any size without holding them: every file's
(tar's) ids are hashed into ⌈N / 4M⌉ bucket files under ``_work/ids/`` by a task per file, and a task
per bucket finds repeats (:func:`influencespace.ids.find_repeated_ids`, on the stage's runner); the
error names the file, the column and the id.

Shard k of split s is written as ``<s>/part-<k>.parquet`` plus ``rejects/<s>-part-<k>.parquet``
(rejects first: the embeddings file is the completion marker). Both writes are atomic, so a shard
that exists is complete, and a resumed run skips it without re-embedding.

**Rows are never dropped.** A row that cannot be embedded (undecodable image, missing or empty
caption, missing image file) travels on with a ``reason`` and is written to ``rejects/``; every
shard checks embedded + rejected = planned rows, and so does the stage, per split.
"""

from __future__ import annotations

import json
import logging
import posixpath
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from influencespace import layout, storage
from influencespace.embed.fusion import fuse, image_text_cosine
from influencespace.embed.preprocess import ImageDecodeError, ImagePreprocess, TextPreprocess, check_caption
from influencespace.errors import InfluenceSpaceError, InputDataError, StageStateError
from influencespace.ids import find_repeated_ids

log = logging.getLogger(__name__)

PASSTHROUGH = ("group", "label")
REQUIRED = ("id", "text")
IMAGE_COLUMNS = ("image", "image_path")
TAR_SAMPLES_GUESS = 10_000  # samples per tar before they are counted (DataComp's shards): sizes the id buckets


def check_unique_ids(split: str, files: list[str], repeats: list[tuple[Any, list[int]]], column: str = "id",
                     advice: str = "") -> None:
    """Raise :class:`InputDataError` naming the file, the column and the id for the first repeated id.

    ``repeats``: ``(id, [positions of the files it is in, …])`` from :func:`influencespace.ids.find_repeated_ids`.
    """
    if not repeats:
        return
    value, positions = min(repeats, key=lambda r: (sorted(r[1])[1], r[0]))  # the one met first in file order
    first, again = sorted(positions)[:2]
    where = "" if first == again else f" of '{files[first]}'"
    more = f" ({len(repeats) - 1} more repeated id(s) shown in the log)" if len(repeats) > 1 else ""
    if len(repeats) > 1:
        log.error("embed: repeated ids in split '%s': %s", split,
                  "; ".join(f"{v!r} in {', '.join(files[i] for i in sorted(set(p)))}" for v, p in repeats))
    raise InputDataError(
        f"'{files[again]}': column '{column}' repeats id {value!r}{where} (split '{split}'); every input id must be "
        f"unique{more}{advice}"
    )


PLAN_FILE = layout.EMBED_PLAN_FILE
PLAN_VERSION = 1


@dataclass(frozen=True)
class Piece:
    """Rows [start, stop) of one input file (a whole tar for WebDataset)."""

    uri: str
    start: int
    stop: int


@dataclass(frozen=True)
class Shard:
    split: str
    index: int
    fmt: str  # "parquet" | "webdataset"
    pieces: tuple[Piece, ...]
    rows: int
    image_column: str  # "image" or "image_path"
    passthrough: tuple[tuple[str, str], ...]  # (column, Arrow type) kept beside the embedding

    @property
    def output(self) -> str:
        return f"{self.split}/part-{self.index:05d}.parquet"

    @property
    def rejects_output(self) -> str:
        return f"rejects/{self.split}-part-{self.index:05d}.parquet"

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> Shard:
        raw = json.loads(text)
        raw["pieces"] = tuple(Piece(**p) for p in raw["pieces"])
        raw["passthrough"] = tuple(tuple(p) for p in raw["passthrough"])
        return cls(**raw)


# --------------------------------------------------------------------------------------------------
# Planning


def detect_format(uri: str, default: str) -> str:
    if uri.endswith(".tar"):
        return "webdataset"
    if uri.endswith(".parquet"):
        return "parquet"
    if storage.list_files(uri, ".parquet", recursive=True):
        return "parquet"
    if storage.list_files(uri, ".tar"):
        return "webdataset"
    return default


def _check_schema(uri: str, schema: Any) -> tuple[str, tuple[tuple[str, str], ...]]:
    """Fail fast, naming the file and the column; return the image column and passthrough columns."""
    import pyarrow as pa

    names = schema.names
    missing = [c for c in REQUIRED if c not in names]
    if not any(c in names for c in IMAGE_COLUMNS):
        missing.append("image (encoded bytes) or image_path")
    if missing:
        raise InputDataError(
            f"'{uri}' lacks column(s) {', '.join(missing)}; it has: {', '.join(names)}. Input pairs need id, text and image or image_path"
        )
    image_column = "image" if "image" in names else "image_path"
    expected = {
        "id": (pa.types.is_string, pa.types.is_large_string, pa.types.is_integer),
        "text": (pa.types.is_string, pa.types.is_large_string, pa.types.is_null),
        "image": (pa.types.is_binary, pa.types.is_large_binary, pa.types.is_null),
        "image_path": (pa.types.is_string, pa.types.is_large_string),
    }
    wanted = {"id": "string", "text": "string", "image": "binary (encoded image bytes)", "image_path": "string"}
    for column in ("id", "text", image_column):
        kind = schema.field(column).type
        if not any(check(kind) for check in expected[column]):
            raise InputDataError(f"'{uri}': column '{column}' has type {kind}, expected {wanted[column]}")
    passthrough = tuple((c, str(schema.field(c).type)) for c in PASSTHROUGH if c in names)
    return image_column, passthrough


def _parquet_footers(files: list[str]) -> list[tuple[int, Any]]:
    import pyarrow.parquet as pq

    def read(uri: str) -> tuple[int, Any]:
        fs, path = storage.resolve(uri)
        try:
            meta = pq.read_metadata(path, filesystem=fs)
        except Exception as exc:  # pyarrow raises several types for a bad footer
            raise InputDataError(f"'{uri}' is not a readable Parquet file: {exc}") from None
        return meta.num_rows, meta.schema.to_arrow_schema()

    with ThreadPoolExecutor(max_workers=8) as pool:  # footers are small reads: overlap the round trips
        return list(pool.map(read, files))


def parquet_ids(uri: str) -> tuple[list[Any], None]:
    """The ``id`` column of one file (only that column is read), for :func:`~influencespace.ids.find_repeated_ids`."""
    import pyarrow.parquet as pq

    fs, path = storage.resolve(uri)
    try:
        return pq.read_table(path, columns=["id"], filesystem=fs).column("id").to_pylist(), None
    except Exception as exc:  # a footer that reads but data pages that do not
        raise InputDataError(f"'{uri}': column 'id' is not readable: {exc}") from None


def _counted_tar_ids(uri: str) -> tuple[list[Any], tuple[int, list[str]]]:
    ids, keys = tar_ids(uri)
    return ids, (len(ids), keys)


def tar_ids(uri: str) -> tuple[list[Any], list[str]]:
    """The ids of one WebDataset tar, and which passthrough keys its samples carry (one read of the tar)."""
    from influencespace.datasets.webdataset import iter_samples

    keys: set[str] = set()
    ids = []
    for sample in iter_samples(uri):
        ids.append(sample.get("id"))
        keys.update(k for k in PASSTHROUGH if sample.get(k) is not None)
    return ids, sorted(keys)


def plan_split(split: str, uri: str, fmt: str, rows_per_shard: int, runtime: Any = None,
               work: str | None = None) -> list[Shard]:
    """Cut one split into shards (see the module docstring); checks every file's schema on the way.

    Ids are checked for repeats across the whole split in tasks on ``runtime`` (default: this
    process), with scratch files under ``work`` (default: a temporary directory); a WebDataset tar is
    read once, in its task, for its ids, sample count and keys.
    """
    from influencespace.config import RuntimeConfig

    runtime = runtime or RuntimeConfig(runner="local")
    scratch = None
    if work is None:
        import tempfile

        scratch = tempfile.TemporaryDirectory(prefix="influencespace-ids-")
        work = scratch.name
    try:
        return _plan_split(split, uri, fmt, rows_per_shard, runtime, storage.join(work, split))
    finally:
        if scratch is not None:
            scratch.cleanup()


def _plan_split(split: str, uri: str, fmt: str, rows_per_shard: int, runtime: Any, work: str) -> list[Shard]:
    if fmt == "parquet":
        files = [uri] if uri.endswith(".parquet") else storage.list_files(uri, ".parquet", recursive=True)
        if not files:
            raise InputDataError(f"no Parquet files at '{uri}' (split '{split}')")
        footers = _parquet_footers(files)
        image_column, passthrough = _check_schema(files[0], footers[0][1])
        for file_uri, (_, schema) in zip(files[1:], footers[1:], strict=True):
            if _check_schema(file_uri, schema) != (image_column, passthrough):
                raise InputDataError(f"'{file_uri}' has different columns from '{files[0]}'; every file of a split must share one schema")
        _, repeats = find_repeated_ids(runtime, files, parquet_ids, work, sum(n for n, _ in footers))
        check_unique_ids(split, files, repeats)
        shards: list[Shard] = []
        pieces: list[Piece] = []
        filled = 0
        for file_uri, (num_rows, _) in zip(files, footers, strict=True):
            start = 0
            while start < num_rows:
                take = min(num_rows - start, rows_per_shard - filled)
                pieces.append(Piece(file_uri, start, start + take))
                start += take
                filled += take
                if filled == rows_per_shard:
                    shards.append(Shard(split, len(shards), fmt, tuple(pieces), filled, image_column, passthrough))
                    pieces, filled = [], 0
        if filled:
            shards.append(Shard(split, len(shards), fmt, tuple(pieces), filled, image_column, passthrough))
        return shards
    if fmt == "webdataset":
        tars = [uri] if uri.endswith(".tar") else storage.list_files(uri, ".tar")
        if not tars:
            raise InputDataError(f"no WebDataset .tar shards at '{uri}' (split '{split}')")
        # One read of each tar, in a task: its ids (for the repeat check), sample count and keys.
        extras, repeats = find_repeated_ids(runtime, tars, _counted_tar_ids, work, len(tars) * TAR_SAMPLES_GUESS)
        check_unique_ids(split, tars, repeats)
        counts = [(n, set(keys)) for n, keys in extras]
        present = set().union(*(keys for _, keys in counts))
        types = {"group": "string", "label": "int64"}
        passthrough = tuple((c, types[c]) for c in PASSTHROUGH if c in present)
        non_empty = [(tar, n) for tar, (n, _) in zip(tars, counts, strict=True) if n]  # an empty tar has nothing to embed
        return [Shard(split, i, fmt, (Piece(tar, 0, n),), n, "image", passthrough) for i, (tar, n) in enumerate(non_empty)]
    raise InputDataError(f"unknown input format '{fmt}' for split '{split}'; use parquet or webdataset")


def load_or_make_plan(stage_dir: str, inputs: dict[str, tuple[str, str]], rows_per_shard: int,
                      runtime: Any = None) -> list[Shard]:
    """The saved plan of an interrupted run, or a new one (saved before any shard is written).

    ``inputs`` maps split → (uri, format).
    """
    plan_uri = storage.join(stage_dir, PLAN_FILE)
    if storage.exists(plan_uri):
        saved = storage.read_json(plan_uri)
        if saved.get("version") != PLAN_VERSION or saved.get("inputs") != {k: list(v) for k, v in inputs.items()}:
            raise StageStateError(
                f"'{plan_uri}' was planned for other inputs ({saved.get('inputs')}); rerun with --overwrite to start over"
            )
        if saved["rows_per_shard"] != rows_per_shard:
            log.warning(
                "embed: resuming with the saved shard plan (rows_per_shard=%s, not %s) so finished shards stay valid",
                saved["rows_per_shard"], rows_per_shard,
            )
        return [Shard.from_json(s) for s in saved["shards"]]
    shards = [s for split, (uri, fmt) in inputs.items()
              for s in plan_split(split, uri, fmt, rows_per_shard, runtime, storage.join(stage_dir, "_work", "ids"))]
    storage.write_json(
        plan_uri,
        {
            "version": PLAN_VERSION,
            "inputs": {k: list(v) for k, v in inputs.items()},
            "rows_per_shard": rows_per_shard,
            "shards": [s.to_json() for s in shards],
        },
    )
    return shards


# --------------------------------------------------------------------------------------------------
# Reading and preparing (the CPU half: runs in Ray Data tasks)


def read_shard(shard: Shard, batch_rows: int) -> Iterator[dict[str, list]]:
    """Yield the shard's input rows in order, as column lists of at most ``batch_rows`` rows."""
    columns = ["id", "text", shard.image_column, *[c for c, _ in shard.passthrough]]
    if shard.fmt == "webdataset":
        from influencespace.datasets.webdataset import iter_samples

        batch: dict[str, list] = {c: [] for c in columns}
        for sample in iter_samples(shard.pieces[0].uri):
            for c in columns:
                batch[c].append(sample.get(c))
            if len(batch["id"]) == batch_rows:
                yield batch
                batch = {c: [] for c in columns}
        if batch["id"]:
            yield batch
        return
    for piece in shard.pieces:
        try:
            yield from _read_piece(piece, columns, batch_rows)
        except InfluenceSpaceError:
            raise
        except Exception as exc:  # pages that do not decode: the file is damaged (its footer read fine)
            raise InputDataError(
                f"'{piece.uri}' is not a readable Parquet file (columns {', '.join(columns)}): {type(exc).__name__}: {exc}"
            ) from None


def _read_piece(piece: Piece, columns: list[str], batch_rows: int) -> Iterator[dict[str, list]]:
    import pyarrow.parquet as pq

    fs, path = storage.resolve(piece.uri)
    with fs.open_input_file(path) as handle:
        reader = pq.ParquetFile(handle)
        # Read only the row groups that overlap [start, stop), then slice.
        offset = 0
        for group in range(reader.num_row_groups):
            n = reader.metadata.row_group(group).num_rows
            lo, hi = max(piece.start, offset), min(piece.stop, offset + n)
            if lo < hi:
                table = reader.read_row_group(group, columns=columns).slice(lo - offset, hi - lo)
                for start in range(0, table.num_rows, batch_rows):
                    yield table.slice(start, batch_rows).to_pydict()
            offset += n
            if offset >= piece.stop:
                break


def prepare_rows(
    rows: dict[str, list], shard: Shard, first_row: int, image: ImagePreprocess, text: TextPreprocess, base_uri: str = ""
) -> dict[str, np.ndarray]:
    """Decode and preprocess one batch of input rows; rows that cannot be embedded get a ``reason``.

    Returns numpy columns: ``_split``, ``_shard``, ``_row`` (position inside the shard, to check
    order), ``id``, ``reason`` ('' when fine), ``pixels`` [n, S, S, 3] uint8 (zeros when rejected),
    ``tokens`` [n, L] int32, ``lengths`` [n] int32, and the passthrough columns.
    """
    n = len(rows["id"])
    reasons = [""] * n
    pixels = np.zeros((n, image.size, image.size, 3), dtype=np.uint8)
    texts = [""] * n
    for i in range(n):
        reason = check_caption(rows["text"][i])
        if rows["id"][i] is None:
            reason = "missing id"
        if reason is None:
            reason = _decode_into(pixels, i, rows[shard.image_column][i], shard.image_column, image, base_uri)
        if reason:
            reasons[i] = reason
        else:
            texts[i] = rows["text"][i]
    ok = [i for i in range(n) if not reasons[i]]
    tokens = np.zeros((n, text.max_length), dtype=np.int32)
    lengths = np.ones(n, dtype=np.int32)
    if ok:
        ids, lens = text([texts[i] for i in ok])
        tokens[ok], lengths[ok] = ids, lens
    out = {
        "_split": np.array([shard.split] * n, dtype=object),
        "_shard": np.full(n, shard.index, dtype=np.int32),
        "_row": np.arange(first_row, first_row + n, dtype=np.int32),
        "id": np.array(["" if v is None else str(v) for v in rows["id"]], dtype=object),
        "reason": np.array(reasons, dtype=object),
        "pixels": pixels,
        "tokens": tokens,
        "lengths": lengths,
    }
    for column, _ in shard.passthrough:
        out[column] = np.array(rows[column], dtype=object)
    return out


def _decode_into(pixels: np.ndarray, i: int, value: Any, column: str, image: ImagePreprocess, base_uri: str) -> str | None:
    if value is None:
        return "missing image"
    if column == "image_path":
        path = value if "://" in value or value.startswith("/") else posixpath.join(base_uri, value)
        try:
            value = storage.read_bytes(path)
        except Exception as exc:  # a missing or unreadable file is a row problem, not a stage failure
            return f"image file unreadable: {exc}"
    try:
        pixels[i] = image(value)
    except ImageDecodeError as exc:
        return str(exc)
    return None


def prepared_batches(shard: Shard, image: ImagePreprocess, text: TextPreprocess, batch_rows: int) -> Iterator[dict[str, np.ndarray]]:
    """All prepared batches of one shard, in order (what a read task emits)."""
    base = shard.pieces[0].uri if shard.pieces else ""
    base = posixpath.dirname(base) if base.endswith((".parquet", ".tar")) else base
    row = 0
    for rows in read_shard(shard, batch_rows):
        yield prepare_rows(rows, shard, row, image, text, base)
        row += len(rows["id"])


# --------------------------------------------------------------------------------------------------
# Encoding (the accelerator half: runs in the actor pool)


def embed_prepared(batch: dict[str, np.ndarray], encoder: Any, fusion: str, image_weight: float, dtype: str) -> dict[str, np.ndarray]:
    """Encode the valid rows of a prepared batch; rejected rows keep zeros and their reason."""
    n = len(batch["id"])
    ok = np.asarray([r == "" for r in batch["reason"]], dtype=bool)
    d = encoder.dim
    v = np.zeros((n, d), dtype=np.float32)
    t = np.zeros((n, d), dtype=np.float32)
    if ok.any():
        v[ok] = encoder.encode_images(batch["pixels"][ok])
        t[ok] = encoder.encode_texts(batch["tokens"][ok], batch["lengths"][ok])
    x = fuse(v, t, fusion, image_weight)
    out = {k: batch[k] for k in batch if k not in ("pixels", "tokens", "lengths")}
    out.update(
        embedding=x.astype(dtype),
        image_embedding=v.astype(dtype),
        text_embedding=t.astype(dtype),
        image_text_cosine=image_text_cosine(v, t).astype(np.float32),
    )
    return out


# --------------------------------------------------------------------------------------------------
# Writing


def _fixed_list(matrix: np.ndarray):
    import pyarrow as pa

    matrix = np.ascontiguousarray(matrix)
    return pa.FixedSizeListArray.from_arrays(pa.array(matrix.reshape(-1)), matrix.shape[1])


def shard_tables(shard: Shard, parts: list[dict[str, np.ndarray]]) -> tuple[Any, Any]:
    """The embeddings table and the rejects table of one shard, after checking it is whole and in order."""
    import pyarrow as pa

    cols = {k: np.concatenate([np.asarray(p[k]) for p in parts]) for k in parts[0]} if parts else {}
    n = len(cols.get("id", []))
    if n != shard.rows or not (
        np.all(cols["_shard"] == shard.index) and np.all(cols["_split"] == shard.split) and np.array_equal(cols["_row"], np.arange(n))
    ):
        raise StageStateError(
            f"embed: shard {shard.split}/{shard.index} received {n} rows out of {shard.rows} or out of order; "
            f"this is a bug — nothing was written for this shard, rerun to retry it"
        )
    reasons = np.asarray([str(r) for r in cols["reason"]], dtype=object)
    ok = reasons == ""
    data: dict[str, Any] = {
        "id": pa.array(cols["id"][ok].tolist(), type=pa.string()),
        "embedding": _fixed_list(cols["embedding"][ok]),
        "image_embedding": _fixed_list(cols["image_embedding"][ok]),
        "text_embedding": _fixed_list(cols["text_embedding"][ok]),
        "image_text_cosine": pa.array(cols["image_text_cosine"][ok], type=pa.float32()),
    }
    for column, kind in shard.passthrough:
        values = [None if _is_missing(v) else v for v in cols[column][ok].tolist()]
        data[column] = pa.array(values).cast(pa.type_for_alias(kind) if kind in _ALIASES else pa.string())
    rejects = pa.table(
        {
            "id": pa.array(cols["id"][~ok].tolist(), type=pa.string()),
            "split": pa.array([shard.split] * int((~ok).sum()), type=pa.string()),
            "reason": pa.array(reasons[~ok].tolist(), type=pa.string()),
        }
    )
    return pa.table(data), rejects


_ALIASES = {"string", "large_string", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64", "bool",
            "float", "double", "float32", "float64", "halffloat", "float16"}


def _is_missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and np.isnan(value))


def write_shard(stage_dir: str, shard: Shard, parts: list[dict[str, np.ndarray]]) -> tuple[int, int]:
    """Write one shard atomically (rejects first, embeddings last); return (embedded, rejected)."""
    embeddings, rejects = shard_tables(shard, parts)
    storage.write_table(rejects, storage.join(stage_dir, shard.rejects_output))
    storage.write_table(embeddings, storage.join(stage_dir, shard.output))
    return embeddings.num_rows, rejects.num_rows


def shard_counts(stage_dir: str, shard: Shard) -> tuple[int, int] | None:
    """(embedded, rejected) of a finished shard from its Parquet footers, or None if it is not done."""
    import pyarrow.parquet as pq

    out_uri = storage.join(stage_dir, shard.output)
    if not storage.is_file(out_uri):
        return None
    counts = []
    for uri in (out_uri, storage.join(stage_dir, shard.rejects_output)):
        fs, path = storage.resolve(uri)
        try:
            counts.append(pq.read_metadata(path, filesystem=fs).num_rows)
        except FileNotFoundError:
            raise StageStateError(f"'{uri}' is missing though '{out_uri}' exists; rerun with --overwrite") from None
    return counts[0], counts[1]
