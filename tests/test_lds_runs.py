"""benchmarks/lds_runs.py: run 2's seeds and cache, and the spread between two runs' lds.json,
checked on hand-written results (rows listed in different orders, signs that flip)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import lds_runs  # noqa: E402

REF = "D-TRAK (square)"


def ci(mean: float, half: float = 0.02) -> dict:
    return {"mean": mean, "ci_low": mean - half, "ci_high": mean + half, "n": 100}


def row(all_: float, held: float, gen: float) -> dict:
    return {"all": ci(all_), "heldout": ci(held), "generated": ci(gen)}


def result(methods: dict, vs: dict, primary: dict, ceiling: float) -> dict:
    """A minimal lds.json: one K block, its rows, paired differences, primary and ceiling."""
    return {
        "by_K": {
            "K10": {
                "methods": methods,
                "paired_vs_dtrak": {f"{a} − {REF}": ci(d) for a, d in vs.items()},
            }
        },
        "primary": primary,
        "ceiling": {g: ci(ceiling) for g in ("all", "heldout", "generated")},
        "subset_seeds": [1000],
        "num_subsets": 1,
    }


def primary(held: float, gen: float, method: str = "A") -> dict:
    return {
        "method": method,
        "reference": REF,
        "K": "K10",
        "held_out": {"diff": held, "ci": [held - 0.01, held + 0.01], "goal": 0.03, "met": False},
        "generated": {"diff": gen, "ci": [gen - 0.01, gen + 0.01], "goal": 0.03, "met": True},
    }


def two_runs() -> tuple[dict, dict]:
    run1 = result(
        {REF: row(0.50, 0.60, 0.40), "A": row(0.52, 0.58, 0.46), "B": row(0.30, 0.35, 0.25)},
        {"A": 0.02, "B": -0.20},
        primary(-0.10, 0.05),
        0.30,
    )
    run2 = result(  # other order, a row run 1 lacks, A's sign against the reference flips
        {"C": row(0.10, 0.1, 0.1), "B": row(0.33, 0.31, 0.35), "A": row(0.47, 0.50, 0.44),
         REF: row(0.49, 0.55, 0.41)},
        {"B": -0.15, "A": -0.01, "C": -0.38},
        primary(-0.07, 0.02),
        0.34,
    )  # fmt: skip
    return run1, run2


def test_rows_are_paired_by_name_not_position() -> None:
    s = lds_runs.spread(*two_runs(), REF)["by_K"]["K10"]
    a = s["rows"]["A"]
    assert (a["all"]["run1"], a["all"]["run2"]) == (0.52, 0.47)
    assert a["all"]["abs_diff"] == pytest.approx(0.05)
    assert (a["heldout"]["run1"], a["heldout"]["run2"]) == (0.58, 0.50)
    assert (a["generated"]["run1"], a["generated"]["run2"]) == (0.46, 0.44)
    b = s["rows"]["B"]
    assert (b["all"]["run1"], b["all"]["run2"]) == (0.30, 0.33)
    assert set(s["rows"]) == {REF, "A", "B"}
    assert s["only_in_run2"] == ["C"] and s["only_in_run1"] == []
    assert "vs_reference" not in s["rows"][REF]


def test_paired_difference_keeps_its_sign_per_run() -> None:
    s = lds_runs.spread(*two_runs(), REF)["by_K"]["K10"]
    a = s["rows"]["A"]["vs_reference"]
    assert (a["run1"], a["run2"]) == (0.02, -0.01)
    assert a["abs_diff"] == pytest.approx(0.03)
    assert a["same_sign"] is False
    b = s["rows"]["B"]["vs_reference"]
    assert (b["run1"], b["run2"], b["same_sign"]) == (-0.20, -0.15, True)
    m = s["summary"]
    assert m["vs_reference_same_sign"] == 1
    assert m["max_abs_diff_all"] == pytest.approx(0.05)  # A; C (run 2 only) is not counted
    assert m["median_abs_diff_all"] == pytest.approx(0.03)  # |Δ| 0.01, 0.05, 0.03
    assert m["median_ci_halfwidth_all"] == pytest.approx(0.02)
    assert m["run2_inside_run1_ci_all"] == 1  # ref 0.49 in [0.48, 0.52]; A 0.47, B 0.33 not
    # rows' LDS: run 1 A > ref > B, run 2 ref > A > B: ranks (2, 3, 1) vs (3, 2, 1) → 0.5
    assert m["rank_spearman_over_rows"] == pytest.approx(0.5)


def test_primary_and_ceiling_per_run_and_group() -> None:
    run1, run2 = two_runs()
    run1["by_K"]["K100"] = run1["by_K"]["K10"]
    s = lds_runs.spread(run1, run2, REF)
    assert list(s["by_K"]) == ["K10"] and s["K_only_in_run1"] == ["K100"]
    p = s["primary"]
    assert (p["held_out"]["run1"], p["held_out"]["run2"]) == (-0.10, -0.07)
    assert (p["generated"]["run1"], p["generated"]["run2"]) == (0.05, 0.02)
    assert p["held_out"]["abs_diff"] == pytest.approx(0.03)
    assert p["generated"]["met_run1"] is True and p["held_out"]["met_run2"] is False
    assert s["ceiling"]["all"]["run1"] == 0.30 and s["ceiling"]["all"]["run2"] == 0.34


def test_different_declared_comparisons_are_refused() -> None:
    run1, run2 = two_runs()
    run2["primary"] = primary(-0.07, 0.02, method="B")
    with pytest.raises(SystemExit, match="primary comparisons differ"):
        lds_runs.spread(run1, run2, REF)


def test_program_writes_spread_and_points_to_it_once(tmp_path: Path, monkeypatch) -> None:
    run1, run2 = two_runs()
    for stem, r in (("lds", run1), ("lds_run2", run2)):
        (tmp_path / f"{stem}.json").write_text(json.dumps(r))
        (tmp_path / f"{stem}.md").write_text("# title\n\nSetup.\n\nMore.\n")
    monkeypatch.setattr(sys, "argv", ["lds_runs.py", "--results", str(tmp_path)])
    for _ in range(2):
        lds_runs.main()
    s = json.loads((tmp_path / "lds_spread.json").read_text())
    assert s["by_K"]["K10"]["rows"]["A"]["vs_reference"]["run2"] == -0.01
    md = (tmp_path / "lds.md").read_text()
    assert md.count("lds_spread.md") == 1
    assert json.loads((tmp_path / "lds.json").read_text())["spread"] == "lds_spread.json"
    table = (tmp_path / "lds_spread.md").read_text()
    assert "| A | 0.520 | 0.470 | 0.050 |" in table


def test_run_two_changes_every_seed_and_keeps_the_question(tmp_path: Path, monkeypatch) -> None:
    import bench_lds

    two = lds_runs.run_config(bench_lds.CONFIG, 2)
    seeds = [k for k in bench_lds.CONFIG if "seed" in k]
    assert len(seeds) >= 9
    for key in seeds:
        if key == "pool_seed":  # the training pool, held-out and calibration digits
            assert two[key] == bench_lds.CONFIG[key]
        else:
            assert two[key] != bench_lds.CONFIG[key], key
    assert not set(two["subset_train_seeds"]) & set(bench_lds.CONFIG["subset_train_seeds"])
    same = {k: v for k, v in bench_lds.CONFIG.items() if k not in lds_runs.RUN_SEEDS[2]}
    assert all(two[k] == v for k, v in same.items())
    m1 = bench_lds.masks()
    monkeypatch.setattr(bench_lds, "CONFIG", two)
    m2 = bench_lds.masks()
    assert m1.shape == m2.shape and not np.array_equal(m1, m2)
    with pytest.raises(SystemExit, match="--run 3"):
        lds_runs.run_config(bench_lds.CONFIG, 3)


def test_run_cache_and_results_files(tmp_path: Path, monkeypatch) -> None:
    cache = tmp_path / "lds-cache"
    monkeypatch.delenv("GRADINDEX_LDS_CACHE_RUN2", raising=False)
    assert lds_runs.run_cache(cache, 1) == cache
    assert lds_runs.run_cache(cache, 2) == tmp_path / "lds-cache-run2"
    monkeypatch.setenv("GRADINDEX_LDS_CACHE_RUN2", str(tmp_path / "elsewhere"))
    assert lds_runs.run_cache(cache, 2) == tmp_path / "elsewhere"
    assert lds_runs.results_stem(1) == "lds" and lds_runs.results_stem(2) == "lds_run2"


def test_every_row_says_how_far_it_is_from_the_goal_in_each_run() -> None:
    """The goal is reference + 0.03 with the paired interval above zero: A (+0.02 / −0.01) is
    short by 0.01 / 0.04, B (−0.20 / −0.15) by 0.23 / 0.18; a row at +0.05 whose interval
    reaches below zero is short by nothing yet does not meet it; nearest rows first."""
    run1, run2 = two_runs()
    run1["by_K"]["K10"]["paired_vs_dtrak"][f"A − {REF}"] = ci(0.05, half=0.06)  # [−0.01, 0.11]
    goal = lds_runs.spread(run1, run2, REF)["by_K"]["K10"]["goal"]
    assert [g["method"] for g in goal] == ["A", "B"]
    a, b = goal
    assert a["run1"]["short_by"] == 0.0 and a["run1"]["met"] is False
    assert a["run2"]["short_by"] == pytest.approx(0.04) and a["run2"]["met"] is False
    assert b["run1"]["short_by"] == pytest.approx(0.23)
    assert b["run2"]["short_by"] == pytest.approx(0.18)
    run1["by_K"]["K10"]["paired_vs_dtrak"][f"A − {REF}"] = ci(0.05, half=0.01)
    run2["by_K"]["K10"]["paired_vs_dtrak"][f"A − {REF}"] = ci(0.04, half=0.01)
    s = lds_runs.spread(run1, run2, REF)
    assert s["by_K"]["K10"]["goal"][0]["run2"]["met"] is True
    text = lds_runs.spread_markdown(s, ("lds.json", "lds_run2.json"))
    assert "Rows meeting the goal in both runs: A." in text
