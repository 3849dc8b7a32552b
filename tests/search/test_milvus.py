"""Milvus backend (against Milvus Lite): an export answers the same top-10 as FAISS exact search
and numpy brute force, for both methods, through the Python API and the CLI; bad input gets one
'Error:' line."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest

import gradindex as gi
from gradindex.errors import MilvusError
from tests.conftest import run, scheduler, tiny_unet

pytest.importorskip("pymilvus")
pytest.importorskip("milvus_lite")

from gradindex.search.milvus import MilvusBackend  # noqa: E402
from gradindex.search.milvus_client import pymilvus_module  # noqa: E402
from gradindex.search.milvus_export import export_index  # noqa: E402

N, K = 360, 10


def _error_line(res):
    lines = [ln for ln in res.output.splitlines() if ln.startswith("Error:")]
    assert res.exit_code == 1, res.output
    assert len(lines) == 1, res.output
    return lines[0]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """A real index over N noise images of very different amplitudes, two checkpoints (w 1, 3),
    and its export to a Milvus Lite file."""
    rng = np.random.default_rng(0)
    amp = np.exp(1.5 * rng.standard_normal((N, 1, 1, 1)))
    images = np.clip(0.5 + 0.3 * amp * rng.standard_normal((N, 1, 8, 8)), 0, 1).astype(np.float32)
    spec = gi.BuildSpec(
        proj_dim=24,
        projection="sjlt",
        timesteps=2,
        noise_draws=1,
        batch_size=60,
        checkpoint_weights=(1.0, 3.0),
    )
    root = tmp_path_factory.mktemp("milvus")
    idx = gi.build_index(
        checkpoints=[(tiny_unet(1), scheduler()), (tiny_unet(2), scheduler())],
        data=images,
        out=root / "idx",
        spec=spec,
        ids=[f"img{i:04d}.png" for i in range(N)],  # string ids travel into the collections
        progress=False,
    )
    uri = root / "lite.db"
    rec = export_index(idx.path, str(uri), progress=False)
    return idx, uri, rec


def _queries(idx, method, rng):
    """Random directions plus perturbed training rows: [12, D]."""
    x = idx.vectors(method)
    rand = rng.standard_normal((6, idx.dim)).astype(np.float32)
    near = x[rng.choice(len(x), 6, replace=False)] + 0.5 * rand * np.linalg.norm(x, axis=1).mean()
    return np.concatenate([rand, near / np.sqrt(idx.dim)]).astype(np.float32)


def _brute_force(x, q, k):
    s = q @ x.T  # [B, N]
    order = np.argsort(-s, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(s, order, 1), order


@pytest.mark.parametrize("method", ["tracin", "retrac"])
def test_export_answers_the_same_top10_as_faiss_exact(built, method):
    idx, uri, rec = built
    coll = rec["collections"][method]
    assert coll["rows"] == N and coll["recall_at_10"] == 1.0
    assert coll["metric"] == {"tracin": "IP", "retrac": "COSINE"}[method]
    served = gi.AttributionIndex.open(idx.path, milvus=str(uri))
    q = _queries(idx, method, np.random.default_rng(1))
    got = served.search(q, K, method)
    faiss = idx.search(q, K, method, exact=True)
    x = idx.vectors(method)
    ref_scores, ref_rows = _brute_force(x, q, K)
    np.testing.assert_array_equal(got.rows, faiss.rows)
    np.testing.assert_array_equal(got.rows, ref_rows)
    np.testing.assert_array_equal(got.ids, idx.ids[ref_rows])
    # ReTrac: Milvus's cosines scaled back to inner products, so scores match FAISS too
    np.testing.assert_allclose(got.scores, faiss.scores, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got.scores, ref_scores, rtol=1e-4, atol=1e-5)
    if method == "tracin":  # the test can tell IP from cosine: row norms vary enough
        norms = np.linalg.norm(x, axis=1)
        assert norms.max() / norms.min() > 1.5
        _, cos_rows = _brute_force(x / norms[:, None], q, K)
        assert (cos_rows != ref_rows).any()
    one = served.search(x[7], K, method)  # a single vector [D]
    np.testing.assert_array_equal(one.rows, idx.search(x[7], K, method).rows)
    if method == "retrac":  # a stored ReTrac row finds itself first (equal norms)
        assert one.rows[0, 0] == 7 and one.ids[0, 0] == "img0007.png"


@pytest.mark.parametrize("method", ["trak", "retrak"])
def test_kernel_methods_are_served_from_their_collections(built, method):
    """'trak' ('retrak') sends the kernel-transformed query to the TracIn (ReTrac) collection:
    same top-10 and scores as a dense solve over the stored rows (λ_c = 3 (trace(G_c) − top
    eigenvalue) / d, weights 1, 3)."""
    idx, uri, _ = built
    rows = "tracin" if method == "trak" else "retrac"
    served = gi.AttributionIndex.open(idx.path, milvus=str(uri))
    q = _queries(idx, rows, np.random.default_rng(4))
    got = served.search(q, K, method)
    x, d = idx.vectors(rows).astype(np.float64), idx.dim // 2
    ref = np.zeros((len(q), len(x)))
    for c, w in enumerate((1.0, 3.0)):
        xc, qc = x[:, c * d : (c + 1) * d], q[:, c * d : (c + 1) * d].astype(np.float64)
        gram = xc.T @ xc / w
        lam = 3 * (np.trace(gram) - np.linalg.eigvalsh(gram)[-1]) / d
        ref += w * (qc / np.sqrt(w)) @ np.linalg.solve(gram + lam * np.eye(d), (xc / np.sqrt(w)).T)
    order = np.argsort(-ref, axis=1, kind="stable")[:, :K]
    np.testing.assert_array_equal(got.rows, order)
    want = np.take_along_axis(ref, order, 1)
    np.testing.assert_allclose(got.scores, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


def test_backend_alone_returns_ids_from_the_collections(built):
    idx, uri, rec = built
    backend = MilvusBackend.connect(str(uri), rec["name"])
    q = _queries(idx, "retrac", np.random.default_rng(2))
    res = backend.search(q, K, "retrac")
    np.testing.assert_array_equal(res.ids, idx.ids[res.rows])
    with pytest.warns(UserWarning, match="exceeds the 360"):
        assert backend.search(q[:1], N + 5, "tracin").rows.shape == (1, N)
    with pytest.raises(gi.SearchError, match="must be a positive integer"):
        backend.search(q, 0, "tracin")
    with pytest.raises(gi.SearchError, match="dimension"):
        backend.search(q[:, :5], K, "tracin")
    backend.close()


def test_ivf_export_is_validated_and_exact_on_request(built):
    idx, uri, _ = built
    rec = export_index(idx.path, str(uri), name="ivf", kind="ivf", progress=False)
    backend = MilvusBackend.connect(str(uri), "ivf")
    for method in ("tracin", "retrac"):
        c = rec["collections"][method]
        assert c["kind"] == "ivf" and c["recall_at_10"] >= 0.9 and c["nprobe"] >= 1
        q = _queries(idx, method, np.random.default_rng(3))
        exact = backend.search(q, K, method, exact=True)
        np.testing.assert_array_equal(exact.rows, idx.search(q, K, method, exact=True).rows)
    backend.close()


def test_cli_export_and_query(built, tmp_path):
    idx, uri, _ = built
    res = run("export", idx.path, "--milvus", uri, "--name", "cli")
    assert res.exit_code == 0, res.output
    assert f"tracin -> cli_tracin in {uri}: {N} rows, IP on flat, recall@10 1.000" in res.output
    assert "retrac -> cli_retrac" in res.output and "COSINE on flat" in res.output
    vec_file = tmp_path / "q.npz"
    rng = np.random.default_rng(4)
    vecs = {m: _queries(idx, m, rng) for m in ("tracin", "retrac")}
    np.savez(vec_file, **vecs)
    args = ("query", idx.path, vec_file, "--vectors", "-k", K, "--json", "--milvus", uri)
    res = run(*args, "--milvus-name", "cli")
    assert res.exit_code == 0, res.output
    for line in res.output.splitlines():
        r = json.loads(line)
        want = idx.search(vecs[r["method"]][r["query"]], K, r["method"], exact=True)
        assert r["ids"] == want.ids[0].tolist()
    res = run("export", idx.path, "--milvus", uri, "--name", "cli", "--overwrite", "--json")
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["collections"]["retrac"]["collection"] == "cli_retrac"


def test_cli_bad_input(built, tmp_path):
    idx, uri, _ = built
    line = _error_line(run("export", idx.path, "--milvus", uri))
    assert line == (
        f"Error: collection idx_tracin already exists in {uri}; pass --overwrite to replace it"
    )
    assert "no such index folder" in _error_line(
        run("export", tmp_path / "none", "--milvus", tmp_path / "x.db")
    )
    line = _error_line(run("export", idx.path, "--milvus", tmp_path / "no" / "dir" / "x.db"))
    assert line.startswith("Error: cannot connect to Milvus at") and "not exist" in line
    line = _error_line(run("export", idx.path, "--milvus", "ftp://host/x"))
    assert line.startswith("Error: cannot connect to Milvus at ftp://host/x: uri")
    line = _error_line(run("export", idx.path, "--milvus", uri, "--name", "9 bad"))
    assert "collection name '9 bad'" in line
    q = tmp_path / "q.npy"
    np.save(q, np.zeros((1, idx.dim), np.float32))
    line = _error_line(
        run("query", idx.path, q, "--vectors", "--milvus", uri, "--milvus-name", "zz")
    )
    assert line.startswith(f"Error: no collection zz_tracin in {uri}; export the index first")
    res = run("query", idx.path, q, "--vectors", "--milvus-name", "zz")
    assert res.exit_code == 2 and "needs --milvus URI" in res.output


def test_a_stale_export_is_refused(built):
    idx, uri, rec = built
    backend = MilvusBackend.connect(str(uri), rec["name"])
    manifest = json.loads(json.dumps(idx.manifest))
    manifest["files"]["vectors.h5"]["sha256"] = "0" * 64  # as after 'gradindex add'
    with pytest.raises(MilvusError, match="exported from another build of this index"):
        backend.check_index(manifest, N)
    backend.close()


def test_missing_pymilvus_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "pymilvus", None)
    with pytest.raises(MilvusError, match=r'pip install "gradindex\[milvus\]"'):
        pymilvus_module()


def test_cli_query_influence_and_kernels_from_milvus_equal_faiss(tmp_path):
    """An index with factors and a primal kernel (N > d), exported: 'query --milvus --method
    influence / trak / retrak' of images answers the folder's FAISS query, and influence is a
    brute-force search of its own query rows over the stored TracIn rows."""
    from gradindex.query_influence import embed_influence

    ckpt = tmp_path / "c1"
    tiny_unet(1).save_pretrained(ckpt / "unet")
    scheduler().save_pretrained(ckpt / "scheduler")
    rng = np.random.default_rng(5)
    np.save(tmp_path / "train.npy", rng.random((40, 1, 8, 8), dtype=np.float32))
    np.save(tmp_path / "q.npy", rng.random((3, 1, 8, 8), dtype=np.float32))
    out, uri = tmp_path / "idx", tmp_path / "lite.db"
    spec = gi.BuildSpec(proj_dim=16, timesteps=2, noise_draws=1, data_range=(0.0, 1.0))
    with pytest.warns(UserWarning, match="fidelity"):  # 16 dims: below the fidelity bar
        gi.build_index(checkpoints=[str(ckpt)], data=str(tmp_path / "train.npy"), out=out,
                       spec=spec, progress=False)  # fmt: skip
    assert run("factors", out, "--data", tmp_path / "train.npy").exit_code == 0
    assert run("export", out, "--milvus", uri).exit_code == 0
    idx = gi.AttributionIndex.open(out)
    answers = {}
    for method in ("influence", "trak", "retrak"):
        args = ("query", out, tmp_path / "q.npy", "--method", method, "-k", 5, "--json")
        milvus, local = run(*args, "--milvus", uri), run(*args, "--exact")
        assert milvus.exit_code == 0 and local.exit_code == 0, milvus.output + local.output
        got, want = ([json.loads(ln) for ln in r.output.splitlines()] for r in (milvus, local))
        assert [r["rows"] for r in got] == [r["rows"] for r in want], method
        for g, w in zip(got, want, strict=True):
            np.testing.assert_allclose(g["scores"], w["scores"], rtol=1e-4, atol=1e-6)
        answers[method] = got
    assert idx.manifest["kernel"]["form"]["tracin"] == "primal"  # queries go to the collection
    q = embed_influence(idx, np.load(tmp_path / "q.npy")).astype(np.float64)
    scores, rows = _brute_force(idx.vectors("tracin").astype(np.float64), q, 5)
    assert [r["rows"] for r in answers["influence"]] == rows.tolist()
    np.testing.assert_allclose([r["scores"] for r in answers["influence"]], scores, rtol=1e-4)
