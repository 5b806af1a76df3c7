"""TLS over memory BIOs: a client connection that reads the socket in large blocks.

An ``ssl.SSLSocket`` returns at most one TLS record per read, and OpenSSL reads each record
with two system calls (header, then body). Dovecot sends ~4 KB records, so a 141 MB POP3
download was ~35,000 reads and as many passes of the reply parser's Python loop over 4 KB
blocks. Here one ``recv`` takes whatever the kernel holds (up to 256 KB) and every record in
it is decrypted from memory in one call, so a buffered reader over this socket gets blocks as
large as the data that has arrived (bench/pop3_sync.py).

The handshake, certificate and host name checks are OpenSSL's, from the same context as
``SSLContext.wrap_socket`` (``SSLContext.wrap_bio``). Used by the POP3 adapter (no IDLE: a
poll on the socket cannot see records already read into memory here).
"""
from __future__ import annotations

import io
import socket
import ssl

RECV_BYTES = 256 * 1024


class _RawReader(io.RawIOBase):
    def __init__(self, owner: MemoryTLS) -> None:
        self._owner = owner

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:  # noqa: ANN001
        return self._owner.recv_into(buffer)


class MemoryTLS:
    """The parts of a socket that poplib uses (sendall, makefile, shutdown, close, timeouts),
    over a TLS client session on ``sock``. The handshake happens here; its failures raise
    ``ssl.SSLError`` (``SSLCertVerificationError`` for an untrusted certificate)."""

    def __init__(self, sock: socket.socket, context: ssl.SSLContext, server_hostname: str) -> None:
        self._sock = sock
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self._tls = context.wrap_bio(self._incoming, self._outgoing, server_hostname=server_hostname)
        self._block = bytearray(RECV_BYTES)
        self._eof = False
        while True:
            try:
                self._tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                self._flush()
                if not self._fill():
                    raise ssl.SSLEOFError(ssl.SSL_ERROR_EOF, "EOF during the TLS handshake") from None
            except ssl.SSLError:
                try:
                    self._flush()  # the alert (e.g. bad certificate) tells the server why
                except OSError:
                    pass
                raise
        self._flush()

    @classmethod
    def over(cls, sock: socket.socket, context: ssl.SSLContext, server_hostname: str) -> MemoryTLS:
        """TLS on ``sock``, which is closed if the handshake fails."""
        try:
            return cls(sock, context, server_hostname)
        except BaseException:
            sock.close()
            raise

    # -- the wire ------------------------------------------------------------------------------
    def _flush(self) -> None:
        data = self._outgoing.read()
        if data:
            self._sock.sendall(data)

    def _fill(self) -> bool:
        """Whatever the kernel holds (at least one byte, waiting up to the timeout); False at
        the end of the stream."""
        if self._eof:
            return False
        count = self._sock.recv_into(self._block)
        if not count:
            self._eof = True
            self._incoming.write_eof()
            return False
        self._incoming.write(memoryview(self._block)[:count])
        return True

    # -- what poplib calls ---------------------------------------------------------------------
    def recv_into(self, buffer, nbytes: int = 0) -> int:  # noqa: ANN001
        """Decrypted bytes into ``buffer``: all that arrived, up to its size; waits only when
        nothing has. 0 at the end of the stream (a missing close_notify counts as the end,
        as ``SSLSocket`` does with ``suppress_ragged_eofs``)."""
        view = memoryview(buffer).cast("B")
        want = nbytes or len(view)
        got = 0
        while got < want:
            try:
                count = self._tls.read(want - got, view[got:want])
            except ssl.SSLWantReadError:
                if got:
                    break
                self._flush()  # a TLS 1.3 key update may want an answer
                if not self._fill():
                    return self._read_after_eof(view[:want])
                continue
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                break
            if not count:
                break
            got += count
            if not self._incoming.pending and not self._tls.pending():
                break  # all that arrived is decrypted: do not wait for more
        return got

    def _read_after_eof(self, view: memoryview) -> int:
        try:
            return self._tls.read(len(view), view)
        except (ssl.SSLWantReadError, ssl.SSLZeroReturnError, ssl.SSLEOFError):
            return 0

    def sendall(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            written = self._tls.write(view)
            view = view[written:]
        self._flush()

    def makefile(self, mode: str = "rb", buffering: int | None = None) -> io.BufferedReader:
        if mode != "rb":
            raise ValueError("only 'rb' is supported")
        return io.BufferedReader(_RawReader(self), buffering or io.DEFAULT_BUFFER_SIZE)

    def settimeout(self, timeout: float | None) -> None:
        self._sock.settimeout(timeout)

    def gettimeout(self) -> float | None:
        return self._sock.gettimeout()

    def fileno(self) -> int:
        return self._sock.fileno()

    def shutdown(self, how: int) -> None:
        self._sock.shutdown(how)

    def close(self) -> None:
        self._sock.close()

    def version(self) -> str | None:
        return self._tls.version()

    def cipher(self) -> tuple[str, str, int] | None:
        return self._tls.cipher()

    def getpeercert(self, binary_form: bool = False):  # noqa: ANN201
        return self._tls.getpeercert(binary_form)
