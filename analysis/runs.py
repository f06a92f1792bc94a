"""Reading run folders into pandas.

A run folder is what training and recording write (see ``DESIGN.md``):

``config.json``
    the whole configuration: ``method``, ``model``, ``task``, ``seed``, ``lr_base``,
    ``lr_peft``, ``steps``, ``batch_size``, ``block_sizes`` (block name -> ``d_b``, the
    number of parameters of the block), ``versions`` and optionally ``name``.
``metrics.csv``
    one row per logged step: ``step, epoch, loss, proj_grad, lr_base, lr_peft, eval_acc,
    dev_acc, seconds`` (``seconds`` is cumulative training wall-clock, probes excluded).
``smoothness.csv``
    one row per probe and block: ``step, epoch, block, norm, hvp, estimate, stderr,
    num_hvp, grad_norm, loss, lr_base, lr_peft, probe_seconds, train_seconds``.
    ``estimate`` is the block's Hessian norm ``‖∇²_bb f‖`` (with ``norm == "spectral"`` the
    local smoothness ``L_b``).
``advice.json`` (optional)
    the learning-rate advisor's proposal ``η_x ∝ c_x / (L_x d_x)``, ``η_y ∝ c_y / L_y``.
``calibration.csv`` (optional)
    one row per calibration trial: ``scale_x, scale_y, lr_base, lr_peft, dev_acc,
    eval_acc, final_loss``.

Only ``config.json`` is mandatory: a run killed early may have no CSVs yet, or CSVs with a
header and no rows. Those load as empty frames with the canonical columns, so downstream
code never has to special-case them.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import pandas as pd

__all__ = [
    "CALIBRATION_COLUMNS",
    "METRICS_COLUMNS",
    "SMOOTHNESS_COLUMNS",
    "Run",
    "load_run",
    "load_runs",
    "runs_frame",
]

METRICS_COLUMNS: tuple[str, ...] = (
    "step",
    "epoch",
    "loss",
    "proj_grad",
    "lr_base",
    "lr_peft",
    "eval_acc",
    "dev_acc",
    "seconds",
)
"""The columns of ``metrics.csv``, in the order the engine writes them."""

METRICS_REQUIRED: tuple[str, ...] = ("step", "loss")
"""Columns without which ``metrics.csv`` is rejected; the others are filled with NaN."""

SMOOTHNESS_COLUMNS: tuple[str, ...] = (
    "step",
    "epoch",
    "block",
    "norm",
    "hvp",
    "estimate",
    "stderr",
    "num_hvp",
    "grad_norm",
    "loss",
    "lr_base",
    "lr_peft",
    "probe_seconds",
    "train_seconds",
)
"""The columns of ``smoothness.csv``, in the order the recorder writes them."""

SMOOTHNESS_REQUIRED: tuple[str, ...] = ("step", "block", "estimate")
"""Columns without which ``smoothness.csv`` is rejected; the others are filled."""

CALIBRATION_COLUMNS: tuple[str, ...] = (
    "scale_x",
    "scale_y",
    "lr_base",
    "lr_peft",
    "dev_acc",
    "eval_acc",
    "final_loss",
)
"""The columns of ``calibration.csv``."""

CALIBRATION_REQUIRED: tuple[str, ...] = ("lr_base", "lr_peft")

_TEXT_COLUMNS = frozenset({"block", "norm", "hvp"})


@dataclass
class Run:
    """One run folder, loaded.

    ``metrics`` and ``smoothness`` always carry at least the canonical columns
    (:data:`METRICS_COLUMNS`, :data:`SMOOTHNESS_COLUMNS`), possibly with zero rows;
    numeric columns are float64, ``step`` is int64 (rows without a step are dropped), text
    columns (``block``, ``norm``, ``hvp``) are Python strings. ``advice`` and ``calibration`` are ``None`` when the files are absent.
    """

    path: Path
    name: str
    config: dict[str, Any]
    metrics: pd.DataFrame
    smoothness: pd.DataFrame
    advice: dict[str, Any] | None = None
    calibration: pd.DataFrame | None = None
    warnings: list[str] = field(default_factory=list)

    @property
    def method(self) -> str:
        """``config["method"]``, or ``"?"`` when the config does not say."""
        return str(self.config.get("method") or "?")

    @property
    def model(self) -> str:
        """``config["model"]``, or ``"?"``."""
        return str(self.config.get("model") or "?")

    @property
    def task(self) -> str:
        """``config["task"]``, or ``"?"``."""
        return str(self.config.get("task") or "?")

    @property
    def block_sizes(self) -> dict[str, int]:
        """``config["block_sizes"]``: block name -> number of parameters ``d_b``."""
        sizes = self.config.get("block_sizes") or {}
        return {str(k): int(v) for k, v in sizes.items() if v is not None}

    def __repr__(self) -> str:  # DataFrames make the default repr unreadable
        return (
            f"Run(name={self.name!r}, method={self.method!r}, path={str(self.path)!r}, "
            f"metrics={len(self.metrics)} rows, smoothness={len(self.smoothness)} rows, "
            f"advice={'yes' if self.advice is not None else 'no'}, "
            f"calibration={'yes' if self.calibration is not None else 'no'})"
        )


def _read_csv(
    path: Path,
    columns: Sequence[str],
    required: Sequence[str],
) -> pd.DataFrame:
    """Read one run CSV into a frame with (at least) ``columns``.

    A missing or zero-byte file, or a header without rows, gives an empty frame with the
    canonical columns. A file lacking any of ``required`` raises ``ValueError``.
    """
    if not path.exists() or path.stat().st_size == 0:
        frame = pd.DataFrame({c: pd.Series(dtype="float64") for c in columns})
        return _coerce(frame)
    try:
        # A killed run can leave a torn last line; skip it rather than refuse the file.
        frame = pd.read_csv(path, on_bad_lines="skip", skipinitialspace=True)
    except pd.errors.EmptyDataError:
        frame = pd.DataFrame({c: pd.Series(dtype="float64") for c in columns})
        return _coerce(frame)
    frame.columns = [str(c).strip() for c in frame.columns]
    missing = [c for c in required if c not in frame.columns]
    if missing:
        raise ValueError(
            f"{path}: missing required column(s) {missing}; found {list(frame.columns)} "
            f"(expected at least {list(required)}, normally {list(columns)})"
        )
    for c in columns:
        if c not in frame.columns:
            frame[c] = float("nan")
    ordered = list(columns) + [c for c in frame.columns if c not in columns]
    return _coerce(frame[ordered])


def _coerce(frame: pd.DataFrame) -> pd.DataFrame:
    """Numeric columns to float64, ``step`` to int64 (dropping rows without one), text to str."""
    frame = frame.copy()
    for c in frame.columns:
        if c in _TEXT_COLUMNS:
            col = frame[c]
            frame[c] = col.where(col.isna(), col.astype(str)).astype(object)
            continue
        frame[c] = pd.to_numeric(frame[c], errors="coerce").astype("float64")
    if "step" in frame.columns:
        frame = frame[frame["step"].notna()] if len(frame) else frame
        frame["step"] = frame["step"].astype("int64")
    return frame.reset_index(drop=True)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from exc


def load_run(path: str | Path) -> Run:
    """Load one run folder.

    Raises ``ValueError`` when ``path`` is not a folder containing ``config.json``, when
    ``config.json`` is not a JSON object, or when a CSV lacks its required columns (the
    message lists the missing and the found columns).
    """
    root = Path(path)
    if not root.is_dir():
        raise ValueError(f"{root}: not a run folder (no such directory)")
    cfg_path = root / "config.json"
    if not cfg_path.is_file():
        present = sorted(p.name for p in root.iterdir())[:10]
        raise ValueError(f"{root}: not a run folder (no config.json; found {present or 'nothing'})")
    config = _read_json(cfg_path)
    if not isinstance(config, dict):
        raise ValueError(f"{cfg_path}: expected a JSON object, got {type(config).__name__}")

    metrics = _read_csv(root / "metrics.csv", METRICS_COLUMNS, METRICS_REQUIRED)
    smoothness = _read_csv(root / "smoothness.csv", SMOOTHNESS_COLUMNS, SMOOTHNESS_REQUIRED)

    advice = None
    if (root / "advice.json").is_file():
        advice = _read_json(root / "advice.json")
        if not isinstance(advice, dict):
            raise ValueError(
                f"{root / 'advice.json'}: expected a JSON object, got {type(advice).__name__}"
            )
    calibration = None
    if (root / "calibration.csv").is_file():
        calibration = _read_csv(root / "calibration.csv", CALIBRATION_COLUMNS, CALIBRATION_REQUIRED)

    warnings: list[str] = []
    if not (root / "metrics.csv").exists():
        warnings.append("no metrics.csv")
    if not (root / "smoothness.csv").exists():
        warnings.append("no smoothness.csv")

    name = str(config.get("name") or root.resolve().name)
    return Run(
        path=root,
        name=name,
        config=config,
        metrics=metrics,
        smoothness=smoothness,
        advice=advice,
        calibration=calibration,
        warnings=warnings,
    )


def load_runs(paths: str | Path | Iterable[str | Path]) -> list[Run]:
    """Load several run folders (a single path is accepted too), in the given order.

    Run names are made unique by suffixing ``#2``, ``#3``, ... so that they can key
    frames and legends.
    """
    if isinstance(paths, (str, Path)):
        paths = [paths]
    runs = [load_run(p) for p in paths]
    seen: dict[str, int] = {}
    for run in runs:
        k = seen.get(run.name, 0) + 1
        seen[run.name] = k
        if k > 1:
            run.name = f"{run.name}#{k}"
    return runs


def runs_frame(
    runs: Iterable[Run],
    which: Literal["metrics", "smoothness"] = "metrics",
) -> pd.DataFrame:
    """Concatenate one table of several runs, with ``run`` and ``method`` columns first."""
    if which not in ("metrics", "smoothness"):
        raise ValueError(f"which={which!r}; expected 'metrics' or 'smoothness'")
    canonical = METRICS_COLUMNS if which == "metrics" else SMOOTHNESS_COLUMNS
    frames = []
    for run in runs:
        df = getattr(run, which).copy()
        df.insert(0, "method", run.method)
        df.insert(0, "run", run.name)
        frames.append(df)
    if not frames:
        return pd.DataFrame(columns=["run", "method", *canonical])
    nonempty = [f for f in frames if len(f)]
    if not nonempty:
        return frames[0].iloc[0:0]
    return pd.concat(nonempty, ignore_index=True)
