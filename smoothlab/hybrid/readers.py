"""File readers: local TSV, CSV, JSON-lines and JSON files into :class:`~smoothlab.hybrid.tasks.Records`,
then into a task's examples (:func:`load_examples`).

The format follows the extension: ``.tsv`` (tab-separated with a header, no quoting:
GLUE's layout), ``.csv`` (comma-separated with a header, standard quoting), ``.jsonl``
(one JSON object a line) or ``.json`` (JSON lines, or one array of objects). Files are
UTF-8, with or without a byte-order mark (as Excel writes them). TSV/CSV fields may be up to
:data:`FIELD_LIMIT` characters long (the ``csv`` module's default of 131,072 is raised while a
file is read). Every problem with a file is a :class:`~smoothlab.errors.UsageError` naming it.
"""

from __future__ import annotations

import codecs
import contextlib
import contextvars
import csv
import hashlib
import io
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from smoothlab.errors import UsageError

from .tasks import Example, Records, Task, get_task

__all__ = ["EXTENSIONS", "FIELD_LIMIT", "file_digests", "load_examples", "read_records"]

EXTENSIONS = (".tsv", ".csv", ".jsonl", ".json")

FIELD_LIMIT = min(sys.maxsize, 2**31 - 1)
"""Longest TSV/CSV field read, in characters (the largest value ``csv`` accepts everywhere)."""


_DIGESTS: contextvars.ContextVar[dict[str, str] | None] = contextvars.ContextVar(
    "hybrid_readers_digests", default=None
)


@contextlib.contextmanager
def file_digests() -> Iterator[dict[str, str]]:
    """``{path: sha256 of its bytes}`` of every file read in the block (the path as given,
    ``str(Path(path))``), hashed from the very bytes that were parsed: a caller that needs
    both the examples and the file's digest (a run's resume check) reads the file once."""
    sink: dict[str, str] = {}
    token = _DIGESTS.set(sink)
    try:
        yield sink
    finally:
        _DIGESTS.reset(token)


def _read_text(path: Path) -> str:
    """The file's text: UTF-8, a leading byte-order mark dropped."""
    data = path.read_bytes()
    if (sink := _DIGESTS.get()) is not None:
        sink[str(path)] = hashlib.sha256(data).hexdigest()
    if data.startswith(codecs.BOM_UTF8):
        data = data[len(codecs.BOM_UTF8) :]
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        raise UsageError(
            f"{path}: not UTF-8 text (byte 0x{data[err.start]:02x} on line {line}: "
            f"{err.reason}); save the file as UTF-8"
        ) from None


@contextlib.contextmanager
def _field_size_limit(limit: int) -> Iterator[None]:
    """``csv.field_size_limit(limit)`` for a block; the previous limit is restored."""
    previous = csv.field_size_limit(limit)
    try:
        yield
    finally:
        csv.field_size_limit(previous)


def _read_delimited(path: Path) -> Records:
    suffix = path.suffix.lower()
    text = _read_text(path)
    fh = io.StringIO(text, newline="")
    if suffix == ".tsv":
        reader = csv.reader(fh, delimiter="\t", quoting=csv.QUOTE_NONE)
    else:
        reader = csv.reader(fh)
    try:
        with _field_size_limit(FIELD_LIMIT):
            return _delimited_records(path, reader, None if suffix == ".tsv" else text)
    except csv.Error as err:
        raise UsageError(
            f"{path}: line {reader.line_num}: {err} (the field size limit is {FIELD_LIMIT:,} "
            "characters)"
        ) from None


def _check_header(path: Path, header: list[str]) -> None:
    """A column named twice would be read from its last occurrence only: refused."""
    seen: set[str] = set()
    for name in header:
        if name in seen:
            raise UsageError(
                f"{path}: the header names column {name!r} twice ({header}); rename or drop "
                "one of them"
            )
        seen.add(name)


def _unclosed_quote(text: str, start: int) -> bool:
    """Whether the CSV ``text`` from line ``start`` on ends inside a quoted field: the csv
    module (not strict) reads such a field to the end of the file, as one row."""
    tail = "".join(io.StringIO(text, newline="").readlines()[start - 1 :])
    try:
        for _ in csv.reader(io.StringIO(tail, newline=""), strict=True):
            pass
    except csv.Error as err:
        return "unexpected end of data" in str(err)
    return False


def _check_quotes(path: Path, text: str | None, start: int, end: int) -> None:
    """A CSV row read from lines ``start`` to ``end`` that is an unterminated quote: refused."""
    if text is not None and start < end and _unclosed_quote(text, start):
        raise UsageError(
            f"{path}: line {start} opens a quoted field that never closes (it runs to the end "
            f'of the file, line {end}); close the quote, or write a quote inside a field as ""'
        )


def _delimited_records(path: Path, reader: Any, text: str | None) -> Records:
    """The rows of a TSV/CSV ``reader`` under its header; ``text`` (CSV only) is the file's
    text, read again to tell an unterminated quote from a wrong delimiter."""
    header = next(reader, None)
    if header is None:
        return Records(path, [], [])
    header = [h.strip() for h in header]
    _check_header(path, header)
    width = len(header)
    rows: list[tuple[int, dict[str, Any]]] = []
    start = end = reader.line_num
    for row in reader:
        start, end = end + 1, reader.line_num
        if not row:
            continue
        if len(row) != width:
            _check_quotes(path, text, start, end)
            delimiter = "tab" if path.suffix.lower() == ".tsv" else "comma"
            raise UsageError(
                f"{path}: line {reader.line_num} has {len(row)} fields, the header has {width} "
                f"({header}); check the delimiter ({delimiter} for {path.suffix} files)"
            )
        rows.append((reader.line_num, dict(zip(header, row, strict=True))))
    if rows and rows[-1][0] == end:
        _check_quotes(path, text, start, end)
    return Records(path, header, rows)


def _read_json(path: Path) -> Records:
    content = _read_text(path)
    if path.suffix.lower() == ".json" and content.lstrip().startswith("["):
        try:
            items = json.loads(content)
        except json.JSONDecodeError as err:
            raise UsageError(f"{path}: not valid JSON ({err})") from None
        records = list(enumerate(items, start=1))
        unit = "record"
    else:
        records = []
        unit = "line"
        for number, line in enumerate(content.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                records.append((number, json.loads(line)))
            except json.JSONDecodeError as err:
                raise UsageError(
                    f"{path}: line {number} is not valid JSON ({err}); expected one JSON "
                    "object per line"
                ) from None
    for number, rec in records:
        if not isinstance(rec, dict):
            raise UsageError(
                f"{path}: {unit} {number} is {type(rec).__name__} {rec!r:.60}, expected a JSON "
                'object such as {"text": ..., "label": ...}'
            )
    columns = list(records[0][1]) if records else []
    return Records(path, columns, records, unit)


def read_records(path: str | Path) -> Records:
    """The raw records of a local file (format by extension; see the module docstring).

    Raises :class:`~smoothlab.errors.UsageError` naming the file for a missing file, a
    folder, an unknown extension and malformed content (with the line).
    """
    path = Path(path)
    if path.is_dir():
        raise UsageError(
            f"{path}: is a folder, not a data file; give a file ending in {', '.join(EXTENSIONS)}"
        )
    if path.suffix.lower() not in EXTENSIONS:
        raise UsageError(
            f"{path}: unknown extension {path.suffix!r}; accepted: {', '.join(EXTENSIONS)}"
        )
    if not path.is_file():
        raise UsageError(f"{path}: no such file")
    if path.suffix.lower() in (".tsv", ".csv"):
        return _read_delimited(path)
    return _read_json(path)


def load_examples(
    path: str | Path,
    task: str | Task,
    *,
    text_column: str | None = None,
    label_column: str | None = None,
) -> list[Example]:
    """Read the examples of ``task`` from a local file: :func:`read_records`, then the
    task's parser (:meth:`Task.parse`).

    Layouts (each task's :attr:`~smoothlab.hybrid.tasks.Task.columns` and parser):

    * classification (sst2, synthetic, or any classification :class:`Task` without a
      parser): a text column (``text``, ``sentence`` or ``sentence1``; or ``text_column``)
      and a ``label`` column (or ``label_column``) holding a class index or an alias such
      as ``negative``/``positive`` (:attr:`Task.label_aliases`).
    * copa (SuperGLUE): ``premise, choice1, choice2, question, label``. Context =
      premise without its final period + ``" because"`` (cause) or ``" so"`` (effect);
      candidates = ``" " +`` each choice with its first letter lower-cased.
    * winogrande: ``sentence, option1, option2, answer`` (``"1"``/``"2"``). ``text`` = the
      sentence before the blank ``_`` (trailing space removed), candidate ``i`` =
      ``" " + option_i +`` the sentence after the blank, ``score_from[i]`` = where the
      part after the blank starts (partial scoring, see :meth:`Task.scoring_pairs`).
    * wic (SuperGLUE): ``word, sentence1, sentence2, label`` (true/false); other fields
      (``start1``, ``end1``, ...) are ignored.

    Raises :class:`~smoothlab.errors.UsageError` (a ``ValueError``) naming the file for a
    missing file, a folder, an unknown extension, missing columns, bad labels and empty or
    missing texts (with the line number) and files without examples.
    """
    task = get_task(task) if isinstance(task, str) else task
    records = read_records(path)
    return task.parse(records, text_column=text_column, label_column=label_column)
