"""What guards the app: bounded request bodies and the security headers of every answer."""

from __future__ import annotations

from typing import Any

from starlette.requests import Request

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
