"""The paper's Figure 2 on the built-in default: training loss of the hybrid method under a
single small learning rate (both blocks at the base's scale), a single large one (both at
the PEFT module's scale), and the two learning rates — run side by side, same data, seeds
and steps.

    python bench/figure2.py --data ../shared/data/sst2/train.tsv --steps 150 --out bench/out/figure2
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

from smoothlab.analysis import load_run
from smoothlab.figures.fig2 import fig2
from smoothlab.hybrid.train import TrainConfig, train
from smoothlab.runlog import final_loss


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--data", default=None)
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--small", type=float, default=1e-5, help="the single small rate (base scale)")
    ap.add_argument("--large", type=float, default=1e-2, help="the single large rate (PEFT scale)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default="bench/out/figure2")
    args = ap.parse_args()
    out = Path(args.out)
    settings = {
        f"single small rate ({args.small:g})": (args.small, args.small),
        f"single large rate ({args.large:g})": (args.large, args.large),
        f"hybrid: eta_x={args.small:g}, eta_y={args.large:g}": (args.small, args.large),
    }
    frames = {}
    for label, (lr_base, lr_peft) in settings.items():
        cfg = TrainConfig(
            method="hybrid-lora",
            data=args.data,
            steps=args.steps,
            lr_base=lr_base,
            lr_peft=lr_peft,
            eval_every=args.steps,
            eval_examples=200,
            device=args.device,
            out=str(out / f"b{lr_base:g}_p{lr_peft:g}"),
        )
        try:
            train(cfg, progress=True)
        except FloatingPointError as e:
            print(f"{label}: diverged ({e})")
        run = load_run(cfg.out)
        frames[label] = run.metrics
        with (Path(cfg.out) / "metrics.csv").open() as fh:
            rows = list(csv.DictReader(fh))
        losses = [float(r["loss"]) for r in rows if r["loss"]]
        acc = [r["eval_acc"] for r in rows if r["eval_acc"]]
        print(
            f"{label:<40} steps {len(rows):>4}  first loss {losses[0]:.4f}  "
            f"final loss {final_loss(losses):.4f}  eval acc {acc[-1] if acc else 'n/a'}",
            flush=True,
        )
    print("wrote", *fig2(frames, out / "fig2", smooth_window=10, logy=True))


if __name__ == "__main__":
    main()
