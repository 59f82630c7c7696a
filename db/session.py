"""Engines and sessions from a URL; `init_db` brings any database to the current schema.

Every command calls `init_db` first, so a new user needs no setup step and an old database is
upgraded in place. Connection problems become one `ConfigError` line with the password hidden.
"""

from __future__ import annotations

import fcntl
import sqlite3
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from sqlalchemy import create_engine, event, text
from sqlalchemy.engine import URL, Connection, Engine, make_url
from sqlalchemy.exc import DBAPIError, PendingRollbackError
from sqlalchemy.orm import Session

from pipeline.config import redact_url
from pipeline.errors import ConfigError, DatabaseError

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"
MYSQL_LOCK = "slidepipe_migrate"
"""Name of the MySQL advisory lock that serialises concurrent upgrades."""


DATABASE_FAILURES = (DBAPIError, PendingRollbackError, sqlite3.Error)
"""What a database that fails under a running command raises (disk full, locked, server gone)."""


def make_engine(url: str, create_dir: bool = False) -> Engine:
    """An engine for a SQLite or MySQL/MariaDB URL; does not connect yet.

    The directory of a SQLite file must exist, unless `create_dir` (the CLI passes it only for
    the default file under the data root): a mistyped URL must not create directories anywhere.
    """
    parsed = _parse(url)
    backend = parsed.get_backend_name()
    if backend == "sqlite":
        _check_sqlite_dir(parsed, url, create_dir)
        engine = _create(parsed, url, connect_args={"timeout": 30})
        event.listen(engine, "connect", _sqlite_on_connect)
        return engine
    if backend in ("mysql", "mariadb"):
        return _create(_mysql_url(parsed), url, pool_pre_ping=True, pool_recycle=3600)
    raise _cannot_connect(url, f"unsupported database {backend!r}; use sqlite:///PATH or mysql+pymysql://USER:PW@HOST/DB")


def init_db(url: str, create_dir: bool = False) -> Engine:
    """Create the database if needed and upgrade it to the newest schema; returns the engine.

    Cheap when the schema is already current (one query), so it is safe at every command start.
    Concurrent callers are serialised (MySQL advisory lock / a lock file beside the SQLite file).
    `create_dir`: see `make_engine`.
    """
    parsed = _parse(url)
    if parsed.get_backend_name() in ("mysql", "mariadb"):
        _create_mysql_database(parsed, url)
    engine = make_engine(url, create_dir=create_dir)
    try:
        with engine.connect() as conn:
            if _current_revision(conn) == _head_revision():
                return engine
    except ConfigError:
        raise
    except Exception as exc:
        engine.dispose()
        raise _cannot_connect(url, _reason(exc, parsed)) from None
    try:
        with _migration_lock(engine, parsed):
            _upgrade(engine)
    except (*DATABASE_FAILURES, OSError) as exc:  # e.g. a full disk while creating the tables
        engine.dispose()
        raise database_error(url, exc) from None
    return engine


def database_error(url: str, exc: BaseException) -> DatabaseError:
    """The one line for a database that failed while a command used it."""
    return DatabaseError(f"database {redact_url(url)}: {_reason(exc, _parse(url))}")


@contextmanager
def database_errors(url: str) -> Iterator[None]:
    """Turn a failure of the database inside the block into `database_error`'s one line."""
    try:
        yield
    except DATABASE_FAILURES as exc:
        raise database_error(url, exc) from None


@contextmanager
def session_scope(engine: Engine) -> Iterator[Session]:
    """A session that commits when the block succeeds and rolls back when it raises.

    Objects stay usable after the block (expire_on_commit=False): callers read ids and fields of
    rows they just wrote without another round trip.
    """
    session = Session(engine, expire_on_commit=False)
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


def alembic_config(connection: Connection | None = None):
    """An Alembic Config built in code (no alembic.ini on disk), bound to `connection`."""
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.attributes["connection"] = connection
    return config


# --------------------------------------------------------------------------------------------


def _parse(url: str) -> URL:
    try:
        return make_url(url)
    except Exception:
        raise _cannot_connect(url, "not a valid database URL") from None


def _create(parsed: URL, url: str, **kwargs) -> Engine:
    try:
        return create_engine(parsed, **kwargs)
    except Exception as exc:  # unknown dialect, missing driver module
        raise _cannot_connect(url, _reason(exc, parsed)) from None


def _mysql_url(parsed: URL) -> URL:
    # Plain mysql:// means the MySQLdb driver, which we do not ship; PyMySQL is a dependency.
    if parsed.drivername in ("mysql", "mariadb"):
        parsed = parsed.set(drivername=f"{parsed.drivername}+pymysql")
    if "charset" not in parsed.query:
        parsed = parsed.update_query_dict({"charset": "utf8mb4"})
    return parsed


def _check_sqlite_dir(parsed: URL, url: str, create: bool) -> None:
    database = parsed.database
    if not database or database == ":memory:" or database.startswith("file:"):
        return
    parent = Path(database).expanduser().absolute().parent
    if parent.is_dir():
        return
    if not create:
        raise _cannot_connect(url, f"directory {parent} does not exist (create it, or fix the URL)")
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise _cannot_connect(url, f"cannot create directory {parent}: {exc.strerror or exc}") from None


def _sqlite_on_connect(dbapi_connection, _record) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


def _create_mysql_database(parsed: URL, url: str) -> None:
    name = parsed.database
    if not name:
        raise _cannot_connect(url, "the URL names no database (mysql+pymysql://USER:PW@HOST/DATABASE)")
    server = _mysql_url(parsed._replace(database=None))  # set(database=None) keeps the name
    engine = None
    try:
        engine = create_engine(server)
        with engine.connect() as conn:
            quoted = conn.dialect.identifier_preparer.quote_identifier(name)
            conn.execute(text(f"CREATE DATABASE IF NOT EXISTS {quoted} CHARACTER SET utf8mb4 COLLATE utf8mb4_unicode_ci"))
    except Exception as exc:
        raise _cannot_connect(url, _reason(exc, parsed)) from None
    finally:
        if engine is not None:
            engine.dispose()


def _current_revision(conn: Connection) -> str | None:
    from alembic.runtime.migration import MigrationContext

    return MigrationContext.configure(conn).get_current_revision()


def _head_revision() -> str | None:
    from alembic.script import ScriptDirectory

    return ScriptDirectory.from_config(alembic_config()).get_current_head()


def _upgrade(engine: Engine) -> None:
    from alembic import command

    with engine.begin() as conn:
        command.upgrade(alembic_config(conn), "head")


@contextmanager
def _migration_lock(engine: Engine, parsed: URL) -> Iterator[None]:
    backend = parsed.get_backend_name()
    if backend == "sqlite":
        database = parsed.database
        if not database or database == ":memory:" or database.startswith("file:"):
            yield
            return
        lock_path = Path(database).expanduser().absolute().with_name(Path(database).name + ".migrate-lock")
        with open(lock_path, "a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)
        return
    with engine.connect() as conn:
        got = conn.execute(text("SELECT GET_LOCK(:name, 300)"), {"name": MYSQL_LOCK}).scalar()
        if got != 1:
            raise ConfigError(f"database {redact_url(str(parsed))}: another process held the migration lock for 300 s")
        try:
            yield
        finally:
            conn.execute(text("SELECT RELEASE_LOCK(:name)"), {"name": MYSQL_LOCK})


def _cannot_connect(url: str, reason: str) -> ConfigError:
    return ConfigError(f"cannot connect to database {redact_url(url)}: {reason}")


def _reason(exc: BaseException, parsed: URL) -> str:
    """The driver's own message on one line, without SQLAlchemy's boilerplate or any password."""
    orig = getattr(exc, "orig", None) or exc
    args = getattr(orig, "args", ())
    if len(args) == 2 and isinstance(args[0], int) and isinstance(args[1], str):
        message = f"{args[1]} (error {args[0]})"  # PyMySQL: (code, message)
    else:
        message = str(orig) or type(orig).__name__
    message = " ".join(message.split())
    if parsed.password:
        message = message.replace(str(parsed.password), "***")
    return message
