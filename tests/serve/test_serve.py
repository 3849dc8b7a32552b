"""gradindex serve in a real headless Chromium: the pages against the library.

The app runs in-process (uvicorn in a thread on a free port) over a tiny index built from a
.npy file (tests/serve_helpers.py); Debian's Chromium is driven through Playwright's Python API.
Without Chromium these tests skip locally and FAIL under CI (CI=true), where .ci/run installs it.
"""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from gradindex.query import SEARCH_METHODS
from tests import serve_helpers as sh
from tests.serve_helpers import (
    K,
    N,
    png_of,
    query_pixels,
)

built, index, client, server = sh.built, sh.index, sh.client, sh.server  # shared fixtures
with_factors = sh.with_factors

CHROMIUM = os.environ.get("GRADINDEX_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@pytest.fixture(scope="module")
def browser():
    """Headless Chromium from the system packages (never a downloaded one)."""
    if not Path(CHROMIUM).exists():
        message = (
            f"no Chromium at {CHROMIUM}: install it (apt-get install chromium; .ci/run does) "
            "or set GRADINDEX_CHROMIUM"
        )
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    if os.environ.get("CI"):
        import playwright  # noqa: F401  - under CI a missing package fails, not skips
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture
def page(browser):
    p = browser.new_page()
    p.set_default_timeout(120_000)  # the first query loads the checkpoints
    yield p
    p.close()


def shown_ids(page, section: str = "#query-0", attr: str = "data-id") -> dict[str, list[str]]:
    """The ids (or another attribute) of the cards the page shows per method, in rank order."""
    out = {}
    for col in page.locator(f"{section} .method").all():
        m = col.get_attribute("data-method")
        out[m] = [c.get_attribute(attr) for c in col.locator(".card").all()]
    return out


def test_browser_query_shows_the_ids_attribution_index_query_returns(server, page, index, tmp_path):
    pixels = query_pixels(1)
    (tmp_path / "q.png").write_bytes(png_of(pixels))
    page.goto(server + "/")
    page.set_input_files("#image", str(tmp_path / "q.png"))
    page.fill("#k", str(K))
    served = [m for m in SEARCH_METHODS if m != "influence"]  # no factors: test_serve_influence
    for m in served:  # every served method, the kernel ones included
        page.check(f"#method-{m}")
    page.click("#submit")
    page.wait_for_selector("#query-0 .card")
    ids, scores = shown_ids(page), shown_ids(page, attr="data-score")
    assert set(ids) == set(served) == {"tracin", "retrac", "trak", "retrak"}
    for m, got in ids.items():
        want = index.query(pixels[None, None], K, m)
        assert got == [str(i) for i in want.ids[0]], m
        np.testing.assert_allclose(np.array(scores[m], float), want.scores[0], rtol=1e-5)
    assert page.locator("#error").count() == 0


def test_browser_influence_query_shows_the_library_answer(with_factors, page, tmp_path):
    """An index with factors: 'influence' (damping 0.5 typed in) beside TracIn, as the library."""
    import gradindex as gi
    from gradindex.serve.app import create_app

    pixels = query_pixels(3)
    (tmp_path / "q.png").write_bytes(png_of(pixels))
    with sh.running(create_app(with_factors, limits=sh.Limits(reach_k=2))) as url:
        page.goto(url + "/")
        page.set_input_files("#image", str(tmp_path / "q.png"))
        page.fill("#k", str(K))
        page.uncheck("#method-retrac")
        page.check("#method-influence")
        page.fill("#damping", "0.5")
        page.click("#submit")
        page.wait_for_selector("#query-0 .card")
        ids, scores = shown_ids(page), shown_ids(page, attr="data-score")
    assert set(ids) == {"tracin", "trak", "retrak", "influence"}
    lib = gi.AttributionIndex.open(with_factors)
    want = lib.query(pixels[None, None], K, "influence", lam=0.5)
    assert ids["influence"] == [str(i) for i in want.ids[0]]
    np.testing.assert_allclose(np.array(scores["influence"], float), want.scores[0], rtol=1e-5)
    assert ids["tracin"] == [str(i) for i in lib.query(pixels[None, None], K, "tracin").ids[0]]


def test_browser_dropped_file_is_queried(server, page, index):
    pixels = query_pixels(11)
    page.goto(server + "/")
    drop = page.evaluate_handle(
        """bytes => { const dt = new DataTransfer();
            dt.items.add(new File([new Uint8Array(bytes)], "dropped.png", {type: "image/png"}));
            return dt; }""",
        list(png_of(pixels)),
    )
    page.dispatch_event("#drop", "drop", {"dataTransfer": drop})
    page.fill("#k", "3")
    page.click("#submit")
    page.wait_for_selector("#query-0 .card")
    assert page.inner_text("#query-0 .caption") == "dropped.png"
    for m, got in shown_ids(page).items():
        assert got == [str(x) for x in index.query(pixels[None, None], 3, m).ids[0]], m


def test_browser_npy_of_several_images_gives_one_row_each(server, page, index, tmp_path):
    queries = np.stack([query_pixels(s) for s in (7, 8)])[:, None]  # uint8 [2, 1, 8, 8]
    np.save(tmp_path / "two.npy", queries)
    page.goto(server + "/")
    page.set_input_files("#image", str(tmp_path / "two.npy"))
    page.fill("#k", "3")
    page.uncheck("#method-trak")
    page.click("#submit")
    page.wait_for_selector("#query-1 .card")
    assert page.locator("section.query").count() == 2
    for i in range(2):
        assert page.inner_text(f"#query-{i} .caption") == f"two.npy [{i}]"
        for m, got in shown_ids(page, f"#query-{i}").items():
            assert got == [str(x) for x in index.query(queries[i : i + 1], 3, m).ids[0]], (i, m)


def test_browser_bad_upload_shows_an_error_on_the_page(server, page, tmp_path):
    (tmp_path / "notes.png").write_text("not a picture")
    page.goto(server + "/")
    page.set_input_files("#image", str(tmp_path / "notes.png"))
    with page.expect_navigation() as nav:
        page.click("#submit")
    assert nav.value.status == 400
    assert "not a PNG, JPEG or .npy" in page.inner_text("#error")
    assert "Traceback" not in page.content()


def test_browser_requests_outside_the_index_are_refused(server, page, built):
    manifest = (built[0] / "idx" / "manifest.json").read_text()
    for path in ("/../idx/manifest.json", "/thumb/..%2F..%2Fidx%2Fmanifest.json",
                 "/train/..%2Fmanifest.json", f"/thumb/{N}.png", "/vectors.h5"):  # fmt: skip
        response = page.goto(server + path)
        assert response.status == 404, path
        body = page.content()
        assert manifest[:60] not in body and '"build_id"' not in body, path


def test_browser_results_file_pages_through_queries(server, page, index, tmp_path):
    from click.testing import CliRunner

    from gradindex.cli.main import main

    queries = np.stack([query_pixels(s) for s in (2, 3, 4)])[:, None]
    np.save(tmp_path / "q.npy", queries)
    out = tmp_path / "results.jsonl"
    res = CliRunner().invoke(
        main, ["query", str(index.path), str(tmp_path / "q.npy"), "-k", "3", "-o", str(out)]
    )
    assert res.exit_code == 0, res.output
    records = [json.loads(line) for line in out.read_text().splitlines()]
    page.goto(server + "/results")
    page.set_input_files("#results", str(out))
    page.click("#results-submit")
    page.wait_for_selector("#summary")
    assert "3 queries" in page.inner_text("#summary") and "page 1 of 2" in page.inner_text(
        "#summary"
    )
    seen = {}
    for _ in range(2):  # page_size 2: queries 0, 1 on page 1, query 2 on page 2
        for sec in page.locator("section.query").all():
            name = sec.locator(".query-image .caption").inner_text()
            seen[name] = shown_ids(page, f"#{sec.get_attribute('id')}")
        if page.locator("#next").count():
            page.click("#next")
            page.wait_for_selector("#prev")
    want = {}
    for r in records:
        want.setdefault(str(r["query"]), {})[r["method"]] = [str(i) for i in r["ids"]]
    assert seen == want


# -- requests outside the index, limits, details (HTTP, no browser) ----------------------------


def test_pages_answer_while_a_query_is_embedding(server, index, monkeypatch):
    """Embedding runs in a worker thread: other pages do not wait for it."""
    import urllib.request

    real_embed = index.embed
    started = threading.Event()

    def slow_embed(*args, **kwargs):
        started.set()
        time.sleep(3)
        return real_embed(*args, **kwargs)

    monkeypatch.setattr(index, "embed", slow_embed)
    boundary = "xyz"
    body = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="k"\r\n\r\n3\r\n'
            f'--{boundary}\r\nContent-Disposition: form-data; name="method"\r\n\r\ntracin\r\n'
            f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="q.png"\r\n'
            "Content-Type: image/png\r\n\r\n"
        ).encode()
        + png_of(query_pixels(0))
        + f"\r\n--{boundary}--\r\n".encode()
    )
    post = urllib.request.Request(
        server + "/query", data=body,
        headers={"Content-Type": f"multipart/form-data; boundary={boundary}"},
    )  # fmt: skip
    slow = threading.Thread(target=lambda: urllib.request.urlopen(post, timeout=60).read())
    slow.start()
    assert started.wait(30)
    t0 = time.perf_counter()
    for path in ("/train/1", "/thumb/2.png", "/"):
        assert urllib.request.urlopen(server + path, timeout=10).status == 200
    assert time.perf_counter() - t0 < 2.0  # the embedding still sleeps for 3 s
    slow.join(60)
