"""The server's listening socket: accepted connections must send small writes at once (TCP_NODELAY).

Without it Nagle's algorithm held a response's body behind its headers until the client's delayed ACK (~40 ms on
Linux), from the second request of a keep-alive connection on: on the H200 a 16-token stream of qwen3-0.6b came
in one burst 69 ms after the request (vLLM: first token at 25 ms)."""

from __future__ import annotations

import asyncio
import socket

import pytest

from atom_server.serving.listen import PortUnavailable, bind_port


def _accepted_nodelay(sock: socket.socket) -> int:
    """TCP_NODELAY of the server side of one connection accepted by asyncio on `sock` (what uvicorn's
    serve(sockets=[sock]) does: loop.create_server(sock=...))."""

    async def run() -> int:
        seen: asyncio.Future = asyncio.get_running_loop().create_future()

        class Probe(asyncio.Protocol):
            def connection_made(self, transport):
                if not seen.done():
                    seen.set_result(transport.get_extra_info("socket").getsockopt(socket.IPPROTO_TCP,
                                                                                  socket.TCP_NODELAY))
                transport.close()

        server = await asyncio.get_running_loop().create_server(Probe, sock=sock)
        try:
            host, port = sock.getsockname()[:2]
            _, writer = await asyncio.open_connection(host, port)
            value = await asyncio.wait_for(seen, 10)
            writer.close()
            return value
        finally:
            server.close()
            await server.wait_closed()

    return asyncio.run(run())


def test_accepted_connections_have_tcp_nodelay():
    sock = bind_port("127.0.0.1", 0)
    assert sock.proto == socket.IPPROTO_TCP
    assert _accepted_nodelay(sock) != 0


def test_the_listener_passes_tcp_nodelay_to_what_it_accepts():
    """Loops that do not set the option per connection (uvloop, which uvicorn picks when it is installed, as
    beside vLLM) rely on the kernel copying it from the listening socket."""
    sock = bind_port("127.0.0.1", 0)
    sock.listen()
    with sock, socket.create_connection(sock.getsockname()[:2], timeout=10):
        accepted, _ = sock.accept()
        with accepted:
            assert accepted.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0


def test_a_port_in_use_is_refused_by_name():
    first = bind_port("127.0.0.1", 0)
    first.listen()
    port = first.getsockname()[1]
    try:
        with pytest.raises(PortUnavailable, match=f"port {port} is in use"):
            bind_port("127.0.0.1", port)
    finally:
        first.close()
