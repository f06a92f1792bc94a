"""bench/steps.py on a tiny causal LM: every case runs, its CPU peak memory counts what the
case holds, and after ``release`` (what the memory pass calls before each case) every case
still runs, its state rebuilt."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
steps = pytest.importorskip("steps")


def test_steps_cases_run_and_release_drops_their_state():
    args = argparse.Namespace(
        model_config="opt-tiny", dtype="float32", device="cpu", batch=2, seq=8,
        sources=["table", "hash"], offset=0,
    )  # fmt: skip
    model, loss_fn = steps.build_causal(args)
    model.eval()
    fns, release = steps.cases(model, loss_fn, args)
    resident = steps.resident_bytes(model)
    med, peaks = steps.measure(fns, 1, "cpu", set(), release, resident)
    assert set(med) == set(fns) == set(peaks)
    # a zo-ft step holds the noise table (a 2^22-entry float32 table: 16 MiB) for all of a
    # forward: its peak is at least inference's plus the table
    table_mib = 4 * (1 << 22) / 2**20
    assert resident / 2**20 < peaks["forward"] and peaks["zo-ft hash"] < peaks["zo-ft table"]
    assert peaks["zo-ft table"] >= peaks["forward"] + 0.99 * table_mib
    args.paired = 2
    paired = steps.paired_perturbation(fns, args.sources, args.paired)
    assert set(paired) == {"table", "hash"} and all(one > 0 for _, one in paired.values())
    text = steps.report(med, peaks, args, paired)
    assert "zo-ft table = 2 perturbed fwd" in text and "fd-hvp = " in text
    assert "perturbation inside a forward, hash, paired: " in text
    assert "memory zo-ft table" in text and "x inference" in text
    before = [p.detach().clone() for p in model.parameters()]
    release()
    from smoothlab.estimators import operator

    assert not operator._DOT_BUFFERS  # released with the rest
    for fn in fns.values():  # each alone after a release, as the memory pass runs them
        release()
        fn()
    for a, b in zip(before, model.parameters()):  # rates are 0 (the MeZO case drifts by ulps)
        torch.testing.assert_close(a, b.detach())


def test_recording_overhead_floor_prints_the_block_gradients_against_the_steps(capsys):
    """bench/recording_overhead.py's floor: a training step and one gradient of each probed
    block, timed on one batch; the floor line sums the base and LoRA gradients (not the
    head's, whose Lanczos may stop early) over ``every`` steps."""
    recording = pytest.importorskip("recording_overhead")
    from smoothlab.hybrid.train import TrainConfig

    cfg = TrainConfig(
        method="hybrid-lora", steps=1, batch_size=4, train_size=8, eval_size=2, dev_size=2
    )
    recording.floor(cfg, every=50, vectors=10, repeats=1)
    out = capsys.readouterr().out
    ms = {line.split()[1]: float(line.split()[2]) for line in out.splitlines() if "grad " in line}
    assert set(ms) == {"base", "peft", "head"} and all(v > 0 for v in ms.values())
    line = next(s for s in out.splitlines() if "(base + peft gradients) / (50 x step) = " in s)
    assert float(line.split(" = ")[1].split(":")[0]) > 0
