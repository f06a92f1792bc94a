"""``probe``: per-block Hessian norms of a loss at the current parameters.

    probe(loss_fn, blocks, norm="spectral", hvp="exact", num_vectors=20, seed=0)
        -> {block: Estimate}

``loss_fn`` is a zero-argument callable returning a scalar loss for a fixed batch with dropout
off; ``blocks`` maps names to lists of parameters. For block b the probe estimates a norm of
∇²_bb f (perturb only b, read only b's gradient). Afterwards every parameter is bit-identical
to before, and ``requires_grad`` flags, ``.grad`` fields and training modes are as they were.
"""

from __future__ import annotations

import contextlib
import numbers
import time
import zlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import replace
from typing import Any

import torch
from torch import nn

from .blocks import Blocks, check_blocks, make_blocks
from .errors import UsageError
from .estimate import Estimate
from .estimators import MIN_VECTORS, Options, check_estimator_options, estimate, validate
from .hvp import HVPS, Oracle, block_gradients, check_step
from .perturb import outside_reads, param_seed

Progress = Callable[[str, int, int], None]


class ModelLoss:
    """A ``loss_fn`` bound to a model: ``ModelLoss(model, batch)()`` is the scalar loss.

    ``batch`` is a mapping passed as ``model(**batch)`` (Hugging Face style: the output's
    ``.loss`` is used) or a tuple ``(inputs, targets)`` with ``criterion``; or give
    ``compute``, a zero-argument callable. It carries ``.model``, so the probe can perturb
    weights on the fly and switch dropout off.
    """

    def __init__(
        self,
        model: nn.Module,
        batch: Mapping[str, Any] | Sequence[Any] | None = None,
        *,
        criterion: Callable[..., torch.Tensor] | None = None,
        compute: Callable[[], torch.Tensor] | None = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if (batch is None) == (compute is None):
            raise UsageError("give exactly one of batch= or compute=")
        self.model = model
        self.batch = batch
        self.criterion = criterion
        self.compute = compute

    def __call__(self) -> torch.Tensor:
        if self.compute is not None:
            return self.compute()
        if isinstance(self.batch, Mapping):
            out = self.model(**self.batch)
            # a Hugging Face ModelOutput is a Mapping that omits a None loss: .get, not ["loss"]
            loss = out.get("loss") if isinstance(out, Mapping) else getattr(out, "loss", out)
            if loss is None:
                raise UsageError("model output has no loss; include labels in the batch")
            return loss
        inputs, targets = self.batch  # type: ignore[misc]
        if self.criterion is None:
            raise UsageError("a (inputs, targets) batch needs criterion=")
        return self.criterion(self.model(inputs), targets)


@contextlib.contextmanager
def eval_mode(model: nn.Module | None) -> Iterator[None]:
    """Dropout off for the duration; every module's training flag restored after."""
    if check_model(model) is None:
        yield
        return
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, f in flags:
            m.training = f


def check_model(model: object) -> nn.Module | None:
    """``model`` itself; TypeError naming its type unless it is an ``nn.Module`` or None."""
    if model is not None and not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module or None, got {type(model).__name__}")
    return model


def check_seed(seed: object) -> int:
    """``seed`` as a Python int (numpy integers accepted); UsageError for anything else."""
    if not isinstance(seed, numbers.Integral) or isinstance(seed, bool):
        raise UsageError(f"seed must be an integer, got {seed!r}")
    return int(seed)


def check_loss_fn(loss_fn: object, what: str = "loss_fn") -> None:
    """TypeError naming the type unless ``loss_fn`` is callable."""
    if not callable(loss_fn):
        raise TypeError(f"{what} must be a zero-argument callable, got {type(loss_fn).__name__}")


def block_seed(seed: int, name: str) -> int:
    """The random-vector seed of block ``name`` under probe ``seed`` (stable across runs)."""
    return param_seed(seed, zlib.crc32(name.encode()))


def probe(
    loss_fn: Callable[[], torch.Tensor],
    blocks: Mapping[str, list[torch.Tensor]],
    *,
    norm: str = "spectral",
    hvp: str = "exact",
    num_vectors: int = 20,
    seed: int = 0,
    h: float | None = None,
    tol: float = 1e-3,
    distribution: str = "gaussian",
    target_rel_stderr: float | None = None,
    min_vectors: int = MIN_VECTORS,
    model: nn.Module | None = None,
    progress: Progress | None = None,
) -> dict[str, Estimate]:
    """Estimate a norm of each diagonal Hessian block ∇²_bb f.

    Args:
        loss_fn: zero-argument callable returning a scalar loss tensor (fixed batch, no dropout).
        blocks: ``{name: [parameters]}``, non-overlapping.
        norm: ``spectral`` (‖H‖₂, the local L), ``frobenius`` (‖H‖_F), ``rms``
            (‖H‖_F/√d_b, the paper's D.4 estimator) or ``trace``.
        hvp: ``exact``, ``fd``, ``fd-central`` or ``zo`` (function values only).
        num_vectors: Lanczos iterations (spectral) or random vectors (others), at most.
        seed: seeds each block's ``torch.Generator`` (the global RNG is never used).
        h: finite-difference step; default ε^p·max(‖x_b‖,1)/‖v‖ (see :mod:`smoothlab.hvp`).
        tol: relative Lanczos residual at which ``spectral`` stops.
        distribution: ``gaussian`` or ``rademacher`` vectors for ``frobenius``/``trace``.
        target_rel_stderr: stop sampling once stderr/|value| falls below it.
        model: the module owning the parameters (defaults to ``loss_fn.model``); enables
            on-the-fly perturbation, dropout-off and the attention switch for ``exact``.
        progress: ``callback(block, done, total)``.
    """
    _check_arguments(
        loss_fn, norm, hvp, num_vectors, distribution, tol, target_rel_stderr, min_vectors
    )
    seed = check_seed(seed)  # numpy integers too
    check_blocks(blocks)
    root = _owning_module(model, loss_fn)

    results: dict[str, Estimate] = {}
    with eval_mode(root):
        outside = None  # parameters the loss reads outside their modules: found once
        if root is not None and hvp != "exact":
            every = [p for params in blocks.values() for p in params]
            outside = {id(every[i]) for i in outside_reads(root, every, loss_fn)}
        shared: dict[str, tuple[torch.Tensor, torch.dtype]] = {}
        if hvp == "fd" and len(blocks) > 1:  # one joint backward for every block's reference point
            grads, loss_dtype = block_gradients(loss_fn, blocks)
            shared = {k: (g, loss_dtype) for k, g in grads.items()}
        for name, params in blocks.items():
            params = list(params)
            first = params[0]
            gen = torch.Generator(device=first.device)
            gen.manual_seed(block_seed(seed, name))
            cb = (lambda d, t, _n=name: progress(_n, d, t)) if progress else None
            start = time.perf_counter()
            options = Options(num_vectors, tol, distribution, target_rel_stderr, min_vectors, cb)
            with Oracle(
                hvp,
                loss_fn,
                params,
                h=h,
                root=root,
                gradient=shared.pop(name, None),
                outside=outside,
            ) as oracle:
                est = estimate(norm, oracle, gen, options)
                grad_norm = oracle.cached_grad_norm()
            results[name] = replace(est, seconds=time.perf_counter() - start, grad_norm=grad_norm)
    return results


def _owning_module(
    model: nn.Module | None, loss_fn: Callable[[], torch.Tensor]
) -> nn.Module | None:
    """``model`` (TypeError unless an ``nn.Module`` or None), else ``loss_fn.model``; None
    unless it is an ``nn.Module``."""
    root = check_model(model) if model is not None else getattr(loss_fn, "model", None)
    if root is not None and not isinstance(root, nn.Module):
        root = None
    return root


def _check_arguments(
    loss_fn: object,
    norm: str,
    hvp: str,
    num_vectors: object,
    distribution: str,
    tol: object,
    target_rel_stderr: object,
    min_vectors: object,
) -> None:
    """probe()'s argument checks; norm/hvp/distribution pairs through the estimator registry."""
    check_loss_fn(loss_fn)
    check_options(norm, hvp, num_vectors, distribution, tol, target_rel_stderr, None, min_vectors)


def check_options(
    norm: str,
    hvp: str,
    num_vectors: object,
    distribution: str = "gaussian",
    tol: object = 1e-3,
    target_rel_stderr: object = None,
    h: object = None,
    min_vectors: object = MIN_VECTORS,
) -> None:
    """UsageError naming the first bad :func:`probe` option (for callers that probe later,
    such as the recorder, which checks at construction rather than at its first probe).
    The numbers go through the estimators' own check (:func:`check_estimator_options`)."""
    check_step(h)
    if hvp not in HVPS:
        raise UsageError(f"unknown hvp oracle {hvp!r}; accepted: {', '.join(HVPS)}")
    check_estimator_options(
        num_vectors, tol=tol, target_rel_stderr=target_rel_stderr, min_vectors=min_vectors
    )
    validate(norm, hvp, distribution, num_vectors)


def probe_model(
    model: nn.Module,
    batch: Mapping[str, Any] | Sequence[Any] | None = None,
    blocks: str | Mapping[str, Any] | Blocks = "hybrid",
    *,
    compute: Callable[[], torch.Tensor] | None = None,
    criterion: Callable[..., torch.Tensor] | None = None,
    **kwargs: Any,
) -> dict[str, Estimate]:
    """Probe a model on one batch: builds the loss closure and the blocks, then :func:`probe`.

    ``blocks`` is a preset name, a pattern mapping (see :func:`smoothlab.make_blocks`) or
    ready blocks. Dropout is off during the probe and training modes are restored after.
    """
    loss_fn = ModelLoss(model, batch, criterion=criterion, compute=compute)
    if isinstance(blocks, str) or (
        isinstance(blocks, Mapping) and all(isinstance(v, str) for v in blocks.values())
    ):
        blocks = make_blocks(model, blocks)
    return probe(loss_fn, blocks, model=model, **kwargs)
