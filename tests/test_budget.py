"""The random-walk budget (``smoothlab.budget.WalkBudget``): the rate of ``--lr-base auto``.

Closed forms: with the step-0 cost per step it holds the walk cap and spends B exactly in T
steps; when the cost per step jumps the rate drops by the square root of the jump and the
total stays within B; it never exceeds η_max; a saved state continues bit-identically.
"""

from __future__ import annotations

import math

import pytest

from smoothlab.budget import WalkBudget
from smoothlab.errors import UsageError

D, T = 1_000_000, 200


def _budget(**kw) -> WalkBudget:
    args = dict(eta_max=1.0, eta_walk=1e-3, steps=T, grad_rms=0.5, d_x=D, window=10) | kw
    return WalkBudget(**args)


def _run(b: WalkBudget, g: list[float], start: int = 0) -> list[float]:
    """Rates of steps start.. with projected gradients g (q = 1: c = g)."""
    return [b.step(t, [(t, gt)]) for t, gt in enumerate(g, start)]


def test_constant_cost_holds_the_walk_cap_and_spends_the_budget_exactly():
    b = _budget()
    assert b.budget == pytest.approx(1e-3**2 * T * D * 0.25, rel=1e-12)
    rates = _run(b, [0.5] * T)  # every step costs exactly m0 = d g^2
    assert rates == pytest.approx([1e-3] * T, rel=1e-9)
    assert b.spent == pytest.approx(b.budget, rel=1e-9)


def test_growing_gradient_lowers_the_rate_by_the_square_root_and_keeps_the_total():
    b = _budget()
    g = [0.5] * 100 + [5.0] * 100  # the cost per step rises 100x at step 100
    rates = _run(b, g)
    assert rates[99] == pytest.approx(1e-3, rel=1e-9)
    # the jumped step itself is charged at the lowered rate: it spends a tenth of what is left
    assert rates[100] == pytest.approx(1e-3 * math.sqrt(100 / (100 * 10.9)), rel=1e-9)
    # once the window holds only the new cost the rate is constant, at most what half of B
    # for 100 steps at 100 m0 allows (1e-4; the ten steps of transition spent a little more)
    assert rates[110:] == pytest.approx([rates[110]] * 90, rel=1e-9)
    assert 0.85e-4 < rates[110] <= 1e-4
    assert b.spent == pytest.approx(b.budget, rel=1e-9)
    # a constant rate at the cap would have walked sqrt(50.5) times further than planned
    fixed = sum(1e-3**2 * D * x * x for x in g)
    assert fixed / b.budget == pytest.approx(50.5)


def test_rate_never_exceeds_eta_max_and_is_zero_once_the_budget_is_spent():
    b = _budget(eta_max=4e-4)  # the curvature rate is below the walk cap
    rates = _run(b, [0.05] * 50)  # a gradient 10x smaller than at step 0
    assert max(rates) == 4e-4
    b = _budget()
    b.spent = b.budget  # everything spent
    assert b.rate(1) == 0.0 and b.step(1, [(1, 0.5)]) == 0.0


def test_state_dict_continues_identically_and_from_advice_needs_the_walk_inputs():
    g = [0.5 * (1 + 0.1 * (t % 7)) for t in range(120)]
    whole = _run(_budget(), g)
    first = _budget()
    part = _run(first, g[:70])
    again = _budget()
    again.load_state_dict(first.state_dict())
    assert part + _run(again, g[70:], start=70) == whole
    adv = dict(eta_x=1e-3, eta_x_walk=1e-3, steps=T, grad_rms_x=0.5, d_x=D, q=1)
    assert WalkBudget.from_advice(adv).budget == pytest.approx(_budget().budget)
    assert WalkBudget.from_advice(adv | {"grad_rms_x": math.nan, "grad_norm_x": 0.5}) is not None
    for missing in ("eta_x_walk", "grad_rms_x", "eta_x"):
        assert WalkBudget.from_advice(adv | {missing: math.nan}) is None
    assert WalkBudget.from_advice(adv | {"steps": 0}) is None


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(eta_walk=0.0), "eta_walk must be a positive finite number, got 0.0"),
        (dict(grad_rms=math.inf), "grad_rms must be a positive finite number"),
        (dict(steps=0), "steps must be an integer >= 1, got 0"),
        (dict(window=1.5), "window must be an integer >= 1, got 1.5"),
    ],
)
def test_bad_arguments_name_the_value(kw, match):
    with pytest.raises(UsageError, match=match):
        _budget(**kw)


@pytest.mark.parametrize("bad", [math.inf, math.nan, 1e200])
def test_a_non_finite_coefficient_is_skipped_not_charged(bad: float) -> None:
    """One inf/nan coefficient made the spent walk nan; min(eta_max, nan) is eta_max, so
    every later step ran at eta_max, and the nan was saved in the checkpoint. Now the step
    is skipped: the run continues as if it had not happened (1e200: c² overflows to inf)."""
    ref, b = _budget(eta_max=1e-3), _budget(eta_max=1e-3)
    g = [0.5, 0.7, 20.0, 0.9]
    steps = [0, 2, 3, 4]  # b also sees step 1, with the bad coefficient
    expected = [ref.step(t, [(t, gt)]) for t, gt in zip(steps, g)]
    got = [b.step(0, [(0, g[0])])]
    preview = b.rate(1)
    assert b.step(1, [(1, bad)]) == preview  # no cost, the rate the budget gives now
    got += [b.step(t, [(t, gt)]) for t, gt in zip(steps[1:], g[1:])]
    assert got == expected and expected[2] < 1e-3  # the 20x gradient still lowers the rate
    assert b.spent == ref.spent and math.isfinite(b.state_dict()["spent"])
    # a finite coefficient beside a bad one (q = 2) is charged alone
    pair, one = _budget(q=2), _budget(q=2)
    assert pair.step(0, [(0, 0.5), (1, bad)]) == one.step(0, [(0, 0.5)])
    assert pair.spent == one.spent
