"""benchmarks/bench_lds.py's hardening: equal epochs, subset models per seed, the seed-noise
ceiling and the declared primary comparison, against plain computations."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
from scipy.stats import spearmanr

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"


def _load(name: str):
    sys.path.insert(0, str(BENCH))
    try:
        spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod
    finally:
        sys.path.remove(str(BENCH))


def test_subset_models_train_the_full_models_epochs_with_three_seeds_each():
    bench = _load("bench_lds")
    c = bench.CONFIG
    full_epochs = c["steps"] * c["batch_size"] / c["num_train"]
    subset_epochs = bench.subset_steps() * c["batch_size"] / (c["num_train"] * c["subset_fraction"])
    assert abs(subset_epochs - full_epochs) / full_epochs < 0.01
    names = bench.subset_names()
    assert len(set(names)) == c["num_subsets"] * len(c["subset_train_seeds"])
    assert len(c["subset_train_seeds"]) >= 3


def test_seed_ceiling_is_leave_one_seed_out_spearman():
    extra = _load("lds_extra")
    rng = np.random.default_rng(0)
    per_seed = rng.normal(size=(5, 12, 3)) + rng.normal(size=(5, 12, 1))  # [T, S, seeds]
    got = extra.seed_ceiling(per_seed, 200)["per_target"]
    want = [
        np.mean(
            [
                spearmanr(per_seed[t, :, j], np.delete(per_seed[t], j, axis=1).mean(1))[0]
                for j in range(3)
            ]
        )
        for t in range(5)
    ]
    np.testing.assert_allclose(got, want, rtol=1e-10)


def test_primary_record_is_the_paired_difference_per_group():
    extra = _load("lds_extra")
    rng = np.random.default_rng(1)
    a, b = rng.normal(0.5, 0.1, 40), rng.normal(0.4, 0.1, 40)
    groups = np.r_[np.zeros(20, int), np.ones(20, int)]
    declared = {"method": "A", "reference": "B", "K": "K10", "goal": 0.03}
    rec = extra.primary_record(declared, {"A": a, "B": b}, groups, 500)
    for key, g in (("held_out", 0), ("generated", 1)):
        d = (a - b)[groups == g]
        assert abs(rec[key]["diff"] - d.mean()) < 1e-12
        low, high = rec[key]["ci"]
        assert low < d.mean() < high
        assert rec[key]["met"] == (d.mean() >= 0.03 and low > 0)
    assert extra.primary_record(declared, {"A": a}, groups, 10)["missing"] == ["B"]
