"""Runs that cannot be corrupted (issue 10): deferred signals, the run-folder lock, the
config check on resume, divergence, and the malformed inputs of the issue."""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from hybrid.faults import (
    INERT,
    LOCK_FILE,
    Diverged,
    DivergenceGuard,
    Interrupted,
    RunLock,
    SignalGuard,
    check_resume,
    clear_run,
    config_diff,
)
from smoothlab.errors import UsageError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ----------------------------------------------------------------------------- signals
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_signal_inside_a_critical_section_takes_effect_after_it(signum):
    done = []
    with SignalGuard() as guard:
        with pytest.raises(Interrupted) as info:
            with guard.critical():
                os.kill(os.getpid(), signum)
                time.sleep(0.01)  # the handler runs here: deferred
                done.append("first half")
                with guard.critical():  # nested sections end together
                    done.append("second half")
        assert done == ["first half", "second half"]
        assert info.value.signum == signum and isinstance(info.value, KeyboardInterrupt)
        assert guard.pending is None and guard.depth == 0


def test_signal_outside_a_critical_section_stops_at_once():
    with SignalGuard():
        with pytest.raises(Interrupted) as info:
            os.kill(os.getpid(), signal.SIGTERM)
            for _ in range(1000):
                time.sleep(0.001)
        assert info.value.signum == signal.SIGTERM


def test_signal_guard_restores_the_previous_handlers():
    before = {s: signal.getsignal(s) for s in SignalGuard.SIGNALS}
    with SignalGuard():
        assert all(signal.getsignal(s) != before[s] for s in SignalGuard.SIGNALS)
    assert {s: signal.getsignal(s) for s in SignalGuard.SIGNALS} == before


# ----------------------------------------------------------------------------- lock
HOLD = textwrap.dedent(
    """
    import sys, time
    from hybrid.faults import RunLock
    lock = RunLock(sys.argv[1]).acquire()
    print("locked", flush=True)
    time.sleep(60)
    """
)


def test_second_writer_is_refused_naming_the_holder(tmp_path):
    run = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(run)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
        env=os.environ | {"PYTHONPATH": ROOT},
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(UsageError, match=rf"in use by process {holder.pid}\b"):
            RunLock(run).acquire()
    finally:
        holder.kill()
        holder.wait()
    # the kernel released the dead holder's lock: the folder is free again
    with RunLock(run) as lock:
        assert (run / LOCK_FILE).read_text().strip() == str(os.getpid())
        with pytest.raises(UsageError, match=str(os.getpid())):  # one lock per open file
            RunLock(run).acquire()
    assert lock._fd is None


def test_clear_run_removes_every_log(tmp_path):
    names = ["metrics.csv", "smoothness.csv", "checkpoint.pt", "summary.json", "seeds.jsonl"]
    for n in names + ["config.json", "notes.txt"]:
        (tmp_path / n).write_text("x")
    removed = clear_run(tmp_path)
    assert sorted(p.name for p in removed) == sorted(names)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "notes.txt"]


# ----------------------------------------------------------------------------- resume check
def test_config_diff_names_each_changed_trajectory_field():
    saved = {"seed": 0, "lr_base": 1e-3, "steps": 10, "out": "a", "blocks": [1, 2], "q": 1}
    current = {
        "seed": 1,
        "lr_base": 1e-3,
        "steps": 20,
        "out": "b",
        "blocks": (1, 2),
        "q": 1,
        "z": "rademacher",
    }
    assert config_diff(saved, current) == [("seed", 0, 1)]  # lists == tuples; steps, out inert
    assert config_diff(saved, current, defaults={"z": "gaussian"}) == [
        ("seed", 0, 1),
        ("z", "gaussian", "rademacher"),
    ]
    assert config_diff({"one_sided": 0}, {"one_sided": False}) == [("one_sided", 0, False)]
    assert {"steps", "out", "name"} <= INERT


def test_check_resume_message_and_steps():
    with pytest.raises(UsageError) as info:
        check_resume("runs/x", {"seed": 0, "mu": 1e-3}, {"seed": 3, "mu": 1e-2}, done=5)
    msg = str(info.value)
    assert "seed: 0 -> 3" in msg and "mu: 0.001 -> 0.01" in msg and "--restart" in msg
    with pytest.raises(UsageError, match="already run 5 steps"):
        check_resume("runs/x", {"steps": 10}, {"steps": 4}, done=5)
    check_resume("runs/x", {"steps": 10, "seed": 0}, {"steps": 40, "seed": 0}, done=5)


# ----------------------------------------------------------------------------- divergence
def test_divergence_guard_non_finite_and_ratio():
    g = DivergenceGuard(factor=10, patience=3)
    g.check(1, 0.7, {"lr_base": 10.0})
    for step, loss in [(2, 8.0), (3, 1e3), (4, 0.5), (5, 7.1), (6, 8.0)]:
        g.check(step, loss, {"lr_base": 10.0})  # at most 2 in a row above 7.0
    with pytest.raises(Diverged) as info:
        g.check(7, 1.6e5, {"lr_base": 10.0})
    msg = str(info.value)
    assert "step 7" in msg and "160000" in msg and "lr_base 10" in msg and "0.7" in msg
    assert isinstance(info.value, UsageError)
    h = DivergenceGuard()
    h.load_state_dict(g.state_dict())
    assert (h.initial, h.streak) == (0.7, 3)
    with pytest.raises(Diverged, match="loss became nan at step 2"):
        DivergenceGuard().check(2, math.nan, {"lr_peft": 1.0})
    off = DivergenceGuard(factor=0)
    for step in range(1, 10):
        off.check(step, 1.0 * 10**step, {})
    with pytest.raises(UsageError, match="diverge_patience"):
        DivergenceGuard(patience=0)
