"""A variant's rows as pixels and tokens, for the ``open_clip`` target: raw pairs joined with the manifest.

The embed stage cut every split into shards and saved the cut (``embed/_PLAN.json``): embedded pool
shard ``part-NNNNN`` holds the embeddable rows of plan shard NNNNN, in order. So the raw rows of pool
shard k are read with the embed stage's own reader (:func:`influencespace.embed.pairs.prepared_batches`:
the same Parquet row ranges or WebDataset tar, the same decoding, resized and tokenised for the
*target's* model) and joined with manifest part k by id — one shard at a time, never the whole pool.
The baseline keeps every row of the embedded pool shard (its ids are read from that shard), weight 1.

A row the embed stage embedded but that does not decode now, or a kept id missing from the raw shard,
is an error naming the shard: the raw pool changed after embedding, and training on what is left
would silently drop rows.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np

from influencespace import layout, storage
from influencespace.errors import InputDataError, StageStateError


def raw_shards(embed_stage_dir: str, split: str) -> dict[int, str]:
    """The embed stage's shards of ``split`` (index → shard JSON), from its saved plan (O(shards))."""
    from influencespace.embed.pairs import Shard

    plan_uri = storage.join(embed_stage_dir, layout.EMBED_PLAN_FILE)
    if not storage.exists(plan_uri):
        raise StageStateError(
            f"the embed stage left no shard plan at {plan_uri}: train.target=open_clip trains from the raw pairs the "
            "embed stage read, which embeddings given as input (data.source=embeddings) do not have; use "
            "train.target=heads, or embed the raw pairs"
        )
    shards = {}
    for text in storage.read_json(plan_uri)["shards"]:
        shard = Shard.from_json(text)
        if shard.split == split:
            shards[shard.index] = text
    return shards


def shard_index(pool_shard: str) -> int:
    """NNNNN of ``.../part-NNNNN.parquet`` (the embed stage's shard numbering)."""
    name = pool_shard.rsplit("/", 1)[-1]
    digits = name.removeprefix("part-").removesuffix(".parquet")
    if not digits.isdigit():
        raise StageStateError(f"embedded pool shard {pool_shard} is not named part-NNNNN.parquet; rerun embed")
    return int(digits)


def raw_sources(embed_stage_dir: str, pool_shards: Sequence[str]) -> tuple[str, ...]:
    """The plan shard JSON of each embedded pool shard, in the same order."""
    by_index = raw_shards(embed_stage_dir, "pool")
    missing = [s for s in pool_shards if shard_index(s) not in by_index]
    if missing:
        raise StageStateError(f"embedded pool shard {missing[0]} is not in the embed stage's plan; rerun embed")
    return tuple(by_index[shard_index(s)] for s in pool_shards)


def _kept(pool_shard: str, manifest_part: str):
    """(kept ids as an Arrow array, their weights): the manifest part's, or every pool row at weight 1."""
    if manifest_part:
        from influencespace.train.data import kept_rows

        return kept_rows(manifest_part)
    ids = storage.read_table(pool_shard, columns=["id"]).column("id").combine_chunks()
    return ids, np.ones(len(ids))


def read_pixel_pair(pool_shard: str, manifest_part: str, raw_shard: str, image, text,
                    chunk_rows: int) -> Iterator[dict[str, np.ndarray]]:
    """The kept rows of one pool shard as ``{"id", "image" uint8 [n,S,S,3], "text" int32 [n,L], "weight"}``.

    Memory: the shard's kept ids and weights plus one chunk of ``chunk_rows`` decoded rows.
    """
    import pyarrow as pa

    from influencespace.embed.pairs import Shard, prepared_batches
    from influencespace.train.data import match_kept

    kept_ids, kept_weight = _kept(pool_shard, manifest_part)
    if len(kept_ids) == 0:
        return
    shard = Shard.from_json(raw_shard)
    counted = 0
    for batch in prepared_batches(shard, image, text, chunk_rows):
        position, found = match_kept(pa.array(batch["id"], pa.string()), kept_ids)
        unreadable = found & (batch["reason"] != "")
        if unreadable.any():
            i = int(np.flatnonzero(unreadable)[0])
            raise InputDataError(
                f"row '{batch['id'][i]}' of {pool_shard}'s raw shard was embedded but cannot be read now "
                f"({batch['reason'][i]}); the raw pool changed after the embed stage: rerun embed"
            )
        if not found.any():
            continue
        counted += int(found.sum())
        yield {"id": batch["id"][found], "image": batch["pixels"][found], "text": batch["tokens"][found],
               "weight": kept_weight[position[found]]}
    if counted != len(kept_ids):
        where = f"manifest part {manifest_part}" if manifest_part else f"embedded pool shard {pool_shard}"
        raise InputDataError(
            f"{where} keeps {len(kept_ids) - counted} id(s) that the raw pairs of shard {shard.index} lack; the raw "
            "pool changed after the embed stage: rerun embed"
        )


def _fill(raw_shards_json, wanted, image, text, chunk_rows: int):
    """(pixels, tokens, seen) of the rows ``wanted`` (an Arrow string array) found in these raw shards."""
    import pyarrow as pa

    from influencespace.embed.pairs import Shard, prepared_batches
    from influencespace.train.data import match_kept

    pixels = np.zeros((len(wanted), image.size, image.size, 3), np.uint8)
    tokens = np.zeros((len(wanted), text.max_length), np.int32)
    seen = np.zeros(len(wanted), bool)
    for raw in raw_shards_json:
        for batch in prepared_batches(Shard.from_json(raw), image, text, chunk_rows):
            position, found = match_kept(pa.array(batch["id"], pa.string()), wanted)
            take = found & (batch["reason"] == "")
            rows = position[take]
            pixels[rows], tokens[rows], seen[rows] = batch["pixels"][take], batch["tokens"][take], True
    return pixels, tokens, seen


def _missing(ids, seen: np.ndarray, where: str) -> None:
    if not seen.all():
        raise InputDataError(
            f"{int((~seen).sum())} embedded row(s) (e.g. '{ids[np.flatnonzero(~seen)[0]]}') are not among the raw "
            f"pairs of {where} that the embed stage planned; the raw data changed after embed: rerun embed"
        )


def split_pixels(embed_stage_dir: str, split: str, ids: np.ndarray, image, text,
                 chunk_rows: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """(pixels [n,S,S,3] uint8, tokens [n,L] int32) of the rows ``ids`` of a (small) split, in ``ids``' order.

    For evaluation: the test split is thousands of rows, so all of it is held (n·S²·3 bytes).
    """
    import pyarrow as pa

    wanted = pa.array([str(i) for i in ids], pa.string())
    pixels, tokens, seen = _fill(raw_shards(embed_stage_dir, split).values(), wanted, image, text, chunk_rows)
    _missing(ids, seen, f"the {split} split")
    return pixels, tokens


def shard_pixels(raw_shard: str, ids: np.ndarray, image, text, chunk_rows: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """(pixels, tokens) of the rows ``ids`` of one raw shard (plan shard JSON), in ``ids``' order.

    Memory: the rows asked for plus one decoded chunk; the shard is read once.
    """
    import pyarrow as pa

    from influencespace.embed.pairs import Shard

    wanted = pa.array([str(i) for i in ids], pa.string())
    pixels, tokens, seen = _fill([raw_shard], wanted, image, text, chunk_rows)
    _missing(ids, seen, f"raw shard {Shard.from_json(raw_shard).index}")
    return pixels, tokens
