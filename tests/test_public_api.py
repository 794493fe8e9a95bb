"""The public API: what `import tidings` and `tidings.client` promise."""

from __future__ import annotations

import importlib

import pytest

import tidings


@pytest.mark.parametrize("module", ["tidings", "tidings.client"])
def test_all_is_sorted_and_every_name_imports(module: str) -> None:
    mod = importlib.import_module(module)
    names = mod.__all__
    assert names == sorted(names)
    assert len(set(names)) == len(names)
    for name in names:
        assert getattr(mod, name) is not None, name


def test_version() -> None:
    assert tidings.__version__ == "0.1.0"
