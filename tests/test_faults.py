"""Runs that cannot be corrupted (issue 10): deferred signals, the run-folder lock, the
config check on resume, divergence, and the malformed inputs of the issue."""

from __future__ import annotations

import contextlib
import io
import math
import os
import signal
import subprocess
import sys
import textwrap
import time
import warnings

import pytest
import torch

from smoothlab.errors import UsageError
from smoothlab.hybrid.faults import (
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
    from smoothlab.hybrid.faults import RunLock
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


# ----------------------------------------------------------------------------- malformed input
# Items of the issue fixed elsewhere (readers, runlog, CLI, blocks, probe): one check each.
def _cli(argv, capsys) -> tuple[int, str]:
    from smoothlab.cli import main

    rc = main([str(a) for a in argv])
    err = capsys.readouterr().err
    return rc, err


def _one_line(rc: int, err: str, *needles: str) -> None:
    """Exit 2 and one line on stderr (besides a progress bar's ``\r`` updates)."""
    lines = [x for x in err.split("\n") if x.strip() and "\r" not in x]
    assert rc == 2 and len(lines) == 1 and "Traceback" not in err, err
    for n in needles:
        assert n in lines[0], lines[0]


def test_reader_field_limit_bom_and_encoding(tmp_path):
    from smoothlab.hybrid.readers import load_examples

    long = tmp_path / "long.tsv"
    long.write_text(f"sentence\tlabel\n{'x' * 140_000}\t1\nshort\t0\n")
    assert [len(e.text) for e in load_examples(long, "sst2")] == [140_000, 5]  # over 131,072
    bom = tmp_path / "bom.csv"
    bom.write_bytes("sentence,label\nfine,1\n".encode("utf-8-sig"))
    assert [(e.text, e.label) for e in load_examples(bom, "sst2")] == [("fine", 1)]
    latin = tmp_path / "latin.tsv"
    latin.write_bytes("sentence\tlabel\ncaf\xe9\t1\n".encode("latin-1"))
    with pytest.raises(UsageError, match="latin.tsv"):
        load_examples(latin, "sst2")


def test_csvlog_header_torn_line_and_nan(tmp_path):
    from smoothlab.runlog import METRICS, METRICS_FIELDS, CsvLog, RunLogWarning, read_log

    path = tmp_path / "metrics.csv"
    with CsvLog(path, METRICS_FIELDS) as log:
        log.write({"step": 1, "loss": float("nan")})
        log.write({"step": 2, "loss": 0.5})
    with path.open("a") as fh:
        fh.write("11")  # a crash mid-write of row 11
    with pytest.warns(RunLogWarning, match="no newline"):
        with CsvLog(path, METRICS_FIELDS, truncate_after=2) as log:
            log.write({"step": 3, "loss": 0.25})
    rows = read_log(path, METRICS).rows
    assert [r["step"] for r in rows] == [1, 2, 3] and math.isnan(rows[0]["loss"])
    assert path.read_text().splitlines()[1].split(",")[2] == "nan"
    (tmp_path / "other.csv").write_text("a,b\n1,2\n")
    with pytest.raises(UsageError, match="columns"):
        CsvLog(tmp_path / "other.csv", METRICS_FIELDS)


def test_report_reader_lists_bad_metrics(tmp_path):
    from smoothlab.runlog import METRICS, read_log

    path = tmp_path / "metrics.csv"
    path.write_text("step,loss,extra\n1,0.5,0\n2,oops,0\n3,0.2")
    table = read_log(path, METRICS, warn=False)
    text = " ".join(table.problems)
    assert "no newline" in text and "header differs" in text and "'loss'" in text
    assert [r["step"] for r in table.rows] == [1, 2] and table.rows[1]["loss"] is None


def test_cli_inputs_of_the_issue_are_one_line(tmp_path, capsys):
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    cases = [
        (["train", "--device", "mps"], "mps"),
        (["train", "--out", a_file], "is a file"),
        (["train", "--out", ""], "must not be empty"),
        (["probe", "--out", a_file / "p.json"], "which is a file"),
        (["advise", "--out", a_file / "d"], "which is a file"),
        (["train", "--seed", str(2**70), "--out", tmp_path / "r"], "seed"),
        (["probe", "--blocks", "a=*query*,a=*key*"], "twice"),
        (["probe", "--blocks", "=x"], "empty block name"),
        (["train", "--peft", "lora", "--out", tmp_path / "r"], "--method"),
    ]
    for argv, needle in cases:
        _one_line(*_cli(argv, capsys), needle)
    assert not (tmp_path / "r").exists()


def test_cli_bad_run_folders_and_models_are_one_line(tmp_path, capsys):
    import json

    fo = tmp_path / "fo"
    fo.mkdir()
    (fo / "config.json").write_text(json.dumps({"method": "fo-ft", "block_sizes": {"model": 9}}))
    (fo / "smoothness.csv").write_text("step,block,estimate\n0,model,1.0\n")
    _one_line(*_cli(["advise", "--run", fo], capsys), "'base' and 'peft'")
    (fo / "config.json").write_text(json.dumps({"method": "hybrid-lora"}))
    _one_line(*_cli(["advise", "--run", fo], capsys), "block_sizes")
    from tests.tiny_models import tiny_encoder

    model = tmp_path / "enc"
    tiny_encoder(seed=0, save_dir=model)
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    _one_line(*_cli(["probe", "--model", model, "--batch-size", "2"], capsys), str(model))


def test_probe_api_errors_name_the_problem():
    import torch

    from smoothlab import probe

    w = torch.nn.Parameter(torch.randn(3, 3, dtype=torch.float64))
    with pytest.raises(UsageError, match="twice in block 'a'"):
        probe(lambda: (w**2).sum(), {"a": [w, w]})
    with pytest.raises(UsageError, match="nan"):
        probe(lambda: (w**2).sum() * float("nan"), {"a": [w]}, hvp="fd", num_vectors=2)
    with pytest.raises(UsageError, match="empty"):
        probe(lambda: (w**2).sum(), {" ": [w]})


def test_probe_out_leaves_no_tmp_file(tmp_path, capsys):
    from tests.tiny_models import tiny_encoder

    model = tmp_path / "enc"
    tiny_encoder(seed=0, save_dir=model)
    out = tmp_path / "p.json"
    rc = _cli(
        ["probe", "--model", model, "--batch-size", "2", "--vectors", "2", "--out", out], capsys
    )[0]
    assert rc == 0 and out.is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["enc", "p.json"]


# ----------------------------------------------------------------------------- training runs
STEPS = 6
SMALL = {
    "train_size": 32,
    "eval_size": 16,
    "dev_size": 8,
    "batch_size": 4,
    "max_length": 32,
    "lora_r": 4,
    "lr_base": 1e-3,
    "lr_peft": 1e-2,
    "method": "hybrid-lora",
    "eval_every": 2,
    "record_every": 2,
    "record_vectors": 2,
}
TIMING = {"seconds", "probe_seconds", "train_seconds"}


@pytest.fixture(scope="module")
def opt_model(tmp_path_factory):
    from tests.tiny_models import tiny_causal_lm

    path = tmp_path_factory.mktemp("faults_model") / "opt"
    tiny_causal_lm("opt", seed=0, save_dir=path)
    return path


def _cfg(model, out, **over):
    from smoothlab.hybrid.train import TrainConfig

    return TrainConfig(model=str(model), out=str(out), **(SMALL | {"steps": STEPS} | over))


def _train(cfg, **kw):
    from smoothlab.hybrid.train import train

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return train(cfg, progress=False, **kw)


@pytest.fixture(scope="module")
def baseline(opt_model, tmp_path_factory):
    """The uninterrupted run every interrupted one is compared with."""
    return _train(_cfg(opt_model, tmp_path_factory.mktemp("faults_base") / "A"))


def _rows(path):
    import csv

    if not path.exists():
        return []
    with path.open(newline="") as fh:
        return [{k: v for k, v in r.items() if k not in TIMING} for r in csv.DictReader(fh)]


def assert_same_run(a, b):
    """Bit for bit: every logged value except timings, the final weights and engine state,
    and best.pt."""
    import torch

    for name in ("metrics.csv", "smoothness.csv"):
        assert _rows(b / name) == _rows(a / name), name
    for name in ("checkpoint.pt", "best.pt"):
        ca = torch.load(a / name, weights_only=False)
        cb = torch.load(b / name, weights_only=False)
        assert ca["step"] == cb["step"] and ca.keys() == cb.keys(), name
        assert ca["model"].keys() == cb["model"].keys()
        for k in ca["model"]:
            assert torch.equal(ca["model"][k], cb["model"][k]), (name, k)
        if name == "checkpoint.pt":
            assert ca["engine"] == cb["engine"] and ca["pending"] == cb["pending"] == []


@contextlib.contextmanager
def sigint_at(phase: str, step: int = 4):
    """Send a real SIGINT to this process inside ``phase`` of update ``step`` (eval, row,
    probe and checkpoint are all due at step 4 with the settings above)."""
    import torch

    import smoothlab.hybrid.engine
    import smoothlab.recorder
    import smoothlab.runlog
    from smoothlab.hybrid.models import ModelBundle

    calls = {"n": 0}

    def kill_then(fn, when):
        def wrapper(*args, **kwargs):
            if when(*args, **kwargs):
                os.kill(os.getpid(), signal.SIGINT)
            return fn(*args, **kwargs)

        return wrapper

    def nth(n):
        def when(*args, **kwargs):
            calls["n"] += 1
            return calls["n"] == n

        return when

    targets = {  # (object, attribute, predicate on the call)
        # a ZO forward of step 4 (two per step): the step is abandoned before its update
        "forward": (smoothlab.hybrid.engine.HybridEngine, "_value", nth(2 * step - 1)),
        "update": (smoothlab.hybrid.engine.TwoRateSGD, "step", nth(step)),
        "eval": (ModelBundle, "accuracy", nth(3)),  # eval at 2 (eval + dev), then step 4
        "probe": (smoothlab.recorder, "probe", nth(3)),  # probes at 0, 2, then 4
        "row": (
            smoothlab.runlog.CsvLog,
            "write",
            lambda log, row: log.path.name == "metrics.csv" and row.get("step") == step,
        ),
        "checkpoint": (
            torch,
            "save",
            lambda obj, f, *a, **k: str(f).endswith("checkpoint.pt.tmp") and obj["step"] == step,
        ),
    }
    owner, attr, when = targets[phase]
    original = getattr(owner, attr)
    setattr(owner, attr, kill_then(original, when))
    try:
        yield
    finally:
        setattr(owner, attr, original)


# what the interrupt checkpoint holds: the phase the signal hit is done when it was deferred
EXPECTED = {
    "forward": (3, []),  # not deferred to the step's end: step 3 is the last one taken
    "update": (4, ["eval", "row", "probe"]),
    "eval": (4, ["eval", "row", "probe"]),
    "row": (4, ["probe"]),
    "probe": (4, ["probe"]),
    "checkpoint": (4, []),
}


@pytest.mark.parametrize("phase", list(EXPECTED))
def test_sigint_in_each_phase_then_resume_is_bit_identical(phase, opt_model, baseline, tmp_path):
    import torch

    cfg = _cfg(opt_model, tmp_path / "B")
    with sigint_at(phase), pytest.raises(KeyboardInterrupt):
        _train(cfg)
    ckpt = torch.load(tmp_path / "B" / "checkpoint.pt", weights_only=False)
    assert (ckpt["step"], ckpt["pending"]) == EXPECTED[phase]
    metrics = [int(r["step"]) for r in _rows(tmp_path / "B" / "metrics.csv")]
    step, pending = EXPECTED[phase]
    assert metrics == list(range(1, step + 1 - ("row" in pending)))
    _train(cfg)
    assert_same_run(baseline, tmp_path / "B")
    assert not list((tmp_path / "B").glob("*.tmp"))


def _argv(model, out, **over):
    """The ``smoothlab train`` command of ``_cfg(model, out, **over)``."""
    args = ["train", "--model", str(model), "--out", str(out), "--steps", str(STEPS)]
    for k, v in (SMALL | over).items():
        args += [f"--{k.replace('_', '-')}", str(v)]
    return args


def _wait_rows(path, k, proc, limit=180.0):
    end = time.monotonic() + limit
    while time.monotonic() < end and proc.poll() is None:
        if path.exists() and path.read_text().count("\n") > k:  # header + k rows
            return
        time.sleep(0.01)


@contextlib.contextmanager
def one_thread():
    """This process at one intra-op thread (restored after)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def test_kill_at_random_instants_then_rerun_is_bit_identical(opt_model, tmp_path):
    """SIGKILL twice (the second time a resumed run), then SIGTERM in another folder, each at
    a random instant after a random number of logged steps; then the same command again.
    (SIGINT is the in-process test above.)

    Every run here, killed or not, uses one intra-op thread. Float sums differ between thread
    counts, and at two threads a fresh process's first probe on the 2-core CI machine once
    came out 1 ulp off this process's (its gradient norm 5.193912249898089 against
    5.19391218902765, the same loss; it never did so here in 8 tries). Most likely MKL ran a
    product on fewer threads than asked, which its default MKL_DYNAMIC allows: above one
    thread, the count does not pin the sums across processes. That is the threading library,
    not a fault, and this test is about faults."""
    import random

    rng = random.Random(10)
    env = os.environ | {"PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    codes = {signal.SIGKILL: -9, signal.SIGTERM: 143, signal.SIGINT: 130}
    with one_thread():
        baseline = _train(_cfg(opt_model, tmp_path / "A"))
    for trial, sigs in enumerate([(signal.SIGKILL, signal.SIGKILL), (signal.SIGTERM,)]):
        out = tmp_path / f"T{trial}"
        for sig in sigs:
            cmd = [sys.executable, "-m", "smoothlab.cli", *_argv(opt_model, out)]
            proc = subprocess.Popen(
                cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
            )
            _wait_rows(out / "metrics.csv", rng.randint(0, STEPS - 2), proc)
            time.sleep(rng.uniform(0, 0.3))
            proc.send_signal(sig)
            err = proc.communicate(timeout=180)[1]
            assert proc.returncode in (codes[sig], 0), err  # 0: it had already finished
            assert "Traceback" not in err, err
        with one_thread():
            assert main_quiet(_argv(opt_model, out)) == 0
        assert_same_run(baseline, out)


def main_quiet(argv):
    from smoothlab.cli import main

    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return main([str(a) for a in argv])


def test_two_writers_second_exits_2_naming_the_first(opt_model, tmp_path, capsys):
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
        rc, err = _cli(_argv(opt_model, run), capsys)
        _one_line(rc, err, f"process {holder.pid}", str(run))
        assert sorted(p.name for p in run.iterdir()) == [LOCK_FILE]  # nothing written
    finally:
        holder.kill()
        holder.wait()


CHANGES = [
    {"seed": 1},
    {"data_seed": 1},
    {"batch_size": 2},
    {"train_size": 16},
    {"eval_size": 8},
    {"dev_size": 4},
    {"lr_base": 2e-3},
    {"lr_peft": 2e-2},
    {"mu": 1e-2},
    {"q": 2},
    {"one_sided": True},
    {"fo_at_perturbed": True},
    {"weight_decay": 0.1},
    {"lora_r": 2},
    {"lora_alpha": 16.0},
    {"max_length": 16},
    {"data": "DATA"},
]


def test_resume_with_a_changed_trajectory_flag_is_refused(opt_model, baseline, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(baseline, run)
    data = tmp_path / "d.tsv"
    data.write_text("sentence\tlabel\n" + "".join(f"s {i}\t{i % 2}\n" for i in range(80)))
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    for change in CHANGES:
        change = {k: (str(data) if v == "DATA" else v) for k, v in change.items()}
        ((name, new),) = change.items()
        with pytest.raises(UsageError) as info:
            _train(_cfg(opt_model, run, steps=8, **change))
        msg = str(info.value)
        assert f"{name}: {SMALL.get(name, _default(name))!r} -> {new!r}" in msg, msg
    with pytest.raises(UsageError, match="already run 6 steps"):
        _train(_cfg(opt_model, run, steps=4))
    after = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    assert after == before


def _default(name):
    from smoothlab.hybrid.train import TrainConfig

    return getattr(TrainConfig(), name)


def test_raising_steps_and_extend_steps_continue_the_run(opt_model, baseline, tmp_path):
    import json
    import shutil

    run = tmp_path / "run"
    shutil.copytree(baseline, run)
    _train(_cfg(opt_model, run, steps=8))
    rows = _rows(run / "metrics.csv")
    assert [int(r["step"]) for r in rows] == list(range(1, 9))
    assert rows[:6] == _rows(baseline / "metrics.csv")

    def crash(step, row):
        if step == 11:
            raise RuntimeError("simulated crash")

    with pytest.raises(RuntimeError):  # extension by 4 to 12; crash after step 11
        _train(_cfg(opt_model, run, steps=STEPS, extend_steps=4), on_step=crash)
    _train(_cfg(opt_model, run, steps=STEPS, extend_steps=4))  # the same command again
    assert [int(r["step"]) for r in _rows(run / "metrics.csv")] == list(range(1, 13))
    config = json.loads((run / "config.json").read_text())
    assert config["steps"] == 12 and config["extend_steps"] == 0


def test_restart_clears_every_log_of_the_old_run(opt_model, baseline, tmp_path):
    import json
    import shutil

    run = tmp_path / "run"
    shutil.copytree(baseline, run)
    _train(_cfg(opt_model, run, seed=1, steps=2), resume=False)
    sm = _rows(run / "smoothness.csv")
    assert sorted({int(r["step"]) for r in sm}) == [0, 2]
    old0 = [r for r in _rows(baseline / "smoothness.csv") if r["step"] == "0"]
    new0 = [r for r in sm if r["step"] == "0"]
    assert len(new0) == len(old0) and not any(r in old0 for r in new0)
    assert [int(r["step"]) for r in _rows(run / "metrics.csv")] == [1, 2]
    assert json.loads((run / "config.json").read_text())["seed"] == 1


def test_summary_timings_cover_the_whole_resumed_run(opt_model, tmp_path):
    import json

    run = tmp_path / "run"
    _train(_cfg(opt_model, run, steps=3))
    _train(_cfg(opt_model, run, steps=STEPS))
    s = json.loads((run / "summary.json").read_text())
    assert s["seconds_per_step"] == pytest.approx(s["train_seconds"] / STEPS, rel=1e-12)
    import csv

    with (run / "smoothness.csv").open() as fh:
        per_step = {r["step"]: float(r["probe_seconds"]) for r in csv.DictReader(fh)}
    assert sorted(per_step) == ["0", "2", "4", "6"]
    assert s["probe_seconds"] == pytest.approx(sum(per_step.values()), rel=1e-12)


@pytest.mark.parametrize(
    "lr_peft,needles,last",
    [
        (30.0, ["step 4", "exceeded 10x the initial loss", "lr_peft 30"], 4),
        (5.0, ["loss became nan at step 7", "lr_peft 5"], 7),
    ],
)
def test_divergence_stops_with_exit_2_and_keeps_the_logs(
    lr_peft, needles, last, opt_model, tmp_path, capsys
):
    run = tmp_path / "run"
    over = {"method": "fo-ft", "lr_peft": lr_peft, "record_every": 0, "eval_every": 20}
    rc, err = _cli([*_argv(opt_model, run, **over), "--steps", "20"], capsys)
    _one_line(rc, err, *needles)
    rows = _rows(run / "metrics.csv")
    assert [int(r["step"]) for r in rows] == list(range(1, last + 1))
    losses = [float(r["loss"]) for r in rows]
    assert all(math.isfinite(v) for v in losses[:-1])
    if last == 7:
        assert rows[-1]["loss"] == "nan"
    else:
        assert losses[-3:] == sorted(losses[-3:]) and losses[-3] > 10 * losses[0]


def test_resume_compares_the_data_file_by_contents(opt_model, tmp_path, monkeypatch):
    """A data file edited between two parts of a run would mix two datasets under one path:
    refused. The same contents under another spelling of the path (relative, ./, absolute)
    continue the run."""
    data = tmp_path / "d.tsv"
    text = "sentence\tlabel\n" + "".join(f"s {i}\t{i % 2}\n" for i in range(80))
    data.write_text(text)
    monkeypatch.chdir(tmp_path)
    run = tmp_path / "run"
    _train(_cfg(opt_model, run, steps=2, data="d.tsv"))
    before = (run / "metrics.csv").read_bytes()
    data.write_text(text.replace("\t0\n", "\t1\n"))  # every label flipped to 1
    with pytest.raises(UsageError, match=r"other contents of data 'd.tsv' \(sha256 "):
        _train(_cfg(opt_model, run, steps=4, data="d.tsv"))
    assert (run / "metrics.csv").read_bytes() == before
    data.write_text(text)
    _train(_cfg(opt_model, run, steps=4, data=str(data)))  # absolute now: the same data
    assert [int(r["step"]) for r in _rows(run / "metrics.csv")] == [1, 2, 3, 4]


def test_progress_bar_after_a_resume_inside_a_step_ends_at_its_total(
    opt_model, tmp_path, monkeypatch
):
    """Interrupted after step 4's update (its row still to write), the resumed bar starts
    at 3 and ends at STEPS, and each update shows its own step's loss."""
    import smoothlab.hybrid.train

    shown = []

    class Bar:
        def __init__(self, total, initial, **kw):  # noqa: ARG002
            self.total, self.n = total, initial
            shown.append(("start", initial))

        def set_postfix(self, post, refresh=True):
            self.post = post

        def update(self, k):
            self.n += k
            shown.append((self.n, self.post["loss"]))

        def close(self):
            pass

    cfg = _cfg(opt_model, tmp_path / "B")
    with sigint_at("update"), pytest.raises(KeyboardInterrupt):
        _train(cfg)
    import tqdm.auto

    real = tqdm.auto.tqdm  # the model loader's bars stay real
    monkeypatch.setattr(
        "tqdm.auto.tqdm",
        lambda *a, **kw: Bar(**kw) if kw.get("desc") == cfg.method else real(*a, **kw),
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        smoothlab.hybrid.train.train(cfg, progress=True)
    losses = {
        int(r["step"]): f"{float(r['loss']):.4f}" for r in _rows(tmp_path / "B" / "metrics.csv")
    }
    assert shown[0] == ("start", 3)
    assert shown[1:] == [(t, losses[t]) for t in range(4, STEPS + 1)]


# ----------------------------------------------------------------------------- file-system faults
def test_lock_in_an_unwritable_or_odd_folder_is_one_line(tmp_path, monkeypatch):
    """A read-only run folder, a folder where the lock file goes, a file system without
    locks: each was an OSError traceback."""
    import errno

    import smoothlab.hybrid.faults as F

    (tmp_path / "dir" / LOCK_FILE).mkdir(parents=True)
    with pytest.raises(UsageError, match=r"cannot create the lock file .*\.lock: Is a directory"):
        RunLock(tmp_path / "dir").acquire()
    real_open = os.open

    def read_only(path, *a, **k):
        if str(path).startswith(str(tmp_path / "ro")):
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        return real_open(path, *a, **k)

    (tmp_path / "ro").mkdir()
    monkeypatch.setattr(F.os, "open", read_only)
    with pytest.raises(UsageError, match=r"\.lock: Read-only file system; make the run folder"):
        RunLock(tmp_path / "ro").acquire()
    monkeypatch.undo()

    def no_locks(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(F.fcntl, "flock", no_locks)
    with pytest.raises(UsageError, match="No locks available; the file system may not support"):
        RunLock(tmp_path / "nfs").acquire()


def test_a_stale_lock_file_never_blocks(tmp_path):
    """A SIGKILLed holder leaves its pid in .lock; that pid may be gone or reused by an
    unrelated process. The kernel released the flock, so the folder is free either way."""
    for pid in ("999999999", str(os.getppid()), "garbage"):
        (tmp_path / LOCK_FILE).write_text(pid + "\n")
        with RunLock(tmp_path):
            assert (tmp_path / LOCK_FILE).read_text() == f"{os.getpid()}\n"


def test_clear_run_in_a_read_only_folder_is_one_line(tmp_path, monkeypatch):
    import errno
    from pathlib import Path

    (tmp_path / "metrics.csv").write_text("x")

    def read_only(self, *a, **k):
        raise OSError(errno.EROFS, "Read-only file system", str(self))

    monkeypatch.setattr(Path, "unlink", read_only)
    with pytest.raises(UsageError, match=r"cannot delete \(--restart\) .*metrics\.csv: Read-only"):
        clear_run(tmp_path)


def test_disk_full_mid_row_exits_2_and_the_rerun_is_bit_identical(
    opt_model, baseline, tmp_path, capsys, monkeypatch
):
    """The disk fills up while step 3's row is written: one line (it was a traceback), no
    partial row left; once space is freed the same command continues the run bit for bit."""
    import errno

    import smoothlab.runlog

    real = os.write

    def disk_full(fd, data):
        name = os.readlink(f"/proc/self/fd/{fd}")
        if name.endswith("metrics.csv") and bytes(data[:2]) == b"3,":
            real(fd, bytes(data[:4]))
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd, data)

    out = tmp_path / "B"
    monkeypatch.setattr(smoothlab.runlog.os, "write", disk_full)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rc, err = _cli(_argv(opt_model, out), capsys)
    _one_line(rc, err, f"cannot write the row of step 3 to {out / 'metrics.csv'}: No space left")
    assert [r["step"] for r in _rows(out / "metrics.csv")] == ["1", "2"]
    monkeypatch.undo()
    assert main_quiet(_argv(opt_model, out)) == 0
    assert_same_run(baseline, out)


def test_a_run_without_its_checkpoint_keeps_its_logs_unless_rerun_as_itself(
    opt_model, baseline, tmp_path, capsys
):
    """A finished run whose checkpoint.pt (and best.pt) a user deleted to save space: a rerun
    with another configuration used to start over silently, dropping every logged row and
    overwriting config.json. It is now refused like a resume, the logs untouched; the same
    command starts over with a note and logs the same rows again."""
    import shutil

    from smoothlab.hybrid.train import TrainConfig

    run = tmp_path / "A"
    shutil.copytree(baseline, run)
    for name in ("checkpoint.pt", "best.pt"):
        (run / name).unlink()
    before = {n: (run / n).read_bytes() for n in ("metrics.csv", "smoothness.csv", "config.json")}
    assert _rows(run / "metrics.csv")
    cfg = _cfg(opt_model, run)
    with pytest.raises(UsageError, match=r"another configuration \(lr_peft: .*replace them"):
        _train(TrainConfig(**(vars(cfg) | {"lr_peft": cfg.lr_peft * 2})))
    with pytest.raises(UsageError, match="holds a 'hybrid-lora' run; cannot resume it as 'zo-ft'"):
        _train(TrainConfig(**(vars(cfg) | {"method": "zo-ft"})))
    assert {n: (run / n).read_bytes() for n in before} == before
    (run / "config.json").write_text("{")
    with pytest.raises(UsageError, match="logged rows but no checkpoint.pt.*not readable"):
        _train(cfg)
    (run / "config.json").write_bytes(before["config.json"])
    capsys.readouterr()
    _train(cfg)
    assert "no checkpoint.pt: the run starts over from step 0" in capsys.readouterr().err
    assert_same_run(baseline, run)
    # options that change no step (when to save or evaluate) do not block a start-over
    for name in ("checkpoint.pt", "best.pt"):
        (run / name).unlink()
    _train(TrainConfig(**(vars(cfg) | {"save_every": 1, "eval_every": 1})))
    assert _rows(run / "smoothness.csv") == _rows(baseline / "smoothness.csv")


def test_a_run_from_before_dtypes_were_recorded_resumes_only_in_the_dtype_it_had(
    opt_model, baseline, tmp_path
):
    """Runs saved before ``dtype`` existed loaded as ``auto`` does (float32 here): resuming
    one with ``--dtype bfloat16`` is refused, as for a run that recorded its dtype (the old
    run's missing field used to take the new value, so it never differed); ``auto``
    resumes it."""
    import json
    import shutil

    import torch

    from smoothlab.hybrid.train import TrainConfig

    run = tmp_path / "old"
    shutil.copytree(baseline, run)
    state = torch.load(run / "checkpoint.pt", weights_only=False)
    assert state["config"].pop("dtype") == "float32"  # as a run of the old code saved it
    torch.save(state, run / "checkpoint.pt")
    config = json.loads((run / "config.json").read_text())
    del config["dtype"]
    (run / "config.json").write_text(json.dumps(config))
    cfg = _cfg(opt_model, run, steps=STEPS + 1)
    with pytest.raises(UsageError, match=r"dtype: 'float32' -> 'bfloat16'"):
        _train(TrainConfig(**(vars(cfg) | {"dtype": "bfloat16"})))
    _train(cfg)
    assert json.loads((run / "config.json").read_text())["dtype"] == "float32"


def test_a_checkpoint_of_another_method_is_named_before_anything_else(
    opt_model, baseline, tmp_path
):
    """Resuming a checkpoint as another method names the two methods (its other fields, of
    another method's run, would only be noise in the message)."""
    import shutil

    from smoothlab.hybrid.train import TrainConfig

    run = tmp_path / "A"
    shutil.copytree(baseline, run)
    cfg = _cfg(opt_model, run)
    with pytest.raises(UsageError, match="holds a 'hybrid-lora' run; cannot resume it as 'zo-ft'"):
        _train(TrainConfig(**(vars(cfg) | {"method": "zo-ft", "steps": 2})))
