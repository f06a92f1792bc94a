"""Per-module smoothness (issue 8): grouping rule, module x step tables, figures and report,
on a synthetic smoothness.csv with known values."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from runfolders import write_run

from smoothlab.analysis import load_run
from smoothlab.analysis.modules import module_frame, module_matrix, module_side, natural_key
from smoothlab.figures.modules import fig_module_heatmap, fig_modules
from smoothlab.figures.report import write_report
from smoothlab.runlog import SMOOTHNESS_FIELDS

pytestmark = pytest.mark.filterwarnings("error::smoothlab.runlog.RunLogWarning")  # clean input

LAYERS = 12
STEPS = (0, 10, 20, 30)


def true_L(side: str, layer: int, step: int) -> float:
    """x modules: 10 (i + 1) (1 + t/100); y modules: 0.1 (i + 1) + t/1000."""
    if side == "x":
        return 10.0 * (layer + 1) * (1 + step / 100)
    return 0.1 * (layer + 1) + step / 1000


def layered_smoothness(layers: int = LAYERS, with_whole: bool = True) -> pd.DataFrame:
    rows = []
    for t in STEPS:
        names = [("base", None), ("peft", None)] if with_whole else []
        names += [(f"{p}.layer.{i}", ("x" if p == "base" else "y", i)) for p in ("base", "peft")
                  for i in range(layers)]  # fmt: skip
        for block, key in names:
            L = true_L(*key, t) if key else 1.0
            rows.append({"step": t, "block": block, "norm": "spectral", "hvp": "fd",
                         "estimate": L, "stderr": 0.01 * L, "grad_norm": 1.0 + t / 10})  # fmt: skip
    df = pd.DataFrame(rows)
    df["num_hvp"] = 20
    for c in SMOOTHNESS_FIELDS:
        if c not in df:
            df[c] = 0.5
    return df[list(SMOOTHNESS_FIELDS)]


@pytest.mark.parametrize(
    ("block", "expected"),
    [
        ("base.layer.3", ("x", "layer.3")),
        ("peft.layer.10", ("y", "layer.10")),
        ("base/attention", ("x", "attention")),
        ("peft:mlp", ("y", "mlp")),
        ("base", None),
        ("peft", None),
        ("base.", None),
        ("baseline.0", None),
        ("layer.3", None),
        ("model", None),
    ],
)
def test_module_side(block, expected):
    assert module_side(block) == expected


def test_module_side_custom_prefixes():
    assert module_side("zo.layer.1", x_prefix="zo", y_prefix="fo") == ("x", "layer.1")
    assert module_side("base.layer.1", x_prefix="zo", y_prefix="fo") is None


def test_natural_order():
    names = [f"layer.{i}" for i in (10, 2, 0, 11, 1)]
    assert sorted(names, key=natural_key) == [
        "layer.0",
        "layer.1",
        "layer.2",
        "layer.10",
        "layer.11",
    ]


def test_module_matrix_holds_the_recorded_values():
    sm = layered_smoothness()
    for side in ("x", "y"):
        mat = module_matrix(sm, side)
        assert list(mat.index) == [f"layer.{i}" for i in range(LAYERS)]  # 10 after 9
        assert list(mat.columns) == list(STEPS)
        expected = np.array([[true_L(side, i, t) for t in STEPS] for i in range(LAYERS)])
        np.testing.assert_allclose(mat.to_numpy(), expected, rtol=1e-12)
    with pytest.raises(ValueError, match="side='z'"):
        module_matrix(sm, "z")


def test_module_frame_averages_repeated_probes_and_skips_whole_blocks():
    sm = pd.DataFrame(
        {
            "step": [0, 0, 0, 10],
            "block": ["base.layer.0", "base.layer.0", "base", "peft.layer.0"],
            "estimate": [2.0, 4.0, 99.0, math.nan],
            "stderr": [0.3, 0.4, 1.0, 0.1],
        }
    )
    mf = module_frame(sm)
    assert len(mf) == 1  # "base" is not a module; the NaN probe is dropped
    row = mf.iloc[0]
    assert (row["side"], row["module"], row["step"], row["estimate"]) == ("x", "layer.0", 0, 3.0)
    assert row["stderr"] == pytest.approx(0.25)  # sqrt(0.3² + 0.4²) / 2
    assert module_matrix(sm, "y").empty


def test_module_figures(tmp_path):
    sm = layered_smoothness()
    for paths in (fig_modules(sm, tmp_path / "m"), fig_module_heatmap(sm, tmp_path / "h")):
        png, pdf = paths
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
        assert pdf.read_bytes()[:5] == b"%PDF-"
    only_x = sm[~sm["block"].str.startswith("peft.")]
    assert fig_modules(only_x, tmp_path / "mx")[0].exists()  # y panel says "no y modules"
    assert fig_module_heatmap(only_x, tmp_path / "hx")[0].exists()
    whole = sm[sm["block"].isin(["base", "peft"])]
    with pytest.raises(ValueError, match=r"no per-module blocks .* found \['base', 'peft'\]"):
        fig_modules(whole, tmp_path / "none")
    with pytest.raises(ValueError, match="no per-module blocks"):
        fig_module_heatmap(whole, tmp_path / "none")
    # L <= 0 everywhere (trace norms): a log heat map would be blank without a word
    import matplotlib.pyplot as plt

    texts: list[str] = []
    real = plt.Axes.text
    plt.Axes.text = lambda ax, *a, **k: texts.append(a[2]) or real(ax, *a, **k)
    try:
        fig_module_heatmap(only_x.assign(estimate=-1.0), tmp_path / "neg")
    finally:
        plt.Axes.text = real
    assert "no positive L to show on a log scale" in texts


def test_report_draws_per_module_curves(tmp_path):
    with_modules = write_run(tmp_path / "mod", smoothness=layered_smoothness())
    plain = write_run(tmp_path / "plain")
    assert len(load_run(with_modules).smoothness) == len(STEPS) * (2 + 2 * LAYERS)
    text = write_report(with_modules)[1].read_text()
    plain_text = write_report(plain)[1].read_text()
    assert "Per-module smoothness" in text and "Per-module smoothness" not in plain_text
    assert "12 x modules" in text and "12 y modules" in text
    assert "(a) x modules of the base model, (b) y modules" in text
    assert "log10 L per module (rows, in layer order)" in text
    assert (with_modules / "figures" / "mod_modules.png").exists()
    assert (with_modules / "figures" / "mod_modules_heatmap.png").exists()
    # two more embedded figures than the same report without modules
    assert text.count("data:image/png;base64,") == plain_text.count("data:image/png;base64,") + 2
