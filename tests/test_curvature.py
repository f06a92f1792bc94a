"""smoothlab.curvature against dense float64 Hessians of a coupled quadratic."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from smoothlab.advisor import advise
from smoothlab.curvature import measure
from smoothlab.errors import UsageError

DX, DY = 14, 6


def _problem(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    d = DX + DY
    a = torch.randn(d, d, generator=gen, dtype=torch.float64)
    h = a @ a.T / d + torch.diag(torch.linspace(0.2, 2.0, d, dtype=torch.float64))
    b = torch.randn(d, generator=gen, dtype=torch.float64)
    x = torch.nn.Parameter(torch.randn(DX, generator=gen, dtype=torch.float64))
    y = torch.nn.Parameter(torch.randn(DY, generator=gen, dtype=torch.float64))

    def loss() -> torch.Tensor:
        w = torch.cat([x, y])
        return 0.5 * w @ h @ w + b @ w

    w = torch.cat([x.detach(), y.detach()])
    g = h @ w + b
    return loss, x, y, h, g


@pytest.mark.parametrize("hvp", ["exact", "fd"])
def test_measure_matches_dense_hessian(hvp: str) -> None:
    loss, x, y, h, g = _problem()
    gx, gy = g[:DX], g[DX:]
    hxx, hyy, hxy = h[:DX, :DX], h[DX:, DX:], h[:DX, DX:]
    before = (x.detach().clone(), y.detach().clone())
    c = measure(
        loss,
        [x],
        [y],
        hvp=hvp,
        trace_vectors=400,
        spectral_iters=DX,
        second_moment_samples=400,
        seed=1,
    )
    rel = 1e-9 if hvp == "exact" else 1e-5
    assert c.grad_norm_x == pytest.approx(float(gx.norm()), rel=1e-12)
    assert c.grad_norm_y == pytest.approx(float(gy.norm()), rel=1e-12)
    assert c.rho_x == pytest.approx(float(gx @ hxx @ gx / (gx @ gx)), rel=rel)
    assert c.rho_y == pytest.approx(float(gy @ hyy @ gy / (gy @ gy)), rel=rel)
    assert c.cross == pytest.approx(float(gx @ hxy @ gy), rel=rel)
    assert abs(c.cross_mismatch) < 1e-4 * abs(c.cross)
    assert c.L_x.value == pytest.approx(float(torch.linalg.eigvalsh(hxx).max()), rel=1e-6)
    assert c.L_y.value == pytest.approx(float(torch.linalg.eigvalsh(hyy).max()), rel=1e-3)
    tr = float(torch.trace(hxx))
    assert abs(c.trace_x.value - tr) < 4 * c.trace_x.stderr
    m1 = tr + 2 * float(gx @ hxx @ gx / (gx @ gx))
    assert abs(c.second_moment_x - m1) < 4 * c.second_moment_x_stderr
    assert c.r_x == pytest.approx(c.trace_x.value / c.L_x.value)
    assert torch.equal(x.detach(), before[0]) and torch.equal(y.detach(), before[1])
    adv = advise(**c.advice_inputs(), q=2)
    assert adv.rule == "curvature"
    assert adv.eta_x == pytest.approx(adv.joint_scale * 2 / (c.trace_x.value + 3 * c.rho_x))


def test_rademacher_delta_and_zo_second_moment() -> None:
    loss, x, y, h, g = _problem(seed=3)
    gx, hxx = g[:DX], h[:DX, :DX]
    c = measure(loss, [x], [], hvp="exact", z="rademacher", trace_vectors=300, spectral_iters=DX)
    assert c.kurtosis == 1.0 and c.d_y == 0 and math.isnan(c.cross)
    delta = float((gx * gx * torch.diagonal(hxx)).sum() / (gx @ gx))
    assert abs(c.delta_x - delta) < 4 * c.delta_x_stderr
    # zo: function values only; m1 of Gaussian z is tr H + 2 rho, ||g|| from (g'z)^2
    z = measure(loss, [x], [], hvp="zo", trace_vectors=300, second_moment_samples=400, seed=2)
    assert z.L_x is None and math.isnan(z.rho_x)
    tr = float(torch.trace(hxx))
    assert abs(z.trace_x.value - tr) < 4 * z.trace_x.stderr
    m1 = tr + 2 * float(gx @ hxx @ gx / (gx @ gx))
    assert abs(z.second_moment_x - m1) < 4 * z.second_moment_x_stderr
    assert z.grad_norm_x == pytest.approx(float(gx.norm()), rel=0.25)
    adv = advise(**z.advice_inputs(), q=1)
    assert adv.eta_x == pytest.approx(1 / z.second_moment_x)


def test_measure_errors() -> None:
    loss, x, y, *_ = _problem()
    with pytest.raises(ValueError, match="hvp"):
        measure(loss, [x], [y], hvp="nope")
    with pytest.raises(ValueError, match="z source .uniform.; accepted: gaussian, table"):
        measure(loss, [x], [y], z="uniform")
    with pytest.raises(ValueError, match="empty"):
        measure(loss, [], [])


def test_measure_refuses_a_bare_tensor_instead_of_measuring_its_slices() -> None:
    """list(x) of a Parameter is its 0-d slices, which are not leaves: measure(f, x, [y])
    returned L_x = 0 and tr H_xx = 0 (truth: the dense Hessian's) without a word."""
    loss, x, y, h, _ = _problem()
    hxx = h[:DX, :DX]
    for bad in (x, torch.nn.Linear(2, 2)):
        with pytest.raises(UsageError, match="x_params must be a list of tensors"):
            measure(loss, bad, [y], hvp="exact")
    c = measure(loss, [x], [y], hvp="exact", trace_vectors=np.int64(4), seed=np.int64(3))
    assert c.L_x.value == pytest.approx(float(torch.linalg.eigvalsh(hxx).abs().max()), rel=1e-6)
    assert c.advice_inputs()["rho_x_stderr"] == 0.0  # an HVP along g: exact on the batch


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"seed": 1.5}, "seed must be an integer"),
        ({"seed": "a"}, "seed must be an integer"),
        ({"seed": True}, "seed must be an integer"),
        ({"model": "m"}, "model must be a torch.nn.Module"),
        ({"h": -1.0}, "h must be"),
        ({"second_moment_samples": True}, "second_moment_samples must be"),
        ({"y_params": "x"}, "y_params must be a list"),
    ],
)
def test_measure_checks_its_arguments_as_probe_does(kwargs: dict, needle: str) -> None:
    """seed=1.5 or 'a' crashed inside torch; model='m' was ignored (probe refuses it)."""
    loss, x, y, *_ = _problem()
    with pytest.raises(UsageError, match=needle):
        measure(loss, [x], **({"y_params": [y], "hvp": "exact"} | kwargs))


def test_measure_refuses_a_parameter_in_both_blocks() -> None:
    loss, x, y, *_ = _problem()
    with pytest.raises(UsageError, match="blocks overlap"):
        measure(loss, [x, y], [y], hvp="exact")
