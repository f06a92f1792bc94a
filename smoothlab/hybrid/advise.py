"""Learning-rate advice for a fine-tuning method on a model (the ``smoothlab advise`` back end).

x and y are the blocks the method trains — :func:`smoothlab.hybrid.train.split_parameters` reads the
method registry (:func:`smoothlab.methods.get_method`): ``zo-ft`` makes every weight x,
``fo-*`` only the adapter y, ``hybrid-*`` base = x and adapter = y. The curvature comes from
:func:`smoothlab.curvature.measure` on one batch at the current weights, the rule from
:func:`smoothlab.advisor.advise` (the curvature-aware default, the paper's formula beside it).

Typical use (what ``smoothlab advise --method`` and ``train --lr-base auto`` call)::

    advice, curv = advise_config(TrainConfig(method="zo-ft", data=..., q=1))
    print(advice.describe())
    print(train_command(advice, cfg))     # the exact `smoothlab train ...` line

or, with a model already built: ``advise_method(bundle, "hybrid-lora", lambda: bundle.loss(b))``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import shlex
from collections.abc import Callable

import torch

from smoothlab.advisor import Advice, advise
from smoothlab.curvature import Curvature, measure, weight_norm
from smoothlab.errors import UsageError
from smoothlab.methods import get_method

from .config import AUTO
from .data import EpochSampler
from .models import ModelBundle, auto_dtype
from .train import TrainConfig, build, split_parameters

__all__ = [
    "advise_config",
    "advise_method",
    "measure_method",
    "ratio_line",
    "train_command",
    "minibatch_inputs",
]


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module):  # noqa: ANN201
    """``model.eval()`` inside, the previous train/eval mode restored after."""
    was = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was)


def measure_method(
    bundle: ModelBundle,
    method: str,
    batch_loss_fn: Callable[[], torch.Tensor],
    *,
    hvp: str = "fd",
    vectors: int = 10,
    seed: int = 0,
    z: str = "gaussian",
    second_moment_samples: int = 0,
) -> Curvature:
    """:func:`smoothlab.curvature.measure` on the method's (x, y) blocks of ``bundle.model``.

    ``vectors``: Hutchinson vectors for tr H_xx and Lanczos iterations per block."""
    m = get_method(method)  # UsageError naming the accepted methods
    x, y = split_parameters(bundle.model, m.name)
    with eval_mode(bundle.model):
        return measure(
            batch_loss_fn,
            x if m.has_zo else [],
            y if m.has_fo else [],
            hvp=hvp,
            trace_vectors=vectors,
            spectral_iters=vectors,
            z=z,
            seed=seed,
            second_moment_samples=second_moment_samples,
            model=bundle.model,
        )


def advise_method(
    bundle: ModelBundle,
    method: str,
    batch_loss_fn: Callable[[], torch.Tensor],
    *,
    hvp: str = "fd",
    vectors: int = 10,
    seed: int = 0,
    q: int = 1,
    z: str = "gaussian",
    rule: str = "auto",
    one_sided: bool = False,
    c_x: float = 1.0,
    c_y: float = 1.0,
    second_moment_samples: int = 0,
    steps: int | None = None,
) -> Advice:
    """(η_x, η_y) for ``method`` from a probe of ``batch_loss_fn`` at the current weights.

    Rates of a block the method does not train are nan. ``rule`` as in
    :func:`smoothlab.advisor.advise` (default: curvature-aware, capped by the random walk of
    ``steps`` steps when given; ``"paper"``: c_x/(L_x d_x))."""
    curv = measure_method(
        bundle,
        method,
        batch_loss_fn,
        hvp=hvp,
        vectors=vectors,
        seed=seed,
        z=z,
        second_moment_samples=second_moment_samples,
    )
    return advice_from_curvature(
        curv,
        method,
        q=q,
        rule=rule,
        one_sided=one_sided,
        c_x=c_x,
        c_y=c_y,
        source=f"probe of one batch ({hvp}, {vectors} vectors, seed {seed})",
        steps=steps,
    )


def advice_from_curvature(
    curv: Curvature,
    method: str,
    *,
    q: int = 1,
    rule: str = "auto",
    one_sided: bool = False,
    c_x: float = 1.0,
    c_y: float = 1.0,
    source: str = "curvature",
    steps: int | None = None,
) -> Advice:
    """The advice for ``method`` from measured curvature (see :func:`advise_method`);
    ``steps``: the planned run length, for the random-walk cap on η_x."""
    m = get_method(method)
    kw = curv.advice_inputs()  # a zo probe gives no L_x: the advisor then floors nothing
    return advise(
        **kw,
        q=q,
        rule=rule,
        one_sided=one_sided,
        c_x=c_x,
        c_y=c_y,
        source=f"{method}: {source}",
        x_gradient="exact" if m.zo == "none" else "zo",
        steps=steps,
    )


def run_batch(bundle: ModelBundle, cfg: TrainConfig, splits, step: int):  # noqa: ANN001, ANN201
    """The encoded minibatch that training step ``step`` of ``cfg`` sees."""
    sampler = EpochSampler(len(splits.train), cfg.batch_size, seed=cfg.seed)
    return bundle.encode([splits.train[i] for i in sampler.batch(step)], cfg.max_length)


def first_batch_loss(bundle: ModelBundle, cfg: TrainConfig, splits) -> Callable[[], torch.Tensor]:  # noqa: ANN001
    """The loss of the batch that training step 0 of ``cfg`` sees."""
    batch = run_batch(bundle, cfg, splits, 0)
    return lambda: bundle.loss(batch)


def _batch_grads(bundle: ModelBundle, cfg: TrainConfig, splits, params, batches: int):  # noqa: ANN001, ANN202
    """Yield ∇_params f(·; ξ_t) (a tuple, None for unused tensors) for the first ``batches``
    minibatches of ``cfg``'s run, in eval mode, leaving ``requires_grad`` flags as found."""
    flags = [p.requires_grad for p in params]
    with eval_mode(bundle.model):
        try:
            for p in params:
                p.requires_grad_(True)
            for t in range(batches):
                loss = bundle.loss(run_batch(bundle, cfg, splits, t))
                yield torch.autograd.grad(loss, params, allow_unused=True)
        finally:
            for p, f in zip(params, flags):
                p.requires_grad_(f)


def gradient_rms(
    bundle: ModelBundle,
    cfg: TrainConfig,
    splits,  # noqa: ANN001
    params: list[torch.Tensor],
    *,
    batches: int = 8,
    zo: bool = False,
    mu: float = 1e-3,
) -> float:
    """√(mean_t ‖∇_x f(x; ξ_t)‖²) over the first ``batches`` minibatches the run will see.

    This, not one batch's ‖g‖, is what the SPSA noise of a run scales with (E_ξ E_z (g_ξᵀz)²
    = E_ξ‖g_ξ‖²); one batch's norm varied ×3 between batches of MiniLM at initialisation.
    ``zo``: from function values only, (g_ξᵀz)² by central differences along one Gaussian z
    per batch (an unbiased estimate of ‖g_ξ‖² up to O(μ²))."""
    from smoothlab.perturb import seeded_gaussian, shifted

    if not zo:
        total = sum(
            sum(float(g.double().pow(2).sum()) for g in grads if g is not None)
            for grads in _batch_grads(bundle, cfg, splits, params, batches)
        )
        return math.sqrt(total / batches)
    model, total = bundle.model, 0.0
    with eval_mode(model), torch.no_grad():
        for t in range(batches):
            batch = run_batch(bundle, cfg, splits, t)
            f = []
            for s in (mu, -mu):
                with shifted(params, seeded_gaussian(10_000 + t), s, model):
                    f.append(float(bundle.loss(batch)))
            total += ((f[0] - f[1]) / (2 * mu)) ** 2
    return math.sqrt(total / batches)


def signal_fraction(total: float, diag: float, n: int, *, clip: bool = True) -> float:
    """φ = ‖G‖²/E‖g‖² from n i.i.d. minibatch gradients g_t, given ``total`` = ‖Σ g_t‖² and
    ``diag`` = Σ ‖g_t‖²: the mean cross product g_s·g_t (s ≠ t, unbiased for ‖G‖²) over the
    mean squared norm, clipped to [1/n, 1] (below 1/n the n batches cannot tell signal from
    noise)."""
    off = (total - diag) / (n * (n - 1))
    phi = off / (diag / n)
    return min(max(phi, 1.0 / n), 1.0) if clip else phi


GRAM_LIMIT = 1 << 28  # stored gradient entries (1 GiB of float32) up to which φ gets a stderr


def _jackknife(gram: torch.Tensor) -> float:
    """Leave-one-batch-out stderr of :func:`signal_fraction` (unclipped) from the Gram matrix."""
    n = gram.shape[0]
    total, diag, rows = float(gram.sum()), gram.diagonal(), gram.sum(1)
    loo = [
        signal_fraction(
            total - 2 * float(rows[t]) + float(diag[t]),
            float(diag.sum() - diag[t]),
            n - 1,
            clip=False,  # the spread of the estimate itself, not of its clipped value
        )
        for t in range(n)
    ]
    mean = sum(loo) / n
    return math.sqrt((n - 1) / n * sum((v - mean) ** 2 for v in loo))


def gradient_signal(
    bundle: ModelBundle,
    cfg: TrainConfig,
    splits,  # noqa: ANN001
    params: list[torch.Tensor],
    *,
    batches: int = 16,
) -> tuple[float, float]:
    """(φ_y, stderr): the signal fraction ‖E g_ξ‖²/E‖g_ξ‖² of the first-order block's
    minibatch gradients over the first ``batches`` minibatches the run will see (the η_y
    rule's noise factor, see :mod:`smoothlab.advisor`). The stderr is the leave-one-batch-out
    jackknife, from the gradients' Gram matrix when they fit in :data:`GRAM_LIMIT` entries
    (LoRA, prompt and prefix blocks do; a full fo-ft block gets φ from running sums, stderr nan)."""
    if batches < 3:
        raise UsageError(f"gradient_signal needs batches >= 3, got {batches}")
    keep = sum(p.numel() for p in params) * batches <= GRAM_LIMIT
    running = [] if keep else [torch.zeros(p.shape, dtype=torch.float64) for p in params]
    diag, flat = 0.0, []
    for grads in _batch_grads(bundle, cfg, splits, params, batches):
        grads = [
            g.detach() if g is not None else torch.zeros_like(p) for g, p in zip(grads, params)
        ]
        if keep:  # the Gram matrix gives φ and its jackknife
            flat.append(torch.cat([g.float().flatten().cpu() for g in grads]))
            continue
        for acc, g in zip(running, grads):
            acc += g.double().cpu()
        diag += sum(float(g.double().pow(2).sum()) for g in grads)
    if not keep:
        total = sum(float(a.pow(2).sum()) for a in running)
        return signal_fraction(total, diag, batches), math.nan
    G = torch.stack(flat)
    gram = (G @ G.T).double()
    return signal_fraction(float(gram.sum()), float(gram.trace()), batches), _jackknife(gram)


def minibatch_inputs(cfg: TrainConfig, *, zo: bool = False) -> dict[str, float | int]:
    """The advisor's minibatch inputs for ``cfg`` at step 0 — for x the random-walk cap's ‖x‖,
    gradient RMS (:func:`gradient_rms`) and planned steps, for y the signal fraction φ_y
    (:func:`gradient_signal`) — what advice from a recorded trajectory (which holds L only)
    needs. Empty for a block the method does not train."""
    bundle, _, splits = build(cfg)
    out: dict[str, float | int] = _gradient_statistics(bundle, cfg, splits, zo=zo)
    if get_method(cfg.method).has_zo:
        x, _ = split_parameters(bundle.model, cfg.method)
        out.update(weight_norm_x=weight_norm(x), steps=cfg.steps)
    return out


def _gradient_statistics(bundle: ModelBundle, cfg: TrainConfig, splits, *, zo: bool) -> dict:  # noqa: ANN001
    """The minibatch-gradient fields of :class:`Curvature` for ``cfg``'s blocks:
    ``grad_rms_x`` (the walk cap's noise scale) and ``signal_y``/``signal_y_stderr`` (φ_y)."""
    m = get_method(cfg.method)
    x, y = split_parameters(bundle.model, cfg.method)
    out: dict[str, float] = {}
    if m.has_zo:
        out["grad_rms_x"] = gradient_rms(bundle, cfg, splits, x, zo=zo, mu=cfg.mu)
    if m.has_fo:
        out["signal_y"], out["signal_y_stderr"] = gradient_signal(bundle, cfg, splits, y)
    return out


def advise_config(
    cfg: TrainConfig,
    *,
    hvp: str = "fd",
    vectors: int = 10,
    z: str = "gaussian",
    rule: str = "auto",
    second_moment_samples: int = 0,
) -> tuple[Advice, Curvature]:
    """Build ``cfg``'s model (PEFT attached, weights as at step 0) and advise on the batch of
    step 0 — what ``train --lr-base auto`` needs. q and one_sided come from ``cfg``."""
    cfg.validate()
    bundle, _, splits = build(cfg)
    loss_fn = first_batch_loss(bundle, cfg, splits)
    curv = measure_method(
        bundle,
        cfg.method,
        loss_fn,
        hvp=hvp,
        vectors=vectors,
        seed=cfg.seed,
        z=z,
        second_moment_samples=second_moment_samples,
    )
    # the walk cap's noise scale and η_y's noise factor, over the run's first minibatches
    curv = dataclasses.replace(curv, **_gradient_statistics(bundle, cfg, splits, zo=hvp == "zo"))
    adv = advice_from_curvature(
        curv,
        cfg.method,
        q=cfg.q,
        rule=rule,
        one_sided=cfg.one_sided,
        source=f"probe at initialisation, step-0 batch ({hvp}, {vectors} vectors)",
        steps=cfg.steps,
    )
    return adv, curv


def _missing_rate(advice: Advice, method: str | None) -> str:
    """Why η_y/η_x is not available: which rate is missing, and why."""
    m = get_method(method) if method is not None else None
    trains_x = advice.d_x > 0 if m is None else m.has_zo
    trains_y = math.isfinite(advice.L_y) if m is None else m.has_fo
    if not (trains_x and trains_y):
        block = "y (no PEFT block)" if trains_x else "x (no base block)"
        return f"eta_y / eta_x: n/a (the method trains one block only: none for {block})"
    if not math.isfinite(advice.eta_y):
        why = "no L_y was measured (a zo probe measures x only; --hvp fd or exact measures y)"
        return f"eta_y / eta_x: n/a (no eta_y: {why})"
    return f"eta_y / eta_x: n/a (no eta_x: rule {advice.rule} lacks its inputs)"


def ratio_line(advice: Advice, method: str | None = None) -> str:
    """η_y/η_x beside the paper's Table 2 range (1e3–1e4 on 7B models); when one rate is
    missing, which and why (``method``: the advised method, which says which blocks it trains)."""
    if not math.isfinite(advice.ratio):
        return _missing_rate(advice, method)
    return advice.ratio_text().removeprefix("ratio   : ")  # Advice.describe's own line


def _flag_args(cfg: TrainConfig, skip: set[str]) -> list[str]:
    """``smoothlab train`` flags for every field of ``cfg`` that differs from its default and
    that the command accepts (bools as ``--x``/``--no-x``, tuples comma-joined, floats exact)."""
    default, args = TrainConfig(), []
    for f in dataclasses.fields(TrainConfig):
        value = getattr(cfg, f.name)
        if f.name in skip or not f.metadata.get("cli", True) or value == getattr(default, f.name):
            continue
        flag = f.metadata.get("flag") or "--" + f.name.replace("_", "-")
        if value is None:
            raise UsageError(f"train has no flag for {f.name}=None (its default is not None)")
        if isinstance(value, bool):
            args.append(flag if value else "--no-" + flag[2:])
        elif isinstance(value, tuple):
            args += [flag, ",".join(map(str, value))]
        else:
            args += [flag, repr(value) if isinstance(value, float) else str(value)]
    return args


def _auto_dtype_or_none(model: str | None) -> str | None:
    """:func:`auto_dtype` of ``model``, or None where its config cannot be read here (a hub
    model offline): the printed command then keeps an explicit ``--dtype``."""
    try:
        return auto_dtype(model)
    except UsageError:
        return None


def train_command(advice: Advice, cfg: TrainConfig, *, program: str = "smoothlab train") -> str:
    """The exact ``smoothlab train`` command line running ``cfg`` with the advised rates: the
    method, both rates, every other option that differs from train's default, and ``--out``."""
    m = get_method(cfg.method)
    lr_base = advice.eta_x if m.has_zo else 0.0
    lr_peft = advice.eta_y if m.has_fo else 0.0
    if not all(math.isfinite(v) and v >= 0 for v in (lr_base, lr_peft)):
        raise UsageError(
            f"the advice has no usable rate for {cfg.method!r}: eta_x={lr_base!r}, eta_y={lr_peft!r}"
        )
    args = ["--method", cfg.method, "--lr-base", f"{lr_base:.3g}", "--lr-peft", f"{lr_peft:.3g}"]
    if cfg.dtype != AUTO and cfg.dtype == _auto_dtype_or_none(cfg.model):  # a run records
        cfg = dataclasses.replace(cfg, dtype=AUTO)  # auto as the dtype it loaded: no flag
    args += _flag_args(cfg, {"method", "lr_base", "lr_peft", "out", "extend_steps"})
    args += ["--out", cfg.out]
    return program + " " + " ".join(shlex.quote(a) for a in args)
