"""bench_lds.py's independent runs: the seeds of run 2 and the spread between two runs.

Run 2 asks the same question as run 1 (the same training pool, held-out digits, calibration
digits, recipe, λ rule and declared primary comparison) with every seed that decides the
result changed, in its own cache and its own results files, so run 1's are never touched.
The spread compares the two runs' lds.json row by row.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from gradindex.eval.lds import spearman_rows

RUN_SEEDS = {
    1: {},  # the seeds in bench_lds.CONFIG
    2: {
        "subset_seed_base": 2000,  # subsets drawn by seeds 2000..2019 (run 1: 1000..1019)
        "subset_train_seeds": [3, 4, 5],  # run 1: [0, 1, 2]
        "train_seed": 1,  # the full model's init / batch order (run 1: 0)
        "generation_seed": 8,  # the generated targets' sampler (run 1: 7)
        "measure_seed": 124,  # the measured outputs' noise draws (run 1: 123)
        "proj_seed": 1,  # the index's random projection (run 1: 0)
        "feature_seed": 1,  # the index's (t, ε) draws (run 1: 0)
        "factor_seed": 1,  # the EK-FAC factors' sampled targets (run 1: 0)
        "random_seed": 1,  # the 'random' row (run 1: 0)
    },
}
SPREAD_STEM = "lds_spread"


def run_cache(cache: Path, run: int) -> Path:
    """Run 1: ``cache``; run r > 1: ``$GRADINDEX_LDS_CACHE_RUN<r>`` or ``<cache>-run<r>``."""
    if run == 1:
        return cache
    env = os.environ.get(f"GRADINDEX_LDS_CACHE_RUN{run}")
    return Path(env) if env else cache.with_name(f"{cache.name}-run{run}")


def results_stem(run: int) -> str:
    """Results file stem: run 1 writes lds.json / lds.md, run r writes lds_run<r>.*."""
    return "lds" if run == 1 else f"lds_run{run}"


def run_config(config: dict, run: int) -> dict:
    """``config`` with run ``run``'s seeds (refused for a run that has none declared)."""
    if run not in RUN_SEEDS:
        raise SystemExit(f"--run {run}: runs {sorted(RUN_SEEDS)} are declared in lds_runs.py")
    return config | RUN_SEEDS[run]


def run_lines(r: dict) -> list[str]:
    """lds.md's note on which run this is and where the spread between runs is."""
    run = int(r.get("run", 1))
    pointer = f"The spread between runs: {SPREAD_STEM}.md (`python benchmarks/lds_runs.py`)."
    if run == 1:
        return [f"Run 1 of the recipe (seeds in `config`). {pointer}", ""]
    seeds = ", ".join(f"{k} {r['config'][k]}" for k in RUN_SEEDS[run])
    return [
        f"**Independent run {run}** of the same recipe, training pool, held-out, calibration "
        f"digits and declared comparison, with every seed changed ({seeds}); run 1 is lds.md. "
        + pointer,
        "",
    ]


# -- the spread between two runs ------------------------------------------------------------

GROUPS = ("all", "heldout", "generated")
PRIMARY_GROUPS = ("held_out", "generated")


def _pair(a: float, b: float) -> dict:
    return {"run1": a, "run2": b, "abs_diff": abs(a - b)}


def row_spread(row1: dict, row2: dict, vs1: dict | None, vs2: dict | None) -> dict:
    """One method's LDS in both runs per target group, and its paired difference against the
    reference in each run (``vs``: that run's ``paired_vs_dtrak`` entry; None for the
    reference itself)."""
    out = {g: _pair(row1[g]["mean"], row2[g]["mean"]) for g in GROUPS}
    for g in GROUPS:
        out[g]["ci_run1"] = [row1[g]["ci_low"], row1[g]["ci_high"]]
        out[g]["ci_run2"] = [row2[g]["ci_low"], row2[g]["ci_high"]]
    if vs1 is not None and vs2 is not None:
        out["vs_reference"] = _pair(vs1["mean"], vs2["mean"]) | {
            "ci_run1": [vs1["ci_low"], vs1["ci_high"]],
            "ci_run2": [vs2["ci_low"], vs2["ci_high"]],
            "same_sign": bool(np.sign(vs1["mean"]) == np.sign(vs2["mean"])),
        }
    return out


def block_spread(b1: dict, b2: dict, reference: str) -> dict:
    """The spread of one K block (``by_K[name]``) present in both runs: every method row in
    both, paired by name, and the rows only one run has."""
    rows = {}
    for name in sorted(set(b1["methods"]) & set(b2["methods"])):
        key = f"{name} − {reference}"
        vs1, vs2 = b1["paired_vs_dtrak"].get(key), b2["paired_vs_dtrak"].get(key)
        rows[name] = row_spread(b1["methods"][name], b2["methods"][name], vs1, vs2)
    diffs = np.array([r["all"]["abs_diff"] for r in rows.values()])
    paired = np.array([r["vs_reference"]["abs_diff"] for r in rows.values() if "vs_reference" in r])
    half = np.array(
        [
            (c[1] - c[0]) / 2
            for r in rows.values()
            for c in (r["all"]["ci_run1"], r["all"]["ci_run2"])
        ]
    )  # within-run 95% interval over targets, to set the between-run |Δ| against
    lds1 = np.array([[r["all"]["run1"] for r in rows.values()]])
    lds2 = np.array([[r["all"]["run2"] for r in rows.values()]])
    summary = {
        "rows": len(rows),
        "median_abs_diff_all": float(np.median(diffs)) if len(diffs) else None,
        "max_abs_diff_all": float(diffs.max()) if len(diffs) else None,
        "median_abs_diff_vs_reference": float(np.median(paired)) if len(paired) else None,
        "max_abs_diff_vs_reference": float(paired.max()) if len(paired) else None,
        "median_ci_halfwidth_all": float(np.median(half)) if len(half) else None,
        "run2_inside_run1_ci_all": sum(
            r["all"]["ci_run1"][0] <= r["all"]["run2"] <= r["all"]["ci_run1"][1]
            for r in rows.values()
        ),
        "vs_reference_same_sign": sum(
            r["vs_reference"]["same_sign"] for r in rows.values() if "vs_reference" in r
        ),
        "rank_spearman_over_rows": float(spearman_rows(lds1, lds2)[0]) if len(rows) > 2 else None,
    }
    block = {"rows": rows}
    return {
        "rows": rows,
        "goal": goal_rows(block),
        "summary": summary,
        "only_in_run1": sorted(set(b1["methods"]) - set(b2["methods"])),
        "only_in_run2": sorted(set(b2["methods"]) - set(b1["methods"])),
    }


GOAL = 0.03
"""Issue 26's bar: a method ≥ the reference + GOAL LDS, its paired 95% interval above zero."""
TRIED = (
    "λ of the kernels: the library's rule, its one scale chosen once on calibration digits "
    "(scales 0.3-30 swept when the rule was set), never on the targets",
    "EK-FAC influence damping 0.1 (default) and 10 (best of 0.1-10^4 on calibration digits)",
    "Adam preconditioning (TrackStar) of every row, including D-TRAK's",
    "the 'square' (D-TRAK) and 'mse' losses for every method",
    "K = 100 timesteps for D-TRAK, retrak, TRAK, influence (run 1 only)",
    "a second independent run with every seed changed (this file)",
)
"""What the benchmark has measured in search of the goal (each figure in lds.md / lds_run2.md)."""


def goal_rows(block: dict) -> list[dict]:
    """Per row with a paired difference against the reference, in each run: how far it falls
    short of the reference + GOAL, and whether it meets the goal (≥ GOAL, interval above 0);
    the nearest rows first."""
    out = []
    for method, r in block["rows"].items():
        v = r.get("vs_reference")
        if v is None:
            continue
        runs = {
            run: {
                "diff": v[run],
                "short_by": max(0.0, GOAL - v[run]),
                "met": bool(v[run] >= GOAL and v[f"ci_{run}"][0] > 0),
            }
            for run in ("run1", "run2")
        }
        out.append({"method": method, **runs})
    return sorted(out, key=lambda x: (x["run1"]["short_by"] + x["run2"]["short_by"], x["method"]))


def goal_lines(rows: list[dict], reference: str) -> list[str]:
    """lds_spread.md's section on the goal: every row's shortfall in both runs, what was tried."""
    lines = [
        f"### How far each row is from the goal ({reference} + {GOAL}, interval above 0)",
        "",
        "| method | − ref run 1 | short by | − ref run 2 | short by | met (run 1 / 2) |",
        "|---|---|---|---|---|---|",
    ]
    for g in rows:
        a, b = g["run1"], g["run2"]
        lines.append(
            f"| {g['method']} | {a['diff']:+.3f} | {a['short_by']:.3f} | {b['diff']:+.3f} "
            f"| {b['short_by']:.3f} | {'yes' if a['met'] else 'no'} / "
            f"{'yes' if b['met'] else 'no'} |"
        )
    met = [g["method"] for g in rows if g["run1"]["met"] and g["run2"]["met"]]
    lines += [
        "",
        f"Rows meeting the goal in both runs: {', '.join(met) if met else 'none'}. Tried:",
        "",
        *[f"- {t}" for t in TRIED],
        "",
    ]
    return lines


def primary_spread(p1: dict, p2: dict) -> dict:
    """The declared primary comparison in each run, per target group; refused when the two
    runs declared different comparisons."""
    same = ("method", "reference", "K")
    if any(p1.get(k) != p2.get(k) for k in same):
        raise SystemExit(
            f"the runs' primary comparisons differ: {[p1.get(k) for k in same]} vs "
            f"{[p2.get(k) for k in same]}"
        )
    out = {k: p1[k] for k in same}
    for g in PRIMARY_GROUPS:
        if g in p1 and g in p2:
            out[g] = _pair(p1[g]["diff"], p2[g]["diff"]) | {
                "ci_run1": p1[g]["ci"],
                "ci_run2": p2[g]["ci"],
                "met_run1": p1[g]["met"],
                "met_run2": p2[g]["met"],
            }
    return out


def spread(r1: dict, r2: dict, reference: str) -> dict:
    """The spread between two runs' lds.json: every K block and method row present in both,
    the primary comparison and the seed-noise ceiling of each."""
    out = {"reference": reference, "by_K": {}}
    for name in sorted(set(r1["by_K"]) & set(r2["by_K"])):
        out["by_K"][name] = block_spread(r1["by_K"][name], r2["by_K"][name], reference)
    out["K_only_in_run1"] = sorted(set(r1["by_K"]) - set(r2["by_K"]))
    out["K_only_in_run2"] = sorted(set(r2["by_K"]) - set(r1["by_K"]))
    if "primary" in r1 and "primary" in r2:
        out["primary"] = primary_spread(r1["primary"], r2["primary"])
    out["ceiling"] = {g: _pair(r1["ceiling"][g]["mean"], r2["ceiling"][g]["mean"]) for g in GROUPS}
    out["runs"] = {
        "run1": {"subset_seeds": r1.get("subset_seeds"), "num_subsets": r1.get("num_subsets")},
        "run2": {"subset_seeds": r2.get("subset_seeds"), "num_subsets": r2.get("num_subsets")},
    }
    return out


def _ci(ci: list[float]) -> str:
    return f"[{ci[0]:+.3f}, {ci[1]:+.3f}]"


def spread_markdown(s: dict, files: tuple[str, str]) -> str:
    """lds_spread.md: the two runs side by side."""
    lines = [
        "# LDS benchmark: the spread between two independent runs",
        "",
        f"Run 1: {files[0]}; run 2: {files[1]} (the same recipe, training pool, held-out and "
        "calibration digits and declared comparison; every seed changed: lds_runs.RUN_SEEDS). "
        "Rows are paired by name; '− ref' is each run's paired difference against "
        f"{s['reference']} over its own targets (95% bootstrap interval).",
        "",
    ]
    p = s.get("primary")
    if p:
        lines += [f"**Primary comparison** ({p['method']} − {p['reference']}, {p['K']}):", ""]
        for g in PRIMARY_GROUPS:
            if g in p:
                d = p[g]
                lines.append(
                    f"- {g}: run 1 {d['run1']:+.3f} {_ci(d['ci_run1'])}, run 2 {d['run2']:+.3f} "
                    f"{_ci(d['ci_run2'])}; |Δ| {d['abs_diff']:.3f}; goal met: "
                    f"{'yes' if d['met_run1'] else 'no'} / {'yes' if d['met_run2'] else 'no'}"
                )
        lines.append("")
    c = s["ceiling"]
    lines += [
        "Seed-noise ceiling (run 1 / run 2): "
        + "; ".join(f"{g} {c[g]['run1']:.3f} / {c[g]['run2']:.3f}" for g in GROUPS),
        "",
    ]
    for name, b in s["by_K"].items():
        m = b["summary"]
        lines += [
            f"## {name}",
            "",
            f"{m['rows']} rows in both runs: |Δ LDS (all)| median {m['median_abs_diff_all']:.3f}, "
            f"max {m['max_abs_diff_all']:.3f} (a within-run 95% interval's half-width: median "
            f"{m['median_ci_halfwidth_all']:.3f}; run 2's LDS inside run 1's interval for "
            f"{m['run2_inside_run1_ci_all']} rows); |Δ (− ref)| median "
            f"{m['median_abs_diff_vs_reference']:.3f}, max {m['max_abs_diff_vs_reference']:.3f}; "
            f"the difference against the reference has the same sign in both runs for "
            f"{m['vs_reference_same_sign']} rows; Spearman of the rows' LDS between runs "
            f"{m['rank_spearman_over_rows']:.3f}.",
            "",
            "| method | LDS all run 1 | run 2 | \\|Δ\\| | held-out 1 / 2 | generated 1 / 2 "
            "| − ref run 1 | − ref run 2 | \\|Δ\\| |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for method, r in b["rows"].items():
            a, v = r["all"], r.get("vs_reference")
            ref = "— | — | —"
            if v:
                ref = (
                    f"{v['run1']:+.3f} {_ci(v['ci_run1'])} | {v['run2']:+.3f} "
                    f"{_ci(v['ci_run2'])} | {v['abs_diff']:.3f}"
                )
            lines.append(
                f"| {method} | {a['run1']:.3f} | {a['run2']:.3f} | {a['abs_diff']:.3f} "
                f"| {r['heldout']['run1']:.3f} / {r['heldout']['run2']:.3f} "
                f"| {r['generated']['run1']:.3f} / {r['generated']['run2']:.3f} | {ref} |"
            )
        for run in ("run1", "run2"):
            if b[f"only_in_{run}"]:
                lines += ["", f"Only in {run}: {'; '.join(b[f'only_in_{run}'])}."]
        lines.append("")
        lines += goal_lines(b["goal"], s["reference"])
    for run in ("run1", "run2"):
        if s.get(f"K_only_in_{run}"):
            lines += [f"Only in {run} (no spread): {', '.join(s[f'K_only_in_{run}'])}.", ""]
    return "\n".join(lines)


POINTER = f"Spread between independent runs: {SPREAD_STEM}.md / {SPREAD_STEM}.json."


def add_pointer(results: Path, stem: str) -> None:
    """A ``spread`` key in ``<stem>.json`` and a line after the setup paragraph of
    ``<stem>.md`` naming the spread files (each once)."""
    path = results / f"{stem}.json"
    r = json.loads(path.read_text())
    r["spread"] = f"{SPREAD_STEM}.json"
    path.write_text(json.dumps(r, indent=2, sort_keys=True) + "\n")
    md = results / f"{stem}.md"
    lines = md.read_text().split("\n")
    if not any(SPREAD_STEM in line for line in lines):
        lines[4:4] = [POINTER, ""]  # after the title and the setup paragraph
        md.write_text("\n".join(lines))


def main() -> None:
    import argparse

    p = argparse.ArgumentParser(description="The spread between two bench_lds.py runs.")
    p.add_argument("--results", type=Path, default=Path(__file__).resolve().parent / "results")
    p.add_argument("--runs", nargs=2, default=["lds", results_stem(2)], help="results stems")
    p.add_argument("--reference", default="D-TRAK (square)")
    args = p.parse_args()
    paths = [args.results / f"{stem}.json" for stem in args.runs]
    for path in paths:
        if not path.exists():
            raise SystemExit(f"{path}: run bench_lds.py report (--run 2) first")
    r1, r2 = (json.loads(path.read_text()) for path in paths)
    s = spread(r1, r2, args.reference)
    files = (paths[0].name, paths[1].name)
    s["files"] = list(files)
    (args.results / f"{SPREAD_STEM}.json").write_text(json.dumps(s, indent=2) + "\n")
    text = spread_markdown(s, files)
    (args.results / f"{SPREAD_STEM}.md").write_text(text)
    for stem in args.runs:
        add_pointer(args.results, stem)
    print(text)


if __name__ == "__main__":
    main()
