"""Reading a run's ``checkpoint.pt``: a file torch cannot read is a :class:`UsageError`
naming it, not the zip reader's or pickle's traceback.

``read_checkpoint(path, map_location=...)`` is ``torch.load`` (full pickles: the checkpoint
holds the run's own objects) with that one difference, plus a check that the file holds a
checkpoint as :class:`hybrid.train.Trainer` writes it (a dict with ``model`` for ``full``,
``trained`` and ``seed_steps`` for ``seeds``). ``mmap=True`` maps the tensors instead of
reading them: a cheap check of a large file before the model is built.
"""

from __future__ import annotations

import os
import pickle
import zipfile
from pathlib import Path
from typing import Any

from smoothlab.errors import UsageError

__all__ = ["read_checkpoint"]

# what torch.load raises for a file that is not a (whole) torch.save archive: a truncated
# zip (RuntimeError from its zip reader), garbage (UnpicklingError, EOFError, ValueError)
_UNREADABLE = (RuntimeError, ValueError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile)


def _reason(err: BaseException) -> str:
    """The first sentence of ``err`` (torch's zip errors run on for several)."""
    text = " ".join(str(err).split()) or type(err).__name__
    return text.split(". ")[0].rstrip(".")[:160]


def read_checkpoint(
    path: str | os.PathLike[str],
    *,
    map_location: Any = "cpu",
    mmap: bool = False,
    hint: str = "",
) -> dict[str, Any]:
    """The state saved in checkpoint ``path`` (see the module docstring).

    Raises :class:`UsageError` naming ``path`` when it is missing, is not a ``torch.save``
    archive (truncated, overwritten, empty) or holds something other than a run's
    checkpoint; ``hint`` (e.g. ``"; use --restart"``) is appended to that message.
    """
    import torch

    path = Path(path)
    if not path.is_file():
        raise UsageError(f"{path}: no such checkpoint file{hint}")
    # torch.save has written zip archives since torch 1.6; a file that is not one (or whose
    # central directory, at its end, was cut off) cannot be a checkpoint of this code
    if not zipfile.is_zipfile(path):
        raise UsageError(
            f"{path} is not a readable checkpoint (not a torch.save archive: the file is "
            f"truncated or corrupt, {path.stat().st_size:,} bytes){hint}"
        )
    try:
        state = torch.load(path, map_location=map_location, weights_only=False, mmap=mmap)
    except _UNREADABLE as err:
        raise UsageError(
            f"{path} is not a readable checkpoint ({_reason(err)}; the file is truncated or "
            f"corrupt){hint}"
        ) from err
    kind = state.get("checkpoint", "full") if isinstance(state, dict) else None
    needed = ("model",) if kind == "full" else ("trained", "seed_steps")
    if not isinstance(state, dict) or any(k not in state for k in needed):
        found = sorted(map(str, state)) if isinstance(state, dict) else type(state).__name__
        raise UsageError(
            f"{path} is not a readable checkpoint (a torch file, but not a smoothlab run's "
            f"checkpoint: it holds {found}, expected the keys {list(needed)}){hint}"
        )
    return state
