"""The benchmark in DataComp's layout: .tar + .parquet + .npz shards keyed by 32-hex uids."""

import hashlib

import numpy as np
import pyarrow as pa

from influencespace import storage
from influencespace.datasets import webdataset
from influencespace.datasets.datacomp import write_split
from influencespace.datasets.precomputed import PrecomputedSpec, read_shards
from influencespace.embed.offline_default import spec_from_checkpoint
from influencespace.embed.registry import load_encoder


def test_write_split_is_datacomp_shaped_and_reads_back(tiny_benchmark, offline_checkpoint, tmp_path):
    table = storage.read_table(str(tiny_benchmark / "validation")).slice(0, 9)
    rows = table.to_pylist()
    rows[4]["image"] = b"not an image"  # a failed download: left out
    encoder = load_encoder(spec_from_checkpoint(offline_checkpoint.read_bytes()))
    out = str(tmp_path / "validation")
    counts = write_split(pa.Table.from_pylist(rows), out, 5, encoder)
    assert counts == {"rows": 8, "undecodable": 1, "shards": 2}
    assert sorted(p.name for p in (tmp_path / "validation").iterdir()) == [
        f"0000000{i}.{ext}" for i in range(2) for ext in ("npz", "parquet", "tar")
    ]

    good = [r for i, r in enumerate(rows) if i != 4]
    uids = [hashlib.md5(r["id"].encode()).hexdigest() for r in good]
    meta = storage.read_table(out).to_pydict()
    assert meta["uid"] == uids and meta["benchmark_id"] == [r["id"] for r in good]
    assert meta["text"] == [r["text"] for r in good] and meta["label"] == [r["label"] for r in good]

    with np.load(tmp_path / "validation" / "00000000.npz") as npz:
        image, text = npz["b32_img"], npz["b32_txt"]
    assert image.dtype == text.dtype == np.float16 and image.shape == (4, encoder.dim)
    np.testing.assert_allclose(np.linalg.norm(image.astype(np.float32), axis=1), 1.0, atol=1e-2)
    expected = encoder.embed_images([good[0]["image"]])[0]
    np.testing.assert_allclose(image[0].astype(np.float32), expected, atol=2e-3)

    samples = list(webdataset.iter_samples(out))
    assert [s["uid"] for s in samples] == uids and samples[0]["image"] == good[0]["image"]
    assert samples[0]["group"] == good[0]["group"] and samples[0]["text"] == good[0]["text"]

    # The precomputed reader takes these shards as they are.
    spec = PrecomputedSpec("npz", id_column="uid", image_key="b32_img", text_key="b32_txt")
    shards = list(read_shards(out, spec))
    assert [i for s in shards for i in s.ids] == uids
    assert shards[0].passthrough["label"] == [r["label"] for r in good[:4]]

    # Complete shards are kept on a rerun (the .npz marks a shard done).
    before = (tmp_path / "validation" / "00000001.npz").stat().st_mtime_ns
    assert write_split(pa.Table.from_pylist(rows), out, 5, encoder) == counts
    assert (tmp_path / "validation" / "00000001.npz").stat().st_mtime_ns == before
