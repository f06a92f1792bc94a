"""Exact, trace-free perturbations: evaluate a model at ``W + s·d`` without touching ``W``.

Adding ``s·d`` to a weight in place and subtracting it back is not exact in floating point
(fp32 drift ~1e-7 per pair; in bf16 as large as an update). Two exact mechanisms here:

* **on the fly** (a module tree is known): a forward pre-hook on every module that owns a
  perturbed parameter shadows it with ``W + s·d`` for that forward only (the shadow lives in
  the module's instance ``__dict__``, which attribute lookup finds before ``_parameters``);
  a forward hook removes it. Extra memory: one layer's weight at a time. The shadow is a
  differentiable function of ``W``, so ``∂f/∂W`` at the shifted point is ordinary autograd.
* **swap** (only the parameters are known): ``p.data`` is replaced by a new tensor
  ``W + s·d`` and the *original tensor object* is put back afterwards, so restoration is
  bit-exact. Extra memory: one copy of the perturbed parameters.

Directions are either explicit tensors or generated from a seed (``seeded_gaussian``), so a
zeroth-order step can replay ``z`` instead of storing it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence

import torch
from torch import nn

Direction = Callable[[int, torch.Tensor], torch.Tensor]

_MASK = (1 << 63) - 1


def param_seed(seed: int, index: int) -> int:
    """A 63-bit seed for parameter ``index`` under base ``seed`` (splitmix64 mix)."""
    z = (seed * 0x9E3779B97F4A7C15 + (index + 1) * 0xBF58476D1CE4E5B9) & ((1 << 64) - 1)
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & ((1 << 64) - 1)
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & ((1 << 64) - 1)
    return (z ^ (z >> 31)) & _MASK


def seeded_gaussian(seed: int) -> Direction:
    """``z_i ~ N(0, I)`` for parameter ``i``, regenerated identically on every call.

    Drawn from a dedicated ``torch.Generator`` on the parameter's device seeded with
    ``param_seed(seed, i)``; the global RNG is never touched. Generated in float32 and cast
    to the parameter's dtype, so fp32 and bf16 copies of a model see the same z up to rounding.
    """

    def direction(index: int, p: torch.Tensor) -> torch.Tensor:
        gen = torch.Generator(device=p.device)
        gen.manual_seed(param_seed(seed, index))
        z = torch.randn(p.shape, generator=gen, device=p.device, dtype=torch.float32)
        return z.to(p.dtype)

    return direction


def explicit(directions: Sequence[torch.Tensor]) -> Direction:
    """Directions given as tensors, one per parameter (same shapes)."""

    def direction(index: int, p: torch.Tensor) -> torch.Tensor:
        return directions[index].to(dtype=p.dtype, device=p.device)

    return direction


def _owners(root: nn.Module, params: Sequence[torch.Tensor]) -> dict[nn.Module, list[tuple[str, int]]]:
    index = {id(p): i for i, p in enumerate(params)}
    owners: dict[nn.Module, list[tuple[str, int]]] = {}
    seen: set[int] = set()
    for module in root.modules():
        for name, p in module._parameters.items():
            if p is not None and id(p) in index:
                owners.setdefault(module, []).append((name, index[id(p)]))
                seen.add(id(p))
    missing = [i for i, p in enumerate(params) if id(p) not in seen]
    if missing:
        raise ValueError(
            f"{len(missing)} perturbed parameter(s) (e.g. index {missing[0]}, shape "
            f"{tuple(params[missing[0]].shape)}) are not registered in the given module tree "
            f"{type(root).__name__}; pass the model that owns them"
        )
    return owners


@contextlib.contextmanager
def shifted(
    params: Sequence[torch.Tensor],
    direction: Direction | Sequence[torch.Tensor],
    scale: float,
    root: nn.Module | None = None,
) -> Iterator[None]:
    """Inside the context, forwards see ``p_i + scale · direction(i, p_i)`` for every i.

    With ``root`` the shift is applied on the fly by forward hooks (stored weights are never
    written); without it by an exact ``.data`` swap. Either way every parameter is
    bit-identical after the context, also when the body raises.

    On the fly, a parameter is seen shifted when it is read inside its owning module's
    forward, or when its owner is a container without a forward (``ParameterDict``,
    ``ParameterList``). A parameter another module reads directly from a submodule whose
    forward does not run (e.g. peft prompt tuning with ``inference_mode=True`` reading
    ``prompt_encoder.embedding.weight``) is not shifted; use ``root=None`` for such models.
    """
    if not callable(direction):
        direction = explicit(direction)
    if scale == 0.0:
        yield
        return
    if root is None:
        originals = [p.data for p in params]
        try:
            with torch.no_grad():
                for i, p in enumerate(params):
                    p.data = torch.add(p.data, direction(i, p), alpha=scale)
            yield
        finally:
            for p, data in zip(params, originals):
                p.data = data
        return

    owners = _owners(root, params)
    # A container without a forward of its own (ParameterDict/ParameterList, e.g. peft's
    # lora_embedding_A) never fires hooks: its parameters are read by the parent. Shadow those
    # for the whole context (their size only), built with grad on so ∂f/∂W still flows.
    static = [m for m in owners if type(m).forward is nn.Module.forward]
    handles = []

    def pre_hook(module: nn.Module, args: object) -> None:
        for name, i in owners[module]:
            w = module._parameters[name]
            module.__dict__[name] = torch.add(w, direction(i, w), alpha=scale)

    def post_hook(module: nn.Module, args: object, output: object) -> None:
        for name, _ in owners[module]:
            module.__dict__.pop(name, None)

    try:
        with torch.enable_grad():
            for module in static:
                for name, i in owners[module]:
                    w = module._parameters[name]
                    module.__dict__[name] = torch.add(w, direction(i, w), alpha=scale)
        for module in owners:
            if module in static:
                continue
            handles.append(module.register_forward_pre_hook(pre_hook))
            handles.append(module.register_forward_hook(post_hook, always_call=True))
        yield
    finally:
        for h in handles:
            h.remove()
        for module, names in owners.items():
            for name, _ in names:
                module.__dict__.pop(name, None)
