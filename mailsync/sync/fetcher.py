"""Fetch and prepare a large IMAP or POP3 download in a separate process.

Fetching (TLS, imaplib, IMAPClient's parser) and preparing (envelope, hashes, zstd) a batch is
about as much Python work as storing it. In one process the GIL serializes the two even when
they run in two threads; here a child process fetches and prepares batch n+1 while the worker
stores batch n, so a large initial sync uses both cores (bench/imap_sync.py).

The child runs ``main()`` below, started with ``subprocess`` (a Celery prefork
worker is a daemonic process and may not use ``multiprocessing`` children). It imports no
Django. The job, password included, goes over its stdin (never argv or the environment); it
answers with pickled frames, each after its length (8 bytes), on its stdout, a Unix socket
(``Frames``: one frame is read with one system call, not a pipe's 64 KB at a time):

    ("selected", uidvalidity)      once, after SELECT
    ("part", [Prepared])           the first of a batch's prepared messages, ~2 MB a frame
    ("batch", uids, [Prepared], [FetchedMessage])  per batch, in order, raw bytes dropped
                                   (compressed kept; the rest of them after the parts);
                                   the last list: messages not delivered
    ("error", exception)           then it exits
    ("done",)
    ("tick",)                      whenever it sent nothing for TICK seconds (it is alive)

For IMAP it opens its own connection: the caller closes its own first, so a mailbox still
uses at most two connections (this one and the IDLE watcher's). For POP3 the child holds the
session and answers the engine's commands one by one (``Pop3ChildSession``): ("ok", result)
or ("error", exception) per command.

Only the parent's own child writes that socket, so unpickling it trusts nothing foreign. The
child dies with its parent (PR_SET_PDEATHSIG, and a broken socket at its next write). The
parent gives up on a child that has said nothing for SILENCE seconds (stopped, frozen): the
sync ends with a transient error and is retried, instead of hanging until Celery's time
limit; a server that stops answering is the child's own network timeouts' business.
"""
from __future__ import annotations

import contextlib
import io
import logging
import os
import pickle
import select
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

from ..exceptions import MailError, MailProtocolError, MailServerUnreachable, MailTransientError
from ..malloc import large_buffers_back_to_the_system
from ..protocols.base import FetchedMessage, ServerSettings, tls_context
from ..protocols.imap import ImapSession
from .pipeline import run_ahead
from .prepare import Prepared, prepare_batch

if TYPE_CHECKING:  # imported where used: an IMAP fetch process needs none of it (~5 ms)
    from ..protocols.pop3 import Pop3Listing, Pop3Request, Pop3Retrieved, Pop3Session

log = logging.getLogger(__name__)

_PROJECT_ROOT = Path(__file__).resolve().parents[2]
# The child's entry. ``crm`` is entered as a bare package first: its __init__ imports the
# Celery app (~0.3 s of start-up) and the child needs only ``crm.exceptions`` from it.
_BOOTSTRAP = (
    "import sys, types\n"
    "crm = types.ModuleType('crm'); crm.__path__ = [sys.argv[1] + '/crm']; sys.modules['crm'] = crm\n"
    "from mailsync.sync.fetcher import main\n"
    "sys.exit(main())\n"
)


@dataclass
class FetchJob:
    settings: ServerSettings
    folder: str
    uidvalidity: int
    batches: list[list[int]]
    sizes: dict[int, int]
    limit: int  # the mailbox's max_message_bytes: larger messages are fetched as headers


def fetch_batch(session: ImapSession, batch: Sequence[int], sizes: dict[int, int],
                limit: int) -> list[FetchedMessage]:
    """The messages of one batch, whole, or as their header block when over ``limit``."""
    large = [uid for uid in batch if sizes.get(uid, 0) > limit]
    whole = [uid for uid in batch if sizes.get(uid, 0) <= limit]
    messages = session.fetch_messages(whole) + session.fetch_headers(large)
    # Asked for and not delivered: expunged meanwhile, or held back by the server (a reply
    # without a body, a size that never matches). The latter are reported, never skipped
    # silently: the cursor moves past the batch.
    got = {m.uid for m in messages}
    kept_back = session.missing_still_there([uid for uid in batch if uid not in got])
    messages += [FetchedMessage(uid=uid, flags=(), size=sizes.get(uid, 0), internal_date=None,
                                raw=b"", error=UNDELIVERED) for uid in kept_back]
    return sorted(messages, key=lambda m: m.uid)


UNDELIVERED = ("The server did not send this message when asked (it is still there); "
               "it is fetched again by Retry.")


# The child sends a ("tick",) frame when it has sent nothing for TICK seconds, whatever it is
# waiting for (the server, the worker); the worker gives up on a child silent for SILENCE.
TICK = 10.0
SILENCE = 120.0


class FetchProcessSilent(OSError):
    """Nothing from the fetch process for SILENCE seconds."""


# -- the parent's side -----------------------------------------------------------------------
def spawn_ahead() -> subprocess.Popen:
    """A fetch process started before its job is known: its interpreter and imports (~0.15 s)
    overlap the sync's LOGIN, SELECT and SEARCH. Hand it to ``fetch_in_child`` or ``discard``."""
    return _spawn()


def discard(child: subprocess.Popen | None) -> None:
    if child is not None:
        _end(child)


def fetch_in_child(job: FetchJob, child: subprocess.Popen | None = None,
                   ) -> Iterator[tuple[list[int], list[Prepared], list[FetchedMessage]]]:
    """Yield (batch, prepared messages, messages not delivered) in order from a child process (``child``, from
    ``spawn_ahead``, or a new one); the child's error is raised here after the batches
    before it were yielded.

    A thread of this process receives (unpickles) batch n+1 while the caller stores batch n."""
    if child is None or child.poll() is not None:
        discard(child)
        child = _spawn()
    assert child.stdin is not None
    try:
        _send(child, job)
        child.stdin.close()
        # The next batch waits in the socket and the child, not in this process's memory.
        received = run_ahead(_received(_frames(child), job.uidvalidity), name="imap-receive", depth=0)
        try:
            for item in received:
                yield item
        finally:
            if child.poll() is None:
                child.kill()  # unblocks the receiving thread before it is joined
            received.close()
    finally:
        _end(child)


# The child gets only what a Python process and TLS need from the worker's environment, and
# the one mailbox's settings over its stdin: no secret of the worker's (keys, database URLs).
_FOR_THE_CHILD = frozenset({"PATH", "HOME", "LANG", "LANGUAGE", "TZ", "TMPDIR", "SSL_CERT_FILE",
                            "SSL_CERT_DIR", "MAILROOM_LOG_LEVEL", "SYSTEMROOT"})


def _spawn() -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items()
           if k in _FOR_THE_CHILD or k.startswith(("LC_", "PYTHON"))}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(_PROJECT_ROOT), env.get("PYTHONPATH")]))
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        bound_silence(ours)
        child = subprocess.Popen(  # noqa: S603  (our own module, no shell)
            [sys.executable, "-c", _BOOTSTRAP, str(_PROJECT_ROOT), str(os.getpid()), repr(TICK)],
            stdin=subprocess.PIPE, stdout=theirs.fileno(), cwd=_PROJECT_ROOT, env=env,
        )
    except BaseException:
        ours.close()
        raise
    finally:
        theirs.close()  # the child's end lives on in the child only: its exit is our EOF
    child.frames = Frames(ours)  # type: ignore[attr-defined]
    return child


def bound_silence(sock: socket.socket) -> None:
    """Reads from ``sock`` wait SILENCE seconds at most for their first byte. Bounded in the
    kernel (SO_RCVTIMEO), so a frame is still received with one blocking recv_into that holds
    no GIL (a Python-level timeout would make the socket non-blocking: a call per piece of
    the frame, each taking the GIL)."""
    seconds = max(SILENCE, 0.001)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO,
                    struct.pack("ll", int(seconds), int(seconds % 1 * 1_000_000)))


def _frames(child: subprocess.Popen) -> Frames:
    return child.frames  # type: ignore[attr-defined,no-any-return]


class Frames:
    """The child's frames, read from our end of the socket: a length, then the pickle, each
    with one ``recv_into(MSG_WAITALL)`` that holds no GIL until the whole frame is there.
    Over a pipe, ``pickle.load`` took a batch (~7 MB) 64 KB at a time, and the receiving
    thread waited for the GIL after each piece while this process stored the batch before:
    0.6 s per batch with a busy main thread, the child blocked meanwhile (bench/README.md)."""

    _HEADER = struct.Struct("!Q")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    def load(self) -> object:
        (size,) = self._HEADER.unpack(self._exactly(self._HEADER.size))
        if size > MAX_FRAME:
            raise ValueError(f"a frame of {size} bytes")
        if size <= WHOLE_FRAME:
            return pickle.loads(self._exactly(size))  # noqa: S301  (our own child writes it)
        # Larger (one mail near the mailbox's size limit): unpickled as it arrives, each large
        # bytes object received straight into itself, not into a buffer of the whole frame
        # first (2x its size at once). A recv per object: slower with a busy main thread.
        reader = io.BufferedReader(_FrameBody(self.sock, size), 1 << 16)
        frame = pickle.load(reader)  # noqa: S301  (our own child writes it)
        if reader.peek(1) or not reader.raw.done:  # type: ignore[attr-defined]
            raise ValueError("a frame longer than its pickle")
        return frame

    def _exactly(self, size: int) -> bytearray:
        data = bytearray(size)
        view = memoryview(data)
        got = 0
        while got < size:
            count = _recv_into(self.sock, view[got:], size - got)
            if not count:
                raise EOFError("the fetch process closed its end")
            got += count
        del view
        return data

    def close(self) -> None:
        self.sock.close()


class _FrameBody(io.RawIOBase):
    """The next ``size`` bytes of the socket, and not one more."""

    def __init__(self, sock: socket.socket, size: int) -> None:
        self._sock = sock
        self._left = size

    @property
    def done(self) -> bool:
        return self._left == 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:  # noqa: ANN001
        want = min(len(buffer), self._left)
        if not want:
            return 0
        count = _recv_into(self._sock, buffer, want)
        if not count:
            raise EOFError("the fetch process closed its end")
        self._left -= count
        return count


def _recv_into(sock: socket.socket, buffer, size: int) -> int:  # noqa: ANN001
    """Up to ``size`` bytes, waiting for all of them; fewer when SILENCE passed meanwhile (the
    rest is asked for again); FetchProcessSilent when nothing came for SILENCE seconds."""
    try:
        return sock.recv_into(buffer, size, socket.MSG_WAITALL)
    except BlockingIOError as exc:  # EAGAIN: SO_RCVTIMEO ran out with nothing received
        raise FetchProcessSilent(f"nothing from the fetch process for {SILENCE:.0f} s") from exc


# Frames up to this size (every batch: BATCH_BYTES is 8 MB) are received whole with one
# system call, then unpickled (twice their size for a moment).
WHOLE_FRAME = 32 << 20
# A sanity bound on one frame (the largest is a batch: ~8 MB of compressed sources, or one
# message up to the mailbox's size limit).
MAX_FRAME = 4 << 30


def write_frame(out: BinaryIO, frame: tuple) -> None:
    """The child's side of ``Frames``: the pickle's length, then the pickle, streamed (its
    length is counted by a first pass that copies nothing: the pickler hands large bytes
    objects to ``write`` as they are), so the batch is never held twice."""
    counter = _Counter()
    pickle.dump(frame, counter, protocol=pickle.HIGHEST_PROTOCOL)
    out.write(Frames._HEADER.pack(counter.size))
    pickle.dump(frame, out, protocol=pickle.HIGHEST_PROTOCOL)
    out.flush()


class _Counter:
    size = 0

    def write(self, data: bytes) -> int:
        self.size += len(data)
        return len(data)


def _send(child: subprocess.Popen, obj: object) -> None:
    """Write ``obj`` to the child's stdin, waiting SILENCE seconds at most for room in the
    pipe: a job larger than the pipe (the batches of ~7,000 messages and more) must not block
    the sync for good on a child that stopped before reading it."""
    assert child.stdin is not None
    data = memoryview(pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL))
    try:
        fd = child.stdin.fileno()  # nothing is ever left in its buffer: written here only
        os.set_blocking(fd, False)
        room = select.poll()
        room.register(fd, select.POLLOUT)
        while data:
            try:
                data = data[os.write(fd, data):]
            except BlockingIOError:
                if not room.poll(SILENCE * 1000):
                    raise _stopped_answering() from None
    except (BrokenPipeError, ValueError) as exc:  # ValueError: the pipe was closed here
        raise MailTransientError("The fetch process stopped unexpectedly.") from exc


def _end(child: subprocess.Popen) -> None:
    if child.poll() is None:
        child.kill()
    child.wait()
    for stream in (child.stdin, getattr(child, "frames", None)):
        if stream is not None:
            try:
                stream.close()
            except OSError:
                pass


def _stopped_answering() -> MailTransientError:
    return MailTransientError(f"The sync's fetch process stopped answering (nothing for {SILENCE:.0f} s); "
                              "the sync is tried again.")


def _received(stream: Frames, uidvalidity: int,
              ) -> Iterator[tuple[list[int], list[Prepared], list[FetchedMessage]]]:
    selected = _receive(stream)
    if selected[0] == "error":
        raise selected[1]
    if selected != ("selected", uidvalidity):
        raise MailTransientError(
            "The folder changed on the server (UIDVALIDITY) during the sync; it is synced "
            "again on the next run."
        )
    parts: list[Prepared] = []
    while True:
        frame = _receive(stream)
        if frame[0] == "done":
            return
        if frame[0] == "error":
            raise frame[1]
        if frame[0] == "part":
            parts += frame[1]
            continue
        yield frame[1], parts + frame[2], frame[3]
        parts = []


def _receive(stream: Frames) -> tuple:
    try:
        frame = stream.load()
        while frame == ("tick",):
            frame = stream.load()
    except FetchProcessSilent as exc:
        # Stopped (SIGSTOP, a debugger) or frozen: the caller kills it; the next run goes on
        # from the last stored batch.
        raise _stopped_answering() from exc
    except (EOFError, pickle.UnpicklingError, ValueError, OSError) as exc:
        # Ended, or killed in the middle of a frame (the OOM killer, a SIGKILL): retried.
        raise MailTransientError("The fetch process stopped unexpectedly.") from exc
    if not isinstance(frame, tuple) or not frame:
        raise MailProtocolError("The fetch process sent something unexpected.")
    return frame


# -- the child's side ------------------------------------------------------------------------
def run_job(job: FetchJob, send) -> None:  # noqa: ANN001
    """Fetch in a thread, prepare (``prepare_batch``: hashing and zstd in a third thread)
    and send in this one: the fetch waits on the server and on TLS much of the time, which
    leaves the GIL to the envelope parser. (Compressing in the parent instead was measured
    slower: bench/README.md.)"""
    with ImapSession(job.settings, memory_tls=True) as session:
        selected = session.select(job.folder, readonly=True)
        send(("selected", selected.uidvalidity))
        if selected.uidvalidity != job.uidvalidity:
            return
        # Double buffering: the batch being prepared and the next one (memory: bench/README.md).
        fetched = run_ahead(((batch, fetch_batch(session, batch, job.sizes, job.limit))
                             for batch in job.batches), name="imap-fetch", depth=0)
        for batch, messages in fetched:
            kept_back = [m for m in messages if m.error]
            prepared = prepare_batch([m for m in messages if not m.error])
            # In parts of about PART_BYTES: the worker receives each whole, in one system
            # call, into a buffer it then unpickles; a part, not the batch, is held twice.
            start, size = 0, 0
            for end, p in enumerate(prepared, 1):
                size += len(p.compressed)
                if size >= PART_BYTES and end < len(prepared):
                    send(("part", prepared[start:end]))
                    start, size = end, 0
            send(("batch", batch, prepared[start:], kept_back))
    send(("done",))


PART_BYTES = 2 << 20


# -- POP3: the whole session in the child ---------------------------------------------------
@dataclass
class Pop3Job:
    settings: ServerSettings


# RETR is read in chunks of this many messages, the next chunk while this one is prepared.
RETRIEVE_CHUNK = 50


def retrieve_prepared(session: Pop3Session | Pop3ChildSession, requests: Sequence[Pop3Request],
                      delete_first: Sequence[int], uid_of: dict[int, int],
                      ) -> tuple[list[Pop3Retrieved], dict[int, Prepared]]:
    """RETR (or TOP) a batch and prepare what arrived whole (or as headers by request).
    Only the compressed copy is kept: replies come back without their bytes. The next chunk
    is read (a thread waiting on the server) while this one is parsed, hashed and compressed."""

    def chunks() -> Iterator[list[Pop3Retrieved]]:
        for start in range(0, len(requests), RETRIEVE_CHUNK):
            chunk = requests[start:start + RETRIEVE_CHUNK]
            replies = session.retrieve(chunk, delete_first=delete_first if start == 0 else ())
            yield replies
            if len(replies) < len(chunk) or (replies and not replies[-1].complete):
                return  # a reply over its cap closed the session

    out: list[Pop3Retrieved] = []
    prepared: dict[int, Prepared] = {}
    try:
        for replies in run_ahead(chunks(), name="pop3-retrieve"):
            wanted: list[FetchedMessage | None] = []
            numbers: list[int] = []
            for index, r in enumerate(replies):
                replies[index] = None  # each message's bytes go once it is prepared (large mail)
                if not r.error and (r.complete or r.headers_only):
                    wanted.append(FetchedMessage(uid=uid_of[r.number], flags=(), size=len(r.raw),
                                                 internal_date=None, raw=r.raw))
                    numbers.append(r.number)
                out.append(replace(r, raw=b""))
            del replies
            prepared.update(zip(numbers, prepare_batch(wanted)))  # consumes ``wanted``
    except MailError as exc:
        # The connection was lost mid-batch: nothing of it is stored, but what came over the
        # wire (the chunks before, the cut reply) counts against the provider's daily limit.
        exc.received = getattr(exc, "received", 0) + sum(r.received for r in out)  # type: ignore[attr-defined]
        raise
    return out, prepared


class Pop3ChildSession:
    """A ``Pop3Session`` whose connection lives in a child process, which also prepares
    (envelope, hashes, zstd) the messages it retrieves: the worker only stores them.

    POP3 servers lock the maildrop for one session (RFC 1939 8), so the child holds the
    only connection and runs every command the engine sends, DELE and QUIT included, in
    the engine's order: the guarantee "DELE only after the commit" is the engine's, as with
    a local session. ``abandon()`` (or the worker's death) kills the child: the server then
    sees a dropped connection and applies no DELE.
    """

    def __init__(self, settings: ServerSettings) -> None:
        self.settings = settings
        self._child: subprocess.Popen | None = None
        self._lock = threading.Lock()

    def __enter__(self) -> Pop3ChildSession:
        child = self._child = _spawn()
        try:
            _send(child, Pop3Job(self.settings))
            self._result(child)
        except BaseException:
            self.abandon()
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.abandon()

    @staticmethod
    def _result(child: subprocess.Popen) -> object:
        frame = _receive(_frames(child))
        if frame[0] == "error":
            raise frame[1]
        return frame[1]

    def _call(self, *command: object) -> object:
        with self._lock:
            child = self._child
            if child is None:
                raise MailServerUnreachable(f"The connection to {self.settings.host} is closed.")
            _send(child, command)
            return self._result(child)

    def listing(self) -> list[Pop3Listing]:
        return self._call("listing")  # type: ignore[return-value]

    def retrieve(self, requests: Sequence[Pop3Request], *,
                 delete_first: Sequence[int] = ()) -> list[Pop3Retrieved]:
        return self._call("retrieve", list(requests), list(delete_first))  # type: ignore[return-value]

    def retrieve_prepared(self, requests: Sequence[Pop3Request], delete_first: Sequence[int],
                          uid_of: dict[int, int]) -> tuple[list[Pop3Retrieved], dict[int, Prepared]]:
        return self._call("retrieve_prepared", list(requests), list(delete_first), uid_of)  # type: ignore[return-value]

    def delete(self, numbers: Sequence[int]) -> None:
        self._call("delete", list(numbers))

    def refused_deletes(self) -> dict[int, str]:
        return self._call("refused_deletes")  # type: ignore[return-value]

    def quit(self) -> None:
        try:
            self._call("quit")
        finally:
            self.abandon()

    def abandon(self) -> None:
        child, self._child = self._child, None
        if child is not None:
            _end(child)  # a blocked _call in another thread then gets EOF


def run_pop3(job: Pop3Job, send, commands: BinaryIO) -> None:  # noqa: ANN001
    """Serve the parent's commands over one POP3 session until QUIT or the end of stdin."""
    from ..protocols.pop3 import Pop3Session  # noqa: PLC0415  (see the imports above)

    session = Pop3Session(job.settings)
    try:
        session.connect()
        send(("ok", None))
        while True:
            try:
                command = pickle.load(commands)  # noqa: S301  (written by our parent)
            except EOFError:
                return  # the parent is done or gone: no QUIT, no DELE applied
            name, args = command[0], command[1:]
            try:
                if name == "listing":
                    result: object = session.listing()
                elif name == "retrieve":
                    result = session.retrieve(args[0], delete_first=args[1])
                elif name == "retrieve_prepared":
                    result = retrieve_prepared(session, *args)
                elif name == "delete":
                    result = session.delete(args[0])
                elif name == "refused_deletes":
                    result = session.refused_deletes()
                elif name == "quit":
                    session.quit()
                    send(("ok", None))
                    return
                else:
                    raise MailProtocolError(f"Unknown command {name!r} for the POP3 process.")
            except MailError as exc:
                send(("error", _pickleable(exc)))
                continue
            send(("ok", result))
    finally:
        session.abandon()


def _die_with_parent() -> None:
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return


def _tick(send, last_sent: list[float], tick: float) -> None:  # noqa: ANN001
    """Tell the worker we are alive when nothing else was sent for ``tick`` seconds (a slow
    server, a large message, the worker busy): its SILENCE is for a stopped process only."""
    while True:
        wait = last_sent[0] + tick - time.monotonic()
        if wait > 0:
            time.sleep(wait)
            continue
        try:
            send(("tick",))
        except OSError:
            return  # the worker is gone: the main thread finds out too


def _pickleable(exc: BaseException) -> BaseException:
    try:
        pickle.loads(pickle.dumps(exc))
        return exc
    except Exception:  # noqa: BLE001
        return RuntimeError(f"{type(exc).__name__}: {exc}")


def main() -> int:
    # The worker's pid comes in argv: read after our start-up (~0.2 s of imports), getppid()
    # would already name init if the worker died meanwhile, and the check below would pass.
    parent = int(sys.argv[2]) if len(sys.argv) > 2 else os.getppid()
    _die_with_parent()
    if os.getppid() != parent:
        return 1  # the worker died before the death signal was set
    large_buffers_back_to_the_system()  # as the worker does (mailsync/apps.py)
    # Frames go to the original stdout; anything a library prints goes to stderr instead.
    frames = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    logging.basicConfig(level=os.environ.get("MAILROOM_LOG_LEVEL", "WARNING"), stream=sys.stderr)

    lock = threading.Lock()
    last_sent = [time.monotonic()]

    def send(frame: tuple) -> None:
        with lock:  # a frame is written whole: the ticker's never cuts into another
            write_frame(frames, frame)
            last_sent[0] = time.monotonic()

    tick = float(sys.argv[3]) if len(sys.argv) > 3 else 0.0
    if tick > 0:
        threading.Thread(target=_tick, args=(send, last_sent, tick), name="tick", daemon=True).start()

    # Loading the CA bundle (~40 ms) while the parent still logs in and searches, not after
    # the job arrives: the first batch comes that much sooner.
    with contextlib.suppress(Exception):
        tls_context()
    try:
        job = pickle.load(sys.stdin.buffer)  # noqa: S301  (written by our parent)
        if isinstance(job, Pop3Job):
            run_pop3(job, send, sys.stdin.buffer)
        else:
            run_job(job, send)
    except BrokenPipeError:
        return 1  # the parent is gone
    except BaseException as exc:  # noqa: BLE001  (handed to the parent)
        try:
            send(("error", _pickleable(exc)))
        except BrokenPipeError:
            return 1
        return 1
    return 0

