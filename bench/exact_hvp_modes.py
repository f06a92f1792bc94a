"""Exact HVPs two ways, side by side in one process (issue 9: "try forward-over-reverse").

* ``double backward``: the probe's ``exact`` oracle, ∇⟨∇f, v⟩ by a second reverse pass
  over the first-order graph, which it builds once and reuses for every vector;
* ``forward-over-reverse``: ``torch.func.jvp`` of ``torch.func.grad`` (forward-mode AD
  through the backward pass), one full forward + backward per vector.

Both on MiniLM + LoRA r16 and 16 SST-2 sentences (attention on SDPA's math kernel, which
both need), for the base block and the LoRA block; each case's median over round-robin
repeats, in gradients of the same block. The two HVPs are checked to agree first.

    OMP_NUM_THREADS=2 HF_HUB_OFFLINE=1 PYTHONPATH=. python bench/exact_hvp_modes.py
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn
from torch.func import functional_call, grad, jvp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from steps import build_minilm  # noqa: E402

from smoothlab.hvp import Oracle, differentiable_attention, flatten  # noqa: E402
from smoothlab.hybrid.train import split_parameters  # noqa: E402


class _Call(nn.Module):
    """A module whose forward is the loss closure, so functional_call can swap the model's
    parameters (registered under ``m.``) for the transformed tensors."""

    def __init__(self, model: nn.Module, loss_fn) -> None:
        super().__init__()
        self.m, self.loss_fn = model, loss_fn

    def forward(self) -> torch.Tensor:
        return self.loss_fn()


def compare(model, loss_fn, block: list[nn.Parameter], repeats: int) -> dict[str, float]:
    ids = {id(p) for p in block}
    names = [n for n, p in model.named_parameters() if id(p) in ids]
    params = [dict(model.named_parameters())[n] for n in names]
    wrap = _Call(model, loss_fn)

    def f(*ps):
        return functional_call(wrap, {f"m.{n}": p for n, p in zip(names, ps)}, ())

    g = grad(f, argnums=tuple(range(len(params))))
    gen = torch.Generator().manual_seed(0)
    vs = tuple(torch.randn(p.shape, generator=gen) for p in params)
    v = flatten(list(vs), torch.float32)

    def forward_over_reverse():
        with differentiable_attention(model):
            return flatten(list(jvp(g, tuple(p.detach() for p in params), vs)[1]), torch.float32)

    with Oracle("exact", loss_fn, params, root=model) as oracle:
        hv = oracle.hvp(v)  # builds the first-order graph, as the first Lanczos vector does
        agree = float((forward_over_reverse() - hv).detach().norm() / hv.detach().norm())

        def gradient():
            with torch.enable_grad():
                return torch.autograd.grad(loss_fn(), params)

        fns = {
            "gradient": gradient,
            "double backward": lambda: oracle.hvp(v),
            "forward-over-reverse": forward_over_reverse,
        }
        times: dict[str, list[float]] = {k: [] for k in fns}
        for r in range(repeats + 1):
            for k, fn in fns.items():
                t = time.perf_counter()
                fn()
                if r:  # the first round warms up
                    times[k].append(time.perf_counter() - t)
    med = {k: statistics.median(t) for k, t in times.items()}
    return med | {"agree": agree}


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--data", default="/work/shared/data/sst2/train.tsv")
    args = ap.parse_args()
    args.batch, args.seq, args.device, args.dtype = 16, 128, "cpu", "float32"
    model, loss_fn = build_minilm(args)
    model.eval()
    base, peft = split_parameters(model, "hybrid-lora")
    print(f"{args.shape}, {torch.get_num_threads()} threads, median of {args.repeats} repeats")
    print(f"{'block':<6}{'case':<22}{'ms':>8}{'x grad':>8}")
    for name, block in (("base", base), ("lora", peft)):
        med = compare(model, loss_fn, block, args.repeats)
        for k in ("gradient", "double backward", "forward-over-reverse"):
            print(f"{name:<6}{k:<22}{1e3 * med[k]:8.1f}{med[k] / med['gradient']:8.2f}")
        print(f"{name:<6}the two HVPs agree to {med['agree']:.1e} (relative)")


if __name__ == "__main__":
    main()
