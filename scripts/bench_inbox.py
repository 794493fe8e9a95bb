#!/usr/bin/env python3
"""Inbox speed on PostgreSQL (issue 3, "Speed"); the numbers go to docs/benchmarks.md.

Loads N notifications over U users into a throwaway database (asyncpg COPY),
then measures, over many random users, through the real code path
(`tidings.inbox.Inbox` on SQLAlchemy + asyncpg):

- listing one page (page 1, page_size 20, with total and unread_count),
- listing one page of unread only,
- the unread count,

and the time of one ``POST /api/v1/notifications`` for 1,000 recipients
(the whole app in process: JSON, validation, one transaction, 1,000 pushes).

    .venv/bin/python scripts/bench_inbox.py              # 1,000,000 over 10,000 users
    .venv/bin/python scripts/bench_inbox.py --rows 100000 --users 1000   # quicker

The database is created beside the one named by --admin-url and dropped at
the end (--keep leaves it). Prints one JSON object per measurement.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import secrets
import statistics
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import httpx

from tidings import Hub, Settings, create_app
from tidings.inbox import Inbox, Query
from tidings.inbox.migrations import upgrade_to_head
from tidings.inbox.models import new_id

TENANT = "bench"
KEY = "bench-key"
COLUMNS = (
    "id",
    "tenant",
    "recipient",
    "type",
    "title",
    "content",
    "priority",
    "data",
    "sender",
    "created_at",
    "read_at",
    "idempotency_key",
)
TYPES = ("system", "like", "comment", "follow", "approval")
PRIORITIES = ("low", "normal", "normal", "normal", "high", "urgent")


def log(message: str) -> None:
    if sys.stderr.isatty():
        print(message, file=sys.stderr, flush=True)


def rows(total: int, users: int, unread_share: float) -> Iterator[tuple[Any, ...]]:
    """`total` notifications spread evenly over `users`, created over the last 60 days."""
    rng = random.Random(7)
    now = datetime.now(UTC)
    sender = json.dumps({"id": "u1", "username": "张三", "avatar": None}, ensure_ascii=False)
    data = json.dumps({"url": "/orders/42"})
    for n in range(total):
        created = now - timedelta(seconds=rng.uniform(0, 60 * 86400))
        read_at = None if rng.random() < unread_share else created + timedelta(minutes=5)
        yield (
            new_id(int(created.timestamp() * 1000)),
            TENANT,
            f"user{n % users}",
            TYPES[n % len(TYPES)],
            "工资已发放",
            "十月工资已到账，请查收。" * 3,
            PRIORITIES[n % len(PRIORITIES)],
            data,
            sender,
            created,
            read_at,
            None,
        )


async def load(dsn: str, total: int, users: int, unread_share: float) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        started = time.perf_counter()
        batch: list[tuple[Any, ...]] = []
        done = 0
        for row in rows(total, users, unread_share):
            batch.append(row)
            if len(batch) == 50_000:
                await conn.copy_records_to_table("notifications", records=batch, columns=COLUMNS)
                done += len(batch)
                batch.clear()
                log(f"  loaded {done:,} / {total:,}")
        if batch:
            await conn.copy_records_to_table("notifications", records=batch, columns=COLUMNS)
        log(f"  loaded in {time.perf_counter() - started:.1f} s; VACUUM ANALYZE")
        await conn.execute("VACUUM ANALYZE notifications")
    finally:
        await conn.close()


def summary(name: str, samples: list[float], **extra: Any) -> dict[str, Any]:
    ms = sorted(s * 1000 for s in samples)
    return {
        "measure": name,
        "n": len(ms),
        "p50_ms": round(statistics.median(ms), 3),
        "p99_ms": round(ms[max(0, int(len(ms) * 0.99) - 1)], 3),
        "max_ms": round(ms[-1], 3),
        **extra,
    }


async def timed(samples: int, users: int, call: Callable[[str], Awaitable[object]]) -> list[float]:
    rng = random.Random(11)
    for _ in range(min(200, samples)):  # warm the pool and the statement cache
        await call(f"user{rng.randrange(users)}")
    out = []
    for _ in range(samples):
        user = f"user{rng.randrange(users)}"
        started = time.perf_counter()
        await call(user)
        out.append(time.perf_counter() - started)
    return out


async def measure_reads(url: str, users: int, samples: int) -> list[dict[str, Any]]:
    inbox = Inbox(url)
    try:
        page = Query(page=1, page_size=20)
        unread_page = Query(page=1, page_size=20, unread=True)
        results = []
        for name, call in (
            ("list page (page_size 20)", lambda u: inbox.list(TENANT, u, page)),
            ("list unread page (page_size 20)", lambda u: inbox.list(TENANT, u, unread_page)),
            ("unread count", lambda u: inbox.unread_count(TENANT, u)),
        ):
            log(f"  {name} x {samples}")
            results.append(summary(name, await timed(samples, users, call)))
        return results
    finally:
        await inbox.close()


async def measure_create(url: str, users: int, recipients: int, runs: int) -> dict[str, Any]:
    settings = Settings(api_keys=[KEY], database_url=url, inbox_retention=0)
    hub = Hub(settings)
    app = create_app(settings, hub=hub)
    samples = []
    async with hub:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://bench") as client:
            for run in range(runs + 2):  # two warm-up requests
                body = {
                    "tenant": TENANT,
                    "recipients": [
                        f"user{(run * recipients + i) % users}" for i in range(recipients)
                    ],
                    "type": "system",
                    "title": "系统维护通知",
                    "content": "今晚 22:00 系统维护。",
                    "sender": {"id": "ops", "username": "运维", "avatar": None},
                }
                started = time.perf_counter()
                response = await client.post(
                    "/api/v1/notifications", json=body, headers={"Authorization": f"Bearer {KEY}"}
                )
                elapsed = time.perf_counter() - started
                if response.status_code != 201:
                    raise RuntimeError(response.text)
                if run >= 2:
                    samples.append(elapsed)
    return summary(f"POST /api/v1/notifications, {recipients} recipients", samples)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--admin-url", default="postgresql://postgres@127.0.0.1:5432/test")
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--users", type=int, default=10_000)
    parser.add_argument("--unread", type=float, default=0.3, help="share of unread rows")
    parser.add_argument("--samples", type=int, default=5000, help="reads per measurement")
    parser.add_argument("--recipients", type=int, default=1000)
    parser.add_argument("--runs", type=int, default=30, help="create requests to time")
    parser.add_argument("--keep", action="store_true", help="do not drop the database")
    args = parser.parse_args()

    name = "tidings_bench_" + secrets.token_hex(4)
    admin = await asyncpg.connect(args.admin_url)
    await admin.execute(f'CREATE DATABASE "{name}"')
    dsn = args.admin_url.rsplit("/", 1)[0] + "/" + name
    url = dsn.replace("postgresql://", "postgresql+asyncpg://", 1)
    try:
        await upgrade_to_head(url)
        log(f"loading {args.rows:,} notifications over {args.users:,} users into {name}")
        await load(dsn, args.rows, args.users, args.unread)
        context = {"rows": args.rows, "users": args.users, "unread_share": args.unread}
        print(json.dumps({"setup": context}), flush=True)
        for result in await measure_reads(url, args.users, args.samples):
            print(json.dumps(result, ensure_ascii=False), flush=True)
        result = await measure_create(url, args.users, args.recipients, args.runs)
        print(json.dumps(result, ensure_ascii=False), flush=True)
    finally:
        if not args.keep:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


if __name__ == "__main__":
    asyncio.run(main())
