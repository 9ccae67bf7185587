from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from procs import Context


@pytest.fixture
def context() -> Iterator[Context]:
    """A ZeroMQ context for the test's own sockets, closed after it."""
    ctx = Context()
    yield ctx
    ctx.close()
