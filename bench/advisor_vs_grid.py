"""The advisor against learning-rate grids (issue 8, "Proof").

Seeded split of SST-2 (train 1000 / eval 1000 / dev 100, ``--data-seed``), MiniLM, CPU,
batch 16, ``--steps`` (300) steps, ``--seeds`` (0,1,2). Grids (fixed; half-decade steps):

* zo-ft:       lr_base in 1e-6 .. 1e-2 (9 cells, 4 decades)
* fo-lora:     lr_peft in 1e-3 .. 10   (9 cells, 4 decades)
* hybrid-lora: lr_base in {1e-6, 1e-4, 1e-2} x lr_peft in {1e-2, 1e-1, 1} (coarse 2-D)

The grids were fixed before any advisor result was seen: 1e-7 moves nothing in 300 steps and
1e-1 diverges within 3 steps (a 30-step smoke run), so the zo-ft grid spans the four decades
between, at the 2-core CPU budget of 3 seeds x 300 steps per cell.

Phases (run in this order; each is resumable):

    python bench/advisor_vs_grid.py --phase grid   [--methods zo-ft,fo-lora] [--seeds 0,1,2]
    python bench/advisor_vs_grid.py --phase advise [--methods ...]  # probe at init, no pilots
    python bench/advisor_vs_grid.py --phase advised  # train at each seed's advised rates
    python bench/advisor_vs_grid.py --phase auto     # train --lr-base auto --lr-peft auto
    python bench/advisor_vs_grid.py --phase report  # table + figure -> bench/out/advisor_vs_grid.*

``grid`` caches each (method, lr_base, lr_peft, seed) cell as one JSON under ``--out``/grid and
skips cells already done; a run whose loss becomes non-finite is recorded as diverged.
``advise`` writes ``--out``/advise/<method>_s<seed>.json: the advice (curvature rule and the
paper's c/(L d) beside it) and the measured curvature. ``report`` ranks, per method, the cells
by mean final train loss (mean over the last 10% of steps, averaged over seeds) and says how
far the advised rates are from the grid-best.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DATA = ROOT.parent / "shared" / "data" / "sst2" / "train.tsv"
HALF = [10 ** (k / 2) for k in range(-12, -3)]  # 1e-6 .. 1e-2
GRIDS = {
    "zo-ft": [(b, 0.0) for b in HALF],
    "fo-lora": [(0.0, 10 ** (k / 2)) for k in range(-6, 3)],  # 1e-3 .. 10
    "hybrid-lora": [(b, p) for b in (1e-6, 1e-4, 1e-2) for p in (1e-2, 1e-1, 1.0)],
}

SETTINGS = {"steps": 300, "data_seed": 8, "eval_examples": 500}  # the benchmark's defaults


def grid_settings(**override: object) -> argparse.Namespace:
    """The benchmark's run settings (what :func:`_cfg` and :func:`run_cell` read) with its
    defaults, for scripts that train or probe cells off the grid."""
    return argparse.Namespace(**{"data": DATA, **SETTINGS, **override})


def _cfg(
    args: argparse.Namespace, method: str, lr_base: float, lr_peft: float, seed: int, out: Path
):
    from smoothlab.hybrid.train import TrainConfig

    return TrainConfig(
        method=method,
        data=str(args.data),
        task="sst2",
        steps=args.steps,
        batch_size=16,
        lr_base=lr_base,
        lr_peft=lr_peft,
        seed=seed,
        data_seed=args.data_seed,
        train_size=1000,
        eval_size=1000,
        dev_size=100,
        eval_every=args.steps,
        eval_examples=args.eval_examples,
        out=str(out),
        name=out.name,
    )


def cell_path(
    out: Path, method: str, lr_base: float, lr_peft: float, seed: int, steps: int
) -> Path:
    return out / f"grid_{steps}steps" / f"{method}_b{lr_base:.3g}_p{lr_peft:.3g}_s{seed}.json"


def run_cell(
    args: argparse.Namespace,
    method: str,
    lr_base: float | str,
    lr_peft: float | str,
    seed: int,
    path: Path | None = None,
) -> dict:
    """Train one cell (or read its cached result at ``path``, by default its grid file).
    Rates may be ``"auto"``: the run probes at step 0 (``train --lr-base auto``)."""
    import csv
    import shutil

    from smoothlab.hybrid.train import train
    from smoothlab.runlog import final_loss

    path = path or cell_path(args.out, method, lr_base, lr_peft, seed, args.steps)
    if path.exists():
        return json.loads(path.read_text())
    run_dir = args.out / "runs" / path.stem
    shutil.rmtree(run_dir, ignore_errors=True)
    t0 = time.perf_counter()
    res = {
        "method": method,
        "lr_base": lr_base,
        "lr_peft": lr_peft,
        "seed": seed,
        "steps": args.steps,
        "diverged": False,
        "final_loss": math.nan,
        "eval_acc": math.nan,
        "dev_acc": math.nan,
    }
    try:
        train(_cfg(args, method, lr_base, lr_peft, seed, run_dir), progress=False, resume=False)
    except FloatingPointError as e:
        res.update(diverged=True, error=str(e))
    with (run_dir / "metrics.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    losses = [float(r["loss"]) for r in rows]
    res["losses"] = losses
    res["lr_base_used"] = [float(r["lr_base"]) for r in rows]
    res["lr_peft_used"] = sorted({float(r["lr_peft"]) for r in rows})
    res["advice"] = json.loads((run_dir / "config.json").read_text()).get("advice")
    if not res["diverged"]:
        evals = [r for r in rows if r.get("eval_acc")]
        res.update(
            final_loss=final_loss(losses),
            eval_acc=float(evals[-1]["eval_acc"]),
            dev_acc=float(evals[-1]["dev_acc"]),
        )
    res["seconds"] = time.perf_counter() - t0
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(res, indent=1))
    shutil.rmtree(run_dir, ignore_errors=True)  # keep results, not run folders
    return res


def phase_grid(args: argparse.Namespace) -> None:
    cells = GRIDS if args.cells is None else None
    for method in args.methods:
        grid = GRIDS[method] if cells is not None else [c for c in GRIDS[method] if c in args.cells]
        for seed in args.seeds:
            for lr_base, lr_peft in grid:
                r = run_cell(args, method, lr_base, lr_peft, seed)
                print(
                    f"{method:<12} b={lr_base:<8.3g} p={lr_peft:<8.3g} s={seed} loss={r['final_loss']:.4f} "
                    f"eval={r['eval_acc']:.3f} {'DIVERGED ' if r['diverged'] else ''}{r.get('seconds', 0):.0f}s",
                    flush=True,
                )


def phase_advise(args: argparse.Namespace) -> None:
    from smoothlab.hybrid.advise import advise_config, ratio_line, train_command

    for method in args.methods:
        for seed in args.seeds:
            path = args.out / "advise" / f"{method}_s{seed}.json"
            if path.exists() and not args.force:
                continue
            cfg = _cfg(args, method, 0.0, 0.0, seed, args.out / "runs" / "advised")
            t0 = time.perf_counter()
            adv, curv = advise_config(
                cfg,
                hvp=args.hvp,
                vectors=args.vectors,
                second_moment_samples=args.second_moment_samples,
            )
            print(
                f"[{method} seed {seed}] {time.perf_counter() - t0:.0f} s\n{adv.describe()}\n{ratio_line(adv)}\n"
                f"{train_command(adv, cfg)}\n",
                flush=True,
            )
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(
                json.dumps(
                    {
                        "advice": adv.as_dict(),
                        "curvature": curv.as_dict(),
                        "seconds": time.perf_counter() - t0,
                    },
                    indent=1,
                    default=str,
                )
            )


def phase_advised(args: argparse.Namespace) -> None:
    """Train each method at its own advised rates (seed by seed): the advised cell is then
    ranked among the grid cells by the same measure, instead of by its nearest neighbour."""
    for method in args.methods:
        for seed in args.seeds:
            path = args.out / "advise" / f"{method}_s{seed}.json"
            if not path.exists():
                print(f"[{method} seed {seed}] no advice yet (run --phase advise)")
                continue
            adv = json.loads(path.read_text())["advice"]
            b = adv["eta_x"] if math.isfinite(adv["eta_x"]) else 0.0
            p = adv["eta_y"] if math.isfinite(adv["eta_y"]) else 0.0
            r = run_cell(args, method, float(f"{b:.3g}"), float(f"{p:.3g}"), seed)
            print(
                f"{method:<12} advised b={b:.3g} p={p:.3g} s={seed} loss={r['final_loss']:.4f} "
                f"eval={r['eval_acc']:.3f} {'DIVERGED' if r['diverged'] else ''}",
                flush=True,
            )


def phase_auto(args: argparse.Namespace) -> None:
    """Train each method as a user would with ``train --lr-base auto --lr-peft auto``: the
    step-0 probe sets the rates and the walk budget lowers lr_base as the gradient grows."""
    for method in args.methods:
        for seed in args.seeds:
            path = args.out / f"auto_{args.steps}steps" / f"{method}_s{seed}.json"
            r = run_cell(args, method, "auto", "auto", seed, path=path)
            used = r["lr_base_used"]
            print(
                f"{method:<12} auto s={seed} lr_base {used[0]:.3g} -> {used[-1]:.3g} "
                f"lr_peft {r['lr_peft_used']} loss={r['final_loss']:.4f} eval={r['eval_acc']:.3f} "
                f"{'DIVERGED' if r['diverged'] else ''}",
                flush=True,
            )


def _auto_lines(method: str, grid: list[dict], autos: list[dict]) -> list[str]:
    """Each seed's ``--lr-base auto --lr-peft auto`` run ranked among its grid cells."""
    loss = lambda c: math.inf if c["diverged"] else c["final_loss"]  # noqa: E731
    lines = []
    for a in sorted((a for a in autos if a["method"] == method), key=lambda a: a["seed"]):
        same = [c for c in grid if c["method"] == method and c["seed"] == a["seed"]]
        rank = sorted(same + [a], key=loss).index(a) + 1
        used = a["lr_base_used"]
        lb = f"lr_base {used[0]:.3g} -> {used[-1]:.3g} (min {min(used):.3g})" if any(used) else ""
        lines.append(
            f"  seed {a['seed']}: auto {lb} lr_peft {a['lr_peft_used'][0]:.3g}: final loss "
            f"{loss(a):.4f} eval {a['eval_acc']:.3f} -> rank {rank}/{len(same) + 1} among this "
            f"seed's {len(same)} grid cells"
        )
    return lines


def _load(out: Path, sub: str) -> list[dict]:
    """Every JSON under ``out/sub``, each with its file's stem as ``_name``."""
    if not (out / sub).exists():
        return []
    return [
        json.loads(p.read_text()) | {"_name": p.stem} for p in sorted((out / sub).glob("*.json"))
    ]


def _aggregate(cells: list[dict], method: str) -> dict[tuple[float, float], dict]:
    agg: dict[tuple[float, float], dict] = {}
    for c in cells:
        if c["method"] != method:
            continue
        a = agg.setdefault((c["lr_base"], c["lr_peft"]), {"loss": [], "acc": [], "diverged": 0})
        a["loss"].append(math.inf if c["diverged"] else c["final_loss"])
        a["acc"].append(c["eval_acc"])
        a["diverged"] += bool(c["diverged"])
    for a in agg.values():
        a["mean_loss"] = sum(a["loss"]) / len(a["loss"])
        finite = [v for v in a["acc"] if math.isfinite(v)]
        a["mean_acc"] = sum(finite) / len(finite) if finite else math.nan
    return agg


def _advised(advice: list[dict], method: str) -> dict[str, float]:
    """Geometric means over seeds of the advised rates (both rules)."""
    rows = [a["advice"] for a in advice if a["advice"]["source"].startswith(method + ":")]

    def gm(k: str) -> float:
        vals = [r.get(k, math.nan) for r in rows]
        if not vals or not all(math.isfinite(v) and v > 0 for v in vals):
            return math.nan
        return math.exp(sum(math.log(v) for v in vals) / len(vals))

    return {
        "eta_x": gm("eta_x"),
        "eta_y": gm("eta_y"),
        "eta_x_paper": gm("eta_x_paper"),
        "eta_y_lemma": gm("eta_y_lemma"),
        "n": len(rows),
        "trace_x": gm("trace_x") if rows and all(r["trace_x"] > 0 for r in rows) else math.nan,
        "L_x": gm("L_x"),
        "L_y": gm("L_y"),
        "d_x": rows[0]["d_x"] if rows else 0,
    }


def _summary_lines(method: str, agg: dict, adv: dict) -> list[str]:
    key = 1 if method == "fo-lora" else 0
    name = "eta_y" if key else "eta_x"
    lines = [
        f"\n[{method}] cells ranked by mean final train loss ({'lr_peft' if key else 'lr_base'}"
        + (", lr_peft" if method == "hybrid-lora" else "")
        + ")"
    ]
    ranked = sorted(agg.items(), key=lambda kv: kv[1]["mean_loss"])
    for i, ((b, p), a) in enumerate(ranked, 1):
        lines.append(
            f"  {i:>2}. lr_base={b:<8.3g} lr_peft={p:<8.3g} loss={a['mean_loss']:.4f} "
            f"eval_acc={a['mean_acc']:.3f} seeds={len(a['loss'])} diverged={a['diverged']}"
        )
    if not ranked:
        return lines + ["  (no grid cells yet)"]
    best = ranked[0][0][key]
    for rule, k, k_y in (
        ("default (x: min of curvature and walk cap; y: phi_y/L_y)", name, "eta_y"),
        ("paper (x: c/(L d); y: c/L)", "eta_y_lemma" if key else "eta_x_paper", "eta_y_lemma"),
    ):
        eta = adv.get(k, math.nan)
        if not math.isfinite(eta):
            lines.append(f"  advised {name} [{rule}]: n/a")
            continue
        factor = max(eta / best, best / eta) if best > 0 else math.inf
        near = min(
            agg,
            key=lambda c: (
                abs(math.log(max(c[key], 1e-30) / eta))
                + (
                    abs(math.log(max(c[1], 1e-30) / adv[k_y]))
                    if method == "hybrid-lora" and math.isfinite(adv.get(k_y, math.nan))
                    else 0
                )
            ),
        )
        rank = [c for c, _ in ranked].index(near) + 1
        lines.append(
            f"  advised {name} [{rule}] = {eta:.3g}; grid-best {best:.3g}; factor {factor:.3g} "
            f"({'within' if factor <= 3 else 'NOT within'} x3); nearest cell ranks {rank}/{len(ranked)}"
        )
    return lines


def phase_report(args: argparse.Namespace) -> None:
    cells, advice = _load(args.out, f"grid_{args.steps}steps"), _load(args.out, "advise")
    lines = [
        f"advisor vs grid: SST-2 ({args.data.name}, data seed {args.data_seed}), MiniLM, CPU, batch 16; "
        f"{args.steps} steps; {len(cells)} grid runs, {len(advice)} advice probes",
        "advice: probe of the step-0 batch at initialisation, no pilots",
    ]
    for a in advice:
        d, c = a["advice"], a["curvature"]
        lines.append(
            f"  {d['source'].split(':')[0]:<12} eta_x={d['eta_x']:.3g} (paper {d['eta_x_paper']:.3g}) "
            f"eta_y={d['eta_y']:.3g} (c/L {d.get('eta_y_lemma', math.nan):.3g}, "
            f"phi_y {d.get('signal_y', math.nan):.3g}±{d.get('signal_y_stderr', math.nan):.2g}) tr H_xx={d['trace_x']:.4g}±{d['trace_x_stderr']:.2g} "
            f"L_x={d['L_x']:.4g} r_x={d['r_x']:.3g} d_x={d['d_x']:,} rho_x={d['rho_x']:.3g} "
            f"L_y={d['L_y']:.4g} rho_y={d['rho_y']:.3g} m1={c['second_moment_x']:.4g}"
            f"±{c['second_moment_x_stderr']:.2g} scale={d['joint_scale']:.3g}"
        )
    methods = [m for m in GRIDS if m in args.methods]
    advised_cells = _advised_cells(cells, advice)
    grid_cells = [c for c in cells if id(c) not in {id(a) for a, _ in advised_cells}]
    autos = _load(args.out, f"auto_{args.steps}steps")
    for m in methods:
        lines += _summary_lines(m, _aggregate(grid_cells, m), _advised(advice, m))
        lines += _per_seed_lines(
            m, grid_cells, [(a, r) for a, r in advised_cells if a["method"] == m]
        )
        auto = _auto_lines(m, grid_cells, autos)
        if auto:
            lines += ["  train --lr-base auto --lr-peft auto (step-0 probe, walk budget):", *auto]
    text = "\n".join(lines) + "\n"
    print(text)
    args.report.parent.mkdir(parents=True, exist_ok=True)
    args.report.write_text(text)
    _figure(grid_cells, advice, methods, args.report.with_suffix(".png"), autos)


def _advised_cells(cells: list[dict], advice: list[dict]) -> list[tuple[dict, dict]]:
    """(cell, advice) for the cells trained at a seed's own advised rates (--phase advised)."""
    out = []
    for a in advice:
        d = a["advice"]
        method, seed = d["source"].split(":")[0], int(a["_name"].rsplit("_s", 1)[1])
        b = float(f"{d['eta_x']:.3g}") if math.isfinite(d["eta_x"]) else 0.0
        p = float(f"{d['eta_y']:.3g}") if math.isfinite(d["eta_y"]) else 0.0
        for c in cells:
            if (c["method"], c["seed"], c["lr_base"], c["lr_peft"]) == (method, seed, b, p):
                out.append((c, d))
    return out


def _per_seed_lines(method: str, grid: list[dict], advised: list[tuple[dict, dict]]) -> list[str]:
    """Each seed's advised run ranked among that seed's grid cells by final train loss."""
    lines = []
    for cell, d in sorted(advised, key=lambda t: t[0]["seed"]):
        same = [c for c in grid if c["method"] == method and c["seed"] == cell["seed"]]
        loss = lambda c: math.inf if c["diverged"] else c["final_loss"]  # noqa: E731
        ranked = sorted(same + [cell], key=loss)
        best = min(same, key=loss) if same else None
        lines.append(
            f"  seed {cell['seed']}: advised lr_base={cell['lr_base']:.3g} lr_peft={cell['lr_peft']:.3g} "
            f"[rule {d['rule']}] final loss {loss(cell):.4f} eval {cell['eval_acc']:.3f} -> rank "
            f"{ranked.index(cell) + 1}/{len(ranked)} among this seed's {len(same)} grid cells"
            + (
                f"; grid-best lr_base={best['lr_base']:.3g} lr_peft={best['lr_peft']:.3g} "
                f"loss {loss(best):.4f}"
                if best
                else ""
            )
        )
    return lines


def _figure(
    cells: list[dict], advice: list[dict], methods: list[str], path: Path, autos: list[dict]
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    walks = [a for a in autos if any(a.get("lr_base_used", []))]
    n = len(methods) + bool(walks)
    fig, axes = plt.subplots(1, n, figsize=(4.5 * n, 3.6), squeeze=False)
    if walks:  # the walk budget's lr_base along each --lr-base auto run
        ax = axes[0][-1]
        for a in sorted(walks, key=lambda a: (a["method"], a["seed"])):
            lrs = a["lr_base_used"]
            ax.plot(range(1, len(lrs) + 1), lrs, lw=1, label=f"{a['method']} seed {a['seed']}")
        ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_ylabel("lr_base (eta_x) used")
        ax.set_title("--lr-base auto: the walk budget")
        ax.legend(fontsize=7)
    for ax, m in zip(axes[0], methods):
        agg, adv = _aggregate(cells, m), _advised(advice, m)
        key = 1 if m == "fo-lora" else 0
        groups = sorted({c[1 - key] for c in agg}) if m == "hybrid-lora" else [None]
        for g in groups:
            pts = sorted(
                (c[key], a["mean_loss"]) for c, a in agg.items() if g is None or c[1 - key] == g
            )
            xs = [x for x, _ in pts]
            ys = [y if math.isfinite(y) else float("nan") for _, y in pts]
            ax.plot(xs, ys, "o-", label=None if g is None else f"lr_peft={g:g}")
            ax.plot(
                [x for x, y in pts if not math.isfinite(y)],
                [1.0] * sum(not math.isfinite(y) for _, y in pts),
                "rx",
            )
        name = "eta_y" if key else "eta_x"
        for k, style, lab in (
            (name, "-", "advised (auto)"),
            ("eta_x_paper", ":", "paper c/(L d)"),
        ):
            if key and k == "eta_x_paper":
                continue
            if math.isfinite(adv.get(k, math.nan)):
                ax.axvline(adv[k], color="k", ls=style, label=f"{lab} {adv[k]:.2g}")
        ax.set_xscale("log")
        ax.set_yscale("log")  # exploded cells reach 1e3 while the rest differ in the 3rd digit
        ax.set_xlabel("lr_peft (eta_y)" if key else "lr_base (eta_x)")
        ax.set_ylabel("final train loss (mean over seeds)")
        ax.set_title(m)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--phase", choices=("grid", "advise", "advised", "auto", "report"), required=True
    )
    ap.add_argument("--methods", default=",".join(GRIDS))
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--steps", type=int, default=SETTINGS["steps"])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--data", type=Path, default=DATA)
    ap.add_argument("--data-seed", type=int, default=SETTINGS["data_seed"])
    ap.add_argument("--eval-examples", type=int, default=SETTINGS["eval_examples"])
    ap.add_argument(
        "--cells", default=None, help="grid phase only: 'lr_base:lr_peft,...' subset of the grid"
    )
    ap.add_argument("--hvp", default="fd", help="advise phase: fd, exact or zo")
    ap.add_argument(
        "--vectors",
        type=int,
        default=10,
        help="advise phase: Hutchinson vectors / Lanczos iterations",
    )
    ap.add_argument("--second-moment-samples", type=int, default=10)
    ap.add_argument("--force", action="store_true", help="advise phase: redo cached probes")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "out" / "advisor_vs_grid")
    ap.add_argument("--report", type=Path, default=ROOT / "bench" / "out" / "advisor_vs_grid.txt")
    args = ap.parse_args()
    args.methods = args.methods.split(",")
    bad = [m for m in args.methods if m not in GRIDS]
    if bad:
        ap.error(f"unknown methods {bad}; accepted: {', '.join(GRIDS)}")
    args.seeds = [int(s) for s in args.seeds.split(",")]
    args.cells = (
        None
        if args.cells is None
        else [tuple(float(v) for v in c.split(":")) for c in args.cells.split(",")]
    )
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TQDM_DISABLE", "1")
    import torch

    torch.set_num_threads(args.threads)
    phases = {"grid": phase_grid, "advise": phase_advise, "advised": phase_advised}
    phases |= {"auto": phase_auto, "report": phase_report}
    phases[args.phase](args)


if __name__ == "__main__":
    main()
