"""Tests of the report (smoothlab.figures.report.write_report) on synthetic run folders."""

from __future__ import annotations

import re
from html import escape

import pandas as pd
import pytest
from runfolders import default_metrics, write_run

from smoothlab.analysis import block_summary, load_run
from smoothlab.errors import UsageError
from smoothlab.figures.report import format_number, write_report
from smoothlab.runlog import RunLogWarning


def html_escape(text: str) -> str:
    return escape(text, quote=False)


def _assert_self_contained(text: str) -> None:
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", text, re.I)
    assert "@import" not in text and "url(" not in text
    assert "<script" not in text.lower()


def test_write_report_single_run(tmp_path):
    adv = {
        "eta_x": 1.25e-7,
        "eta_y": 0.0025,
        "L_x": 52.5,
        "L_y": 0.375,
        "d_x": 22713344,
        "c_x": 1.0,
        "c_y": 0.5,
        "ratio": 5e-05,
        "formula": "eta_x = c_x / (L_x d_x)",
    }
    cal = pd.DataFrame(
        {
            "scale_x": [0.5, 2.0],
            "scale_y": [1.0, 1.0],
            "lr_base": [1e-7, 4e-7],
            "lr_peft": [1e-3, 1e-3],
            "dev_acc": [0.8125, 0.8675],
            "eval_acc": [0.7, 0.75],
            "final_loss": [0.3, 0.2],
            "run": ["pilot-0", "pilot-1"],
        }
    )
    root = write_run(tmp_path / "run", advice=adv, calibration=cal)
    md, html = write_report(root)
    assert md == root / "report.md" and html == root / "report.html"
    text = html.read_text()
    _assert_self_contained(text)
    assert text.count("data:image/png;base64,") >= 3  # fig1b, fit, curves
    assert (root / "figures").is_dir()
    bs = block_summary(load_run(root)).set_index("block")
    for value in (
        bs.loc["base", "median"],
        bs.loc["base", "mean"],
        bs.loc["base", "q90"],
        bs.loc["peft", "median"],
    ):
        assert f">{format_number(value)}<" in text
    assert ">22,713,344<" in text  # d_b with thousands separators
    assert "Median L_base / L_peft = 25" in text
    # advisor and calibration tables
    assert "eta_x = c_x / (L_x d_x)" in text
    assert ">52.5<" in text and ">0.375<" in text and ">0.0025<" in text
    assert ">0.8675<" in text and 'class="best"' in text
    # fit of peft: L = 3 g - 1 exactly
    assert ">−1<" in text and ">3<" in text
    md_text = md.read_text()
    assert "| base |" in md_text and "figures/" in md_text and "0.8675" in md_text
    assert "data:image" not in md_text


def test_write_report_several_runs_and_empty_run(tmp_path):
    a = write_run(tmp_path / "runs" / "a", name="hyb")
    b = write_run(tmp_path / "runs" / "b", name="zo", method="zo-ft", smoothness=None)
    c = write_run(
        tmp_path / "runs" / "c",
        name="dead",
        method="fo-lora",
        metrics="header",
        smoothness="header",
    )
    md, html = write_report([a, b, c], target_acc=0.7)
    assert html.parent == (tmp_path / "runs" / "report").resolve()
    text = html.read_text()
    _assert_self_contained(text)
    assert "data:image/png;base64," in text
    assert "Method comparison" in text and "steps to acc ≥ 0.7" in text
    assert text.count("No smoothness probes recorded") == 2
    assert "hyb, zo, dead" in text  # header lists the runs
    assert "hybrid-lora, zo-ft, fo-lora" in text
    assert ">95<" in text  # total seconds
    out = tmp_path / "elsewhere"
    md2, _ = write_report([a, b], out_dir=out)
    assert md2 == out / "report.md" and md2.exists()


def test_write_report_errors(tmp_path):
    with pytest.raises(ValueError, match="no run folders"):
        write_report([])
    with pytest.raises(ValueError, match="not a run folder"):
        write_report(tmp_path)


def test_format_number():
    assert format_number(22713344) == "22,713,344"
    assert format_number(0.123456) == "0.1235"
    assert format_number(1.5e-7) == "1.5e-7"
    assert format_number(123456.7) == "1.235e5"
    assert format_number(float("nan")) == "–"
    assert format_number(3.0) == "3"


def _report_text(root) -> str:
    _, html = write_report(root)
    return html.read_text()


def test_report_warns_about_malformed_metrics(tmp_path, capsys):
    root = write_run(tmp_path / "r")
    lines = (root / "metrics.csv").read_text().splitlines()
    lines[0] += ",surprise"  # a wrong header: one column too many (and rows one short)
    lines[1:] = [ln + ",0" for ln in lines[1:]]
    lines[3] = lines[3].replace(",18.0,", ",eighteen,")  # a non-numeric loss
    lines.append(lines[-1])  # a duplicate step (two writers)
    (root / "metrics.csv").write_text("\n".join(lines) + "\n190,1.9,0.")  # torn last row
    with pytest.warns(RunLogWarning) as record:
        text = _report_text(root)
    issued = " ".join(str(w.message) for w in record)
    for expected in (
        "unexpected ['surprise']",
        "column 'loss': 1 cell(s) not of type float",
        "no newline",
        "first: step=190, 2 times",
    ):
        assert expected in issued
        assert html_escape(expected) in text
    assert "Input problems</strong> (r: 5)" in text  # 4 file problems + the non-finite loss
    assert "the training loss is not finite in 1 of 21 logged rows (first: step 20" in text


def test_report_without_problems_has_no_warning(tmp_path):
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # any RunLogWarning would fail the test
        text = _report_text(write_run(tmp_path / "r"))
    assert 'class="warn"' not in text and "Input problems" not in text


def test_report_refuses_unusable_header(tmp_path):
    root = write_run(tmp_path / "r")
    (root / "metrics.csv").write_text("when,what\n1,2\n")
    with pytest.raises(UsageError, match=r"lacks required column\(s\) \['step', 'loss'\]"):
        write_report(root)


def test_report_notes_smoothness_estimates_it_leaves_out(tmp_path):
    """A probe that blew up (inf) or logged nan is left out of the tables and figures;
    the report says how many and where, instead of a silently shorter row."""
    root = write_run(tmp_path / "r")
    lines = (root / "smoothness.csv").read_text().splitlines()
    head = lines[0].split(",")
    col = head.index("estimate")
    for k, value in ((1, "inf"), (3, "nan")):
        cells = lines[k].split(",")
        cells[col] = value
        lines[k] = ",".join(cells)
    (root / "smoothness.csv").write_text("\n".join(lines) + "\n")
    text = _report_text(root)
    n = len(lines) - 1
    assert f"2 of {n} smoothness estimates are missing or not finite" in text


def test_report_says_a_run_has_not_finished_and_refuses_a_folder_twice(tmp_path):
    import json

    root = write_run(tmp_path / "r")  # logged to step 190, no summary.json
    cfg = json.loads((root / "config.json").read_text())
    (root / "config.json").write_text(json.dumps(cfg | {"steps": 500}))
    text = _report_text(root)
    assert "the run has not finished: 190 of 500 steps logged" in text
    (root / "summary.json").write_text("{}")
    assert "has not finished" not in _report_text(root)
    with pytest.raises(UsageError, match="the same run folder is given more than once"):
        write_report([root, tmp_path / "r" / ".." / "r"])


def test_report_writes_a_diverged_final_loss_out(tmp_path):
    """A run whose last losses are nan diverged: its final loss reads 'nan (diverged)', not
    the en dash that marks a missing value, in both the run's section and the comparison."""
    m = default_metrics()
    m.loc[m.index[-1], "loss"] = float("nan")
    a = write_run(tmp_path / "a", metrics=m)
    b = write_run(tmp_path / "b")
    text = _report_text(a)
    assert "final loss nan (diverged)" in text
    md, _ = write_report([a, b], tmp_path / "rep")
    rows = {
        ln.split("|")[1].strip(): ln
        for ln in md.read_text().splitlines()
        if ln[:4] in ("| a ", "| b ")
    }
    assert "nan (diverged)" in rows["a"] and "nan (diverged)" not in rows["b"]


def test_report_of_runs_with_no_finite_estimate_or_non_ascii_names(tmp_path):
    """All-nan estimates (a probe that failed every time) crashed the report with an
    IndexError; two runs whose names have no ASCII letters wrote the same figure files,
    so one run's section showed the other's data, and shared one heading anchor."""
    import numpy as np
    from runfolders import default_smoothness

    nan = write_run(tmp_path / "nan", smoothness=default_smoothness().assign(estimate=np.nan))
    assert "No block has a finite smoothness estimate" in _report_text(nan)
    a = write_run(tmp_path / "u1", name="训练")
    b = write_run(tmp_path / "u2", name="实验")
    _, html = write_report([a, b], tmp_path / "rep")
    pngs = sorted(p.name for p in (tmp_path / "rep" / "figures").glob("*_fig1b.png"))
    assert pngs == ["run-2_fig1b.png", "run_fig1b.png"]
    anchors = re.findall(r'<h2 id="([^"]+)">Run ', html.read_text())
    assert len(anchors) == 2 and len(set(anchors)) == 2, anchors


def test_a_non_positive_ratio_gives_no_rate_ratio(tmp_path):
    """A median L_base / L_peft <= 0 (trace norms, an indefinite block) gave the sentence
    'η_x/η_y ∝ -5.3e-08'; the report now says why it gives none."""
    from runfolders import default_smoothness

    sm = default_smoothness()
    sm.loc[sm["block"] == "base", "estimate"] = [-10.0, 0.0, -5.0, 3.0, -1.0]
    text = _report_text(write_run(tmp_path / "neg", smoothness=sm))
    assert "so it gives no learning-rate ratio" in text and "η_x/η_y ∝" not in text
