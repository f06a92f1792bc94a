"""Step time and communication of data-parallel training: 1 rank versus 2 ranks on CPU (gloo).

Each rank loads the same model, takes its shard of every global minibatch
(:func:`smoothlab.hybrid.distributed.shard`), and runs :class:`smoothlab.hybrid.engine.HybridEngine` exactly as
the Trainer does: ``engine.step(shard_loss, reduce=weighted_sum)`` (the step's 2q(+1) losses
in ONE all-reduce) with the PEFT gradients summed by
:func:`smoothlab.hybrid.distributed.install_grad_allreduce` (weight n_r/N). Printed per configuration:
the median step time (after one warm-up step) and what rank 0 handed to all-reduce per step
— 8 bytes per forward (one float64 loss) plus the PEFT gradients — in how many collectives,
and the ring all-reduce wire bytes 2(W−1)/W times that.

    python bench/ranks.py --steps 5 --ranks 1,2              # bundled MiniLM, hybrid-lora
    python bench/ranks.py --model tiny --method zo-ft --steps 20

On a shared 2-core machine the 2-rank time measures contention as much as scaling; run it
with the cores free (OMP_NUM_THREADS=1 per rank is set here).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import torch
import torch.multiprocessing as mp

from smoothlab.hybrid.distributed import free_port, set_rank_env


def _build(args: argparse.Namespace):
    from smoothlab.blocks import make_blocks
    from smoothlab.hybrid.data import EpochSampler, load_task_data
    from smoothlab.hybrid.models import ModelBundle, attach_peft, load_model
    from tests.tiny_models import tiny_encoder

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        task, splits = load_task_data("sst2", args.data, train=256, eval=8, dev=8, seed=0)
        if args.model == "tiny":
            model, tok = tiny_encoder(seed=0)
            bundle = ModelBundle(
                model=model,
                tokenizer=tok,
                task=task,
                kind="encoder",
                device=torch.device("cpu"),
                name="tiny",
            )
        else:
            bundle = load_model(args.model, task, seed=0)
    if args.method == "zo-ft":
        zo, fo = list(bundle.model.parameters()), []
    else:
        bundle = attach_peft(bundle, args.method.split("-", 1)[1], r=8, seed=0)
        peft = make_blocks(bundle.model, "hybrid")["peft"]
        ids = {id(p) for p in peft}
        zo = [
            p
            for n, p in bundle.model.named_parameters()
            if id(p) not in ids and ".original_module." not in n
        ]
        fo = peft
        if args.method.startswith("fo-"):
            zo = []
    bundle.model.eval()
    return bundle, splits, EpochSampler(len(splits.train), args.batch_size, seed=0), zo, fo


def _worker(rank: int, world: int, port: int, args: argparse.Namespace, out: str) -> None:
    set_rank_env(rank, world, port)
    torch.set_num_threads(1)
    from smoothlab.hybrid import distributed as D
    from smoothlab.hybrid.engine import HybridEngine

    w = D.init("gloo", timeout_s=300)
    bundle, splits, sampler, zo, fo = _build(args)
    engine = HybridEngine(bundle.model, zo, fo, lr_zo=1e-6, lr_fo=1e-3, q=args.q, seed=0)
    counter = D.CommStats()
    share = {"w": 1.0}
    D.install_grad_allreduce(
        engine.optimizer, engine.fo_params, weight=lambda: share["w"], counter=counter
    )
    times, sent, calls = [], [], []
    for t in range(args.steps + 1):
        batch = sampler.batch(t)
        idx = D.shard(batch, w.rank, w.world_size)
        enc = bundle.encode([splits.train[i] for i in idx], args.max_length)
        n, total = len(idx), len(batch)
        share["w"] = n / total
        reduce = None
        if w.distributed:
            reduce = lambda v, n=n, total=total: D.weighted_sum(v, n, total, counter=counter)  # noqa: E731
        D.barrier()
        t0 = time.perf_counter()
        engine.step(lambda e=enc: bundle.loss(e), reduce=reduce)
        if t:  # the first step warms up
            times.append(time.perf_counter() - t0)
        b, c = counter.reset()
        sent.append(b)
        calls.append(c)
    if D.is_writer():
        torch.save(
            {
                "times": times,
                "bytes": sent[1:],
                "calls": calls[1:],
                "n_fo": sum(p.numel() for p in fo),
                "n_zo": sum(p.numel() for p in zo),
            },
            Path(out) / f"world{world}.pt",
        )
    D.shutdown()


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--model", default=None, help="None: the bundled MiniLM; 'tiny': a tiny random BERT"
    )
    ap.add_argument("--method", default="hybrid-lora", choices=("zo-ft", "hybrid-lora", "fo-lora"))
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--batch-size", type=int, default=16, help="the global batch")
    ap.add_argument("--q", type=int, default=1)
    ap.add_argument("--max-length", type=int, default=64)
    ap.add_argument("--ranks", default="1,2")
    ap.add_argument(
        "--data", default=None, help="SST-2 train.tsv (default: the built-in synthetic set)"
    )
    args = ap.parse_args()
    ctx = mp.get_context("spawn")
    print(
        f"{args.method} on {args.model or 'minilm'}, global batch {args.batch_size}, q={args.q}, "
        f"{args.steps} timed steps"
    )
    with tempfile.TemporaryDirectory() as out:
        for world in (int(x) for x in args.ranks.split(",")):
            port = free_port()
            procs = [
                ctx.Process(target=_worker, args=(r, world, port, args, out)) for r in range(world)
            ]
            for p in procs:
                p.start()
            for p in procs:
                p.join()
            if any(p.exitcode for p in procs):
                raise SystemExit(
                    f"world {world}: a rank failed (exit codes {[p.exitcode for p in procs]})"
                )
            r = torch.load(Path(out) / f"world{world}.pt")
            per_step = statistics.median(r["bytes"])
            wire = 2 * (world - 1) / world * per_step
            formula = f" = 8 B x forwards + 4 B x {r['n_fo']} PEFT params" if world > 1 else ""
            print(
                f"ranks={world}: median step {statistics.median(r['times']):.3f} s (min {min(r['times']):.3f}), "
                f"all-reduce payload {per_step:.0f} B/step in {statistics.median(r['calls']):.0f} calls{formula}; "
                f"ring wire bytes {wire:.0f} B/step; ZO params {r['n_zo']}",
                flush=True,
            )


if __name__ == "__main__":
    main()
