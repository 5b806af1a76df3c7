"""The fault proxy is transparent until told otherwise, then cuts or stalls precisely."""

from __future__ import annotations

import imaplib
import socket
import socketserver
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from email.message import EmailMessage

import pytest
from imapclient import IMAPClient

from tests.testbed.dovecot import DovecotServer
from tests.testbed.faultproxy import FaultProxy

MakeProxy = Callable[[str, int], FaultProxy]
TIMEOUT = 5.0


class _BlobHandler(socketserver.BaseRequestHandler):
    """Line protocol: 'BLOB n' answers n bytes of b'x'; anything else is echoed."""

    def handle(self) -> None:
        self.request.settimeout(TIMEOUT)
        buffer = b""
        try:
            while True:
                chunk = self.request.recv(4096)
                if not chunk:
                    return
                buffer += chunk
                while b"\n" in buffer:
                    line, buffer = buffer.split(b"\n", 1)
                    if line.startswith(b"BLOB "):
                        self.request.sendall(b"x" * int(line.split()[1]))
                    else:
                        self.request.sendall(line + b"\n")
        except OSError:
            return


class _Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True


@pytest.fixture
def blob_server() -> Iterator[tuple[str, int]]:
    server = _Server(("127.0.0.1", 0), _BlobHandler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    yield server.server_address  # type: ignore[misc]
    server.shutdown()
    server.server_close()
    thread.join(TIMEOUT)


def connect(proxy: FaultProxy) -> socket.socket:
    return socket.create_connection(proxy.address, timeout=TIMEOUT)


def recv_until_eof(sock: socket.socket, limit: int = 10_000_000) -> bytes:
    data = b""
    while len(data) < limit:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    return data


def recv_exactly(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            break
        data += chunk
    return data


def test_pass_through_counts_bytes(fault_proxy: MakeProxy, blob_server: tuple[str, int]) -> None:
    proxy = fault_proxy(*blob_server)
    with connect(proxy) as sock:
        sock.sendall(b"hello\nBLOB 200000\n")
        assert recv_exactly(sock, 6) == b"hello\n"
        assert recv_exactly(sock, 200_000) == b"x" * 200_000
    assert proxy.bytes_up == len(b"hello\nBLOB 200000\n")
    assert proxy.bytes_down == 200_006
    assert proxy.connections == 1


def test_peak_open_counts_connections_open_at_once(
    fault_proxy: MakeProxy, blob_server: tuple[str, int]
) -> None:
    proxy = fault_proxy(*blob_server)
    for _ in range(2):  # one after the other: never two at once
        with connect(proxy) as sock:
            sock.sendall(b"ping\n")
            assert recv_exactly(sock, 5) == b"ping\n"
        time.sleep(0.2)  # the proxy sees the close within its poll interval
    assert proxy.peak_open == 1
    with connect(proxy) as first, connect(proxy) as second:
        for sock in (first, second):
            sock.sendall(b"ping\n")
            assert recv_exactly(sock, 5) == b"ping\n"
    assert proxy.peak_open == 2 and proxy.connections == 4


def test_cut_down_after_exact_bytes_gives_eof(
    fault_proxy: MakeProxy, blob_server: tuple[str, int]
) -> None:
    proxy = fault_proxy(*blob_server)
    proxy.cut_after(12_345, "down")
    with connect(proxy) as sock:
        sock.sendall(b"BLOB 100000\n")
        assert recv_until_eof(sock) == b"x" * 12_345
    assert proxy.cuts == 1

    # The rule stays armed: the next connection is cut as well.
    with connect(proxy) as sock:
        sock.sendall(b"BLOB 100000\n")
        assert len(recv_until_eof(sock)) == 12_345

    proxy.reset()
    with connect(proxy) as sock:
        sock.sendall(b"BLOB 100000\n")
        assert len(recv_exactly(sock, 100_000)) == 100_000


def test_cut_reset_mode_raises_connection_reset(
    fault_proxy: MakeProxy, blob_server: tuple[str, int]
) -> None:
    proxy = fault_proxy(*blob_server)
    proxy.cut_after(1000, "down", how="reset")
    with connect(proxy) as sock:
        sock.sendall(b"BLOB 100000\n")
        with pytest.raises(ConnectionResetError):
            recv_until_eof(sock)


def test_cut_up_counts_from_arming(fault_proxy: MakeProxy, blob_server: tuple[str, int]) -> None:
    proxy = fault_proxy(*blob_server)
    with connect(proxy) as sock:
        sock.sendall(b"before\n")
        assert recv_exactly(sock, 7) == b"before\n"
        proxy.cut_after(4, "up")
        sock.sendall(b"abcdefgh\n")
        # Only "abcd" reached the server, which had no newline to answer.
        assert recv_until_eof(sock) == b""
    assert proxy.bytes_up == 7 + 4


def test_stall_and_resume(fault_proxy: MakeProxy, blob_server: tuple[str, int]) -> None:
    proxy = fault_proxy(*blob_server)
    with connect(proxy) as sock:
        proxy.stall("down")
        sock.sendall(b"ping\n")
        sock.settimeout(0.3)
        with pytest.raises(TimeoutError):
            sock.recv(10)
        proxy.resume()
        sock.settimeout(TIMEOUT)
        assert recv_exactly(sock, 5) == b"ping\n"


def test_drop_connections_and_close(fault_proxy: MakeProxy, blob_server: tuple[str, int]) -> None:
    proxy = fault_proxy(*blob_server)
    with connect(proxy) as sock:
        sock.sendall(b"a\n")
        assert recv_exactly(sock, 2) == b"a\n"
        proxy.drop_connections()
        assert recv_until_eof(sock) == b""
    proxy.close()
    with pytest.raises(OSError):
        socket.create_connection(proxy.address, timeout=TIMEOUT).close()


# -- against the real IMAP server -------------------------------------------


def big_message(size: int) -> bytes:
    msg = EmailMessage()
    msg["From"] = "alice@example.org"
    msg["To"] = "bob@example.test"
    msg["Subject"] = "big"
    msg.set_content(("y" * 76 + "\n") * (size // 77))
    return msg.as_bytes().replace(b"\n", b"\r\n")


@pytest.fixture
def imaps_with_big_message(
    dovecot: DovecotServer, fault_proxy: MakeProxy
) -> tuple[FaultProxy, IMAPClient, int, int]:
    user = dovecot.add_user()
    dovecot.deliver(user, big_message(300_000))
    uid = dovecot.folder_state(user).uids[0]
    proxy = fault_proxy(dovecot.host, dovecot.imaps_port)
    client = IMAPClient(proxy.host, port=proxy.port, ssl=True, timeout=TIMEOUT)
    client.login(user.username, user.password)
    info = client.select_folder("INBOX")
    size = client.fetch([uid], ["RFC822.SIZE"])[uid][b"RFC822.SIZE"]
    assert info[b"EXISTS"] == 1
    return proxy, client, uid, size


def test_imap_fetch_through_proxy_passes_whole_message(
    imaps_with_big_message: tuple[FaultProxy, IMAPClient, int, int],
) -> None:
    proxy, client, uid, size = imaps_with_big_message
    with client:
        body = client.fetch([uid], ["BODY.PEEK[]"])[uid][b"BODY[]"]
    assert len(body) == size > 300_000
    assert proxy.bytes_down > size


def test_imap_fetch_cut_mid_literal_raises(
    imaps_with_big_message: tuple[FaultProxy, IMAPClient, int, int],
) -> None:
    proxy, client, uid, _ = imaps_with_big_message
    proxy.cut_after(50_000, "down")
    started = time.monotonic()
    with pytest.raises((imaplib.IMAP4.abort, OSError, ssl.SSLError)):
        client.fetch([uid], ["BODY.PEEK[]"])
    assert proxy.cuts == 1
    assert time.monotonic() - started < TIMEOUT  # failed on the cut, not on a timeout
    client.shutdown()


def test_imap_stall_makes_client_time_out(
    imaps_with_big_message: tuple[FaultProxy, IMAPClient, int, int],
) -> None:
    proxy, client, _, _ = imaps_with_big_message
    client.socket().settimeout(0.5)
    proxy.stall("down")
    with pytest.raises((TimeoutError, socket.timeout)):
        client.noop()
    client.shutdown()
