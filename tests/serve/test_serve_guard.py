"""gradindex serve under hostile input: decompression bombs (PNG and JPEG headers declaring
huge sizes, an oversized zTXt chunk, a .npy header declaring 10^12 bytes) are a 400 with one
line, never a 500; a burst of uploads is bounded (503 past the bound, one embedding at a time);
on IPv6 loopback only loopback Host headers are answered. Also ``gradindex query`` of such
files: one ``Error:`` line."""

from __future__ import annotations

import io
import struct
import threading
import time
import urllib.error
import urllib.request
import zlib
from html import unescape

import numpy as np
import pytest
from click.testing import CliRunner

from gradindex.cli.main import main
from tests import serve_helpers as sh
from tests.serve_helpers import Limits, TestClient, create_app, png_of, query_pixels

built, index, client, server = sh.built, sh.index, sh.client, sh.server  # shared fixtures
FORM = {"k": "3", "method": ["tracin"]}


def _chunk(kind: bytes, data: bytes) -> bytes:
    body = kind + data
    return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))


def png_declaring(width: int, height: int, extra: bytes = b"") -> bytes:
    """A few hundred bytes: a valid 8-bit grayscale PNG header of the given size, then ``extra``
    chunks, one tiny IDAT and IEND (the pixels themselves are never there)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _chunk(b"IHDR", ihdr)
        + extra
        + _chunk(b"IDAT", zlib.compress(b"\x00" * 9))
        + _chunk(b"IEND", b"")
    )


def jpeg_declaring(width: int, height: int) -> bytes:
    """A JPEG start of frame declaring the size (baseline, one component), nothing decodable."""
    sof = struct.pack(">BHHB", 8, height, width, 1) + bytes([1, 0x11, 0])
    return b"\xff\xd8" + b"\xff\xc0" + struct.pack(">H", len(sof) + 2) + sof + b"\xff\xd9"


def ztxt_bomb() -> bytes:
    """An 8x8 PNG with a zTXt chunk of 4 kB that inflates to 4 MB (PIL's limit: 1 MB)."""
    text = b"Comment\x00\x00" + zlib.compress(b"\x00" * (4 << 20), 9)
    return png_declaring(8, 8, _chunk(b"zTXt", text))


def npy_declaring(nbytes: int) -> bytes:
    """A .npy header declaring ``nbytes`` of float32, with 16 bytes of data after it."""
    buf = io.BytesIO()
    header = {"descr": "<f4", "fortran_order": False, "shape": (1, 1, 1, nbytes // 4)}
    np.lib.format.write_array_header_1_0(buf, header)
    return buf.getvalue() + b"\x00" * 16


BOMBS = [
    ("big.png", png_declaring(30000, 30000), "Image size (900000000 pixels) exceeds limit"),
    ("big.jpg", jpeg_declaring(65000, 65000), "Image size (4225000000 pixels) exceeds limit"),
    (
        "text.png",
        ztxt_bomb(),
        "not a readable image (Decompressed data too large for PngImagePlugin.MAX_TEXT_CHUNK)",
    ),
    ("big.npy", npy_declaring(10**12), "its header declares (1, 1, 1, 250000000000) float32"),
]


@pytest.mark.parametrize("name,data,message", BOMBS, ids=[b[0] for b in BOMBS])
def test_decompression_bombs_are_a_400_with_one_line(client, name, data, message):
    assert len(data) < 20_000  # cheap to make and to send
    r = client.post("/query", files={"image": (name, data)}, data=FORM)
    assert r.status_code == 400, r.text[-300:]
    assert f"{name}: " in unescape(r.text) and message in unescape(r.text)


def test_a_good_upload_still_answers(client):
    r = client.post("/query", files={"image": ("q.png", png_of(query_pixels(0)))}, data=FORM)
    assert r.status_code == 200


@pytest.mark.parametrize(
    "name,data,line",
    [
        (
            "big.png",
            png_declaring(30000, 30000),
            "big.png: Image size (900000000 pixels) exceeds limit of 178956970 pixels, could "
            "be decompression bomb DOS attack; downscale it first",
        ),
        (
            "mid.png",
            png_declaring(10000, 10000),
            "mid.png: 10000x10000 pixels is more than the limit of 89,478,485; downscale it first",
        ),
        (
            "big.jpg",
            jpeg_declaring(65000, 65000),
            "big.jpg: Image size (4225000000 pixels) exceeds limit of 178956970 pixels, could "
            "be decompression bomb DOS attack; downscale it first",
        ),
        (
            "big.npy",
            npy_declaring(10**12),
            "big.npy: its header declares (1, 1, 1, 250000000000) float32 (1e+12 bytes) but the "
            "file holds 16 bytes of data; a damaged or forged .npy",
        ),
    ],
)
def test_query_of_a_bomb_file_is_one_error_line(built, tmp_path, name, data, line):
    (tmp_path / name).write_bytes(data)
    res = CliRunner().invoke(main, ["query", str(built[0] / "idx"), str(tmp_path / name)])
    assert res.exit_code == 1
    assert res.output.splitlines() == [f"Error: {tmp_path / line}"]


# -- a burst of uploads ----------------------------------------------------------------------


def _post(url: str, body: bytes, boundary: str) -> int:
    req = urllib.request.Request(
        url + "/query",
        data=body,
        headers={"Content-Type": f"multipart/form-data; boundary={boundary}"},
    )
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status
    except urllib.error.HTTPError as exc:
        return exc.code


def test_a_burst_of_queries_is_bounded(server, index, monkeypatch):
    from gradindex.serve.state import ServeState

    app_limit = getattr(Limits(), "max_queries", 4)  # the default bound
    active = {"queries": 0, "embeds": 0}
    peak = {"queries": 0, "embeds": 0}
    lock = threading.Lock()

    def counted(key, func):
        def wrapper(*args, **kwargs):
            with lock:
                active[key] += 1
                peak[key] = max(peak[key], active[key])
            try:
                time.sleep(0.2)  # long enough for the burst to pile up
                return func(*args, **kwargs)
            finally:
                with lock:
                    active[key] -= 1

        return wrapper

    monkeypatch.setattr(index, "embed", counted("embeds", index.embed))
    monkeypatch.setattr(ServeState, "run_query", counted("queries", ServeState.run_query))
    boundary = "b0undary"
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
    codes: list[int] = []
    threads = [
        threading.Thread(target=lambda: codes.append(_post(server, body, boundary)))
        for _ in range(24)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert peak["embeds"] == 1  # one embedding at a time
    assert 1 <= peak["queries"] <= app_limit  # uploads past decoding, waiting or embedding
    assert len(codes) == 24 and set(codes) <= {200, 503}
    assert codes.count(200) >= 1 and codes.count(503) >= 1  # the rest were told to come back


def test_busy_answer_is_one_line_with_retry_after(index):
    app = create_app(index, limits=Limits(max_queries=1))
    app.state.admission.active = 1  # one query in progress
    r = TestClient(app).post(
        "/query", files={"image": ("q.png", png_of(query_pixels(0)))}, data=FORM
    )
    assert r.status_code == 503 and r.headers["retry-after"] == "2"
    assert "the server is busy with 1 queries; try again in a moment" in r.text


# -- Host header on loopback -------------------------------------------------------------------


@pytest.mark.parametrize("host", ["::1", "127.0.0.1", "localhost"])
def test_serve_on_loopback_answers_loopback_host_headers_only(built, monkeypatch, host):
    import uvicorn

    apps = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: apps.append((app, kw)))
    res = CliRunner().invoke(main, ["serve", str(built[0] / "idx"), "--host", host])
    assert res.exit_code == 0, res.output
    assert "warning" not in res.output
    ((app, kw),) = apps
    assert kw["host"] == host
    web = TestClient(app)
    for header in ("[::1]:8000", "[::1]", "127.0.0.1:8000", "localhost:8000", "LOCALHOST"):
        assert web.get("/style.css", headers={"host": header}).status_code == 200, header
    for header in ("evil.example", "evil.example:8000", "[::2]:8000", "127.0.0.1.evil.example"):
        r = web.get("/style.css", headers={"host": header})
        assert r.status_code == 400 and r.text == "Invalid host header", header


def test_serve_on_all_addresses_answers_any_host_with_a_warning(built, monkeypatch):
    import uvicorn

    apps = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: apps.append(app))
    res = CliRunner().invoke(main, ["serve", str(built[0] / "idx"), "--host", "::"])
    assert "warning: listening on ::" in res.output
    r = TestClient(apps[0]).get("/style.css", headers={"host": "my-machine.example:8000"})
    assert r.status_code == 200


def test_build_of_a_folder_holding_a_bomb_is_one_error_line(built, tmp_path):
    from PIL import Image

    folder = tmp_path / "train"
    folder.mkdir()
    Image.fromarray(query_pixels(0)).save(folder / "a.png")
    (folder / "b.jpg").write_bytes(jpeg_declaring(65000, 65000))
    ckpt = built[0] / "run" / "checkpoint-10"
    args = ["build", "-c", str(ckpt), "-d", str(folder), "-o", str(tmp_path / "idx")]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 1
    assert res.output.splitlines() == [
        f"Error: {folder / 'b.jpg'}: not a readable image (Image size (4225000000 pixels) exceeds "
        "limit of 178956970 pixels, could be decompression bomb DOS attack)"
    ]
