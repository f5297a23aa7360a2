"""Which encoder a config or a spec names, and building it: the one module that knows every kind
(open_clip, the offline default), so the encoders themselves never import each other."""

from __future__ import annotations

from typing import Any

from influencespace import storage
from influencespace.embed.encoders import Encoder, EncoderSpec, OpenClipEncoder, open_clip_spec
from influencespace.errors import ConfigError


def alignment_domain(embed: Any, data: Any | None = None) -> str:
    """The images the offline default's heads align on: ``embed.alignment``, where 'auto' follows the
    built-in benchmark of ``data`` (fashion_captions for any other input)."""
    chosen = getattr(embed, "alignment", "auto")
    if chosen != "auto":
        return chosen
    if data is not None and data.source == "benchmark":
        return data.benchmark.name
    return "fashion_captions"


def spec_from_config(embed: Any, data: Any | None = None) -> EncoderSpec:
    """Resolve ``embed.*`` settings to an :class:`EncoderSpec` (may build the offline default once)."""
    if embed.model == "open_clip":
        return open_clip_spec(embed.open_clip_model, embed.pretrained, getattr(embed, "open_clip_config", None))
    from influencespace.embed import offline_default

    uri = embed.pretrained or offline_default.ensure_default_checkpoint(alignment_domain(embed, data))
    return offline_default.spec_from_checkpoint(storage.read_bytes(uri), source=uri)


def load_encoder(spec: EncoderSpec, device: str = "cpu") -> Encoder:
    """Build the encoder ``spec`` describes on ``device`` ('cpu' or 'cuda')."""
    if device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise ConfigError("runtime.use_gpu is true but this worker sees no CUDA GPU; set runtime.use_gpu=false")
    if spec.kind == "open_clip":
        return OpenClipEncoder(spec, device)
    if spec.kind == "offline-default":
        from influencespace.embed.offline_default import OfflineDefaultEncoder

        return OfflineDefaultEncoder(spec, device)
    raise ConfigError(f"unknown encoder kind '{spec.kind}'")
