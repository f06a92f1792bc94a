"""Reading run folders into pandas.

The run-folder format (files, columns, cell types) is defined once, in
:mod:`smoothlab.runlog` (torch-free); this module turns its :class:`~smoothlab.runlog.LogTable`
rows into DataFrames. Only ``config.json`` is mandatory: a run killed early may have no CSVs
yet, or CSVs with a header and no rows. Those load as empty frames with the canonical
columns, so downstream code never has to special-case them. Everything a file does wrong
(torn last line, non-numeric cells, an unexpected header, duplicate steps) ends up in
:attr:`Run.warnings` and is issued as a :class:`~smoothlab.runlog.RunLogWarning`.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import pandas as pd

from smoothlab.errors import UsageError
from smoothlab.runlog import (
    CALIBRATION,
    METRICS,
    SMOOTHNESS,
    LogSchema,
    RunLogWarning,
    read_log,
)

__all__ = [
    "CALIBRATION_COLUMNS",
    "METRICS_COLUMNS",
    "SMOOTHNESS_COLUMNS",
    "Run",
    "load_run",
    "load_runs",
    "runs_frame",
]

METRICS_COLUMNS: tuple[str, ...] = METRICS.fields
"""The columns of ``metrics.csv`` (:data:`smoothlab.runlog.METRICS`)."""
SMOOTHNESS_COLUMNS: tuple[str, ...] = SMOOTHNESS.fields
"""The columns of ``smoothness.csv`` (:data:`smoothlab.runlog.SMOOTHNESS`)."""
CALIBRATION_COLUMNS: tuple[str, ...] = CALIBRATION.fields
"""The columns of ``calibration.csv`` (:data:`smoothlab.runlog.CALIBRATION`)."""


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


def _read_csv(path: Path, schema: LogSchema) -> tuple[pd.DataFrame, list[str]]:
    """Read one run CSV into a frame with (at least) ``schema.fields``, and its problems.

    Cells typed ``str`` stay Python strings (``None`` when missing), ``step`` is int64, all
    other columns float64 (a missing cell and a written ``nan`` are both NaN here; the
    rows of :func:`smoothlab.runlog.read_log` keep them apart).
    """
    table = read_log(path, schema, warn=False)
    frame = pd.DataFrame.from_records(table.rows, columns=list(table.columns))
    for c in frame.columns:
        kind = schema.type_of(c) if c in schema.fields else None
        if kind is str:
            frame[c] = frame[c].astype(object)
        elif kind is int and c == "step":
            frame[c] = frame[c].astype("int64")
        else:
            frame[c] = pd.to_numeric(frame[c], errors="coerce").astype("float64")
    return frame.reset_index(drop=True), [f"{schema.file}: {p}" for p in table.problems]


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise UsageError(f"{path}: not valid JSON ({exc})") from exc


def load_run(path: str | Path) -> Run:
    """Load one run folder.

    Raises :class:`~smoothlab.errors.UsageError` (a ``ValueError``) when ``path`` is not a
    folder containing ``config.json``, when a JSON file is not a JSON object, or when a CSV
    header lacks a required column (the message lists the missing and the found columns).
    Lesser problems become :attr:`Run.warnings` and :class:`~smoothlab.runlog.RunLogWarning`.
    """
    root = Path(path)
    if not root.is_dir():
        raise UsageError(f"{root}: not a run folder (no such directory)")
    cfg_path = root / "config.json"
    if not cfg_path.is_file():
        present = sorted(p.name for p in root.iterdir())[:10]
        raise UsageError(f"{root}: not a run folder (no config.json; found {present or 'nothing'})")
    config = _read_object(cfg_path)
    notes = [f"no {f}" for f in (METRICS.file, SMOOTHNESS.file) if not (root / f).exists()]
    metrics, problems = _read_csv(root / METRICS.file, METRICS)
    notes += problems
    smoothness, problems = _read_csv(root / SMOOTHNESS.file, SMOOTHNESS)
    notes += problems
    advice = _read_object(root / "advice.json") if (root / "advice.json").is_file() else None
    calibration = None
    if (root / CALIBRATION.file).is_file():
        calibration, problems = _read_csv(root / CALIBRATION.file, CALIBRATION)
        notes += problems
    for note in notes:
        if not note.startswith("no "):
            warnings.warn(f"{root}: {note}", RunLogWarning, stacklevel=2)
    name = str(config.get("name") or root.resolve().name)
    return Run(
        path=root,
        name=name,
        config=config,
        metrics=metrics,
        smoothness=smoothness,
        advice=advice,
        calibration=calibration,
        warnings=notes,
    )


def _read_object(path: Path) -> dict[str, Any]:
    data = _read_json(path)
    if not isinstance(data, dict):
        raise UsageError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def load_runs(paths: str | Path | Iterable[str | Path]) -> list[Run]:
    """Load several run folders (a single path is accepted too), in the given order.

    Run names are made unique by suffixing ``#2``, ``#3``, ... so that they can key
    frames and legends.
    """
    if isinstance(paths, (str, Path)):
        paths = [paths]
    paths = list(paths)
    where = [Path(p).resolve() for p in paths]
    twice = sorted({str(p) for p in where if where.count(p) > 1})
    if twice:
        raise UsageError(f"the same run folder is given more than once: {', '.join(twice)}")
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
        raise UsageError(f"which={which!r}; expected 'metrics' or 'smoothness'")
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
