"""CUDA checks (run with `pytest -m gpu` on a machine with a GPU; CI has none)."""

from __future__ import annotations

import pytest
import torch
from fixtures import dense_hessian, planted

import smoothlab
from smoothlab.hybrid.engine import HybridEngine

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def _quadratic(device: str, dtype: torch.dtype = torch.float32):
    g = torch.Generator().manual_seed(0)
    a = planted(torch.linspace(-3.0, 10.0, 64, dtype=torch.float64), g)
    x = torch.nn.Parameter(torch.randn(64, generator=g).to(device, dtype))
    A = a.to(device, dtype)
    return x, A, lambda: 0.5 * x @ A @ x, a


@pytest.mark.parametrize("hvp", ["exact", "fd-central"])
def test_probe_on_cuda_matches_dense_spectrum(hvp: str) -> None:
    x, _, f, a = _quadratic("cuda")
    truth = float(torch.linalg.eigvalsh(dense_hessian(f, [x]).cpu()).abs().max())
    assert truth == pytest.approx(10.0, rel=1e-5)
    est = smoothlab.probe(f, {"x": [x]}, norm="spectral", hvp=hvp, num_vectors=64)["x"]
    assert abs(est.value - truth) <= 1e-3 * truth + 2 * est.residual


def test_mlp_probe_on_cuda_equals_cpu() -> None:
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1)
    ).double()
    xs = torch.randn(32, 8, dtype=torch.float64)
    ys = torch.randn(32, 1, dtype=torch.float64)
    results = {}
    for dev in ("cpu", "cuda"):
        m = net.to(dev)
        loss = smoothlab.ModelLoss(
            m, (xs.to(dev), ys.to(dev)), criterion=torch.nn.functional.mse_loss
        )
        results[dev] = smoothlab.probe_model(
            m, compute=loss, blocks="all", norm="spectral", hvp="exact", num_vectors=40
        )["all"].value
    assert results["cuda"] == pytest.approx(results["cpu"], rel=1e-8)


def test_engine_bf16_on_cuda_leaves_no_drift() -> None:
    lin = torch.nn.Linear(256, 256).to("cuda", torch.bfloat16)
    before = [p.detach().clone() for p in lin.parameters()]
    engine = HybridEngine(lin, list(lin.parameters()), [], lr_zo=0.0, lr_fo=0.0, mu=1e-2, q=2)
    inp = torch.randn(8, 256, device="cuda", dtype=torch.bfloat16)
    for _ in range(20):
        engine.step(lambda: lin(inp).float().pow(2).mean())
    assert all(torch.equal(b, p) for b, p in zip(before, lin.parameters()))
