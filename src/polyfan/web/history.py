"""One history request (``since`` on subscribe, ``/api/bars``) answered from the aggregators
that serve its channel, joined across replicas (docs/store.md, "Several aggregators").

The aggs are asked in the order :meth:`~polyfan.fanout.links.Links.answering` gives: the one
whose bars have been whole the longest first. It answers the request. When it returns fewer
than ``limit`` bars, the next is asked only for what is older than the oldest bar gathered so
far (within the request's bounds), and so on down the list: an agg with ``--store`` that
restarted after the others still reaches back past their memory, the bars from the one whole
the longest win where both have them, and every start comes from one agg only.

The first agg's answer is the request's: its status, or its timeout (raised). A later agg
that does not answer, or answers with an error, ends the gathering: the bars gathered so far
are returned, with why the older ones are missing.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from polyfan.fanout.links import Link
from polyfan.wire import codec

log = logging.getLogger("polyfan.bridge")

Ask = Callable[[Link, dict[str, Any]], Awaitable[codec.Message]]  # the bridge's request
_EMPTY = np.zeros(0, dtype=codec.BAR_DTYPE)


@dataclass(frozen=True)
class Gathered:
    """What the aggregators answered: ``bars`` oldest first, the first agg's ``status``
    (``bars`` is empty unless OK), and why older bars may be missing (None: nothing is)."""

    bars: np.ndarray
    status: codec.HistoryStatus
    incomplete: str | None = None


async def gather_bars(
    aggs: Sequence[Link],
    ask: Ask,
    channel: str,
    since: int | None,
    before: int | None,
    limit: int,
) -> Gathered:
    """The newest ``limit`` bars of ``channel`` with ``since <= s < before`` that ``aggs``
    hold between them (module docstring). ``aggs`` is not empty."""
    parts: list[np.ndarray] = []
    have = 0
    upper = before
    for index, agg in enumerate(aggs):
        body = {"op": "bars", "channel": channel, "since": since, "before": upper}
        body["limit"] = limit - have
        try:
            reply = await ask(agg, body)
        except TimeoutError:
            if index == 0:
                raise
            return _joined(parts, codec.HistoryStatus.OK, f"{agg.endpoint} did not answer")
        _, status, bars = codec.records_from_history(reply)
        if status is not codec.HistoryStatus.OK:
            if index == 0:
                return Gathered(_EMPTY, status)
            return _joined(parts, codec.HistoryStatus.OK, f"{agg.endpoint}: {status.name}")
        if len(bars):
            parts.append(bars)
            have += len(bars)
            upper = int(bars["s"][0])
        if have >= limit or (since is not None and upper is not None and upper <= since):
            break
    return _joined(parts, codec.HistoryStatus.OK, None)


def _joined(parts: list[np.ndarray], status: codec.HistoryStatus, why: str | None) -> Gathered:
    if why is not None:
        log.info("older bars not gathered: %s", why)
    if not parts:
        return Gathered(_EMPTY, status, why)
    bars = parts[0] if len(parts) == 1 else np.concatenate(parts[::-1])
    return Gathered(bars, status, why)
