"""gradindex.eval.report: the pure statistics against hand-computed values, and report() end to end."""

from __future__ import annotations

import json

import h5py
import numpy as np
import pytest

import gradindex as gi
from gradindex.errors import SearchError
from gradindex.eval import report as rp


def test_norm_by_timestep_quantiles_and_spread():
    # 3 samples, 1 checkpoint, draws at timesteps (10, 10, 500): M = 2 draws at t=10
    norms = np.array([[[1.0, 3.0, 100.0]], [[2.0, 2.0, 200.0]], [[3.0, 1.0, 300.0]]])
    out = rp.norm_by_timestep(norms, [10, 10, 500])
    assert out["timesteps"] == [10, 500]
    assert out["median"] == pytest.approx([2.0, 200.0])
    assert out["median_max_over_min"] == pytest.approx(100.0)
    assert out["argmax_timestep"] == 500 and out["argmin_timestep"] == 10
    p10, p90 = np.quantile([100, 200, 300], [0.1, 0.9])
    assert out["within_timestep_p90_over_p10"][1] == pytest.approx(p90 / p10)
    with pytest.raises(SearchError, match="expected"):
        rp.norm_by_timestep(norms, [10, 500])


def test_topk_concentration_counts_distinct_and_top_share():
    rows = np.array([[0, 1, 2], [0, 1, 3], [0, 4, 5], [0, 1, 6]])  # 12 slots, 7 distinct
    c = rp.topk_concentration(rows, top=2)
    assert c["distinct"] == 7 and c["slots"] == 12 and c["max_count"] == 4
    assert c["top2_share"] == pytest.approx((4 + 3) / 12)
    assert rp.reach(rows, 9).tolist() == [4, 3, 1, 1, 1, 1, 1, 0, 0]


def test_reach_norm_correlation_sign():
    norms = np.arange(1.0, 21.0)
    up = rp.reach_norm_correlation(np.arange(20), norms)
    down = rp.reach_norm_correlation(np.arange(20)[::-1], norms)
    assert up["spearman_all"] == pytest.approx(1.0)
    assert down["spearman_all"] == pytest.approx(-1.0)


def test_drop_self_keeps_k_others():
    rows = np.array([[5, 1, 2], [3, 4, 7]])
    assert rp._drop_self(rows, np.array([5, 9]), 2).tolist() == [[1, 2], [3, 4]]


@pytest.fixture
def built(tmp_path, images, saved_checkpoints):
    spec = gi.BuildSpec(proj_dim=64, timesteps=3, batch_size=8)
    return gi.build_index(
        checkpoints=saved_checkpoints, data=images, out=tmp_path / "idx", spec=spec, progress=False
    )


def test_report_on_a_tiny_index(built, tmp_path):
    out = rp.report(built, k=3, out_dir=tmp_path / "figs")
    json.dumps(out)  # JSON-able
    n = len(built)
    assert out["num_rows"] == n and out["num_queries"] == n
    assert out["norm_by_timestep"]["timesteps"] == built.manifest["timesteps"]
    for m in ("tracin", "retrac"):
        conc = out["methods"][m]["concentration"]
        assert conc["k"] == 3 and conc["slots"] == 3 * n and conc["distinct"] <= n
        # ReTrac rows all have the same norm: each row is its own best match (cosine 1)
        assert 0.0 <= out["methods"][m]["self_retrieval"]["rank1"] <= 1.0
    assert out["methods"]["retrac"]["self_retrieval"]["rank1"] == 1.0
    for f in out["figures"]:
        assert (tmp_path / "figs").joinpath(f.split("/")[-1]).stat().st_size > 1000

    # self-retrieval against brute force (one build serves every check: builds are slow)
    x = built.vectors("tracin")
    best = np.argmax(x @ x.T, axis=1)
    got = rp.self_retrieval(built, np.arange(len(built)), "tracin")["rank1"]
    assert got == pytest.approx(float(np.mean(best == np.arange(len(built)))))

    # the kernel methods are reported too; trak's self-retrieval against a dense solve
    assert {"trak", "retrak"} <= set(out["methods"])
    assert out["methods"]["trak"]["concentration"]["slots"] == 3 * n
    x = x.astype(np.float64)
    weights = [c["weight"] for c in built.manifest["checkpoints"]]
    d = x.shape[1] // len(weights)
    scores = np.zeros((n, n))
    for c, (w, lam) in enumerate(zip(weights, built.manifest["kernel"]["lambda"], strict=True)):
        phi = x[:, c * d : (c + 1) * d] / np.sqrt(w)
        scores += w * phi @ np.linalg.solve(phi.T @ phi + lam * np.eye(d), phi.T)
    got = rp.self_retrieval(built, np.arange(n), "trak")["rank1"]
    assert got == pytest.approx(float(np.mean(np.argmax(scores, 1) == np.arange(n))))
    assert "  most found by trak:" in "\n".join(rp.format_report(out))

    qv = {m: built.vectors(m)[:2] for m in ("tracin", "retrac")}
    out = rp.report(built, k=2, query_vectors=qv)
    assert out["num_queries"] == 2 and out["queries"] == "query_vectors"
    with pytest.raises(SearchError, match="k=0"):
        rp.report(built, k=0)
    # k=10 above the 6 other rows of a 7-row index: each list holds every other row
    out = rp.report(built)
    for m in ("tracin", "retrac"):
        assert out["methods"][m]["concentration"]["k"] == n - 1
        assert out["methods"][m]["concentration"]["slots"] == n * (n - 1)


def test_report_groups_draws_by_timestep_in_spec_draw_order(tmp_path, images):
    """K = 3 timesteps x M = 2 noise draws: the per-timestep statistics equal those computed here
    from the stored norms [N, C, K·M], grouped by the timesteps of spec.draws (k major); an
    m-major grouping gives other numbers."""
    from tests.conftest import scheduler, tiny_unet

    spec = gi.BuildSpec(proj_dim=32, timesteps=3, noise_draws=2, batch_size=8)
    idx = gi.build_index(
        checkpoints=[(tiny_unet(6), scheduler()), (tiny_unet(7), scheduler())],
        data=images,
        out=tmp_path / "idx",
        spec=spec,
        progress=False,
    )
    with h5py.File(idx.path / "vectors.h5", "r") as f:
        norms = f["norms"][()].astype(np.float64)  # [N, C, K·M]
    order = [t for t, _ in idx.spec.draws(idx.manifest["sample_shape"])]
    assert norms.shape == (len(images), 2, 6) and len(set(order)) == 3
    ts = sorted(set(order))
    cols = {t: [i for i, u in enumerate(order) if u == t] for t in ts}
    per_t = {t: norms[:, :, cols[t]].ravel() for t in ts}
    median = [np.median(per_t[t]) for t in ts]
    p10 = [np.quantile(per_t[t], 0.1) for t in ts]
    p90 = [np.quantile(per_t[t], 0.9) for t in ts]

    got = rp.report(idx, k=2)["norm_by_timestep"]
    assert got["timesteps"] == ts
    np.testing.assert_allclose(got["median"], median, rtol=1e-12)
    np.testing.assert_allclose(got["p10"], p10, rtol=1e-12)
    np.testing.assert_allclose(got["p90"], p90, rtol=1e-12)
    np.testing.assert_allclose(got["within_timestep_p90_over_p10"], np.divide(p90, p10), rtol=1e-12)
    assert got["median_max_over_min"] == pytest.approx(max(median) / min(median), rel=1e-12)
    m_major = [norms[:, :, [k, k + 3]].ravel() for k in range(3)]  # the wrong grouping differs
    assert not np.allclose([np.median(v) for v in m_major], median, rtol=1e-6)


def test_format_report_thins_a_long_timestep_table():
    """100 timesteps: 12 evenly spaced rows (first and last included) and a note; the spread
    line names the extreme timesteps."""
    ts = list(range(0, 1000, 10))
    med = [1.0 + t for t in ts]
    nbt = rp.norm_by_timestep(np.array([[med]]), ts)
    conc = {"k": 2, "slots": 2, "distinct": 1, "top10_share": 1.0}
    method = {
        "concentration": conc,
        "reach_vs_norm": {"spearman_all": float("nan")},
        "self_retrieval": {"rank1": 1.0},
        "most_reached": [{"id": "a", "count": 2}],
    }
    result = {
        "index": "x",
        "num_rows": 1,
        "num_flagged": 0,
        "num_queries": 1,
        "queries": "images",
        "norm_by_timestep": nbt,
        "methods": {"tracin": method, "retrac": method},
    }
    lines = rp.format_report(result)
    head = lines.index("  timestep        p10     median        p90  p90/p10")
    shown = [int(ln.split()[0]) for ln in lines[head + 1 : head + 13]]
    assert len(shown) == 12 and shown[0] == 0 and shown[-1] == 990
    assert lines[head + 13] == "  (12 of 100 timesteps shown; --json lists all)"
    assert lines[head + 14] == (
        "  medians differ 991x across timesteps (largest at t=990, smallest at t=0)"
    )
    reach = next(ln for ln in lines if ln.startswith("  reach~norm"))
    assert reach.split()[1:3] == ["n/a", "n/a"]  # NaN correlations say so
    assert "  most found by retrac: a (2x)" in lines
