"""The `create_pipeline serve` commands: `serve` in the foreground (`serve_forever`), and
`--background | --stop | --status`: one server per data root that outlives the shell which
started it (e.g. `make demo`), found again through a state file.

The server runs in a supervisor process (`python -m apache.background ...`) in its own session,
with no terminal and no inherited pipes, so neither closing the terminal nor the end of the
calling command stops it, and a caller reading our output through a pipe sees it end. The
supervisor owns the server (Apache is its child and dies with it); SIGTERM to the supervisor
stops both. `<data_root>/.serve/server.json` records pid, process start time (a recycled pid is
not mistaken for ours), port, URL and which server; a foreground `serve` records itself there too.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator

import psutil

from apache.common import (SERVER_KINDS, CorsPolicy, ServeError, announce, fallback_notice, port_in_use_message,
                           port_is_free, print_links, server_name)
from apache.launcher import choose_server, create_server
from pipeline.atomic import atomic_path
from pipeline.errors import SlidepipeError
from pipeline.layout import server_state_dir

START_TIMEOUT = 60.0
STOP_TIMEOUT = 20.0


@dataclass(frozen=True)
class ServerRecord:
    pid: int
    started: float        # the process's start time (psutil), so a reused pid is not taken for ours
    server: str           # "apache" | "fallback"
    host: str
    port: int
    url: str
    data_root: str
    mode: str             # "background" | "foreground"
    log: str | None = None
    cors_origins: str | None = None   # the --cors-origins setting it serves with (None: the default)

    def describe(self) -> str:
        return f"{server_name(self.server)} (pid {self.pid}, {self.mode}) at {self.url}"


def state_file(data_root: str | Path) -> Path:
    return server_state_dir(data_root) / "server.json"


def log_file(data_root: str | Path) -> Path:
    return server_state_dir(data_root) / "server.log"


@contextlib.contextmanager
def registration_lock(data_root: str | Path) -> Iterator[None]:
    """Serialises start, stop and registration on one data root (two `--background` at once
    start one server)."""
    directory = server_state_dir(data_root)
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / "lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def read_record(data_root: str | Path) -> ServerRecord | None:
    try:
        return ServerRecord(**json.loads(state_file(data_root).read_text()))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, TypeError):
        return None  # unreadable: treated as no server (the file is replaced on the next start)


def is_alive(record: ServerRecord) -> bool:
    """The recorded process still runs (a zombie waiting for init to reap it does not count)."""
    try:
        process = psutil.Process(record.pid)
        return (process.status() != psutil.STATUS_ZOMBIE
                and abs(process.create_time() - record.started) < 0.05)
    except (psutil.NoSuchProcess, psutil.ZombieProcess):
        return False
    except psutil.AccessDenied:
        return True


def running_server(data_root: str | Path) -> ServerRecord | None:
    """The live server of this data root; a stale state file (its process gone) is removed."""
    record = read_record(data_root)
    if record is not None and is_alive(record):
        return record
    with contextlib.suppress(FileNotFoundError):
        state_file(data_root).unlink()
    return None


def register(server, mode: str, log: Path | None = None, cors_origins: str | None = None) -> ServerRecord:
    record = ServerRecord(pid=os.getpid(), started=psutil.Process().create_time(), server=server.kind,
                          host=server.host, port=server.port, url=server.url, data_root=str(server.data_root),
                          mode=mode, log=None if log is None else str(log), cors_origins=cors_origins or None)
    with atomic_path(state_file(server.data_root)) as tmp:
        tmp.write_text(json.dumps(asdict(record), indent=2) + "\n")
    return record


def unregister(data_root: str | Path, pid: int) -> None:
    record = read_record(data_root)
    if record is not None and record.pid == pid:
        with contextlib.suppress(FileNotFoundError):
            state_file(data_root).unlink()


def refuse_if_running(data_root: Path) -> None:
    record = running_server(data_root)
    if record is not None:
        raise ServeError(f"{record.describe()} already serves this data root: use it, or stop it first with "
                         f"`create_pipeline serve --stop --data-root {data_root}`")


def answers(url: str, timeout: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/", timeout=timeout) as response:
            response.read()
        return True
    except urllib.error.HTTPError:
        return True
    except (urllib.error.URLError, OSError):
        return False


# --- the commands -------------------------------------------------------------------------------

def start_background(data_root: str | Path, port: int = 8080, server: str = "auto", *, host: str = "127.0.0.1",
                     animal: str | None = None, public_client: str | None = None, cors_origins: str | None = None,
                     timeout: float = START_TIMEOUT) -> int:
    """`serve --background`: start the detached server (or reuse the running one), wait until it
    answers, print the URL and the links. `cors_origins`: see CorsPolicy.from_setting."""
    cors = CorsPolicy.from_setting(cors_origins)
    root = Path(data_root).absolute()
    if not root.is_dir():
        raise ServeError("data root does not exist (run the pipeline first)", root)
    root = root.resolve()
    with registration_lock(root):
        record = running_server(root)
        if record is not None:
            if not answers(record.url):
                raise ServeError(f"{record.describe()} is registered for this data root but does not answer: "
                                 f"stop it with `create_pipeline serve --stop --data-root {root}`")
            note = f" (on port {record.port}, not {port}: stop it first to change the port)" \
                if port and port != record.port else ""
            if CorsPolicy.from_setting(record.cors_origins) != cors:
                note += (f" (it lets {CorsPolicy.from_setting(record.cors_origins).describe()} read the data, "
                         f"not {cors.describe()}: stop it first to change that)")
            print(f"slidepipe: a server already runs for this data root: reusing it{note}")
            _print_started(record, root, None)
            print_links(root, record.url, animal, public_client)
            return 0
        kind, reason = choose_server(server, root)
        if port and not port_is_free(host, port):
            raise ServeError(port_in_use_message(host, port, server_name(kind)))
        record = _spawn(root, port, kind, host, cors_origins, timeout)
    _print_started(record, root, reason)
    print_links(root, record.url, animal, public_client)
    return 0


def _print_started(record: ServerRecord, root: Path, reason: str | None) -> None:
    where = "in the background" if record.mode == "background" else "in the foreground of another command"
    announce(record.server, root, record.url, f"{where}, pid {record.pid}", reason,
             CorsPolicy.from_setting(record.cors_origins))
    print(f"stop it with: create_pipeline serve --stop --data-root {root}"
          + (f"  (log: {record.log})" if record.log else ""), flush=True)


def _spawn(root: Path, port: int, kind: str, host: str, cors_origins: str | None, timeout: float) -> ServerRecord:
    """Start the supervisor in a new session and wait for it to register and answer."""
    log = log_file(root)
    project = str(Path(__file__).resolve().parent.parent)
    env = dict(os.environ, PYTHONUNBUFFERED="1",
               PYTHONPATH=os.pathsep.join(p for p in (project, os.environ.get("PYTHONPATH")) if p))
    command = [sys.executable, "-m", "apache.background", "--data-root", str(root), "--port", str(port),
               "--server", kind, "--host", host] + (["--cors-origins", cors_origins] if cors_origins else [])
    with open(log, "wb") as output:
        child = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=output, stderr=subprocess.STDOUT,
                                 cwd="/", env=env, start_new_session=True, close_fds=True)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if child.poll() is not None:
            raise ServeError(f"{server_name(kind)} did not start: {_failure(log)}", log)
        record = read_record(root)
        if record is not None and record.pid == child.pid and answers(record.url):
            child.returncode = 0  # it is meant to outlive us: no "still running" warning at exit
            return record
        time.sleep(0.1)
    child.terminate()
    raise ServeError(f"{server_name(kind)} did not answer within {timeout:.0f} s: {_failure(log)}", log)


def _failure(log: Path) -> str:
    lines = [line for line in log.read_text(errors="replace").splitlines() if line.strip()] if log.is_file() else []
    errors = [line.removeprefix("error: ") for line in lines if line.startswith("error: ")]
    return errors[-1] if errors else " | ".join(lines[-5:]) or "no output"


def stop_server(data_root: str | Path, timeout: float = STOP_TIMEOUT) -> int:
    """`serve --stop`: SIGTERM to the registered server (background or foreground), wait until it
    has exited and its port is free, remove the state file."""
    root = Path(data_root).absolute()
    if not root.is_dir():
        print(f"slidepipe: no server runs for {root} (no such directory)")
        return 0
    root = root.resolve()
    with registration_lock(root):
        record = read_record(root)
        if record is None:
            print(f"slidepipe: no server runs for {root}")
            return 0
        if not is_alive(record):
            running_server(root)
            print(f"slidepipe: no server runs for {root} (removed the state of pid {record.pid}, which had ended)")
            return 0
        with contextlib.suppress(ProcessLookupError):
            os.kill(record.pid, signal.SIGTERM)
        if not wait_until(lambda: not is_alive(record), timeout):
            with contextlib.suppress(ProcessLookupError):
                os.kill(record.pid, signal.SIGKILL)  # Apache, its child, gets SIGTERM then
            wait_until(lambda: not is_alive(record), timeout)
        if not wait_until(lambda: not answers(record.url, timeout=0.5), timeout):
            raise ServeError(f"{record.url} still answers after stopping pid {record.pid}")
        unregister(root, record.pid)
    print(f"slidepipe: stopped {record.describe()}")
    return 0


def wait_until(condition, timeout: float = 15.0) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def server_status(data_root: str | Path) -> int:
    """`serve --status`: 0 when a server runs for this data root and answers, else 1."""
    root = Path(data_root).absolute()
    record = running_server(root.resolve()) if root.is_dir() else None
    if record is None:
        print(f"slidepipe: no server runs for {root}")
        return 1
    if not answers(record.url):
        print(f"slidepipe: {record.describe()} runs for {record.data_root} but does NOT answer")
        return 1
    print(f"slidepipe: running: {record.describe()}, serving {record.data_root}")
    if record.server == "fallback":
        print(fallback_notice(None))
    print(f"offline Neuroglancer client: {record.url}/v/slidepipe/"
          + (f"\nlog: {record.log}" if record.log else ""))
    return 0


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def serve_forever(data_root: str | Path, port: int = 8080, animal: str | None = None, *, host: str = "127.0.0.1",
                  db_url: str | None = None, public_client: str | None = None, server: str = "auto",
                  cors_origins: str | None = None) -> int:
    """`create_pipeline serve`: run the server in the foreground, print the links, stop on Ctrl-C
    or SIGTERM (so `create_pipeline serve --stop` stops it too).

    `db_url` is accepted for symmetry with the other commands; the links are built from the
    published `info` files, which already carry the database's voxel sizes.
    """
    data_root = Path(data_root)
    if not data_root.is_dir():
        raise ServeError("data root does not exist (run the pipeline first)", data_root.absolute())
    kind, reason = choose_server(server, data_root)
    instance = create_server(kind, data_root, port, host=host, cors_origins=cors_origins)
    with registration_lock(instance.data_root):
        refuse_if_running(instance.data_root)
        instance.start()
        register(instance, mode="foreground", cors_origins=cors_origins)
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        announce(kind, instance.data_root, instance.url, "Ctrl-C stops", reason, instance.cors_policy)
        print_links(instance.data_root, instance.url, animal, public_client)
        while instance.alive():
            time.sleep(0.5)
        raise ServeError(f"{instance.name} exited unexpectedly: {instance.error_log.strip()[-2000:]}")
    except KeyboardInterrupt:
        print(f"\nstopping {instance.name}", flush=True)
        return 0
    finally:
        signal.signal(signal.SIGTERM, previous)
        instance.stop()
        unregister(instance.data_root, os.getpid())


# --- the supervisor -----------------------------------------------------------------------------

def supervise(data_root: Path, port: int, kind: str, host: str, cors_origins: str | None = None) -> int:
    """Run the server until SIGTERM/SIGINT; registered while it runs."""
    stop = threading.Event()
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    options = {"log": sys.stderr} if kind == "fallback" else {}
    try:
        server = create_server(kind, data_root, port, host=host, cors_origins=cors_origins, **options)
        server.start()
    except SlidepipeError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 1
    try:
        register(server, mode="background", log=log_file(data_root), cors_origins=cors_origins)
        print(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {server.name} serving {server.data_root} at {server.url} "
              f"(pid {os.getpid()})", flush=True)
        while server.alive() and not stop.wait(0.5):
            pass
        if stop.is_set():
            print(f"{time.strftime('%Y-%m-%d %H:%M:%S')} stopping {server.name}", flush=True)
            return 0
        print(f"error: {server.name} exited unexpectedly: {server.error_log.strip()[-2000:]}", flush=True)
        return 1
    finally:
        server.stop()
        unregister(data_root, os.getpid())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m apache.background",
                                     description="The supervisor `create_pipeline serve --background` starts.")
    parser.add_argument("--data-root", type=Path, required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--server", choices=[k for k in SERVER_KINDS if k != "auto"], required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--cors-origins", default=None)
    args = parser.parse_args(argv)
    return supervise(args.data_root.resolve(), args.port, args.server, args.host, args.cors_origins)


if __name__ == "__main__":
    sys.exit(main())
