"""A connection flood, run as its own process: ``python tests/flood.py PORT ADDRESSES PER_ADDRESS``.

Opens ``PER_ADDRESS`` TCP connections to ``127.0.0.1:PORT`` from each loopback source address
of the comma-separated ``ADDRESSES`` (``127.0.0.2`` ...) and holds them half-open: every other
one sends the start of an HTTP request and never finishes it, the rest send nothing. A
connection the server closes is opened again (at most 2,000 a second), as an attacker keeps
its count up. Prints one JSON line of counts every 0.2 s; stops on SIGTERM or when stdin closes.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import resource
import select
import signal
import socket
import sys
import time

PARTIAL = b"GET /healthz HTTP/1.1\r\nHost: flood\r\nX-Slow: "
REOPEN_PER_TICK = 200  # at most this many reconnects per 0.1 s


def main() -> None:
    port = int(sys.argv[1])
    addresses = sys.argv[2].split(",")
    per_address = int(sys.argv[3])
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    stopping = False

    def stop(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    poller = select.epoll()
    poller.register(sys.stdin.fileno(), select.EPOLLIN | select.EPOLLHUP)
    socks: dict[int, tuple[socket.socket, str, bool]] = {}
    counts = {"connects": 0, "open": 0, "closed_by_server": 0, "errors": 0}
    todo: list[tuple[str, bool]] = [
        (address, k % 2 == 0) for k in range(per_address) for address in addresses
    ]

    def open_one(address: str, partial: bool) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            sock.bind((address, 0))
            code = sock.connect_ex(("127.0.0.1", port))
        except OSError:
            counts["errors"] += 1
            sock.close()
            todo.append((address, partial))
            return
        if code not in (0, errno.EINPROGRESS):
            counts["errors"] += 1
            sock.close()
            todo.append((address, partial))
            return
        counts["connects"] += 1
        socks[sock.fileno()] = (sock, address, partial)
        poller.register(sock.fileno(), select.EPOLLOUT | select.EPOLLIN | select.EPOLLRDHUP)

    next_print = 0.0
    while not stopping:
        for _ in range(min(len(todo), REOPEN_PER_TICK)):
            open_one(*todo.pop(0))
        deadline = time.monotonic() + 0.1
        while not stopping and (remaining := deadline - time.monotonic()) > 0:
            for fd, mask in poller.poll(remaining):
                if fd == sys.stdin.fileno():
                    if not os.read(fd, 4096):
                        stopping = True
                    continue
                sock, address, partial = socks[fd]
                if mask & (select.EPOLLIN | select.EPOLLRDHUP | select.EPOLLHUP | select.EPOLLERR):
                    poller.unregister(fd)
                    del socks[fd]
                    sock.close()
                    counts["closed_by_server"] += 1
                    todo.append((address, partial))
                elif mask & select.EPOLLOUT:
                    if partial:
                        with contextlib.suppress(OSError):
                            sock.send(PARTIAL)
                    poller.modify(fd, select.EPOLLIN | select.EPOLLRDHUP)
        now = time.monotonic()
        if now >= next_print:
            next_print = now + 0.2
            counts["open"] = len(socks)
            print(json.dumps(counts), flush=True)
    for sock, _, _ in socks.values():
        sock.close()


if __name__ == "__main__":
    main()
