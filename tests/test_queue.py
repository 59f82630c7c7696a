"""Stages through a task queue: what a task carries, a runner without workers, sqs:// (moto).

The chain of every stage through an fq:// queue with two workers and MariaDB, killed at seeded
points and compared with the local chain, is in test_kill.py
(`test_every_stage_through_a_queue_killed_at_seeded_points_equals_the_local_chain`): it shares
that file's reference chain instead of building a second local one.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from sqlalchemy import select

from db.models import PipelineRun
from db.session import init_db, session_scope
from pipeline.atomic import sha256_file
from pipeline.create_pipeline import main
from pipeline.sample import build_sample
from tests.helpers_queue import REPO, rows, start_worker, stop

pytestmark = pytest.mark.filterwarnings("ignore:builtin type [Ss]wig")  # ITK's SWIG wrappers


def runner(root: Path, db_url: str, stage: str, downsample: str, queue: str) -> subprocess.Popen:
    args = [sys.executable, "-m", "pipeline", "--animal", "DEMO", "--task", stage, "--downsample", downsample,
            "--data-root", str(root), "--db-url", db_url, "--queue", queue, "--verify-sample", "0"]
    return subprocess.Popen(args, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def queued(root: Path, db_url: str, stage: str, downsample: str, queue: str) -> subprocess.CompletedProcess:
    proc = runner(root, db_url, stage, downsample, queue)
    out, err = proc.communicate(timeout=300)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


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


def test_a_worker_refuses_a_lease_shorter_than_two_seconds(tmp_path, capsys):
    """The worker renews its lease every quarter of it; fq:// counts lease ends in whole seconds."""
    assert main(["worker", "--queue", f"fq://{tmp_path / 'queue'}", "--data-root", str(tmp_path),
                 "--lease-seconds", "1"]) == 2
    assert "error: --lease-seconds 1: at least 2" in capsys.readouterr().err
    assert not (tmp_path / "queue").exists()
