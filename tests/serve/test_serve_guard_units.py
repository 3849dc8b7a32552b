"""serve/guard.py's pieces on their own: Host parsing, the admission bound, the Host check and
the security headers as ASGI wrappers, the body limit of read_form (no server, no index)."""

from __future__ import annotations

import asyncio

import pytest
from starlette.exceptions import HTTPException
from starlette.requests import Request

from gradindex.serve.guard import CSP, Admission, HostCheck, SecurityHeaders, host_name, read_form
from gradindex.serve.limits import Limits
from gradindex.serve.uploads import UploadError


@pytest.mark.parametrize(
    "header, host",
    [
        ("127.0.0.1:8000", "127.0.0.1"),
        ("LocalHost", "localhost"),
        ("[::1]:8000", "::1"),
        ("[::1]", "::1"),
        ("::1", "::1"),  # bare IPv6: its colons are not a port
        ("evil.example:80", "evil.example"),
    ],
)
def test_host_name_drops_the_port_only(header, host):
    assert host_name(header) == host


def test_admission_holds_at_most_limit_slots_and_frees_them_on_errors():
    gate = Admission(2)
    with gate.slot(), gate.slot():
        assert gate.active == 2
        with pytest.raises(HTTPException) as busy, gate.slot():
            pass
        assert busy.value.status_code == 503 and busy.value.headers == {"Retry-After": "2"}
    assert gate.active == 0
    with pytest.raises(RuntimeError), gate.slot():
        raise RuntimeError("the embedding failed")
    assert gate.active == 0


async def _inner(scope, receive, send):
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"ok"})


def _call(app, host: str | None) -> list[dict]:
    sent: list[dict] = []

    async def send(message):
        sent.append(message)

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    headers = [(b"host", host.encode())] if host is not None else []
    asyncio.run(
        app({"type": "http", "method": "GET", "path": "/", "headers": headers}, receive, send)
    )
    return sent


def test_host_check_answers_listed_hosts_and_refuses_others_with_400():
    app = HostCheck(_inner, ["127.0.0.1", "[::1]"])
    assert _call(app, "127.0.0.1:8000")[0]["status"] == 200
    assert _call(app, "[::1]:8000")[0]["status"] == 200
    for bad in ("attacker.example:8000", None):
        sent = _call(app, bad)
        assert sent[0]["status"] == 400 and sent[1]["body"] == b"Invalid host header"


def test_security_headers_are_added_to_every_answer():
    start = _call(SecurityHeaders(_inner), "x")[0]
    headers = dict(start["headers"])
    assert headers[b"content-security-policy"] == CSP.encode()
    assert headers[b"x-frame-options"] == b"DENY"
    assert headers[b"x-content-type-options"] == b"nosniff"
    assert "script-src 'self'" in CSP and "frame-ancestors 'none'" in CSP


def _request(body: bytes, declared: int | None) -> Request:
    chunks = [body[i : i + 10] for i in range(0, len(body), 10)] or [b""]

    async def receive():
        chunk = chunks.pop(0)
        return {"type": "http.request", "body": chunk, "more_body": bool(chunks)}

    headers = [(b"content-type", b"multipart/form-data; boundary=B")]
    if declared is not None:
        headers.append((b"content-length", str(declared).encode()))
    return Request({"type": "http", "method": "POST", "headers": headers}, receive)


FORM = b'--B\r\nContent-Disposition: form-data; name="k"\r\n\r\n3\r\n--B--\r\n'


def test_read_form_refuses_a_body_over_the_limit_declared_or_not():
    limits = Limits(max_upload_bytes=len(FORM))
    form = asyncio.run(read_form(_request(FORM, len(FORM)), limits))
    assert form["k"] == "3"
    small = Limits(max_upload_bytes=len(FORM) - 1)
    for declared in (len(FORM), None):  # by its Content-Length, or counted while reading
        with pytest.raises(UploadError, match="larger than the limit"):
            asyncio.run(read_form(_request(FORM, declared), small))
