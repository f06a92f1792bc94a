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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from smoothlab.blocks import block_sizes, make_blocks
from smoothlab.recorder import TrajectoryRecorder
from smoothlab.runlog import METRICS_FIELDS, CsvLog, versions, write_json

from .data import EpochSampler, Splits, Task, load_task_data
from .engine import HybridEngine
from .models import ModelBundle, attach_peft, load_model

METHODS = (
    "zo-ft", "fo-ft", "fo-lora", "fo-prompt", "fo-prefix", "hybrid-lora", "hybrid-prompt", "hybrid-prefix",
)
PEFT_OF = {m: m.split("-", 1)[1] for m in METHODS if m.split("-", 1)[1] in ("lora", "prompt", "prefix")}


@dataclass
class TrainConfig:
    """Everything a run needs; saved whole in ``config.json``."""

    method: str = "hybrid-lora"
    model: str | None = None  # None: the bundled MiniLM
    task: str = "sst2"
    data: str | None = None  # None: the built-in synthetic sentiment set
    steps: int = 1000
    batch_size: int = 16
    lr_base: float = 1e-6
    lr_peft: float = 1e-2
    mu: float = 1e-3
    q: int = 1
    one_sided: bool = False
    fo_at_perturbed: bool = False
    weight_decay: float = 0.0
    seed: int = 0
    data_seed: int = 0
    train_size: int = 1000
    eval_size: int = 1000
    dev_size: int = 100
    eval_every: int = 100
    eval_examples: int | None = None  # evaluate on the first N eval examples (None: all)
    save_every: int | None = None  # None: = eval_every
    max_length: int = 128
    device: str = "cpu"
    lora_r: int = 16
    lora_alpha: float = 32
    num_virtual_tokens: int = 10
    # trajectory recording (0: off)
    record_every: int = 0
    record_norm: str = "spectral"
    record_hvp: str = "fd"
    record_vectors: int = 10
    record_batch: str = "fixed"  # "fixed" held-aside batch or "current"
    record_h: float | None = None  # finite-difference step of the probes (None: per dtype)
    out: str = "runs/run"
    name: str = ""
    extra: dict = field(default_factory=dict)

    def validate(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; accepted: {', '.join(METHODS)}")
        for k in ("steps", "batch_size", "q", "eval_every", "train_size", "eval_size", "dev_size", "max_length"):
            v = getattr(self, k)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{k} must be a positive integer, got {v!r}")
        for k in ("lr_base", "lr_peft"):
            v = getattr(self, k)
            if not (isinstance(v, int | float) and math.isfinite(v) and v >= 0):
                raise ValueError(f"{k} must be a finite number >= 0, got {v!r}")
        if not (isinstance(self.mu, int | float) and math.isfinite(self.mu) and self.mu > 0):
            raise ValueError(f"mu must be positive, got {self.mu!r}")
        if self.record_batch not in ("fixed", "current"):
            raise ValueError(f"record_batch must be 'fixed' or 'current', got {self.record_batch!r}")
        if self.record_every < 0:
            raise ValueError(f"record_every must be >= 0, got {self.record_every!r}")


def split_parameters(model: nn.Module, method: str) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(zeroth-order x, first-order y) parameters of ``method``.

    ``zo-ft``: every weight is x. ``fo-ft``: every weight is y. ``fo-<peft>``: the adapter
    (and a SEQ_CLS head) is y, no x. ``hybrid-<peft>``: adapter is y, the base model is x
    (except peft's inactive ``original_module`` copies, which no forward reads).
    """
    named = list(model.named_parameters())
    if method == "zo-ft":
        return [p for _, p in named], []
    if method == "fo-ft":
        return [], [p for _, p in named]
    blocks = make_blocks(model, "hybrid")
    peft = blocks["peft"]
    peft_ids = {id(p) for p in peft}
    if method.startswith("fo-"):
        return [], peft
    base = [p for n, p in named if id(p) not in peft_ids and ".original_module." not in n]
    return base, peft


def build(cfg: TrainConfig) -> tuple[ModelBundle, Task, Splits]:
    """Load data and model and attach the method's PEFT module."""
    task, splits = load_task_data(
        cfg.task, cfg.data, train=cfg.train_size, eval=cfg.eval_size, dev=cfg.dev_size, seed=cfg.data_seed
    )
    bundle = load_model(cfg.model, task, device=cfg.device, seed=cfg.seed)
    if cfg.method in PEFT_OF:
        bundle = attach_peft(
            bundle, PEFT_OF[cfg.method], r=cfg.lora_r, alpha=cfg.lora_alpha,
            num_virtual_tokens=cfg.num_virtual_tokens, seed=cfg.seed,
        )
    return bundle, task, splits


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def train(
    cfg: TrainConfig,
    *,
    progress: bool = True,
    resume: bool = True,
    on_step: Callable[[int, dict], None] | None = None,
) -> Path:
    """Run ``cfg`` and return its run folder (see module docstring)."""
    cfg.validate()
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    ckpt_path = out / "checkpoint.pt"
    bundle, task, splits = build(cfg)
    model = bundle.model
    zo, fo = split_parameters(model, cfg.method)
    engine = HybridEngine(
        model, zo, fo, lr_zo=cfg.lr_base, lr_fo=cfg.lr_peft, mu=cfg.mu, q=cfg.q,
        one_sided=cfg.one_sided, fo_at_perturbed=cfg.fo_at_perturbed,
        weight_decay=cfg.weight_decay, seed=cfg.seed,
    )
    sampler = EpochSampler(len(splits.train), cfg.batch_size, seed=cfg.seed)
    start, best_dev, elapsed = 0, -1.0, 0.0
    if resume and ckpt_path.exists():
        state = torch.load(ckpt_path, map_location=bundle.device, weights_only=False)
        if state["config"]["method"] != cfg.method:
            raise ValueError(f"{out} holds a {state['config']['method']!r} run; cannot resume it as {cfg.method!r}")
        model.load_state_dict(state["model"])
        engine.load_state_dict(state["engine"])
        start, best_dev, elapsed = state["step"], state["best_dev"], state["seconds"]
    # probed blocks: base / peft (the adapter) / head (a trained classifier, if any)
    blocks = make_blocks(model, "hybrid-split") if cfg.method in PEFT_OF else {"model": list(model.parameters())}
    sizes = block_sizes(blocks)
    config = dataclasses.asdict(cfg) | {
        "model": cfg.model or bundle.name, "model_name": bundle.name, "kind": bundle.kind, "block_sizes": sizes,
        "num_zo_params": sum(p.numel() for p in zo), "num_fo_params": sum(p.numel() for p in fo),
        "versions": versions(), "resumed_from": start or None,
    }
    # rewritten on resume too: it must hold the configuration in effect (e.g. a raised
    # ``steps``) and ``resumed_from``, or ``load_config`` would resume the old target
    write_json(out / "config.json", config)
    metrics = CsvLog(out / "metrics.csv", METRICS_FIELDS, truncate_after=start)
    recorder = None
    if cfg.record_every:
        probe_fn = None
        if cfg.record_batch == "fixed":
            held = bundle.encode(splits.dev[: cfg.batch_size], cfg.max_length)
            probe_fn = lambda: bundle.loss(held)  # noqa: E731
        recorder = TrajectoryRecorder(
            blocks, every=cfg.record_every, norm=cfg.record_norm, hvp=cfg.record_hvp,
            num_vectors=cfg.record_vectors, h=cfg.record_h, seed=cfg.seed, out_dir=out, model=model,
            probe_loss_fn=probe_fn, resume_step=start,
        )
    save_every = cfg.save_every or cfg.eval_every
    eval_set = splits.eval[: cfg.eval_examples] if cfg.eval_examples else splits.eval
    model.eval()  # dropout off: both forwards of a ZO pair must see the same function

    def checkpoint(step: int) -> None:
        torch.save({"model": model.state_dict(), "engine": engine.state_dict(), "step": step,
                    "best_dev": best_dev, "seconds": elapsed, "config": dataclasses.asdict(cfg)},
                   out / "checkpoint.pt.tmp")
        (out / "checkpoint.pt.tmp").replace(ckpt_path)

    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=cfg.steps, initial=start, desc=f"{cfg.method}", unit="step", dynamic_ncols=True)
    step = start
    last_loss = math.nan
    if recorder is not None and start == 0:
        first = bundle.encode([splits.train[i] for i in sampler.batch(0)], cfg.max_length)
        recorder.step(0, lambda: bundle.loss(first), epoch=0.0, lr_base=engine.lr("base"),
                      lr_peft=engine.lr("peft"), train_seconds=0.0)
    try:
        while step < cfg.steps:
            epoch, _ = sampler.position(step)
            batch = bundle.encode([splits.train[i] for i in sampler.batch(step)], cfg.max_length)
            loss_fn = lambda b=batch: bundle.loss(b)  # noqa: E731
            t0 = time.perf_counter()
            res = engine.step(loss_fn)
            elapsed += time.perf_counter() - t0
            step += 1
            last_loss = res.loss
            row: dict[str, Any] = {
                "step": step, "epoch": epoch, "loss": res.loss, "proj_grad": res.proj_grad,
                "lr_base": engine.lr("base"), "lr_peft": engine.lr("peft"), "seconds": elapsed,
            }
            if not math.isfinite(res.loss):
                metrics.write(row)
                raise FloatingPointError(f"loss became {res.loss} at step {step}; lower the learning rates")
            if step % cfg.eval_every == 0 or step == cfg.steps:
                row["eval_acc"] = bundle.accuracy(eval_set, max_length=cfg.max_length)
                row["dev_acc"] = bundle.accuracy(splits.dev, max_length=cfg.max_length)
                if row["dev_acc"] > best_dev:
                    best_dev = row["dev_acc"]
                    torch.save({"model": model.state_dict(), "step": step, "dev_acc": best_dev}, out / "best.pt")
            metrics.write(row)
            if recorder is not None:
                # the logged loss is the probed batch's (the recorder evaluates it), like grad_norm
                recorder.step(step, loss_fn, epoch=epoch, lr_base=engine.lr("base"),
                              lr_peft=engine.lr("peft"), train_seconds=elapsed)
            if step % save_every == 0 or step == cfg.steps:
                checkpoint(step)
            if on_step:
                on_step(step, row)
            if bar is not None:
                bar.update(1)
                post = {"loss": f"{res.loss:.4f}"}
                if "eval_acc" in row:
                    post["acc"] = f"{row['eval_acc']:.3f}"
                bar.set_postfix(post, refresh=False)
    except KeyboardInterrupt:
        checkpoint(step)
        raise
    finally:
        if bar is not None:
            bar.close()
        metrics.close()
        if recorder is not None:
            recorder.close()
    summary = {
        "method": cfg.method, "steps": step, "final_loss": last_loss, "best_dev_acc": best_dev,
        "train_seconds": elapsed, "seconds_per_step": elapsed / max(step - start, 1) if step > start else math.nan,
        "probe_seconds": recorder.probe_seconds if recorder else 0.0,
        "peak_memory_mb": _peak_memory_mb(bundle.device),
    }
    if step > start or not (out / "summary.json").exists():  # a no-op rerun keeps the real one
        write_json(out / "summary.json", summary)
    return out


def load_config(run_dir: str | Path) -> TrainConfig:
    """The :class:`TrainConfig` saved in a run folder (for resuming it)."""
    path = Path(run_dir) / "config.json"
    if not path.exists():
        raise ValueError(f"{run_dir} is not a run folder: no config.json")
    data = json.loads(path.read_text())
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    return TrainConfig(**{k: v for k, v in data.items() if k in names})
