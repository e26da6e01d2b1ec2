"""Lingering close: a refused upload's client gets to read the refusal.

A client that sends its whole body before reading the reply (Python's urllib, most simple HTTP
clients) never sees a 413 that a server sends and then follows with close(): the body bytes
still arriving hit a closed socket, the kernel answers them with a reset, and the reset discards
the 413 waiting in the client's receive buffer ("connection reset by peer"). nginx avoids it
with a *lingering close*: after the response, it reads and discards what the client is still
sending, for a bounded time, then closes.

``LingeringClose`` (outermost ASGI middleware) does the same for the statuses it is given (413):
the response is sent whole, except the ASGI end-of-body message, which is held back while the
request body is read and discarded, chunk by chunk as the server receives it (uvicorn buffers at
most ~64 KiB before it stops reading the socket, so memory stays flat), until the body ends, or
``max_bytes`` were discarded, or the client was silent for ``idle_s``, or ``max_s`` passed. Then
the response ends and, the refusal carrying ``Connection: close``, the connection closes. Past a
bound the close may still reset the connection: a client sending more than that is not waited for.
At most ``max_active`` connections linger at once (each costs the event loop a read per chunk);
beyond, refusals close at once, as before, so a flood of oversize uploads cannot buy event-loop
time with bodies the service throws away.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from starlette.types import ASGIApp, Message, Receive, Scope, Send

CLOSE = (b"connection", b"close")


@dataclass
class BodyProgress:
    done: bool  # the request body ended (or the client left): nothing more to drain
    drained: int = 0


def _headers(scope: Scope) -> dict[bytes, bytes]:
    return {name.lower(): value for name, value in scope.get("headers", [])}


def has_body(scope: Scope) -> bool:
    headers = _headers(scope)
    if b"transfer-encoding" in headers:
        return True
    try:
        return int(headers.get(b"content-length", b"0")) > 0
    except ValueError:
        return False


def awaits_continue(scope: Scope) -> bool:
    """The client waits for ``100 Continue`` before sending its body: after a final refusal it
    sends none, so there is nothing to drain."""
    return _headers(scope).get(b"expect", b"").lower() == b"100-continue"


async def drain(
    receive: Receive, progress: BodyProgress, max_bytes: int, max_s: float, idle_s: float
) -> None:
    """Read and discard the rest of the request body within the bounds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + max_s
    while not progress.done and progress.drained < max_bytes:
        timeout = min(idle_s, deadline - loop.time())
        if timeout <= 0:
            return
        try:
            message = await asyncio.wait_for(receive(), timeout)
        except TimeoutError:
            return
        progress.drained += len(message.get("body", b""))


class LingeringClose:
    def __init__(
        self,
        app: ASGIApp,
        statuses: frozenset[int] = frozenset({413}),
        max_bytes: int = 128 << 20,
        max_s: float = 30.0,
        idle_s: float = 5.0,
        max_active: int = 64,
    ) -> None:
        self.app = app
        self.max_active = max_active
        self.active = 0  # connections lingering now (one event loop: no lock needed)
        self.statuses = statuses
        self.max_bytes = max_bytes
        self.max_s = max_s
        self.idle_s = idle_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        progress = BodyProgress(done=not has_body(scope) or awaits_continue(scope))

        async def tracked_receive() -> Message:
            message = await receive()
            if message["type"] != "http.request" or not message.get("more_body", False):
                progress.done = True
            return message

        lingering = False  # this refusal lingers; it holds one of the max_active places

        async def lingering_send(message: Message) -> None:
            nonlocal lingering
            if message["type"] == "http.response.start":
                refused_unread = message["status"] in self.statuses and not progress.done
                if refused_unread and self.active < self.max_active:
                    lingering = True
                    self.active += 1
                if refused_unread:
                    headers = [h for h in message.get("headers", []) if h[0].lower() != CLOSE[0]]
                    message = {**message, "headers": [*headers, CLOSE]}
            elif (
                lingering
                and message["type"] == "http.response.body"
                and not message.get("more_body", False)
            ):
                await send({**message, "more_body": True})  # the whole refusal, then drain
                await drain(tracked_receive, progress, self.max_bytes, self.max_s, self.idle_s)
                await send({"type": "http.response.body", "body": b"", "more_body": False})
                return
            await send(message)

        try:
            await self.app(scope, tracked_receive, lingering_send)
        finally:
            if lingering:
                self.active -= 1
