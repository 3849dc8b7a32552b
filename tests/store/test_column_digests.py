"""store/columns.py's ids digests: the recorded byte format, worked out here with hashlib; a
reversed slice read (HDF5 reads only ascending ones) and checked against them."""

from __future__ import annotations

import hashlib

import h5py
import numpy as np
import pytest

from gradindex.errors import IndexStateError
from gradindex.store.columns import DIGEST_BLOCK, LazyColumn, block_digest, column_digests


def test_string_block_digest_is_the_nul_joined_utf8_and_the_count():
    want = hashlib.sha256("a\x00bé".encode() + (2).to_bytes(8, "little")).hexdigest()
    assert block_digest(np.array(["a", "bé"], dtype=object)) == want
    # the count tells an empty block from a block of one empty string
    assert block_digest(np.array([], dtype=object)) != block_digest(np.array([""], dtype=object))
    ints = np.array([1, -2], dtype=np.int32)
    assert block_digest(ints) == hashlib.sha256(ints.astype("<i8").tobytes()).hexdigest()


def test_a_reversed_read_checks_every_block_it_touches(tmp_path):
    path = tmp_path / "v.h5"
    with h5py.File(path, "w") as f:
        f["ids"] = np.arange(2 * DIGEST_BLOCK + 5, dtype=np.int64)
    digests = column_digests(path, "ids")
    assert len(digests) == 3
    col, want = LazyColumn(path, "ids", digests=digests), np.arange(2 * DIGEST_BLOCK + 5)
    for sel in (slice(None, None, -1), slice(-2, 3, -7), slice(10, 20, -1), slice(5, None, -2)):
        np.testing.assert_array_equal(col[sel], want[sel])
    with h5py.File(path, "r+") as f:
        f["ids"][3] = -1  # block 0 altered
    with pytest.raises(IndexStateError, match="differ from the manifest's digest"):
        LazyColumn(path, "ids", digests=digests)[::-1]
    with pytest.raises(IndexStateError, match="differ from the manifest's digest"):
        LazyColumn(path, "ids", digests=digests)[DIGEST_BLOCK + 1 : 2 : -1]
