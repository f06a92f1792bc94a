"""Tests for smoothlab.hybrid.engine: the two-rate update, SPSA statistics, bookkeeping against an
independent reference, no drift, forwards per step, argument errors.

Ground truth: closed forms on quadratics (Example 2.3), and a reference step computed here
from explicitly perturbed weights (``p.data = W + μ·z`` swapped in and out by hand) with the
same z regenerated from ``engine.perturbation_seed(t, i)``.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from smoothlab import perturb
from smoothlab.errors import UsageError
from smoothlab.hybrid.engine import HybridEngine, StepResult, TwoRateSGD
from smoothlab.perturb import (
    DEFAULT_SOURCE,
    SOURCES,
    get_source,
    seeded_gaussian,
    spsa_second_moment,
)

# --------------------------------------------------------------------------- toy models


class Toy(nn.Module):
    """A small classifier: ``base`` (x, zeroth order) and an additive ``adapter`` (y)."""

    def __init__(self, seed: int = 0, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            self.l1 = nn.Linear(6, 8)
            self.l2 = nn.Linear(8, 3)
            self.adapter = nn.Linear(6, 8, bias=False)
            self.adapter2 = nn.Linear(8, 3, bias=False)
        self.to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.l1(x) + self.adapter(x))
        return self.l2(h) + self.adapter2(h)

    def base(self) -> list[nn.Parameter]:
        return [*self.l1.parameters(), *self.l2.parameters()]

    def peft(self) -> list[nn.Parameter]:
        return [*self.adapter.parameters(), *self.adapter2.parameters()]


def toy_loss(model: Toy, seed: int = 1, n: int = 10):
    gen = torch.Generator().manual_seed(seed)
    dtype = model.l1.weight.dtype
    X = torch.randn(n, 6, generator=gen).to(dtype)
    Y = torch.randint(0, 3, (n,), generator=gen)
    return lambda: F.cross_entropy(model(X).float(), Y)


class Quadratic(nn.Module):
    r"""f(x) = ½ xᵀAx + bᵀx in float64, x a registered Parameter read in ``forward``."""

    def __init__(self, d: int = 5, seed: int = 0) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        M = torch.randn(d, d, generator=gen, dtype=torch.float64)
        self.register_buffer("A", M @ M.T / d + torch.eye(d, dtype=torch.float64))
        self.register_buffer("b", torch.randn(d, generator=gen, dtype=torch.float64))
        self.x = nn.Parameter(torch.randn(d, generator=gen, dtype=torch.float64))

    def forward(self) -> torch.Tensor:
        x = self.x
        return 0.5 * x @ self.A @ x + self.b @ x

    def grad(self) -> torch.Tensor:
        return self.A @ self.x.detach() + self.b


# --------------------------------------------------------------------------- reference


def _loss_at(loss_fn, zo, zs, scale, fo=(), grad=False):
    """f at explicitly perturbed weights W + scale·z (data swapped in, then restored)."""
    originals = [p.data for p in zo]
    try:
        if zs is not None:
            for p, z in zip(zo, zs):
                p.data = torch.add(p.data, z, alpha=scale)
        if grad:
            with torch.enable_grad():
                loss = loss_fn()
                gs = torch.autograd.grad(loss, list(fo), allow_unused=True)
            gs = [torch.zeros_like(p) if g is None else g for p, g in zip(fo, gs)]
            return float(loss.detach()), gs
        with torch.no_grad():
            return float(loss_fn()), None
    finally:
        for p, d in zip(zo, originals):
            p.data = d


def reference_step(engine: HybridEngine, loss_fn):
    """Expected (new zo weights, new fo weights, g_i list, loss, forwards) of engine.step."""
    zo, fo = engine.zo_params, engine.fo_params
    mu, q = engine.mu, engine.q
    lr_zo, lr_fo = engine.lr("base"), engine.lr("peft")
    seeds = [engine.perturbation_seed(engine.t, i) for i in range(q)]
    zs = [[engine.direction(s)(j, p) for j, p in enumerate(zo)] for s in seeds]
    fo_grads = None
    forwards = 0
    f0 = math.nan
    if fo and not engine.fo_at_perturbed:
        f0, fo_grads = _loss_at(loss_fn, zo, None, 0.0, fo, grad=True)
        forwards += 1
    loss = f0
    gs = []
    if zo:
        if engine.one_sided and not math.isfinite(f0):
            f0, _ = _loss_at(loss_fn, zo, None, 0.0)
            forwards += 1
        for i in range(q):
            if i == 0 and engine.fo_at_perturbed:
                fp, fo_grads = _loss_at(loss_fn, zo, zs[i], mu, fo, grad=True)
            else:
                fp, _ = _loss_at(loss_fn, zo, zs[i], mu)
            forwards += 1
            if engine.one_sided:
                g = (fp - f0) / mu
            else:
                fm, _ = _loss_at(loss_fn, zo, zs[i], -mu)
                forwards += 1
                g = (fp - fm) / (2 * mu)
                if not math.isfinite(loss):
                    loss = 0.5 * (fp + fm)
            if not math.isfinite(loss):
                loss = f0
            gs.append(g)
    new_zo = []
    for j, p in enumerate(zo):
        w = p.detach().clone()
        for i in range(q):
            w.add_(zs[i][j], alpha=-lr_zo * (gs[i] / q))
        new_zo.append(w)
    new_fo = [p.detach().clone().add_(g, alpha=-lr_fo) for p, g in zip(fo, fo_grads or [])]
    return new_zo, new_fo, gs, loss, forwards, zs


def assert_step_matches_reference(engine: HybridEngine, loss_fn, exact: bool = True) -> StepResult:
    new_zo, new_fo, gs, loss, forwards, _ = reference_step(engine, loss_fn)
    res = engine.step(loss_fn)
    assert res.forwards == forwards
    if gs:
        assert res.proj_grad == pytest.approx(sum(gs) / len(gs), rel=0, abs=0 if exact else 1e-6)
    else:
        assert math.isnan(res.proj_grad)
    assert res.loss == pytest.approx(loss, rel=0 if exact else 1e-6, abs=0 if exact else 1e-7)
    for p, w in zip(engine.zo_params + engine.fo_params, new_zo + new_fo):
        if exact:
            assert torch.equal(p.detach(), w), (p - w).abs().max()
        else:
            torch.testing.assert_close(p.detach(), w, rtol=1e-6, atol=1e-6)
    for p in engine.zo_params:
        assert p.grad is None
        assert not p.requires_grad
    for p in engine.fo_params:
        assert p.requires_grad
        assert p.grad is None  # cleared after the update
    return res


# --------------------------------------------------------------------------- Example 2.3


@pytest.mark.parametrize("a,b", [(0.5, 8.0), (3.0, 0.01), (100.0, 0.25)])
def test_two_rates_reach_minimum_of_separable_quadratic_in_one_step(a, b):
    """f = a x² + b y²: with exact gradients, η_x = 1/(2a), η_y = 1/(2b) land on (0, 0)."""
    x = nn.Parameter(torch.tensor([1.7, -0.3], dtype=torch.float64))
    y = nn.Parameter(torch.tensor([-2.1, 0.9, 4.0], dtype=torch.float64))
    opt = TwoRateSGD(
        [
            {"name": "x", "params": [x], "lr": 1 / (2 * a)},
            {"name": "y", "params": [y], "lr": 1 / (2 * b)},
        ]
    )
    f = a * x.pow(2).sum() + b * y.pow(2).sum()
    f.backward()
    opt.step()
    torch.testing.assert_close(x.detach(), torch.zeros(2, dtype=torch.float64), rtol=0, atol=1e-12)
    torch.testing.assert_close(y.detach(), torch.zeros(3, dtype=torch.float64), rtol=0, atol=1e-12)

    # one shared rate cannot: with η = 1/(2a) for both, y only moves to (1 − b/a)·y
    x2 = nn.Parameter(torch.tensor([1.7, -0.3], dtype=torch.float64))
    y2 = nn.Parameter(torch.tensor([-2.1, 0.9, 4.0], dtype=torch.float64))
    opt2 = TwoRateSGD([{"name": "xy", "params": [x2, y2], "lr": 1 / (2 * a)}])
    (a * x2.pow(2).sum() + b * y2.pow(2).sum()).backward()
    opt2.step()
    expected = (1 - b / a) * torch.tensor([-2.1, 0.9, 4.0], dtype=torch.float64)
    torch.testing.assert_close(y2.detach(), expected, rtol=1e-12, atol=1e-12)
    assert y2.detach().abs().max() > 1e-3


def test_two_rate_sgd_zo_group_applies_sum_of_coefficient_times_z():
    """zo group: p ← p − lr·Σ c_i z_i(p) with z_i regenerated from each seed and index."""
    ps = [
        nn.Parameter(torch.randn(4, 3, generator=torch.Generator().manual_seed(k)))
        for k in range(3)
    ]
    before = [p.detach().clone() for p in ps]
    opt = TwoRateSGD(
        [
            {
                "name": "base",
                "params": ps,
                "lr": 0.3,
                "zo": True,
                "index": {id(p): i for i, p in enumerate(ps)},
            }
        ]
    )
    terms = [(11, 0.5), (12, -2.0)]
    opt.step(zo_terms=terms)
    for i, (p, w) in enumerate(zip(ps, before)):
        exp = w.clone()
        for s, c in terms:
            exp.add_(seeded_gaussian(s)(i, p), alpha=-0.3 * c)
        assert torch.equal(p.detach(), exp)
        assert not torch.equal(p.detach(), w)


def test_engine_groups_carry_the_two_learning_rates_and_schedulers_act_per_group():
    model = Toy()
    eng = HybridEngine(model, model.base(), model.peft(), lr_zo=1e-4, lr_fo=0.5, seed=3)
    groups = {g["name"]: g for g in eng.optimizer.param_groups}
    assert set(groups) == {"base", "peft"}
    assert groups["base"]["lr"] == 1e-4 and groups["base"]["zo"] is True
    assert groups["peft"]["lr"] == 0.5 and groups["peft"]["zo"] is False
    assert [id(p) for p in groups["base"]["params"]] == [id(p) for p in model.base()]
    assert [id(p) for p in groups["peft"]["params"]] == [id(p) for p in model.peft()]
    assert eng.lr("base") == 1e-4 and eng.lr("peft") == 0.5
    sched = torch.optim.lr_scheduler.LambdaLR(
        eng.optimizer, [lambda t: 0.5**t, lambda t: 1.0 / (1 + t)]
    )
    eng.step(toy_loss(model))
    sched.step()
    assert eng.lr("base") == pytest.approx(0.5e-4) and eng.lr("peft") == pytest.approx(0.25)
    # and the step after the schedule uses the new rates (reference reads engine.lr)
    assert_step_matches_reference(eng, toy_loss(model))
    # state round trip
    eng2 = HybridEngine(model, model.base(), model.peft(), lr_zo=1.0, lr_fo=1.0, seed=3)
    eng2.load_state_dict(eng.state_dict())
    assert (
        eng2.t == eng.t == 2
        and eng2.lr("base") == eng.lr("base")
        and eng2.lr("peft") == eng.lr("peft")
    )


def test_absent_group_reads_lr_zero_and_zo_only_engine_has_no_peft_group():
    model = Toy()
    eng = HybridEngine(model, model.base() + model.peft(), [], lr_zo=0.1, lr_fo=0.2)
    assert [g["name"] for g in eng.optimizer.param_groups] == ["base"]
    assert eng.lr("peft") == 0.0
    eng = HybridEngine(model, [], model.base() + model.peft(), lr_zo=0.1, lr_fo=0.2)
    assert [g["name"] for g in eng.optimizer.param_groups] == ["peft"]
    assert eng.lr("base") == 0.0


# --------------------------------------------------------------------------- SPSA statistics


def _spsa_directions(one_sided: bool, mu: float, n: int, seed: int = 0, z: str = "gaussian"):
    """Per-seed (g, z, ∇f, update direction) from the engine itself, x reset after each step."""
    model = Quadratic()
    x0 = model.x.detach().clone()
    eng = HybridEngine(
        model, [model.x], [], lr_zo=1.0, lr_fo=0.0, mu=mu, one_sided=one_sided, seed=seed, z=z
    )
    grad = model.grad()
    gs, zs, dirs = [], [], []
    for _ in range(n):
        z = eng.direction(eng.perturbation_seed(eng.t, 0))(0, model.x)
        res = eng.step(model)
        dirs.append(x0 - model.x.detach())  # = lr · g · z
        gs.append(res.proj_grad)
        zs.append(z)
        with torch.no_grad():
            model.x.copy_(x0)
    return model, torch.tensor(gs, dtype=torch.float64), torch.stack(zs), grad, torch.stack(dirs)


@pytest.mark.parametrize("source", SOURCES)
def test_two_sided_spsa_is_exact_directional_derivative_on_quadratic_and_unbiased(source):
    model, g, z, grad, dirs = _spsa_directions(one_sided=False, mu=1e-2, n=3000, z=source)
    # per seed: g = zᵀ∇f exactly (no odd derivatives beyond the first on a quadratic)
    torch.testing.assert_close(g, z @ grad, rtol=1e-9, atol=1e-9)
    # the update direction is g·z exactly
    torch.testing.assert_close(dirs, g[:, None] * z, rtol=1e-12, atol=1e-12)
    # E[g z] = E[z zᵀ] ∇f = ∇f, within the sample's own standard error
    mean = dirs.mean(0)
    stderr = dirs.std(0) / math.sqrt(dirs.shape[0])
    assert ((mean - grad).abs() < 4 * stderr).all(), (mean, grad, stderr)
    # and the test can fail: the mean is far (in stderrs) from a wrong answer
    assert ((mean - 1.3 * grad).abs() > 4 * stderr).any()
    # E‖ĝ‖² of the engine's own updates (lr = 1: ĝ = x0 − x) matches the source's formula
    sq = dirs.pow(2).sum(1)
    kappa = get_source(source).kurtosis
    expected = spsa_second_moment(float(grad @ grad), grad.numel(), 1, kappa)
    se = float(sq.std()) / math.sqrt(len(sq))
    assert abs(float(sq.mean()) - expected) < 4 * se, (float(sq.mean()), expected, se)
    wrong = spsa_second_moment(float(grad @ grad), grad.numel(), 1, 4 - kappa)
    assert abs(float(sq.mean()) - wrong) > 4 * se


def test_one_sided_spsa_has_order_mu_bias_in_the_directional_derivative():
    """One-sided on f = ½xᵀAx + bᵀx: g = zᵀ∇f + (μ/2)·zᵀAz exactly, so E[g − zᵀ∇f] = (μ/2)·tr A
    (an O(μ) bias); the direction mean E[g z] is still ∇f (Gaussian odd moments vanish)."""
    mu = 0.05
    model, g, z, grad, dirs = _spsa_directions(one_sided=True, mu=mu, n=3000, seed=7)
    quad = torch.einsum("ni,ij,nj->n", z, model.A, z)
    torch.testing.assert_close(g, z @ grad + 0.5 * mu * quad, rtol=1e-8, atol=1e-8)
    bias = g - z @ grad
    expected = 0.5 * mu * float(torch.trace(model.A))
    se = float(bias.std()) / math.sqrt(len(bias))
    assert abs(float(bias.mean()) - expected) < 4 * se
    assert float(bias.mean()) > 4 * se  # the bias is really there
    # two-sided at the same μ: no bias at all
    _, g2, z2, grad2, _ = _spsa_directions(one_sided=False, mu=mu, n=200, seed=7)
    torch.testing.assert_close(g2, z2 @ grad2, rtol=1e-9, atol=1e-9)
    mean = dirs.mean(0)
    stderr = dirs.std(0) / math.sqrt(dirs.shape[0])
    assert ((mean - grad).abs() < 4 * stderr).all()


def test_q_averages_q_distinct_directions():
    model = Quadratic(d=4)
    q = 3
    eng = HybridEngine(model, [model.x], [], lr_zo=1.0, lr_fo=0.0, mu=1e-3, q=q, seed=5)
    seeds = [eng.perturbation_seed(0, i) for i in range(q)]
    assert len(set(seeds)) == q
    zs = [eng.direction(s)(0, model.x) for s in seeds]
    for i in range(q):
        for j in range(i):
            assert not torch.allclose(zs[i], zs[j])
    grad = model.grad()
    x0 = model.x.detach().clone()
    res = eng.step(model)
    gs = [float(z @ grad) for z in zs]
    assert res.forwards == 2 * q
    assert res.proj_grad == pytest.approx(sum(gs) / q, rel=1e-9)
    expected = x0 - sum(g * z for g, z in zip(gs, zs)) / q
    torch.testing.assert_close(model.x.detach(), expected, rtol=1e-9, atol=1e-9)
    # next step uses the next q seeds, none repeated
    assert eng.perturbation_seed(1, 0) not in seeds


# --------------------------------------------------------------------------- bookkeeping


VARIANTS = [
    # (zo, fo, q, one_sided, fo_at_perturbed, forwards)
    ("base", "peft", 1, False, False, 3),
    ("base", "peft", 1, True, False, 2),
    ("base", "peft", 1, False, True, 2),
    ("base", "peft", 1, True, True, 2),
    ("base", "peft", 3, False, False, 7),
    ("base", "peft", 2, True, False, 3),
    ("base", "peft", 2, False, True, 4),
    ("all", None, 1, False, False, 2),
    ("all", None, 2, True, False, 3),
    (None, "all", 1, False, False, 1),
]


@pytest.mark.parametrize("source", SOURCES)
@pytest.mark.parametrize("zo_kind,fo_kind,q,one_sided,fo_at_perturbed,forwards", VARIANTS)
def test_step_equals_independent_reference(
    zo_kind, fo_kind, q, one_sided, fo_at_perturbed, forwards, source
):
    model = Toy(seed=2)
    everything = model.base() + model.peft()
    zo = {"base": model.base(), "all": everything, None: []}[zo_kind]
    fo = {"peft": model.peft(), "all": everything, None: []}[fo_kind]
    initial = {n: p.detach().clone() for n, p in model.named_parameters()}
    eng = HybridEngine(
        model,
        zo,
        fo,
        lr_zo=0.05,
        lr_fo=0.3,
        mu=1e-3,
        q=q,
        one_sided=one_sided,
        fo_at_perturbed=fo_at_perturbed,
        seed=11,
        z=source,
    )
    for t in range(3):
        res = assert_step_matches_reference(eng, toy_loss(model, seed=t))
        assert res.forwards == forwards
    assert eng.t == 3
    moved = {n: not torch.equal(p.detach(), initial[n]) for n, p in model.named_parameters()}
    ids = {id(p) for p in zo + fo}
    for n, p in model.named_parameters():
        assert moved[n] == (id(p) in ids), n  # every trained weight moved, nothing else


def test_fo_at_perturbed_takes_gradient_at_shifted_point():
    """Reference check of the variant is above; here: its y-update really differs from the
    plain one (the gradient is taken at x + μz₁), and x-updates agree to O(1)."""
    outs = []
    for fap in (False, True):
        model = Toy(seed=4)
        eng = HybridEngine(
            model,
            model.base(),
            model.peft(),
            lr_zo=0.05,
            lr_fo=0.3,
            mu=0.05,
            fo_at_perturbed=fap,
            seed=1,
        )
        eng.step(toy_loss(model))
        outs.append([p.detach().clone() for p in model.peft()])
    assert any(not torch.equal(a, b) for a, b in zip(*outs))


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_step_on_real_tiny_models_matches_reference(tiny_bundles):
    """Hybrid steps on tiny transformers with PEFT (on-the-fly perturbation through every
    module, tied embeddings, peft wrappers) equal the swap-in reference exactly."""
    from smoothlab.hybrid.train import split_parameters

    for k, (method, bundle, batch) in enumerate(tiny_bundles):
        zo, fo = split_parameters(bundle.model, method)
        for source in SOURCES if k < 2 else SOURCES[k % len(SOURCES) : k % len(SOURCES) + 1]:
            eng = HybridEngine(
                bundle.model, zo, fo, lr_zo=1e-3, lr_fo=1e-2, mu=1e-3, q=2, seed=7, z=source
            )
            eng.t = 5  # a later step's seeds
            before = [p.detach().clone() for p in zo]
            assert_step_matches_reference(eng, lambda b=batch, bu=bundle: bu.loss(b))
            for p, w in zip(zo, before):
                assert not torch.equal(p.detach(), w), (method, source)


@pytest.fixture(scope="module")
def tiny_bundles(tmp_path_factory):
    from smoothlab.hybrid.train import TrainConfig, build
    from tests.tiny_models import tiny_causal_lm, tiny_encoder

    root = tmp_path_factory.mktemp("engine_models")
    tiny_causal_lm("opt", seed=0, save_dir=root / "opt")
    tiny_causal_lm("llama", seed=0, save_dir=root / "llama")
    tiny_encoder(seed=0, save_dir=root / "enc")
    cases = [
        ("hybrid-lora", "opt"),
        ("hybrid-prompt", "opt"),
        ("hybrid-prefix", "opt"),
        ("hybrid-lora", "llama"),
        ("hybrid-lora", "enc"),
        ("zo-ft", "enc"),
    ]
    out = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for method, model in cases:
            cfg = TrainConfig(
                method=method,
                model=str(root / model),
                train_size=8,
                eval_size=1,
                dev_size=1,
                num_virtual_tokens=3,
                lora_r=4,
            )
            bundle, _, splits = build(cfg)
            bundle.model.eval()
            out.append((method, bundle, bundle.encode(splits.train[:4], 32)))
    return out


# --------------------------------------------------------------------------- resume


@pytest.mark.parametrize("source", SOURCES)
@pytest.mark.parametrize("q,fo_at_perturbed", [(1, False), (2, True)])
def test_resume_replays_the_trajectory_bit_exactly(source, q, fo_at_perturbed):
    """6 steps in one go = 3 steps, (weights, engine state) saved, a fresh model and engine
    (a rebuilt noise table) loaded, 3 more steps: bit-identical weights, losses and g."""

    def engine(model):
        return HybridEngine(
            model,
            model.base(),
            model.peft(),
            lr_zo=0.05,
            lr_fo=0.3,
            mu=1e-2,
            q=q,
            fo_at_perturbed=fo_at_perturbed,
            weight_decay=0.01,
            seed=13,
            z=source,
        )

    model = Toy(seed=5)
    eng = engine(model)
    straight = [eng.step(toy_loss(model, seed=t)) for t in range(6)]
    model2 = Toy(seed=5)
    eng2 = engine(model2)
    first = [eng2.step(toy_loss(model2, seed=t)) for t in range(3)]
    weights, state = model2.state_dict(), eng2.state_dict()
    assert state["z"] == source
    model3 = Toy(seed=99)
    model3.load_state_dict(weights)
    eng3 = engine(model3)
    eng3.load_state_dict(state)
    resumed = first + [eng3.step(toy_loss(model3, seed=t)) for t in range(3, 6)]
    assert resumed == straight
    for a, b in zip(model.parameters(), model3.parameters()):
        assert torch.equal(a.detach(), b.detach())
    # a run cannot be resumed with another source
    other = SOURCES[(SOURCES.index(source) + 1) % len(SOURCES)]
    with pytest.raises(UsageError, match=f"z='{source}'"):
        HybridEngine(model3, model3.base(), [], lr_zo=0.1, lr_fo=0.0, z=other).load_state_dict(
            state
        )


def test_resume_keeps_the_noise_table_it_ran_with(monkeypatch):
    """The table is capped (TABLE_CAP, 16 entries here: the toy's 48-entry weight takes
    several slices) and its size is saved with the engine. A state from before the record
    (no ``table``) resumes with the uncapped size it ran with, so its z stay what they were:
    its next step equals that of an engine loaded with that size, and differs from the
    capped table's."""
    monkeypatch.setattr(perturb, "TABLE_MIN", 16)
    monkeypatch.setattr(perturb, "TABLE_CAP", 16)

    def engine(model):
        return HybridEngine(
            model, model.base(), [], lr_zo=0.05, lr_fo=0.0, mu=1e-2, seed=13, z="table"
        )

    model = Toy(seed=5)
    eng = engine(model)
    eng.step(toy_loss(model, seed=0))
    state = eng.state_dict()
    assert eng.sampler.table_size == state["table"] == 16
    legacy = {k: v for k, v in state.items() if k != "table"}
    after = {}
    for name, saved in (
        ("capped", state),
        ("legacy", legacy),
        ("uncapped", state | {"table": 1 << 20}),
    ):
        m = Toy(seed=5)
        e = engine(m)
        e.load_state_dict(saved)
        assert [g["sampler"] for g in e.optimizer.param_groups] == [e.sampler]  # the one used
        after[name] = (
            e.sampler.table_size,
            e.step(toy_loss(m, seed=1)),
            [p.clone() for p in m.base()],
        )
    assert after["legacy"][0] == after["uncapped"][0] == 1 << 20
    assert after["legacy"][1] == after["uncapped"][1]
    assert all(torch.equal(a, b) for a, b in zip(after["legacy"][2], after["uncapped"][2]))
    assert after["capped"][1].proj_grad != after["legacy"][1].proj_grad


def test_default_source_and_unknown_source():
    model = Toy()
    assert HybridEngine(model, model.base(), [], lr_zo=0.1, lr_fo=0.0).source.name == DEFAULT_SOURCE
    with pytest.raises(UsageError, match="'normal'.*accepted"):
        HybridEngine(model, model.base(), [], lr_zo=0.1, lr_fo=0.0, z="normal")


# --------------------------------------------------------------------------- no drift


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lr_zero_leaves_base_bit_identical(dtype):
    model = Toy(seed=3, dtype=dtype)
    before = [p.detach().clone() for p in model.base()]
    eng = HybridEngine(model, model.base(), model.peft(), lr_zo=0.0, lr_fo=0.1, mu=1e-2, seed=0)
    loss_fn = toy_loss(model)
    projs = []
    for _ in range(25):
        projs.append(eng.step(loss_fn).proj_grad)
    for p, w in zip(model.base(), before):
        assert torch.equal(p.detach(), w)
    assert any(g != 0 for g in projs)  # the perturbations did change the loss
    # one-sided and zo-only too
    eng = HybridEngine(model, model.base(), [], lr_zo=0.0, lr_fo=0.0, mu=1e-2, one_sided=True)
    for _ in range(10):
        eng.step(loss_fn)
    for p, w in zip(model.base(), before):
        assert torch.equal(p.detach(), w)


def test_mezo_style_in_place_perturbation_drifts_in_bf16():
    """The counterexample the engine avoids: +μz, −2μz, +μz in place does not return to W."""
    gen = torch.Generator().manual_seed(0)
    w0 = torch.randn(64, 64, generator=gen).to(torch.bfloat16)
    w = w0.clone()
    mu = 1e-2
    z = seeded_gaussian(123)(0, w)
    for _ in range(10):
        w.add_(z, alpha=mu)
        w.add_(z, alpha=-2 * mu)
        w.add_(z, alpha=mu)
    drift = (w.float() - w0.float()).abs()
    assert drift.max() > 0
    assert (drift > 0).float().mean() > 0.01
    # a single in-place pair already drifts in fp32 as well (docs/design.md: ~2e-7 measured)
    w32 = torch.randn(256, 256, generator=gen)
    v = w32.clone()
    z32 = seeded_gaussian(5)(0, v)
    v.add_(z32, alpha=1e-3)
    v.add_(z32, alpha=-1e-3)
    assert not torch.equal(v, w32)


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "kwargs,words",
    [
        ({"q": 0}, ["q", "0", ">= 1"]),
        ({"q": 1.5}, ["q", "1.5", ">= 1"]),
        ({"mu": 0.0}, ["mu", "0.0", "positive"]),
        ({"mu": -1e-3}, ["mu", "-0.001", "positive"]),
        ({"mu": float("nan")}, ["mu", "nan", "positive"]),
        ({"lr_zo": -1.0}, ["lr_zo", "base", "-1.0", ">= 0"]),
        ({"lr_fo": -0.5}, ["lr_fo", "peft", "-0.5", ">= 0"]),
        ({"lr_fo": float("inf")}, ["peft", "inf", "finite"]),
        # weight decay was never checked: a string failed at the first step, nan made
        # every weight nan, a negative one was taken
        ({"weight_decay": "0.1"}, ["weight_decay", "'0.1'", "finite float >= 0"]),
        ({"weight_decay": float("nan")}, ["weight_decay", "nan"]),
        ({"weight_decay": -5.0}, ["weight_decay", "-5.0"]),
        ({"weight_decay": True}, ["weight_decay", "True"]),
    ],
)
def test_bad_arguments_raise_value_error_naming_value(kwargs, words):
    model = Toy()
    args = {"lr_zo": 1e-3, "lr_fo": 1e-2} | kwargs
    with pytest.raises(ValueError) as info:
        HybridEngine(model, model.base(), model.peft(), **args)
    msg = str(info.value)
    for w in words:
        assert w in msg, msg


def test_negative_lr_rejected_even_for_an_absent_group():
    model = Toy()
    with pytest.raises(ValueError, match="-1.0"):
        HybridEngine(model, [], model.peft(), lr_zo=-1.0, lr_fo=1e-2)
    with pytest.raises(ValueError, match="-2.0"):
        HybridEngine(model, model.base(), [], lr_zo=1e-3, lr_fo=-2.0)


def test_empty_and_overlapping_parameter_sets_raise():
    model = Toy()
    with pytest.raises(ValueError, match="empty"):
        HybridEngine(model, [], [], lr_zo=1e-3, lr_fo=1e-2)
    with pytest.raises(ValueError, match="both"):
        HybridEngine(model, model.base(), model.base()[:1], lr_zo=1e-3, lr_fo=1e-2)


def test_unregistered_zo_parameter_raises_on_step():
    model = Toy()
    stray = nn.Parameter(torch.zeros(3))
    eng = HybridEngine(model, [stray], [], lr_zo=1e-3, lr_fo=0.0)
    with pytest.raises(ValueError, match="not registered"):
        eng.step(toy_loss(model))
    assert torch.equal(stray.detach(), torch.zeros(3))


class Checkpointed(Toy):
    """Toy whose first layer runs under activation checkpointing: the backward recomputes
    it, so the recomputation must see the same shifted weights as the forward did."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from torch.utils.checkpoint import checkpoint

        h = checkpoint(lambda v: torch.tanh(self.l1(v) + self.adapter(v)), x, use_reentrant=False)
        return self.l2(h) + self.adapter2(h)


def test_fo_at_perturbed_gradient_is_right_under_activation_checkpointing():
    """The gradient at x + μz₁ is taken inside the shift (``backward_inside``): a checkpointed
    layer recomputed in the backward sees the shifted weights, so the gradient equals the one
    at explicitly perturbed weights (with the backward outside the shift, the recomputation
    would read the stored ones and the gradient would silently mix two points)."""
    model = Checkpointed(seed=4)
    loss_fn = toy_loss(model)
    eng = HybridEngine(
        model, model.base(), model.peft(), lr_zo=0.0, lr_fo=0.0, mu=0.05,
        fo_at_perturbed=True, seed=1,
    )  # fmt: skip
    seed = eng.perturbation_seed(0, 0)
    d = eng.direction(seed)
    zs = [d(i, p) for i, p in enumerate(model.base())]
    _, expected = _loss_at(loss_fn, model.base(), zs, 0.05, fo=model.peft(), grad=True)
    eng._fo_loss(loss_fn, (seed, 0.05))
    for p, g in zip(model.peft(), expected):
        torch.testing.assert_close(p.grad, g, rtol=1e-6, atol=1e-7)


class ReadsOutside(Toy):
    """Toy whose forward reads base weights outside their layers: the output layer applied
    as ``F.linear(h, l2.weight, l2.bias)`` from the parent, and an L2 term on ``l1.weight``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.l1(x) + self.adapter(x))
        out = F.linear(h, self.l2.weight, self.l2.bias) + self.adapter2(h)
        return out + 0.01 * self.l1.weight.square().sum()


@pytest.mark.parametrize("fo_at_perturbed", [False, True])
def test_weights_read_outside_their_layers_are_perturbed_too(fo_at_perturbed):
    """On the fly such reads would see x, not x ± μz. The engine finds them at its first
    step (one extra forward, random state restored: dropout masks are unchanged), says so,
    and swaps shifted copies in for them: the step equals the explicit reference."""
    model = ReadsOutside(seed=2)
    eng = HybridEngine(
        model,
        model.base(),
        model.peft(),
        lr_zo=0.3,
        lr_fo=0.2,
        mu=1e-2,
        seed=4,
        fo_at_perturbed=fo_at_perturbed,
    )
    loss_fn = toy_loss(model)
    rng = torch.get_rng_state()
    with pytest.warns(RuntimeWarning, match=r"3 zeroth-order weight\(s\) \(e.g. 'l1.weight'\)"):
        eng._find_outside_reads(loss_fn)
    assert torch.equal(torch.get_rng_state(), rng)
    assert eng.swap == {0, 2, 3}  # l1.weight, l2.weight, l2.bias; l1.bias is read in l1 only
    for _ in range(3):
        assert_step_matches_reference(eng, loss_fn)
    assert all("weight" not in vars(m) for m in model.modules())


def test_a_model_read_inside_its_layers_swaps_nothing():
    model = Toy(seed=2)
    eng = HybridEngine(model, model.base(), model.peft(), lr_zo=0.3, lr_fo=0.2, seed=4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert_step_matches_reference(eng, toy_loss(model))
    assert eng.swap == set()


@pytest.mark.parametrize(
    "kwargs, weight_decay",
    [
        (dict(lr_zo=1e308, lr_fo=0.1), 0.0),  # lr·g/q beyond float32
        (dict(lr_zo=0.1, lr_fo=1e308), 0.0),  # the first-order step's alpha
        (dict(lr_zo=1e-3, lr_fo=0.1), 1e308),  # 1 − lr·wd
    ],
)
def test_an_update_coefficient_beyond_the_dtype_is_a_divergence_and_writes_nothing(
    kwargs, weight_decay
):
    """torch refuses a Python scalar beyond float32 half-way through an update; the engine
    checks every scalar first, so the weights are untouched and the error is Diverged."""
    from smoothlab.hybrid.faults import Diverged

    model = Toy(seed=1)
    eng = HybridEngine(model, model.base(), model.peft(), seed=2, **kwargs)
    for g in eng.optimizer.param_groups:
        g["weight_decay"] = weight_decay
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(Diverged, match="overflows torch.float32"):
        eng.step(toy_loss(model))
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_a_mu_beyond_the_dtype_is_refused():
    model = Toy(seed=1)
    with pytest.raises(UsageError, match=r"mu=1e\+308 overflows the torch.float32 weights"):
        HybridEngine(model, model.base(), model.peft(), lr_zo=0.1, lr_fo=0.1, mu=1e308)
