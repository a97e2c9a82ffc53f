"""LiftQuant's lift-then-project codebook (spec ``shared/methods/liftquant.md``; official code
``Heliulu/LiftQuant``: ``lattice_generator2.py`` trains ``M``, ``quantize/tmplinear.py`` encodes).

A group of ``m`` (normalised) weights is stored as ``n > m`` sign bits ``y in {-1, +1}^n`` and decoded as
``M y`` with a trained ``M`` (``m x n``): ``n / m`` bits per weight, so fractional rates (20/8 = 2.5) are as
easy as integer ones. Decoding is one matrix product. Encoding searches candidates: ``M`` is completed to an
invertible square ``[M; N]`` (``N``: the right-singular vectors orthogonal to ``M``'s rows), and for every
padding ``p in {-1, +1}^(n-m)`` the candidate is ``sign([M; N]^-1 [z; p])``; the nearest decoded candidate
wins. Since ``[M; N]^-1 = [A | B]``, a candidate is ``sign(A z + B p)``: the offsets ``B p`` of every padding
are computed once per codebook, and a vector's search is one addition, one sign and one ``m x n`` decode per
candidate (vectors are processed in chunks of a bounded number of candidate entries). Deviation: a greedy
pass that flips single bits of the winner while that lowers the error is added (cheap: ``n`` more decodes).

The search examines all ``2^(n-m)`` paddings, as the official ``find_nearest_fast`` does; its cost doubles
with each padding bit (measured on one core of an AVX-512 CPU: 3 µs per vector for 10to4, 17 µs for 16to8,
0.2 ms for 20to8, 6 ms for 24to8), so ``rate_pair`` stays within ``max_padding`` bits (12 by default; up to
``MAX_PADDING_BITS`` = 16 when asked).

``M`` is trained data-free on ``z ~ N(0, I_m)``: the soft-min distortion
``-(1/tau) log sum_{y in C(z)} exp(-tau ||z - M y||^2) / m`` over the candidate set, Adam with a cosine
schedule, several restarts, keeping the ``M`` with the least measured MSE.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from fractions import Fraction

import torch
from torch import Tensor

MAX_PADDING_BITS = 16  # 2^16 candidates per vector: the official 24to8 (3 bits), hours per 100M weights on a CPU
DEFAULT_PADDING_BITS = 12  # 2^12 candidates: the official 20to8 (2.5 bits) and 18to6 (3 bits)
MAX_GROUP = 16
SOFTMIN_CANDIDATES = 64  # training's soft-min runs over each vector's nearest 64 candidates (all, if fewer)
CHUNK_ENTRIES = 1 << 20  # candidate entries (vectors x candidates x n) held at once while searching: 4 MiB


def sign_table(k: int) -> Tensor:
    """All ``2^k`` vectors of ``{-1, +1}^k`` (rows)."""
    return torch.tensor(list(itertools.product((-1.0, 1.0), repeat=k))).reshape(2**k, k)


def rate_pair(
    bits: float, group: int = 8, max_padding: int = DEFAULT_PADDING_BITS, max_group: int = MAX_GROUP
) -> tuple[int, int]:
    """``(m, n)`` with ``n / m == bits`` and a search that fits (``n - m <= max_padding``), ``m`` as close to
    ``group`` as the rate allows (larger groups code better, their search costs ``2^(n-m)``): at the defaults
    2.0 -> 16to8, 2.5 -> 20to8, 3.0 -> 18to6 (with ``max_padding`` 16: 24to8), all official shapes."""
    if not 0 < max_padding <= MAX_PADDING_BITS:
        raise ValueError(f"liftquant: search_bits must be 1..{MAX_PADDING_BITS} (2^bits candidates per vector), "
                         f"got {max_padding}")  # fmt: skip
    rate = Fraction(bits).limit_denominator(max_group)
    for m in sorted(range(1, max_group + 1), key=lambda k: (abs(k - group), k)):
        n = rate * m
        if n.denominator == 1 and n > m and n - m <= max_padding:
            return m, int(n)
    allowed = sorted({Fraction(n, m) for m in range(1, 9) for n in range(m + 1, m + max_padding + 1)})
    shown = ", ".join(f"{float(a):.3g}" for a in allowed if a <= 3)
    raise ValueError(f"liftquant: no codebook realises {bits} bits per weight (n/m with m <= {max_group}, "
                     f"n - m <= {max_padding}); rates up to 3 include {shown}")  # fmt: skip


@dataclass
class LiftCodebook:
    """Codewords ``{M y : y in {-1, +1}^n}`` of a trained ``M`` (``m x n``)."""

    matrix: Tensor
    _inverse: Tensor | None = field(default=None, repr=False)
    _offsets: Tensor | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        m, n = self.matrix.shape
        if not 0 < m < n or n - m > MAX_PADDING_BITS:
            raise ValueError(f"liftquant: M must be m x n with m < n <= m + {MAX_PADDING_BITS}, got {m} x {n}")

    @property
    def m(self) -> int:
        return self.matrix.shape[0]

    @property
    def n(self) -> int:
        return self.matrix.shape[1]

    @property
    def bits_per_weight(self) -> float:
        return self.n / self.m

    def inverse(self) -> Tensor:
        """``[M; N]^-1``: ``N`` completes ``M`` to an invertible square with rows orthogonal to ``M``'s."""
        if self._inverse is None:
            _, _, vh = torch.linalg.svd(self.matrix.detach().double(), full_matrices=True)
            square = torch.cat([self.matrix.detach().double(), vh[self.m :]])
            self._inverse = torch.linalg.inv(square).to(self.matrix.dtype)
        return self._inverse

    def padding_offsets(self) -> Tensor:
        """``B p`` for every padding ``p`` (``2^(n-m), n``), ``B`` the last ``n - m`` columns of ``[M; N]^-1``."""
        if self._offsets is None:
            self._offsets = sign_table(self.n - self.m).to(self.matrix.dtype) @ self.inverse()[:, self.m :].T
        return self._offsets

    def candidates(self, z: Tensor) -> Tensor:
        """``(batch, 2^(n-m), n)`` sign vectors: ``sign([M; N]^-1 [z; p]) = sign(A z + B p)`` for every padding."""
        lifted = (z @ self.inverse()[:, : self.m].T.to(z))[:, None, :] + self.padding_offsets().to(z)[None]
        return torch.copysign(torch.ones((), dtype=z.dtype), lifted)  # 2.5x faster than a where on two scalars

    @torch.no_grad()
    def nearest_candidates(self, z: Tensor, count: int) -> Tensor:
        """The ``count`` candidates (``batch, count, n``) of ``z`` nearest to it after decoding (all when fewer)."""
        y = self.candidates(z)
        if y.shape[1] <= count:
            return y
        index = (z[:, None, :] - self.decode(y)).pow(2).sum(-1).topk(count, dim=1, largest=False).indices
        return y.gather(1, index[..., None].expand(-1, -1, self.n))

    def vectors_per_chunk(self) -> int:
        """How many vectors one search step takes (``CHUNK_ENTRIES`` candidate entries)."""
        return max(1, CHUNK_ENTRIES // (2 ** (self.n - self.m) * self.n))

    def decode(self, y: Tensor) -> Tensor:
        """``M y`` for sign vectors ``y`` (``..., n``)."""
        return y.to(self.matrix) @ self.matrix.T

    @torch.no_grad()
    def encode(self, z: Tensor, refine: bool = True) -> Tensor:
        """The sign vectors (``batch, n``) of the nearest candidates to ``z`` (``batch, m``)."""
        out = []
        for part in z.split(self.vectors_per_chunk()):
            y = self.candidates(part)
            error = self.decode(y).sub_(part[:, None, :]).pow_(2).sum(-1)
            best = y[torch.arange(part.shape[0]), error.argmin(1)]
            out.append(self._flip_while_better(part, best) if refine else best)
        return torch.cat(out) if out else torch.empty(0, self.n)

    def _flip_while_better(self, z: Tensor, y: Tensor, rounds: int = 4) -> Tensor:
        """Greedy refinement: flip the single bit that lowers ``||z - M y||`` most, while one does."""
        for _ in range(rounds):
            residual = z - self.decode(y)  # (b, m)
            # flipping bit j moves the decode by -2 y_j M[:, j]: the new error in closed form
            step = -2 * y[:, :, None] * self.matrix.T[None]  # (b, n, m)
            error = (residual[:, None, :] - step).pow(2).sum(-1)  # (b, n)
            gain = residual.pow(2).sum(-1, keepdim=True) - error
            best_gain, j = gain.max(1)
            better = best_gain > 1e-9
            if not bool(better.any()):
                break
            rows = torch.nonzero(better).squeeze(1)
            y = y.clone()
            y[rows, j[rows]] *= -1
        return y

    @classmethod
    def train(cls, m: int, n: int, steps: int = 3000, batch: int = 500, tau: float = 10.0, restarts: int = 5,
              seed: int = 0, lr: float = 0.02) -> LiftCodebook:  # fmt: skip
        """``M`` minimising the soft-min distortion on standard normal vectors; the best of ``restarts``."""
        best, best_mse = None, math.inf
        for restart in range(restarts):
            generator = torch.Generator().manual_seed(seed * 1000 + restart)
            matrix = torch.nn.Parameter(torch.randn(m, n, generator=generator) / math.sqrt(n))
            optimizer = torch.optim.Adam([matrix], lr=lr)
            schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps, eta_min=lr / 20)
            for _ in range(steps):
                z = torch.randn(batch, m, generator=generator)
                frozen = cls(matrix.detach())
                optimizer.zero_grad()
                for part in z.split(frozen.vectors_per_chunk()):  # bounded memory; the gradient accumulates
                    y = frozen.nearest_candidates(part, SOFTMIN_CANDIDATES)
                    distance = (part[:, None, :] - y @ matrix.T).pow(2).sum(-1)
                    loss = (-torch.logsumexp(-tau * distance, dim=1) / tau).sum() / (m * batch)
                    loss.backward()
                optimizer.step()
                schedule.step()
            codebook = cls(matrix.detach().clone())
            mse = codebook.mse(torch.randn(4000, m, generator=generator))
            if mse < best_mse:
                best, best_mse = codebook, mse
        assert best is not None
        return best

    def mse(self, z: Tensor) -> float:
        """Mean squared error per dimension of ``z`` through encode / decode."""
        return float((z - self.decode(self.encode(z))).pow(2).mean())


def pack_signs(y: Tensor) -> Tensor:
    """Sign vectors (``..., n``) as bits (``+1 -> 1``), little-endian within each byte, ``uint8``."""
    bits = (y.reshape(-1) > 0).to(torch.uint8)
    pad = (-bits.numel()) % 8
    bits = torch.cat([bits, bits.new_zeros(pad)]).view(-1, 8)
    return (bits << torch.arange(8, dtype=torch.uint8)).sum(1, dtype=torch.uint8)


def unpack_signs(packed: Tensor, count: int, n: int) -> Tensor:
    """``count`` sign vectors of length ``n`` from ``pack_signs`` bytes (the byte count is checked first)."""
    if packed.numel() * 8 < count * n:
        raise ValueError(f"liftquant: {packed.numel()} bytes hold fewer than the {count} x {n} signs stored")
    bits = (packed[:, None] >> torch.arange(8, dtype=torch.uint8)) & 1
    return bits.reshape(-1)[: count * n].view(count, n).float() * 2 - 1
