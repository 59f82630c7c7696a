"""Measuring a command from outside: wall and CPU time, peak memory of every process of its
tree, and the files it leaves beside its final output while it runs.

Everything measured runs as a subprocess, so each figure belongs to that command alone (not to
the harness, which has imported and allocated other things) and the CPU time of its whole tree
comes from `wait4`. Peak memory is read per process from /proc/<pid>/status VmHWM, sampled every
50 ms: a forked worker's VmHWM starts at its own pages and exec starts a new one, so it is that
process's high-water mark even between samples. (`ru_maxrss` from wait4 is not used for memory:
it survives exec, so a child forked from a large harness would report the harness's size.)
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Self, Sequence

import psutil

_HWM = re.compile(rb"VmHWM:\s+(\d+) kB")


def _vm_hwm(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status", "rb") as handle:
            found = _HWM.search(handle.read())
    except OSError:
        return 0
    return int(found.group(1)) * 1024 if found else 0


class _Sampler:
    """Samples something in a daemon thread between `start()` and `stop()` (the subclass's `_run`,
    which loops until `self._stop` is set)."""

    def __init__(self):
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        raise NotImplementedError

    def start(self) -> Self:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


class TreeMemory(_Sampler):
    """Peak resident memory of a process and of each of its descendants, sampled in a thread."""

    def __init__(self, pid: int, interval: float = 0.05):
        super().__init__()
        self.pid = pid
        self.interval = interval
        self.peak: dict[int, int] = {}

    def _run(self) -> None:
        try:
            root = psutil.Process(self.pid)
        except psutil.Error:
            return
        while not self._stop.is_set():
            try:
                pids = [self.pid] + [c.pid for c in root.children(recursive=True)]
            except psutil.Error:
                pids = [self.pid]
            for pid in pids:
                value = _vm_hwm(pid)
                if not value:
                    try:
                        value = psutil.Process(pid).memory_info().rss
                    except psutil.Error:
                        continue
                if value > self.peak.get(pid, 0):
                    self.peak[pid] = value
            self._stop.wait(self.interval)

    @property
    def main(self) -> int:
        return self.peak.get(self.pid, 0)

    @property
    def largest_worker(self) -> int:
        return max((v for pid, v in self.peak.items() if pid != self.pid), default=0)


def tree_stats(path: Path, skip: Callable[[Path], bool] | None = None) -> tuple[int, int]:
    """(files, bytes) under `path`, leaving out entries for which `skip(entry)` is true."""
    files = size = 0
    stack = [Path(path)]
    while stack:
        folder = stack.pop()
        try:
            entries = list(os.scandir(folder))
        except OSError:
            continue
        for entry in entries:
            if skip and skip(Path(entry.path)):
                continue
            try:
                if entry.is_dir(follow_symlinks=False):
                    stack.append(Path(entry.path))
                elif entry.is_file(follow_symlinks=False):
                    files += 1
                    size += entry.stat(follow_symlinks=False).st_size
            except OSError:  # deleted while we looked: a temporary file
                continue
    return files, size


class TempFiles(_Sampler):
    """Peak files and bytes under `folder` that are not the final output (`is_final(path)`),
    sampled in a thread. A scan of many small files costs CPU the measured command also wants,
    so the thread sleeps four times as long as its last scan took (at least `interval`): it takes
    at most a fifth of one core, and a run of a few seconds is still sampled several times."""

    def __init__(self, folder: Path, is_final: Callable[[Path], bool], interval: float = 0.2):
        super().__init__()
        self.folder, self.is_final, self.interval = Path(folder), is_final, interval
        self.peak_files = self.peak_bytes = 0
        self.samples = 0

    def _run(self) -> None:
        while not self._stop.is_set():
            started = time.perf_counter()
            files, size = tree_stats(self.folder, self.is_final)
            self.peak_files, self.peak_bytes = max(self.peak_files, files), max(self.peak_bytes, size)
            self.samples += 1
            self._stop.wait(max(self.interval, 4 * (time.perf_counter() - started)))


@dataclass
class Measured:
    """What `run_measured` saw: wall seconds of the whole command, CPU seconds of its tree
    (user + system, every waited-for descendant included), peak memory of its main process and
    of its largest other process, peak temporary files/bytes, its exit status and output."""

    wall: float
    cpu: float
    peak_main: int
    peak_worker: int
    temp_files: int = 0
    temp_bytes: int = 0
    returncode: int = 0
    stdout: str = ""
    stderr: str = ""
    extra: dict = field(default_factory=dict)

    def result(self) -> dict:
        """The last stdout line as JSON (the bench children print their own figures there)."""
        lines = [line for line in self.stdout.strip().splitlines() if line.startswith("{")]
        return json.loads(lines[-1]) if lines else {}


def run_measured(cmd: Sequence[str], *, cwd: Path | None = None, env: dict | None = None,
                 temp_folder: Path | None = None, is_final: Callable[[Path], bool] | None = None,
                 check: bool = True) -> Measured:
    """Run `cmd` and measure it (see the module docstring); raise with its stderr if it fails
    and `check`."""
    with open(os.devnull, "rb") as devnull:
        started = time.perf_counter()
        proc = subprocess.Popen(list(cmd), cwd=cwd, env=env, stdin=devnull, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE)
        memory = TreeMemory(proc.pid).start()
        temp = TempFiles(temp_folder, is_final or (lambda p: False)).start() if temp_folder else None
        # Read the pipes in threads (a full pipe would block the child), and reap with wait4 for
        # the tree's CPU time.
        chunks: dict[str, list[bytes]] = {"out": [], "err": []}

        def drain(stream, key):
            for line in iter(stream.readline, b""):
                chunks[key].append(line)

        readers = [threading.Thread(target=drain, args=(proc.stdout, "out"), daemon=True),
                   threading.Thread(target=drain, args=(proc.stderr, "err"), daemon=True)]
        for reader in readers:
            reader.start()
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - started
        proc.returncode = os.waitstatus_to_exitcode(status)
        for reader in readers:
            reader.join()
    memory.stop()
    if temp:
        temp.stop()
    measured = Measured(
        wall=wall, cpu=usage.ru_utime + usage.ru_stime, peak_main=memory.main, peak_worker=memory.largest_worker,
        temp_files=temp.peak_files if temp else 0, temp_bytes=temp.peak_bytes if temp else 0,
        returncode=proc.returncode, stdout=b"".join(chunks["out"]).decode(errors="replace"),
        stderr=b"".join(chunks["err"]).decode(errors="replace"))
    if check and measured.returncode != 0:
        raise SystemExit(f"{' '.join(map(str, cmd))} failed ({measured.returncode}):\n{measured.stderr[-4000:]}")
    return measured


def python_cmd(*args: str) -> list[str]:
    return [sys.executable, *args]
