"""Plan -> skip what is done -> run the rest in a pool -> record.

Every stage hands `StageContext.execute` a list of `Task`s. A task is skipped when each of its
outputs is recorded in `file_log` with the task's fingerprint and is unchanged on disk, so a
killed or repeated run redoes exactly the unfinished or invalidated work. Workers never touch the
database: they return plain dicts and the main process records them, which keeps SQLite safe and
keeps MySQL connections out of forked children.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import hashlib
import json
import logging
import os
import platform
import socket
import sys
import threading
import time
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from importlib import metadata
from multiprocessing import get_context
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

from sqlalchemy import select
from sqlalchemy.orm import Session
from tqdm import tqdm

from db import locks
from db.models import FileLog, PipelineRun
from db.queries import current_file
from db.session import session_scope
from pipeline import __version__
from pipeline.atomic import pid_alive, remove_stale_temps, sha256_file
from pipeline.config import Settings
from pipeline.errors import SlidepipeError, StageBusy, StageError
from pipeline.layout import AnimalLayout, resolution_name
from pipeline.queued import path_stats  # noqa: F401  (also this module's API: tests and helpers use it)
from pipeline.queued import run_in_worker as _run_in_worker

log = logging.getLogger("slidepipe")

TRACKED_PACKAGES = (
    "numpy", "tifffile", "imagecodecs", "opencv-python-headless", "scipy", "pylibCZIrw",
    "aicspylibczi", "SimpleITK", "itk-elastix", "cloud-volume", "igneous-pipeline", "task-queue", "zarr",
    "tensorstore", "ome-zarr", "ome-zarr-models", "SQLAlchemy", "alembic",
)


QUEUE_POLL_SECONDS = 0.2
"""How often a runner waiting for queue workers looks for their result files."""
QUEUE_QUIET_SECONDS = float(os.environ.get("SLIDEPIPE_QUEUE_QUIET_SECONDS", 60))
"""After this long without a result the waiting runner says what it waits for (again each time)."""


@dataclasses.dataclass
class Task:
    """One unit of work: `func(**kwargs)` in a worker, producing `outputs` from `inputs`.

    `params` are the settings that change the output (they enter the fingerprint); `label` is
    the file the user should look at when the task fails (defaults to the first input).
    """

    key: str
    func: Callable[..., Mapping[str, Any] | None]
    kwargs: Mapping[str, Any]
    outputs: Sequence[Path]
    inputs: Sequence[Path] = ()
    params: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    label: str | None = None

    def describe(self) -> str:
        if self.label:
            return self.label
        if self.inputs:
            return str(self.inputs[0])
        return self.key


@dataclasses.dataclass
class TaskFailure:
    key: str
    where: str
    reason: str

    def line(self) -> str:
        return f"{self.where}: {self.reason}"

    def report(self) -> None:
        """Print the failure as it happens, once (the CLI does not repeat it at the end), as an
        `error:` line like every other error; tqdm.write keeps a progress bar intact."""
        tqdm.write(f"error: {self.line()}", file=sys.stderr)


def software_versions() -> dict[str, str]:
    versions = {"python": platform.python_version(), "slidepipe": __version__}
    for name in TRACKED_PACKAGES:
        with contextlib.suppress(metadata.PackageNotFoundError):
            versions[name] = metadata.version(name)
    return versions


def fingerprint(stage: str, version: int, key: str, params: Mapping[str, Any], input_checksums: Sequence[str]) -> str:
    payload = json.dumps(
        {"stage": stage, "version": version, "key": key, "params": params, "inputs": list(input_checksums)},
        sort_keys=True,
        default=str,
    )
    return hashlib.sha256(payload.encode()).hexdigest()


def unchanged_on_disk(path: Path, row: FileLog) -> bool:
    """Is the file (or directory tree) at `path` the one `row` recorded? Files: same size and
    mtime, or else the same sha256 (a file touched but not changed still counts); directories:
    the same names and sizes (`path_stats`)."""
    if path.is_dir():
        return path_stats(path)[2] == row.checksum
    st = path.stat()
    if st.st_size != row.size:
        return False
    return st.st_mtime_ns == row.mtime_ns or sha256_file(path) == row.checksum


class StageContext:
    """What a stage module sees: settings, paths, the DB, and `execute` for its tasks."""

    def __init__(
        self,
        *,
        settings: Settings,
        engine,
        animal: str,
        stage: str,
        version: int,
        channel: int = 1,
        downsample: bool = True,
        params: Mapping[str, Any] | None = None,
        args: Any = None,
        run_id: int | None = None,
        lease: "StageLease | None" = None,
    ):
        self.settings = settings
        self.engine = engine
        self.animal = animal
        self.stage = stage
        self.version = version
        self.channel = channel
        self.downsample = downsample
        self.params = dict(params or {})
        self.args = args
        self.layout = AnimalLayout(settings.data_root, animal)
        self.run_id = run_id
        self.lease = lease
        self.failures: list[TaskFailure] = []
        self._unchanged_cache: dict[tuple[str, int], bool] = {}
        self._stale_cache: dict[int, tuple[Path, str] | None] = {}
        self.counts = {"tasks_total": 0, "tasks_run": 0, "tasks_skipped": 0, "tasks_failed": 0}
        self.summary: dict[str, Any] = {}
        self.notes: list[str] = []
        self.log = log

    @property
    def resolution(self) -> str:
        return resolution_name(self.downsample)

    @contextlib.contextmanager
    def session(self) -> Iterator[Session]:
        with session_scope(self.engine) as session:
            yield session

    def summarise(self, key: str, data: Any, note: str | None = None) -> None:
        """Record what the stage found (JSON-able `data`, in `pipeline_run.summary` under `key`);
        `note`, if given, is printed after the stage's summary line."""
        self.summary[key] = data
        if note:
            self.notes.append(note)

    def fail(self, where: str | Path, reason: str) -> None:
        """Record a failure found by the stage itself (not by a task), e.g. a gap in a series."""
        self._record_failure(TaskFailure(key="-", where=str(where), reason=reason))

    def output_problem(self, session: Session, path: Path) -> str | None:
        """Why `path` cannot be trusted as the product of an earlier stage now, or None when it
        can: it must be recorded in file_log as an output, be unchanged on disk since, and no
        file it was made from, directly or further up, may have changed after the stage that
        read it (an aligned section whose mask was edited and remade since is out of date, even
        though its cleaned input did not change yet). A file that merely exists proves nothing."""
        path = Path(path)
        if not path.exists():
            return "is missing"
        row = current_file(session, self.layout.relative(path))
        if row is None or row.kind != "output":
            return "was not made by slidepipe (no record in file_log)"
        if not self._unchanged(path, row):
            return "changed on disk since slidepipe wrote it"
        stale = self._stale_input(session, row)
        if stale is not None:
            source, stage = stale
            return f"is out of date: {source} changed after {stage} read it (run --task {stage} again, and the stages after it)"
        return None

    def _stale_input(self, session: Session, row: FileLog) -> tuple[Path, str] | None:
        """(file, stage that read it) of the first input upstream of `row` that changed after it
        was read, or None. Inputs that are gone (raw slides moved away after extract, or
        intermediate files deleted to save space) are not newer ones. Memoised per record."""
        if row.id in self._stale_cache:
            return self._stale_cache[row.id]
        found = None
        for used in row.inputs:
            source = self.layout.absolute(used.path)
            newest = current_file(session, used.path)
            if newest.checksum != used.checksum or (source.exists() and not self._unchanged(source, newest)):
                found = (source, row.run.stage if row.run is not None else "the stage that made it")
            elif newest.kind == "output":
                found = self._stale_input(session, newest)
            if found is not None:
                break
        self._stale_cache[row.id] = found
        return found

    def _unchanged(self, path: Path, row: FileLog) -> bool:
        """`unchanged_on_disk`, once per file and record in this run: a slide is the input of
        every section on it, and a touched slide would otherwise be hashed once per section."""
        key = (str(path), row.id)
        if key not in self._unchanged_cache:
            self._unchanged_cache[key] = unchanged_on_disk(path, row)
        return self._unchanged_cache[key]

    # ------------------------------------------------------------------------------------
    def execute(self, tasks: Sequence[Task], desc: str | None = None,
                prepare: Callable[[], None] | None = None) -> dict[str, dict]:
        """Run what is not done yet; return every task's result (run now or recorded before).

        `prepare` is called in this process just before a local pool of workers is forked, and
        only then (not when every task is done, not for queue workers): it loads what the tasks
        need that is slow to load (align: itk, ~8 s of CPU), so that the forked workers share it
        instead of each loading its own copy."""
        keys = [t.key for t in tasks]
        if len(set(keys)) != len(keys):
            raise ValueError(f"duplicate task keys in {self.stage}")
        for directory in {Path(o).parent for t in tasks for o in t.outputs}:
            remove_stale_temps(directory)
        results: dict[str, dict] = {}
        todo: list[tuple[Task, str, list[int]]] = []
        with self.session() as session:
            for task in tasks:
                try:
                    input_rows = [self._input_row(session, Path(p)) for p in task.inputs]
                except SlidepipeError as exc:  # e.g. an input missing: this task fails, the others go on
                    self._record_failure(TaskFailure(task.key, exc.path or task.describe(), exc.reason))
                    continue
                fp = fingerprint(self.stage, self.version, task.key, task.params, [r.checksum for r in input_rows])
                stored = self._done_result(session, task, fp)
                if stored is not None:
                    results[task.key] = stored
                    self.counts["tasks_skipped"] += 1
                else:
                    todo.append((task, fp, [r.id for r in input_rows]))
        self.counts["tasks_total"] += len(tasks)
        self._update_run_counts()
        if todo:
            results.update(self._run(todo, desc or self.stage, prepare))
        return results

    def is_current(self, task: Task) -> bool:
        """Would `execute` skip this task? Lets a stage avoid rebuilding a temporary input
        (e.g. a deleted rechunk layer) for a task that is already done."""
        with self.session() as session:
            try:
                input_rows = [self._input_row(session, Path(p)) for p in task.inputs]
            except SlidepipeError:
                return False
            fp = fingerprint(self.stage, self.version, task.key, task.params, [r.checksum for r in input_rows])
            return self._done_result(session, task, fp) is not None

    def _run(self, todo: list[tuple[Task, str, list[int]]], desc: str,
             prepare: Callable[[], None] | None = None) -> dict[str, dict]:
        results: dict[str, dict] = {}
        bar = tqdm(total=len(todo), desc=desc, unit="task", disable=None, file=sys.stderr)
        workers = min(self.settings.workers, len(todo))
        try:
            if self.settings.queue_url:
                self._run_queue(todo, results, bar)
            elif workers <= 1 or self.settings.debug:
                for task, fp, input_ids in todo:
                    outcome = _run_in_worker(task.func, task.kwargs, [str(o) for o in task.outputs], task.describe(), self.settings.debug)
                    self._finish(task, fp, input_ids, outcome, results)
                    bar.update()
            else:
                if prepare is not None:
                    prepare()
                self._run_pool(todo, workers, results, bar)
        finally:
            bar.close()
            self._update_run_counts()
        return results

    def _run_pool(self, todo, workers, results, bar) -> None:
        with ProcessPoolExecutor(max_workers=workers, mp_context=get_context("fork")) as pool:
            pending: dict[Future, tuple[Task, str, list[int]]] = {}
            queue = list(todo)
            while queue or pending:
                while queue and len(pending) < workers * 2:
                    task, fp, input_ids = queue.pop(0)
                    future = pool.submit(
                        _run_in_worker, task.func, task.kwargs, [str(o) for o in task.outputs], task.describe(), self.settings.debug
                    )
                    pending[future] = (task, fp, input_ids)
                done, _ = wait(pending, return_when=FIRST_COMPLETED)
                for future in done:
                    task, fp, input_ids = pending.pop(future)
                    try:
                        outcome = future.result()
                    except BrokenProcessPool:
                        outcome = ("error", task.describe(), "the worker process died (killed, or out of memory)")
                    self._finish(task, fp, input_ids, outcome, results)
                    bar.update()

    def _run_queue(self, todo, results, bar) -> None:
        """The tasks onto the task queue for `create_pipeline worker`s, then wait for their
        result files and record each one as the local pool's (`pipeline.queued`). A task done
        twice (its worker was thought dead after its lease) is recorded once. The batch's
        sub-queue and results are removed however this ends, so an interrupted run's tasks are
        not run later (a worker drops a task whose run has ended)."""
        import uuid

        from pipeline.queued import Batch, read_outcome, task_spec

        root = self.layout.data_root
        batch = Batch(self.settings.queue_url, root, f"{self.animal}-{self.stage}-{self.run_id}-{uuid.uuid4().hex[:8]}")
        waiting = {task.key: (task, fp, input_ids) for task, fp, input_ids in todo}
        try:
            batch.insert(task_spec(batch.name, task.key, task.func, task.kwargs, [str(o) for o in task.outputs],
                                   task.describe(), self.settings.debug, root, self.settings.queue_url)
                         for task, _fp, _ids in todo)
            last = time.monotonic()
            while waiting:
                arrived = batch.arrived()
                for path in arrived:
                    key = json.loads(path.read_text())["key"]
                    if key in waiting:
                        task, fp, input_ids = waiting.pop(key)
                        _key, outcome = read_outcome(path, [str(o) for o in task.outputs], root)
                        self._finish(task, fp, input_ids, outcome, results)
                        bar.update()
                    path.unlink(missing_ok=True)  # a second completion of a recorded task: once is enough
                if arrived:
                    last = time.monotonic()
                elif time.monotonic() - last >= QUEUE_QUIET_SECONDS:
                    names = ", ".join(t.describe() for t, _f, _i in list(waiting.values())[:3])
                    tqdm.write(f"waiting for {len(waiting)} task(s) on {self.settings.queue_url} (no result for "
                               f"{QUEUE_QUIET_SECONDS:.0f} s), e.g. {names}: is a `create_pipeline worker --queue "
                               f"{self.settings.queue_url} --data-root DIR` running?", file=sys.stderr)
                    last = time.monotonic()
                else:
                    time.sleep(QUEUE_POLL_SECONDS)
        finally:
            batch.remove()

    def remove_ended_batches(self) -> None:
        """Clear the queue batches of runs that ended without clearing them (SIGKILLed runners,
        whose runs were marked failed when their lock was taken over)."""
        from pipeline.queued import remove_ended_batches

        def running(run_id: int) -> bool:
            with self.session() as session:
                run = session.get(PipelineRun, run_id)
                return run is not None and run.status == "running"

        for name in remove_ended_batches(self.layout.data_root, self.settings.queue_url, running):
            log.info("removed the queue results of an ended run: %s", name)

    def _record_failure(self, failure: TaskFailure) -> None:
        self.failures.append(failure)
        self.counts["tasks_failed"] += 1
        failure.report()

    def _finish(self, task: Task, fp: str, input_ids: list[int], outcome, results: dict) -> None:
        if self.lease is not None:
            self.lease.check()  # a runner that lost its lock must not record files another one is making
        if outcome[0] == "error":
            _, where, reason = outcome
            self._record_failure(TaskFailure(task.key, where, reason))
            return
        _, result, stats = outcome
        with self.session() as session:
            inputs = [session.get(FileLog, i) for i in input_ids]
            for out in task.outputs:
                size, mtime_ns, checksum = stats[str(out)]
                row = FileLog(
                    path=self.layout.relative(Path(out)),
                    kind="output",
                    FK_pipeline_run_id=self.run_id,
                    task_key=task.key,
                    fingerprint=fp,
                    size=size,
                    checksum=checksum,
                    mtime_ns=mtime_ns,
                    result=json.dumps(result, default=str),
                    created=dt.datetime.now(),
                )
                row.inputs.extend(inputs)
                session.add(row)
        self.counts["tasks_run"] += 1
        results[task.key] = result

    # ------------------------------------------------------------------------------------
    def _input_row(self, session: Session, path: Path) -> FileLog:
        """The file_log row describing `path` as it is now; hashing only when it changed."""
        rel = self.layout.relative(path)
        if not path.exists():
            raise SlidepipeError("input file is missing", path)
        row = current_file(session, rel)
        if path.is_dir():
            size, mtime_ns, checksum = path_stats(path)
            if row is not None and row.checksum == checksum:
                return row
        else:
            st = path.stat()
            if row is not None and row.size == st.st_size and row.mtime_ns == st.st_mtime_ns:
                return row
            size, mtime_ns, checksum = st.st_size, st.st_mtime_ns, sha256_file(path)
            if row is not None and row.size == size and row.checksum == checksum:
                # Touched, not changed (copied without times, restored from a backup): still the file
                # the record describes, and still the output of the stage that made it. The mtime is
                # only a shortcut past hashing, so the record takes the new one.
                row.mtime_ns = mtime_ns
                return row
        # Unknown to us, or changed since recorded (e.g. a hand-edited mask): record it as found.
        row = FileLog(
            path=rel, kind="external", size=size, checksum=checksum, mtime_ns=mtime_ns,
            FK_pipeline_run_id=None, created=dt.datetime.now(),
        )
        session.add(row)
        session.flush()
        return row

    def _done_result(self, session: Session, task: Task, fp: str) -> dict | None:
        result: dict | None = None
        if not task.outputs:
            return None
        for out in task.outputs:
            path = Path(out)
            row = current_file(session, self.layout.relative(path))
            if row is None or row.fingerprint != fp or not path.exists():
                return None
            if path.is_file():
                st = path.stat()
                if st.st_size != row.size:
                    return None
                if st.st_mtime_ns != row.mtime_ns:
                    # Rewritten with the same bytes (a second queue worker that finished the same
                    # task after its lease ran out, a copy without times): still done, as for inputs.
                    if sha256_file(path) != row.checksum:
                        return None
                    row.mtime_ns = st.st_mtime_ns
            elif path_stats(path)[2] != row.checksum:  # a directory: a chunk deleted, added or truncated
                return None
            if result is None:
                result = json.loads(row.result) if row.result else {}
        return result

    def _update_run_counts(self) -> None:
        if self.run_id is None:
            return
        with self.session() as session:
            run = session.get(PipelineRun, self.run_id)
            if run is not None:
                for name, value in self.counts.items():
                    setattr(run, name, value)


# ----------------------------------------------------------------------------------------
# pipeline_run bookkeeping
def start_run(engine, *, animal: str | None, stage: str, channel: int | None, resolution: str | None,
              params: Mapping[str, Any], command: str | None = None) -> int:
    """Create the `pipeline_run` row; first mark runs of this host whose process is gone."""
    host = socket.gethostname()
    with session_scope(engine) as session:
        for stale in session.scalars(select(PipelineRun).where(PipelineRun.status == "running", PipelineRun.host == host)):
            if stale.pid and not pid_alive(stale.pid):
                stale.status = "failed"
                stale.error = (stale.error or "") + f"process {stale.pid} ended without finishing (killed?)"
                stale.ended = stale.ended or dt.datetime.now()
        run = PipelineRun(
            FK_prep_id=animal,
            stage=stage,
            channel=channel,
            resolution=resolution,
            params=json.dumps(dict(params), sort_keys=True, default=str),
            software_versions=json.dumps(software_versions(), sort_keys=True),
            code_version=__version__,
            host=host,
            pid=os.getpid(),
            command=command,
            started=dt.datetime.now(),
            status="running",
        )
        session.add(run)
        session.flush()
        return run.id


def finish_run(engine, run_id: int, failures: Sequence[TaskFailure], extra_error: str | None = None,
               summary: Mapping[str, Any] | None = None) -> None:
    with session_scope(engine) as session:
        run = session.get(PipelineRun, run_id)
        if summary:
            run.summary = json.dumps(dict(summary), sort_keys=True, default=str)
        lines = [f.line() for f in failures]
        if extra_error:
            lines.append(extra_error)
        run.status = "failed" if lines else "success"
        run.error = "\n".join(lines) if lines else None
        run.ended = dt.datetime.now()


# ----------------------------------------------------------------------------------------
# one runner per animal, stage, channel and resolution
def lock_key(module, animal: str, channel: int, resolution: str) -> locks.LockKey:
    """The lock a run of `module` takes. A stage whose files do not depend on the channel or the
    resolution (extract makes every channel and both resolutions) names fewer in `LOCK_BY`, so
    its runs exclude each other whatever --channel / --downsample say."""
    by = getattr(module, "LOCK_BY", ("channel", "resolution"))
    return locks.LockKey(animal, module.NAME,
                         channel if "channel" in by else locks.EVERY_CHANNEL,
                         resolution if "resolution" in by else locks.EVERY_RESOLUTION)


class StageLease:
    """Holds a stage's lock while a run works (`with StageLease(...) as lease:`).

    A daemon thread renews the heartbeat every fifth of the lease, so a long task does not lose
    the lock; it only touches the `stage_lock` row, never the stage's files. When the renewal
    finds the lock taken over (our lease ran out, e.g. the machine was suspended), `check`
    raises in the main thread before the next result is recorded. `wait_seconds`: how long to
    retry while another live runner holds it (0: refuse at once with `StageBusy`).
    """

    def __init__(self, engine, key: locks.LockKey, lease_seconds: int, wait_seconds: float = 0):
        self.engine = engine
        self.key = key
        self.lease_seconds = lease_seconds
        self.wait_seconds = wait_seconds
        self.grant: locks.Grant | None = None
        self.lost = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> "StageLease":
        deadline = time.monotonic() + self.wait_seconds
        while True:
            try:
                self.grant = locks.acquire(self.engine, self.key, lease_seconds=self.lease_seconds)
                break
            except StageBusy:
                if time.monotonic() >= deadline:
                    raise
                time.sleep(1)
        if self.grant.took_over:
            log.warning("took over the lock of %s from %s", self.key.describe(), self.grant.took_over)
        self._thread = threading.Thread(target=self._beat, name="stage-lock-heartbeat", daemon=True)
        self._thread.start()
        return self

    def attach(self, run_id: int) -> None:
        """Name the run that holds the lock (it is written after the lock is taken)."""
        if not locks.refresh(self.engine, self.grant, run_id=run_id):
            self.lost = True

    def check(self) -> None:
        if self.lost:
            raise StageError(f"lost the lock of {self.key.describe()}: another runner took it over after this one's "
                             f"{self.lease_seconds} s lease expired without a heartbeat")

    def _beat(self) -> None:
        interval = max(0.1, self.lease_seconds / 5)
        while not self._stop.wait(interval):
            try:
                if not locks.refresh(self.engine, self.grant):
                    self.lost = True
                    return
            except Exception as exc:  # the database away for a moment: the lease allows a few misses
                log.warning("could not renew the lock of %s: %s", self.key.describe(), exc)

    def __exit__(self, *exc_info) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        # Also on failure and Ctrl-C; a database that is gone leaves the row to expire.
        with contextlib.suppress(Exception):
            locks.release(self.engine, self.grant)
