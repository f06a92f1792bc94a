"""Why the one-step advisor rate explodes over a run (issue 8): two measurements at init.

* ``onestep``: one real SPSA step, E[f(x − η ĝ)] − f(x) over K directions, for each η, beside
  the linear term −η E(gᵀz)². Its minimiser is the one-step curvature rate.
* ``secant``: the secant curvature along random directions,
  C(s) = E[f(x + t z) + f(x − t z) − 2 f(x)] / t² with t = s/√d (a displacement of length s).

MiniLM with a fresh head (zo-ft: every weight perturbed), 16 SST-2 sentences (data seed 8)::

    python bench/zo_step_scale.py onestep 12 1e-4,1e-3,3e-3,1e-2,3e-2,1e-1
    python bench/zo_step_scale.py secant 12 1,10,100,400,1600
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DATA = ROOT.parent / "shared" / "data" / "sst2" / "train.tsv"


def setup():
    from smoothlab.hybrid.data import load_task_data
    from smoothlab.hybrid.models import load_model
    from smoothlab.perturb import seeded_gaussian, shifted

    task, splits = load_task_data("sst2", str(DATA), train=1000, eval=10, dev=10, seed=8)
    bundle = load_model(None, task, seed=0)
    model = bundle.model.eval()
    batch = bundle.encode(splits.train[:16], 128)
    params = list(model.parameters())
    for p in params:
        p.requires_grad_(False)

    def f(seed: int | None = None, scale: float = 0.0) -> float:
        with torch.no_grad():
            if seed is None:
                return float(bundle.loss(batch))
            with shifted(params, seeded_gaussian(seed), scale, model):
                return float(bundle.loss(batch))

    return f, sum(p.numel() for p in params)


def mean_se(xs: list[float]) -> tuple[float, float]:
    m = sum(xs) / len(xs)
    return m, math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1) / len(xs))


def onestep(k: int, etas: list[float]) -> None:
    f, _ = setup()
    f0, mu = f(), 1e-3
    coefs = [(f(500 + i, mu) - f(500 + i, -mu)) / (2 * mu) for i in range(k)]
    g2 = sum(c * c for c in coefs) / k
    print(f"f(x) = {f0:.4f}, E (g.z)^2 = {g2:.4g} over {k} directions")
    for eta in etas:
        m, se = mean_se([f(500 + i, -eta * coefs[i]) - f0 for i in range(k)])
        print(
            f"eta {eta:8.2g}  E df = {m:+.4g} +- {se:.2g}   linear term {-eta * g2:+.4g}",
            flush=True,
        )


def secant(k: int, displacements: list[float]) -> None:
    f, d = setup()
    f0 = f()
    for s in displacements:
        t = s / math.sqrt(d)
        m, se = mean_se([(f(1000 + i, t) + f(1000 + i, -t) - 2 * f0) / t**2 for i in range(k)])
        print(f"displacement {s:8.3g}  secant curvature C = {m:10.4g} +- {se:.3g}", flush=True)


if __name__ == "__main__":
    what, k, values = sys.argv[1], int(sys.argv[2]), [float(v) for v in sys.argv[3].split(",")]
    {"onestep": onestep, "secant": secant}[what](k, values)
