"""The run folder: ``config.json`` and append-only, flushed CSV logs.

``metrics.csv`` and ``smoothness.csv`` get one row at a time, flushed as written, so a killed
run keeps every row it logged. Reopening a log for a resumed run drops the rows past the
resume point (``truncate_after``), so no step appears twice.
"""

from __future__ import annotations

import csv
import json
import math
import platform
import sys
from collections.abc import Mapping, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

METRICS_FIELDS = ("step", "epoch", "loss", "proj_grad", "lr_base", "lr_peft", "eval_acc", "dev_acc", "seconds")
SMOOTHNESS_FIELDS = (
    "step", "epoch", "block", "norm", "hvp", "estimate", "stderr", "num_hvp", "grad_norm",
    "loss", "lr_base", "lr_peft", "probe_seconds", "train_seconds",
)


def versions() -> dict[str, str]:
    """Versions of Python and the packages a run depends on."""
    out = {"python": sys.version.split()[0], "platform": platform.platform()}
    for pkg in ("smoothlab", "torch", "transformers", "peft", "numpy"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def write_json(path: str | Path, data: Mapping[str, Any]) -> Path:
    """Write ``data`` as indented JSON (atomically: temp file, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=_jsonable) + "\n")
    tmp.replace(path)
    return path


def _jsonable(x: Any) -> Any:
    if isinstance(x, Path):
        return str(x)
    if hasattr(x, "as_dict"):
        return x.as_dict()
    return repr(x)


def _fmt(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return "" if math.isnan(v) else repr(v)
    return str(v)


class CsvLog:
    """Append rows to a CSV with a fixed header, flushing after each row."""

    def __init__(self, path: str | Path, fields: Sequence[str], *, truncate_after: int | None = None) -> None:
        self.path = Path(path)
        self.fields = tuple(fields)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists() and self.path.stat().st_size > 0:
            with self.path.open(newline="") as fh:
                rows = list(csv.DictReader(fh))
                header = rows and list(rows[0].keys())
            if header and tuple(header) != self.fields:
                raise ValueError(f"{self.path} has columns {header}, expected {list(self.fields)}")
            if truncate_after is not None:
                kept = [r for r in rows if r.get("step") in (None, "") or int(float(r["step"])) <= truncate_after]
                if len(kept) != len(rows):
                    self._rewrite(kept)
        else:
            self._rewrite([])
        self._fh = self.path.open("a", newline="")
        self._writer = csv.DictWriter(self._fh, fieldnames=self.fields)

    def _rewrite(self, rows: list[dict]) -> None:
        with self.path.open("w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=self.fields)
            w.writeheader()
            w.writerows(rows)

    def steps(self) -> set[int]:
        """Steps already logged."""
        with self.path.open(newline="") as fh:
            return {int(float(r["step"])) for r in csv.DictReader(fh) if r.get("step")}

    def write(self, row: Mapping[str, Any]) -> None:
        unknown = set(row) - set(self.fields)
        if unknown:
            raise ValueError(f"unknown columns {sorted(unknown)} for {self.path.name}; columns: {list(self.fields)}")
        self._writer.writerow({k: _fmt(row.get(k)) for k in self.fields})
        self._fh.flush()

    def close(self) -> None:
        self._fh.close()

    def __enter__(self) -> CsvLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
