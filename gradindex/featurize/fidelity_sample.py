"""The fidelity check's sample: which rows, and their full-space features kept from the build.

A build measures its projection fidelity on S sampled rows (``gradindex.featurize.fidelity``).
Against exact scores that needs each sampled row's full-space TracIn and ReTrac features
a_c, r_c [p] at every checkpoint. On the full featurize path the build computes exactly these
for every row before projecting them, so a small build (where featurizing the sample again
would be a large share of it) keeps the sample's copies as its batches go by instead: the
sample is drawn before featurizing, from all N rows, with the same seed and rule as after it
(``draw_sample``), so with no flagged row both draws are the same rows.

Holds ``draw_sample`` and ``HeldSample`` (the kept features; ``Embedder.embed`` hands each
batch's features to ``HeldSample.take``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


def draw_sample(seed: int, candidates: np.ndarray, sample: int) -> np.ndarray:
    """The sorted rows to measure on: ``sample`` of ``candidates`` (all of them when fewer),
    drawn with the spec's seed (the same rows for the same candidates)."""
    gen = np.random.default_rng(np.random.SeedSequence([int(seed), 0xF1DE]))
    return np.sort(gen.choice(candidates, min(sample, len(candidates)), replace=False))


@dataclass
class HeldSample:
    """Full-space features of the sample's ``rows``, filled batch by batch by the build:
    tracin / retrac [C, S, p] float32 in host memory (unweighted a_c, r_c), ``filled`` [C, S]."""

    rows: np.ndarray  # [S] sorted row numbers
    tracin: torch.Tensor  # [C, S, p]
    retrac: torch.Tensor  # [C, S, p]
    filled: np.ndarray  # [C, S] bool

    @classmethod
    def empty(cls, rows: np.ndarray, checkpoints: int, num_params: int) -> HeldSample:
        shape = (checkpoints, len(rows), num_params)
        return cls(rows, torch.empty(shape), torch.empty(shape), np.zeros(shape[:2], bool))

    @staticmethod
    def nbytes(checkpoints: int, rows: int, num_params: int) -> int:
        """Memory of both feature arrays."""
        return 2 * checkpoints * rows * num_params * 4

    def take(self, start: int, checkpoint: int, tracin: torch.Tensor, retrac: torch.Tensor) -> None:
        """Copy the sample's rows out of checkpoint ``checkpoint``'s features [B, p] of the
        batch of rows start .. start + B (views of a reused buffer: copied now)."""
        lo, hi = np.searchsorted(self.rows, [start, start + len(tracin)])
        if lo == hi:
            return
        at = torch.as_tensor(self.rows[lo:hi] - start, device=tracin.device)
        for held, features in ((self.tracin, tracin), (self.retrac, retrac)):
            if features.device == held.device and features.dtype == held.dtype:
                torch.index_select(features, 0, at, out=held[checkpoint, lo:hi])  # one copy
            else:
                held[checkpoint, lo:hi] = features[at].to(held)
        self.filled[checkpoint, lo:hi] = True

    def covers(self, rows: np.ndarray) -> bool:
        """Whether these are the held rows and every checkpoint's features were kept (not so
        when a flagged row changed the draw, or a resumed build featurized only some rows)."""
        return np.array_equal(rows, self.rows) and bool(self.filled.all())
