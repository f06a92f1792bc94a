r"""Data-parallel ZO / hybrid training over ``torch.distributed`` (torchrun; gloo or nccl).

Every rank holds the whole model, draws the same z (seeds are shared) and applies the same
update, so the weights never need to be exchanged. Rank r evaluates its shard ξ_r of the
global minibatch ξ (|ξ| = N, |ξ_r| = n_r, Σ n_r = N); for a loss that is a mean over examples

    f(θ; ξ) = Σ_r (n_r / N) · f(θ; ξ_r),       ∇_y f(θ; ξ) = Σ_r (n_r / N) · ∇_y f(θ; ξ_r),

so one SUM all-reduce of the weighted per-rank values gives the single-process value for
the same global batch: 8 bytes per forward for the ZO losses f(x ± μz_i), plus the PEFT
gradients once per step, plus (probes) the HVPs ``H v = Σ_r (n_r/N) H_r v``.

Use (what :class:`smoothlab.hybrid.train.Trainer` does)::

    w = init(timeout_s=600)                              # no torchrun env: 1-process no-op
    idx = shard(sampler.batch(t), w.rank, w.world_size)  # this rank's part of batch t
    install_grad_allreduce(engine.optimizer, engine.fo_params, weight=lambda: n / N)  # once
    engine.step(lambda: bundle.loss(encode(idx)),        # the shard loss, and all 2q(+1)
                reduce=lambda v: weighted_sum(v, n, N))  # losses of the step in ONE collective
    with global_gradients(probed_params):                # probes: gradients summed over ranks
        recorder.step(t, sharded_loss_fn(shard_loss, n, N))
    if is_writer(): write files

(``sharded_loss_fn`` alone also works with an unchanged ``engine.step(fn)``, one collective
per forward.)

``sharded_loss_fn`` all-reduces the value of every call (so the engine's float(loss) is the
global loss) and returns ``w_r·f_r + (f − w_r·f_r).detach()``: the value is global, the
gradient is this rank's term w_r ∇f_r, summed over ranks by the optimizer pre-hook.

**Why an explicit all-reduce and not DDP** for the first-order block:
(1) the engine takes ``torch.autograd.grad(loss, fo_params)``, which never accumulates into
``.grad``, and DDP's reducer syncs only from ``AccumulateGrad`` hooks of ``.backward()``;
(2) each step runs 2q no-grad ZO forwards under :func:`smoothlab.shifted` hooks besides the
gradient forward, and DDP would broadcast buffers on each of them and expect one backward per
forward (``find_unused_parameters``, "expected to have finished reduction" errors);
(3) DDP averages with weight 1/W, wrong for unequal shards (the last batch of an epoch),
while we weight by n_r/N; (4) the base weights have ``requires_grad=False`` and the PEFT
gradients are small (one flat bucket per dtype is one message), so DDP's overlap of
communication with backward buys nothing. FSDP / tensor parallelism shard weights across
ranks; every ZO forward would then gather them (the whole model per forward), which defeats
the point of ZO's scalar-only traffic, so they are not used for data parallelism here.

Failures: :func:`init` passes ``timeout`` to ``init_process_group``; a collective that fails
(a peer died: gloo reports the closed connection at once; a peer hangs: after the timeout)
raises :class:`RankFailure` with the rank, the operation and the advice to re-run the same
command to resume. With nccl the watchdog enforces the timeout (``TORCH_NCCL_ASYNC_ERROR_HANDLING``,
on by default) by aborting the process.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist

from smoothlab.errors import UsageError
from smoothlab.hvp import gradient_reduction

from .config import dist_timeout_seconds

__all__ = [
    "CommStats",
    "RankFailure",
    "World",
    "agreed",
    "allreduce_",
    "allreduce_grads_",
    "allreduce_sum",
    "barrier",
    "check_same",
    "current",
    "global_gradients",
    "init",
    "install_grad_allreduce",
    "is_writer",
    "shard",
    "sharded_loss_fn",
    "shutdown",
    "stats",
    "weighted_sum",
]

LossFn = Callable[[], torch.Tensor]
_ENV = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


class RankFailure(RuntimeError):
    """A collective failed: another rank died, or stalled past the timeout."""


@dataclass(frozen=True)
class World:
    """This process's place: ``rank`` of ``world_size`` (1 and rank 0 without torchrun)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None
    timeout_s: float = 0.0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


@dataclass
class CommStats:
    """Payload bytes this rank handed to all-reduce (``bytes``) in ``calls`` collectives.

    A ring all-reduce of P bytes sends ``2(W−1)/W · P`` bytes per rank (:meth:`wire_bytes`).
    """

    bytes: int = 0
    calls: int = 0

    def add(self, nbytes: int) -> None:
        self.bytes += int(nbytes)
        self.calls += 1

    def reset(self) -> tuple[int, int]:
        """Return ``(bytes, calls)`` so far and start counting again (call once a step)."""
        out = (self.bytes, self.calls)
        self.bytes = self.calls = 0
        return out

    def wire_bytes(self, world_size: int) -> float:
        return 2 * (world_size - 1) / world_size * self.bytes if world_size > 1 else 0.0


stats = CommStats()  # the default counter every helper adds to
_world = World()


def free_port() -> int:
    """A free TCP port on 127.0.0.1 (for a single-machine group started without torchrun)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def set_rank_env(rank: int, world_size: int, port: int) -> None:
    """The environment torchrun gives rank ``rank`` of a one-machine group of ``world_size``
    (rendezvous on 127.0.0.1:``port``), for processes started by ``torch.multiprocessing``."""
    os.environ.update(
        {
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "RANK": str(rank),
            "WORLD_SIZE": str(world_size),
            "LOCAL_RANK": str(rank),
        }
    )


def current() -> World:
    """The world set up by :func:`init` (a 1-process world before it)."""
    return _world


def _env_int(name: str) -> int:
    raw = os.environ.get(name, "")
    try:
        return int(raw)
    except ValueError:
        raise UsageError(
            f"environment variable {name}={raw!r} must be an integer (torchrun sets it)"
        ) from None


def init(backend: str | None = None, *, timeout_s: float = 600.0) -> World:
    """Join the process group described by torchrun's environment, or stay single-process.

    Without ``WORLD_SIZE`` (or with ``WORLD_SIZE=1``) nothing is initialised. ``backend``:
    ``"gloo"``, ``"nccl"`` or None (nccl when CUDA is available, else gloo). ``timeout_s``
    (1 s to a week, checked by :func:`smoothlab.hybrid.config.dist_timeout_seconds`, the check of
    ``--dist-timeout``) bounds every collective: a rank whose peers died or hang gets :class:`RankFailure`.
    On CUDA the process's device is set to ``LOCAL_RANK``.
    """
    global _world
    dist_timeout_seconds("timeout_s (--dist-timeout)", timeout_s)
    if "WORLD_SIZE" not in os.environ or _env_int("WORLD_SIZE") == 1:
        _world = World(timeout_s=float(timeout_s))
        return _world
    missing = [k for k in _ENV if k not in os.environ]
    if missing:
        raise UsageError(f"WORLD_SIZE is set but {', '.join(missing)} is not; launch with torchrun")
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend not in ("gloo", "nccl"):
        raise UsageError(f"backend {backend!r} is not supported; accepted: 'gloo', 'nccl'")
    local_rank = _env_int("LOCAL_RANK") if "LOCAL_RANK" in os.environ else 0
    if backend == "nccl":
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        _join(backend, timeout_s)
    _world = World(
        rank=dist.get_rank(),
        world_size=dist.get_world_size(),
        local_rank=local_rank,
        backend=dist.get_backend(),
        timeout_s=float(timeout_s),
    )
    return _world


def _join(backend: str, timeout_s: float) -> None:
    """``init_process_group``; a rendezvous that fails (a peer that never joins within
    ``timeout_s``, an unreachable MASTER_ADDR:MASTER_PORT) is a one-line :class:`RankFailure`."""
    try:
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    except (RuntimeError, ValueError, OSError, dist.DistError) as exc:
        where = f"{os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')}"
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
        raise RankFailure(
            f"rank {os.environ.get('RANK')} of {os.environ.get('WORLD_SIZE')}: joining the "
            f"process group at {where} failed within the {timeout_s:g} s timeout "
            f"({type(exc).__name__}: {first}); start every rank (or raise --dist-timeout) and "
            "re-run the same command"
        ) from exc


def shutdown(*, wait: bool = True) -> None:
    """Leave the process group (no-op when single-process). ``wait`` (gloo): first meet
    the other ranks at a barrier (30 s at most), so none tears its sockets down while a
    peer is still in a collective; leave it off on a failure path."""
    global _world
    if dist.is_available() and dist.is_initialized():
        if wait and dist.get_backend() == "gloo":
            # every rank past its last collective before any tears its sockets down: a rank
            # still in one when a peer left was seen to abort at exit (once, under load)
            with contextlib.suppress(Exception):
                dist.monitored_barrier(timeout=datetime.timedelta(seconds=30))
        dist.destroy_process_group()
    _world = World()


def is_writer() -> bool:
    """True on the one rank that writes files, logs and progress bars (rank 0)."""
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def shard(batch_indices: Sequence[int], rank: int, world_size: int) -> list[int]:
    """Rank ``rank``'s contiguous part of a global minibatch.

    Sizes differ by at most one (the first ``N mod W`` ranks get ⌈N/W⌉), the parts are
    disjoint, in order, and their concatenation over ranks is ``batch_indices``. With
    N < W the last W − N parts are empty (the last batch of an epoch, a small eval set): such
    a rank's share n_r/N is 0, and the caller computes a stand-in value it weights by 0
    (:meth:`smoothlab.hybrid.train.Trainer._local`), so Σ_r (n_r/N) f_r is still the global mean.
    """
    n = len(batch_indices)
    if not (
        isinstance(world_size, int)
        and world_size >= 1
        and isinstance(rank, int)
        and 0 <= rank < world_size
    ):
        raise UsageError(
            f"rank {rank!r} of world size {world_size!r} is not valid; need 0 <= rank < world_size"
        )
    base, extra = divmod(n, world_size)
    start = rank * base + min(rank, extra)
    return list(batch_indices[start : start + base + (rank < extra)])


def _active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


@contextlib.contextmanager
def _collective(what: str) -> Iterator[None]:
    try:
        yield
    except (RuntimeError, dist.DistError) as exc:
        if isinstance(exc, RankFailure):
            raise
        rank, size = dist.get_rank(), dist.get_world_size()
        raise RankFailure(
            f"rank {rank} of {size}: {what} failed: another rank died or stalled for longer than the "
            f"{_world.timeout_s:g} s timeout ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}). "
            "Stop all ranks and re-run the same command to resume from the last checkpoint."
        ) from exc


def _device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def allreduce_sum(values: Sequence[float], *, counter: CommStats | None = None) -> list[float]:
    """Σ over ranks of each value, in float64, in one collective (identity single-process)."""
    values = [float(v) for v in values]
    if not _active() or not values:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=_device())
    with _collective(f"all-reduce of {len(values)} scalar(s)"):
        dist.all_reduce(t)
    (counter or stats).add(t.numel() * t.element_size())
    return t.tolist()


def weighted_sum(
    values: Sequence[float], n_local: int, n_global: int, *, counter: CommStats | None = None
) -> list[float]:
    """Σ_r (n_r/N)·v_r for each value: the global-batch mean of per-shard means.

    The engine may pass all losses of a step (f(x), f(x ± μz_i), i = 1..q) at once: one
    collective of 8·(2q+1) bytes.
    """
    if not (
        isinstance(n_global, int)
        and n_global > 0
        and isinstance(n_local, int)
        and 0 <= n_local <= n_global
    ):
        raise ValueError(
            f"need 0 <= n_local <= n_global and n_global > 0, got n_local={n_local!r}, n_global={n_global!r}"
        )
    w = n_local / n_global
    return allreduce_sum([v * w for v in values], counter=counter)


def sharded_loss_fn(
    loss_fn: LossFn, n_local: int, n_global: int, *, counter: CommStats | None = None
) -> LossFn:
    """The global-batch loss from this rank's shard loss ``loss_fn`` (a mean over n_local).

    Each call all-reduces the value (in float64, returned in the shard loss's dtype), so
    every rank sees f(θ; ξ) = Σ_r (n_r/N) f_r.
    With autograd on, the result is ``w·f_r + (f − w·f_r).detach()`` (w = n_r/N): its gradient
    is this rank's term w·∇f_r, which :func:`allreduce_grads_` then sums. Single-process (or
    N = n_local on one rank) it is ``loss_fn`` itself, so results are unchanged bit for bit.
    All ranks must call it equally often (they do: they run the same engine code).
    """
    if not _active():
        return loss_fn
    w = n_local / n_global

    def fn() -> torch.Tensor:
        local = loss_fn()
        if local.numel() != 1:
            raise ValueError(f"the shard loss must be a scalar, got shape {tuple(local.shape)}")
        (total,) = weighted_sum([float(local.detach())], n_local, n_global, counter=counter)
        # the shard loss's dtype: callers that size steps by it (probes) see the same dtype
        value = torch.tensor(total, dtype=local.dtype, device=local.device)
        if not local.requires_grad:
            return value
        mine = local.reshape(()) * w
        return mine + (value - mine).detach()

    return fn


def allreduce_(
    tensors: Sequence[torch.Tensor], *, weight: float = 1.0, counter: CommStats | None = None
) -> int:
    """In place: t ← Σ_r weight_r · t_r for every tensor (HVPs, gradients). Returns bytes.

    Tensors are flattened into one bucket per (device, dtype): one collective per bucket.
    Every rank must pass tensors of the same shapes in the same order.
    """
    if not _active():
        if weight != 1.0:
            for t in tensors:
                t.mul_(weight)
        return 0
    buckets: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = {}
    for t in tensors:
        buckets.setdefault((t.device, t.dtype), []).append(t)
    sent = 0
    for (_, dtype), ts in buckets.items():
        flat = torch.cat([t.reshape(-1) for t in ts])
        if weight != 1.0:
            flat.mul_(weight)
        with _collective(f"all-reduce of {flat.numel()} {dtype} values"):
            dist.all_reduce(flat)
        (counter or stats).add(flat.numel() * flat.element_size())
        sent += flat.numel() * flat.element_size()
        offset = 0
        for t in ts:
            t.copy_(flat[offset : offset + t.numel()].view_as(t))
            offset += t.numel()
    return sent


def allreduce_grads_(
    params: Sequence[torch.Tensor], *, weight: float = 1.0, counter: CommStats | None = None
) -> int:
    """Sum ``p.grad`` over ranks in place (a missing grad counts as zeros, so every rank sends
    the same layout). ``weight``: n_r/N when the grads are of the shard mean, 1 when they come
    from :func:`sharded_loss_fn` (already weighted). Returns the bytes all-reduced."""
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    return allreduce_([p.grad for p in params], weight=weight, counter=counter)


def install_grad_allreduce(
    optimizer: torch.optim.Optimizer,
    params: Sequence[torch.Tensor],
    *,
    weight: float | Callable[[], float] = 1.0,
    counter: CommStats | None = None,
) -> object:
    """Before every ``optimizer.step`` set the grads of ``params`` to Σ_r weight_r·grad_r.

    ``weight``: 1 for losses from :func:`sharded_loss_fn` (already weighted); n_r/N (or a
    callable giving this step's n_r/N) when the gradients are of the plain shard loss, as
    in :meth:`smoothlab.hybrid.engine.HybridEngine.step` with ``reduce``. Returns the hook handle
    (``.remove()``); a no-op single-process."""
    params = list(params)

    def hook(opt: torch.optim.Optimizer, args: tuple, kwargs: dict) -> None:
        if params and _active():
            w = weight() if callable(weight) else weight
            allreduce_grads_(params, weight=w, counter=counter)

    return optimizer.register_step_pre_hook(hook)


@contextlib.contextmanager
def global_gradients(
    params: Sequence[torch.Tensor], *, counter: CommStats | None = None
) -> Iterator[None]:
    """Inside the context every gradient autograd computes for one of ``params`` is summed
    over ranks as it is produced (a tensor hook per parameter), so with a loss from
    :func:`sharded_loss_fn` (gradient w_r ∇f_r) any gradient-based computation sees the
    global-batch gradient ∇f = Σ_r w_r ∇f_r, and a finite-difference HVP the global
    H v = Σ_r w_r H_r v. The hook's result keeps the local term's autograd graph
    (value global, derivative local), so a double backward (exact HVPs) is summed by the
    same hook when its gradient reaches the parameter: again Σ_r w_r H_r v. smoothlab's
    ``fd`` fast path differentiates leaf copies instead, which no parameter hook sees: its
    gradients are summed through :func:`smoothlab.hvp.gradient_reduction` (one collective per
    gradient of a block). Without that, each rank's Lanczos saw its own shard's H v, the
    ranks' iterations diverged, and a recorded two-rank run hung.

    Parameters get ``requires_grad`` for the duration (a hook needs it). All ranks must run
    the same autograd calls in the same order (they do: same code, same seeds); one
    collective per parameter per gradient. No-op single-process.
    """
    params = [p for p in params]
    if not _active() or not params:
        yield
        return

    def reduce(flat: torch.Tensor) -> None:  # in place; also smoothlab's fd fast path's
        with _collective(f"all-reduce of a gradient of {flat.numel()} values"):
            dist.all_reduce(flat)
        (counter or stats).add(flat.numel() * flat.element_size())

    def hook(g: torch.Tensor) -> torch.Tensor:
        total = g.detach().clone()
        reduce(total)
        return g + (total - g.detach()) if g.requires_grad else total

    flags = [p.requires_grad for p in params]
    handles = []
    try:
        for p in params:
            p.requires_grad_(True)
            handles.append(p.register_hook(hook))
        with gradient_reduction(reduce):
            yield
    finally:
        for h in handles:
            h.remove()
        for p, f in zip(params, flags):
            p.requires_grad_(f)


def barrier(what: str = "barrier", *, timeout_s: float | None = None) -> None:
    """Wait for all ranks; :class:`RankFailure` (naming the missing ranks with gloo) when one
    died or does not arrive within ``timeout_s`` (default: the timeout given to :func:`init`;
    nccl always uses the latter)."""
    if not _active():
        return
    with _collective(what):
        if dist.get_backend() == "gloo":
            seconds = timeout_s or _world.timeout_s or 600.0
            dist.monitored_barrier(timeout=datetime.timedelta(seconds=seconds), wait_all_ranks=True)
        else:
            dist.barrier()


@contextlib.contextmanager
def agreed(what: str) -> Iterator[None]:
    """Run the body on every rank, then let every rank learn whether any refused it: a
    :class:`UsageError` on some ranks (rank 0's run-folder lock, a log header only rank 0
    reads) is raised on all of them, the lowest failing rank's message first (named when it
    is not this rank's), instead of the others failing later in a collective with a
    misleading "another rank died" message. One all-gather; a no-op single-process.
    Other exceptions propagate as they are (the peers then see a :class:`RankFailure`)."""
    mine: UsageError | None = None
    try:
        yield
    except UsageError as e:
        mine = e
    if not _active():
        if mine is not None:
            raise mine
        return
    values: list[object] = [None] * dist.get_world_size()
    with _collective(f"{what} (agreeing on refusals)"):
        dist.all_gather_object(values, None if mine is None else str(mine))
    failed = [(r, m) for r, m in enumerate(values) if m is not None]
    if mine is not None:
        raise mine
    if failed:
        rank, msg = failed[0]
        raise UsageError(f"rank {rank}: {msg}")


def check_same(name: str, value: str) -> None:
    """Refuse (:class:`UsageError`) when ranks disagree on ``value`` (e.g. the weights hash
    or the config): data parallelism needs identical replicas."""
    if not _active():
        return
    values: list[object] = [None] * dist.get_world_size()
    with _collective(f"comparing {name} across ranks"):
        dist.all_gather_object(values, value)
    if len(set(values)) > 1:
        shown = ", ".join(f"rank {r}: {v}" for r, v in enumerate(values))
        raise UsageError(
            f"ranks disagree on {name} ({shown}); start every rank from the same model and config"
        )
