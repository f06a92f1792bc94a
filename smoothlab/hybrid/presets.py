"""Named configurations: the paper's settings and the quick CPU versions, as factories.

A preset is a function returning a config; the CLI's ``--preset NAME`` starts from it and
the flags the user typed override it. Figure 1 of the paper: OPT-125M on SST-2, 5000 steps,
batch 8, an fo-ft run at rate 5e-5 (Fig. 1a) and a hybrid-LoRA run (Fig. 1b), both probed
every 100 steps with 100 HVPs per probe and finite-difference step h = 1e-5.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

from .config import Figure1Config, ModelConfig, TrainConfig

__all__ = [
    "FIGURE1_PRESETS",
    "default_figure1",
    "figure1_options",
    "figure1_runs",
    "paper_figure1",
]


def default_figure1() -> Figure1Config:
    """Figure 1 in minutes on a CPU: MiniLM, 300 steps, a probe every 30 with 10 HVPs."""
    return Figure1Config()


def paper_figure1() -> Figure1Config:
    """Figure 1 at the paper's settings (OPT-125M, 5000 steps, batch 8, 100 HVPs, h=1e-5)."""
    return dataclasses.replace(
        Figure1Config(),
        model="facebook/opt-125m",
        task="sst2",
        steps=5000,
        batch_size=8,
        lr_fo=5e-5,
        vectors=100,
        h=1e-5,
        record_every=100,
        train_size=1000,
    )


FIGURE1_PRESETS: dict[str, Callable[[], Figure1Config]] = {
    "default": default_figure1,
    "paper": paper_figure1,
}


def figure1_runs(cfg: Figure1Config) -> dict[str, TrainConfig]:
    """The two recorded runs of Figure 1: ``fig1a`` (fo-ft) and ``fig1b`` (hybrid-LoRA)."""
    out = Path(cfg.out)
    # every model option as given (model, data, device, dtype, lengths, PEFT sizes, ...)
    common = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(ModelConfig)} | dict(
        steps=cfg.steps,
        eval_every=max(cfg.steps // 4, 1),
        eval_examples=cfg.eval_examples,
        train_size=cfg.train_size,
        eval_size=cfg.eval_size,
        dev_size=cfg.dev_size,
        eval_data=cfg.eval_data,
        dev_data=cfg.dev_data,
        record_every=cfg.record_every,
        record_vectors=cfg.vectors,
        record_hvp=cfg.hvp,
        record_norm="spectral",
        record_h=cfg.h,
        record_blocks=cfg.record_blocks,
    )
    return {
        "fig1a": TrainConfig(
            method="fo-ft", lr_peft=cfg.lr_fo, out=str(out / "fig1a_fo-ft"), name="fig1a", **common
        ),
        "fig1b": TrainConfig(
            method="hybrid-lora",
            lr_base=cfg.lr_base,
            lr_peft=cfg.lr_peft,
            out=str(out / "fig1b_hybrid-lora"),
            name="fig1b",
            **common,
        ),
    }


# The TrainConfig fields that figure1 sets from an option of another name.
_FIGURE1_OPTIONS = {"record_vectors": "vectors", "record_hvp": "hvp", "record_h": "h"}


def figure1_options(key: str) -> dict[str, str]:
    """``{TrainConfig field: figure1 option}`` for the run ``key`` of :func:`figure1_runs`,
    where the names differ, so that a message about a run names the option the user typed
    (``fig1a`` trains at ``lr_fo`` as its ``lr_peft``)."""
    return _FIGURE1_OPTIONS | ({"lr_peft": "lr_fo"} if key == "fig1a" else {})
