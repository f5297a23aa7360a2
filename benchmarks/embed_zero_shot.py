"""Quality of an embedder on the benchmark test set: zero-shot accuracy and retrieval recall.

    .venv/bin/python benchmarks/embed_zero_shot.py                     # 2000 test images (the demo's)
    .venv/bin/python benchmarks/embed_zero_shot.py --test-size 10000   # every Fashion-MNIST test image

The test split is the benchmark's own (Fashion-MNIST *test* images, minority style — inverted
polarity — on half), never seen by the offline default's alignment. Reported, overall and per group:

- zero-shot accuracy: argmax_c cos(v, t_c) over the ten class prompts "a photo of a <class>.";
- image→text recall@k: an image is a hit when one of its k nearest captions, among all 84 captions
  of the caption vocabulary, names its class (captions describe classes, so a hit is class-level);
- text→image recall@k: a caption is a hit when one of its k nearest test images is of its class.
"""

from __future__ import annotations

import argparse
import io


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--test-size", type=int, default=2000)
    parser.add_argument("--checkpoint", default=None, help="offline-default checkpoint (default: the cached one, built if missing)")
    parser.add_argument("--seed", type=int, default=0, help="benchmark seed (which test images, which are inverted)")
    args = parser.parse_args()

    import numpy as np

    from influencespace import storage
    from influencespace.config import benchmark_config
    from influencespace.datasets import captions as caps
    from influencespace.datasets.benchmark import build_fashion_captions
    from influencespace.embed.offline_default import ensure_default_checkpoint, spec_from_checkpoint
    from influencespace.embed.registry import load_encoder

    cfg = benchmark_config({"pool_size": 100, "validation_size": 20, "test_size": args.test_size, "seed": args.seed})
    test = build_fashion_captions(cfg).test
    uri = args.checkpoint or ensure_default_checkpoint()
    spec = spec_from_checkpoint(storage.read_bytes(uri), uri)
    encoder = load_encoder(spec)

    images = test.column("image").to_pylist()
    labels = np.array(test.column("label").to_pylist())
    groups = np.array(test.column("group").to_pylist())
    v = np.concatenate([encoder.embed_images(images[i : i + 256]) for i in range(0, len(images), 256)])
    vocab = caps.build_vocabulary(cfg.wordnet_dir)
    prompts = encoder.embed_texts(caps.class_prompts(vocab))
    captions = [(k, c) for k, v_ in enumerate(vocab) for c in v_.captions()]
    caption_class = np.array([k for k, _ in captions])
    t = encoder.embed_texts([c for _, c in captions])

    predicted = (v @ prompts.T).argmax(axis=1)
    i2t = np.argsort(-(v @ t.T), axis=1)
    t2i = np.argsort(-(t @ v.T), axis=1)

    def recall(order: np.ndarray, query_class: np.ndarray, item_class: np.ndarray, k: int) -> np.ndarray:
        return (item_class[order[:, :k]] == query_class[:, None]).any(axis=1)

    out = io.StringIO()
    out.write(f"model: {spec.describe()}; test images: {len(labels)} (seed {args.seed}); captions: {len(captions)}\n")
    for name, mask in (("all", np.ones(len(labels), bool)), ("regular", groups == "regular"), ("inverted", groups == "inverted")):
        acc = (predicted[mask] == labels[mask]).mean()
        r1 = recall(i2t[mask], labels[mask], caption_class, 1).mean()
        r5 = recall(i2t[mask], labels[mask], caption_class, 5).mean()
        out.write(f"{name:9s} n={mask.sum():5d}  zero-shot acc {acc:.3f}  image→text R@1 {r1:.3f} R@5 {r5:.3f}\n")
    tr1 = recall(t2i, caption_class, labels, 1).mean()
    tr5 = recall(t2i, caption_class, labels, 5).mean()
    out.write(f"text→image (84 captions over all test images): R@1 {tr1:.3f} R@5 {tr5:.3f}\n")
    print(out.getvalue(), end="")


if __name__ == "__main__":
    main()
