"""Exact perturbations: ``smoothlab.perturb.shifted`` (on-the-fly hooks and data swap).

A forward inside ``shifted`` equals a forward of a model whose weight was *replaced* by
W + s·d; afterwards every parameter is bit-identical, also when the body raises. The reason
for the design is demonstrated: an in-place +μz / −μz pair drifts (fp32 slightly, bf16 by
as much as the update), ``shifted`` does not.
"""

from __future__ import annotations

import copy
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from torch import nn

from smoothlab import seeded_gaussian, shifted
from smoothlab.perturb import param_seed


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
    assert torch.equal(model(x), manual(model, params, [torch.zeros_like(p) for p in params], 0.0)(x))
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
