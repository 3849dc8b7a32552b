"""Method 'influence': EK-FAC influence functions served from a TracIn index.

    Score(q, z) = Σ_c w_c g_c(q)ᵀ (Ĝ_c + λI)⁻¹ g_c(z) ≈ ⟨q', x(z)⟩,
    q' = concat_c √w_c P_c (Ĝ_c + λI)⁻¹ g_c(q)

with Ĝ_c the EK-FAC GGN of checkpoint c (``gradindex.featurize.kfac``) and x(z) the stored
TracIn row: the query is preconditioned in full parameter space before projection, the
stored rows and their search index are TracIn's, unchanged. The factors are computed once
(``add_factors``: one pass over a sample of the training data per checkpoint and factor
pass, two passes in all) into the index folder (``gradindex.store.factors``).

Refused: a ``kronecker`` projection (its rows are projected inside the hooks, so there is no
full-space query gradient to precondition) and Adam-preconditioned indexes (the stored rows
are not plain gradients).
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gradindex.errors import IndexStateError, SearchError
from gradindex.featurize.gradients import GradientFeaturizer
from gradindex.featurize.kfac import DAMPING, check_damping, estimate_factors, influence_rows
from gradindex.spec import HOOK_PROJECTIONS
from gradindex.store.factors import load_factors, record_factors, write_factors

METHOD = "influence"


def check_influence_index(idx: Any) -> None:
    """Refuse the index kinds 'influence' cannot serve (before any embedding)."""
    if idx.spec.projection in HOOK_PROJECTIONS:
        raise SearchError(
            f"method 'influence' needs a full-space query gradient; the {idx.spec.projection} "
            "projection "
            "never forms one: build the index with projection='sjlt' (or gaussian / identity)"
        )
    if idx.spec.precondition != "none":
        raise SearchError(
            f"method 'influence' needs an index of plain gradients, not precondition="
            f"{idx.spec.precondition!r}"
        )


def add_factors(
    idx: Any,
    data: Any,
    *,
    samples: int | None = None,
    seed: int = 0,
    labels: Any = None,
    prompts: Any = None,
    data_range: tuple[float, float] | None = None,
) -> dict[str, Any]:
    """Estimate the EK-FAC factors of every checkpoint of the open index ``idx`` from the
    training images ``data`` (``samples``: a seeded random sample of them; all when None) and
    write them into its folder (factors.h5 + the manifest record). The caller holds the
    folder's writer lock (the CLI does). Returns the record."""
    check_influence_index(idx)
    started = time.perf_counter()
    x0 = idx.prepare(data, data_range)
    n = len(x0)
    if samples is not None:
        if not isinstance(samples, int) or samples <= 0:
            raise SearchError(f"samples={samples!r}: must be a positive integer")
        keep = np.sort(np.random.default_rng(seed).permutation(n)[: min(samples, n)])
        x0 = x0[torch.as_tensor(keep)] if isinstance(x0, torch.Tensor) else x0[keep]
        labels = _subset(labels, keep)
        prompts = _subset(prompts, keep)
    batches = list(idx.model_batches(x0, labels, prompts, idx.spec.batch_size))
    embedder = idx._get_embedder()
    factors = []
    for feat in embedder.featurizers:
        if not isinstance(feat, GradientFeaturizer):
            raise SearchError("method 'influence' cannot use a kronecker-projected index")
        factors.append(estimate_factors(feat, batches, seed))
    write_factors(idx.path, factors, idx.manifest.get("build_id"))
    record = {
        "kind": "ekfac",
        "curvature": "GGN of the MSE, sampled targets (one t, eps, xi draw per sample)",
        "samples": len(x0),
        "seed": seed,
        "damping_default": DAMPING,
        "factored_layers": len(factors[0].layers),
        "diagonal_parameters": len(factors[0].diag_slices),
        "seconds": time.perf_counter() - started,
    }
    record_factors(Path(idx.path), record)
    idx.manifest = {**idx.manifest, "factors": record}
    idx.__dict__.pop("_influence_factors", None)
    return record


def _subset(values: Any, keep: np.ndarray) -> Any:
    """One label / prompt per image kept; a single value for all stays as it is."""
    if values is None or np.ndim(values) == 0 or isinstance(values, str):
        return values
    return [values[int(i)] for i in keep]


def factors_of(idx: Any) -> list:
    """The index's factors, read on first use and cached on it."""
    cached = idx.__dict__.get("_influence_factors")
    if cached is None:
        cached = idx.__dict__["_influence_factors"] = load_factors(Path(idx.path), idx.manifest)
    return cached


def check_factors(idx: Any, damping: Any = None) -> None:
    """Refuse a missing / stale factor file or a bad damping now, before embedding."""
    check_influence_index(idx)
    factors_of(idx)
    if damping is not None:
        check_damping(damping)


def embed_influence(
    idx: Any,
    images: Any,
    damping: Any = None,
    batch_size: int | None = None,
    labels: Any = None,
    prompts: Any = None,
    data_range: tuple[float, float] | None = None,
) -> np.ndarray:
    """Test images → the 'influence' query rows [B, D] (float32) that search the TracIn
    index. ``damping``: λ_l / mean eigenvalue of each layer (default ``DAMPING``)."""
    check_factors(idx, damping)
    factors = factors_of(idx)
    x0 = idx.prepare(images, data_range)
    embedder = idx._get_embedder()
    bs = batch_size or idx.spec.batch_size
    rows = [
        influence_rows(embedder, factors, xb, cond, DAMPING if damping is None else damping)
        for xb, cond in idx.model_batches(x0, labels, prompts, bs)
    ]
    embedder.release()  # featurizing's work buffers, not held after the query is embedded
    out = np.concatenate(rows).astype(np.float32)
    if not np.isfinite(out).all():
        raise IndexStateError("the influence query rows are not finite; recompute the factors")
    return out


def influence_query(
    idx: Any,
    images: Any,
    k: int,
    exact: bool,
    labels: Any,
    prompts: Any,
    data_range: tuple[float, float] | None,
    damping: Any,
) -> Any:
    """``AttributionIndex.query`` for method 'influence': embed, then search the TracIn rows."""
    check_factors(idx, damping)
    q = embed_influence(idx, images, damping, None, labels, prompts, data_range)
    res = idx.search(q, k, METHOD, exact=exact)
    return dataclasses.replace(res, resized=idx.resized_from(images))
