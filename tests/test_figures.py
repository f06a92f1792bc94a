"""Tests of the figures package: Example 2.3's gradient descent in closed form, and every
figure writing a non-empty PNG and PDF or refusing bad input with a clear message."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from smoothlab.analysis import load_run
from smoothlab.figures import (
    example23,
    fig1a,
    fig1b,
    fig2,
    fig3,
    fig_fit,
    method_color,
    run_gd,
    savefig,
)
from smoothlab.figures.style import METHOD_COLORS, PALETTE, block_color
from smoothlab.methods import METHODS, get_method
from smoothlab.runlog import RunLogWarning

ROOT = Path(__file__).resolve().parents[1]  # subprocesses import the packages from here


def smoothness_frame(blocks=("base", "peft"), steps=range(0, 100, 10)) -> pd.DataFrame:
    rows = []
    for t in steps:
        for b in blocks:
            g = 1.0 + 0.01 * t + (0.3 if b == "base" else 0.05)
            L = (50.0 + 10.0 * g) if b == "base" else (0.2 + 0.5 * g)
            rows.append(
                {
                    "step": t,
                    "block": b,
                    "norm": "spectral",
                    "estimate": L,
                    "stderr": 0.05 * L,
                    "grad_norm": g,
                }
            )
    return pd.DataFrame(rows)


def metrics_frame(rate: float = 0.01, n: int = 120, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    steps = np.arange(n)
    acc = np.where(steps % 20 == 0, 0.5 + 0.4 * (1 - np.exp(-rate * steps)), np.nan)
    return pd.DataFrame(
        {
            "step": steps,
            "loss": 0.3 + np.exp(-rate * steps) + rng.normal(0, 0.02, n),
            "eval_acc": acc,
            "seconds": 0.2 * steps,
        }
    )


def assert_written(paths: list[Path]) -> None:
    assert [p.suffix for p in paths] == [".png", ".pdf"]
    png, pdf = paths
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    assert pdf.read_bytes()[:5] == b"%PDF-" and pdf.stat().st_size > 1000


# ----------------------------------------------------------------------- Example 2.3


@pytest.mark.parametrize("eta", [0.001, 0.005, 0.0099, 1 / 101])
def test_run_gd_single_lr_closed_form(eta):
    a, b, x0, y0, steps = 100.0, 1.0, 1.5, -0.7, 40
    t = run_gd(a, b, eta, eta, x0, y0, steps)
    k = np.arange(steps + 1)
    np.testing.assert_allclose(t.x, x0 * (1 - 2 * a * eta) ** k, rtol=1e-12, atol=1e-300)
    np.testing.assert_allclose(t.y, y0 * (1 - 2 * b * eta) ** k, rtol=1e-12)
    np.testing.assert_allclose(t.f, a * t.x**2 + b * t.y**2, rtol=1e-14)
    # eta < 1/a: stable, but y contracts by only 1 - 2 b eta per step
    assert abs(t.y[-1]) > 0.4 * abs(y0)


def test_run_gd_two_lrs_reach_minimum_in_one_step():
    a, b = 100.0, 1.0
    t = run_gd(a, b, 1 / (2 * a), 1 / (2 * b), 1.0, 1.0, 5)
    assert t.f[0] == pytest.approx(101.0)
    assert np.all(np.abs(t.x[1:]) < 1e-15) and np.all(np.abs(t.y[1:]) < 1e-15)
    assert np.all(t.f[1:] < 1e-28)


def test_run_gd_diverges_above_one_over_a():
    a = 100.0
    t = run_gd(a, 1.0, 1.05 / a, 1.05 / a, 1.0, 1.0, 30)
    np.testing.assert_allclose(t.x, (1 - 2.1) ** np.arange(31), rtol=1e-12)
    assert abs(t.x[-1]) > 10


def test_run_gd_rejects_bad_input():
    with pytest.raises(ValueError, match="steps=-1"):
        run_gd(1.0, 1.0, 0.1, 0.1, steps=-1)
    with pytest.raises(ValueError, match="a > b > 0"):
        example23("unused", a=1.0, b=2.0)


def test_example23_writes_png_and_pdf(tmp_path):
    assert_written(example23(tmp_path / "sub" / "ex23", steps=20))


# ----------------------------------------------------------------------- figures


def test_fig1a_and_fig1b(tmp_path):
    sm = smoothness_frame()
    assert_written(fig1a(sm, tmp_path / "a" / "fig1a"))  # parents created
    assert_written(fig1a(sm, tmp_path / "fig1a_peft", block="peft"))
    assert_written(fig1b(sm, tmp_path / "fig1b.png"))  # suffix dropped
    assert (tmp_path / "fig1b.pdf").exists()


def test_fig1_errors_name_what_was_found():
    sm = smoothness_frame(blocks=("base",))
    with pytest.raises(ValueError, match=r"\['peft'\] not in .*found \['base'\]"):
        fig1b(sm, "unused")
    with pytest.raises(ValueError, match=r"\['lora'\] not in .*found \['base'\]"):
        fig1a(sm, "unused", block="lora")
    with pytest.raises(ValueError, match="empty"):
        fig1a(sm.iloc[0:0], "unused")
    with pytest.raises(ValueError, match=r"missing column\(s\) \['estimate'\]"):
        fig1a(sm.drop(columns="estimate"), "unused")


def test_fig2_and_fig3(tmp_path):
    small, large, hybrid = metrics_frame(0.003), metrics_frame(0.01), metrics_frame(0.03)
    large.loc[large["step"] > 80, "loss"] = np.inf  # a diverged run
    runs = {"one small lr": small, "one large lr": large, "hybrid (two lrs)": hybrid}
    assert_written(fig2(runs, tmp_path / "fig2", smooth_window=5, logy=True))
    assert_written(fig3(runs, tmp_path / "fig3"))
    with pytest.raises(ValueError, match=r"metrics of 'b'.*empty"):
        fig3({"a": small, "b": small.iloc[0:0]}, tmp_path / "x")
    with pytest.raises(ValueError, match="no runs"):
        fig2({}, tmp_path / "x")


def test_fig3_from_runs(tmp_path):
    for name, method in (("r1", "hybrid-lora"), ("r2", "zo-ft")):
        root = tmp_path / name
        root.mkdir()
        (root / "config.json").write_text(json.dumps({"method": method}))
        metrics_frame().to_csv(root / "metrics.csv", index=False)
    with pytest.warns(RunLogWarning, match=r"header differs .* missing \['epoch'"):
        runs = [load_run(tmp_path / "r1"), load_run(tmp_path / "r2")]
    assert_written(fig3(runs, tmp_path / "fig3_runs"))


def test_fig_fit(tmp_path):
    sm = smoothness_frame(blocks=("base", "peft", "layer.0"))
    assert_written(fig_fit(sm, tmp_path / "fit"))
    assert_written(fig_fit(sm, tmp_path / "fit_power", kind="power", blocks=["peft"]))
    few = sm[sm["step"] < 20]  # 2 points per block: drawn with the reason, not an error
    assert_written(fig_fit(few, tmp_path / "fit_few"))


def test_style_colors_are_stable_and_distinct():
    assert METHOD_COLORS == {name: m.color for name, m in METHODS.items()}  # no second table
    assert method_color("hybrid-lora") == get_method("hybrid-lora").color == "#D55E00"
    assert method_color("zo-ft") == "#0072B2"
    assert len({method_color(m) for m in METHODS}) == len(METHODS)  # all distinct
    assert method_color("Hybrid-LoRA") == method_color("hybrid-lora")
    assert method_color("hybrid-lora (run 2)") == method_color("hybrid-lora")
    assert len({method_color(m) for m in ("hybrid-lora", "zo-ft", "fo-lora")}) == 3
    # an unregistered label: a palette colour, the same in a process with another hash seed
    new = method_color("some new method")
    assert new in PALETTE.values()
    code = (
        "from smoothlab.figures.style import method_color; print(method_color('some new method'))"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT
    )
    assert out.stdout.strip() == new
    assert block_color("base") != block_color("peft")


def test_savefig_writes_both_formats(tmp_path):
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    ax.plot([0, 1], [0, 1])
    try:
        paths = savefig(fig, tmp_path / "deep" / "dir" / "line")
    finally:
        plt.close(fig)
    assert [p.name for p in paths] == ["line.png", "line.pdf"]
    assert all(p.stat().st_size > 0 for p in paths)


def test_curves_of_one_method_or_colliding_labels_get_distinct_colors():
    """Two runs of one method shared a colour, and so did labels whose hashed colours
    collide ("seed 1", "seed 2"): two lines alike under two legend entries."""
    from smoothlab.figures.style import distinct_colors

    assert method_color("seed 1") == method_color("seed 2")  # the collision itself
    colors = distinct_colors({"seed 1": "seed 1", "seed 2": "seed 2", "a": "a", "b": "b"})
    assert len(set(colors.values())) == 4
    same = distinct_colors({"hybrid-lora (r1)": "hybrid-lora", "hybrid-lora (r2)": "hybrid-lora"})
    assert same["hybrid-lora (r1)"] == method_color("hybrid-lora")
    assert same["hybrid-lora (r2)"] != same["hybrid-lora (r1)"]


def test_fig1a_keeps_negative_values_in_view_and_logs_decades(tmp_path):
    """fig1a pinned its axis at 0 (negative traces fell off the plot) and had no log scale
    (values over eight decades drew a flat line and a spike)."""
    import matplotlib.pyplot as plt

    def frame(values):
        n = len(values)
        return pd.DataFrame(
            {
                "step": range(n),
                "block": "model",
                "estimate": values,
                "stderr": 0.0,
                "norm": "trace",
                "hvp": "fd",
            }
        )

    seen = {}
    real_savefig = savefig

    def spy(fig, stem):
        ax = fig.axes[0]
        seen[Path(stem).name] = (ax.get_yscale(), ax.get_ylim())
        return real_savefig(fig, stem)

    import smoothlab.figures.fig1 as F1

    F1.savefig, old = spy, F1.savefig
    try:
        fig1a(frame([-50.0, -20.0, 10.0, 30.0, -5.0]), tmp_path / "neg")
        fig1a(frame([1e-2, 1.0, 1e3, 1e6]), tmp_path / "dec")
        fig1a(frame([3.0, 4.0, 5.0]), tmp_path / "plain")
    finally:
        F1.savefig = old
        plt.close("all")
    assert seen["neg"][0] == "linear" and seen["neg"][1][0] <= -50
    assert seen["dec"][0] == "log"
    assert seen["plain"][0] == "linear" and seen["plain"][1][0] == 0


def test_power_fit_figure_with_a_zero_gradient_norm(tmp_path):
    """The power fit drops g <= 0, but its drawing grid started at the smallest g of all
    points: np.geomspace(0, ...) raised."""
    from runfolders import default_smoothness

    sm = default_smoothness()
    sm.loc[sm["block"] == "peft", "grad_norm"] = [0.0, 1.0, 2.0, 3.0]
    paths = fig_fit(sm, tmp_path / "fit", kind="power")
    assert all(p.exists() for p in paths)


def test_a_one_row_run_is_drawn_as_a_point():
    """A run with one logged row drew a line of one point: nothing visible but its legend."""
    import importlib

    import matplotlib.pyplot as plt

    F3 = importlib.import_module("smoothlab.figures.fig3")  # the package exports the function fig3
    m = pd.DataFrame({"step": [5], "loss": [0.7], "eval_acc": [np.nan]})
    fig, ax = plt.subplots()
    try:
        F3._plot_loss(ax, m, "#000000", "one", None, False)
        assert ax.lines[-1].get_marker() == "o"
    finally:
        plt.close(fig)
