"""Row ranges of one process's share of a dataset: shard i of n owns rows [i·N//n, (i+1)·N//n)
in dataset order (disjoint, contiguous, covering every row once), for ``--shard`` and torchrun."""

from __future__ import annotations

from typing import Any

from gradindex.errors import SpecError


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
