"""Weighted epochs from a stream of rows: seeded repeat counts, a window shuffle, micro-batches.

A row of weight w is seen, in epoch e of the run with seed s,

    c = ⌊w·λ⌋ + [u < w·λ − ⌊w·λ⌋],   u = unit_hash(id; s, e) ∈ [0, 1),   λ = S / Σ_j w_j

times, so E[c] = w·λ: a row of weight 2 is seen twice as often as one of weight 1, weight 0 never, and
an epoch holds S samples in expectation (S = steps × global batch from the step policy; the spread
is at most √(number of rows)). The count depends on the row's id, the seed and the epoch alone —
never on which worker holds the row or in which order rows arrive — so no process needs a global
index array, and a restored run sees the same epoch as an uninterrupted one. Compared with drawing
S rows with replacement (a multinomial), every row's count varies by less than 1 around w·λ, so a
baseline epoch (every w = 1, λ ≈ 1) shows each row once, as a plain epoch does.

The repeated samples are shuffled in windows of ``window`` samples (a permutation per window, seeded
by (seed, epoch, rank)) and cut into micro-batches; windows are counted in samples, not in the chunks
the rows arrived in, so the batches do not depend on how the stream was chunked.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import numpy as np

from influencespace.ids import unit_hash

SHUFFLE_WINDOW = 16_384  # samples per shuffle window


def repeat_counts(ids: np.ndarray, weight: np.ndarray, scale: float, seed: int, epoch: int) -> np.ndarray:
    """How many times each row is seen this epoch: ⌊w·λ⌋ plus one with probability frac(w·λ)."""
    weight = np.asarray(weight, dtype=np.float64)
    if not np.all(np.isfinite(weight)) or np.any(weight < 0):
        raise ValueError("weights must be finite and non-negative")
    if not scale > 0:
        raise ValueError(f"the scale λ must be positive, got {scale}")
    target = weight * scale
    whole = np.floor(target)
    return (whole + (unit_hash(ids, seed, epoch) < target - whole)).astype(np.int64)


def epoch_scale(samples_per_epoch: int, weight_sum: float) -> float:
    """λ such that an epoch holds ``samples_per_epoch`` samples in expectation."""
    if not weight_sum > 0:
        raise ValueError("at least one weight must be positive")
    return samples_per_epoch / weight_sum


def weighted_samples(chunks: Iterable[dict[str, np.ndarray]], scale: float, seed: int, epoch: int,
                     fields: tuple[str, ...] = ("image", "text")) -> Iterator[dict[str, np.ndarray]]:
    """Each chunk's rows repeated by :func:`repeat_counts` (``fields`` and ``id`` kept)."""
    for chunk in chunks:
        counts = repeat_counts(chunk["id"], chunk["weight"], scale, seed, epoch)
        index = np.repeat(np.arange(len(counts)), counts)
        if len(index):
            yield {name: np.asarray(chunk[name])[index] for name in ("id", *fields)}


def window_shuffle(samples: Iterable[dict[str, np.ndarray]], window: int, seed: int, epoch: int,
                   rank: int) -> Iterator[dict[str, np.ndarray]]:
    """The samples in a seeded random order within consecutive windows of ``window`` samples."""
    rng = np.random.default_rng([seed, epoch, rank])
    pending: list[dict[str, np.ndarray]] = []
    held = 0

    def emit(count: int) -> dict[str, np.ndarray]:
        nonlocal pending, held
        merged = {k: np.concatenate([p[k] for p in pending]) for k in pending[0]}
        out = {k: v[:count] for k, v in merged.items()}
        rest = {k: v[count:] for k, v in merged.items()}
        pending, held = ([rest] if len(rest["id"]) else []), held - count
        order = rng.permutation(count)
        return {k: v[order] for k, v in out.items()}

    for part in samples:
        pending.append(part)
        held += len(part["id"])
        while held >= window:
            yield emit(window)
    if held:
        yield emit(held)


def micro_batches(samples: Iterable[dict[str, np.ndarray]], size: int) -> Iterator[dict[str, np.ndarray]]:
    """Consecutive batches of exactly ``size`` samples; a last partial batch is dropped."""
    if size < 1:
        raise ValueError("the micro-batch size must be at least 1")
    pending: list[dict[str, np.ndarray]] = []
    held = 0
    for part in samples:
        pending.append(part)
        held += len(part["id"])
        if held < size:
            continue
        merged = {k: np.concatenate([p[k] for p in pending]) for k in pending[0]}
        full = held // size * size
        for start in range(0, full, size):
            yield {k: v[start:start + size] for k, v in merged.items()}
        pending = [{k: v[full:] for k, v in merged.items()}] if held > full else []
        held -= full


class EpochBatches:
    """One worker's micro-batches of one epoch from its stream of kept rows (module docstring).

    Iterate it once; ``offered`` then holds how many samples the stream gave (the last partial
    micro-batch included), which can exceed what the micro-batches hold.
    """

    def __init__(self, chunks: Iterable[dict[str, np.ndarray]], *, scale: float, seed: int, epoch: int, rank: int,
                 micro_batch: int, window: int = SHUFFLE_WINDOW):
        self.offered = 0
        samples = self._count(weighted_samples(chunks, scale, seed, epoch))
        self._batches = micro_batches(window_shuffle(samples, window, seed, epoch, rank), micro_batch)

    def _count(self, samples: Iterator[dict[str, np.ndarray]]) -> Iterator[dict[str, np.ndarray]]:
        for part in samples:
            self.offered += len(part["id"])
            yield part

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return self._batches

