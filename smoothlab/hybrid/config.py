"""Run configurations: the one declaration of every option, its default and its help.

Each field carries ``metadata`` read by the ``smoothlab`` command, which generates its flags
from these dataclasses (``--lr-base`` from ``lr_base``):

- ``help``: the help text;
- ``choices``: a zero-argument callable returning the accepted values (a registry), checked
  by :func:`check_fields` and offered by the CLI;
- ``check``: ``check(name, value)`` raising :class:`~smoothlab.errors.UsageError`;
- ``flag``: the CLI flag when it is not ``--`` + the name with dashes; ``cli=False`` hides it;
- ``parse``: ``str -> value`` for the CLI when the type is not int/float/str/bool;
- ``more``: a zero-argument callable whose text the CLI appends to the help (a registry's
  descriptions, e.g. the columns each task reads).

Configs are loaded from JSON or YAML files with :func:`load_config_file` (unknown keys are a
:class:`UsageError`). This module imports no torch at load time (device checks import it
lazily), so configs can be built and validated cheaply.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from smoothlab.errors import UsageError
from smoothlab.methods import get_method, method_names, peft_kinds

__all__ = [
    "AUTO",
    "CHECKPOINTS",
    "AdviseConfig",
    "Figure1Config",
    "ModelConfig",
    "ProbeConfig",
    "TrainConfig",
    "check_fields",
    "check_out",
    "config_from_dict",
    "load_config_file",
    "resolve_device",
    "user_input",
]

MAX_SEED = 2**63 - 1
C = TypeVar("C")


# ----------------------------------------------------------------------------- checks
def positive_int(name: str, v: Any) -> None:
    """``v`` is an int >= 1 (bool excluded)."""
    if not isinstance(v, int) or isinstance(v, bool) or v < 1:
        raise UsageError(f"{name} must be a positive integer, got {v!r}")


def token_count(name: str, v: Any) -> None:
    """``v`` is an int >= 2 (a sequence needs a start token and one of text)."""
    if not isinstance(v, int) or isinstance(v, bool) or v < 2:
        raise UsageError(f"{name} must be an integer >= 2, got {v!r}")


def nonneg_int(name: str, v: Any) -> None:
    """``v`` is an int >= 0 (bool excluded)."""
    if not isinstance(v, int) or isinstance(v, bool) or v < 0:
        raise UsageError(f"{name} must be an integer >= 0, got {v!r}")


def _number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def nonneg_float(name: str, v: Any) -> None:
    """``v`` is a finite number >= 0."""
    if not (_number(v) and v >= 0):
        raise UsageError(f"{name} must be a finite number >= 0, got {v!r}")


def positive_float(name: str, v: Any) -> None:
    """``v`` is a finite number > 0."""
    if not (_number(v) and v > 0):
        raise UsageError(f"{name} must be a positive finite number, got {v!r}")


DIST_TIMEOUT_RANGE = (1.0, 7 * 24 * 3600.0)
"""Seconds a rank may wait in a collective for the others: 1 s to a week."""


def dist_timeout_seconds(name: str, v: Any) -> None:
    """``v`` is a number of seconds in :data:`DIST_TIMEOUT_RANGE` (a huge one overflows
    ``datetime.timedelta``); the one check of ``--dist-timeout`` and
    :func:`smoothlab.hybrid.distributed.init`'s ``timeout_s``."""
    lo, hi = DIST_TIMEOUT_RANGE
    if not (_number(v) and lo <= v <= hi):
        raise UsageError(
            f"{name} must be a number of seconds from {lo:g} to {hi:g} (a week), got {v!r}"
        )


def unit_interval(name: str, v: Any) -> None:
    """``v`` is a number in [0, 1]."""
    if not (_number(v) and 0 <= v <= 1):
        raise UsageError(f"{name} must be a number in [0, 1], got {v!r}")


def seed_value(name: str, v: Any) -> None:
    """``v`` is an int in [0, 2^63 - 1] (what ``torch.Generator.manual_seed`` takes)."""
    if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v <= MAX_SEED:
        raise UsageError(f"{name} must be an integer in [0, 2**63-1], got {v!r}")


def optional(check: Callable[[str, Any], None]) -> Callable[[str, Any], None]:
    """``check`` that also accepts None."""

    def run(name: str, v: Any) -> None:
        if v is not None:
            check(name, v)

    return run


def positive_floats(name: str, v: Any) -> None:
    """``v`` is a non-empty sequence of positive finite numbers."""
    if not isinstance(v, list | tuple) or not v or not all(_number(x) and x > 0 for x in v):
        raise UsageError(f"{name} must be positive numbers, got {v!r}")


def parse_floats(text: str) -> tuple[float, ...]:
    """The CLI form of a list of numbers: ``"0.5,1,2"``."""
    try:
        return tuple(float(t) for t in text.split(","))
    except ValueError:
        raise UsageError(f"expected comma-separated positive numbers, got {text!r}") from None


AUTO = "auto"
DTYPES = (AUTO, "float32", "bfloat16", "float16")
"""``dtype`` values: ``auto`` loads the weights as the checkpoint stores them."""


def torch_dtype(name: str) -> Any:
    """The torch dtype of a ``dtype`` value (None for ``auto``: the checkpoint's own)."""
    if name == AUTO:
        return None
    import torch

    return getattr(torch, name)


def parse_rate(text: str) -> float | str:
    """The CLI form of a learning rate: a number, or ``auto`` (the advisor's proposal)."""
    if text.strip().lower() == AUTO:
        return AUTO
    try:
        return float(text)
    except ValueError:
        raise UsageError(f"expected a number or 'auto', got {text!r}") from None


def rate_or_auto(name: str, v: Any) -> None:
    """``v`` is a finite number >= 0 or the string ``"auto"``."""
    if v != AUTO and not (_number(v) and v >= 0):
        raise UsageError(f"{name} must be a finite number >= 0 or 'auto', got {v!r}")


CHECKPOINTS = ("seeds", "full")


def checkpoint_kind(name: str, v: Any) -> None:
    """``v`` is None (the method's default) or one of :data:`CHECKPOINTS`."""
    if v is not None and v not in CHECKPOINTS:
        raise UsageError(f"{name} {v!r} is not accepted; accepted: {', '.join(CHECKPOINTS)}")


def device_map_spec(name: str, v: Any) -> None:
    """``v`` is None, ``"auto"``, a mapping of module names to devices, or its JSON text."""
    if v is None or v == AUTO:
        return
    mapping = v
    if isinstance(v, str):
        try:
            mapping = json.loads(v)
        except json.JSONDecodeError:
            mapping = None
    if not (
        isinstance(mapping, dict)
        and mapping
        and all(isinstance(k, str) and isinstance(d, str | int) for k, d in mapping.items())
    ):
        raise UsageError(
            f"{name} {v!r} is not accepted; accepted: 'auto' or a JSON object of module names "
            'to devices, e.g. \'{"bert.embeddings": "cuda:0", "bert.encoder": "cuda:1", "": "cuda:1"}\''
        )


RECORD_PRESETS = ("layers", "kinds")


def record_blocks_spec(name: str, v: Any) -> None:
    """``v`` is None, a preset of :data:`RECORD_PRESETS` or ``NAME=GLOB[,NAME=GLOB...]``
    (``re:REGEX`` patterns allowed; see :func:`smoothlab.blocks.make_blocks`)."""
    if v is None or v in RECORD_PRESETS:
        return
    items = str(v).split(",") if isinstance(v, str) and "=" in v else None
    if not items or any(
        "=" not in it or not it.split("=", 1)[0].strip() or not it.split("=", 1)[1].strip()
        for it in items
    ):
        raise UsageError(
            f"{name} {v!r} is not accepted; accepted: {', '.join(RECORD_PRESETS)} "
            "or NAME=GLOB[,NAME=GLOB...] (a pattern may be re:REGEX)"
        )


def _rules() -> tuple[str, ...]:
    return ("auto", "curvature", "walk", "safe", "paper")


def _z_kinds() -> tuple[str, ...]:
    from smoothlab.perturb import SOURCES

    return tuple(SOURCES)


def _z_default() -> str:
    from smoothlab.perturb import DEFAULT_SOURCE

    return DEFAULT_SOURCE


def _norms() -> tuple[str, ...]:
    from smoothlab.estimators import NORMS

    return tuple(NORMS)


def _hvps() -> tuple[str, ...]:
    from smoothlab.hvp import HVPS

    return tuple(HVPS)


def _tasks() -> tuple[str, ...]:
    from smoothlab.hybrid.data import TASKS

    return tuple(TASKS)


def _task_columns() -> str:
    """Each task and the columns its data file needs (the ``--task`` help's tail)."""
    from smoothlab.hybrid.tasks import task_help

    return task_help()


def _pefts() -> tuple[str, ...]:
    return ("none", *peft_kinds())


def opt(default: Any, help: str, **meta: Any) -> Any:
    """A dataclass field with its help and CLI metadata (see the module docstring)."""
    meta["help"] = help
    if isinstance(default, list | dict | set):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


# Options that several configs share are declared here once: one default, one help.
SHARED: dict[str, dict[str, Any]] = {
    "steps": dict(default=1000, help="training steps", check=positive_int),
    "lr_base": dict(
        default=1e-6, help="eta_x: zeroth-order rate of the base weights", check=nonneg_float
    ),
    "lr_peft": dict(
        default=1e-2,
        help="eta_y: first-order rate of the PEFT weights (all weights for fo-ft)",
        check=nonneg_float,
    ),
    "q": dict(default=1, help="SPSA perturbations per step", check=positive_int),
    "one_sided": dict(default=False, help="one-sided SPSA: (f(x+mu z) - f(x)) / mu"),
    "train_size": dict(default=1000, help="train examples sampled", check=positive_int),
    "eval_size": dict(
        default=1000, help="eval examples sampled (from --eval-data if given)", check=positive_int
    ),
    "dev_size": dict(
        default=100, help="dev examples sampled (from --dev-data if given)", check=positive_int
    ),
    "eval_data": dict(
        default=None,
        help="separate evaluation file, e.g. GLUE's validation split (default: a sample of --data)",
    ),
    "dev_data": dict(
        default=None, help="separate dev file for model selection (default: a sample of --data)"
    ),
    "eval_examples": dict(
        default=None,
        help="score only the first N eval examples at each evaluation (None: all)",
        check=optional(positive_int),
    ),
    "record_every": dict(
        default=0, help="probe L of each block every N steps (0: off)", check=nonneg_int
    ),
    "h": dict(
        default=None,
        help="finite-difference step of the probes (default: from dtype and |x_b|)",
        check=optional(positive_float),
    ),
    "vectors": dict(
        default=20, help="Lanczos iterations or random vectors per block", check=positive_int
    ),
    "record_blocks": dict(
        default=None,
        help="also record per-module blocks, x and y split alike: a preset (layers, kinds) or "
        "NAME=GLOB[,NAME=GLOB]; named base.<module> (x) and peft.<module> (y) "
        "(default: only the whole blocks base/peft/head, or model)",
        check=record_blocks_spec,
    ),
}


def shared(name: str, **over: Any) -> Any:
    """The field declared in :data:`SHARED` as ``name`` (``over``: e.g. a CLI ``flag``)."""
    spec = SHARED[name] | over
    return opt(spec.pop("default"), spec.pop("help"), **spec)


def _check_type(f: dataclasses.Field, value: Any) -> None:
    """Booleans and texts, which have no ``check`` of their own: a config file can give
    ``"false"`` for a flag (a true string, so the option was on) or ``null`` for a path."""
    ftype = str(f.type).replace(" ", "")
    if ftype == "bool" and not isinstance(value, bool):
        raise UsageError(f"{f.name} must be true or false, got {value!r}")
    if ftype in ("str", "str|None") and not (
        isinstance(value, str) or (value is None and ftype == "str|None")
    ):
        accepted = "a text or null" if ftype == "str|None" else "a text"
        raise UsageError(f"{f.name} must be {accepted}, got {value!r}")


def check_fields(cfg: Any) -> None:
    """Run every field's type check (booleans, texts), ``choices`` and ``check`` (see the
    module docstring)."""
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        _check_type(f, value)
        choices = f.metadata.get("choices")
        if choices is not None and value not in (accepted := choices()):
            raise UsageError(
                f"{f.name} {value!r} is not accepted; accepted: {', '.join(map(str, accepted))}"
            )
        check = f.metadata.get("check")
        if check is not None:
            check(f.name, value)


def resolve_device(name: str) -> str:
    """``"auto"`` -> ``"cuda"`` if available else ``"cpu"``; otherwise ``name`` itself once
    it is a device this machine has (cpu, cuda, cuda:N, mps), else :class:`UsageError`."""
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cpu":
        return name
    if name == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise UsageError(
                "device 'mps': MPS is not available on this machine (accepted here: cpu, auto)"
            )
        return name
    if isinstance(name, str) and (
        name == "cuda" or (name.startswith("cuda:") and name[5:].isdigit())
    ):
        if not torch.cuda.is_available():
            raise UsageError(
                f"device {name!r}: CUDA is not available on this machine (accepted here: cpu, auto)"
            )
        if name != "cuda" and int(name[5:]) >= torch.cuda.device_count():
            raise UsageError(
                f"device {name!r}: this machine has {torch.cuda.device_count()} CUDA device(s)"
            )
        return name
    raise UsageError(f"device {name!r} is not a device; accepted: cpu, cuda, cuda:N, mps, auto")


def check_out(path: str | Path | None, name: str = "out", *, kind: str = "dir") -> None:
    """An output path the user gave: non-empty, not under a file, and (``kind="dir"``) not
    an existing file or (``kind="file"``) not an existing folder."""
    if path is None:
        return
    if not str(path).strip():
        raise UsageError(f"{name} must not be empty")
    p = Path(path)
    if kind == "dir" and p.exists() and not p.is_dir():
        raise UsageError(f"{name} {str(path)!r} is a file; give a folder")
    if kind == "file" and p.is_dir():
        raise UsageError(f"{name} {str(path)!r} is a folder; give a file name")
    for parent in p.parents:
        if parent.exists():
            if not parent.is_dir():
                raise UsageError(f"{name} {str(path)!r} is under {str(parent)!r}, which is a file")
            break


def _coerce(f: dataclasses.Field, value: Any, where: str) -> Any:
    """Config-file values as the field expects them: YAML reads ``1e-6`` as a string and
    JSON has no tuples."""
    ftype = str(f.type)
    if isinstance(value, str) and "parse" in f.metadata:
        try:
            return f.metadata["parse"](value)
        except ValueError as e:
            raise UsageError(f"{where}: {f.name}: {e}") from None
    if isinstance(value, str) and ftype.startswith("float"):
        try:
            return float(value)
        except ValueError:
            raise UsageError(f"{where}: {f.name} must be a number, got {value!r}") from None
    if isinstance(value, list) and ftype.startswith("tuple"):
        return tuple(value)
    return value


# What smoothlab.hybrid.train writes into a run folder's config.json beside the TrainConfig fields, so
# that the file is a config file too (``train --config runs/h1/config.json --steps 4000``).
RUN_RECORD_KEYS = frozenset(
    {
        "model_name",
        "kind",
        "block_sizes",
        "num_zo_params",
        "num_fo_params",
        "versions",
        "resumed_from",
        "world_size",
        "advice",
    }
)


def config_from_dict(cls: type[C], data: Any, where: str = "config") -> C:
    """``cls(**data)``; unknown keys are a :class:`UsageError` naming them and the accepted ones.

    A run folder's ``config.json`` is accepted for a :class:`TrainConfig`: the keys of
    :data:`RUN_RECORD_KEYS` are dropped, and its ``steps`` already holds any extension."""
    if not isinstance(data, dict):
        raise UsageError(
            f"{where}: expected a mapping of option names to values, got {type(data).__name__}"
        )
    fields = {f.name: f for f in dataclasses.fields(cls)}
    if "extend_steps" in fields and "versions" in data:  # a run's record
        data = {k: v for k, v in data.items() if k not in RUN_RECORD_KEYS} | {"extend_steps": 0}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise UsageError(
            f"{where}: unknown key(s) {', '.join(map(repr, unknown))}; accepted: {', '.join(fields)}"
        )
    return cls(**{k: _coerce(fields[k], v, where) for k, v in data.items()})


def load_config_file(path: str | Path, cls: type[C]) -> C:
    """A ``cls`` from a ``.json``, ``.yaml`` or ``.yml`` file (flat mapping of field names).

    PyYAML is imported only for YAML files (it is installed as a dependency of transformers).
    """
    p = Path(path)
    if p.is_dir():
        hint = f" (a run's is {str(p / 'config.json')!r})" if (p / "config.json").is_file() else ""
        raise UsageError(
            f"config file {str(path)!r} is a folder; give a .json, .yaml or .yml file{hint}"
        )
    suffix = p.suffix.lower()
    if suffix not in (".json", ".yaml", ".yml"):
        raise UsageError(f"config file {str(path)!r}: accepted suffixes are .json, .yaml, .yml")
    try:
        text = p.read_text()
    except FileNotFoundError:
        raise UsageError(f"config file {str(path)!r}: no such file") from None
    except (IsADirectoryError, PermissionError, UnicodeDecodeError) as e:
        raise UsageError(
            f"config file {str(path)!r}: cannot read it ({type(e).__name__})"
        ) from None
    if suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise UsageError(f"config file {str(path)!r}: not valid JSON ({e})") from None
    else:
        import yaml  # lazily: PyYAML comes with transformers

        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise UsageError(
                f"config file {str(path)!r}: not valid YAML ({' '.join(str(e).split())})"
            ) from None
    return config_from_dict(cls, data, f"config file {str(path)!r}")


# ----------------------------------------------------------------------------- configs
@dataclass
class ModelConfig:
    """What loads a model and its data (shared by every subcommand)."""

    model: str | None = opt(
        None,
        "HF model name or local folder (default: the bundled all-MiniLM-L6-v2 "
        "with a fresh classification head)",
    )
    task: str = opt("sst2", "task of the data", choices=_tasks, more=_task_columns)
    data: str | None = opt(
        None,
        "local TSV/CSV/JSONL/JSON file with the columns --task names "
        "(default: the built-in synthetic sentiment set)",
    )
    batch_size: int = opt(16, "examples per minibatch (and per probe batch)", check=positive_int)
    seed: int = opt(
        0,
        "seed of the model's fresh weights, minibatches, perturbations and probes",
        check=seed_value,
    )
    device: str = opt("cpu", "cpu, cuda, cuda:N, mps or auto")
    dtype: str = opt(
        AUTO,
        "dtype of the model's weights: auto keeps the checkpoint's; a PEFT module's weights "
        "stay float32",
        choices=lambda: DTYPES,
    )
    lora_r: int = opt(16, "LoRA rank", check=positive_int)
    lora_alpha: float = opt(32.0, "LoRA scaling alpha", check=positive_float)
    num_virtual_tokens: int = opt(
        10, "prompt/prefix length", check=positive_int, flag="--virtual-tokens"
    )
    max_length: int = opt(
        128, "tokens per example (longer ones are truncated, with a note)", check=token_count
    )

    def validate(self) -> None:
        """:class:`UsageError` naming the first bad option."""
        check_fields(self)
        resolve_device(self.device)


@dataclass
class TrainConfig(ModelConfig):
    """Everything a training run needs; saved whole in ``config.json``.

    The method (:mod:`smoothlab.methods`) fixes which weights are x (SPSA, ``lr_base``) and
    y (gradients, ``lr_peft``) and the PEFT module attached.
    """

    method: str = opt(
        "hybrid-lora", "fine-tuning method (it fixes the PEFT module)", choices=method_names
    )
    steps: int = shared(
        "steps",
        help="training steps (raising it is the one change that continues a finished run)",
    )
    extend_steps: int = opt(
        0,
        "run N steps beyond the run folder's saved target (rerunning the same command after "
        "an interruption finishes that extension instead of extending again)",
        check=nonneg_int,
    )
    lr_base: float | str = shared(
        "lr_base",
        help="eta_x: zeroth-order rate of the base weights, or 'auto' (the advisor's proposal "
        "from a probe at step 0)",
        parse=parse_rate,
        check=rate_or_auto,
    )
    lr_peft: float | str = shared(
        "lr_peft",
        help="eta_y: first-order rate of the PEFT weights (all weights for fo-ft), or 'auto'",
        parse=parse_rate,
        check=rate_or_auto,
    )
    advise_rule: str = opt(
        "auto", "advisor rule for rates given as 'auto' (see smoothlab advise)", choices=_rules
    )
    advise_hvp: str = opt("fd", "HVPs of the step-0 probe for rates given as 'auto'", choices=_hvps)
    advise_vectors: int = opt(
        10, "Hutchinson vectors / Lanczos iterations of the step-0 probe", check=positive_int
    )
    lr_base_budget: bool = opt(
        True,
        "with --lr-base auto: spend the advice's random-walk cap as a budget, lowering "
        "lr_base during the run as the ZO gradient grows (smoothlab.budget)",
    )
    mu: float = opt(1e-3, "SPSA perturbation scale", check=positive_float)
    q: int = shared("q")
    one_sided: bool = shared("one_sided")
    fo_at_perturbed: bool = opt(False, "take the PEFT gradient from the first perturbed forward")
    z: str = field(  # default read from the source registry on first use (keeps import torch-free)
        default_factory=_z_default,
        metadata={"help": "ZO perturbation source (the distribution of z)", "choices": _z_kinds},
    )
    weight_decay: float = opt(
        0.0,
        "L2 weight decay lambda of both blocks (x <- (1 - eta lambda) x; y: grad + lambda y)",
        check=nonneg_float,
    )
    data_seed: int = opt(0, "seed of the train/eval/dev split", check=seed_value)
    train_size: int = shared("train_size")
    eval_size: int = shared("eval_size")
    dev_size: int = shared("dev_size")
    eval_data: str | None = shared("eval_data")
    dev_data: str | None = shared("dev_data")
    eval_every: int = opt(100, "evaluate (eval and dev accuracy) every N steps", check=positive_int)
    eval_examples: int | None = shared("eval_examples")
    save_every: int | None = opt(
        None, "checkpoint every N steps (default: --eval-every)", check=optional(positive_int)
    )
    record_every: int = shared("record_every")
    record_norm: str = opt("spectral", "norm of the recorded block Hessians", choices=_norms)
    record_hvp: str = opt("fd", "Hessian-vector products of the recorder", choices=_hvps)
    record_vectors: int = opt(10, "HVPs per recorded probe", check=positive_int)
    record_batch: str = opt(
        "fixed",
        "probe batch: a 'fixed' held-aside dev batch or the 'current' minibatch",
        choices=lambda: ("fixed", "current"),
    )
    record_h: float | None = shared("h")
    record_blocks: str | None = shared("record_blocks")
    diverge_factor: float = opt(
        10.0,
        "stop (exit 2) when the loss exceeds this multiple of the first step's loss for "
        "--diverge-patience consecutive steps (0: off; a non-finite loss always stops)",
        check=nonneg_float,
    )
    diverge_patience: int = opt(
        3, "consecutive steps above --diverge-factor x the initial loss", check=positive_int
    )
    checkpoint: str | None = opt(
        None,
        "what checkpoint.pt holds: 'seeds' (the ZO trajectory as seeds.jsonl, replayed from "
        "the initial weights, plus the PEFT weights: kilobytes) or 'full' (every weight) "
        "(default: seeds for zo-ft, full otherwise)",
        check=checkpoint_kind,
    )
    device_map: str | None = opt(
        None,
        "spread the model over devices with accelerate (pip install accelerate): 'auto', or a "
        "JSON object of module names to devices; each parameter is perturbed and updated on "
        "its own device (default: the whole model on --device)",
        check=device_map_spec,
    )
    dist_timeout: float = opt(
        600.0,
        "under torchrun: seconds (1 to 604800, a week) a rank waits in a collective for the "
        "others before it stops with a one-line rank-failure message",
        check=dist_timeout_seconds,
    )
    out: str = opt(
        "runs/run",
        "run folder (resumed if it holds a checkpoint, with the same configuration; "
        "one process at a time)",
    )
    name: str = opt("", "a label for reports")
    extra: dict = opt({}, "free-form notes saved with the config", cli=False)

    def validate(self) -> None:
        """:class:`UsageError` naming the first bad option, before anything touches disk."""
        super().validate()
        get_method(self.method)
        check_out(self.out, "out", kind="dir")
        if self.record_blocks is not None and not self.record_every:
            raise UsageError(
                f"record_blocks {self.record_blocks!r} needs record_every > 0 (the recorder is off)"
            )

    def unused_fields(self) -> frozenset[str]:
        """The options ``method`` never reads, so that no value of them changes its run:
        LoRA's rank and alpha without LoRA, the virtual tokens without prompt or prefix
        tuning, the SPSA options (μ, q, one-sided, z, η_x and its budget) without ZO
        weights, η_y without first-order weights, ``fo_at_perturbed`` unless both."""
        m = get_method(self.method)
        out: set[str] = set()
        if m.peft != "lora":
            out |= {"lora_r", "lora_alpha"}
        if m.peft not in ("prompt", "prefix"):
            out.add("num_virtual_tokens")
        if not m.has_zo:
            out |= {"mu", "q", "one_sided", "z", "lr_base", "lr_base_budget"}
        if not m.has_fo:
            out.add("lr_peft")
        if not (m.has_zo and m.has_fo):
            out.add("fo_at_perturbed")
        return frozenset(out)

    @property
    def checkpoint_kind(self) -> str:
        """``checkpoint`` resolved: a seed log where every weight is ZO (zo-ft), else full."""
        return self.checkpoint or ("seeds" if self.method == "zo-ft" else "full")

    @property
    def auto_rates(self) -> tuple[str, ...]:
        """The rate fields given as ``"auto"`` (``lr_base``, ``lr_peft``), resolved by
        :func:`smoothlab.hybrid.train.resolve_rates` before the engine is built."""
        return tuple(k for k in ("lr_base", "lr_peft") if getattr(self, k) == AUTO)


@dataclass
class ProbeConfig(ModelConfig):
    """``smoothlab probe``: per-block Hessian norms of a model's loss on one batch."""

    peft: str = opt("none", "attach a PEFT module before probing", choices=_pefts)
    blocks: str | None = opt(
        None,
        "preset (hybrid, layers, kinds, all) or NAME=GLOB[,NAME=re:REGEX] "
        "(default: hybrid with --peft, else all)",
    )
    norm: str = opt("spectral", "norm of each block Hessian", choices=_norms)
    hvp: str = opt("exact", "Hessian-vector products", choices=_hvps)
    vectors: int = shared("vectors")
    h: float | None = shared("h")
    target_rel_stderr: float | None = opt(
        None,
        "stop a stochastic estimate once stderr/estimate is below this",
        check=optional(positive_float),
    )
    out: str | None = opt(None, "write the estimates as JSON to this file")

    def validate(self) -> None:
        """:class:`UsageError` naming the first bad option (``out`` included, before probing)."""
        super().validate()
        check_out(self.out, "out", kind="file")


@dataclass
class AdviseConfig(ModelConfig):
    """``smoothlab advise``: (eta_x, eta_y) from a probe at initialisation or a recorded run."""

    method: str = opt(
        "hybrid-lora",
        "the method to advise: x and y are the blocks it trains (with --run: the run's method)",
        choices=method_names,
    )
    run: str | None = opt(
        None, "a run folder with smoothness.csv (default: probe the model at initialisation)"
    )
    rule: str = opt(
        "auto",
        "eta_x rule: one-step curvature-aware (curvature, safe), the random-walk cap over "
        "--steps (walk), the paper's c_x/(L_x d_x) (paper), or auto (the smaller of curvature "
        "and walk when the probe gives their inputs, else paper)",
        choices=_rules,
    )
    steps: int = shared(
        "steps", help="steps of the run being advised (the walk cap grows as 1/sqrt(steps))"
    )
    hvp: str = opt("exact", "Hessian-vector products of the probe", choices=_hvps)
    vectors: int = shared("vectors")
    z: str = field(
        default_factory=_z_default,
        metadata={"help": "ZO perturbation source the run will use", "choices": _z_kinds},
    )
    second_moment_samples: int = opt(
        0,
        "sampled directions for the direct estimate of E[(g'z)^2 z'Hz]/|g|^2 (0: off)",
        check=nonneg_int,
    )
    print_command: bool = opt(False, "print the smoothlab train command using the proposal")
    q: int = shared("q")
    one_sided: bool = shared("one_sided")
    quantile: float = opt(0.9, "quantile of a recorded trajectory's L", check=unit_interval)
    calibrate: bool = opt(False, "pilot runs at multiples of the proposal pick c_x, c_y on dev")
    pilot_steps: int = opt(100, "steps of each pilot run", check=positive_int)
    multipliers: tuple[float, ...] = opt(
        (0.125, 0.5, 1.0, 2.0, 8.0),
        "comma-separated multiples of the proposal tried for each rate",
        parse=parse_floats,
        check=positive_floats,
    )
    train_size: int = shared("train_size")
    eval_size: int = shared("eval_size")
    dev_size: int = shared("dev_size")
    eval_data: str | None = shared("eval_data")
    dev_data: str | None = shared("dev_data")
    out: str | None = opt(
        None, "folder for advice.json (and calibration.csv and the pilot runs), or a .json file"
    )

    def validate(self) -> None:
        """:class:`UsageError` naming the first bad option (``out`` included, before probing)."""
        super().validate()
        if self.out is not None:
            check_out(self.out, "out", kind="file" if str(self.out).endswith(".json") else "dir")

    def pilot_config(self) -> TrainConfig:
        """The run of ``method`` that the probe builds and the calibration pilots start from."""
        names = {f.name for f in dataclasses.fields(ModelConfig)} | {
            "q",
            "one_sided",
            "train_size",
            "eval_size",
            "dev_size",
            "eval_data",
            "dev_data",
            "z",
            "steps",
        }
        return TrainConfig(method=self.method, **{k: getattr(self, k) for k in names})


@dataclass
class Figure1Config(ModelConfig):
    """``smoothlab figure1``: an fo-ft run (Fig. 1a) and a hybrid-LoRA run (Fig. 1b), both
    recorded; the defaults are the quick CPU version (see :mod:`smoothlab.hybrid.presets`)."""

    steps: int = shared("steps", default=300)
    record_every: int = shared("record_every", default=30)
    vectors: int = shared("vectors", default=10, help="HVPs per probe")
    hvp: str = opt("fd", "Hessian-vector products of the probes", choices=_hvps)
    h: float | None = shared("h")
    record_blocks: str | None = shared("record_blocks")
    lr_fo: float = opt(5e-2, "rate of the full fine-tuning run (Fig. 1a)", check=positive_float)
    lr_base: float = shared("lr_base", default=1e-5)
    lr_peft: float = shared("lr_peft", default=0.3)
    eval_examples: int | None = shared("eval_examples", default=200)
    train_size: int = shared("train_size")
    eval_size: int = shared("eval_size")
    dev_size: int = shared("dev_size")
    eval_data: str | None = shared("eval_data")
    dev_data: str | None = shared("dev_data")
    out: str = opt("smoothlab-out/figure1", "output folder (runs, figures, report)")

    def validate(self) -> None:
        """:class:`UsageError` naming the first bad option."""
        super().validate()
        if self.record_every == 0:  # the figures plot the probes: refused before training
            raise UsageError(
                "record_every 0 turns the probes off, and Figure 1 plots them; give "
                f"record_every >= 1 (a probe every N steps, e.g. {max(self.steps // 10, 1)})"
            )
        check_out(self.out, "out", kind="dir")


@contextmanager
def user_input(what: str) -> Iterator[None]:
    """Errors raised while reading one thing the user named (a data file, a model, a blocks
    spec) are about that input: re-raised as :class:`UsageError` prefixed with ``what``.

    ValueError is caught too, since transformers and peft raise it for bad input (a missing
    model file, an unknown target module); OSError covers missing or unreadable files.
    """
    try:
        yield
    except UsageError:
        raise
    except (OSError, ValueError) as e:
        raise UsageError(f"{what}: {' '.join(str(e).split())}") from e
