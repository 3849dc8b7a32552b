"""benchmarks/bench_kernel_lds.py's helpers: the forced-rank kernel it measures is the exact
kernel's top r eigenpairs (numpy's, on a tiny random store) with the left-out mean as its tail,
in the dual and the primal form, and the library's own choice comes back after it; the top-10
overlap against a brute-force count; the margin read from a truncated kernel.h5."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

from gradindex.store.kernel import write_kernel
from gradindex.store.kernel_factors import LAMBDA_SCALE
from gradindex.store.layout import KERNEL, MANIFEST, VECTORS
from gradindex.store.vectors import VectorStore

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"
N, D, WEIGHTS = 13, 32, (1.0, 4.0)
FLAGGED = 5  # one flagged row: the kernel is over the 12 kept ones


def _bench():
    sys.path.insert(0, str(BENCH))
    try:
        spec = importlib.util.spec_from_file_location(
            "bench_kernel_lds", BENCH / "bench_kernel_lds.py"
        )
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod
    finally:
        sys.path.remove(str(BENCH))


def _store(folder: Path) -> dict[str, np.ndarray]:
    """A vectors.h5 of N rows, C = 2, d = D (rows √w_c φ_c, decaying spectrum); returns the
    kept rows of each row set as written."""
    rng = np.random.default_rng(3)
    out = {}
    for name in ("tracin", "retrac"):
        x = rng.standard_normal((N, 2 * D)) * np.arange(1, 2 * D + 1) ** -0.5
        out[name] = (x * np.repeat(np.sqrt(WEIGHTS), D)).astype(np.float32)
    flagged = np.zeros(N, bool)
    flagged[FLAGGED] = True
    store = VectorStore.create(folder / VECTORS, np.arange(N), 2 * D, 2, 1, "float32", {})
    store.write_rows(0, out["tracin"], out["retrac"], np.ones((N, 2, 1), np.float32), flagged)
    store.close()
    return {k: np.delete(v, FLAGGED, axis=0) for k, v in out.items()}


def _unit_match(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """|cos| between matching columns (eigenvectors are defined up to sign)."""
    return np.abs((a * b).sum(0)) / np.linalg.norm(a, axis=0) / np.linalg.norm(b, axis=0)


@pytest.mark.parametrize("form", ["dual", "primal"])
def test_forced_rank_keeps_the_top_eigenpairs_then_restores_the_library_choice(tmp_path, form):
    bench = _bench()
    rows = _store(tmp_path)
    rank = 5
    with bench.forced_rank(rank, form):
        record = write_kernel(tmp_path, WEIGHTS, "build")
    assert record["form"] == {"tracin": form, "retrac": form}
    assert record["exact"] == {"tracin": False, "retrac": False}
    with h5py.File(tmp_path / KERNEL, "r") as f:
        for name, sfx in (("tracin", ""), ("retrac", "_retrac")):
            basis = f[f"{'dual_basis' if form == 'dual' else 'basis'}{sfx}"][()]
            eig, tail = f[f"eigenvalues{sfx}"][()], f[f"tail{sfx}"][()]
            assert basis.shape == (2, N - 1 if form == "dual" else D, rank)
            for c, w in enumerate(WEIGHTS):
                phi = rows[name][:, c * D : (c + 1) * D].astype(np.float64) / np.sqrt(w)
                side = phi @ phi.T if form == "dual" else phi.T @ phi  # K_c or G_c
                s, v = np.linalg.eigh(side)
                s, v = s[::-1], v[:, ::-1]
                np.testing.assert_allclose(eig[c], s[:rank], rtol=1e-9)
                np.testing.assert_allclose(_unit_match(basis[c], v[:, :rank]), 1, atol=1e-5)
                np.testing.assert_allclose(tail[c], s[rank : N - 1].mean(), rtol=1e-9)
    again = write_kernel(tmp_path, WEIGHTS, "build")  # the patch is gone: exact, dual (N < d)
    assert again["exact"] == {"tracin": True, "retrac": True}
    assert again["form"] == {"tracin": "dual", "retrac": "dual"}
    assert again["rank"] == {"tracin": N - 1, "retrac": N - 1}


def test_forced_rank_refuses_a_bad_form_or_rank():
    bench = _bench()
    with pytest.raises(ValueError, match="form"), bench.forced_rank(3, "dense"):
        pass
    with pytest.raises(ValueError, match="rank"), bench.forced_rank(0, "dual"):
        pass


def test_top_overlap_counts_shared_top_k_with_ties_by_position():
    bench = _bench()
    rng = np.random.default_rng(0)
    a = rng.integers(0, 6, (20, 30)).astype(float)  # many ties
    b = a + rng.normal(0, 1.5, a.shape)

    def top(row, k):
        return set(sorted(range(len(row)), key=lambda j: (-row[j], j))[:k])

    want = [len(top(x, 10) & top(y, 10)) / 10 for x, y in zip(a, b, strict=True)]
    np.testing.assert_allclose(bench.top_overlap(a, b, 10), want)
    np.testing.assert_allclose(bench.top_overlap(a, a, 7), 1.0)


def test_kernel_margin_bounds_the_left_out_eigenvalues_by_the_smallest_kept(tmp_path):
    bench = _bench()
    rows = _store(tmp_path)
    rank = 4
    with bench.forced_rank(rank, "dual"):
        record = write_kernel(tmp_path, WEIGHTS, "build")
    manifest = {"num_rows": N, "num_flagged": 1, "build_id": "build", "kernel": record}
    (tmp_path / MANIFEST).write_text(json.dumps(manifest))
    got = bench.kernel_margin(tmp_path)
    assert got["rows"] == N - 1
    for name in ("tracin", "retrac"):
        want = []
        for c, w in enumerate(WEIGHTS):
            phi = rows[name][:, c * D : (c + 1) * D].astype(np.float64) / np.sqrt(w)
            s = np.linalg.eigvalsh(phi @ phi.T)[::-1]
            lam = LAMBDA_SCALE * (s.sum() - s[0]) / D  # the documented default rule
            assert s[rank] <= s[rank - 1]  # the bound holds
            want.append(s[rank - 1] / lam)
        assert got[name]["rank_per_checkpoint"] == [rank, rank]
        assert got[name]["form"] == "dual"
        np.testing.assert_allclose(got[name]["left_out_over_lambda_at_most"], max(want), rtol=1e-6)
    exact = write_kernel(tmp_path, WEIGHTS, "build")  # nothing left out: 0
    (tmp_path / MANIFEST).write_text(json.dumps({**manifest, "kernel": exact}))
    assert bench.kernel_margin(tmp_path)["tracin"]["left_out_over_lambda_at_most"] == 0


def test_safe_ratio_is_the_largest_ratio_below_every_miss():
    sys.path.insert(0, str(BENCH))
    try:
        import kernel_lds_report as report
    finally:
        sys.path.remove(str(BENCH))

    def results(cases):  # {kernel: (left-out ratio, met)} for one method on one index
        left = {k: {"left_out": {"tracin": {"largest_left_out_over_lambda": v}}} for k, (v, _) in cases.items()}  # fmt: skip
        return {
            "labels": {"A": {"index": "i", "rows": "tracin"}},
            "indexes": {"i": {"kernels": left}},
            "methods": {
                "A": {"exact": {}} | {k: {"meets_bar": ok} for k, (_, ok) in cases.items()}
            },
        }

    assert (
        report.safe_ratio(results({"a": (0.1, True), "b": (0.3, True), "c": (0.5, False)})) == 0.3
    )
    # a pass above a miss is not 'safe': only ratios below every miss count
    assert (
        report.safe_ratio(results({"a": (0.1, True), "b": (0.2, False), "c": (0.4, True)})) == 0.1
    )
    assert report.safe_ratio(results({"a": (0.2, False)})) is None
    assert report.safe_ratio(results({"a": (0.2, True)})) == 0.2
