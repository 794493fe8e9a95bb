"""Fuzz the WebSocket side: after a real handshake, random frames (bad opcodes, unmasked,
reserved bits, lying lengths, control frames too long, text that is not UTF-8, close codes)
and protocol messages.

Against a running server whose API key and JWT secret you pass:

    PYTHONPATH=src python scripts/fuzz_ws.py --port 8000 --key KEY --secret SECRET \
        [--seconds 60] [--seed 1]

It prints one JSON line of counts; the server's answers are not checked. Read the
server's log afterwards: a ``Traceback`` there is a finding too (a client's fault is
answered, never logged as the server's own error).
"""

import asyncio
import base64
import json
import logging
import os
import struct

from fuzzing import arguments, rounds

from tidings.auth import mint_token

ARGS, rnd = arguments(__doc__)
PORT, SECONDS = ARGS.port, ARGS.seconds
TOK = mint_token(ARGS.secret, "u1", tenant="t", topics=["a", "b:*"])
logging.getLogger("asyncio").setLevel(logging.CRITICAL)  # "socket.send() raised exception."


def frame(payload: bytes, op=1, fin=True, mask=True, rsv=0, badlen=None):
    b0 = (0x80 if fin else 0) | (rsv << 4) | op
    n = len(payload) if badlen is None else badlen
    if n < 126:
        head = bytes([b0, (0x80 if mask else 0) | n])
    elif n < 65536:
        head = bytes([b0, (0x80 if mask else 0) | 126]) + struct.pack("!H", n)
    else:
        head = bytes([b0, (0x80 if mask else 0) | 127]) + struct.pack("!Q", n)
    if mask:
        key = os.urandom(4)
        payload = bytes(c ^ key[i % 4] for i, c in enumerate(payload))
        head += key
    return head + payload


MSGS = [
    b'{"type":"ping"}',
    b'{"type":"subscribe","topics":["a"]}',
    b'{"type":"subscribe","topics":["zzz","b:1"],"last_event_id":"x.y"}',
    b'{"type":"unsubscribe","topics":["a"]}',
    b'{"type":"mark_read","all":true}',
    b'{"type":"mark_read","notification_ids":["1","x",5]}',
    b'{"type":"resume","last_event_id":"garbage"}',
    b'{"type":"auth","token":"x"}',
    b'{"type":"nope"}',
    b"[]",
    b"{",
    b'"\xe4\xb8\xad"',
    b'{"type":"subscribe","topics":' + b'["t%d",' % 1 * 1 + b'"a"]}',
    b"\xff\xfe",
    b'{"type":"subscribe","topics":[' + b",".join(b'"t%d"' % i for i in range(200)) + b"]}",
    b'{"type":"ping","x":' + b"1" * 5000 + b"}",
]


def frames():
    out = []
    for _ in range(rnd.randint(1, 8)):
        r = rnd.random()
        if r < 0.5:
            out.append(frame(rnd.choice(MSGS)))
        elif r < 0.6:
            out.append(frame(rnd.choice(MSGS), op=2))
        elif r < 0.65:
            out.append(frame(b"", op=9))  # ping
        elif r < 0.7:
            out.append(frame(b"ab", op=rnd.choice([3, 4, 11, 15])))
        elif r < 0.75:
            out.append(frame(b'{"type":', fin=False) + frame(b'"ping"}', op=0))
        elif r < 0.78:
            out.append(frame(b'{"type":', fin=False) + frame(b"x", op=9) + frame(b'"ping"}', op=0))
        elif r < 0.8:
            out.append(frame(b"x" * 200, op=9))  # control too long
        elif r < 0.83:
            out.append(frame(rnd.choice(MSGS), mask=False))
        elif r < 0.86:
            out.append(frame(rnd.choice(MSGS), rsv=rnd.randint(1, 7)))
        elif r < 0.88:
            out.append(frame(b"abc", badlen=2**40))
        elif r < 0.9:
            out.append(frame(os.urandom(rnd.randint(0, 300)), op=1))
        elif r < 0.93:
            out.append(
                frame(struct.pack("!H", rnd.choice([1000, 1001, 999, 4000, 5000])) + b"bye", op=8)
            )
        elif r < 0.95:
            out.append(frame(b"y" * 70000))
        else:
            out.append(os.urandom(rnd.randint(1, 50)))
    return b"".join(out)


async def one(stats):
    try:
        r, w = await asyncio.open_connection("127.0.0.1", PORT)
    except OSError:
        stats["cfail"] = stats.get("cfail", 0) + 1
        return
    key = base64.b64encode(os.urandom(16)).decode()
    auth = f"Authorization: Bearer {TOK}\r\n" if rnd.random() < 0.7 else ""
    path = rnd.choice(
        [
            "/api/v1/ws",
            "/api/v1/notifications/ws",
            "/api/v1/ws?topics=a,b:2",
            "/api/v1/ws?token=" + TOK,
        ]
    )
    ext = "Sec-WebSocket-Extensions: permessage-deflate\r\n" if rnd.random() < 0.2 else ""
    w.write(
        f"GET {path} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n{auth}{ext}\r\n".encode()
    )
    try:
        head = await asyncio.wait_for(r.readuntil(b"\r\n\r\n"), 3)
        stats[head[9:12].decode()] = stats.get(head[9:12].decode(), 0) + 1
        if not auth and "token" not in path and rnd.random() < 0.7:
            w.write(frame(b'{"type":"auth","token":"%s"}' % TOK.encode()))
        data = frames()
        for i in range(0, len(data), rnd.choice([len(data) or 1, 3, 64])):
            w.write(data[i : i + 64] if i + 64 < len(data) else data[i:])
        await w.drain()
        got = b""
        try:
            while True:
                c = await asyncio.wait_for(r.read(65536), 0.3)
                if not c:
                    break
                got += c
        except TimeoutError:
            pass
        stats["ok"] = stats.get("ok", 0) + 1
    except (
        TimeoutError,
        ConnectionError,
        OSError,
        asyncio.IncompleteReadError,
        asyncio.LimitOverrunError,
    ) as e:
        stats[type(e).__name__] = stats.get(type(e).__name__, 0) + 1
    finally:
        w.close()


async def main():
    stats = {}
    await rounds(lambda: one(stats), SECONDS)
    print(json.dumps(stats))


asyncio.run(main())
