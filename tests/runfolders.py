"""Synthetic run folders with known values, shared by the analysis and report tests."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from smoothlab.runlog import METRICS_FIELDS, SMOOTHNESS_FIELDS

BLOCK_SIZES = {"base": 22713344, "peft": 74498}


def write_run(
    root: Path,
    *,
    method: str = "hybrid-lora",
    name: str | None = None,
    metrics: pd.DataFrame | None | str = "default",
    smoothness: pd.DataFrame | None | str = "default",
    advice: dict | None = None,
    calibration: pd.DataFrame | None = None,
) -> Path:
    """Write a run folder. ``metrics``/``smoothness``: a frame, ``"header"`` (header only),
    ``None`` (no file) or ``"default"`` (the known values below)."""
    root.mkdir(parents=True, exist_ok=True)
    cfg = {
        "method": method,
        "model": "all-MiniLM-L6-v2",
        "task": "sst2",
        "seed": 0,
        "lr_base": 1e-6,
        "lr_peft": 1e-3,
        "steps": 100,
        "batch_size": 16,
        "block_sizes": BLOCK_SIZES,
        "versions": {"torch": "2.13.0"},
    }
    if name:
        cfg["name"] = name
    (root / "config.json").write_text(json.dumps(cfg))
    if isinstance(metrics, str) and metrics == "default":
        metrics = default_metrics()
    if isinstance(smoothness, str) and smoothness == "default":
        smoothness = default_smoothness()
    for fname, frame, cols in (
        ("metrics.csv", metrics, METRICS_FIELDS),
        ("smoothness.csv", smoothness, SMOOTHNESS_FIELDS),
    ):
        if isinstance(frame, str) and frame == "header":
            (root / fname).write_text(",".join(cols) + "\n")
        elif frame is not None:
            frame.to_csv(root / fname, index=False)
    if advice is not None:
        (root / "advice.json").write_text(json.dumps(advice))
    if calibration is not None:
        calibration.to_csv(root / "calibration.csv", index=False)
    return root


def default_metrics() -> pd.DataFrame:
    """20 logged rows, steps 0, 10, ..., 190; loss 20, 19, ..., 1; 0.5 s per step;
    eval accuracy 0.5 at step 20, 0.8 at step 50, 0.75 at step 80."""
    steps = np.arange(0, 200, 10)
    acc = pd.Series(np.nan, index=steps)
    acc[20], acc[50], acc[80] = 0.5, 0.8, 0.75
    return pd.DataFrame(
        {
            "step": steps,
            "epoch": steps / 100,
            "loss": np.arange(20, 0, -1, dtype=float),
            "proj_grad": 0.1,
            "lr_base": 1e-6,
            "lr_peft": 1e-3,
            "eval_acc": acc.to_numpy(),
            "dev_acc": acc.to_numpy(),
            "seconds": 0.5 * steps,
        }
    )


def default_smoothness() -> pd.DataFrame:
    """base: L = 10, 40, 90, 160 at steps 0..30 plus an extra probe L = 1000 at step 40;
    peft: L = 1, 2, 3, 4 at steps 0..30. grad_norm g and L follow L = 2 + 3 g for peft."""
    rows = []
    base = [10.0, 40.0, 90.0, 160.0, 1000.0]
    for i, L in enumerate(base):
        rows.append(("base", 10 * i, L, 0.1 * (i + 1), 5.0 + i))
    for i, L in enumerate([1.0, 2.0, 3.0, 4.0]):
        rows.append(("peft", 10 * i, L, 0.01 * (i + 1), (L - 2.0) / 3.0 + 1.0))
    df = pd.DataFrame(rows, columns=["block", "step", "estimate", "stderr", "grad_norm"])
    df["epoch"] = df["step"] / 100
    df["norm"] = "spectral"
    df["hvp"] = "fd"
    df["num_hvp"] = 20
    df["loss"] = 0.5
    df["lr_base"] = 1e-6
    df["lr_peft"] = 1e-3
    df["probe_seconds"] = 1.0
    df["train_seconds"] = df["step"] * 0.5
    return df[list(SMOOTHNESS_FIELDS)]
