"""Hooks into other training loops. transformers is imported only when used."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from .recorder import TrajectoryRecorder


def hf_callback(
    recorder: TrajectoryRecorder,
    loss_fn_for: Callable[[torch.nn.Module], Callable[[], torch.Tensor]],
) -> Any:
    """A ``transformers.TrainerCallback`` that calls ``recorder.step`` after each optimizer step.

    ``loss_fn_for(model)`` returns the zero-argument loss closure to probe (e.g. a fixed
    held-aside batch: ``lambda m: smoothlab.ModelLoss(m, batch)``). The Trainer's learning
    rate is logged as ``lr_peft`` (a single-rate optimizer).
    """
    from transformers import TrainerCallback

    class SmoothnessCallback(TrainerCallback):
        def on_step_end(
            self,
            args: Any,
            state: Any,
            control: Any,
            model: Any = None,
            optimizer: Any = None,
            **kw: Any,
        ) -> Any:
            if model is None or not recorder.due(state.global_step):
                return control
            lr = optimizer.param_groups[0]["lr"] if optimizer is not None else math.nan
            recorder.step(
                state.global_step, loss_fn_for(model), epoch=float(state.epoch or 0), lr_peft=lr
            )
            return control

        def on_train_end(self, args: Any, state: Any, control: Any, **kw: Any) -> Any:
            recorder.close()
            return control

    return SmoothnessCallback()
