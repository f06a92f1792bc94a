"""Trajectory recorder: probe chosen blocks every k steps while a model trains.

Per probe and block it logs (``smoothness.csv`` in the run folder, flushed row by row):
step, epoch, estimate, stderr, HVPs used, the block's gradient norm ‖∇_b f‖, the loss, both
learning rates, seconds spent probing and cumulative training seconds, so the probing cost is
visible against the training cost. Use it from any loop::

    rec = TrajectoryRecorder(blocks, every=50, out_dir="runs/x", model=model)
    for step in ...:
        ...train...
        rec.step(step, loss_fn, epoch=epoch, loss=loss, lr_peft=lr)

or through :class:`~smoothlab.integrations` (HF ``Trainer``) or the hybrid engine's
``train(..., recorder=...)``. A resumed recorder (``resume_step``) drops rows logged after the
checkpoint and never records a step twice; a step that a kill left half-recorded (some
blocks' rows only) is recorded again whole.
"""

from __future__ import annotations

import csv
import math
import time
import warnings
from collections.abc import Callable, Mapping
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn

from .blocks import check_blocks
from .errors import UsageError
from .estimate import Estimate
from .hvp import block_gradients
from .probe import check_loss_fn, check_model, check_options, check_seed, eval_mode, probe
from .runlog import SMOOTHNESS_FIELDS, CsvLog, parse_cell

LossFn = Callable[[], torch.Tensor]


def block_grad_norms(loss_fn: LossFn, blocks: Mapping[str, list[torch.Tensor]]) -> dict[str, float]:
    """‖∇_b f‖₂ for every block from one backward pass (frozen blocks included)."""
    grads, _ = block_gradients(loss_fn, blocks)
    return {k: float(torch.linalg.vector_norm(g, dtype=torch.float64)) for k, g in grads.items()}


class TrajectoryRecorder:
    """Probe ``blocks`` every ``every`` steps and log the estimates.

    Args:
        blocks: ``{name: [parameters]}`` to probe.
        every: probe when ``step % every == 0``.
        norm, hvp, num_vectors, h, tol: passed to :func:`smoothlab.probe`.
        seed: base seed (an integer); the probe at step t uses ``seed + t``.
        out_dir: run folder for ``smoothness.csv`` (None: keep rows in memory only).
        log: an open ``smoothness.csv`` to write to instead of ``out_dir``'s, shared by
            several recorders (e.g. whole blocks and per-module blocks probed at the same
            steps); its owner closes it (:meth:`close` leaves it open). Steps it already
            holds rows for of this recorder's blocks count as recorded.
        model: module owning the parameters (on-the-fly perturbation, dropout off).
        probe_loss_fn: a fixed held-aside batch's loss; None probes the current batch.
        resume_step: drop logged rows with step > resume_step, then append.
    """

    def __init__(
        self,
        blocks: Mapping[str, list[torch.Tensor]],
        *,
        every: int = 50,
        norm: str = "spectral",
        hvp: str = "fd",
        num_vectors: int = 10,
        seed: int = 0,
        h: float | None = None,
        tol: float = 1e-3,
        out_dir: str | Path | None = None,
        model: nn.Module | None = None,
        probe_loss_fn: LossFn | None = None,
        resume_step: int | None = None,
        log: CsvLog | None = None,
    ) -> None:
        check_blocks(blocks)
        # every argument now, not at the first probe `every` steps into training
        check_options(norm, hvp, num_vectors, tol=tol, h=h)
        seed = check_seed(seed)
        check_model(model)
        if probe_loss_fn is not None:
            check_loss_fn(probe_loss_fn, "probe_loss_fn")
        if log is not None and out_dir is not None:
            raise UsageError(
                f"give out_dir or log, not both (got out_dir={str(out_dir)!r} and a log)"
            )
        if log is not None and not isinstance(log, CsvLog):
            raise TypeError(f"log must be a smoothlab.runlog.CsvLog, got {type(log).__name__}")
        if not isinstance(every, int) or isinstance(every, bool) or every < 1:
            raise UsageError(f"every must be a positive integer, got {every!r}")
        self.blocks = dict(blocks)
        self.every = every
        self.kwargs = {"norm": norm, "hvp": hvp, "num_vectors": num_vectors, "h": h, "tol": tol}
        self.seed = seed
        self.model = model
        self.probe_loss_fn = probe_loss_fn
        self.rows: list[dict] = []
        self.probe_seconds = 0.0
        self._owns_log = out_dir is not None
        self.log = (
            CsvLog(Path(out_dir) / "smoothness.csv", SMOOTHNESS_FIELDS, truncate_after=resume_step)
            if out_dir is not None
            else log
        )
        if log is not None and tuple(log.fields) != tuple(SMOOTHNESS_FIELDS):
            raise UsageError(
                f"log {log.path} has columns {list(log.fields)}, expected {list(SMOOTHNESS_FIELDS)}"
            )
        self._done = self._recorded_steps()

    def _recorded_steps(self) -> set[int]:
        """Steps the log holds a row for of some block of this recorder (another recorder's
        rows in a shared log do not count). A kill between two rows of one step leaves
        that step half-recorded as the last one logged: its rows of this recorder's blocks
        are dropped (the other rows are kept, in order), so the step is recorded again
        whole, without duplicate rows. Earlier steps missing a block (the block set changed
        between runs) count as recorded: they are not revisited, and dropping them would
        lose their rows."""
        if self.log is None:
            return set()
        with self.log.path.open(newline="", encoding="utf-8") as fh:
            rows = list(csv.DictReader(fh))
        mine: dict[int, set[str]] = {}
        for r in rows:
            if r["block"] in self.blocks:
                mine.setdefault(parse_cell(r["step"], int), set()).add(r["block"])
        if mine and mine[last := max(mine)] != set(self.blocks):
            later = [r for r in rows if parse_cell(r["step"], int) >= last]
            self.log.drop_after(last - 1)
            for r in later:
                if not (parse_cell(r["step"], int) == last and r["block"] in self.blocks):
                    self.log.write(r)
            del mine[last]
        return set(mine)

    def due(self, step: int) -> bool:
        """Whether ``step`` is a recording step not yet recorded."""
        return step % self.every == 0 and step not in self._done

    def step(
        self, step: int, loss_fn: LossFn | None = None, **info: float
    ) -> dict[str, Estimate] | None:
        """Record at ``step`` if due (see :meth:`record`); otherwise do nothing."""
        if not self.due(step):
            return None
        return self.record(step, loss_fn, **info)

    def record(
        self,
        step: int,
        loss_fn: LossFn | None = None,
        *,
        epoch: float = 0,
        loss: float = math.nan,
        lr_base: float = math.nan,
        lr_peft: float = math.nan,
        train_seconds: float = math.nan,
    ) -> dict[str, Estimate]:
        """Probe every block now and log one row per block.

        A non-finite loss at the probed point (a diverging run) logs rows with nan estimates
        and warns (RuntimeWarning naming the step) instead of raising, so the training loop
        goes on and the rows logged so far stay.
        """
        fn = self.probe_loss_fn or loss_fn
        if fn is None:
            raise UsageError(
                "no loss to probe: pass loss_fn or construct the recorder with probe_loss_fn"
            )
        model = self.model if self.model is not None else getattr(fn, "model", None)
        start = time.perf_counter()
        ests = self._probe(step, fn, model)
        norms = {k: e.grad_norm for k, e in ests.items()}  # free with fd / exact oracles
        missing = {k: self.blocks[k] for k, v in norms.items() if not math.isfinite(v)}
        with eval_mode(model):
            if missing and all(math.isfinite(e.value) for e in ests.values()):
                norms.update(block_grad_norms(fn, missing))
            if math.isnan(loss):
                with torch.no_grad():
                    loss = float(fn())
        seconds = time.perf_counter() - start
        self.probe_seconds += seconds
        shared = {"step": step, "epoch": epoch, "loss": loss, "lr_base": lr_base}
        shared.update(lr_peft=lr_peft, probe_seconds=seconds, train_seconds=train_seconds)
        for name, est in ests.items():
            row = {
                **shared,
                "block": name,
                "norm": est.norm,
                "hvp": est.hvp,
                "estimate": est.value,
                "stderr": est.stderr,
                "num_hvp": est.num_hvp,
                "grad_norm": norms[name],
            }
            self.rows.append(row)
            if self.log:
                self.log.write(row)
        self._done.add(step)
        return ests

    def _probe(self, step: int, fn: LossFn, model: nn.Module | None) -> dict[str, Estimate]:
        """:func:`probe` at ``step``; nan estimates (and a RuntimeWarning) when the loss at
        the probed point is nan or inf, which the probe refuses."""
        try:
            return probe(fn, self.blocks, seed=self.seed + step, model=model, **self.kwargs)
        except UsageError:
            with eval_mode(model), torch.no_grad():
                value = float(fn())
            if math.isfinite(value):
                raise
        warnings.warn(
            f"smoothness recorder: the loss is {value} at step {step}; logged nan estimates "
            "for this step",
            RuntimeWarning,
            stacklevel=3,
        )
        norm, hvp = self.kwargs["norm"], self.kwargs["hvp"]
        nan = Estimate(math.nan, norm=norm, hvp=hvp, converged=False)
        return {k: replace(nan, dim=sum(p.numel() for p in v)) for k, v in self.blocks.items()}

    def rewind(self, step: int) -> None:
        """Forget the probes after ``step``, in memory and in the log, so that a loop
        resumed from the checkpoint at ``step`` records them again (what ``resume_step=``
        does at construction)."""
        if not isinstance(step, int) or isinstance(step, bool):
            raise UsageError(f"step must be an integer, got {step!r}")
        self.rows = [r for r in self.rows if r["step"] <= step]
        if self.log:
            self.log.drop_after(step)
        self._done = {s for s in self._done if s <= step}

    def close(self) -> None:
        """Close ``smoothness.csv`` if this recorder opened it (a shared ``log=`` stays open)."""
        if self.log and self._owns_log:
            self.log.close()
