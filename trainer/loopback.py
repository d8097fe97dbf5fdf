"""Keeping a world that lives on one machine on the loopback interface (standard library only).

torch's TCPStore listens on every interface whatever address it is given, unless handed a socket that is already
listening: `listening_socket` makes one bound to a loopback address alone. Used for the store of ranks tuneforge
joins itself (`trainer.engine.loopback_store`) and for torchrun's agent (`launch.torchrun`).
"""

from __future__ import annotations

import ipaddress
import os
import socket


def is_loopback(host: str) -> bool:
    """Whether every address `host` names is a loopback address (127.0.0.0/8, ::1)."""
    try:
        return all(ipaddress.ip_address(info[4][0]).is_loopback for info in socket.getaddrinfo(host, None))
    except (socket.gaierror, ValueError):
        return False


def listening_socket(host: str, port: int) -> tuple[int, int]:
    """A socket listening on `host`:`port` alone (port 0: one the system picks), as (file descriptor, port); the
    caller owns the descriptor (a TCPStore's `master_listen_fd` takes it over)."""
    family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
    server = socket.create_server((host, port), family=family)
    port = server.getsockname()[1]
    return server.detach(), port


def gloo_on_loopback() -> None:
    """The gloo pairs of this process and the ranks it starts bind the loopback interface (unless
    GLOO_SOCKET_IFNAME is set): every peer of a world on one machine reaches it there."""
    if "lo" in {name for _, name in socket.if_nameindex()}:
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
