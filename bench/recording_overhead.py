"""Cost of recording smoothness while training, measured side by side in one process.

Runs the same hybrid-lora training twice — without recording, then probing every ``--every``
steps with ``--vectors`` HVPs per block (base, LoRA, head) — and prints the ratio of their
wall-clock times (training seconds plus probing seconds, gradient norms included, against the plain run's
training seconds; model loading excluded). Issue 9 bound: recording every 50 steps with 10 vectors costs <= 10%.

    python bench/recording_overhead.py --steps 200 --every 50 --vectors 10
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from hybrid.train import TrainConfig, train


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--method", default="hybrid-lora")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--every", type=int, default=50)
    ap.add_argument("--vectors", type=int, default=10)
    ap.add_argument("--hvp", default="fd")
    ap.add_argument("--data", default=None)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch-size", type=int, default=16)
    args = ap.parse_args()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for label, every in (("plain", 0), ("recorded", args.every)):
            cfg = TrainConfig(
                method=args.method,
                data=args.data,
                steps=args.steps,
                batch_size=args.batch_size,
                lr_base=1e-5,
                lr_peft=1e-3,
                eval_every=10**9,
                train_size=1000,
                eval_size=100,
                dev_size=100,
                eval_examples=1,
                device=args.device,
                record_every=every,
                record_vectors=args.vectors,
                record_hvp=args.hvp,
                out=str(Path(tmp) / label),
            )
            cfg.eval_every = args.steps  # one evaluation, at the end, in both runs
            t0 = time.perf_counter()
            out = train(cfg, progress=False)
            wall = time.perf_counter() - t0
            s = json.loads((out / "summary.json").read_text())
            results[label] = {
                "wall": wall,
                "train": s["train_seconds"],
                "probe": s["probe_seconds"],
            }
            print(
                f"{label:>9}: wall {wall:7.1f} s, training {s['train_seconds']:7.1f} s, "
                f"probing {s['probe_seconds']:6.1f} s",
                flush=True,
            )
    plain, rec = results["plain"], results["recorded"]
    probes = args.steps // args.every + 1
    print(
        f"\nrecording every {args.every} steps with {args.vectors} vectors ({probes} probes, hvp={args.hvp}):"
    )
    print(f"  probe time / training time of the recorded run   = {rec['probe'] / rec['train']:.3f}")
    print(
        f"  (training + probing) recorded / training plain   = {(rec['train'] + rec['probe']) / plain['train']:.3f}"
    )
    print(
        f"  recorded wall / plain wall (model loading incl.)  = {rec['wall'] / plain['wall']:.3f}"
    )


if __name__ == "__main__":
    main()
