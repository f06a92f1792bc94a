"""Learning-rate advisor: closed forms, the curvature rule against Monte Carlo, guards."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import smoothlab
from smoothlab.advisor import advise, advise_from_rows, curvature_rate, trajectory_L
from smoothlab.errors import UsageError


def test_example_2_3_advice_is_exactly_half_inverse_curvature() -> None:
    a, b = 100.0, 1.0
    x = torch.nn.Parameter(torch.tensor([0.7], dtype=torch.float64))
    y = torch.nn.Parameter(torch.tensor([-1.3], dtype=torch.float64))
    est = smoothlab.probe(lambda: a * x.pow(2).sum() + b * y.pow(2).sum(), {"x": [x], "y": [y]})
    adv = advise(est["x"].value, est["y"].value, 1, x_gradient="exact")
    assert adv.eta_x == pytest.approx(1 / (2 * a), rel=1e-12)
    assert adv.eta_y == pytest.approx(1 / (2 * b), rel=1e-12)
    # and those rates reach the minimum in one gradient step
    with torch.no_grad():
        x -= adv.eta_x * 2 * a * x
        y -= adv.eta_y * 2 * b * y
    assert float(x) == 0.0 and float(y) == 0.0


def test_zo_formula_uses_spsa_second_moment() -> None:
    adv = advise(4.0, 0.5, 1000, q=4, c_x=2.0, c_y=3.0)
    assert adv.eta_x == pytest.approx(2.0 * 4 / (4.0 * (1000 + 1 + 4)))
    assert adv.eta_y == pytest.approx(3.0 / 0.5)
    assert adv.ratio == pytest.approx(adv.eta_y / adv.eta_x)
    big = advise(4.0, 0.5, 10**8)
    assert big.eta_x == pytest.approx(1 / (4.0 * 10**8), rel=1e-6)  # ~ c_x / (L_x d_x)
    assert "eta_x" in big.describe() and "ratio" in big.describe()


def test_spsa_second_moment_matches_the_formula() -> None:
    """E‖ĝ‖² = ((d+1)/q + 1)‖∇f‖² for the averaged Gaussian SPSA estimate (what the advisor uses)."""
    gen = torch.Generator().manual_seed(0)
    d, q, n = 30, 3, 20000
    g = torch.randn(d, generator=gen, dtype=torch.float64)
    z = torch.randn(n, q, d, generator=gen, dtype=torch.float64)
    est = ((z @ g).unsqueeze(-1) * z).mean(dim=1)  # (1/q) Σ (zᵀg) z
    m = est.pow(2).sum(-1)
    expected = ((d + 1) / q + 1) * float(g.pow(2).sum())
    assert abs(float(m.mean()) - expected) < 4 * float(m.std()) / math.sqrt(n)


def test_uncertainty_is_carried_through() -> None:
    adv = advise(2.0, 1.0, 10, L_x_stderr=0.2, L_y_stderr=0.05)
    assert adv.eta_x_stderr == pytest.approx(adv.eta_x * 0.1)
    assert adv.eta_y_stderr == pytest.approx(adv.eta_y * 0.05)


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"L_x": -1.0}, "L_x"),
        ({"L_y": float("nan")}, "L_y"),
        ({"d_x": -1}, "d_x"),
        ({"q": 0}, "q"),
        ({"x_gradient": "fo"}, "x_gradient"),
        ({"c_x": 0.0}, "c_x"),
    ],
)
def test_advise_errors(kwargs: dict, needle: str) -> None:
    args = {"L_x": 1.0, "L_y": 1.0, "d_x": 10} | kwargs
    with pytest.raises(ValueError, match=needle):
        advise(**args)


def test_d_x_zero_means_no_x_block_and_refuses_x_curvature() -> None:
    """d_x=0 with L_x (or trace / second_moment) gave eta_x nan silently; it is refused,
    naming the value. d_x=0 without them (a method with no x block) still advises eta_y."""
    with pytest.raises(
        UsageError, match=r"d_x must be a positive integer .* when L_x is given, got 0"
    ):
        advise(L_x=4.0, L_y=1.0, d_x=0)
    with pytest.raises(UsageError, match=r"when L_x/trace is given, got 0.*L_x=None, trace=None"):
        advise(L_x=4.0, L_y=1.0, d_x=0, trace=2.0)
    with pytest.raises(UsageError, match=r"when second_moment is given, got 0"):
        advise(None, 1.0, 0, second_moment=3.0)
    with pytest.raises(UsageError, match=r"when L_x is given, got 0"):
        advise(4.0, 1.0, 0, x_gradient="exact")
    no_x = advise(None, 2.0, 0, rho_x=0.0)  # what a zo probe of fo-ft passes
    assert math.isnan(no_x.eta_x) and no_x.eta_y == pytest.approx(0.5) and no_x.d_x == 0
    assert advise(4.0, 1.0, 10).eta_x > 0


def test_trajectory_quantile_and_head_block() -> None:
    vals = list(np.linspace(1, 10, 10)) + [1000.0] * 10  # late outliers are outside the first half
    L, se = trajectory_L(vals, quantile=0.9, fraction=0.5)
    assert L == pytest.approx(np.quantile(np.linspace(1, 10, 10), 0.9))
    assert se > 0
    rows = [
        {"step": s, "block": blk, "estimate": v}
        for s in range(4)
        for blk, v in (("base", 8.0), ("peft", 0.5), ("head", 2.0))
    ]
    adv = advise_from_rows(rows, 100)
    assert adv.L_x == pytest.approx(8.0) and adv.L_y == pytest.approx(2.0)  # y = adapter + head
    with pytest.raises(ValueError, match="blocks found"):
        advise_from_rows(rows, 100, x_block="nope")


# --------------------------------------------------------------------------- curvature rule
def _dense_quadratic(d: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """An indefinite-free dense H = A Aᵀ/d + diag (PSD, non-diagonal, unequal diagonal) and g."""
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(d, d // 2, generator=gen, dtype=torch.float64)
    h = a @ a.T / d + torch.diag(torch.linspace(0.1, 3.0, d, dtype=torch.float64))
    g = torch.randn(d, generator=gen, dtype=torch.float64) * torch.linspace(
        0.2, 2.0, d, dtype=torch.float64
    )
    return h, g


def _z(kind: str, shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    if kind == "rademacher":
        return torch.randint(0, 2, shape, generator=gen).to(torch.float64).mul_(2).sub_(1)
    return torch.randn(shape, generator=gen, dtype=torch.float64)


@pytest.mark.parametrize(
    ("kind", "kappa", "q"), [("gaussian", 3.0, 1), ("gaussian", 3.0, 4), ("rademacher", 1.0, 3)]
)
def test_spsa_quadratic_form_matches_the_isserlis_formula(kind: str, kappa: float, q: int) -> None:
    """E[ĝᵀHĝ] = (1/q)(‖g‖² tr H + 2 gᵀHg + (κ−3) Σ g_a² H_aa) + (1 − 1/q) gᵀHg, by Monte Carlo."""
    d, n = 12, 40000
    h, g = _dense_quadratic(d)
    gen = torch.Generator().manual_seed(1)
    z = _z(kind, (n, q, d), gen)
    ghat = ((z @ g).unsqueeze(-1) * z).mean(dim=1)
    samples = torch.einsum("ni,ij,nj->n", ghat, h, ghat)
    g2, ghg = float(g @ g), float(g @ h @ g)
    diag = float((g * g * torch.diagonal(h)).sum())
    expected = (g2 * float(torch.trace(h)) + 2 * ghg + (kappa - 3) * diag) / q + (1 - 1 / q) * ghg
    se = float(samples.std()) / math.sqrt(n)
    assert abs(float(samples.mean()) - expected) < 4 * se
    # the (κ−3) term is resolvable here: dropping it would be rejected for Rademacher z
    if kappa != 3:
        assert abs(float(samples.mean()) - (expected - (kappa - 3) * diag / q)) > 4 * se


@pytest.mark.parametrize("q", [1, 3])
def test_curvature_rate_minimises_the_expected_step_on_a_quadratic(q: int) -> None:
    """On f = ½ xᵀHx the second-order model is exact: E f(x − ηĝ) (Monte Carlo) at η* from
    ``advise`` equals f − ‖g‖²η*/2 and is lower than at η*/2 and 2η*."""
    d, n = 12, 40000
    h, g = _dense_quadratic(d, seed=2)
    x0 = torch.linalg.solve(h, g)  # so that ∇f(x0) = g
    f = lambda x: 0.5 * torch.einsum("...i,ij,...j->...", x, h, x)  # noqa: E731
    rho = float(g @ h @ g) / float(g @ g)
    lam = torch.linalg.eigvalsh(h)
    adv = advise(float(lam.max()), None, d, q=q, trace=float(torch.trace(h)), rho_x=rho)
    assert adv.rule == "curvature" and not adv.trace_floored
    assert adv.eta_x == pytest.approx(q / (float(torch.trace(h)) + (q + 1) * rho), rel=1e-12)
    gen = torch.Generator().manual_seed(3)
    z = torch.randn(n, q, d, generator=gen, dtype=torch.float64)
    ghat = ((z @ g).unsqueeze(-1) * z).mean(dim=1)
    means = {}
    for s in (0.5, 1.0, 2.0):
        vals = f(x0 - s * adv.eta_x * ghat) - f(x0)
        means[s] = (float(vals.mean()), float(vals.std()) / math.sqrt(n))
    m, se = means[1.0]
    assert abs(m - (-float(g @ g) * adv.eta_x / 2)) < 4 * se
    assert m < means[0.5][0] and m < means[2.0][0]
    assert adv.predicted_change != adv.predicted_change  # nan: no gradient norms given


def test_rules_side_by_side_floor_and_stderr() -> None:
    adv = advise(10.0, 2.0, 10**6, q=1, trace=500.0, trace_stderr=50.0, rho_x=4.0, rho_x_stderr=0.4)
    assert adv.eta_x == pytest.approx(1 / (500 + 2 * 4))
    assert adv.eta_x_paper == pytest.approx(1 / (10 * (10**6 + 2)))
    assert adv.eta_x_safe == pytest.approx(1 / (500 + 2 * 10))
    assert adv.r_x == pytest.approx(50.0)
    assert adv.eta_x_stderr == pytest.approx(adv.eta_x * math.hypot(50, 0.8) / 508)
    assert "paper" in adv.describe() and "r_x" in adv.describe()
    # a trace below L_x (or negative) is floored at L_x and flagged
    low = advise(10.0, 2.0, 100, trace=-3.0, rho_x=1.0)
    assert low.trace_floored and low.eta_x == pytest.approx(1 / (10 + 2))
    # without curvature inputs, auto falls back to the paper's rule; rule='paper' forces it
    assert advise(10.0, 2.0, 100).rule == "paper"
    assert advise(10.0, 2.0, 100, trace=500.0, rule="paper").eta_x == pytest.approx(1 / (10 * 102))
    # missing rho is bounded by L_x; Rademacher without delta adds its bound |κ−3| L_x
    assert advise(10.0, 2.0, 100, trace=500.0).eta_x == pytest.approx(1 / 520)
    assert advise(10.0, 2.0, 100, trace=500.0, rho_x=1.0, kurtosis=1.0).eta_x == pytest.approx(
        1 / (502 + 20)
    )
    # a directly measured single-direction second moment m1 replaces the trace formula
    assert advise(None, None, 100, q=2, second_moment=300.0, rho_x=5.0).eta_x == pytest.approx(
        2 / 305
    )


def test_joint_model_scales_the_pair_down_when_it_predicts_an_increase() -> None:
    kw = dict(trace=100.0, rho_x=1.0, rho_y=1.0, grad_norm_x=1.0, grad_norm_y=1.0)
    ok = advise(10.0, 1.0, 1000, cross=0.0, **kw)
    ex, ey = 1 / 102, 1.0
    expected = -ex - ey + 0.5 * ex**2 * 102 + 0.5 * ey**2 * 1.0
    assert ok.joint_scale == 1.0 and ok.predicted_change == pytest.approx(expected)
    bad = advise(10.0, 1.0, 1000, cross=60.0, **kw)  # strong coupling: Δ(1) > 0
    assert bad.predicted_change_unscaled > 0 and bad.joint_scale < 1
    assert bad.predicted_change < 0
    assert bad.eta_x == pytest.approx(ex * bad.joint_scale) and bad.eta_y == pytest.approx(
        bad.joint_scale
    )
    a, b = ex + ey, ex**2 * 102 + 2 * ex * ey * 60 + ey**2
    assert bad.joint_scale == pytest.approx(a / b) and bad.predicted_change == pytest.approx(
        -a * a / (2 * b)
    )


def test_walk_cap_closed_form_and_auto_takes_the_smaller_rate() -> None:
    from smoothlab.advisor import WALK_C, advise, walk_cap

    d, q, T, xn, g = 1_000_000, 2, 400, 300.0, 1.5
    cap = walk_cap(xn, g, T, d, q, 3.0)
    assert cap == pytest.approx(WALK_C * xn / (g * math.sqrt(T * ((d + 1) / q + 1))), rel=1e-15)
    # Rademacher z (kappa 1): E|g_hat|^2 = ((d - 1)/q + 1)|g|^2, a slightly larger cap
    assert walk_cap(xn, g, T, d, q, 1.0) > cap
    common = dict(q=q, trace=100.0, rho_x=1.0, grad_norm_x=g, weight_norm_x=xn)
    short = advise(5.0, None, d, steps=1, **common)  # one step: the curvature rate is smaller
    assert short.rule == "curvature" and short.eta_x == pytest.approx(short.eta_x_curvature)
    long = advise(5.0, None, d, steps=T, **common)  # T steps: the walk cap binds
    assert long.rule == "walk" and long.eta_x == pytest.approx(cap)
    assert math.isnan(advise(5.0, None, d, trace=10.0, q=q).eta_x_walk)  # inputs missing
    # L only (a recorded trajectory): the cap alone decides, never the paper's far smaller rate
    only_L = advise(5.0, None, d, q=q, steps=T, grad_norm_x=g, weight_norm_x=xn)
    assert only_L.rule == "walk" and only_L.eta_x == pytest.approx(cap)
    assert only_L.eta_x_paper < cap / 100 and "paper" in only_L.describe()
    with pytest.raises(ValueError, match="steps must be a positive integer"):
        advise(5.0, None, d, steps=0, **common)


def test_eta_y_is_the_sgd_descent_lemma_with_the_signal_fraction() -> None:
    from smoothlab.advisor import advise

    plain = advise(None, 2.0, 0)
    assert plain.eta_y == pytest.approx(0.5) and plain.eta_y_lemma == pytest.approx(0.5)
    noisy = advise(None, 2.0, 0, signal_y=0.25, signal_y_stderr=0.05, L_y_stderr=0.2)
    assert noisy.eta_y == pytest.approx(0.25 / 2.0) and noisy.eta_y_lemma == pytest.approx(0.5)
    # relative errors of phi and L_y in quadrature
    assert noisy.eta_y_stderr == pytest.approx(0.125 * math.hypot(0.2 / 2.0, 0.05 / 0.25))
    assert "phi_y" in noisy.formula and "paper c_y/L_y 0.5" in noisy.describe()
    for bad in (0.0, 1.5, -0.1):
        with pytest.raises(ValueError, match="signal_y must be in"):
            advise(None, 2.0, 0, signal_y=bad)


def test_signal_fraction_closed_form_and_jackknife() -> None:
    import torch

    from smoothlab.hybrid.advise import _jackknife, signal_fraction

    # g_t = G + e_t with orthogonal noise: |G|^2 = 1, E|g|^2 = 1 + 3 = 4, so phi = 1/4
    n, d = 6, 20
    eye = torch.eye(d, dtype=torch.float64)
    g = torch.stack([eye[0] + 3**0.5 * eye[1 + t] for t in range(n)])
    gram = g @ g.T
    assert signal_fraction(float(gram.sum()), float(gram.trace()), n) == pytest.approx(0.25)
    # pure noise clips at 1/n; identical gradients give 1
    noise = eye[:n] @ eye[:n].T
    assert signal_fraction(float(noise.sum()), float(noise.trace()), n) == pytest.approx(1 / n)
    same = eye[0].repeat(n, 1) @ eye[0].repeat(n, 1).T
    assert signal_fraction(float(same.sum()), float(same.trace()), n) == pytest.approx(1.0)
    # the jackknife from the Gram matrix equals explicit leave-one-out recomputation
    g = torch.randn(n, d, generator=torch.Generator().manual_seed(0), dtype=torch.float64) + 0.5
    loo = []
    for t in range(n):
        rest = torch.cat([g[:t], g[t + 1 :]])
        loo.append(
            signal_fraction(
                float(rest.sum(0).pow(2).sum()), float(rest.pow(2).sum()), n - 1, clip=False
            )
        )
    mean = sum(loo) / n
    brute = math.sqrt((n - 1) / n * sum((v - mean) ** 2 for v in loo))
    assert _jackknife(g @ g.T) == pytest.approx(brute, rel=1e-10) and brute > 0
    # pure noise: phi clips at 1/n, but its stderr still shows the estimate's spread
    assert _jackknife(noise + 0.01 * (g @ g.T)) > 0


@pytest.mark.parametrize("c_x", [1.0, 0.1])
def test_auto_rule_takes_the_smaller_of_curvature_and_walk_at_any_c_x(c_x):
    """c_x scales every rate, the walk cap included, so ``auto`` compares like with like."""
    kw = dict(
        L_x=1.0,
        L_y=1.0,
        d_x=1000,
        q=1,
        trace=1.0,
        rho_x=0.5,
        weight_norm_x=500.0,
        grad_norm_x=1.0,
        steps=100,
        c_x=c_x,
    )
    auto, curv, walk = (advise(rule=r, **kw) for r in ("auto", "curvature", "walk"))
    assert auto.eta_x == pytest.approx(min(curv.eta_x, walk.eta_x))
    assert auto.eta_x_walk == pytest.approx(walk.eta_x)
    assert auto.eta_x_curvature == pytest.approx(curv.eta_x)


def test_curvature_rate_stderr_adds_the_terms_that_stand_in_for_L_x():
    """Trace floored at L_x and ρ replaced by L_x: the denominator is (q+2)·L_x, one random
    quantity, so its stderr is (q+2)·se(L_x), and se(η)/η = se(L_x)/L_x."""
    eta, se, den, floored = curvature_rate(1.0, 1, trace=0.5, L_x_stderr=0.1)
    assert floored and den == pytest.approx(3.0)
    assert se / eta == pytest.approx(0.1)
    # a measured ρ is independent of L_x: its error adds in quadrature
    eta, se, den, _ = curvature_rate(1.0, 1, trace=0.5, rho=1.0, rho_stderr=0.1, L_x_stderr=0.1)
    assert se / eta == pytest.approx(math.hypot(0.1, 2 * 0.1) / den)


def test_describe_names_an_absent_block_instead_of_printing_nan():
    """zo-ft trains x only, fo-lora y only: the terminal lines say so, with no nan rate or
    nan ratio."""
    x_only = advise(L_x=4.0, L_y=None, d_x=1000).describe()
    assert "eta_y   : none (no L_y: no PEFT block y is trained" in x_only and "ratio" not in x_only
    y_only = advise(L_x=None, L_y=2.0, d_x=0).describe()
    assert "eta_x   : none (no base block x is trained)" in y_only and "ratio" not in y_only
    both = advise(L_x=4.0, L_y=2.0, d_x=1000).describe()
    assert "ratio   : eta_y / eta_x = 2004  (inside the paper's Table 2 range" in both


def test_describe_shows_eta_x_of_a_zo_probe_which_has_no_L_x():
    """A zo probe gives a trace and the walk inputs but no L_x; eta_x is still advised, and
    describe printed 'none (no base block x is trained)' beside a train command using it."""
    adv = advise(
        None, None, 1000, trace=5.0, rho_x=0.0, weight_norm_x=10.0, grad_rms_x=1.0, steps=100
    )
    walk = 0.125 * 10.0 / math.sqrt(100 * (1001 + 1))
    assert adv.rule == "walk" and adv.eta_x == pytest.approx(walk)
    text = adv.describe()
    assert f"eta_x   : {walk:.4g}  [rule walk]" in text and "no base block" not in text
    assert "paper" not in text.split("eta_x   :")[1]  # nan without L_x: left out, not 'nan'


def test_curvature_stderr_is_nan_when_a_term_of_the_denominator_has_none():
    """A floored trace puts L_x in the denominator; a Lanczos L_x has no stderr, and the
    variance summed to 0 ('± 0'). Every term's stderr is needed, else the stderr is nan."""
    kw = dict(L_x=4.0, L_y=1.0, d_x=1000, trace=2.0, trace_stderr=3.0, rho_x=1.0, rule="curvature")
    a = advise(**kw, rho_x_stderr=0.0)
    assert a.trace_floored and a.eta_x == pytest.approx(1 / 6) and math.isnan(a.eta_x_stderr)
    assert "eta_x   : 0.1667  [rule curvature]" in a.describe()  # no "± 0"
    exact = advise(L_x=4, L_y=1, d_x=1000, trace=20, trace_stderr=3, rho_x=1, rho_x_stderr=0.0)
    assert "rho_x = 1 (exact on the batch)" in exact.describe()  # a zero stderr, in words
    b = advise(**kw | {"L_x_stderr": 0.4}, rho_x_stderr=0.1)
    assert b.eta_x_stderr == pytest.approx(b.eta_x * math.hypot(0.4, 2 * 0.1) / 6)
    assert math.isnan(advise(**kw | {"L_x_stderr": 0.4}).eta_x_stderr)  # rho_x without one
    # kappa != 3: the measured delta's stderr enters with coefficient kappa - 3
    rad = dict(kw, trace=500.0, trace_stderr=50.0, kurtosis=1.0, delta_x=0.5, rho_x_stderr=0.2)
    c = advise(**rad, delta_x_stderr=0.1)
    assert c.eta_x == pytest.approx(1 / 501)
    assert c.eta_x_stderr == pytest.approx(c.eta_x * math.hypot(50, 0.4, 2 * 0.1) / 501)
    assert math.isnan(advise(**rad).eta_x_stderr)
    # a second moment with q = 1 needs no rho: its own stderr is the whole error
    m1 = advise(None, None, 10, second_moment=10.0, second_moment_stderr=1.0, rho_x=0.0)
    assert m1.eta_x_stderr == pytest.approx(m1.eta_x * 0.1)


@pytest.mark.parametrize("rule", ["walk", "curvature", "safe", "paper", "exact"])
def test_an_x_rule_does_not_stop_advice_for_a_method_without_x(rule: str) -> None:
    """fo-lora has no x block: an x rule was applied anyway and its missing inputs raised
    ("rule='walk' needs ..."), so eta_y was never advised."""
    adv = advise(None, 2.0, 0, rule=rule, signal_y=0.5)
    assert math.isnan(adv.eta_x) and adv.eta_y == pytest.approx(0.25)


@pytest.mark.parametrize(
    ("rule", "kwargs", "needs"),
    [
        ("safe", {"L_x": 4.0}, "tr H_xx and L_x"),  # a recorded run: L_x, no trace
        ("safe", {"trace": 5.0}, "tr H_xx and L_x"),  # a zo probe: trace, no L_x
        ("paper", {"trace": 5.0}, "L_x"),
        ("exact", {"trace": 5.0}, "L_x"),
        ("walk", {"L_x": 4.0}, "weight norm"),
        ("curvature", {"L_x": 4.0}, "tr H_xx"),
        ("auto", {}, "L_x"),  # neither curvature nor walk: the paper fallback needs L_x
    ],
)
def test_a_rule_without_its_inputs_is_refused_not_nan(rule: str, kwargs: dict, needs: str):
    """safe, paper and exact returned eta_x = nan without their inputs (advice.json got nan,
    exit 0); every rule now names what it needs, as walk and curvature did."""
    with pytest.raises(
        UsageError, match=rf"rule '{'paper' if rule == 'auto' else rule}' needs.*{needs}"
    ):
        advise(**({"L_x": None, "L_y": 1.0, "d_x": 1000} | kwargs), rule=rule)


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"weight_norm_x": -1.0}, "weight_norm_x must be a positive"),
        ({"weight_norm_x": 0.0}, "weight_norm_x must be a positive"),
        ({"weight_norm_x": math.inf}, "weight_norm_x must be a positive"),
        ({"grad_rms_x": -2.0}, "grad_rms_x must be a positive"),
        ({"kurtosis": math.inf}, "kurtosis must be a finite"),
        ({"kurtosis": math.nan}, "kurtosis must be a finite"),
        ({"kurtosis": True}, "kurtosis must be a finite"),
        ({"L_x_stderr": "a"}, "L_x_stderr must be a number >= 0 or nan"),
        ({"trace_stderr": -1.0}, "trace_stderr must be a number >= 0 or nan"),
        ({"rho_x_stderr": True}, "rho_x_stderr must be a number"),
    ],
)
def test_meaningless_inputs_are_refused(kwargs: dict, needle: str) -> None:
    """Each of these gave a number (weight_norm_x=-1: a negative eta_x; kurtosis=inf: 0.0;
    grad_rms_x=-2: a silent fall back to the paper rule) or a TypeError."""
    base = dict(L_x=4.0, L_y=1.0, d_x=1000, trace=10.0, grad_norm_x=1.0, steps=100)
    base |= {"weight_norm_x": 10.0} if "weight_norm_x" not in kwargs else {}
    with pytest.raises(UsageError, match=needle):
        advise(**(base | kwargs))


def test_numpy_integers_are_accepted_for_q_as_for_d_x_and_steps() -> None:
    a = advise(4.0, 1.0, np.int64(1000), q=np.int64(2), steps=np.int64(5))
    assert a.q == 2 and type(a.q) is int and a.eta_x == advise(4.0, 1.0, 1000, q=2).eta_x


def test_an_unresolved_trace_without_a_floor_warns():
    """A zo probe has no L_x, so its trace is not floored; at a few vectors tr H_xx = 0.94 ±
    45 gave eta_x = 1.06 (the exact probe: 0.042) without a word."""
    kw = dict(L_x=None, L_y=None, d_x=1000, trace=0.94, rho_x=0.0, rule="curvature")
    with pytest.warns(UserWarning, match=r"tr H_xx = 0.94 ± 45 is not resolved"):
        a = advise(**kw, trace_stderr=45.0)
    assert a.eta_x == pytest.approx(1 / 0.94)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        advise(**kw, trace_stderr=0.1)  # resolved: no warning
        advise(**kw | {"L_x": 4.0}, trace_stderr=45.0)  # floored at L_x: no warning
    with pytest.warns(UserWarning, match=r"m1 = 2 ± 3"):
        advise(None, None, 10, second_moment=2.0, second_moment_stderr=3.0, rho_x=0.0)
