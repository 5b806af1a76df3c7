"""Raw message sources in pack files on disk; the database keeps where each one is.

A pack holds the zstd-compressed sources of one stored batch, one after another; a row of
``mailsync_emailsource`` names its pack, the offset and the length. PostgreSQL stored a
bytea in ~2 KB TOAST chunks, each a heap tuple, an index entry and a WAL record: about half
of PostgreSQL's CPU and a fifth of an initial sync's wall time went there (bench/README.md,
"Sources on disk"). Written here, the bytes cost one ``write`` and one ``fsync`` per batch.

Nothing is lost: a pack is written and fsynced (file and directory) before the rows that
name it are inserted, so a committed row never points at bytes a crash can take away. A batch
whose transaction rolls back leaves a pack no row names: ``sweep`` removes such packs, and
those of deleted mail, once they are older than ``SWEEP_GRACE`` (longer than any transaction
that writes one: a sync run ends within ``MAILROOM_SYNC_RUN_SECONDS``).

One directory belongs to one database: every process that stores or reads mail (web, workers,
the IDLE watcher) must see the same directory (a shared volume when they run on several
hosts), and no other database's sweep may see it. ``MAILROOM_SOURCE_DIR`` empty keeps the
sources in the database (bytea, the slower way), for hosts without a shared directory.
"""
from __future__ import annotations

import errno
import logging
import os
import re
import time
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from django.conf import settings

from .exceptions import SourceStoreError


class SourceMissing(SourceStoreError):
    """A pack (or the part of it a row names) is not there."""

log = logging.getLogger(__name__)

SUFFIX = ".zpack"
_NAME = re.compile(r"[0-9a-f]{32}")
# A pack no row names is removed once it is this old (seconds).
SWEEP_GRACE = 12 * 3600
# Bytes per writev call (the batch's pieces are written without being joined).
_WRITE_PIECES = 512


def directory() -> Path | None:
    """Where packs are written, or None when sources are kept in the database."""
    folder = getattr(settings, "MAILROOM_SOURCE_DIR", None)
    return Path(folder) if folder else None


def path_of(name: str) -> Path:
    folder = directory()
    if folder is None:
        raise SourceStoreError("This mail is stored in a pack file, but MAILROOM_SOURCE_DIR is "
                               "not set: your administrator should set it to the directory "
                               "the mail was stored in.")
    if not _NAME.fullmatch(name):  # never a path out of the directory
        raise SourceStoreError("The stored copy of this mail has an invalid pack name.")
    return folder / name[:2] / f"{name}{SUFFIX}"


def write_pack(pieces: Sequence[bytes]) -> tuple[str, list[int]]:
    """Write ``pieces`` into a new pack, durably (fsync of the file and its directory).
    Returns the pack's name and the offset of each piece."""
    name = uuid.uuid4().hex
    path = path_of(name)
    offsets: list[int] = []
    position = 0
    for piece in pieces:
        offsets.append(position)
        position += len(piece)
    try:
        _make_directory(path.parent)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o600)
        try:
            _write_all(fd, pieces)
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            _remove(path)
            raise
        os.close(fd)
        _fsync_directory(path.parent)
    except OSError as exc:
        log.error("could not write the pack %s: %s", path, exc)
        raise SourceStoreError(_explain(exc, "store mail")) from exc
    return name, offsets


def discard(name: str) -> None:
    """Remove a pack no committed row can name (its batch failed before the commit)."""
    _remove(path_of(name))


def read(name: str, offset: int, length: int) -> bytes:
    """The ``length`` bytes at ``offset`` of pack ``name``."""
    path = path_of(name)
    try:
        with open(path, "rb", buffering=0) as f:
            f.seek(offset)
            data = bytearray(length)
            view = memoryview(data)
            got = 0
            while got < length:
                count = f.readinto(view[got:])
                if not count:
                    break
                got += count
    except OSError as exc:
        if isinstance(exc, FileNotFoundError) or exc.errno == errno.ESTALE:
            # ESTALE: on NFS, a pack another host removed (a compaction) after we opened it.
            log.warning("the pack %s is missing (MAILROOM_SOURCE_DIR: every process must see "
                        "the same directory)", path)
            raise SourceMissing("The stored copy of this mail is missing on the CRM server. "
                                "Your administrator should check MAILROOM_SOURCE_DIR; then "
                                "retry.") from exc
        log.error("could not read the pack %s: %s", path, exc)
        raise SourceStoreError(_explain(exc, "read a stored mail")) from exc
    if got < length:
        log.error("the pack %s is cut short: %s of %s bytes at %s", path, got, length, offset)
        raise SourceMissing("The stored copy of this mail is cut short on the CRM server. "
                            "Your administrator should check MAILROOM_SOURCE_DIR; then retry.")
    del view
    return bytes(data)


@dataclass
class SweepResult:
    removed: int = 0  # packs no row named
    compacted: int = 0  # packs rewritten without the sources of deleted mail
    freed: int = 0  # bytes
    missing: int = 0  # packs rows name that are not on disk, or shorter than the rows say


def sweep(*, grace: float = SWEEP_GRACE, now: float | None = None) -> SweepResult:
    """Erase what deleted mail left on disk: packs no row names that are older than
    ``grace`` seconds (all their mail deleted, or a batch that never committed) are removed;
    a pack that still holds sources of deleted mail beside live ones is rewritten with the
    live ones only (``compact``), so that deleted mail is gone from the disk too."""
    from django.db.models import Sum  # noqa: PLC0415

    from .models import EmailSource  # noqa: PLC0415

    result = SweepResult()
    folder = directory()
    if folder is None or not folder.is_dir():
        return result
    cutoff = (time.time() if now is None else now) - grace
    sizes: dict[str, tuple[Path, int, float]] = {}
    for path in _packs(folder):
        try:
            stat = path.stat()
        except FileNotFoundError:
            continue
        sizes[path.name[:-len(SUFFIX)]] = (path, stat.st_size, stat.st_mtime)
    live = dict(EmailSource.objects.exclude(pack="").values("pack").annotate(live=Sum("length"))
                .values_list("pack", "live"))
    for name, (path, size, mtime) in sizes.items():
        if name not in live:
            if mtime < cutoff:  # younger: a batch may be about to commit its rows
                result.removed += _remove(path)
                result.freed += size
        elif live[name] < size:
            try:
                freed = compact(name)
            except Exception:  # noqa: BLE001  (one bad pack never stops the erasing of the others)
                log.exception("could not compact the pack %s", path)
                continue
            if freed:
                result.compacted += 1
                result.freed += freed
        elif live[name] > size:
            log.error("the pack %s is cut short: %s bytes, its mails name %s", path, size, live[name])
            result.missing += 1
    # Named but not on disk: mail whose source cannot be read (a directory not shared by
    # every host, a restore without the packs). Checked again one by one: a pack written or
    # compacted away since the listing above is not one.
    for name in sorted(set(live) - set(sizes)):
        if not path_of(name).exists() and EmailSource.objects.filter(pack=name).exists():
            log.error("the pack %s is missing: %s mails name it (check MAILROOM_SOURCE_DIR)",
                      path_of(name), EmailSource.objects.filter(pack=name).count())
            result.missing += 1
    return result


def compact(name: str) -> int:
    """Rewrite pack ``name`` with the sources rows still name, in a new pack (fsynced before
    the rows are moved to it, in one transaction); the old file goes once that commits. A
    reader that still had the old place reads again (``copy.read_source``). Bytes freed."""
    from django.db import transaction  # noqa: PLC0415

    from .models import EmailSource  # noqa: PLC0415

    old = path_of(name)
    with transaction.atomic():
        rows = list(EmailSource.objects.select_for_update().filter(pack=name).order_by("offset"))
        if not rows:
            return 0  # all deleted meanwhile: removed by a later sweep
        try:
            size = old.stat().st_size
        except FileNotFoundError:
            log.error("the pack %s is missing: %s mail sources cannot be read", old, len(rows))
            return 0
        new_name = uuid.uuid4().hex
        path = path_of(new_name)
        offset = 0
        try:
            _make_directory(path.parent)
            with open(old, "rb") as src, open(
                    os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o600),
                    "wb") as dst:
                for row in rows:
                    _copy_range(src, dst, row.offset, row.length)
                    row.pack, row.offset = new_name, offset
                    offset += row.length
                dst.flush()
                os.fsync(dst.fileno())
            _fsync_directory(path.parent)
        except BaseException:
            _remove(path)
            raise
        EmailSource.objects.bulk_update(rows, ["pack", "offset"], batch_size=500)
        transaction.on_commit(lambda: _remove(old))
    return size - offset


def _copy_range(src: BinaryIO, dst: BinaryIO, offset: int, length: int) -> None:
    src.seek(offset)
    left = length
    while left:
        piece = src.read(min(left, 1 << 20))
        if not piece:
            raise SourceMissing(f"pack {src.name} is cut short")
        dst.write(piece)
        left -= len(piece)


def _packs(folder: Path) -> Iterable[Path]:
    """The pack files, not through symbolic links (the sweep never removes a file elsewhere)."""
    with os.scandir(folder) as subs:
        for sub in subs:
            if len(sub.name) != 2 or not sub.is_dir(follow_symlinks=False):
                continue
            with os.scandir(sub.path) as entries:
                for entry in entries:
                    if (entry.name.endswith(SUFFIX) and entry.is_file(follow_symlinks=False)
                            and _NAME.fullmatch(entry.name[:-len(SUFFIX)])):
                        yield Path(entry.path)


def _write_all(fd: int, pieces: Sequence[bytes]) -> None:
    views = [memoryview(p) for p in pieces if len(p)]
    while views:
        chunk = views[:_WRITE_PIECES]
        written = os.writev(fd, chunk)
        # Drop what was written; a short write leaves the rest of a piece.
        while written and views:
            if written >= len(views[0]):
                written -= len(views[0])
                views.pop(0)
            else:
                views[0] = views[0][written:]
                written = 0


def _make_directory(path: Path) -> None:
    """``path`` and any missing directories above it, each made durable in its parent
    (a power cut must not take away a directory whose packs committed rows name)."""
    if path.is_dir():
        return
    missing = []
    while not path.is_dir():
        missing.append(path)
        if path.parent == path:
            break
        path = path.parent
    for directory_ in reversed(missing):
        try:
            directory_.mkdir(mode=0o700)
        except FileExistsError:
            pass  # made by another process meanwhile: made durable here all the same
        _fsync_directory(directory_.parent)


def _fsync_directory(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    except OSError as exc:  # some file systems cannot fsync a directory
        if exc.errno not in (errno.EINVAL, errno.EBADF):
            raise
    finally:
        os.close(fd)


def _remove(path: Path) -> int:
    try:
        path.unlink()
    except FileNotFoundError:
        return 0
    return 1


def _explain(exc: OSError, doing: str) -> str:
    hint = {
        errno.ENOSPC: "the disk is full",
        errno.EDQUOT: "the disk quota is used up",
        errno.EACCES: "permission denied",
        errno.EPERM: "permission denied",
        errno.EROFS: "the file system is read-only",
        errno.ENOENT: "the directory does not exist",
    }.get(exc.errno or 0, exc.strerror or str(exc))
    return (f"The CRM server could not {doing}: {hint}. Your administrator should check "
            "MAILROOM_SOURCE_DIR.")
