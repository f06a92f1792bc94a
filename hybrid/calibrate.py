"""Calibrating the advisor's constants with short pilot runs.

The advisor proposes η_x = c_x·q/(L_x(d_x+1+q)), η_y = c_y/L_y with c = 1. The constants
hidden in "∝" are problem-dependent, so pilot runs of the hybrid engine at multiples of the
proposal pick them on the dev split: first η_x × s for s in ``multipliers`` (η_y at the
proposal), then η_y × s at the best η_x — a coordinate search of 2m − 1 runs over the m
multipliers (1, the proposal itself, is always among them).
Ranking (:func:`select`): dev accuracy; ties broken by the lower final training loss, unless
the losses agree within 1% — then the pilot closest to the proposal wins, so a rate that
changes nothing measurable is not "calibrated" away from theory. Diverged pilots rank last.
"""

from __future__ import annotations

import csv
import dataclasses
import math
from collections.abc import Callable, Sequence
from pathlib import Path

from smoothlab.advisor import Advice
from smoothlab.runlog import write_json

from .train import TrainConfig, train

MULTIPLIERS = (0.125, 0.5, 1.0, 2.0, 8.0)
FIELDS = ("scale_x", "scale_y", "lr_base", "lr_peft", "dev_acc", "eval_acc", "final_loss", "run")


def _pilot(base: TrainConfig, sx: float, sy: float, advice: Advice, steps: int, out: Path, progress: bool) -> dict:
    name = f"pilot_x{sx:g}_y{sy:g}"
    cfg = dataclasses.replace(
        base, lr_base=advice.eta_x * sx, lr_peft=advice.eta_y * sy, steps=steps,
        eval_every=steps, out=str(out / name), record_every=0, name=name,
    )
    row = {"scale_x": sx, "scale_y": sy, "lr_base": cfg.lr_base, "lr_peft": cfg.lr_peft,
           "dev_acc": math.nan, "eval_acc": math.nan, "final_loss": math.nan, "run": name}
    try:
        run = train(cfg, progress=progress)
    except FloatingPointError:
        return row
    with (run / "metrics.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    last = rows[-1]
    tail = [float(r["loss"]) for r in rows[-max(1, len(rows) // 10):]]
    row.update(dev_acc=float(last["dev_acc"]), eval_acc=float(last["eval_acc"]), final_loss=sum(tail) / len(tail))
    return row


def select(rows: Sequence[dict], *, scale: str, loss_rtol: float = 0.01) -> dict:
    """The best pilot: highest dev accuracy; among those, the lowest final loss — unless the
    losses agree within ``loss_rtol`` (pilots indistinguishable within their noise), in which
    case the one closest to the proposal (|log scale| smallest). Diverged pilots rank last."""
    ok = [r for r in rows if math.isfinite(r["dev_acc"]) and math.isfinite(r["final_loss"])]
    if not ok:
        return min(rows, key=lambda r: abs(math.log(r[scale])))
    top = max(r["dev_acc"] for r in ok)
    tied = [r for r in ok if r["dev_acc"] == top]
    lo = min(r["final_loss"] for r in tied)
    near = [r for r in tied if r["final_loss"] <= lo + loss_rtol * abs(lo)]
    return min(near, key=lambda r: (abs(math.log(r[scale])), r["final_loss"]))


def calibrate(
    base: TrainConfig,
    advice: Advice,
    out_dir: str | Path,
    *,
    multipliers: Sequence[float] = MULTIPLIERS,
    pilot_steps: int = 100,
    progress: bool = True,
    on_row: Callable[[dict], None] | None = None,
) -> tuple[Advice, list[dict]]:
    """Run the pilots, write ``calibration.csv`` and ``advice.json`` to ``out_dir``, and
    return the calibrated advice (c_x, c_y scaled by the winners) with the pilot table."""
    if not multipliers or any(not (m > 0) for m in multipliers):
        raise ValueError(f"multipliers must be positive numbers, got {list(multipliers)!r}")
    if pilot_steps < 1:
        raise ValueError(f"pilot_steps must be >= 1, got {pilot_steps!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    log = (out / "calibration.csv").open("w", newline="")
    writer = csv.DictWriter(log, fieldnames=FIELDS)
    writer.writeheader()

    def run(sx: float, sy: float) -> dict:
        for r in rows:
            if r["scale_x"] == sx and r["scale_y"] == sy:
                return r
        r = _pilot(base, sx, sy, advice, pilot_steps, out, progress)
        rows.append(r)
        writer.writerow(r)
        log.flush()
        if on_row:
            on_row(r)
        return r

    try:
        scales = sorted(set(multipliers) | {1.0})  # the proposal itself is always a pilot
        best_x = select([run(s, 1.0) for s in scales], scale="scale_x")["scale_x"]
        best = select([run(best_x, s) for s in scales], scale="scale_y")
    finally:
        log.close()
    calibrated = dataclasses.replace(
        advice, eta_x=advice.eta_x * best["scale_x"], eta_y=advice.eta_y * best["scale_y"],
        c_x=advice.c_x * best["scale_x"], c_y=advice.c_y * best["scale_y"],
        eta_x_stderr=advice.eta_x_stderr * best["scale_x"], eta_y_stderr=advice.eta_y_stderr * best["scale_y"],
        source=advice.source + f"; calibrated on dev over {len(rows)} pilots of {pilot_steps} steps",
    )
    write_json(out / "advice.json", calibrated.as_dict() | {"uncalibrated": advice.as_dict()})
    return calibrated, rows
