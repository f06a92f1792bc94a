"""zo (function values, float32) against exact (double backward) traces of MiniLM's base block.

MiniLM + LoRA r16 as in the README's Quick start, 16 SST-2 sentences, Rademacher vectors
with the same seed for both oracles, so the samples are paired (the same v for each): the
paired difference measures the zo estimate's bias directly.

    OMP_NUM_THREADS=2 HF_HUB_OFFLINE=1 PYTHONPATH=. python bench/zo_vs_exact.py [num_vectors]
"""

from __future__ import annotations

import math
import sys
import time

import torch

import smoothlab


def minilm_base(n: int = 16):
    from smoothlab.hybrid.data import get_task, load_examples
    from smoothlab.hybrid.models import attach_peft, load_model

    task = get_task("sst2")
    bundle = attach_peft(load_model(None, task), "lora")
    batch = bundle.encode(load_examples("../shared/data/sst2/train.tsv", task)[:n])
    loss = smoothlab.ModelLoss(bundle.model, compute=lambda: bundle.loss(batch))
    blocks = smoothlab.make_blocks(bundle.model, "hybrid")
    return loss, {"base": blocks["base"]}


def compare(num_vectors: int = 24, seed: int = 0) -> dict[str, float]:
    loss, blocks = minilm_base()
    out: dict[str, object] = {}
    for hvp in ("zo", "exact"):
        t = time.perf_counter()
        e = smoothlab.probe(
            loss,
            blocks,
            norm="trace",
            hvp=hvp,
            num_vectors=num_vectors,
            distribution="rademacher",
            seed=seed,
        )["base"]
        out[hvp] = (e, time.perf_counter() - t)
    zo, ex = out["zo"][0], out["exact"][0]
    diff = torch.tensor(zo.samples, dtype=torch.float64) - torch.tensor(
        ex.samples, dtype=torch.float64
    )
    return {
        "zo": zo.value,
        "zo_stderr": zo.stderr,
        "exact": ex.value,
        "exact_stderr": ex.stderr,
        "paired_diff": float(diff.mean()),
        "paired_diff_stderr": float(diff.std() / math.sqrt(len(diff))),
        "rounding_dominated": zo.rounding_dominated,
        "rounding_noise": zo.rounding_noise,
        "zo_seconds": out["zo"][1],
        "exact_seconds": out["exact"][1],
        "dim": zo.dim,
    }


if __name__ == "__main__":
    r = compare(int(sys.argv[1]) if len(sys.argv) > 1 else 24)
    for k, v in r.items():
        print(f"{k:20s} {v}")
    gap = abs(r["zo"] - r["exact"])
    allowed = 2 * math.hypot(r["zo_stderr"], r["exact_stderr"]) + 0.03 * abs(r["exact"])
    print(
        f"|zo - exact| = {gap:.4g}  allowed (2 stderr + 3%) = {allowed:.4g}  ->",
        "OK" if gap <= allowed else "MISS",
    )
