"""Exact, trace-free perturbations: evaluate a model at ``W + s·d`` without touching ``W``.

Adding ``s·d`` to a weight in place and subtracting it back is not exact in floating point
(fp32 drift ~1e-7 per pair; in bf16 as large as an update). Two exact mechanisms here:

* **on the fly** (a module tree is known): a forward pre-hook on every module that owns a
  perturbed parameter shadows it with ``W + s·d`` for that forward only (the shadow lives in
  the module's instance ``__dict__``, which attribute lookup finds before ``_parameters``);
  a forward hook removes it. Extra memory: one layer's weight at a time (a reusable
  :class:`Scratch` buffer when no gradient is taken). The shadow is a differentiable
  function of ``W``, so ``∂f/∂W`` at the shifted point is ordinary autograd. A plain
  ``nn.Embedding`` reads only its input's rows, so where the direction fetches rows cheaply
  (the table, the counter hash, explicit tensors) its output becomes ``W[ids] + s·z[ids]``:
  a step pays for the batch's tokens, not the vocabulary (half of MiniLM's weights are its
  word embedding).
* **swap** (only the parameters are known): ``p.data`` is replaced by a new tensor
  ``W + s·d`` and the *original tensor object* is put back afterwards, so restoration is
  bit-exact. Extra memory: one copy of the perturbed parameters.

Directions are explicit tensors or generated from a seed, so a zeroth-order step replays
``z`` instead of storing it. Seeded perturbation sources (``SOURCES``, :func:`get_source`),
every one with i.i.d. zero-mean, unit-variance entries of fourth moment κ = E z⁴:

==============  ====  ==================================================================
``gaussian``    3     exact N(0, 1): ``torch.randn`` from a generator seeded per parameter
``table``       3     shared noise table (Salimans et al. 2017): one N(0, 1) table per run,
                      rebuilt from the run's seed; z = cyclic slices at seeded offsets
``rademacher``  1     ±1 from packed random bits (Spall's SPSA): 64 signs per generator word
``hash``        1     ±1 from a counter-based generator: splitmix64(key, word index) bits
==============  ====  ==================================================================

Two-sided SPSA with q directions, g_i = z_iᵀa (a = ∇f, μ → 0), ĝ = (1/q) Σ g_i z_i, d = dim:

    E ĝ = a,     E‖ĝ‖² = ((d + κ − 2)/q + 1) ‖a‖²                (:func:`spsa_second_moment`)
    E[ĝᵀHĝ] = (1/q)(‖a‖² tr H + 2 aᵀHa + (κ − 3) Σ_j a_j² H_jj) + (1 − 1/q) aᵀHa
                                                                     (:func:`spsa_curvature`)

(Gaussian: (d + 1)/q + 1.) The table's entries are exactly N(0, 1) over the table's
randomness; different slices may overlap (probability ≈ n/T per pair), which correlates
their z with E[z_j z_k] ≈ 1/T per entry pair — a bias of relative size ≈ √(n_other)/T,
below 1e-3 for the default sizes. The table holds T = 2²² entries (:func:`table_size`); a
larger parameter (an embedding, a large MLP) takes one slice per T of its entries, at
independent offsets. Given the table, E[zzᵀ] over offsets is the table's autocorrelation
(within a slice; ≈ 0 across slices), a positive semi-definite matrix of mean diagonal 1:
ĝ is unbiased over tables, and given one table its mean is that matrix times ∇f, a fixed
random preconditioner (spread about 1 for a slice as long as the table).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves

from .errors import UsageError

Direction = Callable[[int, torch.Tensor], torch.Tensor]

_MASK = (1 << 63) - 1
_M64 = (1 << 64) - 1


def param_seed(seed: int, index: int) -> int:
    """A 63-bit seed for parameter ``index`` under base ``seed`` (splitmix64 mix)."""
    z = (seed * 0x9E3779B97F4A7C15 + (index + 1) * 0xBF58476D1CE4E5B9) & _M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _M64
    return (z ^ (z >> 31)) & _MASK


def _signed(c: int) -> int:
    """A 64-bit constant as the int64 that has its bits (tensor ops wrap modulo 2⁶⁴)."""
    return c - (1 << 64) if c >= 1 << 63 else c


# --------------------------------------------------------------------------- scratch


class Scratch:
    """Reusable flat buffers per (device, dtype): ``take`` one at least ``n`` long, ``give``
    it back. Saves the page faults of allocating a fresh layer-sized tensor per use (a fresh
    tensor costs ~5 passes over it on CPU). Nested users get distinct buffers. Only CPU
    buffers are kept: on CUDA the caching allocator already reuses freed memory, and a held
    layer-sized buffer would raise a step's peak memory above inference."""

    def __init__(self) -> None:
        self._free: dict[tuple, list[torch.Tensor]] = {}

    def take(self, n: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        free = self._free.setdefault((device, dtype), [])
        for k, buf in enumerate(free):
            if buf.numel() >= n:
                return free.pop(k)
        return torch.empty(n, dtype=dtype, device=device)

    def give(self, buf: torch.Tensor) -> None:
        if buf.device.type == "cpu":  # elsewhere the caching allocator already reuses memory
            self._free.setdefault((buf.device, buf.dtype), []).append(buf)

    def clear(self) -> None:
        self._free.clear()


# --------------------------------------------------------------------------- directions


class SeededDirection:
    """z(i, p) for one seed, regenerated identically on every call (never stored).

    ``d(i, p)`` returns a fresh tensor shaped and typed like ``p``. The fused forms read or
    write ``p`` once and generate z straight into reusable scratch memory:
    ``shift(i, w, s, out)`` = w + s·z (into ``out`` when given) and ``update_(i, p, a)``:
    p ← p + a·z. z is the same bits in all three, and in float32/float64 so are the results
    (equal to ``torch.add(w, d(i, w), alpha=s)``). In half precision a source that applies z
    piece by piece (:class:`_Piecewise`: the table's slices, the hash's chunks) can differ
    from one whole ``torch.add`` by one unit in the last place at a few entries: CPU kernels
    round a vectorised body and a scalar tail differently, and the pieces move the tails.
    Shifts and updates of a run always take the same pieces, so its replay stays bit-exact.
    """

    # whether the direction has ``rows(i, w, ids)`` = z[ids] (an embedding's rows, shaped
    # ``ids.shape + (dim,)``) at the cost of those rows only; the on-the-fly shift uses it
    cheap_rows = False

    def __init__(self, sampler: Sampler, seed: int) -> None:
        self.sampler, self.seed = sampler, seed

    def fill(self, index: int, p: torch.Tensor, buf: torch.Tensor) -> torch.Tensor:
        """z for ``p`` as a flat tensor of ``p.dtype`` written into ``buf`` (len >= padded(n))."""
        raise NotImplementedError

    def padded(self, n: int) -> int:
        return n

    def __call__(self, index: int, p: torch.Tensor) -> torch.Tensor:
        n = p.numel()
        buf = torch.empty(self.padded(n), dtype=p.dtype, device=p.device)
        return self.fill(index, p, buf)[:n].view(p.shape)

    def shift(
        self, index: int, w: torch.Tensor, scale: float, out: torch.Tensor | None = None
    ) -> torch.Tensor:
        n = w.numel()
        buf = self.sampler.scratch.take(self.padded(n), w.dtype, w.device)
        try:
            z = self.fill(index, w, buf)[:n].view(w.shape)
            if out is None:
                return torch.add(w, z, alpha=scale)
            return torch.add(w, z, alpha=scale, out=out[:n].view(w.shape))
        finally:
            self.sampler.scratch.give(buf)

    def update_(self, index: int, p: torch.Tensor, alpha: float) -> None:
        n = p.numel()
        buf = self.sampler.scratch.take(self.padded(n), p.dtype, p.device)
        try:
            p.add_(self.fill(index, p, buf)[:n].view(p.shape), alpha=alpha)
        finally:
            self.sampler.scratch.give(buf)


class _Gaussian(SeededDirection):
    """``torch.randn`` (float32, then rounded to p's dtype) from a generator on p's device
    seeded with ``param_seed(seed, i)``, written into scratch memory (no allocation)."""

    def fill(self, index: int, p: torch.Tensor, buf: torch.Tensor) -> torch.Tensor:
        gen = torch.Generator(device=p.device)
        gen.manual_seed(param_seed(self.seed, index))
        n = p.numel()
        if buf.dtype == torch.float32:
            return torch.randn(n, generator=gen, device=p.device, out=buf[:n])
        z = torch.randn(n, generator=gen, device=p.device, dtype=torch.float32)
        return buf[:n].copy_(z)


class _Signs(SeededDirection):
    """±1 from 64-bit words: bit k of byte b of a word is the sign of entry 8b + k, unpacked
    through a 256 × 8 lookup table in one ``index_select`` (one write pass over z)."""

    def padded(self, n: int) -> int:
        return -(-n // 64) * 64

    def _words(self, index: int, k: int, device: torch.device) -> torch.Tensor:
        raise NotImplementedError

    def fill(self, index: int, p: torch.Tensor, buf: torch.Tensor) -> torch.Tensor:
        k = -(-p.numel() // 64)
        idx = self._words(index, k, p.device).view(torch.uint8).int()
        lut = self.sampler.sign_table(p.device, buf.dtype)
        return torch.index_select(lut, 0, idx, out=buf[: 64 * k].view(8 * k, 8)).view(-1)


class _Rademacher(_Signs):
    """Packed random bits from a ``torch.Generator`` seeded with ``param_seed(seed, i)``."""

    def _words(self, index: int, k: int, device: torch.device) -> torch.Tensor:
        gen = torch.Generator(device=device)
        gen.manual_seed(param_seed(self.seed, index))
        return torch.empty(k, dtype=torch.int64, device=device).random_(
            -(2**63), None, generator=gen
        )


_GOLDEN, _C1, _C2 = (
    _signed(c) for c in (0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB)
)


def splitmix64(x: torch.Tensor) -> torch.Tensor:
    """The splitmix64 finaliser on an int64 tensor, in place (wrapping int64 arithmetic,
    logical shifts by masking): a bijection of 64-bit words with full avalanche."""
    for shift, mult in ((30, _C1), (27, _C2), (31, None)):
        x.bitwise_xor_(x.bitwise_right_shift(shift).bitwise_and_((1 << (64 - shift)) - 1))
        if mult is not None:
            x.mul_(mult)
    return x


class _Piecewise(SeededDirection):
    """A direction whose z comes in flat pieces (``_z_pieces``: (offset, z[offset : offset +
    m]) in order) that never need z built whole: a shift or an update is one pass per piece.
    A weight taking a gradient, or not contiguous, gets z built whole instead."""

    def _z_pieces(
        self, index: int, p: torch.Tensor, start: int = 0, stop: int | None = None
    ) -> Iterator[tuple[int, torch.Tensor]]:
        """(a, z[a : a + m]) covering z[start:stop] in order (default: all of z)."""
        raise NotImplementedError

    def shift_range(
        self, index: int, w: torch.Tensor, scale: float, start: int, stop: int, out: torch.Tensor
    ) -> torch.Tensor:
        """(w + scale·z) flattened, entries start..stop, into ``out`` (a contiguous ``w``,
        no gradient); :meth:`shift` is the whole range, so a block has a shift's bits."""
        wf, of = w.view(-1), out[: stop - start]
        for a, z in self._z_pieces(index, w, start, stop):
            m = z.numel()
            torch.add(wf[a : a + m], z, alpha=scale, out=of[a - start : a - start + m])
        return of

    def shift(
        self, index: int, w: torch.Tensor, scale: float, out: torch.Tensor | None = None
    ) -> torch.Tensor:
        if (w.requires_grad and torch.is_grad_enabled()) or not w.is_contiguous():
            return torch.add(w, self(index, w), alpha=scale)
        n = w.numel()
        of = torch.empty(n, dtype=w.dtype, device=w.device) if out is None else out
        return self.shift_range(index, w, scale, 0, n, of).view(w.shape)

    def update_(self, index: int, p: torch.Tensor, alpha: float) -> None:
        if not p.is_contiguous():
            p.add_(self(index, p), alpha=alpha)
            return
        pf = p.view(-1)
        for a, z in self._z_pieces(index, p):
            pf[a : a + z.numel()].add_(z, alpha=alpha)


class _Hash(_Piecewise, _Signs):
    """Counter-based: word j = splitmix64(key + (j + 1)·φ), key = ``param_seed(seed, i)``.
    Stateless and random-access; pure integer ops, so CPU and CUDA give the same z.

    Random access makes z cheap in pieces: a shift or an update generates z a chunk of
    ``CHUNK`` entries at a time into scratch (its extra memory is one chunk, not one
    parameter: a step's peak stays at inference's plus one chunk and one block of shadow),
    and an embedding's rows of z are generated for the batch's rows only (``cheap_rows``)."""

    cheap_rows = True
    CHUNK = 1 << 20  # entries of z generated at a time (a multiple of 64)

    def _words_at(self, index: int, j: torch.Tensor) -> torch.Tensor:
        """Words number ``j`` (an int64 tensor, consumed) of parameter ``index``."""
        return splitmix64(j.add_(1).mul_(_GOLDEN).add_(_signed(param_seed(self.seed, index))))

    def _words(self, index: int, k: int, device: torch.device, start: int = 0) -> torch.Tensor:
        j = torch.arange(start, start + k, dtype=torch.int64, device=device)
        return self._words_at(index, j)

    def _z_pieces(
        self, index: int, p: torch.Tensor, start: int = 0, stop: int | None = None
    ) -> Iterator[tuple[int, torch.Tensor]]:
        """Chunks of ``CHUNK`` entries, each generated into one reused scratch buffer (from
        the 64-entry word holding ``start``)."""
        stop = p.numel() if stop is None else stop
        first = start - start % 64
        buf = self.sampler.scratch.take(
            min(self.padded(stop - first), self.CHUNK), p.dtype, p.device
        )
        lut = self.sampler.sign_table(p.device, p.dtype)
        try:
            for a in range(first, stop, self.CHUNK):
                m = min(self.CHUNK, stop - a)
                k = -(-m // 64)
                idx = self._words(index, k, p.device, a // 64).view(torch.uint8).int()
                z = torch.index_select(lut, 0, idx, out=buf[: 64 * k].view(8 * k, 8))
                lo = max(a, start)
                yield lo, z.view(-1)[lo - a : m]
        finally:
            self.sampler.scratch.give(buf)

    def rows(self, index: int, w: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """z[ids] of a (rows × dim) weight: the words that cover each row, generated for
        the batch's rows only, their bits unpacked and each row's window gathered."""
        dim, flat = w.shape[-1], ids.reshape(-1)
        first = flat * dim  # flat index of each row's first entry
        width = -(-dim // 64) + 1  # words covering dim entries from any bit offset
        j = first.div(64, rounding_mode="floor")[:, None] + torch.arange(width, device=ids.device)
        lut = self.sampler.sign_table(w.device, w.dtype)
        bits = lut[self._words_at(index, j).view(torch.uint8).int()].view(flat.numel(), 64 * width)
        at = (first % 64)[:, None] + torch.arange(dim, device=ids.device)
        return bits.gather(1, at).view(*ids.shape, dim)


class _Table(_Piecewise):
    """z = table slices at seeded offsets: z[a + u] = table[(o_k + u) mod T] for the k-th run
    of T entries of the parameter (a = k·T), o_0 = ``param_seed(seed, i) mod T`` and
    o_k = ``param_seed(param_seed(seed, i), k) mod T``. A parameter of at most T entries is
    at most two contiguous slices, a larger one a few more: a shift or an update is one pass
    per slice and z is never built, and an embedding's rows of z are read straight from the
    table (``cheap_rows``)."""

    cheap_rows = True

    def _pieces(
        self, index: int, p: torch.Tensor
    ) -> tuple[torch.Tensor, list[tuple[int, int, int]]]:
        """The table and z's slices (a, o, m): z[a : a + m] = table[o : o + m]."""
        t = self.sampler.noise_table(p.device, p.dtype)
        n, size = p.numel(), t.numel()
        key = param_seed(self.seed, index)
        pieces = []
        for k, a in enumerate(range(0, n, size)):
            o = (key if k == 0 else param_seed(key, k)) % size
            m = min(size, n - a)
            head = min(m, size - o)
            pieces.append((a, o, head))
            if head < m:  # wraps around the table's end
                pieces.append((a + head, 0, m - head))
        return t, pieces

    def __call__(self, index: int, p: torch.Tensor) -> torch.Tensor:
        t, pieces = self._pieces(index, p)
        return torch.cat([t[o : o + m] for _, o, m in pieces]).view(p.shape)

    def rows(self, index: int, w: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        t, pieces = self._pieces(index, w)
        dim = w.shape[-1]
        if len(pieces) == 1:  # z is one contiguous slice: a view, indexed like the weight
            o = pieces[0][1]
            return F.embedding(ids, t[o : o + w.numel()].view(w.shape))
        # a row's piece is found once per row, not per entry (a batch's rows are ~1e3, its
        # entries ~3e5: 0.6 ms against 3.4 ms on 2 CPU threads); the few rows that straddle
        # two pieces are then placed entry by entry
        dev = ids.device
        starts = torch.tensor([a for a, _, _ in pieces], device=dev)
        shift = torch.tensor([o - a for a, o, _ in pieces], device=dev)
        ends = torch.tensor([a + m for a, _, m in pieces], device=dev)
        first = ids * dim  # where each row starts in z
        k = torch.searchsorted(starts, first, right=True) - 1
        span = torch.arange(dim, device=dev)
        flat = (first + shift[k]).unsqueeze(-1) + span  # places in the table
        straddle = first + dim > ends[k]
        if bool(straddle.any()):
            places = first[straddle].unsqueeze(-1) + span  # places in z
            flat[straddle] = places + shift[torch.searchsorted(starts, places, right=True) - 1]
        return t.index_select(0, flat.reshape(-1)).view(flat.shape)

    def _z_pieces(
        self, index: int, p: torch.Tensor, start: int = 0, stop: int | None = None
    ) -> Iterator[tuple[int, torch.Tensor]]:
        """The table slices: views, so z is never built."""
        t, pieces = self._pieces(index, p)
        stop = p.numel() if stop is None else stop
        for a, o, m in pieces:
            lo, hi = max(a, start), min(a + m, stop)
            if lo < hi:
                yield lo, t[o + lo - a : o + hi - a]

    def _slices(
        self, indices: Sequence[int], ps: Sequence[torch.Tensor]
    ) -> tuple[list[int], list[torch.Tensor]]:
        """Which of ``ps`` are one contiguous table slice (the rest wrap around the end or
        are not contiguous), and those slices shaped like their parameters."""
        at, zs = [], []
        for k, (i, p) in enumerate(zip(indices, ps)):
            t, pieces = self._pieces(i, p)
            if len(pieces) == 1 and p.is_contiguous():
                o = pieces[0][1]
                at.append(k)
                zs.append(t[o : o + p.numel()].view(p.shape))
        return at, zs

    def shift_many(
        self, indices: Sequence[int], ws: Sequence[torch.Tensor], scale: float
    ) -> list[torch.Tensor]:
        """[w_k + scale·z_k] for many parameters in one batched call (``torch._foreach_add``:
        the same elementwise add as :meth:`shift`, without a Python round trip per tensor)."""
        at, zs = self._slices(indices, ws)
        out: list[torch.Tensor | None] = [None] * len(ws)
        for k, r in zip(at, torch._foreach_add([ws[k] for k in at], zs, alpha=scale)):
            out[k] = r
        return [
            r if r is not None else self.shift(i, w, scale) for i, w, r in zip(indices, ws, out)
        ]

    def update_many(self, indices: Sequence[int], ps: Sequence[torch.Tensor], alpha: float) -> None:
        """p_k ← p_k + alpha·z_k for many parameters, batched like :meth:`shift_many`."""
        at, zs = self._slices(indices, ps)
        torch._foreach_add_([ps[k] for k in at], zs, alpha=alpha)
        done = set(at)
        for k, (i, p) in enumerate(zip(indices, ps)):
            if k not in done:
                self.update_(i, p, alpha)


# --------------------------------------------------------------------------- sources


TABLE_MIN = 1 << 22  # entries of the smallest noise table (16 MiB in float32)
TABLE_CAP = 1 << 22  # and of the largest: 8 MiB in bfloat16, 0.3% of OPT-1.3B's weights


def table_size(max_numel: int, *, capped: bool = True) -> int:
    """Entries of a run's noise table: its largest perturbed parameter rounded up to a
    multiple of 2²⁰, at least ``TABLE_MIN`` and at most ``TABLE_CAP`` (both 2²²: every run's
    table has 2²² entries). A parameter larger than the table takes its z from several
    slices at independent offsets, so a model with a 50k-token vocabulary does not hold a
    table as large as its embedding (OPT-1.3B's: 8% of its weights, which broke ZO's
    inference-sized memory). ``capped=False``: the size of runs saved before the cap, which
    recorded none and resume with it."""
    size = max(TABLE_MIN, -(-int(max_numel) // (1 << 20)) * (1 << 20))
    return min(size, max(TABLE_MIN, TABLE_CAP)) if capped else size


class Sampler:
    """A source bound to one run: ``sampler(seed)`` is the :class:`SeededDirection` of a
    perturbation seed. Holds what the run reuses: scratch buffers, the sign lookup table and
    (``table``) the noise table, built on first use on each device from ``run_seed``."""

    def __init__(
        self,
        source: Source,
        run_seed: int = 0,
        max_numel: int = 0,
        scratch: Scratch | None = None,
        table: int | None = None,
    ) -> None:
        """``max_numel``: the largest parameter the run perturbs, which sizes the noise table
        (:func:`table_size`); ``table``: its entries instead (a saved run's)."""
        self.source, self.run_seed = source, int(run_seed)
        self.table_size = table_size(max_numel) if table is None else int(table)
        self.scratch = scratch if scratch is not None else Scratch()
        self._cache: dict[tuple, torch.Tensor] = {}

    def __call__(self, seed: int) -> SeededDirection:
        return self.source.direction_class(self, seed)

    def noise_table(self, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """The run's N(0, 1) table on ``device`` (float32 draw, rounded to ``dtype``). One is
        kept per device and dtype: a model holding float32 norms beside bfloat16 weights
        uses two (24 MiB), instead of redrawing one at every switch of dtype."""
        key = ("table", torch.device(device), dtype)
        if key not in self._cache:
            gen = torch.Generator(device=device)
            gen.manual_seed(param_seed(self.run_seed, -1))
            t = torch.randn(self.table_size, generator=gen, device=device, dtype=torch.float32)
            self._cache[key] = t.to(dtype)
        return self._cache[key]

    def clear(self) -> None:
        """Drop what this sampler keeps (noise table, sign table, scratch buffers); they are
        rebuilt, identically, on next use."""
        self._cache.clear()
        self.scratch.clear()

    def sign_table(self, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """256 × 8: row b holds the signs (−1)^(1 − bit k of b), k = 0..7."""
        key = ("signs", torch.device(device), dtype)
        if key not in self._cache:
            bits = (
                torch.arange(256, device=device)[:, None].bitwise_right_shift(
                    torch.arange(8, device=device)
                )
                & 1
            )
            self._cache[key] = (2 * bits - 1).to(dtype)
        return self._cache[key]


@dataclass(frozen=True)
class Source:
    """A perturbation source: name, fourth moment κ = E z⁴ of its i.i.d. unit-variance
    entries (the only property the SPSA moments depend on) and how z is produced."""

    name: str
    kurtosis: float
    summary: str
    direction_class: type[SeededDirection]

    def sampler(
        self,
        run_seed: int = 0,
        max_numel: int = 0,
        scratch: Scratch | None = None,
        table: int | None = None,
    ) -> Sampler:
        """This source bound to a run (``max_numel``: the largest parameter it will perturb;
        ``table``: the noise table's entries instead of :func:`table_size` of it)."""
        return Sampler(self, run_seed, max_numel, scratch, table)

    def second_moment(self, grad_norm_sq: float, d: int, q: int = 1) -> float:
        """E‖ĝ‖² of a q-direction two-sided estimate: see :func:`spsa_second_moment`."""
        return spsa_second_moment(grad_norm_sq, d, q, self.kurtosis)


_SOURCES = (
    Source("gaussian", 3.0, "exact N(0,1) per parameter from a seeded torch.Generator", _Gaussian),
    Source("table", 3.0, "shared N(0,1) noise table per run, slice at a seeded offset", _Table),
    Source(
        "rademacher", 1.0, "±1 from packed random bits of a seeded torch.Generator", _Rademacher
    ),
    Source("hash", 1.0, "±1 from a counter-based generator (splitmix64 of seed and index)", _Hash),
)
SOURCES: tuple[str, ...] = tuple(s.name for s in _SOURCES)
DEFAULT_SOURCE = "table"


def get_source(name: str) -> Source:
    """The source called ``name`` (one of ``SOURCES``); UsageError naming it otherwise."""
    for s in _SOURCES:
        if s.name == name:
            return s
    raise UsageError(f"unknown perturbation source {name!r}; accepted: {', '.join(SOURCES)}")


def seeded(name: str, seed: int, *, run_seed: int = 0, max_numel: int = 0) -> SeededDirection:
    """z(i, p) of source ``name`` for perturbation ``seed`` (a fresh sampler: for many seeds
    of one run, keep ``get_source(name).sampler(run_seed, max_numel)`` and call it)."""
    return get_source(name).sampler(run_seed, max_numel)(seed)


def seeded_gaussian(seed: int) -> Direction:
    """``z_i ~ N(0, I)`` for parameter ``i``, regenerated identically on every call.

    Drawn from a dedicated ``torch.Generator`` on the parameter's device seeded with
    ``param_seed(seed, i)``; the global RNG is never touched. Generated in float32 and cast
    to the parameter's dtype, so fp32 and bf16 copies of a model see the same z up to rounding.
    """
    return seeded("gaussian", seed)


def spsa_second_moment(grad_norm_sq: float, d: int, q: int = 1, kurtosis: float = 3.0) -> float:
    """E‖ĝ‖² of ĝ = (1/q) Σ_i (z_iᵀa) z_i with i.i.d. entries, E z = 0, E z² = 1, E z⁴ = κ:

        E‖ĝ‖² = ((d + κ − 2)/q + 1) ‖a‖²

    (per direction E[(zᵀa)²‖z‖²] = (d − 1 + κ)‖a‖²; cross terms give ‖a‖²). Gaussian κ = 3:
    (d + 1)/q + 1; Rademacher κ = 1: (d − 1)/q + 1. Two-sided differences as μ → 0."""
    if not (isinstance(d, int) and d >= 1 and isinstance(q, int) and q >= 1):
        raise UsageError(f"d and q must be integers >= 1, got d={d!r}, q={q!r}")
    return ((d + kurtosis - 2) / q + 1) * float(grad_norm_sq)


def spsa_curvature(
    grad: torch.Tensor, hess: torch.Tensor, q: int = 1, kurtosis: float = 3.0
) -> float:
    """E[ĝᵀHĝ] for the estimate of :func:`spsa_second_moment` (a = ``grad``, H = ``hess``):

        (1/q)(‖a‖² tr H + 2 aᵀHa + (κ − 3) Σ_j a_j² H_jj) + (1 − 1/q) aᵀHa

    — the second-order term of the descent lemma E f(x − ηĝ) ≈ f − η‖a‖² + (η²/2) E[ĝᵀHĝ]."""
    a, H = grad.double().reshape(-1), hess.double()
    aHa = float(a @ H @ a)
    single = (
        float(a @ a) * float(torch.trace(H))
        + 2 * aHa
        + (kurtosis - 3) * float((a * a) @ torch.diagonal(H))
    )
    return single / q + (1 - 1 / q) * aHa


class _Explicit:
    """Directions given as tensors, one per parameter (same shapes)."""

    cheap_rows = True

    def __init__(self, directions: Sequence[torch.Tensor]) -> None:
        self.directions = directions

    def __call__(self, index: int, p: torch.Tensor) -> torch.Tensor:
        return self.directions[index].to(dtype=p.dtype, device=p.device)

    def rows(self, index: int, w: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self(index, w).view(w.shape))


def explicit(directions: Sequence[torch.Tensor]) -> Direction:
    """Directions given as tensors, one per parameter (same shapes)."""
    return _Explicit(directions)


def owners(
    root: nn.Module, params: Sequence[torch.Tensor]
) -> dict[nn.Module, list[tuple[str, int]]]:
    index = {id(p): i for i, p in enumerate(params)}
    owners: dict[nn.Module, list[tuple[str, int]]] = {}
    seen: set[int] = set()
    for module in root.modules():
        for name, p in module._parameters.items():
            if p is not None and id(p) in index:
                owners.setdefault(module, []).append((name, index[id(p)]))
                seen.add(id(p))
    missing = [i for i, p in enumerate(params) if id(p) not in seen]
    if missing:
        raise UsageError(
            f"{len(missing)} perturbed parameter(s) (e.g. index {missing[0]}, shape "
            f"{tuple(params[missing[0]].shape)}) are not registered in the given module tree "
            f"{type(root).__name__}; pass the model that owns them"
        )
    return owners


def _shadow(
    direction: Direction,
    i: int,
    w: torch.Tensor,
    scale: float,
    scratch: Scratch | None,
    backward_inside: bool = False,
):
    """(w + scale·z_i, the scratch buffer it lives in or None). Under autograd a graph may
    save the shadow (a linear layer's weight, for its input's gradient), so scratch is used
    there only when every backward ends inside the context (``backward_inside``) and no
    gradient flows to ``w`` itself."""
    fast = getattr(direction, "shift", None)
    if fast is None:
        return torch.add(w, direction(i, w), alpha=scale), None
    grad = torch.is_grad_enabled()
    if scratch is None or (grad and not (backward_inside and not w.requires_grad)):
        return fast(i, w, scale), None
    buf = scratch.take(w.numel(), w.dtype, w.device)
    return fast(i, w, scale, out=buf), buf


SMALL = 1 << 16  # entries: parameters at most this size are shadowed for a whole context
BLOCK = 1 << 22  # entries: a larger linear weight is shadowed a block of rows at a time


class _ShiftedLinear(torch.autograd.Function):
    """F.linear(x, w + scale·z_i, bias) for a weight that takes no gradient, whose backward
    rebuilds the shadow instead of keeping it: the graph holds x's gradient path, not a
    copy of the layer. Valid while ``w`` is unchanged, i.e. inside :func:`shifted` with
    ``backward_inside``."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, bias: torch.Tensor | None, recipe: tuple) -> torch.Tensor:
        ctx.recipe, ctx.has_bias = recipe, bias is not None
        direction, i, w, scale, scratch = recipe
        if _by_blocks(direction, w):
            return _blocked_linear(direction, i, w, bias, x, scale, scratch)
        with _lent_shadow(recipe) as shadow:
            return F.linear(x, shadow, bias)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        gx = gb = None
        if ctx.needs_input_grad[0]:
            direction, i, w, scale, scratch = ctx.recipe
            if _by_blocks(direction, w):  # Σ over row blocks of grad[..., rows] @ shadow rows
                for r0, r1, part in _row_blocks(direction, i, w, scale, scratch):
                    term = grad[..., r0:r1].matmul(part)
                    gx = term if gx is None else gx.add_(term)
            else:
                with _lent_shadow(ctx.recipe) as shadow:
                    gx = grad.matmul(shadow)
        if ctx.has_bias and ctx.needs_input_grad[1]:
            gb = grad.reshape(-1, grad.shape[-1]).sum(0)
        return gx, gb, None


def _by_blocks(direction: Direction, w: torch.Tensor) -> bool:
    """Whether ``w``'s shadow is built a block of rows at a time (:data:`BLOCK`)."""
    return w.numel() > BLOCK and hasattr(direction, "shift_range")


def _row_blocks(
    direction: _Piecewise, i: int, w: torch.Tensor, scale: float, scratch: Scratch | None
) -> Iterator[tuple[int, int, torch.Tensor]]:
    """(r0, r1, rows r0..r1 of w + scale·z_i) over ``BLOCK``-entry blocks of rows, each
    written into the same buffer (valid until the next one)."""
    n_out, n_in = w.shape
    rows = max(1, BLOCK // n_in)
    size = min(rows, n_out) * n_in
    buf = (
        scratch.take(size, w.dtype, w.device)
        if scratch is not None
        else torch.empty(size, dtype=w.dtype, device=w.device)
    )
    try:
        with torch.no_grad():
            for r0 in range(0, n_out, rows):
                r1 = min(n_out, r0 + rows)
                part = direction.shift_range(i, w, scale, r0 * n_in, r1 * n_in, buf)
                yield r0, r1, part.view(r1 - r0, n_in)
    finally:
        if scratch is not None:
            scratch.give(buf)


@contextlib.contextmanager
def _lent_shadow(recipe: tuple) -> Iterator[torch.Tensor]:
    """w + scale·z_i (:func:`_shadow`, no gradient), its scratch given back on exit."""
    direction, i, w, scale, scratch = recipe
    with torch.no_grad():
        shadow, buf = _shadow(direction, i, w, scale, scratch)
    try:
        yield shadow
    finally:
        if buf is not None:
            scratch.give(buf)


def _blocked_linear(
    direction: _Piecewise,
    i: int,
    w: torch.Tensor,
    bias: torch.Tensor | None,
    x: torch.Tensor,
    scale: float,
    scratch: Scratch | None,
) -> torch.Tensor:
    """F.linear(x, w + scale·z_i, bias) with no gradient, the shifted weight built ``BLOCK``
    entries of rows at a time into one buffer: a 50k-token head or a large MLP layer costs
    one block of memory, not its own size. Each block's rows are the same bits as the whole
    shadow's; the products are blocks of the whole product (a BLAS may round them
    differently)."""
    out = x.new_empty(*x.shape[:-1], w.shape[0])
    for r0, r1, part in _row_blocks(direction, i, w, scale, scratch):
        out[..., r0:r1] = F.linear(x, part, None if bias is None else bias[r0:r1])
    return out


def _shadows(
    direction: Direction, indices: list[int], ws: list[torch.Tensor], scale: float
) -> list[torch.Tensor]:
    """[w + scale·z_i] for many parameters: one batched call where the direction has one
    (``shift_many``) and no gradient flows to the weights, else one :func:`_shadow` each."""
    many = getattr(direction, "shift_many", None)
    if (
        many is not None
        and ws
        and not (torch.is_grad_enabled() and any(w.requires_grad for w in ws))
    ):
        return many(indices, ws, scale)
    return [_shadow(direction, i, w, scale, None)[0] for i, w in zip(indices, ws)]


@contextlib.contextmanager
def _swapped(
    params: Sequence[torch.Tensor],
    direction: Direction,
    scale: float,
    only: Collection[int],
) -> Iterator[None]:
    """:func:`shifted` for the parameters whose indices are in ``only`` (all of them
    without ``root``): exact ``.data`` swap, restored on exit."""
    chosen = sorted(only)
    originals = [params[i].data for i in chosen]
    try:
        with torch.no_grad():
            for i in chosen:
                params[i].data = _shadow(direction, i, params[i].data, scale, None)[0]
        yield
    finally:
        for i, data in zip(chosen, originals):
            params[i].data = data


# What a function may read of a tensor without reading its values: a shifted parameter
# seen unshifted there changes nothing (HF models ask a weight's dtype and device anywhere).
_METADATA = frozenset(
    "size dim ndimension numel nelement stride is_contiguous data_ptr element_size "
    "is_floating_point is_complex storage_offset get_device __len__ __hash__ untyped_storage "
    "shape dtype device requires_grad is_leaf grad_fn ndim layout is_cuda is_meta is_sparse "
    "is_quantized itemsize nbytes _version is_nested".split()
)


def random_state_kept(params: Iterable[torch.Tensor]) -> contextlib.AbstractContextManager:
    """A context after which torch's random state is as before it: the CPU generator's and
    those of the CUDA devices ``params`` live on (a probe inside training draws nothing
    that training would have drawn)."""
    devices = sorted({p.device.index or 0 for p in params if p.device.type == "cuda"})
    return torch.random.fork_rng(devices=devices)


def outside_reads(
    root: nn.Module, params: Sequence[torch.Tensor], run: Callable[[], object]
) -> set[int]:
    """Indices of ``params`` whose values ``run()`` reads outside a call of a module that
    owns them: such a read sees the stored weight under on-the-fly shifting (a head
    computed as ``h @ emb.weight.T``, a penalty over ``model.parameters()``, peft's DoRA
    reading its base layer's weight, prompt tuning reading its encoder's embedding).

    ``run`` (a loss) is called once without gradients, the random-number state restored
    after it; every torch function it calls is watched for a parameter passed while the
    innermost running module (of those owning a watched parameter) is not one of its
    owners. Reads of a tensor's metadata (shape, dtype, device) do not count. Conservative:
    a small or container-held parameter read by a parent is reported, though its
    whole-context shadow would have been seen there. :func:`shifted` swaps the reported
    ones (``swap=``), which is exact for any read."""
    owned = owners(root, params)
    index = {id(p): i for i, p in enumerate(params)}
    held_by: dict[int, set[int]] = {}
    for m, names in owned.items():
        for _, i in names:
            held_by.setdefault(id(params[i]), set()).add(id(m))
    running: list[int] = []
    found: set[int] = set()

    class Watch(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            name = getattr(func, "__name__", "")
            if name == "__get__":  # a property: Tensor.shape, .dtype, .data, ...
                name = getattr(getattr(func, "__self__", None), "__name__", "")
            if name not in _METADATA:
                top = running[-1] if running else None
                for t in tree_leaves((args, kwargs)):
                    ok = held_by.get(id(t)) if isinstance(t, torch.Tensor) else None
                    if ok is not None and top not in ok:
                        found.add(index[id(t)])
            return func(*args, **kwargs)

    def enter(module: nn.Module, args: object) -> None:
        running.append(id(module))

    def leave(module: nn.Module, args: object, output: object) -> None:
        running.pop()

    handles = []
    try:
        for m in owned:
            handles.append(m.register_forward_pre_hook(enter, prepend=True))
            handles.append(m.register_forward_hook(leave, always_call=True))
        with random_state_kept(params), torch.no_grad(), Watch():
            run()
    finally:
        for h in handles:
            h.remove()
    return found


def _aliases(output: object, buf: torch.Tensor) -> bool:
    """Whether a tensor in ``output`` shares ``buf``'s memory."""
    ptr = buf.untyped_storage().data_ptr()
    return any(
        isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() == ptr
        for t in tree_leaves(output)
    )


def row_wise(module: nn.Module) -> bool:
    """An ``nn.Embedding`` with the stock forward (no ``max_norm`` renorm, no subclass
    forward that rescales the rows): its output is exactly ``W[ids]``."""
    return (
        isinstance(module, nn.Embedding)
        and type(module).forward is nn.Embedding.forward
        and module.max_norm is None
    )


@contextlib.contextmanager
def _hooked(
    root: nn.Module,
    params: Sequence[torch.Tensor],
    direction: Direction,
    scale: float,
    scratch: Scratch | None,
    backward_inside: bool = False,
    skip: Collection[int] = (),
    owned: Mapping[nn.Module, list[tuple[str, int]]] | None = None,
) -> Iterator[None]:
    """:func:`shifted` with ``root``: shadows installed by forward hooks, removed on exit
    (parameters whose indices are in ``skip`` left alone; ``owned``: :func:`owners` of
    ``root`` and ``params`` when the caller keeps it)."""
    owned = {
        m: kept
        for m, names in (owners(root, params) if owned is None else owned).items()
        if (kept := [(n, i) for n, i in names if i not in skip])
    }
    # A plain embedding reads only the rows of its input ids: (W + s·z)[ids] is computed as
    # W[ids] + s·z[ids] after its forward, so a step pays for those rows, not the vocabulary.
    by_rows = [m for m in owned if getattr(direction, "cheap_rows", False) and row_wise(m)]
    # Shadowed for the whole context (built at entry, with grad on so ∂f/∂W still flows):
    # a container without a forward of its own (ParameterDict/ParameterList, e.g. peft's
    # lora_embedding_A) never fires hooks, its parameters being read by the parent; and small
    # parameters (biases, norms: SMALL entries or fewer), whose per-forward hooks and per-tensor
    # calls cost more than their shadows' memory. The rest are shadowed one layer at a time.
    whole: dict[nn.Module, list[tuple[str, int]]] = {}
    hooked: dict[nn.Module, list[tuple[str, int]]] = {}
    for m, names in owned.items():
        if m in by_rows:
            continue
        container = type(m).forward is nn.Module.forward
        for name, i in names:
            small = params[i].numel() <= SMALL
            (whole if container or small else hooked).setdefault(m, []).append((name, i))
    handles = []
    lent: dict[tuple[int, str], torch.Tensor] = {}  # scratch given back after the layer
    held: list[torch.Tensor] = []  # scratch a graph may still read: given back on exit

    def pre_hook(module: nn.Module, args: object) -> None:
        for name, i in hooked[module]:
            module.__dict__[name], buf = _shadow(
                direction, i, module._parameters[name], scale, scratch, backward_inside
            )
            if buf is not None and torch.is_grad_enabled():
                held.append(buf)
            elif buf is not None:
                lent[id(module), name] = buf

    def post_hook(module: nn.Module, args: object, output: object) -> None:
        for name, _ in hooked[module]:
            module.__dict__.pop(name, None)
            buf = lent.pop((id(module), name), None)
            if buf is not None and _aliases(output, buf):
                held.append(buf)  # the output is a view of the shadow (``return self.pe[:n]``)
            elif buf is not None:
                scratch.give(buf)

    def rows_hook(module: nn.Module, args: tuple, kwargs: dict, output: torch.Tensor):
        ids = args[0] if args else kwargs["input"]
        z = direction.rows(owned[module][0][1], module.weight, ids)
        return torch.add(output, z, alpha=scale)

    # Plain linear layers whose weight alone is shifted per layer get their forward replaced
    # for the context (an instance ``forward``, left alone where another library already
    # put one, e.g. accelerate's device hooks), so that no layer-sized shadow outlives it:
    # * no gradient, weight larger than BLOCK (a 50k-token head, a large MLP): the shadow
    #   is built a block of rows at a time (:func:`_blocked_linear`);
    # * a gradient to the input only, every backward inside the context (``backward_inside``,
    #   the engine's gradient at the perturbed point): the shadow is built for the product
    #   and again in the backward (:class:`_ShiftedLinear`), so the graph holds no shadow;
    # * otherwise the whole shadow, through the hooks above.
    linears = [
        m
        for m, names in hooked.items()
        if type(m) is nn.Linear
        and "forward" not in m.__dict__
        and hasattr(direction, "shift")
        and [n for n, _ in names] == ["weight"]
        and params[names[0][1]].is_contiguous()
    ]

    def linear_forward(module: nn.Module, input: torch.Tensor) -> torch.Tensor:  # noqa: A002
        x = input  # named as nn.Linear.forward names it, for callers that pass input=
        w, i, bias = module._parameters["weight"], hooked[module][0][1], module.bias
        if not torch.is_autocast_enabled():
            needs = (x, w) if bias is None else (x, w, bias)
            grad = torch.is_grad_enabled() and any(t.requires_grad for t in needs)
            if not grad and _by_blocks(direction, w):
                return _blocked_linear(direction, i, w, bias, x, scale, scratch)
            if grad and backward_inside and not w.requires_grad:
                return _ShiftedLinear.apply(x, bias, (direction, i, w, scale, scratch))
        pre_hook(module, (x,))
        try:
            return nn.Linear.forward(module, x)
        finally:
            post_hook(module, (x,), None)

    try:
        with torch.enable_grad():
            spots = [(m, name, i) for m, names in whole.items() for name, i in names]
            ws = [m._parameters[name] for m, name, _ in spots]
            for (m, name, _), w in zip(
                spots, _shadows(direction, [i for *_, i in spots], ws, scale)
            ):
                m.__dict__[name] = w
        for module in by_rows:
            handles.append(module.register_forward_hook(rows_hook, with_kwargs=True))
        for module in hooked:
            if module in linears:
                module.__dict__["forward"] = functools.partial(linear_forward, module)
                continue
            handles.append(module.register_forward_pre_hook(pre_hook))
            handles.append(module.register_forward_hook(post_hook, always_call=True))
        yield
    finally:
        for h in handles:
            h.remove()
        for module in linears:
            module.__dict__.pop("forward", None)
        for module, names in owned.items():
            for name, _ in names:
                module.__dict__.pop(name, None)
        for buf in [*lent.values(), *held]:
            scratch.give(buf)


@contextlib.contextmanager
def shifted(
    params: Sequence[torch.Tensor],
    direction: Direction | Sequence[torch.Tensor],
    scale: float,
    root: nn.Module | None = None,
    *,
    scratch: Scratch | None = None,
    backward_inside: bool = False,
    swap: Collection[int] = (),
    owned: Mapping[nn.Module, list[tuple[str, int]]] | None = None,
) -> Iterator[None]:
    """Inside the context, forwards see ``p_i + scale · direction(i, p_i)`` for every i.

    ``owned``: :func:`owners` ``(root, params)``, for a caller that shifts the same
    parameters of the same model many times (an engine: its model's modules and weights do
    not change within a run); without it each call walks the module tree (about 1.5 ms a
    forward for MiniLM on a CPU, a fixed cost that a GPU's fast forward feels more).

    With ``root`` the shift is applied on the fly by forward hooks (stored weights are never
    written); without it by an exact ``.data`` swap. Either way every parameter is
    bit-identical after the context, also when the body raises. A :class:`SeededDirection`
    is applied fused (one pass per layer); ``scratch`` lends the shadows reusable memory in
    forwards without autograd, and also in forwards with autograd when ``backward_inside``
    promises that every backward through them ends before the context exits (the graph
    reads the shadows until then; each layer keeps its own buffer until exit).

    On the fly, a parameter is seen shifted when it is read inside its owning module's
    forward, or when its owner is a container without a forward (``ParameterDict``,
    ``ParameterList``). A parameter another module reads directly from a submodule whose
    forward does not run (e.g. peft prompt tuning with ``inference_mode=True`` reading
    ``prompt_encoder.embedding.weight``) would be seen unshifted: :func:`outside_reads`
    finds such parameters, and those whose indices are in ``swap`` are shifted by the exact
    ``.data`` swap instead (one copy each), the rest on the fly.
    """
    if not callable(direction):
        direction = explicit(direction)
    if scale == 0.0:
        yield
        return
    swap = set(range(len(params))) if root is None else set(swap)
    with contextlib.ExitStack() as stack:
        if swap:
            stack.enter_context(_swapped(params, direction, scale, swap))
        if len(swap) < len(params):
            stack.enter_context(
                _hooked(root, params, direction, scale, scratch, backward_inside, swap, owned)
            )
        yield
