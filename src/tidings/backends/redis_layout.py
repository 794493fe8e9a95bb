"""The Redis backend's keys, and the Lua scripts that keep them consistent.

Layout (every key starts with the URL's ``?prefix=``, default ``tidings``)::

    <p>:epoch                  string  names the history; a cursor carries it
    <p>:gen                    counter one per publish; a smaller value after a
                                       reconnect means Redis lost writes (rollback)
    <p>:n:<len>:<tenant>       hash    stream -> its last position (1, 2, 3 …)
    <p>:h:<len>:<tenant>:<s>   stream  history, entry id ``<position>-0``, field ``e``
                                       = the event as JSON; MAXLEN ~ history_size,
                                       the key expires history_ttl after its last write
    <p>:k:<key>                string  idempotency claims (SET NX PX)
    <p>:ev                     channel every event, for every instance

PUBLISH, HISTORY and TOPS check the epoch first: a caller that knew another
epoch gets the error `EPOCH_ERROR` instead of writing under, or reading from, a
history that is not the one its cursors name. SYNC_EPOCH sets a new epoch when
Redis has none or rolled back.
"""

from __future__ import annotations

from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

__all__ = [
    "EPOCH_ERROR",
    "HISTORY",
    "PUBLISH",
    "PUBLISH_ONCE",
    "SYNC_EPOCH",
    "TOPS",
    "split_url",
    "tenant_part",
]

EPOCH_ERROR = "TIDINGS_EPOCH"

# KEYS: epoch, gen, counters, history_1 … history_n
# ARGV: epoch, size, ttl_ms, channel, head, tail, then per stream: name, json name, is_user
_PUBLISH_BODY = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return redis.error_reply('TIDINGS_EPOCH') end
local gen = redis.call('INCR', KEYS[2])
local n = #KEYS - 3
local seqs, parts, shared = {}, {}, {}
for i = 1, n do
  local b = 7 + (i - 1) * 3
  local seq = redis.call('HINCRBY', KEYS[3], ARGV[b], 1)
  seqs[i] = seq
  parts[i] = '[' .. ARGV[b + 1] .. ',' .. seq .. ']'
  if ARGV[b + 2] == '0' then shared[#shared + 1] = parts[i] end
end
local size, ttl = tonumber(ARGV[2]), tonumber(ARGV[3])
if size > 0 then
  local common = table.concat(shared, ',')
  for i = 1, n do
    local list = common
    if ARGV[7 + (i - 1) * 3 + 2] == '1' then
      if #shared > 0 then list = parts[i] .. ',' .. common else list = parts[i] end
    end
    local key = KEYS[3 + i]
    redis.call('XADD', key, 'MAXLEN', '~', size, seqs[i] .. '-0', 'e',
               ARGV[5] .. '[' .. list .. ']' .. ARGV[6])
    if ttl > 0 then redis.call('PEXPIRE', key, ttl) end
  end
end
redis.call('PUBLISH', ARGV[4], gen .. ' ' .. ARGV[1] .. ' ' .. ARGV[5] .. '['
           .. table.concat(parts, ',') .. ']' .. ARGV[6])
"""
PUBLISH = _PUBLISH_BODY + "return seqs\n"

# An idempotent publish: the claim and the publish in one script, so neither happens
# without the other (no window in which a claim outlives a failed publish, nor one in
# which a repeat is told of a publish that then fails).
# KEYS: claim, then PUBLISH's. ARGV: the event id, the claim's ttl_ms, then PUBLISH's.
# -> {seq_1 … seq_n}, or {'claimed', earlier event id}
PUBLISH_ONCE = (
    """
local claim = table.remove(KEYS, 1)
local event_id, claim_ms = table.remove(ARGV, 1), table.remove(ARGV, 1)
local earlier = redis.call('GET', claim)
if earlier then return {'claimed', earlier} end
"""
    + _PUBLISH_BODY
    + """redis.call('SET', claim, event_id, 'PX', claim_ms)
return seqs
"""
)

# KEYS: epoch, counters, history. ARGV: epoch, stream, after, most
# -> {top} or {top, id1, body1, id2, body2, …}
HISTORY = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return redis.error_reply('TIDINGS_EPOCH') end
local top = tonumber(redis.call('HGET', KEYS[2], ARGV[2]) or '0')
local after = tonumber(ARGV[3])
local out = {top}
if after >= top or top - after > tonumber(ARGV[4]) then return out end
local entries = redis.call('XRANGE', KEYS[3], (after + 1) .. '-0', '+', 'COUNT', top - after)
for _, entry in ipairs(entries) do
  out[#out + 1] = entry[1]
  out[#out + 1] = entry[2][2]
end
return out
"""

# KEYS: epoch, counters. ARGV: epoch, stream … -> positions
TOPS = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return redis.error_reply('TIDINGS_EPOCH') end
local out = {}
for i = 2, #ARGV do out[i - 1] = tonumber(redis.call('HGET', KEYS[2], ARGV[i]) or '0') end
return out
"""

# KEYS: epoch, gen. ARGV: candidate epoch, the epoch we knew ('' if none), highest gen we saw
# -> {epoch, gen}: a new epoch when Redis has none, or rolled back behind what we saw.
SYNC_EPOCH = """
local cur = redis.call('GET', KEYS[1])
local gen = tonumber(redis.call('GET', KEYS[2]) or '0')
if (not cur) or (cur == ARGV[2] and gen < tonumber(ARGV[3])) then
  redis.call('SET', KEYS[1], ARGV[1])
  return {ARGV[1], gen}
end
return {cur, gen}
"""


def split_url(url: str) -> tuple[str, str]:
    """-> (the URL for redis-py, the key prefix from ``?prefix=``, default ``tidings``)."""
    parts = urlsplit(url)
    query = parse_qsl(parts.query, keep_blank_values=True)
    prefix = "tidings"
    kept = []
    for key, value in query:
        if key == "prefix":
            prefix = value or prefix
        else:
            kept.append((key, value))
    return urlunsplit(parts._replace(query=urlencode(kept))), prefix


def tenant_part(tenant: str) -> str:
    # The length makes `<tenant>:<stream>` unambiguous whatever the tenant contains.
    return f"{len(tenant)}:{tenant}"
