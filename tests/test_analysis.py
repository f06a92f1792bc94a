"""Tests of the analysis package on synthetic run folders with known values."""

from __future__ import annotations

import dataclasses
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from runfolders import BLOCK_SIZES, write_run

from smoothlab.analysis import (
    METRICS_COLUMNS,
    SMOOTHNESS_COLUMNS,
    AffineFit,
    PowerFit,
    block_summary,
    compare_methods,
    fit_blocks,
    fit_smoothness,
    load_run,
    load_runs,
    runs_frame,
    select_norm,
    smoothness_ratio,
)
from smoothlab.runlog import RunLogWarning

ROOT = Path(__file__).resolve().parents[1]  # subprocesses import the packages from here


# ----------------------------------------------------------------------------- loading


def test_load_full_run(tmp_path):
    adv = {
        "eta_x": 1e-7,
        "eta_y": 1e-3,
        "L_x": 50.0,
        "L_y": 2.5,
        "d_x": 22713344,
        "c_x": 1.0,
        "c_y": 1.0,
        "ratio": 1e-4,
        "formula": "eta_x = c_x/(L_x d_x)",
    }
    cal = pd.DataFrame(
        {
            "scale_x": [1.0, 2.0],
            "scale_y": [1.0, 1.0],
            "lr_base": [1e-7, 2e-7],
            "lr_peft": [1e-3, 1e-3],
            "dev_acc": [0.8, 0.9],
            "eval_acc": [0.7, 0.75],
            "final_loss": [0.3, 0.2],
            "run": ["pilot-0", "pilot-1"],
        }
    )
    path = write_run(tmp_path / "r1", name="my-run", advice=adv, calibration=cal)
    run = load_run(path)
    assert run.name == "my-run"
    assert run.method == "hybrid-lora"
    assert run.block_sizes == BLOCK_SIZES
    assert list(run.metrics.columns) == list(METRICS_COLUMNS)
    assert len(run.metrics) == 20 and run.metrics["step"].dtype == np.int64
    assert run.metrics["eval_acc"].notna().sum() == 3
    assert len(run.smoothness) == 9
    assert run.smoothness["block"].tolist()[:2] == ["base", "base"]
    assert run.advice == adv
    assert run.calibration is not None and run.calibration["dev_acc"].tolist() == [0.8, 0.9]
    assert run.warnings == []
    assert "my-run" in repr(run)


def test_name_defaults_to_folder(tmp_path):
    assert load_run(write_run(tmp_path / "folder-name")).name == "folder-name"


def test_header_only_csvs(tmp_path):
    run = load_run(write_run(tmp_path / "r", metrics="header", smoothness="header"))
    assert run.metrics.empty and list(run.metrics.columns) == list(METRICS_COLUMNS)
    assert run.smoothness.empty and list(run.smoothness.columns) == list(SMOOTHNESS_COLUMNS)
    assert run.advice is None and run.calibration is None
    # summaries of an empty run are empty or NaN, not errors
    assert block_summary(run).empty
    row = compare_methods([run]).iloc[0]
    assert math.isnan(row["final_loss"]) and math.isnan(row["best_acc"])


def test_missing_and_zero_byte_files(tmp_path):
    run = load_run(write_run(tmp_path / "r", metrics=None, smoothness=None))
    assert run.metrics.empty and run.smoothness.empty
    assert run.warnings == ["no metrics.csv", "no smoothness.csv"]
    root = write_run(tmp_path / "z", smoothness=None)
    (root / "smoothness.csv").write_text("")
    assert load_run(root).smoothness.empty


def test_torn_last_line_dropped_with_warning(tmp_path):
    root = write_run(tmp_path / "r", smoothness=None)
    text = (root / "metrics.csv").read_text()
    (root / "metrics.csv").write_text(text + "200,2.0,0.")  # killed mid-write
    with pytest.warns(RunLogWarning, match="no newline"):
        run = load_run(root)
    assert len(run.metrics) == 20 and run.metrics["step"].iloc[-1] == 190
    assert any("metrics.csv: the last line has no newline" in w for w in run.warnings)


def test_not_a_run_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"empty.*not a run folder \(no config\.json"):
        load_run(tmp_path / "empty")
    with pytest.raises(ValueError, match="no such directory"):
        load_run(tmp_path / "nope")


def test_missing_columns_message(tmp_path):
    root = write_run(tmp_path / "r")
    pd.DataFrame({"step": [0], "block": ["base"], "value": [1.0]}).to_csv(
        root / "smoothness.csv", index=False
    )
    with pytest.raises(ValueError) as info:
        load_run(root)
    msg = str(info.value)
    assert "smoothness.csv" in msg
    assert "['estimate']" in msg  # missing
    assert "['step', 'block', 'value']" in msg  # found


def test_load_runs_and_runs_frame(tmp_path):
    a = write_run(tmp_path / "a", name="same")
    b = write_run(tmp_path / "b", name="same", method="zo-ft")
    runs = load_runs([a, b])
    assert [r.name for r in runs] == ["same", "same#2"]
    m = runs_frame(runs, "metrics")
    assert list(m.columns[:2]) == ["run", "method"] and len(m) == 40
    assert m.groupby("run")["method"].first().to_dict() == {
        "same": "hybrid-lora",
        "same#2": "zo-ft",
    }
    s = runs_frame(runs, which="smoothness")
    assert len(s) == 18
    with pytest.raises(ValueError, match="which="):
        runs_frame(runs, "losses")


# ----------------------------------------------------------------------------- summary


def test_block_summary_exact(tmp_path):
    run = load_run(write_run(tmp_path / "r"))
    bs = block_summary(run).set_index("block")
    base = bs.loc["base"]
    # base L = 10, 40, 90, 160, 1000
    assert base["count"] == 5
    assert base["d_b"] == BLOCK_SIZES["base"]
    assert base["median"] == 90.0
    assert base["mean"] == pytest.approx(260.0)
    assert (base["min"], base["max"]) == (10.0, 1000.0)
    assert base["q90"] == pytest.approx(160.0 + 0.6 * (1000.0 - 160.0))  # position 3.6
    assert base["median_stderr"] == pytest.approx(0.3)
    assert base["median_grad_norm"] == pytest.approx(7.0)
    peft = bs.loc["peft"]
    assert peft["median"] == 2.5 and peft["count"] == 4 and peft["d_b"] == 74498
    assert list(bs.index) == ["base", "peft"]  # order of first appearance
    # from a bare frame, d_b is unknown unless given
    assert math.isnan(block_summary(run.smoothness).set_index("block").loc["base", "d_b"])
    assert block_summary(run.smoothness, {"peft": 7}).set_index("block").loc["peft", "d_b"] == 7


def test_smoothness_ratio_exact(tmp_path):
    run = load_run(write_run(tmp_path / "r"))
    r = smoothness_ratio(run.smoothness, "base", "peft")
    # per-step ratios 10/1, 40/2, 90/3, 160/4 = 10, 20, 30, 40; step 40 has no peft probe
    assert r["n"] == 4
    assert r["median"] == pytest.approx(25.0)
    assert (r["q25"], r["q75"]) == (pytest.approx(17.5), pytest.approx(32.5))
    assert r["iqr"] == pytest.approx(15.0)
    assert r["norm"] == "spectral"
    with pytest.raises(ValueError, match=r"'lora'.*found \['base', 'peft'\]"):
        smoothness_ratio(run.smoothness, "base", "lora")


def test_smoothness_ratio_averages_repeated_probes():
    df = pd.DataFrame(
        {
            "step": [0, 0, 0, 1, 1],
            "block": ["base", "base", "peft", "base", "peft"],
            "estimate": [10.0, 30.0, 2.0, 8.0, 0.0],
        }
    )
    r = smoothness_ratio(df)
    assert r["n"] == 1 and r["median"] == 10.0  # mean(10, 30)/2; step 1 has L_peft = 0


def test_select_norm():
    df = pd.DataFrame(
        {
            "step": [0, 0],
            "block": ["b", "b"],
            "estimate": [1.0, 2.0],
            "norm": ["frobenius", "spectral"],
        }
    )
    assert select_norm(df)["estimate"].tolist() == [2.0]
    assert select_norm(df, "frobenius")["estimate"].tolist() == [1.0]
    with pytest.raises(ValueError, match=r"'trace'.*\['frobenius', 'spectral'\]"):
        select_norm(df, "trace")
    bs = block_summary(df)
    assert bs["norm"].tolist() == ["frobenius", "spectral"]


def test_compare_methods_hand_made_curve(tmp_path):
    runs = load_runs(
        [write_run(tmp_path / "a"), write_run(tmp_path / "b", method="zo-ft", metrics="header")]
    )
    cmp = compare_methods(runs, target_acc=0.7)
    a, b = cmp.iloc[0], cmp.iloc[1]
    assert (a["method"], a["lr_base"], a["lr_peft"]) == ("hybrid-lora", 1e-6, 1e-3)
    assert a["final_loss"] == pytest.approx(1.5)  # last 10% of 20 rows: losses 2, 1
    assert a["best_acc"] == 0.8 and a["final_acc"] == 0.75
    assert a["steps_to_target"] == 50  # first eval with acc >= 0.7
    assert a["sec_per_step"] == pytest.approx(0.5)
    assert a["total_seconds"] == pytest.approx(95.0)
    assert a["last_step"] == 190
    assert math.isnan(b["steps_to_target"]) and math.isnan(b["total_seconds"])
    never = compare_methods(runs[:1], target_acc=0.95).iloc[0]
    assert math.isnan(never["steps_to_target"])
    assert math.isnan(compare_methods(runs[:1]).iloc[0]["steps_to_target"])


# ----------------------------------------------------------------------------- fits


def test_fit_recovers_noiseless_exactly():
    g = np.array([0.5, 1.0, 2.0, 3.5, 7.0])
    fit = fit_smoothness(g, 2.0 + 3.0 * g)
    assert isinstance(fit, AffineFit)
    assert fit.L0 == pytest.approx(2.0, rel=1e-12)
    assert fit.L1 == pytest.approx(3.0, rel=1e-12)
    assert fit.L0_se == pytest.approx(0.0, abs=1e-12) and fit.L1_se == pytest.approx(0.0, abs=1e-12)
    assert fit.r2 == pytest.approx(1.0) and fit.r == pytest.approx(1.0) and fit.n == 5
    assert fit.predict(10.0) == pytest.approx(32.0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        fit.L0 = 0.0  # type: ignore[misc]


def test_power_fit_recovers_noiseless_exactly():
    g = np.array([0.5, 1.0, 2.0, 4.0])
    fit = fit_smoothness(g, 3.0 * g**0.5, kind="power")
    assert isinstance(fit, PowerFit)
    assert fit.a == pytest.approx(3.0, rel=1e-12) and fit.b == pytest.approx(0.5, rel=1e-12)
    assert fit.r2 == pytest.approx(1.0)


def test_fit_noisy_within_standard_errors():
    rng = np.random.default_rng(1234)
    g = rng.uniform(0.5, 5.0, 400)
    L = 2.0 + 3.0 * g + rng.normal(0.0, 0.5, g.size)
    fit = fit_smoothness(g, L)
    assert abs(fit.L0 - 2.0) < 3 * fit.L0_se
    assert abs(fit.L1 - 3.0) < 3 * fit.L1_se
    # the SE of the slope matches its closed form sigma / sqrt(sum (g - mean g)^2)
    assert fit.L1_se == pytest.approx(0.5 / np.sqrt(((g - g.mean()) ** 2).sum()), rel=0.15)
    assert 0.9 < fit.r2 < 1.0 and fit.p_value < 1e-10
    # L independent of g: slope within 3 SE of 0, large p-value plausible
    flat = fit_smoothness(g, 5.0 + rng.normal(0.0, 0.5, g.size))
    assert abs(flat.L1) < 3 * flat.L1_se and flat.r2 < 0.05


def test_fit_matches_scipy_linregress():
    from scipy import stats

    rng = np.random.default_rng(7)
    g = rng.uniform(0.0, 3.0, 50)
    L = 1.0 + 0.5 * g + rng.normal(0.0, 0.3, g.size)
    fit = fit_smoothness(g, L)
    ref = stats.linregress(g, L)
    assert fit.L0 == pytest.approx(ref.intercept, rel=1e-10)
    assert fit.L1 == pytest.approx(ref.slope, rel=1e-10)
    assert fit.L0_se == pytest.approx(ref.intercept_stderr, rel=1e-8)
    assert fit.L1_se == pytest.approx(ref.stderr, rel=1e-8)
    assert fit.r == pytest.approx(ref.rvalue, rel=1e-10)
    assert fit.r2 == pytest.approx(ref.rvalue**2, rel=1e-10)
    assert fit.p_value == pytest.approx(ref.pvalue, rel=1e-6)


def test_fit_errors():
    with pytest.raises(ValueError, match=r"at least 3 .* got 2 \(of 3\)"):
        fit_smoothness([1.0, 2.0, np.nan], [1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="got 2"):
        fit_smoothness([1.0, 2.0, -1.0], [1.0, 2.0, 3.0], kind="power")
    with pytest.raises(ValueError, match="all 3 gradient norms are equal"):
        fit_smoothness([1.0, 1.0, 1.0], [1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="kind="):
        fit_smoothness([1.0, 2.0, 3.0], [1.0, 2.0, 3.0], kind="cubic")  # type: ignore[arg-type]


def test_fit_blocks(tmp_path):
    sm = load_run(write_run(tmp_path / "r")).smoothness
    fits = fit_blocks(sm)
    assert list(fits) == ["base", "peft"]
    # peft rows were built with L = 2 + 3 (g - 1) = 3 g - 1
    assert fits["peft"].L0 == pytest.approx(-1.0) and fits["peft"].L1 == pytest.approx(3.0)
    small = sm[(sm["block"] == "base") & (sm["step"] < 20) | (sm["block"] == "peft")]
    fits = fit_blocks(small)
    assert isinstance(fits["base"], ValueError) and "got 2" in str(fits["base"])
    with pytest.raises(ValueError, match=r"\['lora'\].*found"):
        fit_blocks(sm, blocks=["lora"])


# ----------------------------------------------------------------------------- report


def _modules_loaded_by(imports: str) -> list[str]:
    code = (
        f"import sys; import {imports}; "
        "print([m for m in ('matplotlib', 'torch', 'transformers') if m in sys.modules])"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT
    )
    return json.loads(out.stdout.strip().replace("'", '"'))


@pytest.mark.parametrize(
    "imports",
    [
        "smoothlab.analysis",
        "smoothlab.runlog",
        "smoothlab.methods",
        "smoothlab.runlog, smoothlab.analysis",
    ],
)
def test_imports_load_no_matplotlib_or_torch(imports):
    assert _modules_loaded_by(imports) == []


def test_lazy_smoothlab_still_exports_on_attribute_access():
    # the control: the same probe sees torch once a torch-backed name is touched
    assert _modules_loaded_by("smoothlab; smoothlab.Oracle") == ["torch"]
    code = (
        "import smoothlab.recorder, smoothlab, inspect; "
        "print(inspect.isfunction(smoothlab.probe), smoothlab.Estimate.__name__)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT
    )
    assert out.stdout.split() == ["True", "Estimate"]


def test_a_missing_stderr_makes_the_steps_mean_stderr_unknown() -> None:
    """Two probes at one step with se 0.3 and a missing one: the mean's stderr is unknown
    (nan), not sqrt(0.3²)/2 = 0.15 as if the missing one were 0."""
    from smoothlab.figures._common import per_step

    df = pd.DataFrame(
        {
            "step": [0, 0, 1, 1],
            "block": "b",
            "estimate": [1.0, 2.0, 3.0, 4.0],
            "stderr": [0.3, np.nan, 0.3, 0.4],
        }
    )
    d = per_step(df, "b")
    assert np.isnan(d["stderr"][0]) and d["stderr"][1] == pytest.approx(0.25)
    from smoothlab.analysis.modules import module_frame

    df["block"] = "base.layer.0"
    m = module_frame(df)
    assert np.isnan(m["stderr"].iloc[0]) and m["stderr"].iloc[1] == pytest.approx(0.25)
