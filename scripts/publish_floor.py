"""The floor for publishes in Python: the lab's `floor/rawsse.py` parsing, any POST answered
``202 {"id": …}`` as tidings answers one, nothing else (no auth, validation or history).

    taskset -c 0 python scripts/publish_floor.py PORT &
    taskset -c 1 tidings bench publish --url http://127.0.0.1:PORT --key x --secret x \\
        --pid $! --publishers 8 --duration 10

What a uvloop server in Python reaches on this harness when a publish costs nearly
nothing but its system calls (docs/benchmarks.md, "Publishes: profile and changes").
"""

from __future__ import annotations

import asyncio
import sys

import uvloop

answered = 0


class Floor(asyncio.Protocol):
    __slots__ = ("buffer", "transport")

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: asyncio.Transport = transport  # type: ignore[assignment]
        self.buffer = b""

    def data_received(self, data: bytes) -> None:
        global answered
        self.buffer += data
        while b"\r\n\r\n" in self.buffer:
            head, _, body = self.buffer.partition(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            if len(body) < length:
                return
            answered += 1
            out = b'{"id":"%022x"}' % answered
            self.transport.write(
                b"HTTP/1.1 202 Accepted\r\ncontent-length: %d\r\n"
                b"content-type: application/json\r\n\r\n%s" % (len(out), out)
            )
            self.buffer = body[length:]


async def main(port: int) -> None:
    server = await asyncio.get_running_loop().create_server(Floor, "127.0.0.1", port, backlog=4096)
    await server.serve_forever()


if __name__ == "__main__":
    uvloop.run(main(int(sys.argv[1])))
