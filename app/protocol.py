"""uvicorn's httptools protocol, bounded against slow and oversized requests.

uvicorn feeds every byte it reads to httptools, which keeps a header whole however long it
grows, and waits as long as a client likes for the rest of a request: one header could grow
until memory runs out (the 431 of `HeaderLimitMiddleware` comes only once the headers are
complete), and clients sending a byte a second could hold every connection for ever. This
protocol counts the bytes of a request's head as they are read, and drops a client too slow
to send its head or its body, before the app sees the request. The middleware checks stay:
they bound the app wherever it runs without this protocol (tests, another server).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any, ClassVar

from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

from app.errors import ApiError, error_response


@dataclass(frozen=True)
class ConnectionLimits:
    """What a client may send: the request line and headers together, and how slowly."""

    max_header_bytes: int
    header_timeout: float  # from the connection's (or the request's) first byte to its last header
    body_timeout: float  # the longest wait for the next bytes of a body


class LimitedHttpToolsProtocol(HttpToolsProtocol):
    """`HttpToolsProtocol` that refuses a head past ``limits.max_header_bytes`` while it is
    still arriving (431), and closes a connection whose head or body is too slow (408).

    A head is counted a whole read (256 KiB at most) at a time, so the head held in memory
    stays under the limit plus one read; a read that also ends a request (pipelining) is not
    counted, which can add one more.
    """

    limits: ClassVar[ConnectionLimits]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._awaiting_headers = True  # until the current request's headers are complete
        self._header_bytes = 0
        self._transitions = 0  # headers or messages completed, to tell a read all of head
        self._timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm(self.limits.header_timeout)  # a connection that never sends is dropped too

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        transitions = self._transitions
        super().data_received(data)
        if self.transport.is_closing():  # httptools refused the request (400)
            return
        if not self._awaiting_headers:  # a body is arriving: the wait starts again
            self._arm(self.limits.body_timeout)
        elif transitions == self._transitions:  # the whole read belongs to the head
            self._header_bytes += len(data)
            if self._header_bytes > self.limits.max_header_bytes:
                limit = self.limits.max_header_bytes
                self._refuse(431, f"the request's headers are larger than {limit} bytes")

    def on_message_begin(self) -> None:
        super().on_message_begin()
        if self._timer is None:  # not the connection's first request: its deadline starts now
            self._arm(self.limits.header_timeout)

    def on_headers_complete(self) -> None:
        self._transitions += 1
        self._awaiting_headers = False
        self._header_bytes = 0
        self._disarm()
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        self._transitions += 1
        self._awaiting_headers = True
        self._disarm()  # until the next request begins; uvicorn's keep-alive timeout meanwhile
        super().on_message_complete()

    def _arm(self, delay: float) -> None:
        self._disarm()
        self._timer = self.loop.call_later(delay, self._timed_out, delay)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _timed_out(self, delay: float) -> None:
        self._timer = None
        if self.flow.read_paused:  # waiting on the app to read, not on the client to send
            self._arm(delay)
        elif self._awaiting_headers and self._header_bytes == 0:  # nothing to answer
            self.transport.close()
        else:
            part = "headers" if self._awaiting_headers else "body"
            self._refuse(408, f"the request's {part} did not arrive within {delay:g} s")

    def send_400_response(self, msg: str) -> None:
        """httptools' refusal of malformed HTTP (a negative ``Content-Length``, both a length
        and chunks, ...), in the same JSON error body as every other refusal."""
        self._refuse(400, f"malformed HTTP request: {msg.rstrip('.')}", named=False)

    def _refuse(self, status: int, message: str, named: bool = True) -> None:
        """Answer ``status`` in the error body of the request's path (`error_response`),
        unless another response is on the wire, and close: the rest of the request is never
        read. ``named``: the message names the part at fault (headers or body)."""
        cycle = self.cycle
        if self._awaiting_headers:  # the request has no cycle yet; the last one must be done
            free = cycle is None or cycle.response_complete
        else:
            free = not cycle.response_started
        if free:
            field = "headers" if self._awaiting_headers else "body"
            error = ApiError(status, message, [(field, message)] if named else [])
            body = error_response(self._app_path(), error).body
            head = [STATUS_LINE[status]]
            for name, value in self.server_state.default_headers:
                head.extend([name, b": ", value, b"\r\n"])
            head.append(b"content-type: application/json\r\n")
            head.append(b"content-length: %d\r\nconnection: close\r\n\r\n" % len(body))
            self.transport.write(b"".join(head) + body)
        self.transport.close()

    def _app_path(self) -> str:
        """The path of the request being read, as far as it came, without the root path."""
        path = self.url.decode("latin-1").partition("?")[0]
        return path.removeprefix(self.root_path) if self.root_path else path


def limited_protocol(limits: ConnectionLimits) -> type[LimitedHttpToolsProtocol]:
    """The protocol class for ``uvicorn.Config(http=...)``, which builds one per connection."""
    return type("LimitedHttpToolsProtocol", (LimitedHttpToolsProtocol,), {"limits": limits})
