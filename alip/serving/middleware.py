"""Pure ASGI middleware: request body size limit and optional bearer-token auth.

Ray Serve has no request size limit of its own, and its proxy streams the body to the replica in
chunks, so the limit is enforced here, on the bytes as they arrive: a `Content-Length` above the
limit is refused before reading anything, and a chunked upload (no Content-Length) is counted
chunk by chunk and refused as soon as it crosses the limit, without buffering the rest.
"""
from __future__ import annotations

import hmac
import json
from typing import Any, Awaitable, Callable, Iterable

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


_ERROR_TYPES = {401: "authentication_error", 404: "not_found_error", 413: "request_too_large",
                503: "overloaded_error"}


def error_body(status: int, code: str, message: str) -> dict[str, Any]:
    """The one JSON error shape every 4xx of the service uses (`type` as OpenAI clients expect)."""
    kind = _ERROR_TYPES.get(status, "invalid_request_error" if status < 500 else "server_error")
    return {"error": {"status": status, "code": code, "message": message, "type": kind}}


async def send_json_error(send: Send, status: int, code: str, message: str,
                          headers: Iterable[tuple[bytes, bytes]] = ()) -> None:
    body = json.dumps(error_body(status, code, message)).encode()
    await send({
        "type": "http.response.start",
        "status": status,
        "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                    # the rest of an oversized body is never read: tell the client not to reuse us
                    *([(b"connection", b"close")] if status == 413 else []), *headers],
    })
    await send({"type": "http.response.body", "body": body, "more_body": False})


class BodySizeLimitMiddleware:
    """413 for request bodies over `max_bytes`, declared (Content-Length) or streamed (chunked).

    The body is read up front, counted, and replayed to the app as one message: the limit is
    small (MBs) and every endpoint reads the whole body anyway, and deciding before the app
    starts means a 413 can always be sent (never half a response).
    """

    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    def _too_large(self, size: str) -> str:
        return (f"request body {size} exceeds the limit of {self.max_bytes} bytes; "
                "send fewer or smaller images per request")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length")
        if declared is not None:
            try:
                n = int(declared)
            except ValueError:
                return await send_json_error(send, 400, "bad_content_length",
                                             f"Content-Length {declared!r} is not an integer")
            if n > self.max_bytes:
                return await send_json_error(send, 413, "body_too_large", self._too_large(f"of {n} bytes"))

        chunks: list[bytes] = []
        total = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return  # client went away; nothing to answer
            chunk = message.get("body", b"")
            total += len(chunk)
            if total > self.max_bytes:
                return await send_json_error(send, 413, "body_too_large",
                                             self._too_large(f"(over {total} bytes so far)"))
            chunks.append(chunk)
            if not message.get("more_body", False):
                break

        body = b"".join(chunks)
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # later calls wait for the disconnect, as the server would

        await self.app(scope, replay, send)


class ProxyControlHeaderGuard:
    """400 for the headers with which Ray Serve's proxy lets a request change its own limits.

    Ray Serve 2.60's proxy honours `x-request-timeout-seconds` (a value <= 0 DISABLES the request
    timeout, a large one extends it) and `x-request-disconnect-disabled: ?1` (the request keeps
    running after its client has gone) from any client: meant for a trusted load balancer, they
    would let an anonymous client defeat the timeout and the cancellation this service relies on.
    The replica sees the same headers, so such requests are refused here, before any work.
    """

    HEADERS = (b"x-request-timeout-seconds", b"x-request-disconnect-disabled")

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            names = {k.lower() for k, _ in scope.get("headers") or []}
            sent = [h.decode() for h in self.HEADERS if h in names]
            if sent:
                return await send_json_error(
                    send, 400, "forbidden_header",
                    f"header(s) {sent} change the server's request timeout or disconnect handling and are "
                    "not accepted from clients; remove them")
        await self.app(scope, receive, send)


class BearerTokenMiddleware:
    """401 unless `Authorization: Bearer <token>` matches; some paths (health, page) stay open."""

    def __init__(self, app: ASGIApp, token: str | None, open_paths: Iterable[str] = ()):
        self.app = app
        self.token = token
        self.open_paths = frozenset(open_paths)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self.token or self._path(scope) in self.open_paths:
            return await self.app(scope, receive, send)
        auth = dict(scope.get("headers") or []).get(b"authorization", b"").decode("latin-1")
        scheme, _, given = auth.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), self.token.encode()):
            why = "missing" if not auth else "invalid"
            return await send_json_error(
                send, 401, "unauthorized",
                f"{why} bearer token: send 'Authorization: Bearer <token>' (the service's ALIP_SERVE_TOKEN)",
                headers=[(b"www-authenticate", b"Bearer")])
        await self.app(scope, receive, send)

    @staticmethod
    def _path(scope: Scope) -> str:
        # Behind Serve's route_prefix the app sees root_path + path; match on the app-local part.
        path, root = scope.get("path", ""), scope.get("root_path", "")
        if root and path.startswith(root):
            path = path[len(root):] or "/"
        return path
