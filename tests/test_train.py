"""Tests for smoothlab.hybrid.train: every method end to end on tiny models, the run folder format,
which weights move, exact resume (also after a crash), and configuration errors."""

from __future__ import annotations

import csv
import json
import math
import warnings
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from smoothlab.errors import UsageError
from smoothlab.hybrid.train import (
    Diverged,
    TrainConfig,
    Trainer,
    build,
    load_config,
    load_trained,
    split_parameters,
    train,
)
from smoothlab.methods import get_method, method_names
from smoothlab.runlog import METRICS_FIELDS, SMOOTHNESS_FIELDS

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")

STEPS, EVAL_EVERY = 4, 2
SMALL = {
    "train_size": 32,
    "eval_size": 16,
    "dev_size": 8,
    "batch_size": 4,
    "max_length": 32,
    "lora_r": 4,
    "num_virtual_tokens": 3,
    "lr_base": 1e-3,
    "lr_peft": 1e-2,
}


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    from tests.tiny_models import tiny_causal_lm, tiny_encoder

    root = tmp_path_factory.mktemp("train_models")
    tiny_causal_lm("opt", seed=0, save_dir=root / "opt")
    tiny_encoder(seed=0, save_dir=root / "enc")
    return {"opt": root / "opt", "enc": root / "enc"}


def read_csv(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with path.open(newline="") as fh:
        reader = csv.DictReader(fh)
        rows = list(reader)
        return list(reader.fieldnames or []), rows


def initial_parameters(cfg: TrainConfig) -> tuple[dict[str, torch.Tensor], set[str], set[str]]:
    """The weights a run starts from (same seeds), and the names of its x and y."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bundle, _, _ = build(cfg)
    zo, fo = split_parameters(bundle.model, cfg.method)
    names = {id(p): n for n, p in bundle.model.named_parameters()}
    params = {n: p.detach().clone() for n, p in bundle.model.named_parameters()}
    return params, {names[id(p)] for p in zo}, {names[id(p)] for p in fo}


SLOW_ENC = [
    pytest.param(m, "enc", marks=pytest.mark.slow) for m in ("fo-ft", "fo-lora", "fo-prompt")
]
CASES = (
    [(m, "opt") for m in method_names()]
    + [(m, "enc") for m in ("zo-ft", "hybrid-lora", "hybrid-prompt")]
    + SLOW_ENC
)


@pytest.mark.parametrize("method,model", CASES)
def test_every_method_runs_end_to_end_and_writes_the_run_folder(method, model, models, tmp_path):
    cfg = TrainConfig(
        method=method,
        model=str(models[model]),
        steps=STEPS,
        eval_every=EVAL_EVERY,
        out=str(tmp_path / "run"),
        **SMALL,
    )
    start, zo_names, fo_names = initial_parameters(cfg)
    out = train(cfg, progress=False)
    assert out == tmp_path / "run"
    for f in ("config.json", "metrics.csv", "summary.json", "checkpoint.pt", "best.pt"):
        assert (out / f).is_file(), f
    assert not (out / "checkpoint.pt.tmp").exists()

    header, rows = read_csv(out / "metrics.csv")
    assert tuple(header) == METRICS_FIELDS
    assert [int(r["step"]) for r in rows] == list(range(1, STEPS + 1))
    has_zo, has_fo = bool(zo_names), bool(fo_names)
    assert has_zo == (method == "zo-ft" or method.startswith("hybrid-"))
    assert has_fo == (method != "zo-ft")
    seconds = [float(r["seconds"]) for r in rows]
    assert seconds == sorted(seconds) and seconds[0] > 0
    for r in rows:
        step = int(r["step"])
        assert math.isfinite(float(r["loss"])) and float(r["loss"]) > 0
        # a block the method does not train has no rate: an empty cell (it was 0.0)
        assert r["lr_base"] == (repr(cfg.lr_base) if has_zo else "") or (
            has_zo and float(r["lr_base"]) == cfg.lr_base
        )
        assert (r["lr_peft"] != "") == has_fo
        if has_fo:
            assert float(r["lr_peft"]) == cfg.lr_peft
        assert (r["proj_grad"] != "") == has_zo  # empty (not applicable) without a ZO block
        if has_zo:
            assert math.isfinite(float(r["proj_grad"]))
        evaluated = step % EVAL_EVERY == 0 or step == STEPS
        assert (r["eval_acc"] != "") == evaluated and (r["dev_acc"] != "") == evaluated
        if evaluated:
            acc, dev = float(r["eval_acc"]), float(r["dev_acc"])
            assert 0 <= acc <= 1 and (acc * cfg.eval_size) == pytest.approx(
                round(acc * cfg.eval_size)
            )
            assert 0 <= dev <= 1 and (dev * cfg.dev_size) == pytest.approx(
                round(dev * cfg.dev_size)
            )

    summary = json.loads((out / "summary.json").read_text())
    assert summary["method"] == method and summary["steps"] == STEPS
    assert summary["final_loss"] == pytest.approx(float(rows[-1]["loss"]), rel=1e-15)
    best = max(float(r["dev_acc"]) for r in rows if r["dev_acc"])
    assert summary["best_dev_acc"] == best

    config = json.loads((out / "config.json").read_text())
    assert config["method"] == method and config["steps"] == STEPS and config["seed"] == 0
    assert config["lr_base"] == cfg.lr_base and config["lr_peft"] == cfg.lr_peft
    assert {"torch", "transformers", "peft", "python"} <= set(config["versions"])
    assert config["num_zo_params"] == sum(start[n].numel() for n in zo_names)
    assert config["num_fo_params"] == sum(start[n].numel() for n in fo_names)
    assert config["dtype"] == "float32"  # "auto" recorded as the dtype it loaded
    assert load_config(out) == replace(cfg, dtype="float32")

    ckpt = torch.load(out / "checkpoint.pt", weights_only=False)
    assert ckpt["step"] == STEPS and ckpt["engine"]["t"] == STEPS
    # zo-ft keeps a seed log (kilobytes); its weights come back by replaying it
    final = load_trained(out).model.state_dict() if method == "zo-ft" else ckpt["model"]
    for name, w0 in start.items():
        moved = not torch.equal(final[name], w0)
        if name in zo_names:
            assert moved, f"ZO weight {name} did not move"  # x − η g z changes every entry's tensor
        elif name not in fo_names:
            assert not moved, f"frozen weight {name} moved"
    assert sum(not torch.equal(final[n], start[n]) for n in fo_names) >= (1 if has_fo else 0)
    if method.startswith("fo-") and method != "fo-ft":
        assert not zo_names  # base frozen: checked above as "frozen weight ... moved"


def _rows(path: Path) -> list[dict[str, str]]:
    return read_csv(path)[1]


@pytest.fixture(scope="module")
def resume_runs(models, tmp_path_factory):
    """Run A: 6 steps at once. Run B: 3 steps, then resumed to 6; both with the trajectory
    recorder every 2 steps. Run C (no recorder): crashes after step 5 (checkpoints every 2),
    then resumed to 6."""
    root = tmp_path_factory.mktemp("resume")
    common = dict(
        method="hybrid-lora",
        model=str(models["opt"]),
        eval_every=2,
        record_every=2,
        record_vectors=2,
        **SMALL,
    )
    a = train(TrainConfig(steps=6, out=str(root / "A"), **common), progress=False)
    b = train(TrainConfig(steps=3, out=str(root / "B"), **common), progress=False)
    b_half = {f: (b / f).read_bytes() for f in ("metrics.csv", "smoothness.csv")}
    train(TrainConfig(steps=6, out=str(root / "B"), **common), progress=False)

    def crash(step: int, row: dict) -> None:
        if step == 5:
            raise RuntimeError("simulated crash")

    cfg_c = TrainConfig(steps=6, out=str(root / "C"), **(common | {"record_every": 0}))
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(cfg_c, progress=False, on_step=crash)
    c_crashed = [int(r["step"]) for r in _rows(root / "C" / "metrics.csv")]
    c_ckpt_step = torch.load(root / "C" / "checkpoint.pt", weights_only=False)["step"]
    train(cfg_c, progress=False)
    return {
        "A": a,
        "B": b,
        "C": root / "C",
        "b_half": b_half,
        "c_crashed": c_crashed,
        "c_ckpt_step": c_ckpt_step,
    }


@pytest.mark.parametrize("run", ["B", "C"])
def test_resume_reproduces_uninterrupted_run(resume_runs, run):
    a, r = resume_runs["A"], resume_runs[run]
    rows_a, rows_r = _rows(a / "metrics.csv"), _rows(r / "metrics.csv")
    steps = [int(x["step"]) for x in rows_r]
    assert steps == list(range(1, 7))  # no duplicated and no missing step
    for col in ("step", "epoch", "loss", "proj_grad", "lr_base", "lr_peft"):
        assert [x[col] for x in rows_r] == [x[col] for x in rows_a], col
    for x, y in zip(rows_a, rows_r):
        if int(x["step"]) % 2 == 0:  # same weights, same eval set: same accuracy
            assert (x["eval_acc"], x["dev_acc"]) == (y["eval_acc"], y["dev_acc"])
    ca = torch.load(a / "checkpoint.pt", weights_only=False)
    cr = torch.load(r / "checkpoint.pt", weights_only=False)
    assert ca["step"] == cr["step"] == 6 and ca["engine"] == cr["engine"]
    assert ca["model"].keys() == cr["model"].keys()
    for k in ca["model"]:
        assert torch.equal(ca["model"][k], cr["model"][k]), k
    summary = json.loads((r / "summary.json").read_text())
    assert summary["steps"] == 6
    assert summary["final_loss"] == json.loads((a / "summary.json").read_text())["final_loss"]


def test_resumed_smoothness_log_has_no_duplicate_steps(resume_runs):
    a, r = resume_runs["A"], resume_runs["B"]
    assert not (resume_runs["C"] / "smoothness.csv").exists()
    header, rows_r = read_csv(r / "smoothness.csv")
    assert tuple(header) == SMOOTHNESS_FIELDS
    keys = [(int(x["step"]), x["block"]) for x in rows_r]
    assert len(keys) == len(set(keys))
    rows_a = _rows(a / "smoothness.csv")
    blocks = {x["block"] for x in rows_a}
    assert {"base", "peft"} <= blocks
    assert sorted(keys) == sorted((s, b) for s in (0, 2, 4, 6) for b in blocks)
    assert len(rows_a) == len(rows_r)
    by_key = {(int(x["step"]), x["block"]): x for x in rows_a}
    for x in rows_r:  # same weights and probe seeds: same estimates
        y = by_key[(int(x["step"]), x["block"])]
        for col in ("estimate", "stderr", "num_hvp", "grad_norm"):
            assert x[col] == y[col], (x["step"], x["block"], col)


def test_resume_state_before_and_after(resume_runs):
    # B after 3 steps logged steps 1..3 and probes at 0 and 2 only
    half = resume_runs["b_half"]["metrics.csv"].decode().splitlines()
    assert [line.split(",")[0] for line in half[1:]] == ["1", "2", "3"]
    # the crash left row 5 beyond checkpoint 4; the resume dropped and redid it
    assert resume_runs["c_crashed"] == [1, 2, 3, 4, 5]
    assert resume_runs["c_ckpt_step"] == 4
    # config.json tells the resumed run: the final steps and where it resumed from
    config = json.loads((resume_runs["B"] / "config.json").read_text())
    assert config["steps"] == 6 and config["resumed_from"] == 3
    assert load_config(resume_runs["B"]).steps == 6


def test_resume_with_another_method_is_refused(resume_runs):
    a = resume_runs["A"]
    model = json.loads((a / "config.json").read_text())["model"]
    cfg = TrainConfig(method="hybrid-prompt", model=model, steps=8, out=str(a), **SMALL)
    before = (a / "metrics.csv").read_bytes()
    with pytest.raises(UsageError, match="hybrid-lora"):
        train(cfg, progress=False)
    assert (a / "metrics.csv").read_bytes() == before


def test_rerun_of_finished_run_is_a_no_op(resume_runs):
    a = resume_runs["A"]
    files = ("metrics.csv", "smoothness.csv", "checkpoint.pt", "summary.json", "best.pt")
    before = {f: (a / f).read_bytes() for f in files}
    cfg = load_config(a)
    train(cfg, progress=False)
    for f, data in before.items():
        assert (a / f).read_bytes() == data, f


@pytest.mark.parametrize(
    "changes,words",
    [
        ({"method": "sgd-lora"}, ["'sgd-lora'", "zo-ft", "hybrid-prefix"]),
        ({"lr_base": -1e-3}, ["lr_base", "-0.001", ">= 0"]),
        ({"lr_peft": -1.0}, ["lr_peft", "-1.0", ">= 0"]),
        ({"lr_peft": float("nan")}, ["lr_peft", "nan", "finite"]),
        ({"q": 0}, ["q", "0", "positive integer"]),
        ({"mu": 0.0}, ["mu", "0.0", "positive"]),
        ({"mu": -1e-3}, ["mu", "-0.001", "positive"]),
        ({"steps": 0}, ["steps", "0", "positive integer"]),
        ({"record_batch": "random"}, ["'random'", "fixed", "current"]),
    ],
)
def test_bad_config_raises_usage_error_before_touching_disk(changes, words, tmp_path):
    cfg = TrainConfig(out=str(tmp_path / "never"), **(SMALL | changes))
    with pytest.raises(UsageError) as info:
        train(cfg, progress=False)
    msg = str(info.value)
    for w in words:
        assert w in msg, msg
    assert not (tmp_path / "never").exists()


def test_split_parameters_partitions_the_model(models):
    for method, model in [("hybrid-lora", "opt"), ("hybrid-prompt", "opt"), ("hybrid-lora", "enc")]:
        cfg = TrainConfig(method=method, model=str(models[model]), **SMALL)
        params, zo, fo = initial_parameters(cfg)
        assert zo and fo and not (zo & fo)
        trainable = {n for n in params if ".original_module." not in n}
        assert zo | fo == trainable
        assert all(("lora_" in n or "prompt_encoder" in n or "modules_to_save" in n) for n in fo)


def test_split_follows_the_method_registry(models):
    """x and y of every registered method are what its registry entry says."""
    for name in method_names():
        m = get_method(name)
        cfg = TrainConfig(method=name, model=str(models["opt"]), **SMALL)
        params, zo, fo = initial_parameters(cfg)
        trainable = {n for n in params if ".original_module." not in n}
        assert (zo == trainable) == (m.zo == "all") and (fo == trainable) == (m.fo == "all"), name
        assert bool(zo) == m.has_zo and bool(fo) == m.has_fo, name
        if m.fo == "peft":
            assert fo and all(
                ("lora_" in n or "prompt_encoder" in n or "modules_to_save" in n) for n in fo
            )
        if m.zo == "base":
            assert zo == trainable - fo


def test_trainer_writes_nothing_until_run(models, tmp_path):
    out = tmp_path / "run"
    trainer = Trainer(
        TrainConfig(model=str(models["opt"]), steps=2, eval_every=2, out=str(out), **SMALL),
        progress=False,
    )
    assert not out.exists()  # data and model are loaded; a failure so far leaves no folder
    assert trainer.run() == out and (out / "summary.json").is_file()


def test_missing_model_or_data_leaves_no_run_folder(tmp_path):
    for changes in ({"model": str(tmp_path / "no_model")}, {"data": str(tmp_path / "no.tsv")}):
        out = tmp_path / "run"
        with pytest.raises(UsageError):
            train(TrainConfig(out=str(out), **(SMALL | changes)), progress=False)
        assert not out.exists()


def test_divergence_is_a_usage_error_that_calibration_can_catch(models, tmp_path):
    cfg = TrainConfig(
        method="fo-ft",
        model=str(models["opt"]),
        steps=6,
        eval_every=6,
        out=str(tmp_path / "r"),
        **(SMALL | {"lr_peft": 1e12}),
    )
    with pytest.raises(Diverged, match="lower the learning rates") as info:
        train(cfg, progress=False)
    assert isinstance(info.value, UsageError) and isinstance(info.value, FloatingPointError)
    rows = _rows(tmp_path / "r" / "metrics.csv")
    loss = rows[-1]["loss"]  # the diverged step is logged (nan is written as an empty cell)
    assert loss == "" or not math.isfinite(float(loss))


@pytest.mark.parametrize("checkpoint", ["seeds", "full"])
def test_a_nan_loss_with_a_seed_log_is_diverged_and_logged(models, tmp_path, checkpoint):
    """zo-ft at lr 1e8: the loss becomes nan within a few steps. With a seed log the step's
    entry was appended (and refused as a plain ValueError) before the divergence check."""
    cfg = TrainConfig(
        method="zo-ft",
        model=str(models["enc"]),
        steps=40,
        eval_every=40,
        checkpoint=checkpoint,
        diverge_factor=0.0,
        out=str(tmp_path / "r"),
        **(SMALL | {"lr_base": 1e8}),
    )
    with pytest.raises(Diverged, match="lower the learning rates"):
        train(cfg, progress=False)
    rows = _rows(tmp_path / "r" / "metrics.csv")
    assert rows[-1]["loss"] == "" or not math.isfinite(float(rows[-1]["loss"]))
    if checkpoint == "seeds":  # header + one entry per finite step, none for the diverged one
        lines = (tmp_path / "r" / "seeds.jsonl").read_text().splitlines()
        assert len(lines) == len(rows) and "NaN" not in lines[-1]


def test_eval_and_dev_files_are_passed_to_the_data_loader(monkeypatch, models, tmp_path):
    import smoothlab.hybrid.train as ht

    seen: list[dict] = []
    real = ht.load_task_data

    def spy(*args, **kwargs):
        seen.append(dict(kwargs))
        kwargs.pop("eval_data", None), kwargs.pop("dev_data", None)
        return real(*args, **kwargs)

    monkeypatch.setattr(ht, "load_task_data", spy)
    build(TrainConfig(model=str(models["opt"]), **SMALL))
    build(TrainConfig(model=str(models["opt"]), eval_data="val.tsv", dev_data="dev.tsv", **SMALL))
    assert "eval_data" not in seen[0] and "dev_data" not in seen[0]
    assert seen[1]["eval_data"] == "val.tsv" and seen[1]["dev_data"] == "dev.tsv"


def _loader_takes_eval_data() -> bool:
    import inspect

    from smoothlab.hybrid.data import load_task_data

    return "eval_data" in inspect.signature(load_task_data).parameters


@pytest.mark.skipif(
    not _loader_takes_eval_data(),
    reason="smoothlab.hybrid.data.load_task_data has no eval_data= yet",
)
def test_eval_data_file_is_the_eval_set(models, tmp_path):
    val = tmp_path / "val.tsv"
    texts = [f"held out sentence number {i}" for i in range(6)]
    val.write_text("sentence\tlabel\n" + "".join(f"{t}\t{i % 2}\n" for i, t in enumerate(texts)))
    _, _, splits = build(
        TrainConfig(model=str(models["opt"]), eval_data=str(val), **(SMALL | {"eval_size": 6}))
    )
    assert sorted(e.text for e in splits.eval) == sorted(texts)


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_a_damaged_checkpoint_is_named_not_a_traceback(resume_runs, tmp_path, damage):
    """Resume and export read checkpoint.pt; a truncated or garbage file is a UsageError
    naming it (resume: with --restart as the way out), and the logs are untouched."""
    import shutil

    from smoothlab.hybrid.train import load_trained

    run = tmp_path / "run"
    shutil.copytree(resume_runs["A"], run)
    ckpt = run / "checkpoint.pt"
    data = ckpt.read_bytes()
    ckpt.write_bytes(b"garbage\n\x00" if damage == "garbage" else data[: len(data) // 2])
    before = (run / "metrics.csv").read_bytes()
    cfg = replace(load_config(run), steps=8, out=str(run))
    with pytest.raises(UsageError, match=r"checkpoint.pt is not a readable checkpoint .*--restart"):
        train(cfg, progress=False)
    assert (run / "metrics.csv").read_bytes() == before
    with pytest.raises(UsageError, match=r"checkpoint.pt is not a readable checkpoint .*damaged"):
        load_trained(run)


def test_load_trained_names_a_device_this_machine_lacks(resume_runs):
    from smoothlab.hybrid.train import load_trained

    with pytest.raises(UsageError, match="device 'banana' is not a device"):
        load_trained(resume_runs["A"], device="banana")
