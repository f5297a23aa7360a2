"""Embed fixtures: a 3 M-parameter open_clip architecture and a tiny offline-default checkpoint."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest

TINY_CLIP = "influencespace-tiny-clip"
TINY_CLIP_CONFIG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}


@pytest.fixture(scope="session")
def tiny_clip(tmp_path_factory):
    """(config JSON path, weights-only checkpoint path) of a seeded, randomly initialised tiny CLIP."""
    import torch

    from influencespace.embed.open_clip_config import register_open_clip_config

    directory = tmp_path_factory.mktemp("tiny-clip")
    config_path = directory / f"{TINY_CLIP}.json"
    config_path.write_text(json.dumps(TINY_CLIP_CONFIG))
    register_open_clip_config(TINY_CLIP, config_path.read_text())
    import open_clip

    torch.manual_seed(0)
    model = open_clip.create_model(TINY_CLIP)
    checkpoint = directory / "tiny-clip.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}}, checkpoint)
    return config_path, checkpoint


def png(array: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()
