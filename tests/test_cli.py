"""The `smoothlab` command end to end on tiny models: probe, train, advise, report, figure1,
and every user error as one line on stderr with exit status 2."""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from smoothlab.cli import main
from smoothlab.errors import UsageError

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")

SST2 = Path(__file__).resolve().parents[2] / "shared" / "data" / "sst2" / "train.tsv"


@pytest.fixture(scope="module")
def enc(tmp_path_factory) -> Path:
    from tests.tiny_models import tiny_encoder

    root = tmp_path_factory.mktemp("cli_enc")
    tiny_encoder(seed=0, save_dir=root)
    return root


@pytest.fixture(scope="module")
def recorded_run(enc: Path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cli_runs") / "h"
    rc = main(
        [
            "train",
            "--model",
            str(enc),
            "--method",
            "hybrid-lora",
            "--steps",
            "6",
            "--batch-size",
            "4",
            "--eval-every",
            "3",
            "--train-size",
            "24",
            "--eval-size",
            "8",
            "--dev-size",
            "8",
            "--lr-base",
            "1e-3",
            "--lr-peft",
            "1e-2",
            "--record-every",
            "2",
            "--record-vectors",
            "3",
            "--lora-r",
            "2",
            "--out",
            str(out),
        ]
    )
    assert rc == 0
    return out


def test_probe_prints_table_and_writes_json(enc: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "probe.json"
    rc = main(
        [
            "probe",
            "--model",
            str(enc),
            "--peft",
            "lora",
            "--lora-r",
            "2",
            "--batch-size",
            "4",
            "--vectors",
            "5",
            "--hvp",
            "exact",
            "--out",
            str(out),
        ]
    )
    assert rc == 0
    text = capsys.readouterr().out
    assert "base" in text and "peft" in text and "L_base / L_peft" in text
    data = json.loads(out.read_text())
    assert set(data["blocks"]) == {"base", "peft"}
    for b in data["blocks"].values():
        assert b["value"] > 0 and math.isfinite(b["value"]) and b["num_hvp"] <= 5
    # the table's numbers are the JSON's numbers
    assert f"{data['blocks']['base']['value']:.5g}" in text


def test_probe_frobenius_on_real_sst2_file(enc: Path, capsys) -> None:
    if not SST2.exists():
        pytest.skip("shared SST-2 file not present")
    rc = main(
        [
            "probe",
            "--model",
            str(enc),
            "--data",
            str(SST2),
            "--blocks",
            "layers",
            "--norm",
            "frobenius",
            "--hvp",
            "fd",
            "--vectors",
            "4",
            "--batch-size",
            "4",
        ]
    )
    assert rc == 0
    text = capsys.readouterr().out
    assert "layer.0" in text and "layer.1" in text and "embeddings" in text


def _one_line_exit_2(argv: list[str], capsys) -> str:
    """Run the CLI; assert exit 2 with exactly one stderr line and no traceback; the line."""
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == 2, err
    assert len(err.strip().splitlines()) == 1, err
    assert "Traceback" not in err
    return err


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["probe", "--norm", "max"], "invalid choice: 'max'"),
        (["probe", "--hvp", "magic"], "invalid choice: 'magic'"),
        (["probe", "--peft", "adapterx"], "invalid choice: 'adapterx'"),
        (["probe", "--vectors", "0"], "vectors must be a positive integer, got 0"),
        (["probe", "--vectors", "two"], "expected an integer, got 'two'"),
        (["probe", "--h", "-1"], "h must be a positive finite number, got -1.0"),
        (["probe", "--data", "/nonexistent/file.tsv", "--model", "MODEL"], "/nonexistent/file.tsv"),
        (["probe", "--model", "/no/such/model_dir"], "/no/such/model_dir"),
        (["probe", "--model", "MODEL", "--blocks", "nosuchpreset"], "nosuchpreset"),
        (["probe", "--model", "MODEL", "--blocks", "q=*nothing_matches*"], "matches no parameter"),
        (["probe", "--model", "MODEL", "--device", "cuda:7"], "cuda:7"),
        (["probe", "--device", "tpu"], "'tpu' is not a device"),
        (["train", "--method", "sgd"], "invalid choice: 'sgd'"),
        (
            ["train", "--lr-base", "-1"],
            "--lr-base must be a finite number >= 0 or 'auto', got -1.0",
        ),
        (
            ["train", "--lr-peft", "nan"],
            "--lr-peft must be a finite number >= 0 or 'auto', got nan",
        ),
        (["train", "--lr-peft", "fast"], "expected a number or 'auto', got 'fast'"),
        (["train", "--advise-rule", "exact"], "invalid choice: 'exact'"),
        (["train", "--record-blocks", "heads"], "--record-blocks 'heads' is not accepted"),
        (["train", "--record-blocks", "layers"], "needs record_every > 0"),
        (["advise", "--method", "sgd"], "invalid choice: 'sgd'"),
        (["train", "--seed", str(2**63)], f"seed must be an integer in [0, 2**63-1], got {2**63}"),
        (["train", "--seed", "-1"], "seed must be an integer in [0, 2**63-1], got -1"),
        (["probe", "--seed", str(10**30)], "seed must be an integer in [0, 2**63-1]"),
        (["train", "--peft", "lora"], "use --method fo-lora or hybrid-lora"),
        (["train", "--out", ""], "out must not be empty"),
        (["probe", "--out", ""], "out must not be empty"),
        (["advise", "--out", ""], "out must not be empty"),
        (["figure1", "--out", ""], "out must not be empty"),
        (["train", "--config", "/no/such/config.yaml"], "/no/such/config.yaml"),
        (["train", "--config", "settings.toml"], "accepted suffixes are .json, .yaml, .yml"),
        (["advise", "--calibrate", "--multipliers", "0,2"], "multipliers must be positive numbers"),
        (
            ["advise", "--calibrate", "--multipliers", "a,b"],
            "expected comma-separated positive numbers, got 'a,b'",
        ),
        (["advise", "--quantile", "1.5"], "quantile must be a number in [0, 1], got 1.5"),
        (["report", "/no/such/run"], "/no/such/run"),
        (["advise", "--run", "/no/such/run"], "/no/such/run"),
        (["frobnicate"], "invalid choice: 'frobnicate'"),
    ],
)
def test_user_errors_are_one_line_exit_2(argv: list[str], needle: str, enc: Path, capsys) -> None:
    import torch

    if "cuda:7" in argv and torch.cuda.is_available():
        pytest.skip("a machine with CUDA may have a device 7")
    argv = [str(enc) if a == "MODEL" else a for a in argv]
    assert needle in _one_line_exit_2(argv, capsys)


def test_mps_on_a_machine_without_it_is_a_usage_error(capsys) -> None:
    import torch

    if torch.backends.mps.is_available():
        pytest.skip("this machine has MPS")
    for cmd in ("probe", "train", "advise", "figure1"):
        assert "'mps': MPS is not available" in _one_line_exit_2([cmd, "--device", "mps"], capsys)


def test_out_onto_or_under_a_file_is_refused_before_any_work(tmp_path: Path, capsys) -> None:
    file = tmp_path / "afile"
    file.write_text("keep me\n")
    folder = tmp_path / "adir"
    folder.mkdir()
    # a missing model would be the error if the model were loaded first: --out is checked before
    model = ["--model", str(tmp_path / "no_model")]
    cases = [
        (["train", "--out", str(file)], "is a file"),
        (["train", "--out", str(file / "run")], "which is a file"),
        (["probe", "--out", str(file / "p.json")], "which is a file"),
        (["probe", "--out", str(folder)], "is a folder"),
        (["advise", "--out", str(file)], "is a file"),
        (["advise", "--out", str(file / "sub")], "which is a file"),
        (["advise", "--out", str(file / "advice.json")], "which is a file"),
        (["figure1", "--out", str(file)], "is a file"),
        (["report", str(tmp_path), "--out", str(file)], "is a file"),
    ]
    (tmp_path / "config.json").write_text("{}")
    for argv, needle in cases:
        err = _one_line_exit_2(argv + model if argv[0] != "report" else argv, capsys)
        assert needle in err and ("no_model" not in err), (argv, err)
    assert file.read_text() == "keep me\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adir", "afile", "config.json"]
    assert list(folder.iterdir()) == []  # no adir.tmp, nothing written into it


@pytest.mark.parametrize("bad", ["--model", "--data", "--blocks-or-method"])
def test_failed_train_leaves_no_run_folder(bad: str, enc: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "run"
    argv = ["train", "--model", str(enc), "--steps", "1", "--out", str(out)]
    if bad == "--model":
        argv += ["--model", str(tmp_path / "missing_model")]
    elif bad == "--data":
        argv += ["--data", str(tmp_path / "missing.tsv")]
    else:
        bad_csv = tmp_path / "bad.csv"
        bad_csv.write_text("words,stars\nhello,5\n")
        argv += ["--data", str(bad_csv)]
    _one_line_exit_2(argv, capsys)
    assert not out.exists()


def _fake_run(root: Path, config: object, blocks: tuple[str, ...]) -> Path:
    root.mkdir(parents=True)
    (root / "config.json").write_text(config if isinstance(config, str) else json.dumps(config))
    lines = ["step,epoch,block,estimate"] + [f"{s},0,{b},{1.0 + s}" for s in (0, 1) for b in blocks]
    (root / "smoothness.csv").write_text("\n".join(lines) + "\n")
    return root


def test_advise_on_runs_it_cannot_use_is_a_usage_error(tmp_path: Path, capsys) -> None:
    fo_ft = _fake_run(
        tmp_path / "fo", {"method": "fo-ft", "block_sizes": {"model": 100}}, ("model",)
    )
    assert "'fo-ft' run has blocks ['model']" in _one_line_exit_2(
        ["advise", "--run", str(fo_ft)], capsys
    )
    no_sizes = _fake_run(tmp_path / "ns", {"method": "hybrid-lora"}, ("base", "peft"))
    assert "no block_sizes" in _one_line_exit_2(["advise", "--run", str(no_sizes)], capsys)
    broken = _fake_run(tmp_path / "br", "{not json", ("base", "peft"))
    assert "not valid JSON" in _one_line_exit_2(["advise", "--run", str(broken)], capsys)
    no_rows = _fake_run(tmp_path / "nr", {"block_sizes": {"base": 9, "peft": 3}}, ())
    assert "blocks 'base' and 'peft'" in _one_line_exit_2(["advise", "--run", str(no_rows)], capsys)


def test_config_file_unknown_keys_name_them_and_the_accepted_ones(tmp_path: Path, capsys) -> None:
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps({"steps": 3, "lr": 0.1, "peft": "lora"}))
    err = _one_line_exit_2(["train", "--config", str(cfg)], capsys)
    assert "unknown key(s) 'lr', 'peft'" in err and "accepted:" in err and "lr_base" in err
    bad = tmp_path / "c.yaml"
    bad.write_text("steps: [1, 2\n")
    assert "not valid YAML" in _one_line_exit_2(["train", "--config", str(bad)], capsys)
    wrong = tmp_path / "w.yaml"
    wrong.write_text("steps: three\n")
    assert "steps must be a positive integer, got 'three'" in _one_line_exit_2(
        ["train", "--config", str(wrong)], capsys
    )


def test_config_file_then_only_typed_flags_override(tmp_path: Path) -> None:
    from smoothlab.cli import _config, build_parser
    from smoothlab.hybrid.config import TrainConfig

    cfg_file = tmp_path / "c.yaml"
    # YAML reads 1e-3 as a string: the loader turns it into the float field's number
    cfg_file.write_text("method: fo-lora\nsteps: 7\nlr_peft: 0.5\nlr_base: 1e-3\none_sided: true\n")
    args = build_parser().parse_args(
        ["train", "--config", str(cfg_file), "--steps", "1000", "--q", "3", "--no-one-sided"]
    )
    cfg = _config(args, TrainConfig, TrainConfig())
    default = TrainConfig()
    # typed flags win, even when they equal the default (steps=1000 is TrainConfig's default)
    assert cfg.steps == 1000 and cfg.q == 3 and cfg.one_sided is False
    # untyped options keep the file's values, not the dataclass defaults
    assert (
        (cfg.method, cfg.lr_peft, cfg.lr_base)
        == ("fo-lora", 0.5, 1e-3)
        != (default.method, default.lr_peft, default.lr_base)
    )
    # and options neither in the file nor typed are the one default
    assert cfg.batch_size == default.batch_size and cfg.mu == default.mu
    # without --config the typed flags apply to the defaults
    cfg2 = _config(
        build_parser().parse_args(["train", "--lr-peft", "0.25"]), TrainConfig, TrainConfig()
    )
    assert cfg2 == TrainConfig(lr_peft=0.25)


def test_train_from_config_file_with_override(enc: Path, tmp_path: Path, capsys) -> None:
    cfg_file = tmp_path / "run.json"
    out = tmp_path / "run"
    cfg_file.write_text(
        json.dumps(
            {
                "model": str(enc),
                "method": "fo-lora",
                "steps": 5,
                "batch_size": 4,
                "train_size": 16,
                "eval_size": 8,
                "dev_size": 8,
                "eval_every": 2,
                "lora_r": 2,
                "lr_peft": 0.05,
                "out": str(tmp_path / "elsewhere"),
            }
        )
    )
    assert main(["train", "--config", str(cfg_file), "--steps", "2", "--out", str(out)]) == 0
    saved = json.loads((out / "config.json").read_text())
    assert saved["steps"] == 2 and saved["method"] == "fo-lora" and saved["lr_peft"] == 0.05
    assert saved["batch_size"] == 4 and saved["lora_r"] == 2 and saved["num_zo_params"] == 0
    assert not (tmp_path / "elsewhere").exists()
    with (out / "metrics.csv").open() as fh:
        assert [r["step"] for r in csv.DictReader(fh)] == ["1", "2"]


def test_each_option_has_one_default_across_subcommands() -> None:
    """Flags shared by subcommands show the same default in every subcommand's help
    (figure1's are its preset's, said in its group title)."""
    import re

    from smoothlab.cli import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    seen: dict[str, dict[str, str]] = {}
    for name, parser in sub.choices.items():
        if name == "figure1":
            continue
        for act in parser._actions:
            if (
                act.option_strings
                and act.help
                and (m := re.search(r"\(default: ([^)]*)\)", act.help))
            ):
                seen.setdefault(act.option_strings[0], {})[name] = m.group(1)
    shared = {flag: d for flag, d in seen.items() if len(d) > 1}
    assert {"--q", "--eval-size", "--batch-size", "--seed", "--model"} <= set(shared)
    for flag, by_cmd in shared.items():
        if flag in ("--hvp", "--out"):  # different options: the probe's HVP kind, different outputs
            continue
        assert len(set(by_cmd.values())) == 1, (flag, by_cmd)


def test_internal_bug_is_a_traceback_with_exit_1(tmp_path: Path) -> None:
    """A ValueError that is not a UsageError is a bug: no one-line message, exit 1."""
    run = _fake_run(
        tmp_path / "run",
        {"method": "hybrid-lora", "block_sizes": {"base": 9, "peft": 3}},
        ("base", "peft"),
    )
    code = (
        "import sys, smoothlab.advisor as a\n"
        "def boom(*args, **kw): raise ValueError('internal bug in the advisor')\n"
        "a.advise_from_rows = boom\n"
        "from smoothlab.cli import main\n"
        f"sys.exit(main(['advise', '--run', {str(run)!r}]))\n"
    )
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert proc.returncode == 1
    assert "Traceback" in proc.stderr and "ValueError: internal bug in the advisor" in proc.stderr
    assert "smoothlab: error" not in proc.stderr


def test_internal_runtime_error_propagates_from_main(tmp_path: Path, monkeypatch) -> None:
    import smoothlab.advisor

    run = _fake_run(
        tmp_path / "run",
        {"method": "hybrid-lora", "block_sizes": {"base": 9, "peft": 3}},
        ("base", "peft"),
    )

    def boom(*args, **kw):
        raise RuntimeError("bug")

    monkeypatch.setattr(smoothlab.advisor, "advise_from_rows", boom)
    with pytest.raises(RuntimeError, match="bug"):
        main(["advise", "--run", str(run)])


def test_bad_data_file_is_one_line(enc: Path, tmp_path: Path, capsys) -> None:
    bad = tmp_path / "bad.csv"
    bad.write_text("words,stars\nhello,5\n")
    rc = main(["probe", "--model", str(enc), "--data", str(bad)])
    err = capsys.readouterr().err
    assert rc == 2 and "bad.csv" in err and len(err.strip().splitlines()) == 1


def test_console_script_exit_code_without_traceback(tmp_path: Path) -> None:
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    proc = subprocess.run(
        [sys.executable, "-m", "smoothlab.cli", "probe", "--norm", "nope"],
        capture_output=True,
        text=True,
        env=env,
    )
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr


def test_train_writes_run_folder_and_recording(recorded_run: Path) -> None:
    for f in ("config.json", "metrics.csv", "smoothness.csv", "summary.json", "checkpoint.pt"):
        assert (recorded_run / f).exists(), f
    rows = (recorded_run / "smoothness.csv").read_text().strip().splitlines()
    steps = {r.split(",")[0] for r in rows[1:]}
    assert steps == {"0", "2", "4", "6"}
    blocks = {r.split(",")[2] for r in rows[1:]}
    assert blocks == {"base", "peft", "head"}


def test_advise_from_run(recorded_run: Path, tmp_path: Path, capsys) -> None:
    rc = main(["advise", "--run", str(recorded_run), "--out", str(tmp_path)])
    assert rc == 0
    out = capsys.readouterr().out
    advice = json.loads((tmp_path / "advice.json").read_text())
    cfg = json.loads((recorded_run / "config.json").read_text())
    assert advice["d_x"] == cfg["block_sizes"]["base"]
    # the trajectory holds L only: the default is the random-walk cap, from the run's own
    # weights, first minibatches and planned steps; the paper's rate is kept beside it
    assert advice["rule"] == "walk" and advice["steps"] == cfg["steps"]
    assert advice["eta_x"] == pytest.approx(advice["eta_x_walk"]) and advice["weight_norm_x"] > 0
    assert advice["eta_x_paper"] == pytest.approx(
        advice["q"] / (advice["L_x"] * (advice["d_x"] + 1 + advice["q"]))
    )
    # eta_y: the SGD descent lemma, phi_y / L_y, with the paper's 1 / L_y beside it
    assert 0 < advice["signal_y"] <= 1 and advice["eta_y_lemma"] == pytest.approx(1 / advice["L_y"])
    assert advice["eta_y"] == pytest.approx(advice["signal_y"] / advice["L_y"])
    assert "eta_y / eta_x" in out
    assert (
        main(["advise", "--run", str(recorded_run), "--rule", "paper", "--out", str(tmp_path)]) == 0
    )
    paper = json.loads((tmp_path / "advice.json").read_text())
    assert paper["rule"] == "paper" and paper["eta_x"] == pytest.approx(advice["eta_x_paper"])


def test_report_from_run(recorded_run: Path, tmp_path: Path, capsys) -> None:
    rc = main(["report", str(recorded_run), "--out", str(tmp_path)])
    assert rc == 0
    html = (tmp_path / "report.html").read_text()
    assert "data:image/png;base64" in html
    # the run's blocks are table rows (a bare "base" would match "base64")
    assert "d_base (parameters)" in html and "d_peft (parameters)" in html


def test_figure1_on_tiny_model(enc: Path, tmp_path: Path, capsys) -> None:
    argv = [
        "figure1",
        "--model",
        str(enc),
        "--steps",
        "6",
        "--record-every",
        "3",
        "--vectors",
        "3",
        "--batch-size",
        "4",
        "--train-size",
        "24",
        "--eval-size",
        "8",
        "--dev-size",
        "8",
        "--eval-examples",
        "8",
        "--out",
        str(tmp_path),
    ]
    rc = main(argv)
    assert rc == 0
    for f in (
        "fig1a.png",
        "fig1a.pdf",
        "fig1b.png",
        "fig1b.pdf",
        "example23.png",
        "report/report.html",
    ):
        assert (tmp_path / f).exists(), f
    assert "L_base / L_lora" in capsys.readouterr().out
    # a rerun with other values is refused, naming the options figure1 took, not the
    # fields of its runs' configs (fig1a trains at --lr-fo as its lr_peft)
    again = argv + ["--lr-fo", "0.125", "--vectors", "4"]
    err = _one_line_exit_2(again, capsys)
    assert "lr_fo: 0.05 -> 0.125" in err and "vectors: 3 -> 4" in err
    assert "lr_peft" not in err and "record_vectors" not in err


def test_figure1_without_probes_is_refused_before_training(
    enc: Path, tmp_path: Path, capsys
) -> None:
    """Figure 1 plots the probes: --record-every 0 fails at once, not after both runs."""
    argv = ["figure1", "--model", str(enc), "--steps", "2", "--record-every", "0"]
    err = _one_line_exit_2(argv + ["--out", str(tmp_path / "fig")], capsys)
    assert "--record-every 0 turns the probes off, and Figure 1 plots them" in err
    assert "--record-every >= 1" in err
    assert not (tmp_path / "fig").exists()  # no run was started


def test_advise_from_model_with_calibration(enc: Path, tmp_path: Path, capsys) -> None:
    rc = main(
        [
            "advise",
            "--model",
            str(enc),
            "--lora-r",
            "2",
            "--batch-size",
            "4",
            "--vectors",
            "4",
            "--calibrate",
            "--pilot-steps",
            "2",
            "--multipliers",
            "0.5,2",
            "--train-size",
            "16",
            "--eval-size",
            "8",
            "--dev-size",
            "8",
            "--out",
            str(tmp_path),
        ]
    )
    assert rc == 0
    out = capsys.readouterr().out
    assert "calibration table" in out and "calibrated proposal" in out
    with (tmp_path / "calibration.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    # eta_x: zo-ft pilots (the ZO block alone, eta_y = 0) at scales {0.5, 1, 2}, ranked by
    # paired training loss; then eta_y: the method's own pilots at the best x, scales {0.5, 1, 2}
    assert len(rows) == 6
    adv = json.loads((tmp_path / "advice.json").read_text())
    unc = adv["uncalibrated"]
    x_rows, y_rows = rows[:3], rows[3:]
    assert [(r["method"], float(r["scale_x"]), float(r["scale_y"])) for r in x_rows] == [
        ("zo-ft", 0.5, 1.0),
        ("zo-ft", 1.0, 1.0),
        ("zo-ft", 2.0, 1.0),
    ]
    for r in x_rows:
        assert float(r["lr_peft"]) == 0.0
        assert float(r["lr_base"]) == pytest.approx(unc["eta_x"] * float(r["scale_x"]))
    from smoothlab.hybrid.calibrate import select, select_paired

    def pilot(r: dict) -> dict:
        """A csv row as calibrate keeps it: numbers, and the loss curve of its pilot run."""
        num = {k: (v if k in ("run", "method") else float(v)) for k, v in r.items()}
        with (tmp_path / r["run"] / "metrics.csv").open() as fh:
            num["losses"] = [float(m["loss"]) for m in csv.DictReader(fh)]
        assert len(num["losses"]) == 2  # --pilot-steps 2
        return num

    best_x = select_paired([pilot(r) for r in x_rows])["scale_x"]
    assert [r["method"] for r in y_rows] == ["hybrid-lora"] * 3
    assert sorted((float(r["scale_x"]), float(r["scale_y"])) for r in y_rows) == [
        (best_x, 0.5),
        (best_x, 1.0),
        (best_x, 2.0),
    ]
    for r in y_rows:
        assert float(r["lr_peft"]) == pytest.approx(unc["eta_y"] * float(r["scale_y"]))
        assert float(r["lr_base"]) == pytest.approx(unc["eta_x"] * best_x)
    best_y = select([pilot(r) for r in y_rows], scale="scale_y")["scale_y"]
    assert adv["eta_x"] == pytest.approx(unc["eta_x"] * best_x)
    assert adv["eta_y"] == pytest.approx(unc["eta_y"] * best_y)
    assert adv["c_x"] == pytest.approx(unc["c_x"] * best_x)


def test_bad_multipliers_is_a_usage_error(capsys) -> None:
    assert main(["advise", "--calibrate", "--multipliers", "0,2"]) == 2
    assert "multipliers must be positive numbers, got (0.0, 2.0)" in capsys.readouterr().err


def test_calibration_selection_prefers_the_proposal_within_noise() -> None:
    from smoothlab.hybrid.calibrate import select

    def row(s: float, acc: float, loss: float) -> dict:
        return {"scale_x": s, "dev_acc": acc, "final_loss": loss}

    # equal accuracy, losses within 1%: the proposal (scale 1) wins
    assert (
        select([row(0.5, 0.8, 0.5001), row(1.0, 0.8, 0.5003), row(8.0, 0.8, 0.5)], scale="scale_x")[
            "scale_x"
        ]
        == 1.0
    )
    # a clearly lower loss wins; a higher accuracy wins over any loss; diverged pilots lose
    assert select([row(1.0, 0.8, 0.6), row(2.0, 0.8, 0.4)], scale="scale_x")["scale_x"] == 2.0
    assert select([row(1.0, 0.8, 0.3), row(8.0, 0.9, 0.7)], scale="scale_x")["scale_x"] == 8.0
    assert (
        select([row(1.0, 0.5, 0.7), row(8.0, math.nan, math.nan)], scale="scale_x")["scale_x"]
        == 1.0
    )


# --------------------------------------------------------------------------- advise --method
def _advise_argv(enc: Path, *extra: str) -> list[str]:
    return [
        "advise",
        "--model",
        str(enc),
        "--lora-r",
        "2",
        "--batch-size",
        "4",
        "--vectors",
        "3",
        "--train-size",
        "16",
        "--eval-size",
        "8",
        "--dev-size",
        "8",
        *extra,
    ]


def _printed_command(out: str) -> list[str]:
    import shlex

    line = next(ln for ln in out.splitlines() if ln.startswith("command : "))
    argv = shlex.split(line[len("command : ") :])
    assert argv[:2] == ["smoothlab", "train"]
    return argv[1:]


@pytest.mark.parametrize("method", __import__("smoothlab.methods").methods.method_names())
def test_advise_from_nothing_for_every_method(method: str, enc: Path, tmp_path: Path, capsys):
    """x and y are the blocks the method trains: d_x is its ZO parameter count, a rate is
    finite exactly for a block it trains, and the printed command trains with the advice."""
    from smoothlab.cli import _config, build_parser
    from smoothlab.hybrid.config import AdviseConfig, TrainConfig
    from smoothlab.hybrid.train import build, split_parameters
    from smoothlab.methods import get_method

    argv = _advise_argv(enc, "--method", method, "--print-command", "--out", str(tmp_path))
    assert main(argv) == 0
    out = capsys.readouterr().out
    adv = json.loads((tmp_path / "advice.json").read_text())
    cfg = _config(build_parser().parse_args(argv), AdviseConfig, AdviseConfig())
    x, y = split_parameters(build(cfg.pilot_config())[0].model, method)
    m = get_method(method)
    assert adv["d_x"] == sum(p.numel() for p in x) and (adv["d_x"] > 0) == m.has_zo
    assert math.isfinite(adv["eta_x"]) == m.has_zo and math.isfinite(adv["eta_y"]) == m.has_fo
    assert math.isfinite(adv["L_y"]) == m.has_fo == bool(y)
    assert f"source: {method}:" in out and "eta_y / eta_x" in out
    # the printed command is a valid `smoothlab train` line using the advised rates
    targs = build_parser().parse_args(_printed_command(out))
    tcfg = _config(targs, TrainConfig, TrainConfig())
    assert tcfg.method == method and tcfg.model == str(enc) and tcfg.batch_size == 4
    want_x = float(f"{adv['eta_x']:.3g}") if m.has_zo else 0.0
    want_y = float(f"{adv['eta_y']:.3g}") if m.has_fo else 0.0
    assert (tcfg.lr_base, tcfg.lr_peft) == (want_x, want_y)
    assert ("with --lr-base auto the run probes itself" in out) == (
        m.has_zo and math.isfinite(adv["eta_x_walk"])
    )


def test_advise_rule_paper_is_the_papers_formula(enc: Path, tmp_path: Path, capsys) -> None:
    argv = _advise_argv(enc, "--method", "zo-ft", "--rule", "paper", "--out", str(tmp_path))
    assert main(argv) == 0
    adv = json.loads((tmp_path / "advice.json").read_text())
    assert adv["rule"] == "paper"
    # Gaussian z (kappa = 3): eta_x = q / (L_x (d_x + 1 + q)), nothing scaled by the joint model
    want = adv["q"] / (adv["L_x"] * (adv["d_x"] + 1 + adv["q"]))
    assert adv["eta_x"] == pytest.approx(want * adv["joint_scale"], rel=1e-12)
    assert adv["eta_x_paper"] == pytest.approx(want, rel=1e-12)
    assert "rule paper" in capsys.readouterr().out
    err = _one_line_exit_2(_advise_argv(enc, "--rule", "exact"), capsys)
    assert "invalid choice: 'exact'" in err


def test_advise_run_prints_ratio_and_command(recorded_run: Path, capsys) -> None:
    from smoothlab.cli import _config, build_parser
    from smoothlab.hybrid.config import TrainConfig

    assert main(["advise", "--run", str(recorded_run), "--print-command"]) == 0
    out = capsys.readouterr().out
    assert "eta_y / eta_x = " in out and "Table 2 range" in out
    tcfg = _config(build_parser().parse_args(_printed_command(out)), TrainConfig, TrainConfig())
    run = json.loads((recorded_run / "config.json").read_text())
    assert (tcfg.method, tcfg.steps) == (run["method"], run["steps"])
    assert tcfg.out == str(recorded_run) + "-advised"  # never the recorded run's own folder
    # --method cannot re-label a recorded run
    err = _one_line_exit_2(["advise", "--run", str(recorded_run), "--method", "zo-ft"], capsys)
    assert "the run's own method 'hybrid-lora'" in err


# --------------------------------------------------------------------------- train --lr-* auto
def _train_argv(enc: Path, out: Path, *extra: str) -> list[str]:
    return [
        "train",
        "--model",
        str(enc),
        "--batch-size",
        "4",
        "--train-size",
        "16",
        "--eval-size",
        "8",
        "--dev-size",
        "8",
        "--eval-every",
        "2",
        "--lora-r",
        "2",
        "--out",
        str(out),
        *extra,
    ]


def test_train_auto_rates_probe_step_0_and_resume_reuses_them(
    enc: Path, tmp_path: Path, capsys, monkeypatch
) -> None:
    import smoothlab.hybrid.advise
    from smoothlab.cli import _config, build_parser
    from smoothlab.hybrid.config import TrainConfig

    out = tmp_path / "auto"
    argv = _train_argv(enc, out, "--lr-base", "auto", "--lr-peft", "auto", "--steps", "2")
    assert main(argv) == 0
    text = capsys.readouterr().out
    saved = json.loads((out / "config.json").read_text())
    adv = saved["advice"]
    # ground truth: the advisor on the same config, probed independently (same seeds, batch 0)
    cfg = _config(build_parser().parse_args(argv), TrainConfig, TrainConfig())
    assert cfg.auto_rates == ("lr_base", "lr_peft")
    want, _ = smoothlab.hybrid.advise.advise_config(
        cfg, hvp=cfg.advise_hvp, vectors=cfg.advise_vectors
    )
    assert adv["eta_x"] == pytest.approx(want.eta_x, rel=1e-6)
    assert adv["eta_y"] == pytest.approx(want.eta_y, rel=1e-6)
    assert (saved["lr_base"], saved["lr_peft"]) == (adv["eta_x"], adv["eta_y"])
    assert adv["auto"] == ["lr_base", "lr_peft"] and adv["reused"] is False
    with (out / "metrics.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    # the engine ran at the advice, lr_base lowered by the walk budget as the gradient grew
    assert _budget_rates(adv, rows, horizon=2) == [float(r["lr_base"]) for r in rows]
    assert float(rows[0]["lr_base"]) <= adv["eta_x"]
    assert {float(r["lr_peft"]) for r in rows} == {adv["eta_y"]}
    assert "auto rates: lr_base = " in text and "eta_y / eta_x = " in text
    assert "the walk budget lowers it during the run" in text
    summary = json.loads((out / "summary.json").read_text())
    assert summary["lr_base_last"] == float(rows[-1]["lr_base"])
    assert f"{100 * summary['walk_budget_spent']:.0f}% of the budget spent" in text
    # the report shows the proposal (advice.json in the run folder)
    assert json.loads((out / "advice.json").read_text())["eta_x"] == adv["eta_x"]
    assert main(["report", str(out), "--out", str(tmp_path / "rep")]) == 0
    assert "Learning-rate proposal" in (tmp_path / "rep" / "report.md").read_text()

    # a checkpoint saved before the walk budget existed (no "walk" entry) resumes without one
    import shutil

    import torch

    old = tmp_path / "old"
    shutil.copytree(out, old)
    state = torch.load(old / "checkpoint.pt", weights_only=False)
    del state["walk"]
    torch.save(state, old / "checkpoint.pt")

    # resuming the run reuses the resolved rates: no second probe
    def no_probe(*a, **kw):
        raise AssertionError("a resumed run must not probe again")

    monkeypatch.setattr(smoothlab.hybrid.advise, "advise_config", no_probe)
    argv4 = _train_argv(enc, out, "--lr-base", "auto", "--lr-peft", "auto", "--steps", "4")
    assert main(argv4) == 0
    assert "not probed again" in capsys.readouterr().out
    again = json.loads((out / "config.json").read_text())
    assert (again["lr_base"], again["lr_peft"], again["steps"]) == (adv["eta_x"], adv["eta_y"], 4)
    with (out / "metrics.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert [r["step"] for r in rows] == ["1", "2", "3", "4"]
    # the resumed budget continues: the 2 extra steps share what the first 2 left of B
    assert _budget_rates(adv, rows, horizon=4, resumed_at=2) == [float(r["lr_base"]) for r in rows]
    argv4_old = _train_argv(enc, old, "--lr-base", "auto", "--lr-peft", "auto", "--steps", "4")
    assert main(argv4_old) == 0
    with (old / "metrics.csv").open() as fh:
        resumed = list(csv.DictReader(fh))
    assert [float(r["lr_base"]) for r in resumed[2:]] == [adv["eta_x"]] * 2
    # without the budget the advised rate is used throughout
    monkeypatch.undo()
    out2 = tmp_path / "fixed"
    argv = _train_argv(enc, out2, "--lr-base", "auto", "--no-lr-base-budget", "--steps", "2")
    assert main(argv) == 0
    with (out2 / "metrics.csv").open() as fh:
        fixed = list(csv.DictReader(fh))
    eta_x = json.loads((out2 / "config.json").read_text())["advice"]["eta_x"]
    assert {float(r["lr_base"]) for r in fixed} == {eta_x}


def _budget_rates(adv: dict, rows: list[dict], *, horizon: int, resumed_at: int = 0) -> list:
    """lr_base of each logged step replayed through a WalkBudget from the logged projected
    gradients (q = 1: the step's coefficient is its proj_grad); ``resumed_at``: the horizon
    was ``advice["steps"]`` before that step (a run extended on resume)."""
    from smoothlab.budget import WalkBudget

    b = WalkBudget.from_advice(adv, horizon=adv["steps"] if resumed_at else horizon)
    rates = []
    for t, r in enumerate(rows):
        if t == resumed_at:
            b.horizon = horizon
        rates.append(b.step(t, [(t, float(r["proj_grad"]))]))
    return rates


def test_train_one_auto_rate_keeps_the_other(enc: Path, tmp_path: Path, capsys) -> None:
    from smoothlab.hybrid.config import TrainConfig

    out = tmp_path / "half"
    argv = _train_argv(enc, out, "--lr-base", "2e-4", "--lr-peft", "auto", "--steps", "1")
    assert main(argv) == 0
    saved = json.loads((out / "config.json").read_text())
    assert saved["lr_base"] == 2e-4 and saved["advice"]["auto"] == ["lr_peft"]
    assert saved["lr_peft"] == saved["advice"]["eta_y"] > 0
    # a method without a ZO block: lr_base auto resolves to 0 (unused), lr_peft to eta_y
    out2 = tmp_path / "fo"
    argv = _train_argv(enc, out2, "--method", "fo-lora", "--lr-base", "auto", "--steps", "1")
    assert main(argv) == 0
    saved = json.loads((out2 / "config.json").read_text())
    assert saved["lr_base"] == 0.0 and saved["lr_peft"] == TrainConfig().lr_peft
    # --restart probes again instead of reusing
    assert main([*argv, "--restart"]) == 0
    assert "not probed again" not in capsys.readouterr().out


def test_auto_rates_in_a_config_file(tmp_path: Path) -> None:
    from smoothlab.hybrid.config import TrainConfig, load_config_file

    f = tmp_path / "c.yaml"
    f.write_text("lr_base: auto\nlr_peft: 1e-3\n")
    cfg = load_config_file(f, TrainConfig)
    assert (cfg.lr_base, cfg.lr_peft, cfg.auto_rates) == ("auto", 1e-3, ("lr_base",))
    f.write_text("lr_base: quick\n")
    with pytest.raises(UsageError, match="expected a number or 'auto', got 'quick'"):
        load_config_file(f, TrainConfig)


# --------------------------------------------------------------------------- --record-blocks
def _smoothness_blocks(run: Path) -> dict[int, set[str]]:
    with (run / "smoothness.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    by_step: dict[int, set[str]] = {}
    for r in rows:
        assert math.isfinite(float(r["estimate"])), r
        by_step.setdefault(int(r["step"]), set()).add(r["block"])
    return by_step


def _expected_modules(cfg, spec) -> dict[str, int]:  # noqa: ANN001
    """base.<m>/peft.<m> sizes: the spec's blocks of the whole model, cut by the x/y split."""
    from smoothlab.blocks import make_blocks, parse_blocks_arg
    from smoothlab.hybrid.train import build, split_parameters

    model = build(cfg)[0].model
    x, y = split_parameters(model, cfg.method)
    out = {}
    for prefix, side in (("base", x), ("peft", y)):
        ids = {id(p) for p in side}
        for name, params in make_blocks(model, parse_blocks_arg(spec)).items():
            n = sum(p.numel() for p in params if id(p) in ids)
            if n:
                out[f"{prefix}.{name}"] = n
    return out


def test_train_record_blocks_layers_splits_x_and_y(enc: Path, tmp_path: Path) -> None:
    from smoothlab.figures.report import write_report
    from smoothlab.hybrid.train import load_config

    out = tmp_path / "mod"
    argv = _train_argv(
        enc, out, "--steps", "2", "--record-every", "2", "--record-vectors", "2",
        "--record-blocks", "layers",
    )  # fmt: skip
    assert main(argv) == 0
    saved = json.loads((out / "config.json").read_text())
    sizes = saved["block_sizes"]
    want = _expected_modules(load_config(out), "layers")
    # both sides split per layer: base.layer.0/1 and peft.layer.0/1 (the tiny encoder has 2)
    assert {"base.layer.0", "base.layer.1", "peft.layer.0", "peft.layer.1"} <= set(want)
    assert {k: v for k, v in sizes.items() if "." in k} == want
    # the modules partition each side: x = base, y = peft + head (the trained classifier)
    assert sum(v for k, v in want.items() if k.startswith("base.")) == sizes["base"]
    assert sum(v for k, v in want.items() if k.startswith("peft.")) == sizes["peft"] + sizes["head"]
    # every probe step logs the whole blocks and every module, once
    assert _smoothness_blocks(out) == {s: {"base", "peft", "head", *want} for s in (0, 2)}
    md, _ = write_report([out], tmp_path / "rep")
    text = md.read_text()
    assert "Per-module smoothness" in text
    n_x = sum(k.startswith("base.") for k in want)
    n_y = sum(k.startswith("peft.") for k in want)
    assert f"{n_x} x modules" in text and f"{n_y} y modules" in text
    assert list((tmp_path / "rep").rglob("*_modules.png"))
    assert list((tmp_path / "rep").rglob("*_modules_heatmap.png"))


def test_figure1_record_blocks_globs(enc: Path, tmp_path: Path, capsys) -> None:
    spec = "attn=*attention*,ffn=*intermediate*"
    rc = main(
        [
            "figure1", "--model", str(enc), "--steps", "2", "--record-every", "2",
            "--vectors", "2", "--batch-size", "4", "--train-size", "16", "--eval-size", "8",
            "--dev-size", "8", "--eval-examples", "8", "--record-blocks", spec,
            "--out", str(tmp_path),
        ]
    )  # fmt: skip
    assert rc == 0
    from smoothlab.hybrid.train import load_config

    for run, whole in (("fig1a_fo-ft", {"model"}), ("fig1b_hybrid-lora", {"base", "peft", "head"})):
        want = _expected_modules(load_config(tmp_path / run), spec)
        assert _smoothness_blocks(tmp_path / run) == {s: whole | set(want) for s in (0, 2)}
    # fo-ft trains every weight as y: its modules are peft.* only; hybrid splits both sides
    assert set(_expected_modules(load_config(tmp_path / "fig1a_fo-ft"), spec)) == {
        "peft.attn",
        "peft.ffn",
    }
    assert "Per-module smoothness" in (tmp_path / "report" / "report.md").read_text()
    capsys.readouterr()
    bad = _one_line_exit_2(
        ["train", "--model", str(enc), "--record-every", "1", "--record-blocks", "q=*nomatch*",
         "--out", str(tmp_path / "bad")],
        capsys,
    )  # fmt: skip
    assert "matches no parameter" in bad and not (tmp_path / "bad").exists()


# --------------------------------------------------------------------------- warnings, ranks
def test_run_log_warning_is_one_line_on_stderr(recorded_run: Path, tmp_path: Path, capsys) -> None:
    import shutil

    run = tmp_path / "torn"
    shutil.copytree(recorded_run, run)
    metrics = run / "metrics.csv"
    text = metrics.read_text()
    metrics.write_text(text[: text.rstrip("\n").rfind("\n") + 1] + "7,0.5,0.69")  # torn last row
    assert main(["report", str(run), "--out", str(tmp_path / "rep")]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert err, "the torn row must be reported"
    assert all(ln.startswith("smoothlab: warning: ") for ln in err), err
    assert any("metrics.csv" in ln and "no newline" in ln for ln in err), err
    assert not any("RunLogWarning" in ln or "warnings.warn" in ln for ln in err), err


def test_rank_failure_is_one_line_exit_1(enc: Path, tmp_path: Path, capsys, monkeypatch) -> None:
    import smoothlab.hybrid.train
    from smoothlab.hybrid.distributed import RankFailure

    def dies(*a, **kw):
        raise RankFailure("all_reduce: rank 1 did not answer within\n 30 s")

    monkeypatch.setattr(smoothlab.hybrid.train, "train", dies)
    assert main(["train", "--model", str(enc), "--out", str(tmp_path / "r")]) == 1
    err = capsys.readouterr().err
    assert err == "smoothlab: error: all_reduce: rank 1 did not answer within 30 s\n"


def test_a_runs_config_json_continues_the_run(recorded_run: Path, tmp_path: Path, capsys) -> None:
    """README: `smoothlab train --config runs/h1/config.json --steps N` continues that run
    (the keys train writes beside the options are not refused as unknown)."""
    run = tmp_path / "h"
    shutil.copytree(recorded_run, run)
    cfg = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text(json.dumps(cfg | {"out": str(run)}))
    rc = main(["train", "--config", str(run / "config.json"), "--steps", "7"])
    assert rc == 0, capsys.readouterr().err
    steps = [int(r["step"]) for r in csv.DictReader((run / "metrics.csv").open())]
    assert steps[-1] == 7


def test_a_default_model_runs_config_json_continues_it(tmp_path: Path, capsys) -> None:
    """With the default model, config.json names it ('minilm') where the checkpoint holds
    None: `train --config run/config.json --steps N` was refused as another model."""
    out = tmp_path / "d"
    small = ["--train-size", "8", "--eval-size", "4", "--dev-size", "4", "--batch-size", "4"]
    argv = ["train", "--method", "fo-lora", "--steps", "1", "--eval-every", "1", *small]
    assert main(argv + ["--out", str(out)]) == 0
    assert json.loads((out / "config.json").read_text())["model"] == "minilm"
    rc = main(["train", "--config", str(out / "config.json"), "--steps", "2"])
    assert rc == 0, capsys.readouterr().err
    assert [int(r["step"]) for r in csv.DictReader((out / "metrics.csv").open())][-1] == 2


def test_a_bad_setting_is_named_where_the_user_gave_it(tmp_path: Path, capsys) -> None:
    """A setting typed as a flag is named by its flag (every mention of an identifier with
    an underscore); one from a --config file is named by the file; a folder given as the
    config file is named as a folder."""
    err = _one_line_exit_2(["train", "--batch-size", "-1"], capsys)
    assert "error: --batch-size must be a positive integer, got -1" in err
    cfg = tmp_path / "c.json"
    cfg.write_text('{"batch_size": -1}')
    err = _one_line_exit_2(["train", "--config", str(cfg)], capsys)
    assert f"error: {cfg}: batch_size must be a positive integer, got -1" in err
    err = _one_line_exit_2(["train", "--config", str(tmp_path)], capsys)
    assert f"config file {str(tmp_path)!r} is a folder" in err


def test_task_help_lists_the_columns_of_each_task(capsys) -> None:
    """Users bring their own files: --task's help names every task's columns (from the task
    registry, so a registered task shows up too)."""
    from smoothlab.hybrid.tasks import TASKS

    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    for task in TASKS.values():
        assert f"{task.name}: " in out
    assert "copa: SuperGLUE COPA, columns premise, choice1, choice2, question, label" in out


def test_a_setting_typed_beside_a_config_file_is_named_by_its_flag(tmp_path: Path, capsys):
    """A message about two settings names each where it was given: the file's by the file,
    the typed one by its flag."""
    cfg = tmp_path / "c.json"
    cfg.write_text('{"record_blocks": "layers"}')
    err = _one_line_exit_2(["train", "--config", str(cfg), "--record-every", "0"], capsys)
    assert f"{cfg}: record_blocks 'layers' needs --record-every > 0" in err
