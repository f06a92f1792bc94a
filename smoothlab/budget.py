"""The random-walk cap as a budget spent over a run: the ZO rate of ``--lr-base auto``.

The cap of :func:`smoothlab.advisor.walk_cap` sizes η_x at step 0 so that T steps of SPSA
noise random-walk x a distance c_w‖x₀‖:

    η_walk² · T · m₀ = B,     m₀ = (d_x/q) ḡ²  (E‖ĝ‖² per unit η², ḡ² = E_ξ‖∇_x f_ξ‖²).

It assumes ḡ stays what it was at step 0. In hybrid fine-tuning it does not: as the adapter
learns, the loss grows more sensitive to the base weights. On SST-2 with MiniLM (hybrid-lora,
seed 0, η_y = 0.12; bench/advisor_vs_grid.py) the mean of g_t² = (zᵀ∇_x f)² over 25 steps
rose from 0.45 at the start to 24–69 after step 200 in a healthy run (η_x = 1e-4). At the
fixed step-0 cap (7.4e-4) it rose faster (6.5 by step 150, 154 by step 200): the walk passed
its planned length (⅛‖x₀‖ = 35) between steps 100 and 125, reached 2.5× it by step 175, and
the loss exploded. A budget instead charges each step
the squared length it actually moved x, and sizes the next rate so that what is left of B
covers the steps left at the current cost per step:

    W_t = Σ_{s<t} η_s² ‖ĝ_s‖²,   ‖ĝ_s‖² ≈ d_x Σ_i c_{s,i}²   (c_i = g_i/q; ‖z‖² ≈ d_x)
    η_t = min(η_max, √(max(B − W_t, 0) / ((T − t) · m̂_t)))

with m̂_t the mean of d_x Σ_i c_i² over the last ``window`` steps, step t's own included (a
ZO step knows its g_i before it updates x; m₀ fills the window's empty places, so the first
noisy g_t² do not swing the rate). At t = 0 this is η_walk; while
the gradient keeps its step-0 scale the rate stays there; it never exceeds η_max (the
advice's η_x, which may be the smaller one-step curvature rate). B = (c_w‖x₀‖)² does not
depend on T, so a run extended past its planned length keeps its budget. Once B is spent
the rate is 0: x stops, y goes on learning. Everything is a function of the logged step
coefficients, so a resumed run (``state_dict``) continues with the same rates.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Mapping, Sequence

from .errors import UsageError


class WalkBudget:
    """η_x(t) that spends the random-walk budget B evenly over the remaining steps.

    Args:
        eta_max: the largest rate ever used (the advice's η_x).
        eta_walk: the walk cap at step 0 (the advice's ``eta_x_walk``), which fixes B.
        steps: the run length T the cap was computed for (fixes B with ``eta_walk``).
        grad_rms: ḡ = √E_ξ‖∇_x f_ξ‖² at step 0 (the advice's ``grad_rms_x``).
        d_x, q: dimension of x and directions per step.
        window: steps in the running mean m̂_t of the cost per step.
        horizon: the steps the budget is spread over (default ``steps``; a run extended
            past its plan raises it, B stays).
    """

    def __init__(
        self,
        eta_max: float,
        eta_walk: float,
        steps: int,
        grad_rms: float,
        d_x: int,
        q: int = 1,
        window: int = 25,
        horizon: int | None = None,
    ) -> None:
        for name, v in (("eta_max", eta_max), ("eta_walk", eta_walk), ("grad_rms", grad_rms)):
            if not (isinstance(v, int | float) and math.isfinite(v) and v > 0):
                raise UsageError(f"{name} must be a positive finite number, got {v!r}")
        for name, v in (("steps", steps), ("d_x", d_x), ("q", q), ("window", window)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise UsageError(f"{name} must be an integer >= 1, got {v!r}")
        self.eta_max, self.d_x, self.q = float(eta_max), d_x, q
        self.horizon = steps if horizon is None else int(horizon)
        self.prior = d_x / q * float(grad_rms) ** 2  # m₀
        self.budget = float(eta_walk) ** 2 * steps * self.prior  # B
        self.spent = 0.0  # W_t
        self.costs: deque[float] = deque(maxlen=window)

    @classmethod
    def from_advice(cls, advice: Mapping, horizon: int | None = None) -> WalkBudget | None:
        """The budget of an advice record (``Advice.as_dict()``), or None when it lacks the
        walk cap's inputs (no x block, no measured ḡ, no planned length)."""
        rms = advice.get("grad_rms_x")
        if not _positive(rms):
            rms = advice.get("grad_norm_x")
        if not (_positive(advice.get("eta_x_walk")) and _positive(rms)):
            return None
        if not (_positive(advice.get("eta_x")) and int(advice.get("steps") or 0) >= 1):
            return None
        return cls(
            advice["eta_x"],
            advice["eta_x_walk"],
            int(advice["steps"]),
            rms,
            int(advice["d_x"]),
            int(advice.get("q") or 1),
            horizon=horizon,
        )

    def cost(self) -> float:
        """m̂_t: the mean squared step length per unit η² over the window (m₀ fills it)."""
        n = self.costs.maxlen or 1
        return (sum(self.costs) + (n - len(self.costs)) * self.prior) / n

    def rate(self, t: int) -> float:
        """η_x for step t (0-based) at the current m̂: the remaining budget spread over the
        remaining steps (a preview; :meth:`step` also counts the step's own gradient)."""
        left = max(self.budget - self.spent, 0.0)
        eta = math.sqrt(left / (max(self.horizon - t, 1) * self.cost()))
        return min(self.eta_max, eta)

    def step(self, t: int, terms: Sequence[tuple[int, float]]) -> float:
        """The rate of step t, whose SPSA coefficients ``terms`` ((seed, c_i) pairs) are
        known before its update: their cost joins m̂ first (one step with a 100x gradient
        cannot spend a hundred steps' budget at the old rate), then the step is charged.

        A non-finite coefficient (a nan or inf loss difference, or one whose c² overflows)
        is skipped: it is neither charged nor counted in m̂ (it made the spent walk nan for
        good, and min(η_max, nan) returned η_max at every later step; the diverging loss is
        the engine's to stop). A step with no finite coefficient adds no cost and gets the
        rate of :meth:`rate`."""
        finite = [c for _, c in terms if math.isfinite(c * c)]  # c² may overflow
        step_cost = self.d_x * sum(c * c for c in finite)
        if (terms and not finite) or not math.isfinite(step_cost):  # d_x·Σc² overflowed
            return self.rate(t)
        self.costs.append(step_cost)
        eta = self.rate(t)
        self.spent += eta * eta * step_cost
        return eta

    def state_dict(self) -> dict:
        return {"spent": self.spent, "costs": list(self.costs), "budget": self.budget}

    def load_state_dict(self, state: Mapping | None) -> None:
        if not state:
            return
        self.spent = float(state["spent"])
        self.budget = float(state.get("budget", self.budget))
        self.costs.clear()
        self.costs.extend(float(c) for c in state["costs"])


def _positive(v: object) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) and v > 0
