"""The ``smoothlab`` command: probe, train, figure1, advise, export, report.

The options of each subcommand are generated from its config dataclass
(:mod:`smoothlab.hybrid.config`: ``TrainConfig``, ``ProbeConfig``, ``AdviseConfig``, ``Figure1Config``),
so every option has one default and one help text, and its choices come from the registries
(methods, PEFT kinds, tasks, norms, HVPs). ``--config FILE.json|yaml`` starts from a config
file (figure1: ``--preset NAME`` from a named preset, :mod:`smoothlab.hybrid.presets`); the flags the
user typed override it.

``advise --method M`` advises the blocks method M trains (x: its SPSA block, y: its gradient
block) from a probe at initialisation (:func:`smoothlab.hybrid.advise.advise_config`) or, with
``--run``, from a recorded trajectory; ``--print-command`` prints the ``smoothlab train``
line that uses the proposal. ``train --lr-base auto --lr-peft auto`` (either or both) takes
the rates from the same probe at step 0 (:func:`smoothlab.hybrid.train.resolve_rates`); the advice is
saved in the run's ``config.json`` and ``advice.json``. ``--record-blocks`` (train, figure1)
also records per-module blocks ``base.<module>``/``peft.<module>``.

``torchrun --nproc-per-node N -m smoothlab train ...`` trains data-parallel (``--batch-size``
is the global batch; rank 0 writes the run folder; docs/scaling.md). ``train --checkpoint
seeds`` (the default for zo-ft) stores the ZO trajectory as ``seeds.jsonl``;
``export RUN --out DIR`` rebuilds the fine-tuned model (replaying seeds) as a
``from_pretrained`` folder.

Errors: bad input (:class:`~smoothlab.errors.UsageError`, argparse errors included) prints
one line on stderr and exits with status 2; a failed distributed rank
(``smoothlab.hybrid.distributed.RankFailure``) prints one line and exits with 1. A problem in a run's
logs (:class:`~smoothlab.runlog.RunLogWarning`) is one ``smoothlab: warning:`` line. Anything
else is a bug: its traceback is shown and the status is 1. The heavy packages (transformers, peft, the engine, analysis, figures)
are imported only by the subcommand that needs them.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import sys
import time
import typing
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NoReturn

from smoothlab.errors import UsageError

__all__ = ["UsageError", "build_parser", "main"]


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{self.prog}: {message}")


# --------------------------------------------------------------------------- config <-> flags
def _flag(f: dataclasses.Field) -> str:
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


def _argtype(parse: Any, name: str) -> Any:
    """An argparse ``type`` whose errors read 'expected ..., got ...'."""

    def convert(text: str) -> Any:
        try:
            return parse(text)
        except ValueError as e:
            msg = str(e) if isinstance(e, UsageError) else f"expected {name}, got {text!r}"
            raise argparse.ArgumentTypeError(msg) from None

    convert.__name__ = name
    return convert


_TYPES = {int: _argtype(int, "an integer"), float: _argtype(float, "a number"), str: str}


def _add_config_args(
    p: argparse.ArgumentParser, cls: type, shown: Any, *, title: str = "settings"
) -> None:
    """One flag per field of ``cls`` (``shown``: the instance whose values the help shows).

    Flags default to ``SUPPRESS``, so the namespace holds exactly the flags the user typed.
    """
    hints = typing.get_type_hints(cls)
    g = p.add_argument_group(title or f"options (smoothlab.hybrid.config.{cls.__name__})")
    for f in dataclasses.fields(cls):
        meta = f.metadata
        if not meta.get("cli", True):
            continue
        default = getattr(shown, f.name)
        shown_default = ",".join(map(str, default)) if isinstance(default, tuple) else default
        help_ = meta.get("help", "")
        if "more" in meta:  # a tail computed from a registry (e.g. each task's columns)
            help_ += f" ({meta['more']()})"
        if "(default" not in help_:
            help_ += f" (default: {shown_default})"
        help_ = help_.replace("%", "%%")
        kw: dict[str, Any] = {"dest": f.name, "default": argparse.SUPPRESS, "help": help_}
        base = next(
            (a for a in typing.get_args(hints[f.name]) if a is not type(None)), hints[f.name]
        )
        if base is bool:
            kw["action"] = argparse.BooleanOptionalAction
        elif "parse" in meta:
            kw["type"] = _argtype(meta["parse"], "values")
        else:
            kw["type"] = _TYPES[base]
        if "choices" in meta:
            kw["choices"] = meta["choices"]()
        g.add_argument(_flag(f), **kw)


class _RejectPeft(argparse.Action):
    """``train --peft``: the method fixes the PEFT module; a flag that changed nothing would
    be silently ignored, so it is refused with the methods that attach that module."""

    def __call__(
        self, parser: Any, namespace: Any, values: Any, option_string: str | None = None
    ) -> None:
        from smoothlab.methods import METHODS

        fits = [m.name for m in METHODS.values() if m.peft == values] or ["zo-ft", "fo-ft"]
        raise UsageError(
            f"train --peft {values}: the method fixes the PEFT module; use --method "
            f"{' or '.join(fits)}"
        )


def _config(args: argparse.Namespace, cls: type, base: Any) -> Any:
    """``base`` (or the ``--config`` file), with the flags the user typed applied, its
    device resolved (``auto``) and validated."""
    from smoothlab.hybrid.config import load_config_file, resolve_device

    if getattr(args, "config", None):
        base = load_config_file(args.config, cls)
    typed = {
        f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)
    }
    cfg = dataclasses.replace(base, **typed)
    try:
        cfg = dataclasses.replace(cfg, device=resolve_device(cfg.device))
        cfg.validate()
    except UsageError as e:  # name the value where the user gave it: a flag, or the file
        raise UsageError(_where_given(str(e), cls, typed, getattr(args, "config", None))) from e
    return cfg


def _where_given(text: str, cls: type, typed: Mapping[str, Any], config: str | None) -> str:
    """A config check's message, which starts with a field's name, names each setting where
    the user gave it: a typed field by its flag (``batch_size ...`` -> ``--batch-size ...``;
    later mentions too when the name is an identifier, with an underscore), and the config
    file when the message starts with a field it set."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    m = re.match(r"\w+", text)
    lead = m.group(0) if m else ""
    for name in typed:
        if name in fields and "_" in name:
            text = re.sub(rf"(?<![\w-]){name}\b", _flag(fields[name]), text)
        elif name in fields and name == lead:  # a word ("steps"): its leading use only
            text = _flag(fields[name]) + text[len(name) :]
    if lead in fields and lead not in typed and config:
        return f"{config}: {text}"
    return text


def _quiet_transformers() -> None:
    """transformers' own loading bars and reports would break the one-line error contract."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


# --------------------------------------------------------------------------- probe
def _load_bundle(cfg: Any, peft: str) -> Any:
    from smoothlab.hybrid.config import user_input
    from smoothlab.hybrid.data import load_task_data
    from smoothlab.hybrid.models import DEFAULT_MODEL, configured_bundle

    with user_input(f"--data {cfg.data or cfg.task}"):
        task, splits = load_task_data(
            cfg.task,
            cfg.data,
            train=cfg.batch_size,
            eval=0,
            dev=0,
            seed=cfg.seed,
            flags={"path": "--data", "train": "--batch-size"},
        )
    bundle = configured_bundle(
        cfg,
        task,
        peft,
        model_input=f"--model {cfg.model or 'default'}",
        peft_input=f"--peft {peft} on model {cfg.model or DEFAULT_MODEL}",
    )
    return bundle, splits


def _probe_bundle(
    cfg: Any,
    bundle: Any,
    examples: Sequence[Any],
    blocks_spec: str,
    *,
    norm: str,
    target_rel_stderr: float | None,
) -> tuple[dict, dict]:
    from tqdm.auto import tqdm

    from smoothlab import ModelLoss, make_blocks, probe
    from smoothlab.blocks import block_sizes, parse_blocks_arg
    from smoothlab.hybrid.config import user_input

    batch = bundle.encode(list(examples), cfg.max_length)
    if batch.truncated:
        print(
            bundle.truncation_note(examples, cfg.max_length, "probe examples", cut=batch.truncated),
            file=sys.stderr,
        )
    with user_input(f"--blocks {blocks_spec}"):
        blocks = make_blocks(bundle.model, parse_blocks_arg(blocks_spec))
    sizes = block_sizes(blocks)
    loss_fn = ModelLoss(bundle.model, compute=lambda: bundle.loss(batch))
    bars: dict[str, Any] = {}

    def progress(block: str, done: int, total: int) -> None:
        bar = bars.get(block)
        if bar is None:
            bar = bars[block] = tqdm(
                total=total, desc=f"probe {block}", unit="hvp", leave=False, disable=None
            )
        bar.update(done - bar.n)

    try:
        ests = probe(
            loss_fn,
            blocks,
            norm=norm,
            hvp=cfg.hvp,
            num_vectors=cfg.vectors,
            seed=cfg.seed,
            h=cfg.h,
            target_rel_stderr=target_rel_stderr,
            progress=progress,
        )
    finally:
        for bar in bars.values():
            bar.close()
    return ests, sizes


def _table(ests: dict, sizes: dict) -> str:
    head = f"{'block':<14} {'parameters':>12} {'estimate':>12} {'±se | r':>10} {'HVPs':>5} {'seconds':>8}"
    lines = [head, "-" * len(head)]
    for name, e in ests.items():
        se = (
            f"{e.stderr:.3g}"
            if math.isfinite(e.stderr)
            else (f"r={e.residual:.1e}" if math.isfinite(e.residual) else "-")
        )
        lines.append(
            f"{name:<14} {sizes[name]:>12,} {e.value:>12.5g} {se:>10} {e.num_hvp:>5} {e.seconds:>8.2f}"
        )
    return "\n".join(lines)


def cmd_probe(args: argparse.Namespace) -> int:
    from smoothlab.hybrid.config import ProbeConfig

    cfg = _config(args, ProbeConfig, ProbeConfig())
    bundle, splits = _load_bundle(cfg, cfg.peft)
    blocks_spec = cfg.blocks or ("hybrid" if cfg.peft != "none" else "all")
    t0 = time.perf_counter()
    ests, sizes = _probe_bundle(
        cfg,
        bundle,
        splits.train,
        blocks_spec,
        norm=cfg.norm,
        target_rel_stderr=cfg.target_rel_stderr,
    )
    print(
        f"{cfg.norm} norm of each block Hessian ∇²_bb f  (hvp={cfg.hvp}, model={bundle.name}, "
        f"data={cfg.data or 'built-in synthetic sentiment set'}, "
        f"peft={cfg.peft}, batch={cfg.batch_size}, device={bundle.device})"
    )
    print(_table(ests, sizes))
    if cfg.norm == "spectral":
        print(
            "spectral = largest |eigenvalue| of the block's Hessian: the local smoothness L of f along that block;"
            " r = Lanczos residual |Hu - θu|, which bounds the distance from the estimate to some"
            " eigenvalue (not necessarily the largest: the estimate is a lower bound of L)."
        )
    if "base" in ests and "peft" in ests:
        print(f"L_base / L_peft = {ests['base'].value / ests['peft'].value:.4g}")
    print(f"total {time.perf_counter() - t0:.1f} s")
    if cfg.out:
        from smoothlab.runlog import versions, write_json

        write_json(
            cfg.out,
            {
                "model": bundle.name,
                "peft": cfg.peft,
                "task": cfg.task,
                "data": cfg.data,
                "norm": cfg.norm,
                "hvp": cfg.hvp,
                "num_vectors": cfg.vectors,
                "batch_size": cfg.batch_size,
                "seed": cfg.seed,
                "blocks": {k: e.as_dict() | {"num_params": sizes[k]} for k, e in ests.items()},
                "versions": versions(),
            },
        )
        print(f"wrote {cfg.out}")
    return 0


# --------------------------------------------------------------------------- train
def _print_advice(advice: Any, method: str | None = None) -> None:
    """The advice's lines; its ratio line, or why there is none (``method`` says which
    blocks the advised method trains)."""
    from smoothlab.hybrid.advise import ratio_line

    print(advice.describe())
    if not math.isfinite(advice.ratio):  # describe() gives a finite ratio; else say why not
        print(ratio_line(advice, method))


def _print_rate_advice(cfg: Any, record: dict) -> None:
    """What ``train --lr-base/--lr-peft auto`` resolved, from the advice record."""
    from smoothlab.advisor import Advice

    auto = record.get("auto", [])
    rates = ", ".join(f"{k} = {getattr(cfg, k):.4g}" for k in auto)
    if record.get("reused"):
        print(f"auto rates: {rates} (resolved when {cfg.out} started; not probed again)")
        return
    names = {f.name for f in dataclasses.fields(Advice)}
    advice = Advice(**{k: v for k, v in record.items() if k in names})
    _print_advice(advice)
    print(f"auto rates: {rates} (written to {Path(cfg.out) / 'config.json'} under 'advice')")
    if "lr_base" in auto and cfg.lr_base_budget and cfg.lr_base > 0:
        print(
            "lr_base: the walk budget lowers it during the run as the ZO gradient grows "
            "(metrics.csv logs each step's rate; --no-lr-base-budget keeps it fixed)"
        )


def cmd_train(args: argparse.Namespace) -> int:
    from smoothlab.hybrid import distributed
    from smoothlab.hybrid.config import TrainConfig
    from smoothlab.hybrid.train import resolve_rates, train

    cfg = _config(args, TrainConfig, TrainConfig())
    world = distributed.init(timeout_s=cfg.dist_timeout)  # under torchrun: join the group
    try:
        cfg, advice = resolve_rates(cfg, resume=not args.restart)
        if advice is not None and world.rank == 0:
            _print_rate_advice(cfg, advice)
        out = train(cfg, progress=True, resume=not args.restart, advice=advice)
    except BaseException:
        distributed.shutdown(wait=False)  # a failed or stopped rank does not wait for peers
        raise
    distributed.shutdown()
    if world.rank != 0:  # rank 0 reports for every rank
        return 0
    summary = json.loads((out / "summary.json").read_text())
    num = lambda k, fmt: "n/a" if summary.get(k) is None else format(summary[k], fmt)  # noqa: E731
    print(
        f"{cfg.method}: final loss {num('final_loss', '.4f')}, best dev acc "
        f"{num('best_dev_acc', '.3f')}, {num('seconds_per_step', '.3f')} s/step, peak memory "
        f"{num('peak_memory_mb', '.0f')} MiB -> {out}"
    )
    if summary.get("walk_budget_spent") is not None:
        print(
            f"lr_base (walk budget): {cfg.lr_base:.3g} at the start, {summary['lr_base_last']:.3g} "
            f"at the last step; {100 * summary['walk_budget_spent']:.0f}% of the budget spent"
        )
    return 0


# --------------------------------------------------------------------------- figure1
def cmd_figure1(args: argparse.Namespace) -> int:
    from smoothlab.advisor import advise_from_rows
    from smoothlab.analysis import load_run, smoothness_ratio
    from smoothlab.figures.example23 import example23
    from smoothlab.figures.fig1 import fig1a, fig1b
    from smoothlab.figures.report import write_report
    from smoothlab.hybrid.advise import minibatch_inputs
    from smoothlab.hybrid.config import Figure1Config
    from smoothlab.hybrid.presets import FIGURE1_PRESETS, figure1_options, figure1_runs
    from smoothlab.hybrid.train import train
    from smoothlab.runlog import write_json

    cfg = _config(args, Figure1Config, FIGURE1_PRESETS[args.preset]())
    out = Path(cfg.out)
    runs = figure1_runs(cfg)
    t0 = time.perf_counter()
    for key, run in runs.items():
        print(
            f"[{key}] {run.method} for {run.steps} steps, probing every {run.record_every} steps -> {run.out}",
            flush=True,
        )
        try:
            train(run, progress=True, resume=not args.restart)
        except UsageError as exc:  # name figure1's options, not the run's TrainConfig fields
            text = str(exc)
            for field, option in figure1_options(key).items():
                text = re.sub(rf"\b{field}(?=: )", option, text)
            if text == str(exc):
                raise
            raise UsageError(text) from exc
    a = load_run(runs["fig1a"].out)
    b = load_run(runs["fig1b"].out)
    written = fig1a(a.smoothness, out / "fig1a", block="model") + fig1b(b.smoothness, out / "fig1b")
    written += example23(out / "example23")
    ratio = smoothness_ratio(b.smoothness, num="base", den="peft")
    sizes = b.config["block_sizes"]
    advice = advise_from_rows(
        b.smoothness.to_dict("records"),
        sizes["base"],
        q=b.config.get("q", 1),
        one_sided=bool(b.config.get("one_sided", False)),
        **minibatch_inputs(runs["fig1b"]),  # the default rules' inputs; the paper's rates beside
    )
    write_json(Path(runs["fig1b"].out) / "advice.json", advice.as_dict())
    md, html = write_report([runs["fig1a"].out, runs["fig1b"].out], out / "report")
    med = a.smoothness["estimate"].median()
    print(
        f"\nFig. 1a: L of the model (fo-ft, all {a.config['block_sizes']['model']:,} weights): median {med:.4g}, "
        f"range {a.smoothness['estimate'].min():.4g} .. {a.smoothness['estimate'].max():.4g}"
    )
    print(
        f"Fig. 1b: L_base / L_lora = {ratio['median']:.4g} (median over {ratio['n']} probes, "
        f"IQR {ratio['q25']:.4g} .. {ratio['q75']:.4g}); the paper's Figure 1b finds L_base >> L_LoRA"
    )
    print(advice.describe())
    for p in written + [md, html]:
        print(f"wrote {p}")
    print(f"total {time.perf_counter() - t0:.0f} s")
    return 0


# --------------------------------------------------------------------------- advise
def _read_run(run: str) -> tuple[dict, list[dict]]:
    """config.json and smoothness.csv of a recorded hybrid run (UsageError if it is not one);
    the rows are read as every run log is (:func:`smoothlab.runlog.read_log`): a torn last line
    (a killed writer) is dropped with a warning, a cell that does not parse reads as nan."""
    from smoothlab.runlog import SMOOTHNESS, RunLogWarning, read_log

    path = Path(run)
    cfg_path, sm_path = path / "config.json", path / "smoothness.csv"
    if not cfg_path.is_file() or not sm_path.is_file():
        raise UsageError(
            f"--run {run} is not a recorded run folder (needs config.json and smoothness.csv)"
        )
    try:
        cfg = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise UsageError(f"--run {run}: config.json is not valid JSON ({e})") from None
    sizes = cfg.get("block_sizes") if isinstance(cfg, dict) else None
    if not isinstance(sizes, dict):
        raise UsageError(
            f"--run {run}: config.json has no block_sizes (not a run written by smoothlab train)"
        )
    log = read_log(sm_path, SMOOTHNESS, warn=False)  # warned below, for a run it can use
    rows = [
        r | {"estimate": math.nan if r["estimate"] is None else r["estimate"]} for r in log.rows
    ]
    found = {r.get("block") for r in rows}
    if "base" not in sizes or not {"base", "peft"} <= found:
        raise UsageError(
            f"--run {run}: advice needs a recorded hybrid run with blocks 'base' and 'peft'; "
            f"this {cfg.get('method', 'run')!r} run has blocks {sorted(sizes)}"
        )
    for problem in log.problems:
        warnings.warn(f"{sm_path}: {problem}", RunLogWarning, stacklevel=2)
    return cfg, rows


def _calibrate(cfg: Any, advice: Any, train_cfg: Any) -> Any:
    from smoothlab.hybrid.calibrate import calibrate

    out = Path(cfg.out or "smoothlab-out/calibration")

    def show(r: dict) -> None:
        print(
            f"  pilot {r['method']:<12} x{r['scale_x']:<6g} y{r['scale_y']:<6g} lr_base {r['lr_base']:.3g}  lr_peft {r['lr_peft']:.3g}"
            f"  dev {r['dev_acc']:.3f}  eval {r['eval_acc']:.3f}  loss {r['final_loss']:.4f}",
            flush=True,
        )

    calibrated, rows = calibrate(
        train_cfg,
        advice,
        out,
        multipliers=cfg.multipliers,
        pilot_steps=cfg.pilot_steps,
        progress=True,
        on_row=show,
    )
    print(f"\ncalibration table ({out / 'calibration.csv'}):")
    print(
        f"{'method':<12} {'scale_x':>8} {'scale_y':>8} {'lr_base':>10} {'lr_peft':>10} {'dev_acc':>8} {'eval_acc':>8} {'final_loss':>10}"
    )
    for r in rows:
        print(
            f"{r['method']:<12} {r['scale_x']:>8g} {r['scale_y']:>8g} {r['lr_base']:>10.3g} {r['lr_peft']:>10.3g} "
            f"{r['dev_acc']:>8.3f} {r['eval_acc']:>8.3f} {r['final_loss']:>10.4f}"
        )
    print("\ncalibrated proposal:")
    print(calibrated.describe())
    return calibrated


def _curvature_line(curv: Any) -> str:
    """One line of what the probe measured (nan where the method has no such block)."""
    est = lambda e: "-" if e is None else f"{e.value:.4g}"  # noqa: E731
    return (
        f"probe   : d_x = {curv.d_x:,}, d_y = {curv.d_y:,}, loss {curv.loss:.4g}, "
        f"L_x = {est(curv.L_x)}, tr H_xx = {est(curv.trace_x)}, L_y = {est(curv.L_y)}, "
        f"|g_x| = {curv.grad_norm_x:.3g}, |g_y| = {curv.grad_norm_y:.3g}  "
        f"({curv.hvp}, {curv.seconds:.1f} s)"
    )


# advise --run: the flags that act on advice from a recorded run; --steps (the walk cap's
# horizon) and --device replace the run's own, the rest below describe the run being advised
_RUN_FLAGS = {"run", "rule", "hvp", "quantile", "print_command", "calibrate", "pilot_steps"}
_RUN_FLAGS |= {"multipliers", "out", "steps", "device"}


def _refuse_run_flags(cfg: Any, args: argparse.Namespace, run_cfg: dict) -> None:
    """UsageError naming the flags typed with ``--run`` that the run's own config overrides
    (they were silently ignored: the trajectory was recorded with the run's q, z, batch...)."""
    from smoothlab.hybrid.config import AdviseConfig

    typed = [f.name for f in dataclasses.fields(AdviseConfig) if hasattr(args, f.name)]
    if "method" in typed and run_cfg.get("method") in (None, cfg.method):
        typed.remove("method")  # the run's own method: nothing is ignored
    ignored = [n for n in typed if n not in _RUN_FLAGS]
    if ignored:
        flags = ", ".join("--" + n.replace("_", "-") for n in ignored)
        raise UsageError(
            f"{flags}: advice from --run {cfg.run} is for the run as recorded (the run's own "
            f"method {run_cfg.get('method')!r}, its q, z, batch size, data...); drop {flags}"
        )


def _advise_run(cfg: Any, args: argparse.Namespace) -> tuple[Any, Any]:
    """Advice from a recorded run's trajectory, and the run's TrainConfig with ``--steps`` and
    ``--device`` applied when given (the walk cap is for the run being planned)."""
    from smoothlab.advisor import advise_from_rows
    from smoothlab.hybrid.advise import minibatch_inputs
    from smoothlab.hybrid.train import load_config

    run_cfg, rows = _read_run(cfg.run)
    _refuse_run_flags(cfg, args, run_cfg)
    over = {k: getattr(cfg, k) for k in ("steps", "device") if hasattr(args, k)}
    train_cfg = dataclasses.replace(load_config(cfg.run), **over)
    # the trajectory holds L only: add the minibatch inputs
    advice = advise_from_rows(
        rows,
        int(run_cfg["block_sizes"]["base"]),
        q=int(run_cfg.get("q", 1)),
        one_sided=bool(run_cfg.get("one_sided", False)),
        quantile=cfg.quantile,
        rule=cfg.rule,
        **minibatch_inputs(train_cfg, zo=cfg.hvp == "zo"),
    )
    # a command for the advised run must not write into the recorded one (refused, and
    # --restart would delete the trajectory the advice came from)
    out = str(Path(cfg.run)).rstrip("/") + "-advised"
    return advice, dataclasses.replace(train_cfg, out=out)


def cmd_advise(args: argparse.Namespace) -> int:
    from smoothlab.hybrid.advise import advise_config, train_command
    from smoothlab.hybrid.config import AdviseConfig

    cfg = _config(args, AdviseConfig, AdviseConfig())
    if cfg.calibrate and cfg.out and cfg.out.endswith(".json"):
        raise UsageError(f"--calibrate writes pilot runs: --out must be a folder, got {cfg.out}")
    if cfg.run:
        advice, train_cfg = _advise_run(cfg, args)
    else:
        train_cfg = cfg.pilot_config()
        advice, curv = advise_config(
            train_cfg,
            hvp=cfg.hvp,
            vectors=cfg.vectors,
            z=cfg.z,
            rule=cfg.rule,
            second_moment_samples=cfg.second_moment_samples,
        )
        print(_curvature_line(curv))
    _print_advice(advice, train_cfg.method)
    if cfg.calibrate:
        advice = _calibrate(cfg, advice, train_cfg)
    elif cfg.out:
        from smoothlab.runlog import write_json

        write_json(
            Path(cfg.out) / "advice.json" if not cfg.out.endswith(".json") else cfg.out,
            advice.as_dict(),
        )
    if cfg.print_command:
        print("command : " + train_command(advice, train_cfg))
        if math.isfinite(advice.eta_x) and math.isfinite(advice.eta_x_walk):
            print(
                "          (lr_base fixed at the step-0 advice; with --lr-base auto the run "
                "probes itself and its walk budget lowers lr_base as the ZO gradient grows, "
                "which hybrid methods need: README, 'How well it does')"
            )
    return 0


# --------------------------------------------------------------------------- export
def _export_device(run: Path, device: str | None) -> str:
    """``--device`` resolved and validated as probe and train do; without it, the run's own
    device, refused (naming ``--device``) when this machine lacks it."""
    from smoothlab.hybrid.config import resolve_device
    from smoothlab.hybrid.train import load_config

    if device is not None:
        return resolve_device(device)
    own = load_config(run).device
    try:
        return resolve_device(own)
    except UsageError as e:
        raise UsageError(f"{run} was trained on {e}; pass --device to export on another") from None


def _check_apart(run: Path, out: Path) -> None:
    """UsageError when the export folder is the run folder, inside it or holds it: an
    export writes config.json, which would replace the run's own (``--overwrite``)."""
    a, b = run.resolve(), out.resolve()
    if a == b or a in b.parents or b in a.parents:
        raise UsageError(
            f"--out {out} overlaps the run folder {run}; export to a folder outside the run"
        )


def cmd_export(args: argparse.Namespace) -> int:
    from smoothlab.hybrid.config import check_out
    from smoothlab.hybrid.export import check_export_target, export
    from smoothlab.hybrid.train import load_trained

    run = Path(args.run)
    if not (run / "config.json").is_file():
        raise UsageError(f"{run} is not a run folder (no config.json)")
    check_out(args.out, "--out", kind="dir")
    _check_apart(run, Path(args.out))
    # every check before the model is built (minutes for a large one)
    check_export_target(args.out, overwrite=args.overwrite, flag="--overwrite")
    device = _export_device(run, args.device)
    t0 = time.perf_counter()
    info: dict[str, Any] = {}
    bundle = load_trained(run, device=device, info=info)
    result = export(bundle, args.out, overwrite=args.overwrite)
    how = "LoRA merged into the weights" if result.merged else "weights as trained"
    if result.adapter_dir is not None:
        how = f"base model; the adapter in {result.adapter_dir} (load it with {result.loader})"
    at = f"step {info['step']} of {info['steps']}"
    print(f"exported {run} at {at} ({how}) -> {result.path} in {time.perf_counter() - t0:.1f} s")
    _warn_unfinished(run, info["step"], info["steps"])
    return 0


def _warn_unfinished(run: Path, step: int, steps: int) -> None:
    """One ``smoothlab: warning:`` line when the exported checkpoint is not a finished run's:
    no ``summary.json`` (interrupted, crashed or diverged; diverged when metrics.csv logs a
    non-finite loss or a step past the checkpoint's), or a checkpoint before the target."""
    from smoothlab.runlog import METRICS, read_log

    rows = read_log(run / "metrics.csv", METRICS, warn=False).rows
    last = rows[-1] if rows else {}
    loss = last.get("loss")
    diverged = (isinstance(loss, float) and not math.isfinite(loss)) or (last.get("step", 0) > step)
    if diverged:
        why = f"the run diverged at step {last.get('step')} (see metrics.csv)"
    elif not (run / "summary.json").is_file():
        why = "the run did not finish (no summary.json: interrupted or crashed)"
    elif step < steps:
        why = f"the run stopped before its {steps} steps"
    else:
        return
    print(
        f"smoothlab: warning: {why}; what was exported is its checkpoint at step {step} of "
        f"{steps}, not the fine-tuned model",
        file=sys.stderr,
    )


# --------------------------------------------------------------------------- report
def cmd_report(args: argparse.Namespace) -> int:
    from smoothlab.figures.report import write_report
    from smoothlab.hybrid.config import check_out

    for r in args.runs:
        if not (Path(r) / "config.json").is_file():
            raise UsageError(f"{r} is not a run folder (no config.json)")
    check_out(args.out, "--out", kind="dir")
    md, html = write_report(args.runs, args.out)
    print(f"wrote {md}\nwrote {html}")
    return 0


# --------------------------------------------------------------------------- parser
def _config_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--config",
        default=None,
        metavar="FILE",
        help="start from this .json/.yaml config (keys: the option names with underscores); "
        "flags given here override it",
    )


def _add_train_parser(sub, train_config: type) -> None:
    """The ``train`` subcommand."""
    tr = sub.add_parser("train", help="fine-tune with a hybrid, zeroth-order or first-order method")
    _config_flag(tr)
    tr.add_argument(
        "--restart",
        action="store_true",
        help="start over: remove every log, checkpoint and summary of the run in --out first",
    )
    tr.add_argument("--peft", action=_RejectPeft, help=argparse.SUPPRESS)
    _add_config_args(tr, train_config, train_config())
    tr.set_defaults(func=cmd_train)


def _add_figure1_parser(sub, figure1_config: type, presets: Mapping) -> None:
    """The ``figure1`` subcommand (``--preset`` lists each preset's first doc line)."""
    fg = sub.add_parser("figure1", help="regenerate the paper's Figure 1 (a and b), with a report")
    fg.add_argument(
        "--preset",
        choices=tuple(presets),
        default="default",
        help="named settings the flags override: "
        + "; ".join(f"{k}: {(f.__doc__ or '').splitlines()[0]}" for k, f in presets.items()),
    )
    _config_flag(fg)
    fg.add_argument(
        "--restart", action="store_true", help="start over even if the runs hold checkpoints"
    )
    _add_config_args(
        fg, figure1_config, figure1_config(), title="options (defaults: --preset default)"
    )
    fg.set_defaults(func=cmd_figure1)


def _add_export_parser(sub) -> None:
    """The ``export`` subcommand."""
    ex = sub.add_parser(
        "export",
        help="write a run's fine-tuned model as a from_pretrained folder (seed logs replayed)",
    )
    ex.add_argument("run", help="run folder (with config.json and checkpoint.pt)")
    ex.add_argument("--out", required=True, help="output folder (must be new or empty)")
    ex.add_argument(
        "--device",
        default=None,
        help="device to rebuild the model on; the run's own device when not given",
    )
    ex.add_argument("--overwrite", action="store_true", help="write into a non-empty --out folder")
    ex.set_defaults(func=cmd_export)


def _add_report_parser(sub) -> None:
    """The ``report`` subcommand."""
    rp = sub.add_parser(
        "report", help="write report.md and a self-contained report.html for run folders"
    )
    rp.add_argument("runs", nargs="+", help="run folders")
    rp.add_argument(
        "--out", default=None, help="output folder (default: the run folder, or RUNS_PARENT/report)"
    )
    rp.set_defaults(func=cmd_report)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every subcommand (options generated from the config classes)."""
    from smoothlab import __version__
    from smoothlab.hybrid.config import AdviseConfig, Figure1Config, ProbeConfig, TrainConfig
    from smoothlab.hybrid.presets import FIGURE1_PRESETS

    p = _Parser(
        prog="smoothlab",
        description="Measure and use the block-wise local smoothness of fine-tuning losses.",
    )
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    pr = sub.add_parser("probe", help="per-block Hessian norms of a model's loss on one batch")
    _config_flag(pr)
    _add_config_args(pr, ProbeConfig, ProbeConfig())
    pr.set_defaults(func=cmd_probe)

    _add_train_parser(sub, TrainConfig)
    _add_figure1_parser(sub, Figure1Config, FIGURE1_PRESETS)

    ad = sub.add_parser(
        "advise", help="propose (eta_x, eta_y) from a probe or a recorded run; optionally calibrate"
    )
    _config_flag(ad)
    _add_config_args(ad, AdviseConfig, AdviseConfig())
    ad.set_defaults(func=cmd_advise)

    _add_export_parser(sub)
    _add_report_parser(sub)
    return p


def _one_line(e: BaseException) -> str:
    msg = " ".join(str(e).split()) or type(e).__name__
    return f"smoothlab: error: {msg}".replace("smoothlab: error: smoothlab", "smoothlab")


def _show_warning(message: Any, category: type, *rest: Any, **kw: Any) -> None:
    """A :class:`~smoothlab.runlog.RunLogWarning` (a problem in a run's logs, about the
    user's files) as one line on stderr; other warnings as Python shows them."""
    from smoothlab.runlog import RunLogWarning

    if issubclass(category, RunLogWarning):
        print(f"smoothlab: warning: {' '.join(str(message).split())}", file=sys.stderr)
    else:
        warnings._showwarning_orig(message, category, *rest, **kw)  # type: ignore[attr-defined]


def _rank_failure(e: BaseException) -> bool:
    """Whether ``e`` is :class:`smoothlab.hybrid.distributed.RankFailure` (only raised once imported)."""
    dist = sys.modules.get("smoothlab.hybrid.distributed")
    return dist is not None and isinstance(e, dist.RankFailure)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``smoothlab`` console script: 0 on success, 2 (one line on stderr,
    printed by rank 0 alone under torchrun) on a :class:`UsageError`, 1 (one line) when a distributed rank failed
    (``smoothlab.hybrid.distributed.RankFailure``); any other exception propagates with its traceback
    (status 1). Run-log problems (``RunLogWarning``) are one ``smoothlab: warning:`` line."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # our own progress bars and one-line errors only: silence transformers' loading reports
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", message=r"load_task_data\(.*synthetic")
        warnings.filterwarnings("default", category=_runlog_warning())
        warnings.showwarning = _show_warning
        try:
            args = build_parser().parse_args(argv)
            if args.command in ("probe", "train", "figure1", "advise", "export"):
                _quiet_transformers()
            return int(args.func(args) or 0)
        except UsageError as e:
            if not _other_rank():  # under torchrun every rank refuses; rank 0 says why
                print(_one_line(e), file=sys.stderr)
            return 2
        except KeyboardInterrupt as e:
            # SIGINT or SIGTERM (smoothlab.hybrid.faults.Interrupted): 128 + the signal, like a shell
            signum = getattr(e, "signum", 2)
            print(
                "smoothlab: interrupted; what was logged is kept (rerun the same command to resume)",
                file=sys.stderr,
            )
            return 128 + signum
        except Exception as e:
            if not _rank_failure(e):
                raise
            print(_one_line(e), file=sys.stderr)
            return 1


def _other_rank() -> bool:
    """True in a torchrun rank other than 0 (``RANK`` > 0 of ``WORLD_SIZE`` > 1). Its
    UsageErrors stay unprinted: every rank raises the same refusal (the run shares them
    across ranks, :func:`smoothlab.hybrid.distributed.agreed`), and rank 0 prints it once."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1")) > 1 and int(os.environ["RANK"]) > 0
    except (KeyError, ValueError):
        return False


def _runlog_warning() -> type:
    from smoothlab.runlog import RunLogWarning

    return RunLogWarning


if __name__ == "__main__":
    sys.exit(main())
