"""publish: single publishes per second through the publish API, P publishers flat out.

One event per request (POST /api/v1/publish with an API key; Nchan: POST /pub),
each publisher sending the next as soon as the previous one answered, for
--duration s. By default nobody subscribes (-n 0): this measures the publish
path itself; with -n N the deliveries are checked too. Issue 8's bound:
publishes/s ≥ 1.0 × Nchan's.
"""

from __future__ import annotations

from .report import Headline
from .scenario import Context, Result, Spec
from .throughput import measure

__all__ = ["SPEC"]


async def run(ctx: Context) -> Result:
    return await measure(ctx, "publish")


SPEC = Spec(
    name="publish",
    run=run,
    default_n=0,
    headline=Headline("publishes_per_s", higher_is_better=True, bound=1.0),
    rows=(
        ("publishers", "publishers"),
        ("subscribers", "subscribers_ready"),
        ("publishes/s", "publishes_per_s"),
        ("publish status", "publish_status"),
        ("publish RTT p50 ms", "publish_rtt_p50_ms"),
        ("publish RTT p99 ms", "publish_rtt_p99_ms"),
        ("server CPU s", "server_cpu_s_publish"),
        ("harness CPU s", "harness_cpu_s_publish"),
        ("other CPU s (noise)", "other_cpu_s_publish"),
        ("complete", "complete"),
    ),
    help="single publishes per second through the publish API, P publishers flat out",
)
