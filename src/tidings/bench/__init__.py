"""`tidings bench SCENARIO`: load scenarios against tidings, alone or side by side with Nchan.

Scenarios (each prints one JSON line on stdout, and a table for people):

    fanout      N subscribers on one topic, M messages --interval s apart: per
                message, the time until the first and the last subscriber had it
    idle        N streams held --hold s on a fresh server: RSS per connection,
                CPU while idle
    throughput  N subscribers, P publishers flat out for --duration s: deliveries/s
    publish     single publishes/s through the publish API (P publishers, no subscribers)
    connects    N subscribers connecting, each with its own JWT: connects/s
    capacity    N connections held (spread over harness processes), all live
    cluster     publish on one instance, subscribe on another (--broker redis://
                or nats://): the latency added over memory://, p50/p99

Without --url the bench starts fresh ``tidings serve`` processes (a throw-away
database and credentials) and stops them afterwards; --pin puts them on one CPU
(taskset) and the harness on another. With --url it needs --key (an API key) and
--secret (TIDINGS_JWT_SECRET, to mint subscribers' tokens); --pid names the
server's processes for the memory and CPU figures. --compare runs the same
scenario against a fresh Nchan (nginx + the nchan module, the configuration
shipped in this package) and prints the ratio with issue 8's bound.

Subscribers are raw asyncio protocols (SSE or WebSocket) on uvloop, spread over
source addresses 127.0.0.2-127.0.0.9 (--src-ips). Each message's data is a
marker ``q<seq>t<send_ns>z`` found anywhere in the byte stream, so latency is
the receive time minus the send time in the marker (one host, one clock).

Exit codes: 0 complete, 1 the run finished incomplete (a delivery or connection
missing), 2 bad usage or a server that would not start.
"""

from __future__ import annotations

from .cli import add_parser, run

__all__ = ["add_parser", "run"]
