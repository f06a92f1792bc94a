"""smoothlab.hybrid.advise on a tiny encoder: the method's blocks, the rule, and the train command."""

from __future__ import annotations

import math
import shlex
from pathlib import Path

import pytest

from smoothlab.advisor import WALK_C
from smoothlab.hybrid.advise import advise_config, ratio_line, train_command
from smoothlab.hybrid.train import TrainConfig

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")


@pytest.fixture(scope="module")
def enc(tmp_path_factory) -> Path:
    from tests.tiny_models import tiny_encoder

    root = tmp_path_factory.mktemp("adv_enc")
    tiny_encoder(seed=0, save_dir=root)
    return root


def _cfg(enc: Path, method: str, out: Path) -> TrainConfig:
    return TrainConfig(
        method=method,
        model=str(enc),
        task="synthetic",
        steps=2,
        batch_size=4,
        train_size=16,
        eval_size=8,
        dev_size=8,
        eval_every=2,
        lora_r=2,
        q=2,
        out=str(out),
    )


def test_zo_ft_advises_every_weight_as_x(enc: Path, tmp_path: Path) -> None:
    adv, curv = advise_config(_cfg(enc, "zo-ft", tmp_path / "r"), hvp="exact", vectors=6)
    assert curv.d_y == 0 and math.isnan(adv.eta_y)
    assert adv.d_x == curv.d_x
    den = max(curv.trace_x.value, curv.L_x.value) + 3 * max(curv.rho_x, 0.0)
    assert adv.eta_x_curvature == pytest.approx(2 / den)
    # the random-walk cap over cfg.steps = 2 steps, q = 2, Gaussian-like z (kappa 3)
    assert math.isfinite(curv.grad_rms_x) and curv.grad_rms_x > 0  # over the first 8 batches
    walk = WALK_C * curv.weight_norm_x / (curv.grad_rms_x * math.sqrt(2 * ((curv.d_x + 1) / 2 + 1)))
    assert adv.eta_x_walk == pytest.approx(walk, rel=1e-12)
    assert adv.rule == ("walk" if walk < 2 / den else "curvature")
    assert adv.eta_x == pytest.approx(adv.joint_scale * min(walk, 2 / den))
    assert adv.eta_x_paper == pytest.approx(2 / (curv.L_x.value * (curv.d_x + 3)))
    assert "n/a" in ratio_line(adv)


def test_fo_lora_has_no_x_and_hybrid_has_both(enc: Path, tmp_path: Path) -> None:
    fo, curv = advise_config(_cfg(enc, "fo-lora", tmp_path / "f"), hvp="exact", vectors=6)
    assert curv.d_x == 0 and math.isnan(fo.eta_x)
    assert 0 < curv.signal_y <= 1 and curv.signal_y == fo.signal_y
    assert fo.eta_y == pytest.approx(fo.joint_scale * curv.signal_y / curv.L_y.value)
    assert fo.eta_y_lemma == pytest.approx(1 / curv.L_y.value)
    hy, hc = advise_config(_cfg(enc, "hybrid-lora", tmp_path / "h"), hvp="fd", vectors=6)
    assert (
        hc.d_x > 0 and hc.d_y > 0 and math.isfinite(hy.cross) and math.isfinite(hy.predicted_change)
    )
    assert hy.predicted_change < 0  # scaled down if the joint model predicted an increase
    assert "Table 2" in ratio_line(hy)


def test_train_command_runs_with_the_advised_rates(enc: Path, tmp_path: Path, capsys) -> None:
    from smoothlab.cli import main

    cfg = _cfg(enc, "hybrid-lora", tmp_path / "run")
    adv, _ = advise_config(cfg, hvp="exact", vectors=4)
    cmd = train_command(adv, cfg)
    argv = shlex.split(cmd)
    assert argv[:2] == ["smoothlab", "train"]
    assert float(argv[argv.index("--lr-base") + 1]) == pytest.approx(
        adv.eta_x, rel=5e-3
    )  # printed with 3 significant digits
    assert main(argv[1:]) == 0
    import json

    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    for key in ("method", "steps", "batch_size", "q", "train_size", "lora_r", "model", "task"):
        assert saved[key] == getattr(cfg, key)


def test_paired_selection_sees_small_consistent_loss_differences() -> None:
    from smoothlab.hybrid.calibrate import select_paired

    base = [
        0.7 + 0.05 * math.sin(t) for t in range(40)
    ]  # batch-to-batch noise shared by all pilots

    def row(s: float, shift: float, losses: list[float] | None = None) -> dict:
        ls = (
            [v + shift * (t / 40) + 1e-4 * math.cos(3 * t + s) for t, v in enumerate(base)]
            if losses is None
            else losses
        )
        return {"scale_x": s, "final_loss": ls[-1] if ls else math.nan, "losses": ls}

    # a 0.3% lower loss, far below the batch noise, is resolved by pairing
    assert select_paired([row(0.5, 0.0), row(1.0, 0.0), row(8.0, -0.002)])["scale_x"] == 8.0
    # indistinguishable pilots keep the proposal; a diverged pilot never wins
    assert select_paired([row(0.5, 0.0), row(1.0, 0.0), row(8.0, 0.0, [])])["scale_x"] == 1.0
    assert select_paired([row(0.5, 0.001), row(1.0, 0.0, [])])["scale_x"] == 0.5


def test_calibration_x_pilots_are_zo_ft(enc: Path, tmp_path: Path) -> None:
    from smoothlab.hybrid.calibrate import calibrate

    cfg = _cfg(enc, "hybrid-lora", tmp_path / "unused")
    adv, _ = advise_config(cfg, hvp="exact", vectors=4)
    cal, rows = calibrate(
        cfg, adv, tmp_path / "cal", multipliers=(0.5, 2.0), pilot_steps=3, progress=False
    )
    assert [r["method"] for r in rows[:3]] == ["zo-ft"] * 3 and all(
        r["lr_peft"] == 0 for r in rows[:3]
    )
    assert {r["method"] for r in rows[3:]} == {"hybrid-lora"}
    assert cal.eta_x / adv.eta_x in (0.5, 1.0, 2.0)


def test_minibatch_gradient_statistics_match_explicit_gradients(enc: Path, tmp_path: Path) -> None:
    import torch

    from smoothlab.hybrid.advise import gradient_rms, gradient_signal, run_batch
    from smoothlab.hybrid.train import build, split_parameters

    cfg = _cfg(enc, "hybrid-lora", tmp_path / "g")
    bundle, _, splits = build(cfg)
    x, y = split_parameters(bundle.model, cfg.method)
    bundle.model.eval()

    def grads(params, t):
        flags = [p.requires_grad for p in params]
        for p in params:
            p.requires_grad_(True)
        g = torch.autograd.grad(bundle.loss(run_batch(bundle, cfg, splits, t)), params)
        for p, f in zip(params, flags):
            p.requires_grad_(f)
        return torch.cat([gi.flatten().double() for gi in g])

    gx = torch.stack([grads(x, t) for t in range(4)])
    rms = gradient_rms(bundle, cfg, splits, x, batches=4)
    assert rms == pytest.approx(float(gx.pow(2).sum(1).mean().sqrt()), rel=1e-5)
    gy = torch.stack([grads(y, t) for t in range(5)])
    n, total, diag = 5, float(gy.sum(0).pow(2).sum()), float(gy.pow(2).sum())
    phi, se = gradient_signal(bundle, cfg, splits, y, batches=5)
    expected = min(max((total - diag) / (n * (n - 1)) / (diag / n), 1 / n), 1.0)
    assert phi == pytest.approx(expected, rel=1e-4) and math.isfinite(se)
    # a block too large to keep its gradients: phi from running sums, no stderr
    import smoothlab.hybrid.advise as A

    limit, A.GRAM_LIMIT = A.GRAM_LIMIT, 0
    try:
        phi_big, se_big = gradient_signal(bundle, cfg, splits, y, batches=5)
    finally:
        A.GRAM_LIMIT = limit
    assert phi_big == pytest.approx(expected, rel=1e-4) and math.isnan(se_big)
    assert all(p.requires_grad is False for p in x)  # flags restored: x is ZO-trained
    with pytest.raises(ValueError, match="batches >= 3"):
        gradient_signal(bundle, cfg, splits, y, batches=2)


def test_ratio_line_says_which_rate_is_missing_and_why() -> None:
    """A zo probe of hybrid-lora gives eta_x but nothing for y: the ratio line said 'the
    method trains one block only', which is wrong for a hybrid method."""
    from smoothlab.advisor import advise

    zo = advise(None, None, 1000, trace=5.0, rho_x=0.0, weight_norm_x=10.0, grad_rms_x=1.0, steps=9)
    line = ratio_line(zo, "hybrid-lora")
    assert "no eta_y" in line and "zo probe" in line and "one block only" not in line
    assert "one block only: none for y" in ratio_line(zo, "zo-ft")
    y_only = advise(None, 2.0, 0)
    assert "one block only: none for x" in ratio_line(y_only, "fo-lora")
    assert "one block only: none for x" in ratio_line(y_only)  # without the method: from d_x


# --------------------------------------------------------------------------- advise --run
@pytest.fixture(scope="module")
def recorded(enc: Path, tmp_path_factory) -> Path:
    """A 6-step hybrid-lora run recorded every 2 steps, with options away from the defaults
    (which the printed command must carry over)."""
    from smoothlab.cli import main

    out = tmp_path_factory.mktemp("adv_runs") / "h"
    argv = ["train", "--model", str(enc), "--method", "hybrid-lora", "--task", "synthetic"]
    argv += ["--steps", "6", "--batch-size", "4", "--eval-every", "3", "--train-size", "24"]
    argv += ["--eval-size", "8", "--dev-size", "8", "--lr-base", "1e-3", "--lr-peft", "1e-2"]
    argv += ["--record-every", "2", "--record-vectors", "3", "--lora-r", "2", "--z", "hash"]
    argv += ["--mu", "2e-3", "--out", str(out)]
    assert main(argv) == 0
    return out


def _one_line_exit_2(argv: list[str], capsys) -> str:
    from smoothlab.cli import main

    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    return err


def _command(out: str) -> list[str]:
    line = next(ln for ln in out.splitlines() if ln.startswith("command : "))
    return shlex.split(line[len("command : ") :])[2:]


def test_advise_run_command_writes_a_new_folder_with_the_runs_options(
    recorded: Path, capsys
) -> None:
    """The printed command wrote into the recorded run's own folder (refused when run; its
    suggested --restart would delete the trajectory) and dropped --z, --mu, --record-*."""
    import json

    from smoothlab.cli import main

    before = (recorded / "smoothness.csv").read_text()
    assert main(["advise", "--run", str(recorded), "--print-command"]) == 0
    argv = _command(capsys.readouterr().out)
    out = argv[argv.index("--out") + 1]
    assert out == str(recorded) + "-advised"
    assert main(["train", *argv]) == 0
    assert (recorded / "smoothness.csv").read_text() == before
    run = json.loads((recorded / "config.json").read_text())
    new = json.loads(Path(out, "config.json").read_text())
    for key in ("z", "mu", "record_every", "record_vectors", "lora_r", "task", "eval_every"):
        assert new[key] == run[key], key


def test_advise_run_survives_a_torn_smoothness_row(recorded: Path, tmp_path: Path, capsys):
    """A killed writer leaves a torn last line; advise --run crashed with a traceback."""
    import shutil

    from smoothlab.cli import main

    run = tmp_path / "torn"
    shutil.copytree(recorded, run)
    with (run / "smoothness.csv").open("a") as fh:
        fh.write("6,0,head,sp")
    assert main(["advise", "--run", str(run), "--out", str(tmp_path / "a")]) == 0
    assert "dropped" in capsys.readouterr().err  # the torn line, with a warning
    assert (tmp_path / "a" / "advice.json").is_file()


def test_advise_run_applies_steps_and_refuses_flags_it_would_ignore(
    recorded: Path, tmp_path: Path, capsys
) -> None:
    """--steps was ignored (the walk cap used the recorded run's 6 steps), and --q, --z,
    --batch-size, --one-sided silently did nothing."""
    import json

    from smoothlab.cli import main

    caps = {}
    for steps in ("6", "600"):
        out = tmp_path / steps
        assert main(["advise", "--run", str(recorded), "--steps", steps, "--out", str(out)]) == 0
        caps[steps] = json.loads((out / "advice.json").read_text())
    assert caps["600"]["steps"] == 600 and caps["6"]["steps"] == 6
    assert caps["600"]["eta_x_walk"] == pytest.approx(caps["6"]["eta_x_walk"] / 10, rel=1e-9)
    for flag in (["--q", "2"], ["--z", "gaussian"], ["--batch-size", "8"], ["--one-sided"]):
        err = _one_line_exit_2(["advise", "--run", str(recorded), *flag], capsys)
        assert f"{flag[0]}: advice from --run" in err and f"drop {flag[0]}" in err


def test_train_command_carries_every_option_that_differs_from_the_default() -> None:
    """--z, --eval-data, --dev-data (and every field outside a fixed list) were dropped: a
    command advised for Rademacher z (kappa 1) trained with the table (kappa 3)."""
    import dataclasses

    from smoothlab.advisor import advise
    from smoothlab.cli import build_parser

    cfg = TrainConfig(
        method="zo-ft",
        z="rademacher",
        eval_data="e.tsv",
        dev_data="d.tsv",
        one_sided=True,
        lr_base_budget=False,
        mu=2.5e-4,
        record_every=3,
        weight_decay=0.125,
        steps=77,
        out="runs/x",
    )
    argv = shlex.split(train_command(advise(4.0, None, 1000), cfg))[1:]
    ns = build_parser().parse_args(argv)
    for f in dataclasses.fields(TrainConfig):
        if f.name not in ("lr_base", "lr_peft", "extra"):
            assert getattr(ns, f.name, getattr(TrainConfig(), f.name)) == getattr(cfg, f.name), f


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"multipliers": ["a"]}, "multipliers must be positive numbers"),
        ({"multipliers": [math.inf]}, "multipliers must be positive numbers"),
        ({"multipliers": [True]}, "multipliers must be positive numbers"),
        ({"pilot_steps": "100"}, "pilot_steps must be a positive integer"),
        ({"pilot_steps": 1.5}, "pilot_steps must be a positive integer"),
    ],
)
def test_calibrate_refuses_bad_options_before_any_pilot(kwargs, needle, tmp_path: Path) -> None:
    """['a'] and '100' raised TypeError; 1.5, [inf] and [True] were accepted."""
    from smoothlab.advisor import advise
    from smoothlab.errors import UsageError
    from smoothlab.hybrid.calibrate import calibrate

    with pytest.raises(UsageError, match=needle):
        calibrate(TrainConfig(), advise(4.0, 1.0, 100), tmp_path / "c", **kwargs)
    assert not (tmp_path / "c").exists()


def test_an_unknown_method_is_a_usage_error() -> None:
    """advice_from_curvature(curv, 'nope') raised a plain ValueError from get_method."""
    from smoothlab.curvature import Curvature
    from smoothlab.errors import UsageError
    from smoothlab.hybrid.advise import advice_from_curvature

    with pytest.raises(UsageError, match="unknown method 'nope'; accepted: .*hybrid-lora"):
        advice_from_curvature(Curvature(hvp="exact", d_x=0, d_y=3, loss=1.0), "nope")


def test_train_command_leaves_out_the_dtype_auto_loads() -> None:
    """A run records ``--dtype auto`` as the dtype it loaded (float32 for MiniLM); the command
    printed from it needs no ``--dtype`` for that, and keeps one that differs."""
    from smoothlab.advisor import advise

    plain = train_command(
        advise(4.0, None, 1000), TrainConfig(method="zo-ft", dtype="float32", out="r")
    )
    half = train_command(
        advise(4.0, None, 1000), TrainConfig(method="zo-ft", dtype="bfloat16", out="r")
    )
    assert "--dtype" not in plain and "--dtype bfloat16" in half
