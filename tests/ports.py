"""The one way the tests and benches pick a loopback port for a server they
start: below the kernel's ephemeral range.

A port taken from `bind(("127.0.0.1", 0))` and then closed comes from the
ephemeral range, the range every outgoing connection also draws its source
port from. Between choosing the port and the server binding it, one of the
many client connections a test makes can take it, and the server then fails
to start (seen as "worker 0 never answered its port"). Below that range no
outgoing connection ever lands, so only another chosen port can collide,
and the bind check here rules out one that is already held.
"""

from __future__ import annotations

import random
import socket
from pathlib import Path

_RANGE = Path("/proc/sys/net/ipv4/ip_local_port_range")
_SPAN = 12_000


def _below_ephemeral() -> range:
    try:
        low = int(_RANGE.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768  # Linux's default
    return range(max(1024, low - _SPAN), max(1025, low))


def free_port() -> int:
    """A loopback TCP port nobody holds now, outside the ephemeral range."""
    ports = _below_ephemeral()
    for _ in range(200):
        port = random.choice(ports)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket() as s:  # every try held: let the kernel choose
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
