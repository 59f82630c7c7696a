"""Every stage of the tiny sample brain through an fq:// task queue, with MariaDB.

Two `create_pipeline worker` processes, started from different directories and one of them
seeing the data root through a symlink (so a task must carry paths relative to the data root),
drain the queue for every stage at both resolutions. The outputs must equal a local run's byte
for byte, and file_log and pipeline_run must hold the same rows. On the way a worker is SIGKILLed
while it writes a cleaned section (the test-only pause hook, pipeline.atomic.PAUSE_ENV): the other
worker redoes that task after the lease and its partial file is never recorded. At the end a task
that fails in a worker is reported by the runner with the file and the reason, exit status 1.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from sqlalchemy import select

from db.models import FileLog, PipelineRun
from db.session import init_db, session_scope
from pipeline.atomic import PAUSE_ENV, is_temp, sha256_file
from pipeline.create_pipeline import main
from pipeline.sample import build_sample
from tests.conftest import _drop_database
from tests.helpers_queue import REPO, start_worker, stop

pytestmark = pytest.mark.filterwarnings("ignore:builtin type [Ss]wig")  # ITK's SWIG wrappers

STAGES = ("extract", "mask", "clean", "histogram", "align", "create_metrics", "neuroglancer", "omezarr")
RUNS = [(stage, downsample) for downsample in ("true", "false") for stage in STAGES]
KILLED = "thumbnail_cleaned/DEMO_slide01_S2.tif"  # the cleaned thumbnail whose writer is killed


@pytest.fixture
def two_databases(_mysql_server):
    names = [f"slidepipe_test_{uuid.uuid4().hex[:12]}" for _ in range(2)]
    yield [_mysql_server.set(database=n).render_as_string(hide_password=False) for n in names]
    for name in names:
        _drop_database(_mysql_server, name)


def runner(root: Path, db_url: str, stage: str, downsample: str, queue: str) -> subprocess.Popen:
    args = [sys.executable, "-m", "pipeline", "--animal", "DEMO", "--task", stage, "--downsample", downsample,
            "--data-root", str(root), "--db-url", db_url, "--queue", queue, "--verify-sample", "0"]
    return subprocess.Popen(args, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def queued(root: Path, db_url: str, stage: str, downsample: str, queue: str) -> subprocess.CompletedProcess:
    proc = runner(root, db_url, stage, downsample, queue)
    out, err = proc.communicate(timeout=300)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def wait_for(predicate, what: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.1)


def files(root: Path) -> dict[str, str]:
    """sha256 of every file of the animal; in the files that record times, those removed."""
    found = {}
    for path in sorted((root / "DEMO").rglob("*")):
        if not path.is_file():
            continue
        rel = path.relative_to(root).as_posix()
        if rel == "DEMO/www/provenance.html":
            continue  # the database as a page: run dates, and which file of a folder finished first
        if path.name == "provenance" and "neuroglancer_data" in rel:
            # igneous's and our processing record: the date, durations and the build's sub-queue name
            found[rel] = json.dumps(_without(json.loads(path.read_text()), {"date", "seconds", "queue"}), sort_keys=True)
        elif path.name == "zarr.json" and path.parent.name.endswith(".ome.zarr"):
            # the resume signature covers the input files' mtimes
            found[rel] = json.dumps(_without(json.loads(path.read_text()), {"signature"}), sort_keys=True)
        else:
            found[rel] = sha256_file(path)
    return found


def _without(value, keys: set[str]):
    if isinstance(value, dict):
        return {k: _without(v, keys) for k, v in value.items() if k not in keys}
    if isinstance(value, list):
        return [_without(v, keys) for v in value]
    return value


def rows(db_url: str, root: Path) -> tuple[list, list]:
    """pipeline_run and file_log as comparable tuples (no ids, times, hosts or timings). Sizes and
    checksums of files still there (those `files` compares); not of the step-1 markers the
    neuroglancer stage deletes (they hold timings) nor of directories (their provenance file
    holds the date)."""
    with session_scope(init_db(db_url)) as s:
        runs = [(r.stage, r.channel, r.resolution, r.status, r.tasks_total, r.tasks_run, r.tasks_skipped,
                 r.tasks_failed) for r in s.scalars(select(PipelineRun).order_by(PipelineRun.id))]
        logs = []
        for f in s.scalars(select(FileLog)):
            exact = (root / f.path).is_file()
            logs.append((f.path, f.kind, f.task_key, f.fingerprint, f.run.stage if f.run else None,
                         f.run.resolution if f.run else None, f.size if exact else None,
                         f.checksum if exact else None, tuple(sorted(i.path for i in f.inputs))))
    return runs, sorted(logs, key=repr)


@pytest.mark.mysql
def test_every_stage_through_a_queue_with_two_workers_equals_a_local_run(tmp_path, two_databases):
    local_db, queue_db = two_databases
    sample = tmp_path / "sample"
    build_sample(sample, animal="DEMO", seed=0, size="tiny")
    local_root, queue_root = tmp_path / "local", tmp_path / "shared" / "data"
    shutil.copytree(sample, local_root)
    shutil.copytree(sample, queue_root)
    (tmp_path / "elsewhere").mkdir()
    mounted = tmp_path / "elsewhere" / "mnt"  # the same data root at another path, as on another machine
    mounted.symlink_to(queue_root)
    queue = "fq://" + str(tmp_path / "queue")

    started = time.monotonic()
    for stage, downsample in RUNS:
        assert main(["--animal", "DEMO", "--task", stage, "--downsample", downsample, "--data-root", str(local_root),
                     "--db-url", local_db, "--workers", "2", "--verify-sample", "0"]) == 0, (stage, downsample)
    local_seconds = time.monotonic() - started

    # Workers never open the database: give them one that cannot be reached.
    no_db = {"SLIDEPIPE_DB_URL": "mysql+pymysql://nobody@127.0.0.1:1/none"}
    started = time.monotonic()
    first = start_worker(queue, queue_root, tmp_path / "cwd1", "--lease-seconds", "3", log=tmp_path / "first.log",
                         env={**no_db, PAUSE_ENV: KILLED})
    workers = [first]
    try:
        for stage, downsample in RUNS[:2]:  # extract, mask: the first worker alone
            done = queued(queue_root, queue_db, stage, downsample, queue)
            assert done.returncode == 0, done.stderr
        clean = runner(queue_root, queue_db, "clean", "true", queue)
        wait_for(lambda: "paused before renaming" in (tmp_path / "first.log").read_text(), "the pause hook")
        partial = [p for p in (queue_root / "DEMO/preps/CH1/thumbnail_cleaned").iterdir() if is_temp(p)]
        assert [p.name for p in partial] == [f"DEMO_slide01_S2.tmp-{first.pid}.tif"]
        second = start_worker(queue, mounted, tmp_path / "cwd2", "--lease-seconds", "60", log=tmp_path / "second.log",
                              env=no_db)
        workers.append(second)
        first.send_signal(signal.SIGKILL)
        first.wait()
        out, err = clean.communicate(timeout=120)
        assert clean.returncode == 0, err
        third = start_worker(queue, queue_root, tmp_path / "cwd1", "--lease-seconds", "60", log=tmp_path / "third.log",
                             env=no_db)
        workers.append(third)
        for stage, downsample in RUNS[3:]:
            done = queued(queue_root, queue_db, stage, downsample, queue)
            assert done.returncode == 0, (stage, downsample, done.stderr)
        queue_seconds = time.monotonic() - started

        # A task that fails in a worker: the runner names the file (as the runner sees it) and the reason.
        broken = queue_root / "DEMO/preps/thumbnail_original/DEMO_slide01_S1_C1.tif"
        saved = broken.read_bytes()
        broken.write_bytes(b"not a TIFF")
        failed = queued(queue_root, queue_db, "mask", "true", queue)
        broken.write_bytes(saved)
    finally:
        for proc in workers:
            stop(proc)
        for name in ("first", "second", "third"):  # shown when the test fails
            log = tmp_path / f"{name}.log"
            print(f"--- {name} worker:\n{log.read_text() if log.exists() else '(not started)'}")
    assert failed.returncode == 1, failed.stderr
    errors = [line for line in failed.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith(f"error: {broken}: "), failed.stderr
    assert "1 failed" in failed.stderr

    # The killed task was redone by the worker that sees the data root through the symlink.
    assert "paused before renaming" not in (tmp_path / "second.log").read_text()
    reports = {name: (tmp_path / f"{name}.log").read_text().splitlines()[-1] for name in ("second", "third")}
    for name, line in reports.items():
        count = int(line.split(": ")[1].split()[0])
        assert count > 0, f"the {name} worker ran none of the stage tasks: {line}"

    # Byte-identical outputs; the killed writer's temporary file is the one extra file, never recorded.
    local_files, queue_files = files(local_root), files(queue_root)
    extra = sorted(set(queue_files) - set(local_files))
    assert extra == [p.relative_to(queue_root).as_posix() for p in partial]
    assert {k: v for k, v in queue_files.items() if k not in extra} == local_files
    local_runs, local_logs = rows(local_db, local_root)
    queue_runs, queue_logs = rows(queue_db, queue_root)
    assert queue_runs[:len(local_runs)] == local_runs, "the same runs with the same counts"
    assert queue_runs[-1][:4] == ("mask", 1, "thumbnail", "failed") and queue_runs[-1][5:] == (0, 5, 1)
    assert not any(is_temp(row[0]) for row in queue_logs)
    broken_rel = broken.relative_to(queue_root).as_posix()
    # The failing rerun recorded the broken slide thumbnail as an external input; nothing else differs.
    assert [r for r in queue_logs if r not in local_logs] == [r for r in queue_logs if r[0] == broken_rel and r[1] == "external"][:1]
    assert len(local_logs) > 100
    assert not any((queue_root / ".queue").iterdir()), "every result file was recorded and deleted"
    assert not any((tmp_path / "queue" / "builds").iterdir()), "every batch removed its sub-queue"
    print(f"local run {local_seconds:.1f} s, queued run (2 workers) {queue_seconds:.1f} s")


def test_queued_tasks_carry_paths_relative_to_the_data_root(tmp_path):
    """What goes onto the queue names no path of the runner's machine; a worker that sees the data
    root elsewhere gets its own paths, and what comes back is translated to the runner's again."""
    from pipeline.queued import local, portable, read_outcome, task_spec
    from pipeline.stages.clean import clean_thumbnail

    here, there = tmp_path / "runner" / "data", tmp_path / "worker" / "mnt"
    section = str(here / "DEMO/preps/thumbnail_original/S1_C1.tif")
    spec = task_spec("DEMO-clean-1-x", "clean:S1", clean_thumbnail, {"source": section, "geometry": {"w": 3},
                     "queue_url": "fq:///q", "parts": [str(here / "a"), "free text"]}, [str(here / "DEMO/out.tif")],
                     section, False, here, "fq:///q")
    assert str(here) not in json.dumps(spec)
    assert spec["func"] == ["pipeline.stages.clean", "clean_thumbnail"]
    kwargs = local(spec["kwargs"], there, "fq:///elsewhere/q")
    assert kwargs == {"source": str(there / "DEMO/preps/thumbnail_original/S1_C1.tif"), "geometry": {"w": 3},
                      "queue_url": "fq:///elsewhere/q", "parts": [str(there / "a"), "free text"]}
    result = tmp_path / "result.json"
    result.write_text(json.dumps({"key": "clean:S1", "outcome": ["ok", portable({"made": str(there / "DEMO/x")}, there),
                                                                [[1, 2, "c"]]]}))
    assert read_outcome(result, [str(here / "DEMO/out.tif")], here) == (
        "clean:S1", ("ok", {"made": str(here / "DEMO/x")}, {str(here / "DEMO/out.tif"): (1, 2, "c")}))


def test_runner_without_workers_says_what_it_waits_for_and_sigterm_records_the_run(tmp_path, db_url):
    from db.models import StageLock

    root = tmp_path / "data"
    build_sample(root, animal="DEMO", seed=0, size="tiny")
    queue = "fq://" + str(tmp_path / "queue")
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipeline", "--animal", "DEMO", "--task", "extract", "--data-root", str(root),
         "--db-url", db_url, "--queue", queue], cwd=REPO, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONPATH": str(REPO), "SLIDEPIPE_QUEUE_QUIET_SECONDS": "1"})
    lines = []
    for line in proc.stderr:
        lines.append(line)
        if line.startswith("waiting for "):
            break
    assert "task(s) on " + queue in lines[-1] and "DEMO_slide01.czi" in lines[-1], lines
    assert "create_pipeline worker --queue " + queue in lines[-1]
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGTERM
    with session_scope(init_db(db_url)) as s:
        run = s.scalars(select(PipelineRun)).one()
        assert run.status == "failed" and "terminated (SIGTERM)" in run.error
        assert s.scalars(select(StageLock)).first() is None, "the lock is released at once"
    assert not any((tmp_path / "queue" / "builds").iterdir()), "its tasks are taken off the queue"
    assert not any((root / ".queue").iterdir())


@pytest.fixture
def sqs_server(tmp_path, monkeypatch):
    """moto's SQS-compatible server on a free local port, and the environment that points boto3
    (which python-task-queue's sqs:// uses) at it, for this process and the subprocesses."""
    pytest.importorskip("moto")
    import socket as sockets

    import boto3

    with sockets.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-p", str(port)], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    for name, value in {"AWS_ENDPOINT_URL_SQS": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "test",
                        "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(name, value)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                with sockets.create_connection(("127.0.0.1", port), timeout=1):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    pytest.fail("moto's SQS server did not start")
                time.sleep(0.1)
        boto3.client("sqs", region_name="us-east-1").create_queue(QueueName="slidepipe-test")
        yield "sqs://slidepipe-test"
    finally:
        server.terminate()
        server.wait(timeout=10)


def test_extract_and_mask_through_an_sqs_queue_equal_a_local_run(tmp_path, sqlite_url, sqs_server):
    sample = tmp_path / "sample"
    build_sample(sample, animal="DEMO", seed=0, size="tiny")
    local_root, queue_root = tmp_path / "local", tmp_path / "queued"
    shutil.copytree(sample, local_root)
    shutil.copytree(sample, queue_root)
    local_db = f"sqlite:///{tmp_path / 'local.db'}"
    for stage in ("extract", "mask"):
        assert main(["--animal", "DEMO", "--task", stage, "--data-root", str(local_root), "--db-url", local_db,
                     "--workers", "2"]) == 0
    proc = start_worker(sqs_server, queue_root, tmp_path / "cwd", "--lease-seconds", "60", log=tmp_path / "worker.log")
    try:
        for stage in ("extract", "mask"):
            done = queued(queue_root, sqlite_url, stage, "true", sqs_server)
            assert done.returncode == 0, done.stderr
    finally:
        stop(proc)
    assert files(queue_root) == files(local_root)
    assert rows(sqlite_url, queue_root) == rows(local_db, local_root)
    assert (tmp_path / "worker.log").read_text().splitlines()[-1].endswith(": 20 stage task(s) run")
