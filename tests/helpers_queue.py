"""`create_pipeline worker` processes for tests that run stages through a task queue."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Iterator

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
