"""Presence across instances on Redis (see presence.py for the model).

Layout (``<p>`` is the broker URL's ``?prefix=``, default ``tidings``; ``<i>`` an
instance id; ``<n>:<T>`` a tenant, its length in bytes first)::

    <p>:pr:live            zset    instance -> expiry (ms, Redis's own clock)
    <p>:pr:info            hash    instance -> JSON (host, pid, totals, uptime)
    <p>:pr:tn:<i>          set     tenants instance i wrote records for
    <p>:pr:u:<i>:<n>:<T>   hash    user -> i's connections of that user
    <p>:pr:t:<i>:<n>:<T>   hash    topic -> i's connections reading it
    <p>:pr:s:<i>           hash    tenant -> JSON [connections, published, delivered, dropped]

A heartbeat (one script) moves this instance's expiry forward and deletes every
instance whose expiry passed, with everything it wrote; it reports whether
this instance itself was missing, so that the caller rewrites its records.
Changes are written per user and topic (HSET/HDEL), in one MULTI. Reads are one
script each, which keeps to the live instances (expiry after Redis's now), so
a crashed instance is invisible the moment its TTL ends, deleted or not yet.
Judging expiry by Redis's clock keeps the instances' clocks out of it.
"""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from ..errors import BackendUnavailable
from ..presence_store import Change, InstanceView, Summary, TenantView, decode_summary
from .redis_layout import split_url

_NOW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local base = ARGV[1] .. ':pr:'
local function suffix(id, tenant) return id .. ':' .. #tenant .. ':' .. tenant end
"""

# KEYS: live, info. ARGV: prefix, instance, ttl_ms, info, mode (beat | clear | stop)
# -> 1 when the instance was missing (absent or expired), else 0
_BEAT = (
    _NOW
    + """
local function clear(id)
  local ten = base .. 'tn:' .. id
  for _, tenant in ipairs(redis.call('SMEMBERS', ten)) do
    redis.call('DEL', base .. 'u:' .. suffix(id, tenant), base .. 't:' .. suffix(id, tenant))
  end
  redis.call('DEL', ten, base .. 's:' .. id)
end
local function drop(id)
  clear(id)
  redis.call('HDEL', KEYS[2], id)
  redis.call('ZREM', KEYS[1], id)
end
local me = ARGV[2]
if ARGV[5] == 'clear' then clear(me) return 0 end
if ARGV[5] == 'stop' then drop(me) return 0 end
local score = redis.call('ZSCORE', KEYS[1], me)
local missing = 0
if (not score) or tonumber(score) <= now then missing = 1 end
for _, id in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now)) do drop(id) end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[3]), me)
redis.call('HSET', KEYS[2], me, ARGV[4])
return missing
"""
)

# KEYS: live, info. ARGV: prefix, instance (left out), mode, tenant, user
# user -> connections; users -> [user …]; tenant / all -> [id, info, [tenant, users, topics,
# summary, …], …] for every other live instance
_READ = (
    _NOW
    + """
local me, mode, tenant = ARGV[2], ARGV[3], ARGV[4]
local others = {}
for _, id in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], '(' .. now, '+inf')) do
  if id ~= me then others[#others + 1] = id end
end
if mode == 'user' then
  local total = 0
  for _, id in ipairs(others) do
    total = total + tonumber(redis.call('HGET', base .. 'u:' .. suffix(id, tenant), ARGV[5]) or '0')
  end
  return total
end
local out = {}
if mode == 'users' then
  for _, id in ipairs(others) do
    for _, user in ipairs(redis.call('HKEYS', base .. 'u:' .. suffix(id, tenant))) do
      out[#out + 1] = user
    end
  end
  return out
end
for _, id in ipairs(others) do
  local tenants
  if mode == 'tenant' then tenants = {tenant}
  else tenants = redis.call('SMEMBERS', base .. 'tn:' .. id) end
  local per = {}
  for _, name in ipairs(tenants) do
    per[#per + 1] = name
    per[#per + 1] = redis.call('HKEYS', base .. 'u:' .. suffix(id, name))
    per[#per + 1] = redis.call('HKEYS', base .. 't:' .. suffix(id, name))
    per[#per + 1] = redis.call('HGET', base .. 's:' .. id, name) or ''
  end
  out[#out + 1] = id
  out[#out + 1] = redis.call('HGET', KEYS[2], id) or ''
  out[#out + 1] = per
end
return out
"""
)


def _str(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class RedisPresence:
    """`PresenceStore` on the broker's Redis: see the module docstring."""

    def __init__(self, url: str, instance: str, ttl: float) -> None:
        self.url, self.prefix = split_url(url)
        self.instance = instance
        self._ttl_ms = max(1, int(ttl * 1000))
        base = f"{self.prefix}:pr:"
        self._base = base
        self._live = base + "live"
        self._info = base + "info"
        self._redis: aioredis.Redis = aioredis.Redis.from_url(
            self.url, socket_connect_timeout=2.0, socket_timeout=5.0
        )
        self._beat = self._redis.register_script(_BEAT)
        self._read = self._redis.register_script(_READ)
        self._tenants: set[str] = set()  # tenants in our `tn` set

    def _key(self, kind: str, tenant: str) -> str:
        return f"{self._base}{kind}:{self.instance}:{len(tenant.encode())}:{tenant}"

    async def _call(self, script: Any, *args: Any) -> Any:
        try:
            return await script(keys=[self._live, self._info], args=[self.prefix, *args])
        except (RedisError, OSError, TimeoutError) as exc:
            raise BackendUnavailable(f"presence on Redis failed: {exc}") from exc

    # -- lifecycle -------------------------------------------------------------------

    async def open(self) -> None:
        try:
            async with asyncio.timeout(5.0):
                await self._redis.ping()
        except (RedisError, OSError, TimeoutError) as exc:
            raise BackendUnavailable(f"presence: Redis does not answer: {exc}") from exc

    async def close(self) -> None:
        await self._redis.aclose()

    # -- writing ---------------------------------------------------------------------

    async def heartbeat(self, info: dict[str, Any]) -> bool:
        args = (self.instance, self._ttl_ms, orjson.dumps(info), "beat")
        return bool(await self._call(self._beat, *args))

    async def write(
        self, changes: dict[Change, int], summaries: dict[str, Summary], *, full: bool
    ) -> None:
        pipe = self._redis.pipeline(transaction=True)
        if full:
            await self._beat(  # queued in the pipeline: runs first, in the MULTI
                keys=[self._live, self._info],
                args=[self.prefix, self.instance, 0, b"", "clear"],
                client=pipe,
            )
            self._tenants = set()
        sets: dict[str, dict[str, int]] = {}
        dels: dict[str, list[str]] = {}
        tenants = set(summaries)
        for (tenant, kind, name), count in changes.items():
            tenants.add(tenant)
            key = self._key(kind, tenant)
            if count:
                sets.setdefault(key, {})[name] = count
            else:
                dels.setdefault(key, []).append(name)
        new = tenants - self._tenants
        if new:
            pipe.sadd(f"{self._base}tn:{self.instance}", *new)
        for key, mapping in sets.items():
            pipe.hset(key, mapping=mapping)  # type: ignore[arg-type]
        for key, names in dels.items():
            pipe.hdel(key, *names)
        if summaries:
            encoded = {t: orjson.dumps(s) for t, s in summaries.items()}
            pipe.hset(f"{self._base}s:{self.instance}", mapping=encoded)  # type: ignore[arg-type]
        try:
            await pipe.execute()
        except (RedisError, OSError, TimeoutError) as exc:
            raise BackendUnavailable(f"presence on Redis failed: {exc}") from exc
        self._tenants |= new

    async def remove(self) -> None:
        await self._call(self._beat, self.instance, 0, b"", "stop")

    # -- reading ---------------------------------------------------------------------

    async def users(self, tenant: str) -> set[str]:
        return {_str(u) for u in await self._call(self._read, self.instance, "users", tenant, "")}

    async def connections(self, tenant: str, user_id: str) -> int:
        return int(await self._call(self._read, self.instance, "user", tenant, user_id))

    async def instances(self, tenant: str | None) -> list[InstanceView]:
        mode = "all" if tenant is None else "tenant"
        reply = await self._call(self._read, self.instance, mode, tenant or "", "")
        views = []
        for i in range(0, len(reply), 3):
            instance_id, info, per = _str(reply[i]), reply[i + 1], reply[i + 2]
            view = InstanceView(instance_id, orjson.loads(info) if info else {})
            for j in range(0, len(per), 4):
                name, users, topics, summary = per[j : j + 4]
                tv = TenantView({_str(u) for u in users}, {_str(t) for t in topics})
                if summary:
                    tv.summary(decode_summary(summary))
                view.tenants[_str(name)] = tv
            views.append(view)
        return views
