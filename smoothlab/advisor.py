r"""Learning-rate advisor: step sizes from block curvature (the paper's Section 3, insight 1).

**First-order block y** (exact minibatch gradients g_ξ, E_ξ g_ξ = G = ∇F): the descent lemma
E F(y − η g_ξ) ≤ F − η‖G‖² + (L_y η²/2) E_ξ‖g_ξ‖² is minimised at

    η_y = c_y φ_y / L_y,     φ_y = ‖G‖² / E_ξ‖g_ξ‖²  (the gradient's signal fraction, ≤ 1)

(the SGD form of the rule; φ_y = ‖G‖²/(‖G‖² + tr Σ/B) is McCandlish et al. 2018's noise
scale at batch B). Without a measured φ_y it is the paper's c_y/L_y (``eta_y_lemma``, printed
beside). φ_y is estimated from the gradients of the first minibatches the run will see
(``signal_y``; :func:`smoothlab.hybrid.advise.gradient_signal`). Why it matters, measured
(bench/out/advisor_vs_grid.txt): on MiniLM fo-lora at initialisation L_y ≈ 1.1 gives
c_y/L_y ≈ 0.93, on the far side of the loss cliff (1.0 does not train; best 0.316), while
φ_y ≈ 0.13–0.37 over three seeds. Reported beside it: the gradient-direction curvature
ρ_y = g_yᵀH_yy g_y/‖g_y‖² and the quadratic model's line minimiser 1/ρ_y.

**Zeroth-order block x, rule ``"curvature"`` (the default when curvature inputs are given).**
One SPSA step x⁺ = x − η ĝ with ĝ = (1/q) Σ_i (gᵀz_i) z_i (the μ → 0 limit of both the one-
and two-sided estimate), z_i i.i.d. with independent coordinates, E z = 0, E z_a² = 1,
E z_a⁴ = κ (Gaussian κ = 3, Rademacher κ = 1); g = ∇_x f, H = ∇²_xx f at x. The second-order
model of f:

    E f(x − ηĝ) ≈ f − η gᵀE ĝ + (η²/2) E[ĝᵀHĝ],     E ĝ = E[z zᵀ] g = g.

E[ĝᵀHĝ] = (1/q²) Σ_{i,j} E[(gᵀz_i)(gᵀz_j) z_iᵀH z_j]. The q(q−1) pairs i ≠ j are independent:
each gives (E[(gᵀz)z])ᵀ H E[(gᵀz)z] = gᵀHg. The q diagonal terms need the fourth moment
E[z_a z_b z_c z_d] = δ_ab δ_cd + δ_ac δ_bd + δ_ad δ_bc + (κ − 3) δ_abcd (Isserlis for κ = 3):

    E[(gᵀz)² zᵀHz] = Σ g_a g_b H_cd E[z_a z_b z_c z_d] = ‖g‖² tr H + 2 gᵀHg + (κ−3) Σ_a g_a² H_aa,
    E[ĝᵀHĝ] = (1/q)(‖g‖² tr H + 2 gᵀHg + (κ−3) Σ_a g_a² H_aa) + (1 − 1/q) gᵀHg.

Minimising −η‖g‖² + (η²/2) E[ĝᵀHĝ] over η (with ρ = gᵀHg/‖g‖², δ = Σ g_a² H_aa/‖g‖²):

    η_x* = q / (tr H + (q+1) ρ + (κ−3) δ)                          ("curvature", × c_x)
    η_x,safe = q / (tr⁺H + (q+1) L_x + |κ−3| L_x)   (ρ, |δ| ≤ L_x)    ("safe")

and the model predicts the one-step change −η‖g‖² + (η²/2)E[ĝᵀHĝ] = −‖g‖²η*/2 at η*.
Instead of tr H one may give the measured single-direction second moment
m₁ = E[(gᵀz)² zᵀHz]/‖g‖² (= tr H + 2ρ + (κ−3)δ); then η* = q / (m₁ + (q−1) ρ).

Assumptions: the quadratic model holds over one step (a step moves x by η‖ĝ‖ ≈ η‖g‖√(d/q));
μ → 0 (the O(μ²) bias of the difference quotient is ignored); g and H are those of the batch
the step sees (minibatch noise is not modelled: with E_ξ over batches the numerator would be
‖∇F‖² instead of ‖g_ξ‖², a smaller rate when the gradient noise dominates).
Guards (see :func:`advise`): the trace is floored at L_x when L_x is known (a ``zo`` probe
gives none; its trace is used as measured, with a warning when its stderr exceeds its value)
(tr H ≥ λ_max for H ⪰ 0; a trace
estimate below L_x, or negative, is rounding/sampling noise or a saddle, and a step sized
by a near-zero trace would be unbounded), ρ at 0. Effective dimension r_x = tr H / L_x.

**Many steps: the random-walk cap** (``rule="walk"``; ``auto`` takes min(curvature, walk), or
whichever of the two has its inputs: advice from a recorded trajectory, which holds L only,
is the cap; ``auto`` falls back to ``paper`` only when neither can be computed).
η_x* is the best rate for *one* step, and on MiniLM at initialisation the measured one-step
change agrees with it (bench/out/advisor_vs_grid.txt). Over a run it is far too large: the
noise of ĝ, E‖η(ĝ − g)‖² ≈ η²‖g‖²(d_x + κ − 2)/q per step, is isotropic, and along the
directions where the loss is flat or concave near x (most of them at initialisation: the
measured tr H is small or negative there) nothing pulls it back, so T steps add up like a
random walk of length η‖g‖√(T((d_x + κ − 2)/q + 1)). Once that walk is as long as the
weights themselves, the network is randomised and the loss explodes. The cap keeps the walk
to a fraction c_w of ‖x‖ over the T planned steps:

    η_x,walk = c_w ‖x‖ / (ḡ √(T ((d_x + κ − 2)/q + 1))),     c_w = 1/8     ("walk")

with ḡ² = E_ξ‖g_ξ‖² over minibatches (``grad_rms_x``; one batch's ‖g‖ when not measured).
c_w was fitted on zo-ft, seed 0, 300 steps (bench/advisor_vs_grid.py): the best cell is 1e-3
(c_w ≈ 0.19 there) and the loss explodes at 3.2e-3 (c_w ≈ 0.59). A first choice, c_w = 1/4
(1.34e-3), trained to a final loss of 0.96 against 0.68 at 1e-3: the loss-vs-η curve has a
cliff just above its best rate, so the cap keeps a factor-2 margin below it. Seed 1 and the
hybrid method are the out-of-sample checks. The cap is a trust region on the accumulated noise, in
the spirit of LARS' ‖Δw‖/‖w‖ bound (You et al. 2017), not a consequence of the quadratic model.

**The paper's rule** (``rule="paper"``), kept for comparison: minimising the descent-lemma
bound −η‖g‖² + (L_x η²/2) E‖ĝ‖² with E‖ĝ‖² = ((d_x + κ − 2)/q + 1)‖g‖² (Gaussian: d_x + 1)
gives η_x = c_x q / (L_x (d_x + 1 + q)) ≈ c_x / (L_x d_x). It pays for L_x·d_x where the
SPSA step pays for tr H = r_x L_x; on MiniLM r_x ≪ d_x (see bench/out/advisor_vs_grid.txt).
With ``x_gradient="exact"`` (first-order x): η_x = c_x / L_x (Example 2.3: 1/(2a), 1/(2b)).

**Joint step.** With ĝ_x as above and the exact g_y, the joint quadratic model predicts

    Δ = −η_x‖g_x‖² − η_y‖g_y‖² + ½η_x² E[ĝ_xᵀH_xx ĝ_x] + η_x η_y g_xᵀH_xy g_y + ½η_y² g_yᵀH_yy g_y

(E ĝ_x = g_x makes the cross term exact in expectation). If Δ > 0 both rates are multiplied
by s = a/b, the model's minimiser along the ray (a = the linear, b = twice the quadratic
coefficient), which makes Δ = −a²/(2b) < 0.

Uncertainty, to first order: se(η)/η = se(denominator)/denominator with the stderrs of the
inputs combined in quadrature; se(η_y)/η_y = se(L_y)/L_y ⊕ se(φ_y)/φ_y.
"""

from __future__ import annotations

import math
import numbers
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import NamedTuple

import numpy as np

from .errors import UsageError

RULES = ("auto", "curvature", "walk", "safe", "paper", "exact")
WALK_C = 0.125  # c_w of the random-walk cap (see the module docstring for how it was chosen)
PAPER_TABLE2_RATIO = (1e3, 1e4)  # the paper's Table 2: η_y/η_x on 7B models

nan = math.nan


@dataclass(frozen=True)
class Advice:
    """A learning-rate proposal with its inputs.

    ``eta_x``/``eta_y``: the proposal (rule ``rule``, times ``joint_scale``). ``eta_x_paper``,
    ``eta_x_curvature``, ``eta_x_safe``: each rule's value before the joint scaling (nan when
    its inputs are missing). A block the method does not train has rate nan.
    """

    eta_x: float
    eta_y: float
    eta_x_stderr: float
    eta_y_stderr: float
    L_x: float
    L_y: float
    L_x_stderr: float
    L_y_stderr: float
    d_x: int
    q: int
    one_sided: bool
    x_gradient: str
    c_x: float
    c_y: float
    source: str
    rule: str = "paper"
    kurtosis: float = 3.0
    eta_x_paper: float = nan
    eta_x_curvature: float = nan
    eta_x_curvature_stderr: float = nan
    eta_x_safe: float = nan
    eta_x_walk: float = nan  # the random-walk cap c_x·c_w‖x‖/(‖g‖√(T(d/q+1)))
    weight_norm_x: float = nan
    grad_rms_x: float = nan  # √E_ξ‖g_ξ‖², the walk cap's noise scale (nan: one batch's ‖g_x‖)
    steps: int = 0  # the horizon T the walk cap was computed for
    trace_x: float = nan
    trace_x_stderr: float = nan
    second_moment_x: float = nan  # m₁ = E[(gᵀz)² zᵀHz]/‖g‖², when measured directly
    second_moment_x_stderr: float = nan
    rho_x: float = nan  # g_xᵀH_xx g_x / ‖g_x‖²
    rho_x_stderr: float = nan
    delta_x: float = nan  # Σ g_a² H_aa / ‖g‖² (enters only for κ ≠ 3)
    delta_x_stderr: float = nan
    denominator_x: float = nan  # what η_x* = c_x q / denominator used (after the guards)
    trace_floored: bool = False
    rho_y: float = nan  # g_yᵀH_yy g_y / ‖g_y‖²
    signal_y_stderr: float = nan
    signal_y: float = nan  # φ_y = ‖E g_ξ‖² / E‖g_ξ‖² over the first minibatches (nan: not measured)
    eta_y_lemma: float = nan  # c_y / L_y, the paper's rule (φ_y = 1)
    grad_norm_x: float = nan
    grad_norm_y: float = nan
    cross: float = nan  # g_xᵀ H_xy g_y
    predicted_change: float = nan  # the joint model's Δ at (eta_x, eta_y), after scaling
    predicted_change_unscaled: float = nan
    joint_scale: float = 1.0

    @property
    def ratio(self) -> float:
        """η_y / η_x."""
        return self.eta_y / self.eta_x if self.eta_x else nan

    @property
    def r_x(self) -> float:
        """Effective dimension tr H_xx / L_x (compare with d_x)."""
        return self.trace_x / self.L_x if self.L_x and math.isfinite(self.L_x) else nan

    @property
    def eta_y_gradient(self) -> float:
        """1/ρ_y: the quadratic model's exact minimiser along −g_y."""
        return 1.0 / self.rho_y if self.rho_y > 0 else nan

    @property
    def formula(self) -> str:
        fx = {
            "exact": "eta_x = c_x / L_x",
            "paper": "eta_x = c_x * q / (L_x * (d_x + kappa - 2 + q))  (~ c_x / (L_x d_x))",
            "curvature": "eta_x = c_x * q / (max(tr H_xx, L_x) + (q+1) rho_x + (kappa-3) delta_x)",
            "safe": "eta_x = c_x * q / (max(tr H_xx, 0) + (q+1+|kappa-3|) L_x)",
            "walk": f"eta_x = c_x * {WALK_C:g} |x| / (|g_x| sqrt(T ((d_x+kappa-2)/q + 1)))"
            "  (random-walk cap"
            + (
                "; below the one-step curvature rate)"
                if math.isfinite(self.eta_x_curvature)
                else ")"
            ),
        }[self.rule]
        fy = "c_y * phi_y / L_y" if math.isfinite(self.signal_y) else "c_y / L_y"
        return f"{fx};  eta_y = {fy}"

    def as_dict(self) -> dict:
        d = asdict(self)
        d.update(
            ratio=self.ratio, formula=self.formula, r_x=self.r_x, eta_y_gradient=self.eta_y_gradient
        )
        return d

    def ratio_text(self) -> str:
        """η_y/η_x against the paper's Table 2 range, and with the paper's η_x."""
        lo, hi = PAPER_TABLE2_RATIO
        where = "inside" if lo <= self.ratio <= hi else ("below" if self.ratio < lo else "above")
        paper = self.eta_y / self.eta_x_paper if self.eta_x_paper > 0 else math.nan
        return (
            f"ratio   : eta_y / eta_x = {self.ratio:.4g}  ({where} the paper's Table 2 range "
            f"{lo:.0e}..{hi:.0e}"
            + (f"; with the paper's eta_x: {paper:.3g})" if math.isfinite(paper) else ")")
        )

    def describe(self) -> str:
        """A few lines for a terminal: the formula, the inputs and both rules' results."""

        def pm(v: float, s: float) -> str:  # a zero stderr: exact for this batch
            return f"{v:.4g}" + (
                (" (exact on the batch)" if s == 0 else f" ± {s:.2g}") if math.isfinite(s) else ""
            )

        lines = [
            f"formula : {self.formula}",
            f"inputs  : L_x = {pm(self.L_x, self.L_x_stderr)}, L_y = {pm(self.L_y, self.L_y_stderr)}, "
            f"d_x = {self.d_x:,}, q = {self.q}, {'one' if self.one_sided else 'two'}-sided, "
            f"c_x = {self.c_x:g}, c_y = {self.c_y:g}  (source: {self.source})",
        ]
        if math.isfinite(self.trace_x) or math.isfinite(self.second_moment_x):
            lines.append(
                f"curv.   : tr H_xx = {pm(self.trace_x, self.trace_x_stderr)}, r_x = tr/L_x = {self.r_x:.4g} "
                f"(d_x = {self.d_x:.3g}), rho_x = {pm(self.rho_x, self.rho_x_stderr)}, "
                f"m1 = {pm(self.second_moment_x, self.second_moment_x_stderr)}, kappa = {self.kurtosis:g}"
                + (" [trace floored at L_x]" if self.trace_floored else "")
            )
        has_x = self.d_x > 0 and math.isfinite(self.eta_x)
        has_y = math.isfinite(self.L_y)
        if has_x:
            rules = (
                ("curvature (one step)", self.eta_x_curvature),
                (f"random-walk cap over {self.steps} steps", self.eta_x_walk),
                ("safe", self.eta_x_safe),
                ("paper c_x/(L_x d_x)", self.eta_x_paper),
            )  # a rule whose inputs are missing (a zo probe has no L_x) is left out
            lines += [
                f"eta_x   : {pm(self.eta_x, self.eta_x_stderr)}  [rule {self.rule}]",
                "          " + ", ".join(f"{k} {v:.4g}" for k, v in rules if math.isfinite(v)),
            ]
        elif self.d_x > 0:
            lines.append(f"eta_x   : none (rule {self.rule} lacks its inputs)")
        else:
            lines.append("eta_x   : none (no base block x is trained)")
        if has_y:
            lines.append(
                f"eta_y   : {pm(self.eta_y, self.eta_y_stderr)}  (phi_y = {self.signal_y:.3g}; "
                f"paper c_y/L_y {self.eta_y_lemma:.4g}; 1/rho_y along g_y {self.eta_y_gradient:.4g})"
            )
        else:
            lines.append(
                "eta_y   : none (no L_y: no PEFT block y is trained, or the probe measured none)"
            )
        if has_x and has_y:
            lines.append(self.ratio_text())
        if math.isfinite(self.predicted_change):
            lines.append(
                f"joint   : predicted one-step change {self.predicted_change:.4g} (cross term "
                f"g_x'H_xy g_y = {self.cross:.4g}); pair scaled by {self.joint_scale:.3g}"
            )
        return "\n".join(lines)


def _real(v: object) -> bool:
    """A real number (numpy's too), not a bool."""
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def _positive(name: str, v: float) -> float:
    if not (_real(v) and math.isfinite(v) and v > 0):
        raise UsageError(f"{name} must be a positive finite number, got {v!r}")
    return float(v)


def _optional(name: str, v: float | None) -> float:
    if v is None:
        return nan
    if not _real(v):
        raise UsageError(f"{name} must be a number or None, got {v!r}")
    return float(v)


def _optional_positive(name: str, v: float | None) -> float:
    """nan for None, else ``v`` checked positive and finite (a norm, which 0 or -1 is not)."""
    return nan if v is None else _positive(name, v)


def _stderr(name: str, v: float) -> float:
    """A standard error: a number >= 0, or nan (unknown)."""
    if not (_real(v) and (math.isnan(v) or v >= 0)):
        raise UsageError(f"{name} must be a number >= 0 or nan (unknown), got {v!r}")
    return float(v)


def _rel(se: float, v: float) -> float:
    return (se / abs(v)) if v else nan


def curvature_rate(
    L_x: float,
    q: int,
    *,
    trace: float = nan,
    trace_stderr: float = nan,
    second_moment: float = nan,
    second_moment_stderr: float = nan,
    rho: float = nan,
    rho_stderr: float = nan,
    delta: float = nan,
    kurtosis: float = 3.0,
    L_x_stderr: float = nan,
    delta_stderr: float = nan,
) -> tuple[float, float, float, bool]:
    """(η*, se(η*), denominator, trace floored?) of the curvature rule with c_x = 1.

    Denominator: m₁ + (q−1)ρ⁺ when the second moment m₁ is given, else
    max(tr H, L_x) + (q+1)ρ⁺ + (κ−3)δ. A missing ρ is replaced by its bound L_x; a missing δ
    by L_x·sign(κ−3) (the larger denominator). Without L_x (nan) no floor applies.

    se(den) = √Σ (c_k se_k)² over the terms c_k v_k that enter it, the terms standing in for
    L_x summed into one coefficient (they move together); nan when any of them has no
    stderr (a Lanczos L_x has none: a denominator built on it has an unknown error, not 0).
    """
    have_L = math.isfinite(L_x) and L_x > 0
    r = max(rho, 0.0) if math.isfinite(rho) else (L_x if have_L else nan)
    in_L = 0.0  # the coefficient of L_x in the terms standing in for it
    terms: list[tuple[float, float]] = []  # (coefficient, stderr) of each measured term
    if math.isfinite(second_moment):
        den = second_moment + (q - 1) * (r if q > 1 else 0.0)
        terms.append((1.0, second_moment_stderr))
        floored = False
    else:
        if not math.isfinite(trace):
            return nan, nan, nan, False
        floored = have_L and trace < L_x
        t = L_x if floored else trace
        d = (
            delta
            if math.isfinite(delta)
            else (math.copysign(L_x, kurtosis - 3.0) if have_L else 0.0)
        )
        den = t + (q + 1) * r + (kurtosis - 3.0) * d
        in_L += 1.0 if floored else 0.0
        terms.append((0.0 if floored else 1.0, trace_stderr))
        if math.isfinite(delta):
            terms.append((kurtosis - 3.0, delta_stderr))
        else:
            in_L += abs(kurtosis - 3.0)
    rho_coef = (q - 1.0) if math.isfinite(second_moment) else (q + 1.0)
    if math.isfinite(rho):
        terms.append((rho_coef, rho_stderr))
    else:
        in_L += rho_coef
    terms.append((in_L, L_x_stderr))
    if not (math.isfinite(den) and den > 0):
        return nan, nan, den, floored
    eta = q / den
    return eta, eta * _quadrature(terms) / den, den, floored


def _quadrature(terms: Sequence[tuple[float, float]]) -> float:
    """√Σ (c·se)² over the terms with c ≠ 0; nan when one of them has no finite stderr."""
    used = [(c, se) for c, se in terms if c]
    if not all(math.isfinite(se) for _, se in used):
        return nan
    return math.sqrt(sum((c * se) ** 2 for c, se in used))


def joint_change(
    eta_x: float, eta_y: float, *, gx2: float, gy2: float, hx: float, cross: float, hy: float
) -> tuple[float, float]:
    """(Δ, s): the joint quadratic model's one-step change and the scale s ≤ 1 that makes it a
    decrease. ``gx2``/``gy2``: ‖g_x‖², ‖g_y‖²; ``hx`` = E[ĝ_xᵀH_xx ĝ_x]; ``cross`` = g_xᵀH_xy g_y;
    ``hy`` = g_yᵀH_yy g_y. Absent blocks: give η = 0 (their terms vanish)."""
    terms = [(eta_x, gx2), (eta_y, gy2)]
    a = sum(e * g for e, g in terms if e)
    b = (eta_x**2 * hx if eta_x else 0.0) + (eta_y**2 * hy if eta_y else 0.0)
    if eta_x and eta_y:
        b += 2 * eta_x * eta_y * cross
    delta = -a + 0.5 * b
    scale = a / b if (math.isfinite(delta) and delta > 0 and b > 0) else 1.0
    return delta, scale


def _check_advise_args(
    rule: str,
    x_gradient: str,
    L_x: float | None,
    L_y: float | None,
    c_x: float,
    c_y: float,
    d_x: int,
    q: int,
    kurtosis: float,
) -> tuple[float, float, float, float]:
    """Validate :func:`advise`'s scalar arguments; (L_x, L_y, c_x, c_y) as floats (nan if None)."""
    if rule not in RULES:
        raise UsageError(f"unknown rule {rule!r}; accepted: {', '.join(RULES)}")
    if x_gradient not in ("zo", "exact"):
        raise UsageError(f"x_gradient must be 'zo' or 'exact', got {x_gradient!r}")
    Lx = nan if L_x is None else _positive("L_x", L_x)
    Ly = nan if L_y is None else _positive("L_y", L_y)
    c_x, c_y = _positive("c_x", c_x), _positive("c_y", c_y)
    if not isinstance(d_x, int | np.integer) or isinstance(d_x, bool) or d_x < 0:
        raise UsageError(
            f"d_x must be a non-negative integer (parameters in the base block), got {d_x!r}"
        )
    if not isinstance(q, numbers.Integral) or isinstance(q, bool) or q < 1:
        raise UsageError(f"q must be an integer >= 1, got {q!r}")
    if not (_real(kurtosis) and math.isfinite(kurtosis) and kurtosis >= 1):
        raise UsageError(
            f"kurtosis must be a finite number >= 1 (E z^4 of a unit-variance z), got {kurtosis!r}"
        )
    return Lx, Ly, c_x, c_y


_MEASURED = (
    ("trace", "trace_x"),
    ("second_moment", "second_moment_x"),
    ("rho_x", "rho_x"),
    ("delta_x", "delta_x"),
    ("rho_y", "rho_y"),
    ("signal_y", "signal_y"),
    ("grad_norm_x", "grad_norm_x"),
    ("grad_norm_y", "grad_norm_y"),
    ("cross", "cross"),
)


def _measured(*values: float | None) -> dict[str, float]:
    """The optional measurements (in :data:`_MEASURED`'s order) as floats, nan when None, keyed
    by their :class:`Advice` field; validated in that order."""
    return {field: _optional(arg, v) for (arg, field), v in zip(_MEASURED, values, strict=True)}


def _stderrs(
    L_x_stderr: float,
    L_y_stderr: float,
    trace_stderr: float,
    second_moment_stderr: float,
    rho_x_stderr: float,
    signal_y_stderr: float = nan,
    delta_x_stderr: float = nan,
) -> dict[str, float]:
    """The standard errors keyed by their :class:`Advice` field (each >= 0 or nan)."""
    given = dict(
        delta_x_stderr=delta_x_stderr,
        signal_y_stderr=signal_y_stderr,
        L_x_stderr=L_x_stderr,
        L_y_stderr=L_y_stderr,
        trace_x_stderr=trace_stderr,
        second_moment_x_stderr=second_moment_stderr,
        rho_x_stderr=rho_x_stderr,
    )
    arg = {"trace_x_stderr": "trace_stderr", "second_moment_x_stderr": "second_moment_stderr"}
    return {k: _stderr(arg.get(k, k), v) for k, v in given.items()}


class _XRates(NamedTuple):
    """Each base-block rule's rate (× c_x) and the denominators behind them."""

    paper: float
    curvature: float
    curvature_stderr: float
    denominator: float
    floored: bool
    safe: float
    safe_den: float
    walk: float

    def fields(self) -> dict[str, float]:
        return dict(
            eta_x_paper=self.paper,
            eta_x_curvature=self.curvature,
            eta_x_curvature_stderr=self.curvature_stderr,
            eta_x_safe=self.safe,
            eta_x_walk=self.walk,
            denominator_x=self.denominator,
            trace_floored=self.floored,
        )


def _x_rates(
    Lx: float,
    d_x: int,
    q: int,
    kurtosis: float,
    c_x: float,
    m: Mapping[str, float],
    se: Mapping[str, float],
    weight_norm_x: float | None,
    grad_rms_x: float | None,
    steps: int | None,
) -> _XRates:
    """paper = c_x q / (L_x (d_x + κ − 2 + q)), curvature (see :func:`curvature_rate`),
    safe = c_x q / (tr⁺H + (q+1+|κ−3|) L_x) and the random-walk cap of :func:`walk_cap`."""
    paper = c_x * q / (Lx * (int(d_x) + kurtosis - 2 + q)) if d_x else nan
    eta_c, se_c, den, floored = curvature_rate(
        Lx,
        q,
        trace=m["trace_x"],
        trace_stderr=se["trace_x_stderr"],
        second_moment=m["second_moment_x"],
        second_moment_stderr=se["second_moment_x_stderr"],
        rho=m["rho_x"],
        rho_stderr=se["rho_x_stderr"],
        delta=m["delta_x"],
        kurtosis=kurtosis,
        L_x_stderr=se["L_x_stderr"],
        delta_stderr=se["delta_x_stderr"],
    )
    eta_c, se_c = c_x * eta_c, c_x * se_c
    safe_den = max(m["trace_x"], 0.0) + (q + 1 + abs(kurtosis - 3.0)) * Lx
    safe = c_x * q / safe_den if math.isfinite(safe_den) and safe_den > 0 else nan
    g_noise = _optional("grad_rms_x", grad_rms_x)
    # the noise scale: E_ξ‖g_ξ‖² if measured
    g_noise = g_noise if math.isfinite(g_noise) else m["grad_norm_x"]
    walk = c_x * walk_cap(
        _optional("weight_norm_x", weight_norm_x), g_noise, steps, d_x, q, kurtosis
    )  # c_x scales every rate, so ``auto`` compares like with like
    return _XRates(paper, eta_c, se_c, den, floored, safe, safe_den, walk)


def _warn_unresolved(r: _XRates, m: Mapping[str, float], se: Mapping[str, float]) -> None:
    """A warning when the curvature rule's main input, m₁ or the unfloored trace (a ``zo``
    probe has no L_x to floor it at), has a stderr above its value: η_x* is then noise."""
    if math.isfinite(m["second_moment_x"]):
        name, v, s = "m1", m["second_moment_x"], se["second_moment_x_stderr"]
    elif not r.floored:
        name, v, s = "tr H_xx", m["trace_x"], se["trace_x_stderr"]
    else:
        return
    if math.isfinite(s) and s > abs(v):
        warnings.warn(
            f"the curvature rule's {name} = {v:.3g} ± {s:.2g} is not resolved (its stderr "
            f"exceeds its value), so eta_x curvature = {r.curvature:.3g} is noise: measure "
            "more vectors, probe with --hvp fd or exact (L_x floors the trace), or use the "
            "walk rule",
            UserWarning,
            stacklevel=3,
        )


def _resolve_rule(rule: str, x_gradient: str, r: _XRates) -> str:
    """``auto`` → ``exact`` for a first-order x; else the smaller of ``curvature`` and ``walk``
    (whichever have their inputs: a recorded trajectory holds L only, so there the cap alone
    decides); ``paper`` only when neither can be computed."""
    if rule != "auto":
        return rule
    if x_gradient == "exact":
        return "exact"
    candidates = [
        (v, k) for k, v in (("curvature", r.curvature), ("walk", r.walk)) if math.isfinite(v)
    ]
    return min(candidates)[1] if candidates else "paper"


_NEEDS = {
    "walk": "the weight norm |x|, a gradient norm of x and the planned steps "
    "(weight_norm_x=, grad_norm_x= or grad_rms_x=, steps=)",
    "curvature": "tr H_xx (trace=) or the second moment m1 (second_moment=), giving a positive "
    "denominator",
    "safe": "tr H_xx and L_x (trace=, L_x=)",
    "paper": "L_x (L_x=; rule auto falls back to paper when neither curvature nor walk has its "
    "inputs)",
    "exact": "L_x (L_x=)",
}
_WHERE = "a zo probe measures no L_x (--hvp fd or exact do); a recorded run holds L_x only"


def _x_rate(
    rule: str, r: _XRates, Lx: float, c_x: float, q: int, kurtosis: float, se: Mapping[str, float]
) -> tuple[float, float]:
    """(η_x, se(η_x)) of the resolved rule, before the joint scaling; :class:`UsageError`
    naming what the rule needs when its inputs are missing."""
    L_x_stderr = se["L_x_stderr"]
    if rule == "walk":  # exact on the probed batch; batch-to-batch spread not modelled
        eta, se_x = r.walk, nan
    elif rule == "exact":
        eta, se_x = c_x / Lx, c_x / Lx * _rel(L_x_stderr, Lx)
    elif rule == "curvature":
        eta, se_x = r.curvature, r.curvature_stderr
    elif rule == "safe":
        eta, se_x = (
            r.safe,
            r.safe
            * math.hypot(
                _rel(se["trace_x_stderr"], r.safe_den),
                (q + 1 + abs(kurtosis - 3.0)) * Lx * _rel(L_x_stderr, Lx) / r.safe_den,
            ),
        )
    else:
        eta, se_x = r.paper, r.paper * _rel(L_x_stderr, Lx)
    if not math.isfinite(eta):
        raise UsageError(f"rule {rule!r} needs {_NEEDS[rule]} for eta_x ({_WHERE})")
    return eta, se_x


def _scaled_rates(
    rule: str,
    r: _XRates,
    m: Mapping[str, float],
    se: Mapping[str, float],
    *,
    Lx: float,
    Ly: float,
    c_x: float,
    c_y: float,
    d_x: int,
    q: int,
    kurtosis: float,
) -> dict[str, float]:
    """η_x, η_y and their stderrs times the joint model's scale s, with Δ before and after."""
    # no x block (d_x = 0): no x rule applies, whichever was asked; η_y is still advised
    eta_x, se_x = _x_rate(rule, r, Lx, c_x, q, kurtosis, se) if d_x else (nan, nan)
    phi = m["signal_y"]
    eta_y = c_y * (phi if math.isfinite(phi) else 1.0) / Ly
    rel_phi = _rel(se["signal_y_stderr"], phi) if math.isfinite(phi) else 0.0
    se_y = eta_y * math.hypot(_rel(se["L_y_stderr"], Ly), rel_phi)
    rx = m["rho_x"]
    hx_per_g2 = {
        "curvature": r.denominator / q,
        "walk": r.denominator / q if math.isfinite(r.denominator) else r.safe_den / q,
        "safe": r.safe_den / q,
        "paper": Lx * (d_x + kurtosis - 2 + q) / q,
        "exact": rx if math.isfinite(rx) else Lx,
    }[rule]
    gx, gy = m["grad_norm_x"], m["grad_norm_y"]
    change, delta, scale = _joint(eta_x, eta_y, gx, gy, hx_per_g2, m["cross"], m["rho_y"])
    return dict(
        eta_y_lemma=c_y / Ly,
        eta_x=eta_x * scale,
        eta_y=eta_y * scale,
        eta_x_stderr=se_x * scale,
        eta_y_stderr=se_y * scale,
        predicted_change=change,
        predicted_change_unscaled=delta,
        joint_scale=scale,
    )


def _check_no_x_curvature(d_x: int, **x_inputs: float | None) -> None:
    """d_x = 0 means no x block, which has no curvature to give: refuse any that is."""
    given = [k for k, v in x_inputs.items() if v is not None]
    if d_x == 0 and given:
        raise UsageError(
            f"d_x must be a positive integer (parameters in the base block) when "
            f"{'/'.join(given)} is given, got {d_x!r}; d_x=0 means no x block: then pass "
            f"{'=None, '.join(given)}=None"
        )


def advise(
    L_x: float | None,
    L_y: float | None,
    d_x: int,
    *,
    q: int = 1,
    one_sided: bool = False,
    x_gradient: str = "zo",
    c_x: float = 1.0,
    c_y: float = 1.0,
    L_x_stderr: float = nan,
    L_y_stderr: float = nan,
    source: str = "given",
    rule: str = "auto",
    kurtosis: float = 3.0,
    trace: float | None = None,
    trace_stderr: float = nan,
    second_moment: float | None = None,
    second_moment_stderr: float = nan,
    rho_x: float | None = None,
    rho_x_stderr: float = nan,
    delta_x: float | None = None,
    delta_x_stderr: float = nan,
    rho_y: float | None = None,
    signal_y: float | None = None,
    signal_y_stderr: float = nan,
    grad_norm_x: float | None = None,
    grad_norm_y: float | None = None,
    cross: float | None = None,
    weight_norm_x: float | None = None,
    steps: int | None = None,
    grad_rms_x: float | None = None,
) -> Advice:
    """Propose (η_x, η_y) (see module docstring).

    ``rule``: ``curvature`` (needs ``trace`` or ``second_moment``), ``safe`` (``trace`` and
    ``L_x``), ``paper`` (``L_x``, ``d_x``), ``exact`` (first-order x: c_x/L_x) or ``auto``:
    ``exact`` if ``x_gradient="exact"``, else ``curvature`` when its inputs are given, else
    ``paper``, capped by ``walk`` when ``weight_norm_x``, ``grad_norm_x`` and ``steps`` are
    given (the random-walk cap, see the module docstring). ``L_x=None`` (no x block, or a
    ``zo`` probe without L) or ``L_y=None`` (no y block) give nan for what needs them.
    ``d_x=0`` means no x block: ``L_x``, ``trace`` and ``second_moment`` must then be None
    (:class:`UsageError` otherwise). With the gradient norms, ``rho_y`` and ``cross`` the
    joint model's Δ is computed and the pair scaled down if Δ > 0.
    """
    Lx, Ly, c_x, c_y = _check_advise_args(rule, x_gradient, L_x, L_y, c_x, c_y, d_x, q, kurtosis)
    q, kurtosis = int(q), float(kurtosis)
    weight_norm_x = _optional_positive("weight_norm_x", weight_norm_x)
    grad_rms_x = _optional_positive("grad_rms_x", grad_rms_x)
    _check_no_x_curvature(d_x, L_x=L_x, trace=trace, second_moment=second_moment)
    m = _measured(
        trace, second_moment, rho_x, delta_x, rho_y, signal_y, grad_norm_x, grad_norm_y, cross
    )
    if math.isfinite(m["signal_y"]) and not 0 < m["signal_y"] <= 1:
        raise UsageError(f"signal_y must be in (0, 1] (a fraction), got {signal_y!r}")
    se = _stderrs(
        L_x_stderr,
        L_y_stderr,
        trace_stderr,
        second_moment_stderr,
        rho_x_stderr,
        signal_y_stderr,
        delta_x_stderr,
    )
    r = _x_rates(Lx, d_x, q, kurtosis, c_x, m, se, weight_norm_x, grad_rms_x, steps)
    rule = _resolve_rule(rule, x_gradient, r)
    if rule == "curvature" and d_x:
        _warn_unresolved(r, m, se)
    block = dict(Lx=Lx, Ly=Ly, c_x=c_x, c_y=c_y, d_x=d_x, q=q, kurtosis=kurtosis)
    echo = dict(one_sided=one_sided, x_gradient=x_gradient, source=source, steps=steps)
    return _advice(rule, r, m, se, block, echo, weight_norm_x, grad_rms_x)


def _advice(
    rule: str,
    r: _XRates,
    m: dict[str, float],
    se: dict[str, float],
    block: dict,
    echo: dict,
    weight_norm_x: float | None,
    grad_rms_x: float | None,
) -> Advice:
    """Assemble :func:`advise`'s :class:`Advice` from the pieces computed there."""
    return Advice(
        **_scaled_rates(rule, r, m, se, **block),
        **r.fields(),
        **m,
        **se,
        L_x=block["Lx"],
        L_y=block["Ly"],
        d_x=int(block["d_x"]),
        q=block["q"],
        one_sided=echo["one_sided"],
        x_gradient=echo["x_gradient"],
        c_x=block["c_x"],
        c_y=block["c_y"],
        source=echo["source"],
        rule=rule,
        kurtosis=float(block["kurtosis"]),
        weight_norm_x=_optional("weight_norm_x", weight_norm_x),
        grad_rms_x=_optional("grad_rms_x", grad_rms_x),
        steps=int(echo["steps"] or 0),
    )


def walk_cap(
    weight_norm: float, grad_norm: float, steps: int | None, d_x: int, q: int, kurtosis: float
) -> float:
    """η_walk = c_w‖x‖ / (‖g‖ √(T((d_x + κ − 2)/q + 1))): the rate whose SPSA noise random-walks
    the weights a distance c_w‖x‖ in T steps (nan when an input is missing)."""
    if steps is None:
        return nan
    if not isinstance(steps, int | np.integer) or isinstance(steps, bool) or steps < 1:
        raise UsageError(
            f"steps must be a positive integer (the planned run length), got {steps!r}"
        )
    if not (math.isfinite(weight_norm) and math.isfinite(grad_norm) and grad_norm > 0 and d_x):
        return nan
    per_step = grad_norm * math.sqrt((d_x + kurtosis - 2) / q + 1)
    return WALK_C * weight_norm / (per_step * math.sqrt(steps))


def _joint(
    eta_x: float, eta_y: float, gx: float, gy: float, hx_per_g2: float, cross: float, rho_y: float
) -> tuple[float, float, float]:
    """(Δ after scaling, Δ before, scale) of the joint model; nan, nan, 1 without gradient norms."""
    if not (math.isfinite(gx) or math.isfinite(gy)):
        return nan, nan, 1.0
    ex = eta_x if math.isfinite(eta_x) and math.isfinite(gx) else 0.0
    ey = eta_y if math.isfinite(eta_y) and math.isfinite(gy) else 0.0
    kw = dict(
        gx2=gx**2 if ex else 0.0,
        gy2=gy**2 if ey else 0.0,
        hx=hx_per_g2 * gx**2 if ex else 0.0,
        cross=cross if math.isfinite(cross) else 0.0,
        hy=rho_y * gy**2 if ey and math.isfinite(rho_y) else 0.0,
    )
    before, scale = joint_change(ex, ey, **kw)
    after, _ = joint_change(ex * scale, ey * scale, **kw)
    return after, before, scale


def trajectory_L(
    values: Sequence[float],
    *,
    quantile: float = 0.9,
    fraction: float = 0.5,
    n_boot: int = 1000,
    seed: int = 0,
) -> tuple[float, float]:
    """A robust L from a recorded trajectory: the ``quantile`` of the estimates over the first
    ``fraction`` of training (not one noisy point), with a bootstrap standard error."""
    if not 0 < quantile <= 1 or not 0 < fraction <= 1:
        raise UsageError(f"quantile and fraction must lie in (0, 1], got {quantile}, {fraction}")
    x = np.asarray([v for v in values if math.isfinite(v)], dtype=float)
    if x.size == 0:
        raise UsageError("the trajectory has no finite estimates")
    x = x[: max(1, math.ceil(fraction * x.size))]
    value = float(np.quantile(x, quantile))
    if x.size < 3:
        return value, math.nan
    rng = np.random.default_rng(seed)
    boots = np.quantile(rng.choice(x, size=(n_boot, x.size), replace=True), quantile, axis=1)
    return value, float(boots.std(ddof=1))


def advise_from_rows(
    rows: Sequence[Mapping[str, object]],
    d_x: int,
    *,
    x_block: str = "base",
    y_block: str = "peft",
    head_block: str | None = "head",
    quantile: float = 0.9,
    fraction: float = 0.5,
    **kwargs: object,
) -> Advice:
    """Advice from recorded ``smoothness.csv`` rows (dicts with ``step``, ``block``, ``estimate``).

    When the first-order block y was recorded as an adapter block plus a ``head_block``
    (a trained classifier), L_y is taken as the larger of the two, a lower bound of the
    joint block's L."""

    def series(block: str) -> list[float]:
        pts = sorted(
            (float(r["step"]), float(r["estimate"])) for r in rows if r.get("block") == block
        )  # type: ignore[arg-type]
        if not pts:
            found = sorted({str(r.get("block")) for r in rows})
            raise UsageError(
                f"no rows for block {block!r} in the trajectory; blocks found: {found}"
            )
        return [v for _, v in pts]

    lx, sx = trajectory_L(series(x_block), quantile=quantile, fraction=fraction)
    ly, sy = trajectory_L(series(y_block), quantile=quantile, fraction=fraction)
    if head_block and any(r.get("block") == head_block for r in rows):
        # y = adapter + trained head: L_y ≥ max of the two diagonal blocks' L (a lower bound)
        lh, sh = trajectory_L(series(head_block), quantile=quantile, fraction=fraction)
        if lh > ly:
            ly, sy = lh, sh
    return advise(
        lx,
        ly,
        d_x,
        L_x_stderr=sx,
        L_y_stderr=sy,
        source=f"trajectory q{quantile:g} of first {fraction:.0%}",
        **kwargs,
    )  # type: ignore[arg-type]
