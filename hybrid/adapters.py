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


def _attach_lora(bundle: ModelBundle, opts: PeftOptions) -> ModelBundle:
    """LoRA: ``W + (alpha/r)·B A`` with ``B = 0`` at init; targets default to peft's
    per-architecture defaults, ``["query", "value"]`` for BERT-like encoders."""
    from peft import LoraConfig

    targets = list(opts.target_modules) if opts.target_modules is not None else None
    if targets is None and getattr(bundle.model.config, "model_type", "") in _BERT_LIKE:
        targets = ["query", "value"]
    config = LoraConfig(
        task_type=_task_type(bundle),
        r=opts.r,
        lora_alpha=opts.alpha,
        lora_dropout=opts.dropout,
        target_modules=targets,
    )
    return _wrap(bundle, config, opts.seed)


def _attach_prompt(bundle: ModelBundle, opts: PeftOptions) -> ModelBundle:
    """Prompt tuning: ``num_virtual_tokens`` trainable input embeddings prepended."""
    from peft import PromptTuningConfig

    config = PromptTuningConfig(
        task_type=_task_type(bundle), num_virtual_tokens=opts.num_virtual_tokens
    )
    return _wrap(bundle, config, opts.seed)


def _attach_prefix(bundle: ModelBundle, opts: PeftOptions) -> ModelBundle:
    """Prefix tuning: trainable key/value prefixes in every attention layer. Causal LMs use
    peft's ``PrefixTuningConfig``; encoders use :mod:`hybrid.encoder_prefix` (transformers 5
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
    per-architecture defaults, ``["query", "value"]`` for BERT-like encoders), ``"prompt"``
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
