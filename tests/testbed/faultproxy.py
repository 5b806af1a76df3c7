"""A TCP proxy that breaks connections on demand, to test sync under network faults.

Real failures (a connection reset mid-literal, a server that stops answering)
are hard to produce with a real server alone. Put this proxy between the code
under test and Dovecot/SMTP and tell it when to cut or stall. It forwards raw
bytes, so TLS passes through end to end and certificates still verify.

"down" is server -> client, "up" is client -> server.
"""

from __future__ import annotations

import contextlib
import select
import socket
import struct
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Literal, Self

import pytest

Direction = Literal["up", "down"]
StallDirection = Literal["up", "down", "both"]
CutMode = Literal["close", "reset"]

HOST = "127.0.0.1"
POLL_SECONDS = 0.05  # how often blocked loops re-check their flags
CHUNK = 64 * 1024
CONNECT_TIMEOUT = 5.0
JOIN_TIMEOUT = 2.0


@dataclass(frozen=True)
class _CutRule:
    direction: Direction
    n_bytes: int
    how: CutMode
    generation: int


class _Connection:
    """One client connection and its upstream socket."""

    def __init__(self, client: socket.socket, upstream: socket.socket) -> None:
        self.client = client
        self.upstream = upstream
        self.done = threading.Event()
        self.cut_generation = -1
        self.cut_count = 0
        self._lock = threading.Lock()
        self._closed = False
        self._pumps_left = 2
        self.client_open = True  # until the client closes its side (or the proxy cuts)

    def close(self, how: CutMode = "close") -> None:
        """Close both sides: a FIN (EOF) or, with how="reset", an RST."""
        self.done.set()
        self.client_open = False
        with self._lock:
            if self._closed:
                return
            self._closed = True
        for sock in (self.client, self.upstream):
            try:
                if how == "reset":
                    # Linger 0 makes close() send RST: the peer sees ECONNRESET.
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                else:
                    sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()

    def pump_finished(self) -> None:
        with self._lock:
            self._pumps_left -= 1
            last = self._pumps_left == 0
        if last:
            self.close()


class FaultProxy:
    """Forwards 127.0.0.1:``port`` to ``(target_host, target_port)`` with injectable faults.

    Settings apply at once to open connections and to every new one.
    """

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.host = HOST
        self._listener = socket.create_server((HOST, 0))
        self._listener.setblocking(False)
        self.port: int = self._listener.getsockname()[1]
        self._cond = threading.Condition()
        self._cut: _CutRule | None = None
        self._generation = 0
        self._stalled: set[Direction] = set()
        self._closed = threading.Event()
        self._connections: list[_Connection] = []
        self._threads: list[threading.Thread] = []
        self._bytes: dict[Direction, int] = {"up": 0, "down": 0}
        self._accepted = 0
        self._peak_open = 0
        self._cuts = 0
        self._accept_thread = threading.Thread(
            target=self._accept_loop, name=f"faultproxy-{self.port}", daemon=True
        )
        self._accept_thread.start()

    @property
    def address(self) -> tuple[str, int]:
        return (self.host, self.port)

    @property
    def bytes_up(self) -> int:
        """Bytes forwarded client -> server, all connections."""
        with self._cond:
            return self._bytes["up"]

    @property
    def bytes_down(self) -> int:
        """Bytes forwarded server -> client, all connections."""
        with self._cond:
            return self._bytes["down"]

    @property
    def connections(self) -> int:
        """Connections accepted so far."""
        with self._cond:
            return self._accepted

    @property
    def peak_open(self) -> int:
        """The most connections whose client had not closed its side yet, at any accept."""
        with self._cond:
            return self._peak_open

    @property
    def cuts(self) -> int:
        """Connections closed by ``cut_after``."""
        with self._cond:
            return self._cuts

    # -- controls ---------------------------------------------------------

    def cut_after(
        self, n_bytes: int, direction: Direction = "down", how: CutMode = "close"
    ) -> None:
        """Close both sides once ``n_bytes`` more have passed in ``direction``.

        Counted per connection from now (or from its start if newer); exactly
        ``n_bytes`` are forwarded, then the client sees EOF or, with
        ``how="reset"``, a connection reset.
        """
        if n_bytes < 0:
            raise ValueError("n_bytes must be >= 0")
        with self._cond:
            self._generation += 1
            self._cut = _CutRule(direction, n_bytes, how, self._generation)

    def stall(self, direction: StallDirection = "both") -> None:
        """Stop forwarding without closing; bytes wait in kernel buffers."""
        with self._cond:
            self._stalled |= {"up", "down"} if direction == "both" else {direction}

    def resume(self) -> None:
        """Forward again after ``stall()``."""
        with self._cond:
            self._stalled.clear()
            self._cond.notify_all()

    def reset(self) -> None:
        """Back to a transparent proxy (no cut rule, no stall)."""
        with self._cond:
            self._cut = None
            self._stalled.clear()
            self._cond.notify_all()

    def drop_connections(self, how: CutMode = "close") -> None:
        """Close every open connection now (new ones are still accepted)."""
        with self._cond:
            connections = list(self._connections)
        for connection in connections:
            connection.close(how)

    def close(self) -> None:
        """Stop listening, close all connections and join the threads."""
        self._closed.set()
        self.reset()
        self.drop_connections()
        self._accept_thread.join(JOIN_TIMEOUT)
        with self._cond:
            threads = list(self._threads)
        for thread in threads:
            thread.join(JOIN_TIMEOUT)
        with contextlib.suppress(OSError):
            self._listener.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- machinery --------------------------------------------------------

    def _accept_loop(self) -> None:
        while not self._closed.is_set():
            readable, _, _ = select.select([self._listener], [], [], POLL_SECONDS)
            if not readable:
                continue
            try:
                client, _ = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                continue
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target, timeout=CONNECT_TIMEOUT)
            except OSError:
                client.close()  # the client sees EOF, as if the server dropped it
                continue
            for sock in (client, upstream):
                sock.setblocking(False)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            connection = _Connection(client, upstream)
            with self._cond:
                self._accepted += 1
                self._connections = [c for c in self._connections if not c.done.is_set()]
                self._connections.append(connection)
                self._peak_open = max(self._peak_open,
                                      sum(1 for c in self._connections if c.client_open))
                pumps = [
                    threading.Thread(
                        target=self._pump,
                        args=(connection, src, dst, direction),
                        name=f"faultproxy-{self.port}-{direction}",
                        daemon=True,
                    )
                    for src, dst, direction in (
                        (client, upstream, "up"),
                        (upstream, client, "down"),
                    )
                ]
                self._threads = [t for t in self._threads if t.is_alive()] + pumps
            for thread in pumps:
                thread.start()

    def _is_stalled(self, direction: Direction) -> bool:
        return direction in self._stalled

    def _wait_while_stalled(self, connection: _Connection, direction: Direction) -> None:
        with self._cond:
            while self._is_stalled(direction) and not connection.done.is_set():
                self._cond.wait(POLL_SECONDS)

    def _apply_cut(
        self, connection: _Connection, direction: Direction, data: bytes
    ) -> tuple[bytes, CutMode | None]:
        """Trim ``data`` to what the cut rule still allows; say if we must cut."""
        with self._cond:
            rule = self._cut
            if rule is None or rule.direction != direction:
                return data, None
            if connection.cut_generation != rule.generation:
                connection.cut_generation = rule.generation
                connection.cut_count = 0
            remaining = rule.n_bytes - connection.cut_count
            if len(data) < remaining:
                connection.cut_count += len(data)
                return data, None
            connection.cut_count += remaining
            return data[: max(remaining, 0)], rule.how

    def _pump(
        self, connection: _Connection, src: socket.socket, dst: socket.socket, direction: Direction
    ) -> None:
        try:
            while not connection.done.is_set():
                self._wait_while_stalled(connection, direction)
                try:
                    readable, _, _ = select.select([src], [], [], POLL_SECONDS)
                    if not readable:
                        continue
                    data = src.recv(CHUNK)
                except (BlockingIOError, InterruptedError):
                    continue
                except (OSError, ValueError):  # closed under us
                    return
                if not data:
                    # Pass a half-close on, so the peer sees the EOF too.
                    with contextlib.suppress(OSError):
                        dst.shutdown(socket.SHUT_WR)
                    return
                data, cut = self._apply_cut(connection, direction, data)
                # A stall that began while we were reading holds this chunk too.
                self._wait_while_stalled(connection, direction)
                if data and not self._send_all(connection, dst, data, direction):
                    return
                if cut is not None:
                    with self._cond:
                        self._cuts += 1
                    connection.close(cut)
                    return
        finally:
            if direction == "up":  # the client closed (or the connection was cut)
                connection.client_open = False
            connection.pump_finished()

    def _send_all(
        self, connection: _Connection, dst: socket.socket, data: bytes, direction: Direction
    ) -> bool:
        view = memoryview(data)
        while view:
            if connection.done.is_set():
                return False
            try:
                _, writable, _ = select.select([], [dst], [], POLL_SECONDS)
                if not writable:
                    continue
                # Counted under the lock together with the send, so a test that
                # has just received these bytes never reads a stale counter.
                with self._cond:
                    sent = dst.send(view)
                    self._bytes[direction] += sent
            except (BlockingIOError, InterruptedError):
                continue
            except (OSError, ValueError):
                return False
            view = view[sent:]
        return True


@pytest.fixture
def fault_proxy() -> Iterator[Callable[[str, int], FaultProxy]]:
    """Factory ``make(target_host, target_port) -> FaultProxy``; all closed at teardown."""
    proxies: list[FaultProxy] = []

    def make(target_host: str, target_port: int) -> FaultProxy:
        proxy = FaultProxy(target_host, target_port)
        proxies.append(proxy)
        return proxy

    yield make
    for proxy in proxies:
        proxy.close()
