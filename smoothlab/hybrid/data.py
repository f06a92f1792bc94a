"""Tasks and data — the public entry point, re-exporting the modules that do each job:

* :mod:`smoothlab.hybrid.tasks` — :class:`Example`, :class:`Task` and the task registry :data:`TASKS`
  (one entry per task: verbalizer, template, file layout, help, data sources);
* :mod:`smoothlab.hybrid.readers` — local TSV/CSV/JSONL/JSON files (:func:`load_examples`; the
  sha256 of each file read, from the same bytes: :func:`file_digests`);
* :mod:`smoothlab.hybrid.synthetic` — the built-in synthetic sentiment set;
* :mod:`smoothlab.hybrid.sampling` — the paper's seeded splits, :func:`load_task_data` and the
  resumable minibatch sampler :class:`EpochSampler`.
"""

from __future__ import annotations

from .readers import file_digests, load_examples, read_records
from .sampling import EpochSampler, Splits, load_task_data, sample_splits
from .synthetic import synthetic_sentiment
from .tasks import TASKS, Example, Records, Task, get_task, register_task, task_help, task_names

__all__ = [
    "Example",
    "Task",
    "TASKS",
    "get_task",
    "file_digests",
    "load_examples",
    "synthetic_sentiment",
    "Splits",
    "sample_splits",
    "load_task_data",
    "EpochSampler",
    "Records",
    "read_records",
    "register_task",
    "task_help",
    "task_names",
]
