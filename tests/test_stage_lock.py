"""One runner per animal, stage, channel and resolution (`db.locks`), on SQLite and MariaDB."""

from __future__ import annotations

import datetime as dt
import multiprocessing
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
from alembic import command
from sqlalchemy import inspect, select, update

from db import locks
from db.locks import LockKey
from db.models import PipelineRun, StageLock
from db.session import alembic_config, init_db, session_scope
from pipeline.errors import StageBusy, StageError
from pipeline.runner import StageLease
from tests.test_section_identity import REPO, copy_sample, run_cli, tiny_sample  # noqa: F401 (fixture)

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


# ---------------------------------------------------------------------------------------------
# the lease the runner holds


def test_heartbeat_keeps_a_long_run_its_lock(engine):
    with StageLease(engine, KEY, lease_seconds=1):
        time.sleep(1.6)  # longer than the lease: only the heartbeat thread keeps it fresh
        with pytest.raises(StageBusy):
            locks.acquire(engine, KEY, lease_seconds=1, who=("bob", "other-host", 1))
    with session_scope(engine) as s:
        assert locks.held_locks(s, "DEMO") == []  # released on leaving


def test_a_run_that_lost_its_lock_stops_recording(engine):
    with StageLease(engine, KEY, lease_seconds=1) as lease:
        with session_scope(engine) as s:  # as if its lease had run out and another runner took over
            s.execute(update(StageLock).values(token="someone-else"))
        deadline = time.monotonic() + 5
        while not lease.lost and time.monotonic() < deadline:
            time.sleep(0.05)
        with pytest.raises(StageError, match="lost the lock of clean of DEMO"):
            lease.check()
    with session_scope(engine) as s:  # the new holder's row is not released by the loser
        assert [row.token for row in locks.held_locks(s, "DEMO")] == ["someone-else"]


def test_lease_is_released_on_keyboard_interrupt(engine):
    with pytest.raises(KeyboardInterrupt):
        with StageLease(engine, KEY, lease_seconds=300):
            raise KeyboardInterrupt
    with session_scope(engine) as s:
        assert locks.held_locks(s, "DEMO") == []


# ---------------------------------------------------------------------------------------------
# through the command line


def _start_extract(root, db_url) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.Popen([sys.executable, "-m", "pipeline", "--animal", "DEMO", "--task", "extract", "--data-root", str(root),
                             "--db-url", db_url, "--workers", "2"], env=env, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _lock_of_running(proc: subprocess.Popen, db_url: str) -> StageLock:
    """The extract lock once `proc` holds it and has named its run (polled; extract of the tiny
    sample holds it for about a second)."""
    engine = init_db(db_url)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and proc.poll() is None:
            with session_scope(engine) as s:
                row = s.scalars(select(StageLock).where(StageLock.stage == "extract")).one_or_none()
            if row is not None and row.FK_pipeline_run_id is not None:
                return row
            time.sleep(0.005)
    finally:
        engine.dispose()
    raise AssertionError(f"extract never held its lock: {proc.communicate()}")


def _extract_runs(db_url: str) -> list[tuple[int, str]]:
    engine = init_db(db_url)
    try:
        with session_scope(engine) as s:
            return [(r.id, r.status) for r in s.scalars(select(PipelineRun).where(PipelineRun.stage == "extract").order_by(PipelineRun.id))]
    finally:
        engine.dispose()


def test_second_runner_is_refused_while_the_first_runs(tiny_sample, tmp_path, db_url):
    root = copy_sample(tiny_sample, tmp_path)
    first = _start_extract(root, db_url)
    try:
        row = _lock_of_running(first, db_url)
        os.killpg(first.pid, signal.SIGSTOP)  # keep it mid-run, holding the lock, while the second one starts
        assert first.poll() is None
        second = run_cli(root, db_url, "extract", "--downsample", "false")  # extract's lock covers both resolutions
        user, host, _ = locks.identity()
        assert second.returncode == 4, second.stderr
        lines = [line for line in second.stderr.splitlines() if line.startswith("error:")]
        assert len(lines) == 1
        assert (f"error: extract of DEMO (every channel, every resolution) is held by pipeline_run {row.FK_pipeline_run_id} "
                f"(user {user}, host {host}, pid {first.pid}) since {row.acquired:%Y-%m-%d %H:%M:%S}") in lines[0]
    finally:
        os.killpg(first.pid, signal.SIGCONT)
    out, err = first.communicate(timeout=300)
    assert first.returncode == 0, err
    assert _extract_runs(db_url) == [(row.FK_pipeline_run_id, "success")]  # exactly one ran
    engine = init_db(db_url)
    with session_scope(engine) as s:
        assert locks.held_locks(s, "DEMO") == []
    engine.dispose()


def test_lock_of_a_killed_runner_is_taken_over(tiny_sample, tmp_path, db_url):
    root = copy_sample(tiny_sample, tmp_path)
    killed = _start_extract(root, db_url)
    row = _lock_of_running(killed, db_url)
    os.killpg(killed.pid, signal.SIGKILL)  # the runner and its pool: nothing runs a finally
    killed.communicate()
    rerun = run_cli(root, db_url, "extract")
    assert rerun.returncode == 0, rerun.stderr
    assert (f"took over the lock of extract of DEMO (every channel, every resolution) from pipeline_run "
            f"{row.FK_pipeline_run_id}") in rerun.stderr
    assert f"its process {killed.pid} on {socket.gethostname()} is gone" in rerun.stderr
    assert "0 failed" in rerun.stderr
    runs = _extract_runs(db_url)
    assert runs[0] == (row.FK_pipeline_run_id, "failed") and runs[-1][1] == "success" and len(runs) == 2


def test_a_waiting_lease_gets_the_lock_once_the_holder_releases(engine):
    """The pages refresh after neuroglancer/omezarr waits for another runner's refresh."""
    holder = locks.acquire(engine, KEY, lease_seconds=300, who=("ann", "other-host", 1))
    with pytest.raises(StageBusy):
        with StageLease(engine, KEY, lease_seconds=300):
            pass
    import threading

    threading.Timer(1.0, locks.release, (engine, holder)).start()
    started = time.monotonic()
    with StageLease(engine, KEY, lease_seconds=300, wait_seconds=30) as lease:
        assert lease.grant.took_over is None and time.monotonic() - started >= 1.0


def test_sigterm_records_the_run_and_releases_the_lock_at_once(tiny_sample, tmp_path, db_url):
    """scancel / kill: the next runner, on any machine, need not wait for the lease."""
    root = copy_sample(tiny_sample, tmp_path)
    runner = _start_extract(root, db_url)
    row = _lock_of_running(runner, db_url)
    runner.send_signal(signal.SIGTERM)  # the runner only, as `kill PID` does
    runner.communicate(timeout=300)
    assert runner.returncode == -signal.SIGTERM
    engine = init_db(db_url)
    try:
        with session_scope(engine) as s:
            assert locks.held_locks(s, "DEMO") == []
            run = s.get(PipelineRun, row.FK_pipeline_run_id)
            assert run.status == "failed" and "terminated (SIGTERM)" in run.error
    finally:
        engine.dispose()
