"""The NATS JetStream backend (`nats://`): several instances on one NATS form one service.

Layout (names from the URL's ``?prefix=``, default ``tidings``; ``P`` is its
upper case; tenant and stream names as subject tokens, see layout.py)::

    stream P_E    <p>.e.<tenant>: the commits, one message per published batch
                  of events, each event with its position in each of its
                  streams; chained per tenant (each names the previous one and
                  was appended with Nats-Expected-Last-Subject-Sequence on it);
                  the last 1000 per tenant are kept. Every instance's fan-out.
    stream P_H    <p>.h.<tenant>.<stream>: history, one copy per event and
                  stream (header Tidings-Pos), MaxMsgsPerSubject =
                  history_size, MaxAge = history_ttl
    kv     P_SEQ  <tenant>.<stream> -> the stream's last position (no expiry,
                  so a stream whose history expired goes on counting); `epoch`
    kv     P_IDEM idempotency claims (create = set if absent; the bucket's TTL)
    subject <p>.ctl  control events (core NATS, to every instance)

The commit is the one atomic step of a publish, as the Lua script is on
Redis: it takes the positions (contiguous per stream, from the previous
commit's), and its place in the tenant's chain is the order every instance
dispatches it in. History copies and counters are written after it, before
the tenant's next commit (writer.py); whoever finds them missing writes them
(reader.py). Modules, one idea each:

    layout.py   names, stream settings, message bodies (no I/O)
    store.py    JetStream primitives
    views.py    what this instance knows of each tenant's chain
    writer.py   publishing: lanes, commits, materialising history
    reader.py   tops and exact history
    backend.py  `NatsBackend`: connection, recovery, fan-out, claims
"""

from .backend import NatsBackend
from .layout import split_url, token

__all__ = ["NatsBackend", "split_url", "token"]
