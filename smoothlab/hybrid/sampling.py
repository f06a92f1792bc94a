"""Splits and minibatches: the paper's seeded 1,000 / 1,000 / 100 sampling
(:func:`sample_splits`), the data sources a task draws from (:func:`load_task_data`: a local
file, the task's built-in examples, or its hub dataset), and the resumable random-reshuffling
sampler (:class:`EpochSampler`).
"""

from __future__ import annotations

import random
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from smoothlab.errors import UsageError

from .readers import load_examples
from .tasks import Example, Records, Task, get_task

__all__ = ["EpochSampler", "Splits", "load_task_data", "sample_splits"]


@dataclass(frozen=True)
class Splits:
    """Disjoint ``train``, ``eval`` and ``dev`` example lists."""

    train: list[Example]
    eval: list[Example]
    dev: list[Example]


def _name(flags: Mapping[str, str] | None, argument: str) -> str:
    """How the caller's user names ``argument``: ``flags[argument]`` (the CLI passes its
    flags, e.g. ``--batch-size`` for ``train``), else the Python argument ``argument=``."""
    if flags is not None and argument in flags:
        return flags[argument]
    return f"{argument}="


def _asked(flags: Mapping[str, str] | None, **sizes: int) -> tuple[str, str]:
    """The sizes the user set, as ``--train-size 16 + --eval-size 4`` (or ``train=16``), and
    their names joined by ``or``; a size absent from a given ``flags`` is not the user's."""
    named = {k: v for k, v in sizes.items() if flags is None or k in flags}
    shown = {k: v for k, v in named.items() if v} or named
    names = [_name(flags, k) for k in shown]
    terms = [n + str(v) if n.endswith("=") else f"{n} {v}" for n, v in zip(names, shown.values())]
    return " + ".join(terms), " or ".join(n.rstrip("=") for n in names)


def _check_sizes(**sizes: int) -> None:
    for name, value in sizes.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise UsageError(f"{name} must be a non-negative int, got {value!r}")


def sample_splits(
    examples: Sequence[Example],
    *,
    train: int = 1000,
    eval: int = 1000,
    dev: int = 100,
    seed: int = 0,
    flags: Mapping[str, str] | None = None,
) -> Splits:
    """The paper's sampling: ``train + eval + dev`` distinct examples drawn without
    replacement with ``random.Random(seed)``, cut into three disjoint splits.

    Raises ``UsageError`` (a ``ValueError``) if ``examples`` holds fewer than
    ``train + eval + dev``, naming the non-zero sizes as ``flags`` names them (see
    :func:`load_task_data`).
    """
    _check_sizes(train=train, eval=eval, dev=dev)
    total = train + eval + dev
    if len(examples) < total:
        terms, names = _asked(flags, train=train, eval=eval, dev=dev)
        raise UsageError(
            f"only {len(examples)} examples, but {total} asked ({terms}); "
            f"lower {names} or give more examples"
        )
    chosen = random.Random(seed).sample(range(len(examples)), total)
    picked = [examples[i] for i in chosen]
    return Splits(
        train=picked[:train], eval=picked[train : train + eval], dev=picked[train + eval :]
    )


def _load_hub(task: Task, flags: Mapping[str, str] | None) -> list[Example]:
    """Examples of ``task``'s hub dataset (``train`` split), via the ``datasets`` package."""
    try:
        import datasets  # optional, imported lazily
    except ImportError:
        raise UsageError(
            f"task {task.name!r} has no built-in data and the `datasets` package is not "
            f"installed, so {task.hub_path}/{task.hub_name} cannot be loaded from the hub; "
            f"give a local .tsv/.csv/.jsonl file with {_name(flags, 'path')}"
        ) from None
    ds = datasets.load_dataset(task.hub_path, task.hub_name, split="train")
    rows = [(i, dict(rec)) for i, rec in enumerate(ds, start=1)]
    columns = list(rows[0][1]) if rows else []
    source = Path(f"hub:{task.hub_path}/{task.hub_name}")
    return task.parse(Records(source, columns, rows, "record"))


MAX_BUILTIN = 1_000_000  # generated in memory: a typo'd size must not exhaust RAM


def _default_examples(
    task: Task, sizes: dict[str, int], seed: int, flags: Mapping[str, str] | None
) -> list[Example]:
    """Examples of ``task`` without a file: its built-in set (as many as ``sizes`` add up
    to), else its hub dataset."""
    n = sum(sizes.values())
    if task.builtin is not None:
        if n > MAX_BUILTIN:
            terms, names = _asked(flags, **sizes)
            raise UsageError(
                f"task {task.name!r} generates at most {MAX_BUILTIN:,} built-in examples, but "
                f"{n:,} asked ({terms}); lower {names} or give a data file with "
                f"{_name(flags, 'path')}"
            )
        if task.builtin_note:
            warnings.warn(task.builtin_note, UserWarning, stacklevel=3)
        return task.builtin(n, seed)
    if task.hub_path is None:
        raise UsageError(
            f"task {task.name!r} has neither built-in data nor a hub dataset; give a local "
            f".tsv/.csv/.jsonl file with {_name(flags, 'path')}"
        )
    return _load_hub(task, flags)


def _cap(examples: list[Example], n: int, seed: int) -> list[Example]:
    """All of ``examples`` (file order) if there are at most ``n``, else ``n`` of them drawn
    without replacement with ``random.Random(seed)``."""
    if len(examples) <= n:
        return list(examples)
    return random.Random(seed).sample(examples, n)


def load_task_data(
    task_name: str,
    path: str | Path | None = None,
    *,
    train: int = 1000,
    eval: int = 1000,
    dev: int = 100,
    seed: int = 0,
    eval_data: str | Path | None = None,
    dev_data: str | Path | None = None,
    flags: Mapping[str, str] | None = None,
) -> tuple[Task, Splits]:
    """The task and its seeded splits.

    With ``path``: :func:`load_examples` then :func:`sample_splits`. Without: the task's
    built-in examples (``train + eval + dev`` of them, e.g. :func:`synthetic_sentiment` for
    ``synthetic`` and, with a warning, ``sst2``), else its hub dataset (``train`` split) with
    the ``datasets`` package if it is installed, else ``UsageError`` asking for a local file.

    ``eval_data`` / ``dev_data``: a separate file for that split (e.g. GLUE's validation
    split), read with :func:`load_examples`. The split then holds the whole file, or, when
    the file has more than ``eval`` (``dev``) examples, that many drawn with
    ``random.Random(seed)``; the main source then supplies only the other splits (so a file
    given for both eval and dev serves both, overlapping).

    ``flags``: how the caller's user names the arguments ``path``, ``train``, ``eval`` and
    ``dev``, for error messages (the CLI passes its flags, e.g. ``{"path": "--data",
    "train": "--batch-size"}`` for a probe); an argument not in it is named ``argument=``,
    and a size not in a given ``flags`` is one the user does not set.
    """
    task = get_task(task_name)
    _check_sizes(train=train, eval=eval, dev=dev)
    n_eval = eval if eval_data is None else 0
    n_dev = dev if dev_data is None else 0
    if path is not None:
        examples = load_examples(path, task)
    else:
        sizes = {"train": train, "eval": n_eval, "dev": n_dev}
        examples = _default_examples(task, sizes, seed, flags)
    splits = sample_splits(examples, train=train, eval=n_eval, dev=n_dev, seed=seed, flags=flags)
    if eval_data is not None:
        splits = replace(splits, eval=_cap(load_examples(eval_data, task), eval, seed))
    if dev_data is not None:
        splits = replace(splits, dev=_cap(load_examples(dev_data, task), dev, seed))
    return task, splits


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
            raise UsageError(f"n must be a positive int, got {n!r}")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise UsageError(f"batch_size must be a positive int, got {batch_size!r}")
        if drop_last and batch_size > n:
            raise UsageError(
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
