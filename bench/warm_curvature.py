"""Base-block curvature after first-order warm-up steps, x held fixed (issue 8, the hybrid pair).

Builds the advisor grid's hybrid-lora setup (``bench/advisor_vs_grid.py``: SST-2 train.tsv,
data seed 8, MiniLM, batch 16), takes ``STEPS`` plain SGD steps on the LoRA + head block only
(rate ``ETA_Y``, the base weights x never move), and probes the x block at step 0, STEPS/2 and
STEPS (fd, 10 vectors): L_x, tr H_xx, ρ_x and the one-step curvature rate the advisor would
propose there. Question it answers: does the first-order block alone sharpen the base enough
to explain why the advised η_x (~7e-4) breaks hybrid training?

    python bench/warm_curvature.py SEED ETA_Y STEPS
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import advisor_vs_grid as grid  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("seed", type=int)
    ap.add_argument("eta_y", type=float)
    ap.add_argument("steps", type=int)
    a = ap.parse_args()
    import torch

    from smoothlab.hybrid.advise import advice_from_curvature, measure_method, run_batch
    from smoothlab.hybrid.train import build, split_parameters

    args = grid.grid_settings()
    cfg = grid._cfg(args, "hybrid-lora", 0.0, a.eta_y, a.seed, Path("unused"))
    bundle, _, splits = build(cfg)
    _, y = split_parameters(bundle.model, cfg.method)
    for p in y:
        p.requires_grad_(True)
    t0 = time.perf_counter()
    for t in range(a.steps + 1):
        batch = run_batch(bundle, cfg, splits, t)
        if t in (0, a.steps // 2, a.steps):
            curv = measure_method(bundle, cfg.method, lambda b=batch: bundle.loss(b), seed=a.seed)
            adv = advice_from_curvature(curv, cfg.method, steps=args.steps)
            print(
                f"step {t}: L_x={curv.L_x.value:.4g} trH={curv.trace_x.value:.4g}"
                f"±{curv.trace_x.stderr:.2g} rho_x={curv.rho_x:.3g} "
                f"curvature rate={adv.eta_x_curvature:.3g} L_y={curv.L_y.value:.4g} "
                f"({time.perf_counter() - t0:.0f} s)",
                flush=True,
            )
        if t == a.steps:
            break
        bundle.model.train()
        grads = torch.autograd.grad(bundle.loss(batch), y, allow_unused=True)
        with torch.no_grad():
            for p, g in zip(y, grads):
                if g is not None:
                    p.sub_(g, alpha=a.eta_y)


if __name__ == "__main__":
    main()
