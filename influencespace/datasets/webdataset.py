"""WebDataset tars: write pairs as ``key.png`` + ``key.txt`` + ``key.json``, read them back.

The layout is WebDataset's own (https://github.com/webdataset/webdataset): a sample is the group of
consecutive tar members sharing a key, the extension naming each field. Ray Data's
``read_webdataset`` reads these shards too. The sample key is the id when it is a safe file stem
(letters, digits, ``-``, ``_``), else its hex; the JSON member always carries the real ``id``, so no
id is ever lost or changed.

Each shard is assembled in memory and written atomically, so memory is bounded by ``shard_rows`` and
a crash never leaves a half-written shard behind.
"""

from __future__ import annotations

import io
import json
import re
import tarfile
from collections.abc import Iterable, Iterator
from typing import Any

from influencespace import storage
from influencespace.errors import InputDataError

_SAFE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")
IMAGE_EXTENSIONS = ("png", "jpg", "jpeg", "webp")


def sample_key(sample_id: str) -> str:
    return sample_id if _SAFE_KEY.match(sample_id) else sample_id.encode().hex()


def _add(tar: tarfile.TarFile, name: str, payload: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(payload)
    info.mtime = 0  # reproducible shards
    tar.addfile(info, io.BytesIO(payload))


def write_shards(rows: Iterable[dict[str, Any]], out_uri: str, shard_rows: int = 1000, image_ext: str = "png") -> list[str]:
    """Write rows (``id``, ``image`` bytes, ``text``, anything else → JSON) as ``shard-NNNNNN.tar`` files."""
    written: list[str] = []
    batch: list[dict[str, Any]] = []

    def flush() -> None:
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as tar:
            for row in batch:
                key = sample_key(str(row["id"]))
                meta = {k: v for k, v in row.items() if k not in ("image", "text")}
                if row.get("image") is not None:
                    _add(tar, f"{key}.{image_ext}", row["image"])
                _add(tar, f"{key}.txt", (row.get("text") or "").encode())
                _add(tar, f"{key}.json", json.dumps(meta, sort_keys=True, default=str).encode())
        uri = storage.join(out_uri, f"shard-{len(written):06d}.tar")
        storage.write_bytes(uri, buf.getvalue())
        written.append(uri)
        batch.clear()

    for row in rows:
        batch.append(row)
        if len(batch) >= shard_rows:
            flush()
    if batch:
        flush()
    return written


def write_table(table: Any, out_uri: str, shard_rows: int = 1000) -> list[str]:
    """Write a pairs table (``id``, ``image``, ``text`` + passthrough columns) as WebDataset shards."""
    return write_shards(table.to_pylist(), out_uri, shard_rows)


def iter_samples(uri: str) -> Iterator[dict[str, Any]]:
    """Yield one dict per sample (``id``, ``image``, ``text`` + JSON fields) from a tar or a directory of tars."""
    shards = [uri] if uri.endswith(".tar") else storage.list_files(uri, ".tar")
    if not shards:
        raise InputDataError(f"no .tar shards at '{uri}'")
    for shard in shards:
        try:
            tar = tarfile.open(fileobj=io.BytesIO(storage.read_bytes(shard)), mode="r")
        except tarfile.TarError as exc:
            raise InputDataError(f"'{shard}' is not a readable tar file: {exc}") from None
        with tar:
            current_key, sample = None, {}
            for member in tar:
                if not member.isfile():
                    continue
                base = member.name.rsplit("/", 1)[-1]
                key, _, ext = base.partition(".")
                if key != current_key and sample:
                    yield _finish(sample, current_key, shard)
                    sample = {}
                current_key = key
                payload = tar.extractfile(member).read()
                sample[ext.lower()] = payload
            if sample:
                yield _finish(sample, current_key, shard)


def _finish(fields: dict[str, bytes], key: str | None, shard: str) -> dict[str, Any]:
    meta: dict[str, Any] = {}
    if "json" in fields:
        try:
            meta = json.loads(fields["json"])
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise InputDataError(f"sample '{key}' in '{shard}' has a JSON member that is not valid JSON") from None
    image = next((fields[e] for e in IMAGE_EXTENSIONS if e in fields), None)
    text_raw = fields.get("txt")
    text: str | bytes | None = None
    if text_raw is not None:
        try:
            text = text_raw.decode("utf-8")
        except UnicodeDecodeError:
            text = text_raw  # not text: the embed stage rejects the row with a reason (never a silent '�')
    return {**meta, "id": str(meta.get("id", key)), "image": image, "text": text}
