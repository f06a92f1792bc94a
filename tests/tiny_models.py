"""Tiny random models for tests (hidden 32, 2 layers, 2 heads), with the bundled MiniLM
WordPiece tokenizer. Import them as ``from tests.tiny_models import tiny_causal_lm``.
"""

from __future__ import annotations

import os
from typing import Any

from torch import nn

from smoothlab.hybrid.models import resolve_model_path
from smoothlab.hybrid.seeding import seeded_rng

__all__ = ["tiny_bart", "tiny_causal_lm", "tiny_encoder", "tiny_t5"]


def _minilm_tokenizer() -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(resolve_model_path(None))


def _tiny_causal_config(model_type: str, ids: dict[str, Any]) -> Any:
    from transformers import GPT2Config, LlamaConfig, OPTConfig

    if model_type == "opt":
        return OPTConfig(
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
    if model_type == "gpt2":
        return GPT2Config(
            n_embd=32,
            n_layer=2,
            n_head=2,
            n_positions=512,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            **ids,
        )
    if model_type == "llama":
        return LlamaConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=2,
            max_position_embeddings=512,
            **ids,
        )
    raise ValueError(
        f"tiny model_type {model_type!r} is not supported; accepted: 'opt', 'gpt2', 'llama'"
    )


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
    from transformers import AutoModelForCausalLM

    tok = _minilm_tokenizer()
    tok.bos_token = tok.cls_token
    tok.eos_token = tok.sep_token
    ids = {
        "vocab_size": len(tok),
        "pad_token_id": tok.pad_token_id,
        "bos_token_id": tok.bos_token_id,
        "eos_token_id": tok.eos_token_id,
    }
    config = _tiny_causal_config(model_type, ids)
    with seeded_rng(seed):
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
    with seeded_rng(seed):
        model = BertForSequenceClassification(config)
    model.eval()
    if save_dir is not None:
        model.save_pretrained(os.fspath(save_dir))
        tok.save_pretrained(os.fspath(save_dir))
    return model, tok


def tiny_bart(seed: int = 0) -> nn.Module:
    """A tiny random BART (d_model 8, 2 encoder and 2 decoder layers), from a config only."""
    from transformers import BartConfig, BartForConditionalGeneration

    config = BartConfig(
        vocab_size=50,
        d_model=8,
        encoder_layers=2,
        decoder_layers=2,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=8,
        decoder_ffn_dim=8,
        max_position_embeddings=16,
    )
    with seeded_rng(seed):
        model = BartForConditionalGeneration(config)
    return model.eval()


def tiny_t5(seed: int = 0) -> nn.Module:
    """A tiny random T5 (d_model 8, 2 encoder and 2 decoder blocks), from a config only."""
    from transformers import T5Config, T5ForConditionalGeneration

    config = T5Config(
        vocab_size=50, d_model=8, d_kv=4, d_ff=8, num_layers=2, num_decoder_layers=2, num_heads=2
    )
    with seeded_rng(seed):
        model = T5ForConditionalGeneration(config)
    return model.eval()
