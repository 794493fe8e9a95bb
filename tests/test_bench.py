"""`tidings bench`: every scenario at a tiny size against servers it starts itself.

No timing assertions: the machine is shared. Each run must finish, exit 0 and
print complete JSON results (every field there, every delivery counted). The
--compare runs need nginx with the nchan module (CI installs it: .ci/run); the
cluster runs need the real Redis and NATS of the integration tests.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
from typing import Any

import pytest

from tidings.bench import nchan
from tidings.bench.brokers import with_prefix
from tidings.bench.dial import parse_src_ips
from tidings.bench.report import Headline, percentile
from tidings.bench.subscribers import Collector, Stream, WSStream

RUN_TIMEOUT = 180.0  # bound on one bench command; never reached when things work

COMMON = {"scenario", "n", "complete", "target", "ts", "loadavg", "harness_cpus"}
FIELDS: dict[str, set[str]] = {
    "fanout": {
        "last_p50_ms",
        "last_p99_ms",
        "first_p50_ms",
        "delivery_p99_ms",
        "received",
        "expected",
        "subscribers_ready",
        "publish_status",
        "server_cpu_s_publish",
        "server_rss_kb_loaded",
    },
    "idle": {
        "kb_per_conn",
        "kb_per_conn_pss",
        "server_rss_kb_before",
        "server_rss_kb_after_hold",
        "server_cpu_s_hold",
        "alive_after_hold",
        "heartbeat_bytes_per_conn",
    },
    "throughput": {"deliveries_per_s", "publishes_per_s", "deliveries", "deliveries_expected"},
    "publish": {"publishes_per_s", "publish_rtt_p50_ms", "publish_status"},
    "connects": {"connects_per_s", "server_us_per_connect", "subscribers_ready", "connect_p50_ms"},
    "capacity": {"connections", "probe_received", "alive_after_hold", "kb_per_conn"},
}
TINY: dict[str, list[str]] = {
    "fanout": ["-n", "20", "--messages", "3", "--interval", "0.01", "--settle", "0"],
    "idle": ["-n", "20", "--hold", "0.5"],
    "throughput": ["-n", "5", "--publishers", "2", "--duration", "0.5", "--settle", "0"],
    "publish": ["--publishers", "2", "--duration", "0.5"],
    "connects": ["-n", "30"],
    "capacity": ["-n", "30", "--hold", "0.2"],
}


def bench(*args: str) -> tuple[int, list[dict[str, Any]], str]:
    """Run ``tidings bench ARGS``: (exit code, the JSON lines on stdout, stderr)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TIDINGS_")}
    done = subprocess.run(
        [sys.executable, "-m", "tidings", "bench", *args],
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT,
    )
    return done.returncode, [json.loads(line) for line in done.stdout.splitlines()], done.stderr


def assert_complete(result: dict[str, Any], scenario: str) -> None:
    missing = (COMMON | FIELDS.get(scenario, set())) - result.keys()
    assert not missing, f"{scenario}: missing {sorted(missing)} in {result}"
    assert result["scenario"] == scenario
    assert result["complete"] is True, result


@pytest.mark.parametrize("scenario", list(TINY))
def test_each_scenario_against_its_own_server(scenario: str) -> None:
    code, lines, err = bench(scenario, *TINY[scenario])
    assert code == 0, err
    assert len(lines) == 1
    assert_complete(lines[0], scenario)
    assert lines[0]["target"] == "tidings"
    assert scenario in err  # the table, on stderr when stdout is piped


def test_fanout_over_websocket_pinned() -> None:
    code, lines, err = bench("fanout", *TINY["fanout"], "--transport", "ws", "--pin", "0:0")
    assert code == 0, err
    (result,) = lines
    assert_complete(result, "fanout")
    assert result["transport"] == "ws" and result["received"] == result["expected"] == 60
    assert result["harness_cpus"] == [0]


def test_fanout_without_source_addresses_and_with_two_connects_in_flight() -> None:
    code, lines, err = bench("fanout", *TINY["fanout"], "--src-ips", "", "--concurrency", "2")
    assert code == 0, err
    assert_complete(lines[0], "fanout")


def test_capacity_spreads_over_harness_processes() -> None:
    # 30 connections with a cap that leaves room for 10 per process: 3 children.
    code, lines, err = bench("capacity", "-n", "30", "--hold", "0", "--per-process", "10")
    assert code == 0, err
    assert_complete(lines[0], "capacity")
    assert lines[0]["harness_processes"] == 3 and lines[0]["probe_received"] == 30


NCHAN_MISSING = nchan.available()


@pytest.mark.skipif(NCHAN_MISSING is not None, reason=f"no Nchan: {NCHAN_MISSING}")
@pytest.mark.parametrize("scenario", ["fanout", "throughput"])
def test_compare_against_nchan(scenario: str) -> None:
    code, lines, err = bench(scenario, *TINY[scenario], "--compare", "--pin", "0:0")
    assert code == 0, err
    ours, theirs, verdict = lines
    assert_complete(ours, scenario)
    assert_complete(theirs, scenario)
    assert (ours["target"], theirs["target"]) == ("tidings", "nchan")
    assert verdict["scenario"] == f"{scenario}-compare" and verdict["complete"] is True
    assert verdict["ratio"] is not None and verdict["met"] in (True, False)
    assert "ratio of" in err


@pytest.mark.skipif(NCHAN_MISSING is not None, reason=f"no Nchan: {NCHAN_MISSING}")
def test_compare_fanout_over_websocket_uses_nchan_sse_and_the_ws_bound() -> None:
    code, lines, err = bench(
        "fanout", *TINY["fanout"], "--transport", "ws", "--compare", "--rounds", "2"
    )
    assert code == 0, err
    *runs, verdict = lines
    assert [r["target"] for r in runs] == ["tidings", "nchan", "tidings", "nchan"]
    assert [r["transport"] for r in runs] == ["ws", "sse", "ws", "sse"]
    assert verdict["bound"] == "≤ 1.2" and verdict["rounds"] == 2 and len(verdict["ratios"]) == 2
    assert "ratio per round" in err


def reachable(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1.0):
            return True
    except OSError:
        return False


@pytest.mark.integration
@pytest.mark.parametrize(
    ("broker", "port"), [("redis://127.0.0.1:6379/12", 6379), ("nats://127.0.0.1:4222", 4222)]
)
def test_cluster_reports_the_latency_a_broker_adds(broker: str, port: int) -> None:
    if not reachable(port):
        pytest.skip(f"nothing listens on 127.0.0.1:{port}")
    code, lines, err = bench("cluster", *TINY["fanout"], "--broker", broker, "--rounds", "2")
    assert code == 0, err
    (result,) = lines
    assert result["scenario"] == "cluster" and result["complete"] is True
    assert result["broker"] == broker.split(":")[0]
    for p in ("p50", "p99"):
        assert result[f"added_delivery_{p}_ms"] is not None
        assert result[f"added_last_{p}_ms"] is not None
    for side in ("memory", "cluster"):  # two rounds of 20 x 3
        assert result[side]["received"] == result[side]["expected"] == 120


@pytest.mark.integration
@pytest.mark.parametrize("spread", [["--servers", "2"], ["--workers", "2"]])
def test_capacity_over_two_processes_on_redis(spread: list[str]) -> None:
    if not reachable(6379):
        pytest.skip("nothing listens on 127.0.0.1:6379")
    code, lines, err = bench(
        "capacity", "-n", "40", "--hold", "0", "--broker", "redis://127.0.0.1:6379/12", *spread
    )
    assert code == 0, err
    (result,) = lines
    assert_complete(result, "capacity")
    assert result["probe_received"] == 40
    # two instances, or a supervisor and its two workers
    assert result["server_processes"] == (2 if spread[0] == "--servers" else 3)


def test_usage_errors_exit_2() -> None:
    assert bench("cluster", "-n", "1")[0] == 2  # no --broker
    assert bench("cluster", "--broker", "redis://127.0.0.1:6379", "--compare")[0] == 2
    assert bench("fanout", "--url", "http://127.0.0.1:9")[0] == 2  # no --key/--secret
    assert bench("fanout", "--url", "http://192.0.2.1:80", "--key", "k", "--secret", "s")[0] == 2
    assert bench("fanout", "--pin", "0")[0] == 2
    assert bench("cluster", "--broker", "redis://127.0.0.1:6379", "--rounds", "0")[0] == 2
    assert bench("fanout", "--servers", "2")[0] == 2  # two instances need a shared broker
    assert bench("fanout", "-n", "999999")[0] == 2  # beyond one process's open files


# -- pieces --------------------------------------------------------------------------------------


def test_src_ips_ranges_and_lists() -> None:
    assert parse_src_ips("127.0.0.2-127.0.0.4") == ["127.0.0.2", "127.0.0.3", "127.0.0.4"]
    assert parse_src_ips("127.0.0.2,127.0.0.9") == ["127.0.0.2", "127.0.0.9"]
    assert parse_src_ips("") == [None]


def test_percentile_is_nearest_rank() -> None:
    assert percentile([], 50) is None
    assert percentile(list(range(1, 21)), 99) == 20
    assert percentile(list(range(1, 21)), 50) == 10


def test_headline_ratio_and_bound() -> None:
    lower = Headline("last_p99_ms", higher_is_better=False, bound=1.0)
    assert lower.ratio(90.0, 100.0) == 0.9 and lower.met(0.9) is True and lower.met(1.1) is False
    higher = Headline("deliveries_per_s", higher_is_better=True, bound=1.0)
    assert higher.met(1.2) is True and higher.met(0.8) is False
    assert Headline("kb_per_conn", higher_is_better=False).met(0.5) is None
    assert lower.ratio(1.0, None) is None


def test_broker_prefix_is_replaced() -> None:
    assert with_prefix("redis://h:6379/12", "x") == "redis://h:6379/12?prefix=x"
    assert with_prefix("nats://h:4222?prefix=a&b=1", "x") == "nats://h:4222?b=1&prefix=x"


def test_nchan_config_is_package_data() -> None:
    text = nchan.render(18181, "/m.so")
    assert "listen 127.0.0.1:18181" in text and "load_module /m.so;" in text
    body = "\n".join(line for line in text.splitlines() if not line.startswith("#"))
    assert "@" not in body


class FakeTransport(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.written: list[bytes] = []
        self.closed = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.written.append(bytes(data))

    def close(self) -> None:
        self.closed = True


async def test_sse_stream_finds_markers_split_across_reads() -> None:
    loop = asyncio.get_running_loop()
    ready: asyncio.Future[bool] = loop.create_future()
    collector = Collector(messages=2)
    stream = Stream(0, b"GET /", b"event: welcome", collector, ready)
    stream.connection_made(FakeTransport())
    chunks = [
        b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n\r\nretry: 1\n\nevent: wel",
        b"come\ndata: {}\n\n",
        b'data: {"x":"q0t1',
        b'000z"}\n\ndata: "q1t2000z"\n\n',
        b'data: "q1t2000z"\n\n',  # a duplicate
    ]
    for chunk in chunks:
        stream.data_received(chunk)
    assert ready.result() is True and collector.ready == 1
    assert collector.count == [1, 1] and collector.duplicates == 1 and collector.received == 2


async def test_ws_stream_answers_pings_and_reads_frames() -> None:
    loop = asyncio.get_running_loop()
    ready: asyncio.Future[bool] = loop.create_future()
    collector = Collector(messages=1)
    stream = WSStream(0, b"GET /", b'"welcome"', collector, ready)
    transport = FakeTransport()
    stream.connection_made(transport)

    def frame(opcode: int, payload: bytes) -> bytes:
        return bytes([0x80 | opcode, len(payload)]) + payload

    data = b"HTTP/1.1 101 Switching Protocols\r\n\r\n" + frame(1, b'{"type":"welcome"}')
    data += frame(9, b"hi") + frame(1, b'{"data":"q0t5z"}')
    stream.data_received(data[:40])
    stream.data_received(data[40:])
    assert ready.result() is True and collector.received == 1
    pong = transport.written[-1]
    assert pong[0] == 0x8A and pong[1] == 0x80 | 2  # a masked pong of 2 bytes
