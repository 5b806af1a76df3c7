"""Fetch and prepare a large IMAP download in a separate process.

Fetching (TLS, imaplib, IMAPClient's parser) and preparing (envelope, hashes, zstd) a batch is
about as much Python work as storing it. In one process the GIL serializes the two even when
they run in two threads; here a child process fetches and prepares batch n+1 while the worker
stores batch n, so a large initial sync uses both cores (bench/imap_sync.py).

The child runs ``main()`` below, started with ``subprocess`` (a Celery prefork
worker is a daemonic process and may not use ``multiprocessing`` children). It imports no
Django. The job, password included, goes over its stdin (never argv or the environment); it
answers with pickled frames on its stdout:

    ("selected", uidvalidity)      once, after SELECT
    ("batch", uids, [Prepared])    per batch, in order, raw bytes dropped (compressed kept)
    ("error", exception)           then it exits
    ("done",)

Only the parent's own child writes that pipe, so unpickling it trusts nothing foreign. The
child dies with its parent (PR_SET_PDEATHSIG, and a broken pipe at its next write). It opens
its own IMAP connection: the caller closes its own first, so a mailbox still uses at most
two connections (this one and the IDLE watcher's).
"""
from __future__ import annotations

import logging
import os
import pickle
import signal
import subprocess
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from ..exceptions import MailProtocolError, MailTransientError
from ..protocols.base import FetchedMessage, ServerSettings
from ..protocols.imap import ImapSession
from .pipeline import run_ahead
from .prepare import Prepared, prepare

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
    return sorted(messages, key=lambda m: m.uid)


# -- the parent's side -----------------------------------------------------------------------
def fetch_in_child(job: FetchJob) -> Iterator[tuple[list[int], list[Prepared]]]:
    """Yield (batch, prepared messages) in order from a child process; the child's error is
    raised here after the batches before it were yielded.

    A thread of this process receives (unpickles) batch n+1 while the caller stores batch n."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(_PROJECT_ROOT), env.get("PYTHONPATH")]))
    child = subprocess.Popen(  # noqa: S603  (our own module, no shell)
        [sys.executable, "-c", _BOOTSTRAP, str(_PROJECT_ROOT)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, cwd=_PROJECT_ROOT, env=env,
    )
    assert child.stdin is not None and child.stdout is not None
    try:
        try:
            pickle.dump(job, child.stdin, protocol=pickle.HIGHEST_PROTOCOL)
            child.stdin.close()
        except BrokenPipeError as exc:
            raise MailTransientError("The fetch process did not start.") from exc
        received = run_ahead(_received(child.stdout, job.uidvalidity), name="imap-receive")
        try:
            for item in received:
                yield item
        finally:
            if child.poll() is None:
                child.kill()  # unblocks the receiving thread before it is joined
            received.close()
    finally:
        if child.poll() is None:
            child.kill()
        child.wait()
        child.stdout.close()


def _received(stream: BinaryIO, uidvalidity: int) -> Iterator[tuple[list[int], list[Prepared]]]:
    selected = _receive(stream)
    if selected[0] == "error":
        raise selected[1]
    if selected != ("selected", uidvalidity):
        raise MailTransientError(
            "The folder changed on the server (UIDVALIDITY) during the sync; it is synced "
            "again on the next run."
        )
    while True:
        frame = _receive(stream)
        if frame[0] == "done":
            return
        if frame[0] == "error":
            raise frame[1]
        yield frame[1], frame[2]


def _receive(stream: BinaryIO) -> tuple:
    try:
        frame = pickle.load(stream)  # noqa: S301  (our own child process writes this pipe)
    except EOFError as exc:
        raise MailTransientError("The fetch process stopped unexpectedly.") from exc
    if not isinstance(frame, tuple) or not frame:
        raise MailProtocolError("The fetch process sent something unexpected.")
    return frame


# -- the child's side ------------------------------------------------------------------------
def run_job(job: FetchJob, send) -> None:  # noqa: ANN001
    """Fetch in a thread, prepare and send in this one: the fetch waits on the server and on
    TLS much of the time, which leaves the GIL to the envelope parser. (Compressing in the
    parent instead was measured slower: bench/README.md.)"""
    with ImapSession(job.settings) as session:
        selected = session.select(job.folder, readonly=True)
        send(("selected", selected.uidvalidity))
        if selected.uidvalidity != job.uidvalidity:
            return
        fetched = run_ahead(((batch, fetch_batch(session, batch, job.sizes, job.limit))
                             for batch in job.batches), name="imap-fetch")
        for batch, messages in fetched:
            send(("batch", batch, [prepare(m).without_raw() for m in messages]))
    send(("done",))


def _die_with_parent() -> None:
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return


def _pickleable(exc: BaseException) -> BaseException:
    try:
        pickle.loads(pickle.dumps(exc))
        return exc
    except Exception:  # noqa: BLE001
        return RuntimeError(f"{type(exc).__name__}: {exc}")


def main() -> int:
    parent = os.getppid()
    _die_with_parent()
    if os.getppid() != parent:
        return 1
    # Frames go to the original stdout; anything a library prints goes to stderr instead.
    frames = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    logging.basicConfig(level=os.environ.get("MAILROOM_LOG_LEVEL", "WARNING"), stream=sys.stderr)

    def send(frame: tuple) -> None:
        pickle.dump(frame, frames, protocol=pickle.HIGHEST_PROTOCOL)
        frames.flush()

    try:
        job = pickle.load(sys.stdin.buffer)  # noqa: S301  (written by our parent)
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

