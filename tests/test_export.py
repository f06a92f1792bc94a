"""Tests for hybrid.export: the exported folder loads with plain ``from_pretrained`` and gives
the fine-tuned model's logits.

Ground truth: the logits of the in-memory fine-tuned PeftModel. LoRA merging changes the
arithmetic (``(W + s·BA)x`` instead of ``Wx + s·B(Ax)``), so its logits agree to float32
rounding; the check that the tuned model differs from its base (by far more) keeps the
comparison able to fail.
"""

from __future__ import annotations

import pytest
import torch

from hybrid.data import Task
from hybrid.export import export
from hybrid.models import attach_peft, load_model
from smoothlab.errors import UsageError
from tests.tiny_models import tiny_encoder

TASK = Task(name="t", kind="classification", num_options=2, label_words=("bad", "good"))


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("tiny") / "bert"
    tiny_encoder(seed=0, save_dir=path)
    return str(path)


def _tuned(tiny_dir: str, method: str):
    bundle = attach_peft(
        load_model(tiny_dir, TASK, seed=1), method, r=4, num_virtual_tokens=3, seed=2
    )
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in bundle.model.parameters():
            if p.requires_grad:  # the adapter and the trained head copy: move them off init
                p.add_(0.3 * torch.randn(p.shape, generator=gen))
    bundle.model.eval()
    return bundle


def _inputs(tokenizer):
    enc = tokenizer(["a fine movie", "dull and slow , really"], padding=True, return_tensors="pt")
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


def test_lora_export_merges_and_reloads_with_equal_logits(tiny_dir, tmp_path) -> None:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    bundle = _tuned(tiny_dir, "lora")
    x = _inputs(bundle.tokenizer)
    with torch.no_grad():
        want = bundle.model(**x).logits
    res = export(bundle, tmp_path / "out")
    assert res.merged and res.adapter_dir is None and res.tokenizer_saved
    loaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "out").eval()
    assert not any("lora" in k for k in loaded.state_dict())
    with torch.no_grad():
        got = loaded(**_inputs(AutoTokenizer.from_pretrained(tmp_path / "out"))).logits
        base = AutoModelForSequenceClassification.from_pretrained(tiny_dir).eval()(**x).logits
        again = bundle.model(**x).logits  # not inplace: the PeftModel still works, unchanged
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert torch.equal(again, want)
    assert (want - base).abs().max() > 1e-2


def test_prompt_export_keeps_adapter_next_to_loadable_base(tiny_dir, tmp_path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    bundle = _tuned(tiny_dir, "prompt")
    x = _inputs(bundle.tokenizer)
    with torch.no_grad():
        want = bundle.model(**x).logits
    res = export(bundle, tmp_path / "out")
    assert not res.merged and res.adapter_dir == tmp_path / "out" / "adapter"
    base = AutoModelForSequenceClassification.from_pretrained(tmp_path / "out")
    head = bundle.model.base_model.classifier.modules_to_save["default"].weight
    assert torch.equal(base.classifier.weight, head)  # the trained head, not the original one
    tuned = PeftModel.from_pretrained(base, res.adapter_dir).eval()
    with torch.no_grad():
        torch.testing.assert_close(tuned(**x).logits, want, rtol=0, atol=0)


def test_plain_model_and_refusals(tiny_dir, tmp_path) -> None:
    from transformers import AutoModelForSequenceClassification

    model, _ = tiny_encoder(seed=3)
    res = export(model, tmp_path / "plain")
    assert not res.tokenizer_saved
    loaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "plain")
    assert all(
        torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values())
    )
    with pytest.raises(UsageError, match="not empty"):
        export(model, tmp_path / "plain")
    export(model, tmp_path / "plain", overwrite=True)
    with pytest.raises(TypeError, match="ModelBundle or an nn.Module"):
        export("model", tmp_path / "x")
    with pytest.raises(UsageError, match="not a transformers or peft model"):
        export(torch.nn.Linear(2, 2), tmp_path / "lin")


def test_export_of_a_seeds_run_of_hybrid_lora_loads_with_from_pretrained(tiny_dir, tmp_path):
    """The CLI path: a hybrid-lora run with a checkpoint of seeds (base weights replayed,
    LoRA and head from the checkpoint, LoRA merged) gives the trained model's logits."""
    import warnings

    from transformers import AutoModelForSequenceClassification

    from hybrid.train import TrainConfig, load_trained, train
    from smoothlab.cli import main

    cfg = TrainConfig(
        model=tiny_dir,
        method="hybrid-lora",
        checkpoint="seeds",
        steps=3,
        eval_every=3,
        train_size=32,
        eval_size=8,
        dev_size=8,
        batch_size=8,
        max_length=16,
        lora_r=4,
        lr_base=1e-3,
        lr_peft=5e-2,
        out=str(tmp_path / "run"),
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        train(cfg, progress=False)
        assert main(["export", str(tmp_path / "run"), "--out", str(tmp_path / "hf")]) == 0
    bundle = load_trained(tmp_path / "run")
    ids = torch.tensor([[101, 2023, 3185, 2003, 2307, 102]])
    exported = AutoModelForSequenceClassification.from_pretrained(tmp_path / "hf").eval()
    with torch.no_grad():
        want = bundle.model(input_ids=ids).logits
        got = exported(input_ids=ids).logits
        base = (
            AutoModelForSequenceClassification.from_pretrained(tiny_dir)
            .eval()(input_ids=ids)
            .logits
        )
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-4)
    assert (got - base).abs().max() > 100 * (got - want).abs().max()
    assert main(["export", str(tmp_path / "run"), "--out", str(tmp_path / "hf")]) == 2  # not empty
