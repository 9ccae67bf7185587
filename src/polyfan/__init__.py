"""polyfan: one Polygon/Massive trade feed fanned out over ZeroMQ, sub-second bars to browsers."""

from __future__ import annotations

__version__ = "0.1.0"
