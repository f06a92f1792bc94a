"""Encoder prefix tuning: attention against a float64 reference, gradients, blocks, ZO hooks,
save/reload, and (slow) learning on MiniLM + SST-2."""

from __future__ import annotations

import math
import os

import pytest
import torch

import smoothlab.hybrid.data as D
import smoothlab.hybrid.models as M
from smoothlab.blocks import make_blocks
from smoothlab.errors import UsageError
from smoothlab.hybrid.encoder_prefix import (
    EncoderPrefixModel,
    attach_encoder_prefix,
    extend_mask,
    load_encoder_prefix,
)
from smoothlab.hybrid.seeding import seeded_rng
from smoothlab.perturb import shifted
from tests.tiny_models import tiny_causal_lm, tiny_encoder

SST2 = D.get_task("sst2")
SST2_TSV = "/work/shared/data/sst2/train.tsv"
P = 3  # virtual tokens in the tiny tests
STEPS, LR = 60, 300.0  # the MiniLM run: SGD steps of batch 16 on the prefix, rate


def _tiny_bert(impl: str, seed: int = 0) -> torch.nn.Module:
    """A float64 2-layer BERT (hidden 8, 2 heads) with weights large enough to matter."""
    from transformers import BertConfig, BertForSequenceClassification

    cfg = BertConfig(
        vocab_size=40,
        hidden_size=8,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=16,
        max_position_embeddings=16,
        num_labels=2,
        initializer_range=0.5,
        attn_implementation=impl,
    )
    with seeded_rng(seed):
        model = BertForSequenceClassification(cfg)
    return model.double().eval()


def _reference_attention(
    sa: torch.nn.Module, hs: torch.Tensor, mask: torch.Tensor, pk: torch.Tensor, pv: torch.Tensor
) -> torch.Tensor:
    """softmax(Q [pk; K]^T / sqrt(d) + [0; m]) [pv; V] per head, heads concatenated."""
    B, T, D_ = hs.shape
    H = sa.num_attention_heads
    d = D_ // H

    def heads(lin: torch.nn.Linear) -> torch.Tensor:
        return (hs @ lin.weight.T + lin.bias).view(B, T, H, d).transpose(1, 2)

    q, k, v = heads(sa.query), heads(sa.key), heads(sa.value)
    k_full = torch.cat([pk.expand(B, -1, -1, -1), k], dim=2)
    v_full = torch.cat([pv.expand(B, -1, -1, -1), v], dim=2)
    visible = torch.cat([torch.ones(B, pk.shape[-2], dtype=torch.bool), mask.bool()], dim=1)
    add = torch.zeros(visible.shape, dtype=torch.float64).masked_fill(~visible, -math.inf)
    scores = q @ k_full.transpose(-1, -2) / math.sqrt(d) + add[:, None, None, :]
    return (scores.softmax(-1) @ v_full).transpose(1, 2).reshape(B, T, D_)


def _capture_attention(model: torch.nn.Module) -> tuple[list, list]:
    """Record (layer, input hidden states, output) of every self-attention."""
    seen: list = []
    handles = []
    for i, layer in enumerate(model.bert.encoder.layer):

        def hook(mod, args, kwargs, out, i=i):  # noqa: ANN001, ANN202
            hs = args[0] if args else kwargs["hidden_states"]
            seen.append((i, hs.detach(), out[0].detach()))

        handles.append(layer.attention.self.register_forward_hook(hook, with_kwargs=True))
    return seen, handles


IDS = torch.tensor([[2, 5, 7, 9, 3], [2, 11, 3, 0, 0], [2, 4, 6, 3, 0]])
MASK = (IDS > 0).long()


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_prefixed_attention_matches_float64_reference(impl: str) -> None:
    base = _tiny_bert(impl)
    model = EncoderPrefixModel(base, _prefix_config()).double()
    assert base.config._attn_implementation == impl
    seen, handles = _capture_attention(base)
    with torch.no_grad():
        model(input_ids=IDS, attention_mask=MASK)
        kv = model.prefix_key_values()
    for h in handles:
        h.remove()
    assert kv.shape == (2, 2, 2, P, 4) and [s[0] for s in seen] == [0, 1]
    for i, hs, out in seen:
        sa = base.bert.encoder.layer[i].attention.self
        ref = _reference_attention(sa, hs, MASK, kv[i, 0], kv[i, 1])
        torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
        # the prefix is not a no-op: attention without it is far from the output
        plain = _reference_attention(sa, hs, MASK, kv[i, 0][:, :0], kv[i, 1][:, :0])
        assert (plain - out).abs().max() > 1e-2


def test_eager_and_sdpa_agree_and_prefix_changes_logits() -> None:
    logits = {}
    for impl in ("eager", "sdpa"):
        with seeded_rng(1):
            model = EncoderPrefixModel(_tiny_bert(impl), _prefix_config()).double()
        with torch.no_grad():
            logits[impl] = model(input_ids=IDS, attention_mask=MASK).logits
            plain = model.get_base_model()(input_ids=IDS, attention_mask=MASK).logits
        assert (logits[impl] - plain).abs().max() > 1e-3
    torch.testing.assert_close(logits["eager"], logits["sdpa"], rtol=1e-10, atol=1e-12)


def test_extend_mask() -> None:
    b = torch.tensor([[[[True, False]]]])
    assert extend_mask(b, 2).tolist() == [[[[True, True, True, False]]]]
    f = torch.tensor([[[[0.0, -1e9]]]])
    assert extend_mask(f, 1).tolist() == [[[[0.0, 0.0, -1e9]]]]
    assert extend_mask(None, 3) is None
    with pytest.raises(TypeError, match="int64"):
        extend_mask(torch.zeros(1, 1, 1, 2, dtype=torch.long), 1)


def _prefix_config():  # noqa: ANN202
    from peft import PrefixTuningConfig, TaskType

    return PrefixTuningConfig(task_type=TaskType.SEQ_CLS, num_virtual_tokens=P)


# --------------------------------------------------------------------------- bundles


def _tiny_bundle(seed: int = 0) -> M.ModelBundle:
    model, tok = tiny_encoder(seed=seed)
    return M.ModelBundle(
        model=model,
        tokenizer=tok,
        task=SST2,
        kind="encoder",
        device=torch.device("cpu"),
        name="tiny",
    )


EXAMPLES = D.synthetic_sentiment(6, seed=0)


def _peft_names(model: torch.nn.Module) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


def test_gradients_reach_prefix_and_head_only_and_blocks_split() -> None:
    state = torch.get_rng_state()
    bundle = attach_encoder_prefix(_tiny_bundle(), P, seed=0)
    assert torch.equal(state, torch.get_rng_state()), "attach touched the global RNG"
    model = bundle.model.eval()
    prefix = model.prompt_encoder["default"].embedding.weight
    assert prefix.shape == (P, 2 * 2 * 32)
    assert _peft_names(model) == {
        "prompt_encoder.default.embedding.weight",
        "base_model.classifier.modules_to_save.default.weight",
        "base_model.classifier.modules_to_save.default.bias",
    }
    batch = bundle.encode(EXAMPLES)
    assert batch.inputs["attention_mask"].min() == 0, "want a padded batch"
    bundle.loss(batch).backward()
    for name, p in model.named_parameters():
        if name in _peft_names(model):
            assert p.grad is not None and p.grad.abs().max() > 0, name
        else:
            assert p.grad is None, f"base parameter {name} got a gradient"

    blocks = make_blocks(model, "hybrid")
    assert set(blocks) == {"base", "peft"}
    assert {id(p) for p in blocks["peft"]} == {
        id(p) for n, p in model.named_parameters() if n in _peft_names(model)
    }
    base_ids = {id(p) for p in model.get_base_model().bert.parameters()}
    assert base_ids <= {id(p) for p in blocks["base"]}
    split = make_blocks(model, "hybrid-split")
    assert [id(p) for p in split["peft"]] == [id(prefix)] and len(split["head"]) == 2


def test_seeded_init_and_bad_arguments() -> None:
    a = attach_encoder_prefix(_tiny_bundle(), P, seed=0).model
    b = attach_encoder_prefix(_tiny_bundle(), P, seed=0).model
    c = attach_encoder_prefix(_tiny_bundle(), P, seed=1).model
    w = [m.prompt_encoder["default"].embedding.weight for m in (a, b, c)]
    assert torch.equal(w[0], w[1]) and not torch.equal(w[0], w[2])
    with pytest.raises(UsageError, match="num_virtual_tokens=0"):
        attach_encoder_prefix(_tiny_bundle(), 0)
    with pytest.raises(UsageError, match="already has a PEFT module"):
        attach_encoder_prefix(M.ModelBundle(**{**_tiny_bundle().__dict__, "model": a}), P)
    lm, tok = tiny_causal_lm("opt")
    causal = M.ModelBundle(lm, tok, SST2, "causal", torch.device("cpu"), "tiny-opt")
    with pytest.raises(UsageError, match="needs an encoder model"):
        attach_encoder_prefix(causal, P)
    odd = _tiny_bundle()
    odd.model.config._attn_implementation = "flex_attention"
    with pytest.raises(UsageError, match="flex_attention"):
        attach_encoder_prefix(odd, P)


def test_zo_forward_hooks_coexist_with_the_prefix_hooks() -> None:
    """shifted(root=model) (forward pre-hooks) equals an exact .data swap, for the prefix
    and for a base weight, while the prefix hooks are active."""
    bundle = attach_encoder_prefix(_tiny_bundle(), P, seed=0)
    model = bundle.model.eval()
    batch = bundle.encode(EXAMPLES)
    with torch.no_grad():  # logits of order 1, so that shifts show in the loss
        model.get_base_model().classifier.modules_to_save["default"].weight.mul_(300.0)
    prefix = model.prompt_encoder["default"].embedding.weight
    query = model.get_base_model().bert.encoder.layer[0].attention.self.query.weight
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        f0 = bundle.loss(batch)
        for param in (prefix, query):
            direction = [torch.randn(param.shape, generator=gen)]
            with shifted([param], direction, 0.5, root=model):
                hooked = bundle.loss(batch)
            with shifted([param], direction, 0.5):
                swapped = bundle.loss(batch)
            assert abs(float(hooked - f0)) > 1e-2, "the shift did not reach the loss"
            torch.testing.assert_close(hooked, swapped, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(bundle.loss(batch), f0, rtol=0, atol=0)


def test_save_and_reload_round_trip(tmp_path) -> None:  # noqa: ANN001
    bundle = attach_encoder_prefix(_tiny_bundle(), P, seed=0)
    model = bundle.model.eval()
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():  # move the adapter away from anything a fresh attach could give
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=gen))
    batch = bundle.encode(EXAMPLES)
    with torch.no_grad():
        want = bundle.logits(batch)
    model.save_pretrained(os.fspath(tmp_path))

    loaded = load_encoder_prefix(_tiny_bundle(), tmp_path)
    assert isinstance(loaded.model, EncoderPrefixModel)
    assert not any(p.requires_grad for p in loaded.model.parameters())
    loaded.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded.logits(batch), want, rtol=0, atol=1e-6)
    fresh = dict(loaded.model.named_parameters())
    for name, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(fresh[name], p, rtol=0, atol=0)

    trainable = load_encoder_prefix(_tiny_bundle(), tmp_path, is_trainable=True)
    assert _peft_names(trainable.model) == _peft_names(model)
    with pytest.raises(UsageError, match="cannot read a peft adapter"):
        load_encoder_prefix(_tiny_bundle(), tmp_path / "missing")


# --------------------------------------------------------------------------- MiniLM + SST-2


@pytest.mark.slow
def test_minilm_sst2_prefix_learns() -> None:
    """Plain SGD on the prefix alone (head frozen, so only the prefix can lower the loss) over
    4 batches of 16 real SST-2 training sentences, cycled: their loss goes down.

    The prefix gradient is small per coordinate (~1e-5 at init: a fresh head of scale 0.02),
    hence the large SGD rate.
    """
    from smoothlab.hybrid.engine import HybridEngine

    task, splits = D.load_task_data(SST2.name, SST2_TSV, train=64, eval=16, dev=16, seed=0)
    bundle = attach_encoder_prefix(M.load_model(None, task, seed=0), 10, seed=0)
    model = bundle.model.eval()
    prefix = model.prompt_encoder["default"].embedding.weight
    head = model.get_base_model().classifier.modules_to_save["default"].weight
    start, head0 = prefix.detach().clone(), head.detach().clone()
    engine = HybridEngine(model, [], [prefix], lr_zo=0.0, lr_fo=LR)
    head.requires_grad_(False)
    batches = [bundle.encode(splits.train[16 * k : 16 * (k + 1)]) for k in range(4)]

    def train_loss() -> float:
        with torch.no_grad():
            return sum(float(bundle.loss(b)) for b in batches) / len(batches)

    curve = [train_loss()]
    for t in range(STEPS):
        batch = batches[t % len(batches)]
        engine.step(lambda batch=batch: bundle.loss(batch))
        if (t + 1) % 10 == 0:
            curve.append(train_loss())
    print("training loss every 10 steps:", [round(x, 4) for x in curve])
    assert torch.equal(head, head0) and not torch.equal(prefix, start)
    assert curve[-1] < curve[0] - 0.03, curve
    assert min(curve[1:]) < curve[0], curve
