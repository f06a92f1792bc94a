"""The run-folder schema (smoothlab.runlog): writer and reader agree on headers, torn lines,
NaN versus missing cells, malformed rows and the one definition of the final loss."""

from __future__ import annotations

import math

import pytest

from smoothlab.errors import UsageError
from smoothlab.runlog import (
    METRICS,
    METRICS_FIELDS,
    SMOOTHNESS,
    CsvLog,
    RunLogWarning,
    final_loss,
    format_cell,
    parse_cell,
    read_log,
)


def _write_steps(path, steps, **extra):
    with CsvLog(path, METRICS_FIELDS) as log:
        for s in steps:
            log.write({"step": s, "loss": 1.0 / s, **extra})


def test_nan_and_missing_cells_round_trip(tmp_path):
    path = tmp_path / "metrics.csv"
    with CsvLog(path, METRICS_FIELDS) as log:
        log.write({"step": 1, "loss": math.nan, "eval_acc": None, "seconds": math.inf})
        log.write({"step": 2, "loss": 0.1 + 0.2, "proj_grad": -math.inf})
    lines = path.read_text().splitlines()
    assert lines[1] == "1,,nan,,,,,,inf"  # nan written, missing cells empty
    rows = read_log(path, METRICS).rows
    assert math.isnan(rows[0]["loss"]) and rows[0]["eval_acc"] is None
    assert rows[0]["seconds"] == math.inf and rows[1]["proj_grad"] == -math.inf
    assert rows[1]["loss"] == 0.1 + 0.2  # repr round-trips the float exactly
    assert rows[1]["step"] == 2 and isinstance(rows[1]["step"], int)


def test_cells():
    assert format_cell(None) == "" and format_cell(math.nan) == "nan" and format_cell(3) == "3"
    assert parse_cell("") is None and parse_cell("10.0", int) == 10
    assert parse_cell(" x ", str) == "x"
    with pytest.raises(ValueError):
        parse_cell("10.5", int)
    with pytest.raises(ValueError):
        parse_cell("abc")


def test_header_only_file_with_other_columns_is_rejected(tmp_path):
    path = tmp_path / "metrics.csv"
    path.write_text("step,loss,other\n")
    with pytest.raises(UsageError, match=r"columns \['step', 'loss', 'other'\], expected"):
        CsvLog(path, METRICS_FIELDS)
    assert path.read_text() == "step,loss,other\n"  # untouched


def test_resume_drops_torn_last_line_instead_of_appending_to_it(tmp_path):
    path = tmp_path / "metrics.csv"
    _write_steps(path, range(1, 11))
    with path.open("a") as fh:
        fh.write("11")  # killed while writing step 11's row
    with pytest.warns(RunLogWarning, match="no newline"):
        log = CsvLog(path, METRICS_FIELDS, truncate_after=10)
    assert log.steps() == set(range(1, 11))
    log.write({"step": 11, "loss": 0.5})
    log.close()
    steps = [r["step"] for r in read_log(path, METRICS).rows]
    assert steps == list(range(1, 12))  # no step "111"


def test_resume_drops_last_line_of_wrong_width_and_later_steps(tmp_path):
    path = tmp_path / "metrics.csv"
    _write_steps(path, range(1, 6))
    with path.open("a") as fh:
        fh.write("6,0.1\n")
    with pytest.warns(RunLogWarning, match="2 fields, expected 9"):
        log = CsvLog(path, METRICS_FIELDS, truncate_after=3)
    log.close()
    assert [r["step"] for r in read_log(path, METRICS).rows] == [1, 2, 3]


def test_writer_refuses_corrupt_middle_row(tmp_path):
    path = tmp_path / "metrics.csv"
    _write_steps(path, [1])
    with path.open("a") as fh:
        fh.write("2,0.1\n3,,0.5,,,,,,\n")
    with pytest.raises(UsageError, match="line 3 has 2 fields, expected 9"):
        CsvLog(path, METRICS_FIELDS)


def test_torn_header_only_file_restarts(tmp_path):
    path = tmp_path / "metrics.csv"
    path.write_text("step,epo")
    CsvLog(path, METRICS_FIELDS).close()
    assert path.read_text() == ",".join(METRICS_FIELDS) + "\n"


def test_reader_lists_every_problem(tmp_path):
    path = tmp_path / "metrics.csv"
    path.write_text(
        "\ufeffstep,loss,extra\n"  # BOM accepted; header differs from the schema
        "1,0.5,a\n"
        "2,oops,b\n"  # non-numeric loss
        "2,0.4,c\n"  # second row for step 2
        "x,0.3,d\n"  # no integer step
        "4,0.2\n"  # wrong width in the middle
        "5,0.1,e\n"
        "6,0."  # torn
    )
    with pytest.warns(RunLogWarning):
        table = read_log(path, METRICS)
    assert [r["step"] for r in table.rows] == [1, 2, 2, 5]
    assert table.rows[1]["loss"] is None and table.rows[0]["extra"] == "a"
    assert table.columns == METRICS.fields + ("extra",)
    text = "\n".join(table.problems)
    for expected in (
        "no newline",
        "missing ['epoch', 'proj_grad'",
        "unexpected ['extra']",
        "column 'loss': 1 cell(s) not of type float, read as missing (first: line 3, 'oops')",
        "1 row(s) without an integer step dropped (line 5)",
        "1 row(s) with a wrong number of fields dropped (line 6)",
        "first: step=2, 2 times",
    ):
        assert expected in text
    assert len(table.problems) == 6


def test_clean_file_has_no_problems(tmp_path):
    path = tmp_path / "metrics.csv"
    _write_steps(path, [1, 2, 3])
    assert read_log(path, METRICS).problems == []
    assert read_log(tmp_path / "absent.csv", METRICS).rows == []


def test_reader_rejects_unusable_header(tmp_path):
    path = tmp_path / "smoothness.csv"
    path.write_text("step,block,value\n0,base,1.0\n")
    with pytest.raises(UsageError, match=r"lacks required column\(s\) \['estimate'\]"):
        read_log(path, SMOOTHNESS)
    path.write_text("step,step,block,estimate\n")
    with pytest.raises(UsageError, match=r"repeats column\(s\) \['step'\]"):
        read_log(path, SMOOTHNESS)


def test_final_loss():
    assert final_loss(range(20, 0, -1)) == 1.5  # n = 20: mean of the last 2
    assert final_loss([4.0, None, 2.0]) == 2.0  # n = 2 rows with a loss: k = 1
    assert final_loss([1.0] * 11) == 1.0 and final_loss([3.0] * 10 + [1.0]) == 2.0  # k = 2
    assert math.isnan(final_loss([])) and math.isnan(final_loss([None]))
    assert math.isnan(final_loss([1.0] * 30 + [math.nan]))  # divergence is not hidden
    assert final_loss([1.0] * 30 + [math.inf]) == math.inf


def test_strict_json_writes_null_for_nan_and_infinity(tmp_path):
    """summary.json of a run whose loss ended nan: strict JSON parsers must read it."""
    import json as _json

    from smoothlab.runlog import write_json

    data = {"final_loss": math.nan, "x": [1.0, math.inf], "ok": 0.5, "n": 3}
    path = write_json(tmp_path / "s.json", data, strict=True)
    text = path.read_text()
    assert "NaN" not in text and "Infinity" not in text
    assert _json.loads(text, parse_constant=lambda c: pytest.fail(c)) == {
        "final_loss": None,
        "x": [1.0, None],
        "ok": 0.5,
        "n": 3,
    }
    assert "NaN" in write_json(tmp_path / "t.json", data).read_text()  # default: as before


def test_cells_take_a_tensor_or_numpy_number_by_value_and_a_closed_log_reopens(tmp_path):
    """A tensor learning rate (torch.tensor(0.25)) was written 'tensor(0.2500)' and read
    back as missing; a write after close() (a Trainer's second train()) raised."""
    import numpy as np
    import torch

    from smoothlab.runlog import SMOOTHNESS_FIELDS, CsvLog, format_cell

    assert format_cell(torch.tensor(0.25)) == "0.25" and format_cell(np.float32(0.5)) == "0.5"
    assert format_cell(True) == "1" and format_cell(torch.tensor([1.0, 2.0])).startswith("tensor")
    log = CsvLog(tmp_path / "s.csv", SMOOTHNESS_FIELDS)
    log.write({"step": 1, "lr_peft": torch.tensor(1e-3, dtype=torch.float64)})
    log.close()
    log.write({"step": 2, "lr_peft": 2e-3})
    log.close()
    text = (tmp_path / "s.csv").read_text().splitlines()
    assert len(text) == 3 and text[1].split(",")[SMOOTHNESS_FIELDS.index("lr_peft")] == "0.001"


# ----------------------------------------------------------------------------- faults
def test_a_row_is_logged_once_per_key(tmp_path):
    """CsvLog appended a second row for a step it already held; readers then saw two rows
    for one step. It is refused, naming the file and the key, with nothing written; the
    recorder's several blocks of one step are distinct keys, and a resume that drops a
    pending step writes it again."""
    from smoothlab.runlog import SMOOTHNESS_FIELDS

    path = tmp_path / "metrics.csv"
    log = CsvLog(path, METRICS_FIELDS)
    log.write({"step": 1, "loss": 0.5})
    before = path.read_bytes()
    with pytest.raises(
        UsageError, match=r"metrics\.csv already holds the row of step=1 \(line 2\)"
    ):
        log.write({"step": 1.0, "loss": 0.7})
    assert path.read_bytes() == before
    log.write({"step": 2, "loss": 0.4})
    log.close()
    log = CsvLog(path, METRICS_FIELDS, truncate_after=1)  # a resume redoing step 2
    with pytest.raises(UsageError, match="step=1"):
        log.write({"step": 1, "loss": 0.5})
    log.write({"step": 2, "loss": 0.4})
    log.drop_after(1)
    log.write({"step": 2, "loss": 0.4})
    log.close()
    assert [r["step"] for r in read_log(path, METRICS).rows] == [1, 2]

    smooth = CsvLog(tmp_path / "smoothness.csv", SMOOTHNESS_FIELDS)
    row = {"step": 0, "norm": "spectral", "hvp": "fd", "estimate": 1.0}
    for block in ("base", "peft", "base.layer0"):
        smooth.write(row | {"block": block})
    smooth.write(row | {"block": "base", "norm": "frobenius"})
    with pytest.raises(UsageError, match=r"smoothness\.csv already holds the row of step=0, "):
        smooth.write(row | {"block": "peft"})
    smooth.close()
    assert len(read_log(tmp_path / "smoothness.csv", SMOOTHNESS).rows) == 4
    free = CsvLog(tmp_path / "free.csv", ("step", "x"), key=())  # opting out
    free.write({"step": 1})
    free.write({"step": 1})
    free.close()


def test_a_file_already_holding_a_duplicate_row_is_not_resumed(tmp_path):
    path = tmp_path / "metrics.csv"
    path.write_text(",".join(METRICS_FIELDS) + "\n1,,0.5,,,,,,\n2,,0.4,,,,,,\n1,,0.7,,,,,,\n")
    with pytest.raises(UsageError, match=r"lines 2 and 4 both hold the row of step=1.*--restart"):
        CsvLog(path, METRICS_FIELDS)
    CsvLog(path, METRICS_FIELDS, truncate_after=0).close()  # both are dropped on a resume at 0


def test_a_row_needs_an_integer_step(tmp_path):
    """A row without a step (or step 2.5, written as 2 before) was appended, and the file
    could then not be opened again: the run could not be resumed."""
    path = tmp_path / "metrics.csv"
    with CsvLog(path, METRICS_FIELDS) as log:
        log.write({"step": 1, "loss": 0.5})
        for bad in (None, 2.5, "x"):
            with pytest.raises(
                UsageError, match=rf"metrics\.csv: a row needs an integer step, got {bad!r}"
            ):
                log.write({"step": bad, "loss": 0.5})
    CsvLog(path, METRICS_FIELDS).close()
    assert path.read_text().count("\n") == 2


def test_a_failed_write_leaves_no_torn_row(tmp_path, monkeypatch):
    """A disk filling up mid-row: the part written is removed and the error is one line
    naming the file and what to do (it was a traceback, and the part written stayed)."""
    import errno
    import os

    import smoothlab.runlog as runlog

    path = tmp_path / "metrics.csv"
    log = CsvLog(path, METRICS_FIELDS)
    log.write({"step": 1, "loss": 0.5})
    before = path.read_bytes()
    real = os.write

    def disk_full(fd, data):
        real(fd, bytes(data[:5]))
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(runlog.os, "write", disk_full)
    with pytest.raises(UsageError) as info:
        log.write({"step": 2, "loss": 0.25})
    assert str(info.value) == (
        f"cannot write the row of step 2 to {path}: No space left on device (nothing of the "
        "row was kept); free some space, then rerun the same command to resume"
    )
    assert path.read_bytes() == before
    monkeypatch.setattr(runlog.os, "write", real)
    log.write({"step": 2, "loss": 0.25})  # space freed: the same step goes in once
    log.close()
    assert [r["step"] for r in read_log(path, METRICS).rows] == [1, 2]


def test_a_log_that_is_a_folder_is_one_clear_error(tmp_path):
    path = tmp_path / "metrics.csv"
    path.mkdir()
    with pytest.raises(UsageError, match=r"metrics\.csv is a folder, not a log file: move it away"):
        CsvLog(path, METRICS_FIELDS)
    with pytest.raises(UsageError, match=r"cannot read .*metrics\.csv: Is a directory"):
        read_log(path, METRICS)


def test_a_write_cut_inside_a_character_is_a_torn_line(tmp_path):
    """The torn tail is cut as bytes: a kill inside a multi-byte character (a block name)
    refused the resume as 'not UTF-8 text'."""
    from smoothlab.runlog import SMOOTHNESS_FIELDS

    path = tmp_path / "smoothness.csv"
    with CsvLog(path, SMOOTHNESS_FIELDS) as log:
        log.write({"step": 0, "block": "bloc_é", "estimate": 1.0})
    good = path.read_bytes()
    path.write_bytes(good + "2,0,bloc_é".encode()[:-1])
    with pytest.warns(RunLogWarning, match="no newline"):
        assert len(read_log(path, SMOOTHNESS).rows) == 1
    with pytest.warns(RunLogWarning, match="no newline"):
        CsvLog(path, SMOOTHNESS_FIELDS).close()
    assert path.read_bytes() == good
    path.write_bytes(good.replace("é".encode(), b"\xff"))  # damage inside: refused, with the line
    with pytest.raises(UsageError, match=r"not UTF-8 text \(byte 0xff on line 2.*--restart"):
        CsvLog(path, SMOOTHNESS_FIELDS)


def test_write_json_failure_keeps_the_old_file(tmp_path, monkeypatch):
    import errno
    from pathlib import Path

    from smoothlab.runlog import write_json

    path = write_json(tmp_path / "config.json", {"a": 1})

    def read_only(self, *a, **k):
        raise OSError(errno.EROFS, "Read-only file system", str(self))

    monkeypatch.setattr(Path, "write_text", read_only)
    with pytest.raises(
        UsageError, match=r"cannot write .*config\.json: Read-only file system; make"
    ):
        write_json(path, {"a": 2})
    monkeypatch.undo()
    assert path.read_text() == '{\n  "a": 1\n}\n' and sorted(tmp_path.iterdir()) == [path]
