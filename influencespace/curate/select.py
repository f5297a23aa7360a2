"""Exact order statistics over rows spread across shards, without sorting them in one place.

The curate stage needs "the first m rows in a global order" (the budget cut, the comparison policies'
top-m, the quartiles of the image–text cosine) over a billion rows in a thousand shards. Sorting them
on one process is what it must not do; a sample gives an approximate answer, and a manifest must not
depend on luck. This module finds the exact boundary by **radix selection**:

- every row has a key of unsigned words (``uint64`` arrays, each ``bits`` wide), compared
  lexicographically, and then its id (unique), so the order is total;
- round r: each shard counts, among its rows whose first r 16-bit digits equal the prefix found so
  far, how many have each value of digit r + 1 (a 65,536-bin histogram); the driver adds the shards'
  histograms and fixes the digit where the cumulative count crosses the rank it wants;
- once at most ``collect_limit`` rows share the prefix, the shards send those rows (key and id) and
  the driver sorts them: the row of the wanted rank is the boundary.

A round is one pass over small key columns; 16 digits cut the candidates by up to 65,536× per round,
so a billion rows need two or three rounds. The driver holds one histogram per wanted rank and at
most ``collect_limit`` rows. Nothing here reads files: the caller passes ``count_digits`` and
``collect`` functions that run the per-shard step over every shard (in Ray tasks or in a loop) and
add up what the shards return (:func:`shard_histogram` / :func:`shard_collect` are that step).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

DIGIT_BITS = 16
DIGITS = 1 << DIGIT_BITS
COLLECT_LIMIT = 20_000  # rows the driver sorts at the end; 16 more bits a pass narrow the rest
_TOP = np.uint64(1 << 63)


def sortable(values: np.ndarray, nan_last: bool = True) -> np.ndarray:
    """float64 → uint64 with the same order (−0.0 = 0.0; NaN after +inf, or before −inf if not ``nan_last``)."""
    x = np.asarray(values, dtype=np.float64) + 0.0  # + 0.0 turns −0.0 into 0.0
    bits = x.view(np.uint64)
    out = np.where(bits & _TOP, ~bits, bits | _TOP)
    nan = np.isnan(x)
    if nan.any():
        out[nan] = np.uint64(0xFFFFFFFFFFFFFFFF) if nan_last else np.uint64(0)
    return out


def unsortable(word: int) -> float:
    """The float64 that :func:`sortable` maps to ``word`` (for finite and infinite values)."""
    w = np.array([word], dtype=np.uint64)
    bits = np.where(w & _TOP, w ^ _TOP, ~w)
    return float(bits.view(np.float64)[0])


@dataclass(frozen=True)
class Key:
    """A row's sort key: ``words`` (uint64 arrays, one per component) compared in order, each ``bits`` wide."""

    words: Sequence[np.ndarray]
    bits: Sequence[int]

    def digit(self, index: int) -> np.ndarray:
        """The ``index``-th 16-bit digit of every row's key, most significant first."""
        word, shift = _digit_position(self.bits, index)
        return ((self.words[word] >> np.uint64(shift)) & np.uint64(DIGITS - 1)).astype(np.int64)

    def matches(self, prefix: Sequence[int]) -> np.ndarray:
        n = len(self.words[0]) if self.words else 0
        mask = np.ones(n, dtype=bool)
        for index, value in enumerate(prefix):
            mask &= self.digit(index) == value
        return mask


def _digit_position(bits: Sequence[int], index: int) -> tuple[int, int]:
    for word, width in enumerate(bits):
        count = width // DIGIT_BITS
        if index < count:
            return word, width - DIGIT_BITS * (index + 1)
        index -= count
    raise IndexError("digit index past the end of the key")


def digit_count(bits: Sequence[int]) -> int:
    if any(b % DIGIT_BITS or not 0 < b <= 64 for b in bits):
        raise ValueError(f"key word widths must be multiples of {DIGIT_BITS} up to 64, got {list(bits)}")
    return sum(b // DIGIT_BITS for b in bits)


@dataclass(frozen=True)
class Cut:
    """The boundary of "the first m rows": rows with (key, id) ≤ (``words``, ``id``) are inside.

    ``words is None`` with ``everything`` False means no row is inside; ``everything`` means all are.
    """

    words: tuple[int, ...] | None
    id: str | None
    everything: bool = False

    @staticmethod
    def none() -> Cut:
        return Cut(None, None, False)

    @staticmethod
    def all() -> Cut:
        return Cut(None, None, True)

    def inside(self, key: Key, ids: np.ndarray) -> np.ndarray:
        """Which rows (``key``, ``ids`` aligned) lie at or before the cut."""
        n = len(ids)
        if self.everything:
            return np.ones(n, dtype=bool)
        if self.words is None:
            return np.zeros(n, dtype=bool)
        less = np.zeros(n, dtype=bool)
        equal = np.ones(n, dtype=bool)
        for word, bound in zip(key.words, self.words, strict=True):
            bound = np.uint64(bound)
            less |= equal & (word < bound)
            equal &= word == bound
        ids = np.asarray(ids, dtype=object)
        return less | (equal & (ids <= self.id))


# --------------------------------------------------------------------------------------------------
# The per-shard step


def shard_histogram(key: Key, prefixes: Sequence[Sequence[int]]) -> np.ndarray:
    """(len(prefixes), 65,536) counts of the next digit among the rows matching each prefix."""
    out = np.zeros((len(prefixes), DIGITS), dtype=np.int64)
    for row, prefix in enumerate(prefixes):
        mask = key.matches(prefix)
        if mask.any():
            out[row] = np.bincount(key.digit(len(prefix))[mask], minlength=DIGITS)
    return out


def sparse_histogram(hist: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per prefix, the (digit, count) pairs of the bins a shard filled: what a task sends back.

    A shard fills few of the 65,536 bins (its rows that match the prefix, at most), so this is a few KB
    where the dense histogram is 512 KiB a prefix: Ray returns it in-band instead of through the
    object store, whose pages the driver would otherwise map, one set per shard."""
    out = []
    for row in hist:
        digits = np.flatnonzero(row)
        out.append((digits.astype(np.uint16), row[digits].astype(np.uint32)))
    return out


def add_sparse(total: np.ndarray, sparse: list[tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
    """``total += `` a :func:`sparse_histogram` (in place; returns ``total``)."""
    for row, (digits, counts) in enumerate(sparse):
        total[row, digits.astype(np.int64)] += counts.astype(np.int64)  # digits are distinct within a row
    return total


def shard_collect(key: Key, ids: np.ndarray, prefixes: Sequence[Sequence[int]]) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per prefix: (words matrix (rows × components), ids) of the rows matching it."""
    ids = np.asarray(ids, dtype=object)
    out = []
    for prefix in prefixes:
        mask = key.matches(prefix)
        out.append((np.stack([w[mask] for w in key.words], axis=1) if key.words else np.zeros((0, 0), np.uint64), ids[mask]))
    return out


# --------------------------------------------------------------------------------------------------
# The driver's side


def select_ranks(ranks: Sequence[int], total: int, bits: Sequence[int],
                 count_digits: Callable[[list[list[int]]], np.ndarray],
                 collect: Callable[[list[list[int]]], list[tuple[np.ndarray, np.ndarray]]],
                 collect_limit: int = COLLECT_LIMIT) -> list[Cut]:
    """The cut after the first ``rank`` rows (1-based) in key order, for each of ``ranks``, exactly.

    ``total`` is the number of rows taking part; ``count_digits(prefixes)`` returns, summed over the
    shards, :func:`shard_histogram` for those prefixes, and ``collect(prefixes)`` the shards'
    :func:`shard_collect` results concatenated per prefix. All wanted ranks advance together, so each
    round is one pass whatever their number.
    """
    n_digits = digit_count(bits)
    cuts: list[Cut | None] = [None] * len(ranks)
    state = {}  # index -> [prefix, rank still wanted inside the prefix, rows matching the prefix]
    for i, rank in enumerate(ranks):
        if rank <= 0:
            cuts[i] = Cut.none()
        elif rank > total:
            cuts[i] = Cut.all()
        else:
            state[i] = [[], int(rank), int(total)]
    while state:
        counting = [i for i, (prefix, _, matching) in state.items() if matching > collect_limit and len(prefix) < n_digits]
        if counting:
            histograms = count_digits([state[i][0] for i in counting])
            for i, hist in zip(counting, histograms, strict=True):
                prefix, need, _ = state[i]
                cumulative = np.cumsum(hist)
                d = int(np.searchsorted(cumulative, need))  # first digit whose cumulative count reaches need
                state[i] = [prefix + [d], need - (int(cumulative[d - 1]) if d else 0), int(hist[d])]
            continue
        done = list(state)
        for i, (words, ids) in zip(done, collect([state[i][0] for i in done]), strict=True):
            need = state[i][1]
            order = np.lexsort((_id_ranks(ids), *[words[:, c] for c in reversed(range(words.shape[1]))]))
            pick = order[need - 1]
            cuts[i] = Cut(tuple(int(w) for w in words[pick]), str(ids[pick]))
        state = {}
    return cuts  # type: ignore[return-value]


def _id_ranks(ids: np.ndarray) -> np.ndarray:
    _, inverse = np.unique(np.asarray(ids, dtype=str), return_inverse=True)
    return inverse


def lex_order(*keys: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Indices that sort rows by ``keys`` (most significant first), then by id: the in-memory twin of the cut."""
    return np.lexsort((_id_ranks(ids), *reversed(keys)))
