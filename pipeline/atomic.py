"""Atomic file writes and checksums shared by every stage.

A killed run must never leave a file under its final name that looks finished, so every writer
goes through `atomic_path`: the data lands under a temporary name and is renamed only after the
writer returned without error.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
from pathlib import Path
from typing import Iterator

TMP_MARK = ".tmp-"


def temp_name(final: Path) -> Path:
    """`<stem>.tmp-<pid><suffix>`: keeps the suffix so format-sniffing writers still work."""
    final = Path(final)
    return final.with_name(f"{final.stem}{TMP_MARK}{os.getpid()}{final.suffix}")


PAUSE_ENV = "SLIDEPIPE_TEST_PAUSE_BEFORE_RENAME"
"""For kill tests only: `<path suffix>[:<seconds>]` makes the writer of a file whose path ends so
stop for that long (default an hour) with its temporary file written and not yet renamed, after
saying so on stderr, so a test knows when to kill it mid-write; `pause_point` names other points
the same way (e.g. `<slab marker> recorded`: between two slabs). Unset: no effect."""


@contextlib.contextmanager
def atomic_path(final: str | Path, make_parent: bool = True) -> Iterator[Path]:
    """Yield a temporary path next to `final`; rename it over `final` on success.

    Works for files and directories (a directory is renamed as a whole; an existing final
    directory is replaced). `make_parent=False`: a missing directory is an error
    (FileNotFoundError) instead of being made again.
    """
    final = Path(final)
    if make_parent:
        final.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_name(final)
    _remove(tmp)
    try:
        yield tmp
        if os.environ.get(PAUSE_ENV):
            _pause_for_test(final.as_posix(), f"before renaming {tmp} to {final}")
        if tmp.is_dir() and final.is_dir():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        _remove(tmp)
        raise


def pause_point(name: str) -> None:
    """The PAUSE_ENV hook at a point that is not a rename, named like a path (kill tests only)."""
    if os.environ.get(PAUSE_ENV):
        _pause_for_test(name, f"at {name}")


def _pause_for_test(name: str, where: str) -> None:
    suffix, _, seconds = os.environ[PAUSE_ENV].partition(":")
    if suffix and name.endswith(suffix):
        import sys
        import time

        print(f"slidepipe test hook: pid {os.getpid()} paused {where}", file=sys.stderr, flush=True)
        time.sleep(float(seconds or 3600))


def write_text_if_changed(path: str | Path, text: str) -> bool:
    """Write `text` atomically unless the file already holds exactly it (then its mtime, and so
    what a web server reports for it, stays). True when written."""
    path = Path(path)
    data = text.encode()
    if path.is_file() and path.stat().st_size == len(data) and path.read_bytes() == data:
        return False
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return True


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def is_temp(path: str | Path) -> bool:
    return TMP_MARK in Path(path).name


def remove_stale_temps(directory: Path) -> int:
    """Delete temp files left by killed runs (their pid no longer exists)."""
    removed = 0
    if not directory.is_dir():
        return 0
    for entry in directory.iterdir():
        if not is_temp(entry):
            continue
        pid_part = entry.name.split(TMP_MARK, 1)[1].split(".", 1)[0]
        if pid_part.isdigit() and pid_alive(int(pid_part)):
            continue
        _remove(entry)
        removed += 1
    return removed


def pid_alive(pid: int) -> bool:
    """Whether a process exists (signal 0); a process we may not signal still counts as alive.

    A zombie does not: pool workers of a SIGKILLed runner are reparented and stay zombies until
    PID 1 reaps them (seconds, in containers), and a rerun in that window must still clear their
    temp files and take over their locks."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return not _zombie(pid)


def _zombie(pid: int) -> bool:
    """State Z in /proc (Linux); elsewhere, or when /proc cannot tell, not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rfind(")") + 2:].startswith("Z")  # the name in (...) may hold spaces or ')'


def sha256_file(path: str | Path, block: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(block):
            digest.update(chunk)
    return digest.hexdigest()
