"""Tests for smoothlab.hybrid.models: loading, option scoring against hand computations, PEFT wiring."""

from __future__ import annotations

import importlib.abc
import importlib.util
import os
import re
import shutil
import sys
import types
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from smoothlab.errors import UsageError
from smoothlab.hybrid import adapters as A
from smoothlab.hybrid import models as M
from smoothlab.hybrid.data import Example, Task
from tests.tiny_models import tiny_causal_lm, tiny_encoder

CLS_TASK = Task(
    name="toy-sst2",
    kind="classification",
    num_options=2,
    label_words=(" terrible", " great"),
    template="{text} It was",
)
MC_TASK = Task(name="toy-copa", kind="multiple_choice", num_options=2, template="{text}")

CLS_EXAMPLES = [
    Example("a fun and moving film", 1),
    Example("boring", 0),
    Example("the plot drags on and on without any point at all", 0),
]
MC_EXAMPLES = [
    Example(
        "The man broke his toe. What was the cause?",
        1,
        candidates=(" He sang.", " He dropped a hammer."),
    ),
    Example("I poured water on the fire.", 0, candidates=(" It went out.", " It grew larger.")),
]


def _pairs(task: Task, ex: Example) -> list[tuple[str, str]]:
    """(context, continuation) per option, MeZO's convention (options carry a leading space)."""
    if callable(getattr(task, "scoring_pairs", None)):
        return task.scoring_pairs(ex)
    options = task.label_words if task.kind == "classification" else ex.candidates
    return [(task.template.format(text=ex.text), o) for o in options]


def _hand_option_scores(lm, tok, task: Task, ex: Example, prefix_embeds=None) -> torch.Tensor:
    """Σ log p(continuation tokens | [bos] + context), one sequence at a time, no padding."""
    scores = []
    for context, continuation in _pairs(task, ex):
        ctx = [tok.bos_token_id] + tok(context, add_special_tokens=False)["input_ids"]
        opt = tok(continuation, add_special_tokens=False)["input_ids"]
        ids = torch.tensor([ctx + opt])
        if prefix_embeds is None:
            logits = lm(input_ids=ids).logits[0]
        else:  # prompt tuning: virtual-token embeddings first, their logits dropped
            emb = torch.cat([prefix_embeds, lm.get_input_embeddings()(ids)], dim=1)
            logits = lm(inputs_embeds=emb).logits[0, prefix_embeds.shape[1] :]
        logp = torch.log_softmax(logits.double(), dim=-1)
        scores.append(sum(logp[len(ctx) + j - 1, t] for j, t in enumerate(opt)))
    return torch.stack(scores).float()


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("tiny")
    out = {}
    for mt in ("opt", "gpt2", "llama"):
        out[mt] = str(root / mt)
        tiny_causal_lm(mt, seed=0, save_dir=out[mt])
    out["encoder"] = str(root / "encoder")
    tiny_encoder(seed=0, save_dir=out["encoder"])
    return out


# --------------------------------------------------------------------------- encoder


def test_default_minilm_loads_with_seeded_head() -> None:
    state = torch.get_rng_state()
    a = M.load_model(None, CLS_TASK, seed=0)
    assert torch.equal(state, torch.get_rng_state()), "load_model touched the global RNG"
    b = M.load_model(M.DEFAULT_MODEL, CLS_TASK, seed=0)
    c = M.load_model(None, CLS_TASK, seed=1)
    assert a.kind == "encoder" and a.name == "minilm"
    assert a.model.config.model_type == "bert" and a.model.config.num_hidden_layers == 6
    assert a.model.classifier.weight.shape == (2, 384)
    assert torch.equal(a.model.classifier.weight, b.model.classifier.weight)
    assert not torch.equal(a.model.classifier.weight, c.model.classifier.weight)
    assert torch.all(a.model.classifier.bias == 0)
    # pretrained body loaded (not random): identical across seeds
    wa = a.model.bert.encoder.layer[0].attention.self.query.weight
    assert torch.equal(wa, c.model.bert.encoder.layer[0].attention.self.query.weight)

    a.model.eval()
    batch = a.encode(CLS_EXAMPLES)
    assert batch.labels.dtype == torch.long and batch.labels.tolist() == [1, 0, 0]
    logits = a.logits(batch)
    assert logits.shape == (3, 2)
    loss = a.loss(batch)
    assert torch.isfinite(loss)
    expected = torch.nn.functional.cross_entropy(logits, batch.labels)
    torch.testing.assert_close(loss, expected)
    loss.backward()
    assert a.model.classifier.weight.grad is not None
    assert a.model.bert.encoder.layer[0].attention.self.query.weight.grad.abs().sum() > 0
    assert a.predict(batch).shape == (3,)


def test_encoder_multiple_choice_scores_each_pair(tiny_dirs) -> None:
    bundle = M.load_model(tiny_dirs["encoder"], MC_TASK, seed=0)
    assert bundle.kind == "encoder" and bundle.model.config.num_labels == 1
    bundle.model.eval()
    batch = bundle.encode(MC_EXAMPLES)
    assert batch.inputs["input_ids"].shape[0] == 4
    logits = bundle.logits(batch)
    assert logits.shape == (2, 2)
    with torch.no_grad():
        for b, ex in enumerate(MC_EXAMPLES):
            for c, cand in enumerate(ex.candidates):
                enc = bundle.tokenizer(ex.text, cand, return_tensors="pt")
                ref = bundle.model(**enc).logits[0, 0]
                torch.testing.assert_close(logits[b, c], ref, atol=1e-5, rtol=1e-5)
    assert torch.isfinite(bundle.loss(batch))


def test_accuracy_restores_mode_and_matches_predict(tiny_dirs) -> None:
    bundle = M.load_model(tiny_dirs["encoder"], CLS_TASK, seed=3)
    bundle.model.train()
    acc = bundle.accuracy(CLS_EXAMPLES, batch_size=2)
    assert bundle.model.training
    bundle.model.eval()
    pred = bundle.predict(bundle.encode(CLS_EXAMPLES))
    expected = (pred == torch.tensor([ex.label for ex in CLS_EXAMPLES])).float().mean().item()
    assert acc == pytest.approx(expected)


# --------------------------------------------------------------------------- causal


@pytest.mark.parametrize("model_type", ["opt", "gpt2", "llama"])
def test_tiny_causal_loads_and_scores_match_hand_computation(tiny_dirs, model_type) -> None:
    path = tiny_dirs[model_type]
    bundle = M.load_model(path, CLS_TASK)
    assert bundle.kind == "causal"
    assert bundle.model.config.model_type == model_type
    bundle.model.eval()
    batch = bundle.encode(CLS_EXAMPLES)  # different lengths: right padding exercised
    assert batch.inputs["input_ids"].shape[0] == 3 * 2
    assert batch.option_mask is not None and batch.option_mask.dtype == torch.bool
    with torch.no_grad():
        scores = bundle.logits(batch)
    assert scores.shape == (3, 2)

    raw = AutoModelForCausalLM.from_pretrained(path).eval()
    tok = AutoTokenizer.from_pretrained(path)
    with torch.no_grad():
        for b, ex in enumerate(CLS_EXAMPLES):
            ref = _hand_option_scores(raw, tok, CLS_TASK, ex)
            torch.testing.assert_close(scores[b], ref, atol=1e-4, rtol=1e-4)
    assert torch.isfinite(bundle.loss(batch))


def test_causal_multiple_choice_scores_candidates(tiny_dirs) -> None:
    bundle = M.load_model(tiny_dirs["opt"], MC_TASK)
    bundle.model.eval()
    batch = bundle.encode(MC_EXAMPLES)
    raw = AutoModelForCausalLM.from_pretrained(tiny_dirs["opt"]).eval()
    with torch.no_grad():
        scores = bundle.logits(batch)
        for b, ex in enumerate(MC_EXAMPLES):
            ref = _hand_option_scores(raw, bundle.tokenizer, MC_TASK, ex)
            torch.testing.assert_close(scores[b], ref, atol=1e-4, rtol=1e-4)


def test_causal_partial_scoring_scores_the_shared_continuation(tiny_dirs) -> None:
    task = Task(name="toy-wino", kind="multiple_choice", num_options=2, template="{text}")
    ex = Example(
        "The trophy did not fit in the suitcase because",
        0,
        candidates=(" the trophy was too big.", " the suitcase was too big."),
        score_from=(11, 13),
    )
    bundle = M.load_model(tiny_dirs["llama"], task)
    bundle.model.eval()
    batch = bundle.encode([ex])
    # both options score the same words " was too big." -> same number of scored tokens
    counts = batch.option_mask.sum(dim=1).tolist()
    assert (
        counts[0]
        == counts[1]
        == len(bundle.tokenizer(" was too big.", add_special_tokens=False)["input_ids"])
    )
    raw = AutoModelForCausalLM.from_pretrained(tiny_dirs["llama"]).eval()
    with torch.no_grad():
        ref = _hand_option_scores(raw, bundle.tokenizer, task, ex)
        torch.testing.assert_close(bundle.logits(batch)[0], ref, atol=1e-4, rtol=1e-4)


def test_causal_left_truncation_keeps_bos_and_option(tiny_dirs) -> None:
    bundle = M.load_model(tiny_dirs["gpt2"], CLS_TASK)
    long_ex = Example(" ".join(["word"] * 50), 1)
    batch = bundle.encode([long_ex], max_length=8)
    ids = batch.inputs["input_ids"]
    assert ids.shape == (2, 8)
    assert torch.all(ids[:, 0] == bundle.tokenizer.bos_token_id)
    words = bundle.tokenizer.convert_tokens_to_ids(["terrible", "great"])
    assert ids[:, -1].tolist() == words
    assert batch.option_mask.sum(dim=1).tolist() == [1, 1]
    assert batch.option_mask[:, -1].all()


def test_truncation_is_counted_and_a_cut_option_is_refused(tiny_dirs) -> None:
    """encode counts the examples it cuts (the trainer and probe print one note), and a
    causal option that does not fit whole is refused: cut, two options may share what is
    left and score alike (COPA at max_length 2 kept only a shared first token)."""
    bundle = M.load_model(tiny_dirs["gpt2"], MC_TASK)
    long_ex = Example(" ".join(["word"] * 50), 0, candidates=(" yes.", " no."))
    assert bundle.encode([long_ex, MC_EXAMPLES[1]], max_length=12).truncated == 1
    note = bundle.truncation_note([long_ex, MC_EXAMPLES[1]], 12, "training examples")
    assert note.startswith("note: 1 of 2 training examples reach max_length 12 tokens")
    assert bundle.truncation_note(MC_EXAMPLES, 64, "training examples") == ""
    n = len(bundle.tokenizer(" He dropped a hammer.", add_special_tokens=False)["input_ids"])
    with pytest.raises(UsageError, match=rf"cuts option ' He dropped a hammer.' \({n} tokens\)"):
        bundle.encode(MC_EXAMPLES, max_length=n)  # n + 1 with the start token
    enc = M.load_model(tiny_dirs["encoder"], CLS_TASK)
    assert enc.encode(CLS_EXAMPLES, max_length=4).truncated == 2  # "boring" fits


@pytest.mark.parametrize("which", ["encoder", "gpt2"])
def test_sequences_beyond_the_models_positions_are_refused(tiny_dirs, which) -> None:
    """A batch longer than the position table gave a size-mismatch or index traceback deep
    in the model; it is one line naming the limit (prompt tuning's virtual tokens count)."""
    bundle = M.load_model(tiny_dirs[which], CLS_TASK)
    assert bundle.position_limit() == 512
    long_ex = Example(" ".join(["word"] * 600), 1)
    with pytest.raises(UsageError, match="more than model .* embeds \\(512 positions\\)"):
        bundle.encode([long_ex], max_length=600)
    prompt = M.attach_peft(bundle, "prompt", num_virtual_tokens=10)
    assert prompt.prepended_tokens() == 10
    with pytest.raises(UsageError, match="510 \\+ 10 virtual tokens long.*max_length <= 502"):
        prompt.encode([long_ex], max_length=510)
    assert prompt.encode([long_ex], max_length=502).truncated == 1


# --------------------------------------------------------------------------- PEFT


def _trainable(model) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


def _check_peft_forward(bundle, examples, num_options) -> None:
    batch = bundle.encode(examples)
    logits = bundle.logits(batch)
    assert logits.shape == (len(examples), num_options)
    loss = bundle.loss(batch)
    assert torch.isfinite(loss)
    loss.backward()
    grads = [p.grad for p in bundle.model.parameters() if p.requires_grad]
    assert any(g is not None and g.abs().sum() > 0 for g in grads)
    assert all(p.grad is None for p in bundle.model.parameters() if not p.requires_grad)


@pytest.mark.parametrize("method", ["lora", "prompt"])
def test_attach_peft_minilm(method) -> None:
    bundle = M.load_model(None, CLS_TASK, seed=0)
    state = torch.get_rng_state()
    pb = M.attach_peft(bundle, method, num_virtual_tokens=4, seed=0)
    assert torch.equal(state, torch.get_rng_state()), "attach_peft touched the global RNG"
    pb.model.eval()
    names = _trainable(pb.model)
    head = {n for n in names if "classifier" in n}
    assert head and all("modules_to_save" in n for n in head), head
    adapter = names - head
    if method == "lora":
        assert adapter and all("lora_" in n for n in adapter)
        layers = {n.split(".attention.self.")[1].split(".")[0] for n in adapter}
        assert layers == {"query", "value"}
        assert len(adapter) == 6 * 2 * 2  # layers × {query, value} × {A, B}
    else:
        assert adapter == {"prompt_encoder.default.embedding.weight"}
    base = {n for n, _ in pb.model.named_parameters()} - names
    assert any("word_embeddings" in n for n in base)
    _check_peft_forward(pb, CLS_EXAMPLES, 2)


def test_attach_peft_encoder_multiple_choice(tiny_dirs) -> None:
    pb = M.attach_peft(M.load_model(tiny_dirs["encoder"], MC_TASK), "lora", r=4)
    pb.model.eval()
    _check_peft_forward(pb, MC_EXAMPLES, 2)


def test_prefix_on_encoder_dispatches_to_encoder_prefix(
    tiny_dirs, monkeypatch: pytest.MonkeyPatch
) -> None:
    bundle = M.load_model(tiny_dirs["encoder"], CLS_TASK)
    calls = []

    def attach_encoder_prefix(b, num_virtual_tokens: int, seed: int = 0):
        calls.append((b, num_virtual_tokens, seed))
        return b

    fake = types.ModuleType("smoothlab.hybrid.encoder_prefix")
    fake.attach_encoder_prefix = attach_encoder_prefix
    monkeypatch.setitem(sys.modules, "smoothlab.hybrid.encoder_prefix", fake)
    assert M.attach_peft(bundle, "prefix", num_virtual_tokens=4, seed=3) is bundle
    assert calls == [(bundle, 4, 3)]


def test_prefix_on_encoder_does_not_hide_a_broken_encoder_prefix(
    tiny_dirs, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Only a missing smoothlab.hybrid.encoder_prefix means "not supported"; an import error inside it
    (a missing dependency) is a bug and propagates."""

    class Broken(importlib.abc.MetaPathFinder, importlib.abc.Loader):
        def find_spec(self, name, path, target=None):
            if name == "smoothlab.hybrid.encoder_prefix":
                return importlib.util.spec_from_loader(name, self)
            return None

        def create_module(self, spec):
            return None

        def exec_module(self, module):
            raise ModuleNotFoundError("No module named 'some_dependency'", name="some_dependency")

    bundle = M.load_model(tiny_dirs["encoder"], CLS_TASK)
    monkeypatch.delitem(sys.modules, "smoothlab.hybrid.encoder_prefix", raising=False)
    monkeypatch.setattr(sys, "meta_path", [Broken(), *sys.meta_path])
    with pytest.raises(ModuleNotFoundError, match="some_dependency"):
        M.attach_peft(bundle, "prefix")


@pytest.mark.parametrize("method", ["lora", "prompt", "prefix"])
@pytest.mark.parametrize("model_type", ["opt", "llama"])
def test_attach_peft_causal(tiny_dirs, model_type, method) -> None:
    bundle = M.load_model(tiny_dirs[model_type], CLS_TASK)
    state = torch.get_rng_state()
    pb = M.attach_peft(bundle, method, r=4, alpha=8, num_virtual_tokens=3, seed=0)
    assert torch.equal(state, torch.get_rng_state())
    pb.model.eval()
    names = _trainable(pb.model)
    if method == "lora":
        assert names and all("lora_" in n for n in names)
        assert {n.split(".")[-4] for n in names} == {"q_proj", "v_proj"}
    else:
        assert names == {"prompt_encoder.default.embedding.weight"}
    emb = pb.model.get_base_model().get_input_embeddings().weight
    assert not emb.requires_grad
    _check_peft_forward(pb, CLS_EXAMPLES, 2)

    # padding does not leak: scoring examples one at a time equals scoring them batched
    with torch.no_grad():
        together = pb.logits(pb.encode(CLS_EXAMPLES))
        alone = torch.cat([pb.logits(pb.encode([ex])) for ex in CLS_EXAMPLES])
    torch.testing.assert_close(together, alone, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("model_type", ["opt", "gpt2", "llama"])
def test_prompt_tuning_scores_slice_virtual_tokens(tiny_dirs, model_type) -> None:
    pb = M.attach_peft(
        M.load_model(tiny_dirs[model_type], CLS_TASK), "prompt", num_virtual_tokens=5
    )
    pb.model.eval()
    with torch.no_grad():
        scores = pb.logits(pb.encode(CLS_EXAMPLES))
        base = pb.model.get_base_model()
        virtual = pb.model.get_prompt(batch_size=1)
        assert virtual.shape[1] == 5
        for b, ex in enumerate(CLS_EXAMPLES):
            ref = _hand_option_scores(base, pb.tokenizer, CLS_TASK, ex, prefix_embeds=virtual)
            torch.testing.assert_close(scores[b], ref, atol=1e-4, rtol=1e-4)
            plain = _hand_option_scores(base, pb.tokenizer, CLS_TASK, ex)
            assert not torch.allclose(scores[b], plain, atol=1e-4)


def test_lora_init_is_seeded(tiny_dirs) -> None:
    def lora_a(seed: int) -> torch.Tensor:
        pb = M.attach_peft(M.load_model(tiny_dirs["opt"], CLS_TASK), "lora", r=4, seed=seed)
        return next(p for n, p in pb.model.named_parameters() if "lora_A" in n).detach().clone()

    assert torch.equal(lora_a(0), lora_a(0))
    assert not torch.equal(lora_a(0), lora_a(1))


# --------------------------------------------------------------------------- errors & helpers


def test_bad_model_name_is_a_value_error() -> None:
    name = "no-such-org/no-such-model-xyz"
    with pytest.raises(ValueError, match="no-such-org/no-such-model-xyz") as info:
        M.load_model(name, CLS_TASK)
    assert "local" in str(info.value) and "hub" in str(info.value)
    with pytest.raises(ValueError, match="/nonexistent/model/dir"):
        M.load_model("/nonexistent/model/dir", CLS_TASK)


def test_bad_peft_method_and_kind(tiny_dirs) -> None:
    bundle = M.load_model(tiny_dirs["encoder"], CLS_TASK)
    with pytest.raises(ValueError, match="'adapterx'.*lora, prompt, prefix"):
        M.attach_peft(bundle, "adapterx")
    with pytest.raises(ValueError, match="'seq2seq'.*auto, encoder, causal"):
        M.load_model(tiny_dirs["encoder"], CLS_TASK, kind="seq2seq")
    with pytest.raises(ValueError, match="tiny model_type 'bloom'"):
        tiny_causal_lm("bloom")


def test_resolve_and_detect_kind(tiny_dirs) -> None:
    from transformers import AutoConfig

    assert os.path.isdir(M.resolve_model_path(None))
    assert M.resolve_model_path("minilm") == M.resolve_model_path(None)
    assert M.resolve_model_path(tiny_dirs["opt"]) == tiny_dirs["opt"]
    assert M.resolve_model_path("facebook/opt-125m") == "facebook/opt-125m"
    assert M.detect_kind(AutoConfig.from_pretrained(M.resolve_model_path(None))) == "encoder"
    for mt in ("opt", "gpt2", "llama"):
        assert M.detect_kind(AutoConfig.from_pretrained(tiny_dirs[mt])) == "causal"


def test_tiny_builders_are_seeded_and_leave_global_rng() -> None:
    state = torch.get_rng_state()
    m0, tok = tiny_causal_lm("llama", seed=0)
    m0b, _ = tiny_causal_lm("llama", seed=0)
    m1, _ = tiny_causal_lm("llama", seed=1)
    e0, _ = tiny_encoder(seed=0)
    assert torch.equal(state, torch.get_rng_state())
    w = [m.get_input_embeddings().weight for m in (m0, m0b, m1)]
    assert torch.equal(w[0], w[1]) and not torch.equal(w[0], w[2])
    assert tok.bos_token_id == tok.cls_token_id and tok.eos_token_id == tok.sep_token_id
    assert e0.config.hidden_size == 32


# --------------------------------------------------------------------------- registries & layout


def test_adapter_registry_matches_the_method_registry() -> None:
    from smoothlab.methods import METHODS, peft_kinds

    assert tuple(A.ADAPTERS) == peft_kinds() == M.PEFT_METHODS
    for method in METHODS.values():
        assert method.peft is None or method.peft in A.ADAPTERS, method.name


def test_attach_peft_dispatches_through_the_registry(
    tiny_dirs, monkeypatch: pytest.MonkeyPatch
) -> None:
    bundle = M.load_model(tiny_dirs["encoder"], CLS_TASK)
    seen = []

    def attach_toy(b, opts):
        seen.append((b, opts))
        return b

    monkeypatch.setitem(A.ADAPTERS, "toy", attach_toy)
    assert M.attach_peft(bundle, "toy", r=3, num_virtual_tokens=7, seed=5) is bundle
    assert seen == [(bundle, A.PeftOptions(r=3, num_virtual_tokens=7, seed=5))]


def test_models_re_exports_and_tiny_models_moved() -> None:
    from smoothlab.hybrid import scoring

    assert M.ModelBundle is scoring.ModelBundle and M.Batch is scoring.Batch
    assert M.attach_peft is A.attach_peft
    assert not hasattr(M, "tiny_encoder")  # test models live in tests/, not in the package


@pytest.mark.parametrize("which", ["encoder", "opt"])
def test_truncated_safetensors_is_one_line_usage_error(tiny_dirs, tmp_path, which) -> None:
    folder = tmp_path / f"broken-{which}"
    shutil.copytree(tiny_dirs[which], folder)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(UsageError) as info:
        M.load_model(str(folder), CLS_TASK)
    msg = str(info.value)
    assert str(folder) in msg and "truncated" in msg and "\n" not in msg
    (folder / "model.safetensors").unlink()  # no weights at all: the same one line
    with pytest.raises(UsageError, match=re.escape(str(folder))):
        M.load_model(str(folder), CLS_TASK)


def test_model_errors_are_usage_errors(tiny_dirs) -> None:
    bundle = M.load_model(tiny_dirs["encoder"], CLS_TASK)
    with pytest.raises(UsageError):
        M.load_model("/nonexistent/model/dir", CLS_TASK)
    with pytest.raises(UsageError):
        M.load_model(tiny_dirs["encoder"], CLS_TASK, kind="seq2seq")
    with pytest.raises(UsageError):
        M.attach_peft(bundle, "adapterx")
    with pytest.raises(UsageError, match="already has a PEFT module"):
        M.attach_peft(M.attach_peft(bundle, "lora", r=2), "lora")


@pytest.mark.parametrize("which", ["encoder", "gpt2"])
def test_model_folder_without_tokenizer_files_is_refused(tiny_dirs, tmp_path, which) -> None:
    """Without tokenizer files transformers builds a near-empty tokenizer (a few special
    tokens): every text would be unknown tokens, training on nothing with exit 0."""
    folder = tmp_path / f"notok-{which}"
    folder.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(Path(tiny_dirs[which]) / name, folder / name)
    with pytest.raises(UsageError) as info:
        M.load_model(str(folder), CLS_TASK)
    msg = str(info.value)
    assert "lacks its tokenizer files" in msg and str(folder) in msg, msg


# --------------------------------------------------------------------------- unknown architectures


@pytest.fixture(scope="module")
def distilbert_dir(tmp_path_factory) -> str:
    """A tiny random DistilBERT (dim 32, 2 layers, 2 heads), an architecture peft has no LoRA
    default for and whose config names its sizes ``dim``/``n_layers``/``n_heads``."""
    from transformers import DistilBertConfig, DistilBertForSequenceClassification

    from smoothlab.hybrid.seeding import seeded_rng

    tok = AutoTokenizer.from_pretrained(M.resolve_model_path(None))
    config = DistilBertConfig(
        vocab_size=len(tok), dim=32, n_layers=2, n_heads=2, hidden_dim=64, dropout=0.0
    )
    with seeded_rng(0):
        model = DistilBertForSequenceClassification(config)
    folder = str(tmp_path_factory.mktemp("distilbert"))
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def test_lora_on_distilbert_targets_its_query_and_value_layers(distilbert_dir) -> None:
    pb = M.attach_peft(M.load_model(distilbert_dir, CLS_TASK), "lora", r=2)
    adapter = {n for n in _trainable(pb.model) if "lora_" in n}
    assert {n.split(".lora_")[0].rsplit(".", 1)[-1] for n in adapter} == {"q_lin", "v_lin"}
    assert len(adapter) == 2 * 2 * 2  # layers × {q_lin, v_lin} × {A, B}
    pb.model.eval()
    _check_peft_forward(pb, CLS_EXAMPLES, 2)


def test_prompt_tuning_on_distilbert_reads_its_config_aliases(distilbert_dir) -> None:
    pb = M.attach_peft(M.load_model(distilbert_dir, CLS_TASK), "prompt", num_virtual_tokens=3)
    embedding = pb.model.prompt_encoder["default"].embedding.weight
    assert embedding.shape == (3, 32) and embedding.requires_grad
    pb.model.eval()
    _check_peft_forward(pb, CLS_EXAMPLES, 2)


def test_an_architecture_without_attention_layers_by_name_is_refused(distilbert_dir) -> None:
    bundle = M.load_model(distilbert_dir, CLS_TASK)
    for layer in bundle.model.distilbert.transformer.layer:  # hide the names LoRA looks for
        attention = layer.attention
        attention.q_renamed, attention.v_renamed = attention.q_lin, attention.v_lin
        del attention.q_lin, attention.v_lin
    with pytest.raises(UsageError) as info:
        M.attach_peft(bundle, "lora")
    msg = str(info.value)
    assert "'distilbert'" in msg and "q_lin" in msg and "llama" in msg, msg


def test_model_paths_that_cannot_be_models_are_named(tmp_path, monkeypatch) -> None:
    """A path no hub id can be and that does not exist, a plain file and a smoothlab run
    folder are each refused in one line naming the value (they used to reach the hub
    lookup, whose message blamed the hub); hub ids and existing folders pass through."""
    monkeypatch.chdir(tmp_path)
    for name in (str(tmp_path / "nope"), "./nope", "../nope", "runs/h1/model"):
        with pytest.raises(UsageError, match="no such folder"):
            M.resolve_model_path(name)
    (tmp_path / "weights.bin").write_bytes(b"")
    with pytest.raises(UsageError, match="'weights.bin' is a file"):
        M.resolve_model_path("weights.bin")
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text('{"method": "hybrid-lora", "steps": 2}')
    (run / "metrics.csv").write_text("step,loss\n")
    with pytest.raises(UsageError, match="run folder.*smoothlab export"):
        M.resolve_model_path(str(run))
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text('{"model_type": "bert"}')
    assert M.resolve_model_path(str(model)) == str(model)
    assert M.resolve_model_path("org/name") == "org/name"  # a hub id: checked when loaded
    monkeypatch.setenv("HOME", str(tmp_path))
    assert M.resolve_model_path("~/model") == str(model)
