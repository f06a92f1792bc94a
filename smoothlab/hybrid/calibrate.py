"""Calibrating the advisor's constants with short pilot runs.

The advisor proposes (η_x, η_y) with c_x = c_y = 1 (:mod:`smoothlab.advisor`). Pilot runs at
multiples of the proposal pick the constants: first η_x × s for s in ``multipliers``, then
η_y × s at the best η_x — a coordinate search of 2m − 1 runs over the m multipliers (1, the
proposal itself, is always among them).

**What the η_x pilots measure.** 100-step hybrid pilots ranked by dev accuracy could not
tell η_x apart across five decades: the first-order adapter moves the loss by far more
than the ZO base does, and 100 dev examples resolve ~5 accuracy points. So the η_x pilots
(``x_pilots="zo"``, the default) train the zeroth-order block alone — method ``zo-ft``, η_y
= 0 — and are ranked by training loss, paired: every pilot sees the same minibatches (same
seed), so per-step differences to the proposal's pilot cancel the batch-to-batch noise.
:func:`select_paired` keeps the proposal unless a pilot's mean loss over the second half of
its steps is lower by more than ``z`` paired standard errors. ``x_pilots="method"`` restores
the old behaviour (the method itself, ranked on dev). The η_y pilots run the method.
Ranking of the η_y pilots (:func:`select`): dev accuracy; ties broken by the lower final
training loss, unless the losses agree within 1% — then the pilot closest to the proposal
wins. Diverged pilots rank last.
"""

from __future__ import annotations

import csv
import dataclasses
import math
from collections.abc import Callable, Sequence
from pathlib import Path

from smoothlab.advisor import Advice
from smoothlab.errors import UsageError
from smoothlab.methods import get_method
from smoothlab.runlog import final_loss, write_json

from .config import positive_floats, positive_int
from .train import TrainConfig, train

MULTIPLIERS = (0.125, 0.5, 1.0, 2.0, 8.0)
FIELDS = (
    "method",
    "scale_x",
    "scale_y",
    "lr_base",
    "lr_peft",
    "dev_acc",
    "eval_acc",
    "final_loss",
    "run",
)


def _pilot(
    base: TrainConfig,
    sx: float,
    sy: float,
    advice: Advice,
    steps: int,
    out: Path,
    progress: bool,
    method: str | None = None,
) -> dict:
    method = method or base.method
    name = f"pilot_{method}_x{sx:g}_y{sy:g}"
    lr_peft = 0.0 if method == "zo-ft" else advice.eta_y * sy
    cfg = dataclasses.replace(
        base,
        method=method,
        lr_base=advice.eta_x * sx,
        lr_peft=lr_peft,
        steps=steps,
        eval_every=steps,
        out=str(out / name),
        record_every=0,
        name=name,
    )
    row = {
        "method": method,
        "scale_x": sx,
        "scale_y": sy,
        "lr_base": cfg.lr_base,
        "lr_peft": cfg.lr_peft,
        "dev_acc": math.nan,
        "eval_acc": math.nan,
        "final_loss": math.nan,
        "run": name,
        "losses": [],
    }
    try:
        run = train(cfg, progress=progress, resume=False)  # a pilot folder is always fresh
    except FloatingPointError:  # Diverged: the pilot's row keeps nan
        return row
    with (run / "metrics.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    last = rows[-1]
    losses = [float(r["loss"]) for r in rows]
    row.update(
        dev_acc=float(last["dev_acc"]),
        eval_acc=float(last["eval_acc"]),
        final_loss=final_loss(losses),
        losses=losses,
    )
    return row


def select_paired(rows: Sequence[dict], *, scale: str = "scale_x", z: float = 2.0) -> dict:
    """The pilot with the lowest training loss, paired against the proposal's pilot (scale 1):
    d_t = loss_t(pilot) − loss_t(proposal) over the second half of the steps (same batches);
    a pilot beats the proposal only if mean(d) < −z·se(d). Diverged pilots (no finite losses
    to the end) rank last; if the proposal diverged, the smallest finite pilot is taken."""
    ref = next((r for r in rows if r[scale] == 1.0), None)
    ok = [r for r in rows if r.get("losses") and math.isfinite(r["final_loss"])]
    if ref is None or ref not in ok:
        return (
            min(ok, key=lambda r: r[scale])
            if ok
            else min(rows, key=lambda r: abs(math.log(r[scale])))
        )
    best, best_mean = ref, 0.0
    for r in ok:
        n = min(len(r["losses"]), len(ref["losses"]))
        d = [a - b for a, b in zip(r["losses"][n // 2 : n], ref["losses"][n // 2 : n])]
        if r is ref or len(d) < 2:
            continue
        mean = sum(d) / len(d)
        se = math.sqrt(sum((v - mean) ** 2 for v in d) / (len(d) - 1) / len(d))
        if mean < -z * se and mean < best_mean:
            best, best_mean = r, mean
    return best


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


def _check_calibrate_args(x_pilots: str, multipliers: Sequence[float], pilot_steps: int) -> None:
    """Validate :func:`calibrate`'s options."""
    if x_pilots not in ("zo", "method"):
        raise UsageError(f"x_pilots must be 'zo' or 'method', got {x_pilots!r}")
    positive_floats("multipliers", multipliers)  # the config's checks: finite, > 0, no bool
    positive_int("pilot_steps", pilot_steps)


def _scaled_advice(
    advice: Advice, best: dict, n_pilots: int, pilot_steps: int, x_pilots: str
) -> Advice:
    """``advice`` with η, c and their stderrs times the winning scales, its source noted."""
    return dataclasses.replace(
        advice,
        eta_x=advice.eta_x * best["scale_x"],
        eta_y=advice.eta_y * best["scale_y"],
        c_x=advice.c_x * best["scale_x"],
        c_y=advice.c_y * best["scale_y"],
        eta_x_stderr=advice.eta_x_stderr * best["scale_x"],
        eta_y_stderr=advice.eta_y_stderr * best["scale_y"],
        source=advice.source
        + f"; calibrated over {n_pilots} pilots of {pilot_steps} steps (eta_x: {x_pilots} pilots)",
    )


def calibrate(
    base: TrainConfig,
    advice: Advice,
    out_dir: str | Path,
    *,
    multipliers: Sequence[float] = MULTIPLIERS,
    pilot_steps: int = 100,
    progress: bool = True,
    on_row: Callable[[dict], None] | None = None,
    x_pilots: str = "zo",
) -> tuple[Advice, list[dict]]:
    """Run the pilots, write ``calibration.csv`` and ``advice.json`` to ``out_dir``, and
    return the calibrated advice (c_x, c_y scaled by the winners) with the pilot table.

    ``x_pilots``: ``"zo"`` (η_x pilots train the ZO block alone as ``zo-ft``, ranked by paired
    training loss) or ``"method"`` (the method itself, ranked on dev). Methods without a ZO
    block skip the η_x sweep; methods without a first-order block skip the η_y sweep."""
    _check_calibrate_args(x_pilots, multipliers, pilot_steps)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    log = (out / "calibration.csv").open("w", newline="")
    writer = csv.DictWriter(log, fieldnames=FIELDS)
    writer.writeheader()

    def run(sx: float, sy: float, method: str | None = None) -> dict:
        method = method or base.method
        for r in rows:
            if r["scale_x"] == sx and r["scale_y"] == sy and r["method"] == method:
                return r
        r = _pilot(base, sx, sy, advice, pilot_steps, out, progress, method)
        rows.append(r)
        writer.writerow({k: r[k] for k in FIELDS})
        log.flush()
        if on_row:
            on_row(r)
        return r

    try:
        scales = sorted(set(multipliers) | {1.0})  # the proposal itself is always a pilot
        m = get_method(base.method)
        best_x = 1.0
        if m.has_zo and math.isfinite(advice.eta_x):
            if x_pilots == "zo":
                best_x = select_paired([run(s, 1.0, "zo-ft") for s in scales])["scale_x"]
            else:
                best_x = select([run(s, 1.0) for s in scales], scale="scale_x")["scale_x"]
        best = {"scale_x": best_x, "scale_y": 1.0}
        if m.has_fo and math.isfinite(advice.eta_y):
            best = select([run(best_x, s) for s in scales], scale="scale_y")
    finally:
        log.close()
    calibrated = _scaled_advice(advice, best, len(rows), pilot_steps, x_pilots)
    write_json(out / "advice.json", calibrated.as_dict() | {"uncalibrated": advice.as_dict()})
    return calibrated, [{k: r[k] for k in FIELDS} for r in rows]
