"""The PostgreSQL schema: numbered migrations, the profile guard and the start-up schema check.

The same concepts as SQLite's (:mod:`llorch.persistence.db`), with the same numbers: each
script of ``migrations_pg/`` is applied in a transaction of its own, together with its row in
``llorch_schema_version``, under an advisory lock (several instances may start at once). The
live schema is compared with the one the migrations produce, built in a scratch schema inside a
transaction that is rolled back, so nothing of it is ever visible.
"""

from __future__ import annotations

import secrets
from typing import Any

import psycopg

from llorch.persistence import rows
from llorch.persistence.db import ProfileMismatch, SchemaMismatch

# pg_advisory_xact_lock key of the migrations ("llorch" in ASCII, then 1).
MIGRATION_LOCK = 0x6C6C6F7263680001

_VERSION_TABLE = (
    "CREATE TABLE IF NOT EXISTS llorch_schema_version ("
    "version INTEGER PRIMARY KEY, applied_at TIMESTAMPTZ NOT NULL DEFAULT now())"
)

Connection = psycopg.Connection[tuple[Any, ...]]


def migrations() -> list[tuple[int, str]]:
    """The numbered PostgreSQL migration scripts, in order."""
    return rows.numbered_scripts("migrations_pg")


def schema_version(conn: Connection) -> int:
    """The number of the last migration applied (0: none, or no version table yet)."""
    found = conn.execute("SELECT to_regclass('llorch_schema_version') IS NOT NULL").fetchone()
    if not found or not found[0]:
        return 0
    row = conn.execute("SELECT coalesce(max(version), 0) FROM llorch_schema_version").fetchone()
    return int(row[0]) if row else 0


def migrate(conn: Connection, up_to: int | None = None) -> None:
    """Apply the migrations not applied yet (up to ``up_to``), each in its own transaction.
    ``conn`` must be in autocommit mode."""
    for number, script in migrations():
        if up_to is not None and number > up_to:
            break
        with conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK,))
            conn.execute(_VERSION_TABLE)
            # Read under the lock: another instance may have applied it meanwhile.
            if schema_version(conn) >= number:
                continue
            conn.execute(script.encode("utf-8"))
            conn.execute("INSERT INTO llorch_schema_version (version) VALUES (%s)", (number,))


def claim_profile(conn: Connection, profile: str) -> None:
    """Record ``profile`` as the database's, or refuse one that belongs to another profile."""
    conn.execute(
        "INSERT INTO meta (key, value) VALUES ('profile', %s) ON CONFLICT (key) DO NOTHING",
        (profile,),
    )
    row = conn.execute("SELECT value FROM meta WHERE key = 'profile'").fetchone()
    if row is not None and row[0] != profile:
        raise ProfileMismatch(
            f"this database belongs to profile {row[0]!r}; refusing to open it as {profile!r}"
        )


def verify_schema(conn: Connection) -> None:
    """Raise :class:`SchemaMismatch` unless the live schema (the connection's current schema)
    is the one the migrations produce."""
    want = expected_schema(conn)
    have = describe(conn)
    if want != have:
        missing = sorted(set(want) - set(have))
        extra = sorted(set(have) - set(want))
        changed = sorted(n for n in set(want) & set(have) if want[n] != have[n])
        raise SchemaMismatch(
            f"live schema differs from migrations: missing {missing}, "
            f"unexpected {extra}, changed {changed}"
        )


def expected_schema(conn: Connection) -> dict[str, str]:
    """The description of the schema the migrations produce, built in a scratch schema that is
    rolled back (it needs the CREATE privilege on the database, as migrating does)."""
    scratch = f"llorch_expected_{secrets.token_hex(4)}"
    with conn.transaction(force_rollback=True):  # the scratch schema is undone at the end
        conn.execute(f"CREATE SCHEMA {scratch}")
        conn.execute(f"SET LOCAL search_path TO {scratch}")
        conn.execute(_VERSION_TABLE)
        for _, script in migrations():
            conn.execute(script.encode("utf-8"))
        return describe(conn)


# Each relation of the current schema, described: a table by its columns and constraints, an
# index by its definition (the schema's name taken out), a view by its query.
_DESCRIBE = """
SELECT c.relkind::text || ':' || c.relname::text,
  CASE c.relkind
    WHEN 'r' THEN
      (SELECT string_agg(a.attname::text || ' ' || format_type(a.atttypid, a.atttypmod)
                || CASE WHEN a.attnotnull THEN ' not null' ELSE '' END
                || CASE WHEN a.attidentity <> '' THEN ' identity ' || a.attidentity::text
                   ELSE '' END
                || coalesce(' default ' || pg_get_expr(d.adbin, d.adrelid), ''),
              ', ' ORDER BY a.attnum)
       FROM pg_attribute a
       LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
       WHERE a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped)
      || ' | ' ||
      coalesce((SELECT string_agg(k.conname::text || ' ' || pg_get_constraintdef(k.oid), ', '
                                  ORDER BY k.conname)
                FROM pg_constraint k WHERE k.conrelid = c.oid), '')
    WHEN 'i' THEN replace(pg_get_indexdef(c.oid), ' ON ' || n.nspname || '.', ' ON ')
    WHEN 'v' THEN pg_get_viewdef(c.oid)
    WHEN 'm' THEN pg_get_viewdef(c.oid)
    ELSE ''
  END
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE n.nspname = current_schema()
"""


def describe(conn: Connection) -> dict[str, str]:
    """``{kind:name: description}`` of every relation in the connection's current schema."""
    rows = conn.execute(_DESCRIBE).fetchall()
    return {str(name): " ".join(str(text or "").split()) for name, text in rows}
