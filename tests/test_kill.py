"""Kill safety of every stage (issue 9), through the real command line on the tiny sample.

Each stage is run from the state the uninterrupted reference chain had before it, SIGKILLed
(runner and pool: the whole process group, so nothing runs a `finally`) at three points drawn
from a seed, and run again. The rerun must exit 0 and leave exactly the files of the reference
run (sha256 of every file; web pages, which name run ids, aside), no temp file, no `file_log`
row describing a file other than the one on disk, and every killed run recorded as failed.

The same on the task queue, in one chain of every stage through an fq:// queue with MariaDB and
two `create_pipeline worker`s (`test_every_stage_through_a_queue_killed_at_seeded_points_...`):
each stage of KILLED is SIGKILLed at three seeded points (workers, then runner and worker) and
rerun; the end state must equal the reference chain's files and file_log rows. It also shows
lease renewal (a worker paused past its lease keeps its task) and a failing task's report.

A kill point is a drawn fraction (0-0.8) of the stage's own duration in the reference run (its
pipeline_run row's start to end, process start-up not counted), counted from the killed run's
start; and at the latest when that run has recorded all but one of the rows left to do, so a run
faster than the reference is still interrupted. A kill that comes after the run's work (a point
past its end) ends the series: the stage is done.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest
from sqlalchemy import create_engine, func, insert, select

from db.models import Base, FileLog, PipelineRun
from db.session import init_db, session_scope
from pipeline.atomic import PAUSE_ENV, is_temp
from pipeline.runner import path_stats
from pipeline.sample import build_sample
from tests.conftest import _drop_database
from tests.helpers_queue import rows

pytestmark = pytest.mark.filterwarnings("ignore:builtin type [Ss]wig")

REPO = Path(__file__).resolve().parents[1]
SEED = 9  # issue 9
ANIMAL = "DEMO"

THUMBNAIL_CHAIN = ["extract", "mask", "clean", "histogram", "align", "create_metrics", "neuroglancer", "omezarr"]
CHAIN = [(s, True) for s in THUMBNAIL_CHAIN] + [(s, False) for s in THUMBNAIL_CHAIN]
KILLED = [(s, True) for s in THUMBNAIL_CHAIN] + [("clean", False), ("neuroglancer", False)]
ON_MARIADB_TOO = {("histogram", True), ("neuroglancer", False)}
"""A per-section stage with a stack-wide task and a published pyramid on MariaDB as well; all of
KILLED passed there (checked 2026-12-06), but each costs 4-19 s and the suite must stay well under
20 minutes, so the others run on SQLite only (the kill-safety under test is in the files and the
runner's per-task transactions, the same on both backends)."""


@dataclasses.dataclass
class Step:
    """One stage of the reference chain: the state before and after it, and what it took."""

    stage: str
    downsample: bool
    before: Path  # holds data/ and slidepipe.db
    after: Path
    seconds: float  # from its pipeline_run row's start to its end (the process starts before)
    rows: int  # file_log output rows the stage recorded

    @property
    def resolution(self) -> str:
        return "thumbnail" if self.downsample else "full"


def sqlite_of(state: Path) -> str:
    return f"sqlite:///{(state / 'slidepipe.db').as_posix()}"


def cli_args(root: Path, db_url: str, stage: str, downsample: bool) -> list[str]:
    return [sys.executable, "-m", "pipeline", "--animal", ANIMAL, "--task", stage, "--downsample", str(downsample).lower(),
            "--data-root", str(root), "--db-url", db_url, "--workers", "2"]


def cli_env() -> dict:
    return {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}


def run_cli(root: Path, db_url: str, stage: str, downsample: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(cli_args(root, db_url, stage, downsample), capture_output=True, text=True, env=cli_env(),
                          timeout=600)


def stage_rows(db_url: str, stage: str, resolution: str) -> int:
    engine = create_engine(db_url)
    try:
        with session_scope(engine) as s:
            return s.scalar(select(func.count(FileLog.id)).join(PipelineRun, FileLog.FK_pipeline_run_id == PipelineRun.id)
                            .where(PipelineRun.stage == stage, PipelineRun.resolution == resolution,
                                   FileLog.kind == "output"))
    finally:
        engine.dispose()


def run_seconds(db_url: str, stage: str, resolution: str) -> float:
    engine = create_engine(db_url)
    try:
        with session_scope(engine) as s:
            run = s.scalars(select(PipelineRun).where(PipelineRun.stage == stage, PipelineRun.resolution == resolution)).one()
            return (run.ended - run.started).total_seconds()
    finally:
        engine.dispose()


@pytest.fixture(scope="session")
def reference(tmp_path_factory) -> dict[tuple[str, bool], Step]:
    """The tiny sample through every stage once, uninterrupted (SQLite), keeping a copy of the
    data root and the database after each stage."""
    base = tmp_path_factory.mktemp("kill-reference")
    state = base / "00-sample"
    build_sample(state / "data", animal=ANIMAL, seed=0, size="tiny")
    init_db(sqlite_of(state)).dispose()
    steps = {}
    for i, (stage, downsample) in enumerate(CHAIN, 1):
        after = base / f"{i:02d}-{stage}-{'thumbnail' if downsample else 'full'}"
        shutil.copytree(state, after)
        done = run_cli(after / "data", sqlite_of(after), stage, downsample)
        assert done.returncode == 0, done.stderr
        resolution = "thumbnail" if downsample else "full"
        steps[(stage, downsample)] = Step(stage, downsample, state, after, run_seconds(sqlite_of(after), stage, resolution),
                                          stage_rows(sqlite_of(after), stage, resolution))
        state = after
    return steps


def copy_database(src_url: str, dst_url: str) -> None:
    """Every row of one database into a new one of the same schema (SQLite -> MariaDB): the
    kill tests on MariaDB start from the reference state too."""
    src = create_engine(src_url)
    dst = init_db(dst_url)
    try:
        with src.connect() as read, dst.begin() as write:
            for table in Base.metadata.sorted_tables:
                rows = [dict(r._mapping) for r in read.execute(select(table))]
                if rows:
                    write.execute(insert(table), rows)
    finally:
        src.dispose()
        dst.dispose()


def start_from(step: Step, tmp_path: Path, db_url: str) -> Path:
    """The data root (and database at `db_url`) as they were before the stage."""
    root = tmp_path / "data"
    shutil.copytree(step.before / "data", root)
    if db_url.startswith("sqlite"):
        shutil.copy2(step.before / "slidepipe.db", db_url.removeprefix("sqlite:///"))
    else:
        copy_database(sqlite_of(step.before), db_url)
    return root


# ---------------------------------------------------------------------------------------------
# what the files and rows must look like


VOLATILE_JSON_KEYS = {"date", "seconds", "queue"}
"""In a precomputed layer's `provenance`: when it was published, how long it took, and which
(randomly named) sub-queue ran igneous's tasks when it ran on a queue."""


def _without(value, keys):
    if isinstance(value, dict):
        return {k: _without(v, keys) for k, v in value.items() if k not in keys}
    if isinstance(value, list):
        return [_without(v, keys) for v in value]
    return value


def tree_digest(root: Path) -> dict[str, str]:
    """sha256 of every file under the data root, by relative path (HTML pages, which name the
    runs that made each file, by presence only; in the JSON files that record times or mtimes,
    those left out)."""
    out = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = path.relative_to(root).as_posix()
        if path.suffix == ".html":
            out[rel] = "web page"
        elif path.name == "provenance" and "neuroglancer_data" in rel:
            data = _without(json.loads(path.read_text()), VOLATILE_JSON_KEYS)
            out[rel] = hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()
        elif path.name == "zarr.json" and path.parent.name.endswith(".ome.zarr"):
            # its resume signature covers the input files' mtimes, which differ in a chain made anew
            data = _without(json.loads(path.read_text()), {"signature"})
            out[rel] = hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()
        else:
            out[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def rows_not_matching_disk(db_url: str, root: Path, removed: set[str], run_id: int | None = None) -> list[str]:
    """file_log output rows (of one run, or the newest row of every path) that do not describe
    the file on disk: a row for a file that is not complete, or missing though it is not one of
    the `removed` paths (temporaries the stage deletes itself, e.g. the step-1 precomputed layer)."""
    engine = create_engine(db_url)
    bad = []
    try:
        with session_scope(engine) as s:
            query = select(FileLog).where(FileLog.kind == "output").order_by(FileLog.id)
            if run_id is not None:
                query = query.where(FileLog.FK_pipeline_run_id == run_id)
            newest = {row.path: row for row in s.scalars(query)}
            for rel, row in newest.items():
                path = root / rel
                if not path.exists():
                    if rel not in removed:
                        bad.append(f"{rel}: missing")
                elif (path_stats(path)[0], path_stats(path)[2]) != (row.size, row.checksum):
                    bad.append(f"{rel}: differs from its row")
    finally:
        engine.dispose()
    return bad


def removed_paths(reference: Path, db_url: str) -> set[str]:
    """Paths recorded in file_log that the uninterrupted run left absent on purpose."""
    engine = create_engine(db_url)
    try:
        with session_scope(engine) as s:
            return {p for p in s.scalars(select(FileLog.path).where(FileLog.kind == "output")) if not (reference / p).exists()}
    finally:
        engine.dispose()


def temp_files(root: Path) -> list[str]:
    return [p.relative_to(root).as_posix() for p in root.rglob("*") if is_temp(p)]


# ---------------------------------------------------------------------------------------------
# killing a run at a seeded point


def _newest_run(engine, step: Step, after_id: int) -> PipelineRun | None:
    with session_scope(engine) as s:
        return s.scalars(select(PipelineRun).where(PipelineRun.stage == step.stage,
                                                   PipelineRun.resolution == step.resolution,
                                                   PipelineRun.id > after_id)
                         .order_by(PipelineRun.id.desc())).first()


def _recorded(engine, run_id: int) -> int:
    with session_scope(engine) as s:
        return s.scalar(select(func.count(FileLog.id)).where(FileLog.FK_pipeline_run_id == run_id))


def kill_at(step: Step, root: Path, db_url: str, delay: float, cap: int | None, last_id: int,
            log: Path) -> tuple[int, int, bool]:
    """Start the stage, SIGKILL its process group `delay` seconds after its run began (its
    pipeline_run row appeared), or once it recorded `cap` file_log rows if that comes first (so
    a run faster than the reference is still killed before its last task). Returns (run id,
    rows it recorded, whether the kill landed before the process ended by itself)."""
    engine = create_engine(db_url)
    with open(log, "w") as out:
        proc = subprocess.Popen(cli_args(root, db_url, step.stage, step.downsample), env=cli_env(),
                                start_new_session=True, stdout=out, stderr=subprocess.STDOUT)
    try:
        run = None
        deadline = time.monotonic() + 300
        while run is None and proc.poll() is None and time.monotonic() < deadline:
            run = _newest_run(engine, step, last_id)
            time.sleep(0.005)
        until = time.monotonic() + delay
        while run is not None and time.monotonic() < until and proc.poll() is None:
            if cap is not None and _recorded(engine, run.id) >= cap:
                break
            time.sleep(0.005)
        landed = proc.poll() is None
        if landed:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
        run = run or _newest_run(engine, step, last_id)
        assert run is not None, log.read_text()
        assert proc.returncode == (-signal.SIGKILL if landed else 0), log.read_text()
        return run.id, _recorded(engine, run.id), landed
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        engine.dispose()


def run_status(engine, run_id: int) -> tuple[str, str | None]:
    with session_scope(engine) as s:
        run = s.get(PipelineRun, run_id)
        return run.status, run.error


@pytest.mark.parametrize("stage,downsample", KILLED, ids=[f"{s}-{'thumbnail' if d else 'full'}" for s, d in KILLED])
def test_sigkill_at_three_seeded_points_then_rerun(reference, stage, downsample, db_url, tmp_path):
    if db_url.startswith("mysql") and (stage, downsample) not in ON_MARIADB_TOO:
        pytest.skip("on SQLite only, to keep the suite short: MariaDB runs the stages in ON_MARIADB_TOO")
    step = reference[(stage, downsample)]
    root = start_from(step, tmp_path, db_url)
    rng = random.Random(f"{SEED}:{stage}:{step.resolution}")
    engine = create_engine(db_url)
    removed = removed_paths(step.after / "data", sqlite_of(step.after))
    killed: list[int] = []
    last_id = 0
    for point in range(3):
        left = step.rows - stage_rows(db_url, stage, step.resolution)
        delay = rng.uniform(0, 0.8) * step.seconds
        run_id, recorded, landed = kill_at(step, root, db_url, delay, left - 1 if left > 1 else None, last_id,
                                           tmp_path / f"kill{point}.log")
        last_id = run_id
        state, _ = run_status(engine, run_id)
        print(f"{stage} {step.resolution}: point {point}: {delay:.3f} s of {step.seconds:.3f} s ({left} rows to do) -> "
              f"{'SIGKILL' if landed else 'ended'}, pipeline_run {run_id} {state} with {recorded} rows recorded")
        # Whatever the killed run recorded is complete on disk.
        assert rows_not_matching_disk(db_url, root, removed, run_id) == [], f"kill {point} after {recorded} rows"
        if state == "success":
            break  # the kill came after the run's work (or the run ended): nothing left to interrupt
        assert landed and state == "running"
        if not killed:  # status names the killed run and its lock as a runner that is gone
            shown = subprocess.run(cli_args(root, db_url, "status", True), capture_output=True, text=True, env=cli_env())
            assert shown.returncode == 0, shown.stderr
            assert f"run {run_id} " in shown.stdout and "is gone" in shown.stdout, shown.stdout
        killed.append(run_id)
    assert killed, "no seeded point interrupted the stage"

    rerun = run_cli(root, db_url, stage, downsample)
    assert rerun.returncode == 0, rerun.stderr
    assert temp_files(root) == []
    assert rows_not_matching_disk(db_url, root, removed) == []
    expected = tree_digest(step.after / "data")
    got = tree_digest(root)
    assert sorted(set(got) ^ set(expected)) == []
    assert [p for p in expected if got[p] != expected[p]] == []
    try:
        for run_id in killed:
            state, error = run_status(engine, run_id)
            assert state == "failed" and ("taken over" in error or "killed" in error), (run_id, error)
    finally:
        engine.dispose()


# ---------------------------------------------------------------------------------------------
# the database becoming unreachable mid-run (MariaDB through a proxy the test closes)


class Proxy:
    """A TCP proxy in front of the MariaDB server, so the test can take the database away from
    a running stage: `close` resets every connection and refuses new ones, as a server that
    went down or a network that broke would."""

    def __init__(self, host: str, port: int):
        self.target = (host, port)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.05)
        self.port = self.listener.getsockname()[1]
        self.sockets: list[socket.socket] = []
        self.closed = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self.closed.is_set():
            try:
                client, _ = self.listener.accept()
            except (TimeoutError, socket.timeout):
                continue
            except OSError:
                return
            upstream = socket.create_connection(self.target)
            self.sockets += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for s in (source, sink):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self.closed.set()
        self.listener.close()
        for s in self.sockets:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()


def outputs_without_inputs(db_url: str, run_id: int) -> list[str]:
    """Output rows of a run that lack their input links (a task's rows and links are one
    transaction: a row without them would be half-written)."""
    engine = create_engine(db_url)
    try:
        with session_scope(engine) as s:
            return [row.path for row in s.scalars(select(FileLog).where(FileLog.FK_pipeline_run_id == run_id))
                    if not row.inputs]
    finally:
        engine.dispose()


@pytest.mark.mysql
def test_database_unreachable_mid_run(reference, tmp_path, _mysql_server):
    step = reference[("histogram", True)]  # every task has inputs; 14 rows over ~1.7 s
    name = f"slidepipe_test_{uuid.uuid4().hex[:12]}"
    direct = _mysql_server.set(database=name).render_as_string(hide_password=False)
    proxy = Proxy(_mysql_server.host or "127.0.0.1", _mysql_server.port or 3306)
    via = _mysql_server.set(host="127.0.0.1", port=proxy.port, database=name).render_as_string(hide_password=False)
    try:
        root = tmp_path / "data"
        shutil.copytree(step.before / "data", root)
        copy_database(sqlite_of(step.before), direct)
        engine = create_engine(direct)
        proc = subprocess.Popen(cli_args(root, via, step.stage, step.downsample), env=cli_env(), start_new_session=True,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        run = None
        deadline = time.monotonic() + 120
        while proc.poll() is None and time.monotonic() < deadline:
            run = run or _newest_run(engine, step, 0)
            if run is not None and _recorded(engine, run.id) >= 2:
                break
            time.sleep(0.005)
        proxy.close()
        out, err = proc.communicate(timeout=120)
        assert run is not None and _recorded(engine, run.id) < step.rows, "the stage ended before the database went"
        engine.dispose()

        print(err)
        assert proc.returncode == 3, err
        errors = [line for line in err.splitlines() if line.startswith("error:")]
        assert len(errors) == 1, err
        assert errors[0].startswith(f"error: database mysql+pymysql://root@127.0.0.1:{proxy.port}/{name}: "), err
        assert "Lost connection" in errors[0] or "Can't connect" in errors[0], errors[0]
        assert "Traceback" not in err and "[SQL:" not in err, err
        # What the run recorded before the database went is whole: files complete, inputs linked.
        removed = removed_paths(step.after / "data", sqlite_of(step.after))
        assert rows_not_matching_disk(direct, root, removed, run.id) == []
        assert outputs_without_inputs(direct, run.id) == []

        rerun = run_cli(root, direct, step.stage, step.downsample)
        assert rerun.returncode == 0, rerun.stderr
        assert temp_files(root) == []
        assert tree_digest(root) == tree_digest(step.after / "data")
        engine = create_engine(direct)
        state, error = run_status(engine, run.id)
        engine.dispose()
        assert state == "failed" and "taken over" in error, error
    finally:
        proxy.close()
        _drop_database(_mysql_server, name)


# ---------------------------------------------------------------------------------------------
# the same on the task queue: the runner waits, `create_pipeline worker`s run the tasks

QUEUE_LEASE = 2
"""Seconds before a task of a killed worker is given to the next one (the worker's --lease-seconds)."""
PAUSED = "full_masked/DEMO_slide01_S2.tif"
"""The full-resolution mask whose writer (a worker) is SIGKILLed while it pauses before the rename
(a stage the seeded points leave alone, so its run ends by itself: `pause_queued_stage`)."""
NO_DB = {"SLIDEPIPE_DB_URL": "mysql+pymysql://nobody@127.0.0.1:1/none"}
"""Workers never open the database: they are given one that cannot be reached."""


class Workers:
    """The queued chain's two `create_pipeline worker` slots, each restarted as often as it is
    killed: slot 0 runs from one directory and sees the data root where the runner does, slot 1
    from another and through a symlink (as on another machine), so a task must carry paths
    relative to the data root. Each process logs to a file of its own."""

    def __init__(self, queue: str, roots: tuple[Path, Path], logs: Path):
        self.queue, self.roots, self.logs = queue, roots, logs
        self.procs: list[subprocess.Popen | None] = [None, None]
        self.started: list[list[Path]] = [[], []]

    def start(self, slot: int, env: dict | None = None) -> subprocess.Popen:
        log = self.logs / f"worker{slot}-{len(self.started[slot])}.log"
        self.started[slot].append(log)
        cwd = self.logs / f"cwd{slot}"
        cwd.mkdir(exist_ok=True)
        with open(log, "w") as out:
            self.procs[slot] = subprocess.Popen(
                [sys.executable, "-m", "pipeline", "worker", "--queue", self.queue, "--data-root", str(self.roots[slot]),
                 "--lease-seconds", str(QUEUE_LEASE)], cwd=cwd, env={**cli_env(), **NO_DB, **(env or {})},
                start_new_session=True, stdout=out, stderr=subprocess.STDOUT)
        return self.procs[slot]

    def kill(self, slot: int) -> bool:
        """SIGKILL the slot's worker; True when it was running."""
        return killpg(self.procs[slot])

    def stop(self) -> None:
        """SIGTERM both (each says how many tasks it ran), SIGKILL what does not end."""
        for proc in self.procs:
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            if proc is not None:
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    killpg(proc)


def killpg(proc: subprocess.Popen) -> bool:
    """SIGKILL a process and its group; True when it was still running."""
    running = proc.poll() is None
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    return running


def start_queued(root: Path, db_url: str, step: Step, queue: str, log: Path) -> subprocess.Popen:
    with open(log, "w") as out:
        return subprocess.Popen([*cli_args(root, db_url, step.stage, step.downsample), "--queue", queue], env=cli_env(),
                                start_new_session=True, stdout=out, stderr=subprocess.STDOUT)


def wait_until(predicate, what: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.005)


def _recorded_path(engine, run_id: int, suffix: str) -> bool:
    with session_scope(engine) as s:
        return s.scalar(select(func.count(FileLog.id)).where(FileLog.FK_pipeline_run_id == run_id,
                                                             FileLog.path.endswith(suffix))) > 0


def kill_queued_stage(step: Step, root: Path, db_url: str, queue: str, workers: Workers, logs: Path,
                      last_id: int) -> tuple[int, int | None]:
    """Run one stage through the queue, SIGKILLed at three seeded points: a point is a drawn
    fraction (0-0.8) of the stage's duration in the reference run, counted from the run's start
    (the last one at the latest when the runner recorded all but one of the rows). Points 0
    and 1 kill a worker (slot 0, then slot 1; the other worker redoes its task
    after the lease, the killed one is restarted), point 2 the runner and the worker of slot 0;
    then a rerun completes the stage. Returns (the last run's id, the killed runner's run id or
    None when the stage ended before point 2)."""
    rng = random.Random(f"{SEED}:queue:{step.stage}:{step.resolution}")
    delays = sorted(rng.uniform(0, 0.8) * step.seconds for _ in range(3))
    engine = create_engine(db_url)
    try:
        runner = start_queued(root, db_url, step, queue, logs / f"{step.stage}-{step.resolution}.log")
        wait_until(lambda: runner.poll() is not None or _newest_run(engine, step, last_id) is not None, "the run")
        run = _newest_run(engine, step, last_id)
        assert run is not None, (logs / f"{step.stage}-{step.resolution}.log").read_text()
        began = time.monotonic()
        for point, delay in enumerate(delays):
            cap = step.rows - 1 if point == 2 and step.rows > 1 else step.rows
            wait_until(lambda: runner.poll() is not None or time.monotonic() - began >= delay
                       or _recorded(engine, run.id) >= cap, "the kill point")
            slot = point % 2
            left = _recorded(engine, run.id) < step.rows
            hit = (killpg(runner) if point == 2 else True) and workers.kill(slot) and left
            workers.start(slot)
            print(f"queue {step.stage} {step.resolution}: point {point}: {delay:.3f} s of {step.seconds:.3f} s: "
                  f"{'killed' if hit else 'no work left'} with {_recorded(engine, run.id)} of {step.rows} rows recorded")
        runner.wait(timeout=300)
        assert rows_not_matching_disk(db_url, root, set(), run.id) == []
        state, _ = run_status(engine, run.id)
        if state == "success":
            assert runner.returncode == 0
            return run.id, None
        assert state == "running" and runner.returncode == -signal.SIGKILL, state
        rerun = subprocess.run([*cli_args(root, db_url, step.stage, step.downsample), "--queue", queue], env=cli_env(),
                               capture_output=True, text=True, timeout=300)
        assert rerun.returncode == 0, rerun.stderr
        return _newest_run(engine, step, run.id).id, run.id
    finally:
        engine.dispose()


def pause_queued_stage(step: Step, root: Path, db_url: str, queue: str, workers: Workers, logs: Path) -> Path:
    """Run one stage through the queue with the worker of slot 0 alone and paused (the test hook)
    with `PAUSED` written under its temporary name: it renews its lease, so the worker of slot 1,
    started then, must leave that task alone for twice the lease and more; SIGKILLed, it stops
    renewing, and slot 1 (the data root through a symlink) redoes the task after the lease. The
    partial file is never recorded. Returns it (the stage's next run clears it)."""
    engine = create_engine(db_url)
    try:
        for slot in (0, 1):
            workers.kill(slot)
        log = logs / f"{step.stage}-{step.resolution}.log"
        paused = workers.start(0, {PAUSE_ENV: PAUSED})
        runner = start_queued(root, db_url, step, queue, log)
        wait_until(lambda: "paused before renaming" in workers.started[0][-1].read_text(), "the pause hook")
        run = _newest_run(engine, step, 0)
        partial = root / f"{ANIMAL}/preps/masks/CH1/{PAUSED}".replace(".tif", f".tmp-{paused.pid}.tif")
        assert partial.is_file(), sorted(p.name for p in partial.parent.iterdir())
        workers.start(1)
        time.sleep(2 * QUEUE_LEASE + 1)
        assert not _recorded_path(engine, run.id, PAUSED), "the task of a live worker was given to another one"
        assert workers.kill(0)
        wait_until(lambda: _recorded_path(engine, run.id, PAUSED), "the paused task redone", 60)
        workers.start(0)
        assert runner.wait(timeout=300) == 0, log.read_text()
        assert partial.is_file() and not _recorded_path(engine, run.id, partial.name)
        return partial
    finally:
        engine.dispose()


def run_queued(root: Path, db_url: str, step: Step, queue: str) -> None:
    done = subprocess.run([*cli_args(root, db_url, step.stage, step.downsample), "--queue", queue], env=cli_env(),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, (step.stage, step.resolution, done.stderr)


@pytest.mark.mysql
def test_every_stage_through_a_queue_killed_at_seeded_points_equals_the_local_chain(reference, tmp_path, _mysql_server):
    """The tiny sample through every stage of CHAIN on an fq:// queue with two workers and
    MariaDB, each stage of KILLED SIGKILLed at three seeded points (`kill_queued_stage`), must
    end with the reference chain's files (byte for byte) and file_log rows, every killed run
    recorded as failed; then a task that fails in a worker is reported with its file and reason."""
    name = f"slidepipe_test_{uuid.uuid4().hex[:12]}"
    db_url = _mysql_server.set(database=name).render_as_string(hide_password=False)
    root = tmp_path / "shared" / "data"
    shutil.copytree(reference[CHAIN[0]].before / "data", root)
    (tmp_path / "elsewhere").mkdir()
    mounted = tmp_path / "elsewhere" / "mnt"  # the same data root at another path, as on another machine
    mounted.symlink_to(root)
    queue = f"fq://{tmp_path / 'queue'}"
    logs = tmp_path / "logs"
    logs.mkdir()
    workers = Workers(queue, (root, mounted), logs)
    killed: list[int] = []
    try:
        copy_database(sqlite_of(reference[CHAIN[0]].before), db_url)
        workers.start(0)
        workers.start(1)
        last_id = 0
        for stage, downsample in CHAIN:
            step = reference[(stage, downsample)]
            if (stage, downsample) in KILLED:
                last_id, run_id = kill_queued_stage(step, root, db_url, queue, workers, logs, last_id)
                killed += [run_id] if run_id else []
            elif (stage, downsample) == ("mask", False):
                partial = pause_queued_stage(step, root, db_url, queue, workers, logs)
            else:
                run_queued(root, db_url, step, queue)
        # A task that fails in a worker: the runner names the file (as the runner sees it) and the reason.
        broken = root / "DEMO/preps/thumbnail_original/DEMO_slide01_S1_C1.tif"
        saved = broken.read_bytes()
        broken.write_bytes(b"not a TIFF")
        failed = subprocess.run([*cli_args(root, db_url, "mask", True), "--queue", queue], env=cli_env(),
                                capture_output=True, text=True, timeout=300)
        broken.write_bytes(saved)
    finally:
        workers.stop()
        for log in sorted(logs.glob("*.log")):  # shown when the test fails
            print(f"--- {log.name}:\n{log.read_text()}")
    try:
        assert failed.returncode == 1, failed.stderr
        errors = [line for line in failed.stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and errors[0].startswith(f"error: {broken}: "), failed.stderr
        assert "1 failed" in failed.stderr

        final = reference[CHAIN[-1]].after
        # The killed writers' temporary files were cleared by the reruns, but for the paused one's.
        assert temp_files(root) == [partial.relative_to(root).as_posix()]
        partial.unlink()
        got, expected = tree_digest(root), tree_digest(final / "data")
        assert sorted(set(got) ^ set(expected)) == []  # e.g. no result files of a killed run's batch
        assert [p for p in expected if got[p] != expected[p]] == []
        assert not any((tmp_path / "queue" / "builds").iterdir()), "every batch removed its sub-queue"

        # file_log: the rows of the reference chain, each once, whichever run (killed or not) recorded
        # it; the failing rerun added the broken thumbnail as an external input, nothing else.
        runs, logs_rows = rows(db_url, root)
        ref_runs, ref_logs = rows(sqlite_of(final), final / "data")
        broken_rel = broken.relative_to(root).as_posix()
        extra = [r for r in logs_rows if r[0] == broken_rel and r[1] == "external" and r not in ref_logs]
        assert len(extra) <= 1 and [r for r in logs_rows if r not in extra] == ref_logs
        # pipeline_run: per stage the killed runs (failed), then one success with the reference's task count.
        engine = create_engine(db_url)
        try:
            for run_id in killed:
                state, error = run_status(engine, run_id)
                assert state == "failed" and "taken over" in error, (run_id, error)
        finally:
            engine.dispose()
        assert runs[-1][:4] == ("mask", 1, "thumbnail", "failed") and runs[-1][5:] == (0, 5, 1)
        succeeded = [r for r in runs[:-1] if r[3] == "success"]
        assert [r[:3] + r[4:5] for r in succeeded] == [r[:3] + r[4:5] for r in ref_runs]
        assert all(r[3] == "failed" for r in runs[:-1] if r[3] != "success")
        assert len(runs) - 1 - len(succeeded) == len(killed)
        print(f"{len(killed)} runners killed and rerun: {killed}")
    finally:
        _drop_database(_mysql_server, name)
