r"""Checkpoints of seeds: a zeroth-order trajectory stored as its seeds, not its weights.

A ZO update of the base weights x is

    x_{t+1} = (1 − η_t λ) x_t − η_t Σ_i c_{t,i} z(s_{t,i}, x),    z(s, ·) ~ N(0, I) from seed s,

so x_T is a function of x_0 and the per-step records (s_{t,i}, c_{t,i}, η_t, λ) only. This
module stores those records in an append-only ``seeds.jsonl`` (tens of bytes per step instead
of a copy of the model: 2.6 GB for OPT-1.3B) and rebuilds x_T by :func:`replay`, which calls
the very update function that training used, so the replayed weights are bit-identical.

File format (UTF-8 JSON lines, one object per line, flushed after every step)::

    {"format": "smoothlab-seeds", "version": 1, "model": ..., "revision": ...,
     "weights_hash": "sha256:...", "num_params": N, "extra": {...}}            # header
    {"step": 0, "lr": 1e-06, "wd": 0.0, "terms": [[seed, coef], ...]}         # x_0 -> x_1
    {"step": 1, ...}                                                           # x_1 -> x_2

``step`` is the 0-based index t of the update (the engine's ``t`` before the step), so the
first k lines after the header turn x_0 into x_k. Floats are written with ``repr`` (shortest
round-trip form), so reading gives back the identical doubles; seeds are exact integers.
A last line without its newline (a crash mid-write) is dropped on read and cut off before
the next append.

Hashing: :func:`weights_hash` is SHA-256 over (dtype, shape, raw bytes) of every tensor in
order. On the bundled 22.7M-parameter MiniLM (fp32, 91 MB) it takes ~0.065 s on one core
(≈1.4 GB/s with the CPU's SHA extensions), i.e. ~2 s for OPT-1.3B and ~100 s for 70B in bf16.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from smoothlab.errors import UsageError

__all__ = ["FORMAT", "SeedEntry", "SeedHeader", "SeedLog", "digest", "replay", "weights_hash"]

FORMAT = "smoothlab-seeds"
VERSION = 1

Terms = Sequence[tuple[int, float]]
ApplyUpdate = Callable[[list[torch.Tensor], list[tuple[int, float]], float, float], None]


def _tensors(
    params: nn.Module | Mapping[str, torch.Tensor] | Iterable[torch.Tensor],
) -> list[tuple[str, torch.Tensor]]:
    if isinstance(params, nn.Module):
        return [(n, p) for n, p in params.named_parameters()]
    if isinstance(params, Mapping):
        return list(params.items())
    out = []
    for i, p in enumerate(params):
        if not isinstance(p, torch.Tensor):
            raise TypeError(f"weights_hash expects tensors, got {type(p).__name__} at position {i}")
        out.append((str(i), p))
    return out


def weights_hash(params: nn.Module | Mapping[str, torch.Tensor] | Iterable[torch.Tensor]) -> str:
    """``"sha256:<hex>"`` of the tensors, in order: for each, its dtype, shape and raw bytes.

    ``params``: a module (its ``named_parameters()``; names are hashed too), a name→tensor
    mapping (names hashed), or a sequence of tensors (positions hashed). Exact: any bit of any
    weight, a reordering, a reshape or a dtype change gives another digest. GPU tensors are
    copied to the host one at a time.
    """
    h = hashlib.sha256()
    for name, t in _tensors(params):
        t = t.detach()
        h.update(f"{name}|{str(t.dtype)}|{tuple(t.shape)}\n".encode())
        if t.numel():
            flat = t.reshape(-1).contiguous().cpu()  # reshape copies only when non-contiguous
            h.update(flat.view(torch.uint8).numpy())
    return "sha256:" + h.hexdigest()


@dataclass(frozen=True)
class SeedHeader:
    """What the log replays onto: the initial weights x_0 (model name, revision, hash)."""

    model: str
    weights_hash: str
    num_params: int
    revision: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def of(
        cls,
        model: str,
        params: Sequence[torch.Tensor],
        revision: str | None = None,
        extra: dict[str, Any] | None = None,
    ) -> SeedHeader:
        """The header of a log whose initial weights are ``params`` (hashed now)."""
        return cls(
            model=model,
            weights_hash=weights_hash(params),
            num_params=sum(p.numel() for p in params),
            revision=revision,
            extra=dict(extra or {}),
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "version": VERSION,
            "model": self.model,
            "revision": self.revision,
            "weights_hash": self.weights_hash,
            "num_params": self.num_params,
            "extra": self.extra,
        }


@dataclass(frozen=True)
class SeedEntry:
    """Update t: x_{t+1} = (1 − lr·wd)·x_t − lr · Σ_i coef_i · z(seed_i)."""

    step: int
    terms: tuple[tuple[int, float], ...]
    lr: float
    wd: float


SEED_LIMIT = 1 << 63  # perturbation seeds are 63-bit (smoothlab.perturb.param_seed)
HEADER_KEYS = ("model", "weights_hash", "num_params")


def _check_terms(terms: Terms) -> list[list]:
    """``terms`` as ``[[seed, coef], ...]``: a non-empty list of pairs, each seed an int in
    [0, 2⁶³) and each coefficient a finite number; else TypeError / ValueError."""
    if isinstance(terms, str | bytes | dict) or not isinstance(terms, Sequence) or not terms:
        raise TypeError(f"the ZO terms are a non-empty list of (seed, coefficient), got {terms!r}")
    out = []
    for pair in terms:
        if isinstance(pair, str | bytes) or not isinstance(pair, Sequence) or len(pair) != 2:
            raise TypeError(f"a ZO term is a (seed, coefficient) pair, got {pair!r}")
        seed, coef = pair
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < SEED_LIMIT:
            raise TypeError(f"a ZO seed must be an int in [0, 2**63), got {seed!r}")
        if isinstance(coef, bool) or not isinstance(coef, int | float):
            raise TypeError(f"ZO coefficient {coef!r} of seed {seed} is not a number")
        if not math.isfinite(float(coef)):
            raise ValueError(
                f"ZO coefficient {coef!r} of seed {seed} is not finite: the loss diverged; lower the learning rates"
            )
        out.append([int(seed), float(coef)])
    return out


def _number(rec: dict, key: str) -> float:
    """``rec[key]`` as a finite float (a JSON number; a string such as "inf" is refused)."""
    v = rec[key]
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
        raise ValueError(f"{key} must be a finite number, got {v!r}")
    return float(v)


def _entry(raw: bytes) -> SeedEntry:
    """One entry line, checked as :meth:`SeedLog.append` checks what it writes."""
    rec = json.loads(raw)
    if not isinstance(rec, dict):
        raise TypeError(f"an entry is a JSON object, got {type(rec).__name__}")
    step = rec["step"]
    if isinstance(step, bool) or not isinstance(step, int):
        raise TypeError(f"step must be an integer, got {step!r}")
    terms = _check_terms(rec["terms"])
    return SeedEntry(
        step=step,
        lr=_number(rec, "lr"),
        wd=_number(rec, "wd"),
        terms=tuple((s, c) for s, c in terms),
    )


def _header(path: Path, head: dict) -> SeedHeader:
    """The header object, every key it needs present and typed (else UsageError)."""
    for key in HEADER_KEYS:
        if key not in head:
            raise UsageError(f"{path} is not a usable seed log: its header has no {key!r}")
    ok = (
        isinstance(head["weights_hash"], str)
        and isinstance(head["num_params"], int)
        and not isinstance(head["num_params"], bool)
        and isinstance(head.get("extra") or {}, dict)
    )
    if not ok:
        raise UsageError(f"{path} is not a usable seed log: its header has a malformed field")
    return SeedHeader(
        model=head["model"],
        weights_hash=head["weights_hash"],
        num_params=head["num_params"],
        revision=head.get("revision"),
        extra=head.get("extra") or {},
    )


def _parse(path: Path) -> tuple[SeedHeader, list[SeedEntry], int]:
    """Header, entries and the byte length of the complete lines (a torn tail excluded)."""
    data = path.read_bytes()
    end = data.rfind(b"\n") + 1  # complete lines only
    lines = data[:end].split(b"\n")[:-1]
    if not lines:
        raise UsageError(f"{path} is not a seed log: it has no complete header line")
    try:
        head = json.loads(lines[0])
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UsageError(f"{path} is not a seed log: bad header ({exc})") from None
    if not isinstance(head, dict) or head.get("format") != FORMAT:
        raise UsageError(f"{path} is not a seed log: its header has no format={FORMAT!r}")
    if head.get("version") != VERSION:
        raise UsageError(
            f"{path}: seed log version {head.get('version')!r} is not supported; accepted: {VERSION}"
        )
    header = _header(path, head)
    entries = []
    for k, raw in enumerate(lines[1:], start=2):
        try:
            entry = _entry(raw)
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError) as exc:
            raise UsageError(f"{path}, line {k}: corrupt seed-log entry ({exc})") from None
        if entry.step != len(entries):
            raise UsageError(
                f"{path}, line {k}: step {entry.step} where step {len(entries)} was expected"
            )
        entries.append(entry)
    return header, entries, end


def digest(path: str | os.PathLike[str], steps: int) -> str:
    """``"sha256:<hex>"`` of the header line and the first ``steps`` entry lines of a log,
    as bytes. A checkpoint stores it for the entries it covers; a replay recomputes it, so
    any edit of those lines (a coefficient, a seed, the header's hash) is detected."""
    data = Path(path).read_bytes()
    cut = 0
    for _ in range(steps + 1):
        nl = data.find(b"\n", cut)
        if nl < 0:
            break
        cut = nl + 1
    return "sha256:" + hashlib.sha256(data[:cut]).hexdigest()


class SeedLog:
    """The append-only ``seeds.jsonl`` of one run.

    ``SeedLog(path, header)`` starts a new log (writes the header) or continues an existing
    one, which must have the same ``weights_hash`` (else :class:`UsageError` naming both).
    ``SeedLog(path)`` opens an existing log (for :meth:`read` / :func:`replay`). The file is
    opened for writing only on the first :meth:`append` / :meth:`truncate_after`.
    ``fsync=True`` also forces each line to disk (flush alone survives a process crash,
    not a power loss).
    """

    def __init__(
        self, path: str | os.PathLike[str], header: SeedHeader | None = None, *, fsync: bool = False
    ) -> None:
        self.path = Path(path)
        self.fsync = fsync
        self._fh: Any = None
        if self.path.exists():
            existing, entries, _ = _parse(self.path)
            if header is not None and header.weights_hash != existing.weights_hash:
                raise UsageError(
                    f"{self.path} was written for initial weights {existing.weights_hash} "
                    f"(model {existing.model!r}), but these initial weights hash to "
                    f"{header.weights_hash} (model {header.model!r}); use a new run folder"
                )
            self.header, self._next = existing, len(entries)
        elif header is None:
            raise UsageError(f"no seed log at {self.path}")
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_name(self.path.name + ".tmp")
            tmp.write_text(json.dumps(header.to_json()) + "\n")
            tmp.replace(self.path)
            self.header, self._next = header, 0

    @property
    def num_steps(self) -> int:
        """Number of complete entries: replaying all of them gives x_{num_steps}."""
        return self._next

    def _open(self) -> Any:
        if self._fh is None:
            _, entries, end = _parse(self.path)
            if end != self.path.stat().st_size:  # a torn last line: cut it before appending
                with self.path.open("r+b") as fh:
                    fh.truncate(end)
            self._next = len(entries)
            self._fh = self.path.open("a", encoding="utf-8")
        return self._fh

    def append(self, step: int, terms: Terms, lr: float, wd: float) -> None:
        """Log update ``step`` (must be :attr:`num_steps`) and flush it to the file."""
        fh = self._open()
        if step != self._next:
            raise ValueError(
                f"seed log {self.path}: appending step {step}, expected step {self._next}"
            )
        lr, wd = float(lr), float(wd)
        if not (math.isfinite(lr) and math.isfinite(wd)):
            raise ValueError(
                f"seed log {self.path}: lr and wd must be finite, got lr={lr!r}, wd={wd!r}"
            )
        rec = {"step": step, "lr": lr, "wd": wd, "terms": _check_terms(terms)}
        fh.write(json.dumps(rec, allow_nan=False) + "\n")
        fh.flush()
        if self.fsync:
            os.fsync(fh.fileno())
        self._next += 1

    def truncate_after(self, steps: int) -> None:
        """Keep the first ``steps`` entries (x_0 → x_steps) and drop the rest.

        For resuming from a checkpoint taken after ``steps`` updates: entries written after it
        would otherwise be applied twice.
        """
        self._open()
        if not (isinstance(steps, int) and 0 <= steps <= self._next):
            raise UsageError(f"seed log {self.path} has {self._next} steps; cannot keep {steps!r}")
        if steps == self._next:
            return
        self._fh.close()
        data = self.path.read_bytes()
        cut = 0
        for _ in range(steps + 1):  # header + ``steps`` lines
            cut = data.index(b"\n", cut) + 1
        with self.path.open("r+b") as fh:
            fh.truncate(cut)
        self._fh, self._next = None, steps
        self._open()

    def read(self) -> tuple[SeedHeader, list[SeedEntry]]:
        """The header and every complete entry, in step order."""
        if self._fh is not None:
            self._fh.flush()
        header, entries, _ = _parse(self.path)
        return header, entries

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None

    def __enter__(self) -> SeedLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def replay(
    params: Sequence[torch.Tensor],
    log: SeedLog | str | os.PathLike[str],
    apply_update: ApplyUpdate,
    upto: int | None = None,
) -> int:
    """Turn the initial weights ``params`` (x_0, in place) into x_upto by re-applying the log.

    ``apply_update(params, terms, lr, wd)`` must be the update function of the run that wrote
    the log (the engine's ZO update); each entry is applied in step order under
    ``torch.no_grad()``, so the result is bit-identical to the trained weights. ``upto``:
    number of updates to apply (default: all). Returns the number applied. Refuses
    (:class:`UsageError`) when ``params`` do not hash to the log's ``weights_hash``.
    """
    log = log if isinstance(log, SeedLog) else SeedLog(log)
    header, entries = log.read()
    params = list(params)
    have = weights_hash(params)
    if have != header.weights_hash:
        raise UsageError(
            f"cannot replay {log.path} onto these weights: the log starts from {header.weights_hash} "
            f"(model {header.model!r}, revision {header.revision!r}) but the weights given hash to {have}; "
            "load the same initial model (name, revision, seed of any fresh head)"
        )
    n = len(entries) if upto is None else upto
    if isinstance(n, bool) or not isinstance(n, int) or not 0 <= n <= len(entries):
        raise UsageError(f"{log.path} holds {len(entries)} steps; cannot replay upto={upto!r}")
    with torch.no_grad():
        for e in entries[:n]:
            apply_update(params, list(e.terms), e.lr, e.wd)
    return n
