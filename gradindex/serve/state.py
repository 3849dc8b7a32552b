"""What the pages read: one opened index and what is computed from it once.

``ServeState`` holds the ``AttributionIndex`` (queried under a lock: one embedding at a
time), the training images (``images.TrainingImages``), each row's label or caption, the
"reach" of every training row, the results files the browser uploaded, and why a method
cannot be searched (``problems``: no kernel.h5 for the kernel methods, no factors.h5 for
'influence').

Reach (as ``gradindex report`` computes it): ``reach_queries`` training rows, a seeded sample,
are queried with their own stored vectors for their top ``reach_k`` *other* training rows; a
row's reach is how many of those lists it appears in. The ten most reached rows per method
are the report's "generally influential" samples (TracIn favours rows with large gradients).
"""

from __future__ import annotations

import secrets
import threading
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np

from gradindex.errors import GradIndexError
from gradindex.eval.report import norm_by_timestep, reach
from gradindex.query import SEARCH_METHODS, AttributionIndex, stored_method
from gradindex.query_influence import METHOD as INFLUENCE
from gradindex.query_influence import check_factors, embed_influence
from gradindex.serve.images import TrainingImages
from gradindex.serve.limits import Limits
from gradindex.serve.uploads import UploadError, parse_results
from gradindex.spec import METHODS
from gradindex.store.kernel import KERNEL_METHODS
from gradindex.store.layout import VECTORS
from gradindex.store.vectors import VectorStore

INFLUENTIAL_TOP = 10  # the report's "most found" list length
RESULTS_KEPT = 8  # uploaded results files kept in memory


class ServeState:
    """The index and what the pages show about it (read-only)."""

    def __init__(
        self, index: AttributionIndex, data: str | None = None, limits: Limits | None = None
    ):
        self.index = index
        self.limits = limits = limits or Limits()
        self.lock = threading.Lock()
        spec = index.spec
        source = data if data is not None else index.manifest.get("data_source")
        options = dict(index.manifest.get("data_options") or {})  # a dataset's columns, on_error
        if spec.resolution is not None:  # shown as the model saw them (inputs.prepare)
            options.update(resolution=spec.resolution, center_crop=spec.center_crop)
        self.images = TrainingImages(
            source, len(index), index.image_shape[0], spec.data_range, options
        )  # fmt: skip
        self.labels, self.captions = _conditioning_columns(index)
        self.class_names = index.conditioning.get("class_names")
        # why each kernel method cannot be searched (no kernel.h5, ...), or None
        self.kernel_problems = {m: _kernel_problem(index, m) for m in KERNEL_METHODS}
        self.influence_problem = _influence_problem(index)  # no factors.h5, ..., or None
        self.problems = {**self.kernel_problems, INFLUENCE: self.influence_problem}
        self.methods = [m for m in SEARCH_METHODS if self.problems.get(m) is None]
        self.results: OrderedDict[str, tuple[str, list[dict[str, Any]]]] = OrderedDict()
        self.reach_counts, self.reach_queries = compute_reach(index, limits)
        self._norm_median: list[float] | None = None

    # -- training rows --------------------------------------------------------------------

    def check_row(self, row: int) -> bool:
        return 0 <= row < len(self.index)

    def caption(self, row: int) -> str | None:
        """The row's class (name when the folder gave one) or caption, or None."""
        if self.labels is not None:
            label = int(self.labels[row])
            names = self.class_names
            return f"class {label}" + (f" ({names[label]})" if names else "")
        if self.captions is not None:
            return str(self.captions[row])
        return None

    def card(self, rank: int, row: int, score: float) -> dict[str, Any]:
        return {
            "rank": rank,
            "row": int(row),
            "id": _plain(self.index.ids[row]),
            "score": float(score),
            "caption": self.caption(int(row)),
        }

    def details(self, row: int) -> dict[str, Any]:
        """A training row's id, caption, flag, norm profile and reach."""
        idx = self.index
        return {
            "row": row,
            "id": _plain(idx.ids[row]),
            "caption": self.caption(row),
            "flagged": bool(idx.flagged[row]),
            "profile": self.norm_profile(row),
            "reach": self.reach_of(row),
        }

    def neighbours(self, row: int, k: int) -> dict[str, list[dict[str, Any]]]:
        """Per stored method: the k training rows whose score against this row's own stored
        vector is highest, itself left out (near-duplicates, or what it is scored like)."""
        idx = self.index
        out: dict[str, list[dict[str, Any]]] = {}
        if idx.flagged[row]:
            return out
        with VectorStore.open(idx.path / VECTORS) as store:  # searches need no lock
            for m in METHODS:
                res = idx.search(
                    store.vectors(m, np.array([row])), min(k + 1, len(idx.index_rows)), m
                )
                keep = [(r, s) for r, s in zip(res.rows[0], res.scores[0], strict=True) if r != row]
                out[m] = [self.card(i, r, s) for i, (r, s) in enumerate(keep[:k], 1)]
        return out

    def norm_profile(self, row: int) -> list[dict[str, float]]:
        """Per timestep: the row's median per-draw gradient norm (over checkpoints and noise
        draws) and the index's median (over every row, checkpoint and draw)."""
        idx = self.index
        ts = np.asarray([t for t in idx.manifest["timesteps"] for _ in range(idx.spec.noise_draws)])
        if self._norm_median is None:
            self._norm_median = norm_by_timestep(idx.norms, ts)["median"]
        mine = idx.norms[row]  # [C, K·M]
        uniq = np.unique(ts)
        return [
            {"t": int(t), "row": float(np.median(mine[:, ts == t])), "median": float(m)}
            for t, m in zip(uniq, self._norm_median, strict=True)
        ]

    def reach_of(self, row: int) -> dict[str, Any]:
        """Per method: the row's count, its rank among all rows, and the influential flag."""
        out: dict[str, Any] = {}
        for m, counts in self.reach_counts.items():
            count = int(counts[row])
            rank = int((counts > count).sum()) + 1
            out[m] = {
                "count": count,
                "rank": rank,
                "influential": count > 0 and rank <= INFLUENTIAL_TOP,
            }
        return out

    def most_reached(self) -> dict[str, list[dict[str, Any]]]:
        """Per method, the INFLUENTIAL_TOP most reached rows (the report's "most found")."""
        out = {}
        for m, counts in self.reach_counts.items():
            top = np.argsort(-counts, kind="stable")[:INFLUENTIAL_TOP]
            out[m] = [
                {**self.card(rank, row, 0.0), "count": int(counts[row])}
                for rank, row in enumerate(top, 1)
                if counts[row] > 0
            ]
        return out

    # -- queries --------------------------------------------------------------------------

    def run_query(
        self,
        images: np.ndarray,
        k: int,
        methods: list[str],
        label: Any,
        prompt: Any,
        damping: float | None = None,
    ) -> dict[str, Any]:
        """Embed once per kind of query row (the stored methods' rows; 'influence''s own rows,
        damped by ``damping`` or the library default), search every method:
        {method: [[card, ...] per image]} and the seconds each part took."""
        idx = self.index
        cond = {"labels": label, "prompts": prompt}
        with self.lock:
            vecs, embed_s = self._embed(images, methods, cond, damping)
            found, search_s = {}, {}
            for m in methods:
                t0 = time.perf_counter()
                q = vecs[INFLUENCE if m == INFLUENCE else stored_method(m)]
                res = idx.search(q, min(k, len(idx.index_rows)), m)
                search_s[m] = time.perf_counter() - t0
                found[m] = [
                    [self.card(r, row, s) for r, (row, s) in enumerate(zip(rows, sc), 1)]
                    for rows, sc in zip(res.rows, res.scores, strict=True)
                ]
        return {
            "cards": found,
            "embed_s": embed_s,
            "search_s": search_s,
            "resized": idx.resized_from(images),
        }

    def _embed(
        self, images: np.ndarray, methods: list[str], cond: dict[str, Any], damping: Any
    ) -> tuple[dict[str, np.ndarray], dict[str, float]]:
        """The query rows ``methods`` search, by kind ('tracin' / 'retrac' from one embedding,
        'influence' from its own), and the seconds each embedding took."""
        vecs: dict[str, np.ndarray] = {}
        seconds: dict[str, float] = {}
        if any(m != INFLUENCE for m in methods):
            t0 = time.perf_counter()
            vecs.update(self.index.embed(images, **cond))
            seconds["rows"] = time.perf_counter() - t0
        if INFLUENCE in methods:
            t0 = time.perf_counter()
            vecs[INFLUENCE] = embed_influence(self.index, images, damping, **cond)
            seconds[INFLUENCE] = time.perf_counter() - t0
        return vecs, seconds

    # -- results files --------------------------------------------------------------------

    def add_results(self, text: str, name: str) -> str:
        """Parse a results file and keep it under a fresh token (the oldest is dropped)."""
        entries = parse_results(text, name, self.index.ids, self.limits)
        token = secrets.token_urlsafe(8)
        self.results[token] = (name, entries)
        while len(self.results) > RESULTS_KEPT:
            self.results.popitem(last=False)
        return token

    def load_results_file(self, path: str | Path) -> str:
        """A results file named at startup (operator's path, not a request's)."""
        p = Path(path)
        try:
            text = p.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise UploadError(f"{p}: cannot be read ({exc})") from None
        return self.add_results(text, p.name)


def compute_reach(index: AttributionIndex, limits: Limits) -> tuple[dict[str, np.ndarray], int]:
    """Per method, how often each training row is in the top-k of sampled training rows'
    own queries (self excluded); and how many rows were queried."""
    usable = index.index_rows
    rng = np.random.default_rng(0)
    rows = np.sort(rng.choice(usable, min(limits.reach_queries, len(usable)), replace=False))
    k = min(limits.reach_k + 1, len(usable))
    counts = {}
    with VectorStore.open(index.path / VECTORS) as store:
        for m in METHODS:
            res = index.search(store.vectors(m, rows), k, m)
            others = [r[r != s][: k - 1] for r, s in zip(res.rows, rows, strict=True)]
            counts[m] = reach(np.concatenate(others), len(index))
    return counts, len(rows)


def _conditioning_columns(index: AttributionIndex) -> tuple[Any, Any]:
    with VectorStore.open(index.path / VECTORS) as store:
        return store.column("labels"), store.column("prompts")


def _kernel_problem(index: AttributionIndex, method: str) -> str | None:
    """Why kernel ``method`` cannot be searched (no kernel.h5, ...), or None."""
    try:
        index.check_kernel(method)
    except GradIndexError as exc:
        return str(exc)
    return None


def _influence_problem(index: AttributionIndex) -> str | None:
    """Why 'influence' cannot be searched (no factors.h5, a kronecker index, ...), or None."""
    try:
        check_factors(index)
    except GradIndexError as exc:
        return str(exc)
    return None


def _plain(x: Any) -> Any:
    return x.item() if hasattr(x, "item") else x
