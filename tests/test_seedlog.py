"""Tests for smoothlab.hybrid.seedlog: the weights hash, the seed-log file, and bit-identical replay.

Ground truth for replay: the weights that :class:`smoothlab.hybrid.engine.HybridEngine` itself produced
while the log was written (``torch.equal``, no tolerance), for zo-ft on an ``nn.Sequential``
and on a tiny BERT, and for the base block of a hybrid run.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from smoothlab.errors import UsageError
from smoothlab.hybrid.engine import HybridEngine, zo_updater
from smoothlab.hybrid.seedlog import SeedHeader, SeedLog, replay, weights_hash


def updater(params, seed):
    """The engine's own ZO update for the run (seed, default z source) over ``params``."""
    return zo_updater(list(params), seed=seed)


def record(engine: HybridEngine, log: SeedLog):
    """Log every ZO update the engine makes (an optimizer step pre-hook sees its terms)."""

    def hook(opt, args, kwargs) -> None:
        g = next(g for g in opt.param_groups if g["zo"])
        log.append(engine.t, kwargs.get("zo_terms", ()), g["lr"], g["weight_decay"])

    return engine.optimizer.register_step_pre_hook(hook)


def run_logged(model, zo, fo, loss_fn, path, steps, *, snapshot_at=None, **kw):
    init = copy.deepcopy(model)
    engine = HybridEngine(model, zo, fo, **kw)
    log = SeedLog(path, SeedHeader.of("test-model", zo))
    record(engine, log)
    snap = None
    for t in range(steps):
        if t == steps // 2:
            for g in engine.optimizer.param_groups:  # a schedule: the logged lr must follow it
                g["lr"] *= 0.5
        engine.step(loss_fn)
        if snapshot_at == t + 1:
            snap = [p.detach().clone() for p in zo]
    log.close()
    return init, snap


def _mlp() -> nn.Sequential:
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))


def _data(seed: int = 1, n: int = 12):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, 6, generator=gen), torch.randint(0, 3, (n,), generator=gen)


def test_zo_ft_replay_is_bit_identical_and_small(tmp_path) -> None:
    model = _mlp()
    X, Y = _data()
    steps, q = 40, 2
    init, snap = run_logged(
        model,
        list(model.parameters()),
        [],
        lambda: F.cross_entropy(model(X), Y),
        tmp_path / "seeds.jsonl",
        steps,
        snapshot_at=15,
        lr_zo=1e-2,
        lr_fo=0.0,
        q=q,
        weight_decay=0.1,
        seed=7,
    )
    final = list(model.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(init.parameters(), final))  # it trained
    partial = copy.deepcopy(init)
    assert (
        replay(
            list(partial.parameters()),
            tmp_path / "seeds.jsonl",
            updater(init.parameters(), 7),
            upto=15,
        )
        == 15
    )
    assert all(torch.equal(a, b) for a, b in zip(partial.parameters(), snap))
    update = updater(init.parameters(), 7)
    assert replay(list(init.parameters()), tmp_path / "seeds.jsonl", update, upto=0) == 0
    with pytest.raises(UsageError, match="initial weights|hash"):  # x_0 moved: refused
        replay(list(partial.parameters()), tmp_path / "seeds.jsonl", update)
    assert replay(list(init.parameters()), tmp_path / "seeds.jsonl", update) == steps
    assert all(torch.equal(a, b) for a, b in zip(init.parameters(), final))
    size = (tmp_path / "seeds.jsonl").stat().st_size
    assert size < 120 * steps * q + 500  # ~100 bytes a perturbation: kilobytes, not the model


def test_tiny_bert_zo_ft_replay_is_bit_identical(tmp_path) -> None:
    from tests.tiny_models import tiny_encoder

    model, _ = tiny_encoder(seed=0)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, 2000, (4, 8), generator=gen)
    labels = torch.tensor([0, 1, 1, 0])
    params = list(model.parameters())
    init, _ = run_logged(
        model,
        params,
        [],
        lambda: model(input_ids=ids, labels=labels).loss,
        tmp_path / "seeds.jsonl",
        6,
        lr_zo=1e-3,
        lr_fo=0.0,
        seed=3,
    )
    header, entries = SeedLog(tmp_path / "seeds.jsonl").read()
    assert header.num_params == sum(p.numel() for p in params) and len(entries) == 6
    replay(list(init.parameters()), tmp_path / "seeds.jsonl", updater(init.parameters(), 3))
    assert all(torch.equal(a, b) for a, b in zip(init.parameters(), params))
    assert not torch.equal(
        init.bert.embeddings.word_embeddings.weight,
        tiny_encoder(seed=0)[0].bert.embeddings.word_embeddings.weight,
    )


def test_hybrid_base_replay_plus_saved_peft_gives_the_trained_model(tmp_path) -> None:
    with torch.random.fork_rng():
        torch.manual_seed(2)
        base, adapter = nn.Linear(6, 3), nn.Linear(6, 3, bias=False)
    model = nn.ModuleDict({"base": base, "adapter": adapter})
    X, Y = _data(seed=4)
    loss_fn = lambda: F.cross_entropy(base(X) + adapter(X), Y)  # noqa: E731
    zo = list(base.parameters())
    init, _ = run_logged(
        model,
        zo,
        list(adapter.parameters()),
        loss_fn,
        tmp_path / "s.jsonl",
        10,
        lr_zo=1e-2,
        lr_fo=1e-1,
        seed=1,
    )
    init.adapter.load_state_dict(adapter.state_dict())  # the PEFT weights come from the checkpoint
    replay(list(init.base.parameters()), tmp_path / "s.jsonl", updater(init.base.parameters(), 1))
    assert all(torch.equal(a, b) for a, b in zip(init.parameters(), model.parameters()))


def test_weights_hash_is_exact_and_deterministic() -> None:
    a = [torch.randn(5, 4, generator=torch.Generator().manual_seed(0)), torch.arange(3.0)]
    h = weights_hash(a)
    assert h.startswith("sha256:") and h == weights_hash([t.clone() for t in a])
    flipped = a[0].clone()
    flipped.view(torch.int32)[2, 3] ^= 1  # one ulp of one weight
    assert weights_hash([flipped, a[1]]) != h
    assert weights_hash([a[1], a[0]]) != h  # order
    assert weights_hash([a[0].reshape(4, 5), a[1]]) != h  # shape
    assert weights_hash([a[0].to(torch.bfloat16), a[1]]) != weights_hash(
        [a[0].to(torch.float16), a[1]]
    )
    assert weights_hash([a[0].t(), a[1]]) == weights_hash([a[0].t().contiguous(), a[1]])
    m = _mlp()
    assert (
        weights_hash(m)
        == weights_hash(dict(m.named_parameters()))
        != weights_hash(list(m.parameters()))
    )
    with pytest.raises(TypeError, match="expects tensors"):
        weights_hash([1.0])


def _header() -> SeedHeader:
    return SeedHeader.of("m", [torch.zeros(2)], revision="abc")


def test_log_round_trip_exact_floats_and_order(tmp_path) -> None:
    path = tmp_path / "seeds.jsonl"
    coefs = [1 / 3, -2.5e-300, 7.0, float.fromhex("0x1.fffffffffffffp+1")]
    with SeedLog(path, _header()) as log:
        for t, c in enumerate(coefs):
            log.append(t, [(2**63 - 1 - t, c), (t, -c)], lr=0.1 * (t + 1), wd=1e-4)
        with pytest.raises(ValueError, match="expected step 4"):
            log.append(7, [(1, 1.0)], 0.1, 0.0)
        with pytest.raises(ValueError, match="not finite"):
            log.append(4, [(1, float("nan"))], 0.1, 0.0)
        with pytest.raises(TypeError, match="seed"):
            log.append(4, [(-1, 1.0)], 0.1, 0.0)
    header, entries = SeedLog(path).read()
    assert header == _header()
    assert [e.terms for e in entries] == [
        ((2**63 - 1 - t, c), (t, -c)) for t, c in enumerate(coefs)
    ]
    assert [e.lr for e in entries] == [0.1 * (t + 1) for t in range(4)] and {
        e.wd for e in entries
    } == {1e-4}


def test_torn_last_line_is_dropped_and_cut_before_appending(tmp_path) -> None:
    path = tmp_path / "seeds.jsonl"
    with SeedLog(path, _header()) as log:
        log.append(0, [(1, 0.5)], 0.1, 0.0)
        log.append(1, [(2, 0.25)], 0.1, 0.0)
    with path.open("a") as fh:
        fh.write('{"step": 2, "lr": 0.1, "wd": 0.0, "ter')  # killed mid-write
    log = SeedLog(path, _header())  # resume: same initial weights
    assert log.num_steps == 2 and len(log.read()[1]) == 2
    log.append(2, [(3, 0.125)], 0.1, 0.0)
    log.close()
    lines = path.read_text().splitlines()
    assert len(lines) == 4 and json.loads(lines[-1])["terms"] == [[3, 0.125]]


def test_truncate_after_for_resume(tmp_path) -> None:
    path = tmp_path / "seeds.jsonl"
    with SeedLog(path, _header()) as log:
        for t in range(5):
            log.append(t, [(t, 1.0)], 0.1, 0.0)
        log.truncate_after(3)
        assert log.num_steps == 3
        log.append(3, [(99, 2.0)], 0.1, 0.0)
        with pytest.raises(UsageError, match="has 4 steps"):
            log.truncate_after(5)
    assert [e.terms[0][0] for e in SeedLog(path).read()[1]] == [0, 1, 2, 99]


def test_refusals_name_both_hashes(tmp_path) -> None:
    path = tmp_path / "seeds.jsonl"
    SeedLog(path, _header()).close()
    other = SeedHeader.of("m", [torch.ones(2)])
    with pytest.raises(UsageError) as err:
        SeedLog(path, other)
    assert _header().weights_hash in str(err.value) and other.weights_hash in str(err.value)
    with pytest.raises(UsageError) as err:
        replay([torch.ones(2)], path, updater([torch.ones(2)], 0))
    assert _header().weights_hash in str(err.value) and other.weights_hash in str(err.value)
    with pytest.raises(UsageError, match="cannot replay upto=3"):
        replay([torch.zeros(2)], path, updater([torch.zeros(2)], 0), upto=3)
    with pytest.raises(UsageError, match="no seed log"):
        SeedLog(tmp_path / "missing.jsonl")
    (tmp_path / "bad.jsonl").write_text('{"format": "other"}\n')
    with pytest.raises(UsageError, match="not a seed log"):
        SeedLog(tmp_path / "bad.jsonl")
    (tmp_path / "gap.jsonl").write_text(
        json.dumps(_header().to_json()) + '\n{"step": 1, "lr": 0.1, "wd": 0, "terms": [[1, 0.5]]}\n'
    )
    with pytest.raises(UsageError, match="step 1 where step 0"):
        SeedLog(tmp_path / "gap.jsonl")


@pytest.mark.parametrize(
    "entry",
    [
        '{"step": 0, "lr": 0.1, "wd": 0.0, "terms": [[-5, 0.5]]}',
        '{"step": 0, "lr": 0.1, "wd": 0.0, "terms": [[' + str(2**70) + ", 0.5]]}",
        '{"step": 0, "lr": 0.1, "wd": 0.0, "terms": [[1.7, 0.5]]}',
        '{"step": 0, "lr": 0.1, "wd": 0.0, "terms": [[true, 0.5]]}',
        '{"step": 0, "lr": 0.1, "wd": 0.0, "terms": [[1, NaN]]}',
        '{"step": 0, "lr": 0.1, "wd": 0.0, "terms": [[1, "0.5"]]}',
        '{"step": 0, "lr": 0.1, "wd": 0.0, "terms": []}',
        '{"step": 0, "lr": 0.1, "wd": 0.0, "terms": 5}',
        '{"step": 0, "lr": "inf", "wd": 0.0, "terms": [[1, 0.5]]}',
        '{"step": 0, "lr": Infinity, "wd": 0.0, "terms": [[1, 0.5]]}',
        '{"step": 0.0, "lr": 0.1, "wd": 0.0, "terms": [[1, 0.5]]}',
        "[0, 0.1, 0.0]",
    ],
)
def test_reading_checks_entries_as_append_does(tmp_path, entry) -> None:
    """What append refuses to write, reading refuses too (it used to replay a nan or inf
    coefficient into non-finite weights, and truncate a seed of 1.7 to 1)."""
    path = tmp_path / "seeds.jsonl"
    path.write_text(json.dumps(_header().to_json()) + "\n" + entry + "\n")
    with pytest.raises(UsageError, match="line 2: corrupt seed-log entry"):
        SeedLog(path)


@pytest.mark.parametrize("key", ["model", "weights_hash", "num_params"])
def test_a_header_without_a_key_names_it(tmp_path, key) -> None:
    head = _header().to_json()
    del head[key]
    path = tmp_path / "seeds.jsonl"
    path.write_text(json.dumps(head) + "\n")
    with pytest.raises(UsageError, match=f"no {key!r}"):
        SeedLog(path)
