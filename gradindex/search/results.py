"""Query results written out: the ``gradindex query`` terminal lines, ``--json`` records and
``--output`` files (``.jsonl``: one ``result_to_json`` record per query and method, the query's
name added, which ``gradindex serve`` reads back; ``.npz``: ``<method>_scores`` / ``_rows`` /
``_ids`` arrays beside ``query``)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from gradindex.search.backend import SearchResult, result_to_json


def query_records(results: Mapping[str, SearchResult], names: np.ndarray) -> list[dict[str, Any]]:
    """One JSON-able record per method and query (methods in order), named by ``names``."""
    records = []
    for m, res in results.items():
        for name, rec in zip(names, result_to_json(res, m), strict=True):
            rec["query"] = name.item() if hasattr(name, "item") else name
            records.append(rec)
    return records


def result_lines(
    results: Mapping[str, SearchResult], names: np.ndarray, as_json: bool
) -> list[str]:
    """The terminal's lines: 'method query NAME: id:score, ...', or with ``as_json`` one JSON
    record each."""
    lines = []
    for rec in query_records(results, names):
        if as_json:
            lines.append(json.dumps(rec))
        else:
            pairs = ", ".join(
                f"{i}:{s:.4g}" for i, s in zip(rec["ids"], rec["scores"], strict=True)
            )
            lines.append(f"{rec['method']:6s} query {rec['query']}: {pairs}")
    return lines


def write_results(
    results: Mapping[str, SearchResult],
    names: np.ndarray,
    resized: tuple[int, int] | None,
    output: str,
) -> str:
    """Write the results to ``output`` (.npz arrays, else .jsonl records); the line saying
    what was written. ``resized``: the queries' [H, W] before they were resized, or None."""
    if output.endswith(".npz"):
        arrays = {}
        for m, res in results.items():
            arrays.update({f"{m}_scores": res.scores, f"{m}_rows": res.rows, f"{m}_ids": res.ids})
        if resized is not None:
            arrays["resized"] = np.asarray(resized, dtype=np.int64)
        np.savez(output, query=names, **arrays)
        return f"wrote {len(names)} queries x {len(results)} method(s) to {output}"
    lines = result_lines(results, names, as_json=True)
    Path(output).write_text("\n".join(lines) + "\n")
    return f"wrote {len(lines)} records to {output}"
