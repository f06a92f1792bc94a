r"""Tests for smoothlab.hybrid.distributed: sharding, the 1-process no-op path, and real 2-process gloo
runs on 127.0.0.1 against a 1-process run on the same global batches.

Ground truth: :class:`smoothlab.hybrid.engine.HybridEngine` in one process on the global batch of 16.
The 2-rank run (8 examples each) must give the same losses and weights:

* in float64 to 1e-12 relative: only the summation order differs (mean of 16 vs two means
  of 8 summed with weights 1/2), O(ε₆₄) per loss;
* in float32 the same rounding is O(ε₃₂·|f|) ≈ 1e-7 per loss, and the ZO coefficient
  g = (f₊ − f₋)/2μ amplifies it by 1/2μ, so |Δg| ≲ 4ε₃₂|f|/μ and the weights differ by
  ≲ η_x·|Δg|·|z| per step. The tolerances below are those bounds; the measured differences
  are printed (``-s``).

The communication is checked exactly: 8 bytes per forward (one float64 loss) plus the
float32 PEFT gradients once per step.
"""

from __future__ import annotations

import os
import traceback

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from smoothlab.errors import UsageError
from smoothlab.hybrid import distributed as D
from smoothlab.hybrid.distributed import free_port, set_rank_env
from smoothlab.hybrid.engine import HybridEngine

GLOBAL, STEPS = 16, 4
CONFIGS = {  # name: (dtype, engine kwargs, has ZO, has FO)
    "zo-ft-64": (torch.float64, {"q": 2, "lr_zo": 1e-2, "lr_fo": 0.0}, True, False),
    "hybrid-64": (torch.float64, {"q": 1, "lr_zo": 1e-2, "lr_fo": 0.1}, True, True),
    "zo-ft-32": (torch.float32, {"q": 2, "lr_zo": 1e-2, "lr_fo": 0.0}, True, False),
    "hybrid-32": (
        torch.float32,
        {"q": 1, "lr_zo": 1e-2, "lr_fo": 0.1, "one_sided": True},
        True,
        True,
    ),
}


class Toy(nn.Module):
    def __init__(self, dtype: torch.dtype) -> None:
        super().__init__()
        with torch.random.fork_rng():
            torch.manual_seed(0)
            self.l1, self.l2 = nn.Linear(6, 16), nn.Linear(16, 3)
            self.adapter = nn.Linear(6, 16, bias=False)
        self.to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.l2(torch.tanh(self.l1(x) + self.adapter(x)))


def _data(dtype: torch.dtype):
    gen = torch.Generator().manual_seed(1)
    return torch.randn(GLOBAL * STEPS, 6, generator=gen).to(dtype), torch.randint(
        0, 3, (GLOBAL * STEPS,), generator=gen
    )


def run(name: str, rank: int = 0, world: int = 1) -> dict:
    """STEPS steps of config ``name`` on global batches of 16, this rank taking its shard."""
    dtype, kw, has_zo, has_fo = CONFIGS[name]
    model = Toy(dtype)
    X, Y = _data(dtype)
    zo = [*model.l1.parameters(), *model.l2.parameters()] if has_zo else []
    fo = list(model.adapter.parameters()) if has_fo else []
    if not has_fo:
        zo += fo
    engine = HybridEngine(model, zo, fo, seed=5, **kw)
    counter = D.CommStats()
    D.install_grad_allreduce(engine.optimizer, engine.fo_params, counter=counter)
    losses, per_step = [], []
    for t in range(STEPS):
        batch = list(range(t * GLOBAL, (t + 1) * GLOBAL))
        idx = D.shard(batch, rank, world)
        fn = D.sharded_loss_fn(
            lambda i=idx: F.cross_entropy(model(X[i]), Y[i]), len(idx), GLOBAL, counter=counter
        )
        res = engine.step(fn)
        losses.append(res.loss)
        per_step.append((counter.reset()[0], res.forwards))
    return {
        "losses": losses,
        "weights": [p.detach().clone() for p in model.parameters()],
        "bytes": per_step,
        "n_fo": sum(p.numel() for p in fo),
    }


def _worker(rank: int, world: int, port: int, out: str) -> None:
    set_rank_env(rank, world, port)
    torch.set_num_threads(1)
    try:
        w = D.init("gloo", timeout_s=60)
        result = {name: run(name, w.rank, w.world_size) for name in CONFIGS}
        result["writer"] = D.is_writer()
        D.check_same("weights", str([p.sum().item() for p in result["hybrid-32"]["weights"]]))
        try:  # a refusal only rank 0 sees (its run-folder lock): every rank learns it
            with D.agreed("starting"):
                if rank == 0:
                    raise UsageError("run folder in use")
            result["refusal"] = None
        except UsageError as exc:
            result["refusal"] = str(exc)
        torch.save(result, os.path.join(out, f"rank{rank}.pt"))
        # then rank 1 vanishes: rank 0 must get a clear RankFailure, not hang
        if rank == 1:
            os._exit(3)
        try:
            D.barrier("barrier before step 7", timeout_s=3)
            error = None
        except D.RankFailure as exc:
            error = str(exc)
        torch.save(error, os.path.join(out, "failure.pt"))
        D.shutdown()
    except Exception:
        with open(os.path.join(out, f"rank{rank}.err"), "w") as fh:
            fh.write(traceback.format_exc())
        raise


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """Run the worker on 2 gloo ranks (one spawn for every test: starting Python + torch
    dominates the cost). Returns (exit codes, folder of results)."""
    out = tmp_path_factory.mktemp("ranks")
    ctx = mp.get_context("spawn")
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(r, 2, port, str(out))) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=180)
        if p.is_alive():
            p.kill()
    errs = [f.read_text() for f in sorted(out.glob("rank*.err"))]
    assert not errs, "\n".join(errs)
    return [p.exitcode for p in procs], out


def _max_abs(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max(float((x - y).abs().max()) for x, y in zip(a, b))


def test_two_ranks_of_8_equal_one_rank_of_16(two_ranks) -> None:
    _, out = two_ranks
    ranks = [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)]
    assert [r["writer"] for r in ranks] == [True, False]
    for name, (dtype, kw, has_zo, has_fo) in CONFIGS.items():
        ref = run(name)
        two = ranks[0][name]
        assert all(
            torch.equal(a, b) for a, b in zip(two["weights"], ranks[1][name]["weights"])
        )  # replicas agree
        eps = torch.finfo(dtype).eps
        dl = max(abs(a - b) for a, b in zip(two["losses"], ref["losses"]))
        dw = _max_abs(two["weights"], ref["weights"])
        print(f"{name}: max |Δloss| = {dl:.2e}, max |Δweight| = {dw:.2e}")
        f = max(ref["losses"])
        # the first loss differs by the reduction's rounding (a few eps·f); later ones are taken
        # at weights that already differ by rounding (|Δf| <= |∇f|·|Δw|): 32 eps·f covers both
        # (measured: 3.1e-15 = 12 eps·f in float64 with the table source)
        assert dl <= 32 * eps * f
        # a weight moves by lr·Δg·|z| per step with |Δg| <= 4·eps·f/mu (mu = 1e-3), |z| <= 5
        bound = STEPS * kw["lr_zo"] * 4 * eps * f / 1e-3 * 5 + (
            STEPS * kw["lr_fo"] * 16 * eps if has_fo else 0
        )
        bound = max(bound, 1e3 * eps)
        assert dw <= bound, (dw, bound)
        half = run(name, 0, 2)  # one process, rank 0's 8 examples only: what a missing reduce gives
        assert _max_abs(half["weights"], ref["weights"]) > 30 * bound
        assert ref["bytes"] == [(0, fw) for _, fw in ref["bytes"]]  # one process sends nothing
        for t, (sent, forwards) in enumerate(two["bytes"]):
            # step 0 also runs the engine's one forward that finds weights read outside
            # their layers (this loss all-reduces its value in every forward)
            looks = 1 if t == 0 and has_zo else 0
            assert sent == 8 * (forwards + looks) + dtype.itemsize * two["n_fo"]


def test_a_dead_rank_stops_the_others_with_a_clear_message(two_ranks) -> None:
    codes, out = two_ranks
    assert codes == [0, 3]
    msg = torch.load(out / "failure.pt")
    assert (
        msg
        and "rank 0 of 2" in msg
        and "barrier before step 7" in msg
        and "re-run the same command" in msg
    )


def test_shard_splits_every_batch_exactly() -> None:
    for n in (0, 1, 2, 7, 16, 33):
        for world in (1, 2, 3):
            parts = [D.shard(list(range(100, 100 + n)), r, world) for r in range(world)]
            assert sum(parts, []) == list(range(100, 100 + n))
            assert max(map(len, parts)) - min(map(len, parts)) <= 1
    assert D.shard(range(5), 0, 2) == [0, 1, 2] and D.shard(range(5), 1, 2) == [3, 4]
    assert [D.shard([1, 2, 3], r, 4) for r in range(4)] == [[1], [2], [3], []]
    with pytest.raises(UsageError, match="rank 2 of world size 2"):
        D.shard([1, 2, 3], 2, 2)


def test_single_process_is_a_no_op(monkeypatch) -> None:
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    w = D.init()
    assert (w.rank, w.world_size, w.distributed) == (0, 1, False) and D.is_writer()
    fn = lambda: torch.tensor(1.5)  # noqa: E731
    assert D.sharded_loss_fn(fn, 8, 16) is fn
    assert D.allreduce_sum([1.0, 2.0]) == [1.0, 2.0]
    assert D.weighted_sum([2.0], 8, 16) == [1.0]
    t = torch.ones(3)
    assert D.allreduce_([t], weight=0.5) == 0 and torch.equal(t, torch.full((3,), 0.5))
    D.barrier()
    D.check_same("x", "y")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("MASTER_PORT", raising=False)
    with pytest.raises(UsageError, match="MASTER_PORT"):
        D.init()
    for bad in (0, 1e-9, 0.001, 1e300, float("nan"), True):  # 1e300: OverflowError per rank
        with pytest.raises(UsageError, match="from 1 to 604800"):
            D.init(timeout_s=bad)
    with pytest.raises(ValueError, match="n_local"):
        D.weighted_sum([1.0], 9, 8)


def test_a_peer_that_never_joins_is_a_one_line_rank_failure(monkeypatch) -> None:
    """Rank 0 of 2 alone: init_process_group's DistStoreError (a traceback per rank before)
    becomes RankFailure after the timeout."""
    for k, v in {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0"}.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    with pytest.raises(D.RankFailure, match="rank 0 of 2: joining the process group") as info:
        D.init("gloo", timeout_s=1)
    assert "\n" not in str(info.value) and "re-run the same command" in str(info.value)
    assert not torch.distributed.is_initialized()


def test_a_refusal_on_one_rank_reaches_every_rank(two_ranks) -> None:
    """Rank 0 alone refused (a locked run folder): rank 1 used to fail in the next
    collective with "another rank died or stalled ... re-run the same command"."""
    _, out = two_ranks
    got = [torch.load(out / f"rank{r}.pt", weights_only=False)["refusal"] for r in range(2)]
    assert got == ["run folder in use", "rank 0: run folder in use"]


def test_cli_prints_a_usage_error_on_rank_0_only(monkeypatch, tmp_path, capsys) -> None:
    from smoothlab.cli import main

    argv = ["export", str(tmp_path / "nothing"), "--out", str(tmp_path / "hf")]
    monkeypatch.setenv("WORLD_SIZE", "2")
    for rank, printed in (("1", False), ("0", True)):
        monkeypatch.setenv("RANK", rank)
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert ("is not a run folder" in err) == printed and "Traceback" not in err
