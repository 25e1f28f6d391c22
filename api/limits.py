"""A cap on every request body, read before any route sees it.

Agents' reports are small by design (MAX_REPORT, 64 KiB); an operator's request
gets the max_request_bytes setting. A body over its cap is answered with 413
after at most cap + one chunk has been read, whatever its Content-Length says,
so a client cannot make the API buffer more than that.
"""

from __future__ import annotations

import json
from typing import Annotated, Any

from fastapi import Path
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from imgfarm.config.settings import get_settings
from imgfarm.protocol import MAX_ID, MAX_REPORT

AGENT_PREFIX = "/agent/"
STORE_PIECE = 8 << 20  # one piece of a capture uploaded over HTTP (api/store_routes.py)

# A job id in a path: ids are 32-bit on PostgreSQL, so 2**31 is a 422 naming job_id, not a 500.
JobIdPath = Annotated[int, Path(ge=1, le=MAX_ID, description="a job's id")]


def body_cap(path: str) -> int:
    """The most bytes a request body to `path` may hold."""
    if path.startswith(AGENT_PREFIX):
        return STORE_PIECE if "/store/" in path else MAX_REPORT
    return get_settings().max_request_bytes


class BodyLimit:
    """ASGI middleware: read the body up to its cap, then hand it on as one message."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        cap = body_cap(scope["path"])
        declared = dict(scope.get("headers") or []).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > cap:
            await _too_large(send, cap, scope["path"])
            return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client went away
                await self.app(scope, _replay([message], receive), send)
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > cap:
                await _too_large(send, cap, scope["path"])
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        whole: Message = {"type": "http.request", "body": b"".join(chunks), "more_body": False}
        await self.app(scope, _replay([whole], receive), send)


def _replay(first: list[Message], receive: Receive) -> Receive:
    async def again() -> Message:
        return first.pop(0) if first else await receive()

    return again


async def _too_large(send: Send, cap: int, path: str) -> None:
    what = "an agent report" if path.startswith(AGENT_PREFIX) else "a request"
    hint = ("the agent's reports are cut to fit; a larger one is not the farm's agent"
            if path.startswith(AGENT_PREFIX) else "send a smaller request, or raise IMGFARM_MAX_REQUEST_BYTES")
    body: dict[str, Any] = {"error": f"request body: {what} may hold at most {cap} bytes", "hint": hint}
    data = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": 413,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(data)).encode())]})
    await send({"type": "http.response.body", "body": data})
