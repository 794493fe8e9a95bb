"""The HTTP protocol of the connections the fast path hands to uvicorn (all but streams and
publishes it serves itself): uvicorn's `HttpToolsProtocol`, mended where a client that
sends what it should not (a request that is not HTTP, pipelined requests, leaving early)
made it answer in plain text, out of order, or not notice.
"""

from __future__ import annotations

import orjson
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol, RequestResponseCycle

from ..errors import InvalidRequest
from .fasthttp import json_response

__all__ = ["HandOffProtocol"]


class HandOffProtocol(HttpToolsProtocol):
    """uvicorn's HTTP protocol with three mends:

    - a request it cannot parse is answered as every other refusal is: API.md §2's JSON
      body (uvicorn's own is a line of plain text), then the connection closes; pipelined
      behind requests still being answered, after their answers, in order (uvicorn writes
      its 400 at once: the answer due before it is lost, and the app's attempt to send it
      is logged as an unhandled error);
    - a WebSocket upgrade pipelined behind requests still being answered takes the
      socket after their answers (uvicorn hands it over at once: their answers failed on
      a socket that had changed hands, with logged tracebacks);
    - when the client leaves (or ends its side, which closes the transport), every
      request still being answered hears it at once (uvicorn tells only the newest, and
      a turn of the loop later: an answer sent meanwhile, or a stream with a request
      pipelined behind it, failed on the closed socket with a logged traceback).
    """

    _malformed = False
    _upgrade_due = False
    _open_cycles: tuple[RequestResponseCycle, ...] = ()

    def on_headers_complete(self) -> None:
        super().on_headers_complete()
        cycle = self.cycle  # the new request's (unless an upgrade returned early)
        if cycle is not None and cycle not in self._open_cycles:
            self._open_cycles = (
                *(c for c in self._open_cycles if not c.response_complete),
                cycle,
            )

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        self._client_left()

    def eof_received(self) -> None:
        # The transport closes at once on the client's EOF (nothing more can be
        # written), but connection_lost comes a loop turn later: an answer sent in
        # between would fail on the closed handle, logged as an unhandled error.
        self._client_left()

    def _client_left(self) -> None:
        for cycle in self._open_cycles:
            if not cycle.response_complete:
                cycle.disconnected = True
                cycle.message_event.set()
        self._open_cycles = ()

    def send_400_response(self, msg: str) -> None:
        cycle = self.cycle
        if cycle is not None and not cycle.response_complete:
            self._malformed = True  # answered once the answers before it are out
            self.flow.pause_reading()
            return
        self._refuse()

    def handle_websocket_upgrade(self) -> None:
        if any(not cycle.response_complete for cycle in self._open_cycles):
            self._upgrade_due = True  # the socket changes hands once they are answered
            self.flow.pause_reading()
            return
        super().handle_websocket_upgrade()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self.pipeline or self.transport.is_closing():
            return
        if self._malformed:
            self._unset_keepalive_if_required()
            self._refuse()
        elif self._upgrade_due:
            self._upgrade_due = False
            self._unset_keepalive_if_required()
            super().handle_websocket_upgrade()

    def _refuse(self) -> None:
        body = orjson.dumps(InvalidRequest("malformed HTTP request").body())
        defaults = self.server_state.default_headers
        self.transport.write(json_response(400, body, defaults, close=True))
        self.transport.close()
