"""Half precision (bfloat16 / float16) base weights: what the ZO step can and cannot resolve.

bf16 keeps 8 significant bits (half a unit in the last place of |x| ~ 2e-2 is ~6e-5), float16
11. A ZO update η·g·z of ~1e-6 (η = 1e-6, the default rate) rounds to nothing there, and a
perturbation μz with μ = 1e-5 rounds away; the engine measures both on its first step and
warns, naming the fix.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from smoothlab.hybrid.engine import HALF_LOST_WARN, HybridEngine


def _model(dtype: torch.dtype, seed: int = 0) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    lin = nn.Linear(64, 64)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(64, 64, generator=g) * 0.02)
        lin.bias.zero_()
    x, y = torch.randn(16, 64, generator=g), torch.randn(16, 64, generator=g)
    return lin.to(dtype), x.to(dtype), y


def _step(dtype: torch.dtype, lr: float, mu: float, z: str = "table") -> tuple[list, float]:
    """One ZO step; the warnings it raised and the fraction of weight entries unchanged."""
    lin, x, y = _model(dtype)
    before = lin.weight.detach().clone()
    eng = HybridEngine(lin, [lin.weight], [], lr_zo=lr, lr_fo=0.0, mu=mu, seed=1, z=z)
    with warnings.catch_warnings(record=True) as got:
        warnings.simplefilter("always")
        eng.step(lambda: (lin(x).float() - y).pow(2).mean())
    same = (lin.weight == before).float().mean().item()
    return [w for w in got if issubclass(w.category, RuntimeWarning)], same


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("z", ["table", "rademacher"])
def test_update_lost_to_rounding_warns_once_with_the_fix(dtype, z):
    got, same = _step(dtype, lr=1e-6, mu=1e-2, z=z)
    # the measurement the warning reports: most entries really did not move
    assert same > HALF_LOST_WARN
    msgs = [str(w.message) for w in got]
    assert len(msgs) == 1, msgs
    assert "update rounds to nothing" in msgs[0] and f"{same:.0%}" in msgs[0]
    assert "float32" in msgs[0] and "--lr-base" in msgs[0]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_perturbation_lost_to_rounding_warns(dtype):
    mu = 1e-5 if dtype == torch.bfloat16 else 1e-6
    got, _ = _step(dtype, lr=1e-1, mu=mu)
    msgs = [str(w.message) for w in got]
    assert len(msgs) == 1 and "rounds away" in msgs[0] and "--mu" in msgs[0], msgs


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_no_warning_when_the_step_is_resolved(dtype):
    # float32 at the default rate, and bf16 at a rate and mu its ulps resolve
    lr, mu = (1e-6, 1e-3) if dtype == torch.float32 else (1e-1, 1e-2)
    got, same = _step(dtype, lr=lr, mu=mu)
    assert got == [] and same < HALF_LOST_WARN


def test_warns_only_on_the_first_step():
    lin, x, y = _model(torch.bfloat16)
    eng = HybridEngine(lin, [lin.weight], [], lr_zo=1e-6, lr_fo=0.0, mu=1e-5, seed=1)
    with warnings.catch_warnings(record=True) as got:
        warnings.simplefilter("always")
        for _ in range(3):
            eng.step(lambda: (lin(x).float() - y).pow(2).mean())
    assert len([w for w in got if issubclass(w.category, RuntimeWarning)]) == 2  # one of each


def test_check_changes_nothing():
    """The measurement is on copies: the step's weights are bit-identical with the check."""
    out = []
    for check in (True, False):
        lin, x, y = _model(torch.bfloat16)
        eng = HybridEngine(lin, [lin.weight], [], lr_zo=1e-2, lr_fo=0.0, mu=1e-3, seed=1, q=2)
        eng._half_checked = not check
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for _ in range(2):
                eng.step(lambda lin=lin, x=x, y=y: (lin(x).float() - y).pow(2).mean())
        out.append(lin.weight.detach().clone())
    assert torch.equal(out[0], out[1])


class _Adapted(nn.Module):
    """A bf16 base layer with a float32 low-rank adapter (as peft keeps LoRA): the adapter's
    weights are float32 but f carries the bf16 forward's rounding."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.base = nn.Linear(32, 32).to(torch.bfloat16)
        self.a = nn.Parameter(torch.randn(8, 32, generator=g) * 0.3)
        self.b = nn.Parameter(torch.randn(32, 8, generator=g) * 0.3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.base(x)
        return torch.tanh(h + (torch.tanh(h.float() @ self.a.T) @ self.b.T).to(h.dtype))


def test_fd_probe_of_a_float32_block_in_a_bf16_model_steps_for_bf16_and_warns():
    """The fd step was sized from the block's float32 eps (and the float32 loss): on bf16
    rounding it gave tr H = 4.5 ± 1.6 against exact 1.91 ± 0.25, with no warning. Both
    estimates use the same 20 vectors, so their difference is the HVPs' error alone; the bf16
    step keeps it within a few eps_bf16^(1/2) ≈ 9% (measured 5%)."""
    import smoothlab

    torch.manual_seed(0)
    m = _Adapted()
    x, y = torch.randn(16, 32).to(torch.bfloat16), torch.randn(16, 32)

    def loss() -> torch.Tensor:
        return (m(x).float() - y).pow(2).mean()

    out = {}
    for hvp in ("exact", "fd"):
        with warnings.catch_warnings(record=True) as got:
            warnings.simplefilter("always")
            blocks = {"peft": [m.a, m.b]}
            out[hvp] = smoothlab.probe(loss, blocks, norm="trace", hvp=hvp, num_vectors=20, model=m)
        msgs = [str(w.message) for w in got if issubclass(w.category, RuntimeWarning)]
        if hvp == "fd":
            assert any("float32 block of a torch.bfloat16 model" in s for s in msgs), msgs
        else:
            assert msgs == []
    exact, fd = out["exact"]["peft"].value, out["fd"]["peft"].value
    assert abs(fd - exact) < 0.25 * abs(exact), (fd, exact)


def test_dtype_option_loads_the_weights_in_that_dtype(tmp_path, capsys):
    """--dtype (every model-loading command): a bfloat16 checkpoint loads as bfloat16 by
    default (transformers keeps the checkpoint's dtype) and as float32 when asked (the CLI
    had no way to choose); LoRA stays float32; figure1's runs inherit it; the
    run records the dtype it loaded (auto resolved), and resuming with another is refused."""
    from transformers import AutoModelForCausalLM

    from smoothlab.cli import main
    from smoothlab.hybrid.config import Figure1Config
    from smoothlab.hybrid.presets import figure1_runs
    from smoothlab.hybrid.train import TrainConfig, build, train
    from tests.tiny_models import tiny_causal_lm

    saved = tmp_path / "opt_bf16"
    tiny_causal_lm("opt", seed=0, save_dir=saved)
    AutoModelForCausalLM.from_pretrained(saved).to(torch.bfloat16).save_pretrained(saved)
    small = dict(model=str(saved), train_size=8, eval_size=2, dev_size=2, batch_size=2)
    for dtype, want in (("auto", torch.bfloat16), ("float32", torch.float32)):
        cfg = TrainConfig(method="hybrid-lora", dtype=dtype, **small)
        bundle, _, _ = build(cfg)
        base = {p.dtype for n, p in bundle.model.named_parameters() if "lora_" not in n}
        lora = {p.dtype for n, p in bundle.model.named_parameters() if "lora_" in n}
        assert base == {want} and lora == {torch.float32}, (dtype, base, lora)
    runs = figure1_runs(Figure1Config(dtype="bfloat16", out=str(tmp_path / "f")))
    assert {r.dtype for r in runs.values()} == {"bfloat16"}
    out = tmp_path / "run"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        train(TrainConfig(method="fo-lora", steps=1, out=str(out), **small))  # auto
    assert '"dtype": "bfloat16"' in (out / "config.json").read_text()
    argv = ["train", "--method", "fo-lora", "--steps", "2", "--out", str(out), "--model"]
    argv += [str(saved), "--train-size", "8", "--eval-size", "2", "--dev-size", "2"]
    capsys.readouterr()
    assert main([*argv, "--batch-size", "2", "--dtype", "float32"]) == 2
    assert "dtype: 'bfloat16' -> 'float32'" in capsys.readouterr().err
    # auto loads this checkpoint as bfloat16: the same run, resumed (and recorded as loaded)
    assert main([*argv, "--batch-size", "2", "--dtype", "auto"]) == 0
    assert '"dtype": "bfloat16"' in (out / "config.json").read_text()
    assert main(["probe", "--dtype", "int8"]) == 2
    assert "invalid choice: 'int8'" in capsys.readouterr().err
