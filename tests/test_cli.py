"""The `smoothlab` command end to end on tiny models: probe, train, advise, report, figure1,
and every user error as one line on stderr with exit status 2."""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from smoothlab.cli import main

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")

SST2 = Path(__file__).resolve().parents[2] / "shared" / "data" / "sst2" / "train.tsv"


@pytest.fixture(scope="module")
def enc(tmp_path_factory) -> Path:
    from hybrid.models import tiny_encoder

    root = tmp_path_factory.mktemp("cli_enc")
    tiny_encoder(seed=0, save_dir=root)
    return root


@pytest.fixture(scope="module")
def recorded_run(enc: Path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cli_runs") / "h"
    rc = main(["train", "--model", str(enc), "--method", "hybrid-lora", "--steps", "6", "--batch-size", "4",
               "--eval-every", "3", "--train-size", "24", "--eval-size", "8", "--dev-size", "8", "--lr-base", "1e-3",
               "--lr-peft", "1e-2", "--record-every", "2", "--record-vectors", "3", "--lora-r", "2", "--out", str(out)])
    assert rc == 0
    return out


def test_probe_prints_table_and_writes_json(enc: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "probe.json"
    rc = main(["probe", "--model", str(enc), "--peft", "lora", "--lora-r", "2", "--batch-size", "4",
               "--vectors", "5", "--hvp", "exact", "--out", str(out)])
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
    rc = main(["probe", "--model", str(enc), "--data", str(SST2), "--blocks", "layers", "--norm", "frobenius",
               "--hvp", "fd", "--vectors", "4", "--batch-size", "4"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "layer.0" in text and "layer.1" in text and "embeddings" in text


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["probe", "--norm", "max"], "invalid choice: 'max'"),
        (["probe", "--hvp", "magic"], "invalid choice: 'magic'"),
        (["probe", "--vectors", "0"], "expected a positive integer, got '0'"),
        (["probe", "--h", "-1"], "expected a finite number >= 0, got '-1'"),
        (["probe", "--data", "/nonexistent/file.tsv", "--model", "MODEL"], "/nonexistent/file.tsv"),
        (["probe", "--model", "/no/such/model_dir"], "/no/such/model_dir"),
        (["probe", "--model", "MODEL", "--blocks", "nosuchpreset"], "nosuchpreset"),
        (["probe", "--model", "MODEL", "--blocks", "q=*nothing_matches*"], "matches no parameter"),
        (["probe", "--model", "MODEL", "--device", "cuda:7"], "cuda:7"),
        (["train", "--method", "sgd"], "invalid choice: 'sgd'"),
        (["train", "--lr-base", "-1"], "expected a finite number >= 0, got '-1'"),
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
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == 2
    assert needle in err
    assert len(err.strip().splitlines()) == 1, err
    assert "Traceback" not in err


def test_bad_data_file_is_one_line(enc: Path, tmp_path: Path, capsys) -> None:
    bad = tmp_path / "bad.csv"
    bad.write_text("words,stars\nhello,5\n")
    rc = main(["probe", "--model", str(enc), "--data", str(bad)])
    err = capsys.readouterr().err
    assert rc == 2 and "bad.csv" in err and len(err.strip().splitlines()) == 1


def test_console_script_exit_code_without_traceback(tmp_path: Path) -> None:
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, "-m", "smoothlab.cli", "probe", "--norm", "nope"],
                          capture_output=True, text=True, env=env)
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
    assert advice["eta_x"] == pytest.approx(advice["q"] / (advice["L_x"] * (advice["d_x"] + 1 + advice["q"])))
    assert advice["eta_y"] == pytest.approx(1 / advice["L_y"])
    assert "eta_y / eta_x" in out


def test_report_from_run(recorded_run: Path, tmp_path: Path, capsys) -> None:
    rc = main(["report", str(recorded_run), "--out", str(tmp_path)])
    assert rc == 0
    html = (tmp_path / "report.html").read_text()
    assert "data:image/png;base64" in html and "base" in html


def test_figure1_on_tiny_model(enc: Path, tmp_path: Path, capsys) -> None:
    rc = main(["figure1", "--model", str(enc), "--steps", "6", "--record-every", "3", "--vectors", "3",
               "--batch-size", "4", "--train-size", "24", "--eval-size", "8", "--dev-size", "8",
               "--eval-examples", "8", "--out", str(tmp_path)])
    assert rc == 0
    for f in ("fig1a.png", "fig1a.pdf", "fig1b.png", "fig1b.pdf", "example23.png", "report/report.html"):
        assert (tmp_path / f).exists(), f
    assert "L_base / L_lora" in capsys.readouterr().out


def test_advise_from_model_with_calibration(enc: Path, tmp_path: Path, capsys) -> None:
    rc = main(["advise", "--model", str(enc), "--lora-r", "2", "--batch-size", "4", "--vectors", "4",
               "--calibrate", "--pilot-steps", "2", "--multipliers", "0.5,2", "--train-size", "16",
               "--eval-size", "8", "--dev-size", "8", "--out", str(tmp_path)])
    assert rc == 0
    out = capsys.readouterr().out
    assert "calibration table" in out and "calibrated proposal" in out
    with (tmp_path / "calibration.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    # coordinate search over {0.5, 1, 2}: x-sweep (3 pilots), then y-sweep at the best x (2 new)
    assert len(rows) == 5
    assert [(float(r["scale_x"]), float(r["scale_y"])) for r in rows[:3]] == [(0.5, 1.0), (1.0, 1.0), (2.0, 1.0)]
    from hybrid.calibrate import select

    num = [{k: (float(v) if k != "run" else v) for k, v in r.items()} for r in rows]
    best_x = select(num[:3], scale="scale_x")["scale_x"]
    assert {(float(r["scale_x"]), float(r["scale_y"])) for r in rows[3:]} == {(best_x, 0.5), (best_x, 2.0)}
    adv = json.loads((tmp_path / "advice.json").read_text())
    unc = adv["uncalibrated"]
    y_sweep = [r for r in num if r["scale_x"] == best_x]
    best = select(y_sweep, scale="scale_y")
    assert adv["eta_x"] == pytest.approx(unc["eta_x"] * float(best["scale_x"]))
    assert adv["eta_y"] == pytest.approx(unc["eta_y"] * float(best["scale_y"]))


def test_bad_multipliers_is_a_usage_error(capsys) -> None:
    assert main(["advise", "--calibrate", "--multipliers", "0,2"]) == 2
    assert "expected comma-separated positive numbers, got '0,2'" in capsys.readouterr().err


def test_calibration_selection_prefers_the_proposal_within_noise() -> None:
    from hybrid.calibrate import select

    def row(s: float, acc: float, loss: float) -> dict:
        return {"scale_x": s, "dev_acc": acc, "final_loss": loss}

    # equal accuracy, losses within 1%: the proposal (scale 1) wins
    assert select([row(0.5, 0.8, 0.5001), row(1.0, 0.8, 0.5003), row(8.0, 0.8, 0.5)], scale="scale_x")["scale_x"] == 1.0
    # a clearly lower loss wins; a higher accuracy wins over any loss; diverged pilots lose
    assert select([row(1.0, 0.8, 0.6), row(2.0, 0.8, 0.4)], scale="scale_x")["scale_x"] == 2.0
    assert select([row(1.0, 0.8, 0.3), row(8.0, 0.9, 0.7)], scale="scale_x")["scale_x"] == 8.0
    assert select([row(1.0, 0.5, 0.7), row(8.0, math.nan, math.nan)], scale="scale_x")["scale_x"] == 1.0
