"""The proxy's decode of trade-only frames, in process: scanner alone and the whole decoder.

    PYTHONPATH=src .venv/bin/python bench/bench_decode.py [LABEL]

Self-contained (it uses only ``Market.trades`` and the decoder, under either of its names), so
the same file measures an older tree too: ``PYTHONPATH=/tmp/before/src python
bench/bench_decode.py before``. The decoder is warmed first (columns grown, symbols known), as it
is in a running proxy; each figure is the best of 7 passes over 2,000 frames of 100 trades.
"""

from __future__ import annotations

import sys
import time

import orjson

from polyfan.feed import scan, upstream
from polyfan.market import Market

FRAMES, EVENTS, REPEAT = 2_000, 100, 7


def best_rate(run: object, count: int) -> float:
    best = float("inf")
    for _ in range(REPEAT):
        start = time.perf_counter()
        run()  # type: ignore[operator]
        best = min(best, time.perf_counter() - start)
    return count / best


def main() -> None:
    label = sys.argv[1] if len(sys.argv) > 1 else "this tree"
    decoder_type = getattr(upstream, "EventDecoder", None) or upstream.TradeDecoder  # type: ignore[attr-defined]
    now = int(time.time() * 1000)
    trades = Market(500, seed=1).trades(FRAMES * EVENTS, now)
    frames = [orjson.dumps(trades[i : i + EVENTS]) for i in range(0, len(trades), EVENTS)]
    scan.warm_up()
    decoder = decoder_type()

    def batched() -> None:
        for i in range(0, len(frames), 64):
            decoder.decode(frames[i : i + 64], now)

    def single() -> None:
        for frame in frames:
            decoder.decode([frame], now)

    def scanner() -> None:
        table, columns, row = scan.SymbolTable(), scan.Columns(len(trades) + 1), 0
        for frame in frames:
            row = columns.scan(frame, row, table)

    batched()  # warm: the columns grow and the symbols are learnt once, as in the proxy
    for name, run in (("scanner", scanner), ("decode 64/call", batched), ("decode 1/call", single)):
        print(f"{label} {name:15s} {best_rate(run, len(trades)) / 1e6:.3f} M trades/s")


if __name__ == "__main__":
    main()
