"""The run folder: its one schema, ``config.json``, and append-only, flushed CSV logs.

This module is the single definition of the run-folder format; the writers (training,
recorder, calibration) and the readers in ``analysis`` all import it. It uses only the
standard library (no torch, no pandas).

Files of a run folder:

``config.json``
    the whole configuration (``method``, ``model``, ``task``, ``seed``, ``lr_base``,
    ``lr_peft``, ``steps``, ``batch_size``, ``block_sizes`` = block -> ``d_b``, ``versions``).
``metrics.csv`` (:data:`METRICS`)
    one row per logged step; ``seconds`` is cumulative training wall-clock, probes excluded.
``smoothness.csv`` (:data:`SMOOTHNESS`)
    one row per probe and block; ``estimate`` is ``‖∇²_bb f‖`` (``norm == "spectral"``: the
    local smoothness ``L_b``).
``calibration.csv`` (:data:`CALIBRATION`), ``advice.json``
    the advisor's calibration trials and proposal (optional).

Cells: integers and floats as text (``repr``), a NaN as ``nan``, infinities as ``inf`` /
``-inf``, a missing value as the empty cell, so a NaN and a missing value differ.
Rows are written one at a time, each by one unbuffered write (a failed one is removed
again), and a row's key (:attr:`LogSchema.key`) is written once. A kill mid-write leaves a
*torn* last line (no final newline, or the wrong number of fields); :class:`CsvLog` (on
resume) and :func:`read_log` both detect and drop it.
"""

from __future__ import annotations

import contextlib
import csv
import errno
import io
import json
import math
import os
import platform
import sys
import warnings
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from .errors import UsageError

__all__ = [
    "CALIBRATION",
    "CALIBRATION_FIELDS",
    "METRICS",
    "METRICS_FIELDS",
    "SMOOTHNESS",
    "SMOOTHNESS_FIELDS",
    "CsvLog",
    "LogSchema",
    "LogTable",
    "RunLogWarning",
    "final_loss",
    "format_cell",
    "os_problem",
    "parse_cell",
    "read_log",
    "versions",
    "write_json",
]


class RunLogWarning(UserWarning):
    """A run-folder file was readable but not as written by the schema (torn line, bad
    cells, an unexpected header, duplicate rows)."""


@dataclass(frozen=True)
class LogSchema:
    """One CSV file of the run folder.

    ``fields``: the columns, in the order the writer writes them. ``types``: the type of
    each column's cells (``int``, ``float`` or ``str``; unlisted columns are ``float``).
    ``required``: columns without which a reader cannot use the file. ``key``: columns that
    identify a row; two rows with the same key mean two writers (or a botched resume).
    """

    file: str
    fields: tuple[str, ...]
    required: tuple[str, ...]
    types: Mapping[str, type] = field(default_factory=dict)
    key: tuple[str, ...] = ()

    def type_of(self, column: str) -> type:
        """The cell type of ``column`` (``float`` unless declared)."""
        return self.types.get(column, float)


METRICS = LogSchema(
    file="metrics.csv",
    fields=(
        "step",
        "epoch",
        "loss",
        "proj_grad",
        "lr_base",
        "lr_peft",
        "eval_acc",
        "dev_acc",
        "seconds",
    ),
    required=("step", "loss"),
    types={"step": int},
    key=("step",),
)
SMOOTHNESS = LogSchema(
    file="smoothness.csv",
    fields=(
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
    ),
    required=("step", "block", "estimate"),
    types={"step": int, "num_hvp": int, "block": str, "norm": str, "hvp": str},
    key=("step", "block", "norm", "hvp"),
)
CALIBRATION = LogSchema(
    file="calibration.csv",
    fields=("scale_x", "scale_y", "lr_base", "lr_peft", "dev_acc", "eval_acc", "final_loss", "run"),
    required=("lr_base", "lr_peft"),
    types={"run": str},
)
METRICS_FIELDS = METRICS.fields
SMOOTHNESS_FIELDS = SMOOTHNESS.fields
CALIBRATION_FIELDS = CALIBRATION.fields


def final_loss(losses: Iterable[float | None]) -> float:
    """The final loss of a run: the mean of the last ``k = ⌈n/10⌉`` logged losses.

    ``losses``: one value per logged row, in step order; ``None`` (a missing cell) is
    skipped, so ``n`` counts the rows that carry a loss. A NaN or an infinity among the last
    ``k`` is kept and propagates (the result is then NaN or ±inf), so a run that diverged
    near its end never reports its pre-divergence loss. NaN when ``n == 0``.
    """
    vals = [float(v) for v in losses if v is not None]
    if not vals:
        return math.nan
    k = math.ceil(len(vals) / 10)
    return sum(vals[-k:]) / k


def versions() -> dict[str, str]:
    """Versions of Python and the packages a run depends on."""
    out = {"python": sys.version.split()[0], "platform": platform.platform()}
    for pkg in ("smoothlab", "torch", "transformers", "peft", "numpy"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def write_json(path: str | Path, data: Mapping[str, Any], *, strict: bool = False) -> Path:
    """Write ``data`` as indented JSON (atomically: temp file, then rename). ``strict``:
    a NaN or infinite float is written as ``null``, so that any JSON parser reads the file
    (Python's own reads ``NaN``; strict ones, ``jq`` and browsers, do not). A failed write
    (disk full, read-only folder) leaves the previous file and is a ``UsageError``."""
    path = Path(path)
    tmp = path.with_suffix(path.suffix + ".tmp")
    if strict:
        data = _finite_or_null(data)
    text = json.dumps(data, indent=2, default=_jsonable, allow_nan=not strict) + "\n"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(text)
        tmp.replace(path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise UsageError(os_problem(path, exc, "write")) from None
    return path


def _finite_or_null(x: Any) -> Any:
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, Mapping):
        return {k: _finite_or_null(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_finite_or_null(v) for v in x]
    return x


def _jsonable(x: Any) -> Any:
    if isinstance(x, Path):
        return str(x)
    if hasattr(x, "as_dict"):
        return x.as_dict()
    return repr(x)


# ----------------------------------------------------------------------------- cells


def format_cell(v: Any) -> str:
    """One cell as text: ``None`` -> ``""``, NaN -> ``"nan"``, ±inf -> ``"inf"``/``"-inf"``,
    other floats by ``repr`` (round-trips exactly), a one-element tensor or a numpy scalar
    (a tensor learning rate) by its Python number, anything else by ``str``."""
    if v is None:
        return ""
    if not isinstance(v, str | int | float) and callable(getattr(v, "item", None)):
        try:
            v = v.item()  # torch.tensor(0.25), np.float32(0.25)
        except (ValueError, RuntimeError):
            pass  # several elements: written as text, read back as missing
    if isinstance(v, bool):
        return str(int(v))
    if isinstance(v, float):
        return "nan" if math.isnan(v) else repr(v)
    return str(v)


def parse_cell(text: str, kind: type = float) -> Any:
    """Parse one cell written by :func:`format_cell` as ``kind`` (``int``/``float``/``str``).

    ``""`` gives ``None`` (missing); ``"nan"`` gives ``float('nan')`` for ``float`` columns.
    An ``int`` cell must hold an integral finite number (``"10"`` or ``"10.0"``). Raises
    ``ValueError`` for a cell that is not of the type.
    """
    s = text.strip()
    if s == "":
        return None
    if kind is str:
        return s
    v = float(s)  # ValueError for non-numeric text
    if kind is int:
        if not (math.isfinite(v) and v.is_integer()):
            raise ValueError(f"{s!r} is not an integer")
        return int(v)
    return v


# ----------------------------------------------------------------------------- scanning


@dataclass
class _Scan:
    header: tuple[str, ...]
    rows: list[tuple[int, list[str]]]  # (line number, cells)
    torn: str | None  # why the last line was dropped
    bad: list[tuple[int, int]]  # (line number, number of fields) of malformed middle rows


def _scan(path: Path) -> _Scan:
    """Split a CSV file into header and rows, setting aside a torn last line.

    A last line is torn when the file does not end in a newline or when it has a different
    number of fields from the header. Other rows of the wrong width are listed in ``bad``.
    The torn tail is cut as bytes, before decoding, so a write cut inside a multi-byte
    character is a torn line too, not a file in another encoding.
    """
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise UsageError(os_problem(path, exc, "read")) from None
    torn = None
    if data and not data.endswith(b"\n"):
        cut = data.rfind(b"\n") + 1
        tail = data[cut:].decode("utf-8", "replace")
        torn = f"the last line has no newline (a write cut short): {tail[:60]!r}"
        data = data[:cut]
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise UsageError(
            f"{path}: not UTF-8 text (byte 0x{data[exc.start]:02x} on line {line}: "
            f"{exc.reason}); the file is damaged: repair or delete that line, or start over "
            "with --restart (which deletes the run's logs)"
        ) from None
    lines = list(csv.reader(io.StringIO(text, newline="")))
    numbered = [(i + 1, r) for i, r in enumerate(lines) if r]  # csv line i+1; blank lines skipped
    if not numbered:
        return _Scan((), [], torn, [])
    header = tuple(c.strip() for c in numbered[0][1])
    rows = numbered[1:]
    width = len(header)
    if torn is None and rows and len(rows[-1][1]) != width:
        torn = f"the last line has {len(rows[-1][1])} fields, expected {width}"
        rows = rows[:-1]
    bad = [(n, len(r)) for n, r in rows if len(r) != width]
    rows = [(n, r) for n, r in rows if len(r) == width]
    return _Scan(header, rows, torn, bad)


# ----------------------------------------------------------------------------- writer


class CsvLog:
    """Append rows to a CSV with a fixed header, each row written whole or not at all.

    An existing non-empty file must have exactly ``fields`` as its header (``UsageError``
    otherwise, also for a header-only file). A torn last line is dropped (with a
    :class:`RunLogWarning`); so are rows with ``step > truncate_after`` when resuming. A
    malformed row before the last line, or a row without an integer step, is refused.

    ``key``: the columns that identify a row (default: the key of the schema whose fields
    are ``fields``, e.g. ``step`` for ``metrics.csv`` and ``step, block, norm, hvp`` for
    ``smoothness.csv``; else ``step`` if it is a column; ``()``: rows may repeat). A row
    whose key the log already holds is refused (``UsageError`` naming the file and the key,
    nothing written): readers would see two rows for one step. So is a file that already
    holds such rows, and a row without an integer ``step`` (a file that holds one cannot
    be resumed). A row that cannot be written (disk full, read-only folder) is removed
    again and reported as a ``UsageError``.
    """

    def __init__(
        self,
        path: str | Path,
        fields: Sequence[str],
        *,
        truncate_after: int | None = None,
        key: Sequence[str] | None = None,
    ) -> None:
        if truncate_after is not None and (
            not isinstance(truncate_after, int) or isinstance(truncate_after, bool)
        ):
            raise UsageError(
                f"truncate_after must be an integer step or None, got {truncate_after!r}"
            )
        self.path = Path(path)
        self.fields = tuple(fields)
        self.key = _default_key(self.fields) if key is None else tuple(key)
        unknown = [k for k in self.key if k not in self.fields]
        if unknown:
            raise UsageError(f"key columns {unknown} are not among {list(self.fields)}")
        self._steps: set[int] = set()
        self._keys: dict[tuple[Any, ...], int] = {}  # key -> line number (1 = header)
        self._lines = 1
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if self.path.is_dir():
                raise UsageError(
                    f"{self.path} is a folder, not a log file: move it away, or use another "
                    "run folder"
                )
            if self.path.exists() and self.path.stat().st_size > 0:
                self._reopen(truncate_after)
            else:
                self._rewrite([])
            self._open()
        except OSError as exc:
            raise UsageError(os_problem(self.path, exc, "open")) from None

    def _open(self) -> None:
        # unbuffered: a row is one write, never held back in a buffer that a later flush
        # (at close, after a failed write) would append out of place
        self._fh = self.path.open("ab", buffering=0)

    def _reopen(self, truncate_after: int | None) -> None:
        scan = _scan(self.path)
        if not scan.header:  # only a torn header: nothing was logged yet
            self._rewrite([])
            return
        if scan.header != self.fields:
            raise UsageError(
                f"{self.path} has columns {list(scan.header)}, expected {list(self.fields)}; "
                "it belongs to another program or version: move it away or use a new run folder"
            )
        if scan.bad:
            n, k = scan.bad[0]
            raise UsageError(
                f"{self.path}: line {n} has {k} fields, expected {len(self.fields)} "
                f"({len(scan.bad)} such rows): the file is corrupt"
            )
        kept = []
        for n, cells in scan.rows:
            step = self._step_of(cells, n)
            if truncate_after is None or step is None or step <= truncate_after:
                kept.append(cells)
                self._remember(self._key_of_cells(cells), step, n)
        if scan.torn:
            warnings.warn(f"{self.path}: {scan.torn}; dropped", RunLogWarning, stacklevel=3)
        if scan.torn or len(kept) != len(scan.rows):
            self._rewrite(kept)
        self._lines = 1 + len(kept)

    def _step_of(self, cells: list[str], line: int) -> int | None:
        if "step" not in self.fields:
            return None
        text = cells[self.fields.index("step")]
        try:
            step = parse_cell(text, int)
        except ValueError:
            step = None
        if step is None:
            raise UsageError(f"{self.path}: line {line} has step {text!r}, expected an integer")
        return step

    def _key_of_cells(self, cells: list[str]) -> tuple[Any, ...]:
        return tuple(
            parse_cell(cells[i], int) if k == "step" else cells[i].strip()
            for k in self.key
            for i in (self.fields.index(k),)
        )

    def _shown(self, key: tuple[Any, ...]) -> str:
        return ", ".join(f"{c}={v!r}" for c, v in zip(self.key, key))

    def _remember(self, key: tuple[Any, ...], step: int | None, line: int) -> None:
        if self.key and key in self._keys:
            raise UsageError(
                f"{self.path}: lines {self._keys[key]} and {line} both hold the row of "
                f"{self._shown(key)} (two writers into one run folder?); delete one of them, "
                "or start over with --restart (which deletes the run's logs)"
            )
        self._keys[key] = line
        if step is not None:
            self._steps.add(step)

    def _rewrite(self, rows: list[list[str]]) -> None:
        tmp = self.path.with_suffix(self.path.suffix + ".tmp")
        with tmp.open("w", newline="", encoding="utf-8") as fh:
            w = csv.writer(fh, lineterminator="\n")
            w.writerow(self.fields)
            w.writerows(rows)
            fh.flush()
            os.fsync(fh.fileno())
        tmp.replace(self.path)

    def drop_after(self, step: int) -> None:
        """Drop the logged rows with a step after ``step`` (a run resumed from an earlier
        checkpoint: those rows belong to the trajectory it abandons), then append again."""
        self._fh.close()
        self._steps.clear()
        self._keys.clear()
        try:
            self._reopen(step)
            self._open()
        except OSError as exc:
            raise UsageError(os_problem(self.path, exc, "rewrite")) from None

    def steps(self) -> set[int]:
        """Steps already logged (after truncation)."""
        return set(self._steps)

    def write(self, row: Mapping[str, Any]) -> None:
        """Append one row (missing columns are empty cells): written whole, or, when the
        write fails, removed again and reported (``UsageError``)."""
        unknown = set(row) - set(self.fields)
        if unknown:
            raise ValueError(
                f"unknown columns {sorted(unknown)} for {self.path.name}; columns: {list(self.fields)}"
            )
        cells = [format_cell(row.get(k)) for k in self.fields]
        step = None
        if "step" in self.fields:
            try:
                step = parse_cell(cells[self.fields.index("step")], int)
            except ValueError:
                step = None
            if step is None:
                raise UsageError(
                    f"{self.path}: a row needs an integer step, got {row.get('step')!r}"
                )
        key = self._key_of_cells(cells)
        if self.key and key in self._keys:
            raise UsageError(
                f"{self.path} already holds the row of {self._shown(key)} (line "
                f"{self._keys[key]}); a row is logged once: not written again"
            )
        buf = io.StringIO()
        csv.writer(buf, lineterminator="\n").writerow(cells)
        data = memoryview(buf.getvalue().encode("utf-8"))
        try:
            if self._fh.closed:  # closed by an earlier end of training: append from here on
                self._open()
            fd = self._fh.fileno()
            size = os.fstat(fd).st_size
            try:
                while data:
                    data = data[os.write(fd, data) :]
            except BaseException:
                os.ftruncate(fd, size)  # no torn row left behind
                raise
        except OSError as exc:
            what = "write" if step is None else f"write the row of step {step} to"
            raise UsageError(os_problem(self.path, exc, what, kept="nothing of the row")) from None
        self._lines += 1
        self._remember(key, step, self._lines)

    def close(self) -> None:
        self._fh.close()

    def __enter__(self) -> CsvLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _default_key(fields: tuple[str, ...]) -> tuple[str, ...]:
    for schema in (METRICS, SMOOTHNESS, CALIBRATION):
        if fields == schema.fields:
            return schema.key
    return ("step",) if "step" in fields else ()


def os_problem(path: str | Path, exc: OSError, doing: str, *, kept: str | None = None) -> str:
    """One line for an ``OSError`` met while ``doing`` (``"read"``, ``"write"``, …) ``path``:
    the system's reason and what the user can do about it."""
    reason = exc.strerror or type(exc).__name__
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        advice = "free some space, then rerun the same command to resume"
    elif exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        advice = "make the run folder writable (or use another --out), then rerun"
    elif exc.errno in (errno.EISDIR, errno.ENOTDIR):
        advice = "a folder stands where a file should (or the reverse): move it away, then rerun"
    else:
        advice = "fix the cause, then rerun the same command to resume"
    done = f" ({kept} was kept)" if kept else ""
    return f"cannot {doing} {path}: {reason}{done}; {advice}"


# ----------------------------------------------------------------------------- reader


@dataclass
class LogTable:
    """A run CSV as read by :func:`read_log`.

    ``columns``: the schema's fields, then any extra columns of the file. ``rows``: one dict
    per kept row, cells parsed by :meth:`LogSchema.type_of` (``None`` = missing cell, NaN =
    a written ``nan``; extra columns are floats when numeric, else text). ``problems``: what
    did not match the schema, one sentence each (empty for a clean file).
    """

    path: Path
    columns: tuple[str, ...]
    rows: list[dict[str, Any]]
    problems: list[str] = field(default_factory=list)


def read_log(path: str | Path, schema: LogSchema, *, warn: bool = True) -> LogTable:
    """Read one run CSV leniently, listing every deviation from ``schema``.

    A missing or empty file gives no rows. Dropped and reported: a torn last line, rows of the
    wrong width, rows whose ``int`` key cell (``step``) is missing or not an integer.
    Reported and read as missing: cells that do not parse as their column's type. Reported
    only: a header that differs from ``schema.fields`` and rows repeating a ``schema.key``.
    ``UsageError`` when the header lacks a ``schema.required`` column or repeats a column.
    With ``warn``, each problem is also issued as a :class:`RunLogWarning`.
    """
    path = Path(path)
    if not path.exists() or path.stat().st_size == 0:
        return LogTable(path, schema.fields, [])
    scan = _scan(path)
    problems = [f"{scan.torn}; dropped"] if scan.torn else []
    _check_header(path, scan.header, schema, problems)
    if scan.bad:
        lines = ", ".join(str(n) for n, _ in scan.bad[:5])
        problems.append(
            f"{len(scan.bad)} row(s) with a wrong number of fields dropped (line {lines})"
        )
    rows = _parse_rows(scan, schema, problems)
    _check_duplicates(rows, schema, problems)
    columns = schema.fields + tuple(c for c in scan.header if c not in schema.fields)
    if warn:
        for p in problems:
            warnings.warn(f"{path}: {p}", RunLogWarning, stacklevel=2)
    return LogTable(path, columns, rows, problems)


def _check_header(
    path: Path, header: tuple[str, ...], schema: LogSchema, problems: list[str]
) -> None:
    repeated = sorted(c for c, k in Counter(header).items() if k > 1)
    missing = [c for c in schema.required if c not in header]
    if repeated or missing:
        what = (
            f"repeats column(s) {repeated}" if repeated else f"lacks required column(s) {missing}"
        )
        raise UsageError(
            f"{path}: the header {what}; found {list(header)} "
            f"(expected at least {list(schema.required)}, normally {list(schema.fields)})"
        )
    if header != schema.fields:
        absent = [c for c in schema.fields if c not in header]
        extra = [c for c in header if c not in schema.fields]
        order = "" if absent or extra else "; same columns in another order"
        problems.append(
            f"the header differs from the {schema.file} schema: missing {absent}, "
            f"unexpected {extra}{order}"
        )


def _parse_rows(scan: _Scan, schema: LogSchema, problems: list[str]) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    bad_cells: dict[str, list[tuple[int, str]]] = {}
    no_key: list[int] = []
    for line, cells in scan.rows:
        row: dict[str, Any] = dict.fromkeys(schema.fields)
        for col, text in zip(scan.header, cells):
            kind = schema.type_of(col) if col in schema.fields else None
            try:
                row[col] = parse_cell(text, kind or float)
            except ValueError:
                if kind is None:
                    row[col] = text.strip()
                else:
                    row[col] = None
                    if col not in schema.key:  # a bad key drops the row, reported below
                        bad_cells.setdefault(col, []).append((line, text))
        if any(schema.type_of(k) is int and row[k] is None for k in schema.key if k in scan.header):
            no_key.append(line)
            continue
        rows.append(row)
    for col, bad in bad_cells.items():
        line, text = bad[0]
        problems.append(
            f"column {col!r}: {len(bad)} cell(s) not of type "
            f"{schema.type_of(col).__name__}, read as missing (first: line {line}, {text!r})"
        )
    if no_key:
        problems.append(
            f"{len(no_key)} row(s) without an integer step dropped (line "
            f"{', '.join(map(str, no_key[:5]))})"
        )
    return rows


def _check_duplicates(rows: list[dict[str, Any]], schema: LogSchema, problems: list[str]) -> None:
    if not schema.key:
        return
    counts = Counter(tuple(r.get(k) for k in schema.key) for r in rows)
    dup = [(key, k) for key, k in counts.items() if k > 1]
    if dup:
        key, k = dup[0]
        first = ", ".join(f"{c}={v!r}" for c, v in zip(schema.key, key))
        problems.append(
            f"{len(dup)} row key(s) ({', '.join(schema.key)}) appear more than once "
            f"(first: {first}, {k} times): two writers into one run folder?"
        )
