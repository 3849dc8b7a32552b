"""The kernel (eigen factors of the per-checkpoint Grams of the TracIn and ReTrac rows) and the
methods 'trak' / 'retrak' served from it, checked against dense numpy solves over the rows read
back with plain h5py."""

from __future__ import annotations

import dataclasses
import json
import shutil

import h5py
import numpy as np
import pytest
from diffusers import DDPMPipeline

import gradindex as gi
from gradindex.build.append import add_samples
from gradindex.build.shards import merge_shards
from tests.conftest import run, scheduler, tiny_unet

WEIGHTS = (1.0, 3.0)
D = 16  # per checkpoint; 9 rows < d: the Gram is singular, only the ridge makes it invertible
SPEC = gi.BuildSpec(
    proj_dim=D,
    projection="sjlt",
    timesteps=2,
    noise_draws=1,
    batch_size=4,
    checkpoint_weights=WEIGHTS,
)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Two checkpoint folders, 9 images and the whole build over them."""
    root = tmp_path_factory.mktemp("kernel")
    ckpts = []
    for seed in (1, 2):
        DDPMPipeline(unet=tiny_unet(seed), scheduler=scheduler()).save_pretrained(root / f"c{seed}")
        ckpts.append(root / f"c{seed}")
    images = np.random.default_rng(5).random((9, 1, 8, 8), dtype=np.float32)
    whole = _build(ckpts, images, root / "whole")
    return root, ckpts, images, whole


def _build(ckpts, images, out, **kw):
    return gi.build_index(
        checkpoints=ckpts, data=images, out=out, spec=SPEC, progress=False, fidelity_sample=0, **kw
    )


def default_lams(gram):
    """The documented default λ_c = 3 · (trace(G_c) − top eigenvalue) / d."""
    return [3.0 * (np.trace(g) - np.linalg.eigvalsh(g)[-1]) / D for g in gram]


def plain_rows(folder, rows="tracin"):
    """The unflagged TracIn (or ReTrac) rows, read with h5py only, float64."""
    with h5py.File(folder / "vectors.h5", "r") as f:
        x = f[rows][()].astype(np.float64)
        return x[~f["flagged"][()].astype(bool)]


def plain_gram(folder, rows="tracin"):
    x = plain_rows(folder, rows)
    return np.stack(
        [x[:, c * D : (c + 1) * D].T @ x[:, c * D : (c + 1) * D] / w for c, w in enumerate(WEIGHTS)]
    )


def basis_name(folder, rows="tracin"):
    """kernel.h5's factor dataset of ``rows``: ``dual_basis`` (N < d) or ``basis``."""
    sfx = "" if rows == "tracin" else f"_{rows}"
    with h5py.File(folder / "kernel.h5", "r") as f:
        return f"dual_basis{sfx}" if f"dual_basis{sfx}" in f else f"basis{sfx}"


def stored_gram(folder, rows="tracin"):
    """The Gram rebuilt from kernel.h5's factors with plain h5py, U diag(Λ) Uᵀ (exact at
    r = rank): G_c [C, d, d] from a primal basis, K_c = Φ_c Φ_cᵀ [C, N, N] from a dual one."""
    sfx = "" if rows == "tracin" else f"_{rows}"
    with h5py.File(folder / "kernel.h5", "r") as f:
        u = f[basis_name(folder, rows)][()].astype(np.float64)
        ev = f[f"eigenvalues{sfx}"][()]
    return np.einsum("cdr,cr,cer->cde", u, ev, u)


def form_gram(folder, rows="tracin"):
    """What ``stored_gram`` must equal, from the rows read with h5py: G_c, or K_c (dual)."""
    if not basis_name(folder, rows).startswith("dual"):
        return plain_gram(folder, rows)
    x = plain_rows(folder, rows)
    blocks = [x[:, c * D : (c + 1) * D] for c in range(len(WEIGHTS))]
    return np.stack([b @ b.T / w for b, w in zip(blocks, WEIGHTS, strict=True)])


def dense_trak(folder, queries, lams=None, rows="tracin"):
    """Σ_c w_c φ_c(q)ᵀ (G_c + λ_c I)⁻¹ φ_c(z) for every row z, by np.linalg.solve (``rows``:
    "retrac" gives method 'retrak')."""
    x, gram = plain_rows(folder, rows), plain_gram(folder, rows)
    lams = default_lams(gram) if lams is None else lams
    scores = np.zeros((len(queries), len(x)))
    for c, w in enumerate(WEIGHTS):
        phi_q = queries[:, c * D : (c + 1) * D].astype(np.float64) / np.sqrt(w)
        phi_z = x[:, c * D : (c + 1) * D] / np.sqrt(w)
        scores += w * phi_q @ np.linalg.solve(gram[c] + lams[c] * np.eye(D), phi_z.T)
    return scores


def top_k(scores, k):
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(scores, order, 1), order


def queries(n=5, seed=1):
    return np.random.default_rng(seed).standard_normal((n, D * len(WEIGHTS))).astype(np.float32)


def test_kernel_factors_equal_the_gram_of_rows_read_with_h5py(setup):
    """kernel.h5 keeps eigen factors, not d x d Grams; 9 rows < d = 16, so the dual form:
    V diag(Λ) Vᵀ is the N x N Gram Φ Φᵀ of the rows (exact at r = 9), V has orthonormal
    columns, λ follows the rule."""
    whole = setup[3]
    with h5py.File(whole.path / "kernel.h5", "r") as f:
        assert "gram" not in f and "basis" not in f and f.attrs["format"] == 3
        u, tail = f["dual_basis"][()], f["tail"][()]
        rows, build_id = int(f.attrs["rows"]), f.attrs["build_id"]
    assert u.dtype == np.float32 and u.shape == (2, 9, 9) and np.all(tail == 0)
    for c in range(2):
        np.testing.assert_allclose(u[c].T @ u[c], np.eye(9), atol=1e-5)
    for r in ("tracin", "retrac"):
        want = form_gram(whole.path, r)
        np.testing.assert_allclose(stored_gram(whole.path, r), want, atol=1e-6 * np.abs(want).max())
    assert rows == 9 and build_id == whole.manifest["build_id"]
    record = whole.manifest["kernel"]
    for key, rows in (("lambda", "tracin"), ("lambda_retrac", "retrac")):
        np.testing.assert_allclose(
            record[key], default_lams(plain_gram(whole.path, rows)), rtol=1e-8
        )
    assert record["rows"] == 9 and "kernel.h5" in whole.manifest["files"]
    assert record["rank"] == {"tracin": 9, "retrac": 9}
    assert record["exact"] == {"tracin": True, "retrac": True}
    assert record["form"] == {"tracin": "dual", "retrac": "dual"}


def test_trak_scores_equal_dense_solve_with_fewer_rows_than_dims(setup):
    whole = setup[3]
    q = queries()
    res = whole.search(q, k=4, method="trak")
    dense = dense_trak(whole.path, q)
    scores, order = top_k(dense, 4)
    np.testing.assert_allclose(res.scores, scores, rtol=1e-4, atol=1e-4 * np.abs(scores).max())
    # the transform itself: every row's score within 1e-5 of the largest (issue 27)
    mine = whole.kernel_vectors(q, "trak").astype(np.float64) @ plain_rows(whole.path).T
    assert np.abs(mine - dense).max() <= 1e-5 * np.abs(dense).max()
    np.testing.assert_array_equal(res.rows, order)
    np.testing.assert_array_equal(res.ids, whole.ids[order])


@pytest.mark.parametrize("rows", ["tracin", "retrac"])
def test_retrak_scores_equal_dense_solve_over_the_retrac_rows(setup, rows):
    """'retrak' is the kernel of the ReTrac rows applied to ReTrac query rows ('trak' the
    TracIn ones): the same scores and top-k as a dense solve over the rows read with h5py."""
    whole = setup[3]
    q = queries(seed=6)
    res = whole.search(q, k=5, method="retrak" if rows == "retrac" else "trak")
    scores, order = top_k(dense_trak(whole.path, q, rows=rows), 5)
    np.testing.assert_allclose(res.scores, scores, rtol=1e-4, atol=1e-4 * np.abs(scores).max())
    np.testing.assert_array_equal(res.rows, order)
    res = whole.search(q, k=5, method="retrak" if rows == "retrac" else "trak", lam=0.3)
    np.testing.assert_array_equal(res.rows, top_k(dense_trak(whole.path, q, [0.3] * 2, rows), 5)[1])


@pytest.mark.parametrize("lam", [0.5, [0.02, 7.0]])
def test_lambda_override_per_query(setup, lam):
    whole = setup[3]
    q = queries(seed=2)
    res = whole.search(q, k=9, method="trak", lam=lam)
    lams = [lam, lam] if np.ndim(lam) == 0 else lam
    dense = dense_trak(whole.path, q, lams)
    scores, order = top_k(dense, 9)
    np.testing.assert_allclose(res.scores, scores, rtol=1e-4, atol=1e-4 * np.abs(scores).max())
    np.testing.assert_array_equal(res.rows, order)
    # the public transform takes the same λ
    mine = whole.kernel_vectors(q, "trak", lam).astype(np.float64) @ plain_rows(whole.path).T
    assert np.abs(mine - dense).max() <= 1e-4 * np.abs(dense).max()


@pytest.mark.parametrize("lam", [0, -1.0, float("nan"), float("inf"), [1.0], "x"])
def test_bad_lambda_is_refused(setup, lam):
    with pytest.raises(gi.SearchError, match="lambda"):
        setup[3].search(queries(), k=2, method="trak", lam=lam)


def test_lambda_with_another_method_is_refused(setup):
    with pytest.raises(gi.SearchError, match="'retrak' only"):
        setup[3].search(queries(), k=2, method="tracin", lam=1.0)


def test_cli_query_trak_from_vectors(setup, tmp_path):
    whole = setup[3]
    q = queries(n=3, seed=4)
    np.save(tmp_path / "q.npy", q)
    res = run("query", whole.path, tmp_path / "q.npy", "--vectors", "--method", "all", "-k", "3",
              "--json")  # fmt: skip
    assert res.exit_code == 0, res.output
    recs = [json.loads(line) for line in res.stdout.splitlines()]
    methods = ["tracin", "retrac", "trak", "retrak"]
    assert [r["method"] for r in recs] == [m for m in methods for _ in range(3)]
    for method, rows in (("trak", "tracin"), ("retrak", "retrac")):
        scores, order = top_k(dense_trak(whole.path, q, rows=rows), 3)
        got = [r for r in recs if r["method"] == method]
        np.testing.assert_array_equal([r["rows"] for r in got], order)
        np.testing.assert_allclose([r["scores"] for r in got], scores, rtol=1e-4, atol=1e-6)
    res = run("query", whole.path, tmp_path / "q.npy", "--vectors", "--method", "trak",
              "--lambda", "2", "--json")  # fmt: skip
    got = [json.loads(line)["scores"] for line in res.stdout.splitlines()]
    np.testing.assert_allclose(got, top_k(dense_trak(whole.path, q, [2, 2]), 9)[0], rtol=1e-4)
    for bad in ("0", "-3", "nan", "inf"):
        res = run("query", whole.path, tmp_path / "q.npy", "--vectors", "--method", "trak",
                  "--lambda", bad)  # fmt: skip
        assert res.exit_code == 1 and res.output.count("\n") == 1, res.output
        assert res.output.startswith("Error: lambda=")
    res = run("query", whole.path, tmp_path / "q.npy", "--vectors", "--method", "both",
              "--lambda", "1")  # fmt: skip
    assert res.exit_code != 0 and "--lambda" in res.output


def test_kernel_command_restores_a_removed_kernel(setup, tmp_path):
    old = tmp_path / "old"
    shutil.copytree(setup[3].path, old)
    strip_kernel(old)
    assert run("info", old, "--verify").exit_code == 0
    idx = gi.AttributionIndex.open(old)
    with pytest.raises(gi.IndexStateError, match=f"gradindex kernel {old}"):
        idx.search(queries(), k=2, method="trak")
    np.save(tmp_path / "q.npy", queries(n=2))
    res = run("query", old, tmp_path / "q.npy", "--vectors", "--method", "trak")
    assert res.exit_code == 1 and res.output.count("\n") == 1
    assert f"add it with: gradindex kernel {old}" in res.output
    assert (
        f"kernel       none; add it for --method trak with: gradindex kernel {old}"
        in run("info", old).stdout.splitlines()
    )

    res = run("kernel", old)
    assert res.exit_code == 0, res.output
    res = run("info", old, "--verify")
    assert res.exit_code == 0, res.output
    assert "verified     6 files match their checksums" in res.stdout  # kernel.h5 included
    want = form_gram(old)
    np.testing.assert_allclose(stored_gram(old), want, atol=1e-6 * np.abs(want).max())
    q = queries()
    res = gi.AttributionIndex.open(old).search(q, k=4, method="trak")
    np.testing.assert_array_equal(res.rows, top_k(dense_trak(old, q), 4)[1])


def test_kernel_command_refuses_a_damaged_index(setup, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(setup[3].path, bad)
    data = bytearray((bad / "vectors.h5").read_bytes())
    data[-9] ^= 0xFF  # one flipped byte, same size
    (bad / "vectors.h5").write_bytes(bytes(data))
    before = (bad / "manifest.json").read_text()
    res = run("kernel", bad)
    assert res.exit_code == 1 and "checksum mismatch" in res.output
    assert (bad / "manifest.json").read_text() == before


@pytest.fixture(scope="module")
def shards(setup):
    root, ckpts, images, _ = setup
    return [_build(ckpts, images, root / f"s{i}", shard=(i, 2)).path for i in range(2)]


def strip_kernel(folder):
    """Make ``folder`` look like an index built before kernels: no kernel.h5, no record."""
    manifest = json.loads((folder / "manifest.json").read_text())
    del manifest["kernel"], manifest["files"]["kernel.h5"]
    (folder / "manifest.json").write_text(json.dumps(manifest))
    (folder / "kernel.h5").unlink()


def test_merge_makes_the_kernel_of_the_assembled_rows(shards, tmp_path):
    """Eigen factors do not add over shards: the merge makes them in one pass over the merged
    rows, which a shard without a kernel of its own does not change."""
    old = tmp_path / "old1"
    shutil.copytree(shards[1], old)
    strip_kernel(old)
    for parts in ([shards[0], shards[1]], [shards[0], old]):
        merged = merge_shards(tmp_path / f"merged{len(str(parts[1]))}", parts)
        for rows in ("tracin", "retrac"):
            want = form_gram(merged.path, rows)
            got = stored_gram(merged.path, rows)
            np.testing.assert_allclose(got, want, atol=1e-6 * np.abs(want).max())
        assert merged.manifest["kernel"]["rows"] == 9
        assert run("info", merged.path, "--verify").exit_code == 0


def test_gram_after_merge_and_add_equals_one_build(setup, shards):
    root, ckpts, images, whole = setup
    merged = merge_shards(root / "merged", shards)
    _build(ckpts, images[:6], root / "part")
    added = add_samples(root / "part", images[6:])
    for idx in (merged, added):
        np.testing.assert_array_equal(idx.ids, whole.ids)
        for rows in ("tracin", "retrac"):
            mine, one = stored_gram(idx.path, rows), stored_gram(whole.path, rows)
            # the rows themselves agree to float32 rounding across batchings (test_shards)
            np.testing.assert_allclose(mine, one, atol=1e-5 * np.abs(one).max())
            want = form_gram(idx.path, rows)
            np.testing.assert_allclose(mine, want, atol=1e-6 * np.abs(want).max())
        with h5py.File(idx.path / "kernel.h5", "r") as f:
            assert f.attrs["build_id"] == idx.manifest["build_id"] and f.attrs["rows"] == 9
        assert run("info", idx.path, "--verify").exit_code == 0
        q = queries(seed=9)
        for method in ("trak", "retrak"):
            np.testing.assert_array_equal(
                idx.search(q, k=5, method=method).rows, whole.search(q, k=5, method=method).rows
            )


def test_a_kernel_without_the_retrac_gram_serves_trak_and_names_the_command_for_retrak(
    setup, tmp_path
):
    """An index whose kernel predates 'retrak' (no gram_retrac, no lambda_retrac) still serves
    'trak'; 'retrak' gets one line naming 'gradindex kernel', which then adds it."""
    whole = setup[3]
    old = tmp_path / "old"
    shutil.copytree(whole.path, old)
    with h5py.File(old / "kernel.h5", "a") as f:
        for name in [n for n in f if n.endswith("_retrac")]:
            del f[name]
    manifest = json.loads((old / "manifest.json").read_text())
    del manifest["kernel"]["lambda_retrac"], manifest["files"]["kernel.h5"]
    (old / "manifest.json").write_text(json.dumps(manifest))
    idx = gi.AttributionIndex.open(old)
    q = queries(seed=3)
    np.testing.assert_array_equal(idx.search(q, 3, "trak").rows, whole.search(q, 3, "trak").rows)
    with pytest.raises(gi.IndexStateError, match=f"gradindex kernel {old}$"):
        idx.search(q, 3, "retrak")
    res = run("query", old, tmp_path / "none.npy", "--method", "retrak")
    assert res.exit_code == 1 and "gradindex kernel" in res.output
    assert run("kernel", old).exit_code == 0
    np.testing.assert_array_equal(
        gi.AttributionIndex.open(old).search(q, 3, "retrak").rows,
        whole.search(q, 3, "retrak").rows,
    )


def test_query_from_images_scores_trak(setup):
    """idx.query(images, method="trak") embeds with the index's spec, then scores TRAK."""
    whole, images = setup[3], setup[2]
    idx = gi.AttributionIndex.open(whole.path)  # checkpoints from the recorded folders
    res = idx.query(images[:2], k=3, method="trak")
    scores, order = top_k(dense_trak(whole.path, idx.embed(images[:2])["tracin"]), 3)
    np.testing.assert_array_equal(res.rows, order)
    np.testing.assert_allclose(res.scores, scores, rtol=1e-4, atol=1e-4 * np.abs(scores).max())


def test_trak_through_hnsw_keeps_recall(setup):
    """The transformed query goes to whatever index serves TracIn: HNSW here."""
    root, ckpts, _, _ = setup
    images = np.random.default_rng(11).random((80, 1, 8, 8), dtype=np.float32)
    idx = _build(ckpts, images, root / "hnsw", index="hnsw", target_recall=0.95)
    assert idx.manifest["indexes"]["tracin"]["kind"] == "hnsw"
    assert idx.manifest["indexes"]["retrac"]["kind"] == "hnsw"
    q = queries(n=20, seed=12)
    for method, rows in (("trak", "tracin"), ("retrak", "retrac")):
        approx = idx.search(q, k=10, method=method).rows
        exact = top_k(dense_trak(idx.path, q, rows=rows), 10)[1]
        recall = np.mean([len(set(a) & set(e)) / 10 for a, e in zip(approx, exact, strict=True)])
        assert recall >= 0.95, (method, recall)


def test_build_stopped_before_the_kernel_resumes_to_a_consistent_one(setup, tmp_path, monkeypatch):
    import gradindex.build.write

    root, ckpts, images, whole = setup
    real = gradindex.build.write.write_kernel

    def stop(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(gradindex.build.write, "write_kernel", stop)
    with pytest.raises(KeyboardInterrupt):
        _build(ckpts, images, tmp_path / "idx")
    assert not (tmp_path / "idx" / "manifest.json").exists()
    monkeypatch.setattr(gradindex.build.write, "write_kernel", real)
    idx = _build(ckpts, images, tmp_path / "idx", resume=True)
    want = form_gram(idx.path)
    np.testing.assert_allclose(stored_gram(idx.path), want, atol=1e-6 * np.abs(want).max())
    assert idx.manifest["kernel"]["rows"] == 9
    assert run("info", idx.path, "--verify").exit_code == 0


def test_a_kernel_of_another_build_is_refused(setup, tmp_path):
    """kernel.h5 copied from another index (checksums re-recorded): build id checked on use."""
    other = tmp_path / "other"
    shutil.copytree(setup[3].path, other)
    with h5py.File(other / "kernel.h5", "r+") as f:
        f.attrs["build_id"] = "0" * 32
    manifest = json.loads((other / "manifest.json").read_text())
    size = (other / "kernel.h5").stat().st_size
    manifest["files"]["kernel.h5"] = {"bytes": size, "sha256": "x"}
    (other / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(gi.IndexStateError, match="build id 0+ but the manifest"):
        gi.AttributionIndex.open(other).search(queries(), k=2, method="trak")


def test_identity_projection_gets_no_kernel_and_says_why(setup, tmp_path):
    """d = every parameter (~30k): a 30k x 30k Gram per checkpoint is refused, not attempted."""
    ckpts, images = setup[1], setup[2]
    idx = gi.build_index(
        checkpoints=ckpts, data=images[:3], out=tmp_path / "id", progress=False,
        spec=gi.BuildSpec(projection="identity", timesteps=1, noise_draws=1), fidelity_sample=0,
    )  # fmt: skip
    d = idx.dim // 2
    assert d > 8192 and not (idx.path / "kernel.h5").exists()
    assert idx.manifest["kernel"]["skipped"].startswith(f"d = {d} per checkpoint > 8192")
    with pytest.raises(gi.IndexStateError, match="no kernel: d = "):
        idx.search(np.ones(idx.dim, dtype=np.float32), k=2, method="trak")
    res = run("kernel", idx.path)
    assert res.exit_code == 1 and "proj_dim <= 8192" in res.output
    assert any(
        line.startswith("kernel       none: d = ")
        for line in run("info", idx.path).stdout.splitlines()
    )
    assert run("info", idx.path, "--verify").exit_code == 0


def test_query_refuses_a_bad_lambda_before_embedding(setup, monkeypatch):
    idx = gi.AttributionIndex.open(setup[3].path)

    def no_embed(*args, **kwargs):
        raise AssertionError("embedded before the lambda was checked")

    monkeypatch.setattr(idx, "embed", no_embed)
    with pytest.raises(gi.SearchError, match="lambda=-1"):
        idx.query(setup[2][:1], k=2, method="trak", lam=-1)


@pytest.mark.parametrize("d", [16, 300])  # 300: the Lanczos branch for the top eigenvalue
def test_default_lambda_leaves_out_the_top_eigenvalue(d):
    """λ_c = 3 · (trace − top eigenvalue) / d, against numpy's full eigendecomposition; rows
    along one direction fall back to 3 · trace / d."""
    from gradindex.store.kernel import default_lambdas

    rng = np.random.default_rng(d)
    x = rng.standard_normal((40, d)) + 5 * rng.standard_normal(d)  # a dominant direction
    g = x.T @ x
    ev = np.linalg.eigvalsh(g)
    np.testing.assert_allclose(default_lambdas(g[None]), [3 * (ev.sum() - ev[-1]) / d], rtol=1e-8)
    one = np.outer(x[0], x[0])
    np.testing.assert_allclose(default_lambdas(one[None]), [3 * np.trace(one) / d], rtol=1e-8)


def test_square_loss_index_serves_dtrak_equal_to_a_dense_solve(setup, tmp_path):
    """D-TRAK is 'trak' on an index built with loss="square" (and 'retrak' its ReTrac rows'
    kernel): the same scores and top-k as a dense solve over its own rows, which differ from
    the mse index's."""
    root, ckpts, images, whole = setup
    square = gi.build_index(
        checkpoints=ckpts,
        data=images,
        out=tmp_path / "square",
        spec=dataclasses.replace(SPEC, loss="square"),
        progress=False,
        fidelity_sample=0,
    )
    assert not np.allclose(plain_rows(square.path), plain_rows(whole.path))
    q = queries(seed=8)
    for method, rows in (("trak", "tracin"), ("retrak", "retrac")):
        res = square.search(q, k=6, method=method)
        scores, order = top_k(dense_trak(square.path, q, rows=rows), 6)
        np.testing.assert_allclose(res.scores, scores, rtol=1e-4, atol=1e-4 * np.abs(scores).max())
        np.testing.assert_array_equal(res.rows, order)


def legacy_kernel(folder):
    """Rewrite ``folder``'s kernel.h5 as builds before session 8 did (format 1: dense float64
    Grams ``gram`` / ``gram_retrac``), its manifest record and size as they recorded them."""
    manifest = json.loads((folder / "manifest.json").read_text())
    with h5py.File(folder / "kernel.h5", "w") as f:
        for rows, name in (("tracin", "gram"), ("retrac", "gram_retrac")):
            f.create_dataset(name, data=plain_gram(folder, rows))
        f.attrs["rows"], f.attrs["build_id"] = 9, manifest["build_id"]
    for key in ("rank", "exact", "format"):
        manifest["kernel"].pop(key)
    manifest["files"]["kernel.h5"] = {"bytes": (folder / "kernel.h5").stat().st_size, "sha256": ""}
    (folder / "manifest.json").write_text(json.dumps(manifest))


def test_a_dense_kernel_of_an_older_build_is_served_and_converted(setup, tmp_path):
    """An index whose kernel.h5 holds dense Grams (format 1) answers trak / retrak as a dense
    solve; 'gradindex kernel' rewrites it as factors with the same answers."""
    old = tmp_path / "old"
    shutil.copytree(setup[3].path, old)
    legacy_kernel(old)
    q = queries(seed=4)
    for method, rows in (("trak", "tracin"), ("retrak", "retrac")):
        res = gi.AttributionIndex.open(old).search(q, k=5, method=method)
        scores, order = top_k(dense_trak(old, q, rows=rows), 5)
        np.testing.assert_array_equal(res.rows, order)
        np.testing.assert_allclose(res.scores, scores, rtol=1e-4, atol=1e-4 * np.abs(scores).max())
    assert run("kernel", old).exit_code == 0
    with h5py.File(old / "kernel.h5", "r") as f:
        assert f.attrs["format"] == 3 and "gram" not in f
    for method, rows in (("trak", "tracin"), ("retrak", "retrac")):
        res = gi.AttributionIndex.open(old).search(q, k=5, method=method)
        np.testing.assert_array_equal(res.rows, top_k(dense_trak(old, q, rows=rows), 5)[1])


@pytest.mark.parametrize("name", ["basis", "gram"])
def test_a_kernel_declaring_a_huge_shape_is_refused_before_reading(setup, tmp_path, name):
    """Issue 30 item 9: a kernel.h5 whose dataset declares a huge shape (never written, so the
    file stays small) is refused in one line naming 'gradindex kernel' (before: numpy tried to
    allocate it); tracin still answers and serve starts without the kernel methods."""
    from tests.serve_helpers import TestClient, create_app

    bad = tmp_path / "bad"
    shutil.copytree(setup[3].path, bad)
    with h5py.File(bad / "kernel.h5", "a") as f:
        for ds in list(f):
            del f[ds]
        f.create_dataset(name, shape=(2, 10**6, 10**6), dtype="f8")  # 14 TiB declared
        f.create_dataset(name + "_retrac" if name == "gram" else "basis_retrac",
                         shape=(2, D, 10**9), dtype="f4")  # fmt: skip
    manifest = json.loads((bad / "manifest.json").read_text())
    manifest["files"]["kernel.h5"] = {"bytes": (bad / "kernel.h5").stat().st_size, "sha256": ""}
    (bad / "manifest.json").write_text(json.dumps(manifest))
    idx = gi.AttributionIndex.open(bad)
    for method in ("trak", "retrak"):
        with pytest.raises(gi.IndexStateError, match=f"declares shape .*gradindex kernel {bad}$"):
            idx.search(queries(), k=2, method=method)
    np.save(tmp_path / "q.npy", queries(n=1))
    res = run("query", bad, tmp_path / "q.npy", "--vectors", "--method", "trak")
    assert res.exit_code == 1 and res.output.startswith("Error: ") and res.output.count("\n") == 1
    assert idx.search(queries(), k=2, method="tracin").rows.shape == (5, 2)
    home = TestClient(create_app(bad)).get("/").text
    assert 'id="trak-problem"' in home and "gradindex kernel" in home


def test_a_truncated_kernel_names_the_kernel_command_and_spares_other_methods(setup, tmp_path):
    """Issue 30: a truncated kernel.h5 said 'rebuild the index' and refused even 'retrac'
    queries, which never read it. Now tracin / retrac answer, the kernel methods name
    'gradindex kernel DIR', and that command repairs it."""
    bad = tmp_path / "bad"
    shutil.copytree(setup[3].path, bad)
    data = (bad / "kernel.h5").read_bytes()
    (bad / "kernel.h5").write_bytes(data[: len(data) // 2])
    idx = gi.AttributionIndex.open(bad)
    q = queries()
    want = setup[3].search(q, k=3, method="retrac")
    np.testing.assert_array_equal(idx.search(q, k=3, method="retrac").rows, want.rows)
    with pytest.raises(gi.IndexStateError, match=f"truncated.*gradindex kernel {bad}$") as err:
        idx.search(q, k=3, method="trak")
    assert "rebuild" not in str(err.value)
    np.save(tmp_path / "q.npy", q)
    res = run("query", bad, tmp_path / "q.npy", "--vectors", "--method", "retrac")
    assert res.exit_code == 0, res.output
    res = run("info", bad, "--verify")
    assert res.exit_code == 1 and f"gradindex kernel {bad}" in res.output
    assert run("kernel", bad).exit_code == 0
    res = gi.AttributionIndex.open(bad).search(q, k=3, method="trak")
    np.testing.assert_array_equal(res.rows, setup[3].search(q, k=3, method="trak").rows)


def test_a_kernel_with_a_flipped_byte_is_refused_naming_the_kernel_command(setup, tmp_path):
    """Session 14 probe: a byte flipped inside kernel.h5's factors (size unchanged) changed every
    trak score without a word. Now the kernel methods refuse it, naming 'gradindex kernel DIR'
    (which repairs it); tracin still answers."""
    bad = tmp_path / "bad"
    shutil.copytree(setup[3].path, bad)
    with h5py.File(bad / "kernel.h5", "r") as f:
        name = next(n for n in f if "basis" in n and not n.endswith("_retrac"))
        offset = f[name].id.get_offset()
    data = bytearray((bad / "kernel.h5").read_bytes())
    data[offset + 3] ^= 0x40  # the first float's exponent
    (bad / "kernel.h5").write_bytes(bytes(data))
    idx = gi.AttributionIndex.open(bad)
    q = queries()
    with pytest.raises(
        gi.IndexStateError, match=f"kernel.h5: its checksum .*gradindex kernel {bad}$"
    ):
        idx.search(q, k=3, method="trak")
    want = setup[3].search(q, k=3, method="tracin").rows
    np.testing.assert_array_equal(idx.search(q, k=3, method="tracin").rows, want)
    assert run("kernel", bad).exit_code == 0
    res = gi.AttributionIndex.open(bad).search(q, k=3, method="trak")
    np.testing.assert_array_equal(res.rows, setup[3].search(q, k=3, method="trak").rows)


def test_kernel_command_on_a_folder_without_manifest_says_what_it_is(setup, tmp_path):
    """Session 14 probe: 'gradindex kernel DIR' (and 'factors') on an index whose manifest was
    deleted, or on a folder that is no index, said another process (its own pid) was building
    it. Now it says what the folder is."""
    lost = tmp_path / "lost"
    shutil.copytree(setup[3].path, lost)
    (lost / "manifest.json").unlink()
    (tmp_path / "plain").mkdir()
    for folder, says in ((lost, "no manifest.json (deleted?)"), (tmp_path / "plain", "not a")):
        for args in (("kernel", folder), ("factors", folder, "--data", tmp_path / "x.npy")):
            line = run(*args).output.splitlines()[-1]
            assert line.startswith(f"Error: {folder}: ") and says in line, line
            assert "pid" not in line, line


def decaying_rows(n, d, num_ckpts, seed=0):
    """Rows like projected gradients: a power-law spectrum in every checkpoint's block."""
    scale = np.tile(np.arange(1, d + 1) ** -1.0, num_ckpts)
    return (np.random.default_rng(seed).standard_normal((n, num_ckpts * d)) * scale).astype(
        np.float32
    )


@pytest.mark.parametrize("n", [30, 90])  # the dual (N <= d) and the Gram (N > d)
def test_truncated_factors_are_the_top_eigenpairs_and_the_left_out_mean(n, monkeypatch):
    """Past the rank cap the kernel keeps the top r eigenpairs of G_c and replaces the others
    by their mean μ: (G + λI)⁻¹ ≈ U diag(1/(Λ+λ)) Uᵀ + (I − UUᵀ)/(λ + μ) on the rows' span.
    Against numpy's full eigh of the Gram; with the subspace-iteration path (EIGH_MAX lowered)
    too."""
    from gradindex.store import kernel_factors
    from gradindex.store.kernel import Kernel, lambda_rule

    d, r, weights = 48, 12, (1.0, 2.0)
    x = decaying_rows(n, d, 2)
    q = np.random.default_rng(1).standard_normal((3, 2 * d)).astype(np.float32)
    for eigh_max in (4096, 8):
        monkeypatch.setattr(kernel_factors, "EIGH_MAX", eigh_max)
        fac = kernel_factors.row_set_factors(x, np.arange(n), weights, d, (r, r))
        assert fac.basis.shape == (2, d, r) and not fac.exact
        lams = [lambda_rule(t, top, d) for t, top in zip(fac.trace, fac.top, strict=True)]
        got = Kernel(fac.basis, fac.eigenvalues, fac.tail, lams).transform(q) @ x.T
        want = np.zeros((3, n))
        for c, w in enumerate(weights):
            phi = x[:, c * d : (c + 1) * d].astype(np.float64) / np.sqrt(w)
            ev, vec = np.linalg.eigh(phi.T @ phi)
            ev, vec = ev[::-1], vec[:, ::-1]
            lam = 3 * (ev.sum() - ev[0]) / d
            np.testing.assert_allclose(lams[c], lam, rtol=1e-6)
            np.testing.assert_allclose(fac.eigenvalues[c], ev[:r], rtol=1e-6)
            mu = ev[r : min(n, d)].mean()
            np.testing.assert_allclose(fac.tail[c], mu, rtol=1e-6)
            u = vec[:, :r]
            qc = q[:, c * d : (c + 1) * d].astype(np.float64)
            qt = (qc @ u / (ev[:r] + lam)) @ u.T + (qc - qc @ u @ u.T) / (lam + mu)
            want += qt @ phi.T * np.sqrt(w)
        np.testing.assert_allclose(got, want, atol=1e-5 * np.abs(want).max())


def test_rank_bounds_keep_the_transform_under_half_a_scan_and_64_mib():
    from gradindex.store.kernel_factors import rank_bounds

    assert rank_bounds(9, 16, 2)[0] >= 9  # a small kernel is always exact
    assert rank_bounds(1797, 4096, 3) == (1797 // 4, 640)  # C·d·r·4 x 2 <= 1/2 a scan
    floor, cap = rank_bounds(10**6, 4096, 3)
    assert floor == cap and 2 * 3 * 4096 * cap * 4 <= 64 * 2**20  # both row sets


def test_eigenvalues_above_a_share_of_lambda_are_kept_past_the_floor():
    """Between the floor and the cap, every eigenvalue above KEEP_ABOVE · λ is kept (a flat
    spectrum keeps more than N / 4), against numpy's eigvalsh of the Gram."""
    from gradindex.store import kernel_factors as kf

    n, d = 200, 64
    x = np.random.default_rng(3).standard_normal((n, d)).astype(np.float32)  # flat spectrum
    fac = kf.row_set_factors(x, np.arange(n), [1.0], d, (8, 60))
    ev = np.linalg.eigvalsh(x.astype(np.float64).T @ x)[::-1]
    lam = 3 * (ev.sum() - ev[0]) / d
    want = min(60, max(8, int(np.sum(ev > kf.KEEP_ABOVE * lam))))
    assert fac.basis.shape[-1] == want > 8


def test_a_kernel_dataset_stored_outside_the_file_is_refused(setup, tmp_path):
    """basis as an external link to another file (or a group): refused in one line before
    anything is read from it; tracin still answers."""
    bad = tmp_path / "bad"
    shutil.copytree(setup[3].path, bad)
    name = basis_name(bad)
    with h5py.File(bad / "kernel.h5", "a") as f:
        data = f[name][()]
        del f[name], f[f"{name}_retrac"]
        f[f"{name}_retrac"] = h5py.ExternalLink(str(tmp_path / "outside.h5"), "b")
        f.create_group(name)
    with h5py.File(tmp_path / "outside.h5", "w") as g:
        g["b"] = data
    manifest = json.loads((bad / "manifest.json").read_text())
    manifest["files"]["kernel.h5"] = {"bytes": (bad / "kernel.h5").stat().st_size, "sha256": ""}
    (bad / "manifest.json").write_text(json.dumps(manifest))
    idx = gi.AttributionIndex.open(bad)
    for method, which in (("trak", name), ("retrak", f"{name}_retrac")):
        with pytest.raises(gi.IndexStateError, match=f"{which} is not a dataset stored in the"):
            idx.search(queries(), k=2, method=method)
    assert idx.search(queries(), k=2, method="tracin").rows.shape == (5, 2)


def test_kernel_exact_keeps_every_eigenpair_where_the_default_truncates(
    setup, tmp_path, monkeypatch
):
    """With budgets small enough that the default keeps 2 eigenpairs, 'gradindex kernel
    --exact' keeps all 9 and trak equals the dense solve again."""
    from gradindex.store import kernel_factors

    monkeypatch.setattr(kernel_factors, "FREE_BYTES", 1)
    monkeypatch.setattr(kernel_factors, "MAX_DEFLATED", 0)  # the cap: float32 columns only
    monkeypatch.setattr(kernel_factors, "KERNEL_BYTES", 2 * 2 * 4 * 9 * 2)  # dual cap: 2 pairs
    folder = tmp_path / "idx"
    shutil.copytree(setup[3].path, folder)
    assert run("kernel", folder).exit_code == 0
    record = json.loads((folder / "manifest.json").read_text())["kernel"]
    assert record["rank"]["tracin"] == 2 and not record["exact"]["tracin"]
    res = run("kernel", folder, "--exact")
    assert res.exit_code == 0, res.output
    assert "trak rank 9 (exact), retrak rank 9 (exact)" in res.output
    q = queries(seed=2)
    for method, rows in (("trak", "tracin"), ("retrak", "retrac")):
        res = gi.AttributionIndex.open(folder).search(q, k=4, method=method)
        scores, order = top_k(dense_trak(folder, q, rows=rows), 4)
        np.testing.assert_array_equal(res.rows, order)
        np.testing.assert_allclose(res.scores, scores, rtol=1e-4, atol=1e-4 * np.abs(scores).max())
