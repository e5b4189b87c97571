"""Free ports for LAPs of tests and benchmarks, chosen where Ray's own servers never bind.

Ray's servers bind port 0, so the kernel gives them ports from its ephemeral
range (32768-60999 on Linux); since LAP's local Ray runs at 127.0.0.1, such a
server and a later listener of LAP on the same 127.0.0.1 port can both bind
(SO_REUSEPORT) and share the connections. A port that was free a moment ago
in that range is no safe pick, so these come from 20000-29999: above Ray's
worker ports (10002-19999), below Serve's replica ports (30000 and up).
"""

from __future__ import annotations

import random
import socket

LOW, HIGH = 20_000, 29_999


def free_ports(count: int) -> list[int]:
    """`count` distinct ports that nothing listens on now, from 20000-29999."""
    found: list[int] = []
    for port in random.sample(range(LOW, HIGH + 1), HIGH - LOW + 1):
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
        found.append(port)
        if len(found) == count:
            return found
    raise RuntimeError(f"fewer than {count} free ports between {LOW} and {HIGH}")


def free_port() -> int:
    return free_ports(1)[0]
