"""Does a cheaper perturbation source learn as well as the exact Gaussian? (issue 9)

Trains the same runs (same seed, batch order and learning rates) with ``--z`` sources
side by side on SST-2 and prints the training loss averaged over every 25-step window and
the final eval accuracy. The source is ``TrainConfig.z`` (this bench used to patch the
engine class instead; once the trainer passed ``z`` itself, the patch was overridden and
every run used ``table``).

    OMP_NUM_THREADS=1 python bench/z_sources_learning.py --steps 250 --sources gaussian table
"""

from __future__ import annotations

import argparse
import csv
import tempfile
from pathlib import Path

import smoothlab.hybrid.train as ht
from smoothlab.perturb import SOURCES

RUNS = {  # method: (lr_base, lr_peft), the best rates of bench/out/compare_methods.txt
    "zo-ft": (1e-4, 0.0),
    "hybrid-lora": (1e-5, 0.3),
}


def run(
    method: str, source: str, args: argparse.Namespace, tmp: Path
) -> tuple[list[float], float, float]:
    lr_base, lr_peft = RUNS[method]
    cfg = ht.TrainConfig(
        method=method,
        data=args.data,
        steps=args.steps,
        batch_size=16,
        lr_base=lr_base,
        lr_peft=lr_peft,
        train_size=1000,
        eval_size=args.eval_size,
        dev_size=50,
        eval_every=args.steps,
        seed=0,
        z=source,
        out=str(tmp / f"{method}-{source}"),
    )
    out = ht.train(cfg, progress=False)
    rows = list(csv.DictReader(open(out / "metrics.csv")))
    losses = [float(r["loss"]) for r in rows]
    w = args.window
    means = [sum(losses[i : i + w]) / len(losses[i : i + w]) for i in range(0, len(losses), w)]
    return means, float(rows[-1]["eval_acc"]), float(rows[-1]["seconds"]) / len(rows)


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--methods", nargs="+", default=list(RUNS), choices=list(RUNS))
    ap.add_argument("--sources", nargs="+", default=["gaussian", "table"], choices=SOURCES)
    ap.add_argument("--steps", type=int, default=250)
    ap.add_argument("--window", type=int, default=25)
    ap.add_argument("--eval-size", type=int, default=300)
    ap.add_argument("--data", default="/work/shared/data/sst2/train.tsv")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        for method in args.methods:
            print(
                f"[{method}] lr_base={RUNS[method][0]:g} lr_peft={RUNS[method][1]:g}, "
                f"mean training loss per {args.window}-step window",
                flush=True,
            )
            for source in args.sources:
                means, acc, sps = run(method, source, args, Path(tmp))
                curve = " ".join(f"{m:.4f}" for m in means)
                print(f"  {source:<10} {curve}   eval_acc={acc:.3f}  {sps:.3f} s/step", flush=True)


if __name__ == "__main__":
    main()
