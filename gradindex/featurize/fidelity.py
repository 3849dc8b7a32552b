"""How closely the stored (projected) rows rank like exact scores: measured by every build.

A random projection keeps inner products only up to an error ~ 1/√d, and whether that error
reorders a query's top results depends on the model and the data (on the demo digits, sjlt at
d = 4,096 gave TracIn a Spearman of 0.999 on a trained model but 0.949 on a barely trained one).
So each build measures its fidelity on a sample of its rows, records it in the manifest
(``info`` shows it), and warns with the ``--proj-dim`` that should reach the bar when below.

Holds ``agreement`` (shared with ``benchmarks/bench_attribution.py``),
``measure_fidelity`` (the build's record), ``hold_sample``, ``suggested_proj_dim``,
``format_fidelity``, ``check_sample``.

The sample: S rows (default 32) drawn with the spec's seed from the unflagged rows; each is a
query against the other S - 1, and agreement is averaged over the S queries (top-k with
k = min(10, (S - 1) // 2): among only S - 1 candidates the overlap is higher than among a whole
index, so the Spearman is the figure that carries over to any size).

The reference: exact full-space scores Σ_c w_c ⟨a_c, a_c'⟩ and Σ_c w_c cos(r_c, r_c') (DESIGN
§1) when two [S, p] float32 matrices fit in ``FULL_SPACE_BUDGET``: on the full featurize path,
where featurizing the sample again would be over ``SECOND_SKETCH_SHARE`` of the build (S > 10%
of the rows), from the sample's features the build kept as it went (``fidelity_sample``, when
all C checkpoints' fit too), else featurized again (≤ 10% of the build's gradients). Otherwise
an estimate:

- when S > 10% of the usable rows and the map splits: the stored rows' own two halves, two
  independent sketches inside each checkpoint block (``halves``: sjlt's count sketches, a
  Gaussian map's columns, a Kronecker map's diagonal quarter blocks of each layer and its
  dense block's count sketches), so nothing is featurized again. Split-half reliability
  (below): noisier than a second sketch, low where the sketch is poor (tiny test UNet: sjlt
  within 0.04 of the exact Spearman at d = 1,024, up to 0.2 below at d = 256; kronecker,
  halves of a quarter of each layer's columns: within 0.1 at d = 4,096, 0.43 at d = 1,024).
- otherwise (a large build, sjlt with nnz = 1): a second, independent sketch (same kind and
  d, another seed), featurized again: at most 10% of the build's gradients.

Sketches with independent errors agree with each other less than each agrees with the exact
scores: with score noise of relative variance q at d outputs (∝ 1/d), corr(sketch, exact) =
1/√(1 + q), and corr(A, B) = 1/√((1 + q·d/d_A)(1 + q·d/d_B)); the recorded Spearman is that
1/√(1 + q) with q solved from the measured corr(A, B) (for two full sketches: the square root
of their correlation). The top-k overlap is recorded as measured between the two (lower than
against exact, the more so between halves), and with the halves' estimate the bar is judged on
the Spearman only. An identity projection is exact and is not measured.

The bar (``FIDELITY_BAR``): mean Spearman ≥ 0.95 and top-k overlap ≥ 0.8 for both methods.
The suggested d: JL error shrinks like 1/√d, so q = 1/ρ² - 1 shrinks like 1/d and
d' = d · q(ρ) / q(bar), at least 2d, rounded up to a power of two (checked on the demo model:
q·d stayed within a factor 2 from d = 256 to 4,096).
"""

from __future__ import annotations

import logging
import math
import time
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from gradindex.errors import SpecError
from gradindex.featurize.embedding import Embedder
from gradindex.featurize.fidelity_sample import HeldSample, draw_sample
from gradindex.featurize.gradients import GradientFeaturizer
from gradindex.featurize.halves import Halves, half_scores, noise_from_halves, split_halves
from gradindex.featurize.kronecker import KroneckerFeaturizer
from gradindex.featurize.projection import make_projector
from gradindex.featurize.streamed import StreamedFeaturizer
from gradindex.inputs.encoders import Conditioner
from gradindex.inputs.labels import ConditioningData
from gradindex.inputs.models import Checkpoint
from gradindex.inputs.pixels import to_model_input
from gradindex.ranking import spearman_rows
from gradindex.spec import HOOK_PROJECTIONS, METHODS

logger = logging.getLogger(__name__)

DEFAULT_SAMPLE = 32
FIDELITY_BAR = {"spearman": 0.95, "topk": 0.8}
# Exact scores need a checkpoint's full-space a_c and r_c of the whole sample at once:
# 2·S·p·4 bytes (159 MB for the demo UNet at S = 32); above this, a second sketch instead.
FULL_SPACE_BUDGET = 1 << 30
# A second sketch featurizes the sample again: taken only when that is at most this share of
# the build's rows (else the stored rows' halves estimate the fidelity for free).
SECOND_SKETCH_SHARE = 0.1


def check_sample(sample: Any) -> int:
    """The number of rows to measure fidelity on: an int >= 0 (0 skips the measurement)."""
    if isinstance(sample, bool) or not isinstance(sample, (int, np.integer)) or sample < 0:
        raise SpecError(
            f"fidelity_sample={sample!r}: must be an integer >= 0 (0 skips the measurement)"
        )
    return int(sample)


# -- rank agreement ---------------------------------------------------------------------------


def agreement(exact: np.ndarray, approx: np.ndarray, ks: tuple[int, ...] = (10,)) -> dict:
    """Rank agreement of approximate with exact scores, both [Q, N] (query rows): mean and
    min over queries of the Spearman correlation and of the top-k overlap for each k."""
    rho = spearman_rows(exact, approx)  # [Q]
    out = {"spearman": float(rho.mean()), "spearman_min": float(rho.min())}
    for k in ks:
        te = np.argsort(-exact, axis=1)[:, :k]
        ta = np.argsort(-approx, axis=1)[:, :k]
        ov = np.array([len(np.intersect1d(a, b)) / k for a, b in zip(te, ta, strict=True)])
        out[f"top{k}"] = float(ov.mean())
        out[f"top{k}_min"] = float(ov.min())
    return out


# -- the build's measurement ----------------------------------------------------------------


def measure_fidelity(
    embedder: Embedder,
    checkpoints: list[Checkpoint],
    stored_rows: Callable[[str, np.ndarray], np.ndarray],
    keep: np.ndarray,
    *,
    images: np.ndarray,
    prep: dict[str, Any],
    conditioner: Conditioner,
    cond_data: ConditioningData,
    sample: int = DEFAULT_SAMPLE,
    held: HeldSample | None = None,
) -> dict[str, Any]:
    """Fidelity record of a finished store: stored-row scores of ``sample`` of the ``keep``
    rows against exact (or second-sketch) scores; warns when below ``FIDELITY_BAR``.
    stored_rows(method, rows): the store's rows (the store itself is a later stage).
    images / prep / conditioner / cond_data: what the build embedded the rows from.
    held: the sample's full-space features kept by the build (``hold_sample``), used when
    they are the rows drawn here."""
    spec = embedder.spec
    if sample == 0:
        return {"skipped": "fidelity_sample=0"}
    if spec.projection == "identity":
        return {"skipped": "identity projection: the scores are exact"}
    if len(keep) < 3:
        return {"skipped": f"{len(keep)} usable row(s): too few to rank"}
    started = time.perf_counter()
    rows = draw_sample(spec.seed, keep, sample)
    exact = 2 * len(rows) * embedder.num_params * 4 <= FULL_SPACE_BUDGET
    cheap_sketch = len(rows) <= SECOND_SKETCH_SHARE * len(keep)
    halves = None if exact or cheap_sketch else split_halves(embedder)
    if halves is not None:
        reference, served = half_scores(embedder, stored_rows, rows, halves)
        kind = "halves"
    else:
        if exact and held is not None and held.covers(rows):  # kept by the build: exact too
            reference = _exact_scores(held.tracin, held.retrac, embedder.weights)
        else:
            x0 = conditioner.encode_images(to_model_input(images[rows], **prep))
            sub = ConditioningData(
                None if cond_data.labels is None else cond_data.labels[rows],
                None if cond_data.prompts is None else [cond_data.prompts[i] for i in rows],
                cond_data.class_names,
            )
            cond = conditioner.model_kwargs(sub, len(rows))
            reference = _reference_scores(embedder, checkpoints, x0, cond, exact)
        served = {m: _gram(stored_rows(m, rows)) for m in METHODS}
        kind = "exact" if exact else "sketch"
    record = _record(reference, served, kind, embedder, rows.tolist(), halves)
    record["seconds"] = round(time.perf_counter() - started, 3)
    logger.info("projection fidelity: %s", format_fidelity(record))
    if not record["ok"]:
        warnings.warn(_warning(record, spec.projection, embedder.num_params), stacklevel=4)
    return record


def _reference_scores(
    embedder: Embedder,
    checkpoints: list[Checkpoint],
    x0: torch.Tensor,
    cond: dict[str, torch.Tensor],
    exact: bool,
) -> dict[str, np.ndarray]:
    """[S, S] exact (full-space) or second-sketch scores of both methods, one checkpoint at a
    time (only one checkpoint's [S, p] features are held)."""
    spec = embedder.spec
    out: dict[str, Any] = dict.fromkeys(METHODS, 0.0)
    for c, w in enumerate(embedder.weights):
        feat, project = embedder.featurizers[c], None
        seed = _second_seed(spec.proj_seed, c)
        inside = {"kronecker": KroneckerFeaturizer, "streamed": StreamedFeaturizer}.get(
            embedder.path
        )  # featurizers whose rows are projected already: full space or another map instead
        if inside is not None:
            own = feat
            feat = (
                GradientFeaturizer(checkpoints[c], spec, embedder.device)
                if exact
                else inside(checkpoints[c], spec, seed, embedder.device)
            )
            feat.memory_left, feat.budget = own.memory_left, own.budget  # the build's items/call
            feat.memory_spare = own.memory_spare
        elif not exact:
            proj = make_projector(
                spec.projection, feat.row_dim, spec.proj_dim, seed, nnz=spec.sjlt_nnz,
                device=embedder.device,
            )  # fmt: skip
            project = proj.project
        # half a batch at a time: the work buffers are half the build's beside the [S, q] rows
        a, r = _features(feat, embedder.draws, x0, cond, max(1, spec.batch_size // 2), project)
        embedder.release()  # and none beside their products
        part = _exact_scores(a[None], r[None], [w])
        out = {m: out[m] + part[m] for m in METHODS}
        del a, r
    return out


def _exact_scores(A: torch.Tensor, R: torch.Tensor, weights: list[float]) -> dict[str, np.ndarray]:
    """[S, S] scores of both methods from features [C, S, q], from each checkpoint's Gram
    matrices (one product each, no copy of the features), summed in float64."""
    out: dict[str, Any] = dict.fromkeys(METHODS, 0.0)
    for c, w in enumerate(weights):
        tracin, gram = ((x[c] @ x[c].T).double().cpu().numpy() for x in (A, R))
        norms = np.sqrt(np.diag(gram))  # cos(r_i, r_j) = r_i·r_j / (|r_i| |r_j|)
        retrac = gram / np.outer(norms, norms)
        out = {"tracin": out["tracin"] + w * tracin, "retrac": out["retrac"] + w * retrac}
    return out


def hold_sample(embedder: Embedder, num_rows: int, sample: int) -> HeldSample | None:
    """Where the build's own featurizing should keep the sample's full-space features: on the
    full path (the others project inside), when featurizing the sample again would be over
    ``SECOND_SKETCH_SHARE`` of the build and all C checkpoints' features fit ``FULL_SPACE_BUDGET``
    and half of what the memory budget leaves for per-item work (then taken from it)."""
    n, checkpoints, p = min(sample, num_rows), len(embedder.weights), embedder.num_params
    size = HeldSample.nbytes(checkpoints, n, p)
    left = [f.memory_left for f in embedder.featurizers]
    if (
        embedder.path != "full"
        or embedder.spec.projection == "identity"  # not measured
        or n < 3
        or n <= SECOND_SKETCH_SHARE * num_rows
        or size > FULL_SPACE_BUDGET
        or any(x is not None and size > x // 2 for x in left)
    ):
        return None
    for feat in embedder.featurizers:
        if feat.memory_left is not None:
            feat.memory_left -= size
    rows = draw_sample(embedder.spec.seed, np.arange(num_rows), sample)
    return HeldSample.empty(rows, checkpoints, p)


def _second_seed(proj_seed: int, checkpoint_index: int) -> int:
    """A projection seed independent of every P_c of the build (see ``projection_seed``)."""
    seq = np.random.SeedSequence([int(proj_seed), int(checkpoint_index), 0x5EC0])
    return int(seq.generate_state(1)[0])


def _features(
    feat: GradientFeaturizer,
    draws: list,
    x0: torch.Tensor,
    cond: dict[str, torch.Tensor],
    batch: int,
    project: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """TracIn and ReTrac features [S, q] of the sample, batch by batch (projected when
    ``project`` is given)."""
    a = r = None
    for i in range(0, len(x0), batch):
        part = {k: v[i : i + batch] for k, v in cond.items()}
        f = feat.featurize(x0[i : i + batch], draws, part, reuse=True)  # views of a scratch buffer
        ta, tr = (f.tracin, f.retrac) if project is None else (project(f.tracin), project(f.retrac))
        if a is None:
            a = torch.empty(len(x0), ta.shape[1], device=ta.device)
            r = torch.empty_like(a)
        a[i : i + batch] = ta
        r[i : i + batch] = tr
    return a, r


def _gram(x: np.ndarray) -> np.ndarray:
    """x xᵀ in float64: [S, q] → [S, S]."""
    x = x.astype(np.float64)
    return x @ x.T


def _off_diagonal(m: np.ndarray) -> np.ndarray:
    """Each row's scores against the other rows: [S, S] → [S, S - 1]."""
    n = len(m)
    return m[~np.eye(n, dtype=bool)].reshape(n, n - 1)


REFERENCES = {"exact": "exact", "sketch": "second sketch (estimate)", "halves": "split-half estimate"}  # fmt: skip


def _record(
    reference: dict[str, np.ndarray],
    served: dict[str, np.ndarray],
    kind: str,
    emb: Embedder,
    rows: list[int],
    halves: Halves | None = None,
) -> dict[str, Any]:
    """The manifest record: per method the agreement of the stored rows' scores with the
    reference's (``kind``: a key of REFERENCES; 'halves' compares the two ``halves``), the
    bar, and the suggested d when below it."""
    n = len(served["tracin"])
    k = min(10, (n - 1) // 2)
    d = emb.block_dim
    record: dict[str, Any] = {
        "reference": REFERENCES[kind],
        "sample": n,
        "rows": rows,
        "k": k,
        "bar": dict(FIDELITY_BAR),
        "proj_dim": d,
    }
    if kind == "halves" and halves is not None:
        record["halves"] = halves.record()
    for m in METHODS:
        got = agreement(_off_diagonal(reference[m]), _off_diagonal(served[m]), (k,))
        row = {"spearman": got["spearman"], "spearman_min": got["spearman_min"]}
        if kind == "sketch":  # corr(sketch, exact) = √corr(sketch, sketch), see the docstring
            row = {f"{key}_between_sketches": v for key, v in row.items()}
            row["spearman"] = math.sqrt(max(got["spearman"], 0.0))
            row["spearman_min"] = math.sqrt(max(got["spearman_min"], 0.0))
        elif kind == "halves" and halves is not None:  # 1/√(1 + q), q from corr(A, B)
            row = {f"{key}_between_halves": v for key, v in row.items()}
            for key in ("spearman", "spearman_min"):
                q = noise_from_halves(got[key], d, len(halves.a), len(halves.b))
                row[key] = 1.0 / math.sqrt(1.0 + q)
        row.update(topk=got[f"top{k}"], topk_min=got[f"top{k}_min"])
        record[m] = row
    record["ok"] = all(
        record[m]["spearman"] >= FIDELITY_BAR["spearman"]
        and (kind == "halves" or record[m]["topk"] >= FIDELITY_BAR["topk"])
        for m in METHODS
    )
    record["suggested_proj_dim"] = (
        None if record["ok"] else suggested_proj_dim(record, emb.spec.sjlt_nnz)
    )
    return record


def suggested_proj_dim(record: dict[str, Any], nnz: int = 1) -> int:
    """The d expected to reach the bar: d · q(ρ) / q(bar) with q = 1/ρ² - 1 (∝ 1/d), the
    worst method's ρ, at least 2d, a power of two (and a multiple of ``nnz``)."""
    d = int(record["proj_dim"])

    def q(rho: float) -> float:
        return 1.0 / max(rho, 1e-3) ** 2 - 1.0

    ratio = max(q(record[m]["spearman"]) for m in METHODS) / q(FIDELITY_BAR["spearman"])
    want = 2 ** math.ceil(math.log2(max(2 * d, d * ratio)))
    return -(-want // nnz) * nnz


def _warning(record: dict[str, Any], projection: str, num_params: int) -> str:
    d = record["suggested_proj_dim"]
    fix = f"rebuild with --proj-dim {d}"
    if d >= num_params and projection not in HOOK_PROJECTIONS:  # no wider sketch beats exact
        fix = (
            f"rebuild with --projection identity (exact: a sketch would need a --proj-dim of at "
            f"least the model's {num_params} parameters)"
        )
    return (
        f"projection fidelity is below the bar ({_measured(record)}): the index ranks training "
        f"samples unlike exact TracIn / ReTrac; {fix}"
    )


def _measured(record: dict[str, Any]) -> str:
    k, bar = record["k"], record["bar"]
    parts = [
        f"{m} Spearman {record[m]['spearman']:.3f}, top-{k} overlap {record[m]['topk']:.2f}"
        for m in METHODS
    ]
    return (
        f"{'; '.join(parts)}; vs {record['reference']} scores on {record['sample']} sampled "
        f"rows" + (f" of {record['measured_on']}" if "measured_on" in record else "")
        + f"; bar {bar['spearman']:g} / {bar['topk']:g}"
    )  # fmt: skip


def format_fidelity(record: dict[str, Any] | None) -> str:
    """One line for ``info`` and the build's log."""
    if not record:
        return "not recorded"
    if "skipped" in record:
        return f"not measured ({record['skipped']})"
    if record["ok"]:
        return f"{_measured(record)}: ok"
    return f"{_measured(record)}: below, suggested --proj-dim {record['suggested_proj_dim']}"
