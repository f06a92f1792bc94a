"""The task registry: one :class:`Task` entry per task, carrying its verbalizer, prompt
template, file layout (parser and columns), help text and data sources.

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

Adding a task is one :func:`register_task` call (or one entry below) plus its parse
function ``parse(task, records, text_column, label_column) -> list[Example]``; the file
readers, :func:`smoothlab.hybrid.sampling.load_task_data` and the CLI help read the entry.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from smoothlab.errors import UsageError

__all__ = [
    "Example",
    "Records",
    "Task",
    "TASKS",
    "get_task",
    "parse_classification",
    "register_task",
    "task_help",
    "task_names",
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
class Records:
    """Raw records read from one source, before a task parses them.

    ``source``: the file (or ``hub:path/name``) named in errors; ``columns``: the header
    (or the first record's keys); ``rows``: ``(position, record)`` pairs; ``unit``: how a
    position is named in errors (``"line"`` or ``"record"``).
    """

    source: Path
    columns: list[str]
    rows: Sequence[tuple[int, dict[str, Any]]]
    unit: str = "line"

    def where(self, number: int) -> str:
        """``"<source>: <unit> <number>"``, the prefix of a per-record error."""
        return f"{self.source}: {self.unit} {number}"


Parser = Callable[["Task", Records, "str | None", "str | None"], "list[Example]"]
Builtin = Callable[[int, int], "list[Example]"]


@dataclass(frozen=True)
class Task:
    """A task: its name, kind, verbalizer, file layout and data sources.

    ``kind`` is ``"classification"`` or ``"multiple_choice"``. ``label_words`` are the words
    a causal LM scores for each class (classification only); ``template`` formats the prompt
    context for a causal LM; ``num_options`` is the number of options per example.
    ``label_aliases[c]``: lower-case strings accepted for class ``c`` in label columns of
    local files (besides the index ``c`` itself). ``hub_path``/``hub_name``: the dataset's
    name on the Hugging Face hub, used by :func:`smoothlab.hybrid.sampling.load_task_data` when no file
    is given.

    File layout: ``parser(task, records, text_column, label_column)`` turns records into
    examples; ``None`` means :func:`parse_classification` (a text and a label column, chosen
    by name) for classification tasks. ``columns``: the fixed columns a parser needs (checked
    before it runs; a fixed layout refuses ``text_column``/``label_column``). ``help``: one
    line for the CLI. ``builtin(n, seed)``: built-in examples used without a file (with
    ``builtin_note`` as a warning when they are a stand-in for the real data).
    """

    name: str
    kind: str
    num_options: int
    label_words: tuple[str, ...] = ()
    template: str = "{text}"
    label_aliases: tuple[tuple[str, ...], ...] = ()
    hub_path: str | None = None
    hub_name: str | None = None
    parser: Parser | None = field(default=None, compare=False, repr=False)
    columns: tuple[str, ...] = ()
    help: str = ""
    builtin: Builtin | None = field(default=None, compare=False, repr=False)
    builtin_note: str | None = None

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

    def parse(
        self,
        records: Records,
        *,
        text_column: str | None = None,
        label_column: str | None = None,
    ) -> list[Example]:
        """The examples in ``records``, through this task's :attr:`parser`.

        Raises :class:`~smoothlab.errors.UsageError` naming the source for an empty source,
        missing columns, bad values (with the line) and column choices a fixed layout refuses.
        """
        if not records.rows:
            raise UsageError(
                f"{records.source}: no examples (the file is empty or holds only a header)"
            )
        parser = self.parser
        if self.columns:
            if text_column is not None or label_column is not None:
                raise UsageError(
                    f"text_column/label_column apply to single-text classification files; "
                    f"task {self.name!r} has a fixed layout {list(self.columns)}"
                )
            _require(records, self.columns, self)
        if parser is None:
            if self.kind != "classification":
                raise UsageError(
                    f"no file layout known for multiple-choice task {self.name!r}; give its "
                    f"Task a parser; tasks with one: {', '.join(_with_layout())}"
                )
            parser = parse_classification
        return parser(self, records, text_column, label_column)


# --------------------------------------------------------------------------- parse helpers


def _with_layout() -> list[str]:
    return [t.name for t in TASKS.values() if t.kind != "classification" and t.parser]


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
    raise UsageError(
        f"{where}: bad label {raw!r} for task {task.name!r}; accepted: {', '.join(accepted)}"
    )


def _require(records: Records, needed: Sequence[str], task: Task) -> None:
    missing = [c for c in needed if c not in records.columns]
    if missing:
        raise UsageError(
            f"{records.source}: missing column(s) {missing} for task {task.name!r}; columns "
            f"found: {list(records.columns)}; expected: {list(needed)}"
        )


def _field(rec: Mapping[str, Any], key: str, where: str) -> Any:
    try:
        return rec[key]
    except KeyError:
        raise UsageError(f"{where}: missing field {key!r}; fields found: {list(rec)}") from None


def _blank(value: Any) -> bool:
    """Whether a text field holds nothing: null, or an empty or whitespace-only string."""
    return value is None or (isinstance(value, str) and (not value or value.isspace()))


def _text(rec: Mapping[str, Any], key: str, where: str) -> Any:
    """Field ``key`` of ``rec``, a text: present and not blank (:func:`_blank`)."""
    value = _field(rec, key, where)
    if _blank(value):
        raise UsageError(f"{where}: field {key!r} is empty ({value!r}); every example needs a text")
    return value


_TEXT_COLUMNS = ("text", "sentence", "sentence1")
_LABEL_COLUMNS = ("label",)


def _pick_column(
    records: Records, given: str | None, candidates: Sequence[str], role: str, arg: str
) -> str:
    columns = records.columns
    if given is not None:
        if given not in columns:
            raise UsageError(
                f"{records.source}: {arg}={given!r} is not a column; columns found: {list(columns)}"
            )
        return given
    for name in candidates:
        if name in columns:
            return name
    raise UsageError(
        f"{records.source}: no {role} column; columns found: {list(columns)}; expected one "
        f"of {list(candidates)} (rename the {role} column in the file's header)"
    )


_SECOND_TEXT_COLUMNS = ("sentence2", "text_pair", "text2", "question2", "hypothesis")


def _check_single_text(task: Task, records: Records) -> None:
    """A single-text file has one text column: two candidates (``text`` and ``sentence``)
    would be picked between silently, and a second sentence (``sentence2``) would be
    dropped silently, the task reading one text per example."""
    texts = [c for c in _TEXT_COLUMNS if c in records.columns]
    if len(texts) > 1:
        raise UsageError(
            f"{records.source}: several text columns {texts}; keep one (rename the others) "
            f"so that it is clear which one task {task.name!r} reads"
        )
    second = [c for c in _SECOND_TEXT_COLUMNS if c in records.columns]
    if second:
        raise UsageError(
            f"{records.source}: column {second[0]!r} holds a second text, which task "
            f"{task.name!r} (one text per example) would not read; drop or rename the column "
            "to train on the first text alone"
        )


# --------------------------------------------------------------------------- parsers


def parse_classification(
    task: Task, records: Records, text_column: str | None, label_column: str | None
) -> list[Example]:
    """Single-text classification: a text column (``text``, ``sentence`` or ``sentence1``,
    or ``text_column``) and a ``label`` column (or ``label_column``) holding a class index
    or an alias such as ``negative``/``positive`` (:attr:`Task.label_aliases`)."""
    if text_column is None:
        _check_single_text(task, records)
    text_col = _pick_column(records, text_column, _TEXT_COLUMNS, "text", "text_column")
    label_col = _pick_column(records, label_column, _LABEL_COLUMNS, "label", "label_column")
    out: list[Example] = []
    append = out.append
    n = task.num_options
    fast = {str(i): i for i in range(n)} | {i: i for i in range(n)}
    for number, rec in records.rows:
        label = rec.get(label_col)
        index = fast.get(label) if type(label) in (int, str) else None  # bools fall through
        if index is None:
            where = records.where(number)
            index = _label_index(_field(rec, label_col, where), task, where)
        text = rec.get(text_col)
        if not isinstance(text, str) or not text or text.isspace():
            where = records.where(number)
            text = _text(rec, text_col, where)  # a missing or blank text: the error
            raise UsageError(f"{where}: column {text_col!r} must hold a string, got {text!r}")
        append(Example(text, index))
    return out


def _lower_first(s: str) -> str:
    return s[:1].lower() + s[1:]


def _parse_copa(task: Task, records: Records, *_: str | None) -> list[Example]:
    """Context = premise without its final period + ``" because"`` (cause) or ``" so"``
    (effect); candidates = ``" " +`` each choice with its first letter lower-cased."""
    connectors = {"cause": " because", "effect": " so"}
    out = []
    for number, rec in records.rows:
        where = records.where(number)
        premise, c1, c2 = (_text(rec, k, where) for k in task.columns[:3])
        question, label = (_field(rec, k, where) for k in task.columns[3:])
        if question not in connectors:
            raise UsageError(f"{where}: bad question {question!r}; accepted: 'cause', 'effect'")
        premise = str(premise).rstrip()
        if premise.endswith("."):
            premise = premise[:-1]
        cands = tuple(" " + _lower_first(str(c).strip()) for c in (c1, c2))
        index = _label_index(label, task, where)
        out.append(Example(premise + connectors[question], index, candidates=cands))
    return out


def _parse_winogrande(task: Task, records: Records, *_: str | None) -> list[Example]:
    """``text`` = the sentence before the blank ``_`` (trailing space removed); candidate
    ``i`` = ``" " + option_i +`` the rest; ``score_from[i]`` = where the rest starts."""
    out = []
    for number, rec in records.rows:
        where = records.where(number)
        sentence, o1, o2 = (_text(rec, k, where) for k in task.columns[:3])
        answer = _field(rec, task.columns[3], where)
        sentence = str(sentence)
        if sentence.count("_") != 1:
            raise UsageError(
                f"{where}: sentence {sentence!r} must contain exactly one blank '_', "
                f"found {sentence.count('_')}"
            )
        if str(answer).strip() not in ("1", "2"):
            raise UsageError(f"{where}: bad answer {answer!r}; accepted: '1', '2'")
        blank = sentence.index("_")
        before, after = sentence[:blank], sentence[blank + 1 :]
        prefix = before.rstrip()
        heads = tuple(before[len(prefix) :] + str(o) for o in (o1, o2))
        out.append(
            Example(
                prefix,
                int(str(answer).strip()) - 1,
                candidates=tuple(h + after for h in heads),
                score_from=tuple(len(h) for h in heads),
            )
        )
    return out


def _parse_wic(task: Task, records: Records, *_: str | None) -> list[Example]:
    """``text`` = sentence1, ``text_pair`` = sentence2, ``word`` = the target word."""
    out = []
    for number, rec in records.rows:
        where = records.where(number)
        word, s1, s2 = (_text(rec, k, where) for k in task.columns[:3])
        label = _field(rec, task.columns[3], where)
        index = _label_index(label, task, where)
        out.append(Example(str(s1), index, text_pair=str(s2), word=str(word)))
    return out


# --------------------------------------------------------------------------- registry


def _synthetic(n: int, seed: int) -> list[Example]:
    from .synthetic import synthetic_sentiment  # lazy: synthetic imports Example from here

    return synthetic_sentiment(n, seed)


TASKS: dict[str, Task] = {}


def register_task(task: Task) -> Task:
    """Add ``task`` to :data:`TASKS` (a name may be registered once)."""
    if task.name in TASKS:
        raise ValueError(f"task {task.name!r} is already registered")
    if task.kind not in ("classification", "multiple_choice"):
        raise ValueError(
            f"task {task.name!r}: kind {task.kind!r}; accepted: classification, multiple_choice"
        )
    TASKS[task.name] = task
    return task


def get_task(name: str) -> Task:
    """The registered task called ``name`` (one of :data:`TASKS`)."""
    if not isinstance(name, str) or name not in TASKS:
        raise UsageError(f"unknown task {name!r}; accepted: {', '.join(sorted(TASKS))}")
    return TASKS[name]


def task_names() -> tuple[str, ...]:
    """Registered task names, in registration order."""
    return tuple(TASKS)


def task_help() -> str:
    """One ``name: help`` clause per registered task, for the CLI's ``--task`` help."""
    return "; ".join(f"{t.name}: {t.help}" if t.help else t.name for t in TASKS.values())


_SENTIMENT_ALIASES = (("negative", "neg", "terrible"), ("positive", "pos", "great"))
_SENTIMENT = dict(
    kind="classification",
    num_options=2,
    label_words=(" terrible", " great"),
    template="{text} It was",
    label_aliases=_SENTIMENT_ALIASES,
    builtin=_synthetic,
)

register_task(
    Task(
        name="sst2",
        hub_path="glue",
        hub_name="sst2",
        help="GLUE SST-2 sentiment, columns sentence/text + label (without a file: the "
        "built-in synthetic set)",
        builtin_note="load_task_data('sst2') without path uses the built-in synthetic "
        "sentiment set; pass path= to the GLUE SST-2 train.tsv for real data",
        **_SENTIMENT,
    )
)
register_task(
    Task(name="synthetic", help="built-in synthetic movie-review sentiment", **_SENTIMENT)
)
register_task(
    Task(
        name="copa",
        kind="multiple_choice",
        num_options=2,
        hub_path="super_glue",
        hub_name="copa",
        parser=_parse_copa,
        columns=("premise", "choice1", "choice2", "question", "label"),
        help="SuperGLUE COPA, columns premise, choice1, choice2, question, label",
    )
)
register_task(
    Task(
        name="winogrande",
        kind="multiple_choice",
        num_options=2,
        hub_path="winogrande",
        hub_name="winogrande_xl",
        parser=_parse_winogrande,
        columns=("sentence", "option1", "option2", "answer"),
        help="WinoGrande, columns sentence (one '_'), option1, option2, answer",
    )
)
register_task(
    Task(
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
        parser=_parse_wic,
        columns=("word", "sentence1", "sentence2", "label"),
        help="SuperGLUE WiC, columns word, sentence1, sentence2, label",
    )
)
