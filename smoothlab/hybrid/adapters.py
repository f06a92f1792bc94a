"""PEFT wiring: the PEFT-kind registry :data:`ADAPTERS` and :func:`attach_peft`.

``ADAPTERS[kind]`` is the function that attaches that kind,
``attach(bundle, options) -> ModelBundle``; its keys are the PEFT kinds the method registry
uses (:func:`smoothlab.methods.peft_kinds`). Adding a PEFT method is one
:class:`~smoothlab.methods.Method` registration plus one entry here and its attach function.

Every attach function returns a new bundle whose model has only the adapter (and, for an
encoder, its classification head) trainable; initialisation is seeded and leaves the
global RNG state as it was.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from smoothlab.errors import UsageError

from .scoring import ModelBundle
from .seeding import seeded_rng

__all__ = ["ADAPTERS", "PEFT_METHODS", "PeftOptions", "attach_peft"]

_BERT_LIKE = frozenset({"bert", "roberta", "xlm-roberta", "electra", "camembert"})


@dataclass(frozen=True)
class PeftOptions:
    """The knobs of every PEFT kind (each attach function reads the ones it uses)."""

    r: int = 16
    alpha: float = 32
    dropout: float = 0.0
    target_modules: Sequence[str] | None = None
    num_virtual_tokens: int = 10
    seed: int = 0


def _task_type(bundle: ModelBundle) -> Any:
    from peft import TaskType

    return TaskType.SEQ_CLS if bundle.kind == "encoder" else TaskType.CAUSAL_LM


def _wrap(bundle: ModelBundle, config: Any, seed: int) -> ModelBundle:
    """``get_peft_model(bundle.model, config)`` under a seeded RNG, as a new bundle."""
    from peft import get_peft_model

    with seeded_rng(seed, bundle.device):
        peft_model = get_peft_model(bundle.model, config)
    peft_model.to(bundle.device)
    return dataclasses.replace(bundle, model=peft_model)


_LORA_FALLBACK = (
    "q_lin",
    "v_lin",
    "query",
    "value",
    "q_proj",
    "v_proj",
    "query_proj",
    "value_proj",
)
"""Attention query/value layer names LoRA targets in an architecture peft has no default for."""


def _model_type(bundle: ModelBundle) -> str:
    return str(getattr(bundle.model.config, "model_type", "") or "?")


def _lora_targets(bundle: ModelBundle, given: Sequence[str] | None) -> list[str] | None:
    """The LoRA target module names: ``given``; ``["query", "value"]`` for BERT-like encoders;
    ``None`` (peft's own default) where peft knows the architecture; otherwise the names,
    among :data:`_LORA_FALLBACK`, of the model's ``nn.Linear`` layers (DistilBERT: ``q_lin``,
    ``v_lin``). An architecture with none of them is a :class:`UsageError`."""
    from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as known
    from torch import nn

    if given is not None:
        return list(given)
    model_type = _model_type(bundle)
    if model_type in _BERT_LIKE:
        return ["query", "value"]
    if model_type in known:
        return None
    found = {
        name.rsplit(".", 1)[-1]
        for name, module in bundle.model.named_modules()
        if isinstance(module, nn.Linear)
    }
    targets = [t for t in _LORA_FALLBACK if t in found]
    if not targets:
        raise UsageError(
            f"LoRA cannot find the attention layers of model {bundle.name!r} (model type "
            f"{model_type!r}): supported are the model types peft knows "
            f"({', '.join(sorted(known))}) and models whose attention query/value Linear "
            f"layers are named one of {', '.join(_LORA_FALLBACK)}"
        )
    return targets


def _attach_lora(bundle: ModelBundle, opts: PeftOptions) -> ModelBundle:
    """LoRA: ``W + (alpha/r)·B A`` with ``B = 0`` at init; targets as :func:`_lora_targets`
    picks them (peft's per-architecture defaults, ``["query", "value"]`` for BERT-like
    encoders, the query/value layers found by name otherwise)."""
    from peft import LoraConfig

    config = LoraConfig(
        task_type=_task_type(bundle),
        r=opts.r,
        lora_alpha=opts.alpha,
        lora_dropout=opts.dropout,
        target_modules=_lora_targets(bundle, opts.target_modules),
    )
    return _wrap(bundle, config, opts.seed)


def _prompt_dims(bundle: ModelBundle) -> dict[str, int]:
    """What peft's prompt learning needs from the model, read through the config's attribute
    aliases (DistilBERT's ``dim``, ``n_layers``, ``n_heads``), which peft's own lookup misses:
    ``token_dim`` is the input embedding's width, as the virtual tokens are concatenated to
    the input embeddings."""
    config = bundle.model.config
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    embedding = bundle.model.get_input_embeddings()
    dims = {
        "token_dim": getattr(embedding, "embedding_dim", None),
        "num_layers": getattr(text, "num_hidden_layers", None),
        "num_attention_heads": getattr(text, "num_attention_heads", None),
    }
    missing = [k for k, v in dims.items() if not isinstance(v, int)]
    if missing:
        raise UsageError(
            f"prompt tuning cannot read {', '.join(missing)} of model {bundle.name!r} (model "
            f"type {_model_type(bundle)!r}): supported are models with an nn.Embedding input "
            "embedding whose config names num_hidden_layers and num_attention_heads"
        )
    return dims


def _attach_prompt(bundle: ModelBundle, opts: PeftOptions) -> ModelBundle:
    """Prompt tuning: ``num_virtual_tokens`` trainable input embeddings prepended."""
    from peft import PromptTuningConfig

    config = PromptTuningConfig(
        task_type=_task_type(bundle),
        num_virtual_tokens=opts.num_virtual_tokens,
        num_transformer_submodules=1,
        **_prompt_dims(bundle),
    )
    return _wrap(bundle, config, opts.seed)


def _attach_prefix(bundle: ModelBundle, opts: PeftOptions) -> ModelBundle:
    """Prefix tuning: trainable key/value prefixes in every attention layer. Causal LMs use
    peft's ``PrefixTuningConfig``; encoders use :mod:`smoothlab.hybrid.encoder_prefix` (transformers 5
    encoders ignore the ``past_key_values`` peft's prefix tuning relies on)."""
    if bundle.kind == "encoder":
        from .encoder_prefix import attach_encoder_prefix  # imports peft at load

        return attach_encoder_prefix(bundle, opts.num_virtual_tokens, seed=opts.seed)
    from peft import PrefixTuningConfig

    config = PrefixTuningConfig(
        task_type=_task_type(bundle), num_virtual_tokens=opts.num_virtual_tokens
    )
    return _wrap(bundle, config, opts.seed)


ADAPTERS: dict[str, Callable[[ModelBundle, PeftOptions], ModelBundle]] = {
    "lora": _attach_lora,
    "prompt": _attach_prompt,
    "prefix": _attach_prefix,
}
"""PEFT kind -> attach function; the keys equal :func:`smoothlab.methods.peft_kinds`."""

PEFT_METHODS = tuple(ADAPTERS)
"""Methods accepted by :func:`attach_peft` (the keys of :data:`ADAPTERS`)."""


def attach_peft(
    bundle: ModelBundle,
    method: str,
    *,
    r: int = 16,
    alpha: float = 32,
    dropout: float = 0.0,
    target_modules: Sequence[str] | None = None,
    num_virtual_tokens: int = 10,
    seed: int = 0,
) -> ModelBundle:
    """Attach a PEFT module of kind ``method`` (a key of :data:`ADAPTERS`); return a new
    bundle around the wrapped model.

    ``"lora"`` (``W + (alpha/r)·B A``, B = 0 at init; targets default to peft's
    per-architecture defaults, ``["query", "value"]`` for BERT-like encoders, and otherwise
    the attention query/value Linear layers found by name, e.g. DistilBERT's ``q_lin``,
    ``v_lin``), ``"prompt"``
    (``num_virtual_tokens`` trainable input embeddings prepended to the sequence) or
    ``"prefix"`` (trainable key/value prefixes in every attention layer). Task type for
    peft: ``SEQ_CLS`` for encoders, whose classification head is put in ``modules_to_save``
    and stays trainable; ``CAUSAL_LM`` for causal LMs. Afterwards only the adapter (and head)
    require grad. Initialisation is seeded by ``seed``; the global RNG state is restored. The
    wrapped base model is modified in place (adapter layers injected).
    """
    from peft import PeftModel

    attach = ADAPTERS.get(method) if isinstance(method, str) else None
    if attach is None:
        raise UsageError(
            f"PEFT method {method!r} is not supported; accepted: {', '.join(ADAPTERS)}"
        )
    if isinstance(bundle.model, PeftModel):
        raise UsageError(f"model {bundle.name!r} already has a PEFT module attached")
    opts = PeftOptions(r, alpha, dropout, target_modules, num_virtual_tokens, seed)
    return attach(bundle, opts)
