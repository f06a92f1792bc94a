"""smoothlab.hybrid.config and smoothlab.hybrid.presets: one declaration per option, config files, presets,
and the checks that turn bad input into UsageError."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from smoothlab.errors import UsageError
from smoothlab.hybrid.config import (
    AdviseConfig,
    Figure1Config,
    ProbeConfig,
    TrainConfig,
    check_out,
    config_from_dict,
    load_config_file,
    resolve_device,
)
from smoothlab.hybrid.presets import FIGURE1_PRESETS, default_figure1, figure1_runs, paper_figure1
from smoothlab.methods import method_names, peft_kinds

CONFIGS = (TrainConfig, ProbeConfig, AdviseConfig, Figure1Config)


@pytest.mark.parametrize("cls", CONFIGS)
def test_every_option_has_help_and_the_defaults_validate(cls) -> None:
    for f in dataclasses.fields(cls):
        assert f.metadata.get("help"), f"{cls.__name__}.{f.name} has no help"
    cls().validate()


def test_choices_come_from_the_registries() -> None:
    from smoothlab.estimators import NORMS
    from smoothlab.hvp import HVPS

    meta = {f.name: f.metadata for f in dataclasses.fields(TrainConfig)}
    assert meta["method"]["choices"]() == method_names()
    assert meta["record_norm"]["choices"]() == tuple(NORMS)
    assert meta["record_hvp"]["choices"]() == tuple(HVPS)
    probe = {f.name: f.metadata for f in dataclasses.fields(ProbeConfig)}
    assert probe["peft"]["choices"]() == ("none", *peft_kinds())


def test_shared_options_have_one_default() -> None:
    t, a = TrainConfig(), AdviseConfig()
    for name in ("q", "one_sided", "train_size", "eval_size", "dev_size", "eval_data", "dev_data"):
        assert getattr(t, name) == getattr(a, name), name
    for name in ("model", "task", "data", "batch_size", "seed", "device", "lora_r", "lora_alpha"):
        assert getattr(t, name) == getattr(ProbeConfig(), name) == getattr(a, name), name
    assert a.pilot_config() == TrainConfig(method="hybrid-lora")


@pytest.mark.parametrize(
    ("changes", "words"),
    [
        ({"seed": 2**63}, ["seed", str(2**63), "2**63-1"]),
        ({"seed": -1}, ["seed", "-1"]),
        ({"data_seed": True}, ["data_seed", "True"]),
        ({"method": "sgd"}, ["'sgd'", "hybrid-lora"]),
        ({"record_hvp": "magic"}, ["'magic'", "fd-central"]),
        ({"out": ""}, ["out must not be empty"]),
        ({"device": "tpu"}, ["'tpu'", "cuda:N"]),
        ({"eval_examples": 0}, ["eval_examples", "0"]),
        ({"task": "mnli"}, ["'mnli'", "sst2"]),
        # a config file's "false" is a true string: it switched the option on
        ({"fo_at_perturbed": "false"}, ["fo_at_perturbed must be true or false", "'false'"]),
        ({"one_sided": 1}, ["one_sided must be true or false", "1"]),
        ({"out": None}, ["out must be a text", "None"]),
        ({"eval_data": 3}, ["eval_data must be a text or null", "3"]),
        ({"model": ["a"]}, ["model must be a text or null", "['a']"]),
        ({"max_length": 1}, ["max_length must be an integer >= 2", "1"]),
    ],
)
def test_bad_values_are_usage_errors(changes: dict, words: list[str]) -> None:
    with pytest.raises(UsageError) as info:
        TrainConfig(**changes).validate()
    for w in words:
        assert w in str(info.value), str(info.value)


def test_resolve_device() -> None:
    import torch

    assert resolve_device("cpu") == "cpu"
    assert resolve_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.backends.mps.is_available():
        with pytest.raises(UsageError, match="MPS is not available"):
            resolve_device("mps")
    if not torch.cuda.is_available():
        with pytest.raises(UsageError, match="CUDA is not available"):
            resolve_device("cuda:0")


def test_check_out(tmp_path: Path) -> None:
    f = tmp_path / "f"
    f.write_text("x")
    check_out(tmp_path / "new" / "deeper", "out")  # a folder to be created: fine
    check_out(tmp_path, "out")  # an existing folder: fine
    with pytest.raises(UsageError, match="is a file"):
        check_out(f, "out")
    with pytest.raises(UsageError, match="which is a file"):
        check_out(f / "a" / "b", "out")
    with pytest.raises(UsageError, match="is a folder"):
        check_out(tmp_path, "out", kind="file")
    with pytest.raises(UsageError, match="must not be empty"):
        check_out("  ", "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f"]  # checks create nothing


def test_config_files_json_and_yaml(tmp_path: Path) -> None:
    (tmp_path / "a.json").write_text(json.dumps({"steps": 5, "lr_base": 1e-4, "method": "zo-ft"}))
    (tmp_path / "a.yaml").write_text("steps: 5\nlr_base: 1e-4\nmethod: zo-ft\n")
    (tmp_path / "m.yml").write_text("multipliers: [0.5, 2]\n")
    expected = TrainConfig(steps=5, lr_base=1e-4, method="zo-ft")
    assert load_config_file(tmp_path / "a.json", TrainConfig) == expected
    assert load_config_file(tmp_path / "a.yaml", TrainConfig) == expected  # "1e-4" -> 1e-4
    assert load_config_file(tmp_path / "m.yml", AdviseConfig).multipliers == (0.5, 2)
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(UsageError, match="expected a mapping"):
        load_config_file(tmp_path / "list.yaml", TrainConfig)


def test_a_run_folders_config_json_is_a_config_file(tmp_path: Path) -> None:
    """What train writes into config.json beside the options (block sizes, versions, ...)
    is dropped, and its steps already hold any extension (README: --config runs/h1/...)."""
    from smoothlab.hybrid.config import RUN_RECORD_KEYS

    record = dataclasses.asdict(TrainConfig(steps=30, extend_steps=10, method="zo-ft"))
    record |= {k: 1 for k in RUN_RECORD_KEYS} | {"steps": 40}
    (tmp_path / "config.json").write_text(json.dumps(record))
    cfg = load_config_file(tmp_path / "config.json", TrainConfig)
    assert cfg == TrainConfig(steps=40, method="zo-ft")
    with pytest.raises(UsageError, match="unknown key"):  # only a whole run record
        config_from_dict(TrainConfig, {"steps": 3, "block_sizes": {}})


def test_unknown_keys_are_named_with_the_accepted_ones() -> None:
    with pytest.raises(UsageError) as info:
        config_from_dict(ProbeConfig, {"norm": "rms", "vectorz": 3}, "probe.yaml")
    msg = str(info.value)
    assert "probe.yaml" in msg and "'vectorz'" in msg and "accepted:" in msg and "vectors" in msg


def test_figure1_presets_are_named_factories(tmp_path: Path) -> None:
    assert FIGURE1_PRESETS == {"default": default_figure1, "paper": paper_figure1}
    paper = paper_figure1()
    assert (
        paper.model,
        paper.steps,
        paper.batch_size,
        paper.vectors,
        paper.h,
        paper.record_every,
    ) == ("facebook/opt-125m", 5000, 8, 100, 1e-5, 100)
    assert paper_figure1() is not paper  # a fresh config each call
    runs = figure1_runs(dataclasses.replace(default_figure1(), out=str(tmp_path)))
    a, b = runs["fig1a"], runs["fig1b"]
    assert (a.method, b.method) == ("fo-ft", "hybrid-lora")
    d = default_figure1()
    assert a.lr_peft == d.lr_fo and (b.lr_base, b.lr_peft) == (d.lr_base, d.lr_peft)
    assert a.record_vectors == b.record_vectors == d.vectors and a.record_every == d.record_every
    assert a.out == str(tmp_path / "fig1a_fo-ft")
    for cfg in runs.values():
        cfg.validate()


def test_rates_accept_auto_and_record_blocks_are_checked() -> None:
    from smoothlab.hybrid.config import parse_rate

    assert parse_rate("auto") == "auto" and parse_rate(" AUTO ") == "auto"
    assert parse_rate("1e-3") == 1e-3
    with pytest.raises(UsageError, match="expected a number or 'auto', got 'fast'"):
        parse_rate("fast")
    cfg = TrainConfig(lr_base="auto", lr_peft=0.1)
    cfg.validate()
    assert cfg.auto_rates == ("lr_base",) and TrainConfig().auto_rates == ()
    for bad in ("Auto", -1.0, float("inf"), None):
        with pytest.raises(UsageError, match="lr_peft must be a finite number >= 0 or 'auto'"):
            TrainConfig(lr_peft=bad).validate()
    for ok in ("layers", "kinds", "a=*attention*,m=re:.*intermediate.*"):
        TrainConfig(record_every=5, record_blocks=ok).validate()
    for bad in ("hybrid", "a=", "=x", "a=*q*,b"):
        with pytest.raises(UsageError, match="record_blocks .* is not accepted"):
            TrainConfig(record_every=5, record_blocks=bad).validate()
    with pytest.raises(UsageError, match="needs record_every > 0"):
        TrainConfig(record_blocks="layers").validate()
    # Figure1 passes record_blocks to both of its runs
    runs = figure1_runs(dataclasses.replace(Figure1Config(), record_blocks="kinds"))
    assert {r.record_blocks for r in runs.values()} == {"kinds"}


def test_dist_timeout_range_is_the_options_check(tmp_path: Path, capsys, monkeypatch) -> None:
    """--dist-timeout is checked by its config field (CLI, config files, the API) and the help
    states the range; smoothlab.hybrid.distributed.init uses that same check, not a copy."""
    from smoothlab.cli import main
    from smoothlab.hybrid import config as C
    from smoothlab.hybrid import distributed as D

    for bad in (0.5, 604801, float("inf"), True):
        with pytest.raises(UsageError, match=r"dist_timeout must be .* from 1 to 604800"):
            TrainConfig(dist_timeout=bad).validate()
    TrainConfig(dist_timeout=1).validate()
    TrainConfig(dist_timeout=604800).validate()
    (tmp_path / "c.json").write_text(json.dumps({"dist_timeout": 1e9}))
    assert main(["train", "--config", str(tmp_path / "c.json"), "--out", str(tmp_path)]) == 2
    assert "from 1 to 604800" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    assert "(1 to 604800, a week)" in " ".join(capsys.readouterr().out.split())
    calls = []
    monkeypatch.setattr(D, "dist_timeout_seconds", lambda *a: calls.append(a))
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setattr(D, "_world", D._world)  # restored after the test
    assert D.init(timeout_s=5).timeout_s == 5.0
    assert calls == [("timeout_s (--dist-timeout)", 5)]
    assert C.DIST_TIMEOUT_RANGE == (1.0, 604800.0)
