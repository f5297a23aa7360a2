"""The target model: CLIP-style projection heads and temperature over frozen tower embeddings.

The embed stage has already run both towers (image, text) over every pair; what training sees are the
unit-norm tower embeddings ``v`` and ``t``. The model learns

    z_v = normalize(W_v v),   z_t = normalize(W_t t),   logits = exp(s) · z_v z_tᵀ

with ``W_v``, ``W_t`` (no bias) and the log inverse temperature ``s`` trainable, and the towers frozen
(LiT-style). The loss is CLIP's symmetric in-batch InfoNCE. Why this is a fair proxy for "train a
CLIP model on this data": the same contrastive objective, the same pairs and the same in-batch
negatives, so mismatched captions, duplicates and missing styles hurt it the way they hurt CLIP; only
the towers' own adaptation is left out, which the comparison holds fixed for every policy.

Distributed training gathers the features of the whole global batch (with gradients) so every pair
is scored against every caption of the global batch, as CLIP does; with DeepSpeed's gradient
averaging the update equals the single-process update on the same global batch.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

MAX_LOGIT_SCALE = 100.0  # CLIP's cap on exp(s): keeps the softmax from collapsing early in training


class ClipHeads(nn.Module):
    """Trainable image/text projection heads and temperature; the towers are not part of the model."""

    def __init__(self, image_dim: int, text_dim: int, head_dim: int, logit_scale_init: float = 1 / 0.07):
        super().__init__()
        self.image_proj = nn.Linear(image_dim, head_dim, bias=False)
        self.text_proj = nn.Linear(text_dim, head_dim, bias=False)
        # Shape (1,), not a 0-d scalar: DeepSpeed broadcasts parameters as bytes, which 0-d tensors cannot be.
        self.logit_scale = nn.Parameter(torch.full((1,), math.log(logit_scale_init)))

    def encode_image(self, image: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.image_proj(image), dim=-1)

    def encode_text(self, text: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.text_proj(text), dim=-1)

    def scale(self) -> torch.Tensor:
        return self.logit_scale.exp().clamp(max=MAX_LOGIT_SCALE)

    def forward(self, image: torch.Tensor, text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Normalised image features, text features and the logit scale."""
        return self.encode_image(image), self.encode_text(text), self.scale()


def build_model(image_dim: int, text_dim: int, head_dim: int, logit_scale_init: float, seed: int) -> ClipHeads:
    """A freshly initialised model; the same seed gives the same weights for every variant."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return ClipHeads(image_dim, text_dim, head_dim, logit_scale_init)


def clip_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    scale: torch.Tensor,
    all_image_features: torch.Tensor | None = None,
    all_text_features: torch.Tensor | None = None,
    offset: int = 0,
) -> torch.Tensor:
    """Symmetric InfoNCE of the local rows against every column of the (global) batch.

    ``image_features`` / ``text_features`` are this worker's rows; ``all_*`` the features of the whole
    global batch (gathered with gradients) and ``offset`` where this worker's rows start in it. With
    one worker, leave ``all_*`` as None. Averaging this loss over workers gives CLIP's loss on the
    global batch: (1/2B) Σ_i [CE(s·z_v,i z_tᵀ, i) + CE(s·z_t,i z_vᵀ, i)].
    """
    all_images = image_features if all_image_features is None else all_image_features
    all_texts = text_features if all_text_features is None else all_text_features
    targets = torch.arange(offset, offset + len(image_features), device=image_features.device)
    logits_per_image = scale * image_features @ all_texts.T
    logits_per_text = scale * text_features @ all_images.T
    return 0.5 * (F.cross_entropy(logits_per_image.float(), targets) + F.cross_entropy(logits_per_text.float(), targets))


@torch.no_grad()
def encode(model: ClipHeads, images: np.ndarray | None = None, texts: np.ndarray | None = None, batch: int = 8192):
    """Project tower embeddings with a trained model (numpy in, normalised float32 numpy out)."""
    model.eval()
    dtype = model.image_proj.weight.dtype

    def run(x: np.ndarray, fn) -> np.ndarray:
        parts = [fn(torch.as_tensor(x[i : i + batch], dtype=dtype)).float().numpy() for i in range(0, len(x), batch)]
        return np.concatenate(parts) if parts else np.zeros((0, model.image_proj.out_features), np.float32)

    out_images = None if images is None else run(images, model.encode_image)
    out_texts = None if texts is None else run(texts, model.encode_text)
    return out_images, out_texts


def load_model(state: dict, logit_scale_init: float = 1 / 0.07) -> ClipHeads:
    """Rebuild a model from a saved state dict (shapes are read from the weights)."""
    image = state["image_proj.weight"]
    text = state["text_proj.weight"]
    model = ClipHeads(image.shape[1], text.shape[1], image.shape[0], logit_scale_init)
    model.load_state_dict({k: v.float() for k, v in state.items()})
    return model
