r"""Scaling out, through the real :class:`smoothlab.hybrid.train.Trainer` on a tiny BERT:

* data parallel (2 gloo ranks on 127.0.0.1, global batch 16 = 8 per rank) against one
  process on the same global batches, for zo-ft and hybrid-lora, the recorder included;
* a rank that dies makes the other stop with a one-line :class:`RankFailure`, and running the
  same 2-rank job again resumes (bit-identical to an uninterrupted 2-rank run);
* checkpoints of seeds: replay is bit-identical to a full checkpoint, resume replays, a
  different initial model is refused, and the checkpoint is kilobytes;
* the device-map code path (accelerate) and per-device perturbation routing.

Tolerance of 2 ranks vs 1 (float32 model). Per loss, the only difference is the reduction:
mean over 16 vs (1/2)(mean over 8 + mean over 8) summed in float64, a few ε₃₂·f
(ε₃₂ = 1.2e-7). The ZO coefficient g = (f₊ − f₋)/2μ turns a loss difference δ into
δ/μ = 1e3·δ, and x moves by η_x·g·z; so after t steps the weights differ by
≲ t·η_x·(4ε₃₂ f/μ)·max|z| and the losses by that times ‖∇f‖. With η_x = 1e-3, f ≈ 0.7,
μ = 1e-3, t = 4, max|z| ≈ 5 this is ≈ 7e-6 absolute on the weights; the test allows
1e-5 on weights and 1e-5 relative on losses (measured values are printed with ``-s``).
That a missing reduction fails such bounds by far is checked at the engine level in
tests/test_distributed.py (rank 0's 8 examples alone).
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import traceback
import warnings
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from smoothlab.errors import UsageError
from smoothlab.hybrid.distributed import free_port, set_rank_env
from smoothlab.hybrid.train import TrainConfig, load_trained, train

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")

SMALL = {
    "train_size": 64,
    "eval_size": 16,
    "dev_size": 8,
    "batch_size": 16,
    "max_length": 24,
    "lora_r": 4,
    "lr_base": 1e-3,
    "lr_peft": 1e-2,
    "steps": 4,
    "eval_every": 2,
    "seed": 3,
}


@pytest.fixture(scope="module")
def enc(tmp_path_factory) -> Path:
    from tests.tiny_models import tiny_encoder

    path = tmp_path_factory.mktemp("scale_model") / "enc"
    tiny_encoder(seed=0, save_dir=path)
    return path


def _cfg(model: Path, out: Path, **over) -> TrainConfig:
    return TrainConfig(model=str(model), out=str(out), **(SMALL | over))


def _train(cfg: TrainConfig, **kw) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return train(cfg, progress=False, **kw)


def _rows(path: Path, name: str = "metrics.csv") -> list[dict[str, str]]:
    import csv

    with (path / name).open(newline="") as fh:
        return list(csv.DictReader(fh))


def _state(run: Path) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in load_trained(run).model.state_dict().items()}


# ----------------------------------------------------------------------------- 2 ranks


def _worker(rank: int, world: int, port: int, jobs: list[dict], die_at: int | None) -> None:
    set_rank_env(rank, world, port)
    torch.set_num_threads(1)
    from smoothlab.hybrid import distributed as D

    def on_step(t: int, row: dict) -> None:
        if rank == 1 and t == die_at:
            os._exit(7)  # a rank that vanishes mid-run (no message, no cleanup)

    err = Path(jobs[0]["out"]).parent / f"rank{rank}.err"
    try:
        for job in jobs:
            cfg = TrainConfig(**job)
            try:
                _train(cfg, on_step=on_step if die_at else None)
            except D.RankFailure as exc:
                (Path(job["out"]).parent / f"failure{rank}.txt").write_text(str(exc))
                os._exit(1)
        D.shutdown()
    except Exception:
        err.write_text(traceback.format_exc())
        raise


def _two_ranks(jobs: list[TrainConfig], die_at: int | None = None) -> list[int]:
    """Run ``jobs`` one after another on 2 gloo ranks; the exit codes."""
    import dataclasses

    ctx = mp.get_context("spawn")
    port = free_port()
    plain = [dataclasses.asdict(c) for c in jobs]
    procs = [ctx.Process(target=_worker, args=(r, 2, port, plain, die_at)) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=240)  # a hang fails the test in minutes (a run here takes seconds)
        if p.is_alive():
            p.kill()
    errs = [f.read_text() for f in sorted(Path(jobs[0].out).parent.glob("rank*.err"))]
    assert not errs, "\n".join(errs)
    return [p.exitcode for p in procs]


@pytest.fixture(scope="module")
def parallel(enc, tmp_path_factory):
    """1-process and 2-rank runs of the same configurations."""
    root = tmp_path_factory.mktemp("scale_dp")
    rec = {"record_every": 2, "record_vectors": 4, "record_batch": "current"}
    jobs = {
        "zo-ft": _cfg(enc, root / "two" / "zo", method="zo-ft", checkpoint="full"),
        "hybrid-lora": _cfg(enc, root / "two" / "hl", method="hybrid-lora", **rec),
        "seeds": _cfg(enc, root / "two" / "seeds", method="zo-ft", checkpoint="seeds", steps=6),
        # batches of 16 and 1 (17 examples), eval and dev sets of 1: rank 1's shards are empty
        "short": _cfg(enc, root / "two" / "short", **SHORT),
    }
    codes = _two_ranks(list(jobs.values()))
    assert codes == [0, 0]
    one = {}
    for k in ("zo-ft", "hybrid-lora"):
        one[k] = _train(_cfg(enc, root / "one" / k, **_over(jobs[k])))
    one["short"] = _train(_cfg(enc, root / "one" / "short", **SHORT))
    return {"two": {k: Path(c.out) for k, c in jobs.items()}, "one": one, "root": root}


SHORT = {
    "method": "hybrid-lora",
    "train_size": 17,
    "eval_size": 1,
    "dev_size": 1,
    "steps": 3,
    "record_every": 3,
    "record_vectors": 2,
}


def _over(cfg: TrainConfig) -> dict:
    return {
        k: getattr(cfg, k) for k in ("method", "checkpoint", "record_every", "record_vectors")
    } | {"record_batch": cfg.record_batch}


# The two-rank tests run by default (about 20 s together): marked slow, they were skipped by
# CI, and a recorded two-rank run that hung (the fd fast path's gradients were not summed
# over ranks) went unnoticed for a stop.
@pytest.mark.parametrize("method", ["zo-ft", "hybrid-lora"])
def test_two_ranks_of_8_match_one_process_of_16(parallel, method) -> None:
    one, two = parallel["one"][method], parallel["two"][method]
    r1, r2 = _rows(one), _rows(two)
    assert [r["step"] for r in r1] == [r["step"] for r in r2] == ["1", "2", "3", "4"]
    dl = max(abs(float(a["loss"]) / float(b["loss"]) - 1) for a, b in zip(r1, r2))
    w1, w2 = _state(one), _state(two)
    dw = max(float((w1[k] - w2[k]).abs().max()) for k in w1)
    print(f"{method}: max relative |Δloss| = {dl:.2e}, max |Δweight| = {dw:.2e}")
    assert dl <= 1e-5 and dw <= 1e-5
    # the accuracies are counts over the same examples: equal unless a score is a near-tie
    assert [(a["eval_acc"], a["dev_acc"]) for a in r1] == [
        (b["eval_acc"], b["dev_acc"]) for b in r2
    ]
    config = json.loads((two / "config.json").read_text())
    assert config["world_size"] == 2 and config["batch_size"] == 16
    assert not list(two.parent.glob("rank*.err"))


def test_a_rank_with_an_empty_shard_adds_nothing(parallel) -> None:
    """Step 2's batch, the eval set, the dev set and the fixed probe batch hold one example:
    rank 1's shard is empty (it used to stop both ranks with exit 2 after step 1). Its share
    is 0, so the run matches one process as closely as the even split does."""
    one, two = parallel["one"]["short"], parallel["two"]["short"]
    r1, r2 = _rows(one), _rows(two)
    assert [r["step"] for r in r2] == ["1", "2", "3"]
    dl = max(abs(float(a["loss"]) / float(b["loss"]) - 1) for a, b in zip(r1, r2))
    w1, w2 = _state(one), _state(two)
    dw = max(float((w1[k] - w2[k]).abs().max()) for k in w1)
    assert dl <= 1e-5 and dw <= 1e-5, (dl, dw)
    assert [(a["eval_acc"], a["dev_acc"]) for a in r1] == [
        (b["eval_acc"], b["dev_acc"]) for b in r2
    ]
    s1, s2 = _rows(one, "smoothness.csv"), _rows(two, "smoothness.csv")
    assert len(s1) == len(s2) > 0
    assert all(abs(float(a["loss"]) / float(b["loss"]) - 1) <= 1e-5 for a, b in zip(s1, s2))


def test_recorder_under_two_ranks_matches_one_process(parallel) -> None:
    """The probes' HVPs are of the global batch: Σ_r (n_r/N) H_r v (fd HVPs of the
    all-reduced gradients). The fd step is the same (same loss dtype); the gradients agree
    to float32 rounding, which the difference quotient divides by its step ~1e-3·|x|/|v|:
    relative differences ~1e-3 at most; a rank-local probe (half the batch) is off by ~10%."""
    a = _rows(parallel["one"]["hybrid-lora"], "smoothness.csv")
    b = _rows(parallel["two"]["hybrid-lora"], "smoothness.csv")
    assert [(r["step"], r["block"]) for r in a] == [(r["step"], r["block"]) for r in b]
    assert len(a) >= 6
    worst = 0.0
    for x, y in zip(a, b):
        for col in ("estimate", "grad_norm", "loss"):
            rel = abs(float(x[col]) / float(y[col]) - 1)
            worst = max(worst, rel)
            assert rel <= 5e-3, (x["step"], x["block"], col, x[col], y[col])
    print(f"recorder: max relative difference 1 vs 2 ranks = {worst:.2e}")


def test_dead_rank_stops_the_other_then_the_same_command_resumes(parallel, enc) -> None:
    root = parallel["root"] / "fail"
    cfg = _cfg(enc, root / "run", method="zo-ft", checkpoint="seeds", steps=6)
    codes = _two_ranks([cfg], die_at=3)
    assert codes == [1, 7]
    msg = (root / "failure0.txt").read_text()
    assert "rank 0 of 2" in msg and "re-run the same command" in msg and "\n" not in msg
    assert [r["step"] for r in _rows(root / "run")] == ["1", "2", "3"]
    assert _two_ranks([cfg]) == [0, 0]  # the same job again: resumes from step 2's checkpoint
    ref = parallel["two"]["seeds"]
    strip = lambda rows: [{k: v for k, v in r.items() if k != "seconds"} for r in rows]  # noqa: E731
    assert strip(_rows(root / "run")) == strip(_rows(ref))
    assert (root / "run" / "seeds.jsonl").read_text() == (ref / "seeds.jsonl").read_text()
    w1, w2 = _state(root / "run"), _state(ref)
    assert all(torch.equal(w1[k], w2[k]) for k in w1)


# ----------------------------------------------------------------------------- seeds
@pytest.fixture(scope="module")
def seed_runs(enc, tmp_path_factory):
    root = tmp_path_factory.mktemp("scale_seeds")
    runs = {}
    for method in ("zo-ft", "hybrid-lora"):
        for kind in ("full", "seeds"):
            out = root / f"{method}-{kind}"
            runs[method, kind] = _train(_cfg(enc, out, method=method, checkpoint=kind, steps=6))
    return root, runs


@pytest.mark.parametrize("method", ["zo-ft", "hybrid-lora"])
def test_seed_checkpoint_replays_bit_identically_to_a_full_one(seed_runs, method) -> None:
    _, runs = seed_runs
    full, seeds = runs[method, "full"], runs[method, "seeds"]
    state = torch.load(seeds / "checkpoint.pt", weights_only=False)
    assert "model" not in state and state["checkpoint"] == "seeds" and state["seed_steps"] == 6
    ref = torch.load(full / "checkpoint.pt", weights_only=False)["model"]
    rebuilt = _state(seeds)
    assert ref.keys() == rebuilt.keys()
    assert all(torch.equal(ref[k], rebuilt[k]) for k in ref)
    assert _rows(full) and [r["loss"] for r in _rows(full)] == [r["loss"] for r in _rows(seeds)]
    lines = (seeds / "seeds.jsonl").read_text().splitlines()
    assert len(lines) == 7 and json.loads(lines[0])["weights_hash"].startswith("sha256:")
    if method == "zo-ft":  # kilobytes instead of the model
        small, big = (
            (seeds / "checkpoint.pt").stat().st_size,
            (full / "checkpoint.pt").stat().st_size,
        )
        print(
            f"zo-ft checkpoint: seeds {small} B (+ seeds.jsonl "
            f"{(seeds / 'seeds.jsonl').stat().st_size} B) vs full {big} B"
        )
        assert small < big / 100


@pytest.mark.parametrize("edit", ["coefficient", "header"])
def test_an_edited_seed_log_is_refused(seed_runs, enc, tmp_path, edit) -> None:
    """A log whose bytes differ from those its checkpoint covered (one coefficient edited:
    the export differed by 0.026, silently) is refused by export and resume alike."""
    import shutil

    _, runs = seed_runs
    run = tmp_path / "run"
    shutil.copytree(runs["zo-ft", "seeds"], run)
    lines = (run / "seeds.jsonl").read_text().splitlines(keepends=True)
    if edit == "coefficient":
        rec = json.loads(lines[3])
        rec["terms"][0][1] *= 1.5
        lines[3] = json.dumps(rec) + "\n"
    else:
        rec = json.loads(lines[0])
        rec["model"] = "other"
        lines[0] = json.dumps(rec) + "\n"
    (run / "seeds.jsonl").write_text("".join(lines))
    with pytest.raises(UsageError, match="cannot replay .* edited or replaced"):
        load_trained(run)
    with pytest.raises(UsageError, match="cannot replay .* edited or replaced"):
        _train(_cfg(enc, run, method="zo-ft", checkpoint="seeds", steps=7))


def test_seed_checkpoint_resumes_by_replay(seed_runs, enc, tmp_path) -> None:
    """Stopped at step 3 (then the log is torn mid-line, as a crash leaves it), resumed to 6:
    bit-identical to the uninterrupted seeds run and to the full one."""
    _, runs = seed_runs
    cfg = _cfg(enc, tmp_path / "r", method="zo-ft", checkpoint="seeds", steps=3, save_every=3)
    _train(cfg)
    with (tmp_path / "r" / "seeds.jsonl").open("a") as fh:
        fh.write('{"step": 3, "lr": 0.001, "terms": [[12')  # a torn line
    _train(_cfg(enc, tmp_path / "r", method="zo-ft", checkpoint="seeds", steps=6, save_every=3))
    assert (tmp_path / "r" / "seeds.jsonl").read_text() == (
        runs["zo-ft", "seeds"] / "seeds.jsonl"
    ).read_text()
    a, b = _state(tmp_path / "r"), _state(runs["zo-ft", "full"])
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_seed_checkpoint_refuses_other_initial_weights(enc, tmp_path) -> None:
    from tests.tiny_models import tiny_encoder

    model = tmp_path / "model"
    tiny_encoder(seed=0, save_dir=model)
    cfg = _cfg(model, tmp_path / "r", method="zo-ft", checkpoint="seeds", steps=2, eval_every=1)
    _train(cfg)
    tiny_encoder(seed=1, save_dir=model)  # the same name now holds other weights
    with pytest.raises(UsageError, match="cannot replay .* the log starts from sha256:"):
        _train(
            _cfg(model, tmp_path / "r", method="zo-ft", checkpoint="seeds", steps=3, eval_every=1)
        )
    with pytest.raises(UsageError, match="cannot replay"):
        load_trained(tmp_path / "r")


def test_seed_checkpoint_of_a_first_order_method_checks_the_frozen_base(tmp_path) -> None:
    """fo-lora trains no ZO weights: its log's weights_hash is of nothing, and the frozen
    base was neither saved nor hashed (an export from swapped weights differed by 0.14)."""
    from tests.tiny_models import tiny_encoder

    model = tmp_path / "model"
    tiny_encoder(seed=0, save_dir=model)
    cfg = _cfg(model, tmp_path / "r", method="fo-lora", checkpoint="seeds", steps=2)
    _train(cfg)
    load_trained(tmp_path / "r")  # the same model: fine
    tiny_encoder(seed=1, save_dir=model)
    with pytest.raises(UsageError, match="cannot replay .* frozen"):
        load_trained(tmp_path / "r")
    with pytest.raises(UsageError, match="cannot replay .* frozen"):
        _train(dataclasses.replace(cfg, steps=3))


def test_checkpoint_kind_cannot_change_on_resume(seed_runs, enc, tmp_path) -> None:
    import shutil

    _, runs = seed_runs
    shutil.copytree(runs["zo-ft", "seeds"], tmp_path / "r")
    with pytest.raises(UsageError, match="checkpoint"):
        _train(_cfg(enc, tmp_path / "r", method="zo-ft", checkpoint="full", steps=8))
    with pytest.raises(
        UsageError, match="checkpoint 'weights' is not accepted; accepted: seeds, full"
    ):
        TrainConfig(checkpoint="weights").validate()


def test_resume_compares_what_takes_effect(seed_runs, enc, tmp_path) -> None:
    """A zo-ft run saved with checkpoint 'seeds' resumes with the default (None, which means
    seeds for zo-ft) and with a LoRA rank zo-ft never reads; both were refused. A field
    zo-ft does read (mu) is still refused."""
    import shutil

    _, runs = seed_runs
    shutil.copytree(runs["zo-ft", "seeds"], tmp_path / "r")
    same = _cfg(enc, tmp_path / "r", method="zo-ft", checkpoint=None, lora_r=8, steps=7)
    with pytest.raises(UsageError, match="mu: 0.001 -> 0.002"):
        _train(dataclasses.replace(same, mu=2e-3))
    _train(same)
    assert [r["step"] for r in _rows(tmp_path / "r")][-1] == "7"


def test_cli_defaults_to_seeds_for_zo_ft_and_exports(seed_runs, enc, tmp_path) -> None:
    from transformers import AutoModelForSequenceClassification

    from smoothlab.cli import main

    args = ["--model", str(enc), "--train-size", "64", "--eval-size", "16", "--dev-size", "8"]
    args += ["--batch-size", "16", "--max-length", "24", "--steps", "2", "--eval-every", "2"]
    assert main(["train", "--method", "zo-ft", "--out", str(tmp_path / "z"), *args]) == 0
    assert (
        json.loads((tmp_path / "z" / "config.json").read_text())["checkpoint"] is None
    )  # = seeds for zo-ft
    assert torch.load(tmp_path / "z" / "checkpoint.pt", weights_only=False)["checkpoint"] == "seeds"
    assert (tmp_path / "z" / "seeds.jsonl").is_file()
    assert main(["export", str(tmp_path / "z"), "--out", str(tmp_path / "hf")]) == 0
    exported = AutoModelForSequenceClassification.from_pretrained(tmp_path / "hf")
    trained = _state(tmp_path / "z")
    for k, v in exported.state_dict().items():
        assert torch.equal(v, trained[k]), k
    initial = AutoModelForSequenceClassification.from_pretrained(enc)
    moved = [k for k, v in initial.state_dict().items() if not torch.equal(v, trained[k])]
    assert moved  # the export is the trained model, not the initial one


# ----------------------------------------------------------------------------- devices
def test_explicit_device_map_runs_the_accelerate_path_bit_identically(enc, tmp_path) -> None:
    dmap = json.dumps({"bert.embeddings": "cpu", "bert.encoder": "cpu", "": "cpu"})
    a = _train(_cfg(enc, tmp_path / "a", method="zo-ft", checkpoint="full", steps=2))
    b = _train(
        _cfg(enc, tmp_path / "b", method="zo-ft", checkpoint="full", steps=2, device_map=dmap)
    )
    wa = torch.load(a / "checkpoint.pt", weights_only=False)["model"]
    wb = torch.load(b / "checkpoint.pt", weights_only=False)["model"]
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    with pytest.raises(UsageError, match="device_map"):
        _train(
            _cfg(enc, tmp_path / "c", method="zo-ft", steps=1, device_map='{"bert.encoder": "cpu"}')
        )
    with pytest.raises(UsageError, match="accepted: 'auto' or a JSON object"):
        TrainConfig(device_map="everywhere").validate()


def test_device_map_without_accelerate_names_the_install(enc, tmp_path, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "accelerate", None)  # import accelerate -> ImportError
    with pytest.raises(UsageError, match="pip install accelerate"):
        _train(_cfg(enc, tmp_path / "a", method="zo-ft", steps=1, device_map="auto"))


def test_each_parameter_is_perturbed_and_updated_on_its_own_device() -> None:
    """A DeviceSampler routes every z, shift and update to the sampler of the parameter's
    device (the meta device stands in for a second one: it records the calls), and on one
    device type it gives exactly the z of a single-device sampler; offloaded (meta)
    weights are refused by the engine."""
    from smoothlab.hybrid.engine import DeviceSampler, HybridEngine, make_sampler
    from smoothlab.perturb import get_source

    cpu = [torch.randn(5, 3), torch.randn(7)]
    for z in ("table", "gaussian", "hash"):
        plain = get_source(z).sampler(4, 21)
        multi = DeviceSampler(get_source(z), 4, cpu)
        for i, p in enumerate(cpu):
            assert torch.equal(multi(11)(i, p), plain(11)(i, p))
            q1, q2 = p.clone(), p.clone()
            multi(11).update_(i, q1, 0.5)
            plain(11).update_(i, q2, 0.5)
            assert torch.equal(q1, q2)

    calls = []

    class Recording:
        def __init__(self, seed):
            self.seed = seed

        def __call__(self, i, p):
            calls.append(("z", i, p.device.type))
            return torch.zeros_like(p)

        def shift(self, i, w, s, out=None):
            calls.append(("shift", i, w.device.type))
            return w

        def update_(self, i, p, a):
            calls.append(("update", i, p.device.type))

    meta = torch.empty(4, device="meta")
    multi = DeviceSampler(get_source("table"), 4, cpu)
    multi.samplers[meta.device] = Recording
    d = multi(9)
    d.update_(2, meta, 1.0)
    d.shift(2, meta, 1e-3)
    d(2, meta)
    d.update_(0, cpu[0], 0.0)  # a CPU parameter never reaches the other device's sampler
    assert calls == [("update", 2, "meta"), ("shift", 2, "meta"), ("z", 2, "meta")]
    assert isinstance(
        make_sampler(get_source("table"), 0, cpu), type(get_source("table").sampler())
    )
    with pytest.raises(UsageError, match="'meta' device"):
        make_sampler(get_source("table"), 0, [cpu[0], meta])
    model = torch.nn.Linear(3, 2, device="meta")
    with pytest.raises(UsageError, match="offloaded"):
        HybridEngine(model, list(model.parameters()), [], lr_zo=1e-3, lr_fo=0.0)


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA devices")
def test_model_split_over_two_gpus_trains_like_one(enc, tmp_path) -> None:
    """Layer 0 on cuda:0, layer 1 and the head on cuda:1: every weight stays on its device
    and the run equals the one-GPU run (the table source is the same on every CUDA device;
    only activations cross devices, which is exact)."""
    dmap = {
        "bert.embeddings": "cuda:0",
        "bert.encoder.layer.0": "cuda:0",
        "bert.encoder.layer.1": "cuda:1",
        "bert.pooler": "cuda:1",
        "classifier": "cuda:1",
        "dropout": "cuda:1",
    }
    one = _train(_cfg(enc, tmp_path / "one", method="zo-ft", checkpoint="full", device="cuda:0"))
    two = _train(
        _cfg(
            enc,
            tmp_path / "two",
            method="zo-ft",
            checkpoint="seeds",
            device="cuda:0",
            device_map=json.dumps(dmap),
        )
    )
    bundle = load_trained(two)
    devices = {p.device.index for p in bundle.model.parameters()}
    assert devices == {0, 1}
    ref = torch.load(one / "checkpoint.pt", weights_only=False)["model"]
    got = bundle.model.state_dict()
    dw = max(float((ref[k].cpu() - got[k].cpu()).abs().max()) for k in ref)
    print(f"2 GPUs vs 1: max |Δweight| = {dw:.2e}")
    assert dw <= 1e-5
