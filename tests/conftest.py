"""Shared database fixtures (owned by the DB engineer; keep this file small), and the expensive
inputs that several test files would otherwise each build (built once per session, read only: a
test that changes them works on a copy).

- `sqlite_url`: URL of a SQLite file in the test's tmp_path (the file does not exist yet).
- `db_url`: the same test once per backend, ids `sqlite` and `mysql`. The mysql variant gets a
  throwaway database `slidepipe_test_<random hex>` of its own, created by `db.session.init_db`
  when the test first calls it (the URL names it; nothing exists yet) and dropped after the test,
  so tests never see each other's rows. It costs ~0.3 s per test.

The MySQL/MariaDB server is SLIDEPIPE_TEST_MYSQL_URL (a server URL; any database name in it is
replaced) or mysql+pymysql://root@127.0.0.1:3306. When it cannot be reached, mysql variants are
skipped with the reason, except when SLIDEPIPE_TEST_MYSQL_URL is set or CI=true: then they fail,
because a CI run that silently skipped MySQL would prove nothing about it.

- `small_sample`: the standard sample brain (`build_sample` defaults: DEMO, seed 0, 40 sections,
  ~20 s to write), its `SampleTruth`; test_sample checks it, test_stages_clean_align runs the
  stages on a copy.
"""

from __future__ import annotations

import os
import uuid

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

DEFAULT_MYSQL_SERVER = "mysql+pymysql://root@127.0.0.1:3306"


@pytest.fixture
def sqlite_url(tmp_path) -> str:
    return f"sqlite:///{(tmp_path / 'slidepipe.db').as_posix()}"


@pytest.fixture(params=[pytest.param("sqlite", id="sqlite"), pytest.param("mysql", id="mysql", marks=pytest.mark.mysql)])
def db_url(request, tmp_path):
    if request.param == "sqlite":
        yield f"sqlite:///{(tmp_path / 'slidepipe.db').as_posix()}"
        return
    server = request.getfixturevalue("_mysql_server")
    name = f"slidepipe_test_{uuid.uuid4().hex[:12]}"
    yield server.set(database=name).render_as_string(hide_password=False)
    _drop_database(server, name)


@pytest.fixture(scope="session")
def _mysql_server():
    """The reachable MySQL server URL (without database), or skip/fail as the module says."""
    configured = os.environ.get("SLIDEPIPE_TEST_MYSQL_URL")
    must_exist = bool(configured) or os.environ.get("CI", "").lower() == "true"
    server = make_url(configured or DEFAULT_MYSQL_SERVER)._replace(database=None)
    if server.drivername in ("mysql", "mariadb"):
        server = server.set(drivername=f"{server.drivername}+pymysql")
    engine = create_engine(server, connect_args={"connect_timeout": 5})
    try:
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
    except Exception as exc:
        reason = f"MySQL server {server.render_as_string(hide_password=True)} unreachable: {getattr(exc, 'orig', exc)}"
        if must_exist:
            pytest.fail(reason + " (required: SLIDEPIPE_TEST_MYSQL_URL or CI=true is set)")
        pytest.skip(reason)
    finally:
        engine.dispose()
    return server


def _drop_database(server, name: str) -> None:
    engine = create_engine(server)
    try:
        with engine.connect() as conn:
            # A test that leaked an open transaction would make DROP wait forever on its locks.
            conn.execute(text("SET SESSION lock_wait_timeout = 30"))
            conn.execute(text(f"DROP DATABASE IF EXISTS `{name}`"))
    finally:
        engine.dispose()


@pytest.fixture(scope="session")
def small_sample(tmp_path_factory):
    from pipeline.sample import build_sample

    return build_sample(tmp_path_factory.mktemp("small-sample"))
