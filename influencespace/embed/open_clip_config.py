"""Custom open_clip architectures, known to open_clip in this process: a leaf module, so that the
tokenizer (``preprocess``) and the encoders can both register one without importing each other."""

from __future__ import annotations

import os
import tempfile


def register_open_clip_config(name: str, config_json: str) -> None:
    """Make a custom architecture known to open_clip in this process, under ``name``."""
    import open_clip

    if name in open_clip.list_models():
        return
    directory = tempfile.mkdtemp(prefix="influencespace-openclip-")
    with open(os.path.join(directory, f"{name}.json"), "w") as f:
        f.write(config_json)
    open_clip.add_model_config(directory)
