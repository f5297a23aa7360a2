"""Seeded random projections φ = P g of per-example gradients (k ≪ #params).

``P`` is ``k × p`` with i.i.d. entries of variance ``1/k``, so ``E[PᵀP] = I`` and inner products of
gradients are preserved in expectation (Johnson–Lindenstrauss). Two kinds:

- ``gaussian``: ``P_ij ~ N(0, 1/k)``;
- ``sparse``: Achlioptas' database-friendly JL, ``P_ij = sqrt(3/k) · {+1, 0, −1}`` with probabilities
  ``{1/6, 2/3, 1/6}``: two thirds zeros, same variance.

The matrix is never drawn whole. It is cut into column blocks of ``block_size`` parameters and block
``b`` is drawn from its own CPU generator seeded by ``(seed, b)``: the same seed gives bit-identical
blocks on every worker and device, whatever the order in which blocks are asked for (TRAK seeds its
projectors the same way for the same reason). Blocks are kept in memory only while the whole matrix
fits in ``max_cache_bytes``; above that each block is regenerated when used, so memory stays at one
block, and a caller should hand :meth:`project` batches of about ``max_cache_bytes`` of gradients
(:meth:`rows_per_pass`), so that P is drawn once per batch rather than once per small chunk. Blocks
are drawn in float64 and then cast, so ``dtype`` does not change the matrix.
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch

from influencespace.influence.errors import InfluenceError

KINDS = ("gaussian", "sparse")


class RandomProjector:
    """``project(G)`` returns ``G Pᵀ`` for a batch of flattened gradients ``G`` (n × p)."""

    def __init__(
        self,
        num_params: int,
        dim: int,
        seed: int,
        kind: str = "gaussian",
        block_size: int = 8192,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        max_cache_bytes: int = 256 * 2**20,
    ):
        if kind not in KINDS:
            raise InfluenceError(f"unknown projector '{kind}'; use one of: {', '.join(KINDS)}")
        if num_params < 1 or dim < 1 or block_size < 1:
            raise InfluenceError(f"projector needs num_params, dim and block_size ≥ 1 (got {num_params}, {dim}, {block_size})")
        self.num_params, self.dim, self.seed, self.kind = num_params, dim, seed, kind
        self.block_size, self.dtype, self.device = block_size, dtype, torch.device(device)
        self.num_blocks = -(-num_params // block_size)
        self.itemsize = torch.empty((), dtype=dtype).element_size()
        self.max_cache_bytes = max_cache_bytes
        self._cache: dict[int, torch.Tensor] | None = {} if dim * num_params * self.itemsize <= max_cache_bytes else None
        self.blocks_drawn = 0  # how many blocks were generated (cached ones count once): the cost of using P

    @property
    def cached(self) -> bool:
        """Whether P is kept once drawn (it fits in ``max_cache_bytes``)."""
        return self._cache is not None

    def rows_per_pass(self, minimum: int = 1) -> int:
        """How many gradient rows to project at once: any number when P is cached; otherwise as many as
        fit in ``max_cache_bytes`` (at least ``minimum``), each batch costing one drawing of P."""
        if self.cached:
            return minimum
        return max(minimum, self.max_cache_bytes // (self.num_params * self.itemsize))

    def _block_seed(self, index: int) -> int:
        # SeedSequence mixes (seed, block) into a well-spread 63-bit seed; stable across numpy versions.
        return int(np.random.SeedSequence([self.seed & 0xFFFFFFFF, self.seed >> 32, index]).generate_state(2, np.uint64)[0] >> 1)

    def block(self, index: int) -> torch.Tensor:
        """Columns ``[index·block_size, …)`` of P: a ``dim × width`` tensor on ``device``."""
        if self._cache is not None and index in self._cache:
            return self._cache[index]
        start = index * self.block_size
        width = min(self.block_size, self.num_params - start)
        gen = torch.Generator(device="cpu").manual_seed(self._block_seed(index))
        if self.kind == "gaussian":
            values = torch.randn(self.dim, width, generator=gen, dtype=torch.float64) / self.dim**0.5
        else:
            draw = torch.randint(0, 6, (self.dim, width), generator=gen)
            signs = (draw == 0).to(torch.float64) - (draw == 1).to(torch.float64)
            values = signs * (3.0 / self.dim) ** 0.5
        out = values.to(dtype=self.dtype, device=self.device)
        self.blocks_drawn += 1
        if self._cache is not None:
            self._cache[index] = out
        return out

    def project(self, grads: torch.Tensor) -> torch.Tensor:
        """``grads`` (n × p) → sketches (n × k), one block of P at a time."""
        if grads.shape[-1] != self.num_params:
            raise InfluenceError(f"gradient width {grads.shape[-1]} does not match the projector's {self.num_params} parameters")
        out = torch.zeros(grads.shape[0], self.dim, dtype=self.dtype, device=self.device)
        grads = grads.to(dtype=self.dtype, device=self.device)
        for b in range(self.num_blocks):
            start = b * self.block_size
            out += grads[:, start : start + self.block_size] @ self.block(b).T
        return out

    def transpose_apply(self, vectors: torch.Tensor) -> torch.Tensor:
        """Sketch-space vectors back in parameter space: (m × k) rows u → (m × p) rows ``u P`` (= (Pᵀuᵀ)ᵀ),
        float64, one block of P at a time (a single pass over P however many vectors)."""
        vectors = vectors.to(dtype=torch.float64, device=self.device)
        out = torch.zeros(vectors.shape[0], self.num_params, dtype=torch.float64, device=self.device)
        for b in range(self.num_blocks):
            start = b * self.block_size
            out[:, start : start + self.block_size] = vectors @ self.block(b).to(torch.float64)
        return out

    def gram(self) -> torch.Tensor:
        """``P Pᵀ`` (k × k, float64): the sketch of the identity, e.g. of an L2 term's Hessian."""
        out = torch.zeros(self.dim, self.dim, dtype=torch.float64, device=self.device)
        for b in range(self.num_blocks):
            block = self.block(b).to(torch.float64)
            out += block @ block.T
        return out

    def fingerprint(self) -> str:
        """A short hash of the whole matrix, to check that workers hold the same projector."""
        digest = hashlib.sha256(f"{self.kind}:{self.num_params}:{self.dim}:{self.block_size}".encode())
        for b in range(self.num_blocks):
            digest.update(self.block(b).to(torch.float64).cpu().numpy().tobytes())
        return digest.hexdigest()[:16]
