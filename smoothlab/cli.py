"""The ``smoothlab`` command: probe, train, figure1, advise, report.

Every error a user can cause (bad option, missing file, unknown model) prints one line on
stderr and exits with status 2; no traceback. The heavy packages (transformers, peft, the
engine, analysis, figures) are imported only by the subcommand that needs them.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

PAPER = {
    "model": "facebook/opt-125m", "task": "sst2", "steps": 5000, "batch_size": 8, "lr_fo": 5e-5,
    "vectors": 100, "h": 1e-5, "record_every": 100, "train_size": 1000,
}


class UsageError(Exception):
    """A user error: reported on one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{self.prog}: {message}")


def _positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return v


def _nonneg_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(v) or v < 0:
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0, got {text!r}")
    return v


def _positive_float(text: str) -> float:
    v = _nonneg_float(text)
    if v == 0:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}")
    return v


def _multipliers(text: str) -> tuple[float, ...]:
    try:
        vals = tuple(float(t) for t in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive numbers, got {text!r}") from None
    if not vals or any(not (math.isfinite(v) and v > 0) for v in vals):
        raise argparse.ArgumentTypeError(f"expected comma-separated positive numbers, got {text!r}")
    return vals


def _device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device {name}: CUDA is not available on this machine (accepted: cpu, auto, cuda[:N] with a GPU)")
    if not (name == "cpu" or name.startswith("cuda") or name == "mps"):
        raise UsageError(f"--device {name!r} is not a device; accepted: cpu, cuda, cuda:N, mps, auto")
    return name


def _add_model_args(p: argparse.ArgumentParser, *, peft: bool = True) -> None:
    g = p.add_argument_group("model and data")
    g.add_argument("--model", default=None, help="HF model name or local folder (default: the bundled all-MiniLM-L6-v2 with a fresh 2-class head)")
    if peft:
        g.add_argument("--peft", choices=("none", "lora", "prompt", "prefix"), default="none", help="attach a PEFT module (default: none)")
        g.add_argument("--lora-r", type=_positive_int, default=16)
        g.add_argument("--lora-alpha", type=_positive_float, default=32.0)
        g.add_argument("--virtual-tokens", type=_positive_int, default=10, help="prompt/prefix length")
    g.add_argument("--task", default="sst2", help="sst2, copa, winogrande, wic, synthetic (default: sst2)")
    g.add_argument("--data", default=None, help="local TSV/CSV/JSONL file (default: the built-in synthetic sentiment set)")
    g.add_argument("--batch-size", type=_positive_int, default=16)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto (default: cpu)")


def _quiet_transformers() -> None:
    """transformers' own loading bars and reports would break the one-line error contract."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


# --------------------------------------------------------------------------- probe
def _load_bundle(args: argparse.Namespace, peft: str) -> Any:
    from hybrid.data import load_task_data
    from hybrid.models import attach_peft, load_model

    task, splits = load_task_data(args.task, args.data, train=args.batch_size, eval=0, dev=0, seed=args.seed)
    bundle = load_model(args.model, task, device=_device(args.device), seed=args.seed)
    if peft != "none":
        bundle = attach_peft(bundle, peft, r=args.lora_r, alpha=args.lora_alpha,
                             num_virtual_tokens=args.virtual_tokens, seed=args.seed)
    return bundle, splits


def _probe_bundle(args: argparse.Namespace, bundle: Any, examples: Sequence[Any], blocks_spec: str) -> tuple[dict, dict]:
    from tqdm.auto import tqdm

    from smoothlab import ModelLoss, make_blocks, probe
    from smoothlab.blocks import block_sizes, parse_blocks_arg

    batch = bundle.encode(list(examples))
    blocks = make_blocks(bundle.model, parse_blocks_arg(blocks_spec))
    sizes = block_sizes(blocks)
    loss_fn = ModelLoss(bundle.model, compute=lambda: bundle.loss(batch))
    bars: dict[str, Any] = {}

    def progress(block: str, done: int, total: int) -> None:
        bar = bars.get(block)
        if bar is None:
            bar = bars[block] = tqdm(total=total, desc=f"probe {block}", unit="hvp", leave=False, disable=None)
        bar.update(done - bar.n)

    try:
        ests = probe(loss_fn, blocks, norm=args.norm, hvp=args.hvp, num_vectors=args.vectors, seed=args.seed,
                     h=args.h, target_rel_stderr=args.target_rel_stderr, progress=progress)
    finally:
        for bar in bars.values():
            bar.close()
    return ests, sizes


def _table(ests: dict, sizes: dict) -> str:
    head = f"{'block':<14} {'parameters':>12} {'estimate':>12} {'±se | r':>10} {'HVPs':>5} {'seconds':>8}"
    lines = [head, "-" * len(head)]
    for name, e in ests.items():
        se = f"{e.stderr:.3g}" if math.isfinite(e.stderr) else (f"r={e.residual:.1e}" if math.isfinite(e.residual) else "-")
        lines.append(f"{name:<14} {sizes[name]:>12,} {e.value:>12.5g} {se:>10} {e.num_hvp:>5} {e.seconds:>8.2f}")
    return "\n".join(lines)


def cmd_probe(args: argparse.Namespace) -> int:
    bundle, splits = _load_bundle(args, args.peft)
    blocks_spec = args.blocks or ("hybrid" if args.peft != "none" else "all")
    t0 = time.perf_counter()
    ests, sizes = _probe_bundle(args, bundle, splits.train, blocks_spec)
    print(f"{args.norm} norm of each block Hessian ∇²_bb f  (hvp={args.hvp}, model={bundle.name}, "
          f"data={args.data or 'built-in synthetic sentiment set'}, "
          f"peft={args.peft}, batch={args.batch_size}, device={bundle.device})")
    print(_table(ests, sizes))
    if args.norm == "spectral":
        print("spectral = largest |eigenvalue| of the block's Hessian: the local smoothness L of f along that block;"
              " r = Lanczos residual |Hu - θu|, a bound on the estimate's error.")
    if "base" in ests and "peft" in ests:
        print(f"L_base / L_peft = {ests['base'].value / ests['peft'].value:.4g}")
    print(f"total {time.perf_counter() - t0:.1f} s")
    if args.out:
        from smoothlab.runlog import versions, write_json

        write_json(args.out, {
            "model": bundle.name, "peft": args.peft, "task": args.task, "data": args.data, "norm": args.norm,
            "hvp": args.hvp, "num_vectors": args.vectors, "batch_size": args.batch_size, "seed": args.seed,
            "blocks": {k: e.as_dict() | {"num_params": sizes[k]} for k, e in ests.items()}, "versions": versions(),
        })
        print(f"wrote {args.out}")
    return 0


# --------------------------------------------------------------------------- train
def _train_config(args: argparse.Namespace, **over: Any) -> Any:
    from hybrid.train import TrainConfig

    return TrainConfig(
        method=args.method, model=args.model, task=args.task, data=args.data, steps=args.steps,
        batch_size=args.batch_size, lr_base=args.lr_base, lr_peft=args.lr_peft, mu=args.mu, q=args.q,
        one_sided=args.one_sided, fo_at_perturbed=args.fo_at_perturbed, seed=args.seed,
        eval_every=args.eval_every, device=_device(args.device), lora_r=args.lora_r, lora_alpha=args.lora_alpha,
        num_virtual_tokens=args.virtual_tokens, train_size=args.train_size, eval_size=args.eval_size,
        dev_size=args.dev_size, record_every=args.record_every, record_vectors=args.record_vectors,
        record_hvp=args.record_hvp, out=args.out, **over,
    )


def cmd_train(args: argparse.Namespace) -> int:
    from hybrid.train import train

    cfg = _train_config(args)
    out = train(cfg, progress=True, resume=not args.restart)
    summary = json.loads((out / "summary.json").read_text())
    print(f"{cfg.method}: final loss {summary['final_loss']:.4f}, best dev acc {summary['best_dev_acc']:.3f}, "
          f"{summary['seconds_per_step']:.3f} s/step, peak memory {summary['peak_memory_mb']:.0f} MiB -> {out}")
    return 0


# --------------------------------------------------------------------------- figure1
def cmd_figure1(args: argparse.Namespace) -> int:
    from analysis import load_run, smoothness_ratio, write_report
    from figures.example23 import example23
    from figures.fig1 import fig1a, fig1b
    from hybrid.train import TrainConfig, train
    from smoothlab.advisor import advise_from_rows
    from smoothlab.runlog import write_json

    paper = args.preset == "paper"
    out = Path(args.out)
    steps = args.steps or (PAPER["steps"] if paper else 300)
    every = args.record_every or (PAPER["record_every"] if paper else 30)
    vectors = args.vectors or (PAPER["vectors"] if paper else 10)
    common = dict(
        model=args.model or (PAPER["model"] if paper else None), task=args.task, data=args.data, steps=steps,
        batch_size=args.batch_size or (PAPER["batch_size"] if paper else 16), seed=args.seed,
        eval_every=max(steps // 4, 1), eval_examples=args.eval_examples, train_size=args.train_size,
        eval_size=args.eval_size, dev_size=args.dev_size, device=_device(args.device), record_every=every,
        record_vectors=vectors, record_hvp=args.hvp, record_norm="spectral",
    )
    common["record_h"] = args.h if args.h is not None else (PAPER["h"] if paper else None)
    runs = {
        "fig1a": TrainConfig(method="fo-ft", lr_peft=args.lr_fo or (PAPER["lr_fo"] if paper else 5e-2),
                             out=str(out / "fig1a_fo-ft"), name="fig1a", **common),
        "fig1b": TrainConfig(method="hybrid-lora", lr_base=args.lr_base, lr_peft=args.lr_peft,
                             out=str(out / "fig1b_hybrid-lora"), name="fig1b", **common),
    }
    t0 = time.perf_counter()
    for key, cfg in runs.items():
        print(f"[{key}] {cfg.method} for {cfg.steps} steps, probing every {cfg.record_every} steps -> {cfg.out}", flush=True)
        train(cfg, progress=True, resume=not args.restart)
    a = load_run(runs["fig1a"].out)
    b = load_run(runs["fig1b"].out)
    written = fig1a(a.smoothness, out / "fig1a", block="model") + fig1b(b.smoothness, out / "fig1b")
    written += example23(out / "example23")
    ratio = smoothness_ratio(b.smoothness, num="base", den="peft")
    sizes = b.config["block_sizes"]
    advice = advise_from_rows(b.smoothness.to_dict("records"), sizes["base"], q=b.config.get("q", 1),
                              one_sided=bool(b.config.get("one_sided", False)))
    write_json(Path(runs["fig1b"].out) / "advice.json", advice.as_dict())
    md, html = write_report([runs["fig1a"].out, runs["fig1b"].out], out / "report")
    med = a.smoothness["estimate"].median()
    print(f"\nFig. 1a: L of the model (fo-ft, all {a.config['block_sizes']['model']:,} weights): median {med:.4g}, "
          f"range {a.smoothness['estimate'].min():.4g} .. {a.smoothness['estimate'].max():.4g}")
    print(f"Fig. 1b: L_base / L_lora = {ratio['median']:.4g} (median over {ratio['n']} probes, "
          f"IQR {ratio['q25']:.4g} .. {ratio['q75']:.4g}); the paper's Figure 1b finds L_base >> L_LoRA")
    print(advice.describe())
    for p in written + [md, html]:
        print(f"wrote {p}")
    print(f"total {time.perf_counter() - t0:.0f} s")
    return 0


# --------------------------------------------------------------------------- advise
def cmd_advise(args: argparse.Namespace) -> int:
    from smoothlab.advisor import advise, advise_from_rows

    if args.run:
        import csv

        run = Path(args.run)
        cfg_path, sm_path = run / "config.json", run / "smoothness.csv"
        if not cfg_path.exists() or not sm_path.exists():
            raise UsageError(f"{run} is not a recorded run folder (needs config.json and smoothness.csv)")
        cfg = json.loads(cfg_path.read_text())
        with sm_path.open() as fh:
            rows = list(csv.DictReader(fh))
        advice = advise_from_rows(rows, int(cfg["block_sizes"]["base"]), q=int(cfg.get("q", 1)),
                                  one_sided=bool(cfg.get("one_sided", False)), quantile=args.quantile)
        base_cfg = None
    else:
        bundle, splits = _load_bundle(args, "lora")
        args.norm, args.hvp, args.target_rel_stderr = "spectral", args.hvp, None
        ests, sizes = _probe_bundle(args, bundle, splits.train, "hybrid")
        print(_table(ests, sizes))
        advice = advise(ests["base"].value, ests["peft"].value, sizes["base"], q=args.q, one_sided=args.one_sided,
                        source=f"probe at initialisation ({args.hvp}, {args.vectors} vectors)")
        base_cfg = args
    print(advice.describe())
    if args.calibrate:
        from hybrid.calibrate import calibrate
        from hybrid.train import TrainConfig

        if base_cfg is None:
            cfg = json.loads((Path(args.run) / "config.json").read_text())
            names = set(TrainConfig.__dataclass_fields__)
            tc = TrainConfig(**{k: v for k, v in cfg.items() if k in names})
        else:
            tc = TrainConfig(method="hybrid-lora", model=args.model, task=args.task, data=args.data,
                             batch_size=args.batch_size, seed=args.seed, device=_device(args.device), q=args.q,
                             one_sided=args.one_sided, lora_r=args.lora_r, lora_alpha=args.lora_alpha,
                             train_size=args.train_size, eval_size=args.eval_size, dev_size=args.dev_size)
        out = Path(args.out or "smoothlab-out/calibration")

        def show(r: dict) -> None:
            print(f"  pilot x{r['scale_x']:<6g} y{r['scale_y']:<6g} lr_base {r['lr_base']:.3g}  lr_peft {r['lr_peft']:.3g}"
                  f"  dev {r['dev_acc']:.3f}  eval {r['eval_acc']:.3f}  loss {r['final_loss']:.4f}", flush=True)

        calibrated, rows = calibrate(tc, advice, out, multipliers=args.multipliers, pilot_steps=args.pilot_steps,
                                  progress=True, on_row=show)
        print(f"\ncalibration table ({out / 'calibration.csv'}):")
        print(f"{'scale_x':>8} {'scale_y':>8} {'lr_base':>10} {'lr_peft':>10} {'dev_acc':>8} {'eval_acc':>8} {'final_loss':>10}")
        for r in rows:
            print(f"{r['scale_x']:>8g} {r['scale_y']:>8g} {r['lr_base']:>10.3g} {r['lr_peft']:>10.3g} "
                  f"{r['dev_acc']:>8.3f} {r['eval_acc']:>8.3f} {r['final_loss']:>10.4f}")
        print("\ncalibrated proposal:")
        print(calibrated.describe())
    elif args.out:
        from smoothlab.runlog import write_json

        write_json(Path(args.out) / "advice.json" if not args.out.endswith(".json") else args.out, advice.as_dict())
    return 0


# --------------------------------------------------------------------------- report
def cmd_report(args: argparse.Namespace) -> int:
    from analysis import write_report

    for r in args.runs:
        if not (Path(r) / "config.json").exists():
            raise UsageError(f"{r} is not a run folder (no config.json)")
    md, html = write_report(args.runs, args.out)
    print(f"wrote {md}\nwrote {html}")
    return 0


# --------------------------------------------------------------------------- parser
def _sizes(p: argparse.ArgumentParser, train: int = 1000, eval_: int = 1000, dev: int = 100) -> None:
    p.add_argument("--train-size", type=_positive_int, default=train, help=f"train examples sampled (default {train})")
    p.add_argument("--eval-size", type=_positive_int, default=eval_, help=f"eval examples sampled (default {eval_})")
    p.add_argument("--dev-size", type=_positive_int, default=dev, help=f"dev examples sampled (default {dev})")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every subcommand."""
    from smoothlab.estimators import NORMS
    from smoothlab.hvp import HVPS

    methods = ("zo-ft", "fo-ft", "fo-lora", "fo-prompt", "fo-prefix", "hybrid-lora", "hybrid-prompt", "hybrid-prefix")
    p = _Parser(prog="smoothlab", description="Measure and use the block-wise local smoothness of fine-tuning losses.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    pr = sub.add_parser("probe", help="per-block Hessian norms of a model's loss on one batch")
    _add_model_args(pr)
    pr.add_argument("--blocks", default=None,
                    help="preset (hybrid, layers, kinds, all) or NAME=GLOB[,NAME=re:REGEX] (default: hybrid with --peft, else all)")
    pr.add_argument("--norm", choices=NORMS, default="spectral")
    pr.add_argument("--hvp", choices=HVPS, default="exact")
    pr.add_argument("--vectors", type=_positive_int, default=20, help="Lanczos iterations or random vectors per block")
    pr.add_argument("--h", type=_positive_float, default=None, help="finite-difference step (default: from dtype and |x_b|)")
    pr.add_argument("--target-rel-stderr", type=_positive_float, default=None)
    pr.add_argument("--out", default=None, help="write the estimates as JSON here")
    pr.set_defaults(func=cmd_probe)

    tr = sub.add_parser("train", help="fine-tune with a hybrid, zeroth-order or first-order method")
    _add_model_args(tr, peft=True)
    tr.add_argument("--method", choices=methods, default="hybrid-lora")
    tr.add_argument("--lr-base", type=_nonneg_float, default=1e-6, help="eta_x: zeroth-order rate of the base weights")
    tr.add_argument("--lr-peft", type=_nonneg_float, default=1e-2, help="eta_y: first-order rate of the PEFT weights")
    tr.add_argument("--steps", type=_positive_int, default=1000)
    tr.add_argument("--mu", type=_positive_float, default=1e-3, help="SPSA perturbation scale")
    tr.add_argument("--q", type=_positive_int, default=1, help="SPSA perturbations per step")
    tr.add_argument("--one-sided", action="store_true", help="one-sided SPSA: (f(x+mu z) - f(x)) / mu")
    tr.add_argument("--fo-at-perturbed", action="store_true", help="take the PEFT gradient from the first perturbed forward")
    tr.add_argument("--eval-every", type=_positive_int, default=100)
    tr.add_argument("--record-every", type=int, default=0, help="probe L of each block every N steps (0: off)")
    tr.add_argument("--record-vectors", type=_positive_int, default=10)
    tr.add_argument("--record-hvp", choices=("fd", "fd-central", "exact"), default="fd")
    tr.add_argument("--restart", action="store_true", help="start over even if --out holds a checkpoint")
    tr.add_argument("--out", default="runs/run", help="run folder (resumed if it holds a checkpoint)")
    _sizes(tr)
    tr.set_defaults(func=cmd_train)

    fg = sub.add_parser("figure1", help="regenerate the paper's Figure 1 (a and b), with a report")
    fg.add_argument("--preset", choices=("default", "paper"), default="default",
                    help="default: MiniLM on CPU in minutes; paper: OPT-125M, 5000 steps, batch 8, 100 vectors, h=1e-5")
    fg.add_argument("--model", default=None)
    fg.add_argument("--task", default="sst2")
    fg.add_argument("--data", default=None, help="local data file (default: the built-in synthetic sentiment set)")
    fg.add_argument("--steps", type=_positive_int, default=None, help="training steps per run (default 300; paper 5000)")
    fg.add_argument("--record-every", type=_positive_int, default=None, help="probe every N steps (default 30; paper 100)")
    fg.add_argument("--vectors", type=_positive_int, default=None, help="HVPs per probe (default 10; paper 100)")
    fg.add_argument("--hvp", choices=("fd", "fd-central", "exact"), default="fd")
    fg.add_argument("--h", type=_positive_float, default=None)
    fg.add_argument("--batch-size", type=_positive_int, default=None)
    fg.add_argument("--lr-fo", type=_positive_float, default=None, help="rate of the full fine-tuning run (Fig. 1a)")
    fg.add_argument("--lr-base", type=_nonneg_float, default=1e-5, help="eta_x of the hybrid run (Fig. 1b)")
    fg.add_argument("--lr-peft", type=_nonneg_float, default=0.3, help="eta_y of the hybrid run (Fig. 1b)")
    fg.add_argument("--eval-examples", type=_positive_int, default=200, help="eval examples scored at each evaluation")
    fg.add_argument("--seed", type=int, default=0)
    fg.add_argument("--device", default="cpu")
    fg.add_argument("--restart", action="store_true")
    fg.add_argument("--out", default="smoothlab-out/figure1")
    _sizes(fg)
    fg.set_defaults(func=cmd_figure1)

    ad = sub.add_parser("advise", help="propose (eta_x, eta_y) from a probe or a recorded run; optionally calibrate")
    ad.add_argument("--run", default=None, help="a run folder with smoothness.csv (else: probe the model at initialisation)")
    _add_model_args(ad, peft=False)
    ad.add_argument("--lora-r", type=_positive_int, default=16)
    ad.add_argument("--lora-alpha", type=_positive_float, default=32.0)
    ad.add_argument("--virtual-tokens", type=_positive_int, default=10)
    ad.add_argument("--hvp", choices=("fd", "fd-central", "exact"), default="exact")
    ad.add_argument("--vectors", type=_positive_int, default=20)
    ad.add_argument("--h", type=_positive_float, default=None)
    ad.add_argument("--q", type=_positive_int, default=1)
    ad.add_argument("--one-sided", action="store_true")
    ad.add_argument("--quantile", type=float, default=0.9, help="quantile of a recorded trajectory's L (default 0.9)")
    ad.add_argument("--calibrate", action="store_true", help="pilot runs at x1/8 .. x8 of the proposal pick c_x, c_y on dev")
    ad.add_argument("--pilot-steps", type=_positive_int, default=100)
    ad.add_argument("--multipliers", type=_multipliers, default=(0.125, 0.5, 1.0, 2.0, 8.0),
                    help="comma-separated multiples of the proposal tried for each rate (default 0.125,0.5,1,2,8)")
    ad.add_argument("--out", default=None, help="folder for advice.json (and calibration.csv and pilot runs)")
    _sizes(ad, 1000, 500, 100)
    ad.set_defaults(func=cmd_advise)

    rp = sub.add_parser("report", help="write report.md and a self-contained report.html for run folders")
    rp.add_argument("runs", nargs="+", help="run folders")
    rp.add_argument("--out", default=None, help="output folder (default: the run folder, or RUNS_PARENT/report)")
    rp.set_defaults(func=cmd_report)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``smoothlab`` console script."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # our own progress bars and one-line errors only: silence transformers' loading reports
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message=r"load_task_data\(.*synthetic")
    try:
        args = build_parser().parse_args(argv)
        if args.command in ("probe", "train", "figure1", "advise"):
            _quiet_transformers()
        return int(args.func(args) or 0)
    except UsageError as e:
        print(f"smoothlab: error: {e}".replace("smoothlab: error: smoothlab", "smoothlab"), file=sys.stderr)
        return 2
    except (ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError) as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"smoothlab: error: {msg}", file=sys.stderr)
        return 2
    except FloatingPointError as e:
        print(f"smoothlab: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("smoothlab: interrupted; what was logged is kept (rerun the same command to resume)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
