"""What a server costs, read from /proc: RSS, PSS and CPU time of a process tree.

The tree is the given PIDs and all their descendants (uvicorn workers, nginx's
worker), found afresh at every sample. `host_busy_s` is the whole machine's busy
core-seconds (/proc/stat), so a run can say how much CPU something else used
meanwhile: a large value marks the numbers as noisy.
"""

from __future__ import annotations

import os
import resource
from collections.abc import Iterable
from dataclasses import dataclass

__all__ = ["ProcTree", "Sample", "Window", "harness_cpu_s", "host_busy_s"]

_TICK = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True, slots=True)
class Sample:
    rss_kb: int
    pss_kb: int
    cpu_s: float
    procs: int


class ProcTree:
    """The processes of one server: `roots` and their descendants."""

    def __init__(self, roots: Iterable[int]) -> None:
        self.roots = tuple(roots)

    def pids(self) -> list[int]:
        if not self.roots:
            return []
        children: dict[int, list[int]] = {}
        for name in os.listdir("/proc"):
            if name.isdigit():
                fields = _stat_fields(int(name))
                if fields:
                    children.setdefault(int(fields[1]), []).append(int(name))
        seen: list[int] = []
        todo = list(self.roots)
        while todo:
            pid = todo.pop()
            if pid not in seen:
                seen.append(pid)
                todo.extend(children.get(pid, ()))
        return seen

    def sample(self) -> Sample:
        rss = pss = procs = 0
        cpu = 0.0
        for pid in self.pids():
            fields = _stat_fields(pid)
            if not fields:
                continue
            cpu += (int(fields[11]) + int(fields[12])) / _TICK  # utime + stime
            rss += _kb_field(f"/proc/{pid}/status", "VmRSS:")
            pss += _kb_field(f"/proc/{pid}/smaps_rollup", "Pss:")
            procs += 1
        return Sample(rss, pss, round(cpu, 2), procs)


def _stat_fields(pid: int) -> list[bytes]:
    """Fields of /proc/PID/stat after the command name (index 0 = state); [] if gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()
    except (OSError, IndexError):
        return []


def _kb_field(path: str, name: str) -> int:
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(name):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return 0


def host_busy_s() -> float:
    """Busy core-seconds of the whole machine since boot."""
    with open("/proc/stat") as f:
        ticks = [int(x) for x in f.readline().split()[1:]]
    return (sum(ticks[:8]) - ticks[3] - ticks[4]) / _TICK  # minus idle and iowait


def harness_cpu_s() -> float:
    """CPU time of this process (the harness) so far."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class Window:
    """CPU spent by the server, the harness and everything else between open and `close`."""

    def __init__(self, tree: ProcTree) -> None:
        self.tree = tree
        self.start = tree.sample()
        self._harness = harness_cpu_s()
        self._host = host_busy_s()

    def close(self, phase: str) -> tuple[Sample, dict[str, float]]:
        """The server's sample at the end, and ``server_cpu_s_<phase>`` etc."""
        end = self.tree.sample()
        server = end.cpu_s - self.start.cpu_s
        harness = harness_cpu_s() - self._harness
        other = max(0.0, host_busy_s() - self._host - server - harness)
        return end, {
            f"server_cpu_s_{phase}": round(server, 2),
            f"harness_cpu_s_{phase}": round(harness, 2),
            f"other_cpu_s_{phase}": round(other, 2),
        }
