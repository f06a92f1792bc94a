"""``probe`` and the norm estimators against ground truth.

Quadratics with planted block spectra and a large cross-block coupling C
(f = ½xᵀAx + ½yᵀBy + xᵀCy: the answer for block x is a norm of A, never of the full
Hessian [[A, C], [Cᵀ, B]]); the paper's Example 2.3; statistical tolerances from each
estimator's own standard error; restoration of parameters, flags, grads and training modes;
input validation; ``probe_model`` on a tiny Hugging Face model.
"""

from __future__ import annotations

import math
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from torch import nn

from smoothlab import ModelLoss, make_blocks, probe, probe_model
from smoothlab.blocks import check_blocks


# --- problems ------------------------------------------------------------------------------
def orthogonal(d: int, gen: torch.Generator) -> torch.Tensor:
    """A dense random orthogonal matrix (float64); a Kronecker product of two for large d."""

    def haar(n: int) -> torch.Tensor:
        q, r = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
        return q * torch.sign(torch.diagonal(r))

    for k in (40, 25, 20, 10):
        if d > 400 and d % k == 0:
            return torch.kron(haar(k), haar(d // k))
    return haar(d)


class Quadratic:
    """f = ½xᵀAx + ½yᵀBy + xᵀCy with planted A = Q_x diag(e_x) Q_xᵀ, B = Q_y diag(e_y) Q_yᵀ.

    ‖A‖₂ = top_x, ‖B‖₂ = top_y (B's extreme eigenvalue is negative), the rest uniform in
    ±0.9·top; C is a dense coupling with entries of size ``coupling/√d_y``.
    """

    def __init__(self, dx, dy, *, top_x=100.0, top_y=1.0, coupling=30.0, dtype=torch.float32, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.ex = torch.cat([
            torch.tensor([top_x], dtype=torch.float64),
            torch.empty(dx - 1, dtype=torch.float64).uniform_(-0.9 * top_x, 0.9 * top_x, generator=g),
        ])
        self.ey = torch.cat([
            torch.tensor([-top_y], dtype=torch.float64),
            torch.empty(dy - 1, dtype=torch.float64).uniform_(-0.9 * top_y, 0.9 * top_y, generator=g),
        ])
        self.Qx, self.Qy = orthogonal(dx, g), orthogonal(dy, g)
        self.C = coupling * torch.randn(dx, dy, generator=g, dtype=torch.float64) / math.sqrt(dy)
        self.x = nn.Parameter(torch.randn(dx, generator=g, dtype=torch.float64).to(dtype))
        self.y = nn.Parameter(torch.randn(dy, generator=g, dtype=torch.float64).to(dtype))
        self._mats = [m.to(dtype) for m in (self.Qx, self.ex, self.Qy, self.ey, self.C)]

    def __call__(self) -> torch.Tensor:
        Qx, ex, Qy, ey, C = self._mats
        x, y = self.x, self.y
        return 0.5 * (ex * (x @ Qx) ** 2).sum() + 0.5 * (ey * (y @ Qy) ** 2).sum() + x @ (C @ y)

    @property
    def A(self) -> torch.Tensor:
        return (self.Qx * self.ex) @ self.Qx.T

    @property
    def blocks(self):
        return {"x": [self.x], "y": [self.y]}

    def truth(self, norm: str) -> dict[str, float]:
        out = {}
        for name, e in (("x", self.ex), ("y", self.ey)):
            fro = float(e.pow(2).sum().sqrt())
            out[name] = {
                "spectral": float(e.abs().max()),
                "frobenius": fro,
                "rms": fro / math.sqrt(len(e)),
                "trace": float(e.sum()),
            }[norm]
        return out

    def full_spectral_x_lower_bound(self) -> float:
        """‖[[A, C], [Cᵀ, B]]‖₂ ≥ ‖H (u, 0)‖ for A's top eigenvector u: what a probe that
        forgot the block restriction (perturbing y too, or reading y's gradient) would drift to."""
        u = self.Qx[:, 0]
        return math.hypot(float(self.ex[0]), float((self.C.T @ u).norm()))


@pytest.fixture(scope="module")
def big_quadratic():
    """The issue's acceptance problem: ‖A‖₂ = 100 (d=2000), ‖B‖₂ = 1 (d=200), float32."""
    return Quadratic(2000, 200, coupling=60.0, dtype=torch.float32, seed=0)


# --- the "done" criteria -------------------------------------------------------------
@pytest.mark.parametrize("hvp,tol", [("exact", 0.01), ("fd", 0.02), ("fd-central", 0.02)])
def test_spectral_planted_norms_within_tolerance(big_quadratic, hvp, tol):
    q = big_quadratic
    assert q.full_spectral_x_lower_bound() > 1.1 * 100  # a restriction bug would be visible
    est = probe(q, q.blocks, norm="spectral", hvp=hvp, num_vectors=50)
    for name, truth in q.truth("spectral").items():
        e = est[name]
        assert abs(e.value - truth) <= tol * truth, (name, e.value, truth)
        assert e.num_hvp <= 50
        assert e.norm == "spectral" and e.hvp == hvp and e.dim == {"x": 2000, "y": 200}[name]
        assert math.isnan(e.stderr)
        assert len(e.samples) == e.num_hvp


def test_frobenius_two_stderr_interval_coverage():
    """±2·stderr contains ‖H_bb‖_F in at least 90 of 100 seeds (both blocks)."""
    q = Quadratic(100, 40, dtype=torch.float64, seed=1)
    truth = q.truth("frobenius")
    for distribution in ("gaussian", "rademacher"):
        hits = {"x": 0, "y": 0}
        for seed in range(100):
            est = probe(q, q.blocks, norm="frobenius", hvp="exact", num_vectors=30, seed=seed,
                        distribution=distribution)
            for name in hits:
                hits[name] += abs(est[name].value - truth[name]) <= 2 * est[name].stderr
        assert hits["x"] >= 90 and hits["y"] >= 90, (distribution, hits)


def _grand_mean(values: list[float]) -> tuple[float, float]:
    t = torch.tensor(values, dtype=torch.float64)
    return float(t.mean()), float(t.std() / math.sqrt(len(t)))


def test_zo_trace_and_squared_frobenius_unbiased():
    """hvp='zo' (function values only, float64): E[tr estimate] = tr H, E[s²/2] = ‖H‖_F²."""
    q = Quadratic(30, 10, top_x=10.0, dtype=torch.float64, seed=2)
    tr_truth, fro_truth = q.truth("trace"), q.truth("frobenius")
    for name in ("x", "y"):
        traces, fro2 = [], []
        for seed in range(150):
            blocks = {name: q.blocks[name]}
            traces.append(probe(q, blocks, norm="trace", hvp="zo", num_vectors=8, seed=seed)[name].value)
            fro2.append(
                probe(q, blocks, norm="frobenius", hvp="zo", num_vectors=8, seed=seed)[name].value ** 2
            )
        m, se = _grand_mean(traces)
        assert abs(m - tr_truth[name]) <= 4 * se, (name, m, tr_truth[name], se)
        m, se = _grand_mean(fro2)
        assert abs(m - fro_truth[name] ** 2) <= 4 * se, (name, m, fro_truth[name] ** 2, se)


def test_zo_single_run_stderr_is_honest():
    q = Quadratic(30, 10, top_x=10.0, dtype=torch.float64, seed=3)
    for norm in ("trace", "frobenius", "rms"):
        est = probe(q, q.blocks, norm=norm, hvp="zo", num_vectors=400, seed=0)
        for name, truth in q.truth(norm).items():
            e = est[name]
            assert e.num_hvp == 400 and e.hvp == "zo"
            assert abs(e.value - truth) <= 4 * e.stderr, (norm, name, e.value, truth, e.stderr)


# --- stochastic estimators: Gaussian and Rademacher, all oracles -------------------------------
@pytest.mark.parametrize("distribution", ["gaussian", "rademacher"])
@pytest.mark.parametrize("hvp", ["exact", "fd", "fd-central"])
@pytest.mark.parametrize("norm", ["frobenius", "rms", "trace"])
def test_stochastic_norms_within_stderr(norm, hvp, distribution):
    q = Quadratic(80, 30, dtype=torch.float64, seed=4)
    est = probe(q, q.blocks, norm=norm, hvp=hvp, num_vectors=60, distribution=distribution, seed=5)
    for name, truth in q.truth(norm).items():
        e = est[name]
        assert e.num_hvp == 60 and len(e.samples) == 60
        assert math.isfinite(e.stderr) and e.stderr > 0
        assert abs(e.value - truth) <= 4 * e.stderr, (name, e.value, truth, e.stderr)
    full_x = torch.cat([q.A, q.C], 1)  # the full Hessian's row block: far off
    if norm == "frobenius":
        assert abs(est["x"].value - float(full_x.norm())) > 10 * est["x"].stderr


def test_rms_is_frobenius_over_sqrt_d():
    """E‖Hu‖² over unit u is ‖H‖_F²/d: rms² ≈ frobenius²/d (both unbiased in the square)."""
    q = Quadratic(80, 30, dtype=torch.float64, seed=6)
    rms = probe(q, q.blocks, norm="rms", num_vectors=400, seed=0)
    fro = probe(q, q.blocks, norm="frobenius", num_vectors=400, seed=1)
    for name, d in (("x", 80), ("y", 30)):
        r, f = rms[name], fro[name]
        diff = r.value - f.value / math.sqrt(d)
        assert abs(diff) <= 4 * math.hypot(r.stderr, f.stderr / math.sqrt(d))
        assert r.value == pytest.approx(q.truth("rms")[name], rel=4 * r.rel_stderr)
        # rms samples are ‖Hu‖² over unit vectors, whose mean is ‖H‖_F²/d
        mean = sum(r.samples) / len(r.samples)
        assert mean == pytest.approx(q.truth("frobenius")[name] ** 2 / d, rel=5 * 2 * r.rel_stderr)


def test_rademacher_trace_beats_gaussian_variance():
    """Var(vᵀHv) = 2‖H‖_F² − 2Σ H_ii² (Rademacher) ≤ 2‖H‖_F² (Gaussian)."""
    q = Quadratic(80, 30, dtype=torch.float64, seed=7)
    g = probe(q, q.blocks, norm="trace", num_vectors=200, distribution="gaussian")["x"]
    r = probe(q, q.blocks, norm="trace", num_vectors=200, distribution="rademacher")["x"]
    var_g = float(torch.tensor(g.samples).var())
    var_r = float(torch.tensor(r.samples).var())
    fro2 = q.truth("frobenius")["x"] ** 2
    diag2 = float(torch.diagonal(q.A).pow(2).sum())
    assert var_g == pytest.approx(2 * fro2, rel=0.35)
    assert var_r == pytest.approx(2 * fro2 - 2 * diag2, rel=0.35)


# --- Example 2.3 ---------------------------------------------------------------------------
@pytest.mark.parametrize("hvp", ["exact", "fd", "fd-central", "zo"])
def test_example_2_3(hvp):
    """f(x, y) = a x² + b y²: L_x = 2a, L_y = 2b (the paper's Example 2.3)."""
    a, b = 50.0, 0.5
    x = nn.Parameter(torch.tensor([0.7], dtype=torch.float64))
    y = nn.Parameter(torch.tensor([-2.0], dtype=torch.float64))

    def f():
        return (a * x**2 + b * y**2).sum()

    blocks = {"x": [x], "y": [y]}
    truth = {"x": 2 * a, "y": 2 * b}
    if hvp != "zo":
        spec = probe(f, blocks, norm="spectral", hvp=hvp, num_vectors=3)
        fro = probe(f, blocks, norm="frobenius", hvp=hvp, distribution="rademacher", num_vectors=4)
        for k in truth:
            assert spec[k].value == pytest.approx(truth[k], rel=1e-5)
            assert spec[k].num_hvp == 1  # d = 1: Lanczos is exact after one product
            assert fro[k].value == pytest.approx(truth[k], rel=1e-5)
    tr = probe(f, blocks, norm="trace", hvp=hvp, distribution="rademacher", num_vectors=4)
    for k in truth:
        assert tr[k].value == pytest.approx(truth[k], rel=1e-5)


# --- early stopping -----------------------------------------------------------------------------
@pytest.mark.parametrize("norm", ["frobenius", "trace", "rms"])
def test_target_rel_stderr_stops_early(norm):
    q = Quadratic(80, 30, dtype=torch.float64, seed=8)
    if norm == "trace":  # make the trace clearly non-zero: A + 40 I
        q.ex += 40
        q._mats[1] = q.ex
    est = probe(q, {"x": [q.x]}, norm=norm, num_vectors=500, target_rel_stderr=0.05, min_vectors=5)["x"]
    assert est.converged
    assert 5 <= est.num_hvp < 500 and len(est.samples) == est.num_hvp
    assert est.rel_stderr <= 0.05
    assert abs(est.value - q.truth(norm)["x"]) <= 4 * est.stderr
    # an unreachable target uses every vector and says it did not get there
    est = probe(q, {"x": [q.x]}, norm=norm, num_vectors=6, target_rel_stderr=1e-6)["x"]
    assert est.num_hvp == 6 and not est.converged


def test_spectral_stops_at_tolerance_and_reports_residual():
    q = Quadratic(200, 20, dtype=torch.float64, seed=9)
    e = probe(q, {"x": [q.x]}, norm="spectral", num_vectors=200, tol=1e-8)["x"]
    assert e.converged and e.num_hvp < 200
    assert e.residual <= 1e-8 * e.value
    assert abs(e.value - 100.0) <= e.residual * 1.01 + 1e-9
    short = probe(q, {"x": [q.x]}, norm="spectral", num_vectors=3, tol=1e-12)["x"]
    assert not short.converged and short.num_hvp == 3 and short.value <= 100.0 + 1e-9


def test_seed_reproducible_and_global_rng_untouched():
    q = Quadratic(50, 20, dtype=torch.float64, seed=10)
    state = torch.get_rng_state()
    a = probe(q, q.blocks, norm="frobenius", num_vectors=10, seed=3)
    assert torch.equal(torch.get_rng_state(), state)
    b = probe(q, q.blocks, norm="frobenius", num_vectors=10, seed=3)
    c = probe(q, q.blocks, norm="frobenius", num_vectors=10, seed=4)
    assert a["x"].samples == b["x"].samples
    assert a["x"].samples != c["x"].samples


def test_progress_callback():
    q = Quadratic(30, 10, dtype=torch.float64, seed=11)
    calls = []
    probe(q, q.blocks, norm="trace", num_vectors=4, progress=lambda b, d, t: calls.append((b, d, t)))
    assert calls == [("x", i, 4) for i in range(1, 5)] + [("y", i, 4) for i in range(1, 5)]


# --- restoration ------------------------------------------------------------------------------
class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(6, 10)
        self.drop = nn.Dropout(0.5)
        self.fc2 = nn.Linear(10, 3)

    def forward(self, x):
        return self.fc2(self.drop(torch.tanh(self.fc1(x))))


def _snapshot(model):
    return {
        n: (p.detach().clone(), p.requires_grad, None if p.grad is None else p.grad.clone())
        for n, p in model.named_parameters()
    }


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("hvp", ["exact", "fd", "fd-central", "zo"])
@pytest.mark.parametrize("on_the_fly", [True, False])
def test_probe_restores_everything(dtype, hvp, on_the_fly):
    torch.manual_seed(0)
    model = Net().to(dtype)
    inputs = torch.randn(8, 6).to(dtype)
    targets = torch.randint(0, 3, (8,))
    model.fc1.bias.requires_grad_(False)  # a frozen parameter probed
    model.fc2.weight.grad = torch.randn_like(model.fc2.weight)  # an existing .grad
    eval_loss = None

    def loss_fn():
        assert not model.training and not model.drop.training, "probe must run with dropout off"
        return nn.functional.cross_entropy(model(inputs).float(), targets)

    if on_the_fly:
        model.train()
        model.drop.eval()  # a mixed state must come back as it was
        fn = ModelLoss(model, compute=loss_fn)
    else:
        model.eval()  # swap mechanism: a plain closure, the caller turns dropout off
        fn = loss_fn
        eval_loss = float(loss_fn().detach())
    flags = {n: m.training for n, m in model.named_modules()}
    before = _snapshot(model)
    blocks = make_blocks(model, {"one": "fc1.*", "two": "fc2.*"})
    norm = "trace" if hvp == "zo" else "spectral"
    if dtype == torch.bfloat16 and hvp != "exact":
        with pytest.warns(RuntimeWarning, match="half precision"):
            est = probe(fn, blocks, norm=norm, hvp=hvp, num_vectors=4)
    else:
        est = probe(fn, blocks, norm=norm, hvp=hvp, num_vectors=4)
    assert all(math.isfinite(e.value) for e in est.values())
    after = _snapshot(model)
    for n, (w, rg, grad) in before.items():
        w2, rg2, grad2 = after[n]
        assert torch.equal(w, w2) and w.dtype == w2.dtype, n
        assert rg == rg2, n
        assert (grad is None) == (grad2 is None), n
        if grad is not None:
            assert torch.equal(grad, grad2), n
    assert model.fc1.bias.requires_grad is False and model.fc1.bias.grad is None
    assert {n: m.training for n, m in model.named_modules()} == flags
    if eval_loss is not None:
        assert float(loss_fn().detach()) == eval_loss


def test_probe_restores_after_loss_fn_raises():
    torch.manual_seed(0)
    model = Net().train()
    inputs = torch.randn(4, 6)
    calls = [0, 3]

    def compute():
        calls[0] += 1
        if calls[0] == calls[1]:
            raise RuntimeError("boom")
        return model(inputs).pow(2).mean()

    before = _snapshot(model)
    model.fc2.weight.requires_grad_(False)
    for hvp in ("fd", "fd-central", "zo", "exact"):
        calls[:] = [0, 1 if hvp == "exact" else 3]  # exact evaluates the loss once per block
        norm = "trace" if hvp == "zo" else "spectral"
        with pytest.raises(RuntimeError, match="boom"):
            probe(ModelLoss(model, compute=compute), {"w": [model.fc2.weight]}, norm=norm, hvp=hvp, num_vectors=5)
        assert model.training and model.drop.training
        assert model.fc2.weight.requires_grad is False
        for n, p in model.named_parameters():
            assert torch.equal(p.detach(), before[n][0]) and p.grad is None


# --- bad input ---------------------------------------------------------------------------------
def _tiny():
    x = nn.Parameter(torch.randn(4, dtype=torch.float64))
    return x, (lambda: (x**2).sum())


@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        ({"norm": "nuclear"}, ValueError, r"'nuclear'.*spectral, frobenius, rms, trace"),
        ({"hvp": "magic"}, ValueError, r"'magic'.*fd, fd-central, exact, zo"),
        ({"num_vectors": 0}, ValueError, r"num_vectors.*0"),
        ({"num_vectors": -3}, ValueError, r"num_vectors.*-3"),
        ({"num_vectors": 2.5}, ValueError, r"num_vectors.*2\.5"),
        ({"num_vectors": True}, ValueError, r"num_vectors.*True"),
        ({"h": 0.0, "hvp": "fd"}, ValueError, r"h must be.*0\.0"),
        ({"h": -1e-3, "hvp": "fd"}, ValueError, r"h must be.*-0\.001"),
        ({"norm": "spectral", "hvp": "zo"}, ValueError, r"spectral.*zo"),
        ({"norm": "frobenius", "hvp": "zo", "distribution": "rademacher"}, ValueError, r"rademacher.*gaussian"),
        ({"norm": "rms", "hvp": "zo", "distribution": "rademacher"}, ValueError, r"rademacher.*gaussian"),
        ({"distribution": "uniform", "norm": "trace"}, ValueError, r"'uniform'.*gaussian, rademacher"),
        ({"tol": 0}, ValueError, r"tol"),
        ({"target_rel_stderr": -0.1, "norm": "trace"}, ValueError, r"target_rel_stderr.*-0\.1"),
    ],
)
def test_probe_rejects_bad_arguments(kwargs, exc, match):
    x, f = _tiny()
    with pytest.raises(exc, match=match):
        probe(f, {"x": [x]}, **kwargs)


def test_probe_rejects_bad_loss_and_blocks():
    x, f = _tiny()
    with pytest.raises(TypeError, match="callable.*Tensor"):
        probe(f(), {"x": [x]})
    with pytest.raises(TypeError, match=r"scalar tensor.*shape \(4,\)"):
        probe(lambda: x**2, {"x": [x]})
    with pytest.raises(TypeError, match="scalar tensor.*float"):
        probe(lambda: 1.0, {"x": [x]}, hvp="zo", norm="trace")
    with pytest.raises(TypeError, match="non-empty"):
        probe(f, {})
    with pytest.raises(TypeError, match="'x'.*non-empty list"):
        probe(f, {"x": []})
    with pytest.raises(TypeError, match="'x'.*non-empty list.*Parameter"):
        probe(f, {"x": x})
    with pytest.raises(ValueError, match="overlap.*'a'.*'b'"):
        probe(f, {"a": [x], "b": [x]})
    with pytest.raises(ValueError, match="overlap.*'a'.*'b'"):
        check_blocks({"a": [x], "b": [x]})
    assert x.grad is None and x.requires_grad


# --- probe_model on a tiny Hugging Face model ---------------------------------------------------
def test_probe_model_tiny_bert_with_labels():
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from transformers import BertConfig, BertForSequenceClassification

    cfg = BertConfig(
        vocab_size=40, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=32, max_position_embeddings=16, initializer_range=0.3,
    )
    torch.manual_seed(0)
    model = BertForSequenceClassification(cfg).double().train()
    g = torch.Generator().manual_seed(1)
    batch = {"input_ids": torch.randint(0, 40, (4, 6), generator=g), "labels": torch.tensor([1, 0, 0, 1])}
    names = ["bert.embeddings.LayerNorm.weight", "bert.embeddings.LayerNorm.bias"]
    ps = [dict(model.named_parameters())[n] for n in names]
    with torch.no_grad():
        model.eval()
        ref_loss = float(model(**batch).loss)
        model.train()
    # dense block Hessian by plain double backward (dropout off, SDPA on its math kernel)
    model.eval()
    with sdpa_kernel([SDPBackend.MATH]):
        grads = torch.autograd.grad(model(**batch).loss, ps, create_graph=True)
        flat = torch.cat([gr.reshape(-1) for gr in grads])
        eye = torch.eye(flat.numel(), dtype=flat.dtype)
        cols = torch.autograd.grad(flat, ps, grad_outputs=eye, is_grads_batched=True)
    H = torch.cat([c.reshape(flat.numel(), -1) for c in cols], 1)
    true = float(torch.linalg.eigvalsh(0.5 * (H + H.T)).abs().max())
    model.train()

    est = probe_model(model, batch, {"ln": "bert.embeddings.LayerNorm.*", "cls": "classifier.*"},
                      norm="spectral", hvp="exact", num_vectors=32, tol=1e-6)
    assert set(est) == {"ln", "cls"} and est["ln"].dim == 32 and est["cls"].dim == 16 * 2 + 2
    assert abs(est["ln"].value - true) <= 1.01 * est["ln"].residual + 1e-8 * true
    assert model.training and all(m.training for m in model.modules())
    assert model.config._attn_implementation == "sdpa"
    with torch.no_grad():
        model.eval()
        assert float(model(**batch).loss) == ref_loss
    with pytest.raises(ValueError, match="no loss; include labels"):
        probe_model(model, {"input_ids": batch["input_ids"]}, {"ln": "bert.embeddings.LayerNorm.*"})
    with pytest.raises(ValueError, match="hybrid.*no peft adapter"):
        probe_model(model, batch)
