"""gradindex serve's method 'influence' (over HTTP, no browser): offered where the index has
factors, answering as ``AttributionIndex.query`` and ``gradindex query --method influence``
do on the same image; shown unavailable, with the command that adds them, where it has none."""

from __future__ import annotations

import json
import re
from html import unescape

import numpy as np

import gradindex as gi
from tests import serve_helpers as sh
from tests.conftest import run
from tests.serve_helpers import K, Limits, TestClient, create_app, png_of, query_pixels

built, index, client, with_factors = sh.built, sh.index, sh.client, sh.with_factors


def _shown(page: str, method: str) -> tuple[list[int], np.ndarray]:
    """The rows and scores of one method's cards on a results page, in rank order."""
    part = page.split(f'data-method="{method}"')[1].split("</ol>")[0]
    cards = re.findall(r'data-row="(\d+)" data-id="[^"]*" data-score="([^"]+)"', part)
    return [int(r) for r, _ in cards], np.array([float(s) for _, s in cards])


def test_influence_is_served_as_the_library_and_cli_answer_it(with_factors, tmp_path):
    app = TestClient(create_app(with_factors, limits=Limits(reach_k=2)))
    home = app.get("/").text
    box = re.search(r'<input[^>]*id="method-influence"[^>]*>', home, re.S)
    assert box and "disabled" not in box.group(0) and 'id="influence-problem"' not in home
    pixels = query_pixels(1)
    (tmp_path / "q.png").write_bytes(png_of(pixels))
    lib = gi.AttributionIndex.open(with_factors)
    cli = run("query", with_factors, tmp_path / "q.png", "--method", "influence", "-k", K, "--json")
    assert cli.exit_code == 0, cli.output
    cli_rows = json.loads(cli.output.splitlines()[0])["rows"]
    files = {"image": ("q.png", png_of(pixels))}
    r = app.post("/query", files=files, data={"k": str(K), "method": ["tracin", "influence"]})
    assert r.status_code == 200, r.text[-300:]
    for m in ("tracin", "influence"):
        rows, scores = _shown(r.text, m)
        want = lib.query(pixels[None, None], K, m)
        assert rows == want.rows[0].tolist(), m
        np.testing.assert_allclose(scores, want.scores[0], rtol=1e-5)
    assert _shown(r.text, "influence")[0] == cli_rows
    assert _shown(r.text, "influence") != _shown(r.text, "tracin")  # not TracIn's answer
    assert "search-influence;dur=" in r.headers["Server-Timing"]
    assert re.search(r'id="timing"[^>]*>embed \d+ ms \(influence \d+ ms\)', r.text)
    # the damping field: the library's lam=, and it changes the scores
    r = app.post("/query", files=files, data={"k": str(K), "method": "influence", "damping": "3"})
    assert r.status_code == 200 and 'id="damping">3.0<' in r.text
    rows, scores = _shown(r.text, "influence")
    want = lib.query(pixels[None, None], K, "influence", lam=3.0)
    assert rows == want.rows[0].tolist()
    np.testing.assert_allclose(scores, want.scores[0], rtol=1e-5)
    default = lib.query(pixels[None, None], K, "influence")
    assert not np.allclose(scores, default.scores[0], rtol=1e-3)


def test_bad_damping_is_a_message(with_factors):
    app = TestClient(create_app(with_factors, limits=Limits(reach_k=2)))
    files = {"image": ("q.png", png_of(query_pixels(2)))}
    for data, message in [
        ({"method": "influence", "damping": "-1"}, "damping='-1': must be finite and > 0"),
        ({"method": "influence", "damping": "x"}, "damping='x': must be a number > 0"),
        ({"method": "tracin", "damping": "0.5"}, "applies to method 'influence' only"),
    ]:
        r = app.post("/query", files=files, data={"k": "3", **data})
        assert r.status_code == 400 and message in unescape(r.text), (data, r.text[-300:])
        assert "Traceback" not in r.text


def test_an_index_without_factors_shows_influence_off_with_the_command(client, index):
    home = client.get("/").text
    box = re.search(r'<input[^>]*id="method-influence"[^>]*>', home, re.S)
    assert box and "disabled" in box.group(0)
    problem = unescape(home.split('id="influence-problem">')[1].split("</p>")[0])
    assert "no influence factors" in problem
    assert f"gradindex factors {index.path} --data TRAINING_DATA" in problem
    r = client.post(
        "/query",
        files={"image": ("q.png", png_of(query_pixels(0)))},
        data={"k": "3", "method": ["tracin", "influence"]},
    )
    text = unescape(r.text)
    assert r.status_code == 400 and "method 'influence' is not available for this index" in text
    assert "gradindex factors" in text


def test_class_conditional_influence_takes_the_label(tmp_path):
    """The form's class label reaches the influence query rows: each label answers as the
    library's query with that label."""
    from gradindex.query_influence import add_factors

    idx, train, labels = sh.class_conditional_index(tmp_path)
    add_factors(idx, train, labels=labels)
    app = TestClient(create_app(idx))
    pixels = query_pixels(6)
    answers = []
    for label in (0, 2):
        r = app.post("/query", files={"image": ("q.png", png_of(pixels))},
                     data={"k": "5", "method": "influence", "label": str(label)})  # fmt: skip
        assert r.status_code == 200, r.text[-300:]
        rows, scores = _shown(r.text, "influence")
        want = idx.query(pixels[None, None], 5, "influence", labels=label)
        assert rows == want.rows[0].tolist(), label
        np.testing.assert_allclose(scores, want.scores[0], rtol=1e-5)
        answers.append(scores)
    assert not np.allclose(answers[0], answers[1])  # the label changes the answer


def test_results_viewer_names_influence_records(with_factors, tmp_path):
    """A 'query --method influence --output' file opens in the viewer under its method's name,
    with the file's rows."""
    np.save(tmp_path / "q.npy", np.stack([query_pixels(s) for s in (4, 5)])[:, None])
    out = tmp_path / "r.jsonl"
    res = run(
        "query", with_factors, tmp_path / "q.npy", "--method", "influence", "-k", 3, "-o", out
    )
    assert res.exit_code == 0, res.output
    app = TestClient(create_app(with_factors, limits=Limits(reach_k=2)))
    r = app.post("/results", files={"results": ("r.jsonl", out.read_bytes())})
    assert r.status_code == 200
    assert re.findall(r"<h3>([^<]*)</h3>", r.text) == ["Influence (EK-FAC)"] * 2
    want = [json.loads(line)["rows"] for line in out.read_text().splitlines()]
    sections = re.findall(r'<section class="query".*?</section>', r.text, re.S)
    assert [_shown(part, "influence")[0] for part in sections] == want
