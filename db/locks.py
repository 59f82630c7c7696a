"""One runner per animal, stage, channel and resolution, held as a `stage_lock` row.

The lock is the table's primary key: `acquire` INSERTs the row, and of two runners doing so at
once exactly one commits (SQLite and MySQL alike, from any machine). A holder keeps its lease by
`refresh`ing the heartbeat; a holder whose process is gone (same host, pid dead) or whose
heartbeat is older than its lease is taken over by a conditional UPDATE on its token, so of two
runners taking over at once one wins too. Times are the runners' clocks (machines that share a
database keep them in step, e.g. NTP; the lease is minutes, not seconds).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import getpass
import os
import socket
import uuid
from typing import Callable

from sqlalchemy import delete, select, update
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from db.models import PipelineRun, StageLock
from db.session import session_scope
from pipeline.atomic import pid_alive
from pipeline.errors import StageBusy

EVERY_CHANNEL = 0
EVERY_RESOLUTION = "any"


@dataclasses.dataclass(frozen=True)
class LockKey:
    animal: str
    stage: str
    channel: int = EVERY_CHANNEL
    resolution: str = EVERY_RESOLUTION

    def where(self):
        return (StageLock.FK_prep_id == self.animal, StageLock.stage == self.stage,
                StageLock.channel == self.channel, StageLock.resolution == self.resolution)

    def describe(self) -> str:
        channel = "every channel" if self.channel == EVERY_CHANNEL else f"channel {self.channel}"
        resolution = "every resolution" if self.resolution == EVERY_RESOLUTION else self.resolution
        return f"{self.stage} of {self.animal} ({channel}, {resolution})"


@dataclasses.dataclass(frozen=True)
class Grant:
    key: LockKey
    token: str
    took_over: str | None = None
    """Why the previous holder was displaced (for the warning), or None."""


def identity() -> tuple[str, str, int]:
    """(user, host, pid) of this process; the user falls back to the uid in containers without one."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = f"uid {os.getuid()}"
    return user[:64], socket.gethostname()[:255], os.getpid()


def holder_line(row: StageLock, now: dt.datetime) -> str:
    """The holder as one line: who, where, since when, and how fresh its heartbeat is."""
    run = f"pipeline_run {row.FK_pipeline_run_id}" if row.FK_pipeline_run_id is not None else "a runner starting"
    age = max(0, int((now - row.heartbeat).total_seconds()))
    return (f"{run} (user {row.user}, host {row.host}, pid {row.pid}) since {row.acquired:%Y-%m-%d %H:%M:%S}, "
            f"last heartbeat {age} s ago")


def stale_reason(row: StageLock, *, host: str, now: dt.datetime,
                 alive: Callable[[int], bool] = pid_alive) -> str | None:
    """Why the holder may be taken over, or None while it counts as running. A pid is only
    checked on its own host; elsewhere only the lease tells."""
    if row.host == host and not alive(row.pid):
        return f"its process {row.pid} on {row.host} is gone"
    age = (now - row.heartbeat).total_seconds()
    if age > row.lease_seconds:
        return f"its lease expired (no heartbeat for {int(age)} s, lease {row.lease_seconds} s)"
    return None


def acquire(engine: Engine, key: LockKey, *, lease_seconds: int, run_id: int | None = None,
            who: tuple[str, str, int] | None = None, attempts: int = 5) -> Grant:
    """Take the lock, or take it over from a holder that is gone; else raise `StageBusy`
    naming the holder. `who` (user, host, pid) defaults to this process."""
    user, host, pid = who or identity()
    for _ in range(attempts):
        token = uuid.uuid4().hex
        now = dt.datetime.now()
        fields = dict(token=token, FK_pipeline_run_id=run_id, user=user, host=host, pid=pid,
                      acquired=now, heartbeat=now, lease_seconds=lease_seconds)
        try:
            with session_scope(engine) as session:
                session.add(StageLock(FK_prep_id=key.animal, stage=key.stage, channel=key.channel,
                                      resolution=key.resolution, **fields))
            return Grant(key, token)
        except IntegrityError:
            pass  # held: look at the holder
        with session_scope(engine) as session:
            row = session.scalars(select(StageLock).where(*key.where())).one_or_none()
            if row is None:
                continue  # released meanwhile: try the INSERT again
            reason = stale_reason(row, host=host, now=now)
            if reason is None:
                raise StageBusy(f"{key.describe()} is held by {holder_line(row, now)}; wait for it to finish or stop it "
                                f"(a holder that is gone is taken over: same host and pid dead, or no heartbeat for "
                                f"{row.lease_seconds} s)")
            previous, previous_run = f"{holder_line(row, now)}: {reason}", row.FK_pipeline_run_id
            taken = session.execute(update(StageLock).where(*key.where(), StageLock.token == row.token).values(**fields))
            if taken.rowcount != 1:
                continue  # another runner took it over first
            _fail_run(session, previous_run, f"lost its lock of {key.describe()}: {reason}; taken over")
        return Grant(key, token, took_over=previous)
    raise StageBusy(f"{key.describe()}: the lock changed hands {attempts} times while taking it; try again")


def refresh(engine: Engine, grant: Grant, *, run_id: int | None = None) -> bool:
    """Renew the lease (and name the holder's run once it exists); False when the lock is no
    longer ours (taken over after our lease expired)."""
    values: dict = {"heartbeat": dt.datetime.now()}
    if run_id is not None:
        values["FK_pipeline_run_id"] = run_id
    with session_scope(engine) as session:
        result = session.execute(update(StageLock).where(*grant.key.where(), StageLock.token == grant.token).values(**values))
        return result.rowcount == 1


def release(engine: Engine, grant: Grant) -> bool:
    """Drop the lock if it is still ours; True when it was."""
    with session_scope(engine) as session:
        result = session.execute(delete(StageLock).where(*grant.key.where(), StageLock.token == grant.token))
        return result.rowcount == 1


def held_locks(session: Session, animal: str) -> list[StageLock]:
    """The locks held on an animal's stages (possibly by runners that are gone), oldest first."""
    return list(session.scalars(select(StageLock).where(StageLock.FK_prep_id == animal).order_by(StageLock.acquired)))


def _fail_run(session: Session, run_id: int | None, reason: str) -> None:
    if run_id is None:
        return
    run = session.get(PipelineRun, run_id)
    if run is not None and run.status == "running":
        run.status = "failed"
        run.error = (run.error + "\n" if run.error else "") + reason
        run.ended = dt.datetime.now()
