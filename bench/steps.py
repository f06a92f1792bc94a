"""Cost of one step of every kind, side by side in one process (issue 9).

Same model and batch for every case; the cases run round-robin (``--repeats`` rounds, each
case once per round) and each row reports the median. Cases:

* ``forward``: one forward, no grad;  ``pass``: one in-place pass over the base weights;
* ``add floor`` (CPU only): W + μ·v into scratch from a stored v (3 streams: the floor of a
  dense shift);
* ``randn draw``: ``torch.randn`` over the base weights (the old cost of one z);
* ``perturb <src>``: W + μz of every base weight into scratch, densely, for each
  ``--sources`` source; ``perturbed fwd <src>``: a forward at W + μz as a ZO step takes it
  (on-the-fly shadows; an embedding shifted only at the batch's rows where the source fetches
  rows cheaply); the report derives what the perturbation adds to a forward, in passes;
  ``update <src>``: a ZO step's update pass x ← x − η·c·z (η = 0, so x stays put); the
  report splits each zo-ft step into its two perturbed forwards, its update and the rest;
* ``fo-lora``: a FO-LoRA step; ``zo-ft <src>``: a ZO step of the base weights;
  ``hybrid-lora <src>`` (``+fap``: ``fo_at_perturbed``); ``mezo in-place``: the MeZO-style
  reference (z regenerated 4×, +μz, −2μz, +μz, update, all in place);
* ``base grad``; ``fd-hvp`` and ``exact hvp`` per vector of a 10-vector Lanczos (one
  oracle; fd reuses the reference gradient, exact builds its first-order graph once); the
  report gives both per vector in base gradients.

Ratios: × forward, × two forwards, × FO-LoRA step, × pass. Peak memory per case, in a
steady-state call of its own after the timing: on CUDA ``torch.cuda.max_memory_allocated``;
on CPU the model's parameters and buffers, plus what the case keeps between calls, plus its
peak above its start, both summed from the profiler's record of every CPU allocation and free.

Default: the bundled MiniLM + LoRA r16 on the first 16 SST-2 training examples (CPU),
padded to the longest: 16 x 22 tokens, the second-shortest of the first 62 batches (whose
median is 33 tokens, at ``--offset 672``). The header prints the shape measured. With
``--model-config`` (``opt-1.3b``, ``opt-tiny`` or a config.json) a causal LM with random
weights is built from the config (no hub), with a random batch of ``--batch × --seq`` tokens.

    OMP_NUM_THREADS=2 python bench/steps.py
    python bench/steps.py --model-config opt-tiny --batch 2 --seq 16 --repeats 2   # smoke test
    python bench/steps.py --model-config opt-1.3b --dtype bfloat16 --device cuda --batch 8 --seq 128
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from smoothlab import perturb
from smoothlab.estimators.operator import release_dot_buffers
from smoothlab.hvp import Oracle
from smoothlab.hybrid.engine import HybridEngine
from smoothlab.perturb import SOURCES, Scratch, seeded_gaussian

PRESETS = {
    "opt-1.3b": dict(
        hidden_size=2048,
        num_hidden_layers=24,
        ffn_dim=8192,
        num_attention_heads=32,
        word_embed_proj_dim=2048,
        vocab_size=50272,
        max_position_embeddings=2048,
    ),
    "opt-tiny": dict(
        hidden_size=64,
        num_hidden_layers=2,
        ffn_dim=128,
        num_attention_heads=4,
        word_embed_proj_dim=64,
        vocab_size=1000,
        max_position_embeddings=256,
    ),
}
DTYPES = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "float64": torch.float64,
}


def build_minilm(args: argparse.Namespace):
    from smoothlab.hybrid.data import load_task_data
    from smoothlab.hybrid.models import attach_peft, load_model

    first = getattr(args, "offset", 0)
    task, splits = load_task_data(
        "sst2", args.data, train=max(first + args.batch, 16), eval=1, dev=1
    )
    bundle = attach_peft(
        load_model(None, task, device=args.device, dtype=DTYPES[args.dtype]), "lora", r=16
    )
    batch = bundle.encode(splits.train[first : first + args.batch], args.seq)
    rows, tokens = batch.inputs["input_ids"].shape
    args.shape = (
        f"batch {rows} x {tokens} tokens (SST-2 train examples {first}..{first + rows - 1}, "
        f"padded to the longest, at most --seq {args.seq})"
    )
    return bundle.model, lambda: bundle.loss(batch)


def build_causal(args: argparse.Namespace):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM, OPTConfig

    if args.model_config in PRESETS:
        config = OPTConfig(**PRESETS[args.model_config])
    else:
        config = AutoConfig.for_model(**json.loads(Path(args.model_config).read_text()))
    dtype = DTYPES[args.dtype]
    with torch.device(args.device):
        default = torch.get_default_dtype()
        torch.set_default_dtype(dtype)  # random init straight in the target dtype and device
        try:
            model = AutoModelForCausalLM.from_config(config)
        finally:
            torch.set_default_dtype(default)
    model = get_peft_model(
        model.to(args.device, dtype),
        LoraConfig(r=16, lora_alpha=32, target_modules=["q_proj", "v_proj"]),
    )
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, config.vocab_size, (args.batch, args.seq), generator=gen).to(args.device)
    args.shape = f"batch {args.batch} x {args.seq} tokens (random ids)"
    return model, lambda: model(input_ids=ids, labels=ids).loss


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def cases(model, loss_fn, args) -> tuple[dict[str, Callable[[], object]], Callable[[], None]]:
    """Every measured case as a zero-argument callable (learning rates 0: weights stay put),
    and a function that drops what the cases keep between calls (noise tables, the probe's
    vectors), so that each case's peak memory can be read with only its own state live."""
    from smoothlab.hybrid.train import split_parameters

    base, peft = split_parameters(model, "hybrid-lora")
    mu = 1e-3
    scratch = Scratch()
    out: dict[str, Callable[[], object]] = {}

    def forward():
        with torch.no_grad():
            return loss_fn()

    def one_pass():
        with torch.no_grad():
            for p in base:
                p.add_(p, alpha=0.0)

    def randn_draw():
        d = seeded_gaussian(1)
        return [d(i, p) for i, p in enumerate(base)]

    out["forward"], out["pass"] = forward, one_pass
    if base[0].device.type == "cpu":  # a stored copy of x would raise every CUDA case's peak
        others: list[torch.Tensor] = []  # built on first use (never, when the case is skipped)

        def add_floor():  # w + μ·v into scratch from a stored v: a dense shift's memory floor
            if not others:
                others.extend(torch.empty_like(p).normal_() for p in base)
            with torch.no_grad():
                for p, v in zip(base, others):
                    buf = scratch.take(p.numel(), p.dtype, p.device)
                    torch.add(p, v, alpha=mu, out=buf[: p.numel()].view(p.shape))
                    scratch.give(buf)

        out["add floor"] = add_floor
    out["randn draw"] = randn_draw
    # one zo-ft engine per source serves the perturbation cases and its step (one noise table)
    zo = {
        src: HybridEngine(model, base, [], lr_zo=0.0, lr_fo=0.0, mu=mu, z=src)
        for src in args.sources
    }
    for src, eng in zo.items():

        def perturb(sampler=eng.sampler):
            with torch.no_grad():
                d = sampler(3)
                for i, p in enumerate(base):
                    buf = sampler.scratch.take(p.numel(), p.dtype, p.device)
                    d.shift(i, p, mu, out=buf)
                    sampler.scratch.give(buf)

        def perturbed_forward(eng=eng):
            with torch.no_grad(), eng._shifted(3, mu):
                return loss_fn()

        def update(eng=eng):  # x <- x - 0·z: the step's update pass (weights stay put)
            eng.optimizer.step(zo_terms=[(3, 0.5)])

        out[f"perturb {src}"], out[f"perturbed fwd {src}"] = perturb, perturbed_forward
        out[f"update {src}"] = update
    fo = HybridEngine(model, [], peft, lr_zo=0.0, lr_fo=0.0, mu=mu)
    out["fo-lora"] = lambda: fo.step(loss_fn)
    hy_engines: list[HybridEngine] = []
    for src in args.sources:
        hy = HybridEngine(model, base, peft, lr_zo=0.0, lr_fo=0.0, mu=mu, z=src)
        fap = HybridEngine(
            model, base, peft, lr_zo=0.0, lr_fo=0.0, mu=mu, z=src, fo_at_perturbed=True
        )
        hy_engines += [hy, fap]
        out[f"zo-ft {src}"] = lambda e=zo[src]: e.step(loss_fn)
        out[f"hybrid-lora {src}"] = lambda e=hy: e.step(loss_fn)
        out[f"hybrid-lora+fap {src}"] = lambda e=fap: e.step(loss_fn)
    out["mezo in-place"] = lambda: mezo_step(base, loss_fn, mu)
    hvps, release_hvps = hvp_cases(model, base, loss_fn)
    out.update(hvps)
    engines = [*zo.values(), *hy_engines]

    def release() -> None:
        for e in engines:
            e.sampler.clear()
        scratch.clear()
        release_hvps()

    return out, release


def mezo_step(base, loss_fn, mu: float, lr: float = 0.0) -> float:
    """MeZO (Malladi et al. 2023): z regenerated from one seed for each of 4 in-place sweeps."""

    def sweep(scale: float) -> None:
        d = seeded_gaussian(7)
        for i, p in enumerate(base):
            p.add_(d(i, p), alpha=scale)

    with torch.no_grad():
        sweep(mu)
        fp = float(loss_fn())
        sweep(-2 * mu)
        fm = float(loss_fn())
        sweep(mu)
        sweep(-lr * (fp - fm) / (2 * mu))
    return fp


def hvp_cases(
    model, base, loss_fn, vectors: int = 10
) -> tuple[dict[str, Callable[[], object]], Callable[[], None]]:
    """The probe's costs as a ``vectors``-step Lanczos pays them: one oracle, the reference
    gradient given (fd) or the first-order graph built once (exact), HVPs written into a
    recycled buffer; each case's time is divided by ``vectors`` (its ``per`` attribute)."""
    dev = base[0].device
    state: dict[str, object] = {}

    def vector() -> torch.Tensor:
        if "v" not in state:  # built on the device, once (until released)
            gen = torch.Generator(device=dev).manual_seed(0)
            state["v"] = torch.randn(sum(p.numel() for p in base), generator=gen, device=dev)
        return state["v"]

    def grad():
        with Oracle("fd", loss_fn, base, root=model) as o:
            g = o.gradient()
        state["g"] = (g, torch.float32)
        return g

    def hvps(kind: str) -> None:
        kwargs = {"gradient": state["g"]} if kind == "fd" else {}
        v = vector()
        with Oracle(kind, loss_fn, base, root=model, **kwargs) as o:
            out = torch.empty_like(v, dtype=o.dtype)
            for _ in range(vectors):
                o.hvp(v.to(o.dtype), out=out)

    def fd_hvp():
        if "g" not in state:
            grad()
        hvps("fd")

    def exact_hvp():
        hvps("exact")

    def release() -> None:
        state.clear()
        release_dot_buffers()  # dot64's float64 chunk buffers

    fd_hvp.per = exact_hvp.per = vectors
    return {"base grad": grad, "fd-hvp": fd_hvp, "exact hvp": exact_hvp}, release


def measure(
    fns: dict[str, Callable[[], object]],
    repeats: int,
    device: str,
    skip: set[str],
    release: Callable[[], None],
    resident: int = 0,
):
    """Median seconds per case over round-robin rounds (round 0 warms up); then each case's
    peak memory (MiB) in a steady-state call of its own: everything the cases keep between
    calls released, one call to rebuild the case's own state (its noise table: the build's
    float32 draw is a once-per-run transient), then the measured call. A peak holds the
    model, the case's own state and its transients, not another source's table or the
    probe's vectors. On CPU, ``resident``: the bytes already held before the first call (the
    model's parameters and buffers), to which the case's own are added."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    run = {k: fn for k, fn in fns.items() if k not in skip}
    for r in range(repeats + 1):
        for name, fn in run.items():
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            if r:
                times[name].append((time.perf_counter() - t0) / getattr(fn, "per", 1))
    peaks: dict[str, float] = {}
    for name, fn in run.items():
        release()
        gc.collect()
        if device.startswith("cuda"):
            fn()  # rebuilds this case's own state
            gc.collect()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            fn()
            sync(device)
            peaks[name] = torch.cuda.max_memory_allocated() / 2**20
        elif device == "cpu":
            held, _ = cpu_allocations(fn)  # the rebuilding call: what it leaves allocated
            _, peak = cpu_allocations(fn)
            peaks[name] = (resident + held + peak) / 2**20
    return {k: statistics.median(v) for k, v in times.items() if v}, peaks


def resident_bytes(model: torch.nn.Module) -> int:
    """Bytes of the model's parameters and buffers: what every CPU peak starts from."""
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])


def cpu_allocations(fn: Callable[[], object]) -> tuple[int, int]:
    """(bytes left allocated, peak bytes above the start) of one call of ``fn`` on CPU: the
    profiler records every allocation and free of the CPU allocator (``profile_memory``);
    their sizes are summed in the order they happened. A tensor allocated before the call
    and freed inside it counts negative, so the peak is the most the call ever held above
    what it started with."""
    from torch.profiler import ProfilerActivity, profile

    with quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(path))
        events = json.loads(path.read_text())["traceEvents"]
    records = [
        e for e in events if e.get("name") == "[memory]" and e["args"].get("Device Type") == 0
    ]
    total = peak = 0
    for e in sorted(records, key=lambda e: e["ts"]):  # stable: same-microsecond order kept
        total += e["args"]["Bytes"]
        peak = max(peak, total)
    return total, peak


@contextlib.contextmanager
def quiet_stderr():
    """The profiler's native start/stop lines off stderr (file descriptor 2) for a moment."""
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def paired_perturbation(
    fns: dict[str, Callable[[], object]], sources: list[str], pairs: int = 21
) -> dict[str, tuple[float, float]]:
    """Per source: (median over ``pairs`` of a perturbed forward minus the forward run right
    beside it, in alternating order; median pass), in seconds. Differences of adjacent
    calls cancel the drift that a difference of two medians over a whole round keeps."""
    out: dict[str, tuple[float, float]] = {}
    for src in sources:
        name = f"perturbed fwd {src}"
        if name not in fns or "forward" not in fns or "pass" not in fns:
            continue
        diffs, passes = [], []
        for i in range(pairs + 1):  # pair 0 warms up
            t: dict[str, float] = {}
            for case in ("forward", name, "pass") if i % 2 else (name, "forward", "pass"):
                t0 = time.perf_counter()
                fns[case]()
                t[case] = time.perf_counter() - t0
            if i:
                diffs.append(t[name] - t["forward"])
                passes.append(t["pass"])
        out[src] = (statistics.median(diffs), statistics.median(passes))
    return out


def report(
    med: dict[str, float],
    peaks: dict[str, float],
    args,
    paired: dict[str, tuple[float, float]] | None = None,
) -> str:
    fwd, fo, pas = med["forward"], med.get("fo-lora", float("nan")), med["pass"]
    lines = [
        f"{'case':<24}{'ms':>9}{'x fwd':>8}{'x 2fwd':>8}{'x fo-lora':>10}{'x pass':>9}"
        + (f"{'peak MiB':>10}" if peaks else "")
    ]
    for name, t in med.items():
        row = f"{name:<24}{1e3 * t:9.1f}{t / fwd:8.2f}{t / (2 * fwd):8.2f}{t / fo:10.2f}{t / pas:9.1f}"
        lines.append(row + (f"{peaks.get(name, float('nan')):10.0f}" if peaks else ""))
    for src in args.sources:  # what a forward pays for its perturbation, as it pays it
        if f"perturbed fwd {src}" in med:
            extra = med[f"perturbed fwd {src}"] - fwd
            lines.append(
                f"perturbation inside a forward, {src}: {1e3 * extra:.1f} ms = {extra / pas:.2f} "
                f"passes (perturbed fwd - forward; embeddings shifted only at the batch's rows "
                f"when the source fetches rows cheaply)"
            )
    for src, (extra, one) in (paired or {}).items():
        lines.append(
            f"perturbation inside a forward, {src}, paired: {1e3 * extra:.1f} ms = "
            f"{extra / one:.2f} passes (median of {args.paired} adjacent perturbed fwd - "
            f"forward differences; pass {1e3 * one:.1f} ms, median beside them)"
        )
    for src in args.sources:  # where a zo-ft step's time goes
        parts = (f"zo-ft {src}", f"perturbed fwd {src}", f"update {src}")
        if all(k in med for k in parts):
            step, pf, up = (med[k] for k in parts)
            lines.append(
                f"zo-ft {src} = 2 perturbed fwd {2e3 * pf:.1f} + update {1e3 * up:.1f} + rest "
                f"{1e3 * (step - 2 * pf - up):.1f} ms; without the forwards: "
                f"{(step - 2 * fwd) / pas:.2f} passes = {(step - 2 * fwd) / (2 * fwd):.2f} x 2fwd"
            )
    if "base grad" in med:
        lines.append(
            "probe, per vector of a 10-step Lanczos: "
            + ", ".join(
                f"{k} = {med[k] / med['base grad']:.2f} x base grad"
                for k in ("fd-hvp", "exact hvp")
                if k in med
            )
        )
    if peaks:
        inf = peaks["forward"]
        for name in (
            "fo-lora",
            *(f"zo-ft {s}" for s in args.sources),
            *(f"hybrid-lora {s}" for s in args.sources),
            *(f"hybrid-lora+fap {s}" for s in args.sources),
        ):
            ref = peaks["fo-lora"] if name.startswith("hybrid") else inf
            lines.append(
                f"memory {name:<26} {peaks[name]:8.0f} MiB = {peaks[name] / ref:.3f} x "
                f"{'FO-LoRA' if name.startswith('hybrid') else 'inference'}"
            )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--model-config", default=None, help="opt-1.3b, opt-tiny or a config.json (default: MiniLM)"
    )
    ap.add_argument("--dtype", default="float32", choices=list(DTYPES))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=128, help="max length (MiniLM) or sequence length")
    ap.add_argument(
        "--offset", type=int, default=0, help="MiniLM: the batch is train examples offset.."
    )
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument(
        "--paired",
        type=int,
        default=21,
        help="adjacent (forward, perturbed forward) pairs for the in-forward perturbation (0: off)",
    )
    ap.add_argument("--sources", nargs="+", default=list(SOURCES), choices=SOURCES)
    ap.add_argument("--skip", nargs="*", default=[], help="case names to leave out")
    ap.add_argument("--data", default="/work/shared/data/sst2/train.tsv")
    ap.add_argument(
        "--table-cap",
        type=int,
        default=perturb.TABLE_CAP,
        help="most entries of the table source's noise table (0: uncapped, as before the cap)",
    )
    args = ap.parse_args()
    perturb.TABLE_CAP = args.table_cap or 1 << 62
    model, loss_fn = (build_causal if args.model_config else build_minilm)(args)
    model.eval()
    base_numel = sum(p.numel() for n, p in model.named_parameters() if "lora_" not in n)
    print(
        f"model: {args.model_config or 'MiniLM + LoRA r16'}, {args.dtype}, {args.device}, "
        f"{args.shape}, {base_numel / 1e6:.1f}M base weights, "
        f"{torch.get_num_threads()} threads, median of {args.repeats} round-robin repeats",
        flush=True,
    )
    fns, release = cases(model, loss_fn, args)
    med, peaks = measure(
        fns, args.repeats, args.device, set(args.skip), release, resident_bytes(model)
    )
    paired = paired_perturbation(fns, args.sources, args.paired) if args.paired else None
    print(report(med, peaks, args, paired))


if __name__ == "__main__":
    main()
