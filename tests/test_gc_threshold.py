"""`tidings serve` sets the collector's thresholds once serving (server/run.py)."""

from __future__ import annotations

import pytest

from tidings.server.run import GC_THRESHOLD, gc_threshold


def test_the_default_unless_the_environment_gives_three_integers(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("TIDINGS_GC_THRESHOLD", raising=False)
    assert gc_threshold() == GC_THRESHOLD
    monkeypatch.setenv("TIDINGS_GC_THRESHOLD", "700, 10,10")
    assert gc_threshold() == (700, 10, 10)
    for bad in ("700,10", "a,b,c", "1,2,3,4"):
        monkeypatch.setenv("TIDINGS_GC_THRESHOLD", bad)
        assert gc_threshold() == GC_THRESHOLD
