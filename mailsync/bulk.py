"""Bulk INSERT of plain rows, without a model instance per row.

The sync stores thousands of emails, participants, locations and links a second. Django's
``bulk_create`` builds a model instance per row and runs every field's ``pre_save`` and
``get_db_prep_save`` per row: on the IMAP bench that was about half of the storing
process's CPU (bench/README.md). Here the caller gives the values it sets as tuples; every
other field takes its default, adapted once per call; psycopg2's ``execute_values`` sends
pages of rows. Other databases (the SQLite of ``scripts/run``) go through ``bulk_create``.
"""
from __future__ import annotations

import io
import json
from collections.abc import Collection, Mapping, Sequence
from datetime import datetime
from typing import Any

from django.db import connection, models
from django.utils import timezone

PAGE_SIZE = 1000


def insert_rows(model: type[models.Model], names: Sequence[str], rows: Sequence[Sequence[Any]], *,
                returning: str | None = None, ignore_conflicts: bool = False,
                count: bool = False) -> Any:
    """INSERT ``rows`` (values in the order of the field ``names``; a foreign key's value is
    the id) into ``model``'s table. Returns the ``returning`` column of each row, in order
    (not with ``ignore_conflicts``: skipped rows return nothing); with ``count``, the number
    of rows inserted (with ``ignore_conflicts``: not counting those skipped)."""
    if not rows:
        return 0 if count else []
    assert not (returning and ignore_conflicts), "rows skipped on conflict cannot be matched"
    meta = model._meta
    given = [meta.get_field(name) for name in names]
    if connection.vendor != "postgresql":
        objects = model.objects.bulk_create(
            [model(**{f.attname: v for f, v in zip(given, row, strict=True)}) for row in rows],
            ignore_conflicts=ignore_conflicts, batch_size=500,
        )
        if count:  # bulk_create cannot tell which rows a conflict skipped
            return len(objects)
        return [getattr(o, meta.get_field(returning).attname) for o in objects] if returning else []

    from psycopg2.extras import Json, execute_values

    given_set = set(given)
    now = timezone.now()
    rest = [f for f in meta.concrete_fields
            if f not in given_set and not (f.primary_key and isinstance(f, models.AutoField))]
    constants = tuple(
        f.get_db_prep_save(now if getattr(f, "auto_now", False) or getattr(f, "auto_now_add", False)
                           else f.get_default(), connection)
        for f in rest
    )
    json_at = [i for i, f in enumerate(given) if isinstance(f, models.JSONField)]
    if json_at:
        def adapt(row: Sequence[Any]) -> tuple:
            values = list(row)
            for i in json_at:
                values[i] = Json(values[i])
            return (*values, *constants)
    else:
        def adapt(row: Sequence[Any]) -> tuple:
            return (*row, *constants)

    quote = connection.ops.quote_name
    columns = ", ".join(quote(f.column) for f in [*given, *rest])
    sql = f"INSERT INTO {quote(meta.db_table)} ({columns}) VALUES %s"
    if ignore_conflicts:
        sql += " ON CONFLICT DO NOTHING"
    if returning or count:
        column = meta.get_field(returning).column if returning else meta.pk.column
        sql += f" RETURNING {quote(column)}"
    # The raw psycopg2 cursor: its errors are mapped to Django's (IntegrityError...) here.
    with connection.cursor() as cursor, connection.wrap_database_errors:
        result = execute_values(cursor.cursor, sql, [adapt(row) for row in rows],
                                page_size=PAGE_SIZE, fetch=bool(returning or count))
    if count:
        return len(result)
    return [r[0] for r in result] if returning else []


_COPY_ESCAPES = str.maketrans({"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"})


def _cell(value: Any, is_json: bool) -> str:
    """One value in COPY's text format."""
    if value is None:
        return "\\N"
    if is_json:
        value = json.dumps(value)
    elif value is True or value is False:
        return "t" if value else "f"
    elif isinstance(value, int):
        return str(value)
    elif isinstance(value, datetime):
        return value.isoformat()
    else:
        value = str(value)
    return value.translate(_COPY_ESCAPES)


def copy_rows(model: type[models.Model], names: Sequence[str], rows: Sequence[Sequence[Any]], *,
              with_ids: bool = False) -> list[int]:
    """Like ``insert_rows`` (no conflict handling) with PostgreSQL's COPY: the server parses
    no INSERT statement and psycopg2 quotes nothing. ``with_ids``: the primary keys are
    taken from the table's sequence first, sent with the rows and returned in order."""
    if not rows:
        return []
    if connection.vendor != "postgresql":
        if with_ids:
            return insert_rows(model, names, rows, returning=model._meta.pk.name)
        insert_rows(model, names, rows)
        return []
    meta = model._meta
    given = [meta.get_field(name) for name in names]
    given_set = set(given)
    rest = [f for f in meta.concrete_fields if f not in given_set and not f.primary_key]
    now = timezone.now()
    constants = "".join(
        "\t" + _cell(now if getattr(f, "auto_now", False) or getattr(f, "auto_now_add", False)
                     else f.get_default(), isinstance(f, models.JSONField))
        for f in rest
    )
    is_json = [isinstance(f, models.JSONField) for f in given]
    quote = connection.ops.quote_name
    columns = [quote(f.column) for f in [*given, *rest]]
    ids: list[int] = []
    with connection.cursor() as cursor:
        if with_ids:
            cursor.execute("SELECT nextval(pg_get_serial_sequence(%s, %s)) FROM generate_series(1, %s)",
                           [meta.db_table, meta.pk.column, len(rows)])
            ids = [r[0] for r in cursor.fetchall()]
            columns.append(quote(meta.pk.column))
        lines = []
        for n, row in enumerate(rows):
            line = "\t".join([_cell(v, j) for v, j in zip(row, is_json, strict=True)]) + constants
            if with_ids:
                line += f"\t{ids[n]}"
            lines.append(line)
        with connection.wrap_database_errors:
            cursor.cursor.copy_expert(
                f"COPY {quote(meta.db_table)} ({', '.join(columns)}) FROM STDIN",
                io.StringIO("\n".join(lines) + "\n"),
            )
    return ids


def rows_where_in(model: type[models.Model], select: Sequence[str], *, where: Mapping[str, Any],
                  field: str, values: Collection[Any]) -> list[tuple]:
    """``SELECT <select> FROM <model> WHERE <where> AND <field> IN <values>`` as tuples.

    On PostgreSQL the values go as one array parameter (``= ANY(%s)``): Django's ``__in``
    prepares each value through its field and writes a placeholder per value, which the
    server then parses; for the sync's batches of a few hundred keys that was a tenth of
    the storing process's CPU (bench/README.md). Field names as in the model; a foreign
    key's value is the id."""
    if not values:
        return []
    if connection.vendor != "postgresql":
        return list(model.objects.filter(**where, **{f"{field}__in": list(values)})
                    .values_list(*select))
    meta = model._meta
    quote = connection.ops.quote_name
    column = lambda name: quote(meta.get_field(name).column)  # noqa: E731
    conditions = [f"{column(name)} = %s" for name in where] + [f"{column(field)} = ANY(%s)"]
    sql = (f"SELECT {', '.join(column(n) for n in select)} FROM {quote(meta.db_table)} "
           f"WHERE {' AND '.join(conditions)}")
    with connection.cursor() as cursor:
        cursor.execute(sql, [*where.values(), list(values)])
        return cursor.fetchall()
