"""HVP oracles (exact, fd, fd-central, zo) against dense float64 block Hessians.

Ground truth: closed forms on coupled quadratics (the answer for block x is A, never the
full Hessian), ``torch.autograd.functional.hessian`` on a small float64 MLP, and a tiny BERT
whose reference Hessian comes from the *eager* attention model while the probe runs on the
*sdpa* copy of the same weights (the CPU flash SDPA kernel has no double backward, so the
exact oracle must switch attention to a differentiable path by itself).
"""

from __future__ import annotations

import math
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from fixtures import coupled_quadratic, dense_hessian, norms_of
from torch import nn

from smoothlab import Oracle, probe
from smoothlab.hvp import default_step, flatten, grad_enabled_for, unflatten

ORACLES = ("exact", "fd", "fd-central")


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


# --- coupled quadratic: every oracle returns the *block* Hessian ------------------------------
@pytest.mark.parametrize(
    "kind,dtype,tol",
    [
        ("exact", torch.float64, 1e-12),
        ("fd", torch.float64, 1e-5),
        ("fd-central", torch.float64, 1e-7),
        ("exact", torch.float32, 1e-5),
        ("fd", torch.float32, 5e-2),
        ("fd-central", torch.float32, 1e-2),
    ],
)
def test_oracle_hvp_is_block_restricted(kind, dtype, tol):
    x, y, f, A, B, C = coupled_quadratic(dtype=dtype)
    g = torch.Generator().manual_seed(1)
    for params, H in (([x], A), ([y], B)):
        with Oracle(kind, f, params) as oracle:
            for _ in range(3):
                v = torch.randn(H.shape[0], generator=g, dtype=torch.float64)
                hv = oracle.hvp(v.to(oracle.dtype))
                assert hv.dtype == oracle.dtype and hv.shape == v.shape
                assert rel(hv, H @ v) < tol
        assert oracle.num_hvp == 3


def test_oracle_hvp_block_with_two_tensors_and_coupling_between_them():
    """A block made of two tensors sees its whole diagonal block, including their coupling."""
    x, y, f, A, B, C = coupled_quadratic()
    H = torch.cat([torch.cat([A, C], 1), torch.cat([C.T, B], 1)])
    v = torch.randn(H.shape[0], generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    for kind in ORACLES:
        with Oracle(kind, f, [x, y]) as oracle:
            assert rel(oracle.hvp(v), H @ v) < 1e-5
            assert math.isclose(oracle.quad(v), float(v @ H @ v), rel_tol=1e-5)


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-6), (torch.float32, 5e-2)])
def test_zo_quad_is_block_quadratic_form(dtype, tol):
    x, y, f, A, B, C = coupled_quadratic(dtype=dtype)
    g = torch.Generator().manual_seed(2)
    for params, H in (([x], A), ([y], B)):
        with Oracle("zo", f, params) as oracle:
            for _ in range(3):
                v = torch.randn(H.shape[0], generator=g, dtype=torch.float64)
                c = oracle.quad(v.to(oracle.dtype))
                truth = float(v @ H @ v)
                assert abs(c - truth) <= tol * float(v @ v) * float(H.abs().max()), (c, truth)
            with pytest.raises(ValueError, match="zo"):
                oracle.hvp(v)
        assert oracle.num_hvp == 3


def test_example_2_3_oracles():
    """f = a x² + b y²: H_xx = 2a, H_yy = 2b (the paper's Example 2.3)."""
    a, b = 50.0, 0.5
    x = nn.Parameter(torch.tensor([0.3], dtype=torch.float64))
    y = nn.Parameter(torch.tensor([-1.2], dtype=torch.float64))

    def f():
        return (a * x**2 + b * y**2).sum()

    one = torch.ones(1, dtype=torch.float64)
    for kind in ("exact", "fd", "fd-central", "zo"):
        for p, truth in ((x, 2 * a), (y, 2 * b)):
            with Oracle(kind, f, [p]) as oracle:
                assert oracle.quad(one) == pytest.approx(truth, rel=1e-5)


@pytest.mark.parametrize("kind,tol", [("fd", 1e-2), ("fd-central", 1e-3), ("zo", 1e-2)])
def test_default_step_follows_a_coarser_loss_dtype(kind, tol):
    """float64 parameters, loss computed in float32 (as Hugging Face causal-LM losses are):
    the default step must be the float32 one, else second differences are pure rounding."""
    x, y, f, A, B, C = coupled_quadratic()

    def f32():
        return f().float()

    v = torch.randn(x.numel(), generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    truth = float(v @ A @ v)
    scale = float(torch.linalg.matrix_norm(A, 2)) * float(v @ v)
    with Oracle(kind, f32, [x]) as oracle:
        assert abs(oracle.quad(v) - truth) <= tol * scale
        x_norm = float(x.detach().norm())
        eps32 = torch.finfo(torch.float32).eps
        assert oracle.step_for(v) * float(v.norm()) == pytest.approx(
            eps32 ** {"fd": 1 / 2, "fd-central": 1 / 3, "zo": 1 / 4}[kind] * x_norm
        )
    with Oracle("exact", f32, [x]) as oracle:
        assert oracle.step_for(v) == 0.0


# --- helpers ------------------------------------------------------------------------------
def test_flatten_unflatten_roundtrip_and_default_steps():
    ts = [torch.randn(2, 3), torch.randn(4)]
    flat = flatten(ts, torch.float64)
    assert flat.dtype == torch.float64 and flat.numel() == 10
    back = unflatten(flat, ts)
    assert all(torch.equal(a.double(), b) for a, b in zip(ts, back))
    p32 = [torch.full((100,), 10.0)]  # ‖x‖ = 100
    eps = torch.finfo(torch.float32).eps
    assert default_step("fd", p32) == pytest.approx(math.sqrt(eps) * 100)
    assert default_step("fd-central", p32) == pytest.approx(eps ** (1 / 3) * 100)
    assert default_step("zo", p32) == pytest.approx(eps ** (1 / 4) * 100)
    assert default_step("fd", [torch.zeros(3)]) == pytest.approx(math.sqrt(eps))  # max(‖x‖, 1)
    p64 = [p.double() for p in p32]
    assert default_step("zo", p64) == pytest.approx(torch.finfo(torch.float64).eps ** 0.25 * 100)
    assert default_step("zo", p64, torch.float32) == pytest.approx(eps**0.25 * 100)
    assert default_step("zo", p32, torch.float64) == pytest.approx(eps**0.25 * 100)


def test_user_step_is_used_and_validated():
    x, y, f, A, B, C = coupled_quadratic()
    with Oracle("fd", f, [x], h=1e-3) as oracle:
        assert oracle.step_for(torch.ones(x.numel(), dtype=torch.float64) * 7) == 1e-3
    for bad in (0.0, -1e-3, math.inf, math.nan, "1e-3"):
        with pytest.raises(ValueError, match="h must be"):
            Oracle("fd", f, [x], h=bad)
    with pytest.raises(ValueError, match="'nope'.*exact"):
        Oracle("nope", f, [x])


# --- small float64 MLP against torch.autograd.functional.hessian -----------------------------
def mlp_problem():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    inputs = torch.randn(16, 5, dtype=torch.float64)
    targets = torch.randint(0, 3, (16,))

    def loss_fn():
        return nn.functional.cross_entropy(model(inputs), targets)

    return model, loss_fn, inputs, targets


def dense_block_hessian(model, names, batch):
    """Dense float64 Hessian of ``model(**batch).loss`` w.r.t. the named parameters."""
    params = dict(model.named_parameters())
    return dense_hessian(lambda: model(**batch).loss, [params[n] for n in names])


def test_mlp_oracles_match_dense_hessian():
    model, loss_fn, inputs, targets = mlp_problem()
    named = dict(model.named_parameters())
    for names in (["0.weight", "0.bias"], ["2.weight"]):
        params = [named[n] for n in names]
        sizes = [named[n].numel() for n in names]
        shapes = [named[n].shape for n in names]

        def fn(flat, names=names, sizes=sizes, shapes=shapes):
            pieces = torch.split(flat, sizes)
            over = {n: t.view(s) for n, t, s in zip(names, pieces, shapes)}
            out = torch.func.functional_call(model, {**named, **over}, (inputs,))
            return nn.functional.cross_entropy(out, targets)

        flat0 = torch.cat([p.detach().reshape(-1) for p in params])
        H = torch.autograd.functional.hessian(fn, flat0)
        g = torch.Generator().manual_seed(0)
        vs = [torch.randn(H.shape[0], generator=g, dtype=torch.float64) for _ in range(3)]
        for kind, tol in (("exact", 1e-10), ("fd", 1e-4), ("fd-central", 1e-6)):
            with Oracle(kind, loss_fn, params, root=model) as oracle:
                for v in vs:
                    assert rel(oracle.hvp(v), H @ v) < tol, (names, kind)
        with Oracle("zo", loss_fn, params, root=model) as oracle:
            for v in vs:
                assert oracle.quad(v) == pytest.approx(float(v @ H @ v), rel=1e-4, abs=1e-6)


# --- tiny BERT: eager reference, sdpa probe ------------------------------------------------
def tiny_bert(attn: str):
    from transformers import BertConfig, BertForSequenceClassification

    cfg = BertConfig(
        vocab_size=50,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=16,
        attn_implementation=attn,
        initializer_range=0.3,
    )
    torch.manual_seed(0)
    return BertForSequenceClassification(cfg).double().eval()


@pytest.fixture(scope="module")
def bert_pair():
    ref = tiny_bert("eager")
    sdpa = tiny_bert("sdpa")
    sdpa.load_state_dict(ref.state_dict())
    assert sdpa.config._attn_implementation == "sdpa"
    g = torch.Generator().manual_seed(0)
    batch = {
        "input_ids": torch.randint(0, 50, (4, 6), generator=g),
        "labels": torch.tensor([0, 1, 1, 0]),
    }
    blocks = {
        "query": ["bert.encoder.layer.0.attention.self.query.weight"],  # 256 parameters
        "norm": [
            "bert.encoder.layer.0.attention.output.LayerNorm.weight",
            "bert.encoder.layer.0.attention.output.LayerNorm.bias",
        ],  # 32 parameters
    }
    hessians = {b: dense_block_hessian(ref, names, batch) for b, names in blocks.items()}
    return ref, sdpa, batch, blocks, hessians


def test_sdpa_cpu_kernel_has_no_double_backward(bert_pair):
    """The reason the exact oracle switches attention: plain sdpa fails the double backward."""
    _, sdpa, batch, blocks, _ = bert_pair
    p = dict(sdpa.named_parameters())[blocks["query"][0]]
    (g,) = torch.autograd.grad(sdpa(**batch).loss, p, create_graph=True)
    with pytest.raises(RuntimeError, match="not implemented"):
        torch.autograd.grad(g.sum(), p)


def test_tiny_bert_oracles_match_eager_dense_hessian(bert_pair):
    from smoothlab import ModelLoss

    ref, sdpa, batch, blocks, hessians = bert_pair
    named = dict(sdpa.named_parameters())
    loss_fn = ModelLoss(sdpa, batch)
    g = torch.Generator().manual_seed(0)
    for b, names in blocks.items():
        H = hessians[b]
        v = torch.randn(H.shape[0], generator=g, dtype=torch.float64)
        for kind, tol in (("exact", 1e-9), ("fd", 1e-4), ("fd-central", 1e-6)):
            with Oracle(kind, loss_fn, [named[n] for n in names], root=sdpa) as oracle:
                assert rel(oracle.hvp(v), H @ v) < tol, (b, kind)
        with Oracle("zo", loss_fn, [named[n] for n in names], root=sdpa) as oracle:
            # second differences in float64: error ~ eps·|f|/h² + O(h²), small against ‖H‖₂‖v‖²
            scale = float(torch.linalg.matrix_norm(H, 2)) * float(v @ v)
            assert abs(oracle.quad(v) - float(v @ H @ v)) <= 1e-4 * scale, b


def test_tiny_bert_probe_norms_match_eager_dense_hessian(bert_pair):
    ref, sdpa, batch, blocks, hessians = bert_pair
    named = dict(sdpa.named_parameters())
    pblocks = {b: [named[n] for n in names] for b, names in blocks.items()}
    from smoothlab import ModelLoss

    loss_fn = ModelLoss(sdpa, batch)
    spec = probe(loss_fn, pblocks, norm="spectral", hvp="exact", num_vectors=40, tol=1e-5)
    for b, H in hessians.items():
        eig = torch.linalg.eigvalsh(H)
        true = float(eig.abs().max())
        est = spec[b]
        # a Ritz value is within its residual of an eigenvalue; with a converged run, the top one
        assert abs(est.value - true) <= max(est.residual, 1e-8 * true) * 1.01, (b, est, true)
        fro, tr, d = float(H.norm()), float(eig.sum()), H.shape[0]
        for norm, truth in (("frobenius", fro), ("rms", fro / math.sqrt(d)), ("trace", tr)):
            est = probe(loss_fn, {b: pblocks[b]}, norm=norm, hvp="exact", num_vectors=30, seed=1)[b]
            assert abs(est.value - truth) <= 4 * est.stderr, (b, norm, est.value, truth, est.stderr)
    assert sdpa.config._attn_implementation == "sdpa"


@pytest.mark.parametrize("hvp", ["exact", "fd", "fd-central"])
def test_mlp_probe_norms_match_dense_hessian(hvp):
    """All four norms of a float64 MLP's blocks against the dense block Hessian."""
    model, loss_fn, inputs, targets = mlp_problem()
    named = dict(model.named_parameters())
    blocks = {"first": [named["0.weight"], named["0.bias"]], "last": [named["2.weight"]]}
    truths = {b: norms_of(dense_hessian(loss_fn, ps)) for b, ps in blocks.items()}
    spec = probe(loss_fn, blocks, norm="spectral", hvp=hvp, num_vectors=48, tol=1e-6, model=model)
    for b, e in spec.items():
        assert (
            abs(e.value - truths[b]["spectral"]) <= 1.01 * e.residual + 1e-6 * truths[b]["spectral"]
        )
    for norm in ("frobenius", "rms", "trace"):
        est = probe(loss_fn, blocks, norm=norm, hvp=hvp, num_vectors=40, seed=2, model=model)
        for b, e in est.items():
            assert abs(e.value - truths[b][norm]) <= 4 * e.stderr, (
                b,
                norm,
                e.value,
                truths[b][norm],
                e.stderr,
            )


# --- the leaf-shadow fd path (a module tree is known) ---------------------------------------
class TiedMLP(nn.Module):
    """One weight read by two layers (as tied embeddings are): its Hessian has cross terms."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4).double()
        self.b = nn.Linear(4, 2).double()
        self.c = nn.Linear(4, 4).double()
        self.c.weight = self.a.weight  # tied

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.tanh(self.c(torch.tanh(self.a(x)))))


def test_fd_fast_path_matches_dense_hessian_with_tied_weights_and_out_buffer():
    torch.manual_seed(3)
    model, x, y = TiedMLP(), torch.randn(12, 4, dtype=torch.float64), torch.randint(0, 2, (12,))
    model.b.weight.requires_grad_(False)  # a frozen parameter in the block

    def loss_fn():
        return nn.functional.cross_entropy(model(x), y)

    params = [model.a.weight, model.b.weight]
    with grad_enabled_for(params):
        H = dense_hessian(loss_fn, params)
    before = [p.detach().clone() for p in model.parameters()]
    model.a.weight.grad = sentinel = torch.full_like(model.a.weight, 7.0)
    vs = torch.randn(3, H.shape[0], generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for kind, tol in (("fd", 1e-4), ("fd-central", 1e-6)):
        with (
            Oracle(kind, loss_fn, params, root=model) as fast,
            Oracle(kind, loss_fn, params) as swap,
        ):
            out = torch.empty(H.shape[0], dtype=torch.float64)
            for v in vs:
                hv = fast.hvp(v, out=out)
                assert hv.data_ptr() == out.data_ptr()
                assert rel(hv, H @ v) < tol, kind
                assert rel(fast.hvp(v), swap.hvp(v)) < 1e-6  # the .data-swap path agrees
    for p, b in zip(model.parameters(), before):
        assert torch.equal(p, b)
    assert model.a.weight.grad is sentinel and torch.all(sentinel == 7.0)
    assert model.b.weight.requires_grad is False and model.b.weight.grad is None
    assert all("weight" not in vars(m) for m in model.modules())  # no shadow left behind


class EmbedLM(nn.Module):
    """Embeddings as a language model has them: a padded vocabulary table, a position table,
    one read with ``scale_grad_by_freq`` (a dense gradient) and a head tied to the first."""

    def __init__(self) -> None:
        super().__init__()
        self.tok = nn.Embedding(7, 3, padding_idx=0).double()
        self.pos = nn.Embedding(5, 3).double()
        self.freq = nn.Embedding(7, 3, scale_grad_by_freq=True).double()
        self.mix = nn.Linear(3, 3).double()
        self.head = nn.Linear(3, 7, bias=False).double()
        self.head.weight = self.tok.weight  # tied: the table also gets a dense gradient

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(ids.shape[1]).expand_as(ids)
        h = torch.tanh(self.mix(self.tok(ids) + self.pos(pos) * self.freq(ids)))
        return self.head(h)


@pytest.mark.parametrize("tied", [True, False])
def test_fd_fast_path_shifts_embeddings_at_their_rows(tied):
    """The rows of a plain embedding are leaves of their own, summed into the result at their
    ids: equal to the dense Hessian, with a tied head too. Where autograd's gradient is not
    the derivative of f (padding ids read: the padding row moves the output but gets no
    gradient; ``scale_grad_by_freq``: rescaled), the reference is the swap path's difference
    of autograd gradients, which uses the stock embedding backward."""
    torch.manual_seed(4)
    model = EmbedLM()
    if not tied:
        model.head.weight = nn.Parameter(model.head.weight.detach().clone())
    plain = [model.tok.weight, model.pos.weight, model.mix.weight]
    every = plain + [model.freq.weight]
    before = [p.detach().clone() for p in model.parameters()]
    gen = torch.Generator().manual_seed(1)
    for ids in (
        torch.tensor([[1, 2, 3, 3, 2], [6, 4, 4, 1, 6]]),  # no padding; row 5 is never read
        torch.tensor([[1, 0, 3, 3, 2], [0, 4, 4, 1, 6]]),  # 0 is the padding id
    ):
        y = torch.randint(0, 7, ids.shape, generator=gen)

        def loss_fn(ids=ids, y=y):
            return nn.functional.cross_entropy(model(ids).flatten(0, 1), y.flatten())

        padded = bool((ids == 0).any())
        with grad_enabled_for(plain):
            H = dense_hessian(loss_fn, plain)
        for kind, tol in (("fd", 1e-4), ("fd-central", 1e-6)):
            for params in (plain, every):
                dim = sum(p.numel() for p in params)
                vs = torch.randn(3, dim, generator=gen, dtype=torch.float64)
                with (
                    Oracle(kind, loss_fn, params, root=model) as fast,
                    Oracle(kind, loss_fn, params) as swap,
                ):
                    for v in vs:
                        hv = fast.hvp(v)
                        assert rel(hv, swap.hvp(v)) < 1e-6, (kind, tied)
                        if params is plain and not padded:
                            assert rel(hv, H @ v) < tol, (kind, tied)
                        if not tied:  # rows never read, and the padding row: exactly zero
                            assert torch.all(hv[:21].view(7, 3)[[0, 5]] == 0)
                    assert fast._row_owners == {model.tok, model.pos}
                    assert (0 in fast._dense_idx) is tied  # a tied table is also shifted densely
    for p, b in zip(model.parameters(), before):
        assert torch.equal(p, b)
    assert all("weight" not in vars(m) for m in model.modules())


def test_fd_fast_path_divides_by_h_after_a_half_precision_loss():
    """1/h rides in the backward's seed only for a float32/64 loss: a bfloat16 seed would
    round it (0.2%), so there the fast path divides after, and agrees with the swap path."""
    torch.manual_seed(5)
    model, x = TiedMLP().float(), torch.randn(12, 4)

    def loss_fn():
        return model(x).square().mean().to(torch.bfloat16)

    params = [model.a.weight, model.b.weight]
    v = torch.randn(sum(p.numel() for p in params), generator=torch.Generator().manual_seed(0))
    for kind in ("fd", "fd-central"):
        with (
            Oracle(kind, loss_fn, params, root=model) as fast,
            Oracle(kind, loss_fn, params) as swap,
        ):
            assert rel(fast.hvp(v), swap.hvp(v)) < 1e-5, kind


@pytest.mark.parametrize("kind", ["fd", "fd-central"])
def test_fd_fast_path_sums_its_gradients_through_gradient_reduction(kind):
    """A data-parallel caller sums gradients over ranks with hooks on the parameters
    (``smoothlab.hybrid.distributed.global_gradients``), which the fd fast path's leaf copies never
    reach; it hands them to ``gradient_reduction`` instead. Two identical ranks, each with
    half the loss, every gradient summed by the hooks and by the reducer (both doubling it
    here), give the one-process H v; had the fast path skipped the reducer, a summed
    reference gradient would meet a local one and the difference would be garbage."""
    from smoothlab.hvp import gradient_reduction

    torch.manual_seed(4)
    model = EmbedLM()
    params = [model.tok.weight, model.pos.weight, model.mix.weight]
    ids, y = torch.tensor([[1, 2, 3, 3, 2], [6, 4, 4, 1, 6]]), torch.tensor([[3, 1, 4, 1, 5]] * 2)

    def loss_fn(scale=1.0):
        return scale * nn.functional.cross_entropy(model(ids).flatten(0, 1), y.flatten())

    v = torch.randn(sum(p.numel() for p in params), dtype=torch.float64)
    with Oracle(kind, loss_fn, params, root=model) as one:
        expected = one.hvp(v)
    calls = []

    def reduce(flat):
        calls.append(flat.numel())
        flat.mul_(2)

    hooks = [p.register_hook(lambda g: 2 * g) for p in params]
    try:
        with (
            gradient_reduction(reduce),
            Oracle(kind, lambda: loss_fn(0.5), params, root=model) as two,
        ):
            got = two.hvp(v)
    finally:
        for h in hooks:
            h.remove()
    assert calls and set(calls) == {v.numel()}  # one flat gradient of the block per evaluation
    # the same differences summed in another order: rounding over h (fd: h ~ 1e-8, so
    # ~1e-8 relative at most); a skipped reduction is off by O(1)
    assert rel(got, expected) < 1e-7


class ReadsOutside(nn.Module):
    """Weights read outside their modules' forwards: a head that multiplies by the
    embedding's table directly (``h @ tok.weight.T``) and an L2 penalty over the mixing
    layer's parameters, as a loss may add one."""

    def __init__(self) -> None:
        super().__init__()
        self.tok = nn.Embedding(7, 3).double()
        self.mix = nn.Linear(3, 3).double()

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.mix(self.tok(ids)))
        return h @ self.tok.weight.T + 0.1 * sum(p.square().sum() for p in self.mix.parameters())


@pytest.mark.parametrize("kind", ["fd", "fd-central", "zo"])
def test_oracle_with_model_sees_weights_read_outside_their_modules(kind):
    """On the fly, a weight read outside its module's forward would be seen unshifted
    (fd: H v off by g/h, about 1e7 here). The oracle finds such weights once and swaps them:
    with the model it equals the dense Hessian and the model-free (swap) oracle."""
    torch.manual_seed(6)
    model = ReadsOutside()
    ids, y = torch.tensor([[1, 2, 3, 4], [6, 5, 2, 1]]), torch.tensor([[2, 3, 4, 5], [0, 1, 6, 3]])

    def loss_fn():
        return nn.functional.cross_entropy(model(ids).flatten(0, 1), y.flatten())

    params = [model.tok.weight, model.mix.weight, model.mix.bias]
    with grad_enabled_for(params):
        H = dense_hessian(loss_fn, params)
    gen = torch.Generator().manual_seed(2)
    with Oracle(kind, loss_fn, params, root=model) as fly, Oracle(kind, loss_fn, params) as swap:
        assert fly._swap() == {0, 1, 2} and not fly._fast()
        for v in torch.randn(3, H.shape[0], generator=gen, dtype=torch.float64):
            if kind == "zo":
                assert fly.quad(v) == pytest.approx(float(v @ H @ v), rel=1e-5)
                assert fly.quad(v) == pytest.approx(swap.quad(v), rel=1e-9)
            else:
                assert rel(fly.hvp(v), H @ v) < (1e-4 if kind == "fd" else 1e-6)
                assert rel(fly.hvp(v), swap.hvp(v)) < 1e-9
    est = probe(loss_fn, {"all": params}, hvp="fd", num_vectors=12, model=model)["all"]
    assert est.value == pytest.approx(float(torch.linalg.eigvalsh(H).abs().max()), rel=1e-4)
