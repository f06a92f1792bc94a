"""Prefix tuning for encoders (BERT-like): learned key/value prefixes inside self-attention.

peft's prefix tuning hands its prefixes to the base model as ``past_key_values``, which
transformers 5 encoders do not accept. Here the prefixes live where peft keeps them (the
``prompt_encoder`` of a ``PeftModelForSequenceClassification`` with a ``PrefixTuningConfig``,
so ``save_pretrained``/``load_adapter`` and the ``base``/``peft`` parameter split work as for
any peft adapter) and a forward pre-hook on every self-attention module prepends them.

With ``P`` virtual tokens, layer ``l`` and head ``h`` get ``K_h^l ∈ R^{P×d}`` and
``V_h^l ∈ R^{P×d}``; for queries ``Q``, keys ``K`` and values ``V`` of the ``T`` real tokens
and the padding mask ``m ∈ {0, -∞}^T``,

.. math::

    \\operatorname{Attn}(Q, K, V) = \\operatorname{softmax}\\Big(
        \\frac{Q [K_h^l; K]^\\top}{\\sqrt{d}} + [0_P; m]\\Big) [V_h^l; V],

i.e. every query attends to the ``P`` prefix positions, which are never masked and carry no
position embedding. The real tokens keep their positions ``0..T-1`` and their own mask.

The prefix reaches attention through BERT's own cache hook (``cache.update(K, V)`` returns the
keys/values to attend over), so the eager and sdpa attention functions both see
``[K_h^l; K]``, ``[V_h^l; V]`` and the mask extended by ``P`` columns. The prefix tensor is
read by running the ``prompt_encoder`` forward once per model forward, so forward pre-hooks
on its embedding (e.g. :func:`smoothlab.perturb.shifted` with ``root``) see it shifted.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import os
from collections.abc import Iterator
from typing import Any

import torch
from peft import PeftModelForSequenceClassification, PrefixTuningConfig, TaskType
from torch import nn

from smoothlab.errors import UsageError
from smoothlab.hybrid.scoring import ModelBundle
from smoothlab.hybrid.seeding import seeded_rng

__all__ = [
    "SUPPORTED_ATTENTION",
    "EncoderPrefixModel",
    "attach_encoder_prefix",
    "load_encoder_prefix",
]

SUPPORTED_ATTENTION = ("eager", "sdpa")
"""``config._attn_implementation`` values whose attention reads the prepended keys/values."""


class _PrefixCache:
    """Duck-typed cache for one layer: ``update(K, V)`` returns ``([K_p; K], [V_p; V])``.

    ``k``/``v``: ``[H, P, d]``, broadcast over the batch; ``K``/``V``: ``[B, H, T, d]``.
    """

    def __init__(self, k: torch.Tensor, v: torch.Tensor) -> None:
        self.k, self.v = k, v

    def update(
        self, key: torch.Tensor, value: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        b = key.shape[0]
        pk = self.k.to(key.dtype).unsqueeze(0).expand(b, -1, -1, -1)
        pv = self.v.to(value.dtype).unsqueeze(0).expand(b, -1, -1, -1)
        return torch.cat([pk, key], dim=2), torch.cat([pv, value], dim=2)


def extend_mask(mask: torch.Tensor | None, num_virtual_tokens: int) -> torch.Tensor | None:
    """Prepend ``P`` always-visible key columns to a 4-D attention mask ``[B, 1, Tq, Tk]``.

    Boolean masks (true = attend, sdpa) get ``True`` columns, additive float masks (eager)
    get ``0`` columns; ``None`` (nothing masked) stays ``None``.
    """
    if mask is None:
        return None
    pad_shape = (*mask.shape[:-1], num_virtual_tokens)
    if mask.dtype == torch.bool:
        cols = torch.ones(pad_shape, dtype=torch.bool, device=mask.device)
    elif mask.is_floating_point():
        cols = torch.zeros(pad_shape, dtype=mask.dtype, device=mask.device)
    else:
        raise TypeError(
            f"attention mask of dtype {mask.dtype} is not supported; accepted: bool or floating"
        )
    return torch.cat([cols, mask], dim=-1)


@dataclasses.dataclass
class _PrefixState:
    """The prefix of the forward in progress, ``[L, 2, H, P, d]`` (``None`` outside one)."""

    kv: torch.Tensor | None = None


def _prefix_pre_hook(state: _PrefixState, layer: int):  # noqa: ANN202 - a hook closure
    def hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        kv = state.kv
        if kv is None:
            return None
        if kwargs.get("cache") is not None:
            raise RuntimeError(
                f"encoder prefix tuning got a key/value cache in layer {layer}; prefixes are "
                "only supported for full-sequence encoder forwards (no cache)"
            )
        kwargs = dict(kwargs)
        kwargs["cache"] = _PrefixCache(kv[layer, 0], kv[layer, 1])
        if "attention_mask" in kwargs or len(args) < 2:
            kwargs["attention_mask"] = extend_mask(kwargs.get("attention_mask"), kv.shape[3])
        else:
            args = (args[0], extend_mask(args[1], kv.shape[3]), *args[2:])
        return args, kwargs

    return hook


def _self_attention_modules(model: nn.Module) -> list[nn.Module]:
    """``layer.attention.self`` of every encoder layer (BERT/RoBERTa/ELECTRA layout)."""
    backbone = getattr(model, "base_model", model)
    layers = getattr(getattr(backbone, "encoder", None), "layer", None)
    model_type = getattr(getattr(model, "config", None), "model_type", "?")
    if layers is None:
        raise UsageError(
            f"encoder prefix tuning needs a BERT-like encoder (model.encoder.layer[i]."
            f"attention.self); model type {model_type!r} has no such layers"
        )
    mods = []
    for i, layer in enumerate(layers):
        attn = getattr(getattr(layer, "attention", None), "self", None)
        if attn is None or "cache" not in inspect.signature(attn.forward).parameters:
            raise UsageError(
                f"encoder prefix tuning: layer {i} of model type {model_type!r} has no "
                "self-attention taking a key/value cache (layer.attention.self(cache=...)); "
                "accepted: BERT-like encoders of transformers 5"
            )
        mods.append(attn)
    return mods


def _check_attention(config: Any) -> None:
    impl = getattr(config, "_attn_implementation", None) or "eager"
    if impl not in SUPPORTED_ATTENTION:
        raise UsageError(
            f"encoder prefix tuning does not support attention implementation {impl!r}; "
            f"accepted: {', '.join(SUPPORTED_ATTENTION)}"
        )


class EncoderPrefixModel(PeftModelForSequenceClassification):
    """A peft sequence-classification model whose prefix tuning works on BERT-like encoders.

    Built like ``PeftModelForSequenceClassification(model, PrefixTuningConfig(...))``: the
    prefixes are ``prompt_encoder[adapter].embedding.weight`` ``∈ R^{P × 2·L·D}`` (peft's
    layout: row ``p`` holds, for layer ``l``, the key ``[2l]`` then the value ``[2l+1]``, each
    ``D = H·d`` split into heads), the classifier is a ``modules_to_save`` copy, and the
    base model is frozen. :meth:`forward` runs the base model on the unchanged inputs while
    the attention pre-hooks prepend the prefixes (see the module docstring).
    """

    def __init__(self, model: nn.Module, peft_config: PrefixTuningConfig, **kwargs: Any) -> None:
        if not isinstance(peft_config, PrefixTuningConfig) or peft_config.prefix_projection:
            raise UsageError(
                f"EncoderPrefixModel needs a PrefixTuningConfig without prefix_projection, got "
                f"{type(peft_config).__name__}"
                f"{' with prefix_projection=True' if getattr(peft_config, 'prefix_projection', False) else ''}"
            )
        _check_attention(model.config)
        attn = _self_attention_modules(model)
        super().__init__(model, peft_config, **kwargs)
        cfg = self.peft_config[self.active_adapter]
        if cfg.num_layers != len(attn) or cfg.num_transformer_submodules != 1:
            raise UsageError(
                f"prefix config has num_layers={cfg.num_layers}, num_transformer_submodules="
                f"{cfg.num_transformer_submodules}; model {model.config.model_type!r} has "
                f"{len(attn)} self-attention layers (accepted: num_layers={len(attn)}, 1 submodule)"
            )
        self._prefix_state = _PrefixState()
        self._prefix_hooks = [
            m.register_forward_pre_hook(_prefix_pre_hook(self._prefix_state, i), with_kwargs=True)
            for i, m in enumerate(attn)
        ]

    def prefix_key_values(self) -> torch.Tensor:
        """The active adapter's prefixes, ``[L, 2, H, P, d]`` (``[:, 0]`` keys, ``[:, 1]`` values).

        Computed by the ``prompt_encoder`` forward (so hooks on its embedding fire).
        """
        cfg = self.active_peft_config
        encoder = self.prompt_encoder[self.active_adapter]
        p = cfg.num_virtual_tokens
        tokens = self.prompt_tokens[self.active_adapter][:p].unsqueeze(0)
        flat = encoder(tokens.to(encoder.embedding.weight.device))[0]
        h = cfg.num_attention_heads
        kv = flat.view(p, cfg.num_layers, 2, h, cfg.token_dim // h)
        return kv.permute(1, 2, 3, 0, 4)

    @contextlib.contextmanager
    def prefix_active(self) -> Iterator[None]:
        """Inside the context, the base model's self-attention layers use the prefixes."""
        _check_attention(self.get_base_model().config)
        self._prefix_state.kv = self.prefix_key_values()
        try:
            yield
        finally:
            self._prefix_state.kv = None

    def forward(  # type: ignore[override]
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        task_ids: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> Any:
        """The base model's forward on the unchanged inputs, with the prefixes in attention."""
        kwargs = {k: v for k, v in kwargs.items() if k not in self.special_peft_forward_args}
        with self.prefix_active():
            return self.get_base_model()(
                input_ids=input_ids,
                attention_mask=attention_mask,
                inputs_embeds=inputs_embeds,
                labels=labels,
                output_attentions=output_attentions,
                output_hidden_states=output_hidden_states,
                return_dict=return_dict,
                **kwargs,
            )


def _check_bundle(bundle: ModelBundle) -> None:
    from peft import PeftModel

    if bundle.kind != "encoder":
        raise UsageError(
            f"encoder prefix tuning needs an encoder model; {bundle.name!r} is {bundle.kind!r} "
            "(causal LMs use peft's own prefix tuning: attach_peft(bundle, 'prefix'))"
        )
    if isinstance(bundle.model, PeftModel):
        raise UsageError(f"model {bundle.name!r} already has a PEFT module attached")


def attach_encoder_prefix(
    bundle: ModelBundle, num_virtual_tokens: int, *, seed: int = 0
) -> ModelBundle:
    """Prefix-tune an encoder bundle: a new bundle around an :class:`EncoderPrefixModel`.

    ``num_virtual_tokens`` = ``P`` prefix positions per layer. Trainable afterwards: the
    prefixes ``prompt_encoder.default.embedding.weight`` (``[P, 2·L·D]``, drawn ``N(0, 1)``
    as peft's ``nn.Embedding`` does, under ``seed``; the global RNG is restored) and the
    classifier's ``modules_to_save`` copy; the base model is frozen. The bundle's
    ``loss``/``encode``/``accuracy`` work unchanged (inputs are not lengthened). Save with
    ``bundle.model.save_pretrained(dir)``, reload with :func:`load_encoder_prefix`.
    """
    if isinstance(num_virtual_tokens, bool) or not isinstance(num_virtual_tokens, int):
        raise UsageError(f"num_virtual_tokens={num_virtual_tokens!r}; accepted: an integer >= 1")
    if num_virtual_tokens < 1:
        raise UsageError(f"num_virtual_tokens={num_virtual_tokens}; accepted: an integer >= 1")
    _check_bundle(bundle)
    cfg = PrefixTuningConfig(task_type=TaskType.SEQ_CLS, num_virtual_tokens=num_virtual_tokens)
    with seeded_rng(seed, bundle.device):
        model = EncoderPrefixModel(bundle.model, cfg)
    model.to(bundle.device)
    return dataclasses.replace(bundle, model=model)


def load_encoder_prefix(
    bundle: ModelBundle, path: str | os.PathLike[str], *, is_trainable: bool = False
) -> ModelBundle:
    """Load an adapter saved from an :func:`attach_encoder_prefix` bundle onto ``bundle``.

    ``bundle`` holds the same base encoder (e.g. from :func:`smoothlab.hybrid.models.load_model`);
    ``path`` is the folder written by ``save_pretrained``. With ``is_trainable`` the prefixes
    and head require grad, else the model is for inference only.
    """
    from peft import PeftConfig

    _check_bundle(bundle)
    try:
        cfg = PeftConfig.from_pretrained(os.fspath(path))
    except (OSError, ValueError) as exc:
        raise UsageError(f"cannot read a peft adapter from {os.fspath(path)!r}: {exc}") from exc
    if not isinstance(cfg, PrefixTuningConfig) or cfg.task_type != TaskType.SEQ_CLS:
        raise UsageError(
            f"adapter at {os.fspath(path)!r} is {type(cfg).__name__} ({cfg.task_type}); "
            "accepted: a SEQ_CLS PrefixTuningConfig saved from attach_encoder_prefix"
        )
    cfg.inference_mode = not is_trainable
    model = EncoderPrefixModel(bundle.model, cfg)
    model.load_adapter(os.fspath(path), adapter_name="default", is_trainable=is_trainable)
    if not is_trainable:  # peft leaves the prompt encoder trainable even in inference mode
        model.requires_grad_(False)
    model.to(bundle.device)
    return dataclasses.replace(bundle, model=model)
