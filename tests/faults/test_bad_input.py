"""Bad input, fuzzed from a seed: every row is embedded or rejected with a reason, every broken file is a
clear :class:`InputDataError` naming the file (and the column), never a raw traceback or a silent drop.

Cases covered elsewhere (listed in docs/reliability.md): missing / mistyped columns
(tests/embed/test_pairs.py, tests/datasets/test_stage.py), NaN embeddings (tests/datasets/test_precomputed.py,
tests/cluster/test_stage.py), a corrupted ``_SUCCESS.json`` (tests/test_stages.py).
"""

from __future__ import annotations

import io
import json
import struct
import tarfile
import zlib

import numpy as np
import pyarrow as pa
import pytest

from influencespace import storage
from influencespace.errors import InfluenceSpaceError, InputDataError, StageStateError
from influencespace.stages import read_manifest, run_pipeline

pytestmark = pytest.mark.faults

SEED = 20260
ROWS = 96


def _png(array: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def _bomb_png(width: int = 60_000, height: int = 60_000) -> bytes:
    """A valid PNG header announcing 3.6 G pixels (PIL refuses it before allocating anything)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b"")


# kind -> (image, caption, expected reason prefix or None when the row must be embedded)
def _row(kind: str, rng: np.random.Generator, good: bytes) -> tuple[bytes | None, str | None, str | None]:
    if kind == "ok":
        return good, f"a photo of item {int(rng.integers(1000))}.", None
    if kind == "garbage":
        return rng.bytes(int(rng.integers(1, 200))), "a coat.", "undecodable image"
    if kind == "truncated":
        return good[: int(rng.integers(8, len(good) - 1))], "a coat.", "undecodable image"
    if kind == "bitflip":
        flipped = bytearray(good)
        for i in rng.choice(np.arange(16, len(flipped)), size=8, replace=False):
            flipped[i] ^= 0xFF
        return bytes(flipped), "a coat.", None  # may or may not decode: either outcome is fine, checked apart
    if kind == "bomb":
        return _bomb_png(), "a coat.", "undecodable image: DecompressionBombError"
    if kind == "empty_bytes":
        return b"", "a coat.", "undecodable image"
    if kind == "missing_image":
        return None, "a coat.", "missing image"
    if kind == "empty_caption":
        return good, "", "empty caption"
    if kind == "blank_caption":
        return good, " \t\n ", "empty caption"
    if kind == "missing_caption":
        return good, None, "missing caption"
    raise AssertionError(kind)


KINDS = ("ok", "garbage", "truncated", "bitflip", "bomb", "empty_bytes", "missing_image", "empty_caption",
         "blank_caption", "missing_caption")


def _fuzzed_rows(seed: int, n: int) -> tuple[dict[str, list], dict[str, tuple[str, str | None]]]:
    rng = np.random.default_rng(seed)
    good = _png(rng.integers(0, 255, (28, 28), dtype=np.uint8))
    kinds = [KINDS[i % len(KINDS)] for i in range(n)]  # every kind, several times
    rng.shuffle(kinds)
    rows: dict[str, list] = {"id": [], "image": [], "text": []}
    expected = {}
    for i, kind in enumerate(kinds):
        image, text, reason = _row(kind, rng, good)
        rows["id"].append(f"fz-{i:04d}")
        rows["image"].append(image)
        rows["text"].append(text)
        expected[f"fz-{i:04d}"] = (kind, reason)
    return rows, expected


def _local(make_config, checkpoint, uri: str, source: str = "parquet", run_dir: str | None = None):
    return make_config(
        "runtime.runner=local", f"data.source={source}", f"data.uri={uri}", f"embed.pretrained={checkpoint}",
        "embed.rows_per_shard=16", "embed.batch_size=8", run_dir=run_dir,
    )


def _embedded_and_rejected(config) -> tuple[list[str], dict[str, str]]:
    embedded = storage.read_table(storage.join(config.run_dir, "embed", "pool"), columns=["id"]).column("id").to_pylist()
    rejects_uri = storage.join(config.run_dir, "embed", "rejects")
    rejected = {}
    if storage.list_files(rejects_uri, ".parquet", recursive=True):
        rejected = {r["id"]: r["reason"] for r in storage.read_table(rejects_uri).to_pylist()}
    return embedded, rejected


def test_fuzzed_rows_are_embedded_or_rejected_with_a_reason_none_lost(make_config, offline_checkpoint, tmp_path, record_fault):
    rows, expected = _fuzzed_rows(SEED, ROWS)
    # Two files, so that shards span file boundaries too.
    half = ROWS // 2
    storage.write_table(pa.table({k: v[:half] for k, v in rows.items()}), str(tmp_path / "pairs" / "part-0.parquet"))
    storage.write_table(pa.table({k: v[half:] for k, v in rows.items()}), str(tmp_path / "pairs" / "part-1.parquet"))
    config = _local(make_config, offline_checkpoint, str(tmp_path / "pairs"))
    run_pipeline(config, ["data", "embed"], report=lambda _: None)

    embedded, rejected = _embedded_and_rejected(config)
    twice = sorted({i for i in embedded if embedded.count(i) > 1})
    assert not twice and not set(embedded) & set(rejected), (
        f"embedded twice {twice[:10]}; embedded and rejected {sorted(set(embedded) & set(rejected))[:10]}"
    )
    accounted = sorted(embedded + list(rejected))
    assert accounted == sorted(expected), (  # every id exactly once: nothing lost
        f"{len(expected)} ids in, {len(accounted)} out; lost {sorted(set(expected) - set(accounted))[:10]}, "
        f"unknown {sorted(set(accounted) - set(expected))[:10]}"
    )
    for row_id, (kind, reason) in expected.items():
        if kind == "bitflip":
            assert row_id in embedded or rejected[row_id].startswith("undecodable image"), (kind, rejected.get(row_id))
        elif reason is None:
            assert row_id in embedded, (kind, row_id, rejected.get(row_id))
        else:
            assert rejected.get(row_id, "").startswith(reason), (kind, rejected.get(row_id))
    counts = read_manifest(config, "embed")["counts"]
    assert counts["pool"] + counts["pool_rejected"] == counts["pool_input"] == ROWS, (counts, ROWS)
    injected = sum(kind != "ok" for kind, _ in expected.values())
    record_fault(f"fuzzed bad rows (seed {SEED}): garbage/truncated/bit-flipped/bomb/empty images, "
                 "missing images, empty/blank/missing captions", f"{len(rejected)} rejected with a reason, rest embedded",
                 injected=injected)


def _tar(path, samples: list[dict[str, bytes]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for sample in samples:
            key = sample.pop("__key__")
            for ext, payload in sample.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))


def test_non_utf8_captions_are_rejected_with_a_reason_or_named(make_config, offline_checkpoint, tmp_path, record_fault):
    good = _png(np.full((28, 28), 90, np.uint8))
    samples = [
        {"__key__": "w0", "png": good, "txt": b"a shirt."},
        {"__key__": "w1", "png": good, "txt": b"\xff\xfe caf\xe9 \x80"},  # Latin-1 / garbage, not UTF-8
        {"__key__": "w2", "png": good, "txt": "un café, s'il vous plaît.".encode()},
        {"__key__": "w3", "png": good, "txt": b""},
    ]
    _tar(tmp_path / "wds" / "shard-0.tar", samples)
    config = _local(make_config, offline_checkpoint, str(tmp_path / "wds"), source="webdataset")
    run_pipeline(config, ["data", "embed"], report=lambda _: None)
    embedded, rejected = _embedded_and_rejected(config)
    assert sorted(embedded) == ["w0", "w2"]
    assert rejected == {"w1": "caption is not valid UTF-8", "w3": "empty caption"}

    # Parquet: a binary caption column is refused up front, naming the file and the column.
    storage.write_table(pa.table({"id": ["p0"], "image": [good], "text": [b"\xff\xfe"]}), str(tmp_path / "bin" / "part-0.parquet"))
    binary = _local(make_config, offline_checkpoint, str(tmp_path / "bin"), run_dir=str(tmp_path / "run-bin"))
    with pytest.raises(InputDataError, match=r"part-0.parquet': column 'text' has type binary, expected string"):
        run_pipeline(binary, ["data", "embed"], report=lambda _: None)
    record_fault("non-UTF-8 captions (WebDataset .txt, Parquet binary column)",
                 "row rejected 'caption is not valid UTF-8' / InputDataError naming file and column 'text'", injected=2)


@pytest.mark.parametrize("layout", ["same_file", "two_files", "webdataset"])
def test_duplicate_ids_are_a_clear_error_naming_file_and_column(layout, make_config, offline_checkpoint, tmp_path, record_fault):
    good = _png(np.full((28, 28), 60, np.uint8))
    if layout == "webdataset":
        _tar(tmp_path / "in" / "a.tar", [{"__key__": "k0", "png": good, "txt": b"a"}, {"__key__": "k1", "png": good, "txt": b"b"}])
        _tar(tmp_path / "in" / "b.tar", [{"__key__": "k1", "png": good, "txt": b"c"}])
        source, where = "webdataset", r"b.tar': column 'id' repeats id 'k1' of '.*a.tar'"
    else:
        ids = [["d0", "d1", "d0"], []] if layout == "same_file" else [["d0", "d1"], ["d2", "d1"]]
        for i, file_ids in enumerate(ids):
            if file_ids:
                storage.write_table(pa.table({"id": file_ids, "image": [good] * len(file_ids), "text": ["t"] * len(file_ids)}),
                                    str(tmp_path / "in" / f"part-{i}.parquet"))
        source = "parquet"
        where = (r"part-0.parquet': column 'id' repeats id 'd0' \(split 'pool'\)" if layout == "same_file"
                 else r"part-1.parquet': column 'id' repeats id 'd1' of '.*part-0.parquet'")
    config = _local(make_config, offline_checkpoint, str(tmp_path / "in"), source=source)
    with pytest.raises(InputDataError, match=where):
        run_pipeline(config, ["data", "embed"], report=lambda _: None)
    assert read_manifest(config, "embed") is None
    record_fault(f"duplicate ids ({layout})", "InputDataError naming the file, column 'id' and the id; nothing written")


def test_corrupted_parquet_input_is_a_clear_error_naming_the_file(make_config, offline_checkpoint, tmp_path, record_fault):
    rng = np.random.default_rng(SEED)
    good = _png(np.full((28, 28), 30, np.uint8))
    table = pa.table({"id": [f"c{i}" for i in range(40)], "image": [good] * 40, "text": ["a bag."] * 40})
    storage.write_table(table.slice(0, 20), str(tmp_path / "ok" / "part-0.parquet"))
    storage.write_table(table.slice(20), str(tmp_path / "ok" / "part-1.parquet"))
    raw = (tmp_path / "ok" / "part-1.parquet").read_bytes()
    cases = {
        "footer": raw[:-12] + rng.bytes(12),  # footer length / magic destroyed
        "truncated": raw[: len(raw) // 2],
        "pages": raw[:4] + rng.bytes(len(raw) // 2 - 4) + raw[len(raw) // 2 :],  # data pages overwritten, footer intact
    }
    for name, payload in cases.items():
        directory = tmp_path / name
        directory.mkdir()
        (directory / "part-0.parquet").write_bytes((tmp_path / "ok" / "part-0.parquet").read_bytes())
        (directory / "part-1.parquet").write_bytes(payload)
        config = _local(make_config, offline_checkpoint, str(directory), run_dir=str(tmp_path / f"run-{name}"))
        with pytest.raises(InputDataError, match=r"part-1.parquet'"):
            run_pipeline(config, ["data", "embed"], report=lambda _: None)
        assert read_manifest(config, "embed") is None
    record_fault("corrupted input Parquet (footer, truncated, data pages)", "InputDataError naming the file; no manifest",
                 injected=len(cases))


def test_corrupted_state_files_are_clear_errors(make_config, offline_checkpoint, tmp_path, record_fault):
    good = _png(np.full((28, 28), 200, np.uint8))
    storage.write_table(pa.table({"id": [f"s{i}" for i in range(12)], "image": [good] * 12, "text": ["a hat."] * 12}),
                        str(tmp_path / "in" / "part-0.parquet"))
    config = _local(make_config, offline_checkpoint, str(tmp_path / "in"))
    run_pipeline(config, ["data", "embed"], report=lambda _: None)
    embed_dir = tmp_path / "run" / "embed"
    success = (embed_dir / "_SUCCESS.json").read_bytes()
    faults = 0
    for name, payload, error in [
        ("_SUCCESS.json", b"\x00\xff not json", r"_SUCCESS.json' is not valid JSON"),
        ("_SUCCESS.json", json.dumps({"no": "fingerprint"}).encode(), r"_SUCCESS.json' is not a stage manifest"),
    ]:
        (embed_dir / name).write_bytes(payload)
        with pytest.raises(InfluenceSpaceError, match=error):
            run_pipeline(config, ["data", "embed"], report=lambda _: None)
        faults += 1
    (embed_dir / "_SUCCESS.json").write_bytes(success)
    # An interrupted run whose _STARTED.json / _PLAN.json got garbled: a clear error, --overwrite recovers.
    (embed_dir / "_SUCCESS.json").unlink()
    for name in ("_STARTED.json", "_PLAN.json"):
        saved = (embed_dir / name).read_bytes()
        (embed_dir / name).write_bytes(b"{garbled")
        with pytest.raises(InfluenceSpaceError, match=rf"{name}' is not valid JSON"):
            run_pipeline(config, ["data", "embed"], report=lambda _: None)
        (embed_dir / name).write_bytes(saved)
        faults += 1
    outcome = run_pipeline(config, ["data", "embed"], overwrite=True, report=lambda _: None)
    assert outcome[-1].manifest["counts"]["pool"] == 12
    record_fault("corrupted stage state files (_SUCCESS.json x2, _STARTED.json, _PLAN.json)",
                 "error naming the file and pointing at --overwrite; --overwrite recovers", injected=faults)


def test_corrupted_kmeans_checkpoint_is_a_clear_error(tmp_path, record_fault):
    from influencespace.cluster.checkpoint import StorageCheckpoint

    checkpoint = StorageCheckpoint(str(tmp_path / "checkpoint"))
    checkpoint.save("flat", {"iteration": 2, "centroids": np.ones((3, 4), np.float32), "history": [], "converged": False})
    assert checkpoint.load("flat")["iteration"] == 2
    (tmp_path / "checkpoint" / "flat.npz").write_bytes(b"PK\x03\x04 not a zip")
    with pytest.raises(StageStateError, match=r"flat.npz' is not a readable k-means checkpoint.*--overwrite"):
        checkpoint.load("flat")
    record_fault("corrupted k-means checkpoint", "StageStateError naming the file and --overwrite")
