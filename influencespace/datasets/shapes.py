"""The shape-captions benchmark: procedurally rendered colour images, templated captions, another defect mix.

A second built-in benchmark, so that no threshold or tier can only work on Fashion-MNIST: other
images (32×32 RGB drawings of ten shapes in eight colours, rotated, scaled and shifted, on grey
backgrounds), other captions (templates naming colour, size and background, with hand-written
synonyms and glosses) and another defect mix:

- near-duplicates: copies of a few sources shifted by up to 2 pixels and jittered by ±10;
- random caption noise: a caption of a uniformly drawn other shape;
- systematic swaps inside a *colour* slice (red, orange and yellow stars are captioned as hearts;
  green, blue and purple squares as circles), so whole clusters are harmful (a slice holds about
  3/80 of the unique rows, so ``swap_caption_fraction`` above ~0.06 is capped by the slices' size);
- corrupted images: a third uniform noise, a third blank frames, a third *occluded* (a grey block
  hides most of the shape), plus a handful of undecodable byte strings;
- a minority style (the shape drawn as an outline, never filled) with the sensitive attribute in
  ``group``; the fairness task is "is the shape curved" (circle, ring, heart, crescent).

The fractions are the same ``data.benchmark.*`` settings as fashion-captions'; everything is a pure
function of the config (seeded). The offline default embedder aligns its heads on a separate
stream of these renders (:func:`alignment_set`), as it does on a separate Fashion-MNIST slice.
"""

from __future__ import annotations

import io
import math

import numpy as np

from influencespace.config import BenchmarkDataConfig
from influencespace.datasets.benchmark import REGULAR, BenchmarkSplits, PlantedRows, assemble_pool, truncate_or_garble

OUTLINE = "outline"  # the minority style, and its value in ``group``
SIZE = 32
_SUPERSAMPLE = 4

CLASS_NAMES = ("circle", "square", "triangle", "star", "cross", "ring", "hexagon", "heart", "arrow", "crescent")
CURVED_CLASSES = (0, 5, 7, 9)  # the binary fairness task: curved shapes vs straight-edged ones
SYNONYMS = {
    "circle": ("circle", "disc", "round dot"),
    "square": ("square", "box", "tile"),
    "triangle": ("triangle", "trigon", "wedge"),
    "star": ("star", "five-pointed star", "pentagram"),
    "cross": ("cross", "plus sign", "plus"),
    "ring": ("ring", "annulus", "hoop"),
    "hexagon": ("hexagon", "six-sided polygon", "hex tile"),
    "heart": ("heart", "heart shape", "love heart"),
    "arrow": ("arrow", "pointer", "arrowhead sign"),
    "crescent": ("crescent", "crescent moon", "sickle shape"),
}
GLOSSES = {
    "circle": "a round plane figure whose edge is everywhere the same distance from its centre",
    "square": "a plane figure with four equal straight sides and four right angles",
    "triangle": "a plane figure with three straight sides and three angles",
    "star": "a figure with five points radiating from a centre",
    "cross": "two bars of equal length crossing at their middles",
    "ring": "a round band with a hole in the middle",
    "hexagon": "a plane figure with six straight sides",
    "heart": "a figure with two rounded lobes meeting in a point, the symbol of love",
    "arrow": "a line with a triangular head pointing one way",
    "crescent": "the curved shape of the moon in its first or last quarter",
}
COLOURS = {
    "red": (220, 40, 40), "orange": (240, 140, 30), "yellow": (235, 215, 40), "green": (50, 170, 70),
    "blue": (40, 90, 220), "purple": (140, 60, 190), "pink": (240, 120, 180), "white": (245, 245, 245),
}
COLOUR_NAMES = tuple(COLOURS)
# (source shape, caption shape, the colours of the slice): whole colour slices get the other caption.
SWAP_SLICES = ((3, 7, ("red", "orange", "yellow")), (1, 0, ("green", "blue", "purple")))
TEMPLATES = (
    "a {colour} {synonym}.",
    "a drawing of {a_synonym}.",
    "a {size} {colour} {synonym} on a {background} background.",
    "{gloss}.",
    "clip art: {a_synonym} in {colour}.",
    "{a_name}, {size}, {colour}.",
)
PROMPT_TEMPLATE = "a drawing of {a_name}."


def _article(noun: str) -> str:
    return ("an " if noun[:1] in "aeiou" else "a ") + noun


def class_prompts() -> list[str]:
    return [PROMPT_TEMPLATE.format(a_name=_article(name)) for name in CLASS_NAMES]


def caption(rng: np.random.Generator, label: int, colour: str, size: str, background: str) -> str:
    """One caption of shape ``label`` (a random template and synonym; the attributes are the image's)."""
    name = CLASS_NAMES[label]
    synonym = SYNONYMS[name][int(rng.integers(len(SYNONYMS[name])))]
    template = TEMPLATES[int(rng.integers(len(TEMPLATES)))]
    return template.format(colour=colour, synonym=synonym, a_synonym=_article(synonym), size=size,
                           background=background, gloss=GLOSSES[name], a_name=_article(name))


def class_captions() -> list[list[str]]:
    """Every caption a class can get with neutral attributes (for aligning the offline embedder)."""
    out = []
    for name in CLASS_NAMES:
        texts = []
        for template in TEMPLATES:
            for synonym in SYNONYMS[name]:
                for colour in COLOUR_NAMES:
                    text = template.format(colour=colour, synonym=synonym, a_synonym=_article(synonym), size="large",
                                           background="grey", gloss=GLOSSES[name], a_name=_article(name))
                    if text not in texts:
                        texts.append(text)
        out.append(texts)
    return out


# --------------------------------------------------------------------------------------------------
# Rendering


def _polygon(points: np.ndarray, cx: float, cy: float, radius: float, angle: float) -> list[tuple[float, float]]:
    """Unit-radius points → rotated, scaled and shifted pixel coordinates."""
    c, s = math.cos(angle), math.sin(angle)
    x, y = points[:, 0], points[:, 1]
    return list(zip(cx + radius * (c * x - s * y), cy + radius * (s * x + c * y), strict=True))


def _regular(n: int, phase: float = -math.pi / 2) -> np.ndarray:
    t = phase + 2 * math.pi * np.arange(n) / n
    return np.stack([np.cos(t), np.sin(t)], axis=1)


def _outlines(label: int) -> list[tuple[np.ndarray, bool]]:
    """The shape as (unit polygon, filled with the shape's colour?) layers, drawn in order."""
    name = CLASS_NAMES[label]
    if name == "circle":
        return [(_regular(48), True)]
    if name == "ring":
        return [(_regular(48), True), (0.55 * _regular(48), False)]
    if name == "square":
        return [(0.85 * _regular(4, math.pi / 4) * math.sqrt(2) / 1.2, True)]
    if name == "triangle":
        return [(_regular(3), True)]
    if name == "hexagon":
        return [(_regular(6), True)]
    if name == "star":
        outer, inner = _regular(5), 0.42 * _regular(5, -math.pi / 2 + math.pi / 5)
        return [(np.stack([outer, inner], axis=1).reshape(-1, 2), True)]
    if name == "cross":
        a, b = 0.3, 0.95
        pts = [(-a, -b), (a, -b), (a, -a), (b, -a), (b, a), (a, a), (a, b), (-a, b), (-a, a), (-b, a), (-b, -a), (-a, -a)]
        return [(np.array(pts), True)]
    if name == "heart":
        t = np.linspace(0, 2 * math.pi, 64, endpoint=False)
        x = 16 * np.sin(t) ** 3
        y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))
        pts = np.stack([x, y + 2.5], axis=1) / 17.0
        return [(pts, True)]
    if name == "arrow":
        pts = [(-0.95, -0.22), (0.2, -0.22), (0.2, -0.6), (0.95, 0.0), (0.2, 0.6), (0.2, 0.22), (-0.95, 0.22)]
        return [(np.array(pts), True)]
    # crescent: the outer circle's left arc, back along the left arc of a circle shifted right by 0.5.
    y_cut = math.sqrt(1 - 0.25**2)
    theta0 = math.atan2(y_cut, 0.25)
    outer = np.linspace(theta0, 2 * math.pi - theta0, 40)
    phi0 = math.atan2(y_cut, -0.25)
    inner = np.linspace(2 * math.pi - phi0, phi0, 40)
    pts = np.concatenate([np.stack([np.cos(outer), np.sin(outer)], 1), np.stack([0.5 + np.cos(inner), np.sin(inner)], 1)])
    return [(pts - np.array([0.15, 0.0]), True)]


def render(label: int, colour: str, background: int, radius: float, cx: float, cy: float, angle: float,
           outline: bool) -> np.ndarray:
    """One shape as a uint8 [SIZE, SIZE, 3] image (drawn 4× larger and downsampled, so edges are smooth)."""
    from PIL import Image, ImageDraw

    k = _SUPERSAMPLE
    bg = (background,) * 3
    canvas = Image.new("RGB", (SIZE * k, SIZE * k), bg)
    draw = ImageDraw.Draw(canvas)
    fg = COLOURS[colour]
    for points, filled in _outlines(label):
        xy = _polygon(points, cx * k, cy * k, radius * k, angle)
        if outline:
            draw.polygon(xy, outline=fg, width=int(1.6 * k))
        else:
            draw.polygon(xy, fill=fg if filled else bg)
    return np.asarray(canvas.resize((SIZE, SIZE), Image.Resampling.BOX), dtype=np.uint8)


def _attributes(rng: np.random.Generator, n: int) -> dict[str, np.ndarray]:
    """Random drawing attributes of ``n`` images (colour, background grey, size, position, rotation)."""
    dark = rng.random(n) < 0.5
    return {
        "colour": rng.integers(len(COLOUR_NAMES), size=n),
        "background": np.where(dark, rng.integers(15, 70, n), rng.integers(150, 215, n)),
        "radius": rng.uniform(7.0, 14.0, n),
        "shift": rng.uniform(-4.0, 4.0, (n, 2)),
        "angle": rng.uniform(-0.35, 0.35, n),
    }


def _render_all(labels: np.ndarray, attrs: dict[str, np.ndarray], outline: np.ndarray) -> np.ndarray:
    centre = SIZE / 2
    return np.stack([
        render(int(labels[i]), COLOUR_NAMES[attrs["colour"][i]], int(attrs["background"][i]), float(attrs["radius"][i]),
               centre + float(attrs["shift"][i, 0]), centre + float(attrs["shift"][i, 1]), float(attrs["angle"][i]),
               bool(outline[i]))
        for i in range(len(labels))
    ]) if len(labels) else np.zeros((0, SIZE, SIZE, 3), np.uint8)


def _words(attrs: dict[str, np.ndarray], i: int) -> tuple[str, str, str]:
    size = "large" if attrs["radius"][i] >= 10.5 else "small"
    background = "dark" if attrs["background"][i] < 110 else "light"
    return COLOUR_NAMES[attrs["colour"][i]], size, background


def encode_png(image: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def _labelled(prefix: str, rng: np.random.Generator, n: int, groups: list[str], prompts: list[str] | None):
    """A class-balanced split of ``n`` fresh renders: captions sampled, or the class prompt (test)."""
    import pyarrow as pa

    labels = rng.permutation(np.arange(n) % len(CLASS_NAMES))
    attrs = _attributes(rng, n)
    images = _render_all(labels, attrs, np.array([g == OUTLINE for g in groups]))
    texts = [prompts[c] if prompts else caption(rng, int(c), *_words(attrs, i)) for i, c in enumerate(labels)]
    return pa.table({
        "id": [f"{prefix}-{i:06d}" for i in range(n)],
        "image": pa.array([encode_png(img) for img in images], type=pa.binary()),
        "text": texts,
        "group": groups,
        "label": pa.array(labels, type=pa.int64()),
    })


def alignment_set(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``n`` clean renders in the regular (filled) style for the offline embedder's heads, from a
    random stream no benchmark seed draws from (the benchmark uses ``default_rng(seed)``)."""
    rng = np.random.default_rng([0x5A9E5, seed])
    labels = rng.permutation(np.arange(n) % len(CLASS_NAMES))
    return _render_all(labels, _attributes(rng, n), np.zeros(n, bool)), labels


def build_shape_captions(cfg: BenchmarkDataConfig) -> BenchmarkSplits:
    """Build pool, validation, test and ground truth in memory (deterministic in ``cfg``)."""
    rng = np.random.default_rng(cfg.seed)
    prompts = class_prompts()
    validation = _labelled("val", rng, cfg.validation_size, [OUTLINE if i % 2 else REGULAR for i in range(cfg.validation_size)], None)

    n = cfg.pool_size
    n_dup = round(cfg.duplicate_fraction * n)
    n_unique = n - n_dup
    true_labels = rng.integers(len(CLASS_NAMES), size=n_unique)
    attrs = _attributes(rng, n_unique)
    groups = np.array([REGULAR] * n_unique, dtype=object)
    groups[rng.choice(n_unique, min(round(cfg.minority_fraction * n), n_unique), replace=False)] = OUTLINE
    images = _render_all(true_labels, attrs, groups == OUTLINE)
    planted = PlantedRows(images, true_labels, true_labels.copy(), np.array(["none"] * n_unique, dtype=object),
                          np.array(["none"] * n_unique, dtype=object), groups, [], [])
    colours = np.array(COLOUR_NAMES, dtype=object)[attrs["colour"]]

    # Systematic swaps: every regular row of a colour slice of the source shape, up to the budget.
    n_swap = round(cfg.swap_caption_fraction * n)
    for pair_index, (source, target, slice_colours) in enumerate(SWAP_SLICES):
        want = n_swap // len(SWAP_SLICES) + (1 if pair_index < n_swap % len(SWAP_SLICES) else 0)
        rows = planted.free_rows((true_labels == source) & (groups == REGULAR) & np.isin(colours, slice_colours))
        chosen = rows[:want]
        planted.caption_labels[chosen] = target
        planted.caption_noise[chosen] = "swap"

    rows = planted.free_rows()
    chosen = rng.choice(rows, min(round(cfg.random_caption_fraction * n), len(rows)), replace=False)
    planted.caption_labels[chosen] = (true_labels[chosen] + rng.integers(1, len(CLASS_NAMES), len(chosen))) % len(CLASS_NAMES)
    planted.caption_noise[chosen] = "random"

    # Corrupted images, in thirds: uniform noise, a blank frame, a grey block over most of the shape.
    rows = planted.free_rows()
    chosen = rng.choice(rows, min(round(cfg.corrupted_image_fraction * n), len(rows)), replace=False)
    for i, row in enumerate(chosen):
        kind = ("noise", "blank", "occluded")[i % 3]
        if kind == "noise":
            images[row] = rng.integers(0, 256, images[row].shape, dtype=np.uint8)
        elif kind == "blank":
            images[row] = np.uint8(rng.integers(0, 256))
        else:
            x0, y0 = rng.integers(0, 6, 2)
            images[row, y0 : y0 + 26, x0 : x0 + 26] = np.uint8(rng.integers(60, 200))
        planted.corruption[row] = kind
    rows = planted.free_rows()
    planted.corruption[rng.choice(rows, min(cfg.undecodable_count, len(rows)), replace=False)] = "undecodable"

    planted.texts = [caption(rng, int(planted.caption_labels[i]), *_words(attrs, i)) for i in range(n_unique)]
    for row in range(n_unique):
        png = encode_png(images[row])
        planted.encoded.append(truncate_or_garble(rng, png, row) if planted.corruption[row] == "undecodable" else png)

    def shifted(image: np.ndarray) -> bytes:
        moved = np.roll(image, tuple(rng.integers(-2, 3, 2)), axis=(0, 1)).astype(np.int64)
        return encode_png(np.clip(moved + rng.integers(-10, 11, image.shape), 0, 255).astype(np.uint8))

    pool, ground_truth, counts = assemble_pool(rng, planted, n_dup, cfg.duplicate_sources, shifted)
    test_groups = [OUTLINE if flip else REGULAR for flip in rng.permutation(cfg.test_size) % 2]
    test = _labelled("test", rng, cfg.test_size, test_groups, prompts)
    classes = {
        "benchmark": "shape_captions",
        "names": list(CLASS_NAMES),
        "prompts": prompts,
        "positive_classes": list(CURVED_CLASSES),
        "groups": {"majority": REGULAR, "minority": OUTLINE},
        "vocabulary": [{"name": name, "synonyms": list(SYNONYMS[name]), "gloss": GLOSSES[name]} for name in CLASS_NAMES],
        "swap_pairs": [[CLASS_NAMES[s], CLASS_NAMES[t]] for s, t, _ in SWAP_SLICES],
    }
    counts = {**counts, "validation": validation.num_rows, "test": test.num_rows}
    return BenchmarkSplits(pool, validation, test, ground_truth, classes, counts)
