"""Parameter blocks: presets on peft models (LoRA, prompt tuning, modules_to_save), layers,
kinds, all, custom glob and ``re:`` patterns, and the errors' messages."""

from __future__ import annotations

import os
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from fixtures import dense_hessian
from torch import nn

from smoothlab import ModelLoss, Oracle, block_sizes, make_blocks, peft_parameter_names, probe
from smoothlab.blocks import PRESETS, check_blocks, parse_blocks_arg
from smoothlab.errors import UsageError
from tests.tiny_models import tiny_bart, tiny_t5

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")


def tiny_bert(num_labels=2):
    cfg = transformers.BertConfig(
        vocab_size=40,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=16,
        num_labels=num_labels,
    )
    torch.manual_seed(0)
    return transformers.BertForSequenceClassification(cfg)


def tiny_opt():
    cfg = transformers.OPTConfig(
        vocab_size=50,
        hidden_size=16,
        num_hidden_layers=2,
        ffn_dim=32,
        num_attention_heads=2,
        max_position_embeddings=32,
        word_embed_proj_dim=16,
        init_std=0.3,
    )
    torch.manual_seed(0)
    return transformers.OPTForCausalLM(cfg)


def get_peft(model, config):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.get_peft_model(model, config)


def names_of(model, block):
    ids = {id(p) for p in block}
    return {n for n, p in model.named_parameters() if id(p) in ids}


def assert_partition(model, blocks, skip=".original_module."):
    """Every parameter in exactly one block, none twice (peft's unused original_module
    copies, which no forward reads, are left out of the hybrid presets)."""
    check_blocks(blocks)
    ids = [id(p) for ps in blocks.values() for p in ps]
    assert len(ids) == len(set(ids))
    assert set(ids) == {id(p) for n, p in model.named_parameters() if skip not in n}


@pytest.fixture(scope="module")
def lora_seq_cls():
    cfg = peft.LoraConfig(task_type=peft.TaskType.SEQ_CLS, r=2, target_modules=["query", "value"])
    return get_peft(tiny_bert(), cfg)


# --- hybrid preset -----------------------------------------------------------------------------
def test_hybrid_lora_with_modules_to_save(lora_seq_cls):
    m = lora_seq_cls
    blocks = make_blocks(m)  # "hybrid" is the default
    assert list(blocks) == ["base", "peft"]
    assert_partition(m, blocks)
    peft_names = names_of(m, blocks["peft"])
    assert peft_names == peft_parameter_names(m)
    assert len(peft_names) == 2 * 2 * 2 + 2  # lora_A/B x query/value x 2 layers + classifier copy
    assert all(".lora_A." in n or ".lora_B." in n or ".modules_to_save." in n for n in peft_names)
    assert "base_model.model.classifier.modules_to_save.default.weight" in peft_names
    base_names = names_of(m, blocks["base"])
    assert not any(".original_module." in n for n in base_names)
    assert "base_model.model.classifier.original_module.weight" in dict(m.named_parameters())
    assert (
        "base_model.model.bert.encoder.layer.0.attention.self.query.base_layer.weight" in base_names
    )
    # by default the trainable set is exactly the peft block
    assert peft_names == {n for n, p in m.named_parameters() if p.requires_grad}
    assert make_blocks(m, "base-peft").keys() == blocks.keys()
    only = make_blocks(m, "all", trainable_only=True)
    assert names_of(m, only["all"]) == peft_names
    split = make_blocks(m, "hybrid-split")
    assert list(split) == ["base", "peft", "head"]
    assert_partition(m, split)
    assert names_of(m, split["head"]) == {
        "base_model.model.classifier.modules_to_save.default.weight",
        "base_model.model.classifier.modules_to_save.default.bias",
    }
    assert names_of(m, split["peft"]) | names_of(m, split["head"]) == peft_names
    assert names_of(m, split["base"]) == base_names


def test_hybrid_prompt_tuning_causal_lm():
    m = get_peft(
        tiny_opt(), peft.PromptTuningConfig(task_type=peft.TaskType.CAUSAL_LM, num_virtual_tokens=3)
    )
    blocks = make_blocks(m, "hybrid")
    assert_partition(m, blocks)
    assert names_of(m, blocks["peft"]) == {"prompt_encoder.default.embedding.weight"}
    assert block_sizes(blocks)["peft"] == 3 * 16
    assert any("embed_tokens" in n for n in names_of(m, blocks["base"]))


def test_hybrid_plain_module_with_lora_and_no_adapter_error():
    class Small(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 4)
            self.out = nn.Linear(4, 1)

        def forward(self, x):
            return self.out(self.lin(x))

    with pytest.raises(ValueError, match=r"hybrid.*no peft adapter.*Small.*lin\.weight, lin\.bias"):
        make_blocks(Small(), "hybrid")
    m = get_peft(Small(), peft.LoraConfig(r=2, target_modules=["lin"]))
    blocks = make_blocks(m, "hybrid")
    assert_partition(m, blocks)
    assert names_of(m, blocks["peft"]) == {
        "base_model.model.lin.lora_A.default.weight",
        "base_model.model.lin.lora_B.default.weight",
    }
    assert names_of(m, blocks["base"]) == {
        "base_model.model.lin.base_layer.weight",
        "base_model.model.lin.base_layer.bias",
        "base_model.model.out.weight",
        "base_model.model.out.bias",
    }


# --- other presets -----------------------------------------------------------------------------
def test_layers_preset_bert():
    m = tiny_bert()
    blocks = make_blocks(m, "layers")
    assert list(blocks) == ["embeddings", "layer.0", "layer.1", "other"]
    assert_partition(m, blocks, skip="<none>")
    assert "bert.encoder.layer.1.output.dense.weight" in names_of(m, blocks["layer.1"])
    assert all(".layer.0." in n for n in names_of(m, blocks["layer.0"]))
    assert names_of(m, blocks["other"]) == {
        "bert.pooler.dense.weight",
        "bert.pooler.dense.bias",
        "classifier.weight",
        "classifier.bias",
    }
    assert all(n.startswith("bert.embeddings.") for n in names_of(m, blocks["embeddings"]))


def test_layers_preset_orders_numerically():
    m = nn.Module()
    m.layers = nn.ModuleList([nn.Linear(2, 2) for _ in range(11)])
    m.head = nn.Linear(2, 1)
    assert list(make_blocks(m, "layers")) == [f"layer.{i}" for i in range(11)] + ["other"]


def _stacks_of(model, blocks):
    """Block -> set of (stack, layer index) of its parameters' names."""
    import re

    rx = re.compile(r"(?:^|\.)(encoder|decoder)\.(?:layers|block)\.(\d+)\.")
    out = {}
    for k, ps in blocks.items():
        out[k] = {m.groups() for n in names_of(model, ps) if (m := rx.search(n))}
    return out


@pytest.mark.parametrize("build", [tiny_bart, tiny_t5], ids=["bart", "t5"])
def test_layers_preset_encoder_decoder(build):
    """Encoder and decoder layer i are two layers: one block each, named by their stack."""
    m = build()
    blocks = make_blocks(m, "layers")
    layers = [f"{s}.layer.{i}" for s in ("encoder", "decoder") for i in (0, 1)]
    assert [k for k in blocks if "layer." in k] == layers
    assert_partition(m, blocks, skip="<none>")
    stacks = _stacks_of(m, blocks)
    for k in layers:
        stack, _, i = k.split(".")
        assert stacks[k] == {(stack, i)}, k
    assert any(n.endswith("shared.weight") for n in names_of(m, blocks["embeddings"]))


def test_kinds_preset_t5_and_bart():
    """T5's SelfAttention/EncDecAttention, DenseReluDense and the shared embedding are sorted
    (case-insensitively), not left in ``other``."""
    t5 = tiny_t5()
    blocks = make_blocks(t5, "kinds")
    assert_partition(t5, blocks, skip="<none>")
    kinds = {k: names_of(t5, v) for k, v in blocks.items()}
    assert kinds["embeddings"] == {"shared.weight"}
    assert "other" not in kinds  # lm_head is tied to shared
    for n, _ in t5.named_parameters():
        if "Attention." in n:
            assert n in kinds["attention"], n
        elif "DenseReluDense." in n:
            assert n in kinds["mlp"], n
        elif "layer_norm" in n:
            assert n in kinds["norm"], n
    bart = tiny_bart()
    kinds = {k: names_of(bart, v) for k, v in make_blocks(bart, "kinds").items()}
    assert "model.shared.weight" in kinds["embeddings"]
    assert "model.decoder.layers.0.encoder_attn.k_proj.weight" in kinds["attention"]
    assert "model.encoder.layers.1.fc2.weight" in kinds["mlp"]


def test_kinds_preset_bert():
    m = tiny_bert()
    blocks = make_blocks(m, "kinds")
    assert set(blocks) == {"embeddings", "attention", "mlp", "norm", "other"}
    assert_partition(m, blocks, skip="<none>")
    p = "bert.encoder.layer.0."
    assert {
        p + "attention.self.query.weight",
        p + "attention.self.key.bias",
        p + "attention.output.dense.weight",
    } <= names_of(m, blocks["attention"])
    assert names_of(m, blocks["mlp"]) == {
        f"bert.encoder.layer.{i}.{s}.dense.{w}"
        for i in (0, 1)
        for s in ("intermediate", "output")
        for w in ("weight", "bias")
    }
    assert {p + "attention.output.LayerNorm.weight", p + "output.LayerNorm.bias"} <= names_of(
        m, blocks["norm"]
    )
    assert names_of(m, blocks["other"]) == {
        "bert.pooler.dense.weight",
        "bert.pooler.dense.bias",
        "classifier.weight",
        "classifier.bias",
    }


def test_all_preset():
    m = tiny_bert()
    blocks = make_blocks(m, "all")
    assert list(blocks) == ["all"] and len(blocks["all"]) == len(list(m.parameters()))
    assert block_sizes(blocks)["all"] == sum(p.numel() for p in m.parameters())


# --- custom patterns ---------------------------------------------------------------------------
def test_glob_and_regex_patterns():
    m = tiny_bert()
    blocks = make_blocks(
        m,
        {
            "q": "*.query.weight",  # * spans dots
            "ln0": [
                "bert.encoder.layer.0.*LayerNorm.weight",
                "bert.encoder.layer.0.*LayerNorm.bias",
            ],
            "cls": r"re:classifier\.(weight|bias)",
        },
    )
    assert names_of(m, blocks["q"]) == {
        f"bert.encoder.layer.{i}.attention.self.query.weight" for i in (0, 1)
    }
    assert names_of(m, blocks["ln0"]) == {
        "bert.encoder.layer.0.attention.output.LayerNorm.weight",
        "bert.encoder.layer.0.attention.output.LayerNorm.bias",
        "bert.encoder.layer.0.output.LayerNorm.weight",
        "bert.encoder.layer.0.output.LayerNorm.bias",
    }
    assert names_of(m, blocks["cls"]) == {"classifier.weight", "classifier.bias"}
    # regexes match the full name, not a substring
    with pytest.raises(ValueError, match="matches no parameter"):
        make_blocks(m, {"c": "re:classifier"})
    # one parameter matched by two patterns of the same block is listed once
    twice = make_blocks(m, {"w": ["classifier.*", "*.weight"]})["w"]
    assert len(twice) == len({id(p) for p in twice})


def test_pattern_errors():
    m = tiny_bert()
    with pytest.raises(
        ValueError,
        match=r"block 'x': pattern '\*\.nothing' matches no parameter.*"
        r"examined \(41\): bert\.embeddings\.word_embeddings\.weight",
    ):
        make_blocks(m, {"x": "*.nothing"})
    with pytest.raises(ValueError, match=r"overlap.*'classifier\.weight'.*'a'.*'b'"):
        make_blocks(m, {"a": "classifier.*", "b": "*.weight"})
    with pytest.raises(ValueError, match=r"invalid regex 're:\('"):
        make_blocks(m, {"a": "re:("})
    with pytest.raises(ValueError, match=r"unknown block preset 'layer'.*" + ", ".join(PRESETS)):
        make_blocks(m, "layer")
    with pytest.raises(UsageError, match="empty mapping.*preset name"):
        make_blocks(m, {})
    with pytest.raises(TypeError, match="preset name.*or a mapping.*got list"):
        make_blocks(m, ["classifier.*"])
    # an empty or non-string pattern is refused up front, naming the block and what is accepted
    accepted = "is not a pattern; accepted: a non-empty glob or re:REGEX string"
    for bad in ([], "", 3, None, ["classifier.*", ""], ["classifier.*", 3], b"classifier.*"):
        with pytest.raises(UsageError, match=rf"block 'a': .* {accepted}"):
            make_blocks(m, {"a": bad, "b": "bert.pooler.*"})
    with pytest.raises(ValueError, match="no parameters"):
        make_blocks(nn.ReLU(), "all")


class _Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 4)
        self.body = nn.Linear(4, 4)
        self.head = nn.Linear(4, 10, bias=False)
        self.head.weight = self.emb.weight


def test_patterns_match_tied_aliases():
    """named_parameters() lists a tied weight under its first name only; a pattern on the
    other name (head.weight) finds it, and the same tensor under two names is one parameter
    (once in a block, an overlap across blocks)."""
    m = _Tied()
    assert make_blocks(m, {"head": "head.weight"})["head"] == [m.emb.weight]
    assert make_blocks(m, {"w": ["emb.*", "head.*"]})["w"] == [m.emb.weight]
    with pytest.raises(UsageError, match=r"'head\.weight' is in both 'a' \(as 'emb\.weight'"):
        make_blocks(m, {"a": "emb.weight", "b": "head.weight"})
    with pytest.raises(UsageError, match=r"examined \(4\): emb\.weight, .*head\.weight"):
        make_blocks(m, {"a": "nothing"})
    assert list(make_blocks(m, "all")["all"]) == list(m.parameters())  # presets: once each


def test_parse_blocks_arg_and_check_blocks():
    assert parse_blocks_arg(" hybrid ") == "hybrid"
    assert parse_blocks_arg("a=*.query.*, b=re:cls.*") == {"a": "*.query.*", "b": "re:cls.*"}
    with pytest.raises(ValueError, match="'oops'"):
        parse_blocks_arg("a=x,oops")
    with pytest.raises(UsageError, match=r"block 'a' twice \(a=\*query\* and a=\*key\*\)"):
        parse_blocks_arg("a=*query*,a=*key*")
    with pytest.raises(UsageError, match=r"'=\*query\*'.*empty block name"):
        parse_blocks_arg("=*query*")
    with pytest.raises(UsageError, match=r"'a='.*empty pattern"):
        parse_blocks_arg("a=")
    with pytest.raises(UsageError, match="non-empty strings, got ''"):
        make_blocks(tiny_bert(), {"": "classifier.*"})
    p = nn.Parameter(torch.zeros(2))
    with pytest.raises(TypeError, match="non-empty dict"):
        check_blocks([p])
    with pytest.raises(TypeError, match="holds a int"):
        check_blocks({"a": [3]})
    with pytest.raises(ValueError, match=r"overlap.*shape \(2,\).*'a'.*'b'"):
        check_blocks({"a": [p], "b": [p]})
    with pytest.raises(UsageError, match=r"shape \(2,\) \(entry 1 of 'a'\) is twice in block 'a'"):
        check_blocks({"a": [p, p]})


# --- peft models through the probe (on-the-fly perturbation of adapter weights) ----------------
def _agree(model, batch, params):
    """fd, fd-central and zo on the fly agree with the exact oracle on the block's H v.

    The loss is taken in float64 from the logits (transformers computes causal-LM losses in
    float32 even for a float64 model)."""

    def compute():
        ids = batch["input_ids"]
        logits = model(input_ids=ids).logits[:, -ids.shape[1] : -1]  # drop virtual tokens
        return nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1)
        )

    loss_fn = ModelLoss(model, compute=compute)
    model.eval()
    dim = sum(p.numel() for p in params)
    v = torch.randn(dim, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    with Oracle("exact", loss_fn, params, root=model) as o:
        hv = o.hvp(v)
    hv_dense = dense_hessian(compute, params, batched=False) @ v  # ground truth, not smoothlab
    assert float((hv - hv_dense).norm()) <= 1e-9 * float(hv_dense.norm())
    assert float(hv.norm()) > 1e-3 * float(v.norm())
    for kind, tol in (("fd", 1e-4), ("fd-central", 1e-7)):
        with Oracle(kind, loss_fn, params, root=model) as o:
            assert float((o.hvp(v) - hv).norm()) <= tol * float(hv.norm()), kind
    with Oracle("zo", loss_fn, params, root=model) as o:
        assert o.quad(v) == pytest.approx(float(v @ hv), abs=1e-5 * float(hv.norm() * v.norm()))
    est = probe(loss_fn, {"b": params}, norm="trace", hvp="fd-central", num_vectors=3)["b"]
    assert est.num_hvp == 3 and abs(est.value) > 0


def test_probe_lora_on_embedding_and_prompt_tuning():
    """LoRA on an embedding keeps its weights in a ParameterDict read by the parent's forward;
    prompt tuning reads its prompt embedding in the peft wrapper. Finite differences and
    second differences on the fly must see both (they agree with the exact oracle)."""
    batch = {"input_ids": torch.tensor([[3, 7, 0, 9, 4], [2, 2, 8, 5, 6]])}
    m = get_peft(
        tiny_opt().double(),
        peft.LoraConfig(r=2, target_modules=["embed_tokens"], init_lora_weights=False),
    )
    blocks = make_blocks(m, {"emb_lora": "*lora_embedding_*"})
    assert len(blocks["emb_lora"]) == 2
    _agree(m, batch, blocks["emb_lora"])
    m = get_peft(
        tiny_opt(), peft.PromptTuningConfig(task_type=peft.TaskType.CAUSAL_LM, num_virtual_tokens=3)
    )
    m = m.double()
    blocks = make_blocks(m, "hybrid")
    _agree(m, batch, blocks["peft"])
