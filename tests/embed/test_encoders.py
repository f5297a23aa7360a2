"""Encoders, preprocessing and fusion against exact references (no Ray)."""

import io

import numpy as np
import pytest

from influencespace.embed import fusion, pairs
from influencespace.embed.encoders import load_weights_only, open_clip_spec
from influencespace.embed.preprocess import ImageDecodeError, ImagePreprocess
from influencespace.embed.registry import load_encoder
from influencespace.errors import ConfigError
from tests.embed.conftest import TINY_CLIP, png

TEXTS = ["a photo of a sneaker.", "a canvas shoe with a pliable rubber sole.", "a bag."]


def _images(n=3, shape=(28, 40, 3), seed=0):
    rng = np.random.default_rng(seed)
    return [png(rng.integers(0, 256, shape, dtype=np.uint8)) for _ in range(n)]


@pytest.mark.parametrize("mode,interpolation", [("shortest", "bicubic"), ("squash", "bilinear")])
def test_preprocessing_equals_open_clip_eval_transform(mode, interpolation):
    import open_clip
    import torch
    from PIL import Image

    from influencespace.embed.encoders import pixels_to_tensor

    pre = ImagePreprocess(24, mode, interpolation, (0.4, 0.5, 0.6), (0.2, 0.3, 0.25))
    reference = open_clip.image_transform(24, is_train=False, mean=pre.mean, std=pre.std, resize_mode=mode, interpolation=interpolation)
    for raw in _images(shape=(28, 40, 3)) + _images(shape=(50, 31, 3), seed=1):
        ours = pixels_to_tensor(pre(raw)[None], pre)[0]
        theirs = reference(Image.open(io.BytesIO(raw)))
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)


def test_undecodable_bytes_raise_a_decode_error():
    pre = ImagePreprocess(16)
    for bad in (b"not an image", png(np.zeros((8, 8, 3), np.uint8))[:30]):
        with pytest.raises(ImageDecodeError, match="undecodable image") as info:
            pre(bad)
        assert " at 0x" not in str(info.value)  # reasons are the same in every run


def test_open_clip_encoder_equals_the_model_and_fusion_equals_the_formula(tiny_clip):
    import open_clip
    import torch
    from PIL import Image

    config_path, checkpoint = tiny_clip
    spec = open_clip_spec(TINY_CLIP, str(checkpoint), str(config_path))
    assert spec.checkpoint == str(checkpoint) and spec.dim == 32 and spec.image_preprocess.size == 32
    encoder = load_encoder(spec)

    # Reference: open_clip's own model, transform and tokenizer.
    model, _, transform = open_clip.create_model_and_transforms(TINY_CLIP)
    open_clip.load_checkpoint(model, str(checkpoint), weights_only=True)
    model.eval()
    images = _images()
    with torch.no_grad():
        v_ref = model.encode_image(torch.stack([transform(Image.open(io.BytesIO(b))) for b in images]), normalize=True).numpy()
        t_ref = model.encode_text(open_clip.get_tokenizer(TINY_CLIP)(TEXTS), normalize=True).numpy()
    v, t = encoder.embed_images(images), encoder.embed_texts(TEXTS)
    np.testing.assert_allclose(v, v_ref, atol=1e-5)
    np.testing.assert_allclose(t, t_ref, atol=1e-5)

    # The stage's batch path: decode → encode → fuse, against x = f(v, t) written out by hand.
    shard = pairs.Shard("pool", 0, "parquet", (), 3, "image", ())
    batch = pairs.prepare_rows({"id": ["a", "b", "c"], "text": TEXTS, "image": images}, shard, 0,
                               spec.image_preprocess, spec.text_preprocess)
    for mode, alpha in (("concat", 0.5), ("concat", 0.8), ("sum", 0.3)):
        out = pairs.embed_prepared(batch, encoder, mode, alpha, "float32")
        if mode == "concat":
            expected = np.concatenate([np.sqrt(alpha) * v_ref, np.sqrt(1 - alpha) * t_ref], axis=1)
        else:
            mixed = alpha * v_ref + (1 - alpha) * t_ref
            expected = mixed / np.linalg.norm(mixed, axis=1, keepdims=True)
        np.testing.assert_allclose(out["embedding"], expected, atol=1e-5)
        np.testing.assert_allclose(out["image_embedding"], v_ref, atol=1e-5)
        np.testing.assert_allclose(out["image_text_cosine"], np.sum(v_ref * t_ref, axis=1), atol=1e-5)
        np.testing.assert_allclose(np.linalg.norm(out["embedding"], axis=1), 1.0, atol=1e-5)


def test_concat_fusion_keeps_the_weighted_tower_cosines():
    rng = np.random.default_rng(0)
    v, t = fusion.normalise(rng.normal(size=(5, 8))), fusion.normalise(rng.normal(size=(5, 8)))
    x = fusion.fuse(v, t, "concat", 0.7)
    np.testing.assert_allclose(x @ x.T, 0.7 * v @ v.T + 0.3 * t @ t.T, atol=1e-6)
    assert fusion.fused_dim(8, "concat") == 16 and fusion.fused_dim(8, "sum") == 8
    with pytest.raises(ValueError, match="embed.fusion"):
        fusion.fuse(v, t, "max")


def test_a_checkpoint_with_pickled_objects_is_refused(tmp_path):
    import torch

    path = tmp_path / "evil.pt"
    torch.save({"state_dict": {}, "payload": _NotAWeight()}, path)
    with pytest.raises(ConfigError, match="not a weights-only torch checkpoint"):
        load_weights_only(str(path))


class _NotAWeight:
    pass


def test_a_hub_tag_that_cannot_load_says_what_to_do(tiny_clip):
    config_path, _ = tiny_clip
    spec = open_clip_spec(TINY_CLIP, "laion2b_s34b_b79k", str(config_path))
    assert spec.tag == "laion2b_s34b_b79k" and spec.checkpoint is None
    with pytest.raises(ConfigError, match="model hub.*checkpoint path or s3://"):
        load_encoder(spec)
    with pytest.raises(ConfigError, match="not an open_clip architecture"):
        open_clip_spec("no-such-architecture", None)
    with pytest.raises(ConfigError, match="does not exist"):
        open_clip_spec(TINY_CLIP, "/nowhere/model.pt", str(config_path))


def test_offline_default_loads_weights_only_and_pads_per_batch(offline_checkpoint):
    from influencespace.embed.offline_default import spec_from_checkpoint

    spec = spec_from_checkpoint(offline_checkpoint.read_bytes(), str(offline_checkpoint))
    assert spec.kind == "offline-default" and spec.dim == 32 and spec.image_preprocess.size == 32
    encoder = load_encoder(spec)
    images = [png(np.full((28, 28), 40 * k, np.uint8)) for k in range(3)]
    v, t = encoder.embed_images(images), encoder.embed_texts(TEXTS)
    assert v.shape == (3, 32) and t.shape == (3, 32)
    np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-5)
    # A short caption embeds the same alone and beside a long one (padding is masked out).
    np.testing.assert_allclose(encoder.embed_texts(TEXTS[2:])[0], t[2], atol=1e-5)


def test_an_open_clip_checkpoint_is_not_taken_for_the_offline_default(tiny_clip):
    from influencespace.embed.offline_default import spec_from_checkpoint

    with pytest.raises(ConfigError, match="not an offline-default checkpoint.*embed.model=open_clip"):
        spec_from_checkpoint(tiny_clip[1].read_bytes(), str(tiny_clip[1]))


def test_minilm_on_torch_layers_equals_transformers_bert():
    import torch
    from transformers import BertModel

    from influencespace.embed.minilm import load_minilm
    from influencespace.embed.offline_default import minilm_dir, preprocessing

    _, text = preprocessing(32, 64)
    ids, lengths = text(TEXTS)
    width = int(lengths.max())
    ids = torch.from_numpy(ids[:, :width].astype(np.int64))
    mask = torch.from_numpy((np.arange(width)[None] < lengths[:, None]).astype(np.int64))
    with torch.inference_mode():
        ours = load_minilm(minilm_dir())(ids, mask)
        theirs = BertModel.from_pretrained(str(minilm_dir())).eval()(input_ids=ids, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(ours[mask.bool()], theirs[mask.bool()], rtol=0, atol=1e-4)


def test_offline_default_build_is_deterministic(offline_checkpoint, tmp_path):
    """Two builds with the same settings give the same weights bit for bit (so a fresh machine embeds
    with the model the docs were measured with), and the fingerprint says so while the file hash cannot."""
    import torch

    from influencespace.embed.encoders import load_weights_only
    from influencespace.embed.offline_default import (
        AlignmentSettings,
        build_default_checkpoint,
        spec_from_checkpoint,
        weights_fingerprint,
    )

    again = tmp_path / "again.pt"
    build_default_checkpoint(str(again), AlignmentSettings(images=200, steps=20, batch_size=64, dim=32, image_size=32))
    first, second = (load_weights_only(p.read_bytes()) for p in (offline_checkpoint, again))
    for name, tensor in first["state_dict"].items():
        assert torch.equal(tensor, second["state_dict"][name]), f"{name} differs between two builds"
    specs = [spec_from_checkpoint(p.read_bytes(), str(p)) for p in (offline_checkpoint, again)]
    assert specs[0].weights_sha256 == specs[1].weights_sha256 == first["weights_sha256"] == weights_fingerprint(second["state_dict"])
    changed = {k: v.clone() for k, v in first["state_dict"].items()}
    name = next(iter(changed))
    changed[name].view(-1)[0] += 1e-6
    assert weights_fingerprint(changed) != first["weights_sha256"]


def test_the_alignment_follows_the_built_in_benchmark(monkeypatch, tmp_path):
    """embed.alignment='auto' aligns on the benchmark being curated (its own cache file); user data and
    an explicit choice keep theirs."""
    from influencespace.config import load_config
    from influencespace.embed.offline_default import default_checkpoint_path
    from influencespace.embed.registry import alignment_domain

    monkeypatch.setenv("INFLUENCESPACE_CACHE", str(tmp_path))
    shapes = load_config("test", ["data.benchmark.name=shape_captions"])
    assert alignment_domain(shapes.embed, shapes.data) == "shape_captions"
    user = load_config("test", ["data.source=parquet", "data.uri=/x", "data.benchmark.name=shape_captions"])
    assert alignment_domain(user.embed, user.data) == "fashion_captions"
    chosen = load_config("test", ["embed.alignment=fashion_captions", "data.benchmark.name=shape_captions"])
    assert alignment_domain(chosen.embed, chosen.data) == "fashion_captions"
    assert default_checkpoint_path() == str(tmp_path / "offline-default-v1.pt")
    assert default_checkpoint_path("shape_captions") == str(tmp_path / "offline-default-v1-shape_captions.pt")


def test_heads_aligned_on_rendered_shapes_tell_the_shapes_apart(tmp_path):
    """A small build on the shape renders: deterministic, recorded as such, and zero-shot far above chance."""
    from influencespace.embed.encoders import load_weights_only
    from influencespace.embed.offline_default import AlignmentSettings, build_default_checkpoint

    settings = AlignmentSettings(images=300, steps=60, batch_size=128, dim=32, image_size=32, domain="shape_captions")
    paths = [tmp_path / "a.pt", tmp_path / "b.pt"]
    for path in paths:
        build_default_checkpoint(str(path), settings)
    first, second = (load_weights_only(p.read_bytes()) for p in paths)
    assert first["weights_sha256"] == second["weights_sha256"]
    assert first["training"]["alignment_slice"].startswith("shape-captions alignment renders")
    assert first["training"]["heldout_zero_shot_accuracy"] > 0.5  # chance is 0.1
