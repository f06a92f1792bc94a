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

__all__ = ["TrainConfig", "Trainer", "build", "load_config", "split_parameters", "train"]


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
    """

    def __init__(
        self,
        cfg: TrainConfig,
        *,
        progress: bool = True,
        on_step: Callable[[int, dict], None] | None = None,
    ) -> None:
        cfg.validate()
        self.cfg, self.out, self.progress, self.on_step = cfg, Path(cfg.out), progress, on_step
        self.bundle, self.task, self.splits = build(cfg)
        self.model = self.bundle.model
        self.zo, self.fo = split_parameters(self.model, cfg.method)
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
        config = dataclasses.asdict(cfg) | {
            "model": cfg.model or bundle.name,
            "model_name": bundle.name,
            "kind": bundle.kind,
            "block_sizes": block_sizes(blocks),
            "num_zo_params": sum(p.numel() for p in self.zo),
            "num_fo_params": sum(p.numel() for p in self.fo),
            "versions": versions(),
            "resumed_from": self.start or None,
        }
        # rewritten on resume too: it must hold the configuration in effect (e.g. a raised
        # ``steps``) and ``resumed_from``, or ``load_config`` would resume the old target
        write_json(self.out / "config.json", config)
        self.metrics = CsvLog(self.out / "metrics.csv", METRICS_FIELDS, truncate_after=self.start)
        if cfg.record_every:
            probe_fn = None
            if cfg.record_batch == "fixed":
                held = bundle.encode(self.splits.dev[: cfg.batch_size], cfg.max_length)
                probe_fn = lambda: bundle.loss(held)  # noqa: E731
            self.recorder = TrajectoryRecorder(
                blocks,
                every=cfg.record_every,
                norm=cfg.record_norm,
                hvp=cfg.record_hvp,
                num_vectors=cfg.record_vectors,
                h=cfg.record_h,
                seed=cfg.seed,
                out_dir=self.out,
                model=self.model,
                probe_loss_fn=probe_fn,
                resume_step=self.start,
            )
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

    def _batch(self, step: int) -> Any:
        return self.bundle.encode(
            [self.splits.train[i] for i in self.sampler.batch(step)], self.cfg.max_length
        )

    def record_start(self) -> None:
        """The recorder's probe at step 0 (on the first minibatch)."""
        first = self._batch(0)
        self.recorder.step(
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
        if self.recorder is not None:
            self.recorder.step(
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
            "final_loss": final_loss(r["loss"] for r in read_log(self.out / "metrics.csv", METRICS, warn=False).rows),
            "best_dev_acc": self.best_dev,
            "train_seconds": self.elapsed,
            "seconds_per_step": self.elapsed / ran if ran > 0 else math.nan,
            "probe_seconds": self.recorder.probe_seconds if self.recorder else 0.0,
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
) -> Path:
    """Run ``cfg`` and return its run folder (see module docstring)."""
    return Trainer(cfg, progress=progress, on_step=on_step).run(resume=resume)


def load_config(run_dir: str | Path) -> TrainConfig:
    """The :class:`TrainConfig` saved in a run folder (for resuming it)."""
    path = Path(run_dir) / "config.json"
    if not path.exists():
        raise UsageError(f"{run_dir} is not a run folder: no config.json")
    data = json.loads(path.read_text())
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    return TrainConfig(**{k: v for k, v in data.items() if k in names})
