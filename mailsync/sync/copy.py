"""Bulk-write raw sources with PostgreSQL's binary COPY.

A multi-row INSERT sends bytea as hex text: twice the bytes on the wire and a second copy
in memory. COPY (FORMAT binary) streams the compressed bytes as they are; measured on
2,000 messages: 0.37 s and +4 MB instead of 1.09 s and +86 MB (bench/README.md).
"""
from __future__ import annotations

import io
import struct
from collections.abc import Iterable

from django.db import connection

from ..models import EmailSource

_HEADER = b"PGCOPY\n\xff\r\n\x00" + struct.pack("!ii", 0, 0)
_TRAILER = struct.pack("!h", -1)
# Rows per COPY: bounds the buffer (50 compressed sources; 200 cost the worker ~6 MB more).
CHUNK = 50


def _binary_rows(rows: Iterable[tuple[int, bytes, int]]) -> io.BytesIO:
    buffer = io.BytesIO()
    buffer.write(_HEADER)
    for email_id, data, size in rows:
        buffer.write(struct.pack("!hiq", 3, 8, email_id))
        buffer.write(struct.pack("!i", len(data)))
        buffer.write(data)
        buffer.write(struct.pack("!ii", 4, size))
    buffer.write(_TRAILER)
    buffer.seek(0)
    return buffer


def write_sources(rows: list[tuple[int, bytes, int]]) -> None:
    """Store (email_id, compressed data, raw size) rows in mailsync_emailsource."""
    if not rows:
        return
    if connection.vendor != "postgresql":
        EmailSource.objects.bulk_create(
            [EmailSource(email_id=e, data=d, size=s) for e, d, s in rows], batch_size=50
        )
        return
    table = EmailSource._meta.db_table
    with connection.cursor() as cursor, connection.wrap_database_errors:
        for start in range(0, len(rows), CHUNK):
            cursor.copy_expert(
                f'COPY "{table}" ("email_id", "data", "size") FROM STDIN WITH (FORMAT binary)',
                _binary_rows(rows[start:start + CHUNK]),
            )
