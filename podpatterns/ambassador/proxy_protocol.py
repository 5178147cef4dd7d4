"""PROXY protocol v1 and v2 headers (haproxy.org/download/2.9/doc/proxy-protocol.txt).

Sent once at the start of the upstream connection so the upstream sees the original
client address instead of the ambassador's.
"""

from __future__ import annotations

import ipaddress
import socket
import struct
from typing import Any

V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"


def header(version: str, client: Any, local: Any) -> bytes:
    """Build the header for a connection from ``client`` to our ``local`` address.

    Args:
        version: ``v1`` or ``v2``.
        client: the client's socket address (``getpeername()``), or a unix path/empty.
        local: the listener's socket address (``getsockname()``).

    Returns:
        The bytes to send first; ``UNKNOWN`` / ``LOCAL`` for non-IP clients (unix sockets).
    """
    ips = _ip_pair(client, local)
    if version == "v1":
        if ips is None:
            return b"PROXY UNKNOWN\r\n"
        (src, sport), (dst, dport) = ips
        proto = "TCP4" if src.version == 4 else "TCP6"
        return f"PROXY {proto} {src} {dst} {sport} {dport}\r\n".encode()
    if ips is None:
        # LOCAL command, AF_UNSPEC: the receiver uses the real connection endpoints
        return V2_SIGNATURE + bytes([0x20, 0x00]) + struct.pack("!H", 0)
    (src, sport), (dst, dport) = ips
    if src.version == 4:
        body = src.packed + dst.packed + struct.pack("!HH", sport, dport)
        fam = 0x11  # AF_INET, STREAM
    else:
        body = src.packed + dst.packed + struct.pack("!HH", sport, dport)
        fam = 0x21  # AF_INET6, STREAM
    return V2_SIGNATURE + bytes([0x21, fam]) + struct.pack("!H", len(body)) + body


Pair = tuple[
    tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, int],
    tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, int],
]


def _ip_pair(client: Any, local: Any) -> Pair | None:
    if not (isinstance(client, tuple) and isinstance(local, tuple)):
        return None
    try:
        src = ipaddress.ip_address(client[0])
        dst = ipaddress.ip_address(local[0])
    except ValueError:
        return None
    if src.version != dst.version:  # e.g. a v4-mapped client on a v6 listener
        if isinstance(src, ipaddress.IPv6Address) and src.ipv4_mapped is not None:
            src = src.ipv4_mapped
        elif isinstance(dst, ipaddress.IPv6Address) and dst.ipv4_mapped is not None:
            dst = dst.ipv4_mapped
        else:
            return None
    return (src, int(client[1])), (dst, int(local[1]))


def send_all(sock: socket.socket, data: bytes) -> None:
    """Send a short header on a fresh non-blocking socket (its buffer is empty)."""
    sent = sock.send(data)
    if sent != len(data):  # pragma: no cover - a fresh socket buffer holds 100+ bytes
        raise OSError("PROXY header was not sent whole")
