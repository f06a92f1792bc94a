"""Runs that cannot be corrupted: deferred signals, a locked run folder, a resume that checks
the config, and a divergence guard.

- :class:`SignalGuard` turns SIGINT and SIGTERM into :class:`Interrupted` (a
  ``KeyboardInterrupt``) and defers them while a :meth:`SignalGuard.critical` section runs
  (a weight update, a checkpoint write, a row write): a stop between two sections takes
  effect at once, a stop inside one takes effect when it ends.
- :class:`RunLock`: an advisory ``fcntl.flock`` on ``<run>/.lock`` (the file holds the
  holder's pid); a second writer gets a :class:`UsageError` naming that pid.
- :func:`config_diff` / :func:`check_resume`: every field of the saved config that differs
  from the new one, except those that do not alter the trajectory (:data:`INERT`).
- :class:`DivergenceGuard`: a non-finite loss, or ``loss > factor · loss_1`` for
  ``patience`` consecutive steps, raises :class:`Diverged`.
- :func:`clear_run`: what ``--restart`` removes (:data:`RUN_FILES`).

Torch-free (standard library only).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import math
import os
import signal
import threading
from collections.abc import Iterator, Mapping
from pathlib import Path
from types import FrameType
from typing import Any

from smoothlab.errors import UsageError
from smoothlab.runlog import os_problem

__all__ = [
    "INERT",
    "LOCK_FILE",
    "RUN_FILES",
    "DivergenceGuard",
    "Diverged",
    "Interrupted",
    "RunLock",
    "SignalGuard",
    "check_resume",
    "clear_run",
    "config_diff",
]

LOCK_FILE = ".lock"
# Every file a training run writes into its folder (``--restart`` removes them all).
RUN_FILES = (
    "metrics.csv",
    "smoothness.csv",
    "checkpoint.pt",
    "checkpoint.pt.tmp",
    "best.pt",
    "best.pt.tmp",
    "summary.json",
    "advice.json",
    "seeds.jsonl",
    "metrics.csv.tmp",
    "smoothness.csv.tmp",
)
# Config fields a resumed run may change: the step target, labels, the divergence stop
# rule (it never changes an update), and the advisor's options (rates given as "auto" are
# compared as the numbers they resolved to).
INERT = frozenset(
    {
        "steps",
        "extend_steps",
        "out",
        "name",
        "extra",
        "diverge_factor",
        "diverge_patience",
        "advise_rule",
        "advise_hvp",
        "advise_vectors",
        "dist_timeout",
    }
)


# ----------------------------------------------------------------------------- signals
class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM arrived (``signum``); raised where it may take effect."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"interrupted by {signal.Signals(signum).name}")
        self.signum = signum


class SignalGuard:
    """Deliver SIGINT/SIGTERM as :class:`Interrupted`, deferred inside :meth:`critical`.

    ``with SignalGuard() as guard:`` installs the handlers (main thread only; elsewhere the
    guard defers nothing and Python's own handling stays) and restores the previous ones on
    exit. ``with guard.critical():`` sections nest; a signal received inside is raised when
    the outermost section ends (after its body completed), a second signal meanwhile is
    remembered as the same stop.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.depth = 0
        self.pending: int | None = None
        self._old: dict[int, Any] = {}

    def _handler(self, signum: int, frame: FrameType | None) -> None:
        if self.depth > 0:
            self.pending = self.pending or signum
            return
        raise Interrupted(signum)

    def __enter__(self) -> SignalGuard:
        if threading.current_thread() is threading.main_thread():
            for s in self.SIGNALS:
                self._old[s] = signal.signal(s, self._handler)
        return self

    def __exit__(self, *exc: object) -> None:
        for s, old in self._old.items():
            signal.signal(s, old)
        self._old.clear()

    def stop_if_pending(self) -> None:
        """Raise a stop received inside a critical section now, at a point of it where
        nothing has been changed yet (a step's forwards, before its update)."""
        if self.pending is not None:
            signum, self.pending = self.pending, None
            raise Interrupted(signum)

    @contextlib.contextmanager
    def critical(self) -> Iterator[None]:
        """Run the body to its end whatever signal arrives; raise the stop afterwards."""
        self.depth += 1
        try:
            yield
        finally:
            self.depth -= 1
        if self.depth == 0:
            self.stop_if_pending()


# ----------------------------------------------------------------------------- lock
class RunLock:
    """An exclusive advisory lock on a run folder: ``fcntl.flock`` on ``folder/.lock``.

    :meth:`acquire` creates the folder, locks the file without blocking and writes the pid;
    if another process holds it, :class:`UsageError` names that pid (so does a folder that
    cannot be written, or a file system without locks). The kernel releases
    the lock when the holder exits, however it exits (SIGKILL included), so a stale file
    never blocks. The file is kept (unlinking it would let two processes lock two inodes).
    """

    def __init__(self, folder: str | os.PathLike[str]) -> None:
        self.folder = Path(folder)
        self.path = self.folder / LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> RunLock:
        if self._fd is not None:
            return self
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise UsageError(os_problem(self.path, e, "create the lock file")) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
            os.close(fd)
            if e.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise UsageError(
                    f"cannot lock run folder {str(self.folder)!r} ({self.path}: "
                    f"{e.strerror or type(e).__name__}; the file system may not support "
                    "locks): use a run folder on a local disk"
                ) from None
            who = f"process {holder}" if holder.isdigit() else "another process"
            raise UsageError(
                f"run folder {str(self.folder)!r} is in use by {who} (lock {self.path}); "
                "wait for it to finish, stop it, or use another --out"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            os.ftruncate(fd, 0)
        finally:
            os.close(fd)  # closing the last descriptor releases the flock

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def clear_run(folder: str | os.PathLike[str]) -> list[Path]:
    """Remove every log, checkpoint and summary of a previous run (:data:`RUN_FILES`); the
    removed paths. ``config.json`` is rewritten by the new run."""
    removed = []
    for name in RUN_FILES:
        p = Path(folder) / name
        if p.is_file():
            try:
                p.unlink()
            except OSError as e:
                raise UsageError(os_problem(p, e, "delete (--restart)")) from None
            removed.append(p)
    return removed


# ----------------------------------------------------------------------------- resume
def _same(a: Any, b: Any) -> bool:
    if isinstance(a, list | tuple) and isinstance(b, list | tuple):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    if isinstance(a, bool) != isinstance(b, bool):
        return False
    return a == b


def config_diff(
    saved: Mapping[str, Any],
    current: Mapping[str, Any],
    *,
    defaults: Mapping[str, Any] | None = None,
    inert: frozenset[str] = INERT,
) -> list[tuple[str, Any, Any]]:
    """``(field, saved value, current value)`` for every field of ``current`` outside
    ``inert`` whose value differs. A field ``saved`` lacks (an older run) is compared with
    its value in ``defaults`` (what the older version ran with), else skipped."""
    diff = []
    for name, new in current.items():
        if name in inert:
            continue
        if name in saved:
            old = saved[name]
        elif defaults is not None and name in defaults:
            old = defaults[name]
        else:
            continue
        if not _same(old, new):
            diff.append((name, old, new))
    return diff


def check_resume(
    folder: str | os.PathLike[str],
    saved: Mapping[str, Any],
    current: Mapping[str, Any],
    *,
    done: int,
    defaults: Mapping[str, Any] | None = None,
    inert: frozenset[str] = INERT,
) -> None:
    """:class:`UsageError` if ``current`` would not continue the run ``saved`` describes:
    a trajectory field outside ``inert`` changed (all are named with both values), or
    ``current["steps"]`` is below the ``done`` steps already run. Callers pass the values
    as they take effect (e.g. a default ``checkpoint`` resolved to its kind) and add to
    ``inert`` the fields the run's method does not read."""
    diff = config_diff(saved, current, defaults=defaults, inert=inert)
    if diff:
        shown = "; ".join(f"{k}: {old!r} -> {new!r}" for k, old, new in diff)
        raise UsageError(
            f"{folder} holds a run with another configuration ({shown}); resuming it would mix "
            "two trajectories: rerun with the run's values, or use --restart or another --out"
        )
    steps = current.get("steps")
    if isinstance(steps, int) and steps < done:
        raise UsageError(
            f"{folder} has already run {done} steps; steps {steps} would end it before that "
            f"(give steps >= {done}, or use --restart or another --out)"
        )


# ----------------------------------------------------------------------------- divergence
class Diverged(UsageError, FloatingPointError):
    """The loss became non-finite or kept exceeding a multiple of its initial value: the
    learning rates are too high for this run (bad input)."""


class DivergenceGuard:
    """Stop a run whose loss diverges.

    Step t's loss ``f_t`` diverges when it is not finite, or when ``f_t > factor · f_1``
    for ``patience`` consecutive steps (``f_1``: the first step's loss; ``factor = 0``
    turns the ratio rule off). :meth:`check` raises :class:`Diverged` with the step, the
    loss and the rates. Its counters go into the checkpoint (:meth:`state_dict`).
    """

    def __init__(self, factor: float = 10.0, patience: int = 3) -> None:
        if not (isinstance(factor, int | float) and math.isfinite(factor) and factor >= 0):
            raise UsageError(f"diverge_factor must be a finite number >= 0, got {factor!r}")
        if not isinstance(patience, int) or isinstance(patience, bool) or patience < 1:
            raise UsageError(f"diverge_patience must be a positive integer, got {patience!r}")
        self.factor, self.patience = float(factor), patience
        self.initial: float | None = None
        self.streak = 0

    def check(self, step: int, loss: float, rates: Mapping[str, float]) -> None:
        """Update the counters with step ``step``'s loss; :class:`Diverged` if it diverged."""
        shown = ", ".join(f"{k} {v:g}" for k, v in rates.items() if v is not None)
        if not math.isfinite(loss):
            raise Diverged(
                f"loss became {loss} at step {step} ({shown}); lower the learning rates "
                "(then rerun with --restart or another --out)"
            )
        if self.initial is None:
            self.initial = loss
        if self.factor and self.initial > 0 and loss > self.factor * self.initial:
            self.streak += 1
        else:
            self.streak = 0
        if self.streak >= self.patience:
            raise Diverged(
                f"loss {loss:.6g} at step {step} has exceeded {self.factor:g}x the initial loss "
                f"{self.initial:.6g} for {self.streak} consecutive steps ({shown}); lower the "
                "learning rates (then rerun with --restart or another --out)"
            )

    def state_dict(self) -> dict[str, Any]:
        return {"initial": self.initial, "streak": self.streak}

    def load_state_dict(self, state: Mapping[str, Any] | None) -> None:
        state = state or {}
        self.initial, self.streak = state.get("initial"), int(state.get("streak", 0))
