"""Cost of recording smoothness while training, measured side by side in one process.

Runs the same hybrid-lora training twice — without recording, then probing every ``--every``
steps with ``--vectors`` HVPs per block (base, LoRA, head) — and prints the ratio of their
wall-clock times (training seconds plus probing seconds, gradient norms included, against the plain run's
training seconds; model loading excluded). Issue 9 bound: recording every 50 steps with 10 vectors costs <= 10%.

    python bench/recording_overhead.py --steps 200 --every 50 --vectors 10

It then measures the bound's floor side by side on one batch (round-robin, median): a
vectors-step Lanczos pays at least one gradient of the block per FD-HVP, so a probe costs at
least ``vectors x (gradient of base + of LoRA)`` (the small head block's Lanczos may stop
early, so it is left out); against ``every`` training steps on the same batch, that is the
least overhead any fd recorder can have at these settings.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from smoothlab.blocks import make_blocks
from smoothlab.hvp import Oracle
from smoothlab.hybrid.engine import HybridEngine
from smoothlab.hybrid.train import TrainConfig, build, split_parameters, train


def floor(cfg: TrainConfig, every: int, vectors: int, repeats: int = 5) -> None:
    """Print the fd recorder's least overhead at these settings, measured on one batch: a
    training step of ``cfg.method`` (rates 0) against one gradient of each probed block, in
    round-robin repeats; floor = vectors x sum of the block gradients / (every x step)."""
    bundle, _, splits = build(cfg)
    model = bundle.model
    model.eval()
    batch = bundle.encode(splits.train[: cfg.batch_size], cfg.max_length)

    def loss_fn():
        return bundle.loss(batch)

    zo, fo = split_parameters(model, cfg.method)
    engine = HybridEngine(model, zo, fo, lr_zo=0.0, lr_fo=0.0, mu=1e-3, z=cfg.z)
    blocks = make_blocks(model, "hybrid-split")

    def gradient(params):
        def run():
            with Oracle("fd", loss_fn, params, root=model) as o:
                o.gradient()

        return run

    cases = {"step": lambda: engine.step(loss_fn)}
    cases |= {f"grad {name}": gradient(ps) for name, ps in blocks.items()}
    times: dict[str, list[float]] = {k: [] for k in cases}
    for r in range(repeats + 1):  # round 0 warms up
        for name, fn in cases.items():
            t0 = time.perf_counter()
            fn()
            if r:
                times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    # the head's Lanczos may stop early (770 weights converge in 3-4 HVPs): not in the floor
    floored = [k for k in med if k not in ("step", "grad head")]
    grads = sum(med[k] for k in floored)
    rows, tokens = batch.inputs["input_ids"].shape
    print(
        f"\nfloor, on one batch ({rows} x {tokens} tokens, median of {repeats} round-robin "
        "repeats):"
    )
    for name, v in med.items():
        print(f"  {name:<14} {1000 * v:7.1f} ms")
    print(
        f"  {vectors} x ({' + '.join(k[5:] for k in floored)} gradients) / "
        f"({every} x step) = {vectors * grads / (every * med['step']):.3f}: no fd probe of "
        "these blocks costs less"
    )


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
    per_probe = rec["probe"] / probes
    per_step = rec["train"] / args.steps
    print(
        f"  one probe / {args.every} training steps (the steady share of a long run) "
        f"= {per_probe / (args.every * per_step):.3f}"
    )
    floor(cfg, args.every, args.vectors)


if __name__ == "__main__":
    main()
