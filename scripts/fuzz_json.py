"""Fuzz the JSON API: random and nearly valid bodies (Chinese text, NUL, huge numbers,
wrong types) and query strings on publish, the inbox and admin endpoints. Run it against
PostgreSQL too (TIDINGS_DATABASE_URL): it found that PostgreSQL's text cannot hold NUL.

Against a running server whose API key and JWT secret you pass:

    PYTHONPATH=src python scripts/fuzz_json.py --port 8000 --key KEY --secret SECRET \
        [--seconds 60] [--seed 1]

It prints one JSON line of counts; a 5xx (but 503), or a 4xx that is not
JSON, is printed with its request. Read the server's log afterwards:
a ``Traceback`` there is a finding too (a client's fault is answered, never logged as
the server's own error).
"""

import asyncio
import json

import httpx
from fuzzing import arguments, rounds

from tidings.auth import mint_token

ARGS, rnd = arguments(__doc__)
PORT, SECONDS = ARGS.port, ARGS.seconds
BASE = f"http://127.0.0.1:{PORT}"
USER = mint_token(ARGS.secret, "u1", tenant="t", topics=["a", "b:*"], publish=["a"])
ADMIN = mint_token(ARGS.secret, "adm", tenant="t", admin=True)
KEY = ARGS.key
ATOMS = [
    None,
    True,
    False,
    0,
    -1,
    1.5,
    2**70,
    -(2**63),
    1e308,
    "",
    "a",
    "中文",
    "工资已发放",
    "x" * 300,
    "\u0000",
    "\ud7ff",
    "$x",
    "a:b",
    "u1",
    "t",
    "*",
    "**",
    "message",
    "welcome",
    [],
    {},
    [1],
    ["a"],
    ["u1", "u1"],
    ["中"],
    {"a": 1},
]
KEYS = [
    "users",
    "topics",
    "broadcast",
    "event",
    "data",
    "tenant",
    "idempotency_key",
    "messages",
    "recipients",
    "recipient",
    "title",
    "body",
    "content",
    "type",
    "category",
    "priority",
    "link",
    "ids",
    "notification_ids",
    "all",
    "user",
    "extra",
    "payload",
    "page",
    "page_size",
    "read",
    "expires_at",
    "metadata",
    "sender",
]


def value(depth=0):
    r = rnd.random()
    if depth > 2 or r < 0.6:
        return rnd.choice(ATOMS)
    if r < 0.8:
        return [value(depth + 1) for _ in range(rnd.randint(0, 4))]
    return {rnd.choice(KEYS): value(depth + 1) for _ in range(rnd.randint(0, 5))}


TEMPLATES = {
    "/api/v1/publish": lambda: {"topics": ["a"], "event": "e", "data": value()},
    "/api/v1/publish/batch": lambda: {
        "messages": [{"users": ["u1"], "data": value()}, {"topics": ["a", "b:1"], "data": value()}]
    },
    "/api/v1/notifications": lambda: {
        "recipients": ["u1", "u2"],
        "title": "工资已发放",
        "content": "本月工资 8650 元",
        "type": "payroll",
        "data": value(),
    },
    "/api/v1/notifications/read": lambda: {
        "ids": [rnd.choice(IDS)],
        "all": rnd.choice([True, False]),
    },
    "/api/v1/disconnect": lambda: {"user": "u1", "tenant": "t"},
}


def body(path=""):
    t = TEMPLATES.get(path)
    if t is not None and rnd.random() < 0.6:
        d = t()
        if rnd.random() < 0.5:
            d[rnd.choice(KEYS)] = value()
        return d
    d = {rnd.choice(KEYS): value() for _ in range(rnd.randint(0, 6))}
    if rnd.random() < 0.3:
        d["messages"] = [
            {rnd.choice(KEYS): value() for _ in range(rnd.randint(0, 5))}
            for _ in range(rnd.randint(0, 3))
        ]
    return d if rnd.random() < 0.9 else value()


def query():
    return {
        rnd.choice(
            [
                "page",
                "page_size",
                "read",
                "unread",
                "category",
                "type",
                "since",
                "before",
                "topics",
                "tenant",
                "q",
                "limit",
                "cursor",
            ]
        ): str(rnd.choice(ATOMS))
        for _ in range(rnd.randint(0, 3))
    }


ENDPOINTS = [
    ("POST", "/api/v1/publish"),
    ("POST", "/api/v1/publish/batch"),
    ("POST", "/api/v1/notifications"),
    ("GET", "/api/v1/notifications"),
    ("GET", "/api/v1/notifications/unread-count"),
    ("PUT", "/api/v1/notifications/read"),
    ("GET", "/api/v1/notifications/{id}"),
    ("DELETE", "/api/v1/notifications/{id}"),
    ("PUT", "/api/v1/notifications/{id}/read"),
    ("GET", "/api/v1/stats"),
    ("GET", "/api/v1/presence"),
    ("GET", "/api/v1/presence/{id}"),
    ("POST", "/api/v1/disconnect"),
]
IDS = ["1", "0", "-1", "abc", "中文", "9" * 40, "%00", "..", "1.5", "n_1"]


async def main():
    stats = {}
    bad = []
    async with httpx.AsyncClient(base_url=BASE, timeout=10) as c:

        async def one():
            method, path = rnd.choice(ENDPOINTS)
            path = path.replace("{id}", rnd.choice(IDS))
            auth = rnd.choice([USER, ADMIN, KEY, KEY, "junk"])
            headers = {"Authorization": f"Bearer {auth}"}
            kw = {}
            if method in ("POST", "PUT"):
                if rnd.random() < 0.9:
                    kw["content"] = json.dumps(body(path), ensure_ascii=rnd.random() < 0.5)
                else:
                    kw["content"] = rnd.choice([b"", b"{", b"\xff", b"[]", b"1e999", b'{"a":NaN}'])
                headers["Content-Type"] = "application/json"
            try:
                r = await c.request(method, path, params=query(), headers=headers, **kw)
            except httpx.HTTPError as e:
                stats["httperr:" + type(e).__name__] = (
                    stats.get("httperr:" + type(e).__name__, 0) + 1
                )
                return
            stats[r.status_code] = stats.get(r.status_code, 0) + 1
            if (r.status_code >= 500 and r.status_code != 503) or (
                r.status_code >= 400 and "application/json" not in r.headers.get("content-type", "")
            ):
                bad.append(
                    (
                        method,
                        path,
                        kw.get("content", "")[:300]
                        if isinstance(kw.get("content"), str)
                        else kw.get("content"),
                        r.status_code,
                        r.text[:200],
                    )
                )

        await rounds(one, SECONDS, width=10)
    print(json.dumps({str(k): v for k, v in stats.items()}))
    seen = set()
    for b in bad:
        parts = b[1].split("/")
        kind = (b[0], parts[3] if len(parts) > 3 else b[1], b[3])  # method, resource, status
        if kind in seen:
            continue
        seen.add(kind)
        print("BAD", b)


asyncio.run(main())
