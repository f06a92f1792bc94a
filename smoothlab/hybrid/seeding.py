"""Seeded construction that leaves the caller's global RNG state as it was."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch

__all__ = ["seeded_rng"]


@contextlib.contextmanager
def seeded_rng(seed: int, device: torch.device | str | None = None) -> Iterator[None]:
    """Run a block with the global RNG(s) seeded by ``seed``; restore them afterwards
    (``torch.random.fork_rng``; the CUDA RNG of ``device`` too when it is a CUDA device)."""
    dev = torch.device(device) if device is not None else torch.device("cpu")
    devices: list[Any] = []
    if dev.type == "cuda" and torch.cuda.is_available():
        devices = [dev.index if dev.index is not None else torch.cuda.current_device()]
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield
