"""The dual form of the kernel (kernel.h5 format 3, fewer kept rows than d): scores against a
dense numpy solve of the primal formula, the form chosen by size, the byte cap that truncated
the primal basis, and format-2 files (primal factors at N < d) still served."""

from __future__ import annotations

import json
import shutil

import h5py
import numpy as np
import pytest

import gradindex as gi
from gradindex.store import kernel_factors
from gradindex.store.kernel import write_kernel
from gradindex.store.layout import MANIFEST, VECTORS, file_records, write_json_atomic
from gradindex.store.vectors import VectorStore
from tests.conftest import scheduler, tiny_unet

D = 48  # per checkpoint
WEIGHTS = (1.0, 3.0)


@pytest.fixture(scope="module")
def template(tmp_path_factory):
    """A real two-checkpoint build (weights 1 and 3, d = 48) whose rows ``grow`` replaces."""
    out = tmp_path_factory.mktemp("dual") / "tmpl"
    ckpts = [(tiny_unet(s), scheduler()) for s in (1, 2)]
    images = np.random.default_rng(0).random((6, 1, 8, 8), np.float32)
    spec = gi.BuildSpec(proj_dim=D, timesteps=1, checkpoint_weights=WEIGHTS)
    gi.build_index(checkpoints=ckpts, data=images, out=out, spec=spec, progress=False,
                   fidelity_sample=0)  # fmt: skip
    return out


def grow(tmpl, out, n: int, seed: int = 0, spike: float = 0.0):
    """An index folder of n rows (clustered, decaying spectrum, every 5th row flagged; ReTrac
    rows of norm √Σw) written by the store's writer, with the build's own kernel writer.
    ``spike``: every row plus spike · a_i · u (one direction for all: a top eigenvalue far above
    the rest, as 'square'-loss rows have)."""
    shutil.copytree(tmpl, out, ignore=shutil.ignore_patterns(VECTORS, "kernel.h5"))
    man = json.loads((out / MANIFEST).read_text())
    with VectorStore.open(tmpl / VECTORS) as t:
        dim, attrs = t.dim, {"spec": str(t.attr("spec"))}
    rng = np.random.default_rng(seed)
    x = (
        rng.standard_normal((n, dim))
        * (np.arange(1, dim + 1) ** -0.7)
        @ rng.standard_normal((dim, dim))
    )
    x = x + spike * rng.standard_normal((n, 1)) * rng.standard_normal(dim)
    x = (x * np.repeat(np.sqrt(WEIGHTS), D)).astype(np.float32)
    u = x / np.linalg.norm(x.reshape(n, 2, D), axis=2).repeat(D, 1) * np.repeat(np.sqrt(WEIGHTS), D)
    flagged = np.zeros(n, bool)
    flagged[::5] = True
    store = VectorStore.create(out / VECTORS, np.arange(n), dim, 2, 1, "float32", attrs)
    store.file.attrs["build_id"] = man["build_id"]
    store.write_rows(0, x, u.astype(np.float32), np.ones((n, 2, 1), np.float32), flagged)
    store.close()
    man.update(num_rows=n, num_flagged=int(flagged.sum()))
    man["kernel"] = write_kernel(out, WEIGHTS, man["build_id"])
    _finish(out, man)
    return man


def _finish(out, man):
    """Rebuild the folder's FAISS indexes over its rows and write the manifest's records."""
    from gradindex.search.ondisk import build_from_store
    from gradindex.store.layout import faiss_file

    with VectorStore.open(out / VECTORS) as reader:
        keep = np.flatnonzero(~reader.flagged)
        man["indexes"] = {
            m: build_from_store(reader, m, keep, "flat", 0.95, out / faiss_file(m))
            for m in ("tracin", "retrac")
        }
    man["files"] = file_records(out)
    write_json_atomic(out / MANIFEST, man)


def dense(folder, q, rows, lams=None, tail_rank=None):
    """Σ_c w_c φ_c(q)ᵀ (G_c + λ_c I)⁻¹ φ_c(z) for every unflagged row z by np.linalg.solve in
    float64, from the rows read with h5py (λ: the documented default rule unless given).
    ``tail_rank``: G_c's eigenvalues past that many replaced by the mean of the non-zero rest."""
    with h5py.File(folder / VECTORS, "r") as f:
        x = f[rows][()].astype(np.float64)[~f["flagged"][()].astype(bool)]
    out = np.zeros((len(q), len(x)))
    for c, w in enumerate(WEIGHTS):
        phi, phq = x[:, c * D : (c + 1) * D] / np.sqrt(w), q[:, c * D : (c + 1) * D] / np.sqrt(w)
        ev, vec = np.linalg.eigh(phi.T @ phi)
        lam = 3.0 * (ev.sum() - ev[-1]) / D if lams is None else lams[c]
        ev = ev[::-1].copy()
        if tail_rank is not None:
            rest = ev[tail_rank:][ev[tail_rank:] > 1e-12 * ev[0]]
            ev[tail_rank : tail_rank + len(rest)] = rest.mean()
        g = (vec[:, ::-1] * ev) @ vec[:, ::-1].T
        out += w * phq @ np.linalg.solve(g + lam * np.eye(D), phi.T)
    return out


def queries(n=4, seed=1):
    return np.random.default_rng(seed).standard_normal((n, 2 * D)).astype(np.float32)


def assert_scores(idx, folder, method, rows, q, want, rtol=1e-5):
    """Every kept row's score (k = all) within rtol of the largest, and the same order."""
    n = len(want[0])
    res = idx.search(q, k=n, method=method)
    got = np.zeros_like(want)
    np.put_along_axis(got, np.searchsorted(idx.index_rows[:], res.rows), res.scores, 1)
    assert np.abs(got - want).max() <= rtol * np.abs(want).max()
    top = np.argsort(-want, axis=1, kind="stable")[:, :5]
    np.testing.assert_array_equal(np.searchsorted(idx.index_rows[:], res.rows[:, :5]), top)


@pytest.mark.parametrize("method, rows", [("trak", "tracin"), ("retrak", "retrac")])
def test_dual_scores_equal_a_dense_solve_for_fewer_rows_than_d(template, tmp_path, method, rows):
    """37 rows (29 kept) < d = 48: the dual form, exact; every kept row's score equals the dense
    primal solve to 1e-5 of the largest, for the default λ and per-checkpoint overrides."""
    man = grow(template, tmp_path / "idx", 37)
    assert man["kernel"]["form"] == {"tracin": "dual", "retrac": "dual"}
    assert man["kernel"]["exact"] == {"tracin": True, "retrac": True}
    idx = gi.AttributionIndex.open(tmp_path / "idx")
    q = queries()
    for _ in range(2):  # V_c applied twice, then (a λ asked again) M_c formed
        assert_scores(idx, idx.path, method, rows, q, dense(idx.path, q, rows))
    assert idx.kernel_for(method)._cached is not None
    for lam in ([0.05, 2.0], [40.0, 0.3]):
        res = idx.search(q, k=29, method=method, lam=lam)
        want = dense(idx.path, q, rows, lams=lam)
        got = np.zeros_like(want)
        np.put_along_axis(got, np.searchsorted(idx.index_rows[:], res.rows), res.scores, 1)
        assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()
    # the slow transform (kernel_vectors) gives the same scores through the stored rows
    with h5py.File(idx.path / VECTORS, "r") as f:
        x = f[rows][()].astype(np.float64)[~f["flagged"][()].astype(bool)]
    want = dense(idx.path, q, rows)
    mine = idx.kernel_vectors(q, method).astype(np.float64) @ x.T
    assert np.abs(mine - want).max() <= 1e-4 * np.abs(want).max()


def test_the_form_is_chosen_by_size(template, tmp_path):
    """Fewer kept rows than d: dual_basis [C, N, r] (N·r floats, < the rows' N·d); more: the
    primal basis [C, d, r]. Both exact here, both equal the dense solve."""
    for n, form, side in ((37, "dual", 29), (90, "primal", D)):
        folder = tmp_path / f"n{n}"
        man = grow(template, folder, n)
        assert man["kernel"]["form"] == {"tracin": form, "retrac": form}
        name = "dual_basis" if form == "dual" else "basis"
        with h5py.File(folder / "kernel.h5", "r") as f:
            assert f.attrs["format"] == 3 and f[name].shape == (2, side, min(side, 72))
            assert f"{'basis' if form == 'dual' else 'dual_basis'}" not in f
            factor_bytes = max(f[name + s].nbytes for s in ("", "_retrac"))
        if form == "dual":  # a row set's factors: N/d of its rows' bytes
            assert factor_bytes == 4 * 2 * 29 * 29 < 4 * 29 * 2 * D
        idx = gi.AttributionIndex.open(folder)
        q = queries(seed=n)
        assert_scores(idx, folder, "trak", "tracin", q, dense(folder, q, "tracin"))


def test_at_the_byte_cap_the_dual_stays_exact_where_the_primal_truncated(
    template, tmp_path, monkeypatch
):
    """Issue 27's N = 2,000, 3 x 4,096 miss at small scale: a cap the primal basis d·r cannot
    fit at r = rank (it truncated: top-10 overlap 0.952) holds the dual's N·r exactly."""
    monkeypatch.setattr(kernel_factors, "FREE_BYTES", 1)
    monkeypatch.setattr(kernel_factors, "MAX_DEFLATED", 0)  # the cap: float32 columns only
    monkeypatch.setattr(kernel_factors, "KERNEL_BYTES", 2 * 4 * 2 * 29 * 29)  # dual: r = 29
    man = grow(template, tmp_path / "idx", 37)
    assert man["kernel"]["rank"] == {"tracin": 29, "retrac": 29}
    assert man["kernel"]["exact"] == {"tracin": True, "retrac": True}
    idx = gi.AttributionIndex.open(tmp_path / "idx")
    q = queries(seed=5)
    for method, rows in (("trak", "tracin"), ("retrak", "retrac")):
        assert_scores(idx, idx.path, method, rows, q, dense(idx.path, q, rows))


def test_a_truncated_dual_is_the_top_eigenpairs_and_the_left_out_mean(
    template, tmp_path, monkeypatch
):
    """Below the rank, the dual keeps K's top r eigenpairs and replaces the rest by their mean:
    the scores of the dense solve with G's spectrum treated the same way (G and K share it)."""
    monkeypatch.setattr(kernel_factors, "MAX_DEFLATED", 0)  # the cap: float32 columns only
    monkeypatch.setattr(kernel_factors, "KERNEL_BYTES", 2 * 4 * 2 * 29 * 7)  # r = 7
    man = grow(template, tmp_path / "idx", 37)
    assert man["kernel"]["rank"] == {"tracin": 7, "retrac": 7}
    assert man["kernel"]["exact"] == {"tracin": False, "retrac": False}
    idx = gi.AttributionIndex.open(tmp_path / "idx")
    q = queries(seed=6)
    assert_scores(idx, idx.path, "trak", "tracin", q, dense(idx.path, q, "tracin", tail_rank=7))


def _as_format_2(folder):
    """Rewrite ``folder``'s kernel.h5 as session 8 wrote it at N < d (format 2: the primal
    basis U [C, d, N], no ``form`` in the record)."""
    man = json.loads((folder / MANIFEST).read_text())
    with VectorStore.open(folder / VECTORS) as store:
        keep = np.flatnonzero(~store.flagged)
        n = len(keep)
        facs = {
            r: kernel_factors.row_set_factors(store.file[r], keep, WEIGHTS, D, (n, n))
            for r in ("tracin", "retrac")
        }
    with h5py.File(folder / "kernel.h5", "w") as f:
        for r, fac in facs.items():
            sfx = "" if r == "tracin" else "_retrac"
            f["basis" + sfx], f["eigenvalues" + sfx], f["tail" + sfx] = (
                fac.basis,
                fac.eigenvalues,
                fac.tail,
            )
            key = "lambda" if r == "tracin" else "lambda_retrac"
            f.attrs[key] = np.asarray(man["kernel"][key])
        f.attrs["rows"], f.attrs["build_id"], f.attrs["format"] = n, man["build_id"], 2
    man["kernel"].pop("form")
    man["kernel"]["format"] = 2
    man["files"] = file_records(folder)
    write_json_atomic(folder / MANIFEST, man)


def test_a_format_2_kernel_still_opens_and_answers_the_same(template, tmp_path):
    """An index whose kernel.h5 is format 2 (primal factors at N < d) is served as it is, with
    the answers of the dense solve and of its format-3 rewrite."""
    grow(template, tmp_path / "new", 37)
    old = tmp_path / "old"
    shutil.copytree(tmp_path / "new", old)
    _as_format_2(old)
    with h5py.File(old / "kernel.h5", "r") as f:
        assert f.attrs["format"] == 2 and f["basis"].shape == (2, D, 29)
    q = queries(seed=7)
    new, idx = gi.AttributionIndex.open(tmp_path / "new"), gi.AttributionIndex.open(old)
    for method, rows in (("trak", "tracin"), ("retrak", "retrac")):
        assert_scores(idx, old, method, rows, q, dense(old, q, rows), rtol=1e-4)
        a, b = idx.search(q, k=5, method=method), new.search(q, k=5, method=method)
        np.testing.assert_array_equal(a.rows, b.rows)
        np.testing.assert_allclose(a.scores, b.scores, rtol=1e-4)


def test_dual_kernel_class_equals_a_primal_solve_on_either_path_and_transform():
    """DualKernel on its own, from hand-made factors: scores = Σ_c X_c (Φ_cᵀΦ_c + λ_c)⁻¹ q_c with
    Φ_c = X_c / √w_c (float64 numpy), the same on the first call (V applied twice) and the second
    (M_c formed); top_k is the argsort of those scores; transform's q' gives them by inner product."""
    from gradindex.store.kernel_dual import DualKernel

    rng = np.random.default_rng(0)
    n, c, d, weights, lams = 12, 2, 20, [0.5, 2.0], [0.3, 1.5]
    x = rng.standard_normal((n, c * d)).astype(np.float32)
    basis, eig = np.zeros((c, n, n), np.float32), np.zeros((c, n))
    for i, w in enumerate(weights):
        block = x[:, i * d : (i + 1) * d].astype(np.float64)
        s, v = np.linalg.eigh(block @ block.T / w)
        basis[i], eig[i] = v, s
    kern = DualKernel(x, basis, eig, np.zeros(c), lams, weights)
    q = rng.standard_normal((3, c * d)).astype(np.float32)
    want = np.zeros((3, n))
    for i, (w, lam) in enumerate(zip(weights, lams, strict=True)):
        block = x[:, i * d : (i + 1) * d].astype(np.float64)
        phi = block / np.sqrt(w)
        want += (
            block @ np.linalg.solve(phi.T @ phi + lam * np.eye(d), q[:, i * d : (i + 1) * d].T)
        ).T
    scale = np.abs(want).max()
    for _ in range(2):  # first call: V twice; second: M_c formed
        np.testing.assert_allclose(kern.scores(q), want, atol=2e-5 * scale)
    top, pos = kern.top_k(q, 4)
    np.testing.assert_array_equal(pos, np.argsort(-want, axis=1)[:, :4])
    np.testing.assert_allclose(kern.transform(q) @ x.T, want, atol=2e-4 * scale)


def test_a_served_dual_kernel_scores_the_rows_its_flat_index_holds(template, tmp_path):
    """``share_rows``: an opened index's dual kernel reads its row set from the FAISS flat
    storage (its blocks are views of it: one copy of the rows in memory, not two), and scores
    as the kernel that reads them from vectors.h5."""
    from gradindex.store.kernel_load import load_kernel

    grow(template, tmp_path / "idx", 37)
    idx = gi.AttributionIndex.open(tmp_path / "idx")
    q = queries()
    for method, rows in (("trak", "tracin"), ("retrak", "retrac")):
        kern, flat = idx.kernel_for(method), idx.backends[rows].inner.flat_rows()  # 8 flagged
        assert flat is not None and flat.shape == (29, 2 * D)
        assert all(np.shares_memory(kern.block(c), flat) for c in range(2))
        read = load_kernel(idx.path, idx.manifest, rows)
        want = read.scores(q)
        assert np.abs(kern.scores(q) - want).max() <= 1e-6 * np.abs(want).max()


def test_dual_scores_keep_float64_precision_when_lambda_is_small_against_the_top():
    """Rows shaped like projected gradients (clustered, power-law spectrum) at N = 300, d = 1,024,
    λ by the default rule: the condition (S_max + λ) / λ is ~10²; every row's score equals a
    float64 solve to 5e-6 of the largest, on the first call and with M_c formed. A float32 sum
    of X_c q (or of V_cᵀ X_c q) misses by 2-3e-5 here: its rounding, of the size of the large
    components, lands in directions that 1/λ multiplies."""
    from gradindex.store.kernel_dual import DualKernel

    rng = np.random.default_rng(0)
    n, d = 300, 1024
    spectrum = np.arange(1, d + 1) ** -0.7
    centers = rng.standard_normal((16, d)) * spectrum

    def rows(m):
        x = rng.standard_normal((m, d)) * spectrum * 0.6 + centers[rng.integers(0, 16, m)]
        return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)

    x, q = rows(n), rows(8)
    x64 = x.astype(np.float64)
    s, v = np.linalg.eigh(x64 @ x64.T)
    lam = 3.0 * (s.sum() - s[-1]) / d
    assert (s[-1] + lam) / lam > 100
    want = np.linalg.solve(x64.T @ x64 + lam * np.eye(d), q.astype(np.float64).T).T @ x64.T
    kern = DualKernel(x, v[None, :, ::-1].astype(np.float32), s[None, ::-1], [0.0], [lam], [1.0])
    for _ in range(3):  # V_c twice, then M_c formed, then M_c reused
        got = kern.scores(q).astype(np.float64)
        assert np.abs(got - want).max() <= 5e-6 * np.abs(want).max()
    assert kern._cached is not None
    for i in (0, 5):  # one query at a time (M_c read as symmetric), the same λ cached
        got = kern.scores(q[i : i + 1]).astype(np.float64)
        assert np.abs(got - want[i]).max() <= 5e-6 * np.abs(want[i]).max()


def test_the_dual_byte_budget_goes_where_the_spectrum_is_flat():
    """``share_columns`` at d = 3, where the default λ_c (3 · (trace − top) / d) is the sum of
    the non-top eigenvalues, 1 for every checkpoint here: set A's eigenvalues (50, 0.6, 0.3, 0.1),
    set B's (3, 0.4, 0.35, 0.25) and (6, 0.9, 0.1, 0). At 5 columns the smallest common
    threshold that fits is τ = 0.3: A keeps 2, B's widest checkpoint 3 (τ = 0.25 would need
    3 + 3). Each checkpoint's tail is the mean of what it leaves out (B's second: nothing)."""
    from gradindex.store.kernel_factors import Factors, share_columns

    def factors(eigs):
        e = np.array(eigs, dtype=np.float64)
        basis = np.arange(e.size * 2, dtype=np.float32).reshape(len(e), 2, -1)
        return Factors(basis, e, np.zeros(len(e)), e.sum(1), e[:, 0].copy(), True, True)

    a = factors([[50.0, 0.6, 0.3, 0.1]])
    b = factors([[3.0, 0.4, 0.35, 0.25], [6.0, 0.9, 0.1, 0.0]])
    out = share_columns({"tracin": a, "retrac": b}, 5, 3)
    assert out["tracin"].eigenvalues.tolist() == [[50.0, 0.6]]
    assert out["retrac"].eigenvalues.tolist() == [[3.0, 0.4, 0.35], [6.0, 0.9, 0.1]]
    np.testing.assert_allclose(out["tracin"].tail, [0.2])
    np.testing.assert_allclose(out["retrac"].tail, [0.25, 0.0])
    np.testing.assert_array_equal(out["retrac"].basis, b.basis[:, :, :3])
    assert not out["tracin"].exact and not out["retrac"].exact
    wide = share_columns({"tracin": a, "retrac": b}, 8, 3)
    assert [f.eigenvalues.shape[1] for f in wide.values()] == [4, 4] and wide["retrac"].exact


def test_a_dominant_direction_keeps_the_served_scores_at_float64_precision(template, tmp_path):
    """Rows with one direction far above the rest (top eigenvalue / λ ~ 10⁴, like D-TRAK's
    'square' rows): kernel.h5 keeps the leading eigenvectors in float64 too (``dual_lead``,
    the columns with S > 4λ), and every kept row's served score equals the dense float64 solve
    to 2e-6 of the largest. From the float32 columns alone they miss by ~1e-4 here."""
    man = grow(template, tmp_path / "idx", 37, spike=30.0)
    idx = gi.AttributionIndex.open(tmp_path / "idx")
    with h5py.File(idx.path / "kernel.h5", "r") as f:
        lead, eig = f["dual_lead"][()], f["eigenvalues"][()]
        assert lead.dtype == np.float64 and eig[0, 0] / man["kernel"]["lambda"][0] > 1e3
        width = [int(np.sum(e > 4 * lam)) for e, lam in zip(eig, man["kernel"]["lambda"])]
        assert lead.shape == (2, 29, max(width))
    q = (
        queries(seed=3)
        + 30.0
        * np.random.default_rng(4).standard_normal((4, 1)).astype(np.float32)
        * idx.vectors("tracin")[:1]
    )
    for _ in range(2):
        assert_scores(idx, idx.path, "trak", "tracin", q, dense(idx.path, q, "tracin"), rtol=2e-6)


def test_a_dual_too_large_for_a_full_eigh_keeps_its_float64_columns_inside_the_budget(
    template, tmp_path, monkeypatch
):
    """Past EIGH_MAX rows (lowered here) the dual takes the top eigenpairs by subspace iteration,
    each set an even share of KERNEL_BYTES; its float64 leading eigenvectors (``dual_lead``)
    are stored beside the float32 columns and must fit in the same bytes (they were not
    counted: 3,712 bytes of float32 columns and 1,856 of float64 ones in a budget of 3,712)."""
    from gradindex.store import kernel

    for module in (kernel, kernel_factors):
        monkeypatch.setattr(module, "EIGH_MAX", 16)
    monkeypatch.setattr(kernel_factors, "KERNEL_BYTES", 16 * 4 * 2 * 29)  # 16 columns
    grow(template, tmp_path / "idx", 37, spike=30.0)
    with h5py.File(tmp_path / "idx" / "kernel.h5", "r") as f:
        factor_bytes = sum(f[k].nbytes for k in f if k.startswith(("dual_basis", "dual_lead")))
        assert any(k.startswith("dual_lead") for k in f)  # the spike gives leading columns
    assert factor_bytes <= kernel_factors.KERNEL_BYTES
