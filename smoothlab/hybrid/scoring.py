"""Option scoring: tokenised batches and the :class:`ModelBundle` that turns examples into
option scores and a loss.

Every task reduces to scoring ``C`` options per example (see :mod:`smoothlab.hybrid.tasks`). A
:class:`ModelBundle` turns a batch of examples into option scores ``s ∈ R^{B×C}`` and the
loss is the mean cross-entropy over options,

.. math::

    f = -\\frac{1}{B} \\sum_{b=1}^{B} \\log \\operatorname{softmax}(s_b)_{y_b}.

* ``"encoder"`` (BERT-like): a sequence-classification head. Classification: ``num_labels =
  C`` and ``s_b`` is the head's output. Multiple choice: ``num_labels = 1``; every (context,
  candidate) pair is scored and the ``B·C`` scores are reshaped to ``[B, C]``.
* ``"causal"`` (OPT, GPT-2, Llama, ...): MeZO-style scoring. With prompt ``p = task.prompt(x)``
  and option tokens ``o_1..o_m`` (a label word for classification, a candidate for multiple
  choice), ``s_{b,i} = Σ_j log p_θ(o_j | p, o_{<j})``.

Tokenisation happens once in :meth:`ModelBundle.encode`; the returned :class:`Batch` is reused
by every forward pass (a zeroth-order estimate evaluates the same batch several times).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from smoothlab.errors import UsageError

from .tasks import Example, Task

__all__ = ["Batch", "ModelBundle"]

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
    truncated: int = 0  # examples cut to max_length (an encoder's: those that reached it)

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
            truncated=self.truncated,
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


def _fit_context(
    ctx: list[int], opt: list[int], head: int, max_length: int, option: str
) -> list[int]:
    """The context's last tokens that fit before the whole option in ``max_length`` (with
    ``head`` start tokens). An option that does not fit whole is refused: cut, two options
    may share what is left (e.g. only their first token) and score alike."""
    need = len(opt) + max(head, 1)  # with no start token, one context token must stay
    if need > max_length:
        raise UsageError(
            f"max_length={max_length} cuts option {option!r} ({len(opt)} tokens), and a cut "
            f"option may score like another: give max_length >= {need}"
        )
    room = max_length - len(opt) - head
    return ctx[len(ctx) - room :] if room < len(ctx) else ctx


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

        Encoder: ``[B, T]`` (classification: ``text`` and ``text_pair`` as a pair, with a
        target ``word`` (WiC) leading the first as ``"{word}: {text}"``) or the flattened
        (context, candidate) pairs ``[B·C, T]`` (multiple choice), truncated to ``max_length``. Causal: for each
        (example, option) the sequence ``[bos] + context + continuation`` (``Task.scoring_pairs``:
        context = prompt and continuation = option, unless the task scores partially) with
        the context left-truncated so the sequence fits in ``max_length``, right-padded, ``[B·C, T]``.
        """
        if not examples:
            raise ValueError("examples is empty; encode needs at least one Example")
        if max_length < 2:
            raise UsageError(f"max_length={max_length} is too small; accepted: >= 2")
        batch = self._encode(examples, max_length)
        self._check_positions(batch.inputs["input_ids"].shape[1], max_length)
        return batch.to(self.device)

    def position_limit(self) -> int | None:
        """The most positions the model embeds (``max_position_embeddings`` or
        ``n_positions``, and the tokenizer's ``model_max_length`` where it sets one)."""
        cfg = getattr(self.model, "config", None)
        limits = [getattr(cfg, k, None) for k in ("max_position_embeddings", "n_positions")]
        limits.append(getattr(self.tokenizer, "model_max_length", None))
        limits = [v for v in limits if isinstance(v, int) and 0 < v < 10**7]
        return min(limits) if limits else None

    def prepended_tokens(self) -> int:
        """Positions a PEFT module adds before the text: prompt tuning's virtual tokens, and
        prefix tuning's on a causal model (an encoder prefix has no positions)."""
        for c in (getattr(self.model, "peft_config", None) or {}).values():
            kind = str(getattr(c, "peft_type", ""))
            if kind.endswith("PROMPT_TUNING") or (
                kind.endswith("PREFIX_TUNING") and self.kind == "causal"
            ):
                return int(getattr(c, "num_virtual_tokens", 0) or 0)
        return 0

    def _check_positions(self, width: int, max_length: int) -> None:
        limit, extra = self.position_limit(), self.prepended_tokens()
        if limit is not None and width + extra > limit:
            plus = f" + {extra} virtual" if extra else ""
            raise UsageError(
                f"a batch is {width}{plus} tokens long, more than model {self.name!r} embeds "
                f"({limit} positions): give max_length <= {limit - extra} (got {max_length})"
            )

    def count_truncated(self, examples: Sequence[Example], max_length: int) -> int:
        """How many of ``examples`` :meth:`encode` cuts to ``max_length`` (for an encoder,
        those that reach it), tokenised in chunks of 256."""
        return sum(
            self._encode(examples[i : i + 256], max_length).truncated
            for i in range(0, len(examples), 256)
        )

    def truncation_note(
        self, examples: Sequence[Example], max_length: int, what: str, *, cut: int | None = None
    ) -> str:
        """One line for the user when :meth:`encode` cuts some of ``examples`` (``what``
        names them, e.g. "training examples"); empty when it cuts none. ``cut``: the count
        when the caller has it (an encoded batch's ``truncated``), else it is counted."""
        n = self.count_truncated(examples, max_length) if cut is None else cut
        if not n:
            return ""
        limit = self.position_limit()
        room = None if limit is None else limit - self.prepended_tokens()
        hint = (
            f"the model embeds at most {room}"
            if room is not None and max_length >= room
            else "raise --max-length to keep more" + (f", up to {room}" if room else "")
        )
        return (
            f"note: {n} of {len(examples)} {what} reach max_length {max_length} tokens and "
            f"are cut ({hint})"
        )

    def _encode(self, examples: Sequence[Example], max_length: int) -> Batch:
        labels = _check_labels(self.task, examples)
        if self.kind == "causal":
            return self._encode_causal(examples, max_length, labels)
        try:
            return self._encode_encoder(examples, max_length, labels)
        except Exception as exc:  # the tokenizers library raises a bare Exception
            if type(exc) is not Exception:
                raise
            raise UsageError(
                f"cannot fit the texts into max_length={max_length} tokens ({exc}): raise it"
            ) from exc

    def _encode_encoder(
        self, examples: Sequence[Example], max_length: int, labels: torch.Tensor
    ) -> Batch:
        tok = self.tokenizer
        if self.task.kind == "classification":
            # a target word (WiC) leads the first text: the encoder must see which word
            texts = [ex.text if ex.word is None else f"{ex.word}: {ex.text}" for ex in examples]
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
        full = (inputs["attention_mask"].sum(1) >= max_length).view(len(examples), -1)
        return Batch(
            inputs=inputs,
            labels=labels,
            num_options=self.task.num_options,
            truncated=int(full.any(1).sum()),
        )

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
        cut = 0
        for ex in examples:
            was_cut = False
            for context, option, sep in _scoring_pairs(self.task, ex):
                ctx, opt = self._option_ids(context, option, sep)
                head = [bos] if bos is not None else []
                if not head and not ctx:
                    head = [tok.eos_token_id if tok.eos_token_id is not None else pad]
                whole = len(ctx)
                ctx = _fit_context(ctx, opt, len(head), max_length, option)
                was_cut |= len(ctx) < whole
                seqs.append(head + ctx + opt)
                masks.append([False] * (len(head) + len(ctx)) + [True] * len(opt))
            cut += was_cut
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
            truncated=cut,
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
