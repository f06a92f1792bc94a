"""Compare fine-tuning methods side by side on real text (issue: the hybrid SGD engine).

Each (method, learning rates) pair trains in its own subprocess (`smoothlab train`), so its
peak memory (max RSS on CPU, max allocated on CUDA) is its own. Learning rates are chosen per
method by dev accuracy over a small grid (first-order PEFT: lr_peft grid; zo-ft: lr_base
grid; hybrid: lr_peft fixed at the best first-order rate of the same PEFT, lr_base grid);
the winning run of each method is reported. Prints a table and writes results.csv and Fig. 3.

    python bench/compare_methods.py --data ../shared/data/sst2/train.tsv --steps 300 --out bench/out/compare
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

from smoothlab.runlog import final_loss

GRIDS = {  # plain SGD (no momentum): PEFT rates must be large; found by a first pass at 150 steps
    "fo-lora": {"lr_peft": [0.1, 0.3, 0.6]},
    "fo-prompt": {"lr_peft": [0.1, 0.3, 1.0]},
    "zo-ft": {"lr_base": [1e-6, 1e-5, 1e-4]},
    "hybrid-lora": {"lr_base": [1e-6, 1e-5, 1e-4]},
    "hybrid-prompt": {"lr_base": [1e-6, 1e-5, 1e-4]},
}
PEFT_OF_HYBRID = {"hybrid-lora": "fo-lora", "hybrid-prompt": "fo-prompt"}


def run_one(args: argparse.Namespace, method: str, lr_base: float, lr_peft: float) -> dict:
    out = Path(args.out) / f"{method}_b{lr_base:g}_p{lr_peft:g}"
    cmd = [
        sys.executable,
        "-m",
        "smoothlab.cli",
        "train",
        "--method",
        method,
        "--lr-base",
        str(lr_base),
        "--lr-peft",
        str(lr_peft),
        "--steps",
        str(args.steps),
        "--batch-size",
        str(args.batch_size),
        "--eval-every",
        str(args.eval_every),
        "--seed",
        str(args.seed),
        "--out",
        str(out),
        "--device",
        args.device,
    ]
    if args.data:
        cmd += ["--data", args.data]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TQDM_DISABLE="1")
    if not (out / "summary.json").exists():
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            print(
                f"  {method} lr_base={lr_base:g} lr_peft={lr_peft:g}: failed: {proc.stderr.strip().splitlines()[-1:]}"
            )
            return {
                "method": method,
                "lr_base": lr_base,
                "lr_peft": lr_peft,
                "dev_acc": -1.0,
                "run": str(out),
            }
    s = json.loads((out / "summary.json").read_text())
    with (out / "metrics.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    last_eval = [r for r in rows if r["eval_acc"]][-1]
    res = {
        "method": method,
        "lr_base": lr_base,
        "lr_peft": lr_peft,
        "dev_acc": float(last_eval["dev_acc"]),
        "eval_acc": float(last_eval["eval_acc"]),
        "final_loss": final_loss(float(r["loss"]) for r in rows),
        "sec_per_step": s["seconds_per_step"],
        "peak_mem_mb": s["peak_memory_mb"],
        "run": str(out),
    }
    print(
        f"  {method:<14} lr_base={lr_base:<8g} lr_peft={lr_peft:<8g} dev={res['dev_acc']:.3f} "
        f"eval={res['eval_acc']:.3f} loss={res['final_loss']:.4f} {res['sec_per_step']:.3f} s/step "
        f"{res['peak_mem_mb']:.0f} MiB",
        flush=True,
    )
    return res


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--data", default=None)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--eval-every", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--methods", default=",".join(GRIDS))
    ap.add_argument("--out", default="bench/out/compare")
    args = ap.parse_args()
    methods = args.methods.split(",")
    best: dict[str, dict] = {}
    allrows = []
    for m in methods:
        print(f"[{m}]", flush=True)
        grid = GRIDS[m]
        if "lr_peft" in grid:
            cands = [(0.0, lr) for lr in grid["lr_peft"]]
        elif m in PEFT_OF_HYBRID:
            ref = best.get(PEFT_OF_HYBRID[m])
            lr_peft = ref["lr_peft"] if ref else GRIDS[PEFT_OF_HYBRID[m]]["lr_peft"][1]
            cands = [(lr, lr_peft) for lr in grid["lr_base"]]
        else:
            cands = [(lr, 0.0) for lr in grid["lr_base"]]
        rows = [run_one(args, m, b, p) for b, p in cands]
        allrows += rows
        best[m] = max(rows, key=lambda r: (r["dev_acc"], -r.get("final_loss", math.inf)))
    out = Path(args.out)
    with (out / "results.csv").open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(allrows[0].keys()))
        w.writeheader()
        w.writerows([r for r in allrows if "eval_acc" in r])
    base = best.get("fo-lora") or next(iter(best.values()))
    print(
        f"\nbest learning rates per method (chosen on dev), {args.steps} steps, batch {args.batch_size}:"
    )
    print(
        f"{'method':<14} {'lr_base':>8} {'lr_peft':>8} {'eval_acc':>8} {'final_loss':>10} {'s/step':>8} "
        f"{'x fo-lora':>9} {'peak MiB':>9} {'x fo-lora':>9}"
    )
    for m, r in best.items():
        print(
            f"{m:<14} {r['lr_base']:>8g} {r['lr_peft']:>8g} {r['eval_acc']:>8.3f} {r['final_loss']:>10.4f} "
            f"{r['sec_per_step']:>8.3f} {r['sec_per_step'] / base['sec_per_step']:>9.2f} {r['peak_mem_mb']:>9.0f} "
            f"{r['peak_mem_mb'] / base['peak_mem_mb']:>9.2f}"
        )
    try:
        from smoothlab.analysis import load_run
        from smoothlab.figures.fig3 import fig3

        paths = fig3([load_run(r["run"]) for r in best.values()], out / "fig3")
        print("wrote", *paths)
    except Exception as e:  # noqa: BLE001 - the table above is the result; the figure is a bonus
        print(f"fig3 not written: {e}")


if __name__ == "__main__":
    main()
