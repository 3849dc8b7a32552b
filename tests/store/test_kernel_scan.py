"""The dual kernel's scan: X_c q_c from float32 rows, summed in float64 by both of its paths (the
compiled loop and the widened BLAS product), against numpy's float64 product."""

from __future__ import annotations

import numpy as np
import pytest

from gradindex.store import kernel_scan
from gradindex.store.kernel_scan import FUSED_MAX_QUERIES, fused_scan, scan_float64


def rows_and_queries(n: int, num_ckpts: int, d: int, b: int):
    """Rows with one large common direction (so float32 sums round far above float64's), and
    queries near them."""
    rng = np.random.default_rng(n + d + b)
    common = rng.standard_normal(num_ckpts * d)
    x = (rng.standard_normal((n, num_ckpts * d)) + 30 * common).astype(np.float32)
    q = (x[:b] + 0.1 * rng.standard_normal((b, num_ckpts * d))).astype(np.float32)
    return x, q


def want(x: np.ndarray, q: np.ndarray, num_ckpts: int) -> np.ndarray:
    """[C, B, N] by numpy in float64 from the same float32 values."""
    d = x.shape[1] // num_ckpts
    x64, q64 = x.astype(np.float64), q.astype(np.float64)
    return np.stack([q64[:, c * d : (c + 1) * d] @ x64[:, c * d : (c + 1) * d].T
                     for c in range(num_ckpts)])  # fmt: skip


@pytest.mark.parametrize("compiled", [True, False], ids=["numba", "blas"])
@pytest.mark.parametrize("n,num_ckpts,d,b", [(1, 1, 7, 1), (13, 3, 64, 1), (10, 2, 300, 2),
                                             (9, 2, 40, 5), (4, 1, 4096, 1)])  # fmt: skip
def test_scan_sums_in_float64(monkeypatch, compiled, n, num_ckpts, d, b):
    if compiled and fused_scan() is None:
        pytest.skip("numba is not installed")
    if not compiled:
        monkeypatch.setattr(kernel_scan, "fused_scan", lambda: None)
    x, q = rows_and_queries(n, num_ckpts, d, b)
    expect = want(x, q, num_ckpts)
    got = scan_float64(x, q, num_ckpts)
    assert got.shape == (num_ckpts, b, n) and got.dtype == np.float64
    scale = np.abs(expect).max()
    # float64's rounding: ~1e-16 of the largest sum; a float32 sum misses by ~1e-7
    assert np.abs(got - expect).max() <= 1e-12 * scale
    f32 = np.stack([q[:, c * d : (c + 1) * d] @ x[:, c * d : (c + 1) * d].T
                    for c in range(num_ckpts)])  # fmt: skip
    if d >= 64:  # long sums: a float32 product would fail the bound above
        assert np.abs(f32 - expect).max() > 1e-12 * scale


def test_one_query_takes_the_compiled_loop_and_a_batch_the_blas_product(monkeypatch):
    """The compiled loop reads the rows once per query, so it serves only a few at once;
    it must be the path one query takes (it is the fast one)."""
    if fused_scan() is None:
        pytest.skip("numba is not installed")
    calls = []
    real = fused_scan()

    def spy(x, q, out):
        calls.append(q.shape[0])
        real(x, q, out)

    monkeypatch.setattr(kernel_scan, "fused_scan", lambda: spy)
    x, q = rows_and_queries(8, 2, 32, FUSED_MAX_QUERIES + 3)
    scan_float64(x, q[:1], 2)
    scan_float64(x, q, 2)
    assert calls == [1]


def test_rows_that_are_not_contiguous_float32_take_the_blas_product(monkeypatch):
    x, q = rows_and_queries(12, 2, 16, 1)
    strided = np.asfortranarray(x)
    np.testing.assert_allclose(scan_float64(strided, q, 2), want(x, q, 2), rtol=1e-12)
