"""Tests for smoothlab.hybrid.data: tasks, prompts, file loading, synthetic set, splits, sampler."""

from __future__ import annotations

import csv
import json
import re
import sys
import types
from pathlib import Path

import pytest
import torch

from smoothlab.errors import UsageError
from smoothlab.hybrid import data as D
from smoothlab.hybrid import readers, sampling
from smoothlab.hybrid import synthetic as S
from smoothlab.hybrid import tasks as T
from smoothlab.hybrid.data import (
    TASKS,
    EpochSampler,
    Example,
    Splits,
    Task,
    get_task,
    load_examples,
    load_task_data,
    sample_splits,
    synthetic_sentiment,
)

SST2 = Path(__file__).resolve().parents[2] / "shared" / "data" / "sst2" / "train.tsv"


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


# --------------------------------------------------------------------------- tasks / prompts


def test_registry_and_get_task() -> None:
    assert set(TASKS) == {"sst2", "copa", "winogrande", "wic", "synthetic"}
    for name, task in TASKS.items():
        assert get_task(name) is task and task.name == name
        assert task.num_options == 2
    assert get_task("sst2").label_words == (" terrible", " great")
    assert get_task("wic").label_words == (" No", " Yes")
    assert get_task("copa").kind == get_task("winogrande").kind == "multiple_choice"


def test_get_task_unknown_names_value_and_accepted() -> None:
    with pytest.raises(ValueError, match=r"'boolq'.*copa, sst2, synthetic, wic, winogrande"):
        get_task("boolq")


def test_prompts_per_task() -> None:
    ex = Example("a gem of a movie", 1)
    assert get_task("sst2").prompt(ex) == "a gem of a movie It was"
    assert get_task("synthetic").prompt(ex) == "a gem of a movie It was"
    assert get_task("sst2").options(ex) == (" terrible", " great")
    assert get_task("sst2").scoring_pairs(ex) == [
        ("a gem of a movie It was", " terrible"),
        ("a gem of a movie It was", " great"),
    ]
    wic = Example("He sat on the bank.", 0, text_pair="The bank raised rates.", word="bank")
    assert get_task("wic").prompt(wic) == (
        'He sat on the bank. The bank raised rates. Does the word "bank" have the same '
        "meaning in both sentences?"
    )
    copa = Example("The man broke his toe because", 1, candidates=(" a", " b"))
    assert get_task("copa").prompt(copa) == "The man broke his toe because"
    assert get_task("copa").options(copa) == (" a", " b")


def test_prompt_missing_field_is_an_error() -> None:
    with pytest.raises(ValueError, match=r"needs 'word'.*word=None"):
        get_task("wic").prompt(Example("s1", 0, text_pair="s2"))
    bad = D.Task("x", "classification", 2, template="{text} {nope}")
    with pytest.raises(ValueError, match=r"unknown field 'nope'"):
        bad.prompt(Example("t", 0))


def test_braces_in_text_are_kept_verbatim() -> None:
    assert get_task("sst2").prompt(Example("{text} {0}", 0)) == "{text} {0} It was"


def test_public_names_are_re_exported() -> None:
    names = ["Example", "Task", "TASKS", "get_task", "load_examples", "synthetic_sentiment"]
    names += ["Splits", "sample_splits", "load_task_data", "EpochSampler"]
    for name in names:
        assert name in D.__all__ and getattr(D, name) is not None
    assert D.Task is T.Task and D.load_task_data is sampling.load_task_data
    assert D.load_examples is readers.load_examples and D.TASKS is T.TASKS


def test_every_task_entry_carries_its_layout_and_help() -> None:
    for task in TASKS.values():
        assert task.help, task.name
        assert task.hub_path or task.builtin, task.name  # some source without a file
        if task.kind == "multiple_choice":
            assert task.parser is not None and task.columns, task.name
    assert get_task("copa").columns == ("premise", "choice1", "choice2", "question", "label")
    assert [t.split(":")[0] for t in T.task_help().split("; ")] == list(T.task_names())


def _parse_pairs(task: Task, records: T.Records, *_: object) -> list[Example]:
    out = []
    for number, rec in records.rows:
        if rec["gold"] not in ("a", "b"):
            raise ValueError(f"{records.where(number)}: bad gold {rec['gold']!r}")
        cands = (" " + rec["a"], " " + rec["b"])
        out.append(Example(rec["q"], "ab".index(rec["gold"]), candidates=cands))
    return out


def test_adding_a_task_is_one_entry_plus_its_parser(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(T, "TASKS", dict(T.TASKS))  # keep the real registry unchanged
    task = T.register_task(
        Task(
            "pairs",
            "multiple_choice",
            2,
            parser=_parse_pairs,
            columns=("q", "a", "b", "gold"),
            help="toy pairs",
            builtin=lambda n, seed: [
                Example(f"q{i}", i % 2, candidates=(" x", " y")) for i in range(n)
            ],
        )
    )
    assert T.get_task("pairs") is task and "pairs: toy pairs" in T.task_help()
    rows = [{"q": f"q{i}", "a": "yes", "b": "no", "gold": "ab"[i % 2]} for i in range(6)]
    p = write_jsonl(tmp_path / "p.jsonl", rows)
    ex = load_examples(p, "pairs")
    assert ex[1] == Example("q1", 1, candidates=(" yes", " no"))
    with pytest.raises(ValueError, match=r"missing column\(s\) \['gold'\].*expected"):
        load_examples(write_jsonl(tmp_path / "bad.jsonl", [{"q": "x", "a": "y", "b": "z"}]), task)
    with pytest.raises(ValueError, match=r"fixed layout"):
        load_examples(p, task, text_column="q")
    _, s = load_task_data("pairs", p, train=3, eval=2, dev=1)
    assert sorted(e.text for e in s.train + s.eval + s.dev) == [f"q{i}" for i in range(6)]
    _, s = load_task_data("pairs", train=4, eval=3, dev=1, seed=0)  # its built-in examples
    assert sorted(e.text for e in s.train + s.eval + s.dev) == [f"q{i}" for i in range(8)]
    with pytest.raises(ValueError, match=r"'pairs' is already registered"):
        T.register_task(task)


# --------------------------------------------------------------------------- SST-2 real file


@pytest.mark.skipif(not SST2.is_file(), reason="shared SST-2 file not present")
def test_sst2_real_file() -> None:
    examples = load_examples(SST2, "sst2")
    assert len(examples) == 67349
    assert {e.label for e in examples} == {0, 1}
    assert sum(e.label for e in examples) == 37569  # positives in GLUE SST-2 train
    assert examples[0] == Example("hide new secretions from the parental units", 0)
    assert examples[2].label == 1 and examples[2].text.startswith("that loves its characters")
    # quotes are text, not CSV quoting: some rows contain them and still parse whole
    assert any('"' in e.text or "'" in e.text for e in examples)
    assert all(e.text_pair is None and e.candidates is None for e in examples[:100])


# --------------------------------------------------------------------------- generic files


def test_csv_round_trip_with_quotes_and_string_labels(tmp_path: Path) -> None:
    p = tmp_path / "d.csv"
    p.write_text(
        'text,label\n"good, really",positive\n"he said ""bad""",negative\nfine,1\n'
        "meh, 0\nnope,NEG\n",
        encoding="utf-8",
    )
    ex = load_examples(p, "sst2")
    assert ex == [
        Example("good, really", 1),
        Example('he said "bad"', 0),
        Example("fine", 1),
        Example("meh", 0),
        Example("nope", 0),
    ]


def test_tsv_keeps_quotes_literally(tmp_path: Path) -> None:
    p = tmp_path / "d.tsv"
    p.write_text("sentence\tlabel\n\"quoted start\t1\nit 's fine\t0\n", encoding="utf-8")
    assert load_examples(p, "synthetic") == [Example('"quoted start', 1), Example("it 's fine", 0)]


def test_jsonl_round_trip_and_column_autodetect(tmp_path: Path) -> None:
    rows = [{"sentence1": "a", "label": 0, "idx": 3}, {"sentence1": "b", "label": "great"}]
    assert load_examples(write_jsonl(tmp_path / "d.jsonl", rows), "sst2") == [
        Example("a", 0),
        Example("b", 1),
    ]
    # .json: JSON lines, or one array
    (tmp_path / "a.json").write_text(json.dumps([{"text": "x", "label": 1}]))
    assert load_examples(tmp_path / "a.json", "sst2") == [Example("x", 1)]
    write_jsonl(tmp_path / "l.json", [{"text": "y", "label": 0}])
    assert load_examples(tmp_path / "l.json", "sst2") == [Example("y", 0)]


def test_column_overrides(tmp_path: Path) -> None:
    p = tmp_path / "d.csv"
    p.write_text("review,text,stars,label\ngreat film,ignored,1,0\n", encoding="utf-8")
    assert load_examples(p, "sst2") == [Example("ignored", 0)]
    assert load_examples(p, "sst2", text_column="review", label_column="stars") == [
        Example("great film", 1)
    ]


# --------------------------------------------------------------------------- COPA / WinoGrande / WiC


def test_copa(tmp_path: Path) -> None:
    rows = [
        {
            "premise": "My body cast a shadow over the grass.",
            "choice1": "The sun was rising.",
            "choice2": "The grass was cut.",
            "question": "cause",
            "label": 0,
            "idx": 0,
        },
        {
            "premise": "The man broke his toe.",
            "choice1": "He dropped a hammer on his foot.",
            "choice2": "I felt ill.",
            "question": "effect",
            "label": 1,
            "idx": 1,
        },
    ]
    ex = load_examples(write_jsonl(tmp_path / "copa.jsonl", rows), "copa")
    assert ex[0] == Example(
        "My body cast a shadow over the grass because",
        0,
        candidates=(" the sun was rising.", " the grass was cut."),
    )
    assert ex[1].text == "The man broke his toe so"
    assert ex[1].candidates == (" he dropped a hammer on his foot.", " i felt ill.")
    assert ex[1].label == 1
    task = get_task("copa")
    assert task.prompt(ex[0]) + task.options(ex[0])[0] == (
        "My body cast a shadow over the grass because the sun was rising."
    )


def test_winogrande_partial_scoring(tmp_path: Path) -> None:
    rows = [
        {
            "sentence": "Sarah was a much better surgeon than Maria so _ always got the harder cases.",
            "option1": "Sarah",
            "option2": "Maria",
            "answer": "1",
        },
        {
            "sentence": "_ could not lift the box.",
            "option1": "Tom",
            "option2": "Ann",
            "answer": "2",
        },
    ]
    ex = load_examples(write_jsonl(tmp_path / "wg.jsonl", rows), "winogrande")
    e = ex[0]
    assert e.text == "Sarah was a much better surgeon than Maria so"
    assert e.label == 0
    assert e.candidates == (
        " Sarah always got the harder cases.",
        " Maria always got the harder cases.",
    )
    task = get_task("winogrande")
    pairs = task.scoring_pairs(e)
    assert pairs == [
        ("Sarah was a much better surgeon than Maria so Sarah", " always got the harder cases."),
        ("Sarah was a much better surgeon than Maria so Maria", " always got the harder cases."),
    ]
    for (ctx, cont), opt in zip(pairs, ("Sarah", "Maria"), strict=True):
        assert ctx + cont == rows[0]["sentence"].replace("_", opt)
    # blank at the start: empty shared prefix
    assert ex[1].text == "" and ex[1].label == 1
    assert task.scoring_pairs(ex[1])[1] == ("Ann", " could not lift the box.")


def test_wic(tmp_path: Path) -> None:
    rows = [
        {
            "word": "bank",
            "sentence1": "He sat on the bank.",
            "sentence2": "The bank is closed.",
            "label": False,
            "start1": 14,
            "end1": 18,
            "start2": 4,
            "end2": 8,
            "idx": 0,
        },
        {
            "word": "run",
            "sentence1": "I run daily.",
            "sentence2": "They run fast.",
            "label": True,
            "idx": 1,
        },
    ]
    ex = load_examples(write_jsonl(tmp_path / "wic.jsonl", rows), "wic")
    assert ex == [
        Example("He sat on the bank.", 0, text_pair="The bank is closed.", word="bank"),
        Example("I run daily.", 1, text_pair="They run fast.", word="run"),
    ]
    assert (
        get_task("wic")
        .prompt(ex[1])
        .endswith('Does the word "run" have the same meaning in both sentences?')
    )
    assert get_task("wic").options(ex[1])[ex[1].label] == " Yes"


# --------------------------------------------------------------------------- bad input


def test_missing_file(tmp_path: Path) -> None:
    p = tmp_path / "nope.tsv"
    with pytest.raises(ValueError, match=r"nope\.tsv.*no such file"):
        load_examples(p, "sst2")


def test_unknown_extension(tmp_path: Path) -> None:
    p = tmp_path / "d.txt"
    p.write_text("text\tlabel\n")
    with pytest.raises(ValueError, match=r"d\.txt.*'\.txt'.*\.tsv, \.csv, \.jsonl, \.json"):
        load_examples(p, "sst2")


@pytest.mark.parametrize("name", ["dir.tsv", "adir"])
def test_folder_as_data_file_says_it_is_a_folder(tmp_path: Path, name: str) -> None:
    (tmp_path / name).mkdir()
    with pytest.raises(
        UsageError, match=re.escape(name) + r": is a folder, not a data file.*\.tsv, \.csv"
    ):
        load_examples(tmp_path / name, "sst2")


def test_empty_or_missing_texts_name_file_line_and_field(tmp_path: Path) -> None:
    tsv = tmp_path / "e.tsv"
    tsv.write_text("sentence\tlabel\nfine\t1\n\t1\n")  # row 3: the empty sentence "\t1"
    with pytest.raises(UsageError, match=r"e\.tsv: line 3: field 'sentence' is empty \(''\)"):
        load_examples(tsv, "sst2")
    csv_ = tmp_path / "e.csv"
    csv_.write_text("text,label\nfine,1\n   ,0\n")
    with pytest.raises(UsageError, match=r"e\.csv: line 3: field 'text' is empty"):
        load_examples(csv_, "sst2")
    rows = [{"sentence": "fine", "label": 1}, {"label": 0}]
    lacks = write_jsonl(tmp_path / "lacks.jsonl", rows)
    with pytest.raises(
        UsageError,
        match=r"lacks\.jsonl: line 2: missing field 'sentence'; fields found: \['label'\]",
    ):
        load_examples(lacks, "sst2")
    null = write_jsonl(tmp_path / "null.jsonl", [{"sentence": None, "label": 0}])
    with pytest.raises(
        UsageError, match=r"null\.jsonl: line 1: field 'sentence' is empty \(None\)"
    ):
        load_examples(null, "sst2")
    copa = write_jsonl(
        tmp_path / "c.jsonl",
        [{"premise": "p.", "choice1": "", "choice2": "b", "question": "cause", "label": 0}],
    )
    with pytest.raises(UsageError, match=r"c\.jsonl: line 1: field 'choice1' is empty"):
        load_examples(copa, "copa")
    wic = write_jsonl(
        tmp_path / "w.jsonl", [{"word": "w", "sentence1": "a", "sentence2": " ", "label": 0}]
    )
    with pytest.raises(UsageError, match=r"w\.jsonl: line 1: field 'sentence2' is empty"):
        load_examples(wic, "wic")
    wg = write_jsonl(
        tmp_path / "g.jsonl", [{"sentence": "x _ y", "option1": None, "option2": "b", "answer": 1}]
    )
    with pytest.raises(UsageError, match=r"g\.jsonl: line 1: field 'option1' is empty \(None\)"):
        load_examples(wg, "winogrande")


def test_missing_columns_lists_columns_found(tmp_path: Path) -> None:
    p = tmp_path / "d.csv"
    p.write_text("review,label\nok,1\n")
    with pytest.raises(ValueError, match=r"d\.csv.*no text column.*\['review', 'label'\]"):
        load_examples(p, "sst2")
    q = tmp_path / "e.csv"
    q.write_text("text,stars\nok,1\n")
    with pytest.raises(ValueError, match=r"e\.csv.*no label column.*\['text', 'stars'\]"):
        load_examples(q, "sst2")
    with pytest.raises(
        ValueError, match=r"text_column='body' is not a column.*\['text', 'stars'\]"
    ):
        load_examples(q, "sst2", text_column="body")
    r = write_jsonl(tmp_path / "copa.jsonl", [{"premise": "p", "choice1": "a", "label": 0}])
    with pytest.raises(ValueError, match=r"copa\.jsonl.*\['choice2', 'question'\].*columns found"):
        load_examples(r, "copa")


def test_bad_labels_name_value_and_line(tmp_path: Path) -> None:
    p = tmp_path / "d.tsv"
    p.write_text("sentence\tlabel\nfine\t1\nbad\tmaybe\n")
    with pytest.raises(ValueError, match=r"d\.tsv: line 3: bad label 'maybe'.*accepted: 0, 1"):
        load_examples(p, "sst2")
    p.write_text("sentence\tlabel\nfine\t2\n")
    with pytest.raises(ValueError, match=r"line 2: bad label '2'"):
        load_examples(p, "sst2")
    p.write_text("sentence\tlabel\nfine\t-1\n")
    with pytest.raises(ValueError, match=r"line 2: bad label '-1'"):
        load_examples(p, "sst2")
    q = write_jsonl(tmp_path / "j.jsonl", [{"text": "a", "label": 0}, {"text": "b", "label": True}])
    with pytest.raises(ValueError, match=r"j\.jsonl: line 2: bad label True"):
        load_examples(q, "sst2")
    wg = write_jsonl(
        tmp_path / "wg.jsonl", [{"sentence": "_ x", "option1": "a", "option2": "b", "answer": ""}]
    )
    with pytest.raises(ValueError, match=r"wg\.jsonl: line 1: bad answer ''"):
        load_examples(wg, "winogrande")
    wic = write_jsonl(
        tmp_path / "wic.jsonl",
        [{"word": "w", "sentence1": "a", "sentence2": "b", "label": "sometimes"}],
    )
    with pytest.raises(ValueError, match=r"line 1: bad label 'sometimes'.*false/no.*true/yes"):
        load_examples(wic, "wic")
    copa = write_jsonl(
        tmp_path / "c.jsonl",
        [{"premise": "p.", "choice1": "a", "choice2": "b", "question": "why", "label": 0}],
    )
    with pytest.raises(ValueError, match=r"line 1: bad question 'why'.*'cause', 'effect'"):
        load_examples(copa, "copa")


def test_empty_files(tmp_path: Path) -> None:
    for name, content in [
        ("a.tsv", ""),
        ("b.tsv", "sentence\tlabel\n"),
        ("c.jsonl", "\n\n"),
        ("d.csv", "text,label\n"),
    ]:
        p = tmp_path / name
        p.write_text(content)
        with pytest.raises(ValueError, match=re.escape(name) + ": no examples"):
            load_examples(p, "sst2")


def test_malformed_rows(tmp_path: Path) -> None:
    p = tmp_path / "d.tsv"
    p.write_text("sentence\tlabel\na,b\t1\t7\n")
    with pytest.raises(ValueError, match=r"d\.tsv: line 2 has 3 fields.*header has 2"):
        load_examples(p, "sst2")
    q = tmp_path / "j.jsonl"
    q.write_text('{"text": "a", "label": 0}\n{oops\n')
    with pytest.raises(ValueError, match=r"j\.jsonl: line 2 is not valid JSON"):
        load_examples(q, "sst2")
    r = write_jsonl(tmp_path / "k.jsonl", [{"text": "a", "label": 0}, {"label": 1}])
    with pytest.raises(ValueError, match=r"k\.jsonl: line 2.*'text'"):
        load_examples(r, "sst2")


# --------------------------------------------------------------------------- synthetic set


def test_synthetic_deterministic_and_seed_dependent() -> None:
    a, b, c = synthetic_sentiment(300, 0), synthetic_sentiment(300, 0), synthetic_sentiment(300, 1)
    assert a == b
    assert a != c
    assert synthetic_sentiment(0, 0) == []


def test_synthetic_does_not_touch_global_rng() -> None:
    import random

    random.seed(123)
    expected = random.random()
    random.seed(123)
    synthetic_sentiment(50, 7)
    assert random.random() == expected


def test_synthetic_balanced_and_labels_follow_the_lexicon() -> None:
    ex = synthetic_sentiment(2001, 3)
    labels = [e.label for e in ex]
    assert sorted(set(labels)) == [0, 1]
    assert labels.count(0) == 1001 and labels.count(1) == 1000
    assert len({e.text for e in ex}) == len(ex)  # distinct sentences
    pos, neg = set(S._POSITIVE), set(S._NEGATIVE)
    negated = 0
    for e in ex:
        words = e.text.rstrip(".").replace(",", "").lower().split()
        polar = [w for w in words if w in pos or w in neg]
        assert len(polar) == 1, e.text
        is_not = "not" in words
        negated += is_not
        assert e.label == int((polar[0] in pos) != is_not), e.text
        assert e.text[0].isupper() and e.text.endswith(".")
    assert 0.10 <= negated / len(ex) <= 0.20


def test_synthetic_rejects_bad_n() -> None:
    with pytest.raises(ValueError, match=r"-1"):
        synthetic_sentiment(-1, 0)


# --------------------------------------------------------------------------- splits


def test_sample_splits_disjoint_and_deterministic() -> None:
    ex = [Example(f"t{i}", i % 2) for i in range(500)]
    s = sample_splits(ex, train=200, eval=150, dev=50, seed=4)
    assert isinstance(s, Splits)
    assert (len(s.train), len(s.eval), len(s.dev)) == (200, 150, 50)
    ids = [e.text for e in s.train + s.eval + s.dev]
    assert len(set(ids)) == 400
    assert s == sample_splits(ex, train=200, eval=150, dev=50, seed=4)
    other = sample_splits(ex, train=200, eval=150, dev=50, seed=5)
    assert other.train != s.train
    assert [e.text for e in s.train[:20]] != [f"t{i}" for i in range(20)]  # shuffled


def test_sample_splits_too_few() -> None:
    ex = [Example("t", 0)] * 10
    with pytest.raises(ValueError, match=r"only 10 examples, but 12 asked"):
        sample_splits(ex, train=5, eval=5, dev=2)
    with pytest.raises(ValueError, match=r"train must be a non-negative int, got -1"):
        sample_splits(ex, train=-1)


def test_load_task_data_absurd_builtin_size_is_a_usage_error() -> None:
    # fuzz-found: --eval-size 4863416990212470 generated examples until the OOM killer came
    with pytest.raises(
        UsageError, match=r"at most 1,000,000 built-in examples.*4,863,416,990,212,480"
    ):
        load_task_data("synthetic", train=10, eval=4_863_416_990_212_470, dev=0)


def test_load_task_data_synthetic_and_file(tmp_path: Path) -> None:
    task, s = load_task_data("synthetic", train=30, eval=20, dev=10, seed=2)
    assert task is get_task("synthetic")
    assert (len(s.train), len(s.eval), len(s.dev)) == (30, 20, 10)
    assert load_task_data("synthetic", train=30, eval=20, dev=10, seed=2)[1] == s
    with pytest.warns(UserWarning, match="synthetic"):
        task, _ = load_task_data("sst2", train=4, eval=4, dev=2)
    assert task.name == "sst2"
    p = write_jsonl(tmp_path / "d.jsonl", [{"text": f"x{i}", "label": i % 2} for i in range(12)])
    _, s = load_task_data("sst2", p, train=5, eval=5, dev=2, seed=0)
    assert sorted(e.text for e in s.train + s.eval + s.dev) == sorted(f"x{i}" for i in range(12))


def test_load_task_data_without_datasets(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` fail
    with pytest.raises(ValueError, match=r"'copa'.*`datasets`.*super_glue/copa.*path="):
        load_task_data("copa")


def test_load_task_data_hub_path_with_fake_datasets(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def load_dataset(path: str, name: str, split: str) -> list[dict]:
        calls.append((path, name, split))
        return [
            {"sentence": f"s{i} _ x.", "option1": "A", "option2": "B", "answer": str(1 + i % 2)}
            for i in range(6)
        ]

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    task, s = load_task_data("winogrande", train=3, eval=2, dev=1)
    assert calls == [("winogrande", "winogrande_xl", "train")]
    assert task.name == "winogrande"
    assert {e.candidates for e in s.train} == {(" A x.", " B x.")}


# --------------------------------------------------------------------------- sampler


def test_epoch_sampler_covers_each_index_once_per_epoch() -> None:
    s = EpochSampler(10, 3, seed=0)
    assert len(s) == s.batches_per_epoch == 4
    for epoch in range(3):
        b = s.batches(epoch)
        assert [len(x) for x in b] == [3, 3, 3, 1]
        assert sorted(i for x in b for i in x) == list(range(10))
    assert s.batches(0) != s.batches(1)
    assert s.batches(1) == EpochSampler(10, 3, seed=0).batches(1)  # deterministic per epoch
    assert s.batches(0) != EpochSampler(10, 3, seed=1).batches(0)


def test_epoch_sampler_drop_last() -> None:
    s = EpochSampler(10, 3, seed=5, drop_last=True)
    b = s.batches(2)
    assert len(b) == 3 and all(len(x) == 3 for x in b)
    assert len({i for x in b for i in x}) == 9
    with pytest.raises(ValueError, match=r"batch_size=11 > n=10"):
        EpochSampler(10, 11, seed=0, drop_last=True)


def test_epoch_sampler_position_matches_batches_and_resumes() -> None:
    s = EpochSampler(7, 2, seed=3)
    flat = [b for e in range(3) for b in s.batches(e)]
    for step, expected in enumerate(flat):
        epoch, index = s.position(step)
        assert (epoch, index) == (step // 4, step % 4)
        assert s.batch(step) == expected
    # a run interrupted at step 5 and resumed by a fresh sampler sees the same batches
    resumed = list(EpochSampler(7, 2, seed=3).iter_from(5, num_steps=len(flat) - 5))
    assert resumed == flat[5:]
    assert list(s) == s.batches(0)
    with pytest.raises(ValueError, match=r"step must be a non-negative int, got -1"):
        s.position(-1)
    # returned batches are copies: mutating one does not change the sampler
    s.batches(0)[0].append(99)
    assert 99 not in s.batches(0)[0]


# --------------------------------------------------------------------------- separate eval/dev files


def test_load_task_data_eval_and_dev_files(tmp_path: Path) -> None:
    train_file = write_jsonl(
        tmp_path / "t.jsonl", [{"text": f"t{i}", "label": i % 2} for i in range(40)]
    )
    val = [{"text": f"v{i}", "label": i % 2} for i in range(25)]
    val_file = write_jsonl(tmp_path / "v.jsonl", val)
    dev_file = tmp_path / "d.tsv"
    dev_file.write_text("sentence\tlabel\n" + "".join(f"d{i}\t{i % 2}\n" for i in range(3)))

    # eval from its own file: all of it when the file is within the cap, in file order
    _, s = load_task_data(
        "sst2", train_file, train=30, eval=100, dev=10, seed=1, eval_data=val_file
    )
    assert s.eval == [Example(f"v{i}", i % 2) for i in range(25)]
    assert (len(s.train), len(s.dev)) == (30, 10)
    assert {e.text[0] for e in s.train + s.dev} == {"t"}  # train/dev drawn from the train file
    assert len({e.text for e in s.train + s.dev}) == 40  # disjoint, and all 40 used
    # the cap applies: 10 of the 25, seeded, distinct
    _, s1 = load_task_data(
        "sst2", train_file, train=30, eval=10, dev=10, seed=1, eval_data=val_file
    )
    _, s2 = load_task_data(
        "sst2", train_file, train=30, eval=10, dev=10, seed=1, eval_data=val_file
    )
    _, s3 = load_task_data(
        "sst2", train_file, train=30, eval=10, dev=10, seed=2, eval_data=val_file
    )
    assert s1 == s2 and len(s1.eval) == len({e.text for e in s1.eval}) == 10
    assert {e.text for e in s1.eval} <= {r["text"] for r in val} and s3.eval != s1.eval
    # both files: the train file only supplies train (40 >= 40; 41 would be too many)
    _, s = load_task_data(
        "sst2", train_file, train=40, eval=5, dev=2, eval_data=val_file, dev_data=dev_file
    )
    assert len(s.train) == 40 and len(s.eval) == 5
    assert len({e.text for e in s.dev}) == 2 and {e.text for e in s.dev} <= {"d0", "d1", "d2"}
    assert all(e.label == int(e.text[1]) % 2 for e in s.dev)
    with pytest.raises(ValueError, match=r"only 40 examples, but 41 asked"):
        load_task_data(
            "sst2", train_file, train=41, eval=5, dev=2, eval_data=val_file, dev_data=dev_file
        )
    # built-in data: a real eval file with the synthetic training set
    _, s = load_task_data("synthetic", train=20, eval=1000, dev=5, eval_data=val_file)
    assert len(s.train) == 20 and len(s.dev) == 5 and len(s.eval) == 25
    # errors in the eval file name it
    with pytest.raises(ValueError, match=r"nope\.tsv.*no such file"):
        load_task_data("sst2", train_file, train=4, eval=2, dev=2, eval_data=tmp_path / "nope.tsv")


# --------------------------------------------------------------------------- reader hardening


@pytest.mark.parametrize("suffix", [".tsv", ".csv"])
def test_field_over_the_csv_default_limit_is_read(tmp_path: Path, suffix: str) -> None:
    sep = "\t" if suffix == ".tsv" else ","
    long_text = "word " * 40_000  # 200,000 characters > csv's default 131,072
    p = tmp_path / f"long{suffix}"
    p.write_text(f"sentence{sep}label\nshort{sep}1\n{long_text}{sep}0\n", encoding="utf-8")
    before = csv.field_size_limit()
    assert load_examples(p, "sst2") == [Example("short", 1), Example(long_text, 0)]
    assert csv.field_size_limit() == before  # the process-wide limit is restored


def test_field_over_the_limit_names_file_line_and_limit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(readers, "FIELD_LIMIT", 1000)
    p = tmp_path / "long.tsv"
    p.write_text("sentence\tlabel\nok\t1\nfine\t0\n" + "x" * 1001 + "\t1\n", encoding="utf-8")
    before = csv.field_size_limit()
    with pytest.raises(UsageError, match=r"long\.tsv: line 4: .*field size limit is 1,000"):
        load_examples(p, "sst2")
    assert csv.field_size_limit() == before


@pytest.mark.parametrize(
    ("name", "content"),
    [
        ("bom.csv", "text,label\nnice,1\n"),
        ("bom.tsv", "sentence\tlabel\nnice\t1\n"),
        ("bom.jsonl", '{"text": "nice", "label": 1}\n'),
        ("bom.json", '[{"text": "nice", "label": 1}]'),
    ],
)
def test_utf8_bom_is_accepted(tmp_path: Path, name: str, content: str) -> None:
    p = tmp_path / name
    p.write_bytes(b"\xef\xbb\xbf" + content.encode("utf-8"))  # what Excel writes
    assert load_examples(p, "sst2") == [Example("nice", 1)]


@pytest.mark.parametrize("name", ["latin.tsv", "latin.jsonl"])
def test_non_utf8_file_is_named(tmp_path: Path, name: str) -> None:
    p = tmp_path / name
    rows = (
        "sentence\tlabel\nok\t1\ncaf\xe9\t0\n"
        if name.endswith(".tsv")
        else ('{"text": "ok", "label": 1}\n{"text": "caf\xe9", "label": 0}\n')
    )
    p.write_bytes(rows.encode("latin-1"))
    with pytest.raises(UsageError, match=re.escape(name) + r": not UTF-8 .*0xe9 on line \d.*UTF-8"):
        load_examples(p, "sst2")


@pytest.mark.parametrize(
    ("header", "words"),
    [
        ("sentence1\tsentence2\tlabel", ["column 'sentence2' holds a second text", "'sst2'"]),
        ("premise\thypothesis\tsentence\tlabel", ["column 'hypothesis'"]),
        ("text\tsentence\tlabel", ["several text columns ['text', 'sentence']"]),
    ],
)
def test_a_second_or_a_doubtful_text_column_is_refused(
    tmp_path: Path, header: str, words: list[str]
) -> None:
    """A pair file loaded as single-text classification silently dropped its second
    sentence, and with both text and sentence columns one was picked without a word."""
    path = tmp_path / "pairs.tsv"
    width = header.count("\t")
    path.write_text(header + "\n" + "\t".join(["A man plays."] * width + ["1"]) + "\n")
    with pytest.raises(UsageError) as info:
        readers.load_examples(path, "sst2")
    for w in words:
        assert w in str(info.value), str(info.value)


def test_an_encoder_sees_the_target_word_of_wic() -> None:
    """The encoder input carried the two sentences only: WiC's target word, the whole
    question, reached the causal template alone."""
    from smoothlab.hybrid.models import load_model

    bundle = load_model(None, D.get_task("wic"))
    pair = dict(text="He sat by the bank.", label=1, text_pair="The bank closed.")
    a, b = (D.Example(**pair, word=w) for w in ("bank", "river"))
    ids = bundle.encode([a, b]).inputs["input_ids"]
    assert not torch.equal(ids[0], ids[1])
    assert bundle.tokenizer.decode(ids[0]).startswith("[CLS] bank : he sat by the bank.")


def test_wrong_column_hint_names_found_and_expected_columns(tmp_path: Path) -> None:
    p = tmp_path / "d.csv"
    p.write_text("text,stars\nok,1\n")
    with pytest.raises(UsageError) as info:
        load_examples(p, "sst2")
    msg = str(info.value)
    assert "['text', 'stars']" in msg and "['label']" in msg
    assert "label_column" not in msg and "=" not in msg  # no flag the CLI does not have
    q = tmp_path / "e.csv"
    q.write_text("review,label\nok,1\n")
    with pytest.raises(UsageError) as info:
        load_examples(q, "sst2")
    assert "['text', 'sentence', 'sentence1']" in str(info.value)
    assert "text_column" not in str(info.value)


def test_user_input_errors_are_usage_errors(tmp_path: Path) -> None:
    bad = tmp_path / "bad.tsv"
    bad.write_text("sentence\tlabel\nfine\tmaybe\n")
    cases = [
        lambda: get_task("boolq"),
        lambda: load_examples(tmp_path / "nope.tsv", "sst2"),
        lambda: load_examples(tmp_path / "x.txt", "sst2"),
        lambda: load_examples(bad, "sst2"),
        lambda: sample_splits([Example("t", 0)], train=2),
        lambda: load_task_data("sst2", bad),
        lambda: EpochSampler(0, 1),
        lambda: synthetic_sentiment(-1),
    ]
    for case in cases:
        with pytest.raises(UsageError):
            case()


# --------------------------------------------------------------------------- CLI wording


def _cli_error(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    from smoothlab.cli import main

    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err
    return err


def test_probe_too_few_examples_names_batch_size(tmp_path, capsys) -> None:
    """A probe draws --batch-size examples: the message names that flag, not train/eval/dev."""
    data = tmp_path / "three.tsv"
    data.write_text("sentence\tlabel\n" + "".join(f"s{i}\t{i % 2}\n" for i in range(3)))
    err = _cli_error(["probe", "--data", str(data), "--batch-size", "5"], capsys)
    assert "only 3 examples, but 5 asked (--batch-size 5)" in err, err
    assert "lower --batch-size" in err and "train=" not in err and "eval" not in err, err
    err = _cli_error(
        ["train", "--data", str(data), "--train-size", "2", "--eval-size", "2", "--out",
         str(tmp_path / "run")],
        capsys,
    )  # fmt: skip
    assert "(--train-size 2 + --eval-size 2 + --dev-size 100)" in err, err


def test_task_without_data_names_the_data_flag(monkeypatch, tmp_path, capsys) -> None:
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` fail
    for argv in (["probe"], ["train", "--out", str(tmp_path / "run")]):
        err = _cli_error([*argv, "--task", "copa"], capsys)
        assert "'copa'" in err and "with --data" in err and "path=" not in err, err
    with pytest.raises(UsageError, match=r"with path="):  # the Python API names its argument
        load_task_data("copa")
    with pytest.raises(UsageError, match=r"but 7 asked \(train=3 \+ dev=4\); lower train or dev"):
        sample_splits([Example("t", 0)] * 5, train=3, eval=0, dev=4)


# --------------------------------------------------------------------------- CSV quotes, headers


@pytest.mark.parametrize(
    "body",
    [
        '"unterminated,1\nok,0\n',  # the row swallows the rest: 1 field, the header has 2
        'ok,"unterminated\nsecond,0\nthird,1\n',  # 2 fields, as the header: read silently before
    ],
)
def test_csv_unterminated_quote_is_named(tmp_path: Path, body: str) -> None:
    p = tmp_path / "q.csv"
    p.write_text("sentence,label\n" + body, encoding="utf-8")
    with pytest.raises(UsageError, match=r"q\.csv: line 2 opens a quoted field that never close"):
        load_examples(p, "sst2")


def test_csv_quotes_that_close_are_still_read(tmp_path: Path) -> None:
    p = tmp_path / "ok.csv"
    p.write_text('sentence,label\n"multi\nline",1\n"a ""b"", c",0\n', encoding="utf-8")
    assert load_examples(p, "sst2") == [Example("multi\nline", 1), Example('a "b", c', 0)]
    p.write_text('sentence,label\n"a"b,c,1\n', encoding="utf-8")  # 3 fields, no open quote
    with pytest.raises(UsageError, match=r"line 2 has 3 fields.*check the delimiter"):
        load_examples(p, "sst2")


@pytest.mark.parametrize("suffix", [".tsv", ".csv"])
def test_duplicate_header_column_is_refused(tmp_path: Path, suffix: str) -> None:
    sep = "\t" if suffix == ".tsv" else ","
    p = tmp_path / f"dup{suffix}"
    p.write_text(sep.join(["sentence", "label", " sentence"]) + "\n" + sep.join("x1y") + "\n")
    with pytest.raises(UsageError) as info:
        load_examples(p, "sst2")
    msg = str(info.value)
    assert str(p) in msg and "column 'sentence' twice" in msg, msg


# --------------------------------------------------------------------------- read once
def _sst2_file(path: Path, n: int = 40) -> Path:
    path.write_text(
        "sentence\tlabel\n"
        + "".join(f"a {'good' if i % 2 else 'bad'} film {i}\t{i % 2}\n" for i in range(n))
    )
    return path


def test_file_digests_are_of_the_bytes_parsed(tmp_path, monkeypatch):
    import hashlib

    monkeypatch.chdir(tmp_path)
    train = _sst2_file(tmp_path / "train.tsv")
    dev = tmp_path / "dev.jsonl"
    dev.write_bytes(b'\xef\xbb\xbf{"sentence": "ok", "label": 1}\n')  # a BOM is hashed too
    with D.file_digests() as seen:
        load_task_data("sst2", str(train), train=8, eval=4, dev=1, dev_data="./dev.jsonl")
    assert seen == {
        str(train): hashlib.sha256(train.read_bytes()).hexdigest(),
        "dev.jsonl": hashlib.sha256(dev.read_bytes()).hexdigest(),  # the path as given
    }
    load_task_data("sst2", str(train), train=8, eval=4, dev=1)  # outside the block: kept out
    assert len(seen) == 2


def test_train_reads_the_data_file_once(tmp_path, monkeypatch):
    """A run read its data file twice at the start: parsed by build(), then read again for
    the checkpoint's sha256 (so an edit in between was hashed but not trained on). Once now,
    with the same digest as hashing the file."""
    import builtins
    import hashlib

    from smoothlab.hybrid.train import TrainConfig, Trainer
    from tests.tiny_models import tiny_causal_lm

    model = tmp_path / "opt"
    tiny_causal_lm("opt", seed=0, save_dir=model)
    data = _sst2_file(tmp_path / "d.tsv")
    reads = []
    real_read_bytes, real_open = Path.read_bytes, builtins.open

    def read_bytes(self):
        reads.extend([self] if self.name == data.name else [])
        return real_read_bytes(self)

    def opened(file, *args, **kwargs):
        reads.extend([file] if str(file).endswith(data.name) else [])
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(Path, "read_bytes", read_bytes)
    monkeypatch.setattr(builtins, "open", opened)
    cfg = TrainConfig(
        model=str(model),
        data=str(data),
        task="sst2",
        method="fo-lora",
        train_size=16,
        eval_size=8,
        dev_size=4,
        steps=1,
        out=str(tmp_path / "run"),
    )
    trainer = Trainer(cfg, progress=False)
    assert len(reads) == 1, reads
    assert trainer.data_digest == {"data": hashlib.sha256(data.read_bytes()).hexdigest()}
