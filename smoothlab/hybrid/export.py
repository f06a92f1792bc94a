"""Export a fine-tuned model as an ordinary Hugging Face folder.

``export(bundle_or_model, out_dir)`` writes ``config.json`` + ``model.safetensors`` (+ the
tokenizer files when a tokenizer is known), so ``AutoModelFor….from_pretrained(out_dir)``
loads the fine-tuned model with no smoothlab or peft code:

* a plain transformers model is saved as is;
* a LoRA ``PeftModel`` is merged first, ``W ← W + (α/r)·B·A`` (``merge_and_unload``), and
  the trained copy of any ``modules_to_save`` module (a SEQ_CLS head) replaces the original;
* prompt / prefix tuning cannot be folded into the weights (the virtual tokens are extra
  inputs, not a weight delta): the base model (with the trained copy of its head) is
  written to ``out_dir`` and the adapter to ``out_dir/adapter``;
  ``PeftModel.from_pretrained(base, out_dir/"adapter")`` restores the tuned model exactly,
  except for prefix tuning of an encoder (:class:`smoothlab.hybrid.encoder_prefix.EncoderPrefixModel`:
  peft refuses it, "Model does not support past key values"), which needs smoothlab's
  :func:`smoothlab.hybrid.encoder_prefix.load_encoder_prefix` (``ExportResult.loader``; the adapter
  folder holds a ``LOADING.md`` saying how).

The model is deep-copied before merging unless ``inplace=True`` (which saves one model's
memory and leaves the given PeftModel unusable afterwards).

For a run with a checkpoint of seeds the caller rebuilds the weights first: load the initial
model, :func:`smoothlab.hybrid.seedlog.replay` the log onto its ZO parameters, load the PEFT weights,
then call :func:`export`.
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from smoothlab.errors import UsageError

__all__ = ["ExportResult", "check_export_target", "export"]


@dataclass(frozen=True)
class ExportResult:
    """Where the model went: ``path`` loads with ``from_pretrained``; ``merged`` says whether
    a LoRA adapter was folded in; ``adapter_dir`` holds an unmergeable adapter, else None."""

    path: Path
    merged: bool
    adapter_dir: Path | None
    tokenizer_saved: bool
    loader: str | None = None  # what loads the adapter in adapter_dir


ENCODER_PREFIX_NOTE = """# Loading this adapter

Encoder prefix tuning: `peft.PeftModel.from_pretrained` cannot load it ("Model does not
support past key values"). Load it with smoothlab:

    from smoothlab.hybrid.models import load_model
    from smoothlab.hybrid.encoder_prefix import load_encoder_prefix
    from smoothlab.hybrid.tasks import get_task  # the task the run was trained on

    base = load_model("{base}", get_task("TASK"))
    bundle = load_encoder_prefix(base, "{adapter}")

`bundle.model` then gives the trained model's logits.
"""


def _unwrap(model_or_bundle: Any, tokenizer: Any) -> tuple[nn.Module, Any]:
    model = getattr(model_or_bundle, "model", None)
    if isinstance(model, nn.Module) and hasattr(model_or_bundle, "tokenizer"):  # a ModelBundle
        return model, tokenizer if tokenizer is not None else model_or_bundle.tokenizer
    if isinstance(model_or_bundle, nn.Module):
        return model_or_bundle, tokenizer
    raise TypeError(
        f"export expects a ModelBundle or an nn.Module, got {type(model_or_bundle).__name__}"
    )


def _base_state(peft_model: Any) -> dict[str, Any]:
    """The base model's state dict with each ``modules_to_save`` wrapper replaced by its
    trained copy (``head.modules_to_save.<adapter>.w`` → ``head.w``; ``original_module`` dropped)."""
    name = peft_model.active_adapter
    trained = f".modules_to_save.{name}."
    state = {}
    for key, value in peft_model.get_base_model().state_dict().items():
        if ".original_module." in key or (".modules_to_save." in key and trained not in key):
            continue
        state[key.replace(trained, ".")] = value
    return state


def check_export_target(
    out_dir: str | os.PathLike[str],
    *,
    overwrite: bool = False,
    flag: str = "overwrite=True (CLI: --overwrite)",
) -> Path:
    """``out_dir`` as a Path once :func:`export` may write there: not a file, and empty
    unless ``overwrite`` (else :class:`UsageError`; ``flag``: how the caller says
    overwrite, named in the message)."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise UsageError(f"export target {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise UsageError(f"export folder {out} is not empty; choose a new folder or pass {flag}")
    return out


def export(
    model_or_bundle: Any,
    out_dir: str | os.PathLike[str],
    *,
    tokenizer: Any = None,
    inplace: bool = False,
    overwrite: bool = False,
) -> ExportResult:
    """Write ``model_or_bundle`` (a ``ModelBundle``, a transformers model or a ``PeftModel``)
    to ``out_dir`` as a ``from_pretrained`` folder; see the module docstring.

    ``tokenizer`` overrides the bundle's. A non-empty ``out_dir`` is refused
    (:class:`UsageError`) unless ``overwrite``.
    """
    model, tok = _unwrap(model_or_bundle, tokenizer)
    out = check_export_target(out_dir, overwrite=overwrite)
    if not hasattr(model, "save_pretrained"):
        raise UsageError(
            f"cannot export a {type(model).__name__}: it is not a transformers or peft model"
        )
    merged, adapter_dir, state, loader = False, None, None, None
    try:
        from peft import PeftModel
    except ImportError:  # peft absent: the model cannot be a PeftModel
        PeftModel = ()  # noqa: N806
    if isinstance(model, PeftModel):
        peft_type = str(getattr(model.active_peft_config, "peft_type", "")).split(".")[-1].upper()
        if peft_type == "LORA":
            model = (model if inplace else copy.deepcopy(model)).merge_and_unload()
            merged = True
        else:  # virtual tokens: not a weight delta; keep the adapter next to the base model
            adapter_dir = out / "adapter"
            model.save_pretrained(os.fspath(adapter_dir))
            loader = "peft.PeftModel.from_pretrained"
            if type(model).__name__ == "EncoderPrefixModel":  # peft cannot load it
                loader = "smoothlab.hybrid.encoder_prefix.load_encoder_prefix"
                note = ENCODER_PREFIX_NOTE.format(base=out, adapter=adapter_dir)
                (adapter_dir / "LOADING.md").write_text(note)
            state = _base_state(model)
            model = model.get_base_model()
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(os.fspath(out), state_dict=state)
    if tok is not None:
        tok.save_pretrained(os.fspath(out))
    return ExportResult(
        path=out,
        merged=merged,
        adapter_dir=adapter_dir,
        tokenizer_saved=tok is not None,
        loader=loader,
    )
