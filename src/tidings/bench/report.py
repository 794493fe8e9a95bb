"""Output: JSON lines on stdout, a table for people, progress on a terminal, comparisons.

Piped, stdout carries only JSON lines (one per result) and the table goes to
stderr; on a terminal the table goes to stdout before its JSON line.
"""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, TextIO

import orjson

__all__ = [
    "BenchError",
    "Headline",
    "Progress",
    "compare_line",
    "emit",
    "ms",
    "percentile",
    "table",
    "write_json",
]


class BenchError(Exception):
    """Ends the bench with exit code 2 and ``tidings: <message>``."""


@dataclass(frozen=True, slots=True)
class Headline:
    """The number a scenario is judged by, and issue 8's bound on it against Nchan."""

    field: str
    higher_is_better: bool
    bound: float | None = None  # ours / Nchan's must be <= (lower better) or >= this

    def ratio(self, ours: float | None, theirs: float | None) -> float | None:
        if ours is None or theirs is None or theirs == 0:
            return None
        return round(ours / theirs, 3)

    def met(self, ratio: float | None) -> bool | None:
        if self.bound is None or ratio is None:
            return None
        return ratio >= self.bound if self.higher_is_better else ratio <= self.bound


class Progress:
    """One status line on stderr when stdout is a terminal; silent when piped."""

    INTERVAL = 0.1  # seconds between redraws: 10,000 connects need not mean 10,000 writes

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self._shown = False
        self._at = 0.0

    def show(self, text: str, *, force: bool = False) -> None:
        now = time.monotonic()
        if self.enabled and (force or now - self._at >= self.INTERVAL):
            sys.stderr.write(f"\r\x1b[K{text}")
            sys.stderr.flush()
            self._shown, self._at = True, now

    def done(self) -> None:
        if self._shown:
            sys.stderr.write("\r\x1b[K")
            sys.stderr.flush()
            self._shown = False


def percentile(values: Sequence[int], p: float) -> int | None:
    """Nearest-rank percentile (p in 0..100); None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, min(len(ordered), -(-len(ordered) * p // 100)))
    return ordered[int(rank) - 1]


def ms(ns: float | None) -> float | None:
    return None if ns is None else round(ns / 1e6, 2)


def emit(result: dict[str, Any], rows: Iterable[tuple[str, str]], out: str | None) -> None:
    """Print one result: its table for people, then its JSON line (also appended to `out`)."""
    print_text(table(result, rows))
    write_json(result, out)


def write_json(value: dict[str, Any], out: str | None) -> None:
    """One JSON line on stdout, also appended to the file `out`."""
    line = orjson.dumps(value).decode()
    print(line, flush=True)
    if out:
        with open(out, "a") as f:
            f.write(line + "\n")


def table(result: dict[str, Any], rows: Iterable[tuple[str, str]]) -> str:
    """`rows` = (label, field); fields missing from the result are left out."""
    title = f"{result.get('scenario')} · {result.get('target', '')}".rstrip(" ·")
    cells = [(label, _cell(_get(result, name))) for label, name in rows if _has(result, name)]
    width = max((len(label) for label, _ in cells), default=0)
    return "\n".join([title, *(f"  {label:<{width}}  {value}" for label, value in cells)])


def compare_line(
    scenario: str, headline: Headline, ours: list[dict[str, Any]], nchan: list[dict[str, Any]]
) -> dict[str, Any]:
    """The comparison of R rounds of one scenario against both servers: medians of the
    headline number and of the per-round ratios."""
    a = [r.get(headline.field) for r in ours]
    b = [r.get(headline.field) for r in nchan]
    ratios = [headline.ratio(x, y) for x, y in zip(a, b, strict=True)]
    ratio = _median([r for r in ratios if r is not None])
    line: dict[str, Any] = {
        "scenario": f"{scenario}-compare",
        "metric": headline.field,
        "tidings": _median([x for x in a if x is not None]),
        "nchan": _median([y for y in b if y is not None]),
        "ratio": ratio,
        "bound": None
        if headline.bound is None
        else ("≥ " if headline.higher_is_better else "≤ ") + f"{headline.bound}",
        "met": headline.met(ratio),
        "complete": all(bool(r.get("complete")) for r in ours + nchan),
    }
    if len(ours) > 1:
        line["rounds"] = len(ours)
        line["ratios"] = ratios
    return line


def _median(values: list[float]) -> float | None:
    return round(statistics.median(values), 3) if values else None


def compare_table(
    line: dict[str, Any],
    rows: Iterable[tuple[str, str]],
    ours: dict[str, Any],
    nchan: dict[str, Any],
) -> str:
    """Both results side by side, then the ratio of the headline number."""
    cells = [
        (label, _cell(_get(ours, name)), _cell(_get(nchan, name)))
        for label, name in rows
        if _has(ours, name) or _has(nchan, name)
    ]
    w0 = max((len(c[0]) for c in cells), default=0)
    w1 = max([len("tidings"), *(len(c[1]) for c in cells)])
    out = [f"{line['scenario']}", f"  {'':<{w0}}  {'tidings':>{w1}}  nchan"]
    out += [f"  {a:<{w0}}  {b:>{w1}}  {c}" for a, b, c in cells]
    verdict = {True: "met", False: "NOT met", None: ""}[line["met"]]
    bound = f" (bound {line['bound']}: {verdict})" if line["bound"] else ""
    if "ratios" in line:
        out[0] += f" (the last of {line['rounds']} rounds)"
        out.append("  ratio per round: " + ", ".join(_cell(r) for r in line["ratios"]))
        bound = " (median)" + bound
    out.append(f"  ratio of {line['metric']}: {_cell(line['ratio'])}{bound}")
    return "\n".join(out)


def print_text(text: str, stream: TextIO | None = None) -> None:
    """A table: stdout on a terminal, else stderr (stdout stays JSON lines)."""
    tty = sys.stdout.isatty()
    print(text, file=stream or (sys.stdout if tty else sys.stderr), flush=True)


def _get(result: dict[str, Any], name: str) -> Any:
    """`name` or a dotted path into nested results (``memory.delivery_p50_ms``)."""
    value: Any = result
    for part in name.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return value


def _has(result: Any, name: str) -> bool:
    head, _, rest = name.partition(".")
    if not isinstance(result, dict) or head not in result:
        return False
    return not rest or _has(result[head], rest)


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "NO"
    if isinstance(value, float):
        return f"{value:,.2f}"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, dict):
        return ", ".join(f"{k}: {v}" for k, v in value.items()) or "-"
    return str(value)
