"""Train single cells off the advisor grid with ``bench/advisor_vs_grid.py``'s exact settings
(SST-2 train.tsv split with data seed 8, MiniLM, CPU, batch 16, 300 steps, one thread).

Used to separate the two halves of an advised hybrid pair: the advised η_y with the grid's
best η_x (1e-4), against the grid cells of the same seed.

    python bench/advisor_cells.py SEED LR_BASE LR_PEFT [--method hybrid-lora] [--out DIR]
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import advisor_vs_grid as grid  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("seed", type=int)
    ap.add_argument("lr_base", type=float)
    ap.add_argument("lr_peft", type=float)
    ap.add_argument("--method", default="hybrid-lora", choices=sorted(grid.GRIDS))
    ap.add_argument("--out", type=Path, default=grid.ROOT / "bench" / "out" / "advisor_cells")
    a = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TQDM_DISABLE", "1")
    import torch

    torch.set_num_threads(1)
    args = grid.grid_settings(out=a.out)
    r = grid.run_cell(args, a.method, a.lr_base, a.lr_peft, a.seed)
    losses = r["losses"]
    means = " ".join(
        f"{sum(losses[i : i + 25]) / len(losses[i : i + 25]):.3g}"
        for i in range(0, len(losses), 25)
    )
    print(
        f"{a.method} seed {a.seed} lr_base={a.lr_base:g} lr_peft={a.lr_peft:g}: final loss "
        f"{r['final_loss']:.4f}, eval {r['eval_acc']:.3f}, diverged {r['diverged']}; "
        f"loss per 25 steps: {means}"
    )


if __name__ == "__main__":
    main()
