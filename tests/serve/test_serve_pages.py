"""gradindex serve over HTTP (no browser): paths outside the index, thumbnails and data
sources, limits, conditional indexes, the details page against brute force, the CLI."""

from __future__ import annotations

import io
import json
import shutil
from html import unescape

import h5py
import numpy as np
import pytest

import gradindex as gi
from tests import serve_helpers as sh
from tests.serve_helpers import (
    Limits,
    N,
    TestClient,
    brute_force_reach,
    create_app,
    png_of,
    query_pixels,
    self_scores,
)

built, index, client, server = sh.built, sh.index, sh.client, sh.server  # shared fixtures


@pytest.mark.parametrize(
    "url",
    [
        "/thumb/../manifest.json",
        "/thumb/..%2Fmanifest.json",
        "/%2e%2e/%2e%2e/etc/passwd",
        f"/thumb/{N}.png",  # one past the last row
        "/thumb/-1.png",
        f"/train/{N}",
        "/thumb/0.png/../../vectors.h5",
        "/results/..%2F..%2Fmanifest.json",
    ],
)
def test_paths_outside_the_index_are_refused(client, built, url):
    r = client.get(url)
    assert r.status_code == 404
    manifest = (built[0] / "idx" / "manifest.json").read_bytes()
    assert manifest[:40] not in r.content and b"root:" not in r.content
    assert b"HDF" not in r.content and r.headers["content-type"].startswith("text/html")


def test_thumbnail_is_the_rows_training_image(client, built):
    from PIL import Image

    train = built[1]
    for row in (0, N - 1):
        r = client.get(f"/thumb/{row}.png")
        assert r.status_code == 200 and r.headers["content-type"] == "image/png"
        big = np.asarray(Image.open(io.BytesIO(r.content)))
        assert big.shape == (96, 96)  # 8 x 8 scaled by 12, nearest neighbour
        want = np.floor(train[row, 0] * 255 + 0.5).astype(np.uint8)  # data range [0, 1]
        np.testing.assert_array_equal(big[::12, ::12], want)


def test_moved_training_data_is_said_on_the_page(index, built, tmp_path):
    moved = TestClient(create_app(index, data=str(tmp_path / "gone.npy")))
    page = moved.get("/").text
    assert "no longer there" in page and "--data" in page
    assert moved.get("/thumb/0.png").status_code == 404
    np.save(tmp_path / "five.npy", built[1][:5])
    short = TestClient(create_app(index, data=str(tmp_path / "five.npy"))).get("/").text
    assert f"holds 5 images but the index has {N} rows" in short


def test_upload_limits_and_bad_fields_are_messages(index):
    small = TestClient(create_app(index, limits=Limits(max_upload_bytes=2000, max_pixels=50)))
    form = {"k": "3", "method": ["tracin"]}
    big = small.post("/query", files={"image": ("a.png", b"\x89PNG\r\n\x1a\n" + b"0" * 3000)},
                     data=form)  # fmt: skip
    assert big.status_code == 400 and "larger than the limit" in big.text
    wide = small.post("/query", files={"image": ("w.png", png_of(query_pixels(0)))}, data=form)
    assert wide.status_code == 400 and "8x8 pixels is more than the limit of 50" in wide.text
    client = TestClient(create_app(index))
    ok = {"image": ("q.png", png_of(query_pixels(0)))}
    for data, message in [
        ({"k": "0", "method": "tracin"}, "k=0: give a whole number from 1 to 50"),
        ({"k": "x", "method": "tracin"}, "k=x"),
        ({"k": "3", "method": "lds"}, "method 'lds' is not available"),
        ({"k": "3"}, "choose at least one method"),
    ]:
        r = client.post("/query", files=ok, data=data)
        assert r.status_code == 400 and message in unescape(r.text), (data, r.text[-300:])
    pickled = io.BytesIO()
    np.save(pickled, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    r = client.post("/query", files={"image": ("p.npy", pickled.getvalue())}, data=form)
    assert r.status_code == 400 and "not a readable .npy" in r.text


def test_an_index_without_kernel_offers_no_trak(index, tmp_path):
    folder = tmp_path / "nokernel"
    shutil.copytree(index.path, folder)
    (folder / "kernel.h5").unlink()
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest.pop("kernel")
    manifest["files"].pop("kernel.h5")
    (folder / "manifest.json").write_text(json.dumps(manifest))
    client = TestClient(create_app(folder))
    home = client.get("/").text
    assert 'id="trak-problem"' in home and "gradindex kernel" in home
    r = client.post(
        "/query",
        files={"image": ("q.png", png_of(query_pixels(0)))},
        data={"k": "3", "method": ["tracin", "trak"]},
    )
    assert r.status_code == 400 and "method 'trak' is not available" in unescape(r.text)


def test_details_page_norms_and_reach_against_the_stored_rows(client, index, built):
    import re

    with h5py.File(built[0] / "idx" / "vectors.h5", "r") as f:
        norms = f["norms"][()]  # [N, C, K·M]
    ts = np.asarray([t for t in index.manifest["timesteps"] for _ in range(index.spec.noise_draws)])
    reach = brute_force_reach(built)  # every row queries itself (N < 500), top 2 others each
    for row in range(N):
        html = client.get(f"/train/{row}").text
        for t in np.unique(ts):
            mine, median = np.median(norms[row][:, ts == t]), np.median(norms[:, :, ts == t])
            assert f"<td>{t}</td><td>{mine:.4g}</td><td>{median:.4g}</td>" in html
        for m, counts in reach.items():
            part = html.split(f'<tr data-method="{m}">')[1].split("</tr>")[0]
            assert f'<td class="count">{counts[row]} of {N}</td>' in part
        for m, scores in self_scores(built).items():  # closest rows: brute force, self out
            part = html.split('id="neighbours"')[1].split(f'data-method="{m}"')[1]
            shown = re.findall(r'data-row="(\d+)"', part.split("</ol>")[0])
            assert shown == [str(r) for r in np.argsort(-scores[row])[:8]], (row, m)


def test_home_lists_the_most_reached_rows(client, built):
    import re

    html = client.get("/").text
    for m, counts in brute_force_reach(built).items():
        part = html.split('id="influential"')[1].split(f'data-method="{m}"')[1]
        part = part.split("</ol>")[0]
        shown = [
            (int(r), int(c)) for r, c in re.findall(r'data-row="(\d+)".*?data-count="(\d+)"', part)
        ]
        want = sorted(
            ((r, int(c)) for r, c in enumerate(counts) if c > 0), key=lambda x: (-x[1], x[0])
        )
        assert shown == want[:10], m


def test_cli_serve_binds_loopback_by_default(index, monkeypatch):
    import uvicorn
    from click.testing import CliRunner

    from gradindex.cli.main import main

    seen = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: seen.update(kw, app=app))
    res = CliRunner().invoke(main, ["serve", str(index.path)])
    assert res.exit_code == 0, res.output
    assert seen["host"] == "127.0.0.1" and seen["port"] == 8000
    local = TestClient(seen["app"], base_url="http://127.0.0.1:8000")
    home = local.get("/")
    assert (
        home.status_code == 200 and "script-src 'self'" in home.headers["content-security-policy"]
    )
    assert home.headers["x-frame-options"] == "DENY"
    assert "<script>" not in home.text  # the page's script is /drop.js, allowed by the CSP
    rebound = local.get("/", headers={"host": "attacker.example:8000"})  # DNS rebinding
    assert rebound.status_code == 400 and "results" not in rebound.text
    res = CliRunner().invoke(main, ["serve", str(index.path), "--host", "0.0.0.0"])
    assert "warning: listening on 0.0.0.0" in res.output
    res = CliRunner().invoke(main, ["serve", str(index.path) + "-missing"])
    assert res.exit_code != 0 and res.output.startswith("Error:") and "Traceback" not in res.output


def test_class_conditional_index_takes_a_label_and_shows_row_classes(tmp_path):
    import re

    idx, _, labels = sh.class_conditional_index(tmp_path)
    client = TestClient(create_app(idx))
    assert 'name="label"' in client.get("/").text
    pixels = query_pixels(6)
    files = {"image": ("q.png", png_of(pixels))}
    r = client.post("/query", files=files, data={"k": "5", "method": ["tracin", "retrac"]})
    assert r.status_code == 400 and "give the query's class label" in unescape(r.text)
    r = client.post("/query", files=files, data={"k": "5", "method": "retrac", "label": "2"})
    assert r.status_code == 200
    cards = re.findall(r'data-row="(\d+)" data-id="(\d+)".*?class="label">class (\d)', r.text, re.S)
    want = idx.query(pixels[None, None], 5, "retrac", labels=2)
    assert [int(row) for row, _, _ in cards] == want.rows[0].tolist()
    assert [int(c) for _, _, c in cards] == labels[want.rows[0]].tolist()
    other = client.post("/query", files=files, data={"k": "5", "method": "retrac", "label": "0"})
    assert re.findall(r'data-row="(\d+)"', other.text) == [
        str(r) for r in idx.query(pixels[None, None], 5, "retrac", labels=0).rows[0]
    ]
    bad = client.post("/query", files=files, data={"k": "5", "method": "retrac", "label": "7"})
    assert bad.status_code == 400 and 'id="error"' in bad.text and "Traceback" not in bad.text


def test_training_images_from_every_data_source_by_row(tmp_path):
    """Row i of a folder is its i-th file in sorted order (the build's); arrays by index."""
    from PIL import Image

    from gradindex.serve.images import TrainingImages

    pixels = (np.random.default_rng(9).random((3, 6, 5)) * 255).astype(np.uint8)
    names = ["b.png", "a.png", "sub/c.png"]  # sorted: a.png, b.png, sub/c.png
    (tmp_path / "imgs" / "sub").mkdir(parents=True)
    for name, p in zip(names, pixels, strict=True):
        Image.fromarray(p).save(tmp_path / "imgs" / name)
    order = [names.index(n) for n in sorted(names)]
    with h5py.File(tmp_path / "d.h5", "w") as f:
        f["images"] = pixels
    np.savez(tmp_path / "d.npz", images=pixels[:, None])
    np.save(tmp_path / "d.npy", pixels[..., None])  # [N, H, W, 1]
    sources = {
        str(tmp_path / "imgs"): pixels[order],
        f"{tmp_path / 'd.h5'}:/images": pixels,
        str(tmp_path / "d.npz"): pixels,
        str(tmp_path / "d.npy"): pixels,
    }
    for source, want in sources.items():
        imgs = TrainingImages(source, 3, 1, None)
        assert imgs.available, (source, imgs.problem)
        for row in range(3):
            np.testing.assert_array_equal(imgs.image(row)[0], want[row], err_msg=source)
    memory = TrainingImages(None, 3, 1, None)
    assert not memory.available and "in-memory" in memory.problem and "--data" in memory.problem
    gone = TrainingImages(f"{tmp_path / 'gone.h5'}:/images", 3, 1, None)
    assert "no longer there" in gone.problem


def test_build_records_the_data_source_absolute(built, monkeypatch):
    manifest = json.loads((built[0] / "idx" / "manifest.json").read_text())
    assert manifest["data_source"] == str((built[0] / "train.npy").resolve())
    from gradindex.inputs.dataref import parse_data

    monkeypatch.chdir(built[0])
    assert parse_data("train.npy").location == str(built[0].resolve() / "train.npy")
    assert parse_data("d.h5:/images").location == f"{built[0].resolve() / 'd.h5'}:/images"
    assert parse_data(np.zeros((2, 1, 4, 4))).location is None


def test_results_file_given_at_startup_opens_in_the_viewer(index, tmp_path):
    rows = [[0, 3, 5], [2, 1, 0]]
    with open(tmp_path / "r.jsonl", "w") as f:
        for q, r in enumerate(rows):
            ids = [int(index.ids[x]) for x in r]
            f.write(json.dumps({"method": "retrac", "ids": ids, "rows": r,
                                "scores": [3.0, 2.0, 1.0], "query": f"img{q}"}) + "\n")  # fmt: skip
    client = TestClient(create_app(index, results=tmp_path / "r.jsonl"))
    token = client.get("/").text.split('id="start-results" href="/results/')[1].split('"')[0]
    page = client.get(f"/results/{token}").text
    import re

    for q, r in enumerate(rows):
        part = page.split(f'id="query-{q}"')[1].split("</section>")[0]
        assert f"img{q}" in part and re.findall(r'data-row="(\d+)"', part) == [str(x) for x in r]
    (tmp_path / "other.jsonl").write_text(
        json.dumps({"method": "retrac", "ids": [999], "rows": [1], "scores": [1.0]}) + "\n"
    )
    r = client.post(
        "/results", files={"results": ("other.jsonl", (tmp_path / "other.jsonl").read_bytes())}
    )
    assert r.status_code == 400 and "results of another index" in r.text
    r = client.post("/results", files={"results": ("x.jsonl", b"{not json\n")})
    assert r.status_code == 400 and "line 1: not JSON" in r.text
    assert client.get(f"/results/{token}?page=9").status_code == 400


@pytest.mark.slow
def test_the_demo_prints_a_browse_command_that_shows_its_training_images(tmp_path, monkeypatch):
    import shlex

    import uvicorn
    from click.testing import CliRunner
    from PIL import Image

    from gradindex.cli.main import main

    res = CliRunner().invoke(main, ["demo", "--out", str(tmp_path / "demo"), "--quick"])
    assert res.exit_code == 0, res.output
    line = next(ln for ln in res.output.splitlines() if ln.startswith("browse: "))
    argv = shlex.split(line.removeprefix("browse: "))
    assert argv[:2] == ["gradindex", "serve"]
    seen = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: seen.update(app=app))
    assert CliRunner().invoke(main, argv[1:]).exit_code == 0
    client = TestClient(seen["app"], base_url="http://localhost:8000")
    assert "No training thumbnails" not in client.get("/").text
    train = np.load(tmp_path / "demo" / "train.npy")  # [N, 1, 8, 8] floats in [0, 1]
    thumb = np.asarray(Image.open(io.BytesIO(client.get("/thumb/5.png").content)))
    np.testing.assert_array_equal(thumb[::12, ::12], np.floor(train[5, 0] * 255 + 0.5))


def test_text_conditional_index_takes_a_prompt_and_shows_captions(
    tmp_path, sd_run, caption_folder, pixels
):
    import re

    from PIL import Image

    from tests.diffusion_refs import CAPTIONS

    spec = gi.BuildSpec(proj_dim=64, timesteps=2, batch_size=8)
    with pytest.warns(UserWarning, match="fidelity"):
        idx = gi.build_index(checkpoints=[sd_run], data=str(caption_folder), out=tmp_path / "idx",
                             spec=spec, progress=False)  # fmt: skip
    client = TestClient(create_app(idx))
    assert 'name="prompt"' in client.get("/").text
    query = pixels[4]  # [16, 16, 3] uint8
    files = {"image": ("q.png", png_of(query))}
    r = client.post("/query", files=files, data={"k": "4", "method": "retrac", "prompt": "a dog"})
    assert r.status_code == 200, r.text[-300:]
    cards = re.findall(r'data-row="(\d+)".*?class="label">([^<]*)<', r.text, re.S)
    want = idx.query(query[None], 4, "retrac", prompts="a dog")
    assert [int(row) for row, _ in cards] == want.rows[0].tolist()
    assert [unescape(c) for _, c in cards] == [CAPTIONS[i] for i in want.rows[0]]
    thumb = np.asarray(Image.open(io.BytesIO(client.get("/thumb/2.png").content)))
    np.testing.assert_array_equal(thumb[::6, ::6], pixels[2])  # 16 x 16 RGB scaled by 6
    r = client.post("/query", files=files, data={"k": "4", "method": "retrac"})
    assert r.status_code == 400 and "give the query's prompt" in unescape(r.text)


def test_uploaded_files_answer_as_the_cli_query_of_the_same_files(client, index, tmp_path):
    """A 16-bit PNG, an RGBA PNG and a JPEG: the page's rows are 'gradindex query FILE's."""
    import re

    from click.testing import CliRunner
    from PIL import Image

    from gradindex.cli.main import main

    wide = (np.random.default_rng(3).random((8, 8)) * 65535).astype(np.uint16)
    Image.fromarray(wide).save(tmp_path / "wide.png")
    rgba = np.random.default_rng(4).integers(0, 256, (8, 8, 4), dtype=np.uint8)
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    Image.fromarray(query_pixels(5)).save(tmp_path / "photo.jpg", quality=80)
    for name in ("wide.png", "rgba.png", "photo.jpg"):
        path = tmp_path / name
        cli = CliRunner().invoke(main, ["query", str(index.path), str(path), "-k", "4", "--json"])
        want = {(r := json.loads(ln))["method"]: r["rows"] for ln in cli.output.splitlines()}
        r = client.post("/query", files={"image": (name, path.read_bytes())},
                        data={"k": "4", "method": ["tracin", "retrac"]})  # fmt: skip
        assert r.status_code == 200, (name, r.text[-300:])
        for m in ("tracin", "retrac"):
            part = r.text.split(f'data-method="{m}"')[1].split("</ol>")[0]
            assert re.findall(r'data-row="(\d+)"', part) == [str(x) for x in want[m]], (name, m)
