"""Tests for smoothlab.hybrid.export: the exported folder loads with plain ``from_pretrained`` and gives
the fine-tuned model's logits.

Ground truth: the logits of the in-memory fine-tuned PeftModel. LoRA merging changes the
arithmetic (``(W + s·BA)x`` instead of ``Wx + s·B(Ax)``), so its logits agree to float32
rounding; the check that the tuned model differs from its base (by far more) keeps the
comparison able to fail.
"""

from __future__ import annotations

import pytest
import torch

from smoothlab.errors import UsageError
from smoothlab.hybrid.data import Task
from smoothlab.hybrid.export import export
from smoothlab.hybrid.models import attach_peft, load_model
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


def test_encoder_prefix_export_names_the_loader_that_works(tiny_dir, tmp_path) -> None:
    """peft's from_pretrained refuses encoder prefix tuning ("Model does not support past
    key values"); the export said to use it. It now names load_encoder_prefix, in its
    result and in adapter/LOADING.md, and that loader gives the tuned logits exactly."""
    from smoothlab.hybrid.encoder_prefix import load_encoder_prefix

    bundle = _tuned(tiny_dir, "prefix")
    x = _inputs(bundle.tokenizer)
    with torch.no_grad():
        want = bundle.model(**x).logits
    res = export(bundle, tmp_path / "out")
    assert res.loader == "smoothlab.hybrid.encoder_prefix.load_encoder_prefix"
    assert "load_encoder_prefix" in (res.adapter_dir / "LOADING.md").read_text()
    tuned = load_encoder_prefix(load_model(tmp_path / "out", TASK), res.adapter_dir)
    with torch.no_grad():
        torch.testing.assert_close(tuned.model.eval()(**x).logits, want, rtol=0, atol=0)
    assert export(_tuned(tiny_dir, "prompt"), tmp_path / "p").loader == (
        "peft.PeftModel.from_pretrained"
    )


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


def _tiny_config(tiny_dir, run, **changes):
    """A run of a few steps on 8 examples of the tiny encoder, evaluated every step."""
    from smoothlab.hybrid.train import TrainConfig

    base = dict(eval_every=1, train_size=8, eval_size=4, dev_size=4, batch_size=4, max_length=16)
    return TrainConfig(model=tiny_dir, out=str(run), **(base | changes))


def test_export_of_a_seeds_run_of_hybrid_lora_loads_with_from_pretrained(tiny_dir, tmp_path):
    """The CLI path: a hybrid-lora run with a checkpoint of seeds (base weights replayed,
    LoRA and head from the checkpoint, LoRA merged) gives the trained model's logits."""
    import warnings

    from transformers import AutoModelForSequenceClassification

    from smoothlab.cli import main
    from smoothlab.hybrid.train import TrainConfig, load_trained, train

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


# --------------------------------------------------------------------------- CLI refusals


def _run_folder(root, **config) -> str:
    """A run folder holding only config.json (``config`` over TrainConfig's defaults): the
    refusals below come before the model is built or checkpoint.pt is read."""
    import json

    root.mkdir(parents=True)
    (root / "config.json").write_text(json.dumps(config))
    return str(root)


def _one_line_exit_2(argv: list[str], capsys) -> str:
    from smoothlab.cli import main

    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    return err


def test_export_cli_refuses_a_device_this_machine_lacks(tmp_path, capsys) -> None:
    run, out = _run_folder(tmp_path / "run"), str(tmp_path / "hf")
    err = _one_line_exit_2(["export", run, "--out", out, "--device", "banana"], capsys)
    assert "device 'banana' is not a device; accepted: cpu, cuda, cuda:N, mps, auto" in err
    if not torch.cuda.is_available():
        err = _one_line_exit_2(["export", run, "--out", out, "--device", "cuda"], capsys)
        assert "device 'cuda': CUDA is not available on this machine" in err
        # a run trained on CUDA, exported here without --device
        cuda_run = _run_folder(tmp_path / "cuda_run", device="cuda")
        err = _one_line_exit_2(["export", cuda_run, "--out", out], capsys)
        assert f"{cuda_run} was trained on device 'cuda'" in err and "pass --device" in err
    assert not (tmp_path / "hf").exists()


def test_export_into_a_non_empty_folder_names_the_flag(tmp_path, capsys) -> None:
    model, _ = tiny_encoder(seed=3)
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "keep.txt").write_text("keep")
    with pytest.raises(UsageError, match=r"not empty; .*pass overwrite=True \(CLI: --overwrite\)"):
        export(model, tmp_path / "hf")
    # the CLI says its own flag, before the model is built (this run has no checkpoint)
    run = _run_folder(tmp_path / "run")
    err = _one_line_exit_2(["export", run, "--out", str(tmp_path / "hf")], capsys)
    assert "export folder" in err and "is not empty; choose a new folder or pass --overwrite" in err
    assert [p.name for p in (tmp_path / "hf").iterdir()] == ["keep.txt"]


@pytest.mark.parametrize(
    "text,words",
    [
        ("{not json", "is not a readable run config"),
        ("[1]", "a JSON object was expected"),
        ('{"method": "nope"}', "method 'nope' is not accepted"),
        ('{"lora_r": "abc"}', "lora_r must be a positive integer"),
    ],
)
def test_export_cli_of_a_damaged_config_is_one_line(tmp_path, capsys, text, words) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(text)
    err = _one_line_exit_2(["export", str(run), "--out", str(tmp_path / "hf")], capsys)
    assert words in err


def test_export_cli_refuses_the_run_folder_as_target(tmp_path, capsys) -> None:
    """``export run --out run --overwrite`` replaced the run's config.json with the HF one."""
    run = _run_folder(tmp_path / "run")
    for out in (run, f"{run}/hf", str(tmp_path)):
        err = _one_line_exit_2(["export", run, "--out", out, "--overwrite"], capsys)
        assert "overlaps the run folder" in err
    assert (tmp_path / "run" / "config.json").read_text() == "{}"


@pytest.mark.parametrize("damage", ["garbage", "truncated", "method", "kind", "state"])
def test_export_cli_of_a_damaged_checkpoint_is_one_line(tiny_dir, tmp_path, capsys, damage):
    """checkpoint.pt of 9 garbage bytes, or cut short: one line naming the file (read by
    smoothlab.hybrid.train.load_trained), not torch's zip-reader traceback."""
    import warnings

    from smoothlab.hybrid.train import train

    run = tmp_path / "run"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        train(_tiny_config(tiny_dir, run, method="fo-lora", steps=1, lora_r=2), progress=False)
    ckpt = run / "checkpoint.pt"
    data = ckpt.read_bytes()
    if damage in ("garbage", "truncated"):
        ckpt.write_bytes(b"garbage!!" if damage == "garbage" else data[: len(data) // 2])
        words = f"{ckpt} is not a readable checkpoint"
    elif damage == "method":  # config.json of another run beside this checkpoint
        import json

        config = json.loads((run / "config.json").read_text())
        (run / "config.json").write_text(json.dumps(config | {"method": "fo-prompt"}))
        words = "is of a 'fo-lora' run but"
    else:
        state = torch.load(ckpt, weights_only=False)
        if damage == "kind":
            state["checkpoint"] = "weird"
            words = "holds a 'weird' checkpoint"
        else:
            del state["model"]
            words = "does not fit the model"
        torch.save(state, ckpt)
    err = _one_line_exit_2(["export", str(run), "--out", str(tmp_path / "hf")], capsys)
    assert words in err


def test_export_of_an_unfinished_or_diverged_run_warns(tiny_dir, tmp_path, capsys) -> None:
    """An interrupted run exported silently as the fine-tuned model ("weights as trained",
    rc 0); so did a diverged one's last checkpoint. Now the step is printed and a warning
    line says so; a finished run gets no warning."""
    import json
    import warnings

    from smoothlab.cli import main
    from smoothlab.hybrid.train import train

    run = tmp_path / "run"
    cfg = _tiny_config(tiny_dir, run, method="zo-ft", steps=3)

    def stop(t, row):
        if t == 1:
            raise KeyboardInterrupt

    def export_(name: str) -> tuple[int, str, str]:
        rc = main(["export", str(run), "--out", str(tmp_path / name)])
        out = capsys.readouterr()  # (transformers' loading bars aside)
        return rc, out.out, "".join(x for x in out.err.splitlines(True) if "smoothlab" in x)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(KeyboardInterrupt):
            train(cfg, progress=False, on_step=stop)
        rc, out, err = export_("a")
        assert rc == 0 and "at step 1 of 3" in out
        assert err.startswith("smoothlab: warning: the run did not finish") and err.count("\n") == 1
        train(cfg, progress=False)
        rc, out, err = export_("b")
        assert rc == 0 and "at step 3 of 3" in out and err == ""
        # the same folder as a diverged run leaves it: a nan row past the checkpoint
        (run / "summary.json").unlink()
        with (run / "metrics.csv").open("a") as fh:
            fh.write("4,0,nan,nan,0.001,0.0,,,1.0\n")
        config = json.loads((run / "config.json").read_text())
        (run / "config.json").write_text(json.dumps(config | {"steps": 10}))
        rc, out, err = export_("c")
        assert rc == 0 and "at step 3 of 10" in out
        assert "warning: the run diverged at step 4" in err
