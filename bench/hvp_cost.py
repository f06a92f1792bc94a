"""Cost of the probe's HVPs against one block gradient, side by side in one process.

MiniLM + LoRA r16 (README Quick start), base block (22.7M weights), 16 SST-2 sentences.
Round-robin repeats, median per case. Cases:

* ``grad``              one block gradient ∇_b f (what the probe's reference point costs)
* ``draw gaussian``     one torch.randn over the block
* ``draw rademacher``   one ±1 vector (perturb's ``rademacher`` source via random_vector)
* ``fd (gaussian v)``   one FD-HVP with a fresh Gaussian v, reference gradient reused
* ``fd (rademacher v)`` the same with a Rademacher v
* ``fd (lanczos step)`` one FD-HVP on an existing vector, written into a recycled buffer
* ``lanczos iteration`` that plus the recurrence's vector arithmetic (2 float64 dots,
  2 axpys, 1 scale): what one Lanczos vector of the recorder costs
* ``hutchinson sample`` one trace sample vᵀHv with a Rademacher v (draw + HVP + dot)
* ``exact (double backward)`` one exact HVP, first-order graph built once and reused

    OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 PYTHONPATH=. python bench/hvp_cost.py [repeats]
"""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Callable

import torch

from smoothlab.estimators import random_vector
from smoothlab.estimators.operator import dot64, vector_buffer
from smoothlab.hvp import Oracle, block_gradients
from smoothlab.probe import eval_mode


def _timed(fn: Callable[[], object]) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def main(repeats: int = 5) -> dict[str, float]:
    sys.path.insert(0, "bench")
    from zo_vs_exact import minilm_base

    loss, blocks = minilm_base()
    params = blocks["base"]
    model = loss.model
    dim = sum(p.numel() for p in params)
    gen = torch.Generator().manual_seed(0)
    times: dict[str, list[float]] = {}
    with eval_mode(model), Oracle("fd", loss, params, root=model) as fd:
        fd.gradient()
        v0 = random_vector("unit", dim, gen, torch.float32, torch.device("cpu"))
        vp = random_vector("unit", dim, gen, torch.float32, torch.device("cpu"))
        spare = torch.empty_like(v0)

        def lanczos_iteration() -> None:
            w = fd.hvp(v0, out=spare)
            alpha = dot64(w, v0)
            w.sub_(v0, alpha=alpha).sub_(vp, alpha=0.5)
            w.div_(dot64(w, w) ** 0.5)

        vbuf = vector_buffer(dim, torch.float32, torch.device("cpu"))

        def hutchinson_sample() -> float:  # as hutchinson_trace draws it: v into a reused buffer
            return fd.quad(random_vector("rademacher", dim, gen, torch.float32, "cpu", vbuf))

        cases = {
            "grad": lambda: block_gradients(loss, blocks),
            "draw gaussian": lambda: random_vector("gaussian", dim, gen, torch.float32, "cpu"),
            "draw rademacher": lambda: random_vector("rademacher", dim, gen, torch.float32, "cpu"),
            "fd (gaussian v)": lambda: fd.hvp(
                random_vector("gaussian", dim, gen, torch.float32, "cpu")
            ),
            "fd (rademacher v)": lambda: fd.hvp(
                random_vector("rademacher", dim, gen, torch.float32, "cpu")
            ),
            "fd (lanczos step)": lambda: fd.hvp(v0, out=spare),
            "lanczos iteration": lanczos_iteration,
            "hutchinson sample": hutchinson_sample,
        }
        for _ in range(repeats):
            for name, fn in cases.items():
                times.setdefault(name, []).append(_timed(fn))
    # the exact oracle pins attention to SDPA's math kernel for its whole context: measure it
    # (and a gradient under the same kernel) in a round of its own
    with eval_mode(model), Oracle("exact", loss, params, root=model) as ex:
        ex.hvp(v0)  # builds the first-order graph once
        for _ in range(repeats):
            for name, fn in {
                "grad (math sdpa)": lambda: block_gradients(loss, blocks),
                "exact (double backward)": lambda: ex.hvp(v0),
            }.items():
                times.setdefault(name, []).append(_timed(fn))
    med = {k: statistics.median(v) for k, v in times.items()}
    g = med["grad"]
    print(f"threads={torch.get_num_threads()} repeats={repeats} dim={dim}")
    print(f"{'case':26s} {'ms':>8s} {'x grad':>8s}")
    for k, t in med.items():
        print(f"{k:26s} {1e3 * t:8.1f} {t / g:8.2f}")
    return med


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 5)
