"""Hooks into other training loops. transformers is imported only when used."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from .perturb import random_state_kept
from .probe import eval_mode
from .recorder import TrajectoryRecorder


def hf_callback(
    recorder: TrajectoryRecorder,
    loss_fn_for: Callable[[torch.nn.Module], Callable[[], torch.Tensor]],
) -> Any:
    """A ``transformers.TrainerCallback`` that calls ``recorder.step`` before training (step 0)
    and after each optimizer step.

    ``loss_fn_for(model)`` returns the zero-argument loss closure to probe (e.g. a fixed
    held-aside batch: ``lambda m: smoothlab.ModelLoss(m, batch)``). Probes run with dropout
    off and the random state restored, so training is the same with or without the
    callback. The learning rate the step used (before the scheduler moved it) is logged as
    ``lr_peft`` (a single-rate optimizer). A Trainer resumed from a checkpoint
    (``train(resume_from_checkpoint=...)``) starts at the checkpoint's step: the rows logged
    after it, which belong to the trajectory the resume abandons, are dropped and recorded
    again.
    """
    from transformers import TrainerCallback

    def record(state: Any, model: Any, lr: float) -> None:
        if model is None or not recorder.due(state.global_step):
            return
        # dropout off and the random state kept, whatever closure loss_fn_for returns:
        # the probe never changes the training it watches
        with eval_mode(model), random_state_kept(model.parameters()):
            recorder.step(
                state.global_step, loss_fn_for(model), epoch=float(state.epoch or 0), lr_peft=lr
            )

    def rate(optimizer: Any) -> float:
        return optimizer.param_groups[0]["lr"] if optimizer is not None else math.nan

    class SmoothnessCallback(TrainerCallback):
        lr = math.nan  # the rate of the step being taken (the scheduler moves it after)

        def on_train_begin(
            self,
            args: Any,
            state: Any,
            control: Any,
            model: Any = None,
            optimizer: Any = None,
            **kw: Any,
        ) -> Any:
            if state.global_step > 0:  # resumed from a checkpoint: forget what came after it
                recorder.rewind(state.global_step)
            record(state, model, rate(optimizer))  # step 0, the weights before training
            return control

        def on_step_begin(
            self, args: Any, state: Any, control: Any, optimizer: Any = None, **kw: Any
        ) -> Any:
            self.lr = rate(optimizer)
            return control

        def on_step_end(
            self, args: Any, state: Any, control: Any, model: Any = None, **kw: Any
        ) -> Any:
            record(state, model, self.lr)
            return control

        def on_train_end(self, args: Any, state: Any, control: Any, **kw: Any) -> Any:
            recorder.close()  # a later train() (a resume, a search) reopens it on its first row
            return control

    return SmoothnessCallback()
