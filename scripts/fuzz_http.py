"""Fuzz the HTTP side: mutated, pipelined, split and truncated requests on every path.

Against a running server whose API key and JWT secret you pass:

    PYTHONPATH=src python scripts/fuzz_http.py --port 8000 --key KEY --secret SECRET \
        [--seconds 60] [--seed 1]

It prints one JSON line of counts; a 5xx, or a 4xx that is not JSON, is printed
with its request. Read the server's log afterwards:
a ``Traceback`` there is a finding too (a client's fault is answered, never logged as
the server's own error).
"""

import asyncio
import collections
import json

from fuzzing import arguments, rounds

from tidings.auth import mint_token

ARGS, rnd = arguments(__doc__)
PORT, SECONDS = ARGS.port, ARGS.seconds
TOK = mint_token(ARGS.secret, "u1", tenant="t", topics=["a", "b"])
KEY = ARGS.key
BODIES = [
    b'{"topics":["a"],"data":"x"}',
    b'{"users":["u1"],"event":"e.v","data":{"k":[1,2,"\xe4\xb8\xad"]}}',
    b'{"broadcast":true}',
    b"{}",
    b"[]",
    b"null",
    b'{"topics":"a","idempotency_key":"k1","data":1}',
    b'{"topics":["a"],"tenant":"t","data":"\xe5\xb7\xa5\xe8\xb5\x84"}',
    b"",
    b"{",
    b"\xff\xfe",
]
PATHS = [
    b"/api/v1/publish",
    b"/api/v1/stream",
    b"/api/v1/stream?topics=a",
    b"/api/v1/notifications/stream",
    b"/api/v1/ws",
    b"/api/v1/notifications",
    b"/api/v1/notifications/unread-count",
    b"/healthz",
    b"/readyz",
    b"/api/sse/events",
    b"/sse/stream",
    b"/api/v1/publish/batch",
    b"/api/v1/stream?topics=a&token=" + TOK.encode(),
    b"/api/v1/stream?last_event_id=zzz",
    b"/%ff%fe",
    b"/api/v1/stream?topics=" + b"x" * 300,
]
METHODS = [b"GET", b"POST", b"PUT", b"DELETE", b"HEAD", b"OPTIONS", b"PATCH", b"G\x00T"]


def headers():
    hs = []
    if rnd.random() < 0.7:
        hs.append(
            b"Authorization: Bearer "
            + rnd.choice([TOK.encode(), KEY.encode(), b"", b"x.y.z", TOK.encode()[:-3]])
        )
    if rnd.random() < 0.3:
        hs.append(b"Authorization: Bearer " + KEY.encode())
    if rnd.random() < 0.3:
        hs.append(b"Cookie: tidings_token=" + TOK.encode())
    if rnd.random() < 0.3:
        hs.append(b"Last-Event-ID: " + rnd.choice([b"abc", b"", b"a.b.c", b"\xff" * 5, b"1" * 500]))
    if rnd.random() < 0.2:
        hs.append(b"Connection: " + rnd.choice([b"close", b"keep-alive", b"upgrade"]))
    if rnd.random() < 0.2:
        hs.append(b"Upgrade: websocket")
    if rnd.random() < 0.2:
        hs.append(b"Transfer-Encoding: " + rnd.choice([b"chunked", b"gzip", b"chunked, chunked"]))
    if rnd.random() < 0.2:
        hs.append(b"X-Forwarded-For: " + rnd.choice([b"1.2.3.4", b"", b"garbage"]))
    if rnd.random() < 0.1:
        hs.append(b"Content-Type: text/plain")
    if rnd.random() < 0.1:
        hs.append(b"X-Long: " + b"a" * rnd.choice([10, 5000, 70000]))
    if rnd.random() < 0.05:
        hs.append(b"Bad Header")
    if rnd.random() < 0.05:
        hs.append(b"Host: a\r\nHost: b")
    return hs


def request():
    method = rnd.choice(METHODS[:3]) if rnd.random() < 0.8 else rnd.choice(METHODS)
    path = rnd.choice(PATHS)
    body = rnd.choice(BODIES) if method != b"GET" or rnd.random() < 0.1 else b""
    hs = [b"Host: x", *headers()]
    cl = rnd.random()
    if cl < 0.7:
        hs.append(b"Content-Length: %d" % len(body))
    elif cl < 0.8:
        hs.append(
            b"Content-Length: "
            + rnd.choice([b"", b"-1", b"abc", b"99999999999", b"%d" % (len(body) + 3), b"1, 2"])
        )
    elif cl < 0.85:
        hs.append(b"Content-Length: %d\r\nContent-Length: %d" % (len(body), len(body) + 1))
    version = (
        b"HTTP/1.1"
        if rnd.random() < 0.9
        else rnd.choice([b"HTTP/1.0", b"HTTP/2", b"HTTP/1.1x", b""])
    )
    raw = method + b" " + path + b" " + version + b"\r\n" + b"\r\n".join(hs) + b"\r\n\r\n" + body
    if rnd.random() < 0.05:
        i = rnd.randrange(len(raw))
        raw = raw[:i] + bytes([rnd.randrange(256)]) + raw[i + 1 :]
    return raw


async def one(stats):
    try:
        r, w = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", PORT), 5)
    except Exception:
        stats["connect_fail"] = stats.get("connect_fail", 0) + 1
        return
    n = rnd.choice([1, 1, 1, 2, 3, 5])
    data = b"".join(request() for _ in range(n))
    try:
        if rnd.random() < 0.3:
            for i in range(0, len(data), rnd.choice([1, 7, 50])):
                w.write(data[i : i + 50])
                await w.drain()
                if rnd.random() < 0.1:
                    await asyncio.sleep(0)
        else:
            w.write(data)
            await w.drain()
        if rnd.random() < 0.1:
            w.write_eof()
        got = b""
        try:
            while len(got) < 200000:
                chunk = await asyncio.wait_for(r.read(65536), 0.3)
                if not chunk:
                    break
                got += chunk
        except TimeoutError:
            pass
        for line in got.split(b"\r\n"):
            if line.startswith(b"HTTP/1.1 5"):
                stats.setdefault("5xx", []).append((data[:300], got[:300]))
        stats["ok"] = stats.get("ok", 0) + 1
        for part in got.split(b"HTTP/1.1 ")[1:]:
            code = part[:3]
            stats.setdefault("codes", {}).setdefault(code.decode("latin-1"), 0)
            stats["codes"][code.decode("latin-1")] += 1
            if (
                code[:1] == b"4"
                and b"application/json" not in part[:2000]
                and b"upgrade" not in part[:200].lower()
            ):
                stats.setdefault("non_json_4xx", []).append((data[:200], part[:300]))
    except (ConnectionError, OSError):
        stats["reset"] = stats.get("reset", 0) + 1
    finally:
        w.close()


async def main():
    stats = {}
    await rounds(lambda: one(stats), SECONDS)
    print(json.dumps({k: (v if not isinstance(v, list) else len(v)) for k, v in stats.items()}))
    cat = collections.Counter()
    for _req, resp in stats.get("non_json_4xx", []):
        body = resp.split(b"\r\n\r\n", 1)[-1][:60]
        cat[(resp[:3], body)] += 1
    for k, v in cat.most_common():
        print(v, k)
    for k in ("5xx", "non_json_4xx"):
        seen = set()
        for req, resp in stats.get(k, []):
            key = resp[:40]
            if key in seen:
                continue
            seen.add(key)
            print(k, "REQ", req[:200], "\n   RESP", resp[:300])


asyncio.run(main())
