"""Kernel-side limits that a kernel's scores alone do not show: the widest d that still gets a
kernel, and a dual kernel left alone when its search index holds other rows."""

from __future__ import annotations

import numpy as np
import pytest

from gradindex.search.faiss_index import VectorIndex
from gradindex.search.kernel_recall import share_rows
from gradindex.store.kernel import MAX_KERNEL_DIM, too_wide
from gradindex.store.kernel_dual import DualKernel


def test_a_kernel_is_made_up_to_max_kernel_dim_columns_per_checkpoint():
    assert MAX_KERNEL_DIM == 8192
    assert too_wide(8192) is None
    assert too_wide(1) is None
    why = too_wide(8193)
    assert why is not None and "8193" in why and "proj_dim <= 8192" in why


def _dual(n: int, d: int) -> tuple[DualKernel, np.ndarray]:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((n, d)).astype(np.float32)
    s, v = np.linalg.eigh(x.astype(np.float64) @ x.T.astype(np.float64))
    return DualKernel(x, v[None].astype(np.float32), s[None], np.zeros(1), [0.5], [1.0]), x


def test_share_rows_leaves_a_dual_kernel_alone_when_the_index_holds_other_rows():
    kern, x = _dual(6, 10)
    q = np.random.default_rng(1).standard_normal((2, 10)).astype(np.float32)
    want = kern.scores(q)
    other = VectorIndex.build(np.ones((7, 10), np.float32), "tracin", kind="flat")
    assert share_rows(kern, other) is kern  # 7 rows, not the kernel's 6: not used, no error
    np.testing.assert_array_equal(kern.all_rows(), x)
    same = VectorIndex.build(x, "tracin", kind="flat")
    share_rows(kern, same)
    assert kern.all_rows() is not x and np.shares_memory(kern.all_rows(), same.flat_rows())
    np.testing.assert_allclose(kern.scores(q), want, rtol=1e-6)


def test_a_dual_kernel_refuses_rows_that_are_not_float32():
    kern, x = _dual(6, 10)
    with pytest.raises(ValueError, match="are not this kernel's kept rows"):
        kern.use_rows(x.astype(np.float64))
    with pytest.raises(ValueError, match="are not this kernel's kept rows"):
        kern.use_rows(x[:5])
