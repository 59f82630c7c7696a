"""`create_pipeline worker` processes for tests that run stages through a task queue."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Iterator

from sqlalchemy import select

from db.models import FileLog, PipelineRun
from db.session import init_db, session_scope

REPO = Path(__file__).resolve().parents[1]


def start_worker(queue_url: str, data_root: Path, cwd: Path, *extra: str, env: dict | None = None,
                 log: Path | None = None) -> subprocess.Popen:
    """A worker process started from `cwd` (this checkout's code), its stderr in `log` (or a pipe)."""
    cwd.mkdir(parents=True, exist_ok=True)
    environment = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    stderr = open(log, "w") if log else subprocess.PIPE  # noqa: SIM115 (closed with the process)
    return subprocess.Popen([sys.executable, "-m", "pipeline", "worker", "--queue", queue_url, "--data-root",
                             str(data_root), *extra], cwd=cwd, env=environment, stdout=subprocess.DEVNULL,
                            stderr=stderr, text=True)


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    if proc.stderr:
        proc.stderr.close()


@contextlib.contextmanager
def worker(queue_url: str, data_root: Path, cwd: Path, *extra: str, **kwargs) -> Iterator[subprocess.Popen]:
    proc = start_worker(queue_url, data_root, cwd, *extra, **kwargs)
    try:
        yield proc
    finally:
        stop(proc)


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
