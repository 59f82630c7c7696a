"""Kill safety of every stage (issue 9), through the real command line on the tiny sample.

Each stage is run from the state the uninterrupted reference chain had before it, SIGKILLed
(runner and pool: the whole process group, so nothing runs a `finally`) at three points drawn
from a seed, and run again. The rerun must exit 0 and leave exactly the files of the reference
run (sha256 of every file; web pages, which name run ids, aside), no temp file, no `file_log`
row describing a file other than the one on disk, and every killed run recorded as failed.

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
from pipeline.atomic import is_temp
from pipeline.runner import path_stats
from pipeline.sample import build_sample
from tests.conftest import _drop_database

pytestmark = pytest.mark.filterwarnings("ignore:builtin type [Ss]wig")

REPO = Path(__file__).resolve().parents[1]
SEED = 9  # issue 9
ANIMAL = "DEMO"

THUMBNAIL_CHAIN = ["extract", "mask", "clean", "histogram", "align", "create_metrics", "neuroglancer", "omezarr"]
CHAIN = [(s, True) for s in THUMBNAIL_CHAIN] + [(s, False) for s in ("mask", "clean", "align", "neuroglancer")]
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
    runs that made each file, by presence only)."""
    out = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = path.relative_to(root).as_posix()
        if path.suffix == ".html":
            out[rel] = "web page"
        elif path.name == "provenance" and "neuroglancer_data" in rel:
            data = _without(json.loads(path.read_text()), VOLATILE_JSON_KEYS)
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


def start_worker(queue_url: str, root: Path, log: Path) -> subprocess.Popen:
    with open(log, "a") as out:
        return subprocess.Popen([sys.executable, "-m", "pipeline", "worker", "--queue", queue_url, "--data-root", str(root),
                                 "--lease-seconds", str(QUEUE_LEASE)], env=cli_env(), start_new_session=True,
                                stdout=out, stderr=subprocess.STDOUT)


def killpg(proc: subprocess.Popen) -> bool:
    """SIGKILL a process and its group; True when it was still running."""
    running = proc.poll() is None
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    return running


@pytest.mark.parametrize("stage", ["histogram", "neuroglancer"])
def test_queue_worker_and_runner_killed_at_seeded_points_then_rerun(reference, stage, sqlite_url, tmp_path):
    """Points 0 and 1 SIGKILL the worker mid-stage (the next worker redoes its task after the
    lease), point 2 the runner and the worker; a rerun with a new worker completes. A point is
    a drawn number of rows the runner recorded, then a drawn delay up to 1 s."""
    step = reference[(stage, True)]
    root = start_from(step, tmp_path, sqlite_url)
    queue = f"fq://{tmp_path / 'queue'}"
    rng = random.Random(f"{SEED}:queue:{stage}")
    engine = create_engine(sqlite_url)
    procs: list[subprocess.Popen] = []
    try:
        with open(tmp_path / "runner.log", "w") as out:
            runner = subprocess.Popen([*cli_args(root, sqlite_url, stage, True), "--queue", queue], env=cli_env(),
                                      start_new_session=True, stdout=out, stderr=subprocess.STDOUT)
        procs.append(runner)
        worker = start_worker(queue, root, tmp_path / "workers.log")
        procs.append(worker)
        run = None
        while run is None and runner.poll() is None:
            run = _newest_run(engine, step, 0)
            time.sleep(0.005)
        assert run is not None, (tmp_path / "runner.log").read_text()
        hits = []
        thresholds = sorted(rng.sample(range(step.rows - 1), 3))  # rows recorded before each kill
        for point, threshold in enumerate(thresholds):
            while runner.poll() is None and _recorded(engine, run.id) < threshold:
                time.sleep(0.005)
            time.sleep(rng.uniform(0, 0.1))  # results arrive in bursts (the runner polls every 0.2 s)
            hits.append(_recorded(engine, run.id) < step.rows and killpg(worker))  # killed with work left
            if point == 2:
                killpg(worker)
                hits[-1] = killpg(runner) and hits[-1]
            else:
                killpg(worker)
                worker = start_worker(queue, root, tmp_path / "workers.log")
                procs.append(worker)
            print(f"queue {stage}: point {point}: after {threshold} rows: {'killed' if hits[-1] else 'no work left'} with "
                  f"{_recorded(engine, run.id)} rows recorded")
        assert hits[0], "the first point came after the stage's work"
        assert rows_not_matching_disk(sqlite_url, root, set(), run.id) == []

        worker = start_worker(queue, root, tmp_path / "workers.log")
        procs.append(worker)
        rerun = subprocess.run([*cli_args(root, sqlite_url, stage, True), "--queue", queue], env=cli_env(),
                               capture_output=True, text=True, timeout=300)
        assert rerun.returncode == 0, rerun.stderr
        killpg(worker)
        assert temp_files(root) == []
        removed = removed_paths(step.after / "data", sqlite_of(step.after))
        assert rows_not_matching_disk(sqlite_url, root, removed) == []
        got, expected = tree_digest(root), tree_digest(step.after / "data")
        assert sorted(set(got) ^ set(expected)) == []  # e.g. no result files of the killed run's batch
        assert [p for p in expected if got[p] != expected[p]] == []
        if hits[2]:
            state, error = run_status(engine, run.id)
            assert state == "failed" and "taken over" in error, error
    finally:
        for proc in procs:
            killpg(proc)
        engine.dispose()
