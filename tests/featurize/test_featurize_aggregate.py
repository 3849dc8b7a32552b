"""featurize/aggregate.py and featurize/scratch.py against a plain per-sample loop."""

from __future__ import annotations

import torch

from gradindex.featurize.aggregate import accumulate, norm_over_blocks
from gradindex.featurize.scratch import Scratch


def test_accumulate_equals_a_loop_over_samples_draws_and_blocks():
    """acc[b, r, a:a+n] = Σ_m Σ_k coef[b, r, k] g[k, b, m, :] per block, added on later calls."""
    gen = torch.Generator().manual_seed(0)
    B, k, M, widths = 3, 4, 2, (5, 7)
    blocks, offset = [], 0
    for n in widths:
        blocks.append((offset, torch.randn(k, B, M, n, generator=gen)))
        offset += n
    coef = torch.randn(B, 2, k, generator=gen)
    acc = torch.full((B, 2, offset), float("nan"))  # 'first' never reads what is there
    accumulate(acc, blocks, coef, first=True)
    want = torch.zeros(B, 2, offset, dtype=torch.float64)
    for b in range(B):
        for r in range(2):
            for a, g in blocks:
                for m in range(M):
                    for kk in range(k):
                        want[b, r, a : a + g.shape[-1]] += coef[b, r, kk] * g[kk, b, m].double()
    torch.testing.assert_close(acc.double(), want, rtol=1e-5, atol=1e-5)
    accumulate(acc, blocks, coef, first=False)
    torch.testing.assert_close(acc.double(), 2 * want, rtol=1e-5, atol=1e-5)


def test_norm_over_blocks_is_the_norm_of_the_concatenation():
    gen = torch.Generator().manual_seed(1)
    blocks = [torch.randn(3, 2, n, generator=gen) for n in (1, 6, 4)]
    want = torch.cat(blocks, dim=-1).double().norm(dim=-1)
    torch.testing.assert_close(norm_over_blocks(blocks).double(), want, rtol=1e-6, atol=0)


def test_scratch_reuses_a_buffer_until_it_must_grow():
    s = Scratch()
    a = s.get("x", (2, 3), torch.device("cpu"))
    assert a.shape == (2, 3) and a.dtype == torch.float32 and a.is_contiguous()
    b = s.get("x", (3, 2), "cpu")
    assert b.data_ptr() == a.data_ptr()  # the same memory, another view
    c = s.get("y", (2, 3), "cpu")
    assert c.data_ptr() != a.data_ptr()  # names are separate buffers
    big = s.get("x", (100,), "cpu")
    assert big.numel() == 100
    assert s.get("x", (4,), "cpu").data_ptr() == big.data_ptr()  # never shrunk
    s.clear()
    assert s._buffers == {}
