"""What CURVE costs on one ZeroMQ link: messages/s and CPU per message, plain vs CURVE, same run.

A PUB and a SUB over tcp loopback in two processes, the messages polyfan's proxy sends (one
symbol's trades, ``--trades`` a message, encoded by the wire codec), sent as fast as the PUB
takes them with an unbounded high-water mark on both sides, so nothing is dropped: the receiver
counts every message. Each mode runs ``--rounds`` times, alternating, and prints
messages/s, trades/s and the CPU seconds per million messages of each side.

    .venv/bin/python bench/bench_curve.py --messages 300000 --trades 16 --rounds 3
"""

from __future__ import annotations

import argparse
import multiprocessing
import resource
import time
from typing import Any

import numpy as np
import zmq
import zmq.auth

from polyfan.wire import codec

PROBE, END = b"probe", b"end"


def cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def receive(address: str, keys: Any, out: Any) -> None:
    ctx = zmq.Context()
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.RCVHWM, 0)
    if keys is not None:
        sub.curve_publickey, sub.curve_secretkey, sub.curve_serverkey = keys
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    sub.connect(address)
    while sub.recv() != PROBE:
        pass
    out.put("connected")  # the sender starts once it reads this; probes may still be queued
    count, started, cpu0 = 0, time.perf_counter(), cpu()
    while True:
        frame = sub.recv(copy=False)
        if frame.bytes == END:
            break
        if frame.bytes != PROBE:
            count += 1
    out.put((count, time.perf_counter() - started, cpu() - cpu0))
    sub.close(0)
    ctx.term()


def one_round(messages: int, payload: bytes, curve: bool) -> tuple[float, float, float]:
    ctx = zmq.Context()
    pub = ctx.socket(zmq.PUB)
    pub.setsockopt(zmq.SNDHWM, 0)
    keys = None
    if curve:
        server_public, server_secret = zmq.curve_keypair()
        client_public, client_secret = zmq.curve_keypair()
        pub.curve_secretkey, pub.curve_publickey = server_secret, server_public
        pub.curve_server = True
        keys = (client_public, client_secret, server_public)
    port = pub.bind_to_random_port("tcp://127.0.0.1")
    fork = multiprocessing.get_context("fork")
    results: Any = fork.SimpleQueue()
    child = fork.Process(target=receive, args=(f"tcp://127.0.0.1:{port}", keys, results))
    child.start()
    while results.empty():  # slow joiner: probe until the subscriber has one
        pub.send(PROBE)
        time.sleep(0.01)
    assert results.get() == "connected"
    cpu0 = cpu()
    for _ in range(messages):
        pub.send(payload)
    send_cpu = cpu() - cpu0
    pub.send(END)
    count, seconds, receive_cpu = results.get()
    assert count == messages, (count, messages)
    child.join()
    pub.close(0)
    ctx.term()
    return seconds, send_cpu, receive_cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=300_000)
    parser.add_argument("--trades", type=int, default=16, help="trades a message")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    trades = np.zeros(args.trades, dtype=codec.TRADE_DTYPE)
    trades["t"], trades["p"], trades["s"] = 1_700_000_000_000, 123.45, 100
    payload = codec.Sequencer(1).encode(
        b"T.AAPL\0", codec.Kind.TRADES, args.trades, trades.tobytes()
    )
    print(
        f"{args.messages:,} messages of {len(payload)} bytes ({args.trades} trades), tcp loopback"
    )
    print("mode   msgs/s      trades/s     send CPU-s/M msgs  receive CPU-s/M msgs")
    for _ in range(args.rounds):
        for curve in (False, True):
            seconds, send_cpu, receive_cpu = one_round(args.messages, payload, curve)
            rate = args.messages / seconds
            scale = 1e6 / args.messages
            print(
                f"{'curve' if curve else 'plain':6} {rate:>10,.0f}  {rate * args.trades:>12,.0f}"
                f"  {send_cpu * scale:>17.2f}  {receive_cpu * scale:>19.2f}"
            )


if __name__ == "__main__":
    main()
