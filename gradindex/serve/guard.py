"""What guards the app: bounded request bodies, a bound on queries in progress (a burst is
answered 503 instead of holding every upload and decoded image in memory at once), the Host
header check on loopback (IPv4 and IPv6, against DNS rebinding) and the security headers of
every answer."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import PlainTextResponse

from gradindex.serve.limits import Limits
from gradindex.serve.uploads import UploadError


async def read_form(request: Request, limits: Limits) -> Any:
    """The multipart form, refused past ``limits.max_upload_bytes`` (by Content-Length, or
    while reading a body without one) before anything is parsed."""
    declared = request.headers.get("content-length")
    too_big = UploadError(
        f"the upload is larger than the limit of {limits.max_upload_bytes / 2**20:.0f} MiB"
    )
    if declared and declared.isdigit() and int(declared) > limits.max_upload_bytes:
        raise too_big
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limits.max_upload_bytes:
            raise too_big
    sent = False

    async def replay() -> dict[str, Any]:
        nonlocal sent
        if sent:
            return {"type": "http.disconnect"}
        sent = True
        return {"type": "http.request", "body": bytes(body), "more_body": False}

    try:
        return await Request(request.scope, replay).form(max_files=2, max_fields=20)
    except (ValueError, KeyError, AssertionError) as exc:  # malformed multipart
        raise UploadError(f"not a readable form upload ({exc})") from None


CSP = (
    "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; "
    "form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)


class SecurityHeaders:
    """Every answer: no inline or foreign scripts (CSP), no framing, no MIME sniffing."""

    def __init__(self, app: Any):
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        async def with_headers(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                headers += [
                    (b"content-security-policy", CSP.encode()),
                    (b"x-content-type-options", b"nosniff"),
                    (b"x-frame-options", b"DENY"),
                    (b"referrer-policy", b"no-referrer"),
                ]
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, with_headers if scope["type"] == "http" else send)


class Admission:
    """At most ``limit`` uploads in progress at once (read, decoded, waiting for or in the
    embedding); one more is answered 503 before its body is read, so a burst holds at most
    ``limit`` uploads and their images in memory. Used from the event loop only."""

    def __init__(self, limit: int):
        self.limit, self.active = limit, 0

    @contextmanager
    def slot(self) -> Iterator[None]:
        if self.active >= self.limit:
            raise HTTPException(
                503,
                f"the server is busy with {self.active} queries; try again in a moment",
                headers={"Retry-After": "2"},
            )
        self.active += 1
        try:
            yield
        finally:
            self.active -= 1


LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")


def host_name(header: str) -> str:
    """The host of a Host header without its port: '[::1]:8000' -> '::1', 'a:80' -> 'a'."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[1:].partition("]")[0]
    return header.rpartition(":")[0] if header.count(":") == 1 else header


class HostCheck:
    """Answer only requests whose Host header names one of ``hosts`` (a page of another site
    whose name resolves to a loopback address is refused with 400)."""

    def __init__(self, app: Any, hosts: list[str]):
        self.app, self.hosts = app, {h.strip("[]").lower() for h in hosts}

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] in ("http", "websocket"):
            header = dict(scope.get("headers") or []).get(b"host", b"").decode("latin-1")
            if host_name(header) not in self.hosts:
                await PlainTextResponse("Invalid host header", status_code=400)(
                    scope, receive, send
                )
                return
        await self.app(scope, receive, send)
