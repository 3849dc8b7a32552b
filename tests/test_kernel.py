"""The kernel (per-checkpoint Gram of the TracIn rows) and method 'trak' served from it,
checked against dense numpy over the rows read back with plain h5py."""

from __future__ import annotations

import dataclasses
import json
import shutil

import h5py
import numpy as np
import pytest
from click.testing import CliRunner
from diffusers import DDPMPipeline

import gradindex as gi
from gradindex.cli import main
from gradindex.scale.append import add_samples
from gradindex.scale.shards import merge_shards
from tests.conftest import scheduler, tiny_unet

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


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_gram_equals_rows_read_with_h5py(setup):
    whole = setup[3]
    with h5py.File(whole.path / "kernel.h5", "r") as f:
        gram, rows, build_id = f["gram"][()], int(f.attrs["rows"]), f.attrs["build_id"]
        gram_retrac = f["gram_retrac"][()]
    assert gram.dtype == np.float64 and gram.shape == (2, D, D)
    np.testing.assert_allclose(gram, plain_gram(whole.path), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(
        gram_retrac, plain_gram(whole.path, "retrac"), rtol=1e-10, atol=1e-12
    )
    assert rows == 9 and build_id == whole.manifest["build_id"]
    record = whole.manifest["kernel"]
    for key, rows in (("lambda", "tracin"), ("lambda_retrac", "retrac")):
        np.testing.assert_allclose(
            record[key], default_lams(plain_gram(whole.path, rows)), rtol=1e-8
        )
    assert record["rows"] == 9 and "kernel.h5" in whole.manifest["files"]


def test_trak_scores_equal_dense_solve_with_fewer_rows_than_dims(setup):
    whole = setup[3]
    q = queries()
    res = whole.search(q, k=4, method="trak")
    scores, order = top_k(dense_trak(whole.path, q), 4)
    np.testing.assert_allclose(res.scores, scores, rtol=1e-4, atol=1e-4 * np.abs(scores).max())
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
    scores, order = top_k(dense_trak(whole.path, q, lams), 9)
    np.testing.assert_allclose(res.scores, scores, rtol=1e-4, atol=1e-4 * np.abs(scores).max())
    np.testing.assert_array_equal(res.rows, order)


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
    with h5py.File(old / "kernel.h5", "r") as f:
        np.testing.assert_allclose(f["gram"][()], plain_gram(old), rtol=1e-10, atol=1e-12)
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


def shard_gram(folder, rows="tracin"):
    with h5py.File(folder / "kernel.h5", "r") as f:
        return f["gram" if rows == "tracin" else f"gram_{rows}"][()]


def test_merge_sums_the_shards_grams_without_reading_rows(setup, shards, tmp_path, monkeypatch):
    import gradindex.index.kernel

    def no_pass(*args, **kwargs):
        raise AssertionError("the merge recomputed the Gram from the rows")

    monkeypatch.setattr(gradindex.index.kernel, "gram_from_store", no_pass)
    merged = merge_shards(tmp_path / "merged", shards)
    for rows in ("tracin", "retrac"):
        want = shard_gram(shards[0], rows) + shard_gram(shards[1], rows)
        np.testing.assert_allclose(shard_gram(merged.path, rows), want, rtol=1e-12, atol=0)
        np.testing.assert_allclose(
            shard_gram(merged.path, rows), plain_gram(merged.path, rows), rtol=1e-10
        )
    assert merged.manifest["kernel"]["rows"] == 9


def test_merge_with_a_shard_without_kernel_makes_one_pass(shards, tmp_path):
    old = tmp_path / "old1"
    shutil.copytree(shards[1], old)
    strip_kernel(old)
    merged = merge_shards(tmp_path / "merged", [shards[0], old])
    for rows in ("tracin", "retrac"):
        np.testing.assert_allclose(
            shard_gram(merged.path, rows), plain_gram(merged.path, rows), rtol=1e-10
        )
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
            mine, one = shard_gram(idx.path, rows), shard_gram(whole.path, rows)
            # the rows themselves agree to float32 rounding across batchings (test_shards)
            np.testing.assert_allclose(mine, one, rtol=1e-5, atol=1e-6 * np.abs(one).max())
            np.testing.assert_allclose(mine, plain_gram(idx.path, rows), rtol=1e-10, atol=1e-12)
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
        del f["gram_retrac"]
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
    import gradindex.build_write

    root, ckpts, images, whole = setup
    real = gradindex.build_write.write_kernel

    def stop(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(gradindex.build_write, "write_kernel", stop)
    with pytest.raises(KeyboardInterrupt):
        _build(ckpts, images, tmp_path / "idx")
    assert not (tmp_path / "idx" / "manifest.json").exists()
    monkeypatch.setattr(gradindex.build_write, "write_kernel", real)
    idx = _build(ckpts, images, tmp_path / "idx", resume=True)
    np.testing.assert_allclose(shard_gram(idx.path), plain_gram(idx.path), rtol=1e-10)
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
    from gradindex.index.kernel import default_lambdas

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
