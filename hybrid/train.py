"""Training runs: methods, the loop, the run folder, evaluation, checkpoints and resume.

``train(TrainConfig(...))`` writes the run folder of DESIGN.md: ``config.json``,
``metrics.csv`` (flushed row by row), ``checkpoint.pt`` (every ``save_every`` steps and at the
end), ``best.pt`` (best dev accuracy), ``summary.json``, and with a recorder
``smoothness.csv``. Re-running with the same ``out`` resumes from ``checkpoint.pt`` and
continues the same trajectory: step t always sees minibatch ``EpochSampler.batch(t)`` and
perturbation seeds ``param_seed(seed, t·q + i)``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from smoothlab.blocks import block_sizes, make_blocks
from smoothlab.errors import UsageError
from smoothlab.methods import get_method
from smoothlab.recorder import TrajectoryRecorder
from smoothlab.runlog import (
    METRICS,
    METRICS_FIELDS,
    CsvLog,
    final_loss,
    read_log,
    versions,
    write_json,
)

from .config import TrainConfig, user_input
from .data import EpochSampler, Splits, Task, load_task_data
from .engine import HybridEngine
from .models import ModelBundle, attach_peft, load_model

__all__ = [
    "TrainConfig",
    "Trainer",
    "build",
    "load_config",
    "record_blocks",
    "resolve_rates",
    "split_parameters",
    "train",
]


class Diverged(UsageError, FloatingPointError):
    """The loss became inf/nan: the learning rates are too high for this run (bad input)."""


def split_parameters(
    model: nn.Module, method: str
) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(zeroth-order x, first-order y) parameters of ``method``, from its registry entry.

    ``zo="all"``: every weight is x; ``fo="all"``: every weight is y; ``fo="peft"``: the
    adapter (and a SEQ_CLS head) is y; ``zo="base"``: the rest of the model is x (except
    peft's inactive ``original_module`` copies, which no forward reads).
    """
    m = get_method(method)
    named = list(model.named_parameters())
    if m.zo == "all":
        return [p for _, p in named], []
    if m.fo == "all":
        return [], [p for _, p in named]
    peft = make_blocks(model, "hybrid")["peft"]
    if m.zo == "none":
        return [], peft
    peft_ids = {id(p) for p in peft}
    base = [p for n, p in named if id(p) not in peft_ids and ".original_module." not in n]
    return base, peft


def build(cfg: TrainConfig) -> tuple[ModelBundle, Task, Splits]:
    """Load data and model and attach the method's PEFT module."""
    files = {k: getattr(cfg, k) for k in ("eval_data", "dev_data") if getattr(cfg, k) is not None}
    with user_input(f"data {cfg.data or cfg.task!r}"):
        task, splits = load_task_data(
            cfg.task,
            cfg.data,
            train=cfg.train_size,
            eval=cfg.eval_size,
            dev=cfg.dev_size,
            seed=cfg.data_seed,
            **files,
        )
    with user_input(f"model {cfg.model or 'default'!r}"):
        bundle = load_model(cfg.model, task, device=cfg.device, seed=cfg.seed)
    kind = get_method(cfg.method).peft
    if kind:
        with user_input(f"method {cfg.method!r} on model {bundle.name!r}"):
            bundle = attach_peft(
                bundle,
                kind,
                r=cfg.lora_r,
                alpha=cfg.lora_alpha,
                num_virtual_tokens=cfg.num_virtual_tokens,
                seed=cfg.seed,
            )
    return bundle, task, splits


def _saved_rates(cfg: TrainConfig) -> dict[str, Any] | None:
    """The rates (and advice) a resumable run folder of ``cfg`` already resolved, else None."""
    out = Path(cfg.out)
    if not (out / "checkpoint.pt").is_file() or not (out / "config.json").is_file():
        return None
    try:
        saved = json.loads((out / "config.json").read_text())
    except json.JSONDecodeError:
        return None
    if not isinstance(saved, dict) or saved.get("method") != cfg.method:
        return None  # Trainer.resume refuses another method with its own message
    rates = {k: saved.get(k) for k in cfg.auto_rates}
    if not all(isinstance(v, int | float) and not isinstance(v, bool) for v in rates.values()):
        return None
    return {"rates": rates, "advice": saved.get("advice")}


def resolve_rates(
    cfg: TrainConfig, *, resume: bool = True
) -> tuple[TrainConfig, dict[str, Any] | None]:
    """``cfg`` with the rates given as ``"auto"`` replaced by numbers, and the advice record.

    A resumable run folder (``resume``, a checkpoint and a config.json of the same method)
    keeps the rates it resolved when it started: no new probe. Otherwise
    :func:`hybrid.advise.advise_config` probes ``cfg``'s model at step 0 on the batch step 0
    sees (``advise_hvp``, ``advise_vectors``, ``advise_rule``) and lr_base = η_x,
    lr_peft = η_y; a rate of a block the method does not train resolves to 0. The record is
    ``Advice.as_dict()`` plus ``auto`` (the fields resolved), ``curvature`` and ``reused``.
    """
    auto = cfg.auto_rates
    if not auto:
        return cfg, None
    saved = _saved_rates(cfg) if resume else None
    if saved is not None:
        record = dict(saved["advice"] or {"auto": list(auto)}) | {"reused": True}
        return dataclasses.replace(cfg, **saved["rates"]), record
    from .advise import advise_config

    advice, curv = advise_config(
        cfg, hvp=cfg.advise_hvp, vectors=cfg.advise_vectors, z=cfg.z, rule=cfg.advise_rule
    )
    m = get_method(cfg.method)
    proposal = {
        "lr_base": advice.eta_x if m.has_zo else 0.0,
        "lr_peft": advice.eta_y if m.has_fo else 0.0,
    }
    for k in auto:
        v = proposal[k]
        if not (math.isfinite(v) and v >= 0):
            raise UsageError(
                f"{k} auto: the advisor proposes no usable rate for {cfg.method!r} "
                f"({v!r}, rule {advice.rule!r}); give --{k.replace('_', '-')} a number"
            )
    record = advice.as_dict() | {"auto": list(auto), "curvature": curv.as_dict(), "reused": False}
    return dataclasses.replace(cfg, **{k: float(proposal[k]) for k in auto}), record


def record_blocks(
    model: nn.Module,
    spec: str,
    zo: list[nn.Parameter],
    fo: list[nn.Parameter],
) -> dict[str, list[nn.Parameter]]:
    """Per-module blocks for the recorder: ``make_blocks(model, spec)`` split by side.

    Block B of the spec (a preset such as ``layers``/``kinds`` or ``NAME=GLOB,...``) gives
    ``base.B`` = B ∩ x (the ZO parameters ``zo``) and ``peft.B`` = B ∩ y (``fo``); empty
    parts are left out, as are parameters in neither side (peft's inactive copies). These
    are the names :mod:`analysis.modules` groups by.
    """
    from smoothlab.blocks import parse_blocks_arg

    with user_input(f"record_blocks {spec!r}"):
        blocks = make_blocks(model, parse_blocks_arg(spec))
    out: dict[str, list[nn.Parameter]] = {}
    for prefix, side in (("base", zo), ("peft", fo)):
        ids = {id(p) for p in side}
        for name, params in blocks.items():
            part = [p for p in params if id(p) in ids]
            if part:
                out[f"{prefix}.{name}"] = part
    if not out:
        raise UsageError(f"record_blocks {spec!r}: no block holds a trained parameter")
    return out


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


class Trainer:
    """One run of ``cfg``: ``Trainer(cfg).run()`` (what :func:`train` does).

    The constructor validates ``cfg`` and loads data and model (nothing is written yet);
    :meth:`run` resumes, opens the run folder, then repeats :meth:`step`, :meth:`evaluate`,
    :meth:`log` and :meth:`checkpoint` until ``cfg.steps``.

    Rates given as ``"auto"`` are resolved first (:func:`resolve_rates`; ``advice``: the
    record of an earlier resolution), and the advice is written to ``config.json``
    (``advice``) and ``advice.json``.
    """

    def __init__(
        self,
        cfg: TrainConfig,
        *,
        progress: bool = True,
        on_step: Callable[[int, dict], None] | None = None,
        advice: dict[str, Any] | None = None,
    ) -> None:
        cfg.validate()
        if cfg.auto_rates:  # rates given as "auto": probe now (or reuse a resumable run's)
            cfg, advice = resolve_rates(cfg, resume=True)
        self.advice = advice
        self.cfg, self.out, self.progress, self.on_step = cfg, Path(cfg.out), progress, on_step
        self.bundle, self.task, self.splits = build(cfg)
        self.model = self.bundle.model
        self.zo, self.fo = split_parameters(self.model, cfg.method)
        self.module_blocks = (
            record_blocks(self.model, cfg.record_blocks, self.zo, self.fo)
            if cfg.record_blocks and cfg.record_every
            else None
        )
        z = {} if cfg.z == "gaussian" else {"z": cfg.z}  # TODO(merge, issue 7): pass z=cfg.z always
        self.engine = HybridEngine(
            self.model,
            self.zo,
            self.fo,
            lr_zo=cfg.lr_base,
            lr_fo=cfg.lr_peft,
            mu=cfg.mu,
            q=cfg.q,
            one_sided=cfg.one_sided,
            fo_at_perturbed=cfg.fo_at_perturbed,
            weight_decay=cfg.weight_decay,
            seed=cfg.seed,
            **z,
        )
        self.sampler = EpochSampler(len(self.splits.train), cfg.batch_size, seed=cfg.seed)
        self.start = self.t = 0
        self.best_dev, self.elapsed, self.last_loss = -1.0, 0.0, math.nan
        self.save_every = cfg.save_every or cfg.eval_every
        self.eval_set = (
            self.splits.eval[: cfg.eval_examples] if cfg.eval_examples else self.splits.eval
        )
        self.metrics: CsvLog | None = None
        self.recorder: TrajectoryRecorder | None = None
        self.recorders: list[TrajectoryRecorder] = []
        self.bar: Any = None

    def resume(self) -> None:
        """Continue from ``checkpoint.pt`` if the run folder holds one (same method only)."""
        path = self.out / "checkpoint.pt"
        if not path.exists():
            return
        state = torch.load(path, map_location=self.bundle.device, weights_only=False)
        if state["config"]["method"] != self.cfg.method:
            raise UsageError(
                f"{self.out} holds a {state['config']['method']!r} run; cannot resume it as {self.cfg.method!r}"
            )
        self.model.load_state_dict(state["model"])
        self.engine.load_state_dict(state["engine"])
        self.start, self.best_dev, self.elapsed = state["step"], state["best_dev"], state["seconds"]
        self.t = self.start

    def open(self) -> None:
        """Create the run folder; write ``config.json``; open the logs, recorder and bar."""
        cfg, bundle = self.cfg, self.bundle
        self.out.mkdir(parents=True, exist_ok=True)
        # probed blocks: base / peft (the adapter) / head (a trained classifier, if any)
        if get_method(cfg.method).peft:
            blocks = make_blocks(self.model, "hybrid-split")
        else:
            blocks = {"model": list(self.model.parameters())}
        sizes = block_sizes(blocks) | block_sizes(self.module_blocks or {})
        config = dataclasses.asdict(cfg) | {
            "model": cfg.model or bundle.name,
            "model_name": bundle.name,
            "kind": bundle.kind,
            "block_sizes": sizes,
            "num_zo_params": sum(p.numel() for p in self.zo),
            "num_fo_params": sum(p.numel() for p in self.fo),
            "versions": versions(),
            "resumed_from": self.start or None,
        }
        if self.advice is not None:
            config["advice"] = self.advice
            # the report's proposal section (the raw curvature stays in config.json only)
            shown = {k: v for k, v in self.advice.items() if k != "curvature"}
            write_json(self.out / "advice.json", shown)
        # rewritten on resume too: it must hold the configuration in effect (e.g. a raised
        # ``steps``) and ``resumed_from``, or ``load_config`` would resume the old target
        write_json(self.out / "config.json", config)
        self.metrics = CsvLog(self.out / "metrics.csv", METRICS_FIELDS, truncate_after=self.start)
        if cfg.record_every:
            self._open_recorders(blocks)
        self.model.eval()  # dropout off: both forwards of a ZO pair must see the same function
        if self.progress:
            from tqdm.auto import tqdm

            self.bar = tqdm(
                total=cfg.steps,
                initial=self.start,
                desc=cfg.method,
                unit="step",
                dynamic_ncols=True,
            )

    def _open_recorders(self, blocks: dict[str, list[nn.Parameter]]) -> None:
        """The recorder of the whole blocks (it owns ``smoothness.csv``) and, with
        ``record_blocks``, one of the per-module blocks writing to the same log (blocks of
        one probe must not overlap; the two probe the same batch at the same steps)."""
        cfg, bundle = self.cfg, self.bundle
        probe_fn = None
        if cfg.record_batch == "fixed":
            held = bundle.encode(self.splits.dev[: cfg.batch_size], cfg.max_length)
            probe_fn = lambda: bundle.loss(held)  # noqa: E731
        kw = dict(
            every=cfg.record_every,
            norm=cfg.record_norm,
            hvp=cfg.record_hvp,
            num_vectors=cfg.record_vectors,
            h=cfg.record_h,
            seed=cfg.seed,
            model=self.model,
            probe_loss_fn=probe_fn,
        )
        self.recorder = TrajectoryRecorder(blocks, out_dir=self.out, resume_step=self.start, **kw)
        self.recorders = [self.recorder]
        if self.module_blocks:
            modules = TrajectoryRecorder(self.module_blocks, out_dir=None, **kw)
            modules.log = self.recorder.log  # one smoothness.csv, closed by its owner
            self.recorders.append(modules)

    def _batch(self, step: int) -> Any:
        return self.bundle.encode(
            [self.splits.train[i] for i in self.sampler.batch(step)], self.cfg.max_length
        )

    def record_start(self) -> None:
        """The recorder's probe at step 0 (on the first minibatch)."""
        first = self._batch(0)
        for rec in self.recorders:
            rec.step(
                0,
                lambda: self.bundle.loss(first),
                epoch=0.0,
                lr_base=self.engine.lr("base"),
                lr_peft=self.engine.lr("peft"),
                train_seconds=0.0,
            )

    def step(self) -> tuple[dict[str, Any], Callable[[], torch.Tensor]]:
        """One engine step on minibatch ``t``: its metrics row and the minibatch's loss."""
        epoch, _ = self.sampler.position(self.t)
        batch = self._batch(self.t)
        loss_fn = lambda b=batch: self.bundle.loss(b)  # noqa: E731
        t0 = time.perf_counter()
        res = self.engine.step(loss_fn)
        self.elapsed += time.perf_counter() - t0
        self.t += 1
        self.last_loss = res.loss
        row: dict[str, Any] = {
            "step": self.t,
            "epoch": epoch,
            "loss": res.loss,
            "proj_grad": res.proj_grad if self.engine.zo_params else None,  # n/a, not nan
            "lr_base": self.engine.lr("base"),
            "lr_peft": self.engine.lr("peft"),
            "seconds": self.elapsed,
        }
        if not math.isfinite(res.loss):
            self.metrics.write(row)
            raise Diverged(f"loss became {res.loss} at step {self.t}; lower the learning rates")
        return row, loss_fn

    def evaluate(self, row: dict[str, Any]) -> None:
        """Eval and dev accuracy into ``row``; ``best.pt`` on a new best dev accuracy."""
        n = self.cfg.max_length
        row["eval_acc"] = self.bundle.accuracy(self.eval_set, max_length=n)
        row["dev_acc"] = self.bundle.accuracy(self.splits.dev, max_length=n)
        if row["dev_acc"] > self.best_dev:
            self.best_dev = row["dev_acc"]
            torch.save(
                {"model": self.model.state_dict(), "step": self.t, "dev_acc": self.best_dev},
                self.out / "best.pt",
            )

    def log(self, row: dict[str, Any], loss_fn: Callable[[], torch.Tensor]) -> None:
        """Write ``row`` to ``metrics.csv`` and let the recorder probe (on ``loss_fn``'s batch:
        the logged loss is the probed batch's, like grad_norm)."""
        self.metrics.write(row)
        for rec in self.recorders:
            rec.step(
                self.t,
                loss_fn,
                epoch=row["epoch"],
                lr_base=self.engine.lr("base"),
                lr_peft=self.engine.lr("peft"),
                train_seconds=self.elapsed,
            )

    def checkpoint(self) -> None:
        """Save model, engine and counters atomically to ``checkpoint.pt``."""
        tmp = self.out / "checkpoint.pt.tmp"
        torch.save(
            {
                "model": self.model.state_dict(),
                "engine": self.engine.state_dict(),
                "step": self.t,
                "best_dev": self.best_dev,
                "seconds": self.elapsed,
                "config": dataclasses.asdict(self.cfg),
            },
            tmp,
        )
        tmp.replace(self.out / "checkpoint.pt")

    def _show(self, row: dict[str, Any]) -> None:
        if self.bar is not None:
            self.bar.update(1)
            post = {"loss": f"{row['loss']:.4f}"}
            if "eval_acc" in row:
                post["acc"] = f"{row['eval_acc']:.3f}"
            self.bar.set_postfix(post, refresh=False)

    def close(self) -> None:
        """Close the bar, the metrics log and the recorder."""
        if self.bar is not None:
            self.bar.close()
        if self.metrics is not None:
            self.metrics.close()
        if self.recorder is not None:
            self.recorder.close()

    def finish(self) -> None:
        """Write ``summary.json`` (a no-op rerun keeps the real one)."""
        ran = self.t - self.start
        summary = {
            "method": self.cfg.method,
            "steps": self.t,
            "final_loss": final_loss(
                r["loss"] for r in read_log(self.out / "metrics.csv", METRICS, warn=False).rows
            ),
            "best_dev_acc": self.best_dev,
            "train_seconds": self.elapsed,
            "seconds_per_step": self.elapsed / ran if ran > 0 else math.nan,
            "probe_seconds": sum(r.probe_seconds for r in self.recorders),
            "peak_memory_mb": _peak_memory_mb(self.bundle.device),
        }
        if ran > 0 or not (self.out / "summary.json").exists():
            write_json(self.out / "summary.json", summary)

    def run(self, *, resume: bool = True) -> Path:
        """Train to ``cfg.steps`` (from the checkpoint if ``resume``); the run folder."""
        cfg = self.cfg
        if resume:
            self.resume()
        self.open()
        try:
            if self.recorder is not None and self.start == 0:
                self.record_start()
            while self.t < cfg.steps:
                row, loss_fn = self.step()
                if self.t % cfg.eval_every == 0 or self.t == cfg.steps:
                    self.evaluate(row)
                self.log(row, loss_fn)
                if self.t % self.save_every == 0 or self.t == cfg.steps:
                    self.checkpoint()
                if self.on_step:
                    self.on_step(self.t, row)
                self._show(row)
        except KeyboardInterrupt:
            self.checkpoint()
            raise
        finally:
            self.close()
        self.finish()
        return self.out


def train(
    cfg: TrainConfig,
    *,
    progress: bool = True,
    resume: bool = True,
    on_step: Callable[[int, dict], None] | None = None,
    advice: dict[str, Any] | None = None,
) -> Path:
    """Run ``cfg`` and return its run folder (see module docstring). Rates given as
    ``"auto"`` are resolved by :func:`resolve_rates` (reused from the run folder if
    ``resume``); ``advice``: the record of a resolution already done by the caller."""
    if cfg.auto_rates:
        cfg.validate()
        cfg, advice = resolve_rates(cfg, resume=resume)
    return Trainer(cfg, progress=progress, on_step=on_step, advice=advice).run(resume=resume)


def load_config(run_dir: str | Path) -> TrainConfig:
    """The :class:`TrainConfig` saved in a run folder (for resuming it)."""
    path = Path(run_dir) / "config.json"
    if not path.exists():
        raise UsageError(f"{run_dir} is not a run folder: no config.json")
    data = json.loads(path.read_text())
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    return TrainConfig(**{k: v for k, v in data.items() if k in names})
