"""Take the server's port first, before anything slow starts, so a port in use fails in a second."""

from __future__ import annotations

import errno
import socket


class PortUnavailable(OSError):
    pass


def bind_port(host: str, port: int) -> socket.socket:
    """A socket bound to (host, port), not listening yet (as vLLM: connections are refused until the
    server serves, rather than queued while the model loads)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # proto IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY only on accepted sockets whose proto says TCP. Without it
    # Nagle's algorithm held every response body behind its headers until the client's delayed ACK (~40 ms on
    # Linux): from a connection's second request on, a 16-token stream arrived in one burst 40 ms late.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # Linux copies it to accepted sockets (uvloop)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        what = "in use" if e.errno == errno.EADDRINUSE else "unavailable"
        raise PortUnavailable(f"cannot listen on {host}:{port}: port {port} is {what} ({e.strerror}); "
                              "stop the other server or choose another --port") from None
    return sock
