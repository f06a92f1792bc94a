"""The README's `smoothlab report runs/h1 runs/h2 --out runs/report` on a short recorded run.

A run of a few steps records gradient norms that differ in the 5th digit. The power fit
L ≈ a·g^b on logs then has an intercept log a in the thousands, and exp() of it overflowed
(OverflowError: the report crashed with a traceback). The values below are the `head` block
of `smoothlab train --method hybrid-lora --record-every 2 --steps 4` on MiniLM.
"""

from __future__ import annotations

import math

import pandas as pd
import pytest
from runfolders import default_smoothness, write_run

from smoothlab.analysis import fit_blocks, fit_smoothness
from smoothlab.figures.report import write_report

G = [0.12067379, 0.12066989, 0.12066475]
L = [1.11033115, 1.1109347, 0.8318671]


def test_power_fit_whose_a_overflows_is_a_fit_error():
    with pytest.raises(ValueError, match="no finite positive L"):
        fit_smoothness(G, L, kind="power")
    # the other side: log a of -10^4 underflowed to a = 0 and predicted nan, silently
    with pytest.raises(ValueError, match="no finite positive L"):
        fit_smoothness([10.0, 10.00001, 10.00002], [1.0, 2.0, 4.0], kind="power")
    # the affine fit of the same points is finite
    assert math.isfinite(fit_smoothness(G, L, kind="affine").L1)


def test_report_of_a_short_run_writes_a_note_not_a_traceback(tmp_path):
    sm = default_smoothness()
    head = sm[sm["block"] == "peft"].iloc[:3].copy()
    head["block"], head["grad_norm"], head["estimate"] = "head", G, L
    sm = pd.concat([sm, head], ignore_index=True)
    fits = fit_blocks(sm, kind="power")
    assert isinstance(fits["head"], ValueError) and "no finite positive" in str(fits["head"])
    assert not isinstance(fits["peft"], ValueError)  # one bad block hides no other
    run = write_run(tmp_path / "h2", smoothness=sm)
    md, html = write_report([run], tmp_path / "report")
    assert md.exists() and html.exists()
    # the head keeps its affine fit; its power columns are left empty
    rows = [r for r in md.read_text().splitlines() if r.startswith("| head |")]
    assert any(r.endswith("| – | – | – |") for r in rows), rows
