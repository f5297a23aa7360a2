"""What training the open_clip target costs per sample, and what feeds it: the figures behind
docs/training.md's GPU estimate.

    .venv/bin/python benchmarks/pixels_throughput.py [--models influencespace-pixels-tiny,ViT-B-32]
                                                     [--sources 512x384,1024x768] [--seconds 4]

1. **Model compute per sample.** For each open_clip architecture (built by the train stage's own
   ``targets.open_clip_target``, so the built-in tiny CLIP resolves as in training), the forward and
   forward + backward FLOPs of CLIP's loss on one sample, counted by ``torch.utils.flop_counter.
   FlopCounterMode`` (matrix multiplies and convolutions; a multiply–add counts 2), and the parameter
   count. The loss over a batch of 2 samples is counted and halved (a batch of 1 has no negatives).
2. **Decode per core.** JPEG decode + resize + centre crop to each model's input size with the embed
   stage's own ``ImagePreprocess`` (what the open_clip target's Ray Data ``map_batches`` step runs),
   on one core, for synthetic photographs (smooth colour fields with noise, JPEG quality 90) at the
   given source sizes.
3. **Per H100** (an estimate, not a measurement): samples/s = 989 TFLOP/s (H100 SXM dense bf16) × MFU
   / FLOPs per sample, at an MFU of 30% and 50%, and the CPU cores that decode that rate; none for a
   model under 1 GFLOP per sample (the built-in tiny CLIP), which cannot fill a GPU.
"""

from __future__ import annotations

import argparse
import io
import time

import numpy as np

H100_BF16_DENSE_FLOPS = 989e12
MFU_RANGE = (0.30, 0.50)
MIN_FLOPS_FOR_ESTIMATE = 1e9  # per sample, forward + backward


def model_flops(name: str) -> dict:
    """Parameters and per-sample FLOPs (forward; forward + backward) of CLIP's loss for ``name``."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from influencespace.train.model import clip_loss
    from influencespace.train.targets import open_clip_target

    target = open_clip_target(name, None, None)
    model = target.build(seed=0)
    rng = np.random.default_rng(0)
    batch = target.synthetic_batch(rng, 2)
    image, text = target.inputs(batch, "cpu", torch.float32)

    def loss():
        image_features, text_features, scale = model(image, text)  # open_clip's forward, as recipe._loss
        return clip_loss(image_features, text_features, scale)

    with FlopCounterMode(display=False) as forward:
        with torch.no_grad():
            loss()
    with FlopCounterMode(display=False) as both:
        loss().backward()
    return {"model": name, "image_size": target.image.size, "params": sum(p.numel() for p in model.parameters()),
            "forward_flops": forward.get_total_flops() / 2, "train_flops": both.get_total_flops() / 2}


def _photo(rng: np.random.Generator, width: int, height: int) -> bytes:
    from PIL import Image

    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([np.sin(x / 17.0 + c) * np.cos(y / 23.0 - c) for c in (0, 1, 2)], -1) * 100 + 128
    pixels = np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, "JPEG", quality=90)
    return out.getvalue()


def decode_rate(width: int, height: int, size: int, seconds: float) -> dict:
    """Images per second on one core through the embed stage's ImagePreprocess."""
    import torch

    from influencespace.embed.preprocess import ImagePreprocess

    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    blobs = [_photo(rng, width, height) for _ in range(16)]
    preprocess = ImagePreprocess(size)
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        for blob in blobs:
            preprocess(blob)
            n += 1
    elapsed = time.perf_counter() - start
    return {"source": f"{width}x{height}", "jpeg_kib": len(blobs[0]) / 1024, "size": size,
            "images_per_second_per_core": n / elapsed}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="influencespace-pixels-tiny,ViT-B-32")
    parser.add_argument("--sources", default="512x384,1024x768", help="JPEG source sizes WxH for the decode rate")
    parser.add_argument("--seconds", type=float, default=4.0, help="seconds of decoding per source size")
    args = parser.parse_args(argv)
    sources = [tuple(int(v) for v in s.split("x")) for s in args.sources.split(",")]
    for name in args.models.split(","):
        m = model_flops(name)
        print(f"{m['model']}: {m['params'] / 1e6:.2f} M parameters, {m['image_size']} px; per sample "
              f"{m['forward_flops'] / 1e9:.4g} GFLOPs forward, {m['train_flops'] / 1e9:.4g} GFLOPs forward+backward")
        # A model of a few MFLOPs per sample cannot keep an H100's matrix units busy (its kernels are
        # launch- and memory-bound): an MFU-based rate would be fiction, so none is given.
        per_gpu = None
        if m["train_flops"] >= MIN_FLOPS_FOR_ESTIMATE:
            per_gpu = [H100_BF16_DENSE_FLOPS * mfu / m["train_flops"] for mfu in MFU_RANGE]
            print(f"  per H100 (estimate: 989 TFLOP/s bf16 dense at {MFU_RANGE[0]:.0%}–{MFU_RANGE[1]:.0%} MFU): "
                  f"{per_gpu[0]:,.0f}–{per_gpu[1]:,.0f} samples/s")
        else:
            print("  per H100: no estimate (too small to fill a GPU's matrix units)")
        for width, height in sources:
            d = decode_rate(width, height, m["image_size"], args.seconds)
            rate = d["images_per_second_per_core"]
            feed = f"; cores to feed one H100: {per_gpu[0] / rate:,.0f}–{per_gpu[1] / rate:,.0f}" if per_gpu else ""
            print(f"  decode {d['source']} JPEG ({d['jpeg_kib']:.0f} KiB) → {m['image_size']} px: {rate:,.0f} images/s "
                  f"per core ({1000 / rate:.2f} ms){feed}")


if __name__ == "__main__":
    main()
