"""gradindex.search.results: query results as terminal lines, JSON records and --output files,
checked against records written out by hand and read back by serve's own .jsonl reader."""

from __future__ import annotations

import json

import numpy as np

from gradindex.search.backend import SearchResult
from gradindex.search.results import result_lines, write_results
from gradindex.serve.limits import Limits
from gradindex.serve.uploads import parse_results

# two queries, k = 3; ids are the sample ids a folder index gives (file names)
TRACIN = SearchResult(
    scores=np.array([[0.5, 0.25, 0.1234567], [2.0, 1.0, -1.5]], dtype=np.float32),
    ids=np.array([["c.png", "a.png", "e.png"], ["b.png", "c.png", "d.png"]]),
    rows=np.array([[2, 0, 4], [1, 2, 3]], dtype=np.int64),
)
RETRAC = SearchResult(
    scores=np.array([[0.9, 0.8, 0.7], [0.6, 0.5, 0.4]], dtype=np.float32),
    ids=np.array([["a.png", "b.png", "c.png"], ["e.png", "d.png", "a.png"]]),
    rows=np.array([[0, 1, 2], [4, 3, 0]], dtype=np.int64),
)
RESULTS = {"tracin": TRACIN, "retrac": RETRAC}
NAMES = np.array(["q1.png", "q2.png"])
INDEX_IDS = np.array(["a.png", "b.png", "c.png", "d.png", "e.png"])


def expected_records() -> list[dict]:
    """Method by method, query by query, as a user of the .jsonl would read it."""
    out = []
    for method, res in RESULTS.items():
        for q in range(2):
            out.append(
                {
                    "method": method,
                    "query": str(NAMES[q]),
                    "ids": [str(i) for i in res.ids[q]],
                    "rows": [int(r) for r in res.rows[q]],
                    "scores": [float(s) for s in res.scores[q]],
                    "resized": None,
                }
            )
    return out


def test_terminal_lines_and_json_records():
    assert result_lines(RESULTS, NAMES, as_json=False) == [
        "tracin query q1.png: c.png:0.5, a.png:0.25, e.png:0.1235",
        "tracin query q2.png: b.png:2, c.png:1, d.png:-1.5",
        "retrac query q1.png: a.png:0.9, b.png:0.8, c.png:0.7",
        "retrac query q2.png: e.png:0.6, d.png:0.5, a.png:0.4",
    ]
    records = [json.loads(ln) for ln in result_lines(RESULTS, NAMES, as_json=True)]
    want = expected_records()
    assert [{k: r[k] for k in want[0]} for r in records] == want
    # numbered queries (query vectors) come out as plain ints, not numpy scalars
    numbered = [json.loads(ln)["query"] for ln in result_lines(RESULTS, np.arange(2), True)]
    assert numbered == [0, 1, 0, 1]


def test_jsonl_file_is_read_back_by_serve(tmp_path):
    out = tmp_path / "r.jsonl"
    assert write_results(RESULTS, NAMES, None, str(out)) == f"wrote 4 records to {out}"
    text = out.read_text()
    assert text.endswith("}\n")  # one record a line, each line ended
    lines = text.splitlines()
    assert [json.loads(ln) for ln in lines] == expected_records()
    shown = parse_results(out.read_text(), "r.jsonl", INDEX_IDS, Limits())
    assert [q["query"] for q in shown] == ["q1.png", "q2.png"]
    assert shown[1]["methods"]["tracin"] == [
        (1, 1, "b.png", 2.0),
        (2, 2, "c.png", 1.0),
        (3, 3, "d.png", -1.5),
    ]


def test_npz_file_holds_every_method_and_the_resized_size(tmp_path):
    out = tmp_path / "r.npz"
    msg = write_results(RESULTS, NAMES, (12, 10), str(out))
    assert msg == f"wrote 2 queries x 2 method(s) to {out}"
    with np.load(out) as z:
        assert sorted(z.files) == sorted(
            ["query", "resized"] + [f"{m}_{a}" for m in RESULTS for a in ("scores", "rows", "ids")]
        )
        np.testing.assert_array_equal(z["query"], NAMES)
        np.testing.assert_array_equal(z["resized"], [12, 10])
        for m, res in RESULTS.items():
            np.testing.assert_array_equal(z[f"{m}_scores"], res.scores)
            np.testing.assert_array_equal(z[f"{m}_rows"], res.rows)
            np.testing.assert_array_equal(z[f"{m}_ids"], res.ids)
    write_results(RESULTS, NAMES, None, str(out))
    with np.load(out) as z:
        assert "resized" not in z.files
