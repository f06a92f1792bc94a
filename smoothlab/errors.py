"""The one exception type for bad user input (torch-free).

``UsageError`` subclasses ``ValueError``, so API callers can keep catching ``ValueError``;
the ``smoothlab`` command turns exactly this type into one line on stderr and exit status 2.
Any other exception is a bug and keeps its traceback (exit 1). Raise it at the boundary —
CLI flags, public-API arguments, data files, model folders — with a message that names the
bad value and what would be accepted.
"""

from __future__ import annotations

__all__ = ["UsageError"]


class UsageError(ValueError):
    """Bad input from the user: reported on one line, exit status 2 in the CLI."""
