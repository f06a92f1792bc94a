"""Exact perturbations: ``smoothlab.perturb.shifted`` (on-the-fly hooks and data swap).

A forward inside ``shifted`` equals a forward of a model whose weight was *replaced* by
W + s·d; afterwards every parameter is bit-identical, also when the body raises. The reason
for the design is demonstrated: an in-place +μz / −μz pair drifts (fp32 slightly, bf16 by
as much as the update), ``shifted`` does not.
"""

from __future__ import annotations

import copy
import math
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from torch import nn

from smoothlab import perturb, seeded_gaussian, shifted
from smoothlab.errors import UsageError
from smoothlab.perturb import (
    SOURCES,
    TABLE_CAP,
    TABLE_MIN,
    Scratch,
    get_source,
    param_seed,
    seeded,
    spsa_curvature,
    spsa_second_moment,
    table_size,
)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(5, 7)
        self.fc2 = nn.Linear(7, 3)
        self.scale = nn.Parameter(torch.tensor(1.5))  # owned by the root, read in its forward

    def forward(self, x):
        return self.scale * self.fc2(torch.tanh(self.fc1(x)))


def make(dtype=torch.float32):
    torch.manual_seed(0)
    return Net().to(dtype), torch.randn(4, 5).to(dtype)


def manual(model, params, directions, scale):
    """A deep copy of ``model`` whose perturbed parameters are replaced by W + s·d."""
    twin = copy.deepcopy(model)
    index = {id(p): i for i, p in enumerate(params)}
    with torch.no_grad():
        for p, q in zip(model.parameters(), twin.parameters()):
            if id(p) in index:
                q.copy_(torch.add(p, directions[index[id(p)]].to(p.dtype), alpha=scale))
    return twin


def snapshot(model):
    return [p.detach().clone() for p in model.parameters()]


def same(model, snap):
    return all(torch.equal(p.detach(), s) for p, s in zip(model.parameters(), snap))


@pytest.mark.parametrize("on_the_fly", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_shifted_forward_equals_manual_copy(on_the_fly, dtype):
    model, x = make(dtype)
    params = [model.fc1.weight, model.fc2.bias, model.scale]
    g = torch.Generator().manual_seed(1)
    dirs = [torch.randn(p.shape, generator=g) for p in params]
    snap = snapshot(model)
    for s in (0.3, -0.05):
        expected = manual(model, params, dirs, s)(x)
        with shifted(params, dirs, s, root=model if on_the_fly else None):
            out = model(x)
            again = model(x)  # the shift holds for every forward inside the context
        assert torch.equal(out, expected) and torch.equal(again, expected)
        assert same(model, snap)
        assert not torch.equal(out, model(x))
    assert torch.equal(model(x), manual(model, params, dirs, 0.0)(x))


@pytest.mark.parametrize("on_the_fly", [True, False])
def test_gradient_inside_shift_is_gradient_at_shifted_point(on_the_fly):
    model, x = make(torch.float64)
    params = [model.fc1.weight, model.scale]
    dirs = [torch.randn_like(p) for p in params]
    twin = manual(model, params, dirs, 0.1)
    expected = torch.autograd.grad(twin(x).pow(2).sum(), [twin.fc1.weight, twin.scale])
    with shifted(params, dirs, 0.1, root=model if on_the_fly else None):
        got = torch.autograd.grad(model(x).pow(2).sum(), params)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("on_the_fly", [True, False])
def test_restored_bit_exact_when_body_raises(on_the_fly):
    model, x = make(torch.bfloat16)
    params = list(model.parameters())
    snap = snapshot(model)
    objs = [p.data.data_ptr() for p in params]
    with pytest.raises(RuntimeError, match="inside"):
        with shifted(params, seeded_gaussian(3), 1e-2, root=model if on_the_fly else None):
            model(x)
            raise RuntimeError("inside")
    assert same(model, snap)
    assert [p.data.data_ptr() for p in params] == objs
    # no hook or shadow left behind: forward equals the unperturbed one
    assert torch.equal(
        model(x), manual(model, params, [torch.zeros_like(p) for p in params], 0.0)(x)
    )
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in model.modules())
    assert not any(n in vars(m) for m in model.modules() for n in m._parameters)


def test_shifted_raises_mid_forward_leaves_no_shadow():
    """A forward that raises inside a hooked module: the shadow is removed (always_call)."""
    model, x = make()
    snap = snapshot(model)
    with pytest.raises(RuntimeError):
        with shifted([model.fc2.weight], seeded_gaussian(0), 0.5, root=model):
            model(torch.randn(4, 6))  # wrong width: fc1 fails
    with pytest.raises(RuntimeError):
        with shifted([model.fc1.weight], seeded_gaussian(0), 0.5, root=model):
            model.fc1(torch.randn(4, 6))
    assert "weight" not in vars(model.fc1) and same(model, snap)


def test_bf16_add_subtract_pair_drifts_but_shifted_does_not():
    """The design's reason: W + μz − μz ≠ W in floating point; in bf16 the drift is as large
    as the update. ``shifted`` never writes W, so W is bit-identical afterwards."""
    torch.manual_seed(0)
    mu = 1e-2
    drifts = {}
    for dtype in (torch.float32, torch.bfloat16):
        w = torch.randn(256, 256).to(dtype)
        z = seeded_gaussian(7)(0, w)
        w0 = w.clone()
        w.add_(mu * z)
        w.sub_(mu * z)
        drifts[dtype] = float((w.float() - w0.float()).abs().max())
        update = float((mu * z).float().abs().max())
        # the exact mechanisms leave no trace
        p = nn.Parameter(w0.clone())
        holder = nn.Module()
        holder.p = p
        for root in (holder, None):
            with shifted([p], seeded_gaussian(7), mu, root=root):
                pass
            assert torch.equal(p.detach(), w0)
    assert 0 < drifts[torch.float32] < 1e-6  # fp32: an ulp here and there
    assert drifts[torch.bfloat16] >= 0.25 * update  # bf16: of the order of the update itself
    assert drifts[torch.bfloat16] > 1e4 * drifts[torch.float32]
    # and the drift accumulates over repeated ZO steps in bf16, while a model evaluated
    # through ``shifted`` the same number of times is unchanged
    model = nn.Linear(64, 64, bias=False).to(torch.bfloat16)
    w0 = model.weight.detach().clone()
    x = torch.randn(3, 64).to(torch.bfloat16)
    w = w0.clone()
    for k in range(20):
        z = seeded_gaussian(k)(0, w)
        w.add_(mu * z)
        w.sub_(mu * z)
        with shifted([model.weight], seeded_gaussian(k), mu, root=model):
            model(x)
        with shifted([model.weight], seeded_gaussian(k), -mu, root=model):
            model(x)
    assert not torch.equal(w, w0)
    assert torch.equal(model.weight.detach(), w0)


def test_seeded_gaussian_replays_and_leaves_global_rng_alone():
    state = torch.get_rng_state()
    p32 = torch.zeros(50, 3)
    d = seeded_gaussian(11)
    a, b = d(0, p32), d(0, p32)
    assert torch.equal(a, b) and a.dtype == torch.float32 and a.shape == p32.shape
    assert not torch.equal(a, d(1, p32)) and not torch.equal(a, seeded_gaussian(12)(0, p32))
    assert torch.equal(d(0, p32.bfloat16()), a.bfloat16())  # same z, rounded
    assert torch.equal(torch.get_rng_state(), state)
    assert 0.8 < float(a.std()) < 1.2
    assert param_seed(1, 0) != param_seed(0, 1) and 0 <= param_seed(2**70, 5) < 2**63


def test_scale_zero_is_a_no_op_and_unknown_params_are_rejected():
    model, x = make()
    with shifted([model.fc1.weight], seeded_gaussian(0), 0.0, root=model):
        assert not model.fc1._forward_pre_hooks
        out = model(x)
    assert torch.equal(out, model(x))
    stranger = nn.Parameter(torch.zeros(3))
    with pytest.raises(ValueError, match="not registered.*Net"):
        with shifted([stranger], seeded_gaussian(0), 0.1, root=model):
            pass


def test_tied_parameter_is_shifted_everywhere():
    """A parameter registered in two modules (tied embeddings) is shifted in both."""
    emb = nn.Embedding(10, 4)
    head = nn.Linear(4, 10, bias=False)
    head.weight = emb.weight
    model = nn.Sequential(emb, head).double()
    ids = torch.tensor([[1, 2, 3]])
    d = [torch.randn(10, 4, dtype=torch.float64)]
    twin = copy.deepcopy(model)  # deepcopy keeps the tie
    with torch.no_grad():
        twin[0].weight.add_(0.2 * d[0])
    assert twin[1].weight is twin[0].weight
    with shifted([model[0].weight], d, 0.2, root=model):
        out = model(ids)
    torch.testing.assert_close(out, twin(ids), rtol=1e-14, atol=1e-14)


class DictOwner(nn.Module):
    """Like peft's LoRA embedding: parameters live in a ParameterDict that has no forward of
    its own and are read by the parent's forward."""

    def __init__(self):
        super().__init__()
        self.pd = nn.ParameterDict({"a": nn.Parameter(torch.randn(4, 3, dtype=torch.float64))})
        self.lin = nn.Linear(4, 2).double()

    def forward(self, x):
        return self.lin(x @ self.pd["a"].T)


@pytest.mark.parametrize("on_the_fly", [True, False])
def test_parameter_dict_owned_parameter_is_shifted(on_the_fly):
    torch.manual_seed(0)
    model = DictOwner()
    x = torch.randn(5, 3, dtype=torch.float64)
    p = model.pd["a"]
    d = [torch.randn_like(p)]
    expected = manual(model, [p], d, 0.3)(x)
    snap = snapshot(model)
    with shifted([p], d, 0.3, root=model if on_the_fly else None):
        out = model(x)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    assert same(model, snap) and "a" not in vars(model.pd)


class EmbedNet(nn.Module):
    """A vocabulary embedding (read row-wise), a scaled-embedding subclass and a max_norm
    embedding (both must take the dense path) and a head tied to the first embedding."""

    class Scaled(nn.Embedding):
        def forward(self, ids):
            return super().forward(ids) * 3.0

    def __init__(self, vocab=300, dim=37):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.scaled = self.Scaled(7, dim)
        self.normed = nn.Embedding(5, dim, max_norm=1e9)  # renorm never bites: same output
        self.head = nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, ids):
        h = self.emb(ids) + self.scaled(ids % 7) + self.normed(input=ids % 5)
        return self.head(torch.tanh(h))


def _wrapping_seed(sampler, index: int, n: int) -> int:
    """A perturbation seed whose table slice for parameter ``index`` wraps around the end."""
    size = sampler.table_size
    return next(s for s in range(100_000) if param_seed(s, index) % size > size - n)


@pytest.mark.parametrize("name", ["table", "hash", "gaussian", "explicit"])
def test_embedding_rows_equal_the_dense_shift(name, monkeypatch):
    """An embedding is perturbed row-wise (W[ids] + s·z[ids]) when the direction fetches rows
    cheaply (the table, the counter-based hash, explicit tensors), densely otherwise; either way the forward and the
    gradient equal the replaced-weight model's, also when the table slice wraps around, and
    a scaled or max_norm embedding subclass is never taken row-wise."""
    torch.manual_seed(0)
    model = EmbedNet()
    ids = torch.randint(0, 300, (4, 9))
    params = list(model.parameters())
    sampler = get_source("table").sampler(run_seed=0)
    seeds = [3, _wrapping_seed(sampler, 0, params[0].numel())]
    rows_of: list[int] = []
    for seed in seeds:
        if name == "explicit":
            g = torch.Generator().manual_seed(seed)
            d = [torch.randn(p.shape, generator=g) for p in params]
            dirs = d
        else:
            d = get_source(name).sampler(run_seed=0)(seed)
            dirs = [d(i, p) for i, p in enumerate(params)]
            spy = getattr(type(d), "rows", None)  # gaussian has none: it must never be asked

            def counting(self, index, w, ids, spy=spy):
                rows_of.append(index)
                return spy(self, index, w, ids)

            monkeypatch.setattr(type(d), "rows", counting, raising=False)
        twin = manual(model, params, dirs, 0.3)
        with torch.no_grad(), shifted(params, d, 0.3, root=model, scratch=Scratch()):
            out = model(ids)
        assert torch.equal(out, twin(ids))
        with shifted(params, d, 0.3, root=model):
            got = torch.autograd.grad(model(ids).square().sum(), params)
        expected = torch.autograd.grad(twin(ids).square().sum(), list(twin.parameters()))
        for a, b in zip(got, expected):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    if name != "explicit":
        assert set(rows_of) == ({0} if name in ("table", "hash") else set())


# --------------------------------------------------------------------------- sources

KURTOSIS = {"gaussian": 3.0, "table": 3.0, "rademacher": 1.0, "hash": 1.0}


def test_registry_names_kurtosis_and_unknown_source():
    assert set(SOURCES) == set(KURTOSIS)
    for name in SOURCES:
        src = get_source(name)
        assert src.name == name and src.kurtosis == KURTOSIS[name] and src.summary
    with pytest.raises(UsageError, match="'normal'.*gaussian.*table"):
        get_source("normal")


def test_seeded_gaussian_is_torch_randn_of_the_parameter_seed():
    """The exact Gaussian is unchanged: z_i = randn(shape) from a generator seeded with
    param_seed(seed, i), also when written into scratch memory by the fused forms."""
    p = torch.randn(33, 17)
    gen = torch.Generator().manual_seed(param_seed(9, 4))
    expected = torch.randn(p.shape, generator=gen)
    assert torch.equal(seeded_gaussian(9)(4, p), expected)
    assert torch.equal(seeded("gaussian", 9).shift(4, p, 0.1), torch.add(p, expected, alpha=0.1))


@pytest.mark.parametrize("name", SOURCES)
def test_source_entries_have_zero_mean_unit_variance_and_its_fourth_moment(name):
    """Over 4·10⁵ entries (several seeds and parameters): mean 0, E z² = 1 and E z⁴ = κ within
    4 standard errors of each sample mean; a wrong κ (3 ↔ 1) is far outside."""
    sampler = get_source(name).sampler(run_seed=5)
    p = torch.zeros(200, 500)
    z = torch.cat([sampler(s)(i, p).reshape(-1) for s in (1, 2) for i in (0, 3)]).double()
    for k, target in ((1, 0.0), (2, 1.0), (4, KURTOSIS[name])):
        m = z.pow(k)
        se = float(m.std()) / math.sqrt(m.numel())
        assert abs(float(m.mean()) - target) <= 4 * se + 1e-12, (k, float(m.mean()), se)
    wrong = 4 - KURTOSIS[name]  # 1 for the Gaussians, 3 for the signs
    m4 = z.pow(4)
    assert abs(float(m4.mean()) - wrong) > 4 * float(m4.std()) / math.sqrt(m4.numel()) + 0.1
    # distinct parameters and seeds give (nearly) uncorrelated z
    a, b, c = (sampler(s)(i, p).reshape(-1).double() for s, i in ((1, 0), (1, 1), (2, 0)))
    n = a.numel()
    assert abs(float(a @ b)) / n < 4 / math.sqrt(n) and abs(float(a @ c)) / n < 4 / math.sqrt(n)


@pytest.mark.parametrize("name", SOURCES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_call_shift_and_update_agree_bit_exactly_and_replay(name, dtype):
    """d(i, p), the fused shift (fresh or into scratch) and the in-place update are the same
    z; a fresh sampler of the same run replays it; the global RNG is never touched."""
    p = torch.randn(129, 65).to(dtype)  # not a multiple of 64 entries: padded sign words
    state = torch.get_rng_state()
    d = get_source(name).sampler(run_seed=3)(17)
    z = d(2, p)
    assert z.shape == p.shape and z.dtype == p.dtype
    assert torch.equal(z, get_source(name).sampler(run_seed=3)(17)(2, p))
    assert torch.equal(d.shift(2, p, 0.25), torch.add(p, z, alpha=0.25))
    buf = torch.full((p.numel() + 100,), float("nan"), dtype=dtype)
    assert torch.equal(d.shift(2, p, -0.5, out=buf), torch.add(p, z, alpha=-0.5))
    w = p.clone()
    d.update_(2, w, 1e-2)
    assert torch.equal(w, torch.add(p, z, alpha=1e-2))
    assert not torch.equal(z, d(3, p)) and not torch.equal(z, get_source(name).sampler(3)(18)(2, p))
    if dtype == torch.bfloat16:  # the same z as float32, rounded
        assert torch.equal(z, d(2, p.float()).bfloat16())
    assert torch.equal(torch.get_rng_state(), state)


def test_noise_table_is_the_runs_and_its_size_is_capped():
    """One table per run seed: other run seeds see other z. Every table has 2²² entries
    (TABLE_MIN = TABLE_CAP); uncapped (runs saved before the cap) it covers the largest
    parameter, rounded up to 2²⁰ entries. A parameter as large as the table is a rotation
    of it (no entry repeated)."""
    p = torch.zeros(1000)
    a = get_source("table").sampler(run_seed=1)(5)(0, p)
    assert not torch.equal(a, get_source("table").sampler(run_seed=2)(5)(0, p))
    mib = 1 << 20
    assert table_size(0) == table_size(1000) == TABLE_MIN == 4 * mib
    assert table_size(8 * mib + 1) == table_size(50_272 * 2048) == TABLE_CAP == TABLE_MIN
    assert table_size(8 * mib + 1, capped=False) == 9 * mib
    assert table_size(50_272 * 2048, capped=False) == 99 * mib  # OPT-1.3B's embedding
    assert get_source("table").sampler(max_numel=10**9).table_size == TABLE_CAP
    assert get_source("table").sampler(max_numel=10**9, table=5 * mib).table_size == 5 * mib
    sampler = get_source("table").sampler(run_seed=1, max_numel=10)
    t = sampler.noise_table(torch.device("cpu"), torch.float32)
    whole = sampler(8)(0, torch.zeros(t.numel()))
    assert torch.equal(whole.sort().values, t.sort().values)


def _table_z_by_hand(t: torch.Tensor, seed: int, index: int, n: int) -> torch.Tensor:
    """z of the ``table`` source as its docstring defines it, entry by entry."""
    size, key = t.numel(), param_seed(seed, index)
    out = []
    for k, a in enumerate(range(0, n, size)):
        o = (key if k == 0 else param_seed(key, k)) % size
        out.append(t[(o + torch.arange(min(size, n - a))) % size])
    return torch.cat(out)


@pytest.mark.parametrize("shape", [(250, 40), (10_000,), (97, 129)])
def test_a_parameter_larger_than_the_table_takes_several_slices(shape):
    """With a table smaller than the parameter (4096 entries here), z is one run of T entries
    per slice at independent seeded offsets, as the docstring defines it. d(i, p), the fused
    shift and update and an embedding's rows (rows crossing slice boundaries) all give that
    z, bit for bit; the slices' offsets differ, so z does not repeat one rotation."""
    sampler = get_source("table").sampler(run_seed=4, table=4096)
    t = sampler.noise_table(torch.device("cpu"), torch.float32)
    p = torch.randn(shape)
    d = sampler(21)
    z = d(3, p)
    expected = _table_z_by_hand(t, 21, 3, p.numel()).view(shape)
    assert torch.equal(z, expected)
    _, pieces = d._pieces(3, p)
    runs = [o for a, o, _ in pieces if a % 4096 == 0]
    assert len(runs) == -(-p.numel() // 4096) and len(set(runs)) == len(runs)
    assert torch.equal(d.shift(3, p, 0.3), torch.add(p, z, alpha=0.3))
    w = p.clone()
    d.update_(3, w, -0.7)
    assert torch.equal(w, torch.add(p, z, alpha=-0.7))
    if len(shape) == 2:
        # rows 31 of 97 x 129 and 102, 204 of 250 x 40 cross a slice boundary
        rows = [0, 1, 31, 51, shape[0] - 1] + ([102, 204] if shape[0] > 204 else [])
        ids = torch.tensor(rows).view(1, -1).repeat(2, 1)
        assert torch.equal(d.rows(3, p, ids), z[ids])


@pytest.mark.parametrize("name", SOURCES)
@pytest.mark.parametrize("on_the_fly", [True, False])
@pytest.mark.parametrize("small", [0, perturb.SMALL])
def test_shifted_with_each_source_and_scratch_equals_manual_copy(
    name, on_the_fly, small, monkeypatch
):
    """A seeded direction through ``shifted`` (fused, shadows in reusable scratch) equals the
    replaced-weight model; nested owners (the root's ``scale`` is read before ``fc2`` runs)
    get distinct buffers; the scratch holds its buffers for reuse afterwards. ``small``:
    parameters up to this size are shadowed once for the whole context (here: all or none)."""
    monkeypatch.setattr(perturb, "SMALL", small)
    model, x = make()
    params = list(model.parameters())
    d = get_source(name).sampler(run_seed=0)(4)
    dirs = [d(i, p) for i, p in enumerate(params)]
    scratch = Scratch()
    snap = snapshot(model)
    expected = manual(model, params, dirs, 0.3)(x)
    for _ in range(2):
        with (
            torch.no_grad(),
            shifted(params, d, 0.3, root=model if on_the_fly else None, scratch=scratch),
        ):
            out = model(x)
        assert torch.equal(out, expected) and same(model, snap)
    with shifted(
        params, d, 0.3, root=model if on_the_fly else None, scratch=scratch
    ):  # autograd on
        out = model(x)
        g = torch.autograd.grad(out.sum(), [model.fc1.weight])[0]
    twin = manual(model, params, dirs, 0.3)
    expected_g = torch.autograd.grad(twin(x).sum(), [twin.fc1.weight])[0]
    torch.testing.assert_close(g, expected_g, rtol=1e-6, atol=1e-6)
    if on_the_fly and not small:
        assert scratch._free  # the buffers came back


# --------------------------------------------------------------------------- SPSA moments


def _mc_moments(name: str, a: torch.Tensor, H: torch.Tensor, q: int, n: int):
    """Monte Carlo over n estimates ĝ = (1/q) Σ (zᵀa) z: samples of ‖ĝ‖², ĝᵀHĝ and ĝ."""
    sampler = get_source(name).sampler(run_seed=0)
    x = torch.zeros_like(a)
    norms, curv, gs = [], [], []
    for k in range(n):
        zs = [sampler(k * q + i)(0, x) for i in range(q)]
        g = sum((z @ a) * z for z in zs) / q
        gs.append(g)
        norms.append(float(g @ g))
        curv.append(float(g @ H @ g))
    return (
        torch.tensor(norms, dtype=torch.float64),
        torch.tensor(curv, dtype=torch.float64),
        torch.stack(gs),
    )


@pytest.mark.parametrize("name", SOURCES)
@pytest.mark.parametrize("q", [1, 3])
def test_spsa_moment_formulas_match_monte_carlo(name, q):
    """E ĝ = a, E‖ĝ‖² = ((d + κ − 2)/q + 1)‖a‖² and E[ĝᵀHĝ] (spsa_curvature) for every source,
    within 4 standard errors of the Monte Carlo means; the other κ's formula is rejected."""
    gen = torch.Generator().manual_seed(1)
    d = 4
    a = torch.randn(d, generator=gen, dtype=torch.float64) * torch.tensor(
        [3.0, 1.0, 0.3, 2.0], dtype=torch.float64
    )
    M = torch.randn(d, d, generator=gen, dtype=torch.float64)
    H = M @ M.T + torch.diag(torch.tensor([5.0, 0.1, 2.0, 0.5], dtype=torch.float64))
    kappa = get_source(name).kurtosis
    norms, curv, gs = _mc_moments(name, a, H, q, 6000)
    se = lambda v: float(v.std()) / math.sqrt(len(v))  # noqa: E731
    mean_g, se_g = gs.mean(0), gs.std(0) / math.sqrt(len(gs))
    assert ((mean_g - a).abs() < 4 * se_g).all(), (mean_g, a)
    a2 = float(a @ a)
    assert abs(float(norms.mean()) - spsa_second_moment(a2, d, q, kappa)) < 4 * se(norms)
    assert abs(float(curv.mean()) - spsa_curvature(a, H, q, kappa)) < 4 * se(curv)
    if q == 1:  # the test can fail: the wrong kurtosis is many standard errors away
        assert abs(float(norms.mean()) - spsa_second_moment(a2, d, q, 4 - kappa)) > 4 * se(norms)
    assert get_source(name).second_moment(a2, d, q) == spsa_second_moment(a2, d, q, kappa)


def test_spsa_second_moment_closed_forms_and_errors():
    assert spsa_second_moment(2.0, 10, 1, 3.0) == pytest.approx(2.0 * 12)  # (d + 1)/q + 1
    assert spsa_second_moment(2.0, 10, 2, 1.0) == pytest.approx(2.0 * (9 / 2 + 1))
    H = torch.diag(torch.tensor([2.0, 3.0], dtype=torch.float64))
    a = torch.tensor([1.0, 0.0], dtype=torch.float64)
    # Rademacher, d = 2: ĝ = z₁(z₁a₁)… = a₁(1, z₁z₂) → ĝᵀHĝ = 2 + 3 = 5 exactly
    assert spsa_curvature(a, H, 1, 1.0) == pytest.approx(5.0)
    with pytest.raises(UsageError, match="d=0"):
        spsa_second_moment(1.0, 0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", SOURCES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sources_on_cuda(name, dtype):
    """On CUDA the table / generator lives on the device: the fused forms agree bit-exactly,
    moments hold, and the counter-based source gives the same z as on CPU."""
    p = torch.randn(1000, 333, device="cuda").to(dtype)
    d = get_source(name).sampler(run_seed=2)(5)
    z = d(1, p)
    assert z.device.type == "cuda" and z.dtype == dtype
    assert torch.equal(d.shift(1, p, 0.5), torch.add(p, z, alpha=0.5))
    w = p.clone()
    d.update_(1, w, -0.25)
    assert torch.equal(w, torch.add(p, z, alpha=-0.25))
    zf = z.double().reshape(-1)
    se = 4 / math.sqrt(zf.numel())
    assert abs(float(zf.mean())) < se and abs(float(zf.pow(2).mean()) - 1) < 4 * se * math.sqrt(
        KURTOSIS[name]
    )
    if name == "hash":
        assert torch.equal(z.cpu(), seeded("hash", 5)(1, p.cpu()))


@pytest.mark.parametrize("shape", [(300, 37), (50, 64), (7, 1), (2, 1000)])
def test_hash_in_chunks_and_rows_is_the_same_z(shape, monkeypatch):
    """The counter-based source generates z in chunks (shift, update) and per row (an
    embedding's batch rows): both bit-identical to z built whole, at any row width (a row's
    entries start at any bit of a word) and when a chunk ends inside a parameter."""
    d = get_source("hash").sampler(run_seed=1)(11)
    w = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    z = d(3, w)
    ids = torch.randint(0, shape[0], (5, 6), generator=torch.Generator().manual_seed(1))
    assert torch.equal(d.rows(3, w, ids), z[ids])
    for chunk in (64, 192, d.CHUNK):
        monkeypatch.setattr(type(d), "CHUNK", chunk)
        assert torch.equal(d.shift(3, w, 0.7), torch.add(w, z, alpha=0.7))
        x = w.clone()
        d.update_(3, x, -0.2)
        assert torch.equal(x, torch.add(w, z, alpha=-0.2))


def test_table_batched_shift_and_update_equal_one_parameter_at_a_time():
    """``shift_many`` / ``update_many`` (one ``torch._foreach_add`` over the parameters whose
    z is one table slice) equal ``shift`` / ``update_`` per parameter bit for bit, with a
    slice that wraps around the table's end and a non-contiguous parameter among them."""
    from smoothlab.hybrid.engine import zo_update

    g = torch.Generator().manual_seed(0)
    ps = [torch.randn(300, 70, generator=g), torch.randn(5, generator=g)]
    ps.append(torch.randn(40, 30, generator=g).t())  # not contiguous
    sampler = get_source("table").sampler(run_seed=3)
    seed = _wrapping_seed(sampler, 0, ps[0].numel())
    d = sampler(seed)
    assert len(d._pieces(0, ps[0])[1]) == 2  # parameter 0's slice wraps around
    idx = [0, 1, 2]
    for got, i, p in zip(d.shift_many(idx, ps, 0.3), idx, ps):
        assert torch.equal(got, d.shift(i, p, 0.3))
    one, many = [p.clone() for p in ps], [p.clone() for p in ps]
    for i, p in zip(idx, one):
        d.update_(i, p, -0.7)
    d.update_many(idx, many, -0.7)
    assert all(torch.equal(a, b) for a, b in zip(one, many))
    # zo_update (term by term, batched) = per parameter: decay, then each term in order
    terms, lr, wd = [(seed, 0.5), (seed + 1, -2.0)], 0.1, 0.01
    expected = [p.clone() for p in ps]
    for i, p in zip(idx, expected):
        p.mul_(1 - lr * wd)
        for s, c in terms:
            sampler(s).update_(i, p, -lr * c)
    got = [p.clone() for p in ps]
    zo_update(sampler, got, terms, lr, wd)
    assert all(torch.equal(a, b) for a, b in zip(expected, got))


class Conv1D(nn.Module):
    """A linear layer that is not an ``nn.Linear`` (GPT-2's ``Conv1D`` stores W transposed)."""

    def __init__(self, n_in: int, n_out: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n_in, n_out) / n_in**0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight


@pytest.mark.parametrize("layer", [nn.Linear, Conv1D])
def test_backward_inside_lends_scratch_and_the_gradient_is_right(layer):
    """With ``backward_inside`` a forward under autograd takes its layer shadows from
    scratch. An ``nn.Linear`` rebuilds its shadow in the backward, so the graph holds none:
    the buffer is back after each product and one buffer serves both layers. Any other
    layer's shadow is read by the graph, so each layer holds its own buffer until exit (had
    a later layer reused an earlier one's buffer, the gradient through both would be
    wrong). Either way the gradient is the replaced-weight model's, bit for bit."""
    torch.manual_seed(0)
    net = nn.Sequential(layer(300, 300), nn.Tanh(), layer(300, 300), nn.Tanh())
    base = [net[0].weight, net[2].weight]  # 90,000 entries each: shadowed layer by layer
    for p in net.parameters():
        p.requires_grad_(False)
    y = nn.Parameter(torch.randn(8, 300))  # the trained weights sit below both layers
    d = get_source("table").sampler(run_seed=1)(5)
    twin = manual(net, base, [d(i, p) for i, p in enumerate(base)], 0.3)
    expected = torch.autograd.grad(twin(y).square().sum(), [y])[0]
    scratch = Scratch()
    with shifted(base, d, 0.3, root=net, scratch=scratch, backward_inside=True):
        loss = net(y).square().sum()
        lent = not any(scratch._free.values())
        got = torch.autograd.grad(loss, [y])[0]
    assert torch.equal(got, expected)
    bufs = [b for free in scratch._free.values() for b in free]
    if layer is nn.Linear:
        assert not lent and len(bufs) == 1  # back after each use, reused by the next
    else:
        assert lent and len(bufs) == 2 and bufs[0].data_ptr() != bufs[1].data_ptr()


class TiedLM(nn.Module):
    """An embedding tied to a head, and an untied linear layer with a bias."""

    def __init__(self, vocab: int = 50, dim: int = 16) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.mid = nn.Linear(dim, 40)
        self.out = nn.Linear(40, dim, bias=False)
        self.head = nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.out(torch.tanh(self.mid(self.emb(ids)))))


CUDA = pytest.param(
    "cuda",
    marks=[
        pytest.mark.gpu,
        pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    ],
)


@pytest.mark.parametrize("device", ["cpu", CUDA])
@pytest.mark.parametrize("name", ["table", "hash"])
def test_a_large_linear_layer_is_shifted_a_block_of_rows_at_a_time(name, device, monkeypatch):
    """A linear weight larger than BLOCK (60 entries here, and SMALL 40 so that the weights
    are shifted per layer and the bias for the whole context: blocks of 3 rows of the head
    and of the 40 x 16 layer) is shifted a block at a time without a gradient: the output is the
    replaced-weight model's (float64, to rounding), the whole-weight shift is never asked for
    those layers, and each layer's own forward is back after the context. With a gradient
    the result is the replaced-weight model's too: with ``backward_inside`` the backward
    rebuilds the blocks (no whole shadow), without it the graph keeps the whole shadow. On
    CUDA (marked ``gpu``) the same, with the table or the hash on the device."""
    monkeypatch.setattr(perturb, "BLOCK", 60)
    monkeypatch.setattr(perturb, "SMALL", 40)
    torch.manual_seed(0)
    model = TiedLM().double().to(device)
    params = list(model.parameters())
    ids = torch.randint(0, 50, (3, 7)).to(device)
    d = get_source(name).sampler(run_seed=1)(7)
    twin = manual(model, params, [d(i, p) for i, p in enumerate(params)], 0.3)
    whole: list[int] = []
    real_shift = type(d).shift
    monkeypatch.setattr(
        type(d), "shift", lambda self, i, *a, **k: whole.append(i) or real_shift(self, i, *a, **k)
    )
    with torch.no_grad(), shifted(params, d, 0.3, root=model, scratch=Scratch()):
        got = model(ids)
        assert "forward" in model.head.__dict__ and "forward" in model.mid.__dict__
        h = torch.randn(2, 16, dtype=torch.float64, device=device)
        assert torch.equal(model.mid(input=h), model.mid(h))  # called as nn.Linear is
    torch.testing.assert_close(got, twin(ids), rtol=1e-13, atol=1e-13)
    index = {id(p): i for i, p in enumerate(params)}
    big = {index[id(model.head.weight)], index[id(model.mid.weight)]}
    assert not big & set(whole)  # blocks only (the 40 x 16 `out` weight is blocked too)
    assert not any("forward" in m.__dict__ for m in model.modules())
    # under autograd: with backward_inside (the engine's gradient at the perturbed point) the
    # backward rebuilds the blocks too; otherwise the graph keeps the whole shadow
    for p in params:  # as in a ZO block: the gradient flows to the input only
        p.requires_grad_(False)
    x = nn.Parameter(torch.randn(3, 7, 16, dtype=torch.float64, device=device))
    loss = lambda m: m.head(m.out(torch.tanh(m.mid(x)))).square().sum()  # noqa: E731
    expected = torch.autograd.grad(loss(twin), [x])[0]
    whole.clear()
    for inside in (True, False):
        with shifted(params, d, 0.3, root=model, scratch=Scratch(), backward_inside=inside):
            got = torch.autograd.grad(loss(model), [x])[0]
        torch.testing.assert_close(got, expected, rtol=1e-13, atol=1e-13)
        assert bool(big & set(whole)) is not inside
        whole.clear()


class _Positions(nn.Module):
    """Learned positions returned as a view of the weight (``self.pe[:n]``)."""

    def __init__(self) -> None:
        super().__init__()
        self.pe = nn.Parameter(torch.randn(512, 256))

    def forward(self, n: int) -> torch.Tensor:
        return self.pe[:n]


class _ViewThenLinear(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.pos = _Positions()
        self.lin = nn.Linear(256, 300)

    def forward(self, n: int) -> torch.Tensor:
        p = self.pos(n)
        return p + 0 * self.lin(torch.ones(n, 256))[:, :256]


def test_a_layer_output_that_views_its_shadow_keeps_the_scratch_buffer():
    """With scratch, a layer's shadow goes back to the pool after the layer, and the next
    layer's shadow reuses it. An output that is a view of that shadow must keep it."""
    torch.manual_seed(0)
    model = _ViewThenLinear()
    zo = [model.pos.pe, model.lin.weight]
    sampler = get_source("table").sampler(run_seed=0)
    d = sampler(1)
    want = torch.add(model.pos.pe, d(0, model.pos.pe), alpha=1e-3)[:8]
    with torch.no_grad(), shifted(zo, d, 1e-3, model, scratch=sampler.scratch):
        assert torch.equal(model(8), want)


class _Reader(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(3, 3)
        self.b = nn.Linear(3, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        assert self.b.weight.dtype == x.dtype and self.b.weight.shape == (3, 3)  # metadata
        return self.a(x) + x @ self.b.weight.data.T  # a value read of b.weight, from outside b


def test_outside_reads_reports_value_reads_only():
    model = _Reader()
    params = [model.a.weight, model.a.bias, model.b.weight, model.b.bias]
    x = torch.randn(2, 3)
    assert perturb.outside_reads(model, params, lambda: model(x).sum()) == {2}
    assert "weight" not in vars(model.b)


def test_the_noise_table_is_drawn_once_per_dtype(monkeypatch):
    """A ZO block mixing bfloat16 weights and float32 norms keeps a table of each dtype,
    instead of redrawing the table at every switch."""
    sampler = get_source("table").sampler(run_seed=0)
    draws = []
    randn = torch.randn
    monkeypatch.setattr(torch, "randn", lambda *a, **k: draws.append(1) or randn(*a, **k))
    for _ in range(3):
        for dtype in (torch.bfloat16, torch.float32):
            t = sampler.noise_table(torch.device("cpu"), dtype)
            assert t.dtype == dtype
    assert len(draws) == 2
    assert torch.equal(
        sampler.noise_table("cpu", torch.bfloat16),
        sampler.noise_table("cpu", torch.float32).bfloat16(),
    )


@pytest.mark.parametrize("dim", [7, 384])
def test_table_rows_of_every_row_equal_the_dense_z(dim):
    """The table source's rows of a weight larger than its table (z from several slices, some
    wrapping): every row, those straddling two slices included, equals the dense z's row."""
    sampler = get_source("table").sampler(run_seed=0, table=1000)
    w = torch.zeros(-(-3 * 1000 // dim) + 5, dim)  # > 3 tables: several pieces
    for seed in range(4):
        d = sampler(seed)
        dense = d(0, w)
        ids = torch.arange(w.shape[0]).flip(0).view(-1, 1).repeat(1, 2)
        torch.testing.assert_close(d.rows(0, w, ids), dense[ids], rtol=0, atol=0)
