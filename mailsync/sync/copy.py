"""Bulk-write raw sources with PostgreSQL's binary COPY.

A multi-row INSERT sends bytea as hex text: twice the bytes on the wire and a second copy
in memory. COPY (FORMAT binary) streams the compressed bytes as they are; measured on
2,000 messages: 0.37 s and +4 MB instead of 1.09 s and +86 MB (bench/README.md).
"""
from __future__ import annotations

import contextlib
import struct
import threading
from collections.abc import Iterable

from django.db import connection

from .. import sourcestore
from ..bulk import copy_rows
from ..models import EmailSource

_HEADER = b"PGCOPY\n\xff\r\n\x00" + struct.pack("!ii", 0, 0)
_TRAILER = struct.pack("!h", -1)
# Rows per COPY: bounds the buffer (50 compressed sources; 200 cost the worker ~6 MB more).
CHUNK = 50


def _source_pieces(rows: Iterable[tuple[int, bytes, int]]) -> Iterable[bytes]:
    yield _HEADER
    for email_id, data, size in rows:
        yield struct.pack("!hiqi", 4, 8, email_id, len(data))
        yield data
        yield struct.pack("!iii", 4, size, 0)  # size; pack: "" (the source is in the row)
    yield _TRAILER


def write_sources(rows: list[tuple[int, bytes, int]]) -> None:
    """Store (email_id, compressed data, raw size) rows: the data in one new pack file
    (``mailsync.sourcestore``, fsynced before the rows are inserted) when MAILROOM_SOURCE_DIR
    is set, else in mailsync_emailsource itself. Runs inside the caller's transaction."""
    begin_sources([(data, size) for _, data, size in rows]).finish([email_id for email_id, _, _ in rows])


class PendingSources:
    """The sources of a batch on their way to a pack file: written and fsynced by a thread
    from ``begin_sources`` on (the GIL is let go meanwhile), while the caller inserts the
    batch's other rows; ``finish`` waits for the pack and inserts the rows that name it.
    Without a source directory, ``finish`` stores them in the database."""

    def __init__(self, sources: list[tuple[bytes, int]]) -> None:
        self._sources = sources
        self._thread: threading.Thread | None = None
        self._written: tuple[str, list[int]] | None = None
        self._error: BaseException | None = None
        if sources and sourcestore.directory() is not None:
            self._thread = threading.Thread(target=self._write, name="source-writer", daemon=True)
            self._thread.start()

    def _write(self) -> None:
        try:
            self._written = sourcestore.write_pack([data for data, _ in self._sources])
        except BaseException as exc:  # noqa: BLE001  (raised in the caller by finish)
            self._error = exc

    def wait(self) -> None:
        """The writing thread is done."""
        if self._thread is not None:
            self._thread.join()

    def discard(self) -> None:
        """After an error of the caller's batch (its transaction rolls back): the pack, which
        no committed row will name, goes now rather than at a sweep a day later."""
        self.wait()
        if self._written is not None:
            with contextlib.suppress(Exception):
                sourcestore.discard(self._written[0])
            self._written = None

    def finish(self, email_ids: list[int]) -> None:
        """Insert the rows, the n-th source for ``email_ids[n]``, once the pack is durable."""
        if not self._sources:
            return
        if self._thread is None:
            _write_sources_in_db([(email_id, data, size) for email_id, (data, size)
                                  in zip(email_ids, self._sources, strict=True)])
            return
        self._thread.join()
        if self._error is not None:
            raise self._error
        assert self._written is not None
        name, offsets = self._written
        copy_rows(EmailSource, ("email_id", "pack", "offset", "length", "size"),
                  [(email_id, name, offset, len(data), size) for email_id, (data, size), offset
                   in zip(email_ids, self._sources, offsets, strict=True)])


def begin_sources(sources: list[tuple[bytes, int]]) -> PendingSources:
    """Start storing (compressed data, raw size) sources; ``finish`` with their email ids."""
    return PendingSources(sources)


def _write_sources_in_db(rows: list[tuple[int, bytes, int]]) -> None:
    if connection.vendor != "postgresql":
        EmailSource.objects.bulk_create(
            [EmailSource(email_id=e, data=d, size=s) for e, d, s in rows], batch_size=50
        )
        return
    table = EmailSource._meta.db_table
    with connection.cursor() as cursor, connection.wrap_database_errors:
        for start in range(0, len(rows), CHUNK):
            cursor.copy_expert(
                f'COPY "{table}" ("email_id", "data", "size", "pack") FROM STDIN WITH (FORMAT binary)',
                # Streamed: a buffer of the rows held a second copy of a large source.
                _Chunks(_source_pieces(rows[start:start + CHUNK])), 1 << 20,  # size: positional (Django's debug cursor takes no keywords)
            )


class _Chunks:
    """A file-like object over byte pieces for ``copy_expert``: each read copies at most
    ``size`` bytes, so large data is never joined into one buffer."""

    def __init__(self, pieces: Iterable[bytes]) -> None:
        self._pieces = iter(pieces)
        self._current = memoryview(b"")

    def read(self, size: int = 1 << 20) -> bytes:
        while not self._current:
            piece = next(self._pieces, None)
            if piece is None:
                return b""
            self._current = memoryview(piece)
        out, self._current = self._current[:size], self._current[size:]
        return out.tobytes()


def _blob_pieces(rows: Iterable[tuple[str, bytes, int]]) -> Iterable[bytes]:
    yield _HEADER
    for sha256, data, size in rows:
        digest = sha256.encode("ascii")
        yield struct.pack("!hi", 3, len(digest)) + digest + struct.pack("!i", len(data))
        yield data
        yield struct.pack("!ii", 4, size)
    yield _TRAILER


def write_blobs(rows: list[tuple[str, bytes, int]]) -> None:
    """Store (sha256, compressed data, size) rows in mailsync_attachmentblob, unless one with
    that hash is there (another mail brought it first). PostgreSQL: binary COPY into a
    temporary table, then INSERT ... ON CONFLICT DO NOTHING. A multi-row INSERT sent the
    content as hex text, twice, in the worker's memory: ~5x a large attachment at once.
    Runs inside the caller's transaction."""
    if not rows:
        return
    from ..models import AttachmentBlob  # noqa: PLC0415

    if connection.vendor != "postgresql":
        AttachmentBlob.objects.bulk_create(
            [AttachmentBlob(sha256=d, data=c, size=s) for d, c, s in rows],
            ignore_conflicts=True, batch_size=50,
        )
        return
    table = AttachmentBlob._meta.db_table
    with connection.cursor() as cursor, connection.wrap_database_errors:
        cursor.execute("CREATE TEMPORARY TABLE IF NOT EXISTS mailroom_blob_in "
                       "(sha256 varchar(64), data bytea, size integer)")
        cursor.execute("DELETE FROM mailroom_blob_in")
        cursor.copy_expert("COPY mailroom_blob_in (sha256, data, size) FROM STDIN WITH (FORMAT binary)",
                           _Chunks(_blob_pieces(rows)), 1 << 20)
        cursor.execute(f'INSERT INTO "{table}" (sha256, data, size) '
                       "SELECT DISTINCT ON (sha256) sha256, data, size FROM mailroom_blob_in "
                       "ON CONFLICT (sha256) DO NOTHING")
        cursor.execute("DELETE FROM mailroom_blob_in")


def read_source(email_id: int) -> bytearray | bytes | None:
    """The compressed source of one mail, or None: from its pack file, or from the database.
    PostgreSQL: in pieces (``_read_bytea``): one SELECT brings bytea as hex text, three times
    its size in the worker at once."""
    from ..models import EmailSource  # noqa: PLC0415

    place = EmailSource.objects.filter(email_id=email_id).values_list("pack", "offset", "length").first()
    if place is None:
        return None
    if place[0]:
        try:
            return sourcestore.read(*place)
        except sourcestore.SourceStoreError:
            # A sweep may have moved it to a new pack (``sourcestore.compact``) meanwhile.
            again = EmailSource.objects.filter(email_id=email_id).values_list("pack", "offset", "length").first()
            if again is None:
                return None
            if again == place:
                raise
            if again[0]:
                return sourcestore.read(*again)
    if connection.vendor != "postgresql":
        return EmailSource.objects.filter(email_id=email_id).values_list("data", flat=True).first()
    return _read_bytea(EmailSource._meta.db_table, "email_id", email_id)


def read_blob(blob_id: int) -> bytearray | bytes | None:
    """The compressed content of one attachment blob, or None, read as ``read_source``."""
    from ..models import AttachmentBlob  # noqa: PLC0415

    if connection.vendor != "postgresql":
        return AttachmentBlob.objects.filter(pk=blob_id).values_list("data", flat=True).first()
    return _read_bytea(AttachmentBlob._meta.db_table, "id", blob_id)


# Bytes per query when a large value is read in pieces (hex text of twice this at a time).
READ_PIECE = 4 << 20


def _read_bytea(table: str, key: str, value: int) -> bytearray | None:
    """The ``data`` column of the row whose ``key`` is ``value``, into one buffer of its
    size, a piece at a time (the column is stored uncompressed by PostgreSQL, migration
    0008, so a substring reads only its own pages). A COPY brought it as one message: libpq's
    buffer, psycopg2's copy and this one, ~3x a large value at once."""
    where = f'FROM "{table}" WHERE "{key}" = %s'
    with connection.cursor() as cursor, connection.wrap_database_errors:
        cursor.execute(f'SELECT octet_length("data") {where}', [value])
        row = cursor.fetchone()
        if row is None or row[0] is None:
            return None
        data = bytearray(row[0])
        for offset in range(0, len(data), READ_PIECE):
            cursor.execute(f'SELECT substring("data" FROM %s FOR %s) {where}', [offset + 1, READ_PIECE, value])
            piece = cursor.fetchone()[0]
            data[offset:offset + len(piece)] = piece  # the same length: copied in place
            del piece
    return data
