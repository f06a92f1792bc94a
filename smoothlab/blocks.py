"""Parameter blocks: ``dict[str, list[Parameter]]`` built from a model by names.

A block's smoothness is the norm of its diagonal Hessian block ∇²_bb f. Blocks must not
overlap (a parameter belongs to at most one block). Presets:

* ``base``/``peft`` (alias ``hybrid``): every parameter a ``peft`` adapter added — LoRA
  matrices and other tuner-layer weights, prompt/prefix encoders, ``modules_to_save`` copies —
  is ``peft``; every other parameter is ``base``.
  peft's inactive ``original_module`` copies (which no forward reads) are left out.
* ``hybrid-split``: as ``hybrid``, with a trained head (peft's ``modules_to_save``, e.g. a
  classifier) split from the adapter into its own block ``head``: ``base``/``peft``/``head``.
* ``layers``: one block per transformer layer (``layer.0``, ``layer.1``, ...), plus
  ``embeddings`` and ``other`` for what lies outside the layers. A model with several
  layer stacks (an encoder-decoder such as BART or T5) names each layer by its stack:
  ``encoder.layer.0``, ..., ``decoder.layer.0``, ..., so that no block merges two layers.
* ``kinds``: ``attention``, ``mlp``, ``embeddings``, ``norm``, ``other`` (names matched
  case-insensitively; T5's ``SelfAttention``/``EncDecAttention``, ``DenseReluDense`` and
  the ``shared`` embedding included).
* ``all``: one block with every parameter.

Custom blocks: ``{"name": "glob-or-regex", ...}``; a pattern is a regex when prefixed with
``re:``, else a shell glob (``*`` spans dots) matched against the full parameter name.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterable, Mapping

import torch
from torch import nn

from .errors import UsageError

Blocks = dict[str, list[nn.Parameter]]

PRESETS = ("hybrid", "base-peft", "hybrid-split", "layers", "kinds", "all")

_LAYER_RE = re.compile(r"(?:^|\.)(?:layer|layers|h|block|blocks)\.(\d+)\.")
_I = re.IGNORECASE
_EMBED_RE = re.compile(
    r"embed|wte|wpe|word_embeddings|position_embeddings|token_type|(?:^|\.)shared(?:\.|$)", _I
)
_NORM_RE = re.compile(r"norm|ln_\d|ln_f|\bln\b", _I)
_ATTN_RE = re.compile(r"attn|attention|q_proj|k_proj|v_proj|o_proj|out_proj|query|key|value", _I)
_MLP_RE = re.compile(
    r"mlp|intermediate|ffn|fc1|fc2|fc_in|fc_out|gate_proj|up_proj|down_proj|c_fc|densereludense",
    _I,
)


def _named(
    model: nn.Module, trainable_only: bool = False, aliases: bool = False
) -> list[tuple[str, nn.Parameter]]:
    """``(name, parameter)`` pairs; with ``aliases``, a shared (tied) parameter under each name."""
    out = []
    for name, p in model.named_parameters(remove_duplicate=not aliases):
        if trainable_only and not p.requires_grad:
            continue
        out.append((name, p))
    return out


def peft_parameter_names(model: nn.Module) -> set[str]:
    """Names of parameters that a ``peft`` adapter added (duck-typed; peft is not imported).

    A parameter is ``peft`` when it lives under a tuner layer's adapter sub-module (the
    attribute names listed in ``adapter_layer_names``/``other_param_names`` of peft's
    ``BaseTunerLayer``: ``lora_A``, ``lora_B``, ``lora_embedding_A``, ...), under a
    ``prompt_encoder``, or under a ``modules_to_save`` copy.
    """
    names: set[str] = set()
    for mod_name, module in model.named_modules():
        prefix = f"{mod_name}." if mod_name else ""
        adapter_attrs = tuple(getattr(module, "adapter_layer_names", ()))
        for attr in adapter_attrs:
            sub = getattr(module, attr, None)
            if isinstance(sub, nn.Module):
                names.update(f"{prefix}{attr}.{n}" for n, _ in sub.named_parameters())
            elif isinstance(sub, nn.ParameterDict | dict):
                names.update(f"{prefix}{attr}.{n}" for n in sub)
        last = mod_name.rsplit(".", 1)[-1]
        if last in ("prompt_encoder", "modules_to_save"):
            names.update(f"{prefix}{n}" for n, _ in module.named_parameters())
    return names


def _kind(name: str) -> str:
    if _EMBED_RE.search(name):
        return "embeddings"
    if _NORM_RE.search(name):
        return "norm"
    if _ATTN_RE.search(name):
        return "attention"
    if _MLP_RE.search(name):
        return "mlp"
    if _LAYER_RE.search(name) and re.search(r"\.output\.dense\.", name):
        return "mlp"  # BERT: layer.N.output.dense is the MLP's second matrix
    return "other"


def _layer_groups(named: list[tuple[str, nn.Parameter]]) -> Blocks:
    """Preset ``layers``: parameter ``...<stack>.layer.N.…`` goes to block ``layer.N``.

    The stack is the name before the layer index (``bert.encoder``, ``model.decoder``,
    ``encoder``). With one stack the block is ``layer.N``; with several (encoder-decoder
    models), ``<label>.layer.N``, the label being the stack's last name component
    (``encoder``/``decoder``), or its whole name when those collide. Order: embeddings,
    then the layers stack by stack (in order of appearance) and index, then ``other``.
    """
    stacks: dict[str, None] = {}
    where: list[tuple[str, int] | None] = []
    for n, _ in named:
        m = _LAYER_RE.search(n)
        where.append((n[: m.start()], int(m.group(1))) if m else None)
        if m:
            stacks.setdefault(n[: m.start()], None)
    last = {s: s.rsplit(".", 1)[-1] for s in stacks}
    label = last if len(set(last.values())) == len(last) else {s: s for s in stacks}
    groups: dict[str, list[nn.Parameter]] = {}
    order: dict[str, tuple] = {}
    for (n, p), w in zip(named, where, strict=True):
        if w is None:
            key = "embeddings" if _EMBED_RE.search(n) else "other"
            order[key] = (0,) if key == "embeddings" else (2,)
        else:
            stack, i = w
            prefix = f"{label[stack]}." if len(stacks) > 1 and label[stack] else ""
            key = f"{prefix}layer.{i}"
            order[key] = (1, list(stacks).index(stack), i)
        groups.setdefault(key, []).append(p)
    return {k: groups[k] for k in sorted(groups, key=lambda k: order[k])}


def _compile(pattern: str) -> re.Pattern[str]:
    if pattern.startswith("re:"):
        try:
            return re.compile(pattern[3:])
        except re.error as e:
            raise UsageError(f"invalid regex {pattern!r}: {e}") from None
    return re.compile(fnmatch.translate(pattern))


def _peft_blocks(
    model: nn.Module, spec: str, named: list[tuple[str, nn.Parameter]], all_names: list[str]
) -> Blocks:
    """Presets ``hybrid``/``base-peft``/``hybrid-split``: base vs peft adapter (vs saved head)."""
    groups: dict[str, list[tuple[str, nn.Parameter]]] = {}
    peft_names = peft_parameter_names(model)
    if not peft_names & set(all_names):
        raise UsageError(
            "preset 'hybrid' (base/peft) found no peft adapter parameters in "
            f"{type(model).__name__}; attach a PEFT module first (e.g. --peft lora). "
            f"Parameters examined: {_preview(all_names)}"
        )
    for n, p in named:
        if ".original_module." in n:
            continue
        if n not in peft_names:
            key = "base"
        elif spec == "hybrid-split" and ".modules_to_save." in f".{n}":
            key = "head"
        else:
            key = "peft"
        groups.setdefault(key, []).append((n, p))
    return {k: [p for _, p in groups[k]] for k in ("base", "peft", "head") if k in groups}


def _preset_blocks(
    model: nn.Module, spec: str, named: list[tuple[str, nn.Parameter]], all_names: list[str]
) -> Blocks:
    """Blocks of a preset name (see :data:`PRESETS`)."""
    if spec in ("hybrid", "base-peft", "hybrid-split"):
        return _peft_blocks(model, spec, named, all_names)
    groups: dict[str, list[tuple[str, nn.Parameter]]] = {}
    if spec == "layers":
        return _layer_groups(named)
    if spec == "kinds":
        for n, p in named:
            groups.setdefault(_kind(n), []).append((n, p))
        return {k: [p for _, p in v] for k, v in groups.items()}
    if spec == "all":
        return {"all": [p for _, p in named]}
    raise UsageError(
        f"unknown block preset {spec!r}; accepted: {', '.join(PRESETS)}, "
        "or a mapping of block name to glob/regex patterns"
    )


def _patterns_of(block: str, patterns: object) -> list[str]:
    """The pattern list of ``block``: one string or a non-empty iterable of non-empty strings."""
    pats = [patterns] if isinstance(patterns, str) else patterns
    if isinstance(pats, Iterable) and not isinstance(pats, bytes | Mapping):
        pats = list(pats)
        if pats and all(isinstance(p, str) and p for p in pats):
            return pats
    raise UsageError(
        f"block {block!r}: {patterns!r} is not a pattern; accepted: a non-empty glob or "
        "re:REGEX string, or a non-empty list of them"
    )


def _pattern_blocks(
    spec: Mapping[str, str | Iterable[str]], named: list[tuple[str, nn.Parameter]]
) -> Blocks:
    """Blocks of a mapping block name -> glob/regex pattern(s); no overlaps, no empty pattern.

    ``named`` lists every name of every parameter (a tied weight under each of its names);
    a block holds each matched parameter once, and a parameter in two blocks (under any of
    its names) is an overlap.
    """
    all_names = [n for n, _ in named]
    blocks: Blocks = {}
    owner: dict[int, tuple[str, str]] = {}
    for block, patterns in spec.items():
        if not isinstance(block, str) or not block.strip():
            raise UsageError(
                f"block names must be non-empty strings, got {block!r} (patterns {patterns!r})"
            )
        chosen = []
        for pat in _patterns_of(block, patterns):
            rx = _compile(pat)
            hits = [(n, p) for n, p in named if rx.fullmatch(n)]
            if not hits:
                raise UsageError(
                    f"block {block!r}: pattern {pat!r} matches no parameter. "
                    f"Parameters examined ({len(all_names)}): {_preview(all_names)}"
                )
            chosen.extend(hits)
        for n, p in chosen:
            if id(p) in owner and owner[id(p)][0] != block:
                b0, n0 = owner[id(p)]
                same = "" if n0 == n else f" (as {n0!r}; the two names share one tensor)"
                raise UsageError(
                    f"blocks overlap: parameter {n!r} is in both {b0!r}{same} and {block!r}"
                )
            owner.setdefault(id(p), (block, n))
        seen: set[int] = set()
        blocks[block] = [p for _, p in chosen if not (id(p) in seen or seen.add(id(p)))]
    return blocks


def make_blocks(
    model: nn.Module,
    spec: str | Mapping[str, str | Iterable[str]] = "hybrid",
    *,
    trainable_only: bool = False,
) -> Blocks:
    """Build blocks from ``model`` by a preset name or by name patterns.

    ``spec``: one of :data:`PRESETS`, or a mapping block name -> pattern(s) (glob, or regex
    with a ``re:`` prefix). ``trainable_only`` keeps only ``requires_grad`` parameters.
    Patterns are matched against every name of a parameter, a tied weight's alias
    included (``head.weight`` tied to ``emb.weight``). Raises ``UsageError`` (a
    ValueError) for an empty mapping, an empty or non-string pattern, a pattern that
    matches nothing (listing the parameter names examined) or overlapping blocks.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    named = _named(model, trainable_only)
    if not named:
        raise UsageError(f"model {type(model).__name__} has no parameters to put in blocks")
    all_names = [n for n, _ in named]

    if isinstance(spec, str):
        return _preset_blocks(model, spec, named, all_names)
    if not isinstance(spec, Mapping):
        raise TypeError(
            f"blocks spec must be a preset name ({', '.join(PRESETS)}) or a mapping of block "
            f"name to glob/regex patterns, got {type(spec).__name__} {spec!r}"
        )
    if not spec:
        raise UsageError(
            "blocks spec is an empty mapping; give at least one block NAME -> pattern(s), "
            f"or a preset name ({', '.join(PRESETS)})"
        )
    return _pattern_blocks(spec, _named(model, trainable_only, aliases=True))


def parse_blocks_arg(text: str) -> str | dict[str, str]:
    """Parse the CLI form: a preset name, or ``name=pattern[,name=pattern...]``."""
    text = text.strip()
    if "=" not in text:
        return text
    out: dict[str, str] = {}
    for item in text.split(","):
        if "=" not in item:
            raise UsageError(f"bad --blocks item {item!r}; expected NAME=PATTERN or a preset")
        k, v = (x.strip() for x in item.split("=", 1))
        if not k:
            raise UsageError(f"bad --blocks item {item!r}: empty block name; expected NAME=PATTERN")
        if not v:
            raise UsageError(f"bad --blocks item {item!r}: empty pattern; expected NAME=PATTERN")
        if k in out:
            raise UsageError(
                f"--blocks names block {k!r} twice ({k}={out[k]} and {k}={v}); give each block one "
                "name, or one name with a regex alternative (re:a|b)"
            )
        out[k] = v
    return out


def check_blocks(blocks: Mapping[str, list[torch.Tensor]]) -> None:
    """Validate the ``blocks`` contract: non-empty lists of tensors, no parameter twice."""
    if not isinstance(blocks, Mapping) or not blocks:
        raise TypeError(
            f"blocks must be a non-empty dict[str, list[Parameter]], got {type(blocks).__name__}"
        )
    owner: dict[int, str] = {}
    for name, params in blocks.items():
        if not isinstance(name, str) or not name.strip():
            raise UsageError(f"block names must be non-empty strings, got {name!r}")
        if isinstance(params, torch.Tensor) or not isinstance(params, list | tuple) or not params:
            raise TypeError(
                f"block {name!r} must be a non-empty list of parameters, got {type(params).__name__}"
            )
        for i, p in enumerate(params):
            if not isinstance(p, torch.Tensor):
                raise TypeError(
                    f"block {name!r} holds a {type(p).__name__}, expected torch parameters"
                )
            if id(p) in owner:
                where = (
                    f"twice in block {name!r}"
                    if owner[id(p)] == name
                    else f"in both {owner[id(p)]!r} and {name!r}"
                )
                raise UsageError(
                    f"blocks overlap: a parameter of shape {tuple(p.shape)} (entry {i} of {name!r}) is "
                    f"{where}; each parameter may appear once (it would be counted twice)"
                )
            owner[id(p)] = name


def block_sizes(blocks: Mapping[str, list[torch.Tensor]]) -> dict[str, int]:
    """Number of scalar parameters d_b per block."""
    return {k: sum(p.numel() for p in v) for k, v in blocks.items()}


def _preview(names: list[str], k: int = 12) -> str:
    shown = ", ".join(names[:k])
    return shown + (f", ... ({len(names) - k} more)" if len(names) > k else "")
