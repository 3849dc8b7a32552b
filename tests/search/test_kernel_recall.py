"""Issue 30 item 2: 'trak' / 'retrak' search the TracIn / ReTrac index with transformed
queries; their recall through it is measured when the kernel is written, recorded per method,
shown by 'info', and a method that misses the target searches exactly."""

from __future__ import annotations

import faiss
import numpy as np
import pytest
from click.testing import CliRunner
from diffusers import DDPMPipeline

import gradindex as gi
import gradindex.build.write as gbuild
from gradindex.cli.main import main
from gradindex.search.kernel_recall import recall_queries
from gradindex.store.vectors import VectorStore
from tests.conftest import scheduler, tiny_unet

N, C, D = 3000, 2, 16  # rows, checkpoints, d per checkpoint


def synthetic_rows(seed=0):
    """Clustered rows with a decaying spectrum; TracIn rows with heavy-tailed norms, ReTrac
    rows with unit checkpoint blocks (as the build makes them)."""
    rng = np.random.default_rng(seed)
    scale = np.arange(1, C * D + 1) ** -1.0
    centers = rng.standard_normal((64, C * D)) * scale
    x = centers[rng.integers(0, 64, N)] + 0.3 * rng.standard_normal((N, C * D)) * scale
    tracin = (x * rng.lognormal(0, 1.5, N)[:, None]).astype(np.float32)
    retrac = x.reshape(N, C, D) / np.linalg.norm(x.reshape(N, C, D), axis=2, keepdims=True)
    return tracin, retrac.reshape(N, C * D).astype(np.float32)


@pytest.fixture(scope="module")
def hnsw_index(tmp_path_factory):
    """A real build (HNSW, target recall 0.95) whose rows are synthetic: the featurizing step
    is replaced by a write of the rows, everything after it is the build's own."""
    root = tmp_path_factory.mktemp("krecall")
    ckpts = []
    for seed in (1, 2):
        DDPMPipeline(unet=tiny_unet(seed), scheduler=scheduler()).save_pretrained(root / f"c{seed}")
        ckpts.append(root / f"c{seed}")
    tracin, retrac = synthetic_rows()

    def fill(store, *args, **kwargs):
        norms = np.ones((N, C, store.file["norms"].shape[-1]))
        store.write_rows(0, tracin, retrac, norms, np.zeros(N, bool))

    real, gbuild._fill_rows = gbuild._fill_rows, fill
    try:
        spec = gi.BuildSpec(proj_dim=D, projection="sjlt", timesteps=2, noise_draws=1)
        return gi.build_index(
            checkpoints=ckpts, data=np.zeros((N, 1, 8, 8), np.float32), out=root / "idx",
            spec=spec, progress=False, fidelity_sample=0, index="hnsw", target_recall=0.95,
        )  # fmt: skip
    finally:
        gbuild._fill_rows = real


def dense_transform(x, q, weights):
    """(G_c + λ_c I)⁻¹ q_c per checkpoint by np.linalg.solve, λ by the documented rule."""
    out = np.empty(q.shape)
    for c, w in enumerate(weights):
        phi = x[:, c * D : (c + 1) * D].astype(np.float64) / np.sqrt(w)
        g = phi.T @ phi
        ev = np.linalg.eigvalsh(g)
        lam = 3 * (ev.sum() - ev[-1]) / D
        out[:, c * D : (c + 1) * D] = np.linalg.solve(
            g + lam * np.eye(D), q[:, c * D : (c + 1) * D].T
        ).T
    return out


@pytest.mark.parametrize(("method", "rows"), [("trak", "tracin"), ("retrak", "retrac")])
def test_recorded_kernel_recall_is_the_brute_force_recall_and_misses_mean_exact_search(
    hnsw_index, method, rows
):
    idx = hnsw_index
    meta = idx.manifest["indexes"][rows]
    assert meta["kind"] == "hnsw" and meta["recall_at_10"] >= 0.95
    with VectorStore.open(idx.path / "vectors.h5") as store:
        x = store.vectors(rows)
        q = recall_queries(store, np.arange(N), rows, idx.spec.seed)
    qt = dense_transform(x, q, [1.0, 1.0]).astype(np.float32)
    index = faiss.read_index(str(idx.path / f"{rows}.faiss"))
    faiss.downcast_index(index).hnsw.efSearch = meta["knobs"]["efSearch"]
    _, approx = index.search(qt, 10)
    exact = np.sort(qt.astype(np.float64) @ x.T.astype(np.float64), axis=1)[:, ::-1][:, :10]
    found = np.einsum("bd,bkd->bk", qt.astype(np.float64), x[approx].astype(np.float64))
    brute = float((found >= exact[:, -1:] - 1e-5 * np.abs(exact[:, :1])).mean())
    record = idx.manifest["kernel"]["search"][method]
    assert record["recall_at_10"] == pytest.approx(brute, abs=0.005)
    assert brute < meta["recall_at_10"] - 0.05  # the case of the issue: tuned for other queries
    assert record["recall_at_10"] >= 0.95 or record["exact_search"]
    # and then searches are exact: the brute-force top 10 of dense-solve scores
    res = idx.search(q[:50], k=10, method=method)
    want = np.argsort(-(qt[:50].astype(np.float64) @ x.T.astype(np.float64)), axis=1)[:, :10]
    assert np.mean([len(set(a) & set(b)) for a, b in zip(res.rows, want, strict=True)]) >= 9.9
    info = CliRunner().invoke(main, ["info", str(idx.path)]).stdout
    line = next(x for x in info.splitlines() if x.startswith("kernel search"))
    assert f"{method}: recall@10 {record['recall_at_10']:.3f} (target 0.95), exact search" in line


def test_a_flat_index_records_exact_kernel_search(tmp_path):
    from tests.store.test_kernel import SPEC

    ckpt = tmp_path / "c"
    DDPMPipeline(unet=tiny_unet(1), scheduler=scheduler()).save_pretrained(ckpt)
    images = np.random.default_rng(0).random((6, 1, 8, 8), dtype=np.float32)
    spec = gi.BuildSpec(**{**SPEC.to_dict(), "checkpoint_weights": None})
    idx = gi.build_index(checkpoints=[ckpt], data=images, out=tmp_path / "i", spec=spec,
                         progress=False, fidelity_sample=0)  # fmt: skip
    for method in ("trak", "retrak"):
        record = idx.manifest["kernel"]["search"][method]
        assert record["recall_at_10"] == 1.0 and record["exact_search"]
