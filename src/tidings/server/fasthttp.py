"""Sans-I/O HTTP/1.1 for the fast path: request heads in, response heads and chunks out.

Nothing here touches a socket, so every rule is tested bytes in, values out.
`httptools` (llhttp, the parser uvicorn uses) does the parsing; this module
only decides what the fast path may take itself: a complete, bodiless
HTTP/1.1 ``GET`` on a stream path, or an HTTP/1.1 request with a plain
``Content-Length`` body (`body_length`; which ones: `server/fastpublish.py`).
Everything else is handed to uvicorn.
"""

from __future__ import annotations

import http
from collections.abc import Collection, Iterable
from dataclasses import dataclass, replace

import httptools

MAX_HEAD = 65536
"""Bytes of request head the fast path buffers before leaving the request to uvicorn."""

HEAD_END = b"\r\n\r\n"
LAST_CHUNK = b"0\r\n\r\n"
_GET = b"GET "


class HeadError(ValueError):
    """The bytes are not a well-formed HTTP/1.x request head."""


@dataclass(slots=True)  # not frozen: a frozen dataclass is slower to build, once per request
class RequestHead:
    """One parsed request head; header names are lower-case bytes, as in an ASGI scope."""

    method: str
    path: str
    raw_path: bytes
    query: bytes
    version: str
    headers: list[tuple[bytes, bytes]]
    keep_alive: bool
    upgrade: bool
    complete: bool  # False: a body follows the head (Content-Length or chunked)

    def first(self, name: bytes) -> bytes | None:
        """The first value of header `name` (lower-case), or None."""
        for key, value in self.headers:
            if key == name:
                return value
        return None

    def header(self, name: bytes) -> bytes | None:
        """The last value of header `name` (lower-case), or None."""
        found = None
        for key, value in self.headers:
            if key == name:
                found = value
        return found


class _Collector:
    """httptools callbacks; it looks them up by name."""

    __slots__ = ("complete", "headers", "keep_alive", "parser", "url")

    def __init__(self) -> None:
        self.url = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.complete = False
        self.keep_alive = False
        self.parser: httptools.HttpRequestParser | None = None

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name.lower(), value))

    def on_headers_complete(self) -> None:
        # Asked here, as uvicorn does: llhttp resets its flags once the message is complete.
        assert self.parser is not None
        self.keep_alive = bool(self.parser.should_keep_alive())

    def on_message_complete(self) -> None:
        self.complete = True


def head_end(buffer: bytes) -> int:
    """The length of the request head at the start of `buffer` (through the blank
    line), or -1 while it is incomplete."""
    at = buffer.find(HEAD_END)
    return -1 if at < 0 else at + len(HEAD_END)


def may_be_stream(buffer: bytes, paths: Collection[bytes]) -> bool:
    """Whether `buffer`, the start of a request, may still become ``GET <stream path>``."""
    return may_be_request(buffer, [_GET + path for path in paths])


def may_be_request(buffer: bytes, lines: Collection[bytes]) -> bool:
    """Whether `buffer`, the start of a request, may still become one of `lines`
    (``METHOD /path``), followed by a query or the HTTP version.

    Lets every other request go to uvicorn at its first bytes, before its head is
    complete (a POST waiting for ``100 Continue`` must not wait for us).
    """
    for line in lines:
        if len(buffer) <= len(line):
            if line.startswith(buffer):
                return True
        elif buffer.startswith(line) and buffer[len(line)] in b"? ":
            return True
    return False


def parse_head(raw: bytes) -> RequestHead:
    """Parse one request head (`raw` ends with the blank line); raises HeadError."""
    collector = _Collector()
    parser = collector.parser = httptools.HttpRequestParser(collector)
    upgrade = False
    try:
        parser.feed_data(raw)
    except httptools.HttpParserUpgrade:
        upgrade = True
    except httptools.HttpParserError as exc:
        raise HeadError(str(exc) or "malformed request head") from None
    finally:
        collector.parser = None  # a cycle through the parser's callbacks, left to the GC else
    try:
        url = httptools.parse_url(collector.url)
    except httptools.HttpParserInvalidURLError:
        raise HeadError("malformed request target") from None
    raw_path: bytes = url.path or b"/"
    return RequestHead(
        method=parser.get_method().decode("ascii", "replace"),
        path=raw_path.decode("latin-1"),
        raw_path=raw_path,
        query=url.query or b"",
        version=parser.get_http_version(),
        headers=collector.headers,
        keep_alive=collector.keep_alive,
        upgrade=upgrade,
        complete=collector.complete,
    )


class HeadCache:
    """`parse_head` for heads seen before. A client on a keep-alive connection sends the
    same head again and again, but for its Content-Length: heads are kept by their bytes
    with those digits left out, and a hit costs a copy instead of llhttp's parse (a fifth
    of a publish). Bounded: heads up to `MAX_KEPT` bytes, `size` of them at most."""

    MAX_KEPT = 2048

    def __init__(self, size: int = 256) -> None:
        self.size = size
        self._heads: dict[bytes, tuple[RequestHead, int]] = {}  # head, its Content-Length's index

    def parse(self, raw: bytes) -> RequestHead:
        """`parse_head(raw)`; raises HeadError."""
        key, digits = _without_length(raw)
        found = self._heads.get(key)
        if found is None or (found[1] >= 0 and not digits):
            # (A head kept without its digits has the key of the same head with an empty
            # Content-Length, which llhttp refuses: parsed, not answered from the cache.)
            return self._parse(raw, key, digits)
        head, at = found
        headers = head.headers.copy()  # the kept head is never handed out
        if at >= 0:
            headers[at] = (b"content-length", digits)
        return RequestHead(
            head.method,
            head.path,
            head.raw_path,
            head.query,
            head.version,
            headers,
            head.keep_alive,
            head.upgrade,
            head.complete if at < 0 else int(digits) == 0,  # no Transfer-Encoding, no upgrade
        )

    def _parse(self, raw: bytes, key: bytes, digits: bytes) -> RequestHead:
        head = parse_head(raw)
        # Upgrades are uvicorn's; a GET (a stream) comes once per connection, each with a
        # token of its own: keeping those only costs.
        if len(raw) <= self.MAX_KEPT and not head.upgrade and head.method != "GET":
            at = -1
            if digits:  # llhttp took it: the one Content-Length is those digits
                at = head.headers.index((b"content-length", digits))
            if len(self._heads) >= self.size:
                self._heads.clear()
            self._heads[key] = (replace(head, headers=head.headers.copy()), at)
        return head


def _without_length(raw: bytes) -> tuple[bytes, bytes]:
    """`raw` without the digits of a ``Content-Length: <1-9 digits>`` line (in either of
    the usual spellings), and those digits; else `raw` itself and b""."""
    at = raw.find(b"\r\ncontent-length: ")
    if at < 0:
        at = raw.find(b"\r\nContent-Length: ")
        if at < 0:
            return raw, b""
    start = at + 18
    end = raw.find(b"\r\n", start)
    digits = raw[start:end]
    if not 0 < len(digits) <= 9 or not digits.isdigit():
        return raw, b""
    return raw[:start] + raw[end:], digits


def is_stream(head: RequestHead, paths: Collection[str]) -> bool:
    """Whether the fast path serves this request: a bodiless HTTP/1.1 GET on a stream
    path, not an upgrade, and no percent-escapes in the path (uvicorn decodes those)."""
    return (
        head.method == "GET"
        and head.version == "1.1"
        and head.complete
        and not head.upgrade
        and head.path in paths
    )


NOT_PLAIN = frozenset({b"transfer-encoding", b"expect"})


def body_length(head: RequestHead) -> int | None:
    """The length of the body after `head` when it is a plain one (one ``Content-Length``
    of digits, no ``Transfer-Encoding``, no ``Expect``, not an upgrade, HTTP/1.1), else None."""
    if head.version != "1.1" or head.upgrade:
        return None
    length = None
    for name, value in head.headers:
        if name == b"content-length":
            if length is not None or not value.isdigit():
                return None
            length = int(value)
        elif name in NOT_PLAIN:
            return None
    return length


def status_line(status: int) -> bytes:
    line = _STATUS_LINES.get(status)
    if line is None:
        try:
            phrase = http.HTTPStatus(status).phrase.encode()
        except ValueError:
            phrase = b""
        line = _STATUS_LINES[status] = b"HTTP/1.1 %d %s\r\n" % (status, phrase)
    return line


_STATUS_LINES: dict[int, bytes] = {}


def response_head(
    status: int,
    headers: Iterable[tuple[bytes, bytes]],
    defaults: Iterable[tuple[bytes, bytes]] = (),
    *,
    chunked: bool = False,
    close: bool = False,
) -> bytes:
    """A response head: status line, `defaults` (uvicorn's ``date``/``server``) unless
    `headers` has them, `headers`, then ``transfer-encoding``/``connection`` as asked."""
    given = list(headers)
    names = {name.lower() for name, _ in given}
    lines = [status_line(status)]
    lines += [b"%s: %s\r\n" % (k, v) for k, v in defaults if k.lower() not in names]
    lines += [b"%s: %s\r\n" % (k, v) for k, v in given]
    if chunked:
        lines.append(b"transfer-encoding: chunked\r\n")
    if close and b"connection" not in names:
        lines.append(b"connection: close\r\n")
    lines.append(b"\r\n")
    return b"".join(lines)


def stream_head(headers: list[tuple[bytes, bytes]], defaults: list[tuple[bytes, bytes]]) -> bytes:
    """`response_head(200, headers, defaults, chunked=True)`, remembered for the last
    lists given (the same objects, kept here so that no other list takes their place):
    uvicorn's default headers change once a second and a stream's `headers` are one
    constant list, so the streams opened in a second share one head."""
    global _last_stream_head
    last = _last_stream_head
    if last[0] is headers and last[1] is defaults:
        return last[2]
    head = response_head(200, headers, defaults, chunked=True)
    _last_stream_head = (headers, defaults, head)
    return head


_last_stream_head: tuple[object, object, bytes] = (None, None, b"")


def json_response(
    status: int,
    body: bytes,
    defaults: Iterable[tuple[bytes, bytes]] = (),
    *,
    close: bool = False,
) -> bytes:
    """A whole ``application/json`` response with `body`, its head as uvicorn writes
    Starlette's `JSONResponse` without headers of its own: length, then type."""
    return b"%s%scontent-length: %d\r\ncontent-type: application/json\r\n%s\r\n%s" % (
        status_line(status),
        header_lines(defaults),
        len(body),
        b"connection: close\r\n" if close else b"",
        body,
    )


def header_lines(headers: Iterable[tuple[bytes, bytes]]) -> bytes:
    """``name: value`` lines; the last list given is remembered (uvicorn's default
    headers change once a second, and every response of that second shares them)."""
    global _last_headers, _last_lines
    if headers is not _last_headers:
        _last_lines = b"".join([b"%s: %s\r\n" % (k, v) for k, v in headers])
        _last_headers = headers
    return _last_lines


_last_headers: object = None
_last_lines = b""


def chunk(data: bytes) -> bytes:
    """One chunk of a chunked body; empty data gives nothing (the last chunk is separate)."""
    if not data:
        return b""
    return b"%x\r\n%b\r\n" % (len(data), data)
