"""Training runs: methods, the loop, the run folder, evaluation, checkpoints and resume.

``train(TrainConfig(...))`` writes the run folder of docs/design.md: ``config.json``,
``metrics.csv`` (flushed row by row), ``checkpoint.pt`` (every ``save_every`` steps and at the
end), ``best.pt`` (best dev accuracy), ``summary.json``, and with a recorder
``smoothness.csv``. Re-running with the same ``out`` resumes from ``checkpoint.pt`` and
continues the same trajectory: step t always sees minibatch ``EpochSampler.batch(t)`` and
perturbation seeds ``param_seed(seed, t·q + i)``.

Faults (:mod:`smoothlab.hybrid.faults`): the folder is locked by one process; a resume refuses a
configuration that would change the trajectory; SIGINT/SIGTERM wait for an update or a write
to end, then a checkpoint at that step records its pending :data:`PHASES`, so any stop
(SIGKILL included: rows after the checkpoint are dropped and redone) continues bit-identically
with no row missing or twice; a diverging loss stops the run (:class:`Diverged`).

Scaling (docs/scaling.md): under ``torchrun`` every rank takes its shard of each global
minibatch; the ZO losses of a step are summed over ranks in one collective, the PEFT
gradients in one more, probes see global gradients, eval counts are summed, and only rank 0
writes the folder. ``checkpoint="seeds"`` stores ``seeds.jsonl`` and the first-order weights
instead of the model; resume and :func:`load_trained` replay the log bit-identically.
``device_map`` spreads the model over devices with accelerate (:func:`place_model`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from smoothlab.blocks import block_sizes, make_blocks
from smoothlab.budget import WalkBudget
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

from . import distributed as D
from .config import (
    AUTO,
    TrainConfig,
    check_fields,
    resolve_device,
    user_input,
)
from .data import EpochSampler, Splits, Task, file_digests, load_task_data
from .engine import HybridEngine, table_of, zo_updater
from .faults import (
    INERT,
    Diverged,
    DivergenceGuard,
    RunLock,
    SignalGuard,
    check_resume,
    clear_run,
    config_diff,
)
from .models import DEFAULT_MODEL, ModelBundle, auto_dtype, configured_bundle, loaded_dtype
from .seedlog import SeedHeader, SeedLog, replay, weights_hash
from .seedlog import digest as log_digest

__all__ = [
    "PHASES",
    "Diverged",
    "TrainConfig",
    "Trainer",
    "build",
    "load_config",
    "load_trained",
    "place_model",
    "record_blocks",
    "resolve_rates",
    "split_parameters",
    "train",
]


# What step t does after its update, in order; a checkpoint taken in between lists those
# still pending, and a resume does them first (all are recomputable from the weights at t).
PHASES = ("eval", "row", "probe")


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


_DATA_FLAGS = {
    "path": "--data",
    "train": "--train-size",
    "eval": "--eval-size",
    "dev": "--dev-size",
}
"""The options :func:`load_task_data`'s messages name (the CLI's flags for the config fields)."""


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
            flags=_DATA_FLAGS,
            **files,
        )
    bundle = configured_bundle(
        cfg,
        task,
        get_method(cfg.method).peft,
        model_input=f"model {cfg.model or 'default'!r}",
        peft_input=f"method {cfg.method!r} on model {cfg.model or DEFAULT_MODEL!r}",
    )
    if cfg.device_map is not None:
        bundle = place_model(bundle, cfg.device_map)
    return bundle, task, splits


def _device_map(model: nn.Module, spec: str | dict) -> dict[str, Any]:
    """The module → device map of ``spec``: ``"auto"`` (accelerate's
    ``infer_auto_device_map``: fill the GPUs in order, then the CPU) or an explicit map
    (a dict or its JSON text)."""
    if isinstance(spec, dict):
        return dict(spec)
    if spec != AUTO:
        return dict(json.loads(spec))
    from accelerate import infer_auto_device_map

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return infer_auto_device_map(
        model, no_split_module_classes=getattr(base, "_no_split_modules", None) or []
    )


def place_model(bundle: ModelBundle, spec: str | dict) -> ModelBundle:
    """``bundle`` with its model spread over devices by accelerate's ``dispatch_model``
    (``spec``: ``"auto"`` or a module → device map; see :func:`_device_map`). Weights stay
    where the map puts them; accelerate's hooks move the activations between devices, and
    the engine perturbs and updates each parameter on its own device
    (:func:`smoothlab.hybrid.engine.make_sampler`). Inputs go to the device of the first parameter.

    accelerate is optional: without it this is a :class:`UsageError` naming the install.
    A map that offloads weights (``"disk"``, or ``"cpu"`` beside GPUs, which accelerate
    treats as offload) is refused by the engine: ZO updates need the weights in memory.
    """
    try:
        from accelerate import dispatch_model
    except ImportError:
        raise UsageError(
            f"device_map {spec!r} needs the accelerate package, which is not installed: "
            "pip install accelerate"
        ) from None
    with user_input(f"device_map {spec!r}"):
        dmap = _device_map(bundle.model, spec)
        if "disk" in dmap.values():
            raise UsageError(
                f"device_map {spec!r} offloads weights to disk; ZO updates need every weight in "
                "memory: give the devices more memory or use more devices"
            )
        model = dispatch_model(bundle.model, device_map=dmap)
    first = next(model.parameters()).device
    return dataclasses.replace(bundle, model=model, device=first)


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
    :func:`smoothlab.hybrid.advise.advise_config` probes ``cfg``'s model at step 0 on the batch step 0
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
    are the names :mod:`smoothlab.analysis.modules` groups by.
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


def restore_weights(
    model: nn.Module,
    zo: list[nn.Parameter],
    cfg: TrainConfig,
    state: dict[str, Any],
    run_dir: Path,
) -> None:
    """Put the weights of checkpoint ``state`` into ``model``, freshly built from ``cfg``.

    ``full``: its state dict. ``seeds``: x_0 (the model as built, which must hash to the
    log's ``weights_hash``, else :class:`UsageError`) is replayed through the first
    ``seed_steps`` entries of ``run_dir/seeds.jsonl`` (whose bytes must hash to the
    checkpoint's ``seeds_digest``, :func:`smoothlab.hybrid.seedlog.digest`) with the engine's own update
    (:func:`smoothlab.hybrid.engine.zo_updater`): bit-identical to the trained x. Then the saved
    first-order weights (``trained``, by name) are copied in.
    """
    kind = state.get("checkpoint", "full")
    if kind not in ("full", "seeds"):
        raise UsageError(
            f"{run_dir}/checkpoint.pt is damaged: it holds a {kind!r} checkpoint (accepted: "
            "'full', 'seeds'); restart the run with --restart"
        )
    if kind == "full":
        try:
            model.load_state_dict(state["model"])
        except (KeyError, RuntimeError) as e:  # another model or method, a damaged file
            reason = str(e).strip().splitlines()[0][:160] if str(e).strip() else repr(e)
            raise UsageError(
                f"{run_dir}/checkpoint.pt does not fit the model its config.json builds "
                f"({reason}); restart the run with --restart"
            ) from None
        return
    _replay_seeds(model, zo, cfg, state, Path(run_dir))


def _replay_seeds(
    model: nn.Module, zo: list[nn.Parameter], cfg: TrainConfig, state: dict[str, Any], run_dir: Path
) -> None:
    """The ``seeds`` half of :func:`restore_weights`: checks, replay, first-order weights."""
    path = Path(run_dir) / "seeds.jsonl"
    if not path.is_file():
        raise UsageError(
            f"{run_dir} holds a seeds checkpoint but no seeds.jsonl; the run cannot be rebuilt "
            "(restart it with --restart)"
        )
    steps, trained = state.get("seed_steps"), state.get("trained")
    if isinstance(steps, bool) or not isinstance(steps, int) or not isinstance(trained, dict):
        raise UsageError(
            f"{run_dir}/checkpoint.pt is a damaged seeds checkpoint (no seed_steps or trained "
            "weights in it); restart the run with --restart"
        )
    log = SeedLog(path)
    saved = state.get("seeds_digest")  # absent in checkpoints written before it existed
    if saved is not None and log_digest(path, steps) != saved:
        raise UsageError(
            f"cannot replay {path}: its header or first {steps} entries are not those the "
            f"checkpoint was saved with ({saved} then, {log_digest(path, steps)} now); the log was "
            "edited or replaced: restore it, or rerun with --restart"
        )
    _check_frozen(model, zo, set(trained), log)
    if zo:
        table = table_of(state.get("engine", {}), zo)
        replay(zo, log, zo_updater(zo, seed=cfg.seed, z=cfg.z, table=table), upto=steps)
    params = dict(model.named_parameters())
    unknown = sorted(set(trained) - set(params))
    if unknown:
        raise UsageError(f"{run_dir}: the checkpoint has weights this model lacks: {unknown[:3]}")
    with torch.no_grad():
        for name, value in trained.items():
            params[name].copy_(value)


def frozen_weights(
    model: nn.Module, zo: list[nn.Parameter], trained: set[str]
) -> dict[str, torch.Tensor]:
    """The weights a ``seeds`` checkpoint neither replays (x, ``zo``) nor saves (y, the
    names in ``trained``): frozen base weights, a fresh head's initial values, peft's
    inactive copies. They must be the same at replay as in training."""
    ids = {id(p) for p in zo}
    return {n: p for n, p in model.named_parameters() if id(p) not in ids and n not in trained}


def _check_frozen(
    model: nn.Module, zo: list[nn.Parameter], trained: set[str], log: SeedLog
) -> None:
    """UsageError when the weights neither replayed nor saved hash to something other
    than the log header's ``frozen_hash`` (absent in logs written before it existed)."""
    want = log.header.extra.get("frozen_hash")
    if want is None:
        return
    have = weights_hash(frozen_weights(model, zo, trained))
    if have != want:
        raise UsageError(
            f"cannot replay {log.path}: its frozen (untrained) weights hash to {want} "
            f"(model {log.header.model!r}) but the model given has {have}; load the same "
            "initial model (name, revision, seed of any fresh head)"
        )


DATA_FIELDS = ("data", "eval_data", "dev_data")  # the config's data files


def data_digest(cfg: TrainConfig, read: dict[str, str] | None = None) -> dict[str, str]:
    """sha256 of each data file the config names: a resume compares contents, not paths.
    ``read``: the digests of the files already read (:func:`smoothlab.hybrid.data.file_digests`),
    taken from the bytes parsed instead of reading a file a second time."""
    out = {}
    for name in DATA_FIELDS:
        path = getattr(cfg, name, None)
        if path and read and str(Path(path)) in read:
            out[name] = read[str(Path(path))]
        elif path and Path(path).is_file():
            h = hashlib.sha256()
            with open(path, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    h.update(block)
            out[name] = h.hexdigest()
    return out


def check_data(
    folder: Path, saved: dict[str, Any], state: dict[str, Any], cfg: TrainConfig, now: dict
) -> None:
    """UsageError if a data file's contents changed since the run's checkpoint; a file
    with the same contents under another spelling of its path (``./a.tsv``, an absolute
    path) counts as the same data (``saved`` gets the current spelling)."""
    before = state.get("data_digest")
    if not before:
        return  # saved before contents were recorded: the paths are compared
    for name, digest in before.items():
        if name in now and now[name] != digest:
            raise UsageError(
                f"{folder} was trained on other contents of {name} {getattr(cfg, name)!r} "
                f"(sha256 {digest[:12]}… then, {now[name][:12]}… now); resuming would mix two "
                "datasets: restore the file, or use --restart or another --out"
            )
        if name in now:
            saved[name] = getattr(cfg, name)


def read_checkpoint(path: Path, device: torch.device, hint: str) -> dict[str, Any]:
    """``torch.load`` of a run's checkpoint; a file that is not one (truncated, garbage,
    another kind of file) is a UsageError naming it, with ``hint`` on what to do."""
    try:
        state = torch.load(path, map_location=device, weights_only=False)
    except Exception as e:  # noqa: BLE001 - torch raises many kinds for a damaged file
        reason = str(e).strip().splitlines()[0][:120] if str(e).strip() else type(e).__name__
        raise UsageError(f"{path} is not a readable checkpoint ({reason}); {hint}") from e
    if not isinstance(state, dict) or "config" not in state:
        raise UsageError(f"{path} is not a smoothlab checkpoint (no config in it); {hint}")
    return state


def load_trained(
    run_dir: str | Path, *, device: str | None = None, info: dict[str, Any] | None = None
) -> ModelBundle:
    """The fine-tuned model of a run folder: built from its ``config.json`` as training
    built it, then the weights of ``checkpoint.pt`` restored (:func:`restore_weights`;
    a ``seeds`` checkpoint is replayed). ``device`` overrides the run's device. ``info``,
    if given, receives ``step`` (the checkpoint's) and ``steps`` (the run's target)."""
    cfg = load_config(run_dir)
    if device is not None:
        cfg = dataclasses.replace(cfg, device=resolve_device(device))
    path = Path(run_dir) / "checkpoint.pt"
    if not path.is_file():
        raise UsageError(f"{run_dir} holds no checkpoint.pt to export (train it first)")
    bundle, _, _ = build(cfg)
    zo, _ = split_parameters(bundle.model, cfg.method)
    state = read_checkpoint(path, bundle.device, "the run's last checkpoint is damaged")
    saved = state["config"].get("method") if isinstance(state["config"], dict) else None
    if saved != cfg.method:
        raise UsageError(
            f"{path} is of a {saved!r} run but {run_dir}/config.json says {cfg.method!r}; "
            "the folder mixes two runs: export the run that wrote the checkpoint"
        )
    restore_weights(bundle.model, zo, cfg, state, Path(run_dir))
    if info is not None:
        info.update(step=state.get("step"), steps=cfg.steps)
    bundle.model.eval()
    return bundle


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
        self._join_world(cfg)
        if cfg.auto_rates:  # rates given as "auto": probe now (or reuse a resumable run's)
            cfg, advice = resolve_rates(cfg, resume=True)
        self.advice = advice
        self.cfg, self.out, self.on_step = cfg, Path(cfg.out), on_step
        self.progress = progress and self.writer
        self.ckpt_kind = cfg.checkpoint_kind
        with file_digests() as self._read_digests:  # the data files, read once
            self.bundle, self.task, self.splits = build(cfg)
        self.model = self.bundle.model
        self.dtype_given = cfg.dtype
        if cfg.dtype == AUTO and (dtype := loaded_dtype(self.model)) is not None:
            # recorded as loaded, so a resume compares dtypes, not the word "auto"
            self.cfg = cfg = dataclasses.replace(cfg, dtype=dtype)
        if self.writer and (
            note := self.bundle.truncation_note(
                self.splits.train, cfg.max_length, "training examples"
            )
        ):
            print(note, file=sys.stderr, flush=True)
        self.zo, self.fo = split_parameters(self.model, cfg.method)
        self.module_blocks = (
            record_blocks(self.model, cfg.record_blocks, self.zo, self.fo)
            if cfg.record_blocks and cfg.record_every
            else None
        )
        self.engine = self._build_engine(cfg)
        self.walk = self._walk_budget(cfg, advice)
        self._share_fo_gradients()
        self._init_loop_state(cfg)

    def _walk_budget(self, cfg: TrainConfig, advice: dict[str, Any] | None) -> WalkBudget | None:
        """With ``lr_base`` resolved by the advisor (and ``lr_base_budget``), the budget
        that lowers it as the ZO gradient grows (:mod:`smoothlab.budget`)."""
        if not (cfg.lr_base_budget and self.zo and advice and "lr_base" in advice.get("auto", ())):
            return None
        return WalkBudget.from_advice(advice, horizon=cfg.steps)

    def _join_world(self, cfg: TrainConfig) -> None:
        """Join torchrun's process group (else one process); rank 0 alone writes."""
        self.world = D.init(timeout_s=cfg.dist_timeout)  # torchrun: join; else 1 process
        self.writer = self.world.rank == 0  # the one rank that writes files and the bar
        if self.world.distributed and cfg.device_map is not None:
            raise UsageError(
                "device_map with torchrun is not supported: each rank would spread its replica "
                "over every device; use one of them (see docs/scaling.md)"
            )

    def _build_engine(self, cfg: TrainConfig) -> HybridEngine:
        """The hybrid ZO/FO engine over this model's split, with the run's rates."""
        return HybridEngine(
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
            z=cfg.z,
        )

    def _share_fo_gradients(self) -> None:
        """Under torchrun, all-reduce the y-gradients weighted by each rank's batch share."""
        self.weight = 1.0  # this rank's share n_r/N of the current minibatch
        if self.world.distributed:  # y-gradients: Σ_r (n_r/N) ∇f_r before each update
            D.install_grad_allreduce(
                self.engine.optimizer, self.engine.fo_params, weight=lambda: self.weight
            )

    def _init_loop_state(self, cfg: TrainConfig) -> None:
        """Step counters, sampler, guards and the per-step slots filled while training."""
        self.seedlog: SeedLog | None = None
        self.probed: list[torch.Tensor] = []  # every parameter a recorder probes
        self.sampler = EpochSampler(len(self.splits.train), cfg.batch_size, seed=cfg.seed)
        self.start = self.t = 0
        self.best_dev, self.elapsed, self.last_loss = -1.0, 0.0, math.nan
        self.save_every = cfg.save_every or cfg.eval_every
        self.eval_set = (
            self.splits.eval[: cfg.eval_examples] if cfg.eval_examples else self.splits.eval
        )
        self.guard = SignalGuard()
        self.divergence = DivergenceGuard(cfg.diverge_factor, cfg.diverge_patience)
        self.pending: list[str] = []  # PHASES of step t still to do
        self.row: dict[str, Any] | None = None  # step t's metrics row
        self.loss_fn: Callable[[], torch.Tensor] | None = None  # step t's minibatch loss
        self.probe_base, self.extended_by = 0.0, 0
        # saved with each checkpoint, checked on resume
        self.data_digest = data_digest(cfg, self._read_digests)
        self.metrics: CsvLog | None = None
        self.recorder: TrajectoryRecorder | None = None
        self.recorders: list[TrajectoryRecorder] = []
        self.bar: Any = None

    def resume(self) -> None:
        """Continue from ``checkpoint.pt`` if the run folder holds one.

        The saved configuration must match ``cfg`` in every field that alters the trajectory
        (:func:`smoothlab.hybrid.faults.check_resume`); ``steps`` may rise (``extend_steps``: by N past
        the saved target). A checkpoint taken inside a step (an interrupt after its update)
        lists the phases still to do (``pending``) and the step's row.
        """
        path = self.out / "checkpoint.pt"
        if not path.exists():
            if self.cfg.extend_steps:
                raise UsageError(
                    f"extend_steps {self.cfg.extend_steps}: {self.out} holds no checkpoint to "
                    "extend; give steps instead"
                )
            if self.writer:
                self._check_logged_run()
            return
        state = read_checkpoint(
            path, self.bundle.device, "rerun with --restart to start over, or use another --out"
        )
        saved = state["config"]
        self._check_method(saved)  # first: another method's other fields are noise
        self._extend(saved, state)
        check_data(self.out, saved, state, self.cfg, self.data_digest)
        self._check_same_run(saved, state.get("checkpoint", "full"), done=state["step"])
        self._restore(state)
        self.engine.load_state_dict(state["engine"])
        self.start, self.best_dev, self.elapsed = state["step"], state["best_dev"], state["seconds"]
        self.t = self.start
        self.pending = list(state.get("pending", []))
        self.row = state.get("row")
        self.divergence.load_state_dict(state.get("divergence"))
        if self.walk is not None and "walk" not in state:
            self.walk = None  # saved before the walk budget existed: the run had none
        if self.walk is not None:
            self.walk.load_state_dict(state.get("walk"))
            self.walk.horizon = self.cfg.steps  # raised by extend_steps
        self.probe_base = float(state.get("probe_seconds", 0.0))

    def _check_same_run(self, saved: dict[str, Any], kind: str, *, done: int) -> None:
        """:func:`check_resume` of this run against the ``saved`` config of the folder's run
        (its checkpoint kind ``kind`` in effect), which ran ``done`` steps."""
        then, current, defaults = self._comparable(saved, kind)
        inert = INERT | self.cfg.unused_fields()
        check_resume(self.out, then, current, done=done, defaults=defaults, inert=inert)

    def _comparable(self, saved: dict[str, Any], kind: str) -> tuple[dict, dict, dict]:
        """(saved, current, defaults) as :func:`config_diff` compares them: options as they
        take effect. A run of another method is refused here."""
        self._check_method(saved)
        defaults = {
            f.name: f.default
            for f in dataclasses.fields(TrainConfig)
            if f.default is not dataclasses.MISSING
        }
        # the checkpoint kind in effect (None: the method's default), not the raw option;
        # the model likewise (None is the default model, which config.json names); options
        # the method never reads cannot change its trajectory
        current = dataclasses.asdict(self.cfg) | {
            "checkpoint": self.ckpt_kind,
            "model": self.cfg.model or DEFAULT_MODEL,
        }
        then = dict(saved) | {"checkpoint": kind, "model": saved.get("model") or DEFAULT_MODEL}
        if then.get("dtype", AUTO) == AUTO:  # a run from before dtypes were recorded loaded
            then["dtype"] = self._auto_dtype()  # as auto loads now, whatever is asked now
        return then, current, defaults

    def _check_method(self, saved: dict[str, Any]) -> None:
        if saved.get("method") != self.cfg.method:
            raise UsageError(
                f"{self.out} holds a {saved.get('method')!r} run; cannot resume it as "
                f"{self.cfg.method!r} (use --restart or another --out)"
            )

    def _auto_dtype(self) -> str:
        """The ``dtype`` value ``auto`` loads this run's model in (``auto`` when its weights
        mix dtypes): this run's own when it was given as auto, else the model's record."""
        if self.dtype_given == AUTO:
            return self.cfg.dtype
        return auto_dtype(self.cfg.model)

    def _check_logged_run(self) -> None:
        """No checkpoint, but the folder's logs may hold rows (a run killed before its first
        checkpoint, or one whose checkpoint was deleted). Starting over drops those rows, so
        the run that wrote them (its config.json) must be this one: then it is redone, row
        for row; another configuration is refused as a resume would be."""
        rows = max(_data_lines(self.out / "metrics.csv"), _data_lines(self.out / "smoothness.csv"))
        if not rows:
            return
        what = f"{self.out} holds {rows} logged rows but no checkpoint.pt"
        try:
            logged = load_config(self.out)  # the run that logged them
        except UsageError as e:
            raise UsageError(
                f"{what}, and its config.json is not readable ({e}): the run that logged them "
                "is unknown; rerun with --restart to start over, or use another --out"
            ) from None
        saved, kind = dataclasses.asdict(logged), logged.checkpoint_kind
        auto = set((self.advice or {}).get("auto", ()))  # re-resolved: compared as "auto"
        saved |= {k: getattr(self.cfg, k) for k in auto}
        then, current, defaults = self._comparable(saved, kind)
        # nothing is resumed: options that only say when to save or evaluate, or where to
        # compute, change no logged step's training
        inert = INERT | self.cfg.unused_fields() | STARTOVER_INERT
        diff = config_diff(then, current, defaults=defaults, inert=inert)
        if diff:
            shown = "; ".join(f"{k}: {old!r} -> {new!r}" for k, old, new in diff)
            raise UsageError(
                f"{what}, and they were logged by a run with another configuration ({shown}); "
                "starting over would replace them: rerun with the run's values, or use "
                "--restart or another --out"
            )
        print(
            f"smoothlab: note: {what}: the run starts over from step 0 and logs them again",
            file=sys.stderr,
            flush=True,
        )

    def _restore(self, state: dict[str, Any]) -> None:
        """The weights of a checkpoint: a full one's state dict, or (``seeds``) the initial
        weights replayed through ``seeds.jsonl`` (refused onto other initial weights) and
        the first-order weights saved beside it."""
        restore_weights(self.model, self.zo, self.cfg, state, self.out)

    def _extend(self, saved: dict[str, Any], state: dict[str, Any]) -> None:
        """``extend_steps`` N: the target becomes the saved one + N, unless the checkpoint
        is of an unfinished extension by the same N (a rerun after an interruption)."""
        n = self.cfg.extend_steps
        if not n:
            return
        target = int(saved["steps"])
        if not (state.get("extended_by") == n and state["step"] < target):
            target += n
        self.extended_by = n
        self.cfg = dataclasses.replace(self.cfg, steps=target, extend_steps=0)

    def open(self) -> None:
        """Create the run folder; write ``config.json``; open the logs, recorder and bar.

        Rows after the checkpoint's step are dropped (they are redone), and those of its
        step too when its row or probe is pending; without a checkpoint every row goes.
        """
        cfg, bundle = self.cfg, self.bundle
        if self.writer:
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
        keep = self.start if self.start else -1
        if self.writer:
            if self.advice is not None:
                config["advice"] = self.advice
                # the report's proposal section (the raw curvature stays in config.json only)
                shown = {k: v for k, v in self.advice.items() if k != "curvature"}
                write_json(self.out / "advice.json", shown)
            # rewritten on resume too: it must hold the configuration in effect (e.g. a raised
            # ``steps``) and ``resumed_from``, or ``load_config`` would resume the old target
            write_json(self.out / "config.json", config | {"world_size": self.world.world_size})
            self.metrics = CsvLog(
                self.out / "metrics.csv",
                METRICS_FIELDS,
                truncate_after=keep - 1 if "row" in self.pending else keep,
            )
            self._open_seedlog()
        if cfg.record_every:
            self._open_recorders(blocks, keep - 1 if "probe" in self.pending else keep)
        self.model.eval()  # dropout off: both forwards of a ZO pair must see the same function
        if self.progress:
            from tqdm.auto import tqdm

            self.bar = tqdm(
                total=cfg.steps,
                # a step resumed inside (pending phases) is counted when it finishes
                initial=self.start - bool(self.pending),
                desc=cfg.method,
                unit="step",
                dynamic_ncols=True,
            )

    def _open_seedlog(self) -> None:
        """``seeds.jsonl`` of a ``seeds`` checkpoint: a fresh run starts it from the initial
        weights (hashed now, before any update); a resumed one keeps the entries up to its
        checkpoint (later ones are redone)."""
        if self.ckpt_kind != "seeds":
            return
        path = self.out / "seeds.jsonl"
        if self.start == 0:
            path.unlink(missing_ok=True)  # a log without a checkpoint is redone from step 0
            names = {id(p): n for n, p in self.model.named_parameters()}
            frozen = frozen_weights(self.model, self.zo, {names[id(p)] for p in self.fo})
            header = SeedHeader.of(
                self.cfg.model or self.bundle.name,
                self.zo,
                extra={
                    "method": self.cfg.method,
                    "seed": self.cfg.seed,
                    "z": self.cfg.z,
                    "frozen_hash": weights_hash(frozen),
                },
            )
            self.seedlog = SeedLog(path, header)
        else:
            self.seedlog = SeedLog(path)
        self.seedlog.truncate_after(self.start)

    def _open_recorders(self, blocks: dict[str, list[nn.Parameter]], keep: int) -> None:
        """The recorder of the whole blocks (it owns ``smoothness.csv``, rows after step
        ``keep`` dropped) and, with ``record_blocks``, one of the per-module blocks writing
        to the same log (blocks of one probe must not overlap; the two probe the same batch
        at the same steps)."""
        cfg, bundle = self.cfg, self.bundle
        probe_fn = None
        if cfg.record_batch == "fixed":
            examples = self.splits.dev[: cfg.batch_size]
            mine, n = self._local(list(examples))
            held = bundle.encode(mine, cfg.max_length)
            probe_fn = D.sharded_loss_fn(lambda: bundle.loss(held), n, len(examples))
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
        out = self.out if self.writer else None  # every rank probes, rank 0 writes
        self.recorder = TrajectoryRecorder(blocks, out_dir=out, resume_step=keep, **kw)
        self.recorders = [self.recorder]
        if self.module_blocks:
            modules = TrajectoryRecorder(self.module_blocks, log=self.recorder.log, **kw)
            self.recorders.append(modules)
        seen = {id(p): p for r in self.recorders for ps in r.blocks.values() for p in ps}
        self.probed = list(seen.values())

    def _shard(self, items: list) -> list:
        """This rank's contiguous part of ``items`` (all of them in one process; may be
        empty under torchrun when ``len(items)`` < the number of ranks)."""
        if not self.world.distributed:
            return items
        return D.shard(items, self.world.rank, self.world.world_size)

    def _local(self, items: list) -> tuple[list, int]:
        """(what this rank computes its loss on, n_r): its shard, or for an empty shard
        (N < W) the first item as a stand-in with n_r = 0. The stand-in keeps the shard loss
        finite (a mean over no examples is nan, and 0·nan = nan) and the graph the same on
        every rank; its weight n_r/N = 0 removes it from Σ_r (n_r/N) f_r and from the
        gradients, so the sums equal one process's values."""
        mine = self._shard(items)
        if mine or not items:
            return mine, len(mine)
        return items[:1], 0

    def _batch(self, step: int) -> tuple[Any, int, int]:
        """Minibatch ``step``: this rank's shard encoded, its size n_r and the global N."""
        idx = self.sampler.batch(step)
        mine, n = self._local(list(idx))
        batch = self.bundle.encode([self.splits.train[i] for i in mine], self.cfg.max_length)
        return batch, n, len(idx)

    def _probe_fn(self, step: int) -> Callable[[], torch.Tensor]:
        """The global-batch loss of minibatch ``step`` for probes: each call all-reduces
        the value; the gradient is this rank's term (summed by ``global_gradients``)."""
        batch, n, total = self._batch(step)
        return D.sharded_loss_fn(lambda: self.bundle.loss(batch), n, total)

    def _probe(self, step: int, loss_fn: Callable[[], torch.Tensor], **info: Any) -> None:
        """Every recorder at ``step``; under torchrun the HVPs are of the global batch."""
        with D.global_gradients(self.probed):
            for rec in self.recorders:
                rec.step(
                    step,
                    loss_fn,
                    lr_base=self.engine.lr("base"),
                    lr_peft=self.engine.lr("peft"),
                    **info,
                )

    def record_start(self) -> None:
        """The recorder's probe at step 0 (on the first minibatch)."""
        self._probe(0, self._probe_fn(0), epoch=0.0, train_seconds=0.0)

    def step(self) -> None:
        """The update of step ``t + 1`` on minibatch ``t``, atomic (signals wait): the
        weights, ``t``, the step's row and its pending phases (:data:`PHASES`) change
        together. A diverged loss (:class:`Diverged`) is logged, then raised."""
        epoch, _ = self.sampler.position(self.t)
        batch, n, total = self._batch(self.t)
        loss_fn = lambda b=batch: self.bundle.loss(b)  # noqa: E731
        reduce = None
        if self.world.distributed:  # the step's 2q(+1) shard losses -> global, one collective
            reduce = lambda v: D.weighted_sum(v, n, total)  # noqa: E731
        self.weight = n / total
        with self.guard.critical():
            t = self.t
            rate = (lambda terms: self.walk.step(t, terms)) if self.walk is not None else None
            t0 = time.perf_counter()
            # one process stops within a forward of a signal; ranks finish the step together
            # (a rank leaving before the step's all-reduce would leave the others waiting)
            between = None if self.world.distributed else self.guard.stop_if_pending
            res = self.engine.step(loss_fn, reduce=reduce, zo_rate=rate, between=between)
            self.elapsed += time.perf_counter() - t0
            self.t += 1
            self.last_loss = res.loss
            self.loss_fn = D.sharded_loss_fn(loss_fn, n, total)
            self.row = {
                "step": self.t,
                "epoch": epoch,
                "loss": res.loss,
                "proj_grad": res.proj_grad if self.engine.zo_params else None,  # n/a, not nan
                # a block the method does not train has no rate: an empty cell, not 0
                "lr_base": self.engine.lr("base") if self.engine.zo_params else None,
                "lr_peft": self.engine.lr("peft") if self.engine.fo_params else None,
                "seconds": self.elapsed,
            }
            due_eval = self.t % self.cfg.eval_every == 0 or self.t == self.cfg.steps
            self.pending = (["eval"] if due_eval else []) + ["row", "probe"]
            self._check_divergence(res.loss, res.terms)
            if self.seedlog is not None and res.terms:
                self.seedlog.append(t, res.terms, self.engine.lr("base"), self.cfg.weight_decay)

    def _check_divergence(self, loss: float, terms: tuple[tuple[int, float], ...]) -> None:
        """:class:`Diverged` (step ``t``'s row logged first) when the loss diverged
        (:class:`~smoothlab.hybrid.faults.DivergenceGuard`) or an SPSA coefficient g_i/q is not
        finite (f(x ± μz) overflowed while f(x) did not). Runs before the step's seed-log
        entry is appended, so a log never holds a non-finite coefficient."""
        rates = {k: self.row[k] for k in ("lr_base", "lr_peft")}
        try:
            self.divergence.check(self.t, loss, rates)
            bad = [c for _, c in terms if not math.isfinite(c)]
            if bad:
                shown = ", ".join(f"{k} {v:g}" for k, v in rates.items())
                raise Diverged(
                    f"the SPSA coefficient became {bad[0]} at step {self.t} (the loss at "
                    f"x ± μz overflowed; {shown}); lower the learning rates (then rerun with "
                    "--restart or another --out)"
                )
        except Diverged:
            if self.metrics is not None:
                self.metrics.write(self.row)
            raise

    def evaluate(self, row: dict[str, Any]) -> None:
        """Eval and dev accuracy into ``row``; ``best.pt`` on a new best dev accuracy."""
        acc, dev = self._accuracies(self.eval_set, self.splits.dev)
        with self.guard.critical():
            row["eval_acc"], row["dev_acc"] = acc, dev
            if dev > self.best_dev:
                if self.writer:
                    tmp = self.out / "best.pt.tmp"
                    torch.save({**self._weights(), "step": self.t, "dev_acc": dev}, tmp)
                    tmp.replace(self.out / "best.pt")
                self.best_dev = dev
            if "eval" in self.pending:
                self.pending.remove("eval")

    def _accuracies(self, *sets: list) -> list[float]:
        """Accuracy on each example set; under torchrun each rank scores its shard and the
        counts of correct answers are summed (one collective for all sets)."""
        n = self.cfg.max_length
        if not self.world.distributed:
            return [self.bundle.accuracy(examples, max_length=n) for examples in sets]
        counts = []
        for examples in sets:  # a rank with an empty shard (fewer examples than ranks) adds 0
            part = self._shard(list(examples))
            acc = self.bundle.accuracy(part, max_length=n) if part else 0.0
            counts.append(round(acc * len(part)))
        totals = D.allreduce_sum(counts)
        return [c / len(examples) for c, examples in zip(totals, sets)]

    def _weights(self) -> dict[str, Any]:
        """What a checkpoint stores of the weights: the state dict (``full``) or, for
        ``seeds``, the first-order weights by name and the number of logged ZO updates."""
        if self.ckpt_kind == "full":
            return {"model": self.model.state_dict()}
        names = {id(p): n for n, p in self.model.named_parameters()}
        trained = {names[id(p)]: p.detach().clone() for p in self.fo}
        steps = self.engine.t if self.zo else 0
        out = {"trained": trained, "seed_steps": steps}
        if self.seedlog is not None:  # the writer's: the entries this checkpoint covers
            out["seeds_digest"] = log_digest(self.seedlog.path, steps)
        return out

    def log(self, row: dict[str, Any]) -> None:
        """Write ``row`` to ``metrics.csv`` (atomic with respect to signals)."""
        with self.guard.critical():
            if self.metrics is not None:
                self.metrics.write(row)
            if "row" in self.pending:
                self.pending.remove("row")

    def probe(self, loss_fn: Callable[[], torch.Tensor]) -> None:
        """Let the recorders probe step ``t`` (on ``loss_fn``'s batch: the logged loss is the
        probed batch's, like grad_norm)."""
        self._probe(self.t, loss_fn, epoch=self.row["epoch"], train_seconds=self.elapsed)

    def finish_step(self) -> None:
        """The phases of step ``t`` after its update, in order: evaluation, the row, the
        probe, then the checkpoint (if due). Each one done leaves :attr:`pending`, so an
        interrupt checkpoint knows what a resume must still do."""
        row, t = self.row, self.t
        if "eval" in self.pending:
            self.evaluate(row)
        if "row" in self.pending:
            self.log(row)
        if "probe" in self.pending:
            if self.recorders:
                loss_fn = self.loss_fn
                if loss_fn is None:  # resumed inside the step: the minibatch it saw
                    loss_fn = self._probe_fn(t - 1)
                self.probe(loss_fn)
            self.pending.remove("probe")
        if t % self.save_every == 0 or t == self.cfg.steps:
            with self.guard.critical():
                self.checkpoint()
        self.loss_fn = None
        if self.on_step:
            self.on_step(t, row)
        self._show(row)

    def checkpoint(self) -> None:
        """Save model, engine, counters and the step's pending phases atomically to
        ``checkpoint.pt`` (call it inside ``guard.critical()``); rank 0 only. A ``seeds``
        checkpoint holds the first-order weights and the count of ``seeds.jsonl`` entries
        instead of the model (the log is flushed before: its entries >= that count)."""
        if not self.writer:
            return
        tmp = self.out / "checkpoint.pt.tmp"
        torch.save(
            {
                **self._weights(),
                "checkpoint": self.ckpt_kind,
                "engine": self.engine.state_dict(),
                "step": self.t,
                "pending": list(self.pending),
                "row": self.row if self.pending else None,
                "best_dev": self.best_dev,
                "seconds": self.elapsed,
                "probe_seconds": self.probe_seconds,
                "divergence": self.divergence.state_dict(),
                "walk": self.walk.state_dict() if self.walk is not None else None,
                "extended_by": self.extended_by,
                "config": dataclasses.asdict(self.cfg),
                "data_digest": self.data_digest,
            },
            tmp,
        )
        tmp.replace(self.out / "checkpoint.pt")

    @property
    def probe_seconds(self) -> float:
        """Seconds spent probing over the whole run (resumed parts included)."""
        return self.probe_base + sum(r.probe_seconds for r in self.recorders)

    def _show(self, row: dict[str, Any]) -> None:
        if self.bar is not None:
            post = {"loss": f"{row['loss']:.4f}"}
            if "eval_acc" in row:
                post["acc"] = f"{row['eval_acc']:.3f}"
            self.bar.set_postfix(post, refresh=False)  # shown by the update: this step's
            self.bar.update(1)

    def close(self) -> None:
        """Close the bar, the metrics log and the recorder."""
        if self.bar is not None:
            self.bar.close()
        if self.metrics is not None:
            self.metrics.close()
        if self.recorder is not None:
            self.recorder.close()
        if self.seedlog is not None:
            self.seedlog.close()

    def _check_replicas(self) -> None:
        """Every rank holds the same configuration, weights and step (else a
        :class:`UsageError` naming each rank's value; a missing rank: :class:`RankFailure`)."""
        D.check_same("the configuration", json.dumps(dataclasses.asdict(self.cfg), default=str))
        D.check_same("the resumed step", str(self.start))
        D.check_same("the weights", weights_hash(self.model))

    def finish(self) -> None:
        """Write ``summary.json`` over the whole run (a no-op rerun keeps the real one)."""
        if not self.writer:
            return
        summary = {
            "method": self.cfg.method,
            "steps": self.t,
            "final_loss": final_loss(
                r["loss"] for r in read_log(self.out / "metrics.csv", METRICS, warn=False).rows
            ),
            "best_dev_acc": self.best_dev,
            "train_seconds": self.elapsed,
            "seconds_per_step": self.elapsed / self.t if self.t > 0 else math.nan,
            "probe_seconds": self.probe_seconds,
            "peak_memory_mb": _peak_memory_mb(self.bundle.device),
            "lr_base_last": self.engine.lr("base"),
            "walk_budget_spent": (
                self.walk.spent / self.walk.budget if self.walk is not None else None
            ),
        }
        if self.writer and (self.t > self.start or not (self.out / "summary.json").exists()):
            write_json(self.out / "summary.json", summary, strict=True)  # nan -> null

    def run(self, *, resume: bool = True) -> Path:
        """Train to ``cfg.steps`` (from the checkpoint if ``resume``; otherwise every log of
        an earlier run in the folder is removed first); the run folder.

        The folder is locked for the run (:class:`~smoothlab.hybrid.faults.RunLock`). SIGINT and
        SIGTERM stop it as a ``KeyboardInterrupt`` (:class:`~smoothlab.hybrid.faults.Interrupted`),
        never inside an update or a write, after saving a checkpoint at the current step.
        """
        with self.guard, contextlib.ExitStack() as stack:
            with D.agreed("starting the run"):  # the lock and the logs: rank 0 sees them
                if self.writer:
                    stack.enter_context(RunLock(self.out))
                if resume:
                    self.resume()
                elif self.writer:
                    clear_run(self.out)
            if self.world.distributed:
                self._check_replicas()
            with D.agreed("opening the run folder"):  # rank 0 checks the logs' headers
                self.open()
            try:
                if self.recorders and self.start == 0:
                    self.record_start()
                if self.pending:
                    self.finish_step()
                while self.t < self.cfg.steps:
                    self.step()
                    self.finish_step()
            except KeyboardInterrupt:
                if self.t > 0:
                    with self.guard.critical():
                        self.checkpoint()
                raise
            finally:
                self.close()
            self.finish()
        return self.out


STARTOVER_INERT = frozenset({"save_every", "eval_every", "checkpoint", "device"})
"""Options that change no step of a run started over (:meth:`Trainer._check_logged_run`)."""


def _data_lines(path: Path) -> int:
    """Non-empty lines after a log's header (0 for a missing or unreadable file)."""
    try:
        with open(path, "rb") as f:
            return max(sum(1 for line in f if line.strip()) - 1, 0)
    except OSError:
        return 0


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
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UsageError(f"{path} is not a readable run config ({e})") from None
    if not isinstance(data, dict):
        raise UsageError(f"{path} is not a run config: a JSON object was expected")
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    # config.json holds the target in effect: an extension is already in ``steps``
    cfg = TrainConfig(**{k: v for k, v in data.items() if k in names} | {"extend_steps": 0})
    try:
        check_fields(cfg)  # every option as a run would accept it (the device is checked later)
    except UsageError as e:
        raise UsageError(f"{path} is damaged: {e}") from None
    return cfg
