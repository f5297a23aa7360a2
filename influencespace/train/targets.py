"""What the train stage trains: the model, how a worker reads and feeds its rows, how it encodes the test split.

One recipe (:mod:`influencespace.train.recipe`) trains either target; they differ only here:

- ``heads`` (the default): :class:`~influencespace.train.model.ClipHeads`, CLIP's projection heads and
  temperature over the frozen tower embeddings of the embedded pool (seconds per run on a CPU).
- ``open_clip``: a whole open_clip model — image tower, text tower, projections, temperature —
  built by open_clip's own factory (``open_clip.create_model``) and trained from pixels. Its rows are
  the pool's raw pairs, read through the embed stage's shard plan (pool shard k is plan shard k),
  decoded and resized as open_clip's transform does (:mod:`influencespace.embed.preprocess`) and
  tokenised with open_clip's tokenizer, then joined with the variant's manifest part. Pixels travel
  as uint8 (4× smaller than float32) and are normalised on the worker's device.

A target is plain data (it pickles to Ray Data tasks and Ray Train workers) and knows: ``build(seed)``
a seeded model whose ``forward(image, text)`` returns (normalised image features, normalised text
features, exp(logit scale)); ``read(...)`` one shard pair's kept rows; ``inputs(batch, device, dtype)``
the tensors of a micro-batch; ``export_state`` / ``load`` the saved weights; ``describe()`` the JSON
record that evaluate rebuilds the target from.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any, ClassVar

import numpy as np

from influencespace.errors import ConfigError, InputDataError

# The default open_clip target: a CLIP small enough to train from pixels on 2 CPU cores in minutes.
# 32 px input (28 px Fashion-MNIST resized up by open_clip's transform) in 4×4 patches gives 64
# tokens, enough spatial detail for clothing shapes; width 64 with 2 layers keeps a step near a few
# ms per sample. The text context of 32 tokens holds every benchmark caption (the longest WordNet
# caption tokenises to about 20). A ViT-B-32 on a cluster is the same code with another name.
PIXELS_TINY = "influencespace-pixels-tiny"
BUILTIN_CONFIGS: dict[str, dict] = {
    PIXELS_TINY: {
        "embed_dim": 64,
        "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "head_width": 32, "patch_size": 4},
        "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
    },
}
PIXEL_CHUNK_BYTES = 32 << 20  # pixels per chunk read from a shard (and per Ray Data block): ~32 MiB


# --------------------------------------------------------------------------------------------------
# heads over frozen tower embeddings


@dataclass(frozen=True)
class HeadsTarget:
    """CLIP heads over the embedded pool's tower embeddings (``image_dim`` → ``head_dim`` ← ``text_dim``)."""

    image_dim: int
    text_dim: int
    head_dim: int
    logit_scale_init: float
    kind: ClassVar[str] = "heads"

    @property
    def chunk_rows(self) -> int:
        from influencespace.train.data import CHUNK_ROWS

        return CHUNK_ROWS

    def build(self, seed: int):
        from influencespace.train.model import build_model

        return build_model(self.image_dim, self.text_dim, self.head_dim, self.logit_scale_init, seed)

    def read(self, pool_shard: str, manifest_part: str, raw_shard: str = "") -> Iterator[dict[str, np.ndarray]]:
        from influencespace.train.data import read_pair

        return read_pair(pool_shard, manifest_part, self.chunk_rows)

    def inputs(self, batch: dict[str, np.ndarray], device: Any, dtype: Any):
        import torch

        image = torch.from_numpy(np.ascontiguousarray(batch["image"])).to(device, dtype)
        text = torch.from_numpy(np.ascontiguousarray(batch["text"])).to(device, dtype)
        return image, text

    def synthetic_batch(self, rng: np.random.Generator, rows: int) -> dict[str, np.ndarray]:
        return {"id": np.zeros(rows), "image": rng.standard_normal((rows, self.image_dim), dtype=np.float32),
                "text": rng.standard_normal((rows, self.text_dim), dtype=np.float32)}

    def export_state(self, state: dict) -> dict:
        return state

    def load(self, state: dict):
        from influencespace.train.model import load_model

        return load_model(state, self.logit_scale_init)

    def encode(self, state: dict, test: Any) -> tuple[np.ndarray, np.ndarray]:
        """Projected, normalised test features: the heads applied to the test split's tower embeddings."""
        from influencespace.train.model import encode

        return encode(self.load(state), test.image, test.text)

    def describe(self) -> dict:
        return {"kind": self.kind, "image_dim": self.image_dim, "text_dim": self.text_dim, "head_dim": self.head_dim,
                "logit_scale_init": self.logit_scale_init}


# --------------------------------------------------------------------------------------------------
# a whole open_clip model from pixels


@contextlib.contextmanager
def _quiet_root_warnings(active: bool) -> Iterator[None]:
    """Hide open_clip's root-logger warning that a model starts from random weights, when that is the plan."""
    import logging

    def hide(record: logging.LogRecord) -> bool:
        return "initialized randomly" not in record.getMessage()

    if active:
        logging.getLogger().addFilter(hide)
    try:
        yield
    finally:
        if active:
            logging.getLogger().removeFilter(hide)


@dataclass(frozen=True)
class OpenClipTarget:
    """An open_clip architecture (by name; a custom one travels as its config JSON), trained from pixels.

    ``tag`` / ``checkpoint``: open_clip pretrained weights to start from (a hub tag, or a weights-only
    checkpoint path or URI); neither: open_clip's own random init, seeded.
    """

    name: str
    model_config: str | None  # JSON of a custom architecture (registered with open_clip where it is built)
    image: Any  # ImagePreprocess: decode + resize as open_clip's eval transform, then (x/255 − mean)/std
    text: Any  # TextPreprocess: open_clip's tokenizer at the model's context length
    tag: str | None = None
    checkpoint: str | None = None
    kind: ClassVar[str] = "open_clip"

    @property
    def chunk_rows(self) -> int:
        return max(64, PIXEL_CHUNK_BYTES // (3 * self.image.size**2))

    def _register(self) -> None:
        if self.model_config:
            from influencespace.embed.open_clip_config import register_open_clip_config

            register_open_clip_config(self.name, self.model_config)

    def _create(self, pretrained: bool):
        import open_clip

        self._register()
        # A (1,)-shaped logit scale, not open_clip's 0-d one: DeepSpeed broadcasts parameters as bytes,
        # which 0-d tensors cannot be; open_clip's load_checkpoint reshapes either way.
        random_init = not (pretrained and self.tag)
        with _quiet_root_warnings(random_init):  # "No pretrained weights loaded": the intended, seeded init
            model = open_clip.create_model(self.name, pretrained=self.tag if pretrained else None,
                                           weights_only=True, nonscalar_logit_scale=True)
        if pretrained and self.checkpoint:
            from influencespace.embed.encoders import _local_copy

            with _local_copy(self.checkpoint) as path:
                open_clip.load_checkpoint(model, path, weights_only=True)
        return model

    def build(self, seed: int):
        import torch

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return self._create(pretrained=True)

    def read(self, pool_shard: str, manifest_part: str, raw_shard: str = "") -> Iterator[dict[str, np.ndarray]]:
        from influencespace.train.pixels import read_pixel_pair

        return read_pixel_pair(pool_shard, manifest_part, raw_shard, self.image, self.text, self.chunk_rows)

    def inputs(self, batch: dict[str, np.ndarray], device: Any, dtype: Any):
        import torch

        from influencespace.embed.encoders import pixels_to_tensor

        image = pixels_to_tensor(np.asarray(batch["image"]), self.image, device).to(dtype)
        text = torch.from_numpy(np.asarray(batch["text"], dtype=np.int64)).to(device)
        return image, text

    def synthetic_batch(self, rng: np.random.Generator, rows: int) -> dict[str, np.ndarray]:
        size, context = self.image.size, self.text.max_length
        return {"id": np.zeros(rows), "image": rng.integers(0, 256, (rows, size, size, 3), dtype=np.uint8),
                "text": rng.integers(1, 1000, (rows, context), dtype=np.int32)}

    def export_state(self, state: dict) -> dict:
        return state  # open_clip's own keys: open_clip.create_model(name, pretrained="model.pt") loads it

    def load(self, state: dict):
        model = self._create(pretrained=False)
        model.load_state_dict({k: v.float() for k, v in state.items()})
        return model.float().eval()

    def encode(self, state: dict, test: Any, batch: int = 256) -> tuple[np.ndarray, np.ndarray]:
        """Normalised features of the test split's own pixels and captions by the trained towers."""
        import torch

        from influencespace.embed.encoders import pixels_to_tensor

        if test.pixels is None or test.tokens is None:
            raise InputDataError("the open_clip target scores the test split's pixels, but none were read")
        model = self.load(state)
        images, texts = [], []
        with torch.inference_mode():
            for start in range(0, len(test.pixels), batch):
                pixels = pixels_to_tensor(np.asarray(test.pixels[start:start + batch]), self.image)
                images.append(model.encode_image(pixels, normalize=True).float().numpy())
                tokens = torch.from_numpy(np.asarray(test.tokens[start:start + batch], dtype=np.int64))
                texts.append(model.encode_text(tokens, normalize=True).float().numpy())
        return np.concatenate(images), np.concatenate(texts)

    def describe(self) -> dict:
        return {"kind": self.kind, "name": self.name, "model_config": self.model_config, "tag": self.tag,
                "checkpoint": self.checkpoint, "image": asdict(self.image), "text": asdict(self.text)}


Target = HeadsTarget | OpenClipTarget


def open_clip_target(name: str, config_uri: str | None, pretrained: str | None) -> OpenClipTarget:
    """Resolve ``train.open_clip_model`` (built-in, open_clip's, or a custom config) without building it."""
    from influencespace.embed.encoders import open_clip_spec

    config_json = None
    if name in BUILTIN_CONFIGS and not config_uri:
        from influencespace.embed.open_clip_config import register_open_clip_config

        config_json = json.dumps(BUILTIN_CONFIGS[name])
        register_open_clip_config(name, config_json)
    spec = open_clip_spec(name, pretrained, config_uri, section="train")
    config_json = config_json or spec.model_config
    return OpenClipTarget(name=name, model_config=config_json, image=spec.image_preprocess,
                          text=spec.text_preprocess, tag=spec.tag, checkpoint=spec.checkpoint)


def target_from_config(cfg: Any, dims: tuple[int, int]) -> Target:
    """The target ``train.target`` names (``dims``: the embedded pool's image and text widths, for heads)."""
    if cfg.target == "heads":
        return HeadsTarget(dims[0], dims[1], cfg.head_dim, cfg.logit_scale_init)
    if cfg.target == "open_clip":
        return open_clip_target(cfg.open_clip_model, cfg.open_clip_config, cfg.pretrained)
    raise ConfigError(f"unknown train.target '{cfg.target}' (allowed: heads, open_clip)")


def target_from_record(record: dict | None) -> Target:
    """Rebuild the target a train run recorded (``describe()``); runs from before targets were heads."""
    if not record or record.get("kind") == "heads":
        record = record or {}
        return HeadsTarget(int(record.get("image_dim", 0)), int(record.get("text_dim", 0)),
                           int(record.get("head_dim", 0)), float(record.get("logit_scale_init", 1 / 0.07)))
    if record.get("kind") == "open_clip":
        from influencespace.embed.preprocess import ImagePreprocess, TextPreprocess

        image = {**record["image"], "mean": tuple(record["image"]["mean"]), "std": tuple(record["image"]["std"])}
        return OpenClipTarget(name=record["name"], model_config=record.get("model_config"),
                              image=ImagePreprocess(**image), text=TextPreprocess(**record["text"]),
                              tag=record.get("tag"), checkpoint=record.get("checkpoint"))
    raise ConfigError(f"the train stage recorded an unknown target {record.get('kind')!r}; rerun train")
