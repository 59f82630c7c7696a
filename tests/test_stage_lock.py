"""One runner per animal, stage, channel and resolution (`db.locks`), on SQLite and MariaDB."""

from __future__ import annotations

import datetime as dt
import multiprocessing
import socket

import pytest
from alembic import command
from sqlalchemy import inspect, select, update

from db import locks
from db.locks import LockKey
from db.models import PipelineRun, StageLock
from db.session import alembic_config, init_db, session_scope
from pipeline.errors import StageBusy

KEY = LockKey("DEMO", "clean", 1, "thumbnail")
DEAD_PID = 999999999  # above pid_max: no such process


@pytest.fixture
def engine(db_url):
    engine = init_db(db_url)
    yield engine
    engine.dispose()


def _age_heartbeat(engine, seconds: float) -> None:
    with session_scope(engine) as s:
        s.execute(update(StageLock).values(heartbeat=dt.datetime.now() - dt.timedelta(seconds=seconds)))


def test_migration_0004_adds_and_drops_stage_lock(engine, db_url):
    assert "stage_lock" in inspect(engine).get_table_names()
    with engine.begin() as conn:
        command.downgrade(alembic_config(conn), "0003")
    assert "stage_lock" not in inspect(engine).get_table_names()
    engine.dispose()
    again = init_db(db_url)
    try:
        assert "stage_lock" in inspect(again).get_table_names()
    finally:
        again.dispose()


def test_second_acquire_is_refused_naming_the_holder(engine):
    grant = locks.acquire(engine, KEY, lease_seconds=300, run_id=7, who=("ann", "scope-1", 4242))
    with pytest.raises(StageBusy) as refused:
        locks.acquire(engine, KEY, lease_seconds=300)
    message = str(refused.value)
    assert "clean of DEMO (channel 1, thumbnail) is held by pipeline_run 7 (user ann, host scope-1, pid 4242) since " in message
    # Another channel, resolution or stage is another lock.
    for other in (LockKey("DEMO", "clean", 2, "thumbnail"), LockKey("DEMO", "clean", 1, "full"), LockKey("DEMO", "align", 1, "thumbnail")):
        locks.release(engine, locks.acquire(engine, other, lease_seconds=300))
    assert locks.release(engine, grant)
    locks.release(engine, locks.acquire(engine, KEY, lease_seconds=300))  # free again
    with session_scope(engine) as s:
        assert locks.held_locks(s, "DEMO") == []


def test_holder_whose_process_is_gone_is_taken_over_and_its_run_failed(engine):
    with session_scope(engine) as s:
        run = PipelineRun(FK_prep_id="DEMO", stage="clean", channel=1, resolution="thumbnail", params="{}",
                          host=socket.gethostname(), pid=DEAD_PID, status="running")
        s.add(run)
    old = locks.acquire(engine, KEY, lease_seconds=300, run_id=run.id, who=("ann", socket.gethostname(), DEAD_PID))
    new = locks.acquire(engine, KEY, lease_seconds=300)
    assert f"pipeline_run {run.id} (user ann" in new.took_over and f"its process {DEAD_PID} on" in new.took_over
    with session_scope(engine) as s:
        failed = s.get(PipelineRun, run.id)
        assert failed.status == "failed" and "taken over" in failed.error and failed.ended is not None
    # The old holder can no longer refresh nor release what is now someone else's.
    assert not locks.refresh(engine, old)
    assert not locks.release(engine, old)
    assert locks.refresh(engine, new) and locks.release(engine, new)


def test_lease_decides_for_a_holder_on_another_host(engine):
    locks.acquire(engine, KEY, lease_seconds=60, who=("ann", "other-host", DEAD_PID))
    with pytest.raises(StageBusy):  # its pid means nothing here: only the lease tells
        locks.acquire(engine, KEY, lease_seconds=60)
    _age_heartbeat(engine, 61)
    grant = locks.acquire(engine, KEY, lease_seconds=60)
    assert "its lease expired (no heartbeat for 61 s, lease 60 s)" in grant.took_over


def test_refresh_keeps_the_lease_and_names_the_run(engine):
    grant = locks.acquire(engine, KEY, lease_seconds=60, who=("ann", "other-host", 1))
    _age_heartbeat(engine, 59)
    assert locks.refresh(engine, grant, run_id=12)
    with session_scope(engine) as s:
        row = s.scalars(select(StageLock)).one()
        assert row.FK_pipeline_run_id == 12 and (dt.datetime.now() - row.heartbeat).total_seconds() < 5
    with pytest.raises(StageBusy, match="pipeline_run 12"):
        locks.acquire(engine, KEY, lease_seconds=60)


def _race(url: str) -> str:
    engine = init_db(url)
    try:
        barrier.wait()
        locks.acquire(engine, KEY, lease_seconds=300)
        return "got"
    except StageBusy:
        return "refused"
    finally:
        engine.dispose()


barrier = None


def test_concurrent_acquire_exactly_one_wins(db_url):
    global barrier
    init_db(db_url).dispose()
    ctx = multiprocessing.get_context("fork")
    barrier = ctx.Barrier(4)
    with ctx.Pool(4) as pool:
        outcomes = pool.map(_race, [db_url] * 4)
    assert sorted(outcomes) == ["got", "refused", "refused", "refused"]
