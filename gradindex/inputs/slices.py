"""Row ranges of one process's share of a dataset: shard i of n owns rows [i·N//n, (i+1)·N//n)
in dataset order (disjoint, contiguous, covering every row once), for ``--shard`` and torchrun;
and ``data_digest``, which tells merge whether its shards were cut from one data set in one
order (a row range names other images in another order)."""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np

from gradindex.errors import DataError, SpecError

SAMPLED_ROWS = 64  # rows whose pixels the digest reads, at seeded positions over the data set


def parse_shard(text: str) -> tuple[int, int]:
    """``"i/n"`` → (i, n) with 0 <= i < n, or a SpecError saying what is wrong."""
    parts = str(text).split("/")
    try:
        i, n = (int(p) for p in parts) if len(parts) == 2 else (None, None)
    except ValueError:
        i = n = None
    if i is None or n is None:
        raise SpecError(f"--shard {text!r}: write it as i/n, e.g. 0/4 for the first of four")
    check_shard((i, n))
    return i, n


def check_shard(shard: Any) -> tuple[int, int]:
    """A validated (i, n) pair."""
    try:
        i, n = (int(v) for v in shard)
    except (TypeError, ValueError):
        raise SpecError(f"shard={shard!r}: give a pair (i, n), e.g. (0, 4)") from None
    if n < 1 or not 0 <= i < n:
        raise SpecError(f"shard {i}/{n}: need n >= 1 and 0 <= i < n (shards are numbered from 0)")
    return i, n


def shard_rows(shard: tuple[int, int], num_rows: int) -> tuple[int, int]:
    """(start, stop) of shard i of n over ``num_rows`` rows; refused when it would be empty."""
    i, n = check_shard(shard)
    if n > num_rows:
        raise SpecError(
            f"shard {i}/{n}: the dataset has only {num_rows} rows, so some shards would be "
            f"empty; use at most {num_rows} shards"
        )
    return i * num_rows // n, (i + 1) * num_rows // n


def digest_rows(n: int) -> np.ndarray:
    """The rows of an n-row data set whose pixels ``data_digest`` reads, sorted."""
    picked = np.random.default_rng(0).choice(n, min(n, SAMPLED_ROWS), replace=False)
    return np.unique(np.concatenate([[0, n - 1], picked]))


def data_digest(images: Any, ids: np.ndarray) -> str:
    """sha256 of a whole data set's row count, ids and the pixels of ``SAMPLED_ROWS`` rows at
    seeded positions (first and last included): the same for every shard cut from the same data
    in the same order; another order or other data gives another (integer ids are row numbers,
    so the pixels tell the order). ``images``: a source indexable by an array of rows; only the
    sampled rows are read, so a shard of a huge data set still reads just its own rows."""
    n = len(images)
    ids = np.ascontiguousarray(ids)
    h = hashlib.sha256(f"{n}:{ids.dtype.str}:{ids.shape}".encode())
    h.update(ids.tobytes() if ids.dtype.kind != "O" else "\0".join(map(str, ids)).encode())
    for row in digest_rows(n):
        try:
            pixels = np.ascontiguousarray(images[np.array([row])])
            h.update(f"{row}:{pixels.dtype.str}:{pixels.shape}".encode() + pixels.tobytes())
        except DataError as exc:  # that row's shard stops on it; every shard hashes the same
            h.update(f"{row}:{exc}".encode())
    return h.hexdigest()[:16]
