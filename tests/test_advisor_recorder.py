"""The trajectory recorder (plain loop, CSV, resume, HF Trainer callback)."""

from __future__ import annotations

import csv
import math
import re

import pytest
import torch

import smoothlab
from smoothlab.errors import UsageError
from smoothlab.recorder import TrajectoryRecorder, block_grad_norms


def _quadratic_model():
    torch.manual_seed(0)
    lin = torch.nn.Linear(6, 1, bias=False).double()
    xs = torch.randn(40, 6, dtype=torch.float64)
    ys = torch.randn(40, 1, dtype=torch.float64)
    return lin, xs, ys


def test_recorder_in_a_plain_loop_logs_exact_values(tmp_path) -> None:
    lin, xs, ys = _quadratic_model()
    loss_fn = smoothlab.ModelLoss(lin, (xs, ys), criterion=torch.nn.functional.mse_loss)
    rec = TrajectoryRecorder(
        {"w": [lin.weight]}, every=2, hvp="exact", num_vectors=6, out_dir=tmp_path, model=lin
    )
    opt = torch.optim.SGD(lin.parameters(), lr=0.1)
    truth = float(torch.linalg.eigvalsh(2 * xs.T @ xs / len(xs)).max())  # MSE Hessian, constant
    for step in range(5):
        rec.step(step, loss_fn, loss=float(loss_fn()), lr_peft=0.1)
        opt.zero_grad()
        loss_fn().backward()
        opt.step()
    rec.close()
    with (tmp_path / "smoothness.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert [int(r["step"]) for r in rows] == [0, 2, 4]
    for r in rows:
        assert float(r["estimate"]) == pytest.approx(truth, rel=1e-6)
        assert float(r["probe_seconds"]) >= 0 and float(r["grad_norm"]) > 0
    assert rec.probe_seconds > 0


def test_grad_norms_match_autograd_and_restore_frozen_flags() -> None:
    lin, xs, ys = _quadratic_model()
    lin.weight.requires_grad_(False)
    loss_fn = lambda: torch.nn.functional.mse_loss(lin(xs), ys)  # noqa: E731
    norms = block_grad_norms(loss_fn, {"w": [lin.weight]})
    w = lin.weight.detach().clone().requires_grad_(True)
    (g,) = torch.autograd.grad(torch.nn.functional.mse_loss(xs @ w.T, ys), w)
    assert norms["w"] == pytest.approx(float(g.norm()), rel=1e-12)
    assert lin.weight.requires_grad is False and lin.weight.grad is None


def test_recorder_resume_drops_later_rows_and_never_repeats(tmp_path) -> None:
    lin, xs, ys = _quadratic_model()
    loss_fn = smoothlab.ModelLoss(lin, (xs, ys), criterion=torch.nn.functional.mse_loss)
    rec = TrajectoryRecorder({"w": [lin.weight]}, every=1, num_vectors=3, out_dir=tmp_path)
    for s in range(5):
        rec.step(s, loss_fn)
    rec.close()
    rec = TrajectoryRecorder(
        {"w": [lin.weight]}, every=1, num_vectors=3, out_dir=tmp_path, resume_step=2
    )
    assert rec.step(2, loss_fn) is None  # already recorded before the checkpoint
    for s in range(3, 6):
        rec.step(s, loss_fn)
    rec.close()
    with (tmp_path / "smoothness.csv").open() as fh:
        steps = [int(r["step"]) for r in csv.DictReader(fh)]
    assert steps == [0, 1, 2, 3, 4, 5]


def test_recorder_errors() -> None:
    lin, _, _ = _quadratic_model()
    with pytest.raises(ValueError, match="every"):
        TrajectoryRecorder({"w": [lin.weight]}, every=0)
    rec = TrajectoryRecorder({"w": [lin.weight]}, every=1)
    with pytest.raises(ValueError, match="no loss to probe"):
        rec.step(0)


def _hf_run(out, loss_for=None, steps=4, save=False, resume=None):
    """A tiny BERT (dropout on) trained by a real Trainer, with the callback if ``loss_for``."""
    from transformers import Trainer, TrainingArguments

    from smoothlab.integrations import hf_callback
    from tests.tiny_models import tiny_encoder

    model, tok = tiny_encoder(seed=0)
    enc = tok(["good film", "bad film", "great", "awful"] * 4, padding=True, return_tensors="pt")
    data = [
        {
            "input_ids": enc["input_ids"][i],
            "attention_mask": enc["attention_mask"][i],
            "labels": torch.tensor(i % 2),
        }
        for i in range(16)
    ]
    held = {k: torch.stack([d[k] for d in data[:4]]) for k in data[0]}
    blocks = smoothlab.make_blocks(model, {"cls": "classifier.*"})
    rec = TrajectoryRecorder(blocks, every=2, num_vectors=3, out_dir=out)  # no model=: closure only
    args = TrainingArguments(
        output_dir=str(out / "hf"),
        per_device_train_batch_size=4,
        max_steps=steps,
        learning_rate=5e-5,
        lr_scheduler_type="linear",
        report_to=[],
        use_cpu=True,
        save_strategy="steps" if save else "no",
        save_steps=2,
        logging_strategy="no",
        seed=0,
    )
    callbacks = [hf_callback(rec, lambda m: loss_for(m, held))] if loss_for else []
    trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=callbacks)
    trainer.train(resume_from_checkpoint=resume)
    return model, trainer


def test_hf_trainer_callback_records_without_changing_training(tmp_path) -> None:
    """A plain closure (not ModelLoss) in a model with dropout: the probes run with dropout
    off and the random state kept, so the weights equal a run without the callback. Step 0
    is recorded, each row carries the rate its step used (the linear schedule's 1.25e-5 at
    step 4, not the 0 it moves to after), and a second train() appends to the log."""
    pytest.importorskip("accelerate")
    plain, _ = _hf_run(tmp_path / "plain")
    model, trainer = _hf_run(tmp_path / "rec", lambda m, held: lambda: m(**held).loss)
    for a, b in zip(plain.parameters(), model.parameters()):
        assert torch.equal(a, b)
    with (tmp_path / "rec" / "smoothness.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert [int(r["step"]) for r in rows] == [0, 2, 4]
    assert all(float(r["estimate"]) > 0 for r in rows)
    assert [float(r["lr_peft"]) for r in rows] == pytest.approx([5e-5, 3.75e-5, 1.25e-5])
    trainer.args.max_steps = 6
    trainer.train()  # the callback closed the log at the end of the first
    with (tmp_path / "rec" / "smoothness.csv").open() as fh:
        assert [int(r["step"]) for r in csv.DictReader(fh)] == [0, 2, 4, 6]


def test_hf_trainer_resumed_from_a_checkpoint_records_its_own_trajectory(tmp_path) -> None:
    """Trained to step 6 (checkpoints at 2, 4, 6), then resumed from checkpoint-2 with
    max_steps 4: the rows after step 2 belong to the abandoned trajectory, so the log ends
    with step 4 of the resumed one (its linear schedule gives step 4 the rate 1.25e-5; the
    first run's step 4 used 2.5e-5), and no row of the first run's step 6 is left."""
    pytest.importorskip("accelerate")
    closure = lambda m, held: lambda: m(**held).loss  # noqa: E731
    _hf_run(tmp_path, closure, steps=6, save=True)
    rows = lambda: list(csv.DictReader((tmp_path / "smoothness.csv").open()))  # noqa: E731
    assert [int(r["step"]) for r in rows()] == [0, 2, 4, 6]
    assert float(rows()[2]["lr_peft"]) == pytest.approx(2.5e-5)
    _hf_run(tmp_path, closure, steps=4, resume=str(tmp_path / "hf" / "checkpoint-2"))
    assert [int(r["step"]) for r in rows()] == [0, 2, 4]
    assert float(rows()[2]["lr_peft"]) == pytest.approx(1.25e-5)


@pytest.mark.parametrize("hvp", ["fd", "exact"])
def test_probe_reports_the_gradient_norm_it_computed(hvp: str) -> None:
    lin, xs, ys = _quadratic_model()
    loss_fn = lambda: torch.nn.functional.mse_loss(lin(xs), ys)  # noqa: E731
    est = smoothlab.probe(loss_fn, {"w": [lin.weight]}, hvp=hvp, num_vectors=4)["w"]
    (g,) = torch.autograd.grad(loss_fn(), lin.weight)
    assert est.grad_norm == pytest.approx(float(g.norm()), rel=1e-12)


def test_zo_probe_has_no_gradient_norm_and_recorder_computes_it(tmp_path) -> None:
    lin, xs, ys = _quadratic_model()
    loss_fn = lambda: torch.nn.functional.mse_loss(lin(xs), ys)  # noqa: E731
    est = smoothlab.probe(loss_fn, {"w": [lin.weight]}, norm="trace", hvp="zo", num_vectors=4)["w"]
    assert math.isnan(est.grad_norm)
    rec = TrajectoryRecorder({"w": [lin.weight]}, every=1, norm="trace", hvp="zo", num_vectors=4)
    rec.step(0, loss_fn)
    (g,) = torch.autograd.grad(loss_fn(), lin.weight)
    assert rec.rows[0]["grad_norm"] == pytest.approx(float(g.norm()), rel=1e-12)


def test_two_recorders_share_one_smoothness_csv(tmp_path) -> None:
    """log=: a second block set writes to the first recorder's smoothness.csv; only the owner
    closes it; on resume the shared log's steps count as recorded for both."""
    torch.manual_seed(1)
    model = torch.nn.Sequential(
        torch.nn.Linear(4, 3), torch.nn.Tanh(), torch.nn.Linear(3, 1)
    ).double()
    xs, ys = torch.randn(20, 4, dtype=torch.float64), torch.randn(20, 1, dtype=torch.float64)
    loss_fn = smoothlab.ModelLoss(model, (xs, ys), criterion=torch.nn.functional.mse_loss)
    whole = {"all": list(model.parameters())}
    parts = {"first": list(model[0].parameters()), "last": list(model[2].parameters())}

    def run(resume: int | None, steps: range) -> None:
        kw = dict(every=2, hvp="exact", num_vectors=20, tol=1e-12)
        a = TrajectoryRecorder(whole, out_dir=tmp_path, resume_step=resume, **kw)
        b = TrajectoryRecorder(parts, log=a.log, **kw)
        for s in steps:
            a.step(s, loss_fn)
            b.step(s, loss_fn)
        b.close()
        assert not a.log._fh.closed  # b does not own it
        a.close()
        assert a.log._fh.closed

    run(None, range(0, 3))
    run(2, range(2, 5))  # step 2 is already in the shared log: neither records it again
    with (tmp_path / "smoothness.csv").open() as fh:
        rows = [(int(r["step"]), r["block"], float(r["estimate"])) for r in csv.DictReader(fh)]
    assert [(s, b) for s, b, _ in rows] == [
        (s, b) for s in (0, 2, 4) for b in ("all", "first", "last")
    ]
    # each row is its own block's ‖H_bb‖₂ (20 Lanczos steps >= every block's dimension)
    params = list(model.parameters())
    sizes = [p.numel() for p in params]

    def flat_loss(flat: torch.Tensor) -> torch.Tensor:
        pieces = [t.view(p.shape) for t, p in zip(torch.split(flat, sizes), params)]
        named = dict(zip((n for n, _ in model.named_parameters()), pieces))
        return torch.nn.functional.mse_loss(torch.func.functional_call(model, named, (xs,)), ys)

    H = torch.autograd.functional.hessian(
        flat_loss, torch.cat([p.detach().reshape(-1) for p in params])
    )
    span = {"all": slice(0, 19), "first": slice(0, 15), "last": slice(15, 19)}
    truth = {b: float(torch.linalg.eigvalsh(H[sl, sl]).abs().max()) for b, sl in span.items()}
    for _, b, est in rows:
        assert est == pytest.approx(truth[b], rel=1e-6)


def test_recorder_log_argument_errors(tmp_path) -> None:
    lin, _, _ = _quadratic_model()
    owner = TrajectoryRecorder({"w": [lin.weight]}, out_dir=tmp_path)
    with pytest.raises(ValueError, match="out_dir or log"):
        TrajectoryRecorder({"w": [lin.weight]}, out_dir=tmp_path / "x", log=owner.log)
    with pytest.raises(TypeError, match="CsvLog"):
        TrajectoryRecorder({"w": [lin.weight]}, log=str(tmp_path / "smoothness.csv"))
    from smoothlab.runlog import CsvLog

    other = CsvLog(tmp_path / "other.csv", ["step", "x"])
    with pytest.raises(ValueError, match="columns"):
        TrajectoryRecorder({"w": [lin.weight]}, log=other)
    other.close()
    owner.close()


@pytest.mark.parametrize(
    "kw, words",
    [
        ({"norm": "spektral"}, "unknown norm 'spektral'"),
        ({"num_vectors": 0}, "num_vectors must be a positive integer, got 0"),
        ({"hvp": "fdd"}, "unknown hvp oracle 'fdd'"),
        ({"h": -1.0}, "h must be a positive finite float or None, got -1.0"),
        ({"tol": 0}, "tol must be a positive finite float, got 0"),
        ({"tol": math.inf}, "tol must be a positive finite float, got inf"),
    ],
)
def test_recorder_checks_its_probe_options_when_built(kw, words) -> None:
    """Not after `every` training steps, at its first probe."""
    lin, _, _ = _quadratic_model()
    with pytest.raises(UsageError, match=re.escape(words)):
        TrajectoryRecorder({"w": [lin.weight]}, every=5, **kw)


@pytest.mark.parametrize(
    "kw, error, words",
    [
        ({"seed": "x"}, UsageError, "seed must be an integer, got 'x'"),
        ({"seed": 1.5}, UsageError, "seed must be an integer, got 1.5"),
        ({"model": "m"}, TypeError, "model must be a torch.nn.Module or None, got str"),
        ({"probe_loss_fn": 3}, TypeError, "probe_loss_fn must be a zero-argument callable"),
    ],
)
def test_recorder_checks_seed_model_and_loss_when_built(kw, error, words) -> None:
    """Before, these failed at the first probe, `every` steps into training (seed=1.5 as
    'got 11.5', a value the user never passed)."""
    lin, _, _ = _quadratic_model()
    with pytest.raises(error, match=re.escape(words)):
        TrajectoryRecorder({"w": [lin.weight]}, every=10, **kw)


def test_recorder_accepts_a_numpy_seed() -> None:
    np = pytest.importorskip("numpy")
    lin, xs, ys = _quadratic_model()
    loss_fn = lambda: torch.nn.functional.mse_loss(lin(xs), ys)  # noqa: E731
    kw = dict(every=1, norm="trace", hvp="exact", num_vectors=3)
    a = TrajectoryRecorder({"w": [lin.weight]}, seed=np.int64(7), **kw)
    b = TrajectoryRecorder({"w": [lin.weight]}, seed=7, **kw)
    assert a.step(3, loss_fn)["w"].value == b.step(3, loss_fn)["w"].value


def test_recorder_logs_nan_rows_and_warns_at_a_nan_loss(tmp_path) -> None:
    """A diverged loss at a recording step does not abort the loop: the step's rows hold nan
    estimates, a RuntimeWarning names the step, and the next steps are recorded."""
    lin, xs, ys = _quadratic_model()
    broken = {"on": False}

    def loss_fn():
        loss = torch.nn.functional.mse_loss(lin(xs), ys)
        return loss * math.nan if broken["on"] else loss

    rec = TrajectoryRecorder(
        {"w": [lin.weight]}, every=1, hvp="exact", num_vectors=6, out_dir=tmp_path
    )
    rec.step(0, loss_fn)
    broken["on"] = True
    with pytest.warns(RuntimeWarning, match=r"loss is nan at step 1; logged nan estimates"):
        ests = rec.step(1, loss_fn)
    assert math.isnan(ests["w"].value) and not ests["w"].converged
    broken["on"] = False
    rec.step(2, loss_fn)
    rec.close()
    with (tmp_path / "smoothness.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert [(r["step"], r["estimate"], r["loss"]) for r in rows][1] == ("1", "nan", "nan")
    truth = float(torch.linalg.eigvalsh(2 * xs.T @ xs / len(xs)).max())  # MSE Hessian
    for r in (rows[0], rows[2]):
        assert float(r["estimate"]) == pytest.approx(truth, rel=1e-9)
    assert rec.due(1) is False  # the nan step is recorded, not retried
    with pytest.raises(UsageError, match="unknown"):  # other probe errors still raise
        TrajectoryRecorder({"w": [lin.weight]}, every=1, norm="trac")


def test_a_step_half_recorded_by_a_kill_is_recorded_again_whole(tmp_path) -> None:
    """Killed after block a's row at step 4 (rows are flushed one at a time): the resumed
    recorder drops that row and records step 4 again for both blocks, once each, and a
    second recorder sharing the log keeps its own rows of step 4."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1)
    ).double()
    xs, ys = torch.randn(8, 3, dtype=torch.float64), torch.randn(8, 1, dtype=torch.float64)
    loss_fn = lambda: ((model(xs) - ys) ** 2).mean()  # noqa: E731
    blocks = {"a": list(model[0].parameters()), "b": list(model[2].parameters())}
    whole = {"all": list(model.parameters())}
    kw = dict(every=2, model=model, norm="trace", hvp="exact", num_vectors=3)

    def rows():
        with (tmp_path / "smoothness.csv").open() as fh:
            return [(int(r["step"]), r["block"], r["estimate"]) for r in csv.DictReader(fh)]

    w = TrajectoryRecorder(whole, out_dir=tmp_path, **kw)
    rec = TrajectoryRecorder(blocks, log=w.log, **kw)
    for s in range(5):
        w.step(s, loss_fn)
        rec.step(s, loss_fn)
    w.close()
    full = rows()
    assert [(s, b) for s, b, _ in full][-3:] == [(4, "all"), (4, "a"), (4, "b")]
    path = tmp_path / "smoothness.csv"
    path.write_text("".join(path.read_text().splitlines(keepends=True)[:-1]))  # kill
    w = TrajectoryRecorder(whole, out_dir=tmp_path, resume_step=4, **kw)
    rec = TrajectoryRecorder(blocks, log=w.log, **kw)
    assert not w.due(4) and rec.due(4) and not rec.due(2)
    assert w.step(4, loss_fn) is None
    rec.step(4, loss_fn)
    assert not rec.due(4)
    w.close()
    assert rows() == full  # the same rows, none twice (the probe is seeded by the step)
