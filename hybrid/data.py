"""Tasks and data: examples, prompt templates, local files (TSV/CSV/JSONL), the built-in
synthetic sentiment set, and the paper's seeded 1,000 / 1,000 / 100 sampling.

Every task reduces to one shape: an :class:`Example` has a gold index ``label`` into a list
of options. For classification tasks (SST-2, WiC) the options are the task's label words
(the verbalizer); for multiple-choice tasks (COPA, WinoGrande) they are the example's own
candidates. Models score every option and the loss is the cross-entropy over options.

Text convention (MeZO's): the string a causal LM reads for option ``i`` is
``task.prompt(example) + task.options(example)[i]``; every option carries its own leading
space (``" great"``, ``" he fell."``), so a prompt never ends with whitespace and the
context/continuation boundary falls on a token boundary for BPE tokenizers.
:meth:`Task.scoring_pairs` splits that string into ``(context, continuation)`` pairs: the
LM log-likelihood is summed over the continuation only. For WinoGrande this is MeZO's
*partial scoring*: the context is the sentence up to the blank with the option filled in,
the continuation is the rest of the sentence, so every option is scored on the same words.
"""

from __future__ import annotations

import csv
import json
import random
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "Example",
    "Task",
    "TASKS",
    "get_task",
    "load_examples",
    "synthetic_sentiment",
    "Splits",
    "sample_splits",
    "load_task_data",
    "EpochSampler",
]


@dataclass(frozen=True)
class Example:
    """One example.

    ``text``: the input (classification) or the context (multiple choice).
    ``text_pair``: an optional second segment (WiC's second sentence).
    ``candidates``: the options of a multiple-choice example; ``None`` for classification,
    whose options are :attr:`Task.label_words`.
    ``label``: index of the gold option.
    ``word``: an optional target word the template may use (WiC's ``{word}``).
    ``score_from``: partial scoring (WinoGrande). ``score_from[i]`` is the character offset
    in ``candidates[i]`` where the scored continuation begins; the characters before it
    belong to the context. ``None``: score each option as a whole.
    """

    text: str
    label: int
    text_pair: str | None = None
    candidates: tuple[str, ...] | None = None
    word: str | None = None
    score_from: tuple[int, ...] | None = None


@dataclass(frozen=True)
class Task:
    """A task: its name, kind and verbalizer.

    ``kind`` is ``"classification"`` or ``"multiple_choice"``. ``label_words`` are the words
    a causal LM scores for each class (classification only); ``template`` formats the prompt
    context for a causal LM; ``num_options`` is the number of options per example.
    ``label_aliases[c]``: lower-case strings accepted for class ``c`` in label columns of
    local files (besides the index ``c`` itself). ``hub_path``/``hub_name``: the dataset's
    name on the Hugging Face hub, used by :func:`load_task_data` when no file is given.
    """

    name: str
    kind: str
    num_options: int
    label_words: tuple[str, ...] = ()
    template: str = "{text}"
    label_aliases: tuple[tuple[str, ...], ...] = ()
    hub_path: str | None = None
    hub_name: str | None = None

    def prompt(self, example: Example) -> str:
        """The causal-LM context for ``example``: :attr:`template` formatted with the
        example's fields ``{text}``, ``{text_pair}`` and ``{word}``.

        >>> get_task("sst2").prompt(Example("a gem .", 1))
        'a gem . It was'
        """
        fields = {"text": example.text, "text_pair": example.text_pair, "word": example.word}
        try:
            out = self.template.format_map(fields)
        except (KeyError, IndexError) as err:
            raise ValueError(
                f"task {self.name!r}: template {self.template!r} uses an unknown field {err}; "
                "accepted fields: {text}, {text_pair}, {word}"
            ) from None
        for key, value in fields.items():
            if value is None and "{" + key + "}" in self.template:
                raise ValueError(
                    f"task {self.name!r}: template {self.template!r} needs {key!r}, "
                    f"but the example has {key}=None"
                )
        return out

    def options(self, example: Example) -> tuple[str, ...]:
        """The options scored for ``example``: :attr:`label_words` for classification,
        ``example.candidates`` for multiple choice."""
        if self.kind == "classification":
            return self.label_words
        if example.candidates is None:
            raise ValueError(
                f"task {self.name!r} is multiple choice but the example has no candidates"
            )
        return example.candidates

    def scoring_pairs(self, example: Example) -> list[tuple[str, str]]:
        """``(context, continuation)`` for each option: the LM scores
        ``log p(continuation | context)``, and ``context + continuation`` is always
        ``prompt(example) + options(example)[i]``. Without partial scoring the context is
        the prompt; with it (WinoGrande) the context also holds the option's first
        ``score_from[i]`` characters."""
        prompt = self.prompt(example)
        opts = self.options(example)
        if example.score_from is None:
            return [(prompt, o) for o in opts]
        return [(prompt + o[:k], o[k:]) for o, k in zip(opts, example.score_from, strict=True)]


_SENTIMENT_ALIASES = (("negative", "neg", "terrible"), ("positive", "pos", "great"))

TASKS: dict[str, Task] = {
    "sst2": Task(
        name="sst2",
        kind="classification",
        num_options=2,
        label_words=(" terrible", " great"),
        template="{text} It was",
        label_aliases=_SENTIMENT_ALIASES,
        hub_path="glue",
        hub_name="sst2",
    ),
    "synthetic": Task(
        name="synthetic",
        kind="classification",
        num_options=2,
        label_words=(" terrible", " great"),
        template="{text} It was",
        label_aliases=_SENTIMENT_ALIASES,
    ),
    "copa": Task(
        name="copa",
        kind="multiple_choice",
        num_options=2,
        template="{text}",
        hub_path="super_glue",
        hub_name="copa",
    ),
    "winogrande": Task(
        name="winogrande",
        kind="multiple_choice",
        num_options=2,
        template="{text}",
        hub_path="winogrande",
        hub_name="winogrande_xl",
    ),
    "wic": Task(
        name="wic",
        kind="classification",
        num_options=2,
        label_words=(" No", " Yes"),
        template=(
            '{text} {text_pair} Does the word "{word}" have the same meaning in both sentences?'
        ),
        label_aliases=(("false", "no"), ("true", "yes")),
        hub_path="super_glue",
        hub_name="wic",
    ),
}


def get_task(name: str) -> Task:
    """The registered task called ``name`` (one of :data:`TASKS`)."""
    if not isinstance(name, str) or name not in TASKS:
        raise ValueError(f"unknown task {name!r}; accepted: {', '.join(sorted(TASKS))}")
    return TASKS[name]


# --------------------------------------------------------------------------- file reading

_TEXT_COLUMNS = ("text", "sentence", "sentence1")
_LABEL_COLUMNS = ("label",)
_EXTENSIONS = (".tsv", ".csv", ".jsonl", ".json")


def _read_records(path: Path) -> tuple[list[str], list[tuple[int, dict[str, Any]]], str]:
    """Read ``path`` into ``(columns, [(line_number, record)], unit)``; ``unit`` is how a
    position in the file is named in errors (``"line"`` or ``"record"``)."""
    suffix = path.suffix.lower()
    if suffix in (".tsv", ".csv"):
        with path.open(newline="", encoding="utf-8") as fh:
            if suffix == ".tsv":
                reader = csv.reader(fh, delimiter="\t", quoting=csv.QUOTE_NONE)
            else:
                reader = csv.reader(fh)
            header = next(reader, None)
            if header is None:
                return [], [], "line"
            header = [h.strip() for h in header]
            width = len(header)
            rows: list[tuple[int, dict[str, Any]]] = []
            for row in reader:
                if not row:
                    continue
                if len(row) != width:
                    raise ValueError(
                        f"{path}: line {reader.line_num} has {len(row)} fields, the header "
                        f"has {width} ({header}); check the delimiter "
                        f"({'tab' if suffix == '.tsv' else 'comma'} for {suffix} files)"
                    )
                rows.append((reader.line_num, dict(zip(header, row, strict=True))))
        return header, rows, "line"

    with path.open(encoding="utf-8") as fh:
        content = fh.read()
    if suffix == ".json" and content.lstrip().startswith("["):
        try:
            items = json.loads(content)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: not valid JSON ({err})") from None
        records = list(enumerate(items, start=1))
        unit = "record"
    else:
        records = []
        unit = "line"
        for number, line in enumerate(content.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                records.append((number, json.loads(line)))
            except json.JSONDecodeError as err:
                raise ValueError(
                    f"{path}: line {number} is not valid JSON ({err}); expected one JSON "
                    "object per line"
                ) from None
    for number, rec in records:
        if not isinstance(rec, dict):
            raise ValueError(
                f"{path}: {unit} {number} is {type(rec).__name__} {rec!r:.60}, expected a JSON "
                'object such as {"text": ..., "label": ...}'
            )
    columns = list(records[0][1]) if records else []
    return columns, records, unit


def _label_index(value: Any, task: Task, where: str) -> int:
    """Map a raw label (int, bool, or string) to a class index of ``task``."""
    n = task.num_options
    raw = value
    if isinstance(value, bool):
        value = "true" if value else "false"
    if isinstance(value, int) and 0 <= value < n:
        return value
    if isinstance(value, str):
        key = value.strip().lower()
        if key.lstrip("-").isdigit() and 0 <= int(key) < n:
            return int(key)
        for index, aliases in enumerate(task.label_aliases):
            if key in aliases:
                return index
    accepted = [str(i) for i in range(n)]
    for index, aliases in enumerate(task.label_aliases):
        accepted.append(f"{index}: {'/'.join(aliases)}")
    raise ValueError(
        f"{where}: bad label {raw!r} for task {task.name!r}; accepted: {', '.join(accepted)}"
    )


def _require(columns: Sequence[str], needed: Sequence[str], path: Path, task: Task) -> None:
    missing = [c for c in needed if c not in columns]
    if missing:
        raise ValueError(
            f"{path}: missing column(s) {missing} for task {task.name!r}; columns found: "
            f"{list(columns)}; expected: {list(needed)}"
        )


def _field(rec: Mapping[str, Any], key: str, where: str) -> Any:
    try:
        return rec[key]
    except KeyError:
        raise ValueError(f"{where}: missing field {key!r}; fields found: {list(rec)}") from None


def _pick_column(
    columns: Sequence[str],
    given: str | None,
    candidates: Sequence[str],
    role: str,
    path: Path,
    arg: str,
) -> str:
    if given is not None:
        if given not in columns:
            raise ValueError(
                f"{path}: {arg}={given!r} is not a column; columns found: {list(columns)}"
            )
        return given
    for name in candidates:
        if name in columns:
            return name
    raise ValueError(
        f"{path}: no {role} column found; looked for {list(candidates)}; columns found: "
        f"{list(columns)}; pass {arg}= to choose one"
    )


def _parse_classification(
    path: Path,
    task: Task,
    columns: Sequence[str],
    records: Iterable[tuple[int, dict[str, Any]]],
    unit: str,
    text_column: str | None,
    label_column: str | None,
) -> list[Example]:
    text_col = _pick_column(columns, text_column, _TEXT_COLUMNS, "text", path, "text_column")
    label_col = _pick_column(columns, label_column, _LABEL_COLUMNS, "label", path, "label_column")
    out: list[Example] = []
    append = out.append
    n = task.num_options
    fast = {str(i): i for i in range(n)} | {i: i for i in range(n)}
    for number, rec in records:
        label = rec.get(label_col)
        index = fast.get(label) if type(label) in (int, str) else None  # bools fall through
        if index is None:
            where = f"{path}: {unit} {number}"
            index = _label_index(_field(rec, label_col, where), task, where)
        text = rec.get(text_col)
        if not isinstance(text, str):
            where = f"{path}: {unit} {number}"
            raise ValueError(f"{where}: column {text_col!r} must hold a string, got {text!r}")
        append(Example(text, index))
    return out


def _parse_copa(
    path: Path,
    task: Task,
    columns: Sequence[str],
    records: Iterable[tuple[int, dict[str, Any]]],
    unit: str,
) -> list[Example]:
    needed = ("premise", "choice1", "choice2", "question", "label")
    _require(columns, needed, path, task)
    connectors = {"cause": " because", "effect": " so"}
    out = []
    for number, rec in records:
        where = f"{path}: {unit} {number}"
        premise, c1, c2, question, label = (_field(rec, k, where) for k in needed)
        if question not in connectors:
            raise ValueError(f"{where}: bad question {question!r}; accepted: 'cause', 'effect'")
        premise = str(premise).rstrip()
        if premise.endswith("."):
            premise = premise[:-1]
        cands = tuple(" " + _lower_first(str(c).strip()) for c in (c1, c2))
        out.append(
            Example(
                premise + connectors[question], _label_index(label, task, where), candidates=cands
            )
        )
    return out


def _lower_first(s: str) -> str:
    return s[:1].lower() + s[1:]


def _parse_winogrande(
    path: Path,
    task: Task,
    columns: Sequence[str],
    records: Iterable[tuple[int, dict[str, Any]]],
    unit: str,
) -> list[Example]:
    needed = ("sentence", "option1", "option2", "answer")
    _require(columns, needed, path, task)
    out = []
    for number, rec in records:
        where = f"{path}: {unit} {number}"
        sentence, o1, o2, answer = (_field(rec, k, where) for k in needed)
        sentence = str(sentence)
        if sentence.count("_") != 1:
            raise ValueError(
                f"{where}: sentence {sentence!r} must contain exactly one blank '_', "
                f"found {sentence.count('_')}"
            )
        if str(answer).strip() not in ("1", "2"):
            raise ValueError(f"{where}: bad answer {answer!r}; accepted: '1', '2'")
        blank = sentence.index("_")
        before, after = sentence[:blank], sentence[blank + 1 :]
        prefix = before.rstrip()
        gap = before[len(prefix) :]
        heads = tuple(gap + str(o) for o in (o1, o2))
        out.append(
            Example(
                prefix,
                int(str(answer).strip()) - 1,
                candidates=tuple(h + after for h in heads),
                score_from=tuple(len(h) for h in heads),
            )
        )
    return out


def _parse_wic(
    path: Path,
    task: Task,
    columns: Sequence[str],
    records: Iterable[tuple[int, dict[str, Any]]],
    unit: str,
) -> list[Example]:
    needed = ("word", "sentence1", "sentence2", "label")
    _require(columns, needed, path, task)
    out = []
    for number, rec in records:
        where = f"{path}: {unit} {number}"
        word, s1, s2, label = (_field(rec, k, where) for k in needed)
        out.append(
            Example(str(s1), _label_index(label, task, where), text_pair=str(s2), word=str(word))
        )
    return out


def _parse(
    path: Path,
    task: Task,
    columns: Sequence[str],
    records: Sequence[tuple[int, dict[str, Any]]],
    unit: str,
    text_column: str | None,
    label_column: str | None,
) -> list[Example]:
    if not records:
        raise ValueError(f"{path}: no examples (the file is empty or holds only a header)")
    special = {"copa": _parse_copa, "winogrande": _parse_winogrande, "wic": _parse_wic}
    if task.name in special:
        if text_column is not None or label_column is not None:
            raise ValueError(
                f"text_column/label_column apply to single-text classification files; task "
                f"{task.name!r} has a fixed layout"
            )
        return special[task.name](path, task, columns, records, unit)
    if task.kind != "classification":
        raise ValueError(
            f"no file layout known for multiple-choice task {task.name!r}; "
            f"accepted multiple-choice tasks: copa, winogrande"
        )
    return _parse_classification(path, task, columns, records, unit, text_column, label_column)


def load_examples(
    path: str | Path,
    task: str | Task,
    *,
    text_column: str | None = None,
    label_column: str | None = None,
) -> list[Example]:
    """Read the examples of ``task`` from a local file.

    The format follows the extension: ``.tsv`` (tab-separated with a header, no quoting:
    GLUE's layout), ``.csv`` (comma-separated with a header, standard quoting), ``.jsonl``
    (one JSON object a line) or ``.json`` (JSON lines, or one array of objects).

    Layouts:

    * classification (sst2, synthetic, or any classification :class:`Task`): a text column
      (``text``, ``sentence`` or ``sentence1``; or ``text_column``) and a ``label`` column
      (or ``label_column``) holding a class index or an alias such as
      ``negative``/``positive`` (:attr:`Task.label_aliases`).
    * copa (SuperGLUE): ``premise, choice1, choice2, question, label``. Context =
      premise without its final period + ``" because"`` (cause) or ``" so"`` (effect);
      candidates = ``" " +`` each choice with its first letter lower-cased.
    * winogrande: ``sentence, option1, option2, answer`` (``"1"``/``"2"``). ``text`` = the
      sentence before the blank ``_`` (trailing space removed), candidate ``i`` =
      ``" " + option_i +`` the sentence after the blank, ``score_from[i]`` = where the
      part after the blank starts (partial scoring, see :meth:`Task.scoring_pairs`).
    * wic (SuperGLUE): ``word, sentence1, sentence2, label`` (true/false); other fields
      (``start1``, ``end1``, ...) are ignored.

    Raises ``ValueError`` naming the file for a missing file, an unknown extension, missing
    columns, bad labels (with the line number) and files without examples.
    """
    task = get_task(task) if isinstance(task, str) else task
    path = Path(path)
    if path.suffix.lower() not in _EXTENSIONS:
        raise ValueError(
            f"{path}: unknown extension {path.suffix!r}; accepted: {', '.join(_EXTENSIONS)}"
        )
    if not path.is_file():
        raise ValueError(f"{path}: no such file")
    columns, records, unit = _read_records(path)
    return _parse(path, task, columns, records, unit, text_column, label_column)


# --------------------------------------------------------------------------- synthetic set

_POSITIVE = (
    "wonderful",
    "great",
    "delightful",
    "moving",
    "charming",
    "brilliant",
    "engaging",
    "funny",
    "beautiful",
    "clever",
    "gripping",
    "heartfelt",
    "superb",
    "enjoyable",
    "fresh",
    "memorable",
    "touching",
    "impressive",
)
_NEGATIVE = (
    "dull",
    "boring",
    "awful",
    "tedious",
    "clumsy",
    "bland",
    "predictable",
    "messy",
    "lifeless",
    "painful",
    "shallow",
    "forgettable",
    "tiresome",
    "annoying",
    "weak",
    "pointless",
    "flat",
    "disappointing",
)
_NOUNS = (
    "movie",
    "film",
    "plot",
    "script",
    "acting",
    "story",
    "ending",
    "cast",
    "soundtrack",
    "dialogue",
    "direction",
    "pacing",
    "lead performance",
    "screenplay",
    "cinematography",
    "final act",
    "premise",
    "humor",
)
_INTENSIFIERS = ("really", "very", "truly", "quite", "remarkably", "rather", "utterly", "so")
_OPENERS = ("", "", "", "Honestly, ", "Overall, ", "In the end, ", "To be fair, ", "Frankly, ")
_TEMPLATES = (
    "{opener}the {noun} was {intens}{adj}.",
    "{opener}the {noun} is {intens}{adj}.",
    "{opener}I found the {noun} {intens}{adj}.",
    "{opener}this {noun} felt {intens}{adj}.",
    "{opener}the {noun} seemed {intens}{adj} to me.",
    "{opener}what {a} {intens}{adj} {noun}.",
    "{opener}{a} {intens}{adj} {noun} from start to finish.",
    "{opener}it has {a} {intens}{adj} {noun}.",
)
_NEGATED_TEMPLATES = (
    "{opener}the {noun} was not {intens}{adj}.",
    "{opener}the {noun} is not {intens}{adj}.",
    "{opener}I did not find the {noun} {intens}{adj}.",
    "{opener}this {noun} did not feel {intens}{adj}.",
    "{opener}the {noun} was not {intens}{adj} at all.",
)
_NEGATION_RATE = 0.15
_MAX_TRIES = 20


def synthetic_sentiment(n: int, seed: int = 0) -> list[Example]:
    """``n`` short movie-review sentences with sentiment labels (0 negative, 1 positive),
    generated from small word lists; deterministic given ``seed`` (``random.Random(seed)``).

    Labels are balanced (``n // 2`` and ``n - n // 2``, shuffled). Each sentence has one
    polar adjective; in about 15% of sentences a ``"not"`` flips it, so
    ``label = polarity(adjective) XOR negated``: a bag of adjectives alone scores about 85%.
    Sentences are distinct while the word lists allow (up to 20 redraws per sentence).
    """
    if not isinstance(n, int) or isinstance(n, bool) or n < 0:
        raise ValueError(f"n must be a non-negative int, got {n!r}")
    rng = random.Random(seed)
    labels = [i % 2 for i in range(n)]
    rng.shuffle(labels)
    seen: set[str] = set()
    out = []
    for label in labels:
        negated = rng.random() < _NEGATION_RATE
        for _ in range(_MAX_TRIES):  # avoid duplicates (which would leak across splits)
            template = rng.choice(_NEGATED_TEMPLATES if negated else _TEMPLATES)
            positive = bool(label) != negated
            adj = rng.choice(_POSITIVE if positive else _NEGATIVE)
            intens = rng.choice(_INTENSIFIERS) + " " if rng.random() < 0.5 else ""
            sentence = template.format(
                opener=rng.choice(_OPENERS),
                noun=rng.choice(_NOUNS),
                intens=intens,
                adj=adj,
                a="an" if (intens or adj)[0] in "aeiou" else "a",
            )
            sentence = sentence[0].upper() + sentence[1:]
            if sentence not in seen:
                break
        seen.add(sentence)
        out.append(Example(sentence, label))
    return out


# --------------------------------------------------------------------------- splits


@dataclass(frozen=True)
class Splits:
    """Disjoint ``train``, ``eval`` and ``dev`` example lists."""

    train: list[Example]
    eval: list[Example]
    dev: list[Example]


def sample_splits(
    examples: Sequence[Example],
    *,
    train: int = 1000,
    eval: int = 1000,
    dev: int = 100,
    seed: int = 0,
) -> Splits:
    """The paper's sampling: ``train + eval + dev`` distinct examples drawn without
    replacement with ``random.Random(seed)``, cut into three disjoint splits.

    Raises ``ValueError`` if ``examples`` holds fewer than ``train + eval + dev``.
    """
    for name, value in (("train", train), ("eval", eval), ("dev", dev)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ValueError(f"{name} must be a non-negative int, got {value!r}")
    total = train + eval + dev
    if len(examples) < total:
        raise ValueError(
            f"only {len(examples)} examples, but {total} asked "
            f"(train={train} + eval={eval} + dev={dev})"
        )
    chosen = random.Random(seed).sample(range(len(examples)), total)
    picked = [examples[i] for i in chosen]
    return Splits(
        train=picked[:train], eval=picked[train : train + eval], dev=picked[train + eval :]
    )


def _load_hub(task: Task) -> list[Example]:
    """Examples of ``task``'s hub dataset (``train`` split), via the ``datasets`` package."""
    try:
        import datasets  # optional, imported lazily
    except ImportError:
        raise ValueError(
            f"task {task.name!r} has no built-in data and the `datasets` package is not "
            f"installed, so {task.hub_path}/{task.hub_name} cannot be loaded from the hub; "
            "pass path= to a local .tsv/.csv/.jsonl file"
        ) from None
    ds = datasets.load_dataset(task.hub_path, task.hub_name, split="train")
    records = [(i, dict(rec)) for i, rec in enumerate(ds, start=1)]
    columns = list(records[0][1]) if records else []
    source = Path(f"hub:{task.hub_path}/{task.hub_name}")
    return _parse(source, task, columns, records, "record", None, None)


def load_task_data(
    task_name: str,
    path: str | Path | None = None,
    *,
    train: int = 1000,
    eval: int = 1000,
    dev: int = 100,
    seed: int = 0,
) -> tuple[Task, Splits]:
    """The task and its seeded splits.

    With ``path``: :func:`load_examples` then :func:`sample_splits`. Without: ``synthetic``
    and ``sst2`` use :func:`synthetic_sentiment` (``train + eval + dev`` examples; for
    ``sst2`` a warning says so); other tasks load their hub dataset (``train`` split) with
    the ``datasets`` package if it is installed, else raise ``ValueError`` asking for a
    local file.
    """
    task = get_task(task_name)
    if path is not None:
        examples = load_examples(path, task)
    elif task.name in ("synthetic", "sst2"):
        if task.name == "sst2":
            warnings.warn(
                "load_task_data('sst2') without path uses the built-in synthetic sentiment "
                "set; pass path= to the GLUE SST-2 train.tsv for real data",
                UserWarning,
                stacklevel=2,
            )
        examples = synthetic_sentiment(train + eval + dev, seed)
    else:
        examples = _load_hub(task)
    return task, sample_splits(examples, train=train, eval=eval, dev=dev, seed=seed)


# --------------------------------------------------------------------------- minibatches


class EpochSampler:
    """Minibatches by random reshuffling: epoch ``e`` visits a fresh permutation of
    ``range(n)`` drawn from ``torch.Generator().manual_seed(seed + e)``, cut into batches of
    ``batch_size`` (the last one smaller, or dropped with ``drop_last``).

    Global step ``k`` always maps to the same batch (``position(k)`` then ``batches``), so
    a run resumed at step ``k`` sees exactly the batches an uninterrupted run would.
    """

    def __init__(self, n: int, batch_size: int, seed: int = 0, drop_last: bool = False) -> None:
        if not isinstance(n, int) or n < 1:
            raise ValueError(f"n must be a positive int, got {n!r}")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        if drop_last and batch_size > n:
            raise ValueError(
                f"batch_size={batch_size} > n={n} with drop_last=True leaves no batch; "
                "use batch_size <= n or drop_last=False"
            )
        self.n = n
        self.batch_size = batch_size
        self.seed = seed
        self.drop_last = drop_last
        self._cache: tuple[int, list[list[int]]] | None = None

    @property
    def batches_per_epoch(self) -> int:
        """Number of batches in one epoch."""
        if self.drop_last:
            return self.n // self.batch_size
        return -(-self.n // self.batch_size)

    def __len__(self) -> int:
        return self.batches_per_epoch

    def batches(self, epoch: int) -> list[list[int]]:
        """All batches of ``epoch`` (0-based), in order."""
        if not isinstance(epoch, int) or epoch < 0:
            raise ValueError(f"epoch must be a non-negative int, got {epoch!r}")
        if self._cache is not None and self._cache[0] == epoch:
            return [list(b) for b in self._cache[1]]
        gen = torch.Generator().manual_seed(self.seed + epoch)
        perm = torch.randperm(self.n, generator=gen).tolist()
        b = self.batch_size
        out = [perm[i : i + b] for i in range(0, self.batches_per_epoch * b, b)]
        self._cache = (epoch, out)
        return [list(x) for x in out]

    def position(self, step: int) -> tuple[int, int]:
        """``(epoch, index_in_epoch)`` of global step ``step`` (0-based)."""
        if not isinstance(step, int) or step < 0:
            raise ValueError(f"step must be a non-negative int, got {step!r}")
        return divmod(step, self.batches_per_epoch)

    def batch(self, step: int) -> list[int]:
        """The indices of global step ``step``."""
        epoch, index = self.position(step)
        return self.batches(epoch)[index]

    def iter_from(self, step: int = 0, num_steps: int | None = None) -> Iterator[list[int]]:
        """Batches of global steps ``step, step + 1, ...`` (``num_steps`` of them, or
        without end)."""
        k = step
        while num_steps is None or k < step + num_steps:
            yield self.batch(k)
            k += 1

    def __iter__(self) -> Iterator[list[int]]:
        """The batches of epoch 0."""
        return iter(self.batches(0))
